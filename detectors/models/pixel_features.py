"""Fill the feature cache and read feature matrices out of it."""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from detectors.imagedata import ImageData, ImageRejected
from detectors.models.pixel_backbone import Backbone, FeatureSpec, crop_taps, decode_for_model, image_crops, select_taps
from detectors.models.pixel_data import FeatureCache, Sample, repost_like, variant_bytes

log = logging.getLogger(__name__)


def extract(
    samples: list[Sample],
    variants: list[str],
    cache: FeatureCache,
    backbone: Backbone,
    spec: FeatureSpec,
    progress: Callable[[int, int], None] | None = None,
    n_crops: int | None = None,
) -> list[tuple[Sample, str, str]]:
    """Compute missing per-crop taps for ``n_crops`` crops (default: all ``cache.max_crops``;
    the recipe's ``spec.crops`` is enough to train it). Returns skipped (sample, variant, reason)."""
    # (sample, cache entry) -> the variant to compute it from: two variants may share an entry
    # (a published picture the probe sees re-posted, ``cached_variant``)
    missing: dict[tuple[Sample, str], str] = {}
    for v in variants:
        for s in samples:
            c = cached_variant(s, v, spec)
            if not cache.path(s, c).exists():
                missing.setdefault((s, c), v)
    todo = [(s, v, c) for (s, c), v in missing.items()]
    skipped = []
    started = time.monotonic()
    for i, (s, v, c) in enumerate(todo):
        try:
            image = ImageData(variant_bytes(s, v), path=str(s.path))
            crops = image_crops(decode_for_model(image, spec), n_crops or cache.max_crops)
        except (ImageRejected, OSError, ValueError) as e:
            skipped.append((s, v, str(e)))
            continue
        cache.put(s, c, crop_taps(backbone, crops))
        if progress:
            progress(i + 1, len(todo))
        elif (i + 1) % 50 == 0:
            log.info("features %d/%d (%.1f/s)", i + 1, len(todo), (i + 1) / (time.monotonic() - started))
    return skipped


def cached_variant(sample: Sample, variant: str, spec: FeatureSpec) -> str:
    """The cache entry holding what the probe sees of ``sample`` in ``variant``.

    With ``spec.canonical_input`` the probe sees a published picture that is not re-post-like
    exactly as its re-posted copy (the same bytes: ``pixel_data.canonical``), so the two share
    an entry; augmented copies get entries of their own (those at q90 and above are re-posted again).
    """
    if not spec.canonical_input or variant == "reposted":
        return variant
    if variant == "published":
        return "published" if _published_repost_like(str(sample.path)) else "reposted"
    return f"{variant}-canonical"


@lru_cache(maxsize=None)
def _published_repost_like(path: str) -> bool:
    try:
        return repost_like(ImageData(Path(path).read_bytes(), path=path))
    except (ImageRejected, OSError):
        return True  # skipped by ``extract`` either way


CALIBRATION_PICTURES = 120  # x 3 crops: what the fifth round calibrated on (docs/pixel-detector.md)


def calibration_crops(samples: list[Sample], spec: FeatureSpec, n_pictures: int = CALIBRATION_PICTURES) -> np.ndarray:
    """Crops to calibrate the int8 ranges on: the re-posted copies of an even, deterministic
    spread of the training pictures (sorted by content key, every k-th), 3 crops each."""
    ordered = sorted(samples, key=lambda s: s.key)
    step = max(1, len(ordered) // n_pictures)
    out = []
    for s in ordered[::step][:n_pictures]:
        try:
            out.append(image_crops(decode_for_model(ImageData(variant_bytes(s, "reposted"), path=str(s.path)), spec), 3))
        except (ImageRejected, OSError, ValueError):
            continue
    if not out:
        raise ValueError("no decodable pictures to calibrate the int8 backbone on")
    return np.concatenate(out)


def matrix(samples: list[Sample], variant: str, cache: FeatureCache, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """(X, present) for ``samples`` in ``variant``: X rows of missing pictures are zeros, ``present`` False."""
    rows, present = [], []
    for s in samples:
        taps = cache.get(s, cached_variant(s, variant, spec))
        if taps is None:
            rows.append(None)
            present.append(False)
            continue
        per_crop = select_taps(taps, spec.taps)[: spec.crops]
        rows.append(per_crop.mean(0))
        present.append(True)
    dim = next((len(r) for r in rows if r is not None), 0)
    X = np.stack([r if r is not None else np.zeros(dim, np.float32) for r in rows]) if rows else np.zeros((0, dim))
    return X.astype(np.float32), np.array(present, bool)
