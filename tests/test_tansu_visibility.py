"""The embedded broker can make a record visible after later ones when
several producers write one partition (streams.tansu_compat (e)). A Faust
worker on it must still process every record: the skipped offset is read
again, never committed over. Real broker, real Faust worker process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.slow

RECORDS, RATE, PRODUCERS = 3000, 300.0, 3  # measured: 1-3 offsets skipped per run like this before the fix

WORKER = textwrap.dedent("""
    import sys
    import faust
    from streams.faust_app import faust_app
    from streams.settings import Settings

    url, out, data = sys.argv[1:4]
    app = faust_app("visibility", Settings(data_dir=data), url)
    topic = app.topic("t", value_serializer="raw", key_serializer="raw")
    seen = open(out, "w")

    @app.agent(topic)
    async def read(stream):
        async for event in stream.events():
            seen.write(f"{event.message.offset}\\n")
            seen.flush()

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
""")


async def _produce(bootstrap: str) -> None:
    producers = [AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all") for _ in range(PRODUCERS)]
    for p in producers:
        await p.start()

    async def pace(p: AIOKafkaProducer) -> None:
        t0 = time.perf_counter()
        for i in range(RECORDS // PRODUCERS):
            await asyncio.sleep(max(0.0, t0 + i * PRODUCERS / RATE - time.perf_counter()))
            await p.send_and_wait("t", value=b"x" * 2000, key=b"k", partition=0)

    try:
        await asyncio.gather(*(pace(p) for p in producers))
    finally:
        for p in producers:
            await p.stop()


def test_every_record_of_a_partition_with_several_producers_is_processed(tmp_path):
    with EmbeddedBroker(tmp_path) as broker:
        KafkaAdminClient(bootstrap_servers=broker.bootstrap).create_topics([NewTopic("t", 1, 1)])
        script, out, log = tmp_path / "worker.py", tmp_path / "seen.txt", tmp_path / "worker.log"
        script.write_text(WORKER)
        worker = subprocess.Popen(
            [sys.executable, str(script), f"tansu://{broker.bootstrap}", str(out), str(tmp_path / "data")],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=Path(__file__).resolve().parents[1],
        )
        try:
            asyncio.run(_produce(broker.bootstrap))
            seen: set[int] = set()
            deadline = time.monotonic() + 60
            while len(seen) < RECORDS and time.monotonic() < deadline:
                assert worker.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
                seen = {int(x) for x in out.read_text().split()} if out.exists() else set()
        finally:
            worker.terminate()
            worker.wait(30)
    assert sorted(set(range(RECORDS)) - seen) == [], log.read_text()[-3000:]
