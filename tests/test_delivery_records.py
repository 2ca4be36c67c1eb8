"""Webhook delivery records, alike in both findings stores: what redelivery
sends, what waits per target, what an operator queues again and what a run
still waits for (``streams.sinks``, ``streams.webhooks``, ``deepwatch
redeliver``)."""

from __future__ import annotations

import time

import pytest

from streams.findings import DeliveryState
from streams.settings import FindingsSettings, Settings
from tests.findings_fixture import alerts

A = "http://a.example:80#0a0a0a0a"
B = "http://b.example:80#0b0b0b0b"


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    if request.param == "sqlite":
        from streams.store import open_store

        s = open_store(tmp_path)
    else:
        from streams.es_store import EsFindingsStore

        es = request.getfixturevalue("fake_es")
        s = EsFindingsStore.from_url(es.url.replace("http://", "es://"),
                                     settings=Settings(findings=FindingsSettings(retry_initial_s=0.001)))
    yield s
    s.close()


def _three() -> list:
    one = alerts()[0]
    return [one.model_copy(update={"alert_id": f"{one.cluster_id}:{n}", "level": n,
                                   "created_at": one.created_at.replace(minute=n)}) for n in (1, 2, 3)]


def _ids(found) -> list[str]:
    return [a.alert_id for a in found]


def test_delivery_states_are_kept_apart_and_counted_per_target(store):
    first, second, third = _three()
    for a in (first, second, third):
        store.add_alert(a)
    store.mark_delivered(first.alert_id, A, DeliveryState.QUEUED)  # a live sender has it
    store.mark_delivered(second.alert_id, A, DeliveryState.FAILED, "HTTP 503")
    store.mark_delivered(third.alert_id, A, DeliveryState.REJECTED, "HTTP 403")
    store.mark_delivered(first.alert_id, B, DeliveryState.DELIVERED)
    store.mark_delivered(second.alert_id, B, DeliveryState.QUEUED)
    getattr(store, "refresh", lambda: None)()

    # redelivery: failed ones at once, queued ones only once their sender looks gone
    assert _ids(store.failed_deliveries(A)) == [second.alert_id]
    assert _ids(store.queued_deliveries(A, older_than_s=3600)) == []
    time.sleep(0.01)
    assert _ids(store.queued_deliveries(A, older_than_s=0)) == [first.alert_id]
    assert store.undelivered_counts() == {A: {"queued": 1, "failed": 1, "rejected": 1}, B: {"queued": 1}}
    assert store.delivery_targets() == [A, B]
    # a run still waits for what is queued (recently), not for what failed
    work = store.pending_work()
    assert work["deliveries"] == 2

    # the operator queues the rejected one again: redelivery's next round sends it
    assert store.requeue_deliveries(A) == 1
    getattr(store, "refresh", lambda: None)()
    assert _ids(store.failed_deliveries(A)) == [second.alert_id, third.alert_id]
    assert store.undelivered_counts()[A] == {"queued": 1, "failed": 2}
    assert store.requeue_deliveries(A) == 0, "nothing rejected is left"
    # a delivered record never goes back
    store.mark_delivered(first.alert_id, B, DeliveryState.FAILED, "HTTP 503")
    getattr(store, "refresh", lambda: None)()
    assert store.delivered(first.alert_id, B)


def test_requeue_of_named_alerts_only(store):
    first, second = _three()[:2]
    for a in (first, second):
        store.add_alert(a)
        store.mark_delivered(a.alert_id, A, DeliveryState.REJECTED, "HTTP 410")
    getattr(store, "refresh", lambda: None)()
    assert store.requeue_deliveries(A, [second.alert_id]) == 1
    getattr(store, "refresh", lambda: None)()
    assert _ids(store.failed_deliveries(A)) == [second.alert_id]
    assert store.undelivered_counts() == {A: {"failed": 1, "rejected": 1}}


