"""Second connector audit: a position from the future (Jetstream time_us,
Mastodon status id) must not become the cursor. Jetstream answers a future
cursor with its live tip and Mastodon's min_id with nothing, so a resume from
it skipped what was missed meanwhile; the cursor never moves back, so it stayed
there; and a time_us past 1e308 ended every run (the lag gauge could not make
a float of it) from a state file that then held it. And a Jetstream
handshake refused 429 with Retry-After is waited out, not retried at once.
Against the loopback servers of tests/connector_servers.py."""

from __future__ import annotations

import asyncio
import io
import json
import time

from prometheus_client import REGISTRY

from streams.connectors.run import build_bluesky, build_mastodon, open_state
from streams.connectors.sinks import JsonlSink
from tests.connector_servers import JetstreamServer, MastodonScript, MastodonServer
from tests.test_connector_bluesky import run_until as bluesky_run_until
from tests.test_connector_bluesky import settings_for as bluesky_settings
from tests.test_connector_mastodon import run_until as mastodon_run_until
from tests.test_connector_mastodon import settings_for as mastodon_settings

PUBLIC = "https://93.184.215.14/img/{did}/{cid}"  # an address literal: the URL policy asks no DNS
T0 = 1732960800_000000
YEAR_2100_US = 4102444800_000000
DEADLINE_S = 30.0


def _post(rkey: str, time_us: int, did: str = "did:plc:a") -> str:
    return json.dumps({"did": did, "time_us": time_us, "kind": "commit", "commit": {
        "rev": "r", "operation": "create", "collection": "app.bsky.feed.post", "rkey": rkey,
        "record": {"text": "t", "createdAt": "2024-11-30T10:00:00Z",
                   "embed": {"$type": "app.bsky.embed.images",
                             "images": [{"image": {"ref": {"$link": f"c{rkey}"}}}]}}}})


def _identity(time_us: int) -> str:
    return json.dumps({"did": "did:plc:x", "time_us": time_us, "kind": "identity",
                       "identity": {"did": "did:plc:x", "handle": "x.example"}})


def _ids(sink: JsonlSink) -> list[str]:
    return [e.event_id.rsplit("/", 1)[1] for e in sink.events]


def test_a_time_us_past_floats_neither_ends_the_run_nor_becomes_the_cursor(tmp_path):
    # One identity frame with time_us = 10**309: the checkpoint's lag gauge raised
    # OverflowError, out of the connector, after saving that cursor: every restart ended the same way.
    frames = [_post("a", T0), _identity(10 ** 309), _post("b", T0 + 1_000_000)]
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    sink = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "t")
    runner = build_bluesky(s, sink, state)
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: runner.emitter.cursor == str(T0 + 1_000_000),
                                      timeout=DEADLINE_S))
    assert _ids(sink) == ["a#0", "b#0"]
    assert state.cursor(runner.emitter.stream) == str(T0 + 1_000_000)
    assert runner.emitter.counts["cursor_ahead"] == 1


def test_a_frame_from_the_future_does_not_make_the_resume_skip_what_follows(tmp_path):
    # Connection 0 reads a, f (time_us in 2100), b and drops. Resuming from f's
    # time (Jetstream: the live tip) skipped c; resuming from b's re-reads and gets c.
    frames = [_post("a", T0), _post("f", YEAR_2100_US), _post("b", T0 + 1_000_000), _post("c", T0 + 2_000_000)]
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    before = REGISTRY.get_sample_value("deepwatch_connector_cursor_ahead_total", {"connector": "bluesky"}) or 0.0
    with JetstreamServer(frames, drop_after={0: 3}) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: len(sink.events) >= 4, timeout=DEADLINE_S))
    assert _ids(sink) == ["a#0", "f#0", "b#0", "c#0"]  # each once: the resume's repeats dropped by id
    assert len(server.requests) >= 2
    assert int(server.requests[1]["cursor"][0]) == T0 + 1_000_000 - 5_000_000  # b's time less the overlap
    assert runner.emitter.cursor == str(T0 + 2_000_000)
    after = REGISTRY.get_sample_value("deepwatch_connector_cursor_ahead_total", {"connector": "bluesky"})
    assert after - before >= 1


