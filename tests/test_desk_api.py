"""The desk's REST API and guards, in process (FastAPI's TestClient over the
real app, a real findings store, real banks and the real alert sinks)."""

from __future__ import annotations

import http.server
import json
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from streams.blobstore import DirectoryBlobStore
from streams.desk import create_app
from streams.desk.auth import add_user, hash_password, verify_password
from streams.findings import open_findings
from streams.settings import Settings, WebhookSettings
from streams.store import open_store
from streams.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.desk_support import close_sources, make_cluster, small_store


EDITOR_TOKEN = "editor-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
WEBHOOK_SECRET = "desk-test-webhook-secret"


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list[tuple[dict, bytes]] = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Receiver.got = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/hook", Receiver.got
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def data(tmp_path) -> Path:
    small_store(tmp_path)
    return tmp_path


def make_settings(data: Path, store_url: str | None = None, **desk) -> Settings:
    s = Settings(data_dir=data)
    s.findings.url = store_url
    for k, v in desk.items():
        setattr(s.desk, k, v)
    s.desk.account_check_s = 3600  # the background check runs once at start; tests call it explicitly
    return s


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN},viewer:vi:{VIEWER_TOKEN}")
    monkeypatch.setenv("DEEPWATCH_WEBHOOK_SECRET", WEBHOOK_SECRET)


def client(settings: Settings, host: str = "127.0.0.1") -> TestClient:
    return TestClient(create_app(settings, host=host), base_url="http://127.0.0.1")


# ---------------------------------------------------------------- reading
def test_clusters_shape_matches_the_cli_and_queue_order(backend, env):
    data, url = backend
    cli_rows = [c.as_json() for c in open_findings(url, data).clusters()]
    with client(make_settings(data, url)) as c:
        rows = c.get("/api/clusters").json()
    assert {r["id"] for r in rows} == {r["id"] for r in cli_rows}
    for r in rows:
        assert set(cli_rows[0]) <= set(r)  # same shape (the desk may add a `desk` key)
    # likely-AI first, by velocity as of the newest sighting (persona4's, 4 h after c-viral's burst):
    # persona4 is the only one sighted in the 5 minutes before it
    assert rows[0]["id"] == "c-persona4" and rows[0]["velocity"]["sightings_5m"] == 1
    assert rows[-1]["id"] == "c-photo"


@pytest.mark.parametrize("query,expect", [
    ("verdict=likely-ai&platform=weibo", ["c-viral"]),
    ("verdict=no-evidence", ["c-photo"]),
    ("platform=telegram", ["c-quiet"]),
    ("q=subway", ["c-viral"]),
    ("q=%22harbour%20at%20dawn%22", ["c-photo"]),
    ("q=%21%21%21", []),  # no word to look for: matched every cluster
    ("q=c-quie", ["c-quiet"]),  # part of an id
    ("since=2026-11-30T15:30:00Z&sort=last_seen", ["c-persona4"]),
    ("sort=sightings&limit=2", ["c-viral", "c-photo"]),
    ("verdict=unreviewed&platform=x&sort=score", ["c-viral", "c-photo"]),
])
def test_cluster_filters(backend, env, query, expect):
    data, url = backend
    with client(make_settings(data, url)) as c:
        r = c.get("/api/clusters?" + query)
    assert r.status_code == 200
    assert [d["id"] for d in r.json()] == expect


@pytest.mark.parametrize("query,field", [
    ("sort=popularity", "sort"), ("verdict=maybe", "verdict"), ("since=yesterday", "since"),
    ("limit=0", "limit"), ("limit=abc", "limit"), ("unknown_filter=1&sort=nope", "sort"),
])
def test_bad_filters_are_clear_422_json(data, env, query, field):
    with client(make_settings(data)) as c:
        r = c.get("/api/clusters?" + query)
    assert r.status_code == 422
    body = r.json()
    assert body["error"].startswith("bad request: ") and field in body["error"]
    assert any(d["loc"][-1] == field for d in body["detail"])


def test_a_big_cluster_is_answered_with_its_first_sightings_and_a_spread_counted_by_the_store(backend, env):
    """One GET of a viral cluster read every sighting (a 100 MB answer and
    gigabytes of memory at 300,000): the detail carries the first 200, and
    the spread by platform and the queue's sparkline are counted by the
    store over all of them."""
    from datetime import timedelta

    from tests.desk_support import T0

    data, url = backend
    store = open_findings(url, data)
    make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-huge", 77, posts=450, ai=True,
                 platforms=("x", "bluesky", "mastodon"), t0=T0 - timedelta(days=1))
    getattr(store, "refresh", lambda: None)()
    store.close()
    with client(make_settings(data, url)) as c:
        d = c.get("/api/clusters/c-huge").json()
        assert d["sightings"] == 450 and len(d["sightings_detail"]) == 200 and d["sightings_detail_truncated"]
        assert [s["event_id"] for s in d["sightings_detail"][:2]] == ["c-huge-e0", "c-huge-e1"]  # oldest first
        spread = d["spread_by_platform"]
        assert {k: sum(v) for k, v in spread["platforms"].items()} == {"x": 150, "bluesky": 150, "mastodon": 150}
        # posts every 30 s over 224.5 minutes in 24 buckets: the last bucket starts at the last post
        assert all(len(v) == 24 and v[0] > 0 for v in spread["platforms"].values())
        assert {k: v[-1] for k, v in spread["platforms"].items()} == {"x": 0, "bluesky": 0, "mastodon": 1}  # post 449
        assert c.get("/api/clusters/c-viral").json()["sightings_detail_truncated"] is False
        page = c.get("/clusters/c-huge")
        assert page.status_code == 200 and "the first 25 of 450 posts" in page.text
        queue = c.get("/?sort=sightings")
        assert queue.status_code == 200 and "c-huge" in queue.text


def test_cluster_detail_and_bad_ids(backend, env):
    data, url = backend
    with client(make_settings(data, url)) as c:
        d = c.get("/api/clusters/c-viral").json()
        assert d["sightings"] == 12 and len(d["sightings_detail"]) == 12
        assert set(d["spread_by_platform"]["platforms"]) == {"x", "weibo"}
        assert sum(sum(v) for v in d["spread_by_platform"]["platforms"].values()) == 12
        assert d["members"][0]["sha256"] and d["evidence"][0]["detector"] == "metadata"
        assert d["verdict_history"] == []
        assert d["sightings_detail"][0]["post_url"] == "https://example.org/c-viral/0"
        for bad in ("nope", "c-viral%00x", "%27%20OR%201=1"):
            r = c.get(f"/api/clusters/{bad}")
            assert r.status_code == 404 and "no cluster" in r.json()["error"]
        assert c.post("/api/clusters/nope/verdict", json={"verdict": "fake"}, headers=EDITOR).status_code == 404
        r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "probably"}, headers=EDITOR)
        assert r.status_code == 422 and "verdict" in r.json()["error"]
        r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake", "extra": 1}, headers=EDITOR)
        assert r.status_code == 422
        # a body that is wrong as a whole is named, not left as an empty field name
        for body, said in ((b"", "bad request: body: Field required"), (b"[]", "bad request: body: Input should be"),
                           (b"{bad", "bad request: body: not valid JSON (Expecting property name")):
            r = c.post("/api/clusters/c-viral/verdict", content=body, headers={"Content-Type": "application/json", **EDITOR})
            assert r.status_code == 422 and r.json()["error"].startswith(said)
        # bytes that are not UTF-8: the parser gives up, a 400 (docs/desk.md), not a 500
        r = c.post("/api/clusters/c-viral/verdict", content=b'{"verdict": "fake\xff"}',
                   headers={"Content-Type": "application/json", **EDITOR})
        assert r.status_code == 400 and r.json()["status"] == 400


def test_accounts_and_account_page(backend, env):
    data, url = backend
    with client(make_settings(data, url)) as c:
        rows = c.get("/api/accounts?min_ai_share=0.9&min_posts=3").json()
        assert [a["id"] for a in rows] == ["persona1"]
        p = rows[0]
        assert (p["posts"], p["pictures"], p["ai_pictures"], p["ai_share"]) == (5, 5, 5, 1.0)
        assert p["platforms"] == ["xiaohongshu"] and p["first_seen"] < p["last_seen"]
        assert p["cadence"]["median_gap_s"] == 3600
        everyone = c.get("/api/accounts?min_posts=0&limit=5000").json()
        assert any(a["ai_share"] == 0.0 for a in everyone)  # the photo's posters
        assert c.get("/api/accounts/persona1").json()["posts_detail"][0]["cluster_id"] == "c-persona4"
        assert c.get("/api/accounts/nobody").status_code == 404
        for bad in ("min_ai_share=2", "min_posts=-1", "min_ai_share=lots"):
            r = c.get("/api/accounts?" + bad)
            assert r.status_code == 422 and r.json()["error"].startswith("bad request")
        page = c.get("/accounts/persona1")
        assert page.status_code == 200 and "persona1" in page.text and "100%" in page.text


def test_account_ids_with_a_slash(data, env):
    # Producers that reuse ids across platforms prefix them (docs/desk.md): "x/123" must have its page too.
    store = open_store(data)
    make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-prefixed", 55, posts=2, ai=True, accounts=["x/123"])
    store.close()
    with client(make_settings(data)) as c:
        page = c.get("/clusters/c-prefixed")
        assert 'href="/accounts/x%2F123"' in page.text  # one path segment: "../../logout" links nowhere else
        assert c.get("/accounts/x/123").status_code == 200
        r = c.get("/api/accounts/x%2F123")
        assert r.status_code == 200 and r.json()["id"] == "x/123" and r.json()["posts"] == 2
        assert c.get("/api/accounts/x/nobody").json() == {"error": "no account 'x/nobody'", "status": 404}


def test_a_word_in_posts_finds_those_posts_not_every_cluster_whose_evidence_says_it(data, env):
    # every AI cluster's evidence says "Stable Diffusion XL": a search for a word a post holds listed them all
    store = open_store(data)
    make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-talk", 56, posts=2, ai=False,
                 texts=["stable diffusion did this?"])
    store.close()
    with client(make_settings(data)) as c:
        assert [d["id"] for d in c.get("/api/search?q=diffusion").json()] == ["c-talk"]
        # a text no post holds still finds what the substring match finds: ids, evidence wording
        assert {d["id"] for d in c.get("/api/search?q=generator").json()} == {
            "c-viral", "c-quiet", *(f"c-persona{k}" for k in range(5))}
        assert [d["id"] for d in c.get("/api/search?q=c-quiet").json()] == ["c-quiet"]
        # the desk's own verdicts narrow a search, never widen it: c-talk's post holds "diffusion", so the
        # evidence wording of a cluster marked fake is not a match either
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"}, headers=EDITOR)
        assert r.status_code == 201, r.text
        assert c.get("/api/search?q=diffusion&desk_verdict=fake").json() == []
        # a text no post holds, sorted as asked
        by_score = [d["id"] for d in c.get("/api/search?q=generator&sort=sightings").json()]
        assert by_score[0] == "c-viral" and len(by_score) == 7


