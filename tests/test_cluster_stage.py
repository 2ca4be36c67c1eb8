"""The cluster stage as its own unit (no broker): a plain dict stands in for
the changelog table, recorders for the output topics, and the engine state
store is the real SQLite one. Seeding a fresh table, eviction to the cold
tier, revival and poison ops."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from streams.cluster_stage import ClusterStage
from streams.clustering import ClusterState
from streams.demo_feed import scene
from streams.engine_state import open_engine_state
from streams.records import Alert, ClusterOp
from streams.settings import Settings
from tests.test_cluster_engine import sighting


@dataclass
class Msg:
    offset: int
    topic: str = "cluster-ops"
    partition: int = 0


class Topic:
    def __init__(self):
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, key: bytes, value: bytes) -> None:
        self.sent.append((key, value))


def stage_for(settings: Settings, table: dict) -> tuple[ClusterStage, dict[str, Topic], list]:
    topics = {"updates": Topic(), "detect_requests": Topic(), "alerts": Topic()}
    dead: list = []

    async def send_dead(dl):
        dead.append(dl)

    stage = ClusterStage(settings, table, open_engine_state(settings.data_dir), send_dead=send_dead, **topics)
    return stage, topics, dead


def run(stage: ClusterStage, ops: list[bytes], first_offset: int = 0) -> None:
    async def go():
        for i, op in enumerate(ops):
            await stage.handle(op, Msg(first_offset + i))
    asyncio.run(go())


def ops_for(pictures: list[tuple[int, float]]) -> list[bytes]:
    return [ClusterOp(kind="sighting", sighting=sighting(scene(seed), f"e{i}", minute, f"a{i}")).dumps()
            for i, (seed, minute) in enumerate(pictures)]


def test_a_fresh_table_is_seeded_from_the_engine_state_and_a_replay_counts_nothing_twice(tmp_path):
    settings = Settings(data_dir=tmp_path)
    feed = ops_for([(1, 0), (2, 1), (1, 2), (3, 3), (2, 4)])
    table: dict = {}
    stage, topics, dead = stage_for(settings, table)
    run(stage, feed)
    assert not dead and len(topics["updates"].sent) == 5
    before = {k.decode(): ClusterState.loads(v) for k, v in table.items()}
    assert sorted(s.sightings for s in before.values()) == [1, 2, 2]
    # a fresh broker: empty table, offsets from 0 again, the same feed replayed
    fresh: dict = {}
    again, _, dead = stage_for(settings, fresh)
    run(again, feed)
    after = {k.decode(): ClusterState.loads(v) for k, v in fresh.items()}
    assert not dead
    assert {c: s.sightings for c, s in after.items()} == {c: s.sightings for c, s in before.items()}
    assert {c: [m.sha256 for m in s.members] for c, s in after.items()} == {c: [m.sha256 for m in s.members] for c, s in before.items()}


def test_idle_clusters_are_archived_and_revive_under_their_id(tmp_path):
    settings = Settings(data_dir=tmp_path, dedupe={"hot_window_hours": 0.1, "evict_every_ops": 1})
    table: dict = {}
    stage, _, _ = stage_for(settings, table)
    run(stage, ops_for([(1, 0), (2, 30)]))  # picture 1 idle for 30 minutes: evicted
    first = sighting(scene(1), "e0", 0, "a0").sha256
    archived = dict(stage.states.archived())
    assert len(archived) == 1 and len(table) == 1
    cid = next(iter(archived))
    assert ClusterState.loads(archived[cid]).members[0].sha256 == first
    run(stage, [ClusterOp(kind="sighting", sighting=sighting(scene(1), "e9", 31, "a9")).dumps()], first_offset=2)
    revived = ClusterState.loads(table[cid.encode()])
    assert revived.sightings == 2 and stage.engine.index.cluster_of(first) == cid


def test_a_poison_op_becomes_one_dead_letter_and_the_stage_goes_on(tmp_path):
    settings = Settings(data_dir=tmp_path)
    stage, topics, dead = stage_for(settings, {})
    run(stage, [b"{not json"] + ops_for([(1, 0)]), first_offset=0)
    assert [(d.stage, d.reason, d.source.offset) for d in dead] == [("cluster", "invalid_op", 0)]
    assert len(topics["updates"].sent) == 1


# -- batches -------------------------------------------------------------------
class CountingTable(dict):
    """The changelog table, counting writes (each one is a changelog message)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def __setitem__(self, key, value):
        self.writes += 1
        super().__setitem__(key, value)


