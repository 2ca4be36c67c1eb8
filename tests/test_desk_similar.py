"""The desk's "have we seen this picture?" (``POST /api/similar`` and the
Find a picture page): the real app over a real findings store (SQLite and the
Elasticsearch fake), real banks; the guards before any upload is read, over
a real socket to ``deepwatch serve``."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from typer.testing import CliRunner

from streams.desk import create_app, observe
from streams.desk.auth import add_user
from streams.desk.lookup import UPLOAD_OVERHEAD
from streams.settings import Settings
from tests.desk_support import DeskServer, jpeg, small_store
from tests.support import picture

VIEWER_TOKEN = "viewer-token-0123456789abcdef"
VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
MAX_BYTES = 300_000  # fetch.max_bytes in these tests: the upload bound is this plus UPLOAD_OVERHEAD
# desk_support.small_store's c-viral is picture(1) at 160x120: a tip-line copy, smaller and recompressed
REPOST = jpeg(picture(1, (160, 120)).resize((136, 102)), 55)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"viewer:vi:{VIEWER_TOKEN}")


def make_settings(data: Path, store_url: str | None = None, **desk) -> Settings:
    s = Settings(data_dir=data)
    s.findings.url = store_url
    s.fetch.max_bytes = MAX_BYTES
    s.desk.account_check_s = 3600
    for k, v in desk.items():
        setattr(s.desk, k, v)
    return s


def client(settings: Settings, host: str = "127.0.0.1") -> TestClient:
    return TestClient(create_app(settings, host=host), base_url="http://127.0.0.1")


def upload(data: bytes, name: str = "tip.jpg") -> dict:
    return {"files": {"image": (name, data, "image/jpeg")}}


def cli_similar(path: Path, data: Path, store_url: str | None) -> list[dict]:
    from streams.cli import app

    r = CliRunner().invoke(app, ["similar", str(path), "--data-dir", str(data),
                                 *(["--store", store_url] if store_url else [])])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_a_viewer_finds_the_cluster_of_a_recompressed_resized_copy(backend, env, tmp_path):
    data, url = backend
    seen = observe.LOOKUPS.labels("seen")._value.get()
    with client(make_settings(data, url)) as c:
        r = c.post("/api/similar", headers=VIEWER, **upload(REPOST))
        assert r.status_code == 200, r.text
        rows = r.json()
        assert [x["cluster_id"] for x in rows] == ["c-viral"]
        row = rows[0]
        assert row["desk_url"] == "/clusters/c-viral"
        assert row["cluster"]["id"] == "c-viral" and row["cluster"]["verdict"] == "likely-ai"
        assert row["cluster"]["sightings"] == 12 and row["cluster"]["platforms"] == ["weibo", "x"]
        assert c.get(row["desk_url"]).status_code == 200
        # the CLI's rows for the same picture, the desk's additions aside (its JSON is the contract)
        (tmp_path / "tip.jpg").write_bytes(REPOST)
        assert [{k: v for k, v in x.items() if k not in ("desk_url", "cluster")} for x in rows] == \
            cli_similar(tmp_path / "tip.jpg", data, url)
        # an unrelated picture: not seen
        r = c.post("/api/similar", headers=VIEWER, **upload(jpeg(picture(4242, (160, 120)))))
        assert r.status_code == 200 and r.json() == []
    assert observe.LOOKUPS.labels("seen")._value.get() == seen + 1


def test_a_restarted_desk_starts_its_member_index_from_the_copy_the_last_one_saved(tmp_path, env, monkeypatch):
    # a desk indexed every stored member on its first lookup after each start (~12 s at a million)
    from streams import similar
    from streams.store import SqliteFindingsStore, open_store

    small_store(tmp_path)
    settings = make_settings(tmp_path)
    read: list[int] = []
    members_after = SqliteFindingsStore.members_after
    monkeypatch.setattr(SqliteFindingsStore, "members_after",
                        lambda self, after, limit=20_000: read.extend([after]) or members_after(self, after, limit))

    def desk_lookup() -> list[str]:
        with client(settings) as c:
            r = c.post("/api/similar", headers=VIEWER, **upload(REPOST))
            assert r.status_code == 200, r.text
            return [x["cluster_id"] for x in r.json()]

    assert desk_lookup() == ["c-viral"] and read[0] == 0  # no copy: every member, from the first
    store = open_store(tmp_path)
    path = similar.index_file(store, settings.dedupe.pdq_min_quality)
    stored = store._db.execute("SELECT MAX(rowid) FROM members").fetchone()[0]
    store.close()
    assert path.is_file()  # saved by the lookup that indexed the store
    read.clear()
    assert desk_lookup() == ["c-viral"]
    assert read == [stored]  # only what was stored after the copy: nothing
    path.write_bytes(b"damaged")
    read.clear()
    assert desk_lookup() == ["c-viral"] and read[0] == 0  # not used: indexed from the store again

    # the lookup that indexed the store keeps the copy at once, before any stop (a desk killed outright)
    path.unlink()
    with client(settings) as c:
        assert c.post("/api/similar", headers=VIEWER, **upload(REPOST)).status_code == 200
        assert path.is_file()


def test_a_bank_entry_is_found_with_its_verdict(tmp_path, env):
    small_store(tmp_path)
    known = tmp_path / "debunked.jpg"
    picture(77, (320, 240)).save(known, quality=90)
    bank = make_settings(tmp_path).bank_store()
    bank.add_images("afp-debunked", "fake", [known])
    bank.close()
    tip = jpeg(ImageOps.mirror(picture(77, (320, 240))).resize((200, 150)), 60)
    banked = observe.LOOKUPS.labels("banked")._value.get()
    with client(make_settings(tmp_path, public_url="https://desk.example.org")) as c:
        rows = c.post("/api/similar", headers=VIEWER, **upload(tip)).json()
        assert len(rows) == 1
        row = rows[0]
        assert (row["bank"], row["entry_id"], row["verdict"], row["label"]) == ("afp-debunked", "1", "fake", "debunked.jpg")
        assert row["via"].endswith("mirror") and isinstance(row["distance"], int) and len(row["sha256"]) == 64
        # the page names the bank and the verdict
        page = c.post("/similar", **upload(tip)).text
        assert 'data-bank="afp-debunked"' in page and "known fake" in page
        # a cluster row's link is the public one when desk.public_url is set
        rows = c.post("/api/similar", headers=VIEWER, **upload(REPOST)).json()
        assert rows[0]["desk_url"] == "https://desk.example.org/clusters/c-viral"
    assert observe.LOOKUPS.labels("banked")._value.get() == banked + 2  # the API and the page


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def test_bad_uploads_are_4xx_json_never_500(tmp_path, env):
    small_store(tmp_path)
    settings = make_settings(tmp_path)
    settings.decode.max_pixels = 4_000_000
    rejected = observe.LOOKUPS.labels("rejected")._value.get()
    with client(settings) as c:
        def post(**kw) -> httpx.Response:
            r = c.post("/api/similar", headers={**VIEWER, **kw.pop("headers", {})}, **kw)
            assert r.json()["status"] == r.status_code and r.json()["error"]
            return r

        r = post(**upload(b"\x00garbage, not a picture" * 50))
        assert r.status_code == 422 and r.json()["reason"] == "undecodable"
        r = post(**upload(b""))
        assert r.status_code == 422 and r.json()["reason"] == "empty"
        bomb = _png((3000, 3000))  # 9 MP of zeros in a few KB: over decode.max_pixels
        assert len(bomb) < 50_000
        r = post(**upload(bomb, "bomb.png"))
        assert r.status_code == 422 and r.json()["reason"] == "decompression_bomb"
        r = post(**upload(b"\xff\xd8" + b"x" * (MAX_BYTES + 10)))  # over fetch.max_bytes, inside the envelope
        assert r.status_code == 413 and r.json()["reason"] == "too_large"
        r = post(data={"image": "a text field, not a file"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
        r = post(json={"image": "x"})
        assert r.status_code == 422
        # over the upload bound: declared, or as received without a Content-Length
        bound = MAX_BYTES + UPLOAD_OVERHEAD
        r = post(**upload(b"x" * (bound + 1)))
        assert r.status_code == 413 and r.json()["error"] == f"request body over {bound} bytes"
        chunks = (b"x" * 50_000 for _ in range(10))
        r = post(content=chunks, headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        # the other routes keep their 64 KiB bound
        r = c.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake", "note": "x" * 100_000}, headers=VIEWER)
        assert r.status_code == 403  # a viewer: refused before its body is read
        c.get("/login")  # the login cookie
        r = c.post("/login", data={"username": "a", "password": "p" * 100_000, "csrf": "x"})
        assert r.status_code == 413 and "65536" in r.text
        # the page says so on the page
        r = c.post("/similar", **upload(b"not a picture"))
        assert r.status_code == 422 and 'id="similar-error"' in r.text and "not a decodable image" in r.text
    assert observe.LOOKUPS.labels("rejected")._value.get() == rejected + 5


def test_lookups_in_flight_are_bounded_before_their_uploads_are_read(tmp_path, env, monkeypatch):
    """Every upload was read whole (up to fetch.max_bytes) and held while
    looked up, with no bound on how many at once: 48 uploads of 23 MiB took
    the desk to 1.8 GiB. Past MAX_LOOKUPS in flight a lookup is a 503 with
    Retry-After, answered before its body is read; it succeeds once they end."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from streams.desk import app as desk_app

    small_store(tmp_path)
    monkeypatch.setattr(desk_app, "MAX_LOOKUPS", 2)
    entered, release = threading.Semaphore(0), threading.Event()
    real = desk_app.lookup

    def held(*args, **kwargs):  # a lookup that takes until the test lets it go
        entered.release()
        assert release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(desk_app, "lookup", held)
    bound = MAX_BYTES + UPLOAD_OVERHEAD
    with client(make_settings(tmp_path)) as c, ThreadPoolExecutor(2) as pool:
        try:
            busy = [pool.submit(c.post, "/api/similar", headers=VIEWER, **upload(REPOST)),
                    pool.submit(c.post, "/similar", **upload(REPOST))]
            for _ in busy:
                assert entered.acquire(timeout=120)  # both are being looked up
            # over the upload bound: a 413 had its body been read, a 503 says it was not
            r = c.post("/api/similar", headers=VIEWER, **upload(b"x" * (bound + 1)))
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1 and "in flight" in r.json()["error"] and r.json()["status"] == 503
            r = c.post("/similar", **upload(REPOST))  # the page says so too
            assert r.status_code == 503 and r.headers["retry-after"] and "in flight" in r.text
            assert r.headers["content-type"].startswith("text/html")
            assert c.get("/api/clusters").status_code == 200  # other answers are not held up
        finally:
            release.set()
        assert [f.result().status_code for f in busy] == [200, 200]
        assert c.app.state.desk.lookups.busy == 0
        r = c.post("/api/similar", headers=VIEWER, **upload(REPOST))
        assert r.status_code == 200 and [x["cluster_id"] for x in r.json()] == ["c-viral"]


