"""Run the whole pipeline locally: broker, worker processes, a feed, and the
accounting that says when every event is processed or dead-lettered.

Used by ``deepwatch replay`` and ``deepwatch demo``, and by the end-to-end
tests, so all three exercise exactly the same processes. Workers are forked
from a zygote that imported them once (``streams.zygote``;
``settings.local_workers = "spawn"``: each a fresh interpreter).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from pydantic import BaseModel

from streams.topics import topic_specs
from streams.broker import EmbeddedBroker, bootstrap_of, ensure_topics
from streams.ingest import Produced, produce_lines
from streams.priority import renice_threads
from streams.private_files import own_dir, owner_only, private_dir
from streams.settings import Settings
from streams.findings import IdentityCheck, open_findings
from streams.zygote import LOCAL_THREAD_ENV, SAFE_PATH, Zygote, ZygoteChild, take_prestarted

log = logging.getLogger(__name__)


# The detect role runs at a lower CPU priority next to local pipeline
# workers: ingest keeps the cores it needs, the model uses what is left and
# catches up when the feed ends (a dedicated detect machine is unaffected).
DETECT_NICE = 10
# How long a stopping worker may take before it is killed. The detect role
# keeps no state of its own (results go to the broker), and a model busy on
# a batch holds its process exit until the batch ends.
STOP_GRACE_S = {"detect": 2.0}
# How long replay waits for the next model result, once every event is in,
# before it stops waiting and reports the clusters still pending.
MODELS_STALL_S = 60.0
# How often ``wait_until_processed`` looks at the store: for the events, and,
# once every event is accounted for, for the model results and alerts still due
# (at most, that is: a look that takes long waits twice as long before the next).
EVENTS_POLL_S, DERIVED_POLL_S = 0.1, 0.02
# ``wait_until_processed`` sends missing events again after this long without
# progress at the least, and never before an event could still be in flight
# (``resend_stall_s``): MARGIN_S beyond its fetch, for decoding, hashing and
# the sinks. A resend of an event still being fetched was analysed twice.
RESEND_STALL_MIN_S, RESEND_STALL_MARGIN_S = 20.0, 10.0


def resend_stall_s(settings: Settings) -> float:
    """How long replay waits without progress before it sends missing events
    again: past the longest one event can be in flight, its whole fetch
    (``fetch.total_timeout_s``, redirects and retries included) cut short by
    the analyze stage's deadline (``ingest.event_deadline_s``), plus a
    margin; never under ``RESEND_STALL_MIN_S``."""
    in_flight = min(settings.fetch.total_timeout_s, settings.ingest.event_deadline_s)
    return max(RESEND_STALL_MIN_S, in_flight + RESEND_STALL_MARGIN_S)


# How long ``WorkerProcess.metrics_port`` waits for a starting worker to say its port.
METRICS_PORT_WAIT_S = 60.0


@dataclass
class WorkerProcess:
    role: str
    proc: "subprocess.Popen | ZygoteChild"
    log_path: Path
    # where the worker writes the metrics port it took (DEEPWATCH_METRICS_PORT_FILE); None: it serves none
    port_file: Path | None = None
    expected_exit: bool = False
    spawned_at: float = field(default_factory=time.time)  # wall clock, comparable with log timestamps
    _metrics_port: int | None = field(default=None, init=False, repr=False)

    @property
    def metrics_port(self) -> int | None:
        """The port of the worker's /metrics, once it has said it (waited for while the worker
        starts, at most ``METRICS_PORT_WAIT_S``); None when it serves none or died first. The
        worker takes any free port itself: one picked here and handed over was taken by another
        process in between on a busy machine, and the worker exited on "port in use"."""
        if self._metrics_port is None and self.port_file is not None:
            deadline = time.monotonic() + METRICS_PORT_WAIT_S
            while True:
                try:
                    text = self.port_file.read_text().strip()
                except OSError:  # not written yet
                    text = ""
                if text.isdigit():
                    self._metrics_port = int(text)
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        return self._metrics_port

    def stop(self, timeout: float = 20.0) -> None:
        self.terminate()
        self.wait_stopped(timeout)

    def terminate(self) -> None:
        self.expected_exit = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 20.0) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_times(self) -> dict[str, float]:
        """Seconds from spawn to the worker's start-up milestones, read from
        its JSON log: ``imports`` (process up, settings read, app built),
        ``join`` (group joined, tables recovered: "Worker ready") and, for
        the detect role, ``models`` (models loaded, counted from spawn)."""
        marks = {"worker starting": "imports", "Worker ready": "ready", "models loaded": "models"}
        out: dict[str, float] = {}
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            start = line.find('{"ts"')
            if start < 0:
                continue
            try:
                doc = json.loads(line[start:])
            except ValueError:
                continue
            msg = str(doc.get("msg", ""))
            for needle, name in marks.items():
                if needle in msg and name not in out:
                    out[name] = datetime.fromisoformat(doc["ts"]).timestamp() - self.spawned_at
        if "ready" in out and "imports" in out:
            out["join"] = out.pop("ready") - out["imports"]
        return out

    def stage_seconds(self) -> dict[str, float]:
        """Seconds spent per stage so far (the ``deepwatch_stage_seconds``
        histogram's sums, and its counts as ``count:STAGE``, plus
        ``events:STAGE:OUTCOME`` counts and the
        ``deepwatch_stage_lag_seconds`` sums and counts as
        ``lag_sum:STAGE``/``lag_count:STAGE``), scraped from
        the worker's /metrics; empty when it serves none or cannot be reached."""
        if self.metrics_port is None or self.proc.poll() is not None:
            return {}
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "deepwatch_stage_seconds":
                for sample in fam.samples:
                    if sample.name.endswith("_sum"):
                        out[sample.labels["stage"]] = sample.value
                    elif sample.name.endswith("_count"):
                        out[f"count:{sample.labels['stage']}"] = sample.value
            elif fam.name == "deepwatch_stage_lag_seconds":
                for sample in fam.samples:
                    kind = sample.name.rpartition("_")[2]
                    if kind in ("sum", "count"):
                        out[f"lag_{kind}:{sample.labels['stage']}"] = sample.value
            elif fam.name == "deepwatch_events":
                for sample in fam.samples:
                    if sample.name.endswith("_total"):
                        out[f"events:{sample.labels['stage']}:{sample.labels['outcome']}"] = sample.value
        return out

    def kill(self) -> None:
        """SIGKILL: a crash, no clean shutdown, no final commit."""
        self.expected_exit = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def settings_env(settings: Settings, broker_url: str) -> dict[str, str]:
    """Hand the parent's settings to a worker process through the environment."""
    env = dict(os.environ)
    env.update({
        "DEEPWATCH_BROKER": broker_url,
        "DEEPWATCH_DATA_DIR": str(Path(settings.data_dir).resolve()),
        "DEEPWATCH_TOPIC_PREFIX": settings.topic_prefix,
        "DEEPWATCH_APP_ID": settings.app_id,
        "DEEPWATCH_PARTITIONS": str(settings.partitions),
        "DEEPWATCH_LOG_LEVEL": settings.log_level,
        "DEEPWATCH_LOG_FORMAT": "json",
    })
    # Every section: a list of some let a TOML file's [desk] (desk.public_url,
    # the link in every alert) and [batch] go no further than the parent.
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            env[f"DEEPWATCH_{name.upper()}"] = value.model_dump_json()
    env["DEEPWATCH_LOCAL_WORKERS"] = settings.local_workers
    env.pop("DEEPWATCH_CONFIG", None)  # everything is already resolved above
    return env


