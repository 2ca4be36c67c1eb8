"""Banks of known pictures: hash lists of debunked fakes (and of authentic
photos that keep getting called fake), matched against every new image.

One SQLite file holds all banks. Entries come from images (``add_images``;
``add_image_bytes`` for pictures held elsewhere than in files) or from hash
lists as fact-checkers and hash-sharing programs exchange them
(``import_csv``: ThreatExchange-style ``pdq`` hex column, optional
``id``/``label``/``quality``, and/or a ``phash`` column). Matching uses the
thresholds of clustering (``detectors.neardup.pair_match``): pHash or mirrored
pHash within the pHash threshold, or PDQ / mirrored PDQ within the PDQ
threshold with both qualities trusted. An imported PDQ without a quality
column is trusted: sharing programs already drop low-quality hashes. Unlike
``pair_match``, a framed query (a screenshot, a caption bar) still matches an
imported entry on its PDQ: entries from a hash list carry nothing else, and a
screenshot of a debunked fake is the repost a bank exists for.

Crops and screenshots: entries added from images also store their pHash
*views* (``ImageHashes.views``: trimmed border, centre crops), so a cropped or
screenshotted repost of a banked picture matches (``via="phash_view"``); an
image's own views reach every entry with a pHash, imported ones included.
Imported PDQ-only entries have no views: crops of those are not found.

Pixels: entries added from images keep their whole hash record (``record``,
with its 32x32 thumbnail); when the hashes nominate one, it answers as a
cluster's picture does (``ClusterIndex.lookup``: the hash pair verified on
pixels). Hashes alone put
look-alikes within reach -- one prompt's seeds, aligned faces, a sketch and
a painting of one subject -- and a bank hit is near-conclusive evidence, so a
fact-check of one picture must not mark its look-alikes. Entries without a
record (imported hash lists, entries added before records were kept) and
queries without a thumbnail match on hashes alone.

Signal types: import, validation, matching and the evidence's wording go
through the registered signal types (``detectors.signals``: each one's hex
length, CSV column aliases, record fields, quality, label), not per-hash
code; the schema's columns stay ``phash``/``pdq``/``pdq_quality``
(``_BANK_COLUMNS``). Two places stay specific through the interface, not by
name: the type that carries views (``has_views``: pHash) is searched with
them under the pair rule (``search_phash``), and a type with a quality
(``has_quality``: PDQ) is matched only above its quality floor.
"""

from __future__ import annotations

import csv
import functools
import io
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel

from detectors.base import Detector, Evidence, EvidenceKind
from detectors.hashing import ImageHashes, compute_hashes
from detectors.imagedata import DecodeLimits, ImageData
from detectors.neardup.clusters import FLAT_QUALITY, ClusterIndex
from detectors.neardup.pairing import (
    PDQ_MIN_QUALITY, PDQ_THRESHOLD, PHASH_THRESHOLD, SLOTS, VIEW_THRESHOLD, Via, rank_key, search_phash,
    stored_phash_codes,
)
from detectors.neardup.hamming import HammingIndex
from detectors.regular_file import open_regular
from detectors.signals import PDQ, CopyKind, PHash, SignalType, describe_via, signal_types
from detectors.sqlite_errors import primary_code

Verdict = Literal["fake", "authentic"]
_K = TypeVar("_K")  # what an add call's progress callback is told per picture (add_images: the file's path)
_TRUSTED = 100  # quality assumed for imported hashes (PDQ) that come without one

# The signal types a bank stores, and where: (hash column, quality column).
# The schema is fixed (files written by every earlier version open as they
# are), so a signal type has a column only here; one registered without
# (a plugin, a test's) is not stored or matched by banks.
_BANK_COLUMNS: dict[str, tuple[str, str | None]] = {PDQ.name: ("pdq", "pdq_quality"), PHash.name: ("phash", None)}


def _bank_types() -> list[type[SignalType]]:
    """The registered signal types banks store, in registry order (PDQ, pHash)."""
    return [st for st in signal_types() if st.name in _BANK_COLUMNS]


