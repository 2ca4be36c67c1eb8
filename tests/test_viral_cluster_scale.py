"""One very viral picture against the findings store, the desk and the CLI:
a cluster of 50,000 sightings by 20,000 accounts in 10,000 distinct files
(each repost recompressed), written through the store's own
``apply_snapshots`` as the sink writes them. What a desk page, an API answer
or a listing carries of it must stay a bounded part (a page of members with
their count, a count of sightings), however large the cluster grows."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from detectors.base import Evidence
from detectors.hash_record import ImageHashes
from streams.cli import app as cli_app
from streams.desk import create_app, views
from streams.desk.source import DETAIL_MEMBERS, LIST_MEMBERS
from streams.records import ClusterSnapshot, Engagement, ImageEvent, ImageRef, Member, Sighting, SourceRef, Velocity
from streams.settings import Settings
from streams.store import open_store
from tests.desk_support import jpeg
from tests.support import picture

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
VIRAL = "c-viral"
SIGHTINGS, FILES, ACCOUNTS = 50_000, 10_000, 20_000
EDITOR_TOKEN = "editor-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
AI = [Evidence(detector="metadata", score=0.98, weight=3.0, detail="PNG text chunk names the generator")]


def _snap(cid: str, rev: int, i: int, sha: str, account: str, *, member: bool, platform: str = "x",
          when: datetime | None = None, merged_from: list[str] | None = None) -> ClusterSnapshot:
    h = ImageHashes(phash=sha[-16:], pdq=sha, pdq_quality=100)
    when = when or T0 + timedelta(seconds=i)
    ev = ImageEvent(event_id=f"{cid}-e{i}", platform=platform, account_id=account, account_handle=f"@{account[-8:]}",
                    post_url=f"https://example.org/{cid}/{i}", posted_at=when, text=f"is this real? take {i % 7}",
                    image=ImageRef(blob=sha))
    s = Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=i), sha256=sha,
                 width=640, height=480, format="JPEG", hashes=h)
    members = [Member(sha256=sha, phash=h.phash, pdq=h.pdq, pdq_quality=100, event_id=ev.event_id, width=640,
                      height=480, format="JPEG", distance=i % 9)] if member else []
    return ClusterSnapshot(cluster_id=cid, revision=rev, fake_score=0.95, verdict="likely-ai", evidence=AI,
                           members=members, sightings=i + 1, accounts=i + 1, platforms=[platform],
                           engagement=Engagement(), velocity=Velocity(sightings_5m=300, sightings_1h=3600),
                           first_seen=T0, last_seen=when, alert_level=2, merged_from=merged_from or [],
                           new_sighting=s)


def fill_viral(store, real_sha: str) -> None:
    """The viral cluster, 1,000 snapshots a transaction (a few seconds):
    sighting i by account i mod ``ACCOUNTS`` on one of three platforms, a new
    file every ``SIGHTINGS // FILES`` sightings; its last file is
    ``real_sha``, a picture in the blob store (the others have hashes only)."""
    every = SIGHTINGS // FILES
    batch: list[ClusterSnapshot] = []
    for i in range(SIGHTINGS):
        sha = real_sha if i == SIGHTINGS - every else f"{i // every:064x}"
        batch.append(_snap(VIRAL, i + 1, i, sha, f"did:plc:{i % ACCOUNTS:024d}", member=i % every == 0,
                           platform=("x", "bluesky", "telegram")[i % 3]))
        if len(batch) == 1000:
            store.apply_snapshots(batch)
            batch = []
    store.apply_snapshots(batch)
    # an ordinary cluster beside it, so lists hold more than the one
    store.apply_snapshot(_snap("c-small", 1, 0, "f" * 64, "did:plc:small", member=True))


@pytest.fixture(scope="module")
def viral_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("viral")
    real = jpeg(picture(7, (160, 120)))
    sha = hashlib.sha256(real).hexdigest()
    (data / "blobs").mkdir()
    from streams.blobstore import DirectoryBlobStore
    assert DirectoryBlobStore(data / "blobs").put(real) == sha
    store = open_store(data)
    fill_viral(store, sha)
    store.close()
    # the real picture in a bank, as a desk verdict on another cluster would have put it
    bank = Settings(data_dir=data).bank_store()
    try:
        bank.add_image_bytes("desk-fake", "fake", [("cluster-other", lambda: real)])
    finally:
        bank.close()
    (data / "real.sha256").write_text(sha)
    return data


@pytest.fixture(scope="module")
def members(viral_dir) -> list[str]:
    """The viral cluster's members, in the store's order."""
    store = open_store(viral_dir)
    try:
        return [m.sha256 for m in store.cluster(VIRAL).members]
    finally:
        store.close()


@pytest.fixture(scope="module")
def desk(viral_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")
    settings = Settings(data_dir=viral_dir)
    settings.desk.account_check_s = 3600
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c
    mp.undo()


def test_the_fixture_is_one_viral_cluster(members, viral_dir):
    assert len(members) == len(set(members)) == FILES and members[-1] == (viral_dir / "real.sha256").read_text()


def test_a_clusters_api_answer_lists_a_page_of_members_and_pages_to_all(desk, members):
    r = desk.get(f"/api/clusters/{VIRAL}", headers=EDITOR)
    assert r.status_code == 200
    doc = r.json()
    # all 10,000 members were 2.8 MB; a page of them is well under a tenth of it
    assert len(r.content) < 300_000, len(r.content)
    assert doc["members_total"] == len(members) and [m["sha256"] for m in doc["members"]] == members[:DETAIL_MEMBERS]
    assert doc["members_next"] == members[DETAIL_MEMBERS - 1]
    assert doc["sightings"] == SIGHTINGS and doc["accounts"] == ACCOUNTS  # the counts stay whole
    seen, after, pages = [], None, 0
    while True:
        q = {"members_limit": 1000, **({"members_after": after} if after else {})}
        page = desk.get(f"/api/clusters/{VIRAL}", params=q, headers=EDITOR).json()
        seen += [m["sha256"] for m in page["members"]]
        pages += 1
        after = page["members_next"]
        if after is None:
            break
    assert seen == members and pages == 10
    bad = desk.get(f"/api/clusters/{VIRAL}", params={"members_after": "e" * 64}, headers=EDITOR)
    assert bad.status_code == 422 and "no longer) a member" in bad.text and "without members_after" in bad.text
    assert desk.get(f"/api/clusters/{VIRAL}", params={"members_limit": 5000}, headers=EDITOR).status_code == 422


def test_lists_carry_a_few_members_of_each_cluster_with_the_count(desk, members):
    for path in ("/api/clusters", "/api/search?q=real"):
        r = desk.get(path, headers=EDITOR)
        assert r.status_code == 200, path
        assert len(r.content) < 60_000, (path, len(r.content))
        row = next(d for d in r.json() if d["id"] == VIRAL)
        assert [m["sha256"] for m in row["members"]] == members[:LIST_MEMBERS], path
        assert row["members_total"] == len(members) and row["members_next"] == members[LIST_MEMBERS - 1]
        small = next(d for d in r.json() if d["id"] == "c-small")
        assert len(small["members"]) == small["members_total"] == 1 and small["members_next"] is None


def test_the_cluster_page_shows_a_page_of_variants_and_links_the_next(desk, members, viral_dir):
    r = desk.get(f"/clusters/{VIRAL}", headers=EDITOR)
    assert r.status_code == 200
    grid = r.text.split('id="members"')[1].split("</section>")[0]
    shown = re.findall(r'src="/thumb/([0-9a-f]{64})"', grid)
    # every variant was an <img>: 10,000 thumbnails asked for by one page view
    assert shown == members[:DETAIL_MEMBERS]
    assert f"Variants ({len(members)})" in r.text and f"{DETAIL_MEMBERS} of {len(members)} variants" in grid
    nxt = re.search(r'href="([^"]+)" id="members-next"', grid).group(1).replace("&amp;", "&")
    second = desk.get(nxt, headers=EDITOR)
    assert re.findall(r'src="/thumb/([0-9a-f]{64})"', second.text.split('id="members"')[1].split("</section>")[0]) \
        == members[DETAIL_MEMBERS:2 * DETAIL_MEMBERS]
    # the bank entry of its last file, on no page but the last, is listed on every page
    for page in (r, second):
        assert "cluster-other" in page.text.split('id="bank-entries"')[1]
    # a "next variants" link whose variant the cluster no longer lists (an Elasticsearch document sheds its
    # newest members) shows the first page and says so, not an error page
    gone = desk.get(f"/clusters/{VIRAL}", params={"members_after": "e" * 64}, headers=EDITOR)
    assert gone.status_code == 200 and 'id="members-stale"' in gone.text
    assert re.findall(r'src="/thumb/([0-9a-f]{64})"', gone.text.split('id="members"')[1].split("</section>")[0]) \
        == members[:DETAIL_MEMBERS]


def test_bank_entries_of_thousands_of_files_are_one_parameter(viral_dir, members, monkeypatch):
    """SQLite before 3.32 (and builds keeping its old default) takes 999
    parameters a statement: one ``?`` a member failed the cluster's page."""
    opened = views._banks_db

    def low_bound(settings):
        db = opened(settings)
        db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        return db

    monkeypatch.setattr(views, "_banks_db", low_bound)
    found = views.bank_entries_for(Settings(data_dir=viral_dir), members)
    assert [(e["bank"], e["sha256"]) for e in found] == [("desk-fake", members[-1])]


