"""Clusters an earlier run left waiting for a model result (``--no-wait-models``,
or a run whose detect role never answered): their requests went with that
run's embedded broker. The next run over the same data dir asks the models
again for them (the cluster stage, seeding its fresh table) and waits for
those answers, not for the stall (``runner.MODELS_STALL_S``), and the store
ends with no cluster pending."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack

import pytest

from streams import runner
from streams.clustering import ClusterState
from streams.demo_feed import build_feed
from streams.ingest import produce_feed
from streams.records import ClusterOp, DetectionResult, DetectRequest
from streams.settings import Settings
from streams.store import open_store
from tests.test_cluster_stage import ops_for, run, stage_for


def asked(topic) -> list[tuple[str, str]]:
    return [(r.cluster_id, r.sha256) for r in (DetectRequest.loads(v) for _, v in topic.sent)]


def test_a_fresh_table_asks_the_models_again_for_clusters_left_waiting_once(tmp_path):
    settings = Settings(data_dir=tmp_path)
    table: dict = {}
    stage, topics, dead = stage_for(settings, table)
    run(stage, ops_for([(1, 0), (2, 1), (3, 2)]))
    first = asked(topics["detect_requests"])
    assert len(first) == 3 and not dead
    # one cluster is answered; the other two are still waiting when the broker goes
    (cid, sha), waiting = first[0], first[1:]
    run(stage, [ClusterOp(kind="detection", detection=DetectionResult(
        cluster_id=cid, sha256=sha, evidence=[], models=["m"])).dumps()], first_offset=3)
    assert not ClusterState.loads(table[cid.encode()]).models_pending

    # the same broker (the table kept): the requests are still queued, nothing is asked again
    same, same_topics, _ = stage_for(settings, table)
    run(same, [ClusterOp(kind="resume").dumps()], first_offset=4)
    assert same_topics["detect_requests"].sent == []

    # a fresh broker: its first op (here a resume, which changes nothing) seeds the
    # table from the engine state, and the two left waiting are asked again, as before
    fresh, fresh_topics, dead = stage_for(settings, {})
    run(fresh, [ClusterOp(kind="resume").dumps()])
    assert sorted(asked(fresh_topics["detect_requests"])) == sorted(waiting)
    assert fresh_topics["updates"].sent == [] and not dead
    # seeded again (a rebalance before anything was written): not asked twice
    asyncio.run(fresh.on_rebalance())
    run(fresh, ops_for([(1, 5)]), first_offset=1)
    assert sorted(asked(fresh_topics["detect_requests"])) == sorted(waiting)
    # their answers end the wait
    for i, (c, s) in enumerate(waiting):
        run(fresh, [ClusterOp(kind="detection", detection=DetectionResult(
            cluster_id=c, sha256=s, evidence=[], models=["m"])).dumps()], first_offset=2 + i)
    assert all(not ClusterState.loads(v).models_pending for v in fresh.table.values())

    # without models configured nothing is asked for
    none, none_topics, _ = stage_for(Settings(data_dir=tmp_path, detect={"models": []}), {})
    run(none, [ClusterOp(kind="resume").dumps()])
    assert none_topics["detect_requests"].sent == []


@pytest.mark.slow
def test_a_second_replay_asks_again_for_an_earlier_runs_pending_models_instead_of_waiting_them_out(
        tmp_path, monkeypatch):
    from streams.cli.pipeline import _replay

    feed, _ = build_feed(tmp_path / "feed", burst=3)
    data = tmp_path / "data"

    def settings() -> Settings:
        s = Settings(data_dir=data)
        s.ingest.image_roots = [feed.parent.resolve()]
        return s

    # The first run: no detect role answers (as when --no-wait-models returns
    # before it did); its broker goes, and with it every request it held.
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings(), stack)
        produced = produce_feed(feed, cluster.bootstrap, cluster.settings)
        cluster.start_worker()
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=180, produced=produced)
    store = open_store(data)
    left = store.pending_work()["models"]
    store.close()
    assert left > 0

    # The second run over the same data dir: the feed is all stored already, so
    # none of its events reaches the cluster stage.
    stall_s = 20.0
    monkeypatch.setattr(runner, "MODELS_STALL_S", stall_s)
    started = time.monotonic()
    summary = _replay(settings(), feed, workers=1, timeout_s=240, live_table=False)
    took = time.monotonic() - started
    assert summary.complete and summary.run_outcomes["sighting"] == 0
    assert summary.models_pending == 0, f"{summary.models_pending} of {left} still pending after {took:.1f}s"
    assert summary.seconds < stall_s  # answered, not waited out
    assert summary.models_pending_at_start == left
    store = open_store(data)
    try:
        assert store.pending_work()["models"] == 0
        assert not [c.id for c in store.clusters() if c.models_pending]
    finally:
        store.close()
