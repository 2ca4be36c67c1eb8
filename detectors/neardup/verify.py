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

``smooth``: a 1-2-1 blur of both 16x16 regions before differencing, for
the strict test that links clusters (80th percentile, ``ClusterIndex``).
A detailed picture (a crowd, foliage) and its off-centre crop are
sampled by their thumbnails at different phases, which moves the raw 80th
percentile to 7-12 grey levels although the picture is the same; blurred,
it drops to 2-3, while a composite's repainted quarter stays different.
On the cluster bench's verified candidate pairs, blurred <= 4 passes 75% of
same-picture pairs and 2.7% of different ones; raw <= 6 (the rule before)
60% and 5.3%.

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
_DARK, _BRIGHT, _MIN_MID = 8.0, 247.0, 24  # gain fit: unclipped pixels, and enough of them
# content fractions of the view slots, in ``ImageHashes.views`` order after the trimmed view
VIEW_SLOT_BOXES: tuple[Box, ...] = tuple(
    ((1 - f) / 2, (1 - f) / 2, (1 + f) / 2, (1 + f) / 2) for f in VIEW_CROPS
) + tuple(VIEW_BOXES)


@lru_cache(maxsize=16384)
def clip_pair(a: Box, b: Box, min_overlap: float) -> tuple[Box, Box] | None:
    """Two corresponding regions (fractions of two frames) shrunk alike to
    the part that lies inside both frames -- a frame-relative region may
    reach past a trimmed margin, which has no pixels; None when less than
    ``min_overlap`` of each side is left to compare."""
    oa, ob = list(a), list(b)
    for ax in (0, 1):
        a0, a1, b0, b1 = a[ax], a[ax + 2], b[ax], b[ax + 2]
        wa, wb = max(a1 - a0, 1e-6), max(b1 - b0, 1e-6)
        t0 = max(0.0, -a0 / wa, -b0 / wb)
        t1 = min(1.0, (1 - a0) / wa, (1 - b0) / wb)
        if t1 - t0 < min_overlap:
            return None
        oa[ax], oa[ax + 2] = a0 + t0 * wa, a0 + t1 * wa
        ob[ax], ob[ax + 2] = b0 + t0 * wb, b0 + t1 * wb
    return (oa[0], oa[1], oa[2], oa[3]), (ob[0], ob[1], ob[2], ob[3])


@lru_cache(maxsize=4096)
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
    x0, y0, x1, y1 = box
    return _area(y0, y1) @ thumb @ _area(x0, x1).T


# One-colour regions (``uniform_level``): inset by this fraction of each
# side (a caption bar's edge bleeds into the thumbnail's next row), and at
# most this many grey levels between the region's darkest and lightest pixel
_UNIFORM_INSET = 0.05
UNIFORM_RANGE = 4.0


def uniform_level(thumb: np.ndarray, box: Box = FULL) -> float | None:
    """The grey level of ``box`` of a thumbnail when it is one colour (a
    black frame; what a caption bar leaves of one), else None. Such a region
    has no hash -- pHash and PDQ of a flat picture are noise -- so a flat
    picture is found by its level (``ClusterIndex``)."""
    return uniform_levels(thumb, (box,))[0]


def uniform_levels(thumb: np.ndarray, boxes: tuple[Box, ...]) -> list[float | None]:
    """``uniform_level`` of several boxes in one batched product."""
    inset = [(x0 + (x1 - x0) * _UNIFORM_INSET, y0 + (y1 - y0) * _UNIFORM_INSET,
              x1 - (x1 - x0) * _UNIFORM_INSET, y1 - (y1 - y0) * _UNIFORM_INSET) for x0, y0, x1, y1 in boxes]
    rows = np.stack([_area(y0, y1) for _, y0, _, y1 in inset])
    cols = np.stack([_area(x0, x1).T for x0, _, x1, _ in inset])
    r = (rows @ thumb @ cols).reshape(len(boxes), -1)
    lo, hi = r.min(axis=1), r.max(axis=1)
    return [round(float(a + b) / 2, 2) if b - a <= UNIFORM_RANGE else None for a, b in zip(lo.tolist(), hi.tolist())]


def _smooth(r: np.ndarray) -> np.ndarray:
    """A 1-2-1 blur over the last two axes (edges repeated; slicing, not
    ``np.pad``, which cost more than the blur on 16x16 regions)."""
    h = 2 * r
    h[..., :, 1:] += r[..., :, :-1]
    h[..., :, 0] += r[..., :, 0]
    h[..., :, :-1] += r[..., :, 1:]
    h[..., :, -1] += r[..., :, -1]
    v = 2 * h
    v[..., 1:, :] += h[..., :-1, :]
    v[..., 0, :] += h[..., 0, :]
    v[..., :-1, :] += h[..., 1:, :]
    v[..., -1, :] += h[..., -1, :]
    return v / 16


