"""Produce a JSONL feed of schema-v1 events to the events topic.

Lines are sent as they are, malformed ones included: judging them is the
pipeline's job (they end up as dead letters with a reason), and the producer
must not silently drop input. Only lines too large for the broker are refused
here, and they too become dead letters.
"""

from __future__ import annotations

import os
import select
import stat
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from streams.held_signals import HeldSignals
from streams.records import DeadLetter
from streams.settings import Settings
from streams.validate import MAX_EVENT_BYTES, event_id_of

MAX_MESSAGE_BYTES = MAX_EVENT_BYTES  # just under Kafka's default max.message.bytes (1 MiB + 12); the worker's limit too
SETTLE_BYTES = 64 << 20  # ``produce_lines`` confirms delivery after this many bytes of events
RUN_HEADER = "deepwatch-run"  # names the producing run, so completion is judged per run
# No acknowledgement for this long while events wait for one: the broker is
# gone. (kafka-python's flush() waits for ever: a broker that died mid-feed
# hung `deepwatch ingest` and replay's resends.)
ACK_STALL_S = 30.0


def new_run_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Produced:
    offsets: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset) on the events topic
    # Where each event sent there came from (a byte position in the feed);
    # ``read_back`` turns it into the event again, for resends. Events are
    # not held: a feed of large inline images would fill memory.
    origin: dict[tuple[int, int], int] = field(default_factory=dict)
    read_back: Callable[[int], bytes] | None = None
    refused: int = 0
    lines: int = 0
    sent: int = 0  # events the broker acknowledged (``offsets`` holds them too, when kept)
    run: str = field(default_factory=new_run_id)


DISCARD_CHUNK = 1 << 20  # an over-long line's rest is read and dropped this much at a time


def iter_lines_at(feed: Path, limit: int = MAX_MESSAGE_BYTES + 1,
                  tick: Callable[[], None] | None = None) -> Iterator[tuple[int, bytes]]:
    """The feed's non-blank lines, stripped, each with the byte position it
    starts at (``line_at`` reads it again). A line longer than ``limit`` is
    never held whole (a feed may be one endless line): its first ``limit``
    bytes stand for it, as read (never stripped, whitespace and all), which
    ingest refuses as too large, as it would the line. Too large is decided
    on the raw line: stripping first cut an event padded with a megabyte of
    blanks and trailed by more text down to the event, accepted, the rest
    silently dropped.

    ``tick``: for a caller that holds Ctrl-C and SIGTERM while it reads
    (``produce_feed``: ``HeldSignals.deliver``), called after each
    ``DISCARD_CHUNK`` of an over-long line dropped, and, on a feed that is
    not a regular file (a pipe, a FIFO, a terminal), at least every
    ``POLL_S`` while the feed's writer sends nothing. An endless line (a
    pipe fed from /dev/zero) or a writer gone quiet then stops on a signal,
    instead of being read, or waited for, with the signal held for ever."""
    with _open_feed(feed, tick) as f:
        seekable = f.seekable()  # a pipe has no positions: its lines cannot be read back
        while True:
            at = f.tell() if seekable else -1
            line = f.readline(limit)
            if not line:
                return
            if len(line) == limit and not line.endswith(b"\n"):
                rest = f.readline(DISCARD_CHUNK)
                crlf_split = rest == b"\n" and line.endswith(b"\r")  # a CRLF cut at the limit: no byte too many
                while rest and not rest.endswith(b"\n"):
                    if tick is not None:
                        tick()
                    rest = f.readline(DISCARD_CHUNK)  # the rest of the over-long line, read and dropped
                if not crlf_split:
                    yield at, line  # over the limit whatever it holds: refused as too large
                    continue
            line = line.strip()
            if line:
                yield at, line


POLL_S = 0.2  # a feed that is not a regular file is waited on this long at most between ticks


def _open_feed(feed: Path, tick: Callable[[], None] | None):
    """The feed open for binary reading: a regular file as it is; with a
    ``tick``, anything else through ``_StreamReader``, which never waits on
    its writer without calling ``tick``."""
    if tick is None or not hasattr(select, "poll"):
        return open(feed, "rb")
    try:
        regular = stat.S_ISREG(os.stat(feed).st_mode)
    except OSError:
        regular = True  # open says what is wrong with it
    return open(feed, "rb") if regular else _StreamReader(feed, tick)


