"""``deepwatch bank add|import|list`` and ``deepwatch similar``: banks of known
pictures, and "have we seen this picture?" over clusters and banks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from detectors.regular_file import special_kind
from detectors.signals import signal_types
from streams.cli.app import app
from streams.cli.common import (
    Config, JsonAlias, check_banks, check_store_option, err, fail, note_empty, print_error, print_json, settings_from,
    shown,
)
from streams.plurals import counted
from streams.cli.tables import fit, keyed_table
from streams.settings import Settings

bank_app = typer.Typer(
    name="bank",
    help="Banks of known pictures: hash lists of debunked fakes (alert on sight) and of authentic photos (suppress).",
    no_args_is_help=True,
)
# short_help: `deepwatch --help` cut the group's line at 45 characters ("... debunked fakes...")
app.add_typer(bank_app, name="bank", short_help=bank_app.info.help)

# the hash columns a hash list may have: one per signal type (``detectors.signals``)
_CSV_HELP = (f"CSV with a {' and/or '.join(f'{st.name!r} ({st.hex_len} hex)' for st in signal_types())} column; "
             "optional id, label, quality.")

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic"}

_DataDir = typer.Option(
    None, "--data-dir", "-d", help="Directory holding banks.sqlite and the findings (env DEEPWATCH_DATA_DIR; default ./deepwatch-data)."
)
_Verdict = typer.Option(
    ..., "--verdict", metavar="fake|authentic", help="'fake' (debunked pictures: matching images are flagged) or 'authentic' (verified photos: suppress alerts)."
)
_Format = typer.Option("table", "--format", "-f", metavar="table|json", help="Output format: table (for people) or json (a stable contract for tools).")


def _say(message: str) -> None:
    """One stderr line, never wrapped, never read as rich markup: bank names,
    file names and error texts are the user's, and a name such as "[/x]"
    would otherwise crash rich or vanish from the output."""
    err.print(escape(message), highlight=False, soft_wrap=True)


def _settings(config: Optional[Path], data_dir: Optional[Path]) -> Settings:
    settings = settings_from(config, data_dir=data_dir)  # a --data-dir that is a file: one error line
    check_banks(settings)
    return settings


def _store(settings: Settings, *, read_only: bool = False, then: str = ""):
    """The banks file, matching with the configured rule; read_only for the
    commands that only read it (nothing is created: `bank list` in a
    directory the user may not write, or that does not exist yet). A file
    that cannot be opened, or is not a banks file, is one line naming it
    and the fix (BankFileError), and ``then``: what was not done."""
    from detectors.banks import BankFileError

    try:
        return settings.bank_store(read_only=read_only)
    except BankFileError as e:
        fail(f"{e}{then}")


def _check_name(name: str) -> str:
    """NAME callback: a bank name is shown in tables, alerts and the desk;
    an empty or 100,000-character one was stored as given."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        what = "is empty" if not name else "is longer than 64 characters" if len(name) > 64 else "has other characters"
        raise typer.BadParameter(f"the bank name {what}: use letters, digits, . _ - (at most 64), e.g. afp-debunked")
    return name


def _check_verdict(v: str) -> str:
    if v not in ("fake", "authentic"):
        raise typer.BadParameter("must be 'fake' or 'authentic'", param_hint="--verdict")
    return v


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        elif kind := special_kind(p):  # a FIFO would be waited on forever, a device read without end
            raise typer.BadParameter(f"{p} is {kind}", param_hint="PATHS")
        else:
            raise typer.BadParameter(f"{p} does not exist", param_hint="PATHS")
    if not files:
        raise typer.BadParameter(f"no image files in {', '.join(map(str, paths))} (looked for "
                                 f"{', '.join(sorted(_IMAGE_SUFFIXES))}); nothing added", param_hint="PATHS")
    return files


