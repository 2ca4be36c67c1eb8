"""Operator rules an on-call engineer can trust: ratio rules that need some
traffic before a share means anything, consumers and connectors that fall
behind, and runbook links that land on their section.

Each rule is run by promtool on synthetic series (the committed rules'
generator, as tests/test_prometheus.py does); without promtool those cases
skip with the reason (.ci/install-prometheus.sh installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import build, rules

REPO = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus)")


def _rule(name: str) -> dict:
    return next(r for g in rules.prometheus_rules()["groups"] for r in g["rules"] if r["alert"] == name)


def _fires(name: str, at: str, labels: dict | None = None, **annotations: str) -> dict:
    r = _rule(name)
    return {"eval_time": at, "alertname": name, "exp_alerts": [
        {"exp_labels": {**r["labels"], **(labels or {})}, "exp_annotations": {**r["annotations"], **annotations}}]}


def _quiet(*names: str, at: str) -> list[dict]:
    return [{"eval_time": at, "alertname": n, "exp_alerts": []} for n in names]


def _promtool_test(tmp_path: Path, tests: list[dict], **build_options: str) -> None:
    gen = tmp_path / "gen"
    build.write(gen, **build_options)
    cases = {"rule_files": [str(gen / "prometheus" / "deepwatch-rules.yaml")], "evaluation_interval": "30s",
             "tests": tests}
    path = tmp_path / "traffic.test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    res = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# -- ratio rules and their traffic floors ------------------------------------------------
_OK = 'deepwatch_events_total{job="deepwatch",instance="w1",stage="analyze",outcome="ok"}'
_DEAD = 'deepwatch_dead_letters_total{job="deepwatch",instance="w1",stage="fetch",reason="http_error"}'


def _events(per_minute_ok: float, per_minute_dead: float) -> list[dict]:
    return [{"series": _OK, "values": f"0+{per_minute_ok:g}x60"},
            {"series": _DEAD, "values": f"0+{per_minute_dead:g}x60"}]


@needs_promtool
def test_dead_letter_ratio_needs_traffic(tmp_path):
    """One dead letter of two events in 10 minutes (a quiet night) read 50 %
    and paged; the same half dead-lettered at 2 events/s is an outage. The
    floor is 60 incoming events per 10 minutes: 50 stay quiet, 70 fire."""
    name = "DeepwatchDeadLetterRatioHigh"
    _promtool_test(tmp_path, [
        {"interval": "1m", "input_series": _events(0.1, 0.1), "alert_rule_test": [*_quiet(name, at="30m"),
                                                                                 *_quiet(name, at="59m")]},
        {"interval": "1m", "input_series": _events(2.5, 2.5), "alert_rule_test": _quiet(name, at="40m")},
        {"interval": "1m", "input_series": _events(3.5, 3.5), "alert_rule_test": [
            _fires(name, "40m", summary="More than 50% of incoming events are dead-lettered")]},
        {"interval": "1m", "input_series": _events(60, 60), "alert_rule_test": [
            *_quiet(name, at="5m"),  # pending
            _fires(name, "30m", summary="More than 50% of incoming events are dead-lettered")]},
    ])


def _desk(route: str, status: str, values: str) -> dict:
    return {"series": f'deepwatch_desk_requests_total{{job="deepwatch-desk",instance="d1",route="{route}",'
                      f'method="GET",status="{status}"}}', "values": values}


@needs_promtool
def test_desk_errors_need_traffic_and_leave_the_probes_out(tmp_path):
    """One 500 of three desk requests in 10 minutes paged. And the other way:
    three replicas' readiness probes (/healthz every 10 s, always 200, the
    findings store never asked) counted as desk traffic, so a search route
    failing one request in ten for a fact-checker at work read 3 % and never
    paged."""
    name = "DeepwatchDeskErrors"
    _promtool_test(tmp_path, [
        {   # 3 a.m.: three requests in 10 minutes, one of them a 500
            "interval": "1m",
            "input_series": [_desk("/", "200", "0+0.2x60"), _desk("/api/clusters", "500", "0+0.1x60")],
            "alert_rule_test": [*_quiet(name, at="30m"), *_quiet(name, at="59m")],
        },
        {   # a fact-checker at work (0.15 requests/s), one in ten searches failing, and the probes
            "interval": "1m",
            "input_series": [_desk("/healthz", "200", "0+18x60"), _desk("/api/clusters", "200", "0+8.1x60"),
                             _desk("/api/search", "500", "0+0.9x60")],
            "alert_rule_test": [*_quiet(name, at="5m"),  # pending
                                _fires(name, "30m", summary="10% of desk requests fail with a server error")],
        },
        {   # only the probes: nobody at the desk, nothing to say
            "interval": "1m",
            "input_series": [_desk("/healthz", "200", "0+18x60")],
            "alert_rule_test": _quiet(name, at="30m"),
        },
    ])


def _ingest(accepted: str, refused: str, unavailable: str) -> list[dict]:
    job = 'job="deepwatch-ingest",instance="i1"'
    return [{"series": f'deepwatch_ingest_requests_total{{{job},token="tip",status="202"}}', "values": accepted},
            {"series": f'deepwatch_ingest_requests_total{{{job},token="tip",status="503"}}', "values": refused},
            {"series": f'deepwatch_ingest_broker_failures_total{{{job},cause="unavailable"}}', "values": unavailable},
            {"series": f'deepwatch_ingest_broker_failures_total{{{job},cause="topic_missing"}}', "values": "0x60"}]


@needs_promtool
def test_ingest_ratios_need_traffic(tmp_path):
    """A scraper posting once a minute, one request in two refused (a broker
    hiccup, then busy): 50 % paged critical. At 10 requests/s the same share
    is an outage."""
    _promtool_test(tmp_path, [
        {"interval": "1m", "input_series": _ingest("0+0.5x60", "0+0.5x60", "0+0.5x60"),
         "alert_rule_test": _quiet("DeepwatchIngestBrokerFailures", "DeepwatchIngestBusy", at="30m")},
        {"interval": "1m", "input_series": _ingest("0+0.5x60", "0+0.5x60", "0x60"),
         "alert_rule_test": _quiet("DeepwatchIngestBrokerFailures", "DeepwatchIngestBusy", at="30m")},
        {"interval": "1m", "input_series": _ingest("0+300x60", "0+300x60", "0+300x60"), "alert_rule_test": [
            _fires("DeepwatchIngestBrokerFailures", "20m",
                   summary="50% of HTTP ingest requests are refused: the broker does not take their events"),
            *_quiet("DeepwatchIngestBusy", at="20m")]},
        {"interval": "1m", "input_series": _ingest("0+300x60", "0+300x60", "0x60"), "alert_rule_test": [
            _fires("DeepwatchIngestBusy", "25m", summary="50% of HTTP ingest requests are refused as busy"),
            *_quiet("DeepwatchIngestBrokerFailures", at="25m")]},
    ])


def _alert_times(per_minute: float) -> list[dict]:
    """Alerts stored ``per_minute``, every one more than 60 s after its event."""
    series = [{"series": f'deepwatch_event_to_alert_seconds_bucket{{job="deepwatch",instance="w1",le="{le}"}}',
               "values": f"0+{per_minute:g}x60" if le == "+Inf" else "0x60"} for le in ("10.0", "30.0", "60.0", "+Inf")]
    return [*series, {"series": 'deepwatch_event_to_alert_seconds_count{job="deepwatch",instance="w1"}',
                      "values": f"0+{per_minute:g}x60"}]


@needs_promtool
def test_event_to_alert_latency_needs_more_than_one_alert(tmp_path):
    """One alert every 10 minutes, each a little late: "100 % of alerts late"
    paged for what is one slow alert at a time. A steady stream of late
    alerts still does."""
    name = "DeepwatchEventToAlertLatencyHigh"
    _promtool_test(tmp_path, [
        {"interval": "1m", "input_series": _alert_times(0.1), "alert_rule_test": [*_quiet(name, at="40m"),
                                                                                 *_quiet(name, at="59m")]},
        {"interval": "1m", "input_series": _alert_times(1), "alert_rule_test": [
            _fires(name, "40m", summary="100% of alerts reach the desk more than 60s after the triggering post "
                                        "(p95 above 60s)")]},
    ])


def _stage(stage: str, per_minute: float) -> list[dict]:
    """Observations of ``stage`` at ``per_minute``, every one between 5 and 10 s."""
    return [{"series": f'deepwatch_stage_seconds_bucket{{job="deepwatch",instance="w1",stage="{stage}",le="{le}"}}',
             "values": "0x60" if le in ("0.001", "5") else f"0+{per_minute:g}x60"} for le in ("0.001", "5", "10", "+Inf")]


@needs_promtool
def test_stage_latency_needs_traffic_per_stage(tmp_path):
    """A p95 of one fetch every two minutes is that fetch: one slow image host
    at night paged as the stage being slow. A busy stage still pages, and the
    floor is each stage's own (a quiet slow stage beside it stays quiet)."""
    name = "DeepwatchStageLatencyHigh"
    _promtool_test(tmp_path, [
        {"interval": "1m", "input_series": _stage("fetch", 0.5), "alert_rule_test": [*_quiet(name, at="30m"),
                                                                                     *_quiet(name, at="59m")]},
        {"interval": "1m", "input_series": [*_stage("fetch", 60), *_stage("decode", 0.5)], "alert_rule_test": [
            _fires(name, "30m", {"stage": "fetch"}, summary="p95 latency of stage fetch is 9.75s")]},
    ])


