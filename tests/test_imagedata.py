"""Safe decoding: every limit is enforced before pixels are decoded, and bad
input is refused with a reason code, never a crash."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from detectors.imagedata import DecodeLimits, ImageData, ImageRejected
from streams.demo_feed import bomb_png, jpeg_bytes, scene


def test_bomb_is_refused_from_the_header_without_decoding():
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as e:
        ImageData(bomb_png(100_000, 100_000))
    assert e.value.reason in ("decompression_bomb", "too_large")
    assert time.perf_counter() - started < 1.0  # 10 Gpx would take minutes and 30 GB to decode


def test_limits_are_configurable():
    data = jpeg_bytes(scene(1, (800, 600)))
    with pytest.raises(ImageRejected, match="pixels exceeds"):
        ImageData(data, limits=DecodeLimits(max_pixels=100_000))
    with pytest.raises(ImageRejected, match="max dimension"):
        ImageData(data, limits=DecodeLimits(max_dimension=500))
    with pytest.raises(ImageRejected) as e:
        ImageData(data, limits=DecodeLimits(max_bytes=100))
    assert e.value.reason == "too_large"


def test_truncated_and_garbage_input_are_rejected_with_reasons():
    full = jpeg_bytes(scene(2))
    with pytest.raises(ImageRejected) as e:
        ImageData(full[: len(full) // 3]).rgb
    assert e.value.reason == "undecodable"
    with pytest.raises(ImageRejected) as e:
        ImageData(b"<html>not an image</html>")
    assert e.value.reason == "undecodable"
    with pytest.raises(ImageRejected) as e:
        ImageData(b"")
    assert e.value.reason == "empty"


def test_exif_orientation_is_applied():
    img = scene(3, (300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert ImageData(buf.getvalue()).rgb.size == (200, 300)


def test_draft_thumbnail_is_small_but_not_below_the_floor():
    im = ImageData(jpeg_bytes(scene(4, (2048, 1536))))
    thumb = im.thumbnail(128)
    assert min(thumb.size) >= 128 and max(thumb.size) <= 512


def test_phone_heic_decodes(shared_data):
    heic = next(shared_data.rglob("*.HEIC"), None)
    if heic is None:
        pytest.skip("no HEIC sample in shared data")
    im = ImageData.from_path(heic)
    assert im.format == "HEIF" and min(im.rgb.size) > 1000
