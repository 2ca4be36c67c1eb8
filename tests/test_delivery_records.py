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
