"""Is a verified near-duplicate pair the same picture, or an edit of it?

The 32x32 record (``verify``) decides on the *median* residual, which is
built to ignore a caption over a sixth of the picture -- and so ignores an
inpainted object or a changed face just as well. Re-encoding, resizing and
cropping spread small residual over the whole picture; an edit concentrates
large residual in one part of its interior. This module compares the two
images' own pixels for one pair, at 128x128 over the region the hashes
named:

1. both decoded once, grey, at most ``WORK_SIDE`` on the short side;
2. the regions aligned: every edge of either box moved in turn (coordinate
   descent, coarse at 48x48 on the median, then fine at 96x96 on the mean,
   which edges dominate);
3. the residual |gain * a - b| of the slightly blurred regions, each pixel
   the smaller over shifts of up to ``SHIFT`` pixels both ways (what the
   alignment left, resampling phase), pixels near black or white on either
   side left out (a brightened copy saturates);
4. its local mean over windows of an eighth of the side, over the pixels
   that lie in both images' content (a trimmed caption bar or border is not
   compared) and away from each frame's top and bottom ``EDGE_BAND`` and
   side ``EDGE_SIDE`` (a caption or bar over an edge, a border): the
   largest window mean is the *peak* (grey levels).

Measured on the cluster bench's verified pairs (seed 1, docs/clusters.md
"Session 9"): same picture p99 24 / p99.9 54 (3 of 1,189 above 35), the
pairs that first joined two different pictures 5.6-78 (inpaintings 55 and
78, renders of one seed on two compute units 21-44, StyleCLIP edits 23-38;
SAM age edits at 6-9 are texture everywhere and stay out of reach).
``EDIT_PEAK`` is set where same-picture pairs are rare.

Pure: bytes or arrays in, a number out; no broker, no store. The caller
supplies the bytes (``PixelSource``) and decides when the check is worth
its ~0.1 s (``ClusterIndex`` runs it on borderline joins only).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from detectors.imagedata import DecodeLimits, ImageData, ImageRejected
from detectors.neardup.verify import Box, clip_pair

WORK_SIDE = 256  # short side the images are compared from
SIDE = 128  # the compared regions, square
SHIFT = 2  # pixels of SIDE a residual may be explained by a shift
EDGE_BAND = 0.19  # of each frame's height at top and bottom: captions, bars (bench: up to 1/6)
EDGE_SIDE = 0.05  # of each frame's width at left and right: borders
EDIT_PEAK = 35.0  # grey levels: an edit above (see module docstring)
_COARSE, _FINE = 48, 96
_MOVES = (-0.06, -0.03, -0.015, 0.015, 0.03, 0.06)
_MIN_SIDE = 0.3  # a searched box keeps at least this fraction of the frame per side
_DARK, _BRIGHT = 8.0, 247.0  # left out on either side: black or saturated (a brightened copy clips)


class PixelSource(Protocol):
    """The image bytes of a member by sha256, or None when they are gone
    (blob evicted, no store configured)."""

    def __call__(self, sha256: str) -> bytes | None: ...


def grey(data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """Bounded decode (``ImageData``: size, pixel and memory limits; JPEG
    draft) to grey, at most ``WORK_SIDE`` on the short side."""
    im = ImageData(data, limits=limits).thumbnail(WORK_SIDE).convert("L")
    short = min(im.size)
    if short > WORK_SIDE:
        f = WORK_SIDE / short
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BOX)
    return im


def _region(im: Image.Image, box: Box, n: int) -> np.ndarray:
    """``_crop`` blurred 3x3: what the alignment compares."""
    return _box_mean(_crop(im, box, n), 3)


def _crop(im: Image.Image, box: Box, n: int) -> np.ndarray:
    w, h = im.size
    b = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    return np.asarray(im.resize((n, n), Image.Resampling.BILINEAR, box=b), dtype=np.float32)


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """k x k box mean (edges repeated), same shape and dtype: integral image
    in float64 (edges repeated by indexing: ``np.pad`` cost more than the sums)."""
    p = k // 2
    n, m = x.shape
    rows, cols = np.clip(np.arange(-p, n + p), 0, n - 1), np.clip(np.arange(-p, m + p), 0, m - 1)
    c = np.zeros((n + 2 * p + 1, m + 2 * p + 1))
    np.cumsum(x[rows][:, cols], axis=0, out=c[1:, 1:])
    np.cumsum(c[1:, 1:], axis=1, out=c[1:, 1:])
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return (s[:n, :m] / (k * k)).astype(x.dtype)


def _gain(a: np.ndarray, b: np.ndarray) -> float:
    mid = (a > 8) & (a < 247) & (b > 8) & (b < 247)
    return float(b[mid].sum() / max(a[mid].sum(), 1e-6)) if mid.sum() >= 24 else 1.0


def _cost(a: np.ndarray, b: np.ndarray, mean: bool) -> float:
    """Residual of two regions already blurred 3x3 (``_region``)."""
    e = np.abs(a * _gain(a, b) - b)
    if not mean:
        return float(np.median(e))
    ok = (a > 8) & (a < 247) & (b > 8) & (b < 247)
    return float(e[ok].mean()) if ok.sum() > 100 else float(e.mean())


def _align(ims: tuple[Image.Image, Image.Image], boxes: tuple[Box, Box], n: int, scales: tuple[float, ...],
           mean: bool) -> tuple[Box, Box]:
    """Coordinate descent over the eight box edges; fixed order, so deterministic."""
    bx = [list(boxes[0]), list(boxes[1])]
    regs = [_region(ims[0], boxes[0], n), _region(ims[1], boxes[1], n)]  # the side not moved is blurred once
    best = _cost(regs[0], regs[1], mean)
    for scale in scales:
        for side in (0, 1):
            for e in range(4):
                box = bx[side]
                span = box[2] - box[0] if e % 2 == 0 else box[3] - box[1]
                for m in _MOVES:
                    nb = list(box)
                    nb[e] = min(1.0, max(0.0, box[e] + m * scale * span))
                    if nb[2] - nb[0] < _MIN_SIDE or nb[3] - nb[1] < _MIN_SIDE:
                        continue
                    reg = _region(ims[side], (nb[0], nb[1], nb[2], nb[3]), n)
                    c = _cost(reg, regs[1], mean) if side == 0 else _cost(regs[0], reg, mean)
                    if c < best:
                        best, regs[side], bx[side], box = c, reg, nb, nb
    return (bx[0][0], bx[0][1], bx[0][2], bx[0][3]), (bx[1][0], bx[1][1], bx[1][2], bx[1][3])


def _shifted_min(a: np.ndarray, b: np.ndarray, r: int) -> np.ndarray:
    """Per pixel: the smallest |a(p) - b(p + s)| over shifts |s| <= r."""
    n, m = a.shape
    bp = np.pad(b, r, mode="edge")
    out = np.full(a.shape, np.inf, dtype=np.float32)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            np.minimum(out, np.abs(a - bp[r + dy:r + dy + n, r + dx:r + dx + m]), out=out)
    return out


def _compared(box: Box, content: Box | None) -> np.ndarray:
    """(SIDE, SIDE) mask of the region's pixels inside the content and away
    from the frame's caption bands and sides."""
    cx0, cy0, cx1, cy1 = content or (0.0, 0.0, 1.0, 1.0)
    t = (np.arange(SIDE) + 0.5) / SIDE
    ys, xs = box[1] + t * (box[3] - box[1]), box[0] + t * (box[2] - box[0])
    rows = (ys > max(EDGE_BAND, cy0 + 0.01)) & (ys < min(1 - EDGE_BAND, cy1 - 0.01))
    cols = (xs > max(EDGE_SIDE, cx0 + 0.01)) & (xs < min(1 - EDGE_SIDE, cx1 - 0.01))
    return rows[:, None] & cols[None, :]


