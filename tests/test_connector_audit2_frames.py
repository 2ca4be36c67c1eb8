"""Second connector audit: frames sent in bulk by a broken or hostile
platform. A warning per malformed frame (or refused image URL) meant
thousands of lines a second from a platform sending nothing else; a
compressed stream read without the dictionary was only "malformed_json";
identity frames with huge DIDs grew the handle memory without bound in size."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from streams.connectors.run import build_bluesky, build_mastodon, open_state
from streams.connectors.sinks import JsonlSink
from tests.connector_servers import JetstreamServer, MastodonScript, MastodonServer
from tests.test_connector_audit2_cursor import PUBLIC, T0, _post
from tests.test_connector_bluesky import run_until as bluesky_run_until
from tests.test_connector_bluesky import settings_for as bluesky_settings
from tests.test_connector_mastodon import run_until as mastodon_run_until
from tests.test_connector_mastodon import settings_for as mastodon_settings

N = 300
BURST = 10  # LogThrottle's default: lines of one kind a minute


def _warnings(caplog, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def test_a_compressed_stream_without_the_dictionary_is_said_so_in_a_few_lines(tmp_path, caplog):
    # --jetstream-url ...?compress=true without --zstd-dictionary: every frame is zstd.
    zstandard = pytest.importorskip("zstandard")
    frames = [_post(f"r{k}", T0 + k) for k in range(N)]
    dictionary = zstandard.train_dictionary(2048, [f.encode() for f in frames]).as_bytes()
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    runner = build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, "t"))
    with JetstreamServer(frames, zstd_dict=dictionary) as server, \
            caplog.at_level(logging.WARNING, "deepwatch.connectors.bluesky"):
        runner.url = server.url + "?compress=true"
        asyncio.run(bluesky_run_until(runner, lambda: runner.emitter.counts.get("malformed", 0) >= N, timeout=30))
    assert runner.emitter.counts["malformed"] == N  # each counted (and in the metrics) ...
    skipped = _warnings(caplog, "malformed frame skipped")
    assert len(skipped) == BURST  # ... but a few lines, not one per frame
    assert {r.reason for r in skipped} == {"compressed_frame"}
    assert "--zstd-dictionary" in skipped[0].detail


def test_mastodon_malformed_events_and_refused_urls_are_a_few_lines(tmp_path, caplog):
    bad = [f"event: update\ndata: {{\"id\": \"{k}\"}}\n\n" for k in range(N)]
    private = [f"event: update\ndata: {json.dumps(_status(k))}\n\n" for k in range(N)]
    s = mastodon_settings(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(MastodonScript(streams=[bad + private], drop=False)) as server, \
            caplog.at_level(logging.WARNING, "deepwatch.connectors"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.dead) >= N, timeout=30))
    assert runner.emitter.counts["malformed"] == N and len(sink.dead) == N
    assert len(_warnings(caplog, "malformed frame skipped")) == BURST
    assert len(_warnings(caplog, "image URL refused by fetch policy")) == BURST


def _status(k: int) -> dict:
    sid = 113571100000001000 + k
    return {"id": str(sid), "created_at": "2024-11-30T10:00:00.000Z", "uri": f"https://m.example/s/{sid}",
            "content": "t", "account": {"id": "1", "acct": "a"},
            "media_attachments": [{"id": f"m{k}", "type": "image", "url": f"http://127.0.0.1/{k}.jpg"}]}


def test_the_throttle_says_how_many_lines_it_left_out():
    from streams.connectors.base import LogThrottle

    assert LogThrottle().burst == BURST
    now = [0.0]
    throttle = LogThrottle(burst=2, window_s=60.0, clock=lambda: now[0])
    assert [throttle.allow() for _ in range(5)] == [0, 0, None, None, None]
    now[0] = 61.0
    assert throttle.allow() == 3  # the next line let through counts the three left out
    assert throttle.allow() == 0 and throttle.allow() is None


def test_identity_frames_with_dids_no_event_can_hold_are_not_remembered(tmp_path):
    # The DID -> handle memory was bounded in count (100 000) but not in size: identity
    # frames with DIDs of a frame's size (up to 2 MiB each) could make it gigabytes.
    # A DID longer than an event's account_id (256) can never be an event's account.
    big = [json.dumps({"did": f"did:web:{k}{'x' * 100_000}", "time_us": T0 + k, "kind": "identity",
                       "identity": {"did": "d", "handle": f"h{k}.example"}}) for k in range(50)]
    ok = json.dumps({"did": "did:plc:ok", "time_us": T0 + 100, "kind": "identity",
                     "identity": {"did": "did:plc:ok", "handle": "ok.example"}})
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    with JetstreamServer(big + [ok, _post("p", T0 + 200, did="did:plc:ok")]) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: len(sink.events) >= 1, timeout=30))
    remembered = runner.mapper.resolver._cache
    assert remembered and sum(len(did) for did in remembered) < 1000, "DIDs no event can hold were kept"
    assert sink.events[0].account_handle == "ok.example"  # a real DID's handle still is
