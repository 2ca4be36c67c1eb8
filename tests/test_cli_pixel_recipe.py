"""`deepwatch train --recipe pixel-probe` and `deepwatch eval --leave-generator-out`
on a small synthetic manifest (no ../shared needed), and a user-trained head
used by `deepwatch detect` through settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import streams.cli.detect  # noqa: F401
import streams.cli.models  # noqa: F401
from streams.cli.app import app
from tests.support import labelled_pair, picture


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")  # both tests reuse the backbone features


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("set")
    rows = ["file,label,generator,category,source"]
    rng = np.random.default_rng(0)
    for g in range(3):
        for i in range(4):
            labelled_pair(root, g, i, (360, 280), rng, posterise=True)
            cat = "portrait" if i % 2 else "landscape"
            rows += [f"real_{g}_{i}.jpg,0,camera,{cat},cam{g}/repo@1", f"ai_{g}_{i}.png,1,gen-{g} (demo),{cat},gen{g}@1"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_leave_generator_out_eval_reports_per_generator_and_category(manifest: Path, cache: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["eval", str(manifest), "--leave-generator-out", "--format", "json",
                                 "--crops", "1", "--cache-dir", str(cache), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["mode"] == "leave-generator-out" and set(rep["variants"]) == {"reposted", "published"}
    for v in rep["variants"].values():
        assert set(v["generators"]) == {"gen-0 (demo)", "gen-1 (demo)", "gen-2 (demo)"}
        assert set(v["categories"]) == {"portrait", "landscape"}
        o = v["overall"]
        assert o["n"] == 24 and {"auc", "ap", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr"} <= set(o)
        assert 0.0 <= o["auc"] <= 1.0
    assert set(rep["real_categories_reposted"]) == {"portrait", "landscape"}


def test_train_recipe_writes_a_head_settings_can_point_at(manifest: Path, cache: Path, tmp_path: Path, monkeypatch) -> None:
    head = tmp_path / "heads" / "mine.safetensors"
    r = CliRunner().invoke(app, ["train", "--recipe", "pixel-probe", "--data", str(manifest), "--out", "newsroom-probe",
                                 "--crops", "1", "--head-out", str(head), "--cache-dir", str(cache),
                                 "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert head.is_file() and (tmp_path / "heads" / "mine.md").is_file()
    card = (tmp_path / "heads" / "mine.md").read_text()
    assert "manifest sha256" in card and "Leave-generator-out" in card
    from detectors.models.pixel_probe import PixelHead

    loaded = PixelHead.load(head)
    assert loaded.card.name == "newsroom-probe" and loaded.card.calibration.n == 24
    assert loaded.card.spec.crops == 1

    monkeypatch.setenv("DEEPWATCH_DETECT__PIXEL_HEAD", str(head))
    r = CliRunner().invoke(app, ["detect", "--format", "json", "--data-dir", str(tmp_path / "d"),
                                 str(manifest / "ai_1_0.png")])
    assert r.exit_code == 0, r.output
    ev = [e for e in json.loads(r.stdout)[0]["evidence"] if e["kind"] == "model"]
    assert [e["detector"] for e in ev] == ["model:newsroom-probe"]
    # the head names its training pictures, so eval can leave them out: here that is all of them
    assert len(loaded.card.trained_on["files_sha256"]) == 24
    r = CliRunner().invoke(app, ["eval", str(manifest), "--exclude-trained", "--no-cheap", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 1 and "24 file(s) excluded as training data" in r.stderr


def test_train_recipe_usage_errors_are_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--recipe", "pixel-probe", "--data", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no manifest.csv" in r.output
    r = CliRunner().invoke(app, ["train", "--recipe", "pixel-probe"])
    assert r.exit_code == 2 and "needs --data" in r.output


def test_eval_reports_the_packaged_pixel_model_per_generator_and_category(manifest: Path, tmp_path: Path) -> None:
    # No --model: eval measures what `deepwatch detect` runs by default, the packaged pixel probe included.
    r = CliRunner().invoke(app, ["eval", str(manifest), "--no-cheap", "--format", "json", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["models"]["model:pixel-probe-lite2"]["arch"] == "efficientnet-lite2+mlp-probe"  # the shipped head is an MLP
    for variant in ("original", "reposted"):
        v = rep["variants"][variant]
        m = v["detectors"]["model:pixel-probe-lite2"]
        assert {"auc", "average_precision", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr"} <= set(m)
        assert m["threshold"] == pytest.approx(rep["models"]["model:pixel-probe-lite2"]["threshold"])
        assert set(v["per_generator"]) == {"gen-0 (demo)", "gen-1 (demo)", "gen-2 (demo)"}
        assert set(v["per_category"]) == {"portrait", "landscape"}
        portraits = v["per_category"]["portrait"]["model:pixel-probe-lite2"]
        assert portraits["n_neg"] == 6 and 0.0 <= portraits["real_above_0.5"] <= 1.0


def test_eval_without_models_measures_the_cheap_detectors_alone(manifest: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["eval", str(manifest), "--no-models", "--variant", "original", "--format", "json",
                                 "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["models"] == {} and "generator-metadata" in rep["variants"]["original"]["detectors"]
    assert not any(name.startswith("model:") for name in rep["variants"]["original"]["detectors"])


def test_a_named_head_that_cannot_load_is_an_error(tmp_path: Path, monkeypatch) -> None:
    # it was a warning, and detect went on with metadata only (exit 0) as if the head had spoken
    img = tmp_path / "a.jpg"
    picture(7).save(img, quality=90)
    monkeypatch.setenv("DEEPWATCH_DETECT__PIXEL_HEAD", str(tmp_path / "missing.safetensors"))
    r = CliRunner().invoke(app, ["detect", "--format", "json", "--data-dir", str(tmp_path / "d"), str(img)])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: detect.pixel_head") and "deepwatch train --recipe pixel-probe" in r.stderr


def test_the_packaged_head_that_cannot_load_warns_and_metadata_still_runs(tmp_path: Path, monkeypatch) -> None:
    from detectors.models.pixel_detector import BUILTIN

    img = tmp_path / "a.jpg"
    picture(7).save(img, quality=90)
    monkeypatch.setitem(BUILTIN, "pixel-probe-lite2", tmp_path / "missing.safetensors")  # a broken install
    r = CliRunner().invoke(app, ["detect", "--format", "json", "--data-dir", str(tmp_path / "d"), str(img)])
    assert r.exit_code == 0
    assert "not loaded" in r.stderr and "deepwatch train --recipe pixel-probe" in r.stderr
    assert json.loads(r.stdout)[0]["evidence"] == []


def test_leave_generator_out_eval_trains_on_extra_copies_and_refuses_unknown_ones(manifest: Path, cache: Path, tmp_path: Path) -> None:
    args = ["eval", str(manifest), "--leave-generator-out", "--format", "json", "--crops", "1",
            "--cache-dir", str(cache), "--data-dir", str(tmp_path / "d")]
    r = CliRunner().invoke(app, [*args, "--train-variant", "jpeg0"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["train_variants"] == ["reposted", "jpeg0"] and rep["seed"] == 0
    assert rep["variants"]["reposted"]["overall"]["n"] == 24  # held-out folds are still scored re-posted only
    assert len(list(cache.rglob("*-jpeg0-canonical.npz"))) == 24  # the extra copies went through the feature cache

    r = CliRunner().invoke(app, [*args, "--train-variant", "sepia"])
    assert r.exit_code == 2 and "not one of published, aug<k>, jpeg<k>" in r.output and "Traceback" not in r.output