def local_peak(a: Image.Image, a_box: Box, b: Image.Image, b_box: Box, *, a_content: Box | None = None,
               b_content: Box | None = None) -> float:
    """The largest local mean residual (grey levels) between ``a``'s region
    ``a_box`` and ``b``'s ``b_box`` (fractions of each frame), aligned; see
    the module docstring. ``*_content``: where each image's content sits in
    its frame (``ImageHashes.content_box``; None: the whole frame). A mirrored
    pair is the caller's to flip (image and boxes). 0.0 when nothing is left
    to compare."""
    clipped = clip_pair(a_box, b_box, _MIN_SIDE)
    if clipped is None:
        return 0.0
    boxes = _align((a, b), clipped, _COARSE, (1.0, 0.5, 0.25), mean=False)
    qb, rb = _align((a, b), boxes, _FINE, (0.25, 0.1), mean=True)
    ra, rb_ = _region(a, qb, SIDE), _region(b, rb, SIDE)
    ra = ra * _gain(ra, rb_)
    e = np.maximum(_shifted_min(ra, rb_, SHIFT), _shifted_min(rb_, ra, SHIFT))
    clip = (ra <= _DARK) | (ra >= _BRIGHT) | (rb_ <= _DARK) | (rb_ >= _BRIGHT)
    e = np.where(clip, 0.0, e)
    w = (_compared(qb, a_content) & _compared(rb, b_content)).astype(np.float64)
    k = SIDE // 8
    cover = _box_mean(w, k)
    if not (cover > 0.5).any():
        return 0.0
    local = np.where(cover > 0.5, _box_mean(e * w, k) / np.maximum(cover, 1e-9), 0.0)
    return float(local.max())


