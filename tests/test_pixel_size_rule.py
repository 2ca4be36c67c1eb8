"""Pixel evidence and picture size: below 96 px on the short side the probe gives no opinion;
below 224 px (the crop, so the picture is upscaled) its evidence alone reaches likely-ai only
from a calibrated 0.98, below 512 px only from 0.8; larger pictures weigh as before. Needs no
../shared data."""

from __future__ import annotations

import io

import pytest

from detectors.fusion import fuse
from detectors.imagedata import ImageData
from detectors.models.pixel_backbone import CROP, FeatureSpec
from detectors.models.pixel_detector import (
    FULL_SIDE, MIN_SIDE, SMALL_PICTURE_THRESHOLD, UPSCALED_THRESHOLD, evidence_weight, load_pixel_detector,
    probe_side, size_rule,
)
from tests.support import picture


def _jpeg(size: tuple[int, int], seed: int = 3) -> ImageData:
    buf = io.BytesIO()
    picture(seed, size).save(buf, "JPEG", quality=75)
    return ImageData(buf.getvalue())


@pytest.fixture(scope="module")
def detector():
    return load_pixel_detector(device="cpu")


def test_the_rule_by_short_side() -> None:
    thr = 0.61
    assert size_rule(1, thr) == ("too-small", 0.0)
    assert size_rule(MIN_SIDE - 1, thr) == ("too-small", 0.0)
    assert size_rule(MIN_SIDE, thr) == ("upscaled", evidence_weight(UPSCALED_THRESHOLD))
    assert size_rule(CROP - 1, thr)[0] == "upscaled"
    assert size_rule(CROP, thr) == ("reduced", evidence_weight(SMALL_PICTURE_THRESHOLD))
    assert size_rule(FULL_SIDE - 1, thr)[0] == "reduced"
    assert size_rule(FULL_SIDE, thr) == ("full", evidence_weight(thr))
    # a head whose own threshold is above a band's cut keeps its own there
    assert size_rule(300, 0.97) == ("reduced", evidence_weight(0.97))
    assert evidence_weight(UPSCALED_THRESHOLD) < evidence_weight(SMALL_PICTURE_THRESHOLD) < evidence_weight(thr)


def test_the_short_side_is_that_of_the_picture_the_probe_crops() -> None:
    spec = FeatureSpec()
    assert probe_side((8, 8), spec) == 8 and probe_side((640, 200), spec) == 200
    # a long strip is re-posted first (long side capped at 1600): its short side shrinks with it
    assert probe_side((4000, 300), spec) == 120
    assert probe_side((4000, 300), spec.model_copy(update={"canonical_input": False})) == 300


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (95, 400), (60, 90)])
def test_a_tiny_picture_gets_no_pixel_opinion(detector, size) -> None:
    # it used to be upscaled and scored at full weight: a 1x1 picture read as a confident "real" 0.01
    # at weight 1.9, and 10-33% of real photos shrunk to 96-192 px crossed likely-ai alone
    (ev,) = detector.analyze(_jpeg(size))
    assert ev.weight == 0.0 and ev.score == 0.5
    assert ev.data["size_rule"] == "too-small" and ev.data["short_side"] == min(size) and ev.data["flagged"] is False
    assert f"too small for the pixel probe: {min(size)} px" in ev.detail
    assert fuse([ev]).verdict == "no-evidence"


@pytest.mark.parametrize("size", [(150, 100), (223, 400)])
def test_an_upscaled_picture_alone_reaches_likely_ai_only_when_very_confident(detector, size) -> None:
    # 16-30% of real photos shrunk to 128-192 px crossed the operating threshold; none reached 0.98
    (ev,) = detector.analyze(_jpeg(size))
    assert ev.data["size_rule"] == "upscaled" and ev.weight == pytest.approx(evidence_weight(UPSCALED_THRESHOLD))
    assert f"upscaled to the {CROP}-px crop" in ev.detail
    below = ev.model_copy(update={"score": UPSCALED_THRESHOLD - 0.01})
    above = ev.model_copy(update={"score": UPSCALED_THRESHOLD + 0.005})
    assert fuse([below]).verdict != "likely-ai" and fuse([above]).verdict == "likely-ai"


def test_a_small_picture_weighs_less_and_a_large_one_as_before(detector) -> None:
    (small,) = detector.analyze(_jpeg((300, 240)))
    assert small.data["size_rule"] == "reduced" and small.weight == pytest.approx(evidence_weight(SMALL_PICTURE_THRESHOLD))
    assert "Small picture (240 px" in small.detail
    (large,) = detector.analyze(_jpeg((800, 600)))
    assert large.data["size_rule"] == "full" and large.weight == pytest.approx(evidence_weight(detector.threshold))


def test_pixel_evidence_on_a_small_picture_alone_reaches_likely_ai_only_from_the_small_picture_cut(detector) -> None:
    (ev,) = detector.analyze(_jpeg((300, 240)))
    below = ev.model_copy(update={"score": SMALL_PICTURE_THRESHOLD - 0.02})
    above = ev.model_copy(update={"score": SMALL_PICTURE_THRESHOLD + 0.01})
    assert fuse([below]).verdict != "likely-ai"
    assert fuse([above]).verdict == "likely-ai"


def test_a_cluster_s_larger_copy_decides_over_its_thumbnail(detector) -> None:
    # fusion keeps one item per detector, the one with the largest contribution: the thumbnail's
    # zero-weight item never hides the larger copy's opinion
    (thumb,) = detector.analyze(_jpeg((120, 90), seed=4))
    (big,) = detector.analyze(_jpeg((1000, 750), seed=4))
    fused = fuse([thumb, big])
    assert [e.data["size_rule"] for e in fused.evidence] == ["full"]