@bank_app.command("add")
def add(
    name: str = typer.Argument(..., metavar="NAME", callback=_check_name, help="Bank name, e.g. afp-debunked (letters, digits, . _ -; at most 64)."),
    paths: list[Path] = typer.Argument(..., metavar="PATHS", help="Image files and/or directories (searched recursively)."),
    verdict: str = _Verdict,
    data_dir: Optional[Path] = _DataDir,
    config: Optional[Path] = Config,
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Add the readable files and list the others, instead of adding nothing."),
) -> None:
    """Hash images and add them to bank NAME (created on first use).

    All or nothing: if any file is not an image deepwatch can read, each bad
    file is named and nothing is added, unless --skip-bad adds the rest."""
    import sqlite3

    from detectors.banks import BankFileError, ImagesRejected
    from detectors.imagedata import ignore_pillow_warnings

    ignore_pillow_warnings()  # a file Pillow warns about is named in the one line that says what is wrong
    _check_verdict(verdict)
    files = _expand(paths)
    settings = _settings(config, data_dir)
    store = _store(settings, then=f"; nothing added to {name!r}")
    # Bad files are found while hashing, not by a header check first: a
    # truncated JPEG has a sound header and fails only when decoded in full.
    # One pass, one picture held at a time, every bad file named.
    bad: list[str] = []
    try:
        _check_bank_verdict(store, name, verdict)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err, transient=True,
                      disable=not err.is_terminal) as bar:  # off a terminal it left only a blank line
            task = bar.add_task(escape(f"hashing into {name}"), total=len(files))
            added = store.add_images(name, verdict, files, limits=settings.decode_limits(),  # type: ignore[arg-type]
                                     progress=lambda _p: bar.advance(task), keep_rest=skip_bad,
                                     on_bad=lambda p, e: bad.append(f"{p}: {e}"))
    except ImagesRejected:
        for line in bad:
            print_error(line)
        _say(f"nothing added to {name!r}: {len(bad)} of {counted(len(files), 'file')} unreadable; "
             "remove them or pass --skip-bad to add the rest")
        raise typer.Exit(2)
    except BankFileError as e:  # the banks file, not a picture, failed: no file to blame
        fail(f"{e}; nothing added to {name!r}")
    except sqlite3.Error as e:
        fail(f"cannot use banks file {settings.banks_path} ({e}); nothing added to {name!r}")
    finally:
        store.close()
    for line in bad:
        _say(f"skipped {line}")
    there = len(files) - len(bad) - added
    _say(f"added {counted(added, 'new image')} to {name!r} ({there} already there"
         f"{f', {len(bad)} skipped' if bad else ''})")


def _check_bank_verdict(store: Any, name: str, verdict: str) -> None:
    """A bank keeps one verdict: adding authentic pictures to a bank of fakes
    (or the reverse) is refused before any file is hashed, with the fix, not
    blamed on the first file."""
    existing = {b.name: b.verdict for b in store.list_banks()}.get(name)
    if existing is not None and existing != verdict:
        fail(f"bank {name!r} holds {existing} pictures, not {verdict} ones; "
                     f"use another bank name, or --verdict {existing}")


@bank_app.command("import")
def import_(
    name: str = typer.Argument(..., metavar="NAME", callback=_check_name, help="Bank name (letters, digits, . _ -; at most 64)."),
    csv_path: Path = typer.Argument(..., metavar="CSV", exists=True, dir_okay=False, help=_CSV_HELP),
    verdict: str = typer.Option("fake", "--verdict", metavar="fake|authentic", help="'fake' (default: shared lists are usually debunked material) or 'authentic'."),
    data_dir: Optional[Path] = _DataDir,
    config: Optional[Path] = Config,
) -> None:
    """Import a shared hash list (ThreatExchange-style PDQ CSV, or pHash) into bank NAME."""
    import sqlite3

    _check_verdict(verdict)
    settings = _settings(config, data_dir)
    store = _store(settings, then=f"; nothing imported into {name!r}")
    try:
        _check_bank_verdict(store, name, verdict)
        n = store.import_csv(name, csv_path, verdict)  # type: ignore[arg-type]
    except (ValueError, OSError) as e:  # OSError: a FIFO or device named as the CSV, an unreadable file,
        fail(str(e))                     # the banks file (BankFileError: it names itself and the fix)
    except sqlite3.Error as e:
        fail(f"cannot use banks file {settings.banks_path} ({e}); nothing imported into {name!r}")
    finally:
        store.close()
    _say(f"imported {n} hash(es) into {name!r}")


@bank_app.command("list")
def list_(data_dir: Optional[Path] = _DataDir, fmt: str = _Format, config: Optional[Path] = Config,
          as_json: bool = JsonAlias) -> None:
    """List banks with their verdict and number of entries."""
    import os
    import sqlite3

    fmt = "json" if as_json else fmt
    if fmt not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="--format")
    settings = _settings(config, data_dir)
    if not os.path.lexists(settings.banks_path):
        # nothing to list, and nothing is created (the data dir neither): a listing only reads
        banks = []
        _say(f"no banks in {settings.data_dir} yet: `deepwatch bank add` or `deepwatch bank import` creates them")
    else:
        store = _store(settings, read_only=True)  # read-only: works where the user may not write
        try:
            banks = store.list_banks()
        except sqlite3.Error as e:
            fail(f"cannot read banks file {settings.banks_path} ({e}): move it aside or restore it from a backup")
        finally:
            store.close()
    if fmt == "json":
        print_json([b.model_dump() for b in banks])
        return
    table = keyed_table("bank", "verdict", "entries")
    for b in banks:
        table.add_row(shown(b.name), b.verdict, str(b.entries))
    from rich.console import Console

    Console().print(fit(table))
    if not banks and os.path.lexists(settings.banks_path):  # an empty boxed table alone read like a display fault
        note_empty(f"no banks in {settings.banks_path} yet: `deepwatch bank add` or `deepwatch bank import` creates them")


