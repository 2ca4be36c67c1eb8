"""PromQL shared by the dashboard panels and the alert rules.

One place for every expression so a panel and the rule that pages on the same
signal cannot drift apart. Metric names come from ``streams/metrics.py`` (a
contract, checked by tests/test_dashboards.py); the only metrics from elsewhere
are listed in ``EXTERNAL_METRICS`` with the exporter that provides them.
"""

from __future__ import annotations

# Metrics that deepwatch does not export itself. The "no events processed while
# events arrive" rule needs to see arrivals, which only the broker knows.
EXTERNAL_METRICS = {
    "up": "Prometheus itself (scrape health of every target)",
    "kafka_topic_partition_current_offset": "kafka-exporter (deploy/compose.yaml service `kafka-exporter`)",
    "kafka_consumergroup_lag_sum": "kafka-exporter: messages each consumer group has not yet read, per topic",
    "kafka_consumergroup_members": "kafka-exporter: members of each consumer group (0: nobody reads for it)",
    "ALERTS": "Prometheus itself: the alerts its rules hold (DeepwatchConsumerLagGrowing steps aside for its causes)",
}

JOB = 'job="deepwatch"'  # scrape job of the pipeline/detect workers (deploy/prometheus/prometheus.yml)
EVENTS_TOPIC = "deepwatch.events"  # settings.topic("events") with the default topic_prefix

# Stages where an incoming event either leaves analysis as a sighting or is
# dead-lettered; counting these gives "events that entered the pipeline".
# Every stage streams/stage.py names in a dead letter (AnalyzeStage._stage):
# "dedupe" is where an event id already taken by another picture, or a
# findings store that cannot answer the lookup, ends an event; "blob" where the
# data dir cannot store the picture. ("hash" is a DeadLetterStage the records
# allow; harmless to match.)
INGRESS_DEAD_STAGES = "validate|fetch|decode|hash|blob|dedupe"


# How far back counted() looks for a series' value at the start of its window.
# Range selectors skip staleness markers, so one failed scrape (or a short
# outage) at the window's start no longer makes a series look newborn; only a
# series with no sample at all in this lookback does. 1h, not Prometheus' 5m
# lookback delta: a worker unreachable for 5-60 minutes (network, a stuck
# scrape) then counted its whole lifetime once, falsely firing the 0m rules
# and the desk's "raised N alerts". The cost of a long lookback is small: a
# worker restarted inside it reads lower than before (counted from its
# restart, below), and only one that exceeded its old total within the hour
# is undercounted by that total.
COUNTED_LOOKBACK = "1h"


def counted(selector: str, window: str) -> str:
    """How much the counters of ``selector`` went up in the last ``window``,
    exactly, counting series born inside it.

    ``increase()`` needs two samples of a series: prometheus_client creates a
    labelled counter's series at its first ``inc()``, so the first scrape
    already reads 1 and ``increase()`` never sees that first alert (webhook
    failure, verdict...) of a worker process. Here a series with no sample in
    the ``COUNTED_LOOKBACK`` before ``window`` ago counts with its whole value,
    a series that went down (a restarted worker) with its value since the
    restart, any other by its difference from its last sample before the
    window. Differences of raw values telescope: bars of
    ``counted(x, "$__interval")`` at step ``$__interval`` add up to the true
    total, where ``increase`` over the wider ``$__rate_interval`` counted each
    event in several bars.

    ``last_over_time(x[lookback] offset window)``, not ``x offset window``: an
    instant selector stops at a staleness marker, which Prometheus writes at
    every failed scrape, so for one scrape interval after a single failed
    scrape (not only after a gap of 5 minutes) the old expression read the
    series as absent and counted its whole lifetime. Range selectors skip
    staleness markers. Caveat: a series with no sample in the lookback (a
    worker unreachable for longer) still looks newborn once.
    """
    return (f"((({selector} - last_over_time({selector}[{COUNTED_LOOKBACK}] offset {window})) >= 0) "
            f"or {selector})")


def summed_rate(selector: str, window: str) -> str:
    """The per-second rate of ``selector``'s counters over ``window``, all series summed."""
    return f"sum(rate({selector}[{window}]))"