def test_a_redelivered_alert_message_leaves_settled_deliveries_alone(store):
    """The alert sink's queue step ran again for a redelivered alert message:
    a delivery rejected for good went back to ``queued`` and was sent again
    (``delivered()`` is false for it); only an operator queues it again."""
    import asyncio

    from streams.sinks import Sinks
    from streams.webhooks import hooks_by_key

    settings = Settings(alerts={"console": False, "webhooks": [
        {"url": f"https://hooks{n}.example.org/x"} for n in range(3)]})
    rejected, delivered, failed = hooks_by_key(settings)
    first = _three()[0]
    store.add_alert(first)
    store.mark_delivered(first.alert_id, rejected, DeliveryState.REJECTED, "HTTP 400 (the receiver refused the body)")
    store.mark_delivered(first.alert_id, delivered, DeliveryState.DELIVERED)
    store.mark_delivered(first.alert_id, failed, DeliveryState.FAILED, "HTTP 503")
    sinks = Sinks(settings)
    sinks._store = store

    async def redelivered() -> None:
        sinks._stopped_loop = asyncio.get_running_loop()  # senders closed: what is queued stays queued
        await sinks.alert(first.dumps())

    asyncio.run(redelivered())
    getattr(store, "refresh", lambda: None)()
    assert {d.target: d.status for d in store.delivery_status([first.alert_id])[first.alert_id]} == {
        rejected: "rejected: HTTP 400 (the receiver refused the body)", delivered: "delivered",
        failed: "queued"}  # the failed one is still owed: sent again
    assert store.delivery_state(first.alert_id, rejected) is DeliveryState.REJECTED
    assert store.delivery_state(first.alert_id, "https://never.example.org") is None
    assert store.undelivered_counts() == {rejected: {"rejected": 1}, failed: {"queued": 1}}


def test_the_state_decides_never_the_text_of_why(store):
    """Why a delivery is where it is (``detail``, kept in ``status``) is
    free text and may read like another state: a proxy's answer, an
    operator's requeue. A failed delivery whose why begins "rejected" or
    "queued" is still retried, counted failed, holds its cluster's later
    alerts back and is no run's pending work; a rejected one whose why
    begins "failed" is still left to an operator."""
    first, second, third = _three()
    for a in (first, second, third):
        store.add_alert(a)
    store.mark_delivered(first.alert_id, A, DeliveryState.FAILED, "rejected: HTTP 502 from a proxy on the way")
    store.mark_delivered(second.alert_id, A, DeliveryState.FAILED, "queued again by an operator (was rejected: HTTP 403)")
    store.mark_delivered(third.alert_id, A, DeliveryState.REJECTED, "failed: the receiver's own words (HTTP 400)")
    store.mark_delivered(first.alert_id, B, DeliveryState.DELIVERED, "queued, then delivered")
    getattr(store, "refresh", lambda: None)()
    time.sleep(0.01)

    assert _ids(store.failed_deliveries(A)) == [first.alert_id, second.alert_id]
    assert _ids(store.queued_deliveries(A, older_than_s=0)) == [] and _ids(store.failed_deliveries(B)) == []
    assert store.undelivered_counts() == {A: {"failed": 2, "rejected": 1}}
    assert store.pending_work()["deliveries"] == 0
    assert store.undelivered_before(A, first.cluster_id, 2) is True
    assert [store.delivery_state(a.alert_id, A) for a in (first, second, third)] == [
        DeliveryState.FAILED, DeliveryState.FAILED, DeliveryState.REJECTED]
    assert store.delivered(first.alert_id, B)
    # `deepwatch alerts` shows state and why in the one line it always showed
    record = next(d for d in store.delivery_status([first.alert_id])[first.alert_id] if d.target == A)
    assert (record.target, record.state, record.detail, record.status) == (
        A, DeliveryState.FAILED, "rejected: HTTP 502 from a proxy on the way",
        "failed: rejected: HTTP 502 from a proxy on the way")
    assert store.requeue_deliveries(A) == 1, "only the one rejected"


