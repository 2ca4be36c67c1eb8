"""Webhook deliveries a data dir from an older deepwatch holds, after the
upgrade: no token from an old status text is shown (the webhook URL in it
reads as its label), an old alert counts once per hook after redelivery
(its records under the hook's earlier keys move onto the hook's key), and a
hook on a private address that the settings refuse is said at start and in
every rejection, with the command its rejected alerts need."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3

import pytest

from streams import metrics
from streams.findings import DeliveryState, legacy_delivery
from streams.settings import FindingsSettings, Settings, WebhookSettings
from streams.webhooks import Deliveries, Target, WebhookRejected, post, target_key
from tests.findings_fixture import alerts
from tests import test_webhook_delivery
from tests.test_delivery_records import store  # noqa: F401 - the fixture: each test on SQLite and the fake ES
from tests.test_webhook_delivery import _redeliver, _settings, _url
from tests.test_webhooks import ENV, SECRET, _alert

scripted = test_webhook_delivery.scripted  # its loopback receiver that answers per request

OLD_URL = "http://127.0.0.1:45639/hook?token=SECRET123"  # as the old demo's config named it
LABEL = "http://127.0.0.1:45639"


@pytest.fixture(autouse=True)
def _webhook_secret(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)


def _two_clusters() -> list:
    one = alerts()[0]
    return [one.model_copy(update={"alert_id": f"c{n}:1", "cluster_id": f"c{n}", "level": 1,
                                   "created_at": one.created_at.replace(minute=n)}) for n in (1, 2)]


def _refresh(store) -> None:
    if hasattr(store, "refresh"):
        store.refresh()  # Elasticsearch: searches see what the last refresh made visible


# -- item: an old status text held the webhook URL, token and all ----------------------------------
def test_an_old_findings_file_shows_no_token_from_its_delivery_statuses(tmp_path):
    """A findings file of schema 1 named each target by its whole URL and
    wrote that URL into each delivery's status ("failed: <url>: HTTP 503").
    Opened, the targets are keyed and the statuses show the URL's label, on
    disk and in `deepwatch alerts --format json`."""
    from typer.testing import CliRunner

    from streams.cli import app
    from streams.store import open_store

    first, second = _two_clusters()
    s = open_store(tmp_path)
    s.add_alert(first)
    s.add_alert(second)
    s.close()
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    db.execute("ALTER TABLE deliveries DROP COLUMN state")  # as schema 1 made it
    db.executemany("INSERT INTO deliveries (alert_id, target, status) VALUES (?,?,?)", [
        (first.alert_id, OLD_URL, f"failed: {OLD_URL}: HTTP 503"),
        (second.alert_id, OLD_URL, f"rejected: {OLD_URL}: queued behind an undelivered earlier alert of cluster c1")])
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()

    s = open_store(tmp_path)
    shown = {(a, d.target): (d.state, d.status) for a, ds in s.delivery_status().items() for d in ds}
    s.close()
    assert shown == {
        (first.alert_id, target_key(OLD_URL)): (DeliveryState.FAILED, f"failed: {LABEL}: HTTP 503"),
        (second.alert_id, target_key(OLD_URL)): (
            DeliveryState.REJECTED, f"rejected: {LABEL}: queued behind an undelivered earlier alert of cluster c1")}
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    kept = db.execute("SELECT target, status FROM deliveries").fetchall()
    db.close()
    assert kept and not any("SECRET123" in t or "SECRET123" in status for t, status in kept)
    out = CliRunner().invoke(app, ["alerts", "--data-dir", str(tmp_path), "--format", "json"])
    assert out.exit_code == 0, out.output
    assert f"failed: {LABEL}: HTTP 503" in out.stdout and "SECRET123" not in out.output


def test_a_file_keyed_by_a_version_that_kept_the_url_in_its_status_is_cleaned(tmp_path):
    """A file such a schema-1 file became under the release before this
    one: targets keyed and states derived, but the status still held the
    URL. It reads without the token at once, and the next writer's open
    cleans what is on disk."""
    from streams.store import open_store

    first, _ = _two_clusters()
    s = open_store(tmp_path)
    s.add_alert(first)
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    db.execute("INSERT INTO deliveries (alert_id, target, state, status) VALUES (?,?,?,?)",
               (first.alert_id, target_key(OLD_URL), "failed", f"{OLD_URL}: HTTP 503"))
    db.commit()
    db.close()
    [d] = s.delivery_status()[first.alert_id]
    assert d.status == f"failed: {LABEL}: HTTP 503"
    s.close()
    open_store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    assert db.execute("SELECT status FROM deliveries").fetchall() == [(f"{LABEL}: HTTP 503",)]
    db.close()


def test_old_elasticsearch_delivery_documents_show_no_token(fake_es, tmp_path):
    """A v3 deployment's delivery documents name the target by its URL and
    hold it in ``status`` too; they are not rewritten. Their statuses read
    with the URL's label; `deepwatch alerts` and `deepwatch redeliver` name
    the target by the URL's key, which requeues them; requeued, the new
    status keeps no token either."""
    from typer.testing import CliRunner

    from streams import es_templates as T
    from streams.cli import app
    from streams.es_docs import now
    from streams.es_store import EsFindingsStore

    s = EsFindingsStore.from_url(fake_es.url.replace("http://", "es://"),
                                 settings=Settings(findings=FindingsSettings(retry_initial_s=0.001)))
    first, second = _two_clusters()
    s.add_alert(first)
    s.add_alert(second)
    old = [(first.alert_id, f"failed: {OLD_URL}: HTTP 503"), (second.alert_id, f"rejected: {OLD_URL}: HTTP 403")]
    s.bulk.send([({"index": {"_index": "deepwatch-deliveries", "_id": s._delivery_id(a, OLD_URL)}},
                  {"alert_id": a, "target": OLD_URL, "status": status, "at": now()}) for a, status in old])
    s.refresh()
    assert {d.status for ds in s.delivery_status().values() for d in ds} == {
        f"failed: {LABEL}: HTTP 503", f"rejected: {LABEL}: HTTP 403"}

    cli, store = CliRunner(), ["--data-dir", str(tmp_path), "--store", fake_es.url.replace("http://", "es://")]
    listed = cli.invoke(app, ["alerts", *store, "--format", "json"])
    assert listed.exit_code == 0, listed.output
    shown = [(d["target"], d["status"]) for a in json.loads(listed.stdout) for d in a["deliveries"]]
    assert sorted(shown) == [(target_key(OLD_URL), f"failed: {LABEL}: HTTP 503"),
                             (target_key(OLD_URL), f"rejected: {LABEL}: HTTP 403")]
    waiting = cli.invoke(app, ["redeliver", *store, "--json"])
    assert waiting.exit_code == 0, waiting.output
    assert json.loads(waiting.stdout) == [{"target": target_key(OLD_URL), "queued": 0, "failed": 1, "rejected": 1}]
    requeued = cli.invoke(app, ["redeliver", target_key(OLD_URL), *store, "--json"])
    assert requeued.exit_code == 0, requeued.output
    assert json.loads(requeued.stdout) == {"target": target_key(OLD_URL), "requeued": 1}
    assert not any("SECRET123" in r.output for r in (listed, waiting, requeued))
    doc = fake_es.docs[T.concrete("deepwatch-deliveries")][s._delivery_id(second.alert_id, OLD_URL)]
    assert doc["state"] == "failed" and "SECRET123" not in doc["status"]  # it keeps its target (the URL) as written
    s.close()


def test_legacy_delivery_reads_the_url_in_an_old_status_as_its_label():
    assert legacy_delivery(f"failed: {OLD_URL}: HTTP 503") == (DeliveryState.FAILED, f"{LABEL}: HTTP 503")
    state, why = legacy_delivery(f"failed: ConnectError: for url '{OLD_URL}'.")
    assert state is DeliveryState.FAILED and why == f"ConnectError: for url '{LABEL}'."
    # what this version writes (labels only) reads as it is
    assert legacy_delivery(f"rejected: {LABEL}: HTTP 403") == (DeliveryState.REJECTED, f"{LABEL}: HTTP 403")


# -- item: an old alert counted once per hook after redelivery -------------------------------------
def test_redelivery_moves_an_old_alerts_records_onto_the_hooks_key(store, scripted, tmp_path):
    """An alert kept under a hook's earlier key (``legacy_keys``) and
    redelivered has one record, under the hook's key: the store's counts,
    the undelivered gauge, `deepwatch alerts` and a requeue count it once,
    however often it failed or was rejected since."""
    answer = {"status": 503}
    srv = scripted(lambda n, aid: (answer["status"], {}))
    url = _url(srv, "/hook?token=S3CR3T")
    hook = WebhookSettings(name="main", url=url, secret_env=ENV, retries=0, timeout_s=2)
    settings = _settings(tmp_path, hook)
    old_key = target_key(url)  # where a version before hook names kept them
    two = _two_clusters()
    for a in two:
        store.add_alert(a)
        store.mark_delivered(a.alert_id, old_key, DeliveryState.FAILED, "HTTP 503")
    _refresh(store)

    for status, state in ((503, DeliveryState.FAILED), (403, DeliveryState.REJECTED)):
        answer["status"] = status
        assert _redeliver(settings, store) == 0
        _refresh(store)
        records = store.delivery_status()
        assert {a.alert_id: [(d.target, d.state) for d in records[a.alert_id]] for a in two} == {
            a.alert_id: [("hook:main", state)] for a in two}
        assert store.undelivered_counts() == {"hook:main": {state: 2}}
    asyncio.run(_gauge(settings, store))
    assert metrics.WEBHOOK_UNDELIVERED.labels("hook:main", "rejected")._value.get() == 2
    assert sum(store.requeue_deliveries(name) for name in ("hook:main", old_key, url)) == 2
    assert len(srv.requests) == 4  # one POST per alert and round


async def _gauge(settings, store) -> None:
    from streams.webhook_redelivery import Redeliverer

    await Redeliverer(settings, lambda: store).refresh_gauge()


# -- item: a hook on a private address the settings refuse ----------------------------------------
def _private_hook(url: str = "http://127.0.0.1:9/hook?token=S3CR3T") -> WebhookSettings:
    return WebhookSettings(name="main", url=url, secret_env=ENV, retries=0, timeout_s=2)


def test_a_refused_private_receiver_is_named_at_start_with_the_setting_and_the_requeue():
    from streams.webhooks import refused_receivers

    s = Settings()
    s.alerts.webhooks = [_private_hook(), _private_hook("http://localhost:9/other").model_copy(update={"name": "two"}),
                         WebhookSettings(name="meta", url="http://169.254.169.254/x", secret_env=ENV)]
    lines = asyncio.run(refused_receivers(s))
    assert len(lines) == 3, lines
    assert "alerts.allow_private_webhooks = true" in lines[0] and "`deepwatch redeliver hook:main`" in lines[0]
    assert "`deepwatch redeliver hook:two`" in lines[1]
    assert "never webhook receivers" in lines[2] and "deepwatch redeliver" not in lines[2]
    assert not any("S3CR3T" in line for line in lines)
    s.alerts.allow_private_webhooks = True
    lines = asyncio.run(refused_receivers(s))
    assert len(lines) == 1 and "169.254.169.254" in lines[0], "metadata addresses stay refused"


def test_a_command_that_sends_alerts_says_so_on_the_console_before_it_starts(capsys):
    """replay, demo, worker and serve check their alert senders first: the
    refused receiver is said there, not only in a worker's log file."""
    from streams.cli.common import check_alert_senders

    s = Settings()
    s.alerts.webhooks = [_private_hook()]
    check_alert_senders(s)
    said = capsys.readouterr().err
    assert said.startswith("warning: alerts.webhooks[0]") and "`deepwatch redeliver hook:main`" in said, said
    assert "S3CR3T" not in said
    s.alerts.allow_private_webhooks = True
    check_alert_senders(s)
    assert capsys.readouterr().err == ""