def test_the_store_counts_a_viral_clusters_sightings_in_sqlite(viral_dir, monkeypatch):
    """Building the record reads SQLite's counts, not the 50,000 sightings
    (each desk refresh after one more sighting of it built it again)."""
    store = open_store(viral_dir)
    rows = 0
    select = type(store)._select

    def counted(self, sql, ids, args=()):
        nonlocal rows
        for row in select(self, sql, ids, args):
            rows += "FROM sightings" in sql
            yield row

    monkeypatch.setattr(type(store), "_select", counted)
    try:
        c = store.cluster(VIRAL)
    finally:
        store.close()
    assert rows <= 10, rows
    assert (c.sightings, c.accounts, c.platforms) == (SIGHTINGS, ACCOUNTS, ["bluesky", "telegram", "x"])
    assert c.first_seen == T0.isoformat() and c.last_seen == (T0 + timedelta(seconds=SIGHTINGS - 1)).isoformat()


def test_merged_clusters_count_an_account_once_and_keep_the_posts_own_times(tmp_path):
    """The counts over a merge, as SQLite now makes them: an account that
    posted under both ids is one account; first and last are instants,
    kept as the post gave them (12:00+05:00 is before 10:00Z)."""
    store = open_store(tmp_path)
    east = timezone(timedelta(hours=5))
    store.apply_snapshots([
        _snap("A", 1, 0, "a" * 64, "u1", member=True, when=datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)),
        _snap("A", 2, 1, "a" * 64, "u2", member=False, platform="bluesky",
              when=datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)),
        _snap("B", 1, 2, "b" * 64, "u1", member=True, when=datetime(2026, 12, 1, 12, 0, tzinfo=east)),
        _snap("B", 2, 3, "b" * 64, "u3", member=False, when=datetime(2026, 12, 1, 13, 0, tzinfo=timezone.utc)),
    ])
    merged = _snap("B", 3, 4, "b" * 64, "u1", member=False).model_copy(update={"merged_into": "A", "new_sighting": None})
    store.apply_snapshots([merged, _snap("A", 3, 5, "a" * 64, "u2", member=False, merged_from=["B"]).model_copy(
        update={"new_sighting": None})])
    try:
        for c in (store.cluster("A"), next(c for c in store.clusters() if c.id == "A")):
            assert (c.sightings, c.accounts, c.platforms) == (4, 3, ["bluesky", "x"])
            assert c.first_seen == "2026-12-01T12:00:00+05:00" and c.last_seen == "2026-12-01T13:00:00+00:00"
            assert [m.sha256 for m in c.members] == ["a" * 64, "b" * 64]
    finally:
        store.close()


