"""The Elasticsearch findings store against the loopback fake (tests/fake_es.py):
the requests deepwatch sends (templates, bulk NDJSON, queries, kNN) and how it
handles the answers a real cluster gives (429s, 5xx, partial bulk failures,
version conflicts, the 8-vs-9 compatibility error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from streams import es_templates as T
from streams.es_client import EsCompatError, EsConfig, EsError, client_major
from streams.es_store import EsFindingsStore
from streams.cluster_search import ClusterQuery
from streams.findings import DeliveryState, MemberRow
from streams.settings import FindingsSettings, Settings
from tests.desk_support import close_sources
from tests.fake_es import FakeElasticsearch, error_body, rejected_execution
from tests.findings_fixture import fill, snapshots


def _store(es: FakeElasticsearch, **findings) -> EsFindingsStore:
    settings = Settings(findings=FindingsSettings(retry_initial_s=0.001, retry_max_s=0.004, **findings))
    s = EsFindingsStore.from_url(es.url.replace("http://", "es://"), settings=settings)
    s.bulk.sleep = lambda _s: None
    return s


def test_setup_creates_versioned_templates_aliases_and_the_sightings_data_stream(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    assert fake_es.ilm["deepwatch-sightings"]["policy"]["phases"]["delete"]["actions"] == {"delete": {}}
    assert set(fake_es.component_templates) == {
        "deepwatch-common", "deepwatch-clusters-mappings", "deepwatch-sightings-mappings", "deepwatch-alerts-mappings",
        "deepwatch-dead-letters-mappings", "deepwatch-deliveries-mappings", "deepwatch-processed-mappings"}
    for name, body in fake_es.component_templates.items():
        assert body["version"] == T.MAPPING_VERSION and body["_meta"]["managed_by"] == "deepwatch", name
    clusters = fake_es.index_templates["deepwatch-clusters"]
    assert clusters["index_patterns"] == ["deepwatch-clusters-v*"] and clusters["version"] == T.MAPPING_VERSION
    assert clusters["composed_of"] == ["deepwatch-common", "deepwatch-clusters-mappings"]
    props = fake_es.component_templates["deepwatch-clusters-mappings"]["template"]["mappings"]["properties"]
    members = props["members"]
    assert members["type"] == "nested"
    assert members["properties"]["pdq_bits"] == {"type": "dense_vector", "element_type": "bit", "dims": 256,
                                                 "index": True, "similarity": "l2_norm"}
    assert members["properties"]["phash_bits"]["dims"] == 64
    assert props["sample_texts"]["fields"]["keyword"]["type"] == "keyword"
    for field in ("fake_score", "verdict", "evidence", "detector_scores", "velocity", "platforms", "accounts_sample",
                  "hashtags", "languages", "first_seen", "last_seen", "blob_refs", "evidence_summary"):
        assert field in props, field
    sightings = fake_es.index_templates["deepwatch-sightings"]
    assert sightings["data_stream"] == {} and sightings["template"]["settings"]["index.lifecycle.name"] == "deepwatch-sightings"
    assert fake_es.scripts[T.SCRIPT_ID] == {"lang": "painless", "source": T.CLUSTER_UPSERT_SCRIPT}
    assert fake_es.aliases == {a: f"{a}-v{T.MAPPING_VERSION}" for a in ("deepwatch-clusters", "deepwatch-alerts", "deepwatch-dead-letters",
                                                      "deepwatch-deliveries", "deepwatch-processed")}
    assert "deepwatch-sightings" in fake_es.data_streams
    create = fake_es.calls("PUT", "/" + T.concrete("deepwatch-clusters"))[0]
    assert create.body == {"aliases": {"deepwatch-clusters": {"is_write_index": True}}}
    # every request asked for the API version this client speaks
    assert all(f"compatible-with={client_major()}" in r.headers.get("accept", "") for r in fake_es.requests)

    # indices this version made carry its mapping version: nothing to put in place
    assert fake_es.put_mappings == []
    assert all(m["_meta"]["mapping_version"] == T.MAPPING_VERSION for m in fake_es.index_mappings.values())

    # a second worker starting: nothing re-created, "already exists" tolerated
    def creations() -> int:
        return sum(1 for r in fake_es.requests
                   if r.method == "PUT" and r.path.startswith("/deepwatch-") and "/_mapping" not in r.path)

    assert creations() == 5
    s2 = _store(fake_es)
    s2.ensure_setup()
    assert creations() == 5
    assert len(fake_es.calls("PUT", "/_data_stream/deepwatch-sightings")) == 2
    # templates, policy and script read first and PUT only by the first worker: the second found them
    for path in ("/_scripts/" + T.SCRIPT_ID, "/_ilm/policy/deepwatch-sightings",
                 "/_component_template/deepwatch-common", "/_index_template/deepwatch-clusters"):
        assert len(fake_es.calls("PUT", path)) == 1 and len(fake_es.calls("GET", path)) == 2, path
    s.close(), s2.close()


def test_snapshot_is_one_bulk_request_of_sighting_create_and_guarded_cluster_upsert(fake_es):
    s = _store(fake_es)
    snap = snapshots()[0]
    s.apply_snapshot(snap)
    [bulk] = fake_es.calls("PUT", "/_bulk") + fake_es.calls("POST", "/_bulk")
    assert "x-ndjson" in bulk.headers["content-type"]
    # the processed marker last: an offset counted as processed has its cluster written
    header1, sighting, header2, update, marker_header, marker = bulk.body
    assert header1 == {"create": {"_index": "deepwatch-sightings", "_id": "e1"}}
    assert marker_header == {"create": {"_index": "deepwatch-processed", "_id": "deepwatch.events/0/0"}}
    assert (marker["offset"], marker["outcome"], marker["event_id"]) == (0, "sighting", "e1")
    assert sighting["cluster_id"] == "c-fire" and sighting["@timestamp"] == snap.new_sighting.event.posted_at.isoformat()
    assert sighting["hashtags"] == ["breaking", "fire"] and sighting["source"] == {"topic": "deepwatch.events", "partition": 0, "offset": 0}
    assert header2 == {"update": {"_index": "deepwatch-clusters", "_id": "c-fire", "retry_on_conflict": 5}}
    assert update["scripted_upsert"] is True and update["upsert"] == {}
    assert update["script"]["id"] == T.SCRIPT_ID
    params = update["script"]["params"]
    assert params["doc"]["revision"] == 1 and params["doc"]["members"][0]["pdq_bits"] == snap.members[0].pdq
    assert [x["text"] for x in params["sightings"]] == ["Huge fire at the harbour right now"]
    s.close()


def test_stale_revisions_never_overwrite_and_redelivery_changes_nothing(fake_es):
    s = _store(fake_es)
    snaps = [x for x in snapshots() if x.cluster_id == "c-fire"]
    for snap in reversed(snaps):  # newest first: the older ones are stale when they arrive
        s.apply_snapshot(snap)
    doc = fake_es.docs[T.concrete("deepwatch-clusters")]["c-fire"]
    assert doc["revision"] == 3
    # the stale revisions' sightings still landed (their own documents), once each
    stream = fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]
    assert sorted(stream) == ["e1", "e2", "e3"]
    assert sorted(doc["sample_texts"]) == sorted(x.new_sighting.event.text for x in snaps)
    version = fake_es.meta[T.concrete("deepwatch-clusters")]["c-fire"]["version"]
    for snap in snaps:  # at-least-once: the whole history again
        s.apply_snapshot(snap)
    assert fake_es.docs[T.concrete("deepwatch-clusters")]["c-fire"] == doc
    assert fake_es.meta[T.concrete("deepwatch-clusters")]["c-fire"]["version"] == version + len(snaps)  # script ran, changed nothing
    assert sorted(fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]) == ["e1", "e2", "e3"]
    s.close()


def test_a_batch_redelivered_across_a_rollover_writes_no_sighting_twice(fake_es):
    s = _store(fake_es)
    snaps = [x for x in snapshots() if x.cluster_id == "c-fire"]
    s.apply_snapshots(snaps)
    s.es.indices.rollover(alias="deepwatch-sightings")  # the daily rollover, between the write and the crash
    s.apply_snapshots(snaps)  # the sink's offsets were not committed: the whole batch again
    s.apply_snapshots([*snaps, *(x for x in snapshots() if x.cluster_id != "c-fire")])  # and with new ones
    backing = fake_es.stream_backing["deepwatch-sightings"]
    assert len(backing) == 2 and sorted(fake_es.docs[backing[0]]) == ["e1", "e2", "e3"]
    new = {x.new_sighting.event.event_id for x in snapshots() if x.cluster_id != "c-fire" and x.new_sighting}
    assert new and set(fake_es.docs[backing[1]]) == new
    assert len(s.sightings()) == 3 + len(new)
    s.close()


def test_whole_request_429_and_503_are_retried_with_backoff(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    waits: list[float] = []
    s.bulk.sleep = waits.append
    fake_es.fail_requests(429, error_body("es_rejected_execution_exception", rejected_execution()["reason"], 429), times=2)
    fake_es.fail_requests(503, error_body("unavailable_shards_exception", "primary shard is not active", 503), times=1)
    assert s.add_alert(_alert()) is True
    assert waits == [0.001, 0.002, 0.004]  # doubling, capped at retry_max_s
    assert "c-fire:1" in fake_es.docs[T.concrete("deepwatch-alerts")]
    s.close()


def test_partial_bulk_failure_retries_only_rejected_items(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    fake_es.fail_items(lambda op, meta, src: meta.get("_id") == "e2", 429, rejected_execution(), times=2)
    s.apply_snapshots(snapshots()[:3])
    bulks = [r for r in fake_es.requests if r.path.endswith("/_bulk")]
    assert len(bulks) == 3
    assert len(bulks[0].body) == 14  # 3 x (create sighting + processed marker), one update of their one cluster
    assert bulks[1].body == bulks[2].body and len(bulks[1].body) == 2  # only the rejected item, twice
    assert bulks[1].body[0] == {"create": {"_index": "deepwatch-sightings", "_id": "e2"}}
    assert sorted(fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]) == ["e1", "e2", "e3"]
    s.close()


def test_a_mapping_error_dead_letters_that_item_and_the_batch_carries_on(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    # the server refuses one sighting for good (a real document_parsing_exception body) ...
    fake_es.fail_items(lambda op, meta, src: meta.get("_id") == "e2", 400, {
        "type": "document_parsing_exception", "reason": "[1:223] failed to parse field [engagement.likes] of type [long]",
        "caused_by": {"type": "illegal_argument_exception", "reason": "Value [12k] is not a number"}})
    res = s.bulk.send([a for snap in snapshots()[:3] for a in s.cluster_actions(snap)]
                      # ... and one action breaks the strict mapping on the fake itself
                      + [({"index": {"_index": "deepwatch-deliveries", "_id": "x"}}, {"alert_id": "a", "surprise": 1})])
    assert res.dead_lettered == 2 and res.ok == 8
    stream = fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]
    assert sorted(stream) == ["e1", "e3"]
    assert fake_es.docs[T.concrete("deepwatch-clusters")]["c-fire"]["revision"] == 3
    dls = {d.event_id: d for d in s.dead_letters()}
    e2 = dls["e2"]
    assert (e2.stage, e2.reason) == ("sink", "document_parsing_exception")
    assert e2.source.offset == 1  # the event's own offset: replay accounting sees it dead-lettered
    assert "engagement.likes" in e2.detail
    marker = fake_es.docs[T.concrete("deepwatch-processed")]["deepwatch.events/0/1"]
    assert marker["outcome"] == "dead_letter"  # relabelled: the sighting never landed
    assert dls["x"].reason == "strict_dynamic_mapping_exception"
    s.close()


def test_version_conflict_on_create_is_a_duplicate_not_an_error(fake_es):
    s = _store(fake_es)
    assert s.add_alert(_alert()) is True
    assert s.add_alert(_alert()) is False  # 409 version_conflict_engine_exception: already stored
    [_, second] = [r for r in fake_es.requests if r.path.endswith("/_bulk")]
    assert second.body[0] == {"create": {"_index": "deepwatch-alerts", "_id": "c-fire:1"}}
    assert s.dead_letters() == []
    s.close()


def test_search_queries_sent(fake_es):
    s = _store(fake_es)
    fill(s)
    s.refresh()
    n = len(fake_es.requests)
    s.search(ClusterQuery(text='harbour "fire"', platform="x", hashtag="#Breaking", verdict="likely-ai", min_score=0.5))
    first, second, third, fourth = [r for r in fake_es.requests[n:] if r.path.endswith("/_search")]
    assert first.path == "/deepwatch-sightings/_search"
    q = first.body["query"]["bool"]
    assert q["must"] == [{"multi_match": {"query": "harbour", "type": "phrase", "fields": ["text", "hashtags.text"]}},
                         {"multi_match": {"query": "fire", "type": "phrase", "fields": ["text", "hashtags.text"]}}]
    assert {"term": {"platform": {"value": "x", "case_insensitive": True}}} in q["filter"] and {"term": {"hashtags": "breaking"}} in q["filter"]
    # every matching cluster, paged, with its best sighting's score (not a collapsed first result window)
    assert first.body["size"] == 0 and first.body["aggs"]["clusters"] == {
        "composite": {"size": 10_000, "sources": [{"cluster_id": {"terms": {"field": "cluster_id"}}}]},
        "aggs": {"best": {"max": {"script": {"source": "_score"}}}}}
    assert second.path == "/deepwatch-clusters/_search"
    f = second.body["query"]["bool"]
    assert {"term": {"verdict": "likely-ai"}} in f["filter"] and {"range": {"fake_score": {"gte": 0.49995}}} in f["filter"]  # min 0.5: what shows as 0.5
    assert f["must_not"] == [{"exists": {"field": "merged_into"}}]
    assert third.path == "/deepwatch-clusters/_search" and third.body["query"] == {"ids": {"values": ["c-fire"]}}
    assert fourth.path == "/deepwatch-sightings/_search" and "by_cluster" in fourth.body["aggs"]
    s.close()


def _many_clusters(n: int) -> list:
    """``n`` one-sighting clusters on x with the same post text: ``k00`` ...
    in id order, the later ids the faster (and the only likely-AI ones in
    the last quarter), so a store that keeps the first ids of a truncated
    match list answers wrong."""
    from datetime import timedelta

    from streams.records import ClusterSnapshot, Engagement, Velocity
    from tests.findings_fixture import T0, _member, _sighting

    out = []
    for i in range(n):
        cid = f"k{i:02d}"
        s = _sighting(i, (f"ev-{cid}", cid, "a", f"u{i}", None, "x", i, "harbour fire", ["fire"]))
        likely = i >= n - n // 4
        out.append(ClusterSnapshot(
            cluster_id=cid, revision=1, fake_score=0.9 if likely else 0.3, verdict="likely-ai" if likely else "no-evidence",
            evidence=[], members=[_member(s)], sightings=1, accounts=1, platforms=["x"], engagement=Engagement(),
            velocity=Velocity(sightings_5m=i, sightings_1h=1),
            first_seen=T0 + timedelta(minutes=i), last_seen=T0 + timedelta(minutes=i), new_sighting=s))
    return out


@pytest.mark.parametrize("query, expected", [
    # a sorted search with a sighting filter: was the first result window of matching ids (k00..k19), then sorted
    (dict(platform="x", sort="velocity", limit=3), ["k29", "k28", "k27"]),
    # relevance with a cluster-level filter: the likely-AI clusters all lay beyond the first window, so none came back
    (dict(text="harbour", verdict="likely-ai"), ["k29", "k28", "k27", "k26", "k25", "k24", "k23"]),
])
def test_search_sees_every_matching_cluster_beyond_one_result_window(fake_es, monkeypatch, tmp_path, query, expected):
    """More matching clusters than index.max_result_window (shrunk here to 20
    on both sides, with small pages and id chunks so paging and merging run):
    the answer is SQLite's, not that of the first 10,000 clusters by id."""
    import streams.es_requests as es_requests
    import streams.es_store as es_store
    import tests.fake_es as fake_mod
    from streams.store import open_store

    monkeypatch.setattr(fake_mod, "MAX_RESULT_WINDOW", 20)
    monkeypatch.setattr(es_requests, "MAX_CANDIDATES", 20)
    monkeypatch.setattr(es_store, "MATCH_PAGE", 7, raising=False)
    monkeypatch.setattr(es_requests, "ID_CHUNK", 11)
    monkeypatch.setattr(es_requests, "PAGE", 5)
    s = _store(fake_es)
    sq = open_store(tmp_path)
    for snap in _many_clusters(30):
        s.apply_snapshot(snap)
        sq.apply_snapshot(snap)
    s.refresh()
    q = ClusterQuery(**query)
    assert [c.id for c in sq.search(q)] == expected
    assert [c.id for c in s.search(q)] == expected
    assert not [r for r in fake_es.requests if r.path.endswith("/_search") and (r.body or {}).get("size", 10) > 20]
    s.close(), sq.close()


