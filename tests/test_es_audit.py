"""The Elasticsearch findings store's answers to an audit: ids within ES's
limits, a start that needs no cluster ``manage`` once an admin installed
the script, mapping versions checked at start, reads that scan only what
they need, and answers that agree with the SQLite store."""

from __future__ import annotations

import logging
import re

import pytest

from streams import es_templates as T
from streams.es_client import EsConfig, EsError
from streams.cluster_search import ClusterQuery
from streams.findings import DeliveryState
from tests.fake_es import error_body
from tests.findings_fixture import alerts, fill, snapshots
from tests.test_es_store import _both, _store


def test_an_account_alert_id_over_512_bytes_is_stored_under_its_digest(fake_es):
    """``account:<id>:1`` with a 256-character account id of 4-byte
    characters: as a raw _id the whole request was refused (400), and the
    delivery recorded as queued pointed at an alert never stored."""
    s = _store(fake_es)
    account = "𝔡" * 256
    alert = alerts()[0].model_copy(update={"alert_id": f"account:{account}:1", "cluster_id": f"account:{account}",
                                           "account_id": account})
    assert s.add_alert(alert) is True
    assert s.add_alert(alert) is False  # redelivered: the same document
    assert [a.alert_id for a in s.alerts()] == [alert.alert_id]
    assert s.dead_letters() == []
    s.close()


def _forbidden(what: str) -> dict:
    return error_body("security_exception", f"action [{what}] is unauthorized for API key id [k] of user [deepwatch]", 403)


def test_a_role_without_cluster_manage_starts_once_an_admin_installed_the_script(fake_es):
    """ensure_setup PUT the script on every start: with the documented
    least-privilege role the 403 was held and the worker never started."""
    _store(fake_es).ensure_setup()  # the admin's run
    for path in ("/_scripts/" + T.SCRIPT_ID,):
        fake_es.fail_requests(403, _forbidden("cluster:admin/script/get"), times=10, path=path, method="GET")
        fake_es.fail_requests(403, _forbidden("cluster:admin/script/put"), times=10, path=path, method="PUT")
    s = _store(fake_es)
    s.ensure_setup()  # no hold: it goes on with the script the admin installed
    s.apply_snapshots(snapshots()[:2])
    assert fake_es.docs[T.concrete("deepwatch-clusters")]["c-fire"]["revision"] == 2
    s.close()


def test_a_missing_script_that_may_not_be_installed_is_one_clear_held_line(fake_es):
    fake_es.fail_requests(403, _forbidden("cluster:admin/script/put"), times=10, path="/_scripts/" + T.SCRIPT_ID,
                          method="PUT")
    s = _store(fake_es)
    with pytest.raises(EsError) as e:
        s.ensure_setup()
    assert e.value.hold and f"stored script {T.SCRIPT_ID} is not installed" in str(e.value)
    assert "\n" not in str(e.value)
    s.close()


def test_an_admin_installed_template_is_used_when_the_role_may_not_put_templates(fake_es, caplog):
    _store(fake_es).ensure_setup()
    fake_es.component_templates["deepwatch-common"]["_meta"]["digest"] = "an-admins-edit"
    fake_es.fail_requests(403, _forbidden("indices:admin/index_template/put"), times=10,
                          path="/_component_template/deepwatch-common", method="PUT")
    s = _store(fake_es)
    with caplog.at_level(logging.WARNING, "deepwatch.es"):
        s.ensure_setup()
    assert any("component template deepwatch-common differs" in r.getMessage() for r in caplog.records)
    s.close()


def _old_mapping(key: str, version: int, drop: tuple[str, ...] = ()) -> dict:
    props = T.component_templates()[f"deepwatch-{key.replace('_', '-')}-mappings"]["template"]["mappings"]
    return {"dynamic": props["dynamic"], "properties": {k: v for k, v in props["properties"].items() if k not in drop}}


