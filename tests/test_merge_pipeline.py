"""Cluster merges on the real broker. Two crops of different parts of one
picture (the bottom-right 85%, the centre 90%) arrive first: crop views never
meet crop views, so each founds a cluster. The whole picture, recompressed,
then links the two: a view of it meets each crop, and its pixels verified
against each crop's thumbnail differ by a residual within the merge bound.
The clusters merge into one id, counts add up, and the merge audit in the
engine state says which image linked them and how far (pHash distances and
pixel residuals; PDQ cannot compare a crop with the whole). The sequence is
one the cluster bench (``bench/clusters.py``) found on the shared data."""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest

from bench.neardup_transforms import CLUSTER_TRANSFORMS
from detectors.imagedata import ImageData
from streams import runner
from streams.clustering import ClusterState
from streams.demo_feed import BASE_TIME
from streams.engine_state import open_engine_state
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store

pytestmark = pytest.mark.slow

SEQUENCE = ["crop_85_bottomright", "crop_90", "jpeg_q50"]
PHOTO = ("detect-dev", "ai", "stable_cascade__inpaint_controlnet.png")


def feed_of(path: Path, items: list[tuple[str, str, int]]) -> Path:
    path.write_text("\n".join(json.dumps({
        "event_id": eid, "platform": "x", "account_id": f"acct-{eid}",
        "posted_at": (BASE_TIME + timedelta(minutes=minute)).isoformat(), "image": {"path": image},
    }) for eid, image, minute in items) + "\n")
    return path


def test_an_image_linking_two_clusters_merges_them(tmp_path, shared_data):
    img = ImageData.from_path(shared_data.joinpath(*PHOTO)).rgb.copy()
    img.thumbnail((1024, 1024))
    images = tmp_path / "images"
    images.mkdir()
    names = {t: t.replace("/", "_").replace("+", "").replace("%", "") for t in SEQUENCE}
    for t in SEQUENCE:
        (images / f"{names[t]}.jpg").write_bytes(CLUSTER_TRANSFORMS[t](img))
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [tmp_path]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        cluster.wait_ready()
        offsets: set = set()
        for i, t in enumerate(SEQUENCE[:-1]):  # one at a time: the analyze stage works on several events at once
            sent = produce_feed(feed_of(tmp_path / f"{i}.jsonl", [(names[t], f"images/{names[t]}.jpg", i)]), cluster.bootstrap, settings)
            offsets |= sent.offsets
            assert runner.wait_until_processed(cluster, offsets, timeout_s=120)
        store = open_store(settings.data_dir)
        before = store.clusters()
        assert len(before) == 2, "the two crops must start separate clusters for this test to mean anything"
        link = names[SEQUENCE[-1]]
        second = produce_feed(feed_of(tmp_path / "b.jsonl", [(link, f"images/{link}.jpg", 9)]), cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, offsets | second.offsets, timeout_s=120)
    live = store.clusters()
    everything = store.clusters(include_merged=True)
    assert len(live) == 1
    survivor = live[0]
    merged = [c for c in everything if c.merged_into]
    assert len(merged) == 1 and merged[0].merged_into == survivor.id
    assert survivor.id in {c.id for c in before} and survivor.merged_from == [merged[0].id]
    assert survivor.sightings == len(SEQUENCE) and len(survivor.members) == len(SEQUENCE)
    assert survivor.stream_sightings == len(SEQUENCE)
    state = ClusterState.loads(open_engine_state(settings.data_dir).get(survivor.id))
    linker = ImageData((images / f"{names[SEQUENCE[-1]]}.jpg").read_bytes()).sha256
    assert [(m.other, m.link_sha256) for m in state.merges] == [(merged[0].id, linker)]
    audit = state.merges[0]
    assert audit.into_phash <= 10 and audit.other_phash <= 10
    assert audit.into_residual is not None and audit.other_residual is not None
    assert max(audit.into_residual, audit.other_residual) <= 6.0  # MERGE_RESIDUAL
