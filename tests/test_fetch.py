"""ImageFetcher against a real HTTP server on 127.0.0.1.

The server is a threaded ``http.server`` so the fetcher's real httpx stack,
address pinning and redirect handling are exercised; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import socket
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import streams.safe_http as safe_http
from streams.fetch import ImageFetcher
from streams.records import ImageEvent
from streams.safe_http import FetchError
from streams.settings import FetchSettings, IngestSettings


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def _gzip_of_zeros(mb: int) -> bytes:
    """``mb`` MiB of zeros, gzipped (~1 KB per MiB): a decompression bomb."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    return b"".join(comp.compress(block) for _ in range(mb)) + comp.flush()


GZIP_BOMB = _gzip_of_zeros(256)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: a body without Content-Length is read until the server closes,
    # which is how the "undeclared size" case streams past the cap.
    protocol_version = "HTTP/1.0"
    server: "_Server"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
            n = srv.hits[self.path]
            srv.hosts.append(self.headers.get("Host"))
        p = self.path
        if p == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif p == "/big-declared":
            # Declares more than the cap; the fetcher must not read the body.
            self._send(200, PNG, {"Content-Length": "10000000"}, length=False)
        elif p == "/big-streamed":
            self._send(200, PNG + b"\0" * 5000, length=False)
        elif p == "/missing":
            self._send(404, b"not here")
        elif p == "/unavailable":
            self._send(503, b"try later")
        elif p == "/flaky":
            self._send(503 if n == 1 else 200, b"later" if n == 1 else PNG)
        elif p == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        elif p == "/html":
            self._send(200, b"<html><body>definitely a picture</body></html>", {"Content-Type": "image/png"})
        elif p == "/to-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif p == "/to-img":
            self._send(301, headers={"Location": "/img.png"})
        elif p == "/not-modified":
            self._send(304)
        elif p == "/gzip-img":
            self._send(200, zlib.compress(PNG, wbits=31), {"Content-Encoding": "gzip"})
        elif p == "/raw-deflate-img":
            comp = zlib.compressobj(9, zlib.DEFLATED, -15)
            self._send(200, comp.compress(PNG) + comp.flush(), {"Content-Encoding": "deflate"})
        elif p == "/gzip-bomb":
            self._send(200, GZIP_BOMB, {"Content-Encoding": "gzip"})
        elif p == "/gzip-gzip-bomb":
            self._send(200, zlib.compress(GZIP_BOMB, 9, wbits=31), {"Content-Encoding": "gzip, gzip"})
        elif p == "/gzip-then-garbage":
            self._send(200, zlib.compress(PNG, wbits=31) + bytes(5000), {"Content-Encoding": "gzip"})
        elif p in _MALFORMED:
            self.wfile.write(_MALFORMED[p])
        elif p == "/no-answer":
            pass  # the connection closes with nothing sent
        else:
            self._send(500, b"unknown test path")


# Answers that are not HTTP, sent as raw bytes; h11 refuses each of them. (A
# body cut short by a closed connection is retried: test_fetch_reset.)
_MALFORMED = {
    "/conflicting-length": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: %d\r\n\r\n" % len(PNG) + PNG,
    "/negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n" + PNG,
    "/garbage-status": b"\x00\xff garbage not http\r\n\r\n",
    "/http09": PNG + b"\r\n\r\n",  # a body without a status line (a line end in it, as in any real image)
    "/huge-header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n" + PNG,
    "/many-headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20_000)) + b"\r\n" + PNG,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler still sleeping in /slow must not hold up teardown

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__((host, 0), _Handler)
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}
        self.hosts: list[str | None] = []


@pytest.fixture
def server():
    srv = _Server()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: _Server, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def _event(**image) -> ImageEvent:
    return ImageEvent.model_validate({
        "event_id": "evt-1", "platform": "x", "account_id": "acct-1",
        "posted_at": "2026-11-20T10:00:00+00:00", "image": image,
    })


def _get(event: ImageEvent, fetch: FetchSettings | None = None, ingest: IngestSettings | None = None,
         extra_roots: list[Path] | None = None) -> bytes:
    async def go() -> bytes:
        f = ImageFetcher(fetch or FetchSettings(), ingest or IngestSettings())
        try:
            return await f.get(event, extra_roots)
        finally:
            await f.aclose()

    return asyncio.run(go())


def _fail(*args, **kwargs) -> FetchError:
    with pytest.raises(FetchError) as info:
        _get(*args, **kwargs)
    return info.value