def test_an_index_an_earlier_version_made_takes_added_fields_in_place(fake_es):
    # deliveries as v3 made it: no ``state``, strict (every v4 record would be refused)
    fake_es.make_index("deepwatch-deliveries-v3", "deepwatch-deliveries", _old_mapping("deliveries", 3, ("state",)))
    s = _store(fake_es)
    s.ensure_setup()
    m = fake_es.index_mappings["deepwatch-deliveries-v3"]
    assert m["properties"]["state"] == T.DELIVERY_STATE["state"] and m["_meta"]["mapping_version"] == T.MAPPING_VERSION
    s.mark_delivered("c-fire:1", "hook", DeliveryState.QUEUED)
    assert s.delivery_state("c-fire:1", "hook") is DeliveryState.QUEUED
    # brought up to date once: the next start reads v4 and puts nothing
    n = len(fake_es.put_mappings)
    _store(fake_es).ensure_setup()
    assert len(fake_es.put_mappings) == n
    s.close()


def test_a_skipped_reindex_refuses_the_start_in_one_line_naming_it(fake_es):
    """Only the alias was checked: a deployment that skipped v3's reindex of
    the clusters started silently, and every write was refused."""
    fake_es.make_index("deepwatch-clusters-v2", "deepwatch-clusters", _old_mapping("clusters", 2))
    s = _store(fake_es)
    with pytest.raises(EsError) as e:
        s.ensure_setup()
    msg = str(e.value)
    assert "deepwatch-clusters is deepwatch-clusters-v2, mapping v2" in msg and "mapping v3" in msg
    assert f"reindex it into {T.concrete('deepwatch-clusters')}" in msg and "\n" not in msg
    assert fake_es.index_mappings["deepwatch-clusters-v2"].get("_meta") is None  # nothing half-done
    s.close()


