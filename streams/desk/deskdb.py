"""The desk's own tables, in ``<data_dir>/desk.sqlite`` (not the findings
store): the verdict audit trail, the per-cluster overlay verdicts imply,
login sessions, and which account alerts were raised.

The audit trail is append-only: triggers refuse UPDATE and DELETE, so a
verdict once recorded stays, and a change of mind is a new row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from detectors.sqlite_errors import primary_code
from streams.private_files import SQLITE_COMPANIONS, owner_only, private_dir
from streams.sqlite_wal import enable_wal

log = logging.getLogger(__name__)

DeskVerdict = Literal["fake", "authentic", "needs-review"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    verdict_id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster_id TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('fake', 'authentic', 'needs-review')),
    note TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    at TEXT NOT NULL,
    cluster_state TEXT NOT NULL
);
-- What a verdict did (bank entries, clusters re-scored, alerts), written once
-- after its effects ran: a separate insert, so the audit rows never change.
CREATE TABLE IF NOT EXISTS verdict_effects (verdict_id INTEGER PRIMARY KEY, effects TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS verdicts_cluster ON verdicts(cluster_id);
CREATE TRIGGER IF NOT EXISTS verdicts_no_update BEFORE UPDATE ON verdicts
    BEGIN SELECT RAISE(ABORT, 'the verdict audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS verdicts_no_delete BEFORE DELETE ON verdicts
    BEGIN SELECT RAISE(ABORT, 'the verdict audit trail is append-only'); END;
-- What the latest verdicts mean for each cluster, own or by a bank match
-- (rewritten whenever a verdict is recorded; the audit trail is the truth).
CREATE TABLE IF NOT EXISTS overlay (
    cluster_id TEXT PRIMARY KEY,
    verdict TEXT NOT NULL,
    verdict_id INTEGER NOT NULL,
    source_cluster TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires REAL NOT NULL,
    credential TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS account_alerts (
    account_id TEXT PRIMARY KEY,
    alert_id TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


class VerdictRecord(BaseModel):
    """One row of the audit trail, as the API returns it."""

    schema_version: int = 1
    verdict_id: int
    cluster_id: str
    verdict: DeskVerdict
    note: str
    user: str
    role: str
    at: datetime
    cluster_state: dict[str, Any]  # fake score, verdict, sightings... when the verdict was given
    effects: dict[str, Any] = Field(default_factory=dict)


class OverlayRow(BaseModel):
    cluster_id: str
    verdict: DeskVerdict
    verdict_id: int
    source_cluster: str  # the cluster the verdict was given on (itself, or the one it matched)
    detail: str


class SentDeskAlert(BaseModel):
    """An alert a verdict raised for a cluster (``DeskDB.desk_alerts_sent``)."""

    alert_id: str  # ``<cluster>:desk-<verdict>[:<verdict id>]``: the id the sinks know it by
    verdict: DeskVerdict  # what it announced: the verdict that raised it
    verdict_id: int


class Session(BaseModel):
    user: str
    role: str
    csrf: str
    # which password the session was opened with (``auth.credential_of``):
    # a new password, or a user removed and added again, ends it
    credential: str = ""


def _hash_token(token: str) -> str:
    # Only the hash is stored: a copy of the database does not log anyone in.
    return hashlib.sha256(token.encode()).hexdigest()


def _owner_only(path: Path) -> None:
    """``path`` made 0600 before SQLite opens it: it holds the verdict notes,
    user names and each session's CSRF token, and SQLite gives its -wal and
    -shm files the database file's permissions. A new file is created so (not
    at the umask's 0644); an existing one (-wal, -shm) with group or other
    bits is narrowed, or a warning says why not (``streams.private_files``)."""
    owner_only(path, "desk database", SQLITE_COMPANIONS)


class DeskDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        private_dir(self.path.parent)  # 0700 where deepwatch makes it (the data dir, at a desk's first start)
        _owner_only(self.path)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        enable_wal(self._db)
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        if "credential" not in columns:  # a desk.sqlite from before: its sessions name no password, so none is valid
            self._db.execute("ALTER TABLE sessions ADD COLUMN credential TEXT NOT NULL DEFAULT ''")
        self._lock = threading.Lock()
        # this connection's own writes (a verdict, its overlay rows): PRAGMA data_version moves only
        # for commits by other connections, so a desk would not see its own verdicts without it
        self._writes = 0

    def close(self) -> None:
        self._db.close()

    @property
    def version(self) -> tuple[int, int]:
        """A value that changes whenever the verdicts or the overlay may have
        changed: read caches key on it. SQLite's ``PRAGMA data_version``
        follows the commits of every other connection to ``desk.sqlite`` (a
        second desk on the same data dir, another process or thread); the
        counter follows this connection's own, which data_version does not
        count. Another desk's logins move it too: a re-check of the overlay
        (``FindingsSource._reoverlay``) that finds nothing changed is cheap."""
        return self._db.execute("PRAGMA data_version").fetchone()[0], self._writes

    # -- verdicts -------------------------------------------------------------
    def add_verdict(self, cluster_id: str, verdict: str, note: str, user: str, role: str,
                    cluster_state: dict[str, Any]) -> VerdictRecord:
        at = datetime.now(timezone.utc)
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO verdicts (cluster_id, verdict, note, user, role, at, cluster_state) VALUES (?,?,?,?,?,?,?)",
                (cluster_id, verdict, note, user, role, at.isoformat(), json.dumps(cluster_state, default=str)),
            )
            self._writes += 1
        return VerdictRecord(verdict_id=cur.lastrowid, cluster_id=cluster_id, verdict=verdict, note=note, user=user,
                             role=role, at=at, cluster_state=cluster_state)

    def record_effects(self, verdict_id: int, effects: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO verdict_effects (verdict_id, effects) VALUES (?, ?)",
                             (verdict_id, json.dumps(effects, default=str)))

    def desk_alerts_sent(self, cluster_id: str, *, before: int | None = None) -> list[SentDeskAlert]:
        """The alerts verdicts (those before verdict ``before``) raised for
        ``cluster_id`` (ids ``<cluster>:desk-<verdict>[:<verdict id>]``), each
        with the verdict that raised it (what it announced), oldest first,
        whichever cluster the verdict was given on: a verdict's
        alerts cover every cluster it judged (its recorded effects). A ``fake``
        verdict on the cluster whose effects were never recorded (the store
        failed after its alert went out) counts as ``<cluster>:desk-fake``:
        a correction is better sent once too often than never. Verdicts are
        people's: a scan of their effects is small."""
        prefix = cluster_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":desk-%"
        last = before if before is not None else 2 ** 62
        with self._lock:
            rows = self._db.execute(
                """SELECT e.verdict_id, a.key, a.value, v.verdict
                   FROM verdict_effects e JOIN verdicts v ON v.verdict_id = e.verdict_id, json_each(e.effects, '$.alerts') a
                   WHERE e.verdict_id < ?2 AND a.type = 'text' AND a.value LIKE ?1 ESCAPE '\\'
                   UNION ALL
                   SELECT v.verdict_id, 0, v.cluster_id || ':desk-fake', v.verdict FROM verdicts v
                   LEFT JOIN verdict_effects e ON e.verdict_id = v.verdict_id
                   WHERE v.verdict_id < ?2 AND v.cluster_id = ?3 AND v.verdict = 'fake' AND e.verdict_id IS NULL
                   ORDER BY 1, 2""", (prefix, last, cluster_id)).fetchall()
        return [SentDeskAlert(alert_id=alert_id, verdict=verdict, verdict_id=verdict_id)
                for verdict_id, _, alert_id, verdict in rows
                if alert_id.startswith(f"{cluster_id}:desk-")]  # LIKE folds ASCII case

    def history(self, cluster_ids: list[str], *, members: int | None = None) -> list[VerdictRecord]:
        """The verdicts given on ``cluster_ids``, oldest first. ``members``:
        each ``cluster_state`` with only the first ``members`` of the members
        it kept and ``members_total``, how many, as ``source.state_page``
        pages them, cut by SQLite: a verdict on a viral cluster kept its
        10,000 sha256s (670 KB), all read and parsed here for every view of
        its page before. A state SQLite does not cut comes whole, for the
        caller to page: no members; members other than text (SQLite would
        write a number its own way); or, for the whole read, a state that is
        no JSON to SQLite (Python's json writes NaN)."""
        if not cluster_ids:
            return []
        if members is not None:
            try:
                return self._history(cluster_ids, members)
            except sqlite3.OperationalError as e:
                if primary_code(e) != "SQLITE_ERROR":  # "malformed JSON"; a busy file is no reason to read it all
                    raise
        return self._history(cluster_ids, None)

    def _history(self, cluster_ids: list[str], members: int | None) -> list[VerdictRecord]:
        marks = ",".join("?" * len(cluster_ids))
        args: list[Any] = [*cluster_ids]
        if members is None:
            state = "v.cluster_state"
        else:
            # total: NULL or 0 where members is no array (or none), cut only past that;
            # head: the first members (json_each gives them in order), NULL if one is not text.
            # Materialized: referenced twice, head would be worked out twice (each a parse of the state).
            state = """(WITH p AS MATERIALIZED (
                           SELECT cs, total, CASE WHEN total > 0 THEN (
                               SELECT CASE WHEN SUM(m.type <> 'text') THEN NULL ELSE json_group_array(m.value) END
                               FROM (SELECT type, value FROM json_each(cs, '$.members') LIMIT ?1) AS m) END AS head
                           FROM (SELECT v.cluster_state AS cs, json_array_length(v.cluster_state, '$.members') AS total))
                       SELECT CASE WHEN head IS NULL THEN cs
                                   ELSE json_set(cs, '$.members', json(head), '$.members_total', total) END FROM p)"""
            args.insert(0, members)  # ?1, before the ids' marks (numbered after it)
        rows = self._db.execute(
            f"""SELECT v.verdict_id, v.cluster_id, v.verdict, v.note, v.user, v.role, v.at, {state},
                       COALESCE(e.effects, '{{}}')
                FROM verdicts v LEFT JOIN verdict_effects e ON e.verdict_id = v.verdict_id
                WHERE v.cluster_id IN ({marks}) ORDER BY v.verdict_id""", args,
        ).fetchall()
        return [VerdictRecord(verdict_id=r[0], cluster_id=r[1], verdict=r[2], note=r[3], user=r[4], role=r[5],
                              at=datetime.fromisoformat(r[6]), cluster_state=json.loads(r[7]), effects=json.loads(r[8]))
                for r in rows]

    # -- overlay ---------------------------------------------------------------
    def set_overlay(self, rows: list[OverlayRow], clear_source: str) -> None:
        """Replace what the verdict on ``clear_source`` implied with ``rows``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM overlay WHERE source_cluster=?", (clear_source,))
                for r in rows:
                    # A cluster's own verdict beats one inherited through a match.
                    own = self._db.execute("SELECT source_cluster FROM overlay WHERE cluster_id=?", (r.cluster_id,)).fetchone()
                    if own and own[0] == r.cluster_id and r.source_cluster != r.cluster_id:
                        continue
                    self._db.execute(
                        """INSERT INTO overlay (cluster_id, verdict, verdict_id, source_cluster, detail) VALUES (?,?,?,?,?)
                           ON CONFLICT(cluster_id) DO UPDATE SET verdict=excluded.verdict, verdict_id=excluded.verdict_id,
                           source_cluster=excluded.source_cluster, detail=excluded.detail""",
                        (r.cluster_id, r.verdict, r.verdict_id, r.source_cluster, r.detail),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._writes += 1

    def overlay(self) -> dict[str, OverlayRow]:
        rows = self._db.execute("SELECT cluster_id, verdict, verdict_id, source_cluster, detail FROM overlay").fetchall()
        return {r[0]: OverlayRow(cluster_id=r[0], verdict=r[1], verdict_id=r[2], source_cluster=r[3], detail=r[4]) for r in rows}

    # -- sessions --------------------------------------------------------------
    def new_session(self, user: str, role: str, hours: float, credential: str) -> tuple[str, Session]:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE expires < ?", (time.time(),))
            self._db.execute(
                "INSERT INTO sessions (token_hash, user, role, csrf, expires, credential) VALUES (?,?,?,?,?,?)",
                (_hash_token(token), user, role, csrf, time.time() + hours * 3600, credential))
        return token, Session(user=user, role=role, csrf=csrf, credential=credential)

    def session(self, token: str) -> Session | None:
        row = self._db.execute("SELECT user, role, csrf, expires, credential FROM sessions WHERE token_hash=?",
                               (_hash_token(token),)).fetchone()
        if row is None or row[3] < time.time():
            return None
        return Session(user=row[0], role=row[1], csrf=row[2], credential=row[4])

    def end_session(self, token: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE token_hash=?", (_hash_token(token),))

    # -- account alerts --------------------------------------------------------
    def account_alerted(self, account_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM account_alerts WHERE account_id=?", (account_id,)).fetchone() is not None

    def mark_account_alerted(self, account_id: str, alert_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO account_alerts (account_id, alert_id, at) VALUES (?,?,?)",
                             (account_id, alert_id, datetime.now(timezone.utc).isoformat()))
