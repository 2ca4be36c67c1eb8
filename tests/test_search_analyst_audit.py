"""Search as an analyst uses it: a store written before platforms were
lower-cased, a phrase that must not run from one hashtag into the next,
a sort given alone, the banks page's desk-verdict list, times with offsets,
odd account and hashtag input, paging while findings arrive, and the same
clusters from `deepwatch search`, `/search` and `/api/search`.

Store tests run on both findings stores (SQLite, and Elasticsearch on the
loopback fake in tests/fake_es.py) where both must answer alike."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import timedelta, timezone
from pathlib import Path

import pytest

from streams.cluster_search import ClusterQuery, SearchCursor, search_digest
from streams.records import ClusterSnapshot, Engagement, Velocity
from tests.findings_fixture import T0, _member, _sighting, fill, filled_store, stored_findings
from tests.test_search import _cli

# (event id, cluster, picture, account, handle, platform, minute, text, hashtags)
TAGGED = [
    ("t1", "c-tags", "a", "u1", "@Zoë@social.example", "x", 0, "look at this", ["trump", "arrested"]),
    ("t2", "c-text", "b", "u2", None, "x", 1, "trump arrested at his home", ["Re\u0301sume\u0301"]),
    ("t3", "c-covid", "c", "u3", None, "x", 2, "a chart", ["Covid-19", "Café"]),
]


def _snap(i: int, post: tuple) -> ClusterSnapshot:
    s = _sighting(i, post)
    when = s.event.posted_at
    return ClusterSnapshot(
        cluster_id=post[1], revision=1, fake_score=0.5, verdict="inconclusive", evidence=[], members=[_member(s)],
        sightings=1, accounts=1, platforms=[s.event.platform], engagement=Engagement(likes=0),
        velocity=Velocity(sightings_5m=1, sightings_1h=1), first_seen=when, last_seen=when, new_sighting=s)


def _fill_tagged(store) -> None:
    store.apply_snapshots([_snap(i, p) for i, p in enumerate(TAGGED)])


@pytest.fixture(params=["sqlite", "es"])
def tagged(request, tmp_path):
    yield from filled_store(request, tmp_path, request.param, _fill_tagged)


def ids(rows) -> list[str]:
    return [r.id for r in rows]


# ------------------------------------------------------------- a phrase within one hashtag
def test_a_quoted_phrase_does_not_run_from_one_hashtag_into_the_next(tagged):
    # SQLite indexed a post's hashtags as one run of text ("trump arrested"), so the phrase matched
    # #trump #arrested; Elasticsearch keeps a position gap between array values (100) and did not
    assert ids(tagged.search(ClusterQuery(text='"trump arrested"'))) == ["c-text"]
    assert ids(tagged.search(ClusterQuery(text="trump arrested", sort="score"))) == ["c-tags", "c-text"]
    assert sorted(ids(tagged.search(ClusterQuery(text='"arrested"')))) == ["c-tags", "c-text"]
    # within one tag a phrase still holds: "covid-19" is the words covid, 19
    assert ids(tagged.search(ClusterQuery(text='"covid 19"'))) == ["c-covid"]
    assert ids(tagged.search(ClusterQuery(hashtag="#COVID-19"))) == ["c-covid"]


# ------------------------------------------------------------- odd account and hashtag input
def test_accounts_and_hashtags_match_in_any_case_and_unicode_form(tagged):
    # a handle or tag typed (or pasted) decomposed, "e" + U+0308, found nothing: stored and searched
    # as given, the composed "ë" of the post is another string
    for given in ("@Zoë@social.example", "zoë@social.example", "ZOË@SOCIAL.EXAMPLE", "@Zoe\u0308@social.example"):
        assert ids(tagged.search(ClusterQuery(account=given))) == ["c-tags"], given
    assert tagged.search(ClusterQuery(account="zoë")) == []  # the handle is the whole @name@instance
    for given in ("#Café", "#CAFÉ", "cafe\u0301", "#CAFE\u0301"):
        assert ids(tagged.search(ClusterQuery(hashtag=given))) == ["c-covid"], given
    # an event's tag posted decomposed is stored composed: the tag typed composed finds it
    assert ids(tagged.search(ClusterQuery(hashtag="#résumé"))) == ["c-text"]
    assert tagged.search(ClusterQuery(hashtag="#caf")) == []  # a whole tag, not a prefix


ACCENTED = [("t9", "c-accent", "d", "u9", "@Zoe\u0308bot@social.example", "x", 3, "Zoe\u0308 at the scene", [])]


@pytest.fixture(params=["sqlite", "es"])
def accented(request, tmp_path):
    yield from filled_store(request, tmp_path, request.param,
                            lambda store: store.apply_snapshots([_snap(i, p) for i, p in enumerate(ACCENTED)]))


def test_a_post_written_with_combining_accents_is_found_as_people_type_it(accented):
    # text and handle arrive with "e" + U+0308 (some keyboards, macOS file names): kept so, a search
    # typed composed ("Zoë") did not match them on Elasticsearch, and the account filter on neither
    assert ids(accented.search(ClusterQuery(text="Zoë"))) == ["c-accent"]
    assert ids(accented.search(ClusterQuery(text='"zoë at the scene"'))) == ["c-accent"]
    assert ids(accented.search(ClusterQuery(account="@zoëbot@social.example"))) == ["c-accent"]
    assert _sighting(0, ACCENTED[0]).event.text == "Zoë at the scene"  # composed where the event is read


# ------------------------------------------------------------- times: ends, offsets, Z
@pytest.fixture(params=["sqlite", "es"])
def filled(request, tmp_path):
    yield from filled_store(request, tmp_path, request.param)


def test_a_time_range_holds_both_ends_whatever_the_offset_it_is_written_in(filled):
    # the fixture's posts: e1 at T0 (10:00Z) ... e7 at T0+40 min; c-fire's at 10:00, 10:01, 10:02
    at = T0 + timedelta(minutes=2)
    for since in (at, at.replace(tzinfo=None), at.astimezone(timezone(timedelta(hours=5, minutes=30))),
                  "2026-11-20T10:02:00Z", "2026-11-20T15:32:00+05:30", "2026-11-20T05:02:00-05:00"):
        q = ClusterQuery(since=since, until=since, sort="score")
        assert ids(filled.search(q)) == ["c-fire"], since  # both ends inclusive: the post at 10:02 exactly
    # a millisecond either side leaves it out
    ms = timedelta(milliseconds=1)
    assert filled.search(ClusterQuery(since=at + ms, until=T0 + timedelta(minutes=4))) == []
    assert ids(filled.search(ClusterQuery(since=T0 + timedelta(minutes=1, seconds=59), until=at - ms))) == []
    # one instant written three ways is one search (one digest: a cursor of one is a cursor of all)
    qs = [ClusterQuery(since=s, sort="score") for s in ("2026-11-20T10:02:00", "2026-11-20T10:02:00Z",
                                                          "2026-11-20T11:02:00+01:00")]
    assert len({search_digest(q) for q in qs}) == 1 and len({tuple(ids(filled.search(q))) for q in qs}) == 1
    # times past the ends of the calendar in UTC are the calendar's ends, not an error
    assert ClusterQuery(until="9999-12-31T23:00:00-05:00").until.year == 9999
    assert ClusterQuery(since="0001-01-01T01:00:00+05:00").since.year == 1


# ------------------------------------------------------------- paging while findings arrive
@pytest.fixture(params=["sqlite", "es"])
def paged(request, tmp_path):
    from tests.test_search_paging import _fill

    yield from filled_store(request, tmp_path, request.param, _fill)


@pytest.mark.parametrize("sort", ["score", "last_seen", "velocity", "sightings"])
def test_pages_keep_every_cluster_once_while_new_clusters_arrive(paged, sort):
    # new clusters land on both sides of a page boundary between pages (scores above and below, times
    # before and after): every cluster of the first answer is still listed once, none twice
    from tests.test_search_paging import _cluster

    q = ClusterQuery(sort=sort)
    before = ids(paged.search(q))
    seen: list[str] = []
    after, n = None, 0
    while True:
        page = paged.search(q.model_copy(update={"limit": 25}), after=after)
        seen += ids(page)
        if len(page) < 25:
            break
        # arrivals: ids not in the fixture, values spread over the whole order
        new = []
        for k in range(4):
            snap = _cluster(n * 4 + k)
            new.append(snap.model_copy(update={"cluster_id": f"new{n}{k}", "revision": 1, "new_sighting": None,
                                               "members": [], "fake_score": (0.05, 0.95, 0.5, 0.7)[k]}))
        n += 1
        paged.apply_snapshots(new)
        if hasattr(paged, "flush"):
            paged.flush()
        after = SearchCursor.decode(page.cursor(), q)
    assert len(seen) == len(set(seen)), "a cluster listed twice"
    assert set(before) <= set(seen), f"skipped: {sorted(set(before) - set(seen))}"
    # the first answer's clusters keep their order; arrivals come where their values put them
    assert [cid for cid in seen if cid in set(before)] == before


# ------------------------------------------------------------- the same clusters on every route, one cursor
def test_a_cursor_of_deepwatch_search_continues_on_the_api_and_back(many, env):
    # `deepwatch search --since 10:01` made its time UTC-aware and the desk kept it naive: two digests,
    # so the desk refused the CLI's cursor as "for another search" (and the other way round)
    from tests.test_desk_api import client, make_settings

    data, url = many
    store_args = ["--store", url] if url else []
    since = "2026-11-20T10:01:00"
    r = _cli("search", "--data-dir", str(data), *store_args, "--since", since, "--sort", "score", "--limit", "30",
             "--format", "json")
    assert r.returncode == 0, r.stderr
    cli_first = [d["id"] for d in json.loads(r.stdout)]
    cursor = re.search(r"next page: --cursor (\S+)", r.stderr).group(1)
    with client(make_settings(data, url)) as c:
        api = c.get("/api/search", params={"since": since, "sort": "score", "limit": 30})
        assert api.status_code == 200 and [d["id"] for d in api.json()] == cli_first
        assert api.headers["x-next-cursor"] == cursor
        nxt = c.get("/api/search", params={"since": "2026-11-20T11:01:00+01:00", "sort": "score", "limit": 30,
                                           "cursor": cursor})
        assert nxt.status_code == 200, nxt.text
        api_second = [d["id"] for d in nxt.json()]
        page = c.get("/search", params={"since": "2026-11-20T10:01:00Z", "sort": "score", "limit": 30,
                                        "cursor": cursor})
        assert page.status_code == 200 and _page_ids(page.text) == api_second
    r = _cli("search", "--data-dir", str(data), *store_args, "--since", "2026-11-20T10:01:00Z", "--sort", "score",
             "--limit", "30", "--format", "json", "--cursor", cursor)
    assert r.returncode == 0, r.stderr
    assert [d["id"] for d in json.loads(r.stdout)] == api_second and not set(api_second) & set(cli_first)


# ------------------------------------------------------------- a store written before
def _make_old(path: Path) -> None:
    """Rewrite a store of this deepwatch as one of schema 2 left it: platforms
    as posts gave them ("Bluesky"), and the full-text index of that schema
    (external content over ``sightings``: hashtags as one run of words)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE sightings SET platform = upper(substr(platform, 1, 1)) || substr(platform, 2) "
               "WHERE event_id IN ('e3', 'e5', 't1')")
    db.execute("DROP TABLE sightings_fts")
    db.execute("CREATE VIRTUAL TABLE sightings_fts USING fts5(text, hashtags, content='sightings', "
               "content_rowid='rowid', tokenize='unicode61 remove_diacritics 0')")
    db.execute("INSERT INTO sightings_fts(sightings_fts) VALUES('rebuild')")
    db.execute("PRAGMA user_version=2")
    db.close()