# -- dashboard panels ($__rate_interval is Grafana's; rules use fixed windows) --
EVENTS_RATE = "sum by (stage, outcome) (rate(deepwatch_events_total[$__rate_interval]))"
DEAD_LETTERS_RATE = "sum by (stage, reason) (rate(deepwatch_dead_letters_total[$__rate_interval]))"
INGEST_LINES_RATE = 'sum by (token, outcome) (rate(deepwatch_ingest_lines_total{job="deepwatch-ingest"}[$__rate_interval]))'
# The gauge is set only by the worker that owns the single cluster-ops
# partition; others report 0 (or a stale value right after a rebalance), so max
# is the honest aggregate.
CLUSTERS = "max(deepwatch_clusters)"
CLUSTER_MEMBERS = "max(deepwatch_cluster_members)"
ALERTS_IN_RANGE = f"sum by (level) ({counted('deepwatch_alerts_total', '$__range')})"
# Per-bar counts of rare events: one bar per $__interval step, each event in one bar.
ALERTS_RATE = f"sum by (level) ({counted('deepwatch_alerts_total', '$__interval')})"
SINK_ITEMS_RATE = "sum by (index, outcome) (rate(deepwatch_sink_items_total[$__rate_interval]))"
SINK_BEHIND = "max(deepwatch_sink_behind_seconds)"
# Seconds since each worker's event loop last beat (streams/metrics.py: /healthz answers 503 after
# LIVENESS_S); 0 = no heartbeat yet (starting, or a process without one), left out.
LOOP_SILENCE = f"time() - (deepwatch_loop_heartbeat_timestamp_seconds{{{JOB}}} > 0)"
OFFSET_REREADS = f"sum by (topic, why) ({counted('deepwatch_offset_rereads_total', '$__interval')})"
WEBHOOKS_BY_OUTCOME = f"sum by (outcome) ({counted('deepwatch_webhook_deliveries_total', '$__interval')})"
HOST_PAUSES = f"sum({counted('deepwatch_fetch_host_pauses_total', '$__interval')})"
# How long each worker has held pictures its blob store could not write (disk full, quota, EIO, read-only).
BLOB_HELD = f"max by (instance, job, role) (deepwatch_blob_store_held_seconds{{{JOB}}})"
BLOB_WRITE_FAILURES = f"sum by (instance, job, role) ({counted(f'deepwatch_blob_write_failures_total{{{JOB}}}', '$__interval')})"
# How long each worker has held events whose duplicate lookup the findings store could not answer.
LOOKUP_HELD = f"max by (instance, job, role) (deepwatch_findings_lookup_held_seconds{{{JOB}}})"
LOOKUP_FAILURES = (f"sum by (instance, job, role) "
                   f"({counted(f'deepwatch_findings_lookup_failures_total{{{JOB}}}', '$__interval')})")


def stage_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (stage, le) (rate(deepwatch_stage_seconds_bucket[{window}])))"


def stage_lag_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (stage, le) (rate(deepwatch_stage_lag_seconds_bucket[{window}])))"


def event_to_alert_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (le) (rate(deepwatch_event_to_alert_seconds_bucket[{window}])))"


# -- alert rules --------------------------------------------------------------
# Lines the HTTP ingest endpoint refused at the door (schema, a private or
# unfetchable URL): it sends them to the dead-letter topic itself, so no worker
# counts them in deepwatch_dead_letters_total.
REFUSED_AT_INGEST = 'deepwatch_ingest_lines_total{job="deepwatch-ingest",outcome="dead_lettered"}'


_DEAD_LETTERS = f'deepwatch_dead_letters_total{{stage=~"{INGRESS_DEAD_STAGES}"}}'
# every event that leaves analysis without a dead letter: ok (a new sighting) or duplicate (an
# event id seen before: a re-sent feed, a producer retry), both came in and were usable; the
# analyze stage counts no other outcome (its dead letters are counted by the stage they end in)
_ANALYSED = 'deepwatch_events_total{stage="analyze",outcome=~"ok|duplicate"}'


def _dead_letters_rate(window: str) -> str:
    # `or vector(0)`: a counter with no series yet (no dead letters since the
    # worker started) must read as zero, not make the whole ratio vanish.
    return "(" + " + ".join(f"({summed_rate(s, window)} or vector(0))" for s in (_DEAD_LETTERS, REFUSED_AT_INGEST)) + ")"


def incoming_events_rate(window: str = "10m") -> str:
    """Events per second that came in and left analysis, dead-lettered or not:
    what the dead-letter ratio divides by."""
    return f"({_dead_letters_rate(window)} + ({summed_rate(_ANALYSED, window)} or vector(0)))"


