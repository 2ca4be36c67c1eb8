"""The re-posted variant of `deepwatch eval` (and of training and the pixel probe's features)
decodes within the same limits as the picture as published. It went through plain Pillow: a
657 KB 13000x13000 PNG that the published variant refused took eval to 1.6 GB, the two
variants scored different sets of pictures, and its skip reasons were raw Pillow text."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from detectors.imagedata import ImageData, ImageRejected
from tests.support import picture

ROOT = Path(__file__).resolve().parents[1]
# The bombs are over Pillow's warning threshold by design; the rejection is what is asserted.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _zero_png(path: Path, w: int, h: int) -> None:
    """An all-zero 8-bit RGBA PNG, written row by row: a few MB on disk for hundreds of MB of pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    co = zlib.compressobj(1)
    row = b"\x00" * (1 + w * 4)
    idat = b"".join(co.compress(row) for _ in range(h)) + co.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _refusal(path: Path) -> str:
    """What ``deepwatch detect`` says of the file: ImageData's own rejection message."""
    with pytest.raises(ImageRejected) as e:
        ImageData(path.read_bytes())
    return str(e.value)


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evalset")
    (root / "real").mkdir()
    (root / "ai").mkdir()
    # Over decode.max_pixels (refused from the header) but under Pillow's own hard limit.
    _zero_png(root / "real" / "bomb_pixels.png", 13000, 13000)
    # Under the pixel cap, over the 320 MiB decode budget: 9500x9500 RGBA is 344 MiB.
    _zero_png(root / "real" / "bomb_budget.png", 9500, 9500)
    # A zTXt chunk inflating past Pillow's MAX_TEXT_CHUNK: ImageData drops it and decodes the
    # pixels; plain Pillow refused the file ("Decompressed data too large ...").
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1000), zip=True)
    picture(3, (320, 240)).save(root / "real" / "big_text.png", pnginfo=info)
    picture(4, (320, 240)).save(root / "real" / "plain.jpg", quality=90)
    picture(5, (320, 240)).save(root / "ai" / "a.png")
    picture(6, (320, 240)).save(root / "ai" / "b.jpg", quality=92)
    return root


# Runs the CLI and writes its process's peak RSS (VmHWM, kB) as it ends. Not ``wait4``'s
# ru_maxrss: Linux carries a forked child's parent's peak across exec, and a test worker
# that grew to 1.5 GB before forking the CLI reported its own peak as the CLI's.
_PEAK_WRAPPER = """
import runpy, sys
out, sys.argv = sys.argv[1], ["deepwatch", *sys.argv[2:]]
try:
    runpy.run_module("streams.cli", run_name="__main__")
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(out, "w").write(hwm.split()[1])
"""


def _eval_peak_rss(eval_set: Path, data_dir: Path) -> tuple[dict, int]:
    """``deepwatch eval --no-models`` on the set in a process of its own: its JSON report and
    its peak RSS in MiB (its own high-water mark, ``_PEAK_WRAPPER``)."""
    peak = data_dir / "peak_kb.txt"
    with open(data_dir / "out.json", "wb") as out, open(data_dir / "err.txt", "wb") as err:
        proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, str(peak), "eval", str(eval_set), "--no-models",
                               "--format", "json", "-d", str(data_dir)], stdout=out, stderr=err, cwd=ROOT,
                              timeout=300)
    assert proc.returncode == 0, (data_dir / "err.txt").read_text()[-3000:]
    return json.loads((data_dir / "out.json").read_text()), int(peak.read_text()) >> 10


def test_eval_refuses_bombs_in_both_variants_alike_within_bounded_memory(eval_set: Path, tmp_path: Path) -> None:
    report, peak_mib = _eval_peak_rss(eval_set, tmp_path)
    # Unbounded, the re-post decoded 13000x13000 RGBA and its RGB copy: 1.5 GB at the peak.
    assert peak_mib < 600, peak_mib
    by_file: dict[str, dict[str, str]] = {}
    for s in report["skipped"]:
        variant, _, reason = s["reason"].partition(": ")
        by_file.setdefault(Path(s["file"]).name, {})[variant] = reason
    assert set(by_file) == {"bomb_pixels.png", "bomb_budget.png"}, report["skipped"]
    for name in by_file:
        # The same human reason in both variants, and the one `deepwatch detect` gives.
        assert by_file[name] == dict.fromkeys(("original", "reposted"), _refusal(eval_set / "real" / name)), name
    assert "exceeds limit" in by_file["bomb_pixels.png"]["reposted"]
    assert "decode.max_decode_mb" in by_file["bomb_budget.png"]["reposted"]
    # Both variants score the same pictures: the four decodable ones, big_text.png included.
    assert report["n"] == 6
    assert report["variants"]["original"]["n"] == report["variants"]["reposted"]["n"] == 4


def test_repost_and_augmented_copies_refuse_what_imagedata_refuses(eval_set: Path) -> None:
    """Training's calibration re-post and the pixel probe's variants (``reposted``, ``aug<k>``,
    ``jpeg<k>``) go through the same decoder: the over-budget PNG is refused with the same
    reason, never decoded by Pillow in full."""
    from detectors.models.dataset import repost_bytes
    from detectors.models.pixel_data import Sample, augment, reencode, variant_bytes

    path = eval_set / "real" / "bomb_budget.png"
    data = path.read_bytes()
    expected = _refusal(path)
    sample = Sample(path=path, label=0, generator="", group="camera", category="", dataset="t")
    for name, make in (("repost_bytes", lambda: repost_bytes(data)), ("augment", lambda: augment(data, 1)),
                       ("reencode", lambda: reencode(data, 1)), ("aug0", lambda: variant_bytes(sample, "aug0")),
                       ("reposted", lambda: variant_bytes(sample, "reposted"))):
        with pytest.raises(ImageRejected) as e:
            make()
        assert (e.value.reason, str(e.value)) == ("memory_budget", expected), name


def test_repost_of_a_png_pillow_refuses_for_its_metadata_is_made_from_its_pixels(eval_set: Path) -> None:
    """The published variant analyses a PNG whose zTXt inflates past Pillow's MAX_TEXT_CHUNK
    (ImageData drops the chunk, with a note); the re-post is made from the same pixels."""
    data = (eval_set / "real" / "big_text.png").read_bytes()
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):
        Image.open(io.BytesIO(data))  # what the plain-Pillow re-post ran into
    from detectors.models.dataset import repost_bytes

    published = ImageData(data)
    reposted = Image.open(io.BytesIO(repost_bytes(data)))
    assert published.notes and reposted.format == "JPEG" and reposted.size == published.size == (320, 240)
    # the same picture, re-encoded: mean absolute difference of a q80 JPEG, not another image
    diff = np.abs(np.asarray(reposted, float) - np.asarray(published.rgb, float)).mean()
    assert diff < 4, diff