LOOPBACK_OK = FetchSettings(allow_private_networks=True, retries=0, read_timeout_s=5, connect_timeout_s=2)


# -- URL: address policy ------------------------------------------------------
def test_loopback_refused_by_default_without_connecting(server):
    err = _fail(_event(url=_url(server, "/img.png")))
    assert err.reason == "blocked_address"
    assert "127.0.0.1" in err.detail and "allow_private_networks" in err.detail
    assert server.hits == {}, "the check must happen before any connection"


def test_localhost_name_refused_too(server):
    err = _fail(_event(url=f"http://localhost:{server.server_address[1]}/img.png"))
    assert err.reason == "blocked_address"
    assert server.hits == {}


def test_loopback_allowed_when_private_networks_allowed(server):
    assert _get(_event(url=_url(server, "/img.png")), LOOPBACK_OK) == PNG
    # the connection is pinned to the checked address but keeps the Host header
    assert server.hosts == [f"127.0.0.1:{server.server_address[1]}"]


def test_relative_redirect_followed(server):
    assert _get(_event(url=_url(server, "/to-img")), LOOPBACK_OK) == PNG
    assert server.hits == {"/to-img": 1, "/img.png": 1}


def test_redirect_hop_to_blocked_address_refused(server, monkeypatch):
    # Let the test server stand in for a public host: 127.0.0.1 passes the
    # address check, everything else keeps the real policy. The redirect to
    # the cloud metadata address must then be refused at the second hop.
    real = safe_http.public_address

    def allowed(ip):
        return ip == ipaddress.ip_address("127.0.0.1") or real(ip)

    monkeypatch.setattr(safe_http, "public_address", allowed)
    err = _fail(_event(url=_url(server, "/to-metadata")), FetchSettings(retries=0))
    assert err.reason == "blocked_address"
    assert "169.254.169.254" in err.detail
    assert server.hits == {"/to-metadata": 1}


def test_non_http_scheme_in_redirect_chain_refused():
    # ImageRef already refuses non-http URLs; the fetcher double-checks each hop.
    ev = _event(url="http://example.invalid/x.png")
    ev.image.url = "file:///etc/passwd"
    err = _fail(ev)
    assert err.reason == "bad_url"


# -- URL: limits and HTTP outcomes --------------------------------------------
def test_declared_size_over_cap_refused(server):
    cfg = LOOPBACK_OK.model_copy(update={"max_bytes": 1000})
    err = _fail(_event(url=_url(server, "/big-declared")), cfg)
    assert err.reason == "too_large"
    assert "declares 10000000" in err.detail


def test_streamed_size_over_cap_refused(server):
    cfg = LOOPBACK_OK.model_copy(update={"max_bytes": len(PNG) + 100})
    err = _fail(_event(url=_url(server, "/big-streamed")), cfg)
    assert err.reason == "too_large"
    assert "exceeds" in err.detail