def test_every_share_or_quantile_rule_has_a_traffic_floor():
    """Any rule that divides by traffic, or reads a quantile of it, stands on
    a handful of samples when traffic is low; each must say how much traffic
    it needs (``and on (...) (traffic >= floor)``)."""
    unfloored = []
    for g in rules.prometheus_rules()["groups"]:
        for r in g["rules"]:
            e = r["expr"]
            if (" / " in e or "histogram_quantile" in e) and not re.search(r"\) and on \([\w, ]*\) \(.+ >= [0-9.e-]+\)$", e):
                unfloored.append(f"{r['alert']}: {e}")
    assert not unfloored, "\n".join(unfloored)


# -- consumers falling behind -----------------------------------------------------------
# a worker answering its scrape: with none at all DeepwatchNoWorkers fires, and the lag is its symptom
_WORKER_UP = {"series": 'up{job="deepwatch",instance="w1",role="pipeline"}', "values": "1x90"}


def _lag(values: str, group: str = "deepwatch", topic: str = "deepwatch.events") -> dict:
    return {"series": f'kafka_consumergroup_lag_sum{{job="kafka",instance="kafka-exporter:9308",'
                      f'consumergroup="{group}",topic="{topic}"}}', "values": values}


@needs_promtool
def test_consumer_lag_growing_fires_on_a_sustained_growing_backlog_only(tmp_path):
    """No rule paged while a consumer group fell further and further behind
    (reading, so DeepwatchNoEventsProcessed stayed quiet). It pages on a
    backlog over 1000 that keeps growing; not on one scrape's spike, an idle
    topic whose backlog does not move, a backlog draining, a small one, nor
    the topics of another deployment or Faust's own."""
    name = "DeepwatchConsumerLagGrowing"
    events = {"consumergroup": "deepwatch", "topic": "deepwatch.events"}
    _promtool_test(tmp_path, [
        {   # 100 messages a minute more than the group reads
            "interval": "1m", "input_series": [_WORKER_UP, _lag("0+100x60")],
            "alert_rule_test": [*_quiet(name, at="10m"), *_quiet(name, at="20m"),  # under 1000, then pending
                                _fires(name, "35m", events, summary="Consumer group deepwatch is 3500 messages "
                                                                    "behind on deepwatch.events, and falling further "
                                                                    "behind")]},
        {   # one scrape read a large lag (a rebalance), then back to none
            "interval": "1m", "input_series": [_WORKER_UP, _lag("0x20 5000 0x39")],
            "alert_rule_test": [*_quiet(name, at="21m"), *_quiet(name, at="30m"), *_quiet(name, at="50m")]},
        {   # an idle topic: its group stuck on 5000 old messages, nothing new arrives
            "interval": "1m", "input_series": [_WORKER_UP, _lag("5000x60")],
            "alert_rule_test": [*_quiet(name, at="30m"), *_quiet(name, at="59m")]},
        {   # a backlog draining after a restart
            "interval": "1m", "input_series": [_WORKER_UP, _lag("50000-500x60")],
            "alert_rule_test": [*_quiet(name, at="30m"), *_quiet(name, at="59m")]},
        {   # growing, but small: 600 messages after an hour
            "interval": "1m", "input_series": [_WORKER_UP, _lag("0+10x60")],
            "alert_rule_test": _quiet(name, at="59m")},
        {   # a group no worker reads for any more (a layout change left its offsets), beside one that reads
            "interval": "1m",
            "input_series": [_WORKER_UP, _lag("0+100x60", "old-layout"), _lag("0+100x60"),
                             {"series": 'kafka_consumergroup_members{job="kafka",consumergroup="old-layout"}',
                              "values": "0x60"},
                             {"series": 'kafka_consumergroup_members{job="kafka",consumergroup="deepwatch"}',
                              "values": "2x60"}],
            "alert_rule_test": [_fires(name, "35m", events, summary="Consumer group deepwatch is 3500 messages "
                                                                    "behind on deepwatch.events, and falling further "
                                                                    "behind")]},
        {   # another deployment's topic and Faust's changelog (read at recovery only) on the same broker
            "interval": "1m",
            "input_series": [_WORKER_UP, _lag("0+100x60", "other", "other.events"),
                             _lag("0+100x60", "deepwatch", "deepwatch-clusters-changelog")],
            "alert_rule_test": _quiet(name, at="40m")},
    ])


