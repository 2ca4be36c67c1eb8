"""Live suite: the Elasticsearch findings store against a real cluster.

Runs only when DEEPWATCH_ES_URL is set (es://, ess://, http(s)://; credentials
in DEEPWATCH_ES_API_KEY or DEEPWATCH_ES_USERNAME/PASSWORD, CA bundle in
DEEPWATCH_FINDINGS__CA_CERTS, the setting findings.ca_certs). Everything it
creates carries a random index prefix and is deleted afterwards (the stored
script id is shared and left in place).
"""

from __future__ import annotations

import os
import uuid

import pytest

from streams.cluster_search import ClusterQuery
from streams.findings import MemberRow
from streams.settings import Settings
from tests.findings_fixture import fill, snapshots

URL = os.environ.get("DEEPWATCH_ES_URL")
pytestmark = [pytest.mark.live,
              pytest.mark.skipif(not URL, reason="DEEPWATCH_ES_URL is not set: no live Elasticsearch to test against")]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from streams.store import SqliteFindingsStore

    prefix = f"deepwatch-test-{uuid.uuid4().hex[:8]}"
    s = _live_store(prefix)
    sq = SqliteFindingsStore(tmp_path_factory.mktemp("live") / "findings.sqlite")
    try:
        fill(s)
        s.refresh()
        fill(sq)
        yield s, sq
    finally:
        _drop(s, prefix)
        sq.close()


def _live_store(prefix: str):
    from streams.es_store import EsFindingsStore

    base = Settings()  # findings.ca_certs and verify_certs from DEEPWATCH_FINDINGS__*, as a deployment sets them
    findings = base.findings.model_copy(update={"index_prefix": prefix})
    return EsFindingsStore.from_url(URL, settings=base.model_copy(update={"findings": findings}))


def _drop(s, prefix: str) -> None:
    """Everything a test store under ``prefix`` made, deleted; the store closed."""
    es = s.es
    es.options(ignore_status=404).indices.delete_data_stream(name=s.names["sightings"])
    es.options(ignore_status=404).indices.delete(index=f"{prefix}-*")
    for name in list(s.names.values()):
        es.options(ignore_status=404).indices.delete_index_template(name=name)
    for name in (f"{prefix}-common", *(f"{v}-mappings" for v in s.names.values())):
        es.options(ignore_status=404).cluster.delete_component_template(name=name)
    es.options(ignore_status=404).ilm.delete_lifecycle(name=s.names["sightings"])
    s.close()


def test_server_is_supported(live):
    s, _ = live
    number = s.server_info()["version"]["number"]
    assert tuple(int(x) for x in number.split(".")[:2]) >= (8, 15)


def test_templates_are_installed_with_their_version(live):
    from streams import es_templates as T

    s, _ = live
    got = s.es.indices.get_index_template(name=s.names["clusters"])["index_templates"][0]["index_template"]
    assert got["version"] == T.MAPPING_VERSION
    mapping = s.es.indices.get_mapping(index=s.names["clusters"])
    [(_, m)] = mapping.body.items()
    assert m["mappings"]["properties"]["members"]["properties"]["pdq_bits"]["element_type"] == "bit"


def test_sightings_text_breaks_words_where_sqlite_does(live):
    """Mapping v5's ``deepwatch_text`` on the real analysis chain (the
    mapping character filter's ``\\uXXXX`` rules, the standard tokenizer)."""
    s, _ = live
    backing = s.es.indices.get_data_stream(name=s.names["sightings"])["data_streams"][0]["indices"][-1]["index_name"]
    got = s.es.indices.analyze(index=backing, field="text", text="Trump’s rally, U.S. 1,000 foo_bar 我爱北京")
    assert [t["token"] for t in got["tokens"]] == ["trump", "s", "rally", "u", "s", "1", "000", "foo", "bar",
                                                   "我", "爱", "北", "京"]


@pytest.mark.parametrize("query", [
    ClusterQuery(sort="score"), ClusterQuery(sort="velocity"), ClusterQuery(text='"white puffer"'),
    ClusterQuery(hashtag="storm", sort="sightings"), ClusterQuery(platform="mastodon"),
    ClusterQuery(verdict="likely-ai"), ClusterQuery(account="@citydesk"),
])
def test_search_agrees_with_sqlite(live, query):
    s, sq = live
    strip = lambda rows: [{k: v for k, v in r.as_json().items() if k != "updated_at"} for r in rows]  # noqa: E731
    assert strip(s.search(query)) == strip(sq.search(query))


def test_stale_revision_is_a_noop_on_a_real_cluster(live):
    s, _ = live
    before = s.cluster("c-fire")
    s.apply_snapshot(snapshots()[0])  # revision 1 again
    s.refresh()
    assert s.cluster("c-fire").revision == before.revision == 3


def test_knn_finds_the_member(live):
    from detectors.hashing import ImageHashes

    s, _ = live
    m = snapshots()[0].members[0]
    found = s.similar_candidates("0" * 64, ImageHashes(phash=m.phash, pdq=m.pdq, pdq_quality=100))
    assert all(isinstance(r, MemberRow) for r in found)
    assert (m.sha256, m.phash, m.pdq) in {(r.sha256, r.phash, r.pdq) for r in found if r.cluster_id == "c-fire"}


def test_platforms_stored_before_lower_casing_fold_on_a_real_cluster():
    """A platform stored as "Bluesky" is found by ``bluesky`` (``term`` with
    ``case_insensitive``) and counted with it (the ``terms`` keys folded),
    and the stored field takes no normalizer in place."""
    from elasticsearch import BadRequestError

    from tests.test_es_audit_platforms import _old_snapshots

    prefix = f"deepwatch-test-{uuid.uuid4().hex[:8]}"
    s = _live_store(prefix)
    try:
        s.apply_snapshots(_old_snapshots())
        s.refresh()
        assert {c.id: c.platforms for c in s.clusters()}["c-fire"] == ["bluesky", "x"]
        assert sorted(c.id for c in s.search(ClusterQuery(platform="bluesky"))) == ["c-fire", "c-flood"]
        with pytest.raises(BadRequestError):
            s.es.indices.put_mapping(index=s.names["alerts"], properties={
                "platforms": {"type": "keyword", "normalizer": "deepwatch_lowercase", "ignore_above": 1024}})
    finally:
        _drop(s, prefix)