def run_batches(stage: ClusterStage, ops: list[bytes], size: int, first_offset: int = 0) -> None:
    async def go():
        items = [(op, Msg(first_offset + i)) for i, op in enumerate(ops)]
        for k in range(0, len(items), size):
            await stage.handle_batch(items[k:k + size])
    asyncio.run(go())


def viral_feed() -> list[bytes]:
    """Three pictures interleaved, one of them an AI fake going viral (three
    alert levels), one exact repost of an event id: merges aside, every op
    kind of a busy minute."""
    from tests.test_cluster_engine import AI

    ss = [sighting(scene(7), "v0", 0, "va0", [AI])]
    for i in range(1, 12):
        ss.append(sighting(scene(7), f"v{i}", i * 0.2, f"va{i}"))
        ss.append(sighting(scene(20 + i % 2), f"o{i}", i * 0.2, f"oa{i}"))
    ss.append(ss[3])  # the same event again: recognised, not counted twice
    return [ClusterOp(kind="sighting", sighting=s).dumps() for s in ss]


def _outputs(tmp_path, name: str, ops: list[bytes], size: int | None):
    settings = Settings(data_dir=tmp_path / name, alerts={"min_sightings_5m": 3, "escalation_factor": 2.0})
    table = CountingTable()
    stage, topics, dead = stage_for(settings, table)
    if size is None:
        run(stage, ops)
    else:
        run_batches(stage, ops, size)
    return stage, table, topics, dead


def stable(raws) -> list:
    """Messages or states as JSON without the wall-clock stamp an alert gets
    when it is raised (``created_at``): what must not depend on batching."""
    def strip(doc):
        if isinstance(doc, dict):
            return {k: strip(v) for k, v in doc.items() if k != "created_at"}
        return [strip(v) for v in doc] if isinstance(doc, list) else doc
    return [(k, strip(json.loads(v))) for k, v in raws]


def test_a_batch_ends_where_op_by_op_ends_with_one_write_per_cluster(tmp_path):
    ops = viral_feed()
    one, one_table, one_topics, one_dead = _outputs(tmp_path, "one", ops, None)
    batch, batch_table, batch_topics, batch_dead = _outputs(tmp_path, "batch", ops, 10)
    assert not one_dead and not batch_dead
    # the same final table and engine state store
    assert stable(sorted(batch_table.items())) == stable(sorted(one_table.items())) and len(one_table) == 3
    assert stable(sorted(batch.states.hot())) == stable(sorted(one.states.hot()))
    # every snapshot (each carries the sighting it added) and every alert, in order
    for topic in ("updates", "alerts", "detect_requests"):
        assert stable(batch_topics[topic].sent) == stable(one_topics[topic].sent), topic
    assert [Alert.loads(v).level for _, v in batch_topics["alerts"].sent] == [1, 2, 3]
    # ...but a table write per cluster per batch, not per op
    assert one_table.writes == len(ops)
    assert batch_table.writes < one_table.writes / 2


def test_a_poison_op_in_the_middle_of_a_batch_is_one_dead_letter_and_the_rest_applies(tmp_path):
    ops = viral_feed()
    poisoned = ops[:5] + [b'{"kind": "sighting"}'] + ops[5:]
    clean, clean_table, clean_topics, _ = _outputs(tmp_path, "clean", ops, None)
    settings = Settings(data_dir=tmp_path / "poisoned", alerts={"min_sightings_5m": 3, "escalation_factor": 2.0})
    table = CountingTable()
    stage, topics, dead = stage_for(settings, table)
    run_batches(stage, poisoned, len(poisoned))  # one batch
    assert [(d.stage, d.reason, d.source.offset) for d in dead] == [("cluster", "invalid_op", 5)]
    assert len(topics["updates"].sent) == len(clean_topics["updates"].sent)
    assert [Alert.loads(v).alert_id for _, v in topics["alerts"].sent] == \
        [Alert.loads(v).alert_id for _, v in clean_topics["alerts"].sent]
    counts = sorted(ClusterState.loads(v).sightings for v in table.values())
    assert counts == sorted(ClusterState.loads(v).sightings for v in clean_table.values())


