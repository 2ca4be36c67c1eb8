"""Options and helpers shared by the command modules."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from detectors.printable import escaped
from streams.console import interruption, received
from streams.settings import Settings, load_settings, setting_source

# Soft wrap: a summary or hint line stays one line in an 80-column log (rich
# wraps at 80 off a terminal), so it can be grepped and copied whole.
# emoji off: ":x:" in a path or a file's header line printed as an emoji
err = Console(stderr=True, soft_wrap=True, emoji=False)

def shown(value: object, style: str = "") -> Text:
    """Untrusted text (post texts, event ids, evidence read from image
    metadata) as a table cell: never read as Rich markup (``[/x]`` crashed
    the table, ``[bold]`` restyled it), and control characters shown as
    escapes (``\x1b``) instead of reaching the terminal."""
    return Text(escaped(str(value)), style=style)


class FirstLines:
    """A table cell of text that shows at most ``lines`` lines at whatever
    width the table gives it, the last ending "…" when some was left out:
    a long cell (a pixel model's paragraph of evidence) made every row of an
    80-column table 12-15 lines tall. Wraps as Rich wraps a folding cell
    (at spaces, words longer than the width folded)."""

    def __init__(self, text: Text, lines: int):
        self.text = text
        self.lines = max(1, lines)

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        return Measurement.get(console, options, self.text)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        width = max(1, options.max_width)
        wrapped = self.text.wrap(console, width, overflow="fold")
        if len(wrapped) > self.lines:
            wrapped = wrapped[: self.lines]
            last = wrapped[-1]
            last.rstrip()
            if last.cell_len >= width:
                last.truncate(width - 1)
                last.rstrip()
            last.append("…")
        out = Text("\n").join(wrapped)
        out.no_wrap = True  # already cut to the width: wrapping again could only move words
        out.overflow = "crop"
        yield out


DataDir = typer.Option(None, "--data-dir", "-d", help="Directory for findings, blobs and logs (env DEEPWATCH_DATA_DIR; default ./deepwatch-data).")
Config = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="TOML settings file (env DEEPWATCH_CONFIG). Environment variables override it.")
Broker = typer.Option(None, "--broker", help="'embedded' (start a Tansu broker) or kafka://HOST:PORT[,HOST:PORT] for an external cluster.")
FormatOpt = typer.Option("table", "--format", "-f", metavar="table|json",
                         help="Output format: table (for people) or json (a stable contract for tools).")
JsonAlias = typer.Option(False, "--json", help="Same as --format json.")


class UserError(Exception):
    """A mistake the user can fix; the message is one line saying how."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input or setup is wrong", not "deepwatch has
    a bug": the CLI prints their message as one line instead of a traceback."""
    from streams.broker import BrokerError
    from streams.settings_check import SettingsError

    import httpx

    # OSError: a file or address the user named is missing, unreadable or
    # unreachable; httpx.HTTPError: a URL the user gave cannot be fetched.
    types: list[type[BaseException]] = [UserError, SettingsError, BrokerError, OSError, httpx.HTTPError]
    for module, name in (("detectors.models.fetch", "FetchError"), ("detectors.models.vendors", "VendorError"),
                         ("kafka.errors", "NoBrokersAvailable"), ("streams.runner", "WorkerExited")):
        # Only from modules the command imported: an error of a module never imported cannot
        # have been raised. Importing them here took 1.3 s (torch, through the model modules)
        # of every mistake's one line, a settings typo's included.
        mod = sys.modules.get(module)
        if isinstance(getattr(mod, name, None), type):
            types.append(getattr(mod, name))
    return tuple(types)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a supervisor, ``timeout``, ``kill``), unwinding like Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise received(Terminated())


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr as one line: soft wrap, so a narrow
    terminal or an 80-column log does not break it (a script greps it).
    Plain in a service whose log is JSON too: a mistake is read by the person
    who made it, at a terminal, and a log shipper keeps a line that is not
    JSON as its text."""
    from rich.markup import escape

    # pydantic's wording leaked into the line, from Typer's check of a choice
    # ("Invalid value for 'KIND': Value error, 'foo' is not one of ...") and
    # from a settings validator ("invalid setting 'findings.url': Value error, ...")
    message = message.replace(": Value error, ", ": ")
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


# Commands that run until stopped (as their command path, less the program's
# name): their stderr is a log, read by a supervisor or a log shipper.
SERVICES = frozenset({"worker", "serve", "serve-ingest", "connect bluesky", "connect mastodon"})
# The log format of the service this process runs, once its settings are
# loaded (``settings_from``), with the stderr it was loaded under: a command
# run in-process by a test (its own captured stderr) is not taken for it.
_service_log: Optional[tuple[str, Any]] = None


def json_log() -> bool:
    """Whether what this process writes on stderr is a JSON log: a service
    whose ``log_format`` is json, from the moment its settings are loaded,
    or whose log ``streams.logs.setup`` made JSON."""
    from streams import logs

    active = logs.active_format()
    if active is not None:
        return active == "json"
    return _service_log is not None and _service_log[0] == "json" and _service_log[1] is sys.stderr


def service_log_format(settings: Settings) -> Optional[str]:
    """``settings.log_format`` when the command running is a service
    (``SERVICES``), None for a one-shot command (replay, demo: a person
    reads their stderr, between progress bars)."""
    from typer._click.globals import get_current_context  # the click Typer vendors (pyproject's typer floor)

    ctx = get_current_context(silent=True)
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:  # the root's name is the program's
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return settings.log_format if " ".join(reversed(names)) in SERVICES else None


def say(text: str, *, fmt: Optional[str], msg: str, level: str = "info", style: str = "", min_level: str = "INFO",
        **fields: Any) -> None:
    """A line a long-running service gives on stderr: a warning about its
    settings, where it listens. With ``fmt`` "json" (its ``log_format``) one
    JSON record of its log (``streams.logs.write``): ``level``, the stable
    ``msg`` a log shipper's rule can match, ``text`` as ``detail`` and
    ``fields`` as keys, and nothing else on stderr. Otherwise (``console``,
    or None from a one-shot command) ``text`` as the readable line it was,
    after "warning: " for a warning."""
    if fmt == "json":
        import logging

        from streams import logs

        logs.write(logging.getLevelName(level.upper()), msg, min_level=min_level, detail=text, **fields)
        return
    prefix = "warning: " if level == "warning" else ""
    err.print(prefix + text, style=style, markup=False, highlight=False, soft_wrap=True)


def _say_stopped(word: str) -> None:
    """"interrupted" or "terminated" as the command ends on Ctrl-C or
    SIGTERM: a record in a service's JSON log (``json_log``)."""
    if json_log():
        import logging

        from streams import logs

        logs.write(logging.INFO, word)
        return
    err.print(word)




