"""Operator-facing failure modes of serve-ingest, ingest and the local runner:
slow clients, interrupted and failed produces, workers that misbehave."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from streams.broker import free_port
from tests.connector_servers import read_topic
from tests.support import wait_healthy

REPO = Path(__file__).resolve().parents[1]
TOKEN = "desk-token-0123456789abcdef"

SERVE = """
import sys
from streams.ingest_server import serve
from streams.settings import Settings

s = Settings(data_dir=sys.argv[1], broker=sys.argv[2])
s.connectors.ingest_broker_timeout_s = float(sys.argv[4])
serve(s, "127.0.0.1", int(sys.argv[3]), header_timeout_s=1.0, body_timeout_s=1.0)
"""


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[bool, bytes]:
    """Keep sending ``trickle`` every 0.2 s until the server closes the
    connection (True, what it answered) or ``seconds`` pass (False, ...)."""
    got = b""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
            if not data:
                return True, got
            got += data
        except socket.timeout:
            pass
        except ConnectionResetError:
            return True, got
        if trickle:
            try:
                sock.sendall(trickle)
            except (BrokenPipeError, ConnectionResetError):
                return True, got
    return False, got


@pytest.fixture
def ingest_server(tmp_path):
    """serve-ingest with 1 s head and body deadlines, its broker a closed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": f"desk:{TOKEN}"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tmp_path), f"kafka://127.0.0.1:{dead}", str(port), "2.0"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        yield port
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_serve_ingest_closes_connections_whose_headers_trickle_in(ingest_server):
    # uvicorn's keep-alive timer stops at the first byte: a client sending a
    # header line now and then held its connection open for good (256 of them
    # and every other client got 503).
    with socket.create_connection(("127.0.0.1", ingest_server)) as s:
        s.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\n")
        closed, _ = _closed_within(s, 6.0, trickle=b"X-Slow: 1\r\n")
        assert closed, "a connection trickling its headers stayed open"
    with socket.create_connection(("127.0.0.1", ingest_server)) as s:  # one that never says anything
        assert _closed_within(s, 6.0)[0]
    with socket.create_connection(("127.0.0.1", ingest_server)) as s:  # the next request's head, after a response
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, got = _closed_within(s, 6.0, trickle=b"G")
        assert got.startswith(b"HTTP/1.1 200") and closed


def test_serve_ingest_answers_a_trickled_body_408_and_closes(ingest_server):
    with socket.create_connection(("127.0.0.1", ingest_server)) as s:
        s.sendall(f"POST /ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/x-ndjson\r\nContent-Length: 100000\r\n\r\n{".encode())
        t0 = time.monotonic()
        closed, got = _closed_within(s, 8.0, trickle=b" ")
        assert closed, "a trickled body held the connection"
        assert got.startswith(b"HTTP/1.1 408") and b"body_timeout" in got and time.monotonic() - t0 < 6


