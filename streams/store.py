"""Findings: clusters, sightings, evidence, alerts and dead letters.

``streams.findings.FindingsStore`` is the interface every sink writes through
and every query command reads through; ``SqliteFindingsStore`` is the embedded
default (one file in the data directory, full-text search with FTS5) and
``streams.es_store.EsFindingsStore`` the Elasticsearch one. Every write is an idempotent upsert keyed by something the
stream already makes stable (cluster id + revision, event id, alert id, the
event behind a dead letter: ``dead_letter_identity``), so at-least-once
delivery and replays change nothing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import unicodedata
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

from detectors.sqlite_errors import primary_code
from streams.cluster_search import (
    SORT_KEYS, ClusterQuery, Deadline, SearchCursor, SearchPage, SearchTimeout, event_hashtags, sort_key, sort_order,
    text_terms,
)
from streams.findings import (
    MAX_MERGE_HOPS, MAX_RESULTS, QUEUED_RECENT_S, AlertRecord, ClusterRecord, DeadLetterRecord, DeliveryState,
    FindingsStore, Page, PostIdentity, SightingRecord, StoredDeadLetter, dead_letter_identity,
    legacy_dead_letter_identity, legacy_delivery,
    plan_dead_letters, read_limit, score_floor, shown_score, stored_at, superseded_by_sighting, surviving_cluster,
    unstored_alerts, without_webhook_urls,
)
from streams.private_files import SQLITE_COMPANIONS, owner_only, private_dir
from streams.records import Alert, ClusterSnapshot, DeadLetter, NewerSchema, Sighting, SourceRef
from streams.sqlite_wal import enable_wal
from streams.store_accounts import AccountQueries
from streams.store_deliveries import DeliveryLog
from streams.store_members import MemberQueries

__all__ = ["FindingsStore", "SqliteFindingsStore", "StoreError", "open_store"]

# PRAGMA user_version of the files this code writes. Older files are migrated
# (``_migrate``); a newer one is refused rather than half-understood. 2:
# deliveries keep their state in a column of their own and ``status`` only
# why: a deepwatch of schema 1 would misread them (delivered ones as owed).
# 3: sightings' platforms in lower case (``_fold_platforms``) and hashtags
# indexed apart (``_ensure_fts``): a deepwatch of schema 2 may write
# "Bluesky" beside "bluesky" again, and indexes a post's tags as one run.
SCHEMA_VERSION = 3
# Sightings per transaction when an older store's platforms are folded: each
# holds the write lock well under a second (0.45 s measured at 1M sightings).
FOLD_CHUNK_ROWS = 100_000
# Put between a post's hashtags in the full-text index: a private-use code
# point, a token of its own to FTS5's unicode61 (its categories L* N* Co), that
# no search term holds (``text_terms`` keeps letters, digits and marks), so a
# phrase never runs from one tag into the next ("trump arrested" is not
# #trump #arrested), as Elasticsearch's position gap between array values.
TAG_GAP = " \ue000 "
# SQLite virtual-machine steps between two looks at a search's deadline
# (``_search_db``): well under a millisecond apart, a Python call each.
SEARCH_PROGRESS_STEPS = 20_000
# Read connections kept open between snapshot reads (``_snapshot``): about as
# many as the desk's threads reading at once; more are opened when needed and
# closed after.
IDLE_READERS = 4


class StoreError(OSError):
    """The findings file cannot be used (corrupt, another program's file, from
    a newer deepwatch, a row that does not read back); one line with the fix.
    An OSError: like a missing file, the CLI reports it without a traceback.
    ``sqlite_errorname``: SQLite's result code when SQLite raised it (a lock
    at open passes, a corrupt file does not: ``store_errors.may_pass``)."""

    sqlite_errorname: str | None = None
    passes_after_upgrade = False  # ``NewerStore``: held, not a dead letter (``store_errors.may_pass``)

    @classmethod
    def of(cls, message: str, e: sqlite3.Error) -> "StoreError":
        err = cls(message)
        err.sqlite_errorname = getattr(e, "sqlite_errorname", None)
        return err


class NewerStore(StoreError):
    """The findings file was migrated by a newer deepwatch. A worker of this
    version that meets it mid-run (a rolling upgrade: the newer cluster
    worker migrated the file its analyze workers share) holds its events
    until it is upgraded: as dead letters, every event it read was lost."""

    passes_after_upgrade = True


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
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    seq INTEGER NOT NULL DEFAULT 0  -- store-wide write counter: which rows changed since a reader looked
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
    text TEXT,
    hashtags TEXT NOT NULL DEFAULT '',
    lang TEXT
);
CREATE INDEX IF NOT EXISTS sightings_cluster ON sightings(cluster_id);
-- the desk's account views and alerts (account_aggregates, account_windows)
-- group by account, and an account's page reads its posts in this order
CREATE INDEX IF NOT EXISTS sightings_account ON sightings(account_id, julianday(posted_at), event_id);
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
-- the newest N alerts / dead letters (deepwatch alerts, dead-letters) read in
-- this order: without these SQLite sorted the whole table for every page
CREATE INDEX IF NOT EXISTS alerts_created ON alerts(created_at, alert_id);
CREATE INDEX IF NOT EXISTS dead_letters_at ON dead_letters(at, dl_key);
CREATE TABLE IF NOT EXISTS processed_runs (
    run TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    outcome TEXT NOT NULL, event_id TEXT,
    PRIMARY KEY (run, topic, partition, "offset")
);
-- state: a streams.findings.DeliveryState; status: why, for people (''
-- when there is nothing to say). NULL state: a row of schema 1, its state
-- still in its status text until _derive_delivery_states reads it
CREATE TABLE IF NOT EXISTS deliveries (
    alert_id TEXT NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    state TEXT,
    PRIMARY KEY (alert_id, target)
);
"""


def _nfc(value: object) -> object:
    return unicodedata.normalize("NFC", value) if isinstance(value, str) else value


def _register_functions(db: sqlite3.Connection) -> None:
    """The Python functions deepwatch's queries call, on ``db``: ``dw_round``
    (the account list ranks by the AI share as shown: Python's rounding, not
    SQLite's) and ``dw_lower`` (Python's case folding, any script, of the
    composed form: handles stored decomposed before events were composed
    match a query, which is)."""
    db.create_function("dw_round", 2, round, deterministic=True)
    db.create_function("dw_lower", 1, lambda v: _nfc(v).lower() if isinstance(v, str) else v, deterministic=True)


