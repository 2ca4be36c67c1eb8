"""Observability audit: scrape targets, rule inputs, Alertmanager grouping and
inhibition, and what the panels say about their histograms.

promtool and alertmanager come from Debian's packages; without them those
tests skip with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from dashboards import build, queries, rules
from dashboards.dashboard import dashboard_json
from tests.alertmanager_support import alertmanager, wait_for  # noqa: F401 (a fixture)
from tests.test_deploy import _relabel

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus)")


def _promtool_test(tmp_path: Path, cases: dict) -> None:
    path = tmp_path / "audit.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    res = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# -- Kubernetes scrape jobs: pods that ended are no targets ---------------------------
# a pod of each job, as Kubernetes service discovery labels it
_PODS = {
    "deepwatch": ("deepwatch", "analyze"),
    "deepwatch-desk": ("deepwatch", "desk"),
    "deepwatch-ingest": ("deepwatch", "ingest"),
    "kafka": ("kafka-exporter", "kafka-exporter"),
}


def test_k8s_scrape_jobs_drop_pods_that_ended():
    """An evicted pod (node disk or memory pressure) stays listed, phase
    Failed, until someone deletes it, and so does its metrics port: Prometheus
    scraped it for good, `up` read 0 and DeepwatchWorkerDown (critical) paged
    for a replica its Deployment had already replaced. A Job's pod that
    finished (Succeeded) would do the same."""
    jobs = {j["job_name"]: j for j in yaml.safe_load((DEPLOY / "k8s" / "prometheus-scrape.yml").read_text())
            ["scrape_configs"]}
    assert set(_PODS) == set(jobs), "a new job: add a pod of it here"
    for job, (name, component) in _PODS.items():
        for phase, scraped in (("Running", True), ("Pending", True), ("Failed", False), ("Succeeded", False)):
            labels = {"__meta_kubernetes_pod_label_app_kubernetes_io_name": name,
                      "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
                      "__meta_kubernetes_pod_container_port_name": "metrics",
                      "__meta_kubernetes_pod_name": f"{component}-7d9f-x2", "__meta_kubernetes_pod_phase": phase}
            got = _relabel(jobs[job]["relabel_configs"], labels)
            assert (got is not None) == scraped, f"job {job}: a {phase} pod is {'not ' if scraped else ''}scraped"


# -- DeepwatchNoEventsProcessed reads kafka-exporter's offsets as the gauge they are ---
# Metrics from other exporters, by type (deepwatch's own come from their definitions).
_EXTERNAL_TYPES = {"up": "gauge", "kafka_topic_partition_current_offset": "gauge"}


def _types() -> dict[str, str]:
    """Sample name -> its family's type, for every metric a deepwatch process defines."""
    import importlib

    out = dict(_EXTERNAL_TYPES)
    ctor = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary)\(\s*\"deepwatch_")
    for path in sorted((REPO / "streams").rglob("*.py")):
        if ctor.search(path.read_text(encoding="utf-8")):
            mod = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
            for obj in vars(mod).values():
                if isinstance(obj, MetricWrapperBase):
                    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
                                "summary": ["_sum", "_count"]}[obj._type]
                    for s in suffixes:
                        out[obj._name + s] = "counter" if obj._type != "gauge" else "gauge"
    return out


def _exprs() -> dict[str, str]:
    from dashboards.dashboard import promql_exprs

    out = {f"panel: {e}": e for e in promql_exprs(dashboard_json())}
    out.update({f"rule: {e}": e for e in rules.prometheus_rule_exprs()})
    out.update({f"grafana rule: {e}": e for e in rules.grafana_rule_exprs()})
    return out


