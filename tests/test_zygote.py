"""Local workers forked from the zygote (streams.zygote): each gets its
request's environment, argv and log file, and the runner follows, signals and
reaps it as it does a spawned process; `local_workers = "spawn"` still starts
fresh interpreters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from streams import runner
from streams.settings import Settings
from streams.zygote import Zygote


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def test_a_forked_worker_runs_the_worker_entry_point_with_the_request_env_and_log(tmp_path):
    z = Zygote(dict(os.environ))
    try:
        log = tmp_path / "w.log"
        # The embedded broker is refused by `deepwatch worker` with one line and exit 1:
        # the worker's own main ran in the child, with this env, writing to this log.
        child = z.spawn(["--role", "pipeline"], {**os.environ, "DEEPWATCH_BROKER": "embedded"}, log)
        assert child.wait(30) == 1 and child.poll() == 1
        assert "a worker needs --broker" in log.read_text()
        other = z.spawn(["--role", "pipeline"], {**os.environ, "DEEPWATCH_BROKER": "kafka://127.0.0.1:1"},
                        tmp_path / "x.log")
        assert other.wait(30) == 1
        assert "cannot reach the Kafka broker at 127.0.0.1:1" in (tmp_path / "x.log").read_text()
    finally:
        z.close()
    assert z.proc.poll() == 0  # EOF on its stdin ends it


@pytest.mark.slow
def test_runner_forks_workers_that_stop_on_sigterm_and_report_sigkill(tmp_path):
    from streams import zygote as zygotes

    settings = Settings(data_dir=tmp_path / "data")
    assert settings.local_workers == "fork"
    early = zygotes.prestart(["replay", "feed.jsonl"])  # as `deepwatch replay` does before reading settings
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        assert cluster.zygote is early is not None  # the one already importing, not a second
        w = cluster.start_worker("pipeline")
        cluster.wait_ready(timeout_s=60)
        assert "Worker ready" in w.log_path.read_text()
        assert parent_of(w.proc.pid) == cluster.zygote.proc.pid  # forked, not a fresh interpreter
        # ps shows the worker's role and state, not the zygote's command line
        assert b"streams.worker --role pipeline [init]" in Path(f"/proc/{w.proc.pid}/cmdline").read_bytes()
        w.stop(timeout=30)
        assert w.proc.returncode == 0, w.log_path.read_text()[-2000:]

        killed = cluster.start_worker("pipeline")
        cluster.wait_ready(timeout_s=60)
        killed.kill()
        assert killed.proc.returncode == -signal.SIGKILL
        zygote = cluster.zygote
    assert zygote.proc.poll() is not None  # closed with the cluster


@pytest.mark.slow
def test_spawn_mode_starts_fresh_interpreters(tmp_path):
    from streams import zygote

    settings = Settings(data_dir=tmp_path / "data", local_workers="spawn")
    early = zygote.prestart(["replay", "feed.jsonl"])  # what the console script did before settings were read
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        assert cluster.zygote is None
        assert early is not None and early.proc.poll() is not None  # not used, so not left running
        w = cluster.start_worker("pipeline")
        cluster.wait_ready(timeout_s=60)
        assert parent_of(w.proc.pid) == os.getpid()


@pytest.mark.slow
def test_a_worker_whose_zygote_died_is_still_followed(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        w = cluster.start_worker("pipeline")
        cluster.wait_ready(timeout_s=60)
        cluster.zygote.proc.kill()  # e.g. the out-of-memory killer
        cluster.zygote.proc.wait()
        assert w.proc.poll() is None  # the worker runs on, reparented
        os.kill(w.proc.pid, signal.SIGKILL)
        assert w.proc.wait(10) == -signal.SIGKILL  # its end is still seen, if not how
        with pytest.raises(RuntimeError, match="pipeline worker exited"):
            cluster.check_workers()
        w.expected_exit = True


_BUILD_AFTER_PRELOAD = """
import json, sys
import mode.utils.imports as mi
from streams.zygote import preload
preload()
calls = []
real = mi.entry_points
def counting(*a, **k):
    calls.append(1)
    return real(*a, **k)