def test_the_fake_keeps_each_indexs_mapping_and_refuses_a_type_change(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    with pytest.raises(Exception) as e:
        s.es.indices.put_mapping(index="deepwatch-clusters", properties={"revision": {"type": "keyword"}})
    assert "cannot be changed from type [long] to [keyword]" in str(e.value)
    got = s.es.indices.get_mapping(index="deepwatch-clusters")
    assert got[T.concrete("deepwatch-clusters")]["mappings"]["_meta"]["mapping_version"] == T.MAPPING_VERSION
    s.close()


def test_cluster_statistics_read_only_the_clusters_sightings(fake_es):
    s = _store(fake_es)
    fill(s)
    s.refresh()
    n = len(fake_es.requests)
    s.clusters()
    stats = [r for r in fake_es.requests[n:] if r.path.endswith("/_search") and "by_cluster" in (r.body.get("aggs") or {})]
    assert stats and all("match_all" not in str(r.body["query"]) for r in stats)
    assert stats[0].body["query"] == {"terms": {"cluster_id": ["c-fire", "c-flood", "c-flood2", "c-pope"]}}
    s.close()


def test_clusters_with_a_limit_reads_only_those_in_sqlites_order(fake_es, tmp_path):
    stores = _both(fake_es, tmp_path)
    for st in stores.values():
        fill(st)
    stores["es"].refresh()
    n = len(fake_es.requests)
    top = {k: [c.model_dump(exclude={"updated_at"}) for c in st.clusters(limit=2)] for k, st in stores.items()}
    assert top["es"] == top["sqlite"] and [c["id"] for c in top["es"]] == ["c-fire", "c-pope"]
    cluster_reads = [r for r in fake_es.requests[n:] if r.path == "/deepwatch-clusters/_search"]
    assert len(cluster_reads) == 1 and cluster_reads[0].body["size"] == 2
    for st in stores.values():
        st.close()


def test_iter_members_gives_each_picture_once_as_sqlite_does(fake_es, tmp_path):
    stores = _both(fake_es, tmp_path)
    for st in stores.values():
        fill(st)
    stores["es"].refresh()
    rows = {k: sorted(st.iter_members(), key=lambda r: (r.sha256, r.cluster_id)) for k, st in stores.items()}
    assert rows["es"] == rows["sqlite"]
    assert len({r.sha256 for r in rows["es"]}) == len(rows["es"])
    for st in stores.values():
        st.close()


@pytest.mark.parametrize("platform", ["X", "x", "BlueSky"])
def test_platform_search_folds_case_on_both_stores(fake_es, tmp_path, platform):
    stores = _both(fake_es, tmp_path)
    for st in stores.values():
        fill(st)
    stores["es"].refresh()
    found = {k: sorted(c.id for c in st.search(ClusterQuery(platform=platform))) for k, st in stores.items()}
    assert found["es"] == found["sqlite"] and found["es"]
    for st in stores.values():
        st.close()


def test_account_handle_search_folds_any_script_on_both_stores(fake_es, tmp_path):
    """SQLite's lower() folds ASCII only: @ÖLAF did not find @ölaf there,
    while Elasticsearch's lowercase normalizer did."""
    stores = _both(fake_es, tmp_path)
    snap = snapshots()[0]
    s = snap.new_sighting
    snap = snap.model_copy(update={"new_sighting": s.model_copy(update={
        "event": s.event.model_copy(update={"account_handle": "@ölaf"})})})
    for st in stores.values():
        st.apply_snapshot(snap)
    stores["es"].refresh()
    for k, st in stores.items():
        assert [c.id for c in st.search(ClusterQuery(account="ÖLAF"))] == ["c-fire"], k
    for st in stores.values():
        st.close()


def test_undelivered_before_reads_earlier_alerts_in_real_time(fake_es):
    """The earlier alerts were found by a search, which sees them only after
    a refresh: a level-2 alert went out before the failed level 1."""
    s = _store(fake_es)
    first = alerts()[0]
    s.mark_delivered(first.alert_id, "hook", DeliveryState.FAILED, "HTTP 503")
    s.add_alert(first)
    real_search = s._search

    def not_refreshed(index, deadline=None, **body):  # what a search sees within the refresh interval
        if index == s.names["alerts"]:
            return {"hits": {"total": {"value": 0, "relation": "eq"}, "hits": []}}
        return real_search(index, deadline, **body)

    s._search = not_refreshed
    assert s.undelivered_before("hook", "c-fire", 2) is True
    # a delivery queued for an alert that was never stored holds nothing back (as SQLite's join)
    s.mark_delivered("c-pope:1", "hook", DeliveryState.QUEUED)
    assert s.undelivered_before("hook", "c-pope", 2) is False
    s.close()


def test_the_client_does_not_retry_overload_at_once_nor_wait_out_timeouts():
    es = EsConfig.from_url("es://127.0.0.1:1", env={}).client()
    # the client's own per-request options (it passes them to every request it makes)
    assert (es._max_retries, tuple(es._retry_on_status), es._retry_on_timeout) == (1, (), False)
    es.close()


def test_credentials_over_plain_http_and_an_unused_ca_bundle_are_warned(caplog):
    env = {"DEEPWATCH_ES_API_KEY": "k"}
    with caplog.at_level(logging.WARNING, "deepwatch.es"):
        EsConfig.from_url("es://127.0.0.1:1", env=env, ca_certs="/etc/ca.pem").client().close()
        said = [r.getMessage() for r in caplog.records]
        assert any("API key is sent in cleartext" in m for m in said)
        assert any(m.startswith("findings.ca_certs is set") and "CA bundle is not used" in m for m in said)
        caplog.clear()
        EsConfig.from_url("ess://127.0.0.1:1", env={"DEEPWATCH_ES_API_KEY": "k"}).client().close()
        assert not caplog.records


def test_updated_at_is_written_to_the_millisecond_as_sqlite_writes_it(fake_es):
    s = _store(fake_es)
    s.apply_snapshots(snapshots()[:1])
    at = fake_es.docs[T.concrete("deepwatch-clusters")]["c-fire"]["updated_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", at), at
    s.close()


def _with_text(snap, text: str):
    s = snap.new_sighting
    return snap.model_copy(update={"new_sighting": s.model_copy(update={
        "event": s.event.model_copy(update={"text": text})})})


def _found(stores: dict, text: str) -> dict[str, list[str]]:
    return {k: sorted(c.id for c in st.search(ClusterQuery(text=text))) for k, st in stores.items()}


def test_a_word_finds_its_possessive_on_both_stores(fake_es, tmp_path):
    """Mapping v5's ``deepwatch_text`` breaks words where SQLite's
    ``unicode61`` does: ``standard`` alone kept ``trump's`` one token, so
    ``trump`` missed "Trump's rally" on Elasticsearch only."""
    stores = _both(fake_es, tmp_path)
    for st in stores.values():
        st.apply_snapshot(_with_text(snapshots()[0], "Trump’s rally downtown, U.S. 1,000 l'amour foo_bar"))
    stores["es"].refresh()
    try:
        for text in ("trump", "Trump's", "TRUMP’S rally", '"trump s"', "u.s", "1,000", "amour", "foo", "bar"):
            assert _found(stores, text) == {"sqlite": ["c-fire"], "es": ["c-fire"]}, text
        for text in ("trumps", "trump's rallies", "us", "1000", "foo_baz"):
            assert _found(stores, text) == {"sqlite": [], "es": []}, text
    finally:
        for st in stores.values():
            st.close()


def test_cjk_words_are_found_as_sqlite_finds_them(fake_es, tmp_path):
    """A run of CJK characters is one token for SQLite's ``unicode61`` and a
    token per ideograph (per hiragana; katakana runs together) for the
    ``standard`` tokenizer ``deepwatch_text`` keeps: a phrase of them, so
    what SQLite finds Elasticsearch finds too. Elasticsearch also finds a
    word inside a longer run, where SQLite does not (docs/elasticsearch.md,
    "Analyst search"); a ``cjk_bigram`` filter would lose one-ideograph words."""
    stores = _both(fake_es, tmp_path)
    for st in stores.values():
        st.apply_snapshot(_with_text(snapshots()[0], "我爱北京天安门 東京タワーに行った。서울 홍수"))
    stores["es"].refresh()
    try:
        for text in ("我爱北京天安门", "東京タワーに行った", "서울", "홍수 서울", '"서울 홍수"'):
            assert _found(stores, text) == {"sqlite": ["c-fire"], "es": ["c-fire"]}, text
        for text in ("上海", "大阪タワー", "부산"):
            assert _found(stores, text) == {"sqlite": [], "es": []}, text
        # the one difference: a word inside a run of CJK characters
        assert _found(stores, "北京") == {"sqlite": [], "es": ["c-fire"]}
        assert _found(stores, "タワー") == {"sqlite": [], "es": ["c-fire"]}
    finally:
        for st in stores.values():
            st.close()


@pytest.mark.parametrize("text", [
    "Trump's rally", "Trump’s", "U.S. troops", "1,000.50 dollars", "a:b", "foo_bar", "l'amour", "rock'n'roll",
    "café Ölaf", "e-mail co-op", "#hashtag @user", "https://example.com/a?b=c&d=1", 'צה"ל', "foo\u00adbar",
    "ΑΘΗΝΑ·ΚΡΗΤΗ", "Привет, мир!", "مرحبا، عالم", "x\u202fy", "3\u20444", "한국어 텍스트", "ＡＢＣ ｶﾀｶﾅ",
    "it’s 5 o'clock", "Ms. O’Neil's", "don‘t", "ａｂ．ｃｄ", "snake_case__x",
])
def test_deepwatch_text_breaks_words_where_unicode61_does(text):
    """The analyzer mapping v5 installs, run as the fake models the
    ``standard`` tokenizer (UAX #29), against SQLite's FTS5 ``unicode61``
    (the store's own tokenizer): the same tokens, CJK runs and emoji aside."""
    import sqlite3

    from tests.fake_es import analyze, resolve_analyzer

    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='unicode61 remove_diacritics 0')")
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    db.execute("INSERT INTO t(rowid, x) VALUES (1, ?)", (text,))
    sqlite_tokens = [r[0] for r in db.execute("SELECT term FROM v ORDER BY offset")]
    db.close()
    assert list(analyze(text, resolve_analyzer("deepwatch_text", T.ANALYSIS))) == sqlite_tokens