def test_fake_refuses_what_a_server_refuses_and_counts_totals_as_a_server_does(fake_es):
    """index.max_result_window, index.max_terms_count, track_total_hits and
    collapse totals, as the search API documents them."""
    from elasticsearch import BadRequestError

    s = _store(fake_es)
    fill(s)
    s.refresh()
    with pytest.raises(BadRequestError, match="Result window is too large"):
        s.es.search(index="deepwatch-sightings", size=10_001)
    with pytest.raises(BadRequestError, match="max_terms_count"):
        s.es.search(index="deepwatch-sightings", query={"terms": {"cluster_id": [str(i) for i in range(65_537)]}})
    # hits.total counts documents, not collapsed groups
    res = s.es.search(index="deepwatch-sightings", collapse={"field": "cluster_id"}, query={"match_all": {}})
    assert res["hits"]["total"] == {"value": 7, "relation": "eq"} and len(res["hits"]["hits"]) == 4
    res = s.es.search(index="deepwatch-sightings", track_total_hits=3, size=0)
    assert res["hits"]["total"] == {"value": 3, "relation": "gte"}
    s.close()


def test_a_refused_search_names_the_shards_reason_not_only_all_shards_failed(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    with pytest.raises(EsError) as e:
        s._search("deepwatch-sightings", size=10_001)
    # was "answered 400: search_phase_execution_exception: all shards failed"
    assert "all shards failed (illegal_argument_exception: Result window is too large" in str(e.value), str(e.value)
    s.close()


def test_similar_uses_bit_vector_knn(fake_es):
    from detectors.hashing import ImageHashes

    s = _store(fake_es)
    fill(s)
    s.refresh()
    snap = snapshots()[0]
    m = snap.members[0]
    near_pdq = f"{int(m.pdq, 16) ^ 0b111:064x}"  # 3 bits off
    q = ImageHashes(phash=m.phash, pdq=near_pdq, pdq_quality=100, pdq_mirror="f" * 64)
    n = len(fake_es.requests)
    found = s.similar_candidates("0" * 64, q)
    [req] = [r for r in fake_es.requests[n:] if r.path.endswith("/_search")]
    # typed rows, every member of each candidate cluster, as iter_members gives them (was: raw _source dicts)
    assert found and all(isinstance(r, MemberRow) for r in found)
    assert found[0].cluster_id == "c-fire"
    fire = [r for r in s.iter_members() if r.cluster_id == "c-fire"]
    by_sha = lambda r: r.sha256  # noqa: E731
    assert sorted((r for r in found if r.cluster_id == "c-fire"), key=by_sha) == sorted(fire, key=by_sha)
    assert m.sha256 in {r.sha256 for r in fire}
    knn = req.body["knn"]
    assert {"field": "members.pdq_bits", "query_vector": near_pdq, "k": 20, "num_candidates": 100,
            "filter": {"bool": {"must_not": [{"exists": {"field": "merged_into"}}]}}} in knn
    assert any(k["field"] == "members.pdq_bits" and k["query_vector"] == "f" * 64 for k in knn)  # the mirror image
    assert any(k["field"] == "members.phash_bits" and k["query_vector"] == m.phash for k in knn)
    assert req.body["query"]["bool"]["should"] == [
        {"nested": {"path": "members", "query": {"term": {"members.sha256": "0" * 64}}}}]
    s.close()


def test_reads_before_anything_was_written_are_empty(fake_es):
    s = _store(fake_es)
    assert s.clusters() == [] and s.search(ClusterQuery(text="x")) == [] and s.alerts() == []
    s.close()


# -- client/server compatibility -------------------------------------------------
@pytest.mark.parametrize("server", ["8.15.3", "8.19.2", "9.1.5"])
def test_client_server_major_compatibility(server):
    es = FakeElasticsearch(version=server).start()
    try:
        s = EsFindingsStore(EsConfig.from_url(es.url))
        if server.startswith("8.") and client_major() >= 9:
            with pytest.raises(EsCompatError) as e:
                s.ensure_setup()
            assert "compatible-with=9" in str(e.value) and "elasticsearch>=8.15,<9" in str(e.value)
            assert es.requests[0].headers["accept"].endswith("compatible-with=9")
        else:
            s.ensure_setup()
            assert s.server_info()["version"]["number"] == server
        s.close()
    finally:
        es.stop()


@pytest.mark.parametrize("server,sent,ok", [("8.15.3", 8, True), ("8.15.3", 9, False), ("9.1.5", 8, True),
                                            ("9.1.5", 9, True), ("9.1.5", 7, False)])
def test_what_each_server_major_accepts(server, sent, ok):
    """Why the 8.x client is pinned: compatible-with=8 is the one both majors take."""
    es = FakeElasticsearch(version=server).start()
    try:
        mime = f"application/vnd.elasticsearch+json; compatible-with={sent}"
        r = httpx.get(es.url + "/", headers={"Accept": mime, "Content-Type": mime})
        assert (r.status_code == 200) is ok
        if not ok:
            assert r.json()["error"]["type"] == "media_type_header_exception"
    finally:
        es.stop()


def test_old_servers_are_refused_with_the_reason():
    es = FakeElasticsearch(version="8.14.3").start()
    try:
        if client_major() >= 9:
            pytest.skip("the installed elasticsearch-py 9.x cannot talk to 8.x at all (see the compatibility test)")
        with pytest.raises(EsError, match="needs >= 8.15"):
            EsFindingsStore(EsConfig.from_url(es.url)).ensure_setup()
    finally:
        es.stop()


def test_credentials_come_from_the_environment_and_the_ca_bundle_from_the_caller():
    env = {"DEEPWATCH_ES_API_KEY": "k", "DEEPWATCH_ES_CA_CERTS": "/old.pem", "DEEPWATCH_ES_VERIFY_CERTS": "false"}
    c = EsConfig.from_url("es://search.internal", env=env, ca_certs=Path("/ca.pem"))
    assert (c.url, c.api_key, c.ca_certs, c.verify_certs) == ("http://search.internal:9200", "k", "/ca.pem", True)
    # the variables once read for them are settings now (findings.ca_certs, findings.verify_certs)
    assert EsConfig.from_url("es://search.internal", env=env).ca_certs is None
    c = EsConfig.from_url("ess://search.internal:9243", env={"DEEPWATCH_ES_USERNAME": "u", "DEEPWATCH_ES_PASSWORD": "p"})
    assert (c.url, c.username, c.password) == ("https://search.internal:9243", "u", "p")
    with pytest.raises(EsError, match="not in the URL"):
        EsConfig.from_url("https://elastic:secret@search.internal:9200", env={})


@pytest.mark.parametrize("verify", [True, False])
def test_the_settings_ca_bundle_and_certificate_check_reach_the_client(tmp_path, verify):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings(findings=FindingsSettings(ca_certs=ca, verify_certs=verify))
    s = EsFindingsStore.from_url("ess://127.0.0.1:1", settings=settings)
    [node] = s.es.transport.node_pool.all()
    assert (node.config.ca_certs, node.config.verify_certs) == (str(ca), verify)
    s.close()


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_a_ca_bundle_that_is_not_a_readable_file_is_one_line_naming_the_setting(tmp_path, what):
    # elasticsearch-py takes any path, and then every request failed with a TLS error
    path = tmp_path / "ca.pem"
    if what == "directory":
        path.mkdir()
    with pytest.raises(EsError, match=r"^findings.ca_certs '.*ca.pem' is not a readable file "
                                      r"\(DEEPWATCH_FINDINGS__CA_CERTS\); give the path of the PEM bundle") as e:
        EsFindingsStore.from_url("ess://127.0.0.1:1", settings=Settings(findings=FindingsSettings(ca_certs=path)))
    assert "\n" not in str(e.value) and not e.value.hold


@pytest.mark.parametrize("url", ["esx://elastic:hunter2@search.internal:9200", "https://elastic:hunter2@",
                                 "ftp://elastic:hunter2@search.internal/x"])
def test_a_refused_store_url_is_named_without_its_password(url):
    with pytest.raises(EsError) as e:
        EsConfig.from_url(url, env={})
    assert "hunter2" not in str(e.value) and "elastic:" not in str(e.value), str(e.value)
    assert "***@" in str(e.value)


def test_the_config_repr_keeps_its_secrets():
    c = EsConfig.from_url("es://search.internal", env={"DEEPWATCH_ES_API_KEY": "c2VjcmV0LWFwaS1rZXk=",
                                                       "DEEPWATCH_ES_USERNAME": "u", "DEEPWATCH_ES_PASSWORD": "hunter2"})
    assert "c2VjcmV0LWFwaS1rZXk=" not in repr(c) and "hunter2" not in repr(c) and "search.internal" in repr(c)
    assert c.api_key == "c2VjcmV0LWFwaS1rZXk=" and c.password == "hunter2"


def test_cli_reports_an_unreachable_store_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streams.cli", "search", "fire", "--data-dir", str(tmp_path),
                        "--store", "es://127.0.0.1:9", "--format", "json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "40"})
    assert r.returncode == 2
    # one line, however narrow the terminal, saying why in plain words (was
    # "ConnectionError: <urllib3.connection.HTTPConnection object at 0x7f...>: ...")
    [line] = r.stderr.splitlines()
    assert line.startswith("error: cannot reach Elasticsearch at http://127.0.0.1:9 (Connection refused)"), line


def test_a_store_url_that_is_not_elasticsearch_is_named_in_one_short_line(tmp_path):
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):  # a web server, not Elasticsearch: an HTML error page
        def do_POST(self):
            body = b"<!DOCTYPE html>\n<html>\n<body>\n" + b"<p>Not here.</p>\n" * 200 + b"</body></html>\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = subprocess.run([sys.executable, "-m", "streams.cli", "search", "fire", "--data-dir", str(tmp_path),
                            "--store", f"es://127.0.0.1:{server.server_address[1]}", "--format", "json"],
                           capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "is it an Elasticsearch server?" in said and len(said) < 600  # was: the whole page


