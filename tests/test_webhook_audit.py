"""Alert webhooks: what an audit found and what fixed it.

1. A hook's deliveries are kept under its identity (``name``, else
   ``scheme://host:port``), so rotating a token in its URL keeps every
   undelivered alert; keys no hook serves are named, ``previous_keys`` hands
   them over.
2. The desk's alert delivery is one bounded attempt (no Retry-After sleep
   while a verdict request waits).
3. Webhook URLs (tokens) are never printed by ``deepwatch settings`` or in
   settings errors.
4. Hooks on different hosts sharing one HMAC key are warned about.
5. Loopback and private receivers need ``alerts.allow_private_webhooks``.
6. Alerts carry ``merged_from``.
7. Alert thresholds above ``virality.MAX_RECENT`` are refused; escalation is
   capped there.
8. A redelivery round reads a page of the oldest alerts, not all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from streams import virality, webhook_redelivery, webhooks
from streams.findings import DeliveryState
from streams.settings import Settings, WebhookSettings, load_settings
from streams.settings_check import SettingsError
from streams.webhooks import hook_key, target_key
from tests import test_webhooks
from tests.test_webhook_delivery import _at, _redeliver, _Scripted, _url, _webhook_secret  # noqa: F401 (autouse fixture)
from tests.test_webhooks import ENV, _alert, _sink_alert


@pytest.fixture
def scripted():
    yield from test_webhooks.serving(_Scripted)


def _settings(tmp_path, *hooks: WebhookSettings, allow_private: bool = True) -> Settings:
    """Settings with ``hooks``; ``allow_private``: their receivers here listen
    on loopback, allowed as ``alerts.allow_private_webhooks = true`` allows
    them (webhooks to private addresses are refused without it)."""
    s = Settings(data_dir=tmp_path)
    s.alerts.console = False
    s.alerts.allow_private_webhooks = allow_private
    s.alerts.webhooks = list(hooks)
    return s


def _sinks(settings: Settings):
    from streams.sinks import Sinks

    sinks = Sinks(settings)
    return sinks, sinks.store




def _states(store, alert_ids) -> dict[str, dict[str, str]]:
    status = store.delivery_status(list(alert_ids))
    return {a: {d.target: d.state.value for d in ds} for a, ds in status.items()}


# -- 1. a changed URL keeps the hook's undelivered alerts ----------------------------------------
def test_rotating_the_token_in_a_hook_url_keeps_its_undelivered_alerts(scripted, tmp_path, monkeypatch):
    """The receiver refuses the old token (404: rejected, as a rotated token
    is); the operator updates the URL, as the error says, and asks for
    redelivery: the alerts reach the new URL. Before, they stayed under the
    old URL's key for good (`deepwatch redeliver NEW_URL` found nothing)."""
    srv = scripted(lambda n, aid: (404, {}) if n < 2 else (200, {}))  # the old token's two: refused
    old, new = _url(srv, "/hooks/old-token"), _url(srv, "/hooks/new-token")
    settings = _settings(tmp_path, WebhookSettings(url=old, secret_env=ENV, retries=0, timeout_s=5))
    sinks, store = _sinks(settings)
    a1, a2 = _alert(), _alert().model_copy(update={"alert_id": "c-1:2", "level": 2})

    async def raise_both() -> None:
        try:
            for a in (a1, a2):
                await asyncio.wait_for(sinks.alert(a.model_dump_json().encode()), 30)
            await asyncio.wait_for(sinks.drain(), 30)
        finally:
            await sinks.aclose()

    asyncio.run(raise_both())
    assert {s for by in _states(store, ["c-1:1", "c-1:2"]).values() for s in by.values()} == {"rejected"}

    monkeypatch.setenv("DEEPWATCH_ALERTS__WEBHOOKS", json.dumps([{"url": new, "secret_env": ENV}]))
    from streams.cli import app

    r = CliRunner().invoke(app, ["redeliver", new, "--data-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["requeued"] == 2

    rotated = _settings(tmp_path, WebhookSettings(url=new, secret_env=ENV, retries=0, timeout_s=5))
    assert hook_key(rotated.alerts.webhooks[0]) == hook_key(settings.alerts.webhooks[0])
    assert _redeliver(rotated, store) == 2
    assert srv.alert_ids()[2:] == ["c-1:1", "c-1:2"]
    assert all(s == "delivered" for by in _states(store, ["c-1:1", "c-1:2"]).values() for s in by.values())


def test_a_named_hook_keeps_its_key_across_hosts_and_two_hooks_on_one_host_need_names():
    a = WebhookSettings(url="https://hooks.example/x/T0KEN", name="newsroom")
    b = WebhookSettings(url="https://elsewhere.example/y", name="newsroom")
    assert hook_key(a) == hook_key(b) == "hook:newsroom"
    plain = WebhookSettings(url="https://hooks.example/a/T0KEN")
    assert "T0KEN" not in hook_key(plain) and hook_key(plain).startswith("https://hooks.example#")
    assert hook_key(plain) == hook_key(WebhookSettings(url="https://hooks.example:443/b/OTHER"))
    with pytest.raises(SettingsError) as e:
        load_settings(alerts={"webhooks": [{"url": "https://hooks.example/a/T0KEN"}, {"url": "https://hooks.example/b/K3Y"}]})
    assert "distinct `name`" in str(e.value) and "T0KEN" not in str(e.value) and "K3Y" not in str(e.value)
    named = load_settings(alerts={"webhooks": [{"url": "https://hooks.example/a", "name": "a"},
                                               {"url": "https://hooks.example/b", "name": "b"}]})
    assert list(webhooks.hooks_by_key(named)) == ["hook:a", "hook:b"]


def test_undelivered_keys_no_hook_serves_are_named_and_previous_keys_hands_them_over(scripted, tmp_path, caplog):
    srv = scripted(lambda n, aid: (200, {}))
    from streams.store import open_store

    store = open_store(tmp_path)
    store.add_alert(_alert())
    gone = "https://old-subscriber.example#0badc0de"
    store.mark_delivered("c-1:1", gone, DeliveryState.FAILED, "HTTP 503")
    hook = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="streams.webhooks"):
        assert _redeliver(_settings(tmp_path, hook), store) == 0
    warned = [r.getMessage() for r in caplog.records if "no configured hook serves" in r.getMessage()]
    assert warned and gone in warned[0] and "previous_keys" in warned[0]

    caplog.clear()
    taking_over = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=5, previous_keys=[gone])
    with caplog.at_level(logging.WARNING, logger="streams.webhooks"):
        assert _redeliver(_settings(tmp_path, taking_over), store) == 1
    assert srv.alert_ids() == ["c-1:1"]
    # moved onto the hook's key: one record per alert and hook, counted once
    assert _states(store, ["c-1:1"])["c-1:1"] == {hook_key(taking_over): "delivered"}
    assert not [r for r in caplog.records if "no configured hook serves" in r.getMessage()]
    store.close()


