"""Cluster merges on the real broker: two reposts that are each near the
original but not near each other start two clusters; the original then links
them -- pHash and PDQ both agree with each side, the bar for a merge. The
clusters merge into one id, counts add up, and analysts can see what merged
(and why: the merge audit on the state)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import ImageDraw

from streams import runner
from streams.demo_feed import BASE_TIME, jpeg_bytes, scene
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store

pytestmark = pytest.mark.slow


def banner(img, side: str, frac: float = 0.2):
    """A repost with a big blank panel on one side (a meme caption box)."""
    out = img.copy()
    w, h = out.size
    box = (0, 0, int(w * frac), h) if side == "left" else (w - int(w * frac), 0, w, h)
    ImageDraw.Draw(out).rectangle(box, fill=(250, 250, 250))
    return out


def feed_of(path: Path, items: list[tuple[str, str, int]]) -> Path:
    path.write_text("\n".join(json.dumps({
        "event_id": eid, "platform": "x", "account_id": f"acct-{eid}",
        "posted_at": (BASE_TIME + timedelta(minutes=minute)).isoformat(), "image": {"path": image},
    }) for eid, image, minute in items) + "\n")
    return path


def test_an_image_linking_two_clusters_merges_them(tmp_path):
    # found by search: banners at 20% are 14 pHash / 40 PDQ bits apart, the
    # picture 10 / 24 and 10 / 26 from them (both hashes agree with each side)
    picture = scene(8010, (1024, 768))
    images = tmp_path / "images"
    images.mkdir()
    for name, img in (("left.jpg", banner(picture, "left")), ("right.jpg", banner(picture, "right")), ("orig.jpg", picture)):
        (images / name).write_bytes(jpeg_bytes(img, 90))
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [tmp_path]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        cluster.wait_ready()
        first = produce_feed(feed_of(tmp_path / "a.jsonl", [("left", "images/left.jpg", 0), ("right", "images/right.jpg", 1)]),
                             cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, first.offsets, timeout_s=120)
        store = open_store(settings.data_dir)
        before = store.clusters()
        assert len(before) == 2, "the two reposts must start separate clusters for this test to mean anything"
        second = produce_feed(feed_of(tmp_path / "b.jsonl", [("orig", "images/orig.jpg", 2)]), cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, first.offsets | second.offsets, timeout_s=120)
    live = store.clusters()
    everything = store.clusters(include_merged=True)
    assert len(live) == 1
    survivor = live[0]
    merged = [c for c in everything if c["merged_into"]]
    assert len(merged) == 1 and merged[0]["merged_into"] == survivor["id"]
    assert survivor["id"] in {c["id"] for c in before} and survivor["merged_from"] == [merged[0]["id"]]
    assert survivor["sightings"] == 3 and survivor["accounts"] == 3 and len(survivor["members"]) == 3
    assert survivor["stream_sightings"] == 3