def dead_letter_ratio(window: str = "10m") -> str:
    return f"{_dead_letters_rate(window)} / clamp_min({incoming_events_rate(window)}, 1e-9)"


def events_offsets(topic: str = EVENTS_TOPIC) -> str:
    """What DeepwatchNoEventsProcessed compares the workers with: without these offsets (no
    exporter, a scrape job under another name that lost them, a wrong topic) it cannot fire."""
    return f'kafka_topic_partition_current_offset{{topic="{topic}"}}'


def events_arriving(window: str = "5m", topic: str = EVENTS_TOPIC) -> str:
    # The offset is kafka-exporter's gauge, not a counter: delta(), not rate(). rate() read a
    # drop (the topic deleted and created again, its offsets back at 0) as a counter reset and
    # counted the old offset as new arrivals; partitions whose offsets went down are left out.
    return f"sum(delta({events_offsets(topic)}[{window}]) > 0) > 0"


def kafka_exporter_blind(topic: str = EVENTS_TOPIC) -> str:
    # One alert per cause: an exporter that is down has no offsets either.
    return f'up{{job="kafka"}} == 0 or (absent({events_offsets(topic)}) unless on() up{{job="kafka"}} == 0)'


def events_processed(window: str = "5m") -> str:
    return f'(sum(rate(deepwatch_events_total{{stage=~"{INGRESS_DEAD_STAGES}|analyze"}}[{window}])) or vector(0))'


def alerts_timed_rate(window: str = "15m") -> str:
    """Alerts per second whose event-to-alert time was observed: what event_to_alert_slower_than divides by."""
    return f"({summed_rate('deepwatch_event_to_alert_seconds_count', window)} or vector(0))"


def stage_rate(window: str = "5m") -> str:
    """Observations per second of each stage's latency: how many samples its quantile stands on
    (the +Inf bucket counts every one, as _count does, from the series the quantile reads)."""
    return f'sum by (stage) (rate(deepwatch_stage_seconds_bucket{{le="+Inf"}}[{window}]))'


def event_to_alert_slower_than(bound: str, window: str = "15m") -> str:
    """Share of alerts stored more than ``bound`` seconds after their event.
    ``bound`` must be a bucket boundary of deepwatch_event_to_alert_seconds:
    "p95 > 60 s" is "more than 5 % above 60 s", read exactly off the 60 s
    bucket (a quantile interpolates inside a bucket; and while 60 s was the
    largest finite bucket, histogram_quantile() never answered more). Prometheus 3
    and protobuf scrapes write le="60.0", Prometheus 2 text scrapes le="60"."""
    total = f"sum(rate(deepwatch_event_to_alert_seconds_count[{window}]))"
    within = f'sum(rate(deepwatch_event_to_alert_seconds_bucket{{le=~"{bound}|{bound}.0"}}[{window}]))'
    return f"({total} - {within}) / {total}"


# Failed (gave up after retries; redelivery counts each round that fails again, so a
# receiver that stays down keeps this firing) or rejected (refused for good: 401/403/404/410,
# a redirect; not retried on its own): either way a subscriber is missing alerts.
_WEBHOOK_UNDELIVERED = 'deepwatch_webhook_deliveries_total{outcome=~"failed|rejected"}'
WEBHOOK_FAILURES_15M = f"sum({counted(_WEBHOOK_UNDELIVERED, '15m')}) > 0"
# Deliveries not delivered, per target and status (queued | failed | rejected). Every
# worker exports the same numbers from the findings store: max, not sum.
WEBHOOK_UNDELIVERED = "max by (target, status) (deepwatch_webhook_undelivered)"
# Alerts a target still owes its subscriber: rejected ones wait for an operator,
# failed ones for a redelivery that keeps failing. The failures rule above counts
# attempts over 15 minutes, so it resolved while a rejected delivery waited on.
WEBHOOK_OWED = ('sum by (target) (max by (target, status) '
                '(deepwatch_webhook_undelivered{status=~"failed|rejected"})) > 0')
ALERTS_RAISED_5M = f"sum({counted('deepwatch_alerts_total', '5m')})"
WORKERS_DOWN = f"up{{{JOB}}} == 0"
# No worker target at all: DNS or pod discovery finds none once every replica
# is gone, and then there is no `up` series to be 0.
NO_WORKERS = f"absent(up{{{JOB}}})"
# A worker whose process answers /metrics while its event loop has stopped
# beating (streams.metrics.LIVENESS_S; its /healthz already answers 503).
WORKER_LOOP_SILENCE = f"time() - max by (instance, job, role) (deepwatch_loop_heartbeat_timestamp_seconds{{{JOB}}} > 0)"