def test_the_standard_analyzer_alone_keeps_the_words_v4_indexed_whole():
    from tests.fake_es import analyze, resolve_analyzer

    standard = resolve_analyzer("standard", {})
    assert list(analyze("Trump’s rally, U.S. 1,000 foo_bar 我爱", standard)) == [
        "trump’s", "rally", "u.s", "1,000", "foo_bar", "我", "爱"]


# -- mapping v5: the sightings' analysis, on a deployment v4 made -------------------
# What v4's deepwatch-common gave every index (the -mappings templates carried none)
V4_SETTINGS = {"analysis": {"normalizer": {"deepwatch_lowercase": {"type": "custom", "filter": ["lowercase"]}}}}


def _v4_mapping(key: str) -> dict:
    m = _old_mapping(key, 4)
    m["_meta"] = {"managed_by": "deepwatch", "mapping_version": 4}
    if key == "sightings":  # v4: the standard analyzer
        m["properties"]["text"] = {"type": "text"}
        m["properties"]["hashtags"] = {**m["properties"]["hashtags"], "fields": {"text": {"type": "text"}}}
    return m


def _v4_deployment(fake_es, sightings: dict[str, dict] | None = None) -> str:
    """Every index as mapping v4 made it; the sightings data stream's backing index (its name)."""
    names = T.names()
    for key in ("clusters", "alerts", "dead_letters", "deliveries", "processed"):
        fake_es.make_index(f"{names[key]}-v4", names[key], _v4_mapping(key), V4_SETTINGS)
    return fake_es.make_data_stream(names["sightings"], _v4_mapping("sightings"), V4_SETTINGS, docs=sightings)


