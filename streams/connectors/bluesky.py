"""Bluesky through Jetstream: commit frames over a websocket, mapped to
schema-v1 events (one per image), resumable from the time-based cursor.

Jetstream frames (``kind`` commit | identity | account) carry the author DID,
``time_us`` (the cursor, unix microseconds) and for commits the collection,
operation and record. Images are blob references in the post record's
``embed`` (``app.bsky.embed.images``, or ``.media`` of
``app.bsky.embed.recordWithMedia``); the CDN serves them by DID and blob CID.
Reposts and quotes name the post they share by AT URI: if that post's images
were seen, each becomes a new sighting of the same image URLs. An ``update``
commit (an edit) carries the whole new record: a picture the remembered post
did not show before becomes one event named by its blob CID; the rest of an
edit gives none.

The app.bsky lexicon allows at most ``MAX_IMAGES`` images per post; a record
is not checked against it by the relay, so a crafted post may carry thousands.
Only the first ``MAX_IMAGES`` of a post (and of the post it quotes) become
events; the rest are counted
(``deepwatch_connector_events_total{outcome="clipped"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streams.connectors.atproto_identity import HandleResolver
from streams.connectors.base import (RATE_LIMIT_WAITS, Backoff, Emitter, LogThrottle, MalformedFrame, Mapped,
                                     RememberedPost, Stopped, clip_hashtags, error_text, host_of, parse_frame,
                                     rate_limit_wait, reconnect_loop, unless_stopped)
from streams.net_errors import network_reason
from streams.records import MAX_TEXT_CHARS, MAX_UTC_OFFSET, ImageEvent
from streams.settings import ConnectorSettings, IngestSettings

log = logging.getLogger("deepwatch.connectors.bluesky")

PLATFORM = "bluesky"
POST = "app.bsky.feed.post"
REPOST = "app.bsky.feed.repost"
DEFAULT_COLLECTIONS = (POST, REPOST)
TAG_FEATURE = "app.bsky.richtext.facet#tag"
MAX_HANDLE_CHARS = 253  # a handle is a DNS name
INVALID_HANDLE = "handle.invalid"  # what an identity event carries when the account's handle does not verify
MAX_DID_CHARS = 256  # an event's account_id (the DID) holds at most this (ImageEvent)
MAX_IMAGES = 4  # app.bsky.embed.images: "images" has maxLength 4
TOO_BIG = 1009  # websocket close code: message larger than we accept
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # how every zstd frame starts (RFC 8878)
FRAME_TOO_BIG = "frame_too_big"  # the reason given for a frame over connectors.max_frame_bytes
# How much earlier than the relay received it a post's own createdAt may be.
# Relays and Jetstream pass a post on within seconds; an hour covers a PDS or
# relay catching up after an outage. Earlier than that the post is backdated
# (atproto lets a client write any createdAt: archive imports of old tweets
# do, and so can anyone claiming to have posted a picture before an event),
# and when the network first carried it is the time the desk can defend.
MAX_BACKDATE_S = 3600.0
# The pipeline dead-letters an event dated more than this after its ingest
# time (future_posted_at); the connector is told the configured value.
DEFAULT_FUTURE_SKEW_S = IngestSettings.model_fields["max_future_skew_s"].default


# --------------------------------------------------------------------------
# Typed frames (only the fields we read; the rest is ignored, so a field we
# do not use cannot make a frame or record malformed)
# --------------------------------------------------------------------------
class _M(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Link(_M):
    link: str = Field(alias="$link")


class Blob(_M):
    ref: _Link | None = None
    cid: str | None = None  # legacy blob form: {"cid": ..., "mimeType": ...}

    @property
    def cid_str(self) -> str | None:
        return self.ref.link if self.ref else self.cid


class EmbedImage(_M):
    image: Blob


class StrongRef(_M):
    uri: str


class EmbedRecord(_M):
    record: StrongRef


class Embed(_M):
    type: str = Field(alias="$type")
    images: list[EmbedImage] | None = None
    media: "Embed | None" = None  # recordWithMedia
    record: StrongRef | EmbedRecord | None = None  # record: StrongRef; recordWithMedia: EmbedRecord


class FacetFeature(_M):
    type: str = Field(default="", alias="$type")
    tag: str | None = None


class Facet(_M):
    features: list[FacetFeature] = Field(default_factory=list)


class PostRecord(_M):
    text: str = ""
    createdAt: str | None = None
    langs: list[str] | None = None
    facets: list[Facet] | None = None
    tags: list[str] | None = None
    embed: Embed | None = None


class RepostRecord(_M):
    subject: StrongRef
    createdAt: str | None = None


class Commit(_M):
    operation: Literal["create", "update", "delete"]
    collection: str
    rkey: str
    record: dict[str, Any] | None = None


class Identity(_M):
    did: str
    handle: str | None = None


class Frame(_M):
    did: str
    time_us: int
    kind: str
    commit: Commit | None = None
    identity: Identity | None = None


# --------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------
def post_url(uri: str) -> str | None:
    """``at://DID/app.bsky.feed.post/RKEY`` -> the bsky.app web page."""
    parts = uri.removeprefix("at://").split("/")
    if len(parts) == 3 and parts[1] == POST:
        return f"https://bsky.app/profile/{parts[0]}/post/{parts[2]}"
    return None


