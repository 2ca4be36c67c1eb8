"""The desk against requests that cost it more than they should, and ids
that are not what a link expects, on a real desk app (TestClient) over a
real findings store and blob store: thumbnails decode within the decode
limits and the process's decode budget, at a few fixed sizes, a few at a
time; an id in a link is one path segment."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from detectors.imagedata import process_budget
from streams.blobstore import DirectoryBlobStore
from streams.desk import create_app
from streams.settings import Settings
from streams.store import open_store
from tests import desk_support
from tests.desk_support import make_cluster, small_store

VIEWER_TOKEN = "viewer-token-0123456789abcdef"
VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"viewer:vi:{VIEWER_TOKEN}")


@pytest.fixture
def data(tmp_path) -> Path:
    small_store(tmp_path)
    return tmp_path


def settings_for(data: Path) -> Settings:
    s = Settings(data_dir=data)
    s.desk.account_check_s = 3600
    return s


def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings, host="127.0.0.1"), base_url="http://127.0.0.1")


def png(img, quality=None) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def png_member(data: Path, monkeypatch, cid: str, size: tuple[int, int]) -> str:
    """A cluster whose member is a PNG of ``size`` (a flat one: small on disk, large decoded)."""
    monkeypatch.setattr(desk_support, "jpeg", png)  # make_cluster stores what this encodes
    store = open_store(data)
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    sha = make_cluster(store, DirectoryBlobStore(data / "blobs"), cid, 77, posts=1, ai=True, img=img)
    store.close()
    monkeypatch.undo()
    return sha


def thumbs_on_disk(data: Path) -> list[Path]:
    return sorted((data / "desk" / "thumbs").glob("*.jpg"))


# ------------------------------------------------------------- thumbnails
def test_each_px_does_not_force_a_decode_of_its_own(data, env):
    # px was part of the cache key as asked: 100, 101, ... 107 were eight full
    # decodes of one picture (eight at once took a desk to 2.8 GB).
    with client(settings_for(data)) as c:
        member = c.get("/api/clusters/c-viral").json()["members"][0]["sha256"]
        for px in range(100, 108):
            r = c.get(f"/thumb/{member}?px={px}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert max(Image.open(io.BytesIO(r.content)).size) <= px  # never larger than asked for
        assert len(thumbs_on_disk(data)) == 1
        assert c.app.state.desk.thumbs.misses == 1


def test_a_thumbnail_over_the_decode_budget_is_not_decoded(data, env, monkeypatch):
    # Only max_pixels was checked: a 121 KB PNG of 36 MP (144 MB decoded)
    # was decoded in full whatever decode.max_decode_mb said.
    sha = png_member(data, monkeypatch, "c-big", (1500, 1500))  # 9 MB decoded
    settings = settings_for(data)
    settings.decode.max_decode_mb = 4
    with client(settings) as c:
        r = c.get(f"/thumb/{sha}?px=96")
        assert r.status_code == 404 and "MiB" in r.json()["error"], r.status_code
        assert thumbs_on_disk(data) == []
        member = c.get("/api/clusters/c-viral").json()["members"][0]["sha256"]
        assert c.get(f"/thumb/{member}?px=96").status_code == 200  # small pictures as before


def test_a_thumbnail_waits_its_turn_at_the_process_decode_budget(data, env, monkeypatch):
    # Thumbnails decoded outside the budget that picture lookups share: both
    # at once multiplied the peak. Here the budget is taken (by a lookup, say).
    sha = png_member(data, monkeypatch, "c-big", (1000, 1000))
    settings = settings_for(data)
    with client(settings) as c:
        c.app.state.desk.thumbs.wait_s = 0.5
        budget = process_budget(settings.decode.max_decode_mb << 20)
        with budget.reserve(budget.capacity):
            r = c.get(f"/thumb/{sha}?px=96")
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.status_code
        assert thumbs_on_disk(data) == []
        r = c.get(f"/thumb/{sha}?px=96")  # the budget free again
        assert r.status_code == 200 and len(thumbs_on_disk(data)) == 1


def test_thumbnail_misses_past_the_bound_are_refused_not_queued(data, env, monkeypatch):
    # Every miss decoded at once, as many as the thread pool had threads.
    sha = png_member(data, monkeypatch, "c-big", (1000, 1000))
    with client(settings_for(data)) as c:
        thumbs = c.app.state.desk.thumbs
        member = c.get("/api/clusters/c-viral").json()["members"][0]["sha256"]
        thumbs.max_making, thumbs.max_waiting, thumbs.wait_s = 1, 1, 0.5
        making, release = threading.Event(), threading.Event()
        make = thumbs._make

        def held_make(sha256, px):
            if sha256 == sha:  # the big picture's make takes its time
                making.set()
                assert release.wait(20)
            return make(sha256, px)

        thumbs._make = held_make
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=c.get(f"/thumb/{sha}?px=96")))
        t.start()
        try:
            assert making.wait(20)
            # one waits for a turn (and gives up after wait_s), with no room for another to wait
            waiting: dict = {}
            w = threading.Thread(target=lambda: waiting.update(r=c.get(f"/thumb/{member}?px=96")))
            w.start()
            deadline = threading.Event()
            while getattr(thumbs, "_waiting", 1) == 0 and w.is_alive():
                deadline.wait(0.01)
            r = c.get(f"/thumb/{member}?px=256")
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.status_code
            w.join(10)
            assert waiting["r"].status_code == 503
        finally:
            release.set()
            t.join(20)
        assert first["r"].status_code == 200
        thumbs._make = make
        assert c.get(f"/thumb/{member}?px=96").status_code == 200  # turns given back


# ------------------------------------------------------------- ids in links
def test_an_account_id_is_one_path_segment_in_links(data, env):
    # {{ id | urlencode }} kept '/': the account "../../logout" linked to /logout.
    store = open_store(data)
    make_cluster(store, DirectoryBlobStore(data / "blobs"), "c-odd", 56, posts=2, ai=True,
                 accounts=["../../logout", "x/123"])
    store.close()
    with client(settings_for(data)) as c:
        cluster = c.get("/clusters/c-odd", headers=VIEWER)
        accounts = c.get("/accounts?min_posts=0&limit=200", headers=VIEWER)
        for page in (cluster, accounts):
            assert page.status_code == 200
            links = re.findall(r'href="(/accounts/[^"]*)"', page.text)
            assert "/accounts/..%2F..%2Flogout" in links and "/accounts/x%2F123" in links, links
            assert all("/" not in link[len("/accounts/"):] for link in links), links
        r = c.get("/accounts/..%2F..%2Flogout", headers=VIEWER)
        assert r.status_code == 200 and "../../logout" in r.text  # the link reaches the account's page
        assert c.get("/accounts/x%2F123", headers=VIEWER).status_code == 200


def test_every_id_put_into_a_path_in_the_templates_is_escaped_whole():
    # One template escaping its ids does not make the next one do it.
    templates = Path(__file__).resolve().parents[1] / "streams" / "desk" / "templates"
    unescaped = []
    for f in templates.glob("*.html"):
        for m in re.finditer(r'(?:href|src|action)="/[a-z]+/\{\{([^}]*)\}\}', f.read_text()):
            if not m.group(1).rstrip().endswith("| segment"):
                unescaped.append(f"{f.name}: {m.group(0)}")
    assert unescaped == []


def test_every_desk_route_runs_its_guards_before_its_body_is_read():
    # the routes live on routers of their own modules: one made without route_class=DeskRoute would have
    # FastAPI read and validate a body before the login is checked (an anonymous 422 showing the schema)
    from fastapi.routing import APIRoute

    from streams.desk import api, apidocs, pages
    from streams.desk.guards import DeskRoute

    routes = [r for router in (api.router, api.pictures(256), pages.router, apidocs.router) for r in router.routes
              if isinstance(r, APIRoute)]
    assert len(routes) >= 20 and all(isinstance(r, DeskRoute) for r in routes), [
        r.path for r in routes if not isinstance(r, DeskRoute)]
