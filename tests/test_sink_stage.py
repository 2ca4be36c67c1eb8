"""The sink agents' acks (``streams.sink_stage``) on a real Faust stream
(the agent's test context: Faust's own ``Stream``, ``noack_take`` and acks)
over real ``Sinks`` and a real SQLite findings store.

A batch is acked once stored and never when a stop cuts its write short:
``take``, which the sinks used before, acked the batch as the agent's loop
ended, so a worker stopped while its sink waited on a locked store committed
offsets it had never stored (``test_sink_shutdown`` is that drill across
real worker processes)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from streams.records import DeadLetter, SourceRef
from streams.settings import Settings
from streams.sink_stage import SinkStage
from streams.sinks import Sinks
from streams.store import open_store
from tests.faust_agents import recording_agent, wait_for
from tests.test_store import TOPIC, _alert, _sighting, _snap


def _dead(i: int) -> bytes:
    return DeadLetter(event_id=f"e{i}", stage="fetch", reason="timeout", detail=f"event {i}").dumps()


def _settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data")
    settings.findings.bulk_flush_s = 0.05
    settings.findings.retry_initial_s = 0.05
    open_store(settings.data_dir).close()  # the file exists, so it can be locked before the first write
    return settings


def _stored(settings: Settings) -> list[str]:
    store = open_store(settings.data_dir)
    try:
        return sorted(d.event_id for d in store.dead_letters())
    finally:
        store.close()


def _put_all(agent, sinks: Sinks, records: list[bytes], acked: list[bytes], n: int) -> None:
    """Put ``records`` through the agent's test context until ``n`` are acked, then close the sinks."""

    async def run() -> None:
        async with agent.test_context() as ctx:
            for raw in records:
                await ctx.put(raw)
            await wait_for(lambda: len(acked) == n)
        await sinks.aclose()

    asyncio.run(run())


def test_a_batch_is_acked_once_stored(tmp_path):
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).dead_letters, acked)
    records = [_dead(i) for i in range(3)]

    _put_all(agent, sinks, records, acked, 3)
    assert sorted(acked) == sorted(records)
    assert _stored(settings) == ["e0", "e1", "e2"]


SNAPSHOTS = [_snap(f"c{i}", 1).dumps() for i in range(3)]
# alerts are taken one at a time (a second would wait for the first in put()); their old
# plain loop acked only finished events: this case guards the rule rather than a past loss
ALERTS = [_alert("c0").dumps()]


@pytest.mark.parametrize("kind, records", [("dead_letters", [_dead(i) for i in range(3)]),
                                           ("snapshots", SNAPSHOTS), ("alerts", ALERTS)])
def test_a_stop_while_the_store_is_locked_acks_nothing(tmp_path, kind, records):
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", getattr(SinkStage(settings, sinks), kind), acked)
    lock = sqlite3.connect(settings.data_dir / "findings.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock

    async def run() -> None:
        try:
            async with agent.test_context() as ctx:
                for raw in records:
                    await ctx.put(raw)
                await asyncio.sleep(1.0)  # taken within bulk_flush_s; the write now waits on the lock
                assert acked == []
            # leaving the context stops the agent in the middle of that write
        finally:
            lock.execute("ROLLBACK")
            await sinks.aclose()

    try:
        asyncio.run(run())
    finally:
        lock.close()
    assert acked == [], "a batch cut short by a stop was acked: its offsets would be committed unstored"


def test_a_batch_that_crashes_the_sink_is_acked_so_the_partition_moves_on(tmp_path, caplog):
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)

    async def crash(raws: list[bytes]) -> None:
        raise RuntimeError("a bug in the sink")

    sinks.dead_letters = crash  # type: ignore[method-assign]
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).dead_letters, acked)

    raw = _dead(0)

    async def run() -> None:
        async with agent.test_context() as ctx:
            await ctx.put(raw)
            await wait_for(lambda: acked == [raw])
        await sinks.aclose()

    asyncio.run(run())
    assert _stored(settings) == []


def _dead_letters(settings: Settings) -> list[tuple]:
    store = open_store(settings.data_dir)
    try:
        return sorted(((d.event_id or "", d.stage, d.reason, d.source.offset if d.source else None)
                       for d in store.dead_letters()), key=str)
    finally:
        store.close()


