"""Webhook delivery as subscribers and operators meet it: every target on its
own, alert ids of any text, Retry-After, redelivery that neither stops at one
bad alert nor forgets to count, rejected deliveries an operator can send again,
and targets named without their tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

from streams import metrics, webhook_redelivery, webhooks
from streams.findings import DeliveryState
from streams.records import Alert
from streams.settings import Settings, WebhookSettings
from streams.webhook_redelivery import Redeliverer
from streams.webhooks import (
    DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Deliveries, WebhookError, WebhookHeld, WebhookRejected,
    delivery_header, hook_key, retry_after_s, target_key, target_label, verify,
)
from tests import test_webhooks
from tests.test_webhooks import ENV, SECRET, _alert, _deliver, _lo, _sink_alert, _sinks


# the loopback receivers of tests/test_webhooks.py
receiver = test_webhooks.receiver
raw_receiver = test_webhooks.raw_receiver


@pytest.fixture(autouse=True)
def _webhook_secret(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)


# -- a receiver that answers per request ------------------------------------------------
class _Scripted(ThreadingHTTPServer):
    """``answer(n, alert_id) -> (status, headers)`` decides each answer (n:
    the request's index); every request is kept with its arrival time."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)

    def alert_ids(self) -> list[str]:
        with self.lock:
            return [json.loads(r["body"])["alert_id"] for r in self.requests]


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: _Scripted

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            n = len(srv.requests)
            srv.requests.append({"body": body, "headers": dict(self.headers), "raw_headers": list(self.headers.items()),
                                 "t": time.monotonic(),
                                 "valid": verify(SECRET.encode(), self.headers[TIMESTAMP_HEADER], body,
                                                 self.headers[SIGNATURE_HEADER])})
        status, headers = srv.answer(n, json.loads(body)["alert_id"])
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def scripted():
    yield from test_webhooks.serving(_Scripted)


def _url(srv, path: str = "/hook") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def _at(alert: Alert, minutes: int, **update) -> Alert:
    return alert.model_copy(update={"created_at": datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc) + timedelta(minutes=minutes),
                                    **update})


def _counts() -> dict[str, float]:
    return {o: metrics.WEBHOOKS.labels(o)._value.get() for o in ("delivered", "failed", "rejected")}


def _redeliver(settings: Settings, store, deliveries: Deliveries | None = None) -> int:
    """One redelivery round; ``deliveries``: what it shares with live senders (fresh unless given)."""
    async def go() -> int:
        r = Redeliverer(settings, lambda: store, deliveries)
        try:
            return await asyncio.wait_for(r.run_once(), 60)
        finally:
            await r.aclose()

    return asyncio.run(go())


def _settings(tmp_path, *hooks: WebhookSettings, **alerts) -> Settings:
    """Settings with ``hooks``, whose receivers here listen on loopback
    (allowed by ``alerts.allow_private_webhooks``)."""
    s = Settings(data_dir=tmp_path)
    s.alerts.console = False
    s.alerts.allow_private_webhooks = True
    s.alerts.webhooks = list(hooks)
    for k, v in alerts.items():
        setattr(s.alerts, k, v)
    return s


# -- 1. rejected deliveries: counted, shown, sent again on request ------------------------------
def test_redelivery_counts_each_outcome(scripted, tmp_path, monkeypatch):
    """A later success (or failure) of a delivery counted nowhere: the
    counter said "failed" for an alert that had reached its receiver."""
    up = {"ok": False}
    srv = scripted(lambda n, aid: (200 if up["ok"] else 503, {}))
    hook = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=2)
    sinks, store = _sinks(tmp_path, hook)
    asyncio.run(_sink_alert(sinks, _alert()))
    before = _counts()
    settings = _settings(tmp_path, hook)
    assert _redeliver(settings, store) == 0
    assert _counts()["failed"] == before["failed"] + 1, "a round that fails again counts: the rule stays on"
    up["ok"] = True
    assert _redeliver(settings, store) == 1
    after = _counts()
    assert after["delivered"] == before["delivered"] + 1 and after["failed"] == before["failed"] + 1


