"""End to end: the Bluesky connector reads a loopback Jetstream and the
Mastodon connector a loopback instance, both produce to the real embedded
broker, a real pipeline worker fetches the pictures from a loopback CDN and
ends in one cross-platform cluster, a second cluster and one alert."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone

import pytest

from streams import runner
from streams.connectors.run import build_bluesky, build_mastodon, open_state
from streams.connectors.sinks import KafkaSink
from streams.demo_feed import a1111_png, camera_jpeg, jpeg_bytes, scene
from streams.settings import Settings
from streams.store import open_store
from tests.connector_servers import (FRAMES, ImageServer, JetstreamServer, MastodonScript, MastodonServer,
                                    jetstream_frames, jetstream_malformed, sse_events)

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


def mastodon_story(cdn_url: str) -> tuple[list[str], bytes]:
    """A recorded status re-cast: someone posts a recompressed copy of the fake
    on Mastodon three minutes later, and someone else boosts it."""
    blocks = sse_events(FRAMES / "mastodon_stream.sse")
    status = json.loads(next(b for b in blocks if "event: update\n" in b).split("data: ", 1)[1])
    status["created_at"] = "2026-11-30T10:03:00.000Z"
    status["media_attachments"] = status["media_attachments"][:1]
    status["media_attachments"][0]["url"] = f"{cdn_url}/media/flood_q70.jpg"
    boost = json.loads(json.dumps(status))
    boost.update(id=str(int(status["id"]) + 7), created_at="2026-11-30T10:03:30.000Z", reblog=status, content="",
                 media_attachments=[], favourites_count=0, reblogs_count=0, replies_count=0)
    boost["account"] = dict(status["account"], id="109000000000000077", username="booster", acct="booster")
    sse = [f"event: update\ndata: {json.dumps(doc)}\n\n" for doc in (status, boost)]
    return sse, jpeg_bytes(scene(1001), 70)


async def run_connectors(connectors, done, timeout: float = 60.0) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in connectors]
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline and not any(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 15)


def test_connectors_to_clusters_and_an_alert(tmp_path):
    frames, images, fake_uri = viral_frames()
    last_cursor = str(json.loads(frames[-1])["time_us"])
    settings = Settings(data_dir=tmp_path / "data")
    settings.fetch.allow_private_networks = True  # the CDN stand-in is on loopback: this test only
    settings.connectors.checkpoint_interval_s = 0.2
    with ExitStack() as stack:
        cdn = stack.enter_context(ImageServer(images))
        settings.connectors.bluesky_image_url = f"{cdn.url}/img/{{did}}/{{cid}}"
        sse, q70 = mastodon_story(cdn.url)
        images["/media/flood_q70.jpg"] = q70
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker("pipeline")
        cluster.wait_ready()
        # one producer shared by both connectors, a channel each (each confirms only its own sends)
        sink = KafkaSink(cluster.bootstrap, settings, keep_offsets=True)
        stack.callback(sink.close)
        bsky_state = open_state(settings, "bluesky")
        stack.callback(bsky_state.close)
        bluesky = build_bluesky(settings, sink.channel(), bsky_state)
        masto_server = stack.enter_context(MastodonServer(MastodonScript(streams=[sse], drop=False, token="t" * 20)))
        masto_state = open_state(settings, "mastodon")
        stack.callback(masto_state.close)
        mastodon = build_mastodon(settings, sink.channel(), masto_state, instance=masto_server.url, timeline="user",
                                  token="t" * 20)
        with JetstreamServer(frames) as jetstream:
            bluesky.url = jetstream.url
            asyncio.run(run_connectors([bluesky, mastodon], lambda: bluesky.emitter.cursor == last_cursor
                                       and mastodon.emitter.counts.get("repost")))
        asyncio.run(mastodon.aclose())
        assert bluesky.emitter.counts["malformed"] == 1
        assert masto_server.stream_requests[0]["path"] == "/api/v1/streaming/user"
        # Bluesky: 1 post + 11 reposts + 1 photo; Mastodon: a post and its boost
        assert (len(bluesky.emitter.sink.offsets), len(mastodon.emitter.sink.offsets)) == (13, 2)
        assert runner.wait_until_processed(cluster, bluesky.emitter.sink.offsets | mastodon.emitter.sink.offsets,
                                           timeout_s=240)

    store = open_store(settings.data_dir)
    try:
        clusters = store.clusters()
        alerts = store.alerts()
        dead = store.dead_letters()
    finally:
        store.close()
    assert dead == []
    assert len(clusters) == 2
    fake = max(clusters, key=lambda c: c.sightings)
    assert fake.sightings == 14 and fake.accounts == 14
    assert sorted(fake.platforms) == ["bluesky", "mastodon"]
    assert fake.verdict == "likely-ai" and fake.fake_score >= 0.9
    assert len(fake.members) == 2  # the PNG from the Bluesky CDN and the JPEG copy from Mastodon
    assert any(m.event_id.startswith(("at://did:plc:reposter", fake_uri)) for m in fake.members)
    photo = min(clusters, key=lambda c: c.sightings)
    assert photo.sightings == 1 and photo.verdict != "likely-ai"
    assert len(alerts) == 1
    assert alerts[0].cluster_id == fake.id and alerts[0].velocity.sightings_5m >= 10
    assert len(cdn.hits) >= 3  # the worker really fetched the pictures from the (loopback) CDN