def test_gzip_bomb_is_refused_without_inflating_it(server):
    # 256 KB on the wire, 256 MiB inflated: httpx's decoder inflated each
    # 64 KB network read whole (64 MiB) before the size check saw it.
    cfg = LOOPBACK_OK.model_copy(update={"max_bytes": 1 << 20})
    tracemalloc.start()
    try:
        err = _fail(_event(url=_url(server, "/gzip-bomb")), cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.reason == "too_large"
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while refusing a 1 MiB-capped body"


def test_stacked_content_encodings_are_refused(server):
    # Each gzip layer multiplies by up to 1000: "gzip, gzip" made a 7 KB body
    # inflate to gigabytes in one call on the event loop.
    err = _fail(_event(url=_url(server, "/gzip-gzip-bomb")), LOOPBACK_OK)
    assert err.reason == "bad_encoding" and not err.retryable


def test_one_layer_of_gzip_or_raw_deflate_is_still_read(server):
    assert _get(_event(url=_url(server, "/gzip-img")), LOOPBACK_OK) == PNG
    assert _get(_event(url=_url(server, "/raw-deflate-img")), LOOPBACK_OK) == PNG


def test_bytes_after_the_gzip_stream_count_against_the_cap(server):
    cfg = LOOPBACK_OK.model_copy(update={"max_bytes": 1000})
    err = _fail(_event(url=_url(server, "/gzip-then-garbage")), cfg)
    assert err.reason == "too_large"


def test_304_is_an_http_error_not_a_redirect(server):
    err = _fail(_event(url=_url(server, "/not-modified")), LOOPBACK_OK)
    assert err.reason == "http_error" and "304" in err.detail


def test_404_is_http_error_and_not_retried(server):
    cfg = LOOPBACK_OK.model_copy(update={"retries": 2})
    err = _fail(_event(url=_url(server, "/missing")), cfg)
    assert err.reason == "http_error" and not err.retryable
    assert "404" in err.detail
    assert server.hits["/missing"] == 1


def test_503_retried_then_fails(server):
    cfg = LOOPBACK_OK.model_copy(update={"retries": 1})
    err = _fail(_event(url=_url(server, "/unavailable")), cfg)
    assert err.reason == "http_error" and err.retryable
    assert server.hits["/unavailable"] == 2  # first try + one retry


def test_503_then_success_returns_image(server):
    cfg = LOOPBACK_OK.model_copy(update={"retries": 1})
    assert _get(_event(url=_url(server, "/flaky")), cfg) == PNG
    assert server.hits["/flaky"] == 2


def test_read_timeout(server):
    cfg = LOOPBACK_OK.model_copy(update={"read_timeout_s": 0.3})
    started = time.monotonic()
    err = _fail(_event(url=_url(server, "/slow")), cfg)
    assert err.reason == "timeout"
    assert time.monotonic() - started < 1.4, "must give up at the read timeout, not when the server answers"


def test_non_image_body_refused(server):
    err = _fail(_event(url=_url(server, "/html")), LOOPBACK_OK)
    assert err.reason == "not_an_image"


def test_unreachable_port(server):
    # A port nobody listens on: a connect error, not a hang.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _fail(_event(url=f"http://127.0.0.1:{port}/x.png"), LOOPBACK_OK)
    assert err.reason == "unreachable" and err.retryable


@pytest.mark.parametrize("path", sorted(_MALFORMED))
def test_a_malformed_answer_is_a_bad_response_and_not_retried(server, path):
    cfg = LOOPBACK_OK.model_copy(update={"retries": 2})
    err = _fail(_event(url=_url(server, path)), cfg)
    assert err.reason == "bad_response" and not err.retryable, (err.reason, err.detail)
    assert "malformed HTTP response" in err.detail
    assert server.hits[path] == 1


def test_a_close_without_any_answer_is_unreachable_and_retried(server):
    cfg = LOOPBACK_OK.model_copy(update={"retries": 1})
    err = _fail(_event(url=_url(server, "/no-answer")), cfg)
    assert err.reason == "unreachable" and err.retryable
    assert "without answering" in err.detail
    assert server.hits["/no-answer"] == 2


# -- local paths --------------------------------------------------------------
@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "notes.txt").write_text("hello")
    return root, outside


def test_local_path_under_root(roots):
    root, _ = roots
    ingest = IngestSettings(image_roots=[root])
    assert _get(_event(path="a.png"), ingest=ingest) == PNG
    assert _get(_event(path=str(root / "a.png")), ingest=ingest) == PNG


def test_local_paths_disabled_without_roots(roots):
    root, _ = roots
    assert _fail(_event(path=str(root / "a.png"))).reason == "path_not_allowed"


@pytest.mark.parametrize("path", ["../outside/secret.png", "escape.png"])
def test_local_path_escape_refused(roots, path):
    root, _ = roots
    err = _fail(_event(path=path), ingest=IngestSettings(image_roots=[root]))
    assert err.reason == "path_not_allowed"


def test_local_absolute_path_outside_roots_refused(roots):
    root, outside = roots
    err = _fail(_event(path=str(outside / "secret.png")), ingest=IngestSettings(image_roots=[root]))
    assert err.reason == "path_not_allowed"


def test_local_extra_root_allows(roots):
    root, outside = roots
    got = _get(_event(path=str(outside / "secret.png")), ingest=IngestSettings(image_roots=[root]), extra_roots=[outside])
    assert got == PNG


def test_local_missing_and_non_image(roots):
    root, _ = roots
    ingest = IngestSettings(image_roots=[root])
    assert _fail(_event(path="nope.png"), ingest=ingest).reason == "not_found"
    assert _fail(_event(path="notes.txt"), ingest=ingest).reason == "not_an_image"


def test_local_size_cap(roots):
    root, _ = roots
    err = _fail(_event(path="a.png"), FetchSettings(max_bytes=10), IngestSettings(image_roots=[root]))
    assert err.reason == "too_large"


# -- inline base64 ------------------------------------------------------------
def test_base64_roundtrip():
    assert _get(_event(base64=base64.b64encode(PNG).decode())) == PNG


def test_base64_over_cap_refused_before_decoding():
    b64 = base64.b64encode(PNG + b"\0" * 4096).decode()
    err = _fail(_event(base64=b64), ingest=IngestSettings(max_inline_bytes=1024))
    assert err.reason == "too_large"