def test_rejected_deliveries_are_listed_and_sent_again_on_request(scripted, tmp_path, monkeypatch):
    """A 403 (the receiver's secret was wrong) is rejected for good; once it
    is fixed, `deepwatch redeliver TARGET` queues the rejected alerts again
    and the next round sends them. The gauge says what waits."""
    from typer.testing import CliRunner

    from streams.cli import app

    fixed = {"ok": False}
    srv = scripted(lambda n, aid: (200 if fixed["ok"] else 403, {}))
    url = _url(srv, "/hook?token=S3CR3T")
    hook = WebhookSettings(url=url, secret_env=ENV, retries=0, timeout_s=2)
    sinks, store = _sinks(tmp_path, hook)
    asyncio.run(_sink_alert(sinks, _alert()))
    key = hook_key(hook)
    [d] = store.delivery_status()["c-1:1"]
    assert d.target == key and d.state is DeliveryState.REJECTED and "S3CR3T" not in json.dumps(d.as_json())

    settings = _settings(tmp_path, hook)
    r = Redeliverer(settings, lambda: store)
    asyncio.run(r.refresh_gauge())
    assert metrics.WEBHOOK_UNDELIVERED.labels(key, "rejected")._value.get() == 1
    assert metrics.WEBHOOK_UNDELIVERED.labels(key, "failed")._value.get() == 0
    assert _redeliver(settings, store) == 0, "rejected: not retried on its own"

    cli = CliRunner()
    listed = cli.invoke(app, ["redeliver", "--data-dir", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == [{"target": key, "queued": 0, "failed": 0, "rejected": 1}]
    fixed["ok"] = True
    # the operator may name the target as listed, by its URL, or by scheme://host:port when it is the only one
    done = cli.invoke(app, ["redeliver", target_label(url), "--data-dir", str(tmp_path), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"target": key, "requeued": 1}
    assert _redeliver(settings, store) == 1
    assert store.delivered("c-1:1", key) and len(srv.requests) == 2
    asyncio.run(r.refresh_gauge())
    assert metrics.WEBHOOK_UNDELIVERED.labels(key, "rejected")._value.get() == 0
    unknown = cli.invoke(app, ["redeliver", "http://nowhere.example", "--data-dir", str(tmp_path)])
    assert unknown.exit_code != 0 and key in unknown.output


# -- 2. alert ids of any text; one bad delivery does not stop the others --------------------------
def test_delivery_header_keeps_ascii_ids_and_encodes_the_rest():
    for plain in ("c-1:1", "0123abcd:3", "account:alice:1", "c:desk-fake", "a%20b"):
        assert delivery_header(plain) == plain
    for odd in ("account:josé_garcía:1", "account:bob\r\nX-Evil: 1:1", "account:a b:1", "account:\x00\x7f:1",
                "account:100%\u00e9:1"):
        h = delivery_header(odd)
        assert all(" " < c < "\x7f" for c in h), h
        assert unquote(h) == odd


def test_account_alert_ids_of_any_text_are_delivered(scripted, tmp_path):
    """An account id is any text the event schema takes: non-ASCII made httpx
    raise UnicodeEncodeError (recorded as "invalid webhook URL"), CR/LF made
    h11 refuse the header (recorded as failed, and tried again for ever)."""
    srv = scripted(lambda n, aid: (200, {}))
    hook = _lo(WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=2))
    ids = ["account:josé_garcía:1", "account:bob\r\nX-Evil: 1:1"]
    for aid in ids:
        assert _deliver(hook, _alert().model_copy(update={"alert_id": aid, "cluster_id": aid[:-2]})) == "delivered"
    assert srv.alert_ids() == ids  # exact in the signed body
    for req, aid in zip(srv.requests, ids):
        assert req["valid"] and unquote(req["headers"][DELIVERY_HEADER]) == aid
        assert "X-Evil" not in req["headers"], "a header injected through the alert id"


def test_a_request_the_client_refuses_to_send_is_rejected_not_failed(scripted, monkeypatch):
    srv = scripted(lambda n, aid: (200, {}))
    monkeypatch.setattr(webhooks, "delivery_header", lambda alert_id: alert_id)  # the id as it was sent before
    hook = _lo(WebhookSettings(url=_url(srv), secret_env=ENV, retries=3, timeout_s=2))
    with pytest.raises(WebhookRejected, match="refused by the HTTP client"):
        _deliver(hook, _alert().model_copy(update={"alert_id": "account:bob\r\nX-Evil: 1:1"}), within_s=5)
    assert srv.requests == []


def test_redelivery_goes_past_an_alert_that_keeps_failing(scripted, tmp_path):
    """The receiver answers 500 to one alert (its handler chokes on it) and
    200 to the others. Redelivery stopped at the first failure, so no later
    alert ever got through; now only that alert's own cluster waits behind it."""
    srv = scripted(lambda n, aid: (500 if aid == "c-bad:1" else 200, {}))
    hook = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=2)
    key = hook_key(hook)
    settings = _settings(tmp_path, hook)
    from streams.store import open_store

    store = open_store(tmp_path)
    base = _alert()
    alerts = [_at(base, 0, alert_id="c-bad:1", cluster_id="c-bad"),
              _at(base, 1, alert_id="c-ok:1", cluster_id="c-ok"),
              _at(base, 2, alert_id="c-bad:2", cluster_id="c-bad", level=2),
              _at(base, 3, alert_id="c-ok:2", cluster_id="c-ok", level=2)]
    for a in alerts:
        store.add_alert(a)
        store.mark_delivered(a.alert_id, key, DeliveryState.FAILED, "the receiver was down")
    assert _redeliver(settings, store) == 2
    assert srv.alert_ids() == ["c-bad:1", "c-ok:1", "c-ok:2"], "c-bad:2 waits for c-bad:1 (level order)"
    assert [a.alert_id for a in store.failed_deliveries(key)] == ["c-bad:1", "c-bad:2"]


def test_redelivery_round_stops_for_a_target_that_looks_down(scripted, tmp_path):
    srv = scripted(lambda n, aid: (503, {}))
    hook = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=2)
    key = hook_key(hook)
    from streams.store import open_store

    store = open_store(tmp_path)
    for i in range(6):
        a = _at(_alert(), i, alert_id=f"c-{i}:1", cluster_id=f"c-{i}")
        store.add_alert(a)
        store.mark_delivered(a.alert_id, key, DeliveryState.FAILED, "the receiver was down")
    assert _redeliver(_settings(tmp_path, hook), store) == 0
    assert len(srv.requests) == webhook_redelivery.REDELIVERY_GIVE_UP


