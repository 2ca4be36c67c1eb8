"""End to end: the Bluesky connector reads a loopback Jetstream, produces to
the real embedded broker, a real pipeline worker fetches the pictures from a
loopback CDN and ends in clusters and an alert."""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone

import pytest

from streams import runner
from streams.connectors.run import build_bluesky, open_state
from streams.connectors.sinks import KafkaSink
from streams.demo_feed import a1111_png, camera_jpeg, scene
from streams.settings import Settings
from streams.store import open_store
from tests.connector_servers import ImageServer, JetstreamServer, jetstream_frames, jetstream_malformed
from tests.test_connector_bluesky import run_until

pytestmark = pytest.mark.slow


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def viral_frames() -> tuple[list[str], dict[str, bytes], str]:
    """Recorded frames re-cast as a viral story: an AI picture posted once and
    reposted by 11 accounts within three minutes, a camera photo, chatter."""
    recorded = [json.loads(f) for f in jetstream_frames()]
    post = next(f for f in recorded if f["kind"] == "commit" and f["commit"]["record"].get("embed", {}).get("$type")
                == "app.bsky.embed.images")
    repost = next(f for f in recorded if f["kind"] == "commit" and f["commit"]["collection"] == "app.bsky.feed.repost")
    text_only = recorded[3]
    t0 = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)
    us = lambda t: int(t.timestamp() * 1_000_000)  # noqa: E731
    frames, images = [], {}

    fake = json.loads(json.dumps(post))
    fake["time_us"] = us(t0)
    rec = fake["commit"]["record"]
    rec["createdAt"] = iso(t0)
    rec["embed"]["images"] = rec["embed"]["images"][:1]
    fake_cid = rec["embed"]["images"][0]["image"]["ref"]["$link"]
    images[f"/img/{fake['did']}/{fake_cid}"] = a1111_png(scene(1001), "a flooded subway station, news photo")
    frames.append(fake)
    fake_uri = f"at://{fake['did']}/app.bsky.feed.post/{fake['commit']['rkey']}"

    for i in range(11):
        r = json.loads(json.dumps(repost))
        t = t0 + timedelta(seconds=15 * (i + 1))
        r["did"] = f"did:plc:reposter{i:016d}"
        r["time_us"] = us(t)
        r["commit"]["rkey"] = f"3lrepost{i:05d}"
        r["commit"]["record"]["createdAt"] = iso(t)
        r["commit"]["record"]["subject"]["uri"] = fake_uri
        frames.append(r)
        if i == 4:
            chatter = json.loads(json.dumps(text_only))
            chatter["time_us"] = us(t) + 1
            frames.append(chatter)

    photo = json.loads(json.dumps(post))
    t = t0 + timedelta(minutes=4)
    photo["did"] = "did:plc:photographer0000000000"
    photo["time_us"] = us(t)
    photo["commit"]["rkey"] = "3lphoto000001"
    photo["commit"]["record"]["createdAt"] = iso(t)
    photo["commit"]["record"]["embed"]["images"] = photo["commit"]["record"]["embed"]["images"][1:]
    photo_cid = photo["commit"]["record"]["embed"]["images"][0]["image"]["ref"]["$link"]
    images[f"/img/{photo['did']}/{photo_cid}"] = camera_jpeg(scene(3000))
    frames.append(photo)

    lines = [json.dumps(f) for f in frames]
    lines.insert(3, jetstream_malformed()[1])
    return lines, images, fake_uri


def test_bluesky_connector_to_clusters_and_an_alert(tmp_path):
    frames, images, fake_uri = viral_frames()
    last_cursor = str(json.loads(frames[-1])["time_us"])
    settings = Settings(data_dir=tmp_path / "data")
    settings.fetch.allow_private_networks = True  # the CDN stand-in is on loopback: this test only
    settings.connectors.checkpoint_interval_s = 0.2
    with ExitStack() as stack:
        cdn = stack.enter_context(ImageServer(images))
        settings.connectors.bluesky_image_url = f"{cdn.url}/img/{{did}}/{{cid}}"
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker("pipeline")
        cluster.wait_ready()
        sink = KafkaSink(cluster.bootstrap, settings)
        stack.callback(sink.close)
        state = open_state(settings, "bluesky")
        stack.callback(state.close)
        connector = build_bluesky(settings, sink, state)
        with JetstreamServer(frames) as jetstream:
            connector.url = jetstream.url
            asyncio.run(run_until(connector, lambda: connector.emitter.cursor == last_cursor, timeout=60))
        assert connector.emitter.counts["malformed"] == 1
        assert len(sink.offsets) == 13  # 1 post + 11 reposts + 1 photo
        assert runner.wait_until_processed(cluster, sink.offsets, timeout_s=240)

    store = open_store(settings.data_dir)
    try:
        clusters = store.clusters()
        alerts = store.alerts()
        dead = store.dead_letters()
    finally:
        store.close()
    assert dead == []
    assert len(clusters) == 2
    fake = max(clusters, key=lambda c: c["sightings"])
    assert fake["sightings"] == 12 and fake["accounts"] == 12 and fake["platforms"] == ["bluesky"]
    assert fake["verdict"] == "likely-ai" and fake["fake_score"] >= 0.9
    # one picture, seen 12 times (the same CDN URL); which event brought it first depends on partition order
    assert len(fake["members"]) == 1
    assert fake["members"][0]["event_id"].startswith(("at://did:plc:reposter", fake_uri))
    photo = min(clusters, key=lambda c: c["sightings"])
    assert photo["sightings"] == 1 and photo["verdict"] != "likely-ai"
    assert len(alerts) == 1
    assert alerts[0]["cluster_id"] == fake["id"] and alerts[0]["velocity"]["sightings_5m"] >= 10
    assert len(cdn.hits) >= 2  # the worker really fetched the pictures from the (loopback) CDN
