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
}

JOB = 'job="deepwatch"'  # scrape job of the pipeline/detect workers (deploy/prometheus/prometheus.yml)
EVENTS_TOPIC = "deepwatch.events"  # settings.topic("events") with the default topic_prefix

# Stages where an incoming event either leaves analysis as a sighting or is
# dead-lettered; counting these gives "events that entered the pipeline".
INGRESS_DEAD_STAGES = "validate|fetch|decode|hash"

# -- dashboard panels ($__rate_interval is Grafana's; rules use fixed windows) --
EVENTS_RATE = "sum by (stage, outcome) (rate(deepwatch_events_total[$__rate_interval]))"
DEAD_LETTERS_RATE = "sum by (stage, reason) (rate(deepwatch_dead_letters_total[$__rate_interval]))"
# The gauge is set only by the worker that owns the single cluster-ops
# partition; others report 0 (or a stale value right after a rebalance), so max
# is the honest aggregate.
CLUSTERS = "max(deepwatch_clusters)"
CLUSTER_MEMBERS = "max(deepwatch_cluster_members)"
ALERTS_IN_RANGE = "sum by (level) (increase(deepwatch_alerts_total[$__range]))"
ALERTS_RATE = "sum by (level) (increase(deepwatch_alerts_total[$__rate_interval]))"
SINK_ITEMS_RATE = "sum by (index, outcome) (rate(deepwatch_sink_items_total[$__rate_interval]))"
SINK_BEHIND = "max(deepwatch_sink_behind_seconds)"
OFFSET_REREADS = "sum by (topic, why) (increase(deepwatch_offset_rereads_total[$__rate_interval]))"
WEBHOOKS_BY_OUTCOME = "sum by (outcome) (increase(deepwatch_webhook_deliveries_total[$__rate_interval]))"


def stage_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (stage, le) (rate(deepwatch_stage_seconds_bucket[{window}])))"


def stage_lag_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (stage, le) (rate(deepwatch_stage_lag_seconds_bucket[{window}])))"


def event_to_alert_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (le) (rate(deepwatch_event_to_alert_seconds_bucket[{window}])))"


# -- alert rules --------------------------------------------------------------
def dead_letter_ratio(window: str = "10m") -> str:
    # `or vector(0)`: a counter with no series yet (no dead letters since the
    # worker started) must read as zero, not make the whole ratio vanish.
    dead = f'(sum(rate(deepwatch_dead_letters_total{{stage=~"{INGRESS_DEAD_STAGES}"}}[{window}])) or vector(0))'
    ok = f'(sum(rate(deepwatch_events_total{{stage="analyze",outcome="ok"}}[{window}])) or vector(0))'
    return f"{dead} / clamp_min({dead} + {ok}, 1e-9)"


def events_arriving(window: str = "5m") -> str:
    return f'sum(rate(kafka_topic_partition_current_offset{{topic="{EVENTS_TOPIC}"}}[{window}])) > 0'


def events_processed(window: str = "5m") -> str:
    return f'(sum(rate(deepwatch_events_total{{stage=~"validate|fetch|decode|analyze"}}[{window}])) or vector(0))'


WEBHOOK_FAILURES_15M = 'sum(increase(deepwatch_webhook_deliveries_total{outcome="failed"}[15m])) > 0'
ALERTS_RAISED_5M = "sum(increase(deepwatch_alerts_total[5m]))"
WORKERS_DOWN = f"up{{{JOB}}} == 0"


SINK_BEHIND_MAX = "max(deepwatch_sink_behind_seconds)"


# -- the desk (deepwatch serve; its own scrape job, deploy/prometheus/prometheus.yml)
DESK_JOB = 'job="deepwatch-desk"'
DESK_DOWN = f"up{{{DESK_JOB}}} == 0"
DESK_REQUESTS_RATE = ('sum by (route, status) (rate(deepwatch_desk_requests_total[$__rate_interval]))')
DESK_VERDICTS = "sum by (verdict) (increase(deepwatch_desk_verdicts_total[$__rate_interval]))"
DESK_LOGINS = "sum by (outcome) (increase(deepwatch_desk_logins_total[$__rate_interval]))"


def desk_request_quantile(q: float, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by (route, le) (rate(deepwatch_desk_request_seconds_bucket[{window}])))"


def desk_error_ratio(window: str = "10m") -> str:
    """Share of desk requests answered 5xx (a broken findings store shows here
    first); no requests reads as no errors."""
    errors = f'(sum(rate(deepwatch_desk_requests_total{{status=~"5.."}}[{window}])) or vector(0))'
    every = f"sum(rate(deepwatch_desk_requests_total[{window}]))"
    return f"{errors} / clamp_min({every}, 1e-9)"
