"""The int8 build's temporary space: the detect role builds its int8 backbone in temporary files
(``tempfile.gettempdir()``), which in the compose and Kubernetes deployments is a small tmpfs.
A directory too small for the build ended the role on onnx's "Wire format was corrupt" (a graph
onnxruntime's optimizer wrote cut short, read back) or "No space left on device"; now it ends on
one message naming the directory, the space free and needed, and the fix, said before the build
starts, and also when the space runs out during it. A failure that space does not explain stays
what it was.

The runs on a real tmpfs need a private mount namespace (``unshare -m``, root) and are skipped
elsewhere; the unit tests fake the free space the check reads.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="the int8 path needs onnxruntime")

from detectors.models import pixel_backbone as pb  # noqa: E402
from detectors.models import pixel_int8  # noqa: E402
from detectors.models.pixel_int8 import build_int8  # noqa: E402
from detectors.models.temp_space import MiB, TempSpaceError, temp_space_needed  # noqa: E402
from tests.test_deploy_walk import _can_unshare  # noqa: E402

DEEPWATCH = Path(sys.executable).with_name("deepwatch")
needs_unshare = pytest.mark.skipif(not _can_unshare(),
                                   reason="needs root allowed to unshare (a tmpfs mounted in a private mount namespace)")


@pytest.fixture(scope="module")
def fp32() -> bytes:
    graph = pb._fp32_graph(pb.DEFAULT_BACKBONE, lambda: pb._taps_module(pb.DEFAULT_BACKBONE))
    if graph is None:
        pytest.skip("the backbone's ONNX export is not available here")
    return graph


@pytest.fixture(scope="module")
def shipped():
    ranges = pb.packaged_int8(pb.DEFAULT_BACKBONE)
    assert ranges is not None, "the packaged head is an int8 head"
    return ranges


@pytest.fixture
def fp32_only_cache(tmp_path, monkeypatch, fp32) -> Path:
    """An XDG cache holding the fp32 export and no int8 graph: a start then builds the int8 one."""
    monkeypatch.setenv(pb.CACHE_ENV, str(tmp_path / "xdg"))
    path = pb.onnx_cache_path(pb.DEFAULT_BACKBONE)
    path.parent.mkdir(parents=True)
    path.write_bytes(fp32)
    return tmp_path / "xdg"


def _fix_words(message: str, where: str) -> None:
    assert where in message and "TMPDIR" in message and "raise the size" in message, message


# -- the check before the build, its free space faked ----------------------------------------------


def test_a_start_short_of_temporary_space_fails_its_load_saying_so(fp32_only_cache, fp32, shipped, monkeypatch):
    """The detect role's load (Backbone, as PixelProbeDetector makes it) with a temporary
    directory 1 byte short of the need: it fails with the space words, before anything is written
    (no fp32 fallback, which the head was not trained on), and caches no int8 graph."""
    need = temp_space_needed(len(fp32))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    monkeypatch.setattr(pixel_int8, "_preprocess", lambda *a: pytest.fail("the build started"))
    with pytest.raises(TempSpaceError) as e:
        pb.Backbone(int8=shipped)
    message = str(e.value)
    assert f"{need / MiB:.1f} MiB of temporary space" in message and f"{(need - 1) / MiB:.1f} MiB free" in message
    _fix_words(message, tempfile.gettempdir())
    assert sorted(p.name for p in (fp32_only_cache / "deepwatch" / "onnx").iterdir()) == \
        [pb.onnx_cache_path(pb.DEFAULT_BACKBONE).name]


def test_a_failure_with_room_to_spare_stays_what_it_was(fp32, shipped):
    """A graph cut short on its way in (not by a full disk): onnx's parse error, as before, and
    not a space message, since the temporary directory has room for the build."""
    import google.protobuf.message

    assert shutil.disk_usage(tempfile.gettempdir()).free > temp_space_needed(len(fp32)), "this machine's /tmp is full"
    with pytest.raises(google.protobuf.message.DecodeError):
        build_int8(fp32[: len(fp32) // 2], shipped)


# -- on a real tmpfs -----------------------------------------------------------------------------

_BUILD = """
import json, logging, os, sys, threading, time
logging.basicConfig(level=logging.WARNING, format="LOG %(name)s: %(message)s")
from detectors.models import pixel_backbone as pb
from detectors.models import pixel_int8 as m
if os.environ.get("NO_CHECK"):  # as when the space goes during the build, after the check found enough
    m.check_temp_space = lambda n: None
fp32 = open(sys.argv[1], "rb").read()
def used():
    s = os.statvfs(os.environ["TMPDIR"])
    return (s.f_blocks - s.f_bfree) * s.f_frsize
peak, done = [used()], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], used())
        time.sleep(0.0002)
threading.Thread(target=watch, daemon=True).start()
try:
    graph = m.build_int8(fp32, pb.packaged_int8(pb.DEFAULT_BACKBONE))
    out = {"ok": True, "sha": __import__("hashlib").sha256(graph).hexdigest()}
except Exception as e:
    out = {"ok": False, "type": type(e).__name__, "message": str(e),
           "cause": type(e.__cause__).__name__ if e.__cause__ else None, "errno": getattr(e.__cause__, "errno", None)}