def test_search_endpoint_and_page(backend, env):
    data, url = backend
    with client(make_settings(data, url)) as c:
        assert [d["id"] for d in c.get("/api/search?q=subway").json()] == ["c-viral"]
        assert [d["id"] for d in c.get("/api/search?q=%22is%20this%20real%22&platform=weibo").json()] == ["c-viral"]
        assert c.get("/api/search?q=subway&platform=telegram").json() == []
        assert {d["id"] for d in c.get("/api/search?account=@persona1").json()} == {f"c-persona{k}" for k in range(5)}
        assert [d["id"] for d in c.get("/api/search?account=persona1&since=2026-11-30T15:30:00Z").json()] == ["c-persona4"]
        # a sort, or a filter that normalises to nothing, is not a filter: it returned every cluster
        for nothing in ("account=@", "hashtag=%23", "q=%21%21%21"):
            assert c.get(f"/api/search?{nothing}").status_code == 422, nothing
        assert [d["id"] for d in c.get("/api/search?verdict=no-evidence&min_score=0.1").json()] == ["c-photo"]
        assert [d["id"] for d in c.get("/api/search?q=c-quiet").json()] == ["c-quiet"]  # an id: not in any post
        for bad in ("", "?min_score=3", "?since=soon&q=x", "?sort=hot&q=x", "?verdict=fake&q=x"):
            r = c.get("/api/search" + bad)
            assert r.status_code == 422 and r.json()["error"].startswith("bad request")
        page = c.get("/search?q=persona1")
        assert page.status_code == 200 and page.text.count('class="cluster-row"') == 5
        assert c.get("/search?account=persona1&hashtag=nothing").text.count('class="cluster-row"') == 0


def test_analyst_search_says_when_cut_and_reads_times_and_platforms_as_meant(backend, env):
    # Analyst audit: a page holding exactly the matches said there were more,
    # and /api/search never said a cut; --until a date meant its midnight (the
    # day left out); since after until answered []; an unencoded "+01:00" was a
    # 422 with no hint; the queue's platform filter alone was case-sensitive.
    data, url = backend
    personas = {f"c-persona{k}" for k in range(5)}  # one post each, 12:00-16:00 on 2026-11-30
    with client(make_settings(data, url)) as c:
        five = c.get("/api/search?account=persona1&limit=5")
        assert {d["id"] for d in five.json()} == personas and "X-Result-Cut" not in five.headers
        four = c.get("/api/search?account=persona1&limit=4")
        assert len(four.json()) == 4 and four.headers["X-Result-Cut"] == "true"
        assert 'id="more-results"' not in c.get("/search?account=persona1&limit=5").text
        assert 'id="more-results"' in c.get("/search?account=persona1&limit=4").text
        assert {d["id"] for d in c.get("/api/search?account=persona1&until=2026-11-30").json()} == personas
        r = c.get("/api/search?account=persona1&since=2026-12-01&until=2026-11-30")
        assert r.status_code == 422 and "swap them" in r.json()["error"]
        # "+01:00" sent unencoded arrives as " 01:00": read as the offset meant (13:30+01:00 = 12:30Z)
        later = c.get("/api/search?account=persona1&since=2026-11-30T13:30:00+01:00")
        assert later.status_code == 200 and {d["id"] for d in later.json()} == personas - {"c-persona0"}
        assert {d["id"] for d in c.get("/api/clusters?platform=XiaoHongShu&limit=1000").json()} == personas


def test_search_by_the_desks_own_verdicts(backend, env):
    """`desk_verdict` finds what the desk marked (its verdicts live in
    desk.sqlite, not the findings store), alone or with the store's
    conditions, before `limit` cuts; the stream's `verdict` still refuses them."""
    data, url = backend
    with client(make_settings(data, url)) as c:
        for cid, verdict in (("c-viral", "fake"), ("c-quiet", "fake"), ("c-photo", "needs-review")):
            r = c.post(f"/api/clusters/{cid}/verdict", json={"verdict": verdict, "note": "checked"}, headers=EDITOR)
            assert r.status_code == 201, r.text

        def found(query: str) -> list[str]:
            r = c.get("/api/search?" + query)
            assert r.status_code == 200, r.text
            return [d["id"] for d in r.json()]

        # velocity as shown (both bursts ended hours before persona4's post: 0), then score, then id
        assert found("desk_verdict=fake") == ["c-quiet", "c-viral"]
        assert found("desk_verdict=fake&sort=sightings&limit=1") == ["c-viral"]
        assert found("desk_verdict=fake&platform=telegram") == ["c-quiet"]
        # "marked fake, seen this week": posts within the time range (c-quiet's are before it)
        assert found("desk_verdict=fake&since=2026-11-30T12:04:00Z") == ["c-viral"]
        assert found("desk_verdict=fake&q=subway") == ["c-viral"]
        assert found("desk_verdict=needs-review") == ["c-photo"]
        assert found("desk_verdict=authentic") == []
        assert found("desk_verdict=fake&verdict=no-evidence") == []  # the stream's verdict, as stored
        d = c.get("/api/search?desk_verdict=fake").json()[0]
        assert d["desk"]["verdict"] == "fake" and d["desk"]["stream_verdict"] == "likely-ai"
        for bad in ("desk_verdict=maybe", "desk_verdict=unreviewed", "desk_verdict=" + "f" * 40, "verdict=fake"):
            r = c.get("/api/search?" + bad)
            assert r.status_code == 422 and r.json()["error"].startswith("bad request"), bad
        page = c.get("/search?desk_verdict=fake")
        assert page.status_code == 200 and page.text.count('class="cluster-row"') == 2
        assert '<option value="fake" selected>desk: fake</option>' in page.text


def test_a_desk_verdict_with_store_conditions_finds_clusters_past_the_stores_result_window(backend, env, monkeypatch):
    """The desk's verdicts are searched by the store with its other
    conditions (``ClusterQuery.cluster_ids``): kept from the store's first
    ``MAX_RESULTS`` matches alone, a marked cluster ranked past them was
    missing (here the window is one cluster wide)."""
    import streams.cluster_search as cluster_search

    data, url = backend
    with client(make_settings(data, url)) as c:
        r = c.post("/api/clusters/c-photo/verdict", json={"verdict": "needs-review", "note": "checked"}, headers=EDITOR)
        assert r.status_code == 201, r.text
        everything = [d["id"] for d in c.get("/api/search?min_score=0").json()]
        assert everything.index("c-photo") > 0  # not the store's first match
        monkeypatch.setattr(cluster_search, "MAX_RESULTS", 1)
        r = c.get("/api/search?desk_verdict=needs-review&min_score=0")
        assert r.status_code == 200 and [d["id"] for d in r.json()] == ["c-photo"], r.text


def test_account_and_queue_pages_follow_their_cursors(backend, env):
    """`/api/accounts` and `/api/clusters` stay JSON lists; a cut one says
    where the next page starts (`X-Next-Cursor`, `Link: <...>; rel="next"`),
    and following those lists everything once, in order. The pages link the
    same way."""
    import re

    data, url = backend
    with client(make_settings(data, url)) as c:
        for path, everything in (("/api/accounts?min_posts=0&limit=3", "/api/accounts?min_posts=0&limit=5000"),
                                 ("/api/clusters?limit=3&sort=sightings", "/api/clusters?limit=1000&sort=sightings"),
                                 ("/api/clusters?limit=2", "/api/clusters?limit=1000")):
            want = [d["id"] for d in c.get(everything).json()]
            assert len(want) > 6
            got, nxt, pages = [], path, 0
            while nxt:
                r = c.get(nxt)
                assert r.status_code == 200 and isinstance(r.json(), list)
                got += [d["id"] for d in r.json()]
                pages += 1
                link = r.headers.get("link")
                if link is None:
                    assert "x-next-cursor" not in r.headers
                    break
                nxt = re.fullmatch(r'<(/api/[^>]+)>; rel="next"', link).group(1)
                assert nxt.endswith("cursor=" + r.headers["x-next-cursor"])
            assert got == want and pages > 2
        assert "link" not in c.get("/api/accounts?min_posts=0&limit=5000").headers
        cursor = c.get("/api/clusters?limit=2&sort=score").headers["x-next-cursor"]
        for bad in ("cursor=abc%21", "cursor=" + "A" * 3000, f"cursor={cursor}&sort=velocity", "cursor=W3RydWVd"):
            for path in ("/api/clusters?", "/api/accounts?"):
                r = c.get(path + bad)
                assert r.status_code == 422 and "cursor" in r.json()["error"], (path, bad)
        page = c.get("/accounts?min_posts=0&limit=3")
        nxt = re.search(r'<a href="([^"]+)" rel="next"', page.text).group(1).replace("&amp;", "&")
        second = c.get(nxt)
        assert second.status_code == 200 and 'id="first-page"' in second.text
        assert second.text.count('class="account-row"') == 3
        queue = c.get("/?limit=2")
        nxt = re.search(r'<a href="([^"]+)" rel="next"', queue.text).group(1).replace("&amp;", "&")
        assert c.get(nxt).text.count('class="cluster-row"') == 2


def test_a_search_past_its_time_limit_is_a_503_that_says_how_to_narrow_it(data, env):
    """findings.search_timeout_s bounds the store's side of a desk search:
    a scan over a big store stops there (503, JSON for the API, the error
    page for the page) instead of holding a worker thread; an ordinary
    search still answers under the same limit."""
    from tests.desk_support import bulk_sightings

    bulk_sightings(data / "findings.sqlite", 150_000)
    settings = make_settings(data)
    settings.findings.search_timeout_s = 0.05
    said = "search took longer than 0.05 s and was stopped; narrow it with since/until/platform"
    with client(settings) as c:
        assert [d["id"] for d in c.get("/api/clusters?verdict=no-evidence").json()] == ["c-photo"]
        # a bare text is also looked for in every account, handle and URL: with a letter
        # outside ASCII, by a Python function per row (~0.2 s over these 150,000)
        began = time.monotonic()
        r = c.get("/api/search?q=%C3%A4rger-nobody")
        assert r.status_code == 503 and r.json() == {"error": said + " (or account, hashtag)", "status": 503}
        assert time.monotonic() - began < 1.5
        assert c.get("/api/clusters?q=%C3%A4rger-nobody").status_code == 503  # the queue's text filter
        page = c.get("/search?q=%C3%A4rger-nobody")
        assert page.status_code == 503 and said in page.text
        assert [d["id"] for d in c.get("/api/search?q=real&platform=weibo").json()] == ["c-viral"]


def test_pages_render(data, env):
    with client(make_settings(data)) as c:
        q = c.get("/")
        assert q.status_code == 200 and q.text.count('class="cluster-row"') == 8
        assert "<svg class=\"spark\"" in q.text and "/thumb/" in q.text
        assert c.get("/?sort=bogus").status_code == 422
        cl = c.get("/clusters/c-viral")
        assert cl.status_code == 200 and 'id="members"' in cl.text and "https://example.org/c-viral/0" in cl.text
        assert 'id="verdict-form"' not in cl.text  # anonymous loopback reader: no form
        assert c.get("/clusters/nope").status_code == 404
        assert c.get("/banks").status_code == 200
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
        assert {"/api/clusters", "/api/clusters/{cluster_id}", "/api/accounts", "/api/clusters/{cluster_id}/verdict"} <= set(spec["paths"])


