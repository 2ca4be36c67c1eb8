"""The metrics port (/metrics and the liveness /healthz of every worker, the
desk and the ingest endpoint) against slow and greedy clients, on real
sockets: a request head trickled in is cut off at an overall deadline, and
one client address cannot hold every connection slot. And the ingest
endpoint's probes: its metrics port listens where --host says, its public
/healthz says how the broker is, not why."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from streams import metrics
from streams.broker import free_port
from streams.ingest_server import build_app
from streams.settings import Settings
from tests.support import wait_healthy

REPO = Path(__file__).resolve().parents[1]
TOKEN = "desk-token-0123456789abcdef"
# A second loopback address: the "other client" of a test (Linux routes all of 127/8 to lo).
OTHER_CLIENT = "127.0.0.2"


@pytest.fixture(autouse=True)
def no_stale_heartbeat(monkeypatch):
    # The beat is per process: a desk or ingest app an earlier test ran in this
    # process beat and stopped, and 120 s later /healthz here said its loop was
    # silent. These tests are about the port's slots and deadlines, not the beat.
    monkeypatch.setattr(metrics, "_last_beat", None)


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def get(port: int, path: str, source: str = "127.0.0.1") -> bytes:
    """The raw answer to one GET (the server closes after it)."""
    with connect(port, source) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def closed_by_server(s: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``s`` within ``within_s`` (it never answers a head not sent whole)."""
    s.settimeout(within_s)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_one_client_cannot_hold_every_slot():
    # 64 connections from one client, each sending part of a head and then a
    # byte now and then, took every slot: /metrics and /healthz refused every
    # other client (Prometheus, the liveness probe) for as long as it went on.
    port = metrics.serve(0, host="127.0.0.1")
    greedy = []
    try:
        for _ in range(metrics.MAX_CONNECTIONS + 4):
            s = connect(port, OTHER_CLIENT)
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            greedy.append(s)
        t0 = time.monotonic()
        answer = get(port, "/healthz")
        assert answer.startswith(b"HTTP/1.0 200") and b"ok" in answer, answer
        assert time.monotonic() - t0 < 2, "answered at once, not once the greedy connections timed out"
        assert b"deepwatch_events_total" in get(port, "/metrics")
        # past its cap the greedy client's connections were closed at once, the first ones kept
        closed = [closed_by_server(s, 0.5) for s in greedy]
        per_client = metrics.MAX_PER_CLIENT
        assert closed == [False] * per_client + [True] * (len(greedy) - per_client)
    finally:
        for s in greedy:
            s.close()
    # their slots are given back: the same address is served again
    deadline = time.monotonic() + 5
    while True:
        try:
            answer = get(port, "/healthz", OTHER_CLIENT)
            if answer.startswith(b"HTTP/1.0 200"):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the greedy address's slots were never given back"
        time.sleep(0.1)
    # every slot, not only the first: the server notices the closes one by one (on a loaded machine a
    # last one could still be counted when the connections below arrived), so a leak is one that stays
    while True:
        held = [connect(port, OTHER_CLIENT) for _ in range(metrics.MAX_PER_CLIENT)]
        try:
            still_counted = any(closed_by_server(s, 0.3) for s in held)
        finally:
            for s in held:
                s.close()
        if not still_counted:
            break
        assert time.monotonic() < deadline + 5, "a slot given back was still counted"
        time.sleep(0.2)


def test_a_head_trickled_in_is_cut_off_at_a_deadline(monkeypatch):
    # A byte within each IDLE_S (10 s) a read kept a connection, and its thread
    # and slot, for as long as the client liked.
    monkeypatch.setattr(metrics, "HEAD_S", 1.5)
    port = metrics.serve(0, host="127.0.0.1")
    with connect(port) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        t0 = time.monotonic()
        cut = None
        while time.monotonic() - t0 < 8:
            try:
                s.sendall(b"X")
            except OSError:
                cut = time.monotonic() - t0
                break
            if closed_by_server(s, 0.3):
                cut = time.monotonic() - t0
                break
        assert cut is not None, "a trickling head held its connection past 8 s"
        assert cut < 1.5 + 1.5, cut


def test_a_head_sent_in_pieces_within_the_deadline_is_answered(monkeypatch):
    monkeypatch.setattr(metrics, "HEAD_S", 3.0)
    port = metrics.serve(0, host="127.0.0.1")
    with connect(port) as s:
        for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nHost: x\r\n", b"\r\n"):
            s.sendall(piece)
            time.sleep(0.3)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.0 200") and b"ok" in out, out


def test_serve_ingest_metrics_listen_on_its_host(tmp_path):
    # --metrics-port bound every address whatever --host said: an endpoint
    # kept to loopback behind a proxy showed the token holders' names (the
    # metrics' labels) on every interface.
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": f"desk:{TOKEN}",
           "DEEPWATCH_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--host", "127.0.0.1", "--port", str(port),
         "--broker", "kafka://127.0.0.1:1", "--metrics-port", str(metrics_port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{metrics_port}/healthz", proc)
        assert get(metrics_port, "/metrics").startswith(b"HTTP/1.0 200")
        with socket.socket() as s:  # a wildcard bind answers on every loopback address, 127.0.0.1's on its own
            s.settimeout(5)
            with pytest.raises(ConnectionRefusedError):
                s.connect((OTHER_CLIENT, metrics_port))
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


class GoneBroker:
    """A sink that cannot reach its broker, saying where it is, as kafka-python does."""

    def __init__(self):
        raise ConnectionError("NoBrokersAvailable: sasl_ssl://kafka.internal.example:9094 (SCRAM-SHA-512)")


def test_public_healthz_says_how_the_broker_is_not_why(tmp_path, caplog):
    settings = Settings(data_dir=tmp_path, broker="kafka://127.0.0.1:1")
    settings.connectors.ingest_broker_timeout_s = 0.5
    app = build_app(settings, {TOKEN: "desk"}, sink_factory=GoneBroker, missing_topics=lambda: [])
    with TestClient(app) as c, caplog.at_level(logging.WARNING, logger="streams.ingest_server"):
        assert c.get("/healthz").json() == {"status": "ok", "broker": "untried"}
        event = {"schema_version": 1, "event_id": "tip-1", "platform": "tipline", "account_id": "src-1",
                 "posted_at": "2026-11-30T10:00:00Z", "image": {"url": "https://93.184.215.14/1.jpg"}}
        r = c.post("/ingest", content=json.dumps(event), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 503, r.text
        for _ in range(3):  # a probe every few seconds
            health = c.get("/healthz")
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "broker": "unavailable"}, "the why is for the operator's log"
    # the why is in the log line of the request the broker failed
    [said] = [rec for rec in caplog.records if rec.getMessage() == "broker unavailable; request refused"]
    assert "kafka.internal.example:9094" in said.error
