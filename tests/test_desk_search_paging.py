"""Cursor paging of the desk's analyst search (`/api/search`, `/search`):
following `Link`/`X-Next-Cursor` (or the page's "next page" link) gives every
match once, in the order of one unpaged search, on both findings backends;
a cursor of another search, or one tampered with, is a 422 naming `cursor`.
A desk verdict alone pages by the values the desk shows; the substring match
of a text in no post is one answer, cut at `limit`, with no cursor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streams.cluster_search import ClusterQuery, SearchCursor, search_digest
from streams.cursors import encode_cursor
from tests.test_desk_api import client, make_settings
from tests.findings_fixture import stored_findings
from tests.test_search_paging import N, _fill

EDITOR_TOKEN = "editor-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
MARKED = [f"k{n:02d}" for n in range(0, N, 7)]  # 19 clusters given a desk verdict


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")


@pytest.fixture(params=["sqlite", "es"])
def many(request, tmp_path) -> tuple[Path, str | None]:
    """The paging fixture's clusters (tests/test_search_paging.py: more than
    a page's pre-selection, scores that tie and that only show alike) on each
    backend: (data dir, store URL; None = the data dir's SQLite file)."""
    return stored_findings(request, tmp_path, request.param, _fill)


def _follow(c, first: str) -> tuple[list[str], int]:
    """Every id of the pages from ``first`` on, following `Link`, and how many pages."""
    got, nxt, pages = [], first, 0
    while nxt:
        r = c.get(nxt)
        assert r.status_code == 200, r.text
        assert isinstance(r.json(), list)
        got += [d["id"] for d in r.json()]
        pages += 1
        link = r.headers.get("link")
        if link is None:
            assert "x-next-cursor" not in r.headers and "x-result-cut" not in r.headers
            break
        assert r.headers["x-result-cut"] == "true"
        nxt = re.fullmatch(r'<(/api/search\?[^>]+)>; rel="next"', link).group(1)
        assert nxt.endswith("cursor=" + r.headers["x-next-cursor"])
    return got, pages


def _mark(c, ids: list[str], verdict: str = "needs-review") -> None:
    for cid in ids:
        r = c.post(f"/api/clusters/{cid}/verdict", json={"verdict": verdict, "note": "checked"}, headers=EDITOR)
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("query", [
    "sort=score&min_score=0", "min_score=0", "sort=last_seen&min_score=0", "sort=sightings&min_score=0",
    "q=harbour%20fire&sort=last_seen", "hashtag=storm&sort=score", "account=u1&since=2026-11-20T10:01:00%2B00:00",
])
def test_api_pages_hold_every_match_once_in_the_unpaged_order(many, env, query):
    data, url = many
    with client(make_settings(data, url)) as c:
        whole = c.get(f"/api/search?{query}&limit=10000")
        assert whole.status_code == 200 and "link" not in whole.headers
        want = [d["id"] for d in whole.json()]
        assert len(want) > 14  # three pages at least
        got, pages = _follow(c, f"/api/search?{query}&limit=7")
        assert got == want and pages == -(-len(want) // 7)


def test_desk_verdicts_page_alone_and_with_store_conditions(many, env):
    data, url = many
    with client(make_settings(data, url)) as c:
        _mark(c, MARKED)
        for query in ("desk_verdict=needs-review", "desk_verdict=needs-review&sort=score",
                      "desk_verdict=needs-review&min_score=0&sort=last_seen",
                      "desk_verdict=needs-review&q=harbour&sort=velocity"):
            want = [d["id"] for d in c.get(f"/api/search?{query}&limit=10000").json()]
            assert sorted(want) == sorted(MARKED), query
            got, pages = _follow(c, f"/api/search?{query}&limit=4")
            assert got == want and pages == 5, query
        # the desk's order is its own (the values shown): a cursor of it is no place in a store's search
        cursor = c.get("/api/search?desk_verdict=needs-review&limit=4").headers["x-next-cursor"]
        r = c.get(f"/api/search?desk_verdict=needs-review&min_score=0&limit=4&cursor={cursor}")
        assert r.status_code == 422 and r.json()["error"].startswith("bad request: cursor: not a cursor")


def test_more_desk_verdicts_than_the_store_holds_back_page_past_its_window(many, env, monkeypatch):
    """Past ``MAX_RESULTS`` desk verdicts the store is not handed their ids
    and its window of matches is filtered by the desk: a page may then hold
    fewer than ``limit`` (here the window is 4 clusters wide, so pages hold
    what 4 matches held), and the next one starts after the last match the
    store returned, so no marked cluster past the window is missed."""
    import streams.desk.source as source
    import streams.cluster_search as cluster_search

    data, url = many
    with client(make_settings(data, url)) as c:
        _mark(c, MARKED)
        everything = [d["id"] for d in c.get("/api/search?min_score=0&sort=score&limit=10000").json()]
        want = [cid for cid in everything if cid in MARKED]
        monkeypatch.setattr(cluster_search, "MAX_RESULTS", 4)
        monkeypatch.setattr(source, "MAX_RESULTS", 4)
        got, pages = _follow(c, "/api/search?desk_verdict=needs-review&min_score=0&sort=score&limit=3")
        assert got == want and pages >= N // 4


def test_a_cursor_of_another_search_or_tampered_with_is_a_422_naming_it(many, env):
    data, url = many
    with client(make_settings(data, url)) as c:
        r = c.get("/api/search?sort=score&min_score=0&limit=5")
        token = r.headers["x-next-cursor"]
        queue = c.get("/api/clusters?limit=2&sort=score").headers["x-next-cursor"]
        forged = SearchCursor(sort="score", query="0" * 16, key=(-0.5, 0.0), cluster_id="k01").encode()
        for bad in (f"sort=score&min_score=0&cursor={token[:-4]}AAAA", f"sort=velocity&min_score=0&cursor={token}",
                    f"sort=score&min_score=0.1&cursor={token}", f"sort=score&min_score=0&cursor={queue}",
                    f"sort=score&min_score=0&cursor={forged}", "sort=score&min_score=0&cursor=abc%21",
                    "sort=score&min_score=0&cursor=" + "A" * 9000, "sort=score&min_score=0&cursor=W3RydWVd"):
            r = c.get("/api/search?" + bad)
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"].startswith("bad request: cursor: ") and \
                r.json()["detail"][0]["loc"] == ["query", "cursor"], bad
        # the page itself says it, its form as sent
        page = c.get(f"/search?sort=velocity&min_score=0&cursor={token}")
        assert page.status_code == 422 and 'id="page-error"' in page.text and "cursor" in page.text
        # a page's size moves no place: the cursor goes on with another limit
        assert c.get(f"/api/search?sort=score&min_score=0&limit=50&cursor={token}").status_code == 200


def test_the_search_page_links_the_next_and_the_first_page(many, env):
    data, url = many
    with client(make_settings(data, url)) as c:
        want = [d["id"] for d in c.get("/api/search?hashtag=storm&sort=score&limit=10000").json()]
        got, nxt, pages = [], "/search?hashtag=storm&sort=score&limit=20", 0
        while nxt:
            page = c.get(nxt)
            assert page.status_code == 200
            got += re.findall(r'<tr class="cluster-row" data-cluster="([^"]+)"', page.text)
            assert ('id="first-page"' in page.text) == (pages > 0)
            pages += 1
            m = re.search(r'<a href="([^"]+)" rel="next" id="next-page">', page.text)
            nxt = m.group(1).replace("&amp;", "&") if m else None
        assert got == want and pages == 4
        first = re.search(r'<a href="([^"]+)" id="first-page">', page.text).group(1).replace("&amp;", "&")
        assert "cursor=" not in first
        top = c.get(first).text
        assert re.findall(r'data-cluster="([^"]+)"', top) == want[:20] and 'id="more-results"' in top


def test_a_text_in_no_post_is_one_answer_cut_at_its_limit(many, env):
    """Matched as a substring by the desk (here cluster ids k12, k120..k129), the
    answer is ordered by the desk with clusters outside its view last,
    unread: it has no keyset, so it gives no cursor; a cut says so and
    the page links it with a larger limit. A cursor continues the store's
    order only, which holds no post with that text."""
    data, url = many
    with client(make_settings(data, url)) as c:
        whole = c.get("/api/search?q=k12&limit=100")
        assert sorted(d["id"] for d in whole.json()) == ["k12", *(f"k{n}" for n in range(120, N))]
        assert "x-result-cut" not in whole.headers
        cut = c.get("/api/search?q=k12&limit=4")
        assert [d["id"] for d in cut.json()] == [d["id"] for d in whole.json()][:4]
        assert cut.headers["x-result-cut"] == "true"
        assert "x-next-cursor" not in cut.headers and "link" not in cut.headers
        page = c.get("/search?q=k12&limit=4").text
        assert 'id="more-results"' in page and 'id="next-page"' not in page
        q = ClusterQuery(text="k12", sort="score")
        after = SearchCursor(sort="score", query=search_digest(q), key=(-0.5, -1.0), cluster_id="k12").encode()
        r = c.get(f"/api/search?q=k12&sort=score&limit=4&cursor={after}")
        assert r.status_code == 200 and r.json() == [] and "link" not in r.headers


def test_a_relevance_ranking_is_cut_without_a_cursor_and_a_made_one_is_a_422(many, env):
    data, url = many
    with client(make_settings(data, url)) as c:
        r = c.get("/api/search?q=harbour%20fire&limit=4")
        assert r.status_code == 200 and len(r.json()) == 4 and r.headers["x-result-cut"] == "true"
        assert "x-next-cursor" not in r.headers and "link" not in r.headers
        page = c.get("/search?q=harbour%20fire&limit=4").text
        assert 'id="more-results"' in page and 'id="next-page"' not in page
        made = encode_cursor(["relevance", search_digest(ClusterQuery(text="harbour fire")), -1.0, 0, 0, -0.5, "k01"])
        r = c.get(f"/api/search?q=harbour%20fire&limit=4&cursor={made}")
        assert r.status_code == 422 and "no next page" in r.json()["error"], r.text
