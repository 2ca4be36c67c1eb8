"""A loopback desk behind a trusted reverse proxy that serves plain http:
the audit's `DEEPWATCH_DESK__TRUSTED_PROXIES='["127.0.0.1"]' deepwatch serve
--host 127.0.0.1`, asked with `X-Forwarded-Proto: http`, `X-Forwarded-For:
198.51.100.8`, `Host: desk.example.org`, showed no HTTPS notice and answered a
login 303 with `dw_session=...; HttpOnly; ... SameSite=strict` (no Secure, no
HSTS): the password and the session token crossed the network in clear. Now
such a login is refused with the desk's "needs HTTPS off loopback" 403, and
the login page says so before a password is typed; the same proxy's https
(Secure cookie, HSTS) and the desk used from this machine are as before."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.testclient import TestClient

from streams.desk import create_app
from streams.desk.auth import add_user
from streams.settings import Settings
from tests.desk_support import DeskServer, small_store

PASSWORD = "correct horse battery"
HTTPS_SAYS = ("needs HTTPS off loopback", "over plain http", "desk.trusted_proxies", "desk.public_url")
PROXY = '["127.0.0.1"]'


@pytest.fixture
def data(tmp_path):
    small_store(tmp_path)
    add_user(tmp_path / "desk-users.json", "alice", "editor", PASSWORD)
    return tmp_path


def _text(r: httpx.Response) -> str:
    return " ".join(r.text.replace("&#39;", "'").replace("&#34;", '"').replace("&quot;", '"').split())


def _token(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def _login(c, headers: dict[str, str]) -> tuple[httpx.Response, httpx.Response]:
    """The login page, then its form posted with its cookie sent by hand (as a
    browser keeps a cookie without Secure over http): both answers."""
    page = c.get("/login", headers=headers)
    token = _token(page)
    r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": token},
               headers={**headers, "Cookie": f"dw_login_csrf={token}"}, follow_redirects=False)
    return page, r


def _session(r: httpx.Response) -> str | None:
    return next((h for h in r.headers.get_list("set-cookie") if h.startswith("dw_session=")), None)


def test_a_trusted_proxys_plain_http_from_elsewhere_takes_no_login_on_a_loopback_desk(data):
    desk = DeskServer(data, env={"DEEPWATCH_DESK__TRUSTED_PROXIES": PROXY})
    plain = {"Host": "desk.example.org", "X-Forwarded-For": "198.51.100.8", "X-Forwarded-Proto": "http"}
    try:
        with httpx.Client(base_url=desk.url, timeout=30) as c:
            page, r = _login(c, plain)
            assert page.status_code == 200 and 'id="login-error"' in page.text
            assert all(s in _text(page) for s in HTTPS_SAYS), _text(page)[:2000]
            assert r.status_code == 403 and all(s in _text(r) for s in HTTPS_SAYS), _text(r)[:2000]
            assert "198.51.100.8" in _text(r) and _session(r) is None
            # without the form's cookie (a browser that kept none): the same refusal, not "reload the login page"
            r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": "x" * 32},
                       headers={**plain, "Cookie": ""}, follow_redirects=False)
            assert r.status_code == 403 and all(s in _text(r) for s in HTTPS_SAYS)

            # the same proxy over https: Secure cookies and HSTS, as before
            tls = {**plain, "X-Forwarded-Proto": "https"}
            page, r = _login(c, tls)
            assert 'id="login-error"' not in page.text and "secure" in page.headers["set-cookie"].lower()
            assert r.status_code == 303 and "secure" in _session(r).lower(), r.headers
            assert r.headers["strict-transport-security"] == "max-age=31536000"

            # a client on this machine through the proxy's http listener: its login stays on this machine
            page, r = _login(c, {**plain, "X-Forwarded-For": "127.0.0.1"})
            assert 'id="login-error"' not in page.text and r.status_code == 303 and _session(r)

            # the desk used from this machine, no proxy in between: as before (no Secure over loopback http)
            page, r = _login(c, {})
            assert 'id="login-error"' not in page.text and r.status_code == 303
            assert "secure" not in _session(r).lower() and "strict-transport-security" not in r.headers
    finally:
        desk.stop()
    assert "Traceback" not in desk.log.read_text()


def _client(data, host: str, peer: str, **desk) -> TestClient:
    """The desk as uvicorn hands it a request: ``peer`` the client (a trusted
    proxy's X-Forwarded-For already applied)."""
    s = Settings(data_dir=data)
    for k, v in desk.items():
        setattr(s.desk, k, v)
    s.desk.account_check_s = 3600
    return TestClient(create_app(s, host=host), base_url="http://desk.example.org", client=(peer, 40000))


@pytest.mark.parametrize("header", [{"X-Forwarded-Proto": "http"}, {"X-Forwarded-Proto": "HTTP, https"},
                                    {"Forwarded": 'for=198.51.100.8;proto="http"'}])
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_proxy_saying_plain_http_refuses_the_login_wherever_the_desk_listens(data, header, host):
    with _client(data, host, "198.51.100.8", trusted_proxies=["127.0.0.1"]) as c:
        page, r = _login(c, header)
        assert 'id="login-error"' in page.text and all(s in _text(page) for s in HTTPS_SAYS)
        assert r.status_code == 403 and all(s in _text(r) for s in HTTPS_SAYS) and _session(r) is None


@pytest.mark.parametrize("peer, header", [
    ("127.0.0.1", {"X-Forwarded-Proto": "http"}),  # the client is on this machine
    ("::1", {"X-Forwarded-Proto": "http"}),
    ("198.51.100.8", {"X-Forwarded-Proto": "https"}),  # the proxy says https
    ("198.51.100.8", {}),  # no word on the scheme: a TLS terminator that adds no header looks like this
])
def test_no_refusal_where_the_proxy_does_not_say_plain_http_from_elsewhere(data, peer, header):
    with _client(data, "127.0.0.1", peer, trusted_proxies=["127.0.0.1"]) as c:
        page, r = _login(c, header)
        assert 'id="login-error"' not in page.text
        assert r.status_code == 303 and _session(r), _text(r)[:2000]


def test_tls_ended_before_the_proxy_with_an_https_public_url_logs_in(data):
    # browser -> https load balancer (10.0.0.5) -> nginx on this machine (X-Forwarded-Proto $scheme: http)
    # -> desk: refused, although people reached it over https. An https desk.public_url says so; its
    # session cookie is Secure, so no browser sends it over plain http
    chain = {"X-Forwarded-Proto": "http", "X-Forwarded-For": "203.0.113.9, 10.0.0.5"}
    with _client(data, "127.0.0.1", "203.0.113.9", trusted_proxies=["127.0.0.1"],
                 public_url="https://desk.example.org") as c:
        page, r = _login(c, chain)
        assert 'id="login-error"' not in page.text
        assert r.status_code == 303 and "secure" in _session(r).lower(), _text(r)[:2000]
    # without it, the refusal names the setting that tells the desk so
    with _client(data, "127.0.0.1", "203.0.113.9", trusted_proxies=["127.0.0.1"]) as c:
        _, r = _login(c, chain)
        assert r.status_code == 403 and "load balancer" in _text(r)
