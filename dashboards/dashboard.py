"""The deepwatch Grafana dashboard, built with grafana-foundation-sdk."""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, DynamicConfigValue
from prometheus_client import Histogram

from dashboards import desk
from dashboards import queries as q
from streams import ingest_server, metrics

DASHBOARD_UID = "deepwatch-overview"
DATASOURCE_UID = "deepwatch-prometheus"  # provisioned by provisioning.datasources()
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _timeseries(title: str, unit: str, description: str) -> timeseries.Panel:
    return (
        timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .min(0).height(8).span(12).fill_opacity(10)
        .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM).show_legend(True).calcs(["lastNotNull", "max"]))
    )


# The p95 stat turns red where DeepwatchEventToAlertLatencyHigh starts counting (rules.EVENT_TO_ALERT_P95_MAX_S,
# a bucket boundary of the histogram); tests keep the two equal.
EVENT_TO_ALERT_RED_S = 60.0


def top_bucket(histogram: Histogram) -> str:
    """The largest finite bucket of ``histogram``, as a panel says it ("1800 s"):
    histogram_quantile() reads no more than that, whatever the true latency."""
    return f"{max(b for b in histogram._upper_bounds if b != float('inf')):g} s"


# per bar (q.counted); dashboards/queries.py holds the shared queries, this one is this panel's alone
BROKER_TIME_BEHIND = (f"sum by (topic, action) "
                      f"({q.counted(f'deepwatch_broker_timestamp_behind_total{{{q.JOB}}}', '$__interval')})")


# the histograms whose quantiles the panels draw (the descriptions name their top bucket, from the code)
EVENT_TO_ALERT_TOP = top_bucket(metrics.EVENT_TO_ALERT_SECONDS)
INGEST_REQUEST_TOP = top_bucket(ingest_server.REQUEST_SECONDS)


def _stat(title: str, description: str, expr: str, legend: str = "", colours=None) -> stat.Panel:
    # explicit thresholds: Grafana's defaults (red at 80) turned healthy counts red
    return (
        stat.Panel().title(title).description(description).datasource(DATASOURCE).height(4).span(6)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(colours or desk.thresholds(desk.NEUTRAL))
        .with_target(_query(expr, legend).instant())
    )