def test_base64_invalid():
    err = _fail(_event(base64="iVBORw0K***not base64***"))
    assert err.reason == "bad_base64"


def test_base64_of_non_image():
    err = _fail(_event(base64=base64.b64encode(b"just some text").decode()))
    assert err.reason == "not_an_image"


def test_blob_without_store_is_not_found():
    err = _fail(_event(blob="0" * 64))
    assert err.reason == "not_found"


# -- Host header, TLS name and DNS threads ------------------------------------------
@pytest.fixture
def names_to_loopback(monkeypatch):
    """Every name ending in ``.test`` resolves to 127.0.0.1; the names the
    resolver was asked for are kept."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        return real("127.0.0.1" if str(host).endswith(".test") else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_an_idn_host_is_resolved_and_sent_in_punycode(server, names_to_loopback):
    """urlsplit's host name went into the Host header as it was: any
    non-ASCII name failed as bad_url ('ascii' codec can't encode) although
    the URL policy had accepted it. Full-width letters are read as the
    system resolver reads them (IDNA 2003), which httpx's IDNA 2008 refuses."""
    port = server.server_address[1]
    assert _get(_event(url=f"http://bücher.test:{port}/img.png"), LOOPBACK_OK) == PNG
    assert _get(_event(url=f"http://\uff45\uff58ample.test:{port}/img.png"), LOOPBACK_OK) == PNG
    assert server.hosts == [f"xn--bcher-kva.test:{port}", f"example.test:{port}"]
    assert names_to_loopback == ["xn--bcher-kva.test", "example.test"]


def test_an_ipv6_literal_keeps_its_brackets_in_the_host_header():
    class _Server6(_Server):
        address_family = socket.AF_INET6

    try:
        srv = _Server6("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        port = srv.server_address[1]
        assert _get(_event(url=f"http://[::1]:{port}/img.png"), LOOPBACK_OK) == PNG
        assert srv.hosts == [f"[::1]:{port}"]  # was "::1:PORT"
    finally:
        srv.shutdown()
        srv.server_close()


def test_slow_dns_lookups_hold_only_dns_threads(monkeypatch):
    """Lookups ran on the event loop's default thread pool, and a lookup
    that timed out kept its thread: a few names on a dead DNS server held
    every thread, and analysis, local-file reads and every other lookup
    waited behind them. Now lookups have threads of their own, and once all
    of those are taken and the queue is full a lookup fails at once."""
    release = threading.Event()

    def getaddrinfo(host, port, *args, **kwargs):
        if str(host).endswith("tarpit.test"):
            release.wait(30)
            raise socket.gaierror("gave up")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    pool = safe_http._DnsPool(4, 2)
    monkeypatch.setattr(safe_http, "DNS_POOL", pool)

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        slow = await asyncio.gather(*(safe_http.resolve_checked(f"h{i}.tarpit.test", 443, False, timeout_s=0.3)
                                      for i in range(3)), return_exceptions=True)
        assert [(e.reason, e.retryable, "0.3s" in e.detail) for e in slow] == [("dns_failure", True, True)] * 3
        # the three lookups still hold three DNS threads, none of the default pool's
        started = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 1.0)
        assert time.monotonic() - started < 0.5
        assert await safe_http.resolve_checked("cdn.good.test", 443, False, timeout_s=2) == "93.184.216.34"
        # the fourth thread and both queue places taken: the next lookup is not queued
        more = [asyncio.ensure_future(safe_http.resolve_checked(f"m{i}.tarpit.test", 443, False, timeout_s=5))
                for i in range(3)]
        await asyncio.sleep(0.05)
        assert pool.pending == 6
        started = time.monotonic()
        with pytest.raises(FetchError) as busy:
            await safe_http.resolve_checked("cdn.good.test", 443, False, timeout_s=5)
        assert time.monotonic() - started < 0.5
        assert busy.value.reason == "dns_failure" and busy.value.retryable
        assert "all 6 DNS lookups are busy" in busy.value.detail
        release.set()
        for f in more:
            with pytest.raises(FetchError, match="cannot resolve m.\\.tarpit\\.test: gave up"):
                await f
        assert await safe_http.resolve_checked("cdn.good.test", 443, False) == "93.184.216.34"

    try:
        asyncio.run(main())
    finally:
        release.set()
    # the lookups that timed out end on their threads once released, maybe after main() (CI under load)
    deadline = time.monotonic() + 10
    while pool.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.pending == 0