def server_loop_silence(job: str) -> str:
    """The same for the desk or the ingest endpoint (``job``): each beats from
    its own event loop (``streams.metrics.beat_forever``) while its metrics
    port answers from a thread, so ``up`` stays 1 over a stalled server."""
    return f"time() - max by (instance, job) (deepwatch_loop_heartbeat_timestamp_seconds{{{job}}} > 0)"


SINK_BEHIND_MAX = "max(deepwatch_sink_behind_seconds)"
# per worker, with the labels that say which one (the desk and ingest processes export these at 0: not workers)
BLOB_HELD_MAX = BLOB_HELD
LOOKUP_HELD_MAX = LOOKUP_HELD
HOST_PAUSES_15M = f"sum({counted('deepwatch_fetch_host_pauses_total', '15m')}) > 0"
# Model requests (the cluster stage's) against the detect role's answers (one
# observation of its stage latency each). With no detect worker at all its
# series is absent: read as 0, or the rule could never fire for that case.
MODEL_REQUESTS_RATE = f"sum({counted('deepwatch_model_requests_total', '$__interval')})"
_MODEL_ANSWERS = 'deepwatch_stage_seconds_count{stage="detect"}'
MODEL_ANSWERS_RATE = f"sum({counted(_MODEL_ANSWERS, '$__interval')})"
MODEL_RESULTS_OVERDUE = (f"(sum({counted('deepwatch_model_requests_total', '15m')}) > 0) and on() "
                         f"((sum({counted(_MODEL_ANSWERS, '15m')}) or on() vector(0)) == 0)")


# -- the desk (deepwatch serve; its own scrape job, deploy/prometheus/prometheus.yml)
DESK_JOB = 'job="deepwatch-desk"'
DESK_DOWN = f"up{{{DESK_JOB}}} == 0"
# No desk target at all (every replica gone, or discovery finds none): no `up` series left to be 0.
NO_DESK = f"absent(up{{{DESK_JOB}}})"
DESK_REQUESTS_RATE = ('sum by (route, status) (rate(deepwatch_desk_requests_total[$__rate_interval]))')
DESK_VERDICTS = f"sum by (verdict) ({counted('deepwatch_desk_verdicts_total', '$__interval')})"
DESK_LOGINS = f"sum by (outcome) ({counted('deepwatch_desk_logins_total', '$__interval')})"
DESK_LOOKUPS = f"sum by (outcome) ({counted('deepwatch_desk_lookups_total', '$__interval')})"


def desk_request_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (route, le) (rate(deepwatch_desk_request_seconds_bucket[{window}])))"


# The desk's readiness probes (k8s/base/desk.yaml, every 10 s; compose's healthcheck) call
# /healthz on the desk's own port: always 200, the findings store never asked. Counted as desk
# requests they diluted the error ratio (three replicas' probes hid a desk failing every page for
# its one user) and were enough traffic on their own to clear any floor.
_DESK_REQUESTS = 'deepwatch_desk_requests_total{route!="/healthz"}'
_DESK_ERRORS = 'deepwatch_desk_requests_total{route!="/healthz",status=~"5.."}'


def desk_requests_rate(window: str = "10m") -> str:
    """Requests per second people and API clients sent the desk (probes left out)."""
    return f"({summed_rate(_DESK_REQUESTS, window)} or vector(0))"


def desk_error_ratio(window: str = "10m") -> str:
    """Share of desk requests answered 5xx (a broken findings store shows here
    first), probes left out; no requests reads as no errors."""
    errors = f"({summed_rate(_DESK_ERRORS, window)} or vector(0))"
    return f"{errors} / clamp_min({summed_rate(_DESK_REQUESTS, window)}, 1e-9)"


