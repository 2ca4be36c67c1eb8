"""The picture members of the SQLite findings store (``members`` table): what
the desk's similar-picture index is built from (``streams.similar``), read
page by page as members are added, and the members of the clusters a
lookup lands in."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Collection, Iterator, NamedTuple

from streams.findings import MAX_MERGE_HOPS, MemberRow, surviving_cluster


class KeyedMember(NamedTuple):
    """A member as ``MemberQueries.members_after`` pages them: under its key
    in the store (the ``members`` rowid), not under a cluster. A tuple, so
    the index build (``streams.similar``) unpacks it as fast as a plain one."""

    key: int
    sha256: str
    phash: str
    pdq: str
    pdq_quality: int
    views: list[str] | None
    trimmed: bool


class MemberQueries:
    """Member reads of ``streams.store.SqliteFindingsStore``."""

    # Provided by ``SqliteFindingsStore``, which this is mixed into.
    _db: sqlite3.Connection
    if TYPE_CHECKING:
        def _roots(self) -> dict[str, str]: ...

    def iter_members(self) -> Iterator[MemberRow]:
        roots = self._roots()
        for cid, sha, ph, pdq, q, views, trimmed in self._db.execute(
            "SELECT cluster_id, sha256, phash, pdq, pdq_quality, views, trimmed FROM members"
        ):
            yield MemberRow(roots.get(cid, cid), sha, ph, pdq, q, json.loads(views) if views else None, bool(trimmed))

    def member_shas_updated_since(self, since: datetime) -> set[str]:
        """The sha256 of every member whose surviving cluster (or own, merged
        away) was written at or after ``since``: the pictures retention keeps
        whatever their age (``streams.retention``)."""
        at = since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # as updated_at is written
        roots = self._roots()
        fresh = {cid for (cid,) in self._db.execute("SELECT cluster_id FROM clusters WHERE updated_at >= ?", (at,))}
        fresh |= {roots.get(cid, cid) for cid in fresh}
        return {sha for cid, sha in self._db.execute("SELECT cluster_id, sha256 FROM members")
                if cid in fresh or roots.get(cid, cid) in fresh}

    # -- picture lookups (``streams.similar``) -------------------------------
    def members_after(self, after: int, limit: int = 20_000) -> list[KeyedMember]:
        """The members stored after ``after`` (a key this returned; 0: from
        the start), oldest first, at most ``limit``. Members are only ever
        added, never changed, so a reader's hash index grows from these
        (``streams.similar``); ``member_key`` tells it the file changed under it."""
        # tuple.__new__ skips the class's Python-level __new__ (the index
        # build's path, ``streams.similar``): measured over 100,000 rows, about
        # 0.1 us a row more than a plain tuple, against 0.3 us by the class.
        new = tuple.__new__
        return [new(KeyedMember, (k, sha, ph, pdq, q, json.loads(views) if views else None, bool(trimmed)))
                for k, sha, ph, pdq, q, views, trimmed in self._db.execute(
                    "SELECT rowid, sha256, phash, pdq, pdq_quality, views, trimmed FROM members "
                    "WHERE rowid > ? ORDER BY rowid LIMIT ?", (int(after), int(limit)))]

    def members_count_after(self, after: int) -> int:
        """How many members ``members_after(after, ...)`` pages would give in all."""
        return self._db.execute("SELECT COUNT(*) FROM members WHERE rowid > ?", (int(after),)).fetchone()[0]

    def member_key(self, key: int) -> str | None:
        """The sha256 of the member ``members_after`` gave under ``key`` (None:
        none now: the file was replaced)."""
        row = self._db.execute("SELECT sha256 FROM members WHERE rowid = ?", (int(key),)).fetchone()
        return row[0] if row else None

    def members_near(self, keys: Collection[int], sha256: str | None = None) -> list[MemberRow]:
        """Every member of the clusters that the members under ``keys`` (and
        the member ``sha256``) belong to, under the surviving cluster id and
        in ``iter_members``' order: what ``iter_members`` gives of those
        clusters, read through the indexes (a few rows per cluster, whatever
        the store's size)."""
        cids: set[str] = set()
        keys = sorted({int(k) for k in keys})
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            cids.update(c for c, in self._db.execute(
                f"SELECT DISTINCT cluster_id FROM members WHERE rowid IN ({','.join('?' * len(chunk))})", chunk))
        if sha256:
            cids.update(c for c, in self._db.execute("SELECT cluster_id FROM members WHERE sha256 = ?", (sha256,)))
        into = _MergedInto(self._db)  # the part of ``_roots``' merge map these clusters reach
        roots = {surviving_cluster(c, into) for c in cids}
        ids: dict[str, str] = {}  # recorded cluster id -> surviving one, for every id that leads to a root found
        for r in sorted(roots):
            for c, in self._db.execute(
                """WITH RECURSIVE down(id, depth) AS (
                       SELECT ?, 0
                       UNION SELECT clusters.cluster_id, depth + 1 FROM clusters JOIN down ON clusters.merged_into = down.id
                       WHERE depth < ?)
                   SELECT DISTINCT id FROM down""", (r, MAX_MERGE_HOPS)):
                if surviving_cluster(c, into) == r:  # as ``_roots`` resolves it (a chain past the hops, a cycle)
                    ids[c] = r
        out: list[MemberRow] = []
        names = sorted(ids)
        rows: list[tuple] = []
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            rows.extend(self._db.execute(
                "SELECT rowid, cluster_id, sha256, phash, pdq, pdq_quality, views, trimmed FROM members "
                f"WHERE cluster_id IN ({','.join('?' * len(chunk))})", chunk))
        for _, cid, sha, ph, pdq, q, views, trimmed in sorted(rows):
            out.append(MemberRow(ids[cid], sha, ph, pdq, q, json.loads(views) if views else None, bool(trimmed)))
        return out


class _MergedInto(dict):
    """cluster id -> the cluster it was merged into (None: none), read from
    the store as ``surviving_cluster`` walks it: a lookup reads the few
    clusters it reaches, not the whole merge map."""

    def __init__(self, db: sqlite3.Connection):
        super().__init__()
        self._db = db

    def __missing__(self, cluster_id: str) -> str | None:
        row = self._db.execute("SELECT merged_into FROM clusters WHERE cluster_id = ?", (cluster_id,)).fetchone()
        self[cluster_id] = found = row[0] if row else None
        return found

    def get(self, cluster_id: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self[cluster_id]
