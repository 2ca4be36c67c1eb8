"""When a likely-AI cluster is "going viral", as a trust-and-safety desk means
it, against real components (the cluster engine as the cluster stage runs it,
the analyze stage, and a pipeline worker on the embedded broker):

* one account posting a fake many times is not spread: the thresholds count
  at most ``alerts.max_sightings_per_account`` sightings of one account per
  window, for the first alert and for escalations;
* many accounts reposting one post on one platform is spread (each repost is
  its reposter's sighting);
* a producer whose clock is minutes slow stamps its records before their
  posts were made; its live posts are timed by the worker's clock, not by
  the stamp, so its half of a burst no longer falls out of the 5-minute
  window, and every such record is counted and warned about.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

import streams.metrics  # noqa: F401 - registers the counter read below
from streams.records import SourceRef
from streams.settings import Settings
from tests.test_cluster_engine import AI, Harness, posted, scene, sighting


def _decided(alert) -> str:
    """An alert's rule without what ``_behind`` adds (these feeds are dated 2026-11-20)."""
    return alert.rule.split("; replayed or late feed")[0]


# -- one account is not spread ---------------------------------------------------------------
def test_one_account_posting_a_fake_ten_times_does_not_page_anyone_until_accounts_spread_it():
    """A bot posts the fake 12 times in 3 minutes: 12 sightings in 5 minutes,
    past ``min_sightings_5m`` 10, paged every subscriber as viral. Now it
    counts 3 (``max_sightings_per_account``); the alert fires when seven more
    accounts have posted it, and says the posts it counted fewer."""
    h = Harness(Settings())
    pic = scene(41)
    h.see(sighting(pic, "bot0", 0, "bot", [AI]))
    for i in range(1, 12):
        h.see(sighting(pic, f"bot{i}", i * 0.25, "bot"))
    assert h.alerts == [], [a.rule for a in h.alerts]
    for i in range(6):  # the bot's 3 and 6 others
        h.see(sighting(pic, f"acc{i}", 3 + i * 0.1, f"acc{i}"))
    assert h.alerts == []
    h.see(sighting(pic, "acc6", 3.9, "acc6"))
    [alert] = h.alerts
    assert alert.velocity.sightings_5m == 19 and alert.level == 1
    assert _decided(alert) == ("fake_score>=0.7 and sightings_5m>=10 "
                               "(counting at most 3 per account: 10 of 19 sightings)"), alert.rule


def test_counting_posts_again_is_a_setting():
    """``max_sightings_per_account`` high enough counts posts, as before:
    the bot alone alerts on its tenth post."""
    h = Harness(Settings(alerts={"max_sightings_per_account": 5000}))
    pic = scene(41)
    for i in range(12):
        h.see(sighting(pic, f"bot{i}", i * 0.25, "bot", [AI] if i == 0 else []))
    assert [(a.level, a.velocity.sightings_5m) for a in h.alerts] == [(1, 10)]
    assert _decided(h.alerts[0]) == "fake_score>=0.7 and sightings_5m>=10"


def test_a_cap_of_two_counts_accounts_posting_twice_as_spread():
    """``max_sightings_per_account`` 2: five accounts posting it twice each
    are 10; the bot's twelve posts are still 2."""
    h = Harness(Settings(alerts={"max_sightings_per_account": 2}))
    pic = scene(44)
    for i in range(12):
        h.see(sighting(pic, f"bot{i}", i * 0.2, "bot", [AI] if i == 0 else []))
    for i in range(3):
        h.see(sighting(pic, f"p{i}a", 2.5 + i * 0.1, f"p{i}"))
        h.see(sighting(pic, f"p{i}b", 2.55 + i * 0.1, f"p{i}"))
    assert h.alerts == []  # 2 + 3 x 2 = 8
    h.see(sighting(pic, "p3a", 3.0, "p3"))
    assert h.alerts == []  # 9
    h.see(sighting(pic, "p3b", 3.05, "p3"))
    [alert] = h.alerts
    assert alert.velocity.sightings_5m == 20
    assert _decided(alert).endswith("(counting at most 2 per account: 10 of 20 sightings)"), alert.rule


