"""SQLite errors judged by their result code, not their words: the messages
vary by version and by what failed ("malformed JSON" is no damaged file), the
codes do not. Here because the bank file (``detectors.banks``) and the
findings store (``streams.store``, ``streams.store_errors``) both read them."""

from __future__ import annotations


def primary_code(e: BaseException) -> str | None:
    """SQLite's primary result code of ``e`` (``SQLITE_BUSY`` for an
    ``SQLITE_BUSY_SNAPSHOT``, ``SQLITE_READONLY`` for an
    ``SQLITE_READONLY_DIRECTORY``); None for an error SQLite did not raise
    (``sqlite_errorname`` is set by SQLite's errors, and by the store's own
    ``StoreError`` that carries one)."""
    name = getattr(e, "sqlite_errorname", None)
    return "_".join(name.split("_")[:2]) if name else None