@needs_promtool
def test_consumer_lag_follows_the_topic_prefix(tmp_path):
    """Rules for another topic_prefix read that prefix's topics, with its dots as dots."""
    name = "DeepwatchConsumerLagGrowing"
    _promtool_test(tmp_path, [
        {"interval": "1m", "input_series": [_WORKER_UP, _lag("0+100x60", "deepwatch", "news.prod.alerts")],
         "alert_rule_test": [_fires(name, "35m", {"consumergroup": "deepwatch", "topic": "news.prod.alerts"},
                                    summary="Consumer group deepwatch is 3500 messages behind on news.prod.alerts, "
                                            "and falling further behind")]},
        {"interval": "1m", "input_series": [_WORKER_UP, _lag("0+100x60", "deepwatch", "newsXprod.alerts"),
                                            _lag("0+100x60", "deepwatch", "deepwatch.events")],
         "alert_rule_test": _quiet(name, at="35m")},
    ], topic_prefix="news.prod")


@needs_promtool
def test_consumer_lag_steps_aside_for_the_alert_that_explains_it(tmp_path):
    """A dead worker: DeepwatchWorkerDown pages, and its partitions' backlog is
    its symptom, not a second page. Once it is back and the group still falls
    behind, the lag alert has nothing left to step aside for."""
    name = "DeepwatchConsumerLagGrowing"
    _promtool_test(tmp_path, [
        {"interval": "1m",
         "input_series": [{"series": 'up{job="deepwatch",instance="w1",role="pipeline"}', "values": "0x40 1x49"},
                          _lag("0+100x90")],
         "alert_rule_test": [
             _fires("DeepwatchWorkerDown", "35m", {"job": "deepwatch", "instance": "w1", "role": "pipeline"},
                    summary="deepwatch worker w1 is not answering /metrics"),
             *_quiet(name, at="35m"),
             _fires(name, "75m", {"consumergroup": "deepwatch", "topic": "deepwatch.events"},
                    summary="Consumer group deepwatch is 7500 messages behind on deepwatch.events, and falling "
                            "further behind")]},
        {   # the detect role scaled to 0: its group's offsets stay, its topic's backlog grows for good,
            # and DeepwatchModelResultsOverdue already pages for it
            "interval": "1m",
            "input_series": [_WORKER_UP,
                             {"series": 'deepwatch_model_requests_total{job="deepwatch",instance="w1"}',
                              "values": "0+100x60"},
                             _lag("0+100x60", "deepwatch-detect", "deepwatch.detect-requests")],
            "alert_rule_test": [_fires("DeepwatchModelResultsOverdue", "40m"), *_quiet(name, at="40m")]},
    ])


