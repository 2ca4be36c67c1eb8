"""Cluster merges on the real broker. A picture's mirrored repost founds one
cluster; its screenshots cannot join it (a framed image is matched by its
content, and a mirror has no mirrored views), so they found another, which a
letterboxed copy and a captioned copy join. The original then links the two:
pHash *and* PDQ agree, full frame, with a picture of each (the captioned
copy, and the mirror). The clusters merge into one id, counts add up, and the
merge audit in the engine state says which image linked them and how far.
The sequence is one the cluster bench (``bench/clusters.py``) found on the
shared data."""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest

from bench.clusters import _orig_bytes
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

SEQUENCE = ["mirror", "crop_90", "screenshot", "screenshot_of_crop_90", "letterbox_black", "caption_text", "original"]


def feed_of(path: Path, items: list[tuple[str, str, int]]) -> Path:
    path.write_text("\n".join(json.dumps({
        "event_id": eid, "platform": "x", "account_id": f"acct-{eid}",
        "posted_at": (BASE_TIME + timedelta(minutes=minute)).isoformat(), "image": {"path": image},
    }) for eid, image, minute in items) + "\n")
    return path


def test_an_image_linking_two_clusters_merges_them(tmp_path, shared_data):
    img = ImageData.from_path(shared_data / "detect-dev" / "ai" / "fennec_girl_sing.png").rgb.copy()
    img.thumbnail((1024, 1024))
    images = tmp_path / "images"
    images.mkdir()
    for t in SEQUENCE:
        (images / f"{t}.jpg").write_bytes(_orig_bytes(img) if t == "original" else CLUSTER_TRANSFORMS[t](img))
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [tmp_path]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        cluster.wait_ready()
        offsets: set = set()
        for i, t in enumerate(SEQUENCE[:-1]):  # one at a time: the analyze stage works on several events at once
            sent = produce_feed(feed_of(tmp_path / f"{i}.jsonl", [(t, f"images/{t}.jpg", i)]), cluster.bootstrap, settings)
            offsets |= sent.offsets
            assert runner.wait_until_processed(cluster, offsets, timeout_s=120)
        store = open_store(settings.data_dir)
        before = store.clusters()
        assert len(before) == 2, "mirror and screenshots must start separate clusters for this test to mean anything"
        second = produce_feed(feed_of(tmp_path / "b.jsonl", [("original", "images/original.jpg", 9)]), cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, offsets | second.offsets, timeout_s=120)
    live = store.clusters()
    everything = store.clusters(include_merged=True)
    assert len(live) == 1
    survivor = live[0]
    merged = [c for c in everything if c["merged_into"]]
    assert len(merged) == 1 and merged[0]["merged_into"] == survivor["id"]
    assert survivor["id"] in {c["id"] for c in before} and survivor["merged_from"] == [merged[0]["id"]]
    assert survivor["sightings"] == len(SEQUENCE) and len(survivor["members"]) == len(SEQUENCE)
    assert survivor["stream_sightings"] == len(SEQUENCE)
    state = ClusterState.loads(open_engine_state(settings.data_dir).get(survivor["id"]))
    original = ImageData((images / "original.jpg").read_bytes()).sha256
    assert [(m.other, m.link_sha256) for m in state.merges] == [(merged[0]["id"], original)]
    audit = state.merges[0]
    assert audit.into_phash <= 10 and audit.into_pdq <= 31 and audit.other_phash <= 10 and audit.other_pdq <= 31
