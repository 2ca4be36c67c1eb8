"""What every platform connector shares: the mapping result type, the state
store (cursor, seen event ids, remembered image posts: ``RememberedPost``), backoff, rate
limiting, the image-URL policy and the emitter that ties them to a sink.

Delivery contract (at least once): an event id is written to ``seen`` only in
the same transaction as the cursor that covers it, and only after the sink has
acknowledged it (``Sink.flush``). A reconnect or a broker failure therefore
neither loses nor repeats an event: the resume overlap re-reads the window and
the seen ids drop what was already confirmed. A crash (SIGKILL, lost node)
loses nothing either, but re-sends the last uncheckpointed window (at most
``checkpoint_every`` events or ``checkpoint_interval_s`` of them): the broker
may already hold those events, and the pipeline drops the repeats by event id.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Protocol, TypeVar
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_serializer,
                      model_validator)

from streams.records import MAX_TAG_CHARS, DeadLetter, ImageEvent
from streams.safe_http import FetchError, resolve_checked, target
from streams.settings import ConnectorSettings, FetchSettings

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

log = logging.getLogger("deepwatch.connectors")

# Per stream too: a connector runs one stream per Mastodon hashtag, and the
# DeepwatchConnectorBehind rule needs to know whether the stream that lags
# reads frames at all (a quiet hashtag) or reads them too slowly.
FRAMES = Counter("deepwatch_connector_frames_total", "Platform frames read, by connector, outcome and stream",
                 ["connector", "outcome", "stream"])
EVENTS = Counter("deepwatch_connector_events_total", "Mapped events, by connector and outcome "
                 "(produced and refused: once the broker acknowledged them; duplicate; clipped: images past a "
                 "platform's per-post limit, left out)", ["connector", "outcome"])
RECONNECTS = Counter("deepwatch_connector_reconnects_total", "Stream reconnects, by connector and reason",
                     ["connector", "reason"])
# Per stream (one connector runs one per Mastodon hashtag), and read when
# scraped: set at each checkpoint, one stream's value overwrote another's (a
# stalled hashtag hidden by a busy one), and a connector that no longer
# checkpointed (platform gone, broker down, reconnecting) kept showing the
# small lag of its last good moment instead of a growing one.
CURSOR_LAG = Gauge("deepwatch_connector_cursor_lag_seconds", "Wall time minus the event time of the last "
                   "checkpointed cursor, per stream, as of the scrape", ["connector", "stream"])
RATE_LIMIT_WAITS = Counter("deepwatch_connector_rate_limit_waits_total", "Waits imposed by platform rate limits",
                           ["connector"])
CURSOR_AHEAD = Counter("deepwatch_connector_cursor_ahead_total", "Frames whose position (Jetstream time_us, "
                       "Mastodon status id) lies further ahead of the wall clock than a clock's skew explains: "
                       "the cursor was not moved to it", ["connector"])

# How far ahead of this machine's clock a cursor's time may be (the platform's
# clock, or ours, being off). Further ahead it is a wrong clock or a crafted
# frame, and is not taken as the cursor: Jetstream answers a cursor in the
# future with its live tip and Mastodon's min_id with nothing, so every resume
# from it skipped what was missed meanwhile; and the cursor never moves back,
# so it stayed there (a time_us past 1e308 even ended every run, the lag gauge
# unable to turn it into a float). As the pipeline's default ingest.max_future_skew_s.
DEFAULT_CURSOR_AHEAD_S = 900.0


class SinkError(RuntimeError):
    """The broker did not take or acknowledge events. The connector rolls
    back to its last checkpoint and reconnects; nothing is lost."""


class MalformedFrame(ValueError):
    """A frame that cannot be read. Counted and skipped, never fatal."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def host_of(url: str) -> str:
    """``host[:port]`` of ``url`` (no credentials, path or query), for a log
    line that says which server a connection failed to reach."""
    try:
        netloc = urlsplit(url.strip()).netloc
    except ValueError:
        return url[:200]
    return netloc.rsplit("@", 1)[-1] or url[:200]