def test_a_v4_deployment_starts_and_its_sightings_roll_over_to_the_new_analysis(fake_es):
    """v5 changes an analyzer, which no index takes in place: the aliased
    indices (no text field changed) are stamped v5 in place, the sightings
    stream is rolled over lazily (its next write makes a v5 backing index),
    and the sightings stored before keep v4's tokenization."""
    from streams.es_docs import sighting_doc

    snaps = snapshots()
    old = _with_text(next(x for x in snaps if x.cluster_id == "c-flood"), "Trump's rally downtown").new_sighting
    v4_backing = _v4_deployment(fake_es, {old.event.event_id: sighting_doc("c-flood", old)})
    s = _store(fake_es)
    s.ensure_setup()  # no reindex asked for: it starts

    [roll] = fake_es.calls("POST", "/deepwatch-sightings/_rollover")
    assert roll.params == {"lazy": ["true"]}
    assert fake_es.stream_backing["deepwatch-sightings"] == [v4_backing]  # nothing written yet
    assert [alias for alias, _props in fake_es.put_mappings] == [
        "deepwatch-clusters", "deepwatch-alerts", "deepwatch-dead-letters", "deepwatch-deliveries", "deepwatch-processed"]
    # what changed since v4 in those indices: the accounts count in velocity (v6), nothing else
    assert dict(fake_es.put_mappings) == {a: (T.VELOCITY_ACCOUNTS_5M if a in ("deepwatch-clusters", "deepwatch-alerts")
                                              else {}) for a, _ in fake_es.put_mappings}
    assert fake_es.index_mappings["deepwatch-clusters-v4"]["_meta"]["mapping_version"] == T.MAPPING_VERSION
    v4 = fake_es.index_mappings[v4_backing]
    assert v4["_meta"]["mapping_version"] == 4 and v4["properties"]["text"] == {"type": "text"}

    s.apply_snapshots([_with_text(snaps[0], "Trump's rally downtown"), *snaps[1:]])
    s.refresh()
    backing = fake_es.stream_backing["deepwatch-sightings"]
    assert len(backing) == 2 and backing[0] == v4_backing
    new = fake_es.index_mappings[backing[1]]
    assert new["_meta"]["mapping_version"] == T.MAPPING_VERSION
    assert new["properties"]["text"] == {"type": "text", "analyzer": "deepwatch_text"}
    assert fake_es.index_analysis[backing[1]]["analyzer"]["deepwatch_text"] == T.ANALYSIS["analyzer"]["deepwatch_text"]
    assert sorted(fake_es.docs[v4_backing]) == ["e6"]  # the redelivered e6 was not written again
    # the v5 sighting is found by its word; the v4 one keeps the standard analyzer's "trump's"
    assert [c.id for c in s.search(ClusterQuery(text="trump"))] == ["c-fire"]
    assert [c.id for c in s.search(ClusterQuery(text="trump's"))] == ["c-fire"]
    s.close()

    # the next start finds the stream's write index at v5: nothing asked again
    n, puts = len(fake_es.calls("POST", "/deepwatch-sightings/_rollover")), len(fake_es.put_mappings)
    s2 = _store(fake_es)
    s2.ensure_setup()
    assert (len(fake_es.calls("POST", "/deepwatch-sightings/_rollover")), len(fake_es.put_mappings)) == (n, puts)
    s2.close()


