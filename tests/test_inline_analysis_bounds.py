"""What the analyze stage does on the event loop stays bounded (``streams.stage``).

The findings store is shared with worker threads through one lock
(``Serialized``), which a thread holds through its call: a duplicate's
accounting (``mark_processed``) waits out SQLite's 30 s busy timeout in there
while the sinks write, and the store opens (schema, WAL mode) under it too. A
small picture's lookup on the loop waited on that lock, and every task of the
worker (heartbeats, /healthz, the other events) with it. Now the loop only
takes the lock if it is free; else the lookup is made in a thread.

And a picture decoded in full (PNG, WebP, GIF; a JPEG whose watermark check
runs) costs some 50 times a plain JPEG per pixel: a flat 2000x2000 PNG of a
few kB held the loop ~250 ms. Such pictures run on the loop only up to
``MAX_INLINE_FULL_DECODE_PIXELS``."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import threading
import time

import pytest
from PIL import Image

from streams.analyze import Analyzer
from streams.blobstore import DirectoryBlobStore
from streams.fetch import ImageFetcher
from streams.findings import PostIdentity
from streams.records import ClusterOp, SourceRef
from streams.settings import Settings
import streams.stage as stage_mod
from streams.shared_handle import once
from streams.stage import AnalyzeStage
from tests.hostile import corpus
from tests.test_analyze_inline import thread_hops

HOLD_S = 1.5  # how long a worker thread holds the store's lock
SMALL = corpus.picture_png(1, (256, 192))  # analysed on the loop however the caps are set below


class _Store:
    """A findings store: ``mark_processed`` takes ``write_s`` (a write waiting
    out the busy timeout); lookups say which thread asked, and fail first with
    the ``errors`` given (as a store locked past its busy timeout does)."""

    def __init__(self, rows: dict[str, PostIdentity] | None = None, *errors: Exception, write_s: float = HOLD_S,
                 open_s: float = 0.0):
        self.rows, self.errors, self.write_s = dict(rows or {}), list(errors), write_s
        self.lookups: list[str] = []  # thread name of each lookup
        self.writing = threading.Event()
        time.sleep(open_s)

    def sighting_identity(self, event_id: str) -> PostIdentity | None:
        self.lookups.append(threading.current_thread().name)
        if self.errors:
            raise self.errors.pop(0)
        return self.rows.get(event_id)

    def mark_processed(self, source, outcome, event_id) -> None:
        self.writing.set()  # called under the shared store's lock (``Serialized``)
        time.sleep(self.write_s)


def _event(n: int, path: str = "small.png") -> bytes:
    return json.dumps({"event_id": f"e{n}", "platform": "x", "account_id": f"a{n}",
                       "posted_at": "2026-05-01T12:00:00Z", "image": {"path": path}}).encode()


def _source(n: int = 0) -> SourceRef:
    return SourceRef(topic="events", partition=0, offset=n)


@pytest.fixture
def make(tmp_path, monkeypatch):
    """An analyze stage over local pictures with a shared (``once``) findings
    store, as the worker builds it; ``hops`` lists what went to a thread."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "small.png").write_bytes(SMALL)
    (images / "other.png").write_bytes(corpus.picture_png(2, (256, 192)))
    hops = thread_hops(monkeypatch)

    def build(factory, *, lookup_retry_s: float = 0.5):
        settings = Settings(data_dir=tmp_path / "data", ingest={"image_roots": [images]},
                            batch={"analyze_inline_max_pixels": 4_000_000},
                            findings={"url": "", "retry_initial_s": lookup_retry_s})
        blobs = DirectoryBlobStore(tmp_path / "blobs")
        fetcher = ImageFetcher(settings.fetch, settings.ingest, blobs)
        return AnalyzeStage(settings, fetcher, Analyzer(settings, tmp_path / "blobs"), blobs.put, factory)

    return build, hops


async def _ticking(work):
    """``await work`` while a task ticks every 10 ms: (its result, the
    longest the loop went without a tick)."""
    gaps, stop = [], asyncio.Event()

    async def tick():
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.05)
    try:
        result = await work
    finally:
        stop.set()
        await ticker
    return result, max(gaps)


