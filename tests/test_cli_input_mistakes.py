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


@pytest.mark.parametrize("how", ["--config", "DEEPWATCH_CONFIG"])
@pytest.mark.parametrize("in_file", [False, True])
def test_the_data_dir_says_whether_the_settings_file_gave_it(tmp_path, how, in_file):
    # a settings file without data_dir read "(data_dir in the settings file)" for the default
    (tmp_path / "deepwatch-data").write_text("")
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text('log_level = "INFO"\n' + ('data_dir = "deepwatch-data"\n' if in_file else ""))
    args, env = (["--config", str(cfg)], None) if how == "--config" else ([], {"DEEPWATCH_CONFIG": str(cfg)})
    line = _one_error_line(_cli("clusters", *args, env=env, cwd=tmp_path))
    said = "(data_dir in the settings file)" if in_file else "(the default)"
    assert f"deepwatch-data {said} is a file" in line, line


def test_setting_source_asks_the_settings_sources(tmp_path, monkeypatch):
    from streams.settings import setting_source

    for k in [k for k in os.environ if k.upper().startswith("DEEPWATCH_")]:
        monkeypatch.delenv(k)
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text('log_level = "INFO"\n')
    assert setting_source("data_dir") is None
    monkeypatch.setenv("DEEPWATCH_CONFIG", str(cfg))
    assert setting_source("data_dir") is None and setting_source("log_level") == "toml"
    cfg.write_text('data_dir = "elsewhere"\n')
    assert setting_source("data_dir") == "toml"
    monkeypatch.setenv("DEEPWATCH_DATA_DIR", str(tmp_path))
    assert setting_source("data_dir") == "env"  # the environment before the file, as Settings reads them


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


# -- option bounds and arguments that ran into tracebacks or silence (CLI audit) -----
@pytest.mark.parametrize("args, says", [
    (["demo", "--burst", "1"], "'--burst'"),  # IndexError in demo_feed
    (["demo", "--burst", "99999999999999999999999"], "'--burst'"),  # built forever
    (["clusters", "--limit", "99999999999999999999999"], "'--limit'"),  # OverflowError
    (["alerts", "--limit", "99999999999999999999999"], "'--limit'"),
    (["eval", "FEED", "--leave-generator-out", "--crops", "0"], "'--crops'"),  # pydantic ValidationError
    (["train", "--recipe", "pixel-probe", "--data", "FEED", "--probe-c", "-1"], "'--probe-c'"),  # sklearn, 34 s later
    (["train", "--recipe", "pixel-probe", "--data", "FEED", "--crops", "0"], "'--crops'"),  # one combined message
    (["train", "--recipe", "pixel-probe", "--data", "FEED", "--hidden", "-1"], "'--hidden'"),
    (["train", "--recipe", "pixel-probe", "--data", "FEED", "--alpha", "-1"], "'--alpha'"),
    (["train", "--recipe", "pixel-probe", "--data", "FEED", "--augment", "-1"], "'--augment'"),
    (["train", "--input-size", "0"], "'--input-size'"),
    (["search", '"'], "has no word to search for"),  # matched every cluster
    (["search", "--since", "2026-01-01", "--until", "2020-01-01"], "--since 2026-01-01 is after --until"),
    (["redeliver", "--alert", "x"], "--alert needs TARGET"),  # --alert was ignored
    (["bank", "add", "", "FEED", "--verdict", "fake"], "the bank name is empty"),
    (["bank", "add", "x" * 65, "FEED", "--verdict", "fake"], "longer than 64 characters"),
])
def test_a_bad_option_value_is_one_line_naming_it(tmp_path, feed, args, says):
    feed.write_text("{}\n")
    r = _cli(*[str(feed) if a == "FEED" else a for a in args], *([] if args[0] in ("eval", "train") else
                                                                  ["--data-dir", str(tmp_path / "d")]))
    line = _one_error_line(r)
    assert says in line, line


@pytest.mark.parametrize("command", ["replay", "ingest"])
def test_an_empty_feed_is_refused_before_anything_starts(tmp_path, feed, command):
    feed.write_text("\n\n")  # was 0 events and exit 0, after starting a broker and workers (replay)
    extra = ["--data-dir", str(tmp_path / "d")] if command == "replay" else ["--broker", "kafka://127.0.0.1:1"]
    line = _one_error_line(_cli(command, str(feed), *extra))
    assert "FEED" in line and f"{feed} is empty" in line, line
    assert not (tmp_path / "d").exists()


def test_train_manifest_names_the_option_and_takes_a_folder(tmp_path):
    line = _one_error_line(_cli("train", "--manifest", str(tmp_path / "none.csv")))
    assert line.startswith(f"error: --manifest {tmp_path / 'none.csv'}: no such file"), line
    line = _one_error_line(_cli("train", "--manifest", str(tmp_path)))  # was [Errno 21]
    assert "no manifest.csv in this folder" in line, line


def test_an_unwritable_cache_dir_names_the_option(tmp_path):
    (tmp_path / "manifest.csv").write_text("file,label,generator\n")
    line = _one_error_line(_cli("train", "--recipe", "pixel-probe", "--data", str(tmp_path), "--cache-dir", "/proc/x"))
    assert line == "error: --cache-dir /proc/x: cannot create it (No such file or directory); pick a writable directory"


def test_a_missing_sqlite_store_fails_similar_as_it_fails_clusters(tmp_path):
    from PIL import Image

    from streams.settings import Settings

    data = tmp_path / "d"
    data.mkdir()
    Settings(data_dir=data).bank_store().close()  # banks, no findings: the lookup went on with banks alone, exit 0
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    line = _one_error_line(_cli("similar", str(tmp_path / "a.png"), "--data-dir", str(data),
                                "--store", f"sqlite://{tmp_path / 'nonexist.sqlite'}"))
    assert f"no findings at {tmp_path / 'nonexist.sqlite'}" in line and "--store" in line, line


def test_detect_keeps_pillow_warnings_off_stderr(tmp_path):
    bad = tmp_path / "t.tif"
    bad.write_bytes(b"II*\0" + os.urandom(200))
    r = _cli("detect", str(bad), "--no-models", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 1 and json.loads(r.stdout)[0]["error"], r.stdout
    assert r.stderr == "", r.stderr  # was Pillow's "UserWarning: Corrupt EXIF data" beside the JSON error