def test_a_v1_sightings_stream_gets_its_added_fields_then_the_rollover(fake_es):
    """A stream of unknown version (no ``_meta``, no ``-v<N>``: before v4)
    takes v2's added field in place, stamped with the version that reached
    (v4, not v5: its analysis is still the old one), then the rollover."""
    _v4_deployment(fake_es)
    backing = fake_es.data_streams["deepwatch-sightings"]
    m = fake_es.index_mappings[backing]
    del m["_meta"]
    del m["properties"]["source"]["properties"]["run"]
    s = _store(fake_es)
    s.ensure_setup()
    assert ("deepwatch-sightings", T.MIGRATIONS[2]["sightings"]) in fake_es.put_mappings
    assert m["_meta"]["mapping_version"] == 4 and "run" in m["properties"]["source"]["properties"]
    assert len(fake_es.calls("POST", "/deepwatch-sightings/_rollover")) == 1
    s.close()


def test_a_role_that_may_not_roll_over_starts_with_a_warning(fake_es, caplog):
    """ILM rolls the stream over within a day anyway; until then new
    sightings are written with v4's analysis, which the mapping takes."""
    _v4_deployment(fake_es)
    fake_es.fail_requests(403, _forbidden("indices:admin/rollover"), times=10, path="/deepwatch-sightings/_rollover")
    s = _store(fake_es)
    with caplog.at_level(logging.WARNING, "deepwatch.es"):
        s.ensure_setup()
    assert any("may not roll it over" in r.getMessage() for r in caplog.records)
    s.apply_snapshots(snapshots()[:1])
    assert len(fake_es.stream_backing["deepwatch-sightings"]) == 1 and s.dead_letters() == []
    s.close()


