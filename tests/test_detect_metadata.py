"""Generator metadata and stealth-pnginfo detectors on the shared sd-parsers
fixtures, the detect-dev set and hostile inputs."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectors.base import create_all
from detectors.imagedata import ImageData, ImageRejected
from detectors.plugins._png_text import MAX_VALUE_BYTES, read_png_metadata
from detectors.plugins.generator_metadata import GeneratorMetadataDetector
from detectors.plugins.stealth_pnginfo import StealthPngInfoDetector

SD = Path("fixtures/sd-parsers/tests/resources")


@pytest.mark.parametrize(
    ("relpath", "generator", "model"),
    [
        ("parsers/AUTOMATIC1111/automatic1111_cropped.png", "AUTOMATIC1111", "realistic_realisticVisionV20_v20"),
        ("parsers/AUTOMATIC1111/automatic1111_cropped.jpg", "AUTOMATIC1111", "realistic_realisticVisionV20_v20"),
        ("parsers/ComfyUI/img2img_cropped.png", "ComfyUI", "v1-5-pruned-emaonly.ckpt"),
        ("parsers/ComfyUI/unclip_2pass_cropped.png", "ComfyUI", "wd-1-5-beta2-aesthetic-unclip-h-fp32.safetensors"),
        ("parsers/Fooocus/fooocus1_cropped.png", "Fooocus", "juggernautXL_v8Rundiffusion"),
        ("parsers/InvokeAI/invokeai_dream1.png", "InvokeAI", None),
        ("parsers/InvokeAI/invokeai_imeta1.png", "InvokeAI", "juggernautXL"),
        ("parsers/InvokeAI/invokeai_sdmeta1.png", "InvokeAI", "deliberateForInvoke_v08"),
        ("parsers/NovelAI/novelai1_cropped.png", "NovelAI", None),
        ("bad_images/text_after_idat.png", "AUTOMATIC1111", "realistic_realisticVisionV20_v20"),
    ],
)
def test_generator_chunks_are_decisive(shared_data: Path, relpath: str, generator: str, model: str | None) -> None:
    [ev] = GeneratorMetadataDetector().analyze(ImageData.from_path(shared_data / SD / relpath))
    assert ev.score >= 0.99 and ev.weight >= 3.0
    assert any(g.startswith(generator) for g in ev.data["generators"])
    assert generator in ev.detail
    if model:
        assert f"model {model}" in ev.detail


def test_comfyui_detail_names_chunk_and_model(shared_data: Path) -> None:
    path = shared_data / "detect-dev" / "ai" / "flux_dev_example.png"
    [ev] = GeneratorMetadataDetector().analyze(ImageData.from_path(path))
    assert ev.detail.startswith("ComfyUI metadata in PNG 'prompt' tEXt chunk")
    assert ev.detail.endswith("; model flux1-dev.safetensors")


def test_stealth_alpha_fixture(shared_data: Path) -> None:
    image = ImageData.from_path(shared_data / SD / "parsers/AUTOMATIC1111/automatic1111_stealth.png")
    [ev] = StealthPngInfoDetector().analyze(image)
    assert ev.score >= 0.99 and ev.data["signature"] == "stealth_pngcomp"
    assert "Steps:" in ev.data["parameters"] and "model realisticVisionV51_v51VAE" in ev.detail
    assert GeneratorMetadataDetector().analyze(image) == []  # nothing in the chunks: only the pixels tell


def _embed_stealth(rgba: np.ndarray, text: str) -> np.ndarray:
    payload = text.encode()
    bits = "".join(f"{b:08b}" for b in b"stealth_pnginfo" + struct.pack(">I", len(payload) * 8) + payload)
    out = rgba.copy()
    alpha = out[:, :, 3].T.copy().reshape(-1)  # column-major, as the extension writes
    alpha[: len(bits)] = (alpha[: len(bits)] & 0xFE) | np.frombuffer(bits.encode(), np.uint8) - 48
    out[:, :, 3] = alpha.reshape(out.shape[1], out.shape[0]).T
    return out


def test_stealth_uncompressed_round_trip() -> None:
    rgba = np.full((40, 50, 4), 255, np.uint8)
    params = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Model: dreamshaper_8"
    buf = io.BytesIO()
    Image.fromarray(_embed_stealth(rgba, params), "RGBA").save(buf, "PNG")
    [ev] = StealthPngInfoDetector().analyze(ImageData(buf.getvalue()))
    assert ev.data["signature"] == "stealth_pnginfo" and ev.data["parameters"] == params
    assert "model dreamshaper_8" in ev.detail


def test_stealth_payload_is_read_from_the_stored_grid_of_an_exif_rotated_png() -> None:
    # Rotation on display must not scramble the LSB stream, which lives in the stored pixels.
    rgba = np.full((40, 50, 4), 255, np.uint8)
    params = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Model: dreamshaper_8"
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(_embed_stealth(rgba, params), "RGBA").save(buf, "PNG", exif=exif.tobytes())
    image = ImageData(buf.getvalue())
    assert image.orientation == 6 and image.rgb.size == (40, 50)  # displayed rotated
    [ev] = StealthPngInfoDetector().analyze(image)
    assert ev.data["parameters"] == params


@pytest.mark.parametrize("relpath", ["bad_images/empty_image.png", "bad_images/empty_image.jpg"])
def test_bad_images_do_not_crash_any_detector(shared_data: Path, relpath: str) -> None:
    image = ImageData.from_path(shared_data / SD / relpath)
    for det in create_all(cost="cheap"):
        assert det.analyze(image) == []


def test_empty_file_is_rejected_before_detectors(shared_data: Path) -> None:
    with pytest.raises(ImageRejected) as exc:
        ImageData.from_path(shared_data / SD / "bad_images/empty_file.png")
    assert exc.value.reason == "empty"


@pytest.mark.parametrize(
    "name", ["real/Canon EOS-1D Mark III (via Adobe Lightroom).jpg", "real/Blackberry Z10.jpg", "real/Nikon D5000.jpg"]
)
def test_camera_photos_have_no_generator_metadata(shared_data: Path, name: str) -> None:
    image = ImageData.from_path(shared_data / "detect-dev" / name)
    assert GeneratorMetadataDetector().analyze(image) == []


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png_with_text_after_idat(key: bytes, compressed_text: bytes) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    png = buf.getvalue()
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + _chunk(b"zTXt", key + b"\x00\x00" + compressed_text) + png[iend:]


def test_hostile_text_chunk_is_bounded() -> None:
    # ~100 MB of parameters deflated to ~100 KB, placed after IDAT where
    # Pillow's open() does not look, so it reaches the detector.
    text = b"photo\nSteps: 20, Sampler: Euler, Seed: 1\n" + b"a" * 100_000_000
    data = _png_with_text_after_idat(b"parameters", zlib.compress(text, 9))
    assert len(data) < 1_000_000
    texts, _ = read_png_metadata(data)
    assert texts[0].truncated and len(texts[0].value) == MAX_VALUE_BYTES
    image = ImageData(data)
    tracemalloc.start()
    [ev] = GeneratorMetadataDetector().analyze(image)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "AUTOMATIC1111" in ev.detail
    assert peak < 32 * 1024 * 1024
