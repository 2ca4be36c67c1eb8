"""Velocity that counts accounts (``Velocity.accounts_5m``), wherever an alert
is decided outside the stream or a velocity is shown, against real components
(the cluster engine as the cluster stage runs it, the Elasticsearch findings
store on the loopback fake with the mappings deepwatch puts, the SQLite store,
the desk app):

* one bot posting a fake 12 times is one account in the 5 minutes, ten
  accounts posting it once each are ten;
* the desk's Grafana rule ("Likely-AI picture going viral") reads that field:
  its query and threshold, run over the cluster documents the stream wrote,
  leave the bot's cluster quiet and fire for the ten accounts' (on
  ``velocity.sightings_5m`` the bot's 12 posts fired it);
* records stored before the field existed (SQLite JSON, Elasticsearch
  documents and v5 indices without it, alert JSON) still read, as 0;
* the desk shows the accounts beside the 5-minute velocity.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
from fastapi.testclient import TestClient

from dashboards import desk as desk_dashboards
from dashboards import rules
from streams import es_templates as T
from streams import virality
from streams.desk import create_app
from streams.es_docs import cluster_doc
from streams.es_store import EsFindingsStore
from streams.records import Alert, ClusterSnapshot, Velocity
from streams.settings import AlertSettings, FindingsSettings, Settings
from streams.store import open_store
from streams.virality import WINDOW_5M, RecentSighting
from tests.test_cluster_engine import AI, Harness, scene, sighting

ALERT_SCHEMA = Path(__file__).resolve().parents[1] / "streams" / "schemas" / "alert-v1.schema.json"


def _bot_and_crowd() -> tuple[list[ClusterSnapshot], list[ClusterSnapshot], Harness]:
    """Two likely-AI pictures through the cluster engine: one posted 12 times
    in 3 minutes by one bot, one posted once each by ten accounts in 1 minute
    (every snapshot of each, in order)."""
    h = Harness(Settings())
    bot_pic, crowd_pic = scene(41), scene(44)
    bot = [s for i in range(12)
           for s in h.see(sighting(bot_pic, f"bot{i}", i * 0.25, "bot", [AI] if i == 0 else [])).snapshots]
    crowd = [s for i in range(10)
             for s in h.see(sighting(crowd_pic, f"acc{i}", 2 + i * 0.1, f"acc{i}", [AI] if i == 0 else [])).snapshots]
    assert {s.cluster_id for s in bot}.isdisjoint({s.cluster_id for s in crowd}), "two pictures, two clusters"
    return bot, crowd, h


def test_the_engine_counts_a_bots_posts_as_one_account_and_ten_accounts_as_ten():
    bot, crowd, _h = _bot_and_crowd()
    assert (bot[-1].velocity.sightings_5m, bot[-1].velocity.accounts_5m) == (12, 1)
    assert (crowd[-1].velocity.sightings_5m, crowd[-1].velocity.accounts_5m) == (10, 10)
    # as the sightings grow, the accounts count along (each snapshot its own window)
    assert [s.velocity.accounts_5m for s in crowd if s.new_sighting] == list(range(1, 11))


def test_accounts_5m_keys_accounts_as_spread_does_and_shares_the_5_minute_window():
    """The same handle on two platforms is two accounts (``spread`` keys them
    so); a sighting exactly 5 minutes old is out, as ``sightings_5m`` counts."""
    now = 10_000.0
    rows = [(now - WINDOW_5M, "old", "x"),  # on the window's edge: out
            (now - 200, "alice", "x"), (now - 100, "alice", "mastodon"), (now - 50, "alice", "x"), (now, "bob", "x")]
    recent: list[RecentSighting] = []
    for i, (t, a, p) in enumerate(rows):
        recent = virality.add(recent, RecentSighting(t=t, e=f"e{i}", a=a, p=p, g=0), now)
    v = virality.velocity(recent, now)
    assert (v.sightings_5m, v.accounts_5m) == (4, 3)
    # the hour's count keys them the same way (alice on x and on mastodon, bob, and "old")
    assert v.accounts_1h == 4
    # with a cap of one post per account, the stream's spread counts accounts: the same number
    assert v.accounts_5m == virality.spread(recent, now, WINDOW_5M, per_account=1)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8000), st.integers(0, 6), st.sampled_from(["x", "bluesky"])), max_size=50))
def test_accounts_found_by_bisection_match_scanning_every_sighting(rows):
    recent: list[RecentSighting] = []
    now = 0.0
    for i, (t, a, p) in enumerate(rows):
        now = max(now, float(t))
        recent = virality.add(recent, RecentSighting(t=float(t), e=f"e{i}", a=f"a{a}", p=p, g=0), now)
    v = virality.velocity(recent, now)
    assert v.accounts_5m == len({(r.p, r.a) for r in recent if r.t > now - WINDOW_5M})
    assert v.accounts_1h == len({(r.p, r.a) for r in recent if r.t > now - virality.WINDOW_1H})
    assert v.accounts_5m <= v.sightings_5m and v.accounts_5m <= v.accounts_1h


# -- the desk's Grafana rule ------------------------------------------------------------------------------
def _viral_rule() -> dict[str, Any]:
    return next(r for r in rules.desk_rule_group_api()["rules"] if r["uid"] == rules.VIRAL_RULE_UID)


def _rule_query_body(model: dict[str, Any]) -> dict[str, Any]:
    """The Elasticsearch search Grafana's data source makes of query A: the
    rule's metric per cluster_id bucket over the live likely-AI documents.
    The evidence terms and the date histogram inside a cluster's bucket are
    left out: the rule reduces the histogram with ``max`` (asserted below),
    the max over the cluster's documents in the window, which the window
    here holds all of. The cluster buckets are a composite of the same field
    (the fake's ``terms`` aggregation runs no sub-aggregation; every cluster
    gets its bucket either way, the 50 of ``size`` being more than here)."""
    assert model["query"] == desk_dashboards.LIVE_LIKELY_AI == 'verdict:"likely-ai" AND NOT _exists_:merged_into'
    [metric] = model["metrics"]
    terms = model["bucketAggs"][0]
    assert terms["type"] == "terms" and terms["field"] == "cluster_id" and metric["type"] == "max"
    return {
        "size": 0,
        "query": {"bool": {"filter": [{"term": {"verdict": "likely-ai"}}],
                           "must_not": [{"exists": {"field": "merged_into"}}]}},
        "aggs": {terms["id"]: {"composite": {"sources": [{"cluster_id": {"terms": {"field": "cluster_id"}}}],
                                             "size": int(terms["settings"]["size"])},
                               "aggs": {metric["id"]: {"max": {"field": metric["field"]}}}}},
    }


def _rule_fires(es_url: str, index: str) -> dict[str, bool]:
    """Per cluster: does the viral rule's condition (C, the threshold on B,
    the max of A) hold over what ``index`` holds now?"""
    rule = _viral_rule()
    data = {d["refId"]: d["model"] for d in rule["data"]}
    assert rule["condition"] == "C" and data["C"]["expression"] == "B" and data["B"]["expression"] == "A"
    assert data["B"]["reducer"] == "max"
    [cond] = data["C"]["conditions"]
    kind, [bar] = cond["evaluator"]["type"], cond["evaluator"]["params"]
    compare = {"gt": lambda v: v > bar, "lt": lambda v: v < bar}[kind]
    body = _rule_query_body(data["A"])
    r = httpx.post(f"{es_url}/{index}/_search", json=body, headers={"content-type": "application/json"})
    r.raise_for_status()
    buckets = r.json()["aggregations"][next(iter(body["aggs"]))]["buckets"]
    metric_id = data["A"]["metrics"][0]["id"]
    # a cluster without the field has a null max: no data, which the rule takes as OK
    return {b["key"]["cluster_id"]: b[metric_id]["value"] is not None and compare(b[metric_id]["value"]) for b in buckets}


def _es_store(es_url: str) -> EsFindingsStore:
    s = EsFindingsStore.from_url(es_url.replace("http://", "es://"),
                                 settings=Settings(findings=FindingsSettings(retry_initial_s=0.001, retry_max_s=0.004)))
    s.bulk.sleep = lambda _s: None
    return s


def test_the_viral_rule_stays_quiet_for_one_bots_posts_and_fires_for_ten_accounts(fake_es):
    bot, crowd, _h = _bot_and_crowd()
    store = _es_store(fake_es.url)
    store.apply_snapshots([*bot, *crowd])
    store.refresh()
    fires = _rule_fires(fake_es.url, "deepwatch-clusters")
    store.close()
    assert fires == {bot[-1].cluster_id: False, crowd[-1].cluster_id: True}
    # the bar is the stream's own default, in accounts, and the annotation says so
    assert rules.VIRAL_ACCOUNTS_MIN == AlertSettings().min_sightings_5m
    [cond] = next(d for d in _viral_rule()["data"] if d["refId"] == "C")["model"]["conditions"]
    assert cond["evaluator"] == {"type": "gt", "params": [AlertSettings().min_sightings_5m - 1]}
    ann = _viral_rule()["annotations"]
    assert f"{AlertSettings().min_sightings_5m} or more distinct accounts" in ann["threshold"]
    assert "alerts.min_sightings_5m" in ann["threshold"] and "accounts" in ann["summary"]


def test_the_committed_provisioning_file_reads_accounts():
    """What Grafana loads is the generated file: it carries the field and the bar."""
    import yaml

    from dashboards import build

    [doc] = list(yaml.safe_load_all((build.GENERATED / "grafana" / "provisioning" / "alerting" / "deepwatch-desk.yaml")
                                    .read_text()))
    viral = next(r for g in doc["groups"] for r in g["rules"] if r["uid"] == rules.VIRAL_RULE_UID)
    data = {d["refId"]: d["model"] for d in viral["data"]}
    assert [m["field"] for m in data["A"]["metrics"]] == [rules.VIRAL_FIELD] == ["velocity.accounts_5m"]
    assert data["C"]["conditions"][0]["evaluator"]["params"] == [AlertSettings().min_sightings_5m - 1]


# -- records written before -------------------------------------------------------------------------------
def _v5_mapping(key: str) -> dict[str, Any]:
    """An index's mapping as v5 made it: this version's, less v6's ``velocity.accounts_5m``."""
    m = json.loads(json.dumps(T.component_templates()[f"deepwatch-{key}-mappings"]["template"]["mappings"]))
    m["properties"]["velocity"]["properties"].pop("accounts_5m", None)
    m["_meta"] = {"managed_by": "deepwatch", "mapping_version": 5}
    return m


