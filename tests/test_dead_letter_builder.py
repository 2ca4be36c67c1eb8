"""Dead letters are built in one place (``DeadLetter.of``): the excerpt and
the digest of the whole message (``payload_sha256``) together. The cluster
stage built its own and left the digest out, so two different undecodable
cluster ops sharing their first 512 bytes were one dead letter
(``streams.findings.dead_letter_identity`` tells them apart by the digest)."""

from __future__ import annotations

from streams.findings import dead_letter_identity
from streams.records import DeadLetter, SourceRef, payload_sha256
from streams.settings import Settings
from streams.store import SqliteFindingsStore
from tests.test_cluster_stage import run, stage_for

HEAD = b'{"kind": "sighting", "sighting": ' + b"x" * 600  # undecodable, and over 512 bytes


def test_two_undecodable_cluster_ops_sharing_their_first_512_bytes_are_two_dead_letters(tmp_path):
    stage, topics, dead = stage_for(Settings(data_dir=tmp_path), {})
    first, second = HEAD + b"A", HEAD + b"B"
    run(stage, [first, second])
    assert [(d.stage, d.source.offset) for d in dead] == [("cluster", 0), ("cluster", 1)]
    assert [d.payload_sha256 for d in dead] == [payload_sha256(first), payload_sha256(second)]
    assert dead[0].payload_excerpt == dead[1].payload_excerpt == HEAD[:512].decode()
    assert dead_letter_identity(dead[0]) != dead_letter_identity(dead[1])
    store = SqliteFindingsStore(tmp_path / "findings.sqlite")
    try:
        assert [store.add_dead_letter(d) for d in dead] == [True, True]
        assert len(store.dead_letters()) == 2
        assert store.add_dead_letter(dead[0]) is False  # the same message again is still one
    finally:
        store.close()
    assert not topics["updates"].sent


def test_the_builder_sets_the_excerpt_and_the_digest():
    raw = "é".encode() * 300 + b"\xff tail"  # 600 bytes of text, then a byte that is no UTF-8
    src = SourceRef(topic="t", partition=0, offset=3)
    dl = DeadLetter.of("validate", "malformed_json", "bad", raw, source=src, event_id="e1")
    assert (dl.stage, dl.reason, dl.detail, dl.source, dl.event_id) == ("validate", "malformed_json", "bad", src, "e1")
    assert dl.payload_sha256 == payload_sha256(raw)
    assert dl.payload_excerpt == raw[:512].decode("utf-8", "replace") == "é" * 256
    # the digest without the excerpt (the analyze stage keeps excerpts of undecodable events only)
    quiet = DeadLetter.of("fetch", "timeout", "slow", raw, excerpt=False)
    assert quiet.payload_excerpt is None and quiet.payload_sha256 == payload_sha256(raw)
    # no message in hand (a send that failed): neither
    none = DeadLetter.of("cluster", "send_failed", "refused", None)
    assert none.payload_excerpt is None and none.payload_sha256 is None
    # text is digested as UTF-8
    assert DeadLetter.of("sink", "x", "y", "abc").payload_sha256 == payload_sha256(b"abc")


def test_two_copies_of_one_events_cluster_op_are_one_dead_letter(tmp_path):
    """An op that names its event is not digested: its bytes hold where that
    copy sat and when it was fetched, so a replay's resend of the event (a
    second copy, another offset) was a second dead letter for one event."""
    import json

    stage, _topics, dead = stage_for(Settings(data_dir=tmp_path), {})
    copies = [json.dumps({"kind": "sighting", "sighting": {
        "event": {"event_id": "e1"}, "source": {"topic": "deepwatch.events", "partition": 0, "offset": offset},
        "fetched_at": f"2026-12-07T10:00:0{offset}+00:00"}}).encode() for offset in (4, 9)]
    run(stage, copies)
    assert [(d.event_id, d.payload_sha256) for d in dead] == [("e1", None), ("e1", None)]
    assert dead_letter_identity(dead[0]) == dead_letter_identity(dead[1])
    store = SqliteFindingsStore(tmp_path / "findings.sqlite")
    try:
        for d in dead:
            store.add_dead_letter(d)
        assert len(store.dead_letters()) == 1
    finally:
        store.close()
