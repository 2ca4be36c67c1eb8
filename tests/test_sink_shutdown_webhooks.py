"""A worker stopped (SIGTERM: a rolling restart, the end of a replay) while
its webhook senders hold alerts: it delivers them before it exits, within a
bounded grace (``alerts.webhook_stop_grace_s``), rather than leaving
them to the redelivery two redelivery periods later; a receiver that hangs
does not hold the stop past that grace, and what it held is redelivered by
the next worker. End to end: real embedded broker, real worker processes, a
loopback receiver; ``Sinks.stop`` itself in process first."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest

from streams import runner
from streams.demo_feed import BASE_TIME, a1111_png, scene
from streams.ingest import produce_feed
from streams.settings import Settings, WebhookSettings
from streams.store import open_store
from tests import test_webhooks
from tests.test_webhook_delivery import _Scripted, _url
from tests.test_webhooks import ENV, SECRET, _alert, _sinks


slow = pytest.mark.slow


@pytest.fixture
def scripted():
    """Scripted loopback receivers (tests.test_webhook_delivery); the test's
    ``release`` event frees any request still held when it ends."""
    release = threading.Event()
    for start in test_webhooks.serving(_Scripted, lambda srv: release.set()):
        yield start, release


def _feed(out: Path) -> Path:
    """Two AI pictures (generator metadata), each posted three times by
    different accounts within a minute: two clusters, one alert each."""
    (out / "img").mkdir(parents=True)
    lines = []
    for n, seed in enumerate((1001, 3000)):
        (out / "img" / f"fake{n}.png").write_bytes(a1111_png(scene(seed), f"news photo {seed}"))
        for i in range(3):
            lines.append(json.dumps({
                "event_id": f"ev-{n}-{i}", "platform": "x", "account_id": f"acct-{n}-{i}",
                "posted_at": (BASE_TIME + timedelta(seconds=10 * (3 * n + i))).isoformat(),
                "image": {"path": f"img/fake{n}.png"}}))
    feed = out / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    return feed


def _settings(tmp_path: Path, feed: Path, url: str, *, timeout_s: float, redeliver_s: float,
              stop_grace_s: float = 10.0) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", alerts={
        "min_sightings_5m": 3, "escalation_factor": 10.0, "webhook_redeliver_s": redeliver_s,
        "webhook_stop_grace_s": stop_grace_s, "allow_private_webhooks": True,  # the receiver listens on loopback
        "webhooks": [{"url": url, "secret_env": ENV, "retries": 0, "timeout_s": timeout_s}],
    })
    settings.ingest.image_roots = [feed.parent.resolve()]
    return settings


def _deliveries(settings: Settings) -> dict[str, str]:
    """alert id -> its one delivery's status."""
    store = open_store(settings.data_dir)
    try:
        return {aid: ds[0].status for aid, ds in store.delivery_status().items()}
    finally:
        store.close()


def _wait_for(check, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def _stop(worker: runner.WorkerProcess) -> float:
    """SIGTERM; seconds until the process exited (cleanly: not killed)."""
    started = time.monotonic()
    worker.terminate()
    code = worker.proc.wait(60)
    took = time.monotonic() - started
    assert code == 0, f"the worker exited with {code} after {took:.1f} s; log {worker.log_path}"
    return took


def _held_at_stop(tmp_path: Path, srv: _Scripted, stack: ExitStack, *, timeout_s: float,
                  redeliver_s: float, **settings_kw) -> tuple[Settings, runner.Cluster, runner.WorkerProcess]:
    """A worker, its hook to ``srv``, that has raised both alerts of
    ``_feed``, recorded both deliveries as queued and is sending the first
    one (the receiver holds it)."""
    feed = _feed(tmp_path / "feed")
    settings = _settings(tmp_path, feed, _url(srv), timeout_s=timeout_s, redeliver_s=redeliver_s, **settings_kw)
    cluster = runner.start_cluster(settings, stack)
    worker = cluster.start_worker()
    cluster.wait_ready()
    produce_feed(feed, cluster.bootstrap, settings)
    _wait_for(lambda: len(srv.requests) >= 1 and len(_deliveries(settings)) == 2, 120,
              "both alerts raised and the first one sent")
    assert set(_deliveries(settings).values()) == {"queued"}
    assert len(srv.requests) == 1, "one alert at a time per target: the second waits in the sender's queue"
    return settings, cluster, worker


# -- Sinks.stop in process ------------------------------------------------------------------
def test_stop_returns_at_once_when_nothing_is_held(scripted, tmp_path, monkeypatch):
    """A replay's end, with or without webhooks: no wait at all."""
    monkeypatch.setenv(ENV, SECRET)
    start, _ = scripted
    srv = start(lambda n, aid: (200, {}))
    hook = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=5)
    for hooks in ((), (hook,)):
        sinks, _ = _sinks(tmp_path / str(len(hooks)), *hooks)

        async def go() -> float:
            if hooks:  # one alert delivered before the stop: its sender is idle
                await asyncio.wait_for(sinks.alert(_alert().model_dump_json().encode()), 10)
                await asyncio.wait_for(sinks.drain(), 10)
            started = time.monotonic()
            await sinks.stop()
            return time.monotonic() - started

        assert asyncio.run(go()) < 1.0  # a few ms; the bug waited out the 10 s grace or the 5 s hook timeout
    assert srv.alert_ids() == ["c-1:1"]


