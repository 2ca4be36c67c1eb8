"""Near-duplicate clustering: which picture (cluster) does this image show?

Decision rule (the one ``bench/neardup.py`` measures): an image matches an
indexed member when

* its pHash, or the pHash of its mirror image, is within ``phash_threshold``
  bits of the member's pHash, or
* its PDQ (or mirrored PDQ) is within ``pdq_threshold`` bits of the member's
  PDQ *and both* PDQ qualities are >= ``pdq_min_quality`` (PDQ of flat,
  low-detail images is noise; such members are not put in the PDQ index).

Views (crops and screenshots): an image also carries the pHashes of a few
*views* (``ImageHashes.views``: the content inside a detected border, and
centre crops). They are indexed next to the member's pHash and pointing to the
same member; a pair also matches when, within ``view_threshold`` bits,

* the image's pHash (or mirrored pHash) equals one of the member's views (the
  image is a crop of the member, or the member a framed copy of it),
* one of the image's views equals the member's pHash (the other way round), or
* a *trimmed-border* view on either side equals any view on the other (two
  screenshots of one picture; a screenshot of a crop).

A crop view never matches another crop view (both are just the full pictures
again, and every extra pair compared costs false matches). Such matches report
``via="phash_view"``. Members indexed without views (records from before views,
rebuilt from stored pHash/PDQ) still match on their full hashes, and an image's
own views still reach them.

Matching a member is necessary but not sufficient: the image must also be
within the *representative bound* of the member's cluster (pHash within
``max_representative_distance`` of one of the cluster's representatives, or
PDQ within the same bound scaled by ``pdq_threshold / phash_threshold``;
default twice each threshold; views count under the same pairing rules). Without it a cluster could creep across
unrelated pictures one small drift at a time (crop of a crop of a crop...).
A cluster's representative is its founding image; a merge keeps the
representatives of both sides.

Merges: when an image matches several clusters it joins the one with the most
members (ties: the smallest cluster id) and the others are merged into it.
The rule reads only index state, never arrival order or wall clock, so a
replica fed the same sequence of ``assign`` calls -- or rebuilt with ``add``
from persisted members -- makes the same decisions and the same ids.

Distances of different hashes are ranked by ``distance / threshold`` so
"nearest first" means "most confidently the same picture first".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel

from detectors.hashing import ImageHashes, hamming_hex
from detectors.neardup.hamming import HammingIndex

Via = Literal["sha256", "phash", "pdq", "phash_mirror", "pdq_mirror", "phash_view"]
_VIA_ORDER: dict[str, int] = {"sha256": 0, "phash": 1, "pdq": 2, "phash_mirror": 3, "pdq_mirror": 4, "phash_view": 5}


def rank_key(distance: int, via: str, phash_threshold: int, pdq_threshold: int) -> tuple[float, int]:
    """How confidently a match is the same picture, most confident first:
    distance as a fraction of its hash's threshold, then how it matched.
    Clusters, banks and `deepwatch similar` all rank with this."""
    scale = 1 if via == "sha256" else pdq_threshold if via.startswith("pdq") else phash_threshold
    return (distance / max(1, scale), _VIA_ORDER[via])

# Default radius for pHash pairs that involve a view: the bench's sweep finds no
# extra false matches up to 9 bits (0.0015% -> 0.0028% at 10), and 8 lets the
# multi-index search probe 2-bit instead of 3-bit neighbourhoods (~7x fewer keys)
VIEW_THRESHOLD = 8

# pHash index slots per member: id = row * SLOTS + slot
SLOTS = 4
_FULL, _TRIM, _CROP0 = 0, 1, 2  # crops take slots 2, 3
_Q_FULL, _Q_MIRROR = -1, -2  # query-side kinds besides the view slots


def view_slots(views: list[str] | None, trimmed: bool) -> list[tuple[int, str]]:
    """(slot, pHash) of an image's views (``ImageHashes.views``/``trimmed``), in index slots."""
    views = views or []
    out: list[tuple[int, str]] = []
    if trimmed and views:
        out.append((_TRIM, views[0]))
        views = views[1:]
    out.extend((_CROP0 + i, v) for i, v in enumerate(views[: SLOTS - _CROP0]))
    return out


