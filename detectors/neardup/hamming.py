"""Exact Hamming range search over fixed-length binary codes (64-bit pHash,
256-bit PDQ), with inserts and deletes, sized for a hot set of ~10M codes.

Why not a flat scan: a flat scan costs one popcount per indexed code per query.
faiss ``IndexBinaryFlat.range_search`` does ~1.8e9 of those a second on one
core, i.e. ~180 queries/s at 10M codes, and batching queries does not help (it
is compute bound, not memory bound; measured in ``bench/neardup.py``).

So the bulk of the codes lives in a *multi-index hashing* segment (Norouzi et
al., "Fast search in Hamming space with multi-index hashing"): the code is cut
into ``m`` disjoint substrings and each gets a bucket table (CSR: counts by
substring value + a permutation). By the pigeonhole principle, a code within
``r`` bits of the query is within ``r // m`` bits of it on at least one
substring, so probing every key within ``r // m`` of the query's substring in
each table and verifying the candidates is *exact* -- no recall is traded for
speed. 64-bit codes use 3 tables of 21/21/22 bits (r=10 -> 1,794 probes per
table, ~5 candidates per probe at 10M), 256-bit codes use 16 tables of 16 bits
(r=31 -> 17 probes per table).

Inserts go to a small flat *delta* segment scanned by brute force (every
query pays one popcount per delta row, so it is kept small: ``delta_max``).
When it fills it is folded into a *mid* MIH segment -- the rows stay where
they are, only the mid segment's bucket tables are rebuilt, O(mid size) --
and when the mid segment outgrows ``mid_max`` everything is compacted into
one main MIH segment (deleted rows dropped). So inserts cost O(1) amortised
at any hot-set size and the per-query scan stays bounded. Deletes are
tombstones until the next compaction. Memory is
predictable: 8 bytes per 64-bit code + (4 + 8 * words) bytes per table for the permutation and a bucket-ordered copy of the codes
+ a fixed 4 * 2**b bytes per table of offsets (see ``nbytes``).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

# (word, shift, bits) per table; substrings never cross a 64-bit word.
_LAYOUTS: dict[int, list[tuple[int, int, int]]] = {
    64: [(0, 0, 21), (0, 21, 21), (0, 42, 22)],
    256: [(w, s, 16) for w in range(4) for s in (0, 16, 32, 48)],
}
# Segments below this many rows use 16-bit keys for 64-bit codes (4 tables):
# r=10 probes 137 keys per table instead of 1,562, and with few rows per
# bucket that is cheaper; the 256 KiB offsets make small rebuilds cheap too.
_SMALL_ROWS = 1 << 18
_SMALL_LAYOUTS: dict[int, list[tuple[int, int, int]]] = {64: [(0, s, 16) for s in (0, 16, 32, 48)]}
# Probing more keys than this per table is slower than scanning: fall back.
_MAX_PROBES = 20_000


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every ``bits``-bit mask with at most ``radius`` bits set."""
    masks = [0]
    for k in range(1, radius + 1):
        masks.extend(sum(1 << i for i in c) for c in combinations(range(bits), k))
    return np.asarray(masks, dtype=np.int64)


def _n_masks(bits: int, radius: int) -> int:
    from math import comb

    return sum(comb(bits, k) for k in range(radius + 1))


