"""Alerts as a subscriber relies on them, against real components (loopback
HTTP and TLS receivers, the cluster engine, the alert sink and redelivery on
SQLite, ``deepwatch replay`` on the embedded broker):

* an https hook keeps its connection (one TLS handshake for a burst of
  alerts, not one per delivery) without giving up the address check and DNS
  pinning each delivery does, and never lends it to another hook's name;
* a signing clock minutes off leaves deliveries ``failed`` (redelivered once
  the clocks agree), not ``rejected`` for good;
* a merge of two alerted clusters escalates once, from the faster part's
  alert, whichever part survives;
* an alert raised from a replayed (or late) feed says its velocity is from then.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import socket
import ssl
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streams import safe_http, webhooks
from streams.findings import DeliveryState
from streams.settings import WebhookSettings
from streams.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, Deliveries, WebhookRejected, verify
from tests.test_webhook_rotation_ca import _ca, _pem
from tests.test_webhooks import ENV, SECRET, _alert, _deliver, _lo, _raw_target, _sinks, raw_receiver  # noqa: F401

NAME = "receiver.deepwatch.test"  # what the hook's URL names; the tests' resolver answers for it
OTHER = "other.deepwatch.test"  # another subscriber's name, served from the same address; not on the certificate


def _server_cert(ca_key, ca_cert):
    """A certificate for ``NAME`` and 127.0.0.1, signed by the test CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("deepwatch subscriber-audit CA")
    key, cert = _server_cert(ca_key, ca_cert)
    (d / "ca.pem").write_bytes(_pem(ca_cert))
    (d / "server.pem").write_bytes(_pem(cert))
    (d / "server-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server-key.pem")}


