"""Input mistakes in what the user hands the pipeline: a data dir that is a
file, and event times no clock can hold. Each is refused up front with one
clear line (a CLI mistake: ``error:``, exit 2) or a dead letter naming the
field (an event), never a raw OS error or a crash further down."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from streams.validate import InvalidEvent, parse_event

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
         timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Errno" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# -- --data-dir that is a file -----------------------------------------------------------
@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "afile"
    f.write_bytes(b"")
    return f


@pytest.fixture
def feed(tmp_path) -> Path:
    f = tmp_path / "feed.jsonl"
    f.write_text("")
    return f


def _commands(feed: Path) -> dict[str, list[str]]:
    return {
        "replay": ["replay", str(feed)],
        "demo": ["demo"],
        "broker": ["broker", "--port", "0"],
        "worker": ["worker", "--broker", "kafka://127.0.0.1:1"],
    }


@pytest.mark.parametrize("command", ["replay", "demo", "broker", "worker"])
def test_a_data_dir_that_is_a_file_is_one_line_before_anything_starts(a_file, feed, command):
    # replay started the broker and workers, then ended on "[Errno 20] Not a directory"
    line = _one_error_line(_cli(*_commands(feed)[command], "--data-dir", str(a_file)))
    assert "--data-dir" in line and str(a_file) in line and "is a file, not a directory" in line, line
    assert a_file.is_file() and a_file.stat().st_size == 0


def test_a_data_dir_under_a_file_names_the_file(a_file, feed):
    line = _one_error_line(_cli("replay", str(feed), "--data-dir", str(a_file / "sub" / "dir")))
    assert f"lies under {a_file}, which is a file" in line, line


def test_a_data_dir_from_the_environment_names_the_variable(a_file, feed):
    line = _one_error_line(_cli("replay", str(feed), env={"DEEPWATCH_DATA_DIR": str(a_file)}))
    assert "DEEPWATCH_DATA_DIR" in line and str(a_file) in line and "--data-dir" in line, line


def test_the_default_data_dir_being_a_file_says_so(tmp_path):
    (tmp_path / "deepwatch-data").write_text("")
    line = _one_error_line(_cli("broker", "--port", "0", cwd=tmp_path))
    assert "deepwatch-data (the default) is a file" in line, line


def test_a_data_dir_that_does_not_exist_yet_is_still_fine(tmp_path):
    from streams.cli.common import check_data_dir
    from streams.settings import Settings

    for d in (tmp_path / "new" / "deeper", tmp_path):
        check_data_dir(Settings(data_dir=d), d)  # no exception


@pytest.mark.parametrize("command", [["clusters"], ["alerts"], ["dead-letters"], ["models", "list"]])
def test_read_commands_say_the_data_dir_is_a_file(tmp_path, command):
    # they said there were no findings yet (run replay first), or listed no models
    a_file = tmp_path / "afile"
    a_file.write_text("")
    line = _one_error_line(_cli(*command, "--data-dir", str(a_file)))
    assert "is a file, not a directory" in line, line


# -- posted_at that cannot be converted to UTC ----------------------------------------
def _event(posted_at) -> bytes:
    return json.dumps({"event_id": "e-1", "platform": "x", "account_id": "a-1", "posted_at": posted_at,
                       "image": {"url": "https://example.com/a.jpg"}}).encode()


@pytest.mark.parametrize("posted_at, says", [
    ("0001-01-01T00:00:00+14:00", "outside the years 1-9999 in UTC"),  # 0000-12-31T10:00Z
    ("0001-01-01T10:00:00+11:00", "outside the years 1-9999 in UTC"),
    ("9999-12-31T23:59:59-01:00", "outside the years 1-9999 in UTC"),  # 10000-01-01T00:59:59Z
    ("0001-01-01T00:00:00-23:59", "UTC offset -23:59 is beyond +-14:00"),
    ("2026-05-01T12:00:00-20:00", "UTC offset -20:00 is beyond +-14:00"),
    ("2026-05-01T12:00:00.5+15:00", "UTC offset +15:00 is beyond +-14:00"),
])
def test_a_posted_at_no_utc_clock_holds_is_a_schema_violation_naming_the_field(posted_at, says):
    with pytest.raises(InvalidEvent) as info:
        parse_event(_event(posted_at))
    e = info.value
    assert e.reason == "schema_violation" and e.event_id == "e-1", (e.reason, e.detail)
    assert e.detail.startswith("posted_at: ") and says in e.detail, e.detail


@pytest.mark.parametrize("posted_at", [
    "0001-01-01T00:00:00Z", "0001-01-01T14:00:00+14:00", "9999-12-31T23:59:59Z", "9999-12-31T09:59:59-14:00",
    "2026-05-01T12:00:00+14:00", "2026-05-01T12:00:00-12:00", "2026-05-01T12:00:00-14:00",
    "2026-05-01T12:00:00.123+05:45",
])
def test_every_posted_at_still_accepted_is_ordered_by_the_store(posted_at):
    ev = parse_event(_event(posted_at))
    ev.posted_at.timestamp()
    # the SQLite store orders and windows sightings by julianday(posted_at)
    (jd,) = sqlite3.connect(":memory:").execute("SELECT julianday(?)", (ev.posted_at.isoformat(),)).fetchone()
    assert jd is not None, ev.posted_at.isoformat()
