"""The hostile corpus through the real pipeline, through the CLI: embedded
Tansu broker, a Faust worker process, `deepwatch replay`.

Every event ends as exactly one sighting or one dead letter with a stage and
reason, the worker survives all of them, the run finishes within its
deadline, and the worker's peak memory (VmHWM, sampled from /proc while it
runs) stays under 1.5 GiB. Then a second feed replayed into the same data
dir is really processed (completion is judged per run, not by offsets an
earlier run left behind).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streams.findings import DeadLetterRecord
from streams.store import open_store
from tests.hostile import corpus
from tests.support import slow_drip_url

pytestmark = pytest.mark.slow

PEAK_LIMIT_KIB = int(1.5 * 1024 * 1024)


class PeakMemory:
    """Highest VmHWM of any `streams.worker` process below ``root_pid``."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.peak_kib = 0
        self.workers: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _descendants(self) -> set[int]:
        parents: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                    parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        found, frontier = set(), {self.root_pid}
        while frontier:
            kids = {p for p, pp in parents.items() if pp in frontier} - found
            found |= kids
            frontier = kids
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._descendants():
                try:
                    if b"streams.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.workers.add(pid)
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                except OSError:
                    continue
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def replay(feed: Path, data: Path, env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, PeakMemory, float]:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir", str(data), "--json",
         "--timeout", "240"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )
    with PeakMemory(proc.pid) as peak:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), peak, time.monotonic() - started


@pytest.fixture(scope="module")
def drip():
    with slow_drip_url() as url:
        yield url


ENV = {
    # The slow-drip server is on loopback; SSRF refusals are covered in test_hardening.
    "DEEPWATCH_FETCH__ALLOW_PRIVATE_NETWORKS": "true",
    "DEEPWATCH_FETCH__TOTAL_TIMEOUT_S": "3",
    "DEEPWATCH_FETCH__RETRIES": "0",
}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, drip):
    root = tmp_path_factory.mktemp("hostile")
    (root / "feed").mkdir()
    feed = corpus.materialize(root / "feed", drip)
    data = root / "data"
    r, peak, seconds = replay(feed, data, ENV)
    assert r.returncode == 0, f"replay failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return feed, data, json.loads(r.stdout), peak, seconds


def test_every_hostile_event_ends_as_exactly_one_outcome(hostile_run):
    feed, data, summary, _, _ = hostile_run
    exp = corpus.expected()
    lines = sum(1 for line in feed.read_bytes().split(b"\n") if line.strip())
    n = lines - exp["refused_at_ingest"]  # what reached the events topic
    assert summary["complete"] and summary["events"] == lines and summary["refused_at_ingest"] == exp["refused_at_ingest"]
    assert summary["produced"] == summary["processed"] == n
    db = sqlite3.connect(Path(data) / "findings.sqlite")
    outcomes = db.execute('SELECT partition, "offset", COUNT(*) FROM processed GROUP BY 1, 2').fetchall()
    assert len(outcomes) == n and all(c == 1 for *_, c in outcomes)  # one outcome per event, none missing
    store = open_store(data)
    sightings = set(store.sighting_times())
    dls = store.dead_letters()
    store.close()
    by_id: dict[str, list[DeadLetterRecord]] = {}
    for d in dls:
        assert d.stage and d.reason and d.detail
        by_id.setdefault(d.event_id, []).append(d)
    for key, outcome in exp["events"].items():
        eid = key.split("#")[0]
        if outcome == "sighting":
            assert eid in sightings, key
        else:
            _, stage, reason = outcome.split(":")
            assert any((d.stage, d.reason) == (stage, reason) for d in by_id.get(eid, [])), (key, by_id.get(eid))
    anonymous = sorted(f"dead:{d.stage}:{d.reason}" for d in by_id.get(None, []))
    assert anonymous == sorted(exp["anonymous"])
    assert len(sightings) == sum(1 for o in exp["events"].values() if o == "sighting")
    assert len(dls) == lines - len(sightings)  # the ingest refusal is a dead letter too
    assert all(len(json.dumps(d.as_json())) < 8000 for d in dls)  # and every dead letter is small


def test_the_worker_survived_and_the_run_kept_its_deadline(hostile_run):
    _, data, summary, peak, seconds = hostile_run
    assert peak.workers, "no worker process was observed"
    assert seconds < 240
    logs = "".join(p.read_text(errors="replace") for p in (Path(data) / "logs").glob("worker-*.log"))
    assert "Traceback" not in logs.replace("analyze failed", "")  # nothing crashed an agent
    assert "crashed" not in logs.lower()


def test_peak_worker_memory_is_under_one_and_a_half_gib(hostile_run):
    *_, peak, _ = hostile_run
    print(f"peak worker RSS on the hostile corpus: {peak.peak_kib / 1024:.0f} MiB")
    assert 0 < peak.peak_kib < PEAK_LIMIT_KIB


def test_padded_png_was_analysed_and_says_so(hostile_run):
    _, data, _, _, _ = hostile_run
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "clusters", "--data-dir", str(data), "--json"],
                       capture_output=True, text=True, timeout=60)
    clusters = json.loads(r.stdout)
    ztxt = next(c for c in clusters if any(m["event_id"] == "ok-ztxt" for m in c["members"]))
    assert any(e["detector"] == "decode" and "zTXt" in e["detail"] for e in ztxt["evidence"])


def test_a_second_replay_into_the_same_data_dir_is_really_processed(hostile_run, tmp_path):
    _, data, _, _, _ = hostile_run
    feed_dir = tmp_path / "second"
    (feed_dir / "files").mkdir(parents=True)
    lines = []
    for i in (11, 12, 13):
        (feed_dir / "files" / f"p{i}.png").write_bytes(corpus.picture_png(500 + i))
        lines.append(json.dumps(corpus._event(f"second-{i}", {"path": f"files/p{i}.png"})))
    feed = feed_dir / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    r, _, _ = replay(feed, data, ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["processed"] == 3
    store = open_store(data)
    try:
        assert {f"second-{i}" for i in (11, 12, 13)} <= set(store.sighting_times())
    finally:
        store.close()


def test_every_line_of_a_worker_log_is_json_for_a_log_shipper(hostile_run):
    # Faust's start-up spinner wrote "\x1b[?25h" before one line of each log
    _, data, *_ = hostile_run
    for path in (Path(data) / "logs").glob("worker-*.log"):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                assert isinstance(json.loads(line), dict), f"{path.name}:{n}: {line[:120]}"
