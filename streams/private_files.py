"""Owner-only files and directories: what deepwatch writes into its data
directory (the findings store, the engine state, the desk's database, the
workers' and broker's logs) holds verdict notes, editor names, account
names and the text of posts, none of it for other local users.

``owner_only`` is called before a file is opened: a file it makes is 0600
from its first byte (not the umask's 0644), and one found with group or
other bits, which this process owns, is narrowed to 0600; one owned by
another user is left as it is, with a warning (it still opens). A
narrowing is logged as a warning too: it takes access away from whoever
read the file through its group before. For an
SQLite database its ``-wal``, ``-shm`` and ``-journal`` files are narrowed
too; SQLite creates them with the database file's own mode.

``private_dir`` makes a directory (and any missing parents) 0700; a
directory that already exists is left as it is: the data directory may be
one its user made, or shares, on purpose. ``own_dir`` is for a directory
that is deepwatch's alone (the blob store with its analysis cache, Faust's
state, the desk's thumbnail cache): made the same way, and one found with
group or other bits is narrowed to 0700 as ``narrow`` narrows a file."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def owner_only(path: Path | str, what: str, companions: tuple[str, ...] = ()) -> None:
    """``path`` (a file about to be opened) made owner-only: created 0600
    when it does not exist, narrowed to 0600 when it has group or other
    bits and this process owns it; the same for each of ``companions``
    that exists (suffixes of its name: ``SQLITE_COMPANIONS`` for a
    database). ``what`` names the file in a warning. Never raises: a file
    that cannot be made here (a read-only or missing directory) is left
    for the opener to say why."""
    path = Path(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:  # there already, or none can be made: the open that follows says which
        pass
    for p in (path, *(path.with_name(path.name + c) for c in companions)):
        narrow(p, what)


def narrow(path: Path | str, what: str) -> None:
    """An existing regular file with group or other bits made 0600, if this
    process owns it; else a warning that says why not. A directory, a
    missing file and an owner-only file are left alone."""
    _narrow(path, what, stat.S_ISREG, 0o600)


def own_dir(path: Path | str, what: str) -> Path:
    """``path``, a directory deepwatch alone writes and reads, as a 0700
    directory: made with its missing parents as ``private_dir`` makes them;
    there already with group or other bits, narrowed to 0700 if this process
    owns it, else a warning that says why not (it is still used). Only
    ``path`` itself: nothing under a 0700 directory can be reached by other
    users, so a blob store of a million pictures is not walked at each start.
    Raises what ``private_dir`` raises."""
    path = private_dir(path)
    _narrow(path, what, stat.S_ISDIR, 0o700)
    return path


def _narrow(path: Path | str, what: str, is_kind: Callable[[int], bool], mode: int) -> None:
    """``narrow`` for a file or a directory: ``is_kind`` (``stat.S_ISREG``,
    ``stat.S_ISDIR``) picks which, ``mode`` is what it is narrowed to."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not is_kind(st.st_mode) or not st.st_mode & 0o077:
        return
    if st.st_uid != os.geteuid():
        why = f"owned by uid {st.st_uid}, not this user (uid {os.geteuid()})"
    else:
        try:
            os.chmod(path, mode)
            # Said, not done silently: a reader under another user of a shared group (a desk, an analyst's
            # script) loses access here, most likely at an upgrade from a deepwatch that left it wider.
            log.warning(f"made the {what} {path} owner-only ({stat.filemode(st.st_mode)} -> "
                        f"{stat.filemode(st.st_mode & ~0o7777 | mode)}): other local users, a shared group "
                        "too, can no longer read it; run what reads it as this user",
                        extra={"path": str(path), "was": stat.filemode(st.st_mode)})
            return
        except OSError as e:
            why = f"chmod {mode:o}: {e.strerror or e}"
    # in the text: a log that is not set up yet (the desk's, at start) drops the extra fields
    log.warning(f"cannot make the {what} {path} owner-only ({why}); it stays {stat.filemode(st.st_mode)}",
                extra={"path": str(path), "error": why})


def private_dir(path: Path | str) -> Path:
    """``path`` as a directory: each one that does not exist yet, ``path``
    and its missing parents, is made 0700; existing ones keep their mode.
    Raises what ``Path.mkdir`` raises (a file in the way, no permission)."""
    path = Path(path)
    missing = []
    p = path
    while not os.path.lexists(p) and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile
            pass
    path.mkdir(parents=True, exist_ok=True)  # raises, as it always did, where path is not a directory
    return path
