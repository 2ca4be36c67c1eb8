"""dashboards/: generated artefacts match the code, PromQL only names metrics
that exist, publish.py speaks Grafana's HTTP API, and deploy/ agrees with both."""

from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from dashboards import build, provisioning, queries, rules
from dashboards.dashboard import DASHBOARD_UID, DATASOURCE_UID, dashboard_json, promql_exprs
from streams import ingest_server, metrics  # noqa: F401  ingest_server registers the endpoint's metrics
from streams.desk import observe as desk_observe
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


# -- drift --------------------------------------------------------------------
def _pinned_sdk() -> str:
    """The grafana-foundation-sdk version pyproject.toml pins (``==``): the one the artefacts are generated with."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    [pin] = [d.split("==", 1)[1].strip() for d in deps if re.match(r"grafana-foundation-sdk\s*==", d)]
    return pin


def test_generated_artefacts_are_up_to_date():
    from dashboards import sdk_version

    pinned = _pinned_sdk()
    if sdk_version() != pinned:
        pytest.skip(f"grafana-foundation-sdk {sdk_version()} is installed, the artefacts are generated with the pinned "
                    f"{pinned} (pyproject.toml); its defaults differ, so a byte comparison would only show that")
    rendered = build.render()
    on_disk = {str(p.relative_to(build.GENERATED)): p.read_text(encoding="utf-8")
               for p in build.GENERATED.rglob("*") if p.is_file()}
    stale = sorted(k for k in rendered if on_disk.get(k) != rendered[k])
    extra = sorted(set(on_disk) - set(rendered))
    assert not stale and not extra, (
        f"dashboards/generated is out of date (stale: {stale}, not generated any more: {extra}); "
        "run `python -m dashboards.build` and commit the result"
    )


def test_build_cli_writes_the_same_files(tmp_path):
    assert build.main(["--out", str(tmp_path)]) == 0
    for rel, text in build.render().items():
        assert (tmp_path / rel).read_text(encoding="utf-8") == text


def test_rendering_is_deterministic():
    assert build.render() == build.render()


# -- PromQL references only metrics and labels that exist -----------------------
_METRIC_CTOR = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(deepwatch_\w+)\"")


def _metric_modules() -> dict[str, object]:
    """Every module of the package that defines a deepwatch metric (found in the
    source, then imported): the workers (streams/metrics.py), the desk, the HTTP
    ingest endpoint, the live connectors (streams/connectors/base.py), and any
    module added later. Listing modules by hand left the connectors' five metrics
    on no panel."""
    import importlib

    out = {}
    for path in sorted((REPO / "streams").rglob("*.py")):
        if _METRIC_CTOR.search(path.read_text(encoding="utf-8")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name] = importlib.import_module(name)
    return out


def _metric_objects() -> list[MetricWrapperBase]:
    objs = {id(o): o for m in _metric_modules().values() for o in vars(m).values() if isinstance(o, MetricWrapperBase)}
    return list(objs.values())


def test_metric_modules_are_found():
    mods = _metric_modules()
    assert {"streams.metrics", "streams.desk.observe", "streams.ingest_server", "streams.connectors.base"} <= set(mods)
    defined = {m.removesuffix("_total") for p in (REPO / "streams").rglob("*.py")
               for m in _METRIC_CTOR.findall(p.read_text(encoding="utf-8"))}
    assert defined == {o._name for o in _metric_objects()}


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric a deepwatch process defines
    (``_metric_modules``)."""
    out: dict[str, set[str]] = {}
    for obj in _metric_objects():
        labels = set(obj._labelnames)
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["_sum", "_count", ""]}[obj._type]
        for s in suffixes:
            out[obj._name + s] = labels | ({"le"} if s == "_bucket" else set())
    return out


