"""Fusion rules (see detectors/fusion.py's docstring)."""

from __future__ import annotations

import math

import pytest

from detectors.base import Evidence
from detectors.fusion import NO_EVIDENCE_SCORE, contribution, fuse


def ev(detector: str, score: float, weight: float = 1.0, **data: object) -> Evidence:
    return Evidence(detector=detector, score=score, weight=weight, detail=f"{detector} says {score}", data=dict(data))


GENERATOR_CHUNK = ev("generator-metadata", 0.99, 3.0)
C2PA_AI = ev("c2pa", 0.99, 3.0)
C2PA_CAPTURE = ev("c2pa", 0.05, 2.5)


def test_no_evidence_is_a_neutral_prior_below_thresholds() -> None:
    fused = fuse([])
    assert fused.verdict == "no-evidence" and fused.score == NO_EVIDENCE_SCORE
    assert NO_EVIDENCE_SCORE < 0.4  # never inconclusive, never an alert at the default 0.7
    informational = fuse([ev("c2pa", 0.5, 0.0)])
    assert informational.verdict == "no-evidence" and informational.score == NO_EVIDENCE_SCORE
    assert len(informational.evidence) == 1  # still shown to the desk


def test_decisive_provenance_dominates_weak_model_scores() -> None:
    fused = fuse([GENERATOR_CHUNK, ev("model:clip", 0.05, 1.0)])
    assert fused.verdict == "likely-ai" and fused.score > 0.99
    assert fused.evidence[0].detector == "generator-metadata"
    # ...even a confident model with a large weight
    assert fuse([C2PA_AI, ev("model:clip", 0.01, 3.0)]).verdict == "likely-ai"


def test_models_count_with_their_own_weight_alone() -> None:
    assert fuse([ev("model:a", 0.9, 1.0)]).verdict == "likely-ai"
    assert fuse([ev("model:a", 0.6, 1.0)]).verdict == "inconclusive"
    assert fuse([ev("model:a", 0.9, 0.2)]).score < fuse([ev("model:a", 0.9, 1.0)]).score


def test_a_model_does_not_undo_metadata_it_contradicts() -> None:
    from detectors.base import EvidenceKind

    named = Evidence(detector="generator-metadata", kind=EvidenceKind.METADATA, score=0.9, weight=1.5,
                     detail="Midjourney named in the description")  # free text: weight 1.5, not decisive
    looks_real = Evidence(detector="model:px", kind=EvidenceKind.MODEL, score=0.02, weight=1.9, detail="px")
    assert fuse([looks_real]).verdict == "no-evidence"
    assert fuse([named, looks_real]).verdict == "likely-ai"  # the model counts at a quarter against it
    agrees = looks_real.model_copy(update={"score": 0.9})
    assert fuse([named, agrees]).score > fuse([named]).score > fuse([named, looks_real]).score
    # an item below weight 1 (an unvalidated capture claim) leaves the model its full say
    faint = Evidence(detector="c2pa", kind=EvidenceKind.PROVENANCE, score=0.35, weight=0.5, detail="unvalidated")
    full = contribution(faint) + contribution(agrees)
    assert fuse([faint, agrees]).score == pytest.approx(1 / (1 + math.exp(-full)))


def test_identical_copies_count_once() -> None:
    one = fuse([ev("model:a", 0.8)])
    many = fuse([ev("model:a", 0.8)] * 20)
    assert many.score == one.score and len(many.evidence) == 1


def test_strongest_item_per_detector_is_kept() -> None:
    fused = fuse([ev("model:a", 0.6), ev("model:a", 0.95), ev("model:a", 0.3)])
    assert [e.score for e in fused.evidence] == [0.95]


def test_signed_capture_counts_against() -> None:
    fused = fuse([C2PA_CAPTURE])
    assert fused.verdict == "no-evidence" and fused.score < 0.01
    assert fuse([C2PA_CAPTURE, ev("model:a", 0.9)]).verdict == "no-evidence"


def test_bank_matches_count_by_their_verdict() -> None:
    authentic = ev("bank:afp", 0.9, 3.0, verdict="authentic")  # score disagrees: the verdict wins
    assert fuse([authentic]).score < 0.1
    assert fuse([authentic, ev("model:a", 0.95)]).verdict == "no-evidence"
    fake = ev("bank:factcheck", 0.2, 3.0, verdict="fake")
    assert fuse([fake]).verdict == "likely-ai"


def test_evidence_sorted_most_decisive_first() -> None:
    fused = fuse([ev("model:a", 0.7), GENERATOR_CHUNK, ev("xmp", 0.5, 0.0), ev("invisible-watermark", 0.97, 2.5)])
    assert [e.detector for e in fused.evidence] == ["generator-metadata", "invisible-watermark", "model:a", "xmp"]


def test_thresholds_are_parameters() -> None:
    item = [ev("model:a", 0.75)]
    assert fuse(item).verdict == "likely-ai"
    assert fuse(item, likely_ai=0.8).verdict == "inconclusive"
    assert fuse(item, likely_ai=0.8, inconclusive=0.76).verdict == "no-evidence"


def test_kind_not_name_decides_damping_and_bank_direction() -> None:
    from detectors.base import EvidenceKind

    # A vendor pixel classifier is a learned opinion: damped under decisive provenance like models.
    vendor = Evidence(detector="hive", kind=EvidenceKind.VENDOR, score=0.01, weight=3.0, detail="vendor")
    plain = Evidence(detector="hive", kind=EvidenceKind.METADATA, score=0.01, weight=3.0, detail="not learned")
    assert fuse([C2PA_AI, vendor]).score > fuse([C2PA_AI, plain]).score
    # A bank verdict is read by kind, whatever the detector is called.
    bank = Evidence(detector="wire desk", kind=EvidenceKind.BANK, score=0.9, weight=3.0, detail="b", data={"verdict": "authentic"})
    assert fuse([bank]).score < 0.1