def test_security_headers(data, env):
    with client(make_settings(data)) as c:
        r = c.get("/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_answers_are_not_for_caches_and_api_docs_come_from_the_desk_itself(data, env):
    with client(make_settings(data)) as c:
        for path in ("/", "/api/clusters", "/clusters/c-viral", "/nope"):
            assert c.get(path).headers["cache-control"] == "no-store", path
        assert "cache-control" not in c.get("/static/desk.css").headers
        # Swagger UI came from a CDN, into the desk's origin, under 'unsafe-inline'
        docs = c.get("/docs")
        assert "cdn." not in docs.text and '<script src="/docs/assets/swagger-ui-bundle.js">' in docs.text
        csp = docs.headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "'sha256-" in csp and "https:" not in csp
        js = c.get("/docs/assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and "SwaggerUIBundle" in js.text[:5000] + js.text[-5000:]
        assert c.get("/redoc").status_code == 404  # it loaded its script from a CDN too
    add_user(data / "desk-users.json", "alice", "viewer", "correct horse battery")
    with client(make_settings(data, require_login_on_loopback=True)) as c:
        # the docs were open where reading was not
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/docs", follow_redirects=False).status_code == 303
        assert "/api/clusters" in c.get("/openapi.json", headers=VIEWER).json()["paths"]


def test_the_open_loopback_desk_takes_no_posts_from_other_sites(data, env):
    # Reading without a login on loopback trusted whoever posted: any page the
    # analyst had open could post pictures for it to decode, or a logout.
    with client(make_settings(data)) as c:
        for headers in ({"Sec-Fetch-Site": "cross-site", "Origin": "null"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "https://evil.example"}):  # the last: a browser without Sec-Fetch-Site
            r = c.post("/logout", data={"csrf": ""}, headers=headers, follow_redirects=False)
            assert r.status_code == 403 and "another site" in r.text, headers
        # its own page, as Chromium sends it under Referrer-Policy: no-referrer (Origin "null")
        for headers in ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, {"Origin": "http://127.0.0.1"}, {}):
            r = c.post("/logout", data={"csrf": ""}, headers=headers, follow_redirects=False)
            assert r.status_code == 303, headers  # the last: no browser, a script


def test_odd_query_values_are_422s_not_500s_nor_match_everything(data, env):
    with client(make_settings(data)) as c:
        # a Python int past SQLite's 64 bits ended in a bare 500
        r = c.get("/api/accounts?min_posts=9223372036854775808")
        assert r.status_code == 422 and "min_posts" in r.json()["error"]
        assert c.get("/accounts?min_posts=99999999999999999999999").status_code == 422
        # a NUL ended SQLite's LIKE pattern early: every cluster matched
        assert len(c.get("/api/clusters?q=zzzznomatch").json()) == 0
        for path in ("/api/clusters?q=%00", "/api/search?hashtag=%00", "/?q=a%01b"):
            r = c.get(path)
            assert r.status_code == 422 and "control characters" in r.text, path
        # q given, but nothing in it to search for: said so, not "give at least one of q, ..."
        r = c.get('/api/search?q=%22')
        assert r.status_code == 422 and r.json()["error"] == "bad request: q: has no word to search for (only punctuation or quotes)"
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "needs-review", "note": "a\u0000b"}, headers=EDITOR)
        assert r.status_code == 422 and "control characters" in r.json()["error"]
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "needs-review", "note": "line 1\n\tline 2"},
                   headers=EDITOR)
        assert r.status_code == 201
        # no trailing-slash redirect, which took its host from the Host header
        r = c.get("/api/clusters/", headers={"Host": "localhost"}, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers


def test_an_unexpected_error_is_the_desks_own_500_with_its_headers(data, env, monkeypatch):
    from streams.desk import source

    def broken(self, q, only=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(source.FindingsSource, "accounts_page", broken)
    with TestClient(create_app(make_settings(data)), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        r = c.get("/api/accounts")
        assert r.status_code == 500 and r.json() == {"error": "internal error; the desk's log has the details",
                                                     "status": 500}
        assert r.headers["x-content-type-options"] == "nosniff" and "frame-ancestors" in r.headers["content-security-policy"]
        page = c.get("/accounts")
        assert page.status_code == 500 and "internal error" in page.text and "disk on fire" not in page.text


def test_wrong_methods_say_which_are_allowed(data, env):
    with client(make_settings(data)) as c:
        for path in ("/api/clusters", "/"):
            r = c.put(path)
            assert r.status_code == 405 and r.headers["allow"] == "GET"
        r = c.get("/api/clusters/c-viral/verdict")
        assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["status"] == 405
        assert c.head("/healthz").status_code == 200  # uptime checkers send HEAD


def test_request_bodies_are_bounded(data, env):
    # A body that passes the guards is read whole (a login form's always is):
    # unbounded, a client could make the desk hold gigabytes.
    with client(make_settings(data)) as c:
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake", "note": "x" * 100_000}, headers=EDITOR)
        assert r.status_code == 413 and r.json() == {"error": "request body over 65536 bytes", "status": 413}
        assert r.headers["x-frame-options"] == "DENY"
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake", "note": "x" * 100_000})
        assert r.status_code == 401  # anonymous: refused before its body is read
        chunks = (b"x" * 10_000 for _ in range(20))  # no Content-Length: counted as it arrives
        r = c.post("/api/clusters/c-quiet/verdict", content=chunks, headers={"Content-Type": "application/json", **EDITOR})
        assert r.status_code == 413
        c.get("/login")  # the login cookie
        r = c.post("/login", data={"username": "alice", "password": "p" * 100_000, "csrf": "x"})
        assert r.status_code == 413 and "request body over" in r.text
        note = "é" * 4000  # the longest note, JSON-escaped, still fits
        r = c.post("/api/clusters/c-quiet/verdict", content=json.dumps({"verdict": "needs-review", "note": note}),
                   headers={"Content-Type": "application/json", **EDITOR})
        assert r.status_code == 201


# ------------------------------------------------------------------- auth
def test_writing_needs_an_editor(data, env):
    with client(make_settings(data)) as c:
        r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake"}, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})
        assert r.status_code == 401 and "invalid bearer token" in r.json()["error"]
        r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake"}, headers=VIEWER)
        assert r.status_code == 403 and "editor" in r.json()["error"]
        r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "needs-review", "note": "check"}, headers=EDITOR)
        assert r.status_code == 201 and r.json()["user"] == "ed"


def test_reading_needs_login_off_loopback(data, env):
    with client(make_settings(data), host="0.0.0.0") as c:
        assert c.get("/api/clusters").status_code == 401
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert c.get("/api/clusters", headers=VIEWER).status_code == 200
        assert "strict-transport-security" in c.get("/login").headers
    with client(make_settings(data, require_login_on_loopback=True)) as c:
        assert c.get("/api/accounts").status_code == 401
        assert c.get("/api/clusters/c-viral", headers=VIEWER).status_code == 200


def test_a_loopback_desk_behind_a_proxy_is_not_read_without_a_login(data, env):
    """A reverse proxy on the same machine (nginx's proxy_pass to 127.0.0.1)
    sends every client's request from 127.0.0.1 with Host: 127.0.0.1: the
    open loopback desk answered anyone on the internet, trusted_proxies set
    or not. Any proxy header, a client address off this machine, or
    desk.trusted_proxies itself now asks for a login."""
    add_user(data / "desk-users.json", "alice", "viewer", "correct horse battery")
    with client(make_settings(data)) as c:
        assert c.get("/api/clusters").status_code == 200  # this machine's own browser or script: open as before
        for headers in ({"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7;proto=https"},
                        {"X-Forwarded-Proto": "https"}, {"X-Real-IP": "203.0.113.7"}):
            r = c.get("/api/clusters", headers=headers)
            assert r.status_code == 401 and "reverse proxy" in r.json()["error"], headers
            assert c.get("/", headers=headers, follow_redirects=False).headers["location"].startswith("/login")
            assert c.get("/api/clusters", headers={**headers, **VIEWER}).status_code == 200
    # the client's address as uvicorn gives it after a trusted proxy's X-Forwarded-For
    with TestClient(create_app(make_settings(data), host="127.0.0.1"), base_url="http://127.0.0.1",
                    client=("203.0.113.7", 4000)) as c:
        r = c.get("/api/clusters/c-viral")
        assert r.status_code == 401 and "203.0.113.7" in r.json()["error"]
        assert c.get("/openapi.json").status_code == 401
    with client(make_settings(data, trusted_proxies=["127.0.0.1"])) as c:
        r = c.get("/api/clusters")  # a proxy that adds no header at all
        assert r.status_code == 401 and "trusted_proxies" in r.json()["error"]
        assert c.get("/api/clusters", headers=VIEWER).status_code == 200


def test_a_login_over_https_sets_a_secure_cookie_and_hsts(data, env):
    # The session cookie was Secure, and HSTS sent, only off loopback: behind a
    # TLS proxy on loopback the cookie could leak over a plain-http link.
    add_user(data / "desk-users.json", "alice", "viewer", "correct horse battery")

    def cookies(r) -> dict[str, str]:
        return {h.split("=", 1)[0]: h for h in r.headers.get_list("set-cookie")}

    with TestClient(create_app(make_settings(data), host="127.0.0.1"), base_url="https://127.0.0.1") as c:
        page = c.get("/login")
        assert "secure" in cookies(page)["dw_login_csrf"].lower()
        assert page.headers["strict-transport-security"] == "max-age=31536000"
        r = _login(c, "alice", "correct horse battery")
        assert r.status_code == 303 and "secure" in cookies(r)["dw_session"].lower()
        assert "strict-transport-security" in r.headers
        assert "strict-transport-security" in c.get("/api/clusters").headers
    with client(make_settings(data, public_url="https://desk.example.org")) as c:  # http here, https for its people
        page = c.get("/login")
        assert "secure" in cookies(page)["dw_login_csrf"].lower() and "strict-transport-security" in page.headers
        token = page.text.split('name="csrf" value="')[1].split('"')[0]
        # a browser sends a Secure cookie to http://127.0.0.1 (a trustworthy origin); the test client does not
        r = c.post("/login", data={"username": "alice", "password": "correct horse battery", "csrf": token},
                   headers={"Cookie": f"dw_login_csrf={token}"}, follow_redirects=False)
        assert r.status_code == 303 and "secure" in cookies(r)["dw_session"].lower()
    with client(make_settings(data)) as c:  # plain http on loopback: as before
        r = _login(c, "alice", "correct horse battery")
        assert r.status_code == 303 and "secure" not in cookies(r)["dw_session"].lower()
        assert "strict-transport-security" not in c.get("/api/clusters").headers


def test_the_401_says_why_reading_needs_a_login(data, env):
    # On loopback with require_login_on_loopback the 401 said "this desk is not on a loopback address".
    with client(make_settings(data, require_login_on_loopback=True)) as c:
        error = c.get("/api/clusters").json()["error"]
        assert "require_login_on_loopback" in error and "not on a loopback" not in error
    with client(make_settings(data), host="0.0.0.0") as c:
        error = c.get("/api/clusters").json()["error"]
        assert "not on a loopback address" in error and "require_login_on_loopback" not in error


MALFORMED = {"content": "[[[", "headers": {"Content-Type": "application/json"}}


def test_guards_answer_before_any_body_is_read(data, env):
    """FastAPI reads, parses and validates a body before it runs dependencies:
    an anonymous client got 422 (with the API's schema) for a malformed body,
    and the desk parsed bodies for anyone."""
    verdict = "/api/clusters/c-quiet/verdict"
    with client(make_settings(data)) as c:
        r = c.post(verdict, **MALFORMED)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": "an editor login or bearer token is required to record verdicts", "status": 401}
        assert c.post(verdict, json={"verdict": "maybe", "extra": 1}).status_code == 401
        assert c.post(verdict, content=b"x" * 100_000, headers={"Content-Type": "application/json"}).status_code == 401
        r = c.post(verdict, content="[[[", headers={"Content-Type": "application/json", **VIEWER})
        assert r.status_code == 403 and "viewer" in r.json()["error"] and "detail" not in r.json()
        wrong = {"Authorization": "Bearer wrong-token-xxxxxxxx"}
        r = c.post(verdict, content="[[[", headers={"Content-Type": "application/json", **wrong})
        assert r.status_code == 401 and "invalid bearer token" in r.json()["error"]
        # an editor still gets the details
        r = c.post(verdict, content="[[[", headers={"Content-Type": "application/json", **EDITOR})
        assert r.status_code == 422 and r.json()["error"].startswith("bad request: body: not valid JSON")
        assert r.json()["detail"][0]["loc"] == ["body", 3]
        r = c.post(verdict, json={"verdict": "maybe"}, headers=EDITOR)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "verdict"]
        # the form routes: no credentials, a wrong role, a missing CSRF token come before the fields
        r = c.post("/clusters/c-quiet/verdict", data={}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/clusters/c-quiet"  # a page: log in
        r = c.post("/login", data={})  # no login cookie: a cross-site post
        assert r.status_code == 403 and "CSRF" in r.text
    with client(make_settings(data, require_login_on_loopback=True)) as c:
        r = c.get("/api/clusters?sort=nope&limit=abc")  # queries too: the guard first
        assert r.status_code == 401 and "detail" not in r.json()
        assert c.get("/api/clusters?sort=nope", headers=VIEWER).status_code == 422


def test_sessions_meet_the_guards_before_their_bodies_are_read(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    add_user(data / "desk-users.json", "bob", "viewer", "another long password")
    verdict = "/api/clusters/c-quiet/verdict"
    with client(make_settings(data)) as c:
        _login(c, "bob", "another long password")
        r = c.post(verdict, **MALFORMED)
        assert r.status_code == 403 and "bob is a viewer" in r.json()["error"]
        r = c.post("/clusters/c-quiet/verdict", data={}, follow_redirects=False)
        assert r.status_code == 403 and "bob is a viewer" in r.text
    with client(make_settings(data)) as c:
        _login(c, "alice", "correct horse battery")
        csrf = c.get("/clusters/c-quiet").text.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        r = c.post(verdict, **MALFORMED)  # no X-CSRF-Token
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
        r = c.post(verdict, json={"verdict": "fake"}, headers={"X-CSRF-Token": "é".encode("latin-1")})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]  # not a 500 from compare_digest
        r = c.post(verdict, content="[[[", headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})
        assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
        r = c.post("/clusters/c-quiet/verdict", data={"note": "x"}, follow_redirects=False)  # no token, no verdict
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post("/clusters/c-quiet/verdict", data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 422 and "verdict" in r.text
        c.get("/login")  # a login cookie, and a form with another token and no fields
        r = c.post("/login", data={"csrf": "forged"})
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post("/login", data={"username": "alice", "password": "correct horse battery", "csrf": "é"})
        assert r.status_code == 403 and "CSRF" in r.text


def test_bad_token_config_is_refused(data, monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", "admin:root:short")
    with pytest.raises(ValueError, match="shorter than 16"):
        create_app(make_settings(data))


def test_passwords_are_scrypt_hashed(tmp_path):
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$32768$8$1$") and "correct" not in stored
    assert verify_password("correct horse battery", stored) and not verify_password("wrong", stored)
    add_user(tmp_path / "users.json", "alice", "editor", "correct horse battery")
    doc = json.loads((tmp_path / "users.json").read_text())
    assert doc["users"][0]["password"].startswith("scrypt$")
    assert (tmp_path / "users.json").stat().st_mode & 0o077 == 0


def _login(c: TestClient, user: str, password: str):
    page = c.get("/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    return c.post("/login", data={"username": user, "password": password, "csrf": csrf, "next": "/"}, follow_redirects=False)


def test_logins_past_the_waiting_bound_are_a_503_not_a_queue_without_end(data, env):
    # the password pool's queue has no bound of its own: guesses from many addresses outran its 2-4 threads
    from streams.desk.state import MAX_WAITING_LOGINS

    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data)) as c:
        desk = c.app.state.desk
        desk.logins_waiting = MAX_WAITING_LOGINS  # as many checks in the pool or queued as may be
        r = _login(c, "alice", "correct horse battery")
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "at once" in r.text
        assert desk.limiter.attempt("testclient", "alice")[1] is not None  # not charged to her rate limit
        desk.logins_waiting = 0
        assert _login(c, "alice", "correct horse battery").status_code == 303
        assert desk.logins_waiting == 0  # every check gives its place back


def test_session_login_csrf_and_logout(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    add_user(data / "desk-users.json", "bob", "viewer", "another long password")
    with client(make_settings(data)) as c:
        assert _login(c, "alice", "wrong password").status_code == 401
        r = _login(c, "alice", "correct horse battery")
        assert r.status_code == 303 and "dw_session" in r.cookies
        page = c.get("/clusters/c-quiet")
        assert 'id="verdict-form"' in page.text and "alice (editor)" in page.text
        csrf = page.text.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        # a form without (or with a wrong) CSRF token is refused
        r = c.post("/clusters/c-quiet/verdict", data={"verdict": "fake", "note": "x"}, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post("/clusters/c-quiet/verdict", data={"verdict": "fake", "csrf": "forged"}, follow_redirects=False)
        assert r.status_code == 403
        # the JSON API with a session cookie needs the token in a header
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
        r = c.post("/clusters/c-quiet/verdict", data={"verdict": "fake", "note": "generator artefacts", "csrf": csrf},
                   follow_redirects=False)
        assert r.status_code == 303
        hist = c.get("/api/clusters/c-quiet").json()["verdict_history"]
        assert [(h["user"], h["verdict"], h["note"]) for h in hist] == [("alice", "fake", "generator artefacts")]
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "needs-review"}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201
        c.post("/logout", data={"csrf": csrf})
        assert c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"}, headers={"X-CSRF-Token": csrf}).status_code == 401
    with client(make_settings(data)) as c:
        _login(c, "bob", "another long password")
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"})
        assert r.status_code == 403 and "viewer" in r.json()["error"]
        # login form CSRF: a cross-site POST without the login cookie is refused
        c.cookies.clear()
        r = c.post("/login", data={"username": "bob", "password": "another long password", "csrf": "x"})
        assert r.status_code == 403


def test_a_write_a_browser_marks_as_from_another_site_is_refused_before_its_body_is_read(data, env):
    # A form's CSRF token is in its body; the browser's Sec-Fetch-Site header
    # says where the request comes from before any of the body is read.
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data)) as c:
        _login(c, "alice", "correct horse battery")
        page = c.get("/clusters/c-quiet", headers={"Sec-Fetch-Site": "cross-site"})
        assert page.status_code == 200  # reads stay open to links from elsewhere
        csrf = page.text.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        form = {"verdict": "fake", "note": "x", "csrf": csrf}
        for site in ("cross-site", "same-site"):
            r = c.post("/clusters/c-quiet/verdict", data=form, headers={"Sec-Fetch-Site": site},
                       follow_redirects=False)
            assert r.status_code == 403 and "another site" in r.text, (site, r.text)
            r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"},
                       headers={"Sec-Fetch-Site": site, "X-CSRF-Token": csrf})
            assert r.status_code == 403 and "another site" in r.json()["error"]
        assert c.get("/api/clusters/c-quiet").json()["verdict_history"] == []
        r = c.post("/clusters/c-quiet/verdict", data=form, headers={"Sec-Fetch-Site": "same-origin"},
                   follow_redirects=False)
        assert r.status_code == 303
        # the login form too
        c.cookies.clear()
        page = c.get("/login")
        login_csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        r = c.post("/login", data={"username": "alice", "password": "correct horse battery", "csrf": login_csrf},
                   headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False)
        assert r.status_code == 403 and "dw_session" not in r.cookies
    # a bearer token is not ambient: a script's call is not refused by it
    with client(make_settings(data)) as c:
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "needs-review"},
                   headers={"Authorization": f"Bearer {EDITOR_TOKEN}", "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 201, r.text


def test_login_is_rate_limited(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data, login_failures_per_minute=3)) as c:
        for _ in range(3):
            assert _login(c, "alice", "nope").status_code == 401
        r = _login(c, "alice", "correct horse battery")  # even the right password waits now
        assert r.status_code == 429 and "too many failed logins" in r.text
        assert 1 <= int(r.headers["retry-after"]) <= 60


