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
        ],
    }
    path = tmp_path / "rules.test.yaml"
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


def _start_prometheus(tmp_path: Path, worker_port: int, rules_file: Path, stack: ExitStack) -> str:
    from streams.broker import free_port

    port = free_port()
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{"job_name": "deepwatch", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}],
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
            in_store = Counter((d["stage"], d["reason"]) for d in store.dead_letters())
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
        if PROMETHEUS is None:
            pytest.skip("prometheus not on PATH (apt-get install prometheus): direct /metrics checks passed, "
                        "scrape through a real Prometheus skipped")
        # the generated rules as they are, except evaluated every second (the
        # group's own 30 s would outlast the test)
        fast = yaml.safe_load((generated / "prometheus" / "deepwatch-rules.yaml").read_text())
        for g in fast["groups"]:
            g["interval"] = "1s"
        fast_rules = tmp_path / "deepwatch-rules-1s.yaml"
        fast_rules.write_text(yaml.safe_dump(fast, sort_keys=False))
        base = _start_prometheus(tmp_path, worker.metrics_port, fast_rules, stack)
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
