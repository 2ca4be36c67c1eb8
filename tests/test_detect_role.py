"""The ``detect`` worker role on the real broker: a separate Faust app (own
consumer group) runs a learned model once per new cluster, never per repost,
and its calibrated evidence reaches the cluster's findings."""

from __future__ import annotations

import asyncio
import hashlib
import io
from contextlib import ExitStack

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from PIL import Image
from typer.testing import CliRunner

from detectors.base import Evidence, EvidenceKind
from streams import runner
from streams.cli import app
from streams.detect_worker import analyse_picture
from streams.demo_feed import build_feed
from streams.ingest import produce_feed
from streams.records import DetectRequest
from streams.settings import Settings
from streams.store import open_store


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(1)
    for sub in ("real", "ai"):
        (root / sub).mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "real" / f"{i}.png")
        low = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(low).resize((48, 48), Image.NEAREST).save(root / "ai" / f"{i}.png")
    out = tmp_path_factory.mktemp("models")
    r = CliRunner().invoke(app, [
        "train", "--real", str(root / "real"), "--fake", str(root / "ai"), "--arch", "small-cnn",
        "--epochs", "2", "--input-size", "32", "--out", "tiny", "--model-dir", str(out),
    ])
    assert r.exit_code == 0, r.output
    return out


def detect_requests(bootstrap: str, topic: str) -> list[DetectRequest]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
    tp = TopicPartition(topic, 0)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out = [DetectRequest.model_validate_json(m.value) for m in consumer]
    consumer.close()
    assert tp in parts
    return out


@pytest.mark.slow
def test_models_run_once_per_cluster_in_their_own_role(tmp_path, model_dir):
    feed, exp = build_feed(tmp_path / "feed", burst=6)
    settings = Settings(data_dir=tmp_path / "data", detect={"models": ["tiny"], "model_dir": model_dir, "max_batch": 4})
    settings.ingest.image_roots = [feed.parent.resolve()]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker("pipeline")
        detect = cluster.start_worker("detect")
        produced = produce_feed(feed, cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=240, models=True)
        requests = detect_requests(cluster.bootstrap, settings.topic("detect-requests"))
        seen = detect.stage_seconds()
    store = open_store(settings.data_dir)
    clusters = store.clusters()
    assert len(clusters) == exp.distinct_pictures
    # Once per cluster, never per repost: a cluster is asked about again only
    # when a clearly better copy (another image) joins it, never twice for one image.
    pairs = [(r.cluster_id, r.sha256) for r in requests]
    assert len(pairs) == len(set(pairs))
    assert {c.id for c in clusters} <= {r.cluster_id for r in requests}
    assert len(requests) <= sum(len(c.members) for c in clusters)
    # The detect stage's time is counted per answer, like every stage's per
    # event (it was per take of up to 4 x max_batch requests: a CPU worker's
    # backlog read as one 10-s stage and kept DeepwatchStageLatencyHigh firing).
    answered = len(requests) - seen.get("events:detect:coalesced", 0)
    assert seen.get("count:detect") == answered > 0, seen
    assert sum(c.sightings for c in clusters) > 3 * len(clusters)  # many reposts, none of them asked about
    for c in clusters:
        assert not c.models_pending
        model_ev = [e for e in c.evidence if e.detector == "model:tiny"]
        assert len(model_ev) == 1 and 0.0 <= model_ev[0].score <= 1.0 and "calibrated" in model_ev[0].detail


@pytest.mark.slow
def test_a_model_the_detect_role_cannot_load_ends_replay_with_one_line(tmp_path):
    # was: the detect agent crashed and Faust restarted it into the same error, every few
    # milliseconds, while replay waited for model results that could never come
    import os
    import subprocess
    import sys

    from bench.replay import build

    feed = build(tmp_path / "feed", pictures=4, reposts=2)
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir", str(tmp_path / "data"),
                        "--timeout", "120"], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "DEEPWATCH_DETECT__MODELS": '["nope"]'})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert error and "detect worker exited with 2" in error[0] and "model 'nope' not found" in error[0]


# -- one picture, several models: what reaches the cluster (no broker needed) --


class _Batcher:
    """A ``MicroBatcher`` stand-in: scores with ``score`` or fails with ``error``."""

    def __init__(self, name: str, score: float = 0.5, error: Exception | None = None):
        self.detector = type("Det", (), {"name": name})()
        self.score, self.error, self.seen = score, error, []

    async def submit(self, image):
        self.seen.append(image.sha256)
        if self.error is not None:
            raise self.error
        return [Evidence(kind=EvidenceKind.MODEL, detector=self.detector.name, score=self.score, detail="d",
                         sha256=image.sha256)]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_failing_model_costs_only_its_own_evidence():
    # was: one model's exception dropped every other model's evidence for the picture
    data = _png(1)
    sha = hashlib.sha256(data).hexdigest()
    ok, broken = _Batcher("model:a", 0.8), _Batcher("vendor:b", error=RuntimeError("HTTP 503"))
    evidence, error = asyncio.run(analyse_picture(sha, lambda: data, [ok, broken]))
    assert [(e.detector, e.score, e.sha256) for e in evidence] == [("model:a", 0.8, sha)]
    assert error is not None and "vendor:b" in error and "HTTP 503" in error


def test_a_blob_corrupt_on_disk_is_an_error_not_another_pictures_score():
    # was: bytes that no longer hash to the requested picture but still decode were
    # scored, and the score reported as the requested picture's
    wanted = hashlib.sha256(_png(1)).hexdigest()
    model = _Batcher("model:a")
    evidence, error = asyncio.run(analyse_picture(wanted, lambda: _png(2), [model]))
    assert evidence == [] and error is not None and "corrupt" in error
    assert model.seen == []
    evidence, error = asyncio.run(analyse_picture(wanted, lambda: _png(1), [model]))
    assert error is None and [e.sha256 for e in evidence] == [wanted]


def test_a_blob_the_store_no_longer_has_is_an_error_for_its_cluster(tmp_path):
    from streams.blobstore import DirectoryBlobStore

    blobs = DirectoryBlobStore(tmp_path)
    evidence, error = asyncio.run(analyse_picture("ab" * 32, lambda: blobs.get("ab" * 32), [_Batcher("model:a")]))
    assert evidence == [] and error is not None and "FileNotFoundError" in error
