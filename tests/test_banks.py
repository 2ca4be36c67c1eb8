from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from detectors.banks import BankStore, bank_evidence
from detectors.hashing import compute_hashes
from detectors.imagedata import ImageData
from tests.support import picture


def _picture(seed: int) -> Image.Image:
    return picture(seed)


def _save(img: Image.Image, path: Path, q: int = 90) -> Path:
    img.save(path, "JPEG", quality=q)
    return path


def _hashes(img: Image.Image, q: int = 60):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return compute_hashes(ImageData(buf.getvalue()))


def test_add_images_and_match_reposts(tmp_path):
    store = BankStore(tmp_path / "banks.sqlite")
    paths = [_save(_picture(i), tmp_path / f"pic{i}.jpg") for i in range(3)]
    assert store.add_images("afp-debunked", "fake", paths) == 3
    assert store.add_images("afp-debunked", "fake", paths[:1]) == 0  # same bytes: not added twice
    m = store.match(_hashes(ImageOps.mirror(_picture(1).resize((200, 150)))))
    assert [(x.bank, x.entry_id, x.label, x.verdict) for x in m] == [("afp-debunked", "2", "pic1.jpg", "fake")]
    assert m[0].via in ("phash_mirror", "pdq_mirror")
    assert store.match(_hashes(_picture(99))) == []
    assert [(b.name, b.verdict, b.entries) for b in store.list_banks()] == [("afp-debunked", "fake", 3)]


def test_bank_verdict_is_fixed(tmp_path):
    store = BankStore(tmp_path / "b.sqlite")
    store.add_images("x", "fake", [_save(_picture(1), tmp_path / "a.jpg")])
    with pytest.raises(ValueError):
        store.add_images("x", "authentic", [_save(_picture(2), tmp_path / "b.jpg")])


def test_import_threatexchange_style_csv(tmp_path):
    h1, h2 = _hashes(_picture(5), 95), _hashes(_picture(6), 95)
    csv = tmp_path / "shared.csv"
    csv.write_text(
        "id,pdq,quality,label\n"
        f"te-17,{h1.pdq},{h1.pdq_quality},flooded-subway.jpg\n"
        f"te-18,{h2.pdq},10,too-flat.jpg\n"  # low quality: never trusted
    )
    store = BankStore(tmp_path / "b.sqlite")
    assert store.import_csv("te", csv, "fake") == 2
    m = store.match(_hashes(_picture(5), 50))
    assert [(x.entry_id, x.via) for x in m] == [("te-17", "pdq")]
    assert store.match(_hashes(_picture(6), 50)) == []

    ph = tmp_path / "phash.csv"
    ph.write_text(f"phash,label\n{h2.phash},verified-photo\n")
    assert store.import_csv("checked", ph, "authentic") == 1
    m = store.match(_hashes(_picture(6), 50))
    assert [(x.bank, x.entry_id, x.verdict, x.via) for x in m] == [("checked", "1", "authentic", "phash")]

    bare = tmp_path / "bare.csv"
    bare.write_text(f"{h1.pdq}\n")
    assert store.import_csv("bare", bare, "fake") == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("pdq\nnot-a-hash\n")
    with pytest.raises(ValueError):
        store.import_csv("bad", bad, "fake")


def test_evidence_fake_and_allow_list(tmp_path):
    store = BankStore(tmp_path / "b.sqlite")
    store.add_images("afp-debunked", "fake", [_save(_picture(1), tmp_path / "flooded-subway.jpg")])
    store.add_images("verified", "authentic", [_save(_picture(2), tmp_path / "real.jpg")])
    [fake] = bank_evidence(store.match(_hashes(_picture(1))))
    assert fake.detector == "bank:afp-debunked" and fake.score > 0.9
    assert fake.data["verdict"] == "fake" and fake.data["suppress"] is False and fake.data["entry_id"] == "1"
    assert "'afp-debunked' entry 1 'flooded-subway.jpg'" in fake.detail and "distance" in fake.detail
    [auth] = bank_evidence(store.match(_hashes(_picture(2))))
    assert auth.detector == "bank:verified" and auth.score < 0.1 and auth.data["suppress"] is True


def test_crops_and_screenshots_of_banked_pictures_match(tmp_path):
    store = BankStore(tmp_path / "b.sqlite")
    store.add_images("afp-debunked", "fake", [_save(_picture(i), tmp_path / f"pic{i}.jpg") for i in range(3)])
    img = _picture(2)
    crop = img.crop((20, 15, 380, 285))  # 90% centre crop: the full-frame hash alone is ~10 bits off
    m = store.match(_hashes(crop, 85))
    assert [(x.entry_id, x.via) for x in m][:1] == [("3", "phash_view")]
    framed = Image.new("RGB", (440, 400), (255, 255, 255))  # screenshot-style margins
    framed.paste(img, (20, 40))
    m = store.match(_hashes(framed, 85))
    assert m and m[0].entry_id == "3" and m[0].via == "phash_view"
    [ev] = bank_evidence(m)
    assert "view" in ev.detail
    assert all(x.entry_id == "3" for x in store.match(_hashes(crop, 85)))  # no other picture matched