# -- the HTTP ingest endpoint (deepwatch serve-ingest; its own scrape job, deploy/prometheus/prometheus.yml)
INGEST_JOB = 'job="deepwatch-ingest"'
INGEST_DOWN = f"up{{{INGEST_JOB}}} == 0"
# No ingest endpoint answering: every replica gone, discovery finds none, or every one
# discovered is down (`== 1`: replicas crash-looping are still discovered, so `up` reads 0
# there and a bare absent() stayed quiet while DeepwatchIngestDown, a warning, was all). Both
# branches keep the job label.
NO_INGEST = f"(sum by (job) (up{{{INGEST_JOB}}}) == 0) or absent(up{{{INGEST_JOB}}})"
# Requests that reached the hand-over to the broker (or were refused for the
# buffer budget on the way): 202 accepted, 503 busy or broker_unavailable.
# 401/413/429... are the client's doing and left out. The 202 and 503 series
# exist at 0 from the start for every token name (streams/ingest_server.py).
_INGEST_HANDED = f'deepwatch_ingest_requests_total{{{INGEST_JOB},status=~"202|503"}}'
_INGEST_503 = f'deepwatch_ingest_requests_total{{{INGEST_JOB},status="503"}}'
_INGEST_BROKER_FAILED = f"deepwatch_ingest_broker_failures_total{{{INGEST_JOB}}}"
_INGEST_BROKER_UNAVAILABLE = f'deepwatch_ingest_broker_failures_total{{{INGEST_JOB},cause="unavailable"}}'


def ingest_requests_rate(window: str = "10m") -> str:
    """Requests per second that reached the hand-over (202 + 503): what the ingest ratios divide by."""
    return f"({summed_rate(_INGEST_HANDED, window)} or vector(0))"


def ingest_broker_failure_ratio(window: str = "10m") -> str:
    """Share of ingest requests answered 503 broker_unavailable because the
    broker was down, unreachable or slow (a missing topic has its own rule);
    no requests: no answer (nothing to alert on)."""
    failed = f"({summed_rate(_INGEST_BROKER_UNAVAILABLE, window)} or vector(0))"
    return f"{failed} / clamp_min({summed_rate(_INGEST_HANDED, window)}, 1e-9)"


def ingest_busy_ratio(window: str = "10m") -> str:
    """Share of ingest requests answered 503 busy (the buffer budget full):
    the 503s that were not the broker's."""
    refused = f"({summed_rate(_INGEST_503, window)} or vector(0))"
    failed = f"({summed_rate(_INGEST_BROKER_FAILED, window)} or vector(0))"
    return f"clamp_min({refused} - {failed}, 0) / clamp_min({summed_rate(_INGEST_HANDED, window)}, 1e-9)"


# Bytes of request bodies each endpoint holds, against connectors.ingest_max_buffered_bytes
# (DeepwatchIngestBusy fires when it is full).
INGEST_BUFFERED_BYTES = f"max by (instance) (deepwatch_ingest_buffered_bytes{{{INGEST_JOB}}})"


INGEST_REQUESTS_RATE = f"sum by (token, status) (rate(deepwatch_ingest_requests_total{{{INGEST_JOB}}}[$__rate_interval]))"
INGEST_BROKER_REFUSALS = (f"sum by (cause) "
                          f"({counted(f'deepwatch_ingest_broker_failures_total{{{INGEST_JOB}}}', '$__interval')})")


def ingest_request_quantile(q: float, window: str = "$__rate_interval") -> str:
    """Per status class (2xx, 4xx, 5xx): a slow 503 is not a slow 202."""
    return (f"histogram_quantile({q}, sum by (class, le) "
            f"(rate(deepwatch_ingest_request_seconds_bucket{{{INGEST_JOB}}}[{window}])))")


# Refused because the events or dead-letter topic does not exist (auto-creation off, no worker nor
# `serve-ingest --create-topics` has created it): never cures itself.
_INGEST_TOPIC_MISSING = f'deepwatch_ingest_broker_failures_total{{{INGEST_JOB},cause="topic_missing"}}'
INGEST_TOPIC_MISSING_5M = f"sum({counted(_INGEST_TOPIC_MISSING, '5m')}) > 0"


# -- live platform connectors (deepwatch connect bluesky|mastodon --metrics-port N; scraped as their own job,
# deploy/README.md "Connectors"). Their series exist only in connector processes: no job filter needed.
CONNECTOR_FRAMES_RATE = "sum by (connector, outcome) (rate(deepwatch_connector_frames_total[$__rate_interval]))"
CONNECTOR_EVENTS_RATE = "sum by (connector, outcome) (rate(deepwatch_connector_events_total[$__rate_interval]))"
CONNECTOR_RECONNECTS = f"sum by (connector, reason) ({counted('deepwatch_connector_reconnects_total', '$__interval')})"
CONNECTOR_RATE_LIMIT_WAITS = f"sum by (connector) ({counted('deepwatch_connector_rate_limit_waits_total', '$__interval')})"
# Frames whose position lay further in the future than a clock's skew explains: the cursor was not moved to them.
CONNECTOR_CURSOR_AHEAD = f"sum by (connector) ({counted('deepwatch_connector_cursor_ahead_total', '$__interval')})"
# Bluesky DID -> handle resolutions by how they ended (streams.connectors.atproto_identity).
CONNECTOR_HANDLE_RESOLUTIONS = (f"sum by (outcome) "
                                f"({counted('deepwatch_connector_handle_resolutions_total', '$__interval')})")
