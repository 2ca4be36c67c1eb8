"""`deepwatch train`, `eval` and `models fetch|list`: user mistakes are one
``error:`` line naming the option and the fix, exit 2, before any progress
bar starts (CLI audit); the shared -d/--data-dir and -c/--config options."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from streams.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}, cwd=cwd)


def _only_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """stderr is exactly one ``error:`` line: no traceback, no progress bar left drawn after it."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: "), repr(r.stderr[-2000:])
    return r.stderr.strip()


@pytest.fixture
def sets(tmp_path: Path) -> Path:
    """real/ and ai/ with one tiny picture each, and an empty folder."""
    for sub, colour in (("real", (10, 120, 30)), ("ai", (200, 30, 30))):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (32, 32), colour).save(tmp_path / sub / "a.png")
    (tmp_path / "empty").mkdir()
    return tmp_path


# -- defect 1: train checks its values before any progress bar -------------------------
@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_train_lr_not_above_zero_is_one_line_naming_it(sets: Path, lr: str) -> None:
    # was PyTorch's "Invalid learning rate: -1.0" and a "training 0/None" line, exit 1 (0 and inf trained)
    line = _only_line(_cli("train", "--real", str(sets / "real"), "--fake", str(sets / "ai"), "--arch", "small-cnn",
                           "--lr", lr, "-d", str(sets / "d")))
    assert "'--lr'" in line and "above 0" in line and "give e.g. 0.001" in line, line


@pytest.mark.parametrize("empty_class, full_class", [("--fake", "--real"), ("--real", "--fake")])
def test_train_class_without_images_is_refused_before_training(sets: Path, empty_class: str, full_class: str) -> None:
    full = sets / ("real" if full_class == "--real" else "ai")
    line = _only_line(_cli("train", full_class, str(full), empty_class, str(sets / "empty"), "--arch", "small-cnn",
                           "-d", str(sets / "d")))
    label = "AI" if empty_class == "--fake" else "real"
    assert f"no {label} images ({empty_class} {sets / 'empty'} holds no images)" in line, line
    assert f"give {empty_class} a folder of {label} images" in line, line
    assert not (sets / "d").exists()


def test_train_manifest_without_ai_rows_names_the_manifest(sets: Path) -> None:
    m = sets / "manifest.csv"
    m.write_text("file,label,generator\nreal/a.png,0,\nai/a.png,1,sd\n")
    r = CliRunner().invoke(app, ["train", "--manifest", str(m), "--generators", "^dalle$", "--arch", "small-cnn",
                                 "--data-dir", str(sets / "d")])
    assert r.exit_code == 2, r.output
    assert f"--manifest {m} has no AI rows matching --generators '^dalle$'" in r.output, r.output


def test_train_error_while_training_leaves_no_progress_line(sets: Path) -> None:
    # --init-from fails inside train_model, after the bar started: the bar was drawn below the error
    line = _only_line(_cli("train", "--real", str(sets / "real"), "--fake", str(sets / "ai"), "--arch", "small-cnn",
                           "--init-from", "nosuch", "--model-dir", str(sets / "m")), code=1)
    assert "'nosuch' not found" in line, line


def test_train_real_that_is_a_file_says_so(sets: Path) -> None:
    f = sets / "real" / "a.png"
    line = _only_line(_cli("train", "--real", str(f), "--fake", str(sets / "ai")))
    assert line == f"error: --real {f} is a file, not a folder: give the folder holding the images, e.g. --real {f.parent}"


# -- defect 2: eval with no detector ---------------------------------------------------
def test_eval_with_no_detector_is_refused(sets: Path) -> None:
    # ran with no detector and printed a lone "fused" row, AUC 0.500, exit 0
    line = _only_line(_cli("eval", str(sets), "--no-models", "--no-cheap", "-d", str(sets / "d")))
    assert "nothing to evaluate" in line and "drop --no-models or --no-cheap" in line and "--model" in line, line