def test_records_under_the_url_key_of_earlier_versions_are_still_redelivered(scripted, tmp_path):
    srv = scripted(lambda n, aid: (200, {}))
    from streams.store import open_store

    hook = WebhookSettings(url=_url(srv, "/hooks/T0KEN"), secret_env=ENV, retries=0, timeout_s=5)
    store = open_store(tmp_path)
    store.add_alert(_alert())
    store.mark_delivered("c-1:1", target_key(hook.url), DeliveryState.FAILED, "HTTP 503")  # as before this change
    settings = _settings(tmp_path, hook)
    assert _redeliver(settings, store) == 1
    assert srv.alert_ids() == ["c-1:1"]
    # moved onto the hook's key: one record per alert and hook, counted once
    assert store.delivered("c-1:1", hook_key(hook)) and store.delivery_state("c-1:1", target_key(hook.url)) is None
    store.close()


# -- 2. the desk: one attempt, no Retry-After sleep --------------------------------------------
def test_a_desk_alert_makes_one_attempt_and_leaves_retry_after_to_redelivery(scripted, tmp_path):
    """A receiver answering 429 Retry-After: 300 held the verdict request
    (and the verdict lock) for retries x 300 s."""
    from streams.desk.alerting import AlertPath

    srv = scripted(lambda n, aid: (429, {"Retry-After": "300"}))
    settings = _settings(tmp_path, WebhookSettings(url=_url(srv), secret_env=ENV, retries=3, timeout_s=5))
    path = AlertPath(settings)

    async def go() -> None:
        try:
            await asyncio.wait_for(path.raise_alert(_alert()), 60)
        finally:
            await path.sinks.aclose()

    asyncio.run(go())
    assert len(srv.requests) == 1
    [d] = path.sinks.store.delivery_status(["c-1:1"])["c-1:1"]
    assert d.state is DeliveryState.FAILED and "Retry-After" in d.detail
    path.close()