def test_the_stored_rejection_says_the_setting_and_the_command_its_alerts_need():
    async def go():
        import httpx

        async with httpx.AsyncClient() as client:
            await post(Target(_private_hook()), _alert(), client, Deliveries())

    with pytest.raises(WebhookRejected) as e:
        asyncio.run(go())
    why = str(e.value)
    assert "alerts.allow_private_webhooks = true" in why and "`deepwatch redeliver hook:main`" in why
    assert "S3CR3T" not in why


def test_a_worker_warns_at_start_about_a_refused_private_receiver(tmp_path, caplog):
    from streams.webhook_redelivery import install_redelivery

    class App:
        """What install_redelivery asks of a Faust app: its timers and start tasks."""

        def __init__(self):
            self.tasks = []

        def timer(self, **_):
            return lambda f: f

        def task(self, f):
            self.tasks.append(f)
            return f

    s = Settings(data_dir=tmp_path)
    s.alerts.webhooks = [_private_hook()]
    app = App()
    install_redelivery(app, s, Deliveries())
    with caplog.at_level(logging.WARNING, logger="streams.webhooks"):
        for task in app.tasks:
            asyncio.run(task())
    said = [r.getMessage() for r in caplog.records if "allow_private_webhooks" in r.getMessage()]
    assert len(said) == 1 and "deepwatch redeliver hook:main" in said[0]


