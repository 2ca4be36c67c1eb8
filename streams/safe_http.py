"""Outbound HTTP that never reaches a private address: the one place
deepwatch resolves, checks and pins a host before it connects, shared by the
fetch stage (``streams.fetch``), webhook delivery, the connectors' URL policy
and atproto identity lookups, and the ingest endpoint.

* ``target`` reads a URL once, as httpx sends it (host in punycode, port),
  refusing what is not http(s) or has no host (``FetchError`` ``bad_url``).
* ``resolve`` looks the host up on a bounded pool of DNS threads of its own
  (``DNS_THREADS`` at once, ``DNS_WAITING`` queued, ``DNS_TIMEOUT_S`` at most).
* ``public_address`` / ``refuse_private`` refuse loopback, private, link-local,
  multicast and reserved addresses, IPv4 embedded in IPv6 (mapped, 6to4,
  Teredo, NAT64: ``embedded_ipv4``) judged by the IPv4 one; ``resolve_checked``
  resolves and checks.
* ``pin`` resolves once, lets the caller refuse, and pins the request to the
  checked address (Host header and TLS SNI keep the name), so DNS cannot answer
  differently between the check and the connect (rebinding).
* ``BoundedBody`` decodes a response body with its size limit applied to the
  bytes received and to the inflated bytes as they are produced (no
  decompression bombs, one layer of gzip/deflate at most).
* ``tls_context`` is the verifying TLS context, built once per process.

Every refusal is a ``FetchError`` (``reason``, ``detail``, ``retryable``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import os
import socket
import ssl
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

class FetchError(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool = False):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable



# Longest wait for a DNS answer (the system resolver, timing out and retrying
# each of its servers, can take 30 s or more).
DNS_TIMEOUT_S = 5.0


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
