"""`deepwatch detect` end to end through Typer's runner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import streams.cli.detect  # noqa: F401  (registers the command)
from streams.cli.app import app

SD = Path("fixtures/sd-parsers/tests/resources")


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _run_json(runner: CliRunner, *args: str) -> tuple[int, list[dict]]:
    result = runner.invoke(app, ["detect", "--format", "json", *args])
    return result.exit_code, json.loads(result.stdout)


def test_json_output_for_a_directory_and_a_file(runner: CliRunner, shared_data: Path) -> None:
    code, results = _run_json(
        runner,
        str(shared_data / SD / "bad_images"),
        str(shared_data / "fixtures/c2pa-python/tests/fixtures/C_with_CAWG_data.jpg"),
    )
    assert code == 0
    by_name = {Path(r["path"]).name: r for r in results}
    assert set(by_name) == {"empty_file.png", "empty_image.png", "empty_image.jpg", "text_after_idat.png",
                            "C_with_CAWG_data.jpg"}
    assert by_name["empty_file.png"]["error"]["reason"] == "empty" and by_name["empty_file.png"]["score"] is None
    ai = by_name["text_after_idat.png"]
    assert ai["verdict"] == "likely-ai" and ai["score"] > 0.99 and ai["format"] == "PNG"
    assert ai["evidence"][0]["detector"] == "generator-metadata" and "AUTOMATIC1111" in ai["evidence"][0]["detail"]
    assert len(ai["sha256"]) == 64 and ai["width"] == 1 and ai["height"] == 1 and ai["error"] is None
    capture = by_name["C_with_CAWG_data.jpg"]
    assert capture["verdict"] == "no-evidence" and capture["score"] < 0.1
    assert {"detector", "score", "detail"} <= set(capture["evidence"][0])


def test_exit_code_1_only_when_every_file_failed(runner: CliRunner, shared_data: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    code, results = _run_json(runner, str(junk), str(shared_data / SD / "bad_images/empty_file.png"))
    assert code == 1 and all(r["error"] for r in results)
    assert results[0]["error"]["reason"] == "undecodable"


def test_table_format(runner: CliRunner, shared_data: Path) -> None:
    result = runner.invoke(app, ["detect", "--format", "table", str(shared_data / SD / "parsers/ComfyUI")])
    assert result.exit_code == 0
    assert "likely-ai" in result.stdout and "[generator-metadata]" in result.stdout


def test_no_inputs_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    assert runner.invoke(app, ["detect", str(tmp_path)]).exit_code == 2


def test_model_option_fails_clearly_without_model_support(
    runner: CliRunner, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "detectors.models", None)  # simulate a build without it
    result = runner.invoke(app, ["detect", "--model", "clip", str(shared_data / SD / "bad_images/empty_image.png")])
    assert result.exit_code == 2
    assert "model support is not available" in result.output


def test_every_option_has_help(runner: CliRunner) -> None:
    out = runner.invoke(app, ["detect", "--help"]).stdout
    for option in ("--format", "--model", "--model-dir", "--device"):
        assert option in out
    assert "recursively" in out and "repeatable" in out


def test_a_path_that_does_not_exist_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    # a typo or a shell glob that matched nothing: one error line naming it, not a JSON "result"
    picture = tmp_path / "a.png"
    picture.write_bytes(b"not an image")
    result = runner.invoke(app, ["detect", "--no-models", str(picture), str(tmp_path / "missing*.jpg")])
    assert result.exit_code == 2 and "[" not in result.stdout
    assert "error: no such file or directory:" in result.output and "missing*.jpg" in result.output


def test_no_image_files_says_error_and_what_was_looked_for(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    result = runner.invoke(app, ["detect", "--no-models", str(tmp_path)])
    assert result.exit_code == 2 and "error: no image files in" in result.output and ".jpg" in result.output


def test_unknown_device_is_a_usage_error_not_a_silent_cpu_run(runner: CliRunner, tmp_path: Path) -> None:
    picture = tmp_path / "a.png"
    picture.write_bytes(b"not an image")
    result = runner.invoke(app, ["detect", "--no-models", "--device", "cdua", str(picture)])
    assert result.exit_code == 2 and "--device 'cdua' is not one of" in result.output


def test_an_oversized_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    # `detect` (and bank add, similar) read through ImageData.from_path: a
    # multi-gigabyte file or /dev/zero must not be read into memory first.
    import tracemalloc

    from detectors.imagedata import DecodeLimits, ImageData, ImageRejected

    big = tmp_path / "big.jpg"
    with big.open("wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(ImageRejected) as e:
            ImageData.from_path(big, limits=DecodeLimits(max_bytes=4096))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == "too_large" and peak < 1024 * 1024
