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
import sqlite3
from pathlib import Path

import pytest

from streams.records import DeadLetter
from streams.settings import Settings
from streams.sink_stage import SinkStage
from streams.sinks import Sinks
from streams.store import open_store
from tests.faust_agents import recording_agent, wait_for
from tests.test_store import _alert, _snap


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


def test_a_batch_is_acked_once_stored(tmp_path):
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).dead_letters, acked)
    records = [_dead(i) for i in range(3)]

    async def run() -> None:
        async with agent.test_context() as ctx:
            for raw in records:
                await ctx.put(raw)
            await wait_for(lambda: len(acked) == 3)
        await sinks.aclose()

    asyncio.run(run())
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


def test_a_record_that_crashes_the_sink_is_acked_so_the_partition_moves_on(tmp_path, caplog):
    settings = _settings(tmp_path)
    acked: list[bytes] = []
    sinks = Sinks(settings)
    agent = recording_agent("sink-stage-test", SinkStage(settings, sinks).dead_letters, acked)

    async def run() -> None:
        async with agent.test_context() as ctx:
            await ctx.put(b"not a dead letter")
            await wait_for(lambda: acked == [b"not a dead letter"])
        await sinks.aclose()

    asyncio.run(run())
    assert _stored(settings) == []


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