def fail(message: str) -> NoReturn:
    """End the command on a user mistake: one ``error:`` line, exit 2."""
    print_error(message)
    raise typer.Exit(2)


def create_missing_topics(settings: Settings, bootstrap: str, *, timeout_s: float = 20.0) -> None:
    """Create the missing topics with the workers' partition counts (what a
    worker does at start), or end the command with one line saying why."""
    import logging

    from streams.broker import BrokerError, ensure_topics
    from streams.topics import topic_specs

    # kafka-python logs each failed connection try (five lines for a port that is
    # not a broker) once the process's log is set up; every failure here already
    # ends in one line naming the fix, so its client is quiet for the check
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        ensure_topics(bootstrap, topic_specs(settings), timeout_s=timeout_s, settings=settings)
    except BrokerError as e:
        fail(str(e))  # says which address and what to do already
    except Exception as e:  # a broker that answers the admin requests oddly: still one line
        fail(f"cannot create the topics on the broker at {bootstrap} ({type(e).__name__}: {e}); "
             "create them yourself and pass --no-create-topics")
    finally:
        kafka_log.setLevel(level)


def write_out(path: Path, text: str) -> None:
    """Write a command's ``--out`` file; a path that cannot be written is one
    line naming the fix, not a bare ``[Errno 2]``."""
    try:
        path.write_text(text)
    except IsADirectoryError:
        fail(f"--out {path} is a directory: name a file in it, e.g. --out {path / 'out.txt'}")
    except FileNotFoundError:
        fail(f"--out {path}: directory {path.parent} does not exist; create it first")
    except OSError as e:
        fail(f"--out {path}: cannot write it ({e.strerror or e})")