def test_a_v5_index_takes_the_field_in_place_and_its_old_documents_still_read(fake_es):
    """The clusters mapping is strict: a v5 index refused every snapshot
    carrying ``accounts_5m``. Started on one, the store adds the field in
    place; the documents stored before (no ``accounts_5m``) read as 0, and the
    rule does not fire on them (no value), while a new snapshot counts."""
    bot, crowd, _h = _bot_and_crowd()
    old = crowd[-1]
    index_settings = {"analysis": T.ANALYSIS}  # as the v5 templates made every index
    for key in ("clusters", "alerts"):
        fake_es.make_index(f"deepwatch-{key}-v5", f"deepwatch-{key}", _v5_mapping(key), index_settings)
    for key in ("dead_letters", "deliveries", "processed"):
        name = T.names()[key]
        fake_es.make_index(f"{name}-v5", name, {**T.component_templates()[f"{name}-mappings"]["template"]["mappings"],
                                                "_meta": {"managed_by": "deepwatch", "mapping_version": 5}}, index_settings)
    doc = cluster_doc(old)
    del doc["velocity"]["accounts_5m"]
    fake_es.docs["deepwatch-clusters-v5"][old.cluster_id] = doc  # as a v5 worker wrote it

    store = _es_store(fake_es.url)
    store.ensure_setup()
    clusters_props = fake_es.index_mappings["deepwatch-clusters-v5"]["properties"]
    assert clusters_props["velocity"]["properties"]["accounts_5m"] == {"type": "long"}
    assert fake_es.index_mappings["deepwatch-alerts-v5"]["properties"]["velocity"]["properties"]["accounts_5m"] == {"type": "long"}
    assert fake_es.index_mappings["deepwatch-clusters-v5"]["_meta"]["mapping_version"] == T.MAPPING_VERSION
    [read] = store.clusters_by_id({old.cluster_id})
    assert read.velocity == Velocity(sightings_5m=10, sightings_1h=10, accounts_1h=10, engagement_1h=0, accounts_5m=0)
    store.refresh()
    assert _rule_fires(fake_es.url, "deepwatch-clusters") == {old.cluster_id: False}

    store.apply_snapshots(bot)  # refused by the strict v5 mapping before it took the field
    store.refresh()
    [read] = store.clusters_by_id({bot[-1].cluster_id})
    assert read.velocity.accounts_5m == 1 and read.velocity.sightings_5m == 12
    store.close()


