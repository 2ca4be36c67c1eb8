"""Mastodon through its streaming API (server-sent events), with a bounded
REST backfill after a disconnect.

The stream sends ``event: update`` / ``status.update`` with a Status JSON and
``event: delete`` with a status id. Mastodon's streaming server sends no SSE
``id:`` fields, so ``Last-Event-ID`` resume only happens against servers that
do; otherwise the statuses missed while disconnected are fetched from the REST
timeline, paging forward from the last status id seen (``min_id`` and the
``Link: rel="prev"`` header, followed only to the instance's own origin), at
most ``mastodon_backfill_pages`` pages, with the ``X-RateLimit-*`` headers
respected.

Mastodon allows 4 attachments a status, and caps what it takes from other
servers at 4 too, but servers that speak its API need not (Pleroma's limit is
a setting), and a hostile instance can send a status with thousands: only the
first ``MAX_IMAGES`` image attachments of a status (and of the status it
quotes) become events; the rest are counted
(``deepwatch_connector_events_total{outcome="clipped"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
import time
from datetime import datetime
from typing import Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
from httpx_sse import SSEError, aconnect_sse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streams.connectors.base import (RATE_LIMIT_WAITS, Backoff, Emitter, LogThrottle, MalformedFrame, Mapped,
                                     Stopped, clip_hashtags, error_text, host_of, parse_frame, rate_limit_wait,
                                     reconnect_loop, unless_stopped)
from streams.net_errors import network_reason
from streams.records import MAX_COUNT, MAX_TEXT_CHARS, ImageEvent
from streams.settings import ConnectorSettings
from streams.validate import json_kind

log = logging.getLogger("deepwatch.connectors.mastodon")

PLATFORM = "mastodon"
Timeline = Literal["public", "local", "hashtag", "user"]
PAGE = 40  # the REST timelines' maximum page size
# A connection that has lasted this long is healthy: events on it reset the
# backoff. Events alone do not: a server (or proxy) that closes each stream
# after an event or two was reconnected to at the first backoff step for ever.
HEALTHY_AFTER_S = 10.0
# Room for servers that allow more than Mastodon's 4 (Pleroma, Akkoma, GoToSocial
# settings), while one status cannot become thousands of events.
MAX_IMAGES = 16


class _M(BaseModel):
    # Only the fields we read: the rest is ignored, so a field we do not use
    # cannot make a status malformed.
    model_config = ConfigDict(extra="ignore")


class MediaAttachment(_M):
    id: str
    type: str
    url: str | None = None  # the original (the instance's copy for remote media)
    remote_url: str | None = None


class Account(_M):
    id: str
    acct: str


class Tag(_M):
    name: str


class Quote(_M):
    state: str | None = None
    quoted_status: "Status | None" = None


class Status(_M):
    id: str
    created_at: datetime
    uri: str | None = None
    url: str | None = None
    content: str = ""
    language: str | None = None
    account: Account
    media_attachments: list[MediaAttachment] = Field(default_factory=list)
    tags: list[Tag] = Field(default_factory=list)
    reblog: "Status | None" = None
    quote: Quote | None = None
    favourites_count: int = 0
    reblogs_count: int = 0
    replies_count: int = 0


_BREAK = re.compile(r"<br\s*/?>|</p>\s*<p>", re.I)
# Status HTML read at most: the event keeps MAX_TEXT_CHARS of text, and a status's markup
# (links, mentions, hashtags) is a few times its text, not ten. A frame may be 2 MiB.
MAX_CONTENT_CHARS = 10 * MAX_TEXT_CHARS


def _strip_tags(text: str) -> str:
    """``re.sub(r"<[^>]+>", "", text)`` in linear time. That regex, tried again from every
    ``<`` with no ``>`` after it, scanned to the end each time: content full of stray ``<``
    (Mastodon escapes them; a hostile instance need not) took 12 s for 200 KB, on the
    connector's event loop. A tag runs from a ``<`` to the first ``>`` at least two
    characters on (``<>`` is text); once no ``>`` is left, nothing further is a tag."""
    out = []
    pos = 0
    while (start := text.find("<", pos)) >= 0:
        if text.startswith(">", start + 1):
            out.append(text[pos:start + 2])
            pos = start + 2
            continue
        end = text.find(">", start + 1)
        if end < 0:
            break
        out.append(text[pos:start])
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


def plain_text(content: str) -> str:
    """Status HTML -> text (paragraphs and breaks become newlines), from the first
    ``MAX_CONTENT_CHARS`` of it (less a tag the cut leaves open)."""
    if len(content) > MAX_CONTENT_CHARS:
        content = content[:MAX_CONTENT_CHARS]
        if content.rfind("<") > content.rfind(">"):
            content = content[:content.rfind("<")]
    return html.unescape(_strip_tags(_BREAK.sub("\n", content))).strip()


def status_id_int(sid: str) -> int:
    """A status id as a number (Mastodon's are 64-bit snowflakes), else -1.
    ``str.isdigit`` alone also passes "²" and 5000-digit strings, on which
    ``int`` raises: a status with such an id ended the connector's run."""
    return int(sid) if sid.isascii() and sid.isdigit() and len(sid) <= 30 else -1


def _count(n: int) -> int:
    # Mastodon's counters are caches that can drift below zero (and a remote
    # server may send anything): clamp into the schema's range rather than
    # lose the pictures of a status over its like count.
    return max(0, min(n, MAX_COUNT))


class MastodonMapper:
    """Status JSON -> schema-v1 events, one per image attachment."""

    def __init__(self, instance: str, *, hashtags: list[str] | None = None):
        self.host = urlsplit(instance).hostname or instance
        self.filter = {h.lstrip("#").casefold() for h in hashtags or []}

    def _acct(self, a: Account) -> str:
        return a.acct if "@" in a.acct else f"{a.acct}@{self.host}"

    def map_update(self, data: str | bytes) -> Mapped:
        return self.map_status(parse_frame(Status, data, "bad_status", "(status)"))

    def map_delete(self, data: str) -> Mapped:
        sid = data.strip().strip('"')
        if not sid:
            raise MalformedFrame("bad_delete", "delete without a status id")
        # Schema v1 has no retraction: what was produced stays.
        return Mapped("delete", forget=sid)

    def map_status(self, s: Status) -> Mapped:
        cursor = status_id_int(s.id)
        cursor = cursor if cursor >= 0 else None
        shared = s.reblog  # a boost: the booster's sighting of the original's pictures
        subject = shared or s
        images, clipped = _images(subject)
        quoted = subject.quote.quoted_status if subject.quote and subject.quote.state in (None, "accepted") else None
        q_images, q_clipped = _images(quoted) if quoted else ([], 0)
        clipped += q_clipped
        if not images and not q_images:
            return Mapped("no_image", cursor=cursor)
        tags = clip_hashtags(t.name for t in subject.tags)
        if self.filter and not (self.filter & {t.casefold() for t in tags}):
            return Mapped("filtered", cursor=cursor)
        text = plain_text(subject.content)
        lang = subject.language if subject.language and len(subject.language) <= 16 else None

        def event(suffix: str, m: MediaAttachment) -> ImageEvent:
            eid = f"mastodon:{self.host}:{s.id}:{suffix}{m.id}"
            try:
                return ImageEvent(
                    event_id=eid, platform=PLATFORM, post_id=s.uri or s.id, post_url=subject.url or subject.uri,
                    account_id=self._acct(s.account), account_handle=f"@{self._acct(s.account)}",
                    # created_at is taken as is, even when later than now: unlike
                    # Jetstream's time_us, a Status carries no time of receipt by
                    # the server to fall back on (for a remote status created_at
                    # is the origin's claim, and the id may be derived from it).
                    # A future one is dead-lettered by the pipeline (future_posted_at).
                    posted_at=s.created_at, text=text or None, lang=lang, hashtags=tags,
                    # Engagement is this status's own: a boost's counts are not
                    # the original's, and sightings' engagement is summed per cluster.
                    engagement={"likes": _count(s.favourites_count), "reposts": _count(s.reblogs_count),
                                "replies": _count(s.replies_count)},
                    image={"url": m.url or m.remote_url},
                )
            except ValidationError as e:
                raise MalformedFrame("unmappable", f"{eid}: {error_text(e, '(event)')}") from None

        events = [event("", m) for m in images] + [event("q", m) for m in q_images]
        outcome = "repost" if shared else ("image_post" if images else "quote")
        return Mapped(outcome, events=events, cursor=cursor, clipped=clipped)


def _images(s: Status) -> tuple[list[MediaAttachment], int]:
    """A status's image attachments with a URL, at most ``MAX_IMAGES``, and how many were left out."""
    images = [m for m in s.media_attachments if m.type == "image" and (m.url or m.remote_url)]
    return images[:MAX_IMAGES], max(0, len(images) - MAX_IMAGES)


class TooLarge(httpx.TransportError):
    """A response (a REST page) or one streamed event larger than the cap."""


class Stalled(httpx.ReadTimeout):
    """Bytes keep coming, but no event or heartbeat is completed by them."""


class _CappedStream(httpx.AsyncByteStream):
    """``inner``, at most ``limit`` bytes (``per_event``: between blank lines).
    ``per_event`` with ``idle_s``: at most ``idle_s`` without a complete event
    or comment line (Mastodon's ``:thump`` heartbeat). httpx's read timeout
    is reset by every byte: a server, or a proxy, that dripped one every few
    seconds without ever ending an event held the connector for good."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int, per_event: bool, idle_s: float | None = None):
        self.inner, self.limit, self.per_event, self.idle_s = inner, limit, per_event, idle_s

    async def __aiter__(self):
        pending = 0  # bytes since the last event boundary (a blank line) or since the start
        head = b""  # the first byte of the line not yet ended (b"": at a line's start)
        prev_cr = False  # the last chunk ended with \r: a \n opening this one ends no new line
        alive_at = time.monotonic()  # the last complete event or comment line
        async for chunk in self.inner:
            pending += len(chunk)
            if self.per_event:
                # A blank line ends an event whatever ends the lines: SSE allows \r\n, \n
                # and a lone \r (httpx_sse reads all three). Looking for \n\n and
                # \r\n\r\n only, a server ending its lines with \r had every
                # connection cut once max_frame_bytes had come, events all small.
                data = chunk[1:] if prev_cr and chunk.startswith(b"\n") else chunk
                prev_cr = chunk.endswith(b"\r")
                flat = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                seen = b"\n" + head + flat  # the line under way, from its start
                cut = seen.rfind(b"\n\n")
                if cut >= 0:
                    pending = len(seen) - cut - 2
                if cut >= 0 or _COMMENT_LINE.search(seen):
                    alive_at = time.monotonic()
                last = flat.rfind(b"\n")
                head = flat[last + 1:last + 2] if last >= 0 else (head or flat[:1])
                if self.idle_s is not None and time.monotonic() - alive_at > self.idle_s:
                    raise Stalled(f"bytes, but no complete event or heartbeat for {self.idle_s:g}s "
                                  "(connectors.idle_timeout_s)")
            if pending > self.limit:
                what = "one event of the stream" if self.per_event else "the response"
                raise TooLarge(f"{what} is over {self.limit} bytes (connectors.max_frame_bytes)")
            handed_at = time.monotonic()
            yield chunk
            # The time the reader spent on what it was given (a slow broker) is not the server's.
            alive_at += time.monotonic() - handed_at

    async def aclose(self) -> None:
        await self.inner.aclose()


_COMMENT_LINE = re.compile(rb"\n:[^\n]*\n")  # an SSE comment (a heartbeat), ended


class CappedTransport(httpx.AsyncBaseTransport):
    """Bounds what an instance can make the connector hold: a REST page at
    most ``PAGE_FACTOR`` x ``limit`` bytes, a streamed event (server-sent
    events run for days) at most ``limit`` bytes between blank lines. httpx would otherwise read a
    page, or a line without an end, into memory whole. Encoded answers are
    refused: the cap counts bytes as received, and a compressed body would
    inflate past it."""

    # A page holds up to PAGE statuses, each far smaller than a streamed frame may be.
    PAGE_FACTOR = 8

    def __init__(self, inner: httpx.AsyncBaseTransport, limit: int, idle_s: float | None = None):
        self.inner, self.limit, self.idle_s = inner, limit, idle_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await response.aclose()
            raise TooLarge(f"{request.url.host} answered with Content-Encoding {encoding!r} though asked for identity")
        per_event = "text/event-stream" in request.headers.get("accept", "")
        cap = self.limit if per_event else self.limit * self.PAGE_FACTOR
        response.stream = _CappedStream(response.stream, cap, per_event, self.idle_s if per_event else None)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def stream_path(timeline: Timeline, hashtag: str | None) -> str:
    if timeline == "hashtag":
        return f"/api/v1/streaming/hashtag?{urlencode({'tag': hashtag})}"
    return {"public": "/api/v1/streaming/public", "local": "/api/v1/streaming/public/local",
            "user": "/api/v1/streaming/user"}[timeline]


def timeline_path(timeline: Timeline, hashtag: str | None) -> str:
    if timeline == "hashtag":
        return f"/api/v1/timelines/tag/{quote(hashtag or '', safe='')}"
    return {"public": "/api/v1/timelines/public", "local": "/api/v1/timelines/public?local=true",
            "user": "/api/v1/timelines/home"}[timeline]


class RateLimited(Exception):
    def __init__(self, wait_s: float):
        super().__init__(f"rate limited for {wait_s:.1f}s")
        self.wait_s = wait_s


class FatalStreamError(Exception):
    """The server refuses us in a way retrying cannot fix (bad token, no such timeline)."""


class MastodonConnector:
    def __init__(self, emitter: Emitter, mapper: MastodonMapper, cfg: ConnectorSettings, *, instance: str,
                 timeline: Timeline = "public", hashtag: str | None = None, token: str | None = None,
                 streaming_url: str | None = None, client: httpx.AsyncClient | None = None):
        if timeline == "hashtag" and not hashtag:
            raise ValueError("the hashtag timeline needs a hashtag")
        self.emitter = emitter
        self.mapper = mapper
        self.cfg = cfg
        self.instance = instance.rstrip("/")
        self.timeline = timeline
        self.hashtag = hashtag
        self.streaming_url = streaming_url.rstrip("/") if streaming_url else None
        self._instance_warned = False  # the instance document could not be read (said once until it can)
        headers = {"User-Agent": "deepwatch-connector (+https://github.com/deepwatch)"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        headers["Accept-Encoding"] = "identity"  # the caps below count bytes as they come (no bomb to inflate)
        self.client = client or httpx.AsyncClient(
            headers=headers, trust_env=False,
            transport=CappedTransport(httpx.AsyncHTTPTransport(), cfg.max_frame_bytes, cfg.idle_timeout_s),
            timeout=httpx.Timeout(cfg.idle_timeout_s, connect=cfg.connect_timeout_s),
        )
        self.last_event_id: str | None = None  # only servers that send SSE ids set this
        # The SSE id of the last event the broker confirmed: after a rollback the
        # resume asks from there. Resuming from last_event_id, the id read last,
        # skipped every event the broker had not acknowledged (lost for good).
        self._confirmed_event_id: str | None = None
        emitter.on_checkpoint.append(self._checkpointed)
        self._stop = asyncio.Event()  # run()'s: rate-limit waits end early on it
        self.connects = 0
        self.backfilled = 0
        self._malformed_log = LogThrottle()
        self._clipped_log = LogThrottle()

    async def aclose(self) -> None:
        await self.client.aclose()

    def _checkpointed(self, saved: bool) -> None:
        if saved:
            self._confirmed_event_id = self.last_event_id
        else:
            self.last_event_id = self._confirmed_event_id

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (a rate-limit wait, up to ``rate_limit_max_wait_s``),
        ending early when the connector is stopped: Ctrl-C or SIGTERM must not
        wait out a five-minute Retry-After."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _within(self, aw, what: str):
        """``aw`` (a REST request, or a stream's connect and answer head),
        given at most ``connect_timeout_s + idle_timeout_s`` in all, else
        ``Stalled``; a stop ends it at once (``Stopped``). httpx's timeouts
        are per read: a server dripping a header byte every few seconds held
        the connector for good."""
        deadline = self.cfg.connect_timeout_s + self.cfg.idle_timeout_s
        try:
            return await unless_stopped(asyncio.wait_for(aw, deadline), self._stop)
        except TimeoutError:
            raise Stalled(f"{what} did not come within {deadline:g}s "
                          "(connectors.connect_timeout_s + idle_timeout_s)") from None

    # -- streaming endpoint discovery ------------------------------------
    async def _streaming_base(self) -> tuple[str, bool]:
        """The streaming server's address, from the instance document's
        ``urls.streaming_api``; the instance itself where there is none (many
        instances proxy /api/v1/streaming on the main host anyway). A document
        that cannot be used is said so in one warning, never fatal. Whether
        the address is settled comes with it: it is kept for the run only once
        a readable document (HTTP 200, JSON) said it. Without one (an error,
        a 503 at startup, a maintenance page) the instance itself is tried
        for this connection, and the document asked again on the next."""
        if self.streaming_url:
            return self.streaming_url, True
        base = self.instance
        where = f"{self.instance}/api/v1/instance"
        problem: str | None = None
        unread: str | None = None  # why there is no document to go by this time
        try:
            r = await self._within(self.client.get(where), "the instance document")
            if r.status_code == 200:
                doc = r.json()
            else:
                doc, unread = {}, f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            doc, unread = {}, f"{type(e).__name__}: {e}"[:300]
        except (ValueError, RecursionError) as e:  # RecursionError: nested past the parser's depth
            doc, unread = {}, f"not JSON ({type(e).__name__})"
        if unread is not None:
            (log.info if self._instance_warned else log.warning)(
                f"{where} is unusable ({unread}); streaming from {base} for now, asking again on the next connection",
                extra={"connector": PLATFORM, "instance": self.instance})
            self._instance_warned = True
            return base, False
        urls = doc.get("urls") if isinstance(doc, dict) else None
        found = urls.get("streaming_api") if isinstance(urls, dict) else None
        if not isinstance(doc, dict):
            problem = f"the document is {json_kind(doc)}, not an object"
        elif urls is not None and not isinstance(urls, dict):
            problem = f"urls is {json_kind(urls)}, not an object"
        elif found is not None and not isinstance(found, str):
            problem = f"urls.streaming_api is {json_kind(found)}, not a string"
        elif found:
            try:
                url = http_streaming_url(found).rstrip("/")
                parts = urlsplit(url)
                if parts.scheme in ("http", "https") and parts.hostname and parts.port != 0:
                    base = url
                else:
                    problem = f"urls.streaming_api {found[:200]!r} is not a ws(s):// or http(s):// URL"
            except ValueError:  # "wss://[::1", a port past 65535 (.port raises)
                problem = f"urls.streaming_api {found[:200]!r} is not a URL"
        if problem:
            log.warning(f"{where} is unusable ({problem}); streaming from {base}",
                        extra={"connector": PLATFORM, "instance": self.instance})
        self.streaming_url = base
        return base, True

    # -- handling ----------------------------------------------------------
    async def handle(self, event: str, data: str) -> None:
        try:
            if event in ("update", "status.update"):
                mapped = self.mapper.map_update(data)
            elif event == "delete":
                mapped = self.mapper.map_delete(data)
            else:
                self.emitter.count("other")
                return
        except MalformedFrame as e:
            self.emitter.count("malformed")
            if (suppressed := self._malformed_log.allow()) is not None:
                log.warning("malformed frame skipped", extra={
                    "connector": PLATFORM, "event": event, "reason": e.reason, "detail": e.detail[:300],
                    "excerpt": data[:200], "suppressed": suppressed})
            return
        if mapped.clipped and (suppressed := self._clipped_log.allow()) is not None:
            log.warning(f"status with more than {MAX_IMAGES} image attachments; the rest left out",
                        extra={"connector": PLATFORM, "instance": self.instance, "clipped": mapped.clipped,
                               "post_id": mapped.events[0].post_id if mapped.events else None,
                               "suppressed": suppressed})
        await self.emitter.apply(mapped)  # an edit of an old status does not move the cursor back (Emitter.advance)

    # -- REST backfill -----------------------------------------------------
    async def _get(self, url: str) -> httpx.Response:
        for _ in range(5):
            # Bounded in all, and a stop ends it at once.
            r = await self._within(self.client.get(url), "a REST answer")
            wait = rate_limit_wait(r.headers)
            if r.status_code == 429:
                wait = wait or 60.0
            if wait > 0:
                RATE_LIMIT_WAITS.labels(PLATFORM).inc()
                wait = min(wait, self.cfg.rate_limit_max_wait_s)
                log.info("rate limit: waiting", extra={"connector": PLATFORM, "wait_s": round(wait, 1),
                                                       "status": r.status_code})
                await self._pause(wait)
            if r.status_code != 429 or self._stop.is_set():
                return r
        raise RateLimited(self.cfg.rate_limit_max_wait_s)

    async def backfill(self) -> int:
        """Fetch statuses newer than the cursor, oldest page first. Returns statuses read."""
        since = self.emitter.cursor
        if since is None:
            return 0
        path = timeline_path(self.timeline, self.hashtag)
        url: str | None = f"{self.instance}{path}{'&' if '?' in path else '?'}{urlencode({'min_id': since, 'limit': PAGE})}"
        read = 0
        pages = 0
        while url and pages < self.cfg.mastodon_backfill_pages:
            r = await self._get(url)
            if r.status_code in (401, 403, 404, 422):
                # The stream itself took this token (or none) a moment ago: this is the
                # instance keeping its REST timeline from us (unauthenticated access to
                # it disabled, a tag it does not know), not a bad token. Ending the run
                # here lost the live stream too, at the first reconnect after hours.
                log.error(f"backfill refused (HTTP {r.status_code}); the statuses missed while disconnected "
                          "are skipped" + (" (set a token with --token-env)" if r.status_code == 401 else ""),
                          extra={"connector": PLATFORM, "instance": self.instance, "url": url,
                                 "answer": r.text[:200], "cursor": self.emitter.cursor})
                url = None  # the end of this backfill, not its page bound
                break
            r.raise_for_status()
            try:
                page = r.json()
            except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
                log.warning("backfill page is not JSON", extra={"connector": PLATFORM, "url": url})
                url = None  # the end of this backfill, not its page bound
                break
            if not isinstance(page, list) or not page:
                return read
            pages += 1
            for doc in sorted(page, key=_page_order):
                read += 1
                try:
                    mapped = self.mapper.map_status(Status.model_validate(doc))
                except (ValidationError, MalformedFrame) as e:
                    self.emitter.count("malformed")
                    detail = error_text(e, "(status)") if isinstance(e, ValidationError) else e.detail
                    if (suppressed := self._malformed_log.allow()) is not None:
                        log.warning("malformed status in backfill skipped", extra={
                            "connector": PLATFORM, "error": detail[:300], "suppressed": suppressed})
                    continue
                await self.emitter.apply(mapped)
            prev = r.links.get("prev", {}).get("url") if len(page) >= PAGE else None
            url = self._same_origin(r.url, prev) if prev else None
            if prev and url is None:
                # The request carries the token: it goes nowhere but the instance.
                log.warning("backfill stopped: the next page's link leaves the instance",
                            extra={"connector": PLATFORM, "instance": self.instance, "link": prev[:300]})
                break
        if url:
            log.warning("backfill bound reached; the newer missed statuses are skipped",
                        extra={"connector": PLATFORM, "pages": pages, "cursor": self.emitter.cursor})
        self.backfilled += read
        return read

    def _same_origin(self, base: httpx.URL, link: str) -> str | None:
        """``link`` (resolved against the page it came with) if it has the
        instance's origin (scheme, host and port), else None."""
        try:
            target = base.join(link)
            return str(target) if _origin(target) == _origin(httpx.URL(self.instance)) else None
        except (httpx.InvalidURL, ValueError):
            return None

    # -- streaming ---------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Read until ``stop`` is set, reconnecting with backoff; checkpoints on the way out."""
        self._stop = stop or asyncio.Event()
        await reconnect_loop(PLATFORM, self._session, self.emitter, self.cfg, self._stop)

    async def _session(self, stop: asyncio.Event, backoff: Backoff) -> str:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        stopping = asyncio.ensure_future(stop.wait())
        try:
            base, settled = await self._streaming_base()
            url = base + stream_path(self.timeline, self.hashtag)
            self.connects += 1
            async with contextlib.AsyncExitStack() as stack:
                # Connecting and the answer's head are bounded in all, however slowly a
                # server sends them, and a stop ends the wait at once.
                source = await self._within(
                    stack.enter_async_context(aconnect_sse(self.client, "GET", url, headers=headers)),
                    "the stream's answer")
                r = source.response
                if r.status_code == 404 and not settled:
                    # The instance document was not read: the streaming server may
                    # live elsewhere. Not "no such timeline" yet: ask it again.
                    log.warning(f"{url} answered HTTP 404 and the instance document could not be read; "
                                "retrying", extra={"connector": PLATFORM, "instance": self.instance})
                    return "http_404"
                if r.status_code in (401, 403, 404):
                    await r.aread()
                    raise FatalStreamError(f"{url} answered HTTP {r.status_code}: {r.text[:200]}"
                                           + (" (set a token with --token-env)" if r.status_code == 401 else ""))
                if r.status_code == 429 or r.status_code >= 500:
                    wait = min(rate_limit_wait(r.headers), self.cfg.rate_limit_max_wait_s)
                    if wait > 0:  # counted and said, as the REST calls' waits are
                        RATE_LIMIT_WAITS.labels(PLATFORM).inc()
                        log.info("rate limit: waiting", extra={"connector": PLATFORM, "wait_s": round(wait, 1),
                                                               "status": r.status_code})
                    await self._pause(wait)
                    return f"http_{r.status_code}"
                r.raise_for_status()
                log.info("connected", extra={"connector": PLATFORM, "url": url})
                self.emitter.connected = True
                if not self.last_event_id and self.emitter.cursor is not None:
                    # Connected first, then backfill to the end before reading
                    # the stream (the server's pushes wait in the socket):
                    # anything posted meanwhile is in one or both, the seen
                    # ids drop the overlap, and the cursor only moves forward.
                    await self.backfill()
                events = source.aiter_sse().__aiter__()
                connected_at = time.monotonic()
                nxt: asyncio.Future | None = None
                try:
                    while True:
                        if nxt is None:
                            nxt = asyncio.ensure_future(events.__anext__())
                        # A quiet stream must not keep sent events unconfirmed (and the cursor
                        # unsaved) until it ends: checkpoint meanwhile. (The read timeout,
                        # idle_timeout_s, is httpx's, raised by the read itself.)
                        wait = self.cfg.checkpoint_interval_s if self.emitter.unsaved else None
                        done, _ = await asyncio.wait({nxt, stopping}, timeout=wait,
                                                     return_when=asyncio.FIRST_COMPLETED)
                        if nxt not in done:
                            if stopping in done:
                                return "stopped"
                            await self.emitter.maybe_checkpoint()
                            continue
                        try:
                            sse = nxt.result()
                        except StopAsyncIteration:
                            return "closed"
                        finally:
                            nxt = None
                        if time.monotonic() - connected_at >= HEALTHY_AFTER_S:
                            backoff.reset()
                        if sse.id:
                            self.last_event_id = sse.id
                        await self.handle(sse.event, sse.data)
                finally:
                    if nxt is not None:
                        nxt.cancel()
        except httpx.TimeoutException as e:
            if isinstance(e, Stalled):  # a drip, not a quiet server: say which
                log.warning(f"stream from {host_of(self.instance)} stalled: {e}",
                            extra={"connector": PLATFORM, "instance": self.instance})
            return "idle_timeout"
        except (httpx.TransportError, SSEError) as e:
            try:  # the server asked: the streaming server may be another host than the instance
                host = host_of(str(e.request.url)) if isinstance(e, httpx.TransportError) else host_of(self.instance)
            except RuntimeError:  # an httpx error made without its request
                host = host_of(self.instance)
            log.warning(f"stream from {host} failed: {network_reason(e)}",
                        extra={"connector": PLATFORM, "host": host, "error": f"{type(e).__name__}: {e}"})
            return "connect_failed"
        except httpx.HTTPStatusError as e:
            # An answer retrying may cure, but that nothing else said: a streaming
            # server moved elsewhere (301: redirects are not followed, the token
            # goes to no other host) was reconnected to for ever without a word.
            status = e.response.status_code
            moved = e.response.headers.get("location")
            log.warning(f"{host_of(str(e.request.url))} answered HTTP {status}; retrying"
                        + (f" (it points to {moved[:200]}: set --streaming-url if that is the stream's home)"
                           if moved and 300 <= status < 400 else ""),
                        extra={"connector": PLATFORM, "instance": self.instance, "status": status})
            return f"http_{status}"
        except RateLimited:
            return "rate_limited"
        except Stopped:
            return "stopped"
        finally:
            stopping.cancel()


def _page_order(doc: object) -> int:
    """Where a status of a backfill page goes, oldest first; odd ones first."""
    sid = doc.get("id") if isinstance(doc, dict) else None
    return status_id_int(sid) if isinstance(sid, str) else -1


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def http_streaming_url(url: str) -> str:
    """The streaming server's address for reading server-sent events over
    HTTP: ``ws(s)://`` (as an instance reports ``urls.streaming_api``) is the
    same server as ``http(s)://``, whatever the scheme's case."""
    parts = urlsplit(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    return urlunsplit((scheme, *parts[1:]))
