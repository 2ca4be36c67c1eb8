"""The pixel detector's reduced-precision torch path -- what a GPU runs by
default (autocast to bf16) -- run on the CPU, as CI can: it loads from the
wheels with nothing fetched, a batch answers as its images one by one, and
its taps and scores stay close to the fp32 graph's."""

from __future__ import annotations

import io

import numpy as np
import pytest

from detectors.imagedata import ImageData
from tests.support import picture

torch = pytest.importorskip("torch")


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed, (640, 480)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_amp_choice_follows_the_device():
    from detectors.models.device import amp_dtype

    assert amp_dtype("auto", "cpu") is None  # CPU autocast is slower than fp32 here
    assert amp_dtype("off", "cpu") is None
    assert amp_dtype("bf16", "cpu") is torch.bfloat16 and amp_dtype("fp16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="amp must be"):
        amp_dtype("int4", "cpu")


def test_bf16_taps_stay_close_to_fp32_and_batches_match_single_images():
    from detectors.models.pixel_backbone import Backbone, image_crops

    crops = np.concatenate([image_crops(ImageData(_jpeg(s)).rgb, 2) for s in (1, 2)])
    fp32 = Backbone(int8=None)  # the fp32 graph
    bf16 = Backbone(int8=None, amp="bf16")  # torch under autocast, as on a GPU
    assert bf16.runtime == "torch-bfloat16" and fp32.runtime.startswith("onnxruntime")
    ref, got = fp32.taps(crops), bf16.taps(crops)
    for tap in ref:
        assert got[tap].dtype == np.float32 and got[tap].shape == ref[tap].shape
        assert _cos(got[tap], ref[tap]).min() > 0.99, tap
    one_by_one = np.concatenate([bf16.taps(crops[i : i + 1])["blocks"] for i in range(len(crops))])
    assert _cos(one_by_one, got["blocks"]).min() > 0.999


def test_bf16_detector_scores_like_the_shipped_one():
    from detectors.models.pixel_detector import load_pixel_detector

    images = [ImageData(_jpeg(s)) for s in (3, 4, 5)]
    shipped = load_pixel_detector(device="cpu")
    bf16 = load_pixel_detector(device="cpu", amp="bf16")
    assert bf16.describe()["runtime"] == "torch-bfloat16"
    a, b = shipped.logits(images), bf16.logits(images)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1.0, (a, b)
