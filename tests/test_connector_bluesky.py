"""Bluesky connector against a loopback Jetstream replaying recorded frames."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import time
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from streams.connectors.base import ConnectorState, RememberedPost
from streams.connectors.bluesky import BlueskyMapper
from streams.connectors.run import build_bluesky, open_state
from streams.connectors.sinks import JsonlSink
from streams.records import ImageEvent
from streams.settings import Settings
from tests.connector_servers import JetstreamServer, jetstream_frames, jetstream_malformed, mapped_frames

CDN = "https://cdn.bsky.app/img/feed_fullsize/plain/{did}/{cid}@jpeg"
REPO = Path(__file__).resolve().parents[1]


def frames_by_kind():
    docs = [json.loads(f) for f in jetstream_frames()]
    posts = [d for d in docs if d["kind"] == "commit" and d["commit"]["collection"] == "app.bsky.feed.post"
             and d["commit"]["operation"] == "create"]
    return docs, posts


def expected_ids() -> list[str]:
    """Every image event the recorded frames must yield (worked out from the frames by hand)."""
    return [e.event_id for r in mapped_frames(CDN) for e in r.events]


def settings_for(tmp_path: Path, **connectors) -> Settings:
    s = Settings(data_dir=tmp_path / "data")
    s.connectors.cursor_overlap_s = 5.0
    s.connectors.backoff_initial_s = 0.05
    s.connectors.backoff_max_s = 0.2
    s.connectors.idle_timeout_s = 1.0
    s.connectors.checkpoint_interval_s = 0.05
    s.connectors.checkpoint_every = 3
    for k, v in connectors.items():
        setattr(s.connectors, k, v)
    return s


async def run_until(runner, predicate, timeout: float = 15.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate() and asyncio.get_running_loop().time() < deadline and not task.done():
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)


# --------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------
def test_recorded_frames_map_field_by_field():
    docs, posts = frames_by_kind()
    results = mapped_frames(CDN, images_only=False)
    outcomes = [r.outcome for r in results]
    assert outcomes == ["identity", "other", "image_post", "no_image", "no_image", "no_image", "image_post",
                        "repost", "repost", "unknown_subject", "quote", "image_post", "other", "delete",
                        "unknown_subject", "image_post"]
    assert all(r.cursor == d["time_us"] for r, d in zip(results, docs))

    first = results[2].events
    p1 = posts[0]
    did, rkey, rec = p1["did"], p1["commit"]["rkey"], p1["commit"]["record"]
    uri = f"at://{did}/app.bsky.feed.post/{rkey}"
    assert [e.event_id for e in first] == [f"{uri}#0", f"{uri}#1"]
    blobs = [i["image"]["ref"]["$link"] for i in rec["embed"]["images"]]
    assert [e.image.url for e in first] == [CDN.format(did=did, cid=c) for c in blobs]
    e = first[0]
    assert e.platform == "bluesky" and e.post_id == uri and e.account_id == did
    assert e.account_handle == "alice.bsky.social"  # learnt from the identity frame
    assert e.post_url == f"https://bsky.app/profile/{did}/post/{rkey}"
    assert e.text == rec["text"] and e.lang == "en" and e.hashtags == ["breaking", "NYC"]
    assert e.posted_at == datetime.fromisoformat(rec["createdAt"])

    # Reposts: the same image URLs, the reposter's account, their own ids.
    for r, d in zip(results[7:9], docs[7:9]):
        assert [x.image.url for x in r.events] == [x.image.url for x in first]
        assert {x.account_id for x in r.events} == {d["did"]}
        assert r.events[0].event_id.startswith(f"at://{d['did']}/app.bsky.feed.repost/")
        assert r.events[0].text == rec["text"]  # the original's words travel with the sighting
    # Quote of the Japanese post; recordWithMedia: own picture plus the quoted post's two.
    assert results[10].events[0].image.url == results[6].events[0].image.url
    assert results[10].events[0].event_id.endswith("#q0")
    assert len(results[11].events) == 3 and [x.image.url for x in results[11].events][1:] == [x.image.url for x in first]
    assert results[6].events[0].hashtags == ["地震"] and results[6].events[0].lang == "ja"
    # The deleted post is forgotten: its later repost is not a sighting.
    assert results[13].forget and results[14].events == []
    # Legacy blob form; unparseable createdAt falls back to the relay time.
    last = results[15].events[0]
    assert last.posted_at == datetime.fromtimestamp(docs[15]["time_us"] / 1e6, timezone.utc)
    assert all(isinstance(ev, ImageEvent) for r in results for ev in r.events)
    assert sum(len(r.events) for r in results) == 12


def test_hashtag_filter_keeps_matching_posts_and_their_reposts():
    st = ConnectorState(":memory:")
    m = BlueskyMapper(CDN, hashtags=["#Breaking"], recall=st.recall)
    events = []
    for f in jetstream_frames():
        r = m.map(f)
        if r.remember:
            st.remember(*r.remember)
        events += r.events
    # p1 (2) + its 2 reposts (4) + the recordWithMedia post tagged #breaking (3); the untagged quote of a
    # filtered-out post and untagged image posts are dropped.
    assert len(events) == 9
    assert all("breaking" in [h.lower() for h in e.hashtags] for e in events)


def test_every_malformed_frame_is_a_counted_malformed_frame():
    m = BlueskyMapper(CDN)
    from streams.connectors.base import MalformedFrame

    reasons = []
    for f in jetstream_malformed():
        with pytest.raises(MalformedFrame) as ei:
            m.map(f)
        reasons.append(ei.value.reason)
    assert reasons == ["malformed_json", "malformed_json", "bad_frame", "bad_frame", "bad_record", "bad_frame"]


# --------------------------------------------------------------------------
# Against the loopback Jetstream
# --------------------------------------------------------------------------
def test_streams_events_skips_malformed_frames_with_a_log_line(tmp_path, caplog):
    frames = jetstream_frames()
    bad = jetstream_malformed()
    mixed = frames[:4] + bad[:3] + frames[4:10] + bad[3:] + frames[10:]
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "t")
    runner = build_bluesky(s, sink, state)
    with JetstreamServer(mixed) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.bluesky"):
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: runner.emitter.counts.get("image_post", 0) >= 4
                              and runner.emitter.cursor == str(json.loads(frames[-1])["time_us"])))
    assert [e.event_id for e in sink.events] == expected_ids()
    assert runner.emitter.counts["malformed"] == len(bad)
    assert sum("malformed frame skipped" in r.getMessage() for r in caplog.records) == len(bad)
    # the client asked Jetstream for posts and reposts only
    assert set(server.requests[0]["wantedCollections"]) == {"app.bsky.feed.post", "app.bsky.feed.repost"}
    # every line printed is a valid schema-v1 event
    lines = sink.out.getvalue().splitlines()
    assert [ImageEvent.model_validate_json(ln).event_id for ln in lines] == expected_ids()


def test_reconnect_mid_stream_resumes_from_cursor_without_gap_or_duplicate(tmp_path):
    frames = jetstream_frames()
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "t")
    runner = build_bluesky(s, sink, state)
    want = expected_ids()
    with JetstreamServer(frames, drop_after={0: 9}) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.events) >= len(want)))
    ids = [e.event_id for e in sink.events]
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids))
    assert len(server.requests) >= 2
    # resumed from the last frame read before the drop, minus the overlap
    ninth = json.loads(frames[8])["time_us"]
    assert int(server.requests[1]["cursor"][0]) == ninth - 5_000_000
    assert runner.emitter.counts["events_duplicate"] > 0  # the overlap was re-read and dropped


def test_restart_resumes_from_the_saved_cursor(tmp_path):
    frames = jetstream_frames()
    want = expected_ids()
    s = settings_for(tmp_path)
    first = JsonlSink(io.StringIO(), keep=True)
    # first process: the server has only the first half of the frames so far
    state = open_state(s, "bluesky")
    runner = build_bluesky(s, first, state)
    with JetstreamServer(frames[:9]) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: runner.emitter.cursor == str(json.loads(frames[8])["time_us"])))
    state.close()
    saved = open_state(s, "bluesky").cursor("bluesky")
    assert saved == str(json.loads(frames[8])["time_us"])
    # second process, same data dir: the whole stream is there now
    second = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "bluesky")
    runner = build_bluesky(s, second, state)
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(first.events) + len(second.events) >= len(want)))
    assert int(server.requests[0]["cursor"][0]) == int(saved) - 5_000_000
    ids = [e.event_id for e in first.events + second.events]
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids))


def test_silent_server_is_detected_and_left(tmp_path):
    frames = jetstream_frames()
    s = settings_for(tmp_path, idle_timeout_s=0.5)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    want = expected_ids()
    with JetstreamServer(frames, hang_after={0: 5}) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.events) >= len(want)))
    assert sorted(e.event_id for e in sink.events) == sorted(want)
    assert len(server.requests) == 2 and server.sent[0] == 5


def test_dead_servers_back_off_and_never_crash(tmp_path):
    s = settings_for(tmp_path, connect_timeout_s=0.3)
    sink = JsonlSink(io.StringIO(), keep=True)
    # one port with nothing listening, one that accepts TCP but never answers the handshake
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    try:
        for port in (dead_port, mute.getsockname()[1]):
            runner = build_bluesky(s, sink, open_state(s, f"t{port}"))
            runner.url = f"ws://127.0.0.1:{port}/subscribe"

            async def go():
                stop = asyncio.Event()
                task = asyncio.create_task(runner.run(stop))
                await asyncio.sleep(1.5)
                stop.set()
                await asyncio.wait_for(task, 5)

            asyncio.run(go())
            assert runner.connects >= 2  # it kept trying, with waits in between
            assert runner.connects < 40  # ...but did not spin
    finally:
        mute.close()
    assert sink.events == []


@pytest.mark.parametrize("image_url, reason", [
    ("http://127.0.0.1:9/img/{did}/{cid}", "blocked_address"),
    # urlsplit raises ValueError for "http://[..." outside the URL policy's
    # guard: the first such post ended the connector's run.
    ("http://[::1/img/{did}/{cid}", "bad_url"),
])
def test_refused_image_urls_are_dead_lettered_not_produced(tmp_path, image_url, reason):
    s = settings_for(tmp_path, bluesky_image_url=image_url)
    assert not s.fetch.allow_private_networks
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    with JetstreamServer(jetstream_frames()) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.dead) >= 12))
    assert sink.events == []
    assert len(sink.dead) == 12 and {(d.stage, d.reason) for d in sink.dead} == {("fetch", reason)}
    assert all(d.event_id for d in sink.dead)


def test_zstd_compressed_frames(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    frames = jetstream_frames()
    # Jetstream's own dictionary is not bundled; a dictionary trained on
    # recorded frames exercises the same decoder path.
    samples = [f.replace("3l", f"3{i % 7}").encode() for i in range(60) for f in frames]
    dictionary = zstandard.train_dictionary(4096, samples).as_bytes()
    dict_path = tmp_path / "zstd_dictionary"
    dict_path.write_bytes(dictionary)
    s = settings_for(tmp_path, zstd_dictionary=dict_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    with JetstreamServer(frames, zstd_dict=dictionary) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.events) >= 12))
    assert server.requests[0]["compress"] == ["true"]
    assert [e.event_id for e in sink.events] == expected_ids()


def test_cli_dry_run_prints_mapped_events(tmp_path):
    with JetstreamServer(jetstream_frames()) as server:
        r = subprocess.run(
            [sys.executable, "-m", "streams.cli.__main__", "connect", "bluesky", "--dry-run",
             "--jetstream-url", server.url, "--duration", "4", "--data-dir", str(tmp_path / "d")],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_FETCH__ALLOW_PRIVATE_NETWORKS": "false"},
        )
    assert r.returncode == 0, r.stderr[-2000:]
    ids = [ImageEvent.model_validate_json(ln).event_id for ln in r.stdout.splitlines()]
    assert ids == expected_ids()
    assert not (tmp_path / "d" / "connectors").exists()  # a dry run leaves no cursor behind


def test_cli_without_broker_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "connect", "bluesky", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_BROKER": "embedded"})
    assert r.returncode == 2
    assert "--broker kafka://HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_cli_metrics_port_out_of_range_is_one_clear_line(tmp_path):
    # --metrics-port had no bounds: 99999 ended in an OverflowError traceback.
    for bad in ("99999", "-1"):
        r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "connect", "bluesky", "--dry-run",
                            "--duration", "1", "--metrics-port", bad, "--data-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=60, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 2 and "--metrics-port" in r.stderr and "Traceback" not in r.stderr, r.stderr


class LossyBroker:
    """A sink that loses its unacknowledged batch when a flush fails (as a
    broker outage can): what counts is what was acknowledged."""

    def __init__(self, fail_flushes: set[int]):
        self.fail_flushes = fail_flushes
        self.flushes = 0
        self.buffer: list[ImageEvent] = []
        self.acked: list[ImageEvent] = []

    def send(self, event):
        self.buffer.append(event)

    def dead_letter(self, dl):
        raise AssertionError(f"unexpected dead letter {dl}")

    def flush(self):
        self.flushes += 1
        batch, self.buffer = self.buffer, []
        if self.flushes in self.fail_flushes:
            raise TimeoutError("broker did not acknowledge in time")
        self.acked += batch

    def close(self):
        pass


def test_broker_failure_rolls_back_to_the_checkpoint_and_loses_nothing(tmp_path, caplog):
    frames = jetstream_frames()
    want = expected_ids()
    s = settings_for(tmp_path, checkpoint_every=2)
    sink = LossyBroker(fail_flushes={2, 3})
    runner = build_bluesky(s, sink, open_state(s, "t"))
    with JetstreamServer(frames) as server, caplog.at_level(logging.WARNING, "deepwatch.connectors.bluesky"):
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.acked) >= len(want)))
    ids = [e.event_id for e in sink.acked]
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids))
    assert len(server.requests) >= 3  # each failure ended the session; each resume re-read from the checkpoint
    assert any("broker did not acknowledge" in r.getMessage() for r in caplog.records)


def test_cli_produces_to_the_broker_with_metrics_and_a_saved_cursor(tmp_path):
    import httpx

    from streams.broker import EmbeddedBroker, free_port
    from tests.connector_servers import read_topic

    frames = jetstream_frames()
    port = free_port()
    with EmbeddedBroker(tmp_path / "broker") as broker, JetstreamServer(frames) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli.__main__", "connect", "bluesky", "--jetstream-url", server.url,
             "--broker", f"kafka://{broker.bootstrap}", "--data-dir", str(tmp_path / "d"), "--duration", "120",
             "--metrics-port", str(port)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        try:
            produced = 'deepwatch_connector_events_total{connector="bluesky",outcome="produced"} 12.0'
            text = ""
            # the test stops it (SIGTERM); --duration only bounds a run the test lost: on a loaded
            # machine 20 s ended it before its metrics were read once
            deadline = time.monotonic() + 90
            while produced not in text and time.monotonic() < deadline and proc.poll() is None:
                try:
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            assert produced in text, f"exit {proc.poll()}; metrics: {text[-500:]!r}"
            assert 'deepwatch_connector_frames_total{connector="bluesky",outcome="repost",stream="bluesky"} 2.0' in text
        finally:
            proc.send_signal(signal.SIGTERM)
            out, errors = proc.communicate(timeout=30)
        assert proc.returncode == 0, errors[-2000:]
        events = [ImageEvent.loads(v) for v in read_topic(broker.bootstrap, "deepwatch.events", 12)]
        assert sorted(e.event_id for e in events) == sorted(expected_ids())
    saved = ConnectorState(tmp_path / "d" / "connectors" / "bluesky.sqlite").cursor("bluesky")
    assert saved == str(json.loads(frames[-1])["time_us"])  # SIGTERM saved the cursor
    assert out == ""  # produced, not printed


# --------------------------------------------------------------------------
# Odd but legal frames, and what a days-long run meets
# --------------------------------------------------------------------------
def _image_post(rkey: str, record: dict, *, did: str = "did:plc:5xrilav5fvcyk43kkpdhieyg",
                time_us: int = 1732960900000000) -> str:
    blob = {"$type": "blob", "ref": {"$link": "bafkreiaaaa"}, "mimeType": "image/jpeg", "size": 1}
    record = {"$type": "app.bsky.feed.post", "text": "x", "createdAt": "2024-11-30T10:00:00Z",
              "embed": {"$type": "app.bsky.embed.images", "images": [{"alt": "", "image": blob}]}, **record}
    return json.dumps({"did": did, "time_us": time_us, "kind": "commit", "commit": {
        "rev": "r", "operation": "create", "collection": "app.bsky.feed.post", "rkey": rkey, "record": record}})


def test_posts_with_more_or_longer_tags_than_the_schema_holds_still_map():
    m = BlueskyMapper(CDN)
    facets = [{"features": [{"$type": "app.bsky.richtext.facet#tag", "tag": f"t{i}"}]} for i in range(100)]
    many = m.map(_image_post("a", {"facets": facets}))
    assert many.outcome == "image_post" and len(many.events) == 1
    assert many.events[0].hashtags == [f"t{i}" for i in range(64)]
    long = m.map(_image_post("b", {"tags": ["y" * 600, "news"]}))
    assert long.outcome == "image_post" and long.events[0].hashtags == ["news"]


def test_time_us_beyond_datetime_is_a_malformed_frame_not_a_crash():
    from streams.connectors.base import MalformedFrame

    m = BlueskyMapper(CDN)
    with pytest.raises(MalformedFrame) as ei:
        m.map(_image_post("a", {"createdAt": None}, time_us=10**19))
    assert ei.value.reason == "bad_frame"


@pytest.mark.parametrize("created", ["0001-01-01T00:00:00+14:00", "2024-11-30T10:00:00-23:59"])
def test_a_created_at_no_utc_time_can_hold_falls_back_to_the_relay_time(created):
    # the event schema refuses these (offset beyond +-14:00, before year 1 in UTC);
    # createdAt is the client's, so the post maps with the relay's time instead
    r = BlueskyMapper(CDN).map(_image_post("a", {"createdAt": created}, time_us=1732960900000000))
    assert r.outcome == "image_post"
    assert r.events[0].posted_at == datetime.fromtimestamp(1732960900, timezone.utc)


def test_an_overlong_handle_does_not_drop_that_accounts_posts():
    did = "did:plc:5xrilav5fvcyk43kkpdhieyg"
    m = BlueskyMapper(CDN)
    m.map(json.dumps({"did": did, "time_us": 1, "kind": "identity", "identity": {"did": did, "handle": "h" * 300}}))
    r = m.map(_image_post("a", {}, did=did))
    assert r.outcome == "image_post" and len(r.events) == 1 and r.events[0].account_handle is None


def test_jetstream_url_scheme_is_checked_before_connecting(tmp_path):
    from streams.connectors.bluesky import websocket_url

    assert websocket_url("https://jetstream.example/subscribe") == "wss://jetstream.example/subscribe"
    assert websocket_url("ws://127.0.0.1:6008/subscribe") == "ws://127.0.0.1:6008/subscribe"
    for bad in ("notaurl", "ftp://x/subscribe", "wss://"):
        with pytest.raises(ValueError, match="ws:// or wss://"):
            websocket_url(bad)
    s = settings_for(tmp_path)
    runner = build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, "t"), url="http://127.0.0.1:9/subscribe")
    assert runner.url == "ws://127.0.0.1:9/subscribe"


def _with_oversized_frame(frames: list[str]) -> list[str]:
    big = json.loads(frames[3])
    big["commit"]["record"]["text"] = "x" * 300_000
    return frames[:4] + [json.dumps(big)] + frames[4:]


def test_oversized_frame_is_left_out_by_jetstream_and_does_not_stall_the_stream(tmp_path):
    frames = _with_oversized_frame(jetstream_frames())
    s = settings_for(tmp_path, max_frame_bytes=100_000)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.events) >= 12, timeout=8))
    assert server.requests[0]["maxMessageSizeBytes"] == ["100000"]
    assert [e.event_id for e in sink.events] == expected_ids()
    assert len(server.requests) == 1


def test_oversized_frame_from_a_server_ignoring_the_limit_backs_off_instead_of_storming(tmp_path, caplog):
    # The resume overlap re-delivers frames before the oversized one on every
    # connection; they must not count as a healthy server resetting the backoff.
    frames = _with_oversized_frame(jetstream_frames())
    s = settings_for(tmp_path, max_frame_bytes=100_000, backoff_initial_s=0.05, backoff_max_s=30.0)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t"))
    with JetstreamServer(frames, honour_max_size=False) as server, \
            caplog.at_level(logging.ERROR, "deepwatch.connectors.bluesky"):
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: False, timeout=3))
    assert 2 <= runner.connects <= 8  # 0.05, 0.1, 0.2, ... s apart; without growth it was dozens
    assert any("larger than connectors.max_frame_bytes" in r.getMessage() for r in caplog.records)


class ClosedStdout:
    """stdout after ``| head`` has exited."""

    def write(self, _text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_dry_run_into_a_closed_pipe_stops_instead_of_reconnecting_forever(tmp_path):
    s = settings_for(tmp_path)
    runner = build_bluesky(s, JsonlSink(ClosedStdout()), open_state(s, "t", memory=True))
    with JetstreamServer(jetstream_frames()) as server:
        runner.url = server.url

        async def go():
            stop = asyncio.Event()
            await asyncio.wait_for(runner.run(stop), 5)  # ends by itself, without stop being set
            return stop

        stop = asyncio.run(go())
    assert not stop.is_set() and len(server.requests) == 1


def test_a_created_at_later_than_the_relay_allows_gives_way_to_the_relay_time(tmp_path):
    # createdAt is the poster's client's: one in 2099 was trusted, and the
    # pipeline then dead-lettered the sighting (future_posted_at) although
    # the relay's time_us said when the post really arrived.
    relay = datetime.fromtimestamp(1732960900, timezone.utc)
    m = BlueskyMapper(CDN)  # ingest.max_future_skew_s's default: 900 s
    assert m.max_future_skew_s == 900.0

    def posted(created: str, mapper: BlueskyMapper = m) -> datetime:
        r = mapper.map(_image_post("a", {"createdAt": created}, time_us=1732960900000000))
        assert r.outcome == "image_post" and len(r.events) == 1
        return r.events[0].posted_at

    assert posted("2099-01-01T00:00:00Z") == relay
    assert relay == datetime(2024, 11, 30, 10, 1, 40, tzinfo=timezone.utc)
    assert posted("2024-11-30T10:18:20Z") == relay  # 1000 s after the relay's time
    assert posted("2024-11-30T10:11:40Z") == datetime(2024, 11, 30, 10, 11, 40, tzinfo=timezone.utc)  # 600 s: kept
    assert posted("2024-11-30T09:30:00Z") == datetime(2024, 11, 30, 9, 30, tzinfo=timezone.utc)  # earlier: kept
    assert posted("2024-11-30T10:18:20Z", BlueskyMapper(CDN, max_future_skew_s=3600)) == \
        datetime(2024, 11, 30, 10, 18, 20, tzinfo=timezone.utc)
    # a repost's createdAt is its client's too
    st = ConnectorState(":memory:")
    mapper = BlueskyMapper(CDN, recall=st.recall)
    st.remember(*mapper.map(_image_post("a", {}, time_us=1732960900000000)).remember)
    repost = json.dumps({"did": "did:plc:other", "time_us": 1732960900000000, "kind": "commit", "commit": {
        "operation": "create", "collection": "app.bsky.feed.repost", "rkey": "rp", "record": {
            "subject": {"uri": "at://did:plc:5xrilav5fvcyk43kkpdhieyg/app.bsky.feed.post/a"},
            "createdAt": "2099-01-01T00:00:00Z"}}})
    r = mapper.map(repost)
    assert r.outcome == "repost" and [e.posted_at for e in r.events] == [relay]
    # the connector gets the pipeline's own setting
    s = settings_for(tmp_path)
    s.ingest.max_future_skew_s = 60.0
    assert build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, "t")).mapper.max_future_skew_s == 60.0


def test_fields_the_mapper_does_not_read_cannot_make_a_post_malformed():
    # alt, mimeType, rev and the cids were typed though never read: "alt": 5
    # made the whole post (and its pictures) a bad_record.
    quoted = "at://did:plc:q/app.bsky.feed.post/q1"
    st = ConnectorState(":memory:")
    st.remember(quoted, RememberedPost(post_url=None, text="q", lang=None, hashtags=[],
                                       images=["https://cdn.example/q.jpg"]))
    m = BlueskyMapper(CDN, recall=st.recall)
    doc = json.loads(_image_post("a", {}))
    img = doc["commit"]["record"]["embed"]["images"][0]
    img["alt"], img["image"]["mimeType"] = 5, ["image/jpeg"]
    doc["commit"]["rev"], doc["commit"]["cid"] = 7, {"x": 1}
    r = m.map(json.dumps(doc))
    assert r.outcome == "image_post"
    assert [e.image.url for e in r.events] == [CDN.format(did=doc["did"], cid="bafkreiaaaa")]
    quote = json.loads(_image_post("b", {"embed": {"$type": "app.bsky.embed.record",
                                                   "record": {"uri": quoted, "cid": 3}}}))
    r = m.map(json.dumps(quote))
    assert r.outcome == "quote" and [e.image.url for e in r.events] == ["https://cdn.example/q.jpg"]


def test_validation_errors_read_loc_colon_msg():
    from streams.connectors.base import MalformedFrame

    m = BlueskyMapper(CDN)
    with pytest.raises(MalformedFrame) as ei:
        m.map(_image_post("a", {"text": 5}))
    assert ei.value.reason == "bad_record"
    assert ei.value.detail == ("at://did:plc:5xrilav5fvcyk43kkpdhieyg/app.bsky.feed.post/a: text: "
                               "Input should be a valid string")
    with pytest.raises(MalformedFrame) as ei:
        m.map('{"did": "d", "kind": "commit"}')
    assert (ei.value.reason, ei.value.detail) == ("bad_frame", "time_us: Field required")
    with pytest.raises(MalformedFrame) as ei:
        m.map("[]")
    assert ei.value.reason == "bad_frame" and ei.value.detail.startswith("(frame): ")


def test_backoff_survives_any_number_of_failed_reconnects():
    # 2 ** attempt overflowed a float at attempt 1024 (~12.8 h of outage at a
    # 60 s cap): OverflowError ended the connector's run.
    import random

    from streams.connectors.base import Backoff

    b = Backoff(1.0, 60.0, rng=random.Random(7))
    waits = [b.next() for _ in range(3000)]
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0
    assert all(30.0 <= w <= 60.0 for w in waits[6:])
    b.reset()
    assert b.attempt == 0 and b.next() <= 1.0


def _zstd_runner(tmp_path, max_frame_bytes: int = 100_000):
    zstandard = pytest.importorskip("zstandard")
    samples = [f.replace("3l", f"3{i % 7}").encode() for i in range(60) for f in jetstream_frames()]
    dictionary = zstandard.train_dictionary(4096, samples).as_bytes()
    (tmp_path / "dict").write_bytes(dictionary)
    s = settings_for(tmp_path, zstd_dictionary=tmp_path / "dict", max_frame_bytes=max_frame_bytes)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "t", memory=True))
    return runner, sink, zstandard.ZstdCompressionDict(dictionary), zstandard


def test_a_zstd_frame_declaring_more_than_the_cap_is_refused_unread(tmp_path, caplog):
    # max_output_size bounds only frames that do not declare their size: a
    # 13 KB frame declaring 400 MB took 400 MB, one declaring 2**45 raised
    # MemoryError and ended the run.
    import struct

    runner, sink, zdict, zstandard = _zstd_runner(tmp_path)
    post = _image_post("a", {})
    padded = (post + " " * 3_000_000).encode()  # valid JSON, 3 MB once inflated
    declared = zstandard.ZstdCompressor(dict_data=zdict).compress(padded)
    undeclared = zstandard.ZstdCompressor(dict_data=zdict, write_content_size=False).compress(padded)
    assert len(declared) < 100_000 and zstandard.frame_content_size(declared) == len(padded)
    huge = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", 1 << 45) + bytes([9, 0, 0]) + b"x"
    good = zstandard.ZstdCompressor(dict_data=zdict).compress(post.encode())

    async def go():
        for msg in (declared, huge, undeclared, good[:-4], good):
            await runner.handle(msg)
        await runner.emitter.checkpoint()  # produced counts once the broker confirmed it

    with caplog.at_level(logging.WARNING, "deepwatch.connectors.bluesky"):
        asyncio.run(go())
    skipped = [r for r in caplog.records if r.getMessage() == "malformed frame skipped"]
    assert [r.reason for r in skipped] == ["frame_too_big", "frame_too_big", "frame_too_big", "bad_compression"]
    assert skipped[0].detail == (f"zstd frame declares {len(padded)} bytes, over connectors.max_frame_bytes "
                                 f"(100000)")
    assert skipped[1].detail.startswith(f"zstd frame declares {1 << 45} bytes")
    assert runner.emitter.counts == {"malformed": 4, "image_post": 1, "events_produced": 1}
    assert [e.event_id for e in sink.events] == ["at://did:plc:5xrilav5fvcyk43kkpdhieyg/app.bsky.feed.post/a#0"]