def test_cli_search_on_es_matches_sqlite(fake_es, tmp_path):
    from streams.store import open_store

    sq = open_store(tmp_path)
    fill(sq)
    sq.close()
    es = _store(fake_es)
    fill(es)
    es.refresh()
    es.close()

    def run(*args: str) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "streams.cli", "search", *args, "--data-dir", str(tmp_path),
                            "--format", "json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return [{k: v for k, v in c.items() if k != "updated_at"} for c in json.loads(r.stdout)]

    for args in (["harbour"], ["--sort", "score"], ["--hashtag", "storm"], ["--verdict", "likely-ai", "--sort", "velocity"]):
        assert run(*args) == run(*args, "--store", fake_es.url), args


def _alert():
    from tests.findings_fixture import alerts

    return alerts()[0]


ES8 = Path(__file__).resolve().parents[1] / ".es8"


def test_pinned_8x_client_against_8x_and_9x_servers():
    """The deployment pin (elasticsearch>=8.15,<9) against both server majors.
    The shared test environment may carry the 9.x client; the 8.x one is then
    run from .es8 (pip install --target .es8 'elasticsearch>=8.15,<9'
    'elastic-transport>=8.15.1,<9')."""
    if client_major() == 8:
        pytest.skip("the installed client is already 8.x: the other tests in this file ran with it")
    if not (ES8 / "elasticsearch").is_dir():
        pytest.skip(f"no elasticsearch-py 8.x at {ES8}: pip install --target .es8 'elasticsearch>=8.15,<9' "
                    "'elastic-transport>=8.15.1,<9' to run the pinned client here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ES8), str(ES8.parent)])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "compatibility or old_servers or setup_creates or search_queries or similar_uses"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ES8.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "passed" in r.stdout and "failed" not in r.stdout


def test_cli_similar_on_es_ranks_like_the_embedded_index(fake_es, tmp_path):
    """`deepwatch similar IMAGE --store es://…`: kNN candidates, the embedded rule and ranking."""
    from datetime import datetime, timezone

    from detectors.hashing import compute_hashes
    from detectors.imagedata import ImageData
    from streams.records import ClusterSnapshot, Engagement, Member, Velocity
    from streams.store import open_store
    from tests.support import picture

    now = datetime.now(timezone.utc)
    snaps = []
    for seed, cid in ((3, "c0ffee"), (7, "beef00")):
        picture(seed, (320, 240)).save(tmp_path / f"{cid}.jpg", quality=90)
        h = compute_hashes(ImageData.from_path(tmp_path / f"{cid}.jpg"))
        snaps.append(ClusterSnapshot(
            cluster_id=cid, revision=1, fake_score=0.2, verdict="no-evidence", evidence=[],
            members=[Member(sha256=cid * 8 + "0" * 16, phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality,
                            event_id=f"e-{cid}", views=h.views, trimmed=h.trimmed)],
            sightings=1, accounts=1, platforms=["x"], engagement=Engagement(), velocity=Velocity(),
            first_seen=now, last_seen=now))
    sq = open_store(tmp_path / "data")
    es = _store(fake_es)
    for snap in snaps:
        sq.apply_snapshot(snap)
        es.apply_snapshot(snap)
    sq.close(), es.close()
    picture(3, (320, 240)).crop((4, 4, 316, 236)).save(tmp_path / "q.jpg", quality=50)

    def similar(*extra: str) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "streams.cli", "similar", str(tmp_path / "q.jpg"), "--data-dir",
                            str(tmp_path / "data"), *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    n = len(fake_es.requests)
    on_es = similar("--store", fake_es.url)
    assert on_es == similar() and [r["cluster_id"] for r in on_es] == ["c0ffee"]
    assert any("knn" in (r.body or {}) for r in fake_es.requests[n:])


def test_processed_since_reads_only_recent_markers_with_a_margin(fake_es):
    s = _store(fake_es)
    fill(s)
    everything, mark = s.processed_since("deepwatch.events", 0)
    assert everything == {(0, i) for i in range(8)} and mark > 0
    again, mark2 = s.processed_since("deepwatch.events", mark)
    assert again == everything and mark2 == mark  # all within the re-read margin
    [req] = [r for r in fake_es.requests[-1:] if r.path.endswith("/_search")]
    assert req.body["query"]["bool"]["filter"][1] == {"range": {"@timestamp": {
        "gte": mark - 30_000, "format": "epoch_millis"}}}
    old = mark + 31_000  # a poll long after: nothing new
    assert s.processed_since("deepwatch.events", old) == (set(), old)
    s.close()


def test_sink_holds_the_batch_while_elasticsearch_rejects_and_loses_nothing(fake_es, tmp_path):
    """What the Faust sink agents await: while Elasticsearch answers 429 the
    call does not return (the agent takes nothing more, offsets stay
    uncommitted); once it accepts, every item is stored exactly once."""
    import asyncio
    import time

    from streams import metrics
    from streams.sinks import Sinks

    settings = Settings(data_dir=tmp_path, findings=FindingsSettings(
        url=fake_es.url, retry_initial_s=0.05, retry_max_s=0.05))
    sinks = Sinks(settings)
    sinks.store.ensure_setup()
    body = error_body("es_rejected_execution_exception", rejected_execution()["reason"], 429)
    fake_es.fail_requests(429, body, times=6)
    raws = [snap.dumps() for snap in snapshots()]

    async def scenario() -> tuple[bool, float]:
        task = asyncio.create_task(sinks.snapshots(raws))
        # the gauge starts at the first refusal, whose request may take a while under load
        deadline, behind = time.monotonic() + 10, 0.0
        while not behind and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            behind = metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value
        held = not task.done()
        await asyncio.wait_for(task, timeout=10)
        return held, behind

    started = time.monotonic()
    held, behind = asyncio.run(scenario())
    assert held and behind > 0, "the batch must be held, and the gauge must say the sink is behind"
    assert time.monotonic() - started >= 0.25  # six backoffs of 50 ms
    assert metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value == 0
    stream = fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]
    assert sorted(stream) == [f"e{i}" for i in range(1, 8)]
    assert len(fake_es.docs[T.concrete("deepwatch-processed")]) == 7
    sinks.store.close()


