"""Reading a local file whose path came from a user or a feed, without
blocking on what is not a regular file.

A plain ``open()`` of a FIFO waits for a writer (forever, holding the thread
or the command), and a read of a device such as /dev/zero never ends. Here
the open never blocks and only a regular file is read. Shared by the fetch
stage and the CLI (``detect``, ``bank``, ``similar``), so it imports nothing
but the standard library.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


class FileRefused(OSError):
    """The path names nothing readable as a file; ``reason`` is a short
    machine-readable code (``not_found``, ``not_a_file``, ``too_large``,
    ``bad_path``), the message names the path and says why. An ``OSError``,
    so callers that report unreadable files already report this one."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    return "not a regular file"


def special_kind(path: str | Path) -> str | None:
    """What ``path`` is (e.g. "a FIFO (named pipe), not a regular file")
    when it exists and is neither a regular file nor a directory, symlinks
    followed; None otherwise. For commands that name such a path as a usage
    error before reading anything."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else _kind(mode)


@contextmanager
def open_regular(path: str | Path, *, shown: str | None = None, follow_symlinks: bool = True) -> Iterator[BinaryIO]:
    """The regular file at ``path``, open for binary reading; ``FileRefused``
    for anything else. ``shown``: how messages name the path (default the
    path itself). ``follow_symlinks=False`` refuses a symlink as the last
    component (for a path already resolved, where one can only be a swap)."""
    shown = shown if shown is not None else str(path)
    # O_NONBLOCK: opening a FIFO for reading would otherwise block until a
    # writer appears; the descriptor is made blocking again once it is known
    # to be a regular file, where the flag means nothing anyway.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileRefused("not_found", f"{shown} does not exist") from None
    except (OSError, ValueError) as e:
        raise _refusal_for(path, shown, e, follow_symlinks) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused("not_a_file", f"{shown} is {_kind(mode)}")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def _refusal_for(path: str | Path, shown: str, error: Exception, follow_symlinks: bool) -> FileRefused:
    # A socket cannot be opened at all (ENXIO): say what it is rather than
    # "No such device or address".
    try:
        mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    except (OSError, ValueError):
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
        return FileRefused("not_a_file", f"{shown} is {_kind(mode)}")
    return FileRefused("bad_path", f"{shown}: {error}")


def read_regular(path: str | Path, max_bytes: int, *, shown: str | None = None,
                 follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes`` of
    them: ``FileRefused`` (``too_large``) for a longer file, told from its
    size before anything is read, and from the bytes read when it grows
    meanwhile. Other refusals as ``open_regular``."""
    shown = shown if shown is not None else str(path)
    with open_regular(path, shown=shown, follow_symlinks=follow_symlinks) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise FileRefused("too_large", f"{shown} is {size} bytes, limit {max_bytes}")
            data = f.read(max_bytes + 1)  # the file may grow after fstat
        except FileRefused:
            raise
        except OSError as e:  # EIO, EISDIR on exotic file systems: a bad path, not a crash
            raise FileRefused("bad_path", f"{shown}: {e}") from None
    if len(data) > max_bytes:
        raise FileRefused("too_large", f"{shown} exceeds {max_bytes} bytes")
    return data