def run_cli(app: Any) -> None:
    """Run the Typer app; user errors end as one line on stderr and exit 2.
    SIGTERM unwinds like Ctrl-C: a command that started workers and a broker
    stops them on its way out instead of leaving them running (commands with
    their own handling -- the worker, the desk server -- install theirs)."""
    import signal

    _tolerant_output()
    try:
        # Inside the try: on a loaded machine Ctrl-C can land while the
        # handler is installed or this import (rich's markdown, about 0.1 s)
        # still runs.
        signal.signal(signal.SIGTERM, _terminate)
        from typer._click import exceptions as click_errors  # the click Typer vendors

        # Click writes a usage mistake (bad option value, unknown option,
        # missing argument) as four lines; it is one line like every other mistake.
        for shows in (click_errors.ClickException, click_errors.UsageError, click_errors.NoArgsIsHelpError):
            shows.show = _usage_error  # each class has its own show
        app()
    except KeyboardInterrupt:
        _say_stopped("interrupted")
        sys.exit(130)
    except SystemExit as e:
        # Typer turns Ctrl-C (and SIGTERM: ``Terminated``) into a silent exit
        # 130; a command that says more raises its own Exit, without a cause.
        stopped = e.__context__
        if e.code == 130 and isinstance(getattr(stopped, "__cause__", None), KeyboardInterrupt):
            _say_stopped("terminated" if isinstance(stopped.__cause__, Terminated) else "interrupted")
        raise
    except Exception as e:
        stopped = interruption(e)
        if stopped is not None:  # a Ctrl-C that Python wrapped (streams.console.interruption)
            _say_stopped("terminated" if isinstance(stopped, Terminated) else "interrupted")
            sys.exit(130)
        if isinstance(e, user_error_types()):
            message = str(e) or type(e).__name__
            request = getattr(e, "_request", None)  # httpx errors know their URL; say which
            if request is not None:
                message = f"cannot fetch {request.url}: {message}"
            print_error(message)
            sys.exit(2)
        raise


def _tolerant_output() -> None:
    """On a terminal or pipe whose encoding is not UTF-8 (a Latin-1 or ASCII
    locale, PYTHONIOENCODING=ascii), a character it cannot hold (a post's
    emoji, the "—" of an empty cell, "→" in a summary) ended the command on a
    UnicodeEncodeError traceback: such characters are written as escapes
    (``\u2014``) instead. JSON output is ASCII already (``print_json``)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding in ("utf8", "utf8sig", "utf16", "utf32"):
            continue
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream we can reconfigure (a test's capture)
            continue


def _usage_error(e: Any, file: Any = None) -> None:
    """A click usage error as one ``error:`` line naming the help to read
    (``ClickException.show``)."""
    from typer._click.exceptions import NoArgsIsHelpError

    if isinstance(e, NoArgsIsHelpError):
        # `deepwatch` or a group such as `deepwatch bank` alone: the help is
        # the answer, not a mistake (click: the help on stderr and exit 2)
        print(e.format_message())
        e.exit_code = 0
        return
    from typer._click.exceptions import NoSuchOption

    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    if isinstance(e, NoSuchOption) and not e.option_name.startswith("--") and ctx is not None and any(
            not getattr(p, "opts", ["-"])[0].startswith("-") for p in ctx.command.params):
        # `deepwatch search -harbour`: "No such option: -a", with no word of how to pass such a value
        hint = f" (a value that starts with '-' goes after --, e.g. {ctx.command_path} -- -word; see '{ctx.command_path} --help')"
    print_error(e.format_message() + hint)


def settings_from(config: Optional[Path] = None, **overrides: Any) -> Settings:
    """The settings a command runs with, its data dir checked (``check_data_dir``).
    A service's (``SERVICES``) log format holds from here on (``json_log``)."""
    global _service_log

    settings = load_settings(config, **overrides)
    fmt = service_log_format(settings)
    _service_log = (fmt, sys.stderr) if fmt else None
    check_data_dir(settings, overrides.get("data_dir"))
    return settings


