"""The ``deepwatch`` command line. Each command group lives in its own module
and registers itself on the shared Typer ``app``."""

from __future__ import annotations

from streams.cli.app import app
from streams.cli import pipeline, query, detect, bank, models  # noqa: F401,E402  (registration)
from streams.cli import connect  # noqa: F401,E402  (registration)
from streams.cli import grafana  # noqa: F401,E402  (registration)
from streams.cli import serve  # noqa: F401,E402  (registration)
from streams.cli import settings_cmd  # noqa: F401,E402  (registration)
from streams.cli import redeliver  # noqa: F401,E402  (registration)
from streams.cli import prune  # noqa: F401,E402  (registration)
from streams.cli import desk_users  # noqa: F401,E402  (registration)


def _one_line_summaries(typer_app) -> None:
    """``deepwatch --help`` lists each command by its docstring's first
    paragraph; Typer's rich mode keeps that paragraph's line breaks, so the
    list came out ragged (a break mid-sentence in every row). Each command
    without its own short help gets the paragraph as one line."""
    import inspect

    for info in typer_app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if info.short_help is None and doc:
            info.short_help = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _one_line_summaries(group.typer_instance)


_one_line_summaries(app)


def main() -> None:
    from streams.cli.common import run_cli

    run_cli(app)
