"""Alert rules: Prometheus rules for operators (the pipeline is unhealthy) and
a Grafana-managed rule for the fact-check desk (deepwatch raised an alert).

Operators page through Prometheus → Alertmanager because those rules must
fire even when Grafana is down; the desk rule lives in Grafana because the
desk already works there and routes it to its own contact points.
"""

from __future__ import annotations

import json
import os
from typing import Any

from grafana_foundation_sdk.builders import alerting, expr, prometheus
from grafana_foundation_sdk.builders import elasticsearch as es
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.alerting import RelativeTimeRange

from dashboards import desk
from dashboards import queries as q
from dashboards.dashboard import DASHBOARD_UID, DATASOURCE_UID
from streams.metrics import LIVENESS_S
from streams.settings import TOPIC_PREFIX_RE, AlertSettings, Settings

# Each operator rule's `runbook_url` annotation: this file's "### <alertname lower-cased>" section,
# as a whole address (Alertmanager receivers, PagerDuty, Slack link it as it is; a repo-relative
# path led nowhere). Set RUNBOOK_BASE_URL (or `python -m dashboards.build --runbook-base-url`) to
# where your copy of deploy/README.md is served, and regenerate.
DEFAULT_RUNBOOK_BASE_URL = "https://github.com/deepwatch/deepwatch/blob/main/deploy/README.md"
RUNBOOK_BASE_URL_ENV = "RUNBOOK_BASE_URL"


def runbook_base_url() -> str:
    return (os.environ.get(RUNBOOK_BASE_URL_ENV) or DEFAULT_RUNBOOK_BASE_URL).split("#", 1)[0]


DEAD_LETTER_RATIO_MAX = 0.2  # a fifth of the input unusable is an upstream or config problem, not noise
STAGE_P95_MAX_S = 5.0  # fetch read timeout is 15 s; a p95 of 5 s means the feed is falling behind
DESK_ERROR_RATIO_MAX = 0.05  # of desk requests answered 5xx over 10 minutes
EVENT_TO_ALERT_P95_MAX_S = 60.0  # a bucket boundary of deepwatch_event_to_alert_seconds (tested)
LOOP_SILENCE_MAX_S = int(LIVENESS_S)  # as the worker's own /healthz judges it
# a held blob write retries with backoff up to 30 s (streams.stage.BLOB_RETRY_MAX_S): a minute is a
# few failed tries, not a blip, and nothing is analysed meanwhile
BLOB_HELD_MAX_S = 60
# a held duplicate lookup retries with the findings store's backoff (findings.retry_max_s, 30 s by default)
LOOKUP_HELD_MAX_S = 60
# of HTTP ingest requests (202 + 503): refused for the broker over 5 min / for the buffer budget over 10 min;
# clients re-send on 503, so a blip is absorbed, a lasting share is events not getting in
INGEST_BROKER_FAILURE_RATIO_MAX = 0.05
INGEST_BUSY_RATIO_MAX = 0.05

# Traffic floors of the ratio rules, per second over each rule's window. Below them a ratio stands on
# a handful of events and one bad one is a large share: one dead letter of two events at 3 a.m. read
# 50 %, one 500 of three desk requests 33 %, and paged. Under the floor the panels still show it.
# 60 incoming events in the 10-minute window: at the 20 % bar, 12 dead letters, not one feed's odd post
DEAD_LETTER_RATIO_MIN_EVENTS_PER_S = 0.1
# 60 requests in 10 minutes (probes left out): one fact-checker paging through the queue sends more
# (each page fetches its thumbnails); at the 5 % bar, 3 errors, not one
DESK_ERROR_RATIO_MIN_REQUESTS_PER_S = 0.1
# 15 requests in the 5-minute window (30 in 10): under it a single 503 of a scraper that posts once a
# minute was 20 % and paged critical; a broker that stays down still does, clients re-send with Retry-After
INGEST_RATIO_MIN_REQUESTS_PER_S = 0.05
# 3 alerts in the 15-minute window: one late alert of one or two is 50-100 %; a backlog that delays
# every alert pages as DeepwatchConsumerLagGrowing
EVENT_TO_ALERT_MIN_ALERTS_PER_S = 3 / 900
# 30 observations of a stage in the 5-minute window: under it its p95 is the slowest one or two
# (one slow image host at night read as the stage's p95)
STAGE_LATENCY_MIN_PER_S = 0.1

