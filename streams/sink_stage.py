"""The sink agents: what the cluster stage decided (snapshots, alerts) and
every dead letter, into the findings store through ``streams.sinks.Sinks``.

Batches by size and time (``findings.bulk_max_actions`` within
``findings.bulk_flush_s``; alerts one at a time, at once). Each batch is
awaited until stored, so a findings store that falls behind pauses its agent
and, once Faust's buffers fill, the fetching (backpressure).

A batch is acked only once stored (``noack_take``, as the cluster stage
does). ``take`` acks what it handed out when the agent's loop ends, however it
ends, so a worker stopped while its sink waited on a locked store committed
the batch's offsets on its way out and the batch was never stored (the
analyze agent lost events the same way, ``streams.stage.hand_on``).

A record that does not read (a damaged one) is one dead
letter (stage ``sink``) and the rest of its batch is stored
(``streams.sinks.unreadable``): it neither loses the batch nor holds it.
One a newer deepwatch wrote at a ``schema_version`` this one does not know
(``records.NewerSchema``) is valid, only newer: its batch is held, unacked,
with one critical line (``streams.held_records``), until this worker stops or the
partition moves, so an upgraded worker stores it. Dead-lettered, it was
lost: a dead letter keeps 512 bytes of it and nothing sends one again.
Fields a newer writer added within a version are ignored (``records``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from streams import metrics
from streams.held_records import hold_newer, owned
from streams.records import NewerSchema
from streams.settings import Settings
from streams.sinks import Sinks


class SinkStage:
    def __init__(self, settings: Settings, sinks: Sinks):
        self.sinks = sinks
        self.batch = settings.findings.bulk_max_actions
        self.within = settings.findings.bulk_flush_s

    async def snapshots(self, stream: Any) -> None:
        async for events in stream.noack_take(self.batch, within=self.within):
            await self._stored(stream, events, self._timed_snapshots)

    async def _timed_snapshots(self, values: list[bytes]) -> None:
        # the write alone: a batch held for a newer writer (``hold_newer``) is no stage latency
        with metrics.STAGE_SECONDS.labels("sink").time():
            await self.sinks.snapshots(values)

    async def alerts(self, stream: Any) -> None:
        async for events in stream.noack_take(1, within=self.within):
            await self._stored(stream, events, lambda values: self.sinks.alert(values[0]))

    async def dead_letters(self, stream: Any) -> None:
        async for events in stream.noack_take(self.batch, within=self.within):
            await self._stored(stream, events, self.sinks.dead_letters)

    @staticmethod
    async def _stored(stream: Any, events: list, write: Callable[[list[bytes]], Awaitable[None]]) -> None:
        try:
            await write([e.value for e in events])
        except asyncio.CancelledError:
            raise  # a stop: left unacked, so uncommitted; the partition's next owner stores them
        except NewerSchema as e:
            # returns once its partitions moved: acking commits nothing
            await hold_newer("sink batch", events[0].message, {"records": len(events)}, e,
                             lambda: owned(stream, events))
        except Exception:
            # A crash (not a store that cannot write: ``Sinks`` retries that;
            # nor a record that does not read: ``Sinks`` dead-letters it and
            # stores the rest of the batch). Faust logs it and restarts the
            # agent; acked as ``take`` did, so that it does not hold the
            # partition's commits.
            for e in events:
                await stream.ack(e)
            raise
        for e in events:
            await stream.ack(e)

