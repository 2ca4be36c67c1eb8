"""`deepwatch replay` (and `deepwatch demo`, `make demo`) sends each alert's
webhook deliveries once and stops seconds later, long before the first
redelivery round: a delivery that failed stays failed until a worker's
redelivery sends it. The summary said nothing of it ("1 alert", exit 0).
It now counts this run's alerts by delivery state and warns, naming what
sends them. Real replays (embedded broker, workers) to loopback receivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.demo_feed import build_feed
from tests import test_webhooks
from tests.test_webhooks import ENV, SECRET, _Receiver

pytestmark = pytest.mark.slow
receiver = test_webhooks.receiver  # a loopback receiver answering the statuses given, recording each request

ROOT = Path(__file__).resolve().parents[1]


def _replay(tmp_path: Path, name: str, hooks: dict[str, _Receiver], *args: str) -> subprocess.CompletedProcess:
    """A replay of the demo feed (it raises one alert) into a fresh data dir,
    with one webhook per receiver in ``hooks``, named by its key."""
    feed = tmp_path / "feed" / "feed.jsonl"
    if not feed.exists():
        build_feed(feed.parent)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text("[alerts]\nallow_private_webhooks = true\n" + "".join(
        f'[[alerts.webhooks]]\nname = "{hook}"\nurl = "http://127.0.0.1:{srv.server_address[1]}/hook"\n'
        f'secret_env = "{ENV}"\nretries = 0\ntimeout_s = 2.0\n' for hook, srv in hooks.items()))
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    r = subprocess.run([sys.executable, "-m", "streams.cli", "replay", str(feed), "--data-dir", str(tmp_path / name),
                        "--config", str(cfg), "--workers", "1", "--timeout", "240", *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**env, "PYTHONPATH": str(ROOT), ENV: SECRET})
    assert r.returncode == 0, r.stderr[-3000:]  # the findings were made: delivery is said, not an exit code
    return r


def _stored_states(tmp_path: Path, name: str) -> list[list[str]]:
    r = subprocess.run([sys.executable, "-m", "streams.cli", "alerts", "--data-dir", str(tmp_path / name), "--format",
                        "json"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")})
    assert r.returncode == 0, r.stderr
    return [sorted(d["state"] for d in a["deliveries"]) for a in json.loads(r.stdout)]


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_a_replay_whose_delivery_failed_says_so_and_what_sends_it(tmp_path, receiver):
    down, up = receiver(500), receiver(200)
    r = _replay(tmp_path, "data", {"down": down, "up": up}, "--json")
    doc = json.loads(r.stdout)
    assert doc["alerts"] == 1  # the existing fields as they were
    # delivered to one hook, failed at the other: the alert counts once, under what it still owes
    assert _stored_states(tmp_path, "data") == [["delivered", "failed"]]
    assert doc["run_alert_deliveries"] == {"delivered": 0, "failed": 1, "rejected": 0, "queued": 0}
    assert len(down.requests) == 1 and len(up.requests) == 1  # sent once; replay did not retry
    [warning] = _warnings(r.stderr)  # on stderr: stdout stays the JSON
    assert warning.startswith("warning: 1 of this run's alerts was not delivered to every webhook (1 failed): "
                              "replay tries each once (with the hook's retries), not again; "), warning
    assert " worker` on this store sends failed and queued ones" in warning, warning
    assert f"redeliver --data-dir {tmp_path / 'data'}` lists what waits per target" in warning, warning


def test_a_replay_whose_alerts_were_delivered_counts_them_and_warns_of_nothing(tmp_path, receiver):
    up = receiver(200)
    r = _replay(tmp_path, "data", {"up": up})  # the table summary, on stderr
    assert "this run's alerts by webhook delivery: 1 delivered, 0 failed, 0 rejected, 0 queued" in r.stderr, r.stderr
    assert _warnings(r.stderr) == [] and "not delivered" not in r.stderr, r.stderr
    assert [q["valid"] for q in up.requests] == [True]