def test_a_future_cursor_saved_by_an_older_version_is_set_aside_at_start(tmp_path, caplog):
    # A state file holding 10**400 as the cursor (written before this fix) ended every run:
    # the cursor could never move back from it, and the lag gauge raised.
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    state = open_state(s, "t")
    key = build_bluesky(s, JsonlSink(io.StringIO()), state).emitter.stream
    state.commit(key, str(10 ** 400))
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, state)
    assert runner.emitter.cursor is None
    with JetstreamServer([_post("a", T0), _post("b", T0 + 1_000_000)]) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: runner.emitter.cursor == str(T0 + 1_000_000),
                                      timeout=DEADLINE_S))
    assert _ids(sink) == ["a#0", "b#0"]
    assert "cursor" not in server.requests[0]  # live, not from a cursor in the future
    assert state.cursor(key) == str(T0 + 1_000_000)
    assert any("saved cursor lies in the future" in r.getMessage() for r in caplog.records)


def _status(sid: int, media: str) -> dict:
    return {"id": str(sid), "created_at": "2024-11-30T10:00:00.000Z", "uri": f"https://m.example/s/{sid}",
            "url": f"https://m.example/@a/{sid}", "content": "<p>t</p>", "account": {"id": "1", "acct": "a"},
            "media_attachments": [{"id": media, "type": "image", "url": f"https://93.184.215.14/{media}.jpg"}]}


def test_a_mastodon_status_id_from_the_future_does_not_make_the_backfill_skip(tmp_path):
    # A remote status's id is derived from the date its server claims (and any server
    # speaking the API may send any id): one dated 2100 became the cursor, and the
    # backfill after the drop asked min_id=<2100>, got nothing, and b was never read.
    now_ms = int(time.time() * 1000)
    a = _status((now_ms - 60_000) << 16, "ma")
    future = _status(YEAR_2100_US // 1000 << 16, "mf")
    b = _status((now_ms - 30_000) << 16, "mb")  # posted while the connector was away
    script = MastodonScript(streams=[[f"event: update\ndata: {json.dumps(x)}\n\n" for x in (a, future)], []],
                            statuses=[a, future, b], drop=True)
    s = mastodon_settings(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 3, timeout=DEADLINE_S))
    assert sorted(e.event_id.rsplit(":", 1)[1] for e in sink.events) == ["ma", "mb", "mf"]
    assert f"min_id={a['id']}" in server.rest_requests[0]
    assert runner.emitter.cursor == b["id"]


def test_a_jetstream_handshake_refused_429_with_retry_after_is_waited_out(tmp_path, caplog):
    # A proxy in front of Jetstream shedding load answers the upgrade 429 with
    # Retry-After: the connector came back after its backoff (here 0.05-0.2 s),
    # again and again, long before the server said it would take it.
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    before = REGISTRY.get_sample_value("deepwatch_connector_rate_limit_waits_total", {"connector": "bluesky"}) or 0.0
    with JetstreamServer([_post("a", T0)], refuse={0: (429, {"Retry-After": "2"})}) as server:
        runner.url = server.url
        asyncio.run(bluesky_run_until(runner, lambda: len(sink.events) >= 1, timeout=DEADLINE_S))
    assert _ids(sink) == ["a#0"]
    assert len(server.handshakes) == 2 and server.handshakes[1] - server.handshakes[0] >= 1.9
    after = REGISTRY.get_sample_value("deepwatch_connector_rate_limit_waits_total", {"connector": "bluesky"})
    assert after - before == 1


def test_a_cursor_pasted_into_the_jetstream_url_does_not_override_the_saved_one(tmp_path, caplog):
    # Jetstream's README shows URLs with &cursor=...; pasted into --jetstream-url it came
    # first in every subscribe URL, and Jetstream takes the first: each (re)connect
    # replayed from that fixed point instead of the saved cursor.
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    state = open_state(s, "t")
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, state, url=f"ws://127.0.0.1:9/subscribe?cursor={T0 - 3_600_000_000}")
    state.commit(runner.emitter.stream, str(T0 + 10_000_000))
    runner.emitter.advance(str(T0 + 10_000_000))
    frames = [_post("old", T0), _post("new", T0 + 20_000_000)]
    with JetstreamServer(frames) as server:
        runner.url = f"{server.url}?cursor={T0 - 3_600_000_000}"
        asyncio.run(bluesky_run_until(runner, lambda: len(sink.events) >= 1, timeout=DEADLINE_S))
    assert server.requests[0]["cursor"] == [str(T0 + 10_000_000 - 5_000_000)]  # the saved one, less the overlap
    assert _ids(sink) == ["new#0"]
    assert any("carries a cursor" in r.getMessage() for r in caplog.records)