def _cursor(values: str, connector: str = "bluesky", stream: str = "jetstream") -> dict:
    return {"series": f'deepwatch_connector_cursor_lag_seconds{{job="deepwatch-connect",instance="c1:9400",'
                      f'connector="{connector}",stream="{stream}"}}', "values": values}


def _frames(values: str, connector: str = "bluesky", stream: str = "jetstream") -> dict:
    return {"series": f'deepwatch_connector_frames_total{{job="deepwatch-connect",instance="c1:9400",'
                      f'connector="{connector}",outcome="image_post",stream="{stream}"}}', "values": values}


@needs_promtool
def test_connector_behind_fires_while_it_reads_and_falls_behind_only(tmp_path):
    """The cursor-lag gauge had a panel and no rule. It pages when a stream's
    saved cursor is over 15 minutes behind live and keeps falling behind
    while its connector reads frames: checkpoints failing (the same window
    read again), or reading slower than the platform posts. Not a quiet
    hashtag (its cursor waits at its last post while nothing is missed), a
    connector catching up after a restart, or one scrape's spike."""
    name = "DeepwatchConnectorBehind"
    labels = {"connector": "bluesky", "stream": "jetstream", "instance": "c1:9400"}
    _promtool_test(tmp_path, [
        {   # frames arrive, no checkpoint lands: the lag grows with the wall clock
            "interval": "1m", "input_series": [_cursor("2+60x60"), _frames("0+600x60")],
            "alert_rule_test": [*_quiet(name, at="14m"), *_quiet(name, at="20m"),  # under 15 min, then pending
                                _fires(name, "40m", labels, summary="Connector bluesky stream jetstream is 40m 2s "
                                                                    "behind live, and falling further behind")]},
        {   # reading at half the platform's pace
            "interval": "1m", "input_series": [_cursor("0+30x90"), _frames("0+600x90")],
            "alert_rule_test": [*_quiet(name, at="35m"),
                                _fires(name, "60m", labels, summary="Connector bluesky stream jetstream is 30m 0s "
                                                                    "behind live, and falling further behind")]},
        {   # a quiet hashtag: nothing posted, nothing read
            "interval": "1m",
            "input_series": [_cursor("0+60x60", "mastodon", "#deepfake"), _frames("5x60", "mastodon", "#deepfake")],
            "alert_rule_test": _quiet(name, at="45m")},
        {   # ... beside a busy timeline in the same connector process: its frames are not the hashtag's
            "interval": "1m",
            "input_series": [_cursor("0+60x60", "mastodon", "#deepfake"), _frames("5x60", "mastodon", "#deepfake"),
                             _cursor("2x60", "mastodon", "public"), _frames("0+600x60", "mastodon", "public")],
            "alert_rule_test": _quiet(name, at="45m")},
        {   # catching up after an hour down
            "interval": "1m", "input_series": [_cursor("3600-50x60"), _frames("0+600x60")],
            "alert_rule_test": [*_quiet(name, at="30m"), *_quiet(name, at="55m")]},
        {   # one scrape's spike, and a connector keeping up
            "interval": "1m", "input_series": [_cursor("2x30 2000 2x29"), _frames("0+600x60")],
            "alert_rule_test": [*_quiet(name, at="31m"), *_quiet(name, at="45m")]},
    ])


