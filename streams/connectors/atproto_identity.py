"""Bluesky account handles: resolved from the DID, verified both ways, off
the frame path, remembered across restarts.

A Jetstream commit frame names its author by DID only. Handles come with
``identity`` frames, which Jetstream sends only when an account's identity
changes, so almost every event went out without one. ``HandleResolver``
fills the gap the way the atproto identity spec prescribes:

1. the DID document: ``did:plc`` from the PLC directory (``GET
   {plc_url}/{did}``), ``did:web`` from ``https://HOST/.well-known/did.json``
   (hostname-level only, as atproto allows); its ``id`` must be the DID;
2. the handle it claims: the first ``at://`` entry of ``alsoKnownAs``
   (handle syntax checked, lowercased);
3. the claim verified: ``https://HANDLE/.well-known/atproto-did`` must answer
   the same DID. Anyone can write any handle into their own DID document; an
   account posing as a real person would claim that person's handle, and only
   this back-check tells the two apart. Unverified: no handle at all.
   (The spec's other way to publish a handle, a DNS TXT record at
   ``_atproto.HANDLE``, needs a DNS library the project does not have: a
   handle published only that way is a miss, never a wrong handle.)

Nothing here ever delays a frame: ``get`` answers from memory or the state
file and, for a DID it knows nothing (current) of, queues a resolution for a
few worker tasks. The event that asked goes out without a handle; the DID's
later events carry it. Holding events for the answer would stall the stream
(and its cursor) behind the slowest handle host on the network.

Every request goes to an address checked by the fetch stage's rule (``pin``:
resolved once, refused if any address is not public, connected to the checked
address), redirects included, with a per-request timeout, a deadline for the
whole resolution and a size cap on every answer. The PLC directory's own
address is exempt (an operator may run a mirror inside the network); where it
redirects is not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

import httpx
from prometheus_client import Counter

from streams.connectors.base import ConnectorState, TokenBucket, rate_limit_wait
from streams.safe_http import BoundedBody, FetchError, IPAddress, pin, refuse_private, target, tls_context

log = logging.getLogger("deepwatch.connectors.identity")

DEFAULT_PLC_URL = "https://plc.directory"
MAX_DID_CHARS = 256  # as an event's account_id
MAX_HANDLE_CHARS = 253  # a handle is a DNS name
DID_PLC = re.compile(r"did:plc:[a-z2-7]{24}")
# The atproto handle grammar: at least two labels of 1-63 letters, digits and
# inner hyphens; the last does not start with a digit.
HANDLE = re.compile(r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
# TLDs the handle spec disallows (.test: development only)
RESERVED_TLDS = frozenset({"alt", "arpa", "example", "internal", "invalid", "local", "localhost", "onion", "test"})
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
MAX_DOCUMENT_BYTES = 64 * 1024  # a PLC document is 1-2 KB
MAX_ATPROTO_DID_BYTES = 2048  # the well-known answer is one DID
MAX_PLC_PAUSE_S = 300.0  # the longest a 429's Retry-After from the PLC directory is waited out
ENTRY_OVERHEAD_BYTES = 200  # what a cache entry costs beyond its strings (the dict slot, the tuple, the floats)
# Resolution outcomes (``HandleResolver.counts``): verified; unverified (the
# handle does not resolve back to the DID); no_handle; not_found; bad_document
# (not JSON, or another DID's document); refused (a private address, an
# unusable URL or DID); too_large; and two that are not verdicts: error
# (timeout, network, 429/5xx: asked again after error_ttl_s) and dropped (the
# queue was full: asked again at the DID's next event).
FINAL = ("verified", "unverified", "no_handle", "not_found", "bad_document", "refused", "too_large")
# How resolutions end: an operator sees "unverified" (impersonation claims, or
# handles published by DNS only), "error" (the PLC directory or handle hosts
# failing) and "dropped" (the queue full) without reading logs.
RESOLUTIONS = Counter("deepwatch_connector_handle_resolutions_total",
                      "Bluesky handle resolutions, by outcome (verified, unverified, ..., error, dropped)", ["outcome"])


def normal_handle(value: Any) -> str | None:
    """``value`` as a handle (lowercase), or None when it is none by the atproto grammar."""
    if not isinstance(value, str) or len(value) > MAX_HANDLE_CHARS or not value.isascii():
        return None
    handle = value.lower()
    if not HANDLE.fullmatch(handle) or handle.rsplit(".", 1)[1] in RESERVED_TLDS:
        return None
    return handle


def did_web_host(did: str) -> str | None:
    """The host of a hostname-level ``did:web``, or None. atproto takes no
    path (``did:web:host:path``) and a port (``%3A``) only in development."""
    host = did.removeprefix("did:web:")
    if host == did:
        return None
    return normal_handle(host)


def claimed_handle(did: str, body: bytes) -> str | None:
    """The handle DID document ``body`` claims for ``did``: its first ``at://``
    entry of ``alsoKnownAs``, or None. ``ValueError`` when it is not the
    document of ``did`` (not JSON, not an object, another ``id``)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"not JSON: {str(e)[:100]}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if doc.get("id") != did:
        # a did:web host (or a directory) answering with another account's document
        raise ValueError(f"the document is of {str(doc.get('id'))[:MAX_DID_CHARS]!r}")
    aka = doc.get("alsoKnownAs")
    if not isinstance(aka, list):
        return None
    for uri in aka:
        if isinstance(uri, str) and uri.startswith("at://"):
            # Only the first: a later entry is not the account's handle.
            return normal_handle(uri.removeprefix("at://"))
    return None