@dataclass
class Cluster:
    """A running local deployment: broker (embedded or external) plus workers."""

    settings: Settings
    broker_url: str
    bootstrap: str
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # start-up phases, seconds
    zygote: Zygote | None = None  # workers are forked from it when it runs (streams.zygote)
    broker: EmbeddedBroker | None = None  # the broker it started, if it started one

    def start_worker(self, role: str = "pipeline", metrics: bool = True) -> WorkerProcess:
        idx = sum(1 for w in self.workers if w.role == role)
        log_path = self.log_dir / f"worker-{role}-{idx}-{int(time.time() * 1000)}.log"
        env = settings_env(self.settings, self.broker_url)
        for k, v in LOCAL_THREAD_ENV.items():
            env.setdefault(k, v)
        port_file = None
        if metrics:
            port_file = log_path.with_suffix(".port")
            env["DEEPWATCH_METRICS_PORT"] = "0"  # any free one, said in port_file (WorkerProcess.metrics_port)
            env["DEEPWATCH_METRICS_PORT_FILE"] = str(port_file)
        # The detect role loads its models at normal priority (a one-off
        # fraction of a second of CPU that, niced, took 6-8 s next to a
        # pipeline already at work) and lowers itself to DETECT_NICE after.
        args = ["--nice-after-load", str(DETECT_NICE)] if role == "detect" else []
        argv = ["--role", role, *args]
        proc: subprocess.Popen | ZygoteChild | None = None
        # Made here, owner-only (0600), before either way of starting the worker opens it: a worker's log
        # names the accounts, posts and URLs it handled. The zygote's child opens it moments later;
        # readers of the log may look before.
        owner_only(log_path, "worker log")
        if self.zygote is not None and self.zygote.alive():
            try:
                proc = self.zygote.spawn(argv, env, log_path)
            except RuntimeError as e:  # it failed to import or died: a fresh interpreter does the same job
                log.warning("worker zygote unavailable; starting a fresh process", extra={"error": str(e)})
                self.zygote = None
        if proc is None:
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, *SAFE_PATH, "-m", "streams.worker", *argv],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )
        w = WorkerProcess(role, proc, log_path, port_file)
        self.workers.append(w)
        return w

    def can_spawn_now(self) -> bool:
        """Whether ``start_worker`` would start a worker at once: no zygote
        (fresh processes), or one that has finished importing. While it still
        imports, ``start_worker`` waits for it."""
        return self.zygote is None or self.zygote.ready() or not self.zygote.alive()

    def wait_ready(self, timeout_s: float = 60.0, roles: tuple[str, ...] | None = None) -> float:
        """Wait until every worker (of ``roles``, default all) has joined its
        group and recovered its tables, so a replay measures the pipeline
        rather than process start. Faust logs this as "Worker ready"; if a
        version stops saying so we only lose the wait, not correctness.
        Polls the logs every 50 ms. Returns seconds waited."""
        started = time.monotonic()
        waiting = [w for w in self.workers if not w.expected_exit and (roles is None or w.role in roles)]
        while waiting and time.monotonic() - started < timeout_s:
            self.check_workers()
            waiting = [w for w in waiting if "Worker ready" not in w.log_path.read_text(errors="replace")]
            if waiting:
                time.sleep(0.05)
        return time.monotonic() - started

    def stage_seconds(self) -> dict[str, dict[str, float]]:
        """Per role, seconds spent per stage summed over its running workers."""
        out: dict[str, dict[str, float]] = {}
        for w in self.workers:
            for stage, secs in w.stage_seconds().items():
                role = out.setdefault(w.role, {})
                role[stage] = role.get(stage, 0.0) + secs
        return out

    def renice(self, role: str, nice: int = 0) -> int:
        """Set every thread of ``role``'s workers to ``nice``
        (``streams.priority.renice_threads``). Used once the feed has drained:
        the detect role then gets its full share of the cores instead of what
        neighbouring processes leave. Raising priority needs CAP_SYS_NICE;
        without it nothing changes (the role stays niced, results still come).
        Returns the threads changed."""
        return sum(renice_threads(w.proc.pid, nice) for w in self.workers
                   if w.role == role and w.proc.poll() is None)

    def check_workers(self) -> None:
        """Raise ``WorkerExited`` for a worker, or the embedded broker, that
        ended while the run still needs it."""
        how = self.broker.exited() if self.broker is not None else None
        if how is not None:
            # Workers then retry it for good and replay only noticed its
            # resends going unanswered, then blamed kafka.security_protocol.
            raise WorkerExited(f"the embedded broker stopped ({how}) while the run needed it; the events it held "
                               f"are gone with it; see {self.broker.log_path}")
        for w in self.workers:
            code = w.proc.poll()
            if code is not None and not w.expected_exit:
                if code == 0:
                    # A clean stop nobody here asked for: a signal that reached the
                    # worker alone. Waiting on would wait for the whole timeout.
                    raise WorkerExited(f"{w.role} worker stopped (exit 0) while it was still needed; something "
                                       f"outside this command stopped it (a SIGTERM or Ctrl-C); log {w.log_path}")
                tail = _tail(w.log_path, 32768)
                said = [line for line in tail.splitlines() if line.startswith("error: ")]
                if said:  # the worker said why (a setting it cannot run with): that line, not the log
                    raise WorkerExited(f"{w.role} worker exited with {code}: {said[-1][len('error: '):]} (log {w.log_path})")
                cause = crash_cause(tail)
                if cause:  # its first logged exception, not the shutdown lines after it
                    raise WorkerExited(f"{w.role} worker exited with {code}: {cause} (log {w.log_path})")
                raise WorkerExited(f"{w.role} worker exited with {code}; log {w.log_path}:\n{tail[-3000:]}")

    def last_error(self) -> str | None:
        """The newest error any worker logged (``role: message``), read from
        the end of the logs: what a stalled run names as its likely cause
        (a full disk, a locked store) instead of only resending."""
        newest: tuple[str, str] | None = None
        for w in self.workers:
            for doc in _error_records(_tail(w.log_path, 32768)):
                found = (str(doc.get("ts", "")), f"{w.role}: {doc.get('msg')}")
                newest = max(newest, found) if newest else found
        return newest[1] if newest else None

    def stop(self) -> None:
        # All at once: each worker's clean shutdown (final commit, producer
        # flush) takes a moment, and they do not depend on each other.
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            w.wait_stopped(STOP_GRACE_S.get(w.role, 20.0))
        if self.zygote is not None:
            self.zygote.close()