def _signal_cells(hashes: dict[str, str | None],
                  quality: dict[str, int | None]) -> tuple[list[str], list[str | int | None]]:
    """(columns, values) of an entry's codes and qualities, per signal type banks store."""
    cols: list[str] = []
    values: list[str | int | None] = []
    for st in _bank_types():
        col, qcol = _BANK_COLUMNS[st.name]
        cols.append(col)
        values.append(hashes.get(st.name))
        if qcol:
            cols.append(qcol)
            values.append(quality.get(st.name))
    return cols, values


def _image_from(load: Callable[[], bytes], limits: DecodeLimits | None) -> ImageData:
    return ImageData(load(), limits=limits)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS banks (
    name TEXT PRIMARY KEY,
    verdict TEXT NOT NULL CHECK (verdict IN ('fake', 'authentic'))
);
CREATE TABLE IF NOT EXISTS entries (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    bank TEXT NOT NULL REFERENCES banks(name),
    entry_id TEXT NOT NULL,
    label TEXT,
    phash TEXT,
    pdq TEXT,
    pdq_quality INTEGER,
    sha256 TEXT,
    views TEXT,
    trimmed INTEGER,
    UNIQUE (bank, entry_id)
);
-- add_images skips files already in the bank: one lookup per file
CREATE INDEX IF NOT EXISTS entries_bank_sha256 ON entries(bank, sha256);
"""
# banks created before these columns existed get them on open
_ADDED_COLUMNS = {"views": "TEXT", "trimmed": "INTEGER", "record": "TEXT"}


class BankInfo(BaseModel):
    name: str
    verdict: Verdict
    entries: int


class BankMatch(BaseModel):
    bank: str
    verdict: Verdict
    entry_id: str
    label: str | None
    distance: int
    via: Via


class BankFileError(OSError):
    """The banks file cannot be used: it cannot be opened or written (a
    directory without write permission, a read-only mount), or it is not a
    banks file at all (a findings store copied over it). The message names
    the file and the fix; an OSError, so the CLI answers it in one line."""


class ImagesRejected(ValueError):
    """``add_images`` with ``on_bad``: files could not be read or hashed, and
    nothing was added (``keep_rest`` was not set). Each file and its error was
    handed to ``on_bad`` already; ``count`` is how many."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} file{'' if count == 1 else 's'} could not be read or hashed; nothing added")
        self.count = count


_SQLITE_ERROR = sqlite3.Error  # bound here: a test may swap this module's sqlite3 for a stub
_BANK_TABLES = {"banks", "entries", "sqlite_sequence"}  # sqlite_sequence: the AUTOINCREMENT counter


