"""Platforms on the Elasticsearch findings store are one platform whatever
their case: events are lower-cased (``ImageEvent``), sightings stored
before were not, and the sightings' ``platform`` is a keyword without a
normalizer (a normalizer cannot be added to an existing field: the fake
refuses it as Elasticsearch does). Filters fold case at query time
(``case_insensitive``); aggregations answer a bucket per spelling, which
every reader folds (``streams.es_requests.platforms_of``).

And what the store reads back and writes when Elasticsearch answers in part
(shards failed, the cluster's default search timeout) or answers a write
after the client stopped waiting."""

from __future__ import annotations

from datetime import timedelta

import pytest

from streams import es_templates as T
from streams.cluster_search import ClusterQuery
from tests.findings_fixture import T0, snapshots
from tests.test_es_store import _store

# what a version before the lower-casing stored for these events
OLD_SPELLING = {"e1": "X", "e3": "Bluesky", "e5": "Mastodon", "e6": "BlueSky"}


def _old_snapshots() -> list:
    """The fixture's history, some events as they were stored before events
    were lower-cased (``model_copy`` runs no validator, as an older version's
    events had none)."""
    out = []
    for snap in snapshots():
        s = snap.new_sighting
        if s is not None and s.event.event_id in OLD_SPELLING:
            ev = s.event.model_copy(update={"platform": OLD_SPELLING[s.event.event_id]})
            snap = snap.model_copy(update={"new_sighting": s.model_copy(update={"event": ev})})
        out.append(snap)
    return out