def https_origin(host: str) -> str:
    """Where did:web documents and handles' well-known files live (the spec's https, port 443)."""
    return f"https://{host}"


@dataclass(frozen=True, slots=True)
class _Entry:
    handle: str | None
    expires: float  # wall-clock seconds
    size: int


class HandleResolver:
    """DID -> verified handle for the Bluesky mapper: a bounded in-memory
    cache (entries and bytes), backed by the connector's state file
    (``ConnectorState.handle``), fed by identity frames (``learned``) and by
    resolutions that run on at most ``concurrency`` tasks from a queue of at
    most ``queue_max`` DIDs (past that a DID is dropped, counted, and asked
    for again at its next event).

    A verified handle is served for ``hit_ttl_s``, a final miss (no handle,
    unverified, not found, refused) remembered for ``miss_ttl_s``, a failure
    that may pass (timeout, network, 429/5xx) for ``error_ttl_s``. An expired
    handle is not served: after that long it is no verification any more.

    ``plc_url``: the PLC directory (``connectors.plc_url``, passed by
    ``build_bluesky``; the public directory by default).
    ``allow_private``: ``fetch.allow_private_networks``; ``refuse`` overrides
    the address rule altogether, ``origin`` where did:web and handle hosts are
    asked (both for tests on loopback). ``plc_rate_per_s`` (``plc_burst``):
    requests to the PLC directory, which rate-limits per client address; a
    429 from it pauses every worker for its Retry-After (at most
    ``MAX_PLC_PAUSE_S``)."""

    def __init__(self, state: ConnectorState | None = None, *, plc_url: str = DEFAULT_PLC_URL,
                 allow_private: bool = False, refuse: Callable[[str, list[IPAddress]], None] | None = None,
                 origin: Callable[[str], str] = https_origin, request_timeout_s: float = 5.0,
                 resolve_timeout_s: float = 15.0, max_document_bytes: int = MAX_DOCUMENT_BYTES,
                 concurrency: int = 4, queue_max: int = 10_000, cache_max: int = 100_000,
                 cache_max_bytes: int = 32 * 1024 * 1024, hit_ttl_s: float = 24 * 3600.0,
                 miss_ttl_s: float = 3600.0, error_ttl_s: float = 300.0, plc_rate_per_s: float = 5.0,
                 plc_burst: float = 10.0, clock: Callable[[], float] = time.time,
                 user_agent: str = "deepwatch-connector (+https://github.com/deepwatch)"):
        self.state = state
        self.plc_url = plc_url.rstrip("/")
        self._refuse = refuse or (_allow_any if allow_private else refuse_private)
        self.origin = origin
        self.request_timeout_s = request_timeout_s
        self.resolve_timeout_s = resolve_timeout_s
        self.max_document_bytes = max_document_bytes
        self.concurrency = concurrency
        self.queue_max = queue_max
        self.cache_max = cache_max
        self.cache_max_bytes = cache_max_bytes
        self.hit_ttl_s = hit_ttl_s
        self.miss_ttl_s = miss_ttl_s
        self.error_ttl_s = error_ttl_s
        self._clock = clock
        self.user_agent = user_agent
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._queue: asyncio.Queue[str] | None = None
        # DID -> the token of its resolution, from when it is queued until its
        # answer is taken; an identity frame removes it (``learned``)
        self._queued: dict[str, object] = {}
        self._busy = 0  # workers resolving now (one set aside by an identity frame included)
        self._workers: list[asyncio.Task] = []
        self._client: httpx.AsyncClient | None = None
        self.counts: dict[str, int] = dict.fromkeys((*FINAL, "error", "dropped"), 0)
        self._plc_bucket = TokenBucket(plc_rate_per_s, plc_burst)
        self._plc_paused_until = 0.0  # time.monotonic()

    # -- what the mapper calls (never waits) ---------------------------------
    def get(self, did: str) -> str | None:
        """The verified handle of ``did`` if one is known and current; else
        None, and a resolution is queued when nothing current is known."""
        entry = self._cache.get(did)
        now = self._clock()
        if entry is None and self.state is not None:
            saved = self.state.handle(did)
            if saved is not None:
                handle, checked = saved
                entry = self._put(did, handle, checked + (self.hit_ttl_s if handle else self.miss_ttl_s))
        if entry is not None and now < entry.expires:
            self._cache.move_to_end(did)
            return entry.handle
        self._want(did)
        return None

    def learned(self, did: str, handle: str | None) -> None:
        """An identity frame: the relay's word on ``did``'s handle (None: none
        that verifies, ``handle.invalid``). It replaces what was known, and a
        resolution queued or under way for the DID is set aside: it may read
        the document from before the change."""
        if len(did) > MAX_DID_CHARS:
            return
        self._queued.pop(did, None)
        now = self._clock()
        self._put(did, handle, now + (self.hit_ttl_s if handle else self.miss_ttl_s))
        if self.state is not None:
            self.state.save_handle(did, handle, now)

    # -- the cache -------------------------------------------------------------
    def _put(self, did: str, handle: str | None, expires: float) -> _Entry:
        old = self._cache.pop(did, None)
        if old is not None:
            self._bytes -= old.size
        entry = _Entry(handle, expires, len(did) + len(handle or "") + ENTRY_OVERHEAD_BYTES)
        self._cache[did] = entry
        self._bytes += entry.size
        while self._cache and (len(self._cache) > self.cache_max or self._bytes > self.cache_max_bytes):
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.size
        return entry

    @property
    def cached(self) -> tuple[int, int]:
        """(entries, bytes) held in memory."""
        return len(self._cache), self._bytes

    # -- the workers -------------------------------------------------------------
    def _want(self, did: str) -> None:
        if did in self._queued or len(did) > MAX_DID_CHARS:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a mapper used outside a loop (a one-off mapping): nothing to run it on
        if self._queue is None:
            self._queue = asyncio.Queue(self.queue_max)
        self._workers = [w for w in self._workers if not w.done()]
        while len(self._workers) < self.concurrency:
            self._workers.append(asyncio.create_task(self._work(), name="handle-resolver"))
        try:
            self._queue.put_nowait(did)
        except asyncio.QueueFull:
            self.counts["dropped"] += 1
            RESOLUTIONS.labels("dropped").inc()
            return
        self._queued[did] = object()

    async def _work(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            did = await queue.get()
            token = self._queued.get(did)
            if token is None:
                continue  # an identity frame came while it waited: nothing to ask
            self._busy += 1
            try:
                outcome, handle = await self.verify(did)
            except Exception as e:  # a bug must not end the worker
                log.exception("handle resolution failed", extra={"connector": "bluesky", "did": did[:MAX_DID_CHARS],
                                                                 "error": str(e)[:300]})
                outcome, handle = "error", None
            finally:
                self._busy -= 1
            self.counts[outcome] += 1
            RESOLUTIONS.labels(outcome).inc()
            if self._queued.get(did) is not token:
                continue  # an identity frame came meanwhile: its word stands
            del self._queued[did]
            now = self._clock()
            ttl = self.hit_ttl_s if handle else self.miss_ttl_s if outcome in FINAL else self.error_ttl_s
            self._put(did, handle, now + ttl)
            if self.state is not None and outcome in FINAL:
                self.state.save_handle(did, handle, now)

    async def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until nothing is queued or being resolved (for tests); TimeoutError past ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while self._queued or self._busy:
                await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        """Stop the workers (what they were resolving is asked again next run) and close the connections."""
        for w in self._workers:
            w.cancel()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._queue = None
        self._queued.clear()
        self._busy = 0
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- resolution ------------------------------------------------------------
    async def verify(self, did: str) -> tuple[str, str | None]:
        """(outcome, handle): ``verified`` and the handle, or another outcome
        (``FINAL``, or ``error``) and None. Never longer than ``resolve_timeout_s``."""
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                return await self._verify(did)
        except TimeoutError:
            return "error", None
        except FetchError as e:
            if e.reason == "too_large":
                return "too_large", None
            return ("error" if e.retryable else "refused"), None

    def document_url(self, did: str) -> tuple[str, bool] | None:
        """Where ``did``'s document is asked for, and whether that first
        address is trusted (the configured PLC directory), or None for a DID
        this does not resolve."""
        if DID_PLC.fullmatch(did):
            return f"{self.plc_url}/{did}", True
        host = did_web_host(did)
        if host is not None:
            return f"{self.origin(host)}/.well-known/did.json", False
        return None

    async def _verify(self, did: str) -> tuple[str, str | None]:
        where = self.document_url(did)
        if where is None:
            return "refused", None
        if where[1]:
            await self._plc_turn()
        status, body = await self._get(where[0], self.max_document_bytes, "application/did+ld+json, application/json",
                                       trusted=where[1])
        if status != 200:
            return _status_outcome(status), None
        try:
            handle = claimed_handle(did, body)
        except ValueError as e:
            log.info("unusable DID document", extra={"did": did, "error": str(e)})
            return "bad_document", None
        if handle is None:
            return "no_handle", None
        status, body = await self._get(f"{self.origin(handle)}/.well-known/atproto-did", MAX_ATPROTO_DID_BYTES,
                                       "text/plain")
        if status != 200:
            outcome = _status_outcome(status)
            return ("error" if outcome == "error" else "unverified"), None
        if body.decode("utf-8", "replace").strip() != did:
            return "unverified", None
        return "verified", handle

    async def _plc_turn(self) -> None:
        """Wait for the PLC directory's rate and any pause it asked for."""
        while True:
            pause = self._plc_paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            wait = self._plc_bucket.take()
            if wait == 0.0:
                return
            await asyncio.sleep(wait)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=tls_context(), timeout=httpx.Timeout(self.request_timeout_s), follow_redirects=False,
                headers={"User-Agent": self.user_agent, "Accept-Encoding": "identity"},
                trust_env=False,  # a proxy would bypass the address checks
                limits=httpx.Limits(max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency),
            )
        return self._client

    async def _get(self, url: str, limit: int, accept: str, *, trusted: bool = False) -> tuple[int, bytes]:
        """(status, body) of GET ``url``, redirects followed (each hop's
        address checked, unless it is the trusted first one; never from https
        to http), at most ``limit`` bytes, each hop within ``request_timeout_s``
        (a server dripping bytes resets no read timeout past it)."""
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            to = target(current)
            pinned = await pin(to, _allow_any if trusted and hop == 0 else self._refuse,
                               timeout_s=self.request_timeout_s)
            sent = pinned.url.copy_with(username=None, password=None, fragment=None)
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    async with self._http().stream("GET", sent, headers={"Host": pinned.host_header, "Accept": accept},
                                                   extensions={"sni_hostname": pinned.sni}) as resp:
                        if resp.status_code in REDIRECTS:
                            location = resp.headers.get("location")
                            if not location:
                                return resp.status_code, b""
                            nxt = urljoin(current, location)
                            if urlsplit(current).scheme == "https" and urlsplit(nxt).scheme != "https":
                                raise FetchError("bad_url", f"{current} redirects to plain http")
                            current = nxt
                            continue
                        if resp.status_code == 429 and trusted and hop == 0:
                            wait = min(max(rate_limit_wait(resp.headers), 1.0), MAX_PLC_PAUSE_S)
                            self._plc_paused_until = max(self._plc_paused_until, time.monotonic() + wait)
                            log.warning("the PLC directory asks to slow down; handle resolutions pause",
                                        extra={"connector": "bluesky", "wait_s": round(wait, 1)})
                        if resp.status_code != 200:
                            return resp.status_code, b""
                        declared = resp.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > limit:
                            raise FetchError("too_large", f"{current} declares {declared} bytes, limit {limit}")
                        body = BoundedBody(resp.headers.get("content-encoding", ""), limit, current)
                        async for chunk in resp.aiter_raw():
                            body.feed(chunk)
                        return 200, body.bytes()
            except TimeoutError:
                raise FetchError("timeout", f"{current} took longer than {self.request_timeout_s:g}s",
                                 retryable=True) from None
            except httpx.TimeoutException as e:
                raise FetchError("timeout", f"{current}: {type(e).__name__}", retryable=True) from None
            except httpx.TransportError as e:  # connect, protocol, read errors
                raise FetchError("unreachable", f"{current}: {str(e)[:200]}", retryable=True) from None
            except (httpx.InvalidURL, UnicodeError, ValueError) as e:
                raise FetchError("bad_url", f"invalid URL {current[:200]!r}: {e}") from None
        raise FetchError("too_many_redirects", f"more than {MAX_REDIRECTS} redirects from {url}")


def _status_outcome(status: int) -> str:
    if status == 429 or status >= 500:
        return "error"
    return "not_found"  # 404, 410 (a tombstoned did:plc), or any other refusal: no document to read


def _allow_any(host: str, addrs: list[IPAddress]) -> None:
    """Every address may be contacted (``fetch.allow_private_networks``, the configured PLC directory)."""
