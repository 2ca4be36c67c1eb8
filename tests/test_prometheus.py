"""Prometheus: the rules load and fire when they should (promtool), and a real
pipeline worker's /metrics agrees with the feed it processed and can be
scraped and queried by a real Prometheus.

promtool/prometheus come from Debian's `prometheus` package (.ci/install-prometheus.sh);
without them those parts skip with the reason, the direct /metrics checks still run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dashboards import build, rules
from tests.alertmanager_support import alertmanager, wait_for  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus)")


@pytest.fixture
def generated(tmp_path) -> Path:
    build.write(tmp_path / "gen")
    return tmp_path / "gen"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"promtool {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


# -- static checks ---------------------------------------------------------------
@needs_promtool
def test_promtool_checks_generated_rules(generated):
    out = _promtool("check", "rules", str(generated / "prometheus" / "deepwatch-rules.yaml"))
    n = sum(len(g["rules"]) for g in rules.prometheus_rules()["groups"])
    assert f"SUCCESS: {n} rules found" in out.stdout


@needs_promtool
def test_promtool_checks_deploy_prometheus_config(generated, tmp_path):
    # The compose config names the in-container rule path; point it at ours.
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(generated / "prometheus" / "deepwatch-rules.yaml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    _promtool("check", "config", str(path))


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not on PATH (apt-get install prometheus-alertmanager)")
def test_amtool_checks_alertmanager_config():
    res = subprocess.run(["amtool", "check-config", str(REPO / "deploy" / "alertmanager" / "alertmanager.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(60)
def test_a_dead_worker_inhibits_the_no_events_alert_of_its_own_deployment_only(alertmanager):
    """Two deployments (each Prometheus with its own ``deployment`` external
    label, deploy/prometheus/prometheus.yml) share the deploy Alertmanager:
    a's dead worker silences a's DeepwatchNoEventsProcessed, never b's. The
    alerts carry what the rules and the scrape config give them. Without
    ``equal`` in the inhibit rule, b's was inhibited too."""
    from datetime import datetime, timedelta, timezone

    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    external = prom["global"]["external_labels"]
    am_cfg = yaml.safe_load((REPO / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    [inhibit] = [r for r in am_cfg["inhibit_rules"] if "DeepwatchNoEventsProcessed" in str(r["target_matchers"])]
    for rule in am_cfg["inhibit_rules"]:
        assert rule.get("equal") and set(rule["equal"]) <= set(external), "matches on labels every alert carries"
    scrape = {"job": "deepwatch", "instance": "pipeline-1:9400", "role": "pipeline"}  # DeepwatchWorkerDown keeps them

    def alert(name: str, deployment: str, **extra: str) -> dict:
        labels = {**_rule(name)["labels"], **external, "deployment": deployment, "alertname": name, **extra}
        now = datetime.now(timezone.utc)
        return {"labels": labels, "startsAt": (now - timedelta(minutes=1)).isoformat(),
                "endsAt": (now + timedelta(hours=1)).isoformat()}

    sent = [alert("DeepwatchWorkerDown", "a", **scrape), alert("DeepwatchNoEventsProcessed", "a"),
            alert("DeepwatchNoEventsProcessed", "b")]
    assert httpx.post(f"{alertmanager}/alerts", json=sent, timeout=5).status_code == 200

    def settled():
        got = {(a["labels"]["alertname"], a["labels"]["deployment"]): a["status"]
               for a in httpx.get(f"{alertmanager}/alerts", timeout=5).json()}
        return got if len(got) == 3 and got[("DeepwatchNoEventsProcessed", "a")]["inhibitedBy"] else None

    got = wait_for(settled, "DeepwatchWorkerDown did not inhibit DeepwatchNoEventsProcessed")
    assert got[("DeepwatchNoEventsProcessed", "b")] == {"state": "active", "inhibitedBy": [], "silencedBy": []}
    assert got[("DeepwatchWorkerDown", "a")]["state"] == "active"
    assert got[("DeepwatchNoEventsProcessed", "a")]["state"] == "suppressed"


# -- rule behaviour on synthetic series (promtool test rules) ---------------------
def _rule(name: str) -> dict:
    return next(r for g in rules.prometheus_rules()["groups"] for r in g["rules"] if r["alert"] == name)


def _expected_alert(name: str, labels: dict | None = None, **annotations: str) -> dict:
    r = _rule(name)
    return {"exp_labels": {**r["labels"], **(labels or {})}, "exp_annotations": {**r["annotations"], **annotations}}


@needs_promtool
def test_rules_fire_on_synthetic_series(generated, tmp_path):
    ok = 'deepwatch_events_total{job="deepwatch",instance="w1",stage="analyze",outcome="ok"}'
    cases = {
        "rule_files": [str(generated / "prometheus" / "deepwatch-rules.yaml")],
        "evaluation_interval": "30s",
        "tests": [
            {   # 1 dead letter/s against 3 good events/s: 25 % > 20 %
                "interval": "1m",
                "input_series": [
                    {"series": ok, "values": "0+180x40"},
                    {"series": 'deepwatch_dead_letters_total{job="deepwatch",instance="w1",stage="fetch",reason="blocked_address"}',
                     "values": "0+60x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "DeepwatchDeadLetterRatioHigh", "exp_alerts": []},  # still pending
                    {"eval_time": "30m", "alertname": "DeepwatchDeadLetterRatioHigh", "exp_alerts": [_expected_alert(
                        "DeepwatchDeadLetterRatioHigh",
                        summary="More than 25% of incoming events are dead-lettered")]},
                    {"eval_time": "30m", "alertname": "DeepwatchNoEventsProcessed", "exp_alerts": []},
                ],
            },
            {   # events keep arriving, processing stops after 5 minutes
                "interval": "1m",
                "input_series": [
                    {"series": 'kafka_topic_partition_current_offset{job="kafka",topic="deepwatch.events",partition="0"}',
                     "values": "0+50x40"},
                    {"series": ok, "values": "0+50x5 250x35"},
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "DeepwatchNoEventsProcessed", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "DeepwatchNoEventsProcessed",
                     "exp_alerts": [_expected_alert("DeepwatchNoEventsProcessed")]},
                    {"eval_time": "30m", "alertname": "DeepwatchDeadLetterRatioHigh", "exp_alerts": []},
                ],
            },
            {   # events arrive and no worker ever exported a counter: still an alert
                "interval": "1m",
                "input_series": [
                    {"series": 'kafka_topic_partition_current_offset{job="kafka",topic="deepwatch.events",partition="0"}',
                     "values": "0+50x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchNoEventsProcessed",
                     "exp_alerts": [_expected_alert("DeepwatchNoEventsProcessed")]},
                ],
            },
            {   # nothing arrives, nothing processed: quiet is not an outage
                "interval": "1m",
                "input_series": [
                    {"series": 'kafka_topic_partition_current_offset{job="kafka",topic="deepwatch.events",partition="0"}',
                     "values": "100x40"},
                    {"series": ok, "values": "100x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchNoEventsProcessed", "exp_alerts": []},
                ],
            },
            {   # every fetch lands in the 10 s bucket: p95 > 5 s
                "interval": "1m",
                "input_series": [
                    {"series": f'deepwatch_stage_seconds_bucket{{job="deepwatch",instance="w1",stage="fetch",le="{le}"}}',
                     "values": "0x40" if le in ("0.001", "5") else "0+60x40"}
                    for le in ("0.001", "5", "10", "+Inf")
                ] + [
                    {"series": f'deepwatch_stage_seconds_bucket{{job="deepwatch",instance="w1",stage="cluster",le="{le}"}}',
                     "values": "0+60x40"} for le in ("0.001", "5", "10", "+Inf")
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchStageLatencyHigh", "exp_alerts": [_expected_alert(
                        "DeepwatchStageLatencyHigh", {"stage": "fetch"},
                        summary="p95 latency of stage fetch is 9.75s")]},
                ],
            },
            {   # the findings sink retrying for minutes (Elasticsearch answering 429), then catching up
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_sink_behind_seconds{job="deepwatch",instance="w1"}',
                     "values": "0 30 90 150 210 270 330 390 450 510 0 0 0 0 0 0 0 0"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "DeepwatchFindingsSinkBehind", "exp_alerts": []},  # pending
                    {"eval_time": "9m", "alertname": "DeepwatchFindingsSinkBehind", "exp_alerts": [_expected_alert(
                        "DeepwatchFindingsSinkBehind", summary="The findings sink has been retrying for 8m 30s")]},
                    {"eval_time": "16m", "alertname": "DeepwatchFindingsSinkBehind", "exp_alerts": []},
                ],
            },
            {   # a worker's blob store disk full for minutes (its pictures held, retried), then freed;
                # another worker writing fine; the desk and the ingest endpoint export the gauge at 0
                # (one registry per process): the alert keeps the worker's job and role
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_blob_store_held_seconds{job="deepwatch",instance="w1",role="pipeline"}',
                     "values": "0 0 30 90 150 210 270 330 0 0 0 0"},
                    {"series": 'deepwatch_blob_store_held_seconds{job="deepwatch",instance="w2",role="pipeline"}',
                     "values": "0x12"},
                    {"series": 'deepwatch_blob_store_held_seconds{job="deepwatch-desk",instance="d1"}', "values": "0x12"},
                    {"series": 'deepwatch_blob_store_held_seconds{job="deepwatch-ingest",instance="i1"}', "values": "0x12"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "DeepwatchBlobStoreHeld", "exp_alerts": []},  # pending
                    {"eval_time": "6m", "alertname": "DeepwatchBlobStoreHeld", "exp_alerts": [_expected_alert(
                        "DeepwatchBlobStoreHeld", {"instance": "w1", "job": "deepwatch", "role": "pipeline"},
                        summary="deepwatch worker w1 has held pictures for its blob store for 4m 30s")]},
                    {"eval_time": "10m", "alertname": "DeepwatchBlobStoreHeld", "exp_alerts": []},
                ],
            },
            {   # a worker's findings store locked (or Elasticsearch down) for minutes: its events held
                # for the duplicate lookup, then answered; another worker looking up fine
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_findings_lookup_held_seconds{job="deepwatch",instance="w1",role="analyze"}',
                     "values": "0 0 30 90 150 210 270 330 0 0 0 0"},
                    {"series": 'deepwatch_findings_lookup_held_seconds{job="deepwatch",instance="w2",role="analyze"}',
                     "values": "0x12"},
                    {"series": 'deepwatch_findings_lookup_held_seconds{job="deepwatch-desk",instance="d1"}',
                     "values": "0x12"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "DeepwatchFindingsLookupHeld", "exp_alerts": []},  # pending
                    {"eval_time": "6m", "alertname": "DeepwatchFindingsLookupHeld", "exp_alerts": [_expected_alert(
                        "DeepwatchFindingsLookupHeld", {"instance": "w1", "job": "deepwatch", "role": "analyze"},
                        summary="deepwatch worker w1 has held events for the findings store's duplicate lookup "
                                "for 4m 30s")]},
                    {"eval_time": "10m", "alertname": "DeepwatchFindingsLookupHeld", "exp_alerts": []},
                ],
            },
            {   # the desk answers 1 of 10 requests with a 500 (a findings store gone), then its scrape stops
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_desk_requests_total{job="deepwatch-desk",instance="d1",route="/",method="GET",status="200"}',
                     "values": "0+540x20"},
                    {"series": 'deepwatch_desk_requests_total{job="deepwatch-desk",instance="d1",route="/",method="GET",status="500"}',
                     "values": "0+60x20"},
                    {"series": 'up{job="deepwatch-desk",instance="d1"}', "values": "1x20 0x15"},
                    {"series": 'up{job="deepwatch",instance="w1"}', "values": "1x35"},
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "DeepwatchDeskErrors", "exp_alerts": []},  # pending
                    {"eval_time": "18m", "alertname": "DeepwatchDeskErrors", "exp_alerts": [_expected_alert(
                        "DeepwatchDeskErrors", summary="10% of desk requests fail with a server error")]},
                    {"eval_time": "18m", "alertname": "DeepwatchDeskDown", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "DeepwatchDeskDown", "exp_alerts": [_expected_alert(
                        "DeepwatchDeskDown", {"instance": "d1", "job": "deepwatch-desk"},
                        summary="The fact-check desk d1 is not answering /metrics")]},
                    {"eval_time": "30m", "alertname": "DeepwatchWorkerDown", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "DeepwatchNoDesk", "exp_alerts": []},  # a target reads 0
                ],
            },
            {   # the desk's only replica is gone at 10m (scaled down, crash loop: no `up` series at all)
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="deepwatch-desk",instance="d1"}', "values": "1x10"},
                    {"series": 'up{job="deepwatch",instance="w1"}', "values": "1x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "9m", "alertname": "DeepwatchNoDesk", "exp_alerts": []},
                    {"eval_time": "35m", "alertname": "DeepwatchNoDesk", "exp_alerts": [_expected_alert(
                        "DeepwatchNoDesk", {"job": "deepwatch-desk"}, summary="No fact-check desk is being scraped")]},
                    {"eval_time": "35m", "alertname": "DeepwatchDeskDown", "exp_alerts": []},  # nothing left to read 0
                ],
            },
            {   # a failed webhook delivery
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="failed"}',
                     "values": "0 0 1 1 1 1 1 1 1 1 1 1"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "DeepwatchWebhookFailures",
                     "exp_alerts": [_expected_alert("DeepwatchWebhookFailures")]},
                ],
            },
            {   # every delivery to a subscriber refused for good (403: the two sides' HMAC keys differ):
                # outcome="rejected", never retried; the rule counted only "failed" and stayed quiet
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="failed"}',
                     "values": "0x30"},
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="rejected"}',
                     "values": "0 0 0 6+6x27"},
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="delivered"}',
                     "values": "0x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "DeepwatchWebhookFailures", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "DeepwatchWebhookFailures",
                     "exp_alerts": [_expected_alert("DeepwatchWebhookFailures")]},
                ],
            },
            {   # one burst of rejected deliveries (403) at minute 2, never retried on its own: the failures
                # rule resolved 15 minutes later (a "resolved" notice) while the subscriber was still owed them
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="rejected"}',
                     "values": "0 0 1x90"},
                    {"series": 'deepwatch_webhook_undelivered{job="deepwatch",instance="w1",target="https://hooks.example:443#ab12",status="rejected"}',
                     "values": "0 0 1x60 0x30"},
                    {"series": 'deepwatch_webhook_undelivered{job="deepwatch",instance="w2",target="https://hooks.example:443#ab12",status="rejected"}',
                     "values": "0 0 1x60 0x30"},  # every worker exports the same numbers
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "DeepwatchWebhookDeliveriesOwed", "exp_alerts": []},
                    {"eval_time": "45m", "alertname": "DeepwatchWebhookFailures", "exp_alerts": []},
                    {"eval_time": "45m", "alertname": "DeepwatchWebhookDeliveriesOwed", "exp_alerts": [_expected_alert(
                        "DeepwatchWebhookDeliveriesOwed", {"target": "https://hooks.example:443#ab12"},
                        summary="1 alert(s) not delivered to webhook target https://hooks.example:443#ab12")]},
                    {"eval_time": "70m", "alertname": "DeepwatchWebhookDeliveriesOwed", "exp_alerts": []},  # redelivered
                ],
            },
            {   # a receiver down for an hour: the first delivery fails, then each redelivery round (every
                # minute) fails again and counts, so the alert stays on until the receiver is back
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="failed"}',
                     "values": "0 1+1x60 61x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "50m", "alertname": "DeepwatchWebhookFailures",
                     "exp_alerts": [_expected_alert("DeepwatchWebhookFailures")]},
                    {"eval_time": "85m", "alertname": "DeepwatchWebhookFailures", "exp_alerts": []},
                ],
            },
            {   # a worker paused an image host: warned at once, quiet again 15 minutes later
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_fetch_host_pauses_total{job="deepwatch",instance="w1"}',
                     "values": "0 0 0 1x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "DeepwatchImageHostsPaused", "exp_alerts": []},
                    {"eval_time": "4m", "alertname": "DeepwatchImageHostsPaused",
                     "exp_alerts": [_expected_alert("DeepwatchImageHostsPaused")]},
                    {"eval_time": "25m", "alertname": "DeepwatchImageHostsPaused", "exp_alerts": []},
                ],
            },
            {   # the first failed delivery of a worker: prometheus_client creates the labelled series at
                # its first inc(), so Prometheus never sees it at 0 (increase() read this as no failure)
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="delivered"}',
                     "values": "3x30"},
                    {"series": 'deepwatch_webhook_deliveries_total{job="deepwatch",instance="w1",outcome="failed"}',
                     "values": "_ _ 1x28"},
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "DeepwatchWebhookFailures", "exp_alerts": []},  # pending
                    {"eval_time": "10m", "alertname": "DeepwatchWebhookFailures",
                     "exp_alerts": [_expected_alert("DeepwatchWebhookFailures")]},
                    {"eval_time": "25m", "alertname": "DeepwatchWebhookFailures", "exp_alerts": []},  # 15 min later
                ],
            },
            {   # every alert stored minutes after its event: p95 > 60 s, while histogram_quantile() never reads
                # more than the 60 s top bucket (the old `quantile > 60` rule could not fire)
                "interval": "1m",
                "input_series": [
                    {"series": f'deepwatch_event_to_alert_seconds_bucket{{job="deepwatch",instance="w1",le="{le}"}}',
                     "values": "0+2x40" if le == "+Inf" else "0+1x40"}
                    for le in ("10.0", "30.0", "60.0", "+Inf")
                ] + [{"series": 'deepwatch_event_to_alert_seconds_count{job="deepwatch",instance="w1"}',
                      "values": "0+2x40"}],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "DeepwatchEventToAlertLatencyHigh", "exp_alerts": []},  # pending
                    {"eval_time": "35m", "alertname": "DeepwatchEventToAlertLatencyHigh", "exp_alerts": [
                        _expected_alert("DeepwatchEventToAlertLatencyHigh",
                                        summary="50% of alerts reach the desk more than 60s after the triggering "
                                                "post (p95 above 60s)")]},
                ],
            },
            {   # 1 in 50 alerts slow (2 %): p95 is well under 60 s, no alert
                "interval": "1m",
                "input_series": [
                    {"series": f'deepwatch_event_to_alert_seconds_bucket{{job="deepwatch",instance="w1",le="{le}"}}',
                     "values": "0+50x40" if le == "+Inf" else "0+49x40"} for le in ("10", "60", "+Inf")
                ] + [{"series": 'deepwatch_event_to_alert_seconds_count{job="deepwatch",instance="w1"}',
                      "values": "0+50x40"}],
                "alert_rule_test": [
                    {"eval_time": "35m", "alertname": "DeepwatchEventToAlertLatencyHigh", "exp_alerts": []},
                ],
            },
            {   # w1's loop stops beating at 5 m while w2's goes on; then every worker target disappears
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_loop_heartbeat_timestamp_seconds{job="deepwatch",instance="w1"}',
                     "values": "0+60x5 300x35"},
                    {"series": 'deepwatch_loop_heartbeat_timestamp_seconds{job="deepwatch",instance="w2"}',
                     "values": "0+60x40"},
                    {"series": 'up{job="deepwatch",instance="w1"}', "values": "1x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "6m", "alertname": "DeepwatchWorkerLoopStalled", "exp_alerts": []},
                    # as soon as it is silent past 2 minutes, as /healthz judges it (it waited 2 more)
                    {"eval_time": "8m", "alertname": "DeepwatchWorkerLoopStalled", "exp_alerts": [_expected_alert(
                        "DeepwatchWorkerLoopStalled", {"instance": "w1", "job": "deepwatch"},
                        summary="deepwatch worker w1: event loop silent for 3m 0s")]},
                    {"eval_time": "12m", "alertname": "DeepwatchWorkerLoopStalled", "exp_alerts": [_expected_alert(
                        "DeepwatchWorkerLoopStalled", {"instance": "w1", "job": "deepwatch"},
                        summary="deepwatch worker w1: event loop silent for 7m 0s")]},
                    # a worker's silence is no desk's nor ingest endpoint's
                    {"eval_time": "12m", "alertname": "DeepwatchDeskLoopStalled", "exp_alerts": []},
                    {"eval_time": "12m", "alertname": "DeepwatchIngestLoopStalled", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "DeepwatchNoWorkers", "exp_alerts": []},
                    {"eval_time": "35m", "alertname": "DeepwatchNoWorkers",
                     "exp_alerts": [_expected_alert("DeepwatchNoWorkers", {"job": "deepwatch"})]},
                ],
            },
            {   # the desk's loop stops at 5 m, the ingest endpoint's at 10 m; the metrics threads still answer
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_loop_heartbeat_timestamp_seconds{job="deepwatch-desk",instance="d1"}',
                     "values": "0+60x5 300x35"},
                    {"series": 'deepwatch_loop_heartbeat_timestamp_seconds{job="deepwatch-ingest",instance="i1"}',
                     "values": "0+60x10 600x30"},
                    # the desk and the ingest process export the workers' gauge too, at 0 until a beat: not a silence
                    {"series": 'deepwatch_loop_heartbeat_timestamp_seconds{job="deepwatch-desk",instance="d2"}',
                     "values": "0x40"},
                    {"series": 'up{job="deepwatch-desk",instance="d1"}', "values": "1x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "6m", "alertname": "DeepwatchDeskLoopStalled", "exp_alerts": []},
                    {"eval_time": "8m", "alertname": "DeepwatchDeskLoopStalled", "exp_alerts": [_expected_alert(
                        "DeepwatchDeskLoopStalled", {"instance": "d1", "job": "deepwatch-desk"},
                        summary="fact-check desk d1: event loop silent for 3m 0s")]},
                    {"eval_time": "8m", "alertname": "DeepwatchIngestLoopStalled", "exp_alerts": []},
                    {"eval_time": "13m", "alertname": "DeepwatchIngestLoopStalled", "exp_alerts": [_expected_alert(
                        "DeepwatchIngestLoopStalled", {"instance": "i1", "job": "deepwatch-ingest"},
                        summary="HTTP ingest endpoint i1: event loop silent for 3m 0s")]},
                    {"eval_time": "13m", "alertname": "DeepwatchWorkerLoopStalled", "exp_alerts": []},
                    {"eval_time": "13m", "alertname": "DeepwatchDeskDown", "exp_alerts": []},
                ],
            },
            {   # model requests go out and no detect worker exists (no detect series at all): it fires
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_model_requests_total{job="deepwatch",instance="w1"}', "values": "0+5x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "DeepwatchModelResultsOverdue", "exp_alerts": []},  # pending
                    {"eval_time": "10m", "alertname": "DeepwatchModelResultsOverdue",
                     "exp_alerts": [_expected_alert("DeepwatchModelResultsOverdue")]},
                ],
            },
            {   # a detect worker answers until 10 m, then stops; a second run where it keeps answering
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_model_requests_total{job="deepwatch",instance="w1"}', "values": "0+5x40"},
                    {"series": 'deepwatch_stage_seconds_count{job="deepwatch",instance="d1",stage="detect"}',
                     "values": "0+5x10 50x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": "DeepwatchModelResultsOverdue", "exp_alerts": []},
                    # answers in the last 15 minutes until 25 m, then none for 5 minutes more
                    {"eval_time": "28m", "alertname": "DeepwatchModelResultsOverdue", "exp_alerts": []},
                    {"eval_time": "32m", "alertname": "DeepwatchModelResultsOverdue",
                     "exp_alerts": [_expected_alert("DeepwatchModelResultsOverdue")]},
                ],
            },
            {   # requests answered as they come: nothing to say
                "interval": "1m",
                "input_series": [
                    {"series": 'deepwatch_model_requests_total{job="deepwatch",instance="w1"}', "values": "0+5x40"},
                    {"series": 'deepwatch_stage_seconds_count{job="deepwatch",instance="d1",stage="detect"}',
                     "values": "0+5x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchModelResultsOverdue", "exp_alerts": []},
                ],
            },
            {   # the findings store cannot answer the event-id lookup: every event dead-lettered in "dedupe"
                "interval": "1m",
                "input_series": [
                    {"series": ok, "values": "0+60x40"},
                    {"series": 'deepwatch_dead_letters_total{job="deepwatch",instance="w1",stage="dedupe",reason="internal_error"}',
                     "values": "0+120x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchDeadLetterRatioHigh", "exp_alerts": [_expected_alert(
                        "DeepwatchDeadLetterRatioHigh",
                        summary="More than 66.67% of incoming events are dead-lettered")]},
                ],
            },
            {   # a re-sent feed: 37 events analysed as duplicates (event ids seen before), 6 dead-lettered, none
                # new. 6 of 43 incoming events (14 %) is under the bar; counting only outcome="ok" read 6 / 6
                "interval": "1m",
                "input_series": [
                    {"series": ok, "values": "0x40"},
                    {"series": 'deepwatch_events_total{job="deepwatch",instance="w1",stage="analyze",outcome="duplicate"}',
                     "values": "0+37x40"},
                    {"series": 'deepwatch_dead_letters_total{job="deepwatch",instance="w1",stage="fetch",reason="http_error"}',
                     "values": "0+6x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": "DeepwatchDeadLetterRatioHigh", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "DeepwatchDeadLetterRatioHigh", "exp_alerts": []},
                ],
            },
            {   # kafka-exporter down: DeepwatchNoEventsProcessed, which reads its offsets, is blind meanwhile
                "interval": "1m",
                "input_series": [{"series": 'up{job="kafka",instance="kafka-exporter:9308"}', "values": "1x5 0x30"},
                                 {"series": 'kafka_topic_partition_current_offset{job="kafka",'
                                            'instance="kafka-exporter:9308",topic="deepwatch.events",partition="0"}',
                                  "values": "0+50x5"}],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "DeepwatchKafkaExporterDown", "exp_alerts": []},  # pending
                    {"eval_time": "20m", "alertname": "DeepwatchKafkaExporterDown", "exp_alerts": [_expected_alert(
                        "DeepwatchKafkaExporterDown", {"job": "kafka", "instance": "kafka-exporter:9308"},
                        summary="No offsets of deepwatch.events from kafka-exporter: DeepwatchNoEventsProcessed "
                                "cannot fire")]},  # once: the offsets it no longer reports do not fire it again
                ],
            },
            {   # no exporter at all (Kubernetes' base shipped none, nor a `kafka` job): no `up` to read 0, and
                # DeepwatchNoEventsProcessed blind for good; the rule (up == 0) had no series to fire on
                "interval": "1m",
                "input_series": [{"series": 'up{job="deepwatch",instance="w1"}', "values": "1x30"}],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "DeepwatchKafkaExporterDown", "exp_alerts": []},  # pending
                    {"eval_time": "15m", "alertname": "DeepwatchKafkaExporterDown", "exp_alerts": [_expected_alert(
                        "DeepwatchKafkaExporterDown", {"topic": "deepwatch.events"})]},
                ],
            },
            {   # an exporter under another job name (the cluster's own Kafka monitoring) serves the rule too
                "interval": "1m",
                "input_series": [{"series": 'kafka_topic_partition_current_offset{job="strimzi",topic="deepwatch.events",'
                                            'partition="0"}', "values": "0+50x30"}],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "DeepwatchKafkaExporterDown", "exp_alerts": []},
                ],
            },
            {   # a tipline's format changed: the HTTP ingest endpoint refuses half its lines at the door, which
                # it dead-letters itself (no worker counts them): the ratio saw none of them
                "interval": "1m",
                "input_series": [
                    {"series": ok, "values": "0+60x40"},
                    {"series": 'deepwatch_ingest_lines_total{job="deepwatch-ingest",instance="i1",token="tip",'
                               'outcome="dead_lettered"}', "values": "0+60x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchDeadLetterRatioHigh", "exp_alerts": [_expected_alert(
                        "DeepwatchDeadLetterRatioHigh",
                        summary="More than 50% of incoming events are dead-lettered")]},
                ],
            },
        ],
    }
    path = tmp_path / "rules.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    _promtool("test", "rules", str(path))


