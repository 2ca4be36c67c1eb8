"""A desk verdict on a cluster of any size: its pictures are banked from the
blob store one at a time, with no temporary files (a read-only root's /tmp is
a 256 MiB tmpfs, and a viral cluster's recompressed reposts are thousands of
distinct files), and withdrawn again when the verdict changes, however many
there are (SQLite caps the variables of one statement).

The desk is the real app over a real SQLite findings store and blob store.
Its SQLite connections are held to 999 variables a statement, the limit of
builds before 3.32 (``old_sqlite``): the one here (3.40.1) was compiled with
250,000, more pictures than a test can hash in its time."""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile

import pytest
from fastapi.testclient import TestClient

from detectors.banks import BankStore
from detectors.hashing import compute_hashes
from detectors.imagedata import ImageData
from streams.blobstore import DirectoryBlobStore
from streams.desk import create_app
from streams.records import ClusterSnapshot, Engagement, ImageEvent, ImageRef, Member, Sighting, SourceRef, Velocity
from streams.settings import Settings
from streams.store import open_store
from tests.desk_support import T0, jpeg
from tests.support import picture

EDITOR_TOKEN = "editor-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
OLD_LIMIT = 999  # SQLITE_MAX_VARIABLE_NUMBER's default before SQLite 3.32
PICTURES = OLD_LIMIT + 12  # more than one statement may name


def tiny(k: int) -> bytes:
    """The k-th of a family of distinct 32x32 JPEGs of one picture (one pixel
    set apart): distinct files whose hashes all match, as recompressed reposts'."""
    img = picture(5, (32, 32))
    img.putpixel((k % 32, (k // 32) % 32), (k % 251, 255 - k % 241, (k * 7) % 256))
    return jpeg(img, quality=95)


def snapshot(store, blobs, cid: str, datas: list[bytes]) -> list[str]:
    """One cluster holding every picture in ``datas`` as a member; returns their sha256s."""
    h = compute_hashes(ImageData(datas[0]))  # one family: the first's hashes stand for all (cheap to build)
    shas = [blobs.put(d) for d in datas]
    members = [Member(sha256=sha, phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality, event_id=f"{cid}-e{k}",
                      width=32, height=32, format="JPEG", views=h.views, trimmed=h.trimmed, representative=k == 0)
               for k, sha in enumerate(shas)]
    ev = ImageEvent(event_id=f"{cid}-e0", platform="x", account_id=f"{cid}-acct", account_handle=f"@{cid}-acct",
                    post_url=f"https://example.org/{cid}/0", posted_at=T0, text="a picture", image=ImageRef(blob=shas[0]))
    s = Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=abs(hash(cid)) & 0xFFFFFFF),
                 sha256=shas[0], width=32, height=32, format="JPEG", hashes=h)
    store.apply_snapshot(ClusterSnapshot(
        cluster_id=cid, revision=1, fake_score=0.2, verdict="no-evidence", evidence=[], members=members,
        sightings=1, accounts=1, platforms=["x"], engagement=Engagement(), velocity=Velocity(sightings_5m=1, sightings_1h=1),
        first_seen=T0, last_seen=T0, new_sighting=s))
    return shas


@pytest.fixture
def old_sqlite(monkeypatch):
    """Every SQLite connection opened from here on takes at most ``OLD_LIMIT``
    variables a statement, as a build before 3.32 does."""
    real = sqlite3.connect

    def connect(*args, **kwargs):
        db = real(*args, **kwargs)
        db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, OLD_LIMIT)
        return db

    monkeypatch.setattr(sqlite3, "connect", connect)


_watched: list[tuple[str, list[str]]] = []  # (a directory, what was opened or made in it)
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if not _watched or event not in ("open", "os.mkdir") or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    for root, seen in _watched:
        if path.startswith(root + os.sep):
            seen.append(f"{event} {path}")