class DataDirBusy(OSError):
    """Another local deployment holds the data dir."""


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One local deployment (replay, demo) per data dir at a time: two replays
    into one dir both ran, each claimed nearly every event as its own, and the
    last writer's engine state won. The lock goes with the process, however
    it ends."""
    import fcntl

    private_dir(data_dir)  # 0700 where deepwatch makes it: the findings, the engine state, the logs
    # 0600: another local user who could open it could flock it too, and hold off every run here
    owner_only(data_dir / ".deepwatch.lock", "lock file")
    f = open(data_dir / ".deepwatch.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DataDirBusy(f"another deepwatch replay or demo ({holder}) is running on {data_dir}; wait for it to "
                          "end, or give this one a --data-dir of its own") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}")
    f.flush()
    try:
        yield
    finally:
        f.close()  # closing releases the lock


def start_cluster(settings: Settings, stack: ExitStack, *, log_dir: Path | None = None) -> Cluster:
    stack.enter_context(data_dir_lock(Path(settings.data_dir)))
    if log_dir is None:
        # the data dir's own: narrowed when an older deepwatch left it 0755, which hides the 0644 logs
        # it wrote there too (they are not walked one by one)
        log_dir = own_dir(Path(settings.data_dir) / "logs", "log directory")
    else:
        private_dir(log_dir)
    t0 = time.monotonic()
    # First: the zygote imports what every worker needs while the broker starts
    # (the console script may have started it already, while the CLI imported).
    zygote = take_prestarted()
    if settings.local_workers != "fork" and zygote is not None:
        zygote.discard()
        zygote = None
    if settings.local_workers == "fork":
        zygote = zygote or Zygote()
        stack.callback(zygote.close)  # also when the broker fails to start; Cluster.stop closes it after the workers
    broker = None
    if settings.broker == "embedded":
        broker = stack.enter_context(EmbeddedBroker(log_dir))
        broker_url, bootstrap = broker.url, broker.bootstrap
        if settings.kafka.quirks == "auto":
            # We started it, so we know it is Tansu: each worker would otherwise
            # import an admin client and ask the broker (measured: 0.15-0.7 s
            # of every worker's start-up, more on a busy machine).
            settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"quirks": "tansu"})})
    else:
        broker_url, bootstrap = settings.broker, bootstrap_of(settings.broker)
    t1 = time.monotonic()
    ensure_topics(bootstrap, topic_specs(settings), settings=settings)
    cluster = Cluster(settings, broker_url, bootstrap, log_dir, zygote=zygote, broker=broker)
    cluster.timings.update(broker_start=t1 - t0, topics=time.monotonic() - t1)
    stack.callback(cluster.stop)
    return cluster


def _tail(path: Path, n: int) -> str:
    """The last ``n`` bytes of a log ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _error_records(log: str) -> Iterator[dict]:
    """The error and critical records of a worker's JSON log, in order (other lines skipped)."""
    for line in log.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("level") in ("error", "critical"):
            yield doc


