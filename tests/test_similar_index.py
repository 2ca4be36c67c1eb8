"""``deepwatch similar`` / the desk's picture lookup on the SQLite findings
store: candidates come from a hash index the process keeps of the stored
members (``similar.near_members``), grown from the members stored since, and
only the nominated clusters' members are read. The answers are exactly those
of the index over every member (``iter_members``), which each lookup used to
rebuild; the rows a lookup reads are bounded by what it finds, not by the
store's size."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from detectors.hashing import compute_hashes
from detectors.imagedata import ImageData
from streams import similar
from streams.blobstore import DirectoryBlobStore
from streams.records import ClusterSnapshot, Engagement, Member, Velocity
from streams.settings import Settings
from streams.store import open_store
from tests.support import picture

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _snap(cid: str, members: list[Member], merged_into: str | None = None, revision: int = 1) -> ClusterSnapshot:
    return ClusterSnapshot(cluster_id=cid, revision=revision, fake_score=0.2, verdict="no-evidence", evidence=[],
                           members=members, sightings=1, accounts=1, platforms=["x"], engagement=Engagement(),
                           velocity=Velocity(), first_seen=NOW, last_seen=NOW, merged_into=merged_into)


def _member(blobs: DirectoryBlobStore, img: Image.Image, quality: int = 85) -> Member:
    data = _jpeg(img, quality)
    sha = blobs.put(data)
    h = compute_hashes(ImageData(data))
    return Member(sha256=sha, phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality, event_id=f"e-{sha[:12]}",
                  views=h.views, trimmed=h.trimmed)


def _noise(n: int, seed: int = 7, prefix: str = "n") -> list[ClusterSnapshot]:
    """``n`` one-member clusters of random hashes (unrelated pictures)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ph = f"{int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)):016x}"
        pdq = "".join(f"{int(rng.integers(0, 2**63)) * 2:016x}" for _ in range(4))
        views = [f"{int(rng.integers(0, 2**63)):016x}" for _ in range(4)] if i % 3 == 0 else None
        out.append(_snap(f"{prefix}{i:06d}", [Member(sha256=f"{seed:08x}{i:056x}", phash=ph, pdq=pdq, pdq_quality=100,
                                                      event_id=f"{prefix}{i}", views=views)]))
    return out


class _AllMembers:
    """The store as lookups used to read it: every member, every time."""

    def __init__(self, store):
        self.store = store

    def iter_members(self):
        return self.store.iter_members()


class _Counting:
    """The store, counting the member rows a lookup reads from it."""

    def __init__(self, store):
        self.store, self.rows, self.after = store, 0, 0

    def iter_members(self):
        for row in self.store.iter_members():
            self.rows += 1
            yield row

    def members_after(self, after: int, limit: int = 20_000):
        out = self.store.members_after(after, limit)
        self.rows += len(out)
        self.after += len(out)
        return out

    def members_near(self, keys, sha256=None):
        out = self.store.members_near(keys, sha256)
        self.rows += len(out)
        return out

    def members_count_after(self, after: int) -> int:
        return self.store.members_count_after(after)

    def member_key(self, key: int):
        return self.store.member_key(key)


@pytest.fixture
def world(tmp_path: Path):
    """A store of near-duplicates (recompressed, resized, cropped, mirrored
    copies; a cluster merged into another; look-alikes) among noise."""
    from tests.test_cluster_verify import _lookalikes

    d = tmp_path / "data"
    blobs = DirectoryBlobStore(d / "blobs")
    store = open_store(d)
    p1, p2 = picture(1, (320, 240)), picture(2, (320, 240))
    look_a, look_b = _lookalikes()
    store.apply_snapshots(_noise(1500))
    store.apply_snapshots([
        _snap("c-p1", [_member(blobs, p1, 90), _member(blobs, p1.resize((240, 180)), 60)]),
        _snap("c-p1-crop", [_member(blobs, p1.crop((24, 18, 296, 222)))]),
        _snap("c-p1-mirror", [_member(blobs, ImageOps.mirror(p1))]),
        _snap("c-p1-old", [_member(blobs, p1.resize((200, 150)), 50)], merged_into="c-p1"),
        _snap("c-p1-older", [_member(blobs, p1.resize((280, 210)), 70)], merged_into="c-p1-old"),
        _snap("c-p2", [_member(blobs, p2)]),
        _snap("c-look-a", [_member(blobs, look_a)]),
        _snap("c-look-b", [_member(blobs, look_b)]),
    ])
    store.apply_snapshots(_noise(1500, seed=8, prefix="m"))  # stored after them too
    queries = {
        "p1": _jpeg(p1, 75), "p1-crop": _jpeg(p1.crop((10, 10, 300, 230)), 70),
        "p1-mirror": _jpeg(ImageOps.mirror(p1).resize((256, 192)), 70), "p1-small": _jpeg(p1.resize((160, 120)), 60),
        "p1-crop-copy": _jpeg(p1.crop((24, 18, 296, 222)).resize((204, 153)), 65),
        "p1-wider": _jpeg(p1.crop((12, 9, 308, 231)), 70),  # holds the stored crop: met through its views
        "p2": _jpeg(p2.resize((200, 150)), 60), "look-a": _jpeg(look_a.resize((240, 180)), 60),
        "other": _jpeg(picture(99, (320, 240))),
        "stored": _jpeg(p1, 90),  # the very bytes of a member: met by its sha256 too
    }
    s = Settings(data_dir=d)
    yield s, store, queries
    store.close()


