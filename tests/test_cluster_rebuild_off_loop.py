"""The cluster index is rebuilt off the event loop.

At scale a rebuild (every hot state parsed and indexed, the cold tier read)
takes minutes; run on the event loop it held commits, timers and the
``/healthz`` heartbeat (503 past ``metrics.LIVENESS_S``, and the pod was
restarted into another rebuild). Here the rebuild is made slow
(``ClusterEngine.rebuild`` sleeps) and a ticker task on the loop must keep
ticking while a batch that needs the rebuild is handled; the batch's outcome
is the one the synchronous rebuild gives, and a rebalance that comes while
the rebuild runs makes it be done again from the table as it is then."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import types

import pytest

from streams.clustering import ClusterEngine, ClusterState
from streams.settings import Settings
from streams.store_errors import may_pass
from tests.test_cluster_review import _op, _states
from tests.test_cluster_stage import Msg, ops_for, run, stage_for

SLOW_S = 1.5  # how long each rebuild takes here
TICK_S = 0.02
MAX_GAP_S = 1.0  # the longest the loop may go without a tick (a rebuild on the loop: SLOW_S and more)


@pytest.fixture
def slow_rebuilds(monkeypatch):
    """``arm()``: from then on every ``ClusterEngine.rebuild`` sleeps
    ``SLOW_S`` first (a rebuild of a few million members); ``calls``: the
    threads the slow ones ran in; ``started``: set when one starts."""
    real = ClusterEngine.rebuild
    calls: list[threading.Thread] = []
    started = threading.Event()

    def slow(self, states):
        calls.append(threading.current_thread())
        started.set()
        time.sleep(SLOW_S)
        return real(self, states)

    return types.SimpleNamespace(calls=calls, started=started,
                                 arm=lambda: monkeypatch.setattr(ClusterEngine, "rebuild", slow))


async def _with_ticker(work) -> float:
    """Run ``work`` (a coroutine) beside a task ticking every ``TICK_S``;
    the longest gap between its ticks."""
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(TICK_S)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(3 * TICK_S)
    try:
        await work
    finally:
        stop.set()
        await task
    ticks.append(time.monotonic())
    return max(b - a for a, b in zip(ticks, ticks[1:]))


def _earlier_run(tmp_path, pictures):
    """A data dir and table (a dict) holding the clusters of ``pictures``;
    the engine state file is closed, so the dir can be copied."""
    settings = Settings(data_dir=tmp_path / "base")
    table: dict = {}
    stage, _, _ = stage_for(settings, table)
    run(stage, ops_for(pictures))
    stage.states.close()
    return settings.data_dir, table


def _copy(data_dir, table, dest):
    shutil.copytree(data_dir, dest)
    return Settings(data_dir=dest), dict(table)


# pictures 1 and 2 seen again (they join their clusters), 9 new, 1 once more; made once, as an op
# carries the time it was made
RAWS = [_op(1, "n0", 10, quality=70), _op(2, "n1", 11, quality=70), _op(9, "n2", 12), _op(1, "n3", 13, quality=60)]


def _batch(first_offset: int = 100):
    return [(raw, Msg(first_offset + i)) for i, raw in enumerate(RAWS)]


def test_a_rebuild_leaves_the_event_loop_running_and_decides_as_the_synchronous_one(tmp_path, slow_rebuilds):
    data_dir, table = _earlier_run(tmp_path, [(1, 0), (2, 1), (3, 2)])

    # the synchronous path, as tests and benches use it: ``engine`` builds in place
    sync_settings, sync_table = _copy(data_dir, table, tmp_path / "sync")
    sync_stage, sync_topics, sync_dead = stage_for(sync_settings, sync_table)
    assert sync_stage.engine.index.n_clusters == 3
    asyncio.run(sync_stage.handle_batch(_batch()))

    # the agent's path: a fresh stage (a restart, a rebalance) whose first batch rebuilds the index
    settings, async_table = _copy(data_dir, table, tmp_path / "async")
    stage, topics, dead = stage_for(settings, async_table)
    slow_rebuilds.arm()
    gap = asyncio.run(_with_ticker(stage.handle_batch(_batch())))

    assert len(slow_rebuilds.calls) == 1  # the batch did rebuild the index...
    assert slow_rebuilds.calls[0] is not threading.main_thread()  # ... in a thread
    assert gap < MAX_GAP_S, f"the event loop stood still {gap:.2f}s while the index was rebuilt"
    assert not dead and not sync_dead
    # the same decisions: the same snapshots (cluster of each op, counts), the same table
    assert topics["updates"].sent == sync_topics["updates"].sent
    assert topics["detect_requests"].sent == sync_topics["detect_requests"].sent
    assert async_table == sync_table
    assert sorted(s.sightings for s in _states(async_table).values()) == [1, 1, 2, 3]
    assert stage.engine.index.n_members == sync_stage.engine.index.n_members


def test_a_fresh_table_is_seeded_off_the_loop_as_in_place(tmp_path, slow_rebuilds):
    """An empty table over an earlier data dir (a fresh broker): the seeds
    come from the engine state store, read in the rebuild's thread, and the
    batch carries on from them as the synchronous rebuild does."""
    data_dir, _ = _earlier_run(tmp_path, [(1, 0), (2, 1)])
    sync_settings, sync_table = _copy(data_dir, {}, tmp_path / "sync")
    sync_stage, sync_topics, _ = stage_for(sync_settings, sync_table)
    assert sync_stage.engine.index.n_clusters == 2
    asyncio.run(sync_stage.handle_batch(_batch(first_offset=0)))

    settings, fresh = _copy(data_dir, {}, tmp_path / "async")
    stage, topics, dead = stage_for(settings, fresh)
    slow_rebuilds.arm()
    gap = asyncio.run(_with_ticker(stage.handle_batch(_batch(first_offset=0))))
    assert gap < MAX_GAP_S, f"the event loop stood still {gap:.2f}s while the index was seeded"
    assert not dead and len(slow_rebuilds.calls) == 1
    assert topics["updates"].sent == sync_topics["updates"].sent and fresh == sync_table
    assert set(stage._seeded) == set(sync_stage._seeded)


def test_a_rebalance_during_the_rebuild_makes_it_be_done_again(tmp_path, slow_rebuilds):
    """The table changes while the rebuild's thread runs (another cluster
    recovered into it) and the rebalance is signalled: the index built from
    the table before it is dropped, and the batch sees the cluster."""
    data_dir, table = _earlier_run(tmp_path, [(1, 0), (2, 1)])
    _, other = _earlier_run(tmp_path / "other", [(9, 0)])  # picture 9's cluster, recovered into the table
    settings, live_table = _copy(data_dir, table, tmp_path / "live")
    stage, _, dead = stage_for(settings, live_table)
    slow_rebuilds.arm()

    async def rebalance_once_the_rebuild_runs():
        while not slow_rebuilds.started.is_set():
            await asyncio.sleep(TICK_S)
        live_table.update(other)
        await stage.on_rebalance()

    async def go():
        helper = asyncio.create_task(rebalance_once_the_rebuild_runs())
        await stage.handle_batch(_batch())
        await helper

    asyncio.run(go())
    assert len(slow_rebuilds.calls) == 2  # the first index was dropped
    assert not dead
    (nine,) = other  # n2 joined picture 9's cluster instead of founding one
    assert ClusterState.loads(live_table[nine]).sightings == 2
    assert stage.engine.index.n_clusters == 3 and not stage._stale


def test_a_rebalance_under_way_on_the_faust_app_is_waited_for_and_redoes_the_rebuild(tmp_path, slow_rebuilds):
    """A Faust table's app says a rebalance began (its count went up) while
    the rebuild ran; the stage's own signal comes only when recovery is done.
    The result is dropped, and the next rebuild waits until the rebalance ends."""
    data_dir, table = _earlier_run(tmp_path, [(1, 0), (2, 1)])
    settings, plain = _copy(data_dir, table, tmp_path / "live")

    class FaustLikeTable(dict):
        app = types.SimpleNamespace(rebalancing=False, rebalancing_count=0)

    live_table = FaustLikeTable(plain)
    stage, _, dead = stage_for(settings, live_table)
    app = live_table.app
    snapshots: list[int] = []
    real_rows = stage._table_rows

    def rows():
        snapshots.append(app.rebalancing)
        return real_rows()

    stage._table_rows = rows
    slow_rebuilds.arm()

    async def rebalance_once_the_rebuild_runs():
        while not slow_rebuilds.started.is_set():
            await asyncio.sleep(TICK_S)
        app.rebalancing, app.rebalancing_count = True, app.rebalancing_count + 1
        await asyncio.sleep(SLOW_S + 0.5)  # past the first rebuild: the stage waits on the rebalance
        app.rebalancing = False

    async def go():
        helper = asyncio.create_task(rebalance_once_the_rebuild_runs())
        await stage.handle_batch(_batch())
        await helper

    asyncio.run(go())
    assert len(slow_rebuilds.calls) == 2 and snapshots == [False, False]
    assert not dead and not stage._stale


def test_an_op_that_fails_half_way_rebuilds_the_index_off_the_loop_for_the_rest_of_its_batch(tmp_path, slow_rebuilds):
    """An op that fails after it changed the index makes the index stale in
    the middle of a batch: the ops after it wait for a rebuild in a thread,
    not one on the loop, and end as they did."""
    table: dict = {}
    stage, _, dead = stage_for(Settings(data_dir=tmp_path), table)
    real = stage.engine._count  # built (quickly: an empty table)

    def count_then_fail(state, s, t):
        if s.event.event_id == "e1":
            raise RuntimeError("boom")  # after ``assign`` indexed the picture
        real(state, s, t)

    stage.engine._count = count_then_fail
    may_pass(RuntimeError("boom"))  # its first call imports the Elasticsearch client (half a second): not measured
    slow_rebuilds.arm()
    items = [(raw, Msg(i)) for i, raw in enumerate([_op(1, "e0", 0), _op(2, "e1", 1), _op(2, "e2", 2, quality=70)])]
    gap = asyncio.run(_with_ticker(stage.handle_batch(items)))
    assert len(slow_rebuilds.calls) == 1
    assert gap < MAX_GAP_S, f"the event loop stood still {gap:.2f}s while the index was rebuilt mid-batch"
    assert [(d.event_id, d.reason) for d in dead] == [("e1", "internal_error")]
    states = _states(table)
    assert sorted(s.sightings for s in states.values()) == [1, 1]
    assert sum(len(s.members) for s in states.values()) == stage.engine.index.n_members


def test_ops_of_a_partition_that_moved_while_the_batch_waited_are_left_to_its_new_owner(tmp_path, slow_rebuilds):
    """A rebalance during the rebuild gave the batch's partition to another
    worker: that worker applies these ops from its last commit, so this one
    leaves them (applied here too, one cluster table had two writers)."""
    data_dir, table = _earlier_run(tmp_path, [(1, 0), (2, 1)])
    settings, plain = _copy(data_dir, table, tmp_path / "live")
    actives = {("cluster-ops", 0)}

    class FaustLikeTable(dict):
        app = types.SimpleNamespace(rebalancing=False, rebalancing_count=0,
                                    assignor=types.SimpleNamespace(assigned_actives=lambda: actives))

    live_table = FaustLikeTable(plain)
    stage, topics, dead = stage_for(settings, live_table)
    app = live_table.app
    before = dict(live_table)
    slow_rebuilds.arm()

    async def partition_moves_once_the_rebuild_runs():
        while not slow_rebuilds.started.is_set():
            await asyncio.sleep(TICK_S)
        actives.clear()
        app.rebalancing_count += 1

    async def go():
        helper = asyncio.create_task(partition_moves_once_the_rebuild_runs())
        await stage.handle_batch(_batch())
        await helper

    asyncio.run(go())
    assert dict(live_table) == before and not dead
    assert not topics["updates"].sent