# -- 3. every target on its own -----------------------------------------------------------------------
def test_a_hanging_receiver_does_not_delay_another_targets_later_alerts(raw_receiver, scripted, tmp_path, monkeypatch):
    """The alert sink delivered one alert at a time and waited for every
    hook: a receiver that never answers held each later alert to every other
    subscriber for its whole timeout."""
    hanging = raw_receiver(lambda sock, stop: stop.wait(30))
    fast = scripted(lambda n, aid: (200, {}))
    slow_hook = WebhookSettings(url=f"http://127.0.0.1:{hanging.server_address[1]}/hook", secret_env=ENV, retries=0,
                                timeout_s=3)
    fast_hook = WebhookSettings(url=_url(fast), secret_env=ENV, retries=0, timeout_s=3)
    sinks, store = _sinks(tmp_path, slow_hook, fast_hook)
    alerts = [_at(_alert(), i, alert_id=f"c-{i}:1", cluster_id=f"c-{i}") for i in range(3)]

    async def scenario() -> float:
        started = time.monotonic()
        try:
            for a in alerts:  # what the alerts agent does, one message after the other
                await asyncio.wait_for(sinks.alert(a.model_dump_json().encode()), 2)
            deadline = time.monotonic() + 2.5
            while len(fast.requests) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            fast_done = time.monotonic() - started
            slow_key = hook_key(slow_hook)
            assert [store.delivery_status()[a.alert_id] for a in alerts] and all(
                {d.target: d.status for d in store.delivery_status()[a.alert_id]}[slow_key] == "queued"
                for a in alerts[1:]), "the hanging target's later alerts wait in its own queue"
            await asyncio.wait_for(sinks.drain(), 20)
            return fast_done
        finally:
            await sinks.aclose()

    fast_done = asyncio.run(scenario())
    assert fast.alert_ids() == ["c-0:1", "c-1:1", "c-2:1"], "in order, all of them"
    assert fast_done < 2.5, f"the fast subscriber waited on the hanging one ({fast_done:.1f} s)"
    status = store.delivery_status()
    for a in alerts:
        by_target = {d.target: d.status for d in status[a.alert_id]}
        assert by_target[hook_key(fast_hook)] == "delivered"
        assert by_target[hook_key(slow_hook)].startswith("failed: ") and "no answer within 3 s" in by_target[
            hook_key(slow_hook)]