def error_text(e: ValidationError, whole: str = "(value)") -> str:
    """The first error of ``e`` as ``loc: msg``: the dotted path of the bad
    field, or ``whole`` where the error is about the whole value."""
    err = e.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or whole}: {err['msg']}"


def parse_frame(model: type[M], raw: bytes | str, invalid: str, what: str) -> M:
    """``raw`` validated as ``model``, or MalformedFrame: ``malformed_json`` when
    it is not JSON, else ``invalid`` naming the first bad field (or ``what``)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        kind = "malformed_json" if e.errors()[0]["type"] == "json_invalid" else invalid
        raise MalformedFrame(kind, error_text(e, what)) from None


MAX_HASHTAGS = 64  # ImageEvent.hashtags holds at most this many


def clip_hashtags(tags: Iterable[str]) -> list[str]:
    """The hashtags an event can carry: at most ``MAX_HASHTAGS``, each at most
    ``MAX_TAG_CHARS`` long (longer ones are left out). A post with more or
    longer tags than schema v1 allows is legal on the platforms (spam, long
    remote statuses); it must still map instead of failing validation."""
    return [t for t in tags if t and len(t) <= MAX_TAG_CHARS][:MAX_HASHTAGS]


# The ``RememberedPost`` layout this code writes. 0: the plain JSON objects
# written before the record carried a version (read as they are); 1: the same
# fields, stamped ``schema_version``. A newer one is not read (``recall``):
# what its fields mean here is not known.
REMEMBERED_POST_VERSION = 1


class RememberedPost(BaseModel):
    """What a connector keeps of an image post (``ConnectorState.remember``,
    the ``posts`` table) so that a later repost or quote of it becomes a
    sighting of the same pictures, and an edit of it can be told from what it
    showed before. Bounded by whoever makes it (Bluesky: at most its
    ``MAX_IMAGES`` URLs, the text as an event carries it, the event's tag
    bounds); read back as stored, since a post remembered by an older version
    may hold more (each use clips what it takes).

    ``schema_version`` is the version a post was stored at; one stored before
    there was one reads as 0 and is written back, like every post, as
    ``REMEMBERED_POST_VERSION``."""

    # A stray key in an old row is no reason to lose the post; a newer
    # version's keys do not get this far (``recall`` refuses the version).
    model_config = ConfigDict(extra="ignore")
    schema_version: int = Field(REMEMBERED_POST_VERSION, ge=0)
    post_url: str | None = None  # the post's web page (a repost of it carries it too)
    text: str = ""
    lang: str | None = None
    hashtags: list[str] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list)  # the image URLs its events carry, in the post's order
    # Platform ids (Bluesky blob CIDs) of every picture the post has had an
    # event for, oldest first, its edits' included: what an edit is compared
    # with. Empty for a post remembered before edits were followed (its
    # ``images`` are compared instead).
    cids: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _unversioned(cls, data: Any, info: ValidationInfo) -> Any:
        # Only a stored post without a version is version 0 (one made in code
        # is the current version). Version 0 was read leniently: ``cids`` of
        # anything but a list of strings meant none.
        version = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > REMEMBERED_POST_VERSION:
            # said first: its fields may have another shape, which is not the problem to report
            raise ValueError(f"schema_version {version} is newer than this deepwatch's {REMEMBERED_POST_VERSION}")
        if info.context == _STORED and isinstance(data, dict) and "schema_version" not in data:
            cids = data.get("cids")
            data = {**data, "schema_version": 0,
                    "cids": [c for c in cids if isinstance(c, str)] if isinstance(cids, list) else []}
        return data

    @field_serializer("schema_version")
    def _written_as_current(self, version: int) -> int:
        return REMEMBERED_POST_VERSION

    def dumps(self) -> str:
        return self.model_dump_json()

    @classmethod
    def loads(cls, raw: str | bytes) -> "RememberedPost":
        """The post a ``posts`` row holds, at the version it was stored at
        (ValidationError for one that cannot be read)."""
        return cls.model_validate_json(raw, context=_STORED)


_STORED = {"read": "stored"}  # validation context: a post read from a state file, which may predate versions


@dataclass
class Mapped:
    """What one platform frame means for deepwatch."""

    outcome: str  # image_post, repost, quote, edit, no_image, filtered, delete, identity, other, unknown_subject
    events: list[ImageEvent] = field(default_factory=list)
    cursor: int | None = None  # platform position after this frame (Jetstream time_us, Mastodon status id)
    remember: tuple[str, RememberedPost] | None = None  # (post id, what a repost needs) for later reposts/quotes
    forget: str | None = None  # post id deleted on the platform (or edited to show no pictures)
    clipped: int = 0  # images left out: past the platform's per-post limit (a crafted post)


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------
class ConnectorState:
    """One SQLite file per connector stream, in the data dir."""

    def __init__(self, path: Path | str, *, seen_max: int = 500_000, posts_max: int = 200_000,
                 handles_max: int = 200_000):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.seen_max = seen_max
        self.posts_max = posts_max
        self.handles_max = handles_max
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.executescript(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS cursor (stream TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE);
            CREATE TABLE IF NOT EXISTS posts (seq INTEGER PRIMARY KEY AUTOINCREMENT, post_id TEXT NOT NULL UNIQUE,
                                              doc TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS handles (seq INTEGER PRIMARY KEY AUTOINCREMENT, did TEXT NOT NULL UNIQUE,
                                                handle TEXT, checked REAL NOT NULL);
            """
        )
        self._db.commit()
        self._pending: set[str] = set()
        self._handles_unsaved = False
        self._unreadable_log = LogThrottle()  # a post reposted thousands of times would warn each time

    def close(self) -> None:
        self._db.close()

    def cursor(self, stream: str) -> str | None:
        row = self._db.execute("SELECT value FROM cursor WHERE stream = ?", (stream,)).fetchone()
        return row[0] if row else None

    def seen(self, event_id: str) -> bool:
        if event_id in self._pending:
            return True
        return self._db.execute("SELECT 1 FROM seen WHERE event_id = ?", (event_id,)).fetchone() is not None

    def mark_pending(self, event_id: str) -> None:
        self._pending.add(event_id)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drop_pending(self) -> None:
        """The sink failed: forget what was not acknowledged, so a resume re-sends it."""
        self._pending.clear()
        self._handles_unsaved = False
        self._db.rollback()

    def commit(self, stream: str, cursor: str | None) -> None:
        """Record the acknowledged ids and the cursor that covers them, atomically."""
        db = self._db
        db.executemany("INSERT OR IGNORE INTO seen (event_id) VALUES (?)", [(e,) for e in self._pending])
        if cursor is not None:
            db.execute("INSERT INTO cursor (stream, value, updated) VALUES (?, ?, ?) "
                       "ON CONFLICT(stream) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                       (stream, cursor, time.time()))
        db.execute("DELETE FROM seen WHERE seq <= (SELECT MAX(seq) FROM seen) - ?", (self.seen_max,))
        db.execute("DELETE FROM posts WHERE seq <= (SELECT MAX(seq) FROM posts) - ?", (self.posts_max,))
        db.execute("DELETE FROM handles WHERE seq <= (SELECT MAX(seq) FROM handles) - ?", (self.handles_max,))
        db.commit()
        self._pending.clear()
        self._handles_unsaved = False

    # Image posts remembered for reposts, quotes and edits (written with the next commit).
    def remember(self, post_id: str, post: RememberedPost) -> None:
        self._db.execute("INSERT OR REPLACE INTO posts (post_id, doc) VALUES (?, ?)", (post_id, post.dumps()))

    def recall(self, post_id: str) -> RememberedPost | None:
        """The post remembered as ``post_id``, or None: none is, or the one
        stored cannot be read (not JSON, fields of the wrong shape, a version
        newer than this code's), which is logged. Such a row ended the run
        (a ValueError, TypeError or AttributeError out of the mapper) at the
        first repost, quote or edit of its post, and again on every restart;
        as None, the post is as good as not remembered, and an edit or a new
        post under its id writes it anew."""
        row = self._db.execute("SELECT doc FROM posts WHERE post_id = ?", (post_id,)).fetchone()
        if row is None:
            return None
        try:
            return RememberedPost.loads(row[0])
        except ValidationError as e:  # a newer version's included (``RememberedPost._unversioned``)
            problem = error_text(e, "(document)")
        if (suppressed := self._unreadable_log.allow()) is not None:
            log.warning("a remembered post cannot be read; taken as not remembered", extra={
                "post_id": post_id[:300], "problem": problem[:300], "state": str(self.path),
                "suppressed": suppressed})
        return None

    def forget(self, post_id: str) -> bool:
        return self._db.execute("DELETE FROM posts WHERE post_id = ?", (post_id,)).rowcount > 0

    # Account handles (Bluesky: DID -> verified handle, or None for a checked
    # miss), written with the next commit. An unsaved one makes the emitter
    # checkpoint even when nothing else moved (``unsaved_handles``): resolved
    # on a quiet stream, they were otherwise lost at exit. One an identity
    # frame set or cleared goes back with the cursor on a rollback, and the
    # frame is read again.
    def save_handle(self, did: str, handle: str | None, checked: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO handles (did, handle, checked) VALUES (?, ?, ?)",
                         (did, handle, checked))
        self._handles_unsaved = True

    @property
    def unsaved_handles(self) -> bool:
        return self._handles_unsaved

    def handle(self, did: str) -> tuple[str | None, float] | None:
        """(handle or None, when it was checked: unix seconds), or None when nothing is saved for ``did``."""
        row = self._db.execute("SELECT handle, checked FROM handles WHERE did = ?", (did,)).fetchone()
        return (row[0], row[1]) if row else None


# --------------------------------------------------------------------------
# Politeness
# --------------------------------------------------------------------------
MAX_BACKOFF_EXPONENT = 1000  # 2.0 ** 1000 is still a float; initial_s * it reaches any sane max_s


class Backoff:
    """Exponential backoff with equal jitter (the AWS architecture blog's
    name: a wait drawn between half the cap and the cap): many clients
    reconnecting after one outage spread out instead of stampeding the
    server together."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0, rng: random.Random | None = None):
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        # The exponent is capped: 2 ** attempt overflows a float after 1024
        # failures (some 12.8 h of outage at a 60 s cap) and ended the run.
        cap = min(self.max_s, self.initial_s * 2.0 ** min(self.attempt, MAX_BACKOFF_EXPONENT))
        self.attempt += 1
        return self._rng.uniform(cap / 2, cap)  # half-jitter: never hammer with a near-zero wait

    def reset(self) -> None:
        self.attempt = 0


class LogThrottle:
    """At most ``burst`` lines of one kind (a malformed frame, a refused URL)
    per ``window_s``; the ones left out are counted and the next line let
    through says how many (``suppressed``). Each is counted in the metrics
    anyway: a platform sending nothing but bad frames (or compressed ones to
    a connector without the dictionary) wrote a warning per frame, thousands
    a second, to the log pipeline."""

    def __init__(self, burst: int = 10, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._window_at = -math.inf
        self._lines = 0
        self._suppressed = 0

    def allow(self) -> int | None:
        """None: leave this line out. Else log it, with the number left out since the last one."""
        now = self._clock()
        if now - self._window_at >= self.window_s:
            self._window_at, self._lines = now, 0
        if self._lines >= self.burst:
            self._suppressed += 1
            return None
        self._lines += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


def rate_limit_wait(headers: Any, *, low_water: int = 1, now: float | None = None) -> float:
    """Seconds to wait before the next request, from Mastodon's headers
    (``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` as an ISO 8601 time) or
    a ``Retry-After`` header (seconds or an HTTP date). ``headers``: any
    case-insensitive mapping with ``get`` (httpx's, websockets')."""
    now = time.time() if now is None else now
    retry_after = headers.get("retry-after")
    if retry_after:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            pass
        try:  # the other form RFC 9110 allows: an HTTP date
            return max(0.0, parsedate_to_datetime(retry_after).timestamp() - now)
        except (TypeError, ValueError, IndexError):
            pass
    remaining = headers.get("x-ratelimit-remaining")
    reset = headers.get("x-ratelimit-reset")
    if remaining is None or reset is None:
        return 0.0
    try:
        if int(remaining) > low_water:
            return 0.0
        return max(0.0, datetime.fromisoformat(reset).timestamp() - now)
    except ValueError:
        return 0.0


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens; returns 0.0 on success, else the seconds until
        they would be available (nothing is taken then)."""
        self._refill()
        if n <= self._tokens:
            self._tokens -= n
            return 0.0
        if n > self.burst:
            return float("inf")
        return (n - self._tokens) / self.rate

    def give_back(self, n: float) -> None:
        """Return ``n`` tokens taken for work that was then refused as a
        whole (a 503 that asks the caller to re-send): the re-send must not
        pay twice."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + n)


# --------------------------------------------------------------------------
# The pipeline's URL policy, applied before anything is produced
# --------------------------------------------------------------------------
class UrlPolicy:
    """Refuse image URLs the pipeline's fetch stage would refuse (non-http
    schemes, hosts resolving to private/loopback addresses unless
    ``fetch.allow_private_networks``), using the very same check. Answers are
    cached per host: a firehose names the same CDN host thousands of times."""

    def __init__(self, fetch: FetchSettings, ttl_s: float = 300.0, dns_timeout_s: float = 2.0):
        self.allow_private = fetch.allow_private_networks
        self.ttl_s = ttl_s
        # Short: checks run one at a time in a connector's stream or an ingest
        # request, and a late answer is no verdict (the fetch stage checks again).
        self.dns_timeout_s = dns_timeout_s
        self._cache: dict[str, tuple[float, FetchError | None]] = {}  # host:port -> (expires, verdict)

    @staticmethod
    def key(url: str) -> str:
        """What the verdict on ``url`` depends on (the host and port it
        makes the fetcher contact, ``safe_http.target``), or the URL itself
        when it has none: a refusal quoting it is its own."""
        try:
            return target(url).key
        except FetchError:
            return url

    async def check(self, url: str) -> FetchError | None:
        """The refusal the fetch stage would give ``url``, or None to let it through."""
        try:
            # What a platform or caller may send ("http://[::1/x", port 99999, a tab
            # in the host): a verdict on that URL, never an error of the request or
            # stream carrying it.
            to = target(url)
        except FetchError as e:
            return e
        hit = self._cache.get(to.key)
        now = time.monotonic()
        if hit and now < hit[0]:
            return hit[1]
        try:
            await resolve_checked(to.host, to.port, self.allow_private, timeout_s=self.dns_timeout_s)
            err, ttl = None, self.ttl_s
        except FetchError as e:
            if e.retryable:
                # A DNS hiccup is not a verdict: the pipeline's fetch stage
                # retries it and dead-letters it if it persists. Remembered
                # only briefly, so a resolver outage is not asked per event.
                err, ttl = None, min(5.0, self.ttl_s)
            else:
                err, ttl = e, self.ttl_s
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[to.key] = (now + ttl, err)
        return err


# --------------------------------------------------------------------------
# Sinks and the emitter
# --------------------------------------------------------------------------
# Sends block up to the producer's max_block_ms (10 s) while the broker is
# away: in threads of their own, not the loop's default pool (6 threads on 2
# cores), where a process's many streams would take every thread and hold
# the other work there (DNS lookups of reconnecting streams among it).
_SEND_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="connector-send")


async def _in_send_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_SEND_THREADS, fn, *args)


class Stopped(Exception):
    """The connector was stopped while a connect or request was waiting; that wait was cancelled."""


async def unless_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T:
    """``aw``'s result, or ``Stopped`` as soon as ``stop`` is set (``aw`` is
    then cancelled). For waits on the platform (a connect, a REST request)
    that may last up to their timeouts (``idle_timeout_s``: a minute) on a
    server that accepts and then says nothing: SIGTERM must not wait them out.
    Only network waits go through here, never a send or checkpoint, whose
    cancellation would leave a sink call running behind the next one."""
    task = asyncio.ensure_future(aw)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task in done:
        return task.result()
    task.cancel()
    # Let it unwind (close its socket) before going on; what it raises on the way is moot.
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved, so that asyncio does not log it as never retrieved
    raise Stopped()


class Sink(Protocol):
    # ``send``, ``dead_letter`` and ``flush`` may block (a broker that is down)
    # and are called from worker threads (``Emitter``): one call at a time per
    # emitter, but emitters sharing one sink call it concurrently.
    def send(self, event: ImageEvent) -> None: ...
    def dead_letter(self, dl: DeadLetter) -> None: ...
    def flush(self) -> None:
        """Block until everything sent is acknowledged; raise if it cannot be."""
        ...
    def close(self) -> None: ...


class Emitter:
    """Dedupe, policy-check and send mapped events; checkpoint the cursor."""

    def __init__(self, connector: str, stream: str, state: ConnectorState, sink: Sink, policy: UrlPolicy,
                 cfg: ConnectorSettings, *, cursor_time: Callable[[str], float] | None = None,
                 max_cursor_ahead_s: float = DEFAULT_CURSOR_AHEAD_S):
        self.connector = connector
        self.stream = stream
        self.state = state
        self.sink = sink
        self.policy = policy
        self.cfg = cfg
        # exported at 0 from the start: increase() over a series that first appears at 1 reads 0
        CURSOR_AHEAD.labels(connector)
        # cursor -> event time (unix seconds): for the lag gauge, and to refuse a cursor from the future
        self._cursor_time = cursor_time
        self.max_cursor_ahead_s = max_cursor_ahead_s
        self._ahead_warned_at: float | None = None
        self._ahead_unlogged = 0
        self._cursor: str | None = self._saved_cursor()
        self._lag_of: float | None = None  # the event time of the last checkpointed cursor (unix seconds)
        self._confirmed_cursor(self._cursor)
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        self.counts: dict[str, int] = {}
        # How this stream's sessions ended, by reason ("connect_failed", "http_503", "stopped", ...;
        # ``reconnect_loop``), and whether one ever got a stream (set by the connector as it
        # connects): a run that never connected is told from a quiet one by them.
        self.session_ends: collections.Counter[str] = collections.Counter()
        self.connected = False
        # Sends not yet acknowledged, by outcome (produced, refused): counted
        # when a checkpoint confirms them, dropped by a rollback (the re-read
        # sends them again and they are counted then).
        self._unconfirmed: dict[str, int] = {}
        # Told True once everything read so far is confirmed (a checkpoint), False
        # on a rollback: a position a connector keeps of its own (an SSE id to
        # resume from) must go back with the cursor, or the resume skips the
        # events the broker never acknowledged.
        self.on_checkpoint: list[Callable[[bool], None]] = []
        self._refused_log = LogThrottle()

    @property
    def cursor(self) -> str | None:
        return self._cursor

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        FRAMES.labels(self.connector, outcome, self.stream).inc()

    def _event(self, outcome: str, n: int = 1) -> None:
        self.counts[f"events_{outcome}"] = self.counts.get(f"events_{outcome}", 0) + n
        EVENTS.labels(self.connector, outcome).inc(n)

    def _sent(self, outcome: str) -> None:
        self._unconfirmed[outcome] = self._unconfirmed.get(outcome, 0) + 1

    @property
    def unsaved(self) -> bool:
        """Whether a checkpoint has something to confirm or save (events
        sent, a cursor moved, handles resolved)."""
        return self._dirty or self.state.pending > 0 or self.state.unsaved_handles

    async def apply(self, mapped: Mapped) -> None:
        self.count(mapped.outcome)
        if mapped.clipped:
            self._event("clipped", mapped.clipped)
        if mapped.forget:
            self.state.forget(mapped.forget)
        if mapped.remember:
            self.state.remember(*mapped.remember)
        await self.emit(mapped.events)
        if mapped.cursor is not None:
            self.advance(str(mapped.cursor))
        await self.maybe_checkpoint()

    async def emit(self, events: Iterable[ImageEvent]) -> None:
        # Sends in a worker thread: kafka-python's ``send`` blocks up to
        # ``max_block_ms`` (10 s) while it has no partitions for the topic (a
        # broker back without its topics), which on the loop stalled every
        # other connector of the process, the metrics beats and SIGTERM. Each
        # is awaited before the next, so one connector's events keep their
        # order. The hop costs 50-150 us an event (a connector still moves
        # thousands a second); a frame maps to about one event, so batching
        # per ``emit`` would not save it.
        for ev in events:
            if self.state.seen(ev.event_id):
                self._event("duplicate")
                continue
            refused = await self.policy.check(ev.image.url) if ev.image.url else None
            if refused is not None:
                try:
                    await _in_send_thread(self.sink.dead_letter, DeadLetter.of(
                        "fetch", refused.reason, f"refused by the {self.connector} connector: {refused.detail}",
                        ev.dumps(), event_id=ev.event_id,
                    ))
                except Exception as e:
                    self._rollback()
                    raise SinkError(f"{type(e).__name__}: {e}") from e
                if (suppressed := self._refused_log.allow()) is not None:
                    log.warning("image URL refused by fetch policy", extra={
                        "connector": self.connector, "event_id": ev.event_id, "reason": refused.reason,
                        "suppressed": suppressed})
                self._sent("refused")
            else:
                try:
                    await _in_send_thread(self.sink.send, ev)
                except Exception as e:
                    self._rollback()
                    raise SinkError(f"{type(e).__name__}: {e}") from e
                self._sent("produced")
            self.state.mark_pending(ev.event_id)

    def advance(self, cursor: str) -> None:
        """Move the cursor to ``cursor``, never back: the frames of a resume
        overlap (Jetstream re-sends ``cursor_overlap_s`` before the saved
        cursor) would otherwise move it back, and a stream of short
        connections walked the saved cursor further back with each. Nor to
        a cursor further in the future than a clock's skew explains
        (``DEFAULT_CURSOR_AHEAD_S``): the frame's events are still sent."""
        if self._cursor is not None and _before(cursor, self._cursor):
            return
        if self._ahead(cursor) is not None:
            CURSOR_AHEAD.labels(self.connector).inc()
            self.counts["cursor_ahead"] = self.counts.get("cursor_ahead", 0) + 1
            self._warn_ahead(cursor)
            return
        self._cursor = cursor
        self._dirty = True

    def _ahead(self, cursor: str) -> float | None:
        """How many seconds ``cursor`` lies ahead of the wall clock, if more
        than ``max_cursor_ahead_s`` (inf: no time at all can be read from it),
        else None. Without ``cursor_time`` every cursor is taken."""
        if self._cursor_time is None:
            return None
        try:
            ahead = self._cursor_time(cursor) - time.time()
        except (ValueError, OverflowError):  # "9" * 400 as time_us: no float holds it
            return math.inf
        return ahead if not ahead <= self.max_cursor_ahead_s else None  # NaN too

    def _warn_ahead(self, cursor: str) -> None:
        # A relay whose clock runs ahead sends every frame so: one warning a minute, with the count.
        self._ahead_unlogged += 1
        now = time.monotonic()
        if self._ahead_warned_at is not None and now - self._ahead_warned_at < 60.0:
            return
        log.warning("a frame's position lies in the future; the cursor stays where it was (a wrong clock on "
                    "the platform or here, a crafted frame, or a server whose ids are not Mastodon's "
                    "time-based ids)", extra={
                        "connector": self.connector, "position": cursor[:40], "cursor": self._cursor,
                        "frames": self._ahead_unlogged, "max_ahead_s": self.max_cursor_ahead_s})
        self._ahead_warned_at, self._ahead_unlogged = now, 0

    def _confirmed_cursor(self, cursor: str | None) -> None:
        """Note the event time of a checkpointed cursor for the lag gauge;
        the gauge's series appears with the first one."""
        if self._cursor_time is None or cursor is None:
            return
        try:
            at = float(self._cursor_time(cursor))
        except (ValueError, OverflowError):
            return
        first = self._lag_of is None
        self._lag_of = at
        if first:
            CURSOR_LAG.labels(self.connector, self.stream).set_function(self._lag)

    def _lag(self) -> float:
        # Called by the metrics endpoint's thread: only attributes, never the state's SQLite.
        at = self._lag_of
        return 0.0 if at is None else max(0.0, time.time() - at)

    def _saved_cursor(self) -> str | None:
        """The saved cursor, unless it lies in the future (saved by a version
        that took any cursor): resuming from it would skip, and it would
        hold the cursor there for good. Then the stream starts without one."""
        saved = self.state.cursor(self.stream)
        if saved is not None and self._ahead(saved) is not None:
            log.error("the saved cursor lies in the future; starting without it (what was missed since the "
                      "last good cursor is not read again)", extra={
                          "connector": self.connector, "stream": self.stream, "saved": saved[:40]})
            return None
        return saved

    async def maybe_checkpoint(self) -> None:
        if self.state.pending >= self.cfg.checkpoint_every or (
            self.unsaved and time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_interval_s
        ):
            await self.checkpoint()

    def _rollback(self) -> None:
        # Nothing unacknowledged is recorded as seen and the cursor goes back
        # to where the broker last confirmed: the resume re-reads the window.
        self.state.drop_pending()
        self._unconfirmed.clear()
        self._cursor = self._saved_cursor()
        self._dirty = False
        for hook in self.on_checkpoint:
            hook(False)

    async def checkpoint(self) -> None:
        if not self.unsaved:
            for hook in self.on_checkpoint:
                hook(True)  # nothing unconfirmed: all that was read is as good as saved
            return
        try:
            await _in_send_thread(self.sink.flush)
        except Exception as e:
            self._rollback()
            raise SinkError(f"{type(e).__name__}: {e}") from e
        self.state.commit(self.stream, self._cursor)
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        confirmed, self._unconfirmed = self._unconfirmed, {}
        for outcome, n in confirmed.items():
            self._event(outcome, n)
        for hook in self.on_checkpoint:
            hook(True)
        self._confirmed_cursor(self._cursor)


def _before(a: str, b: str) -> bool:
    """Whether cursor ``a`` is before ``b``. Both connectors' cursors are
    integers (Jetstream's time_us, Mastodon's status ids); anything else is
    not ordered here, and moves the cursor as before."""
    try:
        return int(a) < int(b)
    except ValueError:
        return False


async def reconnect_loop(connector: str, session, emitter: Emitter, cfg: ConnectorSettings,
                         stop: asyncio.Event) -> None:
    """Run ``session(stop, backoff) -> reason`` until ``stop``, with backoff
    between sessions. Broker trouble (``SinkError``) ends a session like a
    network error: the emitter has rolled back, the next session resumes from
    the last checkpoint, except a closed output (``BrokenPipeError``), which
    ends the run. Only what retrying cannot fix propagates."""
    backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
    log_ = logging.getLogger(f"deepwatch.connectors.{connector}")
    try:
        while not stop.is_set():
            try:
                reason = await session(stop, backoff)
                await emitter.checkpoint()
            except SinkError as e:
                if isinstance(e.__cause__, BrokenPipeError):
                    # stdout (``--dry-run | head``) is gone for good: retrying
                    # would only reconnect to the platform forever.
                    log_.error("output closed; stopping", extra={"connector": connector, "cursor": emitter.cursor})
                    break
                reason = "sink_failed"
                log_.warning("broker did not acknowledge; resuming from the last checkpoint",
                             extra={"connector": connector, "error": str(e)[:300], "cursor": emitter.cursor})
            emitter.session_ends[reason] += 1
            if stop.is_set():
                break
            RECONNECTS.labels(connector, reason).inc()
            wait = backoff.next()
            log_.info("reconnecting", extra={"connector": connector, "reason": reason, "wait_s": round(wait, 2),
                                             "cursor": emitter.cursor})
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
    finally:
        try:
            await emitter.checkpoint()
        except SinkError as e:
            log_.warning("final checkpoint failed; the next run re-reads from the last saved cursor",
                         extra={"connector": connector, "error": str(e)[:300], "cursor": emitter.cursor})
