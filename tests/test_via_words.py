"""One description of how a match was made (``detectors.signals.describe_via``)
and its two wordings: the desk's (``streams.desk.views.match_words``) and bank
evidence's detail (``detectors.banks.bank_evidence``). Both are read from the
registry, so a signal type is described in both by being registered, and a via
nothing registered reads is named as it stands in both."""

from __future__ import annotations

import pytest

from detectors import signals
from detectors.banks import BankMatch, bank_evidence
from detectors.signals import (
    PDQ,
    CopyKind,
    SignalType,
    ViaDescription,
    describe_via,
    register,
    signal_types,
)
from streams.desk.views import match_words

UNKNOWN_VIA = "pdqf"  # a newer writer's via, read by this version


def _hash_vias(st: type[SignalType]) -> list[tuple[str, CopyKind]]:
    """Each via a match on ``st`` can carry, with the kind of copy it says."""
    vias = [(f, CopyKind.MIRRORED if i else CopyKind.NEAR) for i, f in enumerate(st.fields)]
    return vias + ([(st.view_via, CopyKind.VIEW)] if st.view_via else [])


def _bank_detail(via: str, distance: int = 12) -> str:
    # model_construct: BankMatch's ``Via`` admits only the index's vias, and the
    # unknown one is exactly what the wording must survive
    m = BankMatch.model_construct(bank="afp", verdict="fake", entry_id="7", label=None, distance=distance, via=via)
    [ev] = bank_evidence([m])
    return ev.detail


def _both(via: str) -> tuple[str, str]:
    return match_words(via, 12), _bank_detail(via)


def test_every_registered_via_is_described_from_its_type():
    for st in signal_types():
        for via, kind in _hash_vias(st):
            assert describe_via(via) == ViaDescription(via, kind, st.label, st.bits)
    assert describe_via("sha256") == ViaDescription("sha256", CopyKind.SAME_FILE)
    assert describe_via("uniform") == ViaDescription("uniform", CopyKind.ONE_COLOUR)
    assert describe_via(UNKNOWN_VIA) == ViaDescription(UNKNOWN_VIA, CopyKind.UNKNOWN)


def _check_registered_types_are_worded() -> None:
    for st in signal_types():
        worded = {}
        for via, kind in _hash_vias(st):
            desk, bank = _both(via)
            assert f"12 of {st.bits} {st.label} bits differ" in desk, (via, desk)
            assert f"at {st.label} distance 12" in bank, (via, bank)
            # the kind of copy is said in both: full, mirrored and view do not read alike
            assert desk.startswith({CopyKind.NEAR: "a near copy", CopyKind.MIRRORED: "a mirrored copy",
                                    CopyKind.VIEW: "a crop or framed copy"}[kind]), (via, desk)
            assert bank.endswith({CopyKind.NEAR: f"{st.label} distance 12", CopyKind.MIRRORED: "(mirrored)",
                                  CopyKind.VIEW: "(crop/screenshot view)"}[kind]), (via, bank)
            worded[via] = (desk, bank)
        descs, banks = zip(*worded.values())
        assert len(set(descs)) == len(set(banks)) == len(worded), worded


def test_both_wordings_name_each_registered_type_and_its_kind_of_copy():
    _check_registered_types_are_worded()


class _Wide(SignalType):
    """A test-only type registered after import, reading pHash's fields and
    views under another label and width (the vias stay ones ``BankMatch``
    admits): its words must come from the registry as it is now."""

    name = "wide"
    label = "Wide-pHash"
    bits = 128
    fields = ("phash", "phash_mirror")
    view_via = "phash_view"
    default_threshold = 20


def test_a_type_registered_later_is_worded_in_both(monkeypatch):
    monkeypatch.setattr(signals, "_REGISTRY", {PDQ.name: PDQ})
    register(_Wide)
    assert [st.name for st in signal_types()] == ["pdq", "wide"]
    _check_registered_types_are_worded()
    desk, bank = _both("phash_mirror")
    assert desk == "a mirrored copy: 12 of 128 Wide-pHash bits differ"
    assert bank == "matches 'afp' entry 7 at Wide-pHash distance 12 (mirrored)"


@pytest.mark.parametrize("via, desk, bank", [
    ("sha256", "the same file (identical bytes)", "matches 'afp' entry 7 at SHA-256 distance 12 (the same file)"),
    ("uniform", "a one-colour picture, 12 grey levels apart",
     "matches 'afp' entry 7 at grey level distance 12 (a one-colour picture)"),
    ("pdq", "a near copy: 12 of 256 PDQ bits differ", "matches 'afp' entry 7 at PDQ distance 12"),
    ("phash_view", "a crop or framed copy: 12 of 64 pHash bits differ",
     "matches 'afp' entry 7 at pHash distance 12 (crop/screenshot view)"),
])
def test_the_wordings_read_as_before(via, desk, bank):
    assert _both(via) == (desk, bank)


def test_an_unknown_via_is_named_as_it_stands_in_both():
    desk, bank = _both(UNKNOWN_VIA)
    assert desk == f"a match by {UNKNOWN_VIA}, distance 12"
    assert bank == f"matches 'afp' entry 7 at {UNKNOWN_VIA} distance 12"
    # not passed off as a hash's bits or a kind of copy
    for words in (desk, bank):
        assert not any(st.label in words for st in signal_types()), words
        assert "bits" not in words and "mirrored" not in words and "view" not in words


def test_every_kind_of_copy_is_worded_in_both():
    vias = ["sha256", "uniform", UNKNOWN_VIA, *(v for st in signal_types() for v, _ in _hash_vias(st))]
    assert {describe_via(v).kind for v in vias} == set(CopyKind)
    for via in vias:
        desk, bank = _both(via)
        assert desk and bank.startswith("matches 'afp' entry 7 at ") and "distance 12" in bank
