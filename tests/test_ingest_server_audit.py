"""``deepwatch serve-ingest`` against hostile and careless clients: idle
connection floods, requests piled up, bodies in myriad tiny chunks, a broker
gone mid-run, repeated event ids in one request and a stop while slow bodies
trickle in. Real uvicorn (with the config ``serve`` runs) on loopback ports,
the real embedded broker."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from streams.broker import EmbeddedBroker, ensure_topics, free_port
from streams.ingest_server import MAX_BODY_PIECES, SHUTDOWN_GRACE_S, build_app
from streams.records import DeadLetter, ImageEvent
from streams.settings import Settings
from streams.topics import topic_specs
from tests.connector_servers import read_topic
from tests.support import wait_healthy
from tests.test_ingest_server import (  # noqa: F401 (broker and settings are fixtures)
    AUTH, OTHER, REPO, TOKEN, broker, event, open_request, served, settings)


def requests_answered(port: int, status: str) -> float:
    wanted = f'deepwatch_ingest_requests_total{{status="{status}",token="desk"}} '
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[1])
    return 0.0


def closed_soon(s: socket.socket, within_s: float) -> bool:
    """Whether the server closed ``s`` (EOF or reset) within ``within_s``."""
    s.settimeout(within_s)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_opened_by_anybody_do_not_lock_token_holders_out(settings):
    # uvicorn's limit_concurrency (256) counts open connections: 256 idle ones,
    # no token needed, made every token holder's request a text/plain 503
    # without Retry-After, counted in no metric.
    with served(build_app(settings, {TOKEN: "desk"})) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        try:
            time.sleep(0.5)
            r = httpx.post(f"http://127.0.0.1:{port}/ingest", content=json.dumps(event(1)), headers=AUTH, timeout=20)
            assert r.status_code == 202, (r.status_code, r.text)
        finally:
            for s in idle:
                s.close()


def test_a_connection_over_the_cap_closes_the_oldest_idle_one(settings):
    # No cap at all: 3,000 idle connections held 3,000 descriptors. Closing
    # the newest instead would let idle connections, no token needed, shut
    # every token holder out.
    with served(build_app(settings, {TOKEN: "desk"}), max_connections=20) as port:
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            time.sleep(0.5)  # all accepted, in this order
            newest = socket.create_connection(("127.0.0.1", port))
            conns.append(newest)
            assert closed_soon(conns[0], 2.0)
            assert not any(closed_soon(s, 0.05) for s in conns[1:])
            body = json.dumps(event(1)).encode()
            newest.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                           + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            newest.settimeout(10)
            assert newest.recv(65536).startswith(b"HTTP/1.1 202")
        finally:
            for s in conns:
                s.close()


def test_a_connection_over_the_cap_is_closed_at_once_when_every_one_is_at_work(settings):
    body = json.dumps(event(1)).encode()
    with served(build_app(settings, {TOKEN: "desk"}), max_connections=5) as port:
        held = [open_request(port, f"Content-Length: {len(body)}\r\n", body[:1]) for _ in range(5)]
        try:
            time.sleep(0.5)
            extra = socket.create_connection(("127.0.0.1", port))
            held.append(extra)
            assert closed_soon(extra, 2.0)
            assert not any(closed_soon(s, 0.05) for s in held[:5])
        finally:
            for s in held:
                s.close()


def test_requests_over_the_in_flight_limit_are_answered_busy_with_retry_after(settings):
    body = json.dumps(event(1)).encode()
    with served(build_app(settings, {TOKEN: "desk"}, max_in_flight=2)) as port:
        busy_before = requests_answered(port, "503")
        held = [open_request(port, f"Content-Length: {len(body)}\r\n", body[:1]) for _ in range(2)]
        try:
            time.sleep(0.5)
            r = httpx.post(f"http://127.0.0.1:{port}/ingest", content=body, headers=AUTH, timeout=20)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"] == "busy" and "requests" in r.json()["detail"]
            assert requests_answered(port, "503") == busy_before + 1
        finally:
            for h in held:
                h.close()
        deadline = time.monotonic() + 10
        while (r := httpx.post(f"http://127.0.0.1:{port}/ingest", content=body, headers=AUTH)).status_code == 503:
            assert time.monotonic() < deadline, "the held requests' places were never given back"
            time.sleep(0.1)
        assert r.status_code == 202, r.text


def test_one_token_holder_has_at_most_half_the_requests_at_work(settings):
    body = json.dumps(event(1)).encode()
    with served(build_app(settings, {TOKEN: "desk", OTHER: "tipline"}, max_in_flight=4)) as port:
        url = f"http://127.0.0.1:{port}/ingest"
        held = [open_request(port, f"Content-Length: {len(body)}\r\n", body[:1]) for _ in range(2)]
        try:
            time.sleep(0.5)
            r = httpx.post(url, content=body, headers=AUTH, timeout=20)
            assert r.status_code == 503 and r.json()["error"] == "busy", r.text
            other = httpx.post(url, content=json.dumps(event(2)), headers={"Authorization": f"Bearer {OTHER}"},
                               timeout=20)
            assert other.status_code == 202, other.text
        finally:
            for h in held:
                h.close()


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in HTTP/1.1 chunked encoding, ``size`` bytes a chunk."""
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in pieces) + b"0\r\n\r\n"


