"""Structured logging: one JSON object per line (for log shippers) or a
readable console form; ``extra={...}`` fields are kept, as keys (JSON) or
as ``key=value`` after the message (console, ``ConsoleFormatter``).

Third-party loggers (``THROTTLED``: aiokafka, kafka-python, Faust and its
``mode`` runtime) are rate limited: a broker that goes away made aiokafka log
about 85 lines a second in a long-lived worker (one per reconnect try and
metadata refresh), drowning everything else. The first record of each
(logger, level, message template) in ``THROTTLE_WINDOW_S`` is written; the
repeats are counted, and once the window is over one line says how many
("N more like this in the last 10 s"). deepwatch's own lines are never held
back.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Callable

from detectors.printable import one_line

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# Extras other libraries attach for their own console formatters, not for a
# log: uvicorn's ``color_message`` is ``msg`` again with raw ANSI escapes.
_DROPPED = frozenset({"color_message"})

THROTTLED = ("aiokafka", "kafka", "faust", "mode")
THROTTLE_WINDOW_S = 10.0
# Distinct (logger, level, template) windows kept at once: a logger that
# formats its own text (a host or offset in each message) makes a new key per
# line, and memory must not follow. Past the cap the oldest window is closed
# early (its summary written) to make room.
THROTTLE_MAX_KEYS = 256
_TEXT_MAX = 300  # of the first message, repeated in its summary


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


# fields the console line's message says already: a throttle summary's count of repeats
_SAID = frozenset({"repeats"})


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STD and k not in _DROPPED and not k.startswith("_")}


class ConsoleFormatter(logging.Formatter):
    """The readable form: time, level, logger and message, then the record's
    ``extra`` fields as `` key=value`` (the reason a line is about), on one
    line: control characters escaped and line breaks made spaces
    (``detectors.printable.one_line``: a value can come from a feed), a value
    holding a space, ``"`` or ``=``, one that had to be escaped, and an empty
    one in double quotes (``\\`` and ``"`` escaped inside them, so a
    backslash there is always an escape), a list or mapping as compact
    JSON (in quotes only when it holds a space)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # before any traceback ``format`` appends: the fields belong to the line they explain
        line = super().formatMessage(record)
        extras = _extras(record)
        if not extras:
            return line
        return line + "".join(f" {k}={_console_value(v)}" for k, v in extras.items() if k not in _SAID)


def _console_value(value: object) -> str:
    if isinstance(value, (list, tuple, dict)):
        # JSON escapes its own quotes and backslashes: bare unless a space would end it early
        text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
        special = " "
    else:
        text = value if isinstance(value, str) else str(value)  # a number, None, an exception, a path
        special = ' "='
    # as logfmt: a value left bare is read as it stands, up to the next space
    if text and one_line(text) == text and not any(c in text for c in special):
        return text
    # backslashes first, so an escape ``one_line`` writes (``\x1b``) is told from the text "\x1b"
    return '"' + one_line(text.replace("\\", "\\\\")).replace('"', '\\"') + '"'


class _Window:
    __slots__ = ("started", "wall", "name", "levelno", "text", "repeats")

    def __init__(self, started: float, record: logging.LogRecord):
        self.started = started
        self.wall = record.created
        self.name, self.levelno = record.name, record.levelno
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose args do not fit its template
            text = str(record.msg)
        self.text = text[:_TEXT_MAX]
        self.repeats = 0


