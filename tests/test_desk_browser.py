"""The desk in a real headless browser (Debian's chromium driven by
Playwright) over the real pipeline: embedded Tansu broker, a Faust worker,
`deepwatch serve` as its own process. An editor logs in, opens the queue and a
cluster, records `fake`, sees it in the audit trail and in the banks; then a
repost of that picture goes through the stream and arrives already labelled
by the desk's bank. Screenshots are checked for the elements that matter
(DOM boxes inside the shot, and real pixels in them), not only that pages load."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageStat

from streams import runner
from streams.demo_feed import BASE_TIME
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store
from tests.desk_support import REPO, DeskServer, jpeg
from tests.support import picture

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "a long desk password"


def _require_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium; `make test` does it as root via .ci/install-chromium.sh)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright for Python is not installed (pip install -e .[dev])")


def desk_user(data: Path, name: str, role: str) -> None:
    """``deepwatch desk-user NAME --role ROLE`` with PASSWORD, as an operator adds one."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DESK_PW": PASSWORD}
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "desk-user", name, "--role", role,
                        "--password-env", "DESK_PW", "--data-dir", str(data)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr


def log_in(page, desk, name: str) -> None:
    page.goto(desk.url + "/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(desk.url + "/")


def write_feed(path: Path, rows: list[tuple[str, str, str, str, int]]) -> Path:
    """rows: (event id, account, platform, image file, seconds after BASE_TIME)."""
    lines = [json.dumps({
        "event_id": eid, "platform": platform, "account_id": account, "account_handle": "@" + account,
        "post_url": f"https://example.org/{platform}/{eid}", "text": f"breaking: storm photo {eid}",
        "posted_at": (BASE_TIME + timedelta(seconds=t)).isoformat(), "image": {"path": image},
    }) for eid, account, platform, image, t in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def region(shot: bytes, box: dict) -> Image.Image:
    img = Image.open(io.BytesIO(shot)).convert("RGB")
    return img.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])))


def assert_visible_in(shot: bytes, page, selector: str, *, min_std: float = 8.0) -> Image.Image:
    """The element is inside the screenshot and its pixels are not blank."""
    box = page.locator(selector).first.bounding_box()
    assert box and box["width"] > 4 and box["height"] > 4, f"{selector} has no box"
    w, h = Image.open(io.BytesIO(shot)).size
    assert box["x"] + box["width"] <= w + 1 and box["y"] + box["height"] <= h + 1, f"{selector} is outside the shot"
    crop = region(shot, box)
    std = max(ImageStat.Stat(crop).stddev)
    assert std >= min_std, f"{selector} looks blank in the screenshot (pixel stddev {std:.1f})"
    return crop


