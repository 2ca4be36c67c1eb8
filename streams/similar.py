"""Have we seen this picture? One image against the stored clusters and the
banks of known pictures, nearest first: the lookup behind ``deepwatch
similar`` and the desk's ``POST /api/similar`` / "Find a picture" page.

``read_picture`` takes the image's bytes under the configured decode limits
(the decode memory budget shared with the analyze stage included);
``find`` answers for it from a findings store (SQLite or Elasticsearch) and
the banks file. Clusters the hashes nominate are checked again on their
members' pixels (``recorded_hashes``), as the cluster writer decides, so a
look-alike (one prompt's other seed) is not called the same picture.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

import numpy as np
from pydantic import BaseModel

from detectors.atomic_file import write_atomically
from detectors.banks import Verdict, Via
from detectors.hashing import ImageHashes, compute_hashes
from detectors.imagedata import DecodeLimits, ImageData, process_budget
from streams.findings import CandidateNominator, KeyedMemberReader, MemberIndexFile
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.findings import MemberReader, MemberRow

log = logging.getLogger(__name__)


class ClusterMatch(BaseModel):
    """A stored cluster showing the picture (its surviving id, never a merged-away one)."""

    cluster_id: str
    distance: int
    via: str


class BankMatch(BaseModel):
    """A bank entry showing the picture."""

    bank: str
    entry_id: str
    verdict: Verdict
    label: str | None
    distance: int
    via: Via


Match = Union[ClusterMatch, BankMatch]


@dataclass(frozen=True)
class Picture:
    """What a lookup needs of an image: its digest and its hashes."""

    sha256: str
    hashes: ImageHashes
    size: tuple[int, int]
    format: str
    preview: bytes | None = None  # a small JPEG of it, when asked for (``preview_px``)


def read_picture(data: bytes, limits: DecodeLimits, *, preview_px: int | None = None) -> Picture:
    """The picture in ``data``, hashed within ``limits``; raises
    ``ImageRejected`` (its ``reason``: ``empty``, ``too_large``,
    ``decompression_bomb``, ``undecodable``, ``memory_budget``, ``busy``...).
    Decodes pixels: call it off the event loop."""
    return picture_of(ImageData(data, limits=limits), preview_px=preview_px)


def picture_of(image: ImageData, *, preview_px: int | None = None) -> Picture:
    """``image`` hashed (and, with ``preview_px``, a JPEG of it at most that
    many pixels a side: re-encoded, never the original bytes)."""
    # The decode shares the process's memory budget (the analyze stage's, where one runs):
    # lookups arriving together wait their turn instead of multiplying the peak.
    with process_budget(image.limits.max_decode_bytes).reserve(image.decode_cost):
        hashes = compute_hashes(image)
        preview = _preview(image, preview_px) if preview_px else None
    return Picture(image.sha256, hashes, image.size, image.format, preview)


def _preview(image: ImageData, px: int) -> bytes:
    import io

    small = image.thumbnail(px).convert("RGB")
    small.thumbnail((px, px))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=80)
    return out.getvalue()


# progress(done, total): members indexed so far, of how many
Progress = Callable[[int, int], None]


def find(settings: Settings, picture: Picture, store: MemberReader | None, *,
         progress: Progress | None = None) -> list[Match]:
    """Clusters in ``store`` (a findings store; None: none to look in) and
    bank entries showing ``picture``, nearest first (the banks' ranking:
    distance over the rule's threshold). Errors of the store (an unreachable
    Elasticsearch: ``EsError``) are the caller's to report. ``progress(done,
    total)`` is called while a SQLite store's members are indexed (the first
    lookup of a process: seconds at a million members)."""
    ranked: list[tuple[tuple[float, int], Match]] = [
        *((_rank(settings, m.distance, m.via), m) for m in similar_clusters(settings, picture, store, progress)),
        *((_rank(settings, m.distance, m.via), m) for m in similar_banks(settings, picture)),
    ]
    ranked.sort(key=lambda r: r[0])  # stable: a tie keeps clusters before banks
    return [m for _, m in ranked]


def as_json(matches: Iterable[Match]) -> list[dict[str, Any]]:
    """The ``deepwatch similar --format json`` rows (a contract: fields only ever added)."""
    return [m.model_dump() for m in matches]


def _rank(settings: Settings, distance: int, via: str) -> tuple[float, int]:
    from detectors.neardup.pairing import rank_key

    return rank_key(distance, via, settings.dedupe.phash_threshold, settings.dedupe.pdq_threshold)


def similar_clusters(settings: Settings, picture: Picture, store: MemberReader | None,
                     progress: Progress | None = None) -> list[ClusterMatch]:
    """Clusters of ``store`` showing the picture. Elasticsearch: bit-vector
    kNN nominates candidate clusters (``similar_candidates``); SQLite: a hash
    index of every stored member kept by this process (``_MemberCodes``,
    grown from the members stored since) nominates them, and their members
    are read (``members_near``); a store with neither gives every member
    (``iter_members``). Either way the embedded index's matching rule and
    ranking decide, on every member of each nominated cluster."""
    if store is None:
        return []
    from detectors.neardup import ClusterIndex

    # members are indexed as-is: the writer already applied the chaining bound
    # when it clustered them, so the read side only asks "near any member?"
    index = ClusterIndex(**settings.dedupe.thresholds(), max_representative_distance=1 << 20)
    members: dict[str, list[tuple[str, ImageHashes]]] = {}
    # not the FindingsStore interface: each backend nominates candidates its own way, by an index
    # the other lacks (Elasticsearch: kNN over its documents; SQLite: its members table's rowids,
    # behind the process's hash index); any other store gives every member
    if isinstance(store, CandidateNominator):
        rows: Iterable[MemberRow] = store.similar_candidates(picture.sha256, picture.hashes)
    elif isinstance(store, KeyedMemberReader):
        rows = near_members(settings, picture, store, progress)
    else:
        rows = store.iter_members()
    for row in rows:
        h = ImageHashes(phash=row.phash, pdq=row.pdq, pdq_quality=row.pdq_quality, views=row.views,
                        trimmed=row.trimmed)
        index.add(row.cluster_id, row.sha256, h)
        members.setdefault(row.cluster_id, []).append((row.sha256, h))
    return _on_pixels(settings, picture, index.lookup(picture.sha256, picture.hashes), members)


def near_members(settings: Settings, picture: Picture, store: KeyedMemberReader,
                 progress: Progress | None = None) -> list[MemberRow]:
    """The members (``MemberRow``) of every cluster of a SQLite findings
    store that the picture's hashes may meet: each cluster with a member whose
    pHash codes (full frame and views) are within the widest pHash radius of
    one of the picture's codes (full, mirrored, views), or whose PDQ is
    within the PDQ radius, or the picture itself. A superset of what the
    index over every member (``iter_members``) nominates, so the clusters
    found, their distances and their order are the same; read in a few
    milliseconds from the process's hash index (``_MemberCodes``) and the
    store's indexes instead of every member per lookup."""
    from detectors.neardup.pairing import is_framed, query_codes
    from detectors.neardup.hamming import HammingIndex

    t = settings.dedupe
    h = picture.hashes
    codes = _member_codes(store, t.pdq_min_quality)
    queries = HammingIndex.codes_from_hex([c for _, c in query_codes(h)], 64)
    pdq = ([h.pdq] + ([h.pdq_mirror] if h.pdq_mirror else [])
           if h.pdq_quality >= t.pdq_min_quality and not is_framed(h.views, h.trimmed) else [])
    with codes.lock:  # milliseconds: the members stored since the last lookup, then the search
        codes.refresh(store, progress)
        keys = codes.search(queries, max(t.phash_threshold, t.view_threshold),
                            HammingIndex.codes_from_hex(pdq, 256) if pdq else None, t.pdq_threshold)
    return store.members_near(keys, picture.sha256)


