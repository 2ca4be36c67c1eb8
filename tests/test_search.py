"""Analyst search: the same ClusterQuery answers on every findings backend.

Each test runs once per store: the embedded SQLite file (FTS5) and the
Elasticsearch store against the loopback fake in tests/fake_es.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from streams.findings import ClusterQuery, ClusterRecord
from tests.findings_fixture import T0, fill


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    if request.param == "sqlite":
        from streams.store import SqliteFindingsStore

        s = SqliteFindingsStore(tmp_path / "findings.sqlite")
        fill(s)
        yield s
        s.close()
    else:
        es = request.getfixturevalue("fake_es")
        from streams.es_store import EsFindingsStore

        s = EsFindingsStore.from_url(es.url)
        fill(s)
        s.flush()
        yield s
        s.close()


def ids(rows: list[ClusterRecord]) -> list[str]:
    return [r.id for r in rows]


def test_clusters_resolve_merges_and_ignore_stale_revisions(store):
    rows = {c.id: c for c in store.clusters()}
    assert set(rows) == {"c-fire", "c-pope", "c-flood"}
    flood = rows["c-flood"]
    assert flood.sightings == 2 and flood.accounts == 2 and flood.platforms == ["bluesky", "x"]
    assert {m.sha256[0] for m in flood.members} == {"c", "d"}
    assert flood.merged_from == ["c-flood2"]
    fire = rows["c-fire"]
    assert fire.revision == 3 and fire.stream_sightings == 3  # the stale revision 1 changed nothing
    assert fire.sightings == 3 and fire.accounts == 3
    assert fire.first_seen == T0.isoformat() and fire.last_seen == (T0 + timedelta(minutes=2)).isoformat()
    assert fire.evidence[0].detail == "c-fire evidence"
    merged = {c.id: c for c in store.clusters(include_merged=True)}
    assert merged["c-flood2"].merged_into == "c-flood" and merged["c-flood2"].members == []


def test_full_text_over_post_texts_and_hashtags(store):
    assert ids(store.search(ClusterQuery(text="harbour fire"))) == ["c-fire"]
    assert ids(store.search(ClusterQuery(text="puffer"))) == ["c-pope"]
    assert ids(store.search(ClusterQuery(text="breaking"))) == ["c-fire"]  # a hashtag, case folded
    # a merged-away cluster's sightings count for its survivor
    assert ids(store.search(ClusterQuery(text="subway"))) == ["c-flood"]
    assert store.search(ClusterQuery(text="volcano")) == []
    # words are ANDed; a quoted phrase must appear as such
    assert store.search(ClusterQuery(text="harbour pope")) == []
    assert ids(store.search(ClusterQuery(text='"white puffer"'))) == ["c-pope"]
    assert store.search(ClusterQuery(text='"puffer white"')) == []


def test_sighting_conditions_hold_for_one_sighting(store):
    assert ids(store.search(ClusterQuery(platform="mastodon"))) == ["c-pope"]
    assert ids(store.search(ClusterQuery(account="@citydesk"))) == ["c-fire"]
    assert ids(store.search(ClusterQuery(account="u6"))) == ["c-flood"]
    assert ids(store.search(ClusterQuery(hashtag="#Pope"))) == ["c-pope"]
    assert ids(store.search(ClusterQuery(hashtag="storm", sort="sightings"))) == ["c-flood"]
    # "pope" is posted on mastodon and on x, but "puffer" only on x
    assert ids(store.search(ClusterQuery(text="puffer", platform="mastodon"))) == []
    assert ids(store.search(ClusterQuery(text="drip", platform="mastodon"))) == ["c-pope"]
    window = ClusterQuery(since=T0 + timedelta(minutes=4), until=T0 + timedelta(minutes=31), sort="last_seen")
    assert ids(store.search(window)) == ["c-flood", "c-pope"]


def test_cluster_conditions_and_sort_keys(store):
    assert ids(store.search(ClusterQuery(verdict="likely-ai"))) == ["c-fire"]
    assert ids(store.search(ClusterQuery(min_score=0.5, sort="score"))) == ["c-fire", "c-pope"]
    assert ids(store.search(ClusterQuery(sort="score"))) == ["c-fire", "c-pope", "c-flood"]
    assert ids(store.search(ClusterQuery(sort="velocity"))) == ["c-fire", "c-flood", "c-pope"]
    assert ids(store.search(ClusterQuery(sort="sightings"))) == ["c-fire", "c-flood", "c-pope"]
    assert ids(store.search(ClusterQuery(sort="last_seen"))) == ["c-flood", "c-pope", "c-fire"]
    assert ids(store.search(ClusterQuery(sort="score", limit=1))) == ["c-fire"]
    assert ids(store.search(ClusterQuery())) == ["c-fire", "c-flood", "c-pope"]  # default: velocity


def test_relevance_ranks_the_better_match_first(store):
    # "storm" is in both flood posts (one merged away): one surviving cluster
    assert ids(store.search(ClusterQuery(text="storm"))) == ["c-flood"]
    # "the" is everywhere: every cluster matches; BM25 orders differ between
    # engines, so only the set is the contract here
    assert set(ids(store.search(ClusterQuery(text="the")))) == {"c-fire", "c-pope", "c-flood"}
    # "fire" is in the text AND a hashtag of e1: the fire cluster outranks none
    assert ids(store.search(ClusterQuery(text="fire")))[0] == "c-fire"


def test_search_returns_the_clusters_json_shape(store):
    [fire] = store.search(ClusterQuery(text="harbour"))
    [same] = [c for c in store.clusters() if c.id == "c-fire"]
    a, b = fire.as_json(), same.as_json()
    a.pop("updated_at"), b.pop("updated_at")
    assert a == b
    assert {"id", "fake_score", "verdict", "evidence", "sightings", "accounts", "first_seen", "last_seen", "members",
            "velocity", "platforms", "merged_from", "merged_into", "stream_sightings", "revision"} <= a.keys()


def test_alerts_and_dead_letters_read_back_typed(store):
    [alert] = store.alerts()
    assert alert.alert_id == "c-fire:1" and alert["cluster_id"] == "c-fire" and alert.velocity.sightings_5m == 9
    [dl] = store.dead_letters()
    assert (dl.stage, dl.reason, dl.source.offset) == ("fetch", "fetch_blocked", 7)
    assert store.processed_offsets("deepwatch.events") == {(0, i) for i in range(8)}