@needs_promtool
def test_ingest_endpoint_rules_fire_on_synthetic_series(generated, tmp_path):
    """Prometheus scraped the HTTP ingest endpoint (job deepwatch-ingest) and
    no rule looked at it: down, gone, or answering every request 503 paged
    nobody."""
    job = 'job="deepwatch-ingest",instance="i1"'

    def requests(status: str) -> str:
        return f'deepwatch_ingest_requests_total{{{job},token="desk",status="{status}"}}'

    def failures(cause: str) -> str:
        return f'deepwatch_ingest_broker_failures_total{{{job},cause="{cause}"}}'

    def traffic(accepted: str, refused: str, unavailable: str, topic_missing: str) -> list[dict]:
        """The endpoint's counters: requests answered 202 and 503, and the 503s the broker caused."""
        return [{"series": requests("202"), "values": accepted}, {"series": requests("503"), "values": refused},
                {"series": failures("unavailable"), "values": unavailable},
                {"series": failures("topic_missing"), "values": topic_missing}]

    def quiet(*names: str, at: str) -> list[dict]:
        return [{"eval_time": at, "alertname": n, "exp_alerts": []} for n in names]

    ratio_rules = ("DeepwatchIngestBrokerFailures", "DeepwatchIngestBusy", "DeepwatchIngestTopicMissing")
    cases = {
        "rule_files": [str(generated / "prometheus" / "deepwatch-rules.yaml")],
        "evaluation_interval": "30s",
        "tests": [
            {   # one of two replicas stops answering its scrape at 10m
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="deepwatch-ingest",instance="i1"}', "values": "1x10 0x30"},
                    {"series": 'up{job="deepwatch-ingest",instance="i2"}', "values": "1x40"},
                ],
                "alert_rule_test": [
                    *quiet("DeepwatchIngestDown", at="8m"),
                    *quiet("DeepwatchIngestDown", at="13m"),  # pending
                    {"eval_time": "20m", "alertname": "DeepwatchIngestDown", "exp_alerts": [_expected_alert(
                        "DeepwatchIngestDown", {"instance": "i1", "job": "deepwatch-ingest"},
                        summary="The HTTP ingest endpoint i1 is not answering /metrics")]},
                    *quiet("DeepwatchNoIngest", at="20m"),
                ],
            },
            {   # both replicas crash-looping from 10m: still discovered, each `up` reads 0, so absent() found
                # a series and stayed quiet; only the per-replica warning fired
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="deepwatch-ingest",instance="i1"}', "values": "1x10 0x30"},
                    {"series": 'up{job="deepwatch-ingest",instance="i2"}', "values": "1x10 0x30"},
                ],
                "alert_rule_test": [
                    *quiet("DeepwatchNoIngest", at="13m"),  # pending
                    {"eval_time": "20m", "alertname": "DeepwatchNoIngest", "exp_alerts": [_expected_alert(
                        "DeepwatchNoIngest", {"job": "deepwatch-ingest"})]},
                ],
            },
            {   # every replica gone at 5m (discovery finds none: no `up` series at all), the workers still there
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="deepwatch-ingest",instance="i1"}', "values": "1x5"},
                    {"series": 'up{job="deepwatch",instance="w1"}', "values": "1x40"},
                ],
                "alert_rule_test": [
                    *quiet("DeepwatchNoIngest", "DeepwatchIngestDown", at="8m"),
                    {"eval_time": "30m", "alertname": "DeepwatchNoIngest", "exp_alerts": [_expected_alert(
                        "DeepwatchNoIngest", {"job": "deepwatch-ingest"})]},
                ],
            },
            {   # healthy: 10 requests/s accepted, nothing refused
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="deepwatch-ingest",instance="i1"}', "values": "1x40"},
                    *traffic("0+600x40", "0x40", "0x40", "0x40"),
                ],
                "alert_rule_test": [
                    *quiet("DeepwatchIngestDown", "DeepwatchNoIngest", *ratio_rules, at="30m"),
                ],
            },
            {   # Kafka goes down at 10m: every request from then on is answered 503 broker_unavailable
                "interval": "1m",
                "input_series": traffic("0+600x10 6000x30", "0x10 0+300x30", "0x10 0+300x30", "0x40"),
                "alert_rule_test": [
                    *quiet(*ratio_rules, at="9m"),
                    *quiet("DeepwatchIngestBrokerFailures", at="13m"),  # pending
                    {"eval_time": "25m", "alertname": "DeepwatchIngestBrokerFailures", "exp_alerts": [_expected_alert(
                        "DeepwatchIngestBrokerFailures",
                        summary="100% of HTTP ingest requests are refused: the broker does not take their events")]},
                    *quiet("DeepwatchIngestBusy", "DeepwatchIngestTopicMissing", at="25m"),
                ],
            },
            {   # the broker answers but the events topic was never created (auto-creation off, no worker yet)
                "interval": "1m",
                "input_series": traffic("0x40", "0x5 0+60x35", "0x40", "0x5 0+60x35"),
                "alert_rule_test": [
                    *quiet("DeepwatchIngestTopicMissing", at="4m"),
                    *quiet("DeepwatchIngestTopicMissing", at="9m"),  # pending
                    {"eval_time": "20m", "alertname": "DeepwatchIngestTopicMissing",
                     "exp_alerts": [_expected_alert("DeepwatchIngestTopicMissing")]},
                    *quiet("DeepwatchIngestBrokerFailures", "DeepwatchIngestBusy", at="20m"),
                ],
            },
            {   # one request refused for a missing topic while the stack was starting, then the topics exist
                "interval": "1m",
                "input_series": traffic("0x5 0+60x35", "0x4 1x36", "0x40", "0x4 1x36"),
                "alert_rule_test": [
                    *quiet(*ratio_rules, at="7m"),
                    *quiet(*ratio_rules, at="10m"),
                    *quiet(*ratio_rules, at="20m"),
                ],
            },
            {   # the buffer budget is full: 1 request in 10 answered 503 busy, the broker fine
                "interval": "1m",
                "input_series": traffic("0+540x40", "0+60x40", "0x40", "0x40"),
                "alert_rule_test": [
                    *quiet("DeepwatchIngestBusy", at="8m"),  # pending
                    {"eval_time": "25m", "alertname": "DeepwatchIngestBusy", "exp_alerts": [_expected_alert(
                        "DeepwatchIngestBusy", summary="10% of HTTP ingest requests are refused as busy")]},
                    *quiet("DeepwatchIngestBrokerFailures", "DeepwatchIngestTopicMissing", at="25m"),
                ],
            },
            {   # no requests at all (a quiet night): no ratio, nothing to say
                "interval": "1m",
                "input_series": traffic("0x40", "0x40", "0x40", "0x40"),
                "alert_rule_test": [*quiet(*ratio_rules, at="30m")],
            },
        ],
    }
    path = tmp_path / "ingest-rules.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    _promtool("test", "rules", str(path))