class _MemberCodes:
    """Every stored member's pHash codes (full frame and views, as
    ``ClusterIndex`` indexes them: ``stored_phash_codes``) in a multi-index
    ``HammingIndex``, and the PDQ of those whose PDQ the rule trusts
    (quality, no frame) in a flat array, by the store's member key. Members
    are only ever added to a store, so it grows from the members stored since
    it last looked (``members_after``) and is rebuilt only when the file was
    replaced. Memory: about 60 bytes per pHash code and 40 per PDQ."""

    def __init__(self, pdq_min_quality: int):
        self.pdq_min_quality = pdq_min_quality
        self.lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        """Empty, as new; the lock stays: ``refresh`` clears while its caller holds it."""
        from detectors.neardup.hamming import HammingIndex

        self.phash = HammingIndex(64)
        self._pdq = np.zeros((0, 4), dtype=np.uint64)  # rows [0, n_pdq) used; capacity doubles
        self._pdq_keys = np.zeros(0, dtype=np.int64)
        self.n_pdq = 0
        self.last, self.last_sha = 0, None
        self.saved_last: int | None = None  # ``last`` when the copy on disk was loaded or saved
        self.saved_at = time.monotonic()  # when it was loaded, saved or started (``save_index``'s ``every_s``)

    def refresh(self, store: KeyedMemberReader, progress: Progress | None = None) -> None:
        from detectors.neardup.pairing import S_FULL, SLOTS, is_framed, stored_phash_codes
        from detectors.neardup.hamming import HammingIndex

        if self.last and store.member_key(self.last) != self.last_sha:
            self._clear()  # the file was replaced: start again
        total = store.members_count_after(self.last) if progress is not None else 0
        done = 0
        while rows := store.members_after(self.last):
            ids, codes, pkeys, pcodes = [], [], [], []
            # The usual member's full frame only, as plain ints: one array per page
            # instead of two per member (measured at 100,000 members, a third with
            # views: the build ~10% faster). Lookups ask the index for a set of
            # keys, so the order rows go in does not matter.
            full_ids, full_codes = [], []
            for key, sha, phash, pdq, quality, views, trimmed in rows:
                if views or trimmed:
                    slots, c = stored_phash_codes(phash, views, trimmed)
                    ids.append(key * SLOTS + slots)
                    codes.append(c[:, 0])
                else:
                    full_ids.append(key * SLOTS + S_FULL)
                    full_codes.append(int(phash, 16))
                if pdq and quality >= self.pdq_min_quality and not is_framed(views, trimmed):
                    pkeys.append(key)
                    pcodes.append(pdq)
            ids.append(np.array(full_ids, dtype=np.int64))
            codes.append(np.array(full_codes, dtype=np.uint64))
            self.phash.add(np.concatenate(ids), np.concatenate(codes))
            if pkeys:
                need = self.n_pdq + len(pkeys)
                if need > len(self._pdq_keys):
                    cap = max(need, 2 * len(self._pdq_keys), 1024)
                    self._pdq, self._pdq_keys = np.resize(self._pdq, (cap, 4)), np.resize(self._pdq_keys, cap)
                self._pdq[self.n_pdq:need] = HammingIndex.codes_from_hex(pcodes, 256)
                self._pdq_keys[self.n_pdq:need] = pkeys
                self.n_pdq = need
            self.last, self.last_sha = rows[-1].key, rows[-1].sha256
            if progress is not None:
                done += len(rows)
                progress(done, max(total, done))

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything the index holds, as ``from_arrays`` takes it back."""
        from detectors.neardup.pairing import SLOTS

        ids, codes = self.phash.rows()
        return {"format": np.array([INDEX_FORMAT, SLOTS, self.pdq_min_quality], dtype=np.int64),
                "last": np.array([self.last], dtype=np.int64), "last_sha": np.array([self.last_sha or ""]),
                "ids": ids, "codes": codes, "pdq": self._pdq[:self.n_pdq], "pdq_keys": self._pdq_keys[:self.n_pdq]}

    @classmethod
    def from_arrays(cls, pdq_min_quality: int, a: Any) -> "_MemberCodes":
        """The index ``arrays`` gave; ValueError when they are not such an
        index (another format, another rule, a damaged file)."""
        from detectors.neardup.pairing import SLOTS

        if a["format"].tolist() != [INDEX_FORMAT, SLOTS, pdq_min_quality]:
            raise ValueError(f"an index of format/slots/PDQ quality {a['format'].tolist()}")
        ids, codes, pdq, pdq_keys = a["ids"], a["codes"], a["pdq"], a["pdq_keys"]
        if (ids.dtype != np.int64 or codes.dtype != np.uint64 or codes.shape != (len(ids), 1)
                or pdq.dtype != np.uint64 or pdq.shape != (len(pdq_keys), 4) or pdq_keys.dtype != np.int64):
            raise ValueError("arrays of the wrong type or shape")
        index = cls(pdq_min_quality)
        index.phash.add(ids, codes)
        index._pdq, index._pdq_keys, index.n_pdq = pdq.copy(), pdq_keys.copy(), len(pdq_keys)
        index.last, index.last_sha = int(a["last"][0]), str(a["last_sha"][0]) or None
        return index

    def search(self, phash: np.ndarray, radius: int, pdq: np.ndarray | None, pdq_radius: int) -> set[int]:
        """Member keys with a pHash code within ``radius`` of one of
        ``phash`` or a PDQ within ``pdq_radius`` of one of ``pdq``."""
        from detectors.neardup.pairing import SLOTS

        _, ids, _ = self.phash.search(phash, radius)
        out = set((ids // SLOTS).tolist())
        if pdq is not None:
            # a flat scan (~40 bytes a member; HammingIndex's multi-index PDQ tables take
            # ~600, and its own scan is sized for a small delta, not a million rows):
            # about 10 ms per million members, in blocks bounding the temporary
            for lo in range(0, self.n_pdq, 1 << 17):
                hi = min(self.n_pdq, lo + (1 << 17))
                d = np.bitwise_count(self._pdq[None, lo:hi, :] ^ pdq[:, None, :]).sum(axis=2, dtype=np.int16)
                out.update(self._pdq_keys[lo:hi][(d <= pdq_radius).any(axis=0)].tolist())
        return out


# one hash index per open SQLite store (and PDQ quality bound), for the process's life
_CODES: "weakref.WeakKeyDictionary[Any, dict[int, _MemberCodes]]" = weakref.WeakKeyDictionary()
_CODES_LOCK = threading.Lock()


def _member_codes(store: Any, pdq_min_quality: int) -> _MemberCodes:
    with _CODES_LOCK:
        per = _CODES.setdefault(store, {})
        codes = per.get(pdq_min_quality)
        if codes is None:
            codes = per[pdq_min_quality] = _MemberCodes(pdq_min_quality)
    return codes


# ``deepwatch similar`` is one lookup per process: it indexed every member
# each time (11.5 s at a million). It keeps a copy of the index beside the
# SQLite file (``<file>.member-index-q<PDQ quality>.npz``, ~80 bytes a
# member), loads it and indexes only the members stored since; the desk loads
# it before its first lookup and saves it when it stops. A copy from another
# file (a restore) is caught as the process's index catches it (``refresh``);
# one it cannot read is ignored and written again.
INDEX_FORMAT = 1
DESK_SAVE_EVERY_S = 600.0


def index_file(store: Any, pdq_min_quality: int) -> Path | None:
    """Where the copy of a SQLite store's member index lives; None for other stores."""
    # only the SQLite store has members in an order an index can grow from, in a file
    if not isinstance(store, MemberIndexFile):
        return None
    return store.path.with_name(f"{store.path.name}.member-index-q{pdq_min_quality}.npz")


