"""``deepwatch serve-ingest``: an authenticated HTTP endpoint for tiplines,
scrapers and partner feeds.

``POST /ingest`` takes one schema-v1 event (``Content-Type:
application/json``) or many (NDJSON: one event per line, any other content
type). Every line gets a result: ``accepted`` (produced to the events topic)
or ``dead_lettered`` (the reason and detail are in the response AND on the
dead-letter topic, so a rejected line is never just lost). A line that repeats
an earlier line's event id with other content is dead-lettered
(``duplicate_event_id``): the pipeline would count it as a retry of the first
and drop it. The answer is 202 because acceptance means "durably queued", not
"analysed".

Auth: bearer tokens from the environment only (``DEEPWATCH_INGEST_TOKENS`` =
``NAME:TOKEN[,NAME:TOKEN...]``); the NAME appears in logs and metrics, never
the token. Limits: body bytes and lines per request, and a token bucket per
token (events per second). When the broker cannot take the batch within
``ingest_broker_timeout_s`` the whole request is answered 503 with
Retry-After, and the client re-sends it (event ids make that idempotent).
Memory: request bodies held at once, all requests together, stay within
``ingest_max_buffered_bytes``, and with several token names no one of them
holds over half of it. Bytes count as they arrive; a request that would go
over is answered 503 "busy" with Retry-After at once (with a Content-Length
that cannot fit, before its body is read), as is an authenticated request
while ``MAX_IN_FLIGHT`` are at work. At most ``MAX_CONNECTIONS`` connections
are held open: one more closes the oldest with no request at work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
import zlib
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import ClientDisconnect

from streams.connectors.base import TokenBucket, UrlPolicy
from streams.http_deadlines import HEADER_TIMEOUT_S, head_deadline_protocol
from streams.records import DeadLetter
from streams.safe_http import DNS_THREADS, FetchError
from streams.settings import Settings
from streams.tokens import MAKE_ONE, MIN_TOKEN_CHARS, TokenConfigError, presented, token_entries
from streams.validate import InvalidEvent, parse_event

log = logging.getLogger("deepwatch.ingest")

REQUESTS = Counter("deepwatch_ingest_requests_total", "HTTP ingest requests, by token name and status",
                   ["token", "status"])
LINES = Counter("deepwatch_ingest_lines_total", "HTTP ingest lines, by token name and outcome",
                ["token", "outcome"])
# Every answer, by status class: the slow ones are 503s (a broker that does not
# acknowledge within ingest_broker_timeout_s) and bodies that take up to the
# body timeout (60 s) to arrive; timing 202s alone hid both.
REQUEST_SECONDS = Histogram("deepwatch_ingest_request_seconds",
                            "Seconds from an HTTP ingest request's arrival to its answer, by status class (2xx "
                            "accepted, 4xx the client's doing, 5xx busy or broker unavailable)", ["class"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
BUFFERED_BYTES = Gauge("deepwatch_ingest_buffered_bytes",
                       "Request bytes the HTTP ingest endpoint holds in memory, all requests together")
# Requests answered 503 broker_unavailable, by cause: topic_missing (the broker
# answers, but the events or dead-letter topic does not exist: auto-creation is
# off and no worker, nor serve-ingest --create-topics, has created it) or
# unavailable (anything else: broker down, unreachable, too slow). The
# operator rules page on these (dashboards/rules.py).
BROKER_FAILURES = Counter("deepwatch_ingest_broker_failures_total",
                          "HTTP ingest requests refused because the broker did not take their events, by cause",
                          ["cause"])
BROKER_CAUSES = ("topic_missing", "unavailable")
for _cause in BROKER_CAUSES:  # at 0 from the start: a rule must see the first failure as an increase
    BROKER_FAILURES.labels(_cause)


# Slow clients: a request's head must arrive within HEADER_TIMEOUT_S
# (streams.http_deadlines), and its body within BODY_TIMEOUT_S of the head
# (8 MiB at ~140 KB/s).
BODY_TIMEOUT_S = 60.0
# The image URLs of one request are checked (``UrlPolicy``: their hosts
# resolved) all together within URL_CHECK_S, each distinct host once and at
# most URL_CHECK_CONCURRENCY at a time. One after the other, each waiting up
# to its 2 s DNS timeout, 500 lines held the request (and its memory) for
# over a quarter of an hour. A line whose check has not finished by then is
# accepted unchecked, as a line whose DNS answer is late always was: the
# fetch stage checks every address again before it connects.
URL_CHECK_S = 5.0
URL_CHECK_CONCURRENCY = DNS_THREADS
# Pieces one request body may arrive in (h11's Data events: a chunk of a
# chunked body, or what one read brought of a body with a Content-Length)
# while they average under MIN_PIECE_BYTES. h11 and uvicorn spend ~5 us of
# the event loop on each, whatever its size: a 2 MB body sent in 1-byte
# chunks held the loop 10.6 s (/healthz waited 3.2 s), an 8 MiB one ~40 s.
# 16,384 pieces cost ~80 ms; at 64 bytes or more on average a body of the
# largest size is at most 131,072 (8 MB in 80-byte chunks, ~100,000, was
# answered in 1.7 s, /healthz within 0.16 s meanwhile). A body sent in one
# go is a few hundred reads (8 MiB in 536-byte TCP segments, each read on
# its own, 15,650), NDJSON sent a chunk per line one per line.
MAX_BODY_PIECES = 16_384
MIN_PIECE_BYTES = 64
# Set in a request's ASGI scope when the protocol refused its body as too fragmented.
FRAGMENTED_KEY = "deepwatch.too_fragmented"
# Connections held open at once, idle ones included; one more closes the
# oldest idle one (or itself, when every one has a request at work). Well
# under a default 1,024 descriptors, as the desk's
# (streams.cli.serve.DESK_CONNECTIONS): 3,000 idle connections, no token
# needed, took 3,000 descriptors (audit).
MAX_CONNECTIONS = 600
# Requests at work at once (authenticated, between their head and their
# answer); more are answered 503 busy with Retry-After. This replaced
# uvicorn's limit_concurrency, which counts open connections: 256 idle ones
# opened by anybody made every token holder's request a bare text/plain 503,
# without Retry-After and in no metric (audit).
MAX_IN_FLIGHT = 256
# How long a stop (SIGTERM) waits for requests at work: a slow body may take
# BODY_TIMEOUT_S, and a stop waited for it (over 20 s in the audit) while an
# orchestrator's own grace (Kubernetes: 30 s) ran out. A request cut short
# was not acknowledged: its client re-sends it.
SHUTDOWN_GRACE_S = 10


def load_tokens(env_name: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``NAME:TOKEN,NAME:TOKEN`` from the environment -> {token: name}
    (``streams.tokens.token_entries``: blanks around names and tokens
    dropped, a token with blanks inside or under 16 characters refused). A
    bare ``TOKEN`` is named ``token-<n>`` by its place in the list."""
    tokens: dict[str, str] = {}
    for i, parts in enumerate(token_entries(env_name, 2, environ)):
        if len(parts) == 2:
            tokens[parts[1]] = parts[0]
            continue
        item = parts[0]
        if any(c.isspace() for c in item):
            raise TokenConfigError(f"{env_name}: entry {i + 1} contains whitespace, which no bearer token has; "
                                   "separate entries with commas: NAME:TOKEN,NAME:TOKEN")
        if len(item) < MIN_TOKEN_CHARS:  # "tipline" alone: the token was forgotten, not short
            raise TokenConfigError(f"{env_name}: entry {i + 1} is not NAME:TOKEN (no ':'), and as a bare token it is "
                                   f"shorter than {MIN_TOKEN_CHARS} characters; write NAME:TOKEN with e.g. {MAKE_ONE} "
                                   "as the token")
        tokens[item] = f"token-{i + 1}"
    return tokens