def test_sqlite_records_and_alerts_stored_before_the_field_still_read(tmp_path):
    bot, crowd, h = _bot_and_crowd()
    store = open_store(tmp_path)
    store.apply_snapshots([*bot, *crowd])
    [alert] = h.alerts  # the ten accounts' cluster alerted; the bot's did not
    assert alert.cluster_id == crowd[-1].cluster_id and alert.velocity.accounts_5m == 10
    store.add_alert(alert)
    store.close()
    # the clusters' and the alert's JSON as a store written before accounts_5m holds them
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    with db:
        db.execute("UPDATE clusters SET velocity = json_remove(velocity, '$.accounts_5m')")
        db.execute("UPDATE alerts SET doc = json_remove(doc, '$.velocity.accounts_5m')")
    assert db.execute("SELECT count(*) FROM clusters WHERE json_extract(velocity, '$.accounts_5m') IS NOT NULL"
                      ).fetchone() == (0,)
    db.close()
    store = open_store(tmp_path)
    by_id = {c.id: c for c in store.clusters()}
    assert by_id[bot[-1].cluster_id].velocity == bot[-1].velocity.model_copy(update={"accounts_5m": 0})
    [stored] = store.alerts()
    assert stored.velocity.accounts_5m == 0 and stored.velocity.sightings_5m == alert.velocity.sightings_5m
    store.close()


