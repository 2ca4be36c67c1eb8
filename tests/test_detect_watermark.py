"""Invisible-watermark detector: round trips through imwatermark's own encoder."""

from __future__ import annotations

import io
import time

import cv2
import numpy as np
import pytest
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

from detectors.imagedata import ImageData
from detectors.plugins import watermark
from detectors.plugins.watermark import (
    MAX_BLOCKS,
    SDXL_MESSAGE,
    InvisibleWatermarkDetector,
    block_bits,
    decode,
    detect_marks,
    top_band,
)

SDXL_BITS = [int(b) for b in bin(SDXL_MESSAGE)[2:]]


def _photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Blurred colour noise: natural-image-like texture, so each block has a
    clear strongest DCT coefficient for the mark to ride on."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w, 3)).astype(np.float32), (0, 0), 3)
    return ((noise - noise.min()) / (noise.max() - noise.min()) * 255).astype(np.uint8)


def _encode(rgb: np.ndarray, kind: str, content: object) -> np.ndarray:
    enc = WatermarkEncoder()
    enc.set_watermark(kind, content)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # the SD scripts convert RGB->BGR first
    return np.ascontiguousarray(enc.encode(bgr, "dwtDct")[:, :, ::-1])


def _png(rgb: np.ndarray) -> ImageData:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return ImageData(buf.getvalue())


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return _photo_like(512, 768)


def test_sd1_watermark_round_trip(clean: np.ndarray) -> None:
    [ev] = InvisibleWatermarkDetector().analyze(_png(_encode(clean, "bytes", b"StableDiffusionV1")))
    assert ev.score > 0.9 and ev.weight >= 2.0
    assert "Stable Diffusion 1.x" in ev.detail
    assert ev.data["marks"][0]["mark"] == "StableDiffusionV1"


def test_sdxl_watermark_round_trip(clean: np.ndarray) -> None:
    [ev] = InvisibleWatermarkDetector().analyze(_png(_encode(clean, "bits", SDXL_BITS)))
    assert "Stable Diffusion XL" in ev.detail


def test_clean_image_gives_no_evidence(clean: np.ndarray) -> None:
    assert InvisibleWatermarkDetector().analyze(_png(clean)) == []


def test_recompressed_mark_gives_no_evidence_not_counter_evidence(clean: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(_encode(clean, "bytes", b"StableDiffusionV1")).save(buf, "JPEG", quality=80, subsampling=2)
    assert InvisibleWatermarkDetector().analyze(ImageData(buf.getvalue())) == []


def test_vectorised_decode_matches_reference(clean: np.ndarray) -> None:
    marked = _encode(clean[:300, :517], "bytes", b"SDV2")  # odd sizes exercise the cropping
    bgr = np.ascontiguousarray(marked[:, :, ::-1])
    for length in (32, 48, 136):
        reference = np.array(WatermarkDecoder("bits", length).decode(bgr, "dwtDct"), dtype=np.uint8)
        bits, index = block_bits(bgr, bgr.shape[1])
        assert (decode(bits, index, length) == reference).all()


def test_large_images_are_decoded_on_a_bounded_band() -> None:
    big = np.random.default_rng(1).integers(0, 256, (6000, 8000, 3), dtype=np.uint8)
    band = top_band(big)
    assert band.shape[1] == 8000 and band.shape[0] % 8 == 0
    assert (band.shape[0] // 8) * (8000 // 8) <= MAX_BLOCKS
    start = time.monotonic()
    assert detect_marks(big) == []
    assert time.monotonic() - start < 2.0


def test_band_decode_finds_mark_below_the_band(monkeypatch: pytest.MonkeyPatch) -> None:
    # A smaller block budget makes a 1536x1024 image "large": only its top third
    # is read. (~17% of blocks carry a wrong bit after the encoder's uint8
    # rounding, so the budget must leave dozens of blocks per message bit.)
    monkeypatch.setattr(watermark, "MAX_BLOCKS", 8192)
    img = _encode(_photo_like(1536, 1024, seed=2), "bytes", b"StableDiffusionV1")
    assert top_band(img).shape[0] <= img.shape[0] // 3
    assert [m["mark"] for m in detect_marks(img)] == ["StableDiffusionV1"]


def test_a_picture_decoded_at_reduced_scale_is_read_in_its_decoded_band(monkeypatch) -> None:
    # the band was cut at the file's width: half of it black padding past a
    # 1/2-scale decode's edge, read as if it were pixels
    from detectors.imagedata import DecodeLimits

    buf = io.BytesIO()
    Image.fromarray(_photo_like(3000, 4000)).save(buf, "JPEG", quality=95)
    image = ImageData(buf.getvalue(), limits=DecodeLimits(max_decode_bytes=20_000_000))
    assert image.pixels(oriented=False).size == (2000, 1500)  # the reduced decode this is about
    bands = []
    monkeypatch.setattr(watermark, "marks_in_band", lambda band: bands.append(band) or [])
    assert InvisibleWatermarkDetector().analyze(image) == []
    [band] = bands
    assert band.shape[1] == 2000 and band.max(axis=(0, 2)).min() > 0  # no column of padding


def test_the_plugin_reads_marks_through_detect_marks(clean: np.ndarray, monkeypatch) -> None:
    # one path: what these tests call (detect_marks) is what the analyze stage runs
    marked = _encode(clean, "bytes", b"StableDiffusionV1")
    calls = []
    real = watermark.detect_marks
    monkeypatch.setattr(watermark, "detect_marks", lambda rgb, **kw: calls.append((rgb, kw)) or real(rgb, **kw))
    [ev] = InvisibleWatermarkDetector().analyze(_png(marked))
    [(rgb, kw)] = calls
    assert kw == {"size": (768, 512)} and ev.data["marks"] == real(marked) == real(Image.fromarray(marked))


def test_too_small_a_picture_is_left_on_its_own_size(monkeypatch) -> None:
    small = _photo_like(200, 300)  # 60,000 pixels < MIN_PIXELS: the encoder refuses to mark one
    bands = []
    monkeypatch.setattr(watermark, "marks_in_band", lambda band: bands.append(band.shape) or [])
    assert detect_marks(small) == [] and InvisibleWatermarkDetector().analyze(_png(small)) == []
    assert bands == []  # never read
    # a reduced-scale decode of a large picture is read: the picture's own size decides
    assert detect_marks(Image.fromarray(small), size=(3000, 2000)) == [] and bands == [(200, 300, 3)]