@dataclass
class LineResult:
    line: int
    status: str  # accepted | dead_lettered (only a dead-lettered line has a reason and detail)
    event_id: str | None = None
    reason: str | None = None
    detail: str | None = None
    url_checked: bool | None = None  # False on an accepted line whose URL check did not finish in time

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class BrokerUnavailable(RuntimeError):
    pass


class TopicsMissing(BrokerUnavailable):
    """The broker answers, but topics the endpoint produces to do not exist."""

    def __init__(self, topics: list[str]):
        self.topics = topics
        super().__init__(f"topic(s) missing on the broker: {', '.join(topics)}")


class BrokerGate:
    """One producer shared by all requests, created on first use and
    re-created after a failure; calls are serialised because a batch's
    acknowledgement must be its own.

    With the broker down each call waits up to ``timeout_s`` for it, so
    callers queued behind each other would wait for all of those before
    them in turn (the 10th client ~10 timeouts). A call waits at most
    ``timeout_s`` for its turn, and for ``timeout_s`` after a failure calls
    fail at once instead of asking the broker again."""

    def __init__(self, factory: Callable[[], Any], timeout_s: float = 5.0,
                 missing_topics: Callable[[], list[str] | None] | None = None):
        self._factory = factory
        self._timeout_s = timeout_s
        self._sink = None
        self._failed_at: float | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        # Which topics the broker lacks ([]: none, None: no answer); asked before a
        # new sink is used and after a failed produce.
        self._missing_topics = missing_topics
        self.state = "untried"  # ok | topic_missing | unavailable (for /healthz)

    def _ask_missing(self) -> list[str] | None:
        if self._missing_topics is None:
            return None
        try:
            return self._missing_topics()
        except Exception:
            return None

    def _failed(self, e: BaseException, missing: list[str] | None = None) -> BaseException:
        """Note a failure; the error to raise (TopicsMissing when ``missing``)."""
        self._failed_at = time.monotonic()
        if missing:
            failure: BaseException = TopicsMissing(missing)
            self.state = "topic_missing"
        else:
            failure = e
            self.state = "unavailable"
        self._failure = failure
        return failure

    def _connect(self) -> Any:
        """A new sink, once the broker has every topic: some brokers (Tansu)
        create a topic a producer asks about, whatever the producer says, and
        with their own partition count. Asked after the producer connected,
        so that a broker that is gone costs one wait, not two."""
        try:
            sink = self._factory()
        except Exception as e:
            self._failed(e)
            raise
        missing = self._ask_missing()
        if missing:
            try:
                sink.close()
            except Exception:
                pass
            raise self._failed(BrokerUnavailable("topics missing"), missing)
        return sink

    def produce(self, accepted: list[tuple[bytes | None, bytes]], dead: list[DeadLetter]) -> None:
        if not self._lock.acquire(timeout=self._timeout_s):
            raise BrokerUnavailable(f"no turn at the broker within {self._timeout_s:g}s")
        try:
            if self._failed_at is not None and time.monotonic() - self._failed_at < self._timeout_s:
                if isinstance(self._failure, TopicsMissing):
                    raise TopicsMissing(self._failure.topics)
                raise BrokerUnavailable("the broker failed moments ago")
            if self._sink is None:
                self._sink = self._connect()
            try:
                for key, value in accepted:
                    self._sink.send_raw(key, value)
                for dl in dead:
                    self._sink.dead_letter(dl)
                self._sink.flush()
                self._failed_at, self._failure = None, None
                self.state = "ok"
            except Exception as e:
                sink, self._sink = self._sink, None
                _close_aside(sink)
                # kafka-python says "Failed to update metadata after N secs" for a
                # topic deleted meanwhile, the same words as for a broker gone: ask.
                failure = self._failed(e, self._ask_missing())
                if failure is e:
                    raise
                raise failure from e
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._sink is not None:
                self._sink.close()
                self._sink = None


