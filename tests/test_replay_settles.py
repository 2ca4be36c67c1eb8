"""`deepwatch replay` reports only once what it sent has settled.

Replay sends events that made no progress for ``resend_stall_s`` again
(``runner.wait_until_processed``). Each event then has two copies in the
pipeline, and the first to end made the event count as ended: replay
summed up and returned while the other copy was still on its way, and
when that copy ended as a sighting it replaced the event's dead letter
(one outcome per event, ``findings.plan_dead_letters``). Measured: a full
disk for 40 s under 500 events, a summary of 345 sightings and 155 dead
letters, a store of 368 and 132 ten seconds after replay exited.

Here, end to end on the real broker and a forked worker: the first
event's picture cannot be written for 20 s (ENOSPC at the blob store, the
event held), so the stream stalls and replay sends both events again;
the second event's first fetch fails (a dead letter) and its resend's
gets through (a sighting, a moment later). Replay must wait for that
copy, and its summary must say what the store holds, then and after.
The wait itself is also tested without a broker: a copy that never comes
ends the wait after the stall, and the summary says so."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import load_sitecustomize

# Imported first by every process started with this directory on PYTHONPATH (the replay CLI, the
# zygote its workers fork from): the blob write of the picture named in TEST_SETTLE_FAULTS_DIR/sha
# fails with ENOSPC for the seconds in TEST_SETTLE_FAULTS_DIR/seconds after its first try.
_SITECUSTOMIZE = '''
import os
if os.environ.get("TEST_SETTLE_FAULTS_DIR"):
    import errno
    import time
    from pathlib import Path

    import detectors.atomic_file as _af

    _real = _af.write_atomically
    _dir = Path(os.environ["TEST_SETTLE_FAULTS_DIR"])
    _until = []

    def _write(path, data):
        if Path(path).parent.parent.parent.name == "blobs" and Path(path).name == (_dir / "sha").read_text():
            if not _until:
                _until.append(time.monotonic() + float((_dir / "seconds").read_text()))
            if time.monotonic() < _until[0]:
                with open(_dir / "enospc", "a") as f:
                    f.write("x")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real(path, data)

    _af.write_atomically = _write
'''


def _pictures() -> tuple[bytes, bytes]:
    from io import BytesIO

    from PIL import Image

    out = []
    for angle in (0, 90):
        buf = BytesIO()
        Image.radial_gradient("L").rotate(angle).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out[0], out[1]


class _Host(http.server.ThreadingHTTPServer):
    """Serves ``/a.jpg`` at once; ``/b.jpg`` answers its first request 404
    (a dead letter) and its later ones after ``later_delay_s``."""

    daemon_threads = True

    def __init__(self, a: bytes, b: bytes, later_delay_s: float):
        self.pictures = {"/a.jpg": a, "/b.jpg": b}
        self.later_delay_s = later_delay_s
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Host

    def do_GET(self):
        host = self.server
        with host.lock:
            n = host.hits[self.path] = host.hits.get(self.path, 0) + 1
        try:
            if self.path == "/b.jpg":
                if n == 1:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(host.later_delay_s)
            data = host.pictures[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, *a):
        pass


def _store_counts(data: Path) -> tuple[int, dict[str, int]]:
    from streams.store import open_store

    store = open_store(data)
    try:
        dls: dict[str, int] = {}
        for d in store.dead_letters():
            dls[f"{d.stage}:{d.reason}"] = dls.get(f"{d.stage}:{d.reason}", 0) + 1
        return store.count_sightings(), dls
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replay_returns_once_the_events_it_sent_again_have_ended(tmp_path, monkeypatch):
    import hashlib

    load_sitecustomize(tmp_path, monkeypatch, _SITECUSTOMIZE)
    a, b = _pictures()
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sha").write_text(hashlib.sha256(a).hexdigest())
    # past the blob hold's try at 15.5 s (0.5, 1, 2, 4, 8 s apart): the next, at 31.5 s, gets through,
    # after the stream stood still for the resend's 20 s
    (faults / "seconds").write_text("20")
    host = _Host(a, b, later_delay_s=2.0)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        def line(eid: str, path: str) -> str:
            return json.dumps({"schema_version": 1, "event_id": eid, "platform": "x", "account_id": eid,
                               "posted_at": "2026-05-01T12:00:00Z",
                               "image": {"url": f"http://127.0.0.1:{host.server_address[1]}{path}"}})

        feed = tmp_path / "feed.jsonl"
        # one partition, one event at a time, in feed order: "b" waits behind the held "a"
        feed.write_text(line("a", "/a.jpg") + "\n" + line("b", "/b.jpg") + "\n")
        env = {**os.environ, "TEST_SETTLE_FAULTS_DIR": str(faults), "DEEPWATCH_PARTITIONS": "1",
               "DEEPWATCH_FETCH__ALLOW_PRIVATE_NETWORKS": "true", "DEEPWATCH_FETCH__RETRIES": "0",
               "DEEPWATCH_FETCH__TOTAL_TIMEOUT_S": "8",  # resend_stall_s: its 20 s floor
               "DEEPWATCH_FETCH__READ_TIMEOUT_S": "6",
               "DEEPWATCH_INGEST__FETCH_CONCURRENCY": "1", "DEEPWATCH_INGEST__ANALYZE_CONCURRENCY": "1"}
        env.pop("DEEPWATCH_DATA_DIR", None)
        data = tmp_path / "data"
        r = subprocess.run([sys.executable, "-m", "streams.cli", "replay", str(feed), "--data-dir", str(data),
                            "--workers", "1", "--no-wait-models", "--format", "json", "--timeout", "200"],
                           env=env, capture_output=True, text=True, timeout=280, cwd=Path(__file__).parent.parent)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout)
        at_return = _store_counts(data)
        time.sleep(3)
        later = _store_counts(data)
    finally:
        host.shutdown()
    assert (faults / "enospc").exists(), "the first event's picture never met the full disk"
    assert "resending them" in r.stderr, r.stderr[-3000:]
    # the summary says what the store holds when replay returns, and still a while later
    assert at_return == later == (summary["sightings"], summary["dead_letters"]), (summary, at_return, later)
    # every copy replay sent ended before it returned: b's resend was fetched, and its sighting replaced
    # b's dead letter (one outcome per event)
    assert host.hits == {"/a.jpg": 2, "/b.jpg": 2}, host.hits
    assert summary["complete"] is True and summary["sightings"] == 2 and summary["dead_letters"] == {}
    assert summary["run_outcomes"] == {"sighting": 2, "duplicate": 0, "dead_letter": 0}
    assert summary["resent"] == 2 and summary["resent_unsettled"] == 0


# -- the wait, without a broker ---------------------------------------------------

class _Cluster:
    """What ``wait_until_processed`` uses of a ``runner.Cluster``."""

    def __init__(self, settings):
        self.settings, self.bootstrap = settings, "unused:9092"

    def check_workers(self) -> None:
        pass

    def last_error(self) -> None:
        return None

    def renice(self, role: str, nice: int = 0) -> int:
        return 0


def _wait_with_resends(tmp_path, monkeypatch, land):
    """``wait_until_processed`` over originals (0, 0) and (0, 1), whose resends
    take offsets (0, 2) and (0, 3), after a 2 s stall; ``land(store, at)`` writes outcomes as
    the workers would, ``at`` the seconds since the wait started.
    Returns (wait's result, seconds it took, the ``Resends`` it filled)."""
    from streams import runner
    from streams.ingest import Produced
    from streams.records import DeadLetter, SourceRef
    from streams.settings import Settings
    from streams.store import open_store

    settings = Settings(data_dir=tmp_path / "data")
    topic = settings.topic("events")
    store = open_store(settings.data_dir)
    produced = Produced(offsets={(0, 0), (0, 1)}, origin={(0, 0): 0, (0, 1): 100}, read_back=lambda at: b"{}")

    def produce_lines(lines, bootstrap, settings_, *, run, read_back):
        lines = list(lines)
        return Produced(origin={(0, 2 + i): at for i, (at, _) in enumerate(lines)})

    monkeypatch.setattr(runner, "produce_lines", produce_lines)

    def src(offset: int) -> SourceRef:
        return SourceRef(topic=topic, partition=0, offset=offset, run=produced.run)

    def dead(offset: int, eid: str) -> None:
        store.add_dead_letters([DeadLetter.of("fetch", "http_error", "HTTP 404", b"{}", source=src(offset),
                                              event_id=eid)])

    def duplicate(offset: int, eid: str) -> None:
        store.mark_processed(src(offset), "duplicate", eid)

    stop = threading.Event()
    started = time.monotonic()

    def feed():
        done: set = set()
        while not stop.wait(0.05):
            at = time.monotonic() - started
            for key, write in land(at):
                if key not in done:
                    done.add(key)
                    write(dead, duplicate)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    resends = runner.Resends()
    try:
        ok = runner.wait_until_processed(_Cluster(settings), set(produced.offsets), timeout_s=30, produced=produced,
                                         stall_s=2.0, resends=resends)
        took = time.monotonic() - started
    finally:
        stop.set()
        t.join()
        store.close()
    return ok, took, resends


def test_the_wait_ends_once_both_copies_of_each_resent_event_ended(tmp_path, monkeypatch):
    def land(at):
        # nothing for the 2 s stall: both are sent again (offsets 2, 3); then (0, 0) ends, its copy ends,
        # (0, 1) ends; its copy only at 4 s (within a stall of the last outcome): the wait is for it
        if at > 2.6:
            yield "o0", lambda dead, dup: dead(0, "e0")
            yield "c0", lambda dead, dup: dup(2, "e0")
            yield "o1", lambda dead, dup: dead(1, "e1")
        if at > 4.0:
            yield "c1", lambda dead, dup: dup(3, "e1")

    ok, took, resends = _wait_with_resends(tmp_path, monkeypatch, land)
    assert ok and took >= 4.0
    assert (resends.events, resends.unsettled) == (2, 0)


def test_a_copy_that_never_ends_stops_the_wait_after_the_stall_and_is_counted(tmp_path, monkeypatch):
    def land(at):
        # (0, 1) was lost: only its resend (0, 3) ends; (0, 0) and its copy both end; the wait gives up
        # on (0, 1) a stall (2 s) after the last outcome
        if at > 2.6:
            yield "o0", lambda dead, dup: dead(0, "e0")
            yield "c0", lambda dead, dup: dup(2, "e0")
            yield "c1", lambda dead, dup: dead(3, "e1")

    ok, took, resends = _wait_with_resends(tmp_path, monkeypatch, land)
    assert ok and took < 10
    assert (resends.events, resends.unsettled) == (2, 1)
