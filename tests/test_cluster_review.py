"""The cluster stage against what an operator meets: malformed or hostile
ops, a fresh broker's seeding across a rebuild, and ops that fail half-way.
Every event ends as one sighting or one dead letter, and the index agrees
with the table afterwards."""

from __future__ import annotations

import asyncio
import json
import threading

from streams.clustering import ClusterState
from streams.demo_feed import scene
from streams.records import ClusterOp
from streams.settings import Settings
from tests.test_cluster_engine import sighting
from tests.test_cluster_stage import Msg, ops_for, run, stage_for


def _op(seed: int, eid: str, minute: float, quality: int = 90, **changes) -> bytes:
    """A sighting op of picture ``seed``; ``changes``: JSON fields of the
    sighting (``hashes.x`` for one of its hashes) replaced as they are."""
    doc = json.loads(ClusterOp(kind="sighting", sighting=sighting(scene(seed), eid, minute, eid, quality=quality)).dumps())
    for key, value in changes.items():
        where, _, name = key.rpartition(".")
        (doc["sighting"][where] if where else doc["sighting"])[name] = value
    return json.dumps(doc).encode()


def _states(table: dict) -> dict[str, ClusterState]:
    return {k.decode(): ClusterState.loads(v) for k, v in table.items()}


def _agrees(stage) -> bool:
    """The index holds exactly the members the table's live states hold."""
    members = sum(len(s.members) for s in _states(stage.table).values() if s.merged_into is None)
    return members == stage.engine.index.n_members


def test_malformed_hashes_are_one_dead_letter_each_and_change_nothing(tmp_path):
    good = _op(1, "g0", 0)
    hostile = {
        # lengths that only add up: indexed as two misaligned codes
        "views": _op(2, "h1", 1, **{"hashes.views": ["00" * 4, "00" * 12]}),
        # written to the state as null: no later read of the cluster loads it
        "content_box": _op(3, "h2", 1, **{"hashes.content_box": ["NaN", 0, 1, 1]}),
        "pdq": _op(4, "h3", 1, **{"hashes.pdq": "zz" * 32}),
        "phash": _op(5, "h4", 1, **{"hashes.phash": "abc"}),
    }
    for i, (name, raw) in enumerate(hostile.items()):
        table: dict = {}
        stage, topics, dead = stage_for(Settings(data_dir=tmp_path / name), table)
        run(stage, [good, raw, _op(1, "g1", 2, quality=70)])
        assert [(d.stage, d.event_id) for d in dead] == [("cluster", f"h{i + 1}")], name
        assert name in dead[0].detail
        assert [s.sightings for s in _states(table).values()] == [2], name
        assert len(topics["updates"].sent) == 2 and _agrees(stage)


def test_a_non_finite_evidence_weight_cannot_make_a_cluster_unreadable(tmp_path):
    table: dict = {}
    stage, _, dead = stage_for(Settings(data_dir=tmp_path), table)
    inf = [{"detector": "x", "score": 0.9, "weight": "Infinity", "detail": "d"}]
    run(stage, [_op(1, "e0", 0), _op(1, "e1", 1, quality=70, evidence=inf), _op(1, "e2", 2, quality=60)])
    # the record refuses it now (detectors.base.Evidence): its dead letter still names the event
    assert [(d.event_id, d.reason) for d in dead] == [("e1", "invalid_op")]
    assert [s.sightings for s in _states(table).values()] == [2]
    stage._stale = True  # a rebalance: the index is rebuilt from every state in the table
    assert stage.engine.index.n_clusters == 1