def _find(settings, data: bytes, store) -> list[dict]:
    return similar.as_json(similar.find(settings, similar.read_picture(data, settings.decode_limits()), store))


def test_answers_are_those_of_the_index_over_every_member(world):
    settings, store, queries = world
    found = {}
    for name, data in queries.items():
        new, old = _find(settings, data, store), _find(settings, data, _AllMembers(store))
        assert new == old, name
        found[name] = [(r["cluster_id"], r["via"]) for r in new]
    ids = {k: [c for c, _ in v] for k, v in found.items()}
    # not vacuous: copies, crops, mirrors and merged-away clusters' members are
    # found, by every kind of match the rule has
    assert "c-p1-crop" in ids["p1-crop-copy"] and "c-p1" in ids["p1-crop-copy"]
    assert ids["p1-mirror"][0] == "c-p1-mirror" and "c-p1" in ids["p1-mirror"]
    assert "c-p1" in ids["p1-small"] and "c-p1-old" not in ids["p1-small"]  # merged: under the surviving id
    assert ids["p2"] == ["c-p2"] and ids["other"] == [] and ids["look-a"] == ["c-look-a"]
    assert found["stored"][0] == ("c-p1", "sha256")
    assert {"sha256", "phash", "pdq", "phash_mirror", "pdq_mirror", "phash_view"} <= {v for f in found.values() for _, v in f}


def test_a_lookup_reads_the_rows_it_finds_not_the_store(world):
    settings, store, queries = world
    counting = _Counting(store)
    first = _find(settings, queries["p1-small"], counting)
    n_members = store._db.execute("SELECT COUNT(*) FROM members").fetchone()[0]
    assert n_members > 3000
    assert counting.rows <= n_members + 20  # the first lookup builds the index: each member once
    counting.rows = 0
    assert _find(settings, queries["p1-small"], counting) == first
    # members of the clusters found (c-p1 and the two merged into it), nothing else
    assert counting.rows <= 6, counting.rows
    counting.rows = 0
    # an unseen picture: the few members its hashes come near (pictures of one
    # generator), checked and left out
    assert _find(settings, queries["other"], counting) == [] and counting.rows <= 8, counting.rows


def test_members_stored_after_a_lookup_are_found(world, tmp_path: Path):
    settings, store, queries = world
    blobs = DirectoryBlobStore(Path(settings.data_dir) / "blobs")
    counting = _Counting(store)
    assert _find(settings, queries["other"], counting) == []
    other = open_store(Path(settings.data_dir))  # the stream's writer, another connection
    other.apply_snapshot(_snap("c-new", [_member(blobs, picture(99, (320, 240)))]))
    other.close()
    counting.rows = counting.after = 0
    got = _find(settings, queries["other"], counting)
    assert [r["cluster_id"] for r in got] == ["c-new"]
    assert got == _find(settings, queries["other"], _AllMembers(store))
    assert counting.after == 1 and counting.rows <= 9  # the new member indexed, then the nominated clusters' members


def test_a_replaced_store_file_is_indexed_again(tmp_path: Path):
    """The index grows by member key; a file put in the store's place (a
    restore) is indexed again, not read as more of the old one."""
    d = tmp_path / "data"
    settings = Settings(data_dir=d)
    blobs = DirectoryBlobStore(d / "blobs")
    store = open_store(d)
    store.apply_snapshots(_noise(1))
    q = _jpeg(picture(5, (320, 240)), 70)
    assert _find(settings, q, store) == []
    m = _member(blobs, picture(5, (320, 240)))
    store._db.execute("DELETE FROM members")  # another file in its place: its first member is the picture
    store._db.execute("INSERT INTO members (sha256, cluster_id, phash, pdq, pdq_quality, event_id, views, trimmed) "
                      "VALUES (?,?,?,?,?,?,?,?)", (m.sha256, "c-y", m.phash, m.pdq, m.pdq_quality, "e", None, 0))
    assert store._db.execute("SELECT rowid FROM members").fetchone()[0] == 1  # the key the index had seen
    codes = similar._member_codes(store, settings.dedupe.pdq_min_quality)
    lock = codes.lock
    assert [r["cluster_id"] for r in _find(settings, q, store)] == ["c-y"]
    # indexed again under the lock its lookup held: a new one would let another lookup in meanwhile
    assert codes.lock is lock
    store.close()