def _pair_allowed(q_kind: int, m_slot: int) -> bool:
    """May a query code of this kind (full, mirror or a view slot) match an
    indexed code in this slot? Everything but crop view against crop view."""
    return not (q_kind >= _CROP0 and m_slot >= _CROP0)


def _view_codes(h: ImageHashes) -> list[tuple[int, str]]:
    """Every query-side pHash code: (kind, hex)."""
    out = [(_Q_FULL, h.phash)]
    if h.phash_mirror:
        out.append((_Q_MIRROR, h.phash_mirror))
    return out + view_slots(h.views, h.trimmed)


def _stored_codes(h: ImageHashes) -> list[tuple[int, str]]:
    return [(_FULL, h.phash)] + view_slots(h.views, h.trimmed)


def stored_phash_codes(phash: str, views: list[str] | None, trimmed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(slots, codes) to index for one member: its pHash and its views. The
    index id of each is ``key * SLOTS + slot``; ``search_phash`` undoes it."""
    codes = [(_FULL, phash)] + view_slots(views, trimmed)
    return np.array([c[0] for c in codes], dtype=np.int64), HammingIndex.codes_from_hex([c[1] for c in codes], 64)


def search_phash(
    index: HammingIndex, h: ImageHashes, phash_threshold: int, view_threshold: int
) -> list[tuple[int, int, Via]]:
    """(key, distance, via) of every indexed pHash code (full hashes and views,
    stored by ``stored_phash_codes``) that ``h`` matches under the pairing rule."""
    if not len(index):
        return []
    out: list[tuple[int, int, Via]] = []
    codes = _view_codes(h)
    kinds = [k for k, _ in codes]
    # one batched search: full/mirror at the wider radius (they may hit full
    # hashes or views), the image's views at the view radius, which probes far
    # fewer multi-index buckets when tighter; rule and radii applied per hit
    radii = np.array([max(phash_threshold, view_threshold) if k in (_Q_FULL, _Q_MIRROR) else view_threshold for k in kinds])
    qi, ids, dist = index.search(HammingIndex.codes_from_hex([c for _, c in codes], 64), radii)
    for q, i, d in zip(qi.tolist(), ids.tolist(), dist.tolist()):
        key, slot = divmod(i, SLOTS)
        qk = kinds[q]
        if qk in (_Q_FULL, _Q_MIRROR) and slot == _FULL:
            if d > phash_threshold:
                continue
            via: Via = "phash" if qk == _Q_FULL else "phash_mirror"
        elif d > view_threshold or not _pair_allowed(qk, slot):
            continue
        else:
            via = "phash_view"
        out.append((key, int(d), via))
    return out


def _phash_pairs(
    q: list[tuple[int, str]], m: list[tuple[int, str]], phash_threshold: int, view_threshold: int
) -> list[tuple[int, Via]]:
    """(distance, via) of every allowed pHash pair within its threshold."""
    out: list[tuple[int, Via]] = []
    for qk, qh in q:
        for ms, mh in m:
            if not _pair_allowed(qk, ms):
                continue
            d = hamming_hex(qh, mh)
            if qk in (_Q_FULL, _Q_MIRROR) and ms == _FULL:
                if d <= phash_threshold:
                    out.append((d, "phash" if qk == _Q_FULL else "phash_mirror"))
            elif d <= view_threshold:
                out.append((d, "phash_view"))
    return out


def cluster_id_for(sha256: str) -> str:
    """Id of the cluster this image founds: stable across processes and replays."""
    return sha256[:16]


class Match(BaseModel):
    cluster_id: str
    distance: int
    via: Via


class Assignment(BaseModel):
    cluster_id: str
    new_cluster: bool
    new_member: bool  # False: this exact sha256 is already a member
    merged: list[str]  # other clusters this image linked, now folded into cluster_id
    distance: int | None
    via: str | None


@dataclass
class _Rep:
    phash: str
    pdq: str
    pdq_quality: int
    views: list[tuple[int, str]] = field(default_factory=list)  # (slot, pHash)


@dataclass
class _Cluster:
    members: list[str] = field(default_factory=list)
    reps: list[_Rep] = field(default_factory=list)
    first: _Rep | None = None  # stands in as representative if none was marked
    last_seen: float | None = None


def pair_match(
    a: ImageHashes,
    b: ImageHashes,
    *,
    phash_threshold: int = 10,
    pdq_threshold: int = 31,
    pdq_min_quality: int = 50,
    view_threshold: int | None = None,
) -> tuple[int, Via] | None:
    """The decision rule for one pair (``b`` is the indexed side, so only its
    direct hashes and views are used, never its mirrors), as ``ClusterIndex``
    applies it through its index; the best (distance, via) by
    ``distance / threshold``, or None."""
    vt = phash_threshold if view_threshold is None else view_threshold
    cands: list[tuple[float, int, int, Via]] = []
    for d, via in _phash_pairs(_view_codes(a), _stored_codes(b), phash_threshold, vt):
        cands.append((d / max(1, phash_threshold), _VIA_ORDER[via], d, via))
    if a.pdq_quality >= pdq_min_quality and b.pdq_quality >= pdq_min_quality:
        for via, hq in (("pdq", a.pdq), ("pdq_mirror", a.pdq_mirror)):
            if hq:
                d = hamming_hex(hq, b.pdq)
                if d <= pdq_threshold:
                    cands.append((d / max(1, pdq_threshold), _VIA_ORDER[via], d, via))  # type: ignore[arg-type]
    if not cands:
        return None
    _, _, d, via = min(cands)
    return d, via


class ClusterIndex:
    def __init__(
        self,
        *,
        phash_threshold: int = 10,
        pdq_threshold: int = 31,
        pdq_min_quality: int = 50,
        max_representative_distance: int | None = None,
        view_threshold: int | None = VIEW_THRESHOLD,
    ):
        self.phash_threshold = phash_threshold
        # pHash pairs involving a view (crop/trim) may use a tighter radius
        self.view_threshold = phash_threshold if view_threshold is None else view_threshold
        self.pdq_threshold = pdq_threshold
        self.pdq_min_quality = pdq_min_quality
        self.rep_phash = (
            max_representative_distance if max_representative_distance is not None else 2 * phash_threshold
        )
        self.rep_pdq = round(self.rep_phash * pdq_threshold / max(1, phash_threshold))
        self._phash = HammingIndex(64)
        self._pdq = HammingIndex(256)
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
        """Clusters this image belongs to, nearest first, one match per cluster."""
        best: dict[str, Match] = {}
        own = self._member_cluster.get(sha256)
        if own is not None:
            best[own] = Match(cluster_id=own, distance=0, via="sha256")
        for m in self._hash_matches(hashes):
            cur = best.get(m.cluster_id)
            if cur is None or self._rank(m) < self._rank(cur):
                best[m.cluster_id] = m
        found = [m for m in best.values() if m.via == "sha256" or self._within_rep_bound(m.cluster_id, hashes)]
        return sorted(found, key=self._rank)

    def _rank(self, m: Match) -> tuple[float, int, str]:
        return (*rank_key(m.distance, m.via, self.phash_threshold, self.pdq_threshold), m.cluster_id)

    def _hash_matches(self, h: ImageHashes) -> list[Match]:
        out: list[Match] = []
        for row, d, via in search_phash(self._phash, h, self.phash_threshold, self.view_threshold):
            sha = self._row_member[row]
            out.append(Match(cluster_id=self._member_cluster[sha], distance=d, via=via))
        for index, vias, codes, radius in self._queries(h):
            if not len(index):
                continue
            qi, rows, dist = index.search(codes, radius)
            for q, row, d in zip(qi.tolist(), rows.tolist(), dist.tolist()):
                sha = self._row_member[row]
                out.append(Match(cluster_id=self._member_cluster[sha], distance=int(d), via=vias[q]))
        return out

    def _queries(self, h: ImageHashes):
        if h.pdq_quality >= self.pdq_min_quality:
            pq = [h.pdq] + ([h.pdq_mirror] if h.pdq_mirror else [])
            yield self._pdq, ("pdq", "pdq_mirror"), HammingIndex.codes_from_hex(pq, 256), self.pdq_threshold

    def _within_rep_bound(self, cluster_id: str, h: ImageHashes) -> bool:
        c = self._clusters[cluster_id]
        reps = c.reps or ([c.first] if c.first else [])
        pdq_ok = h.pdq_quality >= self.pdq_min_quality
        q = _view_codes(h)
        for r in reps:
            if _phash_pairs(q, [(_FULL, r.phash)] + r.views, self.rep_phash, self.rep_phash):
                return True
            if pdq_ok and r.pdq_quality >= self.pdq_min_quality:
                if min(hamming_hex(h.pdq, r.pdq), _mirror_dist(h.pdq_mirror, r.pdq)) <= self.rep_pdq:
                    return True
        return False

    # ---------------------------------------------------------------- update
    def assign(self, sha256: str, hashes: ImageHashes, *, ts: float | None = None) -> Assignment:
        """Put this image in a cluster (joining, founding or merging) and index it."""
        own = self._member_cluster.get(sha256)
        if own is not None:
            self.touch(own, ts)
            return Assignment(cluster_id=own, new_cluster=False, new_member=False, merged=[], distance=0, via="sha256")
        matches = self.lookup(sha256, hashes)
        if not matches:
            cid = cluster_id_for(sha256)
            n = 16
            while cid in self._clusters:  # 64-bit prefix collision: astronomically rare, still deterministic
                n += 4
                cid = sha256[:n]
            self.add(cid, sha256, hashes, representative=True, ts=ts)
            return Assignment(cluster_id=cid, new_cluster=True, new_member=True, merged=[], distance=None, via=None)
        into = min(matches, key=lambda m: (-len(self._clusters[m.cluster_id].members), m.cluster_id))
        merged = [m.cluster_id for m in matches if m.cluster_id != into.cluster_id]
        for other in merged:
            self.merge(into.cluster_id, other)
        self.add(into.cluster_id, sha256, hashes, ts=ts)
        return Assignment(
            cluster_id=into.cluster_id,
            new_cluster=False,
            new_member=True,
            merged=merged,
            distance=into.distance,
            via=into.via,
        )

    def add(
        self,
        cluster_id: str,
        sha256: str,
        hashes: ImageHashes,
        *,
        representative: bool = False,
        ts: float | None = None,
    ) -> None:
        """Index a member as-is (no matching): rebuilds the index from persisted state."""
        if sha256 in self._member_cluster:
            return
        c = self._clusters.setdefault(cluster_id, _Cluster())
        views = view_slots(hashes.views, hashes.trimmed)
        rep = _Rep(hashes.phash, hashes.pdq, hashes.pdq_quality, views)
        if representative:
            c.reps.append(rep)
        if c.first is None:
            c.first = rep
        c.members.append(sha256)
        self.touch(cluster_id, ts)
        row = self._next_row
        self._next_row += 1
        self._member_cluster[sha256] = cluster_id
        self._member_row[sha256] = row
        self._row_member[row] = sha256
        slots, codes = stored_phash_codes(hashes.phash, hashes.views, hashes.trimmed)
        self._phash.add(row * SLOTS + slots, codes)
        ids = np.array([row], dtype=np.int64)
        if hashes.pdq_quality >= self.pdq_min_quality:
            self._pdq.add(ids, HammingIndex.codes_from_hex([hashes.pdq], 256))

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
        dst.reps.extend(src.reps or ([src.first] if src.first else []))
        if src.last_seen is not None:
            self.touch(into, src.last_seen)

    def remove_cluster(self, cluster_id: str) -> None:
        self._remove([cluster_id])

    def evict_older_than(self, ts: float) -> list[str]:
        """Drop clusters not seen since ``ts`` (no timestamp counts as old); returns
        their ids, sorted, so the caller can persist them to the findings store."""
        old = sorted(cid for cid, c in self._clusters.items() if c.last_seen is None or c.last_seen < ts)
        self._remove(old)
        return old

    def _remove(self, cluster_ids: list[str]) -> None:
        rows: list[int] = []
        for cid in cluster_ids:
            c = self._clusters.pop(cid, None)
            if c is None:
                continue
            for sha in c.members:
                del self._member_cluster[sha]
                row = self._member_row.pop(sha)
                del self._row_member[row]
                rows.append(row)
        if rows:
            ids = np.asarray(rows, dtype=np.int64)
            self._phash.remove((ids[:, None] * SLOTS + np.arange(SLOTS)[None, :]).reshape(-1))
            self._pdq.remove(ids)


def _mirror_dist(mirror: str | None, other: str) -> int:
    return hamming_hex(mirror, other) if mirror else 1 << 30
