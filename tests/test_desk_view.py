"""The desk's view of the findings store (``desk.view_days``,
``desk.max_view_clusters``): the queue holds the clusters seen lately (stream
time), at most so many, plus every cluster with a desk verdict; a cluster
outside it still answers on its page, in the API and in search, and the
account views still count it."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from streams.desk import create_app
from streams.desk.deskdb import DeskDB, OverlayRow
from streams.desk.source import FindingsSource
from streams.records import ClusterSnapshot, Engagement, Member, Velocity
from streams.settings import Settings
from streams.store import open_store
from tests.desk_support import close_sources
from tests.findings_fixture import stored_findings
from tests.test_store import T0, _sighting

EDITOR_TOKEN = "editor-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
DAY = 24 * 60  # minutes

# cluster id -> (age in days before the newest sighting, stream verdict, account)
CLUSTERS = {
    "new-a": (0, "likely-ai", "acct-new"),
    "new-b": (1, "no-evidence", "acct-new"),
    "new-c": (2, "no-evidence", "acct-new"),
    "old-ai": (40, "likely-ai", "acct-old"),
    "old-photo": (50, "no-evidence", "acct-photo"),
}
NEW = {"new-a", "new-b", "new-c"}


def sha(cid: str, n: int = 0) -> str:
    return hashlib.sha256(f"{cid}/{n}".encode()).hexdigest()


def snap(cid: str, minute: int, verdict: str = "no-evidence", *, account: str = "acct-1", rev: int = 1,
         merged_into: str | None = None, merged_from: list[str] | None = None) -> ClusterSnapshot:
    """A cluster's revision ``rev`` with one new sighting ``minute`` minutes after T0 (its last_seen)."""
    s = _sighting(f"{cid}-e{rev}", sha(cid, rev), int(sha(cid, rev)[:7], 16), account=account, minute=minute)
    member = Member(sha256=s.sha256, phash="0" * 16, pdq="0" * 64, pdq_quality=100, event_id=s.event.event_id)
    at = T0 + timedelta(minutes=minute)
    return ClusterSnapshot(
        cluster_id=cid, revision=rev, fake_score=0.95 if verdict == "likely-ai" else 0.2, verdict=verdict,
        evidence=[], members=[member], sightings=rev, accounts=1, platforms=["x"], engagement=Engagement(),
        velocity=Velocity(sightings_5m=1, sightings_1h=1), first_seen=at, last_seen=at, merged_into=merged_into,
        merged_from=merged_from or [], new_sighting=s)


def fill(store) -> None:
    """CLUSTERS, plus "m-old" (seen 60 days before the newest) merged into "new-b"."""
    store.apply_snapshots([snap(cid, -age * DAY, verdict, account=account)
                           for cid, (age, verdict, account) in CLUSTERS.items()])
    store.apply_snapshots([snap("m-old", -60 * DAY, account="acct-new", merged_into="new-b"),
                           snap("new-b", -1 * DAY + 1, account="acct-new", rev=2, merged_from=["m-old"])])


@pytest.fixture(params=["sqlite", "es"])
def stored(request, tmp_path) -> tuple[Path, str | None]:
    """(data dir, store URL: None for the data dir's SQLite file) holding ``fill``'s clusters."""
    return stored_findings(request, tmp_path, request.param, fill)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")


def client(data: Path, url: str | None, **desk) -> TestClient:
    s = Settings(data_dir=data)
    s.findings.url = url
    for k, v in desk.items():
        setattr(s.desk, k, v)
    s.desk.account_check_s = 3600
    return TestClient(create_app(s), base_url="http://127.0.0.1")


def ids(rows) -> set[str]:
    return {r["id"] for r in rows}


def test_old_clusters_are_outside_the_view_but_answer(stored, env):
    data, url = stored
    with client(data, url) as c:
        r = c.get("/api/clusters")
        assert r.status_code == 200 and ids(r.json()) == NEW
        view = r.headers["X-Desk-View"]
        assert "days=30" in view and "max_clusters=50000" in view and "since=2026-10-21T10:00:00+00:00" in view
        source = c.app.state.desk.source
        # held: the window and what merged into it (for the merge map), not the old clusters
        assert set(source._all()) == NEW | {"m-old"}
        assert "Clusters seen in the last 30 days of the stream" in c.get("/").text
        # an old cluster's page and API answer, as the view would show it
        doc = c.get("/api/clusters/old-photo").json()
        assert doc["id"] == "old-photo" and doc["sightings"] == 1 and doc["sightings_detail"][0]["account_id"] == "acct-photo"
        assert doc["velocity"]["sightings_5m"] == 0 and doc["quiet_since"] == doc["last_seen"]  # as of the newest sighting
        assert c.get("/clusters/old-photo").status_code == 200
        assert c.get("/api/clusters/no-such").status_code == 404
        # search reads it from the store, the analyst search and a bare cluster id alike
        assert ids(c.get("/api/search", params={"account": "acct-photo"}).json()) == {"old-photo"}
        assert ids(c.get("/api/search", params={"q": "old-ai"}).json()) == {"old-ai"}
        # its pictures may be shown; no other picture may
        assert source.may_show(sha("old-photo", 1)) and not source.may_show(sha("nowhere"))
        # the account views count AI clusters outside the view too (as before there was one)
        acct = c.get("/api/accounts/acct-old").json()
        assert acct["ai_pictures"] == 1 and acct["ai_clusters"] == ["old-ai"]


