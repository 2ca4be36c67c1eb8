"""Offset commits never pass an event still in flight (streams.safe_commits).

Exercised on the real Faust consumer objects (no broker needed: commits are
computed, not sent). The kill -9 drills (test_kill_drill, test_worker_restart)
are where this loses events end to end when it is wrong.
"""

from __future__ import annotations

import asyncio

import faust
import pytest
from faust.types import TP
from faust.types.tuples import Message
from hypothesis import given, settings, strategies as st

from streams.safe_commits import SafeCommits

TOPIC = "events"
TP0 = TP(TOPIC, 0)


@pytest.fixture(scope="module")
def consumer():
    async def build():
        app = faust.App("safe-commits-test", broker="dwkafka://127.0.0.1:1")
        topic = app.topic(TOPIC)

        @app.agent(topic, concurrency=4)
        async def analyze(stream):  # pragma: no cover - never started
            async for _ in stream:
                pass

        app.topics._acking_topics.add(TOPIC)  # what subscribing the agent does at start
        return app.consumer

    return asyncio.run(build())


def reset(c, committed):
    for d in (c._acked, c._acked_index, c._committed_offset, c._gap):
        d.clear()
    c._unacked_messages.clear()
    if committed is not None:
        c._committed_offset[TP0] = committed


def taken(c, offsets):
    msgs = {o: Message(TOPIC, 0, o, 0.0, None, None, b"k", b"v", None) for o in offsets}
    for m in msgs.values():
        c.track_message(m)  # what the stream does when an actor takes the message
    return msgs


def test_the_transports_deepwatch_uses_commit_safely(consumer):
    from faust.transport import by_url

    assert isinstance(consumer, SafeCommits)
    assert issubclass(by_url("tansu://127.0.0.1:1").Consumer, SafeCommits)


@pytest.mark.parametrize("committed", [None, 0, 10])
def test_a_slow_head_holds_the_commit_back(consumer, committed):
    start = committed or 0
    reset(consumer, committed)
    msgs = taken(consumer, range(start, start + 4))
    for o in range(start + 1, start + 4):  # the first is still being fetched
        assert consumer.ack(msgs[o])
    assert consumer._new_offset(TP0) is None  # stock Faust 0.15.3 commits start + 4 here
    consumer.ack(msgs[start])
    assert consumer._new_offset(TP0) == start + 4


def test_commits_up_to_the_first_in_flight_and_keeps_the_rest(consumer):
    reset(consumer, 10)
    msgs = taken(consumer, range(10, 16))
    for o in (10, 11, 13, 14, 15):
        consumer.ack(msgs[o])
    assert consumer._new_offset(TP0) == 12
    consumer._committed_offset[TP0] = 12
    assert consumer._new_offset(TP0) is None
    consumer.ack(msgs[12])
    assert consumer._new_offset(TP0) == 16


def test_a_gap_does_not_cover_the_message_after_it(consumer):
    # Faust records a gap [r+1, offset] that includes the message that arrives
    # after it; while that message is in flight the gap must not commit it.
    reset(consumer, 10)
    msgs = taken(consumer, [10, 15, 16])
    consumer._gap[TP0].addi(11, 16)
    consumer.ack(msgs[10])
    consumer.ack(msgs[16])
    assert consumer._new_offset(TP0) == 15  # 10 done, 11..14 never existed, 15 in flight
    consumer._committed_offset[TP0] = 15
    consumer.ack(msgs[15])
    assert consumer._new_offset(TP0) == 17


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_never_past_in_flight_and_everything_once_all_are_done(consumer, n, data):
    committed = data.draw(st.sampled_from([None, 0, 5]))
    start = committed or 0
    reset(consumer, committed)
    msgs = taken(consumer, range(start, start + n))
    order = data.draw(st.permutations(list(msgs)))
    for i, o in enumerate(order):
        consumer.ack(msgs[o])
        new = consumer._new_offset(TP0)
        pending = order[i + 1:]
        if new is not None:
            assert not pending or new <= min(pending)
            consumer._committed_offset[TP0] = new
    assert consumer._committed_offset[TP0] == start + n
