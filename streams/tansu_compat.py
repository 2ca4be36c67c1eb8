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
    worker's first join) stalls for that long: ``streams.app`` keeps the
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
"""

from __future__ import annotations

from typing import Any, List, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

from streams.safe_commits import SafeCommits

SESSION_TIMEOUT_S = 2.0
HEARTBEAT_INTERVAL_S = 0.5
FETCH_MAX_WAIT_MS = 50


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


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # (d): Faust passes fetch_max_wait_ms=1500 with no setting to change it;
        # aiokafka reads this attribute when it builds its fetcher at start().
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

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


__all__ = ["Transport", "SESSION_TIMEOUT_S", "HEARTBEAT_INTERVAL_S", "true_end_offsets"]