_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
# added by Prometheus to every scraped sample; `role` by both scrape configs' relabelling to the workers' job
_TARGET_LABELS = {"job", "instance", "role"}
# labels of the metrics queries.EXTERNAL_METRICS lists (kafka-exporter's, Prometheus' own ALERTS)
_EXTERNAL_LABELS = {"up": set(), "kafka_topic_partition_current_offset": {"topic", "partition"},
                    "kafka_consumergroup_lag_sum": {"consumergroup", "topic"},
                    "kafka_consumergroup_members": {"consumergroup"},
                    "ALERTS": {"alertname", "alertstate", "severity", "team"}}


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names used in its selector) for every selector in expr."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors, including [$__rate_interval]
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    found = []
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()", e):
        name, sel = m.group(1), m.group(2) or ""
        if name in _PROMQL_WORDS:
            continue
        found.append((name, set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", sel))))
    return found


def _grouping_labels(expr: str) -> set[str]:
    return {lbl.strip() for g in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lbl in g.split(",") if lbl.strip()}


def _all_exprs() -> dict[str, str]:
    exprs = {f"panel: {e}": e for e in promql_exprs(dashboard_json())}
    exprs.update({f"prometheus rule: {e}": e for e in rules.prometheus_rule_exprs()})
    exprs.update({f"grafana rule: {e}": e for e in rules.grafana_rule_exprs()})
    return exprs


def test_selector_parser_sees_metrics_and_labels():
    assert _selectors('sum by (stage) (rate(foo_total{stage="a",x=~"b|c"}[5m])) / bar or vector(0) > 1e-9') == [
        ("foo_total", {"stage", "x"}), ("bar", set()),
    ]


def test_every_promql_metric_exists():
    exported = _exported()
    assert "deepwatch_events_total" in exported and "deepwatch_stage_seconds_bucket" in exported
    problems = []
    for where, expr in _all_exprs().items():
        for name, labels in _selectors(expr):
            if name in queries.EXTERNAL_METRICS:
                continue
            if name not in exported:
                problems.append(f"{where}: unknown metric {name!r}")
            elif labels - exported[name] - _TARGET_LABELS:
                problems.append(f"{where}: {name} has no label(s) {sorted(labels - exported[name])}")
    assert not problems, "\n".join(problems)


def test_grouping_labels_exist_on_the_metrics_grouped():
    exported = _exported()
    for where, expr in _all_exprs().items():
        assert set(_EXTERNAL_LABELS) == set(queries.EXTERNAL_METRICS), "a new external metric: list its labels"
        known = {**exported, **_EXTERNAL_LABELS}
        names = [n for n, _ in _selectors(expr) if n in known]
        # target labels are on every scraped series, `up` and the exporters' included
        available = (set().union(*(known[n] for n in names)) if names else set()) | _TARGET_LABELS
        assert _grouping_labels(expr) <= available, where


def test_every_exported_metric_is_on_the_dashboard():
    used = {n for e in promql_exprs(dashboard_json()) for n, _ in _selectors(e)}
    families = {n.removesuffix("_bucket").removesuffix("_total") for n in used}
    missing = sorted(o._name for o in _metric_objects() if o._name not in families)
    assert not missing, f"exported but no panel shows them: {missing}"


def test_worker_metrics_are_read_from_the_workers_job_only():
    """One registry per process: the desk and the ingest endpoint export the
    workers' gauges and counters too (at 0), so a panel or rule on a worker
    metric without job="deepwatch" showed them as workers, and `max by
    (instance)` dropped the job and role the alert should carry."""
    worker_only = {"deepwatch_blob_store_held_seconds", "deepwatch_findings_lookup_held_seconds",
                   "deepwatch_blob_write_failures_total", "deepwatch_findings_lookup_failures_total",
                   "deepwatch_loop_heartbeat_timestamp_seconds"}
    # the desk and the ingest endpoint beat their own loops: their heartbeat is read under their own job
    servers = ('job="deepwatch-desk"', 'job="deepwatch-ingest"')
    checked = 0
    for where, expr in _all_exprs().items():
        e = re.sub(r"\[[^\]]*\]", "", expr)
        server = False
        for m in re.finditer(r"\b(deepwatch_\w+)(\{[^}]*\})?", e):
            if m.group(1) in worker_only:
                labels = m.group(2) or ""
                server = m.group(1) == "deepwatch_loop_heartbeat_timestamp_seconds" and any(s in labels for s in servers)
                assert 'job="deepwatch"' in labels or server, f"{where}: {m.group(0)} has no job filter"
                checked += 1
        if any(n in expr for n in worker_only):
            for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                wanted = {"instance", "job"} if server else {"instance", "job", "role"}
                assert wanted <= {g.strip() for g in group.split(",")}, f"{where}: by ({group})"
    assert checked >= 8
    from dashboards import rules as r

    for name in ("DeepwatchBlobStoreHeld", "DeepwatchFindingsLookupHeld", "DeepwatchWorkerLoopStalled"):
        [rule] = [x for g in r.prometheus_rules()["groups"] for x in g["rules"] if x["alert"] == name]
        assert 'job="deepwatch"' in rule["expr"] and "by (instance, job, role)" in rule["expr"], name


# -- dashboard structure --------------------------------------------------------
def test_dashboard_panels():
    doc = dashboard_json()
    assert doc["uid"] == DASHBOARD_UID
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for wanted in ("Events/s by stage & outcome", "Dead letters/s by stage & reason", "Live clusters",
                   "Stage latency p50 / p95", "Alerts raised", "Webhook deliveries", "Event → alert latency"):
        assert wanted in titles
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for p in panels:
        assert p["datasource"]["uid"] == DATASOURCE_UID
        assert p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == DATASOURCE_UID for t in p["targets"])
    # no two panels overlap on the grid
    cells = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        assert g["x"] + g["w"] <= 24
        cells |= mine


def _stat_panels() -> list[tuple[str, dict]]:
    from dashboards import desk

    return [(f"{doc['uid']}/{p['title']}", p) for doc in (dashboard_json(), desk.viral_json(), desk.spread_json())
            for p in doc["panels"] if p["type"] == "stat"]


# the only stat panels whose value can be bad, and where red starts
_RED_AT = {"deepwatch-overview/Event → alert p95": rules.EVENT_TO_ALERT_P95_MAX_S,
           "deepwatch-viral-fakes/Fastest spread (sightings / 5 min)": float(rules.VIRAL_VELOCITY_MIN)}


def test_stat_panels_have_explicit_colours():
    """Without thresholds Grafana colours a stat green, red from 80: "Live
    clusters", "Distinct images", "Alerts raised (range)" (and the desk's
    counts) read red in any healthy deployment."""
    stats = _stat_panels()
    assert len(stats) >= 8
    for where, p in stats:
        th = p.get("fieldConfig", {}).get("defaults", {}).get("thresholds")
        assert th and th["mode"] == "absolute", f"{where}: no explicit thresholds (Grafana's default is red at 80)"
        base, *steps = th["steps"]
        assert base["value"] is None and base["color"] != "red", where
        reds = [s["value"] for s in steps if s["color"] == "red"]
        assert reds == ([_RED_AT[where]] if where in _RED_AT else []), f"{where}: red at {reds}"
    assert set(_RED_AT) <= {w for w, _ in stats}


def test_latency_panel_has_both_quantiles():
    doc = dashboard_json()
    [panel] = [p for p in doc["panels"] if p["title"] == "Stage latency p50 / p95"]
    exprs = [t["expr"] for t in panel["targets"]]
    assert any(e.startswith("histogram_quantile(0.5,") for e in exprs)
    assert any(e.startswith("histogram_quantile(0.95,") for e in exprs)
    assert all("deepwatch_stage_seconds_bucket" in e for e in exprs)


# -- rules and provisioning -------------------------------------------------------
def test_operator_rules_cover_the_brief():
    names = {r["alert"] for g in rules.prometheus_rules()["groups"] for r in g["rules"]}
    assert {"DeepwatchDeadLetterRatioHigh", "DeepwatchNoEventsProcessed", "DeepwatchWebhookFailures",
            "DeepwatchStageLatencyHigh", "DeepwatchConsumerLagGrowing", "DeepwatchConnectorBehind"} <= names
    for g in rules.prometheus_rules()["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical")
            assert r["annotations"]["summary"]
            # a whole address: Alertmanager's receivers (pager, Slack, email) print it as it is
            url = r["annotations"]["runbook_url"]
            assert url == f"{rules.DEFAULT_RUNBOOK_BASE_URL}#{r['alert'].lower()}", url
            assert url.startswith("https://") and url.split("#")[0].endswith("/deploy/README.md")
            assert "runbook" not in r["annotations"], "the one annotation Prometheus tooling links: runbook_url"


def test_alerts_a_rule_steps_aside_for_are_rules_of_this_set():
    """A rule that reads ALERTS{alertname=~...} names other rules: a misspelt
    or renamed one matches nothing, and the rule never steps aside (it pages
    beside the alert that explains it)."""
    names = {r["alert"] for g in rules.prometheus_rules()["groups"] for r in g["rules"]}
    read = [n for e in rules.prometheus_rule_exprs() for alt in re.findall(r'ALERTS\{[^}]*alertname=~?"([^"]+)"', e)
            for n in alt.split("|")]
    assert set(rules.CONSUMER_LAG_EXPLAINED_BY) <= set(read)
    assert set(read) <= names, sorted(set(read) - names)


def test_runbook_base_url_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv(rules.RUNBOOK_BASE_URL_ENV, "https://git.example/ops/deepwatch/-/blob/prod/deploy/README.md")
    urls = [r["annotations"]["runbook_url"] for g in rules.prometheus_rules()["groups"] for r in g["rules"]]
    assert all(u.startswith("https://git.example/ops/deepwatch/-/blob/prod/deploy/README.md#deepwatch") for u in urls)
    monkeypatch.delenv(rules.RUNBOOK_BASE_URL_ENV)
    assert build.main(["--out", str(tmp_path), "--runbook-base-url", "https://docs.example/README.md"]) == 0
    text = (tmp_path / "prometheus" / "deepwatch-rules.yaml").read_text()
    assert "runbook_url: https://docs.example/README.md#deepwatchnoworkers" in text
    # the committed files use the default; the desk's Grafana rules keep their Grafana paths
    assert build.render()["prometheus/deepwatch-rules.yaml"].count(rules.DEFAULT_RUNBOOK_BASE_URL + "#") == len(urls)
    viral = rules.viral_fake_rule().build()
    assert viral.annotations["runbook_url"].startswith("/d/")


def _scrape_jobs(path: Path) -> set[str]:
    return {j["job_name"] for j in yaml.safe_load(path.read_text())["scrape_configs"]
            if j["job_name"].startswith("deepwatch")}


def test_every_deepwatch_scrape_job_has_a_rule_for_its_targets_down():
    """Prometheus scraped the ingest endpoint (job deepwatch-ingest) and no
    rule looked at it: an endpoint down, or refusing every request, paged
    nobody."""
    jobs = _scrape_jobs(DEPLOY / "prometheus" / "prometheus.yml")
    assert jobs == _scrape_jobs(DEPLOY / "k8s" / "prometheus-scrape.yml")
    assert {"deepwatch", "deepwatch-desk", "deepwatch-ingest"} <= jobs
    exprs = rules.prometheus_rule_exprs()
    for job in jobs:
        assert f'up{{job="{job}"}} == 0' in exprs, f"no rule fires when a target of job {job} is down"
    for job in jobs:  # the whole role gone: no `up` series left to be 0
        assert any(e == f'absent(up{{job="{job}"}})' or e.endswith(f' or absent(up{{job="{job}"}})') for e in exprs), job
    ingest = [e for e in exprs if "deepwatch_ingest_" in e]
    assert any("deepwatch_ingest_broker_failures_total" in e and 'cause="topic_missing"' in e for e in ingest)
    assert any("deepwatch_ingest_broker_failures_total" in e and 'cause="unavailable"' in e for e in ingest)
    assert any('deepwatch_ingest_requests_total{job="deepwatch-ingest",status="503"}' in e for e in ingest)
    assert all('job="deepwatch-ingest"' in sel for e in ingest for sel in re.findall(r"deepwatch_ingest_\w+\{[^}]*\}", e))


def test_runbook_sections_exist():
    readme = (DEPLOY / "README.md").read_text().lower()
    for g in rules.prometheus_rules()["groups"]:
        for r in g["rules"]:
            assert f"### {r['alert'].lower()}" in readme, f"deploy/README.md has no runbook section for {r['alert']}"


def test_desk_rule_provisioning_file_shape():
    doc = rules.desk_alerting_provisioning()
    assert doc["apiVersion"] == 1
    [group] = doc["groups"]
    assert group["folder"] and group["name"] == rules.DESK_GROUP and group["interval"] == "60s"
    viral, rule = group["rules"]
    assert viral["uid"] == rules.VIRAL_RULE_UID
    assert rule["condition"] == "C"
    assert [d["refId"] for d in rule["data"]] == ["A", "B", "C"]
    assert rule["data"][0]["datasourceUid"] == DATASOURCE_UID
    assert rule["data"][0]["relativeTimeRange"] == {"from": 600, "to": 0}
    assert all(d["datasourceUid"] == "__expr__" for d in rule["data"][1:])
    assert "deepwatch_alerts_total" in rule["data"][0]["model"]["expr"]
    assert not {"folderUID", "ruleGroup", "orgID"} & set(rule), "the file format does not repeat the group fields"


def test_provisioning_is_consistent():
    ds, *es_sources = provisioning.datasources()["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    assert {(d["uid"], d["jsonData"]["index"], d["jsonData"]["timeField"]) for d in es_sources} == {
        ("deepwatch-es-clusters", "deepwatch-clusters", "last_seen"),
        ("deepwatch-es-sightings", "deepwatch-sightings", "@timestamp"),
        ("deepwatch-es-alerts", "deepwatch-alerts", "created_at")}
    assert all(d["type"] == "elasticsearch" and "$DEEPWATCH_GRAFANA_ES_API_KEY" in d["secureJsonData"]["httpHeaderValue1"]
               for d in es_sources), "the ES key comes from Grafana's environment, never the file"
    [prov] = provisioning.dashboard_providers()["providers"]
    assert prov["type"] == "file" and prov["options"]["path"] == provisioning.DASHBOARDS_PATH
    assert prov["folder"] == rules.desk_alerting_provisioning()["groups"][0]["folder"]


# -- publish.py against a Grafana that answers like the real one -------------------
# Response bodies follow Grafana's documented HTTP API (dashboard, folder,
# datasource, alerting provisioning), trimmed to the fields a client reads.
def _grafana_routes(dashboard_status: int = 200, folder_exists: bool = False, datasource: bool = True):
    dash_ok = {"id": 1, "uid": DASHBOARD_UID, "url": f"/d/{DASHBOARD_UID}/deepwatch-pipeline-and-alerts",
               "status": "success", "version": 1, "slug": "deepwatch-pipeline-and-alerts"}
    dash_err = {412: {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"},
                401: {"message": "invalid API key"},
                403: {"message": "Access denied to save dashboard"}}
    folder = {"id": 7, "uid": rules.DESK_FOLDER_UID, "title": rules.DESK_FOLDER_TITLE,
              "url": f"/dashboards/f/{rules.DESK_FOLDER_UID}/deepwatch", "hasAcl": False, "canSave": True,
              "canEdit": True, "canAdmin": True, "version": 1}
    return {
        # grafana-client's health.check() reads buildInfo from the frontend settings
        ("GET", "/api/frontend/settings"): (200, {"appUrl": "http://localhost:3000/", "buildInfo": {
            "buildstamp": 1712650000, "commit": "03f502a94d", "edition": "Open Source", "env": "production",
            "hasUpdate": False, "hideVersion": False, "latestVersion": "", "version": "10.4.2"}}),
        ("GET", f"/api/folders/{rules.DESK_FOLDER_UID}"): (200, folder) if folder_exists else
            (404, {"message": "folder not found", "status": "not-found"}),
        ("POST", "/api/folders"): (200, folder),
        ("POST", "/api/dashboards/db"): (dashboard_status, dash_ok if dashboard_status == 200 else dash_err[dashboard_status]),
        ("PUT", f"/api/v1/provisioning/folder/{rules.DESK_FOLDER_UID}/rule-groups/{rules.DESK_GROUP}"): (200, "ECHO"),
        ("GET", f"/api/datasources/uid/{DATASOURCE_UID}"): (200, {"id": 1, "uid": DATASOURCE_UID, "name": "deepwatch-prometheus",
                                                                  "type": "prometheus", "access": "proxy"}) if datasource else
            (404, {"message": "Data source not found"}),
        **{("GET", f"/api/datasources/uid/{uid}"): (200, {"id": 2 + i, "uid": uid, "name": uid, "type": "elasticsearch",
                                                          "access": "proxy"}) if datasource else
           (404, {"message": "Data source not found"})
           for i, uid in enumerate(("deepwatch-es-clusters", "deepwatch-es-sightings", "deepwatch-es-alerts"))},
        # alerting provisioning API: an existing webhook receiver (updated), others created
        ("GET", "/api/v1/provisioning/contact-points"): (200, [
            {"uid": "deepwatch-desk-webhook", "name": "deepwatch-desk", "type": "webhook",
             "settings": {"url": "https://old.example/hook"}, "disableResolveMessage": False},
            {"uid": "", "name": "email receiver", "type": "email", "settings": {"addresses": "<example@email.com>"},
             "disableResolveMessage": False}]),
        ("POST", "/api/v1/provisioning/contact-points"): (202, "ECHO"),
        ("PUT", "/api/v1/provisioning/contact-points/deepwatch-desk-webhook"): (202, {"message": "contactpoint updated"}),
        ("PUT", "/api/v1/provisioning/policies"): (202, {"message": "policies updated"}),
    }


class _FakeGrafana(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, routes):
        self.routes = routes
        self.calls: list[dict] = []
        super().__init__(("127.0.0.1", 0), _GrafanaHandler)


class _GrafanaHandler(BaseHTTPRequestHandler):
    server: _FakeGrafana
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        path = self.path.split("?")[0]
        self.server.calls.append({"method": self.command, "path": path, "body": body,
                                  "auth": self.headers.get("Authorization"), "headers": dict(self.headers)})
        status, doc = self.server.routes.get((self.command, path), (404, {"message": "Not found"}))
        if doc == "ECHO":
            doc = body
        raw = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture
def fake_grafana(monkeypatch):
    servers = []

    def start(**kw) -> _FakeGrafana:
        srv = _FakeGrafana(_grafana_routes(**kw))
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        monkeypatch.setenv("GRAFANA_URL", f"http://127.0.0.1:{srv.server_address[1]}")
        monkeypatch.setenv("GRAFANA_TOKEN", "glsa_test_token")
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                    "DEEPWATCH_DESK_EMAILS", "DEEPWATCH_DESK_WEBHOOK_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("DEEPWATCH_DESK_WEBHOOK_URL", "https://desk.example/hook")
        monkeypatch.setenv("DEEPWATCH_DESK_SLACK_WEBHOOK_URL", "https://hooks.slack.example/T/B/x")
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_publish_creates_folder_dashboard_and_rule_group(fake_grafana):
    from dashboards import publish

    srv = fake_grafana()
    result = publish.publish(publish.client_from_env())
    assert result.dashboard_url == f"/d/{DASHBOARD_UID}/deepwatch-pipeline-and-alerts"
    assert result.dashboard_version == 1 and result.grafana_version == "10.4.2"
    assert result.folder_uid == rules.DESK_FOLDER_UID and result.datasource_found
    calls = [(c["method"], c["path"]) for c in srv.calls]
    assert ("POST", "/api/folders") in calls
    assert all(c["auth"] == "Bearer glsa_test_token" for c in srv.calls)
    dash_calls = [c for c in srv.calls if c["path"] == "/api/dashboards/db"]
    assert [c["body"]["dashboard"]["uid"] for c in dash_calls] == [DASHBOARD_UID, "deepwatch-viral-fakes", "deepwatch-spread"]
    dash_call = dash_calls[0]
    assert dash_call["body"]["overwrite"] is True and dash_call["body"]["folderUid"] == rules.DESK_FOLDER_UID
    assert dash_call["body"]["dashboard"]["uid"] == DASHBOARD_UID and dash_call["body"]["dashboard"]["id"] is None
    assert len(dash_call["body"]["dashboard"]["panels"]) == len(dashboard_json()["panels"])
    [rule_call] = [c for c in srv.calls if c["method"] == "PUT" and "/rule-groups/" in c["path"]]
    assert [r["uid"] for r in rule_call["body"]["rules"]] == [rules.VIRAL_RULE_UID, "deepwatch-desk-alert-raised"]
    assert rule_call["headers"].get("X-Disable-Provenance") == "true", "rules must stay editable in the UI"
    # contact points: the webhook (set in the env) updated in place, Slack created, email skipped (unset)
    [update] = [c for c in srv.calls if c["path"] == "/api/v1/provisioning/contact-points/deepwatch-desk-webhook"]
    assert update["body"]["settings"] == {"url": "https://desk.example/hook", "httpMethod": "POST"}
    [create] = [c for c in srv.calls if c["method"] == "POST" and c["path"] == "/api/v1/provisioning/contact-points"]
    assert create["body"]["type"] == "slack" and create["body"]["settings"]["url"] == "https://hooks.slack.example/T/B/x"
    assert result.contact_points == ["deepwatch-desk-webhook", "deepwatch-desk-slack"]
    assert result.skipped_receivers == ["deepwatch-desk-email (DEEPWATCH_DESK_EMAILS unset)"]
    [policy] = [c for c in srv.calls if c["path"] == "/api/v1/provisioning/policies"]
    assert policy["body"]["receiver"] == "deepwatch-desk" and "orgId" not in policy["body"]
    assert policy["body"]["routes"][0]["object_matchers"] == [["team", "=", "factcheck-desk"]]
    assert result.missing_datasources == []


def test_publish_reuses_existing_folder(fake_grafana):
    from dashboards import publish

    srv = fake_grafana(folder_exists=True)
    publish.publish(publish.client_from_env())
    assert ("POST", "/api/folders") not in [(c["method"], c["path"]) for c in srv.calls]


@pytest.mark.parametrize("status, needle", [(412, "changed by someone else"), (401, "Unauthorized"), (403, "Access denied")])
def test_publish_reports_grafana_refusals(fake_grafana, status, needle):
    from dashboards import publish

    fake_grafana(dashboard_status=status)
    with pytest.raises(publish.PublishError, match=needle):
        publish.publish(publish.client_from_env())


def test_publish_warns_when_datasource_missing(fake_grafana, capsys):
    from dashboards import publish

    fake_grafana(datasource=False)
    assert publish.main() == 0
    assert DATASOURCE_UID in capsys.readouterr().err


def test_publish_needs_url_and_token(monkeypatch):
    from dashboards import publish

    monkeypatch.delenv("GRAFANA_URL", raising=False)
    monkeypatch.setenv("GRAFANA_TOKEN", "x")
    with pytest.raises(publish.PublishError, match="GRAFANA_URL"):
        publish.client_from_env()
    monkeypatch.setenv("GRAFANA_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("GRAFANA_TOKEN")
    with pytest.raises(publish.PublishError, match="GRAFANA_TOKEN"):
        publish.client_from_env()


@pytest.mark.live
@pytest.mark.skipif(not os.environ.get("GRAFANA_URL"), reason="GRAFANA_URL is not set: no live Grafana to publish to")
def test_publish_to_live_grafana():
    from dashboards import publish

    api = publish.client_from_env()
    result = publish.publish(api, message="deepwatch live test")
    stored = api.dashboard.get_dashboard(DASHBOARD_UID)
    assert stored["dashboard"]["title"] == dashboard_json()["title"]
    assert stored["meta"]["folderUid"] == result.folder_uid
    group = api.alertingprovisioning.get_rule_group(result.folder_uid, rules.DESK_GROUP)
    assert [r["uid"] for r in group["rules"]] == [rules.VIRAL_RULE_UID, "deepwatch-desk-alert-raised"]


# -- deploy/ agrees with the settings object and the generated files ---------------
def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _settings_env_vars() -> set[str]:
    """Every setting's environment variable: top level, and ``SECTION__FIELD`` within a section."""
    from pydantic import BaseModel

    out = set()
    for name, f in Settings.model_fields.items():
        out.add(f"DEEPWATCH_{name.upper()}")
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out |= {f"DEEPWATCH_{name.upper()}__{sub.upper()}" for sub in f.annotation.model_fields}
    return out


def test_compose_parses_and_wires_services():
    [doc] = _yaml_docs(DEPLOY / "compose.yaml")
    svc = doc["services"]
    for name in ("kafka", "pipeline", "detect", "desk", "prometheus", "alertmanager", "grafana", "elasticsearch"):
        assert name in svc, f"compose has no {name} service"
    assert svc["pipeline"]["deploy"]["replicas"] == 2
    known = _settings_env_vars() | {"DEEPWATCH_WEBHOOK_SECRET", "DEEPWATCH_CONFIG", "DEEPWATCH_DESK_TOKENS"}
    desk = svc["desk"]
    assert desk["command"][0] == "serve" and "0.0.0.0" in desk["command"]
    assert "/healthz" in " ".join(desk["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for p in desk["ports"]), "the desk is published on loopback only"
    for role in ("pipeline", "detect"):
        env = svc[role]["environment"]
        env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
        assert env["DEEPWATCH_BROKER"].startswith("kafka://kafka:")
        assert "DEEPWATCH_DATA_DIR" in env and "DEEPWATCH_METRICS_PORT" in env
        unknown = {k for k in env if k.startswith("DEEPWATCH_")} - known
        assert not unknown, f"{role} sets env vars no setting reads: {unknown}"
        assert svc[role]["command"][:2] == ["worker", "--role"] or "--role" in " ".join(svc[role]["command"])
    mounts = " ".join(str(v) for v in svc["grafana"]["volumes"])
    assert "dashboards/generated/grafana/provisioning" in mounts and provisioning.DASHBOARDS_PATH in mounts
    assert "dashboards/generated/prometheus" in " ".join(str(v) for v in svc["prometheus"]["volumes"])


def test_prometheus_config_loads_generated_rules():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert any("deepwatch-rules.yaml" in f for f in cfg["rule_files"])
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    assert "deepwatch" in jobs, "rules select job=\"deepwatch\""
    desk_job = {j["job_name"]: j for j in cfg["scrape_configs"]}["deepwatch-desk"]
    assert desk_job["dns_sd_configs"][0]["names"] == ["desk"], "the desk is scraped apart from the workers' job"
    assert cfg["alerting"]["alertmanagers"]


def test_k8s_manifests_parse_and_reference_settings():
    docs = [d for p in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")) for d in _yaml_docs(p) if "metadata" in d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    # the pipeline in two halves: stateless analyze workers and the one cluster writer
    assert {("Deployment", "deepwatch-analyze"), ("Deployment", "deepwatch-cluster"), ("Deployment", "deepwatch-detect")} <= kinds
    assert ("Deployment", "deepwatch-desk") in kinds and ("Service", "deepwatch-desk") in kinds
    assert any(k == "ConfigMap" for k, _ in kinds) and any(k == "Secret" for k, _ in kinds)
    assert any(k == "Service" for k, _ in kinds)
    # read by streams.es_client.EsConfig (secrets only ever from the environment); the CA bundle is a
    # setting (findings.ca_certs), so its variable is among _settings_env_vars()
    es_env = {"DEEPWATCH_ES_API_KEY", "DEEPWATCH_ES_USERNAME", "DEEPWATCH_ES_PASSWORD"}
    known = _settings_env_vars() | {"DEEPWATCH_WEBHOOK_SECRET", "DEEPWATCH_CONFIG", "DEEPWATCH_DESK_TOKENS"} | es_env
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        [c] = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c.get("env", [])}
        assert {"DEEPWATCH_BROKER", "DEEPWATCH_DATA_DIR", "DEEPWATCH_CONFIG"} <= set(env), d["metadata"]["name"]
        assert not {k for k in env if k.startswith("DEEPWATCH_")} - known - {"DEEPWATCH_INGEST_TOKENS"}
        if c["args"][0] != "serve-ingest" and not {"analyze", "detect"} & set(c["args"]):
            # every process that raises alerts signs its webhooks
            assert env["DEEPWATCH_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["key"]
        else:  # and only those hold the key
            assert "DEEPWATCH_WEBHOOK_SECRET" not in env, d["metadata"]["name"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    [desk] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "deepwatch-desk"]
    [c] = desk["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "serve" and c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    tokens = {e["name"]: e for e in c["env"]}["DEEPWATCH_DESK_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert tokens["optional"] is True, "tokens are optional: users can log in without any"
    assert desk["spec"]["replicas"] == 1 and desk["spec"]["strategy"]["type"] == "Recreate"
    # the TOML in the ConfigMap is a valid settings file
    import tomllib

    [cm] = [c for c in configmaps.values() if "deepwatch.toml" in c.get("data", {})]
    toml = tomllib.loads(cm["data"]["deepwatch.toml"])
    s = Settings.model_validate(toml)
    assert s.alerts.webhooks and s.alerts.webhooks[0].secret_env == "DEEPWATCH_WEBHOOK_SECRET"
    # findings in Elasticsearch; no SQLite findings file on a volume shared across nodes
    assert s.findings.url and s.findings.url.startswith("https://")
    for d in docs:
        if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]:
            assert d["metadata"]["name"] == "deepwatch-blobs"
        if d["kind"] == "Deployment":
            vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
            [c] = d["spec"]["template"]["spec"]["containers"]
            data = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
            # SQLite never on a volume two pods open: pod-local, or a ReadWriteOnce
            # claim of a one-replica Deployment that lets go before it restarts
            claim = vols[data["name"]].get("persistentVolumeClaim", {}).get("claimName")
            if claim is None:
                assert "emptyDir" in vols[data["name"]], "the data dir (where SQLite would live) is pod-local"
            else:
                [pvc] = [p for p in docs if p["kind"] == "PersistentVolumeClaim" and p["metadata"]["name"] == claim]
                assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"], claim
                assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
            # of the claim pods share, only the write-once blob store and the models
            assert all(m.get("subPath") in ("blobs", "models") for m in c["volumeMounts"]
                       if vols.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName") == "deepwatch-blobs")
    for name in ("deepwatch-analyze", "deepwatch-cluster"):
        dep = next(d for d in docs if d["metadata"]["name"] == name)
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["DEEPWATCH_ES_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "deepwatch-elasticsearch", name


def test_k8s_prunes_the_shared_blob_store_daily_with_the_workers_settings():
    docs = [d for p in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")) for d in _yaml_docs(p) if "metadata" in d]
    [job] = [d for d in docs if d["kind"] == "CronJob"]
    assert "prune.yaml" in (DEPLOY / "k8s" / "base" / "kustomization.yaml").read_text()
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"][:3] == ["prune", "--older-than", "30d"]
    from streams.cli.prune import parse_period

    assert parse_period(c["args"][2]) == 30 * 86400
    env = {e["name"]: e for e in c["env"]}
    assert env["DEEPWATCH_CONFIG"]["value"] == "/etc/deepwatch/deepwatch.toml"  # findings.url: the clusters' store
    assert env["DEEPWATCH_ES_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "deepwatch-elasticsearch"
    vols = {v["name"]: v for v in pod["volumes"]}
    [blobs] = [m for m in c["volumeMounts"] if m["mountPath"] == "/data/blobs"]
    assert blobs["subPath"] == "blobs" and vols[blobs["name"]]["persistentVolumeClaim"]["claimName"] == "deepwatch-blobs"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_eck_overlay_runs_the_findings_cluster():
    docs = [d for p in sorted((DEPLOY / "k8s" / "overlays" / "eck").glob("*.yaml")) for d in _yaml_docs(p)]
    [es] = [d for d in docs if d.get("kind") == "Elasticsearch"]
    assert es["metadata"]["name"] == "deepwatch"  # ECK names the service deepwatch-es-http
    major, minor = (int(x) for x in es["spec"]["version"].split(".")[:2])
    assert (major, minor) >= (8, 15), "bit-vector kNN needs 8.15+"


def test_k8s_gpu_overlay_requests_a_gpu():
    docs = [d for p in sorted((DEPLOY / "k8s" / "overlays" / "gpu").glob("*.yaml")) for d in _yaml_docs(p)]
    text = json.dumps(docs)
    assert "nvidia.com/gpu" in text


def test_cli_grafana_provision(fake_grafana, monkeypatch):
    from typer.testing import CliRunner

    from streams.cli import app

    srv = fake_grafana()
    url = os.environ["GRAFANA_URL"]
    monkeypatch.delenv("GRAFANA_URL")
    r = CliRunner().invoke(app, ["grafana", "provision", "--url", url])  # token from GRAFANA_TOKEN
    assert r.exit_code == 0, r.output
    assert f"{url}/d/{DASHBOARD_UID}" in r.output and "deepwatch-desk-email (DEEPWATCH_DESK_EMAILS unset)" in r.output
    assert {c["path"] for c in srv.calls} >= {"/api/dashboards/db", "/api/v1/provisioning/policies",
                                              f"/api/v1/provisioning/folder/{rules.DESK_FOLDER_UID}/rule-groups/{rules.DESK_GROUP}"}
    monkeypatch.delenv("GRAFANA_TOKEN")
    r = CliRunner().invoke(app, ["grafana", "provision", "--url", url])
    assert r.exit_code == 2 and "GRAFANA_TOKEN" in r.output


def test_generated_dashboards_load_into_the_sdk_types():
    """Validation against the SDK's types: every generated dashboard parses
    back into grafana-foundation-sdk's Dashboard model and re-encodes to the
    same panels, targets and variables."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    for path in sorted((build.GENERATED / "grafana" / "dashboards").glob("*.json")):
        doc = json.loads(path.read_text())
        model = Dashboard.from_json(doc)
        again = json.loads(JSONEncoder(sort_keys=True).encode(model))
        assert again["uid"] == doc["uid"] and again["title"] == doc["title"], path.name
        assert [p.get("type") for p in again["panels"]] == [p.get("type") for p in doc["panels"]], path.name
        assert [p.get("targets") for p in again["panels"]] == [p.get("targets") for p in doc["panels"]], path.name
        # variables: what they query (other keys are version defaults: 11.x adds auto/auto_count/auto_min)
        key = lambda d: [(v["name"], v.get("query"), v.get("datasource")) for v in d.get("templating", {}).get("list", [])]  # noqa: E731
        assert key(again) == key(doc), path.name


def test_desk_dashboards_query_fields_the_es_mapping_has():
    from dashboards import desk
    from streams import es_templates as T

    comps = T.component_templates()
    fields = {
        "deepwatch-es-clusters": comps["deepwatch-clusters-mappings"]["template"]["mappings"]["properties"],
        "deepwatch-es-sightings": comps["deepwatch-sightings-mappings"]["template"]["mappings"]["properties"],
        "deepwatch-es-alerts": comps["deepwatch-alerts-mappings"]["template"]["mappings"]["properties"],
    }

    def has(props: dict, path: str) -> bool:
        node: dict = {"properties": props}
        for part in path.split("."):
            node = (node.get("properties") or {}).get(part) or (node.get("fields") or {}).get(part)
            if node is None:
                return False
        return True

    docs = [desk.viral_json(), desk.spread_json(), dashboard_json()]
    checked = 0
    for doc in docs:
        for panel in doc["panels"]:
            for t in panel.get("targets", []):
                uid = t.get("datasource", {}).get("uid")
                if uid not in fields:
                    continue
                used = [t["timeField"]] + [a["field"] for a in t.get("bucketAggs", []) + t.get("metrics", []) if a.get("field")]
                for f in used:
                    assert has(fields[uid], f), f"{doc['uid']} panel {panel['title']!r} uses {f}, not in {uid}'s mapping"
                    checked += 1
    for r in rules.desk_rule_group_api()["rules"]:
        for d in r["data"]:
            m = d["model"]
            if m.get("datasource", {}).get("uid") in fields:
                for a in m["bucketAggs"] + m["metrics"]:
                    assert has(fields[m["datasource"]["uid"]], a["field"]), a
                    checked += 1
    assert checked > 15


def test_alerting_provisioning_files_parse_and_agree():
    base = build.GENERATED / "grafana" / "provisioning"
    for path in sorted(base.rglob("*.yaml")):
        [doc] = _yaml_docs(path)
        assert doc["apiVersion"] == 1, path
    [cps] = _yaml_docs(base / "alerting" / "deepwatch-contact-points.yaml")
    [cp] = cps["contactPoints"]
    assert {r["type"] for r in cp["receivers"]} == {"webhook", "slack", "email"}
    # every address is an environment reference Grafana expands, never a literal
    for r in cp["receivers"]:
        for key in ("url", "addresses"):
            if key in r["settings"]:
                assert r["settings"][key].startswith("$DEEPWATCH_"), (r["uid"], key)
    [pol] = _yaml_docs(base / "alerting" / "deepwatch-policies.yaml")
    [root] = pol["policies"]
    names = {cp["name"]}
    assert root["receiver"] in names and all(r["receiver"] in names for r in root["routes"])
    [desk_route] = root["routes"]
    assert ["team", "=", "factcheck-desk"] in desk_route["object_matchers"] and "cluster_id" in desk_route["group_by"]
    [rules_doc] = _yaml_docs(base / "alerting" / "deepwatch-desk.yaml")
    labels = {r["uid"]: r["labels"] for g in rules_doc["groups"] for r in g["rules"]}
    assert all(lbl["team"] == "factcheck-desk" for lbl in labels.values()), "desk rules route to the desk"
    viral = next(r for g in rules_doc["groups"] for r in g["rules"] if r["uid"] == rules.VIRAL_RULE_UID)
    for key in ("summary", "description", "score", "evidence", "cluster_id", "runbook_url"):
        assert viral["annotations"][key], key
    [a] = [d for d in viral["data"] if d["refId"] == "A"]
    assert [b["field"] for b in a["model"]["bucketAggs"]][:2] == ["cluster_id", "evidence_summary.keyword"]


def test_slack_and_email_print_the_runbook_link_as_a_whole_address():
    """A rule's runbook_url is a path on Grafana ("/d/..."): printed as it is,
    Slack and email got a link that goes nowhere. The notification data's
    ExternalURL (Grafana's own address, trailing slash dropped) goes before it."""
    from dashboards import publish

    base = build.GENERATED / "grafana" / "provisioning" / "alerting"
    [cps] = _yaml_docs(base / "deepwatch-contact-points.yaml")
    settings = {r["type"]: r["settings"] for r in cps["contactPoints"][0]["receivers"]}
    link = '{{ with .Annotations.runbook_url }}{{ reReplaceAll "/$" "" $.ExternalURL }}{{ . }}'
    for text in (settings["slack"]["text"], settings["email"]["message"]):
        assert text.startswith("{{ range .Alerts }}") and link in text, text
        assert "{{ .Annotations.runbook_url }}" not in text, "the bare path is never printed"
        # Grafana expands $NAME, ${NAME}, $1 ... in provisioning files ("$$" is a "$"): none in a template
        assert not re.search(r"\$[{\w*#@!?-]", text.replace("$$", "")), text
    [rules_doc] = _yaml_docs(base / "deepwatch-desk.yaml")
    viral = next(r for g in rules_doc["groups"] for r in g["rules"] if r["uid"] == rules.VIRAL_RULE_UID)
    assert viral["annotations"]["runbook_url"].startswith("/d/"), "a path: ExternalURL's trailing slash is dropped"
    # the HTTP API (deepwatch grafana provision) gets the same templates
    env = {"DEEPWATCH_DESK_SLACK_WEBHOOK_URL": "https://hooks.slack.example/x", "DEEPWATCH_DESK_EMAILS": "desk@x.example"}
    sent = {r["type"]: r["settings"] for r in publish.resolved_receivers(env)[0]}
    assert sent["slack"]["text"] == settings["slack"]["text"] and sent["email"]["message"] == settings["email"]["message"]


# -- rules and panels that can fire / count what they claim ----------------------
def _histograms() -> dict[str, tuple[float, ...]]:
    """Histogram name -> its finite bucket bounds, for every histogram the
    workers and the desk export."""
    return {obj._name: tuple(b for b in obj._upper_bounds if b != float("inf"))
            for obj in [*vars(metrics).values(), *vars(desk_observe).values()]
            if isinstance(obj, MetricWrapperBase) and obj._type == "histogram"}


def test_histogram_quantile_thresholds_are_reachable():
    """histogram_quantile() never answers more than the largest finite bucket
    (everything above lands in +Inf and reads as that bound), so a rule
    `quantile > N` with N at or above it can never fire: the event-to-alert
    rule compared its p95 with 60 s, the top bucket."""
    hists = _histograms()
    problems = []
    for expr in rules.prometheus_rule_exprs():
        for name, threshold in re.findall(r"histogram_quantile\(.*?(\w+)_bucket\[.*?\)\)\)\s*>\s*([0-9.e+]+)", expr):
            if float(threshold) >= max(hists[name]):
                problems.append(f"{name}: quantile > {threshold} but the largest bucket is {max(hists[name])}: {expr}")
    assert not problems, "\n".join(problems)


def test_bucket_matchers_name_real_bucket_bounds():
    hists = _histograms()
    checked = 0
    for where, expr in _all_exprs().items():
        for name, values in re.findall(r'(\w+)_bucket\{[^}]*le=~?"([^"]+)"', expr):
            bounds = {float(v) for v in values.split("|")}
            # +Inf: every histogram has it (it counts every observation)
            assert bounds <= {*hists[name], float("inf")}, f"{where}: le {values} is not a bucket of {name} {hists[name]}"
            checked += 1
    assert checked, "the event-to-alert rule reads the 60 s bucket"
    assert rules.EVENT_TO_ALERT_P95_MAX_S in _histograms()["deepwatch_event_to_alert_seconds"]


def test_dead_letter_stages_cover_the_analyze_stage():
    """The ratio and "no events processed" rules count the stages an event can
    be dead-lettered in; "dedupe" (an event id taken by another picture, a
    findings store that cannot answer) was missing, so a store outage that
    dead-letters every event raised neither alert."""
    from dashboards import queries

    src = (REPO / "streams" / "stage.py").read_text()
    stages = set(re.findall(r'self\._stage = "(\w+)"', src))
    assert {"validate", "fetch", "decode", "dedupe"} <= stages
    assert stages <= set(queries.INGRESS_DEAD_STAGES.split("|"))
    assert stages <= set(re.search(r'stage=~"([^"]+)"', queries.events_processed()).group(1).split("|"))


def test_counter_panels_count_each_event_once():
    """Per-bar counts must not use increase() over $__rate_interval: that
    window is up to 4 steps wide, so one alert showed in up to four bars, and
    increase() never sees a labelled counter's first increment (the series is
    born at 1). tests/test_prometheus.py checks the replacement on series."""
    for expr in promql_exprs(dashboard_json()):
        assert not re.search(r"increase\([^)]*\[\$__rate_interval\]\)", expr), expr
    for expr in [*rules.prometheus_rule_exprs(), *rules.grafana_rule_exprs(), *promql_exprs(dashboard_json())]:
        for name in re.findall(r"increase\((\w+)", expr):
            pytest.fail(f"increase() over a rare-event counter misses its first increment: {name} in {expr}")


def test_operator_severities_follow_how_much_is_lost():
    """One ingest replica down (the others take its requests) was critical while
    every replica gone was a warning; "none left" is critical for every role."""
    sev = {r["alert"]: r["labels"]["severity"] for g in rules.prometheus_rules()["groups"] for r in g["rules"]}
    assert sev["DeepwatchIngestDown"] == "warning"
    for name in ("DeepwatchNoIngest", "DeepwatchNoDesk", "DeepwatchNoWorkers"):
        assert sev[name] == "critical", name


def test_viral_fakes_rank_only_clusters_seen_lately():
    """velocity.sightings_5m is as of a cluster's last sighting and never
    decays: the table took the 200 clusters with the latest last_seen in 6 hours
    and ranked a burst that ended hours ago as spreading now."""
    from dashboards import desk

    doc = desk.viral_json()
    panels = {p["title"]: p for p in doc["panels"]}
    for title in ("Likely-AI pictures by spread velocity", "Fastest spread (sightings / 5 min)"):
        [t] = panels[title]["targets"]
        assert t["query"] == f'{desk.LIVE_LIKELY_AI} AND last_seen:[${{__to}}||-{desk.SPREADING_WINDOW} TO *]', title
        assert t["timeField"] == "last_seen"
    assert desk.SPREADING_WINDOW == "15m", "the desk's viral rule reads the same 15 minutes"
    assert rules.viral_fake_rule().build().data[0].relative_time_range.from_val == 900


def test_no_created_series_are_exported():
    """prometheus_client wrote a `<name>_created` sample beside every counter and
    histogram (85 of a worker's 530 series); nothing reads them."""
    from prometheus_client import generate_latest

    _metric_modules()  # every module's metrics registered
    text = generate_latest().decode()
    assert "deepwatch_events_total" in text
    assert not [line for line in text.splitlines() if "_created" in line.split("{")[0].split(" ")[0]]
    for where, expr in _all_exprs().items():
        assert "_created" not in expr, where
    env = (DEPLOY / "Dockerfile").read_text()
    assert "PROMETHEUS_DISABLE_CREATED_SERIES=True" in env


def test_kubernetes_has_a_kafka_exporter_for_the_no_events_rule():
    """DeepwatchNoEventsProcessed reads kafka-exporter's offsets; Kubernetes
    shipped no exporter and no `kafka` job, so it was blind there and
    DeepwatchKafkaExporterDown (up == 0) had no series to fire on."""
    cfg = yaml.safe_load((DEPLOY / "k8s" / "prometheus-scrape.yml").read_text())
    [kafka] = [j for j in cfg["scrape_configs"] if j["job_name"] == "kafka"]
    docs = [d for p in sorted((DEPLOY / "k8s" / "kafka-exporter").glob("*.yaml")) for d in _yaml_docs(p)]
    [kust] = [d for d in docs if d.get("kind") == "Kustomization"]
    assert kust["namespace"] == "deepwatch"
    [dep] = [d for d in docs if d.get("kind") == "Deployment"]
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"danielqsj/kafka-exporter:v[\d.]+", c["image"]), "a pinned tag"
    [compose] = _yaml_docs(DEPLOY / "compose.yaml")
    assert c["image"] == compose["services"]["kafka-exporter"]["image"]
    # the job keeps the exporter's pod and its metrics port
    keep = {r["source_labels"][0]: r["regex"] for r in kafka["relabel_configs"] if r.get("action") == "keep"}
    component = dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_component"] == component
    [port] = c["ports"]
    assert keep["__meta_kubernetes_pod_container_port_name"] == port["name"]
    assert f"--web.listen-address=:{port['containerPort']}" in c["command"]
    # the broker the deepwatch Deployments use
    base = [d for p in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")) for d in _yaml_docs(p) if d.get("kind") == "Deployment"]
    brokers = {e["value"].removeprefix("kafka://") for d in base for cc in d["spec"]["template"]["spec"]["containers"]
               for e in cc.get("env", []) if e["name"] == "DEEPWATCH_BROKER"}
    [broker] = brokers
    assert f"--kafka.server={broker}" in c["command"]
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0 and sc["seccompProfile"]["type"] == "RuntimeDefault"
    expr = next(r["expr"] for g in rules.prometheus_rules()["groups"] for r in g["rules"]
                if r["alert"] == "DeepwatchKafkaExporterDown")
    assert 'up{job="kafka"} == 0' in expr and 'absent(kafka_topic_partition_current_offset{topic="deepwatch.events"})' in expr


def test_overview_stat_turns_red_where_the_latency_rule_counts():
    from dashboards import dashboard

    assert dashboard.EVENT_TO_ALERT_RED_S == rules.EVENT_TO_ALERT_P95_MAX_S


# -- datasources and rules for the deployment's addresses and prefixes ---------------
def _es_datasources(doc: dict) -> list[dict]:
    return [d for d in doc["datasources"] if d["type"] == "elasticsearch"]


def test_committed_datasources_reach_compose_elasticsearch():
    """The committed provisioning files are what compose's Grafana mounts:
    its Elasticsearch service, over plain http, as the workers reach it."""
    import tomllib
    from urllib.parse import urlsplit

    [compose] = _yaml_docs(DEPLOY / "compose.yaml")
    text = (build.GENERATED / "grafana" / "provisioning" / "datasources" / "deepwatch.yaml").read_text()
    es = _es_datasources(yaml.safe_load(text))
    assert len(es) == 3
    toml = tomllib.loads((DEPLOY / "deepwatch.toml").read_text())
    workers = urlsplit(toml["findings"]["url"])
    for d in es:
        url = urlsplit(d["url"])
        assert url.scheme == "http" and url.hostname in compose["services"], d["url"]
        assert "elasticsearch" in compose["services"][url.hostname]["image"]
        assert (url.hostname, url.port) == (workers.hostname, workers.port), "Grafana and the workers read one store"
        assert "tlsAuthWithCACert" not in d["jsonData"] and "tlsCACert" not in d.get("secureJsonData", {})


def test_kubernetes_datasources_reach_eck_over_https_with_its_ca(tmp_path):
    """provisioning.py named http://elasticsearch:9200 "compose service / k8s
    Service name"; Kubernetes has no such Service: ECK's is
    <name>-es-http, https with ECK's private CA. `--kubernetes` generates
    datasources for it."""
    import tomllib
    from urllib.parse import urlsplit

    from streams.settings_check import check_environment

    [eck] = [d for d in _yaml_docs(DEPLOY / "k8s" / "overlays" / "eck" / "elasticsearch.yaml")
             if d.get("kind") == "Elasticsearch"]
    [kust] = _yaml_docs(DEPLOY / "k8s" / "base" / "kustomization.yaml")
    service = f"{eck['metadata']['name']}-es-http"
    # the workers' address, in their own namespace
    [cm] = [d for d in _yaml_docs(DEPLOY / "k8s" / "base" / "configmap.yaml") if d.get("kind") == "ConfigMap"]
    assert urlsplit(tomllib.loads(cm["data"]["deepwatch.toml"])["findings"]["url"]).hostname == service
    # the CA bundle the workers mount is the Secret Grafana is told to read
    prune = _yaml_docs(DEPLOY / "k8s" / "base" / "prune.yaml")[0]
    secrets = {v["secret"]["secretName"] for v in prune["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}
    assert f"{service}-certs-public" in secrets

    assert build.main(["--out", str(tmp_path), "--kubernetes"]) == 0
    doc = yaml.safe_load((tmp_path / "grafana" / "provisioning" / "datasources" / "deepwatch.yaml").read_text())
    for d in _es_datasources(doc):
        url = urlsplit(d["url"])
        # named whole: a Grafana in another namespace resolves it (and ECK's certificate names it)
        assert (url.scheme, url.hostname, url.port) == ("https", f"{service}.{kust['namespace']}.svc", 9200), d["url"]
        assert d["jsonData"]["tlsAuthWithCACert"] is True and not d["jsonData"].get("tlsSkipVerify")
        assert d["secureJsonData"]["tlsCACert"] == f"${provisioning.KUBERNETES_ES_CA_CERT_ENV}"
        assert "$DEEPWATCH_GRAFANA_ES_API_KEY" in d["secureJsonData"]["httpHeaderValue1"]
    check_environment({provisioning.KUBERNETES_ES_CA_CERT_ENV: "x"})  # may share the workers' environment
    # everything else is as committed; --es-url and --es-ca-cert-env alone do the same
    committed = build.render()
    on_disk = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert {k for k in committed if committed[k] != on_disk[k]} == {"grafana/provisioning/datasources/deepwatch.yaml"}
    assert build.render(es_url=provisioning.KUBERNETES_ELASTICSEARCH_URL,
                        es_ca_cert_env=provisioning.KUBERNETES_ES_CA_CERT_ENV) == on_disk
    # and deploy/README.md says how
    readme = (DEPLOY / "README.md").read_text()
    assert "python -m dashboards.build --out grafana-k8s --kubernetes" in readme
    assert provisioning.KUBERNETES_ES_CA_CERT_ENV in readme and f"{service}-certs-public" in readme


def test_rules_and_datasources_follow_the_topic_and_index_prefixes(tmp_path):
    """The Kafka rules read `deepwatch.events` and the datasources
    `deepwatch-*` whatever topic_prefix and findings.index_prefix the
    workers used; regenerating for another prefix was not possible."""
    from streams.es_templates import names

    settings = Settings(topic_prefix="news.prod", findings={"index_prefix": "newsroom"})
    assert build.main(["--out", str(tmp_path), "--topic-prefix", "news.prod", "--index-prefix", "newsroom"]) == 0
    rules_text = (tmp_path / "prometheus" / "deepwatch-rules.yaml").read_text()
    doc = yaml.safe_load(rules_text)
    by_name = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    topic = settings.topic("events")
    for name in ("DeepwatchNoEventsProcessed", "DeepwatchKafkaExporterDown"):
        assert f'topic="{topic}"' in by_name[name]["expr"], by_name[name]["expr"]
        assert topic in by_name[name]["annotations"]["summary"]
    assert "deepwatch.events" not in rules_text
    ds = yaml.safe_load((tmp_path / "grafana" / "provisioning" / "datasources" / "deepwatch.yaml").read_text())
    want = names(settings.findings.index_prefix)
    assert sorted(d["jsonData"]["index"] for d in _es_datasources(ds)) == sorted(
        want[k] for k in ("clusters", "sightings", "alerts"))
    # the defaults are the settings' defaults, and the committed files use them
    assert rules.DEFAULT_TOPIC_PREFIX == Settings.model_fields["topic_prefix"].default
    from streams.settings import FindingsSettings

    assert provisioning.DEFAULT_INDEX_PREFIX == FindingsSettings().index_prefix
    committed = yaml.safe_load(build.render()["grafana/provisioning/datasources/deepwatch.yaml"])
    assert {d["jsonData"]["index"] for d in _es_datasources(committed)} == {
        names("deepwatch")[k] for k in ("clusters", "sightings", "alerts")}
    # documented where the committed copy is explained
    readme = (DEPLOY / "README.md").read_text()
    assert "--topic-prefix PREFIX" in readme and "--index-prefix PREFIX" in readme


@pytest.mark.parametrize("args", [["--topic-prefix", "news events"], ["--topic-prefix", ""],
                                  ["--index-prefix", "News"], ["--index-prefix", "_x"], ["--es-ca-cert-env", "ca-pem"]])
def test_build_refuses_a_prefix_the_workers_or_grafana_would_not_take(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as e:
        build.main(["--out", str(tmp_path), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m dashboards.build: error: ") and repr(args[1]) in err, err
    assert not list(tmp_path.iterdir()), "nothing written"