# -- the methods issue 7 added to the interface, on both backends ------------------------------
def _both(fake_es, tmp_path):
    from streams.store import open_store

    return {"sqlite": open_store(tmp_path), "es": _store(fake_es)}


def test_the_desk_view_reads_agree_on_both_backends(fake_es, tmp_path, monkeypatch):
    """``newest_last_seen``, ``recent_clusters`` (a window, a cap, paged past
    the result window), ``verdict_cluster_ids`` and ``has_member`` answer
    alike on SQLite and Elasticsearch; times compare as instants."""
    from datetime import timedelta, timezone

    import streams.es_requests as es_requests
    import tests.fake_es as fake_mod
    from tests.test_desk_view import T0, fill, sha, snap

    monkeypatch.setattr(fake_mod, "MAX_RESULT_WINDOW", 20)
    monkeypatch.setattr(es_requests, "MAX_CANDIDATES", 4)
    monkeypatch.setattr(es_requests, "PAGE", 3)
    # seen a minute before new-a, written at -05:00: as text it sorts before every UTC time of that day
    west = snap("west", -1, "likely-ai")
    west = west.model_copy(update={"last_seen": west.last_seen.astimezone(timezone(timedelta(hours=-5)))})
    got = {}
    for name, s in _both(fake_es, tmp_path).items():
        fill(s)
        s.apply_snapshots([west, *(snap(f"extra{i}", -i * 600, "likely-ai" if i % 2 else "no-evidence")
                                   for i in range(1, 8))])
        if name == "es":
            s.refresh()
        newest = s.newest_last_seen()
        got[name] = {
            "newest": newest,
            "all": [c.id for c in s.recent_clusters()],
            "window": [c.id for c in s.recent_clusters(newest - timedelta(days=30))],
            "capped": [c.id for c in s.recent_clusters(newest - timedelta(days=30), limit=5)],
            "last_seen": [c.last_seen for c in s.recent_clusters(limit=9)],
            "ai": s.verdict_cluster_ids("likely-ai"),
            "no-evidence": s.verdict_cluster_ids("no-evidence"),
            "members": [s.has_member(sha("old-photo", 1)), s.has_member(sha("m-old", 1)), s.has_member(sha("x"))],
        }
        s.close()
    sq = got["sqlite"]
    assert sq == got["es"]
    assert sq["newest"] == T0 and sq["all"][:3] == ["new-a", "west", "extra1"] and len(sq["all"]) == 13
    assert "m-old" not in sq["all"] and sq["all"][-2:] == ["old-ai", "old-photo"]
    assert sq["window"] == sq["all"][:-2] and sq["capped"] == sq["all"][:5]
    assert sq["ai"] == {"new-a": [], "west": [], "old-ai": [], **{f"extra{i}": [] for i in (1, 3, 5, 7)}}
    assert sq["no-evidence"]["new-b"] == ["m-old"] and "m-old" not in sq["no-evidence"]
    assert sq["members"] == [True, True, False]


