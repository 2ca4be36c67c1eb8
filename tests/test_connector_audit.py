"""Connector defects found by an audit, each against the real connector and
the loopback servers (tests/connector_servers.py): images per post, the
cursor walking back, the instance document, stop during a silent connect,
rate-limit tokens on a 503, and when events count as produced."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from streams.connectors.base import ConnectorState, Emitter, RememberedPost, UrlPolicy
from streams.connectors.bluesky import BlueskyMapper
from streams.connectors.run import build_bluesky, build_mastodon, mastodon_stream_key, open_state
from streams.connectors.sinks import JsonlSink
from streams.ingest_server import build_app
from streams.settings import Settings
from tests.connector_servers import (FRAMES, JetstreamServer, MastodonScript, MastodonServer, jetstream_frames,
                                    sse_events)
from tests.test_connector_bluesky import LossyBroker, expected_ids
from tests.test_connector_bluesky import run_until as bluesky_run_until
from tests.test_connector_bluesky import settings_for as bluesky_settings
from tests.test_connector_mastodon import run_until as mastodon_run_until
from tests.test_connector_mastodon import settings_for as mastodon_settings

# An address literal: the URL policy passes it without asking DNS.
PUBLIC = "https://93.184.215.14/img/{did}/{cid}"
DID = "did:plc:5xrilav5fvcyk43kkpdhieyg"
T0 = 1732960800_000000
DEADLINE_S = 60.0  # generous: the CI machine is loaded
MAX_IMAGES = 4  # the app.bsky lexicon's maxLength for embed.images


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _frame(rkey: str, record: dict, *, collection: str = "app.bsky.feed.post", did: str = DID,
           time_us: int = T0) -> str:
    return json.dumps({"did": did, "time_us": time_us, "kind": "commit", "commit": {
        "rev": "r", "operation": "create", "collection": collection, "rkey": rkey, "record": record}})


def _images(n: int, prefix: str = "bafk") -> list[dict]:
    # the smallest blob form the mapper reads: 20 000 of them fit one frame
    return [{"image": {"ref": {"$link": f"{prefix}{i}"}}} for i in range(n)]


# --------------------------------------------------------------------------
# 1. A post with more images than the lexicon allows
# --------------------------------------------------------------------------
def test_a_post_with_thousands_of_images_gives_four_events_and_every_repost_and_quote_four(tmp_path, caplog):
    # One crafted post with 20 000 embed.images[] entries gave 20 000 events, and each
    # repost or quote of it 20 000 more; the remembered post was ~1.6 MB.
    n = 20_000
    post_uri = f"at://{DID}/app.bsky.feed.post/big"
    frames = [
        _frame("big", {"text": "y" * 200_000, "createdAt": "2024-11-30T10:00:00Z",
                       "embed": {"$type": "app.bsky.embed.images", "images": _images(n)}}),
        _frame("rp", {"subject": {"uri": post_uri, "cid": "c"}, "createdAt": "2024-11-30T10:00:01Z"},
               collection="app.bsky.feed.repost", did="did:plc:reposter", time_us=T0 + 1_000_000),
        _frame("qt", {"text": "quote", "createdAt": "2024-11-30T10:00:02Z", "embed": {
            "$type": "app.bsky.embed.recordWithMedia",
            "media": {"$type": "app.bsky.embed.images", "images": _images(n, "own")},
            "record": {"record": {"uri": post_uri, "cid": "c"}}}}, did="did:plc:quoter", time_us=T0 + 2_000_000),
    ]
    assert all(len(f) < 2 * 1024 * 1024 for f in frames)  # under max_frame_bytes: Jetstream sends them
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    sink = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "t")
    runner = build_bluesky(s, sink, state)
    before = metric("deepwatch_connector_events_total", connector="bluesky", outcome="clipped")
    with JetstreamServer(frames) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.bluesky"):
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: runner.emitter.cursor == str(T0 + 2_000_000),
                                      timeout=DEADLINE_S))
    ids = [e.event_id for e in sink.events]
    assert ids == ([f"{post_uri}#{i}" for i in range(MAX_IMAGES)]
                   + [f"at://did:plc:reposter/app.bsky.feed.repost/rp#{i}" for i in range(MAX_IMAGES)]
                   + [f"at://did:plc:quoter/app.bsky.feed.post/qt#{i}" for i in range(MAX_IMAGES)]
                   + [f"at://did:plc:quoter/app.bsky.feed.post/qt#q{i}" for i in range(MAX_IMAGES)])
    left_out = n - MAX_IMAGES  # the post's own; the repost's (none: the remembered post holds 4); the quote's own
    assert runner.emitter.counts["events_clipped"] == 2 * left_out
    assert metric("deepwatch_connector_events_total", connector="bluesky", outcome="clipped") - before == 2 * left_out
    assert sum("more than 4 images" in r.getMessage() for r in caplog.records) == 2
    # What is remembered for reposts and quotes is bounded: 4 URLs, the text as an event carries it.
    doc = state.recall(post_uri)
    assert len(doc.images) == MAX_IMAGES and len(doc.text) == 10_000
    assert len(doc.model_dump_json()) < 20_000


def test_a_post_remembered_with_more_images_before_the_clip_gives_four_per_repost():
    # A state file written by the old code may hold a post with thousands of URLs.
    st = ConnectorState(":memory:")
    uri = f"at://{DID}/app.bsky.feed.post/old"
    st.remember(uri, RememberedPost(post_url=None, text="t", lang=None, hashtags=[],
                                    images=[f"https://93.184.215.14/{i}.jpg" for i in range(500)]))
    m = BlueskyMapper(PUBLIC, recall=st.recall)
    r = m.map(_frame("rp", {"subject": {"uri": uri}}, collection="app.bsky.feed.repost", did="did:plc:r"))
    assert r.outcome == "repost" and len(r.events) == MAX_IMAGES and r.clipped == 500 - MAX_IMAGES
    q = m.map(_frame("q", {"text": "q", "embed": {"$type": "app.bsky.embed.record", "record": {"uri": uri}}}))
    assert q.outcome == "quote" and len(q.events) == MAX_IMAGES and q.clipped == 500 - MAX_IMAGES
    ok = m.map(_frame("four", {"text": "t", "embed": {"$type": "app.bsky.embed.images", "images": _images(4)}}))
    assert len(ok.events) == 4 and ok.clipped == 0


# --------------------------------------------------------------------------
# 3. The cursor only moves forward
# --------------------------------------------------------------------------
def _numbered_posts(n: int) -> list[str]:
    return [_frame(f"r{k}", {"text": "t", "embed": {"$type": "app.bsky.embed.images", "images": _images(1, f"c{k}-")}},
                   did="did:plc:a", time_us=T0 + k * 1_000_000) for k in range(n)]


def test_short_connections_in_the_resume_overlap_do_not_walk_the_cursor_back(tmp_path):
    # Each connection re-reads the resume overlap (5 s before the saved cursor); a
    # connection that ended inside it moved the cursor back, and the next asked
    # for 5 s before that: T0+14, +10, +6, +2, -2 ... while T0+19 had been read.
    frames = _numbered_posts(20)
    s = bluesky_settings(tmp_path, idle_timeout_s=0.5, checkpoint_interval_s=0.01, checkpoint_every=1000,
                         bluesky_image_url=PUBLIC)
    sink = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "t")
    runner = build_bluesky(s, sink, state)
    last = T0 + 19_000_000
    with JetstreamServer(frames, drop_after={n: 2 for n in range(1, 100)}) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: len(server.requests) >= 6, timeout=DEADLINE_S))
    asked = [int(q["cursor"][0]) for q in server.requests[1:]]
    assert len(asked) >= 5
    assert asked == [last - 5_000_000] * len(asked), asked
    assert state.cursor("bluesky") == str(last)
    assert sorted(e.event_id for e in sink.events) == sorted(f"at://did:plc:a/app.bsky.feed.post/r{k}#0"
                                                             for k in range(20))


def test_the_emitter_never_moves_the_cursor_back(tmp_path):
    s = Settings(data_dir=tmp_path)
    em = Emitter("bluesky", "b", ConnectorState(":memory:"), JsonlSink(io.StringIO()), UrlPolicy(s.fetch),
                 s.connectors)
    em.advance("1000")
    em.advance("999")
    assert em.cursor == "1000"
    em.advance("1001")
    assert em.cursor == "1001"


# --------------------------------------------------------------------------
# 2. The instance document is settled only by a readable answer
# --------------------------------------------------------------------------
def test_an_instance_document_refused_at_startup_is_asked_again_not_fixed_for_the_run(tmp_path, caplog):
    # A 503 from /api/v1/instance at startup fixed streaming_url to the instance's
    # own host for the whole run; where streaming lives elsewhere that host answers
    # 404, which ended the run (FatalStreamError).
    blocks = sse_events(FRAMES / "mastodon_stream.sse")
    s = mastodon_settings(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(MastodonScript(streams=[blocks], drop=False)) as streaming:
        web_script = MastodonScript(streams=[[]], instance_answers={0: 503}, no_streaming=True,
                                    streaming_api=streaming.url.replace("http://", "ws://"))
        with MastodonServer(web_script) as web, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
            runner = build_mastodon(s, sink, open_state(s, "m", memory=True), instance=web.url, timeline="public")
            asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 7, timeout=DEADLINE_S))
    assert len(sink.events) == 7
    assert web.instance_requests == 2  # asked again after the 503, then settled
    assert runner.streaming_url == streaming.url
    assert len(streaming.stream_requests) == 1
    warned = [r.getMessage() for r in caplog.records if "/api/v1/instance" in r.getMessage()]
    assert warned == [f"{web.url}/api/v1/instance is unusable (HTTP 503); streaming from {web.url} for now, "
                      "asking again on the next connection"]


# --------------------------------------------------------------------------
# 4. A stop ends a connect or request waiting on a silent server
# --------------------------------------------------------------------------
class MuteServer:
    """Accepts TCP connections, reads nothing, answers nothing (an overloaded proxy)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


