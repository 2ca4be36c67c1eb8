"""Tansu quirk (a) and its workaround, on the real embedded broker: the log
end reported by ListOffsets is wrong after a multi-record batch; the
corrected value matches what a consumer actually reads."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka import KafkaProducer

from streams.broker import EmbeddedBroker, TopicSpec, ensure_topics
from streams.tansu_compat import true_end_offsets


async def listed_and_corrected(bootstrap: str, tp: TopicPartition) -> tuple[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        listed = (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()
    corrected = (await true_end_offsets(bootstrap, {tp: listed}))[tp]
    return listed, corrected


def test_true_end_offsets_reports_the_real_log_end():
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, [TopicSpec("changelog", 1), TopicSpec("empty", 1)])
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50)
        for i in range(10):
            producer.send("changelog", b"v%d" % i, partition=0)
        producer.flush()
        producer.close()
        tp = TopicPartition("changelog", 0)
        listed, corrected = asyncio.run(listed_and_corrected(broker.bootstrap, tp))
        assert corrected == 10
        # Documents the quirk itself: if a Tansu upgrade fixes it, this fails
        # and the workaround in streams/tansu_compat.py can go.
        assert listed < 10
        empty = TopicPartition("empty", 0)
        assert asyncio.run(listed_and_corrected(broker.bootstrap, empty)) == (0, 0)


def test_workers_of_the_embedded_broker_are_told_it_is_tansu(tmp_path):
    """The runner started the broker, so its workers are told the quirks
    instead of each probing the broker at start-up; the caller's settings
    keep "auto", and the probe on the real broker agrees."""
    from contextlib import ExitStack

    from streams.broker import uses_tansu_quirks
    from streams.runner import settings_env, start_cluster
    from streams.settings import Settings

    settings = Settings(data_dir=tmp_path)
    with ExitStack() as stack:
        cluster = start_cluster(settings, stack)
        assert cluster.settings.kafka.quirks == "tansu"
        assert '"quirks":"tansu"' in settings_env(cluster.settings, cluster.broker_url)["DEEPWATCH_KAFKA"]
        assert settings.kafka.quirks == "auto"
        assert uses_tansu_quirks(settings, cluster.bootstrap)


def test_starting_a_running_broker_again_starts_no_second_process(tmp_path):
    with EmbeddedBroker(tmp_path) as broker:
        first = broker._proc
        assert broker.start() is broker and broker._proc is first
    assert first.poll() is not None  # stopped with the context: nothing left behind
