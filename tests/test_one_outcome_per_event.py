"""Every event ends as exactly one sighting or one dead letter, however many
copies of it arrive (a Kafka redelivery, replay's resend, a client's retry,
the same line twice in a feed) and in whatever order their outcomes land.

Store level, on both backends (SQLite and Elasticsearch, the loopback fake):
a sighting supersedes the event's dead letters, a failure of an event
already stored as a sighting is not kept, one event's failures are one row
(the latest), and the replay accounting reads what the store holds. End to
end: `deepwatch replay` on the real broker against an image host that fails
the first request of a picture and answers the later ones."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from detectors.base import Evidence
from detectors.hashing import ImageHashes
from streams.records import ClusterSnapshot, DeadLetter, Engagement, ImageEvent, Member, Sighting, SourceRef, Velocity
from streams.records import payload_sha256
from tests.fake_es import FakeElasticsearch

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)
TOPIC = "deepwatch.events"
RUN = "run-1"
MSG = b'{"event_id": "e1", "the": "message"}'  # what copies of e1 carry, byte for byte
OTHER = b'{"event_id": "e1", "another": "post"}'  # a different post sent under the same id


@pytest.fixture
def es_store():
    """The Elasticsearch store on the fake; the fake is its ``fake``."""
    from streams.es_store import EsFindingsStore
    from streams.settings import FindingsSettings, Settings

    es = FakeElasticsearch().start()
    settings = Settings(findings=FindingsSettings(retry_initial_s=0.001, retry_max_s=0.004))
    s = EsFindingsStore.from_url(es.url.replace("http://", "es://"), settings=settings)
    s.bulk.sleep = lambda _s: None
    s.fake = es
    yield s
    s.close()
    es.stop()
    assert not es.crashes, "fake ES hit a gap:\n" + "\n".join(es.crashes)
    assert not es.unhandled, [(r.method, r.path) for r in es.unhandled]


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    if request.param == "es":
        yield request.getfixturevalue("es_store")
        return
    from streams.store import SqliteFindingsStore

    s = SqliteFindingsStore(tmp_path / "findings.sqlite")
    yield s
    s.close()


def _src(offset: int, run: str | None = RUN) -> SourceRef:
    return SourceRef(topic=TOPIC, partition=0, offset=offset, run=run)


def _dead(offset: int, reason: str = "timeout", *, stage: str = "fetch", minute: int = 0, raw: bytes = MSG,
          event_id: str | None = "e1") -> DeadLetter:
    return DeadLetter(event_id=event_id, stage=stage, reason=reason, detail=f"{reason} at offset {offset}",
                      source=_src(offset), payload_sha256=payload_sha256(raw), at=T0 + timedelta(minutes=minute))


def _snap(offset: int, event_id: str = "e1", revision: int = 1) -> ClusterSnapshot:
    sha = "a" * 64
    ev = ImageEvent(event_id=event_id, platform="x", account_id="acct-1", posted_at=T0, image={"path": "a.jpg"})
    s = Sighting(event=ev, source=_src(offset), sha256=sha, width=8, height=8, format="PNG",
                 hashes=ImageHashes(phash="0" * 16, pdq="0" * 64, pdq_quality=100))
    return ClusterSnapshot(
        cluster_id="c1", revision=revision, fake_score=0.5, verdict="inconclusive",
        evidence=[Evidence(detector="d", score=0.5, detail="d")],
        members=[Member(sha256=sha, phash="0" * 16, pdq="0" * 64, pdq_quality=100, event_id=event_id)],
        sightings=revision, accounts=1, platforms=["x"], engagement=Engagement(), velocity=Velocity(sightings_5m=1),
        first_seen=T0, last_seen=T0, new_sighting=s,
    )


def _outcomes(store) -> tuple[int, list[tuple[str | None, str, str]]]:
    """The stored outcomes: how many sightings, and each dead letter's (event, stage, reason)."""
    return store.count_sightings(), sorted((d.event_id, d.stage, d.reason) for d in store.dead_letters())