def _write_in_a_thread(shared) -> threading.Thread:
    """A duplicate's accounting (``stage.hand_on``), holding the store's lock for ``HOLD_S``."""
    writer = threading.Thread(target=shared.mark_processed, args=(_source(99), "duplicate", "e99"), name="writer")
    writer.start()
    assert shared._store.writing.wait(10)  # it has the lock
    return writer


def _through_a_busy_store(stage: AnalyzeStage, shared, raw: bytes):
    async def go():
        # warm: the first analysis imports the detectors, and opens the store (in a thread)
        warm = await stage.process(_event(50, "other.png"), _source(50))
        assert warm.op is not None, warm.dead
        writer = _write_in_a_thread(shared)
        started = time.monotonic()
        result, longest_gap = await _ticking(stage.process(raw, _source(0)))
        took = time.monotonic() - started
        writer.join()
        return result, longest_gap, took

    return asyncio.run(go())


def test_a_small_picture_does_not_hold_the_loop_while_a_thread_holds_the_store(make):
    store = _Store()
    shared = once(lambda: store)()
    build, hops = make
    stage = build(lambda: shared)
    result, longest_gap, took = _through_a_busy_store(stage, shared, _event(0))
    assert result.dead is None, result.dead
    sighting = ClusterOp.loads(result.op).sighting
    assert sighting.event.event_id == "e0" and sighting.sha256 == hashlib.sha256(SMALL).hexdigest()
    # it waited for the store (in a thread), the loop did not: it waited ~2 s without a tick
    assert longest_gap < 0.5, longest_gap
    assert took >= HOLD_S - 0.3, took
    # analysed on the loop all the same; only the lookup took a thread, once the writer was done
    assert hops[-1:] == ["_lookup"] and hops.count("_blocking") == 0, hops
    assert len(store.lookups) == 2 and store.lookups[-1] != threading.main_thread().name


def test_with_the_store_free_the_lookup_stays_on_the_loop(make):
    store = _Store()
    shared = once(lambda: store)()
    build, hops = make
    stage = build(lambda: shared)

    async def go():
        await asyncio.to_thread(shared.sighting_identity, "warm")  # opened, in a thread as the worker does
        hops.clear()
        return await stage.process(_event(0), _source(0))

    result = asyncio.run(go())
    assert result.op is not None and hops == [] and store.lookups[-1] == threading.main_thread().name


def test_a_store_busy_opening_does_not_hold_the_loop(make):
    # the store opens on first use, under the lock: SQLite's schema and WAL setup can wait out its busy timeout
    build, hops = make
    opened = []
    shared = once(lambda: opened.append(_Store(open_s=HOLD_S)) or opened[0])()
    stage = build(lambda: shared)

    async def go():
        # warm: the first analysis imports the detectors (a stage whose store is no shared one)
        await build(lambda: _Store()).process(_event(50, "other.png"), _source(50))
        hops.clear()
        return await _ticking(stage.process(_event(0), _source(0)))

    result, longest_gap = asyncio.run(go())
    assert result.op is not None, result.dead
    assert longest_gap < 0.5, longest_gap
    assert hops[-1:] == ["_lookup"] and opened[0].lookups[0] != threading.main_thread().name


def test_the_busy_stores_answer_is_still_judged(make):
    """Made in the thread, the lookup decides as before: the same picture
    stored under the id is an exact duplicate, another one a conflict."""
    build, _ = make
    for stored, duplicate in ((hashlib.sha256(SMALL).hexdigest(), True), ("b" * 64, False)):
        store = _Store({"e0": PostIdentity(stored, "x", "a0")})
        shared = once(lambda store=store: store)()
        result, longest_gap, _ = _through_a_busy_store(build(lambda shared=shared: shared), shared, _event(0))
        assert longest_gap < 0.5, longest_gap
        if duplicate:
            assert result.duplicate and result.op is None and result.dead is None
        else:
            assert (result.dead.stage, result.dead.reason) == ("dedupe", "conflict")


