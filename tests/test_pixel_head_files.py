"""Pixel head files: damaged or mismatched heads are refused at load with one ValueError naming
the file (not a safetensors traceback, not a head that fails on every picture); `deepwatch
detect`/`eval` turn that into one error line; heads `train` writes are readable by others,
listed by `models list` and loadable with `--model NAME`. Needs no ../shared data."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import streams.cli.detect  # noqa: F401
import streams.cli.models  # noqa: F401
from detectors.models.pixel_probe import CARD_KEY, PixelHead
from streams.cli.app import app
from tests.support import picture


@pytest.fixture(scope="module")
def packaged() -> PixelHead:
    return PixelHead.load()


def _variant(packaged: PixelHead, tmp_path: Path, name: str, card: dict | None = None, **arrays) -> Path:
    head = PixelHead(card=packaged.card.model_copy(update={"name": "mine", **(card or {})}),
                     **{"w": packaged.w, "b": packaged.b, "W1": packaged.W1, "b1": packaged.b1, **arrays})
    return head.save(tmp_path / f"{name}.safetensors")


def _damaged(packaged: PixelHead, tmp_path: Path) -> dict[str, Path]:
    from safetensors.numpy import save_file

    good = _variant(packaged, tmp_path, "good")
    data = good.read_bytes()
    files = {"empty": b"", "garbage": os.urandom(64), "truncated": data[: len(data) // 2]}
    out = {}
    for name, blob in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        out[name] = tmp_path / f"{name}.safetensors"
    meta = {CARD_KEY: packaged.card.model_dump_json()}
    save_file({"b": np.zeros(1, np.float32)}, str(tmp_path / "no-w.safetensors"), metadata=meta)
    out["no-w"] = tmp_path / "no-w.safetensors"
    save_file({"w": np.zeros(64, np.float32), "b": np.zeros(1, np.float32)}, str(tmp_path / "bad-json.safetensors"),
              metadata={CARD_KEY: "{not json"})
    out["bad-json"] = tmp_path / "bad-json.safetensors"
    return out


def test_a_damaged_head_file_is_a_value_error_naming_it(packaged, tmp_path) -> None:
    # safetensors' SafetensorError subclasses Exception only: it went past every caller as a traceback
    for name, path in _damaged(packaged, tmp_path).items():
        with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable pixel head")):
            PixelHead.load(path)


@pytest.mark.parametrize("change, says", [
    (dict(W1="first_1280"), "takes 1280 features, but efficientnet-lite2 taps head_mean+blocks give 6192"),
    (dict(w="short"), "does not feed w's 10 hidden units"),
    (dict(w="nan"), "non-finite values in w"),
    (dict(card={"threshold": 7.0}), "operating threshold 7.0 is not between 0 and 1"),
    (dict(card={"threshold": 0.0}), "operating threshold 0.0 is not between 0 and 1"),
    (dict(card="lite0"), "its int8 ranges are for efficientnet-lite2, not its backbone efficientnet-lite0"),
    (dict(card="resnet"), "unknown backbone 'resnet50'"),
    (dict(card="no_hidden"), "the card says mlp but the file has no hidden layer"),
])
def test_a_head_that_does_not_fit_its_card_is_refused_at_load(packaged, tmp_path, change, says) -> None:
    arrays: dict = {}
    card: dict = {}
    if change.get("W1") == "first_1280":
        arrays["W1"] = packaged.W1[:1280]
    if change.get("w") == "short":
        arrays["w"] = packaged.w[:10]
    if change.get("w") == "nan":
        arrays["w"] = np.where(np.arange(len(packaged.w)) == 3, np.nan, packaged.w)
    c = change.get("card")
    if isinstance(c, dict):
        card = c
    elif c in ("lite0", "resnet"):
        card = {"spec": packaged.card.spec.model_copy(update={"backbone": "efficientnet-lite0" if c == "lite0" else "resnet50"})}
    elif c == "no_hidden":
        arrays |= {"W1": None, "b1": None, "w": np.zeros(6192)}
    path = _variant(packaged, tmp_path, "bad", card, **arrays)
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        PixelHead.load(path)
    assert str(e.value).startswith(f"{path}: pixel head 'mine' does not fit its card")


def test_a_saved_head_is_readable_by_others(packaged, tmp_path) -> None:
    # safetensors writes owner-only (0600); the detect worker may run as another user
    path = _variant(packaged, tmp_path, "mine")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_head_that_cannot_be_written_is_a_value_error(packaged, tmp_path) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="cannot write the pixel head to"):
        _variant(packaged, tmp_path, "dir")


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "a.jpg"
    picture(7, (600, 500)).save(img, quality=90)
    return img


@pytest.mark.parametrize("bad", ["empty", "garbage", "truncated", "no-w", "mismatch", "missing"])
def test_detect_with_a_bad_configured_head_is_one_error_line(packaged, tmp_path, monkeypatch, bad) -> None:
    # an explicitly configured head that does not load used to be a warning (a damaged one: a
    # traceback), and detect went on with metadata only, exit 0
    heads = _damaged(packaged, tmp_path)
    heads["mismatch"] = _variant(packaged, tmp_path, "mismatch", W1=packaged.W1[:1280])
    heads["missing"] = tmp_path / "missing.safetensors"
    monkeypatch.setenv("DEEPWATCH_DETECT__PIXEL_HEAD", str(heads[bad]))
    r = CliRunner().invoke(app, ["detect", "--format", "json", "--data-dir", str(tmp_path / "d"), str(_image(tmp_path))])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: detect.pixel_head") and str(heads[bad]) in lines[0]
    assert r.stdout == ""


def test_eval_with_a_bad_configured_head_is_one_error_line(packaged, tmp_path, monkeypatch) -> None:
    # eval used to report the cheap detectors alone, exit 0, as if that was what detect runs
    root = tmp_path / "set"
    (root / "real").mkdir(parents=True)
    (root / "ai").mkdir()
    picture(1, (300, 300)).save(root / "real" / "r.jpg", quality=90)
    picture(2, (300, 300)).save(root / "ai" / "a.png")
    monkeypatch.setenv("DEEPWATCH_DETECT__PIXEL_HEAD", str(_damaged(packaged, tmp_path)["garbage"]))
    r = CliRunner().invoke(app, ["eval", str(root), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and "error: detect.pixel_head" in r.stderr and "Traceback" not in r.output


def test_detect_with_a_damaged_head_named_by_model_is_one_error_line(packaged, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.safetensors").write_bytes(b"")
    (models / "broken.json").write_text("{}")  # a checkpoint's card that is not one
    r = CliRunner().invoke(app, ["detect", "--no-models", "--model", "broken", "--model-dir", str(models),
                                 "--data-dir", str(tmp_path / "d"), str(_image(tmp_path))])
    assert r.exit_code == 2 and r.stderr.startswith("error: --model broken")


def test_a_trained_head_in_the_model_dir_is_listed_and_loads_by_name(packaged, tmp_path) -> None:
    models = tmp_path / "models"
    _variant(packaged, models, "newsroom-probe", {"name": "newsroom-probe"})
    (models / "stray.safetensors").write_bytes(b"not a head")
    r = CliRunner().invoke(app, ["models", "list", "--json", "--model-dir", str(models), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"newsroom-probe", "pixel-probe-lite2"}
    assert rows["newsroom-probe"]["kind"] == "pixel-head" and rows["newsroom-probe"]["arch"] == "efficientnet-lite2+mlp-probe"
    assert rows["pixel-probe-lite2"]["packaged"] is True and rows["newsroom-probe"]["packaged"] is False
    r = CliRunner().invoke(app, ["models", "list", "--model-dir", str(models), "--data-dir", str(tmp_path / "d")],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "newsroom-probe" in r.stdout and "(packaged)" in r.stdout

    r = CliRunner().invoke(app, ["detect", "--no-models", "--model", "newsroom-probe", "--model-dir", str(models),
                                 "--data-dir", str(tmp_path / "d"), str(_image(tmp_path))])
    assert r.exit_code == 0, r.output
    (ev,) = [e for e in json.loads(r.stdout)[0]["evidence"] if e["kind"] == "model"]
    # the head's own name in the wording: a user head does not read like the shipped one
    assert ev["detector"] == "model:newsroom-probe" and "pixel probe newsroom-probe v" in ev["detail"]
    assert ev["data"]["arch"] == "efficientnet-lite2+mlp-probe"


def test_eval_on_a_head_s_training_pictures_warns(tmp_path, monkeypatch) -> None:
    from detectors.models.pixel_detector import PixelProbeDetector

    root = tmp_path / "set"
    (root / "real").mkdir(parents=True)
    (root / "ai").mkdir()
    picture(1, (300, 300)).save(root / "real" / "r.jpg", quality=90)
    picture(2, (300, 300)).save(root / "ai" / "a.png")
    import hashlib

    digest = hashlib.sha256((root / "real" / "r.jpg").read_bytes()).hexdigest()
    monkeypatch.setattr(PixelProbeDetector, "trained_files", property(lambda self: frozenset({digest})))
    r = CliRunner().invoke(app, ["eval", str(root), "--no-cheap", "--variant", "original", "--format", "json",
                                 "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trained_overlap"] == 1
    assert "1 of 2 file(s) are training pictures" in r.stderr and "--exclude-trained" in r.stderr


def test_train_head_out_that_is_a_directory_is_refused_before_training(tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label,generator\n")
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(app, ["train", "--recipe", "pixel-probe", "--data", str(manifest), "--head-out",
                                 str(tmp_path / "out"), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and "is a directory" in r.stderr and "backbone features" not in r.output


def test_train_help_describes_both_recipes_and_the_head_file() -> None:
    r = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert "--recipe pixel-probe" in r.stdout and "<out>.md" in r.stdout and "--recipe cnn" in r.stdout


def test_a_16_bit_greyscale_picture_is_reposted_grey_not_white(tmp_path) -> None:
    from detectors.models.dataset import repost_bytes
    from detectors.models.pixel_data import _open_rgb

    grey = Image.fromarray(np.full((64, 64), 32768, np.uint16))  # half grey, 16 bits (mode I;16)
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert abs(np.asarray(Image.open(io.BytesIO(repost_bytes(buf.getvalue())))).mean() - 127.5) < 3
    assert abs(np.asarray(_open_rgb(buf.getvalue())).mean() - 127.5) < 3
