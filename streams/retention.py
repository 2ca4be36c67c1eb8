"""Retention of the blob store: pictures nobody has posted for a while are
deleted, with their analysis records, so a long-running deployment's disk
stays bounded (every distinct picture is stored once, and a busy stream
stores many gigabytes a day).

A stored picture is kept while either holds:
- it was stored, or its bytes were seen again (``DirectoryBlobStore.put``
  refreshes the file's mtime), within the retention period; or
- it is a member of a cluster whose findings changed within the period (a
  sighting, a model result, a merge: ``updated_at``), counting a merged-away
  cluster under its survivor: the desk's thumbnails and the detect role
  read a spreading cluster's members, whichever copy is reposted now.

What deletion costs, by design: the cluster engine decides a later repost
of a deleted picture from the 32x32 record it keeps (``blob_pixels``), the
desk shows no thumbnail of it and a desk verdict banks only the members
still stored, and a picture that comes back is stored (and analysed) again
by the analyze stage. Findings (clusters, sightings, alerts) are never
touched here.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from streams.analyze import ANALYSIS_DIR
from streams.findings import RetentionReader

HEX = frozenset("0123456789abcdef")
PRUNING_SUFFIX = ".prune"  # a blob being deleted: moved aside first, so a store in between is not lost


@dataclass
class PruneReport:
    """What one ``prune`` did (or, with ``dry_run``, would do)."""

    cutoff: str  # pictures last stored and in no cluster changed since this instant (UTC) are deleted
    dry_run: bool
    blobs: int = 0  # stored pictures looked at
    deleted: int = 0  # pictures deleted
    deleted_bytes: int = 0  # their size, analysis records and stale leftovers included
    kept_recent: int = 0  # stored or seen again within the period
    kept_active: int = 0  # older, but a member of a cluster changed within the period
    analyses_deleted: int = 0  # analysis records of deleted pictures, and of analysis versions no worker reads
    leftovers_deleted: int = 0  # temp files of interrupted writes and deletions, older than the period

    def as_json(self) -> dict:
        return asdict(self)


def prune(blob_root: Path, store: RetentionReader, older_than_s: float, *, dry_run: bool = False,
          now: float | None = None, progress: Callable[[int], None] | None = None,
          current_analysis: Callable[[str], bool] | None = None) -> PruneReport:
    """Delete the pictures under ``blob_root`` (a ``DirectoryBlobStore``)
    that neither were stored within ``older_than_s`` seconds before ``now``
    nor belong to a cluster ``store`` has changed since then (see the module
    docstring), with their analysis records. ``progress`` is called with
    the number of pictures looked at so far; ``current_analysis`` tells an
    analysis file name a worker may still read (default: every one)."""
    now = time.time() if now is None else now
    cutoff = now - older_than_s
    since = datetime.fromtimestamp(cutoff, timezone.utc)
    report = PruneReport(cutoff=since.isoformat(), dry_run=dry_run)
    active = store.member_shas_updated_since(since)
    gone: set[str] = set()
    for n, path in enumerate(_blob_files(blob_root), 1):
        report.blobs += 1
        if progress is not None and n % 1000 == 0:
            progress(n)
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime >= cutoff:
            report.kept_recent += 1
        elif path.name in active:
            report.kept_active += 1
        else:
            freed = st.st_size if dry_run else _remove_unless_stored(path, cutoff)
            if freed is None:  # stored again while this ran
                report.kept_recent += 1
                continue
            report.deleted += 1
            report.deleted_bytes += freed
            gone.add(path.name)
    if progress is not None:
        progress(report.blobs)
    _prune_analyses(blob_root / ANALYSIS_DIR, gone, cutoff, dry_run, report, current_analysis or (lambda _: True))
    _prune_leftovers(blob_root, cutoff, dry_run, report)
    return report


def _blob_files(root: Path) -> Iterator[Path]:
    """Every stored picture's file (``root/ab/cd/abcd...``), directory by directory."""
    for top in _hex_dirs(root):
        for mid in _hex_dirs(top):
            try:
                names = sorted(os.listdir(mid))
            except FileNotFoundError:
                continue
            for name in names:
                if len(name) == 64 and set(name) <= HEX:
                    yield mid / name


def _hex_dirs(parent: Path) -> list[Path]:
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    return [parent / n for n in sorted(names) if len(n) == 2 and set(n) <= HEX and (parent / n).is_dir()]


def _remove_unless_stored(path: Path, cutoff: float) -> int | None:
    """Delete ``path`` unless it was stored again since ``cutoff``; its size,
    or None when kept. Moved aside first: a worker storing the same picture
    between the check and the deletion either refreshed the mtime of the
    moved file (seen here, and the file is put back) or wrote a new file
    (the moved one is then a duplicate of it)."""
    aside = path.with_name(f".{path.name}{PRUNING_SUFFIX}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    st = aside.stat()
    if st.st_mtime >= cutoff:
        os.replace(aside, path)  # same name, same bytes: a new write of it, if any, loses nothing
        return None
    aside.unlink()
    return st.st_size


def _prune_analyses(root: Path, gone: set[str], cutoff: float, dry_run: bool, report: PruneReport,
                    current: Callable[[str], bool]) -> None:
    """The analysis records (``<sha256>.v<N>.h<M>.json``) of deleted
    pictures, and those of versions no worker reads any more, once older
    than the period (a worker of the previous version may still run for a
    while after an upgrade)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name.startswith(".") or not e.name.endswith(".json"):
            continue
        try:
            st = e.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime >= cutoff or (e.name.split(".", 1)[0] not in gone and current(e.name)):
            continue
        if not dry_run:
            Path(e.path).unlink(missing_ok=True)
        report.analyses_deleted += 1
        report.deleted_bytes += st.st_size


def _prune_leftovers(root: Path, cutoff: float, dry_run: bool, report: PruneReport) -> None:
    """Temp files left by writes and deletions a crash interrupted
    (``.<name>.*.tmp``, ``.<name>.prune``), once older than the period."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.startswith(".") or not (name.endswith(".tmp") or name.endswith(PRUNING_SUFFIX)):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime >= cutoff:
                continue  # a write or a deletion in progress
            if not dry_run:
                path.unlink(missing_ok=True)
            report.leftovers_deleted += 1
            report.deleted_bytes += st.st_size