def test_the_stranded_warning_names_an_old_url_target_by_its_key(tmp_path, caplog):
    """Elasticsearch counts an old document under its whole URL; the
    warning about deliveries no hook serves names it by its key."""
    from streams.webhook_redelivery import Redeliverer

    settings = _settings(tmp_path, WebhookSettings(name="main", url="http://127.0.0.1:9/new", secret_env=ENV))
    with caplog.at_level(logging.WARNING, logger="streams.webhooks"):
        assert Redeliverer(settings, lambda: None).warn_stranded({OLD_URL: {DeliveryState.FAILED: 2}}) == [OLD_URL]
    [said] = [r for r in caplog.records if "no configured hook serves" in r.getMessage()]
    assert f"{target_key(OLD_URL)} (2)" in said.getMessage() and said.targets == [target_key(OLD_URL)]
    assert "SECRET123" not in said.getMessage()


# -- review: a record moved onto the hook's key keeps a delivered state ----------------------------
@pytest.mark.parametrize("outcome", [DeliveryState.FAILED, DeliveryState.REJECTED])
def test_a_delivered_record_under_an_earlier_key_wins_the_move(store, outcome):
    """An alert delivered under the hook's earlier key and then marked
    failed (or rejected) under its key, moving the earlier record: the
    one record left says delivered (with the earlier record's time), so
    redelivery never sends the alert again."""
    a = _two_clusters()[0]
    store.add_alert(a)
    store.mark_delivered(a.alert_id, "old-key", DeliveryState.FAILED, "HTTP 503")
    store.mark_delivered(a.alert_id, "older-key", DeliveryState.DELIVERED, "HTTP 200")
    _refresh(store)
    at = {d.target: d.at for d in store.delivery_status([a.alert_id])[a.alert_id]}["older-key"]

    store.mark_delivered(a.alert_id, "hook:main", outcome, "HTTP 503", moved_from=("old-key", "older-key"))
    _refresh(store)
    assert store.delivery_state(a.alert_id, "hook:main") is DeliveryState.DELIVERED
    assert [(d.target, d.state, d.at) for d in store.delivery_status([a.alert_id])[a.alert_id]] == [
        ("hook:main", DeliveryState.DELIVERED, at)]
    assert store.failed_deliveries("hook:main") == []
    assert store.undelivered_counts() == {}


