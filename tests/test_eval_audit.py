"""What an analyst quotes from `deepwatch eval` and `deepwatch train`: the metrics against
scikit-learn's own, the re-post really stripping metadata, every picture counted once and
every picture left out named, and leave-generator-out folds that can be trusted."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from typer.testing import CliRunner

import streams.cli.models  # noqa: F401  registers train/eval
from streams.cli.app import app
from tests.support import labelled_pair, picture


def _sk_tpr_at(y: np.ndarray, p: np.ndarray, max_fpr: float) -> float:
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def test_ranking_metrics_are_sklearns_with_ties_and_the_exact_fpr_point() -> None:
    """TPR at 1%/5% FPR is roc_curve's best point with FPR <= 1%/5% (no interpolation), ties
    included; AUC and AP are roc_auc_score and average_precision_score."""
    from detectors.models.pixel_metrics import ranking

    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(400):
        n_real, n_ai = int(rng.integers(1, 300)), int(rng.integers(1, 40))
        levels = int(rng.choice([3, 20, 10**6]))  # few levels: heavy ties, also across classes
        p = np.round(rng.random(n_real + n_ai) * levels) / levels
        p[n_real:] = np.clip(p[n_real:] + rng.random() * 0.3, 0, 1)
        y = np.r_[np.zeros(n_real, int), np.ones(n_ai, int)]
        r = ranking(y, p)
        assert r["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert r["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert r["tpr_at_1pct_fpr"] == pytest.approx(_sk_tpr_at(y, p, 0.01), abs=1e-12)
        assert r["tpr_at_5pct_fpr"] == pytest.approx(_sk_tpr_at(y, p, 0.05), abs=1e-12)
        checked += 1
    assert checked == 400
    # 99 real photos allow no false positive at 1%: an AI picture tied with the top real one is not counted
    y = np.r_[np.zeros(99, int), np.ones(2, int)]
    p = np.r_[np.linspace(0, 0.9, 99), 0.9, 0.95]
    assert ranking(y, p)["tpr_at_1pct_fpr"] == 0.5


def _jpeg_with_comment(path: Path, seed: int, comment: bytes) -> None:
    picture(seed, (320, 240)).save(path, "JPEG", quality=92, comment=comment)


def test_repost_strips_the_jpeg_comment_that_names_the_generator(tmp_path: Path) -> None:
    """The re-posted variant is "metadata stripped": a JPEG comment naming Midjourney survived
    it, so generator-metadata still flagged re-posts and the re-posted numbers read high."""
    from detectors.models.dataset import repost_bytes

    ai = tmp_path / "ai.jpg"
    _jpeg_with_comment(ai, 1, b"Made with Midjourney v6")
    picture(2, (320, 240)).save(tmp_path / "real.jpg", "JPEG", quality=92)
    src = Image.open(ai)
    assert src.info.get("comment")
    assert "comment" not in Image.open(io.BytesIO(repost_bytes(ai.read_bytes()))).info
    (tmp_path / "manifest.csv").write_text("file,label,generator\nai.jpg,1,Midjourney\nreal.jpg,0,camera\n")

    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--no-models", "--format", "json", "-d", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    gm = {v: rep["variants"][v]["detectors"]["generator-metadata"] for v in ("original", "reposted")}
    assert gm["original"]["coverage"] == 0.5 and gm["original"]["recall"] == 1.0  # the comment is seen as published
    assert gm["reposted"]["coverage"] == 0.0 and gm["reposted"]["recall"] == 0.0


def _manifest(root: Path, rows: list[tuple[str, int, str, str]], name: str = "manifest.csv") -> Path:
    with (root / name).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "generator", "source"])
        w.writerows(rows)
    return root / name


def test_eval_scores_a_picture_listed_twice_once_and_names_the_repeats(tmp_path: Path) -> None:
    for i in range(3):
        picture(10 + i, (200, 160)).save(tmp_path / f"real{i}.jpg", quality=90)
        picture(20 + i, (200, 160)).filter(ImageFilter.GaussianBlur(2)).save(tmp_path / f"ai{i}.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "ai0.png").read_bytes())
    rows = [(f"real{i}.jpg", 0, "camera", "cam") for i in range(3)] + [(f"ai{i}.png", 1, "gen", "g") for i in range(3)]
    # the same row again, another spelling of a path, the same bytes under another name
    rows += [("ai0.png", 1, "gen", "g"), ("./ai1.png", 1, "gen", "g"), ("copy.png", 1, "gen", "g")]
    m = _manifest(tmp_path, rows)
    r = CliRunner().invoke(app, ["eval", str(m), "--no-models", "--format", "json", "-d", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["n"], rep["n_pos"], rep["n_neg"]) == (6, 3, 3)
    assert sorted(Path(d["file"]).name for d in rep["duplicates"]) == ["ai0.png", "ai1.png", "copy.png"]
    for v in rep["variants"].values():
        assert v["n"] == 6 and v["fused"]["n_pos"] == 3

    table = CliRunner().invoke(app, ["eval", str(m), "--no-models", "-d", str(tmp_path / "d")])
    assert table.exit_code == 0 and "3 duplicates: the same bytes listed again (scored once)" in table.stdout, table.output

    # the same bytes as AI and as real: neither label can be scored, so both copies go, named
    _manifest(tmp_path, rows[:6] + [("copy.png", 0, "camera", "cam")])
    r = CliRunner().invoke(app, ["eval", str(m), "--no-models", "--format", "json", "-d", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["n"], rep["n_pos"], rep["n_neg"]) == (5, 2, 3)
    assert {(Path(d["file"]).name, Path(d["same_as"]).name) for d in rep["duplicates"]} == {
        ("ai0.png", "copy.png"), ("copy.png", "ai0.png")}
    assert all("every copy left out" in d["reason"] for d in rep["duplicates"])


def test_eval_names_a_file_a_model_could_not_decode(tmp_path: Path) -> None:
    """A truncated JPEG opens (Pillow reads the header) but the pixel model fails on it: it was
    scored as "no opinion" in the published variant with only a log line to say so."""
    for i in range(2):
        picture(30 + i, (300, 240)).save(tmp_path / f"real{i}.jpg", quality=90)
        picture(40 + i, (300, 240)).save(tmp_path / f"ai{i}.png")
    full = io.BytesIO()
    picture(50, (300, 240)).save(full, "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(full.getvalue()[:2500])
    _manifest(tmp_path, [("real0.jpg", 0, "camera", "c"), ("real1.jpg", 0, "camera", "c"), ("ai0.png", 1, "g", "g"),
                         ("ai1.png", 1, "g", "g"), ("cut.jpg", 0, "camera", "c")])
    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--no-cheap", "--format", "json", "-d", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    errors = [(Path(e["file"]).name, e["variant"], e["detector"]) for e in rep["detector_errors"]]
    assert ("cut.jpg", "original", "model:pixel-probe-lite2") in errors
    assert all(e["reason"] for e in rep["detector_errors"])
    # and the re-post, which must decode it, leaves it out and says so
    assert any(Path(s["file"]).name == "cut.jpg" and s["reason"].startswith("reposted:") for s in rep["skipped"])
    assert rep["variants"]["reposted"]["n"] == 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def lgo_dir(tmp_path_factory) -> Path:
    """Pictures shared by the leave-generator-out tests (features are cached by path), each
    test writing its own manifest beside them."""
    root = tmp_path_factory.mktemp("lgo")
    rng = np.random.default_rng(0)
    for g in range(3):
        for i in range(3):
            labelled_pair(root, g, i, (300, 240), rng)
    return root


def _lgo_set(root: Path, *, real_source: bool) -> list[tuple[str, int, str, str]]:
    return [row for g in range(3) for i in range(3) for row in (
        (f"real_{g}_{i}.jpg", 0, "camera", f"cam{g}/repo@1" if real_source else ""),
        (f"ai_{g}_{i}.png", 1, f"gen-{g}", f"gen{g}@1"))]


def _lgo(m: Path, cache: Path, tmp_path: Path):
    return CliRunner().invoke(app, ["eval", str(m), "--leave-generator-out", "--format", "json", "--crops", "1",
                                    "--cache-dir", str(cache), "-d", str(tmp_path / "d")])


def test_leave_generator_out_refuses_a_fold_trained_without_real_photos(tmp_path: Path, cache: Path,
                                                                        lgo_dir: Path) -> None:
    """Real photos with no source are one group: the fold holding it out trained the MLP head on
    AI pictures alone (sklearn fits one class without a word) and the report gave numbers anyway."""
    m = _manifest(lgo_dir, _lgo_set(lgo_dir, real_source=False), "no-sources.csv")
    r = _lgo(m, cache, tmp_path)
    assert r.exit_code == 1, r.output
    assert "no real pictures" in r.output and "real:" in r.output and "source" in r.output, r.output


def test_leave_generator_out_names_skipped_and_repeated_pictures(tmp_path: Path, cache: Path, lgo_dir: Path) -> None:
    rows = _lgo_set(lgo_dir, real_source=True)
    (lgo_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [("broken.jpg", 0, "camera", "cam0/repo@1"), ("missing.png", 1, "gen-0", "gen0@1"),
             ("ai_0_0.png", 1, "gen-0", "gen0@1"), ("./real_1_1.jpg", 0, "camera", "cam1/repo@1")]
    m = _manifest(lgo_dir, rows, "with-repeats.csv")
    r = _lgo(m, cache, tmp_path)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert {(Path(s["file"]).name, s["variant"]) for s in rep["skipped"]} == {
        (f, v) for f in ("broken.jpg", "missing.png") for v in ("published", "reposted")}
    assert sorted(Path(d["file"]).name for d in rep["duplicates"]) == ["ai_0_0.png", "real_1_1.jpg"]
    assert rep["folds"] == 6  # 3 generators + 3 real sources: GroupKFold ran 6 folds, not the 10 asked for
    for v in rep["variants"].values():
        assert (v["overall"]["n"], v["overall"]["n_ai"], v["overall"]["n_real"]) == (18, 9, 9)


def test_folds_hold_out_whole_groups_and_repeat_with_the_seed(cache: Path, lgo_dir: Path) -> None:
    """No generator (or real source) on both sides of a fold, real photos split across folds,
    and the same seed giving the same folds (another seed other ones)."""
    from detectors.models.pixel_backbone import Backbone, FeatureSpec
    from detectors.models.pixel_data import FeatureCache, read_manifest
    from detectors.models.pixel_features import extract
    from detectors.models.pixel_train import EVAL_VARIANTS, ProbeParams, cross_validate

    m = _manifest(lgo_dir, _lgo_set(lgo_dir, real_source=True), "plain.csv")
    samples = read_manifest(m)
    spec = FeatureSpec(crops=1)
    fc = FeatureCache(cache, spec.backbone, spec.draft_min_side)
    assert extract(samples, list(EVAL_VARIANTS), fc, Backbone(spec.backbone), spec) == []
    folds = {}
    for seed in (0, 0, 3):
        cv = cross_validate(samples, fc, spec, ProbeParams(seed=seed, folds=3))
        groups = np.array([s.group for s in samples])
        for k in set(cv.fold_of):
            assert not set(groups[cv.fold_of == k]) & set(groups[cv.fold_of != k])
        real_folds = {int(cv.fold_of[i]) for i, s in enumerate(samples) if s.label == 0}
        assert len(real_folds) > 1
        folds.setdefault(seed, []).append((cv.fold_of.tolist(), {v: cv.oof[v].tolist() for v in cv.oof}))
    assert folds[0][0] == folds[0][1]
    assert folds[3][0][0] != folds[0][0][0]


def test_train_counts_a_picture_listed_twice_once(tmp_path: Path, cache: Path, lgo_dir: Path) -> None:
    """`deepwatch train`: a repeated row was one more training row and one more calibration row."""
    rows = _lgo_set(lgo_dir, real_source=True)
    rows += [("ai_2_2.png", 1, "gen-2", "gen2@1"), ("real_0_0.jpg", 0, "camera", "cam0/repo@1")]
    m = _manifest(lgo_dir, rows, "train-repeats.csv")
    head = tmp_path / "h.safetensors"
    r = CliRunner().invoke(app, ["train", "--recipe", "pixel-probe", "--data", str(m), "--crops", "1", "--hidden", "0",
                                 "--head-out", str(head), "--cache-dir", str(cache), "-d", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    from detectors.models.pixel_probe import PixelHead

    card = PixelHead.load(head).card
    assert card.calibration.n == 18 and (card.trained_on["n_ai"], card.trained_on["n_real"]) == (9, 9)
    assert len(card.trained_on["duplicates"]) == 2 and card.trained_on["n_skipped"] == 0
    assert card.metrics["reposted"]["overall"]["n"] == 18
    assert card.metrics["protocol"].startswith("6-fold GroupKFold")


def test_training_rows_hold_each_picture_once_and_no_picture_under_both_labels(lgo_dir: Path) -> None:
    from detectors.models.pixel_data import read_manifest
    from detectors.models.pixel_train import unique_samples

    (lgo_dir / "twin.png").write_bytes((lgo_dir / "ai_1_1.png").read_bytes())
    rows = _lgo_set(lgo_dir, real_source=True) + [("twin.png", 0, "camera", "cam1/repo@1"),
                                                   ("./ai_0_0.png", 1, "gen-0", "gen0@1")]
    samples, left = unique_samples(read_manifest(_manifest(lgo_dir, rows, "twins.csv")))
    names = [s.path.name for s in samples]
    assert len(names) == len(set(names)) == 17 and "ai_1_1.png" not in names and "twin.png" not in names
    assert sorted((Path(d["file"]).name, d["reason"].split(":")[0]) for d in left) == [
        ("ai_0_0.png", "listed again"), ("ai_1_1.png", "labelled 1 here and 0 there"),
        ("twin.png", "labelled 0 here and 1 there")]