def test_es_store_provides_the_whole_findings_interface(fake_es):
    from streams.findings import FindingsStore

    s = _store(fake_es)
    assert isinstance(s, FindingsStore)
    methods = [m for m in dir(FindingsStore) if not m.startswith("_")]  # through every role it unites
    assert len(methods) > 40
    missing = [m for m in methods if not hasattr(s, m)]
    assert missing == []
    # its optional capabilities, by type: kNN candidates of its own; no cheap change counter, no keyed members
    from streams.findings import CandidateNominator, ChangeCounter, KeyedMemberReader, MemberIndexFile

    assert isinstance(s, CandidateNominator)
    assert not any(isinstance(s, c) for c in (ChangeCounter, KeyedMemberReader, MemberIndexFile))
    s.close()


def test_run_accounting_keeps_runs_apart_when_a_fresh_broker_reuses_offsets(fake_es, tmp_path):
    from streams.records import DeadLetter, SourceRef
    from tests.findings_fixture import TOPIC

    def ref(run: str, offset: int) -> SourceRef:
        return SourceRef(topic=TOPIC, partition=0, offset=offset, run=run)

    first = snapshots()[0]
    snap = first.model_copy(update={"new_sighting": first.new_sighting.model_copy(update={"source": ref("r2", 2)})})
    got = {}
    for name, s in _both(fake_es, tmp_path).items():
        s.mark_processed(ref("r1", 0), "duplicate", "e0")
        s.mark_processed(ref("r1", 1), "duplicate", "e1")
        # run r2 on a fresh broker: the same offsets again, then a sighting and a dead letter
        s.mark_processed(ref("r2", 0), "duplicate", "e0")
        s.mark_processed(ref("r2", 0), "duplicate", "e0")  # redelivered: still one marker
        s.add_dead_letter(DeadLetter(event_id="bad", stage="fetch", reason="fetch_blocked", detail="private address",
                                     source=ref("r2", 1)))
        s.apply_snapshot(snap)
        getattr(s, "refresh", lambda: None)()
        got[name] = {run: s.run_processed_since(run, TOPIC, 0)[0] for run in ("r1", "r2", "r3")}
        got[name]["all"] = s.processed_offsets(TOPIC)
        got[name]["dl_source"] = s.dead_letters()[0].source
        got[name]["r2_outcomes"] = s.run_outcomes("r2", TOPIC)
        s.close()
    assert got["es"] == got["sqlite"] == {
        "r1": {(0, 0), (0, 1)}, "r2": {(0, 0), (0, 1), (0, 2)}, "r3": set(), "all": {(0, 0), (0, 1), (0, 2)},
        "dl_source": ref("r2", 1), "r2_outcomes": {(0, 0): ("duplicate", "e0"), (0, 1): ("dead_letter", "bad"),
                                             (0, 2): ("sighting", "e1")}}
    markers = fake_es.docs[T.concrete("deepwatch-processed")]
    assert sorted(markers) == ["r1/deepwatch.events/0/0", "r1/deepwatch.events/0/1", "r2/deepwatch.events/0/0",
                               "r2/deepwatch.events/0/1", "r2/deepwatch.events/0/2"]
    assert markers["r2/deepwatch.events/0/1"]["outcome"] == "dead_letter"
    assert markers["r2/deepwatch.events/0/2"] == {**markers["r2/deepwatch.events/0/2"], "run": "r2", "event_id": "e1",
                                                  "outcome": "sighting"}
    sighting = fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]["e1"]
    assert sighting["source"] == {"topic": TOPIC, "partition": 0, "offset": 2, "run": "r2"}


def test_run_processed_since_rereads_a_margin_before_its_watermark(fake_es):
    from streams.records import SourceRef
    from tests.findings_fixture import TOPIC

    s = _store(fake_es)
    for i in range(3):
        s.mark_processed(SourceRef(topic=TOPIC, partition=1, offset=i, run="r1"), "duplicate", f"e{i}")
    s.mark_processed(SourceRef(topic=TOPIC, partition=1, offset=9, run="r0"), "duplicate", "old")
    got, mark = s.run_processed_since("r1", TOPIC, 0)
    assert got == {(1, 0), (1, 1), (1, 2)} and mark > 0
    assert s.run_processed_since("r1", TOPIC, mark) == (got, mark)  # within the margin: read again, unioned by the caller
    req = [r for r in fake_es.requests if r.path.endswith("/_search")][-1]
    assert req.body["query"]["bool"]["filter"] == [
        {"term": {"topic": TOPIC}}, {"term": {"run": "r1"}},
        {"range": {"@timestamp": {"gte": mark - 30_000, "format": "epoch_millis"}}}]
    assert s.run_processed_since("r1", TOPIC, mark + 31_000) == (set(), mark + 31_000)
    s.close()


def test_sighting_identity_answers_the_duplicate_check_from_either_store(fake_es, tmp_path):
    from tests.findings_fixture import SHA

    answers = []
    for s in _both(fake_es, tmp_path).values():
        fill(s)
        getattr(s, "refresh", lambda: None)()
        got = [s.sighting_identity(e) for e in ("e1", "e4", "e7", "nope")]
        assert [p and p.sha256 for p in got] == [SHA["a"], SHA["b"], SHA["d"], None]
        assert all(p.platform and p.account_id for p in got[:3])  # what a resend must repeat, besides the picture
        answers.append(got)
        s.close()
    assert answers[0] == answers[1]


