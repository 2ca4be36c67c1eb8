"""One store shared by the threads of a worker, used by one thread at a time
(``Serialized``, handed out by ``once``), and a non-blocking try for the
event loop (``Serialized.if_free``, ``BUSY`` when it would wait)."""

from __future__ import annotations

import threading
from typing import Any, Callable


# ``Serialized.if_free``'s answer when the store is in use or not open yet:
# nothing was asked; ask again where a wait holds no event loop (a thread).
BUSY = object()


class Serialized:
    """One store connection shared by threads, used by one thread at a time.

    sqlite3 serialises a connection with a mutex that a statement holds while
    it waits out busy_timeout; a second thread touching the same connection
    then waits on that mutex in a call that does not release the GIL, and the
    whole worker (event loop included) freezes until the timeout (measured:
    30 s stalls in the kill -9 drill). Taking this lock first avoids that.
    The store is opened on first use, in the calling (worker) thread."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory = factory
        self._store: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                if self._store is None:
                    self._store = self._factory()
                return getattr(self._store, name)(*args, **kwargs)

        return call

    def if_free(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``name(*args, **kwargs)`` on the store if it can start at once (the
        lock free, the store open), else ``BUSY`` without waiting. For the
        event loop: a worker thread holds the lock through its call, which for
        a write (``mark_processed``, a duplicate's accounting) may wait out
        SQLite's 30 s busy_timeout while the sinks write, and opening the
        store (its schema, WAL mode) can wait as long."""
        if not self._lock.acquire(blocking=False):
            return BUSY
        try:
            if self._store is None:
                return BUSY
            return getattr(self._store, name)(*args, **kwargs)
        finally:
            self._lock.release()


def once(factory: Callable[[], Any]) -> Callable[[], Any]:
    """A factory for one shared ``Serialized`` store."""
    shared = Serialized(factory)
    return lambda: shared
