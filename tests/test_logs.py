"""``streams.logs``: repeated third-party log records (a broker gone away made
aiokafka log ~85 lines a second) collapse to one line per window plus a
count; deepwatch's own lines are never held back; memory stays bounded."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings

import pytest

from streams import logs


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged():
    """The worker's real logging setup (``logs.setup``), written to a buffer,
    on a clock the test moves; the previous root handlers are put back."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_hooks = threading.excepthook, sys.unraisablehook  # pytest's own, for the rest of the session
    saved_levels = {n: logging.getLogger(n).level for n in ("aiokafka", "kafka", "httpx")}
    buf = io.StringIO()
    logs.setup("INFO", "json", stream=buf)
    [handler] = root.handlers
    clock = _Clock()
    handler.throttle.clock = clock

    def lines(*loggers: str) -> list[dict]:
        """The lines written, or only these loggers': a thread an earlier test in this process left
        behind (a client retrying, a server closing) may log into the same root meanwhile."""
        out = [json.loads(line) for line in buf.getvalue().splitlines()]
        return [d for d in out if not loggers or d["logger"] in loggers]

    yield lines, clock, handler
    logging.captureWarnings(False)
    threading.excepthook, sys.unraisablehook = saved_hooks
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for n, level in saved_levels.items():
        logging.getLogger(n).setLevel(level)


def test_a_thousand_identical_aiokafka_lines_come_out_as_a_handful_with_the_count(logged):
    lines, clock, _ = logged
    conn = logging.getLogger("aiokafka.conn")
    text = "Unable connect to node with id 0: [Errno 111] Connect call failed ('127.0.0.1', 9092)"
    for i in range(1000):
        clock.now += 0.0118  # a broker gone away: ~85 a second, 11.8 s of them
        conn.error("Unable connect to node with id %s: %s", 0, "[Errno 111] Connect call failed ('127.0.0.1', 9092)")
    clock.now += 10.0
    logging.getLogger("streams.app").info("worker going on")  # any later line brings out the last window's count
    out = lines("aiokafka.conn", "streams.app")
    assert [(d["logger"], d["level"], d["msg"], d.get("repeats")) for d in out] == [
        ("aiokafka.conn", "error", text, None),  # the first
        ("aiokafka.conn", "error", f"847 more like this in the last 10 s: {text}", 847),  # the rest of 10 s
        ("aiokafka.conn", "error", text, None),  # the next window's first
        ("aiokafka.conn", "error", f"151 more like this in the last 10 s: {text}", 151),
        ("streams.app", "info", "worker going on", None),
    ]
    assert 1 + 847 + 1 + 151 == 1000
    assert out[0]["ts"] <= out[1]["ts"]


def test_a_flood_that_goes_on_writes_two_lines_per_window(logged):
    lines, clock, handler = logged
    log = logging.getLogger("aiokafka.cluster")
    for _ in range(30 * 85):  # 30 s at 85 a second
        clock.now += 1 / 85
        log.warning("Unable to update metadata from [%s]", 0)
    out = lines("aiokafka.cluster")
    assert 5 <= len(out) <= 7, [d["msg"] for d in out]
    counted = sum(d.get("repeats", 0) for d in out) + sum(1 for d in out if "repeats" not in d)
    handler.close()  # the worker's exit (logging.shutdown): the open window's count is written too
    out = lines("aiokafka.cluster")
    assert sum(d.get("repeats", 0) for d in out) + sum(1 for d in out if "repeats" not in d) == 30 * 85
    assert counted < 30 * 85


def test_deepwatch_own_lines_are_never_held_back(logged):
    lines, clock, _ = logged
    for i in range(1000):
        logging.getLogger("streams.stage").error("blob store write failed (No space left on device)")
    out = lines("streams.stage")
    assert len(out) == 1000 and all("repeats" not in d for d in out), [d for d in lines() if d not in out][:5]


def test_the_windows_kept_are_bounded(logged):
    lines, clock, handler = logged
    log = logging.getLogger("faust.transport")
    for i in range(5000):  # a logger formatting its own text: a new key per line
        log.warning(f"fetch failed at offset {i}")
        log.warning(f"fetch failed at offset {i}")  # and one repeat of each
    assert len(handler.throttle._windows) == logs.THROTTLE_MAX_KEYS
    out = lines("faust.transport")
    firsts = [d for d in out if "repeats" not in d]
    summaries = [d for d in out if "repeats" in d]
    assert len(firsts) == 5000  # distinct messages all written
    assert len(summaries) == 5000 - logs.THROTTLE_MAX_KEYS and all(d["repeats"] == 1 for d in summaries)


def test_a_warning_from_a_library_is_a_json_line_not_raw_stderr(logged):
    # CI: Pillow's DecompressionBombWarning, printed by the warnings module
    # itself, was the one line of a worker log a log shipper could not parse
    lines, _, _ = logged
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Image size (96000000 pixels) exceeds limit", UserWarning)
    [line] = lines("py.warnings")
    assert line["logger"] == "py.warnings" and line["level"] == "warning"
    assert "UserWarning: Image size (96000000 pixels) exceeds limit" in line["msg"]


def test_an_exception_no_one_catches_is_a_json_error_line(logged):
    lines, _, _ = logged

    def boom():
        raise RuntimeError("analyze thread broke")

    t = threading.Thread(target=boom, name="analyze-3")
    t.start()
    t.join()

    class Finalizer:
        def __del__(self):
            raise ValueError("close failed")

    Finalizer()  # its __del__ raises where nothing can catch it
    thread, unraisable = lines("streams.logs")
    assert thread["level"] == "error" and thread["msg"] == "uncaught exception in thread analyze-3"
    assert "RuntimeError: analyze thread broke" in thread["exc"]
    assert unraisable["level"] == "error" and "Exception ignored in" in unraisable["msg"]
    assert "ValueError: close failed" in unraisable["exc"]


def test_the_console_format_is_throttled_too():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    try:
        logs.setup("INFO", "console", stream=buf)
        for _ in range(100):
            logging.getLogger("kafka.client").warning("Node %s connection failed -- refreshing metadata", 1)
        root.handlers[0].close()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = buf.getvalue().splitlines()
    assert len(text) == 2 and text[1].endswith("99 more like this in the last 1 s: Node 1 connection failed -- "
                                               "refreshing metadata")
