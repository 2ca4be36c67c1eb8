"""Prometheus metrics exposed by every worker (``metrics_port`` setting), and
the worker's liveness on the same port (``/healthz``). Names are a contract
with dashboards/ and the alert rules."""

from __future__ import annotations

import errno
import io
import logging
import socket
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

# No `<name>_created` series beside each counter, histogram and summary (a sixth of
# every worker's series, read by no panel or rule). prometheus_client checks the flag
# when it is scraped, so this covers the metrics every module defines, wherever they
# are defined; every process that serves /metrics does it through serve() below. The
# image also sets PROMETHEUS_DISABLE_CREATED_SERIES for processes that export alone.
disable_created_metrics()

EVENTS = Counter("deepwatch_events_total", "Events handled, by stage and outcome", ["stage", "outcome"])
DEAD_LETTERS = Counter("deepwatch_dead_letters_total", "Events sent to the dead-letter topic", ["stage", "reason"])
CLUSTERS = Gauge("deepwatch_clusters", "Live clusters in the cluster engine's index")
CLUSTER_MEMBERS = Gauge("deepwatch_cluster_members", "Distinct images in the cluster engine's index")
ALERTS = Counter("deepwatch_alerts_total", "Alerts raised", ["level"])
MODEL_REQUESTS = Counter("deepwatch_model_requests_total", "Model requests the cluster stage sent to the detect role "
                         "(a cluster's first copy, a clearly better copy, or one asked again)")
WEBHOOKS = Counter("deepwatch_webhook_deliveries_total", "Webhook delivery attempts (after their retries), live and "
                   "redelivered, by outcome: delivered (once per alert and target), failed, rejected", ["outcome"])
# From the findings store, set alike by every worker (streams.webhook_redelivery.Redeliverer.refresh_gauge);
# target = streams.webhooks.hook_key (hook:NAME or scheme://host:port#hash: no token).
WEBHOOK_UNDELIVERED = Gauge("deepwatch_webhook_undelivered", "Webhook deliveries not delivered, per target and "
                            "status: queued (being sent), failed (redelivery retries), rejected (waits for an "
                            "operator: deepwatch redeliver)", ["target", "status"])
# Rare events' series exist at 0 from the start: a series born at 1 hides its
# first event from increase() and from alert rules (dashboards/queries.counted).
ALERTS.labels("1")
for _outcome in ("delivered", "failed", "rejected"):
    WEBHOOKS.labels(_outcome)
