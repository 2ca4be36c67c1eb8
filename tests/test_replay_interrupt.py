"""Stopping `deepwatch replay` from outside. Ctrl-C: the terminal sends
SIGINT to the whole foreground process group -- the CLI, the zygote and
every worker. The embedded broker runs in a process group of its own, so it
is still there while the workers commit and flush, and the CLI stops it
last (before, it died first and the CLI took 30-35 s to end). SIGTERM (a
supervisor, `timeout`) reaches the CLI alone, which unwinds as on Ctrl-C
(before, it died and left its workers and broker running)."""

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


def start_replay(tmp_path: Path, **popen) -> subprocess.Popen:
    """A replay in a session of its own, started as the ``deepwatch`` script starts it (its zygote
    prestarted), returned once its workers are ready."""
    feed = build(tmp_path / "feed", pictures=40, reposts=10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.console", "replay", str(feed), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True, **popen,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "workers ready" in line:
            return proc
    pytest.fail(f"replay ended before its workers were ready (exit {proc.wait()})")


def stop_and_time(proc: subprocess.Popen, stop) -> float:
    t0 = time.monotonic()
    try:
        stop()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.monotonic() - t0


def assert_nothing_left(proc: subprocess.Popen, tmp_path: Path) -> None:
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no worker, zygote or anything else of the group is left
    listening = re.search(r"listening on: (tcp://\S+)", (tmp_path / "data" / "logs" / "tansu.log").read_text())
    assert listening, "the broker's log names no listener"
    left = subprocess.run(["pgrep", "-f", f"listener-url {listening.group(1)}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the broker, in its own group, was left running"


def test_ctrl_c_ends_replay_and_every_process_it_started_within_seconds(tmp_path):
    # a terminal's foreground job: SIGINT is not ignored (a background job's would be)
    proc = start_replay(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    took = stop_and_time(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert proc.returncode not in (0, None)
    assert took < 10, f"replay took {took:.1f}s to end after Ctrl-C"
    assert_nothing_left(proc, tmp_path)
    assert proc.stderr.read().strip().splitlines()[-1:] == ["interrupted"]  # not a silent exit 130


def test_sigterm_to_the_cli_alone_stops_what_it_started(tmp_path):
    proc = start_replay(tmp_path)
    took = stop_and_time(proc, proc.terminate)
    assert proc.returncode not in (0, None)
    assert took < 10, f"replay took {took:.1f}s to end after SIGTERM"
    assert_nothing_left(proc, tmp_path)
    assert proc.stderr.read().strip().splitlines()[-1:] == ["terminated"]


def _group_members(pgid: int) -> list[str]:
    """Live processes of process group ``pgid``: pid, state and command line.
    Not zombies: they run nothing. One is left when the zygote is killed
    while an import of its runs a command (croniter, imported by faust, runs
    ``file`` on the interpreter) and this machine's PID 1 does not reap the
    orphan (seen once in 20 Ctrl-Cs at 0.25-0.7 s). Nor processes exiting:
    their memory already gone (an empty command line), they run nothing
    either, and their status has no ``Umask`` line, so the state is read by
    its key (line 3 was taken for it: "Tgid: 12412" failed a full-suite run)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines()
                                  if ":" in line)
                    state = status.get("State", "").strip()
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
                    if state[:1] in ("Z", "X") or not cmdline:
                        continue
                    out.append(f"{entry.name} {state} {cmdline!r}")
            except (OSError, IndexError):
                continue
    return out


def _brokers_logging_to(log: Path) -> list[int]:
    """Live processes whose stdout is ``log`` (the embedded broker writes its log there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "fd" / "1")) == log:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("after_s", [0.2, 0.6, 1.0, 1.4])
def test_ctrl_c_while_replay_starts_leaves_nothing_and_no_traceback(tmp_path, after_s):
    # during the command line's imports (the zygote prestarted beside them), the broker's start, or the workers'
    feed = build(tmp_path / "feed", pictures=4, reposts=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.console", "replay", str(feed), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(after_s)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # Seen once in a full-suite run under load: say which process held the
        # stop, what replay printed and what the workers and broker logged.
        stuck = _group_members(proc.pid)
        os.kill(proc.pid, signal.SIGUSR1)  # streams.console: every thread's stack, on stderr
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        logs = {p.name: p.read_text(errors="replace")[-1500:] for p in (tmp_path / "data" / "logs").glob("*")
                if p.is_file()}
        pytest.fail(f"replay still running 30 s after Ctrl-C at {after_s} s; processes: {stuck}; "
                    f"stderr (its stacks at the end): {err[-6000:]!r}; logs: {logs}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode not in (0, None) and "Traceback" not in err, err[-2000:]
    time.sleep(0.5)
    left = _group_members(proc.pid)
    assert not left, (left, err[-2000:])  # no zygote or worker of the group is left
    assert _brokers_logging_to(tmp_path / "data" / "logs" / "tansu.log") == []  # nor the broker, in its own group


# Ctrl-C that lands while one of these is still being imported: the console
# script's own imports, then the ones ``run_cli`` makes before the command runs
# (rich's markdown, lazily). Timed signals (above) hit that window only on a
# loaded machine; an import hook raising KeyboardInterrupt hits it every time.
INTERRUPT_IN_IMPORT = """
import sys
module = sys.argv[1]
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["deepwatch", "replay", "--help"]
from streams.console import main
main()
"""


@pytest.mark.parametrize("module", ["streams.cli", "typer._adapters", "typer._click._textwrap"])  # the last two: while --help is written
def test_ctrl_c_during_the_command_lines_imports_ends_in_one_line(module):
    r = subprocess.run([sys.executable, "-c", INTERRUPT_IN_IMPORT, module], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert (r.returncode, r.stderr.strip()) == (130, "interrupted"), r.stderr[-2000:]


# Ctrl-C that lands while an import builds a dataclass: Python 3.11 wraps a
# KeyboardInterrupt raised in a field's ``__set_name__`` in a RuntimeError
# (seen once in 60 timed Ctrl-Cs 0.2 s into ``replay``, inside rich.progress).
INTERRUPT_IN_SET_NAME = """
import dataclasses, sys
module, set_name = sys.argv[1], dataclasses.Field.__set_name__
def interrupted(self, owner, name):
    if owner.__module__ == module:
        raise KeyboardInterrupt
    return set_name(self, owner, name)
dataclasses.Field.__set_name__ = interrupted
sys.argv = ["deepwatch", "replay", "--help"]
from streams.console import main
main()
"""


@pytest.mark.parametrize("module", ["rich.progress"])
def test_ctrl_c_wrapped_by_python_during_an_import_ends_in_one_line(module):
    r = subprocess.run([sys.executable, "-c", INTERRUPT_IN_SET_NAME, module], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert (r.returncode, r.stderr.strip()) == (130, "interrupted"), r.stderr[-2000:]


# Ctrl-C that lands while a native extension runs a hook: pydantic-core
# building a model's serializer answered it with a ``SchemaError`` naming the
# interrupt but linked to nothing (CI, Ctrl-C 0.2 s into ``replay``). A real
# SIGINT, then an unrelated failure raised outside its handling, as there.
INTERRUPT_SWALLOWED_BY_AN_EXTENSION = """
import os, signal, sys, time
module = sys.argv[1]
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
            raise ValueError("Error building serializer: KeyboardInterrupt")
sys.meta_path.insert(0, Interrupt())
sys.argv = ["deepwatch", "replay", "--help"]
from streams.console import main
main()
"""


@pytest.mark.parametrize("module", ["streams.settings", "typer._click._textwrap"])
def test_ctrl_c_swallowed_by_an_extension_during_an_import_ends_in_one_line(module):
    r = subprocess.run([sys.executable, "-c", INTERRUPT_SWALLOWED_BY_AN_EXTENSION, module], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert (r.returncode, r.stderr.strip()) == (130, "interrupted"), r.stderr[-2000:]


# Ctrl-C that lands while ``run_cli`` installs its SIGTERM handler, before its
# own try: seen as a KeyboardInterrupt traceback twice in ~540 timed Ctrl-Cs at
# 0.5-2 s under load. Raising it from that very call hits the window every time.
INTERRUPT_AT_SIGTERM_HANDLER = """
import signal, sys
install = signal.signal
def interrupted(sig, handler):
    if sig == signal.SIGTERM:
        raise KeyboardInterrupt
    return install(sig, handler)
signal.signal = interrupted
sys.argv = ["deepwatch", "clusters", "--help"]
from streams.console import main
main()
"""


def test_ctrl_c_while_the_command_line_installs_its_handlers_ends_in_one_line():
    r = subprocess.run([sys.executable, "-c", INTERRUPT_AT_SIGTERM_HANDLER], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert (r.returncode, r.stderr.strip()) == (130, "interrupted"), r.stderr[-2000:]


def test_sigusr1_prints_the_commands_stacks_and_lets_it_run_on(tmp_path):
    # the diagnosis a command that does not end needs (the hang above was seen twice)
    proc = subprocess.Popen([sys.executable, "-m", "streams.console", "broker", "--port", "0", "--data-dir",
                             str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        time.sleep(3)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1)
        assert proc.poll() is None  # still running
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "(most recent call first)" in err and "File " in err, err[-2000:]


def test_after_a_stop_only_a_failure_that_names_it_is_taken_for_it(monkeypatch):
    # a command that goes on after a Ctrl-C (it stops following a feed, say) still reports its own errors
    from streams import console
    from streams.cli.common import Terminated

    monkeypatch.setattr(console, "_received", None)
    assert console.interruption(ValueError("Error building serializer: KeyboardInterrupt")) is None  # no stop yet
    stop = console.received(KeyboardInterrupt())
    assert console.interruption(ValueError("no such table: sightings")) is None
    assert console.interruption(ValueError("Error building serializer: KeyboardInterrupt")) is stop
    term = console.received(Terminated())
    assert console.interruption(RuntimeError("SchemaError: Terminated: ")) is term