def test_a_sighting_supersedes_the_events_dead_letter(store):
    # a redelivered copy got through after the first copy's fetch timed out
    assert store.add_dead_letters([_dead(0)]) == 1
    store.apply_snapshots([_snap(4)])
    assert _outcomes(store) == (1, [])
    # where the failed copy sat reads as what its event became
    assert store.run_outcomes(RUN, TOPIC) == {(0, 0): ("sighting", "e1"), (0, 4): ("sighting", "e1")}
    # the failure redelivered once more (a replay of the dead-letter topic): still one outcome
    assert store.add_dead_letters([_dead(0)]) == 0
    assert _outcomes(store) == (1, [])


def test_a_failure_of_an_event_stored_as_a_sighting_is_not_kept(store):
    # the copy that got through was stored first; the other copy's fetch timed out later
    store.apply_snapshots([_snap(1)])
    assert store.add_dead_letters([_dead(0, minute=1)]) == 0
    assert store.add_dead_letter(_dead(2, "host_unavailable", minute=2)) is False
    assert _outcomes(store) == (1, [])
    # each copy is accounted for: the failed ones as copies of a stored post
    assert store.run_outcomes(RUN, TOPIC) == {
        (0, 0): ("duplicate", "e1"), (0, 1): ("sighting", "e1"), (0, 2): ("duplicate", "e1")}


def test_one_events_failures_are_one_row_the_latest(store):
    assert store.add_dead_letters([_dead(0, "timeout", minute=0)]) == 1
    # the resend met the host's breaker: the later failure replaces the earlier
    assert store.add_dead_letters([_dead(5, "host_unavailable", minute=1)]) == 1
    assert _outcomes(store) == (0, [("e1", "fetch", "host_unavailable")])
    assert store.dead_letters()[0].source == _src(5)
    # the same failures again (a redelivery, built anew with a later time, or a replay of the
    # older one) change nothing
    assert store.add_dead_letters([_dead(5, "host_unavailable", minute=9), _dead(0, "timeout", minute=0)]) == 0
    assert _outcomes(store) == (0, [("e1", "fetch", "host_unavailable")])
    assert store.dead_letters()[0].detail == "host_unavailable at offset 5"
    # within one batch, too, the latest failure stands for the event
    batch = [_dead(7, "dns", minute=3, event_id="e2"), _dead(6, "timeout", minute=2, event_id="e2")]
    assert store.add_dead_letters(batch) == 1
    assert _outcomes(store) == (0, [("e1", "fetch", "host_unavailable"), ("e2", "fetch", "dns")])
    # every copy ended as a dead letter
    assert {o for o, _ in store.run_outcomes(RUN, TOPIC).values()} == {"dead_letter"}


def test_different_posts_under_one_event_id_stay_two_dead_letters(store):
    assert store.add_dead_letters([_dead(0, "timeout"), _dead(1, "schema_violation", stage="validate", raw=OTHER)]) == 2
    assert _outcomes(store) == (0, [("e1", "fetch", "timeout"), ("e1", "validate", "schema_violation")])
    # a failure of the one message replaces only that message's row
    assert store.add_dead_letters([_dead(2, "dns", minute=1)]) == 1
    assert _outcomes(store) == (0, [("e1", "fetch", "dns"), ("e1", "validate", "schema_violation")])


def test_a_conflict_is_kept_beside_the_sighting_it_conflicts_with(store):
    # another post under a taken id: its only record, before and after the sighting
    conflict = _dead(3, "conflict", stage="dedupe", raw=OTHER)
    assert store.add_dead_letters([conflict]) == 1
    store.apply_snapshots([_snap(4)])
    assert store.add_dead_letters([_dead(5, "conflict", stage="dedupe", raw=OTHER + b" ")]) == 1
    assert _outcomes(store) == (1, [("e1", "dedupe", "conflict"), ("e1", "dedupe", "conflict")])
    assert store.run_outcomes(RUN, TOPIC)[(0, 3)] == ("dead_letter", "e1")


