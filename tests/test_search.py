"""Analyst search: the same ClusterQuery answers on every findings backend.

Each test runs once per store: the embedded SQLite file (FTS5) and the
Elasticsearch store against the loopback fake in tests/fake_es.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from streams.cluster_search import ClusterQuery
from streams.findings import ClusterRecord
from tests.findings_fixture import T0, fill, filled_store


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    yield from filled_store(request, tmp_path, request.param)


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
    # c-pope and c-flood (its merged cluster's post counted) have 2 sightings each: the higher score first
    assert ids(store.search(ClusterQuery(sort="sightings"))) == ["c-fire", "c-pope", "c-flood"]
    assert ids(store.search(ClusterQuery(sort="last_seen"))) == ["c-flood", "c-pope", "c-fire"]
    assert ids(store.search(ClusterQuery(sort="score", limit=1))) == ["c-fire"]
    assert ids(store.search(ClusterQuery())) == ["c-fire", "c-flood", "c-pope"]  # default: velocity
    # the same order over any row, through its own field reader (the desk's documents)
    from streams.cluster_search import sort_key

    records = store.search(ClusterQuery())
    docs = [dict(r.as_json(), **{k: getattr(r.velocity, k) for k in ("sightings_5m", "sightings_1h")})
            for r in records]
    for sort in ("score", "velocity", "sightings", "last_seen"):
        assert ([d["id"] for d in sorted(docs, key=sort_key(sort, dict.get))]
                == [r.id for r in sorted(records, key=sort_key(sort))])
    # last_seen: instants (naive = UTC), none last
    rows = [{"id": "a", "last_seen": None}, {"id": "b", "last_seen": "2026-01-01T10:00:00"},
            {"id": "c", "last_seen": "2026-01-01T10:30:00+01:00"}]
    assert [r["id"] for r in sorted(rows, key=sort_key("last_seen", dict.get))] == ["b", "c", "a"]


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
    assert alert.alert_id == "c-fire:1" and alert.cluster_id == "c-fire" and alert.velocity.sightings_5m == 9
    [dl] = store.dead_letters()
    assert (dl.stage, dl.reason, dl.source.offset) == ("fetch", "fetch_blocked", 7)
    assert store.processed_offsets("deepwatch.events") == {(0, i) for i in range(8)}


def _cli(*args: str, env: dict[str, str] | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


def test_cli_search_contract_and_mistakes(tmp_path):
    import json

    from streams.store import open_store

    s = open_store(tmp_path)
    fill(s)
    s.close()
    d = str(tmp_path)
    r = _cli("search", "harbour", "--data-dir", d, "--format", "json")
    assert r.returncode == 0, r.stderr
    [hit] = json.loads(r.stdout)
    everything = json.loads(_cli("clusters", "--data-dir", d, "--format", "json").stdout)
    assert hit == next(c for c in everything if c["id"] == hit["id"])  # the clusters JSON shape, exactly
    r = _cli("search", "--data-dir", d, "--since", "2026-11-20T10:04:00Z", "--until", "2026-11-20T10:31", "--sort",
             "last_seen", "--format", "json")
    assert [c["id"] for c in json.loads(r.stdout)] == ["c-flood", "c-pope"]  # naive --until read as UTC
    assert "c-fire" in _cli("search", "fire", "--data-dir", d, "--format", "table").stdout
    for args, needle in ((("--verdict", "fake"), "likely-ai, inconclusive or no-evidence"),
                         (("--sort", "newest"), "velocity, score, last_seen, sightings"),
                         (("--since", "yesterday"), "ISO 8601"), (("--min-score", "7"), "between 0 and 1"),
                         (("--limit", "0"), "between 1 and 10000"), (("--store", "mysql://x"), "es://HOST:9200")):
        r = _cli("search", "--data-dir", d, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert needle in _flat(r.stderr), (args, r.stderr)
    r = _cli("search", "x", "--data-dir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no findings at" in _flat(r.stderr)


def test_cli_search_refuses_a_name_filter_with_no_name_in_it(tmp_path):
    """"#" or "@" alone normalised to no condition: `search --hashtag '#'`
    listed every cluster, and beside --platform answered that filter alone,
    exit 0 either way. Refused as the desk's API refuses it, naming the option."""
    import json

    from streams.store import open_store

    s = open_store(tmp_path)
    fill(s)
    s.close()
    d = str(tmp_path)
    for args, option, fix in ((("--hashtag", "#"), "--hashtag", "give a tag"),
                              (("--account", "@", "--sort", "score"), "--account", "give an account id or @handle"),
                              (("--hashtag", " # ", "--platform", "bluesky"), "--hashtag", "give a tag"),
                              (("storm", "--account", "@"), "--account", "give an account id or @handle")):
        r = _cli("search", "--data-dir", d, "--format", "json", *args)
        assert r.returncode == 2 and r.stdout == "", (args, r.returncode, r.stdout[:300])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert option in lines[0] and f"has no name in it: {fix}" in lines[0], (args, lines[0])
    # a name is still a condition, with or without its sign
    for args in (("--hashtag", "#Storm"), ("--hashtag", "storm"), ("--account", "@weather")):
        r = _cli("search", "--data-dir", d, "--format", "json", *args)
        assert r.returncode == 0, (args, r.stderr)
        assert [c["id"] for c in json.loads(r.stdout)] == ["c-flood"], args


