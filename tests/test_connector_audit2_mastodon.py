"""Second connector audit, Mastodon: what the SSE stream and its resume do
with a broker that fails and with a server's line endings. Against the
loopback instance of tests/connector_servers.py."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest

from streams.connectors.run import build_mastodon, open_state
from streams.connectors.sinks import JsonlSink
from tests.connector_servers import DripServer, MastodonScript, MastodonServer
from tests.test_connector_bluesky import LossyBroker
from tests.test_connector_mastodon import recorded
from tests.test_connector_mastodon import run_until as mastodon_run_until
from tests.test_connector_mastodon import settings_for as mastodon_settings

DEADLINE_S = 30.0


def test_a_broker_failure_resumes_from_the_last_confirmed_sse_id_not_the_last_read(tmp_path):
    # A server that sends SSE ids: connection 0 reads ids 0-4 (confirmed at its end),
    # connection 1 ids 5-8, then the broker fails that checkpoint. The emitter rolled
    # back, but the resume asked Last-Event-ID: 8, the server replayed nothing after it,
    # and the events of ids 5-8 (never acknowledged) were lost.
    blocks, _, _ = recorded()
    script = MastodonScript(streams=[blocks[:5], blocks[5:], []], drop=True, send_ids=True)
    # checkpoints only at the end of each connection: the first confirms, the second fails
    s = mastodon_settings(tmp_path, checkpoint_interval_s=60.0, checkpoint_every=1000)
    sink = LossyBroker(fail_flushes={2})
    with MastodonServer(script) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.acked) >= 7 or len(server.stream_requests) >= 4,
                                       timeout=DEADLINE_S))
    ids = [e.event_id for e in sink.acked]
    assert len(ids) == 7 == len(set(ids)), ids  # everything the recording holds, each acknowledged once
    assert [r["last_event_id"] for r in server.stream_requests[:3]] == [None, "4", "4"]
    assert server.rest_requests == []


def _status(n: int) -> dict:
    sid = 113571100000001000 + n
    return {"id": str(sid), "created_at": "2024-11-30T10:00:00.000Z", "uri": f"https://m.example/s/{sid}",
            "url": f"https://m.example/@a/{sid}", "content": "<p>" + "x" * 1500 + "</p>",
            "account": {"id": "1", "acct": "a"},
            "media_attachments": [{"id": f"m{n}", "type": "image", "url": f"https://93.184.215.14/{n}.jpg"}]}


def test_a_stream_whose_lines_end_with_cr_is_not_cut_at_the_event_cap(tmp_path):
    # SSE lines may end with \r alone. The per-event cap looked for \n\n and \r\n\r\n
    # only, so such a stream counted as one endless event: cut once max_frame_bytes had
    # come (here after two of ten small events), reconnected, cut again at the same
    # place: the events past it were never read.
    blocks = [f"event: update\rdata: {json.dumps(_status(n))}\r\r" for n in range(10)]
    assert all(len(b) < 4096 for b in blocks) and sum(map(len, blocks)) > 4 * 4096
    # A final \r may be the start of \r\n: the SSE reader waits for the next byte (a heartbeat) to end the last event.
    blocks.append(":thump\r")
    s = mastodon_settings(tmp_path, max_frame_bytes=4096)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(MastodonScript(streams=[blocks], drop=False)) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 10 or len(server.stream_requests) >= 3,
                                       timeout=DEADLINE_S))
    assert [e.event_id.rsplit(":", 1)[1] for e in sink.events] == [f"m{n}" for n in range(10)]
    assert len(server.stream_requests) == 1


def test_an_event_without_end_in_cr_lines_is_still_cut_at_the_cap(tmp_path, caplog):
    # The other side of the above: lines ending in \r without a blank one are one event.
    endless = ["event: update\rdata: {" + "\"a\": 1, " * 40 + "\r" for _ in range(200)]
    s = mastodon_settings(tmp_path, max_frame_bytes=4096)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(MastodonScript(streams=[endless], drop=False)) as server, \
            caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(server.stream_requests) >= 2, timeout=DEADLINE_S))
    assert len(server.stream_requests) >= 2
    assert any("over 4096 bytes" in r.getMessage() for r in caplog.records)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("head, drip", [
    # an event whose bytes keep coming and that never ends (not even a line of it)
    (SSE_HEAD + b":)\n", b"data: {\"id\": 1"),
    # data lines, but never the blank line that ends the event
    (SSE_HEAD, b"data: x\n"),
    # the answer's head itself never ends
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n", b"X-Drip: aaaaaaaa\r\n"),
], ids=["partial-line", "lines-without-end", "head"])
def test_a_stream_that_drips_bytes_without_an_event_is_left_after_the_idle_timeout(tmp_path, caplog, head, drip):
    # Each byte reset httpx's read timeout: a server (or proxy) dripping a byte a
    # few times a second held the connector for good, with no frame, no reconnect
    # and no log line.
    s = mastodon_settings(tmp_path, idle_timeout_s=1.0, connect_timeout_s=1.0)
    with DripServer(head, drip, every_s=0.1) as server, \
            caplog.at_level(logging.INFO, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, JsonlSink(io.StringIO()), open_state(s, "m"), instance=server.url,
                                timeline="public", streaming_url=server.url)
        t0 = time.monotonic()
        asyncio.run(mastodon_run_until(runner, lambda: server.connections >= 2, timeout=DEADLINE_S))
    assert server.connections >= 2, "the dripping connection was never left"
    assert time.monotonic() - t0 < 10
    assert any(r.getMessage() == "reconnecting" for r in caplog.records)


def test_heartbeats_keep_a_quiet_stream_open(tmp_path):
    # The other side of the above: Mastodon's ":thump" comment lines (one every
    # 15 s; here 10 a second) are the server alive, not a drip: no reconnect.
    s = mastodon_settings(tmp_path, idle_timeout_s=1.0, connect_timeout_s=1.0)
    with DripServer(SSE_HEAD + b":)\n", b":thump\n", every_s=0.02) as server:
        runner = build_mastodon(s, JsonlSink(io.StringIO()), open_state(s, "m"), instance=server.url,
                                timeline="public", streaming_url=server.url)
        t0 = time.monotonic()
        asyncio.run(mastodon_run_until(runner, lambda: time.monotonic() - t0 > 3.5, timeout=DEADLINE_S))
    assert server.connections == 1


def test_a_backfill_page_that_drips_is_given_up_and_retried(tmp_path, caplog):
    # The REST page after a reconnect: its body came a byte at a time, each resetting
    # the read timeout, and the connector waited on it for good (the stream it had
    # opened unread meanwhile).
    blocks, _, _ = recorded()
    s = mastodon_settings(tmp_path, idle_timeout_s=1.0, connect_timeout_s=1.0)
    state = open_state(s, "m")
    page_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n["
    with MastodonServer(MastodonScript(streams=[blocks], drop=False)) as stream, \
            DripServer(page_head, b" ", every_s=0.1) as instance, \
            caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, JsonlSink(io.StringIO()), state, instance=instance.url, timeline="public",
                                streaming_url=stream.url)
        state.commit(runner.emitter.stream, "113571100000000500")
        runner.emitter.advance("113571100000000500")
        asyncio.run(mastodon_run_until(runner, lambda: instance.connections >= 2, timeout=DEADLINE_S))
    assert instance.connections >= 2, "the dripping page was never given up"
    assert any("a REST answer did not come within 2s" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("status", [401, 404, 422])
def test_a_backfill_the_instance_refuses_skips_the_gap_and_keeps_streaming(tmp_path, caplog, status):
    # The stream took the connector (no token: the instance streams its public
    # timeline to anyone), but its REST timeline is closed to unauthenticated
    # callers (401; 422 on older versions) or does not know the tag (404). The
    # backfill's refusal was FatalStreamError: the first reconnect with a saved
    # cursor, hours into a run, ended the live stream too.
    blocks, updates, _ = recorded()
    s = mastodon_settings(tmp_path)
    state = open_state(s, "m")
    sink = JsonlSink(io.StringIO(), keep=True)
    script = MastodonScript(streams=[blocks], drop=False, timeline_answer=status)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, state, instance=server.url, timeline="public")
        state.commit(runner.emitter.stream, "113571100000000500")
        runner.emitter.advance("113571100000000500")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 7, timeout=DEADLINE_S))
    assert len(sink.events) == 7  # the stream, read after the refused backfill
    assert len(server.rest_requests) == 1
    refused = [r for r in caplog.records if r.getMessage().startswith(f"backfill refused (HTTP {status})")]
    assert len(refused) == 1 and refused[0].levelname == "ERROR"
    assert not any("bound reached" in r.getMessage() for r in caplog.records)


def test_a_stream_refused_429_with_retry_after_is_a_counted_and_logged_wait(tmp_path, caplog):
    # The wait was made, but neither counted in deepwatch_connector_rate_limit_waits_total
    # nor logged, as the REST calls' waits are: an operator saw a silent connector.
    from prometheus_client import REGISTRY

    blocks, _, _ = recorded()
    script = MastodonScript(streams=[blocks], drop=False, stream_answers={0: (429, {"Retry-After": "1"})})
    s = mastodon_settings(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    before = REGISTRY.get_sample_value("deepwatch_connector_rate_limit_waits_total", {"connector": "mastodon"}) or 0
    with MastodonServer(script) as server, caplog.at_level(logging.INFO, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 7, timeout=DEADLINE_S))
    assert len(sink.events) == 7 and len(server.stream_requests) == 2
    after = REGISTRY.get_sample_value("deepwatch_connector_rate_limit_waits_total", {"connector": "mastodon"}) or 0
    assert after - before == 1
    waits = [r for r in caplog.records if r.getMessage() == "rate limit: waiting"]
    assert len(waits) == 1 and waits[0].status == 429 and waits[0].wait_s == 1.0


def test_a_reader_slowed_by_its_broker_does_not_take_the_stream_for_stalled(tmp_path):
    # The other side of the drip rule: the time the connector itself spends on what it
    # read (a broker slow to take each event) is not the server's. Large statuses come
    # in several chunks; with the reader away longer than idle_timeout_s per event, the
    # next chunk, part of an event, must not count as a drip.
    class SlowSink(JsonlSink):
        def send(self, event):
            time.sleep(0.6)
            super().send(event)

    statuses = [_status(n) for n in range(4)]
    for st in statuses:
        st["content"] = "<p>" + "y" * 200_000 + "</p>"  # one event = several reads
    blocks = [f"event: update\ndata: {json.dumps(st)}\n\n" for st in statuses]
    s = mastodon_settings(tmp_path, idle_timeout_s=0.5)
    sink = SlowSink(io.StringIO(), keep=True)
    with MastodonServer(MastodonScript(streams=[blocks], drop=False)) as server:
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 4, timeout=DEADLINE_S))
    assert len(sink.events) == 4
    assert len(server.stream_requests) == 1


def test_a_stream_answered_with_a_redirect_is_said_not_retried_silently(tmp_path, caplog):
    # httpx follows no redirect (the token must go to no other host): a streaming
    # server that moved answered 301, and the connector reconnected for ever with
    # nothing above INFO in its log.
    blocks, _, _ = recorded()
    script = MastodonScript(streams=[blocks], drop=False,
                            stream_answers={0: (301, {"Location": "https://streaming.example/api/v1/streaming/public"})})
    s = mastodon_settings(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    with MastodonServer(script) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.mastodon"):
        runner = build_mastodon(s, sink, open_state(s, "m"), instance=server.url, timeline="public")
        asyncio.run(mastodon_run_until(runner, lambda: len(sink.events) >= 7, timeout=DEADLINE_S))
    said = [r.getMessage() for r in caplog.records if "answered HTTP 301" in r.getMessage()]
    assert len(said) == 1 and "https://streaming.example/api/v1/streaming/public" in said[0]
    assert "--streaming-url" in said[0]
