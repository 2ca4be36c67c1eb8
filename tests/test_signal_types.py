"""The signal-type interface (``detectors.signals``) and the hash consumers
that go through it: bank import, validation and matching, op validation,
the bank CLI's help."""

from __future__ import annotations

import inspect
import random
import sqlite3

import pytest

from detectors import signals
from detectors.banks import BankStore, _via_words
from detectors.hash_record import ImageHashes
from detectors.hashing import hamming_hex
from detectors.neardup import ClusterIndex, pair_match
from detectors.neardup.pairing import PDQ_MIN_QUALITY, PDQ_THRESHOLD, PHASH_THRESHOLD
from detectors.signals import PDQ, PHash, SignalType, register, signal_type, signal_types, view_signal_type


def _hex(rng: random.Random, st: type[SignalType]) -> str:
    return f"{rng.getrandbits(st.bits):0{st.hex_len}x}"


def _record(rng: random.Random, **kw) -> ImageHashes:
    base = dict(phash=_hex(rng, PHash), pdq=_hex(rng, PDQ), pdq_quality=100)
    return ImageHashes(**{**base, **kw})


def test_registry_holds_the_two_built_ins():
    assert [st.name for st in signal_types()] == ["pdq", "phash"]
    assert signal_type("pdq") is PDQ and signal_type("phash") is PHash
    assert PDQ.get_name() == "pdq"
    with pytest.raises(KeyError, match="unknown signal type 'md5'; known: pdq, phash"):
        signal_type("md5")
    assert (PDQ.bits, PDQ.hex_len, PDQ.label, PDQ.has_quality, PDQ.has_views) == (256, 64, "PDQ", True, False)
    assert (PHash.bits, PHash.hex_len, PHash.label, PHash.has_quality, PHash.has_views) == (64, 16, "pHash", False, True)
    assert view_signal_type() is PHash and PHash.view_via == "phash_view" and PDQ.view_via is None
    assert PDQ.csv_aliases == ("pdq", "pdq_hash", "hash", "signal_value") and PHash.csv_aliases == ("phash", "p_hash")


def test_default_thresholds_are_the_pair_rules():
    assert (PHash.default_threshold, PDQ.default_threshold, PDQ.default_min_quality) == (10, 31, 50)
    assert (PHash.default_threshold, PDQ.default_threshold) == (PHASH_THRESHOLD, PDQ_THRESHOLD)
    assert PDQ.default_min_quality == PDQ_MIN_QUALITY and PHash.default_min_quality is None
    # every consumer's default is the same one constant
    for fn in (pair_match, ClusterIndex.__init__, BankStore.__init__):
        p = inspect.signature(fn).parameters
        assert (p["phash_threshold"].default, p["pdq_threshold"].default, p["pdq_min_quality"].default) == (
            PHash.default_threshold, PDQ.default_threshold, PDQ.default_min_quality), fn


