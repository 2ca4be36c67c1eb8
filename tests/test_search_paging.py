"""Cursor paging of the analyst search: every match once, in the order of
one unpaged search, on every findings backend (SQLite and the Elasticsearch
store against the loopback fake), through the store and `deepwatch search`."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from detectors.base import Evidence
from streams.cluster_search import ClusterQuery, SearchCursor, search_digest
from streams.cursors import encode_cursor
from streams.records import ClusterSnapshot, Engagement, Velocity
from tests.findings_fixture import T0, _member, _sighting, filled_store
from tests.test_search import _cli

N = 130  # past one page's pre-selection window (4 x 5 + 100): later pages start from their cursor
# Scores that tie exactly, and ones stored apart that show alike (rounded to 4 decimals).
SCORES = (0.5, 0.50004, 0.49996, 0.5, 0.7, 0.70001, 0.2)


def _cluster(i: int) -> ClusterSnapshot:
    cid = f"k{(i * 17) % N:02d}"  # ids not in the order written (17 is prime to N)
    words = "harbour fire" if i % 3 else "harbour fire harbour fire again"  # relevance ties and steps
    post = (f"p{i}", cid, "a", f"u{i % 5}", None, "x", i % 4, words, ["storm"] if i % 2 else [])
    s = _sighting(i, post)
    when = T0 + timedelta(minutes=i % 4)
    return ClusterSnapshot(
        cluster_id=cid, revision=1, fake_score=SCORES[i % len(SCORES)], verdict="likely-ai",
        evidence=[Evidence(detector="metadata", score=0.5, detail="e", weight=1.0)],
        members=[_member(s)], sightings=1, accounts=1, platforms=["x"], engagement=Engagement(likes=0),
        velocity=Velocity(sightings_5m=i % 2, sightings_1h=i % 3), first_seen=when, last_seen=when,
        new_sighting=s)


def _fill(store) -> None:
    store.apply_snapshots([_cluster(i) for i in range(N)])


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    yield from filled_store(request, tmp_path, request.param, _fill)


def _pages(store, q: ClusterQuery, size: int) -> list[list[str]]:
    pages, after = [], None
    while True:
        page = store.search(q.model_copy(update={"limit": size}), after=after)
        pages.append([c.id for c in page])
        if len(page) < size:
            return pages
        after = SearchCursor.decode(page.cursor(), q)


@pytest.mark.parametrize("q", [ClusterQuery(sort="velocity"), ClusterQuery(sort="score"),
                               ClusterQuery(sort="last_seen"), ClusterQuery(sort="sightings"),
                               ClusterQuery(text="harbour fire", sort="last_seen"),
                               ClusterQuery(hashtag="storm", sort="score")],
                         ids=["velocity", "score", "last_seen", "sightings", "text", "filtered"])
def test_pages_hold_every_match_once_in_the_order_of_one_search(store, q):
    whole = [c.id for c in store.search(q)]
    assert len(whole) == (N if q.hashtag is None else N // 2)
    pages = _pages(store, q, 5)
    assert all(len(p) == 5 for p in pages[:-1])
    assert [cid for p in pages for cid in p] == whole


def test_a_page_boundary_inside_a_run_of_equal_shown_scores(store):
    # many clusters show a score of 0.5 (three stored values): a page ends inside them
    q = ClusterQuery(sort="score")
    whole = store.search(q)
    shown = [c.fake_score for c in whole]
    run = [i for i, s in enumerate(shown) if s == 0.5]
    assert len(run) > 6
    first = store.search(q.model_copy(update={"limit": run[0] + 3}))
    rest = store.search(q, after=SearchCursor.decode(first.cursor(), q))
    assert [c.id for c in first] + [c.id for c in rest] == [c.id for c in whole]


def test_a_cursor_is_bound_to_its_search():
    q = ClusterQuery(text="harbour", sort="score")
    good = SearchCursor(sort="score", query=search_digest(q), key=(-0.5, -3.0), cluster_id="k01")
    assert SearchCursor.decode(good.encode(), q.model_copy(update={"limit": 3})) == good  # a page's size moves nothing
    forged = good.model_copy(update={"query": "x" * 16}).encode()
    for bad in (forged, "not a cursor!", encode_cursor(["score", "x"]), good.encode()[:-3], ""):
        with pytest.raises(ValueError, match="not a cursor this desk gave"):
            SearchCursor.decode(bad, q)
    for other in (ClusterQuery(text="fire", sort="score"), ClusterQuery(text="harbour", sort="velocity")):
        with pytest.raises(ValueError, match="not a cursor this desk gave"):
            SearchCursor.decode(good.encode(), other)


@pytest.mark.parametrize("sort, key", [
    ("score", (-(10**400), -3.0)),  # an int no float holds: OverflowError once, a 500 on the desk
    ("score", (-1.5, -3.0)),  # a score over 1
    ("sightings", (-1e12, -0.5)),  # past the stores' integer fields (Elasticsearch answered 400)
    ("last_seen", (1e300,)),  # an instant no calendar has (Elasticsearch's range overflowed)
])
def test_a_cursor_with_a_key_no_row_can_have_is_refused(sort, key):
    q = ClusterQuery(sort=sort)
    token = encode_cursor([sort, search_digest(q), *key, "k01"])
    with pytest.raises(ValueError, match="not a cursor this desk gave"):
        SearchCursor.decode(token, q)


def test_a_relevance_ranking_is_one_answer_with_no_cursor(store):
    # BM25 ranks move with every post indexed: a page boundary kept as a rank skipped rows
    q = ClusterQuery(text="harbour fire", limit=5)
    page = store.search(q)
    assert len(page) == 5 and page.cursor() is None
    made = encode_cursor(["relevance", search_digest(q), -1.0, 0.0, 0.0, -0.5, "k01"])
    with pytest.raises(ValueError, match="no next page: each post the stream adds moves the ranks"):
        SearchCursor.decode(made, q)


def test_cli_search_pages_with_cursor_and_reads_everything_with_all(tmp_path):
    from streams.store import open_store

    s = open_store(tmp_path)
    _fill(s)
    whole = [c.id for c in s.search(ClusterQuery(sort="score"))]
    s.close()
    d = str(tmp_path)
    got, cursor = [], None
    while True:
        r = _cli("search", "--data-dir", d, "--sort", "score", "--limit", "20", "--format", "json",
                 *(("--cursor", cursor) if cursor else ()))
        assert r.returncode == 0, r.stderr
        got += [c["id"] for c in json.loads(r.stdout)]
        lines = r.stderr.strip().splitlines()
        if not lines:
            break
        assert lines[-1].startswith("next page: --cursor ")
        cursor = lines[-1].split()[-1]
    assert got == whole
    r = _cli("search", "--data-dir", d, "--sort", "score", "--limit", "20", "--all")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == whole
    assert "40 clusters so far" in r.stderr
    r = _cli("search", "--data-dir", d, "--sort", "score", "--format", "table", "--limit", "3")
    assert "next page: --cursor " in r.stderr and "Traceback" not in r.stderr
    token = r.stderr.strip().splitlines()[-1].split()[-1]
    for args in (("--sort", "velocity", "--cursor", token), ("--sort", "score", "--cursor", token[:-4] + "AAAA"),
                 ("--sort", "score", "--cursor", "%%%")):
        r = _cli("search", "--data-dir", d, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "--cursor" in r.stderr, (args, r.stderr)
    # a relevance ranking: cut and said so, never paged
    r = _cli("search", "harbour fire", "--data-dir", d, "--limit", "3", "--format", "json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 3, r.stderr
    assert "--cursor" not in r.stderr and "--sort velocity, score, last_seen or sightings to page" in r.stderr
    r = _cli("search", "harbour fire", "--data-dir", d, "--all")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--all: a search ranked by relevance has no next page" in r.stderr and "--sort last_seen" in r.stderr
