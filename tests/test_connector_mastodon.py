"""Mastodon connector against a loopback instance: SSE stream replaying a
recorded transcript, REST timelines for the backfill."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from streams.connectors.base import rate_limit_wait
from streams.connectors.mastodon import MAX_IMAGES, FatalStreamError, MastodonMapper, plain_text
from streams.connectors.run import build_mastodon, mastodon_stream_key, open_state
from streams.connectors.sinks import JsonlSink
from streams.records import ImageEvent
from streams.settings import Settings
from tests.connector_servers import FRAMES, MastodonScript, MastodonServer, sse_events

REPO = Path(__file__).resolve().parents[1]
HOST = "mastodon.example"


def recorded():
    blocks = sse_events(FRAMES / "mastodon_stream.sse")
    updates = [json.loads(b.split("data: ", 1)[1]) for b in blocks if "event: update\n" in b]
    backfill = json.loads((FRAMES / "mastodon_backfill.json").read_text())
    return blocks, updates, backfill


def settings_for(tmp_path: Path, **connectors) -> Settings:
    s = Settings(data_dir=tmp_path / "data")
    s.connectors.backoff_initial_s = 0.05
    s.connectors.backoff_max_s = 0.2
    s.connectors.idle_timeout_s = 2.0
    s.connectors.checkpoint_interval_s = 0.05
    for k, v in connectors.items():
        setattr(s.connectors, k, v)
    return s


async def run_until(runner, predicate, timeout: float = 20.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not predicate() and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await runner.aclose()


def media_ids(status: dict) -> list[str]:
    return [m["id"] for m in status["media_attachments"] if m["type"] == "image"]


def test_recorded_statuses_map_field_by_field():
    blocks, updates, _ = recorded()
    m = MastodonMapper(f"https://{HOST}")
    s1, s2, s3, s4, boost, s6, s8 = updates
    one = m.map_update(json.dumps(s1))
    assert one.outcome == "image_post" and one.cursor == int(s1["id"])
    assert [e.event_id for e in one.events] == [f"mastodon:{HOST}:{s1['id']}:{mid}" for mid in media_ids(s1)]
    e = one.events[0]
    assert e.platform == "mastodon" and e.post_id == s1["uri"] and e.post_url == s1["url"]
    assert e.account_id == f"user1@{HOST}" and e.account_handle == f"@user1@{HOST}"
    assert e.image.url == s1["media_attachments"][0]["url"]  # the original, not the preview or blurhash
    assert e.text == "Subway flooded right now #breaking\nstay safe & dry"
    assert e.hashtags == ["breaking"] and e.lang == "en"
    assert e.posted_at == datetime.fromisoformat(s1["created_at"])
    assert (e.engagement.likes, e.engagement.reposts, e.engagement.replies) == (12, 30, 4)
    assert m.map_update(json.dumps(s2)).outcome == "no_image"
    assert m.map_update(json.dumps(s3)).outcome == "no_image"  # video only
    remote = m.map_update(json.dumps(s4)).events[0]
    assert remote.account_id == "user3@news.example" and "/cache/" in remote.image.url and remote.lang == "de"
    # A boost: the booster's sighting of the original's pictures, own event ids, own (zero) engagement.
    b = m.map_update(json.dumps(boost))
    assert b.outcome == "repost" and [x.image.url for x in b.events] == [x.image.url for x in one.events]
    assert {x.account_id for x in b.events} == {f"user2@{HOST}"}
    assert all(x.event_id.startswith(f"mastodon:{HOST}:{boost['id']}:") for x in b.events)
    assert b.events[0].engagement.total == 0 and b.events[0].text == e.text
    # A quote of an image post.
    q = m.map_update(json.dumps(s6))
    assert q.outcome == "quote" and q.events[0].image.url == remote.image.url and ":q" in q.events[0].event_id
    assert m.map_delete(s2["id"]).forget == s2["id"]


def test_plain_text_and_rate_limit_headers():
    assert plain_text("<p>a &amp; b</p><p>c<br>d</p>") == "a & b\nc\nd"
    now = time.time()
    reset = datetime.fromtimestamp(now + 30, timezone.utc).isoformat()
    h = httpx.Headers({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
    assert 29 <= rate_limit_wait(h, now=now) <= 31
    assert rate_limit_wait(httpx.Headers({"X-RateLimit-Remaining": "250", "X-RateLimit-Reset": reset}), now=now) == 0
    assert rate_limit_wait(httpx.Headers({"Retry-After": "7"})) == 7


def test_stream_maps_updates_edits_deletes_and_skips_malformed(tmp_path, caplog):
    blocks, updates, _ = recorded()
    bad = sse_events(FRAMES / "mastodon_malformed.sse")
    script = MastodonScript(streams=[blocks[:4] + bad + blocks[4:]], drop=False)
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: runner.emitter.counts.get("delete", 0) and len(sink.events) >= 7))
    ids = [e.event_id for e in sink.events]
    assert len(ids) == 7 == len(set(ids))  # s1 x2, s4, boost x2, quote, s8; the edit of s4 adds nothing new
    assert runner.emitter.counts["malformed"] == len(bad) == 4
    assert runner.emitter.counts["no_image"] == 2 and runner.emitter.counts["events_duplicate"] == 1
    assert sum("malformed frame skipped" in r.getMessage() for r in caplog.records) == 4
    assert server.stream_requests[0]["path"] == "/api/v1/streaming/public"
    assert server.rest_requests == []  # first start: live only, nothing to backfill
    assert runner.emitter.cursor == updates[-1]["id"]  # the edit of an older status did not move it back


def test_image_urls_that_cannot_be_parsed_are_dead_lettered_and_the_stream_goes_on(tmp_path):
    # urlsplit raises ValueError for these; the URL policy let it out, and one
    # such status from an instance ended the connector's run.
    blocks, updates, _ = recorded()
    first = updates[0]["media_attachments"]
    hostile = blocks[0].replace(first[0]["url"], "http://[::1/x.jpeg").replace(
        first[1]["url"], "http://a\\uff03b@files.mastodon.example/y.jpeg")  # \uff03: NFKC makes it '#'
    assert hostile != blocks[0]
    script = MastodonScript(streams=[[hostile] + blocks[1:]], drop=False)
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: runner.emitter.counts.get("delete", 0) and len(sink.events) >= 5))
    assert sorted((d.reason, d.stage) for d in sink.dead) == [("bad_url", "fetch")] * 2
    assert sorted(d.event_id.rsplit(":", 2)[1:] for d in sink.dead) == sorted([updates[0]["id"], m]
                                                                               for m in media_ids(updates[0]))
    assert len(sink.events) == 5  # the 7 of the recording less the two refused
    assert runner.emitter.cursor == updates[-1]["id"]


def test_reconnect_without_event_ids_backfills_from_rest_without_gap_or_duplicate(tmp_path):
    blocks, updates, missed = recorded()
    s1, s2, s3, s4, boost, s6, s8 = updates
    later = json.loads(json.dumps(missed[0]))
    later["id"] = str(int(later["id"]) + 50_000)
    for m in later["media_attachments"]:
        m["id"] = m["id"][:-3] + "999"
    # connection 0: s1, s2, s3, heartbeat, s4, boost, then the socket drops;
    # meanwhile s6, s8 and the "missed" statuses are posted; connection 1 streams a new one.
    script = MastodonScript(
        streams=[blocks[:6], [f"event: update\ndata: {json.dumps(later)}\n\n"]],
        statuses=[s1, s2, s3, s4, s6, s8, *missed, later],  # public REST timelines carry no boosts
        drop=True, rate_limit_first=True,
    )
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    want = 2 + 1 + 2 + 1 + 1 + 5 + 1
    with MastodonServer(script) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        t0 = time.monotonic()
        asyncio.run(run_until(runner, lambda: len(sink.events) >= want))
    ids = [e.event_id for e in sink.events]
    assert len(ids) == want == len(set(ids)), ids
    assert server.stream_requests[1]["last_event_id"] is None
    # backfill paged forward from the last status seen before the drop, after waiting out the 429
    assert f"min_id={boost['id']}" in server.rest_requests[1]
    assert len(server.rest_requests) >= 2 and time.monotonic() - t0 >= 0.5
    assert runner.backfilled >= 7
    assert {e.event_id.split(":")[2] for e in sink.events} >= {m["id"] for m in missed if m["media_attachments"]}


def test_last_event_id_resume_needs_no_backfill(tmp_path):
    blocks, updates, _ = recorded()
    script = MastodonScript(streams=[blocks[:5], blocks[5:]], statuses=updates, drop=True, send_ids=True)
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: len(sink.events) >= 7))
    assert len(sink.events) == 7 == len({e.event_id for e in sink.events})
    assert server.stream_requests[1]["last_event_id"] == "4"
    assert server.rest_requests == []


def test_hashtag_timeline_restart_resumes_from_saved_cursor(tmp_path):
    blocks, updates, missed = recorded()
    s1, s2, s3, s4, boost, s6, s8 = updates
    s = settings_for(tmp_path)
    first = JsonlSink(io.StringIO(), keep=True)
    script = MastodonScript(streams=[blocks[:5]], statuses=[s1, s2, s3, s4, s6, s8, *missed], drop=False)
    with MastodonServer(script) as server:
        runner = build_mastodon(s, first, open_state(s, "tag"), instance=server.url, timeline="hashtag",
                                hashtag="breaking")
        asyncio.run(run_until(runner, lambda: len(first.events) >= 3))
        assert server.stream_requests[0]["path"] == "/api/v1/streaming/hashtag"
        assert server.stream_requests[0]["qs"] == {"tag": ["breaking"]}
    second = JsonlSink(io.StringIO(), keep=True)
    script2 = MastodonScript(streams=[[":thump\n\n"]], statuses=[s1, s2, s3, s4, s6, s8, *missed], drop=False)
    with MastodonServer(script2) as server:
        runner = build_mastodon(s, second, open_state(s, "tag"), instance=server.url, timeline="hashtag",
                                hashtag="breaking")
        asyncio.run(run_until(runner, lambda: len(second.events) >= 6))
        assert server.rest_requests[0].startswith(f"/api/v1/timelines/tag/breaking?min_id={s4['id']}")
    ids = [e.event_id for e in first.events + second.events]
    # s1 (2) + s4 live; then s6's quote + 5 missed (all #breaking) from the backfill; s8 is #cats
    assert len(ids) == 9 == len(set(ids))


def test_silent_stream_times_out_and_reconnects(tmp_path):
    blocks, _, _ = recorded()
    script = MastodonScript(streams=[blocks[:2], blocks[2:]], drop=False, silent_idle_s=5)
    s = settings_for(tmp_path, idle_timeout_s=0.5)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: len(sink.events) >= 7))
    assert len(server.stream_requests) >= 2 and len(sink.events) == 7


def test_bad_token_is_fatal_with_a_clear_message(tmp_path):
    blocks, _, _ = recorded()
    script = MastodonScript(streams=[blocks], token="right-token")
    s = settings_for(tmp_path)
    with MastodonServer(script) as server:
        runner = build_mastodon(s, JsonlSink(io.StringIO()), open_state(s, "m"), instance=server.url,
                                timeline="public", token="wrong-token")
        with pytest.raises(FatalStreamError, match="401"):
            asyncio.run(run_until(runner, lambda: False, timeout=5))


def test_cli_dry_run_with_token_from_env(tmp_path):
    blocks, _, _ = recorded()
    script = MastodonScript(streams=[blocks], token="tok-from-env", drop=False)
    with MastodonServer(script) as server:
        r = subprocess.run(
            [sys.executable, "-m", "streams.cli.__main__", "connect", "mastodon", "--instance", server.url,
             "--hashtag", "breaking", "--token-env", "MASTO_TOKEN", "--dry-run", "--duration", "4"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "MASTO_TOKEN": "tok-from-env"},
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert server.stream_requests[0]["path"] == "/api/v1/streaming/hashtag"
    events = [ImageEvent.model_validate_json(ln) for ln in r.stdout.splitlines()]
    assert len(events) == 7 and all(e.platform == "mastodon" for e in events)
    r = subprocess.run(
        [sys.executable, "-m", "streams.cli.__main__", "connect", "mastodon", "--instance", "https://x.example",
         "--token-env", "NOT_SET_ANYWHERE", "--dry-run"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2 and "NOT_SET_ANYWHERE" in r.stderr and "Traceback" not in r.stderr


def test_cli_instance_url_that_cannot_be_parsed_is_one_clear_line(tmp_path):
    for bad in ("https://[::1", "https://mastodon.example:99999"):
        r = subprocess.run(
            [sys.executable, "-m", "streams.cli.__main__", "connect", "mastodon", "--instance", bad, "--dry-run",
             "--duration", "1", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert r.returncode == 2 and "--instance" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_dead_instance_backs_off_and_never_crashes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    st = settings_for(tmp_path, connect_timeout_s=0.3)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_mastodon(st, sink, open_state(st, "m"), instance=f"http://127.0.0.1:{dead}", timeline="local")
    asyncio.run(run_until(runner, lambda: False, timeout=1.5))
    assert 2 <= runner.connects < 40 and sink.events == []


def test_a_stream_closed_after_every_event_is_reconnected_to_with_growing_waits(tmp_path):
    # Every event reset the backoff: a server (or proxy) that closed each
    # stream after one event was reconnected to at the first step for ever
    # (old code: 20-30 connections in these 2 s; growing waits allow about 6).
    blocks, _, _ = recorded()
    update = next(b for b in blocks if "event: update\n" in b)
    script = MastodonScript(streams=[[update]] * 200, drop=True)
    st = settings_for(tmp_path, backoff_initial_s=0.05, backoff_max_s=1.0)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server:
        runner = build_mastodon(st, sink, open_state(st, "m"), instance=server.url, timeline="local")
        asyncio.run(run_until(runner, lambda: False, timeout=2.0))
    assert 3 <= runner.connects <= 9, runner.connects
    assert len(sink.events) >= 1  # the event itself was taken (once: the rest are repeats)


# --------------------------------------------------------------------------
# Odd but legal statuses, and what a days-long run meets
# --------------------------------------------------------------------------
def test_statuses_with_many_or_long_tags_and_drifted_counters_still_map():
    _, updates, _ = recorded()
    s1 = updates[0]
    m = MastodonMapper(f"https://{HOST}")
    many = m.map_update(json.dumps({**s1, "tags": [{"name": f"t{i}"} for i in range(100)]}))
    assert many.outcome == "image_post" and many.events[0].hashtags == [f"t{i}" for i in range(64)]
    long = m.map_update(json.dumps({**s1, "tags": [{"name": "y" * 300}, {"name": "news"}]}))
    assert long.outcome == "image_post" and long.events[0].hashtags == ["news"]
    drifted = m.map_update(json.dumps({**s1, "reblogs_count": -1, "favourites_count": 2**60}))
    assert drifted.outcome == "image_post" and len(drifted.events) == 2
    assert (drifted.events[0].engagement.reposts, drifted.events[0].engagement.likes) == (0, 2**53)


def test_a_status_with_thousands_of_attachments_gives_at_most_max_images_events(tmp_path, caplog):
    # Mastodon caps a status at 4 attachments, but a server speaking its API (or a
    # hostile one) may send thousands: each was an event, and each boost of it as many.
    _, updates, _ = recorded()
    s1 = updates[0]
    media = [{"id": f"m{i}", "type": "image", "url": f"https://files.example/{i}.jpg"} for i in range(5000)]
    big = {**s1, "id": "9000", "media_attachments": media}
    boost = {**s1, "id": "9001", "reblog": big, "media_attachments": []}
    quote = {**s1, "id": "9002", "media_attachments": media[:3], "quote": {"state": "accepted", "quoted_status": big}}
    m = MastodonMapper(f"https://{HOST}")
    own, boosted, quoted = (m.map_update(json.dumps(x)) for x in (big, boost, quote))
    assert own.outcome == "image_post" and [e.image.url for e in own.events] == [m["url"] for m in media[:MAX_IMAGES]]
    assert own.clipped == boosted.clipped == 5000 - MAX_IMAGES and len(boosted.events) == MAX_IMAGES
    assert len(quoted.events) == 3 + MAX_IMAGES and quoted.clipped == 5000 - MAX_IMAGES
    ok = m.map_update(json.dumps(s1))
    assert ok.clipped == 0 and len(ok.events) == 2
    # Through the stream: counted once per status, one warning each, the stream goes on.
    blocks = [f"event: update\ndata: {json.dumps(x)}\n\n" for x in (big, s1)]
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(MastodonScript(streams=[blocks], drop=False)) as server, \
            caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: len(sink.events) >= MAX_IMAGES + 2))
    assert len(sink.events) == MAX_IMAGES + 2
    assert runner.emitter.counts["events_clipped"] == 5000 - MAX_IMAGES
    assert sum("more than 16 image attachments" in r.getMessage() for r in caplog.records) == 1


def test_retry_after_as_an_http_date():
    from email.utils import format_datetime

    now = time.time()
    when = format_datetime(datetime.fromtimestamp(now + 30, timezone.utc), usegmt=True)
    assert 28 <= rate_limit_wait(httpx.Headers({"Retry-After": when}), now=now) <= 31
    assert rate_limit_wait(httpx.Headers({"Retry-After": "soon"}), now=now) == 0


def test_stop_ends_a_long_rate_limit_wait(tmp_path):
    script = MastodonScript(streams=[[":thump\n\n"]], stream_answers={0: (429, {"Retry-After": "120"})})
    s = settings_for(tmp_path)
    with MastodonServer(script) as server:
        runner = build_mastodon(s, JsonlSink(io.StringIO()), open_state(s, "m"), instance=server.url,
                                timeline="public")
        t0 = time.monotonic()
        asyncio.run(run_until(runner, lambda: len(server.stream_requests) >= 1 and time.monotonic() - t0 > 0.5,
                              timeout=5))
        assert time.monotonic() - t0 < 4  # Ctrl-C / SIGTERM does not wait out the two minutes


def test_an_event_without_end_is_cut_at_the_frame_cap_not_held(tmp_path, caplog):
    # httpx-sse reads a line until its newline: a server streaming one endless
    # "data:" line made the connector hold all of it. The stream is capped per
    # event (bytes between blank lines) at connectors.max_frame_bytes.
    blocks, _, _ = recorded()
    endless = "event: update\ndata: " + "x" * 300_000  # no end, and over the cap
    script = MastodonScript(streams=[blocks[:2] + [endless], blocks[2:4]], drop=True)
    s = settings_for(tmp_path, max_frame_bytes=64 * 1024)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: len(server.stream_requests) >= 2 and len(sink.events) >= 2))
    assert len(server.stream_requests) >= 2 and sink.events  # cut, reconnected, still reading
    assert any("over 65536 bytes" in str(getattr(r, "error", "")) for r in caplog.records)


def test_a_websocket_streaming_url_is_read_over_http_whatever_its_case():
    # "WSS://host" passed the --streaming-url check but was not rewritten: httpx
    # then retried UnsupportedProtocol for good
    from streams.connectors.mastodon import http_streaming_url

    assert http_streaming_url("WSS://streaming.example/api") == "https://streaming.example/api"
    assert http_streaming_url(" ws://streaming.example:81 ") == "http://streaming.example:81"
    assert http_streaming_url("https://streaming.example") == "https://streaming.example"


# --------------------------------------------------------------------------
# Odd answers from an instance
# --------------------------------------------------------------------------
@pytest.mark.parametrize("body, problem", [
    (b"[]", "the document is an array, not an object"),
    (b"null", "the document is null, not an object"),
    (b'{"urls": "x"}', "urls is a string, not an object"),
    (b'{"urls": {"streaming_api": 5}}', "urls.streaming_api is a number, not a string"),
    (b'{"urls": {"streaming_api": "wss://[::1"}}', "urls.streaming_api 'wss://[::1' is not a URL"),
    (b'{"urls": {"streaming_api": "wss://x.example:99999"}}',
     "urls.streaming_api 'wss://x.example:99999' is not a URL"),
    (b'{"urls": {"streaming_api": "ftp://x.example"}}',
     "urls.streaming_api 'ftp://x.example' is not a ws(s):// or http(s):// URL"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON (RecursionError)"),
    (b"<html>", "not JSON (JSONDecodeError)"),
])
def test_an_unusable_instance_document_is_one_warning_and_the_stream_runs(tmp_path, caplog, body, problem):
    # [] and {"urls": "x"} raised AttributeError, a deeply nested document
    # RecursionError: run() ended and `deepwatch connect` printed a traceback.
    blocks, _, _ = recorded()
    script = MastodonScript(streams=[blocks], drop=False, instance_body=body)
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: len(sink.events) >= 7))
    assert len(sink.events) == 7 and runner.connects == 1
    assert server.stream_requests[0]["path"] == "/api/v1/streaming/public"
    warned = [r.getMessage() for r in caplog.records if "/api/v1/instance" in r.getMessage()]
    if problem.startswith("not JSON"):
        # no readable document: this connection uses the instance's host, the next one asks again
        assert runner.streaming_url is None
        assert warned == [f"{server.url}/api/v1/instance is unusable ({problem}); streaming from {server.url} "
                          "for now, asking again on the next connection"]
    else:
        # a readable document that names no usable address: the instance's host, settled for the run
        assert runner.streaming_url == server.url
        assert warned == [f"{server.url}/api/v1/instance is unusable ({problem}); streaming from {server.url}"]


def test_a_backfill_page_nested_past_the_parsers_depth_is_skipped_not_fatal(tmp_path, caplog):
    blocks, updates, _ = recorded()
    script = MastodonScript(streams=[blocks], drop=False, statuses=updates,
                            timeline_body=b"[" * 100_000 + b"]" * 100_000)
    s = settings_for(tmp_path)
    state = open_state(s, "m")
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        state.commit(mastodon_stream_key(server.url, "public", None), "100")
        runner = build_mastodon(s, sink, state, instance=server.url, timeline="public")
        asyncio.run(run_until(runner, lambda: len(sink.events) >= 7))
    assert len(server.rest_requests) == 1 and runner.connects == 1
    assert len(sink.events) == 7 and runner.emitter.cursor == updates[-1]["id"]
    assert [r.url for r in caplog.records if r.getMessage() == "backfill page is not JSON"] == \
        [f"{server.url}/api/v1/timelines/public?min_id=100&limit=40"]


def _numbered(n: int, first: int = 1000) -> list[dict]:
    """``n`` copies of a recorded image status with ids ``first``, ``first+1``, ..."""
    _, updates, _ = recorded()
    out = []
    for i in range(n):
        st = json.loads(json.dumps(updates[0]))
        st["id"] = str(first + i)
        st["uri"] = f"https://{HOST}/users/a/statuses/{first + i}"
        for m in st["media_attachments"]:
            m["id"] = f"{m['id']}{i}"
        out.append(st)
    return out


@pytest.mark.parametrize("prev, followed", [
    (None, True),  # the instance's own absolute link
    ("/api/v1/timelines/public?min_id=1039&limit=40", True),  # relative: the same origin
    ("http://localhost:{port}/api/v1/timelines/public?min_id=1039", False),  # another host
    ("http://127.0.0.1:{other}/api/v1/timelines/public?min_id=1039", False),  # another port
    ("https://127.0.0.1:{port}/api/v1/timelines/public?min_id=1039", False),  # another scheme
])
def test_backfill_follows_next_page_links_only_to_the_instance(tmp_path, caplog, prev, followed):
    # Any Link rel="prev" was followed, to any host, with the bearer token.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        other = sock.getsockname()[1]
    statuses = _numbered(45)
    script = MastodonScript(streams=[[":thump\n\n"]], drop=False, statuses=statuses, token="tok-secret")
    s = settings_for(tmp_path)
    state = open_state(s, "m")
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        script.prev_link = prev.format(port=server.port, other=other) if prev else None
        state.commit(mastodon_stream_key(server.url, "public", None), "999")
        runner = build_mastodon(s, sink, state, instance=server.url, timeline="public", token="tok-secret")
        asyncio.run(run_until(runner, lambda: runner.backfilled > 0, timeout=10))
    stopped = [r for r in caplog.records if r.getMessage() == "backfill stopped: the next page's link leaves the instance"]
    if followed:
        assert runner.backfilled == 45 and len(server.rest_requests) == 2 and stopped == []
        assert "min_id=1039" in server.rest_requests[1]
    else:
        assert runner.backfilled == 40 and len(server.rest_requests) == 1  # localhost: the same server, never asked
        assert [r.link for r in stopped] == [script.prev_link]
    assert runner.emitter.cursor == ("1044" if followed else "1039")


def test_status_ids_int_cannot_read_are_no_cursor_not_a_crash():
    # "²".isdigit() and a 5000-digit id passed the check, then int() raised
    # ValueError: one such status ended the connector's run.
    from streams.connectors.base import MalformedFrame
    from streams.connectors.mastodon import status_id_int

    _, updates, _ = recorded()
    m = MastodonMapper(f"https://{HOST}")
    for sid in ("²", "١٢٣"):
        r = m.map_update(json.dumps({**updates[0], "id": sid}))
        assert r.outcome == "image_post" and r.cursor is None and len(r.events) == 2
        assert r.events[0].event_id.startswith(f"mastodon:{HOST}:{sid}:")
    with pytest.raises(MalformedFrame) as ei:  # a counted drop: its event ids would be over 256 characters
        m.map_update(json.dumps({**updates[0], "id": "1" * 5000}))
    assert ei.value.reason == "unmappable"
    assert [status_id_int(x) for x in ("²", "1" * 5000, "-5", "", "42")] == [-1, -1, -1, -1, 42]
    assert m.map_update(json.dumps(updates[0])).cursor == int(updates[0]["id"])


def test_account_fields_the_mapper_does_not_read_cannot_make_a_status_malformed():
    _, updates, _ = recorded()
    m = MastodonMapper(f"https://{HOST}")
    odd = {**updates[0], "account": {**updates[0]["account"], "username": 5, "url": ["x"]}}
    r = m.map_update(json.dumps(odd))
    assert r.outcome == "image_post" and len(r.events) == 2
    assert [e.event_id for e in r.events] == [e.event_id for e in m.map_update(json.dumps(updates[0])).events]
    assert r.events[0].account_handle == f"@{updates[0]['account']['acct']}@{HOST}"


def test_an_unmappable_status_names_its_event_and_field():
    from streams.connectors.base import MalformedFrame

    _, updates, _ = recorded()
    m = MastodonMapper(f"https://{HOST}")
    sid = "a" * 300
    with pytest.raises(MalformedFrame) as ei:
        m.map_update(json.dumps({**updates[0], "id": sid}))
    eid = f"mastodon:{HOST}:{sid}:{updates[0]['media_attachments'][0]['id']}"
    assert (ei.value.reason, ei.value.detail) == ("unmappable",
                                                  f"{eid}: event_id: String should have at most 256 characters")