def test_clusters_json_lists_the_first_members_asked_for(viral_dir, members):
    out = CliRunner().invoke(cli_app, ["clusters", "--data-dir", str(viral_dir), "--format", "json",
                                       "--members", "5"])
    assert out.exit_code == 0, out.output
    rows = {r["id"]: r for r in json.loads(out.stdout)}
    assert len(out.stdout) < 20_000, len(out.stdout)
    assert [m["sha256"] for m in rows[VIRAL]["members"]] == members[:5] and rows[VIRAL]["members_total"] == len(members)


def test_a_verdicts_history_lists_a_page_of_the_members_it_kept(viral_dir, members, tmp_path, monkeypatch):
    """The audit trail keeps every member a verdict saw; the cluster's answer
    and the verdict's show a page of them with their count (each verdict
    carried 10,000 sha256s into every read of the cluster)."""
    data = tmp_path / "copy"
    shutil.copytree(viral_dir, data)
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")
    settings = Settings(data_dir=data)
    settings.desk.account_check_s = 3600
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        rec = c.post(f"/api/clusters/{VIRAL}/verdict", json={"verdict": "needs-review", "note": "checking"},
                     headers=EDITOR)
        assert rec.status_code == 201, rec.text
        doc = c.get(f"/api/clusters/{VIRAL}", headers=EDITOR)
    for state in (rec.json()["cluster_state"], doc.json()["verdict_history"][0]["cluster_state"]):
        assert state["members"] == members[:LIST_MEMBERS] and state["members_total"] == len(members)
    assert len(doc.content) < 300_000 and len(rec.content) < 20_000
    kept = sqlite3.connect(data / "desk.sqlite").execute("SELECT cluster_state FROM verdicts").fetchone()[0]
    assert json.loads(kept)["members"] == members  # the audit trail itself is whole
