"""The hash pair rule: the pHash codes an image carries, the index slots
they take, and which pairs of them may meet.

Pair rule (the one ``bench/neardup.py`` measures, ``pair_match``): an image
matches another when

* its pHash, or the pHash of its mirror image, is within ``phash_threshold``
  bits of the other's pHash, or
* its PDQ (or mirrored PDQ) is within ``pdq_threshold`` bits of the other's
  PDQ *and both* PDQ qualities are >= ``pdq_min_quality`` (PDQ of flat,
  low-detail images is noise).

Views (crops, screenshots, captions): an image also carries the pHashes of
*views* (``ImageHashes.views``: the content inside a detected frame, centre
crops, off-centre crops, bands without the top/bottom edge). A pair also
matches, within ``view_threshold`` bits, when

* the image's pHash (or mirrored pHash) equals one of the other's views (the
  image is a crop of it, or it a framed copy of the image), or the other way
  round,
* a *trimmed-frame* view on either side equals any code on the other (two
  screenshots of one picture; a screenshot of a crop), or
* a band view equals the *same* band on the other (a caption bar over an edge).

Other crop views never meet crop views (more pairs, more false matches).
Side bands (hashes v7: the content without a tenth or 15% of one side) pair
like bands; in ``ClusterIndex`` such a pair must agree almost everywhere
on informative pixels, and may join an image but never link two clusters
or make an anchor trusted (a band leaves out where two pictures differ);
the hash-only rule leaves them out (``pixels_only``).
Framed images (``is_framed``) never match on their full-frame hashes as an
unframed picture's (they show the frame); their mirror code is their trimmed view's.

Frame-relative codes (hash records v6, ``hashing.frame_extras``): a
trimmed image also carries its whole frame's pHash and centre crops and its
content box, because a picture with a flat margin of its own trims
differently in every copy. Its whole frame may meet crop views, other
whole frames and (v7) full frames -- a brightened copy whose backdrop
saturates to a flat margin trims where its picture does not -- its frame
crops meet full frames and trimmed views -- only in
``ClusterIndex``, with pixels compared through each side's content box
(``regions.region``, ``verify.clip_pair``); the hash-only rule leaves them out
(``frame_relative``).


``ClusterIndex`` (``detectors.neardup.clusters``) applies this rule through
its index and adds what needs pixels: the pairs left out here
(``pixels_only``), flat and one-colour pictures. Banks and ``deepwatch
similar`` search stored codes with ``search_phash``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from detectors.hashing import (
    FRAME_CROPS, N_VIEWS, VIEW_BANDS, VIEW_BOXES, VIEW_CROPS, ImageHashes, frame_extras, hamming_hex, side_views,
)
from detectors.neardup.hamming import HammingIndex
from detectors.signals import PDQ, PHash

# "uniform": a one-colour picture met by its grey level (``ClusterIndex``
# only; the distance is grey levels): its hashes are noise
Via = Literal["sha256", "phash", "pdq", "phash_mirror", "pdq_mirror", "phash_view", "uniform"]
VIA_ORDER: dict[str, int] = {"sha256": 0, "phash": 1, "pdq": 2, "phash_mirror": 3, "pdq_mirror": 4, "phash_view": 5,
                              "uniform": 6}


def rank_key(distance: int, via: str, phash_threshold: int, pdq_threshold: int) -> tuple[float, int]:
    """How confidently a match is the same picture, most confident first:
    distance as a fraction of its hash's threshold, then how it matched.
    Clusters, banks and `deepwatch similar` all rank with this."""
    scale = 1 if via == "sha256" else pdq_threshold if via in ("pdq", "pdq_mirror") else phash_threshold
    return (distance / max(1, scale), VIA_ORDER[via])

# Default pair rule: pHash (of 64 bits) and PDQ (of 256) distances within
# which two images are one picture, and the PDQ quality both need for a PDQ
# pair to count: the signal types' defaults (``detectors.signals``), which
# ``pair_match``, ``ClusterIndex``, ``BankStore`` and the settings share.
PHASH_THRESHOLD = PHash.default_threshold
PDQ_THRESHOLD = PDQ.default_threshold
PDQ_MIN_QUALITY = PDQ.default_min_quality

# Default radius for pHash pairs that involve a view: the bench's sweep finds no
# extra false matches up to 9 bits (0.0015% -> 0.0028% at 10), and 8 lets the
# multi-index search probe 2-bit instead of 3-bit neighbourhoods (~7x fewer keys)
VIEW_THRESHOLD = 8


# pHash index slots per member: id = row * SLOTS + slot
SLOTS = 40
S_FULL, S_TRIM, S_CROP0 = 0, 1, 2  # centre crops take slots 2, 3; off-centre views 4..25
S_BAND0 = S_CROP0 + len(VIEW_CROPS) + len(VIEW_BOXES) - len(VIEW_BANDS)  # the band views' slots (caption bars)
# A trimmed image (hashes v6 on, ``frame_extras``): its whole frame's centre
# crops (slots 26, 27, crop views in frame coordinates) and its whole frame's
# pHash (slot 28, indexed with the full frames). Pixels of pairs that involve
# them are compared mapped through each side's content box (``regions.region``).
S_FRAME0 = S_BAND0 + len(VIEW_BANDS)
S_FRAME_FULL = S_FRAME0 + len(FRAME_CROPS)
# Side bands (hashes v7, ``SIDE_BANDS``): slots 29-32, paired like bands
# (with full frames and trimmed views, and the same side band)
S_SIDE0 = S_FRAME_FULL + 1
Q_FULL, Q_MIRROR, Q_FRAME = -1, -2, -3  # query-side kinds besides the view slots (Q_FRAME: a trimmed image's whole frame)
FULL_KINDS = (Q_FULL, Q_MIRROR, Q_FRAME)


def view_slots(views: list[str] | None, trimmed: bool) -> list[tuple[int, str]]:
    """(slot, pHash) of an image's views (``ImageHashes.views``/``trimmed``), in index slots."""
    extras = frame_extras(views, trimmed)
    views = views_all = views or []
    out: list[tuple[int, str]] = []
    if trimmed and views:
        out.append((S_TRIM, views[0]))
        views = views[1:]
    if extras:
        out.extend((S_CROP0 + i, v) for i, v in enumerate(views[:N_VIEWS]))
        out.extend((S_FRAME0 + i, v) for i, v in enumerate(extras))
    else:
        out.extend((S_CROP0 + i, v) for i, v in enumerate(views[: S_FRAME0 - S_CROP0]))
    out.extend((S_SIDE0 + i, v) for i, v in enumerate(side_views(views_all, trimmed)))
    return out