# -- 3. no token printed ------------------------------------------------------------------------
def test_settings_output_and_errors_never_show_a_webhook_url_token(monkeypatch):
    from streams.cli import app

    monkeypatch.setenv("DEEPWATCH_ALERTS__WEBHOOKS", json.dumps([{"url": "https://hooks.example/hooks/T0KEN?key=K3Y"}]))
    r = CliRunner().invoke(app, ["settings", "--format", "json"])
    assert r.exit_code == 0, r.output
    [hook] = json.loads(r.stdout)["alerts"]["webhooks"]
    assert hook["url"] == target_key("https://hooks.example/hooks/T0KEN?key=K3Y")
    assert "T0KEN" not in r.output and "K3Y" not in r.output
    for bad in ("https://hooks.example:99999/hooks/T0KEN", "ftp://hooks.example/hooks/T0KEN",
                "https://hooks.example/hooks/T0KEN bad"):
        monkeypatch.setenv("DEEPWATCH_ALERTS__WEBHOOKS", json.dumps([{"url": bad}]))
        r = CliRunner().invoke(app, ["settings", "--format", "json"])
        said = r.output + str(r.exception)  # the settings error, as the command's entry point prints it
        assert r.exit_code != 0 and "alerts.webhooks" in said and "T0KEN" not in said, said


# -- 4. one key per subscriber ------------------------------------------------------------------
def test_hooks_on_different_hosts_sharing_a_key_are_warned_in_one_line(monkeypatch, capsys):
    from streams.cli.common import check_alert_senders

    monkeypatch.setenv("DEEPWATCH_WEBHOOK_SECRET", "one-key")
    check_alert_senders(Settings(alerts={"webhooks": [{"url": "https://a.example/hook"}]}))
    assert capsys.readouterr().err == ""
    check_alert_senders(Settings(alerts={"webhooks": [{"url": "https://a.example/T0KEN"}, {"url": "https://b.example/x"}]}))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "DEEPWATCH_WEBHOOK_SECRET" in lines[0] and "a.example" in lines[0]
    assert "b.example" in lines[0] and "T0KEN" not in lines[0]
    monkeypatch.setenv("B_SECRET", "b-key")
    check_alert_senders(Settings(alerts={"webhooks": [{"url": "https://a.example/x"},
                                                      {"url": "https://b.example/x", "secret_env": "B_SECRET"}]}))
    assert capsys.readouterr().err == ""


