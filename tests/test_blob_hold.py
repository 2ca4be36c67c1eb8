"""A picture the blob store cannot write for a reason that passes (the disk
full, a quota, EIO, a read-only remount) holds its event and is written again
with backoff; one that would fail again for this file (EFBIG, ENAMETOOLONG)
still ends as one ``blob:blob_write`` dead letter (``streams.stage``).

Real fetcher, analyzer and blob store; the failures are injected at the
blob store's write call (``detectors.atomic_file.write_atomically``)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from pathlib import Path
from unittest import mock

import pytest
from prometheus_client import REGISTRY

import streams.blobstore as blobstore
import streams.stage as stage_mod
from streams import metrics
from streams.analyze import Analyzer
from streams.blobstore import DirectoryBlobStore
from streams.fetch import ImageFetcher
from streams.findings import PostIdentity
from streams.records import ClusterOp, SourceRef
from streams.settings import Settings
from streams.stage import AnalyzeStage
from tests.hostile import corpus
from tests.support import load_sitecustomize


class _Store:
    def sighting_identity(self, event_id):
        return None


def stored_post(event_id: str, sha256: str | None) -> PostIdentity | None:
    """A store's answer for the sighting ``_event`` gives ``event_id`` (``e{n}``: platform x, account a{n})."""
    return PostIdentity(sha256, "x", "a" + event_id[1:]) if sha256 else None


def _event(n: int, path: str) -> bytes:
    return json.dumps({"event_id": f"e{n}", "platform": "x", "account_id": f"a{n}",
                       "posted_at": "2026-05-01T12:00:00Z", "image": {"path": path}}).encode()


PICTURES = {"small.png": corpus.picture_png(1, (256, 192)), "large.png": corpus.picture_png(2, (640, 480))}