def _close_aside(sink: Any) -> None:
    """Close a failed sink on a thread of its own: closing waits for what it
    still holds (KafkaSink: up to 5 s), and in the request's path it made a
    broker outage's 503 take 12 s with a 5 s ingest_broker_timeout_s (audit)."""
    def close() -> None:
        try:
            sink.close()
        except Exception:
            pass

    threading.Thread(target=close, name="ingest-sink-close", daemon=True).start()


class BufferBudget:
    """Request bytes held in memory by all requests together. The body limit
    bounds one request, but ``MAX_IN_FLIGHT`` (256) run at once: without a shared
    budget, token holders sending maximal bodies could take gigabytes.

    ``per_token``: the most one token name may hold, so that one token holder
    cannot fill the budget and lock every other one out (default: all of it).

    Used only from the event loop (never from the thread pool), so it needs
    no lock: nothing else runs between a check and its update."""

    def __init__(self, limit: int, per_token: int | None = None):
        self.limit = limit
        self.per_token = limit if per_token is None else per_token
        self.held = 0
        self.by_token: dict[str, int] = {}

    @contextmanager
    def hold(self, token: str) -> Iterator["Hold"]:
        """One request's share, given back however the request ends
        (answered, refused, timed out, client gone, exception)."""
        share = Hold(self, token)
        try:
            yield share
        finally:
            self.held -= share.bytes
            left = self.by_token.get(token, 0) - share.bytes
            if left > 0:
                self.by_token[token] = left
            else:
                self.by_token.pop(token, None)
            BUFFERED_BYTES.dec(share.bytes)
            share.bytes = 0


class Hold:
    def __init__(self, budget: BufferBudget, token: str):
        self._budget = budget
        self._token = token
        self.bytes = 0

    def fits(self, n: int) -> bool:
        """Whether ``n`` more bytes would fit, both in the server's budget and
        in this token's share of it. A request alone (of all, or of its
        token's) may go over: otherwise a budget below the body limit would
        refuse a large request for good, however long its client waited."""
        budget = self._budget
        mine = budget.by_token.get(self._token, 0)
        over_all = budget.held + n > budget.limit and budget.held > self.bytes
        over_share = mine + n > budget.per_token and mine > self.bytes
        return not (over_all or over_share)

    def more(self, n: int) -> bool:
        """Reserve ``n`` more bytes; False, reserving nothing, if they do not fit."""
        if not self.fits(n):
            return False
        budget = self._budget
        self.bytes += n
        budget.held += n
        budget.by_token[self._token] = budget.by_token.get(self._token, 0) + n
        BUFFERED_BYTES.inc(n)
        return True


def _sink_factory(settings: Settings) -> Callable[[], Any]:
    from streams.broker import bootstrap_of
    from streams.connectors.sinks import KafkaSink

    timeout_ms = int(settings.connectors.ingest_broker_timeout_s * 1000)

    def make():
        return KafkaSink(bootstrap_of(settings.broker), settings, client_id="deepwatch-ingest-http",
                         max_block_ms=timeout_ms, request_timeout_ms=timeout_ms,
                         flush_timeout_s=settings.connectors.ingest_broker_timeout_s,
                         bootstrap_timeout_ms=timeout_ms,
                         # a topic made on first use gets the broker's partition count, not deepwatch's
                         # (streams.broker); a missing one is reported instead (TopicsMissing)
                         auto_create_topics=False)

    return make


