"""The per-event deadline and the analysis slots (``streams.stage``).

A thread cannot be stopped: an analysis that runs past its event's deadline
(a hostile progressive JPEG grinding through thousands of scans) dead-letters
its event at the deadline, but keeps its analysis slot until the thread
returns, so slow pictures cannot pile up threads beyond
``ingest.analyze_concurrency`` and take the CPU from the events behind them;
and those events are not charged for the time they wait for a slot."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import pytest
from PIL import Image

from streams.analyze import Analyzer
from streams.records import SourceRef
from streams.settings import Settings
from streams.stage import AnalyzeStage, SharedIds
from tests.hostile import corpus

DEADLINE_S = 0.3
SLOW_S = 1.0  # a decode no deadline interrupts


class _Analyzer:
    """The real analyzer, except that ``slow*`` events sleep in it (then fail)
    and every analysis is counted while it runs, on the loop or in a thread."""

    def __init__(self, real: Analyzer):
        self.real = real
        self.now = self.most = 0
        self.finished: dict[str, float] = {}
        self._lock = threading.Lock()

    def knows(self, sha256: str) -> bool:
        return False

    def analyze(self, ev, data, source, sha256=None):
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            if ev.event_id.startswith("slow"):
                time.sleep(SLOW_S)
                raise ValueError("stand-in for a decode that finally fails")
            return self.real.analyze(ev, data, source, sha256)
        finally:
            with self._lock:
                self.now -= 1
                self.finished[ev.event_id] = time.monotonic()


class _Fetcher:
    def __init__(self, data: dict[str, bytes], delays: dict[str, float] | None = None):
        self.data = data
        self.delays = delays or {}

    async def get(self, ev):
        await asyncio.sleep(self.delays.get(ev.event_id, 0.01))
        return self.data[ev.event_id]


class _Store:
    def sighting_identity(self, event_id):
        return None


def _raw(event_id: str) -> bytes:
    return json.dumps({"event_id": event_id, "platform": "x", "account_id": "a", "posted_at": "2026-05-01T12:00:00Z",
                       "image": {"url": f"https://cdn.example/{event_id}.png"}}).encode()


# When each event is ready to be analysed (its fetch done), in seconds.
TOGETHER = {"slow0": 0.01, "slow1": 0.01, "slow2": 0.01, "ok0": 0.05, "ok1": 0.05, "ok2": 0.05}
# slow2 takes a slot when slow0 and slow1 pass their deadline, their threads still running
STAGGERED = {"slow0": 0.01, "slow1": 0.01, "slow2": 0.1, "ok0": 0.2, "ok1": 0.2, "ok2": 0.2}


@pytest.mark.parametrize("arrivals", [TOGETHER, STAGGERED], ids=["together", "staggered"])
def test_a_thread_past_its_deadline_keeps_its_slot_and_the_events_behind_it_keep_their_time(tmp_path, arrivals):
    settings = Settings(data_dir=tmp_path / "data", ingest={"event_deadline_s": DEADLINE_S, "analyze_concurrency": 2})
    shared = SharedIds(analyze_slots=settings.ingest.analyze_concurrency)
    analyzer = _Analyzer(Analyzer(settings, tmp_path / "blobs"))
    ids = [f"slow{i}" for i in range(3)] + [f"ok{i}" for i in range(3)]
    # the slow ones: not an image header, so judged in a thread (never on the loop)
    data = {i: b"slow bytes " + i.encode() if i.startswith("slow") else corpus.picture_png(n) for n, i in enumerate(ids)}
    ended: dict[str, float] = {}
    loop_errors: list[dict] = []

    async def one(n: int, event_id: str):
        stage = AnalyzeStage(settings, _Fetcher(data, arrivals), analyzer, lambda d, s: None, _Store, shared)
        r = await stage.process(_raw(event_id), SourceRef(topic="events", partition=0, offset=n))
        ended[event_id] = time.monotonic()
        return r

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        results = await asyncio.gather(*(one(n, i) for n, i in enumerate(ids)))
        # every slot comes back once the abandoned threads have returned
        async with asyncio.timeout(10):
            for _ in range(settings.ingest.analyze_concurrency):
                await shared.analyzing.acquire()
        return results

    started = time.monotonic()
    results = dict(zip(ids, asyncio.run(go())))
    assert time.monotonic() - started < 9

    # one outcome per event
    assert all((r.op is None) != (r.dead is None) for r in results.values())
    # (a) never more analyses at once than slots, abandoned threads included
    assert analyzer.most == 2
    # the slow events are dead-lettered at their deadline, not when their thread returns
    for i in ("slow0", "slow1", "slow2"):
        r = results[i]
        assert r.dead is not None and (r.dead.stage, r.dead.reason) == ("decode", "deadline"), r.dead
        assert ended[i] < analyzer.finished[i] - SLOW_S / 2
    # (b) the innocent events behind them waited for a slot, and were not charged for it
    for i in ("ok0", "ok1", "ok2"):
        assert results[i].op is not None, results[i].dead
        assert ended[i] - started > SLOW_S  # they did wait: the slots were the slow threads'
    assert not loop_errors  # an abandoned thread's failure is not reported as an unretrieved exception


def test_a_redelivery_waiting_for_its_first_copy_is_not_charged_for_the_wait(tmp_path):
    # Two copies of ok0 (a redelivery): the second waits for the first, which
    # waits for a slot behind two slow analyses. Neither copy is charged for
    # waiting its turn.
    settings = Settings(data_dir=tmp_path / "data", ingest={"event_deadline_s": DEADLINE_S, "analyze_concurrency": 2})
    shared = SharedIds(analyze_slots=2)
    analyzer = _Analyzer(Analyzer(settings, tmp_path / "blobs"))
    data = {"slow0": b"slow bytes 0", "slow1": b"slow bytes 1", "ok0": corpus.picture_png(1)}
    delays = {"slow0": 0.01, "slow1": 0.01, "ok0": 0.05}
    ids = ["slow0", "slow1", "ok0", "ok0"]

    async def go():
        stages = [AnalyzeStage(settings, _Fetcher(data, delays), analyzer, lambda d, s: None, _Store, shared)
                  for _ in ids]
        return await asyncio.gather(*(st.process(_raw(i), SourceRef(topic="events", partition=0, offset=n))
                                      for n, (st, i) in enumerate(zip(stages, ids))))

    slow0, slow1, first, again = asyncio.run(go())
    assert slow0.dead.reason == slow1.dead.reason == "deadline"
    assert first.op is not None and again.op is not None, (first.dead, again.dead)
    assert analyzer.most == 2


def test_the_deadline_still_covers_an_event_holding_a_slot(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", ingest={"event_deadline_s": DEADLINE_S})
    analyzer = _Analyzer(Analyzer(settings, tmp_path / "blobs"))
    stage = AnalyzeStage(settings, _Fetcher({"slow0": b"slow bytes"}), analyzer, lambda d, s: None, _Store)
    t = time.monotonic()
    r = asyncio.run(stage.process(_raw("slow0"), SourceRef(topic="events", partition=0, offset=0)))
    assert (r.dead.stage, r.dead.reason) == ("decode", "deadline")
    assert "ingest.event_deadline_s" in r.dead.detail and time.monotonic() - t < SLOW_S + 1


def _jpeg(progressive: bool) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buf, "JPEG", progressive=progressive, quality=80)
    return buf.getvalue()


def test_a_multi_scan_jpeg_is_never_analysed_on_the_loop(tmp_path):
    # Its scans cost libjpeg time the pixel count does not bound, and no
    # deadline interrupts the event loop: always a thread, however small.
    settings = Settings(data_dir=tmp_path / "data", batch={"analyze_inline_max_pixels": 4_000_000})
    stage = AnalyzeStage(settings, None, None, lambda d, s: None, _Store)
    assert stage._small(_jpeg(progressive=False))
    assert not stage._small(_jpeg(progressive=True))
    assert stage._small(corpus.picture_png(1))