def test_redelivery_rounds_of_targets_do_not_wait_for_each_other(raw_receiver, scripted, tmp_path):
    """A redelivery round took every target one after the other (and the
    timer waited for all): one hanging receiver held every other's
    redelivery for its timeouts."""
    from streams.store import open_store

    hanging = raw_receiver(lambda sock, stop: stop.wait(30))
    fast = scripted(lambda n, aid: (200, {}))
    slow_hook = WebhookSettings(url=f"http://127.0.0.1:{hanging.server_address[1]}/hook", secret_env=ENV, retries=0,
                                timeout_s=3)
    fast_hook = WebhookSettings(url=_url(fast), secret_env=ENV, retries=0, timeout_s=3)
    store = open_store(tmp_path)
    for i in range(2):
        a = _at(_alert(), i, alert_id=f"c-{i}:1", cluster_id=f"c-{i}")
        store.add_alert(a)
        for hook in (slow_hook, fast_hook):
            store.mark_delivered(a.alert_id, hook_key(hook), DeliveryState.FAILED, "the receiver was down")
    r = Redeliverer(_settings(tmp_path, slow_hook, fast_hook), lambda: store)

    async def scenario() -> None:
        try:
            rounds = r.start_rounds()
            assert set(rounds) == {hook_key(slow_hook), hook_key(fast_hook)}
            assert await asyncio.wait_for(rounds[hook_key(fast_hook)], 2) == 2
            assert not rounds[hook_key(slow_hook)].done()
            assert set(r.start_rounds()) == {hook_key(fast_hook)}, "one round per target at a time"
        finally:
            await r.aclose()

    asyncio.run(scenario())
    assert fast.alert_ids() == ["c-0:1", "c-1:1"]


def test_a_delivery_a_stopped_worker_left_is_sent_by_redelivery(raw_receiver, tmp_path, monkeypatch):
    """At-least-once: the alert sink takes the next alert once each delivery
    is recorded as queued; one a stopped sender never finished is found
    there, counted as pending work (a replay waits for it) and redelivered
    once its record is older than two redelivery periods."""
    hang = {"on": True}

    def answer(sock, stop) -> None:
        if hang["on"]:
            stop.wait(30)
        else:
            sock.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    srv = raw_receiver(answer)
    hook = WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5)
    key = hook_key(hook)
    sinks, store = _sinks(tmp_path, hook)

    async def stop_mid_delivery() -> None:
        await sinks.alert(_alert().model_dump_json().encode())
        await asyncio.sleep(0.3)  # the POST is in flight
        assert sinks.deliveries.live(key) == {"c-1:1"}
        await sinks.aclose()  # the worker stops

    asyncio.run(stop_mid_delivery())
    assert sinks.deliveries.live(key) == set()
    [d] = store.delivery_status()["c-1:1"]
    assert d.status == "queued"
    assert store.pending_work()["alerts"] == 1 and store.pending_work()["deliveries"] == 1
    assert store.queued_deliveries(key, older_than_s=60) == [], "recent: a live sender may still have it"

    hang["on"] = False  # the receiver answers again
    settings = _settings(tmp_path, hook, webhook_redeliver_s=0.1)
    sinks.deliveries.live_add(key, "c-1:1")  # in this process's sender: redelivery leaves it alone
    assert _redeliver(settings, store, sinks.deliveries) == 0
    sinks.deliveries.live_discard(key, "c-1:1")
    assert _redeliver(settings, store, sinks.deliveries) == 1
    assert store.delivered("c-1:1", key) and store.pending_work()["alerts"] == 0


def test_a_bounded_sink_returns_once_its_alerts_deliveries_are_done(scripted, tmp_path):
    """The desk's sink (retry_for_s: it answers a request) says the alert
    went out when it returns, as before the per-target queues."""
    from streams.sinks import Sinks

    srv = scripted(lambda n, aid: (200, {}))
    settings = _settings(tmp_path, WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=2))
    sinks = Sinks(settings, retry_for_s=5)

    async def go() -> None:
        try:
            await asyncio.wait_for(sinks.alert(_alert().model_dump_json().encode()), 10)
            assert srv.alert_ids() == ["c-1:1"]
        finally:
            await sinks.aclose()

    asyncio.run(go())
    assert [d.status for d in sinks.store.delivery_status()["c-1:1"]] == ["delivered"]


def test_pending_work_counts_queued_deliveries_until_done(tmp_path):
    """`deepwatch replay` waited for stored alerts only, so it could exit
    (and stop its workers) with deliveries still in flight."""
    from streams.store import open_store

    store = open_store(tmp_path)
    store.add_alert(_alert())
    store.mark_delivered("c-1:1", "http://h:1#00000000", DeliveryState.QUEUED)
    assert store.pending_work()["alerts"] == 1
    store.mark_delivered("c-1:1", "http://h:1#00000000", DeliveryState.FAILED, "HTTP 503")  # redelivery's now, not the run's
    assert store.pending_work()["alerts"] == 0