def _flat(text: str) -> str:
    """rich's error panel, unwrapped: box drawing gone, whitespace collapsed."""
    import re

    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_cluster_sightings_newest_first_merges_included(store):
    flood = store.cluster_sightings("c-flood")
    assert [s.event_id for s in flood] == ["e7", "e6"]  # e7 was recorded under c-flood2, merged in
    assert flood[0].cluster_id == "c-flood2" and flood[0].hashtags == ["storm", "subway"]
    assert flood[1].account_handle == "@weather" and flood[1].text.startswith("Flooded streets")
    assert flood[1].post_url == "https://bluesky.example/e6" and flood[1].lang == "en"
    assert [s.event_id for s in store.cluster_sightings("c-fire", limit=2)] == ["e3", "e2"]
    assert store.cluster_sightings("nope") == []


def test_sightings_by_clusters_and_account_as_recorded(store):
    """The many-cluster / per-account read the desk aggregates over: cluster
    ids as recorded (no merge resolution), oldest first unless asked."""
    assert [s.event_id for s in store.sightings()] == ["e1", "e2", "e3", "e4", "e5", "e6", "e7"]
    got = store.sightings(cluster_ids=["c-flood", "c-flood2", "c-pope"])
    assert [(s.event_id, s.cluster_id) for s in got] == [
        ("e4", "c-pope"), ("e5", "c-pope"), ("e6", "c-flood"), ("e7", "c-flood2")]
    assert store.sightings(cluster_ids=["c-flood"])[0].account_handle == "@weather"
    assert [s.event_id for s in store.sightings(account_id="u2")] == ["e2"]
    assert store.sightings(account_id="u2", cluster_ids=["c-pope"]) == []
    assert [s.event_id for s in store.sightings(cluster_ids=["c-fire"], newest_first=True, limit=2)] == ["e3", "e2"]
    assert store.sightings(cluster_ids=[]) == [] and store.sightings(account_id="nobody") == []
    assert store.sightings(cluster_ids=["c-fire"])[0] == store.cluster_sightings("c-fire")[-1]  # same record
    # member hashes under the surviving cluster (the desk's retroactive verdict matching)
    members = {(m.cluster_id, m.sha256) for m in store.iter_members()}
    assert members == {("c-fire", "a" * 64), ("c-pope", "b" * 64), ("c-flood", "c" * 64), ("c-flood", "d" * 64)}


