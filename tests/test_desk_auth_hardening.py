"""The desk's logins, cookies and files, and the ingest server's headers,
hardened after an audit: a desk off loopback over plain http says it needs
HTTPS (Chromium refuses its Secure login cookie there, and the 403 said
"reload the login page"), and `deepwatch serve` warns at start; cookies are
deleted with the attributes they were set with; a login ends the session the
browser presented; desk.sqlite (with its -wal and -shm) and the thumbnail
cache are owner-only; serve-ingest sends no `server: uvicorn`. And the desk
verdict is evidence of kind ``bank``, told apart by kind and data, not by a
detector's name (``source._apply_overlay``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from detectors.base import Evidence, EvidenceKind
from detectors.fusion import fuse
from streams.desk import create_app
from streams.desk.auth import add_user
from streams.desk.deskdb import DeskDB, OverlayRow
from streams.desk.source import _apply_overlay, desk_bank_evidence
from streams.settings import Settings
from tests.desk_support import REPO, DeskServer, free_port, small_store
from tests.support import mode_of

PASSWORD = "correct horse battery"
HTTPS_SAYS = ("needs HTTPS off loopback", "desk.trusted_proxies", "desk.public_url", "--host 127.0.0.1")
RELOAD = "CSRF token missing or wrong; reload the login page and try again"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def data(tmp_path) -> Path:
    small_store(tmp_path)
    add_user(tmp_path / "desk-users.json", "alice", "editor", PASSWORD)
    add_user(tmp_path / "desk-users.json", "bob", "viewer", PASSWORD)
    return tmp_path


def settings_for(data: Path, **desk) -> Settings:
    s = Settings(data_dir=data)
    for k, v in desk.items():
        setattr(s.desk, k, v)
    s.desk.account_check_s = 3600
    return s


def client(data: Path, host: str = "127.0.0.1", base_url: str = "http://127.0.0.1", **desk) -> TestClient:
    return TestClient(create_app(settings_for(data, **desk), host=host), base_url=base_url)


def form_token(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def login(c: TestClient, name: str, *, cookie_header: bool = False) -> httpx.Response:
    """The login form, filled in and posted; ``cookie_header``: the login
    cookie sent by hand (the test client keeps no Secure cookie over http,
    as a browser does not)."""
    page = c.get("/login")
    token = form_token(page.text)
    extra = {"headers": {"Cookie": f"dw_login_csrf={token}"}} if cookie_header else {}
    return c.post("/login", data={"username": name, "password": PASSWORD, "csrf": token}, follow_redirects=False,
                  **extra)


def set_cookies(r: httpx.Response) -> dict[str, dict[str, str]]:
    """Each Set-Cookie header by name: its attributes, lower-cased, with their values ("" for a flag)."""
    out = {}
    for h in r.headers.get_list("set-cookie"):
        first, *attrs = [p.strip() for p in h.split(";")]
        name, _, value = first.partition("=")
        out[name] = {"=value": value.strip('"'), **{a.partition("=")[0].lower(): a.partition("=")[2].lower()
                                                     for a in attrs}}
    return out


def error_of(r: httpx.Response) -> str:
    text = r.text.replace("&#39;", "'").replace("&#34;", '"').replace("&quot;", '"')
    return " ".join(text.split())


# ------------------------------------------------------------- 1. https off loopback
def test_a_login_over_plain_http_off_loopback_says_the_desk_needs_https(data):
    # Chromium refuses the Secure login cookie over http off loopback; the login
    # then came back 403 "reload the login page", which never helps there.
    with client(data, host="0.0.0.0", base_url="http://desk.example.org") as c:
        page = c.get("/login")
        assert "secure" in set_cookies(page)["dw_login_csrf"]  # the cookie stays Secure: that is right
        assert page.status_code == 200 and all(s in error_of(page) for s in HTTPS_SAYS)  # said before typing
        r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": form_token(page.text)},
                   follow_redirects=False)
        assert r.status_code == 403 and all(s in error_of(r) for s in HTTPS_SAYS), error_of(r)[:2000]
        assert "reload the login page" not in error_of(r)
        # the cookie a browser over https would have sent back: the login works
        assert login(c, "alice", cookie_header=True).status_code == 303
        # a wrong token with the cookie is the CSRF refusal it always was
        r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": "x" * 32},
                   headers={"Cookie": "dw_login_csrf=" + "y" * 32}, follow_redirects=False)
        assert r.status_code == 403 and RELOAD in error_of(r)

    # where https is in use, or a browser keeps the cookie, a missing cookie is what it was
    for how in (dict(host="0.0.0.0", base_url="https://desk.example.org"),  # TLS (uvicorn's scheme)
                dict(host="127.0.0.1", base_url="http://127.0.0.1"),  # a loopback desk
                dict(host="0.0.0.0", base_url="http://127.0.0.1:8080"),  # off loopback, at a loopback name
                dict(host="127.0.0.1", base_url="http://127.0.0.1", public_url="https://desk.example.org")):
        with client(data, **how) as c:
            page = c.get("/login")
            assert 'id="login-error"' not in page.text, how
            r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": form_token(page.text)},
                       headers={"Cookie": ""}, follow_redirects=False)
            assert r.status_code == 403 and RELOAD in error_of(r) and "HTTPS" not in error_of(r), how
    # an https public_url says TLS is in front (a terminator may add no header): no notice on the
    # page, but a login that comes without the cookie over plain http is told why
    with client(data, host="0.0.0.0", base_url="http://desk.example.org", public_url="https://desk.example.org") as c:
        page = c.get("/login")
        assert page.status_code == 200 and 'id="login-error"' not in page.text
        r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": form_token(page.text)},
                   follow_redirects=False)
        assert r.status_code == 403 and all(s in error_of(r) for s in HTTPS_SAYS)
    # a proxy the desk does not trust says the browser's page is https: that browser kept the cookie
    with client(data, host="0.0.0.0", base_url="http://desk.example.org") as c:
        for header in ({"X-Forwarded-Proto": "https"}, {"Forwarded": 'for=203.0.113.7;proto="https"'}):
            r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": "x" * 32},
                       headers=header, follow_redirects=False)
            assert r.status_code == 403 and RELOAD in error_of(r), header


def test_serve_warns_off_loopback_without_tls_and_a_trusted_proxys_https_is_believed(data):
    """A real `deepwatch serve` on 0.0.0.0: one warning at start, naming what to
    set; behind a trusted TLS proxy (X-Forwarded-Proto: https, applied by
    uvicorn) no warning and no HTTPS message."""
    console = {"DEEPWATCH_LOG_FORMAT": "console"}  # the readable lines (JSON records: tests/test_json_log_lines.py)
    desk = DeskServer(data, host="0.0.0.0", env=console)
    try:
        r = httpx.post(f"http://127.0.0.1:{desk.port}/login", headers={"Host": "desk.example.org"},
                       data={"username": "alice", "password": PASSWORD, "csrf": "x" * 32}, timeout=30)
        assert r.status_code == 403 and all(s in error_of(r) for s in HTTPS_SAYS)
    finally:
        desk.stop()
    said = " ".join(desk.log.read_text().split())
    assert said.count("warning: the desk listens on 0.0.0.0 over plain http") == 1, said
    assert "desk.trusted_proxies" in said and "desk.public_url" in said and "--host 127.0.0.1" in said

    desk = DeskServer(data, host="0.0.0.0", env={**console, "DEEPWATCH_DESK__TRUSTED_PROXIES": '["127.0.0.1"]'})
    try:
        proxied = {"Host": "desk.example.org", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
        with httpx.Client(base_url=f"http://127.0.0.1:{desk.port}", headers=proxied, timeout=30) as c:
            page = c.get("/login")
            assert 'id="login-error"' not in page.text
            r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": form_token(page.text)},
                       headers={"Cookie": ""})
            assert r.status_code == 403 and RELOAD in error_of(r)
            # the same proxy's plain-http listener: the page says before a password is typed (the proxy's
            # word, though TLS is configured), and a login is told why it cannot work
            plain = {"X-Forwarded-Proto": "http"}
            assert all(s in error_of(c.get("/login", headers=plain)) for s in HTTPS_SAYS)
            r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": "x" * 32},
                       headers={**plain, "Cookie": ""})
            assert r.status_code == 403 and all(s in error_of(r) for s in HTTPS_SAYS)
    finally:
        desk.stop()
    assert "warning: the desk listens" not in desk.log.read_text()
    desk = DeskServer(data, env=console)  # loopback: nothing to warn of
    desk.stop()
    assert "warning: the desk listens" not in desk.log.read_text()


def _require_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright for Python is not installed (pip install -e .[dev])")


def test_chromium_off_loopback_over_http_is_told_to_use_https_and_logs_in_at_a_loopback_name(data):
    """Chromium itself: at http://desk.test (a name for this machine that is not
    loopback) it keeps no Secure cookie, and the desk says why; at
    http://127.0.0.1 (a trustworthy origin) the same desk logs in, a second
    login ends the first session, and a logout deletes the Secure session
    cookie."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    desk = DeskServer(data, host="0.0.0.0")
    named, local = f"http://desk.test:{desk.port}", f"http://127.0.0.1:{desk.port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--host-resolver-rules=MAP desk.test 127.0.0.1"])
            try:
                ctx = browser.new_context()
                page = ctx.new_page()
                page.goto(named + "/login")
                assert "needs HTTPS off loopback" in page.inner_text("#login-error")
                assert [c["name"] for c in ctx.cookies()] == []  # refused: Secure over http
                page.fill("input[name=username]", "alice")
                page.fill("input[name=password]", PASSWORD)
                with page.expect_navigation():
                    page.click("#login-submit")
                body = page.inner_text("body")
                assert "403" in body and "needs HTTPS off loopback" in body and "desk.trusted_proxies" in body
                assert "reload the login page" not in body

                def log_in(user: str) -> None:
                    page.goto(local + "/login")
                    page.fill("input[name=username]", user)
                    page.fill("input[name=password]", PASSWORD)
                    page.click("#login-submit")
                    page.wait_for_url(local + "/")

                log_in("alice")
                assert page.inner_text("#whoami") == "alice (editor)"
                first = {c["name"]: c for c in ctx.cookies()}["dw_session"]
                assert first["secure"] and first["httpOnly"] and first["sameSite"] == "Strict"
                assert "dw_login_csrf" not in {c["name"] for c in ctx.cookies()}  # deleted, Secure as it was set

                log_in("bob")  # bob at the same browser: alice's session ends, not only its cookie
                assert page.inner_text("#whoami") == "bob (viewer)"
                second = {c["name"]: c for c in ctx.cookies()}["dw_session"]
                assert second["value"] != first["value"]
                old = httpx.get(local + "/api/clusters", headers={"Cookie": f"dw_session={first['value']}"}, timeout=30)
                assert old.status_code == 401
                assert httpx.get(local + "/api/clusters", headers={"Cookie": f"dw_session={second['value']}"},
                                 timeout=30).status_code == 200

                with page.expect_navigation():
                    page.click("form[action='/logout'] button")
                assert "dw_session" not in {c["name"] for c in ctx.cookies()}
                assert httpx.get(local + "/api/clusters", headers={"Cookie": f"dw_session={second['value']}"},
                                 timeout=30).status_code == 401
            finally:
                browser.close()
    finally:
        desk.stop()


