"""A connector's sends run off the event loop.

kafka-python's ``KafkaProducer.send`` blocks up to ``max_block_ms`` (10 s)
while it has no partitions for the topic (e.g. the broker restarted without
its topics and is unreachable again). Called on the event loop, that froze
every other connector of the process (their reads, keepalives), the metrics
beats and SIGTERM handling. The emitter now hands each send to a worker
thread, awaiting it before the next: same order, same rollback on failure.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from streams.connectors.base import ConnectorState, Emitter, Mapped, SinkError, UrlPolicy
from streams.connectors.sinks import KafkaSink
from streams.settings import Settings
from tests.connector_servers import mapped_frames

# Address literals: the URL policy decides without DNS.
PUBLIC_URL = "https://151.101.0.1/img/feed_fullsize/plain/{did}/{cid}@jpeg"  # passes
PRIVATE_URL = "http://127.0.0.1/img/{did}/{cid}@jpeg"  # refused (loopback): dead-lettered
BLOCK_S = 2.0  # how long the first send blocks, as kafka-python waiting for metadata
MAX_GAP_S = 1.0  # a loop tick may come this late at most while a send blocks (a loaded CI machine's ticks run late)


class BlockingSink:
    """The call (send or dead letter) numbered ``block_at`` (from 0) blocks
    ``BLOCK_S``, the others are quick, so sends overtaking each other would
    show as reordering. The one numbered ``fail_at`` raises, as kafka-python's
    KafkaTimeoutError would."""

    def __init__(self, block_at: int = 0, fail_at: int | None = None,
                 release: threading.Event | None = None):
        self.block_at, self.fail_at = block_at, fail_at
        self.release = release  # when given, the blocking call waits for it instead of BLOCK_S
        self.sent: list[str] = []
        self.dead: list[str] = []
        self.calls = 0
        self.threads: set[int] = set()

    def _call(self) -> None:
        self.threads.add(threading.get_ident())
        if self.calls == self.block_at and self.release is not None:
            assert self.release.wait(30), "the test never released the blocked send"
        else:
            time.sleep(BLOCK_S if self.calls == self.block_at else 0.01)
        self.calls += 1

    def send(self, event) -> None:
        fail = self.calls == self.fail_at
        self._call()
        if fail:
            raise TimeoutError(f"Failed to update metadata after {BLOCK_S} secs.")
        self.sent.append(event.event_id)

    def dead_letter(self, dl) -> None:
        self._call()
        self.dead.append(dl.event_id)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class InstantSink(BlockingSink):
    def _call(self) -> None:
        self.calls += 1


def make_emitter(tmp_path: Path, sink, name: str = "bluesky") -> Emitter:
    s = Settings(data_dir=tmp_path / "data")
    s.connectors.checkpoint_every = 10_000  # checkpoints only where the test asks
    s.connectors.checkpoint_interval_s = 3600
    state = ConnectorState(tmp_path / f"{name}-{id(sink)}.sqlite")
    return Emitter(name, name, state, sink, UrlPolicy(s.fetch), s.connectors)


async def with_ticker(work):
    """Run ``work()`` while another task ticks every 20 ms; (result or exception, gaps between ticks)."""
    done = asyncio.Event()
    gaps: list[float] = []

    async def tick():
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if done.is_set():
                return

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    try:
        return await work(), gaps
    except Exception as e:
        return e, gaps
    finally:
        done.set()
        await ticker


def apply_all(emitter: Emitter, frames: list[Mapped]):
    async def work():
        for m in frames:
            await emitter.apply(m)
        return None
    return work


def test_a_blocking_send_does_not_stall_the_loop_and_keeps_order(tmp_path):
    frames = mapped_frames(PUBLIC_URL)
    want = [e.event_id for m in frames for e in m.events]
    assert len(want) >= 3

    sink = BlockingSink()
    emitter = make_emitter(tmp_path, sink)
    result, gaps = asyncio.run(with_ticker(apply_all(emitter, frames)))
    assert result is None
    assert max(gaps) < MAX_GAP_S, f"the loop stalled {max(gaps):.2f}s during a send"
    assert sum(gaps) >= BLOCK_S  # the ticker did run through the blocking send
    assert threading.main_thread().ident not in sink.threads  # sent from a worker thread

    # The same outcome as sending on the loop: every event, in order, counted and pending.
    ref_sink = InstantSink()
    ref = make_emitter(tmp_path, ref_sink, "ref")
    asyncio.run(apply_all(ref, frames)())
    assert sink.sent == ref_sink.sent == want
    assert emitter.counts == ref.counts and "events_produced" not in emitter.counts  # sent, not yet confirmed
    assert emitter.state.pending == ref.state.pending == len(want)
    assert emitter.cursor == ref.cursor == str(frames[-1].cursor)
    asyncio.run(emitter.checkpoint())  # the broker confirms them: now they count as produced
    assert emitter.counts["events_produced"] == len(want)


def test_a_blocking_dead_letter_does_not_stall_the_loop(tmp_path):
    frames = mapped_frames(PRIVATE_URL)
    want = [e.event_id for m in frames for e in m.events]

    sink = BlockingSink()
    emitter = make_emitter(tmp_path, sink)
    result, gaps = asyncio.run(with_ticker(apply_all(emitter, frames)))
    assert result is None
    assert max(gaps) < MAX_GAP_S, f"the loop stalled {max(gaps):.2f}s during a dead letter"
    assert sink.dead == want and sink.sent == []
    assert emitter.state.pending == len(want)
    asyncio.run(emitter.checkpoint())  # dead letters count once the broker confirmed them
    assert emitter.counts["events_refused"] == len(want)


def test_a_send_that_fails_after_blocking_rolls_back_as_before(tmp_path):
    frames = mapped_frames(PUBLIC_URL)
    first, second, third = frames[0], frames[1], frames[2]
    n1, n2 = len(first.events), len(second.events)

    sink = BlockingSink(block_at=n1 + n2, fail_at=n1 + n2)  # the first event of the third frame
    emitter = make_emitter(tmp_path, sink)

    async def work():
        await emitter.apply(first)
        await emitter.checkpoint()  # the broker confirmed the first frame
        await emitter.apply(second)
        assert emitter.state.pending == n2 and emitter.cursor == str(second.cursor)
        await emitter.apply(third)

    err, gaps = asyncio.run(with_ticker(work))
    assert max(gaps) < MAX_GAP_S
    assert isinstance(err, SinkError) and isinstance(err.__cause__, TimeoutError)
    assert "Failed to update metadata" in str(err)
    # Rolled back: nothing unacknowledged is pending, the cursor is the last checkpoint's,
    # and nothing after the failed send was sent.
    assert emitter.state.pending == 0
    assert emitter.cursor == emitter.state.cursor("bluesky") == str(first.cursor)
    assert sink.sent == [e.event_id for e in first.events + second.events]
    assert not any(emitter.state.seen(e.event_id) for e in second.events + third.events)
    assert all(emitter.state.seen(e.event_id) for e in first.events)


def test_other_connectors_keep_running_while_one_send_blocks(tmp_path):
    # Two connectors in one process: the one with a quick sink finishes all
    # its frames while the other's first send is still blocked (held until
    # the quick one is done, so the test does not race a clock).
    frames = mapped_frames(PUBLIC_URL)
    release = threading.Event()
    slow_sink, quick_sink = BlockingSink(release=release), InstantSink()
    slow, quick = make_emitter(tmp_path, slow_sink, "slow"), make_emitter(tmp_path, quick_sink, "quick")

    async def main() -> list[str]:
        slow_task = asyncio.create_task(apply_all(slow, frames)())
        while not slow_sink.threads:  # its first send has begun
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(apply_all(quick, frames)(), 30)
            slow_sent_meanwhile = list(slow_sink.sent)
        finally:
            release.set()
        await slow_task
        return slow_sent_meanwhile

    assert asyncio.run(main()) == []  # the slow connector was still in its first send throughout
    assert quick_sink.sent == slow_sink.sent == [e.event_id for m in frames for e in m.events]


# --------------------------------------------------------------------------
# KafkaSink: sends and flushes from several threads at once
# --------------------------------------------------------------------------
class _Metadata:
    def __init__(self, offset: int):
        self.partition, self.offset = 0, offset


class _Future:
    def __init__(self, offset: int):
        self.md = _Metadata(offset)

    def get(self, timeout=None):
        return self.md


class FakeProducer:
    """kafka-python's producer is thread-safe; so is this stand-in."""

    def __init__(self):
        self._lock = threading.Lock()
        self.n = 0

    def send(self, topic, key=None, value=None):
        with self._lock:
            self.n += 1
            offset = self.n
        time.sleep(0)  # let a flush run between the producer's send and the sink's bookkeeping
        return _Future(offset)

    def flush(self, timeout=None):
        pass