def test_a_short_sha256_is_refused_instead_of_hanging_the_writer(tmp_path):
    founder = sighting(scene(1), "e0", 0, "a0")
    prefix = founder.sha256[:16]  # the id of the cluster it founds
    table: dict = {}
    stage, _, dead = stage_for(Settings(data_dir=tmp_path), table)
    worker = threading.Thread(target=run, args=(stage, [_op(1, "e0", 0), _op(2, "e1", 1, sha256=prefix)]), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the writer spins on a cluster id it can never make unique"
    assert [(d.event_id, "sha256" in d.detail) for d in dead] == [("e1", True)]


def _seeded_stage(tmp_path):
    """A stage over a fresh (empty) table whose engine state store holds
    pictures 1 and 2 from an earlier run."""
    settings = Settings(data_dir=tmp_path)
    first, _, _ = stage_for(settings, {})
    run(first, ops_for([(1, 0), (2, 1)]))
    table: dict = {}
    stage, topics, dead = stage_for(settings, table)
    return stage, table, dead


def test_seeded_clusters_survive_a_rebuild_before_they_are_first_written(tmp_path):
    stage, table, dead = _seeded_stage(tmp_path)
    run(stage, [_op(3, "n0", 2)])  # the table is no longer empty; pictures 1 and 2 are still only seeded
    asyncio.run(stage.on_rebalance())
    run(stage, [_op(1, "n1", 3, quality=70)], first_offset=1)
    assert not dead
    by_founder = {s.members[0].event_id: s.sightings for s in _states(table).values()}
    assert by_founder == {"n0": 1, "e0": 2}  # picture 1's cluster carried on, not founded again
    assert stage.engine.index.n_clusters == 3


def test_an_op_that_fails_on_a_seeded_cluster_leaves_the_seed_as_it_was(tmp_path):
    stage, table, dead = _seeded_stage(tmp_path)
    real = stage.engine._count

    def count_then_fail(state, s, t):
        real(state, s, t)  # the seeded state is changed...
        if s.event.event_id == "n0":
            raise RuntimeError("boom")  # ...and the op fails

    stage.engine._count = count_then_fail
    run(stage, [_op(1, "n0", 2, quality=70), _op(1, "n1", 3, quality=60)])
    assert [d.event_id for d in dead] == ["n0"]
    assert [s.sightings for s in _states(table).values()] == [2]  # e0 and n1, not n0 half-counted


def test_an_op_that_fails_after_indexing_its_image_leaves_index_and_table_agreeing(tmp_path):
    table: dict = {}
    stage, _, dead = stage_for(Settings(data_dir=tmp_path), table)
    real = stage.engine._count

    def count_then_fail(state, s, t):
        if s.event.event_id == "e1":
            raise RuntimeError("boom")  # after ``assign`` indexed the picture
        real(state, s, t)

    stage.engine._count = count_then_fail

    async def go():
        items = [(raw, Msg(i)) for i, raw in enumerate([_op(1, "e0", 0), _op(2, "e1", 1), _op(2, "e2", 2, quality=70)])]
        await stage.handle_batch(items)
    asyncio.run(go())
    assert [d.event_id for d in dead] == ["e1"]
    states = _states(table)
    assert sorted(s.sightings for s in states.values()) == [1, 1]
    # picture 2's cluster is the one its surviving copy founded, with itself as its picture
    assert all(s.members and s.members[0].representative for s in states.values())
    assert _agrees(stage)


def test_a_state_that_does_not_load_costs_its_own_ops_not_the_whole_stage(tmp_path):
    # A damaged table value (or one another version wrote): the rebuild
    # raised on every batch, so the single writer applied nothing again.
    table: dict = {}
    stage, _, dead = stage_for(Settings(data_dir=tmp_path), table)
    run(stage, [_op(1, "e0", 0), _op(2, "e1", 1)])
    first = sighting(scene(1), "e0", 0, "e0").sha256
    damaged = next(k for k, s in _states(table).items() if any(m.sha256 == first for m in s.members)).encode()
    table[damaged] = b'{"schema_version": 1, "cluster_id": null}'
    stage._stale = True  # a rebalance: the index is rebuilt from the table
    run(stage, [_op(2, "e2", 2, quality=70), _op(3, "e3", 3)], first_offset=2)
    assert dead == []  # picture 2's cluster and a new picture still work
    assert sorted(s.sightings for k, s in _states({k: v for k, v in table.items() if k != damaged}).items()) == [1, 2]