def _allowed_table() -> np.ndarray:
    """(query kind + 3, slot) -> may they pair (``pair_allowed``)."""
    t = np.zeros((SLOTS + 3, SLOTS), dtype=bool)
    for qk in range(-3, SLOTS):
        for ms in range(SLOTS):
            crop_q, crop_m = qk >= S_CROP0, S_CROP0 <= ms < S_FRAME_FULL or ms >= S_SIDE0
            band_same = qk == ms and (S_BAND0 <= qk < S_FRAME0 or qk >= S_SIDE0)
            if ms == S_FRAME_FULL:  # a trimmed image's whole frame: its crops, another whole frame or a full one
                ok = crop_q or qk in (Q_FRAME, Q_FULL)
            elif qk == Q_FRAME:  # a trimmed image's whole frame: crops or the full frame of any picture
                ok = crop_m or ms == S_FULL
            elif S_FRAME0 <= ms < S_FRAME_FULL:  # a trimmed image's frame crops: full frames (not mirrored) and trimmed views
                ok = qk in (Q_FULL, S_TRIM)
            else:
                ok = not (crop_q and crop_m) or band_same
            t[qk + 3, ms] = ok
    return t


ALLOWED = _allowed_table()


def pair_allowed(q_kind: int, m_slot: int) -> bool:
    """May a query code of this kind (full, mirror or a view slot) match an
    indexed code in this slot? Everything but crop view against crop view --
    except a band view against the same band (a caption bar over one copy's
    edge leaves the rest of the picture, that band, identical)."""
    return bool(ALLOWED[q_kind + 3, m_slot])