def test_serve_ingest_deadlines_leave_normal_clients_alone(ingest_server):
    url = f"http://127.0.0.1:{ingest_server}"
    with httpx.Client(timeout=20) as c:  # keep-alive: one connection, requests with pauses under the deadline
        for _ in range(3):
            assert c.get(f"{url}/healthz").status_code == 200
            time.sleep(0.5)
        # a request at work longer than the head deadline (the broker is down: 2 s) is not cut off
        event = {"schema_version": 1, "event_id": "tip-1", "platform": "tipline", "account_id": "a",
                 "posted_at": "2026-11-30T10:00:00Z", "image": {"url": "https://images.example.org/1.jpg"}}
        r = c.post(f"{url}/ingest", content=json.dumps(event), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 503 and r.json()["error"] == "broker_unavailable"


def test_ingest_ends_with_one_line_when_the_broker_dies_mid_feed(tmp_path):
    # kafka-python's flush() waits for ever: a broker that died mid-feed hung
    # `deepwatch ingest` (and replay's resends) with no word.
    import threading

    from streams.broker import BrokerError, EmbeddedBroker, ensure_topics
    from streams.cli.common import user_error_types
    from streams.ingest import produce_lines
    from streams.settings import Settings
    from streams.topics import topic_specs

    settings = Settings(data_dir=tmp_path)
    broker = EmbeddedBroker(tmp_path / "broker")
    broker.start()
    try:
        ensure_topics(broker.bootstrap, topic_specs(settings), settings=settings)

        def lines():
            for i in range(200):
                if i == 100:
                    broker.stop()
                yield i, json.dumps({"event_id": f"e{i}", "n": i}).encode()

        outcome: list[BaseException | object] = []

        def go() -> None:
            try:
                outcome.append(produce_lines(lines(), broker.bootstrap, settings, ack_stall_s=3.0))
            except BaseException as e:  # noqa: BLE001 - judged below
                outcome.append(e)

        t = threading.Thread(target=go, daemon=True)
        t.start()
        t.join(60)
        assert outcome, "produce_lines hung after the broker stopped"
    finally:
        broker.stop()
    e = outcome[0]
    assert isinstance(e, BrokerError) and isinstance(e, user_error_types()), repr(e)
    assert "stopped acknowledging" in str(e) and "of 200 events confirmed" in str(e) and "\n" not in str(e)


def test_ctrl_c_during_ingest_says_how_many_events_the_broker_confirmed(tmp_path):
    # Typer turns Ctrl-C into a silent exit 130: the user did not learn how much
    # of the feed had gone in, nor that re-running it is safe.
    import signal

    from kafka import KafkaConsumer, TopicPartition

    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.settings import Settings
    from streams.topics import topic_specs

    n = 400_000
    feed = tmp_path / "feed.jsonl"
    with open(feed, "w") as f:
        for i in range(n):
            f.write(json.dumps({"schema_version": 1, "event_id": f"e{i}", "platform": "x", "account_id": "a",
                                "posted_at": "2026-11-30T10:00:00Z", "image": {"url": f"https://x.org/{i}.jpg"}}) + "\n")
    settings = Settings(topic_prefix="ctrlc")
    with EmbeddedBroker(tmp_path / "broker") as broker:
        ensure_topics(broker.bootstrap, topic_specs(settings), settings=settings)
        env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_TOPIC_PREFIX": "ctrlc"}
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli.__main__", "ingest", str(feed), "--broker", broker.url],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        try:
            parts = [TopicPartition(settings.topic("events"), p) for p in range(settings.partitions)]

            def in_topic() -> int:
                return sum(consumer.end_offsets(parts).values())

            deadline = time.monotonic() + 60
            while in_topic() == 0 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            consumer.close()
        assert proc.returncode == 130, stderr
        said = [line for line in stderr.splitlines() if line.startswith("interrupted")]
        assert len(said) == 1 and "Traceback" not in stderr, stderr
        confirmed = int(said[0].split()[1])
        assert f"of {n} events confirmed by the broker" in said[0] and "re-run the feed" in said[0]
        assert 0 < confirmed < n
        # (end offsets undercount on the embedded broker: the topic itself is read)
        assert len(read_topic(broker.bootstrap, settings.topic("events"), confirmed, timeout_s=30)) >= confirmed


def test_serve_ingest_answers_503_promptly_to_every_client_while_the_broker_is_down(ingest_server):
    # One producer, one batch at a time: with the broker down each request waited
    # its own broker timeout (2 s here) behind all those before it, the 6th ~12 s.
    from concurrent.futures import ThreadPoolExecutor

    body = json.dumps({"schema_version": 1, "event_id": "tip-1", "platform": "tipline", "account_id": "a",
                       "posted_at": "2026-11-30T10:00:00Z", "image": {"url": "https://images.example.org/1.jpg"}})

    def post(_: int) -> tuple[int, float]:
        t0 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{ingest_server}/ingest", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}"})
        return r.status_code, time.monotonic() - t0

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    assert all(status == 503 for status, _ in answers), answers
    assert max(seconds for _, seconds in answers) < 6.5, answers