def test_parallel_login_guesses_are_rate_limited_too(data, env):
    # Each guess costs a password hash: fired together, none had failed yet when
    # the others were checked against the limit, so every one of them was tried.
    from concurrent.futures import ThreadPoolExecutor

    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data, login_failures_per_minute=3)) as c:
        page = c.get("/login")
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        guess = lambda i: c.post("/login", data={"username": "alice", "password": f"guess {i}", "csrf": csrf}).status_code
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(guess, range(12)))
    assert sorted(codes) == [401] * 3 + [429] * 9


def test_a_login_form_open_in_another_tab_still_logs_in(data, env):
    # Every login page and every failed login set a new CSRF cookie: the form
    # of a tab opened earlier (or a second try already on its way) then failed
    # its CSRF check with 403, and parallel guesses saw 403 among the 429s.
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data)) as c:
        token = lambda page: page.text.split('name="csrf" value="')[1].split('"')[0]
        first, second = token(c.get("/login")), token(c.get("/login"))
        r = c.post("/login", data={"username": "alice", "password": "wrong", "csrf": first})
        assert r.status_code == 401 and token(r) == first
        r = c.post("/login", data={"username": "alice", "password": "correct horse battery", "csrf": second},
                   follow_redirects=False)
        assert r.status_code == 303 and "dw_session" in r.cookies
        c.cookies.set("dw_login_csrf", "not-a-token")  # anything else is replaced
        assert token(c.get("/login")) != "not-a-token"


def test_sessions_follow_the_users_file(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data)) as c:
        _login(c, "alice", "correct horse battery")
        page = c.get("/clusters/c-quiet")
        csrf = page.text.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        verdict = lambda: c.post("/api/clusters/c-quiet/verdict", json={"verdict": "needs-review"}, headers={"X-CSRF-Token": csrf})
        assert verdict().status_code == 201
        time.sleep(0.01)  # a new mtime for the users file
        add_user(data / "desk-users.json", "alice", "viewer", "correct horse battery")  # demoted
        r = verdict()
        assert r.status_code == 403 and "alice is a viewer" in r.json()["error"]
        time.sleep(0.01)
        (data / "desk-users.json").write_text("{broken")  # broken by hand while the desk runs
        r = verdict()  # the users read before still decide: not a 500 for every request
        assert r.status_code == 403 and "alice is a viewer" in r.json()["error"]
        assert c.get("/clusters/c-quiet").status_code == 200
        time.sleep(0.01)
        (data / "desk-users.json").write_text('{"users": []}')  # removed
        assert verdict().status_code == 401
        time.sleep(0.01)
        add_user(data / "desk-users.json", "alice", "editor", "a new password")  # the name given to someone again
        assert verdict().status_code == 401  # the old session does not come back with it


def test_a_new_password_ends_the_sessions_opened_with_the_old_one(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data)) as c:
        _login(c, "alice", "correct horse battery")
        csrf = c.get("/clusters/c-quiet").text.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        verdict = lambda: c.post("/api/clusters/c-quiet/verdict", json={"verdict": "needs-review"}, headers={"X-CSRF-Token": csrf})
        assert verdict().status_code == 201
        time.sleep(0.01)
        add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")  # the same password again
        assert verdict().status_code == 201
        time.sleep(0.01)
        add_user(data / "desk-users.json", "alice", "editor", "it may have leaked")  # reset
        assert verdict().status_code == 401
        _login(c, "alice", "it may have leaked")
        csrf = c.get("/clusters/c-quiet").text.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        assert verdict().status_code == 201


def test_a_broken_users_file_is_refused_not_rewritten(tmp_path):
    path = tmp_path / "desk-users.json"
    for broken in ("{bad", "[]", '{"users": [{"name": "x"}]}'):
        path.write_text(broken)
        with pytest.raises(ValueError, match=f"users file {path} is not valid"):
            add_user(path, "alice", "editor", "correct horse battery")
        assert path.read_text() == broken


def test_open_redirect_is_refused(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data)) as c:
        page = c.get("/login")
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        r = c.post("/login", data={"username": "alice", "password": "correct horse battery", "csrf": csrf,
                                   "next": "//evil.example/"}, follow_redirects=False)
        assert r.headers["location"] == "/"


