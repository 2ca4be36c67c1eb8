"""Per-event hashing cost: the analyze stage's ``compute_hashes`` against the
previous implementation, on the same images in the same run.

* ``reference`` -- the previous ``hashes_of`` (version 3): full-frame pHash,
  then every view (trimmed content, centre crops, 3x3 grid crops, caption
  bands) as its own Lanczos-resampled DCT of the whole thumbnail (one pair of
  resample matrices per view, cached by size and box, so a stream of varied
  image sizes mostly misses), with NumPy's BLAS left multi-threaded.
* ``current`` -- ``detectors.hashing.hashes_of``: one box-filtered 128x128 copy
  of the content, all views' DCT blocks in one batched product from fixed
  matrices, BLAS held to one thread for these tiny products, plus the
  verification thumbnail.

Both start from the same decoded thumbnail (``ImageData.thumbnail`` +
``_small``, timed separately as ``decode``), so the ratio is hashing alone and
per event (decode + hashing). Reports ms/event and current/reference agreement
in bits.

    .venv/bin/python bench/hashing.py [--limit 300] [--repeat 2]

Images: ../shared/data/{detect-dev,detect-dev2,train-extra} (skips with the
reason when absent).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectors.hashing import (  # noqa: E402
    _THUMB_SIDE,
    ImageHashes,
    _bits_hex,
    _dct_resample,
    _median,
    _ODD_COLS,
    _small,
    content_box,
    hamming_hex,
    hashes_of,
    pdq_pair,
    view_hashes,
)
from detectors.imagedata import ImageData  # noqa: E402

DIRS = ["detect-dev", "detect-dev2", "train-extra"]


def reference_hashes_of(image) -> ImageHashes:
    """The version-3 ``hashes_of``, kept here as the baseline."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    h, w = grey.shape
    low = _dct_resample(h, 0.0, float(h)) @ grey @ _dct_resample(w, 0.0, float(w)).T
    mirrored = low * _ODD_COLS
    phash, phash_m = _bits_hex(low > _median(low)), _bits_hex(mirrored > _median(mirrored))
    pdq, pdq_m, quality = pdq_pair(image)
    views, trimmed = view_hashes(grey)
    if trimmed:
        x0, y0, x1, y1 = content_box(grey)  # type: ignore[misc]
        low = _dct_resample(h, float(y0), float(y1)) @ grey @ _dct_resample(w, float(x0), float(x1)).T
        phash_m = _bits_hex(low * _ODD_COLS > _median(low * _ODD_COLS))
    return ImageHashes(phash=phash, pdq=pdq, pdq_quality=quality, phash_mirror=phash_m, pdq_mirror=pdq_m,
                       views=views, trimmed=trimmed)


def main(
    limit: int = typer.Option(300, help="images (files) to hash"),
    repeat: int = typer.Option(2, help="timed passes over the images (alternating, best pass counts)"),
) -> None:
    dirs = [REPO.parent / "shared" / "data" / d for d in DIRS]
    if not all(d.is_dir() for d in dirs):
        print(f"SKIP: shared image directories not found under {REPO.parent / 'shared' / 'data'}")
        raise typer.Exit(0)
    files = [p for d in dirs for p in sorted(d.rglob("*")) if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}]
    step = max(1, len(files) // limit)
    blobs = [p.read_bytes() for p in files[::step][:limit]]

    t0 = time.perf_counter()
    thumbs = [_small(ImageData(b).thumbnail(_THUMB_SIDE)) for b in blobs]
    decode = (time.perf_counter() - t0) / len(blobs) * 1e3

    best = {"reference": float("inf"), "current": float("inf")}
    for _ in range(repeat):
        for name, fn in (("reference", reference_hashes_of), ("current", hashes_of)):
            t0 = time.perf_counter()
            out = [fn(t) for t in thumbs]
            best[name] = min(best[name], (time.perf_counter() - t0) / len(thumbs) * 1e3)
            if name == "reference":
                ref = out
            else:
                cur = out
    d_full = [hamming_hex(a.phash, b.phash) for a, b in zip(ref, cur)]
    d_view = [hamming_hex(x, y) for a, b in zip(ref, cur) for x, y in zip(a.views or [], b.views or [])]
    print(f"# hashing per event: {len(thumbs)} shared images, best of {repeat} passes")
    print(f"{'stage':36s} {'ms/event':>9s}")
    print(f"{'decode (draft thumbnail)':36s} {decode:9.2f}")
    print(f"{'hashes, reference (v3)':36s} {best['reference']:9.2f}")
    print(f"{'hashes, current':36s} {best['current']:9.2f}")
    print(f"hashing speed-up: {best['reference'] / best['current']:.2f}x; "
          f"decode+hashing: {(decode + best['reference']) / (decode + best['current']):.2f}x")
    print(f"agreement: pHash median/p99 {np.median(d_full):.0f}/{np.percentile(d_full, 99):.0f} bits, "
          f"views median/p99 {np.median(d_view):.0f}/{np.percentile(d_view, 99):.0f} bits; "
          f"frame detected on both: {sum(a.trimmed == b.trimmed for a, b in zip(ref, cur))}/{len(cur)}")


if __name__ == "__main__":
    typer.run(main)
