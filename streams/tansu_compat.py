"""Workarounds for Tansu 0.6.0, the embedded broker. The only place that knows.

Active only for Tansu: users always write ``kafka://HOST:PORT``;
``streams.broker.faust_broker_url`` detects Tansu from the cluster id it
reports (or ``kafka.quirks``) and hands Faust the internal ``tansu://``
scheme, registered as a Faust transport through the ``faust.transports``
entry point. Any real Kafka uses the stock driver.

(a) ListOffsets(latest) answers the *last batch's base offset + 1* rather than
    the log end when that batch holds several records. Faust takes that value
    as a changelog's highwater, so table recovery stops early (state silently
    incomplete) and a second worker crashes with ``ConsistencyError: persisted
    offset ... higher than ... highwater``. The Fetch response's high watermark
    is correct, so we ask for it: fetch from the last batch's base offset
    (which ListOffsets did give us) and read the partition's high watermark.
(b) JoinGroup responses are held for about half the session timeout, in
    whole seconds (measured with a bare aiokafka consumer: 1 s at a 1 or 2 s
    session, 2 s at 2.5-4 s, 3 s at 6 s), so every rebalance (and every
    worker's first join) stalls for that long: ``streams.faust_app`` keeps the
    broker session timeout short for this broker (``SESSION_TIMEOUT_S`` 2 s,
    the longest that is held 1 s; heartbeats every ``HEARTBEAT_INTERVAL_S``,
    under Kafka's rule of a third of the session). Heartbeats come from the
    consumer's own thread, so a busy event loop does not miss them; the
    embedded broker is on loopback.
(c) The idempotent/transactional producer fails (InitProducerId v0): deepwatch
    runs at-least-once everywhere and makes every sink idempotent.
(d) A long-polling Fetch is held for its whole max-wait even when records
    arrive meanwhile (measured: ~450 ms per hop at Faust's hard-coded 1500 ms,
    ~2 ms at 100 ms), which put ~1 s on every event->alert path. Worker
    consumers here poll with a short max-wait instead (``FETCH_MAX_WAIT_MS``);
    on loopback the extra empty fetches cost nothing measurable.
(e) With several producers writing one partition, a record can become
    visible after records with higher offsets: a consumer reading at that
    moment skips it, and Faust books the skipped offset as a gap (an offset
    with no record) that commits may pass. Measured: 3 producers pacing 3,000
    records into one partition at 300/s, a live consumer missed 1-3 offsets
    per run, all there when read again; in the pipeline, a sighting op on
    ``cluster-ops`` (written by every pipeline worker and the detect role)
    skipped so about one paced replay in five, until replay's resend after
    20 s. Here a gap is not booked: the commit stops at the missing offset and
    ``SafeCommits`` reads the partition again from it at the next commit
    (offsets with no record at all are passed over after ``REREAD_TRIES``).
(f) A follower's SyncGroup that reaches Tansu before the leader's (whose
    SyncGroup carries the assignment) is held for a whole second, not
    answered when the assignment lands. Both members get their JoinGroup
    answer at the same moment, so it is a race: measured with two bare
    aiokafka consumers joining one group, one of them got its partitions
    after 2.0 s instead of 1.0 s in 21 of 56 joins; in replays one pipeline
    worker in two of six runs did (``pipeline_join`` 2.1 s against 1.1 s). Tansu's
    DescribeGroups answers "Stable" once the leader's assignment is in, so a
    follower here asks it (``wait_for_leader_assignment``) before it sends
    its SyncGroup: 0 of 40 such joins were held.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, List, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer import group_coordinator
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest
from faust.transport.drivers import aiokafka as faust_aiokafka

from streams.safe_commits import SafeCommits

SESSION_TIMEOUT_S = 2.0
HEARTBEAT_INTERVAL_S = 0.5
FETCH_MAX_WAIT_MS = 50
# (f): no longer than Tansu would have held the SyncGroup anyway, and well
# inside the session timeout.
LEADER_ASSIGNMENT_WAIT_S = 1.0
LEADER_ASSIGNMENT_POLL_S = 0.01
# Set on the aiokafka client of every consumer built for Tansu here; the
# follower's SyncGroup hook below does nothing for any other consumer.
_TANSU_CLIENT_MARK = "_deepwatch_tansu"


async def true_end_offsets(bootstrap: str, listed: Mapping[Any, int]) -> dict[Any, int]:
    """Correct ListOffsets(latest) answers using Fetch high watermarks."""
    need = {tp: off for tp, off in listed.items() if off > 0}
    result = dict(listed)
    if not need:
        return result
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
        fetch_max_bytes=1 << 20, max_partition_fetch_bytes=1 << 16,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(tp.topic, tp.partition) for tp in need]
        consumer.assign(tps)
        for tp, off in zip(tps, need.values()):
            consumer.seek(tp, off - 1)
        pending = set(tps)
        for _ in range(20):  # bounded: each getmany returns on any data
            if not pending:
                break
            await consumer.getmany(*pending, timeout_ms=250)
            for tp in list(pending):
                hw = consumer.highwater(tp)
                if hw is not None:
                    pending.discard(tp)
        for orig, tp in zip(need, tps):
            hw = consumer.highwater(tp)
            if hw is not None:
                result[orig] = max(result[orig], hw)
    finally:
        await consumer.stop()
    return result


async def wait_for_leader_assignment(coordinator: Any) -> bool:
    """(f): wait until the group's leader has sent its assignment, that is
    until DescribeGroups says "Stable", for at most
    ``LEADER_ASSIGNMENT_WAIT_S``. True if it did; False on a timeout or an
    error answer, after which the SyncGroup is sent as it would have been."""
    deadline = time.monotonic() + LEADER_ASSIGNMENT_WAIT_S
    while True:
        try:
            response = await coordinator._send_req(DescribeGroupsRequest([coordinator.group_id]))
        except KafkaError:
            return False
        # DescribeGroups v0-v2 group: (error_code, group_id, state, protocol_type, protocol, members)
        error_code, _group, state = response.groups[0][:3] if response.groups else (-1, None, None)
        if error_code != 0:
            return False
        if state == "Stable":
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(LEADER_ASSIGNMENT_POLL_S)


def mark_tansu_consumer(consumer: AIOKafkaConsumer) -> AIOKafkaConsumer:
    """Turn on the follower's wait (f) for this consumer's group joins."""
    setattr(consumer._client, _TANSU_CLIENT_MARK, True)
    return consumer


def _install_follower_wait() -> None:
    """aiokafka builds its group-join object inside the consumer with no
    way to hand it a subclass, so the follower's step is wrapped once for the
    process; the wrapper acts only for consumers ``mark_tansu_consumer``
    marked."""
    rebalance = group_coordinator.CoordinatorGroupRebalance
    if getattr(rebalance._on_join_follower, "deepwatch_tansu", False):
        return
    stock = rebalance._on_join_follower

    async def _on_join_follower(self: Any) -> Any:
        if getattr(self._coordinator._client, _TANSU_CLIENT_MARK, False):
            await wait_for_leader_assignment(self._coordinator)
        return await stock(self)

    _on_join_follower.deepwatch_tansu = True  # type: ignore[attr-defined]
    rebalance._on_join_follower = _on_join_follower


_install_follower_wait()


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # (d): Faust passes fetch_max_wait_ms=1500 with no setting to change it;
        # aiokafka reads this attribute when it builds its fetcher at start().
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return mark_tansu_consumer(consumer)

    async def _highwaters(self, partitions: List[Any]) -> Mapping[Any, int]:
        listed = await super()._highwaters(partitions)
        bootstrap = ",".join(f"{u.host}:{u.port or 9092}" for u in self.app.conf.broker)
        return await true_end_offsets(bootstrap, listed)


class Consumer(SafeCommits, faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        # (e): a skipped offset is a record not visible yet, not an absent one.
        return None


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    driver_version = faust_aiokafka.Transport.driver_version + "+tansu-compat"


__all__ = [
    "Transport", "SESSION_TIMEOUT_S", "HEARTBEAT_INTERVAL_S", "true_end_offsets",
    "wait_for_leader_assignment", "mark_tansu_consumer",
]