# -- 5. private receivers need the switch ----------------------------------------------------------
def test_private_and_loopback_receivers_need_allow_private_webhooks(scripted, tmp_path):
    srv = scripted(lambda n, aid: (200, {}))
    port = srv.server_address[1]
    for i, url in enumerate((f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook")):
        settings = _settings(tmp_path / str(i), WebhookSettings(url=url, secret_env=ENV, retries=0, timeout_s=5),
                             allow_private=False)
        sinks, store = _sinks(settings)
        asyncio.run(_sink_alert(sinks, _alert()))
        [d] = store.delivery_status(["c-1:1"])["c-1:1"]
        assert d.state is DeliveryState.REJECTED and "allow_private_webhooks" in d.detail, d.detail
        store.close()
    assert srv.requests == []

    allowed = _settings(tmp_path / "ok", WebhookSettings(url=f"http://localhost:{port}/hook", secret_env=ENV, retries=0,
                                                         timeout_s=5), allow_private=False)
    allowed.alerts.allow_private_webhooks = True
    sinks, store = _sinks(allowed)
    asyncio.run(_sink_alert(sinks, _alert()))
    assert srv.alert_ids() == ["c-1:1"] and store.delivered("c-1:1", hook_key(allowed.alerts.webhooks[0]))
    store.close()


# -- 6. merged_from --------------------------------------------------------------------------------
def test_alerts_after_a_merge_name_the_clusters_merged_in():
    from streams.demo_feed import scene
    from tests.test_cluster_engine import AI, Harness, hashed, sighting

    h = Harness(Settings(dedupe={"phash_threshold": 10}, alerts={"min_sightings_5m": 3, "escalation_factor": 2.0}))
    pic = scene(5)
    quiet = h.see(hashed(sighting(pic, "a0", 0, "x0"), 0)).snapshots[-1].cluster_id
    viral = None
    for i in range(6):
        viral = h.see(hashed(sighting(pic, f"b{i}", 0.1 + i * 0.1, f"y{i}", [AI] if i == 0 else []), 0xFFFFF,
                             40)).snapshots[-1].cluster_id
    assert [a.merged_from for a in h.alerts] == [[], []]
    out = h.see(hashed(sighting(pic, "link", 1.0, "z"), 0x3FF, 20))
    survivor = out.snapshots[-1].cluster_id
    n = len(h.alerts)
    for i in range(20):
        h.see(hashed(sighting(pic, f"c{i}", 1.1 + i * 0.05, f"w{i}"), 0x3FF, 20))
    later = h.alerts[n:]
    assert later and all(a.cluster_id == survivor for a in later)
    merged = ({quiet, viral} - {survivor})
    assert all(set(a.merged_from) == merged for a in later)
    assert "merged_from" in json.loads(later[0].model_dump_json())


# -- 7. thresholds above MAX_RECENT ----------------------------------------------------------------
def test_thresholds_velocity_cannot_reach_are_refused():
    for key in ("min_sightings_5m", "min_sightings_1h"):
        with pytest.raises(SettingsError) as e:
            load_settings(alerts={key: virality.MAX_RECENT + 1})
        assert key in str(e.value) and str(virality.MAX_RECENT) in str(e.value)
        assert load_settings(alerts={key: virality.MAX_RECENT}).alerts.model_dump()[key] == virality.MAX_RECENT


def test_escalation_is_capped_at_what_velocity_can_count(monkeypatch):
    """min 10, factor 3: the next level needs 30 in 5 minutes, which a
    velocity capped at 20 never reaches; capped, it escalates once at 20."""
    from streams.demo_feed import scene
    from tests.test_cluster_engine import AI, Harness, sighting

    monkeypatch.setattr(virality, "MAX_RECENT", 20)
    h = Harness(Settings(alerts={"min_sightings_5m": 10, "escalation_factor": 3.0}))
    base = sighting(scene(7), "e0", 0, "a0", [AI])
    h.see(base)
    for i in range(1, 40):
        ev = base.event.model_copy(update={"event_id": f"e{i}", "account_id": f"a{i}",
                                          "posted_at": base.event.posted_at + timedelta(seconds=i * 5)})
        h.see(base.model_copy(update={"event": ev, "evidence": []}))
    assert [(a.level, a.velocity.sightings_5m) for a in h.alerts] == [(1, 10), (2, 20)]


# -- 8. a page per round ---------------------------------------------------------------------------
def test_a_redelivery_round_reads_only_a_page_of_the_oldest(scripted, tmp_path, monkeypatch):
    srv = scripted(lambda n, aid: (200, {}))
    from streams.store import open_store

    hook = WebhookSettings(url=_url(srv), secret_env=ENV, retries=0, timeout_s=5)
    key = hook_key(hook)
    store = open_store(tmp_path)
    for i in range(5):
        a = _at(_alert(), 5 - i, alert_id=f"c-{i}:1", cluster_id=f"c-{i}")
        store.add_alert(a)
        store.mark_delivered(a.alert_id, key, DeliveryState.FAILED, "HTTP 503")
    assert [a.alert_id for a in store.failed_deliveries(key, limit=2)] == ["c-4:1", "c-3:1"]
    monkeypatch.setattr(webhook_redelivery, "REDELIVERY_PAGE", 2)
    settings = _settings(tmp_path, hook)
    assert _redeliver(settings, store) == 2
    assert srv.alert_ids() == ["c-4:1", "c-3:1"]
    assert _redeliver(settings, store) == 2 and _redeliver(settings, store) == 1
    assert srv.alert_ids() == ["c-4:1", "c-3:1", "c-2:1", "c-1:1", "c-0:1"]
    store.close()


def test_elasticsearch_reads_only_a_page_of_the_oldest_undelivered(fake_es):
    from tests.test_es_store import _store

    store = _store(fake_es)
    key = "https://hooks.example#00000000"
    for i in range(5):
        a = _at(_alert(), 5 - i, alert_id=f"c-{i}:1", cluster_id=f"c-{i}")
        store.add_alert(a)
        store.mark_delivered(a.alert_id, key, DeliveryState.FAILED, "HTTP 503")
    assert [a.alert_id for a in store.failed_deliveries(key, limit=2)] == ["c-4:1", "c-3:1"]
    assert [a.alert_id for a in store.failed_deliveries(key)] == ["c-4:1", "c-3:1", "c-2:1", "c-1:1", "c-0:1"]
    store.close()
