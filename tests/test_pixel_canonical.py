"""Canonical input: the pixel probe sees every picture in the format it was trained on. A picture
that does not look like a re-post (PNG, high-quality or oversized JPEG) is re-posted the way the
training rows were before the crops; a re-post is used as it is. Needs no ../shared data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from detectors.imagedata import ImageData
from detectors.models.pixel_backbone import FeatureSpec
from detectors.models.pixel_data import Sample, canonical, jpeg_quality, repost, repost_like
from detectors.models.pixel_detector import load_pixel_detector
from detectors.models.pixel_features import cached_variant
from detectors.models.pixel_probe import HeadCard
from tests.support import picture


def _encode(size: tuple[int, int], fmt: str, quality: int = 80, seed: int = 3) -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("q", [40, 75, 85, 95])
def test_jpeg_quality_is_read_from_the_quantization_tables(q) -> None:
    from PIL import Image

    assert jpeg_quality(Image.open(io.BytesIO(_encode((64, 48), "JPEG", q)))) == pytest.approx(q, abs=0.5)
    assert jpeg_quality(Image.open(io.BytesIO(_encode((64, 48), "PNG")))) is None


def test_what_counts_as_a_re_post() -> None:
    assert repost_like(ImageData(_encode((800, 600), "JPEG", 80)))
    assert repost_like(ImageData(_encode((1600, 900), "JPEG", 89)))
    assert not repost_like(ImageData(_encode((800, 600), "JPEG", 90)))  # a camera, phone or editor original
    assert not repost_like(ImageData(_encode((2000, 1500), "JPEG", 80)))  # longer than a re-post
    assert not repost_like(ImageData(_encode((800, 600), "PNG")))


def test_an_mpo_is_a_jpeg_to_the_re_post_rule() -> None:
    # a phone's JPEG with a second picture (depth map, preview) opens as "MPO": compared with "JPEG" alone,
    # every one was re-posted once more, however compressed
    buf = io.BytesIO()
    first = picture(3, (800, 600))
    first.save(buf, "MPO", save_all=True, append_images=[picture(4, (200, 150))], quality=80)
    image = ImageData(buf.getvalue())
    assert image.format == "MPO" and repost_like(image) and canonical(image) is image


def test_a_re_post_is_used_as_it_is_and_anything_else_is_re_posted_like_the_training_rows() -> None:
    post = ImageData(_encode((800, 600), "JPEG", 80))
    assert canonical(post) is post
    for data in (_encode((1200, 900), "PNG"), _encode((2400, 1800), "JPEG", 95)):
        seen = canonical(ImageData(data))
        assert seen.data == repost(data)  # byte for byte what `deepwatch train` trained on
        assert seen.format == "JPEG" and max(seen.size) <= 1600


@pytest.fixture(scope="module")
def detector():
    return load_pixel_detector()


def test_the_detector_scores_a_png_as_its_re_post(detector) -> None:
    assert detector.spec.canonical_input  # the packaged head (v4) was calibrated this way
    png = _encode((1000, 750), "PNG", seed=8)
    as_png, as_repost = detector.predict_batch([ImageData(png), ImageData(repost(png))])
    assert as_png.data["logit"] == pytest.approx(as_repost.data["logit"], abs=1e-5)
    raw = detector.spec.model_copy(update={"canonical_input": False})
    plain, detector.spec = detector.spec, raw
    try:
        unchanged = detector.predict_batch([ImageData(png)])[0]
    finally:
        detector.spec = plain
    assert abs(unchanged.data["logit"] - as_png.data["logit"]) > 1e-3  # the flag is what made them equal


def test_heads_saved_before_the_field_see_pictures_as_given() -> None:
    old = HeadCard(spec=FeatureSpec(crops=2)).model_dump(mode="json")
    del old["spec"]["canonical_input"]
    assert HeadCard.model_validate(old).spec.canonical_input is False
    assert FeatureSpec().canonical_input is True  # what new heads are trained with


def test_the_feature_cache_holds_what_the_probe_sees(tmp_path: Path) -> None:
    def sample(name: str, data: bytes) -> Sample:
        path = tmp_path / name
        path.write_bytes(data)
        return Sample(path=path, label=1, generator="g", group="g", category="general", dataset="t")

    png, post = sample("a.png", _encode((500, 400), "PNG")), sample("b.jpg", _encode((500, 400), "JPEG", 80))
    on, off = FeatureSpec(), FeatureSpec(canonical_input=False)
    assert cached_variant(png, "published", on) == "reposted"  # the same bytes as its re-post: one entry
    assert cached_variant(post, "published", on) == "published"
    assert cached_variant(png, "published", off) == "published"
    assert cached_variant(png, "reposted", on) == "reposted"
    assert cached_variant(png, "aug0", on) == "aug0-canonical" and cached_variant(png, "aug0", off) == "aug0"
    assert np.array_equal(np.frombuffer(repost(png.path.read_bytes()), np.uint8),
                          np.frombuffer(canonical(ImageData(png.path.read_bytes())).data, np.uint8))