def crash_cause(log: str) -> str | None:
    """Why a worker crashed, from its JSON log: the first error record that
    carries an exception (``msg: the exception's last line``), else the first
    error record; None when it logged none. The first, not the last: a crash
    is followed by shutdown errors that only echo it."""
    first: str | None = None
    for doc in _error_records(log):
        msg = str(doc.get("msg", ""))[:300]
        exc = [x for x in str(doc.get("exc") or "").splitlines() if x.strip()]
        if exc:
            return f"{msg}: {exc[-1].strip()[:300]}" if msg else exc[-1].strip()[:300]
        first = first or msg
    return first


class WorkerExited(RuntimeError):
    """A local worker ended while the command needed it; the message says why
    when the worker did (its last ``error:`` line, else its first logged
    exception: ``crash_cause``), else shows its log's tail."""


@dataclass
class ReplaySummary:
    events: int
    produced: int
    refused_at_ingest: int
    processed: int
    sightings: int
    dead_letters: dict[str, int]
    clusters: int
    alerts: int
    seconds: float
    events_per_second: float
    alert_latency_s: list[float]
    complete: bool
    # Added for the throughput bench; seconds. ``seconds`` runs from the moment
    # the pipeline workers are ready (the feed is produced while they start)
    # until everything replay waits for has landed;
    # ``ingest_seconds`` until every event was a sighting or dead letter.
    ingest_seconds: float | None = None
    models_pending: int = 0  # clusters still waiting for a model result when replay returned
    timings: dict[str, float] = field(default_factory=dict)  # start-up and shutdown phases
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # per role, per stage (summed)
    workers: int | None = None  # pipeline worker processes that ran
    # This run's events by how they ended: sighting (a post this run stored
    # first), duplicate (its post was already stored, by an earlier run or an
    # earlier copy in this feed), dead_letter. ``sightings``, ``dead_letters``,
    # ``clusters`` and ``alerts`` count the whole store, which earlier runs
    # into the same data dir add to.
    run_outcomes: dict[str, int] = field(default_factory=dict)
    run_dead_letters: dict[str, int] = field(default_factory=dict)  # this run's dead letters, "stage:reason" -> count
    # Clusters already waiting for a model result when this run started (an
    # earlier run's, e.g. with --no-wait-models, whose requests its broker
    # took with it): asked again by this run (``ask_models_again``) and waited
    # for like its own; ``models_pending`` counts those still waiting at the end.
    models_pending_at_start: int = 0
    # This run's alerts by where their webhook deliveries stand (delivered, failed, rejected,
    # queued; an alert sent to several hooks under its least settled), as the run ended: replay
    # sends each once and ends before a redelivery round. Empty counts without webhooks.
    run_alert_deliveries: dict[str, int] = field(default_factory=dict)
    # Events replay sent again after the stream stood still (``Resends``); it waits for both copies
    # of each to end. ``resent_unsettled``: those with a copy that had not ended when it stopped
    # waiting for it; the counts above are taken after the workers stopped, and hold what the
    # other copy had done by then. With --broker, a copy left in the topic is read by the next
    # worker of the group and may still change its event's outcome (a dead letter to a sighting).
    resent: int = 0
    resent_unsettled: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