def test_old_records_without_kind_still_parse_with_their_kind() -> None:
    from detectors.base import EvidenceKind

    assert Evidence.model_validate({"detector": "model:x", "score": 0.5, "detail": "d"}).kind == EvidenceKind.MODEL
    assert Evidence.model_validate({"detector": "vendor:hive", "score": 0.5, "detail": "d"}).kind == EvidenceKind.VENDOR
    assert Evidence.model_validate({"detector": "bank:afp", "score": 0.5, "detail": "d"}).kind == EvidenceKind.BANK
    assert Evidence.model_validate({"detector": "c2pa", "score": 0.5, "detail": "d"}).kind == EvidenceKind.PROVENANCE
    assert Evidence.model_validate({"detector": "generator-metadata", "score": 0.5, "detail": "d"}).kind == EvidenceKind.METADATA
    round_trip = Evidence.model_validate_json(Evidence(detector="m", kind=EvidenceKind.MODEL, score=0.7, detail="d").model_dump_json())
    assert round_trip.kind == EvidenceKind.MODEL


@pytest.mark.parametrize("field, value", [("score", math.nan), ("score", math.inf), ("weight", math.inf),
                                          ("weight", -math.inf), ("weight", math.nan), ("weight", -0.5)])
def test_evidence_refuses_non_finite_and_negative_numbers(field, value) -> None:
    from pydantic import ValidationError

    doc = {"detector": "d", "score": 0.9, "weight": 1.0, "detail": "d", field: value}
    with pytest.raises(ValidationError) as raised:
        Evidence(**doc)
    [err] = raised.value.errors()
    assert err["loc"] == (field,)
    assert err["type"] == ("greater_than_equal" if value == -0.5 else "finite_number")
    # nor through JSON, which Python's json module writes with Infinity / NaN
    import json

    with pytest.raises(ValidationError):
        Evidence.model_validate_json(json.dumps(doc))


@pytest.mark.parametrize("weight", [math.inf, math.nan])
@pytest.mark.parametrize("score", [0.5, 0.9])
def test_fuse_ignores_an_item_that_bypassed_validation(score, weight) -> None:
    """``fuse`` is called outside the cluster engine (the desk's source view,
    ``deepwatch detect``): an item built with ``model_construct`` raised a
    ValidationError (fused score NaN) at score 0.5, or against another."""
    bad = Evidence.model_construct(detector="x", kind=ev("x", 0.5).kind, score=score, weight=weight, detail="bad",
                                   sha256=None, data={})
    assert fuse([bad]).score == NO_EVIDENCE_SCORE and fuse([bad]).evidence == []
    against = Evidence.model_construct(**{**dict(bad), "detector": "y", "score": 0.1})
    fused = fuse([bad, against, ev("model:a", 0.8)])
    assert fused.score == pytest.approx(0.8) and [e.detector for e in fused.evidence] == ["model:a"]


def test_huge_weights_do_not_overflow_into_nan() -> None:
    # 1e308 * logit(0.99) overflowed to inf; two such opposing items gave inf - inf = NaN
    assert fuse([ev("a", 0.9, 1e308)]).score == 1.0
    assert fuse([ev("a", 0.1, 1e308)]).score < 1e-300
    both = fuse([ev("a", 0.9, 1e308), ev("b", 0.1, 1e308)])
    assert both.score == 0.5 and both.verdict == "inconclusive"


def test_an_exact_tie_within_a_detector_does_not_go_by_list_order() -> None:
    """0.75 and 0.25 at one weight contribute +-log(3) exactly: the first in
    the list was kept, so a merged cluster's verdict depended on which side
    of the merge survived. The higher score wins the tie, either way round."""
    ai, authentic = ev("model:a", 0.75), ev("model:a", 0.25)
    assert abs(contribution(ai)) == abs(contribution(authentic))
    assert fuse([ai, authentic]).score == fuse([authentic, ai]).score == pytest.approx(0.75)
    # equal contributions: the larger weight, then the detail decide
    heavy, light = ev("d", 0.9, 2.0), Evidence(detector="d", score=0.99, weight=2.0 * math.log(9) / math.log(99),
                                              detail="d says 0.99")
    if abs(contribution(heavy)) == abs(contribution(light)):
        assert fuse([light, heavy]).evidence == fuse([heavy, light]).evidence == [heavy]
    one, other = (Evidence(detector="d", score=0.8, detail=t) for t in ("copy one", "copy two"))
    assert fuse([one, other]).evidence == fuse([other, one]).evidence == [other]
    left, right = (Evidence(detector="d", score=0.8, detail="same", data={"post": p}) for p in ("a", "b"))
    assert fuse([left, right]).evidence == fuse([right, left]).evidence == [right]


def test_equally_decisive_detectors_are_listed_by_name() -> None:
    fused = fuse([ev("zeta", 0.75), ev("alpha", 0.25), ev("mid", 0.75)])  # +-log(3) each, exactly
    assert [e.detector for e in fused.evidence] == ["alpha", "mid", "zeta"]
    assert fused == fuse([ev("mid", 0.75), ev("zeta", 0.75), ev("alpha", 0.25)])
    assert fused.score == pytest.approx(0.75)