class BankStore:
    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        phash_threshold: int = PHASH_THRESHOLD,
        pdq_threshold: int = PDQ_THRESHOLD,
        pdq_min_quality: int = PDQ_MIN_QUALITY,
        view_threshold: int = VIEW_THRESHOLD,
    ):
        """``read_only``: open an existing file for reading only (``list_banks``,
        ``match``): nothing is created, migrated or written, so it works in a
        directory or on a file the user may not write. A missing file is a
        ``BankFileError``, as is, in either mode, a file that is not a banks file."""
        self.path = Path(path)
        self.read_only = read_only
        self.phash_threshold = phash_threshold
        self.pdq_threshold = pdq_threshold
        self.pdq_min_quality = pdq_min_quality
        self.view_threshold = view_threshold
        self._cache: _Loaded | None = None
        if read_only:
            if not self.path.is_file():
                raise BankFileError(f"no banks file at {self.path}")
            try:
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            except _SQLITE_ERROR as e:
                raise self._file_error(e, "read") from None
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BankFileError(f"cannot create the directory of banks file {self.path} ({e.strerror or e}): "
                                    "pick a writable directory (--data-dir)") from None
            try:
                self._db = sqlite3.connect(self.path)
            except _SQLITE_ERROR as e:
                raise self._file_error(e, "open") from None
        try:
            self._open()
        except BankFileError:
            self._db.close()
            raise
        except _SQLITE_ERROR as e:
            self._db.close()
            raise self._file_error(e, "read" if read_only else "open") from None

    @property
    def _threshold(self) -> dict[str, int]:
        """Match radius per signal type (the constructor's names, kept as attributes)."""
        return {PHash.name: self.phash_threshold, PDQ.name: self.pdq_threshold}

    @property
    def _min_quality(self) -> dict[str, int]:
        """Quality floor per signal type that carries a quality."""
        return {PDQ.name: self.pdq_min_quality}

    def _open(self) -> None:
        tables = {n for n, in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables - _BANK_TABLES:
            # checked before anything is written: CREATE TABLE IF NOT EXISTS would
            # quietly add bank tables to another program's database
            raise BankFileError(f"{self.path} is not a deepwatch banks file (its tables: {', '.join(sorted(tables)[:5])}): "
                                "move it aside (deepwatch starts a new one on `deepwatch bank add`) or restore it, "
                                "or pass the --data-dir that holds your banks")
        if not self.read_only:
            self._db.executescript(_SCHEMA)
            have = self._columns()
            for col, typ in _ADDED_COLUMNS.items():
                if col not in have:
                    self._db.execute(f"ALTER TABLE entries ADD COLUMN {col} {typ}")
            self._db.commit()
            tables = {"banks", "entries"}
        self._tables = tables
        self._have = self._columns()

    def _columns(self) -> set[str]:
        return {r[1] for r in self._db.execute("PRAGMA table_info(entries)")}

    def _file_error(self, e: BaseException, verb: str) -> BankFileError:
        """A SQLite error opening, reading or writing the file, as one line naming it and the fix."""
        text = str(e)
        # By SQLite's result code (primary: SQLITE_BUSY_SNAPSHOT is a BUSY), not
        # its words: "cannot commit transaction - SQL statements in progress" is
        # an SQLITE_BUSY too.
        code = primary_code(e)
        if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            fix = "another deepwatch command is writing it; try again when it is done"
        elif code in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            fix = "move it aside (deepwatch starts a new one) or restore it from a backup"
        elif self.read_only:
            fix = f"check that you may read it and {self.path.parent}, or pass the --data-dir that holds your banks"
        else:
            fix = (f"check that you may write to {self.path} and to {self.path.parent} (permissions, a read-only "
                   "disk, free space), or pass --data-dir a directory you can write")
        return BankFileError(f"cannot {verb} banks file {self.path} ({text}): {fix}")

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------- writing
    def _ensure_bank(self, name: str, verdict: Verdict) -> None:
        if verdict not in ("fake", "authentic"):
            raise ValueError(f"verdict must be 'fake' or 'authentic', not {verdict!r}")
        row = self._db.execute("SELECT verdict FROM banks WHERE name = ?", (name,)).fetchone()
        if row is None:
            self._db.execute("INSERT INTO banks (name, verdict) VALUES (?, ?)", (name, verdict))
        elif row[0] != verdict:
            raise ValueError(f"bank {name!r} holds {row[0]} pictures; use another bank for {verdict} ones")

    def _next_id(self, name: str) -> int:
        row = self._db.execute(
            "SELECT MAX(CAST(entry_id AS INTEGER)) FROM entries WHERE bank = ? AND entry_id GLOB '[0-9]*'", (name,)
        ).fetchone()
        return int(row[0] or 0) + 1

    def add_images(
        self,
        name: str,
        verdict: Verdict,
        paths: Iterable[str | Path],
        *,
        progress: Callable[[Path], None] | None = None,
        limits: DecodeLimits | None = None,
        on_bad: Callable[[Path, Exception], None] | None = None,
        keep_rest: bool = False,
    ) -> int:
        """Hash and add image files, each entry labelled with its file name;
        returns how many were new (same bytes twice count once).
        ``limits``: the decode limits to read them under (the configured ones; default DecodeLimits()).
        All or nothing: a file that fails leaves the store as it was.

        Without ``on_bad`` the first file that cannot be read or hashed raises.
        With it, each such file (``ImageRejected``, ``ValueError``, ``OSError``
        while reading, decoding or hashing it: a truncated JPEG passes the header
        checks and fails only here) is handed to ``on_bad(path, error)`` and
        the others are still hashed, so one pass finds every bad file; then,
        if any was bad, nothing is added and ``ImagesRejected`` is raised,
        unless ``keep_rest``, which adds the others. Either way one picture is
        held at a time."""
        def items() -> Iterator[tuple[str, Callable[[], ImageData], Path]]:
            for p in paths:
                p = Path(p)
                yield p.name, functools.partial(ImageData.from_path, p, limits), p

        return self._add_all_or_nothing(name, verdict, items(), progress, on_bad, keep_rest)

    def add_image_bytes(
        self,
        name: str,
        verdict: Verdict,
        items: Iterable[tuple[str, Callable[[], bytes]]],
        *,
        limits: DecodeLimits | None = None,
    ) -> int:
        """Hash and add pictures given as (label, loader) pairs, each entry
        labelled ``label``; returns how many were new, as ``add_images`` does
        for files, under the same ``limits`` and all or nothing. A loader is
        called when its picture is hashed, and its bytes are let go before
        the next is read: pictures from a blob store are banked one at a
        time, whatever their number, with no temporary files."""
        def decoded() -> Iterator[tuple[str, Callable[[], ImageData], str]]:
            for label, load in items:
                yield label, functools.partial(_image_from, load, limits), label

        return self._add_all_or_nothing(name, verdict, decoded(), None)

    def _add_all_or_nothing(self, name: str, verdict: Verdict,
                            items: Iterable[tuple[str, Callable[[], ImageData], _K]],
                            progress: Callable[[_K], None] | None,
                            on_bad: Callable[[_K, Exception], None] | None = None, keep_rest: bool = False) -> int:
        """Add (label, image loader, progress key) items in one transaction (``_add_images``)."""
        try:
            return self._add_images(name, verdict, items, progress, on_bad, keep_rest)
        except BaseException as e:
            # without this the half-written rows stay pending on the connection
            # and the next successful call on this store would commit them
            self._rollback()
            if isinstance(e, _SQLITE_ERROR):  # the file, not the image: say which file and what to do
                raise self._file_error(e, "write") from None
            raise

    def _add_images(self, name: str, verdict: Verdict, items: Iterable[tuple[str, Callable[[], ImageData], _K]],
                    progress: Callable[[_K], None] | None,
                    on_bad: Callable[[_K, Exception], None] | None = None, keep_rest: bool = False) -> int:
        self._ensure_bank(name, verdict)
        next_id = self._next_id(name)
        added = 0
        bad = 0
        for label, load, key in items:
            # the picture is loaded inside the call and dropped when it returns:
            # one picture's bytes held at a time
            try:
                new = self._add_image(name, str(next_id), label, load())
            except (ValueError, OSError) as e:  # ImageRejected is a ValueError; SQLite errors are neither
                if on_bad is None:
                    raise
                # the picture failed before its row was written: passing over it leaves nothing behind
                on_bad(key, e)
                bad += 1
                new = False
            if new:
                next_id += 1
                added += 1
            if progress:
                progress(key)
        if bad and not keep_rest:
            raise ImagesRejected(bad)  # rolled back by _add_all_or_nothing
        self._db.commit()
        self._cache = None
        return added

    def _add_image(self, name: str, entry_id: str, label: str, data: ImageData) -> bool:
        """Write one picture's entry as ``entry_id`` (uncommitted); False when
        its bytes were in the bank already (an entry from before records were
        kept gets its record now)."""
        have = self._db.execute("SELECT rowid, record FROM entries WHERE bank = ? AND sha256 = ?",
                                (name, data.sha256)).fetchone()
        if have is not None and have[1] is not None:
            return False
        h = compute_hashes(data)
        record = h.model_dump_json() if h.thumb is not None else None  # kept for its pixels only
        if have is not None:  # added before records were kept: now it can be verified on pixels
            self._db.execute("UPDATE entries SET record = ? WHERE rowid = ?", (record, have[0]))
            return False
        cols, cells = _signal_cells({st.name: st.code(h) for st in _bank_types()},
                                    {st.name: st.quality(h) for st in _bank_types() if st.has_quality})
        cols += ["sha256", "views", "trimmed", "record"]  # views: the pHash views (``PHash.has_views``)
        cells += [data.sha256, ",".join(h.views or []) or None, int(h.trimmed), record]
        self._db.execute(f"INSERT INTO entries (bank, entry_id, label, {', '.join(cols)}) VALUES "
                         f"({','.join('?' * (len(cols) + 3))})", [name, entry_id, label, *cells])
        return True

    def import_csv(self, name: str, csv_path: str | Path, verdict: Verdict) -> int:
        """Import a shared hash list; returns rows imported (re-imported ids are replaced).
        All or nothing: a bad row leaves the store as it was (see ``add_images``)."""
        try:
            return self._import_csv(name, Path(csv_path), verdict)
        except BaseException as e:
            self._rollback()
            if isinstance(e, _SQLITE_ERROR):
                raise self._file_error(e, "write") from None
            raise

    def _rollback(self) -> None:
        try:
            self._db.rollback()
        except _SQLITE_ERROR:  # a failed write may leave nothing to roll back; the first error is the one to tell
            pass

    def _import_csv(self, name: str, csv_path: Path, verdict: Verdict) -> int:
        rows = list(_read_hash_csv(Path(csv_path)))
        if not rows:  # an empty download or a header alone: say so, and make no empty bank
            raise ValueError(f"{csv_path}: no hashes in it (empty, or a header only)")
        self._ensure_bank(name, verdict)
        next_id = self._next_id(name)
        n = 0
        for r in rows:
            entry_id = r["id"] or str(next_id + n)
            cols, cells = _signal_cells(r["hashes"], r["quality"])
            self._db.execute(f"INSERT OR REPLACE INTO entries (bank, entry_id, label, {', '.join(cols)}) VALUES "
                             f"({','.join('?' * (len(cols) + 3))})", [name, entry_id, r["label"], *cells])
            n += 1
        self._db.commit()
        self._cache = None
        return n

    # ------------------------------------------------------------- reading
    def list_banks(self) -> list[BankInfo]:
        if not {"banks", "entries"} <= self._tables:  # read-only, an empty file: no banks yet
            return []
        rows = self._db.execute(
            "SELECT b.name, b.verdict, COUNT(e.rowid) FROM banks b LEFT JOIN entries e ON e.bank = b.name "
            "GROUP BY b.name ORDER BY b.name"
        ).fetchall()
        return [BankInfo(name=n, verdict=v, entries=c) for n, v, c in rows]

    def match(self, hashes: ImageHashes) -> list[BankMatch]:
        """Bank entries showing this picture, nearest (by distance / threshold) first:
        entries with a record when the pixels agree too, the others on hashes alone."""
        loaded = self._load()
        best: dict[int, tuple[float, int, int, Via]] = {}
        threshold, min_quality = self._threshold, self._min_quality

        def consider(index: HammingIndex, hexes: list[tuple[str, str]], nbits: int, radius: int) -> None:
            if not len(index) or not hexes:
                return
            qi, rows, dist = index.search(HammingIndex.codes_from_hex([h for _, h in hexes], nbits), radius)
            for q, row, d in zip(qi.tolist(), rows.tolist(), dist.tolist()):
                via: Via = hexes[q][0]  # type: ignore[assignment] # a field name of the record: a Via
                key = (*rank_key(d, via, self.phash_threshold, self.pdq_threshold), d, via)
                if row not in best or key < best[row]:
                    best[row] = key

        # A flat picture (a black frame) has a pHash of noise around zero: on hashes
        # alone it met any entry of another flat picture, and a shared list holding
        # 0000000000000000 made every black frame a known fake. As clusters do
        # (``FLAT_QUALITY``), it meets only entries whose pixels the bank holds.
        flat = hashes.pdq_quality is not None and hashes.pdq_quality < FLAT_QUALITY
        for st in _bank_types():
            if st.has_views:
                # pHash is searched with its views under the pair rule (which
                # view may meet which, ``search_phash``): that rule is the
                # views' own, so the type that carries views goes through it
                for row, d, via in search_phash(loaded.codes[st.name], hashes, threshold[st.name], self.view_threshold):
                    if flat and row not in loaded.recorded:
                        continue
                    key = (*rank_key(d, via, self.phash_threshold, self.pdq_threshold), d, via)
                    if row not in best or key < best[row]:
                        best[row] = key
                continue
            if st.has_quality and st.quality(hashes) < min_quality[st.name]:
                continue  # PDQ of a flat, featureless picture is noise
            consider(loaded.codes[st.name], [(v, h) for v, h in st.values(hashes) if h], st.bits, threshold[st.name])
        if hashes.thumb is not None and not loaded.recorded.isdisjoint(best):
            # Entries with a record answer on pixels. Asked only when the hashes
            # nominated one: most images match no bank entry, and the hash
            # search alone costs about half as much.
            nominated = loaded.recorded.intersection(best)
            pictures = ClusterIndex(phash_threshold=self.phash_threshold, pdq_threshold=self.pdq_threshold,
                                    pdq_min_quality=self.pdq_min_quality, view_threshold=self.view_threshold)
            for row in nominated:  # one picture per entry; the member key only has to be unique
                pictures.add(str(row), f"entry:{row}", loaded.record(row), representative=True)
            verified = {int(m.cluster_id): m for m in pictures.lookup("", hashes)}
            for row in nominated:
                if row in verified:
                    m = verified[row]
                    best[row] = (*rank_key(m.distance, m.via, self.phash_threshold, self.pdq_threshold), m.distance, m.via)
                else:
                    del best[row]
        out = []
        for row, (_, _, d, via) in sorted(best.items(), key=lambda kv: (kv[1], kv[0])):
            bank, entry_id, label, verdict = loaded.meta[row]
            out.append(BankMatch(bank=bank, verdict=verdict, entry_id=entry_id, label=label, distance=d, via=via))
        return out

    def index(self) -> "_Loaded":
        """The entries' hash index ``match`` searches, loaded once per store:
        a reader that outlives this store (the desk) may hand it to the next
        one over the unchanged file (``use_index``) instead of loading it again."""
        return self._load()

    def use_index(self, loaded: "_Loaded") -> None:
        """Search ``loaded`` (``index`` of a store over this file, unchanged since)."""
        self._cache = loaded

    def _load(self) -> _Loaded:
        if self._cache is None:
            # read-only, a file from before some columns existed: those read as NULL
            views, trimmed, record = (f"e.{c}" if c in self._have else "NULL" for c in ("views", "trimmed", "record"))
            types = _bank_types()
            # per signal type: its hash column, then its quality column (NULL: none)
            cols = [f"e.{c}" if c else "NULL" for st in types for c in _BANK_COLUMNS[st.name]]
            rows = [] if not {"banks", "entries"} <= self._tables else self._db.execute(
                f"SELECT e.rowid, e.bank, e.entry_id, e.label, b.verdict, {views}, {trimmed}, {record}, "
                f"{', '.join(cols)} FROM entries e JOIN banks b ON b.name = e.bank ORDER BY e.rowid"
            ).fetchall()
            loaded = _Loaded(types)
            loaded.records = {r[0]: r[7] for r in rows if r[7]}
            loaded.recorded = frozenset(loaded.records)
            for k, st in enumerate(types):
                at = 8 + 2 * k  # this type's hash; its quality follows
                if st.has_views:
                    # pHash: each entry's code and its stored views, in the
                    # pair rule's index slots (``stored_phash_codes``)
                    ids, codes = [], []
                    for r in rows:
                        if r[at]:
                            slots, c = stored_phash_codes(r[at], r[5].split(",") if r[5] else None, bool(r[6]))
                            ids.append(r[0] * SLOTS + slots)
                            codes.append(c)
                    if ids:
                        loaded.codes[st.name].add(np.concatenate(ids), np.concatenate(codes))
                    continue
                floor = self._min_quality[st.name] if st.has_quality else None
                pq = [(r[0], r[at]) for r in rows
                      if r[at] and (floor is None or (r[at + 1] if r[at + 1] is not None else _TRUSTED) >= floor)]
                if pq:
                    loaded.codes[st.name].add(np.array([i for i, _ in pq]),
                                              HammingIndex.codes_from_hex([h for _, h in pq], st.bits))
            loaded.meta = {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}
            self._cache = loaded
        return self._cache


class _Loaded:
    def __init__(self, types: list[type[SignalType]]) -> None:
        # per signal type, every entry's codes (pHash: with its views' codes)
        self.codes: dict[str, HammingIndex] = {st.name: st.new_index() for st in types}
        # entries with a hash record (written only with a thumbnail): row ->
        # its JSON, parsed when the hashes first nominate the entry
        self.records: dict[int, str] = {}
        self.recorded: frozenset[int] = frozenset()
        self._parsed: dict[int, ImageHashes] = {}
        self.meta: dict[int, tuple[str, str, str | None, Verdict]] = {}

    def record(self, row: int) -> ImageHashes:
        if row not in self._parsed:
            self._parsed[row] = ImageHashes.model_validate_json(self.records[row])
        return self._parsed[row]


def _read_hash_csv(path: Path) -> Iterable[dict]:
    """Rows of {id, label, hashes: {signal name: hex or None}, quality:
    {signal name: int or None}} from a shared hash list, for each signal type
    banks store (``_bank_types``).

    Accepts a header naming the columns (each type's ``csv_aliases``: PDQ
    ``pdq``/``pdq_hash``/``hash``/``signal_value``, pHash ``phash``/``p_hash``;
    ``id``/``entry_id``, ``label``/``name``/``filename``/``tags``, and a quality
    type's ``quality_aliases``: ``quality``/``pdq_quality``) or a headerless list
    whose first column is the hash (its length says its type: 64 hex = PDQ, 16 hex = pHash).
    """
    try:
        # open_regular: a FIFO named as the list would be waited on forever,
        # a device such as /dev/zero read without end (FileRefused, an OSError)
        with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = [r for r in reader if r and any(c.strip() for c in r)]
    except csv.Error as e:  # a field over csv's size limit, a malformed quote: not a hash list
        raise ValueError(f"{path}:{reader.line_num}: not a readable CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a CSV hash list?") from None
    if not rows:
        return
    types = _bank_types()
    head = [c.strip().lower() for c in rows[0]]

    def column(names: tuple[str, ...]) -> int | None:
        return next((head.index(a) for a in names if a in head), None)

    meta = {"id": ("id", "entry_id"), "label": ("label", "name", "filename", "file", "tags")}
    cols = {k: column(names) for k, names in meta.items()}
    hash_cols = {st.name: column(st.csv_aliases) for st in types}
    quality_cols = {st.name: column(st.quality_aliases) for st in types if st.has_quality}
    has_header = not any(st.is_valid(head[0]) for st in types)
    if not has_header:  # the first column is the hash, of whichever type its length says; then a label
        cols = {"id": None, "label": 1 if len(rows[0]) > 1 else None}
        hash_cols = {st.name: 0 for st in types}
        quality_cols = {name: None for name in quality_cols}
    elif all(i is None for i in hash_cols.values()):
        def either(names: tuple[str, ...]) -> str:
            return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))

        accepted = ", or ".join(f"{either(st.csv_aliases)} ({st.hex_len}-hex {st.label})" for st in types)
        raise ValueError(f"{path}: no {' or '.join(st.name for st in types)} column in header {rows[0]}; "
                         f"a hash column is named {accepted}; or leave the header out, the hash first on each line")
    for n, r in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
        def get(i: int | None) -> str | None:
            return r[i].strip() if i is not None and i < len(r) and r[i].strip() else None

        hashes: dict[str, str | None] = {}
        for st in types:
            text = get(hash_cols[st.name])
            hashes[st.name] = st.validate(text) if text and st.is_valid(text) else None
        if all(h is None for h in hashes.values()):
            raise ValueError(f"{path}:{n}: no valid {' or '.join(f'{st.hex_len}-hex {st.label}' for st in types)}"
                             f" ({_cells_read(rows[0] if has_header else None, hash_cols, get)})")
        quality = {name: _quality(get(i), f"{path}:{n}") for name, i in quality_cols.items()}
        yield {"id": get(cols["id"]), "label": get(cols["label"]), "hashes": hashes, "quality": quality}