# --------------------------------------------------------------- verdicts
def test_fake_verdict_feeds_the_bank_rescoring_matches_and_alerting_once(data, env, webhook):
    url, got = webhook
    store = open_store(data)
    blobs = DirectoryBlobStore(data / "blobs")
    # the same picture as c-quiet at another size, quality and with no AI metadata: its own cluster
    make_cluster(store, blobs, "c-repost", 2, posts=3, ai=False, platforms=("bluesky",), size=(320, 240))
    make_cluster(store, blobs, "c-other", 77, posts=2, ai=False, platforms=("bluesky",))
    store.close()
    settings = make_settings(data)
    settings.alerts.webhooks = [WebhookSettings(url=url, retries=0)]
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    with client(settings) as c:
        before = c.get("/api/clusters/c-repost").json()
        assert before["verdict"] == "no-evidence"
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake", "note": "traced to a generator"}, headers=EDITOR)
        assert r.status_code == 201
        rec = r.json()
        assert rec["cluster_state"]["fake_score"] == 0.95 and rec["cluster_state"]["verdict"] == "likely-ai"
        assert rec["effects"]["bank"] == "desk-fake" and rec["effects"]["bank_entries_added"] == 1
        assert set(rec["effects"]["clusters"]) == {"c-quiet", "c-repost"}  # retroactive: the matching cluster
        after = c.get("/api/clusters/c-repost").json()
        assert after["verdict"] == "likely-ai" and after["fake_score"] > 0.9
        assert after["desk"]["source_cluster"] == "c-quiet" and after["desk"]["stream_verdict"] == "no-evidence"
        assert c.get("/api/clusters/c-other").json()["verdict"] == "no-evidence"
        assert sorted(d["id"] for d in c.get("/api/clusters?verdict=fake").json()) == ["c-quiet", "c-repost"]
        banks = {b["name"]: b for b in c.get("/api/banks").json()}
        assert banks["desk-fake"]["entries"] == 1 and banks["desk-fake"]["verdict"] == "fake"
        # same verdict again: a new audit row, no new bank entry, no duplicate alert
        r2 = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake", "note": "second look"}, headers=EDITOR).json()
        assert r2["effects"]["bank_entries_added"] == 0
        alerts = [a for a in open_store(data).alerts() if a.rule == "desk-verdict-fake"]
        assert sorted(a.alert_id for a in alerts) == ["c-quiet:desk-fake", "c-repost:desk-fake"]
        # a subscriber can open the posts and knows since when and where it spreads
        repost = next(a for a in alerts if a.cluster_id == "c-repost")
        assert [p.post_url for p in repost.sample_posts] == [f"https://example.org/c-repost/{i}" for i in range(3)]
        assert repost.platforms == ["bluesky"] and repost.first_seen == repost.sample_posts[0].posted_at
        assert repost.last_seen == repost.sample_posts[-1].posted_at
        hooks = [(h, b) for h, b in got if h[DELIVERY_HEADER].endswith(":desk-fake")]
        assert sorted(h[DELIVERY_HEADER] for h, _ in hooks) == ["c-quiet:desk-fake", "c-repost:desk-fake"]
        for h, body in hooks:
            assert verify(WEBHOOK_SECRET.encode(), h[TIMESTAMP_HEADER], body, h[SIGNATURE_HEADER])
        hist = c.get("/api/clusters/c-quiet").json()["verdict_history"]
        assert [h["note"] for h in hist] == ["traced to a generator", "second look"]


def test_a_fake_verdict_does_not_judge_look_alike_pictures(data, env):
    """A stored member the hashes nominate is judged with the picture only when
    its own pixels (from the blob store) agree: one prompt's other seed, a hash
    neighbour, stays unjudged, while a repost of the picture is judged."""
    from tests.test_cluster_verify import _lookalikes

    a, b = _lookalikes()
    store = open_store(data)
    blobs = DirectoryBlobStore(data / "blobs")
    make_cluster(store, blobs, "c-seed1", 0, posts=2, ai=True, img=a)
    make_cluster(store, blobs, "c-seed1-repost", 0, posts=2, ai=False, img=a.resize((240, 180)))
    make_cluster(store, blobs, "c-seed2", 0, posts=2, ai=False, img=b)
    store.close()
    with client(make_settings(data)) as c:
        r = c.post("/api/clusters/c-seed1/verdict", json={"verdict": "fake"}, headers=EDITOR)
        assert r.status_code == 201
        assert set(r.json()["effects"]["clusters"]) == {"c-seed1", "c-seed1-repost"}
        assert c.get("/api/clusters/c-seed2").json()["verdict"] == "no-evidence"
        assert c.get("/api/clusters/c-seed1-repost").json()["verdict"] == "likely-ai"


def test_authentic_verdict_suppresses_and_withdraws_from_the_fake_bank(backend, env):
    data, url = backend
    with client(make_settings(data, url)) as c:
        c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake"}, headers=EDITOR)
        r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "authentic", "note": "agency photo"}, headers=EDITOR)
        assert r.json()["effects"]["withdrawn"] == 1
        d = c.get("/api/clusters/c-viral").json()
        # re-scored with the verdict as decisive evidence against AI (the generator chunk still counts), suppressed
        assert d["fake_score"] < d["desk"]["stream_fake_score"] and "desk verdict authentic" in d["suppressed"]
        assert d["desk"]["verdict"] == "authentic"
        banks = {b["name"]: b["entries"] for b in c.get("/api/banks").json()}
        assert banks == {"desk-fake": 0, "desk-authentic": 1}
        assert [h["verdict"] for h in d["verdict_history"]] == ["fake", "authentic"]
        page = c.get("/clusters/c-viral")
        assert "desk-authentic" in page.text.split('id="bank-entries"')[1]


def test_an_authentic_verdict_on_an_alerted_picture_tells_the_subscribers_once(data, env, webhook):
    """Subscribers told a picture was a spreading fake (by the stream's alert,
    or by an earlier ``fake`` verdict) never learned when the desk found it
    authentic: they went on treating an agency photo as fake. One correction
    per alerted cluster, ``<cluster>:desk-authentic``; none for a cluster
    nobody was alerted about, none again for the same verdict."""
    url, got = webhook
    settings = make_settings(data)
    settings.alerts.webhooks = [WebhookSettings(url=url, retries=0, summary=True)]
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    with client(settings) as c:
        assert c.get("/api/clusters/c-viral").json()["alert_level"] >= 1  # the stream alerted on it
        assert c.get("/api/clusters/c-quiet").json()["alert_level"] == 0
        for cid in ("c-viral", "c-viral", "c-quiet"):
            r = c.post(f"/api/clusters/{cid}/verdict", json={"verdict": "authentic", "note": "agency photo"},
                       headers=EDITOR)
            assert r.status_code == 201, r.text
        # nobody was told c-quiet was fake ... until the desk said so, then took it back
        for verdict in ("fake", "authentic"):
            c.post("/api/clusters/c-quiet/verdict", json={"verdict": verdict}, headers=EDITOR)
    corrections = [a for a in open_store(data).alerts() if a.rule == "desk-verdict-authentic"]
    assert sorted(a.alert_id for a in corrections) == ["c-quiet:desk-authentic", "c-viral:desk-authentic"]
    viral = next(a for a in corrections if a.cluster_id == "c-viral")
    assert viral.verdict == "no-evidence" and viral.evidence[0].detector == "desk:verdict"
    assert viral.evidence[0].data["verdict"] == "authentic" and "agency photo" in viral.evidence[0].detail
    sent = {h[DELIVERY_HEADER]: json.loads(b) for h, b in got}
    assert {k for k in sent if k.endswith(":desk-authentic")} == {"c-viral:desk-authentic", "c-quiet:desk-authentic"}
    assert sent["c-viral:desk-authentic"]["summary"].startswith("deepwatch correction (level")


def test_what_subscribers_heard_last_is_the_desks_last_word(data, env, webhook):
    """Two sequences left subscribers with the wrong last word: fake, then
    authentic, then fake again sent nothing the third time (the stable id
    ``c:desk-fake`` was settled: a redelivery to the sinks), so the last word
    was "authentic"; and a fake verdict that covered a matching cluster,
    then authentic on that cluster, corrected nothing (only the judged
    cluster's own history was read)."""
    url, got = webhook
    store = open_store(data)
    # c-quiet's picture at another size: judged with it (the retroactive match)
    make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-repost", 2, posts=3, ai=False,
                 platforms=("bluesky",), size=(320, 240))
    store.close()
    settings = make_settings(data)
    settings.alerts.webhooks = [WebhookSettings(url=url, retries=0)]
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    with client(settings) as c:
        def verdict(cid: str, v: str) -> list[str]:
            r = c.post(f"/api/clusters/{cid}/verdict", json={"verdict": v}, headers=EDITOR)
            assert r.status_code == 201, r.text
            return sorted(r.json()["effects"]["alerts"])

        assert verdict("c-quiet", "fake") == ["c-quiet:desk-fake", "c-repost:desk-fake"]
        # authentic on the cluster the fake verdict covered: both are corrected
        assert verdict("c-repost", "authentic") == ["c-quiet:desk-authentic", "c-repost:desk-authentic"]
        assert verdict("c-repost", "authentic") == ["c-quiet:desk-authentic", "c-repost:desk-authentic"]
        third = verdict("c-quiet", "fake")  # turned back: said again, under ids of their own
        assert [a.rsplit(":", 1)[0] for a in third] == ["c-quiet:desk-fake", "c-repost:desk-fake"]
        assert all(a.rsplit(":", 1)[1].isdigit() for a in third)
    delivered = [h[DELIVERY_HEADER] for h, _ in got if ":desk-" in h[DELIVERY_HEADER]]  # (an account alert too)
    assert len(delivered) == len(set(delivered)) == 6  # each message once: 2 fake, 2 corrections, 2 fake again
    last = {}
    for d in delivered:
        last[d.split(":")[0]] = d.split(":")[1]
    assert last == {"c-quiet": "desk-fake", "c-repost": "desk-fake"}


def test_the_desk_alerts_sent_carry_the_verdict_that_raised_them(tmp_path):
    """What a cluster's subscribers were told last is read from the audit
    trail as a typed row (the verdict that raised each alert), not parsed back
    out of the alert's id: alerts a verdict's effects list, and a ``fake``
    verdict on the cluster whose effects were never recorded."""
    from streams.desk.deskdb import DeskDB

    db = DeskDB(tmp_path / "desk.sqlite")
    try:
        fake = db.add_verdict("c-quiet", "fake", "", "ed", "editor", {})
        db.record_effects(fake.verdict_id, {"alerts": ["c-quiet:desk-fake", "c-repost:desk-fake"]})
        review = db.add_verdict("c-quiet", "needs-review", "", "ed", "editor", {})
        db.record_effects(review.verdict_id, {"alerts": []})
        auth = db.add_verdict("c-repost", "authentic", "", "ed", "editor", {})
        db.record_effects(auth.verdict_id, {"alerts": ["c-quiet:desk-authentic", "c-repost:desk-authentic"]})
        unrecorded = db.add_verdict("c-quiet", "fake", "", "ed", "editor", {})  # its effects never recorded
        sent = db.desk_alerts_sent("c-quiet")
        assert [(a.alert_id, a.verdict, a.verdict_id) for a in sent] == [
            ("c-quiet:desk-fake", "fake", fake.verdict_id),
            ("c-quiet:desk-authentic", "authentic", auth.verdict_id),
            ("c-quiet:desk-fake", "fake", unrecorded.verdict_id)]
        assert [(a.alert_id, a.verdict) for a in db.desk_alerts_sent("c-repost", before=unrecorded.verdict_id)] == [
            ("c-repost:desk-fake", "fake"), ("c-repost:desk-authentic", "authentic")]
        assert db.desk_alerts_sent("c-quiet", before=fake.verdict_id) == []
    finally:
        db.close()


