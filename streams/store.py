"""Findings: clusters, sightings, evidence, alerts and dead letters.

``FindingsStore`` is the interface every sink writes through and every query
command reads through; ``SqliteFindingsStore`` is the embedded default (one
file in the data directory), an Elasticsearch implementation fits behind the
same methods. Every write is an idempotent upsert keyed by something the
stream already makes stable (cluster id + revision, event id, alert id, the
source offset of a dead letter), so at-least-once delivery and replays change
nothing.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from streams.records import Alert, ClusterSnapshot, DeadLetter, Sighting


@dataclass(frozen=True)
class MemberRow:
    cluster_id: str
    sha256: str
    phash: str
    pdq: str
    pdq_quality: int
    views: list[str] | None = None
    trimmed: bool = False


class FindingsStore(Protocol):
    def apply_snapshot(self, snap: ClusterSnapshot) -> None: ...
    def add_dead_letter(self, dl: DeadLetter) -> bool: ...
    def add_alert(self, alert: Alert) -> bool: ...
    def delivered(self, alert_id: str, target: str) -> bool: ...
    def mark_delivered(self, alert_id: str, target: str, status: str) -> None: ...
    def clusters(self, *, include_merged: bool = False, limit: int | None = None) -> list[dict[str, Any]]: ...
    def alerts(self) -> list[dict[str, Any]]: ...
    def dead_letters(self) -> list[dict[str, Any]]: ...
    def processed_since(self, topic: str, after_rowid: int) -> tuple[set[tuple[int, int]], int]: ...
    def processed_offsets(self, topic: str) -> set[tuple[int, int]]: ...
    def iter_members(self) -> Iterator[MemberRow]: ...
    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS clusters (
    cluster_id TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    fake_score REAL NOT NULL,
    verdict TEXT NOT NULL,
    evidence TEXT NOT NULL,
    velocity TEXT NOT NULL,
    platforms TEXT NOT NULL,
    engagement TEXT NOT NULL,
    stream_sightings INTEGER NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    merged_into TEXT,
    merged_from TEXT NOT NULL,
    models_pending INTEGER NOT NULL,
    suppressed TEXT,
    alert_level INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
);
CREATE TABLE IF NOT EXISTS members (
    sha256 TEXT NOT NULL,
    cluster_id TEXT NOT NULL,
    phash TEXT NOT NULL,
    pdq TEXT NOT NULL,
    pdq_quality INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    width INTEGER, height INTEGER, format TEXT, distance INTEGER,
    views TEXT, trimmed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sha256)
);
CREATE INDEX IF NOT EXISTS members_cluster ON members(cluster_id);
CREATE TABLE IF NOT EXISTS sightings (
    event_id TEXT PRIMARY KEY,
    cluster_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    platform TEXT NOT NULL,
    account_id TEXT NOT NULL,
    account_handle TEXT,
    post_url TEXT,
    posted_at TEXT NOT NULL,
    engagement TEXT NOT NULL,
    text TEXT
);
CREATE INDEX IF NOT EXISTS sightings_cluster ON sightings(cluster_id);
CREATE TABLE IF NOT EXISTS processed (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    outcome TEXT NOT NULL, event_id TEXT,
    PRIMARY KEY (topic, partition, "offset")
);
CREATE TABLE IF NOT EXISTS dead_letters (
    dl_key TEXT PRIMARY KEY,
    event_id TEXT, stage TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
    source TEXT, payload_excerpt TEXT, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    cluster_id TEXT NOT NULL,
    level INTEGER NOT NULL,
    doc TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_cluster ON alerts(cluster_id);
CREATE TABLE IF NOT EXISTS deliveries (
    alert_id TEXT NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (alert_id, target)
);
"""


class SqliteFindingsStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several worker processes share the file: WAL lets readers run during
        # writes and busy_timeout turns lock contention into a short wait.
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._enable_wal()
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _enable_wal(self, timeout_s: float = 30.0) -> None:
        # Switching a new file to WAL needs an exclusive lock and SQLite does
        # not always wait on the busy handler for it: workers starting side by
        # side on a fresh data dir would fail with "database is locked".
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _migrate(self) -> None:
        """Columns added after a store file may have been created."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(members)")}
        for column, decl in (("views", "TEXT"), ("trimmed", "INTEGER NOT NULL DEFAULT 0")):
            if column not in have:
                try:
                    self._db.execute(f"ALTER TABLE members ADD COLUMN {column} {decl}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):  # another process migrated first
                        raise

    def _tx(self):
        return _Tx(self._db, self._lock)

    # -- writes -------------------------------------------------------------
    def apply_snapshot(self, snap: ClusterSnapshot) -> None:
        with self._tx() as db:
            db.execute(
                """INSERT INTO clusters (cluster_id, revision, fake_score, verdict, evidence, velocity, platforms,
                        engagement, stream_sightings, first_seen, last_seen, merged_into, merged_from, models_pending, suppressed,
                        alert_level)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(cluster_id) DO UPDATE SET
                        revision=excluded.revision, fake_score=excluded.fake_score, verdict=excluded.verdict,
                        evidence=excluded.evidence, velocity=excluded.velocity, platforms=excluded.platforms,
                        engagement=excluded.engagement, stream_sightings=excluded.stream_sightings,
                        first_seen=excluded.first_seen, last_seen=excluded.last_seen, merged_into=excluded.merged_into,
                        merged_from=excluded.merged_from, models_pending=excluded.models_pending,
                        suppressed=excluded.suppressed, alert_level=excluded.alert_level,
                        updated_at=strftime('%Y-%m-%dT%H:%M:%fZ','now')
                   WHERE excluded.revision > clusters.revision""",
                (
                    snap.cluster_id, snap.revision, snap.fake_score, snap.verdict,
                    json.dumps([e.model_dump(exclude_none=True) for e in snap.evidence]),
                    snap.velocity.model_dump_json(), json.dumps(snap.platforms), snap.engagement.model_dump_json(),
                    snap.sightings, snap.first_seen.isoformat(), snap.last_seen.isoformat(), snap.merged_into,
                    json.dumps(snap.merged_from), int(snap.models_pending), snap.suppressed, snap.alert_level,
                ),
            )
            for m in snap.members:
                db.execute(
                    """INSERT INTO members (sha256, cluster_id, phash, pdq, pdq_quality, event_id, width, height, format,
                           distance, views, trimmed)
                       VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(sha256) DO NOTHING""",
                    (m.sha256, snap.cluster_id, m.phash, m.pdq, m.pdq_quality, m.event_id, m.width, m.height, m.format,
                     m.distance, json.dumps(m.views) if m.views else None, int(m.trimmed)),
                )
            if snap.new_sighting is not None:
                self._insert_sighting(db, snap.cluster_id, snap.new_sighting)

    @staticmethod
    def _insert_sighting(db: sqlite3.Connection, cluster_id: str, s: Sighting) -> None:
        ev = s.event
        db.execute(
            """INSERT INTO sightings (event_id, cluster_id, sha256, platform, account_id, account_handle, post_url,
                   posted_at, engagement, text) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(event_id) DO NOTHING""",
            (ev.event_id, cluster_id, s.sha256, ev.platform, ev.account_id, ev.account_handle, ev.post_url,
             ev.posted_at.isoformat(), ev.engagement.model_dump_json(), (ev.text or "")[:2000]),
        )
        db.execute(
            """INSERT INTO processed (topic, partition, "offset", outcome, event_id) VALUES (?,?,?,?,?)
               ON CONFLICT DO NOTHING""",
            (s.source.topic, s.source.partition, s.source.offset, "sighting", ev.event_id),
        )

    def add_dead_letter(self, dl: DeadLetter) -> bool:
        src = dl.source
        # Keyed by what the event is, not where it sat on the broker, so the
        # same bad event replayed later is still one dead letter.
        ident = dl.event_id or "sha256:" + hashlib.sha256((dl.payload_excerpt or dl.detail).encode()).hexdigest()
        key = f"{ident}/{dl.stage}/{dl.reason}"
        with self._tx() as db:
            cur = db.execute(
                """INSERT INTO dead_letters (dl_key, event_id, stage, reason, detail, source, payload_excerpt, at)
                   VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING""",
                (key, dl.event_id, dl.stage, dl.reason, dl.detail, src.model_dump_json() if src else None,
                 dl.payload_excerpt, dl.at.isoformat()),
            )
            if src is not None:
                db.execute(
                    """INSERT INTO processed (topic, partition, "offset", outcome, event_id) VALUES (?,?,?,?,?)
                       ON CONFLICT DO NOTHING""",
                    (src.topic, src.partition, src.offset, "dead_letter", dl.event_id),
                )
            return cur.rowcount > 0

    def add_alert(self, alert: Alert) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO alerts (alert_id, cluster_id, level, doc, created_at) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (alert.alert_id, alert.cluster_id, alert.level, alert.model_dump_json(), alert.created_at.isoformat()),
            )
            return cur.rowcount > 0

    def delivered(self, alert_id: str, target: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM deliveries WHERE alert_id=? AND target=? AND status='delivered'", (alert_id, target)
        ).fetchone()
        return row is not None

    def mark_delivered(self, alert_id: str, target: str, status: str) -> None:
        with self._tx() as db:
            db.execute(
                """INSERT INTO deliveries (alert_id, target, status) VALUES (?,?,?)
                   ON CONFLICT(alert_id, target) DO UPDATE SET status=excluded.status""",
                (alert_id, target, status),
            )

    # -- reads --------------------------------------------------------------
    def _roots(self) -> dict[str, str]:
        """cluster id -> surviving cluster id, following merges (sightings keep
        the id they were recorded under; merges are resolved when reading)."""
        into = dict(self._db.execute("SELECT cluster_id, merged_into FROM clusters").fetchall())
        roots: dict[str, str] = {}
        for cid in into:
            cur, hops = cid, 0
            while into.get(cur) and hops < 64:
                cur, hops = into[cur], hops + 1
            roots[cid] = cur
        return roots

    def clusters(self, *, include_merged: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        roots = self._roots()
        agg: dict[str, dict[str, Any]] = {}
        for cid, account, platform, posted_at in self._db.execute(
            "SELECT cluster_id, account_id, platform, posted_at FROM sightings"
        ):
            root = roots.get(cid, cid)
            a = agg.setdefault(root, {"n": 0, "accounts": set(), "platforms": set(), "first": posted_at, "last": posted_at})
            a["n"] += 1
            a["accounts"].add(account)
            a["platforms"].add(platform)
            a["first"] = min(a["first"], posted_at)
            a["last"] = max(a["last"], posted_at)
        members: dict[str, list[dict[str, Any]]] = {}
        for row in self._db.execute(
            "SELECT cluster_id, sha256, phash, pdq, pdq_quality, event_id, width, height, format, distance FROM members ORDER BY rowid"
        ):
            cid, sha, ph, pdq, q, eid, w, h, fmt, dist = row
            members.setdefault(roots.get(cid, cid), []).append(
                {"sha256": sha, "phash": ph, "pdq": pdq, "pdq_quality": q, "event_id": eid,
                 "width": w, "height": h, "format": fmt, "distance": dist}
            )
        out = []
        for row in self._db.execute(
            """SELECT cluster_id, revision, fake_score, verdict, evidence, velocity, engagement, first_seen, last_seen,
                      merged_into, merged_from, models_pending, suppressed, updated_at, alert_level, stream_sightings
               FROM clusters ORDER BY fake_score DESC, cluster_id"""
        ):
            (cid, rev, score, verdict, evidence, vel, eng, first, last, merged_into, merged_from, pending, suppressed,
             updated, alert_level, stream_sightings) = row
            if merged_into and not include_merged:
                continue
            a = agg.get(cid, {"n": 0, "accounts": set(), "platforms": set(), "first": first, "last": last})
            out.append({
                "id": cid,
                "fake_score": round(score, 4),
                "verdict": verdict,
                "evidence": json.loads(evidence),
                "sightings": a["n"],
                "accounts": len(a["accounts"]),
                "platforms": sorted(a["platforms"]),
                "first_seen": a["first"],
                "last_seen": a["last"],
                "velocity": json.loads(vel),
                "engagement": json.loads(eng),
                "members": members.get(cid, []) if not merged_into else [],
                "merged_from": json.loads(merged_from),
                "merged_into": merged_into,
                "models_pending": bool(pending),
                "suppressed": suppressed,
                "alert_level": alert_level,
                # The stream's own running count; equal to `sightings` unless
                # the stream lost or double-counted something.
                "stream_sightings": stream_sightings,
                "revision": rev,
                "updated_at": updated,
            })
        return out[:limit] if limit else out

    def alerts(self) -> list[dict[str, Any]]:
        out = []
        for doc, in self._db.execute("SELECT doc FROM alerts ORDER BY created_at, alert_id"):
            out.append(json.loads(doc))
        return out

    def dead_letters(self) -> list[dict[str, Any]]:
        cols = ["event_id", "stage", "reason", "detail", "source", "payload_excerpt", "at"]
        out = []
        for row in self._db.execute(f"SELECT {', '.join(cols)} FROM dead_letters ORDER BY at, dl_key"):
            d = dict(zip(cols, row))
            d["source"] = json.loads(d["source"]) if d["source"] else None
            out.append(d)
        return out

    def processed_since(self, topic: str, after_rowid: int) -> tuple[set[tuple[int, int]], int]:
        """Offsets recorded after ``after_rowid``, and the new high rowid: lets a
        poller read only what is new instead of the whole table each time."""
        rows = self._db.execute(
            'SELECT rowid, partition, "offset" FROM processed WHERE topic=? AND rowid>? ORDER BY rowid',
            (topic, after_rowid),
        ).fetchall()
        return {(p, o) for _, p, o in rows}, (rows[-1][0] if rows else after_rowid)

    def processed_offsets(self, topic: str) -> set[tuple[int, int]]:
        return {(p, o) for p, o in self._db.execute('SELECT partition, "offset" FROM processed WHERE topic=?', (topic,))}

    def pending_work(self) -> dict[str, int]:
        """Work the stream still owes the store: model results not yet in, and
        alerts the cluster engine raised that the alert sink has not stored."""
        pending_models = self._db.execute(
            "SELECT COUNT(*) FROM clusters WHERE models_pending=1 AND merged_into IS NULL"
        ).fetchone()[0]
        raised = self._db.execute("SELECT COALESCE(SUM(alert_level),0) FROM clusters WHERE merged_into IS NULL").fetchone()[0]
        stored = self._db.execute("SELECT COUNT(DISTINCT cluster_id || ':' || level) FROM alerts").fetchone()[0]
        return {"models": pending_models, "alerts": max(0, raised - stored)}

    def iter_members(self) -> Iterator[MemberRow]:
        roots = self._roots()
        for cid, sha, ph, pdq, q, views, trimmed in self._db.execute(
            "SELECT cluster_id, sha256, phash, pdq, pdq_quality, views, trimmed FROM members"
        ):
            yield MemberRow(roots.get(cid, cid), sha, ph, pdq, q, json.loads(views) if views else None, bool(trimmed))

    def sighting_times(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT event_id, posted_at FROM sightings"))


class _Tx:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_: object) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def open_store(data_dir: Path) -> SqliteFindingsStore:
    return SqliteFindingsStore(Path(data_dir) / "findings.sqlite")