# ------------------------------------------------------------- 2. cookie deletion
def test_cookies_are_deleted_with_the_attributes_they_were_set_with(data):
    for base, secure in (("https://127.0.0.1", True), ("http://127.0.0.1", False)):
        with client(data, base_url=base) as c:
            page = c.get("/login")
            set_login = set_cookies(page)["dw_login_csrf"]
            r = login(c, "alice")
            assert r.status_code == 303
            made = set_cookies(r)
            session, gone = made["dw_session"], made["dw_login_csrf"]
            assert gone["max-age"] == "0" and gone["=value"] == ""
            for attrs in (set_login, session, gone):
                assert attrs["samesite"] == "strict" and "httponly" in attrs and attrs["path"] == "/", attrs
                assert ("secure" in attrs) is secure, (base, attrs)
            csrf = form_token(c.get("/similar").text)
            r = c.post("/logout", data={"csrf": csrf}, follow_redirects=False)
            assert r.status_code == 303
            out = set_cookies(r)["dw_session"]
            assert out["max-age"] == "0" and out["=value"] == ""
            assert out["samesite"] == "strict" and "httponly" in out and ("secure" in out) is secure, (base, out)
            assert "dw_session" not in c.cookies


# ------------------------------------------------------------- 3. a login ends the presented session
def test_a_login_ends_the_session_the_browser_presented(data):
    with client(data, require_login_on_loopback=True) as c:
        desk = c.app.state.desk
        assert login(c, "alice").status_code == 303
        first = c.cookies["dw_session"]
        assert c.get("/api/clusters").status_code == 200 and desk.db.session(first) is not None
        r = login(c, "bob")  # the browser sends alice's session with bob's login
        assert r.status_code == 303
        second = c.cookies["dw_session"]
        assert second != first and desk.db.session(first) is None  # ended, not only replaced in this browser
        assert c.get("/api/clusters", headers={"Cookie": f"dw_session={first}"}).status_code == 401
        assert c.get("/api/clusters").status_code == 200
        # a wrong password ends nothing
        page = c.get("/login")
        r = c.post("/login", data={"username": "bob", "password": "wrong password", "csrf": form_token(page.text)})
        assert r.status_code == 401 and desk.db.session(second) is not None
        # a session cookie that names no session (ended, forged) is no obstacle
        c.cookies.clear()
        c.cookies.set("dw_session", "not-a-session")
        assert login(c, "alice").status_code == 303


