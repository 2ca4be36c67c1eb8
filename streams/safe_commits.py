"""Offset commits that never pass an event that was not processed.

faust-streaming 0.15.3 commits the longest run of acked offsets with three
holes (faust-streaming #606 is the open report of the first):

* it lets the run start one past the committed offset (it reads "committed"
  as the last offset done, where it is the next one to read), and with no
  committed offset yet it does not check the head at all. So while event N
  is still in flight (the analyze agent runs several actors; a slow fetch is
  normal) and N+1.. are done, it commits past N, and a worker killed then
  loses N for good: the next owner starts after it.
* a record a stream drops instead of processing (Faust skips records fetched
  around an assignment: faust-streaming #216/#221) is committed over by the
  same rule, and is never read again. Measured here: the first record of a
  partition, fetched as a restarted worker joined, lost this way in about
  1 run in 20 of the kill -9 drill, and in CI. Worse, the stream *acks* the
  record it skips (its generation check ``break``s to the ``finally`` that
  acks the event), so it even counted as done, with nothing logged: the one
  path that explains offset 0 of tests/test_tansu_visibility.py lost in 2 of
  3 full-suite runs with an empty worker log. ``ack`` here counts only
  records a stream took (``message.tracked``).
* its gap bookkeeping (offsets that never arrive) also marks the record that
  ends the gap as done before anything processed it.

``SafeCommits`` keeps Faust's bookkeeping and changes the rule: the commit
advances only over offsets that were acked or that the reader saw were
absent, never to or past the lowest offset a stream has taken and not acked.
When the offset at the commit point is neither acked nor in flight while
later ones are, its record was dropped: the partition is read again from
there (``seek``), and stages being idempotent, re-reading the records after
it costs little. Faust's read positions (``ReadPositions``) keep such a
rewind until the record comes round: the records fetched before the seek,
still being handed on, moved the position past it again and the re-read
record was dropped once more. An offset still missing after ``REREAD_TRIES`` re-reads
holds no record (compacted away, a transaction marker) and is passed over.

Used by both transports deepwatch hands Faust: ``dwkafka://`` (any Kafka,
``Transport`` here; ``streams.broker.SAFE_KAFKA``) and ``tansu://``
(``streams.tansu_compat``), both registered through the ``faust.transports``
entry point.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, Optional

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.utils.functional import consecutive_numbers

from streams import metrics

log = logging.getLogger(__name__)

REREAD_TRIES = 3
REREAD_AFTER_S = 5.0  # time for a re-read record to come round before asking again


def _unset() -> Optional[int]:
    return None


class ReadPositions(defaultdict):
    """Faust's ``Consumer._read_offset``, with rewinds that hold.

    Faust's drain loop drops a fetched record below its partition's position
    (already handed on) and moves the position to each record it hands on.
    After a seek back, the records fetched before the seek are still being
    handed on and moved the position past the rewound offset again, so the
    re-read record was dropped as seen (measured: in 14 runs of
    tests/test_tansu_visibility.py, 1 of 5 re-reads failed so and waited for
    the next). While
    a rewind is pending the position stays unset (nothing is dropped; stages
    are idempotent) and moves are ignored until the rewound offset itself is
    handed on. A rewind whose offset holds no record is ended by ``settle``.
    """

    def __init__(self) -> None:
        super().__init__(_unset)
        self._rewinds: dict[TP, int] = {}

    def rewind(self, tp: TP, offset: int) -> None:
        self._rewinds[tp] = offset
        super().__setitem__(tp, None)

    def settle(self, tp: TP) -> None:
        self._rewinds.pop(tp, None)

    def __setitem__(self, tp: TP, offset: Optional[int]) -> None:
        pending = self._rewinds.get(tp)
        if pending is not None:
            if offset != pending:
                return
            del self._rewinds[tp]
        super().__setitem__(tp, offset)

    def __delitem__(self, tp: TP) -> None:
        self._rewinds.pop(tp, None)
        super().__delitem__(tp)

    def pop(self, tp: TP, *default: Any) -> Any:  # partitions revoked
        self._rewinds.pop(tp, None)
        return super().pop(tp, *default)


class SafeCommits:
    """Mixin for a Faust ``Consumer``: see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = ReadPositions()
        self._rereads: dict[tuple[TP, int], tuple[int, float]] = {}  # (tp, offset) -> (re-reads asked, when last)
        self._learning: set[TP] = set()  # partitions whose first offset is being looked up

    def ack(self, message: Any) -> bool:
        # A consumer message no stream took was skipped, not processed (see the
        # module docstring): left out of the acked offsets, it is read again.
        if not message.tracked:
            return False
        return super().ack(message)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Faust passes the record that ended the gap as ``offset_to``: that
        # record exists and is about to be processed, so it is no gap.
        await super()._add_gap(tp, offset_from, offset_to - 1)

    def _in_flight_floor(self, tp: TP) -> Optional[int]:
        offsets = [m.offset for m in list(self._unacked_messages) if m.tp == tp and not m.acked]
        return min(offsets, default=None)

    def _new_offset(self, tp: TP) -> Optional[int]:
        acked = self._acked[tp]
        if not acked:
            return None
        floor = self._in_flight_floor(tp)
        limit = floor if floor is not None else max(acked) + 1
        gaps = self._gap[tp]
        if gaps:
            for iv in gaps.overlap(0, limit):
                acked.extend(range(iv.begin, min(iv.end, limit)))
            gaps.chop(0, limit)
        acked[:] = sorted(set(acked))  # in place: Consumer.ack appends to this very list
        committed = self._committed_offset[tp]
        if committed is None:
            self._learn_start(tp)  # commit once we know where the partition starts
            return None
        if acked[0] > committed:
            if floor is None or floor > committed:
                if self._reread(tp, committed):
                    acked.insert(0, committed)  # re-read enough: no record there
                    return self._new_offset(tp)
            return None
        batch = [o for o in next(consecutive_numbers(acked)) if floor is None or o < floor]
        if not batch:
            return None
        del acked[: len(batch)]
        self._acked_index[tp].difference_update(batch)
        return batch[-1] + 1

    def _reread(self, tp: TP, offset: int) -> bool:
        """Ask for the partition to be read again from ``offset``; True once it
        has been re-read ``REREAD_TRIES`` times and the offset still never
        came (then there is no record at it)."""
        state = self._rereads
        tries, last = state.get((tp, offset), (0, 0.0))
        now = time.monotonic()
        if tries and now - last < REREAD_AFTER_S:
            return False
        if tries >= REREAD_TRIES:
            log.warning("offset never arrived after re-reads; passing over it",
                        extra={"topic": tp.topic, "partition": tp.partition, "offset": offset, "tries": tries})
            del state[(tp, offset)]
            self._read_offset.settle(tp)
            return True
        state[(tp, offset)] = (tries + 1, now)
        log.warning("record dropped before processing; reading the partition again from it",
                    extra={"topic": tp.topic, "partition": tp.partition, "offset": offset, "try": tries + 1})
        self._spawn(self._read_again(tp, offset))
        metrics.OFFSET_REREADS.labels(tp.topic, "dropped").inc()
        return False

    async def _read_again(self, tp: TP, offset: int) -> None:
        self._read_offset.rewind(tp, offset)
        await self._seek(tp, offset)

    def _learn_start(self, tp: TP) -> None:
        """No committed offset yet (a new group): the partition's first offset
        is the commit point. Looked up once, off the commit path."""
        if tp in self._learning:
            return
        self._learning.add(tp)

        async def learn() -> None:
            try:
                start = (await self.earliest_offsets(tp)).get(tp)
                if start is not None and self._committed_offset[tp] is None:
                    self._committed_offset[tp] = start
            finally:
                self._learning.discard(tp)

        self._spawn(learn())

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop (tests calling the rule directly)
            coro.close()
            return
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("offset bookkeeping task failed", exc_info=task.exception())


class Consumer(SafeCommits, faust_aiokafka.Consumer):
    pass


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    driver_version = faust_aiokafka.Transport.driver_version + "+safe-commits"


__all__ = ["SafeCommits", "ReadPositions", "Consumer", "Transport", "REREAD_TRIES"]