# -- a real worker, its /metrics, and a real Prometheus scraping it ----------------
def _samples(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _by(samples: dict[tuple, float], *labels: str) -> dict[tuple, float]:
    out: Counter = Counter()
    for key, v in samples.items():
        d = dict(key)
        out[tuple(d[lbl] for lbl in labels)] += v
    return dict(out)


def _start_prometheus(tmp_path: Path, worker_port: int, rules_file: Path, stack: ExitStack,
                      job: str = "deepwatch") -> str:
    from streams.broker import free_port

    port = free_port()
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}],
    }
    cfg_path = tmp_path / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    _promtool("check", "config", str(cfg_path))
    log = open(tmp_path / "prometheus.log", "wb")
    stack.callback(log.close)
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        try:
            if httpx.get(f"{base}/-/ready", timeout=1).status_code == 200:
                return base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()[-3000:])


def _query(base: str, promql: str) -> list[dict]:
    doc = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_worker_metrics_match_feed_and_prometheus_scrapes_them(tmp_path, generated):
    from streams import runner
    from streams.demo_feed import build_feed
    from streams.ingest import produce_feed
    from streams.settings import Settings
    from streams.store import open_store

    data = tmp_path / "data"
    feed, exp = build_feed(tmp_path / "feed")
    settings = Settings(data_dir=data)
    settings.ingest.image_roots = [(tmp_path / "feed").resolve()]

    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        worker = cluster.start_worker("pipeline")
        assert worker.metrics_port
        # Prometheus scrapes from before the first event, as in production: the
        # alert counter's series is born during the run (what the desk rule and
        # the alert panels must count), not already there at the first scrape.
        base = None
        if PROMETHEUS is not None:
            base = _start_prometheus(tmp_path, worker.metrics_port, _rules_every_second(generated, tmp_path), stack)
        produced = produce_feed(feed, cluster.bootstrap, settings)
        assert len(produced.offsets) == exp.events
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=90), "feed not processed in time"

        # The sinks run in the same worker but after the store write the
        # accounting waits on; give the counters a moment to settle.
        metrics_url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while True:
            m = _samples(httpx.get(metrics_url, timeout=5).text)
            if m.get("deepwatch_alerts_total") or time.monotonic() > deadline:
                break
            time.sleep(0.2)

        # (a) the counters tell the feed's story
        dead_by_stage = Counter(exp.dead_letter_reasons.values())
        n_dead = sum(dead_by_stage.values())
        events = _by(m["deepwatch_events_total"], "stage", "outcome")
        assert events == {
            **{(stage, "dead_letter"): float(n) for stage, n in dead_by_stage.items()},
            ("analyze", "ok"): float(exp.events - n_dead),
            ("cluster", "ok"): float(exp.events - n_dead - 1),
            ("cluster", "duplicate"): 1.0,  # the producer retry
        }
        dead = _by(m["deepwatch_dead_letters_total"], "stage", "reason")
        assert _by({k: v for k, v in m["deepwatch_dead_letters_total"].items()}, "stage") == {
            (s,): float(n) for s, n in dead_by_stage.items()}
        assert dead[("validate", "malformed_json")] == 1 and dead[("validate", "schema_violation")] == 1
        assert dead[("fetch", "blocked_address")] == 1 and dead[("fetch", "path_not_allowed")] == 1
        store = open_store(data)
        try:
            in_store = Counter((d.stage, d.reason) for d in store.dead_letters())
            n_alerts = len(store.alerts())
        finally:
            store.close()
        assert dead == {k: float(v) for k, v in in_store.items()}, "metrics and findings store disagree"
        assert m["deepwatch_clusters"][()] == exp.distinct_pictures
        assert _by(m["deepwatch_alerts_total"], "level") == {("1",): float(n_alerts)} and n_alerts == 1
        assert m["deepwatch_event_to_alert_seconds_count"][()] == 1
        stage_counts = _by(m["deepwatch_stage_seconds_count"], "stage")
        assert stage_counts[("cluster",)] == exp.events - n_dead

        # (b) a real Prometheus scrapes the worker with the generated rules loaded
        if base is None:
            pytest.skip("prometheus not on PATH (apt-get install prometheus): direct /metrics checks passed, "
                        "scrape through a real Prometheus skipped")
        deadline = time.monotonic() + 20
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = _query(base, "sum by (stage, outcome) (deepwatch_events_total)")
            if result:
                break
            time.sleep(0.5)
        assert result, "Prometheus never scraped deepwatch_events_total"
        scraped = {(r["metric"]["stage"], r["metric"]["outcome"]): float(r["value"][1]) for r in result}
        assert scraped == events
        [up] = _query(base, 'up{job="deepwatch"}')
        assert up["value"][1] == "1"
        groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == {r["alert"] for g in rules.prometheus_rules()["groups"] for r in g["rules"]}
        # give the rule group one evaluation; every rule must evaluate without error
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            health = {r["name"]: r.get("health") for g in groups for r in g["rules"]}
            if all(h == "ok" for h in health.values()):
                break
            time.sleep(0.5)
        assert all(h == "ok" for h in health.values()), json.dumps(health)

        # (c) every panel and rule expression, as Grafana and Prometheus send it,
        # evaluates against what the worker exports
        from dashboards import queries as q
        from dashboards.dashboard import dashboard_json, promql_exprs

        exprs = [*promql_exprs(dashboard_json()), *rules.prometheus_rule_exprs(), *rules.grafana_rule_exprs()]
        deadline = time.monotonic() + 15  # rate() needs two samples of every series, born late in the run
        while time.monotonic() < deadline and not all(
                float(r["value"][1]) >= 3 for r in _query(base, "count_over_time(deepwatch_events_total[4m])")):
            time.sleep(0.5)
        answers = {e: _query(base, _grafana_vars(e, interval="1m", range_="1h")) for e in exprs}
        # a pipeline worker exports these after the demo feed (webhooks, the
        # Elasticsearch sink, re-reads and the desk have nothing to show here)
        for expr in (q.EVENTS_RATE, q.DEAD_LETTERS_RATE, q.CLUSTERS, q.CLUSTER_MEMBERS, q.ALERTS_IN_RANGE,
                     q.ALERTS_RATE, q.SINK_BEHIND, q.stage_quantile(0.95), q.stage_lag_quantile(0.95),
                     q.event_to_alert_quantile(0.95, "1h"), q.ALERTS_RAISED_5M):
            assert answers[expr], f"no series for {expr}"
        # the worker's one alert, born during the scrape: increase() read 0 here,
        # so the desk rule "deepwatch raised an alert" never fired for it
        [raised] = answers[q.ALERTS_RAISED_5M]
        assert float(raised["value"][1]) == n_alerts
        [in_range] = answers[q.ALERTS_IN_RANGE]
        assert (in_range["metric"], float(in_range["value"][1])) == ({"level": "1"}, n_alerts)
        clusters = {float(r["value"][1]) for r in answers[q.CLUSTERS]}
        assert clusters == {float(exp.distinct_pictures)}


