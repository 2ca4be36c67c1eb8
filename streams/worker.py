"""Run one deepwatch worker process (``deepwatch worker`` / ``python -m streams.worker``).

Roles: ``pipeline`` (ingest → cluster → sinks, CPU) and ``detect`` (learned
models, GPU-capable, own consumer group); ``analyze`` (ingest → cluster ops,
own consumer group) and ``cluster`` (the single writer and the sinks) split
the pipeline in two, so the writer does not share a process with analysis.
Several workers of a role share its partitions; the cluster table has a
standby replica on the others.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time

from detectors.imagedata import ignore_pillow_warnings
from streams import logs, metrics
from streams.blobstore import blob_dir
from streams.private_files import owner_only, own_dir
from streams.settings import Settings, load_settings
from streams.topics import PIPELINE_ROLES, ROLES

log = logging.getLogger(__name__)

PIPELINE_SWITCH_INTERVAL_S = 0.001
# Young collections every 10,000 net allocations instead of 700: the stages
# allocate short-lived records by the thousand per batch, and each young
# collection promoted them into the older generations, whose collections
# walk the whole live heap (see ``settle_heap``).
GC_GEN0_THRESHOLD = 10_000


def settle_heap() -> None:
    """Take what start-up built (the imported modules, the app) out of the
    cyclic collector's view, and make young collections rarer. Measured on
    the 2,000-event replay feed (``bench/replay.py --filer``): the cluster
    writer's worker spent 0.62 s in the collector (three full collections
    at ~140 ms each, every one a pause of the event loop that carries the
    sends), 0.05 s after this; every event was accounted 9.4 s after the
    first was produced, 10.8 s before (same run). Nothing frozen is freed
    before exit: it lived that long anyway, but for the few dozen objects of
    start-up already garbage in reference cycles (75 in a pipeline worker,
    measured), which a collection first would cost ~0.1 s of every start
    to free."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


# A worker whose broker has taken no connection for this long stops (exit 1,
# one line saying so: ``streams.faust_tuning.tell_crash``) for its supervisor
# to restart; a restarted worker then fails fast at start-up, naming the
# address, until the broker is back. Without it an idle worker retried for
# good, /healthz 200, while a busy one crashed within seconds (its first
# end-offset lookup, ``streams.stall_guard``). Long enough for a broker to
# restart (``kafka.broker_lost_s``, 60 s).
BROKER_PROBE_S = 2.0


def consumer_connected(app) -> bool | None:
    """Whether the worker's Kafka consumer holds a live connection (aiokafka's
    client, in the consumer thread: read only); None where it cannot tell."""
    try:
        conns = app.consumer._thread._consumer._client._conns
        return any(c.connected() for c in list(conns.values()))
    except Exception:  # noqa: BLE001 - not started, stopping, or another aiokafka: then probe
        return None


class BrokerWatch:
    """Whether the broker is still there; ``check`` (a Faust timer) raises
    ``BrokerUnreachable`` once it has not been for ``lost_s``. While the
    consumer holds a live connection nothing is asked; otherwise whether any
    bootstrap address takes a TCP connection (``streams.broker.unreachable``,
    in a thread; a TLS listener may log each, so only then)."""

    def __init__(self, bootstrap: str, lost_s: float):
        self.bootstrap, self.lost_s = bootstrap, lost_s
        self.since: float | None = None  # monotonic: when it was first found unreachable
        self.why = ""  # what the last look found, for the line the worker stops with

    async def reachable(self) -> bool:
        from streams.broker import unreachable

        errors = await asyncio.to_thread(unreachable, self.bootstrap, BROKER_PROBE_S)
        self.why = "; ".join(errors)
        return not errors

    async def check(self, connected: bool | None = None) -> None:
        from streams.faust_tuning import BrokerUnreachable

        if connected or await self.reachable():
            self.since = None
            return
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        if now - self.since >= self.lost_s:
            raise BrokerUnreachable(f"no connection to {self.bootstrap} for {now - self.since:.0f} s: {self.why}")