def is_framed(views: list[str] | None, trimmed: bool) -> bool:
    """A detected frame (screenshot, border, letterbox, caption bar) dominates
    the whole image's hashes: two framed copies of *different* pictures match
    on them (the cluster bench found screenshots gluing unrelated pictures at
    0 bits). Such an image is matched by its trimmed view, crops, and the
    mirror of its trimmed view (at the view radius) -- and, v6 records in
    ``ClusterIndex``, by frame-relative codes verified on pixels. Measured alternative on the cluster bench: allowing
    full-frame pairs between a framed and an unframed image (only
    framed-framed refused): 0.09 fewer clusters per picture, 39 more impure
    clusters."""
    return bool(trimmed and views)


def query_codes(h: ImageHashes) -> list[tuple[int, str]]:
    """Every query-side pHash code: (kind, hex)."""
    if is_framed(h.views, h.trimmed):
        # the mirror of the trimmed view (``ImageHashes.phash_mirror``): a
        # mirrored framed repost; view radius, and crop views only of framed
        # pictures (against unframed ones it cost the cluster bench 25 impure
        # clusters)
        mirror = [(Q_MIRROR, h.phash_mirror)] if h.phash_mirror else []
        frame = [(Q_FRAME, h.phash)] if frame_extras(h.views, h.trimmed) else []
        return mirror + frame + view_slots(h.views, h.trimmed)
    out = [(Q_FULL, h.phash)]
    if h.phash_mirror:
        out.append((Q_MIRROR, h.phash_mirror))
    return out + view_slots(h.views, h.trimmed)


def full_code(phash: str, views: list[str] | None, trimmed: bool) -> list[tuple[int, str]]:
    """The stored whole-frame code: slot ``S_FULL``, or ``S_FRAME_FULL`` for a
    trimmed v6 image, or none for an older trimmed one."""
    if not is_framed(views, trimmed):
        return [(S_FULL, phash)]
    return [(S_FRAME_FULL, phash)] if frame_extras(views, trimmed) else []


def stored_codes(h: ImageHashes) -> list[tuple[int, str]]:
    return full_code(h.phash, h.views, h.trimmed) + view_slots(h.views, h.trimmed)