def test_rate_and_increase_read_counters_only():
    """rate()/irate()/increase() treat any drop as a counter reset and add the
    old value back: right for a counter, wrong for a gauge. The events topic's
    offsets (kafka-exporter's kafka_topic_partition_current_offset) are a
    gauge, and DeepwatchNoEventsProcessed rate()d them."""
    types = _types()
    assert types["deepwatch_events_total"] == "counter" and types["deepwatch_sink_behind_seconds"] == "gauge"
    problems, checked = [], 0
    for where, expr in _exprs().items():
        for fn, name in re.findall(r"\b(rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", expr):
            checked += 1
            if types.get(name) != "counter":
                problems.append(f"{where}: {fn}() over {name}, a {types.get(name, 'metric of unknown type')}")
    assert checked > 20
    assert not problems, "\n".join(problems)


@needs_promtool
def test_a_topic_created_again_is_no_arrival_of_events(tmp_path):
    """Offsets going back to 0 (the events topic deleted and created again, on
    a reset of a test or staging deployment) read as thousands of events
    arriving under rate(); with the workers idle that was "events arrive, none
    processed" for 5 minutes, a DeepwatchNoEventsProcessed if it happened
    twice. Arrivals still read as arrivals."""
    offsets = 'kafka_topic_partition_current_offset{job="kafka",instance="x:9308",topic="deepwatch.events",partition="%s"}'
    arriving = queries.events_arriving("5m")
    cases = {"rule_files": [], "evaluation_interval": "1m", "tests": [
        {   # partition 0 recreated at 10m (and again at 16m), partition 1 quiet: nothing arrives
            "interval": "1m",
            "input_series": [{"series": offsets % 0, "values": "5000x9 0x5 3000 0x15"},
                             {"series": offsets % 1, "values": "7000x30"}],
            "promql_expr_test": [{"expr": arriving, "eval_time": f"{m}m", "exp_samples": []} for m in (9, 11, 13, 17, 19)],
        },
        {   # events arrive on one partition while the other is recreated: they still count
            "interval": "1m",
            "input_series": [{"series": offsets % 0, "values": "5000x9 0x20"},
                             {"series": offsets % 1, "values": "0+20x30"}],
            "promql_expr_test": [{"expr": arriving, "eval_time": f"{m}m", "exp_samples": [{"labels": "{}", "value": 100}]}
                                 for m in (8, 11, 20)],
        },
    ]}
    _promtool_test(tmp_path, cases)


@needs_promtool
def test_no_events_processed_still_fires_with_delta(tmp_path):
    """The same pages as before the change: events arrive, the workers stopped."""
    gen = tmp_path / "gen"
    build.write(gen)
    r = next(x for g in rules.prometheus_rules()["groups"] for x in g["rules"] if x["alert"] == "DeepwatchNoEventsProcessed")
    ok = 'deepwatch_events_total{job="deepwatch",instance="w1",stage="analyze",outcome="ok"}'
    cases = {"rule_files": [str(gen / "prometheus" / "deepwatch-rules.yaml")], "evaluation_interval": "30s", "tests": [
        {"interval": "1m",
         "input_series": [
             {"series": 'kafka_topic_partition_current_offset{job="kafka",topic="deepwatch.events",partition="0"}',
              "values": "0+50x40"},
             {"series": ok, "values": "0+50x5 250x35"}],
         "alert_rule_test": [
             {"eval_time": "4m", "alertname": "DeepwatchNoEventsProcessed", "exp_alerts": []},
             {"eval_time": "30m", "alertname": "DeepwatchNoEventsProcessed",
              "exp_alerts": [{"exp_labels": r["labels"], "exp_annotations": r["annotations"]}]}]},
        {"interval": "1m",  # the topic recreated twice while the workers idle: no page
         "input_series": [
             {"series": 'kafka_topic_partition_current_offset{job="kafka",topic="deepwatch.events",partition="0"}',
              "values": "5000x5 0x3 4000x3 0x30"},
             {"series": ok, "values": "900x40"}],
         "alert_rule_test": [{"eval_time": f"{m}m", "alertname": "DeepwatchNoEventsProcessed", "exp_alerts": []}
                             for m in (10, 14, 16, 20)]},
    ]}
    _promtool_test(tmp_path, cases)