def test_a_move_without_a_delivered_record_keeps_the_new_outcome(store):
    """The earlier keys' records, none delivered, go; the new outcome is the one record."""
    a = _two_clusters()[0]
    store.add_alert(a)
    store.mark_delivered(a.alert_id, "old-key", DeliveryState.REJECTED, "HTTP 403")
    store.mark_delivered(a.alert_id, "hook:main", DeliveryState.FAILED, "HTTP 503", moved_from=("old-key",))
    _refresh(store)
    assert [(d.target, d.state, d.detail) for d in store.delivery_status([a.alert_id])[a.alert_id]] == [
        ("hook:main", DeliveryState.FAILED, "HTTP 503")]


def test_an_old_workers_delivered_row_wins_the_move(tmp_path):
    """A schema-1 worker's row (no state, "delivered" its whole status) under an earlier key counts as delivered."""
    from streams.store import open_store

    s = open_store(tmp_path)
    try:
        a = _two_clusters()[0]
        s.add_alert(a)
        with s._tx() as db:
            db.execute("INSERT INTO deliveries (alert_id, target, state, status) VALUES (?, ?, NULL, 'delivered')",
                       (a.alert_id, "old-key"))
        s.mark_delivered(a.alert_id, "hook:main", DeliveryState.FAILED, "HTTP 503", moved_from=("old-key",))
        assert s.delivery_state(a.alert_id, "hook:main") is DeliveryState.DELIVERED
        assert s.failed_deliveries("hook:main") == []
    finally:
        s.close()


def test_a_refused_move_of_a_delivery_record_is_logged_as_one(fake_es, caplog):
    """A role without ``delete``: the earlier key's record stays, and the log
    says it is a delivery record (its index and id), not a dead letter."""
    from streams.es_store import EsFindingsStore
    from tests.fake_es import error_body

    store = EsFindingsStore.from_url(fake_es.url.replace("http://", "es://"),
                                     settings=Settings(findings=FindingsSettings(retry_initial_s=0.001)))
    try:
        a = _two_clusters()[0]
        store.add_alert(a)
        store.mark_delivered(a.alert_id, "old-key", DeliveryState.FAILED, "HTTP 503")
        fake_es.fail_items(lambda op, meta, source: op == "delete", 403,
                           error_body("security_exception", "action [indices:data/write/delete] is unauthorized",
                                      403)["error"])
        with caplog.at_level(logging.ERROR, logger="deepwatch.alerts"):
            store.mark_delivered(a.alert_id, "hook:main", DeliveryState.FAILED, "HTTP 503", moved_from=("old-key",))
        [rec] = [r for r in caplog.records if "not deleted" in r.getMessage()]
        assert rec.getMessage() == ("delivery record moved to its hook's key not deleted; "
                                    "grant the role the 'delete' index privilege")
        assert rec.index == store.names["deliveries"] and rec.id == store._delivery_id(a.alert_id, "old-key")
        assert "dead letter" not in caplog.text
    finally:
        store.close()
