"""What the throughput work changed in `deepwatch replay` and its workers:
the detect role's request coalescing, the summary's timings, the
--no-wait-models exit, and a worker's prompt exit keeping its exit status.
The speed itself is measured by bench/replay.py, never here."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.demo_feed import build_feed
from streams.detect_worker import answer, coalesce
from streams.records import DetectRequest
from streams.runner import WorkerProcess, process_age
from tests.support import load_sitecustomize


def req(cluster: str, sha: str) -> bytes:
    return DetectRequest(cluster_id=cluster, sha256=sha).dumps()


def test_coalesce_answers_the_last_request_per_cluster_in_order():
    a1, b1, a2, c1 = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    out = coalesce([req("A", a1), req("B", b1), req("A", a2), b"{not json", req("C", c1)])
    # A's first request is superseded by its better copy; the unreadable one is dropped, not fatal
    assert [(r.cluster_id, r.sha256) for r in out] == [("B", b1), ("A", a2), ("C", c1)]
    assert coalesce([]) == []


def test_answers_leave_as_their_pictures_are_done_each_picture_analysed_once():
    a1, a2, b1 = "a" * 64, "c" * 64, "b" * 64
    # A's first copy, B, then A's better copy and a second cluster showing B's picture
    raws = [req("A", a1), req("B", b1), req("A", a2), req("D", b1)]
    analysed, sent = [], []

    async def go():
        b_sent = asyncio.Event()

        async def analyse(sha):
            analysed.append(sha)
            if sha == a2:
                await b_sent.wait()  # A's picture can only finish once B's answer has left
            return [sha[:1]], None

        async def send(r, evidence, error):
            sent.append((r.cluster_id, r.sha256, evidence))
            b_sent.set()

        return await asyncio.wait_for(answer(raws, analyse, send), 5)

    assert asyncio.run(go()) == 3
    assert sorted(analysed) == sorted([b1, a2])  # A's first copy never, B's picture once for two clusters
    assert sent == [("B", b1, ["b"]), ("A", a2, ["c"]), ("D", b1, ["b"])]  # in request order


def test_worker_log_times_read_the_json_log(tmp_path):
    log = tmp_path / "w.log"
    log.write_text(
        '{"ts": "2026-01-01T00:00:01.000+00:00", "msg": "worker starting"}\n'
        "noise that is not json\n"
        '\x1b[?25h{"ts": "2026-01-01T00:00:03.500+00:00", "msg": "[^---Recovery]: Worker ready"}\n'
        '{"ts": "2026-01-01T00:00:04.000+00:00", "msg": "models loaded"}\n'
    )
    from datetime import datetime, timezone

    w = WorkerProcess("detect", proc=None, log_path=log)  # type: ignore[arg-type]
    w.spawned_at = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    assert w.log_times() == {"imports": 1.0, "join": 2.5, "models": 4.0}
    assert 0 <= process_age() < 3600


@pytest.mark.parametrize("code,expect", [(0, 0), (3, 3), (None, 0), ("error: bad broker", 1)])
def test_worker_exit_keeps_its_status(code, expect):
    r = subprocess.run([sys.executable, "-c", f"from streams.worker import _exit_now; _exit_now({code!r})"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == expect
    if isinstance(code, str):
        assert code in r.stderr


@pytest.mark.slow
def test_replay_no_wait_models_reports_timings_and_accounts_every_event(tmp_path):
    feed, exp = build_feed(tmp_path / "feed", burst=4)
    data = tmp_path / "data"
    r = subprocess.run(
        [sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir", str(data), "--json",
         "--no-wait-models", "--workers", "2", "--timeout", "240"],
        capture_output=True, text=True, timeout=400,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads(r.stdout)
    lines = [ln for ln in Path(feed).read_text().splitlines() if ln.strip()]
    assert s["complete"] and s["events"] == len(lines)
    # every event is exactly one sighting or one dead letter (the feed repeats one event: counted once)
    assert s["processed"] == s["produced"]
    assert sum(s["dead_letters"].values()) == len(exp.dead_letter_reasons)
    assert s["sightings"] == exp.events - len(exp.dead_letter_reasons) - 1
    assert s["ingest_seconds"] <= s["seconds"]
    assert s["models_pending"] >= 0
    for phase in ("imports", "broker_start", "topics", "workers_ready", "produce", "pipeline_imports",
                  "pipeline_join", "shutdown"):
        assert phase in s["timings"], phase
    stages = s["stage_seconds"]["pipeline"]
    for stage in ("fetch", "hashes", "analyze", "cluster", "send", "serialize"):
        assert stages[stage] > 0, stage
    assert stages["events:analyze:ok"] > 0
    # how long messages waited for each stage, scraped from both workers: every
    # analysed event and every op was observed, none waited longer than the run
    assert stages["lag_count:analyze"] >= stages["events:analyze:ok"]
    assert stages["lag_count:cluster"] >= stages["events:cluster:ok"]
    for stage in ("analyze", "cluster"):
        assert 0 < stages[f"lag_sum:{stage}"] / stages[f"lag_count:{stage}"] < s["seconds"] + s["timings"]["workers_ready"]
    assert s["workers"] == 2
    assert s["timings"]["shutdown"] < 15  # workers leave without the interpreter's teardown


def test_renice_reaches_every_thread_of_the_role(tmp_path):
    """Niceness is per thread on Linux and inherited: renicing only the pid
    would leave the model threads a detect worker started at nice 10."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("per-thread niceness is read from /proc (Linux only)")
    from streams.runner import Cluster
    from streams.settings import Settings

    script = "import os, threading, time\nos.nice(10)\nthreading.Thread(target=time.sleep, args=(30,)).start()\nprint('up', flush=True)\ntime.sleep(30)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import os, time; os.nice(10); print('up', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up" and other.stdout.readline().strip() == "up"
        cluster = Cluster(Settings(data_dir=tmp_path), "", "", tmp_path)
        cluster.workers += [WorkerProcess("detect", proc, tmp_path / "d.log"), WorkerProcess("pipeline", other, tmp_path / "p.log")]
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(tids) == 2
        changed = cluster.renice("detect", 0)
        privileged = os.geteuid() == 0
        niced = min(19, os.nice(0) + 10)  # os.nice adds to the niceness inherited from this test run
        assert changed == (2 if privileged else 0)  # without CAP_SYS_NICE: nothing changes, nothing raises
        assert [os.getpriority(os.PRIO_PROCESS, t) for t in tids] == [0 if privileged else niced] * 2
        assert os.getpriority(os.PRIO_PROCESS, other.pid) == niced  # other roles untouched
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