done.set()
out["peak"] = peak[0]
print(json.dumps(out))
"""


def _in_tmpfs(mnt: Path, size_bytes: int, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``argv`` in a private mount namespace whose ``mnt`` is a tmpfs of ``size_bytes`` and TMPDIR."""
    mnt.mkdir()
    script = (f"set -e; mount --make-rprivate /; mount -t tmpfs -o size={size_bytes} tmpfs {shlex.quote(str(mnt))}; "
              'exec "$@"')
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env, "TMPDIR": str(mnt)}, cwd=Path(__file__).parents[1])


def _build_in_tmpfs(tmp_path: Path, fp32: bytes, size_bytes: int, check: bool = True) -> tuple[dict, str]:
    graph = tmp_path / "fp32.onnx"
    graph.write_bytes(fp32)
    r = _in_tmpfs(tmp_path / "tmpfs", size_bytes, [sys.executable, "-c", _BUILD, str(graph)],
                  {} if check else {"NO_CHECK": "1"}, timeout=180)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@needs_unshare
@pytest.mark.parametrize("mib, underneath", [(24, ("OSError", 28)), (48, ("DecodeError", None))],
                         ids=["no-space-left", "wire-format-corrupt"])
def test_a_build_that_runs_out_of_a_small_tmpfs_says_so(tmp_path, fp32, mib, underneath):
    """The check before the build off, as when the space goes during it: the build really runs
    out (at 24 MiB a write fails with ENOSPC; at 48 MiB onnxruntime's optimizer writes its graph
    short without a word and onnx reads it back as "Wire format was corrupt"), and ends on the
    space message all the same, that failure as its cause; quant_pre_process's "Optimization
    Failed ... --skip_optimization" report of it is not logged."""
    out, stderr = _build_in_tmpfs(tmp_path, fp32, mib * MiB, check=False)
    assert not out["ok"] and out["type"] == "TempSpaceError", out
    assert (out["cause"], out["errno"]) == underneath, out
    message = out["message"]
    assert "ran out of temporary space" in message and f"{mib:.1f} MiB free" in message, message
    assert f"{temp_space_needed(len(fp32)) / MiB:.1f} MiB needed" in message, message
    _fix_words(message, str(tmp_path / "tmpfs"))
    assert "Optimization Failed" not in stderr and "Traceback" not in stderr, stderr[-3000:]


@needs_unshare
def test_a_tmpfs_as_large_as_the_need_builds_and_the_need_covers_the_peak(tmp_path, fp32, shipped):
    """The need is a measure, not a guess: on a tmpfs of that size (and 1 MiB: importing
    onnxruntime leaves a small file, .ses, in TMPDIR) the check passes, the graph built is the one
    built on a roomy /tmp, and the build's peak use stayed below the need."""
    need = temp_space_needed(len(fp32))
    out, stderr = _build_in_tmpfs(tmp_path, fp32, -(-(need + MiB) // 4096) * 4096)
    assert out["ok"], (out, stderr[-3000:])
    import hashlib

    assert out["sha"] == hashlib.sha256(build_int8(fp32, shipped)).hexdigest()
    assert 2 * len(fp32) < out["peak"] < need, (out["peak"] / MiB, need / MiB)


@needs_unshare
@pytest.mark.skipif(not DEEPWATCH.exists(), reason="the deepwatch console script is not installed")
def test_the_detect_role_on_a_small_tmpfs_ends_on_one_line_naming_the_fix(tmp_path, fp32_only_cache, fp32):
    """``deepwatch worker --role detect`` (its models load at start; the int8 graph is not cached)
    with /tmp a 48 MiB tmpfs: it exits 2 on one ``error:`` line naming the directory, the space
    free and needed and the fix, not on "Wire format was corrupt"."""
    from streams.broker import EmbeddedBroker

    with EmbeddedBroker(tmp_path / "broker") as b:
        r = _in_tmpfs(tmp_path / "tmpfs", 48 * MiB,
                      [str(DEEPWATCH), "worker", "--role", "detect", "--broker", b.url, "--no-create-topics",
                       "--data-dir", str(tmp_path / "data")],
                      {pb.CACHE_ENV: str(fp32_only_cache)}, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    need = temp_space_needed(len(fp32))
    assert "cannot load detect.models" in errors[0] and f"{need / MiB:.1f} MiB of temporary space" in errors[0] \
        and "48.0 MiB free" in errors[0], errors[0]
    _fix_words(errors[0], str(tmp_path / "tmpfs"))
    assert "Wire format" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_two_builds_at_once_leave_the_optimizer_logger_as_it_was():
    # Each step cuts the optimizer's logger off while it runs and puts back what it found; a second
    # step entering meanwhile found the first's cut, put that back last, and the logger's records
    # stopped reaching the process's log for good. One step holds it at a time now.
    import logging
    import threading

    from detectors.models import temp_space

    logger = logging.getLogger(temp_space._PREPROCESS_LOGGERS[0])
    assert logger.propagate
    first = temp_space.space_said(1)
    first.__enter__()
    second_done = threading.Event()

    def second() -> None:
        with temp_space.space_said(1):
            pass
        second_done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not second_done.wait(0.3), "a second step ran while the first held the logger"
    first.__exit__(None, None, None)
    t.join(10)
    assert second_done.is_set() and logger.propagate and not logger.handlers
