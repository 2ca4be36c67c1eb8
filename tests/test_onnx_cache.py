"""The pixel backbone's ONNX export is cached on disk: a detect worker's
second start skips the export (and the torch module) yet computes the same
taps; a damaged cache file is exported again; concurrent writers never
leave a partial file; anything the graph depends on changes the key."""

from __future__ import annotations

import importlib.metadata
import logging
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime")

from detectors.atomic_file import write_atomically  # noqa: E402
from detectors.models import pixel_backbone as pb  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(pb.CACHE_ENV, str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "deepwatch"


def test_second_load_comes_from_the_cache_with_the_same_taps(cache_dir, monkeypatch, caplog):
    cold = pb.Backbone(int8=None)
    assert cold.runtime == "onnxruntime"
    files = sorted((cache_dir / "onnx").iterdir())
    assert [f.name for f in files] == [pb.onnx_cache_path(pb.DEFAULT_BACKBONE).name]  # no temp file left behind
    assert files[0].stat().st_size > 1_000_000

    def no_build(self):
        raise AssertionError("a cached export must not build the torch module")

    monkeypatch.setattr(pb.Backbone, "_build", no_build)
    warm = pb.Backbone(int8=None)
    assert warm.runtime == "onnxruntime" and warm._module is None
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, pb.CROP, pb.CROP)).astype(np.float32)
    a, b = cold.taps(x), warm.taps(x)
    for k in pb.TAPS:
        np.testing.assert_array_equal(a[k], b[k])

    # A damaged file (a disk filled mid-copy, say) is exported again, with a warning.
    monkeypatch.undo()
    monkeypatch.setenv(pb.CACHE_ENV, str(cache_dir.parent))
    files[0].write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger=pb.__name__):
        again = pb.Backbone(int8=None)
    assert "unreadable" in caplog.text
    assert again.runtime == "onnxruntime" and files[0].stat().st_size > 1_000_000
    np.testing.assert_allclose(again.taps(x)["blocks"], a["blocks"], atol=1e-5)


def test_the_key_follows_what_the_graph_depends_on(cache_dir, monkeypatch):
    base = pb.onnx_cache_path("efficientnet-lite2")
    assert base.parent == cache_dir / "onnx" and base.name.startswith("efficientnet-lite2-")
    assert pb.onnx_cache_path("efficientnet-lite0") != base
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.0.0-other" if n == "torch" else real(n))
    assert pb.onnx_cache_path("efficientnet-lite2") != base
    monkeypatch.undo()
    real_read = pb.Path.read_text
    monkeypatch.setattr(pb.Path, "read_text", lambda self, *a, **k: real_read(self, *a, **k)
                        + ("# edited" if self.name == "pixel_torch.py" else ""))
    assert pb.onnx_cache_path("efficientnet-lite2") != base  # the code that builds the graph changed
    monkeypatch.undo()
    monkeypatch.setattr(pb, "ONNX_OPSET", 18)
    assert pb.onnx_cache_path("efficientnet-lite2") != base
    with pytest.raises(ValueError, match="unknown backbone"):
        pb.onnx_cache_path("no-such-net")


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    path = tmp_path / "onnx" / "net.onnx"
    payloads = [bytes([i]) * 2_000_000 for i in range(6)]
    threads = [threading.Thread(target=write_atomically, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads
    assert [p.name for p in path.parent.iterdir()] == ["net.onnx"]