def _nbytes(im: Image.Image | None) -> int:
    """Pixel bytes a cached image holds (grey: one a pixel); 0 for None."""
    return 0 if im is None else im.width * im.height * len(im.getbands())


@dataclass
class EditCheck:
    """``local_peak`` for members by sha256, through a ``PixelSource``, with
    a small LRU of decoded images (representatives come back often; at most
    ``max_images`` of them and ``max_image_bytes`` of pixels) and of answers.
    ``runs``/``seconds``: how often and how long it compared."""

    source: PixelSource
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    threshold: float = EDIT_PEAK
    max_images: int = 256  # ~90 KB each for a usual picture (256 x ~350 grey)
    # ``grey`` bounds only the short side: a 16384 x 256 strip is 4 MB, and 256
    # of them 1 GB in a long-running worker. The count alone does not bound
    # memory; this does, at what the count means for usual pictures.
    max_image_bytes: int = 256 * 90 * 1024
    max_answers: int = 4096
    runs: int = 0
    seconds: float = 0.0
    _images: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _image_bytes: int = field(default=0, repr=False)
    _answers: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def image(self, sha256: str) -> Image.Image | None:
        if sha256 in self._images:
            self._images.move_to_end(sha256)
            return self._images[sha256]
        data = self.source(sha256) if sha256 else None
        try:
            im = grey(data, self.limits) if data else None
        except ImageRejected:
            im = None  # the stage already refused such bytes; here: no pixels, today's rule
        self._images[sha256] = im
        self._image_bytes += _nbytes(im)
        # oldest out until both bounds hold (the newest may go too: the
        # caller has it, and a later ask decodes the same pixels again)
        while self._images and (len(self._images) > self.max_images or self._image_bytes > self.max_image_bytes):
            _, gone = self._images.popitem(last=False)
            self._image_bytes -= _nbytes(gone)
        return im

    def is_edit(self, a_sha: str, a_box: Box, a_content: Box | None, b_sha: str, b_box: Box,
                b_content: Box | None, mirror: bool = False) -> bool | None:
        """True: the pair differs in one part of its interior (an edit, not a
        copy); False: it does not; None: pixels of either side missing."""
        # one answer per pair of images (and orientation): the first boxes
        # asked decide, the rest of the pair's hash matches show the same pictures
        key = (a_sha, b_sha, mirror)
        if key in self._answers:
            self._answers.move_to_end(key)
            return self._answers[key]
        t0 = time.perf_counter()
        a, b = self.image(a_sha), self.image(b_sha)
        answer = None
        if a is not None and b is not None:
            if mirror:
                a = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                a_box = (1 - a_box[2], a_box[1], 1 - a_box[0], a_box[3])
                if a_content is not None:
                    a_content = (1 - a_content[2], a_content[1], 1 - a_content[0], a_content[3])
            answer = local_peak(a, a_box, b, b_box, a_content=a_content, b_content=b_content) > self.threshold
            self.runs += 1
        self.seconds += time.perf_counter() - t0
        self._answers[key] = answer
        if len(self._answers) > self.max_answers:
            self._answers.popitem(last=False)
        return answer