def test_a_fake_verdict_whose_effects_were_not_recorded_is_still_corrected(data, env, webhook, monkeypatch):
    """The store failed after a fake verdict's alert went out, before its
    effects were recorded: the alert was never on record, so a later
    authentic verdict corrected nothing. The answer says the verdict was
    recorded (no Retry-After: sent again it is a second verdict)."""
    import sqlite3 as sqlite

    from streams.desk.deskdb import DeskDB

    url, got = webhook
    settings = make_settings(data)
    settings.alerts.webhooks = [WebhookSettings(url=url, retries=0)]
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    real = DeskDB.record_effects
    calls = []

    def failing_once(self, verdict_id, effects):
        calls.append(verdict_id)
        if len(calls) == 1:
            raise sqlite.OperationalError("database is locked")
        return real(self, verdict_id, effects)

    monkeypatch.setattr(DeskDB, "record_effects", failing_once)
    with client(settings) as c:
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"}, headers=EDITOR)
        assert r.status_code == 503 and "Retry-After" not in r.headers, r.text
        assert "was recorded" in r.json()["error"]
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "authentic"}, headers=EDITOR)
        assert r.status_code == 201 and r.json()["effects"]["alerts"] == ["c-quiet:desk-authentic"], r.text
    sent = [h[DELIVERY_HEADER] for h, _ in got if ":desk-" in h[DELIVERY_HEADER]]
    assert sent == ["c-quiet:desk-fake", "c-quiet:desk-authentic"]


def test_a_correction_is_said_as_one_and_not_counted_as_an_alert_going_viral(data, env, caplog):
    from streams import metrics

    def raised() -> float:
        return sum(s.value for m in metrics.ALERTS.collect() for s in m.samples if s.name.endswith("_total"))

    before = raised()
    with client(make_settings(data)) as c, caplog.at_level("WARNING", logger="deepwatch.alerts"):
        c.post("/api/clusters/c-viral/verdict", json={"verdict": "authentic", "note": "agency photo"}, headers=EDITOR)
    stored = [a.rule for a in open_store(data).alerts()]
    assert "desk-verdict-authentic" in stored
    # every alert the desk stored counted but the correction (the start-up account check may raise one);
    # the Grafana rule "deepwatch raised an alert" reads this counter
    assert raised() - before == sum(1 for r in stored if r.startswith(("desk-", "account-"))) - 1
    lines = [r.getMessage() for r in caplog.records if r.name == "deepwatch.alerts"]
    assert any(m.startswith("CORRECTION cluster c-viral: the desk found it authentic") for m in lines), lines
    assert not any(m.startswith("ALERT") and "cluster c-viral" in m for m in lines)


def test_audit_trail_is_append_only(data, env):
    with client(make_settings(data)) as c:
        c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake"}, headers=EDITOR)
    db = sqlite3.connect(data / "desk.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE verdicts SET verdict='authentic'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM verdicts")
    db.close()


def test_account_alert_goes_through_the_alert_path_once(data, env, webhook):
    url, got = webhook
    settings = make_settings(data)
    settings.alerts.webhooks = [WebhookSettings(url=url, retries=0)]
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    with client(settings) as c:
        from streams.desk.accounts import check_accounts

        desk = c.app.state.desk
        # the startup check may or may not have run yet: across it and two more, one alert
        raised = [c.portal.call(check_accounts, settings, desk.source, desk.db, desk.alerts) for _ in range(2)]
        assert sum(len(r) for r in raised) <= 1 and raised[1] == []
    alerts = [a for a in open_store(data).alerts() if a.rule == "account-ai-share"]
    assert [a.alert_id for a in alerts] == ["account:persona1:1"]
    assert "5 likely-AI pictures of 5" in alerts[0].evidence[0].detail
    posts = alerts[0].sample_posts  # the account's latest three, earliest first
    assert len(posts) == 3 and {p.account_id for p in posts} == {"persona1"}
    assert [p.posted_at for p in posts] == sorted(p.posted_at for p in posts) and posts[-1].posted_at == alerts[0].last_seen
    assert alerts[0].platforms
    assert [h[DELIVERY_HEADER] for h, _ in got] == ["account:persona1:1"]


def test_alert_webhooks_link_the_desk_pages_they_are_about(data, env, webhook):
    """With desk.public_url set, each alert's webhook body carries "desk_url";
    under the desk's address it opens the page of the alert's cluster (a
    verdict's alert) or account (an account alert)."""
    url, got = webhook
    public = "https://desk.example.org/desk"  # behind a proxy, under a path
    settings = make_settings(data, public_url=public)
    settings.alerts.webhooks = [WebhookSettings(url=url, retries=0)]
    settings.alerts.allow_private_webhooks = True  # the receiver listens on loopback
    with client(settings) as c:
        from streams.desk.accounts import check_accounts

        desk = c.app.state.desk
        assert c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"}, headers=EDITOR).status_code == 201
        c.portal.call(check_accounts, settings, desk.source, desk.db, desk.alerts)
        deadline = time.monotonic() + 10  # the start-up check may have raised the account alert on its own
        while not any(h[DELIVERY_HEADER] == "account:persona1:1" for h, _ in got) and time.monotonic() < deadline:
            time.sleep(0.05)
        links = {}
        for h, body in list(got):
            assert verify(WEBHOOK_SECRET.encode(), h[TIMESTAMP_HEADER], body, h[SIGNATURE_HEADER])
            links[h[DELIVERY_HEADER]] = json.loads(body)["desk_url"]
        assert links["c-quiet:desk-fake"] == f"{public}/clusters/c-quiet"
        assert links["account:persona1:1"] == f"{public}/accounts/persona1"
        for alert_id, link in links.items():
            page = c.get(link.removeprefix(public))
            assert page.status_code == 200 and "text/html" in page.headers["content-type"], alert_id


# ------------------------------------------------------------- thumbnails
def test_thumbnails_are_resized_copies_of_members_only(data, env):
    from PIL import Image
    import io

    from tests.desk_support import jpeg
    from tests.support import picture

    stranger = DirectoryBlobStore(data / "blobs").put(jpeg(picture(999)))  # stored, but in no cluster
    with client(make_settings(data)) as c:
        member = c.get("/api/clusters/c-viral").json()["members"][0]["sha256"]
        r = c.get(f"/thumb/{member}?px=64")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content != (data / "blobs" / member[:2] / member[2:4] / member).read_bytes()
        assert max(Image.open(io.BytesIO(r.content)).size) <= 64
        assert c.get("/thumb/not-a-sha").status_code == 400
        assert c.get("/thumb/" + "0" * 64).status_code == 404
        r = c.get("/thumb/" + stranger)
        assert r.status_code == 404 and "no cluster member" in r.json()["error"]
        assert c.get(f"/thumb/{member}?px=4000").status_code == 422


def test_answers_are_for_the_desks_own_origin_only(data, env):
    # A page of another local origin probed /thumb/{sha} with <img>: it loaded
    # for a member and failed otherwise, telling which pictures the desk holds.
    with client(make_settings(data)) as c:
        member = c.get("/api/clusters/c-viral").json()["members"][0]["sha256"]
        for path in (f"/thumb/{member}?px=64", "/thumb/" + "0" * 64, "/api/clusters", "/api/accounts/persona1", "/",
                     "/static/desk.css"):
            r = c.get(path)
            assert r.headers["cross-origin-resource-policy"] == "same-origin", path


def test_thumbnail_cache_is_bounded(tmp_path):
    from streams.desk.thumbs import Thumbnails
    from tests.desk_support import jpeg
    from tests.support import picture

    blobs = DirectoryBlobStore(tmp_path / "blobs")
    shas = [blobs.put(jpeg(picture(i, (300, 200)))) for i in range(12)]
    t = Thumbnails(tmp_path / "blobs", tmp_path / "cache", max_bytes=20_000, max_pixels=10**8)
    for s in shas:
        t.get(s, 128)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.jpg"))
    assert on_disk == t.cache_bytes() <= 20_000
    assert t.misses == 12 and t.hits == 0
    t.get(shas[-1], 128)
    assert t.hits == 1


def test_thumbnails_follow_the_current_clusters(monkeypatch):
    # Which pictures may be shown was cached by the id() of the cluster view;
    # CPython gives a new view the address of a freed one, and the new view
    # was then answered from the old set. Here every view has one address.
    from streams.desk import views

    class Source:
        docs: dict = {}

        def _all(self):
            return self.docs

    monkeypatch.setattr(views, "id", lambda obj: 1, raising=False)
    src = Source()
    src.docs = {"c1": {"members": [{"sha256": "a" * 64}]}}
    assert views.member_shas(src) == {"a" * 64}
    src.docs = {"c2": {"members": [{"sha256": "b" * 64}]}}  # the store changed
    assert views.member_shas(src) == {"b" * 64}


def test_verdict_follows_a_merge_and_merged_clusters_refuse_verdicts(data, env):
    from streams.records import ClusterSnapshot, Engagement, Member, Velocity
    from tests.desk_support import T0

    with client(make_settings(data)) as c:
        assert c.post("/api/clusters/c-photo/verdict", json={"verdict": "authentic"}, headers=EDITOR).status_code == 201
        store = open_store(data)
        photo = store.cluster("c-photo")
        quiet = store.cluster("c-quiet")
        common = dict(fake_score=0.2, verdict="no-evidence", evidence=[], sightings=6, accounts=6, platforms=["x"],
                      engagement=Engagement(), velocity=Velocity(), first_seen=T0, last_seen=T0)
        # the stream merges c-photo into c-quiet (the snapshots its sink would write)
        store.apply_snapshot(ClusterSnapshot(cluster_id="c-photo", revision=100, merged_into="c-quiet",
                                             members=[], **common))
        store.apply_snapshot(ClusterSnapshot(cluster_id="c-quiet", revision=100, merged_from=["c-photo"],
                                             members=[Member(**m.model_dump()) for m in quiet.members], **common))
        store.close()
        assert photo is not None
        survivor = c.get("/api/clusters/c-quiet").json()
        assert survivor["desk"]["verdict"] == "authentic" and survivor["desk"]["source_cluster"] == "c-photo"
        assert survivor["sightings"] == 6  # 2 of its own + 4 of the merged cluster's
        r = c.post("/api/clusters/c-photo/verdict", json={"verdict": "fake"}, headers=EDITOR)
        assert r.status_code == 409 and "merged into c-quiet" in r.json()["error"]


