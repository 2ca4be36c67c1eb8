"""Stages 3–5a: decode, hash and run the cheap per-image detectors.

Runs on the worker's event loop for small pictures and in a thread for large
ones (``streams.stage``); the result is a ``Sighting`` ready for the
single-writer cluster agent. An analysis is kept per sha256, in memory and on
disk, so an exact repost costs a digest and a lookup, not a second decode.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from detectors.atomic_file import write_atomically
from detectors.base import Detector, Evidence, EvidenceKind, create_all
from detectors.freed_memory import TRIM_AFTER_BYTES, release_freed_memory
from detectors.hashing import HASHES_VERSION, ImageHashes, compute_hashes
from detectors.imagedata import ImageData, ImageRejected, process_budget
from streams import metrics
from streams.blobstore import DirectoryBlobStore, blob_dir
from streams.private_files import private_dir
from streams.recent import Recent
from streams.records import ImageEvent, ImageRef, Sighting, SourceRef
from streams.settings import Settings

log = logging.getLogger(__name__)


ANALYSES_REMEMBERED = 2_000  # ~5 KB each: about 10 MB per analyze stage

# A failed write of the analysis cache is logged at most this often per errno:
# on a full disk every analysis fails to write it.
CACHE_WARN_EVERY_S = 60.0
_cache_warned: dict[int, tuple[float, int]] = {}  # errno -> (when last logged, failures since)
_cache_warned_lock = threading.Lock()


class Analysis(NamedTuple):
    """What one picture's bytes yield, whichever event carried them."""

    hashes: ImageHashes
    evidence: list[Evidence]
    size: tuple[int, int]
    format: str