# -- 4. Retry-After -----------------------------------------------------------------------------
def test_retry_after_parses_seconds_and_http_dates():
    now = time.time()
    assert retry_after_s("120") == 120 and retry_after_s(" 0 ") == 0
    when = datetime.fromtimestamp(now + 30, tz=timezone.utc)
    assert 29 <= retry_after_s(format_datetime(when, usegmt=True), now=now) <= 31
    assert retry_after_s(format_datetime(when - timedelta(hours=1), usegmt=True), now=now) == 0
    for junk in (None, "", "soon", "-5", "1.5", "²", "Mon, 99 Foo 2026"):
        assert retry_after_s(junk) is None, junk


def test_a_429_retry_after_is_honoured(scripted):
    """The receiver asked for 1 s; the retry came after the fixed 0.5 s backoff."""
    srv = scripted(lambda n, aid: (429, {"Retry-After": "1"}) if n == 0 else (200, {}))
    hook = _lo(WebhookSettings(url=_url(srv), secret_env=ENV, retries=1, timeout_s=2))
    assert _deliver(hook, _alert()) == "delivered"
    first, second = srv.requests
    assert second["t"] - first["t"] >= 0.95


def test_a_long_retry_after_is_capped_and_then_leaves_the_target_alone(scripted):
    date = format_datetime(datetime.now(timezone.utc) + timedelta(hours=2), usegmt=True)
    srv = scripted(lambda n, aid: (429, {"Retry-After": date}) if n < 2 else (200, {}))
    hook = _lo(WebhookSettings(url=_url(srv), secret_env=ENV, retries=1, timeout_s=2, retry_after_max_s=0.3))
    held = Deliveries()  # the worker's: its deliveries to the target share the Retry-After
    started = time.monotonic()
    with pytest.raises(WebhookError, match="HTTP 429, Retry-After 7[12]\\d\\d s; not tried again for 0.3 s") as e:
        _deliver(hook, _alert(), deliveries=held)
    assert not isinstance(e.value, WebhookRejected)
    assert 0.25 <= time.monotonic() - started < 2, "waited the cap, not two hours"
    assert len(srv.requests) == 2
    with pytest.raises(WebhookHeld, match="asked to wait"):  # held for the cap: no request
        _deliver(hook, _alert(), deliveries=held)
    assert len(srv.requests) == 2
    time.sleep(0.35)
    assert _deliver(hook, _alert(), deliveries=held) == "delivered"


# -- 5. a line for people ----------------------------------------------------------------------------
def test_summary_is_added_when_the_hook_asks_for_it(scripted):
    srv = scripted(lambda n, aid: (200, {}))
    plain = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=2)
    readable = plain.model_copy(update={"summary": True})
    alert = _alert()
    assert _deliver(_lo(plain), alert) == _deliver(_lo(readable), alert) == "delivered"
    first, second = (json.loads(r["body"]) for r in srv.requests)
    assert "summary" not in first and Alert.model_validate(first) == alert
    assert second.pop("summary") == ("deepwatch alert (level 1) for cluster c-1: fake score 0.93 (likely-ai), "
                                     "14 sightings in 5 min, 15 accounts; top evidence: AUTOMATIC1111 parameters")
    assert second == first and srv.requests[1]["valid"]


# -- 6. the receiver example in the module docstring ---------------------------------------------------
def test_the_documented_receiver_refuses_non_ascii_digits():
    """str.isdigit() accepts '²' (int() then raises: a 500 from the
    receiver) and '١٧٠٠' (int() reads it: a forged timestamp passes the age check)."""
    from streams.webhooks import sign

    code = re.search(r"A receiver \(Python\)::\n\n(.*?)\n\n(?=\S)", webhooks.__doc__, re.S).group(1)
    scope: dict = {}
    exec(compile("\n".join(line[4:] for line in code.splitlines()), "<docstring>", "exec"), scope)
    receiver_verify = scope["verify"]
    ts = str(int(time.time()))
    body = b"{}"
    assert receiver_verify(b"k", {"X-Deepwatch-Timestamp": ts, "X-Deepwatch-Signature": sign(b"k", ts, body)}, body)
    for odd in ("\u00b2", "\u0661\u0667\u0660\u0660", ""):
        assert receiver_verify(b"k", {"X-Deepwatch-Timestamp": odd, "X-Deepwatch-Signature": "sha256=00"}, body) is False


