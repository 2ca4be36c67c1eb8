"""`deepwatch connect bluesky --dry-run` that never reaches its server ended
with "nothing read; cursor None" (a Python repr) and exit 0, as a healthy
quiet stream does. Now: "no cursor yet", and a run whose every connection
attempt failed says so and exits 1; a run that connected exits 0 even when
nothing came. Against the loopback Jetstream over real websockets, the CLI in
a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streams.broker import free_port
from tests.connector_servers import JetstreamServer
from tests.test_connector_bluesky_streams import T0, A, post


def _connect(tmp_path: Path, url: str, duration: float = 3) -> subprocess.CompletedProcess:
    cfg = tmp_path / "console.toml"
    cfg.write_text('log_format = "console"\n')  # the readable lines a person at a terminal gets
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", "connect", "bluesky", "--dry-run",
                           "--jetstream-url", url, "--duration", str(duration), "-d", str(tmp_path / "data"),
                           "-c", str(cfg)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def _ended(r: subprocess.CompletedProcess) -> str:
    [line] = [x for x in r.stderr.splitlines() if x.startswith("bluesky: ")]
    assert "None" not in line, line
    return line


def test_no_server_at_the_address_says_never_connected_and_exits_1(tmp_path: Path):
    port = free_port()  # nothing listens there
    r = _connect(tmp_path, f"ws://127.0.0.1:{port}/subscribe")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert _ended(r) == "bluesky: nothing read; no cursor yet"
    [error] = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert f"never connected to 127.0.0.1:{port}" in error and "connect_failed" in error, error
    assert r.stdout == ""


def test_a_server_that_refuses_every_handshake_is_never_connected_too(tmp_path: Path):
    with JetstreamServer([], refuse={n: (503, {}) for n in range(100)}) as server:
        r = _connect(tmp_path, server.url)
    assert server.handshakes  # it was asked
    assert r.returncode == 1 and "never connected" in r.stderr and "http_503" in r.stderr, r.stderr


def test_a_quiet_stream_it_connected_to_exits_0(tmp_path: Path):
    # the first handshake refused, the second one connects and nothing comes: a quiet stream, not an outage
    with JetstreamServer([], refuse={0: (503, {})}) as server:
        r = _connect(tmp_path, server.url, duration=4)
    assert len(server.requests) >= 1  # a websocket was opened
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert _ended(r) == "bluesky: nothing read; no cursor yet" and "never connected" not in r.stderr


def test_a_stream_that_sent_frames_reports_its_cursor_and_exits_0(tmp_path: Path):
    with JetstreamServer([post("p1", [A], time_us=T0)]) as server:
        r = _connect(tmp_path, server.url)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert _ended(r).endswith(f"; cursor {T0}") and "never connected" not in r.stderr
    assert len(r.stdout.splitlines()) == 1  # the mapped event


def test_an_attempt_the_stop_cut_short_does_not_hide_a_run_that_never_connected():
    # a host that drops packets: each attempt waits out its connect timeout, and the run's
    # stop lands in one ("stopped"); the run still never connected
    from collections import Counter
    from types import SimpleNamespace

    from streams.cli.connect import _report
    from streams.settings import Settings

    def runner(ends: dict[str, int], connected: bool) -> SimpleNamespace:
        emitter = SimpleNamespace(counts={}, cursor=None, stream="bluesky", session_ends=Counter(ends),
                                  connected=connected)
        return SimpleNamespace(emitter=emitter, url="wss://jetstream.example/subscribe")

    console = Settings(log_format="console")
    assert _report([runner({"connect_failed": 2, "stopped": 1}, connected=False)], console) is True
    # connected once, then quiet (a session ended by the stop): nothing came, no failure
    assert _report([runner({"connect_failed": 1, "stopped": 1}, connected=True)], console) is False
    assert _report([runner({"stopped": 1}, connected=False)], console) is False
