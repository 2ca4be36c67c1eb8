"""Signed webhook delivery against a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from detectors.base import Evidence
from streams.records import Alert, Velocity
from streams.settings import WebhookSettings
from streams.webhooks import (
    DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookError, deliver, sign, verify,
)

SECRET = "s3cret-for-tests"
ENV = "DEEPWATCH_TEST_WEBHOOK_SECRET"


def _alert() -> Alert:
    return Alert(
        alert_id="c-1:1", cluster_id="c-1", rule="viral_fake", level=1, fake_score=0.93, verdict="likely_ai",
        velocity=Velocity(sightings_5m=14), sightings=15, accounts=15,
        evidence=[Evidence(detector="gen_metadata", score=0.99, detail="AUTOMATIC1111 parameters")],
        at=datetime(2026, 11, 20, 10, 4, tzinfo=timezone.utc),
    )


class _Receiver(ThreadingHTTPServer):
    """Answers with the queued statuses in order (the last one repeats) and
    verifies every request the way a subscriber would."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, statuses: list[int]):
        self.statuses = statuses
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            n = len(srv.requests)
            srv.requests.append({
                "body": body,
                "headers": dict(self.headers),
                "valid": verify(SECRET.encode(), self.headers[TIMESTAMP_HEADER], body, self.headers[SIGNATURE_HEADER]),
            })
            status = srv.statuses[min(n, len(srv.statuses) - 1)]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver():
    servers: list[_Receiver] = []

    def start(*statuses: int) -> _Receiver:
        srv = _Receiver(list(statuses))
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _hook(srv: _Receiver, retries: int) -> WebhookSettings:
    return WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=retries, timeout_s=2)


def _deliver(hook: WebhookSettings, alert: Alert) -> str:
    async def go() -> str:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await deliver(hook, alert, client)

    return asyncio.run(go())


# -- signing ------------------------------------------------------------------
def test_signature_verifies_and_tampering_fails():
    body = _alert().model_dump_json().encode()
    ts = str(int(time.time()))
    sig = sign(SECRET.encode(), ts, body)
    assert sig.startswith("sha256=")
    assert verify(SECRET.encode(), ts, body, sig)
    assert not verify(SECRET.encode(), ts, body.replace(b"0.93", b"0.10"), sig), "tampered body"
    assert not verify(b"wrong key", ts, body, sig), "wrong key"
    assert not verify(SECRET.encode(), str(int(ts) + 1), body, sig), "timestamp is part of the signature"


def test_old_or_garbage_timestamp_refused():
    body = b"{}"
    old = str(int(time.time()) - 3600)
    assert not verify(SECRET.encode(), old, body, sign(SECRET.encode(), old, body))
    assert not verify(SECRET.encode(), "yesterday", body, sign(SECRET.encode(), "yesterday", body))


# -- delivery -----------------------------------------------------------------
def test_delivery_is_signed_and_identified(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    alert = _alert()
    assert _deliver(_hook(srv, retries=0), alert) == "delivered"
    [req] = srv.requests
    assert req["valid"]
    assert req["headers"][DELIVERY_HEADER] == alert.alert_id
    assert Alert.model_validate_json(req["body"]) == alert


def test_retries_on_500_until_success(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(500, 200)
    assert _deliver(_hook(srv, retries=2), _alert()) == "delivered"
    assert len(srv.requests) == 2
    assert all(r["valid"] for r in srv.requests), "every retry is freshly signed"
    assert srv.requests[0]["body"] == srv.requests[1]["body"]


def test_gives_up_after_retries_on_500(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(500)
    with pytest.raises(WebhookError, match="HTTP 500"):
        _deliver(_hook(srv, retries=1), _alert())
    assert len(srv.requests) == 2


def test_no_retry_on_400(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(400)
    with pytest.raises(WebhookError, match="HTTP 400"):
        _deliver(_hook(srv, retries=3), _alert())
    assert len(srv.requests) == 1


def test_429_is_retried(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(429, 204)
    assert _deliver(_hook(srv, retries=1), _alert()) == "delivered"
    assert len(srv.requests) == 2


def test_missing_secret_refuses_to_send(receiver, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    srv = receiver(200)
    with pytest.raises(WebhookError, match=ENV):
        _deliver(_hook(srv, retries=0), _alert())
    assert srv.requests == [], "nothing unsigned may leave"


def test_connection_refused_is_a_webhook_error(monkeypatch):
    import socket

    monkeypatch.setenv(ENV, SECRET)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hook = WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret_env=ENV, retries=0, timeout_s=1)
    with pytest.raises(WebhookError, match="ConnectError"):
        _deliver(hook, _alert())
