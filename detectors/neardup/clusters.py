"""Near-duplicate clustering: which picture (cluster) does this image show?

The hash pair rule (codes, index slots, which pairs may meet) is
``detectors.neardup.pairing``; the thumbnail regions a pair compares,
``detectors.neardup.regions``. Flat pictures
(PDQ quality < ``FLAT_QUALITY``) match only flat ones -- in ``ClusterIndex``
also detailed ones whose pixels agree with them nearly everywhere
(``_flat_agrees``: a dark picture's caption-bar copy, detailed by its bar).
One-colour regions (a black frame, what a caption bar leaves of it) have no
hash at all: ``ClusterIndex`` pairs them by grey level (``regions.region_levels``,
via ``"uniform"``); the hash-only rule does not.

Clusters (``ClusterIndex``): members only nominate candidate clusters; an
image joins a cluster when it matches one of the cluster's *representatives*
(its founder, a larger copy whose crop is the founder, founders of clusters
merged in) -- never merely another member, so no single-link chains. An image
matching several pictures links them only when pHash *and* PDQ agree, full
frame, with each (``_agreement``), or its pixels agree with each almost
everywhere (``_links_by_pixels``: 80th percentile of the blurred
regions). Failing that, the pair it nominated is
still one picture split by arrival order when one side's representative
would join the other's picture now (``_reps_join``: trusted representatives
-- founders, anchors agreeing with a founder almost everywhere -- against
each other under the join rule; other anchors only as strictly as a link
by pixels). A copy that becomes a representative bridges the clusters it
came near the same way, through itself (``_bridge``), including those it
declined. Every
merge is audited (``MergeAudit``). Otherwise it joins the nearest picture
(ties: most members, smallest id) and ``Assignment.declined`` names the
others. Only representatives are indexed.
With a pixel source (``ClusterIndex(pixels=...)``), a picture whose best
verified pair is borderline (median residual >= ``EDIT_FROM``) is
re-verified on both images' own pixels (``detectors.neardup.localized``):
an edit of one part of the picture does not join it. Decisions between
pictures -- links that would merge two clusters, and joins of a cluster
the check has told from a look-alike (``_Cluster.apart``) -- are
re-verified from ``merge_edit_from`` (any residual). Missing pixels leave
the decision to the record.
The rule reads only index state (and, with a pixel source, the members'
content-addressed bytes), never arrival order or wall clock, so a
replica fed the same sequence of ``assign`` calls -- or rebuilt with ``add``
from persisted members and ``mark_apart`` from their clusters' marks --
makes the same decisions and the same ids.

Distances of different hashes are ranked by ``distance / threshold`` so
"nearest first" means "most confidently the same picture first".
"""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field

from detectors.hashing import ImageHashes, frame_extras, hamming_hex, thumb_array
from detectors.imagedata import DecodeLimits
from detectors.neardup.hamming import HammingIndex
from detectors.neardup.localized import EditCheck, PixelSource
from detectors.neardup.pairing import (
    ALLOWED, PDQ_MIN_QUALITY, PDQ_THRESHOLD, PHASH_THRESHOLD, Q_FRAME, Q_FULL, Q_MIRROR, S_BAND0, S_CROP0, S_FRAME0,
    S_FRAME_FULL, S_FULL, S_SIDE0, S_TRIM, SLOTS, VIA_ORDER, VIEW_THRESHOLD, Via, is_framed, pair_allowed, query_codes,
    rank_key, stored_phash_codes, view_slots, whole_frame_pair,
)
from detectors.neardup.regions import MIN_OVERLAP, in_frame, pair_regions, region_levels, uniform_match
from detectors.neardup.verify import aligned_residual, informative, residual


# Pixel verification: the most a hash pair's aligned regions may differ
# (``verify.aligned_residual``, median grey levels); None: off. The cluster
# bench's candidate pairs: same picture p99 8, different pictures p1 ~6.
VERIFY_MAX: float | None = 6.0
# ... or, when the median misses that bound by little (at most
# VERIFY_NEAR), the median of both regions blurred 1-2-1 at the boxes the
# hashes name is at most VERIFY_SMOOTH (``_residual``): a detailed
# picture's off-centre crop, sampled by the thumbnails at another phase,
# is at 6.2-6.4 raw and 2.1-2.3 blurred on the cluster bench, while
# look-alikes that differ in mid-frequency detail are at 9-13 raw (and
# 1.8-3.7 blurred). VERIFY_SMOOTH None: off.
VERIFY_NEAR = 8.0
VERIFY_SMOOTH: float | None = 3.0
_UNVERIFIED = 1e9  # residual recorded for a pair that had no thumbnails to compare
# Two clusters may be linked by pixels alone when the image's verified
# residual to each side's picture is at most this (grey levels).
MERGE_RESIDUAL: float | None = 6.0
MERGE_QUANTILE = 0.8  # ... and at this quantile of the pixels within MERGE_STRICT (``_links_by_pixels``),
MERGE_STRICT = 4.0  # both regions blurred 1-2-1 first (``verify._smooth``): see ``_links_by_pixels``
# Anchors: a joining copy becomes a representative when it met the picture
# by a view, PDQ, only mirrored, or a pHash farther than this; at most this many
# representatives per cluster (merges may add more).
ANCHOR_DISTANCE = 4
MAX_REPRESENTATIVES = 8


# Pairs that verify at a median residual of at least this (grey levels)
# are re-verified on full pixels when a pixel source is configured
# (``ClusterIndex(pixels=...)``, ``localized.EditCheck``): the bench's
# joins of two different pictures verified at 3.3-5.8, those the check
# tells apart at 4.6-5.8, while 98% of same-picture joins verify below 4.5
# and never pay for the check (~0.15 s).
EDIT_FROM = 4.5
# Decisions between pictures are re-verified on pixels from this residual
# (session 10; 0: any): links that would join two existing clusters (an
# image linking several, a representative link, a bridge), the choice of
# an image that shows several pictures, a new representative's own join
# when it is about to bridge, and every join of a cluster marked
# ``apart``. Merges are ~1% of assigns and one wrong merge mixes two whole
# clusters: the bench's flux / Stable Cascade inpaintings met again through
# a representative link at 4.33 after their first join was refused, and
# through a copy linking both at 1.65 (a floor of 3 let that one through).
MERGE_EDIT_FROM = 0.0

_VERIFY_TRIES = 4  # nearest pairs per representative tried before giving up on it
# A side-band pair is verified on at least this many of the 256 pixels that
# are neither black nor saturated on both sides (``verify.informative``)
_MIN_INFORMATIVE = 128
# ``_bridge``: candidate clusters a new representative tries (nearest
# first), verified at the boxes the hashes name only (no aligned search):
# on the cluster bench 3 tries without alignment keep all but 2 of the
# joins of unbounded aligned tries, at a quarter of the cost
_BRIDGE_TRIES = 3


def _residual_or_none(r: float) -> float | None:
    return None if r >= _UNVERIFIED else round(r, 2)

