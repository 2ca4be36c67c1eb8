"""The desk's links, filters and error shapes after an audit, on a real
``deepwatch serve`` over a real SQLite findings store with hostile account
ids: an account named ".." or "." links to its own page (a browser resolves
those path segments away, escaped or not); a search for "@" or "#" alone says
it has no name in it; ``/api`` answers JSON; the accounts list shows every
cluster an account spread and keeps its page size."""

from __future__ import annotations

import re
import shutil
from html import unescape
from pathlib import Path

import httpx
import pytest

from streams.blobstore import DirectoryBlobStore
from streams.store import open_store
from tests.desk_support import DeskServer, make_cluster, small_store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    data: Path = tmp_path_factory.mktemp("desk-audit")
    small_store(data)
    store = open_store(data)
    blobs = DirectoryBlobStore(data / "blobs")
    # One post each by accounts whose ids are path segments a browser resolves away.
    make_cluster(store, blobs, "c-dots", 61, posts=3, ai=True, accounts=["..", ".", "x/../y"])
    # An account of photos only, and one that spread seven clusters.
    for k in range(7):
        make_cluster(store, blobs, f"c-spree{k}", 70 + k, posts=1, ai=k < 6, accounts=["spree"])
    # An account with more posts than its page carries (the newest 200).
    make_cluster(store, blobs, "c-prolific", 80, posts=203, ai=False, accounts=["prolific"])
    store.close()
    server = DeskServer(data)
    yield server
    server.stop()


def account_links(html: str) -> list[str]:
    return [unescape(h) for h in re.findall(r'href="(/accounts/[^"]*)"', html)]


# ------------------------------------------------------------- odd account ids
def test_an_account_named_dot_or_dotdot_links_to_its_own_page_in_a_browser(desk):
    # /accounts/.. opened the queue and /accounts/. a 404: a browser resolves
    # "." and ".." (and "%2e", "%2e%2e") before it sends the request.
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            for start, table in (("/clusters/c-dots", "#posts"), ("/accounts?min_posts=0&limit=5000", "#accounts")):
                for account in ("..", ".", "x/../y"):
                    page.goto(desk.url + start)
                    page.locator(f"{table} a", has_text=re.compile(rf"^@{re.escape(account)}$")).first.click()
                    page.wait_for_load_state()
                    assert page.locator("h1").inner_text() == f"Account @{account}", (start, account, page.url)
                    assert page.locator("p.facts code").inner_text() == account
        finally:
            browser.close()


def test_the_api_reads_an_account_a_path_cannot_name_from_the_query(desk):
    r = httpx.get(desk.url + "/api/accounts/", params={"id": ".."})
    assert r.status_code == 200 and r.json()["id"] == ".."
    assert httpx.get(desk.url + "/api/accounts/", params={"id": "."}).json()["id"] == "."
    # the path still wins where there is one, and an unknown id is the API's 404
    assert httpx.get(desk.url + "/api/accounts/spree", params={"id": ".."}).json()["id"] == "spree"
    r = httpx.get(desk.url + "/api/accounts/", params={"id": "nobody"})
    assert r.status_code == 404 and r.json() == {"error": "no account 'nobody'", "status": 404}


# ------------------------------------------------------------- search filters that say nothing
@pytest.mark.parametrize("field,value", [("hashtag", "#"), ("account", "@"), ("account", " @ ")])
def test_a_search_for_a_bare_at_or_hash_says_it_has_no_name(desk, field, value):
    # The page answered a blank (no results, no "no clusters match", no
    # message), the API "give at least one of ... account, hashtag", and
    # beside another filter the condition was dropped without a word.
    page = httpx.get(desk.url + "/search", params={field: value})
    assert page.status_code == 422
    assert "has no name in it" in unescape(page.text) and 'id="search-form"' in page.text
    for params in ({field: value}, {field: value, "q": "subway"}):
        r = httpx.get(desk.url + "/api/search", params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["detail"][0]["loc"] == ["query", field]
    # "#flood" and "@someone" are names, as before
    assert httpx.get(desk.url + "/api/search", params={"hashtag": "#flood"}).status_code == 200
    assert httpx.get(desk.url + "/api/search", params={"account": "@persona1"}).status_code == 200


# ------------------------------------------------------------- error shapes
def test_api_without_its_slash_answers_in_the_apis_json_shape(desk):
    r = httpx.get(desk.url + "/api")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "no API route /api; the routes are listed at /docs (/openapi.json)", "status": 404}
    r = httpx.post(desk.url + "/api")
    assert r.status_code in (404, 405) and r.json()["status"] == r.status_code


# ------------------------------------------------------------- the accounts list
def account_row(html: str, handle: str) -> str:
    rows = re.findall(r'<tr class="account-row">(.*?)</tr>', html, re.S)
    return next(r for r in rows if f">{handle}</a>" in r)


def test_the_accounts_list_shows_every_cluster_an_account_spread(desk):
    # Only the likely-AI clusters were listed, the first five: an account of
    # photos showed an empty cell, and one of seven clusters five, unsaid.
    html = httpx.get(desk.url + "/accounts", params={"min_posts": 0, "limit": 5000}).text
    photos = account_row(html, "@c-photo-acct0")
    assert re.findall(r'href="/clusters/([^"]+)"', photos) == ["c-photo"]
    spree = account_row(html, "@spree")
    shown = re.findall(r'<a href="/clusters/([^"]+)"( class="ai")?>', spree)
    assert len(shown) == 5 and all(ai for _, ai in shown)  # the likely-AI ones first, marked
    more = re.search(r'<a href="([^"]+)" class="more">\+(\d+) more</a>', spree)
    assert more and more.group(2) == "2" and more.group(1) == "/accounts/spree"
    # the account's own page lists all seven
    assert len(set(re.findall(r'href="/clusters/(c-spree\d)"', httpx.get(desk.url + more.group(1)).text))) == 7


def test_the_accounts_filter_keeps_its_page_size(desk):
    # The queue's and the search's forms keep `limit`; this one dropped it on Filter.
    html = httpx.get(desk.url + "/accounts", params={"limit": 3, "min_posts": 0}).text
    form = html.split('<form class="filters"')[1].split("</form>")[0]
    assert re.search(r'<input type="number" name="limit"[^>]* value="3"', form), form
    nxt = unescape(re.search(r'href="([^"]+)" rel="next"', html).group(1))
    assert "limit=3" in nxt


# ------------------------------------------------------------- the account page
def test_an_account_page_says_how_many_of_its_posts_it_shows(desk):
    # It listed the newest 200 under "Recent posts" and said nothing of the rest.
    html = httpx.get(desk.url + "/accounts/prolific").text
    assert html.split('<table class="posts">')[1].split("</table>")[0].count("<tr><td") == 200
    assert '<p class="small muted" id="posts-shown">the newest 200 of 203 posts</p>' in html
    assert 'id="posts-shown"' not in httpx.get(desk.url + "/accounts/spree").text  # all seven shown


def test_a_post_url_in_capitals_is_a_link_and_script_never_is():
    # the templates link a post only where this holds: "HTTPS://..." was hidden
    from streams.desk.views import web_link

    assert web_link("HTTPS://example.org/p/1") and web_link("Http://example.org/p/2")
    for never in ("javascript:alert(1)", "JAVASCRIPT:alert(1)", "data:text/html,x", "//example.org/p", "", None, 5):
        assert not web_link(never), never
