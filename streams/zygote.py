"""Local worker processes forked from one that has already imported them.

A local worker is a Python process that imports faust, aiokafka, numpy,
PIL, pydantic and deepwatch's stages before it can join its group: about
a second of CPU each. ``deepwatch replay`` starts three at once (two
pipeline workers and the detect role), and on two cores those imports took
3-4 s of every replay's start-up. The zygote imports them once, while the
broker starts, and forks a worker per request: a fork shares the imported
modules copy-on-write and starts at once.

The zygote is ``python -P -m streams.zygote`` (``SAFE_PATH``), started by ``streams.runner``
with the environment every local worker shares (one BLAS thread each, see
``LOCAL_THREAD_ENV``: read when numpy is imported, so here). It has
one thread, so forking it is safe. Its protocol is JSON lines: requests
``{"argv": [...], "env": {...}, "log": PATH}`` on stdin; on stdout
``{"ready": true}`` once imported, ``{"pid": N}`` per request (in order) and
``{"exit": N, "code": C}`` when a worker ends (``C`` as
``subprocess.Popen.returncode``: negative for a signal); anything else the
process prints goes to stderr. EOF on stdin ends the zygote, and any worker
it forked that still runs: the runner closes it after stopping the workers it
knows of, so what is left is a worker whose spawn was interrupted. A zygote
that dies otherwise leaves its workers running, followed by the runner.

The console script starts it before the command line imports itself when
the command will fork workers (``prestart``, called by ``streams.console``):
its second of imports then runs beside the CLI's own half second on the
other core instead of after it. ``runner.start_cluster`` takes it
(``take_prestarted``); a command that ends before that kills it at exit.

``ZygoteChild`` gives the runner the part of ``subprocess.Popen`` it uses
(``pid``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``returncode``).
Production workers (``deepwatch worker``, one per container) are plain
processes; the zygote is only for the local runner.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from setproctitle import getproctitle, setproctitle

# Local workers share the machine's cores with each other and the broker:
# one BLAS/OpenMP thread each (torch included) instead of one per core in
# every process, which on 2 cores made the pixel model ~3x slower per image
# and took that time from the pipeline. The detect role too: two ONNX threads
# made its model tail slower, not faster, next to other busy processes
# (bench/replay.py --filer). A value the user set is kept. Read when numpy is
# imported, so the zygote starts with it.
LOCAL_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# Interpreter flag for every local worker process: the current directory is not
# put on sys.path (``python -m`` would put it first), so a file there named like a
# module a worker imports (``cv2.py``, ``json.py``) cannot replace it.
SAFE_PATH = ("-P",)
# The commands that fork local workers (``streams.cli.pipeline``'s replay and demo).
FORKING_COMMANDS = frozenset({"replay", "demo"})

# What every role imports before it joins: the worker module, the Faust app,
# the pipeline's stages and the detector plugins each analyze actor builds
# (OpenCV among them). The detect role's model runtime is left out: it brings
# native thread pools that are not safe to fork.
PRELOAD = ("streams.worker", "streams.faust_app", "streams.faust_tuning", "streams.app", "streams.detect_worker",
           "detectors.plugins",
           # Faust imports its app machinery lazily, when a worker builds its app,
           # and the app builders import the stage modules inside
           "faust.app.base", "faust.app.router", "faust.assignor", "faust.events", "faust.fixups.django",
           "faust.tables.objects", "faust.tables.sets", "faust.topics", "faust.transport.utils",
           "streams.findings", "streams.cluster_search", "streams.cursors", "streams.sinks", "streams.sink_stage",
           "streams.stage", "streams.validate", "streams.webhooks", "streams.webhook_redelivery",
           # and at their first event (measured: ~50 ms a pipeline worker): the
           # findings store, httpx's async transport (httpcore, anyio's backend)
           "streams.store", "streams.ingest", "streams.settings_check", "httpcore", "anyio._backends._asyncio",
           # a deployment's settings file (DEEPWATCH_CONFIG), read by every worker's settings
           "tomllib")


def preload() -> None:
    """Import ``PRELOAD`` and do the rest of what every worker's start-up
    would repeat: Faust's extension registries (transports, stores, fixups)
    each scan every installed distribution's entry points the first time
    they are asked (~0.1 s a worker, measured), the fetcher's TLS context
    reads the CA bundle, and ``inspect`` maps every module's file for Faust's
    decorators (below). Measured with 3 workers forked at once on 2 cores:
    these were ~0.3 s of each worker's CPU before it could send its join."""
    import importlib
    import inspect

    for name in PRELOAD:
        importlib.import_module(name)
    from faust import fixups, stores
    from faust.transport import drivers

    from streams.safe_http import tls_context

    for registry, name in ((drivers.TRANSPORTS, "aiokafka"), (stores.STORES, "memory"), (fixups.FIXUPS, "django")):
        registry.get_alias(name)  # the first lookup reads the entry points
    tls_context()
    # Faust's decorators (``app.task``, ``app.timer``, ``app.agent``) ask
    # venusian for their caller's frame, whose ``inspect.getmodule`` first maps
    # every loaded module's file (a realpath each, ~1,100 modules): measured,
    # a forked worker's app build took 44-50 ms of CPU with it, 17-19 without,
    # before the worker can send its join. Mapped here once, the children
    # find their frames' files in the inherited map.
    inspect.getmodule(preload.__code__, preload.__code__.co_filename)
    # The forked workers' collectors then never walk (and so never copy,
    # page by page) the imports they share with this process.
    gc.freeze()