def _time(created: str | None, time_us: int, max_future_skew_s: float) -> datetime:
    """When the post was made: the client's ``createdAt`` where usable, else
    the relay's ``time_us``. createdAt is sometimes junk, naive, or later than
    the relay received the post (a wrong clock, or on purpose); one more than
    ``max_future_skew_s`` later gives way to the relay's time, since the
    pipeline would dead-letter it (future_posted_at) and lose the sighting.
    So does one more than ``MAX_BACKDATE_S`` earlier: a backdated post (an
    archive import, or a claim to have had a picture first) became the first
    sighting of its picture, years or hours before anyone could see it.
    time_us is always there and always UTC, but only an int: one beyond what
    datetime holds makes the frame malformed, not the connector crash."""
    try:
        relay: datetime | None = datetime.fromtimestamp(time_us / 1e6, timezone.utc)
    except (ValueError, OverflowError, OSError):
        relay = None
    if created:
        try:
            t = datetime.fromisoformat(created)
            if t.tzinfo is not None and abs(t.utcoffset()) <= MAX_UTC_OFFSET:
                t.astimezone(timezone.utc)  # year 1 at +14:00 is before any UTC time
                if relay is None or \
                        relay - timedelta(seconds=MAX_BACKDATE_S) <= t <= relay + timedelta(seconds=max_future_skew_s):
                    return t
        except (ValueError, OverflowError):  # OverflowError: relay +- a bound past the years 1-9999
            pass
    if relay is None:
        raise MalformedFrame("bad_frame", f"time_us {time_us} is not a usable time")
    return relay


def _hashtags(rec: PostRecord) -> list[str]:
    out: dict[str, str] = {}
    for facet in rec.facets or []:
        for feat in facet.features:
            if feat.type == TAG_FEATURE and feat.tag:
                out.setdefault(feat.tag.lstrip("#").casefold(), feat.tag.lstrip("#"))
    for tag in rec.tags or []:
        out.setdefault(tag.lstrip("#").casefold(), tag.lstrip("#"))
    return clip_hashtags(out.values())


def _embed_images(embed: Embed | None) -> list[Blob]:
    if embed is None:
        return []
    if embed.type == "app.bsky.embed.images":
        return [i.image for i in embed.images or []]
    if embed.type == "app.bsky.embed.recordWithMedia":
        return _embed_images(embed.media)
    return []


def _quoted_uri(embed: Embed | None) -> str | None:
    if embed is None:
        return None
    rec = embed.record
    if embed.type == "app.bsky.embed.record" and isinstance(rec, StrongRef):
        return rec.uri
    if embed.type == "app.bsky.embed.recordWithMedia" and isinstance(rec, EmbedRecord):
        return rec.record.uri
    return None


def _clip_text(text: str) -> str:
    """``text`` as an event carries it (``ImageEvent`` truncates the same way):
    what a remembered post keeps, so that its size is bounded."""
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