# Consumer lag (kafka-exporter) per group and topic: more than this many messages, growing over the
# window, for the rule's `for`. A worker holds at most fetch_concurrency events uncommitted and commits
# every second (streams.faust_app), so a healthy group's lag is tens to a few hundred at most.
CONSUMER_LAG_MIN_MESSAGES = 1000
CONSUMER_LAG_WINDOW = "15m"
# DeepwatchConsumerLagGrowing steps aside while one of these fires: each already pages for why a group
# reads nothing or slowly, and a second page for its backlog says nothing new
CONSUMER_LAG_EXPLAINED_BY = ("DeepwatchNoEventsProcessed", "DeepwatchWorkerDown", "DeepwatchNoWorkers",
                             "DeepwatchWorkerLoopStalled", "DeepwatchFindingsSinkBehind", "DeepwatchBlobStoreHeld",
                             "DeepwatchFindingsLookupHeld", "DeepwatchModelResultsOverdue")
# A connector stream's saved cursor this far behind live (and still falling behind): what a restart
# would read again, and how late its posts reach the pipeline. Checkpoints come every
# connectors.checkpoint_interval_s (2 s), so a connector keeping up shows seconds.
CONNECTOR_CURSOR_LAG_MAX_S = 900
CONNECTOR_LAG_WINDOW = "15m"


def _with_traffic(condition: str, traffic: str, floor: float) -> str:
    """``condition`` (a ratio or quantile compared with its bar) only while
    ``traffic`` reaches ``floor``; the alert's value stays the condition's."""
    return f"({condition}) and on () ({traffic} >= {floor:g})"


def _rule(name: str, expr_: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name, "expr": expr_, "for": for_,
        "labels": {"severity": severity, "team": "deepwatch-ops"},
        "annotations": {"summary": summary, "description": description},
    }


# DeepwatchNoEventsProcessed and DeepwatchKafkaExporterDown read kafka-exporter's offsets of the
# events topic, `<topic_prefix>.events` (Settings.topic): an exact name, not a pattern (the
# broker may hold other deployments' topics). The committed rules are for the default prefix;
# for another, regenerate: `python -m dashboards.build --out DIR --topic-prefix PREFIX`.
DEFAULT_TOPIC_PREFIX: str = Settings.model_fields["topic_prefix"].default


