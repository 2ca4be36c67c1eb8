"""onnxruntime's Linux wheel (1.31) carries Microsoft's 1DS telemetry, on unless
the process opts out before it imports onnxruntime: its first session writes a
persistent device id and an event cache under $XDG_CACHE_HOME/Microsoft and
uploads usage events. deepwatch's model runs must do neither (detectors/models
sets the opt-out). Checked on a real `deepwatch detect` run of the packaged pixel
model, with a cache folder of the test's own and no CI variable (onnxruntime keeps quiet on CI
runners by itself, which would hide the difference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import picture

ROOT = Path(__file__).resolve().parents[1]
# The variables onnxruntime 1.31 reads as "running on CI" (and then sends nothing), and its opt-out.
QUIETING = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
            "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "ORT_RUNNING_UNIT_TESTS", "ORT_DISABLE_TELEMETRY")
# A session on a one-node graph through onnxruntime alone: what any process gets without the opt-out.
BARE_SESSION = """
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy"]
model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", io[:1], io[1:]),
                          opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones(1, np.float32)})
"""


def _env(home: Path) -> dict[str, str]:
    """HOME and XDG_CACHE_HOME of the test's own (onnxruntime writes under the latter), the
    latter's ``deepwatch`` folder the real one: a fresh model cache would rebuild the int8 graph."""
    base = {k: v for k, v in os.environ.items() if k not in QUIETING and not k.upper().startswith("DEEPWATCH_")}
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepwatch"
    real.mkdir(parents=True, exist_ok=True)
    (home / ".cache").mkdir(parents=True)
    (home / ".cache" / "deepwatch").symlink_to(real, target_is_directory=True)
    return {**base, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "PYTHONPATH": str(ROOT)}


def _telemetry(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in (home / ".cache" / "Microsoft").rglob("*"))


@pytest.mark.timeout(300)
def test_a_detect_run_of_the_pixel_model_leaves_no_device_id_and_sends_nothing(tmp_path):
    bare_home, home = tmp_path / "bare", tmp_path / "home"
    bare_home.mkdir()
    home.mkdir()
    r = subprocess.run([sys.executable, "-c", BARE_SESSION], env=_env(bare_home), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if not any(p.endswith("deviceid") for p in _telemetry(bare_home)):
        pytest.skip("this onnxruntime writes no telemetry state without the opt-out: nothing here to keep off")

    image = tmp_path / "p.jpg"
    picture(3).save(image, quality=90)
    r = subprocess.run([sys.executable, "-m", "streams.cli", "detect", str(image), "--format", "json",
                        "--data-dir", str(tmp_path / "data")],
                       env=_env(home), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    [result] = json.loads(r.stdout)
    assert any(e["kind"] == "model" for e in result["evidence"]), result  # onnxruntime really ran
    assert _telemetry(home) == [], "onnxruntime wrote its telemetry state"