def test_text_and_handles_stored_decomposed_before_are_found_by_composed_queries(tmp_path):
    # Events' text and handles are composed (NFC) where they are read now, and so is every query: a
    # post stored decomposed by an earlier version ("cafe" + U+0301) was found by neither form
    from streams.store import SqliteFindingsStore

    path = tmp_path / "findings.sqlite"
    s = SqliteFindingsStore(path)
    fill(s)
    s.close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("UPDATE sightings SET text = 'le cafe\u0301 est inonde\u0301', account_handle = '@Zoe\u0308@social.example', "
                "hashtags = 'cafe\u0301 breaking' WHERE event_id = 'e3'")
    raw.close()
    _make_old(path)
    s = SqliteFindingsStore(path)
    try:
        assert ids(s.search(ClusterQuery(text="café"))) == ids(s.search(ClusterQuery(text="cafe\u0301"))) == ["c-fire"]
        assert ids(s.search(ClusterQuery(text='"café est inondé"'))) == ["c-fire"]
        assert ids(s.search(ClusterQuery(account="@zoë@social.example"))) == ["c-fire"]
        assert ids(s.search(ClusterQuery(hashtag="#café"))) == ids(s.search(ClusterQuery(hashtag="cafe\u0301"))) == [
            "c-fire"]
        assert s.match_sightings("Zoe\u0308") == s.match_sightings("zoë") == ["c-fire"]  # the desk's substring match
    finally:
        s.close()


