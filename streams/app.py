"""The Faust application: topics, the cluster table and one agent per stage.

Data flows one way:
  events ─analyze─▶ cluster-ops (1 partition) ─cluster─▶ cluster-updates ─sink─▶ findings store
                                    ▲              ├──▶ alerts ─alert sink─▶ store, console, webhooks
                 detect-requests ◀──┘──────────────┘
                 (separate consumer group: ``deepwatch worker --role detect``)
Failures at any stage go to ``dead-letters`` with a reason.

Processing is at-least-once (Tansu cannot do transactions, and at-least-once
with idempotent sinks is the robust choice on any broker anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import faust

from detectors.imagedata import ImageRejected
from streams import metrics
from streams.analyze import Analyzer
from streams.blobstore import DirectoryBlobStore
from streams.broker import TopicSpec
from streams.cluster_stage import ClusterStage
from streams.engine_state import open_engine_state
from streams.fetch import FetchError, ImageFetcher
from streams.records import ClusterOp, DeadLetter, SourceRef
from streams.settings import Settings
from streams.tansu_compat import SESSION_TIMEOUT_S
from streams.validate import InvalidEvent, parse_event

log = logging.getLogger(__name__)

CLUSTER_TABLE = "clusters"


def topic_specs(settings: Settings) -> list[TopicSpec]:
    p = settings.partitions
    t = settings.topic
    return [
        TopicSpec(t("events"), p),
        TopicSpec(t("dead-letters"), p),
        TopicSpec(t("cluster-ops"), 1),  # the single ordered place where clusters are decided
        TopicSpec(t("detect-requests"), p),
        TopicSpec(t("cluster-updates"), p),
        TopicSpec(t("alerts"), p),
        TopicSpec(f"{settings.app_id}-{CLUSTER_TABLE}-changelog", 1, compacted=True),
        TopicSpec(f"{settings.app_id}-__assignor-__leader", 1),
        TopicSpec(f"{settings.app_id}-detect-__assignor-__leader", 1),
    ]


def _faust_app(app_id: str, settings: Settings, broker_url: str) -> faust.App:
    tansu = broker_url.startswith("tansu://")
    datadir = Path(settings.data_dir) / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id,
        broker=broker_url,
        store="memory://",  # state is rebuilt from the changelog; nothing to corrupt on disk
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        topic_allow_declare=False,  # every topic is created up front (streams.broker.ensure_topics)
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        # Tansu holds JoinGroup answers for session_timeout/2 (streams.tansu_compat (b)).
        broker_session_timeout=SESSION_TIMEOUT_S if tansu else 60.0,
        broker_heartbeat_interval=3.0,
        broker_commit_interval=1.0,
        table_standby_replicas=1,
        web_enabled=False,
        producer_acks=-1,
        stream_wait_empty=False,
    )


def _dead_letter(stage: str, reason: str, detail: str, source: SourceRef, raw: bytes | None, event_id: str | None) -> DeadLetter:
    excerpt = None
    if raw is not None:
        excerpt = raw[:512].decode("utf-8", "replace")
    return DeadLetter(event_id=event_id, stage=stage, reason=reason, detail=detail, source=source, payload_excerpt=excerpt)


def build_pipeline_app(settings: Settings, broker_url: str) -> faust.App:
    app = _faust_app(settings.app_id, settings, broker_url)
    t = settings.topic
    events = app.topic(t("events"), value_serializer="raw", key_serializer="raw")
    dead = app.topic(t("dead-letters"), value_serializer="raw", key_serializer="raw")
    ops = app.topic(t("cluster-ops"), value_serializer="raw", key_serializer="raw", partitions=1)
    detect_requests = app.topic(t("detect-requests"), value_serializer="raw", key_serializer="raw")
    updates = app.topic(t("cluster-updates"), value_serializer="raw", key_serializer="raw")
    alerts = app.topic(t("alerts"), value_serializer="raw", key_serializer="raw")
    table = app.Table(CLUSTER_TABLE, partitions=1, default=None, key_type=bytes, value_type=bytes)
    # Faust derives table serializers from model types and falls back to JSON
    # for plain bytes; values are our own versioned JSON (ClusterState), so
    # store them as-is. Must be set before the table's store is first built.
    table.key_serializer = table.value_serializer = "raw"

    data_dir = Path(settings.data_dir)
    blobs = DirectoryBlobStore(data_dir / "blobs")

    async def send_dead(dl: DeadLetter) -> None:
        metrics.DEAD_LETTERS.labels(dl.stage, dl.reason).inc()
        log.warning("dead letter", extra={"stage": dl.stage, "reason": dl.reason, "event_id": dl.event_id, "detail": dl.detail})
        await dead.send(key=(dl.event_id or "").encode() or None, value=dl.dumps())

    # -- stage: validate, fetch, decode, hash, cheap detectors -----------------
    @app.agent(events, concurrency=4)
    async def analyze(stream):
        fetcher = ImageFetcher(settings.fetch, settings.ingest, blobs)
        analyzer = Analyzer(settings, data_dir / "blobs")
        try:
            async for event in analyze_events(stream, fetcher, analyzer):
                await ops.send(key=b"ops", value=event)
        finally:
            await fetcher.aclose()

    async def analyze_events(stream, fetcher: ImageFetcher, analyzer: Analyzer):
        """Yields serialized cluster ops; failures become dead letters here."""
        async for event in stream.events():
            msg = event.message
            raw: bytes = event.value
            source = SourceRef(topic=msg.topic, partition=msg.partition, offset=msg.offset)
            started = time.perf_counter()
            try:
                ev = parse_event(raw)
            except InvalidEvent as e:
                metrics.EVENTS.labels("validate", "dead_letter").inc()
                await send_dead(_dead_letter("validate", e.reason, e.detail, source, raw, e.event_id))
                continue
            try:
                data = await fetcher.get(ev)
                metrics.STAGE_SECONDS.labels("fetch").observe(time.perf_counter() - started)
            except FetchError as e:
                metrics.EVENTS.labels("fetch", "dead_letter").inc()
                await send_dead(_dead_letter("fetch", e.reason, e.detail, source, None, ev.event_id))
                continue
            t1 = time.perf_counter()
            try:
                sighting = await asyncio.to_thread(analyzer.analyze, ev, data, source)
                await asyncio.to_thread(blobs.put, data)
            except ImageRejected as e:
                metrics.EVENTS.labels("decode", "dead_letter").inc()
                await send_dead(_dead_letter("decode", e.reason, str(e), source, None, ev.event_id))
                continue
            except Exception as e:  # a bug or an exotic image must not stop the stream
                log.exception("analyze failed", extra={"event_id": ev.event_id})
                metrics.EVENTS.labels("hash", "dead_letter").inc()
                await send_dead(_dead_letter("hash", "internal_error", f"{type(e).__name__}: {e}", source, None, ev.event_id))
                continue
            metrics.STAGE_SECONDS.labels("analyze").observe(time.perf_counter() - t1)
            if msg.timestamp:
                sighting.ingested_at = datetime.fromtimestamp(msg.timestamp, timezone.utc)
            metrics.EVENTS.labels("analyze", "ok").inc()
            yield ClusterOp(kind="sighting", sighting=sighting).dumps()

    # -- stage: cluster (single writer) ----------------------------------------
    stage = ClusterStage(settings, table, open_engine_state(settings.data_dir), updates=updates,
                         detect_requests=detect_requests, alerts=alerts, send_dead=send_dead)
    app.on_rebalance_complete.connect(stage.on_rebalance)

    @app.agent(ops)
    async def cluster(stream):
        await stage.run(stream)

    # -- sinks -----------------------------------------------------------------
    from streams.sinks import Sinks

    sinks = Sinks(settings)

    @app.agent(updates)
    async def sink_updates(stream):
        async for value in stream:
            await sinks.snapshot(value)

    @app.agent(alerts)
    async def sink_alerts(stream):
        async for value in stream:
            await sinks.alert(value)

    @app.agent(dead)
    async def sink_dead_letters(stream):
        async for value in stream:
            await sinks.dead_letter(value)

    return app
