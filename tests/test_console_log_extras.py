"""With ``log_format = "console"`` a line keeps its record's ``extra``
fields, as the JSON log keeps them as keys: "dead letter" says its stage and
reason, "rejected an alert for good" its receiver's error. Values from a
feed cannot break the line or reach the terminal as control sequences."""

from __future__ import annotations

import io
import json
import logging

import pytest

from streams import logs


@pytest.fixture
def lines():
    """``logs.setup`` in ``fmt`` on a buffer; returns the written lines."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()

    def setup(fmt: str = "console") -> io.StringIO:
        logs.setup("INFO", fmt, stream=buf)
        return buf

    try:
        yield setup
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _dead_letter(detail: str) -> None:
    # as streams.app's send_dead logs it
    logging.getLogger("streams.app").warning(
        "dead letter", extra={"stage": "validate", "reason": "malformed_json", "event_id": None, "detail": detail})


def test_a_dead_letter_line_says_why(lines):
    buf = lines()
    _dead_letter("not valid JSON: Expecting value")
    [line] = buf.getvalue().splitlines()
    assert line.endswith(" WARNING streams.app: dead letter stage=validate reason=malformed_json event_id=None "
                         'detail="not valid JSON: Expecting value"'), line


def test_a_value_from_a_feed_stays_on_its_line_and_escaped(lines):
    buf = lines()
    _dead_letter('bad\x1b[2J "id"\nINFO forged line\r')
    [line] = buf.getvalue().splitlines()
    assert line.endswith(r' detail="bad\x1b[2J \"id\" INFO forged line\r"'), line
    assert "\x1b" not in line


def test_fields_of_other_kinds(lines):
    buf = lines()
    logging.getLogger("deepwatch.webhooks").error(
        "webhook receiver rejected an alert for good; going on with the next",
        extra={"alert_id": "a1", "tries": 3, "targets": ["hook:main", "hook:b"], "error": ValueError("HTTP 410"),
               "empty": ""})
    [line] = buf.getvalue().splitlines()
    assert line.endswith('next alert_id=a1 tries=3 targets=["hook:main","hook:b"] error="HTTP 410" empty=""'), line


def test_a_traceback_comes_after_the_fields(lines):
    buf = lines()
    try:
        raise RuntimeError("sink broke")
    except RuntimeError:
        logging.getLogger("streams.stage").exception("dead letter not sent", extra={"offset": 7})
    first, *rest = buf.getvalue().splitlines()
    assert first.endswith("dead letter not sent offset=7") and rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: sink broke"


def test_a_line_without_fields_is_as_it_was(lines):
    buf = lines()
    logging.getLogger("streams.worker").info("worker %s", "starting")
    [line] = buf.getvalue().splitlines()
    assert line.endswith(" INFO streams.worker: worker starting"), line


def test_the_json_log_is_unchanged(lines):
    buf = lines("json")
    _dead_letter("not valid JSON")
    [doc] = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert doc["msg"] == "dead letter" and doc["reason"] == "malformed_json" and doc["detail"] == "not valid JSON"
    assert doc["event_id"] is None


def test_a_line_the_cli_writes_through_the_console_log_keeps_its_fields(lines, capsys):
    import sys

    # ``lines`` only puts the root's handlers back

    logs.setup("INFO", "console", stream=sys.stderr)  # the service's log on stderr, as a worker has it
    logs.write(logging.WARNING, "hook refused", target="hook:main", reason="non-public address")
    err = capsys.readouterr().err.splitlines()
    assert err and err[-1].endswith('hook refused target=hook:main reason="non-public address"'), err


def _field(lines, value) -> str:
    buf = lines()
    logging.getLogger("streams.app").warning("seen", extra={"v": value})
    [line] = buf.getvalue().splitlines()
    return line.split(" seen v=", 1)[1]


@pytest.mark.parametrize("value, shown", [
    ('a"b', r'"a\"b"'),  # a quote alone: bare it would read as the start of a quoted value
    ('"x"', r'"\"x\""'),
    ("k=v", '"k=v"'),  # bare, a reader would take it as a second field
    ("", '""'),
    ("plain", "plain"),
    (r"C:\temp", r"C:\temp"),  # bare: read as it stands
    ("C:\\temp dir", r'"C:\\temp dir"'),  # quoted: a backslash is escaped
    ("\\x1b", r"\x1b"),  # the text, bare
    ("\x1b", r'"\x1b"'),  # the control character, escaped: quoted, so it is told from the text
    ("a\\\x1b", r'"a\\\x1b"'),
    (["a b", 'c"'], r'"[\"a b\",\"c\\\"\"]"'),  # JSON with a space: quoted, its escapes escaped
    ({"k": "v=1"}, '{"k":"v=1"}'),  # compact JSON without a space stays bare
])
def test_values_are_quoted_and_escaped_so_a_reader_can_take_them_back(lines, value, shown):
    assert _field(lines, value) == shown