# -- 7. targets never shown with their token -----------------------------------------------------------
def test_target_key_is_stable_distinct_and_tokenless():
    a = "https://user:PW@hooks.example/T0KEN?k=K3Y"
    b = "https://hooks.example/other"
    assert target_key(a) == target_key(a) and target_key(a) != target_key(b)
    assert re.fullmatch(r"https://hooks\.example#[0-9a-f]{8}", target_key(a))
    assert target_key(target_key(a)) == target_key(a)
    assert not any(s in target_key(a) for s in ("PW", "T0KEN", "K3Y", "user"))


def test_stored_targets_and_the_alerts_command_never_show_the_token(receiver, tmp_path, monkeypatch, caplog):
    """The delivery records (and so `deepwatch alerts` and the metrics
    labels) kept the whole URL, token and all."""
    from typer.testing import CliRunner

    from streams.cli import app

    srv = receiver(503)
    url = f"http://bob:PASSW0RD@127.0.0.1:{srv.server_address[1]}/hooks/T0KEN?key=K3Y"
    hook = WebhookSettings(url=url, secret_env=ENV, retries=0, timeout_s=2)
    sinks, store = _sinks(tmp_path, hook)
    with caplog.at_level(logging.INFO):
        asyncio.run(_sink_alert(sinks, _alert()))
        _redeliver(_settings(tmp_path, hook), store)
        asyncio.run(Redeliverer(_settings(tmp_path, hook), lambda: store).refresh_gauge())
    shown = CliRunner().invoke(app, ["alerts", "--data-dir", str(tmp_path), "--json"]).stdout
    [alert] = json.loads(shown)
    assert alert["deliveries"][0]["target"] == hook_key(hook)
    from prometheus_client import generate_latest

    exported = generate_latest().decode()
    assert f'deepwatch_webhook_undelivered{{status="failed",target="{hook_key(hook)}"}} 1.0' in exported
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name != "httpx")
    for secret in ("PASSW0RD", "T0KEN", "K3Y"):
        assert secret not in shown and secret not in exported and secret not in logged, secret
    assert store.delivery_targets() == [hook_key(hook)]


def test_delivery_records_written_with_the_url_are_keyed_when_the_store_opens(tmp_path):
    from streams.store import open_store

    url = "https://hooks.example/T0KEN"
    store = open_store(tmp_path)
    store.add_alert(_alert())
    store.mark_delivered("c-1:1", url, DeliveryState.FAILED, "HTTP 503")  # as earlier versions recorded it
    store.close()
    store = open_store(tmp_path)
    assert store.delivery_targets() == [target_key(url)]
    assert [a.alert_id for a in store.failed_deliveries(target_key(url))] == ["c-1:1"]
    store.close()


def test_error_texts_lose_the_urls_token():
    url = "http://bob:PW@hooks.example:8080/hooks/T0KEN?key=K3Y"
    shown = target_label(url)
    text = webhooks._scrub("ConnectError: http://10.0.0.7:8080/hooks/T0KEN?key=K3Y failed for bob:PW", url, shown)
    assert not any(s in text for s in ("T0KEN", "K3Y", "PW")), text


# -- 8. a delivery record says when its status last changed ---------------------------------------------
def test_a_delivery_records_time_follows_its_status(tmp_path):
    from streams.store import open_store

    store = open_store(tmp_path)
    store.add_alert(_alert())
    store.mark_delivered("c-1:1", "http://h:1#00000000", DeliveryState.FAILED, "HTTP 503")
    [first] = store.delivery_status()["c-1:1"]
    time.sleep(0.02)
    store.mark_delivered("c-1:1", "http://h:1#00000000", DeliveryState.DELIVERED)
    [then] = store.delivery_status()["c-1:1"]
    assert then.status == "delivered" and then.at > first.at
    time.sleep(0.02)
    store.mark_delivered("c-1:1", "http://h:1#00000000", DeliveryState.FAILED, "late")  # never back from delivered
    assert store.delivery_status()["c-1:1"] == [then]


def test_settings_take_the_new_webhook_options():
    s = Settings.model_validate({"alerts": {"webhook_queue_max": 5, "webhooks": [
        {"url": "https://h.example/x", "retry_after_max_s": 30, "summary": True}]}})
    assert s.alerts.webhook_queue_max == 5 and s.alerts.webhooks[0].retry_after_max_s == 30
