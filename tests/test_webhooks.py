"""Signed webhook delivery against a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket
import socketserver
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import ValidationError

from detectors.base import Evidence
from streams.records import Alert, Velocity
from streams.settings import Settings, WebhookSettings
from streams.webhooks import (
    DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Deliveries, Target, WebhookError, deliver, hook_key, sign,
    target_label, verify,
)


def _lo(hook: WebhookSettings) -> Target:
    """A hook whose receiver here listens on loopback, as a worker with
    ``alerts.allow_private_webhooks = true`` sends to it (webhooks to private
    addresses are refused without it)."""
    return Target(hook, allow_private=True)


SECRET = "s3cret-for-tests"
ENV = "DEEPWATCH_TEST_WEBHOOK_SECRET"


def _alert() -> Alert:
    return Alert(
        alert_id="c-1:1", cluster_id="c-1", rule="viral_fake", level=1, fake_score=0.93, verdict="likely-ai",
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
        self.location: str | None = None  # sent with every answer when set
        self.before_answer = lambda: None  # runs (outside the lock) before each answer
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
        # getattr: tests/test_kill_drill.py serves this handler from its own server class
        getattr(srv, "before_answer", lambda: None)()
        self.send_response(status)
        if getattr(srv, "location", None):
            self.send_header("Location", srv.location)
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


def _target(srv: _Receiver, retries: int) -> Target:
    return _lo(_hook(srv, retries))


def _deliver(target: Target, alert: Alert, *, deliveries: Deliveries | None = None, within_s: float = 30,
             **client_kw) -> str:
    """deliver() with a fresh client (and what a worker's deliveries share,
    fresh unless given); a test fails (TimeoutError) rather than hangs if it
    takes more than ``within_s``."""
    async def go() -> str:
        async with httpx.AsyncClient(trust_env=False, **client_kw) as client:
            return await asyncio.wait_for(deliver(target, alert, client, deliveries or Deliveries()), within_s)

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
    assert _deliver(_target(srv, retries=0), alert) == "delivered"
    [req] = srv.requests
    assert req["valid"]
    assert req["headers"][DELIVERY_HEADER] == alert.alert_id
    assert req["headers"]["User-Agent"].startswith("deepwatch-webhooks/")
    assert Alert.model_validate_json(req["body"]) == alert


def test_retries_on_500_until_success(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(500, 200)
    assert _deliver(_target(srv, retries=2), _alert()) == "delivered"
    assert len(srv.requests) == 2
    assert all(r["valid"] for r in srv.requests), "every retry is freshly signed"
    assert srv.requests[0]["body"] == srv.requests[1]["body"]


def test_gives_up_after_retries_on_500(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(500)
    with pytest.raises(WebhookError, match="HTTP 500"):
        _deliver(_target(srv, retries=1), _alert())
    assert len(srv.requests) == 2


def test_no_retry_on_400(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(400)
    with pytest.raises(WebhookError, match="HTTP 400"):
        _deliver(_target(srv, retries=3), _alert())
    assert len(srv.requests) == 1


@pytest.mark.parametrize("status", [501, 505])
def test_a_receiver_that_cannot_take_the_request_at_all_rejects_it_for_good(receiver, monkeypatch, status):
    # 501 (no POST on that URL) and 505 (HTTP/1.1 refused) come back on every try: they were retried
    # and redelivered forever, where the hook's URL or its server has to change
    from streams.webhooks import WebhookRejected

    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(status)
    with pytest.raises(WebhookRejected, match=f"HTTP {status}"):
        _deliver(_target(srv, retries=3), _alert())
    assert len(srv.requests) == 1


def test_429_is_retried(receiver, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(429, 204)
    assert _deliver(_target(srv, retries=1), _alert()) == "delivered"
    assert len(srv.requests) == 2


def test_missing_secret_refuses_to_send(receiver, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    srv = receiver(200)
    with pytest.raises(WebhookError, match=ENV):
        _deliver(_target(srv, retries=0), _alert())
    assert srv.requests == [], "nothing unsigned may leave"


def test_connection_refused_is_a_webhook_error(monkeypatch):
    import socket

    monkeypatch.setenv(ENV, SECRET)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hook = _lo(WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret_env=ENV, retries=0, timeout_s=1))
    with pytest.raises(WebhookError, match="ConnectError"):
        _deliver(hook, _alert())


def test_verify_answers_false_to_garbage_headers():
    body = b"{}"
    ts = str(int(time.time()))
    assert not verify(SECRET.encode(), ts, body, "sha256=\u00e9t\u00e9"), "non-ASCII signature: False, not TypeError"
    assert not verify(SECRET.encode(), None, body, None), "missing headers"
    for odd in ("nan", "inf"):  # float() accepts them; "nan" is never older than max_age_s
        assert not verify(SECRET.encode(), odd, body, sign(SECRET.encode(), odd, body)), odd


# -- hostile or broken receivers -----------------------------------------------
class _RawServer(socketserver.ThreadingTCPServer):
    """A receiver speaking raw HTTP/1.1: ``answer(sock, stop)`` writes whatever
    it likes once the request has been read."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, answer):
        self.answer = answer
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _RawHandler)