def test_failed_deliveries_order_gate_and_status_match_sqlite(fake_es, tmp_path):
    from datetime import timedelta

    hook, other = "https://desk.example/hook", "https://other.example/hook"
    a1 = _alert()
    a2 = a1.model_copy(update={"alert_id": "c-fire:2", "level": 2, "created_at": a1.created_at + timedelta(minutes=5)})
    a3 = a1.model_copy(update={"alert_id": "c-pope:1", "cluster_id": "c-pope", "created_at": a1.created_at + timedelta(minutes=1)})
    got = {}
    for name, s in _both(fake_es, tmp_path).items():
        for a in (a2, a3, a1):
            s.add_alert(a)
        s.mark_delivered("c-fire:2", hook, DeliveryState.FAILED, "queued behind c-fire:1")
        s.mark_delivered("c-fire:1", hook, DeliveryState.FAILED, "HTTP 503 " + "x" * 1100)  # longer than keyword ignore_above
        s.mark_delivered("c-pope:1", hook, DeliveryState.DELIVERED)
        s.mark_delivered("c-fire:1", other, DeliveryState.DELIVERED)
        s.mark_delivered("c-fire:2", other, DeliveryState.REJECTED, "HTTP 400")  # for good: neither redelivered nor a gate
        getattr(s, "refresh", lambda: None)()
        r = {"failed": [a.model_dump(mode="json") for a in s.failed_deliveries(hook)],
             "failed_other": s.failed_deliveries(other),
             "gate_rejected": s.undelivered_before(other, "c-fire", 3),
             "gate": [s.undelivered_before(hook, "c-fire", 2), s.undelivered_before(hook, "c-fire", 1),
                      s.undelivered_before(other, "c-fire", 2), s.undelivered_before(hook, "c-pope", 5)],
             "status": {k: sorted((d.target, d.status[:20]) for d in v) for k, v in s.delivery_status().items()}}
        s.mark_delivered("c-fire:1", hook, DeliveryState.DELIVERED)  # the receiver came back
        getattr(s, "refresh", lambda: None)()
        r["gate_after"] = s.undelivered_before(hook, "c-fire", 2)
        r["failed_after"] = [a.alert_id for a in s.failed_deliveries(hook)]
        got[name] = r
        s.close()
    assert got["es"] == got["sqlite"]
    es = got["es"]
    assert [a["alert_id"] for a in es["failed"]] == ["c-fire:1", "c-fire:2"]  # oldest first: redelivered in order
    assert es["failed"][0] == a1.model_dump(mode="json")  # the Alert message itself, ready to POST again
    assert es["failed_other"] == [] and es["gate"] == [True, False, False, False] and es["gate_rejected"] is False
    assert es["status"] == {"c-fire:1": [("https://desk.example/hook", "failed: HTTP 503 xxx"),
                                         ("https://other.example/hook", "delivered")],
                            "c-fire:2": [("https://desk.example/hook", "failed: queued behin"),
                                         ("https://other.example/hook", "rejected: HTTP 400")],
                            "c-pope:1": [("https://desk.example/hook", "delivered")]}
    assert es["gate_after"] is False and es["failed_after"] == ["c-fire:2"]


def test_analyze_stage_duplicate_check_reads_the_elasticsearch_findings(fake_es, tmp_path):
    """The analyze stage given the store app.py now gives it (the one the
    sinks write, opened from ``findings.url``): with findings in Elasticsearch, a redelivered event already stored there
    is recognised, accounted for there, and no SQLite file is consulted."""
    import asyncio
    import hashlib

    from streams.analyze import Analyzer
    from streams.findings import open_findings
    from streams.shared_handle import once
    from streams.stage import AnalyzeStage
    from tests.test_hardening import SRC, _Fetcher, _raw
    from tests.hostile import corpus

    data = corpus.picture_png(3)
    settings = Settings(data_dir=tmp_path / "data", findings=FindingsSettings(url=fake_es.url))
    writer = _store(fake_es)
    snap = snapshots()[0]
    s = snap.new_sighting
    writer.apply_snapshot(snap.model_copy(update={"new_sighting": s.model_copy(update={
        "sha256": hashlib.sha256(data).hexdigest(),  # the post _raw() sends again: same id, picture, platform, account
        "event": s.event.model_copy(update={"event_id": "e-1", "platform": "x", "account_id": "a-1"})})}))
    writer.close()
    store = once(lambda: open_findings(settings.findings.url, settings.data_dir, settings))
    stage = AnalyzeStage(settings, _Fetcher(data=data), Analyzer(settings, tmp_path / "blobs"), lambda _d, _s: None, store)
    r = asyncio.run(stage.process(_raw(), SRC))
    assert r.duplicate and r.op is None and r.dead is None
    stage.mark_duplicate(SRC, r.event_id)
    marker = fake_es.docs[T.concrete("deepwatch-processed")]["r1/t/0/1"]
    assert (marker["outcome"], marker["event_id"], marker["run"]) == ("duplicate", "e-1", "r1")
    assert not (tmp_path / "data" / "findings.sqlite").exists()


def test_webhook_redelivery_reads_and_marks_deliveries_in_elasticsearch(fake_es, tmp_path, monkeypatch):
    import asyncio
    import threading

    from streams import webhook_redelivery, webhooks
    from streams.settings import AlertSettings, WebhookSettings
    from tests.test_webhooks import ENV, SECRET, _Receiver

    monkeypatch.setenv(ENV, SECRET)
    srv = _Receiver([200])
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        hook = WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0, timeout_s=2)
        settings = Settings(data_dir=tmp_path / "data", findings=FindingsSettings(url=fake_es.url),
                            alerts=AlertSettings(webhooks=[hook], allow_private_webhooks=True))  # the receiver listens on loopback
        writer = _store(fake_es)
        writer.add_alert(_alert())
        writer.mark_delivered("c-fire:1", hook.url, DeliveryState.FAILED, "HTTP 503")
        timers = []

        class _App:  # the Faust app methods install_redelivery uses
            def timer(self, **kw):
                return lambda fn: timers.append((kw, fn)) or fn

            def task(self, fn):  # run at worker start: names deliveries no hook serves
                timers.append(({"at_start": True}, fn))
                return fn

        redeliverer = webhook_redelivery.install_redelivery(_App(), settings, webhooks.Deliveries())
        assert timers and timers[0][0]["on_leader"] is True
        assert asyncio.run(redeliverer.run_once()) == 1
        asyncio.run(redeliverer.aclose())
        assert [r["headers"][webhooks.DELIVERY_HEADER] for r in srv.requests] == ["c-fire:1"] and srv.requests[0]["valid"]
        # moved onto the hook's key (one record per alert and hook), as in SQLite
        assert writer.delivered("c-fire:1", webhooks.hook_key(hook)) and writer.delivery_state("c-fire:1", hook.url) is None
        assert not (tmp_path / "data" / "findings.sqlite").exists()
        writer.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_desk_reads_only_the_clusters_that_changed_on_elasticsearch(fake_es, tmp_path):
    """The desk's cache on an Elasticsearch store: after its first full read
    it asks ``changes_since`` (documents rewritten since the newest
    ``updated_at`` it saw, a margin before it) and reads just those again --
    a new revision, a merge, a new cluster -- ending equal to a full read."""
    import time as _time

    from streams.desk.deskdb import DeskDB
    from streams.desk.source import FindingsSource
    from tests.test_store import _sighting, _snap

    writer = _store(fake_es)
    writer.apply_snapshots([_snap(f"c{i}", 1, sighting=_sighting(f"e{i}", f"{i:064x}", i)) for i in range(60)])
    _time.sleep(0.01)  # a batch shares its updated_at: the newest write before the desk looks is this one alone
    writer.apply_snapshots([_snap("c99", 1, sighting=_sighting("e99", "9" * 64, 99))])
    writer.refresh()
    reader = _store(fake_es)
    reader.changes_margin_ms = 1  # the fake has no refresh delay or clock skew to cover
    read_by_id: list[set[str]] = []
    by_id = reader.clusters_by_id
    reader.clusters_by_id = lambda ids: read_by_id.append(set(ids)) or by_id(ids)  # type: ignore[method-assign]
    src = FindingsSource(reader, DeskDB(tmp_path / "desk.sqlite"), ttl_s=0.0)
    fresh = None
    try:
        assert len(src._all()) == 61 and read_by_id == []  # the first read is a full one
        _time.sleep(0.01)  # later writes carry a later updated_at
        writer.apply_snapshots([
            _snap("c1", 2, sighting=_sighting("e1b", "a" * 64, 100), score=0.9),
            _snap("c3", 2, merged_into="c2"), _snap("c2", 2, merged_from=["c3"]),
            _snap("c60", 1, sighting=_sighting("e60", "b" * 64, 101)),
        ])
        writer.refresh()
        got = src._all()
        # what changed, and the newest write it had already seen (the margin looks again)
        assert read_by_id == [{"c1", "c2", "c3", "c60", "c99"}]
        assert got["c1"]["fake_score"] == 0.9 and got["c3"]["merged_into"] == "c2" and "c60" in got
        fresh = FindingsSource(_store(fake_es), DeskDB(tmp_path / "desk2.sqlite"))
        assert got == fresh._all()
    finally:
        close_sources(src, fresh)
        writer.close()


