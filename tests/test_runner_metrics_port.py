"""The workers `replay`, `demo` and the tests start take their metrics port
themselves. The runner used to pick a free port and hand it over; on a busy
machine (CI: two test processes starting workers at once) another process
took it in between, and the worker exited on "metrics port N is in use",
ending the replay."""

from __future__ import annotations

import socket
import urllib.request
from contextlib import ExitStack

from streams import runner
from streams.settings import Settings


def test_a_worker_serves_metrics_though_the_port_it_would_have_been_handed_is_taken(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))  # as the metrics server binds: every address
    taken.listen(1)
    port = taken.getsockname()[1]
    # the race, made certain: the runner's pick (if it still picks) is a port someone else holds by then
    monkeypatch.setattr(runner, "free_port", lambda *a, **k: port, raising=False)
    try:
        with ExitStack() as stack:
            cluster = runner.start_cluster(Settings(data_dir=tmp_path), stack)
            worker = cluster.start_worker()
            cluster.wait_ready()
            assert worker.proc.poll() is None, worker.log_path.read_text()[-2000:]
            assert worker.metrics_port not in (None, port)
            with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as r:
                assert b"deepwatch_events_total" in r.read()
    finally:
        taken.close()