# Below this PDQ quality a picture is (nearly) flat -- a black frame, a moon on
# black -- and its pHash is noise around zero: it may match another flat
# picture, never a detailed one (the cluster bench found flat frames gluing
# unrelated photos' caption-bar reposts together).
FLAT_QUALITY = 10
# ... unless pixels say otherwise (session 8): PDQ quality is the *whole
# frame's*, so a dark picture's caption-bar copy (its bar is detail) was
# "detailed" and never met the picture; a flat/detailed pair may pair when
# both have thumbnails and their regions agree nearly everywhere (99th
# percentile of the blurred aligned residual <= 6 grey levels; the cluster
# bench's such pairs of one picture are all <= 5, a bright moon on black
# against a black frame is at tens)
FLAT_QUANTILE, FLAT_STRICT = 0.99, 6.0
# One-colour pictures (session 8; ``verify.uniform_level``): the content
# of an image, or a band of it (what a caption bar over an edge leaves: the
# band views' regions), may be one colour. Representatives are indexed by
# those grey levels (buckets of ``_UNIFORM_BUCKET``), and two such regions
# within ``UNIFORM_DIFF`` levels pair like hashes do (content with content
# or a band, a band with the same band: ``uniform_pair``): a black
# frame's captioned copies -- the caption is the only detail, so nothing
# was trimmed and every hash showed the caption -- meet the frame.
UNIFORM_DIFF = 4.0
_UNIFORM_BUCKET = 8


def cluster_id_for(sha256: str) -> str:
    """Id of the cluster this image founds: stable across processes and replays."""
    return sha256[:16]


class Match(BaseModel):
    cluster_id: str
    distance: int
    via: Via


class MergeAudit(BaseModel):
    """Why two clusters became one: the linking image and how far it is from
    each side's picture -- pHash and PDQ distances when both hashes agreed
    full frame, and the pixel residual of the verified regions
    (``verify``; None on audits from before it, or without thumbnails). A
    link by pixels alone (``into_pdq``/``other_pdq`` None) needs a residual
    within ``ClusterIndex.merge_residual`` on both sides."""

    into: str
    other: str
    link_sha256: str
    into_phash: int
    into_pdq: int | None = None
    other_phash: int
    other_pdq: int | None = None
    into_residual: float | None = None
    other_residual: float | None = None
    # a link by representatives (``ClusterIndex._reps_join``): this
    # representative of one side joins the other side's picture, at this
    # distance and pixel residual; None on links by the image alone
    representative_sha256: str | None = None
    representative_distance: int | None = None
    representative_residual: float | None = None


class Assignment(BaseModel):
    cluster_id: str
    new_cluster: bool
    new_member: bool  # False: this exact sha256 is already a member
    merged: list[str]  # other clusters this image linked, now folded into cluster_id
    distance: int | None
    via: str | None
    # the member now stands for the cluster's picture: it founded the cluster,
    # or it is a larger copy of it (the founder is a crop of this image)
    representative: bool = False
    merge_audit: list[MergeAudit] = Field(default_factory=list)
    # clusters whose picture the image also matched, but not on both hashes:
    # it joined one of them and linked nothing
    declined: list[str] = Field(default_factory=list)
    # clusters this assign marked ``apart`` (ids after it): engine state keeps
    # the mark, so an index rebuilt from it re-verifies their joins as before
    apart: list[str] = Field(default_factory=list)


@dataclass
class _Rep:
    phash: str
    pdq: str
    pdq_quality: int
    views: list[tuple[int, str]] = field(default_factory=list, repr=False)  # (slot, pHash); dropped once encoded
    founder: bool = True  # founded a cluster; larger copies joined later are not, and promote nothing
    framed: bool = False  # full-frame hashes show the frame, not the picture: views only, no PDQ
    thumb: np.ndarray | None = field(default=None, repr=False)  # 32x32 uint8 grey content (``verify``); None: trust hashes
    sha256: str = ""
    trust: tuple[int, bool] | None = field(default=None, repr=False)  # ``ClusterIndex._trusted`` memo: (founders, answer)
    box: tuple[float, float, float, float] | None = None  # a trimmed v6 image's content box: frame-relative codes
    slots: np.ndarray = field(init=False)  # its pHash and views as index slots and 64-bit codes
    codes: np.ndarray = field(init=False)
    levels: tuple[tuple[int, float], ...] = field(init=False)  # (slot, grey level) of one-colour regions (``region_levels``)

    def __post_init__(self) -> None:
        self.levels = () if self.thumb is None else region_levels(self.thumb.astype(np.float32),
                                                                  S_TRIM if self.framed else S_FULL)
        full = [(S_FRAME_FULL, self.phash)] if self.box else [] if self.framed else [(S_FULL, self.phash)]
        pairs = full + self.views
        self.slots = np.array([s for s, _ in pairs], dtype=np.int8)
        self.codes = HammingIndex.codes_from_hex([c for _, c in pairs], 64)[:, 0]
        self.views = []  # ~3 KB of strings per representative; the arrays are what is used

    def hashes(self) -> ImageHashes:
        """The representative as a query (``_reps_join``): its hashes, views
        and thumbnail, rebuilt from the arrays (no mirrors: the other
        direction covers a mirrored pair's other side)."""
        views = [f"{int(c):016x}" for s, c in zip(self.slots.tolist(), self.codes.tolist())
                 if s not in (S_FULL, S_FRAME_FULL)]
        thumb = None if self.thumb is None else base64.b64encode(self.thumb.astype(np.uint8).tobytes()).decode()
        return ImageHashes(phash=self.phash, pdq=self.pdq, pdq_quality=self.pdq_quality, views=views or None,
                           trimmed=self.framed, thumb=thumb, content_box=self.box)


@dataclass
class _Query:
    """An image's query-side pHash codes (full, mirror, views) as arrays."""

    codes: np.ndarray
    kinds: np.ndarray
    full: np.ndarray  # full or mirrored pHash
    crop: np.ndarray  # a crop view (never paired with another crop view)
    framed: bool  # a detected frame (``is_framed``): its mirror code is its trimmed view's
    thumb: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None  # content box in the frame (``frame_extras``)
    # (kind, grey level) of its content and bands that are one colour
    # (``uniform_level``): what meets a one-colour picture
    levels: tuple[tuple[int, float], ...] = ()
    sha256: str = ""  # whose pixels ``EditCheck`` may fetch ("" : none)
    content: tuple[float, float, float, float] | None = None  # ``ImageHashes.content_box``, any record version

    @classmethod
    def of(cls, h: ImageHashes, sha256: str = "") -> "_Query":
        pairs = query_codes(h)
        kinds = np.array([k for k, _ in pairs], dtype=np.int64)
        codes = HammingIndex.codes_from_hex([c for _, c in pairs], 64)[:, 0]
        thumb = thumb_array(h.thumb) if h.thumb else None
        extras = frame_extras(h.views, h.trimmed)
        framed = is_framed(h.views, h.trimmed)
        levels = () if thumb is None else region_levels(thumb, S_TRIM if framed else Q_FULL)
        return cls(codes, kinds, kinds < 0, kinds >= S_CROP0, framed, thumb, h.content_box if extras else None, levels,
                   sha256, h.content_box)



@dataclass
class _Cluster:
    members: list[str] = field(default_factory=list)
    reps: list[_Rep] = field(default_factory=list)
    first: _Rep | None = None  # stands in as representative if none was marked
    last_seen: float | None = None
    # an edit check told one of its pictures from another image's: its
    # joins are re-verified on pixels from ``merge_edit_from`` (see ``assign``)
    apart: bool = False

    def pictures(self) -> list[_Rep]:
        return self.reps or ([self.first] if self.first else [])