@pytest.fixture
def watched_tmpdir(tmp_path, monkeypatch):
    """An empty directory made the temporary directory (TMPDIR and
    ``tempfile.tempdir``); yields the list of every file opened or directory
    made in it, seen by an audit hook: a temporary directory removed when
    done leaves an empty one, and as root a read-only one is written anyway."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # for the life of the process: it does nothing unless a test watches
        _hooked = True
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    seen: list[str] = []
    _watched.append((str(d), seen))
    try:
        yield seen
    finally:
        _watched.clear()
    assert not any(d.iterdir()), sorted(p.name for p in d.iterdir())


def bank_rows(s: Settings, bank: str) -> set[tuple[str, str]]:
    db = sqlite3.connect(s.banks_path)
    try:
        return set(db.execute("SELECT label, sha256 FROM entries WHERE bank = ?", (bank,)))
    finally:
        db.close()


def test_a_verdict_on_a_cluster_past_the_variable_limit_banks_and_withdraws_every_picture(
        tmp_path, monkeypatch, old_sqlite, watched_tmpdir):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")
    datas = [tiny(k) for k in range(PICTURES + 1)]
    assert len(set(datas)) == len(datas)
    store = open_store(tmp_path)
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    shas = snapshot(store, blobs, "c-viral", datas[:PICTURES])
    snapshot(store, blobs, "c-repost", datas[PICTURES:])  # one more repost, clustered apart: matched retroactively
    store.close()
    # the labels the desk gave when it banked through named temporary files
    labelled = {(f"cluster-c-viral-{sha[:12]}", sha) for sha in shas}

    s = Settings(data_dir=tmp_path)
    s.desk.account_check_s = 3600  # the background check runs once at start
    with TestClient(create_app(s), base_url="http://127.0.0.1") as c:
        def verdict(v: str) -> dict:
            r = c.post("/api/clusters/c-viral/verdict", json={"verdict": v, "note": "checked"}, headers=EDITOR)
            assert r.status_code == 201, r.text
            return r.json()["effects"]

        fake = verdict("fake")
        assert fake["bank"] == "desk-fake" and fake["bank_entries_added"] == PICTURES, fake
        assert sorted(fake["clusters"]) == ["c-repost", "c-viral"]  # the in-memory probe bank held them all
        assert bank_rows(s, "desk-fake") == labelled

        # the mind changed: every picture leaves desk-fake in the same verdict that banks it as authentic
        authentic = verdict("authentic")
        assert authentic["withdrawn"] == PICTURES and authentic["bank_entries_added"] == PICTURES, authentic
        assert bank_rows(s, "desk-fake") == set()
        assert bank_rows(s, "desk-authentic") == labelled

        review = verdict("needs-review")
        assert review["withdrawn"] == PICTURES and review["bank"] is None, review
        assert bank_rows(s, "desk-authentic") == set()
    assert watched_tmpdir == [], watched_tmpdir[:5]


def test_add_image_bytes_reads_one_picture_at_a_time_all_or_nothing(tmp_path):
    """Each loader is called as its picture is hashed, and the bank lets its
    bytes go before the next is read; a loader that fails leaves the bank as
    it was."""
    given: list[bytes] = []
    control = [os.urandom(64)]  # referenced by a list alone, as ``given``'s items once the bank lets them go
    held: list[list[int]] = []

    def loader(k: int):
        def load() -> bytes:
            [base] = [sys.getrefcount(b) for b in control]
            held.append([sys.getrefcount(b) - base for b in given])
            given.append(tiny(k))
            return given[-1]
        return load

    store = BankStore(tmp_path / "banks.sqlite")
    try:
        assert store.add_image_bytes("desk-fake", "fake", [(f"pic-{k}", loader(k)) for k in range(5)]) == 5
        assert held == [[0] * k for k in range(5)], held  # no earlier picture still referenced by the bank
        assert [(b.name, b.entries) for b in store.list_banks()] == [("desk-fake", 5)]

        def broken() -> bytes:
            raise OSError("blob gone")

        with pytest.raises(OSError, match="blob gone"):
            store.add_image_bytes("desk-fake", "fake", [("pic-5", loader(5)), ("pic-6", broken)])
        assert [(b.name, b.entries) for b in store.list_banks()] == [("desk-fake", 5)]
        assert store.add_image_bytes("desk-fake", "fake", [("again", loader(0))]) == 0  # the same bytes: not twice
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "banks.sqlite")
    try:
        assert sorted(db.execute("SELECT label FROM entries")) == [(f"pic-{k}",) for k in range(5)]
    finally:
        db.close()
