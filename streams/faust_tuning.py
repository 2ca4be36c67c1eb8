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
import logging
import os
import re
import sys
import threading

from faust.tables.manager import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from setproctitle import getproctitle, setproctitle
from faust.worker import Worker

from detectors.printable import one_line
from streams import metrics

log = logging.getLogger(__name__)

# How long a crashed worker may take to stop before it exits anyway. A crash
# with the broker still there stops in well under a second; with the broker
# gone a stop waited on a consumer thread for mode's 60 s ``shutdown_timeout``
# (see ``_on_thread_stop``), /healthz still 200, the supervisor none the wiser.
# Nothing a crashed worker still does can be committed to a broker that is
# gone; what it had not committed is consumed again after the restart.
CRASH_STOP_S = 15.0
EXIT_CRASHED = 1


class PromptTableManager(TableManager):
    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class BrokerUnreachable(ConnectionError):
    """No bootstrap address of the broker took a connection for too long (``streams.worker.BrokerWatch``)."""


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = one_line(str(e))  # controls escaped: it goes into /healthz and the crash line
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _is_unreachable(e: BaseException) -> bool:
    from aiokafka import errors

    # Not any ConnectionError: one from the findings store (Elasticsearch) is not the broker's.
    return isinstance(e, (BrokerUnreachable, errors.KafkaConnectionError, errors.NodeNotReadyError))


def explain_crash(reason: BaseException, broker: str) -> tuple[str, str]:
    """(cause, message): what an operator reads when a worker crashes, one
    line saying why and what to do. ``cause``: ``broker_lost_data``,
    ``broker_unreachable`` or ``crashed``."""
    from faust.exceptions import ConsistencyError

    text = str(reason)
    if isinstance(reason, ConsistencyError) and "changelog" in text:
        # Faust's own words: "The persisted offset for changelog topic partition
        # TP(topic='X', partition=0) is higher than the last offset in that topic
        # (highwater) (1970 > -1). ..." over a dozen lines.
        topic = re.search(r"topic='([^']+)'", text)
        offsets = re.search(r"\((\d+) > (-?\d+)\)", text)
        where = f"changelog {topic.group(1) if topic else '?'}"
        if offsets:
            where += f" ends at offset {offsets.group(2)} but this worker's table had read it up to {offsets.group(1)}"
        return "broker_lost_data", (
            f"the broker at {broker} lost its data (restarted empty?): the {where}; this worker stops "
            f"(exit {EXIT_CRASHED}): restarting it rebuilds its table from the engine state in its data dir "
            "(a supervisor does: systemd Restart=on-failure, Kubernetes restartPolicy)")
    if _is_unreachable(reason):
        return "broker_unreachable", (
            f"the broker at {broker} is unreachable ({_one_line(reason)}); this worker stops (exit {EXIT_CRASHED}): "
            "bring the broker back and restart the worker (a supervisor does: systemd Restart=on-failure, "
            "Kubernetes restartPolicy); what it had not committed is consumed again")
    return "crashed", (f"the worker crashed ({_one_line(reason)}); it stops (exit {EXIT_CRASHED}); "
                       "the log lines above say more")


_told = threading.Lock()


def tell_crash(reason: BaseException, broker: str, **fields: object) -> None:
    """Log the crash's one line (``explain_crash``); once per process."""
    if not _told.acquire(blocking=False):
        return
    cause, message = explain_crash(reason, broker)
    log.critical(message, extra={"cause": cause, "broker": broker, "exit_code": EXIT_CRASHED, **fields})


def _exit_after(seconds: float, reason: BaseException, broker: str) -> None:
    """From a daemon thread: if the process is still here ``seconds`` from
    now, say why and leave (exit ``EXIT_CRASHED``)."""
    def expire() -> None:
        tell_crash(reason, broker, stop_s=seconds, note=f"its stop did not end within {seconds:g} s")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CRASHED)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.name = "crash-stop-deadline"
    timer.start()


class PromptWorker(Worker):
    _deadline_armed = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if not self.stdout.isatty():
            # Faust's start-up spinner writes terminal control codes: off a
            # terminal they began one line of every worker's JSON log
            # ("\x1b[?25h{...}"), which a log shipper cannot parse.
            self.spinner = None

    def broker_address(self) -> str:
        try:
            return ",".join(f"{u.host}:{u.port or 9092}" for u in self.app.conf.broker)
        except Exception:  # noqa: BLE001 - only words for a log line
            return "?"

    def _crash(self, reason: BaseException) -> None:
        # Marked on this root service by whatever crashed beneath it (the app,
        # a consumer thread: then from that thread), before the stop begins.
        super()._crash(reason)
        metrics.stopping(f"crashed: {_one_line(reason)}")
        if not self._deadline_armed:
            self._deadline_armed = True
            _exit_after(CRASH_STOP_S, reason, self.broker_address())

    async def stop(self) -> None:
        metrics.stopping(f"crashed: {_one_line(self.crash_reason)}" if self.crash_reason else "the worker is stopping")
        await super().stop()

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


_installed = faust_aiokafka.AIOKafkaConsumerThread.on_thread_stop
_stock_thread_stop = getattr(_installed, "deepwatch_stock", _installed)  # a reload must not wrap the wrapper


async def _on_thread_stop(self) -> None:
    """The consumer thread's stop, not ended by a fetch that was waiting to
    retry. aiokafka's ``Fetcher.close`` cancels its fetch tasks and awaits
    them; one sleeping its retry backoff after a failed fetch (the broker
    gone) re-raises the CancelledError, the thread's shutdown never tells the
    main loop, and the worker's stop waited mode's ``shutdown_timeout`` (60 s)
    for it, its consumer "crashed". Our own cancellation still propagates."""
    try:
        await _stock_thread_stop(self)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.info("consumer closed with a fetch still waiting to retry (broker gone)")


_on_thread_stop.deepwatch_stock = _stock_thread_stop  # type: ignore[attr-defined]
faust_aiokafka.AIOKafkaConsumerThread.on_thread_stop = _on_thread_stop


TABLE_MANAGER = f"{__name__}:PromptTableManager"
