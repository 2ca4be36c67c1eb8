"""Switch a SQLite connection to WAL mode when several processes may open
the same fresh file at once (workers sharing a data dir)."""

from __future__ import annotations

import sqlite3
import time

from detectors.sqlite_errors import primary_code


def enable_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the lock.

    Switching a new file to WAL needs an exclusive lock and SQLite does not
    always wait on the busy handler for it: workers starting side by side on a
    fresh data dir would fail with "database is locked".
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            # by result code (BUSY, LOCKED and their extended codes), not message text
            busy = primary_code(e) in ("SQLITE_BUSY", "SQLITE_LOCKED")
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