def test_members_after_pages_named_rows_that_still_unpack(tmp_path: Path):
    """``members_after`` rows name their fields (they were bare 7-tuples,
    read by position) and unpack as before, where the index is built."""
    from streams.store_members import KeyedMember

    d = tmp_path / "data"
    store = open_store(d)
    m = _member(DirectoryBlobStore(d / "blobs"), picture(4, (320, 240)))
    store.apply_snapshots([*_noise(2), _snap("c-x", [m])])
    first, *rest = store.members_after(0)
    assert isinstance(first, KeyedMember) and len(rest) == 2
    last = rest[-1]
    assert (last.sha256, last.phash, last.pdq, last.pdq_quality, last.views, last.trimmed) == (
        m.sha256, m.phash, m.pdq, m.pdq_quality, m.views, bool(m.trimmed))
    key, sha, *_ = last
    assert (key, sha) == (last.key, m.sha256) and store.member_key(last.key) == m.sha256
    assert store.members_after(first.key, limit=1) == [rest[0]]
    store.close()


def test_indexing_reports_its_progress_over_every_member(tmp_path: Path):
    """`deepwatch similar`'s bar: the first lookup of a process indexes every
    member (seconds at a million) and says how far it is; a lookup with
    nothing new to index reports nothing."""
    d = tmp_path / "data"
    settings = Settings(data_dir=d)
    store = open_store(d)
    store.apply_snapshots(_noise(45_000, seed=3))  # three pages of members_after
    q = similar.read_picture(_jpeg(picture(6, (320, 240)), 70), settings.decode_limits())
    calls: list[tuple[int, int]] = []
    assert similar.find(settings, q, store, progress=lambda done, total: calls.append((done, total))) == []
    assert calls == [(20_000, 45_000), (40_000, 45_000), (45_000, 45_000)]
    calls.clear()
    assert similar.find(settings, q, store, progress=lambda done, total: calls.append((done, total))) == []
    assert calls == []
    store.close()


def test_the_banks_index_is_loaded_once_per_file_version(tmp_path: Path, monkeypatch):
    from detectors.banks import BankStore

    d = tmp_path / "data"
    settings = Settings(data_dir=d)
    (tmp_path / "imgs").mkdir()
    for seed in (11, 12):
        picture(seed, (320, 240)).save(tmp_path / "imgs" / f"{seed}.jpg", quality=90)
    banks = settings.bank_store()
    banks.add_images("known", "fake", [tmp_path / "imgs" / "11.jpg"])
    banks.close()
    loads = []
    real = BankStore._load

    def counted(self):
        if self._cache is None:
            loads.append(1)
        return real(self)

    monkeypatch.setattr(BankStore, "_load", counted)
    q11, q12 = _jpeg(picture(11, (320, 240)), 60), _jpeg(picture(12, (320, 240)), 60)
    assert [r["bank"] for r in _find(settings, q11, None)] == ["known"]
    assert _find(settings, q12, None) == []
    assert len(loads) == 1
    banks = settings.bank_store()
    banks.add_images("known", "fake", [tmp_path / "imgs" / "12.jpg"])  # the file changes: loaded again
    banks.close()
    assert [r["bank"] for r in _find(settings, q12, None)] == ["known"]
    assert len(loads) == 2


def test_a_saved_copy_of_the_index_answers_as_the_store_and_grows_from_the_members_stored_since(world):
    """`deepwatch similar` is one lookup per process: it saves the index
    beside the store and the next process starts from it, reading only the
    members stored since (it read every member each time: 11.5 s at 1M)."""
    settings, store, queries = world
    assert similar.load_index(settings, store) is False  # nothing saved yet
    first = {name: _find(settings, data, store) for name, data in queries.items()}
    assert similar.save_index(settings, store) is True
    assert similar.save_index(settings, store) is False  # nothing new since
    path = similar.index_file(store, settings.dedupe.pdq_min_quality)
    assert path is not None and path.parent == Path(settings.data_dir) and path.stat().st_size > 0

    blobs = DirectoryBlobStore(Path(settings.data_dir) / "blobs")
    store.apply_snapshot(_snap("c-new", [_member(blobs, picture(99, (320, 240)))]))
    later = open_store(Path(settings.data_dir))  # another process's store: an index of its own
    try:
        assert similar.load_index(settings, later) is True
        read = []
        members_after = later.members_after
        later.members_after = lambda after, limit=20_000: read.extend(out := members_after(after, limit)) or out
        got = {name: _find(settings, data, later) for name, data in queries.items()}
        assert len(read) == 1  # the member stored since, not the 3,000 before it
        assert [r["cluster_id"] for r in got.pop("other")] == ["c-new"]
        assert got == {k: v for k, v in first.items() if k != "other"}
        assert first["other"] == []
        assert similar.save_index(settings, later) is True  # it grew
    finally:
        later.close()


