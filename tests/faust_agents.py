"""One Faust agent run in its test context (Faust's own ``Stream``,
``noack_take`` and acks, fed through a channel; no broker is reached), with
every ack it makes recorded: the stages' ack rules are tested on it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import faust


def recording_agent(name: str, run: Callable[[Any], Awaitable[None]], acked: list):
    """An agent that runs ``run(stream)``, appending each acked event's value to ``acked``."""
    app = faust.App(name, broker="kafka://127.0.0.1:1", store="memory://")

    @app.agent()
    async def agent(stream):
        ack = stream.ack

        async def recorded(event):
            acked.append(event.value)
            return await ack(event)

        stream.ack = recorded
        await run(stream)

    return agent


async def wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
