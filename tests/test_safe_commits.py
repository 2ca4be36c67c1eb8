"""Offset commits never pass an event that was not processed
(streams.safe_commits).

Exercised on the real Faust consumer objects; the broker calls a commit
decision can trigger (seek, earliest offsets) are recorded instead of sent.
The kill -9 drills (test_kill_drill, test_worker_restart) are where this
loses events end to end when it is wrong.
"""

from __future__ import annotations

import asyncio

import faust
import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage, Message
from hypothesis import given, settings, strategies as st

from streams import safe_commits
from streams.safe_commits import SafeCommits

TOPIC = "events"
TP0 = TP(TOPIC, 0)


class Broker:
    """What the consumer asked of the broker."""

    def __init__(self, start: int = 0):
        self.start = start
        self.seeks: list[tuple[TP, int]] = []

    async def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    async def earliest_offsets(self, *tps):
        return {tp: self.start for tp in tps}


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


@pytest.fixture
def broker(consumer, monkeypatch):
    b = Broker()
    monkeypatch.setattr(consumer, "_seek", b.seek, raising=False)
    monkeypatch.setattr(consumer, "earliest_offsets", b.earliest_offsets, raising=False)
    return b


def reset(c, committed):
    for d in (c._acked, c._acked_index, c._committed_offset, c._gap, c._rereads, c._learning, c._read_offset):
        d.clear()
    getattr(c._read_offset, "_rewinds", {}).clear()
    c._unacked_messages.clear()
    if committed is not None:
        c._committed_offset[TP0] = committed


def taken(c, offsets):
    msgs = {o: Message(TOPIC, 0, o, 0.0, None, None, b"k", b"v", None) for o in offsets}
    for m in msgs.values():
        c.track_message(m)  # what the stream does when an actor takes the message
    return msgs


def done(c, offsets):
    """Messages taken and processed (acked), as a stream finishes them."""
    for m in taken(c, offsets).values():
        c.ack(m)


async def commit_point(c):
    """One commit decision, then let what it scheduled run; the new
    committed offset (as Faust records it after committing) or None."""
    new = c._new_offset(TP0)
    for _ in range(3):
        await asyncio.sleep(0)
    if new is not None:
        c._committed_offset[TP0] = new
    return new


def test_the_transports_deepwatch_uses_commit_safely(consumer):
    from faust.transport import by_url

    assert isinstance(consumer, SafeCommits)
    assert issubclass(by_url("tansu://127.0.0.1:1").Consumer, SafeCommits)


@pytest.mark.parametrize("committed", [0, 10])
def test_a_slow_head_holds_the_commit_back(consumer, broker, committed):
    async def scenario():
        reset(consumer, committed)
        msgs = taken(consumer, range(committed, committed + 4))
        for o in range(committed + 1, committed + 4):  # the first is still being fetched
            assert consumer.ack(msgs[o])
        assert await commit_point(consumer) is None  # stock Faust 0.15.3 commits committed + 4 here
        assert broker.seeks == []  # in flight, not dropped: nothing to re-read
        consumer.ack(msgs[committed])
        assert await commit_point(consumer) == committed + 4

    asyncio.run(scenario())


def test_a_new_group_commits_from_the_partitions_first_offset(consumer, broker):
    async def scenario():
        broker.start = 3  # older records deleted by retention
        reset(consumer, None)
        msgs = taken(consumer, range(3, 7))
        for o in (4, 5, 6):
            consumer.ack(msgs[o])
        assert await commit_point(consumer) is None  # first learns where the partition starts
        assert consumer._committed_offset[TP0] == 3
        assert await commit_point(consumer) is None  # 3 is still in flight
        consumer.ack(msgs[3])
        assert await commit_point(consumer) == 7

    asyncio.run(scenario())


def test_commits_up_to_the_first_in_flight_and_keeps_the_rest(consumer, broker):
    async def scenario():
        reset(consumer, 10)
        msgs = taken(consumer, range(10, 16))
        for o in (10, 11, 13, 14, 15):
            consumer.ack(msgs[o])
        assert await commit_point(consumer) == 12
        assert await commit_point(consumer) is None
        consumer.ack(msgs[12])
        assert await commit_point(consumer) == 16

    asyncio.run(scenario())


def test_a_dropped_record_is_read_again_not_committed_over(consumer, broker):
    # Faust's stream skipped offset 11 (never taken, never acked) and went on:
    # the commit stops at it and the partition is read again from there.
    async def scenario():
        reset(consumer, 10)
        done(consumer, [10, 12, 13])
        assert await commit_point(consumer) == 11
        assert await commit_point(consumer) is None
        assert broker.seeks == [(TP0, 11)]
        assert await commit_point(consumer) is None
        assert broker.seeks == [(TP0, 11)]  # asked once, then given time to come round
        done(consumer, [11, 12, 13])  # the re-read
        assert await commit_point(consumer) == 14

    asyncio.run(scenario())


