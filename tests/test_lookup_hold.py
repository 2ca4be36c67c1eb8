"""A duplicate lookup the findings store cannot answer for a reason that
passes (the SQLite file locked past its busy timeout, Elasticsearch
unavailable) holds its event and asks again with backoff, as a blob write
that may pass does (``tests/test_blob_hold.py``); an error that would come
back every time (a corrupt database, a bug) still ends as one
``dedupe:internal_error`` dead letter (``streams.stage``).

It was ``dedupe:internal_error`` for every event read while the store was
locked or Elasticsearch down: valid events lost for good. The SQLite errors
here are real ones, raised by SQLite (a file locked by another connection, a
corrupt page), so they carry the result codes the stage judges them by."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import streams.stage as stage_mod
from streams import metrics
from streams.es_client import EsError
from streams.findings import PostIdentity
from streams.records import ClusterOp
from streams.stage import AnalyzeStage
from streams.store_errors import may_pass
from tests.test_blob_hold import PICTURES, _event, _process, cancel_while_held, stored_post
from tests.test_blob_hold import _stage as stage_for

def _stage(tmp_path: Path, store, *, deadline_s: float = 120.0, inline_max_pixels: int = 200_000,
           lookup_retry_s: float = 0.5) -> AnalyzeStage:
    return stage_for(tmp_path, store, deadline_s=deadline_s, inline_max_pixels=inline_max_pixels,
                     lookup_retry_s=lookup_retry_s)


def _failures() -> float:
    return metrics.LOOKUP_FAILURES._value.get()


def _held_s() -> float:
    """``deepwatch_findings_lookup_held_seconds`` as a scrape reads it."""
    return REGISTRY.get_sample_value("deepwatch_findings_lookup_held_seconds")


class LockedSqlite:
    """A findings store on a real SQLite file that another connection holds
    an exclusive lock on (as a writer past the busy timeout does) for the
    first ``locked`` lookups; each lookup opens its own connection with no
    busy timeout, so SQLite itself answers SQLITE_BUSY ("database is
    locked")."""

    def __init__(self, path: Path, locked: int, rows: dict[str, str] | None = None):
        self.path, self.left, self.calls = path, locked, 0
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE sightings (event_id TEXT PRIMARY KEY, sha256 TEXT)")
        db.executemany("INSERT INTO sightings VALUES (?, ?)", (rows or {}).items())
        db.close()
        self.locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.locker.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.locker.execute("BEGIN EXCLUSIVE")
        self.locker.execute("INSERT INTO sightings VALUES ('other', 'x')")  # takes the lock in WAL mode

    def sighting_identity(self, event_id: str) -> PostIdentity | None:
        self.calls += 1
        if self.left == 0 and self.locker is not None:
            self.locker.execute("ROLLBACK")
            self.locker.close()
            self.locker = None
        self.left -= 1
        db = sqlite3.connect(self.path, timeout=0)
        try:
            row = db.execute("SELECT sha256 FROM sightings WHERE event_id=?", (event_id,)).fetchone()
        finally:
            db.close()
        return stored_post(event_id, row[0] if row else None)


class Scripted:
    """A findings store raising ``errors`` in turn, then answering ``answer``."""

    def __init__(self, *errors: Exception, answer: str | None = None):
        self.errors, self.answer, self.calls = list(errors), answer, 0

    def sighting_identity(self, event_id: str) -> PostIdentity | None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return stored_post(event_id, self.answer)


def _es_unreachable() -> Exception:
    from elasticsearch import ConnectionError as EsConnectionError

    return EsConnectionError("Connection refused")


def _es_answered(status: int) -> Exception:
    from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
    from elasticsearch import ApiError

    meta = ApiResponseMeta(status=status, http_version="1.1", headers=HttpHeaders(), duration=0.0,
                           node=NodeConfig("http", "localhost", 9200))
    return ApiError(f"HTTP {status}", meta=meta, body={})


def _corrupt(path: Path) -> Path:
    """A real SQLite file whose table pages were overwritten: its lookups
    fail with SQLITE_CORRUPT "database disk image is malformed"."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE sightings (event_id TEXT PRIMARY KEY, sha256 TEXT)")
    db.executemany("INSERT INTO sightings VALUES (?, ?)", ((f"e{i}", "a" * 64) for i in range(2000)))
    db.commit()
    db.close()
    with open(path, "r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xff" * 4096)
    return path


class OnFile:
    def __init__(self, path: Path):
        self.path, self.calls = path, 0

    def sighting_identity(self, event_id: str) -> PostIdentity | None:
        self.calls += 1
        with sqlite3.connect(self.path, timeout=0) as db:
            row = db.execute("SELECT sha256 FROM sightings WHERE event_id=?", (event_id,)).fetchone()
        return stored_post(event_id, row[0] if row else None)


@pytest.mark.parametrize("picture", ["small.png", "large.png"])  # looked up on the event loop / in a thread
def test_a_locked_findings_store_holds_the_event_then_it_is_a_sighting(tmp_path, monkeypatch, picture):
    # backoff 0.2 + 0.4 + 0.8 s: longer than the event's whole deadline, which the waits are not charged to
    store = LockedSqlite(tmp_path / "findings.sqlite", locked=3)
    stage = _stage(tmp_path, store, lookup_retry_s=0.2, deadline_s=1.0)
    before = _failures()
    started = time.monotonic()
    result = _process(stage, _event(0, picture))
    took = time.monotonic() - started
    assert result.dead is None, result.dead
    sighting = ClusterOp.loads(result.op).sighting
    assert sighting.event.event_id == "e0" and sighting.sha256 == hashlib.sha256(PICTURES[picture]).hexdigest()
    assert store.calls == 4 and _failures() - before == 3
    assert 1.4 <= took < 5.0, took
    assert _held_s() == 0.0


def test_the_held_lookups_answer_is_the_one_judged(tmp_path, monkeypatch):
    """Once the lock is gone the store's answer decides: the same picture
    stored under the id is an exact duplicate, another one a conflict."""
    sha = hashlib.sha256(PICTURES["small.png"]).hexdigest()
    store = LockedSqlite(tmp_path / "a.sqlite", locked=2, rows={"e0": sha})
    result = _process(_stage(tmp_path, store, lookup_retry_s=0.05), _event(0, "small.png"))
    assert result.duplicate and result.op is None and result.dead is None and store.calls == 3
    store = LockedSqlite(tmp_path / "b.sqlite", locked=2, rows={"e0": "b" * 64})
    result = _process(_stage(tmp_path, store), _event(0, "small.png"))
    assert (result.dead.stage, result.dead.reason) == ("dedupe", "conflict") and "b" * 64 in result.dead.detail


@pytest.mark.parametrize("error", [
    lambda: _es_unreachable(),
    lambda: _es_answered(503),
    lambda: _es_answered(429),
    lambda: EsError("Elasticsearch at http://es:9200 refused the credentials", hold=True),
])
def test_an_unavailable_elasticsearch_holds_the_event(tmp_path, monkeypatch, error):
    store = Scripted(error(), error())
    before = _failures()
    result = _process(_stage(tmp_path, store, lookup_retry_s=0.05, inline_max_pixels=0), _event(0, "small.png"))
    assert result.dead is None and ClusterOp.loads(result.op).sighting.event.event_id == "e0"
    assert store.calls == 3 and _failures() - before == 2


def test_a_findings_file_a_newer_deepwatch_migrated_holds_the_event(tmp_path):
    """A rolling upgrade: the newer cluster worker migrated the findings file the older analyze workers
    share, which then refused it: every event they read was a dedupe:internal_error dead letter."""
    from streams.store import NewerStore

    newer = "findings store 'f' was written by a newer deepwatch (schema 4; this one reads up to 3): upgrade deepwatch"
    store = Scripted(NewerStore(newer), NewerStore(newer))
    result = _process(_stage(tmp_path, store, lookup_retry_s=0.05, inline_max_pixels=0), _event(0, "small.png"))
    assert result.dead is None and ClusterOp.loads(result.op).sighting.event.event_id == "e0"
    assert store.calls == 3


def test_a_corrupt_database_is_one_dead_letter_at_once(tmp_path):
    store = OnFile(_corrupt(tmp_path / "findings.sqlite"))
    before = _failures()
    result = _process(_stage(tmp_path, store), _event(0, "small.png"))
    assert result.op is None and store.calls == 1 and _failures() == before
    assert (result.dead.stage, result.dead.reason, result.dead.event_id) == ("dedupe", "internal_error", "e0")
    assert result.dead.detail == "DatabaseError: database disk image is malformed"


@pytest.mark.parametrize("error, detail", [
    (lambda: _es_answered(400), "ApiError"),
    (lambda: EsError("Elasticsearch at http://es:9200 answered 400: bad query"), "answered 400"),
    (lambda: TypeError("sighting_identity() takes 1 positional argument"), "TypeError"),
])
def test_errors_that_would_come_back_are_one_dead_letter_at_once(tmp_path, error, detail):
    store = Scripted(error(), answer=None)
    before = _failures()
    result = _process(_stage(tmp_path, store), _event(0, "small.png"))
    assert result.op is None and store.calls == 1 and _failures() == before
    assert (result.dead.stage, result.dead.reason) == ("dedupe", "internal_error") and detail in result.dead.detail


def test_a_missing_table_is_not_held(tmp_path):
    """SQLITE_ERROR (a bad statement, a table that is not there) comes back
    every time, although Python raises it as an OperationalError too."""
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    store = OnFile(tmp_path / "empty.sqlite")
    result = _process(_stage(tmp_path, store), _event(0, "small.png"))
    assert store.calls == 1 and result.dead.detail == "OperationalError: no such table: sightings"


def test_may_pass_goes_by_the_result_code_not_the_message(tmp_path):
    locked = LockedSqlite(tmp_path / "f.sqlite", locked=1)
    with pytest.raises(sqlite3.OperationalError) as busy:
        locked.sighting_identity("e0")
    assert busy.value.sqlite_errorname == "SQLITE_BUSY" and may_pass(busy.value)
    with pytest.raises(sqlite3.DatabaseError) as corrupt:
        OnFile(_corrupt(tmp_path / "c.sqlite")).sighting_identity("e1500")
    assert corrupt.value.sqlite_errorname == "SQLITE_CORRUPT" and not may_pass(corrupt.value)
    # the message alone decides nothing: an extended code counts as its primary one
    renamed = sqlite3.OperationalError("database disk image is malformed")
    renamed.sqlite_errorname, renamed.sqlite_errorcode = "SQLITE_IOERR_SHORT_READ", 522
    assert may_pass(renamed)
    assert not may_pass("a" * 64) and not may_pass(None) and not may_pass(ValueError("x"))


def test_a_held_lookup_that_then_fails_for_good_is_one_dead_letter(tmp_path, monkeypatch):
    store = Scripted(_es_unreachable(), _es_answered(400))
    result = _process(_stage(tmp_path, store, lookup_retry_s=0.05), _event(0, "small.png"))
    assert store.calls == 2 and (result.dead.stage, result.dead.reason) == ("dedupe", "internal_error")
    assert _held_s() == 0.0


def test_a_stop_ends_a_held_lookup_at_once_and_leaves_the_event_unacked(tmp_path, monkeypatch):
    store = Scripted(*[_es_unreachable() for _ in range(100)])
    stage = _stage(tmp_path, store, lookup_retry_s=30.0)

    held, stop_s = cancel_while_held(stage, lambda: store.calls > 0, _held_s)
    assert held >= 0.25 and stop_s < 0.5 and store.calls == 1
    assert _held_s() == 0.0


def test_a_picture_held_for_the_blob_store_then_for_the_lookup(tmp_path, monkeypatch):
    """Both holds in turn: the disk full, then the findings store locked."""
    import errno
    import os
    from unittest import mock

    import streams.blobstore as blobstore

    monkeypatch.setattr(stage_mod, "BLOB_RETRY_INITIAL_S", 0.05)
    real, writes = blobstore.write_atomically, []

    def write(path, data):
        writes.append(1)
        if len(writes) <= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    store = LockedSqlite(tmp_path / "findings.sqlite", locked=2)
    before = _failures()
    with mock.patch("streams.blobstore.write_atomically", write):
        result = _process(_stage(tmp_path, store, lookup_retry_s=0.05), _event(0, "large.png"))
    assert result.dead is None and ClusterOp.loads(result.op).sighting.event.event_id == "e0"
    assert len(writes) == 3 and store.calls == 3 and _failures() - before == 2


class SlowFailing(Scripted):
    """Each failing lookup takes ``seconds`` (as one waiting out SQLite's busy timeout does)."""

    def __init__(self, seconds: float, *errors: Exception):
        super().__init__(*errors)
        self.seconds = seconds

    def sighting_identity(self, event_id: str) -> PostIdentity | None:
        if self.errors:
            time.sleep(self.seconds)
        return super().sighting_identity(event_id)


def test_a_held_lookups_slow_tries_are_not_charged_to_the_events_deadline(tmp_path, monkeypatch):
    # each try of a locked store waits out its 30 s busy timeout: charged, the
    # event met its 120 s deadline after four tries as dedupe:deadline
    store = SlowFailing(0.4, *[_es_unreachable() for _ in range(4)])
    result = _process(_stage(tmp_path, store, lookup_retry_s=0.05, deadline_s=1.0), _event(0, "small.png"))
    assert result.dead is None, result.dead
    assert ClusterOp.loads(result.op).sighting.event.event_id == "e0" and store.calls == 5


def test_a_store_locked_while_it_opens_holds_the_event_too(tmp_path, monkeypatch):
    # the SQLite store opens on the first lookup; a lock then was a StoreError
    # without its SQLite code, dead-lettered
    from streams.store import StoreError

    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode, locked.sqlite_errorname = 5, "SQLITE_BUSY"
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorcode, corrupt.sqlite_errorname = 11, "SQLITE_CORRUPT"
    assert may_pass(StoreError.of("cannot open findings store 'x': database is locked", locked))
    assert not may_pass(StoreError.of("findings store 'x' is not a readable SQLite database", corrupt))
    store = Scripted(StoreError.of("cannot open findings store 'x': database is locked", locked))
    result = _process(_stage(tmp_path, store, lookup_retry_s=0.05), _event(0, "small.png"))
    assert result.dead is None and store.calls == 2
