"""Two versions of deepwatch on one broker (a rolling upgrade, a rollback):
the forward-compatibility rule of ``streams.records`` (module docstring).

A field a newer writer added within ``schema_version`` 1 is ignored by an
older reader, at any depth (it dead-lettered every event of a rolling
upgrade as ``cluster/internal_error``); a record at a newer
``schema_version`` is held by the stage that reads it, uncommitted, with one
clear line -- not dead-lettered (a dead letter keeps 512 bytes of it and
nothing sends one again: the event was lost)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from streams.demo_feed import scene
from streams.detect_worker import coalesce
from streams.records import ClusterOp, DetectRequest, ImageEvent, NewerSchema, Sighting
from streams.settings import Settings
from streams.sink_stage import SinkStage
from streams.sinks import Sinks
from streams.store import open_store
from streams.validate import InvalidEvent, parse_event
from tests.faust_agents import recording_agent, wait_for
from tests.test_cluster_engine import sighting
from tests.test_cluster_stage import Msg, stage_for
from tests.test_store import _sighting, _snap

UPGRADE = "written by a newer deepwatch: upgrade this worker"


def _op_doc(eid: str = "e1", seed: int = 1, minute: float = 0) -> dict:
    return json.loads(ClusterOp(kind="sighting", sighting=sighting(scene(seed), eid, minute, f"a-{eid}")).dumps())


def _with_new_fields(doc: dict) -> dict:
    """``doc`` as a newer writer within schema_version 1 might send it: fields
    added at the top, in the sighting, its hashes, its event's picture and
    engagement, and its evidence."""
    doc["priority"] = "high"
    s = doc["sighting"]
    s["colour_profile"] = "sRGB"
    s["hashes"]["wavelet"] = "f" * 16
    s["event"]["image"]["alt_text"] = "a picture"
    s["event"]["engagement"] = {"likes": 3, "bookmarks": 9}
    s["evidence"] = [{"detector": "generator-metadata", "score": 0.9, "weight": 5.0, "detail": "x",
                      "calibrated_at": "2026-12-01"}]
    return doc


# -- the records -------------------------------------------------------------------
def test_fields_a_newer_writer_added_within_the_version_are_ignored_at_any_depth():
    plain = _op_doc()
    op = ClusterOp.loads(json.dumps(_with_new_fields(_op_doc())))
    assert op.sighting.sha256 == plain["sighting"]["sha256"]
    assert op.sighting.event.engagement.likes == 3 and op.sighting.evidence[0].score == 0.9
    assert op.sighting.hashes.model_dump(exclude_none=True) == \
        Sighting.model_validate(plain["sighting"]).hashes.model_dump(exclude_none=True)
    assert "priority" not in op.model_dump() and "alt_text" not in op.sighting.event.image.model_dump()


def test_records_this_code_builds_stay_strict_and_garbage_still_does_not_read():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ClusterOp(kind="resume", sightng=None)  # a typo where a record is built fails there
    doc = _with_new_fields(_op_doc())
    doc["sighting"]["width"] = "wide"  # a new field and a broken one: still refused, for the broken one
    with pytest.raises(ValidationError, match="sighting.width"):
        ClusterOp.loads(json.dumps(doc))
    with pytest.raises(ValidationError):
        ClusterOp.loads(b"{not json")


def test_the_input_event_stays_as_strict_as_its_published_schema():
    # producers outside deepwatch are validated by streams.validate, not by the lenient read path
    event = {"event_id": "e1", "platform": "x", "account_id": "a", "posted_at": "2026-01-01T00:00:00Z",
             "image": {"url": "https://img.example/x.jpg", "alt_text": "a picture"}}
    with pytest.raises(InvalidEvent):
        parse_event(json.dumps(event).encode())
    with pytest.raises(ValidationError, match="Extra inputs"):
        ImageEvent.model_validate(event)


@pytest.mark.parametrize("where", ["op", "sighting", "event"])
def test_a_newer_schema_version_is_refused_with_one_clear_line_and_is_not_a_value_error(where):
    doc = _op_doc()
    node = {"op": doc, "sighting": doc["sighting"], "event": doc["sighting"]["event"]}[where]
    node["schema_version"] = 2
    node["a_field_only_v2_knows"] = {"x": 1}
    with pytest.raises(NewerSchema) as caught:
        ClusterOp.loads(json.dumps(doc))
    assert UPGRADE in str(caught.value) and caught.value.version == 2 and caught.value.known == 1
    assert {"op": "ClusterOp", "sighting": "Sighting", "event": "ImageEvent"}[where] in str(caught.value)
    # readers that dead-letter a ValueError (streams.sinks) must not dead-letter this one
    assert not isinstance(caught.value, ValueError)


def test_the_detect_role_does_not_drop_a_newer_request():
    newer = json.dumps({"schema_version": 2, "cluster_id": "c1", "sha256": "a" * 64}).encode()
    later = json.dumps({"cluster_id": "c2", "sha256": "b" * 64, "new": 1}).encode()
    assert [r.cluster_id for r in coalesce([later])] == ["c2"]
    with pytest.raises(NewerSchema):
        coalesce([newer, later])
    assert DetectRequest.loads(later).sha256 == "b" * 64


# -- the stages --------------------------------------------------------------------
def test_the_cluster_stage_applies_an_op_with_new_fields(tmp_path):
    stage, topics, dead = stage_for(Settings(data_dir=tmp_path), {})
    asyncio.run(stage.handle(json.dumps(_with_new_fields(_op_doc())).encode(), Msg(0)))
    assert not dead
    [(_, snap)] = topics["updates"].sent
    assert json.loads(snap)["new_sighting"]["event"]["event_id"] == "e1"


def test_the_cluster_stage_holds_a_newer_op_and_the_ops_after_it(tmp_path, caplog):
    stage, topics, dead = stage_for(Settings(data_dir=tmp_path), {})
    newer = _op_doc("e2", seed=2, minute=1)
    newer["schema_version"] = 2
    batch = [(json.dumps(_op_doc("e1")).encode(), Msg(0)), (json.dumps(newer).encode(), Msg(1)),
             (json.dumps(_op_doc("e3", seed=3, minute=2)).encode(), Msg(2))]

    async def go() -> None:
        task = asyncio.ensure_future(stage.handle_batch(batch))
        await wait_for(lambda: any(r.levelno == logging.CRITICAL for r in caplog.records))
        await asyncio.sleep(0.3)
        assert not task.done()  # held: the agent acks nothing of the batch while it waits here
        task.cancel()  # the worker stops: the batch stays unacked, so uncommitted
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="streams.held_records"):
        asyncio.run(go())
    assert not dead
    # the op before it applied and sent; the newer one and the op after it not applied
    assert [json.loads(v)["new_sighting"]["event"]["event_id"] for _, v in topics["updates"].sent] == ["e1"]
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "cluster-ops:0:1" in line and UPGRADE in line and "uncommitted" in line


def test_the_sink_holds_a_batch_with_a_newer_snapshot_unacked_and_dead_letters_nothing(tmp_path, caplog):
    settings = Settings(data_dir=tmp_path / "data")
    settings.findings.bulk_flush_s = 0.05
    sinks = Sinks(settings)
    acked: list[bytes] = []
    agent = recording_agent("forward-compat-sink", SinkStage(settings, sinks).snapshots, acked)
    added = json.loads(_snap("c1", 1, sighting=_sighting("e1", "a" * 64, 0)).dumps())
    added["field_of_a_newer_writer"] = 1
    added["new_sighting"]["hashes"]["wavelet"] = "f" * 16
    newer = json.loads(_snap("c2", 1, sighting=_sighting("e2", "b" * 64, 1)).dumps())
    newer["schema_version"] = 2

    async def run() -> None:
        async with agent.test_context() as ctx:
            await ctx.put(json.dumps(added).encode())
            await wait_for(lambda: len(acked) == 1)  # stored, not dead-lettered
            await ctx.put(json.dumps(newer).encode())
            await wait_for(lambda: any(r.levelno == logging.CRITICAL for r in caplog.records))
            await asyncio.sleep(0.3)
        await sinks.aclose()

    with caplog.at_level(logging.INFO, logger="streams.held_records"):
        asyncio.run(run())
    assert len(acked) == 1  # the newer snapshot's batch was never acked
    store = open_store(settings.data_dir)
    try:
        assert list(store.sighting_times()) == ["e1"]
        assert list(store.dead_letters()) == []
    finally:
        store.close()
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert UPGRADE in line


# -- on the real broker ------------------------------------------------------------
@pytest.mark.slow
def test_a_cluster_worker_on_the_broker_applies_new_fields_and_holds_a_newer_version(tmp_path):
    """A cluster worker of this version on the embedded broker, fed the ops a
    newer analyze worker would send: one with fields added within version 1
    ends as a sighting; one at version 2 is held (a critical line, no dead
    letter), and so is the op after it (applied in order by an upgraded
    worker): the group's committed offset stays at the held op."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.topics import topic_specs

    data = tmp_path / "data"
    log_path = tmp_path / "worker.log"
    with EmbeddedBroker(tmp_path / "broker") as b:
        settings = Settings(data_dir=data, broker=f"kafka://{b.bootstrap}")
        ensure_topics(b.bootstrap, topic_specs(settings))
        ops = settings.topic("cluster-ops")
        producer = KafkaProducer(bootstrap_servers=b.bootstrap)
        producer.send(ops, key=b"ops", value=json.dumps(_with_new_fields(_op_doc("e1"))).encode()).get(30)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "streams.cli.__main__", "worker", "--role", "cluster",
                                     "--broker", f"kafka://{b.bootstrap}", "--data-dir", str(data)],
                                    stdout=log_file, stderr=subprocess.STDOUT)
            try:
                _wait_until(lambda: "e1" in _sightings(data), proc, log_path, 180)
                newer = _op_doc("e2", seed=2, minute=1)
                newer["schema_version"] = 2
                held = producer.send(ops, key=b"ops", value=json.dumps(newer).encode()).get(30).offset
                producer.send(ops, key=b"ops", value=json.dumps(_op_doc("e3", seed=3, minute=2)).encode()).get(30)
                _wait_until(lambda: UPGRADE in log_path.read_text(errors="replace"), proc, log_path, 60)
                time.sleep(3)  # time enough to apply e3, or dead-letter e2, had either been going to happen
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, group_id=settings.app_id, enable_auto_commit=False)
        try:
            committed = consumer.committed(TopicPartition(ops, 0))
        finally:
            consumer.close()
    text = log_path.read_text(errors="replace")
    assert f"cluster op at {ops}:0:{held} held" in text, text[-3000:]
    assert "Extra inputs" not in text, text[-3000:]
    assert set(_sightings(data)) == {"e1"}
    store = open_store(data)
    try:
        assert list(store.dead_letters()) == []
    finally:
        store.close()
    assert committed is not None and committed <= held  # an upgraded worker starts at the held op