@pytest.mark.parametrize("st", [PDQ, PHash])
def test_validate_normalises_and_refuses(st):
    code = "aB" * (st.hex_len // 2)
    assert st.validate(code) == code.lower() and st.is_valid(code)
    for bad in ("", code[:-1], code + "0", "g" + code[1:], f" {code[1:]}", code[:-1] + "\n", "0x" + code[2:], None, 7):
        assert not st.is_valid(bad)
        with pytest.raises(ValueError, match=f"not a {st.label} hash: expected {st.hex_len} hex digits"):
            st.validate(bad)
    other = PHash if st is PDQ else PDQ
    assert not st.is_valid("0" * other.hex_len)


@pytest.mark.parametrize("st", [PDQ, PHash])
def test_distance_is_the_hamming_distance(st):
    rng = random.Random(st.bits)
    for _ in range(300):
        a, b = _hex(rng, st), _hex(rng, st)
        if rng.random() < 0.5:  # near pairs too: flip a few bits
            b = f"{int(a, 16) ^ sum(1 << rng.randrange(st.bits) for _ in range(rng.randrange(8))):0{st.hex_len}x}"
        d = st.distance(a, b)
        assert d == hamming_hex(a, b) == st.distance(b, a)
        assert st.matches(a, b) == (d <= st.default_threshold)
    a = _hex(rng, st)
    assert st.distance(a, a) == 0 and st.distance(a, a.upper()) == 0
    assert st.distance("0" * st.hex_len, "f" * st.hex_len) == st.bits


def test_values_read_the_record():
    rng = random.Random(1)
    h = _record(rng, phash_mirror=_hex(rng, PHash), pdq_quality=77)
    assert PDQ.values(h) == [("pdq", h.pdq), ("pdq_mirror", None)]
    assert PHash.values(h) == [("phash", h.phash), ("phash_mirror", h.phash_mirror)]
    assert (PDQ.code(h), PHash.code(h)) == (h.pdq, h.phash)
    assert (PDQ.quality(h), PHash.quality(h)) == (77, None)


def test_display_names_are_unchanged():
    vias = ("sha256", "phash", "pdq", "phash_mirror", "pdq_mirror", "phash_view", "uniform")
    assert {via: _via_words(via) for via in vias} == {
        "sha256": ("SHA-256", " (the same file)"), "phash": ("pHash", ""), "pdq": ("PDQ", ""),
        "phash_mirror": ("pHash", " (mirrored)"), "pdq_mirror": ("PDQ", " (mirrored)"),
        "phash_view": ("pHash", " (crop/screenshot view)"), "uniform": ("grey level", " (a one-colour picture)"),
    }


def _columns(path, bank: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT entry_id, label, phash, pdq, pdq_quality FROM entries WHERE bank = ? ORDER BY rowid",
                          (bank,)).fetchall()
    finally:
        db.close()


@pytest.mark.parametrize("st", [PDQ, PHash])
def test_a_hash_list_imports_under_each_alias(tmp_path, st):
    rng = random.Random(st.hex_len)
    path = tmp_path / "b.sqlite"
    store = BankStore(path)
    for k, alias in enumerate(st.csv_aliases):
        code = _hex(rng, st)
        csv = tmp_path / f"{alias}.csv"
        csv.write_text(f"ID,{alias.upper()},label\nx{k},{code.upper()},{alias}.jpg\n")  # header case and hex case do not matter
        assert store.import_csv(alias, csv, "fake") == 1
        row = (f"x{k}", f"{alias}.jpg", code if st is PHash else None, code if st is PDQ else None, None)
        assert _columns(path, alias) == [row]
        # and it matches its own code, on that signal type (an unquality'd PDQ is trusted)
        h = _record(rng, **{st.name: code})
        assert [(m.bank, m.entry_id, m.distance, m.via) for m in store.match(h) if m.bank == alias] == [
            (alias, f"x{k}", 0, st.name)]
    store.close()


def test_a_quality_column_imports_under_each_alias(tmp_path):
    rng = random.Random(3)
    path = tmp_path / "b.sqlite"
    store = BankStore(path)
    for alias in PDQ.quality_aliases:
        code, low = _hex(rng, PDQ), _hex(rng, PDQ)
        csv = tmp_path / f"{alias}.csv"
        csv.write_text(f"pdq,{alias}\n{code},87.0\n{low},10\n")
        assert store.import_csv(alias, csv, "fake") == 2
        assert [r[3:] for r in _columns(path, alias)] == [(code, 87), (low, 10)]
        assert [m.entry_id for m in store.match(_record(rng, pdq=code)) if m.bank == alias] == ["1"]
        assert [m.entry_id for m in store.match(_record(rng, pdq=low)) if m.bank == alias] == []  # below the floor
    store.close()


def test_a_headerless_list_is_typed_by_length(tmp_path):
    rng = random.Random(4)
    pdq, phash = _hex(rng, PDQ), _hex(rng, PHash)
    csv = tmp_path / "bare.csv"
    csv.write_text(f"{pdq.upper()},a.jpg\n{phash}\n")
    path = tmp_path / "b.sqlite"
    store = BankStore(path)
    assert store.import_csv("bare", csv, "fake") == 2
    assert _columns(path, "bare") == [("1", "a.jpg", None, pdq, None), ("2", None, phash, None, None)]
    store.close()


@pytest.mark.parametrize("body, says", [
    ("id,md5\n1,abc\n", "no pdq or phash column in header ['id', 'md5']"),
    ("pdq,phash\n{pdq16},{phash64}\n", "bad.csv:2: no valid 64-hex PDQ or 16-hex pHash"),
    ("pdq,phash\n{pdq} x,\n", "bad.csv:2: no valid 64-hex PDQ or 16-hex pHash"),
])
def test_hash_list_errors_are_unchanged(tmp_path, body, says):
    bad = tmp_path / "bad.csv"
    bad.write_text(body.format(pdq="a" * 64, pdq16="a" * 16, phash64="b" * 64))
    with pytest.raises(ValueError) as e:
        BankStore(tmp_path / "b.sqlite").import_csv("x", bad, "fake")
    assert says in str(e.value)


def test_op_validation_goes_through_the_signal_types():
    from streams.clustering import _bad_codes

    rng = random.Random(5)
    good = _record(rng, phash_mirror=_hex(rng, PHash), pdq_mirror=_hex(rng, PDQ), views=[_hex(rng, PHash)] * 3)
    assert _bad_codes(good) == []
    assert _bad_codes(good.model_copy(update={"phash": good.phash.upper()})) == []  # either case, as before
    broken = good.model_copy(update={
        "pdq": good.pdq[:-1], "phash": good.pdq, "pdq_mirror": "", "phash_mirror": good.phash + " ",
        "views": [good.phash, "x" * 16, good.pdq]})
    # in the record's field order, as the error message always listed them
    assert _bad_codes(broken) == ["phash", "pdq", "phash_mirror", "pdq_mirror", "views[1]", "views[2]"]


def test_the_bank_cli_help_names_each_signal_types_column():
    from streams.cli.bank import _CSV_HELP

    assert _CSV_HELP == "CSV with a 'pdq' (64 hex) and/or 'phash' (16 hex) column; optional id, label, quality."


class _Crc32(SignalType):
    """A test-only third type: not in the record, not stored by banks."""

    name = "crc32"
    label = "CRC-32"
    bits = 32
    csv_aliases = ("crc32",)
    default_threshold = 0


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(signals, "_REGISTRY", dict(signals._REGISTRY))


def test_a_third_signal_type_is_picked_up_by_the_registry(tmp_path, scratch_registry):
    assert register(_Crc32) is _Crc32
    assert [st.name for st in signal_types()] == ["pdq", "phash", "crc32"]
    assert signal_type("crc32") is _Crc32 and _Crc32.hex_len == 8
    assert _Crc32.validate("DEADBEEF") == "deadbeef" and _Crc32.distance("deadbeef", "deadbeee") == 1
    assert _Crc32.values(_record(random.Random(6))) == [] and not _Crc32.has_quality and not _Crc32.has_views
    with pytest.raises(ValueError, match="registered twice"):
        register(_Crc32)
    # banks store the types the fixed schema has a column for: the third is
    # registered, but a hash list of it alone is still no bank list ...
    bad = tmp_path / "crc.csv"
    bad.write_text("crc32\ndeadbeef\n")
    with pytest.raises(ValueError, match=r"no pdq or phash column in header \['crc32'\]"):
        BankStore(tmp_path / "b.sqlite").import_csv("x", bad, "fake")
    # ... and PDQ/pHash lists import and match as before
    rng = random.Random(7)
    code = _hex(rng, PDQ)
    ok = tmp_path / "ok.csv"
    ok.write_text(f"pdq,crc32\n{code},deadbeef\n")
    store = BankStore(tmp_path / "b.sqlite")
    assert store.import_csv("x", ok, "fake") == 1
    assert [(m.entry_id, m.via) for m in store.match(_record(rng, pdq=code))] == [("1", "pdq")]
    store.close()
    from streams.clustering import _bad_codes

    assert _bad_codes(_record(rng)) == []


def test_register_refuses_what_the_record_cannot_hold(scratch_registry):
    class NotInRecord(_Crc32):
        name = "sha1"
        fields = ("sha1",)

    class SecondViews(_Crc32):
        name = "dhash"
        fields = ()
        view_via = "dhash_view"

    with pytest.raises(ValueError, match="no field sha1 on ImageHashes"):
        register(NotInRecord)
    with pytest.raises(ValueError, match="only one signal type can carry the record's views"):
        register(SecondViews)
    with pytest.raises(ValueError, match="bits must be a positive multiple of 4"):
        class Odd(_Crc32):
            bits = 30
    assert [st.name for st in signal_types()] == ["pdq", "phash"]


def test_a_type_reading_a_field_another_type_reads_is_refused():
    from detectors.signals import SignalType, register, signal_types

    class Pdq128(SignalType):  # a second reading of PDQ's field would refuse every 256-bit code it holds
        name = "pdq128"
        label = "PDQ-128"
        bits = 128
        fields = ("pdq",)
        default_threshold = 10

    before = list(signal_types())
    with pytest.raises(ValueError, match=r"already read by another type: pdq \(pdq\)"):
        register(Pdq128)
    assert signal_types() == before