def test_an_unreadable_snapshot_is_a_dead_letter_and_the_rest_of_its_batch_is_stored(tmp_path):
    """One record that does not read (its revision not a number), one that is
    not JSON, two good ones: it lost the whole batch (the good sightings too)
    and acked it, with no dead letter for any of it. (A field a newer writer
    added within the version reads: ``test_records_forward_compat``.)"""
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).snapshots, acked)
    good = [_snap("c1", 1, sighting=_sighting("e1", "a" * 64, 0)).dumps(),
            _snap("c3", 1, sighting=_sighting("e3", "c" * 64, 3)).dumps()]
    doc = json.loads(_snap("c2", 1, sighting=_sighting("e2", "b" * 64, 1)).dumps())
    doc["revision"] = "not a revision"
    newer, garbage = json.dumps(doc).encode(), b"\x00 not a snapshot"
    records = [good[0], newer, garbage, good[1]]

    _put_all(agent, sinks, records, acked, 4)
    assert sorted(acked) == sorted(records)
    store = open_store(settings.data_dir)
    try:
        assert sorted(store.sighting_times()) == ["e1", "e3"]
        assert [c.id for c in store.clusters()] == ["c1", "c3"]
        # e2's offset is accounted for as dead-lettered, not left unprocessed
        assert store.processed_offsets(TOPIC) == {(0, 0), (0, 1), (0, 3)}
        dead = {d.reason: d for d in store.dead_letters()}
    finally:
        store.close()
    assert sorted(dead) == ["malformed_json", "schema_violation"]
    newer_dl, garbage_dl = dead["schema_violation"], dead["malformed_json"]
    assert (newer_dl.event_id, newer_dl.stage, newer_dl.source.offset) == ("e2", "sink", 1)
    assert "revision" in newer_dl.detail and newer_dl.detail.startswith("unreadable snapshot record")
    assert (garbage_dl.event_id, garbage_dl.stage, garbage_dl.source) == (None, "sink", None)
    assert garbage_dl.payload_excerpt == "\x00 not a snapshot"


def test_an_unreadable_dead_letter_is_one_of_the_sinks_own_and_the_rest_are_stored(tmp_path):
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).dead_letters, acked)
    doc = json.loads(DeadLetter(event_id="e9", stage="fetch", reason="timeout", detail="event 9",
                                source=SourceRef(topic=TOPIC, partition=2, offset=9)).dumps())
    doc["stage"] = "a stage of a newer writer"
    records = [_dead(0), json.dumps(doc).encode(), _dead(1), b"not a dead letter"]

    _put_all(agent, sinks, records, acked, 4)
    assert sorted(acked) == sorted(records)
    assert _dead_letters(settings) == [("", "sink", "malformed_json", None), ("e0", "fetch", "timeout", None),
                                       ("e1", "fetch", "timeout", None), ("e9", "sink", "schema_violation", 9)]


def test_an_unreadable_alert_is_a_dead_letter(tmp_path):
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).alerts, acked)
    doc = json.loads(_alert("c0").dumps())
    doc["level"] = "high"
    records = [json.dumps(doc).encode(), _alert("c1").dumps()]

    _put_all(agent, sinks, records, acked, 2)
    store = open_store(settings.data_dir)
    try:
        assert [a.alert_id for a in store.alerts()] == ["c1:1"]
        [dl] = store.dead_letters()
    finally:
        store.close()
    assert (dl.event_id, dl.stage, dl.reason) == (None, "sink", "schema_violation")
    assert dl.detail.startswith("unreadable alert record (level:") and '"c0:1"' in dl.payload_excerpt


@pytest.mark.parametrize("n", [1, 7])
def test_batches_of_any_size_are_stored_once_and_acked_once(tmp_path, n):
    settings = _settings(tmp_path)
    settings.findings.bulk_max_actions = 3
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).dead_letters, acked)
    records = [_dead(i) for i in range(n)]

    async def run() -> None:
        async with agent.test_context() as ctx:
            for raw in records:
                await ctx.put(raw)
            await wait_for(lambda: len(acked) >= n)
            await asyncio.sleep(0.2)  # nothing acked twice
        await sinks.aclose()

    asyncio.run(run())
    assert sorted(acked) == sorted(records)
    assert _stored(settings) == sorted(f"e{i}" for i in range(n))
