"""The desk and the analyst's search as a fact-check desk reads them after
`make demo` (README.md "The desk", docs/desk.md): `deepwatch serve` as its
own process over a findings store written the way the sink writes it, read
over HTTP, and `deepwatch search` / `deepwatch alerts` on the same store.

Each test is a step that tripped a reader walking the README on a fresh
clone: a figure printed with fifteen decimals, a time copied from a page
that its own filters refused, "sha256 d=0" as the answer to "have we seen
this picture?", an empty page that did not say how it fills."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from html import unescape
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from detectors.base import Evidence
from detectors.hashing import compute_hashes
from detectors.imagedata import ImageData
from streams.blobstore import DirectoryBlobStore
from streams.cli import app
from streams.records import (
    Alert, ClusterSnapshot, Engagement, ImageEvent, ImageRef, Member, Sighting, SourceRef, Velocity,
)
from streams.store import open_store
from tests.desk_support import T0, DeskServer, jpeg, small_store
from tests.support import picture

MODEL_WEIGHT = 1.902209672327087  # what the pixel probe's evidence carries after the demo


def _variants_cluster(data: Path) -> None:
    """c-variants: a picture and a smaller copy of it (joined at hash distance
    6), three posts, evidence from metadata and from the pixel model."""
    store = open_store(data)
    blobs = DirectoryBlobStore(data / "blobs")
    img = picture(31, (320, 240))
    members, shas = [], []
    for k, (size, distance) in enumerate((((320, 240), None), ((200, 150), 6))):
        body = jpeg(img.resize(size), 80)
        sha = blobs.put(body)
        h = compute_hashes(ImageData(body))
        shas.append((sha, h, size))
        members.append(Member(sha256=sha, phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality,
                              event_id=f"c-variants-e{k}", width=size[0], height=size[1], format="JPEG",
                              views=h.views, trimmed=h.trimmed, representative=k == 0, distance=distance))
    evidence = [Evidence(detector="generator-metadata", kind="metadata", score=0.99, weight=3.0, sha256=shas[0][0],
                         detail="ComfyUI metadata in PNG 'prompt' tEXt chunk"),
                Evidence(detector="model:pixel-probe-lite2", kind="model", score=0.41, weight=MODEL_WEIGHT,
                         sha256=shas[0][0], detail="pixel probe: 0.41 calibrated probability of AI")]
    t0 = T0 + timedelta(minutes=30)
    for i in range(3):
        sha, h, size = shas[min(i, 1)]
        when = t0 + timedelta(minutes=i)
        ev = ImageEvent(event_id=f"c-variants-e{i}", platform="x", account_id=f"v{i}", account_handle=f"@v{i}",
                        post_url=f"https://example.org/v/{i}", posted_at=when, text="storm over the harbour",
                        image=ImageRef(blob=sha))
        s = Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=900 + i), sha256=sha,
                     width=size[0], height=size[1], format="JPEG", hashes=h, evidence=evidence)
        store.apply_snapshot(ClusterSnapshot(
            cluster_id="c-variants", revision=i + 1, fake_score=0.97, verdict="likely-ai", evidence=evidence,
            members=members, sightings=i + 1, accounts=i + 1, platforms=["x"], engagement=Engagement(),
            velocity=Velocity(sightings_5m=i + 1, sightings_1h=i + 1), first_seen=t0, last_seen=when,
            alert_level=0, new_sighting=s))
    store.close()


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    data = tmp_path_factory.mktemp("journey")
    small_store(data)  # c-viral (12 posts), c-quiet, c-photo, c-persona0..4 (one post an hour from T0)
    _variants_cluster(data)
    server = DeskServer(data)
    try:
        yield server, data
    finally:
        server.stop()


def _get(desk, path: str) -> httpx.Response:
    return httpx.get(desk[0].url + path, timeout=60)


def _ids(rows: list[dict]) -> set[str]:
    return {r["id"] for r in rows}


def test_the_cluster_page_shows_its_figures_as_people_read_them(desk):
    # was: weight "1.902209672327087", "the first 3 of 3 posts", and "d=6" beside a variant, unexplained
    page = _get(desk, "/clusters/c-variants")
    assert page.status_code == 200
    evidence = page.text.split('id="evidence"')[1].split("</table>")[0]
    assert "<td>1.9</td>" in evidence and str(MODEL_WEIGHT) not in page.text, evidence
    assert re.search(r'id="posts-shown">all 3 posts<', page.text), page.text
    assert "hash distance" in page.text.split('id="members"')[1].split("</section>")[0]
    assert 'id="members-legend"' in page.text
    assert "sightings so far on each platform" in page.text
    # a cluster with more posts than the page shows still says how many of them it shows
    assert 'id="posts-shown">all 12 posts<' in _get(desk, "/clusters/c-viral").text


def test_a_time_copied_from_the_queue_filters_the_queue_the_search_and_the_cli(desk):
    # The pages print every time as "2026-11-30 15:00:00 UTC"; pasted into a
    # "since" it was a 422 ("unexpected extra characters"), and on the search
    # "2026-11-30 15:00", as people type a time, was read as a date at +15:00.
    queue = _get(desk, "/")
    row = queue.text.split('data-cluster="c-persona3"')[1].split("</tr>")[0]
    first_seen = unescape(re.findall(r'<td class="small">([^<]+ UTC)</td>', row)[0])
    assert first_seen == "2026-11-30 15:00:00 UTC"
    later = {"c-persona3", "c-persona4"}

    for since in (first_seen, "2026-11-30 15:00", "2026-11-30T15:00:00Z"):
        found = _get(desk, "/api/search?" + str(httpx.QueryParams({"since": since})))
        assert found.status_code == 200, (since, found.text)
        assert _ids(found.json()) == later, since
        listed = _get(desk, "/api/clusters?" + str(httpx.QueryParams({"since": since})))
        assert listed.status_code == 200 and _ids(listed.json()) == later, (since, listed.text)
        page = _get(desk, "/search?" + str(httpx.QueryParams({"since": since})))
        assert page.status_code == 200 and 'id="result-count">2 clusters' in page.text, since

    data = desk[1]
    r = CliRunner().invoke(app, ["search", "--since", first_seen, "--data-dir", str(data), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert _ids(json.loads(r.output)) == later


def test_a_since_that_is_no_time_says_which_forms_are(desk):
    # was: "since: Input should be a valid datetime or date, input is too short"
    r = _get(desk, "/api/search?since=yesterday")
    assert r.status_code == 422
    error = r.json()["error"]
    assert "since: 'yesterday' is not a date or time" in error and "2026-11-20 10:05" in error, error
    assert r.json()["detail"][0]["loc"] == ["query", "since"]  # the machine-readable part as it was
    for path in ("/search?since=yesterday", "/?since=yesterday", "/search?until=20%2F11%2F2026"):
        page = _get(desk, path)
        assert page.status_code == 422, path
        message = unescape(page.text.split('id="page-error">')[1].split("</p>")[0])
        assert "is not a date or time; write it as 2026-11-20" in message, (path, message)


def test_a_compact_date_is_that_date_and_another_number_is_refused(desk):
    # pydantic read a number as seconds since 1970: since=20261130 matched
    # every cluster (the CLI reads the day), and until=20261130 was that day.
    later = {"c-persona3", "c-persona4"}
    assert _ids(_get(desk, "/api/search?since=2026-11-30T15:00:00Z").json()) == later
    day = _get(desk, "/api/search?since=20261130").json()
    assert _ids(day) == _ids(_get(desk, "/api/search?since=2026-11-30").json())
    assert _ids(_get(desk, "/api/clusters?since=20261130").json()) == _ids(
        _get(desk, "/api/clusters?since=2026-11-30").json())
    assert _ids(_get(desk, "/api/search?until=20261130").json()) == _ids(
        _get(desk, "/api/search?until=2026-11-30").json())
    assert _get(desk, "/api/clusters").json()  # the store has clusters, and none from 2099 on
    assert _get(desk, "/api/clusters?since=20990101").json() == []
    assert _get(desk, "/api/search?since=20990101").json() == []
    for path in ("/api/search?since=1", "/api/clusters?since=1764514800", "/api/search?until=20261399"):
        r = _get(desk, path)
        assert r.status_code == 422, (path, r.text)
        assert "is not a date or time; write it as 2026-11-20" in r.json()["error"], r.json()


def test_the_picture_lookup_says_how_close_each_match_is(desk):
    # was: "sha256 d=0" / "phash d=4" in the match column
    server, data = desk
    first = _get(desk, "/api/clusters/c-variants").json()["members"][0]["sha256"]
    exact = DirectoryBlobStore(data / "blobs").get(first)
    near = jpeg(picture(31, (320, 240)).resize((288, 216)), 60)
    shown = {}
    for name, body in (("exact.jpg", exact), ("near.jpg", near)):
        page = httpx.post(server.url + "/similar", files={"image": (name, body, "image/jpeg")},
                          headers={"Origin": server.url}, timeout=60)
        assert page.status_code == 200, page.text[-500:]
        row = page.text.split('data-cluster="c-variants"')[1].split("</tr>")[0]
        shown[name] = unescape(re.findall(r'<td class="small" title="[^"]*">([^<]+)</td>', row)[0])
    assert shown["exact.jpg"] == "the same file (identical bytes)", shown
    assert re.fullmatch(r"a (near|mirrored|crop or framed) copy: \d+ of (64 pHash|256 PDQ) bits differ",
                        shown["near.jpg"]), shown


def test_empty_banks_say_how_they_fill(desk):
    page = _get(desk, "/banks")
    assert page.status_code == 200
    banks = unescape(re.sub(r"<[^>]+>", "", page.text.split('id="no-banks"')[1].split("</td>")[0]))
    assert "fake or authentic verdict" in banks and "deepwatch bank add" in banks, banks
    assert "a fake or authentic verdict adds" in unescape(re.sub(r"<[^>]+>", "", page.text))


def test_an_error_page_and_an_account_page_read_as_words(desk):
    missing = _get(desk, "/clusters/no-such-cluster")
    assert missing.status_code == 404 and "<h1>404 Not Found</h1>" in missing.text
    account = _get(desk, "/accounts/c-quiet-acct0")
    assert account.status_code == 200
    facts = unescape(re.sub(r"<[^>]+>", "", account.text.split('class="facts">')[1].split("</p>")[0]))
    assert "· 1 post · 1 picture ·" in facts, facts  # was "1 posts · 1 pictures"
    cluster = _get(desk, "/clusters/c-persona2").text
    facts = unescape(re.sub(r"<[^>]+>", "", cluster.split('class="facts">')[1].split("</p>")[0]))
    assert facts.startswith("1 sighting · 1 account · xiaohongshu ·"), facts  # was "1 sightings · 1 accounts"
    assert 'id="posts-shown">its only post<' in cluster


def test_the_alerts_table_shows_a_desk_alert_to_the_second(tmp_path):
    # A desk verdict's alert is stamped by the clock: the table showed
    # "2026-12-07 10:11:15.459906" beside the stream's "2026-11-20 10:03:45".
    store = open_store(tmp_path)
    at = datetime(2026, 12, 7, 10, 11, 15, 459906, tzinfo=timezone.utc)
    store.add_alert(Alert(alert_id="c-1:desk-fake", cluster_id="c-1", rule="desk-verdict-fake", level=1,
                          fake_score=0.97, verdict="likely-ai", velocity=Velocity(), sightings=3, accounts=3,
                          evidence=[], at=at))
    store.close()
    r = CliRunner().invoke(app, ["alerts", "--data-dir", str(tmp_path)], env={"COLUMNS": "200"}, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "2026-12-07 10:11:15 " in r.output and "459906" not in r.output, r.output


def test_an_authentic_verdict_is_said_once_on_the_cluster_page(tmp_path):
    # was: "alerts suppressed: desk verdict authentic: desk verdict authentic by ci-bot on cluster c-photo: ..."
    small_store(tmp_path)
    token = "t" * 32
    server = DeskServer(tmp_path, env={"DEEPWATCH_DESK_TOKENS": f"editor:ci-bot:{token}"})
    try:
        r = httpx.post(server.url + "/api/clusters/c-photo/verdict", json={"verdict": "authentic", "note": "photographer confirmed"},
                       headers={"Authorization": f"Bearer {token}"}, timeout=120)
        assert r.status_code == 201, r.text
        page = httpx.get(server.url + "/clusters/c-photo", timeout=60)
        said = unescape(page.text.split('id="suppressed">')[1].split("</p>")[0])
        assert said == "alerts suppressed: desk verdict authentic by ci-bot on cluster c-photo: photographer confirmed", said
        # the API says it once too (the page shows what the cluster's document holds)
        doc = httpx.get(server.url + "/api/clusters/c-photo", timeout=60).json()
        assert doc["suppressed"] == "desk verdict authentic by ci-bot on cluster c-photo: photographer confirmed", doc
    finally:
        server.stop()


def test_an_api_path_no_route_has_points_to_the_list_of_routes(desk):
    # was: {"error": "Not Found"} for http://127.0.0.1:8080/api/ typed as the README's "the REST API is at /api/..."
    for path in ("/api/", "/api/cluster/c-viral"):
        r = _get(desk, path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", path
        assert r.json()["error"] == f"no API route {path}; the routes are listed at /docs (/openapi.json)", r.json()
    r = _get(desk, "/api/clusters/no-such-cluster")  # a route's own 404 keeps its words
    assert r.json() == {"error": "no cluster 'no-such-cluster'", "status": 404}


def test_an_analyst_records_a_verdict_from_the_api_docs_with_a_token(tmp_path):
    # /docs had no "Authorize": the schema declared no bearer scheme, so "Try it
    # out" on POST .../verdict sent no token and was a 401 for an analyst with one.
    from tests.test_desk_browser import CHROMIUM, _require_browser

    _require_browser()
    from playwright.sync_api import sync_playwright

    small_store(tmp_path)
    token = "a" * 32
    server = DeskServer(tmp_path, env={"DEEPWATCH_DESK_TOKENS": f"editor:analyst:{token}"})
    try:
        schema = httpx.get(server.url + "/openapi.json", timeout=60).json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert {"bearer": []} in schema["security"] and {} in schema["security"]  # reading stays open on loopback
        # the rules follow the API's own description, which stays
        assert schema["info"]["description"].startswith("Fact-check desk: the queue of image clusters")
        assert "Authorization: Bearer <token>" in schema["info"]["description"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(server.url + "/docs")
                page.wait_for_selector(".opblock-summary-path", timeout=20_000)
                page.click("button.authorize")
                page.fill(".modal-ux input", token)
                page.click(".modal-ux button.authorize")
                page.click(".modal-ux button.btn-done")
                op = page.locator(".opblock-post").filter(has_text="/api/clusters/{cluster_id}/verdict")
                op.locator(".opblock-summary").click()
                op.locator("button.try-out__btn").click()
                op.locator("input[placeholder=cluster_id]").fill("c-quiet")
                op.locator("textarea.body-param__text").fill(json.dumps({"verdict": "needs-review", "note": "from /docs"}))
                op.locator("button.execute").click()
                status = op.locator(".live-responses-table tbody .response-col_status").first
                status.wait_for(timeout=30_000)
                assert status.inner_text().strip() == "201", op.locator(".live-responses-table tbody").inner_text()
            finally:
                browser.close()
        history = httpx.get(server.url + "/api/clusters/c-quiet", timeout=60).json()["verdict_history"]
        assert [(v["user"], v["verdict"], v["note"]) for v in history] == [("analyst", "needs-review", "from /docs")]
    finally:
        server.stop()


def _lines_of(page, selector: str, text: str) -> int:
    """On how many lines of the screen ``text`` (inside ``selector``) is drawn."""
    return page.locator(selector).first.evaluate("""(el, text) => {
        const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
        const range = document.createRange(); let node, start = null;
        const nodes = []; while ((node = walker.nextNode())) nodes.push(node);
        const all = nodes.map(n => n.data).join(''); const at = all.indexOf(text);
        if (at < 0) return -1;
        let offset = 0;
        for (const n of nodes) {
            if (start === null && at < offset + n.data.length) { range.setStart(n, at - offset); start = n; }
            if (start !== null && at + text.length <= offset + n.data.length) { range.setEnd(n, at + text.length - offset); break; }
            offset += n.data.length;
        }
        return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
    }""", text)


def test_a_quiet_clusters_time_is_not_broken_at_its_date(desk):
    # The queue's narrow sightings cell read "quiet since 2026-11-" / "20 10:04:15 UTC" after `make demo`.
    from tests.test_desk_browser import CHROMIUM, _require_browser

    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            for width in (1400, 1100):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(desk[0].url + "/")
                quiet = "tr[data-cluster='c-viral'] .quiet"
                assert "quiet since" in page.locator(quiet).inner_text()
                assert _lines_of(page, quiet, "2026-11-30 12:05:30 UTC") == 1, width
                page.close()
        finally:
            browser.close()


def test_the_velocity_figures_say_what_they_count(desk):
    # "3/5m" alone: five minutes or five million, up to when?
    row = _get(desk, "/").text.split('data-cluster="c-persona4"')[1].split("</tr>")[0]  # the newest post
    title = unescape(re.search(r'class="muted small velocity" title="([^"]+)"', row).group(1))
    assert title == "1 sighting in the 5 minutes up to the newest sighting the desk holds", title
    page = _get(desk, "/clusters/c-persona4").text
    assert 'title="sightings in the 5 minutes and in the hour up to the newest sighting the desk holds" id="velocity">' in page
