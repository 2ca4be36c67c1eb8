"""Bounds on what requests may hold of the desk: a body's size and arrival
time (``BodyLimit``), and how many requests of a kind are in flight at once
(``Slots``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator

from starlette.exceptions import HTTPException

# The largest request body read: a verdict (a note of at most 4,000 characters,
# 6 bytes each when JSON-escaped) or a login form fits many times over.
# Picture uploads (``UPLOAD_PATHS``) have their own, larger bound.
MAX_BODY_BYTES = 64 * 1024
UPLOAD_PATHS = ("/api/similar", "/similar")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or as
    received) ends in 413 when the route reads it, one still arriving
    ``timeout_s`` after the route began to read it in 408; the paths in
    ``paths`` have a bound of their own (picture uploads). The guards answer
    before a body is read (``GuardFirst``), but a login form and every request
    that passes them are read: without a bound a client could make the desk
    hold gigabytes, or a connection for as long as it trickled bytes."""

    def __init__(self, app: Any, max_bytes: int, paths: dict[str, int] | None = None, timeout_s: float = 120.0):
        self.app, self.max_bytes, self.paths, self.timeout_s = app, max_bytes, dict(paths or {}), timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bound = self.paths.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        received = 0
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        body_done = False

        async def limited() -> dict[str, Any]:
            nonlocal received, deadline, body_done
            if body_done:  # after the body, a receive waits for the disconnect: no deadline on that
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            body_done = message.get("type") != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > bound or not declared.isdigit() or int(declared) > bound:
                # Raised inside the route's body read: its exception handlers answer.
                raise HTTPException(413, f"request body over {bound} bytes")
            return message

        await self.app(scope, limited, send)


class Slots:
    """At most ``n`` requests of a kind at once (``take``); one over that is
    refused with 503 and ``Retry-After``. Taken and given back on the event
    loop only, so the count needs no lock."""

    def __init__(self, n: int, what: str, retry_after_s: int):
        self.n, self.what, self.retry_after_s, self.busy = n, what, retry_after_s, 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.busy >= self.n:
            raise HTTPException(503, f"the desk is busy: {self.n} {self.what} are in flight, the most it takes at "
                                     f"once; try again in {self.retry_after_s} s",
                                headers={"Retry-After": str(self.retry_after_s)})
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