class Analyzer:
    def __init__(self, settings: Settings, blob_root: Path):
        self.settings = settings
        self.limits = settings.decode_limits()
        self.detectors: list[Detector] = create_all(cost="cheap", names=settings.detect.cheap)
        self._blob_root = blob_root
        # 0700 where made here; its files are 0600 (``write_analysis``)
        private_dir(blob_root / ANALYSIS_DIR)
        # A viral picture is reposted byte for byte within minutes: its
        # analysis is kept in memory too, not only read back from disk.
        self._recent = Recent(ANALYSES_REMEMBERED)
        self._banks_path = settings.banks_path
        self._banks_mtime: float | None = None  # of the file ``_banks`` was loaded from
        self._banks_checked = 0.0
        self._banks = None  # a loaded BankStore, swapped whole by the reload thread
        # Reloads run one at a time in their own thread (``_refresh_banks``).
        self._banks_lock = threading.Lock()
        self._reloader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bank-reload")
        self._reload: Future | None = None
        self._first_load = True  # until one load was tried, or the worker started with no bank file

    def knows(self, sha256: str) -> bool:
        """Whether these bytes were analysed by this process moments ago: their
        sighting then costs no decode at all."""
        return self._recent.get(sha256) is not None

    def analyze(self, event: ImageEvent, data: bytes, source: SourceRef, sha256: str | None = None) -> Sighting:
        """``sha256``: the digest of ``data`` if the caller already took it."""
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        # Bytes this process analysed moments ago (a repost) passed the same
        # limits then: they are not opened again.
        known = self._recent.get(sha256) or self._analyse(data, sha256)
        hashes, evidence = known.hashes, known.evidence
        self._refresh_banks()
        banks = self._banks  # once: a reload may swap it meanwhile
        if banks is not None:
            evidence = [e for e in evidence if e.kind is not EvidenceKind.BANK] + self._bank_evidence(banks, sha256, hashes)
        light_event = event.model_copy(update={"image": _without_inline(event.image, sha256)})
        return Sighting(
            event=light_event, source=source, sha256=sha256,
            width=known.size[0], height=known.size[1], format=known.format,
            hashes=hashes, evidence=evidence, banks_checked=banks is not None,
        )

    def _analyse(self, data: bytes, sha256: str) -> Analysis:
        image = ImageData(data, limits=self.limits, sha256=sha256)  # raises ImageRejected (incl. over the memory budget)
        cost = image.decode_cost
        try:
            return self._analyse_image(image, sha256)
        finally:
            if cost >= TRIM_AFTER_BYTES:
                del image  # its decoded views are the memory to give back
                release_freed_memory()

    def _analyse_image(self, image: ImageData, sha256: str) -> Analysis:
        cached = self._load_cache(sha256)
        if cached is not None:
            hashes, evidence = cached
        else:
            # Decodes share one per-process memory budget: a burst of large
            # images waits rather than multiplying the worker's peak.
            with process_budget(self.limits.max_decode_bytes).reserve(image.decode_cost):
                # Hashing decodes pixels: truncated files surface here as ImageRejected.
                with metrics.STAGE_SECONDS.labels("hashes").time():  # decode, hashes and views
                    hashes = compute_hashes(image)
                with metrics.STAGE_SECONDS.labels("detectors").time():
                    evidence = self._detect(image)
            # What decoding had to skip or reduce is evidence too (weight 0: it informs, never scores).
            evidence += [Evidence(detector="decode", score=0.5, weight=0.0, detail=note, sha256=sha256)
                         for note in image.notes]
            self._store_cache(sha256, hashes, evidence)
        known = Analysis(hashes, evidence, image.size, image.format)
        self._recent.put(sha256, known)
        return known

    def _refresh_banks(self) -> None:
        # Analysts add to banks while workers run (`deepwatch bank add`, every
        # desk verdict): pick up a changed bank file without a restart,
        # looking at most every 2 s. Loading a bank reads all of it (about 6 s
        # per million entries) and waits out a writer's lock (SQLite's 5 s,
        # then it raises): done in the reload thread, never on the event loop,
        # which keeps matching against the banks it has until the new ones are
        # loaded. A thread (a large picture's analysis) may block: it waits,
        # and so sees the new banks at once, as before.
        now = time.monotonic()
        with self._banks_lock:
            reload = self._reload
            if now - self._banks_checked >= 2.0:
                self._banks_checked = now
                try:
                    mtime = self._banks_path.stat().st_mtime
                except FileNotFoundError:
                    self._banks, self._banks_mtime, self._first_load = None, None, False
                    return
                if mtime == self._banks_mtime:
                    return
                if reload is None or reload.done():  # one at a time; a failed one is tried again here
                    reload = self._reload = self._reloader.submit(self._reload_banks, mtime)
            elif not self._first_load:
                return
            # A worker that starts with a bank waits for its first load, on the
            # loop too (every caller until it is done, as it always did): it
            # has no banks to answer from, and its first sightings would miss
            # an allow-list.
            wait = reload is not None and (self._first_load or not _on_event_loop())
        if wait:
            reload.result()

    def _reload_banks(self, mtime: float) -> None:
        """In the reload thread: load the bank file, then swap it in whole."""
        try:
            store = self.settings.bank_store()
            try:
                store.index()  # the whole read, here rather than in the first match
            finally:
                store.close()  # matching reads only the loaded index
        except Exception as e:  # noqa: BLE001 - a bank being written (locked) or damaged is no event's fault
            log.warning("bank reload failed; matching against the banks loaded before, tried again at the next check",
                        extra={"path": str(self._banks_path), "error": f"{type(e).__name__}: {e}"})
            with self._banks_lock:
                self._first_load = False
            return
        with self._banks_lock:
            self._banks, self._banks_mtime, self._first_load = store, mtime, False

    def bank_reload(self) -> Future | None:
        """The bank reload under way or last run (None before any): tests wait on it."""
        return self._reload

    def _detect(self, image: ImageData) -> list[Evidence]:
        found: list[Evidence] = []
        for det in self.detectors:
            try:
                for ev in det.analyze(image):
                    found.append(ev.model_copy(update={"sha256": image.sha256}))
            except Exception:
                # One broken detector must not lose the sighting; the others still count.
                log.exception("detector failed", extra={"detector": det.name, "sha256": image.sha256})
        return found

    def _bank_evidence(self, banks, sha256: str, hashes: ImageHashes) -> list[Evidence]:
        from detectors.banks import bank_evidence

        try:
            return [e.model_copy(update={"sha256": sha256}) for e in bank_evidence(banks.match(hashes))]
        except Exception:
            log.exception("bank match failed", extra={"sha256": sha256})
            return []

    def _cache_path(self, sha256: str) -> Path:
        return analysis_path(self._blob_root, sha256)

    def _load_cache(self, sha256: str) -> tuple[ImageHashes, list[Evidence]] | None:
        kept = read_analysis(self._cache_path(sha256))
        return None if kept is None else (kept.hashes, kept.evidence)

    def _store_cache(self, sha256: str, hashes: ImageHashes, evidence: list[Evidence]) -> None:
        # Concurrent analyses of the same picture (a burst of reposts) each
        # write their own temp file; the last rename wins, same content.
        # The cache only saves a repost's decode: a write that fails (the
        # disk full, a quota, a read-only remount) is logged and the event
        # goes on; its blob write, next, holds it while the disk stays full
        # (``streams.stage``). It was the event's dead letter:
        # "decode:internal_error OSError: [Errno 28] No space left on device".
        path = self._cache_path(sha256)
        try:
            write_analysis(path, KeptAnalysis(hashes=hashes, evidence=evidence))
        except OSError as e:
            _warn_cache_write(path, e)