def wait_images(page, selector: str, timeout_s: float = 20.0) -> None:
    """Every image matched is loaded and decoded (polled from Python: the
    desk's CSP forbids the eval that page.wait_for_function uses)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if page.locator(selector).evaluate_all("imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"):
            return
        time.sleep(0.1)
    raise AssertionError(f"images {selector} did not load")


def alerts_on_topic(bootstrap: str, topic: str, timeout_s: float = 20.0) -> list[dict]:
    """Every alert published on the alerts topic so far (no consumer group)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    try:
        deadline = time.monotonic() + timeout_s
        while not (parts := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
            time.sleep(0.2)
        consumer.assign([TopicPartition(topic, p) for p in parts or ()])
        consumer.seek_to_beginning()
        return [json.loads(m.value) for m in consumer]
    finally:
        consumer.close()


def reddish(crop: Image.Image) -> float:
    px = np.asarray(crop.convert("RGB")).reshape(-1, 3).astype(int)
    return float(((px[:, 0] > 150) & (px[:, 1] < 90) & (px[:, 2] < 90)).mean())


def test_editor_verdict_in_the_browser_labels_the_next_repost(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    images = tmp_path / "images"
    images.mkdir()
    pic = picture(4242, (480, 360))
    (images / "a.jpg").write_bytes(jpeg(pic, 85))
    (images / "b.jpg").write_bytes(jpeg(pic.resize((240, 180)), 75))
    (images / "other.jpg").write_bytes(jpeg(picture(777, (480, 360)), 85))
    (images / "repost.jpg").write_bytes(jpeg(pic.resize((400, 300)), 70))
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [tmp_path]
    shots = tmp_path / "shots"
    shots.mkdir()

    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        cluster.wait_ready()
        first = produce_feed(write_feed(tmp_path / "a.jsonl", [
            ("s1", "alice", "x", "images/a.jpg", 0), ("s2", "bob", "weibo", "images/b.jpg", 40),
            ("s3", "carol", "x", "images/a.jpg", 90), ("o1", "dave", "telegram", "images/other.jpg", 60),
        ]), cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, first.offsets, timeout_s=180)
        target = next(c for c in open_store(settings.data_dir).clusters() if c.sightings == 3)
        assert target.verdict == "no-evidence"  # nothing in the stream says AI: the desk decides

        desk_user(settings.data_dir, "erin", "editor")
        desk = DeskServer(settings.data_dir, extra=("--broker", f"kafka://{cluster.bootstrap}"))
        stack.callback(desk.stop)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                browse(browser, desk, target, cluster, settings, first, tmp_path, shots)
            finally:
                browser.close()

    alerts = [a for a in open_store(settings.data_dir).alerts() if a.rule == "desk-verdict-fake"]
    assert [a.alert_id for a in alerts] == [f"{target.id}:desk-fake"]


def browse(browser, desk, target, cluster, settings, first, tmp_path: Path, shots: Path) -> None:
    if True:
        if True:
            page = browser.new_page(viewport={"width": 1400, "height": 900})

            log_in(page, desk, "erin")
            assert page.inner_text("#whoami") == "erin (editor)"

            # the queue: both clusters, thumbnails decoded, sparklines drawn
            wait_images(page, "img.thumb")
            shot = page.screenshot(path=str(shots / "queue.png"))
            rows = page.locator("tr.cluster-row")
            assert rows.count() == 2
            assert_visible_in(shot, page, f"tr[data-cluster='{target.id}'] img.thumb", min_std=10)
            assert page.locator(f"tr[data-cluster='{target.id}'] svg.spark polyline").count() == 1
            assert page.locator(f"tr[data-cluster='{target.id}'] .badge").inner_text() == "no-evidence"
            assert "weibo, x" in page.locator(f"tr[data-cluster='{target.id}']").inner_text()

            # the cluster page
            page.click(f"tr[data-cluster='{target.id}'] a.cid")
            page.wait_for_url(f"{desk.url}/clusters/{target.id}")
            wait_images(page, "#members img")
            shot = page.screenshot(path=str(shots / "cluster.png"))
            assert page.locator("#members figure").count() == 2  # the two variants
            assert_visible_in(shot, page, "#members figure img", min_std=10)
            assert_visible_in(shot, page, "#spread svg", min_std=2)
            assert page.locator("#posts tbody tr").count() == 3

            # record a verdict
            page.check("input[name=verdict][value=fake]")
            page.fill("input[name=note]", "generated: hands and signage")
            page.click("#verdict-submit")
            page.wait_for_selector("#verdict-history tr.verdict-row")
            page.locator("#history").scroll_into_view_if_needed()
            shot = page.screenshot(path=str(shots / "verdict.png"))
            row = page.locator("#verdict-history tr.verdict-row").first
            assert "erin (editor)" in row.inner_text() and "generated: hands and signage" in row.inner_text()
            assert "bank desk-fake +2" in row.inner_text()
            badge = assert_visible_in(shot, page, "#verdict-history tr.verdict-row .badge", min_std=5)
            assert reddish(badge) > 0.3, "the fake badge should be drawn red"
            assert "desk-fake" in page.inner_text("#bank-entries")
            # subscribers of the alerts topic got the confirmation (the desk ran with --broker)
            published = alerts_on_topic(cluster.bootstrap, settings.topic("alerts"))
            assert [a["rule"] for a in published if a["alert_id"] == f"{target.id}:desk-fake"] == ["desk-verdict-fake"]
            page.goto(desk.url + "/banks")
            assert "desk-fake" in page.inner_text("#banks-table")
            assert page.locator("#desk-entries tr.entry-row").count() == 2

            # a repost goes through the stream after the verdict: labelled on arrival
            time.sleep(2.5)  # the analyze stage re-reads a changed banks file at most every 2 s
            second = produce_feed(write_feed(tmp_path / "b.jsonl", [("s4", "frank", "bluesky", "images/repost.jpg", 200)]),
                                  cluster.bootstrap, settings)
            assert runner.wait_until_processed(cluster, first.offsets | second.offsets, timeout_s=180)
            doc = httpx.get(f"{desk.url}/api/clusters/{target.id}", timeout=30).json()
            assert doc["sightings"] == 4 and "bluesky" in doc["platforms"]
            stream_bank = [e for e in doc["evidence"] if e["detector"] == "bank:desk-fake"]
            assert stream_bank and stream_bank[0]["data"]["verdict"] == "fake"  # from the analyze stage, not the overlay
            assert doc["desk"]["stream_verdict"] == "likely-ai"  # the stream itself now says so
            page.goto(f"{desk.url}/clusters/{target.id}")
            wait_images(page, "#members img")
            shot = page.screenshot(path=str(shots / "repost.png"), full_page=True)
            assert "matches 'desk-fake' entry" in page.inner_text("#evidence")
            assert "frank" in page.inner_text("#posts")
            assert page.locator("#members figure").count() == 3
            assert_visible_in(shot, page, "#members figure:nth-child(3) img", min_std=10)


def test_queue_refreshes_itself_and_accounts_search_pages_show_their_findings(tmp_path):
    """No pipeline here: a store written the way the sink writes it, and the
    desk with a 1 s refresh. A cluster written while the queue is open shows
    up without a reload; the accounts and search pages show what matters."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    from streams.blobstore import DirectoryBlobStore
    from tests.desk_support import T0, make_cluster, small_store

    small_store(tmp_path)
    desk_user(tmp_path, "vic", "viewer")
    desk = DeskServer(tmp_path, env={"DEEPWATCH_DESK__REFRESH_S": "1"})
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                # a wrong password is refused on the page
                page.goto(desk.url + "/login")
                page.fill("input[name=username]", "vic")
                page.fill("input[name=password]", "not the password")
                page.click("#login-submit")
                assert page.inner_text("#login-error") == "wrong user name or password"
                log_in(page, desk, "vic")
                assert page.locator("tr.cluster-row").count() == 8
                # the keyboard: the first tab stop skips the header; a row is one stop (its id), not two
                page.keyboard.press("Tab")
                assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
                page.keyboard.press("Enter")
                assert page.evaluate("document.activeElement.id") == "main"
                assert page.evaluate("[...document.querySelectorAll('tr.cluster-row')[0].querySelectorAll('a')]"
                                     ".filter(a => a.tabIndex >= 0).length") == 1

                # the auto-refresh brings a new cluster in without a reload
                store = open_store(tmp_path)
                make_cluster(store, DirectoryBlobStore(tmp_path / "blobs"), "c-fresh", 9, posts=15, ai=True,
                             platforms=("threads",), t0=T0 + timedelta(hours=4))  # the newest burst
                store.close()
                deadline = time.monotonic() + 15
                while page.locator("tr[data-cluster='c-fresh']").count() == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert page.locator("tr.cluster-row").first.get_attribute("data-cluster") == "c-fresh"  # fastest now
                assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no reload happened
                wait_images(page, "tr[data-cluster='c-fresh'] img.thumb")
                shot = page.screenshot(path=str(tmp_path / "refreshed.png"))
                assert_visible_in(shot, page, "tr[data-cluster='c-fresh'] img.thumb", min_std=10)
                assert reddish(assert_visible_in(shot, page, "tr[data-cluster='c-fresh'] .badge", min_std=5)) > 0.3

                # a viewer sees no verdict form
                page.goto(desk.url + "/clusters/c-fresh")
                assert page.locator("#verdict-form").count() == 0

                # accounts: the persona account on top, 100 % likely-AI
                page.goto(desk.url + "/accounts?min_ai_share=0.9&min_posts=3")
                shot = page.screenshot(path=str(tmp_path / "accounts.png"))
                top = page.locator("tr.account-row").first
                assert "@persona1" in top.inner_text() and "100%" in top.inner_text()
                assert_visible_in(shot, page, "tr.account-row", min_std=5)
                top.locator("a").first.click()
                page.wait_for_url(desk.url + "/accounts/persona1")
                wait_images(page, "table.posts img.thumb")
                assert page.locator("table.posts tbody tr").count() == 5

                # search: a phrase from the posts
                page.goto(desk.url + "/search")
                page.fill("input[name=q]", '"flooded subway"')
                page.click("#search-form button[type=submit]")
                page.wait_for_selector("#result-count")
                assert page.inner_text("#result-count") == "1 cluster"
                assert page.locator("tr.cluster-row").first.get_attribute("data-cluster") == "c-viral"
            finally:
                browser.close()
    finally:
        desk.stop()


def test_find_a_picture_uploads_a_tip_and_shows_its_cluster(tmp_path):
    """A viewer opens "Find a picture" from the nav, uploads a smaller,
    recompressed copy of a stored picture and sees its cluster (thumbnail
    drawn, verdict, link to its page); an unrelated picture is "not seen"."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    from tests.desk_support import small_store

    small_store(tmp_path)  # c-viral is picture(1) at 160x120
    tip = tmp_path / "tip.jpg"
    tip.write_bytes(jpeg(picture(1, (160, 120)).resize((136, 102)), 55))
    unrelated = tmp_path / "unrelated.jpg"
    unrelated.write_bytes(jpeg(picture(4242, (160, 120)), 85))
    desk_user(tmp_path, "vic", "viewer")
    desk = DeskServer(tmp_path, env={"DEEPWATCH_DESK__REQUIRE_LOGIN_ON_LOOPBACK": "true"})
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                log_in(page, desk, "vic")
                page.click("#nav-similar")
                page.wait_for_url(desk.url + "/similar")

                page.set_input_files("#similar-form input[name=image]", str(tip))
                page.click("#similar-submit")
                page.wait_for_selector("#matches")
                wait_images(page, "#matches img.thumb")
                shot = page.screenshot(path=str(tmp_path / "similar.png"))
                row = page.locator("tr.match-row").first
                assert row.get_attribute("data-cluster") == "c-viral"
                assert "likely-ai" in row.inner_text() and "12 sightings" in row.inner_text()
                assert_visible_in(shot, page, "tr.match-row img.thumb", min_std=10)
                assert_visible_in(shot, page, "#query-preview", min_std=10)  # the uploaded picture, re-encoded
                row.locator("a.cid").click()
                page.wait_for_url(desk.url + "/clusters/c-viral")

                page.goto(desk.url + "/similar")
                page.set_input_files("#similar-form input[name=image]", str(unrelated))
                page.click("#similar-submit")
                page.wait_for_selector("#not-seen")
                assert page.locator("tr.match-row").count() == 0
            finally:
                browser.close()
    finally:
        desk.stop()


def test_api_docs_render_in_the_browser_with_a_clean_console(tmp_path):
    """/docs loaded Swagger UI from a CDN into the desk's origin; then, from a
    wheel, a Swagger UI 4 that cannot read FastAPI's OpenAPI 3.1 ("Unable to
    render this definition"). Every page also asked for a /favicon.ico that
    is not there. The docs must list the API under the page's own CSP, with
    nothing on the console: no CSP violation, no script error, no 404."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    from tests.desk_support import small_store

    small_store(tmp_path)
    desk = DeskServer(tmp_path)
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.on("console", lambda m: m.type in ("error", "warning") and problems.append(f"console: {m.text}"))
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
                for path in ("/", "/clusters/c-viral", "/accounts", "/search?q=storm"):
                    page.goto(desk.url + path)
                    page.wait_for_load_state("networkidle")
                page.goto(desk.url + "/docs")
                page.wait_for_selector(".opblock-summary-path", timeout=20_000)
                paths = {t.strip().replace("\u200b", "") for t in page.locator(".opblock-summary-path").all_inner_texts()}
                assert {"/api/clusters", "/api/clusters/{cluster_id}/verdict", "/api/search"} <= paths
                assert page.locator(".errors-wrapper").count() == 0
                # A form of the open loopback desk's own page: Chromium sends
                # Origin "null" (no-referrer), which was refused as another site.
                page.goto(desk.url + "/similar")
                tip = tmp_path / "tip.jpg"
                tip.write_bytes(jpeg(picture(1, (160, 120)), 80))
                page.set_input_files("#similar-form input[name=image]", str(tip))
                page.click("#similar-submit")
                page.wait_for_selector("#matches")
            finally:
                browser.close()
    finally:
        desk.stop()
    assert problems == []