def test_a_store_written_before_platforms_were_lower_cased_is_folded_once(tmp_path, monkeypatch):
    from streams import store as store_mod
    from streams.store import SCHEMA_VERSION, SqliteFindingsStore

    path = tmp_path / "findings.sqlite"
    s = SqliteFindingsStore(path)
    fill(s)
    s.apply_snapshot(_snap(20, TAGGED[0]))
    s.close()
    _make_old(path)
    raw = sqlite3.connect(path)
    assert {p for p, in raw.execute("SELECT DISTINCT platform FROM sightings")} == {
        "x", "bluesky", "Bluesky", "Mastodon", "X"}
    raw.close()

    monkeypatch.setattr(store_mod, "FOLD_CHUNK_ROWS", 2)  # several chunks over these few rows
    s = SqliteFindingsStore(path)
    try:
        # counts per platform: one platform, not "Bluesky" beside "bluesky"
        flood = {c.id: c for c in s.clusters()}["c-flood"]
        assert flood.platforms == ["bluesky", "x"]
        fire = {c.id: c for c in s.clusters()}["c-fire"]
        assert fire.platforms == ["bluesky", "x"]
        hist = s.sighting_histogram(["c-fire", "c-flood", "c-flood2"], T0, T0 + timedelta(hours=1), 4)
        assert set(hist) == {"bluesky", "x"} and sum(map(sum, hist.values())) == 5
        accounts = {a.account_id: a for a in s.account_aggregates(set())}
        assert accounts["u3"].platforms == ["bluesky"] and accounts["u5"].platforms == ["mastodon"]
        assert [p.platform for p in s.cluster_sightings("c-fire")] == ["bluesky", "x", "x"]
        # the filter, given in any case, finds the rows stored as "Bluesky"
        for given in ("bluesky", "Bluesky", "BLUESKY"):
            assert sorted(ids(s.search(ClusterQuery(platform=given)))) == ["c-fire", "c-flood"]
        assert ids(s.search(ClusterQuery(platform="mastodon"))) == ["c-pope"]
        # the index is rebuilt with hashtags apart: the old one matched the phrase across #trump #arrested
        assert s.search(ClusterQuery(text='"trump arrested"')) == []
        assert ids(s.search(ClusterQuery(text="puffer"))) == ["c-pope"]  # old posts are in the new index
        assert ids(s.search(ClusterQuery(text="breaking"))) == ["c-fire"]
    finally:
        s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    before = db.execute("SELECT rowid, platform FROM sightings ORDER BY rowid").fetchall()
    fts_rows = db.execute("SELECT COUNT(*) FROM sightings_fts_docsize").fetchone()[0]
    db.close()
    # idempotent: opening again changes nothing (and indexes no post twice)
    SqliteFindingsStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT rowid, platform FROM sightings ORDER BY rowid").fetchall() == before
    assert db.execute("SELECT COUNT(*) FROM sightings_fts_docsize").fetchone()[0] == fts_rows == 8
    db.close()