class _ProtocolOnly:
    """A findings store offering only the FindingsStore interface: none of the
    SQLite store's extras (data_version; the member index's reads)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name in ("data_version", "members_after", "members_near", "path"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_source_on_a_store_with_only_the_interface(data):
    from streams.desk.deskdb import DeskDB
    from streams.desk.source import ClusterQuery, FindingsSource

    store = open_store(data)
    src = FindingsSource(_ProtocolOnly(store), DeskDB(data / "desk.sqlite"), ttl_s=60)
    try:
        # members as the interface gives them (``iter_members``), crop views and all
        assert sorted(src.iter_members(), key=lambda m: m.sha256) == sorted(store.iter_members(), key=lambda m: m.sha256)
        before = {d["id"] for d in src.clusters_page(ClusterQuery())[0]}
        make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-late", 55, posts=1, ai=False)
        # no change signal: the cached view stands until the TTL runs out
        assert {d["id"] for d in src.clusters_page(ClusterQuery())[0]} == before
        src._ttl_at -= 60  # the TTL ran out (a clock, not a sleep: make_cluster may outlast a short TTL under load)
        assert {d["id"] for d in src.clusters_page(ClusterQuery())[0]} == before | {"c-late"}
    finally:
        src.close()
        src.desk.close()


def test_the_desk_reads_only_the_clusters_that_changed(tmp_path):
    """On SQLite the desk's cache reads again just the clusters written since
    it last looked -- a new revision, a merge, a new cluster, and the root of a
    merged cluster whose late sighting arrived -- and ends equal to a fresh
    full read."""
    from streams.desk.deskdb import DeskDB
    from streams.desk.source import FindingsSource
    from tests.test_store import _sighting, _snap

    writer = open_store(tmp_path)
    writer.apply_snapshots([_snap(f"c{i}", 1, sighting=_sighting(f"e{i}", f"{i:064x}", i)) for i in range(20)])
    reader = open_store(tmp_path)
    read_by_id: list[set[str]] = []
    by_id = reader.clusters_by_id
    reader.clusters_by_id = lambda ids: read_by_id.append(set(ids)) or by_id(ids)  # type: ignore[method-assign]
    src = FindingsSource(reader, DeskDB(tmp_path / "desk.sqlite"))
    fresh = None
    try:
        assert len(src._all()) == 20 and read_by_id == []  # the first read is a full one
        writer.apply_snapshots([
            _snap("c1", 2, sighting=_sighting("e1b", "a" * 64, 100), score=0.9),
            _snap("c3", 2, merged_into="c2"), _snap("c2", 2, merged_from=["c3"]),
            _snap("c20", 1, sighting=_sighting("e20", "b" * 64, 101)),
        ])
        src._all()
        assert read_by_id == [{"c1", "c2", "c3", "c20"}]
        # an older revision of the merged cluster: its row stays, its sighting counts for the survivor
        writer.apply_snapshots([_snap("c3", 1, sighting=_sighting("e3late", "c" * 64, 102, account="late"))])
        got = src._all()
        assert read_by_id[-1] == {"c3", "c2"}
        assert got["c2"]["sightings"] == 3 and got["c2"]["accounts"] == 2
        fresh = FindingsSource(open_store(tmp_path), DeskDB(tmp_path / "desk2.sqlite"))
        assert got == fresh._all()
        src._all()
        assert len(read_by_id) == 2  # nothing changed: nothing read
    finally:
        close_sources(src, fresh)
        writer.close()


def test_account_views_follow_new_sightings_late_posts_included(tmp_path):
    """Account pages and account alerts are counted by the store on every
    read (no copy of the sightings in the desk to keep current): what was
    written since, a post recorded late included, is in the next answer."""
    from datetime import timedelta

    from streams.desk.deskdb import DeskDB
    from streams.desk.source import FindingsSource
    from tests.test_store import _sighting, _snap

    writer = open_store(tmp_path)
    writer.apply_snapshots([_snap(f"c{i}", 1, sighting=_sighting(f"e{i}", f"{i:064x}", i, minute=10 * i)) for i in range(5)])
    src = FindingsSource(open_store(tmp_path), DeskDB(tmp_path / "desk.sqlite"))
    try:
        a = src.account("acct-1")
        assert (a["posts"], a["cadence"]["median_gap_s"]) == (5, 600.0)
        assert [w["posts"] for w in src.account_windows(timedelta(minutes=60))] == [5]
        writer.apply_snapshots([
            _snap("c1", 2, sighting=_sighting("e-late", "d" * 64, 50, minute=5)),  # posted before e1, recorded last
            _snap("c9", 1, sighting=_sighting("e-new", "e" * 64, 51, minute=99)),
        ])
        a = src.account("acct-1")
        # gaps 5, 5, 10, 10, 10, 59 minutes
        assert (a["posts"], a["pictures"], a["cadence"]["median_gap_s"]) == (7, 7, 600.0)
        assert a["first_seen"] < a["last_seen"] and a["last_seen"].startswith("2026-11-20T11:39")
        assert [d["event_id"] for d in a["posts_detail"]][:2] == ["e-new", "e4"]
        assert [w["posts"] for w in src.account_windows(timedelta(minutes=60))] == [2]
    finally:
        src.close()
        src.desk.close()
        writer.close()


def test_sessions_of_a_desk_database_from_before_credentials_need_a_new_login(tmp_path):
    from streams.desk.deskdb import DeskDB, _hash_token

    db = sqlite3.connect(tmp_path / "desk.sqlite")
    db.execute("CREATE TABLE sessions (token_hash TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL, "
               "csrf TEXT NOT NULL, expires REAL NOT NULL)")
    db.execute("INSERT INTO sessions VALUES (?, 'alice', 'editor', 'c', ?)", (_hash_token("old"), time.time() + 3600))
    db.commit()
    db.close()
    desk = DeskDB(tmp_path / "desk.sqlite")
    try:
        assert desk.session("old").credential == ""  # matches no user's password: a new login
        token, _ = desk.new_session("alice", "editor", 1, "cred")
        assert desk.session(token).credential == "cred"
    finally:
        desk.close()


def test_open_reads_answer_only_requests_addressed_to_a_loopback_name(data, env):
    """DNS rebinding: a page on attacker.example points its name at
    127.0.0.1 and reads the loopback desk as its own origin; its requests
    still say Host: attacker.example."""
    with client(make_settings(data)) as c:
        for host in ("127.0.0.1:8765", "localhost:8765", "localhost", "[::1]:8765"):
            assert c.get("/api/clusters", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example:8765", "attacker.example", "127.0.0.1.attacker.example", "[::2]:80"):
            r = c.get("/api/clusters", headers={"Host": host})
            assert r.status_code == 403 and "loopback name" in r.json()["error"], host
        r = c.get("/api/clusters", headers={"Host": "attacker.example", **VIEWER})  # a token is not the browser's
        assert r.status_code == 200


def test_refused_login_attempts_add_nothing_to_the_limiter():
    """A blocked address spraying new user names: each refused attempt
    added a key, past the limiter's bound, until an allowed one pruned them."""
    from streams.desk.auth import LoginLimiter

    limiter = LoginLimiter(per_minute=5)  # and 4x that per address, and per name, over the others
    for i in range(20):
        wait, stamp = limiter.attempt("203.0.113.9", f"u{i}")
        assert wait == 0 and stamp is not None
    for i in range(20, 20_020):
        wait, stamp = limiter.attempt("203.0.113.9", f"u{i}")
        assert wait > 0 and stamp is None
    assert len(limiter._fails) == 41  # the address, and the twenty names and pairs that failed
    wait, stamp = limiter.attempt("198.51.100.1", "alice")  # another address is not blocked
    assert wait == 0
    limiter.succeeded(stamp, "198.51.100.1", "alice")
    limiter.succeeded(1.0, "nobody", "nobody")  # a stamp never counted: nothing to withdraw, no key
    assert len(limiter._fails) == 44 and not limiter._fails["addr:198.51.100.1"]


def test_one_guessing_address_locks_out_neither_the_user_elsewhere_nor_its_neighbours():
    # Failures were counted per address and per user name alike: five wrong
    # passwords for alice from anywhere locked alice out everywhere, and five
    # for anyone locked out everyone behind the same address (a newsroom's NAT).
    from streams.desk.auth import LoginLimiter

    limiter = LoginLimiter(per_minute=3)
    for _ in range(3):
        assert limiter.attempt("203.0.113.9", "alice")[0] == 0
    assert limiter.attempt("203.0.113.9", "alice")[0] > 0  # the guesser waits
    for client, user in (("198.51.100.1", "alice"), ("203.0.113.9", "bob")):
        wait, stamp = limiter.attempt(client, user)
        assert wait == 0, (client, user)  # alice from her desk, bob behind the guesser's address
        limiter.succeeded(stamp, client, user)
    # guesses spread over addresses still stop, at 4x the pair's limit per name
    for i in range(9):
        assert limiter.attempt(f"192.0.2.{i}", "alice")[0] == 0
    assert limiter.attempt("192.0.2.200", "alice")[0] > 0
    assert limiter.attempt("198.51.100.1", "alice")[0] == 0  # but not where alice logged in


def test_guesses_spread_over_addresses_do_not_lock_the_user_out_of_an_address_she_logged_in_from():
    # The per-name limit blocked the name from every address: four addresses
    # with five wrong passwords each locked a real editor out from anywhere.
    from streams.desk.auth import LoginLimiter

    limiter = LoginLimiter(per_minute=5)  # 20 per name over the addresses
    wait, stamp = limiter.attempt("192.0.2.200", "alice")  # alice at her own desk, yesterday
    limiter.succeeded(stamp, "192.0.2.200", "alice")
    for i in range(4):
        for _ in range(5):
            assert limiter.attempt(f"198.51.100.{i}", "alice")[1] is not None  # each a failure
        assert limiter.attempt(f"198.51.100.{i}", "alice")[0] > 0
    wait, stamp = limiter.attempt("192.0.2.200", "alice")  # alice at her own desk
    assert wait == 0 and stamp is not None
    limiter.succeeded(stamp, "192.0.2.200", "alice")
    assert limiter.attempt("192.0.2.200", "alice")[0] == 0  # and again: a success is no failure
    # the name's limit still caps guessing from every other address
    assert limiter.attempt("203.0.113.50", "alice")[0] > 0
    assert limiter.attempt("203.0.113.50", "bob")[0] == 0  # not for other names


def test_times_are_shown_in_utc_and_sorted_as_instants():
    # Posts keep the offset they were posted with: one moment showed as 20:00
    # on one row and 12:00 on another, and sorting compared the ISO text.
    from streams.desk.source import _sort_key
    from streams.desk.views import sparkline, when

    assert when("2026-11-30T20:00:00+08:00") == when("2026-11-30T12:00:00Z") == "2026-11-30 12:00:00 UTC"
    assert when("2026-11-30T12:00:00") == "2026-11-30 12:00:00 UTC"
    docs = [{"id": "east", "last_seen": "2026-11-30T20:00:30+08:00"}, {"id": "late", "last_seen": "2026-11-30T13:00:00Z"},
            {"id": "never", "last_seen": None}]
    assert [d["id"] for d in sorted(docs, key=_sort_key("last_seen"), reverse=True)] == ["late", "east", "never"]
    # the label read out the sum of the running totals: 12 sightings as 156
    assert 'aria-label="spread: 12 sightings"' in sparkline([3, 4, 5])


def test_error_pages_and_an_auto_refresh_of_0_say_what_is_so(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data, refresh_s=0)) as c:
        queue = c.get("/").text
        assert "auto-refresh off" in queue and 'id="autorefresh"' not in queue  # was "every 0 s", and 0 ms in the script
        assert _login(c, "alice", "correct horse battery").status_code == 303
        for path in ("/clusters/nope", "/?sort=bogus"):  # showed "Log in" to a logged-in editor
            page = c.get(path)
            assert page.status_code in (404, 422) and 'id="whoami">alice (editor)' in page.text, path


# ---------------------------------------------------------------- what the pages say
def test_velocity_is_as_of_the_newest_sighting_in_the_desks_view(data, env):
    """The stream writes a cluster's windows at its own last sighting only:
    a burst that ended hours ago kept "10/5m" and ranked above live
    clusters. The desk takes every window to its newest sighting (event
    time), the unchanged clusters' too, in the order, the cursors, the JSON
    and the pages alike."""
    from datetime import timedelta

    from tests.desk_support import T0

    with client(make_settings(data)) as c:
        by_id = {d["id"]: d for d in c.get("/api/clusters").json()}
        viral = by_id["c-viral"]  # its burst ended 4 h before persona4's post, the newest
        assert viral["stream_velocity"]["sightings_5m"] == 10 and viral["stream_velocity"]["sightings_1h"] == 12
        assert viral["velocity"] == {"sightings_5m": 0, "sightings_1h": 0, "accounts_1h": 0, "engagement_1h": 0,
                                     "accounts_5m": 0}
        assert viral["quiet_since"] == viral["last_seen"]
        assert by_id["c-persona4"]["velocity"]["sightings_5m"] == 1 and by_id["c-persona4"]["quiet_since"] is None
        row = c.get("/").text.split('data-cluster="c-viral"')[1].split("</tr>")[0]
        assert "0/5m" in row and "quiet since 2026-11-30 12:05:30 UTC" in re.sub(r"<[^>]+>", "", row)

        # a new burst 10 minutes later: only c-live changed in the store, yet persona4's post is
        # now out of the 5-minute window (and still in the hour's)
        store = open_store(data)
        make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-live", 7, posts=3, ai=True,
                     t0=T0 + timedelta(hours=4, minutes=10))
        store.close()
        rows = c.get("/api/clusters").json()
        assert [d["id"] for d in rows[:2]] == ["c-live", "c-persona4"]
        persona4 = rows[1]
        assert persona4["velocity"]["sightings_5m"] == 0 and persona4["velocity"]["sightings_1h"] == 1
        assert persona4["quiet_since"] == persona4["last_seen"]
        # the cursor carries the values shown: page by page, the same order
        r = c.get("/api/clusters?limit=1")
        second = c.get("/api/clusters?limit=1&cursor=" + r.headers["x-next-cursor"]).json()
        assert [d["id"] for d in r.json() + second] == ["c-live", "c-persona4"]
        assert c.get("/clusters/c-live").text.split('id="velocity">')[1].startswith("3/5m, 3/1h")
        assert "quiet since" in c.get("/clusters/c-viral").text.split('id="velocity">')[1].split("<")[0]


