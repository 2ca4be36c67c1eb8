"""Perceptual hashes of an image: pHash (64 bit) and PDQ (256 bit, with its
quality score), plus the same hashes of the mirrored image so a horizontally
flipped repost can be found by querying with both.

Speed: decoding is the floor, so everything is computed from *one* JPEG
draft-mode thumbnail (``ImageData.thumbnail``, >= 128 px short side, decoded
at 1/2..1/8 scale straight from the DCT coefficients). The mirrored hashes are
nearly free:

* pHash: mirroring the 32x32 input reverses its columns, which flips the sign
  of every odd-column DCT coefficient and leaves the rest alone, so the mirror
  hash is the same 8x8 block with signs flipped and its own median: no second
  resize or DCT.
* PDQ: ``pdqhash.compute_float`` gives PDQ's 16x16 float DCT; the hash is it
  against its median and the mirror is the same block with the odd columns'
  signs flipped -- exactly ``pdqhash.compute_dihedral``'s index 5, which flips
  PDQ's 64x64 downsampled buffer. PDQ's box filter is not quite
  mirror-symmetric, so it is within a few bits of PDQ-of-the-flipped-pixels
  (0 on most photos, up to ~30 on synthetic high-frequency patterns), not
  bit-exact; the mirror recall in ``bench/neardup.py`` measures the effect.

Crops and screenshots: ``views`` adds the pHash of the content inside a
detected screenshot frame / letterbox / padding / caption bar
(``content_box``), of centre and off-centre crops and of bands; all of them
come from one 128 px box-filtered copy of the content in one batched product
(``_view_lows``), with a 32x32 grey thumbnail of the content
(``ImageHashes.thumb``) that ``detectors.neardup.verify`` checks hash matches
on. ``view_hashes``/``view_phash`` are the exact per-view reference (Lanczos
on the whole thumbnail), kept for tests and ``bench/hashing.py``.

``phash_pair`` is bit-compatible with ``imagehash.phash`` (grey, 32x32
Lanczos, type-II DCT, 8x8 low frequencies > their median, same bit order),
checked in tests; ``hashes_of`` computes the same hash with PIL's resampling
weights folded into the DCT, from the work copy (within 2 bits at p99 of the
exact per-view path on the shared images), so hashes exchanged with other
tools stay comparable.
"""

from __future__ import annotations

import base64
from functools import lru_cache

import numpy as np
import pdqhash
from PIL import Image

from detectors.hash_record import ImageHashes  # noqa: F401 - re-exported: the record hashes_of returns
from detectors.imagedata import ImageData

_PDQ_ODD_COLS = np.where(np.arange(16) % 2 == 1, -1.0, 1.0)[None, :]  # PDQ's DCT rows are frequencies 1..16
_HASH_SIDE = 32
_LOW = 8
_THUMB_SIDE = 128


def _dct_rows(n: int, k: int) -> np.ndarray:
    """First ``k`` rows of the unnormalised type-II DCT matrix (scipy's default
    scaling up to a positive constant, which does not change which side of the
    median a coefficient falls)."""
    x = np.arange(n)
    return np.cos(np.pi * np.arange(k)[:, None] * (2 * x[None, :] + 1) / (2 * n))


_D = _dct_rows(_HASH_SIDE, _LOW)
_ODD_COLS = np.where(np.arange(_LOW) % 2 == 1, -1.0, 1.0)[None, :]


def _median(block: np.ndarray) -> float:
    """np.median of an even-sized block, the same arithmetic (mean of the two
    middle values) without np.median's per-call overhead."""
    s = np.sort(block, axis=None)
    k = len(s) // 2
    return (s[k - 1] + s[k]) / 2


def _bits_hex(bits: np.ndarray) -> str:
    return np.packbits(np.asarray(bits, dtype=np.uint8).reshape(-1)).tobytes().hex()


def phash_pair(image: Image.Image) -> tuple[str, str]:
    """(pHash, pHash of the mirror image) from one resize and one DCT."""
    return _phash_pair_grey(image.convert("L"))