def _missing_topics_probe(settings: Settings) -> Callable[[], list[str] | None]:
    """The endpoint's topics the broker lacks ([]: it has them all; None: it
    did not answer in time), asked with a short deadline (a request is
    waiting for its answer)."""
    from streams.broker import admin_client, bootstrap_of

    names = [settings.topic("events"), settings.topic("dead-letters")]
    timeout_s = min(2.0, settings.connectors.ingest_broker_timeout_s)

    def probe() -> list[str] | None:
        try:
            admin = admin_client(bootstrap_of(settings.broker), settings, client_id="deepwatch-ingest-http",
                                 timeout_s=timeout_s)
        except Exception:
            return None
        try:
            existing = set(admin.list_topics())
        except Exception:
            return None
        finally:
            try:
                admin.close()
            except Exception:
                pass
        return [n for n in names if n not in existing]

    return probe


# Concatenated gzip files are one valid gzip body (RFC 1952: a series of
# members); each member costs a fresh inflater, so a body of thousands of empty
# 20-byte members would spend seconds of the event loop for no events at all.
MAX_GZIP_MEMBERS = 10_000
# zlib copies the input left after a member's end (unused_data): fed whole, a
# body of many members was copied once per member; fed in steps, the copy is small.
_GZIP_STEP = 64 * 1024


def _gunzip(body: bytes, limit: int) -> tuple[bytes, tuple[int, dict[str, str]] | None]:
    """A gzip body, every member of it, inflated to at most ``limit`` bytes in
    all (the body limit holds for what the events are, not for what was
    sent: a small bomb must not inflate to gigabytes), or the (status,
    answer) refusing it: bytes after a member that are not another member
    are refused, never ignored (the events in them would be lost unseen)."""
    def bad(detail: str) -> tuple[bytes, tuple[int, dict[str, str]]]:
        return b"", (400, {"error": "bad_gzip", "detail": detail})

    inflater = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
    members, size, out = 1, 0, []
    view = memoryview(body)
    for start in range(0, len(body), _GZIP_STEP):
        data = view[start:start + _GZIP_STEP]
        while data:
            if inflater.eof:  # a member ended and bytes follow: another member must start here
                members += 1
                if members > MAX_GZIP_MEMBERS:
                    return bad(f"more than {MAX_GZIP_MEMBERS} gzip members in one body")
                inflater = zlib.decompressobj(wbits=31)
            try:
                piece = inflater.decompress(data, limit + 1 - size)
            except zlib.error as e:
                if members == 1:
                    return bad(f"Content-Encoding gzip, but the body is not gzip: {e}")
                return bad(f"the bytes after gzip member {members - 1} are not another gzip member: {e}")
            size += len(piece)
            if size > limit:
                return b"", (413, {"error": "too_large", "detail": f"body over {limit} bytes once decompressed"})
            out.append(piece)
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    if not inflater.eof:
        return bad("the gzip body is cut short")
    return b"".join(out), None


_EVENT_LINE = re.compile(rb"\S[^\n]*")  # from a line's first non-blank byte to its end


def _event_lines(body: bytes, limit: int) -> list[tuple[int, bytes]]:
    """The non-blank lines, stripped and numbered from 1, but no more than
    ``limit`` + 1: splitting an 8 MiB body of 3-byte lines up front made
    ~375 MiB of Python objects before the line limit refused it."""
    found: list[tuple[int, bytes]] = []
    line, pos = 1, 0
    for m in _EVENT_LINE.finditer(body):
        line += body.count(b"\n", pos, m.start())
        pos = m.start()
        found.append((line, m.group().rstrip()))
        if len(found) > limit:
            break
    return found


def _validate_lines(numbered: list[tuple[int, bytes]]) -> list[tuple[int, bytes, tuple]]:
    """(line, raw, what) for each numbered line: what is (event id, image URL)
    for a valid event, or a rejection's (event id, stage, reason, detail).
    Not the events themselves: their inline images would be a second,
    unbudgeted copy of the lines. Runs in a worker thread (CPU only)."""
    checked: list[tuple[int, bytes, tuple]] = []
    for n, raw in numbered:
        try:
            event = parse_event(raw)
        except InvalidEvent as e:
            checked.append((n, raw, (e.event_id, "validate", e.reason, e.detail)))
            continue
        if event.image.path is not None or event.image.blob is not None:
            # A remote caller must never make the pipeline read files on its
            # host, nor name pictures already in its blob store.
            which = "path" if event.image.path is not None else "blob"
            checked.append((n, raw, (event.event_id, "validate", f"{which}_not_allowed",
                                     f"image.{which} is not accepted over HTTP; send url or base64")))
            continue
        checked.append((n, raw, (event.event_id, event.image.url)))
        del event
    return checked


