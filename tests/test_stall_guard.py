"""The stall guard's decisions (streams.stall_guard), on the real Faust
consumer object of an app that is built but not started: what Faust read,
committed and paused is set directly, the broker answers (end offsets,
seeks) are recorded. The kill -9 drills run it for real."""

from __future__ import annotations

import asyncio

import faust
import pytest
from faust.types import TP

from streams.stall_guard import StallGuard

EVENTS = TP("events", 0)
OTHER = TP("events", 1)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def world(monkeypatch):
    app = faust.App("stall-guard-test", broker="dwkafka://127.0.0.1:1")
    app.topic("events")
    app.topics._acking_topics.add("events")
    consumer = app.consumer
    state = {"ends": {EVENTS: 10, OTHER: 4}, "earliest": 0, "seeks": [], "recovery": False, "assigned": {EVENTS, OTHER}}

    async def highwaters(*tps):
        return {tp: state["ends"][tp] for tp in tps}

    async def earliest_offsets(*tps):
        return {tp: state["earliest"] for tp in tps}

    async def seek(tp, offset):
        state["seeks"].append((tp, offset))

    monkeypatch.setattr(consumer, "highwaters", highwaters, raising=False)
    monkeypatch.setattr(consumer, "earliest_offsets", earliest_offsets, raising=False)
    monkeypatch.setattr(consumer, "seek", seek, raising=False)
    monkeypatch.setattr(consumer, "assignment", lambda: state["assigned"], raising=False)
    monkeypatch.setattr(type(app), "in_recovery", property(lambda self: state["recovery"]))
    app.flow_control.resume()
    clock = Clock()
    return app, consumer, state, StallGuard(app, stall_s=15.0, clock=clock), clock


def run(coro):
    return asyncio.run(coro)


def test_a_partition_read_nothing_with_records_waiting_is_sought_to_its_start(world):
    app, consumer, state, guard, clock = world
    consumer._committed_offset[EVENTS] = 7  # where the last owner stopped
    consumer._read_offset[OTHER] = 3  # caught up: end 4
    assert run(guard.check()) == []
    clock.t += 16
    assert run(guard.check()) == [(EVENTS, 7)]
    assert state["seeks"] == [(EVENTS, 7)]
    clock.t += 5
    assert run(guard.check()) == []  # the clock starts again after a seek


def test_no_commit_yet_means_the_partitions_first_offset(world):
    app, consumer, state, guard, clock = world
    state["earliest"] = 2
    state["assigned"] = {EVENTS}
    run(guard.check())
    clock.t += 16
    assert run(guard.check()) == [(EVENTS, 2)]


def test_progress_busy_agents_and_recovery_are_left_alone(world):
    app, consumer, state, guard, clock = world
    state["assigned"] = {EVENTS}
    consumer._read_offset[EVENTS] = 4
    run(guard.check())
    clock.t += 10
    consumer._read_offset[EVENTS] = 5  # reading: progress
    run(guard.check())
    clock.t += 10
    assert run(guard.check()) == []  # 10 s since the last progress
    consumer._buffered_partitions.add(EVENTS)  # paused by backpressure: the agent is busy
    clock.t += 30
    assert run(guard.check()) == []
    consumer._buffered_partitions.clear()
    state["recovery"] = True
    clock.t += 30
    assert run(guard.check()) == []
    state["recovery"] = False
    run(guard.check())
    clock.t += 16
    assert run(guard.check()) == [(EVENTS, 6)]  # the one after the last read
    assert state["seeks"] == [(EVENTS, 6)]
