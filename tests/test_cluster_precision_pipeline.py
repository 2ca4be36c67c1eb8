"""Cluster precision on the real broker, through the real CLI (embedded Tansu,
a Faust worker process): two different but similar pictures -- one scene, and
the same scene with its left half repainted (an inpainting / another seed),
14 pHash bits apart and no variant of one matching a variant of the other,
whatever the order -- stay two clusters while their reposts (crops, resizes,
caption bars top and bottom, and an in-between image near *both*) pile up; a
repost with a black caption bar over the bottom eighth joins its picture; and
replaying the same feed again, on a fresh broker over the same data dir,
changes nothing (the engine state store seeds the new table)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from bench.neardup_transforms import _bar, _crop
from streams.demo_feed import BASE_TIME, jpeg_bytes, scene
from tests.test_pipeline_e2e import deepwatch, query

pytestmark = pytest.mark.slow
# One events partition: the feed arrives in file order (the pictures first),
# so the test states which picture founds which cluster.
ONE_PARTITION = {"DEEPWATCH_PARTITIONS": "1"}


def write_feed(root: Path, images: dict[str, bytes]) -> Path:
    """``root``/images/NAME for each image and ``root``/feed.jsonl with one
    event per image, a minute apart, in this order."""
    (root / "images").mkdir()
    lines = []
    for i, (name, data) in enumerate(images.items()):
        (root / "images" / name).write_bytes(data)
        lines.append(json.dumps({
            "event_id": f"ev-{name}", "platform": "x", "account_id": f"acct-{i}",
            "posted_at": (BASE_TIME + timedelta(minutes=i)).isoformat(), "image": {"path": f"images/{name}"},
        }))
    feed = root / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    return feed


def pictures():
    a = scene(8002, (1024, 768))
    b = a.copy()
    b.paste(scene(8502, (1024, 768)).crop((0, 0, 512, 768)), (0, 0))  # the other picture
    mid = a.copy()
    mid.paste(scene(8502, (1024, 768)).crop((0, 0, 256, 768)), (0, 0))  # half way: 10 pHash bits from both
    return a, b, mid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    a, b, mid = pictures()
    reposts = {
        "a.jpg": (a, "A"), "b.jpg": (b, "B"),
        "a_crop.jpg": (_crop(a, 0.9), "A"), "b_crop.jpg": (_crop(b, 0.9), "B"),
        "a_half.jpg": (a.resize((512, 384)), "A"), "b_half.jpg": (b.resize((512, 384)), "B"),
        "a_bar.jpg": (_bar(a, 1 / 8, "bottom", text="BREAKING NEWS"), "A"),
        "b_bars.jpg": (_bar(b, 1 / 6, "both", text="WHEN YOU SEE IT"), "B"),
        "mid.jpg": (mid, None),
        "b_top.jpg": (_bar(b, 1 / 8, "top", fill=(255, 255, 255), text="share this"), "B"),
    }
    feed = write_feed(root, {name: jpeg_bytes(img, 88) for name, (img, _) in reposts.items()})
    data = root / "data"
    r = deepwatch("replay", str(feed), "--data-dir", str(data), "--json", "--timeout", "240", env=ONE_PARTITION)
    assert r.returncode == 0, f"replay failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert json.loads(r.stdout)["run_outcomes"] == {"sighting": len(reposts), "duplicate": 0, "dead_letter": 0}
    return feed, data, {f"ev-{n}": who for n, (_, who) in reposts.items()}


def test_similar_pictures_stay_apart_and_their_reposts_join_them(run):
    _, data, who = run
    clusters = query("clusters", data)
    assert len(clusters) == 2, [(c["id"], len(c["members"])) for c in clusters]
    assert not [c for c in query("clusters", data) if c.get("merged_into")]  # nothing merged either
    member_of = {m["event_id"]: c["id"] for c in clusters for m in c["members"]}
    a_cluster = {member_of[e] for e, w in who.items() if w == "A"}
    b_cluster = {member_of[e] for e, w in who.items() if w == "B"}
    assert len(a_cluster) == 1 and len(b_cluster) == 1 and a_cluster != b_cluster
    assert member_of["ev-a_bar.jpg"] in a_cluster  # the caption-bar repost joins its picture
    assert member_of["ev-mid.jpg"] in a_cluster | b_cluster  # the in-between image joined one, linked nothing
    assert sum(c["sightings"] for c in clusters) == len(who)


def test_replaying_the_same_feed_twice_changes_nothing(run):
    feed, data, _ = run
    before = query("clusters", data), query("alerts", data)
    for _ in range(2):
        r = deepwatch("replay", str(feed), "--data-dir", str(data), "--json", "--timeout", "240", env=ONE_PARTITION)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout)
        # this run's events were all stored before; the totals are the data dir's
        assert summary["run_outcomes"] == {"sighting": 0, "duplicate": summary["events"], "dead_letter": 0}
        assert summary["sightings"] == sum(c["sightings"] for c in before[0])
    after = query("clusters", data), query("alerts", data)
    volatile = {"updated_at", "revision", "velocity", "stream_sightings"}
    strip = lambda cs: [{k: v for k, v in c.items() if k not in volatile} for c in cs]  # noqa: E731
    assert strip(after[0]) == strip(before[0])
    assert after[1] == before[1]
    for c in after[0]:
        assert c["stream_sightings"] == c["sightings"]  # the seeded engine did not count the replay again