def test_a_store_of_a_newer_schema_is_still_refused(tmp_path):
    from streams.store import SqliteFindingsStore, StoreError

    path = tmp_path / "findings.sqlite"
    SqliteFindingsStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=4")
    db.close()
    with pytest.raises(StoreError, match="newer deepwatch"):
        SqliteFindingsStore(path)


# ------------------------------------------------------------- a sort alone, on every route
EDITOR_TOKEN = "editor-token-0123456789abcdef"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")


@pytest.fixture(params=["sqlite", "es"])
def many(request, tmp_path) -> tuple[Path, str | None]:
    from tests.test_search_paging import _fill

    return stored_findings(request, tmp_path, request.param, _fill)


def _page_ids(html: str) -> list[str]:
    return re.findall(r'<tr class="cluster-row" data-cluster="([^"]+)"', html)


def _api_pages(c, first: str) -> list[str]:
    got, nxt = [], first
    while nxt:
        r = c.get(nxt)
        assert r.status_code == 200, r.text
        got += [d["id"] for d in r.json()]
        link = r.headers.get("link")
        nxt = re.fullmatch(r'<(/api/search\?[^>]+)>; rel="next"', link).group(1) if link else None
    return got


def test_a_sort_alone_lists_every_cluster_in_that_order_on_every_route(many, env):
    # /search?sort=score listed the clusters by score, `deepwatch search --sort score` too, while
    # GET /api/search?sort=score answered 422 "give at least one of q, ...": one answer now, every route
    from streams.findings import open_findings
    from tests.test_desk_api import client, make_settings

    data, url = many
    store = open_findings(url, data)
    try:
        everything = ids(store.search(ClusterQuery(sort="score")))
        by_velocity = ids(store.search(ClusterQuery(sort="velocity")))
        high_by_velocity = ids(store.search(ClusterQuery(sort="velocity", min_score=0.6)))
    finally:
        store.close()
    assert len(everything) == 130
    store_args = ["--store", url] if url else []
    r = _cli("search", "--data-dir", str(data), *store_args, "--sort", "score", "--limit", "40", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert [d["id"] for d in json.loads(r.stdout)] == everything[:40]
    with client(make_settings(data, url)) as c:
        assert _api_pages(c, "/api/search?sort=score&limit=40") == everything
        page = c.get("/search?sort=score&limit=40")
        assert page.status_code == 200 and _page_ids(page.text) == everything[:40]
        nxt = re.search(r'<a href="([^"]+)" rel="next" id="next-page">', page.text).group(1).replace("&amp;", "&")
        assert _page_ids(c.get(nxt).text) == everything[40:80]
        # relevance without words is velocity's order: paged as that is, where it was one page cut at `limit`
        assert _api_pages(c, "/api/search?sort=relevance&limit=40") == by_velocity
        assert _api_pages(c, "/api/search?sort=relevance&min_score=0.6&limit=7") == high_by_velocity
        # `deepwatch search --sort relevance` refused the sort the desk and the API take
        r = _cli("search", "--data-dir", str(data), *store_args, "--sort", "relevance", "--limit", "40",
                 "--format", "json")
        assert r.returncode == 0, r.stderr
        assert [d["id"] for d in json.loads(r.stdout)] == by_velocity[:40]
        # nothing asked is still no search: the page's empty form, the API's 422 (now naming the sort)
        assert _page_ids(c.get("/search?limit=40").text) == []
        r = c.get("/api/search?limit=40")
        assert r.status_code == 422 and "or a sort alone" in r.json()["error"]


# ------------------------------------------------------------- the banks page's desk-verdict entries
def test_the_banks_page_counts_desk_verdict_entries_and_pages_past_its_first_500(tmp_path, env):
    from detectors.banks import BankStore
    from streams.desk.views import ENTRIES_PAGE
    from tests.test_desk_api import client, make_settings

    n = ENTRIES_PAGE + 37
    banks = BankStore(tmp_path / "banks.sqlite")
    csv = tmp_path / "desk.csv"
    csv.write_text("phash,id,label\n" + "".join(f"{i:016x},{i},cluster k{i}\n" for i in range(1, n + 1)))
    assert banks.import_csv("desk-fake", csv, "fake") == n
    other = tmp_path / "other.csv"
    other.write_text("phash,id,label\n" + "".join(f"{i:016x},{i},imported\n" for i in range(1, 4)))
    banks.import_csv("afp", other, "fake")  # not the desk's: neither listed nor counted there
    banks.close()
    from streams.store import open_store

    open_store(tmp_path).close()
    with client(make_settings(tmp_path)) as c:
        first = c.get("/banks")
        assert first.status_code == 200
        assert first.text.count('class="entry-row"') == ENTRIES_PAGE
        count = re.search(r'<p id="desk-entries-count"[^>]*>([^<]+)</p>', first.text).group(1)
        assert count.startswith(f"{n} entries added by desk verdicts") and "next pages" in count
        listed = re.findall(r'<tr class="entry-row">.*?<td>(\d+)</td>', first.text)
        nxt = re.search(r'<a href="([^"]+)" rel="next" id="next-page">', first.text).group(1)
        second = c.get(nxt.replace("&amp;", "&"))
        assert second.status_code == 200 and 'id="next-page"' not in second.text and 'id="first-page"' in second.text
        listed += re.findall(r'<tr class="entry-row">.*?<td>(\d+)</td>', second.text)
        # every entry once, newest first
        assert listed == [str(i) for i in range(n, 0, -1)]
        assert c.get("/banks?cursor=WyJ4Il0").status_code == 422  # ["x"]: not a place in the list