# ------------------------------------------------------------- 4. owner-only files
def test_the_desk_database_and_thumbnail_cache_are_owner_only(data, umask_022):
    # They followed the umask (0644, 0755): verdict notes, user names and each
    # session's CSRF token were readable by every local user.
    with client(data) as c:
        assert login(c, "alice").status_code == 303  # a session written: the WAL is in use
        member = c.get("/api/clusters/c-viral").json()["members"][0]["sha256"]
        assert c.get(f"/thumb/{member}").status_code == 200
        files = {p.name: mode_of(p) for p in data.glob("desk.sqlite*")}
        assert files == {"desk.sqlite": 0o600, "desk.sqlite-wal": 0o600, "desk.sqlite-shm": 0o600}, files
        assert mode_of(data / "desk" / "thumbs") == 0o700
    assert mode_of(data / "desk-users.json") == 0o600  # as it was


def test_a_desk_database_and_cache_made_before_are_narrowed_at_start(tmp_path, umask_022):
    (tmp_path / "desk" / "thumbs").mkdir(parents=True)
    db = DeskDB(tmp_path / "desk.sqlite")
    db.new_session("alice", "editor", 1, "x")
    for p in [tmp_path / "desk.sqlite", tmp_path / "desk.sqlite-wal", tmp_path / "desk.sqlite-shm"]:
        os.chmod(p, 0o644)  # as a desk before this one left them
    os.chmod(tmp_path / "desk" / "thumbs", 0o755)
    db2 = DeskDB(tmp_path / "desk.sqlite")
    assert {p.name: mode_of(p) for p in tmp_path.glob("desk.sqlite*")} == dict.fromkeys(
        ("desk.sqlite", "desk.sqlite-wal", "desk.sqlite-shm"), 0o600)
    assert db2.session("nope") is None
    db.close()
    db2.close()
    from streams.desk.thumbs import Thumbnails

    Thumbnails(tmp_path / "blobs", tmp_path / "desk" / "thumbs", max_bytes=1 << 20)
    assert mode_of(tmp_path / "desk" / "thumbs") == 0o700


