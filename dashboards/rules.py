"""Alert rules: Prometheus rules for operators (the pipeline is unhealthy) and
a Grafana-managed rule for the fact-check desk (deepwatch raised an alert).

Operators page through Prometheus → Alertmanager because those rules must
fire even when Grafana is down; the desk rule lives in Grafana because the
desk already works there and routes it to its own contact points.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import alerting, expr, prometheus
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.alerting import RelativeTimeRange

from dashboards import queries as q
from dashboards.dashboard import DASHBOARD_UID, DATASOURCE_UID

RUNBOOK = "deploy/README.md#"  # one section per alert, anchored by the lower-cased alert name
DEAD_LETTER_RATIO_MAX = 0.2  # a fifth of the input unusable is an upstream or config problem, not noise
STAGE_P95_MAX_S = 5.0  # fetch read timeout is 15 s; a p95 of 5 s means the feed is falling behind
EVENT_TO_ALERT_P95_MAX_S = 60.0


def _rule(name: str, expr_: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name, "expr": expr_, "for": for_,
        "labels": {"severity": severity, "team": "deepwatch-ops"},
        "annotations": {"summary": summary, "description": description, "runbook": f"{RUNBOOK}{name.lower()}"},
    }


def prometheus_rules() -> dict[str, Any]:
    return {"groups": [{
        "name": "deepwatch-operators",
        "interval": "30s",
        "rules": [
            _rule("DeepwatchDeadLetterRatioHigh", f"{q.dead_letter_ratio('10m')} > {DEAD_LETTER_RATIO_MAX}", "10m", "warning",
                  "More than {{ $value | humanizePercentage }} of incoming events are dead-lettered",
                  "Check `deepwatch dead-letters` for the dominant stage/reason: a feed format change, "
                  "a blocked CDN or a wrong image root usually explains it."),
            _rule("DeepwatchNoEventsProcessed",
                  f"({q.events_arriving('5m')}) and on() ({q.events_processed('5m')} == 0)", "10m", "critical",
                  "Events arrive on deepwatch.events but no worker has processed any for 10 minutes",
                  "Pipeline workers are stuck, crash-looping or not assigned partitions; check worker logs "
                  "and consumer group lag."),
            _rule("DeepwatchWorkerDown", q.WORKERS_DOWN, "5m", "critical",
                  "deepwatch worker {{ $labels.instance }} is not answering /metrics",
                  "The worker process is down or its metrics port is unreachable."),
            _rule("DeepwatchWebhookFailures", q.WEBHOOK_FAILURES_15M, "5m", "warning",
                  "Webhook deliveries to alert subscribers are failing",
                  "Deliveries gave up after retries; subscribers are missing alerts. Check the receiver, "
                  "its TLS and the HMAC secret."),
            _rule("DeepwatchStageLatencyHigh", f"{q.stage_quantile(0.95, '5m')} > {STAGE_P95_MAX_S}", "10m", "warning",
                  "p95 latency of stage {{ $labels.stage }} is {{ $value | humanizeDuration }}",
                  "Slow image hosts (fetch), oversized images (analyze) or a saturated cluster worker."),
            _rule("DeepwatchEventToAlertLatencyHigh",
                  f"{q.event_to_alert_quantile(0.95, '15m')} > {EVENT_TO_ALERT_P95_MAX_S}", "15m", "warning",
                  "Alerts reach the desk {{ $value | humanizeDuration }} after the triggering post (p95)",
                  "The desk learns about viral fakes late; look at consumer lag and stage latency."),
        ],
    }]}


# -- Grafana-managed rule for the fact-check desk -------------------------------
DESK_FOLDER_UID = "deepwatch"
DESK_FOLDER_TITLE = "deepwatch"
DESK_GROUP = "deepwatch-desk"


def desk_rule_group() -> alerting.RuleGroup:
    window = RelativeTimeRange(from_val=600, to=0)  # seconds, as Grafana's API wants
    ds = {"type": "prometheus", "uid": DATASOURCE_UID}
    return (
        alerting.RuleGroup(DESK_GROUP).folder_uid(DESK_FOLDER_UID).interval(60)
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


def grafana_rule_exprs() -> list[str]:
    return [d["model"]["expr"] for r in desk_rule_group_api()["rules"] for d in r["data"] if "expr" in d["model"]]