def load_index(settings: Settings, store: Any) -> bool:
    """Start this process's index of ``store`` from its saved copy, if there
    is one it can read and the process has no index of that store yet (True:
    loaded). Cheap once the process has one: a desk calls it per lookup."""
    q = settings.dedupe.pdq_min_quality
    path = index_file(store, q)
    if path is None:
        return False
    # under the lock: two first lookups at once load it once, and none indexes meanwhile
    with _CODES_LOCK:
        if q in _CODES.get(store, {}) or not path.is_file():
            return False
        try:
            with np.load(path, allow_pickle=False) as a:
                codes = _MemberCodes.from_arrays(q, a)
        except Exception as e:  # damaged, truncated, another format: index from the store instead
            log.warning("member index copy %s not used (%s); indexing the store", path, e)
            return False
        codes.saved_last = codes.last
        _CODES.setdefault(store, {})[q] = codes
    return True


def save_index(settings: Settings, store: Any, *, every_s: float = 0.0) -> bool:
    """Save this process's index of ``store`` beside it when it grew since it
    was loaded or saved, and that was at least ``every_s`` ago or there is no
    copy yet (True when written). A store whose directory cannot be written
    keeps no copy: the next lookup indexes it again."""
    q = settings.dedupe.pdq_min_quality
    path = index_file(store, q)
    codes = _CODES.get(store, {}).get(q)
    if path is None or codes is None or codes.last == codes.saved_last:
        return False
    if codes.saved_last is not None and time.monotonic() - codes.saved_at < every_s:
        return False  # a first index (seconds at a million members) is kept at once
    with codes.lock:
        buf = io.BytesIO()
        np.savez(buf, **codes.arrays())
        last = codes.last
    try:
        write_atomically(path, buf.getvalue())
    except OSError as e:
        log.info("member index copy not saved in %s (%s)", path.parent, e)
        codes.saved_at = time.monotonic()  # not tried again at every lookup
        return False
    codes.saved_last, codes.saved_at = last, time.monotonic()
    return True