LONG_S = 300.0  # the connect and read timeouts: what the old code waited out after a stop


async def _stop_once(runner, ready, stop_within_s: float = 30.0) -> float:
    """Run until ``ready()``, stop, and how long run() took to return after it."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    deadline = time.monotonic() + DEADLINE_S
    while not ready() and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.02)
    assert ready() and not task.done()
    t = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, stop_within_s)  # the old code: up to LONG_S
    return time.monotonic() - t


def _long_timeouts(s: Settings) -> Settings:
    s.connectors.idle_timeout_s = LONG_S
    s.connectors.connect_timeout_s = LONG_S
    return s


@pytest.mark.parametrize("what", ["instance_document", "stream"])
def test_stop_ends_a_mastodon_connect_waiting_on_a_silent_server(tmp_path, what):
    mute = MuteServer()
    s = _long_timeouts(mastodon_settings(tmp_path))
    url = f"http://127.0.0.1:{mute.port}"
    runner = build_mastodon(s, JsonlSink(io.StringIO()), open_state(s, "m", memory=True), instance=url,
                            timeline="public", streaming_url=url if what == "stream" else None)

    async def go():
        try:
            return await _stop_once(runner, lambda: len(mute.conns) >= 1)
        finally:
            await runner.aclose()

    try:
        took = asyncio.run(go())
    finally:
        mute.close()
    assert took < 30.0
    assert runner.connects <= 1


def test_stop_ends_a_mastodon_backfill_request_waiting_on_a_silent_instance(tmp_path):
    script = MastodonScript(streams=[[":thump\n\n"]], drop=False, timeline_silent_s=LONG_S)
    s = _long_timeouts(mastodon_settings(tmp_path))
    state = open_state(s, "m", memory=True)
    with MastodonServer(script) as server:
        state.commit(mastodon_stream_key(server.url, "public", None), "100")  # a saved cursor: backfill first
        runner = build_mastodon(s, JsonlSink(io.StringIO()), state, instance=server.url, timeline="public")

        async def go():
            try:
                return await _stop_once(runner, lambda: len(server.rest_requests) >= 1)
            finally:
                await runner.aclose()

        took = asyncio.run(go())
    assert took < 30.0 and len(server.rest_requests) == 1


def test_stop_ends_a_jetstream_handshake_waiting_on_a_silent_server(tmp_path):
    mute = MuteServer()
    s = _long_timeouts(bluesky_settings(tmp_path))
    runner = build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, "b", memory=True),
                           url=f"ws://127.0.0.1:{mute.port}/subscribe")
    try:
        took = asyncio.run(_stop_once(runner, lambda: len(mute.conns) >= 1))
    finally:
        mute.close()
    assert took < 30.0 and runner.connects == 1


# --------------------------------------------------------------------------
# 5. A 503 gives the request's rate-limit tokens back
# --------------------------------------------------------------------------
TOKEN = "desk-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _Sink:
    def __init__(self, up: dict):
        self.up = up
        self.sent = 0

    def send_raw(self, key, value):
        if not self.up["broker"]:
            raise TimeoutError("KafkaTimeoutError: broker down")
        self.sent += 1

    def dead_letter(self, dl):
        pass

    def flush(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("cause", ["unavailable", "topic_missing"])
def test_a_batch_refused_503_can_be_re_sent_without_a_429(tmp_path, cause):
    # The tokens were taken before the broker was asked and kept on a 503: the
    # client re-sending as the 503's Retry-After says got 429 for the same batch.
    s = Settings(data_dir=tmp_path)
    s.connectors.ingest_max_lines = 500
    s.connectors.ingest_burst = 500
    s.connectors.ingest_rate_per_s = 0.01  # refills nothing worth counting within the test
    s.connectors.ingest_broker_timeout_s = 0.2
    up = {"broker": cause != "unavailable", "topics": cause != "topic_missing"}
    app = build_app(s, {TOKEN: "desk"}, sink_factory=lambda: _Sink(up),
                    missing_topics=lambda: [] if up["topics"] else [s.topic("events")])
    body = "\n".join(json.dumps({"schema_version": 1, "event_id": f"tip-{i}", "platform": "tipline",
                                 "account_id": "a", "posted_at": "2024-11-30T10:00:00Z",
                                 "image": {"url": f"https://93.184.215.14/{i}.jpg"}}) for i in range(500))
    with TestClient(app) as c:
        r = c.post("/ingest", content=body, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"] == "broker_unavailable", r.text
        up["broker"] = up["topics"] = True  # the broker is back
        deadline = time.monotonic() + DEADLINE_S
        while r.status_code == 503 and time.monotonic() < deadline:
            r = c.post("/ingest", content=body, headers=AUTH)  # the gate refuses at once for its timeout
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 500


# --------------------------------------------------------------------------
# 7. Produced means acknowledged by the broker
# --------------------------------------------------------------------------
def test_produced_counts_what_the_broker_acknowledged_not_each_send(tmp_path):
    # After a failed flush the rolled-back window is re-read and re-sent: every
    # send counted as produced gave 18 for 12 events on the broker.
    s = bluesky_settings(tmp_path, checkpoint_every=2, bluesky_image_url=PUBLIC)
    sink = LossyBroker(fail_flushes={2, 3})
    runner = build_bluesky(s, sink, open_state(s, "t"))
    want = len(expected_ids())
    before = metric("deepwatch_connector_events_total", connector="bluesky", outcome="produced")
    with JetstreamServer(jetstream_frames()) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: len(sink.acked) >= want, timeout=DEADLINE_S))
    assert len(sink.acked) == want == 12 and sink.flushes >= 4  # two failures and their re-sends happened
    assert runner.emitter.counts["events_produced"] == want
    assert metric("deepwatch_connector_events_total", connector="bluesky", outcome="produced") - before == want


def test_a_quiet_stream_checkpoints_without_waiting_for_the_idle_timeout(tmp_path):
    # Produced is counted at a checkpoint: a stream going quiet after a burst must
    # still confirm it (and save the cursor) within checkpoint_interval_s.
    frames = jetstream_frames()
    s = bluesky_settings(tmp_path, checkpoint_every=1000, checkpoint_interval_s=0.2, idle_timeout_s=LONG_S,
                         bluesky_image_url=PUBLIC)
    sink = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "t")
    runner = build_bluesky(s, sink, state)
    last = str(json.loads(frames[-1])["time_us"])
    while_running: list[dict] = []

    def saved() -> bool:
        # read while the connector runs (a stop saves it anyway)
        if state.cursor("bluesky") == last:
            while_running.append(dict(runner.emitter.counts))
        return bool(while_running)

    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, saved, timeout=DEADLINE_S))
    assert while_running, "the cursor was saved only by the stop"
    assert while_running[0].get("events_produced") == 12 and len(server.requests) == 1


# --------------------------------------------------------------------------
# A backfill page that is not JSON is not "the bound reached"
# --------------------------------------------------------------------------
def test_a_backfill_page_that_is_not_json_is_one_warning_not_two(tmp_path, caplog):
    blocks = sse_events(FRAMES / "mastodon_stream.sse")
    script = MastodonScript(streams=[blocks], drop=False, timeline_body=b"<html>maintenance</html>")
    s = mastodon_settings(tmp_path)
    state = open_state(s, "m", memory=True)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        state.commit(mastodon_stream_key(server.url, "public", None), "100")
        runner = build_mastodon(s, sink, state, instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 7, timeout=DEADLINE_S))
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("backfill page is not JSON") == 1
    assert not any("backfill bound reached" in m for m in messages), messages
