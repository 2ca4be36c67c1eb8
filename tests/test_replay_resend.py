"""The replay's safety net: an event the workers never process is sent again
after a stall, once, and the run completes without double counting."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from streams import runner
from streams.demo_feed import build_feed
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store

pytestmark = pytest.mark.slow


def test_stalled_events_are_resent_once_and_counted_once(tmp_path):
    feed, exp = build_feed(tmp_path / "feed", burst=3)
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [feed.parent.resolve()]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        produced = produce_feed(feed, cluster.bootstrap, settings)
        # A record lost inside the consumer looks, from the replay's side, like
        # an offset that never gets processed: add one no worker will ever see.
        ghost = (0, 10_000)
        produced.offsets.add(ghost)
        produced.origin[ghost] = produced.origin[next(iter(sorted(produced.offsets - {ghost})))]
        cluster.start_worker()
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=120, produced=produced, stall_s=3)
    store = open_store(settings.data_dir)
    clusters = store.clusters()
    assert sum(c.sightings for c in clusters) == exp.events - len(exp.dead_letter_reasons) - 1
    for c in clusters:
        assert c.stream_sightings == c.sightings
