"""HTTP methods at the desk after an audit, on a real ``deepwatch serve`` over
a real SQLite findings store: a HEAD is answered as its GET would be, without
a body (RFC 9110: a server that answers GET answers HEAD). The desk's routes
were GET only, so an uptime checker's or a link checker's HEAD of the queue,
a cluster's page or /api/clusters got 405; writes stay POST only."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.desk_support import DeskServer, small_store


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("desk-audit-methods")
    small_store(data)
    return data


@pytest.fixture(scope="module")
def desk(data):
    server = DeskServer(data)
    yield server
    server.stop()


@pytest.mark.parametrize("path,kind", [("/", "text/html"), ("/clusters/c-viral", "text/html"),
                                       ("/accounts", "text/html"), ("/api/clusters", "application/json"),
                                       ("/api/clusters/c-viral", "application/json"), ("/static/desk.css", "text/css")])
def test_a_head_is_answered_as_the_get_without_a_body(desk, path, kind):
    got = httpx.get(desk.url + path)
    head = httpx.head(desk.url + path)
    assert got.status_code == 200 and head.status_code == 200, (path, head.status_code)
    assert head.content == b"" and head.headers["content-type"].startswith(kind)
    for name in ("content-security-policy", "x-frame-options", "x-content-type-options", "cache-control"):
        assert head.headers.get(name) == got.headers.get(name), name
    if path == "/api/clusters":
        assert head.headers["x-desk-view"] == got.headers["x-desk-view"]


def test_a_head_meets_the_same_answers_as_its_get(desk):
    r = httpx.head(desk.url + "/clusters/nope")
    assert r.status_code == 404 and r.content == b""
    r = httpx.head(desk.url + "/api/clusters?limit=0")
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    # writes stay POST only, and say so
    for path in ("/logout", "/api/clusters/c-viral/verdict", "/clusters/c-viral/verdict"):
        r = httpx.head(desk.url + path)
        assert r.status_code == 405 and r.headers["allow"] == "POST", path
    r = httpx.put(desk.url + "/")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_a_head_needs_the_login_its_get_needs(data):
    server = DeskServer(data, env={"DEEPWATCH_DESK__REQUIRE_LOGIN_ON_LOOPBACK": "true"})
    try:
        r = httpx.head(server.url + "/search?q=subway")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/search%3Fq%3Dsubway"
        r = httpx.head(server.url + "/api/clusters")
        assert r.status_code == 401 and r.content == b""
        assert httpx.head(server.url + "/healthz").status_code == 200  # open, as before
    finally:
        server.stop()
