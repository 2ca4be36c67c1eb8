"""Content-addressed image storage: image bytes never travel on topics, messages
carry the sha256. One implementation, a directory under the data dir
(``DirectoryBlobStore``, in ``blob_dir``; workers on several machines share it
as a volume). The stages read and write through ``BlobStore``, but retention
(``streams.retention``, ``deepwatch prune``), the desk's thumbnails and the
analysis cache beside the pictures read the directory itself: another
backend, S3-compatible storage say, would need those moved onto it too.

Owner-only: the pictures are whatever the monitored feeds linked to, and
their names (sha256) say which pictures were seen, so the store's
directories are made 0700 and its files 0600 (``write_atomically``'s temp
file is ``mkstemp``'s 0600 from its first byte, and the rename keeps it;
blobs were always written so). A store made wider before is narrowed at a
worker's start (``streams.worker``, ``streams.private_files.own_dir``)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Protocol

from detectors.atomic_file import write_atomically
from streams.private_files import private_dir


# Why a blob write can fail and later succeed with the very same bytes: the
# storage under the blob store, not the picture (a full disk or quota, an I/O
# error, a read-only remount after one, descriptors or memory running out, a
# network file system's stale handle or timeout). The analyze stage holds such
# a write and retries it (``streams.stage``); any other error (EFBIG over a
# per-file limit, ENAMETOOLONG, a path that is no directory, permissions) would
# fail again for this file, and ends its event as ``blob:blob_write``.
PASSING_WRITE_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
    errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.ETIMEDOUT,
})


def blob_dir(data_dir: str | Path) -> Path:
    """Where the data dir keeps its pictures."""
    return Path(data_dir) / "blobs"


def write_may_pass(e: OSError) -> bool:
    """Whether a failed blob write may succeed if tried again later."""
    return e.errno in PASSING_WRITE_ERRNOS


class BlobStore(Protocol):
    def put(self, data: bytes, sha256: str | None = None) -> str: ...
    def get(self, sha256: str) -> bytes: ...
    def exists(self, sha256: str) -> bool: ...


class DirectoryBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        private_dir(self.root)  # 0700 where made here, the data dir too if missing

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store ``data`` under its digest. ``sha256``: the digest the caller
        already took of these very bytes (the analyze stage has it), so they
        are not hashed twice; a wrong one is the caller's bug, not input's."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        try:
            # Write-once: same name, same bytes. The mtime says when the
            # picture was last stored: retention (``streams.retention``)
            # keeps what was seen within its period.
            os.utime(path)
            return digest
        except FileNotFoundError:
            pass
        try:
            # Its shard directories 0700 before the write makes them at the
            # umask's 0755: a root 0700 hides them already, but where it
            # stays wider (another user's, with a warning) the names of the
            # pictures seen are still not listed. Only when missing: most
            # new pictures land in a shard made before (one stat, not a mkdir).
            if not path.parent.is_dir():
                private_dir(path.parent)
            write_atomically(path, data)  # a concurrent reader never sees a half-written blob
        except OSError as e:
            if e.filename is None:  # a failed write() names no file: the blob's path says where
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        return self._path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()