def test_a_local_detect_worker_loads_its_models_first_and_lowers_itself_after(tmp_path):
    """Niced from the start, the detect role's model load (a fraction of a
    second of CPU) took 6-8 s next to a pipeline already at work; now it
    loads at normal priority and every thread drops to DETECT_NICE after."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("per-thread niceness is read from /proc (Linux only)")
    import time
    from contextlib import ExitStack

    from streams import runner
    from streams.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", detect={"models": []})
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        w = cluster.start_worker("detect")
        deadline = time.monotonic() + 60
        while "models loaded" not in w.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and w.proc.poll() is None, w.log_path.read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(0.2)
        tids = [int(t) for t in os.listdir(f"/proc/{w.proc.pid}/task")]
        assert len(tids) > 1
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in tids} == {runner.DETECT_NICE}


_SLOW_IMPORTS = """
import os, sys, time
# only the interpreter that runs the zygote: the worker zygote of this test is slow to import
if os.environ.get("DW_TEST_SLOW_ZYGOTE") and "streams.zygote" in " ".join(sys.orig_argv):
    time.sleep(float(os.environ["DW_TEST_SLOW_ZYGOTE"]))
"""


def _count_spawns(monkeypatch) -> tuple[list[int], list[tuple[str, int]]]:
    """Replay's producer and worker starts watched: ([events handed to the
    broker so far], [(role, events produced when it was started)])."""
    from streams import ingest, runner

    produced = [0]
    at_spawn: list[tuple[str, int]] = []
    real_produce, real_start = ingest.produce_feed, runner.Cluster.start_worker

    def produce_feed(*args, progress=None, **kwargs):
        def counted(n: int) -> None:
            produced[0] += n
            if progress is not None:
                progress(n)
        return real_produce(*args, progress=counted, **kwargs)

    def start_worker(self, role="pipeline", *args, **kwargs):
        at_spawn.append((role, produced[0]))
        return real_start(self, role, *args, **kwargs)

    monkeypatch.setattr(ingest, "produce_feed", produce_feed)
    monkeypatch.setattr(runner.Cluster, "start_worker", start_worker)
    return produced, at_spawn


@pytest.mark.slow
def test_replay_produces_the_feed_while_the_zygote_still_imports(tmp_path, monkeypatch):
    """The zygote's imports outlast replay's own and the broker's start (the
    first spawn waited ~0.6 s for it on the filer's feed): the feed is
    produced meanwhile, and the workers are forked once it is ready, instead
    of producing after the spawn, beside the workers' own start-up. Every
    event is still processed exactly once."""
    from streams.cli.pipeline import _replay
    from streams.settings import Settings

    load_sitecustomize(tmp_path, monkeypatch, _SLOW_IMPORTS)
    monkeypatch.setenv("DW_TEST_SLOW_ZYGOTE", "3")
    feed, exp = build_feed(tmp_path / "feed", burst=4)

    produced, at_spawn = _count_spawns(monkeypatch)
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [feed.parent.resolve()]
    lines = [ln for ln in feed.read_text().splitlines() if ln.strip()]
    summary = _replay(settings, feed, workers=2, timeout_s=240, live_table=False, wait_models=False)

    # the whole feed went in while the zygote imported; then every worker was forked
    assert at_spawn == [("detect", len(lines)), ("pipeline", len(lines)), ("pipeline", len(lines))]
    assert summary.complete and summary.processed == summary.produced == len(lines)
    assert sum(summary.dead_letters.values()) == len(exp.dead_letter_reasons)
    assert summary.sightings == exp.events - len(exp.dead_letter_reasons) - 1  # the feed repeats one event


@pytest.mark.slow
def test_replay_forks_the_workers_mid_feed_once_the_zygote_is_ready(tmp_path, monkeypatch):
    """The zygote ready while the feed is still going in: the workers are
    forked from the producer's progress (between two events), not after the
    whole feed, and every event is still processed exactly once. The
    zygote's readiness is stood in for (ready from the half of the feed on)
    so that the test does not race its imports."""
    from streams import runner
    from streams.cli.pipeline import _replay
    from streams.settings import Settings

    feed, exp = build_feed(tmp_path / "feed", burst=4)
    lines = [ln for ln in feed.read_text().splitlines() if ln.strip()]
    half = len(lines) // 2
    produced, at_spawn = _count_spawns(monkeypatch)
    monkeypatch.setattr(runner.Cluster, "can_spawn_now", lambda self: produced[0] >= half)
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [feed.parent.resolve()]
    summary = _replay(settings, feed, workers=2, timeout_s=240, live_table=False, wait_models=False)

    assert 0 < half < len(lines)
    assert at_spawn == [("detect", half), ("pipeline", half), ("pipeline", half)]
    assert summary.complete and summary.processed == summary.produced == len(lines)
    assert sum(summary.dead_letters.values()) == len(exp.dead_letter_reasons)
    assert summary.sightings == exp.events - len(exp.dead_letter_reasons) - 1