def test_replaying_batches_over_their_own_table_changes_nothing(tmp_path):
    ops = viral_feed()
    stage, table, topics, dead = _outputs(tmp_path, "replay", ops, 7)
    before = stable(sorted(table.items()))
    sent = {k: len(t.sent) for k, t in topics.items()}
    run_batches(stage, ops, 5)  # the same offsets again, cut differently (a crash before the commit)
    assert stable(sorted(table.items())) == before and not dead
    # redelivered ops re-emit the cluster's last alert, under its id: idempotent downstream
    assert {Alert.loads(v).alert_id for _, v in topics["alerts"].sent[sent["alerts"]:]} <= \
        {Alert.loads(v).alert_id for _, v in topics["alerts"].sent[:sent["alerts"]]}


class FailingStates:
    """An engine state store that refuses writes while ``broken``."""

    def __init__(self, real):
        self.real, self.broken = real, False

    def put(self, states):
        if self.broken:
            raise OSError("disk full")
        self.real.put(states)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_batch_whose_writes_fail_is_dead_lettered_and_the_index_rebuilt_from_the_table(tmp_path):
    ops = viral_feed()
    settings = Settings(data_dir=tmp_path, alerts={"min_sightings_5m": 3, "escalation_factor": 2.0})
    stage, topics, dead = stage_for(settings, {})
    stage.states = FailingStates(stage.states)
    run_batches(stage, ops[:4], 4)
    stage.states.broken = True
    run_batches(stage, ops[4:8], 4, first_offset=4)
    # each names its event (so replay's accounting counts it) and the op's offset
    events = [ClusterOp.loads(op).sighting for op in ops[4:8]]
    assert [(d.reason, d.event_id, d.source) for d in dead] == [("internal_error", s.event.event_id, s.source)
                                                                 for s in events]
    assert all("disk full" in d.detail and f"cluster-ops:0:{o}" in d.detail for d, o in zip(dead, range(4, 8)))
    assert len(topics["updates"].sent) == 4  # nothing of the failed batch went out
    stage.states.broken = False
    run_batches(stage, ops[8:], 4, first_offset=8)
    members = sum(len(ClusterState.loads(v).members) for v in stage.table.values())
    assert members == stage.engine.index.n_members  # the index agrees with the table again


def test_an_op_that_fails_after_changing_a_state_leaves_the_batch_as_before_it(tmp_path):
    """The batch keeps its states as objects between ops (no parse per op);
    an op that raises half-way through its cluster's state must not leave
    its changes there: the states are those before it, as op by op."""
    ops = viral_feed()
    clean, clean_table, clean_topics, _ = _outputs(tmp_path, "clean", ops[:5] + ops[6:], None)
    settings = Settings(data_dir=tmp_path / "failing", alerts={"min_sightings_5m": 3, "escalation_factor": 2.0})
    table = CountingTable()
    stage, topics, dead = stage_for(settings, table)
    real = stage.engine._count
    sixth = ClusterOp.loads(ops[5]).sighting.event.event_id

    def count_then_fail(state, s, t):
        real(state, s, t)  # the state is changed...
        if s.event.event_id == sixth:
            raise RuntimeError("boom")  # ...and the op fails

    stage.engine._count = count_then_fail
    run_batches(stage, ops, len(ops))  # one batch
    assert [d.stage for d in dead] == ["cluster"] and "cluster-ops:0:5" in dead[0].detail
    counts = sorted(ClusterState.loads(v).sightings for v in table.values())
    assert counts == sorted(ClusterState.loads(v).sightings for v in clean_table.values())