def test_a_desk_verdict_keeps_an_old_cluster_under_its_filter(stored, env):
    data, url = stored
    with client(data, url) as c:
        assert "old-photo" not in ids(c.get("/api/clusters", params={"verdict": "fake"}).json())
        r = c.post("/api/clusters/old-photo/verdict", json={"verdict": "fake", "note": "seen before"}, headers=EDITOR)
        assert r.status_code == 201, r.text
        assert ids(c.get("/api/clusters", params={"verdict": "fake"}).json()) == {"old-photo"}
        assert "old-photo" in ids(c.get("/api/clusters").json())
        assert ids(c.get("/api/search", params={"desk_verdict": "fake"}).json()) == {"old-photo"}
        # the account's AI share follows the desk's verdict
        assert c.get("/api/accounts/acct-photo").json()["ai_pictures"] == 1
    with client(data, url) as c:  # a desk started afresh reads it into its view again
        assert ids(c.get("/api/clusters", params={"verdict": "fake"}).json()) == {"old-photo"}


def test_the_cap_keeps_the_most_recently_seen(stored, env):
    data, url = stored
    with client(data, url, view_days=0, max_view_clusters=2) as c:
        r = c.get("/api/clusters", params={"sort": "last_seen"})
        assert [d["id"] for d in r.json()] == ["new-a", "new-b"]
        assert r.headers["X-Desk-View"] == "max_clusters=2"
        assert c.get("/api/clusters/old-ai").json()["id"] == "old-ai"


def test_no_window_is_every_cluster_as_before(stored, env):
    data, url = stored
    with client(data, url, view_days=0, max_view_clusters=0) as c:
        r = c.get("/api/clusters")
        assert ids(r.json()) == set(CLUSTERS) and r.headers["X-Desk-View"] == "all"
        assert set(c.app.state.desk.source._all()) == set(CLUSTERS) | {"m-old"}
        assert 'id="view-window"' not in c.get("/").text


def test_the_view_follows_the_store_as_it_changes(tmp_path):
    """Read incrementally (``changes_since``), the view is what a full read
    would give: a changed old cluster enters it, and the clusters the window
    leaves behind as the newest sighting moves are dropped (one with a desk
    verdict kept)."""
    writer = open_store(tmp_path)
    fill(writer)
    desk = DeskDB(tmp_path / "desk.sqlite")
    desk.set_overlay([OverlayRow(cluster_id="new-c", verdict="needs-review", verdict_id=1, source_cluster="new-c",
                                 detail="checked")], "new-c")
    reader = open_store(tmp_path)
    full_reads = []
    recent = reader.recent_clusters
    reader.recent_clusters = lambda *a, **k: full_reads.append(a) or recent(*a, **k)  # type: ignore[method-assign]
    src = FindingsSource(reader, desk, view_days=30)
    fresh = None
    try:
        assert set(src._all()) == NEW | {"m-old"} and len(full_reads) == 1
        writer.apply_snapshots([snap("old-photo", 5, rev=2, account="acct-photo")])  # sighted again: the newest
        assert set(src._all()) == NEW | {"m-old", "old-photo"}
        # 30 days on: the window starts at T0; new-c is kept by its verdict
        writer.apply_snapshots([snap("later", 30 * DAY)])
        got = src._all()
        assert set(got) == {"later", "new-a", "old-photo", "new-c"} and len(full_reads) == 1  # no full read
        assert src.view_window()["since"] == "2026-11-20T10:00:00+00:00"
        fresh = FindingsSource(open_store(tmp_path), DeskDB(tmp_path / "desk.sqlite"), view_days=30)
        assert got == fresh._all()
    finally:
        close_sources(src, fresh)
        writer.close()