class HammingIndex:
    """Exact range search; ids are caller-chosen non-negative int64."""

    def __init__(
        self, nbits: int, *, delta_max: int = 8_192, mid_max: int = 262_144, mih_min: int = 32_768, chunk: int = 256
    ):
        if nbits % 64:
            raise ValueError("nbits must be a multiple of 64")
        self.nbits = nbits
        self.words = nbits // 64
        self.delta_max = delta_max
        self.mid_max = mid_max
        self.mih_min = mih_min
        self.chunk = chunk
        self._layout = _LAYOUTS.get(nbits)
        self._codes = np.zeros((0, self.words), dtype=np.uint64)
        self._ids = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._n = 0  # rows used in the arrays (capacity may be larger)
        self._main_n = 0  # rows [0, main_n) are in MIH segments, the rest are delta
        self._n_dead = 0
        # MIH segments: (start, end, layout, tables); tables: (offsets, perm within the segment, codes in perm order).
        # At most two: main [0, a) and mid [a, main_n).
        self._segments: list[tuple[int, int, list, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]] = []
        self._masks: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ data
    @staticmethod
    def codes_from_hex(hexes: list[str], nbits: int) -> np.ndarray:
        """Hex strings -> (n, nbits/64) uint64, the layout ``add``/``search`` take."""
        raw = b"".join(bytes.fromhex(h) for h in hexes)
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(hexes), nbits // 64)

    def __len__(self) -> int:
        return self._n - self._n_dead

    @property
    def _tables(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [t for *_, tables in self._segments for t in tables]

    @property
    def nbytes(self) -> int:
        arrays = [self._codes, self._ids, self._alive] + [a for t in self._tables for a in t]
        return int(sum(a.nbytes for a in arrays))

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        codes = np.asarray(codes, dtype=np.uint64).reshape(len(ids), self.words)
        need = self._n + len(ids)
        if need > len(self._ids):
            cap = max(need, 2 * len(self._ids), 1024)
            self._codes = np.resize(self._codes, (cap, self.words))
            self._ids = np.resize(self._ids, cap)
            self._alive = np.resize(self._alive, cap)
        self._codes[self._n : need] = codes
        self._ids[self._n : need] = ids
        self._alive[self._n : need] = True
        self._n = need
        if self._main_n == 0:
            # Below mih_min (or with no MIH layout) everything is scanned and a
            # compaction only drops tombstones: doing it per insert once past
            # delta_max made every add copy all arrays (~100x slower adds).
            buildable = self._layout is not None and self._n >= self.mih_min
            if buildable or self._n_dead > max(self.delta_max, self._n // 2):
                self.compact()
        elif self._n - self._main_n >= self.delta_max:
            main_end = self._segments[0][1]
            if self._n - main_end >= self.mid_max:
                self.compact()
            else:  # fold the delta into the mid segment: rebuild its tables only
                self._segments = [self._segments[0], self._build(main_end, self._n)]
                self._main_n = self._n

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (ids, codes), in insertion order: what ``add`` takes to
        build the same index again (in another process, from a saved copy)."""
        alive = self._alive[: self._n]
        return self._ids[: self._n][alive], self._codes[: self._n][alive]

    def remove(self, ids: np.ndarray) -> int:
        """Tombstone every row whose id is in ``ids``; O(n), meant for batches."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids) or not self._n:
            return 0
        hit = np.isin(self._ids[: self._n], ids) & self._alive[: self._n]
        k = int(hit.sum())
        self._alive[: self._n][hit] = False
        self._n_dead += k
        if self._n_dead > max(1024, self._n // 4):
            self.compact()
        return k

    def compact(self) -> None:
        """Drop tombstones and index everything in a fresh MIH segment."""
        keep = np.flatnonzero(self._alive[: self._n])
        self._codes = self._codes[keep]
        self._ids = self._ids[keep]
        self._alive = np.ones(len(keep), dtype=bool)
        self._n = self._main_n = len(keep)
        self._n_dead = 0
        self._segments = []
        if self._layout is None or self._n < self.mih_min:
            self._main_n = 0  # small: everything is scanned, nothing to build
            return
        self._segments = [self._build(0, self._n)]

    def _build(self, start: int, end: int):
        """A segment over rows [start, end): (start, end, layout, tables); perm is relative to start."""
        assert self._layout is not None
        codes = self._codes[start:end]
        layout = _SMALL_LAYOUTS.get(self.nbits, self._layout) if end - start < _SMALL_ROWS else self._layout
        tables = []
        for w, shift, bits in layout:
            keys = ((codes[:, w] >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
            perm = np.argsort(keys, kind="stable").astype(np.int32)
            offsets = np.zeros((1 << bits) + 1, dtype=np.int64 if len(codes) >= 2**31 else np.int32)
            np.cumsum(np.bincount(keys, minlength=1 << bits), out=offsets[1:])
            # codes copied in bucket order: a probe reads one contiguous run
            # instead of one cache miss per candidate (~4x at 10M codes)
            tables.append((offsets, perm, codes[perm]))
        return start, end, layout, tables

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, radius: int | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (query row, id, distance) with distance <= radius, unordered.
        ``radius`` is one int or one per query (a batch mixing radii costs
        one pass, and each query probes only its own neighbourhood)."""
        queries = np.asarray(queries, dtype=np.uint64).reshape(-1, self.words)
        radii = np.broadcast_to(np.asarray(radius, dtype=np.int64), (len(queries),))
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for lo in range(0, len(queries), self.chunk):
            q = queries[lo : lo + self.chunk]
            radius = radii[lo : lo + self.chunk]
            for seg in self._segments:
                hq, hr, hd = self._mih_search(q, radius, lo, seg)
                # a row close on several substrings was a candidate in several tables
                _, first = np.unique(hq * np.int64(self._main_n) + hr, return_index=True)
                out.append((hq[first], hr[first], hd[first]))
            start = self._main_n
            if self._n > start:
                out.append(self._scan(q, radius, start, self._n, lo))
        if not out:
            e = np.zeros(0, dtype=np.int64)
            return e, e, e
        qi, rows, d = (np.concatenate(x) for x in zip(*out))
        return qi, self._ids[rows], d

    def _scan(self, q: np.ndarray, radius: np.ndarray, start: int, end: int, q_offset: int):
        codes = self._codes[start:end]
        alive = self._alive[start:end]
        hits_q, hits_r, hits_d = [], [], []
        block = max(1, 4_000_000 // max(1, len(codes)))  # bound the (queries x rows) temporary
        all_alive = bool(alive.all())
        for b in range(0, len(q), block):
            qq = q[b : b + block]
            if self.words == 1:  # 64-bit codes: no word sum, uint8 distances (~3x less memory traffic)
                d = np.bitwise_count(qq[:, :1] ^ codes[None, :, 0])
            else:
                d = np.bitwise_count(qq[:, None, :] ^ codes[None, :, :]).sum(axis=2, dtype=np.int16)
            hit = d <= radius[b : b + block, None]
            if not all_alive:
                hit &= alive[None, :]
            if not hit.any():  # the usual case: skip the (slow) 2-D nonzero
                continue
            qi, ri = np.divmod(np.flatnonzero(hit), hit.shape[1])
            hits_q.append(qi + b + q_offset)
            hits_r.append(ri + start)
            hits_d.append(d[qi, ri].astype(np.int64))
        if not hits_q:
            e = np.zeros(0, dtype=np.int64)
            return e, e, e
        return np.concatenate(hits_q), np.concatenate(hits_r).astype(np.int64), np.concatenate(hits_d)

    def _mih_search(self, q: np.ndarray, radius: np.ndarray, q_offset: int, segment):
        assert self._layout is not None
        seg_start, seg_end, layout, tables = segment
        sub = radius // len(layout)
        levels = np.unique(sub).tolist()
        if any(_n_masks(bits, levels[-1]) > _MAX_PROBES for _, _, bits in layout):
            # a radius this wide probes more keys than there are rows: scan instead
            return self._scan(q, radius, seg_start, seg_end, q_offset)
        groups = [(np.flatnonzero(sub == s) if len(levels) > 1 else None, s) for s in levels]
        hq, hr, hd = [], [], []
        for (w, shift, bits), (offsets, perm, sorted_codes) in zip(layout, tables):
            qkey = ((q[:, w] >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
            probe_parts, owner_parts = [], []
            for members, s in groups:  # each query probes the keys within its own sub-radius
                masks = self._masks.get((bits, s))
                if masks is None:
                    masks = self._masks[(bits, s)] = _flip_masks(bits, s)
                keys = qkey if members is None else qkey[members]
                probe_parts.append((keys[:, None] ^ masks[None, :]).reshape(-1))
                who = np.arange(len(q)) if members is None else members
                owner_parts.append(np.repeat(who, len(masks)))
            probes = probe_parts[0] if len(groups) == 1 else np.concatenate(probe_parts)
            probe_owner = owner_parts[0] if len(groups) == 1 else np.concatenate(owner_parts)
            starts = offsets[probes].astype(np.int64)
            lens = offsets[probes + 1] - starts
            nz = lens > 0
            starts, lens = starts[nz], lens[nz]
            total = int(lens.sum())
            if not total:
                continue
            # expand every [start, start+len) range into positions without a Python loop
            owner = np.repeat(probe_owner[nz], lens)
            run_start = np.repeat(np.cumsum(lens) - lens, lens)
            pos = np.repeat(starts, lens) + (np.arange(total) - run_start)
            d = np.bitwise_count(q[owner] ^ sorted_codes[pos]).sum(axis=1, dtype=np.int64)
            ok = np.flatnonzero(d <= radius[owner])
            rows = perm[pos[ok]].astype(np.int64) + seg_start
            alive = self._alive[rows]
            hq.append(owner[ok][alive] + q_offset)
            hr.append(rows[alive])
            hd.append(d[ok][alive])
        if not hq:
            e = np.zeros(0, dtype=np.int64)
            return e, e, e
        return np.concatenate(hq), np.concatenate(hr), np.concatenate(hd)