def _rules_every_second(generated: Path, tmp_path: Path) -> Path:
    """The generated rules as they are, except evaluated every second (the
    group's own 30 s would outlast the test)."""
    fast = yaml.safe_load((generated / "prometheus" / "deepwatch-rules.yaml").read_text())
    for g in fast["groups"]:
        g["interval"] = "1s"
    path = tmp_path / "deepwatch-rules-1s.yaml"
    path.write_text(yaml.safe_dump(fast, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not on PATH (apt-get install prometheus)")
def test_prometheus_scrapes_the_ingest_endpoint_and_its_rules_see_a_missing_topic(tmp_path, generated):
    """A real serve-ingest app, its broker without the topics (auto-creation
    is off in compose), scraped as job deepwatch-ingest with the generated
    rules: the refusal shows under the names and labels the rules select, and
    the topic rule (alone) goes pending. No rule looked at this job before."""
    import threading

    import uvicorn

    from streams.broker import EmbeddedBroker, free_port
    from streams.ingest_server import build_app
    from streams.settings import Settings

    token = "desk-token-0123456789abcdef"
    with ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(tmp_path / "broker"))
        settings = Settings(data_dir=tmp_path / "data", broker=f"kafka://{broker.bootstrap}", topic_prefix="promingest")
        settings.connectors.ingest_broker_timeout_s = 1.0
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(build_app(settings, {token: "desk"}), host="127.0.0.1", port=port,
                                               log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()

        def stop() -> None:
            server.should_exit = True
            thread.join(20)

        stack.callback(stop)
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the ingest app did not start"
            time.sleep(0.05)
        base = _start_prometheus(tmp_path, port, _rules_every_second(generated, tmp_path), stack, job="deepwatch-ingest")
        deadline = time.monotonic() + 20
        while not _query(base, 'up{job="deepwatch-ingest"} == 1'):
            assert time.monotonic() < deadline, "Prometheus never scraped the ingest endpoint"
            time.sleep(0.3)

        r = httpx.post(f"http://127.0.0.1:{port}/ingest", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                       content=json.dumps({"schema_version": 1, "event_id": "tip-1", "platform": "tipline",
                                           "account_id": "a", "posted_at": "2026-11-30T10:00:00Z",
                                           "image": {"url": "https://images.example.org/1.jpg"}}))
        assert r.status_code == 503 and r.json()["cause"] == "topic_missing", r.text

        selectors = ('deepwatch_ingest_broker_failures_total{job="deepwatch-ingest",cause="topic_missing"}',
                     'deepwatch_ingest_requests_total{job="deepwatch-ingest",token="desk",status="503"}')
        deadline = time.monotonic() + 45
        while not all(_query(base, f"{sel} >= 1") for sel in selectors):
            assert time.monotonic() < deadline, [_query(base, sel) for sel in selectors]
            time.sleep(0.3)

        deadline = time.monotonic() + 45
        while True:
            groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            loaded = {r["name"]: r for g in groups for r in g["rules"]}
            if loaded.get("DeepwatchIngestTopicMissing", {}).get("state") == "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert all(r.get("health") == "ok" for r in loaded.values()), {n: r.get("lastError") for n, r in loaded.items()}
        ingest = {n: r["state"] for n, r in loaded.items() if n.startswith(("DeepwatchIngest", "DeepwatchNoIngest"))}
        # its loop beats (a real serve-ingest, scraped): no stall
        assert ingest == {"DeepwatchIngestDown": "inactive", "DeepwatchNoIngest": "inactive",
                          "DeepwatchIngestLoopStalled": "inactive", "DeepwatchIngestTopicMissing": "pending", "DeepwatchIngestBrokerFailures": "inactive",
                          "DeepwatchIngestBusy": "inactive"}, ingest


def _grafana_vars(expr: str, interval: str = "1m", range_: str = "10m") -> str:
    """A panel expression as Grafana sends it (step = $__interval)."""
    return (expr.replace("$__rate_interval", "4m").replace("$__interval", interval).replace("$__range", range_))


@needs_promtool
def test_counter_panels_and_desk_rule_count_each_alert_once(tmp_path):
    """One bar per $__interval step must show each alert in exactly one bar,
    including a worker's first alert (its series is born at 1). With
    increase(...[$__rate_interval]) the first alert showed nowhere and later
    ones in several bars; the desk rule "deepwatch raised an alert" never
    fired for a worker's first alert."""
    from dashboards import queries as q

    series = 'deepwatch_alerts_total{job="deepwatch",instance="w1",level="1"}'
    bar = _grafana_vars(q.ALERTS_RATE)
    cases = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "15s",
        # no series until the first alert (3m), the second at 6m15s; the worker restarts (no scrape from
        # 9m30s to 10m) and raises a third at 10m15s, its counter born again at 1
        "input_series": [{"series": series, "values": "_x12 1x12 2x12 _x3 1x30"}],
        "promql_expr_test": [
            *({"expr": bar, "eval_time": f"{m}m", "exp_samples": [{"labels": '{level="1"}', "value": v}]}
              for m, v in ((3, 1), (4, 0), (5, 0), (6, 0), (7, 1), (8, 0), (10, 0), (11, 1), (12, 0))),
            {"expr": _grafana_vars(q.ALERTS_IN_RANGE, range_="9m"), "eval_time": "9m",
             "exp_samples": [{"labels": '{level="1"}', "value": 2}]},
            {"expr": q.ALERTS_RAISED_5M, "eval_time": "4m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": q.ALERTS_RAISED_5M, "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": q.ALERTS_RAISED_5M, "eval_time": "16m", "exp_samples": [{"labels": "{}", "value": 0}]},
        ],
    }]}
    path = tmp_path / "bars.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    _promtool("test", "rules", str(path))