def test_a_reread_record_is_not_dropped_by_records_fetched_before_the_seek(consumer, broker):
    # Faust's drain loop drops a record below the partition's read position
    # and moves the position to each record it hands on. Records 12-14 were
    # fetched before the seek back to 11 and are handed on after it: the
    # position must still let 11 (and what follows it) through.
    async def scenario():
        reset(consumer, 10)
        positions = consumer._read_offset
        positions[TP0] = 13  # Faust's drain loop handed on 10, 12, 13
        done(consumer, [10, 12, 13])
        assert await commit_point(consumer) == 11
        assert await commit_point(consumer) is None  # asks for 11 again
        assert broker.seeks == [(TP0, 11)]
        for old in (14, 15):
            positions[TP0] = old  # fetched before the seek, handed on after it
        assert positions[TP0] is None or positions[TP0] <= 11  # stock Faust: 15, and 11 is dropped again
        positions[TP0] = 11  # the re-read record itself
        positions[TP0] = 12
        assert positions[TP0] == 12  # the rewind is over: moves count again

    asyncio.run(scenario())


def test_a_record_the_stream_skipped_and_acked_is_read_again_not_counted_done(consumer, broker):
    # Faust's stream skips a record fetched around an assignment (its
    # generation changed) and still acks it on the way out: that offset
    # counted as done and the commit passed it, with nothing logged.
    async def scenario():
        reset(consumer, 0)
        skipped = ConsumerMessage(TOPIC, 0, 0, 0.0, None, None, b"k", b"v", None)  # never taken by a stream
        assert not skipped.tracked
        assert consumer.ack(skipped) is False
        done(consumer, [1, 2])
        assert await commit_point(consumer) is None
        assert broker.seeks == [(TP0, 0)]  # read again from it
        again = ConsumerMessage(TOPIC, 0, 0, 0.0, None, None, b"k", b"v", None)
        again.tracked = True  # what the stream does when it takes the message
        consumer.track_message(again)
        assert consumer.ack(again) is True
        assert await commit_point(consumer) == 3

    asyncio.run(scenario())


def test_an_offset_without_a_record_is_passed_over_after_rereads(consumer, broker, monkeypatch):
    monkeypatch.setattr(safe_commits, "REREAD_AFTER_S", 0.0)

    async def scenario():
        reset(consumer, 20)
        done(consumer, [21, 22])  # 20 is a transaction marker / compacted away
        for _ in range(safe_commits.REREAD_TRIES):
            assert await commit_point(consumer) is None
        assert broker.seeks == [(TP0, 20)] * safe_commits.REREAD_TRIES
        assert await commit_point(consumer) == 23
        consumer._read_offset[TP0] = 23
        assert consumer._read_offset[TP0] == 23  # the rewind ended with the pass-over

    asyncio.run(scenario())


def test_a_gap_does_not_cover_the_record_that_ends_it(consumer, broker):
    # The reader saw 10 then 15: 11..14 hold no records, 15 does and is not
    # done until it is acked (Faust's own bookkeeping counted it as a gap).
    async def scenario():
        reset(consumer, 10)
        msgs = taken(consumer, [10, 15, 16])
        await consumer._add_gap(TP0, 11, 15)
        consumer.ack(msgs[10])
        consumer.ack(msgs[16])
        assert await commit_point(consumer) == 15
        consumer.ack(msgs[15])
        assert await commit_point(consumer) == 17
        assert broker.seeks == []

    asyncio.run(scenario())


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_never_past_an_unprocessed_record_and_everything_once_all_are_done(consumer, n, data):
    committed = data.draw(st.sampled_from([None, 0, 5]))
    start = committed or 0
    order = data.draw(st.permutations(list(range(start, start + n))))
    b = Broker(start)
    consumer._seek, consumer.earliest_offsets = b.seek, b.earliest_offsets

    async def scenario():
        reset(consumer, committed)
        msgs = taken(consumer, range(start, start + n))
        for i, o in enumerate(order):
            consumer.ack(msgs[o])
            new = await commit_point(consumer)
            pending = order[i + 1:]
            if new is not None:
                assert not pending or new <= min(pending)
        await commit_point(consumer)
        assert consumer._committed_offset[TP0] == start + n
        assert b.seeks == []  # nothing was dropped, so nothing is re-read

    try:
        asyncio.run(scenario())
    finally:
        del consumer._seek, consumer.earliest_offsets


def test_on_the_embedded_broker_a_skipped_offset_is_read_again_not_booked_as_a_gap(monkeypatch):
    """Tansu makes a record visible after later ones when several producers
    write a partition (streams.tansu_compat (e)): the reader saw 10 then 12,
    but 11 exists. Not booked as a gap: the commit stops at 11 and the
    partition is read again from it."""

    async def scenario():
        app = faust.App("safe-commits-tansu-test", broker="tansu://127.0.0.1:1")
        topic = app.topic(TOPIC)

        @app.agent(topic)
        async def analyze(stream):  # pragma: no cover - never started
            async for _ in stream:
                pass

        app.topics._acking_topics.add(TOPIC)
        c = app.consumer
        b = Broker()
        monkeypatch.setattr(c, "_seek", b.seek, raising=False)
        reset(c, 10)
        msgs = taken(c, [10, 12])
        await c._add_gap(TP0, 11, 12)  # what Faust's reader does on seeing 12 after 10
        for m in msgs.values():
            c.ack(m)
        assert await commit_point(c) == 11
        assert await commit_point(c) is None and b.seeks == [(TP0, 11)]
        done(c, [11, 12])  # the re-read finds it
        assert await commit_point(c) == 13

    asyncio.run(scenario())