def test_a_bot_flooding_an_alerted_fake_does_not_escalate_it():
    """Alerted at 10 accounts; one account then posting it 30 times made
    "30 >= 3x 10" an escalation. Escalations count accounts too."""
    h = Harness(Settings())
    pic = scene(42)
    for i in range(10):
        h.see(sighting(pic, f"a{i}", i * 0.1, f"a{i}", [AI] if i == 0 else []))
    assert [a.level for a in h.alerts] == [1]
    for i in range(30):
        h.see(sighting(pic, f"flood{i}", 1 + i * 0.05, "a3"))
    assert [a.level for a in h.alerts] == [1], [a.rule for a in h.alerts]
    for i in range(20):  # a3 counts 3, the others 1 each: 12, then 30 with 18 more accounts
        h.see(sighting(pic, f"b{i}", 2.6 + i * 0.05, f"b{i}"))
    assert [a.level for a in h.alerts] == [1, 2]
    assert h.alerts[1].rule.startswith("escalation: sightings_5m 30 >= 3.0x 10 (counting at most 3 per account: "
                                       "30 of 58 sightings)"), h.alerts[1].rule


def test_reposts_of_one_post_on_one_platform_by_many_accounts_are_spread():
    """A single viral post reposted by ten accounts, all on Bluesky: each
    repost is its reposter's sighting (the connectors name the reposter), so
    it alerts like spread across platforms. An account is its platform and
    id: the same id on two platforms is two accounts."""
    h = Harness(Settings())
    pic = scene(43)
    h.see(posted(sighting(pic, "orig", 0, "did:plc:author", [AI]), "bluesky"))
    for i in range(8):
        h.see(posted(sighting(pic, f"rp{i}", 0.5 + i * 0.2, f"did:plc:reposter{i}"), "bluesky"))
    assert h.alerts == []
    h.see(posted(sighting(pic, "rp-x", 2.5, "did:plc:author"), "x"))  # another platform's account of that id
    [alert] = h.alerts
    assert alert.velocity.sightings_5m == 10 and _decided(alert) == "fake_score>=0.7 and sightings_5m>=10"


@pytest.mark.parametrize("value, ok", [(1, True), (5000, True), (0, False), (5001, False)])
def test_the_per_account_cap_is_validated(value, ok):
    if ok:
        assert Settings(alerts={"max_sightings_per_account": value}).alerts.max_sightings_per_account == value
    else:
        with pytest.raises(ValidationError, match="max_sightings_per_account"):
            Settings(alerts={"max_sightings_per_account": value})


# -- a producer with a slow clock -------------------------------------------------------------
def _count(topic: str, action: str) -> float:
    """The worker's counter as /metrics exports it (0 before its first event)."""
    value = REGISTRY.get_sample_value("deepwatch_broker_timestamp_behind_total", {"topic": topic, "action": action})
    return value or 0.0


def test_a_slow_producers_live_post_keeps_its_time_and_is_counted(tmp_path, caplog, monkeypatch):
    """The analyze stage, as the worker runs it: a record stamped 10 minutes
    before a post made moments ago carries the worker's clock on to the
    cluster stage, not the stamp, and is counted and warned about (once per
    topic and run). A backlog's record (the post an hour old) keeps its stamp:
    there a slow clock and a post dated ahead look alike. Counted apart."""
    from streams import stage as stage_module
    from tests.hostile import corpus
    from tests.test_hardening import _Fetcher, _raw, _stage

    monkeypatch.setattr(stage_module, "_clock_warned", {})  # warnings are throttled per process
    stage = _stage(tmp_path, _Fetcher(data=corpus.picture_png(1)))
    src = SourceRef(topic="slow-clock-topic", partition=0, offset=1, run="ingest-run-7")
    now = time.time()
    before = {a: _count(src.topic, a) for a in ("worker_clock", "kept")}
    with caplog.at_level(logging.WARNING, logger="streams.stage"):
        live = asyncio.run(stage.process(_raw(event_id="live", posted_at=datetime.fromtimestamp(
            now - 20, timezone.utc).isoformat()), src, now - 600))
        again = asyncio.run(stage.process(_raw(event_id="live2", posted_at=datetime.fromtimestamp(
            now - 10, timezone.utc).isoformat()), src, now - 590))
        old = asyncio.run(stage.process(_raw(event_id="old", posted_at=datetime.fromtimestamp(
            now - 3600, timezone.utc).isoformat()), src, now - 4200))
        right = asyncio.run(stage.process(_raw(event_id="right", posted_at=datetime.fromtimestamp(
            now - 30, timezone.utc).isoformat()), src, now - 25))
    ingested = {r.event_id: json.loads(r.op)["sighting"]["ingested_at"] for r in (live, again, old, right)}
    at = {k: datetime.fromisoformat(v).timestamp() for k, v in ingested.items()}
    assert now <= at["live"] <= time.time() and now <= at["live2"] <= time.time()
    assert at["old"] == pytest.approx(now - 4200, abs=0.01)
    assert at["right"] == pytest.approx(now - 25, abs=0.01)
    assert _count(src.topic, "worker_clock") - before["worker_clock"] == 2
    assert _count(src.topic, "kept") - before["kept"] == 1
    warned = [r for r in caplog.records if "clock looks slow" in r.getMessage()]
    assert [(r.topic, r.run, r.action) for r in warned] == [(src.topic, src.run, "worker_clock")]


