"""`deepwatch serve` as the contract states it: its own process (FastAPI +
uvicorn) on a loopback port over a data dir; and its command-line mistakes
end in one clear line, not a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx

from tests.desk_support import REPO, DeskServer, free_port, small_store


def deepwatch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_serve_contract(tmp_path):
    small_store(tmp_path)
    desk = DeskServer(tmp_path, extra=("--store", f"sqlite:///{tmp_path / 'findings.sqlite'}"))
    try:
        with httpx.Client(base_url=desk.url, timeout=30) as c:
            page = c.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert 'id="queue"' in page.text
            rows = c.get("/api/clusters?sort=score&limit=3").json()
            assert len(rows) == 3 and rows[0]["fake_score"] >= rows[-1]["fake_score"]
            assert c.get("/api/clusters/c-viral").json()["id"] == "c-viral"
            assert c.get("/api/accounts?min_ai_share=0.5&min_posts=5").json()[0]["id"] == "persona1"
            r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake", "note": "x"})
            assert r.status_code == 401 and r.json()["error"]
            # a malformed body: still 401, before the body is read (was a 422 with the schema's details)
            r = c.post("/api/clusters/c-viral/verdict", content="[[[", headers={"Content-Type": "application/json"})
            assert r.status_code == 401 and "detail" not in r.json()
            assert c.get("/docs").status_code == 200
            assert "/api/clusters" in c.get("/openapi.json").json()["paths"]
    finally:
        desk.stop()


def test_serve_on_elasticsearch(tmp_path, fake_es):
    """The same desk over an Elasticsearch findings store (the loopback fake):
    no SQLite findings file is read or made."""
    from streams.es_store import EsFindingsStore

    small_store(tmp_path, EsFindingsStore.from_url(fake_es.url))
    port = fake_es.url.rsplit(":", 1)[1]
    desk = DeskServer(tmp_path, extra=("--store", f"es://127.0.0.1:{port}"))
    try:
        with httpx.Client(base_url=desk.url, timeout=30) as c:
            page = c.get("/")
            assert page.status_code == 200 and 'id="queue"' in page.text and "c-viral" in page.text
            rows = c.get("/api/clusters").json()
            assert rows[0]["id"] == "c-persona4" and len(rows) == 8  # the one sighted last (velocity decays)
            d = c.get("/api/clusters/c-viral").json()
            assert d["sightings"] == 12 and len(d["sightings_detail"]) == 12
            assert c.get("/api/accounts?min_ai_share=0.5&min_posts=5").json()[0]["id"] == "persona1"
            assert len(c.get("/api/accounts/persona1").json()["posts_detail"]) == 5
            assert c.get("/clusters/c-viral").status_code == 200 and c.get("/accounts").status_code == 200
    finally:
        desk.stop()
    assert not (tmp_path / "findings.sqlite").exists()
    # the account page read that account's sightings from the data stream
    searches = fake_es.calls("POST", "/deepwatch-sightings/_search") + fake_es.calls("GET", "/deepwatch-sightings/_search")
    assert any('"account_id": "persona1"' in json.dumps(r.body) for r in searches)


def test_a_findings_store_that_cannot_answer_is_a_503_to_try_again_not_an_internal_error(tmp_path, fake_es):
    """Elasticsearch overloaded (503) or missing a shard: the desk answered
    500 "internal error", which sent people looking for a desk bug and told
    scripts not to retry. Now 503 with Retry-After, in the API's JSON and as
    a page, and the desk answers again as soon as the store does."""
    from streams.es_store import EsFindingsStore

    small_store(tmp_path, EsFindingsStore.from_url(fake_es.url))
    port = fake_es.url.rsplit(":", 1)[1]
    editor = "editor-token-for-the-store-outage-0123"
    desk = DeskServer(tmp_path, env={"DEEPWATCH_DESK_TOKENS": f"editor:ed:{editor}"},
                      extra=("--store", f"es://127.0.0.1:{port}"))
    overloaded = {"error": {"type": "es_rejected_execution_exception", "reason": "rejected execution"}, "status": 503}
    try:
        with httpx.Client(base_url=desk.url, timeout=30) as c:
            assert c.get("/api/accounts/persona1").status_code == 200
            fake_es.fail_requests(503, overloaded, times=1000, path="/_search")
            api = c.get("/api/accounts/persona1")
            assert api.status_code == 503 and api.headers["Retry-After"] == "30", api.text
            assert "findings store is not answering" in api.json()["error"]
            page = c.get("/accounts/persona1")
            assert page.status_code == 503 and "findings store is not answering" in page.text
            # a verdict the outage stopped: "try again" only if it was not recorded (a retry of a recorded
            # one is a second verdict in the audit trail)
            token = {"Authorization": "Bearer " + editor}
            wrote = c.post("/api/clusters/c-viral/verdict", json={"verdict": "needs-review"}, headers=token)
            fake_es.request_faults.clear()
            assert c.get("/api/accounts/persona1").status_code == 200
            history = c.get("/api/clusters/c-viral").json()["verdict_history"]
            if wrote.status_code == 201:  # the desk's view had what it needed; the account check after it waits
                assert [h["verdict_id"] for h in history] == [wrote.json()["verdict_id"]]
            elif history:
                assert wrote.status_code == 503 and "Retry-After" not in wrote.headers, wrote.text
                assert "was recorded" in wrote.json()["error"]
            else:
                assert wrote.status_code == 503 and wrote.headers["Retry-After"] == "30", wrote.text
    finally:
        desk.stop()


def test_serve_mistakes_are_one_clear_line(tmp_path):
    r = deepwatch("serve", "--data-dir", str(tmp_path / "nothing"), "--port", "0")
    assert r.returncode == 2 and "no findings at" in r.stderr and "deepwatch demo" in r.stderr
    assert "Traceback" not in r.stderr
    small_store(tmp_path)
    r = deepwatch("serve", "--data-dir", str(tmp_path), "--store", f"es://127.0.0.1:{free_port()}", "--port", "0")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "cannot read the findings store es://127.0.0.1:" in said and "Traceback" not in said
    r = deepwatch("serve", "--data-dir", str(tmp_path), "--store", "mysql://db/x", "--port", "0")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "unknown findings store" in said and "Traceback" not in said
    r = deepwatch("serve", "--data-dir", str(tmp_path), "--port", "0", env={"DEEPWATCH_DESK_TOKENS": "editor:me:short"})
    assert r.returncode == 2 and "shorter than 16 characters" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "desk-users.json").write_text('{"users": [{"name": "x", "role": "root", "password": "plain"}]}')
    r = deepwatch("serve", "--data-dir", str(tmp_path), "--port", "0")
    said = " ".join(r.stderr.split())  # rich wraps long lines
    assert r.returncode == 2 and "desk-users.json is not valid: role:" in said and "Traceback" not in said
    (tmp_path / "desk-users.json").unlink()
    r = deepwatch("desk-user", "eve", "--role", "admin", "--data-dir", str(tmp_path), "--password-env", "X")
    assert r.returncode == 2 and "viewer or editor" in r.stderr
    r = deepwatch("desk-user", "eve", "--role", "editor", "--data-dir", str(tmp_path), "--password-env", "PW",
                  env={"PW": "short"})
    assert r.returncode == 2 and "10 characters" in r.stderr
    r = deepwatch("desk-user", "eve", "--role", "editor", "--data-dir", str(tmp_path), "--password-env", "PW",
                  env={"PW": "long enough password"})
    assert r.returncode == 0 and (tmp_path / "desk-users.json").exists()


def test_serve_health_and_metrics(tmp_path):
    """Probes get /healthz without a login even where reading needs one; the
    operator's Prometheus reads request, verdict and login counters on
    --metrics-port, apart from the desk's own port, labelled by route
    template (no cluster ids in label values)."""
    from prometheus_client.parser import text_string_to_metric_families

    small_store(tmp_path)
    token = "k" * 32
    metrics_port = free_port()
    desk = DeskServer(tmp_path, env={"DEEPWATCH_DESK__REQUIRE_LOGIN_ON_LOOPBACK": "true",
                                     "DEEPWATCH_DESK_TOKENS": f"editor:ci-bot:{token}"},
                      extra=("--metrics-port", str(metrics_port)))
    try:
        with httpx.Client(base_url=desk.url, timeout=30) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            r = c.get("/api/clusters")  # on loopback: the 401 says the setting asks for a login
            assert r.status_code == 401 and "require_login_on_loopback" in r.json()["error"]
            assert "not on a loopback" not in r.json()["error"]
            assert c.get("/metrics").status_code == 404  # not on the desk's port
            auth = {"Authorization": f"Bearer {token}"}
            assert c.get("/api/clusters/c-viral", headers=auth).status_code == 200
            r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "needs-review", "note": "check"}, headers=auth)
            assert r.status_code == 201
            r = c.post("/api/clusters/c-viral/verdict", content="[[[", headers={"Content-Type": "application/json", **auth})
            assert r.status_code == 422 and "not valid JSON" in r.json()["error"]  # an editor gets the details
            form = c.get("/login").text
            csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
            r = c.post("/login", data={"username": "erin", "password": "not the password", "csrf": csrf})
            assert r.status_code == 401
            for n in range(3):  # made-up method names: each was a series of its own, kept for ever
                assert c.request(f"X{n}" * 200, "/").status_code == 405
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    finally:
        desk.stop()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def requests(route: str, status: str, method: str = "GET") -> float:
        return samples.get(("deepwatch_desk_requests_total",
                            (("method", method), ("route", route), ("status", status))), 0.0)

    assert requests("/healthz", "200") == 1
    assert requests("/api/clusters", "401") == 1
    assert requests("unmatched", "404") == 1
    assert requests("/api/clusters/{cluster_id}", "200") == 1
    assert requests("/api/clusters/{cluster_id}/verdict", "201", "POST") == 1
    assert samples[("deepwatch_desk_verdicts_total", (("verdict", "needs-review"),))] == 1
    assert samples[("deepwatch_desk_logins_total", (("outcome", "failed"),))] == 1
    assert samples[("deepwatch_desk_request_seconds_count", (("route", "/api/clusters/{cluster_id}"),))] == 1
    assert not any("c-viral" in str(labels) for _, labels in samples)
    assert requests("/", "405", "OTHER") == 3
    assert {dict(labels)["method"] for name, labels in samples if name == "deepwatch_desk_requests_total"} <= {
        "GET", "POST", "OTHER"}
    # the desk logs as the workers do (log_format json by default): one object per line, fields kept
    logged = [json.loads(line) for line in desk.log.read_text().splitlines() if line.startswith("{")]
    [failed] = [r for r in logged if r["msg"] == "desk login failed"]
    assert failed["level"] == "warning" and failed["user"] == "erin", failed


def test_slow_and_piled_up_clients_do_not_take_the_desk(tmp_path):
    # uvicorn bounds neither: a client trickling header bytes held its
    # connection for good, and some thousands of them used up the desk's file
    # descriptors (every other client then timed out; each refused accept
    # logged a traceback).
    import socket
    import time

    from streams.cli.serve import DESK_CONNECTIONS
    from streams.http_deadlines import HEADER_TIMEOUT_S

    small_store(tmp_path)
    desk = DeskServer(tmp_path)
    held: list[socket.socket] = []
    try:
        slow = socket.create_connection(("127.0.0.1", desk.port))
        slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        opened = time.monotonic()
        for _ in range(DESK_CONNECTIONS + 50):
            held.append(socket.create_connection(("127.0.0.1", desk.port)))
        # over the cap: closed before a byte is read, and the desk still answers once they go
        held[-1].settimeout(5)
        assert held[-1].recv(1) == b""
        slow.settimeout(HEADER_TIMEOUT_S + 10)
        assert slow.recv(1) == b""  # closed at the head deadline
        assert HEADER_TIMEOUT_S - 1 < time.monotonic() - opened < HEADER_TIMEOUT_S + 10
        for s in held:
            s.close()
        assert httpx.get(desk.url + "/healthz", timeout=10).status_code == 200
        assert "Traceback" not in desk.log.read_text()
    finally:
        for s in held:
            s.close()
        desk.stop()


def _login_form(c: httpx.Client) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)


def test_a_desk_behind_a_loopback_proxy_needs_a_login_and_sets_secure_cookies(tmp_path):
    """nginx's `proxy_pass http://127.0.0.1:PORT` in front of a loopback desk,
    as the desk sees it through uvicorn: Host 127.0.0.1:PORT, the client in
    X-Forwarded-For, https in X-Forwarded-Proto. Every internet client read the
    desk without a login, and the login cookie had no Secure flag."""
    from streams.desk.auth import add_user

    small_store(tmp_path)
    add_user(tmp_path / "desk-users.json", "alice", "editor", "correct horse battery")
    desk = DeskServer(tmp_path, env={"DEEPWATCH_DESK__TRUSTED_PROXIES": '["127.0.0.1"]'})
    proxied = {"Host": f"127.0.0.1:{desk.port}", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    try:
        with httpx.Client(base_url=desk.url, headers=proxied, timeout=30) as c:
            for path in ("/api/clusters?limit=2", "/api/accounts/persona1", "/openapi.json"):
                r = c.get(path)
                assert r.status_code == 401 and "login required" in r.json()["error"], (path, r.text)
            assert c.get("/", follow_redirects=False).headers["location"].startswith("/login")
            page = c.get("/login")
            assert "secure" in page.headers["set-cookie"].lower()
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            r = c.post("/login", data={"username": "alice", "password": "correct horse battery", "csrf": csrf},
                       headers={"Cookie": f"dw_login_csrf={csrf}"}, follow_redirects=False)
            session = next(h for h in r.headers.get_list("set-cookie") if h.startswith("dw_session="))
            assert r.status_code == 303 and "secure" in session.lower(), session
            assert r.headers["strict-transport-security"] == "max-age=31536000"
            cookie = session.split(";", 1)[0]
            assert c.get("/api/clusters?limit=2", headers={"Cookie": cookie}).status_code == 200
        # the same desk, asked from this machine with no proxy in between: a proxied desk always logs in
        assert httpx.get(desk.url + "/api/clusters", timeout=30).status_code == 401
    finally:
        desk.stop()


def test_guesses_spread_over_addresses_do_not_lock_an_editor_out(tmp_path):
    """Four addresses with five wrong passwords each for alice (the per-name
    limit) locked alice out from every address, her own included."""
    from streams.desk.auth import add_user

    small_store(tmp_path)
    add_user(tmp_path / "desk-users.json", "alice", "editor", "correct horse battery")
    desk = DeskServer(tmp_path, env={"DEEPWATCH_DESK__TRUSTED_PROXIES": '["127.0.0.1"]'})

    def client(address: str) -> httpx.Client:
        return httpx.Client(base_url=desk.url, headers={"X-Forwarded-For": address}, timeout=60)

    def login(c: httpx.Client, password: str) -> httpx.Response:
        csrf = _login_form(c)
        return c.post("/login", data={"username": "alice", "password": password, "csrf": csrf},
                      follow_redirects=False)

    try:
        with client("192.0.2.200") as c:  # alice at her own desk, earlier
            assert login(c, "correct horse battery").status_code == 303
        for i in range(4):  # desk.login_failures_per_minute is 5: 20 for the name
            with client(f"198.51.100.{i + 1}") as c:
                assert [login(c, f"guess {k}").status_code for k in range(5)] == [401] * 5
                assert login(c, "another guess").status_code == 429
        with client("192.0.2.200") as c:  # alice at her own desk, the right password
            r = login(c, "correct horse battery")
            assert r.status_code == 303 and "dw_session=" in r.headers["set-cookie"], r.text
        with client("192.0.2.201") as c:  # the name's limit still holds for every other address
            r = login(c, "correct horse battery")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    finally:
        desk.stop()


def test_the_desk_beats_its_event_loop_for_the_liveness_probe_on_the_metrics_port(tmp_path):
    # k8s probed liveness on the desk's own port, which a flood of slow clients
    # fills (503, restarts of a healthy pod); the metrics port's /healthz said
    # "no heartbeat yet" for good, as the desk's loop never beat
    small_store(tmp_path)
    port = free_port()
    desk = DeskServer(tmp_path, extra=("--metrics-port", str(port)))
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert r.status_code == 200 and "event loop beat" in r.text, r.text
    finally:
        desk.stop()