# -- defect 3: messages that name the wrong thing --------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--format", "xml"], "error: --format is json or table, not 'xml'"),
    (["--group-by", "vendor"], "error: --group-by is generator or family, not 'vendor'"),
])
def test_eval_names_the_option_that_is_wrong(sets: Path, args: list[str], says: str) -> None:
    assert _only_line(_cli("eval", str(sets), *args, "-d", str(sets / "d"))) == says


def test_eval_unknown_model_exits_2_like_detect(sets: Path) -> None:
    line = _only_line(_cli("eval", str(sets), "--model", "nosuch", "--no-models", "--no-cheap", "-d", str(sets / "d")))
    assert line.startswith("error: --model nosuch: model 'nosuch' not found"), line


def test_fetch_url_that_is_a_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    r = CliRunner().invoke(app, ["models", "fetch", "x", "--url", str(tmp_path / "w"), "--model-dir", str(tmp_path / "m")])
    assert r.exit_code == 2, r.output
    assert f"error: {tmp_path / 'w'} is a directory: give --url the weights file (.safetensors) itself" in r.output
    assert "no such file" not in r.output and not list((tmp_path / "m").iterdir())


@pytest.mark.parametrize("as_uri", [False, True])
def test_fetch_local_file_that_is_not_safetensors_names_it(tmp_path: Path, as_uri: bool) -> None:
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"#!/bin/sh\necho not weights at all\n")
    # was "downloaded file is not valid safetensors", though nothing was downloaded; --sha256 (right) keeps
    # the no-hash warning off stderr
    r = _cli("models", "fetch", "x", "--url", f.as_uri() if as_uri else str(f), "--arch", "small-cnn",
             "--sha256", hashlib.sha256(f.read_bytes()).hexdigest(), "--model-dir", str(tmp_path / "m"))
    line = _only_line(r)
    assert line.startswith(f"error: {f} is not a safetensors file ("), line
    assert "downloaded" not in line and "give --url the .safetensors weights" in line, line
    assert not list((tmp_path / "m").iterdir())


# -- defect 4: the shared -d/--data-dir and -c/--config ----------------------------------
@pytest.mark.parametrize("command", [["train"], ["eval"], ["models", "fetch"], ["models", "list"]])
def test_data_dir_and_config_options_match_the_other_commands(command: list[str]) -> None:
    import typer

    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    opts = {p.name: p for p in cmd.params if p.param_type_name == "option"}
    assert opts["data_dir"].opts == ["--data-dir", "-d"] and "DEEPWATCH_DATA_DIR" in opts["data_dir"].help
    assert opts["config"].opts == ["--config", "-c"] and "DEEPWATCH_CONFIG" in opts["config"].help


def test_models_list_takes_the_short_forms(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["models", "list", "-d", str(tmp_path / "d1")])
    assert r.exit_code == 0 and f"no models in {tmp_path / 'd1' / 'models'}" in r.output, r.output
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "d2"}"\n')
    r = CliRunner().invoke(app, ["models", "list", "-c", str(cfg)])
    assert r.exit_code == 0 and f"no models in {tmp_path / 'd2' / 'models'}" in r.output, r.output


def test_train_and_eval_take_the_short_data_dir(sets: Path) -> None:
    # -d reaches the settings: a data dir that is a file is refused naming --data-dir
    afile = sets / "afile"
    afile.write_text("")
    r = CliRunner().invoke(app, ["eval", str(sets), "--no-models", "-d", str(afile)])
    assert r.exit_code == 2 and "is a file, not a directory" in _unboxed(r.output), r.output
    r = CliRunner().invoke(app, ["train", "--real", str(sets / "real"), "--fake", str(sets / "ai"), "--arch", "small-cnn",
                                 "-d", str(afile)])
    assert r.exit_code == 2 and "is a file, not a directory" in _unboxed(r.output), r.output


def _unboxed(text: str) -> str:
    """A usage error's text without the box typer draws around it, whose
    line breaks fall wherever the temp path's length puts them."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
