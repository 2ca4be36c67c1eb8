"""Faust/mode start-up and shutdown without fixed sleeps.

Faust's ``TableManager.on_start`` sleeps 1 s so that tables an agent creates
while starting still get registered; deepwatch creates its one table when the
app is built, before the worker starts, so that second only delays joining
the consumer group. mode's ``Worker`` sleeps 1 s in a sentinel task at every
shutdown after the app has already stopped (offsets committed, producer
flushed), and up to 1 s more waiting for leftover tasks it then cancels.
All of it is pure waiting: a replay pays it once per worker process, a
long-lived worker never notices. ``PromptWorker`` also keeps the worker's
command line as its process title (with its state), where Faust would put
its own.
"""

from __future__ import annotations

import asyncio

from faust.tables.manager import TableManager
from setproctitle import getproctitle, setproctitle
from faust.worker import Worker


class PromptTableManager(TableManager):
    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class PromptWorker(Worker):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if not self.stdout.isatty():
            # Faust's start-up spinner writes terminal control codes: off a
            # terminal they began one line of every worker's JSON log
            # ("\x1b[?25h{...}"), which a log shipper cannot parse.
            self.spinner = None

    def _setproctitle(self, info: str, **_: object) -> None:
        # Faust's title ("[Faust:Worker] -init- deepwatch -p 6066 ...") hides the role
        # and names a web port no worker opens; keep the command line (a forked
        # worker's is set by streams.zygote) and add the state.
        base = getproctitle().split(" [", 1)[0]
        setproctitle(f"{base} [{info}]")

    async def _sentinel_task(self) -> None:
        await asyncio.sleep(0)  # one more turn of the loop is all the sentinel is for

    def _gather_all(self) -> None:
        # mode waits up to 1 s for every leftover task, then cancels the rest;
        # by now the app has stopped, and what is left are loops that only end
        # when cancelled (the detect role closes its micro-batchers' collectors
        # itself, ``DetectStage.close``: this wait would hold each stop 0.2 s).
        # 0.2 s is plenty.
        for _ in range(2):
            if not asyncio.all_tasks(loop=self.loop):
                break
            self.loop.run_until_complete(asyncio.sleep(0.1))
        for task in asyncio.all_tasks(loop=self.loop):
            task.cancel()


TABLE_MANAGER = f"{__name__}:PromptTableManager"