# -- the zygote process ----------------------------------------------------------
def _child(req: dict) -> None:
    """In the forked child: become the worker the request names. Never returns."""
    code = 1
    try:
        # Ctrl-C stays ignored (as the zygote has it) until the worker's output
        # goes to its log: one landing earlier printed a traceback from the
        # middle of ``os.environ.clear()`` on the command's own stderr (CI).
        os.environ.clear()
        os.environ.update(req["env"])
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        # What a fresh interpreter starts with (the zygote ignores Ctrl-C: its
        # workers stop through the runner, and it has nothing to clean up).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["streams.worker", *req["argv"]]
        # ps, top and anything that finds workers by command line (the kill drill, a
        # memory watcher) see what a spawned worker shows, not the zygote's line
        setproctitle(f"{sys.executable} -m streams.worker {' '.join(req['argv'])}")
        from streams.worker import main

        main(list(req["argv"]))  # exits the process itself (streams.worker._exit_now)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the worker's own failure: in its log, as a spawned worker's would be
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(out, children: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            out.write(json.dumps({"exit": pid, "code": code}) + "\n")
            out.flush()
        except BrokenPipeError:  # the runner is gone
            pass


def _end_children(out, children: set[int], grace_s: float = 3.0) -> None:
    """At EOF the runner has stopped every worker it knows of. One still
    running is a worker whose spawn it never heard back from (Ctrl-C while it
    waited for the pid): stopped here, so that it does not outlive the command."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while children and time.monotonic() < deadline:
            _reap(out, children)
            time.sleep(0.02)
        if not children:
            return


def serve() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the runner stops us
    # started with SIGINT blocked (``_sigint_ignored``); the workers forked from here must not inherit that
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    setproctitle(getproctitle())  # claims the argv and environ memory now, while environ is the one it started with
    # The protocol gets stdout's pipe to itself; whatever a library prints while
    # it is imported (or later) goes to stderr instead of corrupting it.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    preload()
    try:
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
    except BrokenPipeError:  # the command that started us ended first (a prestarted zygote, a usage error)
        return
    buf = b""
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        _reap(out, children)
        if not ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            _end_children(out, children)
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                out.close()
                _child(req)
            children.add(pid)
            out.write(json.dumps({"pid": pid}) + "\n")
            out.flush()


# -- the runner's side ------------------------------------------------------------
@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored and blocked while the zygote is started. Ctrl-C reaches
    the whole foreground group, and ``serve`` ignores it, but only once
    Python runs it; an ignored SIGINT survives exec and Python leaves it
    ignored, so a Ctrl-C in the zygote's first moments cannot kill it with a
    traceback either. Blocked too: Linux keeps a blocked signal pending even
    while it is ignored, so a Ctrl-C in that moment reaches this process once
    its handler is back; ignored alone, it was discarded and the command went
    on as if never interrupted (a replay that outlived a Ctrl-C at start-up
    was seen twice). The zygote, started with it blocked, unblocks it in
    ``serve``. Held only while this process has no other thread (the
    console script's ``prestart``): the mask is the calling thread's, and
    another thread may take the Ctrl-C and lose it. Only the main thread may
    change signal handlers; elsewhere: as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C held meanwhile is raised here


class ZygoteChild:
    """A worker the zygote forked: the ``subprocess.Popen`` surface the runner uses."""

    def __init__(self, zygote: "Zygote", pid: int):
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._zygote.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """Start the zygote (``start``), fork workers from it (``spawn``), and
    follow their exits. Started early, it imports while the broker starts;
    ``spawn`` waits for it to be ready."""

    def __init__(self, env: dict[str, str] | None = None):
        """``env``: the environment it imports with; by default this process's, with
        ``LOCAL_THREAD_ENV`` wherever it sets nothing."""
        env = {**LOCAL_THREAD_ENV, **os.environ} if env is None else env
        proc = None
        try:
            with _sigint_ignored():
                proc = subprocess.Popen(
                    [sys.executable, *SAFE_PATH, "-m", "streams.zygote"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=None, env=env, bufsize=0,
                )
        except BaseException:  # a Ctrl-C held while it started: nobody will know of it, so it goes now
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        self.proc = proc
        self._cond = threading.Condition()
        self._ready = False
        self._pids: list[int] = []
        self._exits: dict[int, int] = {}
        self._lock = threading.Lock()  # one request in flight: answers come in request order
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue  # printed before ``serve`` took stdout for the protocol (a sitecustomize, a .pth file)
            if not isinstance(msg, dict):
                continue
            with self._cond:
                if msg.get("ready"):
                    self._ready = True
                elif "pid" in msg:
                    self._pids.append(msg["pid"])
                elif "exit" in msg:
                    self._exits[msg["exit"]] = msg["code"]
                self._cond.notify_all()
        with self._cond:
            self._ready = False
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """Whether it has imported what workers need, so ``spawn`` forks at
        once instead of waiting for it."""
        with self._cond:
            return self._ready

    def spawn(self, argv: list[str], env: dict[str, str], log: Path, timeout_s: float = 60.0) -> ZygoteChild:
        with self._lock:
            deadline = time.monotonic() + timeout_s
            with self._cond:
                while not self._ready:
                    if not self.alive() or not self._cond.wait(max(0.0, deadline - time.monotonic())):
                        raise RuntimeError(f"the worker zygote is not running (exit {self.proc.poll()})")
                n = len(self._pids)
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n").encode())
            with self._cond:
                while len(self._pids) == n:
                    if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                        raise RuntimeError("the worker zygote did not answer")
                return ZygoteChild(self, self._pids[n])

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
        if self.alive():
            return None
        # The zygote is gone (killed, out of memory) and can no longer report:
        # its orphans are reaped by init, so a pid that is gone has exited, how is lost.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return -signal.SIGKILL
        return None

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.exit_code(pid)
            left = None if deadline is None else deadline - time.monotonic()
            if code is not None or (left is not None and left <= 0):
                return code
            with self._cond:
                if pid not in self._exits:
                    self._cond.wait(0.05 if left is None else min(left, 0.05))

    def discard(self) -> None:
        """Stop a zygote nothing was forked from: no need to let it finish importing."""
        self.proc.kill()
        self.close()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)  # it may first stop a worker left running (``_end_children``)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_prestarted: Zygote | None = None


def prestart(args: list[str]) -> Zygote | None:
    """Start the zygote now if ``args`` (the command line after the program
    name) run a command that forks local workers; ``take_prestarted`` hands
    it over. Help requests start nothing. A command that never takes it (a
    usage error, ``local_workers = "spawn"``) kills it when it exits."""
    global _prestarted
    if _prestarted is not None or not args or args[0] not in FORKING_COMMANDS or {"--help", "-h"} & set(args):
        return _prestarted
    import atexit

    atexit.register(_discard_prestarted)  # first: a Ctrl-C right after the start still ends it
    _prestarted = Zygote()
    return _prestarted


def take_prestarted() -> Zygote | None:
    """The zygote ``prestart`` started, once (None if none, or it died)."""
    global _prestarted
    z, _prestarted = _prestarted, None
    if z is not None and not z.alive():
        z.close()
        return None
    return z


def _discard_prestarted() -> None:
    z = take_prestarted()
    if z is not None:
        z.discard()


if __name__ == "__main__":
    serve()
    os._exit(0)  # no interpreter teardown of everything it preloaded (a few tenths of a second)
