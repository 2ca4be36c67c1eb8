"""The posts a connector remembers for later reposts, quotes and edits
(``RememberedPost`` in the state file's ``posts`` table): a typed, versioned
record. Rows written before it carried a version are read as they were;
rows that cannot be read are recalled as None, with a warning, instead of
ending the connector's run. Against the loopback Jetstream
(tests/connector_servers.py) over a real websocket, with the real SQLite
state file of a run."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3

import pytest

from streams.connectors.base import REMEMBERED_POST_VERSION, ConnectorState, RememberedPost
from streams.connectors.run import build_bluesky, open_state, state_path
from streams.connectors.sinks import JsonlSink
from tests.connector_servers import JetstreamServer
from tests.test_connector_bluesky import run_until, settings_for
from tests.test_connector_bluesky_streams import A, B, C, DID, OTHER, T0, post, repost, url

P1 = f"at://{DID}/app.bsky.feed.post/p1"
P2 = f"at://{DID}/app.bsky.feed.post/p2"


def _write_rows(path, rows: dict[str, str]) -> None:
    """Rows of the ``posts`` table as the connector's SQL writes them (``doc``:
    the stored text), into the state file of a stream that is not running."""
    db = sqlite3.connect(path)
    with db:
        db.executemany("INSERT OR REPLACE INTO posts (post_id, doc) VALUES (?, ?)", list(rows.items()))
    db.close()


def _unversioned(uri: str, cids: list[str], *, with_cids: bool = True) -> str:
    """A remembered post exactly as the code before ``RememberedPost`` wrote it
    (``json.dumps`` of a plain dict, no version); ``with_cids=False``: as the
    code before edits were followed wrote it (no ``cids``)."""
    rkey = uri.rsplit("/", 1)[1]
    doc = {"post_url": f"https://bsky.app/profile/{DID}/post/{rkey}", "text": "flooding #breaking", "lang": "en",
           "hashtags": ["breaking"], "images": [url(c) for c in cids]}
    if with_cids:
        doc["cids"] = cids
    return json.dumps(doc)


def _run(tmp_path, frames: list[str], done) -> tuple[JsonlSink, object]:
    s = settings_for(tmp_path)
    sink = JsonlSink(io.StringIO(), keep=True)
    state = open_state(s, "bluesky")
    runner = build_bluesky(s, sink, state)
    with JetstreamServer(frames) as server:
        runner.url = server.url
        asyncio.run(run_until(runner, lambda: done(runner, sink)))
    state.close()
    return sink, runner


def _settle(frames: list[str]):
    last = str(json.loads(frames[-1])["time_us"])
    return lambda runner, _sink: runner.emitter.cursor == last and not runner.emitter.unsaved


def test_posts_remembered_before_the_record_was_versioned_give_the_same_edits_reposts_and_deletes(tmp_path):
    s = settings_for(tmp_path)
    open_state(s, "bluesky").close()  # the state file of a run of the code before, stopped
    _write_rows(state_path(s, "bluesky"), {P1: _unversioned(P1, [A, B]), P2: _unversioned(P2, [A], with_cids=False)})
    frames = [
        # p1: the same pictures, the words edited: nothing new; then the second one swapped
        post("p1", [A, B], op="update", text="flooding at Canal St #breaking", time_us=T0 + 1_000_000),
        post("p1", [A, C], op="update", text="flooding at Canal St #breaking", time_us=T0 + 2_000_000),
        repost("rp1", "p1", time_us=T0 + 3_000_000),
        # p2 (remembered without cids: compared by image URL): a picture added, then the post deleted
        post("p2", [A, B], op="update", time_us=T0 + 4_000_000),
        json.dumps({"did": DID, "time_us": T0 + 5_000_000, "kind": "commit", "commit": {
            "rev": "r5", "operation": "delete", "collection": "app.bsky.feed.post", "rkey": "p2"}}),
        repost("rp2", "p2", time_us=T0 + 6_000_000),
    ]
    sink, runner = _run(tmp_path, frames, _settle(frames))
    rp1 = f"at://{OTHER}/app.bsky.feed.repost/rp1"
    assert [(e.event_id, e.image.url) for e in sink.events] == [
        (f"{P1}#cid:{C}", url(C)), (f"{rp1}#0", url(A)), (f"{rp1}#1", url(C)), (f"{P2}#cid:{B}", url(B))]
    assert sink.events[0].text == "flooding at Canal St #breaking" and sink.events[0].lang == "en"
    assert sink.events[1].post_url == f"https://bsky.app/profile/{DID}/post/p1"
    assert runner.emitter.counts["edit"] == 3 and runner.emitter.counts["unknown_subject"] == 1
    # p1 is written back as the current version, the pictures it has shown kept; p2 is gone
    db = sqlite3.connect(state_path(s, "bluesky"))
    stored = json.loads(db.execute("SELECT doc FROM posts WHERE post_id = ?", (P1,)).fetchone()[0])
    db.close()
    assert stored["schema_version"] == REMEMBERED_POST_VERSION
    state = ConnectorState(state_path(s, "bluesky"))
    assert state.recall(P1) == RememberedPost(
        post_url=f"https://bsky.app/profile/{DID}/post/p1", text="flooding at Canal St #breaking", lang="en",
        hashtags=[], images=[url(A), url(C)], cids=[B, A, C])  # the edit's record has no tag facets
    assert state.recall(P2) is None
    state.close()


def test_a_remembered_post_round_trips_as_the_record_it_was(tmp_path):
    state = ConnectorState(tmp_path / "s.sqlite")
    rec = RememberedPost(post_url=None, text="t", lang=None, hashtags=["a"], images=[url(A)], cids=[A])
    state.remember(P1, rec)
    state.commit("bluesky", None)
    state.close()
    state = ConnectorState(tmp_path / "s.sqlite")
    assert state.recall(P1) == rec and state.recall(P2) is None
    state.close()


UNREADABLE = {
    "not JSON": '{"post_url": "https://bsky.app/profile/x/post/p", "images": [',
    "a list": "[]",
    "images not a list": json.dumps({"text": "t", "images": 5}),
    "an image that is not a string": json.dumps({"text": "t", "images": [{"url": url(A)}], "cids": [A]}),
    "a newer version": json.dumps({"schema_version": REMEMBERED_POST_VERSION + 1, "text": "t",
                                   "images": [url(A)], "cids": [A]}),
    "a newer version of another shape": json.dumps({"schema_version": REMEMBERED_POST_VERSION + 1,
                                                    "images": "one"}),
}


@pytest.mark.parametrize("what", list(UNREADABLE))
def test_an_unreadable_remembered_post_is_recalled_as_none_with_a_warning(tmp_path, caplog, what):
    state = ConnectorState(tmp_path / "s.sqlite")
    state.close()
    _write_rows(tmp_path / "s.sqlite", {P1: UNREADABLE[what]})
    state = ConnectorState(tmp_path / "s.sqlite")
    with caplog.at_level(logging.WARNING, logger="deepwatch.connectors"):
        assert state.recall(P1) is None
    warned = [r for r in caplog.records if "remembered post" in r.getMessage()]
    assert len(warned) == 1 and warned[0].post_id == P1
    if "newer" in what:  # the version is the problem said, whatever the fields hold
        assert "is newer than this deepwatch's" in warned[0].problem, warned[0].problem
    state.close()


def test_unreadable_remembered_posts_do_not_end_the_run(tmp_path, caplog):
    # A row that json.loads refused ended the connector's run at the first
    # repost, quote or edit of its post; one of another shape, the same way
    # (AttributeError, TypeError), and every restart met it again.
    s = settings_for(tmp_path)
    open_state(s, "bluesky").close()
    _write_rows(state_path(s, "bluesky"), {P1: UNREADABLE["not JSON"], P2: UNREADABLE["a list"]})
    frames = [
        repost("rp1", "p1", time_us=T0 + 1_000_000),
        repost("rp2", "p2", time_us=T0 + 2_000_000),
        # an edit of an unreadable post is mapped as one not remembered: like a create
        post("p2", [B], op="update", time_us=T0 + 3_000_000),
        post("p3", [C], time_us=T0 + 4_000_000),
        repost("rp3", "p3", time_us=T0 + 5_000_000),
    ]
    with caplog.at_level(logging.WARNING, logger="deepwatch.connectors"):
        sink, runner = _run(tmp_path, frames, _settle(frames))
    assert [e.event_id for e in sink.events] == [f"{P2}#0", f"at://{DID}/app.bsky.feed.post/p3#0",
                                                 f"at://{OTHER}/app.bsky.feed.repost/rp3#0"]
    assert runner.emitter.counts["unknown_subject"] == 2 and runner.emitter.counts["edit"] == 1
    assert {r.post_id for r in caplog.records if "remembered post" in r.getMessage()} == {P1, P2}
    # the edit's pictures replace the unreadable row
    state = ConnectorState(state_path(s, "bluesky"))
    assert state.recall(P2).images == [url(B)] and state.recall(P1) is None
    state.close()
