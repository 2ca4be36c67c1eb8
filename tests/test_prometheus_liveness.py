"""A worker's /healthz follows its event loop, not the metrics thread: the
metrics server answers /metrics even while the loop is stuck, so a liveness
probe on /metrics never restarts a hung worker."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from contextlib import ExitStack

import pytest

from streams import metrics, runner
from streams.settings import Settings


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_healthz_turns_503_when_the_loop_stops_beating(monkeypatch):
    port = metrics.serve(0)
    monkeypatch.setattr(metrics, "_last_beat", None)
    assert _get(port, "/healthz")[0] == 200  # starting: no beat yet
    metrics.beat()
    status, text = _get(port, "/healthz")
    assert status == 200 and "event loop beat" in text
    monkeypatch.setattr(metrics, "_last_beat", time.monotonic() - metrics.LIVENESS_S - 1)
    status, text = _get(port, "/healthz")
    assert status == 503 and "silent" in text
    status, text = _get(port, "/metrics")  # the metrics themselves still answer
    assert status == 200 and "deepwatch_loop_heartbeat_timestamp_seconds" in text


def test_silent_clients_neither_pin_threads_nor_keep_the_scrape_out(monkeypatch, capfd):
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(metrics._QuietHandler, "timeout", 2.0)
    port = metrics.serve(0)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    extra = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    assert extra.recv(1) == b""  # past the cap: closed at once
    assert time.monotonic() - started < 1.5
    for s in silent:
        assert s.recv(1) == b""  # closed once silent past the idle limit
        s.close()
    extra.close()
    assert _get(port, "/metrics")[0] == 200  # the slots came back
    assert "Traceback" not in capfd.readouterr().err  # a silent client is not an error on the log


@pytest.mark.slow
def test_a_running_worker_beats(tmp_path):
    with ExitStack() as stack:
        cluster = runner.start_cluster(Settings(data_dir=tmp_path), stack)
        worker = cluster.start_worker()
        cluster.wait_ready()
        deadline = time.monotonic() + 3 * metrics.HEARTBEAT_S
        status, text = _get(worker.metrics_port, "/healthz")
        while "event loop beat" not in text and time.monotonic() < deadline:
            time.sleep(0.5)
            status, text = _get(worker.metrics_port, "/healthz")
        assert status == 200 and "event loop beat" in text