@app.command("similar")
def similar(
    image: Path = typer.Argument(..., metavar="IMAGE", exists=True, dir_okay=False, help="Image file to look up."),
    data_dir: Optional[Path] = _DataDir,
    fmt: str = typer.Option("json", "--format", "-f", metavar="json|table", help="json (an array, nearest first; [] when nothing is near) or table."),
    store_url: Optional[str] = typer.Option(None, "--store", callback=check_store_option, help="Findings store: es://HOST:9200 or https://HOST:9200 (bit-vector kNN); default the SQLite file in --data-dir."),
    config: Optional[Path] = Config,
    as_json: bool = JsonAlias,
) -> None:
    """Clusters and bank entries showing the same picture as IMAGE, nearest first."""
    from detectors.imagedata import ImageData, ImageRejected, ignore_pillow_warnings
    from streams import similar as lookup
    from streams.es_client import EsError
    from streams.findings import KeyedMemberReader, StoreURLError, open_findings, sqlite_file

    fmt = "json" if as_json else fmt
    if fmt not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="--format")
    settings = _settings(config, data_dir)
    ignore_pillow_warnings()  # what is wrong with IMAGE is the one line below
    try:  # under the configured decode limits, as `detect` and the pipeline read images
        picture = lookup.picture_of(ImageData.from_path(image, limits=settings.decode_limits()))
    except ImageRejected as e:
        fail(f"{image}: {e}")
    except OSError as e:  # not a regular file (a FIFO, a device), unreadable: the message names it
        fail(str(e))
    url = store_url or settings.findings.url
    findings_file = sqlite_file(url, settings.data_dir)
    if findings_file is not None and not findings_file.exists() and (url or "").strip().startswith("sqlite://"):
        # as `clusters` says it: a named store that is not there answered bank matches alone, exit 0
        where = "--store" if store_url else "findings.url"
        fix = "" if store_url else " (DEEPWATCH_FINDINGS__URL or the settings file)"
        raise typer.BadParameter(f"no findings at {findings_file}; check the path{fix}", param_hint=where)
    if findings_file is not None and not findings_file.exists() and not settings.banks_path.exists():
        # a mistyped --data-dir answered [] ("nothing is near") instead of saying so
        fail(f"no findings and no banks in {settings.data_dir}; run `deepwatch demo` or `deepwatch replay` (findings) or "
             "`deepwatch bank add` (banks) first, or pass the --data-dir that holds them")
    store = None
    if findings_file is None or findings_file.exists():  # opening a missing SQLite file would create it
        try:
            store = open_findings(url, settings.data_dir, settings)
        except (StoreURLError, EsError) as e:
            raise typer.BadParameter(str(e), param_hint="--store") from None
    try:
        if isinstance(store, KeyedMemberReader):  # SQLite looks up through the process's own index
            # SQLite: the lookup first indexes every stored member (seconds at a million), or only those
            # stored since the copy the last run saved beside the store: a bar on stderr
            lookup.load_index(settings, store)
            with Progress(TextColumn("indexing members"), BarColumn(), MofNCompleteColumn(), console=err,
                          transient=True, disable=not err.is_terminal) as bar:
                task = bar.add_task("index", total=None)
                found = lookup.find(settings, picture, store,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
            lookup.save_index(settings, store)
        else:
            found = lookup.find(settings, picture, store)
        rows = lookup.as_json(found)
        ids = {r["cluster_id"] for r in rows if "cluster_id" in r}
        # the table's verdict column: a cluster's is the stream's (a row carries only the bank's)
        stream_verdicts = ({c.id: f"{c.verdict} ({c.fake_score:.2f})" for c in store.clusters_by_id(ids)}
                           if fmt != "json" and ids and store is not None else {})
    except EsError as e:
        fail(str(e))
    finally:
        if store is not None:
            store.close()
    if fmt == "json":
        print_json(rows)
        return
    # the id is kept whole: the cluster's (the desk's /clusters/ID) or the bank entry's
    table = keyed_table("kind", "id", "distance", "via", "verdict", "label", key=1)
    for r in rows:
        kind = "cluster" if "cluster_id" in r else f"bank {r['bank']}"
        # bank names and labels (file names, imported CSV text) are untrusted: never markup nor control codes
        table.add_row(shown(kind), shown(r.get("cluster_id") or r["entry_id"]), str(r["distance"]), r["via"],
                      r.get("verdict") or stream_verdicts.get(r.get("cluster_id"), ""), shown(r.get("label") or ""))
    from rich.console import Console

    Console().print(fit(table))
    if not rows:  # an empty table alone read like a display fault
        note_empty("nothing near this picture in the clusters or banks")
