"""Offset commits that never pass an event still being processed.

faust-streaming 0.15.3 commits the longest run of acked offsets, with two
holes (faust-streaming #606, open): with no committed offset yet it does not
check the head of the run at all, and with one it lets the run start one
past it. So while event N is still in flight (the analyze agent runs several
actors, and a slow fetch is normal) and N+1..N+3 are done, Faust commits
N+4. A worker killed then loses N for good: the next owner starts after it.
Measured in CI: two events missing after the kill -9 drills. Its gap
bookkeeping (offsets that never arrive, e.g. compacted away) also marks the
first message *after* a gap as done before it is processed.

``SafeCommits._new_offset`` keeps Faust's rules and adds one: nothing at or
past the lowest offset a stream has taken but not acked is committed. Every
message an actor takes is tracked by Faust before the agent sees it, and a
partition's messages are taken in offset order, so "taken, not acked" is the
complete set of what a commit could skip.

Used by both transports deepwatch hands Faust: ``dwkafka://`` (any Kafka,
``Transport`` here; ``streams.broker.SAFE_KAFKA``) and ``tansu://`` (``streams.tansu_compat``), both
registered through the ``faust.transports`` entry point.
"""

from __future__ import annotations

from typing import Optional

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.utils.functional import consecutive_numbers

class SafeCommits:
    """Mixin for a Faust ``Consumer``: see the module docstring."""

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
            # Offsets that never arrived count as done, but only below the
            # in-flight floor (Faust's gaps can include the next real message).
            for iv in gaps.overlap(0, limit):
                acked.extend(range(iv.begin, min(iv.end, limit)))
            gaps.chop(0, limit)
        # in place: Consumer.ack appends to this very list
        acked[:] = sorted(set(acked))
        committed = self._committed_offset[tp]
        if committed is not None and acked[0] > committed + 1:
            return None  # the head has not been acked yet
        batch = [o for o in next(consecutive_numbers(acked)) if floor is None or o < floor]
        if not batch:
            return None
        del acked[: len(batch)]
        self._acked_index[tp].difference_update(batch)
        return batch[-1] + 1


class Consumer(SafeCommits, faust_aiokafka.Consumer):
    pass


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    driver_version = faust_aiokafka.Transport.driver_version + "+safe-commits"


__all__ = ["SafeCommits", "Consumer", "Transport"]
