"""`models fetch` from a local HTTP server: sha256 verified, pickles refused,
nothing left behind on failure."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from detectors.models import list_models, load_detector
from detectors.models.checkpoint import InputSpec, ModelCard
from detectors.models.fetch import FetchError, fetch_model
from detectors.models.nets import SmallCNN
from streams.cli import app


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("www")
    torch.manual_seed(0)
    sd = SmallCNN(width=4).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "tiny.safetensors"))
    card = ModelCard(name="upstream", arch="small-cnn", arch_params={"width": 4}, input=InputSpec(size=32))
    (root / "tiny.json").write_text(card.model_dump_json())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "nocard.safetensors"))
    torch.save(sd, root / "legacy.pth")

    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None  # type: ignore[method-assign]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", root
    srv.shutdown()
    srv.server_close()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fetch_verifies_and_loads(served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    r = CliRunner().invoke(app, ["models", "fetch", "mine", "--url", f"{base}/tiny.safetensors",
                                 "--sha256", _sha(root / "tiny.safetensors"), "--model-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json", "mine.safetensors"]
    assert [c.name for c in list_models(tmp_path)] == ["mine"]
    det = load_detector("mine", model_dir=tmp_path, device="cpu")
    assert det.name == "model:mine"
    r = CliRunner().invoke(app, ["models", "list", "--model-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["name"] == "mine"


def test_sha_mismatch_refused_nothing_left(served: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = served
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_model("bad", model_dir=tmp_path, url=f"{base}/tiny.safetensors", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(app, ["models", "fetch", "bad", "--url", f"{base}/tiny.safetensors",
                                 "--sha256", "0" * 64, "--model-dir", str(tmp_path)])
    assert r.exit_code == 1 and "sha256 mismatch" in r.output
    assert list(tmp_path.iterdir()) == []


def test_size_cap(served: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = served
    with pytest.raises(FetchError, match="cap"):
        fetch_model("big", model_dir=tmp_path, url=f"{base}/tiny.safetensors", max_bytes=100)
    assert list(tmp_path.iterdir()) == []


def test_pickle_refused_unless_allowed(served: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = served
    with pytest.raises(FetchError, match="pickled"):
        fetch_model("old", model_dir=tmp_path, url=f"{base}/legacy.pth", arch="small-cnn")
    assert list(tmp_path.iterdir()) == []
    card = fetch_model("old", model_dir=tmp_path, url=f"{base}/legacy.pth", arch="small-cnn", allow_pickle=True)
    assert card.calibration.method == "none"
    assert (tmp_path / "old.safetensors").read_bytes()[:1] != b"\x80"  # stored as safetensors


def test_missing_card_needs_arch_and_local_path_works(served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    with pytest.raises(FetchError, match="--arch"):
        fetch_model("nc", model_dir=tmp_path, url=f"{base}/nocard.safetensors")
    assert list(tmp_path.iterdir()) == []
    card = fetch_model("local", model_dir=tmp_path, url=str(root / "tiny.safetensors"))
    assert card.arch == "small-cnn" and card.name == "local"
    card = fetch_model("fileurl", model_dir=tmp_path, url=(root / "tiny.safetensors").as_uri())
    assert card.name == "fileurl"


def test_insecure_urls_refused(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="https"):
        fetch_model("x", model_dir=tmp_path, url="http://example.com/w.safetensors")
    with pytest.raises(FetchError, match="scheme"):
        fetch_model("x", model_dir=tmp_path, url="ftp://example.com/w.safetensors")
    with pytest.raises(FetchError, match="--url"):
        fetch_model("x", model_dir=tmp_path)