def test_bank_created_before_views_opens_and_matches(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE banks (name TEXT PRIMARY KEY, verdict TEXT NOT NULL);"
        "CREATE TABLE entries (rowid INTEGER PRIMARY KEY AUTOINCREMENT, bank TEXT NOT NULL, entry_id TEXT NOT NULL,"
        " label TEXT, phash TEXT, pdq TEXT, pdq_quality INTEGER, sha256 TEXT, UNIQUE (bank, entry_id));"
    )
    h = _hashes(_picture(4), 95)
    db.execute("INSERT INTO banks VALUES ('old', 'fake')")
    db.execute("INSERT INTO entries (bank, entry_id, phash, pdq, pdq_quality) VALUES ('old', '1', ?, ?, ?)", (h.phash, h.pdq, h.pdq_quality))
    db.commit()
    db.close()
    store = BankStore(path)
    assert [x.entry_id for x in store.match(_hashes(_picture(4), 50))] == ["1"]
    # an old entry has no views, but a screenshot's trimmed view still reaches its pHash
    framed = Image.new("RGB", (440, 400), (255, 255, 255))
    framed.paste(_picture(4), (20, 40))
    assert [x.via for x in store.match(_hashes(framed, 85))] == ["phash_view"]
    store.add_images("old", "fake", [_save(_picture(5), tmp_path / "new.jpg")])
    assert store.match(_hashes(_picture(5).crop((20, 15, 380, 285)), 85))[0].via == "phash_view"


def test_a_banked_picture_does_not_mark_its_look_alikes(tmp_path):
    """Two pictures with one layout (one prompt's seeds, aligned faces) are
    hash neighbours: a fact-check of one must not mark the other. Banked from
    its file, an entry matches on pixels as a cluster's picture does, while
    reposts of the picture itself (crop, resize, mirror, caption bar,
    screenshot) still match."""
    from bench.neardup_transforms import _bar, _crop, screenshot
    from detectors.neardup import pair_match
    from tests.test_cluster_verify import _lookalikes

    a, b = _lookalikes()
    store = BankStore(tmp_path / "banks.sqlite")
    store.add_images("desk-fake", "fake", [_save(a, tmp_path / "a.jpg")])
    assert pair_match(_hashes(a), _hashes(b)) is not None  # hashes alone call them one picture
    assert store.match(_hashes(b)) == []
    for variant in (_crop(a, 0.9), a.resize((240, 180)), ImageOps.mirror(a),
                    _bar(a, 1 / 8, "bottom", text="BREAKING NEWS"), screenshot(a)):
        assert [m.entry_id for m in store.match(_hashes(variant.convert("RGB")))] == ["1"]
    # an imported hash list has no pixels: its entries still match on hashes
    csv_path = tmp_path / "shared.csv"
    csv_path.write_text(f"pdq,phash,id\n{_hashes(a).pdq},{_hashes(a).phash},x1\n")
    store.import_csv("partner", csv_path, "fake")
    assert sorted(m.bank for m in store.match(_hashes(a.resize((240, 180)), 70))) == ["desk-fake", "partner"]


def test_entries_banked_before_records_are_upgraded_when_added_again(tmp_path):
    """A bank made before entries kept their record matched look-alikes on
    hashes; adding the same file again keeps its id and adds the record."""
    import sqlite3

    from tests.test_cluster_verify import _lookalikes

    a, b = _lookalikes()
    path = _save(a, tmp_path / "a.jpg")
    store = BankStore(tmp_path / "banks.sqlite")
    store.add_images("desk-fake", "fake", [path])
    store.close()
    db = sqlite3.connect(tmp_path / "banks.sqlite")
    db.execute("UPDATE entries SET record = NULL")
    db.commit()
    db.close()
    store = BankStore(tmp_path / "banks.sqlite")
    assert [m.entry_id for m in store.match(_hashes(b))] == ["1"]  # hashes alone
    assert store.add_images("desk-fake", "fake", [path]) == 0
    assert store.match(_hashes(b)) == []
    assert [m.entry_id for m in store.match(_hashes(a))] == ["1"]


@pytest.mark.parametrize("body, says", [
    ("pdq,quality\n{pdq},inf\n", "bad.csv:2: quality 'inf' is not a number from 0 to 100"),  # was an OverflowError
    ("pdq,quality\n{pdq},abc\n", "bad.csv:2: quality 'abc'"),  # was "could not convert string to float"
    ("pdq,label\n{pdq},{long}\n", "bad.csv:2: not a readable CSV"),  # was a csv.Error traceback
    ("pdq,quality\n", "bad.csv: no hashes in it"),  # was "imported 0" into a new empty bank
    ("", "bad.csv: no hashes in it"),
])
def test_a_bad_hash_list_is_a_value_error_naming_file_and_row(tmp_path, body, says):
    bad = tmp_path / "bad.csv"
    bad.write_text(body.format(pdq="a" * 64, long="x" * 200_000))
    store = BankStore(tmp_path / "b.sqlite")
    with pytest.raises(ValueError) as e:
        store.import_csv("x", bad, "fake")
    assert says in str(e.value)
    assert store.list_banks() == []  # nothing half-imported


