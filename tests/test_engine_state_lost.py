"""engine-state.sqlite deleted (or a new data dir beside an old findings
store) while the findings store holds clusters: the cluster stage counts every
cluster from zero, and the stream's counts and alert levels part from the
desk's. It used to pass with one info line ("cluster index rebuilt",
clusters 0); now replay says so on the command line and the workers log a
WARNING, both naming the fix (``streams.engine_state.lost_state``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.demo_feed import build_feed
from streams.engine_state import engine_state_path, lost_state, open_engine_state
from streams.settings import Settings

WARNING = "holds no cluster state"


def test_a_fresh_data_dir_says_nothing_and_creates_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert lost_state(Settings(data_dir=data), fresh_table=True) is None
    assert sorted(p.name for p in data.iterdir()) == []  # neither store was created by the check


def test_an_engine_state_with_clusters_says_nothing_whatever_the_findings_store(tmp_path, monkeypatch):
    import streams.engine_state as es

    states = open_engine_state(tmp_path)
    states.archive({"c1": b"{}"})  # the cold tier counts: its clusters are known
    states.close()
    monkeypatch.setattr(es, "_stored_sightings", lambda settings: 500)
    assert lost_state(Settings(data_dir=tmp_path)) is None


def test_an_empty_engine_state_beside_stored_sightings_names_the_fix(tmp_path, monkeypatch):
    import streams.engine_state as es

    open_engine_state(tmp_path).close()  # created, never written (a worker started, then lost it)
    monkeypatch.setattr(es, "_stored_sightings", lambda settings: 42)
    msg = lost_state(Settings(data_dir=tmp_path), fresh_table=True)
    assert msg.startswith(f"{tmp_path / 'engine-state.sqlite'} holds no cluster state, but findings.sqlite "
                          "already holds 42 sightings")
    assert "restore engine-state.sqlite from a backup" in msg and "No command rebuilds" in msg
    assert "changelog" not in msg  # a fresh embedded broker: nothing else holds the clusters
    assert "changelog survived" in lost_state(Settings(data_dir=tmp_path))


def _replay(feed: Path, data: Path) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir", str(data),
                        "--workers", "1", "--no-wait-models", "--json", "--timeout", "200"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=280)
    assert r.returncode == 0, f"replay failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout), r.stderr


def _warnings_logged(data: Path) -> list[dict]:
    out = []
    for log in (data / "logs").glob("*.log"):
        for line in log.read_text().splitlines():
            if WARNING in line and line.startswith("{"):
                out.append(json.loads(line))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replay_warns_when_the_engine_state_is_gone_and_not_on_a_fresh_start(tmp_path):
    feed, _ = build_feed(tmp_path / "feed", burst=3)
    again = feed.with_name("again.jsonl")  # the same pictures, reposted: new event ids
    again.write_text(feed.read_text().replace('"event_id": "', '"event_id": "again-'))
    data = tmp_path / "data"

    first, stderr = _replay(feed, data)
    assert first["sightings"] > 0 and first["clusters"] > 0
    assert WARNING not in stderr and "warning" not in stderr.lower()
    assert _warnings_logged(data) == []

    for p in data.glob("engine-state.sqlite*"):
        p.unlink()
    _, stderr = _replay(again, data)
    line = next(ln for ln in stderr.splitlines() if WARNING in ln)
    assert line == (f"warning: {data / 'engine-state.sqlite'} holds no cluster state, but findings.sqlite already "
                    f"holds {first['sightings']} sightings: the cluster stage counts their clusters from zero, so "
                    "sighting counts, velocity and alert levels in the stream part from what the desk shows, and "
                    "alerts already raised are raised again. No command rebuilds engine-state.sqlite from the "
                    "findings store. Fix: stop the workers and restore engine-state.sqlite from a backup of the "
                    "data dir, or point --data-dir at the data dir that holds it; to start counting afresh on "
                    "purpose, use a new findings store as well (move findings.sqlite aside, or another --store).")
    [logged] = _warnings_logged(data)  # the one pipeline worker, as it built its cluster stage
    assert (logged["level"], logged["logger"]) == ("warning", "streams.app")
    assert logged["engine_state"] == str(data / "engine-state.sqlite")
    assert f"already holds {first['sightings']} sightings" in logged["msg"]


# -- an engine state a newer deepwatch wrote ----------------------------------------
def _written_by_a_newer_deepwatch(data: Path) -> Path:
    import sqlite3

    from streams.clustering import SCHEMA_VERSION

    open_engine_state(data).close()
    path = engine_state_path(data)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    return path


def test_opening_records_the_state_layout_and_refuses_a_newer_one(tmp_path):
    import sqlite3

    from streams.clustering import SCHEMA_VERSION
    from streams.engine_state import NewerEngineState, stored_state_version

    assert stored_state_version(engine_state_path(tmp_path)) == 0  # no file: nothing created
    assert not engine_state_path(tmp_path).exists()
    open_engine_state(tmp_path).close()
    assert stored_state_version(engine_state_path(tmp_path)) == SCHEMA_VERSION
    path = _written_by_a_newer_deepwatch(tmp_path / "newer")
    with pytest.raises(NewerEngineState, match=f"state layout {SCHEMA_VERSION + 1}; this one writes {SCHEMA_VERSION}"):
        open_engine_state(tmp_path / "newer")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # left as it was


@pytest.mark.parametrize("command", [["replay", "{feed}"], ["worker"]])
def test_the_cli_refuses_an_engine_state_a_newer_deepwatch_wrote_before_any_worker_starts(tmp_path, command):
    feed, _ = build_feed(tmp_path / "feed", burst=3)
    data = tmp_path / "data"
    path = _written_by_a_newer_deepwatch(data)
    args = [a.format(feed=feed) for a in command]
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args, "--data-dir", str(data)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().startswith(f"error: {path} holds cluster states written by a newer deepwatch"), r.stderr
    assert not (data / "logs").exists()  # no broker, no worker started


def test_archived_states_come_back_in_eviction_order_and_only_the_newest_are_read(tmp_path):
    # A rebuild keeps the most recently evicted clusters in its cold index:
    # a cluster revived and evicted again is among them, however old it is
    states = open_engine_state(tmp_path)
    try:
        states.put({c: c.encode() for c in ("old", "mid", "new")})
        states.archive({"old": b"old"})
        states.archive({"mid": b"mid"})
        states.put({"old": b"old, revived"})
        states.archive({"new": b"new"})
        states.archive({"old": b"old, evicted again"})
        assert [c for c, _ in states.archived()] == ["mid", "new", "old"]
        assert list(states.archived(newest=2)) == [("new", b"new"), ("old", b"old, evicted again")]
        assert [c for c, _ in states.archived(newest=10)] == ["mid", "new", "old"]
        assert [c for c, _ in states.hot()] == []
    finally:
        states.close()
