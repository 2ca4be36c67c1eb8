"""The analyze stage for one event, with its one failure rule: whatever goes
wrong ends as a dead letter naming the stage and a reason.

Known failures carry their own reason (``InvalidEvent``, ``FetchError``,
``ImageRejected``, ``StageError``); anything else is ``internal_error`` for
the stage that was running, and running out of time is ``deadline``. So one
hostile event can neither crash the agent (and with it the worker and the
events queued behind it) nor hold it: fetch has its own overall deadline
(``fetch.total_timeout_s``) and the whole event another
(``ingest.event_deadline_s``). The deadline cannot interrupt work on the event
loop itself: only local reads (regular files up to ``fetch.max_bytes``) and
pictures up to ``batch.analyze_inline_max_pixels`` run there, a few
milliseconds each (never a multi-scan JPEG nor a PNG of many chunks, whose
decode cost their pixel count does not bound; a picture decoded in full, as
all but a plain JPEG are, only up to ``MAX_INLINE_FULL_DECODE_PIXELS``);
anything larger is analysed in a thread the deadline covers. Nor does the loop
wait on the findings store: a lookup finding it busy (``Serialized.if_free``)
is made in a thread.

Two failures are not the event's: a picture the blob store cannot write for
a reason that passes (the disk full, a quota, EIO, a read-only remount), and
a duplicate lookup the findings store cannot answer for one (the SQLite file
locked past its busy timeout, an I/O error; Elasticsearch unreachable,
overloaded or refusing the credentials: ``store_errors.may_pass``). Either holds
its event, tried again with backoff until it succeeds (``_held``); a stop
ends the wait, leaving the event unacked. Dead-lettered, a valid event was
lost for good. A failure that would come back (a corrupt database file, a
programming error) still ends as a dead letter.

Nor can it stop a thread: an event whose analysis runs past its deadline is
dead-lettered then, but its analysis slot (``ingest.analyze_concurrency``)
stays taken until the thread returns, so hostile pictures that decode slowly
cannot pile up threads and starve the events behind them. The deadline counts
the event's own work only: the time it waits its turn (for a slot, or for an
earlier copy with its event id) is not charged to it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from PIL import Image

from detectors.imagedata import (
    JPEG_FORMATS, ImageRejected, check_structure, jpeg_multi_scan, open_formats, png_chunks_over,
)
from streams import metrics
from streams.blobstore import write_may_pass
from streams.findings import PostIdentity, reads_are_local
from streams.recent import Recent
from streams.records import ClusterOp, DeadLetter, Sighting, SourceRef
from streams.settings import Settings
from streams.shared_handle import BUSY, Serialized
from streams.store_errors import may_pass
from streams.validate import MAX_EVENT_BYTES, parse_event

if TYPE_CHECKING:
    from streams.cluster_stage import SendDead

log = logging.getLogger(__name__)

# A cluster op must fit in one broker message; events are bounded so that it
# always does (streams.records), and this says so loudly if that ever breaks.
MAX_OP_BYTES = MAX_EVENT_BYTES


BLOBS_REMEMBERED = 100_000  # ~10 MB of digests: repeats of a recent picture skip the blob store
# ... for this long; then a repeat stores it again, which refreshes its mtime (a
# blob's "last stored", which retention reads: ``streams.retention``) and
# writes it anew if retention deleted it meanwhile.
BLOB_REMEMBERED_S = 600.0

# A blob write that failed for a passing reason (``blobstore.write_may_pass``:
# the disk full, a quota, EIO, a read-only remount) is tried again after this
# long, doubling up to the max (as the cluster stage holds a batch its engine
# state store could not write).
BLOB_RETRY_INITIAL_S, BLOB_RETRY_MAX_S = 0.5, 30.0


# Since when the events this process holds for each store have waited: their gauges read the oldest.
HELD_BLOBS = metrics.OldestWait(metrics.BLOB_HELD_SECONDS)
HELD_LOOKUPS = metrics.OldestWait(metrics.LOOKUP_HELD_SECONDS)

# Chunks a PNG analysed on the event loop may have. Pillow handles each one in
# Python, opening the file and again decoding it (a 500x400 picture carrying
# 100,000 tiny tEXt chunks, 2 MB, held the loop 1 s); a real PNG has a few
# metadata chunks and one IDAT per 8-64 KB of pixels, about 500 at most under
# the inline byte cap.
MAX_INLINE_PNG_CHUNKS = 1_000

# Pixels a picture decoded in full may have to be analysed on the event loop
# (``AnalyzeStage._small``): every format but JPEG (no reduced decode), and a
# JPEG whose quantisation leaves an invisible watermark to look for
# (``watermark.jpeg_erased_mark`` false: roughly quality >= 90), which the
# watermark detector decodes at full size and transforms (a DWT over the top
# band). Measured (Analyzer.analyze, one core, distinct files): a flat
# 2000x2000 PNG of 16 kB took 220 ms, a 218-byte lossless WebP 260 ms, a GIF
# 230-270 ms, a photo-like PNG 300 ms; at 1920x1080 75-110 ms; a 2000x1500 JPEG
# at quality 95 145 ms. At 500x500 (this cap) 8-14 ms, 256x192 3 ms; a
# plain JPEG (quality 85, draft decode, no watermark decode) 3-5 ms up to
# 2000x2000, so it keeps the whole ``batch.analyze_inline_max_pixels``.
# Without this, a feed of tiny distinct flat PNGs held the loop ~250 ms each.
MAX_INLINE_FULL_DECODE_PIXELS = 250_000


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _error_text(e: BaseException) -> str:
    code = getattr(e, "sqlite_errorname", None)
    return f"{type(e).__name__}{f' {code}' if code else ''}: {e}"[:500]


class StageError(Exception):
    """A refusal decided by the stage itself (not by a parser or fetcher);
    ``stage`` names it when it is not the one the event was in."""

    def __init__(self, reason: str, detail: str, stage: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.stage = stage


@dataclass
class Result:
    op: bytes | None = None  # serialized ClusterOp for the cluster topic
    dead: DeadLetter | None = None
    duplicate: bool = False  # an exact redelivery of a stored sighting: accounted, not re-counted
    event_id: str | None = None


def _identity(s: Sighting) -> PostIdentity:
    return PostIdentity(s.sha256, s.event.platform, s.event.account_id)


def run_of(headers: Any) -> str | None:
    """The ``deepwatch-run`` header, whatever shape the client gives headers in."""
    from streams.ingest import RUN_HEADER

    if not headers:
        return None
    try:  # headers come from whoever produced the message: never let them raise
        items = headers.items() if hasattr(headers, "items") else headers
        for key, value in items:
            key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            if key == RUN_HEADER and value:
                return (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))[:64]
    except Exception:
        return None
    return None


class SharedIds:
    """What the concurrent analyze actors of one worker share: the recent
    event id -> picture map, one lock per event id in flight, so two events
    with the same id are judged one after the other (same id -> same
    partition -> same worker, so this is complete across workers too), and
    the ``analyzing`` slots.

    A worker runs more actors than it analyses events at once: an actor
    waiting on an image host holds no analysis slot, so a slow host delays
    only its own events while the others are decoded and hashed."""

    def __init__(self, capacity: int = 100_000, analyze_slots: int = 2):
        self.recent = Recent(capacity)  # event id -> PostIdentity
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # decode, hashes and cheap detectors: CPU work, so more at once than
        # the worker has cores only adds GIL contention and decoded pixels
        self.analyzing = asyncio.Semaphore(analyze_slots)
        self._threads: set[asyncio.Task] = set()  # analyses in threads, some maybe past their event's deadline

    @asynccontextmanager
    async def slot(self, clock: asyncio.Timeout | None = None):
        """One analysis slot, held until the block ends and every thread
        started with ``Slot.to_thread`` has returned, whichever is later.
        ``clock``, the event's deadline, is stopped while waiting for it."""
        await uncharged(clock, self.analyzing.acquire())
        slot = Slot(self)
        try:
            yield slot
        finally:
            slot.leave()

    def _track(self, task: asyncio.Task) -> None:
        self._threads.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._threads.discard)

    def remember(self, event_id: str, post: PostIdentity) -> None:
        self.recent.put(event_id, post)

    @asynccontextmanager
    async def hold(self, event_id: str, clock: asyncio.Timeout | None = None):
        """The event id's turn; ``clock``, the event's deadline, is stopped
        while an event with the same id (a redelivery) is judged first."""
        lock, users = self._locks.get(event_id, (asyncio.Lock(), 0))
        self._locks[event_id] = (lock, users + 1)
        try:
            await uncharged(clock, lock.acquire())
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[event_id]
            if users <= 1:
                del self._locks[event_id]
            else:
                self._locks[event_id] = (lock, users - 1)


