"""Train a tiny model on generated data, then save -> load -> batch inference ->
eval, through the CLI, and check the AUC on the separable synthetic task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from detectors.imagedata import ImageData
from detectors.models import ModelDetector, list_models, load_detector
from streams.cli import app

SIZE = 48


def _fake(rng: np.random.Generator) -> Image.Image:
    # "Generator" output: a half-resolution image upsampled 2x nearest-neighbour,
    # the periodic artefact NPR-style residuals expose.
    low = rng.integers(0, 256, (SIZE // 2, SIZE // 2, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((SIZE, SIZE), Image.NEAREST)


def _real(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    for sub, make in (("real", _real), ("ai", _fake)):
        (root / sub).mkdir()
        for i in range(40):
            make(rng).save(root / sub / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def trained(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("models")
    r = CliRunner().invoke(app, [
        "train", "--real", str(synth / "real"), "--fake", str(synth / "ai"), "--arch", "small-cnn",
        "--epochs", "6", "--input-size", "32", "--lr", "3e-3", "--out", "tiny", "--model-dir", str(model_dir),
    ])
    assert r.exit_code == 0, r.output
    return model_dir


def test_checkpoint_written_with_card(trained: Path) -> None:
    assert (trained / "tiny.safetensors").is_file() and (trained / "tiny.json").is_file()
    card = json.loads((trained / "tiny.json").read_text())
    assert card["arch"] == "small-cnn" and card["input"]["size"] == 32
    assert card["calibration"]["method"] == "platt" and card["calibration"]["n"] > 0
    assert card["training"]["augment"]["jpeg_p"] > 0  # both classes re-encoded
    assert [c.name for c in list_models(trained)] == ["tiny"]


def test_load_and_batch_inference(trained: Path, synth: Path) -> None:
    det = load_detector("tiny", model_dir=trained, device="cpu")
    assert isinstance(det, ModelDetector) and det.name == "model:tiny" and det.cost == "model"
    ims = [ImageData.from_path(p) for p in sorted((synth / "ai").glob("*.png"))[:4]]
    ims += [ImageData.from_path(p) for p in sorted((synth / "real").glob("*.png"))[:4]]
    evs = det.predict_batch(ims)
    assert [e.sha256 for e in evs] == [im.sha256 for im in ims]
    assert all(0.0 <= e.score <= 1.0 for e in evs)
    assert evs[0].detail.startswith("SmallCNN v1: ") and "(calibrated, threshold 0.5)" in evs[0].detail
    # batch and single-image inference agree (eval mode: no batch statistics)
    single = det.analyze(ims[0])[0].score
    assert single == pytest.approx(evs[0].score, abs=1e-5)


def test_eval_cli_json(trained: Path, synth: Path) -> None:
    r = CliRunner().invoke(app, ["eval", str(synth), "--format", "json", "--model", "tiny",
                                 "--model-dir", str(trained), "--no-cheap"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n"] == 80 and rep["n_pos"] == 40 and set(rep["variants"]) == {"original", "reposted"}
    m = rep["variants"]["original"]["detectors"]["model:tiny"]
    assert set(m) >= {"auc", "average_precision", "accuracy", "recall", "threshold", "n_pos", "n_neg", "coverage"}
    assert m["auc"] > 0.9, m
    assert m["accuracy"] > 0.75, m
    assert rep["variants"]["reposted"]["detectors"]["model:tiny"]["n_pos"] == 40


def test_eval_per_generator_from_manifest(trained: Path, synth: Path, tmp_path: Path) -> None:
    from detectors.models.dataset import load_labelled
    from detectors.models.evaluate import evaluate

    lines = ["file,label,generator"]
    for p in sorted((synth / "ai").glob("*.png")):
        lines.append(f"{p.relative_to(synth)},1,{'gen-a' if int(p.stem) % 2 else 'gen-b'}")
    for p in sorted((synth / "real").glob("*.png")):
        lines.append(f"{p.relative_to(synth)},0,camera")
    manifest = synth / "manifest_test.csv"
    manifest.write_text("\n".join(lines) + "\n")
    det = load_detector("model:tiny", model_dir=trained, device="cpu")
    rep = evaluate(load_labelled(manifest), [det], dataset="synth", variants=["original"])
    per = rep["variants"]["original"]["per_generator"]
    assert set(per) == {"gen-a", "gen-b"}
    assert per["gen-a"]["model:tiny"]["n_pos"] == 20 and per["gen-a"]["model:tiny"]["n_neg"] == 40


def test_clip_probe_builds_when_open_clip_present(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    import torch

    from detectors.models.nets import build_net

    # Smallest open_clip vision tower, random weights: no backbone file, no download.
    net = build_net("clip-probe", {"clip_model": "RN50", "backbone_file": None}, tmp_path)
    assert net(torch.randn(2, 3, 224, 224)).shape == (2,)
    assert set(net.state_dict()) == {"fc.weight", "fc.bias"}


def test_eval_metrics_count_real_pictures_at_even_odds_only_where_a_detector_spoke() -> None:
    import numpy as np

    from detectors.models.evaluate import NO_OPINION, metrics

    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.2, 0.55, NO_OPINION, 0.9, 0.8, NO_OPINION])
    spoke = np.array([True, True, False, True, True, False])
    m = metrics(scores, labels, 0.7, spoke)
    assert m["real_above_0.5"] == 0.5  # 0.55 and 0.9 of four real pictures; the silent one is no opinion
    assert m["fpr"] == 0.25 and m["recall"] == 0.5
    assert metrics(scores[4:], labels[4:], 0.7, spoke[4:])["real_above_0.5"] is None  # no real pictures
