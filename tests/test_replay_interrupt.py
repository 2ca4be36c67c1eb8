"""Ctrl-C on `deepwatch replay`: the terminal sends SIGINT to the whole
foreground process group -- the CLI, the zygote and every worker. The
embedded broker runs in a process group of its own, so it is still there
while the workers commit and flush, and the CLI stops it last. Before, it
died first and the CLI took 30-35 s to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.replay import build

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_ends_replay_and_every_process_it_started_within_seconds(tmp_path):
    feed = build(tmp_path / "feed", pictures=40, reposts=10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "replay", str(feed), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
        # a terminal's foreground job: SIGINT is not ignored (a background job's would be)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    group = proc.pid
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "workers ready" in line:
                break
        else:
            pytest.fail(f"replay ended before its workers were ready (exit {proc.wait()})")
        t0 = time.monotonic()
        os.killpg(group, signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=20)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(group, signal.SIGKILL)
            proc.wait()
    assert proc.returncode not in (0, None)
    assert took < 10, f"replay took {took:.1f}s to end after Ctrl-C"
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # no worker, zygote or anything else of the group is left
    listening = re.search(r"listening on: (tcp://\S+)", (tmp_path / "data" / "logs" / "tansu.log").read_text())
    assert listening, "the broker's log names no listener"
    left = subprocess.run(["pgrep", "-f", f"listener-url {listening.group(1)}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the broker, in its own group, was left running"