async def check_urls(policy: UrlPolicy, urls: list[str], deadline_s: float,
                     concurrency: int = URL_CHECK_CONCURRENCY) -> tuple[dict[Any, FetchError | None], set[Any]]:
    """``policy``'s verdicts on ``urls`` by ``UrlPolicy.key``, each key checked
    once, ``concurrency`` at a time, all within ``deadline_s``; and the keys
    whose check did not finish by then (or failed)."""
    firsts: dict[Any, str] = {}
    for url in urls:
        firsts.setdefault(UrlPolicy.key(url), url)
    gate = asyncio.Semaphore(concurrency)

    async def one(url: str) -> FetchError | None:
        async with gate:
            return await policy.check(url)

    tasks = {key: asyncio.ensure_future(one(url)) for key, url in firsts.items()}
    try:
        if tasks:
            await asyncio.wait(tasks.values(), timeout=deadline_s)
    finally:
        late = [t for t in tasks.values() if not t.done()]
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    verdicts: dict[Any, FetchError | None] = {}
    unchecked: set[Any] = set()
    for key, task in tasks.items():
        if task.cancelled():
            unchecked.add(key)
        elif task.exception() is not None:
            log.warning("image URL check failed", extra={"error": f"{type(task.exception()).__name__}: "
                                                                  f"{task.exception()}"[:300]})
            unchecked.add(key)
        else:
            verdicts[key] = task.result()
    return verdicts, unchecked