def _cells_read(header: list[str] | None, hash_cols: dict[str, int | None],
                get: Callable[[int | None], str | None]) -> str:
    """What a line that has no valid hash held where the hashes were read:
    the column and its text, so a list of another kind of hash (an MD5 in a
    column named ``hash``) says so rather than leaving the user to guess."""
    seen: list[str] = []
    for i in dict.fromkeys(i for i in hash_cols.values() if i is not None):
        name = f"column {header[i].strip()!r}" if header is not None else "the first column"
        text = get(i)
        if text is None:
            seen.append(f"{name} is empty")
        else:
            shown = text if len(text) <= 70 else text[:69] + "…"
            seen.append(f"{name} holds {shown!r}, {len(text)} characters")
    return "; ".join(seen)


def _quality(text: str | None, where: str) -> int | None:
    """A PDQ quality cell as an int 0..100 (PDQ's scale; "87.0" is accepted),
    None when empty; anything else ("abc", "inf", "nan", 250) names its row."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 100:  # also false for nan
        raise ValueError(f"{where}: quality {text!r} is not a number from 0 to 100")
    return int(value)


# what a match by hash compared, by its kind
_COMPARED = {CopyKind.NEAR: "", CopyKind.MIRRORED: " (mirrored)", CopyKind.VIEW: " (crop/screenshot view)"}


def _via_words(via: str) -> tuple[str, str]:
    """How a match was made, in evidence-detail words: what the distance is
    a distance of ("PDQ", "SHA-256") and what was compared (" (mirrored)"),
    from the via's description (``describe_via``), so a registered type is
    worded by being registered. A via nothing registered reads is named as
    it stands, as the desk names it (``BankMatch.via`` admits only the
    index's vias, so only one added to ``Via`` and to no type's ``fields``
    or ``view_via`` gets here): a bank hit is a fact-check, near-conclusive,
    and is not to be lost -- nor the image's analysis fail -- over its words."""
    d = describe_via(via)
    match d.kind:
        case CopyKind.SAME_FILE:
            return "SHA-256", " (the same file)"
        case CopyKind.ONE_COLOUR:
            return "grey level", " (a one-colour picture)"
        case CopyKind.UNKNOWN:
            return via, ""
    return str(d.label), _COMPARED[d.kind]  # a match by hash: its description carries the hash's label