def post_raw(port: int, head: bytes, wire: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n" + head
                  + b"\r\n" + wire)
        s.settimeout(30)
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            more = s.recv(65536)
            if not more:
                break
            got += more
        return got


def test_a_body_in_myriad_tiny_chunks_is_refused_not_parsed_for_seconds(settings):
    # Each chunk costs ~5 us of the event loop in h11 and uvicorn: a 2 MB body
    # in 1-byte chunks held it 10.6 s, every other client waiting.
    body = "\n".join(json.dumps(event(i, text="z" * 300)) for i in range(100)).encode()
    assert len(body) > MAX_BODY_PIECES
    settings.connectors.ingest_burst = 300
    with served(build_app(settings, {TOKEN: "desk"})) as port:
        refused_before = requests_answered(port, "400")
        got = post_raw(port, b"Transfer-Encoding: chunked\r\n", chunked(body, 1))
        assert got.startswith(b"HTTP/1.1 400") and b'"error":"too_fragmented"' in got, got[:300]
        deadline = time.monotonic() + 5
        while requests_answered(port, "400") != refused_before + 1:  # counted as the client's answer, not a 499
            assert time.monotonic() < deadline, requests_answered(port, "499")
            time.sleep(0.05)
        # a careless client's small chunks are fine, however many: what is refused is tiny ones by the myriad
        got = post_raw(port, b"Transfer-Encoding: chunked\r\n", chunked(body, 64))
        assert got.startswith(b"HTTP/1.1 202") and b'"accepted":100' in got, got[:300]
        large = "\n".join(json.dumps(event(i, text="z" * 20_000)) for i in range(100, 200)).encode()
        assert len(large) // 100 > MAX_BODY_PIECES
        got = post_raw(port, b"Transfer-Encoding: chunked\r\n", chunked(large, 100))
        assert got.startswith(b"HTTP/1.1 202") and b'"accepted":100' in got, got[:300]