@needs_promtool
def test_a_failed_scrape_does_not_count_a_counters_lifetime(generated, tmp_path):
    """Each failed scrape writes a staleness marker; `x offset w` stops at it, so
    for one scrape interval after it counted() read the series as newborn and
    counted its whole lifetime: "alerts raised in 5 minutes" read 7 instead of 0
    (the desk's "deepwatch raised an alert" told the desk so), and
    DeepwatchImageHostsPaused (for: 0m) fired."""
    from dashboards import queries as q

    worker = 'job="deepwatch",instance="w1"'
    cases = {"rule_files": [str(generated / "prometheus" / "deepwatch-rules.yaml")], "evaluation_interval": "30s",
             "tests": [{
                 "interval": "15s",
                 # 7 alerts and 3 host pauses long ago; one failed scrape at 5m (a staleness marker), nothing new
                 "input_series": [
                     {"series": f'deepwatch_alerts_total{{{worker},level="1"}}', "values": "7x19 stale 7x100"},
                     {"series": f"deepwatch_fetch_host_pauses_total{{{worker}}}", "values": "3x19 stale 3x100"},
                 ],
                 "promql_expr_test": [
                     {"expr": q.ALERTS_RAISED_5M, "eval_time": "5m", "exp_samples": []},  # the failed scrape itself
                     {"expr": q.ALERTS_RAISED_5M, "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 0}]},
                     {"expr": q.ALERTS_RAISED_5M, "eval_time": "10m10s", "exp_samples": [{"labels": "{}", "value": 0}]},
                     {"expr": _grafana_vars(q.ALERTS_RATE), "eval_time": "6m",
                      "exp_samples": [{"labels": '{level="1"}', "value": 0}]},
                     {"expr": _grafana_vars(q.HOST_PAUSES), "eval_time": "6m", "exp_samples": [{"labels": "{}", "value": 0}]},
                 ],
                 "alert_rule_test": [
                     {"eval_time": "20m", "alertname": "DeepwatchImageHostsPaused", "exp_alerts": []},
                 ],
             }, {
                 "interval": "15s",
                 # and a real one right after the failed scrape still counts, once
                 "input_series": [
                     {"series": f'deepwatch_alerts_total{{{worker},level="1"}}', "values": "7x19 stale 8x100"},
                 ],
                 "promql_expr_test": [
                     {"expr": q.ALERTS_RAISED_5M, "eval_time": "6m", "exp_samples": [{"labels": "{}", "value": 1}]},
                     {"expr": q.ALERTS_RAISED_5M, "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]},
                     {"expr": q.ALERTS_RAISED_5M, "eval_time": "11m", "exp_samples": [{"labels": "{}", "value": 0}]},
                 ],
             }]}
    path = tmp_path / "stale.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    _promtool("test", "rules", str(path))


@needs_promtool
def test_worker_panels_show_workers_only(tmp_path):
    """The desk and the ingest endpoint export the workers' gauges and counters
    at 0 (one registry per process): the blob, lookup and loop panels listed
    them as workers, without their job."""
    from dashboards import queries as q

    def series(name: str, job: str, inst: str, role: str = "") -> str:
        return f'{name}{{job="{job}",instance="{inst}"' + (f',role="{role}"' if role else "") + "}"

    procs = [("deepwatch", "w1", "pipeline"), ("deepwatch-desk", "d1", ""), ("deepwatch-ingest", "i1", "")]
    names = {"deepwatch_blob_store_held_seconds": "5x20", "deepwatch_findings_lookup_held_seconds": "5x20",
             "deepwatch_blob_write_failures_total": "0+1x20", "deepwatch_findings_lookup_failures_total": "0+1x20",
             "deepwatch_loop_heartbeat_timestamp_seconds": "1x20"}
    worker = '{instance="w1",job="deepwatch",role="pipeline"}'
    cases = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": series(n, *p), "values": v} for n, v in names.items() for p in procs],
        "promql_expr_test": [
            {"expr": q.BLOB_HELD, "eval_time": "10m", "exp_samples": [{"labels": worker, "value": 5}]},
            {"expr": q.LOOKUP_HELD, "eval_time": "10m", "exp_samples": [{"labels": worker, "value": 5}]},
            {"expr": _grafana_vars(q.BLOB_WRITE_FAILURES), "eval_time": "10m",
             "exp_samples": [{"labels": worker, "value": 1}]},
            {"expr": _grafana_vars(q.LOOKUP_FAILURES), "eval_time": "10m",
             "exp_samples": [{"labels": worker, "value": 1}]},
            {"expr": q.LOOP_SILENCE, "eval_time": "10m", "exp_samples": [{"labels": worker, "value": 599}]},
        ],
    }]}
    path = tmp_path / "workers.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    _promtool("test", "rules", str(path))