def test_an_event_id_over_512_bytes_is_stored_under_its_digest(fake_es):
    # An event id is at most 256 characters: as many as 1,024 UTF-8 bytes. Used
    # as the sighting's _id it made Elasticsearch refuse the whole bulk request
    # (400 for every document in it), so the sink stopped on one event.
    from streams.es_docs import doc_id

    s = _store(fake_es)
    snap = snapshots()[0]
    long_id = "事" * 256
    event = snap.new_sighting.event.model_copy(update={"event_id": long_id})
    snap = snap.model_copy(update={"new_sighting": snap.new_sighting.model_copy(update={"event": event})})
    s.apply_snapshot(snap)
    stream = fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]
    assert list(stream) == [doc_id(long_id)] and len(doc_id(long_id)) < 512
    assert stream[doc_id(long_id)]["event_id"] == long_id
    s.apply_snapshot(snap)  # redelivered: the same document, not a second one
    assert len(fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]) == 1
    s.close()


def test_delivered_is_never_set_back_by_a_slower_failed_attempt(fake_es, tmp_path):
    """A slow webhook attempt that failed, recorded after the redelivery that
    succeeded, must not turn "delivered" back into "failed" (the redelivery
    loop would send the alert again). ES guards it in one scripted update with
    an upsert, as the SQLite store does in its ON CONFLICT ... WHERE."""
    from streams.es_store_deliveries import DELIVERY_SCRIPT

    hook = "https://desk.example/hook"
    got = {}
    for name, s in _both(fake_es, tmp_path).items():
        s.add_alert(_alert())
        s.mark_delivered("c-fire:1", hook, DeliveryState.FAILED, "HTTP 503")  # first attempt: upserted
        getattr(s, "refresh", lambda: None)()
        r = {"first": [s.delivered("c-fire:1", hook), [a.alert_id for a in s.failed_deliveries(hook)]]}
        s.mark_delivered("c-fire:1", hook, DeliveryState.DELIVERED)  # the redelivery went through
        s.mark_delivered("c-fire:1", hook, DeliveryState.FAILED, "timed out")  # the slow first attempt, recorded late
        s.mark_delivered("c-fire:1", hook, DeliveryState.REJECTED, "HTTP 400")
        getattr(s, "refresh", lambda: None)()
        r["after"] = [s.delivered("c-fire:1", hook), [a.alert_id for a in s.failed_deliveries(hook)],
                      s.undelivered_before(hook, "c-fire", 2),
                      {k: [(d.target, d.status) for d in v] for k, v in s.delivery_status().items()}]
        got[name] = r
        s.close()
    assert got["es"] == got["sqlite"]
    assert got["es"] == {"first": [False, ["c-fire:1"]],
                         "after": [True, [], False, {"c-fire:1": [(hook, "delivered")]}]}
    # the request: an update whose painless guard noops on "delivered", the first record as the upsert
    lines = [line for r in fake_es.requests if r.path.endswith("/_bulk") for line in r.body]
    at = max(i for i, line in enumerate(lines)
             if isinstance(line.get("update"), dict) and line["update"].get("_index") == "deepwatch-deliveries")
    header, body = lines[at], lines[at + 1]
    assert set(header) == {"update"} and header["update"]["_index"] == "deepwatch-deliveries"
    assert body["script"] == {"source": DELIVERY_SCRIPT, "lang": "painless",
                              "params": {"state": "rejected", "detail": "HTTP 400", "at": body["upsert"]["at"]}}
    assert (body["upsert"]["state"], body["upsert"]["status"]) == ("rejected", "HTTP 400")
    assert "scripted_upsert" not in body
    [doc] = fake_es.docs[T.concrete("deepwatch-deliveries")].values()
    assert (doc["state"], doc["status"]) == ("delivered", "")


def test_fake_update_answers_like_es_for_upsert_noop_and_missing(fake_es):
    """The fake's side of the delivery guard, as docs-update describes it: a
    missing document gets the upsert as it is (script not run), an existing
    one runs the script (``ctx.op = 'noop'`` answers ``result: noop``), and
    with neither document nor upsert it is document_missing_exception (404)."""
    from streams.es_store_deliveries import DELIVERY_SCRIPT

    s = _store(fake_es)
    s.ensure_setup()
    index = "deepwatch-deliveries"

    def update(body: dict) -> dict:
        resp = httpx.post(f"{fake_es.url}/_bulk", headers={"content-type": "application/x-ndjson"},
                          content="\n".join(json.dumps(x) for x in ({"update": {"_index": index, "_id": "d1"}}, body)) + "\n")
        return resp.json()["items"][0]["update"]

    script = {"source": DELIVERY_SCRIPT, "lang": "painless",
              "params": {"state": "failed", "detail": "x", "at": "2026-01-01T00:00:01Z"}}
    missing = update({"script": script})
    assert missing["status"] == 404 and missing["error"]["type"] == "document_missing_exception"
    upsert = {"alert_id": "a", "target": "t", "state": "delivered", "status": "", "at": "2026-01-01T00:00:00Z"}
    created = update({"script": script, "upsert": upsert})
    assert created["result"] == "created" and created["status"] == 201
    noop = update({"script": script, "upsert": upsert})
    assert noop["result"] == "noop" and noop["status"] == 200 and noop["_version"] == 1
    other = update({"script": {"source": "ctx._source.status = 'x'"}, "upsert": upsert})
    assert other["status"] == 400  # painless the fake does not emulate is refused, not half-run
    s.close()


def _histogram_by_hand(sightings, start, end, buckets):
    """The desk's bucketing as it was done from every sighting read back."""
    from datetime import datetime

    width = max((end - start).total_seconds(), 1.0)
    out: dict[str, list[int]] = {}
    for s in sightings:
        t = datetime.fromisoformat(s.posted_at.replace("Z", "+00:00"))
        b = min(max(int((t - start).total_seconds() / width * (buckets - 1)), 0), buckets - 1)
        out.setdefault(s.platform, [0] * buckets)[b] += 1
    return out


@pytest.mark.parametrize("ids, span_min, buckets", [
    (["c-fire"], (0, 2), 24),
    (["c-flood", "c-flood2"], (30, 40), 7),  # a merge: both ids
    (["c-fire", "c-pope", "c-flood"], (1, 6), 5),  # a span narrower than the posts: clamped to the ends
    (["c-pope"], (5, 5), 24),  # one instant: a second wide
    (["c-fire", "c-pope"], (0, 7), 1),
    (["nope"], (0, 1), 24),
])
def test_sighting_histogram_counts_as_the_desk_did_in_either_store(fake_es, tmp_path, ids, span_min, buckets):
    from datetime import timedelta

    from tests.findings_fixture import T0

    start, end = (T0 + timedelta(minutes=m) for m in span_min)
    got = {}
    for name, s in _both(fake_es, tmp_path).items():
        fill(s)
        getattr(s, "refresh", lambda: None)()
        got[name] = s.sighting_histogram(ids, start, end, buckets)
        expected = _histogram_by_hand(s.sightings(cluster_ids=ids), start, end, buckets)
        s.close()
        assert got[name] == expected, name
    assert got["es"] == got["sqlite"]


class _Ev:
    def __init__(self, value: bytes):
        self.value = value


class _Acks:
    def __init__(self):
        self.acked: list = []

    async def ack(self, event) -> None:
        self.acked.append(event)