class BlueskyMapper:
    """Jetstream frame bytes -> ``Mapped``. Pure apart from the DID -> handle
    memory (commit frames carry no handle): with ``resolver`` (what
    ``deepwatch connect`` runs), verified handles resolved from DID documents
    off the frame path and saved in the state file, updated by identity
    frames; without, a bounded memory of identity frames only.
    ``max_future_skew_s``: how much later than the relay's time a post's own
    ``createdAt`` may be (the pipeline's ``ingest.max_future_skew_s``)."""

    def __init__(self, image_url: str, *, hashtags: list[str] | None = None,
                 recall: Callable[[str], RememberedPost | None] = lambda _uri: None, handles_max: int = 100_000,
                 max_future_skew_s: float = DEFAULT_FUTURE_SKEW_S, resolver: HandleResolver | None = None):
        self.image_url = image_url
        self.max_future_skew_s = max_future_skew_s
        self.filter = {h.lstrip("#").casefold() for h in hashtags or []}
        self.recall = recall
        self.resolver = resolver
        self._handles: OrderedDict[str, str] = OrderedDict()
        self._handles_max = handles_max

    def handle_of(self, did: str) -> str | None:
        """The handle an event of ``did`` carries now (never waits for one)."""
        if self.resolver is not None:
            return self.resolver.get(did)
        return self._handles.get(did)

    def map(self, raw: bytes | str) -> Mapped:
        frame = parse_frame(Frame, raw, "bad_frame", "(frame)")
        # A "handle" longer than a DNS name is not taken: kept, it would make every
        # later event of that DID fail validation; left out, they carry none. Nor is
        # a DID longer than an event's account_id holds: no event of it can be made,
        # and kept as a key (100 000 of them, each up to a frame's 2 MiB) the
        # memory was bounded in count only.
        if frame.kind == "identity" and frame.identity and len(frame.did) <= MAX_DID_CHARS:
            handle = frame.identity.handle
            if self.resolver is not None:
                ok = bool(handle) and handle.lower() != INVALID_HANDLE and len(handle) <= MAX_HANDLE_CHARS
                self.resolver.learned(frame.did, handle if ok else None)
            elif handle and handle.lower() != INVALID_HANDLE and len(handle) <= MAX_HANDLE_CHARS:
                self._handles[frame.did] = handle
                self._handles.move_to_end(frame.did)
                if len(self._handles) > self._handles_max:
                    self._handles.popitem(last=False)
            else:
                # The account's identity changed and no usable handle came with it
                # ("handle.invalid": the handle no longer verifies, e.g. a domain
                # the account does not control): the one remembered was attributed
                # to its later posts, or "handle.invalid" itself was.
                self._handles.pop(frame.did, None)
            return Mapped("identity", cursor=frame.time_us)
        c = frame.commit
        if frame.kind != "commit" or c is None:
            return Mapped("other", cursor=frame.time_us)
        uri = f"at://{frame.did}/{c.collection}/{c.rkey}"
        if c.operation == "delete":
            # Schema v1 has no retraction: sightings already produced stay;
            # the post is forgotten so later reposts do not resurrect it.
            return Mapped("delete", cursor=frame.time_us, forget=uri if c.collection == POST else None)
        if c.record is None:
            raise MalformedFrame("bad_frame", f"{c.operation} of {uri} without a record")
        try:
            if c.collection == POST:
                return self._post(frame, uri, PostRecord.model_validate(c.record), edit=c.operation == "update")
            if c.collection == REPOST:
                return self._repost(frame, uri, RepostRecord.model_validate(c.record))
        except ValidationError as e:
            raise MalformedFrame("bad_record", f"{uri}: {error_text(e, '(record)')}") from None
        return Mapped("other", cursor=frame.time_us)

    def _event(self, frame: Frame, event_id: str, post_id: str, url: str, post: RememberedPost,
               created: str | None) -> ImageEvent:
        try:
            return ImageEvent(
                event_id=event_id, platform=PLATFORM, post_id=post_id, post_url=post.post_url,
                account_id=frame.did, account_handle=self.handle_of(frame.did),
                posted_at=_time(created, frame.time_us, self.max_future_skew_s), text=post.text or None,
                lang=post.lang, hashtags=post.hashtags, image={"url": url},
            )
        except ValidationError as e:
            raise MalformedFrame("unmappable", f"{event_id}: {error_text(e, '(event)')}") from None

    def _post(self, frame: Frame, uri: str, rec: PostRecord, *, edit: bool = False) -> Mapped:
        tags = _hashtags(rec)
        own = [b.cid_str for b in _embed_images(rec.embed) if b.cid_str]
        quoted = self.recall(q) if (q := _quoted_uri(rec.embed)) else None
        # An edit carries the whole new record; what it showed before is what
        # was remembered of it (None: a post from before the connector started,
        # left out of the post cache, or one that had no pictures until now).
        before = self.recall(uri) if edit else None
        if not own and not quoted:
            # An edit that took the pictures out: later reposts must not bring them back.
            return Mapped("no_image", cursor=frame.time_us, forget=uri if before is not None else None)
        if own and self.filter and not (self.filter & {t.casefold() for t in tags}):
            # A quote of a post that passed the filter still counts; its own pictures do not.
            if not quoted:  # an edit that took the tag out: as if it had been posted so
                return Mapped("filtered", cursor=frame.time_us, forget=uri if before is not None else None)
            own = []
        # More than the lexicon allows: a crafted post, one event per entry
        # (and again for each repost or quote of it). The first MAX_IMAGES count.
        clipped = max(0, len(own) - MAX_IMAGES)
        own = own[:MAX_IMAGES]
        q_images, q_clipped = _clip_images(quoted)
        clipped += q_clipped
        lang = (rec.langs or [None])[0]
        # What is remembered for reposts and quotes is bounded too: at most
        # MAX_IMAGES URLs, the text as an event carries it, at most 64 tags.
        images = [self.image_url.format(did=frame.did, cid=cid) for cid in own]
        # The pictures the post has shown: an edit's are added to what it showed before.
        cids = own if before is None else _bounded_cids([c for c in before.cids if c not in own] + own)
        doc = RememberedPost(post_url=post_url(uri), text=_clip_text(rec.text),
                             lang=lang if lang and len(lang) <= 16 else None, hashtags=tags, images=images, cids=cids)
        if before is None:
            events = [self._event(frame, f"{uri}#{i}", uri, u, doc, rec.createdAt) for i, u in enumerate(images)]
        else:
            # Only the pictures the post did not show before are new sightings:
            # ``#{i}`` already names the post's first picture at index i, so a
            # picture an edit swapped in is named by its blob CID, the same on
            # every replay of the edit. It has been visible since the edit, not
            # since the post's createdAt. A post remembered before edits were
            # followed has no ``cids``: its image URLs tell instead.
            events = [self._event(frame, f"{uri}#cid:{cid}", uri, u, doc, None)
                      for cid, u in zip(own, images) if cid not in before.cids and u not in before.images]
        # A quote re-shares the quoted post's pictures: sightings of the same URLs.
        events += [self._event(frame, f"{uri}#q{i}", uri, u, doc, rec.createdAt) for i, u in enumerate(q_images)]
        outcome = "edit" if edit else "image_post" if own else "quote"
        return Mapped(outcome, events=events, cursor=frame.time_us, remember=(uri, doc) if own else None,
                      forget=uri if before is not None and not own else None, clipped=clipped)

    def _repost(self, frame: Frame, uri: str, rec: RepostRecord) -> Mapped:
        original = self.recall(rec.subject.uri)
        if original is None:
            return Mapped("unknown_subject", cursor=frame.time_us)  # not an image post we have seen
        images, clipped = _clip_images(original)
        # The repost has no text or page of its own: it carries the original's.
        events = [self._event(frame, f"{uri}#{i}", uri, url, original, rec.createdAt)
                  for i, url in enumerate(images)]
        return Mapped("repost", events=events, cursor=frame.time_us, clipped=clipped)