@needs_promtool
def test_undelivered_gauge_reads_once_per_target_whatever_the_number_of_workers(tmp_path):
    """Every worker exports the same counts from the shared findings store."""
    from dashboards import queries as q

    series = 'deepwatch_webhook_undelivered{{job="deepwatch",instance="{w}",target="https://h.example#0a1b2c3d",status="{s}"}}'
    cases = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": series.format(w=w, s=s), "values": v}
                         for w in ("w1", "w2") for s, v in (("rejected", "3x10"), ("failed", "0x10"))],
        "promql_expr_test": [{"expr": q.WEBHOOK_UNDELIVERED, "eval_time": "5m", "exp_samples": [
            {"labels": '{status="failed",target="https://h.example#0a1b2c3d"}', "value": 0},
            {"labels": '{status="rejected",target="https://h.example#0a1b2c3d"}', "value": 3}]}],
    }]}
    path = tmp_path / "undelivered.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    _promtool("test", "rules", str(path))


def test_rare_event_counters_exist_at_zero_from_the_start():
    # A labelled series born at its first inc() reads 1 at its first scrape, so
    # increase() and the rules never saw a worker's first alert, webhook failure,
    # verdict or failed login.
    from prometheus_client import generate_latest

    import streams.desk.observe  # noqa: F401  registers the desk's counters
    import streams.ingest_server  # noqa: F401  and the ingest endpoint's
    import streams.metrics  # noqa: F401

    text = generate_latest().decode()
    for series in ('deepwatch_alerts_total{level="1"}', 'deepwatch_webhook_deliveries_total{outcome="failed"}',
                   'deepwatch_desk_verdicts_total{verdict="fake"}', 'deepwatch_desk_logins_total{outcome="failed"}',
                   'deepwatch_ingest_broker_failures_total{cause="topic_missing"}',
                   'deepwatch_ingest_broker_failures_total{cause="unavailable"}'):
        assert series in text, series
    assert 'deepwatch_event_to_alert_seconds_bucket{le="300.0"}' in text or "le=\"300.0\"" in text


