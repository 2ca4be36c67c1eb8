"""Holding what a newer deepwatch wrote (``records.NewerSchema``: a
``schema_version`` this one does not know) while two versions share a broker.

The stage that read it holds its batch unacked, so uncommitted, until this
worker stops (the hold is cancelled with it) or the partition moves to
another worker (acking then commits nothing): an upgraded worker processes
it. One critical line says so, again every ``HELD_SAY_S`` while it lasts.
Not a dead letter: that keeps 512 bytes of the record and nothing sends a
dead letter again, so the event was lost (``streams.records``, the rule)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from streams.records import NewerSchema

log = logging.getLogger(__name__)

# How often a hold looks whether its partitions moved, and says again that it holds.
HELD_POLL_S, HELD_SAY_S = 1.0, 600.0


async def hold_newer(what: str, msg: Any, count: dict[str, int], error: NewerSchema,
                     still_owned: Callable[[], bool]) -> None:
    """Hold ``what`` ("cluster op", "sink batch", "detect requests"; ``msg``
    its first message, ``count`` how many it holds, as a log field) while
    ``still_owned()``, saying so."""
    where = f"{msg.topic}:{msg.partition}:{msg.offset}"
    extra = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset, **count,
             "schema_version": error.version}
    log.critical(f"{what} at {where} held: {error}. It and what follows it stay uncommitted (nothing is lost or "
                 "dead-lettered) until an upgraded worker processes them", extra=extra)
    said = time.monotonic()
    while still_owned():
        await asyncio.sleep(HELD_POLL_S)
        if time.monotonic() - said >= HELD_SAY_S:
            said = time.monotonic()
            log.critical(f"{what} at {where} still held: {error}", extra=extra)


def owned(stream: Any, events: list) -> bool:
    """Whether this worker still has a partition of ``events`` (a Faust
    stream's; True where no assignment is known: held until the worker stops)."""
    try:
        actives = stream.app.assignor.assigned_actives()
    except Exception:  # noqa: BLE001 - not a Faust stream
        return True
    # none: no assignment known (a test context), or the group between two
    return not actives or any((e.message.topic, e.message.partition) in actives for e in events)