class _KeepAliveHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps the connection open between requests, as real receivers do
    server: "_KeepAliveTlsReceiver"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.requests.append(
                verify(SECRET.encode(), self.headers[TIMESTAMP_HEADER], body, self.headers[SIGNATURE_HEADER]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _KeepAliveTlsReceiver(ThreadingHTTPServer):
    """An HTTPS receiver that keeps connections alive and counts the TLS
    handshakes it completed (each accepted connection is one)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, pki: dict[str, str]):
        self.lock = threading.Lock()
        self.requests: list[bool] = []  # whether each request's signature verified
        self.handshakes = 0
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki["cert"], pki["key"])
        self.socket = ctx.wrap_socket(self.socket, server_side=True)

    def get_request(self):
        conn = super().get_request()  # the handshake completes in accept(): a refused one raises here
        with self.lock:
            self.handshakes += 1
        return conn


@pytest.fixture
def tls_receiver(pki):
    srv = _KeepAliveTlsReceiver(pki)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def dns(monkeypatch):
    """What ``NAME`` resolves to, as the system resolver would answer it
    (``streams.safe_http.resolve``, the one resolver webhook delivery uses);
    every lookup is counted. ``OTHER`` resolves to loopback too."""
    answer = {"addrs": [ipaddress.ip_address("127.0.0.1")], "lookups": 0}
    real = safe_http.resolve

    async def resolve(host: str, port: int, timeout_s: float = safe_http.DNS_TIMEOUT_S):
        if host == OTHER:
            return [ipaddress.ip_address("127.0.0.1")]
        if host != NAME:
            return await real(host, port, timeout_s)
        answer["lookups"] += 1
        return list(answer["addrs"])

    monkeypatch.setattr(safe_http, "resolve", resolve)
    return answer


def _hook(srv, pki, **kw) -> WebhookSettings:
    return WebhookSettings(url=f"https://{NAME}:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5, ca_certs=pki["ca"], **kw)


def _burst(n: int) -> list:
    return [_alert().model_copy(update={"alert_id": f"c-{i}:1", "cluster_id": f"c-{i}"}) for i in range(n)]


def test_a_burst_of_alerts_to_a_ca_certs_hook_takes_one_tls_handshake(tls_receiver, pki, dns, monkeypatch,
                                                                    tmp_path):
    """Eight alerts through the alert sink to a hook with its own CA bundle:
    each delivery opened its own client, so eight connections and eight
    handshakes; now the hook's client is kept and its connection reused.
    Every delivery still resolved and checked the name (eight lookups)."""
    monkeypatch.setenv(ENV, SECRET)
    sinks, store = _sinks(tmp_path, _hook(tls_receiver, pki, name="private-ca"))
    alerts = _burst(8)

    async def go() -> float:
        started = time.perf_counter()
        try:
            for a in alerts:
                await asyncio.wait_for(sinks.alert(a.model_dump_json().encode()), 30)
            await asyncio.wait_for(sinks.drain(), 30)
        finally:
            await sinks.aclose()
        return time.perf_counter() - started

    took = asyncio.run(go())
    states = {a: [d.state for d in ds] for a, ds in store.delivery_status().items()}
    assert states == {a.alert_id: ["delivered"] for a in alerts}
    assert tls_receiver.requests == [True] * 8, "every request arrives signed as documented"
    assert dns["lookups"] == 8, "each delivery resolves and checks the receiver's name again"
    assert tls_receiver.handshakes == 1, f"{tls_receiver.handshakes} TLS handshakes for 8 deliveries ({took:.2f} s)"


def test_a_kept_connection_does_not_let_a_rebound_name_through(tls_receiver, pki, dns, monkeypatch):
    """The name is delivered to on loopback (allowed here), its connection
    kept; then DNS answers a metadata address. The kept connection to the
    address checked before must not carry the next alert: the delivery is
    refused before any request, and goes through again once the name
    resolves where it may."""
    monkeypatch.setenv(ENV, SECRET)
    target = _lo(_hook(tls_receiver, pki))
    first, second, third = _burst(3)

    async def go() -> list[object]:
        import httpx

        out: list[object] = []
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as shared:
            try:
                out.append(await webhooks.deliver(target, first, shared, Deliveries()))
                dns["addrs"] = [ipaddress.ip_address("169.254.169.254")]
                try:
                    out.append(await webhooks.deliver(target, second, shared, Deliveries()))
                except WebhookRejected as e:
                    out.append(str(e))
                dns["addrs"] = [ipaddress.ip_address("127.0.0.1")]
                out.append(await webhooks.deliver(target, third, shared, Deliveries()))
            finally:
                await webhooks.aclose_clients(shared)
        return out

    delivered, refused, again = asyncio.run(go())
    assert delivered == again == DeliveryState.DELIVERED
    assert isinstance(refused, str) and "169.254.169.254" in refused and "never webhook receivers" in refused
    assert tls_receiver.requests == [True, True], "the rebound delivery sent nothing"
    assert tls_receiver.handshakes == 1, "the first connection served the third delivery"


def test_a_ca_certs_hook_to_loopback_is_still_refused_without_allow_private(tls_receiver, pki, dns, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    target = webhooks.Target(_hook(tls_receiver, pki))  # alerts.allow_private_webhooks off

    async def go() -> str:
        import httpx

        async with httpx.AsyncClient(trust_env=False) as shared:
            try:
                with pytest.raises(WebhookRejected) as e:
                    await webhooks.deliver(target, _alert(), shared, Deliveries())
            finally:
                await webhooks.aclose_clients(shared)
        return str(e.value)

    assert "non-public address 127.0.0.1" in asyncio.run(go())
    assert tls_receiver.handshakes == 0 and tls_receiver.requests == []


@pytest.mark.parametrize("own_bundle", [True, False], ids=["ca_certs", "system-cas"])
def test_a_connection_verified_for_one_hook_never_carries_another_hooks_alert(tls_receiver, pki, dns, monkeypatch,
                                                                             own_bundle):
    """Two hooks whose names resolve to one address, the certificate naming
    only the first. httpx pools connections by address: had both hooks'
    deliveries gone through one client, the second would have ridden the
    first's connection and reached a server never verified as its own. Each
    hook has its own client, so the second does its own handshake and fails
    it. ``system-cas``: hooks without ``ca_certs`` (the system's CAs,
    here made the test CA)."""
    monkeypatch.setenv(ENV, SECRET)
    system = ssl.create_default_context()
    if not own_bundle:  # the test CA as the system's: trusted by the shared client and every hook's own
        system = webhooks.ca_context(pki["ca"])
        monkeypatch.setattr(webhooks, "tls_context", lambda: system)
    bundle = {"ca_certs": pki["ca"] if own_bundle else None}
    first = _lo(_hook(tls_receiver, pki).model_copy(update=bundle))
    other = _lo(_hook(tls_receiver, pki).model_copy(update={"url": first.hook.url.replace(NAME, OTHER), **bundle}))
    a, b = _burst(2)

    async def go() -> tuple[object, str]:
        import httpx

        async with httpx.AsyncClient(verify=system, trust_env=False, follow_redirects=False) as shared:
            try:
                delivered = await webhooks.deliver(first, a, shared, Deliveries())
                with pytest.raises(webhooks.WebhookError) as refused:
                    await webhooks.deliver(other, b, shared, Deliveries())
            finally:
                await webhooks.aclose_clients(shared)
        return delivered, str(refused.value)

    delivered, refused = asyncio.run(go())
    assert delivered == DeliveryState.DELIVERED
    assert "CERTIFICATE_VERIFY_FAILED" in refused and f"not valid for '{OTHER}'" in refused, refused
    assert tls_receiver.requests == [True], "the other hook's alert never reached a server not verified as its own"


def test_a_body_trickled_after_the_status_neither_fails_nor_holds_the_delivery(raw_receiver, monkeypatch):
    """The status is in hand; the body then comes a byte every 0.2 s. The
    body is read (to keep the connection) for at most ``DRAIN_S``: the
    delivery is delivered, not cut off as "no answer" at ``timeout_s``."""
    monkeypatch.setenv(ENV, SECRET)

    def trickle(sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.wait(0.2):
            sock.sendall(b"x")

    srv = raw_receiver(trickle)
    started = time.monotonic()
    assert _deliver(_raw_target(srv, timeout_s=3), _alert(), within_s=10) == "delivered"
    assert time.monotonic() - started < webhooks.DRAIN_S + 1.5


# -- alert decisions (the cluster engine, as the cluster stage runs it) ----------------------
@pytest.mark.parametrize("slow_first", [True, False], ids=["slower-part-survives", "faster-part-survives"])
def test_a_merge_of_two_alerted_parts_escalates_once_from_the_faster_parts_alert(slow_first):
    """Part A alerted at 3 sightings in 5 minutes, part B (its evidence came
    late) at 12; then a copy links them (16). Which cluster survives the
    merge is the index's choice: kept from the survivor, the escalation
    baseline was 3 when A survived, and the merge alone sent "16 >= 4x 3",
    though subscribers had B's alert at 12; with B surviving, nothing.
    Now the merged cluster escalates once, when it spreads 4x past the
    fastest part's alert (48), whichever part survived."""
    from streams.settings import Settings
    from tests.test_cluster_engine import AI, Harness, hashed, scene, sighting

    h = Harness(Settings(dedupe={"phash_threshold": 10}, alerts={"min_sightings_5m": 3, "escalation_factor": 4.0}))
    pic = scene(5)
    slow = [hashed(sighting(pic, f"a{i}", i * 0.1, f"acc-a{i}", [AI]), 0) for i in range(3)]
    fast = [hashed(sighting(pic, f"b{i}", i * 0.1, f"acc-b{i}", [AI] if i == 11 else []), 0xFFFFF, 40)
            for i in range(12)]
    for s in (slow + fast if slow_first else fast + slow):
        h.see(s)
    assert sorted(a.velocity.sightings_5m for a in h.alerts) == [3, 12] and {a.level for a in h.alerts} == {1}
    merged = h.see(hashed(sighting(pic, "link", 1.3, "acc-link"), 0x3FF, 20))
    assert [s.merged_into for s in merged.snapshots if s.merged_into], "the link merged the parts"
    assert merged.alerts == [], [a.rule for a in merged.alerts]
    later = [a for i in range(40) for a in h.see(hashed(sighting(pic, f"c{i}", 1.4 + i * 0.05, f"acc-c{i}"), 0)).alerts]
    assert [(a.level, a.velocity.sightings_5m) for a in later] == [(2, 48)], [a.rule for a in later]
    assert later[0].rule.startswith("escalation: sightings_5m 48 >= 4.0x 12")
    assert len(later[0].merged_from) == 1


@pytest.mark.parametrize("delay, says", [(timedelta(seconds=2), None), (timedelta(minutes=30), None),
                                          (timedelta(hours=5), "5.0 h"), (timedelta(days=7), "7.0 days")],
                         ids=["live", "half-an-hour-behind", "backlog", "last-weeks-feed"])
def test_an_alert_raised_from_a_replayed_feed_says_its_velocity_is_from_then(delay, says):
    """The windows are in event time, so last week's feed replayed today
    raises the alerts it raised live, at the same velocities: nothing in
    the body but ``at`` (a date) told a subscriber the spread was last
    week's, not now. The rule now says so whenever the windows ended more
    than an hour before the trigger reached the broker; a live feed's rule
    is as before."""
    from streams.settings import Settings
    from tests.test_cluster_engine import AI, BASE_TIME, Harness, scene, sighting

    h = Harness(Settings(alerts={"min_sightings_5m": 5, "escalation_factor": 2.0}))
    pic = scene(6)
    for i in range(10):
        s = sighting(pic, f"e{i}", i / 6, f"a{i}", [AI] if i == 0 else [])
        h.see(s.model_copy(update={"ingested_at": s.event.posted_at + delay}))
    assert [(a.level, a.velocity.sightings_5m) for a in h.alerts] == [(1, 5), (2, 10)], "as it was live"
    first = h.alerts[0]
    assert first.rule.startswith("fake_score>=0.7 and sightings_5m>=5")
    assert h.alerts[1].rule.startswith("escalation: sightings_5m 10 >= 2.0x 5")
    if says is None:
        assert first.rule == "fake_score>=0.7 and sightings_5m>=5"
    else:
        end = (BASE_TIME + timedelta(minutes=4 / 6)).strftime("%Y-%m-%d %H:%M")
        assert first.rule.endswith(f"; replayed or late feed: velocity as of {end} UTC, {says} before this alert"), \
            first.rule
    raised = [a.rule for a in h.alerts]
    again = h.see(sighting(pic, "e4", 4 / 6, "a4").model_copy(update={"ingested_at": BASE_TIME + delay}), offset=4)
    assert [a.rule for a in again.alerts] == raised, "an op read again sends its alerts as they were raised"


# -- the signature's timestamp and a skewed clock ---------------------------------------------
_REAL_TIME = time.time


class _StrictHandler(BaseHTTPRequestHandler):
    """A receiver doing what the docs tell subscribers to: 401 unless the
    signature verifies and its timestamp is within 5 minutes of the
    receiver's own clock (the real one, whatever the sender's says)."""

    server: "_StrictReceiver"

    def log_message(self, *args) -> None:
        pass

    def date_time_string(self, timestamp=None) -> str:
        return super().date_time_string(_REAL_TIME() if timestamp is None else timestamp)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ts = self.headers[TIMESTAMP_HEADER] or ""
        fresh = ts.isascii() and ts.isdigit() and abs(_REAL_TIME() - int(ts)) <= 300
        ok = fresh and verify(self.server.secret, ts, body, self.headers[SIGNATURE_HEADER], max_age_s=10**9)
        self.server.answers.append(200 if ok else 401)
        self.send_response(self.server.answers[-1])  # with a Date header, as HTTP servers send
        self.send_header("Content-Length", "0")
        self.end_headers()


class _StrictReceiver(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, secret: bytes):
        self.secret = secret
        self.answers: list[int] = []
        super().__init__(("127.0.0.1", 0), _StrictHandler)


@pytest.fixture
def strict_receiver():
    servers = []

    def start(secret: bytes = SECRET.encode()) -> _StrictReceiver:
        srv = _StrictReceiver(secret)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


class _SkewedClock:
    """``streams.webhooks``' view of the time module, ``ahead_s`` fast."""

    def __init__(self, ahead_s: float):
        self.ahead_s = ahead_s

    def time(self) -> float:
        return _REAL_TIME() + self.ahead_s

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.mark.parametrize("ahead_s", [600, -900], ids=["10-min-fast", "15-min-slow"])
def test_a_worker_clock_off_by_minutes_leaves_its_alerts_failed_for_redelivery_not_rejected(
        strict_receiver, monkeypatch, tmp_path, ahead_s):
    """The sink worker's clock is minutes off: the receiver refuses every
    signature as stale (401), and each alert was recorded ``rejected`` for
    good, waiting for an operator even once NTP fixed the clock. The
    receiver's ``Date`` tells the two apart: ``failed``, saying which clock
    is off by how much; redelivery, on a right clock, delivers it."""
    from streams.webhook_redelivery import Redeliverer

    monkeypatch.setenv(ENV, SECRET)
    srv = strict_receiver()
    hook = WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5)
    sinks, store = _sinks(tmp_path, hook)
    monkeypatch.setattr(webhooks, "time", _SkewedClock(ahead_s))

    async def live() -> None:
        try:
            await asyncio.wait_for(sinks.alert(_alert().model_dump_json().encode()), 30)
            await asyncio.wait_for(sinks.drain(), 30)
        finally:
            await sinks.aclose()

    asyncio.run(live())
    [d] = store.delivery_status()["c-1:1"]
    assert d.state == "failed", (d.state, d.detail)
    said = re.search(r"this worker's clock is ([+-]\d+) s off the receiver's \(its Date header\)", d.detail)
    assert said and abs(int(said.group(1)) - ahead_s) <= 2, d.detail  # Date: whole seconds
    monkeypatch.setattr(webhooks, "time", time)  # NTP fixed it

    async def redeliver() -> int:
        r = Redeliverer(sinks.settings, lambda: store)
        try:
            return await r.run_once()
        finally:
            await r.aclose()

    assert asyncio.run(redeliver()) == 1
    assert [d.state for d in store.delivery_status()["c-1:1"]] == ["delivered"]
    assert srv.answers == [401, 200]


def test_a_refusal_on_a_right_clock_is_still_rejected_for_good(strict_receiver, monkeypatch):
    """Another key (the receiver's is not ours): 401 with a Date matching
    ours is the receiver's refusal, rejected as before."""
    monkeypatch.setenv(ENV, SECRET)
    srv = strict_receiver(b"the receiver holds another key")
    hook = WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5)
    with pytest.raises(WebhookRejected, match="HTTP 401$"):
        _deliver(_lo(hook), _alert())
    assert srv.answers == [401]


