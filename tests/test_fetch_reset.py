"""A fetch that fails on the connection says what happened to it.

httpx's ReadError for a connection the host reset stringifies empty: a host
that accepted, read the request and reset dead-lettered events as
``fetch | unreachable | cannot connect to http://127.0.0.1:18084/r0.jpg: ``,
nothing after the colon, and it had connected. The reason stays
``unreachable`` (retried); the detail says reset, refused, ..., never nothing.

Real loopback servers (``fetch.allow_private_networks``, as in test_fetch)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import httpx
import pytest

from streams.fetch import ImageFetcher, transport_cause
from streams.records import ImageEvent
from streams.safe_http import FetchError
from streams.settings import FetchSettings, IngestSettings

LOOPBACK_OK = FetchSettings(allow_private_networks=True, retries=0, read_timeout_s=5, connect_timeout_s=2)


class _Resetting:
    """A loopback server that accepts, reads the request (``read``), may send
    ``send``, then resets the connection (SO_LINGER 0: an RST, not a FIN), or
    closes it (a FIN) when not ``reset``."""

    def __init__(self, read: bool = True, send: bytes = b"", reset: bool = True):
        self.read, self.send, self.reset, self.accepted = read, send, reset, 0
        self.stopped = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.05)  # a closed listening socket does not wake accept(): it looks at ``stopped``
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            try:
                if self.read:
                    conn.recv(65536)
                if self.send:
                    conn.sendall(self.send)
                if self.reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def resetting():
    servers: list[_Resetting] = []

    def make(**kwargs) -> _Resetting:
        servers.append(_Resetting(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _fail(url: str, fetch: FetchSettings = LOOPBACK_OK) -> FetchError:
    event = ImageEvent.model_validate({"event_id": "evt-1", "platform": "x", "account_id": "acct-1",
                                       "posted_at": "2026-11-20T10:00:00+00:00", "image": {"url": url}})

    async def go() -> None:
        f = ImageFetcher(fetch, IngestSettings())
        try:
            await f.get(event)
        finally:
            await f.aclose()

    with pytest.raises(FetchError) as info:
        asyncio.run(go())
    return info.value


def test_a_reset_after_the_request_was_read_says_so_and_is_retried(resetting):
    srv = resetting()
    url = f"http://127.0.0.1:{srv.port}/r0.jpg"
    err = _fail(url, LOOPBACK_OK.model_copy(update={"retries": 1}))
    assert err.reason == "unreachable" and err.retryable  # unchanged
    assert err.detail == f"fetching {url}: connection reset by the host while reading the answer (ECONNRESET)"
    assert srv.accepted == 2


@pytest.mark.parametrize("send", [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n\x89PNG", b"HTTP/1.1 200 OK\r\nCon"],
                         ids=["in the body", "in the head"])
def test_a_reset_partway_through_the_answer_says_so(resetting, send):
    srv = resetting(send=send)
    url = f"http://127.0.0.1:{srv.port}/r1.png"
    err = _fail(url)
    assert err.reason == "unreachable"
    assert err.detail == f"fetching {url}: connection reset by the host while reading the answer (ECONNRESET)"


def test_a_body_cut_short_by_a_closed_connection_is_retried(resetting):
    # a FIN before the promised Content-Length: a host restarting, not a malformed answer; it read
    # bad_response "sent a malformed HTTP response: peer closed connection ..." and was never retried
    srv = resetting(send=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", reset=False)
    url = f"http://127.0.0.1:{srv.port}/cut.png"
    err = _fail(url, LOOPBACK_OK.model_copy(update={"retries": 1}))
    assert err.reason == "unreachable" and err.retryable
    assert err.detail == f"{url} closed the connection partway through the answer (received 3 bytes, expected 100)"
    assert srv.accepted == 2


def test_a_refused_connection_says_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.png"
    err = _fail(url)
    assert err.reason == "unreachable" and err.retryable
    assert err.detail == f"cannot connect to {url}: connection refused (ECONNREFUSED)"


def _raised(error: BaseException, cause: BaseException | None) -> BaseException:
    """``error`` as raised ``from cause``, the way httpx chains them."""
    try:
        try:
            if cause is not None:
                raise cause
            raise error
        except BaseException:
            if cause is None:
                raise
            raise error from cause
    except BaseException as e:  # noqa: BLE001 - returned
        return e


@pytest.mark.parametrize("error, cause, said", [
    (httpx.ReadError(""), None, "connection lost while reading the answer"),
    (httpx.WriteError(""), BrokenPipeError(32, "Broken pipe"),
     "connection reset by the host while sending the request (EPIPE)"),
    (httpx.ReadError(""), TimeoutError(110, "Connection timed out"), "Connection timed out while reading the answer "
                                                                     "(ETIMEDOUT)"),
    (httpx.ConnectError(""), OSError(113, "No route to host"), "no route to host (EHOSTUNREACH)"),
    (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), None,
     "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
    (httpx.CloseError(""), None, "CloseError"),
    (httpx.ProxyError(""), None, "ProxyError"),
])
def test_the_cause_is_never_empty(error, cause, said):
    assert transport_cause(_raised(error, cause)) == said