def test_ingest_from_a_pipe_sends_every_event_and_replay_refuses_one(tmp_path):
    # `cat feed | deepwatch ingest /dev/stdin` counted the pipe's lines for the
    # progress bar first, which left nothing to send: "produced 0 events".
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.settings import Settings
    from streams.topics import topic_specs

    events = "".join(json.dumps({"schema_version": 1, "event_id": f"p{i}", "platform": "x", "account_id": "a",
                                 "posted_at": "2026-11-30T10:00:00Z",
                                 "image": {"url": f"https://x.org/{i}.jpg"}}) + "\n" for i in range(5))
    settings = Settings(topic_prefix="pipe")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_TOPIC_PREFIX": "pipe"}
    cli = [sys.executable, "-m", "streams.cli.__main__"]
    with EmbeddedBroker(tmp_path / "broker") as broker:
        ensure_topics(broker.bootstrap, topic_specs(settings), settings=settings)
        r = subprocess.run([*cli, "ingest", "/dev/stdin", "--broker", broker.url], input=events, cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "produced 5 events" in " ".join(r.stderr.split()), r.stderr
        assert len(read_topic(broker.bootstrap, settings.topic("events"), 5)) == 5
    r = subprocess.run([*cli, "replay", "/dev/stdin", "--data-dir", str(tmp_path / "data")], input=events, cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a regular file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_worker_stopped_from_outside_ends_the_wait_instead_of_running_out_the_timeout(tmp_path):
    # A worker that exits 0 was not "failed" to check_workers: a SIGTERM or SIGINT
    # reaching the workers alone (a replay run in the background of a script
    # ignores SIGINT; its forked workers do not) left replay resending events
    # to nobody until --timeout (600 s by default).
    import signal
    from contextlib import ExitStack

    from streams import runner
    from streams.settings import Settings

    with ExitStack() as stack:
        cluster = runner.start_cluster(Settings(data_dir=tmp_path / "data"), stack)
        w = cluster.start_worker("pipeline", metrics=False)
        cluster.wait_ready(timeout_s=60)
        os.kill(w.proc.pid, signal.SIGTERM)
        assert w.proc.wait(30) == 0
        t0 = time.monotonic()
        with pytest.raises(runner.WorkerExited, match=r"pipeline worker stopped \(exit 0\)"):
            runner.wait_until_processed(cluster, {(0, 0)}, timeout_s=30)
        assert time.monotonic() - t0 < 10
        w.expected_exit = True  # seen and reported
        other = cluster.start_worker("pipeline", metrics=False)
        other.stop(timeout=30)  # one this command stops is expected to end
        cluster.check_workers()


def test_a_second_replay_into_the_same_data_dir_is_refused_while_the_first_runs(tmp_path):
    # Both ran: each claimed nearly every event as its own (999 and 963 of
    # 1,000 new sightings) and the last writer's engine state won.
    from streams.runner import DataDirBusy, data_dir_lock

    with data_dir_lock(tmp_path / "d"):
        with pytest.raises(DataDirBusy, match=rf"another deepwatch replay or demo \(pid {os.getpid()}\) is running "
                                              rf"on {tmp_path / 'd'}; wait for it to end, or give this one a --data-dir"):
            with data_dir_lock(tmp_path / "d"):
                pass
    with data_dir_lock(tmp_path / "d"):  # released with the first
        pass
    with data_dir_lock(tmp_path / "other"):  # another dir is another deployment
        pass


def test_a_replay_whose_embedded_broker_died_says_so_at_once(tmp_path):
    # kill -9 of the broker mid-replay: the replay resent for 80 s, then said
    # the port "did not answer as a Kafka broker ... check kafka.security_protocol".
    import signal
    from contextlib import ExitStack

    from streams import runner
    from streams.settings import Settings

    with ExitStack() as stack:
        cluster = runner.start_cluster(Settings(data_dir=tmp_path / "data"), stack)
        cluster.check_workers()  # running: nothing to say
        os.kill(cluster.broker._proc.pid, signal.SIGKILL)
        cluster.broker._proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(runner.WorkerExited, match=r"the embedded broker stopped \(signal 9\) while the run "
                                                      r"needed it; .* see .*tansu.log"):
            runner.wait_until_processed(cluster, {(0, 0)}, timeout_s=30)
        assert time.monotonic() - t0 < 5


def test_a_stalled_run_names_the_workers_last_error(tmp_path):
    # A replay on a full disk said only "events unprocessed without progress;
    # resending them"; "disk I/O error" was in the worker logs alone.
    from types import SimpleNamespace

    from streams.runner import Cluster
    from streams.settings import Settings

    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text('{"ts": "2026-12-06T03:00:01+00:00", "level": "error", "msg": "old trouble"}\n'
                 "not json\n" + '{"ts": "2026-12-06T03:00:05+00:00", "level": "info", "msg": "fine"}\n')
    b.write_text('{"ts": "2026-12-06T03:00:03+00:00", "level": "error", "msg": "engine state not written '
                 '(disk I/O error)"}\n')
    cluster = Cluster(Settings(data_dir=tmp_path), "kafka://x:1", "x:1", tmp_path,
                      workers=[SimpleNamespace(role="detect", log_path=a), SimpleNamespace(role="pipeline", log_path=b)])
    assert cluster.last_error() == "pipeline: engine state not written (disk I/O error)"
    assert Cluster(Settings(data_dir=tmp_path), "kafka://x:1", "x:1", tmp_path).last_error() is None


def test_a_crashed_worker_is_named_by_its_first_exception_not_its_shutdown_lines(tmp_path):
    # replay printed "pipeline worker exited with 1; log ...:" and ~15 lines
    # of the worker's shutdown; the crash itself was further up in the log.
    from streams import runner
    from streams.settings import Settings

    log = tmp_path / "worker.log"
    crash = ("import logging, sys\n"
             "from streams import logs\n"
             "logs.setup('INFO', 'json', stream=open(sys.argv[1], 'w'))\n"
             "log = logging.getLogger('faust.agent')\n"
             "log.info('starting')\n"
             "try:\n"
             "    {}['nosuch']\n"
             "except KeyError:\n"
             "    log.exception('Agent crashed')\n"
             "log.error('consumer stopped while committing')\n"
             "sys.exit(1)\n")
    proc = subprocess.Popen([sys.executable, "-c", crash, str(log)], cwd=REPO)
    assert proc.wait(60) == 1
    cluster = runner.Cluster(settings=Settings(data_dir=tmp_path), broker_url="", bootstrap="", log_dir=tmp_path)
    cluster.workers.append(runner.WorkerProcess(role="pipeline", proc=proc, log_path=log))
    with pytest.raises(runner.WorkerExited) as e:
        cluster.check_workers()
    assert str(e.value) == f"pipeline worker exited with 1: Agent crashed: KeyError: 'nosuch' (log {log})"