def test_alert_json_round_trips_and_the_published_schema_takes_old_and_new():
    _bot, _crowd, h = _bot_and_crowd()
    [alert] = h.alerts
    schema = json.loads(ALERT_SCHEMA.read_text())
    new = json.loads(alert.model_dump_json())
    assert new["velocity"]["accounts_5m"] == 10 and new["schema_version"] == 1
    jsonschema.validate(new, schema)
    assert Alert.model_validate_json(alert.model_dump_json()) == alert
    old = json.loads(alert.model_dump_json())
    del old["velocity"]["accounts_5m"]
    jsonschema.validate(old, schema)  # a subscriber validating against the published schema takes both
    assert Alert.model_validate(old).velocity.accounts_5m == 0
    assert "accounts_5m" not in schema["$defs"]["Velocity"].get("required", [])
    # a subscriber still validating with the schema published before the field takes the new alerts
    before = json.loads(ALERT_SCHEMA.read_text())
    del before["$defs"]["Velocity"]["properties"]["accounts_5m"]
    jsonschema.Draft202012Validator(before).validate(new)


# -- the desk -----------------------------------------------------------------------------------------------
def test_the_desk_shows_accounts_beside_the_5_minute_velocity(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", "viewer:vi:viewer-token-0123456789abcdef")
    bot, crowd, _h = _bot_and_crowd()
    store = open_store(tmp_path)
    store.apply_snapshots([*bot, *crowd])
    store.close()
    desk_settings = Settings(data_dir=tmp_path)
    desk_settings.desk.account_check_s = 3600  # the background account check: once, at start
    with TestClient(create_app(desk_settings, host="127.0.0.1"), base_url="http://127.0.0.1") as c:
        queue = c.get("/")
        assert queue.status_code == 200
        bot_row = queue.text.split(f'data-cluster="{bot[-1].cluster_id}"')[1].split("</tr>")[0]
        crowd_row = queue.text.split(f'data-cluster="{crowd[-1].cluster_id}"')[1].split("</tr>")[0]
        assert "12/5m" in bot_row and "by 1 account<" in bot_row
        assert "10/5m" in crowd_row and "by 10 accounts<" in crowd_row
        page = c.get(f"/clusters/{bot[-1].cluster_id}")
        assert page.status_code == 200
        assert "12/5m <span class=\"accounts-5m\"" in page.text and "by 1 account</span>, 12/1h" in page.text
        api = c.get("/api/clusters").json()
        assert {d["id"]: d["velocity"]["accounts_5m"] for d in api} == {bot[-1].cluster_id: 1, crowd[-1].cluster_id: 10}


def test_a_velocity_written_before_reads_with_no_accounts():
    """Old records (any store, any consumer) parse: the field defaults to 0."""
    velocity = {"sightings_5m": 7, "sightings_1h": 7, "accounts_1h": 3, "engagement_1h": 0}
    v = Velocity.model_validate(velocity)
    assert v.accounts_5m == 0 and v.model_dump() == {**velocity, "accounts_5m": 0}
    assert Velocity.model_validate_json(v.model_dump_json()) == v


def test_the_desk_hides_the_accounts_of_a_closed_window(tmp_path, monkeypatch):
    """The desk takes velocity to its newest sighting (``quiet_since``, 0/5m)
    but leaves ``accounts_5m`` as the stream stored it: a burst that ended
    still said "by 10 accounts" beside "0/5m"."""
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", "viewer:vi:viewer-token-0123456789abcdef")
    bot, crowd, h = _bot_and_crowd()
    later = h.see(sighting(scene(2), "later", 20, "someone", [AI])).snapshots  # 17 minutes after the crowd's last
    store = open_store(tmp_path)
    store.apply_snapshots([*bot, *crowd, *later])
    store.close()
    desk_settings = Settings(data_dir=tmp_path)
    desk_settings.desk.account_check_s = 3600
    with TestClient(create_app(desk_settings, host="127.0.0.1"), base_url="http://127.0.0.1") as c:
        text = c.get("/").text
        crowd_row = text.split(f'data-cluster="{crowd[-1].cluster_id}"')[1].split("</tr>")[0]
        later_row = text.split(f'data-cluster="{later[-1].cluster_id}"')[1].split("</tr>")[0]
        assert "0/5m" in crowd_row and "quiet since" in crowd_row and "account" not in crowd_row.split("quiet")[0]
        assert "1/5m <span class=\"accounts-5m\"" in later_row and "by 1 account<" in later_row
        page = c.get(f"/clusters/{crowd[-1].cluster_id}").text
        assert "quiet since" in page and "accounts-5m" not in page


def test_a_count_added_later_is_read_not_refused():
    # Velocity refused unknown fields: a version before accounts_5m dead-lettered every snapshot and
    # alert a newer worker wrote while the two overlapped; counts added after this one are read
    from streams.records import Velocity

    v = Velocity.model_validate_json('{"sightings_5m": 3, "accounts_5m": 2, "accounts_15m": 9}')
    assert (v.sightings_5m, v.accounts_5m) == (3, 2) and "accounts_15m" not in v.model_dump()