def test_a_hash_list_that_is_not_text_names_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ValueError, match="bad.csv: not UTF-8 text"):
        BankStore(tmp_path / "b.sqlite").import_csv("x", bad, "fake")


def test_add_images_reads_under_the_limits_given(tmp_path):
    from detectors.imagedata import DecodeLimits, ImageRejected

    path = _save(_picture(1), tmp_path / "a.jpg")
    with pytest.raises(ImageRejected, match="over 100 bytes"):
        BankStore(tmp_path / "b.sqlite").add_images("x", "fake", [path], limits=DecodeLimits(max_bytes=100))


# -- banks file errors judged by SQLite's result code (sqlite_errorname), each provoked for real ---------------
def _damaged_header(path: Path) -> None:
    store = BankStore(path)
    store.close()
    raw = bytearray(path.read_bytes())
    raw[100:108] = b"\xff" * 8  # the schema table's page header (after the file header): page 1 unreadable
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, code", [
    (lambda p: p.write_bytes(b"this is a text file, not a database\n" * 200), "SQLITE_NOTADB"),
    (_damaged_header, "SQLITE_CORRUPT"),
])
def test_a_damaged_banks_file_says_move_it_aside(tmp_path, damage, code):
    import sqlite3

    from detectors.banks import BankFileError

    path = tmp_path / "banks.sqlite"
    damage(path)
    with pytest.raises(sqlite3.DatabaseError) as raw:
        sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert raw.value.sqlite_errorname == code
    for read_only in (False, True):
        with pytest.raises(BankFileError) as e:
            BankStore(path, read_only=read_only)
        assert "move it aside (deepwatch starts a new one) or restore it from a backup" in str(e.value), str(e.value)


def test_a_banks_file_locked_by_a_writer_says_try_again(tmp_path):
    import sqlite3

    from detectors.banks import BankFileError

    path = tmp_path / "banks.sqlite"
    BankStore(path).close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # another command's write: readers and writers wait, then fail
    try:
        with pytest.raises(sqlite3.OperationalError) as raw:
            sqlite3.connect(path, timeout=0).execute("SELECT name FROM sqlite_master").fetchall()
        assert raw.value.sqlite_errorname == "SQLITE_BUSY"
        with pytest.raises(BankFileError) as e:
            BankStore(path)  # after the driver's 5 s wait
        assert "another deepwatch command is writing it; try again when it is done" in str(e.value), str(e.value)
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_busy_error_in_other_words_is_still_a_busy_file(tmp_path):
    # SQLITE_BUSY is also "cannot commit transaction - SQL statements in
    # progress": neither "locked" nor "busy" in its words.
    import sqlite3

    db = sqlite3.connect(tmp_path / "scratch.sqlite", isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    db.execute("BEGIN")
    pending = db.execute("INSERT INTO t VALUES (1), (2) RETURNING x")
    pending.fetchone()  # the INSERT is still running
    with pytest.raises(sqlite3.OperationalError) as raw:
        db.execute("COMMIT")
    assert raw.value.sqlite_errorname == "SQLITE_BUSY" and "locked" not in str(raw.value)
    db.close()
    store = BankStore(tmp_path / "banks.sqlite")
    try:
        message = str(store._file_error(raw.value, "write"))
    finally:
        store.close()
    assert "cannot write banks file" in message and "SQL statements in progress" in message
    assert "another deepwatch command is writing it; try again when it is done" in message, message


def test_a_flat_picture_meets_no_hash_only_entry_but_a_banked_one_with_pixels(tmp_path):
    # A shared list holding the pHash of a flat picture (0000000000000000, what any
    # black frame hashes to) made every black frame a "known fake" at distance 0.
    black, near_black = Image.new("RGB", (1280, 720), (0, 0, 0)), Image.new("RGB", (1280, 720), (3, 3, 3))
    assert _hashes(black).phash == "0000000000000000" and _hashes(black).pdq_quality < 10
    detailed = _hashes(_picture(7), 95)
    csv = tmp_path / "shared.csv"
    csv.write_text(f"phash,label\n0000000000000000,degenerate\n{detailed.phash},detailed\n")
    store = BankStore(tmp_path / "b.sqlite")
    assert store.import_csv("shared", csv, "fake") == 2
    assert store.match(_hashes(black)) == [] and store.match(_hashes(near_black)) == []
    assert [m.label for m in store.match(_hashes(_picture(7), 60))] == ["detailed"]  # pHash alone still matches
    # a flat picture the bank holds the pixels of is met by its copies, as a cluster meets them
    store.add_images("frames", "fake", [_save(black, tmp_path / "black.jpg")])
    assert [m.bank for m in store.match(_hashes(black))] == ["frames"]
