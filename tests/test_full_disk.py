"""A full data disk never turns a valid event into a dead letter.

The analyze stage writes two things to the data dir per new picture: its
analysis cache (``blobs/analysis/``: hashes and cheap evidence, so a repost is
not decoded again) and then the picture itself (``blobs/``). The cache is an
optimisation: a write of it that fails is logged, rate-limited, and the event
goes on; the picture's write then holds the event while the disk stays full
(``tests/test_blob_hold.py``). The cache write came first and its ENOSPC fell
into the stage's catch-all: a 40 s full disk dead-lettered 155 of 500 valid
events as ``decode:internal_error OSError: [Errno 28] No space left on device``.

The failures are injected at ``write_atomically`` as each module took it."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from unittest import mock

import pytest

import streams.analyze as analyze_mod
import streams.blobstore as blobstore
import streams.stage as stage_mod
from streams.analyze import Analyzer, analysis_path
from streams.blobstore import DirectoryBlobStore
from streams.fetch import ImageFetcher
from streams.records import ClusterOp, ImageEvent, SourceRef
from streams.settings import Settings
from streams.stage import AnalyzeStage
from tests.hostile import corpus
from tests.support import load_sitecustomize

PICTURES = {"small.png": corpus.picture_png(1, (256, 192)), "large.png": corpus.picture_png(2, (640, 480)),
            "other.png": corpus.picture_png(3, (256, 192))}


class _Store:
    def sighting_identity(self, event_id):
        return None


class _Failing:
    """A ``write_atomically`` failing with ``code`` the first ``times`` calls (all: None)."""

    def __init__(self, real, code: int = errno.ENOSPC, times: int | None = None):
        self.real, self.code, self.left, self.calls = real, code, times, 0

    def __call__(self, path, data):
        self.calls += 1
        if self.left is None or self.left > 0:
            if self.left is not None:
                self.left -= 1
            raise OSError(self.code, os.strerror(self.code))
        return self.real(path, data)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(analyze_mod, "_cache_warned", {}, raising=False)


def _stage(tmp_path: Path, analyzer=None) -> AnalyzeStage:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name, data in PICTURES.items():
        (images / name).write_bytes(data)
    settings = Settings(data_dir=tmp_path / "data", ingest={"image_roots": [images], "event_deadline_s": 60.0},
                        batch={"analyze_inline_max_pixels": 200_000})  # small.png on the loop, large.png in a thread
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    fetcher = ImageFetcher(settings.fetch, settings.ingest, blobs)
    return AnalyzeStage(settings, fetcher, analyzer or Analyzer(settings, tmp_path / "blobs"), blobs.put,
                        lambda: _Store())


def _event(n: int, name: str) -> bytes:
    return json.dumps({"event_id": f"e{n}", "platform": "x", "account_id": f"a{n}",
                       "posted_at": "2026-05-01T12:00:00Z", "image": {"path": name}}).encode()


def _process(stage: AnalyzeStage, raw: bytes):
    return asyncio.run(stage.process(raw, SourceRef(topic="events", partition=0, offset=0)))


def _sighting(result):
    assert result.dead is None, result.dead
    return ClusterOp.loads(result.op).sighting


@pytest.mark.parametrize("picture", ["small.png", "large.png"])  # on the event loop / in a thread
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_an_analysis_cache_that_cannot_be_written_does_not_fail_the_event(tmp_path, code, picture, caplog):
    stage = _stage(tmp_path)
    failing = _Failing(analyze_mod.write_atomically, code)
    with mock.patch("streams.analyze.write_atomically", failing), caplog.at_level(logging.WARNING, "streams.analyze"):
        sighting = _sighting(_process(stage, _event(0, picture)))
    data = PICTURES[picture]
    assert sighting.sha256 == hashlib.sha256(data).hexdigest() and sighting.hashes is not None
    assert failing.calls == 1
    assert not analysis_path(tmp_path / "blobs", sighting.sha256).exists()
    assert DirectoryBlobStore(tmp_path / "blobs").get(sighting.sha256) == data  # the picture is stored all the same
    [warned] = [r for r in caplog.records if "analysis cache write failed" in r.getMessage()]
    assert warned.levelno == logging.WARNING
    assert warned.errno == errno.errorcode[code]
    assert str(tmp_path / "blobs" / "analysis") in warned.path and str(tmp_path / "blobs" / "analysis") in \
        warned.getMessage()


def test_the_failures_are_logged_once_per_errno_a_while_not_once_per_event(tmp_path, caplog):
    stage = _stage(tmp_path)
    failing = _Failing(analyze_mod.write_atomically)
    with mock.patch("streams.analyze.write_atomically", failing), caplog.at_level(logging.WARNING, "streams.analyze"):
        for n, name in enumerate(PICTURES):
            _sighting(_process(stage, _event(n, name)))
        failing.code = errno.EIO
        (tmp_path / "images" / "fourth.png").write_bytes(corpus.picture_png(4, (256, 192)))
        _sighting(_process(stage, _event(3, "fourth.png")))
    assert failing.calls == 4
    warned = [r for r in caplog.records if "analysis cache write failed" in r.getMessage()]
    assert [r.errno for r in warned] == ["ENOSPC", "EIO"]


def test_a_disk_full_for_both_writes_holds_the_event_then_it_is_a_sighting(tmp_path, monkeypatch):
    # The reported case: the cache's write fails, then the picture's; the
    # picture's is held and written again once the disk has room.
    monkeypatch.setattr(stage_mod, "BLOB_RETRY_INITIAL_S", 0.05)
    stage = _stage(tmp_path)
    cache = _Failing(analyze_mod.write_atomically)
    blob = _Failing(blobstore.write_atomically, times=2)
    with mock.patch("streams.analyze.write_atomically", cache), mock.patch("streams.blobstore.write_atomically", blob):
        sighting = _sighting(_process(stage, _event(0, "large.png")))
    assert (cache.calls, blob.calls) == (1, 3)
    assert DirectoryBlobStore(tmp_path / "blobs").get(sighting.sha256) == PICTURES["large.png"]


def test_the_analyzer_returns_its_analysis_and_writes_the_cache_once_the_disk_has_room(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    data = PICTURES["small.png"]
    sha256 = hashlib.sha256(data).hexdigest()
    event = ImageEvent.model_validate({"event_id": "e0", "platform": "x", "account_id": "a0",
                                       "posted_at": "2026-05-01T12:00:00Z", "image": {"path": "small.png"}})
    source = SourceRef(topic="events", partition=0, offset=0)
    failing = _Failing(analyze_mod.write_atomically)
    with mock.patch("streams.analyze.write_atomically", failing):
        first = Analyzer(settings, tmp_path / "blobs").analyze(event, data, source)
    assert first.sha256 == sha256 and failing.calls == 1
    assert not analysis_path(tmp_path / "blobs", sha256).exists()
    # Another analyzer (a restarted worker): nothing cached, so analysed again, and now kept.
    again = Analyzer(settings, tmp_path / "blobs").analyze(event, data, source)
    assert again.hashes == first.hashes
    assert analysis_path(tmp_path / "blobs", sha256).exists()


class _Raising:
    """An analyzer whose analysis raises ``error`` (nothing that has a reason)."""

    def __init__(self, error: BaseException):
        self.error = error

    def knows(self, sha256):
        return False

    def analyze(self, *args):
        raise self.error


def test_an_unexpected_os_error_s_dead_letter_names_its_path(tmp_path):
    error = OSError(errno.EACCES, os.strerror(errno.EACCES))
    error.filename = "/srv/dw/blobs/somewhere"  # set after it was made, as some callers do
    result = _process(_stage(tmp_path, _Raising(error)), _event(0, "small.png"))
    assert result.dead is not None and (result.dead.stage, result.dead.reason) == ("decode", "internal_error")
    assert result.dead.detail == f"PermissionError: [Errno 13] {os.strerror(errno.EACCES)}: '/srv/dw/blobs/somewhere'"
    renamed = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/srv/dw/a", None, "/srv/dw/b")
    result = _process(_stage(tmp_path, _Raising(renamed)), _event(1, "small.png"))
    assert "'/srv/dw/a' -> '/srv/dw/b'" in result.dead.detail


# -- through the real pipeline: embedded broker, a forked worker, `deepwatch replay` --
# Imported first by every process started with this directory on PYTHONPATH:
# the analysis cache's writes fail with ENOSPC while TEST_CACHE_FAULTS says,
# before streams.analyze takes the function.
_SITECUSTOMIZE = '''
import os
if os.environ.get("TEST_CACHE_FAULTS"):
    import errno
    from pathlib import Path

    import detectors.atomic_file as _af

    _real = _af.write_atomically
    _count = Path(os.environ["TEST_CACHE_FAULTS"])

    def _write(path, data):
        if Path(path).parent.name == "analysis":
            n = int(_count.read_text())
            if n > 0:
                _count.write_text(str(n - 1))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real(path, data)

    _af.write_atomically = _write
'''


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_through_the_pipeline_every_event_is_a_sighting_while_the_cache_cannot_be_written(tmp_path, monkeypatch):
    import subprocess
    import sys

    from streams.store import open_store

    load_sitecustomize(tmp_path, monkeypatch, _SITECUSTOMIZE)
    faults = tmp_path / "cache_faults"
    faults.write_text("4")
    feed_dir = tmp_path / "feed"
    feed_dir.mkdir()
    events = []
    for n in range(6):
        (feed_dir / f"p{n}.png").write_bytes(corpus.picture_png(10 + n, (256, 192)))
        events.append({"event_id": f"e{n}", "platform": "x", "account_id": f"a{n}",
                       "posted_at": "2026-05-01T12:00:00Z", "image": {"path": str(feed_dir / f"p{n}.png")}})
    feed = feed_dir / "feed.jsonl"
    feed.write_text("".join(json.dumps(e) + "\n" for e in events))
    data = tmp_path / "data"
    env = {**os.environ, "TEST_CACHE_FAULTS": str(faults)}
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir", str(data),
                        "--workers", "1", "--no-wait-models", "--json", "--timeout", "200"],
                       capture_output=True, text=True, env=env, timeout=280)
    assert r.returncode == 0, f"replay failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    summary = json.loads(r.stdout)
    assert summary["complete"] and not summary["dead_letters"], summary
    assert summary["run_outcomes"].get("sighting") == 6, summary
    assert faults.read_text() == "0"  # the four failures were all met
    store = open_store(data)
    assert not store.dead_letters()
    assert all(store.sighting_identity(f"e{n}") is not None for n in range(6))
    assert len(list((data / "blobs" / "analysis").glob("*.json"))) == 2  # the writes after the failures
    log = "".join(p.read_text() for p in (data / "logs").glob("*.log"))
    assert log.count("analysis cache write failed") == 1 and '"errno": "ENOSPC"' in log