@dataclass
class Resends:
    """What ``wait_until_processed`` sent again, as it stopped waiting.
    ``events``: events it sent again after a stall (each once). Such an
    event has two copies in the pipeline, the original and the resend; the
    first to end makes it count as ended, and the other may still change
    its outcome (a sighting replaces the event's dead letter: one outcome
    per event), so the wait goes on until both have ended. ``unsettled``:
    of those events, the ones with a copy that had not ended when the wait
    gave up on it (``stall_s`` without any outcome landing): lost in a
    worker (why it was sent again), or still on its way."""

    events: int = 0
    unsettled: int = 0


def wait_until_processed(
    cluster: Cluster, offsets: set[tuple[int, int]], *, timeout_s: float,
    on_progress: Callable[[int], None] | None = None, models: bool = False,
    produced: Produced | None = None, stall_s: float | None = None, marks: dict[str, float] | None = None,
    models_stall_s: float | None = None, resends: Resends | None = None,
) -> bool:
    """True once every produced event is a sighting or a dead letter in the
    store, and the derived work (alerts, model results) has landed too.

    With ``produced`` given, only rows written for its run count (the
    ``deepwatch-run`` header): a fresh embedded broker over an existing data
    dir reuses (partition, offset) pairs, and rows an earlier run left there
    must not pass for this run's work.

    With ``produced`` given, events still missing after ``stall_s`` without
    any progress are sent again, once; by default (None) ``stall_s`` is
    ``resend_stall_s`` of the cluster's settings, so an event still being
    fetched is not sent again. ``marks`` (if given) gets
    ``events_done``: the monotonic time every event was accounted for.
    Workers re-read what Faust drops around an assignment and partitions
    that stall (``streams.safe_commits``, ``streams.stall_guard``); the
    resend is the last safety net behind them, and costs nothing: every
    stage is idempotent on the event id. An event sent again counts as
    ended once either copy has, but the wait is over only once both have
    (or no outcome at all landed for ``stall_s``: a copy lost in a worker
    never ends): the copy that ends last may still change the event's
    outcome, and a summary taken before it said a dead letter that a
    sighting replaced a moment later. ``resends`` (if given) gets what was
    sent again and what of it had not ended (``Resends``).

    With ``models``, every cluster waiting for a model result is waited
    for, until none is left or none has landed for ``models_stall_s``
    (``MODELS_STALL_S``); clusters an earlier run left waiting are among
    them, asked again when the run started (``ask_models_again``).

    Once every event is accounted for and ``models`` are awaited, the detect
    role's threads are reniced to 0 (``Cluster.renice``): the pipeline is
    idle, the model tail gets the cores."""
    if models_stall_s is None:
        models_stall_s = MODELS_STALL_S
    if stall_s is None:
        stall_s = resend_stall_s(cluster.settings)
    store = open_findings(cluster.settings.findings.url, cluster.settings.data_dir, cluster.settings)
    topic = cluster.settings.topic("events")
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    last_models, models_change = -1, time.monotonic()
    seen: set[tuple[int, int]] = set()
    high = 0
    done_set: set[tuple[int, int]] = set()
    resent: set[tuple[int, int]] = set()  # originals sent again
    resent_as: dict[tuple[int, int], tuple[int, int]] = {}  # a resend's offset -> its original's
    # copies of resent events (originals and resends) not ended yet, and when an outcome last landed
    open_copies: dict[tuple[int, int], tuple[int, int]] = {}  # a copy's offset -> its original's
    last_landed = time.monotonic()
    gave_up = False
    reniced = False

    def settled() -> None:
        if resends is not None:
            resends.events = len(resent)
            resends.unsettled = len(set(open_copies.values()))

    try:
        while time.monotonic() < deadline:
            cluster.check_workers()
            if produced is not None:
                new, high = store.run_processed_since(produced.run, topic, high)
            else:
                new, high = store.processed_since(topic, high)
            seen |= new
            if new:
                last_landed = time.monotonic()
                for po in new:
                    open_copies.pop(po, None)
            # Counted as rows arrive, not by scanning every offset each poll
            # (a million-event feed would cost the poll loop a core).
            for po in new:
                if po in offsets:
                    done_set.add(po)
                elif po in resent_as:
                    done_set.add(resent_as[po])
            done = len(done_set)
            if on_progress and done != last:
                on_progress(done)
            if done != last:
                last, last_change = done, time.monotonic()
            if produced is not None and done < len(offsets) and time.monotonic() - last_change > stall_s:
                missing = sorted(offsets - done_set - resent)
                if missing:
                    cause = cluster.last_error()
                    log.warning("events unprocessed without progress; resending them (idempotent)"
                                + (f"; the workers' last error: {cause}" if cause else ""),
                                extra={"count": len(missing), "offsets": missing[:20]})
                    read_back = produced.read_back
                    assert read_back is not None, "resends need the producer's read_back"
                    again = produce_lines(((produced.origin[o], read_back(produced.origin[o])) for o in missing),
                                          cluster.bootstrap, cluster.settings, run=produced.run, read_back=read_back)
                    original_at = {produced.origin[o]: o for o in missing}
                    for po, at in again.origin.items():
                        resent_as[po] = original_at[at]
                        if po in seen:
                            done_set.add(original_at[at])
                        else:
                            open_copies[po] = original_at[at]
                    open_copies.update((o, o) for o in missing if o not in seen)
                    resent.update(missing)
                    last_change = time.monotonic()
            if done == len(offsets):
                now = time.monotonic()
                if marks is not None:
                    marks.setdefault("events_done", now)
                if open_copies and not gave_up:
                    if now - last_landed <= stall_s:
                        time.sleep(EVENTS_POLL_S)  # the other copy of an event sent again may still change it
                        continue
                    gave_up = True
                    log.warning("copies of events sent again did not end; not waiting for them any longer (their "
                                "events are counted by the copy that ended)",
                                extra={"events": len(set(open_copies.values())), "stall_s": stall_s,
                                       "offsets": sorted(open_copies)[:20]})
                if models and not reniced:
                    reniced = True
                    cluster.renice("detect", 0)  # the pipeline is idle now: the models get the cores
                looked = time.monotonic()
                pending = store.pending_work()
                looked_s = time.monotonic() - looked
                if pending["alerts"] == 0 and (not models or pending["models"] == 0):
                    settled()
                    return True
                if pending["models"] != last_models:
                    last_models, models_change = pending["models"], now
                elif pending["alerts"] == 0 and now - models_change > models_stall_s:
                    log.warning("model results stopped arriving; not waiting for them any longer",
                                extra={"clusters_pending": pending["models"], "stall_s": models_stall_s})
                    settled()
                    return True
                # What is left lands on its own: looked at more often, the command
                # returns sooner after the last result. A look scans the clusters
                # (~0.1 s at 200,000 of them in SQLite, a few requests to
                # Elasticsearch), so it takes at most a third of the time: the
                # models it waits for need the cores more.
                time.sleep(max(DERIVED_POLL_S, 2 * looked_s))
                continue
            time.sleep(EVENTS_POLL_S)
        settled()
        return False
    finally:
        store.close()