def _written(snaps: list) -> dict[str, list[tuple[str, str, str]]]:
    """(event id, account, platform as written) per cluster id recorded on the sighting."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for snap in snaps:
        if snap.new_sighting is not None:
            ev = snap.new_sighting.event
            out.setdefault(snap.cluster_id, []).append((ev.event_id, ev.account_id, ev.platform))
    return out


@pytest.fixture
def old_store(fake_es):
    s = _store(fake_es)
    snaps = _old_snapshots()
    s.apply_snapshots(snaps)
    s.refresh()
    stored = fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]
    assert {stored[e]["platform"] for e in OLD_SPELLING} == set(OLD_SPELLING.values())  # stored as written
    yield s, _written(snaps)
    s.close()


def test_cluster_platforms_count_each_platform_once_whatever_its_case(old_store):
    s, written = old_store
    records = {c.id: c for c in s.clusters()}
    # c-flood shows its own sightings and those of c-flood2, merged into it
    own = {"c-fire": ["c-fire"], "c-pope": ["c-pope"], "c-flood": ["c-flood", "c-flood2"]}
    for cid, ids in own.items():
        want = sorted({p.lower() for i in ids for _e, _a, p in written[i]})
        assert records[cid].platforms == want, cid
    assert records["c-fire"].platforms == ["bluesky", "x"]  # not ["Bluesky", "X", "x"]


def test_the_spread_by_platform_does_not_split_one_platform(old_store):
    s, written = old_store
    spread = s.sighting_histogram(["c-fire", "c-flood", "c-flood2"], T0, T0 + timedelta(hours=1), 6)
    want: dict[str, int] = {}
    for cid in ("c-fire", "c-flood", "c-flood2"):
        for _e, _a, p in written[cid]:
            want[p.lower()] = want.get(p.lower(), 0) + 1
    assert {p: sum(counts) for p, counts in spread.items()} == want
    assert set(spread) == {"x", "bluesky"}


def test_account_views_fold_the_platforms_of_old_sightings(old_store):
    s, written = old_store
    by_account = {a: p.lower() for posts in written.values() for _e, a, p in posts}
    aggregates = {a.account_id: a.platforms for a in s.account_aggregates([])}
    assert aggregates == {a: [p] for a, p in by_account.items()}
    windows = {w.account_id: w.platforms for w in s.account_windows(timedelta(days=1), [])}
    assert windows == {a: [p] for a, p in by_account.items()}


@pytest.mark.parametrize("platform", ["bluesky", "BLUESKY", "Bluesky"])
def test_a_platform_filter_finds_old_and_new_spellings(old_store, platform):
    s, written = old_store
    found = sorted(c.id for c in s.search(ClusterQuery(platform=platform)))
    want = sorted(c for c, posts in written.items() if any(p.lower() == "bluesky" for _e, _a, p in posts))
    assert want == ["c-fire", "c-flood"]  # each seen there only as "Bluesky" / "BlueSky", stored before
    assert found == want


def test_a_normalizer_cannot_be_added_to_the_stored_platform_field(fake_es):
    """Why the reads fold instead of the mapping: Elasticsearch refuses a
    normalizer on an existing keyword ("Cannot update parameter
    [normalizer]"), and the fake with it."""
    s = _store(fake_es)
    s.ensure_setup()
    from elasticsearch import BadRequestError

    with pytest.raises(BadRequestError) as e:
        s.es.indices.put_mapping(index=s.names["alerts"], properties={
            "platforms": {"type": "keyword", "normalizer": "deepwatch_lowercase", "ignore_above": 1024}})
    assert "normalizer" in str(e.value)
    assert "normalizer" not in fake_es.mappings(T.concrete("deepwatch-alerts"))["properties"]["platforms"]
    s.close()


# -- answers some shards failed -------------------------------------------------------------------
def test_a_redelivered_batch_is_held_not_written_twice_while_a_shard_is_missing(fake_es):
    """Elasticsearch answers a search some shards failed with 200 and the
    other shards' hits (``_shards.failed``). The duplicate check before a
    sink batch read that as "not stored": a batch redelivered across a
    rollover while the old backing index's shard was unavailable wrote its
    sightings a second time."""
    from streams.es_client import EsError

    s = _store(fake_es)
    snaps = [x for x in snapshots() if x.cluster_id == "c-fire"]
    s.apply_snapshots(snaps)
    s.es.indices.rollover(alias="deepwatch-sightings")
    old = fake_es.stream_backing["deepwatch-sightings"][0]
    fake_es.fail_shards(old)
    with pytest.raises(EsError) as e:
        s.apply_snapshots(snaps)  # the sink's offsets were not committed: the whole batch again
    assert e.value.hold and f"1 of 2 shards failed the search ({old}: no_shard_available_action_exception" in str(e.value)
    assert "\n" not in str(e.value)
    s.apply_snapshots(snaps)  # Sinks retries the held batch: the shard is back
    backing = fake_es.stream_backing["deepwatch-sightings"]
    assert sorted(fake_es.docs[backing[0]]) == ["e1", "e2", "e3"] and fake_es.docs[backing[1]] == {}
    s.close()


def test_the_desk_never_shows_counts_some_shards_left_out(old_store, fake_es):
    """A cluster's sightings, accounts and platforms are counted from the
    sightings: with a backing index's shard missing they were shown smaller,
    unsaid."""
    from streams.es_client import EsError

    s, _written = old_store
    whole = {c.id: (c.sightings, c.accounts, c.platforms) for c in s.clusters()}
    s.es.indices.rollover(alias="deepwatch-sightings")
    fake_es.fail_shards(fake_es.stream_backing["deepwatch-sightings"][0], "es_rejected_execution_exception")
    with pytest.raises(EsError) as e:
        s.clusters()
    assert e.value.hold and "es_rejected_execution_exception" in str(e.value)
    assert {c.id: (c.sightings, c.accounts, c.platforms) for c in s.clusters()} == whole
    assert whole["c-fire"][0] == 3


# -- writes whose answer was lost -----------------------------------------------------------------
def test_an_alert_stored_by_a_request_whose_answer_was_lost_is_still_new(fake_es):
    """Elasticsearch applied the bulk request and answered after the
    client's request timeout: the sink sent it again, the ``create`` answered
    409 and the alert counted as a redelivered one (``add_alert`` False: no
    console line, no ``deepwatch_alerts_total``), though it was this call's."""
    from tests.findings_fixture import alerts

    s = _store(fake_es, request_timeout_s=0.3)
    s.ensure_setup()
    fake_es.stall_answers(1.0)
    alert = alerts()[0]
    assert s.add_alert(alert) is True
    assert len(fake_es.calls("PUT", "/_bulk")) + len(fake_es.calls("POST", "/_bulk")) == 2  # applied, then sent again
    assert list(fake_es.docs[T.concrete("deepwatch-alerts")]) == [alert.alert_id]  # stored once
    assert s.add_alert(alert) is False  # a redelivered alert message: not new
    s.close()


def test_an_answer_the_clusters_default_search_timeout_cut_is_not_used(old_store, fake_es):
    """``search.default_search_timeout`` (a dynamic cluster setting operators
    set to protect a cluster) bounds every search sent without a timeout of
    its own, and answers 200 ``timed_out: true`` with what the shards had
    collected: only the desk's searches with a deadline looked at the flag."""
    from streams.es_client import EsError

    s, _written = old_store
    fake_es.default_search_timeout = "50ms"
    fake_es.time_out_searches("deepwatch-sightings")
    with pytest.raises(EsError) as e:
        s.count_sightings()
    assert e.value.hold and "search.default_search_timeout" in str(e.value)
    assert s.count_sightings() == 7  # the fault passed: answered whole


def test_an_update_naming_a_missing_stored_script_is_answered_as_elasticsearch_does(fake_es):
    """ResourceNotFoundException is RestStatus.NOT_FOUND: the bulk item is
    404 (the fake answered 400), and the sink holds the batch on it rather
    than dead-letter the snapshot (it names the script, not the document)."""
    from streams.es_client import EsError

    s = _store(fake_es)
    s.ensure_setup()
    del fake_es.scripts[T.SCRIPT_ID]
    [(header, body)] = [a for a in s.cluster_actions(snapshots()[0]) if "update" in a[0]]
    item = s.es.bulk(operations=[header, body])["items"][0]["update"]
    assert (item["status"], item["error"]["type"]) == (404, "resource_not_found_exception")
    with pytest.raises(EsError) as e:
        s.apply_snapshots(snapshots()[:1])
    assert e.value.hold and s.dead_letters() == []
    s.close()


def test_a_sighting_stored_before_reads_back_under_its_platform(old_store):
    """The posts the desk lists for a cluster name the platform its
    platforms and spread name ("bluesky", not "Bluesky")."""
    s, written = old_store
    got = {r.event_id: r.platform for r in s.cluster_sightings("c-fire")}
    assert got == {e: p.lower() for e, _a, p in written["c-fire"]}
    assert {r.event_id: r.platform for r in s.sightings()} == {
        e: p.lower() for posts in written.values() for e, _a, p in posts}