def _on_pixels(settings: Settings, picture: Picture, found: list[Any],
               members: dict[str, list[tuple[str, ImageHashes]]]) -> list[ClusterMatch]:
    """The clusters the hashes found, kept when the image matches one of their
    members on pixels too, as the cluster writer decides. Stored members carry
    hashes without the thumbnail, so each found cluster's members are read
    with their whole record (``recorded_hashes``); a member with neither record
    nor bytes keeps its stored hashes, which then decide alone. Without this,
    look-alikes (one prompt's other seed) come back as "the same picture"."""
    from detectors.neardup import ClusterIndex
    from streams.analyze import recorded_hashes

    index = ClusterIndex(**settings.dedupe.thresholds(), max_representative_distance=1 << 20)
    for f in found:
        for sha, stored in members.get(f.cluster_id, []):
            index.add(f.cluster_id, sha, recorded_hashes(settings, sha) or stored, representative=True)
    return [ClusterMatch(cluster_id=m.cluster_id, distance=m.distance, via=m.via)
            for m in index.lookup(picture.sha256, picture.hashes)]


def similar_banks(settings: Settings, picture: Picture) -> list[BankMatch]:
    """Bank entries showing the picture; none when there is no banks file
    (opening one would create it). The entries' hash index is loaded once
    per process and file version (``_banks_version``), not per lookup."""
    if not settings.banks_path.exists():
        return []
    key = (str(settings.banks_path.resolve()), tuple(sorted(settings.dedupe.thresholds().items())))
    version = _banks_version(settings.banks_path)  # before reading: a write meanwhile only reloads it next time
    banks = settings.bank_store()
    try:
        with _BANKS_LOCK:
            have = _BANKS.get(key)
        if have is not None and have[0] == version:
            banks.use_index(have[1])
        found = banks.match(picture.hashes)
        with _BANKS_LOCK:
            _BANKS[key] = (version, banks.index())
    finally:
        banks.close()
    return [BankMatch(bank=m.bank, entry_id=m.entry_id, verdict=m.verdict, label=m.label, distance=m.distance,
                      via=m.via) for m in found]


# banks file -> (its version, its entries' index), for the process's life
_BANKS: dict[tuple, tuple[tuple, Any]] = {}
_BANKS_LOCK = threading.Lock()


def _banks_version(path: Any) -> tuple:
    """What changes whenever the banks file is written to: SQLite's file
    change counter (bytes 24-27 of the header, bumped by every commit outside
    WAL mode) and the file's and its write-ahead log's inode, size and time."""
    import os

    def stat(p: str) -> tuple | None:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    try:
        with open(path, "rb") as f:
            counter = f.read(28)[24:]
    except OSError:
        counter = b""
    return counter, stat(str(path)), stat(f"{path}-wal")
