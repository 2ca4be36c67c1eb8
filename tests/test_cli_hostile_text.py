"""What posters and images wrote reaches analysts' terminals as text: the
read commands' tables never read it as Rich markup (``[/x]`` in one event id
crashed ``deepwatch dead-letters`` for everyone) nor pass its control
characters through (ESC sequences clear the screen or plant links); the
cluster table keeps every column at 80 columns; and a cut result says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from detectors.base import Evidence
from streams.findings import ClusterRecord
from streams.records import DeadLetter, SourceRef
from tests.findings_fixture import TOPIC, fill, snapshots

HOSTILE = "[/x] [bold]boo \x1b[2J\x1b]8;;http://evil.example\x07click\x1b]8;;\x07 \u202eevil"


def _cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": str(columns)})


@pytest.fixture
def hostile_store(tmp_path):
    from streams.store import open_store

    s = open_store(tmp_path)
    fill(s)
    fire = [x for x in snapshots() if x.cluster_id == "c-fire"][-1]
    s.apply_snapshot(fire.model_copy(update={
        "revision": fire.revision + 100, "alert_level": 2,
        "evidence": [Evidence(detector="metadata", score=0.91, weight=2.0, detail=HOSTILE + " " + "x" * 400)]}))
    s.add_dead_letters([DeadLetter(event_id="[/x]", stage="validate", reason="schema_violation", detail=HOSTILE,
                                   source=SourceRef(topic=TOPIC, partition=0, offset=999))])
    s.close()
    return str(tmp_path)


@pytest.mark.parametrize("command", [("dead-letters",), ("clusters",), ("search",), ("search", "[/x]"),
                                     ("search", "harbour")])
def test_hostile_text_is_shown_as_text_never_as_markup_or_terminal_codes(hostile_store, command):
    r = _cli(*command, "--data-dir", hostile_store, "--format", "table", columns=200)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout  # not piped through to the terminal
    if command[0] == "dead-letters":
        assert "[/x]" in r.stdout and "[bold]boo" in r.stdout and "\\x1b[2J" in r.stdout  # shown, escaped
    if command == ("search", "harbour"):
        assert "[/x] [bold]boo" in r.stdout and "\\u202e" in r.stdout


def test_the_cluster_table_keeps_the_alert_column_at_80_columns(hostile_store):
    r = _cli("clusters", "--data-dir", hostile_store, columns=80)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "cluster" in line and "verdict" in line)
    assert all(col in header for col in ("alert", "evidence", "seen", "5m", "imgs"))  # none cropped off the edge
    # real cluster ids are 16 hex characters: the evidence column keeps a readable width beside them
    # (it was squeezed to one letter a line by the fixed columns)
    from rich.console import Console

    from streams.cli.query import cluster_table

    row = ClusterRecord.model_validate({
        "id": "edfc825e5d1eef8f", "fake_score": 1.0, "verdict": "inconclusive", "alert_level": 3,
        "evidence": [{"detector": "metadata", "score": 1.0,
                      "detail": "AUTOMATIC1111-style metadata in a PNG tEXt chunk"}],
        "sightings": 12345, "accounts": 999, "velocity": {"sightings_5m": 120},
        "members": [{"sha256": f"{i:064x}", "phash": "0" * 16, "pdq": "0" * 64, "pdq_quality": 100, "event_id": f"e{i}"}
                    for i in range(12)],
        "platforms": ["x"], "first_seen": "2026-11-20T10:00:00+00:00", "last_seen": "2026-11-20T10:04:00+00:00",
        "engagement": {}, "merged_from": [], "merged_into": None, "models_pending": False, "suppressed": None,
        "stream_sightings": 12345, "revision": 1, "updated_at": None})
    console = Console(width=80, record=True)
    console.print(cluster_table([row]))
    text = console.export_text()
    assert "edfc825e5d1eef8f" in text and "L3" in text and "AUTOMATIC" in text
    assert "-style" in text and "chunk" in text  # folded onto the next lines, not cropped at the edge
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "L2" in r.stdout
    assert "x" * 200 not in r.stdout.replace("\n", "").replace("│", "").replace(" ", "")  # evidence cut for a table


def test_cut_results_say_so_and_a_date_alone_until_takes_the_whole_day(hostile_store):
    r = _cli("search", "--data-dir", hostile_store, "--limit", "1", "--format", "json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1
    assert "showing the first 1 matches; there are more" in r.stderr
    r = _cli("search", "--data-dir", hostile_store, "--limit", "3", "--format", "json")
    assert len(json.loads(r.stdout)) == 3 and "there are more" not in r.stderr  # exactly all of them
    r = _cli("clusters", "--data-dir", hostile_store, "--limit", "2", "--format", "json")
    assert len(json.loads(r.stdout)) == 2 and "there are more" in r.stderr
    # every sighting of the fixture is on 2026-11-20: --until that date meant its midnight, and found nothing
    day = _cli("search", "--data-dir", hostile_store, "--until", "2026-11-20", "--format", "json")
    both = _cli("search", "--data-dir", hostile_store, "--since", "2026-11-20", "--until", "2026-11-20",
                "--format", "json")
    assert len(json.loads(day.stdout)) == len(json.loads(both.stdout)) == 3
