"""Tables whose first column (or another, told) names the row (a model, a detector, a bank):
that column is never cut, whatever the terminal's width or in a pipe (80
columns). `models list` showed the model name as "pixel-…", yet that name is
what --model takes; `eval` cut detector names to "genera…". The other
columns give way: their text folds onto more lines, and short cells (numbers,
"fake") are kept whole."""

from __future__ import annotations

from rich import box
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

# A cell this wide or narrower is kept on one line ("0.895", "authentic");
# wider text folds. Eight columns of numbers then still fit 80 columns.
_WHOLE = 9


def keyed_table(*headers: str, title: str | None = None, compact: bool = False, key: int = 0) -> Table:
    """A table whose column ``key`` (the first unless told) is the row's name. ``compact``:
    no outer edge or column rules (as ``deepwatch detect``), for tables of many
    columns, which on 80 columns need the room. Fill it, then ``fit`` it."""
    style = dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True) if compact else {}
    table = Table(title=title, **style)  # type: ignore[arg-type]
    for i, h in enumerate(headers):
        # the name: never wrapped, so never narrowed while another column can give way
        table.add_column(h, no_wrap=i == key, overflow="fold")
    return table


def fit(table: Table) -> Table:
    """Give the columns that give way (all but the name) a minimum width: their
    widest short cell. Without it they fold numbers ("0.5" over "00")."""
    for column in table.columns:
        if column.no_wrap:  # the name: kept whole already
            continue
        short = [cell_len(_plain(c)) for c in column.cells]
        short = [n for n in short if n <= _WHOLE]
        if short:
            column.min_width = max(short)
    return table


def _plain(cell: object) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)