MAX_SHOWN_CIDS = 4 * MAX_IMAGES  # blob CIDs a remembered post keeps of what it has shown (its edits' pictures)


def _bounded_cids(cids: list[str]) -> list[str]:
    """``cids`` without repeats, the newest ``MAX_SHOWN_CIDS`` of them: a post
    edited over and over must not grow its remembered record without bound.
    One that falls out and comes back is named by the same event id again,
    which the seen ids drop."""
    out = list(dict.fromkeys(reversed(cids)))[:MAX_SHOWN_CIDS]
    return out[::-1]


def _clip_images(post: RememberedPost | None) -> tuple[list[str], int]:
    """A remembered post's image URLs, at most ``MAX_IMAGES`` (a post
    remembered before they were clipped may hold more), and how many were left out."""
    images = post.images if post is not None else []
    return images[:MAX_IMAGES], max(0, len(images) - MAX_IMAGES)


# --------------------------------------------------------------------------
# The websocket client
# --------------------------------------------------------------------------
def wanted_collections(collections: list[str] | None) -> list[str]:
    """``--collections`` as Jetstream is asked for them and as the stream key
    names them: blanks around a name and repeats left out, in sorted order;
    the default collections where none is left."""
    wanted = sorted({c.strip() for c in collections or []} - {""})
    return wanted or sorted(DEFAULT_COLLECTIONS)


