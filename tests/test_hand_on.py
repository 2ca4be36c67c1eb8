"""The analyze agent acks an event only once its outcome has left the worker
(``streams.stage.hand_on``): a cluster op sent, a duplicate accounted, or a dead
letter sent. The agent itself runs on the real broker in the pipeline tests;
here the broker's refusals are what is driven."""

from __future__ import annotations

import asyncio

from streams.records import DeadLetter, SourceRef
from streams.stage import DEAD_LETTER_TRIES, Result, hand_on

SOURCE = SourceRef(topic="deepwatch.events", partition=1, offset=42)


class Topic:
    """A topic whose first ``refuse`` sends raise, as aiokafka does when the broker refuses."""

    def __init__(self, refuse: int = 0):
        self.refuse = refuse
        self.sent: list = []

    async def send(self, key=None, value=None):
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("broker refused")
        self.sent.append((key, value))


def run(result: Result, ops: Topic, dead: Topic, duplicates: list | None = None) -> bool:
    async def send_dead(dl: DeadLetter) -> None:
        await dead.send(value=dl)

    def mark_duplicate(source: SourceRef, event_id: str | None) -> None:
        assert duplicates is not None, "no duplicate expected"
        duplicates.append((source.offset, event_id))

    return asyncio.run(hand_on(result, SOURCE, ops, send_dead, mark_duplicate))


def test_an_op_sent_is_handed_on():
    ops, dead = Topic(), Topic()
    assert run(Result(op=b"op", event_id="e1"), ops, dead)
    assert ops.sent == [(b"ops", b"op")] and dead.sent == []


def test_a_duplicate_is_handed_on_once_accounted():
    duplicates: list = []
    assert run(Result(duplicate=True, event_id="e1"), Topic(), Topic(), duplicates)
    assert duplicates == [(42, "e1")]


def test_an_op_the_broker_refuses_becomes_one_dead_letter():
    ops, dead = Topic(refuse=1), Topic()
    assert run(Result(op=b"op", event_id="e1"), ops, dead)
    assert ops.sent == []
    [(_, dl)] = dead.sent
    assert (dl.stage, dl.reason, dl.event_id, dl.source) == ("cluster", "send_failed", "e1", SOURCE)
    assert "ConnectionError" in dl.detail


def test_a_dead_letter_refused_once_is_sent_again():
    dl = DeadLetter(event_id="e1", stage="fetch", reason="timeout", detail="slow host", source=SOURCE)
    dead = Topic(refuse=1)
    assert run(Result(dead=dl, event_id="e1"), Topic(), dead)
    assert [d for _, d in dead.sent] == [dl]


def test_an_event_whose_dead_letter_never_leaves_is_not_acked():
    # It was acked (and so committed over): the event was lost with only a log line.
    dl = DeadLetter(event_id="e1", stage="fetch", reason="timeout", detail="slow host", source=SOURCE)
    dead = Topic(refuse=DEAD_LETTER_TRIES)
    assert not run(Result(dead=dl, event_id="e1"), Topic(), dead)
    assert dead.sent == [] and dead.refuse == 0
