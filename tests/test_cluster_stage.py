"""The cluster stage as its own unit (no broker): a plain dict stands in for
the changelog table, recorders for the output topics, and the engine state
store is the real SQLite one. Seeding a fresh table, eviction to the cold
tier, revival and poison ops."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from streams.cluster_stage import ClusterStage
from streams.clustering import ClusterState
from streams.demo_feed import scene
from streams.engine_state import open_engine_state
from streams.records import ClusterOp
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
    assert [(d.stage, d.reason, d.source.offset) for d in dead] == [("cluster", "internal_error", 0)]
    assert len(topics["updates"].sent) == 1
