"""Partitions that stop being read while records wait on them get read again.

A worker that joins a group while a killed worker's session is still open
sometimes ends its first assignment with every stream partition assigned,
flow resumed, the fetcher running, and nothing ever read (measured: about
1 restart in 20 of the kill -9 drill on the embedded broker; Faust's and
aiokafka's state both say "fetching"). Nothing inside Faust notices: the
worker idles with records waiting until the next rebalance, which may never
come.

``StallGuard.check`` runs on a timer. For each stream partition this worker
owns, it remembers the last offset Faust read and when that changed; when
it has not changed for ``stall_s`` while the partition's end offset says
records are waiting, it seeks the partition to the next offset to read (the
one after the last read, else the committed offset, else the partition's
first), which restarts fetching from exactly there: nothing is skipped and
nothing read twice. Partitions paused by backpressure (a busy agent) are
left alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from streams import metrics

log = logging.getLogger(__name__)


class StallGuard:
    def __init__(self, app: Any, stall_s: float = 15.0, clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.stall_s = stall_s
        self.clock = clock
        self._seen: dict[Any, tuple[int | None, float]] = {}

    async def check(self) -> list[tuple[Any, int]]:
        """One pass; returns the (partition, offset) pairs it sought."""
        app = self.app
        if app.in_recovery or not app.flow_control.is_active():
            self._seen.clear()  # a rebalance or recovery: start the clocks again after it
            return []
        consumer = app.consumer
        acking = app.topics._acking_topics
        now = self.clock()
        due = []
        for tp in consumer.assignment():
            if tp.topic not in acking or tp in consumer._buffered_partitions:
                self._seen.pop(tp, None)
                continue
            read = consumer._read_offset.get(tp)
            seen = self._seen.get(tp)
            if seen is None or seen[0] != read:
                self._seen[tp] = (read, now)
            elif now - seen[1] >= self.stall_s:
                due.append((tp, read))
        sought = []
        if due:
            ends = await consumer.highwaters(*[tp for tp, _ in due])
            for tp, read in due:
                nxt = read + 1 if read is not None else consumer._committed_offset.get(tp)
                if nxt is None:
                    nxt = (await consumer.earliest_offsets(tp)).get(tp, 0)
                end = ends.get(tp)
                self._seen[tp] = (read, now)
                if end is None or end <= nxt:
                    continue  # caught up: nothing waiting
                log.warning("partition stalled with records waiting; reading it again",
                            extra={"topic": tp.topic, "partition": tp.partition, "offset": nxt, "end": end,
                                   "stalled_s": round(self.stall_s, 1)})
                await consumer.seek(tp, nxt)
                metrics.OFFSET_REREADS.labels(tp.topic, "stalled").inc()
                sought.append((tp, nxt))
        return sought


def install(app: Any, every_s: float = 5.0, stall_s: float = 15.0) -> StallGuard:
    """Run a ``StallGuard`` on ``app`` every ``every_s`` seconds."""
    guard = StallGuard(app, stall_s)

    @app.timer(every_s)
    async def guard_partitions() -> None:
        await guard.check()

    return guard
