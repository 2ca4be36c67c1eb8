"""The desk for staff on a keyboard or a screen reader, in a real browser
(Chromium) on a real ``deepwatch serve`` over a real SQLite findings store.
axe-core (``axe_playwright_python``) checks every HTML page the desk serves,
as each role sees it: the picture columns' headers were empty (a screen reader
read "blank" for them), errors were not announced, and the focus ring was
Chromium's faint default. The keyboard test logs in, searches, pages, records
a verdict and logs out with Tab, Space and Enter only."""

from __future__ import annotations

import pytest

from tests.desk_support import DeskServer, jpeg, small_store
from tests.support import picture
from tests.test_desk_browser import CHROMIUM, PASSWORD, _require_browser, desk_user, log_in

pytestmark = pytest.mark.slow

# Rules left to fail, with why. Empty: every violation fails, whatever its impact (axe's serious and critical
# ones and the moderate and minor too), so none creeps back unnoticed.
LEFT: dict[str, str] = {}

# (who, path): every HTML page of the desk (pages.py's routes and errors.py's error page), as each role sees it
# where that differs (an editor has the verdict form, a viewer a line saying why not). /docs, Swagger UI's own
# page (apidocs.py), has a test of its own below.
PAGES = [
    ("editor", "/"),
    ("editor", "/?limit=2"),
    ("editor", "/?verdict=fake"),  # no rows
    ("editor", "/?since=not-a-time"),  # the page's error
    ("editor", "/clusters/c-viral"),
    ("editor", "/clusters/c-quiet"),  # a verdict in its history
    ("editor", "/accounts"),
    ("editor", "/accounts/persona1"),
    ("editor", "/search"),
    ("editor", "/search?q=flooded"),
    ("editor", "/search?q=nothingmatches"),
    ("editor", "/search?since=not-a-time"),
    ("editor", "/similar"),
    ("editor", "/banks"),
    ("editor", "/clusters/no-such-cluster"),  # 404
    ("editor", "/no-such-page"),  # 404
    ("viewer", "/"),
    ("viewer", "/clusters/c-viral"),
    ("viewer", "/banks"),
    ("nobody", "/login"),
]


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    _require_browser()
    pytest.importorskip("axe_playwright_python", reason="axe-core for Python is not installed (pip install -e .[dev])")
    data = tmp_path_factory.mktemp("desk-a11y")
    small_store(data)
    desk_user(data, "ed", "editor")
    desk_user(data, "vic", "viewer")
    # Login required on loopback too: the pages each role sees, and the login page a stranger sees.
    server = DeskServer(data, env={"DEEPWATCH_DESK__REQUIRE_LOGIN_ON_LOOPBACK": "true"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(desk):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(desk, browser):
    """A logged-in page per role (one login each: the desk slows a flood of them), and a stranger's."""
    out = {}
    for who, name in (("editor", "ed"), ("viewer", "vic"), ("nobody", None)):
        out[who] = browser.new_page(viewport={"width": 1400, "height": 900})
        if name:
            log_in(out[who], desk, name)
    # a verdict, so a history row, a bank and its entries are on the pages checked
    editor = out["editor"]
    editor.goto(desk.url + "/clusters/c-quiet")
    editor.check("#verdict-form input[value=fake]")
    editor.click("#verdict-submit")
    editor.wait_for_selector("tr.verdict-row")
    yield out
    for p in out.values():
        p.close()


def violations(page) -> list[str]:
    """axe-core's violations on the page as it stands, less LEFT's, one line per rule and element."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [f"{v['id']} ({v['impact']}): {n['target']} {n.get('failureSummary', '').splitlines()[-1].strip()}"
            for v in found if v["id"] not in LEFT for n in v["nodes"]]


@pytest.mark.parametrize("who,path", PAGES)
def test_axe_finds_nothing_on_the_page(desk, pages, who, path):
    page = pages[who]
    page.goto(desk.url + path)
    page.wait_for_load_state("networkidle")
    assert page.evaluate("document.documentElement.lang") == "en"
    assert page.title().endswith("— deepwatch desk") and page.title() != "deepwatch desk"  # says which page
    # beyond axe's rules: a screen reader's list of tables names each one, and says an error when it appears
    assert page.locator("main table:not(:has(> caption))").count() == 0
    assert page.locator("main .error:not([role=alert] .error)").count() == 0
    assert violations(page) == []


# Swagger UI's own markup, which no stylesheet reaches: an operation's summary is a button holding its path's
# copy button (nested-interactive), its tag headings skip a level, its info block sits outside a landmark.
SWAGGER_MARKUP = {"nested-interactive", "heading-order", "region"}


def test_axe_finds_only_swagger_uis_own_markup_on_the_api_docs(desk, pages):
    """/docs had no language and 17 pieces of text under 4.5:1 (white on the light method badges at 2.0-2.3:1):
    its language and the desk's darker colours (static/docs.css) are the desk's to give."""
    from axe_playwright_python.sync_playwright import Axe

    page = pages["viewer"]
    page.goto(desk.url + "/docs")
    page.wait_for_selector(".opblock")
    page.wait_for_load_state("networkidle")
    assert page.evaluate("document.documentElement.lang") == "en"
    found = {v["id"] for v in Axe().run(page).response["violations"]}
    assert found <= SWAGGER_MARKUP, found - SWAGGER_MARKUP


def test_the_spread_chart_says_its_totals(desk, pages):
    """The chart is one image to a screen reader (role="img"): its legend's per-platform totals were unsaid."""
    page = pages["viewer"]
    page.goto(desk.url + "/clusters/c-viral")  # 12 posts, x and weibo in turn
    assert page.get_attribute("#spread svg", "aria-label") == "spread over time by platform: weibo 6, x 6 sightings"


def test_axe_finds_nothing_on_a_failed_login_a_lookup_and_a_refusal(desk, browser, pages):
    stranger = browser.new_page()
    try:
        stranger.goto(desk.url + "/login")
        stranger.fill("input[name=username]", "vic")
        stranger.fill("input[name=password]", "not the password")
        stranger.click("#login-submit")
        assert stranger.locator("[role=alert] #login-error").count() == 1  # said when it appears
        assert violations(stranger) == []
    finally:
        stranger.close()

    editor = pages["editor"]
    editor.goto(desk.url + "/similar")
    editor.set_input_files("input[name=image]", files=[{"name": "tip.jpg", "mimeType": "image/jpeg",
                                                        "buffer": jpeg(picture(1, (160, 120)))}])
    editor.click("#similar-submit")
    editor.wait_for_selector("#matches")
    assert violations(editor) == []

    # 403: a viewer's verdict (a form of the viewer's own, as a stale tab of an editor demoted would send)
    viewer = pages["viewer"]
    viewer.goto(desk.url + "/clusters/c-viral")
    csrf = viewer.get_attribute("form[action='/logout'] input[name=csrf]", "value")
    viewer.evaluate("""([action, csrf]) => {
        const f = document.createElement('form'); f.method = 'post'; f.action = action;
        for (const [k, v] of [['csrf', csrf], ['verdict', 'fake']]) {
            const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.append(i);
        }
        document.body.append(f); f.submit();
    }""", ["/clusters/c-viral/verdict", csrf])
    viewer.wait_for_selector("#error-message")
    assert viewer.title().startswith("403 ")
    assert viewer.locator("[role=alert] #error-message").count() == 1
    assert violations(viewer) == []


@pytest.mark.parametrize("path", ["/", "/clusters/c-viral", "/search?q=flooded", "/accounts", "/banks"])
def test_axe_finds_nothing_on_a_phone(desk, pages, path):
    page = pages["editor"]
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.goto(desk.url + path)
        page.wait_for_load_state("networkidle")
        assert violations(page) == []
    finally:
        page.set_viewport_size({"width": 1400, "height": 900})


FOCUSED = """() => { const e = document.activeElement, css = getComputedStyle(e), box = e.getBoundingClientRect();
  return {tag: e.tagName.toLowerCase(), id: e.id, name: e.name || '', type: e.type || '', value: e.value || '',
          text: (e.textContent || '').trim(), outline: css.outlineStyle, width: parseFloat(css.outlineWidth),
          onScreen: box.width > 0 && box.height > 0 && box.right > 0 && box.bottom > 0}; }"""


def focused(page) -> dict:
    """The element with the keyboard's focus, and whether its focus ring shows (2 px at least, as WCAG 2.4.13 asks)."""
    f = page.evaluate(FOCUSED)
    assert f["onScreen"], f"the focus is off screen: {f}"
    if f["tag"] != "main":  # the skip link's target: a landmark, not a control
        assert f["outline"] not in ("none", "auto") and f["width"] >= 2, f"no visible focus ring on {f}"
    return f


def tab_to(page, want, most: int = 80) -> dict:
    """Tab until ``want(focused element)``; every stop on the way has a visible focus."""
    seen = []
    for _ in range(most):
        page.keyboard.press("Tab")
        f = focused(page)
        if want(f):
            return f
        seen.append(f["id"] or f["name"] or f["text"][:20])
    raise AssertionError(f"not reached by Tab; stops were {seen}")


def test_a_desk_day_on_the_keyboard_alone(desk, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(desk.url + "/")  # login required: the login page
        page.wait_for_url("**/login**")
        # the first stop is the skip link, shown where it is; Enter goes past the header to the form
        f = tab_to(page, lambda f: True, most=1)
        assert f["text"] == "Skip to main content"
        assert page.locator("a.skip").bounding_box()["x"] >= 0
        page.keyboard.press("Enter")
        assert focused(page)["id"] == "main"
        assert tab_to(page, lambda f: True, most=1)["name"] == "username"
        page.keyboard.type("ed")
        page.keyboard.press("Tab")
        assert focused(page)["name"] == "password"
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url(desk.url + "/")
        assert page.inner_text("#whoami") == "ed (editor)"

        # the queue: skip link, then the search field (after the line on the queue's window and its link to
        # the search page); Enter searches
        assert tab_to(page, lambda f: True, most=1)["text"] == "Skip to main content"
        page.keyboard.press("Enter")
        tab_to(page, lambda f: f["name"] == "q", most=2)
        page.keyboard.type("persona")
        page.keyboard.press("Enter")
        page.wait_for_url("**q=persona**")

        # paging: the next page link is reached and followed from the keyboard
        page.goto(desk.url + "/?limit=2")
        tab_to(page, lambda f: f["id"] == "next-page")
        page.keyboard.press("Enter")
        page.wait_for_url("**cursor=**")

        # a verdict: the radio group is one stop (Space picks), then the note, then Enter records it
        page.goto(desk.url + "/clusters/c-photo")
        tab_to(page, lambda f: f["name"] == "verdict")
        page.keyboard.press("Space")
        assert page.is_checked("#verdict-form input[value=fake]")
        page.keyboard.press("Tab")
        assert focused(page)["name"] == "note"
        page.keyboard.type("the photographer's own upload")
        page.keyboard.press("Enter")
        page.wait_for_url("**/clusters/c-photo#history")
        row = page.locator("tr.verdict-row").first
        assert "fake" in row.inner_text() and "the photographer's own upload" in row.inner_text()

        # log out (from the top of a page: the button is in the header)
        page.goto(desk.url + "/")
        tab_to(page, lambda f: f["tag"] == "button" and f["text"] == "Log out")
        page.keyboard.press("Enter")
        page.wait_for_url("**/login**")
        assert page.locator("#whoami").count() == 0
    finally:
        page.close()