def test_a_copy_saved_with_every_s_waits_that_long_since_the_last_one(world):
    """The desk saves after a lookup at most every ``DESK_SAVE_EVERY_S``: a
    desk killed outright then restarts from a recent copy, and lookups do
    not write it each time."""
    settings, store, queries = world
    _find(settings, queries["p2"], store)
    codes = similar._member_codes(store, settings.dedupe.pdq_min_quality)
    assert similar.save_index(settings, store, every_s=60) is True  # no copy yet: the first index is kept at once
    blobs = DirectoryBlobStore(Path(settings.data_dir) / "blobs")
    store.apply_snapshot(_snap("c-new", [_member(blobs, picture(98, (320, 240)))]))
    _find(settings, queries["p2"], store)  # indexes the new member
    assert similar.save_index(settings, store, every_s=60) is False  # grew, but saved 0 s ago
    codes.saved_at -= 61
    assert similar.save_index(settings, store, every_s=60) is True
    store.apply_snapshot(_snap("c-newer", [_member(blobs, picture(97, (320, 240)))]))
    _find(settings, queries["p2"], store)
    assert similar.save_index(settings, store) is True  # a stop saves whatever the time


def test_a_damaged_or_foreign_copy_of_the_index_is_not_used(world):
    settings, store, queries = world
    _find(settings, queries["p2"], store)
    assert similar.save_index(settings, store)
    path = similar.index_file(store, settings.dedupe.pdq_min_quality)
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b"not an index", b""):
        path.write_bytes(damaged)
        again = open_store(Path(settings.data_dir))
        try:
            assert similar.load_index(settings, again) is False
            assert [r["cluster_id"] for r in _find(settings, queries["p2"], again)] == ["c-p2"]
        finally:
            again.close()
    # saved under another PDQ quality bound: another rule's index
    path.write_bytes(good)
    stricter = Settings(data_dir=settings.data_dir, dedupe={"pdq_min_quality": settings.dedupe.pdq_min_quality + 1})
    path.rename(similar.index_file(store, stricter.dedupe.pdq_min_quality))
    again = open_store(Path(settings.data_dir))
    try:
        assert similar.load_index(stricter, again) is False
    finally:
        again.close()


def test_a_copy_of_the_index_of_a_replaced_store_file_is_indexed_again(tmp_path: Path):
    d = tmp_path / "data"
    settings = Settings(data_dir=d)
    store = open_store(d)
    store.apply_snapshots(_noise(1))
    q = _jpeg(picture(5, (320, 240)), 70)
    assert _find(settings, q, store) == [] and similar.save_index(settings, store)
    m = _member(DirectoryBlobStore(d / "blobs"), picture(5, (320, 240)))
    store._db.execute("DELETE FROM members")  # a restore put another file in its place
    store._db.execute("INSERT INTO members (sha256, cluster_id, phash, pdq, pdq_quality, event_id, views, trimmed) "
                      "VALUES (?,?,?,?,?,?,?,?)", (m.sha256, "c-y", m.phash, m.pdq, m.pdq_quality, "e", None, 0))
    store.close()
    later = open_store(d)
    try:
        assert similar.load_index(settings, later) is True
        assert [r["cluster_id"] for r in _find(settings, q, later)] == ["c-y"]
    finally:
        later.close()


def test_deepwatch_similar_keeps_the_copy_and_answers_the_same_from_it(world, tmp_path: Path):
    from typer.testing import CliRunner

    from streams.cli import app

    settings, store, queries = world
    image = tmp_path / "q.jpg"
    image.write_bytes(queries["p1-crop-copy"])
    path = similar.index_file(store, settings.dedupe.pdq_min_quality)
    runs = [CliRunner().invoke(app, ["similar", str(image), "--data-dir", str(settings.data_dir)]) for _ in range(2)]
    assert [r.exit_code for r in runs] == [0, 0], runs[0].output
    assert path.is_file()
    assert runs[0].stdout == runs[1].stdout and "c-p1-crop" in runs[0].stdout