def test_a_findings_file_from_before_delivery_states_keeps_them(tmp_path):
    """A findings file of schema 1 kept each delivery's state only in its
    ``status`` text. Opening it gives every row its state, once, and the
    rows read as they did: nothing delivered is sent again, nothing
    rejected is retried, and `deepwatch alerts` shows the same lines."""
    import sqlite3

    from streams.store import SCHEMA_VERSION, open_store

    first, second, third = _three()
    s = open_store(tmp_path)
    for a in (first, second, third):
        s.add_alert(a)
    s.close()
    old = [(first.alert_id, A, "delivered"), (second.alert_id, A, "failed: HTTP 503"),
           (third.alert_id, A, "rejected: HTTP 403"), (first.alert_id, B, "queued"),
           (second.alert_id, B, "failed: queued again by an operator (was rejected: HTTP 410)")]
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    db.execute("ALTER TABLE deliveries DROP COLUMN state")  # as schema 1 made it
    db.executemany("INSERT INTO deliveries (alert_id, target, status) VALUES (?,?,?)", old)
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()

    for _ in range(2):  # a second open finds nothing left to derive
        s = open_store(tmp_path)
        assert [s.delivery_state(a, t) for a, t, _ in old] == [
            DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.REJECTED, DeliveryState.QUEUED,
            DeliveryState.FAILED]
        assert _ids(s.failed_deliveries(A)) == [second.alert_id] and _ids(s.failed_deliveries(B)) == [second.alert_id]
        assert s.undelivered_counts() == {A: {"failed": 1, "rejected": 1}, B: {"queued": 1, "failed": 1}}
        assert s.pending_work()["deliveries"] == 1
        shown = {(a, d.target): d.status for a, ds in s.delivery_status().items() for d in ds}
        assert shown == {(a, t): status for a, t, status in old}
        s.close()
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT state, status FROM deliveries WHERE alert_id=? AND target=?",
                      (third.alert_id, A)).fetchone() == ("rejected", "HTTP 403")  # status keeps only why
    db.close()


def test_a_delivery_a_schema_1_worker_writes_after_the_file_was_migrated_stays_delivered(tmp_path):
    """A worker of the old version still running through a rolling restart
    writes rows without a state ("delivered" its whole status). A slow
    attempt that failed must not move one back from delivered, and it reads
    as delivered."""
    import sqlite3

    from streams.store import open_store

    first, _, _ = _three()
    s = open_store(tmp_path)
    s.add_alert(first)
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    db.execute("INSERT INTO deliveries (alert_id, target, status) VALUES (?,?,?)", (first.alert_id, A, "delivered"))
    db.commit()
    db.close()
    assert s.delivery_state(first.alert_id, A) is DeliveryState.DELIVERED
    s.mark_delivered(first.alert_id, A, DeliveryState.FAILED, "HTTP 500 (a slow attempt)")
    assert s.delivery_state(first.alert_id, A) is DeliveryState.DELIVERED
    [shown] = s.delivery_status()[first.alert_id]
    assert (shown.state, shown.status) == (DeliveryState.DELIVERED, "delivered")
    s.close()