def test_filters_that_normalise_to_nothing_are_no_filter(store):
    # "@", "#" and punctuation-only text became "" and matched every cluster
    assert ClusterQuery(account="@", hashtag="#", text="!!! ...") == ClusterQuery()
    assert not ClusterQuery(sort="score", limit=5).filtered
    assert ClusterQuery(min_score=0.0).filtered and ClusterQuery(account="@ana").account == "ana"


# -- a search has a time limit ------------------------------------------------------------------------
def test_a_sqlite_search_past_its_time_limit_is_stopped_not_answered_in_part(tmp_path):
    """A scan over a big store (every sighting's hashtags, or account, handle
    and URL) is interrupted once ``timeout_s`` has passed: SearchTimeout, the
    thread free again at once; ordinary searches answer under the same limit,
    and the store stays usable."""
    import time

    from streams.cluster_search import SearchTimeout
    from streams.store import SqliteFindingsStore
    from tests.desk_support import bulk_sightings

    path = tmp_path / "findings.sqlite"
    store = SqliteFindingsStore(path)
    fill(store)
    bulk_sightings(path, 150_000)
    try:
        for search in (lambda **kw: store.search(ClusterQuery(hashtag="nothing-like-it"), **kw),
                       lambda **kw: store.match_sightings("nobody-at-all", **kw),
                       lambda **kw: store.match_sightings("ärger", **kw)):  # a Python function per row
            began = time.monotonic()
            assert search() == []
            unbounded = time.monotonic() - began
            assert unbounded > 0.02, "the store is too small for the limit to be tested"
            began = time.monotonic()
            with pytest.raises(SearchTimeout) as e:
                search(timeout_s=0.005)
            assert str(e.value) == "search took longer than 0.005 s" and e.value.timeout_s == 0.005
            assert time.monotonic() - began < unbounded / 2  # stopped, not run to the end
        assert ids(store.search(ClusterQuery(text="harbour fire"), timeout_s=5)) == ["c-fire"]
        bluesky = ClusterQuery(platform="bluesky", sort="score")
        assert ids(store.search(bluesky, timeout_s=5)) == ids(store.search(bluesky)) == ["c-fire", "c-flood"]
        assert store.match_sightings("@weather", timeout_s=5) == ["c-flood"]
        assert len(store.sightings(cluster_ids=["c-bulk"], limit=3)) == 3  # the shared connection is unharmed
    finally:
        store.close()


def test_an_es_search_sends_its_time_limit_and_refuses_a_timed_out_answer(fake_es):
    """Each request of a bounded search carries the time left as ``timeout``;
    an answer Elasticsearch marks ``timed_out`` (partial, not saying which
    part) is a SearchTimeout, never results."""
    import re

    from streams.es_store import EsFindingsStore
    from streams.cluster_search import SearchTimeout

    store = EsFindingsStore.from_url(fake_es.url)
    fill(store)
    store.flush()
    try:
        fake_es.requests.clear()
        assert ids(store.search(ClusterQuery(text="harbour fire"), timeout_s=5)) == ["c-fire"]
        sent = [r.body["timeout"] for r in fake_es.calls("POST", "/_search") if "timeout" in (r.body or {})]
        assert sent and all(re.fullmatch(r"\d+ms", t) and 0 < int(t[:-2]) <= 5000 for t in sent)
        fake_es.time_out_searches("sightings")
        with pytest.raises(SearchTimeout) as e:
            store.search(ClusterQuery(text="harbour fire"), timeout_s=5)
        assert e.value.timeout_s == 5
        fake_es.time_out_searches("clusters")
        with pytest.raises(SearchTimeout):
            store.search(ClusterQuery(verdict="likely-ai"), timeout_s=5)
        fake_es.time_out_searches("sightings")
        with pytest.raises(SearchTimeout):
            store.match_sightings("@weather", timeout_s=5)
        # without a limit nothing is sent, and nothing is timed out
        fake_es.requests.clear()
        fake_es.time_out_searches("sightings")
        assert ids(store.search(ClusterQuery(text="harbour fire"))) == ["c-fire"]
        assert not any("timeout" in (r.body or {}) for r in fake_es.calls("POST", "/_search"))
        fake_es.search_timeouts.clear()
        # a cluster slow to answer at all: the request itself gives up at the limit, unretried
        import time

        fake_es.requests.clear()
        fake_es.stall_searches(3.0, times=4)
        began = time.monotonic()
        with pytest.raises(SearchTimeout):
            store.search(ClusterQuery(text="harbour fire"), timeout_s=0.5)
        assert time.monotonic() - began < 2.0
        assert len(fake_es.calls("POST", "/_search")) == 1
        fake_es.search_stalls.clear()
    finally:
        store.close()