def check_alert_senders(settings: Settings) -> None:
    """Before a command that sends alerts starts: every webhook has its HMAC
    key in the environment and any CA bundle it names can verify (one line
    naming the variable or file, not a run whose alerts all end ``failed``), and a warning line when hooks on different
    hosts share one key (each subscriber could forge the others' alerts) or
    a key rotation's retiring key is not set, or a hook's receiver address
    is one every delivery would refuse (``refused_receivers``): in a
    service's JSON log, a record each (``say``)."""
    import asyncio

    from streams.webhooks import (
        refused_receivers, shared_secret_hooks, unset_previous_keys, unsigned_hooks, unusable_ca_bundles,
    )

    missing = unsigned_hooks(settings) + unusable_ca_bundles(settings)
    if missing:
        fail("; ".join(missing))
    fmt = service_log_format(settings)
    # warnings, not refusals
    for line in shared_secret_hooks(settings):
        say(line, fmt=fmt, level="warning", msg="webhooks on different hosts share an HMAC key",
            min_level=settings.log_level)
    for line in unset_previous_keys(settings):
        say(line, fmt=fmt, level="warning", msg="a webhook's previous_secret_env is not set",
            min_level=settings.log_level)
    # on the console before the run, not only in a worker's log: every alert of such a hook ends rejected
    for line in asyncio.run(refused_receivers(settings)) if settings.alerts.webhooks else ():
        say(line, fmt=fmt, level="warning", msg="a webhook's receiver address is refused",
            min_level=settings.log_level)


def check_data_dir(settings: Settings, given: Optional[Path]) -> None:
    """Refuse a data dir that is a file, or lies under one, before anything
    starts (replay started the broker and workers and then ended on a raw
    ``[Errno 20] Not a directory``; read commands said there were no findings
    yet), or one that does not exist and cannot be created under its nearest
    existing parent (``_check_creatable``); other OS errors are left to the
    command to report."""
    path = Path(settings.data_dir)
    probe = path
    while True:
        try:
            mode = probe.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or a file further up: look higher
            if probe.parent == probe:
                return
            probe = probe.parent
        except (OSError, ValueError):
            return
    # asked of the settings' own sources (the settings file is --config's too), not guessed from the environment
    source = {"env": "from DEEPWATCH_DATA_DIR", "toml": "data_dir in the settings file"}.get(
        setting_source("data_dir") or "", "the default")
    if stat.S_ISDIR(mode):
        if probe != path:
            _check_creatable(path, probe, given, source)
        return
    what = "is a file" if probe == path else f"lies under {probe}, which is a file"
    fix = "name a directory, or a path that does not exist yet (it is created)"
    if probe == path and path.suffix == ".sqlite":  # the store's file named instead of its directory
        parent = str(path.parent)
        fix = f"give the directory that holds it: --data-dir {parent}"
    if given is not None:
        raise typer.BadParameter(f"{path} {what}, not a directory: {fix}", param_hint="--data-dir")
    raise UserError(f"data dir {path} ({source}) {what}, not a directory: {fix}; or pass --data-dir")