def test_rows_of_one_event_stored_before_these_rules_are_superseded(store):
    """A store written by an earlier deepwatch may hold two rows of one event
    (their keys, ``dead_letter_identity``, are the ones still written): the
    event's next failure leaves one, its sighting none."""
    old = [_dead(0, "timeout"), _dead(1, "host_unavailable", minute=1), _dead(2, "timeout", event_id="e2")]
    if hasattr(store, "fake"):
        from streams.es_docs import dead_letter_doc, dead_letter_key

        store.ensure_setup()
        store.bulk.send([({"create": {"_index": store.names["dead_letters"], "_id": dead_letter_key(d)}},
                          dead_letter_doc(d)) for d in old])
    else:
        from streams.findings import dead_letter_identity

        with store._tx() as db:
            db.executemany("INSERT INTO dead_letters (dl_key, event_id, stage, reason, detail, source, at) "
                           "VALUES (?,?,?,?,?,?,?)",
                           [(dead_letter_identity(d), d.event_id, d.stage, d.reason, d.detail,
                             d.source.model_dump_json(), d.at.isoformat()) for d in old])
    assert len(store.dead_letters()) == 3
    assert store.add_dead_letters([_dead(3, "dns", minute=2)]) == 1
    assert _outcomes(store) == (0, [("e1", "fetch", "dns"), ("e2", "fetch", "timeout")])
    store.apply_snapshots([_snap(4, "e2")])
    assert _outcomes(store) == (1, [("e1", "fetch", "dns")])


def test_a_role_that_may_not_delete_leaves_the_dead_letter_and_dead_letters_nothing(es_store, caplog):
    """Elasticsearch with a role lacking the ``delete`` privilege (an older
    docs/elasticsearch.md role): the superseded dead letter stays, said in
    the log; the refused delete is no event's failure."""
    from tests.fake_es import error_body

    store = es_store

    assert store.add_dead_letters([_dead(0)]) == 1
    store.fake.fail_items(lambda op, meta, source: op == "delete", 403,
                          error_body("security_exception", "action [indices:data/write/delete] is unauthorized", 403)["error"])
    store.apply_snapshots([_snap(4)])
    assert _outcomes(store) == (1, [("e1", "fetch", "timeout")])
    assert "superseded dead letter not deleted; grant the role the 'delete' index privilege" in caplog.text


def test_a_delete_refused_past_its_retries_dead_letters_nothing(es_store, caplog, monkeypatch):
    """A superseded dead letter's delete answered 500 past the item retries
    (or refused alone, 400) names no event: it was dead-lettered under the
    deleted row's key, a third outcome of its event."""
    import streams.es_bulk as es_bulk
    from tests.fake_es import error_body

    monkeypatch.setattr(es_bulk.BulkSink, "_backoff", lambda self, delay, why, n, me: delay)  # no waits between tries
    store = es_store
    assert store.add_dead_letters([_dead(0)]) == 1
    store.fake.fail_items(lambda op, meta, source: op == "delete", 500,
                          error_body("exception", "shard failure", 500)["error"], times=50)
    store.apply_snapshots([_snap(4)])
    assert _outcomes(store) == (1, [("e1", "fetch", "timeout")])
    assert "superseded dead letter not deleted" in caplog.text


def test_the_replay_summary_says_what_the_store_holds(tmp_path):
    """``summarize`` counts each event of the run by how it stands in the
    store: a resend (its offset not among those produced) stored the post
    and the original's failure came after; another event's first failure
    was replaced by a later one before its sighting came."""
    from streams import runner
    from streams.settings import Settings
    from streams.store import open_store

    settings = Settings(data_dir=tmp_path)
    store = open_store(tmp_path)
    try:
        store.apply_snapshots([_snap(5)])  # e1's resend got through ...
        store.add_dead_letters([_dead(0, minute=1)])  # ... then its original timed out
        store.add_dead_letters([_dead(1, event_id="e2")])
        store.add_dead_letters([_dead(6, "host_unavailable", minute=1, event_id="e2")])
        store.apply_snapshots([_snap(7, "e2", revision=2)])
        store.add_dead_letters([_dead(2, "dns", event_id="e3")])
    finally:
        store.close()
    summary = runner.summarize(settings, 3, {(0, 0), (0, 1), (0, 2)}, 0, 1.0, True, run=RUN)
    assert summary.sightings == 2 and summary.dead_letters == {"fetch:dns": 1}
    assert summary.run_outcomes == {"sighting": 2, "duplicate": 0, "dead_letter": 1}
    assert summary.run_dead_letters == {"fetch:dns": 1}


# -- end to end -----------------------------------------------------------------