def test_the_fake_refuses_an_analysis_change_in_place_as_elasticsearch_does(fake_es):
    """Why v5 is a rollover: a text field's analyzer cannot be updated, an
    analyzer an index's settings lack cannot be named in its mapping, and
    analysis settings are static on an open index. A multi-field with an
    analyzer the index has can be added."""
    from elasticsearch import BadRequestError

    v4_backing = _v4_deployment(fake_es)
    s = _store(fake_es)
    s.ensure_setup()
    es = s.es
    with pytest.raises(BadRequestError) as e:  # v4's backing index: no such analyzer
        es.indices.put_mapping(index="deepwatch-sightings", properties={"text": {"type": "text", "analyzer": "deepwatch_text"}})
    assert "analyzer [deepwatch_text] has not been configured in mappings" in str(e.value)
    with pytest.raises(BadRequestError) as e:
        es.indices.put_settings(index=v4_backing, settings={"analysis": T.ANALYSIS})
    assert "Can't update non dynamic settings" in str(e.value)
    s.apply_snapshots(snapshots()[:1])  # the lazy rollover: a v5 write index
    write = fake_es.data_streams["deepwatch-sightings"]
    with pytest.raises(BadRequestError) as e:
        es.indices.put_mapping(index=write, properties={"text": {"type": "text"}})
    assert "Cannot update parameter [analyzer] from [deepwatch_text] to [default]" in str(e.value)
    es.indices.put_mapping(index=write, properties={"text": {"type": "text", "analyzer": "deepwatch_text",
                                                             "fields": {"std": {"type": "text"}}}})
    assert fake_es.index_mappings[write]["properties"]["text"]["fields"] == {"std": {"type": "text"}}
    s.close()


def test_a_component_template_must_define_the_analysis_its_mappings_name(fake_es):
    """Elasticsearch validates a component template on its own: v4's
    ``-mappings`` templates named the normalizer only ``deepwatch-common``
    defined, which a real cluster refuses; v5's each carry ``ANALYSIS``."""
    from elasticsearch import BadRequestError

    s = _store(fake_es)
    s.ensure_setup()  # every v5 component template accepted on its own
    v4_style = {"mappings": {"properties": {"hashtags": {"type": "keyword", "normalizer": "deepwatch_lowercase"}}}}
    with pytest.raises(BadRequestError) as e:
        s.es.cluster.put_component_template(name="deepwatch-v4-style", template=v4_style)
    assert "normalizer [deepwatch_lowercase] not found for field [hashtags]" in str(e.value)
    with pytest.raises(BadRequestError) as e:
        s.es.cluster.put_component_template(name="deepwatch-v4-style", template={
            "mappings": {"properties": {"text": {"type": "text", "analyzer": "deepwatch_text"}}}})
    assert "analyzer [deepwatch_text] has not been configured in mappings" in str(e.value)
    for name, body in T.component_templates().items():
        assert body["template"]["settings"]["analysis"] == T.ANALYSIS, name
    s.close()


def test_no_rollover_while_the_templates_are_an_older_versions(fake_es):
    # Credentials that may not install the v5 templates left v4's in place, and every start
    # still asked for a lazy rollover: each made one more backing index at v4 analysis
    import copy

    _v4_deployment(fake_es)
    for name, body in T.component_templates().items():  # what v4 installed: the standard analyzer, meta v4
        body = copy.deepcopy(body)
        m = body["template"].get("mappings")
        if m is not None:
            m["_meta"]["mapping_version"] = 4
        if name == "deepwatch-sightings-mappings":
            m["properties"]["text"] = {"type": "text"}
            m["properties"]["hashtags"]["fields"] = {"text": {"type": "text"}}
        fake_es.component_templates[name] = body
    for name, body in T.index_templates().items():
        fake_es.index_templates[name] = copy.deepcopy(body)
    for path in ("-mappings", "-common"):
        fake_es.fail_requests(403, _forbidden("cluster:admin/component_template/put"), times=100, path=path,
                              method="PUT")
    before = len(fake_es.stream_backing["deepwatch-sightings"])
    for snap in snapshots()[:3]:
        s = _store(fake_es)
        s.ensure_setup()
        s.apply_snapshots([snap])
        s.flush()
        s.close()
    assert len(fake_es.stream_backing["deepwatch-sightings"]) == before
