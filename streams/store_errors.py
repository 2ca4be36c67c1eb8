"""Whether a store's failure may pass: one judgement for every stage that
holds its messages rather than losing them while a store cannot answer (the
duplicate lookup, the findings sinks, the cluster stage's engine state).

Held, a message is tried again with backoff until the store answers; not
held, the failure is the message's (a dead letter) or a bug. Holding a
failure that comes back every time would stop the stage for good, so only
reasons that can end are held.
"""

from __future__ import annotations

import sqlite3

from detectors.sqlite_errors import primary_code
from streams.es_client import store_unavailable

# SQLite primary result codes after which the same call may succeed: the file
# locked past busy_timeout (BUSY, LOCKED, PROTOCOL), the disk failing or full
# (IOERR, FULL), the file or its directory unreachable or read-only for now
# (CANTOPEN, READONLY: opening a store writes its schema). Not ERROR (a bad
# statement, a missing table), CORRUPT ("database disk image is malformed"),
# NOTADB and the like: those come back every time.
PASSING_SQLITE = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_PROTOCOL", "SQLITE_IOERR", "SQLITE_FULL",
                            "SQLITE_CANTOPEN", "SQLITE_READONLY"})


def may_pass(e: object) -> bool:
    """Whether a store call that raised ``e`` may succeed if made again later.
    SQLite errors are judged by their result code (``sqlite_errorname``,
    extended codes by their primary one: a ``SQLITE_IOERR_SHORT_READ`` is an
    ``SQLITE_IOERR``), not their message; one raised by Python code rather
    than by SQLite carries no code and passes when it is an
    ``OperationalError``. Opening the SQLite findings store raises
    ``store.StoreError`` carrying the code. Elasticsearch's errors are
    judged by ``es_client.store_unavailable``. A findings file a newer
    deepwatch migrated (``store.NewerStore``) passes too: the worker holds
    until it is upgraded (one line with the fix, as every hold logs)."""
    if getattr(e, "passes_after_upgrade", False):  # a file a newer deepwatch migrated: passes once upgraded
        return True
    code = primary_code(e)
    if code is not None:
        return code in PASSING_SQLITE
    if isinstance(e, sqlite3.Error):
        return isinstance(e, sqlite3.OperationalError)
    return isinstance(e, Exception) and store_unavailable(e)
