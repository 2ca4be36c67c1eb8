"""The findings sinks on a store that cannot write (a locked or read-only
SQLite file): the batch is held, logged and gauged until the store takes it,
never raised into the Faust agent (which acks what it had taken when it
crashes). And the virality windows' engagement stays within what every
consumer reads exactly."""

from __future__ import annotations

import asyncio
import time
import logging
import sqlite3

import pytest

from streams import metrics, virality
from streams.records import MAX_COUNT
from streams.settings import FindingsSettings, Settings
from streams.sinks import Sinks
from tests.test_store import _alert, _sighting, _snap


def _sinks(tmp_path, **kwargs) -> Sinks:
    settings = Settings(data_dir=tmp_path, findings=FindingsSettings(retry_initial_s=0.02, retry_max_s=0.05))
    settings.alerts.console = False
    return Sinks(settings, **kwargs)


def _read_only(store, on: bool) -> None:
    """The store's own connection refuses writes ("attempt to write a readonly
    database"), as a findings file mounted read-only does."""
    with store._lock:
        store._db.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")


async def _held(task: asyncio.Task, for_s: float = 0.3) -> tuple[bool, float]:
    """After ``for_s``, and once the gauge says the sink is behind (from its
    first refusal, which may take a while under load; 10 s at most): whether
    the batch is still held, and the gauge."""
    await asyncio.sleep(for_s)
    deadline = time.monotonic() + 10
    behind = metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value
    while not behind and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        behind = metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value
    if task.done():
        task.result()  # the old code raised the store's error into the agent here
    return not task.done(), behind


def test_a_locked_findings_file_holds_the_snapshot_batch_until_it_is_stored(tmp_path, caplog):
    """Another process holds the file's write lock past the busy timeout. The
    sink raised "database is locked" into its agent (the batch acked and lost
    on the agent's restart); now it waits, says so, and stores the batch
    once the lock is gone."""
    sinks = _sinks(tmp_path)
    store = sinks.store
    store._db.execute("PRAGMA busy_timeout=20")  # the real 30 s, shortened for the test
    raws = [_snap("c1", 1, sighting=_sighting("e1", "a" * 64, 0)).dumps(),
            _snap("c1", 2, sighting=_sighting("e2", "a" * 64, 1)).dumps(),
            _snap("c2", 1, sighting=_sighting("e3", "b" * 64, 2)).dumps()]
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def scenario():
        task = asyncio.create_task(sinks.snapshots(raws))
        held, behind = await _held(task)
        assert held and behind > 0, "the batch must be held, and the gauge must say the sink is behind"
        assert store.clusters() == []
        other.execute("ROLLBACK")
        await asyncio.wait_for(task, 10)

    with caplog.at_level(logging.ERROR, logger="deepwatch.alerts"):
        asyncio.run(scenario())
    other.close()
    assert metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value == 0
    assert {c.id: c.revision for c in store.clusters()} == {"c1": 2, "c2": 1}
    assert sorted(store.sighting_times()) == ["e1", "e2", "e3"]
    failed = [r.getMessage() for r in caplog.records if "findings store write failed" in r.getMessage()]
    assert failed and "database is locked" in failed[0] and "snapshots, 3 items" in failed[0]
    # redelivered after all (at-least-once): nothing changes
    asyncio.run(sinks.snapshots(raws))
    assert {c.id: c.revision for c in store.clusters()} == {"c1": 2, "c2": 1}
    store.close()


def test_a_read_only_findings_store_holds_alerts_and_dead_letters_until_it_can_write(tmp_path):
    from streams.records import DeadLetter

    sinks = _sinks(tmp_path)
    store = sinks.store
    alert = _alert("c1")
    dl = DeadLetter(event_id="e9", stage="validate", reason="bad_json", detail="not JSON")
    _read_only(store, True)

    async def scenario():
        tasks = [asyncio.create_task(sinks.alert(alert.dumps())),
                 asyncio.create_task(sinks.dead_letters([dl.dumps()]))]
        for task in tasks:
            held, behind = await _held(task, 0.15)
            assert held and behind > 0
        _read_only(store, False)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(scenario())
    assert [a.alert_id for a in store.alerts()] == ["c1:1"]
    assert [d.event_id for d in store.dead_letters()] == ["e9"]
    assert metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value == 0
    store.close()


def test_a_bounded_sink_gives_up_with_the_stores_error(tmp_path):
    """A caller that answers someone (the desk) bounds the wait."""
    sinks = _sinks(tmp_path, retry_for_s=0.1)
    store = sinks.store
    _read_only(store, True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        asyncio.run(asyncio.wait_for(sinks.alert(_alert("c1").dumps()), 10))
    assert metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value == 0
    _read_only(store, False)
    assert store.alerts() == []
    store.close()


def test_engagement_in_the_window_saturates_at_the_largest_exact_count():
    """Each post may claim up to MAX_COUNT likes, reposts and replies; their
    sum over the last hour passed 2**53, which JSON consumers read inexactly
    (the bound events are held to for that reason)."""
    recent: list[virality.RecentSighting] = []
    for i in range(4):
        r = virality.RecentSighting(t=float(i), e=f"e{i}", a=f"a{i}", p="x", g=3 * MAX_COUNT)
        recent = virality.add(recent, r, float(i))
    v = virality.velocity(recent, 3.0)
    assert (v.sightings_1h, v.accounts_1h, v.engagement_1h) == (4, 4, MAX_COUNT)
    small = virality.add([], virality.RecentSighting(t=0.0, e="e", a="a", p="x", g=12), 0.0)
    assert virality.velocity(small, 0.0).engagement_1h == 12


def test_a_store_error_that_would_come_back_is_raised_not_held(tmp_path):
    """Judged as the duplicate lookup and the cluster stage judge theirs
    (``streams.store_errors.may_pass``): a missing table (SQLITE_ERROR)
    comes back on every try, so holding the batch would stop the sink for good."""
    sinks = _sinks(tmp_path)
    store = sinks.store
    with store._lock:
        store._db.execute("DROP TABLE alerts")
    with pytest.raises(sqlite3.OperationalError, match="no such table") as raised:
        asyncio.run(asyncio.wait_for(sinks.alert(_alert("c1").dumps()), 10))
    assert raised.value.sqlite_errorname == "SQLITE_ERROR"
    assert metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value == 0
    store.close()
