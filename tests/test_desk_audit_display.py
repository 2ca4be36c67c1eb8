"""What the desk shows of hostile names, after an audit, in a real browser
(Chromium) on a real ``deepwatch serve`` over a real SQLite findings store:
an account id, a platform name or an uploaded file's name carrying a bidi
control (U+202E, "right-to-left override") reversed everything after it to
the end of its line, so an account's facts read "stsop 3 · ... CTU 00:10:21"
and the order of the counts and times beside the name was the hostile
name's to choose."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from streams.blobstore import DirectoryBlobStore
from streams.store import open_store
from tests.desk_support import DeskServer, jpeg, make_cluster, small_store
from tests.support import picture

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RLO = "\u202e"

# Where each word starts on the screen, the first time it occurs in the element's text.
LEFT_OF = """([selector, words]) => {
  const root = document.querySelector(selector), out = {};
  const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    for (const w of words) {
      const i = n.data.indexOf(w);
      if (i < 0 || w in out) continue;
      const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + w.length);
      out[w] = r.getBoundingClientRect().left;
    }
  }
  return out;
}"""


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    data: Path = tmp_path_factory.mktemp("desk-audit-display")
    small_store(data)
    store = open_store(data)
    make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-bidi", 83, posts=3, ai=True,
                 platforms=(f"x{RLO}",), accounts=[f"news{RLO}"])
    store.close()
    server = DeskServer(data)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(desk):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1600, "height": 900})
        browser.close()


def in_reading_order(page, selector: str, words: list[str]) -> None:
    left = page.evaluate(LEFT_OF, [selector, words])
    assert set(left) == set(words), left
    xs = [left[w] for w in words]
    assert xs == sorted(xs), f"{selector}: {words} on screen at {xs}"


def test_an_account_name_cannot_reverse_the_facts_beside_it(desk, page):
    page.goto(desk.url + f"/accounts/news{RLO}")
    assert page.locator("h1").inner_text() == f"Account @news{RLO}"
    in_reading_order(page, "p.facts", ["posts", "picture", "likely-AI", "first", "last"])  # 3 posts of 1 picture


def test_a_platform_name_cannot_reverse_a_clusters_facts(desk, page):
    page.goto(desk.url + "/clusters/c-bidi")
    in_reading_order(page, "p.facts", ["sightings", "account", "first seen", "last seen"])  # 3 posts of 1 account


def test_an_uploaded_files_name_cannot_reverse_what_the_lookup_says_of_it(desk, page):
    page.goto(desk.url + "/similar")
    page.set_input_files("input[name=image]", files=[{"name": f"tip{RLO}.jpg", "mimeType": "image/jpeg",
                                                      "buffer": jpeg(picture(83, (160, 120)))}])
    page.click("#similar-submit")
    page.wait_for_selector("#similar-result")
    in_reading_order(page, "#similar-result p.small", ["160", "JPEG"])