# -- Alertmanager: grouping and inhibition per deployment -------------------------------
def _alert(name: str, deployment: str, **extra: str) -> dict:
    from datetime import datetime, timedelta, timezone

    r = next(x for g in rules.prometheus_rules()["groups"] for x in g["rules"] if x["alert"] == name)
    now = datetime.now(timezone.utc)
    return {"labels": {**r["labels"], "deployment": deployment, "alertname": name, **extra},
            "startsAt": (now - timedelta(minutes=1)).isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat()}


@pytest.mark.timeout(60)
def test_no_workers_at_all_inhibits_the_no_events_alert_of_its_own_deployment(alertmanager):
    """Every worker gone (compose's DNS or the pod discovery finds none): no
    `up` is left to read 0, so DeepwatchWorkerDown cannot fire and did not
    inhibit DeepwatchNoEventsProcessed; one cause paged twice, both critical."""
    sent = [_alert("DeepwatchNoWorkers", "a", job="deepwatch"), _alert("DeepwatchNoEventsProcessed", "a"),
            _alert("DeepwatchNoEventsProcessed", "b")]
    assert httpx.post(f"{alertmanager}/alerts", json=sent, timeout=5).status_code == 200

    def settled():
        got = {(a["labels"]["alertname"], a["labels"]["deployment"]): a["status"]
               for a in httpx.get(f"{alertmanager}/alerts", timeout=5).json()}
        return got if len(got) == 3 and got[("DeepwatchNoEventsProcessed", "a")]["inhibitedBy"] else None

    got = wait_for(settled, "DeepwatchNoWorkers did not inhibit DeepwatchNoEventsProcessed")
    assert got[("DeepwatchNoEventsProcessed", "a")]["state"] == "suppressed"
    assert got[("DeepwatchNoEventsProcessed", "b")] == {"state": "active", "inhibitedBy": [], "silencedBy": []}
    assert got[("DeepwatchNoWorkers", "a")]["state"] == "active"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cause, symptom", [("DeepwatchWorkerLoopStalled", "DeepwatchNoEventsProcessed"),
                                            ("DeepwatchConsumerLagGrowing", "DeepwatchEventToAlertLatencyHigh")])
def test_a_cause_inhibits_the_symptom_it_explains_within_its_deployment(alertmanager, cause, symptom):
    """A stalled worker loop processes nothing, as a dead worker does, and a
    growing backlog delays every alert behind it: each paged its symptom as
    well (two pages for one cause)."""
    sent = [_alert(cause, "a", job="deepwatch", instance="w1:6066"), _alert(symptom, "a"), _alert(symptom, "b")]
    assert httpx.post(f"{alertmanager}/alerts", json=sent, timeout=5).status_code == 200

    def settled():
        got = {(a["labels"]["alertname"], a["labels"]["deployment"]): a["status"]
               for a in httpx.get(f"{alertmanager}/alerts", timeout=5).json()}
        return got if len(got) == 3 and got[(symptom, "a")]["inhibitedBy"] else None

    got = wait_for(settled, f"{cause} did not inhibit {symptom}")
    assert got[(symptom, "a")]["state"] == "suppressed"
    assert got[(symptom, "b")]["state"] == "active"


@pytest.mark.timeout(60)
def test_an_outside_subscribers_backlog_on_the_alerts_topic_does_not_silence_the_latency_alert(alertmanager):
    """Any consumer group of the alerts topic is counted by the lag rule, a
    newsroom's own subscriber included: its backlog inhibited deepwatch's
    event->alert latency page."""
    sent = [_alert("DeepwatchConsumerLagGrowing", "a", consumergroup="newsroom-bot", topic="deepwatch.alerts"),
            _alert("DeepwatchEventToAlertLatencyHigh", "a")]
    assert httpx.post(f"{alertmanager}/alerts", json=sent, timeout=5).status_code == 200

    def settled():
        got = {a["labels"]["alertname"]: a["status"] for a in httpx.get(f"{alertmanager}/alerts", timeout=5).json()}
        return got if len(got) == 2 else None

    got = wait_for(settled, "the alerts were not both received")
    time.sleep(1.5)  # inhibitions are evaluated as alerts arrive: give it the time the other tests settle in
    got = {a["labels"]["alertname"]: a["status"] for a in httpx.get(f"{alertmanager}/alerts", timeout=5).json()}
    assert got["DeepwatchEventToAlertLatencyHigh"]["state"] == "active", got


