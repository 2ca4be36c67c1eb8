"""Slow clients on deepwatch's HTTP servers (the ingest endpoint, the desk).

uvicorn bounds neither how long a request's head may take to arrive nor how
many connections it holds: its keep-alive timer stops at the first byte, so a
client trickling a header byte now and then held its connection for good, and
a few thousand of them used up the process's file descriptors (every other
client then waited, and each refused accept logged a traceback).
``head_deadline_protocol`` closes such connections and refuses connections
over a cap at once; a request's body has its own deadline where it is read.
"""

from __future__ import annotations

import asyncio
from typing import Any

# A request's head (request line and headers) must arrive within this long of
# the connection opening or of the previous response on it.
HEADER_TIMEOUT_S = 10.0


def head_deadline_protocol(header_timeout_s: float = HEADER_TIMEOUT_S, max_connections: int | None = None) -> type:
    """uvicorn's h11 protocol, closing a connection whose next request head
    has not arrived ``header_timeout_s`` after the connection opened or the
    previous response ended, and (``max_connections``) a connection opened
    while that many are open already."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_late, self.cycle)

        def _head_late(self, cycle_then: Any) -> None:
            self._head_timer = None
            # A new cycle means a head arrived; an unfinished one, a request at work (pipelined).
            idle = self.cycle is cycle_then and (self.cycle is None or self.cycle.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                # Closed before a byte is read: its descriptor is free again at once.
                transport.close()
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return HeadDeadlineProtocol