def _phash_pair_grey(grey: Image.Image) -> tuple[str, str]:
    pixels = np.asarray(grey.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _D @ pixels @ _D.T
    mirrored = low * _ODD_COLS
    return _bits_hex(low > _median(low)), _bits_hex(mirrored > _median(mirrored))


def pdq_pair(image: Image.Image) -> tuple[str, str, int]:
    """(PDQ, PDQ of the mirror image, quality) from one pdqhash call: the float
    16x16 DCT (``compute_float``) thresholded at its median is PDQ, and with
    the odd columns' signs flipped it is the mirror, bit for bit what
    ``compute_dihedral`` returns at index 5 (it flips the 64x64 buffer; checked
    in tests), for ~0.2 ms less: no eight variants to build."""
    values, quality = pdqhash.compute_float(np.asarray(image))
    v = values.reshape(16, 16)
    m = v * _PDQ_ODD_COLS
    return _bits_hex(v > _median(v)), _bits_hex(m > _median(m)), int(quality)


def hashes_of(image: Image.Image) -> ImageHashes:
    """Hashes of an already decoded RGB image (e.g. a thumbnail).

    One grey conversion, one frame detection, then one ``_WORK`` x ``_WORK``
    box-filtered copy of the content (the picture inside a detected frame, or
    the whole image) from which every view's pHash comes in one batched
    product (``_view_lows``) and the verification thumbnail (``thumb``) by
    block averaging. A framed image needs one more small copy for its
    full-frame pHash. The pHash here is Lanczos-3 resampling folded into the
    DCT (see ``_dct_resample``) of that copy: within a few bits of
    ``phash_pair`` (imagehash-compatible), and exactly consistent with the
    crop views."""
    with _one_blas_thread():
        return _hashes_of(image)


def _hashes_of(image: Image.Image) -> ImageHashes:
    grey_img = image.convert("L")
    grey = np.asarray(grey_img, dtype=np.float32)
    box = content_box(grey)
    trimmed = box is not None
    content = _work(grey_img, box)
    lows = _view_lows(content)
    codes = _codes(lows)
    mirror = _codes(lows[:1] * _ODD_COLS)[0]  # of the content: a framed copy's mirror is its picture's
    main, sides = codes[: 1 + N_VIEWS], codes[1 + N_VIEWS :]
    if trimmed:
        frame = _codes(_view_lows(_work(grey_img, None), first=1 + len(FRAME_CROPS)))
        phash = frame[0]
        # views[0]: the trimmed content; then the content's views, the
        # whole frame's centre crops, the content's side bands
        views = main + frame[1:] + sides
    else:
        phash, views = main[0], main[1:] + sides
    pdq, pdq_m, quality = pdq_pair(image)
    return ImageHashes(
        phash=phash, pdq=pdq, pdq_quality=quality, phash_mirror=mirror, pdq_mirror=pdq_m, views=views,
        trimmed=trimmed, thumb=_thumb_b64(content), content_box=frame_fractions(box, grey.shape) if box else None,
    )


@lru_cache(maxsize=1)
def _blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _one_blas_thread():
    """These products are tiny (~2 MFLOP): OpenBLAS splitting them over
    threads on a busy 2-core machine made one 96x96 @ 96x200 product take
    2-60 ms instead of 40 us (measured). ~9 us to set and restore."""
    return _blas().limit(limits=1)


_WORK = 128  # side of the box-filtered copy all views are cut from (the thumbnail scale; 96 drifted 4 bits at p99)


def _work(grey: Image.Image, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """The content box (or whole image) as a ``_WORK`` square, box-filtered:
    one C resize, after which every view box is a fixed fraction."""
    return np.asarray(grey.resize((_WORK, _WORK), Image.Resampling.BOX, box=box), dtype=np.float32)


@lru_cache(maxsize=2)
def _view_bank(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(V, 8, n) row and (V * 8, n) column matrices of every view box of an
    ``n`` square (the whole square first, then ``VIEW_CROPS`` centre crops,
    then ``VIEW_BOXES``, then ``SIDE_BANDS``): fixed, so built once."""
    boxes = [(0.0, 0.0, 1.0, 1.0)] + [((1 - f) / 2, (1 - f) / 2, (1 + f) / 2, (1 + f) / 2) for f in VIEW_CROPS]
    boxes += list(VIEW_BOXES) + list(SIDE_BANDS)
    rows = np.stack([_dct_resample(n, y0 * n, y1 * n) for _, y0, _, y1 in boxes]).astype(np.float32)
    cols = np.concatenate([_dct_resample(n, x0 * n, x1 * n) for x0, _, x1, _ in boxes]).astype(np.float32)
    return rows, cols


def _view_lows(square: np.ndarray, first: int | None = None) -> np.ndarray:
    """(V, 8, 8) low DCT blocks of every view of a ``_WORK`` square at once:
    one (n x n) @ (n x 8V) product, then a batched (8 x n) @ (n x 8) per view
    (only the ``first`` views -- the whole square, then centre crops -- when given)."""
    rows, cols = _view_bank(square.shape[0])
    if first is not None:
        rows, cols = rows[:first], cols[: first * _LOW]
    t = (square @ cols.T).reshape(square.shape[0], len(rows), _LOW).transpose(1, 0, 2)
    return rows @ t


def _codes(lows: np.ndarray) -> list[str]:
    """pHash hex of each (8, 8) block: bits above the block's median."""
    flat = lows.reshape(len(lows), -1)
    s = np.sort(flat, axis=1)
    k = flat.shape[1] // 2
    bits = flat > ((s[:, k - 1] + s[:, k]) / 2)[:, None]
    return [b.tobytes().hex() for b in np.packbits(bits, axis=1)]


THUMB_SIDE = 32


def _thumb_b64(square: np.ndarray) -> str:
    """``THUMB_SIDE`` square grey thumbnail of the content (block means of the
    work copy), base64 of uint8: what ``detectors.neardup`` verifies a hash
    match on (``thumb_array``)."""
    k = square.shape[0] // THUMB_SIDE
    t = square.reshape(THUMB_SIDE, k, THUMB_SIDE, k).mean(axis=(1, 3))
    return base64.b64encode(np.clip(np.rint(t), 0, 255).astype(np.uint8).tobytes()).decode()


def thumb_array(thumb: str, dtype: type = np.float32) -> np.ndarray:
    """``ImageHashes.thumb`` back to a (THUMB_SIDE, THUMB_SIDE) array (float32,
    or uint8 to keep: 1 KB)."""
    raw = np.frombuffer(base64.b64decode(thumb), dtype=np.uint8)
    return raw.astype(dtype).reshape(THUMB_SIDE, THUMB_SIDE)


# ------------------------------------------------------------------ views
# Global DCT hashes move ~10 bits under a 90% crop and ~20 under an 80% one,
# and a screenshot frame shifts and shrinks the picture the same way. So each
# image also carries the pHash of a few *views*: the content inside a detected
# border (screenshot frame, letterbox, padding) and centre crops of the
# content. A repost that is a crop of an indexed picture then matches one of
# the picture's views with its full hash, and a repost that *adds* a frame
# matches with its trimmed view. Each view is one (8 x h) @ (h x w) @ (w x 8)
# product: Lanczos-3 resampling of the view box to 32 x 32 (PIL's weights,
# without its uint8 rounding) folded into the 8 low DCT rows, so views cost
# microseconds and need no extra resize.
VIEW_CROPS = (0.9, 0.8)
# A trimmed image's views end with centre crops of its *whole frame* (the
# first ``FRAME_CROPS`` of ``VIEW_CROPS``) and its content box
# (``ImageHashes.content_box``): a picture with a flat margin of its own trims
# differently in every copy (a crop cuts the margin away, a caption bar
# meets it), and these let a copy meet it relative to the untrimmed frame,
# verified on pixels mapped through the box (``detectors.neardup``).
FRAME_CROPS = VIEW_CROPS
# Bump when what ``hashes_of`` computes changes (caches of hashes key on it).
HASHES_VERSION = 7  # 7: side bands (``SIDE_BANDS``), rows trimmed inside the columns flat as an edge, border layers; 6: trimmed images carry their frame's centre crops and content box; 5: screenshot caption lines trimmed
# Off-centre views (x0, y0, x1, y1 as fractions of the content box), after the
# centre crops: 90% and 85% crops on a 3x3 grid of offsets, and the picture without a top / bottom /
# both bands -- what remains when a caption bar covers up to 1/6 of a repost.
# Such a repost's own trimmed view (the bar detected as border) or its full
# hash then meets one of these on the indexed picture, and the other way round.
VIEW_BANDS = ((0.0, 0.0, 1.0, 7 / 8), (0.0, 1 / 8, 1.0, 1.0), (0.0, 1 / 12, 1.0, 11 / 12), (0.0, 0.0, 1.0, 5 / 6), (0.0, 1 / 6, 1.0, 1.0))
VIEW_BOXES = tuple(
    (ox * (1 - f) / 2, oy * (1 - f) / 2, ox * (1 - f) / 2 + f, oy * (1 - f) / 2 + f)
    for f in (0.9, 0.85) for oy in (0, 1, 2) for ox in (0, 1, 2) if (f, ox, oy) != (0.9, 1, 1)
) + VIEW_BANDS
# Side bands (``HASHES_VERSION`` 7): the content without a tenth or 15% of
# its left or right side -- an off-centre crop of a picture with a flat
# top/bottom margin of its own cuts one side only once trimmed (the cluster
# bench's 85% bottom-right crop of a face on a flat backdrop met no view
# within 8 bits; its side band within 0-4). Stored after the frame crops
# (``side_views``): records before version 7 have none and match as before.
SIDE_BANDS = ((0.1, 0.0, 1.0, 1.0), (0.15, 0.0, 1.0, 1.0), (0.0, 0.0, 0.9, 1.0), (0.0, 0.0, 0.85, 1.0))
_TRIM_TOL = 3.0  # grey levels: a border line's pixels are this close to its median (screenshot UI and letterbox bars are flat to 1-2 levels after JPEG)
_TRIM_LINE = 2 / 3  # fraction of a line near its median for it to count as border (text on a flat background)
_TRIM_EDGE = 0.95  # the outermost line must be this flat for a side to be trimmed at all
_TRIM_MIN = 0.03  # a trim removing less than this of the width and the height is no border
_TRIM_BAR = 0.2  # a caption bar with text is trimmed up to this fraction of the side (captions up to 1/6)
_TRIM_BARISH = 0.12  # a text row of a caption bar (downscaled: glyphs blur to grey): this much of it in the bar colour
_TRIM_TEXT_EDGE = 0.6  # an outer line of text on a bar: this much of it in the bar colour ...
_TRIM_FLAT_RUN = 3  # ... and this many lines of that colour within the bar's reach
_TRIM_STRIP = 0.85  # ... each this much in it (JPEG rings next to the text)
_TRIM_GLYPHS = 0.5  # ... after a line less than this much in it (glyphs)
_TRIM_UI_LIGHT, _TRIM_UI_DARK = 235.0, 30.0  # ... in a UI colour (light or dark mode), not a picture's sky
# the content must keep at least this much squared of the area, and half of
# it of each side (a small picture letterboxed keeps less than this of its width)
_TRIM_KEEP = 0.3
_TRIM_LAYER = 12.0  # grey levels between the medians of two border lines that make them two layers (``_flat_run``)


@lru_cache(maxsize=4096)
def _dct_resample(n_in: int, lo: float, hi: float) -> np.ndarray:
    """(8, n_in): the 8 low DCT rows applied to Lanczos-3 resampling of input
    positions [lo, hi) to 32 samples (PIL's weights for ``resize`` with ``box``).
    Cached: thumbnails come in a few sizes and crop boxes are fixed fractions."""
    scale = (hi - lo) / _HASH_SIDE
    support = max(scale, 1.0)
    centres = lo + (np.arange(_HASH_SIDE) + 0.5) * scale
    t = (np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / support
    w = np.where(np.abs(t) < 3, np.sinc(t) * np.sinc(t / 3), 0.0)
    out = _D @ (w / w.sum(axis=1, keepdims=True))
    out.flags.writeable = False
    return out


def view_phash(grey: np.ndarray, box: tuple[float, float, float, float]) -> str:
    """pHash of ``grey[y0:y1, x0:x1]`` (box = x0, y0, x1, y1, float), as if cropped and hashed."""
    x0, y0, x1, y1 = box
    h, w = grey.shape
    low = _dct_resample(h, y0, y1) @ grey @ _dct_resample(w, x0, x1).T
    return _bits_hex(low > _median(low))


def _flat_run(lines: np.ndarray, text_bars: bool = False) -> tuple[int, int]:
    """How many leading and trailing rows of ``lines`` look like border: flat,
    or flat with sparse text on it (most pixels near the line's median)."""
    n, m = lines.shape
    med = np.partition(lines[:, ::2], m // 4, axis=1)[:, m // 4]  # median of every other pixel
    near = (np.abs(lines - med[:, None]) <= _TRIM_TOL).mean(axis=1)
    # the line's own colour must reach both ends: a row through a picture
    # framed by margins of another colour ([margin | flat sky | margin]) is
    # content, not border
    ends = np.maximum(np.abs(lines[:, 0] - med), np.abs(lines[:, -1] - med)) <= 2 * _TRIM_TOL
    flat = (near >= _TRIM_LINE) & ends

    def layered(f: np.ndarray, nr: np.ndarray, md: np.ndarray) -> np.ndarray:
        # A line of another colour than the one before it starts a new layer
        # (a letterbox's black bar, then the picture's own light margin), and
        # must be as flat as an outer edge: the picture's edge inside a frame
        # trims as it would standalone, not at the looser inner bound, which
        # cut letterboxed copies into their picture (HASHES_VERSION 7)
        brk = np.abs(np.diff(md, prepend=md[:1])) > _TRIM_LAYER
        return f & (~brk | (nr >= _TRIM_EDGE))

    def run(f: np.ndarray, edge: float, colour: float, ls: np.ndarray) -> int:
        # The outermost line must be flat -- or, for a text bar reaching the
        # edge (a screenshot's caption line under a small picture), mostly
        # its colour with a run of truly flat lines within the bar's reach
        text_end = 0
        if edge < _TRIM_EDGE:
            ui = colour >= _TRIM_UI_LIGHT or colour <= _TRIM_UI_DARK
            text_end = _text_bar_end(ls, colour) if text_bars and ui and edge >= _TRIM_TEXT_EDGE else 0
            if not text_end:
                return 0
        n_flat = len(f) if f.all() else int(np.argmin(f))
        # A caption bar with large text: the text rows are not flat, but the
        # bar's colour still fills a good part of them and the bar's last
        # rows (under the text) are flat again. Extend through such rows to
        # the last flat one, within _TRIM_BAR of the side.
        span = ls[: max(1, int(len(ls) * _TRIM_BAR))]
        barish = (np.abs(span - colour) <= _TRIM_TOL).mean(axis=1) >= _TRIM_BARISH
        k = len(barish) if barish.all() else int(np.argmin(barish))
        last = np.flatnonzero(f[:k])
        return max(n_flat, text_end, int(last[-1]) + 1 if len(last) else 0)

    return (run(layered(flat, near, med), near[0], med[0], lines),
            run(layered(flat[::-1], near[::-1], med[::-1]), near[-1], med[-1], lines[::-1]))


def _text_bar_end(lines: np.ndarray, colour: float) -> int:
    """Where a text bar at the edge ends: past the first run of
    ``_TRIM_FLAT_RUN`` or more lines all in ``colour`` (the strip between the
    text and the picture) within ``_TRIM_BAR`` of the side; 0 when there is none."""
    span = lines[: max(1, int(len(lines) * _TRIM_BAR))]
    share = (np.abs(span - colour) <= _TRIM_TOL).mean(axis=1)
    flat = np.append(share >= _TRIM_STRIP, False)
    # starts and ends of flat runs
    d = np.diff(np.concatenate([[0], flat.astype(np.int8)]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    long = np.flatnonzero(ends - starts >= _TRIM_FLAT_RUN)
    if not len(long):
        return 0
    # and a line of glyphs before it: a dark picture's starry or hazy edge
    # (mostly its colour, never mostly something else) is no text bar
    s0 = int(starts[long[0]])
    return int(ends[long[0]]) if s0 and share[:s0].min() < _TRIM_GLYPHS else 0


def _near_median(lines: np.ndarray) -> np.ndarray:
    """Per line: the fraction of its pixels within the tolerance of its median."""
    m = lines.shape[1]
    med = np.partition(lines, m // 2, axis=1)[:, m // 2 : m // 2 + 1]
    return (np.abs(lines - med) <= _TRIM_TOL).mean(axis=1)


def _strict_run(lines: np.ndarray) -> tuple[int, int]:
    """How many leading and trailing rows of ``lines`` are flat as an outer
    edge: ``_TRIM_EDGE`` of the row near its median, that colour at both ends."""
    m = lines.shape[1]
    med = np.partition(lines, m // 2, axis=1)[:, m // 2]
    near = (np.abs(lines - med[:, None]) <= _TRIM_TOL).mean(axis=1)
    ends = np.maximum(np.abs(lines[:, 0] - med), np.abs(lines[:, -1] - med)) <= 2 * _TRIM_TOL
    ok = (near >= _TRIM_EDGE) & ends
    if ok.all():
        return len(ok), 0
    return int(np.argmin(ok)), int(np.argmin(ok[::-1]))


def content_box(grey: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the picture inside a uniform or near-uniform frame
    (screenshot margins and bars, letterboxing, padding; in the first row
    pass also a UI-coloured text bar reaching the edge, ``_text_bar_end``),
    or None when there is no such frame. Rows first (measured inside the
    outer columns flat as an edge), then columns within the kept rows, then
    rows again within the kept columns (a frame's side bars make its rows
    busy); columns first when every row is border. The content keeps at
    least 9% of the frame's area and 15% of each side (was 30% of each: a
    small picture letterboxed)."""
    h, w = grey.shape
    if max(_near_median(grey[[0, -1]]).max(), _near_median(grey[:, [0, -1]].T).max()) < _TRIM_EDGE:
        return None  # no flat outer line: no frame (most pictures stop here)
    # text bars only as whole rows of the image (a caption line over or under
    # the picture): in the column and second row passes the rule cut into
    # pictures with a flat-ish side (11-22 of 637 caption-bar copies)
    # rows measured inside the columns flat as an edge (a letterbox's bars):
    # else a dark picture's rows count as border for the bars beside them,
    # and its letterboxed copy trims into it (HASHES_VERSION 7)
    bars = _strict_run(grey.T)
    if sum(bars) >= w:
        return None
    top, bottom = _flat_run(grey[:, bars[0] : w - bars[1]], text_bars=True)
    if top + bottom < h:
        left, right = _flat_run(grey[top : h - bottom].T)
        if left + right >= w:
            return None
        top2, bottom2 = _flat_run(grey[top : h - bottom, left : w - right])
        top, bottom = top + top2, bottom + bottom2
    else:
        # every row is mostly border: a small picture on a background of its
        # own colour, letterboxed (black bars, black backdrop) -- its columns
        # first, then rows within them, then columns again (HASHES_VERSION 7)
        left, right = _flat_run(grey.T)
        if left + right >= w:
            return None
        top, bottom = _flat_run(grey[:, left : w - right])
        if top + bottom >= h:
            return None
        left2, right2 = _flat_run(grey[top : h - bottom, left : w - right].T)
        left, right = left + left2, right + right2
    x0, y0, x1, y1 = left, top, w - right, h - bottom
    fx, fy = (x1 - x0) / w, (y1 - y0) / h
    if fx * fy < _TRIM_KEEP**2 or min(fx, fy) < _TRIM_KEEP / 2:
        return None  # (nearly) flat image: nothing to trim to
    if (w - (x1 - x0)) < _TRIM_MIN * w and (h - (y1 - y0)) < _TRIM_MIN * h:
        return None
    return x0, y0, x1, y1


N_VIEWS = len(VIEW_CROPS) + len(VIEW_BOXES)  # content views of every record (after a trimmed view)


def frame_fractions(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """A content box in pixels as fractions of the frame (``ImageHashes.content_box``)."""
    h, w = shape[:2]
    return tuple(round(min(1.0, max(0.0, v)), 5) for v in (box[0] / w, box[1] / h, box[2] / w, box[3] / h))  # type: ignore[return-value]


def frame_extras(views: list[str] | None, trimmed: bool) -> list[str] | None:
    """The whole frame's centre-crop views of a trimmed record from
    ``HASHES_VERSION`` 6 on (its ``content_box`` says where the content
    sits); None for other records (untrimmed, or made before: they match as
    before)."""
    if not trimmed or not views or len(views) not in (1 + N_VIEWS + len(FRAME_CROPS), _N_TRIMMED):
        return None
    return views[1 + N_VIEWS : 1 + N_VIEWS + len(FRAME_CROPS)]


_N_TRIMMED = 1 + N_VIEWS + len(FRAME_CROPS) + len(SIDE_BANDS)  # views of a trimmed record from version 7 on


def side_views(views: list[str] | None, trimmed: bool) -> list[str]:
    """The side-band views (``SIDE_BANDS``) of a record from ``HASHES_VERSION``
    7 on, the last of its views; none for older records."""
    if not views or len(views) != (_N_TRIMMED if trimmed else N_VIEWS + len(SIDE_BANDS)):
        return []
    return views[-len(SIDE_BANDS) :]


def view_hashes(grey: np.ndarray) -> tuple[list[str], bool]:
    """(views, trimmed) of a grey image array: see ``ImageHashes.views``."""
    h, w = grey.shape
    box = content_box(grey)
    trimmed = box is not None
    x0, y0, x1, y1 = (float(v) for v in box) if box else (0.0, 0.0, float(w), float(h))
    views = [view_phash(grey, (x0, y0, x1, y1))] if trimmed else []
    for frac in VIEW_CROPS:
        dx, dy = (x1 - x0) * (1 - frac) / 2, (y1 - y0) * (1 - frac) / 2
        views.append(view_phash(grey, (x0 + dx, y0 + dy, x1 - dx, y1 - dy)))
    cw, ch = x1 - x0, y1 - y0
    for bx0, by0, bx1, by1 in VIEW_BOXES:
        views.append(view_phash(grey, (x0 + bx0 * cw, y0 + by0 * ch, x0 + bx1 * cw, y0 + by1 * ch)))
    if box:
        for frac in FRAME_CROPS:
            dx, dy = w * (1 - frac) / 2, h * (1 - frac) / 2
            views.append(view_phash(grey, (dx, dy, w - dx, h - dy)))
    for bx0, by0, bx1, by1 in SIDE_BANDS:
        views.append(view_phash(grey, (x0 + bx0 * cw, y0 + by0 * ch, x0 + bx1 * cw, y0 + by1 * ch)))
    return views, trimmed


def compute_hashes(image: ImageData) -> ImageHashes:
    return hashes_of(_small(image.thumbnail(_THUMB_SIDE)))


def _small(image: Image.Image) -> Image.Image:
    """Non-JPEG sources get no draft decode and arrive full size; a box
    ``reduce`` to >= 128 px keeps resize/PDQ cost flat (hashes move 0-2 bits)."""
    factor = min(image.size) // _THUMB_SIDE
    return image.reduce(factor) if factor >= 2 else image


def hamming_hex(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()