@pytest.mark.timeout(60)
def test_no_ingest_at_all_inhibits_each_replicas_ingest_down_of_its_own_deployment(alertmanager):
    """Every serve-ingest replica down fires DeepwatchNoIngest (critical) and a
    DeepwatchIngestDown (warning) for each replica: one cause, paged once."""
    sent = [_alert("DeepwatchNoIngest", "a", job="deepwatch-ingest"),
            _alert("DeepwatchIngestDown", "a", job="deepwatch-ingest", instance="a-ingest-1:9400"),
            _alert("DeepwatchIngestDown", "b", job="deepwatch-ingest", instance="b-ingest-1:9400")]
    assert httpx.post(f"{alertmanager}/alerts", json=sent, timeout=5).status_code == 200

    def settled():
        got = {(a["labels"]["alertname"], a["labels"]["deployment"]): a["status"]
               for a in httpx.get(f"{alertmanager}/alerts", timeout=5).json()}
        return got if len(got) == 3 and got[("DeepwatchIngestDown", "a")]["inhibitedBy"] else None

    got = wait_for(settled, "DeepwatchNoIngest did not inhibit DeepwatchIngestDown")
    assert got[("DeepwatchIngestDown", "a")]["state"] == "suppressed"
    assert got[("DeepwatchIngestDown", "b")] == {"state": "active", "inhibitedBy": [], "silencedBy": []}
    assert got[("DeepwatchNoIngest", "a")]["state"] == "active"


@pytest.mark.timeout(60)
def test_one_notification_never_mixes_two_deployments(alertmanager):
    """Deployments sharing the Alertmanager (each Prometheus with its own
    `deployment` external label, as the inhibit rule requires) were grouped by
    alertname alone: deployment a's and b's dead workers came as one page, and
    one resolving re-sent the group with the other's still firing."""
    sent = [_alert("DeepwatchWorkerDown", d, job="deepwatch", instance=f"{d}-pipeline-1:9400", role="pipeline")
            for d in ("a", "b")]
    assert httpx.post(f"{alertmanager}/alerts", json=sent, timeout=5).status_code == 200

    def grouped():
        groups = httpx.get(f"{alertmanager}/alerts/groups", timeout=5).json()
        seen = [sorted(a["labels"]["deployment"] for a in g["alerts"]) for g in groups]
        return seen if sum(len(s) for s in seen) == 2 else None

    assert sorted(wait_for(grouped, "alerts not grouped")) == [["a"], ["b"]]


# -- what the latency panels say about their histograms ---------------------------------
def test_panel_descriptions_name_the_histograms_real_top_bucket():
    """The event-to-alert buckets were extended to 1800 s while the overview's
    stat and panel still said their quantile "reads at most 60 s: the
    histogram's largest bucket": an operator read 60 as "60 or more" where the
    panel showed the true value."""
    from streams import ingest_server, metrics
    from streams.desk import observe

    hists = {o._name: o for m in (metrics, ingest_server, observe) for o in vars(m).values()
             if isinstance(o, MetricWrapperBase) and o._type == "histogram"}
    checked = 0
    for p in dashboard_json()["panels"]:
        claims = re.findall(r"([0-9.]+) s[,:]? the histogram's largest bucket", p.get("description", ""))
        if not claims:
            continue
        names = {n for t in p["targets"] for n in re.findall(r"(deepwatch_\w+)_bucket", t["expr"])}
        assert len(names) == 1, p["title"]
        top = max(b for b in hists[names.pop()]._upper_bounds if b != float("inf"))
        for claim in claims:
            assert float(claim) == top, f"{p['title']}: says {claim} s, the largest bucket is {top:g} s"
            checked += 1
    assert checked >= 3