def test_a_busy_stores_lookup_that_fails_for_a_passing_reason_is_held_then_a_sighting(make):
    # made in the thread, a lookup the store cannot answer for a reason that passes holds the event as before
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode, locked.sqlite_errorname = 5, "SQLITE_BUSY"
    store = _Store()
    shared = once(lambda: store)()
    build, _ = make
    stage = build(lambda: shared, lookup_retry_s=0.05)

    async def go():
        warm = await stage.process(_event(50, "other.png"), _source(50))
        assert warm.op is not None, warm.dead
        writer = _write_in_a_thread(shared)
        store.errors.extend([locked, locked])
        got = await _ticking(stage.process(_event(0), _source(0)))
        writer.join()
        return got

    result, longest_gap = asyncio.run(go())
    assert result.dead is None and ClusterOp.loads(result.op).sighting.event.event_id == "e0", result.dead
    assert longest_gap < 0.5, longest_gap
    assert len(store.lookups) == 1 + 3  # the warm-up's, then two failed tries and the answer


def _encoded(size: tuple[int, int], fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


def _judge(cap: int = 4_000_000) -> AnalyzeStage:
    settings = Settings(batch={"analyze_inline_max_pixels": cap})
    return AnalyzeStage(settings, None, None, lambda d, s: None, lambda: None)


@pytest.mark.parametrize("name, picture, inline", [
    # a few kB, or a few hundred bytes, decoded in full: 200-300 ms on the loop
    ("2000x2000 PNG", lambda: _encoded((2000, 2000), "PNG"), False),
    ("2000x2000 lossless WebP", lambda: _encoded((2000, 2000), "WEBP", lossless=True), False),
    ("2000x2000 GIF", lambda: _encoded((2000, 2000), "GIF"), False),
    ("1920x1080 PNG", lambda: _encoded((1920, 1080), "PNG"), False),
    ("2000x2000 lossy WebP", lambda: _encoded((2000, 2000), "WEBP", quality=80), False),
    # the watermark detector decodes it in full (its quantisation may have left a mark): ~145 ms
    ("2000x1500 JPEG at quality 95", lambda: _encoded((2000, 1500), "JPEG", quality=95), False),
    # draft decode, no watermark decode: 3-5 ms
    ("2000x1500 JPEG at quality 85", lambda: _encoded((2000, 1500), "JPEG", quality=85), True),
    ("2000x2000 JPEG at quality 80", lambda: _encoded((2000, 2000), "JPEG", quality=80), True),
    ("500x500 PNG", lambda: _encoded((500, 500), "PNG"), True),
    ("256x192 PNG", lambda: SMALL, True),
], ids=lambda v: v if isinstance(v, str) else "")
def test_which_pictures_are_analysed_on_the_loop(name, picture, inline):
    on_loop = _judge()._small(picture())
    assert on_loop is inline, name


def test_the_configured_cap_still_bounds_every_format():
    assert stage_mod.MAX_INLINE_FULL_DECODE_PIXELS == 500 * 500
    png = _encoded((500, 500), "PNG")
    assert _judge(500 * 500)._small(png) and not _judge(500 * 500 - 1)._small(png)
    jpeg = _encoded((2000, 1500), "JPEG", quality=85)
    assert _judge(2000 * 1500)._small(jpeg) and not _judge(2000 * 1500 - 1)._small(jpeg)
    assert not _judge(0)._small(SMALL)


def test_a_large_flat_png_is_analysed_in_a_thread(make):
    build, hops = make
    store = _Store()
    stage = build(once(lambda: store))
    flat = _encoded((2000, 2000), "PNG")
    (stage.settings.ingest.image_roots[0] / "flat.png").write_bytes(flat)

    async def go():
        await stage.process(_event(50, "other.png"), _source(50))  # warm: imports, the store opened
        hops.clear()
        return await stage.process(_event(0, "flat.png"), _source(0))

    result = asyncio.run(go())
    assert ClusterOp.loads(result.op).sighting.width == 2000
    assert hops == ["_blocking"]