# Bump when cheap detectors change what they compute, so cached analyses of
# old images are recomputed rather than reused (a new hash record version does
# that by itself: it is part of the file name).
ANALYSIS_CACHE_VERSION = 4  # 4: hashes v6 (frame crops, content box); 3: off-centre and caption-band views
ANALYSIS_DIR = "analysis"  # under the blob root


def analysis_path(blob_root: Path, sha256: str) -> Path:
    """Where the analyze stage keeps an image's hash record and cheap evidence."""
    return blob_root / ANALYSIS_DIR / f"{sha256}.v{ANALYSIS_CACHE_VERSION}.h{HASHES_VERSION}.json"


class KeptAnalysis(BaseModel):
    """One picture's hash record and cheap evidence as the analyze stage
    keeps it (``analysis_path``). ``schema_version`` is
    ``ANALYSIS_CACHE_VERSION``, which the file name carries too: a file
    written before the record said it (under the same name) is that version."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = ANALYSIS_CACHE_VERSION
    hashes: ImageHashes
    evidence: list[Evidence]


def write_analysis(path: Path, kept: KeptAnalysis) -> None:
    """``kept`` at ``path``, 0600 from its first byte (``write_atomically``'s
    temp file is ``mkstemp``'s): which pictures were seen, and their
    thumbnails, are not for other local users."""
    write_atomically(path, json.dumps(kept.model_dump()).encode())


def read_analysis(path: Path) -> KeptAnalysis | None:
    """The analysis kept at ``path``, the one reader of those files (the
    analyze stage's cache, ``recorded_hashes``). None when there is none, or
    it cannot be read now; one that does not read as this version's record
    (damaged, an older format, another version) is None too and is removed,
    so the next analysis of the picture writes it anew."""
    try:
        raw = path.read_bytes()
    except OSError:  # none kept (FileNotFoundError), or not readable by this process: nothing known about it
        return None
    try:
        kept = KeptAnalysis.model_validate(json.loads(raw))
        if kept.schema_version == ANALYSIS_CACHE_VERSION:
            return kept
    except ValueError:  # not JSON, or not the record (pydantic's ValidationError is a ValueError)
        pass
    try:
        path.unlink(missing_ok=True)  # stale or damaged: recompute
    except OSError:  # a reader without write access to the blob store (the desk): the stage removes it
        pass
    return None


def recorded_hashes(settings: Settings, sha256: str) -> ImageHashes | None:
    """A stored image's whole hash record, its 32x32 thumbnail included, for
    readers of the findings store (whose members carry hashes without it):
    the one the analyze stage kept, else computed again from the blob-store
    bytes within the decode limits; None when neither is there or the bytes
    do not decode."""
    blob_root = blob_dir(settings.data_dir)
    kept = read_analysis(analysis_path(blob_root, sha256))
    if kept is not None:
        return kept.hashes
    try:
        return compute_hashes(ImageData(DirectoryBlobStore(blob_root).get(sha256), limits=settings.decode_limits()))
    except (OSError, ImageRejected):
        return None


def _warn_cache_write(path: Path, e: OSError) -> None:
    """Log a failed analysis cache write, once per ``CACHE_WARN_EVERY_S``
    per errno, with how many failed since the last line."""
    code, now = e.errno or 0, time.monotonic()
    with _cache_warned_lock:
        last, failed = _cache_warned.get(code, (-CACHE_WARN_EVERY_S, 0))
        failed += 1
        if now - last < CACHE_WARN_EVERY_S:
            _cache_warned[code] = (last, failed)
            return
        _cache_warned[code] = (now, 0)
    log.warning(f"analysis cache write failed ({e.strerror or e}; {e.filename or path}); the events go on without "
                "it (a repost is analysed again): free space on the data dir's disk (or lift its quota, remount it "
                "read-write)",
                extra={"path": str(e.filename or path), "errno": errno.errorcode.get(code, str(code)),
                       "failed": failed, "every_s": CACHE_WARN_EVERY_S})


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _without_inline(ref: ImageRef, sha256: str) -> ImageRef:
    # Inline bytes are now in the blob store; the sighting refers to them by hash.
    if ref.base64 is None:
        return ref
    return ImageRef(blob=sha256, mime=ref.mime)