def test_sessions_send_their_csrf_token(tmp_path, env):
    small_store(tmp_path)
    add_user(tmp_path / "desk-users.json", "vic", "viewer", "a long viewer password")
    with client(make_settings(tmp_path, require_login_on_loopback=True)) as c:
        r = c.post("/api/similar", **upload(b"x" * 1000))
        assert r.status_code == 401 and r.json()["status"] == 401  # anonymous: before the body is read
        r = c.post("/similar", **upload(REPOST), follow_redirects=False)  # the page's form: log in, then back
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/similar"
        assert c.get("/similar", follow_redirects=False).status_code == 303  # to the login page
        form = c.get("/login").text
        csrf = form.split('name="csrf" value="')[1].split('"')[0]
        assert c.post("/login", data={"username": "vic", "password": "a long viewer password", "csrf": csrf},
                      follow_redirects=False).status_code == 303
        page = c.get("/similar").text
        assert 'id="nav-similar"' in page and 'enctype="multipart/form-data"' in page
        token = page.split('id="similar-form"')[1].split('name="csrf" value="')[1].split('"')[0]
        r = c.post("/api/similar", **upload(b"\x00 not read"))
        assert r.status_code == 403 and "CSRF" in r.json()["error"]  # no X-CSRF-Token: refused before the body
        r = c.post("/api/similar", headers={"X-CSRF-Token": token}, **upload(REPOST))
        assert r.status_code == 200 and r.json()[0]["cluster_id"] == "c-viral"
        r = c.post("/similar", **upload(REPOST))
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post("/similar", data={"csrf": token}, **upload(REPOST))
        assert r.status_code == 200 and 'data-cluster="c-viral"' in r.text and "/thumb/" in r.text
        assert 'src="data:image/jpeg;base64,' in r.text  # the uploaded picture, re-encoded
        r = c.post("/similar", data={"csrf": token}, **upload(jpeg(picture(4242, (160, 120)))))
        assert r.status_code == 200 and 'id="not-seen"' in r.text