# -- the down / no-target pages have a panel to look at ----------------------------------
@needs_promtool
def test_every_job_a_down_rule_pages_on_is_on_the_targets_panel(tmp_path):
    """DeepwatchWorkerDown, DeskDown, IngestDown, KafkaExporterDown and the No*
    rules read `up` per job, and no panel showed `up` at all: the operator paged
    could not see which targets answer, nor how many were discovered."""
    jobs = sorted({j for e in rules.prometheus_rule_exprs() for j in re.findall(r'\bup\{job="([\w-]+)"\}', e)})
    assert {"deepwatch", "deepwatch-desk", "deepwatch-ingest", "kafka"} <= set(jobs)
    [panel] = [p for p in dashboard_json()["panels"] if p["title"] == "Scrape targets up by job"]
    up_expr, discovered_expr = (t["expr"] for t in panel["targets"])
    # per job: one target answering, one down; and a job no rule reads, left out
    series = [{"series": f'up{{job="{j}",instance="{j}-{n}:9400"}}', "values": v}
              for j in jobs for n, v in ((1, "1x10"), (2, "0x10"))]
    series.append({"series": 'up{job="node",instance="n1:9100"}', "values": "1x10"})
    cases = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [
            {"expr": up_expr, "eval_time": "5m",
             "exp_samples": [{"labels": f'{{job="{j}"}}', "value": 1} for j in jobs]},
            {"expr": discovered_expr, "eval_time": "5m",
             "exp_samples": [{"labels": f'{{job="{j}"}}', "value": 2} for j in jobs]},
        ],
    }]}
    _promtool_test(tmp_path, cases)


# -- DeepwatchWorkerDown had no promtool case that fires it ------------------------------
@needs_promtool
def test_worker_down_fires_for_the_worker_that_stopped_answering_only(tmp_path):
    """Every other operator rule had a case where it fires; DeepwatchWorkerDown
    was only ever asserted quiet. One pipeline worker stops answering at 10m:
    pending for 5 minutes, then one alert with its instance and role; the
    other worker, a desk and an ingest endpoint that are down too are not
    workers (their own rules page), and the alert resolves once it answers."""
    gen = tmp_path / "gen"
    build.write(gen)
    r = next(x for g in rules.prometheus_rules()["groups"] for x in g["rules"] if x["alert"] == "DeepwatchWorkerDown")
    w1 = {"job": "deepwatch", "instance": "pipeline-1:9400", "role": "pipeline"}
    cases = {"rule_files": [str(gen / "prometheus" / "deepwatch-rules.yaml")], "evaluation_interval": "30s", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="deepwatch",instance="pipeline-1:9400",role="pipeline"}', "values": "1x10 0x10 1x10"},
            {"series": 'up{job="deepwatch",instance="pipeline-2:9400",role="pipeline"}', "values": "1x30"},
            {"series": 'up{job="deepwatch-desk",instance="desk:9400"}', "values": "0x30"},
            {"series": 'up{job="deepwatch-ingest",instance="ingest:9400"}', "values": "0x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "9m", "alertname": "DeepwatchWorkerDown", "exp_alerts": []},
            {"eval_time": "14m", "alertname": "DeepwatchWorkerDown", "exp_alerts": []},  # pending
            {"eval_time": "17m", "alertname": "DeepwatchWorkerDown", "exp_alerts": [{
                "exp_labels": {**r["labels"], **w1},
                "exp_annotations": {**r["annotations"],
                                    "summary": "deepwatch worker pipeline-1:9400 is not answering /metrics"}}]},
            {"eval_time": "25m", "alertname": "DeepwatchWorkerDown", "exp_alerts": []},
            {"eval_time": "17m", "alertname": "DeepwatchNoWorkers", "exp_alerts": []},
        ],
    }]}
    _promtool_test(tmp_path, cases)