class Throttle:
    """Which records of the ``loggers`` (and their children) to write: the
    first of each (logger, level, template) per ``window_s``; the repeats
    are counted. ``admit`` also returns the summary records of the windows
    that have ended, each dated at its window's end (a summary comes out
    with the next record of any logger, or when the handler closes: a
    window's end sets no timer). Not thread-safe on its
    own: ``ThrottledHandler`` calls it under the handler's lock."""

    def __init__(self, window_s: float = THROTTLE_WINDOW_S, max_keys: int = THROTTLE_MAX_KEYS,
                 loggers: tuple[str, ...] = THROTTLED, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.max_keys = max(1, max_keys)
        self.loggers = loggers
        self.clock = clock
        self._windows: OrderedDict[tuple, _Window] = OrderedDict()  # oldest window first

    def applies(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.loggers)

    def admit(self, record: logging.LogRecord) -> tuple[bool, list[logging.LogRecord]]:
        now = self.clock()
        due = self._ended(now)
        if not self.applies(record.name):
            return True, due
        key = (record.name, record.levelno, str(record.msg))
        window = self._windows.get(key)
        if window is not None:
            window.repeats += 1
            return False, due
        while len(self._windows) >= self.max_keys:
            _, oldest = self._windows.popitem(last=False)
            if oldest.repeats:
                due.append(self._summary(oldest, now - oldest.started))
        self._windows[key] = _Window(now, record)
        return True, due

    def drain(self) -> list[logging.LogRecord]:
        """Every open window's summary (the handler is closing)."""
        now = self.clock()
        out = [self._summary(w, now - w.started) for w in self._windows.values() if w.repeats]
        self._windows.clear()
        return out

    def _ended(self, now: float) -> list[logging.LogRecord]:
        due = []
        while self._windows:
            window = next(iter(self._windows.values()))
            if now - window.started < self.window_s:
                break
            self._windows.popitem(last=False)
            if window.repeats:
                due.append(self._summary(window, self.window_s))
        return due

    def _summary(self, window: _Window, span_s: float) -> logging.LogRecord:
        span = min(self.window_s, max(span_s, 0.0))
        shown = max(1, math.ceil(span))
        record = logging.makeLogRecord({
            "name": window.name, "levelno": window.levelno, "levelname": logging.getLevelName(window.levelno),
            "msg": f"{window.repeats} more like this in the last {shown} s: {window.text}",
            "args": None, "created": min(time.time(), window.wall + span), "repeats": window.repeats,
        })
        record.msecs = (record.created % 1) * 1000
        return record


class ThrottledHandler(logging.StreamHandler):
    """A stream handler that writes third-party records through ``Throttle``."""

    def __init__(self, stream, throttle: Throttle | None = None):
        super().__init__(stream)
        self.throttle = throttle or Throttle()

    def emit(self, record: logging.LogRecord) -> None:
        write, due = self.throttle.admit(record)
        for summary in due:
            super().emit(summary)
        if write:
            super().emit(record)

    def close(self) -> None:
        self.acquire()
        try:
            for summary in self.throttle.drain():
                super().emit(summary)
        finally:
            self.release()
        super().close()


def setup(level: str = "INFO", fmt: str = "json", stream=sys.stderr) -> None:
    handler = ThrottledHandler(stream)
    handler.deepwatch_format = fmt  # what ``active_format`` reads
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # elastic_transport logs every request at INFO: a line per bulk write
    for noisy in ("aiokafka", "kafka", "httpx", "elastic_transport"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The warnings module and the hooks for an exception no one can catch (in
    # a thread, or raised by a finalizer: "Exception ignored in ...") write
    # straight to stderr, which is this log: as records they keep its format
    # (one JSON object per line) and its throttle, and `last_error` sees them
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def active_format(stream=None) -> str | None:
    """The format (``json`` or ``console``) of the log ``setup`` installed,
    when its handler is still the root's and writes to ``stream`` (default:
    ``sys.stderr`` as it is now); None otherwise: a one-shot command, which
    never sets one up, or a test that put the root's handlers back or
    captures stderr apart from the log."""
    stream = sys.stderr if stream is None else stream
    for handler in logging.getLogger().handlers:
        fmt = getattr(handler, "deepwatch_format", None)
        if fmt and getattr(handler, "stream", None) is stream:
            return fmt
    return None


def write(level: int, msg: str, *, logger: str = "deepwatch.cli", min_level: str = "INFO", **fields) -> None:
    """One record of ``logger`` with ``fields`` as its keys: on the log when
    ``setup`` made one on stderr (its format, its level); before that (a
    service still checking its settings has a warning to give) as the JSON
    line that log will write, on stderr, when ``level`` reaches
    ``min_level`` (the settings' ``log_level``). ``fields`` must not reuse a
    ``LogRecord`` attribute's name (``msg``, ``name``, ``args``)."""
    log = logging.getLogger(logger)
    if active_format() is not None:
        log.log(level, msg, extra=fields)
        return
    threshold = logging.getLevelName(min_level.upper())
    if isinstance(threshold, int) and level < threshold:
        return
    record = log.makeRecord(log.name, level, __file__, 0, msg, None, None, extra=fields)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.handle(record)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as the default hook: a thread's way to end
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger(__name__).error("uncaught exception in thread %s", name,
                                      exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(args: "sys.UnraisableHookArgs") -> None:
    what = args.err_msg or "Exception ignored in"
    logging.getLogger(__name__).error("%s: %r", what, args.object,
                                      exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
