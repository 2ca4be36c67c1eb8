"""Pixel verification of a hash match: do the two images show the same
pixels where the match says they overlap?

pHash keeps 64 signs of low frequencies; pictures that share a layout
(aligned GAN faces, style-mixing outputs, edits of one face, one prompt's
seeds) land within its radius while their pixels plainly differ. Each image
carries a 32x32 grey thumbnail of its content (``ImageHashes.thumb``). A hash
pair also says *roughly which* regions correspond: the query's code of kind
``k`` (full frame, mirror, a crop or band view) met the indexed code of slot
``s``, so the query's box for ``k`` shows about what the indexed image's box
for ``s`` shows.

``residual``: both regions resampled to 16x16 (area weights, fractional
boxes), the first scaled by the least-squares gain onto the second (a
brightened repost), and the *median* absolute difference in grey levels --
a caption or bar over a sixth of the region does not move the median, a
different face does. Measured on the cluster bench's candidate pairs: same
picture median 2, different pictures 1st percentile ~6.

Hash geometry is approximate (two copies trimmed of different caption bars
match at 8 bits while their regions are a sixth apart), so ``aligned_residual``
searches when the direct boxes fail: each edge of either box moved by up to
12% (coordinate descent, two rounds) and keeps the smallest residual.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from detectors.hashing import THUMB_SIDE, VIEW_BOXES, VIEW_CROPS

Box = tuple[float, float, float, float]
FULL: Box = (0.0, 0.0, 1.0, 1.0)
_SIDE = 16
_EDGE_MOVES = (-0.12, -0.08, -0.04, 0.04, 0.08, 0.12)
_MIN_SIDE = 0.5  # a searched box keeps at least half of each side
# content fractions of the view slots, in ``ImageHashes.views`` order after the trimmed view
VIEW_SLOT_BOXES: tuple[Box, ...] = tuple(
    ((1 - f) / 2, (1 - f) / 2, (1 + f) / 2, (1 + f) / 2) for f in VIEW_CROPS
) + tuple(VIEW_BOXES)


@lru_cache(maxsize=8192)
def _area(lo: float, hi: float) -> np.ndarray:
    """(16, 32): area weights taking the thumbnail's pixels covering [lo, hi)
    (fractions of its side) to 16 equal bins."""
    edges = lo + (hi - lo) * np.arange(_SIDE + 1) / _SIDE
    px = np.arange(THUMB_SIDE + 1) / THUMB_SIDE
    a = np.clip(np.minimum(edges[1:, None], px[None, 1:]) - np.maximum(edges[:-1, None], px[None, :-1]), 0, None)
    a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-9)
    a = a.astype(np.float32)
    a.flags.writeable = False
    return a


def region(thumb: np.ndarray, box: Box) -> np.ndarray:
    """The 16x16 of ``box`` (x0, y0, x1, y1 fractions) of a thumbnail."""
    x0, y0, x1, y1 = (round(v, 4) for v in box)  # bounded cache keys
    return _area(y0, y1) @ thumb @ _area(x0, x1).T


def _residual(ra: np.ndarray, rb: np.ndarray) -> float:
    gain = float((ra * rb).sum()) / max(float((ra * ra).sum()), 1e-6)
    e = np.abs(ra * gain - rb).reshape(-1)
    return float(np.partition(e, len(e) // 2)[len(e) // 2])


def residual(a: np.ndarray, a_box: Box, b: np.ndarray, b_box: Box, mirror: bool = False) -> float:
    """Median grey-level difference of ``a``'s ``a_box`` (of its mirror image
    when ``mirror``), gain-matched, and ``b``'s ``b_box``."""
    if mirror:
        a = a[:, ::-1]
    return _residual(region(a, a_box), region(b, b_box))


def aligned_residual(a: np.ndarray, a_box: Box, b: np.ndarray, b_box: Box, mirror: bool = False,
                     good_enough: float = 0.0) -> float:
    """``residual`` at the given boxes, or -- when that is above
    ``good_enough`` -- the smallest over boxes whose edges moved (see module
    docstring). Deterministic: a fixed search order."""
    if mirror:
        a = a[:, ::-1]
    ra = region(a, a_box)
    best = _residual(ra, region(b, b_box))
    if best <= good_enough:
        return best
    boxes = [list(a_box), list(b_box)]
    regions = [ra, region(b, b_box)]
    for _ in range(2):
        for side, thumb in ((0, a), (1, b)):
            box = boxes[side]
            for e in range(4):
                base, keep = box[e], box[e]
                for move in _EDGE_MOVES:
                    v = min(1.0, max(0.0, base + move))
                    if (box[e + 2] - v if e < 2 else v - box[e - 2]) < _MIN_SIDE:
                        continue
                    box[e] = v
                    r = region(thumb, tuple(box))  # type: ignore[arg-type]
                    s = _residual(r, regions[1]) if side == 0 else _residual(regions[0], r)
                    if s < best:
                        best, keep = s, v
                box[e] = keep
                regions[side] = region(thumb, tuple(box))  # type: ignore[arg-type]
            if best <= good_enough:
                return best
    return best
