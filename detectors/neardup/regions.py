"""The pixels a pair of codes compares: the region each index slot or query
kind hashes, in its image's thumbnail (content) coordinates, frame-relative
ones mapped through the content box; and the grey levels of one-colour
regions, which have no hash (``ClusterIndex`` pairs them by level).
"""

from __future__ import annotations

import numpy as np

from detectors.hashing import FRAME_CROPS, SIDE_BANDS
from detectors.neardup.pairing import (
    Q_FRAME, Q_FULL, S_BAND0, S_CROP0, S_FRAME0, S_FRAME_FULL, S_FULL, S_SIDE0, S_TRIM,
)
from detectors.neardup.verify import FULL, VIEW_SLOT_BOXES, Box, clip_pair, uniform_levels

ContentBox = tuple[float, float, float, float]  # (x0, y0, x1, y1) of the content in its frame, as fractions


def region_levels(thumb: np.ndarray, content: int) -> tuple[tuple[int, float], ...]:
    """(kind, grey level) of the content (as kind ``content``) and of each
    band view's region that is one colour (``verify.uniform_level``)."""
    kinds = (content, *range(S_BAND0, S_FRAME0))
    return tuple((k, lv) for k, lv in zip(kinds, uniform_levels(thumb, _UNIFORM_BOXES)) if lv is not None)


def uniform_pair(q_kind: int, m_slot: int) -> bool:
    """May one-colour regions of these kinds pair? Content with anything,
    a band with the same band (as hashes pair)."""
    return q_kind in (Q_FULL, S_TRIM) or m_slot in (S_FULL, S_TRIM) or q_kind == m_slot


def uniform_match(a: tuple[tuple[int, float], ...], b: tuple[tuple[int, float], ...]) -> tuple[float, int, int] | None:
    """(level difference, kind, slot) of the closest allowed pair of
    one-colour regions, or None."""
    pairs = [(abs(la - lb), ka, kb) for ka, la in a for kb, lb in b if uniform_pair(ka, kb)]
    return min(pairs) if pairs else None


def slot_box(kind: int) -> Box:
    """The content region a query kind or index slot hashes (``verify``)."""
    if kind >= S_SIDE0:
        return SIDE_BANDS[kind - S_SIDE0]
    return VIEW_SLOT_BOXES[kind - S_CROP0] if kind >= S_CROP0 else FULL


# the regions ``region_levels`` measures: the content, then the band views
_UNIFORM_BOXES = (FULL, *(slot_box(k) for k in range(S_BAND0, S_FRAME0)))

FRAME_BOXES: dict[int, Box] = {
    S_FRAME0 + i: ((1 - f) / 2, (1 - f) / 2, (1 + f) / 2, (1 + f) / 2) for i, f in enumerate(FRAME_CROPS)
} | {Q_FRAME: FULL, S_FRAME_FULL: FULL}


def region(kind: int, box: ContentBox | None) -> Box:
    """The region a kind or slot hashes in its image's thumbnail (content)
    coordinates; frame-relative ones mapped through the content box, so they
    may reach outside [0, 1] (the trimmed margin)."""
    b = FRAME_BOXES.get(kind)
    if b is None:
        return slot_box(kind)
    if box is None:
        return b
    cx0, cy0, cx1, cy1 = box
    cw, ch = max(cx1 - cx0, 1e-6), max(cy1 - cy0, 1e-6)
    return ((b[0] - cx0) / cw, (b[1] - cy0) / ch, (b[2] - cx0) / cw, (b[3] - cy0) / ch)


# Of each side of a frame-relative pair, the part that must lie on both
# thumbnails. A dark picture whose lights sit in a band trims to a strip
# (the bench's casino at night: a 90% crop's content is 29% of its frame's
# height), so its whole frame met its own screenshot's and crops' on a
# strip just under the 30% of sessions 6-9 (session 10: 0.2; seeds 2/3
# splits, docs/clusters.md)
MIN_OVERLAP = 0.2


def pair_regions(q_box: ContentBox | None, r_box: ContentBox | None, kind: int, slot: int,
                 min_overlap: float = MIN_OVERLAP) -> tuple[Box, Box] | None:
    """The regions a query kind and a representative slot compare, in each
    one's content coordinates (``q_box``, ``r_box``: each side's content box
    in its frame, for frame-relative codes); frame-relative pairs clipped
    alike to what lies on both (None: too little)."""
    qb, rb = region(kind, q_box), region(slot, r_box)
    if kind in FRAME_BOXES or slot in FRAME_BOXES:
        return clip_pair(qb, rb, min_overlap)
    return qb, rb


def in_frame(b: Box, content: ContentBox | None) -> Box:
    """A region in content (thumbnail) coordinates as fractions of the frame."""
    if content is None:
        return b
    cw, ch = content[2] - content[0], content[3] - content[1]
    return (content[0] + b[0] * cw, content[1] + b[1] * ch, content[0] + b[2] * cw, content[1] + b[3] * ch)