def subscribe_url(base: str, collections: list[str], cursor: int | None, compress: bool,
                  max_message_bytes: int | None = None) -> str:
    """Jetstream's /subscribe URL. ``maxMessageSizeBytes`` makes Jetstream
    leave out frames we would refuse anyway: a frame over the websocket's
    ``max_size`` closes the connection, and since the cursor cannot move
    past a frame never read, every resume would meet it again. A ``cursor``
    already in ``base`` (Jetstream's README pastes one into its examples) is
    dropped: Jetstream reads the first one given, so that fixed cursor, not
    the saved one, was where every (re)connect replayed from."""
    base = _without_query_param(base, "cursor")
    params: list[tuple[str, str]] = [("wantedCollections", c) for c in collections]
    if cursor is not None:
        params.append(("cursor", str(cursor)))
    if compress:
        params.append(("compress", "true"))
    if max_message_bytes:
        params.append(("maxMessageSizeBytes", str(max_message_bytes)))
    return f"{base}{'&' if '?' in base else '?'}{urlencode(params)}" if params else base


def _without_query_param(url: str, name: str) -> str:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k == name for k, _ in pairs):
        return url  # as given: re-encoding it could change what it says
    kept = [(k, v) for k, v in pairs if k != name]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def websocket_url(url: str) -> str:
    """``url`` as a ws(s):// URL: an http(s):// one (as pasted from a browser
    or docs) is mapped to its websocket scheme; anything else is a ValueError
    naming the URL, raised before any connection is tried."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"the Jetstream URL must be ws:// or wss://HOST/subscribe (got {url!r})")
    return urlunsplit(parts._replace(scheme=scheme))


def _decompressor(path):
    import zstandard

    dict_data = zstandard.ZstdCompressionDict(path.read_bytes())
    return zstandard.ZstdDecompressor(dict_data=dict_data)


class BlueskyConnector:
    def __init__(self, emitter: Emitter, mapper: BlueskyMapper, cfg: ConnectorSettings, *,
                 collections: list[str] | None = None, url: str | None = None):
        self.emitter = emitter
        self.mapper = mapper
        self.cfg = cfg
        self.collections = wanted_collections(collections)
        self.url = websocket_url(url or cfg.jetstream_url)
        if "cursor" in dict(parse_qsl(urlsplit(self.url).query)):
            log.warning("the Jetstream URL carries a cursor; it is left out (the connector resumes from its saved "
                        "cursor)", extra={"connector": PLATFORM, "url": self.url})
        self._zstd = _decompressor(cfg.zstd_dictionary) if cfg.zstd_dictionary else None
        self.connects = 0
        self._malformed_log = LogThrottle()
        self._clipped_log = LogThrottle()

    def _resume_cursor(self) -> int | None:
        saved = self.emitter.cursor
        if saved is None:
            return None
        return max(0, int(saved) - int(self.cfg.cursor_overlap_s * 1_000_000))

    def _decode(self, msg: bytes | str) -> bytes | str:
        """A binary message inflated (zstd), at most ``max_frame_bytes``: a
        frame over that is ``frame_too_big``, one zstd cannot read (or that
        memory cannot hold) ``bad_compression``; both malformed, never fatal.
        A zstd frame without a dictionary to read it is ``compressed_frame``,
        saying what to set: read as JSON it was only ``malformed_json``, on
        every frame (a --jetstream-url carrying compress=true does that)."""
        if isinstance(msg, bytes) and self._zstd is None and msg.startswith(ZSTD_MAGIC):
            raise MalformedFrame("compressed_frame", "a zstd-compressed frame, but connectors.zstd_dictionary "
                                                     "is not set: pass --zstd-dictionary, or take compress=true "
                                                     "out of the Jetstream URL")
        if isinstance(msg, bytes) and self._zstd is not None:
            import zstandard

            limit = self.cfg.max_frame_bytes
            try:
                declared = zstandard.frame_content_size(msg)
            except zstandard.ZstdError as e:
                raise MalformedFrame("bad_compression", f"zstd: {e}") from None
            # max_output_size bounds only a frame that does not declare its size:
            # one that does gets a buffer of the declared size, however large
            # (a 13 KB frame declaring 400 MB took 400 MB). Refused unread.
            if declared > limit:
                raise MalformedFrame(FRAME_TOO_BIG, f"zstd frame declares {declared} bytes, over "
                                                    f"connectors.max_frame_bytes ({limit})")
            try:
                return self._zstd.decompress(msg, max_output_size=limit)
            except MemoryError:
                raise MalformedFrame("bad_compression", f"zstd: no memory to inflate a frame of "
                                                        f"{len(msg)} bytes") from None
            except zstandard.ZstdError as e:
                if declared == -1 and self._inflates_past(msg, limit):
                    raise MalformedFrame(FRAME_TOO_BIG, f"zstd frame inflates past connectors.max_frame_bytes "
                                                        f"({limit})") from None
                raise MalformedFrame("bad_compression", f"zstd: {e}") from None
        return msg

    def _inflates_past(self, msg: bytes, limit: int) -> bool:
        """Whether a frame of undeclared size holds more than ``limit`` bytes
        (decompress() says only that it could not finish), reading at most
        ``limit + 1`` of them."""
        import zstandard

        try:
            with self._zstd.stream_reader(msg) as r:
                return len(r.read(limit + 1)) > limit
        except (zstandard.ZstdError, MemoryError):  # corrupt: bad_compression, not too big
            return False

    async def handle(self, msg: bytes | str) -> None:
        try:
            mapped = self.mapper.map(self._decode(msg))
        except MalformedFrame as e:
            self.emitter.count("malformed")
            if (suppressed := self._malformed_log.allow()) is not None:
                log.warning("malformed frame skipped", extra={
                    "connector": PLATFORM, "reason": e.reason, "detail": e.detail[:300], "suppressed": suppressed,
                    "excerpt": (msg[:200] if isinstance(msg, str) else repr(msg[:200]))})
            return
        if mapped.clipped and (suppressed := self._clipped_log.allow()) is not None:
            log.warning(f"post with more than {MAX_IMAGES} images (the lexicon's limit); the rest left out",
                        extra={"connector": PLATFORM, "clipped": mapped.clipped, "cursor": mapped.cursor,
                               "post_id": mapped.events[0].post_id if mapped.events else None,
                               "suppressed": suppressed})
        await self.emitter.apply(mapped)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Read until ``stop`` is set, reconnecting with backoff; checkpoints on the way out
        (handle resolutions still under way are dropped: asked again next run)."""
        try:
            await reconnect_loop(PLATFORM, self._session, self.emitter, self.cfg, stop or asyncio.Event())
        finally:
            if self.mapper.resolver is not None:
                await self.mapper.resolver.aclose()

    def _progressed(self, start: str | None) -> bool:
        """Whether the cursor moved past where this connection started:
        frames of the resume overlap alone do not prove a healthy server."""
        now = self.emitter.cursor
        return now is not None and (start is None or int(now) > int(start))

    async def _session(self, stop: asyncio.Event, backoff: Backoff) -> str:
        url = subscribe_url(self.url, self.collections, self._resume_cursor(), self._zstd is not None,
                            self.cfg.max_frame_bytes)
        start = self.emitter.cursor
        self.connects += 1
        loop = asyncio.get_running_loop()
        try:
            async with contextlib.AsyncExitStack() as stack:
                # The handshake may wait connect_timeout_s on a server that accepts and
                # says nothing: a stop ends it at once.
                ws = await unless_stopped(stack.enter_async_context(websockets.connect(
                    url, open_timeout=self.cfg.connect_timeout_s, max_size=self.cfg.max_frame_bytes,
                    ping_interval=20, ping_timeout=20, close_timeout=2,
                    user_agent_header="deepwatch-connector (+https://github.com/deepwatch)",
                )), stop)
                log.info("connected", extra={"connector": PLATFORM, "url": url})
                self.emitter.connected = True
                stopping = asyncio.ensure_future(stop.wait())
                recv: asyncio.Future | None = None
                try:
                    while True:
                        if recv is None:
                            recv = asyncio.ensure_future(ws.recv())
                            idle_at = loop.time() + self.cfg.idle_timeout_s
                        wait = idle_at - loop.time()
                        if self.emitter.unsaved:
                            # A quiet stream must not keep sent events unconfirmed (and the
                            # cursor unsaved) until the idle timeout: checkpoint meanwhile.
                            wait = min(wait, self.cfg.checkpoint_interval_s)
                        done, _ = await asyncio.wait({recv, stopping}, timeout=max(0.0, wait),
                                                     return_when=asyncio.FIRST_COMPLETED)
                        if recv not in done:
                            if stopping in done:
                                return "stopped"
                            if loop.time() >= idle_at:
                                return "idle_timeout"
                            await self.emitter.maybe_checkpoint()
                            continue
                        msg, recv = recv.result(), None
                        await self.handle(msg)
                        if self._progressed(start):
                            backoff.reset()  # new frames flow: the server is healthy again
                finally:
                    stopping.cancel()
                    if recv is not None:
                        recv.cancel()
        except Stopped:
            return "stopped"
        except websockets.ConnectionClosed as e:
            if e.sent is not None and e.sent.code == TOO_BIG:
                # A server that ignored maxMessageSizeBytes: the resume meets the
                # same frame again, so say what to change (backoff keeps growing).
                log.error("frame larger than connectors.max_frame_bytes; raise it to get past this frame",
                          extra={"connector": PLATFORM, "max_frame_bytes": self.cfg.max_frame_bytes,
                                 "cursor": self.emitter.cursor})
                return FRAME_TOO_BIG
            return "closed_ok" if isinstance(e, websockets.ConnectionClosedOK) else "closed_error"
        except websockets.InvalidStatus as e:
            status = e.response.status_code
            # A 429 or 503 with Retry-After (a proxy in front of Jetstream shedding load) is
            # waited out, up to rate_limit_max_wait_s: the backoff alone came back within
            # a second, asking again long before the server said it would take us.
            wait = min(rate_limit_wait(e.response.headers), self.cfg.rate_limit_max_wait_s) \
                if status in (429, 503) else 0.0
            log.warning("handshake refused", extra={"connector": PLATFORM, "status": status,
                                                    "retry_after_s": round(wait, 1)})
            if wait > 0:
                RATE_LIMIT_WAITS.labels(PLATFORM).inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)  # a stop ends the wait at once
            return f"http_{status}"
        except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
            # which server: "gaierror: Name or service not known" alone did not say
            host = host_of(url)
            log.warning(f"connection to {host} failed: {network_reason(e)}",
                        extra={"connector": PLATFORM, "host": host, "error": f"{type(e).__name__}: {e}"})
            return "connect_failed"
