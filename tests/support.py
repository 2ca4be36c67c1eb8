"""Helpers shared by the pipeline tests."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageFilter

from streams.ingest import iter_lines


def picture(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A smooth, detailed synthetic picture (a sum of random plane waves):
    different seeds give unrelated pictures with trustworthy PDQ quality."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for _ in range(10):
        fx, fy, ph = rng.uniform(0.5, 10, 2).tolist() + [rng.uniform(0, 6.3)]
        img += rng.uniform(-1, 1, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + ph)[..., None]
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8))


def split_feed(feed: Path, parts: int) -> list[Path]:
    """Cut a JSONL feed into ``parts`` consecutive files beside it."""
    lines = list(iter_lines(feed))
    step = -(-len(lines) // parts)
    out = []
    for i in range(parts):
        p = feed.with_name(f"part{i}.jsonl")
        p.write_bytes(b"\n".join(lines[i * step:(i + 1) * step]) + b"\n")
        out.append(p)
    return out


class _Drip(BaseHTTPRequestHandler):
    """Answers 200 and then one byte of a PNG signature every 0.5 s: a fetch
    that never stalls long enough for a read timeout, only a total deadline."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for b in b"\x89PNG\r\n\x1a\n" * 100:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass


@contextmanager
def slow_drip_url() -> Iterator[str]:
    """A loopback URL whose image drips in forever (see ``_Drip``)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    srv.daemon_threads = True
    srv.block_on_close = False
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/drip.png"
    finally:
        srv.shutdown()
        srv.server_close()


GRADIENT_PNG = """
x = np.linspace(0, 255, {side}, dtype=np.uint8)
a = np.zeros(({side}, {side}, 3), np.uint8)
a[..., 0], a[..., 1] = x[None, :], x[:, None]
Image.fromarray(a).save(path)
del a
"""


# A process's own peak RSS in kB, as Python source for a child's script: its VmHWM, not
# ru_maxrss, which Linux carries from the forking parent across exec (a test worker's
# 1.5 GB peak hid a child's growth below it).
PEAK_RSS_KB = "lambda: int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')).split()[1])"


def decoded_then_grown_mib(tmp_path: Path, make: str, work: str, imports: str = "") -> int:
    """How much a fresh Python process's peak memory grows (MiB) while it runs
    ``work`` on ``image``, an ImageData already decoded (``image.rgb``) from the
    picture ``make`` saved at ``path``: what work beside a decode costs, the
    decode itself left out, and the modules ``imports`` loads before (an
    import's tens of MiB read as the work's). A process of its own, so the
    peak is this work's."""
    script = "\n".join(["import sys", "import numpy as np", "from PIL import Image",
                        "from detectors.imagedata import ImageData", f"hwm = {PEAK_RSS_KB}", "path = sys.argv[1]",
                        make, "image = ImageData(open(path, 'rb').read())", "image.rgb", imports, "before = hwm()", work,
                        "print((hwm() - before) >> 10)"])
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "picture.png")], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.strip())



def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until ``url`` (a server's ``/healthz``) answers 200; fails with the
    process's stderr if it exits first, or when ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before it answered: {proc.communicate()[1]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {timeout_s:g} s"
        time.sleep(0.2)


def labelled_pair(root: Path, g: int, i: int, size: tuple[int, int], rng: np.random.Generator, *,
                  posterise: bool = False) -> tuple[str, str]:
    """Synthetic labelled pictures for the pixel recipe's tests, generator family ``g``: a "real"
    photo (plane waves + sensor-like noise, JPEG q90) and an "AI" picture (other waves blurred by
    the family; ``posterise``: also quantised by it), written to ``root``; their file names."""
    seed = 100 * g + i
    real = np.asarray(picture(seed, size), float) + rng.normal(0, 9, (size[1], size[0], 3))
    Image.fromarray(np.clip(real, 0, 255).astype(np.uint8)).save(root / f"real_{g}_{i}.jpg", quality=90)
    ai = picture(seed + 50, size).filter(ImageFilter.GaussianBlur(1 + g))
    if posterise:
        ai = ai.quantize(32 + 16 * g).convert("RGB")
    ai.save(root / f"ai_{g}_{i}.png")
    return f"real_{g}_{i}.jpg", f"ai_{g}_{i}.png"


def load_sitecustomize(tmp_path: Path, monkeypatch, code: str) -> None:
    """Make every Python started from this test (workers, the zygote) run ``code`` first, as a
    ``sitecustomize`` on its PYTHONPATH: how the tests look inside a real worker process."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def mode_of(path: Path) -> int:
    """A file's permission bits (``0o600``)."""
    return stat.S_IMODE(path.stat().st_mode)


def start_broker_cli(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """`deepwatch broker --port 0` started in the foreground: the process and
    the kafka:// URL it printed first (its stderr in the failure when it
    printed none)."""
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli.__main__", "broker", "--port", "0",
                             "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("kafka://127.0.0.1:"):
        proc.kill()
        raise AssertionError((url, proc.communicate(timeout=10)[1]))
    return proc, url
