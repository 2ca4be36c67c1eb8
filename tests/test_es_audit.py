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
from streams.findings import ClusterQuery, DeliveryState
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
    assert "reindex it into deepwatch-clusters-v4" in msg and "\n" not in msg
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
    env = {"DEEPWATCH_ES_API_KEY": "k", "DEEPWATCH_ES_CA_CERTS": "/etc/ca.pem"}
    with caplog.at_level(logging.WARNING, "deepwatch.es"):
        EsConfig.from_url("es://127.0.0.1:1", env=env).client().close()
        said = [r.getMessage() for r in caplog.records]
        assert any("API key is sent in cleartext" in m for m in said)
        assert any("CA bundle is not used" in m for m in said)
        caplog.clear()
        EsConfig.from_url("ess://127.0.0.1:1", env={"DEEPWATCH_ES_API_KEY": "k"}).client().close()
        assert not caplog.records


def test_updated_at_is_written_to_the_millisecond_as_sqlite_writes_it(fake_es):
    s = _store(fake_es)
    s.apply_snapshots(snapshots()[:1])
    at = fake_es.docs[T.concrete("deepwatch-clusters")]["c-fire"]["updated_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", at), at
    s.close()


@pytest.mark.xfail(strict=True, reason="known difference, not fixed yet (docs/elasticsearch.md, 'Analyst search'): "
                   "ES's standard analyzer keeps trump's as one token, SQLite's unicode61 splits it")
def test_a_word_finds_its_possessive_on_both_stores(fake_es, tmp_path):
    stores = _both(fake_es, tmp_path)
    snap = snapshots()[0]
    s = snap.new_sighting
    snap = snap.model_copy(update={"new_sighting": s.model_copy(update={
        "event": s.event.model_copy(update={"text": "Trump's rally downtown"})})})
    for st in stores.values():
        st.apply_snapshot(snap)
    stores["es"].refresh()
    try:
        for k, st in stores.items():
            assert [c.id for c in st.search(ClusterQuery(text="trump"))] == ["c-fire"], k
    finally:
        for st in stores.values():
            st.close()