class _Event:
    event_id = "e"

    @staticmethod
    def dumps() -> bytes:
        return b"{}"


def test_kafka_sink_channels_confirm_each_send_exactly_once_across_threads():
    # Connectors sharing one producer each send from worker threads while
    # their flushes run in others: every send is confirmed by its own
    # channel's flush, exactly once.
    owner = object.__new__(KafkaSink)
    owner.settings, owner._producer, owner.timeout_s, owner._owner = Settings(), FakeProducer(), 1.0, True
    owner._init_pending(keep_offsets=False)
    channels = [owner.channel() for _ in range(3)]
    per_thread = 500
    acked: list[list[int]] = [[] for _ in channels]
    senders_done = threading.Event()

    def sender(ch):
        for _ in range(per_thread):
            ch.send(_Event)

    def flusher():
        while not senders_done.is_set():
            for i, ch in enumerate(channels):
                acked[i].extend(o for _, o in ch.flush())
            time.sleep(0.001)
        for i, ch in enumerate(channels):  # what was sent after the last round
            acked[i].extend(o for _, o in ch.flush())

    f = threading.Thread(target=flusher)
    senders = [threading.Thread(target=sender, args=(ch,)) for ch in channels]
    f.start()
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    senders_done.set()
    f.join()
    assert [len(a) for a in acked] == [per_thread] * len(channels)  # each channel confirms its own sends
    every = [o for a in acked for o in a]
    assert sorted(every) == list(range(1, per_thread * len(channels) + 1))  # all of them, each once