def test_cli_search_says_when_it_ran_out_of_time(tmp_path):
    from streams.store import open_store
    from tests.desk_support import bulk_sightings

    s = open_store(tmp_path)
    fill(s)
    s.close()
    bulk_sightings(tmp_path / "findings.sqlite", 150_000)
    d = str(tmp_path)
    r = _cli("search", "--data-dir", d, "--hashtag", "nothing-like-it", "--timeout", "0.01")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "search took longer than 0.01 s and was stopped; narrow it with --since/--until/--platform" in _flat(r.stderr)
    r = _cli("search", "harbour", "--data-dir", d, "--format", "json", "--timeout", "30")
    assert r.returncode == 0 and [c["id"] for c in __import__("json").loads(r.stdout)] == ["c-fire"]
    r = _cli("search", "harbour", "--data-dir", d, "--timeout", "0")
    assert r.returncode == 2 and "more than 0" in _flat(r.stderr)
    # the desk's limit is not the command's: without --timeout it runs to the end
    r = _cli("search", "--data-dir", d, "--hashtag", "nothing-like-it", "--format", "json",
             env={"DEEPWATCH_FINDINGS__SEARCH_TIMEOUT_S": "0.001"})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def _post_again(store, cid: str, post: tuple, **update) -> None:
    """One more sighting (or score) for ``cid``: its latest snapshot a revision on."""
    from tests.findings_fixture import _sighting, snapshots

    last = [s for s in snapshots() if s.cluster_id == cid][-1]
    new = _sighting(len(store.sightings()), post) if post else None
    store.apply_snapshot(last.model_copy(update={"revision": last.revision + 1, "new_sighting": new, **update}))
    if hasattr(store, "flush"):
        store.flush()


def test_a_date_until_means_through_that_day_to_the_millisecond(store):
    from datetime import datetime

    from streams.cluster_search import through_day

    # 2026-11-20T23:59:59.5Z and 2026-11-21T00:00:00Z (T0 is 10:00 that day): SQLite's julianday rounded
    # the old bound (the day's last microsecond) up to midnight, and the next day's first post matched
    _post_again(store, "c-pope", ("e20", "c-pope", "b", "u20", None, "x", 14 * 60 - 0.5 / 60, "night watch", []))
    _post_again(store, "c-flood", ("e21", "c-flood", "c", "u21", None, "x", 14 * 60, "night watch", []))
    until = datetime.fromisoformat(through_day("2026-11-20"))
    assert ids(store.search(ClusterQuery(text="night", until=until))) == ["c-pope"]
    assert set(ids(store.search(ClusterQuery(text="night")))) == {"c-pope", "c-flood"}


def test_an_until_at_the_last_microsecond_of_time_matches_on_every_store(store):
    # SQLite's julianday rounded 9999-12-31T23:59:59.999999 up past year 9999, and nothing matched
    # (the CLI and the desk alike): a query's times are kept to the millisecond both stores compare at
    from datetime import datetime, timezone

    end = datetime(9999, 12, 31, 23, 59, 59, 999_999, timezone.utc)
    assert ClusterQuery(until=end).until.microsecond == 999_000
    assert set(ids(store.search(ClusterQuery(until=end)))) == set(ids(store.search(ClusterQuery(since=T0))))
    assert ids(store.search(ClusterQuery(until=end)))


