"""Thumbnails for the desk: made from the blob store, resized, re-encoded as
JPEG and cached on disk under a size bound (least recently used go first).
Only pictures that are members of a stored cluster are served, and never as
their original bytes: whatever a file carries (metadata, a payload, an
oversized canvas) stays in the blob store.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

from PIL import Image, ImageOps

from streams.blobstore import DirectoryBlobStore

log = logging.getLogger(__name__)


class ThumbError(Exception):
    pass


class Thumbnails:
    def __init__(self, blob_root: Path, cache_dir: Path, *, max_bytes: int, max_pixels: int):
        self.blobs = DirectoryBlobStore(blob_root)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._size = sum(p.stat().st_size for p in self.cache_dir.glob("*.jpg"))
        self.hits = self.misses = 0

    def cache_bytes(self) -> int:
        return self._size

    def get(self, sha256: str, px: int) -> bytes:
        path = self.cache_dir / f"{sha256}-{px}.jpg"
        try:
            data = path.read_bytes()
            os.utime(path)  # recency for eviction
            self.hits += 1
            return data
        except FileNotFoundError:
            pass
        self.misses += 1
        data = self._make(sha256, px)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        try:
            tmp.write_bytes(data)
            # Two requests can miss the same thumbnail at once and both rename
            # onto it: count only what the rename adds over the file it
            # replaces, under the lock so that no eviction runs in between.
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
        return data

    def _make(self, sha256: str, px: int) -> bytes:
        try:
            raw = self.blobs.get(sha256)
        except (FileNotFoundError, ValueError) as e:
            raise ThumbError(f"no stored picture {sha256}") from e
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > self.max_pixels:
                    raise ThumbError(f"picture {sha256} is {im.width}x{im.height}: over the decode limit")
                im.draft("RGB", (px, px))  # JPEG: decode at a reduced scale
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((px, px))
                out = io.BytesIO()
                im.save(out, "JPEG", quality=80, optimize=True)
                return out.getvalue()
        except (OSError, Image.DecompressionBombError, ValueError) as e:
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