def events_topic(topic_prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    if not TOPIC_PREFIX_RE.fullmatch(topic_prefix):
        raise ValueError(f"{topic_prefix!r} is no topic_prefix: letters, digits, . _ - (1 to 200), as the workers' setting")
    return f"{topic_prefix}.events"


def prometheus_rules(runbook_base: str | None = None, topic_prefix: str = DEFAULT_TOPIC_PREFIX) -> dict[str, Any]:
    base = (runbook_base or runbook_base_url()).split("#", 1)[0]
    doc = _prometheus_rules(events_topic(topic_prefix), topic_prefix)
    for g in doc["groups"]:
        for r in g["rules"]:
            r["annotations"]["runbook_url"] = f"{base}#{r['alert'].lower()}"
    return doc


def _prometheus_rules(topic: str, topic_prefix: str) -> dict[str, Any]:
    return {"groups": [{
        "name": "deepwatch-operators",
        "interval": "30s",
        "rules": [
            _rule("DeepwatchDeadLetterRatioHigh",
                  _with_traffic(f"{q.dead_letter_ratio('10m')} > {DEAD_LETTER_RATIO_MAX}", q.incoming_events_rate("10m"),
                                DEAD_LETTER_RATIO_MIN_EVENTS_PER_S), "10m", "warning",
                  "More than {{ $value | humanizePercentage }} of incoming events are dead-lettered",
                  "Check `deepwatch dead-letters` for the dominant stage/reason: a feed format change, "
                  "a blocked CDN or a wrong image root usually explains it."),
            _rule("DeepwatchNoEventsProcessed",
                  f"({q.events_arriving('5m', topic)}) and on() ({q.events_processed('5m')} == 0)", "10m",
                  "critical", f"Events arrive on {topic} but no worker has processed any for 10 minutes",
                  "Pipeline workers are stuck, crash-looping or not assigned partitions; check worker logs "
                  "and consumer group lag."),
            _rule("DeepwatchWorkerDown", q.WORKERS_DOWN, "5m", "critical",
                  "deepwatch worker {{ $labels.instance }} is not answering /metrics",
                  "The worker process is down, OOM-killed or crash-looping, or its metrics port is unreachable; "
                  "its partitions move to the other workers of its role. Check its container or pod status and "
                  "its last log lines (a setting or model it cannot load stops it at start with one line)."),
            # DeepwatchNoEventsProcessed reads the exporter's offsets: without them it cannot fire
            # ... and without any exporter (Kubernetes ships none in base) there is no `up` to read 0
            _rule("DeepwatchKafkaExporterDown", q.kafka_exporter_blind(topic), "10m", "warning",
                  f"No offsets of {topic} from kafka-exporter: DeepwatchNoEventsProcessed cannot fire",
                  "Prometheus cannot scrape kafka-exporter (job kafka), or no exporter reports the events topic's "
                  "offsets at all (or the workers' topic_prefix is not the one these rules were generated for); "
                  "they are the only sign that events arrive, so a stuck pipeline would page nobody meanwhile "
                  "(nor would DeepwatchConsumerLagGrowing, which reads the same exporter). Check the exporter's "
                  "pod or service, the broker address it is given and its connection to the brokers."),
            _rule("DeepwatchNoWorkers", q.NO_WORKERS, "5m", "critical",
                  "No deepwatch worker is being scraped",
                  "Every pipeline and detect worker is gone (or Prometheus discovers none): nothing is analysed "
                  "and events wait on the topic. Check the workers' Deployments or compose services, their pods' "
                  "last log lines, and the `deepwatch` scrape job's discovery."),
            # No pending time on top: the silence is its own duration (with "for: 2m" it fired at 4 minutes,
            # after the liveness probe had restarted the worker and its new gauge had hidden the stall)
            _rule("DeepwatchWorkerLoopStalled", f"{q.WORKER_LOOP_SILENCE} > {LOOP_SILENCE_MAX_S}", "0m", "critical",
                  "deepwatch worker {{ $labels.instance }}: event loop silent for {{ $value | humanizeDuration }}",
                  "The process answers /metrics but its event loop has stopped: it consumes nothing. "
                  "Its /healthz answers 503, so a liveness probe restarts it; elsewhere restart it by hand. "
                  "First, SIGUSR1 writes every thread's stack to its log, which shows what blocked the loop "
                  "(`docker compose kill -s SIGUSR1 SERVICE`, `kill -USR1 PID`; the image has no py-spy)."),
            _rule("DeepwatchWebhookFailures", q.WEBHOOK_FAILURES_15M, "5m", "warning",
                  "Webhook deliveries to alert subscribers are failing or rejected",
                  "Deliveries gave up after retries (failed: redelivered later) or the receiver refused them "
                  "(rejected: 401/403/404/410 or a redirect, not retried on its own); subscribers are missing "
                  "alerts. `deepwatch redeliver` lists what waits per target; check the receiver, its URL, its "
                  "TLS and the HMAC secret, then `deepwatch redeliver TARGET` sends the rejected ones again."),
            _rule("DeepwatchWebhookDeliveriesOwed", q.WEBHOOK_OWED, "30m", "warning",
                  "{{ $value }} alert(s) not delivered to webhook target {{ $labels.target }}",
                  "Deliveries to this subscriber are still failed or rejected after 30 minutes: rejected ones "
                  "(401/403/404/410, a redirect) are never retried on their own, so this stays on until "
                  "`deepwatch redeliver TARGET` sends them again, after the receiver or its secret is fixed."),
            # on (stage): each stage's quantile against its own number of observations
            _rule("DeepwatchStageLatencyHigh",
                  f"({q.stage_quantile(0.95, '5m')} > {STAGE_P95_MAX_S}) "
                  f"and on (stage) ({q.stage_rate('5m')} >= {STAGE_LATENCY_MIN_PER_S:g})", "10m", "warning",
                  "p95 latency of stage {{ $labels.stage }} is {{ $value | humanizeDuration }}",
                  "Slow or rate-limiting image hosts (fetch; its read timeout is 15 s), oversized images or CPU "
                  "starvation (analyze), a saturated cluster worker (cluster), model batches too slow for the "
                  "device (detect). The \"Stage latency p50 / p95\" panel shows "
                  "since when; add workers of that role or give them more CPU."),
            _rule("DeepwatchModelResultsOverdue", q.MODEL_RESULTS_OVERDUE, "5m", "warning",
                  "Clusters wait for model results: the detect role answered none in 15 minutes",
                  "The cluster stage asks the detect role for the pixel model's evidence on every new picture; "
                  "nothing answered. A deployment without a detect worker (`deepwatch worker --role detect`), "
                  "one crash-looping on its model, or one stuck: every new cluster keeps models_pending and is "
                  "scored without the model's evidence, so a fake without metadata is not caught."),
            _rule("DeepwatchImageHostsPaused", q.HOST_PAUSES_15M, "0m", "warning",
                  "Image hosts keep timing out; their posts are dead-lettered as fetch:host_unavailable",
                  "A worker paused a host after fetch.breaker_timeouts timeouts in a row (streams.host_breaker). "
                  "The worker logs 'image host paused after timeouts' with the host: a CDN outage, a network "
                  "problem on the workers' side, or a host set up to hold fetchers."),
            _rule("DeepwatchFindingsSinkBehind", f"{q.SINK_BEHIND_MAX} > 60", "5m", "warning",
                  "The findings sink has been retrying for {{ $value | humanizeDuration }}",
                  "The findings store cannot take writes: Elasticsearch unreachable, overloaded (429/5xx) or "
                  "refusing the credentials (401/403: renew DEEPWATCH_ES_API_KEY), or the SQLite file locked or its "
                  "disk full. The pipeline is paused behind it and nothing is lost, but the desk sees stale "
                  "findings. The workers log each retry with the store's answer; check cluster health and disk "
                  "watermarks."),
            _rule("DeepwatchBlobStoreHeld", f"{q.BLOB_HELD_MAX} > {BLOB_HELD_MAX_S}", "2m", "critical",
                  "deepwatch worker {{ $labels.instance }} has held pictures for its blob store for "
                  "{{ $value | humanizeDuration }}",
                  "The data dir's blob store cannot take writes: disk full (ENOSPC), over quota (EDQUOT), "
                  "failing (EIO) or remounted read-only (EROFS). The events are held and retried, nothing is "
                  "dead-lettered, but the analyze stage stalls: no new sightings or alerts. The worker logs "
                  "'blob store write failed' with the errno and path; free space or fix the volume."),
            _rule("DeepwatchFindingsLookupHeld", f"{q.LOOKUP_HELD_MAX} > {LOOKUP_HELD_MAX_S}", "2m", "critical",
                  "deepwatch worker {{ $labels.instance }} has held events for the findings store's duplicate "
                  "lookup for {{ $value | humanizeDuration }}",
                  "The findings store cannot answer the analyze stage's duplicate lookups: the SQLite file locked "
                  "past its busy timeout or its disk failing, Elasticsearch unreachable, overloaded or refusing the "
                  "credentials. The events are held and looked up again, nothing is dead-lettered, but the analyze "
                  "stage stalls: no new sightings or alerts. The worker logs 'findings store lookup failed' with "
                  "the store's answer."),
            _rule("DeepwatchDeskDown", q.DESK_DOWN, "5m", "critical",
                  "The fact-check desk {{ $labels.instance }} is not answering /metrics",
                  "Fact-checkers cannot open the queue or record verdicts; alerts still reach subscribers. Check "
                  "the desk's pod or container and its last log lines: a users file it cannot read, a malformed "
                  "DEEPWATCH_DESK_TOKENS or a findings store it cannot open stops it at start with one line."),
            _rule("DeepwatchNoDesk", q.NO_DESK, "10m", "critical",
                  "No fact-check desk is being scraped",
                  "Every desk replica is gone, or Prometheus discovers none: fact-checkers cannot open the queue "
                  "or record verdicts. Where no desk runs on purpose, drop its scrape job and silence this alert."),
            # as DeepwatchWorkerLoopStalled: the metrics port answers from a thread of its own, so `up`
            # stays 1 while the desk's loop, which serves every page, has stopped
            _rule("DeepwatchDeskLoopStalled", f"{q.server_loop_silence(q.DESK_JOB)} > {LOOP_SILENCE_MAX_S}", "0m",
                  "critical",
                  "fact-check desk {{ $labels.instance }}: event loop silent for {{ $value | humanizeDuration }}",
                  "The desk answers /metrics but its event loop has stopped: no page or API call is answered. "
                  "Its /healthz answers 503, so a liveness probe restarts it; elsewhere restart it by hand, after "
                  "SIGUSR1 has written every thread's stack to its log (`kill -USR1 PID`)."),
            _rule("DeepwatchDeskErrors",
                  _with_traffic(f"{q.desk_error_ratio('10m')} > {DESK_ERROR_RATIO_MAX}", q.desk_requests_rate("10m"),
                                DESK_ERROR_RATIO_MIN_REQUESTS_PER_S), "10m", "warning",
                  "{{ $value | humanizePercentage }} of desk requests fail with a server error",
                  "Usually the findings store: Elasticsearch unreachable, its API key revoked or its index missing. "
                  "The \"Desk requests/s by route & status\" panel names the routes; `deepwatch search --store URL` "
                  "from the desk's pod shows the store's error in one line."),
            # p95 above the bound = more than 5 % of alerts slower than it (see q.event_to_alert_slower_than:
            # when 60 s was the histogram's largest finite bucket, "p95 > 60" could never fire)
            _rule("DeepwatchEventToAlertLatencyHigh",
                  _with_traffic(f"{q.event_to_alert_slower_than(f'{EVENT_TO_ALERT_P95_MAX_S:g}', '15m')} > 0.05",
                                q.alerts_timed_rate("15m"), EVENT_TO_ALERT_MIN_ALERTS_PER_S), "15m", "warning",
                  f"{{{{ $value | humanizePercentage }}}} of alerts reach the desk more than "
                  f"{EVENT_TO_ALERT_P95_MAX_S:g}s after the triggering post (p95 above {EVENT_TO_ALERT_P95_MAX_S:g}s)",
                  "The desk learns about viral fakes late; look at consumer lag and stage latency."),
            # -- consumers falling behind: reading, but slower than events come in
            _rule("DeepwatchConsumerLagGrowing",
                  q.consumer_lag_growing(topic_prefix, CONSUMER_LAG_MIN_MESSAGES, CONSUMER_LAG_WINDOW,
                                         CONSUMER_LAG_EXPLAINED_BY), "15m", "warning",
                  "Consumer group {{ $labels.consumergroup }} is {{ $value }} messages behind on "
                  "{{ $labels.topic }}, and falling further behind",
                  f"Its workers read the topic more slowly than messages arrive (the backlog grew over "
                  f"{CONSUMER_LAG_WINDOW} and for 15 minutes more): alerts reach the desk later and later. The "
                  "\"Consumer lag by group & topic\" panel shows since when, \"Waiting before each stage p95\" and "
                  "\"Stage latency p50 / p95\" which stage is slow. Add workers of the role that reads the topic "
                  "(no more than its partitions), give them more CPU, or find what slows them (slow image hosts, "
                  "the findings store)."),
            _rule("DeepwatchConnectorBehind",
                  q.connector_falling_behind(CONNECTOR_CURSOR_LAG_MAX_S, CONNECTOR_LAG_WINDOW), "15m", "warning",
                  "Connector {{ $labels.connector }} stream {{ $labels.stream }} is {{ $value | humanizeDuration }} "
                  "behind live, and falling further behind",
                  f"The connector reads frames, but the cursor it saves for this stream "
                  f"fell more than {CONNECTOR_CURSOR_LAG_MAX_S // 60} minutes behind the platform and keeps "
                  "falling: posts reach the pipeline late, and a restart reads all of it again. Its log shows "
                  "`reconnecting` with reason sink_failed (the broker not acknowledging: it rolls back and reads "
                  "the same window again) or rate-limit waits; the \"Connectors\" row shows frames, reconnects and waits. "
                  "A connector short of CPU reads slower than the platform posts: give it more, or split its "
                  "hashtags over more connectors."),
            # -- the HTTP ingest endpoint (deepwatch serve-ingest, job deepwatch-ingest)
            # One replica down is a warning: the others take its requests. None answering is
            # DeepwatchNoIngest, critical like DeepwatchNoDesk and DeepwatchNoWorkers.
            _rule("DeepwatchIngestDown", q.INGEST_DOWN, "5m", "warning",
                  "The HTTP ingest endpoint {{ $labels.instance }} is not answering /metrics",
                  "The serve-ingest process is down, OOM-killed or its metrics port is unreachable; the other "
                  "replicas take its requests (when none answers, DeepwatchNoIngest pages). Check its pod's or "
                  "container's last log lines: a malformed DEEPWATCH_INGEST_TOKENS or a --broker it cannot use "
                  "stops it at start with one line."),
            _rule("DeepwatchIngestLoopStalled", f"{q.server_loop_silence(q.INGEST_JOB)} > {LOOP_SILENCE_MAX_S}",
                  "0m", "warning",
                  "HTTP ingest endpoint {{ $labels.instance }}: event loop silent for {{ $value | humanizeDuration }}",
                  "The serve-ingest process answers /metrics but its event loop has stopped: requests to it hang. "
                  "Its /healthz answers 503, so a liveness probe restarts it; elsewhere restart it by hand, after "
                  "SIGUSR1 has written every thread's stack to its log (`kill -USR1 PID`)."),
            _rule("DeepwatchNoIngest", q.NO_INGEST, "5m", "critical",
                  "No HTTP ingest endpoint is answering",
                  "Every serve-ingest replica is down or gone, or Prometheus discovers none: nothing posted over "
                  "HTTP gets in. Where no serve-ingest runs on purpose, drop its scrape job and silence this "
                  "alert."),
            _rule("DeepwatchIngestTopicMissing", q.INGEST_TOPIC_MISSING_5M, "5m", "critical",
                  "The HTTP ingest endpoint refuses requests: the events or dead-letter topic does not exist",
                  "Every request is answered 503 until the topics exist (the broker does not auto-create them). "
                  "Start a worker (it creates them), or run serve-ingest with --create-topics, or create them "
                  "by hand; the endpoint log names the missing topics."),
            _rule("DeepwatchIngestBrokerFailures",
                  _with_traffic(f"{q.ingest_broker_failure_ratio('5m')} > {INGEST_BROKER_FAILURE_RATIO_MAX}",
                                q.ingest_requests_rate("5m"), INGEST_RATIO_MIN_REQUESTS_PER_S), "5m", "critical",
                  "{{ $value | humanizePercentage }} of HTTP ingest requests are refused: the broker does not "
                  "take their events",
                  "serve-ingest answers 503 broker_unavailable (nothing accepted; clients re-send): Kafka is "
                  "down, unreachable from the endpoint, or slower than connectors.ingest_broker_timeout_s "
                  "(a missing topic is DeepwatchIngestTopicMissing). The endpoint logs 'broker unavailable; "
                  "request refused' with the producer's error; check the brokers' health and that the endpoint's "
                  "pod reaches them (network policy, DNS, TLS/SASL settings)."),
            _rule("DeepwatchIngestBusy",
                  _with_traffic(f"{q.ingest_busy_ratio('10m')} > {INGEST_BUSY_RATIO_MAX}", q.ingest_requests_rate("10m"),
                                INGEST_RATIO_MIN_REQUESTS_PER_S), "10m", "warning",
                  "{{ $value | humanizePercentage }} of HTTP ingest requests are refused as busy",
                  "The endpoint holds as many request bodies as connectors.ingest_max_buffered_bytes allows "
                  "(503 busy): slow clients, bursts of large bodies, or too few replicas. The \"HTTP ingest bytes "
                  "held\" panel shows how full it is; add replicas, raise the budget within the memory limit, or "
                  "ask the biggest sender for smaller, gzip-compressed batches."),
        ],
    }]}


# -- Grafana-managed rule for the fact-check desk -------------------------------
DESK_FOLDER_UID = "deepwatch"
DESK_FOLDER_TITLE = "deepwatch"
DESK_GROUP = "deepwatch-desk"


# The same velocity bar the stream's own alert rule uses by default.
VIRAL_VELOCITY_MIN = AlertSettings().min_sightings_5m
VIRAL_RULE_UID = "deepwatch-desk-viral-fake"
# What the desk rule counts: distinct accounts in the 5 minutes, not posts. On
# ``velocity.sightings_5m`` one bot posting a fake 12 times paged the desk while
# the stream (``virality.spread``, at most ``alerts.max_sightings_per_account``
# posts of one account) stayed quiet. Counting each account once, the bar is the
# stream's default in accounts: at least that many people posted it, so the stream's
# own spread (an account's posts capped, never below its accounts) has crossed too. The
# other way it is stricter: a few accounts posting it hard (4 x 3 posts) alert the
# stream's subscribers but not the desk, whose field holds accounts, not capped posts.
VIRAL_FIELD = "velocity.accounts_5m"
VIRAL_ACCOUNTS_MIN = VIRAL_VELOCITY_MIN


def _viral_query(ref: str, field: str) -> es.Dataquery:
    """Per live likely-AI cluster (labels cluster_id and its top evidence),
    the max of ``field`` over the cluster documents updated in the window."""
    return (
        es.Dataquery().ref_id(ref).datasource(desk.ES_CLUSTERS).query(desk.LIVE_LIKELY_AI).time_field("last_seen")
        .metrics([es.Max().id("1").field(field)])
        .bucket_aggs([desk._terms("cluster_id", 50, "2", order_by="1"),
                      desk._terms("evidence_summary.keyword", 1, "3"),
                      desk._histogram("last_seen", "4")])
    )


def viral_fake_rule() -> alerting.Rule:
    """A likely-AI picture posted by at least ``VIRAL_ACCOUNTS_MIN`` distinct
    accounts in 5 minutes (``VIRAL_FIELD``): one alert instance per cluster,
    labelled with the cluster and its evidence. Cluster documents written before
    ``accounts_5m`` existed have no value there and do not fire (no data: OK)."""
    window = RelativeTimeRange(from_val=900, to=0)
    return (
        alerting.Rule("Likely-AI picture going viral")
        .uid(VIRAL_RULE_UID).folder_uid(DESK_FOLDER_UID).rule_group(DESK_GROUP).org_id(1)
        .condition("C")
        .with_query(alerting.Query("A").datasource_uid(desk.ES_CLUSTERS_UID).relative_time_range(window)
                    .model(_viral_query("A", VIRAL_FIELD)))
        # max, not last: the date histogram has empty (null) buckets between updates
        .with_query(alerting.Query("B").datasource_uid("__expr__").model(
            expr.TypeReduce().ref_id("B").expression("A").reducer("max")))
        .with_query(alerting.Query("C").datasource_uid("__expr__").model(
            expr.TypeThreshold().ref_id("C").expression("B").conditions([
                expr.ExprTypeThresholdConditions().evaluator(  # counts are whole numbers: > N-1 is >= N
                    expr.ExprTypeThresholdConditionsEvaluator().type("gt").params([VIRAL_ACCOUNTS_MIN - 1]))
            ])))
        .with_query(alerting.Query("D").datasource_uid(desk.ES_CLUSTERS_UID).relative_time_range(window)
                    .model(_viral_query("D", "fake_score")))
        .with_query(alerting.Query("E").datasource_uid("__expr__").model(
            expr.TypeReduce().ref_id("E").expression("D").reducer("max")))
        .for_val("0s")
        .no_data_state("OK").exec_err_state("Error")
        .labels({"team": "factcheck-desk", "severity": "warning", "source": "deepwatch-findings"})
        .annotations({
            "summary": "Likely-AI picture {{ $labels.cluster_id }} is spreading: {{ $values.B }} accounts posted it in 5 min",
            "description": "Fake score {{ humanizePercentage $values.E.Value }}. Evidence: "
                           "{{ index $labels \"evidence_summary.keyword\" }}",
            # what the summary's number is and where the bar comes from, for whoever reads the payload
            "threshold": f"{VIRAL_ACCOUNTS_MIN} or more distinct accounts (platform and id) posting it in 5 minutes, "
                         "the stream's default alerts.min_sightings_5m; one account's posts count once, so a bot "
                         "reposting the picture does not page the desk",
            "score": "{{ $values.E }}",
            "evidence": "{{ index $labels \"evidence_summary.keyword\" }}",
            "cluster_id": "{{ $labels.cluster_id }}",
            "runbook_url": f"/d/{desk.SPREAD_UID}?var-cluster={{{{ $labels.cluster_id }}}}",
            "__dashboardUid__": desk.VIRAL_UID,
        })
    )


def desk_rule_group() -> alerting.RuleGroup:
    window = RelativeTimeRange(from_val=600, to=0)  # seconds, as Grafana's API wants
    ds = {"type": "prometheus", "uid": DATASOURCE_UID}
    return (
        alerting.RuleGroup(DESK_GROUP).folder_uid(DESK_FOLDER_UID).interval(60)
        .with_rule(viral_fake_rule())
        .with_rule(
            alerting.Rule("deepwatch raised an alert")
            .uid("deepwatch-desk-alert-raised")
            .folder_uid(DESK_FOLDER_UID).rule_group(DESK_GROUP).org_id(1)
            .condition("C")
            .with_query(alerting.Query("A").datasource_uid(DATASOURCE_UID).relative_time_range(window).model(
                prometheus.Dataquery().expr(q.ALERTS_RAISED_5M).instant().ref_id("A").datasource(ds)))
            .with_query(alerting.Query("B").datasource_uid("__expr__").model(
                expr.TypeReduce().ref_id("B").expression("A").reducer("last")))
            .with_query(alerting.Query("C").datasource_uid("__expr__").model(
                expr.TypeThreshold().ref_id("C").expression("B").conditions([
                    expr.ExprTypeThresholdConditions().evaluator(
                        expr.ExprTypeThresholdConditionsEvaluator().type("gt").params([0]))
                ])))
            .for_val("0s")
            # No data = no alerts yet (the counter appears with the first one).
            .no_data_state("OK").exec_err_state("Error")
            .labels({"team": "factcheck-desk", "severity": "info"})
            .annotations({
                "summary": "deepwatch raised {{ $values.B }} alert(s) in the last 5 minutes",
                "description": "A likely AI-generated or manipulated image is going viral. "
                               "Open the dashboard or run `deepwatch alerts` for the cluster and its evidence.",
                "__dashboardUid__": DASHBOARD_UID,
            })
        )
    )


def desk_rule_group_api() -> dict[str, Any]:
    """The group as the provisioning HTTP API takes it (PUT .../rule-groups/{group})."""
    return json.loads(JSONEncoder(sort_keys=True).encode(desk_rule_group().build()))


def desk_alerting_provisioning() -> dict[str, Any]:
    """The same group as a Grafana alerting provisioning file: the file format
    names the folder by title and the group by `name`, and rules do not repeat
    the folder/group/org they belong to."""
    api = desk_rule_group_api()
    rules = []
    for r in api["rules"]:
        rules.append({k: v for k, v in r.items() if k not in ("folderUID", "ruleGroup", "orgID")})
    return {"apiVersion": 1, "groups": [{
        "orgId": 1, "name": api["title"], "folder": DESK_FOLDER_TITLE, "interval": f"{api['interval']}s", "rules": rules,
    }]}


def prometheus_rule_exprs() -> list[str]:
    return [r["expr"] for g in prometheus_rules()["groups"] for r in g["rules"]]


# A rule's runbook_url is a path on Grafana ("/d/<uid>?var-cluster=..."): Grafana's
# own UI opens it, but a Slack message or an email needs the whole address.
# The notification data's ExternalURL is this Grafana's address (its root_url,
# sub-path included, always with a trailing slash), so the link is right
# wherever Grafana runs. Grafana expands "$NAME" in provisioning files; "$."
# and "$\"" it leaves alone.
ABSOLUTE_RUNBOOK_URL = '{{ reReplaceAll "/$" "" $.ExternalURL }}{{ . }}'  # inside {{ with .Annotations.runbook_url }}
# each alert of the notification: what it is, and where to look (a rule without a runbook_url: no link line)
ALERTS_TEXT = ("{{ range .Alerts }}{{ .Annotations.description }}\n"
               "{{ with .Annotations.runbook_url }}" + ABSOLUTE_RUNBOOK_URL + "\n{{ end }}{{ end }}")


def contact_points() -> list[dict[str, Any]]:
    """Where desk alerts go: a signed-by-Grafana webhook, Slack and email.
    URLs and addresses are environment references that Grafana resolves when
    it loads the provisioning file (secrets never in the repository). Slack's
    text and the email's message carry each alert's link as a whole address
    (``ALERTS_TEXT``); the webhook's JSON has ``externalURL`` beside the
    annotations."""
    return [{
        "orgId": 1, "name": DESK_CONTACT_POINT,
        "receivers": [
            {"uid": "deepwatch-desk-webhook", "type": "webhook", "disableResolveMessage": False,
             "settings": {"url": "$DEEPWATCH_DESK_WEBHOOK_URL", "httpMethod": "POST",
                          "authorization_scheme": "Bearer", "authorization_credentials": "$DEEPWATCH_DESK_WEBHOOK_TOKEN"}},
            {"uid": "deepwatch-desk-slack", "type": "slack", "disableResolveMessage": False,
             "settings": {"url": "$DEEPWATCH_DESK_SLACK_WEBHOOK_URL",
                          "title": "{{ .CommonAnnotations.summary }}", "text": ALERTS_TEXT}},
            {"uid": "deepwatch-desk-email", "type": "email", "disableResolveMessage": True,
             "settings": {"addresses": "$DEEPWATCH_DESK_EMAILS", "singleEmail": True,
                          "subject": "{{ .CommonAnnotations.summary }}", "message": ALERTS_TEXT}},
        ],
    }]


DESK_CONTACT_POINT = "deepwatch-desk"


def notification_policy() -> dict[str, Any]:
    """Desk alerts grouped per picture (one notification thread per cluster),
    re-sent hourly while it keeps spreading; everything else to the same
    receiver as the root default."""
    return {
        "orgId": 1, "receiver": DESK_CONTACT_POINT,
        "group_by": ["grafana_folder", "alertname"],
        "group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h",
        "routes": [{
            "receiver": DESK_CONTACT_POINT,
            "object_matchers": [["team", "=", "factcheck-desk"]],
            "group_by": ["alertname", "cluster_id"],
            "group_wait": "10s", "group_interval": "1m", "repeat_interval": "1h",
        }],
    }


def contact_points_provisioning() -> dict[str, Any]:
    return {"apiVersion": 1, "contactPoints": contact_points()}


def notification_policy_provisioning() -> dict[str, Any]:
    return {"apiVersion": 1, "policies": [notification_policy()]}


def grafana_rule_exprs() -> list[str]:
    return [d["model"]["expr"] for r in desk_rule_group_api()["rules"] for d in r["data"] if "expr" in d["model"]]
