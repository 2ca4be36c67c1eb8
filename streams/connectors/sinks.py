"""Where connectors put mapped events: the pipeline's events topic, or
stdout as JSONL for ``--dry-run``."""

from __future__ import annotations

import logging
import sys
import threading
from typing import IO

from streams.broker import kafka_producer
from streams.ingest import MAX_MESSAGE_BYTES
from streams.records import DeadLetter, ImageEvent
from streams.settings import Settings

log = logging.getLogger("deepwatch.connectors")


class KafkaSink:
    """A long-lived producer with the same settings as ``streams.ingest``
    (acks=all, event id as key so a re-sent event lands on the same partition
    and the pipeline's idempotent stages absorb it).

    ``flush`` confirms what was sent through this object. Connectors that
    share one producer each take a ``channel()``: a flush that fails for one
    stream must not swallow another stream's unconfirmed sends, which that
    stream would then checkpoint past as if delivered."""

    def __init__(self, bootstrap: str, settings: Settings, *, client_id: str = "deepwatch-connector",
                 max_block_ms: int = 10_000, request_timeout_ms: int = 10_000, flush_timeout_s: float | None = None,
                 bootstrap_timeout_ms: int = 30_000, keep_offsets: bool = False, auto_create_topics: bool = True):
        """``auto_create_topics``: whether the producer's metadata requests may
        make a broker that allows it (Tansu does) create a missing topic, with
        the broker's default partition count rather than deepwatch's."""
        self.settings = settings
        self._producer = kafka_producer(
            bootstrap, settings, client_id=client_id, timeout_s=bootstrap_timeout_ms / 1000,
            acks="all", linger_ms=5, retries=5, max_request_size=MAX_MESSAGE_BYTES + 4096,
            max_block_ms=max_block_ms, request_timeout_ms=request_timeout_ms,
            allow_auto_create_topics=auto_create_topics,
        )
        self.timeout_s = flush_timeout_s or max(1.0, request_timeout_ms / 1000 * 3)
        self._owner = True
        self._init_pending(keep_offsets)

    def _init_pending(self, keep_offsets: bool) -> None:
        self._futures: list = []
        self._dead_futures: list = []
        # Sends and flushes run in worker threads (the emitter keeps them off the
        # event loop), other channels' at the same time. The producer is
        # thread-safe; this lock guards only the lists. A future is listed
        # before its send returns, so a flush confirms every send that returned
        # before it began; a send racing a flush lands in the next one.
        self._lock = threading.Lock()
        # (partition, offset) of every acknowledged event: for tests and benches that wait for them;
        # off by default, since a connector running for days would grow it by one entry per event
        self.keep_offsets = keep_offsets
        self.offsets: set[tuple[int, int]] = set()

    def channel(self) -> "KafkaSink":
        """A sink on the same producer whose ``flush`` confirms only its own sends."""
        other = object.__new__(KafkaSink)
        other.settings, other._producer, other.timeout_s, other._owner = self.settings, self._producer, self.timeout_s, False
        other._init_pending(self.keep_offsets)
        return other

    def send(self, event: ImageEvent) -> None:
        self.send_raw(event.event_id.encode(), event.dumps())

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Produce bytes as they are (the ingest endpoint sends the caller's validated line)."""
        # Not under the lock: this send may block up to max_block_ms, which must
        # not hold up another channel's flush.
        future = self._producer.send(self.settings.topic("events"), key=key, value=value)
        with self._lock:
            self._futures.append(future)

    def dead_letter(self, dl: DeadLetter) -> None:
        key = dl.event_id.encode() if dl.event_id else None
        future = self._producer.send(self.settings.topic("dead-letters"), key=key, value=dl.dumps())
        with self._lock:
            self._dead_futures.append(future)

    def flush(self) -> list[tuple[int, int]]:
        """Wait for acknowledgements; raises the first delivery error."""
        with self._lock:
            futures, self._futures = self._futures, []
            dead, self._dead_futures = self._dead_futures, []
        self._producer.flush(timeout=self.timeout_s)
        acked = []
        for f in futures:
            md = f.get(timeout=self.timeout_s)
            acked.append((md.partition, md.offset))
        for f in dead:
            f.get(timeout=self.timeout_s)
        if self.keep_offsets:
            self.offsets.update(acked)
        return acked

    def close(self) -> None:
        if self._owner:  # channels share the producer; its owner closes it
            self._producer.close(timeout=5)


class JsonlSink:
    """``--dry-run``: mapped events as JSONL on stdout; refusals as log lines."""

    def __init__(self, out: IO[str] | None = None, *, keep: bool = False):
        self.out = out or sys.stdout
        self.keep = keep  # tests read what was sent; a long dry run must not grow without bound
        self.events: list[ImageEvent] = []
        self.dead: list[DeadLetter] = []
        # Connectors sharing this sink (``channel`` is itself) write and flush
        # from worker threads: one line at a time, never interleaved.
        self._lock = threading.Lock()

    def send(self, event: ImageEvent) -> None:
        line = event.model_dump_json(exclude_none=True) + "\n"
        with self._lock:
            if self.keep:
                self.events.append(event)
            self.out.write(line)

    def dead_letter(self, dl: DeadLetter) -> None:
        if self.keep:
            with self._lock:
                self.dead.append(dl)
        log.warning("would dead-letter", extra={"event_id": dl.event_id, "stage": dl.stage, "reason": dl.reason,
                                                "detail": dl.detail})

    def channel(self) -> "JsonlSink":
        return self  # one stdout: nothing to keep apart

    def flush(self) -> None:
        with self._lock:
            self.out.flush()

    def close(self) -> None:
        with self._lock:
            self.out.flush()