def test_elasticsearch_records_from_before_mapping_v4_read_with_their_state(fake_es):
    """A v3 deployment's delivery documents have no ``state``, only the old
    ``status`` text (docs/elasticsearch.md: the mapping gains ``state`` in
    place, the documents are not rewritten). Each reads with the state that
    text gave it, and one still waiting gets its ``state`` when marked."""
    from streams import es_templates as T
    from streams.es_docs import now
    from streams.es_store import EsFindingsStore

    s = EsFindingsStore.from_url(fake_es.url.replace("http://", "es://"),
                                 settings=Settings(findings=FindingsSettings(retry_initial_s=0.001)))
    first, second, third = _three()
    for a in (first, second, third):
        s.add_alert(a)
    old = [(first.alert_id, A, "delivered"), (second.alert_id, A, "failed: HTTP 503 " + "x" * 1100),
           (third.alert_id, A, "rejected: HTTP 403"), (first.alert_id, B, "queued")]
    s.bulk.send([({"index": {"_index": "deepwatch-deliveries", "_id": s._delivery_id(a, t)}},
                  {"alert_id": a, "target": t, "status": status, "at": now()}) for a, t, status in old])
    s.refresh()

    assert [s.delivery_state(a, t) for a, t, _ in old] == [
        DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.REJECTED, DeliveryState.QUEUED]
    assert _ids(s.failed_deliveries(A)) == [second.alert_id]
    assert s.undelivered_counts() == {A: {"failed": 1, "rejected": 1}, B: {"queued": 1}}
    assert s.pending_work()["deliveries"] == 1
    assert s.undelivered_before(A, first.cluster_id, 3) is True and s.undelivered_before(A, first.cluster_id, 2) is False
    assert {(a, d.target): d.status for a, ds in s.delivery_status().items() for d in ds} == {
        (a, t): status for a, t, status in old}

    s.mark_delivered(first.alert_id, A, DeliveryState.FAILED, "a slow attempt, recorded late")
    assert s.requeue_deliveries(A) == 1
    s.refresh()
    assert s.delivered(first.alert_id, A), "delivered stays delivered"
    assert _ids(s.failed_deliveries(A)) == [second.alert_id, third.alert_id]
    doc = fake_es.docs[T.concrete("deepwatch-deliveries")][s._delivery_id(third.alert_id, A)]
    assert (doc["state"], doc["status"]) == ("failed", "queued again by an operator (was rejected: HTTP 403)")
    s.close()


def test_pending_alerts_count_stream_alerts_per_cluster_and_merge(store):
    """A replay waits while ``pending_work()["alerts"]`` is above 0. It was
    the sum of live clusters' levels less the count of every stored alert: a
    merged-away cluster's alerts and the desk's and account alerts made up
    for an alert not stored yet, and the replay stopped without it."""
    from streams.records import Alert
    from tests.test_store import _alert, _snap

    def pending() -> int:
        getattr(store, "refresh", lambda: None)()
        return store.pending_work()["alerts"]

    store.apply_snapshots([_snap("A", 1, alert_level=1), _snap("B", 1, alert_level=1)])
    assert pending() == 2
    store.add_alert(_alert("A", 1))
    store.add_alert(_alert("B", 1))
    assert pending() == 0
    # B merges into A (A keeps level 1); A escalates: A:2 raised, not stored yet
    store.apply_snapshots([_snap("B", 2, merged_into="A", alert_level=1),
                           _snap("A", 3, merged_from=["B"], alert_level=2)])
    assert pending() == 1
    # neither the desk's verdict alert nor an account alert is the stream's A:2
    store.add_alert(_alert("A", 1).model_copy(update={"alert_id": "A:desk-fake", "rule": "desk-verdict-fake",
                                                       "level": 2}))
    store.add_alert(Alert.model_validate({**_alert("x", 1).model_dump(), "alert_id": "account:acct-1:1",
                                          "cluster_id": "account:acct-1", "rule": "account-ai-share"}))
    assert pending() == 1
    store.add_alert(_alert("A", 2))
    assert pending() == 0
    # a cluster that took a higher level over in a merge raised only what came after it
    store.apply_snapshots([_snap("C", 1, alert_level=2), _snap("D", 1)])
    store.add_alert(_alert("C", 1))
    store.add_alert(_alert("C", 2))
    store.apply_snapshots([_snap("C", 2, merged_into="D", alert_level=2),
                           _snap("D", 2, merged_from=["C"], alert_level=3)])
    assert pending() == 1, "D:3 is owed; D:1 and D:2 never existed (C's levels came with the merge)"
    store.add_alert(_alert("D", 3))
    assert pending() == 0
