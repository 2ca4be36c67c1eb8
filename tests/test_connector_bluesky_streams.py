"""Bluesky connector: post edits (Jetstream ``update`` commits), the stream
key of a run's ``--collections``, and other things a long run meets, each
against the loopback Jetstream (tests/connector_servers.py) over a real
websocket, with the real SQLite connector state."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from streams.connectors.base import RememberedPost
from streams.connectors.run import bluesky_stream_key, build_bluesky, open_state, state_path
from streams.connectors.sinks import JsonlSink
from tests.connector_servers import JetstreamServer
from tests.test_connector_bluesky import run_until, settings_for

CDN = "https://cdn.bsky.app/img/feed_fullsize/plain/{did}/{cid}@jpeg"
DID = "did:plc:5xrilav5fvcyk43kkpdhieyg"
OTHER = "did:plc:sno2frnzrvcma2dy7ibp3hah"
T0 = 1732960800_000000  # 2024-11-30T10:00:00Z in Jetstream's unix microseconds
A, B, C = ("bafkreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
           "bafkreibbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
           "bafkreicccccccccccccccccccccccccccccccccccccccccccccccccccc")


def _mapped(tmp_path, frames: list, events: int):
    """(sink, runner) of a default Bluesky run over ``frames``, once ``events`` events are out."""
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "bluesky"))
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.events) >= events))
    return sink, runner


def post(rkey: str, cids: list[str], *, op: str = "create", text: str = "flooding #breaking", did: str = DID,
         time_us: int = T0, created: str = "2024-11-30T10:00:00.000Z", embed: dict | None = None) -> str:
    """A Jetstream commit frame of an app.bsky.feed.post, as the relay sends
    it: an update carries the whole new record, not a diff."""
    images = [{"alt": "", "image": {"$type": "blob", "ref": {"$link": c}, "mimeType": "image/jpeg", "size": 1}}
              for c in cids]
    record = {"$type": "app.bsky.feed.post", "text": text, "langs": ["en"], "createdAt": created,
              "embed": embed or {"$type": "app.bsky.embed.images", "images": images}}
    return json.dumps({"did": did, "time_us": time_us, "kind": "commit", "commit": {
        "rev": f"r{time_us}", "operation": op, "collection": "app.bsky.feed.post", "rkey": rkey, "record": record,
        "cid": f"bafyrei{time_us}"}})


def repost(rkey: str, subject_rkey: str, *, did: str = OTHER, time_us: int) -> str:
    return json.dumps({"did": did, "time_us": time_us, "kind": "commit", "commit": {
        "rev": f"r{time_us}", "operation": "create", "collection": "app.bsky.feed.repost", "rkey": rkey,
        "record": {"$type": "app.bsky.feed.repost", "createdAt": "2024-11-30T10:05:00.000Z",
                   "subject": {"uri": f"at://{DID}/app.bsky.feed.post/{subject_rkey}", "cid": "bafyreix"}},
        "cid": f"bafyrei{time_us}"}})


def url(cid: str, did: str = DID) -> str:
    return CDN.format(did=did, cid=cid)


URI = f"at://{DID}/app.bsky.feed.post/p1"


# --------------------------------------------------------------------------
# Edits: Jetstream `update` commits of a post
# --------------------------------------------------------------------------
def edited_stream() -> list[str]:
    return [
        post("p1", [A, B], time_us=T0),
        # the same pictures, the words edited: nothing new to look at
        post("p1", [A, B], op="update", text="flooding at Canal St #breaking", time_us=T0 + 1_000_000),
        # the second picture swapped for another one
        post("p1", [A, C], op="update", text="flooding at Canal St #breaking", time_us=T0 + 2_000_000),
        repost("rp1", "p1", time_us=T0 + 3_000_000),
    ]


def test_an_edit_that_swaps_a_picture_emits_the_new_picture_once(tmp_path):
    # The swapped-in picture at index 1 got event id {uri}#1, already produced
    # for the picture it replaced: dropped as a duplicate, never analysed.
    frames = edited_stream()
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "bluesky"))
    last = str(json.loads(frames[-1])["time_us"])
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: runner.emitter.cursor == last and not runner.emitter.unsaved))
    got = [(e.event_id, e.image.url) for e in sink.events]
    new = [(i, u) for i, u in got if u == url(C) and i.startswith(URI)]
    assert len(new) == 1, got
    new_id = new[0][0]
    assert new_id not in (f"{URI}#0", f"{URI}#1")
    assert got[:2] == [(f"{URI}#0", url(A)), (f"{URI}#1", url(B))]
    # the text-only edit emitted nothing; the repost after the swap shows what the post shows now
    rp = f"at://{OTHER}/app.bsky.feed.repost/rp1"
    assert got[2:] == [(new_id, url(C)), (f"{rp}#0", url(A)), (f"{rp}#1", url(C))]
    added = next(e for e in sink.events if e.event_id == new_id)
    # the picture was there from the edit on, not from when the post was first made
    assert added.posted_at == datetime.fromtimestamp((T0 + 2_000_000) / 1e6, timezone.utc)
    assert added.text == "flooding at Canal St #breaking" and added.post_id == URI
    assert added.post_url == f"https://bsky.app/profile/{DID}/post/p1"
    assert runner.emitter.counts.get("events_duplicate", 0) == 0


def test_replaying_edits_after_a_restart_or_a_drop_repeats_nothing(tmp_path):
    frames = edited_stream()
    s = settings_for(tmp_path)
    first = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "bluesky")
    runner = build_bluesky(s, first, state)
    last = str(json.loads(frames[-1])["time_us"])
    # dropped after the swap, then after the text edit on the reconnect: every
    # resume re-reads the whole stream (it lies within the 5 s overlap)
    with JetstreamServer(frames, drop_after={0: 3, 1: 2}) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: runner.emitter.cursor == last and not runner.emitter.unsaved))
    assert len(server.requests) >= 3
    state.close()
    ids = [e.event_id for e in first.events]
    assert len(ids) == 5 and len(set(ids)) == 5
    # a second process on the same data dir re-reads the overlap: all of it known
    second = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "bluesky")
    runner = build_bluesky(s, second, state)
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: runner.emitter.counts.get("repost", 0) >= 1))
    state.close()
    assert int(server.requests[0]["cursor"][0]) == int(last) - 5_000_000
    assert second.events == [] and runner.emitter.counts["events_duplicate"] > 0


def test_an_edit_that_takes_the_pictures_out_stops_later_reposts_and_an_unknown_post_maps_as_made(tmp_path):
    frames = [post("p1", [A], time_us=T0),
              post("p1", [], op="update", embed={"$type": "app.bsky.embed.external", "external": {
                  "uri": "https://example.com", "title": "", "description": ""}}, time_us=T0 + 1_000_000),
              repost("rp1", "p1", time_us=T0 + 2_000_000),
              # an edit of a post from before the connector started: its pictures as a create gives them
              post("p0", [B], op="update", time_us=T0 + 3_000_000)]
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, sink, open_state(s, "bluesky"))
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(sink.events) >= 2 and runner.emitter.counts.get("edit", 0) >= 1))
    assert [(e.event_id, e.image.url) for e in sink.events] == [
        (f"{URI}#0", url(A)), (f"at://{DID}/app.bsky.feed.post/p0#0", url(B))]
    assert sink.events[1].posted_at == datetime(2024, 11, 30, 10, 0, tzinfo=timezone.utc)  # its createdAt
    assert runner.emitter.counts["unknown_subject"] == 1  # the repost of a post that no longer shows a picture


# --------------------------------------------------------------------------
# One stream (cursor, seen ids, remembered posts) per set of collections
# --------------------------------------------------------------------------
def two_collections_stream() -> list[str]:
    # further apart than the 5 s resume overlap, so a cursor borrowed from
    # another run's stream really skips
    return [post("p1", [A], time_us=T0), post("p2", [B], time_us=T0 + 10_000_000),
            repost("rp1", "p1", time_us=T0 + 20_000_000)]


def test_runs_with_different_collections_keep_their_own_cursor(tmp_path):
    # As `deepwatch connect bluesky` opens a run's state: a reposts-only run
    # saved its cursor (the repost's time) under the same key as a default
    # run, which then resumed there and never read the two posts before it.
    frames = two_collections_stream()
    s = settings_for(tmp_path)
    reposts = ["app.bsky.feed.repost"]
    state = open_state(s, bluesky_stream_key(reposts, []))
    first = JsonlSink(io.StringIO(), keep=True)
    runner = build_bluesky(s, first, state, collections=reposts)
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: runner.emitter.counts.get("unknown_subject", 0) >= 1
                              and not runner.emitter.unsaved))
    state.close()
    assert server.requests[0]["wantedCollections"] == reposts
    assert first.events == []  # the reposted post was never read by this run

    second = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, bluesky_stream_key([], []))
    runner = build_bluesky(s, second, state, collections=None)
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: len(second.events) >= 3))
    state.close()
    assert "cursor" not in server.requests[0]  # nothing saved for this run's collections yet
    assert [e.event_id for e in second.events] == [
        f"{URI}#0", f"at://{DID}/app.bsky.feed.post/p2#0", f"at://{OTHER}/app.bsky.feed.repost/rp1#0"]


def test_the_default_collections_keep_the_key_existing_deployments_saved_under(tmp_path):
    s = settings_for(tmp_path)
    # what a deployment without --collections saved before the key knew collections
    saved = str(T0 + 10_000_000)
    state = open_state(s, "bluesky")
    state.commit("bluesky", saved)
    state.close()
    assert state_path(s, "bluesky").name == "bluesky.sqlite"
    for given in ([], ["app.bsky.feed.repost", "app.bsky.feed.post"], ["app.bsky.feed.post", "app.bsky.feed.repost",
                                                                       " app.bsky.feed.post"]):
        assert bluesky_stream_key(given, []) == "bluesky"
    assert bluesky_stream_key([], ["#NYC", "breaking"]) == "bluesky-breaking-nyc"
    # order and repeats do not make another stream; another set of collections does
    assert bluesky_stream_key(["app.bsky.feed.post", "app.bsky.feed.post"], []) == \
        bluesky_stream_key([" app.bsky.feed.post"], [])
    keys = {bluesky_stream_key(c, h) for c in ([], ["app.bsky.feed.post"], ["app.bsky.feed.repost"])
            for h in ([], ["nyc"])}
    assert len(keys) == 6
    # a long list stays a usable file name, and still its own stream
    many = [f"com.example.app{i}.record" for i in range(100)]
    assert len(state_path(s, bluesky_stream_key(many, [])).name) < 100
    assert bluesky_stream_key(many, []) != bluesky_stream_key(many[:-1], [])
    # the reordered defaults resume where the deployment was
    state = open_state(s, bluesky_stream_key(["app.bsky.feed.repost", "app.bsky.feed.post"], []))
    runner = build_bluesky(s, JsonlSink(io.StringIO(), keep=True), state,
                           collections=["app.bsky.feed.repost", "app.bsky.feed.post"])
    with JetstreamServer(two_collections_stream()) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: runner.emitter.counts.get("unknown_subject", 0) >= 1))
    state.close()
    assert int(server.requests[0]["cursor"][0]) == int(saved) - 5_000_000


# --------------------------------------------------------------------------
# Who posted: handles from identity frames
# --------------------------------------------------------------------------
def identity(handle: str | None, *, time_us: int, did: str = DID) -> str:
    ident = {"did": did, "seq": time_us, "time": "2024-11-30T10:00:00.000Z"}
    if handle is not None:
        ident["handle"] = handle
    return json.dumps({"did": did, "time_us": time_us, "kind": "identity", "identity": ident})


def test_a_handle_that_no_longer_verifies_is_not_attributed_to_later_posts(tmp_path):
    # An identity event carries "handle.invalid" when the account's handle
    # fails verification (atproto's subscribeRepos#identity), or no handle at
    # all: the old handle went on naming the account's posts, or
    # "handle.invalid" did, as if it were the author's name.
    frames = [identity("alice.bsky.social", time_us=T0), post("p1", [A], time_us=T0 + 1),
              identity("handle.invalid", time_us=T0 + 2), post("p2", [B], time_us=T0 + 3),
              identity("alice.example.com", time_us=T0 + 4), post("p3", [C], time_us=T0 + 5),
              identity(None, time_us=T0 + 6), post("p4", [A], time_us=T0 + 7)]
    sink, runner = _mapped(tmp_path, frames, 4)
    assert [(e.post_id.rsplit("/", 1)[1], e.account_handle) for e in sink.events] == [
        ("p1", "alice.bsky.social"), ("p2", None), ("p3", "alice.example.com"), ("p4", None)]
    assert runner.emitter.counts["identity"] == 4


REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", "connect", "bluesky", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})


def ended_streams(stderr: str) -> list[str]:
    """The streams the closing report names (its records in the default JSON log)."""
    out = []
    for line in stderr.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("msg") == "connector stream ended":
            out.append(rec["stream"])
    return out


def test_cli_runs_each_set_of_collections_as_its_own_stream(tmp_path):
    frames = two_collections_stream()
    with JetstreamServer(frames) as server:
        r = cli("--dry-run", "--jetstream-url", server.url, "--duration", "3", "--data-dir", str(tmp_path),
                "--collections", "app.bsky.feed.post")
    assert r.returncode == 0, r.stderr[-2000:]
    assert server.requests[0]["wantedCollections"] == ["app.bsky.feed.post"]
    # the closing report names the stream: the one this run's collections resume from
    assert ended_streams(r.stderr) == ["bluesky@app.bsky.feed.post"], r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 2
    with JetstreamServer(frames) as server:
        r = cli("--dry-run", "--jetstream-url", server.url, "--duration", "3", "--data-dir", str(tmp_path),
                "--collections", "app.bsky.feed.repost", "--collections", "app.bsky.feed.post")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ended_streams(r.stderr) == ["bluesky"], r.stderr[-2000:]  # the defaults: today's key
    assert len(r.stdout.splitlines()) == 3


def test_cli_refuses_collections_jetstream_would_answer_400_forever(tmp_path):
    # Jetstream answers 400 "invalid collection" to a name that is not an NSID
    # (two names in one --collections) and to more than 100: the connector
    # took that for a passing refusal and reconnected for ever.
    r = cli("--dry-run", "--duration", "1", "--data-dir", str(tmp_path),
            "--collections", "app.bsky.feed.post,app.bsky.feed.repost")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not a collection NSID" in r.stderr and "once per collection" in r.stderr
    many = [a for i in range(101) for a in ("--collections", f"com.example.app{i}.record")]
    r = cli("--dry-run", "--duration", "1", "--data-dir", str(tmp_path), *many)
    assert r.returncode == 2 and "at most 100" in r.stderr and "Traceback" not in r.stderr
    # a run that reads no posts is told it cannot produce anything
    with JetstreamServer(two_collections_stream()) as server:
        r = cli("--dry-run", "--jetstream-url", server.url, "--duration", "2", "--data-dir", str(tmp_path),
                "--collections", "app.bsky.feed.repost")
    assert r.returncode == 0 and "leaves out app.bsky.feed.post" in r.stderr and r.stdout == ""


# --------------------------------------------------------------------------
# When: a post's createdAt is its client's word
# --------------------------------------------------------------------------
def test_a_backdated_post_is_dated_when_the_network_first_carried_it(tmp_path):
    # createdAt is whatever the client wrote: an archive import dated 2009, or
    # a post claiming hours of priority on a picture, was taken as is and
    # became its picture's first sighting (the cluster's first_seen).
    relay = T0 + 50_000_000  # 10:00:50
    frames = [post("old", [A], created="2009-03-01T12:00:00Z", time_us=relay),
              post("hours", [B], created="2024-11-30T07:00:00+01:00", time_us=relay + 1),  # 4 h before
              post("late", [C], created="2024-11-30T09:31:00Z", time_us=relay + 2),  # 30 min before: a slow PDS
              post("now", [A], did=OTHER, created="2024-11-30T10:00:49.700Z", time_us=relay + 3)]
    sink, runner = _mapped(tmp_path, frames, 4)
    at = {e.post_id.rsplit("/", 1)[1]: e.posted_at for e in sink.events}
    carried = datetime.fromtimestamp(relay / 1e6, timezone.utc)
    assert at["old"] == carried and abs((at["hours"] - carried).total_seconds()) < 1e-3
    assert at["late"] == datetime(2024, 11, 30, 9, 31, tzinfo=timezone.utc)
    assert at["now"] == datetime(2024, 11, 30, 10, 0, 49, 700_000, tzinfo=timezone.utc)


def test_a_stream_of_its_own_collections_resumes_from_the_state_it_kept_before_the_keys(tmp_path, caplog):
    # Before streams were keyed by their collections, a `--collections app.bsky.feed.repost` run kept its
    # state in bluesky.sqlite: on upgrade it got a new, empty file and started at Jetstream's live tip,
    # losing every post of the restart and the posts it remembered for reposts
    s = settings_for(tmp_path)
    saved = str(T0 + 10_000_000)
    old = open_state(s, "bluesky")
    old.remember("at://did:plc:x/app.bsky.feed.post/p", RememberedPost(images=["https://cdn.example/a"]))
    old.commit("bluesky", saved)
    old.close()
    key = bluesky_stream_key(["app.bsky.feed.repost"], [])
    with caplog.at_level("WARNING", logger="deepwatch.connectors"):
        state = open_state(s, key)
    assert state.cursor(key) == saved
    assert state.recall("at://did:plc:x/app.bsky.feed.post/p").images == ["https://cdn.example/a"]
    state.commit(key, str(T0 + 20_000_000))
    state.close()
    assert any("adopted" in r.getMessage() for r in caplog.records)
    reopened = open_state(s, "bluesky")  # a copy: the default stream's own file is as it was
    assert reopened.cursor("bluesky") == saved
    reopened.close()
    assert open_state(s, key).cursor(key) == str(T0 + 20_000_000)  # adopted once, not again