def faust_broker_url(settings: Settings) -> str:
    from streams.broker import BrokerError, faust_broker_url as resolve

    if settings.broker == "embedded":
        raise SystemExit("a worker needs --broker kafka://HOST:PORT (`deepwatch broker` prints one) or DEEPWATCH_BROKER")
    try:
        return resolve(settings, settings.broker)
    except BrokerError as e:
        raise SystemExit(f"error: {e}") from None


def run(settings: Settings, role: str, nice_after_load: int | None = None) -> None:
    logs.setup(settings.log_level, settings.log_format)
    ignore_pillow_warnings()  # analyze threads decode at once (the docstring says why)
    if role in PIPELINE_ROLES:
        # The event loop thread runs the consumer, the sends and the single
        # cluster writer; analyze threads hashing images would otherwise keep
        # it waiting up to the default 5 ms for the GIL at every hand-over
        # (measured: ~15% more events/s at 1 ms, bench/replay.py --filer).
        sys.setswitchinterval(PIPELINE_SWITCH_INTERVAL_S)
    broker = faust_broker_url(settings)
    # The pictures and their analyses: 0700 (the data dir too, where made
    # here), and a blob store made at the umask's 0755 before narrowed once,
    # here, rather than by each of its many openers (``streams.blobstore``).
    own_dir(blob_dir(settings.data_dir), "blob store")
    if role in PIPELINE_ROLES:
        from streams.app import build_pipeline_app

        app = build_pipeline_app(settings, broker, analyze=role != "cluster", cluster=role != "analyze")
    elif role == "detect":
        from streams.detect_worker import build_detect_app

        app = build_detect_app(settings, broker, nice_after_load=nice_after_load)
    else:
        raise SystemExit(f"unknown role {role!r}: {' | '.join(ROLES)}")
    if role in PIPELINE_ROLES:
        settle_heap()  # the detect role's once its models are loaded (``build_detect_app``)

    @app.timer(interval=metrics.HEARTBEAT_S)
    async def heartbeat() -> None:  # on the event loop: /healthz goes 503 when these stop
        metrics.beat()

    watch = BrokerWatch(broker.partition("://")[2], settings.kafka.broker_lost_s)

    @app.timer(interval=metrics.HEARTBEAT_S)
    async def broker_watch() -> None:  # raising here crashes the app: the worker stops, exit 1
        await watch.check(consumer_connected(app))

    if settings.metrics_port is not None:
        port = metrics.serve(settings.metrics_port)
        log.info("metrics listening", extra={"port": port, "role": role})
        port_file = os.environ.get("DEEPWATCH_METRICS_PORT_FILE")
        if port_file:
            owner_only(port_file, "metrics port file")  # beside the 0600 logs, as they are
            with open(port_file, "w") as f:
                f.write(str(port))
    from streams.faust_tuning import PromptWorker

    worker = PromptWorker(
        app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False,
        override_logging=False,
    )
    log.info("worker starting", extra={"role": role, "broker": broker, "pid": os.getpid()})
    try:
        worker.execute_from_commandline()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if worker.crash_reason is not None:
        # mode re-raises the crash (a traceback, "We experienced a crash!")
        # and exits 1; the operator gets one line of why and what to do.
        from streams.faust_tuning import EXIT_CRASHED, tell_crash

        tell_crash(worker.crash_reason, worker.broker_address(), role=role)
        code = code or EXIT_CRASHED
    _exit_now(code)


def _exit_now(code: object) -> None:
    """Leave without the interpreter's teardown. By now the app has stopped:
    offsets committed, producer flushed, every store write committed. What is
    left is finalising modules and objects (torch, faust, numpy), which took
    1-3 s per worker at every stop and shows in every replay's wall time."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # SystemExit("message") prints it, then exits 1
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def main(argv: list[str] | None = None) -> None:
    from streams.settings_check import SettingsError

    argv = list(sys.argv[1:] if argv is None else argv)
    role = argv[argv.index("--role") + 1] if "--role" in argv else "pipeline"
    nice = int(argv[argv.index("--nice-after-load") + 1]) if "--nice-after-load" in argv else None
    try:
        settings = load_settings()
    except SettingsError as e:
        raise SystemExit(f"error: {e}") from None
    run(settings, role, nice)


if __name__ == "__main__":
    main()