def _write_burst(root, pic_seed: int, prefix: str, posted: list[datetime], accounts: list[str]) -> list[dict]:
    """Posts of one AI picture (the first with its generator's metadata)."""
    from streams.demo_feed import a1111_png, jpeg_bytes
    from streams.demo_feed import scene as demo_scene

    img = demo_scene(pic_seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "img" / f"{prefix}.png").write_bytes(a1111_png(img, "a flooded subway station, news photo"))
    (root / "img" / f"{prefix}.jpg").write_bytes(jpeg_bytes(img, 80))
    return [{"event_id": f"{prefix}-{i}", "platform": "x", "account_id": acct, "posted_at": t.isoformat(),
             "image": {"path": f"img/{prefix}.png" if i == 0 else f"img/{prefix}.jpg"}}
            for i, (t, acct) in enumerate(zip(posted, accounts))]


@pytest.mark.slow
def test_a_burst_half_through_a_slow_producer_alerts_and_one_account_does_not(tmp_path):
    """On the embedded broker, a pipeline worker: 15 posts of a fake in the
    last 3 minutes, every other one sent by a producer whose clock is 10
    minutes slow (its records' CreateTime; the embedded broker keeps it even
    on a LogAppendTime topic). Timed by that stamp, half the burst fell
    outside the 5-minute window: no alert. Beside it, one account posts
    another fake 12 times: 12 sightings in 5 minutes, and no alert."""
    from kafka import KafkaProducer

    from streams import runner
    from streams.store import open_store

    root = tmp_path / "feed"
    now = datetime.now(timezone.utc)
    burst = _write_burst(root, 7001, "burst", [now - timedelta(seconds=180 - 12 * i) for i in range(15)],
                         [f"acct-{i}" for i in range(15)])
    bot = _write_burst(root, 7002, "bot", [now - timedelta(seconds=170 - 12 * i) for i in range(12)], ["bot"] * 12)
    settings = Settings(data_dir=tmp_path / "data")
    settings.ingest.image_roots = [root.resolve()]
    settings.partitions = 1
    offsets: set[tuple[int, int]] = set()
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        cluster.wait_ready()
        producer = KafkaProducer(bootstrap_servers=cluster.bootstrap)
        try:
            sent = []
            for i, doc in enumerate(burst):
                slow = (time.time() - 600) if i % 2 else time.time()
                sent.append(producer.send(settings.topic("events"), key=doc["event_id"].encode(),
                                          value=json.dumps(doc).encode(), timestamp_ms=int(slow * 1000)))
            for doc in bot:
                sent.append(producer.send(settings.topic("events"), key=doc["event_id"].encode(),
                                          value=json.dumps(doc).encode()))
            producer.flush()
            for f in sent:
                md = f.get(timeout=10)
                offsets.add((md.partition, md.offset))
        finally:
            producer.close()
        assert runner.wait_until_processed(cluster, offsets, timeout_s=180)
    store = open_store(settings.data_dir)
    try:
        clusters = store.clusters()
        alerts = store.alerts()
        dead = store.dead_letters()
    finally:
        store.close()
    assert dead == []
    by_sightings = {c.sightings: c for c in clusters}
    assert set(by_sightings) == {15, 12}, [(c.sightings, c.verdict) for c in clusters]
    assert all(c.verdict == "likely-ai" for c in clusters)
    [alert] = alerts
    assert alert.cluster_id == by_sightings[15].id
    assert alert.velocity.sightings_5m >= 10 and alert.accounts >= 10
