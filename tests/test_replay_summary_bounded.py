"""The replay summary reads what the run holds, not the store: the counts
come from the store (``dead_letter_counts``, ``count_alerts``,
``count_clusters``), the run's alerts, dead letters and offsets are looked
up by start time, event id and offset (``alerts_created_since``,
``dead_letters_of``, ``processed_among``), on SQLite and Elasticsearch
alike, and the summary's numbers are those the full reads gave."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from detectors.base import Evidence
from detectors.hashing import ImageHashes
from streams import runner
from streams.es_store import EsFindingsStore
from streams.records import (
    Alert, ClusterSnapshot, DeadLetter, Engagement, ImageEvent, Member, Sighting, SourceRef, Velocity,
)
from streams.settings import FindingsSettings, Settings
from streams.store import SqliteFindingsStore, open_store
from tests.findings_fixture import fill

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)
TOPIC = Settings().topic("events")
OLD, RUN = "run-1", "run-2"
STARTED = T0 + timedelta(hours=1)


def _src(offset: int, run: str = RUN, topic: str = TOPIC, partition: int = 0) -> SourceRef:
    return SourceRef(topic=topic, partition=partition, offset=offset, run=run)


def _dead(event_id: str | None, offset: int, *, stage: str = "fetch", reason: str = "timeout", run: str = RUN,
          at: datetime = T0, topic: str = TOPIC) -> DeadLetter:
    return DeadLetter(event_id=event_id, stage=stage, reason=reason, detail=f"{reason} at {offset}",
                      source=_src(offset, run, topic), payload_excerpt=f"line {run}/{offset}", at=at)


def _alert(i: int, created: datetime, ingested: datetime | None) -> Alert:
    return Alert(alert_id=f"c{i}:1", cluster_id=f"c{i}", rule="viral_fake", level=1, fake_score=0.9,
                 verdict="likely-ai", velocity=Velocity(sightings_5m=3), sightings=3, accounts=3,
                 evidence=[Evidence(detector="metadata", score=0.9, detail="d")], at=created,
                 trigger_event_id=f"e{i}", trigger_ingested_at=ingested, created_at=created)


def _snap(event_id: str, offset: int, cluster: str = "c-new") -> ClusterSnapshot:
    sha = (cluster * 64)[:64].encode().hex()[:64]
    ev = ImageEvent(event_id=event_id, platform="x", account_id="acct-1", posted_at=T0, image={"path": "a.jpg"})
    s = Sighting(event=ev, source=_src(offset), sha256=sha, width=8, height=8, format="PNG",
                 hashes=ImageHashes(phash="0" * 16, pdq="0" * 64, pdq_quality=100))
    return ClusterSnapshot(
        cluster_id=cluster, revision=1, fake_score=0.5, verdict="inconclusive",
        evidence=[Evidence(detector="d", score=0.5, detail="d")],
        members=[Member(sha256=sha, phash="0" * 16, pdq="0" * 64, pdq_quality=100, event_id=event_id)],
        sightings=1, accounts=1, platforms=["x"], engagement=Engagement(), velocity=Velocity(sightings_5m=1),
        first_seen=T0, last_seen=T0, new_sighting=s, models_pending=True,
    )


def _earlier_run(store, n: int) -> None:
    """What an earlier run on a broker whose offsets this run's reuse left:
    ``n`` dead letters (of two kinds, over two stages) and ``n`` alerts,
    all before ``STARTED``."""
    store.add_dead_letters([_dead(f"old-{i}", i, run=OLD, at=T0 + timedelta(milliseconds=i),
                                  stage="fetch" if i % 3 else "decode", reason="timeout" if i % 2 else "dns")
                            for i in range(n)])
    for i in range(n):
        created = T0 + timedelta(seconds=i % 3000, microseconds=i)
        store.add_alert(_alert(i, created, created - timedelta(seconds=2)))


def _this_run(store) -> set[tuple[int, int]]:
    """This run's events at offsets 0..8 (the earlier run's offsets again);
    returns the offsets it produced."""
    store.apply_snapshots([_snap("new-0", 0)])
    store.add_dead_letters([_dead("new-1", 1), _dead("new-2", 2, stage="decode", reason="not_an_image")])
    store.add_dead_letters([_dead(None, 3, stage="validate", reason="bad_json")])
    # no event id, where the earlier run's old-4 sat: read as this run's, by where it sat
    store.add_dead_letters([_dead(None, 4, stage="validate", reason="too_large")])
    store.add_dead_letters([_dead("old-5", 5, reason="http_500", at=T0 + timedelta(hours=2))])  # old-5 again
    store.add_dead_letters([_dead("new-0", 6)])  # its post is stored: a duplicate
    store.mark_processed(_src(7), "duplicate", "new-0")
    # another topic at an offset of this run's: not this run's
    store.add_dead_letters([_dead(None, 3, stage="validate", reason="bad_json", topic="other.events")])
    for i, (created, ingested) in enumerate([
            (STARTED, STARTED - timedelta(seconds=1)),  # exactly at the start: this run's
            (STARTED - timedelta(microseconds=1), STARTED - timedelta(seconds=3)),  # just before: not
            (STARTED + timedelta(seconds=5), STARTED + timedelta(seconds=4.5)),
            (STARTED + timedelta(seconds=6), None)]):  # no trigger time: no latency
        store.add_alert(_alert(100_000 + i, created, ingested))
    return {(0, o) for o in range(10)}  # 8 and 9 never ended


def _head_summary(store, produced: set[tuple[int, int]], run: str | None,
                  started_at: datetime | None) -> dict:
    """The summary's numbers as ``summarize`` computed them before it
    counted in the store: every dead letter, alert and cluster read."""
    records = store.dead_letters()
    dls: dict[str, int] = {}
    for d in records:
        dls[f"{d.stage}:{d.reason}"] = dls.get(f"{d.stage}:{d.reason}", 0) + 1
    alerts = store.alerts()
    latencies = [round((a.created_at - a.trigger_ingested_at).total_seconds(), 3) for a in alerts
                 if a.trigger_ingested_at and a.created_at and (started_at is None or a.created_at >= started_at)]
    out = {"dead_letters": list(dls.items()), "alerts": len(alerts), "clusters": len(store.clusters()),
           "alert_latency_s": latencies, "sightings": store.count_sightings(),
           "models_pending": store.pending_work()["models"]}
    if run is None:
        return {**out, "processed": len(produced & store.processed_offsets(TOPIC)), "run_outcomes": {},
                "run_dead_letters": []}
    ended = store.run_outcomes(run, TOPIC)
    kept = {(d.event_id, d.source.partition, d.source.offset) for d in records
            if d.source is not None and d.source.topic == TOPIC}
    mine = [runner._as_stored(store, ended[po], po, kept) for po in produced & ended.keys()]
    dead_ids = {eid for outcome, eid in mine if outcome == "dead_letter" and eid}
    dead_at = {po for po in produced & ended.keys() if ended[po] == ("dead_letter", None)}
    run_dls: dict[str, int] = {}
    for d in records:
        src = d.source
        if d.event_id in dead_ids or (src is not None and src.topic == TOPIC and (src.partition, src.offset) in dead_at):
            run_dls[f"{d.stage}:{d.reason}"] = run_dls.get(f"{d.stage}:{d.reason}", 0) + 1
    run_posts = {eid for outcome, eid in ended.values() if outcome == "sighting"}
    posts = {eid for outcome, eid in mine if outcome in ("sighting", "duplicate") and eid in run_posts}
    stored = sum(1 for outcome, _ in mine if outcome in ("sighting", "duplicate"))
    return {**out, "processed": len(mine), "run_dead_letters": list(run_dls.items()),
            "run_outcomes": {"sighting": len(posts), "duplicate": stored - len(posts),
                             "dead_letter": sum(1 for outcome, _ in mine if outcome == "dead_letter")}}


def _numbers(summary: runner.ReplaySummary) -> dict:
    return {"dead_letters": list(summary.dead_letters.items()), "alerts": summary.alerts,
            "clusters": summary.clusters, "alert_latency_s": summary.alert_latency_s,
            "sightings": summary.sightings, "models_pending": summary.models_pending,
            "processed": summary.processed, "run_outcomes": summary.run_outcomes,
            "run_dead_letters": list(summary.run_dead_letters.items())}


def _no_full_reads(monkeypatch, cls: type) -> None:
    def refuse(self, *a, **kw):
        raise AssertionError("the summary read a whole table")

    for name in ("dead_letters", "alerts", "clusters", "processed_offsets", "pending_work"):
        monkeypatch.setattr(cls, name, refuse)


@pytest.mark.parametrize("run", [RUN, None])
def test_the_summary_over_a_large_earlier_run_reads_only_this_runs_rows(tmp_path, monkeypatch, run):
    store = open_store(tmp_path)
    try:
        _earlier_run(store, 20_000)
        produced = _this_run(store)
        want = _head_summary(store, produced, run, STARTED)
    finally:
        store.close()
    # what this run left is in there, beside the earlier run's
    assert want["alert_latency_s"] == [1.0, 0.5] and want["alerts"] == 20_004
    if run:
        assert dict(want["run_dead_letters"]) == {"fetch:timeout": 1, "decode:not_an_image": 1,
                                                  "validate:bad_json": 1, "validate:too_large": 1,
                                                  "fetch:http_500": 1,
                                                  # the earlier run's where this run's nameless ones sat
                                                  "decode:timeout": 1, "fetch:dns": 1}
        assert want["run_outcomes"] == {"sighting": 1, "duplicate": 2, "dead_letter": 5}
    _no_full_reads(monkeypatch, SqliteFindingsStore)
    summary = runner.summarize(Settings(data_dir=tmp_path), 10, produced, 0, 1.0, True, run=run, started_at=STARTED)
    assert _numbers(summary) == want


# -- the store methods, on both backends ------------------------------------------

@pytest.fixture(params=["sqlite", "es"])
def both(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(tmp_path)
        yield s
        s.close()
        return
    es = request.getfixturevalue("fake_es")
    settings = Settings(findings=FindingsSettings(retry_initial_s=0.001, retry_max_s=0.004))
    s = EsFindingsStore.from_url(es.url.replace("http://", "es://"), settings=settings)
    s.bulk.sleep = lambda _s: None
    yield s
    s.close()


def _refresh(store) -> None:
    getattr(store, "refresh", lambda: None)()


def test_counts_are_those_of_the_full_reads(both):
    fill(both)  # three clusters and one merged away, an alert, a dead letter
    _earlier_run(both, 40)
    _this_run(both)
    _refresh(both)
    dls: dict[str, int] = {}
    for d in both.dead_letters():
        dls[f"{d.stage}:{d.reason}"] = dls.get(f"{d.stage}:{d.reason}", 0) + 1
    # in the order of each one's first dead letter, as the full read met them
    assert list(both.dead_letter_counts().items()) == list(dls.items())
    assert both.count_alerts() == len(both.alerts()) == 45
    assert both.count_clusters() == len(both.clusters()) == 4  # c-fire, c-pope, c-flood, c-new
    assert both.count_models_pending() == both.pending_work()["models"] == 1  # c-new's


def test_dead_letters_of_finds_a_runs_dead_letters_by_event_and_by_offset(both):
    _earlier_run(both, 10)
    _this_run(both)
    _refresh(both)
    got = both.dead_letters_of({"new-1", "old-5", "nothing"}, TOPIC, {(0, 3), (0, 4), (0, 5), (1, 4)})
    # each once (old-5's matches twice); the earlier run's old-3 and old-4 sat at (0, 3) and (0, 4)
    # too; not the other topic's at (0, 3)
    assert sorted((d.event_id or "", d.stage, d.reason, d.source.topic, d.source.offset) for d in got) == [
        ("", "validate", "bad_json", TOPIC, 3), ("", "validate", "too_large", TOPIC, 4),
        ("new-1", "fetch", "timeout", TOPIC, 1), ("old-3", "decode", "timeout", TOPIC, 3),
        ("old-4", "fetch", "dns", TOPIC, 4), ("old-5", "fetch", "http_500", TOPIC, 5)]
    assert got == [d for d in both.dead_letters() if d in got]  # the records the full read gives, in its order
    assert both.dead_letters_of(set(), TOPIC, set()) == []


def test_alerts_created_since_is_the_full_reads_tail(both):
    _earlier_run(both, 10)
    _this_run(both)
    _refresh(both)
    got = both.alerts_created_since(STARTED)
    assert [a.alert_id for a in got] == ["c100000:1", "c100002:1", "c100003:1"]
    assert got == [a for a in both.alerts() if a.created_at >= STARTED]
    assert both.alerts_created_since(None) == list(both.alerts())


def test_processed_among_is_the_ended_offsets_of_those_asked(both):
    _earlier_run(both, 3)  # offsets 0-2 ended in the earlier run
    both.mark_processed(_src(5), "duplicate", "x")
    both.mark_processed(_src(7, partition=1), "duplicate", "y")
    both.mark_processed(_src(8, topic="other.events"), "duplicate", "z")
    _refresh(both)
    asked = {(0, 1), (0, 4), (0, 5), (1, 7), (0, 8), (1, 0)}
    assert both.processed_among(TOPIC, asked) == {(0, 1), (0, 5), (1, 7)} == asked & both.processed_offsets(TOPIC)
    assert both.processed_among(TOPIC, set()) == set()


def test_the_summary_on_elasticsearch_gives_the_full_reads_numbers(fake_es, monkeypatch):
    url = fake_es.url.replace("http://", "es://")
    settings = Settings(findings=FindingsSettings(url=url, retry_initial_s=0.001, retry_max_s=0.004))
    store = EsFindingsStore.from_url(url, settings=settings)
    try:
        fill(store)
        _earlier_run(store, 200)
        produced = _this_run(store)
        store.refresh()
        want = _head_summary(store, produced, RUN, STARTED)
    finally:
        store.close()
    _no_full_reads(monkeypatch, EsFindingsStore)
    summary = runner.summarize(settings, 10, produced, 0, 1.0, True, run=RUN, started_at=STARTED)
    assert _numbers(summary) == want
    assert summary.run_outcomes == {"sighting": 1, "duplicate": 2, "dead_letter": 5} and summary.clusters == 4


def test_a_dead_letter_source_that_is_not_json_does_not_stop_the_store_opening(tmp_path):
    """The ``dead_letters_source`` index is built when a store of an earlier
    deepwatch opens: a row changed by hand is left out of it (the summary
    still counts it), not a "malformed JSON" that no open gets past."""
    import sqlite3

    store = open_store(tmp_path)
    store.add_dead_letters([_dead("e1", 1), _dead("e2", 2)])
    store.close()
    db = sqlite3.connect(tmp_path / "findings.sqlite")
    db.execute("UPDATE dead_letters SET source='{not json' WHERE event_id='e2'")
    db.execute("DROP INDEX dead_letters_source")  # as a store written before the index existed
    db.commit()
    db.close()
    store = open_store(tmp_path)
    try:
        assert store.dead_letter_counts() == {"fetch:timeout": 2}
        assert [d.event_id for d in store.dead_letters_of(set(), TOPIC, {(0, 1), (0, 2)})] == ["e1"]
    finally:
        store.close()