@pytest.mark.parametrize("status, kind", [(503, "cluster_block_exception"), (401, "security_exception")])
def test_an_outage_or_refused_credentials_hold_the_batch_they_do_not_drop_it(fake_es, tmp_path, status, kind):
    """Only bulk requests were retried: the searches and reads around them
    (apply_snapshots looks up stored sightings, an alert its deliveries)
    raised on a 503 or 401, and the sink agent acked the batch anyway: a
    short outage or an expired key lost the findings, alerts included."""
    import asyncio

    from streams import metrics
    from streams.sink_stage import SinkStage
    from streams.sinks import Sinks

    settings = Settings(data_dir=tmp_path, findings=FindingsSettings(
        url=fake_es.url.replace("http://", "es://"), retry_initial_s=0.2, retry_max_s=0.4))
    sinks = Sinks(settings)
    stage = SinkStage(settings, sinks)
    sinks.store.ensure_setup()
    body = error_body(kind, "blocked by: [SERVICE_UNAVAILABLE/2/no master];" if status == 503 else "unable to authenticate", status)
    events = [_Ev(x.model_dump_json().encode()) for x in snapshots()[:3]]
    behind: list[float] = []

    async def main() -> _Acks:
        fake_es.request_faults[:] = [(lambda m, p: True, status, body, 10**6)]  # every request, reads too

        async def outage_then_back():
            # the gauge starts at the first refusal, which may take a while under load: read once
            # it did (10 s at most), then the store comes back
            deadline = time.monotonic() + 10
            while not metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            behind.append(metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value)
            fake_es.request_faults.clear()

        back = asyncio.create_task(outage_then_back())
        acks = _Acks()
        await asyncio.wait_for(stage._stored(acks, events, sinks.snapshots), 20)
        await back
        fake_es.request_faults[:] = [(lambda m, p: True, status, body, 2)]
        await sinks.alert(_alert().model_dump_json().encode())
        return acks

    acks = asyncio.run(main())
    assert len(acks.acked) == 3 and behind[0] > 0  # held, said so, then stored
    assert metrics.SINK_BEHIND_SECONDS.collect()[0].samples[0].value == 0
    assert sorted(fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]) == ["e1", "e2", "e3"]
    assert "c-fire:1" in fake_es.docs[T.concrete("deepwatch-alerts")]
    sinks.store.close()


def test_one_writer_catching_up_does_not_reset_anothers_behind_clock():
    from prometheus_client import REGISTRY

    from streams.es_bulk import BEHIND

    import time

    a, b = object(), object()
    BEHIND.waiting(a)
    time.sleep(0.05)
    BEHIND.waiting(b)
    BEHIND.done(b)  # a write that caught up set the gauge to 0 while another was still retrying
    assert REGISTRY.get_sample_value("deepwatch_sink_behind_seconds") >= 0.05
    BEHIND.done(a)
    assert REGISTRY.get_sample_value("deepwatch_sink_behind_seconds") == 0


def test_only_what_may_pass_later_is_held():
    # every TransportError was held, a SerializationError too: retried for good
    from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig, SerializationError
    from elasticsearch import ApiError, ConnectionError as EsConnectionError

    from streams.es_client import store_unavailable

    def api_error(status: int) -> ApiError:
        meta = ApiResponseMeta(status=status, http_version="1.1", headers=HttpHeaders(), duration=0.0,
                               node=NodeConfig("http", "localhost", 9200))
        return ApiError("x", meta=meta, body={})

    assert store_unavailable(EsConnectionError("refused"))
    assert store_unavailable(api_error(503)) and store_unavailable(api_error(401))
    assert not store_unavailable(SerializationError("cannot encode"))
    assert not store_unavailable(api_error(400))


def test_alerts_keep_when_and_where_the_picture_was_seen_searchably(fake_es):
    """Mapping v4: an alert's first/last seen are dates, its platforms and
    sample posts' ids keywords; the document still gives the alert back whole."""
    from streams.demo_feed import BASE_TIME, scene
    from streams.es_docs import alert_from_doc
    from tests.test_cluster_engine import Harness, spread_feed

    h = Harness(Settings(alerts={"min_sightings_5m": 5, "escalation_factor": 2.0}))
    for sighting in spread_feed(scene(7)):
        h.see(sighting)
    alert = h.alerts[-1]
    s = _store(fake_es)
    assert s.add_alert(alert) is True  # checked against the mapping by the fake, dates included
    props = fake_es.component_templates["deepwatch-alerts-mappings"]["template"]["mappings"]["properties"]
    assert props["first_seen"] == props["last_seen"] == {"type": "date"} and props["platforms"]["type"] == "keyword"
    assert props["sample_posts"]["properties"]["posted_at"] == {"type": "date"}
    doc = fake_es.docs[T.concrete("deepwatch-alerts")][alert.alert_id]
    assert doc["platforms"] == ["telegram", "x", "bluesky", "mastodon"] and len(doc["sample_posts"]) == 4
    assert alert_from_doc(doc) == alert
    s.refresh()
    hits = s.es.search(index="deepwatch-alerts", query={"bool": {"filter": [
        {"term": {"platforms": "telegram"}}, {"term": {"sample_posts.account_id": "a3"}},
        {"range": {"first_seen": {"lt": BASE_TIME.isoformat()}}}]}})["hits"]["hits"]
    assert [x["_id"] for x in hits] == [alert.alert_id]
    s.close()


def test_first_and_last_seen_compare_instants_and_the_picture_url_is_the_desks(fake_es, monkeypatch):
    """first/last seen by the instant (``@timestamp``), as SQLite now does
    too, whatever offset a post gave; the cluster's ``picture_url`` under
    ``desk.public_url`` (it read $DEEPWATCH_DESK_URL, and put the id in the
    path unencoded)."""
    from datetime import datetime, timedelta, timezone

    from tests.test_store import _sighting, _snap

    monkeypatch.setenv("DEEPWATCH_DESK_URL", "https://grafana-only.example.org")  # Grafana's, not a setting
    settings = Settings(findings=FindingsSettings(retry_initial_s=0.001, retry_max_s=0.004),
                        desk={"public_url": "https://desk.example.org/dw"})
    s = EsFindingsStore.from_url(fake_es.url.replace("http://", "es://"), settings=settings)
    early, late = _sighting("early", "a" * 64, 0), _sighting("late", "b" * 64, 1)
    early.event.posted_at = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=5)))  # 07:00 UTC
    late.event.posted_at = datetime(2024, 1, 1, 10, 0, tzinfo=timezone.utc)
    s.apply_snapshots([_snap("c/1 #x", 1, sighting=early), _snap("c/1 #x", 2, sighting=late)])
    s.refresh()
    c = s.cluster("c/1 #x")
    assert (c.first_seen, c.last_seen) == ("2024-01-01T12:00:00+05:00", "2024-01-01T10:00:00+00:00")
    doc = fake_es.docs[T.concrete("deepwatch-clusters")]["c/1 #x"]
    assert doc["picture_url"] == "https://desk.example.org/dw/clusters/c%2F1%20%23x"
    s.close()
    bare = _store(fake_es)  # no desk address: no link
    bare.apply_snapshots([_snap("c2", 1)])
    assert fake_es.docs[T.concrete("deepwatch-clusters")]["c2"]["picture_url"] is None
    bare.close()


def test_the_documented_in_place_mapping_change_is_the_v4_alert_additions():
    # docs/elasticsearch.md tells a v3 deployment what to PUT instead of reindexing
    doc = (Path(__file__).resolve().parents[1] / "docs" / "elasticsearch.md").read_text()
    body = doc.split("PUT deepwatch-alerts/_mapping ", 1)[1].split("\nPOST ", 1)[0]
    assert json.loads(body) == {"properties": T.ALERT_SPREAD}


def test_the_documented_in_place_mapping_change_is_the_v4_delivery_state():
    # the deliveries mapping is strict: a v3 deployment must PUT this before v4 workers write
    doc = (Path(__file__).resolve().parents[1] / "docs" / "elasticsearch.md").read_text()
    body = doc.split("PUT deepwatch-deliveries/_mapping ", 1)[1].split("\n", 1)[0]
    assert json.loads(body) == {"properties": T.DELIVERY_STATE}
    assert T.DELIVERY_STATE.items() <= T.component_templates()["deepwatch-deliveries-mappings"]["template"][
        "mappings"]["properties"].items()