def test_an_engine_state_store_that_cannot_write_holds_the_batch_not_its_events(tmp_path, monkeypatch):
    """The engine state store locked past its busy timeout (or its disk full)
    dead-lettered every op of the batch as cluster:internal_error: valid
    events lost for good, and one a replay resent became a sighting too. Now
    the batch waits and is applied again, with the same outcome as a clean run."""
    import sqlite3

    from streams import cluster_stage

    monkeypatch.setattr(cluster_stage, "STORE_RETRY_INITIAL_S", 0.01)
    ops = viral_feed()
    clean, clean_table, clean_topics, _ = _outputs(tmp_path, "clean", ops, None)
    settings = Settings(data_dir=tmp_path / "held", alerts={"min_sightings_5m": 3, "escalation_factor": 2.0})
    table = CountingTable()
    stage, topics, dead = stage_for(settings, table)
    real_put, failures = stage.states.put, [3]

    def put(writes):
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        real_put(writes)

    monkeypatch.setattr(stage.states, "put", put)
    run_batches(stage, ops, 8)
    assert dead == [] and failures == [0]
    counts = sorted(ClusterState.loads(v).sightings for v in table.values())
    assert counts == sorted(ClusterState.loads(v).sightings for v in clean_table.values())
    assert [Alert.loads(v).alert_id for _, v in topics["alerts"].sent] == \
        [Alert.loads(v).alert_id for _, v in clean_topics["alerts"].sent]


def test_an_engine_state_error_that_would_come_back_is_not_held(tmp_path, monkeypatch):
    """Judged as the duplicate lookup and the sinks judge theirs
    (``streams.store_errors.may_pass``): SQLITE_ERROR (a missing table)
    comes back every time, and holding it would stop the single writer for
    good; the batch's events end as dead letters, to be replayed."""
    import sqlite3

    from streams import cluster_stage

    monkeypatch.setattr(cluster_stage, "STORE_RETRY_INITIAL_S", 0.01)
    stage, _, dead = stage_for(Settings(data_dir=tmp_path / "broken"), CountingTable())
    tries = []

    def put(writes):
        tries.append(len(writes))
        missing = sqlite3.OperationalError("no such table: states")
        missing.sqlite_errorname, missing.sqlite_errorcode = "SQLITE_ERROR", 1
        raise missing

    monkeypatch.setattr(stage.states, "put", put)
    ops = viral_feed()[:8]
    run_batches(stage, ops, len(ops))
    assert len(tries) == 1, "not tried again"
    assert [(d.stage, d.reason) for d in dead] == [("cluster", "internal_error")] * len(ops)
    assert all("no such table" in d.detail for d in dead)


# -- a merge cut between its table writes ---------------------------------------
class StoppingTable(dict):
    """The changelog table, logging the keys written; ``stop_after`` more
    writes go through, then the writer stops (as a crash would)."""

    def __init__(self):
        super().__init__()
        self.log: list[str] = []
        self.stop_after: int | None = None

    def __setitem__(self, key, value):
        if self.stop_after is not None:
            if self.stop_after == 0:
                raise RuntimeError("worker stopped")
            self.stop_after -= 1
        self.log.append(key.decode())
        super().__setitem__(key, value)


def _merge_ops() -> list[bytes]:
    from tests.test_cluster_engine import AI, hashed

    pic = scene(5)
    return [ClusterOp(kind="sighting", sighting=s).dumps() for s in (
        hashed(sighting(pic, "e1", 0, "a1", [AI]), 0), hashed(sighting(pic, "e2", 1, "a2"), 0xFFFFF, 40),
        hashed(sighting(pic, "e3", 2, "a3"), 0x3FF, 20))]  # the third links the first two