class _StreamReader:
    """``readline(limit)`` of a pipe, FIFO or terminal, for ``iter_lines_at``.
    A blocking read keeps waiting through Ctrl-C and SIGTERM while they are
    held (``HeldSignals`` notes them, and the read is resumed), so a writer
    that went quiet, or a FIFO nobody opened for writing yet, held the
    command past every signal. Here the feed is opened and read without
    blocking, and waited on at most ``POLL_S`` at a time, ``tick`` called
    between waits."""

    CHUNK = 1 << 16

    def __init__(self, feed: Path, tick: Callable[[], None]):
        # O_NONBLOCK: opening a FIFO no writer has opened yet returns at once
        self._fd = os.open(feed, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._tick = tick
        self._buf = bytearray()
        self._eof = False

    def __enter__(self) -> "_StreamReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return -1

    def _fill(self) -> None:
        """Read what the writer sent next, or note the end of the feed."""
        while True:
            self._tick()
            if not self._poll.poll(POLL_S * 1000):  # nothing yet (a FIFO without a writer polls so too)
                continue
            try:
                data = os.read(self._fd, self.CHUNK)
            except BlockingIOError:  # taken by another reader of the same pipe
                continue
            if data:
                self._buf += data
            else:  # every writer closed its end
                self._eof = True
            return

    def readline(self, limit: int) -> bytes:
        """As ``BufferedReader.readline(limit)``: up to and with the next
        newline, at most ``limit`` bytes, b"" at the end."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start, limit)
            if end >= 0:
                n = end + 1
                break
            if len(self._buf) >= limit or self._eof:
                n = min(limit, len(self._buf))
                break
            start = len(self._buf)
            self._fill()
        line = bytes(self._buf[:n])
        del self._buf[:n]
        return line


def iter_lines(feed: Path, limit: int = MAX_MESSAGE_BYTES + 1) -> Iterator[bytes]:
    """``iter_lines_at`` without the positions."""
    return (line for _, line in iter_lines_at(feed, limit))


def line_at(feed: Path, at: int, limit: int = MAX_MESSAGE_BYTES + 1) -> bytes:
    """The feed line that starts at byte ``at``, as ``iter_lines_at`` gave it."""
    with open(feed, "rb") as f:
        f.seek(at)
        return f.readline(limit).strip()


def produce_feed(feed: Path, bootstrap: str, settings: Settings, progress: Callable[[int], None] | None = None,
                 run: str | None = None, *, keep: bool = True, out: Produced | None = None) -> Produced:
    held = HeldSignals()  # the reader hands held signals over while it drops an over-long line
    return produce_lines(iter_lines_at(feed, tick=held.deliver), bootstrap, settings, progress, run=run, keep=keep,
                         read_back=lambda at: line_at(feed, at), out=out, held=held)


def count_lines(feed: Path) -> int:
    """Events in a feed, for progress bars (blank lines are not events)."""
    return sum(1 for _ in iter_lines_at(feed))


def produce_lines(
    lines: Iterable[tuple[int, bytes]], bootstrap: str, settings: Settings, progress: Callable[[int], None] | None = None,
    *, run: str | None = None, keep: bool = True, read_back: Callable[[int], bytes] | None = None,
    ack_stall_s: float = ACK_STALL_S, out: Produced | None = None, held: HeldSignals | None = None,
) -> Produced:
    """Produce raw event lines, each given with where it came from (an int
    ``read_back`` turns back into the line), and each with a
    ``deepwatch-run`` header naming this run. Also how replay resends
    stalled events: same keys, so same partitions, same run, and safe
    because every stage is idempotent on the event id.

    ``keep``: remember where each event landed and where it came from
    (``offsets``, ``origin``: replay waits for them and resends stalled
    ones); without it only ``sent`` is counted. Either way delivery is
    confirmed every ``SETTLE_BYTES``, so memory stays bounded by that, not
    by the feed.

    A broker that stops acknowledging for ``ack_stall_s`` ends it with a
    ``BrokerError`` saying how many events it confirmed. ``out``: the
    ``Produced`` to fill, so a caller interrupted (Ctrl-C) can say how far it got.
    ``held``: the ``HeldSignals`` to hold Ctrl-C and SIGTERM with, when
    ``lines`` delivers them too while it reads (``produce_feed``)."""
    import time

    from kafka.errors import KafkaError

    from streams.broker import BrokerError, kafka_producer  # here: workers import this module for RUN_HEADER alone

    producer = kafka_producer(bootstrap, settings, client_id="deepwatch-ingest", acks="all", linger_ms=5, retries=5,
                              max_request_size=MAX_MESSAGE_BYTES + 4096)
    if out is None:
        out = Produced(run=run, read_back=read_back) if run else Produced(read_back=read_back)
    else:
        out.read_back = read_back
    headers = [(RUN_HEADER, out.run.encode())]
    held = held if held is not None else HeldSignals()
    futures: deque = deque()  # (origin, send future) not yet counted in ``out``
    dead_futures: list = []  # dead letters for lines refused here: confirmed like events
    pending_bytes = 0

    def acked() -> None:
        """Wait until every pending send is answered, while answers keep coming."""
        done, changed = -1, time.monotonic()
        while True:
            now_done = sum(1 for _, f in futures if f.is_done)
            if now_done == len(futures) and all(f.is_done for f in dead_futures):
                return
            if now_done != done:
                done, changed = now_done, time.monotonic()
            elif time.monotonic() - changed > ack_stall_s:
                raise BrokerError(
                    f"the broker at {bootstrap} stopped acknowledging (nothing for {ack_stall_s:g}s): "
                    f"{out.sent + now_done} of {out.lines} events confirmed, run {out.run}; "
                    "re-run once it is back (event ids make resent events harmless)")
            held.deliver()
            try:
                producer.flush(timeout=min(1.0, ack_stall_s))
            except KafkaError:  # not all answered yet
                pass

    def settle() -> None:
        nonlocal pending_bytes
        acked()
        for f in dead_futures:
            f.get(timeout=0)  # raises what the broker answered, if it refused it
        dead_futures.clear()
        while futures:
            at, f = futures[0]
            md = f.get(timeout=0)  # raises what the broker answered, if it refused it
            futures.popleft()
            out.sent += 1
            if keep:
                out.offsets.add((md.partition, md.offset))
                out.origin[(md.partition, md.offset)] = at
        pending_bytes = 0

    # Ctrl-C and SIGTERM land between sends, never inside one (streams.held_signals).
    with held:
        clean = False
        try:
            for at, line in lines:
                held.deliver()
                out.lines += 1
                eid = event_id_of(line)
                key = eid.encode() if eid else None
                if len(line) > MAX_MESSAGE_BYTES:
                    dl = DeadLetter.of("validate", "too_large",
                                       f"event is over {MAX_MESSAGE_BYTES} bytes; inline images are capped at ingest",
                                       line, event_id=eid)
                    dead_futures.append(producer.send(settings.topic("dead-letters"), key=key, value=dl.dumps(),
                                                      headers=headers))
                    out.refused += 1
                else:
                    futures.append((at, producer.send(settings.topic("events"), key=key, value=line, headers=headers)))
                    pending_bytes += len(line)
                    if pending_bytes >= SETTLE_BYTES:
                        settle()
                if progress:
                    progress(1)
            settle()
            clean = True
        except KafkaError as e:  # a send the broker refused or let expire
            raise BrokerError(f"the broker at {bootstrap} did not take the events ({type(e).__name__}: {e}): "
                              f"{out.sent} of {out.lines} confirmed, run {out.run}; re-run once it is back "
                              "(event ids make resent events harmless)") from None
        finally:
            if clean:
                producer.close()
            else:
                _abandon(producer)
                out.sent += sum(1 for _, f in futures if f.is_done and f.succeeded())
    return out


def _abandon(producer) -> None:
    """Close a producer whose queued events may never be acknowledged (the
    broker is gone, or the user pressed Ctrl-C): close() without a timeout
    waits for them for ever, and kafka-python's close(timeout) raises from its
    flush before it stops the sender thread (its __del__ then raises again)."""
    from kafka.errors import KafkaError

    try:
        producer.close(timeout=5)
    except KafkaError:
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
        producer._closed = True