def _picture() -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.radial_gradient("L").convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _Host(http.server.ThreadingHTTPServer):
    """An image host that fails the first request of each picture and
    answers the later ones at once: ``/stall.jpg`` sends its headers, then
    nothing (the fetch's read timeout ends it); ``/drip.jpg`` a byte every
    ``drip_s`` (under the read timeout), so only the whole fetch's timeout
    ends it."""

    daemon_threads = True

    def __init__(self, picture: bytes, drip_s: float):
        self.picture, self.drip_s = picture, drip_s
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Host

    def do_GET(self):
        host = self.server
        with host.lock:
            n = host.hits[self.path] = host.hits.get(self.path, 0) + 1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(host.picture)))
            self.end_headers()
            if n == 1:
                for i in range(len(host.picture)):
                    if host.stop.wait(host.drip_s if self.path == "/drip.jpg" else 60):
                        return
                    self.wfile.write(host.picture[i:i + 1])
                    self.wfile.flush()
                return
            self.wfile.write(host.picture)
        except OSError:  # the fetch gave up on it
            pass

    def log_message(self, *a):
        pass


@pytest.mark.slow
def test_replay_ends_every_event_as_one_outcome(tmp_path):
    """The same line twice in a feed, its first copy's fetch timing out and
    the second getting through, ends as one sighting; a picture still being
    fetched when the stream made no progress for 20 s (the resend's old
    wait) is not sent again, and ends as one dead letter; the summary says
    what the store holds."""
    total_timeout_s = 22.0  # past the old 20 s resend wait, so a resend would come while it is fetched
    host = _Host(_picture(), drip_s=0.3)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        def line(eid: str, path: str) -> str:
            return json.dumps({"schema_version": 1, "event_id": eid, "platform": "x", "account_id": "a1",
                               "posted_at": "2026-05-01T12:00:00Z",
                               "image": {"url": f"http://127.0.0.1:{host.server_address[1]}{path}"}})

        feed = tmp_path / "feed.jsonl"
        # one event at a time, in feed order: each outcome lands in a known order
        feed.write_text("\n".join([line("twice", "/stall.jpg"), line("twice", "/stall.jpg"),
                                   line("slow", "/drip.jpg")]) + "\n")
        env = {**os.environ, "DEEPWATCH_FETCH__ALLOW_PRIVATE_NETWORKS": "true",
               "DEEPWATCH_FETCH__TOTAL_TIMEOUT_S": str(total_timeout_s), "DEEPWATCH_FETCH__READ_TIMEOUT_S": "1",
               "DEEPWATCH_FETCH__RETRIES": "0", "DEEPWATCH_INGEST__FETCH_CONCURRENCY": "1"}
        env.pop("DEEPWATCH_DATA_DIR", None)
        data = tmp_path / "data"
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "streams.cli", "replay", str(feed), "--data-dir", str(data),
                            "--workers", "1", "--no-wait-models", "--format", "json", "--timeout", "150"],
                           env=env, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parent.parent)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout)
    finally:
        host.stop.set()
        host.shutdown()
    assert time.monotonic() - started > total_timeout_s  # the slow picture's fetch ran its course
    assert host.hits == {"/stall.jpg": 2, "/drip.jpg": 1}, "an event still being fetched was sent again"

    from streams.store import open_store

    store = open_store(data)
    try:
        outcomes: dict[str, list[str]] = {}
        for s in store.sightings():
            outcomes.setdefault(s.event_id, []).append("sighting")
        for d in store.dead_letters():
            outcomes.setdefault(d.event_id, []).append(f"{d.stage}:{d.reason}")
    finally:
        store.close()
    assert outcomes == {"twice": ["sighting"], "slow": ["fetch:timeout"]}
    assert summary["events"] == 3 and summary["complete"] is True
    assert summary["sightings"] == 1 and summary["dead_letters"] == {"fetch:timeout": 1}
    assert summary["run_outcomes"] == {"sighting": 1, "duplicate": 1, "dead_letter": 1}
    assert summary["run_dead_letters"] == {"fetch:timeout": 1}


def test_a_row_stored_before_dead_letters_carried_a_digest_is_replaced_by_its_events_later_failure(store):
    # rows of older versions are keyed event/stage/reason, without the message's digest
    old = _dead(0).model_copy(update={"payload_sha256": None})
    assert store.add_dead_letters([old]) == 1
    assert store.add_dead_letters([_dead(5, "host_unavailable", minute=1)]) == 1
    assert _outcomes(store) == (0, [("e1", "fetch", "host_unavailable")])
