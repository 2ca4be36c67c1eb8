"""Bounded hot index on the real broker: with an aggressive hot window,
clusters are evicted (table tombstones on the changelog) and revived from the
findings store when their picture resurfaces, across a worker restart, and
the findings are exactly those of a run that never evicts."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from streams import runner
from streams.demo_feed import build_feed
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store
from tests.support import split_feed

pytestmark = pytest.mark.slow


def test_evicted_clusters_revive_and_counts_stay_exact(tmp_path):
    feed, exp = build_feed(tmp_path / "feed")
    first, second = split_feed(feed, 2)
    # The demo feed spans 45 minutes of event time: a 6-minute hot window
    # evicts most clusters several times over.
    settings = Settings(data_dir=tmp_path / "data", dedupe={"hot_window_hours": 0.1, "evict_every_ops": 1})
    settings.ingest.image_roots = [feed.parent.resolve()]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        w1 = cluster.start_worker()
        p1 = produce_feed(first, cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, p1.offsets, timeout_s=180)
        w1.stop()  # clean restart: the table is recovered from a changelog with tombstones
        cluster.start_worker()
        # Producing while a worker is still joining and seeking can, rarely
        # and under heavy CPU load, skip a record inside Faust (observed 1 in
        # ~4 runs at 2.5x CPU oversubscription); `replay` waits for readiness
        # and resends stalled events, this test only waits.
        cluster.wait_ready()
        p2 = produce_feed(second, cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, p1.offsets | p2.offsets, timeout_s=180)
    store = open_store(settings.data_dir)
    clusters, alerts = store.clusters(), store.alerts()
    assert len(clusters) == exp.distinct_pictures  # revived, never duplicated
    assert sum(c.sightings for c in clusters) == exp.events - len(exp.dead_letter_reasons) - 1
    for c in clusters:
        assert c.stream_sightings == c.sightings, c.id
    assert len(alerts) == 1