# -- what an operator paged reads --------------------------------------------------------
def _github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower-cased, punctuation
    other than - and _ dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _readme_anchors() -> list[str]:
    text = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    in_code, anchors = False, []
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.append(_github_anchor(m.group(1)))
    return anchors


def test_runbook_links_land_on_their_own_section():
    """Each rule's runbook_url fragment must be a heading's anchor, exactly
    (a heading that only starts with the name is another section), and every
    in-page link of the runbook must land on one."""
    anchors = _readme_anchors()
    assert len(anchors) == len(set(anchors)), "two sections with one anchor: GitHub numbers the second"
    for g in rules.prometheus_rules()["groups"]:
        for r in g["rules"]:
            fragment = r["annotations"]["runbook_url"].split("#", 1)[1]
            assert fragment in anchors, f"{r['alert']}: no section #{fragment} in deploy/README.md"
    text = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    assert not [f for f in links if f not in anchors], "in-page links to no section"


def test_runbooks_state_the_traffic_floors_the_rules_use():
    """The runbook says below how much traffic a ratio rule stays quiet; the
    numbers it gives are the constants' (per the rule's window)."""
    text = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")

    def section(name: str) -> str:
        return text.split(f"### {name.lower()}\n", 1)[1].split("\n### ", 1)[0]

    floors = {"DeepwatchDeadLetterRatioHigh": (rules.DEAD_LETTER_RATIO_MIN_EVENTS_PER_S, 600, "events per 10 minutes"),
              "DeepwatchDeskErrors": (rules.DESK_ERROR_RATIO_MIN_REQUESTS_PER_S, 600, "requests per 10 minutes"),
              "DeepwatchIngestBrokerFailures": (rules.INGEST_RATIO_MIN_REQUESTS_PER_S, 300, "per 5 minutes"),
              "DeepwatchIngestBusy": (rules.INGEST_RATIO_MIN_REQUESTS_PER_S, 600, "per 10 minutes"),
              "DeepwatchEventToAlertLatencyHigh": (rules.EVENT_TO_ALERT_MIN_ALERTS_PER_S, 900, "alerts per 15 minutes"),
              "DeepwatchStageLatencyHigh": (rules.STAGE_LATENCY_MIN_PER_S, 300, "events per 5 minutes")}
    for name, (per_s, window_s, unit) in floors.items():
        count = round(per_s * window_s)
        assert f"{count} {unit}" in section(name).replace("\n", " "), f"{name}: runbook should say {count} {unit}"
        assert f"{per_s:g}" in _rule(name)["expr"], name


def test_descriptions_say_where_to_look():
    """A page that only names the symptom ("the worker process is down")
    leaves the operator to guess the next step: every description names a
    command, setting or log line (in backticks), a dashboard panel (in
    quotes), a log to read or a thing to check or do."""
    verbs = re.compile(r"\b(check|restart|run|add|free|fix|look|give|split|remove|renew|silence|start|drop)\b", re.I)
    vague = []
    for g in rules.prometheus_rules()["groups"]:
        for r in g["rules"]:
            d = r["annotations"]["description"]
            if not ("`" in d or '"' in d or re.search(r"\blogs?\b", d) or verbs.search(d)):
                vague.append(f"{r['alert']}: {d}")
    assert not vague, "\n".join(vague)