def _stage(tmp_path: Path, store=None, *, deadline_s: float = 120.0, inline_max_pixels: int = 4_000_000,
           lookup_retry_s: float = 0.5) -> AnalyzeStage:
    """An analyze stage over local files ``PICTURES`` and a findings store
    (``store``; default: one that has stored nothing) that it asks again
    ``lookup_retry_s`` after a lookup that may pass failed."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name, data in PICTURES.items():
        (images / name).write_bytes(data)
    settings = Settings(data_dir=tmp_path / "data", ingest={"image_roots": [images], "event_deadline_s": deadline_s},
                        batch={"analyze_inline_max_pixels": inline_max_pixels},
                        findings={"retry_initial_s": lookup_retry_s})
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    fetcher = ImageFetcher(settings.fetch, settings.ingest, blobs)
    store = store or _Store()
    return AnalyzeStage(settings, fetcher, Analyzer(settings, tmp_path / "blobs"), blobs.put, lambda: store)


def cancel_while_held(stage: AnalyzeStage, tried, held_s) -> tuple[float, float]:
    """Process one event until ``tried()`` says its first try failed, let it
    wait 0.3 s, then cancel it as a stopping worker does: (``held_s()`` just
    before the cancel, seconds the cancel took)."""

    async def go():
        task = asyncio.ensure_future(stage.process(_event(0, "small.png"),
                                                   SourceRef(topic="events", partition=0, offset=0)))
        while not tried():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        held = held_s()
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return held, time.monotonic() - started

    return asyncio.run(go())


class _Failing:
    """``write_atomically`` failing with ``code`` the first ``times`` calls."""

    def __init__(self, code: int, times: int):
        self.code, self.left, self.calls = code, times, 0
        self.real = blobstore.write_atomically

    def __call__(self, path, data):
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise OSError(self.code, os.strerror(self.code))
        return self.real(path, data)


def _process(stage: AnalyzeStage, raw: bytes):
    return asyncio.run(stage.process(raw, SourceRef(topic="events", partition=0, offset=0)))


def _failures() -> float:
    return metrics.BLOB_WRITE_FAILURES._value.get()


def _held_s() -> float:
    """``deepwatch_blob_store_held_seconds`` as a scrape reads it."""
    return REGISTRY.get_sample_value("deepwatch_blob_store_held_seconds")


@pytest.mark.parametrize("picture", ["small.png", "large.png"])  # on the event loop / in a thread
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
def test_a_blob_store_that_cannot_write_for_a_while_holds_the_event_then_it_is_a_sighting(
        tmp_path, monkeypatch, code, picture):
    # backoff 0.2 + 0.4 + 0.8 s: longer than the event's whole deadline, which the waits are not charged to
    monkeypatch.setattr(stage_mod, "BLOB_RETRY_INITIAL_S", 0.2)
    stage = _stage(tmp_path, deadline_s=1.0, inline_max_pixels=200_000)
    failing = _Failing(code, 3)
    before = _failures()
    started = time.monotonic()
    with mock.patch("streams.blobstore.write_atomically", failing):
        result = _process(stage, _event(0, picture))
    took = time.monotonic() - started
    assert result.dead is None, result.dead
    sighting = ClusterOp.loads(result.op).sighting
    assert sighting.event.event_id == "e0"
    assert failing.calls == 4 and _failures() - before == 3
    assert 1.4 <= took < 5.0, took
    stored = DirectoryBlobStore(tmp_path / "blobs")
    assert stored.exists(sighting.sha256) and stored.get(sighting.sha256) == (tmp_path / "images" / picture).read_bytes()
    assert _held_s() == 0.0  # nothing held any more (read through set_function)


@pytest.mark.parametrize("code", [errno.EFBIG, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EACCES])
def test_a_write_that_would_fail_again_for_this_file_is_one_dead_letter_at_once(tmp_path, code):
    stage = _stage(tmp_path)
    failing = _Failing(code, 1_000)
    before = _failures()
    with mock.patch("streams.blobstore.write_atomically", failing):
        result = _process(stage, _event(0, "small.png"))
    assert result.op is None and failing.calls == 1 and _failures() == before
    dead = result.dead
    assert (dead.stage, dead.reason, dead.event_id) == ("blob", "blob_write", "e0")
    assert os.strerror(code) in dead.detail and str(tmp_path / "blobs") in dead.detail


def test_a_held_write_that_then_fails_for_good_is_one_dead_letter(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_mod, "BLOB_RETRY_INITIAL_S", 0.05)
    stage = _stage(tmp_path)
    calls = []

    def write(path, data):
        calls.append(1)
        raise OSError(errno.ENOSPC if len(calls) < 3 else errno.EFBIG, "no")

    with mock.patch("streams.blobstore.write_atomically", write):
        result = _process(stage, _event(0, "small.png"))
    assert len(calls) == 3 and (result.dead.stage, result.dead.reason) == ("blob", "blob_write")


def test_a_stop_ends_a_held_event_at_once_and_leaves_it_unacked(tmp_path, monkeypatch):
    """The worker stopping (its agents cancelled) while a picture waits for a
    full disk: the wait ends at once, the event has no outcome (it is read
    again from its uncommitted offset), and the gauge says nothing is held."""
    monkeypatch.setattr(stage_mod, "BLOB_RETRY_INITIAL_S", 30.0)
    stage = _stage(tmp_path)
    failing = _Failing(errno.ENOSPC, 1_000)

    with mock.patch("streams.blobstore.write_atomically", failing):
        held, stop_s = cancel_while_held(stage, lambda: failing.calls > 0, _held_s)
    assert held >= 0.25 and stop_s < 0.5 and failing.calls == 1
    assert _held_s() == 0.0


# -- through the real pipeline: embedded broker, a forked worker, `deepwatch replay` --
# Imported first by every process started with this directory on PYTHONPATH
# (the replay CLI, the zygote its workers fork from): blob writes fail as
# TEST_BLOB_FAULTS_DIR says, before streams.blobstore takes the function.
_SITECUSTOMIZE = '''
import os
if os.environ.get("TEST_BLOB_FAULTS_DIR"):
    import errno
    from pathlib import Path

    import detectors.atomic_file as _af

    _real = _af.write_atomically
    _dir = Path(os.environ["TEST_BLOB_FAULTS_DIR"])

    def _write(path, data):
        if Path(path).parent.parent.parent.name == "blobs":
            if Path(path).name == (_dir / "efbig").read_text():
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            count = _dir / "enospc"
            n = int(count.read_text())
            if n > 0:
                count.write_text(str(n - 1))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real(path, data)

    _af.write_atomically = _write
'''


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_through_the_pipeline_a_full_disk_holds_and_a_file_too_large_dead_letters(tmp_path, monkeypatch):
    import hashlib
    import subprocess
    import sys

    from streams.store import open_store

    load_sitecustomize(tmp_path, monkeypatch, _SITECUSTOMIZE)
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "enospc").write_text("3")
    feed_dir = tmp_path / "feed"
    feed_dir.mkdir()
    held, too_large = corpus.picture_png(1, (256, 192)), corpus.picture_png(2, (300, 200))
    (feed_dir / "held.png").write_bytes(held)
    (feed_dir / "too_large.png").write_bytes(too_large)
    (faults / "efbig").write_text(hashlib.sha256(too_large).hexdigest())
    feed = feed_dir / "feed.jsonl"
    feed.write_text("\n".join(json.dumps({
        "event_id": eid, "platform": "x", "account_id": eid, "posted_at": "2026-05-01T12:00:00Z",
        "image": {"path": str(feed_dir / name)}}) for eid, name in (("held", "held.png"), ("big", "too_large.png")))
        + "\n")
    data = tmp_path / "data"
    env = {**os.environ, "TEST_BLOB_FAULTS_DIR": str(faults)}
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir", str(data),
                        "--workers", "1", "--no-wait-models", "--json", "--timeout", "200"],
                       capture_output=True, text=True, env=env, timeout=280)
    assert r.returncode == 0, f"replay failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["dead_letters"] == {"blob:blob_write": 1}
    assert (summary["run_outcomes"].get("sighting"), summary["run_outcomes"].get("dead_letter")) == (1, 1)
    assert (faults / "enospc").read_text() == "0"  # the three ENOSPC failures were all met
    store = open_store(data)
    assert store.sighting_identity("held").sha256 == hashlib.sha256(held).hexdigest()
    [dl] = store.dead_letters()
    assert (dl.event_id, dl.stage, dl.reason) == ("big", "blob", "blob_write")
    assert DirectoryBlobStore(data / "blobs").get(hashlib.sha256(held).hexdigest()) == held
    log = "".join(p.read_text() for p in (data / "logs").glob("*.log"))
    assert log.count("blob store write failed") == 3 and '"errno": "ENOSPC"' in log