def build_app(settings: Settings, tokens: dict[str, str], *, sink_factory: Callable[[], Any] | None = None,
              body_timeout_s: float = BODY_TIMEOUT_S, public_metrics: bool = True,
              missing_topics: Callable[[], list[str] | None] | None = None,
              url_check_s: float = URL_CHECK_S, max_in_flight: int = MAX_IN_FLIGHT) -> FastAPI:
    """The ASGI app. ``tokens`` maps token -> name (see ``load_tokens``).
    ``public_metrics``: answer GET /metrics here too; off when they are served
    on a port of their own (token names are in their labels).
    ``missing_topics``: which topics the broker lacks, asked before a new
    producer is used and after a failed produce (default: asked of the broker
    when ``sink_factory`` is not given). ``url_check_s``: how long one
    request's image URL checks may take, all together (``URL_CHECK_S``).
    ``max_in_flight``: authenticated requests at work at once, more are
    answered 503 busy (``MAX_IN_FLIGHT``); with several token names, half
    of them at most for one name."""
    if not tokens:
        raise TokenConfigError(f"no ingest tokens: set {settings.connectors.ingest_tokens_env}=NAME:TOKEN[,...]")
    cfg = settings.connectors
    if missing_topics is None and sink_factory is None:
        missing_topics = _missing_topics_probe(settings)
    gate = BrokerGate(sink_factory or _sink_factory(settings), cfg.ingest_broker_timeout_s, missing_topics)
    for token_name in set(tokens.values()):  # at 0 from the start, so that rules see a token's first 503
        for status in ("202", "503"):
            REQUESTS.labels(token_name, status)
    policy = UrlPolicy(settings.fetch)
    buckets = {name: TokenBucket(cfg.ingest_rate_per_s, cfg.ingest_burst) for name in tokens.values()}
    retry_after = str(max(1, math.ceil(cfg.ingest_broker_timeout_s)))
    # With several token holders none may hold over half the budget: one of
    # them sending slowly on many connections must leave room for the others.
    several = len(set(tokens.values())) > 1
    budget = BufferBudget(cfg.ingest_max_buffered_bytes,
                          cfg.ingest_max_buffered_bytes // 2 if several else None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        from streams import metrics

        beats = asyncio.create_task(metrics.beat_forever())  # for the liveness probe on the metrics port
        try:
            yield
        finally:
            beats.cancel()
        await run_in_threadpool(gate.close)

    app = FastAPI(title="deepwatch ingest", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    if public_metrics:
        @app.get("/metrics")
        def metrics_endpoint() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
    app.state.gate = gate
    app.state.budget = budget

    def who(request: Request) -> str | None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        return presented(tokens, given)

    def answer(token: str, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
        REQUESTS.labels(token, str(status)).inc()
        return JSONResponse(doc, status_code=status, headers=headers)

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # uptime checkers send HEAD
    def healthz() -> dict[str, str]:
        # 200 while the process serves (it is the liveness probe too: a restart
        # cures neither a missing topic nor a broker outage). "broker" is how
        # the last hand-over to the broker went: untried | ok | topic_missing
        # (create the topics: a worker, or serve-ingest --create-topics) | unavailable.
        # Anyone may ask: the why (the broker's address, its security protocol,
        # an exception's text) is in the log line of the request that failed.
        return {"status": "ok", "broker": gate.state}

    def busy(name: str, what: str = "request bodies") -> JSONResponse:
        # A body is held at most body_timeout_s to arrive, url_check_s for its URL checks and the broker's
        # timeout (ingest_broker_timeout_s) to be produced; most go far sooner, so soon is worth a retry.
        return answer(name, 503, {"error": "busy", "detail": f"the endpoint holds as many {what} as it "
                                  "may; nothing was accepted, re-send this request shortly"}, {"Retry-After": "1"})

    # Requests at work, all and by token name; only touched on the event loop, like the budget. With
    # several token holders none may have over half of them: one sending slowly on many connections
    # must leave room for the others, as with the budget.
    in_flight: dict[str | None, int] = {None: 0}
    token_in_flight = max(1, max_in_flight // 2) if several else max_in_flight

    @app.post("/ingest")
    async def ingest(request: Request) -> JSONResponse:
        started = time.monotonic()
        resp = await answered(request, started)
        REQUEST_SECONDS.labels(f"{resp.status_code // 100}xx").observe(time.monotonic() - started)
        return resp

    async def answered(request: Request, started: float) -> JSONResponse:
        name = who(request)
        if name is None:
            return answer("-", 401, {"error": "unauthorized", "detail": "send Authorization: Bearer <token>"},
                          {"WWW-Authenticate": 'Bearer realm="deepwatch-ingest"'})
        if in_flight[None] >= max_in_flight or in_flight.get(name, 0) >= token_in_flight:
            return busy(name, "requests")
        in_flight[None] += 1
        in_flight[name] = in_flight.get(name, 0) + 1
        try:
            with budget.hold(name) as hold:
                try:
                    return await handle(request, name, started, hold)
                except ClientDisconnect:
                    if request.scope.get(FRAGMENTED_KEY):
                        # the protocol answered it 400 and closed the connection (_ingest_protocol): counted
                        # as what the client got, not as a client gone
                        return answer(name, 400, {"error": "too_fragmented"})
                    # Nobody to answer; caught only so that it is not logged as a server error.
                    log.info("client went away mid-request", extra={"token": name})
                    return answer(name, 499, {"error": "client_disconnected"})
        finally:
            in_flight[None] -= 1
            in_flight[name] -= 1

    async def handle(request: Request, name: str, started: float, hold: Hold) -> JSONResponse:
        declared = request.headers.get("content-length")
        declared_n = int(declared) if declared and declared.isdigit() else None
        if declared_n is not None and declared_n > cfg.ingest_max_body_bytes:
            return answer(name, 413, {"error": "too_large", "detail": f"body over {cfg.ingest_max_body_bytes} bytes"})
        # A body that could not fit now is refused before it is read, but bytes
        # are reserved only as they arrive: a declared length costs nothing to
        # send, and 8 requests declaring 8 MiB that never came held the whole
        # budget, every other client answered busy, for the body timeout.
        if declared_n is not None and not hold.fits(declared_n):
            return busy(name)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cfg.ingest_max_body_bytes:
                        return answer(name, 413, {"error": "too_large",
                                                  "detail": f"body over {cfg.ingest_max_body_bytes} bytes"})
                    if chunk and not hold.more(len(chunk)):
                        return busy(name)
                    chunks.append(chunk)
        except TimeoutError:
            log.warning("slow request body; connection closed", extra={"token": name, "bytes": size})
            return answer(name, 408, {"error": "body_timeout", "detail": f"the body did not arrive within "
                                      f"{body_timeout_s:g}s; nothing was accepted, re-send this request"},
                          {"Connection": "close"})
        except asyncio.CancelledError:
            # uvicorn cancels what is still at work SHUTDOWN_GRACE_S into a stop; a body still
            # arriving then is most of them. Nothing was produced: say so rather than let the
            # cancellation end as an "Exception in ASGI application" traceback per request.
            log.info("stopping; request cut short while its body arrived", extra={"token": name, "bytes": size})
            return answer(name, 503, {"error": "stopping", "detail": "the endpoint is stopping; nothing was "
                                      "accepted, re-send this request"}, {"Connection": "close", "Retry-After": "1"})
        body = b"".join(chunks)
        del chunks  # one copy of the body at a time, not the chunks and the joined body too
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding == "gzip":
            body, problem = _gunzip(body, cfg.ingest_max_body_bytes)
            if problem is not None:
                return answer(name, *problem)
            # The inflated body is reserved after the fact, but inflating never
            # awaits: at most one unreserved body (within the body limit) exists
            # at any moment, and it is dropped here if the budget cannot take it.
            # The compressed bytes stay counted: a small margin on the safe side.
            if not hold.more(len(body)):
                return busy(name)
        elif encoding not in ("", "identity"):
            # Read as it is, a compressed body would be dead-lettered line by line as "malformed JSON".
            return answer(name, 415, {"error": "unsupported_encoding",
                                      "detail": f"Content-Encoding {encoding!r}: send gzip or an uncompressed body"})
        single = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        # More than the bucket ever holds could never pass: not "retry later" but "split it".
        limit = min(cfg.ingest_max_lines, cfg.ingest_burst)
        numbered = [(1, body.strip())] if single else _event_lines(body, limit)
        # The lines are the copy kept while the events are checked (URL checks
        # may wait on DNS), so the body goes now.
        del body
        if not numbered or not numbered[0][1]:
            return answer(name, 400, {"error": "empty", "detail": "no events in the body"})
        if len(numbered) > limit:
            return answer(name, 413, {"error": "too_many_lines",
                                      "detail": f"more than {limit} events; the limit is {limit} per request"})
        wait = buckets[name].take(len(numbered))
        if wait > 0:
            return answer(name, 429, {"error": "rate_limited", "detail": f"over {cfg.ingest_rate_per_s}/s for {name}"},
                          {"Retry-After": str(max(1, math.ceil(min(wait, 3600))))})

        results: list[LineResult] = []
        accepted: list[tuple[bytes | None, bytes]] = []
        dead: list[DeadLetter] = []

        def reject(n: int, raw: bytes, event_id: str | None, stage: str, reason: str, detail: str) -> None:
            dead.append(DeadLetter.of(stage, reason, f"HTTP ingest ({name}), line {n}: {detail}", raw,
                                      event_id=event_id))
            results.append(LineResult(n, "dead_lettered", event_id, reason, detail))

        # Validated in a thread, not on the event loop: a request of eight 1 MB
        # lines of tiny arrays took 1.46 s (audit; 0.9 s on a dev machine),
        # and at ~6 such requests/s one token holder kept every other request
        # and /healthz waiting. parse_event now bounds one line (~10 ms at
        # worst, one C call holding the GIL), but 500 lines are still ~1 s of
        # CPU: between lines the loop gets its turn. asyncio's executor, not
        # starlette's thread pool, which also runs /healthz and /metrics.
        checked = await asyncio.to_thread(_validate_lines, numbered)
        first_of: dict[str, tuple[int, bytes]] = {}  # event id -> the first accepted line with it, and its bytes
        verdicts, unchecked = await check_urls(
            policy, [what[1] for _, _, what in checked if len(what) == 2 and what[1] is not None], url_check_s)
        for n, raw, what in checked:
            if len(what) != 2:
                reject(n, raw, *what)
                continue
            event_id, url = what
            key = UrlPolicy.key(url) if url is not None else None
            refused = verdicts.get(key) if key is not None else None
            if refused is not None:
                reject(n, raw, event_id, "fetch", refused.reason, refused.detail)
                continue
            earlier = first_of.setdefault(event_id, (n, raw))
            if earlier[0] != n and earlier[1] != raw:
                # The pipeline takes a repeated event id for a producer's retry and counts the
                # sighting once: this line's other content would be dropped while answered accepted.
                reject(n, raw, event_id, "validate", "duplicate_event_id",
                       f"event id {event_id!r} is on line {earlier[0]} of this request too, with other content; "
                       "give each event an id of its own")
                continue
            accepted.append((event_id.encode(), raw))
            if key is not None and key in unchecked:
                # the host's address check did not finish within this request's url_check_s: the fetch
                # stage checks it before fetching
                results.append(LineResult(n, "accepted", event_id, url_checked=False))
            else:
                results.append(LineResult(n, "accepted", event_id))

        try:
            await run_in_threadpool(gate.produce, accepted, dead)
        except TopicsMissing as e:
            # Nothing was accepted and the answer says re-send (after Retry-After):
            # the tokens go back, or the re-send of this very batch was a 429.
            buckets[name].give_back(len(numbered))
            BROKER_FAILURES.labels("topic_missing").inc()
            log.error("topic missing on the broker; request refused (create the topics: start a worker, or run "
                      "serve-ingest --create-topics)", extra={"token": name, "lines": len(numbered),
                                                              "topics": e.topics})
            return answer(name, 503, {"error": "broker_unavailable", "cause": "topic_missing",
                                      "detail": f"the pipeline's broker has no topic {', '.join(e.topics)} yet; "
                                      "nothing was accepted, re-send this request later"},
                          {"Retry-After": retry_after})
        except Exception as e:
            buckets[name].give_back(len(numbered))  # as above: nothing accepted, re-send asked for
            BROKER_FAILURES.labels("unavailable").inc()
            log.warning("broker unavailable; request refused", extra={
                "token": name, "lines": len(numbered), "error": f"{type(e).__name__}: {e}"[:300]})
            # Not "nothing was accepted": a broker that froze may still append the batch once it
            # resumes. A re-send is what makes it certain, and events are idempotent by event id.
            return answer(name, 503, {"error": "broker_unavailable", "detail": "the pipeline's broker did not "
                                      "acknowledge in time, so nothing counts as accepted; re-send this request "
                                      "(events the broker took late are not doubled: each counts once by its "
                                      "event_id)"},
                          {"Retry-After": retry_after})
        n_ok = len(accepted)
        LINES.labels(name, "accepted").inc(n_ok)
        LINES.labels(name, "dead_lettered").inc(len(dead))
        log.info("ingested", extra={"token": name, "lines": len(numbered), "accepted": n_ok,
                                    "dead_lettered": len(dead), "ms": round((time.monotonic() - started) * 1000, 1)})
        return answer(name, 202, {"accepted": n_ok, "dead_lettered": len(dead),
                                  "results": [r.doc() for r in results]})

    return app


def serve(settings: Settings, host: str, port: int, *, header_timeout_s: float = HEADER_TIMEOUT_S,
          body_timeout_s: float = BODY_TIMEOUT_S, metrics_port: int | None = None) -> None:
    """Serve until stopped. ``metrics_port``: /metrics (and /healthz) there
    instead of on ``port``, which may face the internet."""
    import uvicorn

    from streams import logs, metrics

    logs.setup(settings.log_level, settings.log_format)
    tokens = load_tokens(settings.connectors.ingest_tokens_env)
    app = build_app(settings, tokens, body_timeout_s=body_timeout_s, public_metrics=metrics_port is None)
    if metrics_port is not None:
        # on the endpoint's address, as the desk does: an endpoint kept to loopback
        # (behind a proxy) keeps its counters, which name the token holders, there too
        log.info("metrics listening", extra={"host": host, "port": metrics.serve(metrics_port, host=host)})
    log.info("ingest endpoint listening", extra={"host": host, "port": port, "tokens": sorted(set(tokens.values()))})
    uvicorn.Server(server_config(app, host, port, header_timeout_s=header_timeout_s)).run()


def server_config(app: FastAPI, host: str, port: int, *, header_timeout_s: float = HEADER_TIMEOUT_S,
                  max_connections: int = MAX_CONNECTIONS) -> Any:
    """The uvicorn config ``serve`` runs ``app`` with: at most
    ``max_connections`` open at once, each head within ``header_timeout_s``,
    a body in ``MAX_BODY_PIECES`` tiny pieces at most, no access log (a query
    string may hold anything, a token included), and a stop waits
    ``SHUTDOWN_GRACE_S`` at most. No limit_concurrency: requests at work are
    bounded by ``build_app``'s ``max_in_flight``."""
    import uvicorn

    # no "server: uvicorn" header, as the desk: the software and its version are nobody's business
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, server_header=False,
                          timeout_keep_alive=5, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                          http=_ingest_protocol(head_deadline_protocol(header_timeout_s), max_connections))


def _ingest_protocol(protocol: type, max_connections: int) -> type:
    """``protocol`` (uvicorn's h11 protocol) holding at most
    ``max_connections`` open: one more closes the oldest that has no request
    at work (no head yet, or waiting after an answer), or, when every one
    has, the new one before a byte of it is read. Closing the new one
    always (``head_deadline_protocol``'s cap) let anybody, no token needed,
    shut every token holder out with that many idle connections, renewed
    within the head deadline. It also refuses, 400 ``too_fragmented``, a
    request body in over ``MAX_BODY_PIECES`` pieces of under
    ``MIN_PIECE_BYTES`` on average (counted where h11
    parses them: by the time the app reads, uvicorn has joined what arrived
    together, and the cost is already spent)."""
    import h11

    opened: dict[Any, None] = {}  # the open connections, oldest first (an ordered set)

    class PieceCountingConnection(h11.Connection):
        pieces = 0
        bytes = 0
        refused: str | None = None

        def next_event(self) -> Any:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self.pieces = self.bytes = 0
            elif isinstance(event, h11.Data):
                self.pieces += 1
                self.bytes += len(event.data)
                if self.pieces > MAX_BODY_PIECES and self.bytes < self.pieces * MIN_PIECE_BYTES:
                    self.refused = (f"the body came in over {MAX_BODY_PIECES} pieces (chunks) of under "
                                    f"{MIN_PIECE_BYTES} bytes on average; nothing was accepted, send it in "
                                    "larger chunks")
                    # uvicorn answers a protocol error 400 and closes the connection (send_400_response)
                    raise h11.RemoteProtocolError(self.refused, error_status_hint=400)
            return event

    class IngestProtocol(protocol):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # the size limit uvicorn gave the h11 connection it made (h11_max_incomplete_event_size)
            self.conn = PieceCountingConnection(h11.SERVER, self.conn._max_incomplete_event_size)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            opened[self] = None
            if len(opened) <= max_connections:
                return
            idle = next((c for c in opened if c is not self and c._idle()), None)
            (idle or self).transport.close()  # its connection_lost takes it out of ``opened``

        def _idle(self) -> bool:
            return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

        def connection_lost(self, exc: Exception | None) -> None:
            opened.pop(self, None)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            try:
                self._send_400(msg)
            except h11.LocalProtocolError:
                # The request was answered already (401, 413, busy) while its body came on: there
                # is nothing more to say, and h11 refuses a second answer (it was a traceback).
                self.transport.close()

        def _send_400(self, msg: str) -> None:
            refused = getattr(self.conn, "refused", None)
            if refused is None:
                super().send_400_response(msg)
                return
            # as uvicorn's own 400, with the ingest endpoint's JSON error in place of its text
            body = json.dumps({"error": "too_fragmented", "detail": refused}, separators=(",", ":")).encode()
            head = h11.Response(status_code=400, reason=b"Bad Request",
                                headers=[(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode()), (b"connection", b"close")])
            for event in (head, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            if self.cycle is not None:
                self.cycle.scope[FRAGMENTED_KEY] = True
            self.transport.close()

    return IngestProtocol
