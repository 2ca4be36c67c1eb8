"""Thumbnails for the desk: made from the blob store, resized, re-encoded as
JPEG and cached on disk under a size bound (least recently used go first).
Only pictures that are members of a stored cluster are served, and never as
their original bytes: whatever a file carries (metadata, a payload, an
oversized canvas) stays in the blob store.

Making one decodes the picture, which for a PNG (no reduced decode exists) is
its full canvas: a 121 KB 6000x6000 PNG is 144 MB of pixels. So a thumbnail
is decoded within the decode limits and the process's decode memory budget
(shared with picture lookups), requested sizes are rounded to a few fixed
ones (each distinct size is a cache entry: without this every px from 32 to
1024 forced a decode of its own), one thumbnail missed by several requests
at once is made once, and only a few are made at a time: a miss past that
waits briefly, then is refused (``ThumbBusy``, 503) rather than queued.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from pathlib import Path

from detectors.freed_memory import TRIM_AFTER_BYTES, release_freed_memory
from detectors.imagedata import DecodeLimits, ImageData, ImageRejected, process_budget
from streams.blobstore import DirectoryBlobStore
from streams.private_files import own_dir, owner_only

log = logging.getLogger(__name__)

# The sizes thumbnails are made at (the pages ask for 96 and desk.thumb_px,
# 256 by default). A request's px is rounded down to one of them: an answer is
# never larger than asked for, and a picture has at most this many entries.
SIZES = (32, 64, 96, 128, 256, 512, 1024)
# Thumbnails made at once. Each holds a decoder thread and up to its decode
# cost in memory (the budget bounds the sum); a page of cold thumbnails asks
# for about six at a time (a browser's connections), most of them JPEGs
# decoded at 1/8 scale in milliseconds.
MAX_MAKING = 2
# Misses that may wait for a turn, each at most WAIT_S; one more is refused at
# once. Waiting requests hold threads of the desk's pool (40), which every
# other synchronous route needs too.
MAX_WAITING = 8
WAIT_S = 5.0
RETRY_AFTER_S = 2


class ThumbError(Exception):
    pass


class ThumbBusy(ThumbError):
    """Too many thumbnails being made (or the decode budget taken): try again later."""

    retry_after_s = RETRY_AFTER_S


class Thumbnails:
    def __init__(self, blob_root: Path, cache_dir: Path, *, max_bytes: int, max_pixels: int | None = None,
                 limits: DecodeLimits | None = None, sizes: tuple[int, ...] = SIZES, max_making: int = MAX_MAKING,
                 max_waiting: int = MAX_WAITING, wait_s: float = WAIT_S):
        """``limits``: the decode limits (``Settings.decode_limits()``); without
        them the defaults, with ``max_pixels`` when given."""
        self.blobs = DirectoryBlobStore(blob_root)
        self.cache_dir = Path(cache_dir)
        # Owner-only (0700, and ``desk/`` above it where made here), not the umask's 0755: which pictures the
        # desk shows is not for other local users. One made wider before is narrowed; thumbnails in it made
        # 0644 before are left, for none can be reached through it now (``streams.private_files.own_dir``).
        own_dir(self.cache_dir, "thumbnail cache")
        self.max_bytes = max_bytes
        if limits is None:
            limits = DecodeLimits(max_pixels=max_pixels) if max_pixels is not None else DecodeLimits()
        self.limits = limits
        self.sizes = tuple(sorted(set(sizes)))
        self.max_making, self.max_waiting, self.wait_s = max_making, max_waiting, wait_s
        self._lock = threading.Lock()
        self._size = sum(p.stat().st_size for p in self.cache_dir.glob("*.jpg"))
        self.hits = self.misses = 0
        # (sha256, px) being made, how many makes run and how many wait for a turn
        self._turns = threading.Condition()
        self._making: set[tuple[str, int]] = set()
        self._busy = self._waiting = 0

    def cache_bytes(self) -> int:
        return self._size

    def snap(self, px: int) -> int:
        """The size a request for ``px`` is answered at: the largest of
        ``sizes`` not over it (the smallest for a px under all of them)."""
        return max((s for s in self.sizes if s <= px), default=self.sizes[0])

    def _cached(self, path: Path) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # recency for eviction
        except FileNotFoundError:  # evicted meanwhile: the bytes read stand
            pass
        self.hits += 1
        return data

    def get(self, sha256: str, px: int) -> bytes:
        """The thumbnail of ``sha256`` at ``snap(px)``; raises ``ThumbBusy``
        when no turn to make it comes within ``wait_s``, ``ThumbError`` for a
        picture not stored or not decodable within the limits."""
        px = self.snap(px)
        key = (sha256, px)
        path = self.cache_dir / f"{sha256}-{px}.jpg"
        deadline = time.monotonic() + self.wait_s
        while True:
            data = self._cached(path)
            if data is not None:
                return data
            with self._turns:
                # The same thumbnail being made: wait for it rather than decode
                # it again. Others being made: wait for a turn, a few of us.
                if key in self._making or self._busy >= self.max_making:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._waiting >= self.max_waiting:
                        raise ThumbBusy(f"the desk is busy making thumbnails ({self._busy} at once, "
                                        f"{self._waiting} waiting); try again in {RETRY_AFTER_S} s")
                    self._waiting += 1
                    try:
                        self._turns.wait(left)
                    finally:
                        self._waiting -= 1
                    continue  # made meanwhile (a cache hit), or a turn free
                self._making.add(key)
                self._busy += 1
            break
        try:
            self.misses += 1
            data = self._make(sha256, px)
            self._store(path, data)
        finally:
            with self._turns:
                self._making.discard(key)
                self._busy -= 1
                self._turns.notify_all()
        return data

    def _store(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        try:
            owner_only(tmp, "thumbnail")  # 0600 from its first byte, as the blob store's files
            tmp.write_bytes(data)
            # Another process on the same cache (a desk restarted over a
            # running one) can rename onto the same thumbnail: count only what
            # the rename adds over the file it replaces, under the lock so
            # that no eviction runs in between.
            with self._lock:
                try:
                    replaced = path.stat().st_size
                except FileNotFoundError:
                    replaced = 0
                os.replace(tmp, path)
                self._size += len(data) - replaced
                if self._size > self.max_bytes:
                    self._evict()
        except BaseException as e:
            # Temp files are neither counted nor evicted: a failed write
            # (a full disk) must not leave one behind.
            tmp.unlink(missing_ok=True)
            if not isinstance(e, OSError):
                raise
            # the desk still shows the picture, made again at its next request
            log.warning("thumbnail not cached: %s", e)

    def _make(self, sha256: str, px: int) -> bytes:
        try:
            raw = self.blobs.get(sha256)
        except (FileNotFoundError, ValueError) as e:
            raise ThumbError(f"no stored picture {sha256}") from e
        try:
            # format, dimensions, pixels, JPEG scans and decode cost checked from the header
            image = ImageData(raw, limits=self.limits, sha256=sha256)
            cost = image.thumbnail_cost(px)  # a JPEG decodes at up to 1/8 scale: its reservation too
            with process_budget(self.limits.max_decode_bytes).reserve(cost, timeout_s=self.wait_s):
                # JPEG: decoded at a reduced scale (DCT scaling); others in full,
                # EXIF orientation applied, then reduced by whole factors first
                im = image.thumbnail(px)
                im.thumbnail((px, px), reducing_gap=2.0)
                del image  # the full decode, if any
                if cost >= TRIM_AFTER_BYTES:
                    # Each pool thread that decoded keeps the freed pixels in its
                    # malloc arena: eight 6000x6000 PNGs, two at a time, left the
                    # desk at 774 MB instead of 100.
                    release_freed_memory()
            out = io.BytesIO()
            im.save(out, "JPEG", quality=80, optimize=True)
            return out.getvalue()
        except ImageRejected as e:
            if e.reason == "busy":
                raise ThumbBusy(f"the decode memory budget is taken; try again in {RETRY_AFTER_S} s") from None
            raise ThumbError(f"picture {sha256} cannot be shown: {e}") from None
        except (OSError, ValueError) as e:
            raise ThumbError(f"picture {sha256} cannot be decoded: {e}") from e

    def _evict(self) -> None:
        files = sorted(self.cache_dir.glob("*.jpg"), key=lambda p: p.stat().st_mtime)
        # Down to 80% of the bound, so a full cache does not evict on every miss.
        for p in files:
            if self._size <= self.max_bytes * 0.8:
                break
            try:
                size = p.stat().st_size
                p.unlink()
                self._size -= size
            except FileNotFoundError:
                continue