def bank_evidence(matches: list[BankMatch]) -> list[Evidence]:
    """Evidence per matching bank (its nearest entry). An authentic bank's
    item carries ``data["suppress"]``: the cluster engine then suppresses the
    cluster's alerts (``streams.clustering``); fusion reads only its verdict."""
    out: list[Evidence] = []
    seen: set[str] = set()
    for m in matches:  # nearest first, so the first per bank is its best
        if m.bank in seen:
            continue
        seen.add(m.bank)
        hash_name, how = _via_words(m.via)
        label = f" {m.label!r}" if m.label else ""
        out.append(
            Evidence(
                detector=f"bank:{m.bank}",
                kind=EvidenceKind.BANK,
                score=0.97 if m.verdict == "fake" else 0.03,
                # a bank hit is a human fact-check: near-conclusive, a bit less so at the threshold edge
                weight=3.0 if m.distance <= 4 else 2.0,
                detail=f"matches {m.bank!r} entry {m.entry_id}{label} at {hash_name} distance {m.distance}{how}",
                data={
                    "bank": m.bank,
                    "verdict": m.verdict,
                    "entry_id": m.entry_id,
                    "label": m.label,
                    "distance": m.distance,
                    "via": m.via,
                    "suppress": m.verdict == "authentic",
                },
            )
        )
    return out


class BankMatcher(Detector):
    """Bank matches as a detector, for callers that analyse single files
    (``deepwatch detect``); the stream attaches bank evidence in its analyze
    stage from hashes it has already computed."""

    name = "banks"
    cost = "cheap"
    kind = EvidenceKind.BANK

    def __init__(self, store: BankStore):
        self.store = store

    def analyze(self, image: ImageData) -> list[Evidence]:
        return bank_evidence(self.store.match(compute_hashes(image)))