def test_metrics_serve_on_an_ipv6_host():
    # the desk passes its own --host; an IPv6 one ended in "Address family for hostname not supported"
    import socket
    import urllib.request

    from streams import metrics

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        port = metrics.serve(0, host="::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    assert urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5).status == 200


# -- rules generated for another topic_prefix ---------------------------------------
@needs_promtool
def test_rules_for_another_topic_prefix_read_that_prefixs_events_topic(tmp_path):
    """The Kafka rules named `deepwatch.events` whatever the workers'
    topic_prefix: with another prefix DeepwatchNoEventsProcessed never fired
    and DeepwatchKafkaExporterDown fired for good. Generated with
    --topic-prefix, they read that prefix's topic, and only it."""
    out = tmp_path / "gen"
    assert build.main(["--out", str(out), "--topic-prefix", "newsroom"]) == 0
    doc = yaml.safe_load((out / "prometheus" / "deepwatch-rules.yaml").read_text())
    by_name = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}

    def expected(name: str, labels: dict | None = None) -> dict:
        r = by_name[name]
        return {"exp_labels": {**r["labels"], **(labels or {})}, "exp_annotations": r["annotations"]}

    ok = 'deepwatch_events_total{job="deepwatch",instance="w1",stage="analyze",outcome="ok"}'

    def offsets(topic: str) -> str:
        return f'kafka_topic_partition_current_offset{{job="kafka",instance="x:9308",topic="{topic}",partition="0"}}'

    cases = {
        "rule_files": [str(out / "prometheus" / "deepwatch-rules.yaml")],
        "evaluation_interval": "30s",
        "tests": [
            {   # newsroom.events keep arriving, processing stopped: the pipeline is stuck
                "interval": "1m",
                "input_series": [{"series": offsets("newsroom.events"), "values": "0+50x40"},
                                 {"series": 'up{job="kafka",instance="x:9308"}', "values": "1x40"},
                                 {"series": ok, "values": "0+50x5 250x35"}],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchNoEventsProcessed",
                     "exp_alerts": [expected("DeepwatchNoEventsProcessed")]},
                    {"eval_time": "30m", "alertname": "DeepwatchKafkaExporterDown", "exp_alerts": []},
                ],
            },
            {   # another deployment's topic on the same broker is none of these rules' business
                "interval": "1m",
                "input_series": [{"series": offsets("deepwatch.events"), "values": "0+50x40"},
                                 {"series": 'up{job="kafka",instance="x:9308"}', "values": "1x40"}],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DeepwatchNoEventsProcessed", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "DeepwatchKafkaExporterDown",
                     "exp_alerts": [expected("DeepwatchKafkaExporterDown", {"topic": "newsroom.events"})]},
                ],
            },
        ],
    }
    path = tmp_path / "rules.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    _promtool("test", "rules", str(path))