def ask_models_again(cluster: Cluster) -> int:
    """Clusters the store shows waiting for a model result before this run
    produced anything: an earlier run's, whose requests went with its broker
    (``--no-wait-models``, a stop before the models answered). Replay waits
    for every pending cluster, so these would hold it up for
    ``MODELS_STALL_S`` and stay pending for good. When there are any, one
    ``resume`` op goes to ``cluster-ops``: the single writer then starts even
    if none of this run's events reaches it (a feed already stored), and,
    seeding its table from the engine state over a fresh broker, asks the
    models again for each of them (``ClusterStage._ask_again``). Over a
    broker that kept its topics their requests are still queued, and the op
    changes nothing. Call before the workers start. Returns the count."""
    settings = cluster.settings
    store = open_findings(settings.findings.url, settings.data_dir, settings)
    try:
        pending = store.count_models_pending()
    finally:
        store.close()
    if not pending:
        return 0
    from kafka.errors import KafkaError

    from streams.broker import kafka_producer
    from streams.records import ClusterOp

    producer = kafka_producer(cluster.bootstrap, settings, client_id="deepwatch-replay", acks="all")
    try:
        producer.send(settings.topic("cluster-ops"), key=b"ops", value=ClusterOp(kind="resume").dumps()).get(timeout=30)
        log.info("clusters of an earlier run wait for a model result; asking again", extra={"clusters": pending})
    except KafkaError as e:  # not fatal: a sighting of the run starts the writer too, else the wait ends stalled
        log.warning("could not send the resume op; clusters of an earlier run may not be asked again",
                    extra={"clusters": pending, "error": f"{type(e).__name__}: {e}"})
    finally:
        producer.close(timeout=5)
    return pending


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere), so
    a command can report what its own imports cost before its first line ran."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def summarize(settings: Settings, events: int, produced: set[tuple[int, int]], refused: int, seconds: float, complete: bool,
              run: str | None = None, ingest_seconds: float | None = None,
              started_at: datetime | None = None) -> ReplaySummary:
    """The run's summary. ``alert_latency_s`` holds the alerts raised from
    ``started_at`` on (when given): this run's, not those an earlier run left
    in the data dir; the counts are the store's totals. The store counts
    them, and answers for this run's alerts, events and dead letters by
    their time, offsets and ids: what the summary holds in memory is the
    run's size, whatever earlier runs left in the store (the counts still
    scan: SQLite groups the dead letters and counts the live clusters)."""
    store = open_findings(settings.findings.url, settings.data_dir, settings)
    try:
        dls = store.dead_letter_counts()
        latencies = []
        for a in store.alerts_created_since(started_at):
            if a.trigger_ingested_at and a.created_at:
                t0 = a.trigger_ingested_at
                t1 = a.created_at
                if started_at is None or t1 >= started_at:
                    latencies.append(round((t1 - t0).total_seconds(), 3))
        outcomes: dict[str, int] = {}
        run_dls: dict[str, int] = {}
        if run is not None:
            topic = settings.topic("events")
            ended = store.run_outcomes(run, topic)
            done = produced & ended.keys()
            # the dead letters this run may have left: of its failed events, and where those
            # without an event id sat; what follows reads only these
            dead_at = {po for po in done if ended[po] == ("dead_letter", None)}
            records = store.dead_letters_of({ended[po][1] for po in done if ended[po][0] == "dead_letter"
                                             and ended[po][1]}, topic, dead_at)
            kept = {(d.event_id, d.source.partition, d.source.offset) for d in records
                    if d.source is not None and d.source.topic == topic}
            mine = [_as_stored(store, ended[po], po, kept) for po in done]
            # this run's dead letters: by event id, or where a line had none by where it sat (a
            # dead letter is one per event across runs, and a fresh broker reuses offsets)
            dead_ids = {eid for outcome, eid in mine if outcome == "dead_letter" and eid}
            for d in records:
                src = d.source
                if d.event_id in dead_ids or (
                        src is not None and src.topic == topic and (src.partition, src.offset) in dead_at):
                    run_dls[f"{d.stage}:{d.reason}"] = run_dls.get(f"{d.stage}:{d.reason}", 0) + 1
            # this run's posts: stored by any copy of its own, a resend's too (that copy's offset is not
            # in ``produced``, and the original's reads "duplicate" when its failure came after)
            run_posts = {eid for outcome, eid in ended.values() if outcome == "sighting"}
            posts = {eid for outcome, eid in mine if outcome in ("sighting", "duplicate") and eid in run_posts}
            stored = sum(1 for outcome, _ in mine if outcome in ("sighting", "duplicate"))
            # a post repeated within the run counts once as new, its repeats as already stored,
            # however the race between its copies went
            outcomes = {"sighting": len(posts), "duplicate": stored - len(posts),
                        "dead_letter": sum(1 for outcome, _ in mine if outcome == "dead_letter")}
            processed = len(mine)
        else:
            processed = len(store.processed_among(settings.topic("events"), produced))
        return ReplaySummary(
            events=events, produced=len(produced), refused_at_ingest=refused, processed=processed,
            sightings=store.count_sightings(), dead_letters=dls, clusters=store.count_clusters(),
            alerts=store.count_alerts(), seconds=round(seconds, 2),
            events_per_second=round(len(produced) / (ingest_seconds or seconds), 1) if seconds else 0.0,
            alert_latency_s=latencies, complete=complete,
            ingest_seconds=None if ingest_seconds is None else round(ingest_seconds, 2),
            models_pending=store.count_models_pending(), run_outcomes=outcomes, run_dead_letters=run_dls,
        )
    finally:
        store.close()


def _as_stored(store: IdentityCheck, ended: tuple[str, str | None], po: tuple[int, int],
               kept: set[tuple[str | None, int, int]]) -> tuple[str, str | None]:
    """How the event at ``po`` (``ended``: its recorded outcome and event id)
    stands in the store now: a failure the event's sighting has since
    replaced (one outcome per event: the sighting of a later copy deletes
    it) reads as that sighting. The store rewrites where the failure it
    deleted sat; this reads an earlier failure of the event, which a later
    one replaced first, the same way. A dead letter stored from this offset
    (``kept``: event id, partition, offset of each) stays one, a conflict
    beside its id's sighting too; the store is asked only about the others."""
    outcome, eid = ended
    if outcome != "dead_letter" or eid is None or (eid, *po) in kept or store.sighting_identity(eid) is None:
        return outcome, eid
    return "sighting", eid
