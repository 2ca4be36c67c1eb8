"""The fact-check desk's dashboards, on the Elasticsearch findings
(``streams/es_templates.py`` field names are the contract):

- "Viral fakes now": likely-AI clusters ordered by how fast they spread,
  with a link to each picture, its score, evidence, reach and first sighting;
- "One picture's spread": one cluster (a dashboard variable) over time:
  sightings by platform, its top accounts and its evidence.

Both carry an annotation layer of deepwatch's own alerts (``deepwatch-alerts``).
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard as dash, elasticsearch as es, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef, DataTransformerConfig, DynamicConfigValue, Threshold, ThresholdsMode, VariableRefresh, VariableSort,
)
from grafana_foundation_sdk.models.elasticsearch import TermsOrder

from streams.settings import AlertSettings

VIRAL_UID = "deepwatch-viral-fakes"
SPREAD_UID = "deepwatch-spread"

# Grafana's Elasticsearch datasource is one index pattern + one time field each.
ES_CLUSTERS_UID = "deepwatch-es-clusters"  # deepwatch-clusters, time = last_seen
ES_SIGHTINGS_UID = "deepwatch-es-sightings"  # deepwatch-sightings data stream, time = @timestamp
ES_ALERTS_UID = "deepwatch-es-alerts"  # deepwatch-alerts, time = created_at
ES_CLUSTERS = DataSourceRef(type_val="elasticsearch", uid=ES_CLUSTERS_UID)
ES_SIGHTINGS = DataSourceRef(type_val="elasticsearch", uid=ES_SIGHTINGS_UID)
ES_ALERTS = DataSourceRef(type_val="elasticsearch", uid=ES_ALERTS_UID)

LIVE_LIKELY_AI = 'verdict:"likely-ai" AND NOT _exists_:merged_into'
# A cluster's velocity.sightings_5m is as of its last sighting and never decays: a burst that
# ended hours ago kept its number and ranked as spreading now. "Now" = a sighting in the
# SPREADING_WINDOW before the end of the dashboard's range ($__to, epoch ms; Elasticsearch date
# math on it), the same 15 minutes the desk's viral alert rule reads.
SPREADING_WINDOW = "15m"
SPREADING_NOW = f"{LIVE_LIKELY_AI} AND last_seen:[${{__to}}||-{SPREADING_WINDOW} TO *]"
SPREAD_LINK = f"/d/{SPREAD_UID}?var-cluster=${{__value.raw}}&${{__url_time_range}}"


def _es(ref: str, ds: DataSourceRef, query: str, time_field: str) -> es.Dataquery:
    return es.Dataquery().ref_id(ref).datasource(ds).query(query).time_field(time_field)


def _count(id_: str = "1") -> es.Count:
    return es.Count().id(id_)


def _terms(field: str, size: int, id_: str, order_by: str = "_count") -> es.Terms:
    return es.Terms().id(id_).field(field).settings(
        es.ElasticsearchTermsSettings().size(str(size)).order(TermsOrder.DESC).order_by(order_by).min_doc_count("1"))


def _histogram(field: str, id_: str) -> es.DateHistogram:
    return es.DateHistogram().id(id_).field(field).settings(
        es.ElasticsearchDateHistogramSettings().interval("auto").min_doc_count("0"))


def _alerts_annotation() -> dash.AnnotationQuery:
    # the query and field settings are added by annotation_fields() below
    return dash.AnnotationQuery().name("deepwatch alerts").datasource(ES_ALERTS).enable(True).icon_color("red")


def _link(title: str, url: str) -> dict[str, Any]:
    return {"title": title, "url": url}


def thresholds(base: str, *steps: tuple[float, str]) -> dash.ThresholdsConfig:
    """Explicit colours for a stat panel: without them Grafana's defaults (green, red at 80)
    turned any healthy count past 80 red. ``base`` for every value below the first step."""
    return dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=None, color=base), *(Threshold(value=v, color=c) for v, c in steps)])


NEUTRAL = "blue"  # a count that is neither good nor bad


def _stat(title: str, description: str, target: es.Dataquery, calc: str, unit: str = "none",
          colours: dash.ThresholdsConfig | None = None) -> stat.Panel:
    # the targets bucket by time: "sum" totals the range, "max" takes its peak
    return (stat.Panel().title(title).description(description).datasource(target.build().datasource)
            .height(4).span(6).unit(unit).thresholds(colours or thresholds(NEUTRAL))
            .reduce_options(common_b.ReduceDataOptions().calcs([calc]).values(False))
            .with_target(target))


def _raw(ref: str, ds: DataSourceRef, query: str, time_field: str, size: int) -> es.Dataquery:
    return _es(ref, ds, query, time_field).metrics([es.RawData().id("1").settings(
        es.ElasticsearchRawDataSettings().size(str(size)))]).bucket_aggs([])


# The viral table's columns: source field -> header (order = display order).
VIRAL_COLUMNS = {
    "cluster_id": "Cluster", "picture_url": "Picture", "fake_score": "Fake score", "evidence_summary": "Evidence",
    "velocity.sightings_5m": "Sightings / 5 min", "stream_sightings": "Sightings", "stream_accounts": "Accounts",
    "platforms": "Platforms", "first_seen": "First seen", "alert_level": "Alert level",
}


def viral_dashboard() -> dash.Dashboard:
    organize = DataTransformerConfig(id_val="organize", options={
        "excludeByName": {},
        "includeByName": {f: True for f in VIRAL_COLUMNS},
        "indexByName": {f: i for i, f in enumerate(VIRAL_COLUMNS)},
        "renameByName": VIRAL_COLUMNS,
    })
    by_velocity = DataTransformerConfig(id_val="sortBy", options={
        "fields": {}, "sort": [{"field": "velocity.sightings_5m", "desc": True}]})
    viral_table = (
        table.Panel().title("Likely-AI pictures by spread velocity")
        .description("Live clusters the detectors call likely AI-generated or manipulated, seen in the last "
                     f"{SPREADING_WINDOW} of the time range, fastest-spreading first (sightings in the 5 minutes "
                     "before each one's last sighting). Click a cluster for its spread.")
        .datasource(ES_CLUSTERS).height(14).span(24)
        .with_target(_raw("A", ES_CLUSTERS, SPREADING_NOW, "last_seen", 200))
        .with_transformation(by_velocity).with_transformation(organize)
        .override_by_name("Cluster", [DynamicConfigValue(id_val="links", value=[
            _link("Spread of this picture", SPREAD_LINK)])])
        .override_by_name("Picture", [DynamicConfigValue(id_val="links", value=[
            _link("Open the picture", "${__value.raw}")])])
        .override_by_name("Fake score", [
            DynamicConfigValue(id_val="unit", value="percentunit"), DynamicConfigValue(id_val="decimals", value=0),
            DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background", "mode": "basic"}),
            DynamicConfigValue(id_val="thresholds", value={"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "orange", "value": 0.4}, {"color": "red", "value": 0.7}]}),
        ])
        .override_by_name("Evidence", [DynamicConfigValue(id_val="custom.width", value=420)])
    )
    return (
        dash.Dashboard("deepwatch — Viral fakes now").uid(VIRAL_UID)
        .description("What the fact-check desk looks at first: likely-AI pictures spreading right now.")
        .tags(["deepwatch", "desk", "generated"]).refresh("30s").time("now-6h", "now").timezone("utc").editable()
        .annotation(_alerts_annotation())
        .with_panel(_stat("Likely-AI pictures active", "Live likely-AI clusters with a sighting in the time range.",
                          _es("A", ES_CLUSTERS, LIVE_LIKELY_AI, "last_seen").metrics([_count()])
                          .bucket_aggs([_histogram("last_seen", "2")]), "sum"))
        .with_panel(_stat("Fastest spread (sightings / 5 min)",
                          f"The highest 5-minute velocity among those seen in the last {SPREADING_WINDOW} of the "
                          "time range (red at the desk's viral alert bar, alerts.min_sightings_5m).",
                          _es("A", ES_CLUSTERS, SPREADING_NOW, "last_seen").metrics([
                              es.Max().id("1").field("velocity.sightings_5m")]).bucket_aggs([_histogram("last_seen", "2")]),
                          "max", colours=thresholds("green", (float(AlertSettings().min_sightings_5m), "red"))))
        .with_panel(_stat("Alerts raised", "deepwatch alerts in the time range (first alerts and escalations).",
                          _es("A", ES_ALERTS, "*", "created_at").metrics([_count()])
                          .bucket_aggs([_histogram("created_at", "2")]), "sum"))
        .with_panel(_stat("Sightings", "Posts carrying any tracked picture in the time range.",
                          _es("A", ES_SIGHTINGS, "*", "@timestamp").metrics([_count()])
                          .bucket_aggs([_histogram("@timestamp", "2")]), "sum"))
        .with_panel(viral_table)
    )


def spread_dashboard() -> dash.Dashboard:
    cluster_var = (
        dash.QueryVariable("cluster").label("Picture (cluster)").datasource(ES_CLUSTERS)
        .description("Live clusters (not merged away); type any cluster id.")
        .query(json.dumps({"find": "terms", "field": "cluster_id", "query": "NOT _exists_:merged_into", "size": 500}))
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
    )
    this = 'cluster_id:"$cluster"'
    over_time = (
        timeseries.Panel().title("Sightings over time by platform")
        .description("Posts of this picture (and of clusters merged into it after the merge) per interval.")
        .datasource(ES_SIGHTINGS).height(9).span(16).unit("short").min(0).fill_opacity(30)
        .draw_style(common.GraphDrawStyle.BARS).stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
        .with_target(_es("A", ES_SIGHTINGS, this, "@timestamp").metrics([_count()])
                     .bucket_aggs([_terms("platform", 10, "2"), _histogram("@timestamp", "3")]))
    )
    top_accounts = (
        bargauge.Panel().title("Top accounts").description("Accounts that posted this picture most in the range.")
        .datasource(ES_SIGHTINGS).height(9).span(8).unit("short").min(0)
        .orientation(common.VizOrientation.HORIZONTAL)
        .reduce_options(common_b.ReduceDataOptions().calcs(["sum"]).values(False))
        .with_target(_es("A", ES_SIGHTINGS, this, "@timestamp").metrics([_count()])
                     .bucket_aggs([_terms("account_id", 10, "2"), _histogram("@timestamp", "3")]))
    )
    evidence_cols = {"cluster_id": "Cluster", "fake_score": "Fake score", "verdict": "Verdict",
                     "evidence_summary": "Evidence", "stream_sightings": "Sightings", "stream_accounts": "Accounts",
                     "platforms": "Platforms", "hashtags": "Hashtags", "first_seen": "First seen",
                     "last_seen": "Last seen", "picture_url": "Picture", "blob_refs": "Images (sha256)"}
    evidence = (
        table.Panel().title("Evidence and reach").description("The cluster's fused verdict and strongest evidence.")
        .datasource(ES_CLUSTERS).height(8).span(24)
        .with_target(_raw("A", ES_CLUSTERS, this, "last_seen", 1))
        .time_from("10y")  # the cluster document, whatever the range
        .with_transformation(DataTransformerConfig(id_val="organize", options={
            "excludeByName": {}, "includeByName": {f: True for f in evidence_cols},
            "indexByName": {f: i for i, f in enumerate(evidence_cols)}, "renameByName": evidence_cols}))
        .override_by_name("Picture", [DynamicConfigValue(id_val="links", value=[_link("Open the picture", "${__value.raw}")])])
    )
    texts = (
        table.Panel().title("What the posts say").description("Post texts, accounts and links of this picture's sightings.")
        .datasource(ES_SIGHTINGS).height(10).span(24)
        .with_target(_raw("A", ES_SIGHTINGS, this, "@timestamp", 100))
        .with_transformation(DataTransformerConfig(id_val="organize", options={
            "excludeByName": {}, "includeByName": {f: True for f in ("@timestamp", "platform", "account_handle",
                                                                     "account_id", "text", "hashtags", "post_url")},
            "renameByName": {"@timestamp": "Posted", "account_handle": "Handle", "account_id": "Account",
                             "text": "Text", "hashtags": "Hashtags", "post_url": "Post", "platform": "Platform"}}))
        .override_by_name("Post", [DynamicConfigValue(id_val="links", value=[_link("Open the post", "${__value.raw}")])])
    )
    return (
        dash.Dashboard("deepwatch — One picture's spread").uid(SPREAD_UID)
        .description("How one picture travels: where, when, by whom, and why deepwatch thinks it is fake.")
        .tags(["deepwatch", "desk", "generated"]).refresh("1m").time("now-24h", "now").timezone("utc").editable()
        .with_variable(cluster_var)
        .annotation(_alerts_annotation())
        .link(dash.DashboardLink("Viral fakes now").type("link").url(f"/d/{VIRAL_UID}").icon("dashboard"))
        .with_panel(over_time).with_panel(top_accounts).with_panel(evidence).with_panel(texts)
    )


def annotation_fields(doc: dict[str, Any], only_cluster: bool = False) -> dict[str, Any]:
    """Grafana's Elasticsearch annotation settings live beside the query in
    the annotation JSON; the SDK's AnnotationQuery does not model them."""
    for a in doc.get("annotations", {}).get("list", []):
        if a.get("datasource", {}).get("uid") == ES_ALERTS_UID:
            a.update({
                "target": {"query": 'cluster_id:"$cluster"' if only_cluster else "*", "refId": "Anno", "limit": 100,
                           "matchAny": False, "tags": [], "type": "dashboard"},
                "timeField": "created_at", "textField": "evidence_summary", "tagsField": "cluster_id",
            })
    return doc


def to_json(board: dash.Dashboard, *, only_cluster: bool = False) -> dict[str, Any]:
    doc = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    for n, panel in enumerate(doc["panels"], start=1):
        panel["id"] = n  # stable ids keep ?viewPanel=N links valid across regenerations
    return annotation_fields(doc, only_cluster)


def viral_json() -> dict[str, Any]:
    return to_json(viral_dashboard())


def spread_json() -> dict[str, Any]:
    return to_json(spread_dashboard(), only_cluster=True)