# ------------------------------------------------------------- 5. no server header on serve-ingest
def test_serve_ingest_sends_no_server_header(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": "desk:desk-token-0123456789abcdef",
           "DEEPWATCH_DATA_DIR": str(tmp_path)}
    # no broker is needed to answer /healthz and refusals
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--host", "127.0.0.1",
                             "--port", str(port), "--broker", "kafka://127.0.0.1:1"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "serve-ingest did not start"
                time.sleep(0.2)
        refused = httpx.post(f"http://127.0.0.1:{port}/ingest", content="{}", timeout=5)
        assert health.status_code == 200 and refused.status_code == 401
        for r in (health, refused):
            assert "server" not in r.headers, dict(r.headers)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # as sent, whatever a client library adds
            s.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := s.recv(4096):
                raw += chunk
        assert b"\r\nserver:" not in raw.split(b"\r\n\r\n")[0].lower(), raw[:500]
    finally:
        proc.terminate()
        proc.wait(20)


# ------------------------------------------------------------- the desk verdict as bank evidence
def _row(verdict: str) -> OverlayRow:
    return OverlayRow(cluster_id="c1", verdict=verdict, verdict_id=7, source_cluster="c1",
                      detail=f"desk verdict {verdict} by alice on cluster c1")


def _bank(verdict: str, detector: str = "bank:afp-checks", weight: float = 3.0, bank: str | None = None) -> Evidence:
    """A bank match as ``detectors.banks.bank_evidence`` makes it (``bank``: the
    bank its data names; None: as matches were recorded before they named it)."""
    data = {"verdict": verdict, "entry_id": "1", "label": None, "distance": 0, "via": "sha256",
            "suppress": verdict == "authentic"}
    if bank is not None:
        data["bank"] = bank
    return Evidence(detector=detector, kind=EvidenceKind.BANK, score=0.97 if verdict == "fake" else 0.03,
                    weight=weight, detail=f"matches {detector} entry 1", data=data)


GENERATOR = Evidence(detector="metadata", score=0.98, weight=3.0, detail="PNG text chunk names the generator")
MODEL_SAYS_REAL = Evidence(detector="model:x", kind=EvidenceKind.MODEL, score=0.05, weight=1.5, detail="a model")


