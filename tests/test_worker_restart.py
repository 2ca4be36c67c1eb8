"""Crash and scale-out on the real embedded broker: a worker killed mid-stream
is replaced and the cluster table recovers exactly from its changelog (this is
what the Tansu highwater workaround is for); two workers give the same result
as one."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from streams import runner
from streams.demo_feed import build_feed
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store
from tests.support import split_feed

pytestmark = pytest.mark.slow


def settings_for(tmp_path: Path, feed: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data")
    s.ingest.image_roots = [feed.parent.resolve()]
    return s


def wait_processed_at_least(settings: Settings, n: int, timeout: float = 120) -> int:
    store = open_store(settings.data_dir)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = len(store.processed_offsets(settings.topic("events")))
            if done >= n:
                return done
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {n} events processed in {timeout}s")
    finally:
        store.close()


def assert_exact(settings: Settings, expected_sightings: int) -> list[dict]:
    store = open_store(settings.data_dir)
    clusters = store.clusters()
    alerts = store.alerts()
    store.close()
    assert sum(c["sightings"] for c in clusters) == expected_sightings
    for c in clusters:
        # The stream's counts come from the recovered table; the store's from
        # idempotent rows. Any lost or replayed-twice op shows up here.
        assert c["stream_sightings"] == c["sightings"], c["id"]
    assert len(alerts) == 1
    return clusters


def test_worker_killed_mid_stream_recovers_exactly(tmp_path):
    feed, exp = build_feed(tmp_path / "feed", burst=30)
    first, second = split_feed(feed, 2)
    settings = settings_for(tmp_path, feed)
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        w1 = cluster.start_worker()
        p1 = produce_feed(first, cluster.bootstrap, settings)
        wait_processed_at_least(settings, 8)
        w1.kill()  # no clean shutdown, no final offset commit
        p2 = produce_feed(second, cluster.bootstrap, settings)
        cluster.start_worker()
        # No resend safety net here (replay has one): this test must see the
        # worker itself recover and lose nothing.
        offsets = p1.offsets | p2.offsets
        assert runner.wait_until_processed(cluster, offsets, timeout_s=240), "not everything was processed after restart"
        log = "\n".join(w.log_path.read_text() for w in cluster.workers)
    assert "cluster index rebuilt" in log
    clusters = assert_exact(settings, exp.events - len(exp.dead_letter_reasons) - 1)
    assert len(clusters) == exp.distinct_pictures


def test_two_workers_agree_with_one(tmp_path):
    feed, exp = build_feed(tmp_path / "feed")
    settings = settings_for(tmp_path, feed)
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        cluster.start_worker()
        cluster.wait_ready()  # see test_eviction_pipeline: producing into a starting worker races Faust's seek
        produced = produce_feed(feed, cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=240)
    clusters = assert_exact(settings, exp.events - len(exp.dead_letter_reasons) - 1)
    assert len(clusters) == exp.distinct_pictures