class ClusterIndex:
    def __init__(
        self,
        *,
        phash_threshold: int = PHASH_THRESHOLD,
        pdq_threshold: int = PDQ_THRESHOLD,
        pdq_min_quality: int = PDQ_MIN_QUALITY,
        max_representative_distance: int | None = None,
        view_threshold: int | None = VIEW_THRESHOLD,
        index_members: bool | None = None,
        verify_max: float | None = VERIFY_MAX,
        verify_smooth: float | None = VERIFY_SMOOTH,
        merge_residual: float | None = MERGE_RESIDUAL,
        merge_strict: float = MERGE_STRICT,
        max_representatives: int = MAX_REPRESENTATIVES,
        representative_links: bool = True,
        pixels: PixelSource | None = None,
        pixel_limits: DecodeLimits | None = None,
        edit_from: float = EDIT_FROM,
        merge_edit_from: float | None = MERGE_EDIT_FROM,
        min_overlap: float = MIN_OVERLAP,
    ):
        # Borderline pairs (residual >= edit_from) re-verified on the images'
        # own pixels (``localized``), decoded within the deployment's bounds
        # (``pixel_limits``; None: ``DecodeLimits``' defaults); no pixel
        # source: the 32x32 record alone decides
        self.edits = EditCheck(pixels, pixel_limits or DecodeLimits()) if pixels is not None else None
        self.edit_from = edit_from
        # the same for decisions between pictures (merges, a choice among
        # several, joins of a cluster marked ``apart``); None: off (session 9)
        self.merge_edit_from = merge_edit_from
        self.min_overlap = min_overlap  # of a frame-relative pair's sides on both thumbnails (``verify.clip_pair``)
        self._edit_pairs: list[tuple[str, str]] = []  # (image, representative) the check told apart this assign
        self.representative_links = representative_links  # ``_reps_join``; off: links by the image alone
        self.merge_strict = merge_strict
        self.verify_max = verify_max
        self.verify_smooth = verify_smooth
        self.merge_residual = merge_residual if verify_max is not None else None
        self.max_representatives = max_representatives
        self.phash_threshold = phash_threshold
        # pHash pairs involving a view (crop/trim) may use a tighter radius
        self.view_threshold = phash_threshold if view_threshold is None else view_threshold
        self.pdq_threshold = pdq_threshold
        self.pdq_min_quality = pdq_min_quality
        # The picture bound: by default the pair rule itself, against the
        # representatives only. A caller that wants every member's matches
        # regardless (a bank cross-check) widens it.
        if max_representative_distance is None:
            self.rep_phash, self.rep_view, self.rep_pdq = phash_threshold, self.view_threshold, pdq_threshold
        else:
            self.rep_phash = self.rep_view = max_representative_distance
            self.rep_pdq = round(max_representative_distance * pdq_threshold / max(1, phash_threshold))
        # Only representatives decide, so only they need to be searchable: the
        # index holds ~one picture per cluster, not every repost. A read side
        # asking "near any member?" (widened bound) indexes every member.
        self.index_members = max_representative_distance is not None if index_members is None else index_members
        # full frames (pHash, trimmed view) and crop views apart: the image's
        # many crop views may only meet full frames, so they search the small index
        self._phash = HammingIndex(64)
        self._phash_views = HammingIndex(64)
        self._pdq = HammingIndex(256)
        # one-colour regions of representatives: level bucket -> rows, row -> its (slot, level)s
        self._uniform: dict[int, list[int]] = {}
        self._row_levels: dict[int, tuple[tuple[int, float], ...]] = {}
        self._clusters: dict[str, _Cluster] = {}
        self._member_cluster: dict[str, str] = {}  # sha256 -> cluster id
        self._member_row: dict[str, int] = {}
        self._row_member: dict[int, str] = {}
        self._next_row = 0

    # ------------------------------------------------------------ properties
    @property
    def n_clusters(self) -> int:
        return len(self._clusters)

    @property
    def n_members(self) -> int:
        return len(self._member_cluster)

    def cluster_of(self, sha256: str) -> str | None:
        return self._member_cluster.get(sha256)

    def members(self, cluster_id: str) -> list[str]:
        return list(self._clusters[cluster_id].members)

    def __contains__(self, cluster_id: str) -> bool:
        return cluster_id in self._clusters

    # ---------------------------------------------------------------- lookup
    def lookup(self, sha256: str, hashes: ImageHashes) -> list[Match]:
        """Clusters whose *picture* this image shows, nearest first, one match
        per cluster (the distance to its nearest member). Members only nominate
        candidates; the image must match one of the cluster's representatives
        under the pair rule, so a chain of small drifts never reaches a
        different picture."""
        near, pics, _ = self._pictures(sha256, hashes, _Query.of(hashes, sha256))
        found = [Match(cluster_id=cid, distance=d, via=via) for cid, (_, d, via) in near.items()
                 if via == "sha256" or cid in pics]
        return sorted(found, key=self._rank)

    def _rank(self, m: Match) -> tuple[float, int, str]:
        return (*rank_key(m.distance, m.via, self.phash_threshold, self.pdq_threshold), m.cluster_id)

    def _pictures(self, sha256: str, h: ImageHashes, q: "_Query") -> tuple[dict[str, tuple], dict[str, tuple], bool]:
        """(nearest indexed match per candidate cluster, picture match per
        cluster whose picture the image shows, whether no picture matched
        even with the image's views searched too); see ``_picture_match``."""
        near: dict[str, tuple] = {}
        own = self._member_cluster.get(sha256)
        if own is not None:
            near[own] = ((0.0, 0), 0, "sha256")
        pics: dict[str, tuple] = {}
        # Full frames first (pHash, mirror, PDQ): most reposts end here. Only
        # full-frame agreement can link clusters, so the image's crop and
        # trimmed views are searched only when no picture matched yet.
        for views in (False, True):
            for cid, d, via in self._hash_matches(h, q, views=views):
                key = (rank_key(d, via, self.phash_threshold, self.pdq_threshold), d, via)
                cur = near.get(cid)
                if cur is None or key < cur:
                    near[cid] = key
            pics = {cid: p for cid in near if (p := self._picture_match(cid, h, q))}
            if pics:
                return near, pics, False
        return near, pics, True

    def _hash_matches(self, h: ImageHashes, query: "_Query", *, views: bool) -> list[tuple[str, int, Via]]:
        """Indexed codes the image meets: with ``views`` False its full and
        mirrored hashes (pHash and PDQ), with ``views`` True its views."""
        out: list[tuple[str, int, Via]] = []
        pick = np.flatnonzero(query.kinds >= 0) if views else np.flatnonzero(query.kinds < 0)
        kinds = query.kinds
        q = query.codes[pick].reshape(-1, 1)
        wide = kinds[pick] < 0  # full, mirrored or frame pHash: may meet full hashes at the pHash radius
        radii = np.where(wide, max(self.phash_threshold, self.view_threshold), self.view_threshold)
        hits = []
        if len(self._phash) and len(pick):
            qi, ids, dist = self._phash.search(q, radii)
            hits.append((pick[qi], ids, dist))
        # crop views never meet crop views, band views meet their own band
        frames = np.flatnonzero((kinds[pick] < S_CROP0) | ((kinds[pick] >= S_BAND0) & (kinds[pick] < S_FRAME0))
                                | (kinds[pick] >= S_SIDE0))
        if len(frames) and len(self._phash_views):
            qi, ids, dist = self._phash_views.search(q[frames], self.view_threshold)
            hits.append((pick[frames[qi]], ids, dist))
        for qi, ids, dist in hits:
            for qq, i, d in zip(qi.tolist(), ids.tolist(), dist.tolist()):
                row, slot = divmod(i, SLOTS)
                qk = int(kinds[qq])
                if whole_frame_pair(qk, slot):
                    if d > self.phash_threshold:
                        continue
                    via: Via = "phash_mirror" if qk == Q_MIRROR else "phash"
                elif d > self.view_threshold or not pair_allowed(qk, slot):
                    continue
                else:
                    via = "phash_view"
                out.append((self._member_cluster[self._row_member[row]], int(d), via))
        if views:
            return out
        for _, lv in query.levels if self.verify_max is not None else ():  # pixels decide these: none without
            for b in range(int((lv - UNIFORM_DIFF) // _UNIFORM_BUCKET), int((lv + UNIFORM_DIFF) // _UNIFORM_BUCKET) + 1):
                for row in self._uniform.get(b, ()):
                    m = uniform_match(query.levels, self._row_levels[row])
                    if m is not None and m[0] <= UNIFORM_DIFF:
                        out.append((self._member_cluster[self._row_member[row]], int(round(m[0])), "uniform"))
        for index, vias, codes, radius in self._queries(h):
            if not len(index):
                continue
            qi, rows, dist = index.search(codes, radius)
            for q, row, d in zip(qi.tolist(), rows.tolist(), dist.tolist()):
                out.append((self._member_cluster[self._row_member[row]], int(d), vias[q]))
        return out

    def _queries(self, h: ImageHashes):
        if h.pdq_quality >= self.pdq_min_quality and not is_framed(h.views, h.trimmed):
            pq = [h.pdq] + ([h.pdq_mirror] if h.pdq_mirror else [])
            yield self._pdq, ("pdq", "pdq_mirror"), HammingIndex.codes_from_hex(pq, 256), self.pdq_threshold

    def _picture_match(self, cluster_id: str, h: ImageHashes, q: "_Query | None" = None,
                       reps: "list[_Rep] | None" = None, align: bool = True,
                       sides: bool = True) -> tuple[tuple[float, int], int, Via, bool] | None:
        """The image against the cluster's representatives (or just
        ``reps``) under the pair rule: (rank, distance, via, grows, smallest
        verified residual, its (representative, kind, slot)) of the best
        pair, or None. ``grows``: a crop view of the image meets a founder's
        full picture closer than the image's own full frame does, i.e. the
        founder is a crop of this larger image. ``sides`` False: no side-band
        pairs (they may join an image, never link or trust: a side band
        leaves out the part where two pictures may differ). With a pixel
        source, a match whose smallest verified residual is at least
        ``edit_from`` is re-verified on the images' own pixels
        (``_is_edit``): None when they show an edit. One small
        popcount matrix per representative."""
        q = q or _Query.of(h)
        best = None
        resid = _UNVERIFIED  # smallest pixel residual of a verified pair
        pair = None  # (representative, query kind, slot) of that pair
        pdq_ok = h.pdq_quality >= self.pdq_min_quality and not is_framed(h.views, h.trimmed)
        flat = h.pdq_quality < FLAT_QUALITY
        pixels = self.verify_max is not None and q.thumb is not None
        for r in self._clusters[cluster_id].pictures() if reps is None else reps:
            cands: list[tuple[tuple[float, int], int, Via]] = []
            grows = False
            # flat against detailed: only on pixels that agree everywhere
            # (``_flat_agrees``) -- a frame's PDQ quality is the frame's
            same_flat = flat == (r.pdq_quality < FLAT_QUALITY)
            if same_flat or (pixels and r.thumb is not None):
                d = np.bitwise_count(q.codes[:, None] ^ r.codes[None, :])
                full_pair = (((q.kinds == Q_FULL) | (q.kinds == Q_MIRROR))[:, None] & (r.slots == S_FULL)[None, :]) | (
                    (q.kinds == Q_FRAME)[:, None] & (r.slots == S_FRAME_FULL)[None, :])
                allowed = ALLOWED[q.kinds + 3][:, r.slots]
                side_pair = (q.kinds >= S_SIDE0)[:, None] | (r.slots >= S_SIDE0)[None, :]
                if self.verify_max is None or q.thumb is None or r.thumb is None:  # frame and side pairs need pixels
                    allowed &= ~((q.kinds == Q_FRAME)[:, None] | ((r.slots >= S_FRAME0) & (r.slots <= S_FRAME_FULL))[None, :])
                    allowed &= ~side_pair
                elif not sides:
                    allowed &= ~side_pair
                if q.framed:  # its mirror code is a trimmed view's: the view radius,
                    full_pair &= (q.kinds != Q_MIRROR)[:, None]  # and crop views of framed pictures only
                    if not r.framed:
                        allowed &= ~((q.kinds == Q_MIRROR)[:, None] & (r.slots >= S_CROP0)[None, :])
                hit = allowed & (d <= np.where(full_pair, self.rep_phash, self.rep_view))
                k = None
                if hit.any():
                    qi, ri = np.nonzero(hit)
                    dd, fp = d[qi, ri].astype(np.int64), full_pair[qi, ri]
                    order = np.where(fp, np.where(q.kinds[qi] == Q_MIRROR, VIA_ORDER["phash_mirror"], VIA_ORDER["phash"]),
                                     VIA_ORDER["phash_view"])
                    # nearest pair first; the first whose regions' pixels agree
                    # at the boxes the hashes name, then aligned (costlier) for the nearest
                    tries = np.lexsort((order, dd))[:_VERIFY_TRIES].tolist()
                    for j, search in [(j, False) for j in tries] + ([(tries[0], True)] if align else []):
                        score = self._residual(q, r, int(q.kinds[qi[j]]), int(r.slots[ri[j]]), search=search)
                        if self._passes(score) and (same_flat or self._flat_agrees(q, r, int(q.kinds[qi[j]]), int(r.slots[ri[j]]))):
                            k = j
                            if score is not None and score < resid:
                                resid, pair = score, (r, int(q.kinds[qi[j]]), int(r.slots[ri[j]]))
                            break
                if k is not None:
                    via: Via = "phash_view" if not fp[k] else ("phash_mirror" if q.kinds[qi[k]] == Q_MIRROR else "phash")
                    cands.append((rank_key(int(dd[k]), via, self.phash_threshold, self.pdq_threshold), int(dd[k]), via))
                    # a larger copy: one of its crops meets the founder's frame
                    # closer than its own full frame does (not just the same framing)
                    g = q.crop[qi] & (r.slots[ri] <= S_TRIM)
                    grows = r.founder and bool(g.any()) and (not fp.any() or int(dd[g].min()) < int(dd[fp].min()))
            if pdq_ok and r.pdq_quality >= self.pdq_min_quality and not r.framed:
                for pvia, hq in (("pdq", h.pdq), ("pdq_mirror", h.pdq_mirror)):
                    if not hq or (dq := hamming_hex(hq, r.pdq)) > self.rep_pdq:
                        continue
                    score = self._residual(q, r, Q_FULL if pvia == "pdq" else Q_MIRROR, S_FULL)
                    if self._passes(score):
                        if score is not None and score < resid:
                            resid, pair = score, (r, Q_FULL if pvia == "pdq" else Q_MIRROR, S_FULL)
                        cands.append((rank_key(dq, pvia, self.phash_threshold, self.pdq_threshold), dq, pvia))  # type: ignore[arg-type]
            if r.levels and q.levels and self.verify_max is not None:
                # one-colour regions: grey levels instead of hashes (noise there)
                um = uniform_match(q.levels, r.levels)
                if um is not None and um[0] <= UNIFORM_DIFF:
                    dl = int(round(um[0]))
                    cands.append((rank_key(dl, "uniform", self.phash_threshold, self.pdq_threshold), dl, "uniform"))
                    if um[0] < resid:
                        resid, pair = um[0], (r, um[1], um[2])
            for c in cands:
                key = (*c, grows)
                if best is None or key[:3] < best[:3] or (key[:3] == best[:3] and grows and not best[3]):
                    best = key
        if best is None:
            return None
        # The picture's best pixel evidence is borderline: re-verified on the
        # images' own pixels (one check per image and representative)
        floor = self.merge_edit_from if self._clusters[cluster_id].apart else None  # None: edit_from
        if pair is not None and self._is_edit(q, *pair, resid, floor=floor):
            return None
        return (*best, resid, pair)

    def _residual(self, q: "_Query", r: _Rep, kind: int, slot: int, search: bool = True,
                  quantile: float = 0.5, strict: bool = False) -> float | None:
        """Pixel residual (grey levels) of the query's region for ``kind``
        against the representative's for ``slot``, aligned (``verify``), or
        None when either side has no thumbnail (records from before
        thumbnails) or verification is off."""
        if self.verify_max is None or q.thumb is None or r.thumb is None:
            return None
        rt = r.thumb.astype(np.float32)
        boxes = pair_regions(q.box, r.box, kind, slot, self.min_overlap)
        if boxes is None:
            return _UNVERIFIED
        qb, rb = boxes
        if not search:
            out = residual(q.thumb, qb, rt, rb, mirror=kind == Q_MIRROR, quantile=quantile, smooth=strict)
        else:
            out = aligned_residual(q.thumb, qb, rt, rb, mirror=kind == Q_MIRROR, smooth=strict,
                                   good_enough=self.merge_strict if strict else self.verify_max, quantile=quantile)
        if not strict and quantile == 0.5 and (kind >= S_SIDE0 or slot >= S_SIDE0) and out <= VERIFY_NEAR:
            # a side band leaves a sixth out at most, so the rest must agree
            # almost everywhere, as strictly as a link: over a band, a
            # picture with its left half repainted agrees at the median
            # -- on pixels that say something (not black or saturated on both)
            far = aligned_residual(q.thumb, qb, rt, rb, mirror=kind == Q_MIRROR, smooth=True,
                                   good_enough=self.merge_strict, quantile=MERGE_QUANTILE)
            if far > self.merge_strict or informative(q.thumb, qb, rt, rb, mirror=kind == Q_MIRROR) < _MIN_INFORMATIVE:
                return _UNVERIFIED
        if strict or quantile != 0.5 or self.verify_smooth is None or not self.verify_max < out <= VERIFY_NEAR:
            return out
        # a detailed picture sampled at another phase (an off-centre crop):
        # the blurred regions at the named boxes agree closely
        blurred = residual(q.thumb, qb, rt, rb, mirror=kind == Q_MIRROR, smooth=True)
        return blurred if blurred <= self.verify_smooth else out

    def _merge_edit(self, q: "_Query", m: tuple | None) -> bool:
        """Does this picture match, about to merge two clusters, show an edit
        on pixels? The stricter rule for merges: re-verified from
        ``merge_edit_from`` rather than ``edit_from``."""
        return (self.merge_edit_from is not None and m is not None and m[5] is not None
                and self._is_edit(q, *m[5], m[4], floor=self.merge_edit_from))

    def _is_edit(self, q: "_Query", r: _Rep, kind: int, slot: int, score: float | None,
                 floor: float | None = None) -> bool:
        """Does a pair that verified on the 32x32 record, at a residual of at
        least ``edit_from``, show an edit on the images' own pixels (one part
        of the interior differs: ``localized``)? False whenever it cannot
        tell -- no pixel source, a pixel-less side, either image's bytes
        gone -- so the record alone decides, as without a source."""
        floor = self.edit_from if floor is None else floor
        if self.edits is None or score is None or score < floor or not q.sha256 or not r.sha256:
            return False
        boxes = pair_regions(q.box, r.box, kind, slot, self.min_overlap)
        if boxes is None:
            return False
        qb, rb = boxes
        mirror = kind == Q_MIRROR
        qc = q.content
        if mirror and qc is not None:  # the query's region is in its mirrored content
            qc = (1 - qc[2], qc[1], 1 - qc[0], qc[3])
        qf, rf = in_frame(qb, qc), in_frame(rb, r.box)
        if mirror:  # back to the stored image's frame; ``is_edit`` flips image and boxes alike
            qf = (1 - qf[2], qf[1], 1 - qf[0], qf[3])
        edit = bool(self.edits.is_edit(q.sha256, qf, q.content, r.sha256, rf, r.box, mirror=mirror))
        if edit:
            self._edit_pairs.append((q.sha256, r.sha256))
        return edit

    def _flat_agrees(self, q: "_Query", r: _Rep, kind: int, slot: int) -> bool:
        """May a flat image (PDQ quality < ``FLAT_QUALITY``) and a detailed
        one pair? Only when their regions agree nearly everywhere
        (``FLAT_QUANTILE`` of the blurred residual within ``FLAT_STRICT``):
        the caption-bar copy of a dark picture is "detailed" by its bar's
        PDQ, while its trimmed content is the dark picture; a moon on black
        is detailed where a black frame is not."""
        far = self._residual(q, r, kind, slot, quantile=FLAT_QUANTILE, strict=True)
        return far is not None and far <= FLAT_STRICT

    def _links_by_pixels(self, q: "_Query", pic: tuple) -> bool:
        """May this verified picture match link its cluster to another? Its
        pixels must agree almost everywhere (``MERGE_QUANTILE`` of the
        residuals of both regions blurred 1-2-1 within ``merge_strict``:
        a detailed crop's sampling phase blurs away, a repainted quarter
        does not; ``verify`` docstring), not just at the median: an
        image that shares three quarters with each of two different pictures
        (one inpainted, one repainted) verifies against both, and must link
        neither."""
        if self.merge_residual is None or pic[5] is None or pic[4] > self.merge_residual:
            return False
        r, kind, slot = pic[5]
        if kind >= S_SIDE0 or slot >= S_SIDE0:
            return False  # met through a side band only: joins, never links
        strict = self._residual(q, r, kind, slot, quantile=MERGE_QUANTILE, strict=True)
        return strict is not None and strict <= self.merge_strict

    def _passes(self, score: float | None) -> bool:
        return score is None or self.verify_max is None or score <= self.verify_max

    def _reps_join(self, src: str, dst: str, *, src_reps: "list[_Rep] | None" = None,
                   dst_reps: "list[_Rep] | None" = None, align: bool = True) -> tuple[_Rep, tuple] | None:
        """The first representative of ``src`` (stored order; only
        ``src_reps`` when given) that matches ``dst``'s picture (only
        ``dst_reps`` when given) under the join rule with pixels that agree almost
        everywhere (``_links_by_pixels``), with the match; None when none
        does or verification is off."""
        if self.verify_max is None or not self.representative_links:
            return None
        dst_pics = self._clusters[dst].pictures() if dst_reps is None else dst_reps
        trusted = [r for r in dst_pics if self._trusted(dst, r)]
        radius = max(self.rep_phash, self.rep_view)
        for r in self._clusters[src].pictures() if src_reps is None else src_reps:
            if r.thumb is None or not any(self._may_pair(r, d, radius) for d in dst_pics):
                continue  # no hash of it comes near any of dst's: no match, and no pixels to compare
            h = r.hashes()
            q = _Query.of(h, r.sha256)
            # trusted against trusted: the join rule (would it join if it
            # came now?). Neither is a composite of the other side that got
            # in on a median match.
            m, same = None, False
            if trusted and self._trusted(src, r):
                m = self._picture_match(dst, h, q, reps=trusted, align=align, sides=False)
                if m is not None and m[4] < _UNVERIFIED:
                    if not self._merge_edit(q, m):
                        return r, m
                    continue  # an edit of dst's picture on pixels: no link through this one
                same = len(trusted) == len(dst_pics)  # every picture trusted: the call below is this one
            # other anchors may be such composites (three quarters of each of
            # two pictures): as strict as a link by an image's own pixels
            if not same:
                m = self._picture_match(dst, h, q, reps=dst_reps, align=align, sides=False)
            if m is not None and self._links_by_pixels(q, m) and not self._merge_edit(q, m):
                return r, m
        return None

    def _may_pair(self, a: _Rep, b: _Rep, radius: int) -> bool:
        """Could ``_picture_match`` find any pair between these two
        representatives' hashes? (Any pHash code within ``radius``, or PDQ
        within its radius: a superset of the rule's pairs, for skipping.)"""
        if int(np.bitwise_count(a.codes[:, None] ^ b.codes[None, :]).min()) <= radius:
            return True
        if (m := uniform_match(a.levels, b.levels)) is not None and m[0] <= UNIFORM_DIFF:
            return True
        return hamming_hex(a.pdq, b.pdq) <= self.rep_pdq

    def _bridge(self, into: str, sha256: str, h: ImageHashes, q: "_Query", near: dict, exhausted: bool,
                tried: set[str]):
        """Clusters that are ``into``'s picture now that this image is one of
        its representatives: every cluster the image's hashes came near
        (full frames and views), not yet tried with it as a representative
        (``tried``: the ones it merged; a declined cluster is tried again,
        now through it), whose representative joins
        ``into``'s picture or the other way round (``_reps_join``). A
        cluster founded by a crop before the copy that covers it became a
        representative is otherwise never met again: the covering copy met
        its own picture on full frames and never searched its views.
        Only pairs with the new representative are tried (the rest were
        there before it), and only one way for the clusters ``near`` --
        ``_pictures`` already matched the image against their pictures.
        ``exhausted``: ``_pictures`` searched the image's views and found no
        picture (then the clusters founded by a crop of it are in ``near``).
        Yields (cluster, join) in id order; reads index state only."""
        if self.verify_max is None or not self.representative_links:
            return
        new = [r for r in self._clusters[into].reps if r.sha256 == sha256]
        if not new:
            return
        rank = {cid: v[0] for cid, v in near.items()}
        seen = set(rank)
        if not exhausted:
            for cid, d, via in self._crop_founders(q):
                key = rank_key(d, via, self.phash_threshold, self.pdq_threshold)
                if cid not in seen and (cid not in rank or key < rank[cid]):
                    rank[cid] = key
        extra = set(rank) - seen
        # nearest first, a few: a screenshot's whole frame comes near every
        # other screenshot, and each try verifies pixels
        cands = sorted((c for c in rank if c not in tried and c != into and c in self._clusters),
                       key=lambda c: (rank[c], c))[:_BRIDGE_TRIES]
        for other in cands:
            rj = self._reps_join(other, into, dst_reps=new, align=False)
            if rj is None and other in extra:
                rj = self._reps_join(into, other, src_reps=new, align=False)
            if rj is not None:
                yield other, rj

    def _crop_founders(self, q: "_Query") -> list[tuple[str, int, Via]]:
        """The image's views against indexed whole frames only (the small
        index): pictures founded by a crop of this image."""
        pick = np.flatnonzero(q.kinds >= 0)
        if not len(pick) or not len(self._phash):
            return []
        qi, ids, dist = self._phash.search(q.codes[pick].reshape(-1, 1), self.view_threshold)
        out: list[tuple[str, int, Via]] = []
        for qq, i, d in zip(qi.tolist(), ids.tolist(), dist.tolist()):
            row, slot = divmod(i, SLOTS)
            if pair_allowed(int(q.kinds[pick[qq]]), slot):
                out.append((self._member_cluster[self._row_member[row]], int(d), "phash_view"))
        return out

    @staticmethod
    def _rep_audit(into: str, other: str, sha256: str, pin: tuple | None, pother: tuple | None,
                   rj: tuple) -> "MergeAudit":
        rep, m = rj
        return MergeAudit(
            into=into, other=other, link_sha256=sha256, into_phash=pin[1] if pin else 0,
            other_phash=pother[1] if pother else m[1],
            into_residual=_residual_or_none(pin[4]) if pin else None,
            other_residual=_residual_or_none(pother[4]) if pother else None,
            representative_sha256=rep.sha256, representative_distance=m[1],
            representative_residual=_residual_or_none(m[4]))

    def _trusted(self, cluster_id: str, r: _Rep) -> bool:
        """A representative that stands for its cluster's picture as surely
        as its founder: a founder, or an anchor whose pixels agree almost
        everywhere with one of the cluster's founders (``_links_by_pixels``)
        -- not a composite that got in on a median match. Read from index
        state only, so a rebuilt index answers the same."""
        if r.founder:
            return True
        founders = [f for f in self._clusters[cluster_id].pictures() if f.founder]
        if not founders or r.thumb is None:
            return False
        # memo: founders are only ever added (merges), so a True stays
        # True and a False holds while the founder count is unchanged
        if r.trust is not None and (r.trust[1] or r.trust[0] == len(founders)):
            return r.trust[1]
        h = r.hashes()
        q = _Query.of(h, r.sha256)
        m = self._picture_match(cluster_id, h, q, reps=founders, sides=False)
        ok = m is not None and self._links_by_pixels(q, m)
        r.trust = (len(founders), ok)
        return ok

    def _agreement(self, cluster_id: str, h: ImageHashes, q: "_Query") -> tuple[int, int] | None:
        """(pHash, PDQ) distances to a representative that *both* hashes match,
        in one orientation (direct or mirrored), or None. The bar for linking
        two clusters: one hash alone can be fooled by a similar composition,
        two independent ones agreeing on the full frame rarely are."""
        if h.pdq_quality < self.pdq_min_quality or is_framed(h.views, h.trimmed):
            return None
        best = None
        for r in self._clusters[cluster_id].pictures():
            if r.pdq_quality < self.pdq_min_quality or r.framed:
                continue
            for kind, ph, pq in ((Q_FULL, h.phash, h.pdq), (Q_MIRROR, h.phash_mirror, h.pdq_mirror)):
                if not ph or not pq:
                    continue
                dp, dq = hamming_hex(ph, r.phash), hamming_hex(pq, r.pdq)
                if dp <= self.phash_threshold and dq <= self.pdq_threshold and (best is None or (dp, dq) < best) \
                        and self._passes(self._residual(q, r, kind, S_FULL)):
                    best = (dp, dq)
        return best

    # ---------------------------------------------------------------- update
    def assign(self, sha256: str, hashes: ImageHashes, *, ts: float | None = None) -> Assignment:
        """Put this image in a cluster (joining, founding or merging) and index it.

        The clusters of both sides of every pair the edit check told apart
        on the way are marked ``apart``: their pictures have a look-alike
        edit, so a later copy joining one of them is re-verified on pixels
        from ``merge_edit_from`` -- a recompressed copy of the edit, at a
        residual below ``edit_from``, would otherwise undo the refusal."""
        self._edit_pairs = []
        out = self._assign(sha256, hashes, ts=ts)
        marked: set[str] = set()
        for pair in self._edit_pairs:
            for sha in pair:
                if (cid := self._member_cluster.get(sha)) is not None and not self._clusters[cid].apart:
                    self._clusters[cid].apart = True
                    marked.add(cid)
        if marked:
            out.apart = sorted(marked)
        return out

    def mark_apart(self, cluster_id: str) -> None:
        """Restore a mark ``assign`` set (``Assignment.apart``), e.g. when
        the index is rebuilt from stored cluster states."""
        if cluster_id in self._clusters:
            self._clusters[cluster_id].apart = True

    def _assign(self, sha256: str, hashes: ImageHashes, *, ts: float | None = None) -> Assignment:
        """``assign`` without the marks.

        It joins a cluster only when it matches the cluster's picture (its
        representatives, with their views). Matching several clusters links
        them only when both hashes agree with each side's picture
        (``_agreement``); the merge is audited. Otherwise the image joins the
        nearest picture (ties: most members, then smallest id) and links
        nothing."""
        own = self._member_cluster.get(sha256)
        if own is not None:
            self.touch(own, ts)
            return Assignment(cluster_id=own, new_cluster=False, new_member=False, merged=[], distance=0, via="sha256")
        q = _Query.of(hashes, sha256)  # codes and thumbnail decoded once for every check below
        near, pics, exhausted = self._pictures(sha256, hashes, q)
        if len(pics) >= 2:
            # The image shows several pictures: it may link them, or must
            # choose one -- decisions between pictures, so each candidate
            # is re-verified from ``merge_edit_from``: one that shows an
            # edit of the image is neither linked nor joined
            pics = {c: p for c, p in pics.items() if not self._merge_edit(q, p)}
        if not pics:
            return self._found(sha256, hashes, q, near, exhausted, ts)
        size = {cid: len(self._clusters[cid].members) for cid in pics}
        agree = {cid: a for cid in sorted(pics) if (a := self._agreement(cid, hashes, q))}
        # Linking two clusters needs full-frame agreement of both hashes, or
        # pixels verified to within ``merge_residual`` on each side (a crop
        # with a caption that shows both halves of a split picture).
        # (Letting a larger copy link its crop's cluster on hashes alone, even
        # at <= 2 bits, lengthened the cluster bench's chains from 8 to 11.)
        links = {c: (agree[c][0] if c in agree else pics[c][1], agree[c][1] if c in agree else None) for c in sorted(pics)
                 if c in agree or self._links_by_pixels(q, pics[c])}
        audit: list[MergeAudit] = []
        if len(links) >= 2:
            into = min(links, key=lambda c: (-size[c], c))
            merged = sorted(c for c in links if c != into)
            for other in merged:
                audit.append(MergeAudit(
                    into=into, other=other, link_sha256=sha256, into_phash=links[into][0], into_pdq=links[into][1],
                    other_phash=links[other][0], other_pdq=links[other][1],
                    into_residual=_residual_or_none(pics[into][4]), other_residual=_residual_or_none(pics[other][4])))
                self.merge(into, other)
            grows = any(pics[c][3] for c in links)
        else:
            into = min(pics, key=lambda c: (pics[c][0], 0 if c in agree else 1, -size[c], c))
            merged = []
            grows = pics[into][3]
        # Order independence: a cluster whose representative would join the
        # survivor's picture now (or the other way round) is the same picture,
        # split only because its copy arrived before the copies that bridge
        # them; the image that met both nominates the pair.
        for other in sorted(c for c in pics if c != into and c not in merged and c in self._clusters):
            rj = self._reps_join(other, into) or self._reps_join(into, other)
            if rj is None:
                continue
            audit.append(self._rep_audit(into, other, sha256, pics[into], pics[other], rj))
            self.merge(into, other)
            merged.append(other)
        merged.sort()
        _, distance, via, _, _, _ = pics[into]
        # A copy that met the picture only through a view, only mirrored (its
        # views are the other orientation's: a crop of it never meets the
        # picture's), or far from it, becomes one more representative (an
        # *anchor*, bounded per cluster):
        # later compound reposts (a screenshot of a crop, a caption on a
        # crop) meet it where they would miss the founder. Safe from chaining
        # because every join is pixel-verified against the representative.
        anchor = (not grows and self.verify_max is not None and hashes.thumb is not None
                  and len(self._clusters[into].reps) < self.max_representatives
                  and via != "uniform" and (via != "phash" or distance > ANCHOR_DISTANCE))
        rep = grows or anchor
        self.add(into, sha256, hashes, representative=rep, founder=False, ts=ts)
        if rep:
            # declined pictures too: they were tried before this image stood
            # for its picture (a whole copy meeting a crop's cluster at a
            # median too loose to link by its own pixels)
            tried = set(merged)
            bridges = self._bridge(into, sha256, hashes, q, near, exhausted, tried)
            first = next(bridges, None)
            if first is not None and len(pics) == 1 and self._merge_edit(q, pics[into]):
                # it would merge another cluster through itself: its own
                # join is a decision between pictures too (with several
                # pictures it was re-verified above), and it shows an edit
                self._drop_member(into, sha256)
                return self._found(sha256, hashes, q, near, exhausted, ts)
            for other, rj in itertools.chain([first] if first is not None else [], bridges):
                audit.append(self._rep_audit(into, other, sha256, pics[into], None, rj))
                self.merge(into, other)
                merged.append(other)
            merged.sort()
        return Assignment(
            cluster_id=into, new_cluster=False, new_member=True, merged=merged, distance=distance, via=via,
            representative=rep, merge_audit=audit, declined=sorted(c for c in pics if c != into and c not in merged),
        )

    def _found(self, sha256: str, hashes: ImageHashes, q: "_Query", near: dict, exhausted: bool,
               ts: float | None) -> Assignment:
        """The image founds a cluster (it shows no indexed picture), which
        then bridges the clusters it came near (``_bridge``)."""
        cid = cluster_id_for(sha256)
        n = 16
        while cid in self._clusters:  # 64-bit prefix collision: astronomically rare, still deterministic
            n += 4
            cid = sha256[:n]
        self.add(cid, sha256, hashes, representative=True, ts=ts)
        audit = []
        merged = []
        for other, rj in self._bridge(cid, sha256, hashes, q, near, exhausted, set()):
            audit.append(self._rep_audit(cid, other, sha256, None, None, rj))
            self.merge(cid, other)
            merged.append(other)
        return Assignment(cluster_id=cid, new_cluster=not merged, new_member=True, merged=sorted(merged),
                          distance=None, via=None, representative=True, merge_audit=audit)

    def add(
        self,
        cluster_id: str,
        sha256: str,
        hashes: ImageHashes,
        *,
        representative: bool = False,
        founder: bool | None = None,
        ts: float | None = None,
    ) -> None:
        """Index a member as-is (no matching): rebuilds the index from persisted
        state. ``founder`` (default: ``representative``) marks a representative
        that founded its cluster; only founders let a larger copy become one."""
        if sha256 in self._member_cluster:
            return
        c = self._clusters.setdefault(cluster_id, _Cluster())
        views = view_slots(hashes.views, hashes.trimmed)
        extras = frame_extras(hashes.views, hashes.trimmed)
        rep = _Rep(hashes.phash, hashes.pdq, hashes.pdq_quality, views, representative if founder is None else founder,
                   is_framed(hashes.views, hashes.trimmed), thumb_array(hashes.thumb, np.uint8) if hashes.thumb else None, sha256,
                   box=hashes.content_box if extras else None)
        if representative:
            c.reps.append(rep)
        if c.first is None:
            c.first = rep
        searchable = representative or self.index_members or not c.members
        c.members.append(sha256)
        self.touch(cluster_id, ts)
        self._member_cluster[sha256] = cluster_id
        if not searchable:
            return
        row = self._next_row
        self._next_row += 1
        self._member_row[sha256] = row
        self._row_member[row] = sha256
        slots, codes = stored_phash_codes(hashes.phash, hashes.views, hashes.trimmed)
        frame = (slots < S_CROP0) | (slots == S_FRAME_FULL)
        self._phash.add(row * SLOTS + slots[frame], codes[frame])
        if not frame.all():
            self._phash_views.add(row * SLOTS + slots[~frame], codes[~frame])
        self._index_levels(row, rep.levels)
        ids = np.array([row], dtype=np.int64)
        if hashes.pdq_quality >= self.pdq_min_quality and not is_framed(hashes.views, hashes.trimmed):
            self._pdq.add(ids, HammingIndex.codes_from_hex([hashes.pdq], 256))

    def add_bulk(
        self,
        cluster_ids: list[str],
        shas: list[str],
        phash: np.ndarray,
        pdq: np.ndarray,
        pdq_quality: np.ndarray,
        views: np.ndarray,
        representative: np.ndarray,
        thumbs: "Sequence[np.ndarray | None] | None" = None,
    ) -> None:
        """``add`` for many members at once (rebuilding a large index, the
        scale bench): ``phash`` (n,) and ``views`` (n, k) uint64 centre/off-centre
        crop views (no trimmed view), ``pdq`` (n, 4) uint64, ``thumbs`` (n,) 32x32 uint8 arrays (None: no thumbnail), or None. One index insert per
        hash kind instead of one per member."""
        n = len(shas)
        rows = np.full(n, -1, dtype=np.int64)
        for i in range(n):
            sha, cid = shas[i], cluster_ids[i]
            if sha in self._member_cluster:
                continue
            c = self._clusters.get(cid)
            if c is None:
                c = self._clusters[cid] = _Cluster()
            rep = bool(representative[i])
            if rep or self.index_members or not c.members:
                row = self._next_row
                self._next_row += 1
                self._member_row[sha] = row
                self._row_member[row] = sha
                rows[i] = row
            if rep or c.first is None:
                r = _Rep(f"{int(phash[i]):016x}", "".join(f"{int(w):016x}" for w in pdq[i]), int(pdq_quality[i]),
                         [(S_CROP0 + j, f"{int(v):016x}") for j, v in enumerate(views[i])], rep,
                         thumb=None if thumbs is None or thumbs[i] is None else np.array(thumbs[i], dtype=np.uint8),
                         sha256=sha)
                if rep:
                    c.reps.append(r)
                if c.first is None:
                    c.first = r
                if rows[i] >= 0:
                    self._index_levels(int(rows[i]), r.levels)
            c.members.append(sha)
            self._member_cluster[sha] = cid
        keep = rows >= 0
        r = rows[keep]
        self._phash.add(r * SLOTS + S_FULL, phash[keep].reshape(-1, 1))
        k = views.shape[1]
        self._phash_views.add((r[:, None] * SLOTS + S_CROP0 + np.arange(k)[None, :]).reshape(-1),
                              views[keep].reshape(-1, 1))
        trusted = keep & (pdq_quality >= self.pdq_min_quality)
        self._pdq.add(rows[trusted], pdq[trusted])

    def _index_levels(self, row: int, levels: tuple[tuple[int, float], ...]) -> None:
        """Index a representative's one-colour regions by grey level."""
        if levels:
            self._row_levels[row] = levels
            for b in sorted({int(lv // _UNIFORM_BUCKET) for _, lv in levels}):
                self._uniform.setdefault(b, []).append(row)

    def touch(self, cluster_id: str, ts: float | None) -> None:
        """Record activity so ``evict_older_than`` keeps the cluster hot."""
        c = self._clusters[cluster_id]
        if ts is not None and (c.last_seen is None or ts > c.last_seen):
            c.last_seen = ts

    def merge(self, into: str, other: str) -> None:
        """Fold ``other`` into ``into``: members, representatives, activity."""
        if into == other or other not in self._clusters:
            return
        src = self._clusters.pop(other)
        dst = self._clusters[into]
        for sha in src.members:
            self._member_cluster[sha] = into
        dst.members.extend(src.members)
        dst.reps.extend(src.pictures())
        dst.apart = dst.apart or src.apart
        if src.last_seen is not None:
            self.touch(into, src.last_seen)

    def remove_cluster(self, cluster_id: str) -> None:
        self._remove([cluster_id])

    def remove_clusters(self, cluster_ids: list[str]) -> None:
        """``remove_cluster`` of each, in one pass over the hash indexes."""
        self._remove(cluster_ids)

    def evict_older_than(self, ts: float) -> list[str]:
        """Drop clusters not seen since ``ts`` (no timestamp counts as old); returns
        their ids, sorted, so the caller can archive them (``streams.engine_state``)."""
        old = sorted(cid for cid, c in self._clusters.items() if c.last_seen is None or c.last_seen < ts)
        self._remove(old)
        return old

    def evict_least_recent(self, keep_members: int) -> list[str]:
        """Drop the clusters seen longest ago (no timestamp first; ties by id)
        until at most ``keep_members`` members are left; returns their ids,
        sorted, as ``evict_older_than`` does."""
        excess = self.n_members - keep_members
        if excess <= 0:
            return []
        gone: list[str] = []
        for cid, c in sorted(self._clusters.items(),
                             key=lambda kv: (kv[1].last_seen is not None, kv[1].last_seen or 0.0, kv[0])):
            if excess <= 0:
                break
            gone.append(cid)
            excess -= len(c.members)
        self._remove(gone)
        return sorted(gone)

    def _remove(self, cluster_ids: list[str]) -> None:
        gone: list[str] = []
        for cid in cluster_ids:
            c = self._clusters.pop(cid, None)
            if c is None:
                continue
            for sha in c.members:
                del self._member_cluster[sha]
            gone.extend(c.members)
        self._drop_rows(gone)

    def _drop_member(self, cluster_id: str, sha256: str) -> None:
        """Undo the ``add`` of the cluster's last member (``assign``: a
        representative whose join turned out to be an edit once it would
        bridge): nothing left but an unused row number and its activity time."""
        c = self._clusters[cluster_id]
        assert c.members[-1] == sha256
        c.members.pop()
        if c.reps and c.reps[-1].sha256 == sha256:
            c.reps.pop()
        del self._member_cluster[sha256]
        self._drop_rows([sha256])

    def _drop_rows(self, shas: list[str]) -> None:
        """Forget these members' index rows (searchable ones only)."""
        rows: list[int] = []
        for sha in shas:
            row = self._member_row.pop(sha, None)
            if row is not None:
                del self._row_member[row]
                rows.append(row)
                for b in sorted({int(lv // _UNIFORM_BUCKET) for _, lv in self._row_levels.pop(row, ())}):
                    self._uniform[b].remove(row)
        if rows:
            ids = np.asarray(rows, dtype=np.int64)
            every = (ids[:, None] * SLOTS + np.arange(SLOTS)[None, :]).reshape(-1)
            self._phash.remove(every)
            self._phash_views.remove(every)
            self._pdq.remove(ids)