STAGE_SECONDS = Histogram(
    "deepwatch_stage_seconds",
    "Seconds of work per stage: an event's (fetch, hashes, detectors, analyze, blob, dedupe, serialize, send), "
    "a cluster op's share of its batch (cluster), a model answer's (detect), a whole sink batch, retries included "
    "(sink)",
    ["stage"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STAGE_LAG = Histogram(
    "deepwatch_stage_lag_seconds", "Age of a message when its stage takes it up (wall clock minus the message's "
    "broker timestamp): where a backlog is waiting",
    ["stage"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def observe_lag(stage: str, broker_timestamp: float | None) -> None:
    """Record ``STAGE_LAG`` for a message with this broker timestamp (seconds;
    a missing one is not a lag of 56 years)."""
    if broker_timestamp:
        STAGE_LAG.labels(stage).observe(max(0.0, time.time() - broker_timestamp))


OFFSET_REREADS = Counter("deepwatch_offset_rereads_total", "Stream partitions read again from an offset, by why: "
                         "dropped (a record skipped before processing), stalled (nothing read while records waited)",
                         ["topic", "why"])
EVENT_TO_ALERT_SECONDS = Histogram(
    "deepwatch_event_to_alert_seconds", "Wall time from ingest of the triggering event to the alert",
    # past 60 s too: a p95 of "60" would otherwise stand for anything slower
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)


# A worker's event loop beats every HEARTBEAT_S (worker.py); /healthz on the
# metrics port answers 503 once it has been silent for LIVENESS_S. The metrics
# server runs in its own thread, so /metrics alone answers even while the loop
# is stuck: a liveness probe needs the beat.
HEARTBEAT_S = 5.0
LIVENESS_S = 120.0
LOOP_HEARTBEAT = Gauge("deepwatch_loop_heartbeat_timestamp_seconds",
                       "Unix time of the worker event loop's last heartbeat")
_last_beat: float | None = None  # monotonic; None: no heartbeat yet (starting, or a process without one)
# Why the worker is going away (a crash, a consumer that died, a stop), once it
# is: /healthz answers 503 from then on. Its event loop may well go on beating
# while the app stops (a detect worker whose broker vanished took 60 s), and a
# probe must not read that as a worker at work.
_stopping: str | None = None


def stopping(reason: str) -> None:
    """The worker has begun to stop, or crashed (``reason``: why, one line);
    the first reason given is kept."""
    global _stopping
    if _stopping is None:
        _stopping = reason


def beat() -> None:
    """Called from the event loop: it is alive."""
    global _last_beat
    _last_beat = time.monotonic()
    LOOP_HEARTBEAT.set_to_current_time()


async def beat_forever() -> None:
    """Beat every ``HEARTBEAT_S`` from a server's own event loop (the desk,
    the ingest endpoint), as a worker's timer does: /healthz on the metrics
    port, which a flood of clients on the server's own port cannot starve,
    then says whether that loop still runs."""
    import asyncio

    while True:
        beat()
        await asyncio.sleep(HEARTBEAT_S)


def liveness() -> tuple[int, str]:
    """(HTTP status, text) for /healthz."""
    if _stopping is not None:
        return 503, f"stopping: {_stopping}"
    if _last_beat is None:
        return 200, "ok: no heartbeat yet"
    age = time.monotonic() - _last_beat
    if age > LIVENESS_S:
        return 503, f"event loop silent for {age:.0f} s (limit {LIVENESS_S:.0f} s)"
    return 200, f"ok: event loop beat {age:.1f} s ago"


# A thread per connection: at most MAX_CONNECTIONS at once, at most
# MAX_PER_CLIENT of them from one address, and each closed unless its request
# head (request line and headers) is in within HEAD_S of the connection
# opening. Without the overall deadline a client trickling a byte within each
# IDLE_S held its slot for good, and 64 such connections from one client shut
# every probe and scrape out; without the per-address cap it could still keep
# every slot taken by reconnecting. Past a cap a connection is closed at once;
# Prometheus and probes use one or two (one request a connection).
MAX_CONNECTIONS = 64
MAX_PER_CLIENT = 8
IDLE_S = 10.0
HEAD_S = 10.0


class _Server(ThreadingWSGIServer):
    # socketserver's 5: under a burst of connections a probe's SYN was dropped
    # and retried a second or more later, the accept loop being fast enough
    request_queue_size = 128

    def server_activate(self) -> None:
        super().server_activate()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._per_client: dict[str, int] = {}
        self._per_client_lock = threading.Lock()

    def _take(self, client: str) -> bool:
        with self._per_client_lock:
            held = self._per_client.get(client, 0)
            if held >= MAX_PER_CLIENT:
                return False
            if not self.slots.acquire(blocking=False):
                return False
            self._per_client[client] = held + 1
            return True

    def _give_back(self, client: str) -> None:
        with self._per_client_lock:
            held = self._per_client.pop(client, 1) - 1
            if held > 0:
                self._per_client[client] = held
            self.slots.release()

    def process_request(self, request, client_address) -> None:
        client = client_address[0]
        if not self._take(client):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: none will give the slot back
            self._give_back(client)
            raise

    def process_request_thread(self, request, client_address) -> None:
        # ThreadingMixIn's, with the slot given back before the socket is
        # closed: a client that saw the close may connect again at once
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._give_back(client_address[0])
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # socketserver prints the traceback to stderr (the process's JSON log)
        error = sys.exc_info()[1]
        if isinstance(error, (TimeoutError, ConnectionError)):  # a client silent past IDLE_S or HEAD_S, or gone
            return
        log.warning("metrics request from %s failed", client_address[0], exc_info=True)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _HeadReads(io.RawIOBase):
    """The connection's socket for reading, each read waiting at most
    ``idle_s`` and not past ``deadline`` (monotonic; None: no deadline, the
    socket's own timeout)."""

    def __init__(self, sock: socket.socket, deadline: float | None, idle_s: float):
        self.sock, self.deadline, self.idle_s = sock, deadline, idle_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request head not in within {HEAD_S:g} s")
            self.sock.settimeout(min(left, self.idle_s))
        return self.sock.recv_into(buffer)


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_S  # per read and write of the connection's socket

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain makefile(): reads go through the deadline instead
        self.rfile = io.BufferedReader(_HeadReads(self.connection, time.monotonic() + HEAD_S, self.timeout))

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # The head is in (or refused): the answer is written with the idle limit a write.
        self.rfile.raw.deadline = None
        self.connection.settimeout(self.timeout)
        return ok

    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: not log lines
        pass


def serve(port: int, host: str | None = None) -> int:
    """Start /metrics and /healthz (``liveness``) in a daemon thread; port 0
    picks a free one. Bound to ``host``; without one, to every address for a
    port given (a worker's, for Prometheus to scrape) and to loopback for
    port 0. Returns the port."""
    from streams.net_errors import PortInUse

    metrics_app = make_wsgi_app()

    def app(environ: dict, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            status, text = liveness()
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode()]
        return metrics_app(environ, start_response)

    try:
        bind = host or ("127.0.0.1" if port == 0 else "0.0.0.0")
        server_class = _IPv6Server if ":" in bind else _Server  # the desk may listen on ::1
        server = make_server(bind.strip("[]"), port, app, server_class, handler_class=_QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(f"metrics port {port} is in use by another process; pick another --metrics-port "
                            "(or DEEPWATCH_METRICS_PORT), or 0 for any free one") from None
        raise
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server.server_port


class OldestWait:
    """Since when each wait of this process on one store has lasted (a sink
    write retrying, an event held for the blob store or a findings lookup):
    ``gauge`` reads the oldest when scraped, 0 when none waits. Each waiter
    keeps its own entry, so one that is done does not reset the clock of
    another still waiting. Thread-safe: bulk writes and blob writes wait in
    threads."""

    def __init__(self, gauge: Gauge):
        self._since: dict[object, float] = {}
        self._lock = threading.Lock()
        gauge.set_function(self.seconds)

    def waiting(self, who: object) -> None:
        with self._lock:
            self._since.setdefault(who, time.monotonic())

    def done(self, who: object) -> None:
        with self._lock:
            self._since.pop(who, None)

    def seconds(self) -> float:
        with self._lock:
            oldest = min(self._since.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest


SINK_ITEMS = Counter("deepwatch_sink_items_total", "Findings-store bulk items, by index and outcome "
                     "(ok, duplicate, retried, dead_letter)", ["index", "outcome"])
SINK_BEHIND_SECONDS = Gauge("deepwatch_sink_behind_seconds", "How long the findings sink has been retrying "
                            "(0 = keeping up); while > 0 its Faust agents consume nothing")
BLOB_HELD_SECONDS = Gauge("deepwatch_blob_store_held_seconds", "How long the oldest picture this worker holds for "
                          "the blob store has been waiting (0 = none held): its disk full, over quota, read-only or "
                          "failing. Held events are retried with backoff, not dead-lettered; once every analysis "
                          "slot holds one, the analyze stage consumes nothing")
BLOB_WRITE_FAILURES = Counter("deepwatch_blob_write_failures_total", "Blob store writes that failed for a reason "
                              "that passes (ENOSPC, EDQUOT, EIO, EROFS, ...), each held and tried again")
LOOKUP_HELD_SECONDS = Gauge("deepwatch_findings_lookup_held_seconds", "How long the oldest event this worker holds "
                            "for the findings store's duplicate lookup has been waiting (0 = none held): the SQLite "
                            "file locked or its disk failing, Elasticsearch unreachable, overloaded or refusing the "
                            "credentials. Held events are looked up again with backoff, not dead-lettered; once "
                            "every analysis slot holds one, the analyze stage consumes nothing")
LOOKUP_FAILURES = Counter("deepwatch_findings_lookup_failures_total", "Duplicate lookups in the findings store that "
                          "failed for a reason that passes (SQLITE_BUSY, SQLITE_IOERR, Elasticsearch unavailable, "
                          "...), each held and tried again")
# streams.stage.AnalyzeStage._check_event_time: a producer whose clock is slow stamps records
# (CreateTime) before their posts were made, and a sighting counts at the earlier of the two.
BROKER_TIME_BEHIND = Counter("deepwatch_broker_timestamp_behind_total", "Events whose broker timestamp (the "
                             "producer's clock, on a CreateTime topic) is over a minute before their posted_at, by "
                             "topic and what was done: worker_clock = a live post, timed by this worker's clock "
                             "instead; kept = a backlog, where a slow clock and a post dated ahead look alike",
                             ["topic", "action"])
FETCH_HOST_PAUSES = Counter("deepwatch_fetch_host_pauses_total", "Image hosts paused after timing out "
                            "fetch.breaker_timeouts times in a row (streams.host_breaker)")