def _raw(port: int, head: str, body: bytes = b"", timeout_s: float = 20.0) -> tuple[int, dict]:
    """Send a request's head (and ``body``, a part of what it declares) and
    read the answer: the server must answer without the rest of the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        got = b""
        deadline = time.monotonic() + timeout_s
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < _length(got):
            assert time.monotonic() < deadline, got
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    status = int(got.split(b" ", 2)[1])
    return status, json.loads(got.split(b"\r\n\r\n", 1)[1])


def _length(got: bytes) -> int:
    for line in got.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_over_http_the_guards_and_the_bound_answer_before_the_upload_is_read(tmp_path):
    """``deepwatch serve`` on a socket: an anonymous upload declaring 200 MB is
    refused with 401 while none of it has been sent, a viewer's declaring more
    than the bound gets 413 after its first kilobyte; a real upload finds its
    cluster."""
    small_store(tmp_path)
    desk = DeskServer(tmp_path, env={"DEEPWATCH_DESK__REQUIRE_LOGIN_ON_LOOPBACK": "true",
                                     "DEEPWATCH_DESK_TOKENS": f"viewer:vi:{VIEWER_TOKEN}",
                                     "DEEPWATCH_FETCH__MAX_BYTES": str(MAX_BYTES)})
    try:
        head = ("POST /api/similar HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {n}\r\n{auth}")
        status, body = _raw(desk.port, head.format(n=200_000_000, auth=""))
        assert status == 401 and "login required" in body["error"]
        bound = MAX_BYTES + UPLOAD_OVERHEAD
        status, body = _raw(desk.port, head.format(n=bound + 1, auth=f"Authorization: Bearer {VIEWER_TOKEN}\r\n"),
                            b"--b0undary\r\n" + b"x" * 1000)
        assert status == 413 and body == {"error": f"request body over {bound} bytes", "status": 413}
        r = httpx.post(desk.url + "/api/similar", headers=VIEWER, timeout=60, **upload(REPOST))
        assert r.status_code == 200 and [x["cluster_id"] for x in r.json()] == ["c-viral"]
    finally:
        desk.stop()