def stored_phash_codes(phash: str, views: list[str] | None, trimmed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(slots, codes) to index for one member: its pHash and its views. The
    index id of each is ``key * SLOTS + slot``; ``search_phash`` undoes it."""
    codes = full_code(phash, views, trimmed) + view_slots(views, trimmed)
    return np.array([c[0] for c in codes], dtype=np.int64), HammingIndex.codes_from_hex([c[1] for c in codes], 64)


def search_phash(
    index: HammingIndex, h: ImageHashes, phash_threshold: int, view_threshold: int
) -> list[tuple[int, int, Via]]:
    """(key, distance, via) of every indexed pHash code (full hashes and views,
    stored by ``stored_phash_codes``) that ``h`` matches under the pairing rule."""
    if not len(index):
        return []
    out: list[tuple[int, int, Via]] = []
    codes = query_codes(h)
    kinds = [k for k, _ in codes]
    # one batched search: full/mirror at the wider radius (they may hit full
    # hashes or views), the image's views at the view radius, which probes far
    # fewer multi-index buckets when tighter; rule and radii applied per hit
    radii = np.array([max(phash_threshold, view_threshold) if k in FULL_KINDS else view_threshold for k in kinds])
    qi, ids, dist = index.search(HammingIndex.codes_from_hex([c for _, c in codes], 64), radii)
    for q, i, d in zip(qi.tolist(), ids.tolist(), dist.tolist()):
        key, slot = divmod(i, SLOTS)
        qk = kinds[q]
        if pixels_only(qk, slot):
            continue  # needs pixels (mapped through the content box; a side band's strict test): clusters only
        if whole_frame_pair(qk, slot):
            if d > phash_threshold:
                continue
            via: Via = "phash_mirror" if qk == Q_MIRROR else "phash"
        elif d > view_threshold or not pair_allowed(qk, slot):
            continue
        else:
            via = "phash_view"
        out.append((key, int(d), via))
    return out


def phash_pairs(
    q: list[tuple[int, str]], m: list[tuple[int, str]], phash_threshold: int, view_threshold: int
) -> list[tuple[int, Via]]:
    """(distance, via) of every allowed pHash pair within its threshold."""
    return [(d, via) for d, via, _, _ in phash_pairs_detail(q, m, phash_threshold, view_threshold)]


def phash_pairs_detail(
    q: list[tuple[int, str]], m: list[tuple[int, str]], phash_threshold: int, view_threshold: int
) -> list[tuple[int, Via, int, int]]:
    """(distance, via, query kind, indexed slot) of every allowed pHash pair within its threshold."""
    out: list[tuple[int, Via, int, int]] = []
    for qk, qh in q:
        for ms, mh in m:
            if not pair_allowed(qk, ms) or pixels_only(qk, ms):
                continue
            d = hamming_hex(qh, mh)
            if whole_frame_pair(qk, ms):
                if d <= phash_threshold:
                    out.append((d, "phash_mirror" if qk == Q_MIRROR else "phash", qk, ms))
            elif d <= view_threshold:
                out.append((d, "phash_view", qk, ms))
    return out


def frame_relative(q_kind: int, m_slot: int) -> bool:
    """A pair involving a trimmed image's whole-frame codes (v6). Its hashes
    alone are weak -- two screenshots of different pictures meet on their
    frames -- so only ``ClusterIndex`` pairs them, with pixels verified
    through the content boxes; the hash-only rule (``pair_match``,
    ``search_phash``: banks) leaves them out and matches as with v5 records."""
    return q_kind == Q_FRAME or S_FRAME0 <= m_slot <= S_FRAME_FULL


def pixels_only(q_kind: int, m_slot: int) -> bool:
    """A pair the hash-only rule leaves out: frame-relative codes
    (``frame_relative``) and side bands (hashes v7), which a side of the
    picture being repainted leaves at a few bits -- ``ClusterIndex`` takes
    them only with pixels verified strictly (``_residual``)."""
    return frame_relative(q_kind, m_slot) or q_kind >= S_SIDE0 or m_slot >= S_SIDE0


def whole_frame_pair(q_kind: int, m_slot: int) -> bool:
    """Whole frame against whole frame (the pHash radius; other pairs take the view radius)."""
    return (q_kind in (Q_FULL, Q_MIRROR) and m_slot == S_FULL) or (q_kind == Q_FRAME and m_slot == S_FRAME_FULL)


def pair_match(
    a: ImageHashes,
    b: ImageHashes,
    *,
    phash_threshold: int = PHASH_THRESHOLD,
    pdq_threshold: int = PDQ_THRESHOLD,
    pdq_min_quality: int = PDQ_MIN_QUALITY,
    view_threshold: int | None = None,
) -> tuple[int, Via] | None:
    """The decision rule for one pair (``b`` is the indexed side, so only its
    direct hashes and views are used, never its mirrors), as ``ClusterIndex``
    applies it through its index; the best (distance, via) by
    ``distance / threshold``, or None. Hashes only: pairs of a trimmed
    image's whole-frame codes, which ``ClusterIndex`` takes only with pixels
    verified (``frame_relative``), and side bands are left out (``pixels_only``)."""
    vt = phash_threshold if view_threshold is None else view_threshold
    cands: list[tuple[float, int, int, Via]] = []
    for d, via in phash_pairs(query_codes(a), stored_codes(b), phash_threshold, vt):
        cands.append((*rank_key(d, via, phash_threshold, pdq_threshold), d, via))
    framed = is_framed(a.views, a.trimmed) or is_framed(b.views, b.trimmed)
    if not framed and a.pdq_quality >= pdq_min_quality and b.pdq_quality >= pdq_min_quality:
        for via, hq in (("pdq", a.pdq), ("pdq_mirror", a.pdq_mirror)):
            if hq:
                d = hamming_hex(hq, b.pdq)
                if d <= pdq_threshold:
                    cands.append((*rank_key(d, via, phash_threshold, pdq_threshold), d, via))  # type: ignore[arg-type]
    if not cands:
        return None
    _, _, d, via = min(cands)
    return d, via