def test_a_desk_verdict_is_the_clusters_verdict(data, env):
    """Fused with a generator's metadata (0.98, as decisive), a desk
    "authentic" came out at 0.78, likely-ai: listed under verdict=likely-ai,
    a red score beside the green badge. The human decision is the verdict;
    the score is kept (struck, on the pages) and the stream's own under
    ``desk``."""
    with client(make_settings(data)) as c:
        assert c.post("/api/clusters/c-viral/verdict", json={"verdict": "authentic", "note": "agency photo"},
                      headers=EDITOR).status_code == 201
        assert c.post("/api/clusters/c-photo/verdict", json={"verdict": "fake", "note": "staged"},
                      headers=EDITOR).status_code == 201
        viral = c.get("/api/clusters/c-viral").json()
        assert viral["verdict"] == "no-evidence" and viral["desk"]["stream_verdict"] == "likely-ai"
        assert viral["fake_score"] < viral["desk"]["stream_fake_score"] == 0.95
        photo = c.get("/api/clusters/c-photo").json()
        assert photo["verdict"] == "likely-ai" and photo["desk"]["stream_verdict"] == "no-evidence"
        ids = lambda query: {d["id"] for d in c.get("/api/clusters?" + query).json()}  # noqa: E731
        assert "c-viral" not in ids("verdict=likely-ai") and "c-photo" in ids("verdict=likely-ai")
        assert "c-viral" in ids("verdict=no-evidence")
        heading = c.get("/clusters/c-viral").text.split("<h1>")[1].split("</h1>")[0]
        assert 'class="score overridden" title="overridden by the desk\'s authentic verdict (stream score 0.95)"' \
            in heading
        assert 'class="score hi"' in c.get("/clusters/c-photo").text.split("<h1>")[1].split("</h1>")[0]


def test_a_login_comes_back_to_the_page_with_its_query(data, env):
    """The login's `next` was the path alone: a search's words and filters
    were lost. Off-site targets are still refused."""
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data)) as c:  # the open loopback desk: the header's link
        link = c.get("/search?q=flood&platform=x").text.split('id="login-link"')[0].rsplit('href="', 1)[1]
        assert link.split('"')[0] == "/login?next=/search%3Fq%3Dflood%26platform%3Dx"
    with client(make_settings(data, require_login_on_loopback=True)) as c:
        r = c.get("/search?q=flood&platform=x", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/search%3Fq%3Dflood%26platform%3Dx"
        login = c.get(r.headers["location"])
        assert 'name="next" value="/search?q=flood&amp;platform=x"' in login.text
        assert 'id="login-link"' in login.text and "/login?next=/search%3Fq%3Dflood%26platform%3Dx" in login.text
        csrf = login.text.split('name="csrf" value="')[1].split('"')[0]
        r = c.post("/login", data={"username": "alice", "password": "correct horse battery", "csrf": csrf,
                                   "next": "/search?q=flood&platform=x"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/search?q=flood&platform=x"
        assert 'name="next" value="/"' in c.get("/login?next=//evil.example/search%3Fq%3D1").text


def test_a_verdict_posted_after_the_session_ended_leads_to_the_login_and_back(data, env):
    """The form's 401 was a dead-end error page; the API's stays a 401."""
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    with client(make_settings(data, require_login_on_loopback=True)) as c:
        _login(c, "alice", "correct horse battery")
        page = c.get("/clusters/c-quiet").text
        csrf = page.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        c.app.state.desk.db.end_session(c.cookies["dw_session"])  # expired while the page was open
        r = c.post("/clusters/c-quiet/verdict", data={"verdict": "fake", "note": "x", "csrf": csrf},
                   follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/clusters/c-quiet"
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake"}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 401 and r.json()["status"] == 401
        r = c.post("/clusters/c-quiet/verdict", data={"verdict": "fake"}, headers={"Authorization": "Bearer wrong"},
                   follow_redirects=False)
        assert r.status_code == 401  # a script's bearer token: no redirect


def test_a_bad_filter_or_a_stopped_search_shows_the_page_with_the_form_as_sent(data, env):
    """A 422 or 503 on the queue or the search replaced the page with a bare
    error page: the form is shown again, filled as sent, under the message."""
    from tests.desk_support import bulk_sightings

    with client(make_settings(data)) as c:
        r = c.get("/search?q=storm&since=yesterday&sort=score&limit=7")
        assert r.status_code == 422 and 'id="search-form"' in r.text
        assert 'name="q" value="storm"' in r.text and 'name="since" value="yesterday"' in r.text
        assert '<option value="score" selected>' in r.text and 'name="limit" value="7"' in r.text
        assert r.text.split('id="page-error">')[1].startswith("bad request: since:")
        r = c.get("/?since=yesterday&platform=x")
        assert r.status_code == 422 and 'id="filters"' in r.text and 'id="queue"' not in r.text
        assert 'name="since" value="yesterday"' in r.text and 'name="platform" value="x"' in r.text
        assert "since:" in r.text.split('id="page-error">')[1]
        assert c.get("/?since=yesterday&partial=1").status_code == 422  # the refresh's rows: no page in the table
    bulk_sightings(data / "findings.sqlite", 150_000)
    settings = make_settings(data)
    settings.findings.search_timeout_s = 0.05
    with client(settings) as c:
        for path in ("/search?q=%C3%A4rger-nobody", "/?q=%C3%A4rger-nobody"):
            r = c.get(path)
            assert r.status_code == 503 and 'name="q" value="ärger-nobody"' in r.text, path
            assert "search took longer than 0.05 s" in r.text.split('id="page-error">')[1], path


def test_empty_results_say_why(tmp_path, data, env):
    """An empty store's queue said "no clusters match"; a search without
    results showed "0 cluster(s)" over an empty table."""
    empty = tmp_path / "empty"
    empty.mkdir()
    open_store(empty).close()
    with client(make_settings(empty)) as c:
        said = c.get("/").text.split('id="empty">')[1].split("</td>")[0]
        assert "No clusters yet" in said and "deepwatch replay" in said and "match" not in said
    with client(make_settings(data)) as c:
        assert "no clusters match these filters" in c.get("/?platform=nowhere").text
        r = c.get("/search?q=nothingmatchesthis")
        assert 'id="no-results"' in r.text and "fewer words" in r.text and "wider time range" in r.text
        assert '<table class="queue">' not in r.text and 'id="result-count"' not in r.text


def test_the_forms_keep_sort_and_limit(data, env):
    with client(make_settings(data)) as c:
        q = c.get("/?limit=3&sort=score").text
        assert 'name="limit" value="3"' in q and '<option value="score" selected>' in q
        s = c.get("/search?q=subway&sort=last_seen&limit=5").text
        sort = s.split('<select name="sort"')[1].split("</select>")[0]
        assert [o.split('"')[0] for o in sort.split('<option value="')[1:]] == \
            ["", "relevance", "velocity", "score", "last_seen", "sightings"]  # the search's sorts
        assert '<option value="last_seen" selected>' in sort and 'name="limit" value="5"' in s
        # words match whole words (FTS5 without prefixes), times are UTC
        assert "whole words" in s.split('name="q"')[1].split(">")[0]
        assert 'placeholder="since (ISO time, UTC)"' in s and 'placeholder="until (ISO time, UTC)"' in s
        assert 'placeholder="since (ISO time, UTC)"' in q


def test_pages_work_from_the_keyboard_and_a_screen_reader(data, env):
    add_user(data / "desk-users.json", "alice", "editor", "correct horse battery")
    add_user(data / "desk-users.json", "bob", "viewer", "another long password")
    with client(make_settings(data)) as c:
        q = c.get("/").text
        assert '<a class="skip" href="#main">' in q and '<main id="main" tabindex="-1">' in q
        assert '<a href="/" id="nav-queue" aria-current="page">' in q and '<a href="/search" id="nav-search">' in q
        assert '<a href="/search" id="nav-search" aria-current="page">' in c.get("/search").text
        row = q.split('data-cluster="c-viral"')[1].split("</tr>")[0]
        assert '<a href="/clusters/c-viral" tabindex="-1" aria-hidden="true"><img' in row  # the id links there too
        assert ('<td class="evidence" title="PNG text chunk names the generator: Stable Diffusion XL">') in row
        assert "Log in as an editor" in c.get("/clusters/c-viral").text
    with client(make_settings(data)) as c:
        _login(c, "bob", "another long password")
        said = c.get("/clusters/c-viral").text.split('id="verdict-needs">')[1].split("</p>")[0]
        assert "needs the editor role" in said and "bob (viewer)" in said and "Log in" not in said
    with client(make_settings(data)) as c:
        _login(c, "alice", "correct horse battery")
        form = c.get("/clusters/c-viral").text.split('id="verdict-form"')[1].split("</form>")[0]
        assert '<label>note <input type="text" name="note"' in form


def test_the_header_and_the_spread_legend_are_legible():
    """WCAG AA: 4.5:1 for text. The header's "read-only (loopback)" was the
    page's grey on the dark header (3.35:1); the legend's words were drawn in
    the line colours (#e67700 on #fafafa: 2.9:1)."""
    import re

    from streams.desk import views

    def luminance(hex_: str) -> float:
        rgb = [int(hex_[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in rgb]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    def contrast(a: str, b: str) -> float:
        hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
        return (hi + 0.05) / (lo + 0.05)

    css = (Path(views.__file__).parent / "static" / "desk.css").read_text()
    header_bg = re.search(r"header\.top \{[^}]*background: (#[0-9a-f]{6})", css).group(1)
    muted = re.search(r"header\.top \.muted \{ color: (#[0-9a-f]{6})", css).group(1)
    assert contrast(muted, header_bg) >= 4.5
    chart = views.spread_chart({"buckets": 2, "platforms": {p: [1, 2] for p in ("a", "b", "c", "d", "e", "f")}})
    texts = re.findall(r'<text [^>]*fill="(#[0-9a-f]{6})"', chart)
    assert len(texts) == 6 and all(contrast(t, "#fafafa") >= 4.5 for t in texts)
    swatches = re.findall(r'<rect [^>]*fill="(#[0-9a-f]{6})"', chart)
    assert swatches == views.PLATFORM_COLORS[:6]  # the line's colour, beside its words


def test_the_cluster_page_shows_every_post_it_carries(data, env):
    """It listed the first 25 of the 200 the page holds."""
    store = open_store(data)
    make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-many", 11, posts=30, ai=True)
    store.close()
    with client(make_settings(data)) as c:
        page = c.get("/clusters/c-many").text
    posts = page.split('id="posts"')[1].split("</table>")[0]
    assert posts.count("<tr><td") == 25
    more = page.split('<details id="more-posts">')[1].split("</details>")[0]
    assert more.count("<tr><td") == 5 and "https://example.org/c-many/29" in more
