"""The cluster engine's own durable state, apart from the findings store.

The cluster stage's primary state is its changelog-backed table on the
broker. This store is the engine's second copy, for what the broker cannot
give it:

* **Cold tier.** Clusters evicted from the hot index (idle longer than the hot
  window) leave the table; their exact state is archived here first, and a
  picture that resurfaces revives its cluster from here.
* **Seeding a fresh broker.** The embedded broker may start empty over an old
  data directory (``deepwatch replay`` twice). Every state the stage writes is
  also written here (write-through, one transaction per batch of ops, before
  the table: ``streams.cluster_stage``), so
  a fresh table carries on from the exact engine state: counts, trailing
  window (duplicate events recognised), alert levels, merges.

The findings store stays at the end of the flow (sinks write it, queries read
it); the engine's index and counts never come from it. One check reads it:
before the stage starts, ``lost_state`` compares its sightings with this
file, to say when the engine state was lost (clusters would be founded again,
their counts from zero, for pictures the store already holds). It is said
loudly and nothing more: the cluster worker logs a WARNING (``streams.app``)
and `deepwatch replay` prints a warning line before it starts
(``streams.cli.pipeline``); neither refuses to start, since nothing here can
rebuild the lost state. ``EngineStateStore`` is the interface,
``SqliteEngineState`` the embedded backend (one file in the data directory).
Offsets in a state belong to the broker that wrote them: the stage clears
them (``cluster_stage._fresh``) when it seeds a fresh broker from this file.

The file records the newest state layout written to it (``PRAGMA
user_version``: ``streams.clustering.SCHEMA_VERSION``). A deepwatch older
than that refuses the file when it opens it (``NewerEngineState``), and the
CLI before any worker starts: reading on, it left every newer state out of
its index one by one, founded new clusters for their pictures and
dead-lettered each op of theirs, and would drop what it does not know of
the states it rewrote.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

from streams.private_files import SQLITE_COMPANIONS, owner_only, private_dir
from streams.sqlite_wal import enable_wal

SCHEMA = """
CREATE TABLE IF NOT EXISTS engine_states (
    cluster_id TEXT PRIMARY KEY,
    state BLOB NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS engine_states_archived ON engine_states(archived);
CREATE INDEX IF NOT EXISTS engine_states_archived_seq ON engine_states(archived, seq);
"""


class EngineStateStore(Protocol):
    def put(self, states: dict[str, bytes]) -> None: ...
    def archive(self, states: dict[str, bytes]) -> None: ...
    def get(self, cluster_id: str) -> bytes | None: ...
    def get_archived(self, cluster_id: str) -> bytes | None: ...
    def hot(self) -> Iterator[tuple[str, bytes]]: ...
    def archived(self, newest: int | None = None) -> Iterator[tuple[str, bytes]]: ...
    def close(self) -> None: ...


class NewerEngineState(Exception):
    """The engine state file was written by a newer deepwatch than this one."""


def newer_state_message(path: Path, stored: int, current: int) -> str:
    return (f"{path} holds cluster states written by a newer deepwatch (state layout {stored}; this one writes "
            f"{current}): run that version or a newer one on this data dir (this one would drop what it does not "
            "know of those states), or start afresh with another --data-dir")


def stored_state_version(path: Path) -> int:
    """The newest state layout written to the engine state file at ``path``
    (0: no file, or one from before the layout was recorded). Read only."""
    if not path.exists():
        return 0
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


class SqliteEngineState:
    """``put`` upserts hot states, ``archive`` moves states to the cold tier;
    a later ``put`` of an archived cluster (revived) makes it hot again.
    ``hot`` iterates in write order (a revived cluster at its archive
    position), ``archived`` in archive order (newest last); a rebuilt index
    orders clusters by the offset that created them
    (``ClusterEngine.rebuild``)."""

    def __init__(self, path: Path, *, state_version: int):
        self.path = Path(path)
        private_dir(self.path.parent)  # 0700 where deepwatch makes it
        owner_only(self.path, "engine state file", SQLITE_COMPANIONS)  # 0600, its -wal and -shm too
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._lock = threading.Lock()
        stored = self._db.execute("PRAGMA user_version").fetchone()[0]
        if stored > state_version:
            self._db.close()
            raise NewerEngineState(newer_state_message(self.path, stored, state_version))
        if stored < state_version:
            self._db.execute(f"PRAGMA user_version = {int(state_version)}")
        enable_wal(self._db)  # workers may open a fresh file together
        # one writer, state also on the changelog: a power cut may lose the
        # last few ops here, which the broker still holds; no fsync per op
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM engine_states").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _upsert(self, states: dict[str, bytes], archived: int) -> None:
        if not states:
            return
        rows = []
        for cid, raw in states.items():
            self._seq += 1
            rows.append((cid, raw, archived, self._seq))
        with self._tx() as db:
            db.executemany(
                """INSERT INTO engine_states (cluster_id, state, archived, seq) VALUES (?, ?, ?, ?)
                   ON CONFLICT(cluster_id) DO UPDATE SET state=excluded.state, archived=excluded.archived,
                   seq=CASE WHEN excluded.archived=1 THEN excluded.seq ELSE engine_states.seq END""",
                rows,
            )

    def put(self, states: dict[str, bytes]) -> None:
        self._upsert(states, 0)

    def archive(self, states: dict[str, bytes]) -> None:
        self._upsert(states, 1)

    def get(self, cluster_id: str) -> bytes | None:
        row = self._db.execute("SELECT state FROM engine_states WHERE cluster_id=?", (cluster_id,)).fetchone()
        return row[0] if row else None

    def get_archived(self, cluster_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT state FROM engine_states WHERE cluster_id=? AND archived=1", (cluster_id,)
        ).fetchone()
        return row[0] if row else None

    def hot(self) -> Iterator[tuple[str, bytes]]:
        yield from self._db.execute("SELECT cluster_id, state FROM engine_states WHERE archived=0 ORDER BY seq")

    def archived(self, newest: int | None = None) -> Iterator[tuple[str, bytes]]:
        """Archived states in the order they were archived (an archive renumbers
        its states: a cluster revived and evicted again is among the newest);
        with ``newest``, only the last that many, the others not read."""
        since = 0
        if newest is not None:
            row = self._db.execute("SELECT seq FROM engine_states WHERE archived=1 ORDER BY seq DESC LIMIT 1 OFFSET ?",
                                   (max(0, newest - 1),)).fetchone()
            since = row[0] if row else 0
        yield from self._db.execute(
            "SELECT cluster_id, state FROM engine_states WHERE archived=1 AND seq >= ? ORDER BY seq", (since,))

    def count(self) -> tuple[int, int]:
        """(hot, archived) states."""
        rows = dict(self._db.execute("SELECT archived, COUNT(*) FROM engine_states GROUP BY archived").fetchall())
        return rows.get(0, 0), rows.get(1, 0)


def engine_state_path(data_dir: Path) -> Path:
    return Path(data_dir) / "engine-state.sqlite"


def stored_states(path: Path) -> int:
    """How many cluster states (hot and archived) the engine state file at
    ``path`` holds; 0 when there is no file, or one without the table. Read
    only: nothing is created or changed. ``sqlite3.Error`` for a file SQLite
    cannot read (``deepwatch`` refuses that before workers start)."""
    if not path.exists():
        return 0
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM engine_states").fetchone()[0]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return 0
        raise
    finally:
        db.close()


def _stored_sightings(settings: Any) -> int:
    """Sightings in the findings store the settings name (0: none, or no
    SQLite file yet: none is created)."""
    from streams.findings import open_findings, sqlite_file

    url = settings.findings.url
    path = sqlite_file(url, settings.data_dir)
    if path is not None and not path.exists():
        return 0
    store = open_findings(url, settings.data_dir, settings)
    try:
        return store.count_sightings()
    finally:
        store.close()


def lost_state(settings: Any, *, fresh_table: bool = False) -> str | None:
    """What to tell the operator when the engine state holds no cluster
    while the findings store already holds sightings: the file was deleted,
    or the workers point at a new data dir beside an old findings store
    (Elasticsearch, ``--store``). The cluster stage then counts every cluster
    from zero: the stream's sighting counts, velocity and alert levels part
    from what the desk shows, and alerts already raised are raised again.
    None when there is nothing to say (a fresh start: both empty).

    ``fresh_table``: the broker is known to be a new one (the embedded broker
    of ``deepwatch replay``/``demo``), so nothing else holds the clusters.
    Otherwise a long-lived broker's table changelog may still give the hot
    clusters back, and only the cold tier is lost for sure. Nothing rebuilds
    this file from the findings store, which does not keep the engine's state
    (hash index entries, trailing windows, duplicate event ids)."""
    path = engine_state_path(Path(settings.data_dir))
    try:
        if stored_states(path):
            return None
        sightings = _stored_sightings(settings)
    except Exception:  # noqa: BLE001 - a check, never a reason to stop; the store says so itself when used
        return None
    if not sightings:
        return None
    store = "findings.sqlite" if _is_sqlite_store(settings) else "the findings store"
    msg = (f"{path} holds no cluster state, but {store} already holds {sightings} sightings: the cluster stage "
           "counts their clusters from zero, so sighting counts, velocity and alert levels in the stream part "
           "from what the desk shows, and alerts already raised are raised again. ")
    if not fresh_table:
        msg += ("(A long-lived broker whose cluster table changelog survived gives the workers the hot clusters "
                "back; clusters evicted to the cold tier after dedupe.hot_window_hours are lost either way.) ")
    msg += (f"No command rebuilds {path.name} from the findings store. Fix: stop the workers and restore "
            f"{path.name} from a backup of the data dir, or point --data-dir at the data dir that holds it; "
            "to start counting afresh on purpose, use a new findings store as well (move findings.sqlite "
            "aside, or another --store).")
    return msg


def _is_sqlite_store(settings: Any) -> bool:
    from streams.findings import reads_are_local

    return reads_are_local(settings.findings.url)


def open_engine_state(data_dir: Path) -> SqliteEngineState:
    """The engine state file of ``data_dir``, for states of this deepwatch's layout."""
    from streams.clustering import SCHEMA_VERSION

    return SqliteEngineState(engine_state_path(data_dir), state_version=SCHEMA_VERSION)