def test_a_merge_writes_its_survivor_first_and_a_restart_after_it_finishes_the_merge(tmp_path):
    settings = Settings(data_dir=tmp_path, dedupe={"phash_threshold": 10})
    ops = _merge_ops()
    whole = StoppingTable()
    run(stage_for(Settings(data_dir=tmp_path / "whole", dedupe={"phash_threshold": 10}), whole)[0], ops)
    survivor, = (k.decode() for k, v in whole.items() if ClusterState.loads(v).merged_into is None)
    other, = (k.decode() for k, v in whole.items() if ClusterState.loads(v).merged_into is not None)
    assert whole.log[-2:] == [survivor, other]  # the merge's writes: survivor, then the cluster it merged
    # the same feed, the worker stopped between the merge's two table writes
    table = StoppingTable()
    stage, _, dead = stage_for(settings, table)
    run(stage, ops[:2])
    table.stop_after = 1
    run(stage, ops[2:], first_offset=2)
    assert [d.reason for d in dead] == ["internal_error"] and "worker stopped" in dead[0].detail
    assert ClusterState.loads(table[other.encode()]).merged_into is None  # half-written
    # restarted over the table it left, the op comes back
    table.stop_after = None
    again, topics, dead = stage_for(settings, table)
    run(again, ops[2:], first_offset=2)
    assert not dead
    st, gone = (ClusterState.loads(table[c.encode()]) for c in (survivor, other))
    assert gone.merged_into == survivor and st.merged_from == [other]
    assert st.sightings == 3 and len(st.members) == 3 and st.verdict == "likely-ai"  # counted once
    assert again.engine.index.n_clusters == 1 and other not in again.engine.index
    assert {ClusterState.loads(v).sightings for k, v in table.items() if k.decode() == survivor} == \
        {ClusterState.loads(whole[survivor.encode()]).sightings}


def test_a_malformed_op_is_dead_lettered_as_invalid_op(tmp_path):
    settings = Settings(data_dir=tmp_path)
    op = ClusterOp.loads(ops_for([(1, 0)])[0])
    bad = op.model_copy(update={"sighting": op.sighting.model_copy(update={"sha256": "not-a-sha"})}).dumps()
    stage, topics, dead = stage_for(settings, {})
    run(stage, [bad] + ops_for([(2, 1)]))
    assert [(d.stage, d.reason, d.source.offset) for d in dead] == [("cluster", "invalid_op", 0)]
    assert "is malformed: sha256" in dead[0].detail and len(topics["updates"].sent) == 1


def test_model_requests_are_counted_and_unanswered_ones_said_once(tmp_path, monkeypatch, caplog):
    # the pixel model is on by default: without a detect worker every cluster waits for it, and only this says so
    import streams.cluster_stage as cs
    from streams import metrics
    from streams.records import DetectionResult

    settings = Settings(data_dir=tmp_path)
    assert settings.detect.models, "the default settings run a model"
    stage, topics, dead = stage_for(settings, {})
    before = metrics.MODEL_REQUESTS._value.get()
    monkeypatch.setattr(cs, "MODELS_OVERDUE_S", 0)
    with caplog.at_level("WARNING", logger="streams.cluster_stage"):
        run(stage, ops_for([(1, 0), (2, 1), (1, 2)]))
    asked = [json.loads(v) for _, v in topics["detect_requests"].sent]
    assert len(asked) == 2 and metrics.MODEL_REQUESTS._value.get() - before == 2 and not dead
    said = [r.getMessage() for r in caplog.records if "no model result" in r.getMessage()]
    assert len(said) == 1 and "deepwatch worker --role detect" in said[0]
    # an answer ends the wait; a later request unanswered is said again
    caplog.clear()
    answer = ClusterOp(kind="detection", detection=DetectionResult(
        cluster_id=asked[0]["cluster_id"], sha256=asked[0]["sha256"], evidence=[], models=list(settings.detect.models)))
    with caplog.at_level("WARNING", logger="streams.cluster_stage"):
        run(stage, [answer.dumps()], first_offset=3)
        assert not [r for r in caplog.records if "no model result" in r.getMessage()]
        run(stage, ops_for([(5, 3)]), first_offset=4)
    assert len([r for r in caplog.records if "no model result" in r.getMessage()]) == 1
