"""The embedded broker (Tansu) dies with whoever started it.

It runs in a process group of its own (``process_group=0``: Ctrl-C must not
reach it before the workers), so nothing stopped it when its parent was
killed outright: a ``kill -9`` of ``deepwatch broker`` (or of a replay) left
Tansu re-parented to PID 1 and holding its port, a restarted
``deepwatch broker --port P`` found the port taken, and old workers went on
talking to the orphan. On Linux the kernel now sends it SIGTERM
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support import start_broker_cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _alive(pid: int) -> bool:
    try:
        # a zombie (exited, not reaped) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tansu binds: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def _kill_and_check(parent: subprocess.Popen, port: int) -> None:
    kids = _children(parent.pid)
    assert kids, "the broker process was not found among the children"
    tansu = kids[0]
    try:
        parent.kill()  # SIGKILL: no handler, no ``stop``, no ``finally`` runs
        parent.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (_alive(tansu) or not _port_free(port)):
            time.sleep(0.05)
        assert not _alive(tansu), f"tansu (pid {tansu}) outlived its parent"
        assert _port_free(port), f"port {port} still taken after its broker's parent was killed"
    finally:
        if _alive(tansu):
            os.kill(tansu, signal.SIGKILL)


@pytest.mark.slow
def test_kill_9_of_deepwatch_broker_takes_tansu_and_its_port_with_it(tmp_path):
    proc, url = start_broker_cli(tmp_path)
    try:
        _kill_and_check(proc, int(url.rpartition(":")[2]))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_kill_9_of_a_process_holding_an_embedded_broker_takes_tansu_with_it(tmp_path):
    # What ``deepwatch replay``/``demo`` do (runner.start_cluster): the broker
    # as a context manager around the run.
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from streams.broker import EmbeddedBroker
        with EmbeddedBroker(Path({str(tmp_path)!r})) as b:
            print(b.port, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.isdigit(), (line, proc.stderr.read() if proc.poll() is not None else "")
        _kill_and_check(proc, int(line))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_broker_whose_parent_died_before_it_could_ask_exits_at_once():
    # The race PR_SET_PDEATHSIG leaves open: a parent dead between fork and
    # prctl sends no signal; the child sees it has been re-parented.
    from streams.broker import _die_with_parent

    child = subprocess.Popen(["sleep", "30"], preexec_fn=_die_with_parent(os.getpid() + 1_000_000))
    try:
        assert child.wait(5) == 1
    finally:
        if child.poll() is None:
            child.kill()