def build_dashboard() -> dash.Dashboard:
    return (
        dash.Dashboard("deepwatch — Pipeline health")
        .uid(DASHBOARD_UID)
        .description("Events, dead letters, clusters, latency and alert delivery of the deepwatch streaming pipeline.")
        .tags(["deepwatch", "generated"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("utc")
        .editable()
        .annotation(desk._alerts_annotation())  # deepwatch's own alerts, from the findings store
        .link(dash.DashboardLink("Viral fakes now").type("link").url(f"/d/{desk.VIRAL_UID}").icon("dashboard"))
        .with_row(dash.Row("Overview"))
        .with_panel(_stat("Live clusters", "Clusters in the cluster engine's index.", q.CLUSTERS))
        .with_panel(_stat("Distinct images", "Images in the cluster engine's index.", q.CLUSTER_MEMBERS))
        .with_panel(_stat("Alerts raised (range)", "Alerts stored by the alert sink in the dashboard range, by level.",
                          q.ALERTS_IN_RANGE, "level {{level}}"))
        .with_panel(_stat("Event → alert p95", "Wall time from the triggering post's broker timestamp to the stored "
                          f"alert, p95 over the last hour; red at {EVENT_TO_ALERT_RED_S:g} s, where "
                          "DeepwatchEventToAlertLatencyHigh starts counting (reads at most "
                          f"{EVENT_TO_ALERT_TOP}, the histogram's largest bucket).",
                          q.event_to_alert_quantile(0.95, "1h"),
                          colours=desk.thresholds("green", (EVENT_TO_ALERT_RED_S / 2, "orange"),
                                                  (EVENT_TO_ALERT_RED_S, "red"))).unit("s"))
        .with_row(dash.Row("Throughput"))
        .with_panel(
            _timeseries("Events/s by stage & outcome", "ops",
                        "Every event leaves a stage as ok, duplicate or dead_letter.")
            .with_target(_query(q.EVENTS_RATE, "{{stage}} / {{outcome}}"))
        )
        .with_panel(
            _timeseries("Dead letters/s by stage & reason", "ops",
                        "Hostile or broken input; `deepwatch dead-letters` shows the events.")
            .with_target(_query(q.DEAD_LETTERS_RATE, "{{stage}}: {{reason}}"))
        )
        .with_panel(
            _timeseries("HTTP ingest lines/s by token & outcome", "ops",
                        "At the door, before any worker: `deepwatch serve-ingest` lines by token and outcome "
                        "(dead_lettered: refused by schema or URL policy and sent to the dead-letter topic by the "
                        "endpoint itself, so counted in no worker's dead letters; DeepwatchDeadLetterRatioHigh "
                        "counts them).")
            .with_target(_query(q.INGEST_LINES_RATE, "{{token}} / {{outcome}}"))
        )
        .with_panel(
            _timeseries("HTTP ingest requests/s by token & status", "reqps",
                        "Requests to `deepwatch serve-ingest` by token name and status: 202 accepted, 503 busy or "
                        "broker_unavailable (clients re-send), 401/413/429 the client's doing.")
            .with_target(_query(q.INGEST_REQUESTS_RATE, "{{token}} {{status}}"))
        )
        .with_panel(
            _timeseries("HTTP ingest refused for the broker", "short",
                        "Requests answered 503 broker_unavailable, by cause: topic_missing (DeepwatchIngestTopicMissing) "
                        "or unavailable (Kafka down, unreachable or slow: DeepwatchIngestBrokerFailures).")
            .with_target(_query(q.INGEST_BROKER_REFUSALS, "{{cause}}"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_panel(
            _timeseries("HTTP ingest request p50 / p95", "s",
                        "From deepwatch_ingest_request_seconds, all tokens, every answer by status class: 2xx "
                        "accepted, 4xx the client's doing, 5xx busy or broker_unavailable (a broker that does "
                        "not acknowledge shows here as slow 5xx). Quantiles stop at "
                        f"{INGEST_REQUEST_TOP}, the histogram's largest bucket.")
            .with_target(_query(q.ingest_request_quantile(0.5), "p50 {{class}}", "A"))
            .with_target(_query(q.ingest_request_quantile(0.95), "p95 {{class}}", "B"))
        )
        .with_panel(
            _timeseries("HTTP ingest bytes held", "bytes",
                        "Request bodies each `deepwatch serve-ingest` replica holds in memory, all requests "
                        "together; at connectors.ingest_max_buffered_bytes it answers 503 busy "
                        "(DeepwatchIngestBusy).")
            .with_target(_query(q.INGEST_BUFFERED_BYTES, "{{instance}}"))
        )
        .with_panel(
            _timeseries("Image hosts paused", "short",
                        "Hosts that timed out fetch.breaker_timeouts times in a row, paused per worker; their posts "
                        "end as fetch:host_unavailable until a try gets an answer (worker logs name the host).")
            .with_target(_query(q.HOST_PAUSES, "pauses"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_panel(
            _timeseries("Blob store held", "s",
                        "How long each worker has held pictures its blob store (the data dir's blobs/) could not "
                        "write: disk full, quota, EIO, read-only. Held events are retried with backoff, not "
                        "dead-lettered; while > 0 the analyze stage stalls once every analysis slot holds one.")
            .with_target(_query(q.BLOB_HELD, "{{instance}}"))
        )
        .with_panel(
            _timeseries("Blob writes failed and held", "short",
                        "Blob store writes that failed for a reason that passes (ENOSPC, EDQUOT, EIO, EROFS, ...), "
                        "each retried; the worker log names the errno and path. Writes that can never succeed "
                        "(EFBIG, a path problem) are dead letters blob:blob_write instead.")
            .with_target(_query(q.BLOB_WRITE_FAILURES, "{{instance}}"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_panel(
            _timeseries("Findings lookups held", "s",
                        "How long each worker has held events whose duplicate lookup the findings store could not "
                        "answer: the SQLite file locked past its busy timeout or its disk failing, Elasticsearch "
                        "unreachable, overloaded or refusing the credentials. Held events are looked up again with "
                        "backoff, not dead-lettered; while > 0 the analyze stage stalls once every analysis slot "
                        "holds one.")
            .with_target(_query(q.LOOKUP_HELD, "{{instance}}"))
        )
        .with_panel(
            _timeseries("Findings lookups failed and held", "short",
                        "Duplicate lookups that failed for a reason that passes (SQLITE_BUSY, SQLITE_IOERR, "
                        "Elasticsearch 429/5xx or unreachable, ...), each retried; the worker log says the store's "
                        "answer. Errors that come back every time (a corrupt database file, a bug) are dead letters "
                        "dedupe:internal_error instead.")
            .with_target(_query(q.LOOKUP_FAILURES, "{{instance}}"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_row(dash.Row("Connectors"))
        .with_panel(
            _timeseries("Connector frames/s by outcome", "ops",
                        "Frames read from each platform stream (`deepwatch connect bluesky|mastodon "
                        "--metrics-port N`, scraped as job deepwatch-connect), by outcome.")
            .with_target(_query(q.CONNECTOR_FRAMES_RATE, "{{connector}} / {{outcome}}"))
        )
        .with_panel(
            _timeseries("Connector events/s by outcome", "ops",
                        "Image posts mapped to events: produced and refused once the broker acknowledged them, "
                        "duplicate, clipped (images past a platform's per-post limit, left out).")
            .with_target(_query(q.CONNECTOR_EVENTS_RATE, "{{connector}} / {{outcome}}"))
        )
        .with_panel(
            _timeseries("Connector cursor lag", "s",
                        "Wall time minus the event time of each stream's last checkpointed cursor: how far "
                        "behind the platform it reads (a restart resumes from there). A quiet hashtag stream "
                        "lags by design: nothing new was posted.")
            .with_target(_query(q.CONNECTOR_CURSOR_LAG, "{{stream}} {{instance}}"))
        )
        .with_panel(
            _timeseries("Connector reconnects, rate-limit waits, cursors ahead", "short",
                        "Stream reconnects by reason, and waits the platform's rate limits imposed; a steady "
                        "stream of either means the connector reads little. Cursor ahead: frames whose position "
                        "lay further in the future than a clock's skew explains (a wrong clock on the platform "
                        "or here, or a crafted frame); their events were sent, the cursor was not moved to them. "
                        "Handle resolutions (Bluesky): how DID -> handle checks ended; many unverified are "
                        "impersonation claims or DNS-only handles, error the PLC directory or handle hosts failing, "
                        "dropped a full queue.")
            .with_target(_query(q.CONNECTOR_RECONNECTS, "reconnect {{connector}}: {{reason}}", "A"))
            .with_target(_query(q.CONNECTOR_RATE_LIMIT_WAITS, "rate limited {{connector}}", "B"))
            .with_target(_query(q.CONNECTOR_CURSOR_AHEAD, "cursor ahead {{connector}}", "C"))
            .with_target(_query(q.CONNECTOR_HANDLE_RESOLUTIONS, "handles {{outcome}}", "D"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_row(dash.Row("Latency"))
        .with_panel(
            _timeseries("Stage latency p50 / p95", "s", "From deepwatch_stage_seconds.")
            .with_target(_query(q.stage_quantile(0.5), "p50 {{stage}}", "A"))
            .with_target(_query(q.stage_quantile(0.95), "p95 {{stage}}", "B"))
        )
        .with_panel(
            _timeseries("Waiting before each stage p95", "s",
                        "How old a message is when its stage takes it up (deepwatch_stage_lag_seconds): the "
                        "stage whose wait grows is the one behind.")
            .with_target(_query(q.stage_lag_quantile(0.95), "p95 {{stage}}"))
        )
        .with_panel(
            _timeseries("Event → alert latency", "s",
                        "From the broker timestamp of the triggering event to the stored alert; quantiles stop at "
                        f"{EVENT_TO_ALERT_TOP}, the histogram's largest bucket.")
            .with_target(_query(q.event_to_alert_quantile(0.5), "p50", "A"))
            .with_target(_query(q.event_to_alert_quantile(0.95), "p95", "B"))
        )
        .with_panel(
            _timeseries("Model requests and answers", "short",
                        "Pictures the cluster stage sent to the detect role for the pixel model, and the answers "
                        "it gave, per bar. Requests with no answers: no detect worker, or a stuck one "
                        "(DeepwatchModelResultsOverdue).")
            .with_target(_query(q.MODEL_REQUESTS_RATE, "requests", "A"))
            .with_target(_query(q.MODEL_ANSWERS_RATE, "answers", "B"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_panel(
            _timeseries("Event loop silence by worker", "s",
                        "Seconds since each worker's event loop last beat (every 5 s); past 120 s its /healthz "
                        "answers 503 and Kubernetes restarts it, while /metrics still answers.")
            .with_target(_query(q.LOOP_SILENCE, "{{instance}}"))
        )
        .with_row(dash.Row("Findings store"))
        .with_panel(
            _timeseries("Findings bulk items/s", "ops",
                        "Elasticsearch bulk items by index and outcome; dead_letter = refused for good "
                        "(see `deepwatch dead-letters`, stage sink).")
            .with_target(_query(q.SINK_ITEMS_RATE, "{{index}} / {{outcome}}"))
        )
        .with_panel(
            _timeseries("Findings sink behind", "s",
                        "How long the findings sink has been retrying (429/5xx); while > 0 its agents consume "
                        "nothing and Kafka lag grows instead (backpressure, nothing dropped).")
            .with_target(_query(q.SINK_BEHIND, "behind"))
        )
        .with_row(dash.Row("Alerts & delivery"))
        .with_panel(
            _timeseries("Alerts raised", "short", "New alerts per level in each bar's interval (1 = first alert, 2+ = escalations).")
            .with_target(_query(q.ALERTS_RATE, "level {{level}}"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_panel(
            _timeseries("Webhook deliveries", "short",
                        "Signed webhook delivery attempts to subscribers: failed = gave up after retries "
                        "(redelivery counts each round that fails again), rejected = refused for good.")
            .with_target(_query(q.WEBHOOKS_BY_OUTCOME, "{{outcome}}"))
            .override_by_name("failed", [_red()])
            .override_by_name("rejected", [_red()])
        )
        .with_panel(
            _timeseries("Webhook deliveries waiting", "short",
                        "Per target (scheme://host:port#hash): queued = being sent, failed = retried every "
                        "alerts.webhook_redeliver_s, rejected = refused for good, waiting for an operator "
                        "(`deepwatch redeliver` lists them; `deepwatch redeliver TARGET` sends them again).")
            .with_target(_query(q.WEBHOOK_UNDELIVERED, "{{target}} {{status}}"))
        )
        .with_panel(
            _timeseries("Partitions read again", "short",
                        "Offsets re-read by workers: dropped = a record skipped before processing, stalled = a "
                        "partition that read nothing while records waited. Rare; a steady rate means a broker "
                        "or client problem (docs/hardening.md).")
            .with_target(_query(q.OFFSET_REREADS, "{{topic}} {{why}}"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_row(dash.Row("Desk"))
        .with_panel(
            _timeseries("Desk requests/s by route & status", "reqps",
                        "The fact-check desk (deepwatch serve), by route template; 5xx usually means the "
                        "findings store is unreachable.")
            .with_target(_query(q.DESK_REQUESTS_RATE, "{{route}} {{status}}"))
        )
        .with_panel(
            _timeseries("Desk request p95 by route", "s", "From deepwatch_desk_request_seconds.")
            .with_target(_query(q.desk_request_quantile(0.95), "p95 {{route}}"))
        )
        .with_panel(
            _timeseries("Desk verdicts and logins", "short",
                        "Verdicts recorded by editors, and login attempts by outcome (failed and rate_limited "
                        "in bursts: someone guessing passwords).")
            .with_target(_query(q.DESK_VERDICTS, "verdict {{verdict}}", "A"))
            .with_target(_query(q.DESK_LOGINS, "login {{outcome}}", "B"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        .with_panel(
            _timeseries("Desk picture lookups", "short",
                        "\"Find a picture\" (POST /api/similar, /similar) by outcome: seen (a cluster shows "
                        "the picture), banked (only a bank entry does), not_seen, rejected (not an image, too large).")
            .with_target(_query(q.DESK_LOOKUPS, "{{outcome}}"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
        # appended, not inserted: panel ids follow the order, and ?viewPanel=N links must keep working
        .with_row(dash.Row("Scrape targets & Kafka"))
        .with_panel(
            _timeseries("Scrape targets up by job", "short",
                        "Targets answering their scrape (up), against those Prometheus discovers, per job: "
                        "deepwatch (workers), deepwatch-desk, deepwatch-ingest, kafka (kafka-exporter). Where "
                        "the two part, a target is down (DeepwatchWorkerDown, DeskDown, IngestDown, "
                        "KafkaExporterDown); a job gone from the panel has no target at all (DeepwatchNoWorkers, "
                        "NoDesk, NoIngest).")
            .with_target(_query(q.TARGETS_UP, "{{job}} up", "A"))
            .with_target(_query(q.TARGETS_DISCOVERED, "{{job}} discovered", "B"))
        )
        .with_panel(
            _timeseries("Consumer lag by group & topic", "short",
                        "Messages each consumer group has not read yet (kafka-exporter's kafka_consumergroup_lag_sum): "
                        "a group whose lag grows is behind. The workers' groups are the app_id (deepwatch), "
                        "<app_id>-analyze for the analyze role and <app_id>-detect for the detect role.")
            .with_target(_query(q.CONSUMER_LAG, "{{consumergroup}} {{topic}}"))
        )
        .with_panel(
            _timeseries("Events stamped before they were posted", "short",
                        "Events whose broker timestamp is over a minute before their posted_at: a producer "
                        "(ingest client, connector host) whose clock is slow, on a CreateTime topic. Such "
                        "sightings counted minutes early fell out of the 5-minute velocity window and alerts "
                        "did not fire. worker_clock = a live post, timed by the worker's clock instead; kept = "
                        "a backlog's, still timed by the stamp. The worker logs the topic and ingest run; fix "
                        "that host's clock (NTP).")
            .with_target(_query(BROKER_TIME_BEHIND, "{{topic}} {{action}}"))
            .draw_style(common.GraphDrawStyle.BARS)
        )
    )


def _red() -> DynamicConfigValue:
    return DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"})


def dashboard_json() -> dict[str, Any]:
    """The dashboard as plain JSON (what Grafana stores and provisioning reads)."""
    doc = json.loads(JSONEncoder(sort_keys=True).encode(build_dashboard().build()))
    # The SDK leaves ids unset (rows get 0); Grafana needs them unique, and
    # stable ids keep panel links (?viewPanel=N) valid across regenerations.
    for n, panel in enumerate(doc["panels"], start=1):
        panel["id"] = n
    return desk.annotation_fields(doc)


def promql_exprs(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in doc.get("panels", []) for t in p.get("targets", []) if "expr" in t]