def test_min_score_compares_with_the_score_as_shown(store):
    # stored 0.999996, shown 1.0: `--min-score 1` left it out
    _post_again(store, "c-fire", None, fake_score=0.999996)
    [fire] = [c for c in store.clusters() if c.id == "c-fire"]
    assert fire.fake_score == 1.0
    assert ids(store.search(ClusterQuery(min_score=1.0))) == ["c-fire"]
    assert ids(store.search(ClusterQuery(min_score=0.62, sort="score"))) == ["c-fire", "c-pope"]
    assert ids(store.search(ClusterQuery(min_score=0.6201, sort="score"))) == ["c-fire"]


def test_a_hashtag_with_a_space_is_one_tag_on_every_store(store):
    # the schema lets an event carry "new york": SQLite's space-separated list read it back as "new" and "york"
    _post_again(store, "c-pope", ("e22", "c-pope", "b", "u22", None, "x", 50, "crossing", ["New York", "#Pope"]))
    assert ids(store.search(ClusterQuery(hashtag="new york"))) == ids(store.search(ClusterQuery(hashtag="#NewYork"))) \
        == ["c-pope"]
    assert store.search(ClusterQuery(hashtag="new")) == store.search(ClusterQuery(hashtag="york")) == []
    [post] = [s for s in store.sightings(cluster_ids=["c-pope"]) if s.event_id == "e22"]
    assert post.hashtags == ["newyork", "pope"]


def test_a_hashtag_with_control_characters_is_stored_without_them_and_found(store):
    # NUL, ESC and C1 survived normalising: the desk and the CLI refuse them in a query, so the tag could
    # never be searched
    _post_again(store, "c-pope", ("e25", "c-pope", "b", "u25", None, "x", 53, "x", ["Ro\x1bme\x00", "#\x00#vat\x85ican"]))
    [post] = [s for s in store.sightings(cluster_ids=["c-pope"]) if s.event_id == "e25"]
    assert post.hashtags == ["rome", "vatican"]
    assert ids(store.search(ClusterQuery(hashtag="#Rome"))) == ids(store.search(ClusterQuery(hashtag="vatican"))) \
        == ["c-pope"]


def test_words_with_a_dotted_capital_or_a_combining_accent_are_found(store):
    # "İ" lowercases to "i" + U+0307, and some keyboards type "café" as "cafe" + U+0301: the query cut either
    # word in two, and neither was ever found
    _post_again(store, "c-pope", ("e23", "c-pope", "b", "u23", None, "x", 51, "İstanbul köprüsü çöktü", []))
    _post_again(store, "c-flood", ("e24", "c-flood", "c", "u24", None, "x", 52, "le cafe\u0301 est inondé", []))
    assert ids(store.search(ClusterQuery(text="İstanbul"))) == ["c-pope"]
    assert ids(store.search(ClusterQuery(text='"İstanbul köprüsü"'))) == ["c-pope"]
    assert ids(store.search(ClusterQuery(text="cafe\u0301"))) == ["c-flood"]


def test_score_floor_and_query_words_at_their_edges():
    import math

    from streams.cluster_search import text_terms
    from streams.findings import score_floor, shown_score

    # a stored score is kept exactly when it is shown as min_score or more (min_score with more decimals
    # than shown: as the next shown value), away from the exact half-way points
    for m in (0.0, 0.5, 0.62345, 0.6234, 1.0):
        for x in (0.62341, 0.6234, 0.62349, 0.62351, 0.62331, 0.49996, 0.99996, 1.0):
            shown_min = math.ceil(round(m * 1e4, 6)) / 1e4
            assert (x >= score_floor(m)) == (shown_score(x) >= shown_min - 1e-12), (m, x)
    assert not 0.62341 >= score_floor(0.62345)  # shown 0.6234, under 0.62345
    # a stray combining mark or "_" is no word: ANDed as an empty phrase it matched nothing
    assert text_terms("flood \u0301") == text_terms("flood _") == ["flood"]
    assert text_terms("\u0301") == []
