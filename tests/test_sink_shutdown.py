"""An operator's situation end to end: the findings file is write-locked by
another process, and the worker is stopped while its sinks wait on it. The
batch must not be lost: the next worker stores it. Real embedded broker,
real worker processes, a real SQLite write lock."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import ExitStack

import pytest

from streams import runner
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store
from tests.support import picture

pytestmark = pytest.mark.slow


def test_a_batch_held_by_a_locked_store_survives_the_worker_stopping(tmp_path):
    (tmp_path / "feed" / "img").mkdir(parents=True)
    lines = []
    for i in range(3):
        picture(700 + i).save(tmp_path / "feed" / "img" / f"p{i}.jpg", quality=90)
        lines.append({"event_id": f"e{i}", "platform": "x", "account_id": f"a{i}",
                      "posted_at": f"2026-11-01T12:00:{i:02d}+00:00", "image": {"path": f"img/p{i}.jpg"}})
    feed = tmp_path / "feed" / "feed.jsonl"
    feed.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [feed.parent.resolve()]
    settings.partitions = 1
    open_store(settings.data_dir).close()  # the file exists, so it can be locked before the worker writes
    lock = sqlite3.connect(settings.data_dir / "findings.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock (a backup, a stuck reader-writer)
    try:
        with ExitStack() as stack:
            cluster = runner.start_cluster(settings, stack)
            first = cluster.start_worker()
            cluster.wait_ready()
            produced = produce_feed(feed, cluster.bootstrap, settings)
            time.sleep(10)  # analysed and clustered in ~2 s; the sinks then wait on the lock (30 s busy timeout)
            first.stop(timeout=60)  # SIGTERM while the sink waits on the lock
            lock.execute("ROLLBACK")
            cluster.start_worker()
            assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=120), \
                "events whose findings were held when the worker stopped were never stored"
    finally:
        lock.close()
    store = open_store(settings.data_dir)
    try:
        dead = [(d.event_id, d.stage, d.reason, (d.detail or "")[:200]) for d in store.dead_letters()]
        assert dead == [], "an event held by the locked store was dead-lettered instead"
        with sqlite3.connect(settings.data_dir / "findings.sqlite") as db:
            outcomes = dict(db.execute("SELECT event_id, outcome FROM processed"))
        assert sorted(store.sighting_times()) == ["e0", "e1", "e2"], f"outcomes on record: {outcomes}"
        assert sum(c.sightings for c in store.clusters()) == 3
    finally:
        store.close()