async def uncharged(clock: asyncio.Timeout | None, wait: Awaitable[Any]) -> Any:
    """``await wait`` with ``clock`` (an event's deadline) stopped meanwhile:
    an event is charged for its own work, not for waiting its turn."""
    when = clock.when() if clock is not None else None
    if when is None:
        return await wait
    loop = asyncio.get_running_loop()
    left = when - loop.time()
    clock.reschedule(None)
    got = await wait
    clock.reschedule(loop.time() + left)
    return got


class Slot:
    """An analysis slot (``SharedIds.slot``): released once its holder left
    it and its threads have all returned."""

    def __init__(self, shared: SharedIds):
        self._shared = shared
        self._holders = 1  # the block that took it

    def leave(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._shared.analyzing.release()

    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread. Cancelled (the event's deadline), the
        caller moves on at once, but the thread keeps the slot until it
        returns: a thread cannot be stopped, and its CPU is not free."""
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._holders += 1
        self._shared._track(task)

        def done(t: asyncio.Task) -> None:
            if not t.cancelled():
                t.exception()  # retrieved: an abandoned thread's failure is not the loop's to report
            self.leave()

        task.add_done_callback(done)
        return await asyncio.shield(task)


# A broker timestamp this far before its post's posted_at is a slow producer clock (or a post
# dated ahead): platform and producer clocks agree to seconds (``_check_event_time``).
CLOCK_BEHIND_S = 60.0
# A post this recent by the worker's clock is live: a slow producer's stamp is replaced for it.
# Past it a backlog's post dated ahead would look the same (``_check_event_time``).
LIVE_POST_S = 120.0
# One warning per topic and producing run in this long: a slow producer stamps every record.
CLOCK_WARN_EVERY_S = 300.0
_clock_warned: dict[tuple[str, str | None], float] = {}


def _warn_clock_behind(topic: str, run: str | None, behind_s: float, action: str) -> None:
    """Log, at most every ``CLOCK_WARN_EVERY_S`` per topic and run (the
    ``deepwatch-run`` header names an ingest run), that a producer's clock
    looks slow: alerts that never fired are otherwise unexplained."""
    key, now = (topic, run), time.monotonic()
    if now - _clock_warned.get(key, -CLOCK_WARN_EVERY_S) < CLOCK_WARN_EVERY_S:
        return
    if len(_clock_warned) >= 1024:  # runs come and go: a bound, not a history
        _clock_warned.clear()
    _clock_warned[key] = now
    log.warning("broker timestamp before posted_at: the producer's clock looks slow; fix its clock (NTP). On "
                "Kafka, a topic with message.timestamp.type=LogAppendTime is stamped by the broker instead (not "
                "on the embedded broker)",
                extra={"topic": topic, "run": run, "behind_s": round(behind_s, 1), "action": action})


class AnalyzeStage:
    """validate -> event-time check -> fetch -> decode/hash/cheap detectors ->
    duplicate check -> cluster op. ``store`` answers "which picture does this
    event id already have" (the findings store, exact and unbounded in time)."""

    def __init__(self, settings: Settings, fetcher: Any, analyzer: Any, put_blob: Callable[[bytes, str], Any],
                 store_factory: Callable[[], Any], shared: SharedIds | None = None):
        self.settings = settings
        self.fetcher = fetcher
        self.analyzer = analyzer
        self.put_blob = put_blob
        self._store_factory = store_factory
        self._store = None
        self._stage = "validate"  # the stage the current event is in, for its dead letter
        # event id -> the post (PostIdentity) of sightings this worker sent but the store may
        # not have yet (the sink runs behind the stream).
        self.shared = shared or SharedIds()
        self._blobs = Recent(BLOBS_REMEMBERED)  # sha256 -> when (monotonic) this stage put that blob
        self._local_reads = reads_are_local(settings.findings.url)

    async def process(self, raw: bytes, source: SourceRef, broker_ts: float | None = None) -> Result:
        """One event in, one outcome out; never raises (except cancellation)."""
        self._stage = "validate"
        event_id = None
        deadline = self.settings.ingest.event_deadline_s
        try:
            async with asyncio.timeout(deadline) as clock:
                ev = parse_event(raw)
                event_id = ev.event_id
                broker_ts = self._check_event_time(ev.posted_at, broker_ts, source)
                async with self.shared.hold(ev.event_id, clock):
                    return await self._analyze(ev, source, broker_ts, clock)
        except TimeoutError:
            return self._dead(self._stage, "deadline", f"event took longer than {deadline}s "
                              f"(ingest.event_deadline_s) in stage {self._stage}", source, raw, event_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the point: nothing escapes as a crash
            reason = getattr(e, "reason", None)
            if reason is None:
                log.exception("analyze failed", extra={"event_id": event_id, "stage": self._stage})
                reason, detail = "internal_error", f"{type(e).__name__}: {e}"
            else:
                detail = getattr(e, "detail", None) or str(e)
            stage = getattr(e, "stage", None) or self._stage
            return self._dead(stage, reason, detail, source, raw, event_id or getattr(e, "event_id", None))

    async def _analyze(self, ev: Any, source: SourceRef, broker_ts: float | None,
                       clock: asyncio.Timeout | None = None) -> Result:
        started = time.perf_counter()
        self._stage = "fetch"
        # A local file is read on the event loop: a regular file no larger
        # than fetch.max_bytes (FIFOs and devices are refused unread), which
        # costs less than a thread hop. A fetcher without a blocking local
        # read (stand-ins in tests and benches) serves everything from ``get``.
        read_local = getattr(self.fetcher, "read_local", None)
        data = read_local(ev) if read_local is not None and ev.image.path is not None else None
        if data is None:
            data = await self.fetcher.get(ev)
        metrics.STAGE_SECONDS.labels("fetch").observe(time.perf_counter() - started)
        self._stage = "decode"
        # The deadline stops while this event waits for a slot: an event
        # queued behind slow ones is not dead-lettered for their time.
        async with self.shared.slot(clock) as slot:
            return await self._analyze_fetched(ev, data, source, broker_ts, slot, clock)

    async def _analyze_fetched(self, ev: Any, data: bytes, source: SourceRef, broker_ts: float | None,
                               slot: Slot, clock: asyncio.Timeout | None = None) -> Result:
        t1 = time.perf_counter()
        recent = self.shared.recent.get(ev.event_id)
        # Digested here only when small enough to digest on the loop.
        sha256 = hashlib.sha256(data).hexdigest() if len(data) <= self.settings.batch.analyze_inline_max_pixels else None
        known = sha256 is not None and self.analyzer.knows(sha256)
        if (known or self._small(data)) and self._local_reads:
            # Analysed on the event loop: a repost of bytes analysed moments
            # ago costs no decode at all, and a picture this small decodes and
            # hashes in a few milliseconds, while a thread hop costs its
            # handoffs and, far more, the GIL ping-pong between the loop and
            # the pool thread on every syscall either side makes (measured:
            # 20-30% of a pipeline worker's CPU). Only with a local findings
            # store: the event id is looked up in the store (below), and an
            # Elasticsearch lookup is a network round trip, which must not
            # hold the loop. Nor may a wait for the store: the lookup is made
            # here only if the store is free at once, else in a thread (below).
            sighting, stored, held = self._blocking(ev, data, sha256, source, on_loop=True)
        else:
            # One thread hop for the blocking work of a large picture
            # (analysis, blob write, the store's answer on this event id), so
            # the loop and its deadlines keep running meanwhile. Past the
            # deadline the event is dead-lettered, and the thread keeps its
            # slot until it returns.
            sighting, stored, held = await slot.to_thread(self._blocking, ev, data, sha256, source)
        metrics.STAGE_SECONDS.labels("analyze").observe(time.perf_counter() - t1)
        if held is not None:
            await self._hold_blob(ev.event_id, data, sighting.sha256, held, slot, clock)
        self._stage = "dedupe"
        if stored is BUSY:  # not asked yet (the blob held; the store busy for the loop): asked in a thread
            stored = await slot.to_thread(self._lookup, ev.event_id)
        if may_pass(stored):
            stored = await self._hold_lookup(ev.event_id, stored, slot, clock)
        if isinstance(stored, BaseException):
            raise stored
        if self._is_duplicate(ev.event_id, _identity(sighting), recent, stored):
            metrics.EVENTS.labels("analyze", "duplicate").inc()
            return Result(duplicate=True, event_id=ev.event_id)
        if broker_ts:
            sighting.ingested_at = datetime.fromtimestamp(broker_ts, timezone.utc)
        with metrics.STAGE_SECONDS.labels("serialize").time():
            op = ClusterOp(kind="sighting", sighting=sighting).dumps()
        if len(op) > MAX_OP_BYTES:
            raise StageError("too_large", f"cluster op is {len(op)} bytes, limit {MAX_OP_BYTES}")
        self.shared.remember(ev.event_id, _identity(sighting))
        metrics.EVENTS.labels("analyze", "ok").inc()
        return Result(op=op, event_id=ev.event_id)

    def _dead(self, stage: str, reason: str, detail: str, source: SourceRef, raw: bytes, event_id: str | None) -> Result:
        metrics.EVENTS.labels(stage, "dead_letter").inc()
        return Result(dead=DeadLetter.of(stage, reason, detail, raw, source=source, event_id=event_id,
                                         excerpt=stage == "validate"),
                      event_id=event_id)

    def _check_event_time(self, posted_at: datetime, broker_ts: float | None,
                          source: SourceRef | None = None) -> float | None:
        """Refuse a post dated too far ahead; return the broker timestamp its
        sighting is to carry (``ingested_at``): ``broker_ts``, or this
        worker's clock where ``broker_ts`` is a slow producer's (below)."""
        # Windows end at a cluster's newest event time, min(posted_at, broker
        # timestamp) (``clustering.event_time``), so a post dated ahead moves
        # them only as far as its broker timestamp; but that is the
        # producer's CreateTime on most topics, which can be anything too
        # (old mirrored topics, wrong clocks), and a sighting without one
        # counts at posted_at. One far-future post would push every real
        # sighting out of the windows and silence the cluster (and stand as
        # its last_seen). So posted_at is bounded by ingest time, this
        # worker's clock; the offender is dead-lettered (its own sighting is
        # the only thing lost).
        ingested = datetime.now(timezone.utc)
        skew = self.settings.ingest.max_future_skew_s
        if posted_at > ingested + timedelta(seconds=skew):
            raise StageError("future_posted_at", f"posted_at {posted_at.isoformat()} is more than {skew:.0f}s after "
                             f"ingest time {ingested.isoformat()} (ingest.max_future_skew_s)")
        if broker_ts is None:
            return None
        posted, now = posted_at.timestamp(), ingested.timestamp()
        if posted - broker_ts <= CLOCK_BEHIND_S:
            return broker_ts
        # Stamped before it was posted: a producer whose clock is slow (an ingest client, a
        # connector host; the embedded broker cannot be told to stamp records itself),
        # or a post dated ahead. A producer 10 minutes slow put half of a 15-post burst outside
        # the 5-minute window: no alert. A post made moments ago by this worker's clock, and
        # not after it, is not dated ahead: its own time stands (this worker's clock bounds it,
        # as it bounds posted_at above). Older, it may be a backlog's post dated ahead, which
        # the broker timestamp is there to hold back: kept, and counted.
        live = -CLOCK_BEHIND_S <= now - posted <= LIVE_POST_S
        action = "worker_clock" if live else "kept"
        topic = source.topic if source is not None else ""
        metrics.BROKER_TIME_BEHIND.labels(topic, action).inc()
        _warn_clock_behind(topic, source.run if source is not None else None, posted - broker_ts, action)
        return now if live else broker_ts

    def _small(self, data: bytes) -> bool:
        """Whether a picture is small enough to analyse on the event loop
        (``batch.analyze_inline_max_pixels``, judged from its header; a
        header PIL cannot read goes to a thread, where its rejection costs
        the loop nothing). A multi-scan JPEG never is: progressive scans
        (thousands in a few hundred kilobytes) cost libjpeg time its pixel
        count does not bound, and no deadline interrupts the loop. Nor is a
        PNG of more than ``MAX_INLINE_PNG_CHUNKS`` chunks, counted before
        Pillow reads its header (which handles every chunk up to the pixels).
        A picture decoded in full (any format but JPEG, and a JPEG whose
        watermark check runs) only up to ``MAX_INLINE_FULL_DECODE_PIXELS``:
        its cost per pixel is some 50 times a plain JPEG's. A structure the
        decoder refuses (``check_structure``: countless chunks, blocks, tiles)
        or a format it does not open is not small either: refused in the
        thread, where the header walk Pillow would do first costs the loop
        nothing."""
        cap = self.settings.batch.analyze_inline_max_pixels
        if cap <= 0 or len(data) > cap:  # compressed bytes above the pixel cap: large by any measure
            return False
        if png_chunks_over(data, MAX_INLINE_PNG_CHUNKS):
            return False
        try:
            check_structure(data)
        except ImageRejected:
            return False
        from detectors.plugins.watermark import jpeg_erased_mark  # cv2, pywt: not for every importer of ``once``

        try:
            with Image.open(io.BytesIO(data), formats=open_formats()) as img:
                w, h = img.size
                fmt = img.format
                # decoded reduced, its watermark check skipped: cheap up to the whole cap
                plain_jpeg = fmt in JPEG_FORMATS and jpeg_erased_mark(img)
        except Exception:  # noqa: BLE001 - judged (and rejected) in the thread
            return False
        if fmt in JPEG_FORMATS and jpeg_multi_scan(data):
            return False
        return w * h <= (cap if plain_jpeg else min(cap, MAX_INLINE_FULL_DECODE_PIXELS))

    def _blocking(self, ev: Any, data: bytes, sha256: str | None, source: SourceRef,
                  on_loop: bool = False) -> tuple[Sighting, Any, Any]:
        """Analysis, blob write and the stored picture of this event id, on
        the loop (``on_loop``) or in a worker thread (``sha256``: the digest
        of ``data`` if already taken). A failing lookup is returned, not
        raised, so its dead letter names the dedupe stage (or, failing for a
        reason that passes, it is held: ``_hold_lookup``); ``BUSY`` for one
        not made (on the loop, the store busy; or the blob held), to be made
        in a thread. The third item: the error of a blob write that may pass
        (the event is held, ``_hold_blob``; the lookup is left for then), else
        None."""
        sighting: Sighting = self.analyzer.analyze(ev, data, source, sha256)
        held = self._store_blob(data, sighting.sha256)
        stored = self._lookup(ev.event_id, wait=not on_loop) if held is None else BUSY
        return sighting, stored, held

    def _store_blob(self, data: bytes, sha256: str) -> OSError | None:
        """Write the picture to the blob store: None once stored; the error of
        a write that may succeed later (the disk full, a quota, EIO, a
        read-only remount: ``blobstore.write_may_pass``); a ``StageError``
        raised for one that would fail again for this file."""
        put_at = self._blobs.get(sha256)
        if put_at is not None and time.monotonic() - put_at < BLOB_REMEMBERED_S:
            return None  # content-addressed: stored moments ago, stored
        with metrics.STAGE_SECONDS.labels("blob").time():
            try:
                self.put_blob(data, sha256)
            except OSError as e:
                if write_may_pass(e):
                    return e
                # the data dir's disk, not the picture: said as such (it read
                # "decode:internal_error OSError: [Errno 27] File too large")
                raise StageError("blob_write", f"cannot store the picture in the data dir's blob store "
                                               f"({e.strerror or e}; {e.filename or 'blobs/'}): check its "
                                               "disk space and permissions", stage="blob") from None
        self._blobs.put(sha256, time.monotonic())
        return None

    def _lookup(self, event_id: str, wait: bool = True) -> Any:
        """The stored post of the event id (``PostIdentity``), or the error of the lookup;
        ``BUSY`` when not ``wait`` and the shared store is in use."""
        started = time.perf_counter()
        try:
            stored = self._stored_identity(event_id, wait)
        except Exception as e:  # noqa: BLE001 - re-raised in the dedupe stage
            stored = e
        if stored is not BUSY:
            metrics.STAGE_SECONDS.labels("dedupe").observe(time.perf_counter() - started)
        return stored

    async def _held(self, event_id: str, failed: Any, again: Callable[[], Any], may_pass: Callable[[Any], bool],
                    slot: Slot, clock: asyncio.Timeout | None, *, holding: metrics.OldestWait, failures: Any,
                    initial_s: float, max_s: float, say: Callable[[Any, float], str],
                    extra: Callable[[Any], dict[str, Any]]) -> tuple[Any, int]:
        """Hold a valid event on a failure that passes (``may_pass(failed)``):
        ``again()`` in a thread after a backoff from ``initial_s`` doubling up
        to ``max_s``, until its outcome no longer may pass. Returns that
        outcome and the number of tries. Each failed try counts in
        ``failures`` and is logged (``say``); ``holding`` clocks the wait for
        its gauge. The waits are not charged to the event's deadline, and the
        analysis slot stays taken meanwhile (an outage stops analysis rather
        than piling up pictures). A stop cancels the wait at once: the event
        is left unacked and read again."""
        delay, tries = initial_s, 1
        holding.waiting(self)
        try:
            while may_pass(failed):
                failures.inc()
                log.error(say(failed, delay), extra={"event_id": event_id, **extra(failed), "tries": tries,
                                                     "delay_s": delay})
                await uncharged(clock, asyncio.sleep(delay))
                delay = min(delay * 2, max_s)
                tries += 1
                failed = await uncharged(clock, slot.to_thread(again))  # a try may wait out a 30 s lock
        finally:
            holding.done(self)
        return failed, tries

    async def _hold_blob(self, event_id: str, data: bytes, sha256: str, error: OSError, slot: Slot,
                         clock: asyncio.Timeout | None) -> None:
        """Hold an event whose picture the blob store could not write for a
        reason that passes, writing it again (``_held``) until it is stored
        or fails for good (``blob:blob_write``)."""
        self._stage = "blob"
        _, tries = await self._held(
            event_id, error, lambda: self._store_blob(data, sha256), lambda e: e is not None, slot, clock,
            holding=HELD_BLOBS, failures=metrics.BLOB_WRITE_FAILURES,
            initial_s=BLOB_RETRY_INITIAL_S, max_s=BLOB_RETRY_MAX_S,
            say=lambda e, delay: (f"blob store write failed ({e.strerror or e}; {e.filename or 'blobs/'}); the event "
                                  f"is held and its picture written again in {delay:g}s: free space on the data "
                                  "dir's disk (or lift its quota, remount it read-write)"),
            extra=lambda e: {"sha256": sha256, "errno": errno_name(e)})
        log.info("blob store written again; the held event goes on", extra={"event_id": event_id, "tries": tries})

    async def _hold_lookup(self, event_id: str, error: Exception, slot: Slot, clock: asyncio.Timeout | None) -> Any:
        """Hold an event whose duplicate lookup the findings store could not
        answer for a reason that passes (``store_errors.may_pass``), asking again
        (``_held``) until it answers; returns the answer (the stored sha256
        or None), or the error of a lookup that then failed for good, which
        the dedupe stage dead-letters as before."""
        self._stage = "dedupe"
        stored, tries = await self._held(
            event_id, error, lambda: self._lookup(event_id), may_pass, slot, clock,
            holding=HELD_LOOKUPS, failures=metrics.LOOKUP_FAILURES,
            # the findings store's backoff, as its sinks wait for it
            initial_s=self.settings.findings.retry_initial_s, max_s=self.settings.findings.retry_max_s,
            say=lambda e, delay: (f"findings store lookup failed ({_error_text(e)}); the event is held and looked "
                                  f"up again in {delay:g}s: check the findings store (the SQLite file's locks and "
                                  "disk; Elasticsearch's health and credentials)"),
            extra=lambda e: {"error": _error_text(e)})
        log.info("findings store answered again; the held event goes on", extra={"event_id": event_id,
                                                                                "tries": tries})
        return stored

    def _is_duplicate(self, event_id: str, mine: PostIdentity, recent: PostIdentity | None,
                      stored: PostIdentity | None) -> bool:
        """True for a repeat of a stored sighting; ``StageError`` when the
        event id is already taken by a different post (another picture,
        platform or account: ``PostIdentity``). ``recent`` is what this
        worker sent under the id, ``stored`` what the store holds.

        The store is asked even when this worker sent the id: ``recent``
        holds ids by count, not by time, and the cluster engine recognises a
        repeat only among a cluster's sightings of the last hour of event
        time (at most ``virality.MAX_RECENT``), so a resend older than that
        counted again in the stream while the store kept one sighting."""
        for first in (stored, recent):
            if first is not None and first != mine:
                raise self._conflict(event_id, first, mine)
        # Stored: not counted again, however old. Not yet (in flight): the
        # cluster engine recognises a repeat sent moments ago.
        return stored is not None

    def _db(self):
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def _stored_identity(self, event_id: str, wait: bool = True) -> Any:
        db = self._db()
        if not wait and isinstance(db, Serialized):  # shared with threads that may hold it for seconds
            return db.if_free("sighting_identity", event_id)
        return db.sighting_identity(event_id)

    def mark_duplicate(self, source: SourceRef, event_id: str | None) -> None:
        self._db().mark_processed(source, "duplicate", event_id)

    @staticmethod
    def _conflict(event_id: str, first: PostIdentity, second: PostIdentity) -> StageError:
        if first.sha256 != second.sha256:
            return StageError("conflict", f"event_id {event_id!r} was first seen with picture sha256:{first.sha256}; "
                              f"this event has sha256:{second.sha256} (event ids must be unique per post)")
        return StageError("conflict", f"event_id {event_id!r} was first seen as another post of the same picture "
                          f"({first.differences(second)}); event ids must be unique per post")

    def close(self) -> None:
        self._store = None  # shared (``once``); the process exit closes it


DEAD_LETTER_TRIES = 3


async def hand_on(result: Result, source: SourceRef, ops: Any, send_dead: SendDead,
                  mark_duplicate: Callable[[SourceRef, str | None], None]) -> bool:
    """Hand an analysed event's outcome on: its cluster op to ``ops``, an
    exact duplicate to the store's accounting, a dead letter to its topic (an
    op the broker refuses becomes one). True once the outcome has left the
    worker: only then may the event be acked. A dead letter the broker
    refuses ``DEAD_LETTER_TRIES`` times leaves the event unacked: its
    partition's commits stop below it and the partition's next owner reads
    it again, rather than the event being lost."""
    try:
        if result.op is not None:
            with metrics.STAGE_SECONDS.labels("send").time():
                await ops.send(key=b"ops", value=result.op)
        elif result.duplicate:
            await asyncio.to_thread(mark_duplicate, source, result.event_id)
    except Exception as e:  # e.g. the broker refusing the message: still one dead letter
        log.exception("analyze output failed", extra={"offset": source.offset})
        result.dead = DeadLetter.of("cluster", "send_failed", f"{type(e).__name__}: {e}", None, source=source,
                                    event_id=result.event_id)
    if result.dead is None:
        return True
    for attempt in range(DEAD_LETTER_TRIES):
        try:
            await send_dead(result.dead)
            return True
        except Exception:  # the broker itself failing: retry, then say so, never crash
            log.exception("dead letter not sent", extra={"offset": source.offset, "attempt": attempt})
            if attempt + 1 < DEAD_LETTER_TRIES:
                await asyncio.sleep(1.0)
    log.error("event left unacked: neither its outcome nor its dead letter reached the broker; the partition's "
              "next owner reads it again", extra={"topic": source.topic, "partition": source.partition,
                                                  "offset": source.offset, "event_id": result.event_id})
    return False