class _RawHandler(socketserver.StreamRequestHandler):
    server: _RawServer

    def handle(self) -> None:
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.rfile.read(length)
        try:
            self.server.answer(self.connection, self.server.stop)
        except OSError:
            pass  # the client hung up: what these tests expect


def serving(make, before_shutdown=lambda srv: None):
    """A fixture body: ``start(answer)`` serves ``make(answer)`` on a thread;
    every server started is shut down after the test."""
    servers = []

    def start(answer):
        srv = make(answer)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        before_shutdown(srv)
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def raw_receiver():
    yield from serving(_RawServer, lambda srv: srv.stop.set())


def _raw_target(srv: _RawServer, timeout_s: float) -> Target:
    return _lo(WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=timeout_s))


def test_a_trickling_receiver_is_cut_off_at_timeout_s(raw_receiver, monkeypatch):
    """httpx's timeout is per read: a header byte every 0.2 s never trips a
    1 s read timeout, so without a total bound the delivery never ended."""
    monkeypatch.setenv(ENV, SECRET)

    def trickle(sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(0.2):
            sock.sendall(b"X")

    srv = raw_receiver(trickle)
    started = time.monotonic()
    with pytest.raises(WebhookError, match="no answer within 1 s"):
        _deliver(_raw_target(srv, timeout_s=1), _alert(), within_s=5)
    assert time.monotonic() - started < 3


def test_a_huge_answer_body_is_never_read(raw_receiver, monkeypatch):
    """Only the status counts: a receiver announcing (and sending) 2 GB
    is answered by closing the connection once ``webhooks.DRAIN_BYTES`` of
    it were read (to keep a connection whose answer ends there), not by
    buffering it."""
    monkeypatch.setenv(ENV, SECRET)
    sent = [0]

    def flood(sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n")
        chunk = b"x" * 65536
        while not stop.is_set() and sent[0] < 2**31:
            sock.sendall(chunk)
            sent[0] += len(chunk)

    srv = raw_receiver(flood)
    assert _deliver(_raw_target(srv, timeout_s=2), _alert(), within_s=5) == "delivered"
    time.sleep(0.2)
    assert sent[0] < 64 * 2**20, f"the client read {sent[0]} bytes of the answer"


@pytest.mark.parametrize("follow", [False, True], ids=["plain-client", "client-following-redirects"])
def test_redirects_are_neither_followed_nor_retried(receiver, monkeypatch, follow):
    """A 307 would resend the signed alert wherever the receiver points
    (an internal address included); a redirect is a configuration error."""
    monkeypatch.setenv(ENV, SECRET)
    elsewhere = receiver(200)
    srv = receiver(307)
    srv.location = f"http://127.0.0.1:{elsewhere.server_address[1]}/internal"
    with pytest.raises(WebhookError, match="HTTP 307 redirect to http://127.0.0.1:.* not followed"):
        _deliver(_target(srv, retries=3), _alert(), follow_redirects=follow)
    assert len(srv.requests) == 1, "a redirect is not retried"
    assert elsewhere.requests == [], "the signed alert went where the redirect pointed"


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/hook", "ftp://127.0.0.1/hook", "http:///hook"])
def test_an_invalid_url_is_a_webhook_error(monkeypatch, url):
    """Refused by the settings; and a hook built without them is still not an
    exception that stops the alert sink (a port out of range came out of httpx
    as an ExceptionGroup)."""
    monkeypatch.setenv(ENV, SECRET)
    with pytest.raises(ValidationError, match="url"):
        _lo(WebhookSettings(url=url, secret_env=ENV))
    unchecked = WebhookSettings.model_construct(url=url, secret_env=ENV, retries=2, timeout_s=1.0,
                                                retry_after_max_s=300.0, summary=False)
    with pytest.raises(WebhookError, match="invalid webhook URL"):
        _deliver(Target(unchecked), _alert(), within_s=5)


def test_a_token_in_the_url_never_reaches_errors_or_logs(receiver, monkeypatch, tmp_path, caplog):
    """Webhook URLs often carry their credential (path, query, user info):
    failures and logs name the receiver by scheme, host and port only."""
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(500)
    port = srv.server_address[1]
    url = f"http://bob:PASSW0RD@127.0.0.1:{port}/hooks/T0KEN?key=K3Y"
    assert target_label(url) == f"http://127.0.0.1:{port}"
    sinks, store = _sinks(tmp_path, WebhookSettings(url=url, secret_env=ENV, retries=0, timeout_s=2))
    with caplog.at_level(logging.INFO):
        asyncio.run(_sink_alert(sinks, _alert()))
    [status] = store.delivery_status()["c-1:1"]
    assert status.status.startswith(f"failed: http://127.0.0.1:{port}: HTTP 500")
    # httpx's own request log names the full URL; streams.logs.setup keeps it at WARNING
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name != "httpx")
    assert "webhook delivery failed" in logged
    for secret in ("PASSW0RD", "T0KEN", "K3Y"):
        assert secret not in status.status and secret not in logged, secret


@pytest.fixture
def fake_dns(monkeypatch):
    """Host names of the tests' choosing (what a subscriber controls: its
    own DNS), everything else resolved for real."""
    names: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in names:
            return real(names[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


@pytest.mark.parametrize("host", ["169.254.169.254", "[fd00:ec2::254]", "[::ffff:169.254.169.254]", "metadata.hooks.test"])
def test_metadata_and_link_local_receivers_are_refused(monkeypatch, fake_dns, host):
    """Whether the URL names the address or a DNS name resolves there, no
    request is made and nothing is retried."""
    monkeypatch.setenv(ENV, SECRET)
    fake_dns["metadata.hooks.test"] = "169.254.169.254"
    hook = _lo(WebhookSettings(url=f"http://{host}/latest/meta-data/", secret_env=ENV, retries=3, timeout_s=1))
    with pytest.raises(WebhookError, match="refused: .*cloud metadata addresses are never webhook receivers"):
        _deliver(hook, _alert(), within_s=3)


def test_the_checked_address_is_the_one_connected_to(receiver, monkeypatch, fake_dns):
    """The host is resolved once, checked, and connected to by address with
    the name in the Host header, so a second DNS answer cannot differ."""
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    port = srv.server_address[1]
    fake_dns["hooks.test"] = "127.0.0.1"
    hook = _lo(WebhookSettings(url=f"http://hooks.test:{port}/hook", secret_env=ENV, retries=0, timeout_s=2))
    asked: list[str] = []
    real = socket.getaddrinfo

    def counting(host, *args, **kwargs):
        asked.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    assert _deliver(hook, _alert()) == "delivered"
    [req] = srv.requests
    assert req["headers"]["Host"] == f"hooks.test:{port}" and req["valid"]
    assert asked.count("hooks.test") == 1, asked


def test_an_idn_receiver_name_is_resolved_and_sent_in_punycode(receiver, monkeypatch, fake_dns):
    """The webhook resolver is the fetch stage's (streams.safe_http.pin): the
    name is resolved, and sent in the Host header and TLS, as its IDNA
    (punycode) form; it was resolved as Unicode and its TLS name was Unicode."""
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    port = srv.server_address[1]
    fake_dns["xn--bcher-kva.hooks.test"] = "127.0.0.1"
    hook = _lo(WebhookSettings(url=f"http://bücher.hooks.test:{port}/hook", secret_env=ENV, retries=0, timeout_s=2))
    assert _deliver(hook, _alert()) == "delivered"
    [req] = srv.requests
    assert req["headers"]["Host"] == f"xn--bcher-kva.hooks.test:{port}" and req["valid"]


# -- the alert sink ----------------------------------------------------------------
def _sinks(tmp_path, *hooks: WebhookSettings):
    """The alert sink sending to ``hooks``, whose receivers here listen on
    loopback (allowed by ``alerts.allow_private_webhooks``), and its store."""
    from streams.sinks import Sinks

    settings = Settings(data_dir=tmp_path)
    settings.alerts.console = False
    settings.alerts.allow_private_webhooks = True
    settings.alerts.webhooks = list(hooks)
    sinks = Sinks(settings)
    return sinks, sinks.store


async def _sink_alert(sinks, alert: Alert) -> None:
    """The alert through the sink, and its deliveries done (the sink hands
    them to each target's sender and returns)."""
    try:
        await asyncio.wait_for(sinks.alert(alert.model_dump_json().encode()), 30)
        await asyncio.wait_for(sinks.drain(), 30)
    finally:
        await sinks.aclose()


def test_a_slow_receiver_does_not_hold_back_another(receiver, monkeypatch, tmp_path):
    """The slow receiver only answers once the other one has its alert: one
    after the other, it timed out waiting; side by side, both get it."""
    monkeypatch.setenv(ENV, SECRET)
    slow, fast = receiver(200), receiver(200)
    fast_got = threading.Event()
    slow.before_answer = lambda: fast_got.wait(4)
    fast.before_answer = fast_got.set
    sinks, store = _sinks(tmp_path, _hook(slow, retries=0), _hook(fast, retries=0))
    asyncio.run(_sink_alert(sinks, _alert()))
    assert [s.status for s in store.delivery_status()["c-1:1"]] == ["delivered", "delivered"]
    assert len(slow.requests) == len(fast.requests) == 1


def test_an_alert_a_receiver_rejects_for_good_does_not_block_the_later_ones(receiver, monkeypatch, tmp_path):
    """A receiver answers 400 to one alert (its schema check, say) and then
    goes down for a while. The 400 was stored as "failed", so redelivery tried
    that alert first every round, got 400 again and stopped: no later alert
    ever reached the receiver once it came back."""
    from streams.webhook_redelivery import Redeliverer

    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(400, 503, 200)
    hook = _hook(srv, retries=0)
    sinks, store = _sinks(tmp_path, hook)
    first = _alert()
    later = first.model_copy(update={"alert_id": "c-2:1", "cluster_id": "c-2",
                                     "at": datetime(2026, 11, 20, 10, 9, tzinfo=timezone.utc)})
    asyncio.run(_sink_alert(sinks, first))  # 400: rejected for good
    sinks._client = None
    asyncio.run(_sink_alert(sinks, later))  # 503: failed, to be tried again
    statuses = {a: s[0].status for a, s in store.delivery_status().items()}
    assert statuses["c-1:1"].startswith("rejected: ") and statuses["c-2:1"].startswith("failed: ")
    assert [a.alert_id for a in store.failed_deliveries(hook_key(hook))] == ["c-2:1"]

    settings = Settings(data_dir=tmp_path)
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    settings.alerts.webhooks = [hook]
    redeliverer = Redeliverer(settings, lambda: store)

    async def once() -> int:
        try:
            return await redeliverer.run_once()
        finally:
            await redeliverer.aclose()

    assert asyncio.run(once()) == 1  # the later alert, not the rejected one again
    assert store.delivered("c-2:1", hook_key(hook)) and len(srv.requests) == 3


# -- a link to the desk page ---------------------------------------------------------
DESK = "https://desk.example.org/desk"


def test_alerts_link_the_desk_page_of_their_cluster_in_the_signed_body(receiver, monkeypatch, tmp_path, caplog):
    """With desk.public_url set, the body the alert sink sends has "desk_url",
    the cluster's desk page; the rest is the alert's JSON, and the signature
    covers the body as sent. The console's alert line ends with the link."""
    import json

    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    sinks, _ = _sinks(tmp_path, _hook(srv, retries=0))
    sinks.settings.desk.public_url = DESK
    sinks.settings.alerts.console = True
    alert = _alert()
    with caplog.at_level(logging.WARNING, logger="deepwatch.alerts"):
        asyncio.run(_sink_alert(sinks, alert))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT L1")]
    assert line.endswith("; desk: https://desk.example.org/desk/clusters/c-1"), line
    [req] = srv.requests
    assert req["valid"], "signed as sent"
    doc = json.loads(req["body"])
    assert doc.pop("desk_url") == "https://desk.example.org/desk/clusters/c-1"
    assert Alert.model_validate(doc) == alert and "summary" not in doc
    assert json.loads(alert.model_dump_json()).keys() == doc.keys(), "every other field as before"


def test_without_a_desk_address_the_body_is_the_alert_as_before(receiver, monkeypatch):
    from streams.webhooks import hooks_by_key

    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    settings = Settings()
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    settings.alerts.webhooks = [_hook(srv, retries=0)]
    [hook] = hooks_by_key(settings).values()
    alert = _alert()
    assert _deliver(hook, alert) == "delivered"
    [req] = srv.requests
    assert req["valid"] and req["body"] == alert.model_dump_json().encode(), "nothing new for strict receivers"


def test_desk_links_quote_the_id_and_end_the_summary_line(receiver, monkeypatch):
    import json

    from streams.webhooks import alert_summary, desk_url, hooks_by_key

    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    settings = Settings.model_validate({"desk": {"public_url": DESK}})
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    configured = _hook(srv, retries=0).model_copy(update={"summary": True})
    settings.alerts.webhooks = [configured]
    [hook] = hooks_by_key(settings).values()
    assert hook.desk_public_url == DESK and hook.hook == configured == settings.alerts.webhooks[0], \
        "the desk's address is the target's; the configured hook itself is left as it was"
    odd = _alert().model_copy(update={"alert_id": "c/1 ?#é:1", "cluster_id": "c/1 ?#é"})
    assert desk_url(DESK, odd) == "https://desk.example.org/desk/clusters/c%2F1%20%3F%23%C3%A9"
    account = _alert().model_copy(update={"alert_id": "account:x/123:1", "cluster_id": "account:x/123",
                                          "account_id": "x/123"})
    assert desk_url(DESK, account) == "https://desk.example.org/desk/accounts/x%2F123", "the account's page"
    for dots in (".", ".."):  # a browser resolves /accounts/.. to the queue, escaped or not: the id goes in the query
        dotted = account.model_copy(update={"alert_id": f"account:{dots}:1", "cluster_id": f"account:{dots}",
                                            "account_id": dots})
        assert desk_url(DESK, dotted) == f"https://desk.example.org/desk/accounts/?id={dots}"
    # what the alert is about is its account_id field, not how its cluster id reads
    named_like_one = _alert().model_copy(update={"alert_id": "account:y:1", "cluster_id": "account:y"})
    assert desk_url(DESK, named_like_one) == "https://desk.example.org/desk/clusters/account%3Ay"
    assert desk_url(None, odd) is None
    assert _deliver(hook, odd) == "delivered"
    [req] = srv.requests
    doc = json.loads(req["body"])
    assert req["valid"] and doc["desk_url"] == desk_url(DESK, odd)
    assert doc["summary"] == alert_summary(odd) + "; desk: " + doc["desk_url"]


@pytest.mark.parametrize("bad, why", [
    ("desk.example.org", "http:// or https://"), ("ftp://desk.example.org", "http:// or https://"),
    ("https://", "with a host"), ("https://desk.example.org/?x=1", "query"), ("https://desk.example.org/#top", "fragment"),
    ("https://user:pw@desk.example.org", "user or password"), ("https://desk.example.org:99999", "not a URL"),
    ("https://desk example.org", "spaces"),
])
def test_a_bad_desk_public_url_is_one_clear_settings_error(monkeypatch, bad, why):
    from streams.settings import load_settings
    from streams.settings_check import SettingsError

    monkeypatch.delenv("DEEPWATCH_CONFIG", raising=False)
    monkeypatch.setenv("DEEPWATCH_DESK__PUBLIC_URL", bad)
    with pytest.raises(SettingsError, match=r"^invalid setting 'desk.public_url': .*" + why) as e:
        load_settings()
    assert "\n" not in str(e.value) and "pw" not in str(e.value)
    monkeypatch.setenv("DEEPWATCH_DESK__PUBLIC_URL", " https://desk.example.org/ ")
    assert load_settings().desk.public_url == "https://desk.example.org"
    monkeypatch.setenv("DEEPWATCH_DESK__PUBLIC_URL", "")
    assert load_settings().desk.public_url is None


def test_the_signed_body_and_summary_say_when_and_where_the_picture_was_seen(receiver, monkeypatch):
    """An alert the engine raised, delivered with ``summary = true``: the
    signed body carries first/last seen, the platforms and the sample posts,
    and the summary line the first-seen time in UTC, the platforms and a post
    URL (never one that is not http(s))."""
    import json

    from datetime import timedelta

    from streams.demo_feed import BASE_TIME, scene
    from streams.webhooks import alert_summary, hooks_by_key
    from tests.test_cluster_engine import Harness, spread_feed

    h = Harness(Settings(alerts={"min_sightings_5m": 5, "escalation_factor": 2.0}))
    for s in spread_feed(scene(7)):
        h.see(s)
    alert = h.alerts[-1]
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    settings = Settings()
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    settings.alerts.webhooks = [_hook(srv, retries=0).model_copy(update={"summary": True})]
    [hook] = hooks_by_key(settings).values()
    assert _deliver(hook, alert) == "delivered"
    [req] = srv.requests
    assert req["valid"] and req["headers"][DELIVERY_HEADER] == alert.alert_id
    doc = json.loads(req["body"])
    first = BASE_TIME - timedelta(minutes=1)  # the late-arriving post was the first posted
    assert datetime.fromisoformat(doc["first_seen"]) == first
    assert datetime.fromisoformat(doc["last_seen"]) == alert.last_seen
    assert doc["platforms"] == ["telegram", "x", "bluesky", "mastodon"]
    assert [(p["event_id"], p.get("post_url")) for p in doc["sample_posts"]] == [
        ("early", "https://t.example/a6"), ("a", "https://x.example/a3/1"), ("b", None), ("r4", "https://x.example/b4/1")]
    assert doc["sample_posts"][1]["account_handle"] == "@a3" and doc["sample_posts"][1]["platform"] == "x"
    summary = doc.pop("summary")
    assert Alert.model_validate(doc) == alert, "the rest of the body is the alert, whole"
    assert summary == alert_summary(alert)
    assert f"; first seen {first:%Y-%m-%d %H:%M} UTC on telegram, x, bluesky, mastodon; post: https://t.example/a6" in summary
    # the earliest post without an http(s) URL is skipped for the next one; an alert from before
    # these fields (or an account alert) says nothing of them
    later = alert.model_copy(update={"sample_posts": alert.sample_posts[2:]})
    assert alert_summary(later).endswith("; post: https://x.example/b4/1")
    bare = Alert.model_validate_json(_alert().model_dump_json(exclude={"first_seen", "last_seen", "platforms", "sample_posts"}))
    assert bare.sample_posts == [] and bare.first_seen is None
    assert alert_summary(bare).endswith("top evidence: AUTOMATIC1111 parameters")


def test_the_console_alert_line_says_since_when_where_and_a_post(receiver, monkeypatch, tmp_path, caplog):
    from streams.records import SamplePost

    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    sinks, _ = _sinks(tmp_path, _hook(srv, retries=0))
    sinks.settings.alerts.console = True
    first = datetime(2026, 12, 6, 4, 10, 30, tzinfo=timezone.utc)
    post = SamplePost(event_id="e1", platform="bluesky", account_id="a1", post_url="https://bsky.app/p/1",
                      posted_at=first)
    alert = _alert().model_copy(update={"first_seen": first, "platforms": ["bluesky", "mastodon"],
                                        "sample_posts": [post]})
    with caplog.at_level(logging.WARNING, logger="deepwatch.alerts"):
        asyncio.run(_sink_alert(sinks, alert))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT L1")]
    assert line.endswith("; first seen 2026-12-06 04:10 UTC on bluesky, mastodon; post: https://bsky.app/p/1"), line


def test_a_correction_says_the_desk_overruled_the_score_in_the_summary_and_on_the_console(receiver, monkeypatch,
                                                                                           tmp_path, caplog):
    # It read "the desk found it authentic: fake score 0.96 (no-evidence)": a
    # correction keeps the evidence's score (a generator's metadata keeps it
    # high) and the desk's verdict, said as if they were one finding.
    import json

    from streams.records import CORRECTION_RULE
    from streams.webhooks import alert_summary

    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    sinks, _ = _sinks(tmp_path, _hook(srv, retries=0).model_copy(update={"summary": True}))
    sinks.settings.alerts.console = True
    correction = _alert().model_copy(update={"alert_id": "c-1:desk-authentic", "rule": CORRECTION_RULE,
                                             "fake_score": 0.96, "verdict": "no-evidence"})
    with caplog.at_level(logging.WARNING, logger="deepwatch.alerts"):
        asyncio.run(_sink_alert(sinks, correction))
    [line] = [m for m in (r.getMessage() for r in caplog.records if r.name == "deepwatch.alerts") if "cluster c-1" in m]
    [req] = srv.requests
    summary = json.loads(req["body"])["summary"]
    said = "the desk found it authentic, overruling a fake score of 0.96, 14 sightings in 5 min, 15 accounts"
    assert line.startswith(f"CORRECTION cluster c-1: {said} — AUTOMATIC1111 parameters"), line
    assert summary.startswith(f"deepwatch correction (level 1) for cluster c-1: {said}; top evidence: "), summary
    for text in (line, summary):
        assert "fake score 0.96 (" not in text and "no-evidence" not in text, text
    # an alert of the stream still says its score and verdict as it did
    stream = alert_summary(_alert())
    assert stream.startswith("deepwatch alert (level 1) for cluster c-1: fake score 0.93 (likely-ai), "), stream


def test_text_read_from_a_picture_cannot_rewrite_the_summary_line():
    # A generator's "Model:" field carried ESC sequences and a CR: the console
    # ALERT line read "VERIFIED AUTHENTIC" on the operator's terminal.
    from streams.webhooks import alert_summary

    hostile = "Model: x \x1b]8;;https://evil.example\x1b\\click\x1b[2K\x1b[31mVERIFIED\x1b[0m\r\u202eevil\nnext"
    ev = Evidence(detector="gen_metadata", score=0.99, detail=hostile)
    assert "\x1b" not in ev.detail and "\r" not in ev.detail and "\u202e" not in ev.detail
    assert "\\x1b[2K" in ev.detail and "\\r" in ev.detail and "\\u202e" in ev.detail
    assert Evidence.model_validate_json(ev.model_dump_json()).detail == ev.detail  # escaping is stable on re-read
    line = alert_summary(_alert().model_copy(update={"evidence": [ev]}))
    assert line.isprintable() and "\\x1b]8;;https://evil.example" in line and "evil next" in line


def test_a_link_local_address_with_a_zone_id_is_rejected_not_retried(monkeypatch):
    # it was "cannot resolve": failed, and tried again every redelivery round
    from streams.webhooks import WebhookRejected

    monkeypatch.setenv(ENV, SECRET)
    hook = WebhookSettings.model_construct(url="http://[fe80::1%25eth0]/hook", secret_env=ENV, retries=2, timeout_s=1.0,
                                           retry_after_max_s=300.0, summary=False)
    with pytest.raises(WebhookRejected, match="zone id"):
        _deliver(_lo(hook), _alert(), within_s=5)


def test_a_zone_id_webhook_url_is_refused_when_settings_load():
    with pytest.raises(ValidationError, match="zone id"):
        WebhookSettings(url="http://[fe80::1%25eth0]:8080/hook", secret_env=ENV)