class SqliteFindingsStore(DeliveryLog, AccountQueries, MemberQueries):
    """The embedded findings store: one SQLite file (see the module
    docstring). Its alert deliveries, account views and member reads are in
    ``streams.store_deliveries``, ``streams.store_accounts`` and
    ``streams.store_members``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        private_dir(self.path.parent)  # 0700 where deepwatch makes it
        # Owner-only (0600, its -wal and -shm too), not the umask's 0644: its alerts hold desk verdicts'
        # notes and editors' names, its sightings the accounts and posts seen. A new file is made so here;
        # one there before is narrowed once it reads as a findings store (``_check_kind``, below): another
        # program's database given by mistake is refused and left as it was, its mode too.
        if not self.path.exists():
            owner_only(self.path, "findings store")
        # Several worker processes share the file: WAL lets readers run during
        # writes and busy_timeout turns lock contention into a short wait.
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            import os
            import stat

            # A file this user may not read and write (chmod 000, another user's 0600) in a writable
            # directory: "it must be a file in a writable directory" sent people to the directory.
            if self.path.is_file() and not os.access(self.path, os.R_OK | os.W_OK):
                st = self.path.stat()
                raise StoreError.of(
                    f"cannot open findings store {str(self.path)!r} ({e}): this user (uid {os.geteuid()}) may not "
                    f"read and write the file (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}); give it "
                    "read and write permission (chmod u+rw, or chown it to the user that runs deepwatch), or "
                    "give --data-dir or --store another place", e) from None
            raise StoreError.of(f"cannot open findings store {str(self.path)!r} ({e}): it must be a file in a "
                                "writable directory; give --data-dir or --store another place", e) from None
        try:
            self._db.execute("PRAGMA busy_timeout=30000")
            self._check_kind()  # first: WAL mode would persist in another program's file
            owner_only(self.path, "findings store", SQLITE_COMPANIONS)
            enable_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate(self._db.execute("PRAGMA user_version").fetchone()[0])
            if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            self._db.close()
            # By SQLite's result code, not its words: a "malformed JSON" (SQLITE_ERROR)
            # is no damaged file, and the advice below is to move the file aside.
            code = primary_code(e)
            if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise StoreError.of(f"findings store {str(self.path)!r} is not a readable SQLite database ({e}): "
                                    "move it aside (deepwatch starts a new one) or restore it from a backup", e) from None
            # SQLite writes to open a store (its write-ahead log), reads included
            fix = (": deepwatch needs write access to the file and its directory, reads included (SQLite's "
                   "write-ahead log); check their permissions, or copy the data dir somewhere writable"
                   if code in ("SQLITE_READONLY", "SQLITE_CANTOPEN") else "")
            raise StoreError.of(f"cannot open findings store {str(self.path)!r}: {e}{fix}", e) from None
        except StoreError:
            self._db.close()
            raise
        self._lock = threading.Lock()
        self._udf_db: sqlite3.Connection | None = None
        self._udf_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._reading = threading.local()  # .db: the connection of this thread's ``_snapshot``

    @property
    def _rdb(self) -> sqlite3.Connection:
        """The connection a read runs on: inside ``_snapshot``, this thread's
        snapshot; outside one, the shared connection (each statement its own)."""
        return getattr(self._reading, "db", None) or self._db

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so that every statement a read makes (through
        ``_rdb``) sees the same committed state. In WAL mode each autocommit
        statement sees the file as of its own start: a sighting committed
        between two statements of one read was in ``last_seen`` but not in
        the count, or a member was read without its cluster's row.

        On a connection of its own (a few kept idle), not the shared one: a
        transaction there would take in the statements other threads run on
        it meanwhile, and a writer thread's ``BEGIN IMMEDIATE`` would fail
        inside it. A WAL reader never blocks the writer (it only keeps a
        checkpoint from passing its snapshot, while it lasts); the
        transaction ends when the block does, however it ends. Nested in the
        same thread: the outer read's snapshot."""
        held = getattr(self._reading, "db", None)
        if held is not None:
            yield held
            return
        with self._readers_lock:
            db = self._idle_readers.pop() if self._idle_readers else None
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.execute("BEGIN")  # deferred: the snapshot is taken by the first SELECT
        except BaseException:
            db.close()
            raise
        self._reading.db = db
        try:
            yield db
        finally:
            self._reading.db = None
            self._end_read(db)

    def _end_read(self, db: sqlite3.Connection) -> None:
        """End ``_snapshot``'s transaction on ``db`` and keep it for the next
        read (closed if it cannot be ended, or enough are kept)."""
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")  # nothing was written: ends the read, releases the snapshot
        except BaseException:
            db.close()
            raise
        with self._readers_lock:
            if not self._closed and len(self._idle_readers) < IDLE_READERS:
                self._idle_readers.append(db)
                return
        db.close()

    @contextmanager
    def _with_functions(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own, one thread at a time, for the queries
        that call Python functions (``dw_round``, ``dw_lower``). A statement
        calling one holds its connection's mutex while it waits for the GIL,
        and a thread holding the GIL waits for that mutex in any call on the
        same connection (binding parameters): the desk, whose threads share
        ``_db``, hung for good when its account check and a request met so.
        On a connection only these queries use, under a lock taken without
        the GIL, that cannot happen."""
        with self._udf_lock:
            if self._udf_db is None:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA busy_timeout=30000")
                _register_functions(db)
                self._udf_db = db
            yield self._udf_db

    @contextmanager
    def _search_db(self, deadline: Deadline | None, *, functions: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection a search's scans run on. Without a deadline the
        shared one (``functions``: ``_with_functions``'s). With one, a
        connection of this search's own whose progress handler interrupts
        the statement running once the deadline has passed (SQLite then
        raises "interrupted", answered as ``SearchTimeout``): a handler is a
        Python call made with its connection's mutex held, which on the
        shared connection could hang the desk's threads (see
        ``_with_functions``) and would stop other threads' statements too.
        Opening one costs well under a millisecond; a WAL reader waits on no
        writer."""
        if deadline is None:
            if functions:
                with self._with_functions() as db:
                    yield db
            else:
                yield self._db
            return
        deadline.left()
        # a lock wait (a writer checkpointing, say) is bounded by the same deadline
        db = sqlite3.connect(self.path, timeout=deadline.left(), isolation_level=None, check_same_thread=False)
        try:
            if functions:
                _register_functions(db)
            db.set_progress_handler(deadline.passed, SEARCH_PROGRESS_STEPS)
            try:
                yield db
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorname", None) == "SQLITE_INTERRUPT" or deadline.passed():
                    raise SearchTimeout(deadline.timeout_s) from None
                raise
        finally:
            db.close()

    def _check_kind(self) -> None:
        """Refuse a file this code would misread or damage: one from a newer
        deepwatch, or another program's database (``--store sqlite:///…/banks.sqlite``)
        that CREATE TABLE IF NOT EXISTS would quietly add findings tables to."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise NewerStore(f"findings store {str(self.path)!r} was written by a newer deepwatch (schema {version}; "
                             f"this one reads up to {SCHEMA_VERSION}): upgrade deepwatch, or use another --data-dir")
        tables = {name for name, in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and not tables & {"clusters", "sightings", "processed"}:
            raise StoreError(f"{str(self.path)!r} is not a deepwatch findings store (its tables: "
                             f"{', '.join(sorted(tables)[:5])}): give --store the findings file, or another path")

    def close(self) -> None:
        self._db.close()
        with self._udf_lock:
            if self._udf_db is not None:
                self._udf_db.close()
        with self._readers_lock:
            self._closed = True
            idle, self._idle_readers = self._idle_readers, []
        for db in idle:
            db.close()

    def ensure_setup(self) -> None:
        """Nothing to do (``StoreSetup``): the tables were made, or migrated, when the file opened."""

    def _migrate(self, version: int) -> None:
        """Columns, indexes and stored values that changed after a store file
        of schema ``version`` may have been created."""
        for table, columns in (
            ("members", (("views", "TEXT"), ("trimmed", "INTEGER NOT NULL DEFAULT 0"))),
            ("sightings", (("hashtags", "TEXT NOT NULL DEFAULT ''"), ("lang", "TEXT"))),
            ("clusters", (("seq", "INTEGER NOT NULL DEFAULT 0"),)),
            ("deliveries", (("state", "TEXT"),)),
        ):
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, decl in columns:
                if column not in have:
                    try:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                    except sqlite3.OperationalError as e:
                        if "duplicate column" not in str(e):  # another process migrated first
                            raise
        self._db.execute("CREATE INDEX IF NOT EXISTS clusters_seq ON clusters(seq)")
        # the desk's view window (``recent_clusters``, ``newest_last_seen``): the most
        # recently seen clusters without reading every one (as instants: texts carry offsets)
        self._db.execute("CREATE INDEX IF NOT EXISTS clusters_last_seen ON clusters(julianday(last_seen))")
        # the desk's account views count the store's likely-AI clusters (``verdict_cluster_ids``)
        self._db.execute("CREATE INDEX IF NOT EXISTS clusters_live_verdict ON clusters(verdict) "
                         "WHERE merged_into IS NULL")
        # a picture lookup reads the clusters merged into the ones it found
        # (``members_near``) without scanning every cluster
        self._db.execute("CREATE INDEX IF NOT EXISTS clusters_merged_into ON clusters(merged_into) "
                         "WHERE merged_into IS NOT NULL")
        # the replay summary reads a run's alerts by creation time, and its dead letters by where
        # they sat (``alerts_created_since``, ``dead_letters_of``): without these, a read of the
        # whole table per summary, however many rows earlier runs left
        self._db.execute("CREATE INDEX IF NOT EXISTS alerts_created_instant ON alerts(julianday(created_at))")
        self._db.execute(f"CREATE INDEX IF NOT EXISTS dead_letters_source ON dead_letters({_DL_SOURCE}) "
                         "WHERE source IS NOT NULL")
        if version < 3:
            self._fold_platforms()
        self._ensure_fts()
        self._key_delivery_targets()
        self._derive_delivery_states()

    def _key_delivery_targets(self) -> None:
        """Delivery records written before targets were keyed named the whole
        webhook URL (a token in it, often), and so did their status text
        ("failed: <url>: HTTP 503"): rename them to its ``target_key`` and
        show the URL in their status as its label
        (``findings.without_webhook_urls``). Rows keyed by a version that
        kept that text (the token still in it) get their status cleaned
        too; reads clean it meanwhile (``DeliveryLog._record``). Runs at
        each writer's open: a scan of the deliveries (one row per alert and
        hook, so small), which writes nothing once no row shows a URL."""
        from streams.webhooks import target_key

        legacy = [t for t, in self._db.execute("SELECT DISTINCT target FROM deliveries") if target_key(t) != t]
        # every row that may show a URL: labels ("http://host:port: HTTP 503") are
        # picked too, and left as they are
        shown = [(new, alert_id, target) for alert_id, target, status in self._db.execute(
                     "SELECT alert_id, target, status FROM deliveries WHERE instr(status, '://') > 0")
                 if (new := without_webhook_urls(status, target)) != status]
        if not legacy and not shown:
            return
        try:
            with _Tx(self._db, threading.Lock()) as db:  # opening: no other thread has this connection yet
                db.executemany("UPDATE deliveries SET status=? WHERE alert_id=? AND target=?", shown)
                for target in legacy:
                    db.execute("UPDATE OR IGNORE deliveries SET target=? WHERE target=?", (target_key(target), target))
                    db.execute("DELETE FROM deliveries WHERE target=?", (target,))  # a keyed record was there already
        except sqlite3.OperationalError:
            pass  # a read-only file (a reader's copy): the first writer to open it renames them

    def _derive_delivery_states(self) -> None:
        """Rows written before deliveries had a ``state`` kept it in their
        ``status`` text ("rejected: HTTP 403"): give each its state and leave
        ``status`` only the why, once (``legacy_delivery``, the one reader of
        that text). Every query reads ``state`` from then on; a row a
        schema-1 worker still running writes meanwhile has none until the
        next open, and is read through ``legacy_delivery`` (``DeliveryLog``)."""
        old = self._db.execute("SELECT alert_id, target, status FROM deliveries WHERE state IS NULL").fetchall()
        if not old:
            return
        derived = [(*legacy_delivery(status), alert_id, target) for alert_id, target, status in old]
        try:
            with _Tx(self._db, threading.Lock()) as db:  # opening: no other thread has this connection yet
                # ``state IS NULL`` again: another process may have derived (and since updated) the row
                db.executemany("UPDATE deliveries SET state=?, status=? WHERE alert_id=? AND target=? "
                               "AND state IS NULL", derived)
        except sqlite3.OperationalError:
            pass  # locked or failing now: left for the next open (and read through legacy_delivery meanwhile)

    def _fold_platforms(self) -> None:
        """Sightings stored before events were normalised, as every event is
        read since: platforms in lower case ("Bluesky": one platform is one
        value to lists, counts and charts, and the search's platform filter an
        equality) and text, hashtags and handles composed (NFC: a tag stored
        "cafe" + U+0301 matched no composed query). Idempotent (another process
        may fold beside this one); a transaction per ``FOLD_CHUNK_ROWS``
        sightings, so writers wait for none long (1M sightings, 40 % to fold:
        3.3 s in all, measured)."""
        self._db.create_function("dw_nfc", 1, _nfc, deterministic=True)
        # as ``ImageEvent`` folds them: Python's lower case (SQLite's lower() folds ASCII only)
        self._db.create_function("dw_platform", 1, lambda v: v.strip().lower() if isinstance(v, str) else v,
                                 deterministic=True)
        top = self._db.execute("SELECT MAX(rowid) FROM sightings").fetchone()[0] or 0
        for lo in range(0, top, FOLD_CHUNK_ROWS):
            with _Tx(self._db, threading.Lock()) as db:  # opening: no other thread has this connection yet
                db.execute("UPDATE sightings SET platform = dw_platform(platform) "
                           "WHERE rowid > ? AND rowid <= ? AND platform != dw_platform(platform)",
                           (lo, lo + FOLD_CHUNK_ROWS))
                db.execute("UPDATE sightings SET text = dw_nfc(text), hashtags = dw_nfc(hashtags), "
                           "account_handle = dw_nfc(account_handle) WHERE rowid > ? AND rowid <= ? AND "
                           "(text IS NOT dw_nfc(text) OR hashtags IS NOT dw_nfc(hashtags) "
                           "OR account_handle IS NOT dw_nfc(account_handle))", (lo, lo + FOLD_CHUNK_ROWS))

    def _ensure_fts(self) -> None:
        """Full text over post texts and hashtags: a contentless FTS5 index
        keyed by the sightings' rowids, filled as sightings arrive
        (``_insert_sighting``), its hashtags apart (``TAG_GAP``). Built once,
        in one transaction, for a store written before it existed or before
        tags were apart (an external-content index over ``sightings``, which
        read the hashtags column as one run of words): 3.9 s at 1M sightings."""
        sql = "SELECT sql FROM sqlite_master WHERE name='sightings_fts'"
        if "content=''" in (self._db.execute(sql).fetchone() or ("",))[0]:
            return
        with _Tx(self._db, threading.Lock()) as db:  # opening: no other thread has this connection yet
            if "content=''" in (db.execute(sql).fetchone() or ("",))[0]:
                return  # another process built it while this one waited for the lock
            db.execute("DROP TABLE IF EXISTS sightings_fts")
            db.execute("CREATE VIRTUAL TABLE sightings_fts USING fts5(text, hashtags, content='', "
                       "tokenize='unicode61 remove_diacritics 0')")
            # composed (NFC) as events are read since: text stored decomposed before ("cafe" +
            # U+0301) is found by the composed words every query is now made of
            self._db.create_function("dw_nfc", 1, _nfc, deterministic=True)
            db.execute("INSERT INTO sightings_fts(rowid, text, hashtags) "
                       "SELECT rowid, dw_nfc(coalesce(text, '')), replace(dw_nfc(hashtags), ' ', ?) FROM sightings",
                       (TAG_GAP,))

    def _tx(self):
        return _Tx(self._db, self._lock)

    # -- writes -------------------------------------------------------------
    def apply_snapshot(self, snap: ClusterSnapshot) -> None:
        self.apply_snapshots([snap])

    def apply_snapshots(self, snaps: Iterable[ClusterSnapshot]) -> None:
        """A batch in one transaction, ending as if applied one by one: a
        cluster's row is written once, from its newest revision in the batch
        (the first of equal revisions: an older or equal revision never
        overwrites), and every snapshot's members and new sighting are kept.
        One commit per batch instead of per snapshot is most of the sink's
        cost on a busy stream."""
        snaps = list(snaps)
        newest: dict[str, ClusterSnapshot] = {}
        for snap in snaps:
            have = newest.get(snap.cluster_id)
            if have is None or snap.revision > have.revision:
                newest[snap.cluster_id] = snap
        members: dict[str, tuple] = {}
        for snap in snaps:
            for m in snap.members:
                # the first row for a picture wins, as with one insert per snapshot
                members.setdefault(m.sha256, (
                    m.sha256, snap.cluster_id, m.phash, m.pdq, m.pdq_quality, m.event_id, m.width, m.height,
                    m.format, m.distance, json.dumps(m.views) if m.views else None, int(m.trimmed)))
        with self._tx() as db:
            db.executemany(
                """INSERT INTO clusters (cluster_id, revision, fake_score, verdict, evidence, velocity, platforms,
                        engagement, stream_sightings, first_seen, last_seen, merged_into, merged_from, models_pending, suppressed,
                        alert_level, seq)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,(SELECT COALESCE(MAX(seq), 0) + 1 FROM clusters))
                   ON CONFLICT(cluster_id) DO UPDATE SET
                        revision=excluded.revision, fake_score=excluded.fake_score, verdict=excluded.verdict,
                        evidence=excluded.evidence, velocity=excluded.velocity, platforms=excluded.platforms,
                        engagement=excluded.engagement, stream_sightings=excluded.stream_sightings,
                        first_seen=excluded.first_seen, last_seen=excluded.last_seen, merged_into=excluded.merged_into,
                        merged_from=excluded.merged_from, models_pending=excluded.models_pending,
                        suppressed=excluded.suppressed, alert_level=excluded.alert_level,
                        updated_at=strftime('%Y-%m-%dT%H:%M:%fZ','now'), seq=excluded.seq
                   WHERE excluded.revision > clusters.revision""",
                [(
                    snap.cluster_id, snap.revision, snap.fake_score, snap.verdict,
                    json.dumps([e.model_dump(exclude_none=True) for e in snap.evidence]),
                    snap.velocity.model_dump_json(), json.dumps(snap.platforms), snap.engagement.model_dump_json(),
                    snap.sightings, snap.first_seen.isoformat(), snap.last_seen.isoformat(), snap.merged_into,
                    json.dumps(snap.merged_from), int(snap.models_pending), snap.suppressed, snap.alert_level,
                ) for snap in newest.values()],
            )
            db.executemany(
                """INSERT INTO members (sha256, cluster_id, phash, pdq, pdq_quality, event_id, width, height, format,
                       distance, views, trimmed)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(sha256) DO NOTHING""",
                list(members.values()),
            )
            for snap in snaps:
                if snap.new_sighting is not None:
                    self._insert_sighting(db, snap.cluster_id, snap.new_sighting)

    @staticmethod
    def _insert_sighting(db: sqlite3.Connection, cluster_id: str, s: Sighting) -> None:
        ev = s.event
        tags = " ".join(event_hashtags(ev))
        cur = db.execute(
            """INSERT INTO sightings (event_id, cluster_id, sha256, platform, account_id, account_handle, post_url,
                   posted_at, engagement, text, hashtags, lang) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(event_id) DO NOTHING""",
            (ev.event_id, cluster_id, s.sha256, ev.platform, ev.account_id, ev.account_handle, ev.post_url,
             ev.posted_at.isoformat(), ev.engagement.model_dump_json(), ev.text or "", tags, ev.lang),
        )
        if cur.rowcount > 0:
            db.execute("INSERT INTO sightings_fts(rowid, text, hashtags) VALUES (?,?,?)",
                       (cur.lastrowid, ev.text or "", tags.replace(" ", TAG_GAP)))
        db.execute(
            """INSERT INTO processed (topic, partition, "offset", outcome, event_id) VALUES (?,?,?,?,?)
               ON CONFLICT DO NOTHING""",
            (s.source.topic, s.source.partition, s.source.offset, "sighting", ev.event_id),
        )
        _record_run(db, s.source, "sighting", ev.event_id)
        # One outcome per event: the event's earlier failures (a fetch that timed out before a
        # redelivered copy got through) go, in this transaction; where each sat now reads as
        # what the event became. A conflict (another post under this id) stays.
        for row in _stored_dead_letters(db, [ev.event_id]):
            if not superseded_by_sighting(row.stage, row.reason):
                continue
            db.execute("DELETE FROM dead_letters WHERE dl_key=?", (row.key,))
            if row.source is not None:
                _reaccount(db, row.source, "sighting")

    def add_dead_letter(self, dl: DeadLetter) -> bool:
        return self.add_dead_letters([dl]) > 0

    def add_dead_letters(self, dls: Iterable[DeadLetter]) -> int:
        """A batch in one transaction, one row per failed event
        (``plan_dead_letters``): a failure of an event stored as a sighting
        is not kept, an event's latest failure replaces its earlier ones.
        Returns how many rows were written (new, or replacing an event's
        earlier failure): 0 for the same dead letters again."""
        dls = list(dls)
        with self._tx() as db:
            ids = sorted({dl.event_id for dl in dls if dl.event_id is not None})
            sighted = {eid for eid in ids
                       if db.execute("SELECT 1 FROM sightings WHERE event_id=?", (eid,)).fetchone() is not None}
            # a message without an event id is one row under its key: the same one again is that row
            # (or the row an older store keyed it by, without the digest)
            nameless = {k for dl in dls if dl.event_id is None
                        for k in (dead_letter_identity(dl), legacy_dead_letter_identity(dl)) if k is not None}
            stored = [*_stored_dead_letters(db, ids), *_stored_dead_letters(db, (), keys=nameless)]
            plan = plan_dead_letters(dls, stored, sighted)
            for row in plan.delete:
                db.execute("DELETE FROM dead_letters WHERE dl_key=?", (row.key,))
            for dl in plan.write:
                src = dl.source
                db.execute(
                    """INSERT INTO dead_letters (dl_key, event_id, stage, reason, detail, source, payload_excerpt, at)
                       VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING""",
                    (dead_letter_identity(dl), dl.event_id, dl.stage, dl.reason, dl.detail,
                     src.model_dump_json() if src else None, dl.payload_excerpt, dl.at.isoformat()),
                )
            for dl in (*plan.write, *plan.older):
                self._account(db, dl.source, "dead_letter", dl.event_id)
            for dl in plan.succeeded:  # its post was stored when it came: as the analyze stage counts a repeat
                self._account(db, dl.source, "duplicate", dl.event_id)
            return len(plan.write)

    @staticmethod
    def _account(db: sqlite3.Connection, src: SourceRef | None, outcome: str, event_id: str | None) -> None:
        if src is not None:
            db.execute(
                """INSERT INTO processed (topic, partition, "offset", outcome, event_id) VALUES (?,?,?,?,?)
                   ON CONFLICT DO NOTHING""",
                (src.topic, src.partition, src.offset, outcome, event_id),
            )
            _record_run(db, src, outcome, event_id)

    # -- per-run accounting and duplicate checks (issue 7) --------------------
    def mark_processed(self, source: SourceRef, outcome: str, event_id: str | None) -> None:
        """An event that ends as neither a new sighting nor a dead letter (an
        exact duplicate of a stored sighting) is still accounted for."""
        with self._tx() as db:
            db.execute(
                """INSERT INTO processed (topic, partition, "offset", outcome, event_id) VALUES (?,?,?,?,?)
                   ON CONFLICT DO NOTHING""",
                (source.topic, source.partition, source.offset, outcome, event_id),
            )
            _record_run(db, source, outcome, event_id)

    def run_processed_since(self, run: str, topic: str, after_rowid: int) -> tuple[set[tuple[int, int]], int]:
        """Like ``processed_since`` but only events produced by ``run``: a fresh
        broker reuses (partition, offset) pairs an earlier run left in the store."""
        rows = self._db.execute(
            'SELECT rowid, partition, "offset" FROM processed_runs WHERE run=? AND topic=? AND rowid>? ORDER BY rowid',
            (run, topic, after_rowid),
        ).fetchall()
        return {(p, o) for _, p, o in rows}, (rows[-1][0] if rows else after_rowid)

    def run_outcomes(self, run: str, topic: str) -> dict[tuple[int, int], tuple[str, str | None]]:
        rows = self._db.execute('SELECT partition, "offset", outcome, event_id FROM processed_runs WHERE run=? AND topic=?',
                                (run, topic))
        return {(p, o): (outcome, event_id) for p, o, outcome, event_id in rows}

    def sighting_identity(self, event_id: str) -> PostIdentity | None:
        row = self._db.execute("SELECT sha256, platform, account_id FROM sightings WHERE event_id=?",
                               (event_id,)).fetchone()
        return PostIdentity(*row) if row else None

    def add_alert(self, alert: Alert) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO alerts (alert_id, cluster_id, level, doc, created_at) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (alert.alert_id, alert.cluster_id, alert.level, alert.model_dump_json(), alert.created_at.isoformat()),
            )
            return cur.rowcount > 0

    # -- reads --------------------------------------------------------------
    def _roots(self) -> dict[str, str]:
        """cluster id -> surviving cluster id, following merges (sightings keep
        the id they were recorded under; merges are resolved when reading)."""
        into = dict(self._rdb.execute("SELECT cluster_id, merged_into FROM clusters").fetchall())
        return {cid: surviving_cluster(cid, into) for cid in into}

    def _roots_around(self, ids: set[str]) -> dict[str, str]:
        """``_roots`` for ``ids``, the clusters they were merged into and the
        clusters merged into them (each transitively): what reading ``ids``
        needs, found through the primary key and the ``merged_into`` index.
        Reading every cluster's merge for a few clusters (the desk's by-id
        reads, its incremental refresh) took seconds at millions of clusters."""
        into: dict[str, str | None] = {}
        up, down, read_down = set(ids), set(ids), set()
        for _ in range(MAX_MERGE_HOPS + 1):  # ``surviving_cluster`` follows no longer chains
            if not (up or down):
                break
            into.update(self._select("SELECT cluster_id, merged_into FROM clusters WHERE {where}", up))
            children = dict(self._select_merged_into(down))
            into.update(children)
            read_down |= down
            up = {into[cid] for cid in up if into.get(cid)} - into.keys()
            down = children.keys() - read_down
        return {cid: surviving_cluster(cid, into) for cid in into}

    def _select_merged_into(self, ids: set[str]) -> Iterator[tuple]:
        """(cluster_id, merged_into) of the clusters merged into one of ``ids``."""
        chunk = sorted(ids)
        for i in range(0, len(chunk), 500):
            part = chunk[i:i + 500]
            yield from self._rdb.execute("SELECT cluster_id, merged_into FROM clusters WHERE merged_into IN "
                                         f"({','.join('?' * len(part))})", part)

    def clusters(self, *, include_merged: bool = False, limit: int | None = None) -> list[ClusterRecord]:
        """Clusters, highest fake score first; counts, accounts, platforms and
        first/last seen are exact, from the sightings (merges resolved)."""
        if not limit:
            return self._cluster_records(self._cluster_rows(include_merged=include_merged))
        # The live table asks for the top few every refresh: build only those,
        # not every cluster of the store to keep the first `limit`.
        with self._snapshot() as db:  # the top as of the records built
            ids = {cid for cid, in db.execute(
                "SELECT cluster_id FROM clusters" + ("" if include_merged else " WHERE merged_into IS NULL")
                + " ORDER BY fake_score DESC, cluster_id LIMIT ?", (int(limit),))}
            return self.clusters_by_id(ids) if ids else []

    def clusters_by_id(self, ids: set[str]) -> list[ClusterRecord]:
        """These clusters' records (merged ones too), built exactly as ``clusters`` builds them."""
        if not ids:
            return []
        return self._cluster_records(self._cluster_rows(include_merged=True, only=set(ids)))

    def _cluster_records(self, rows: list[dict[str, Any]]) -> list[ClusterRecord]:
        return [self._valid("cluster", row["id"], lambda: ClusterRecord.model_validate(row)) for row in rows]

    def _valid(self, kind: str, key: Any, build: Any) -> Any:
        """``build()``, a typed record from a stored row; a row that does not
        validate (edited by hand, or damaged) is one clear error naming it,
        not a pydantic or JSON traceback; so is a row a newer deepwatch
        stored at a ``schema_version`` this one does not read."""
        try:
            return build()
        except NewerSchema as e:
            raise StoreError(f"findings store {str(self.path)!r}: {kind} {str(key)!r} was stored by a newer deepwatch "
                             f"(schema_version {e.version}; this one reads up to {e.known}): upgrade deepwatch, or "
                             "read the store with the version that wrote it") from None
        except (ValueError, TypeError) as e:
            errors = getattr(e, "errors", None)
            if callable(errors):
                first = errors()[0]
                why = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
            else:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreError(f"findings store {str(self.path)!r}: {kind} {str(key)!r} does not read back as a "
                             f"record ({why}); the row was changed outside deepwatch, restore the file from a backup "
                             "or replay the feed into a new --data-dir") from None

    def changes_since(self, cursor: tuple[int, int] | None) -> tuple[set[str] | None, tuple[int, int]]:
        """The clusters whose records may differ from when ``cursor`` (a value
        this method returned) was taken, and the cursor to ask with next time;
        None instead of a set when there is no cursor yet (read everything).
        A record changes when its row is written (``seq``), or when a sighting
        of it or of a cluster merged into it arrives (sightings' rowids). Rows
        committed while this runs are left to the next call, never lost:
        writers commit one at a time, each with a higher ``seq``."""
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM clusters").fetchone()[0]
        rowid = self._db.execute("SELECT COALESCE(MAX(rowid), 0) FROM sightings").fetchone()[0]
        if cursor is None:
            return None, (seq, rowid)
        seq0, rowid0 = cursor
        ids = {cid for cid, in self._db.execute(
            "SELECT cluster_id FROM clusters WHERE seq > ? AND seq <= ?", (seq0, seq))}
        ids |= {cid for cid, in self._db.execute(
            "SELECT DISTINCT cluster_id FROM sightings WHERE rowid > ? AND rowid <= ?", (rowid0, rowid))}
        if ids:
            roots = self._roots()
            ids |= {roots.get(cid, cid) for cid in ids}
        return ids, (seq, rowid)

    def newest_last_seen(self) -> datetime | None:
        row = self._db.execute("SELECT last_seen FROM clusters ORDER BY julianday(last_seen) DESC LIMIT 1").fetchone()
        return _aware(row[0]) if row else None

    def recent_clusters(self, since: datetime | None = None, *, limit: int | None = None) -> list[ClusterRecord]:
        """See ``FindingsStore.recent_clusters``: ids from the ``clusters_last_seen``
        index, then only those clusters built."""
        sql, args = "SELECT cluster_id FROM clusters WHERE merged_into IS NULL", []
        if since is not None:
            sql += " AND julianday(last_seen) >= julianday(?)"
            args.append(since.isoformat())
        sql += " ORDER BY julianday(last_seen) DESC, cluster_id"
        if limit:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._snapshot() as db:  # the order as of the records built
            order = [cid for cid, in db.execute(sql, args)]
            rows = self._cluster_rows(only=set(order))
        at = {cid: i for i, cid in enumerate(order)}
        return sorted(self._cluster_records(rows), key=lambda c: at[c.id])

    def verdict_cluster_ids(self, verdict: str) -> dict[str, list[str]]:
        return {cid: json.loads(merged) for cid, merged in self._db.execute(
            "SELECT cluster_id, merged_from FROM clusters WHERE merged_into IS NULL AND verdict = ?", (verdict,))}

    def has_member(self, sha256: str) -> bool:
        return self._db.execute("SELECT 1 FROM members WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def cluster(self, cluster_id: str) -> ClusterRecord | None:
        # Only this cluster (and what merged into it): the desk asks per page view.
        return next(iter(self.clusters_by_id({cluster_id})), None)

    def search(self, query: ClusterQuery, *, timeout_s: float | None = None,
               after: SearchCursor | None = None) -> SearchPage:
        """``ClusterQuery`` over FTS5 and the sightings table (semantics in
        ``ClusterQuery``'s docstring; the Elasticsearch store answers the same).
        Only candidate clusters are built: sorted searches pre-select by the
        stream's own values in SQL (a margin wide), then order exactly.
        ``after``: only the rows after it, the pre-selection starting there
        (``SearchCursor.bands``). ``timeout_s`` bounds the scans
        (``_search_db``); building the few candidates found is bounded by
        their number."""
        deadline = None if timeout_s is None else Deadline(timeout_s)
        relevance: dict[str, float] | None = None
        where, args = ["merged_into IS NULL"], []
        if query.verdict:
            where.append("verdict = ?")
            args.append(query.verdict)
        if query.min_score is not None:
            where.append("fake_score >= ?")
            args.append(score_floor(query.min_score))
        if query.cluster_ids is not None:
            where.append("cluster_id IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(sorted(query.cluster_ids)))
        sort = query.effective_sort
        if after is not None:  # a sorted search's (``SearchCursor``)
            cond, cond_args = _sql_after(after)
            where.append(cond)
            args += cond_args
        # --account compares with dw_lower: a connection with the functions
        with self._search_db(deadline, functions=bool(query.account)) as db:
            if query.sighting_filtered:
                relevance = self._matching_roots(query, db)
                if not relevance:
                    return SearchPage([], [], query)
            ids = [cid for cid, in db.execute(
                f"SELECT cluster_id FROM clusters WHERE {' AND '.join(where)} ORDER BY {_SQL_SORT[sort]}", args)]
        if relevance is not None:
            ids = [cid for cid in ids if cid in relevance]
        if sort != "relevance":
            ids = ids[: query.max_results * 4 + 100]
        by_velocity = sort_key("velocity")
        key = sort_key(sort) if sort != "relevance" else (
            lambda c: ((relevance or {}).get(c.id, 0.0), *by_velocity(c)))
        ranked = sorted(((key(c), c) for c in self._cluster_records(self._cluster_rows(only=set(ids)))),
                        key=lambda kc: kc[0])
        if after is not None:
            ranked = [(k, c) for k, c in ranked if after.passed(k[:-1], c.id)]
        ranked = ranked[: query.max_results]
        return SearchPage([c for _k, c in ranked], [k[:-1] for k, _c in ranked], query)

    def cluster_sightings(self, cluster_id: str, *, limit: int = 200) -> list[SightingRecord]:
        """The cluster's posts, newest first, those of clusters merged into it included."""
        with self._snapshot():  # the sightings of the clusters merged in as of the merges read
            roots = self._roots()
            ids = {cid for cid, root in roots.items() if root == cluster_id} | {cluster_id}
            rows = list(self._select(
                """SELECT event_id, cluster_id, sha256, platform, account_id, account_handle, post_url, posted_at,
                          text, hashtags, lang, engagement FROM sightings WHERE {where}""", ids))
        rows.sort(key=lambda r: (-_epoch_s(r[7]), r[0]))
        return [self._sighting(row) for row in rows[:limit]]

    def sightings(self, *, cluster_ids: list[str] | None = None, account_id: str | None = None,
                  newest_first: bool = False, limit: int | None = None) -> list[SightingRecord]:
        """Sightings as recorded (see ``FindingsStore.sightings``)."""
        where, args = [], []
        if cluster_ids is not None:
            if not cluster_ids:
                return []
            where.append("cluster_id IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(list(cluster_ids)))
        if account_id is not None:
            where.append("account_id = ?")
            args.append(account_id)
        order = "DESC" if newest_first else "ASC"
        sql = ("SELECT event_id, cluster_id, sha256, platform, account_id, account_handle, post_url, posted_at, text, "
               "hashtags, lang, engagement FROM sightings" + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY julianday(posted_at) {order}, event_id {order}" + (" LIMIT ?" if limit else ""))
        if limit:
            args.append(int(limit))
        return [self._sighting(row) for row in self._db.execute(sql, args)]

    def sighting_histogram(self, cluster_ids: list[str], start: datetime, end: datetime,
                           buckets: int) -> dict[str, list[int]]:
        """See ``FindingsStore.sighting_histogram``: one GROUP BY over the cluster index."""
        out: dict[str, list[int]] = {}
        if not cluster_ids or buckets < 1:
            return out
        width = max((end - start).total_seconds(), 1.0)
        day0 = start.timestamp() / 86400.0 + 2440587.5  # the julian day of ``start``
        rows = self._db.execute(
            "SELECT platform, MAX(0, MIN(?, CAST((julianday(posted_at) - ?) * 86400.0 / ? * ? AS INTEGER))) AS b, "
            "COUNT(*) FROM sightings WHERE cluster_id IN (SELECT value FROM json_each(?)) GROUP BY platform, b",
            (buckets - 1, day0, width, buckets - 1, json.dumps(list(cluster_ids))))
        for platform, b, n in rows:
            out.setdefault(platform, [0] * buckets)[b] += n
        return out

    def match_sightings(self, text: str, *, limit: int = MAX_RESULTS,
                        timeout_s: float | None = None) -> list[str]:
        """See ``FindingsStore.match_sightings``: a scan of the sightings in
        SQL. LIKE folds ASCII case only: a needle with other letters is
        compared in Python's lowercase (a function per row, slower).
        ``timeout_s`` bounds the scan (``_search_db``)."""
        exact = text.strip()
        needle = unicodedata.normalize("NFC", exact).lower()  # as ``dw_lower`` reads the columns
        if not needle:
            return []
        if needle.isascii():
            pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            cond = " OR ".join(f"{c} LIKE ?1 ESCAPE '\\'" for c in ("account_id", "account_handle", "post_url"))
        else:
            pattern = needle
            cond = " OR ".join(f"instr(dw_lower({c}), ?1) > 0" for c in ("account_id", "account_handle", "post_url"))
        with self._search_db(None if timeout_s is None else Deadline(timeout_s), functions=True) as db:
            return [cid for cid, in db.execute(
                f"SELECT DISTINCT cluster_id FROM sightings WHERE event_id = ?2 OR {cond} ORDER BY cluster_id LIMIT ?3",
                (pattern, exact, int(limit))).fetchall()]

    def data_version(self) -> int:
        """Changes whenever another connection commits to the file: lets a
        reader cache derived views until the findings change."""
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def _matching_roots(self, q: ClusterQuery, db: sqlite3.Connection) -> dict[str, float]:
        """Surviving cluster id -> best relevance (bm25: lower is better) over
        the sightings that satisfy every sighting-level condition at once
        (read on ``db``: ``_search_db``'s)."""
        where, args = [], []
        sql = "SELECT s.cluster_id, {rank} FROM sightings s"
        rank = "0.0"
        if q.text:
            terms = text_terms(q.text)
            if not terms:
                return {}
            sql += " JOIN sightings_fts f ON f.rowid = s.rowid"
            where.append("sightings_fts MATCH ?")
            args.append(" AND ".join('"' + t + '"' for t in terms))
            rank = "bm25(sightings_fts)"
        if q.since:
            where.append("julianday(s.posted_at) >= julianday(?)")
            args.append(q.since.isoformat())
        if q.until:
            where.append("julianday(s.posted_at) <= julianday(?)")
            args.append(q.until.isoformat())
        # platforms are stored in lower case (``ImageEvent``; older rows folded at open:
        # ``_fold_platforms``): an equality, 2.5x faster than folding each row (0.22 s vs 0.55 s at 1M)
        if q.platform:
            where.append("s.platform = ?")
            args.append(q.platform)  # lower-cased by ``ClusterQuery``
        # dw_lower: Python's case folding, any script (SQLite's lower() folds ASCII only), as
        # Elasticsearch's lowercase normalizer and case-insensitive term queries fold
        if q.account:
            where.append("(s.account_id = ? OR ltrim(dw_lower(coalesce(s.account_handle, '')), '@') = dw_lower(?))")
            args += [q.account, q.account]
        if q.hashtag:
            where.append("(' ' || s.hashtags || ' ') LIKE ? ESCAPE '\\'")
            args.append("% " + q.hashtag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + " %")
        sql = sql.format(rank=rank) + (" WHERE " + " AND ".join(where) if where else "")
        roots = self._roots()
        best: dict[str, float] = {}
        for cid, r in db.execute(sql, args):
            root = roots.get(cid, cid)
            best[root] = min(best.get(root, r), r)
        return best

    def _select(self, sql: str, ids: set[str] | None, args: tuple = ()) -> Iterator[tuple]:
        """``sql`` with ``{where}`` as all rows, or only those whose cluster_id is in ``ids``."""
        if ids is None:
            yield from self._rdb.execute(sql.format(where="1=1"), args)
            return
        chunk = sorted(ids)
        for i in range(0, len(chunk), 500):
            part = chunk[i:i + 500]
            yield from self._rdb.execute(sql.format(where=f"cluster_id IN ({','.join('?' * len(part))})"), (*args, *part))

    def _cluster_rows(self, *, include_merged: bool = False, only: set[str] | None = None) -> list[dict[str, Any]]:
        """Cluster rows as JSON-ready dicts; ``only`` = just these surviving
        clusters (with everything merged into them). Merges, sighting counts,
        members and cluster rows are read in one snapshot (``_snapshot``)."""
        with self._snapshot():
            return self._cluster_rows_read(include_merged, only)

    def _cluster_rows_read(self, include_merged: bool, only: set[str] | None) -> list[dict[str, Any]]:
        roots = self._roots() if only is None else self._roots_around(only)
        folded = None if only is None else only | {cid for cid, root in roots.items() if root in only}
        agg = self._sighting_stats(roots, folded)
        members: dict[str, list[dict[str, Any]]] = {}
        member_rows = sorted(self._select(
            "SELECT rowid, cluster_id, sha256, phash, pdq, pdq_quality, event_id, width, height, format, distance "
            "FROM members WHERE {where}", folded))
        for row in member_rows:
            _rowid, cid, sha, ph, pdq, q, eid, w, h, fmt, dist = row
            members.setdefault(roots.get(cid, cid), []).append(
                {"sha256": sha, "phash": ph, "pdq": pdq, "pdq_quality": q, "event_id": eid,
                 "width": w, "height": h, "format": fmt, "distance": dist}
            )
        out = []
        rows = sorted(self._select(
            """SELECT cluster_id, revision, fake_score, verdict, evidence, velocity, engagement, first_seen, last_seen,
                      merged_into, merged_from, models_pending, suppressed, updated_at, alert_level, stream_sightings
               FROM clusters WHERE {where}""", only), key=lambda r: (-r[2], r[0]))
        for row in rows:
            (cid, rev, score, verdict, evidence, vel, eng, first, last, merged_into, merged_from, pending, suppressed,
             updated, alert_level, stream_sightings) = row
            if merged_into and not include_merged:
                continue
            a = agg.get(cid, {"n": 0, "accounts": 0, "platforms": set(), "first": first, "last": last})
            out.append(self._valid("cluster", cid, lambda: {
                "id": cid,
                "fake_score": shown_score(score),
                "verdict": verdict,
                "evidence": json.loads(evidence),
                "sightings": a["n"],
                "accounts": a["accounts"],
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
            }))
        return out

    def _sighting_stats(self, roots: dict[str, str], ids: set[str] | None) -> dict[str, dict[str, Any]]:
        """Surviving cluster id -> its sightings counted: ``n``, distinct
        ``accounts``, ``platforms`` and the ``first``/``last`` posted_at (the
        earliest and latest instants, as the post gave them: 12:00+05:00 is
        before 10:00Z), over the sightings recorded under ``ids`` (None:
        all) and merged to it. Counted by SQLite, a few rows per recorded
        cluster id: read into Python row by row, a viral cluster's 50,000
        sightings took ~0.25 s of every read of it (each desk refresh after
        one of its sightings). Distinct accounts over several recorded ids
        (merges) are counted again across them, in one more query. Read in
        the caller's ``_snapshot``: the queries count the same sightings."""
        agg: dict[str, dict[str, Any]] = {}
        at: dict[str, list[float]] = {}  # root -> [julian day of first, of last]: the instants, not the texts
        recorded: dict[str, list[str]] = {}  # root -> the ids its sightings were recorded under
        # SQLite gives a bare column the row of the one min() (or max()) of its query: the time's text
        for cid, n, accounts, day, posted_at, platforms in self._select(
                "SELECT cluster_id, COUNT(*), COUNT(DISTINCT account_id), MIN(julianday(posted_at)), posted_at, "
                "json_group_array(DISTINCT platform) FROM sightings WHERE {where} GROUP BY cluster_id", ids):
            root = roots.get(cid, cid)
            recorded.setdefault(root, []).append(cid)
            a = agg.setdefault(root, {"n": 0, "accounts": 0, "platforms": set(), "first": posted_at, "last": posted_at})
            span = at.setdefault(root, [day, day])
            a["n"] += n
            a["accounts"] += accounts
            a["platforms"].update(json.loads(platforms))
            if day < span[0]:
                a["first"], span[0] = posted_at, day
        for cid, day, posted_at in self._select(
                "SELECT cluster_id, MAX(julianday(posted_at)), posted_at FROM sightings WHERE {where} "
                "GROUP BY cluster_id", ids):
            root = roots.get(cid, cid)
            a, span = agg[root], at[root]
            if day > span[1]:
                a["last"], span[1] = posted_at, day
        # an account may have posted under two of a root's ids: counted once, all such roots in one query
        merged = {cid: root for root, cids in recorded.items() if len(cids) > 1 for cid in cids}
        if merged:
            for root, accounts in self._rdb.execute(
                    "SELECT m.value, COUNT(DISTINCT s.account_id) FROM json_each(?) AS m "
                    "JOIN sightings AS s ON s.cluster_id = m.key GROUP BY m.value", (json.dumps(merged),)):
                agg[root]["accounts"] = accounts
        return agg

    def alerts(self, *, limit: int | None = None) -> Page[AlertRecord]:
        rows, total = self._newest("alerts", "alert_id, doc", ("created_at", "alert_id"), limit)
        return Page([self._valid("alert", alert_id, lambda: _alert_record(doc))
                     for alert_id, doc in rows], total)

    def dead_letters(self, *, limit: int | None = None) -> Page[DeadLetterRecord]:
        rows, total = self._newest("dead_letters", f"dl_key, {', '.join(_DL_COLS)}", ("at", "dl_key"), limit)
        return Page([self._dead_letter(key, row) for key, *row in rows], total)

    def _dead_letter(self, key: str, row: Iterable[Any]) -> DeadLetterRecord:
        d = dict(zip(_DL_COLS, row))
        return self._valid("dead letter", key, lambda: DeadLetterRecord.model_validate(
            dict(d, source=json.loads(d["source"]) if d["source"] else None)))

    # -- the replay summary's reads (``ReplayAccounting``) ---------------------
    def count_alerts(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM alerts").fetchone()[0]

    def count_clusters(self) -> int:
        """As ``clusters()`` keeps them: no merge, or an empty one. Each term
        is answered by a partial index (``clusters_live_verdict``,
        ``clusters_merged_into``), not by reading the cluster rows."""
        with self._snapshot() as db:
            return sum(db.execute(f"SELECT COUNT(*) FROM clusters WHERE {where}").fetchone()[0]
                       for where in ("merged_into IS NULL", "merged_into = ''"))

    def count_models_pending(self) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM clusters WHERE models_pending=1 AND merged_into IS NULL"
        ).fetchone()[0]

    def dead_letter_counts(self) -> dict[str, int]:
        # char(1) sorts before any character of a stored time: the text order of (at, dl_key)
        rows = self._db.execute("SELECT stage, reason, COUNT(*) FROM dead_letters GROUP BY stage, reason "
                                "ORDER BY MIN(at || char(1) || dl_key)")
        out: dict[str, int] = {}
        for stage, reason, n in rows:
            out[f"{stage}:{reason}"] = out.get(f"{stage}:{reason}", 0) + n
        return out

    def dead_letters_of(self, event_ids: Collection[str], topic: str,
                        offsets: Collection[tuple[int, int]]) -> list[DeadLetterRecord]:
        """By event id as ``_stored_dead_letters`` finds them (a range of the
        primary key: an event's rows are keyed "<event id>/..."), by source
        through the ``dead_letters_source`` index."""
        cols = f"SELECT dl_key, {', '.join(_DL_COLS)} FROM dead_letters WHERE "
        found: dict[str, tuple] = {}
        with self._snapshot() as db:
            for eid in sorted(set(event_ids)):
                for key, *row in db.execute(cols + "dl_key >= ? AND dl_key < ? AND event_id = ?",
                                            (eid + "/", eid + "0", eid)):
                    found[key] = tuple(row)
            wanted = sorted(f"{p}/{o}/{topic}" for p, o in set(offsets))
            for i in range(0, len(wanted), _CHUNK):
                part = wanted[i:i + _CHUNK]
                for key, *row in db.execute(cols + f"source IS NOT NULL AND {_DL_SOURCE} IN "
                                            f"({','.join('?' * len(part))})", part):
                    found[key] = tuple(row)
        at = _DL_COLS.index("at")
        return [self._dead_letter(key, row) for key, row in sorted(found.items(), key=lambda kv: (kv[1][at], kv[0]))]

    def alerts_created_since(self, since: datetime | None) -> list[AlertRecord]:
        """Selected through ``alerts_created_instant`` a second early (an
        instant there is to the millisecond), then by each record's own time."""
        if since is None:
            return list(self.alerts())
        bound = (since - timedelta(seconds=1)).isoformat()
        rows = sorted(self._db.execute("SELECT created_at, alert_id, doc FROM alerts "
                                       "WHERE julianday(created_at) >= julianday(?)", (bound,)).fetchall())
        records = [self._valid("alert", alert_id, lambda: _alert_record(doc))
                   for _created, alert_id, doc in rows]
        return [a for a in records if a.created_at >= since]

    def processed_among(self, topic: str, offsets: Collection[tuple[int, int]]) -> set[tuple[int, int]]:
        by_partition: dict[int, list[int]] = {}
        for p, o in sorted(set(offsets)):
            by_partition.setdefault(p, []).append(o)
        out: set[tuple[int, int]] = set()
        with self._snapshot() as db:
            for p, offs in by_partition.items():
                for i in range(0, len(offs), _CHUNK):
                    part = offs[i:i + _CHUNK]
                    out.update((p, o) for o, in db.execute(
                        f'SELECT "offset" FROM processed WHERE topic=? AND partition=? AND "offset" IN '
                        f"({','.join('?' * len(part))})", (topic, p, *part)))
        return out

    def _newest(self, table: str, cols: str, order: tuple[str, ...], limit: int | None) -> tuple[Iterable[tuple], int | None]:
        """Rows of ``table`` in ``order`` (ascending) and how many there are in
        all (None: as many as came); with ``limit`` the last ``limit`` of them,
        read newest first with SQL LIMIT (SQLite keeps only that many in its
        sorter) and counted only when the limit cut them."""
        limit = read_limit(limit)
        if limit is None:
            return self._db.execute(f"SELECT {cols} FROM {table} ORDER BY {', '.join(order)}"), None
        with self._snapshot() as db:  # the count of the rows read, not of rows added since
            rows = db.execute(f"SELECT {cols} FROM {table} ORDER BY {', '.join(f'{c} DESC' for c in order)} LIMIT ?",
                              (limit,)).fetchall()
            rows.reverse()
            total = len(rows) if len(rows) < limit else db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return rows, total

    def _sighting(self, row: tuple) -> SightingRecord:
        return self._valid("sighting", row[0], lambda: _sighting_record(row))

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

    def count_sightings(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM sightings").fetchone()[0]

    def pending_work(self) -> dict[str, int]:
        """Work the stream still owes the store: model results not yet in, and
        alerts the cluster engine raised that the alert sink has not stored."""
        pending_models = self.count_models_pending()
        # per cluster that raised any (merged-away ones too), the levels not
        # stored under it or a cluster merged into it (``unstored_alerts``)
        raised = [(cid, level, json.loads(merged_from)) for cid, level, merged_from in self._db.execute(
            "SELECT cluster_id, alert_level, merged_from FROM clusters WHERE alert_level > 0")]
        unstored = unstored_alerts(raised, self._db.execute(
            "SELECT alert_id, cluster_id, level FROM alerts WHERE alert_id = cluster_id || ':' || level")) if raised else 0
        # webhook deliveries queued and not tried yet count as alert work still
        # going on (a replay waits for them); one queued longer ago than any
        # attempt takes was left by a stopped worker: redelivery's, not this run's
        queued = self._db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE state=? AND at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)",
            (DeliveryState.QUEUED.value, f"-{QUEUED_RECENT_S} seconds")).fetchone()[0]
        return {"models": pending_models, "alerts": unstored + queued, "deliveries": queued}

    def sighting_times(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT event_id, posted_at FROM sightings"))


def _alert_record(doc: str) -> AlertRecord:
    """A stored alert's record, read as its topic record is (``Alert.loads``):
    fields a newer deepwatch added are dropped (a rollback), at any depth, not
    kept as this version's extras."""
    return AlertRecord.model_validate_json(Alert.loads(doc).dumps())


_DL_COLS = ("event_id", "stage", "reason", "detail", "source", "payload_excerpt", "at")
_SIGHTING_COLS = ("event_id", "cluster_id", "sha256", "platform", "account_id", "account_handle", "post_url",
                  "posted_at", "text", "hashtags", "lang", "engagement")


def _sighting_record(row: tuple) -> SightingRecord:
    d = dict(zip(_SIGHTING_COLS, row))
    d["hashtags"] = d["hashtags"].split() if d["hashtags"] else []
    d["engagement"] = json.loads(d["engagement"])
    d["text"] = d["text"] or None
    return SightingRecord.model_validate(d)


def _aware(ts: str) -> datetime:
    d = datetime.fromisoformat(ts)
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def _epoch_s(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# Each field of an order (``streams.cluster_search.SORT_ORDER``) as the clusters table
# holds it: the stream's own values, which searches pre-select by (a margin
# wide) before ordering the records built exactly. ``sightings`` is the
# stream's running count there (the exact one, merges included, is counted
# from the sightings table when a record is built), ``last_seen`` the
# snapshot's, as an instant (text with different offsets does not sort by time).
_SQL_FIELDS = {
    "sightings_5m": "json_extract(velocity, '$.sightings_5m')",
    "sightings_1h": "json_extract(velocity, '$.sightings_1h')",
    "fake_score": "fake_score",
    "sightings": "stream_sightings",
    "last_seen": "julianday(last_seen)",
}


def _sql_order(sort: str) -> str:
    """``sort``'s order as an ORDER BY list: each field the largest first
    (SQLite puts a NULL last descending, as Elasticsearch puts a missing value)."""
    return ", ".join(f"{_SQL_FIELDS[name]} DESC" for name in sort_order(sort)) + ", cluster_id"


# pre-selection order for searches (exact order is applied after); relevance keeps every match
_SQL_SORT = {**{sort: _sql_order(sort) for sort in SORT_KEYS}, "relevance": "cluster_id"}


def _sql_after(after: SearchCursor) -> tuple[str, list[Any]]:
    """The clusters a sorted search's next page is chosen from, as a WHERE
    condition on the stored values (``_SQL_FIELDS``): those whose value of
    the first field is below the cursor's band, or within it and after it by
    the next field, and so on to the cluster id. A missing value (NULL) is
    last, as ``ORDER BY`` puts it."""
    cond, args = "cluster_id > ?", [after.cluster_id]
    for name, lo, hi in reversed(after.bands()):
        col = _SQL_FIELDS[name]
        if name == "last_seen":  # julian days, as _SQL_FIELDS reads the time
            if lo is None or hi is None:
                cond = f"({col} IS NULL AND {cond})"
                continue
            lo, hi = lo / 86400.0 + _JULIAN_EPOCH, hi / 86400.0 + _JULIAN_EPOCH
            cond, args = f"({col} IS NULL OR {col} < ? OR ({col} <= ? AND {cond}))", [lo, hi, *args]
        else:
            cond, args = f"(COALESCE({col}, 0) < ? OR (COALESCE({col}, 0) <= ? AND {cond}))", [lo, hi, *args]
    return cond, args


_JULIAN_EPOCH = 2440587.5  # the julian day of 1970-01-01T00:00Z
# A dead letter's source as "partition/offset/topic" (the numbers first: a topic is the part
# that could hold a "/"), the key of the ``dead_letters_source`` index; a query must repeat
# this text to be answered by it. A source that is not JSON (a row changed by hand) is NULL
# there, not an error that would stop every open of the store while the index is built.
_DL_SOURCE = ("(CASE WHEN json_valid(source) THEN json_extract(source, '$.partition') || '/' || "
              "json_extract(source, '$.offset') || '/' || json_extract(source, '$.topic') END)")
_CHUNK = 500  # values per IN (...): well under SQLite's 32,766 host parameters


def _record_run(db: sqlite3.Connection, src: SourceRef, outcome: str, event_id: str | None) -> None:
    if src.run:
        db.execute(
            """INSERT INTO processed_runs (run, topic, partition, "offset", outcome, event_id) VALUES (?,?,?,?,?,?)
               ON CONFLICT DO NOTHING""",
            (src.run, src.topic, src.partition, src.offset, outcome, event_id),
        )


def _stored_dead_letters(db: sqlite3.Connection, event_ids: Iterable[str],
                         keys: Iterable[str] = ()) -> Iterator[StoredDeadLetter]:
    """The dead letters stored of ``event_ids`` (the rows whose key starts
    with "<event id>/", ``dead_letter_identity``: a range of the primary
    key, so no index of its own) and those stored under ``keys``."""
    cols = "SELECT dl_key, event_id, stage, reason, at, source FROM dead_letters WHERE "
    queries = [(cols + "dl_key >= ? AND dl_key < ? AND event_id=?", (eid + "/", eid + "0", eid)) for eid in event_ids]
    queries += [(cols + "dl_key=?", (key,)) for key in keys]
    for sql, args in queries:
        for key, event_id, stage, reason, at, source in db.execute(sql, args).fetchall():
            yield StoredDeadLetter(key, event_id, stage, reason, stored_at(at),
                                   SourceRef.model_validate_json(source) if source else None)


def _reaccount(db: sqlite3.Connection, src: SourceRef, outcome: str) -> None:
    """Where a superseded dead letter sat now reads as what its event became."""
    db.execute("""UPDATE processed SET outcome=? WHERE topic=? AND partition=? AND "offset"=? AND outcome='dead_letter'""",
               (outcome, src.topic, src.partition, src.offset))
    if src.run:
        db.execute("""UPDATE processed_runs SET outcome=? WHERE run=? AND topic=? AND partition=? AND "offset"=?
                      AND outcome='dead_letter'""", (outcome, src.run, src.topic, src.partition, src.offset))


class _Tx:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            # "database is locked" after busy_timeout: without this release
            # every later transaction on this store would wait forever.
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, *_: object) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def open_store(data_dir: Path) -> SqliteFindingsStore:
    """The embedded store in ``data_dir``; ``streams.findings.open_findings``
    picks between it and Elasticsearch."""
    return SqliteFindingsStore(Path(data_dir) / "findings.sqlite")
