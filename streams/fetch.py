"""Stage 2: get an event's image bytes — from a URL, a local path under an
allowed root, or inline base64 — with every limit enforced.

URL fetching is an SSRF surface: a hostile post can point at the metadata
service or an internal admin page. Every hop (redirects included) is resolved,
all of its addresses are checked, and the connection goes to the checked
address (Host header and TLS SNI keep the original name), so DNS cannot answer
differently between the check and the connect: ``streams.safe_http`` does
that, for this stage and every other outbound request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
from pathlib import Path
from urllib.parse import urljoin

import httpx

from detectors.regular_file import FileRefused, read_regular
from streams.blobstore import BlobStore
from streams.host_breaker import HostBreaker, HostUnavailable
from streams.records import ImageEvent
from streams.safe_http import BoundedBody, FetchError, IPAddress, Target, pin, refuse_private, target, tls_context
from streams.settings import FetchSettings, IngestSettings


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


# httpcore's words for a connection closed before a status line came
# (a server restarting, a kept-alive connection it dropped as it was reused):
# worth another try, unlike an answer that is not HTTP.
_NO_ANSWER = "without sending a response"
# h11's words for a connection closed (FIN, not reset) before the body its
# Content-Length promised: a host restarting or dropping connections, which
# asking again may get past; not a malformed answer.
_CUT_BODY = "without sending complete message body"

# Statuses whose Location is followed; any other 3xx (300, 304, 305) is an
# answer without an image, not a redirect.
_REDIRECTS = (301, 302, 303, 307, 308)


# Errnos of a connection the host ended (reset, aborted, a write to a closed
# one): said as such, whichever call met it.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})


def _root_os_error(e: BaseException) -> OSError | None:
    """The innermost ``OSError`` with an errno among ``e``'s causes (httpx
    wraps httpcore's error, which wraps anyio's, which wraps the socket's)."""
    found, seen = None, 0
    cur: BaseException | None = e
    while cur is not None and seen < 16:
        if isinstance(cur, OSError) and cur.errno:
            found = cur
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return found


def transport_cause(e: httpx.TransportError) -> str:
    """What happened to the connection, in words, never empty: "connection
    refused (ECONNREFUSED)", "connection reset by the host while reading the
    answer (ECONNRESET)", ... (``e`` itself often says nothing)."""
    root = _root_os_error(e)
    code = errno.errorcode.get(root.errno, "") if root is not None and root.errno else ""
    if isinstance(e, httpx.ConnectError):
        if code == "ECONNREFUSED":
            said = "connection refused"
        elif root is not None and root.errno in _RESET_ERRNOS:
            said = "connection reset by the host while connecting"
        elif root is not None and root.strerror:  # no route to host, network unreachable, ...
            said = root.strerror[:1].lower() + root.strerror[1:]
        else:
            said = str(e)  # a TLS handshake's failure says what it is
    elif isinstance(e, (httpx.ReadError, httpx.WriteError)):
        doing = "reading the answer" if isinstance(e, httpx.ReadError) else "sending the request"
        if root is None or root.errno in _RESET_ERRNOS:
            said = f"connection {'reset by the host' if root is not None else 'lost'} while {doing}"
        else:
            said = f"{root.strerror or root} while {doing}"
    else:
        said = str(e)
    said = (said or (str(root) if root is not None else "") or type(e).__name__)[:300]
    return f"{said} ({code})" if code and code not in said else said


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
            if _CUT_BODY in str(e):
                raise FetchError("unreachable", f"{current} closed the connection partway through the answer "
                                                f"({str(e).partition('(')[2].rstrip(')') or 'body cut short'})",
                                 retryable=True) from None
            # The server answered, with something that is not HTTP: asking
            # again gets the same answer.
            raise FetchError("bad_response", f"{current} sent a malformed HTTP response: "
                                             f"{(str(e) or type(e).__name__)[:200]}") from None
        except httpx.TransportError as e:
            # A refused connect and a connection the host reset after reading
            # the request both land here; httpx's ReadError says nothing
            # (str() is empty: it read "cannot connect to URL: "), its cause does.
            said = transport_cause(e)
            where = f"cannot connect to {current}" if isinstance(e, httpx.ConnectError) else f"fetching {current}"
            raise FetchError("unreachable", f"{where}: {said}", retryable=True) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError, ValueError) as e:
            raise FetchError("bad_url", f"invalid URL {current[:200]!r}: {e}") from None

    @staticmethod
    def _check_type(data: bytes, where: str) -> bytes:
        if not data:
            raise FetchError("empty", f"{where} is empty")
        if sniff_image_type(data) is None:
            raise FetchError("not_an_image", f"{where} is not a supported image format (first bytes {data[:8]!r})")
        return data