mi.entry_points = counting
import inspect
mapped = []  # files inspect.getmodule maps to modules (its scan of sys.modules)
real_abs = inspect.getabsfile
def mapping(*a, **k):
    mapped.append(1)
    return real_abs(*a, **k)
inspect.getabsfile = mapping
before = set(sys.modules)
from streams.app import build_pipeline_app
from streams.settings import Settings
app = build_pipeline_app(Settings(data_dir=sys.argv[1]), "tansu://127.0.0.1:9")
app.transport, app.tables
print(json.dumps({"new": sorted(set(sys.modules) - before), "entry_points": len(calls), "mapped": len(mapped)}))
"""


def test_a_forked_worker_builds_its_app_from_what_the_zygote_preloaded(tmp_path):
    """Whatever a pipeline worker imports or scans while it builds its app is
    CPU spent by every worker, three at once on two cores, before it can send
    its join: the zygote does it once (Faust's lazy app modules, the stage
    modules, the entry-point registries, the TLS context, and the map of
    module files that Faust's decorators make ``inspect`` build)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BUILD_AFTER_PRELOAD, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert built == {"new": [], "entry_points": 0, "mapped": 0}


def _zygotes_marked(marker: str) -> list[int]:
    """Live zygote processes whose environment holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"streams.zygote" in cmd and marker.encode() in env:
            pids.append(int(entry.name))
    return pids


def test_the_console_script_prestarts_the_zygote_only_for_commands_that_fork_workers():
    from streams import zygote

    for args in ([], ["clusters"], ["replay", "--help"], ["demo", "-h"]):
        assert zygote.prestart(args) is None
    assert zygote.take_prestarted() is None
    z = zygote.prestart(["replay", "feed.jsonl"])
    try:
        assert z is not None and z.alive()
        assert zygote.prestart(["replay", "feed.jsonl"]) is z  # one, however often asked
        assert zygote.take_prestarted() is z
        assert zygote.take_prestarted() is None  # handed over once
        # it is a working zygote: it forks a worker as one started by the runner would
        child = z.spawn(["--role", "pipeline"], {**os.environ, "DEEPWATCH_BROKER": "embedded"}, Path(os.devnull))
        assert child.wait(30) == 1
    finally:
        z.close()


@pytest.mark.parametrize("args", [["replay", "/nonexistent/feed.jsonl"], ["replay", "--no-such-option", "x"]])
def test_a_replay_that_ends_on_a_usage_error_leaves_no_zygote_and_no_traceback(tmp_path, args):
    marker = f"DW_TEST_MARKER_{os.getpid()}_{len(args[1])}"
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from streams.console import main; sys.argv[0] = 'deepwatch'; main()", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, marker: "1"}, cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and ("does not exist" in done.stderr or "No such option" in done.stderr)
    # run() returned once every holder of its stderr pipe had closed it, the
    # zygote included (it inherits stderr): any complaint of its is above
    time.sleep(0.2)
    assert _zygotes_marked(marker) == []


def test_output_on_stdout_while_the_zygote_starts_does_not_break_its_protocol(tmp_path):
    # a sitecustomize (or any library) printing while the interpreter starts and imports
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('hello from sitecustomize')\nprint('{\"pid\": 1}')\n")
    z = Zygote({**os.environ, "PYTHONPATH": str(site)})
    try:
        log = tmp_path / "w.log"
        child = z.spawn(["--role", "pipeline"], {**os.environ, "DEEPWATCH_BROKER": "embedded"}, log)
        assert child.pid != 1 and child.wait(30) == 1
        assert "a worker needs --broker" in log.read_text()
    finally:
        z.close()


@pytest.mark.slow
def test_replay_from_a_directory_with_a_file_named_like_a_module_workers_import(tmp_path):
    """``python -m`` puts the current directory first on sys.path: a ``cv2.py``
    there replaced OpenCV in every local worker (the demo hung for minutes)."""
    import json

    from bench.replay import build

    script = Path(sys.executable).with_name("deepwatch")
    if not script.exists():
        pytest.skip(f"no console script at {script} (run `make install`)")
    feed = build(tmp_path / "feed", pictures=4, reposts=2)
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "shadow-imported"
    (work / "cv2.py").write_text(f"open({str(marker)!r}, 'w').close()\nprint('not OpenCV')\nraise SystemExit(3)\n")
    r = subprocess.run([str(script), "replay", str(feed), "--data-dir", str(tmp_path / "data"), "--json", "--timeout", "120"],
                       cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["processed"] == summary["produced"] > 0
    assert not marker.exists() and "Traceback" not in r.stderr


def test_closing_the_zygote_stops_a_worker_the_runner_never_heard_of(tmp_path):
    # Ctrl-C while the runner waited for a spawn's pid: the worker runs, unknown to the
    # runner, which stops the workers it knows and closes the zygote.
    import socket

    with socket.socket() as silent:  # a "broker" that accepts and never answers: the worker waits on it
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        z = Zygote(dict(os.environ))
        try:
            child = z.spawn(["--role", "pipeline"], {**os.environ, "DEEPWATCH_BROKER": f"kafka://127.0.0.1:{silent.getsockname()[1]}"},
                            tmp_path / "w.log")
            time.sleep(1.0)
            assert child.poll() is None  # still starting, waiting on the broker
        finally:
            started = time.monotonic()
            z.close()
        assert z.proc.returncode == 0 and time.monotonic() - started < 10
        with pytest.raises(ProcessLookupError):
            os.kill(child.pid, 0)


# Ctrl-C that reaches a just-forked worker before its output goes to its log:
# in CI it printed a traceback from inside ``os.environ.clear()`` on the
# command's own stderr. Raising it from the log's opening hits that window.
CHILD_INTERRUPTED_BEFORE_ITS_LOG = """
import os, signal, sys
from streams import zygote
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the zygote has it when it forks
log, open_ = sys.argv[1], os.open
def opening(path, *args, **kwargs):
    if path == log:
        os.kill(os.getpid(), signal.SIGINT)
    return open_(path, *args, **kwargs)
os.open = opening
zygote._child({"argv": [], "env": {"PATH": os.environ["PATH"]}, "log": log})
"""


def test_ctrl_c_before_a_forked_worker_has_its_log_prints_nothing_on_the_commands_stderr(tmp_path):
    log = tmp_path / "worker.log"
    r = subprocess.run([sys.executable, "-c", CHILD_INTERRUPTED_BEFORE_ITS_LOG, str(log)], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert r.stderr == "" and r.stdout == "", r.stderr[-2000:]
    assert "a worker needs --broker" in log.read_text()  # the worker ran on, and said why it stopped, in its log


# Ctrl-C while the command starts the zygote: SIGINT was ignored for that
# moment (so that the zygote starts ignoring it) and a Ctrl-C then was lost;
# the command went on as if never interrupted. Sent from inside the start.
CTRL_C_WHILE_THE_ZYGOTE_STARTS = """
import os, signal, subprocess, sys, time
from streams import zygote
started, Popen = [], subprocess.Popen
class Interrupted(Popen):
    def __init__(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        super().__init__(*args, **kwargs)
        started.append(self.pid)
subprocess.Popen = Interrupted
try:
    z = zygote.Zygote()
except KeyboardInterrupt:
    print("interrupted", "left" if os.path.exists(f"/proc/{started[0]}") else "nothing left")
else:
    print("not interrupted")
    z.discard()
"""


def test_ctrl_c_while_the_zygote_starts_is_raised_once_it_started_and_leaves_nothing():
    r = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_THE_ZYGOTE_STARTS], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert r.stdout.strip() == "interrupted nothing left", (r.stdout, r.stderr[-2000:])