def test_stop_waits_no_longer_than_its_grace_and_takes_no_alert_after(scripted, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    start, release = scripted
    srv = start(lambda n, aid: (release.wait(30), (200, {}))[1])  # a tarpit until the test ends
    hook = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=30)
    sinks, store = _sinks(tmp_path, hook)
    later = _alert().model_copy(update={"alert_id": "c-2:1", "cluster_id": "c-2"})

    async def go() -> float:
        await asyncio.wait_for(sinks.alert(_alert().model_dump_json().encode()), 10)
        started = time.monotonic()
        await asyncio.wait_for(sinks.stop(grace_s=0.5), 10)
        took = time.monotonic() - started
        # the alerts agent may still hand one over while the worker stops: left to the redelivery
        await asyncio.wait_for(sinks.alert(later.model_dump_json().encode()), 10)
        await asyncio.sleep(0.2)
        assert sinks._senders == {} and sinks._client is None, "no sender or HTTP client started after the stop"
        return took

    assert 0.45 <= asyncio.run(go()) < 1.5
    assert {aid: ds[0].status for aid, ds in store.delivery_status().items()} == {"c-1:1": "queued",
                                                                                     "c-2:1": "queued"}
    assert srv.alert_ids() == ["c-1:1"]


def test_stop_ends_with_the_held_deliveries_when_the_hooks_timeouts_end_them(scripted, tmp_path, monkeypatch):
    """A hook whose tries end sooner than the grace (timeout_s 1, no retry):
    the stop waits for that, not for the grace; the delivery is recorded failed."""
    monkeypatch.setenv(ENV, SECRET)
    start, release = scripted
    srv = start(lambda n, aid: (release.wait(30), (200, {}))[1])
    sinks, store = _sinks(tmp_path, WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=1))

    async def go() -> float:
        await asyncio.wait_for(sinks.alert(_alert().model_dump_json().encode()), 10)
        started = time.monotonic()
        await asyncio.wait_for(sinks.stop(), 20)
        return time.monotonic() - started

    assert asyncio.run(go()) < 2.5
    [d] = store.delivery_status()["c-1:1"]
    assert d.status.startswith("failed: ") and "no answer within 1 s" in d.status


# -- a real worker ------------------------------------------------------------------------------
@slow
def test_a_stopping_worker_delivers_the_alerts_it_holds_to_a_slow_receiver(scripted, tmp_path, monkeypatch):
    """The worker stopped without draining its senders: the alert in flight
    and the one queued behind it stayed "queued" for the redelivery, 2 x
    webhook_redeliver_s (120 s by default) later on some worker."""
    monkeypatch.setenv(ENV, SECRET)  # inherited by the worker processes
    start, release = scripted
    answer_s = 1.0

    def slow(n: int, alert_id: str) -> tuple[int, dict]:
        release.wait(30)  # the first request is held until the worker has been told to stop
        time.sleep(answer_s)  # slow, but it answers
        return 200, {}

    srv = start(slow)
    with ExitStack() as stack:
        settings, _, worker = _held_at_stop(tmp_path, srv, stack, timeout_s=10, redeliver_s=60)
        took: list[float] = []
        stopping = threading.Thread(target=lambda: took.append(_stop(worker)))
        stopping.start()
        time.sleep(0.3)  # SIGTERM delivered: the stop is under way
        release.set()
        stopping.join(90)
        [stop_s] = took
        log = worker.log_path.read_text(errors="replace")

    assert len(srv.alert_ids()) == 2 and len(set(srv.alert_ids())) == 2, srv.alert_ids()
    assert set(_deliveries(settings).values()) == {"delivered"}, \
        f"alerts the stopped worker held were left to the redelivery: {_deliveries(settings)}"
    assert all(r["valid"] for r in srv.requests)
    assert "webhook senders drained at stop: 2 delivered, 0 left queued" in log
    # two answers of answer_s each, one after the other, plus the worker's own stop (which a loaded
    # CI machine stretches by seconds)
    assert stop_s < 2 * answer_s + 12, f"the stop took {stop_s:.1f} s"


@slow
def test_a_hanging_receiver_holds_the_stop_only_for_the_grace_and_its_alerts_are_redelivered(scripted, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    start, release = scripted
    up = threading.Event()

    def tarpit_until_up(n: int, alert_id: str) -> tuple[int, dict]:
        if not up.is_set():
            release.wait(120)  # never answers while the first worker runs (its timeout_s is 60)
        return 200, {}

    srv = start(tarpit_until_up)
    with ExitStack() as stack:
        grace_s = 4.0  # alerts.webhook_stop_grace_s, below its default 10 s: the worker reads the setting
        settings, cluster, first = _held_at_stop(tmp_path, srv, stack, timeout_s=60, redeliver_s=1.0,
                                                 stop_grace_s=grace_s)
        stop_s = _stop(first)
        log = first.log_path.read_text(errors="replace")
        # bounded by the grace, far below the hook's 60 s timeout; a loaded machine adds seconds to the stop
        assert grace_s - 0.5 <= stop_s < grace_s + 15, f"the stop took {stop_s:.1f} s (grace {grace_s:g} s)"
        assert "webhook senders drained at stop: 0 delivered, 2 left queued" in log
        assert set(_deliveries(settings).values()) == {"queued"}, "left for the redelivery, not lost nor failed"

        up.set()  # the receiver answers again; the next worker's redelivery sends what the first one held
        second = cluster.start_worker()
        _wait_for(lambda: set(_deliveries(settings).values()) == {"delivered"}, 60,
                  "the held alerts redelivered by the next worker", poll_s=0.2)
        assert second.proc.poll() is None
    assert len(set(srv.alert_ids())) == 2