# How far behind the platform each stream's saved cursor is (a restart resumes from there); per stream:
# a Mastodon connector follows one stream per hashtag.
CONNECTOR_CURSOR_LAG = "max by (connector, stream, instance) (deepwatch_connector_cursor_lag_seconds)"


# -- scrape targets and consumer lag (what the "down" and "stuck" pages send an operator to look at)
# Each scrape job the rules page on (DeepwatchWorkerDown, DeskDown, IngestDown, the No* rules,
# DeepwatchKafkaExporterDown): targets answering, against targets discovered.
TARGET_JOBS = "deepwatch|deepwatch-desk|deepwatch-ingest|kafka"
TARGETS_UP = f'sum by (job) (up{{job=~"{TARGET_JOBS}"}})'
TARGETS_DISCOVERED = f'count by (job) (up{{job=~"{TARGET_JOBS}"}})'
# Messages each consumer group has not read yet, per topic (kafka-exporter): where a backlog waits,
# whose growth DeepwatchNoEventsProcessed (nothing read) and the latency rules (read slowly) page on.
CONSUMER_LAG = "kafka_consumergroup_lag_sum"  # per consumergroup and topic, all partitions together


def deepwatch_topics(topic_prefix: str) -> str:
    """A label matcher for the topics of one deployment, ``<topic_prefix>.<name>`` (streams.topics):
    not the Faust-internal ones (changelog, assignor leader), nor another deployment's on a shared
    broker. ``[.]``: a literal dot without a backslash to escape twice (PromQL string, then regex)."""
    return f'topic=~"{topic_prefix.replace(".", "[.]")}[.].+"'


def consumer_lag_growing(topic_prefix: str, min_messages: int, window: str, explained_by: tuple[str, ...]) -> str:
    """Per consumer group and topic: a backlog of more than ``min_messages`` that
    grew over ``window`` (the slope of a least-squares fit, so one scrape's jump
    is no trend). An idle topic's lag does not grow, whatever its size. Left
    out for a group the exporter reports without members (nobody reads for it:
    its workers gone, which the worker rules page on, or a group no role uses
    any more, whose committed offsets Kafka keeps for days), and while one of
    ``explained_by`` fires: those alerts already page for why the group reads
    slowly or not at all, and the backlog is their symptom."""
    lag = f"{CONSUMER_LAG}{{{deepwatch_topics(topic_prefix)}}}"
    causes = "|".join(explained_by)
    return (f"(max by (consumergroup, topic) ({lag}) > {min_messages}) "
            f"and on (consumergroup, topic) (max by (consumergroup, topic) (deriv({lag}[{window}])) > 0) "
            f"unless on (consumergroup) (max by (consumergroup) (kafka_consumergroup_members) == 0) "
            f'unless on () ALERTS{{alertstate="firing",alertname=~"{causes}"}}')


def connector_falling_behind(max_lag_s: int, window: str) -> str:
    """Per connector stream: a saved cursor more than ``max_lag_s`` behind live
    whose lag grew over ``window`` while its connector read frames. A stream
    that reads nothing also grows its lag (a quiet Mastodon hashtag: the
    cursor stays at its last post), so frames must be arriving: the connector
    reads but does not keep up, or its checkpoints fail and it reads the same
    window again. Frames are counted per stream: a quiet hashtag run by the
    same connector process as a busy timeline reads nothing of its own."""
    frames = f"sum by (connector, stream, instance) (rate(deepwatch_connector_frames_total[{window}]))"
    return (f"({CONNECTOR_CURSOR_LAG} > {max_lag_s}) "
            f"and on (connector, stream, instance) "
            f"(max by (connector, stream, instance) (deriv(deepwatch_connector_cursor_lag_seconds[{window}])) > 0) "
            f"and on (connector, stream, instance) ({frames} > 0)")
