"""The bulk sink (streams.es_bulk.BulkSink) against requests refused as a
whole and items that fail every time: nothing is acked unstored, a refused
action alone becomes a dead letter, and one bad document does not stop the
sink for good."""

from __future__ import annotations

import asyncio

import pytest

from streams import es_templates as T
from streams.es_bulk import ITEM_MAX_ATTEMPTS
from streams.es_client import EsError
from streams.settings import FindingsSettings, Settings
from tests.fake_es import rejected_execution
from tests.findings_fixture import snapshots
from tests.test_es_store import _store


def _stream(fake_es) -> dict:
    return fake_es.docs[fake_es.data_streams["deepwatch-sightings"]]


def test_a_body_limit_in_front_of_es_splits_the_batch_and_dead_letters_only_what_never_fits(fake_es):
    """An ingress with a body limit answers 413 for every larger request:
    the whole batch was raised (not held) and the agent acked it, nothing
    stored, not even a dead letter."""
    s = _store(fake_es)
    s.ensure_setup()
    snaps = snapshots()
    huge = snaps[1].model_copy(update={"new_sighting": snaps[1].new_sighting.model_copy(update={
        "event": snaps[1].new_sighting.event.model_copy(update={"event_id": "e-huge", "text": "x" * 7000})})})
    fake_es.max_body_bytes = 6000
    s.apply_snapshots([*snaps[:1], huge, *snaps[2:]])
    assert sorted(_stream(fake_es)) == ["e1", "e3", "e4", "e5", "e6", "e7"]
    assert set(fake_es.docs[T.concrete("deepwatch-clusters")]) == {"c-fire", "c-pope", "c-flood", "c-flood2"}
    [dl] = s.dead_letters()
    assert (dl.event_id, dl.stage, dl.reason) == ("e-huge", "sink", "request_entity_too_large")
    assert "413" in dl.detail
    # later chunks stay under the smallest request refused so far: fewer 413s to split again
    assert s.bulk.refused_bytes is not None and s.bulk.max_bytes() < s.bulk.settings.bulk_max_bytes
    s.close()


def test_a_whole_request_400_is_split_to_dead_letter_only_the_bad_action(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    actions = [a for snap in snapshots()[:3] for a in s.cluster_actions(snap)]
    bad = ({"create": {"_index": "deepwatch-alerts", "_id": "é" * 300}}, {"alert_id": "x"})  # 600 bytes
    res = s.bulk.send(actions[:4] + [bad] + actions[4:])
    assert res.dead_lettered == 1 and res.split >= 1
    assert sorted(_stream(fake_es)) == ["e1", "e2", "e3"]
    [dl] = s.dead_letters()
    assert dl.reason == "action_request_validation_exception" and "too long" in dl.detail
    s.close()


def test_a_request_level_refusal_about_no_action_holds_the_batch(fake_es):
    """A 404 from a proxy (a wrong path) says nothing about the actions: it
    is raised held, so Sinks retries the batch rather than the agent
    acking it."""
    s = _store(fake_es)
    s.ensure_setup()
    fake_es.fail_requests(404, {"not": "elasticsearch"}, times=1)
    with pytest.raises(EsError) as e:
        s.apply_snapshots(snapshots()[:1])
    assert e.value.hold
    s.apply_snapshots(snapshots()[:1])
    assert sorted(_stream(fake_es)) == ["e1"] and s.dead_letters() == []
    s.close()


def test_sinks_never_ack_a_batch_refused_with_413(fake_es, tmp_path):
    from streams.sink_stage import SinkStage
    from streams.sinks import Sinks
    from tests.test_es_store import _Acks, _Ev

    settings = Settings(data_dir=tmp_path, findings=FindingsSettings(
        url=fake_es.url.replace("http://", "es://"), retry_initial_s=0.01, retry_max_s=0.02))
    sinks = Sinks(settings)
    stage = SinkStage(settings, sinks)
    sinks.store.ensure_setup()
    fake_es.max_body_bytes = 3000
    events = [_Ev(x.model_dump_json().encode()) for x in snapshots()]
    acks = _Acks()
    asyncio.run(stage._stored(acks, events, sinks.snapshots))
    assert len(acks.acked) == len(events)
    assert sorted(_stream(fake_es)) == [f"e{i}" for i in range(1, 8)]
    sinks.store.close()


@pytest.mark.parametrize("status, error, op_match", [
    (500, {"type": "illegal_state_exception", "reason": "shard trouble with this document"}, "create"),
    (409, {"type": "version_conflict_engine_exception", "reason": "[c-pope]: version conflict"}, "update"),
])
def test_an_item_that_fails_every_time_is_dead_lettered_after_bounded_attempts(fake_es, status, error, op_match):
    """An item-level 500, or a 409 on an update, was retried for ever: one
    document that always fails stopped the sink for good."""
    s = _store(fake_es)
    s.ensure_setup()
    waits: list[float] = []
    s.bulk.sleep = waits.append
    target = "e4" if op_match == "create" else "c-pope"
    # (more times than the cap: the old code retried until it passed)
    fake_es.fail_items(lambda op, meta, src: op == op_match and meta.get("_id") == target, status, error,
                       times=ITEM_MAX_ATTEMPTS * 3)
    # and a 429 item (overload) is still retried as long as it takes
    fake_es.fail_items(lambda op, meta, src: meta.get("_id") == "e1", 429, rejected_execution(), times=ITEM_MAX_ATTEMPTS + 2)
    res = s.bulk.send([a for snap in snapshots()[:4] for a in s.cluster_actions(snap)])
    assert res.dead_lettered == 1
    assert "e1" in _stream(fake_es)
    [dl] = s.dead_letters()
    assert (dl.stage, dl.reason) == ("sink", error["type"])
    assert f"after {ITEM_MAX_ATTEMPTS} attempts" in dl.detail and f"HTTP {status}" in dl.detail
    s.close()


def test_a_missing_stored_script_holds_the_batch_with_one_clear_line(fake_es):
    s = _store(fake_es)
    s.ensure_setup()
    del fake_es.scripts[T.SCRIPT_ID]  # an admin never installed it; these credentials may not
    with pytest.raises(EsError) as e:
        s.apply_snapshots(snapshots()[:1])
    assert e.value.hold and "install the stored script as an admin" in str(e.value)
    assert s.dead_letters() == []
    s.close()
