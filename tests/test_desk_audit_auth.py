"""The desk's credentials after an audit, on a real ``deepwatch serve`` over a
real SQLite findings store: only ``Authorization: Bearer`` is the desk's own.
A reverse proxy with a login of its own (nginx's ``auth_basic``) passes the
browser's ``Authorization: Basic`` on with every request; read as a wrong
bearer token it refused every page, a session's too, and sent the browser
round and round through the login page."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from streams.desk.auth import add_user
from tests.desk_support import DeskServer, small_store

PASSWORD = "correct horse battery"
EDITOR_TOKEN = "editor-token-0123456789abcdef0123"
BASIC = {"Authorization": "Basic YWxpY2U6cHJveHktcGFzc3dvcmQ="}  # what the proxy's own login left on the request


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    data: Path = tmp_path_factory.mktemp("desk-audit-auth")
    small_store(data)
    add_user(data / "desk-users.json", "alice", "editor", PASSWORD)
    # Behind a proxy on this machine: every request from 127.0.0.1, a login always needed.
    server = DeskServer(data, env={"DEEPWATCH_DESK__REQUIRE_LOGIN_ON_LOOPBACK": "true",
                                   "DEEPWATCH_DESK_TOKENS": f"editor:ci:{EDITOR_TOKEN}"})
    yield server
    server.stop()


def test_a_browser_behind_a_proxys_basic_auth_logs_in_and_reads(desk):
    with httpx.Client(base_url=desk.url, headers=BASIC) as browser:
        r = browser.get("/search?q=subway", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/search%3Fq%3Dsubway"
        login = browser.get(r.headers["location"])
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
        r = browser.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": csrf,
                                         "next": "/search?q=subway"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/search?q=subway"
        page = browser.get("/search?q=subway", follow_redirects=False)  # was a 303 back to the login, for ever
        assert page.status_code == 200 and 'id="whoami">alice (editor)' in page.text
        assert "c-viral" in page.text
        # a form posted with the session works too: the verdict, with the page's token
        cluster = browser.get("/clusters/c-quiet").text
        token = cluster.split('id="verdict-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        r = browser.post("/clusters/c-quiet/verdict", data={"verdict": "needs-review", "csrf": token},
                         follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/clusters/c-quiet#history"


def test_the_api_says_a_login_is_needed_not_that_a_basic_header_is_a_bad_token(desk):
    r = httpx.get(desk.url + "/api/clusters", headers=BASIC)
    assert r.status_code == 401 and r.json()["error"].startswith("login required")
    # a bearer token is still checked as one: a wrong one is refused as such, a right one reads
    r = httpx.get(desk.url + "/api/clusters", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and r.json()["error"] == "invalid bearer token"
    assert httpx.get(desk.url + "/api/clusters", headers={"Authorization": "Bearer"}).status_code == 401
    r = httpx.get(desk.url + "/api/clusters", headers={"Authorization": f"bearer {EDITOR_TOKEN}"})
    assert r.status_code == 200 and r.json()
    # a script's form post with a wrong bearer token gets its 401, not the login page
    r = httpx.post(desk.url + "/clusters/c-quiet/verdict", data={"verdict": "fake"},
                   headers={"Authorization": "Bearer not-a-token"}, follow_redirects=False)
    assert r.status_code == 401
    # one with only the proxy's Basic header is a browser whose session ended: to the login and back
    r = httpx.post(desk.url + "/clusters/c-quiet/verdict", data={"verdict": "fake"}, headers=BASIC,
                   follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/clusters/c-quiet"


def test_the_login_page_says_who_is_logged_in_already(desk):
    # It said nothing of the session the browser held: an editor already
    # logged in took the page for logged out.
    with httpx.Client(base_url=desk.url) as browser:
        login = browser.get("/login")
        assert 'id="signed-in"' not in login.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
        browser.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": csrf})
        again = browser.get("/login?next=/accounts")
        assert again.status_code == 200
        assert re.search(r'id="signed-in">You are logged in as <bdi>alice</bdi> \(editor\)', again.text)
        # the page's first CSRF field is still the login form's: logging in again works, as it did
        csrf = re.search(r'name="csrf" value="([^"]+)"', again.text).group(1)
        r = browser.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": csrf, "next": "/accounts"},
                         follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/accounts"
        # a wrong password shown again says it too
        csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text).group(1)
        r = browser.post("/login", data={"username": "alice", "password": "wrong", "csrf": csrf})
        assert r.status_code == 401 and 'id="signed-in"' in r.text
