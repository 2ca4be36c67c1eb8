"""A worker whose broker goes away or comes back empty: it exits promptly,
nonzero, with one line saying why and what to do, for its supervisor to
restart it; /healthz answers 503 from the moment it begins to stop.

Seen before: a detect worker whose broker vanished hung 60 s in its stop
(``Error while stopping child <ConsumerThread: crashed >: TimeoutError()``),
/healthz 200 all along; an idle worker retried for good; a pipeline worker
over a broker restarted empty ended on Faust's dozen-line ConsistencyError
and "We experienced a crash! Reraising original exception...".
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from streams import metrics
from streams.faust_tuning import CRASH_STOP_S, BrokerUnreachable, _on_thread_stop, explain_crash


@pytest.fixture
def fresh_liveness():
    saved = metrics._stopping, metrics._last_beat
    metrics._stopping = None
    yield
    metrics._stopping, metrics._last_beat = saved


def test_healthz_is_503_once_the_worker_stops_even_while_its_loop_beats(fresh_liveness):
    metrics.beat()
    assert metrics.liveness()[0] == 200
    metrics.stopping("crashed: KafkaConnectionError: Unable to bootstrap")
    metrics.stopping("the worker is stopping")  # the first reason is kept
    metrics.beat()
    assert metrics.liveness() == (503, "stopping: crashed: KafkaConnectionError: Unable to bootstrap")


def test_a_changelog_behind_the_table_reads_as_a_broker_that_lost_its_data():
    from faust.exceptions import ConsistencyError
    from faust.tables.recovery import E_PERSISTED_OFFSET

    e = ConsistencyError(E_PERSISTED_OFFSET.format("TP(topic='deepwatch-clusters-changelog', partition=0)", 1970, -1))
    cause, line = explain_crash(e, "127.0.0.1:19092")
    assert cause == "broker_lost_data" and "\n" not in line
    assert "the broker at 127.0.0.1:19092 lost its data (restarted empty?)" in line
    assert "deepwatch-clusters-changelog ends at offset -1" in line and "up to 1970" in line
    assert "rebuilds its table from the engine state" in line


@pytest.mark.parametrize("error", [
    "aiokafka",  # what the stall guard's end-offset lookup raised
    BrokerUnreachable("no connection to 127.0.0.1:19092 for 60 s"),
])
def test_an_unreachable_broker_reads_as_such(error):
    if error == "aiokafka":
        from aiokafka.errors import KafkaConnectionError

        error = KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 19092, <AddressFamily.AF_INET: 2>)]")
    cause, line = explain_crash(error, "127.0.0.1:19092")
    assert cause == "broker_unreachable" and "\n" not in line
    assert line.startswith("the broker at 127.0.0.1:19092 is unreachable") and "exit 1" in line


@pytest.mark.parametrize("error", [ValueError("bad\nthing"), ConnectionRefusedError("es at 127.0.0.1:9200")])
def test_any_other_crash_is_one_line_too(error):
    # a ConnectionError from elsewhere (the findings store) is not the broker's
    cause, line = explain_crash(error, "h:1")
    assert cause == "crashed" and "\n" not in line and f"{type(error).__name__}: " in line and "broker" not in line


def test_a_consumer_thread_stop_ends_when_a_fetch_waiting_to_retry_is_cancelled(monkeypatch):
    # aiokafka's Fetcher.close awaits the fetch tasks it cancelled; one in its
    # retry backoff re-raised the CancelledError, the thread never told the
    # main loop it had shut down, and the worker's stop waited 60 s.
    import streams.faust_tuning as tuning

    async def stock(self) -> None:
        task = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        await task

    monkeypatch.setattr(tuning, "_stock_thread_stop", stock)

    async def run() -> str:
        await _on_thread_stop(object())
        # our own cancellation still propagates
        outer = asyncio.ensure_future(_on_thread_stop(object()))
        await asyncio.sleep(0)
        outer.cancel()
        try:
            await outer
        except asyncio.CancelledError:
            return "cancelled"
        return "swallowed"

    assert asyncio.run(run()) == "cancelled"


def test_a_crashed_worker_whose_stop_hangs_exits_anyway_with_its_line():
    script = textwrap.dedent("""
        import time
        from streams import logs
        from streams.faust_tuning import BrokerUnreachable, _exit_after
        logs.setup("INFO", "json")
        _exit_after(0.3, BrokerUnreachable("no connection to h:1 for 60 s"), "h:1")
        time.sleep(30)
    """)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 15
    assert r.returncode == 1
    lines = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    told = [x for x in lines if x.get("cause")]
    assert len(told) == 1 and told[0]["cause"] == "broker_unreachable" and told[0]["level"] == "critical"
    assert "did not end within" in told[0]["note"]


def _healthz(port_file) -> tuple[int | None, str]:
    try:
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (OSError, ValueError) as e:
        return None, repr(e)


@pytest.mark.slow
def test_a_worker_whose_broker_is_gone_exits_nonzero_with_one_line(tmp_path):
    from streams.broker import EmbeddedBroker

    port_file = tmp_path / "metrics.port"
    env = {**os.environ, "DEEPWATCH_METRICS_PORT_FILE": str(port_file), "DEEPWATCH_KAFKA__BROKER_LOST_S": "3"}
    broker = EmbeddedBroker(tmp_path / "broker").start()
    try:
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "streams.cli.__main__", "worker", "--broker", broker.url,
                                       "--data-dir", str(tmp_path / "data"), "--metrics-port", "0"],
                                      stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 120
            while "event loop beat" not in _healthz(port_file)[1]:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the worker never beat"
                time.sleep(0.2)
            broker.stop()
            stopped = time.monotonic()
            rc = worker.wait(60)
            took = time.monotonic() - stopped
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    finally:
        broker.stop()
    lines = [json.loads(x) for x in (tmp_path / "worker.log").read_text().splitlines() if x.startswith("{")]
    told = [x for x in lines if x.get("cause")]
    assert rc == 1
    # 3 s unreachable, checked every HEARTBEAT_S (5 s): at most ~13 s, and no 60 s stop
    # ended by itself, not by the crash-stop deadline (CRASH_STOP_S), which would add a "note"
    assert took < 10 + CRASH_STOP_S, took
    assert len(told) == 1, told
    assert "note" not in told[0], told
    assert told[0]["cause"] == "broker_unreachable" and told[0]["broker"] == broker.bootstrap, told
    assert "Error while stopping child" not in "\n".join(x["msg"] for x in lines if "TimeoutError" in x.get("msg", ""))


def test_the_broker_watch_counts_from_the_first_miss_and_forgets_it_on_a_connection(monkeypatch):
    import socket

    from streams import worker

    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        bootstrap = f"127.0.0.1:{gone.getsockname()[1]}"  # bound, never listening: refused
    now = [100.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: now[0])
    watch = worker.BrokerWatch(bootstrap, lost_s=60)
    asyncio.run(watch.check(connected=None))
    assert watch.since == 100.0 and watch.why.startswith(f"{bootstrap}: ")
    now[0] = 150.0
    asyncio.run(watch.check(connected=False))  # 50 s: not yet
    asyncio.run(watch.check(connected=True))  # the consumer's connection is back: nothing asked, forgotten
    assert watch.since is None
    asyncio.run(watch.check(connected=False))
    now[0] = 210.0
    with pytest.raises(BrokerUnreachable, match=f"no connection to {bootstrap} for 60 s: {bootstrap}: "):
        asyncio.run(watch.check(connected=False))
    with socket.socket() as up:  # a listener takes the connection: reachable
        up.bind(("127.0.0.1", 0))
        up.listen(1)
        listening = worker.BrokerWatch(f"127.0.0.1:{up.getsockname()[1]}", lost_s=60)
        asyncio.run(listening.check(connected=False))
        assert listening.since is None and listening.why == ""