def _mkdir_problem(parent: Path) -> Optional[str]:
    """Why no directory can be made in ``parent`` (None: one can). A directory
    made and removed at once says so without leaving anything behind, and
    without guessing from permission bits."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deepwatch-probe-", dir=parent))
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_writable_dir(path: Path, option: str) -> None:
    """A directory a command will write into (a cache, say): it, or its
    nearest existing parent, must be a directory a file can be made in."""
    probe = Path(path)
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        fail(f"{option} {path}: {probe} is not a directory; pick a writable directory")
    why = _mkdir_problem(probe)
    if why:
        verb = "write in it" if probe == Path(path) else "create it"
        fail(f"{option} {path}: cannot {verb} ({why}); pick a writable directory")


def _check_creatable(path: Path, parent: Path, given: Optional[Path], source: str) -> None:
    """A data dir that does not exist yet must be creatable under its nearest
    existing parent: /proc/x or a read-only mount ended a command on a bare
    ``[Errno 2] No such file or directory`` (replay after starting its
    broker)."""
    why = _mkdir_problem(parent)
    if why:
        if given is not None:
            raise UserError(f"--data-dir {path}: cannot create it ({why}); pick a writable directory")
        raise UserError(f"data dir {path} ({source}): cannot create it ({why}); "
                        "pick a writable directory, or pass --data-dir")


def check_banks(settings: Settings) -> None:
    """Refuse a banks.sqlite that SQLite cannot read (random bytes, a
    directory of that name, no read permission) before a command uses it:
    the bank commands and `detect` ended on a sqlite3 traceback, and replay
    exited 0 with every event dead-lettered decode:internal_error. A missing
    file is fine (it is created on first `bank add`); one that is not a
    banks file (a findings store copied over it) is refused here too: the
    workers would log so every bank reload, and the desk answer 500."""
    path = Path(settings.banks_path)
    _check_sqlite_file(path, "banks file", "move it aside or restore it")
    if path.is_file():
        from detectors.banks import BankFileError

        try:
            settings.bank_store(read_only=True).close()
        except BankFileError as e:
            raise UserError(str(e)) from None


def check_engine_state(settings: Settings) -> None:
    """Refuse an engine-state.sqlite that SQLite cannot read before workers
    start on it (each worker died at start on a sqlite3 traceback), or one a
    newer deepwatch wrote (``streams.engine_state.NewerEngineState``)."""
    from streams.clustering import SCHEMA_VERSION
    from streams.engine_state import engine_state_path, newer_state_message, stored_state_version

    path = engine_state_path(settings.data_dir)
    _check_sqlite_file(path, "engine-state file",
                       "move it aside (the clusters' counts and alert levels then start afresh) or restore it "
                       "from a backup")
    stored = stored_state_version(path) if path.is_file() else 0
    if stored > SCHEMA_VERSION:
        raise UserError(newer_state_message(path, stored, SCHEMA_VERSION))


def _check_sqlite_file(path: Path, what: str, fix: str) -> None:
    """A missing file is fine (it is created when first needed)."""
    import sqlite3

    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a SQLite {what}: {fix}")
    try:
        # read-only: a check must not create or repair anything
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            db.close()
    except (sqlite3.Error, OSError) as e:
        raise UserError(f"{path} is not a readable SQLite database ({e}): {fix}") from None


def note_empty(message: str) -> None:
    """One line on stderr under a table that has no rows ("no clusters match
    this search"): an empty table alone reads like a display fault. Table
    output only; JSON stays ``[]``, stdout untouched."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def _strict_unicode(doc: Any) -> Any:
    """``doc`` with every string that is not valid Unicode (a file name's
    undecodable bytes, kept by Python as lone surrogates) written with
    ``\\xNN`` escapes for those bytes: ``json.dumps`` wrote them as lone
    ``\\udcff`` escapes, which strict parsers (Go, serde_json) refuse."""
    if isinstance(doc, str):
        try:
            doc.encode("utf-8")
            return doc
        except UnicodeEncodeError:
            if _escapable(doc):  # a file name's bytes: b"bad\xff" -> "bad\\xff"
                return doc.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            return doc.encode("utf-8", "backslashreplace").decode("utf-8")  # any other lone surrogate: "\\udXXX"
    if isinstance(doc, dict):
        return {_strict_unicode(k): _strict_unicode(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_strict_unicode(v) for v in doc]
    return doc


def _escapable(text: str) -> bool:
    """Whether surrogateescape can turn ``text`` back into bytes (its lone
    surrogates are all U+DC80-U+DCFF, undecodable bytes of a name)."""
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def json_text(doc: Any, indent: Optional[int] = 2) -> str:
    """``doc`` as JSON that any parser reads: ASCII, and no lone surrogates."""
    text = json.dumps(doc, indent=indent, default=str)
    if "\\ud" in text:  # rare: a surrogate pair (an emoji: kept as it is) or a lone one (escaped)
        text = json.dumps(_strict_unicode(json.loads(text)), indent=indent)
    return text


def print_json(doc: Any) -> None:
    sys.stdout.write(json_text(doc) + "\n")


def check_store_option(value: Optional[str]) -> Optional[str]:
    """``--store`` callback: the check ``findings.url`` gets when settings
    load, so a bad port is one line naming --store, not a traceback from the
    first command that opens the store."""
    from streams.findings import check_store_url

    try:
        return check_store_url(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def check_format(fmt: str) -> str:
    if fmt not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="--format")
    return fmt
