"""Webhook delivery records, alike in both findings stores: what redelivery
sends, what waits per target, what an operator queues again and what a run
still waits for (``streams.sinks``, ``streams.webhooks``, ``deepwatch
redeliver``)."""

from __future__ import annotations

import time

import pytest

from streams.findings import QUEUED
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
    store.mark_delivered(first.alert_id, A, QUEUED)  # a live sender has it
    store.mark_delivered(second.alert_id, A, "failed: HTTP 503")
    store.mark_delivered(third.alert_id, A, "rejected: HTTP 403")
    store.mark_delivered(first.alert_id, B, "delivered")
    store.mark_delivered(second.alert_id, B, QUEUED)
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
    store.mark_delivered(first.alert_id, B, "failed: HTTP 503")
    getattr(store, "refresh", lambda: None)()
    assert store.delivered(first.alert_id, B)


def test_requeue_of_named_alerts_only(store):
    first, second = _three()[:2]
    for a in (first, second):
        store.add_alert(a)
        store.mark_delivered(a.alert_id, A, "rejected: HTTP 410")
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
    store.mark_delivered(first.alert_id, rejected, "rejected: HTTP 400 (the receiver refused the body)")
    store.mark_delivered(first.alert_id, delivered, "delivered")
    store.mark_delivered(first.alert_id, failed, "failed: HTTP 503")
    sinks = Sinks(settings)
    sinks._store = store

    async def redelivered() -> None:
        sinks._stopped_loop = asyncio.get_running_loop()  # senders closed: what is queued stays queued
        await sinks.alert(first.dumps())

    asyncio.run(redelivered())
    getattr(store, "refresh", lambda: None)()
    assert {d["target"]: d["status"] for d in store.delivery_status([first.alert_id])[first.alert_id]} == {
        rejected: "rejected: HTTP 400 (the receiver refused the body)", delivered: "delivered",
        failed: QUEUED}  # the failed one is still owed: sent again
    assert store.delivery_state(first.alert_id, rejected).startswith("rejected: HTTP 400")
    assert store.delivery_state(first.alert_id, "https://never.example.org") is None
    assert store.undelivered_counts() == {rejected: {"rejected": 1}, failed: {"queued": 1}}


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