def _sightings(data: Path) -> dict[str, str]:
    if not (data / "findings.sqlite").exists():
        return {}
    store = open_store(data)
    try:
        return store.sighting_times()
    finally:
        store.close()


def _wait_until(check, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(log_path.read_text(errors="replace")[-4000:])
        time.sleep(0.5)


# -- stored records, read back after a rollback ------------------------------------
def _stored_by_a_newer_version(tmp_path: Path):
    """A findings store holding an alert a newer deepwatch stored (fields
    added within version 1, at the top and in a sample post), its delivery
    failed; the store and the stored document."""
    from datetime import datetime, timezone

    from streams.findings import DeliveryState
    from streams.records import SamplePost
    from tests.test_store import _alert

    store = open_store(tmp_path)
    alert = _alert("c1").model_copy(update={"sample_posts": [SamplePost(
        event_id="e1", platform="x", account_id="a1", posted_at=datetime(2026, 1, 1, tzinfo=timezone.utc))]})
    store.add_alert(alert)
    doc = json.loads(alert.dumps())
    doc["severity"] = "high"
    doc["sample_posts"][0]["thumbnail_url"] = "https://img.example/t.jpg"
    with store._tx() as db:
        db.execute("UPDATE alerts SET doc=? WHERE alert_id=?", (json.dumps(doc), alert.alert_id))
    store.mark_delivered(alert.alert_id, "hook:main", DeliveryState.FAILED, "HTTP 503")
    return store, json.dumps(doc)


def test_an_alert_stored_at_a_newer_schema_version_is_one_clear_store_error(tmp_path):
    """Read through ``Alert.loads`` it raised ``NewerSchema``, which the store's row check did not know:
    `deepwatch alerts`, the desk and every redelivery round ended in a traceback."""
    from streams.store import StoreError

    store, doc = _stored_by_a_newer_version(tmp_path)
    try:
        newer = json.loads(doc)
        newer["schema_version"] = 2
        with store._tx() as db:
            db.execute("UPDATE alerts SET doc=? WHERE alert_id=?", (json.dumps(newer), "c1:1"))
        for read in (store.alerts, lambda: store.failed_deliveries("hook:main")):
            with pytest.raises(StoreError, match=r"'c1:1' was stored by a newer deepwatch \(schema_version 2; this "
                                                 r"one reads up to 1\): upgrade deepwatch"):
                read()
    finally:
        store.close()


def test_an_elasticsearch_alert_document_a_newer_version_stored_reads_less_its_new_fields(tmp_path):
    """Elasticsearch redelivery reads alerts from their documents (``es_docs.alert_from_doc``): strictly,
    every round failed on a document a newer version stored."""
    from streams.es_docs import alert_from_doc

    store, doc = _stored_by_a_newer_version(tmp_path)
    store.close()
    back = alert_from_doc({**json.loads(doc), "@timestamp": "2026-01-01T00:00:00Z"})
    assert back.alert_id == "c1:1" and back.sample_posts[0].event_id == "e1"
    with pytest.raises(NewerSchema):
        alert_from_doc({**json.loads(doc), "schema_version": 2})


def test_a_rollback_lists_and_redelivers_the_alerts_a_newer_version_stored(tmp_path):
    """Stored rows follow the topic records' rule: read strictly, each alert a newer version stored read as
    "changed outside deepwatch", and redelivery stopped at it."""
    store, _ = _stored_by_a_newer_version(tmp_path)
    try:
        assert [a.alert_id for a in store.failed_deliveries("hook:main")] == ["c1:1"]
        assert [a.alert_id for a in store.alerts()] == ["c1:1"]
    finally:
        store.close()
