"""The Faust application: topics, the cluster table and one agent per stage
(``build_pipeline_app``; the analyze stage and the cluster stage with its
sinks can also run as separate roles).

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

import logging
from pathlib import Path

import faust

from streams import metrics
from streams.analyze import Analyzer
from streams.blobstore import DirectoryBlobStore, blob_dir
from streams.cluster_stage import ClusterStage, SendDead
from streams.clustering import blob_pixels
from streams.engine_state import engine_state_path, lost_state, open_engine_state
from streams.faust_app import faust_app
from streams.fetch import ImageFetcher
from streams.host_breaker import HostBreaker
from streams.records import DeadLetter, SourceRef
from streams.settings import Settings
from streams.topics import ANALYZE_GROUP_SUFFIX, CLUSTER_TABLE

log = logging.getLogger(__name__)


def build_pipeline_app(settings: Settings, broker_url: str, *, analyze: bool = True, cluster: bool = True) -> faust.App:
    """The pipeline's Faust app. A ``pipeline`` worker runs every stage; the
    ``analyze`` role (``cluster=False``) runs only the analyze stage, in a
    consumer group of its own, and the ``cluster`` role (``analyze=False``)
    the single writer and the sinks. A deployment runs pipeline workers, or
    analyze workers plus cluster workers, never both kinds on one feed: a
    pipeline worker and an analyze worker would each take every event."""
    if not (analyze or cluster):
        raise ValueError("a pipeline app needs at least one of its stages")
    app = faust_app(settings.app_id + ("" if cluster else ANALYZE_GROUP_SUFFIX), settings, broker_url)
    t = settings.topic
    dead = app.topic(t("dead-letters"), value_serializer="raw", key_serializer="raw")
    ops = app.topic(t("cluster-ops"), value_serializer="raw", key_serializer="raw", partitions=1)

    async def send_dead(dl: DeadLetter) -> None:
        metrics.DEAD_LETTERS.labels(dl.stage, dl.reason).inc()
        log.warning("dead letter", extra={"stage": dl.stage, "reason": dl.reason, "event_id": dl.event_id, "detail": dl.detail})
        # DeadLetter is bounded and valid UTF-8 by construction (streams.records).
        await dead.send(key=(dl.event_id or "").encode("utf-8", "replace") or None, value=dl.dumps())

    @app.on_rebalance_complete.connect
    async def log_assignment(sender=None, **kwargs):
        # Which worker owns what is the first question when events stop moving.
        active = sorted(f"{tp.topic}:{tp.partition}" for tp in app.assignor.assigned_actives())
        log.info("partitions assigned", extra={"generation": app.consumer_generation_id, "active": active})

    if analyze:
        _analyze_stage(app, settings, ops, send_dead)
    if cluster:
        _cluster_stage_and_sinks(app, settings, ops, dead, send_dead)
    return app


def _analyze_stage(app: faust.App, settings: Settings, ops: faust.TopicT, send_dead: SendDead) -> None:
    """validate, fetch, decode, hash, cheap detectors: events in, cluster ops out.

    One failure rule for the whole stage (streams.stage): every event ends as
    a cluster op, an accounted duplicate or a dead letter with stage and
    reason; nothing an event does can end the agent or the worker."""
    from streams.findings import open_findings
    from streams.shared_handle import once
    from streams.stage import AnalyzeStage, SharedIds, hand_on, run_of

    events = app.topic(settings.topic("events"), value_serializer="raw", key_serializer="raw")
    data_dir = Path(settings.data_dir)
    blobs = DirectoryBlobStore(blob_dir(data_dir))
    ingest = settings.ingest
    # one per worker: its analyze actors judge same-id events in turn and share the analysis slots
    shared_ids = SharedIds(analyze_slots=ingest.analyze_concurrency)
    breaker = HostBreaker(settings.fetch.breaker_timeouts, settings.fetch.breaker_cooldown_s)  # and pause stalling hosts together
    # The store the sinks write (SQLite or Elasticsearch), opened in a thread
    # on first use; ``once`` serialises its calls (see streams.shared_handle.Serialized).
    analyze_store = once(lambda: open_findings(settings.findings.url, settings.data_dir, settings))

    # More actors than analysis slots: an event waiting on its image host does not hold up the others.
    @app.agent(events, concurrency=max(ingest.fetch_concurrency, ingest.analyze_concurrency))
    async def analyze(stream):
        fetcher = ImageFetcher(settings.fetch, settings.ingest, blobs, breaker)
        stage = AnalyzeStage(settings, fetcher, Analyzer(settings, blob_dir(data_dir)), blobs.put,
                             analyze_store, shared_ids)
        # Acks are ours (``noack``): an event is acked once its outcome is
        # handed on. A stopping worker (SIGTERM, a rolling restart) cancels this
        # loop with events in hand, and a stream that acks itself acks them
        # however the loop ends, before the consumer's last commit: an event
        # still being fetched was committed over and never processed.
        events_in = stream.noack()
        try:
            async for event in events_in.events():
                msg = event.message
                source = SourceRef(topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                   run=run_of(getattr(msg, "headers", None)))
                metrics.observe_lag("analyze", msg.timestamp)
                result = await stage.process(event.value, source, msg.timestamp or None)
                if await hand_on(result, source, ops, send_dead, stage.mark_duplicate):
                    await events_in.ack(event)
        finally:
            stage.close()
            await fetcher.aclose()


def _cluster_stage_and_sinks(app: faust.App, settings: Settings, ops: faust.TopicT, dead: faust.TopicT,
                             send_dead: SendDead) -> None:
    """The single writer (cluster ops in; snapshots, detect requests and
    alerts out) and the sinks that store what it decided."""
    t = settings.topic
    detect_requests = app.topic(t("detect-requests"), value_serializer="raw", key_serializer="raw")
    updates = app.topic(t("cluster-updates"), value_serializer="raw", key_serializer="raw")
    alerts = app.topic(t("alerts"), value_serializer="raw", key_serializer="raw")
    # use_partitioner: the cluster stage writes the table once per batch, after
    # its ops were taken (streams.cluster_stage), where Faust knows no
    # "current event" to take the partition from; the table and its changelog
    # have one partition, so the producer's partitioner names the same one.
    table = app.Table(CLUSTER_TABLE, partitions=1, default=None, key_type=bytes, value_type=bytes,
                      use_partitioner=True)
    # Faust derives table serializers from model types and falls back to JSON
    # for plain bytes; values are our own versioned JSON (ClusterState), so
    # store them as-is. Must be set before the table's store is first built.
    table.key_serializer = table.value_serializer = "raw"

    # Before the file is opened (which creates it): a deleted engine state, or
    # a new data dir beside an old findings store, restarts every cluster's
    # counts from zero. Said loudly; nothing here can rebuild it.
    lost = lost_state(settings)
    if lost:
        log.warning(lost, extra={"engine_state": str(engine_state_path(settings.data_dir))})
    stage = ClusterStage(settings, table, open_engine_state(settings.data_dir), updates=updates,
                         detect_requests=detect_requests, alerts=alerts, send_dead=send_dead,
                         pixels=blob_pixels(DirectoryBlobStore(blob_dir(settings.data_dir))))
    app.on_rebalance_complete.connect(stage.on_rebalance)

    @app.agent(ops)
    async def cluster(stream):
        await stage.run(stream)

    # -- sinks -----------------------------------------------------------------
    from streams.sink_stage import SinkStage
    from streams.sinks import Sinks
    from streams.webhook_redelivery import install_redelivery
    from streams.webhooks import Deliveries

    # one per worker: its webhook senders and its redelivery share the alerts in hand,
    # the targets asked to wait (Retry-After) and the ordering gate
    deliveries = Deliveries()
    sinks = Sinks(settings, deliveries=deliveries)
    redeliverer = install_redelivery(app, settings, deliveries)  # failed webhooks are retried, in order per cluster

    @app.on_before_shutdown.connect
    async def stop_webhook_senders(app, **kwargs) -> None:
        # Sent from App.on_stop once the consumer has stopped fetching and
        # before the agents, producer and timers are stopped: the event loop
        # still runs the senders (plain tasks, not Faust's), so the alerts they
        # hold go out now, within a bounded grace (streams.sinks.Sinks.stop),
        # not 2 x webhook_redeliver_s later. Nothing held: no wait at all.
        try:
            await sinks.stop()
            if redeliverer is not None:
                await redeliverer.aclose()
        except Exception:  # a stop must go on: what was held stays "queued" for redelivery
            log.exception("closing the webhook senders failed")

    sink_stage = SinkStage(settings, sinks)

    @app.agent(updates)
    async def sink_updates(stream):
        await sink_stage.snapshots(stream)

    @app.agent(alerts)
    async def sink_alerts(stream):
        await sink_stage.alerts(stream)

    @app.agent(dead)
    async def sink_dead_letters(stream):
        await sink_stage.dead_letters(stream)