def test_myriad_tiny_chunks_after_an_early_answer_end_the_connection_quietly(settings, caplog):
    # A 401 (or 413, busy) is sent before the body is read; when the chunks
    # coming on passed the limit, the 400 could not be sent after it: h11
    # raised, and asyncio logged a traceback for the connection.
    with served(build_app(settings, {TOKEN: "desk"})) as port, \
            socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 401")
        try:
            s.sendall(chunked(b"x" * (MAX_BODY_PIECES + 1000), 1))
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
        time.sleep(0.5)
    # and a malformed chunk after the answer (uvicorn's own 400 could not be sent either)
    with served(build_app(settings, {TOKEN: "desk"})) as port, \
            socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 401")
        s.sendall(b"not-a-chunk-size\r\n")
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_a_broker_gone_mid_run_is_answered_503_within_the_broker_timeout(tmp_path):
    # The failed producer was closed in the request's path: close waits for
    # what it holds (5 s), so a 5 s broker timeout gave a 503 after 12 s.
    b = EmbeddedBroker(tmp_path / "broker").__enter__()
    try:
        s = Settings(data_dir=tmp_path, broker=f"kafka://{b.bootstrap}", topic_prefix="gone")
        s.connectors.ingest_broker_timeout_s = 2.0
        ensure_topics(b.bootstrap, topic_specs(s))
        with served(build_app(s, {TOKEN: "desk"})) as port:
            url = f"http://127.0.0.1:{port}/ingest"
            assert httpx.post(url, content=json.dumps(event(1)), headers=AUTH, timeout=20).status_code == 202
            b.__exit__(None, None, None)
            b = None
            t0 = time.monotonic()
            r = httpx.post(url, content=json.dumps(event(2)), headers=AUTH, timeout=30)
            took = time.monotonic() - t0
            assert r.status_code == 503 and r.json()["error"] == "broker_unavailable", r.text
            assert r.headers["retry-after"] == "2"
            # the flush's 2 s and the missing-topics probe's 2 s (min(2, timeout)), not the close's 5 s too
            assert took < 2.0 + 2.0 + 1.5, took
    finally:
        if b is not None:
            b.__exit__(None, None, None)


def test_a_repeated_event_id_with_other_content_in_one_request_is_dead_lettered(settings, broker):
    # The pipeline takes a repeated event id for a producer's retry and counts
    # it once: the third line was answered "accepted" and then dropped unseen.
    same = json.dumps(event(1))
    lines = [same, same, json.dumps(event(1, text="another picture's caption")), json.dumps(event(2))]
    with served(build_app(settings, {TOKEN: "desk"})) as port:
        r = httpx.post(f"http://127.0.0.1:{port}/ingest", content="\n".join(lines), headers=AUTH, timeout=20)
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["accepted", "accepted", "dead_lettered", "accepted"]
    assert results[2]["reason"] == "duplicate_event_id" and results[2]["event_id"] == "tip-1"
    assert "line 1" in results[2]["detail"]
    assert r.json()["accepted"] == 3 and r.json()["dead_lettered"] == 1
    # an identical repeat is a retry, produced as sent: the pipeline counts it once
    produced = read_topic(broker.bootstrap, settings.topic("events"), 3)
    assert sorted(ImageEvent.loads(v).event_id for v in produced) == ["tip-1", "tip-1", "tip-2"]
    assert all(v == same.encode() for v in produced if ImageEvent.loads(v).event_id == "tip-1")
    dead = [DeadLetter.loads(v) for v in read_topic(broker.bootstrap, settings.topic("dead-letters"), 1)]
    assert [(d.event_id, d.stage, d.reason) for d in dead] == [("tip-1", "validate", "duplicate_event_id")]
    assert "another picture" in dead[0].payload_excerpt


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_a_stop_waits_for_slow_bodies_at_most_the_grace(broker, tmp_path):
    # A stop waited for every request at work, a body trickling in for up to
    # the body timeout (60 s): past an orchestrator's own grace (30 s).
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": f"desk:{TOKEN}",
           "DEEPWATCH_TOPIC_PREFIX": "stop", "DEEPWATCH_DATA_DIR": str(tmp_path),
           "DEEPWATCH_CONNECTORS__INGEST_TLS_PROXY": "true"}
    ensure_topics(broker.bootstrap, topic_specs(Settings(topic_prefix="stop")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--host", "127.0.0.1", "--port", str(port),
         "--broker", f"kafka://{broker.bootstrap}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        body = json.dumps(event(1)).encode()
        held = [open_request(port, f"Content-Length: {len(body)}\r\n", body[:1]) for _ in range(3)]
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=SHUTDOWN_GRACE_S + 15)
        assert time.monotonic() - t0 < SHUTDOWN_GRACE_S + 8
        assert proc.returncode in (0, 130) and "Traceback" not in stderr, stderr[-2000:]
        assert stderr.count("request cut short") == 3
        for h in held:  # told to re-send, not left to guess from a closed connection
            h.settimeout(5)
            head = h.recv(65536)
            assert head.startswith(b"HTTP/1.1 503") and b'"error":"stopping"' in head, head
    finally:
        for h in held:
            h.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