def test_a_refusal_from_a_receiver_a_few_minutes_off_but_inside_its_window_is_rejected(strict_receiver, monkeypatch):
    """A wrong key, and the clocks 270 s apart: inside the 5-minute window the
    receiver allows, so the 401 is its refusal of the signature. Read as a
    clock's fault (over 240 s), it was "failed" and redelivered forever,
    holding that cluster's later alerts behind it."""
    monkeypatch.setenv(ENV, SECRET)
    srv = strict_receiver(b"the receiver holds another key")
    hook = WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5)
    monkeypatch.setattr(webhooks, "time", _SkewedClock(270))
    with pytest.raises(WebhookRejected, match="HTTP 401$"):
        _deliver(_lo(hook), _alert())
    assert srv.answers == [401]


@pytest.mark.slow
def test_a_replay_of_an_old_feed_through_the_pipeline_says_so_in_the_alert(tmp_path):
    """The demo feed (posted 2026-11-20) through ``deepwatch replay``: the
    real broker stamps each event as it arrives now, so the one alert it
    raises says its velocity is from then, while its level, velocity and
    ``at`` are the feed's own, as they were live."""
    import json
    import os
    import subprocess
    import sys

    from streams.demo_feed import BASE_TIME, build_feed

    now = dt.datetime.now(dt.timezone.utc)
    assert now > BASE_TIME + timedelta(hours=2), "the demo feed is old news on any clock this runs on"
    feed, exp = build_feed(tmp_path / "feed")
    data = tmp_path / "data"

    def deepwatch(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                           timeout=300, env={**os.environ})
        assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout}\n{r.stderr[-3000:]}"
        return r.stdout

    deepwatch("replay", str(feed), "--data-dir", str(data), "--json", "--timeout", "240")
    [alert] = json.loads(deepwatch("alerts", "--data-dir", str(data), "--format", "json"))
    assert alert["level"] == 1 and alert["velocity"]["sightings_5m"] >= 10
    assert alert["rule"].startswith("fake_score>=0.7 and sightings_5m>=10; replayed or late feed: velocity as of "
                                    "2026-11-20 "), alert["rule"]
    days = (now - BASE_TIME).total_seconds() / 86400
    said = re.search(r"UTC, ([\d.]+) days before this alert$", alert["rule"])
    assert said and abs(float(said.group(1)) - days) < 0.2, alert["rule"]
    assert dt.datetime.fromisoformat(alert["at"]) < BASE_TIME + timedelta(hours=1)
