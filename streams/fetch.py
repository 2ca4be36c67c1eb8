"""Stage 2: get an event's image bytes — from a URL, a local path under an
allowed root, or inline base64 — with every limit enforced.

URL fetching is an SSRF surface: a hostile post can point at the metadata
service or an internal admin page. Every hop (redirects included) is resolved
here, all of its addresses are checked, and the connection goes to the checked
address (Host header and TLS SNI keep the original name), so DNS cannot answer
differently between the check and the connect.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import functools
import ipaddress
import os
import socket
import ssl
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from detectors.regular_file import FileRefused, read_regular
from streams.blobstore import BlobStore
from streams.host_breaker import HostBreaker, HostUnavailable
from streams.records import ImageEvent
from streams.settings import FetchSettings, IngestSettings


class FetchError(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool = False):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


# Magic numbers of the formats we decode; anything else is refused before decode.
_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def sniff_image_type(data: bytes) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "image/heif"
    return None


# Longest wait for a DNS answer (the system resolver, timing out and retrying
# each of its servers, can take 30 s or more).
DNS_TIMEOUT_S = 5.0

# httpcore's words for a connection closed before a status line came
# (a server restarting, a kept-alive connection it dropped as it was reused):
# worth another try, unlike an answer that is not HTTP.
_NO_ANSWER = "without sending a response"

# Statuses whose Location is followed; any other 3xx (300, 304, 305) is an
# answer without an image, not a redirect.
_REDIRECTS = (301, 302, 303, 307, 308)


class BoundedBody:
    """A response body decoded from its raw bytes with the size limit applied
    to the bytes received *and* to the decoded bytes as they are produced,
    never after. httpx's own decoding inflates each chunk in full and stacks
    encodings: a 7 KB body sent as ``Content-Encoding: gzip, gzip`` inflates
    to gigabytes in one call, on the event loop. Images are compressed
    already, so only ``identity`` is asked for; a server that encodes anyway
    may use one layer of gzip or deflate (zlib or raw), anything else is
    refused."""

    def __init__(self, encoding: str, limit: int, where: str):
        self.limit = limit
        self.where = where
        self.received = 0
        self.total = 0
        self.chunks: list[bytes] = []
        codings = [c.strip().lower() for c in encoding.split(",") if c.strip().lower() not in ("", "identity")]
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise FetchError("bad_encoding", f"{where} sent Content-Encoding {encoding[:100]!r}; "
                             "only one layer of gzip or deflate is accepted")
        # wbits 47: a gzip or a zlib header, whichever comes
        self._inflate = zlib.decompressobj(47) if codings else None
        # deflate sent without the zlib header (raw) is common: until the first
        # output proves the header, keep the input to start over raw
        self._unproven: bytes | None = b"" if codings == ["deflate"] else None

    def feed(self, raw: bytes) -> None:
        if self._inflate is None:
            return self._keep(raw)
        # Compressed bytes are bounded too: input past the end of a gzip stream
        # (kept by zlib as unused_data) and empty deflate blocks inflate to nothing.
        self.received += len(raw)
        if self.received > self.limit:
            raise FetchError("too_large", f"{self.where} sent over {self.limit} compressed bytes")
        self._inflate_and_keep(raw)

    def _inflate_and_keep(self, raw: bytes) -> None:
        if self._unproven is not None:
            self._unproven += raw
        try:
            # At most one byte past the limit per call: a bomb never inflates further.
            out = self._inflate.decompress(raw, self.limit - self.total + 1)
        except zlib.error as e:
            if self._unproven is None:
                raise FetchError("bad_response", f"{self.where}: corrupt compressed body: {e}") from None
            seen, self._unproven = self._unproven, None
            self._inflate = zlib.decompressobj(-15)
            return self._inflate_and_keep(seen)
        if out:
            self._unproven = None
        self._keep(out)

    def _keep(self, data: bytes) -> None:
        self.total += len(data)
        if self.total > self.limit:
            raise FetchError("too_large", f"{self.where} exceeds {self.limit} bytes")
        self.chunks.append(data)

    def bytes(self) -> bytes:
        return b"".join(self.chunks)


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and that a gateway would reach:
    IPv4-mapped, 6to4 (2002::/16), Teredo (2001::/32) and NAT64 (RFC 6052)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        found.extend(ip.teredo)
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def public_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is a public address: the fetch stage's rule, and the
    webhooks' without ``alerts.allow_private_webhooks``. An IPv6 address
    that embeds an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return public_address(ip.ipv4_mapped)
        inner = embedded_ipv4(ip)
        if inner:
            # The gateway's address space is global; what it forwards to is not necessarily.
            return all(public_address(a) for a in inner)
        if ip.is_site_local:  # fec0::/10: deprecated, but still routed inside some networks
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


# -- name resolution --------------------------------------------------------
# DNS lookups run on threads of their own, never the event loop's default
# pool: a lookup that times out (DNS_TIMEOUT_S) keeps its thread until the
# system resolver gives up, and with the default pool (cpu + 4 threads) a few
# names on a dead DNS server made every other lookup, local-file read and
# analysis queue behind them. At most DNS_THREADS lookups run at once and
# DNS_WAITING more wait for a thread; past that a lookup fails at once
# (``dns_failure``, retryable) rather than queueing without bound.
DNS_THREADS = 8
DNS_WAITING = 32


class _DnsPool:
    def __init__(self, threads: int, waiting: int):
        self.threads = threads
        self.limit = threads + waiting
        self._reset()

    def _reset(self) -> None:
        # Also in a forked child: the parent's threads and lock are not its own.
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future | None:
        """``fn(*args)`` on a DNS thread, or None when ``limit`` lookups are
        already running or waiting. A waiting lookup whose caller gave up
        (its future cancelled) leaves the queue without running."""
        with self._lock:
            if self._pending >= self.limit:
                return None
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="deepwatch-dns")
            try:
                fut = self._pool.submit(fn, *args)
            except RuntimeError:  # the interpreter is shutting down
                return None
            self._pending += 1
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        return self._pending


DNS_POOL = _DnsPool(DNS_THREADS, DNS_WAITING)
os.register_at_fork(after_in_child=DNS_POOL._reset)


def _getaddrinfo(host: str, port: int) -> list:
    # socket.getaddrinfo looked up at each call: tests stand in a resolver of their own
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def resolve(host: str, port: int, timeout_s: float = DNS_TIMEOUT_S) -> list[IPAddress]:
    """Every address ``host`` resolves to, or ``FetchError``: ``dns_failure``
    (retryable) when it cannot be resolved within ``timeout_s``, or all DNS
    threads are busy; ``bad_url`` when it is no resolvable name at all. The
    one resolver of the fetch stage, the URL policy and webhook delivery."""
    fut = DNS_POOL.submit(_getaddrinfo, host, port)
    if fut is None:
        raise FetchError("dns_failure", f"cannot resolve {host}: all {DNS_POOL.limit} DNS lookups are busy "
                         "(a slow or unreachable DNS server?)", retryable=True)
    try:
        async with asyncio.timeout(timeout_s):
            infos = await asyncio.wrap_future(fut)
    except TimeoutError:
        raise FetchError("dns_failure", f"resolving {host} took longer than {timeout_s:g}s", retryable=True) from None
    except socket.gaierror as e:
        raise FetchError("dns_failure", f"cannot resolve {host}: {e}", retryable=True) from None
    except (UnicodeError, ValueError) as e:  # IDNA failures, NUL bytes: never a resolvable name
        raise FetchError("bad_url", f"invalid host name {host[:100]!r}: {e}") from None
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addrs:
        raise FetchError("dns_failure", f"{host} has no addresses")
    return addrs


def refuse_private(host: str, addrs: list[IPAddress]) -> None:
    """The fetch stage's rule: refuse if ANY address is not public (a
    round-robin answer mixing a public and a private address is a classic
    rebinding trick)."""
    blocked = [str(a) for a in addrs if not public_address(a)]
    if blocked:
        raise FetchError(
            "blocked_address",
            f"{host} resolves to non-public address {', '.join(blocked)}; "
            "set fetch.allow_private_networks to allow",
        )


async def resolve_checked(host: str, port: int, allow_private: bool, timeout_s: float = DNS_TIMEOUT_S) -> str:
    """Resolve ``host`` and return one address that may be contacted. The
    answer is awaited ``timeout_s`` at most: the system resolver's own
    retries can take far longer, and callers outside a fetch (the
    connectors' and ingest endpoint's URL policy) have no other deadline."""
    addrs = await resolve(host, port, timeout_s)
    if not allow_private:
        refuse_private(host, addrs)
    return str(addrs[0])


@dataclass(frozen=True)
class Pinned:
    """A URL resolved, checked and pinned: ``url`` names the checked
    address instead of the host, ``host_header`` and ``sni`` keep the
    name (ASCII: IDNA names in punycode; an IPv6 literal bracketed in the
    Host header, with the port when the URL gives one other than the
    scheme's)."""

    url: httpx.URL
    host_header: str
    sni: str


def _request_url(url: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except httpx.InvalidURL:
        # httpx encodes names by IDNA 2008, which refuses some that the
        # system resolver's IDNA 2003 codec maps (full-width letters, say):
        # those are taken as the resolver would read them.
        parts = urlsplit(url)
        host = parts.hostname
        if not host or host.isascii():
            raise
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise httpx.InvalidURL(f"Invalid IDNA hostname: {host[:100]!r}") from None
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (f"{userinfo}@" if userinfo else "") + ascii_host + (f":{parts.port}" if parts.port else "")
        return httpx.URL(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))


@dataclass(frozen=True)
class Target:
    """The host and port a URL makes deepwatch contact, read once, as httpx
    sends the request. Everything that judges a URL before the request (the
    URL policy of the connectors and the ingest endpoint, the fetcher's host
    breaker) reads it from here: ``urlsplit`` read some URLs as another host
    or as fine where httpx refuses them (``"http://a.com\t.evil/"``)."""

    url: httpx.URL
    host: str  # ASCII: IDNA names in punycode, an IPv6 literal without brackets
    port: int

    @property
    def key(self) -> str:
        """``host:port``, per host and port (the breaker's, the policy's cache)."""
        return f"{self.host}:{self.port}"


def target(url: str) -> Target:
    """What requesting ``url`` contacts; ``FetchError`` ``bad_url`` for a
    URL httpx cannot send or deepwatch will not (not http(s), no host), or
    one ``urlsplit`` refuses as well: a host part that Unicode normalisation
    changes (``a\uff03b@host``, a full-width "#") reads as another host to a
    reader that normalises it."""
    try:
        urlsplit(url).port  # raises ValueError for that, "port 99999" or "[::1/x"
        parsed = _request_url(url)
        host = parsed.raw_host.decode("ascii")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except (httpx.InvalidURL, UnicodeError, ValueError) as e:
        raise FetchError("bad_url", f"invalid URL {url[:200]!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise FetchError("bad_url", f"refusing to fetch {url[:200]!r}")
    return Target(parsed, host, port)


async def pin(url: str | Target, refuse: Callable[[str, list[IPAddress]], None],
              timeout_s: float = DNS_TIMEOUT_S) -> Pinned:
    """Resolve ``url``'s host once, let ``refuse`` raise the caller's own
    refusal of the addresses, and pin the request to the first one: a DNS
    answer that changes between the check and the connection (rebinding)
    cannot slip a refused address in. ``FetchError`` ``bad_url`` as
    ``target`` (for a URL not read yet), ``dns_failure`` as ``resolve``."""
    to = url if isinstance(url, Target) else target(url)
    addrs = await resolve(to.host, to.port, timeout_s)
    refuse(to.host, addrs)
    return Pinned(url=to.url.copy_with(host=str(addrs[0])),
                  host_header=to.url.netloc.decode("ascii").rpartition("@")[2], sni=to.host)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once per process: reading the
    CA bundle costs ~50-100 ms, and the zygote (``streams.zygote.preload``)
    builds it before it forks the workers."""
    return httpx.create_ssl_context()


def _allow_any(host: str, addrs: list[IPAddress]) -> None:
    """``fetch.allow_private_networks``: every address may be contacted."""


class ImageFetcher:
    def __init__(self, fetch: FetchSettings, ingest: IngestSettings, blobs: BlobStore | None = None,
                 breaker: HostBreaker | None = None):
        """``breaker``: shared by the fetchers of one process (what they learn
        of a host is the process's); by default this fetcher's own."""
        self.cfg = fetch
        self.blobs = blobs
        self.ingest = ingest
        self._roots: dict[tuple[str, ...], list[Path]] = {}
        self.breaker = breaker or HostBreaker(fetch.breaker_timeouts, fetch.breaker_cooldown_s)
        self._client = httpx.AsyncClient(
            verify=tls_context(),
            timeout=httpx.Timeout(fetch.read_timeout_s, connect=fetch.connect_timeout_s),
            follow_redirects=False,  # each hop is re-checked below
            headers={"User-Agent": fetch.user_agent, "Accept": "image/*", "Accept-Encoding": "identity"},
            trust_env=False,  # a proxy would bypass the address checks
        )

    def _resolved_roots(self, roots: tuple[Path, ...]) -> list[Path]:
        # Resolved once per set of roots, not per event: resolving walks every
        # path component with a syscall. A root repointed later keeps the
        # directory it named when first used, the stricter of the two readings.
        key = tuple(str(r) for r in roots)
        resolved = self._roots.get(key)
        if resolved is None:
            resolved = self._roots[key] = [Path(r).resolve() for r in roots]
        return resolved

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, event: ImageEvent, extra_roots: list[Path] | None = None) -> bytes:
        """The image bytes, or ``FetchError``; never longer than
        ``fetch.total_timeout_s`` whatever the source does."""
        try:
            async with asyncio.timeout(self.cfg.total_timeout_s):
                return await self._get(event, extra_roots)
        except TimeoutError:
            where = event.image.url or event.image.path or "image"
            raise FetchError("timeout", f"fetching {where[:200]} took longer than {self.cfg.total_timeout_s}s "
                             "(fetch.total_timeout_s)") from None

    async def _get(self, event: ImageEvent, extra_roots: list[Path] | None) -> bytes:
        ref = event.image
        if ref.base64 is not None:
            return self._inline(ref.base64)
        if ref.blob is not None:
            if self.blobs is None or not self.blobs.exists(ref.blob):
                raise FetchError("not_found", f"blob {ref.blob} is not in the blob store")
            return self.blobs.get(ref.blob)
        if ref.path is not None:
            return await asyncio.to_thread(self._local, ref.path, extra_roots or [])
        assert ref.url is not None
        return await self._url(ref.url)

    def read_local(self, event: ImageEvent) -> bytes | None:
        """A local ``path`` image's bytes, or None when the image is not a
        local path. The same checks as ``get``; blocking, but only on a
        regular file of at most ``fetch.max_bytes`` below the image roots."""
        if event.image.path is None or event.image.base64 is not None or event.image.blob is not None:
            return None
        return self._local(event.image.path, [])

    # -- inline -------------------------------------------------------------
    def _inline(self, b64: str) -> bytes:
        cap = self.ingest.max_inline_bytes
        if len(b64) > (cap * 4) // 3 + 4:
            raise FetchError("too_large", f"inline image exceeds {cap} bytes")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise FetchError("bad_base64", f"inline image is not valid base64: {e}") from None
        return self._check_type(data, "inline image")

    # -- local path ---------------------------------------------------------
    def _local(self, path: str, extra_roots: list[Path]) -> bytes:
        roots = self._resolved_roots((*self.ingest.image_roots, *extra_roots))
        if not roots:
            raise FetchError("path_not_allowed", "local image paths are disabled (no image roots configured)")
        shown = repr(path[:200])
        try:
            target = Path(path)
            # Relative paths are relative to the first root (the feed's own directory in replay).
            resolved = (roots[0] / target).resolve() if not target.is_absolute() else target.resolve()
        except (OSError, ValueError, RuntimeError) as e:  # symlink loop, NUL byte, name too long
            raise FetchError("bad_path", f"{shown}: {e}") from None
        if not any(resolved.is_relative_to(r) for r in roots):
            raise FetchError("path_not_allowed", f"{shown} is outside the allowed image roots")
        try:
            data = self._read_regular(resolved, shown)
        except FetchError as e:
            if e.reason == "not_found" and not target.is_absolute():  # say where it looked
                raise FetchError("not_found", f"{e.detail} under {roots[0]} (a relative path is taken from the "
                                 "first image root: the feed's directory in replay)") from None
            raise
        return self._check_type(data, shown)

    def _read_regular(self, resolved: Path, shown: str) -> bytes:
        # Never blocks on a FIFO and reads only a regular file (devices and
        # sockets never are); O_NOFOLLOW: ``resolved`` has no symlink left,
        # so one there now is a swap made after the root check.
        try:
            return read_regular(resolved, self.cfg.max_bytes, shown=shown, follow_symlinks=False)
        except FileRefused as e:
            raise FetchError(e.reason, str(e)) from None

    # -- URL ----------------------------------------------------------------
    async def _url(self, url: str) -> bytes:
        attempt = 0
        while True:
            try:
                return await self._url_once(url)
            except FetchError as e:
                if not e.retryable or attempt >= self.cfg.retries:
                    raise
            attempt += 1
            await asyncio.sleep(min(0.25 * 2**attempt, 4.0))

    async def _url_once(self, url: str) -> bytes:
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            to = target(current)
            host = to.key
            try:
                self.breaker.check(host)
            except HostUnavailable as e:
                raise FetchError("host_unavailable", e.detail) from None
            try:
                data, location = await self._hop(current, to)
            except FetchError as e:
                if e.reason == "timeout":
                    self.breaker.timed_out(host)
                else:
                    self.breaker.answered(host)
                raise
            except BaseException as e:
                # Cancelled: fetch.total_timeout_s or the event's deadline, it
                # stalled us. Anything else still ends a try let through.
                if isinstance(e, asyncio.CancelledError):
                    self.breaker.timed_out(host)
                else:
                    self.breaker.answered(host)
                raise
            self.breaker.answered(host)
            if data is not None:
                return data
            current = urljoin(current, location)
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects from {url}")

    async def _hop(self, current: str, to: Target) -> tuple[bytes | None, str]:
        """One request: the image's bytes, or (None, the redirect's Location)."""
        refuse = _allow_any if self.cfg.allow_private_networks else refuse_private
        pinned = await pin(to, refuse)
        # User info in an image URL is never sent on (it was not before pinning either).
        sent = pinned.url.copy_with(username=None, password=None, fragment=None)
        try:
            async with self._client.stream(
                "GET", sent, headers={"Host": pinned.host_header},
                extensions={"sni_hostname": pinned.sni},
            ) as resp:
                if resp.status_code in _REDIRECTS:
                    location = resp.headers.get("location")
                    if not location:
                        raise FetchError("bad_response", f"redirect without Location from {current}")
                    return None, location
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise FetchError("http_error", f"HTTP {resp.status_code} from {current}", retryable=True)
                if resp.status_code != 200:
                    raise FetchError("http_error", f"HTTP {resp.status_code} from {current}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
                    raise FetchError("too_large", f"{current} declares {declared} bytes, limit {self.cfg.max_bytes}")
                body = BoundedBody(resp.headers.get("content-encoding", ""), self.cfg.max_bytes, current)
                async for chunk in resp.aiter_raw():
                    body.feed(chunk)
                return self._check_type(body.bytes(), current), ""
        except httpx.TimeoutException as e:
            raise FetchError("timeout", f"timed out fetching {current}: {type(e).__name__}", retryable=True) from None
        except httpx.RemoteProtocolError as e:
            if _NO_ANSWER in str(e):
                raise FetchError("unreachable", f"{current} closed the connection without answering",
                                 retryable=True) from None
            # The server answered, with something that is not HTTP: asking
            # again gets the same answer.
            raise FetchError("bad_response", f"{current} sent a malformed HTTP response: {str(e)[:200]}") from None
        except httpx.TransportError as e:
            raise FetchError("unreachable", f"cannot connect to {current}: {e}", retryable=True) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError, ValueError) as e:
            raise FetchError("bad_url", f"invalid URL {current[:200]!r}: {e}") from None

    @staticmethod
    def _check_type(data: bytes, where: str) -> bytes:
        if not data:
            raise FetchError("empty", f"{where} is empty")
        if sniff_image_type(data) is None:
            raise FetchError("not_an_image", f"{where} is not a supported image format (first bytes {data[:8]!r})")
        return data