# -- label values stay a bounded set -------------------------------------------------
def test_a_sink_dead_letters_reason_label_is_bounded_whatever_the_store_answers(fake_es):
    """A bulk item refused with a string error (a proxy, an old server) made
    its whole text the dead letter's reason, and so a value of the `reason`
    label of deepwatch_dead_letters_total: one new series per refused item.
    The text belongs in the dead letter's detail."""
    from prometheus_client import REGISTRY

    from streams.es_store import EsFindingsStore
    from streams.settings import FindingsSettings, Settings

    settings = Settings(findings=FindingsSettings(retry_initial_s=0.001, retry_max_s=0.004))
    store = EsFindingsStore.from_url(fake_es.url.replace("http://", "es://"), settings=settings)
    store.bulk.sleep = lambda _s: None
    store.ensure_setup()

    def reasons() -> Counter:
        return Counter({s.labels["reason"]: s.value for m in REGISTRY.collect() if m.name == "deepwatch_dead_letters"
                        for s in m.samples if s.name.endswith("_total") and s.labels.get("stage") == "sink"})

    before = reasons()
    refusals = {  # id: (status, error) as the item's answer
        "a1": (400, "rejected by gateway: document a1 has field engagement.likes=12k"),
        "a2": (400, "rejected by gateway: document a2 has field engagement.likes=99k"),
        "a3": (500, "upstream reset by peer 10.0.0.7"),  # refused again and again: dead-lettered after its attempts
        "a4": (400, {"type": "Not An ES Type: <html>", "reason": "odd"}),
        "a5": (400, {"type": "document_parsing_exception", "reason": "failed to parse [a5]"}),
    }
    from streams.es_bulk import ITEM_MAX_ATTEMPTS

    for doc_id, (status, error) in refusals.items():
        fake_es.fail_items(lambda op, meta, src, i=doc_id: meta.get("_id") == i, status, error, times=ITEM_MAX_ATTEMPTS)
    fake_es.fail_items(lambda op, meta, src: meta.get("_id") == "a6", 400, {"reason": "no type"})  # an object, no type
    refusals["a6"] = (400, {"reason": "no type"})
    res = store.bulk.send([({"index": {"_index": "deepwatch-deliveries", "_id": i}}, {"alert_id": i})
                           for i in refusals])
    assert res.dead_lettered == len(refusals)
    grew = reasons() - before
    assert grew == Counter({"http_400": 4, "http_500": 1, "document_parsing_exception": 1}), grew
    dls = {d.event_id: d for d in store.dead_letters()}
    assert {i: dls[i].reason for i in refusals} == {"a1": "http_400", "a2": "http_400", "a3": "http_500",
                                                    "a4": "http_400", "a5": "document_parsing_exception",
                                                    "a6": "http_400"}
    assert "engagement.likes=12k" in dls["a1"].detail and "upstream reset by peer" in dls["a3"].detail
    assert "Not An ES Type" in dls["a4"].detail or "odd" in dls["a4"].detail
    store.close()