def test_the_desk_verdict_is_bank_evidence_and_fuses_as_a_bank_match():
    for verdict in ("fake", "authentic"):
        ev = desk_bank_evidence(verdict, _row(verdict))
        assert ev.kind is EvidenceKind.BANK and ev.data["verdict"] == verdict and ev.weight == 3.0
        for others in ([], [GENERATOR], [MODEL_SAYS_REAL], [GENERATOR, MODEL_SAYS_REAL]):
            as_desk, as_bank = fuse([*others, ev]), fuse([*others, _bank(verdict)])
            assert as_desk.score == pytest.approx(as_bank.score), (verdict, others)
            assert as_desk.verdict == as_bank.verdict, (verdict, others)
    # as decisive as a bank match: a fake verdict damps a pixel model that says real (rule 4)
    fused = fuse([desk_bank_evidence("fake", _row("fake")), MODEL_SAYS_REAL])
    assert fused.verdict == "likely-ai" and fused.score > 0.99
    # an authentic verdict against a generator's metadata: even odds' side of it, as documented (0.78)
    assert round(fuse([GENERATOR, desk_bank_evidence("authentic", _row("authentic"))]).score, 2) == 0.78
    # fusion takes a bank item's direction from its verdict: a score that disagrees is overruled
    flipped = desk_bank_evidence("fake", _row("fake")).model_copy(update={"score": 0.2})
    assert fuse([flipped]).verdict == "likely-ai"


def _doc(*evidence: Evidence) -> dict:
    return {"id": "c1", "fake_score": 0.2, "verdict": "no-evidence",
            "evidence": [e.model_dump(exclude_none=True) for e in evidence]}


def _desk_items(doc: dict) -> list[dict]:
    return [e for e in doc["evidence"] if e["detector"] == "desk:verdict"]


def test_the_overlay_counts_one_human_decision_once_by_kind_and_data_not_by_name():
    # the desk bank's match on a repost: the same decision, not added again
    doc = _apply_overlay(_doc(_bank("fake", "bank:desk-fake")), _row("fake"))
    assert _desk_items(doc) == [] and doc["verdict"] == "likely-ai"
    # decided by kind and the bank the data names, whatever the detector is called
    doc = _apply_overlay(_doc(_bank("fake", "bank:renamed", bank="desk-fake")), _row("fake"))
    assert _desk_items(doc) == [] and doc["fake_score"] > 0.99
    # another bank's match the same way is another fact-check: the desk's decision still counts,
    # also where the match was recorded before matches named their bank
    for match in (_bank("fake", "bank:afp-checks", bank="afp-checks"), _bank("fake", "bank:afp-checks")):
        doc = _apply_overlay(_doc(match), _row("fake"))
        assert [e["kind"] for e in _desk_items(doc)] == ["bank"]
    # ...and a name alone is not a bank match: an item called bank:desk-fake of another kind
    named = Evidence(detector="bank:desk-fake", kind=EvidenceKind.METADATA, score=0.6, weight=0.5, detail="not a bank",
                     data={"verdict": "fake"})
    doc = _apply_overlay(_doc(named), _row("fake"))
    assert [e["kind"] for e in _desk_items(doc)] == ["bank"]
    # a bank match the other way is the other decision: the desk's is added, kind bank, and weighs as one
    doc = _apply_overlay(_doc(_bank("authentic", "bank:desk-authentic")), _row("fake"))
    assert [(e["kind"], e["data"]["verdict"]) for e in _desk_items(doc)] == [("bank", "fake")]
    assert doc["verdict"] == "likely-ai" and doc["fake_score"] == 0.5  # two human decisions, equal and opposite
    # no bank match at all: the verdict joins as a decisive bank item; authentic suppresses
    doc = _apply_overlay(_doc(GENERATOR), _row("authentic"))
    assert [(e["kind"], e["data"]["verdict"]) for e in _desk_items(doc)] == [("bank", "authentic")]
    assert doc["verdict"] == "no-evidence" and round(doc["fake_score"], 2) == 0.78
    assert doc["suppressed"].startswith("desk verdict")
    assert doc["desk"]["stream_fake_score"] == 0.2 and doc["desk"]["stream_verdict"] == "no-evidence"
    # needs-review re-scores nothing
    doc = _apply_overlay(_doc(GENERATOR), _row("needs-review"))
    assert _desk_items(doc) == [] and doc["fake_score"] == 0.2 and doc["desk"]["verdict"] == "needs-review"