def _residuals(ra: np.ndarray, rb: np.ndarray, quantile: float = 0.5, smooth: bool = False) -> np.ndarray:
    """Per candidate (leading axis, broadcast): the ``quantile`` (median by
    default) of |gain * ra - rb| over the informative pixels, both sides
    blurred first when ``smooth`` (module docstring). The gain is fitted on pixels unclipped on both
    sides (a brightened repost saturates its highlights); pixels black on
    both or saturated on both say nothing and are left out (a mostly black
    photo and a face on black would otherwise agree by their backgrounds),
    unless fewer than ``_MIN_MID`` pixels remain (a flat picture)."""
    if smooth:
        ra, rb = _smooth(ra), _smooth(rb)
    # every array below takes the broadcast shape from its operands (no
    # ``np.broadcast_arrays``), and ``e`` and ``use`` are fresh, so changed in
    # place: on these 16x16 regions the calls' overhead is the cost
    mid = (ra > _DARK) & (ra < _BRIGHT) & (rb > _DARK) & (rb < _BRIGHT)
    sa, sb = (ra * mid).sum(axis=(-2, -1), keepdims=True), (rb * mid).sum(axis=(-2, -1), keepdims=True)
    gain = np.where(mid.sum(axis=(-2, -1), keepdims=True) >= _MIN_MID, sb / np.maximum(sa, 1e-6), 1.0)
    fit = ra * gain
    diff = fit - rb
    shape = (*diff.shape[:-2], -1)
    e = np.abs(diff).reshape(shape)
    use = ~(((fit <= _DARK) & (rb <= _DARK)) | ((fit >= _BRIGHT) & (rb >= _BRIGHT))).reshape(shape)
    use |= use.sum(axis=-1, keepdims=True) < _MIN_MID
    e[~use] = np.inf
    k = np.maximum((use.sum(axis=-1, keepdims=True) * quantile).astype(np.int64), 0)
    if k.size and (k == k.flat[0]).all():  # one rank for every candidate (the usual case): select, not sort
        kk = int(k.flat[0])
        return np.partition(e, kk, axis=-1)[..., kk]
    return np.take_along_axis(np.sort(e, axis=-1), k, axis=-1)[..., 0]


def informative(a: np.ndarray, a_box: Box, b: np.ndarray, b_box: Box, mirror: bool = False) -> int:
    """How many of the 16x16 pixels of the two regions are informative: not
    black on both sides nor saturated on both (``_residuals`` leaves those
    out, and compares everything when fewer than ``_MIN_MID`` remain -- two
    screenshots of different dark pictures then agree on their UI)."""
    if mirror:
        a = a[:, ::-1]
    ra, rb = region(a, a_box), region(b, b_box)
    same_end = ((ra <= _DARK) & (rb <= _DARK)) | ((ra >= _BRIGHT) & (rb >= _BRIGHT))
    return int((~same_end).sum())


def residual(a: np.ndarray, a_box: Box, b: np.ndarray, b_box: Box, mirror: bool = False, quantile: float = 0.5,
             smooth: bool = False) -> float:
    """Median grey-level difference of ``a``'s ``a_box`` (of its mirror image
    when ``mirror``), gain-matched, and ``b``'s ``b_box``."""
    if mirror:
        a = a[:, ::-1]
    return float(_residuals(region(a, a_box), region(b, b_box), quantile, smooth))


def aligned_residual(a: np.ndarray, a_box: Box, b: np.ndarray, b_box: Box, mirror: bool = False,
                     good_enough: float = 0.0, quantile: float = 0.5, smooth: bool = False) -> float:
    """``residual`` at the given boxes, or -- when that is above
    ``good_enough`` -- the smallest over boxes whose edges moved (see module
    docstring): per edge, all moves at once. Deterministic: fixed order."""
    if mirror:
        a = a[:, ::-1]
    thumbs = (a, b)
    boxes = [list(a_box), list(b_box)]
    regions = [region(a, a_box), region(b, b_box)]
    best = float(_residuals(regions[0], regions[1], quantile, smooth))
    if best <= good_enough:
        return best
    for _ in range(2):
        for side in (0, 1):
            box, thumb = boxes[side], thumbs[side]
            for e in range(4):
                lo_side = e < 2
                vals = [min(1.0, max(0.0, box[e] + m)) for m in _EDGE_MOVES]
                vals = [v for v in vals if (box[e + 2] - v if lo_side else v - box[e - 2]) >= _MIN_SIDE]
                if not vals:
                    continue
                if e % 2:  # a y edge: stack row matrices
                    ys = np.stack([_area(v, box[3]) if e == 1 else _area(box[1], v) for v in vals])
                    cand = ys @ thumb @ _area(box[0], box[2]).T
                else:
                    xs = np.stack([_area(v, box[2]) if e == 0 else _area(box[0], v) for v in vals])
                    cand = _area(box[1], box[3]) @ thumb @ xs.transpose(0, 2, 1)
                res = (_residuals(cand, regions[1], quantile, smooth) if side == 0
                       else _residuals(regions[0], cand, quantile, smooth))
                i = int(np.argmin(res))
                if res[i] < best:
                    best = float(res[i])
                    box[e] = vals[i]
                    regions[side] = cand[i]
            if best <= good_enough:
                return best
    return best

