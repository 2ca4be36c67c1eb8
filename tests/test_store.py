"""SqliteFindingsStore: every write is an idempotent upsert, so redelivery and
replay change nothing, and merges are resolved when reading."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from detectors.base import Evidence
from detectors.hashing import ImageHashes
from streams.es_docs import sighting_doc
from streams.cluster_search import ClusterQuery
from streams.findings import DeliveryState
from streams.records import (
    MAX_TEXT_CHARS, Alert, ClusterSnapshot, DeadLetter, Engagement, ImageEvent, Member, Sighting, SourceRef, Velocity,
)
from streams.store import SqliteFindingsStore

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)
TOPIC = "deepwatch.events"


@pytest.fixture
def store(tmp_path):
    s = SqliteFindingsStore(tmp_path / "findings.sqlite")
    yield s
    s.close()


def _sighting(event_id: str, sha: str, offset: int, account: str = "acct-1", platform: str = "x", minute: int = 0) -> Sighting:
    ev = ImageEvent(
        event_id=event_id, platform=platform, account_id=account, posted_at=T0 + timedelta(minutes=minute),
        image={"path": f"{sha[:6]}.jpg"},
    )
    return Sighting(
        event=ev, source=SourceRef(topic=TOPIC, partition=0, offset=offset), sha256=sha, width=8, height=8,
        format="PNG", hashes=ImageHashes(phash="0" * 16, pdq="0" * 64, pdq_quality=100),
    )


def _snap(cid: str, revision: int, *, sighting: Sighting | None = None, score: float = 0.5,
          merged_into: str | None = None, merged_from: list[str] | None = None, alert_level: int = 0) -> ClusterSnapshot:
    members = []
    if sighting is not None:
        members = [Member(sha256=sighting.sha256, phash="0" * 16, pdq="0" * 64, pdq_quality=100, event_id=sighting.event.event_id)]
    return ClusterSnapshot(
        cluster_id=cid, revision=revision, fake_score=score, verdict="inconclusive",
        evidence=[Evidence(detector="d", score=score, detail=f"rev {revision}")], members=members,
        sightings=revision, accounts=1, platforms=["x"], engagement=Engagement(), velocity=Velocity(sightings_5m=revision),
        first_seen=T0, last_seen=T0 + timedelta(minutes=revision), merged_into=merged_into,
        merged_from=merged_from or [], alert_level=alert_level, new_sighting=sighting,
    )


def _alert(cid: str, level: int = 1) -> Alert:
    return Alert(
        alert_id=f"{cid}:{level}", cluster_id=cid, rule="viral_fake", level=level, fake_score=0.9, verdict="likely-ai",
        velocity=Velocity(sightings_5m=12), sightings=12, accounts=12, evidence=[], at=T0, created_at=T0,
    )


def _dump(store: SqliteFindingsStore) -> dict:
    """Everything a reader can see, minus the write-time column."""
    clusters = [{k: v for k, v in c.as_json().items() if k != "updated_at"} for c in store.clusters(include_merged=True)]
    return {
        "clusters": clusters, "alerts": store.alerts(), "dead": store.dead_letters(),
        "processed": store.processed_offsets(TOPIC), "members": sorted(store.iter_members(), key=lambda m: m.sha256),
        "sightings": store.sighting_times(),
    }


def test_same_snapshot_twice_changes_nothing(store):
    snap = _snap("c1", 1, sighting=_sighting("e1", "a" * 64, 0))
    store.apply_snapshot(snap)
    before = _dump(store)
    store.apply_snapshot(snap)
    assert _dump(store) == before
    [c] = store.clusters()
    assert c.sightings == 1 and c.revision == 1 and len(c.members) == 1
    assert store.processed_offsets(TOPIC) == {(0, 0)}


def test_older_revision_does_not_overwrite_newer(store):
    store.apply_snapshot(_snap("c1", 1, sighting=_sighting("e1", "a" * 64, 0), score=0.2))
    store.apply_snapshot(_snap("c1", 3, sighting=_sighting("e3", "a" * 64, 2), score=0.9))
    # revision 2 arrives late (reordering / replay): its cluster fields are stale...
    store.apply_snapshot(_snap("c1", 2, sighting=_sighting("e2", "b" * 64, 1), score=0.5))
    [c] = store.clusters()
    assert c.revision == 3 and c.fake_score == 0.9
    assert c.evidence[0].detail == "rev 3"
    assert c.velocity.sightings_5m == 3
    # ...but the sighting and member it carried are facts, and are kept.
    assert c.sightings == 3
    assert {m.sha256 for m in c.members} == {"a" * 64, "b" * 64}
    assert store.processed_offsets(TOPIC) == {(0, 0), (0, 1), (0, 2)}


def test_equal_revision_is_not_reapplied(store):
    store.apply_snapshot(_snap("c1", 2, score=0.3))
    store.apply_snapshot(_snap("c1", 2, score=0.8))  # a different body at the same revision: first one wins
    assert store.clusters()[0].fake_score == 0.3


def test_a_batch_ends_as_one_by_one(tmp_path):
    """The sink hands a whole batch to one transaction: stale and equal
    revisions, a merge, and members and sightings of every snapshot end
    exactly as if each snapshot had been applied alone."""
    batch = [
        _snap("c1", 1, sighting=_sighting("e1", "a" * 64, 0), score=0.2),
        _snap("c1", 3, sighting=_sighting("e3", "a" * 64, 2), score=0.9),
        _snap("c1", 2, sighting=_sighting("e2", "b" * 64, 1), score=0.5),  # late, stale fields, new member
        _snap("c2", 1, sighting=_sighting("e4", "c" * 64, 3), score=0.3),
        _snap("c2", 1, score=0.7),  # same revision, other body: the first wins
        _snap("c3", 1, sighting=_sighting("e5", "d" * 64, 4)),
        _snap("c3", 2, merged_into="c1"),
        _snap("c1", 4, merged_from=["c3"], sighting=_sighting("e6", "b" * 64, 5), score=0.95),
    ]
    dumps = []
    for name, apply in (("alone", lambda s, b: [s.apply_snapshot(x) for x in b]), ("batch", lambda s, b: s.apply_snapshots(b))):
        s = SqliteFindingsStore(tmp_path / f"{name}.sqlite")
        apply(s, batch[:5])
        apply(s, batch[5:])
        apply(s, batch)  # redelivered whole
        dumps.append(_dump(s))
        s.close()
    assert dumps[0] == dumps[1]
    clusters = {c["id"]: c for c in dumps[1]["clusters"]}
    assert clusters["c1"]["revision"] == 4 and clusters["c2"]["fake_score"] == 0.3
    assert clusters["c3"]["merged_into"] == "c1" and len(dumps[1]["sightings"]) == 6


def test_same_dead_letter_twice_changes_nothing(store):
    dl = DeadLetter(event_id="evt-x", stage="fetch", reason="blocked_address", detail="127.0.0.1",
                    source=SourceRef(topic=TOPIC, partition=1, offset=7), at=T0)
    assert store.add_dead_letter(dl) is True
    assert store.add_dead_letter(dl) is False
    # a redelivery built anew (new timestamp) is still the same dead letter
    assert store.add_dead_letter(dl.model_copy(update={"at": T0 + timedelta(minutes=5)})) is False
    assert len(store.dead_letters()) == 1
    assert store.processed_offsets(TOPIC) == {(1, 7)}


def test_sourceless_dead_letter_twice_in_one_process(store):
    dl = DeadLetter(event_id="big", stage="validate", reason="too_large", detail="2 MB", payload_excerpt='{"event_id": "big"', at=T0)
    assert store.add_dead_letter(dl) is True
    assert store.add_dead_letter(dl) is False
    assert len(store.dead_letters()) == 1


_ADD_SOURCELESS = """
import sys
from datetime import datetime, timezone
from pathlib import Path
from streams.records import DeadLetter
from streams.store import SqliteFindingsStore
s = SqliteFindingsStore(Path(sys.argv[1]))
s.add_dead_letter(DeadLetter(event_id="big", stage="validate", reason="too_large", detail="2 MB",
                             payload_excerpt='{"event_id": "big"', at=datetime(2026, 11, 20, tzinfo=timezone.utc)))
s.close()
"""


# Regression: the key once used hash(), which Python salts per process, so a
# redelivery handled by another worker (or after a restart) was stored twice.
def test_sourceless_dead_letter_redelivered_to_another_process(tmp_path):
    db = tmp_path / "findings.sqlite"
    repo = Path(__file__).resolve().parents[1]
    for seed in ("1", "2"):  # two worker processes (or one restarted): different hash salts
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _ADD_SOURCELESS, str(db)], check=True, env=env, cwd=repo)
    s = SqliteFindingsStore(db)
    try:
        assert len(s.dead_letters()) == 1
    finally:
        s.close()


def test_same_alert_twice_changes_nothing(store):
    assert store.add_alert(_alert("c1")) is True
    assert store.add_alert(_alert("c1")) is False
    assert store.add_alert(_alert("c1", level=2)) is True
    assert [a.alert_id for a in store.alerts()] == ["c1:1", "c1:2"]


def test_delivery_status_upserts(store):
    assert not store.delivered("c1:1", "https://hook")
    store.mark_delivered("c1:1", "https://hook", DeliveryState.FAILED, "HTTP 500")
    assert not store.delivered("c1:1", "https://hook")
    store.mark_delivered("c1:1", "https://hook", DeliveryState.DELIVERED)
    store.mark_delivered("c1:1", "https://hook", DeliveryState.DELIVERED)
    assert store.delivered("c1:1", "https://hook")
    assert not store.delivered("c1:1", "https://other")
    # a slower attempt that failed, recorded after one that went through
    store.mark_delivered("c1:1", "https://hook", DeliveryState.FAILED, "HTTP 503")
    assert store.delivered("c1:1", "https://hook") and store.failed_deliveries("https://hook") == []


def test_processed_offsets_are_idempotent_and_per_topic(store):
    src = SourceRef(topic=TOPIC, partition=2, offset=9)
    dl = DeadLetter(event_id="e1", stage="fetch", reason="timeout", detail="timed out", source=src)
    store.add_dead_letter(dl)
    store.add_dead_letter(dl)
    assert store.processed_offsets(TOPIC) == {(2, 9)}
    assert store.processed_offsets("other") == set()


def test_one_platform_however_a_producer_spells_it(store):
    """Search compared platforms case-folded while lists counted "X" and "x"
    as two: an event's platform is stored in lower case."""
    store.apply_snapshot(_snap("A", 1, sighting=_sighting("e1", "a" * 64, 0, account="u1", platform="X")))
    store.apply_snapshot(_snap("A", 2, sighting=_sighting("e2", "a" * 64, 1, account="u2", platform=" x ")))
    store.apply_snapshot(_snap("A", 3, sighting=_sighting("e3", "a" * 64, 2, account="u3", platform="BlueSky")))
    [a] = store.clusters()
    assert a.platforms == ["bluesky", "x"]
    assert sorted(s.platform for s in store.cluster_sightings("A")) == ["bluesky", "x", "x"]
    with pytest.raises(ValueError, match="blank"):
        _sighting("e4", "a" * 64, 3, platform="  ")


def test_merged_cluster_sightings_count_toward_survivor(store):
    store.apply_snapshot(_snap("A", 1, sighting=_sighting("e1", "a" * 64, 0, account="u1", platform="x")))
    store.apply_snapshot(_snap("B", 1, sighting=_sighting("e2", "b" * 64, 1, account="u2", platform="bsky", minute=5)))
    store.apply_snapshot(_snap("B", 2, sighting=_sighting("e3", "b" * 64, 2, account="u3", platform="bsky", minute=9)))
    # B is merged into A: B's sightings keep B's id in the table, readers resolve it.
    store.apply_snapshot(_snap("B", 3, merged_into="A"))
    store.apply_snapshot(_snap("A", 2, merged_from=["B"]))

    [a] = store.clusters()
    assert a.id == "A"
    assert a.sightings == 3 and a.accounts == 3
    assert a.platforms == ["bsky", "x"]
    assert a.first_seen < a.last_seen and a.last_seen.startswith("2026-11-20T10:09")
    assert {m.sha256 for m in a.members} == {"a" * 64, "b" * 64}
    assert a.merged_from == ["B"]

    merged = {c.id: c for c in store.clusters(include_merged=True)}
    assert merged["B"].merged_into == "A" and merged["B"].members == []
    assert {m.cluster_id for m in store.iter_members()} == {"A"}


def test_merge_chains_resolve_to_final_survivor(store):
    store.apply_snapshot(_snap("A", 1, sighting=_sighting("e1", "a" * 64, 0)))
    store.apply_snapshot(_snap("B", 1, sighting=_sighting("e2", "b" * 64, 1)))
    store.apply_snapshot(_snap("C", 1, sighting=_sighting("e3", "c" * 64, 2)))
    store.apply_snapshot(_snap("C", 2, merged_into="B"))
    store.apply_snapshot(_snap("B", 2, merged_into="A"))
    [a] = store.clusters()
    assert a.id == "A" and a.sightings == 3
    assert {m.cluster_id for m in store.iter_members()} == {"A"}


def test_store_shared_by_two_connections(tmp_path):
    # Several worker processes share the file; a second connection sees writes.
    path = tmp_path / "f.sqlite"
    w, r = SqliteFindingsStore(path), SqliteFindingsStore(path)
    try:
        w.apply_snapshot(_snap("c1", 1, sighting=_sighting("e1", "a" * 64, 0)))
        w.add_alert(_alert("c1"))
        assert [c.id for c in r.clusters()] == ["c1"]
        assert len(r.alerts()) == 1
    finally:
        w.close()
        r.close()


def test_pending_work_counts_unstored_alerts(store):
    store.apply_snapshot(_snap("c1", 1, alert_level=1))
    assert store.pending_work()["alerts"] == 1
    store.add_alert(_alert("c1"))
    assert store.pending_work()["alerts"] == 0


@pytest.mark.parametrize("opener", ["streams.store:open_store", "streams.engine_state:open_engine_state"])
def test_many_processes_open_a_fresh_store_at_once(tmp_path, opener):
    """Workers start side by side on a new data dir: none may fail to open the
    findings store or the cluster engine's own state."""
    import subprocess
    import sys

    import time

    module, func = opener.split(":")
    # Every process imports first, then all open the same new file at one instant.
    code = (
        f"import sys, time; from {module} import {func}; "
        f"time.sleep(max(0.0, float(sys.argv[2]) - time.time())); {func}(sys.argv[1]).close()"
    )
    for attempt in range(3):
        data = tmp_path / f"run{attempt}"
        start = str(time.time() + 3.0)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(data), start], stderr=subprocess.PIPE) for _ in range(12)]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 12, "\n".join(e for e in errors if e)


def test_snapshots_on_the_wire_leave_engine_state_out(store):
    """Thumbnails and content boxes are engine state: a snapshot on the topic
    carries everything the sinks store and nothing of them."""
    s = _sighting("e1", "a" * 64, 0)
    s = s.model_copy(update={"hashes": s.hashes.model_copy(update={"thumb": "QUJD" * 300, "views": ["1" * 16] * 25})})
    member = Member(sha256="a" * 64, phash="0" * 16, pdq="0" * 64, pdq_quality=100, event_id="e1",
                    representative=True, views=["2" * 16] * 3, thumb="QUJD" * 300, content_box=(0.0, 0.1, 1.0, 0.9))
    snap = _snap("c1", 1, sighting=s).model_copy(update={"members": [member]})
    raw = snap.dumps()
    assert b"QUJD" not in raw and len(raw) < len(snap.model_dump_json())
    back = ClusterSnapshot.loads(raw)
    assert back.members[0].thumb is None and back.members[0].content_box is None
    assert back.members[0].views == ["2" * 16] * 3 and back.new_sighting.hashes.views is None
    assert back.model_dump(exclude={"members", "new_sighting"}) == snap.model_dump(exclude={"members", "new_sighting"})
    store.apply_snapshot(back)
    [m] = store.iter_members()
    assert m.views == ["2" * 16] * 3


def test_a_long_post_text_is_stored_and_searched_whole(store):
    """Validation keeps up to MAX_TEXT_CHARS (10,000) of a post's text; the
    store and the Elasticsearch document keep all of it, the FTS index too."""
    text = "lorem " * 1500 + "needlewordhere " + "ipsum " * 1000
    s = _sighting("e1", "a" * 64, 0)
    s = s.model_copy(update={"event": ImageEvent.model_validate({**s.event.model_dump(), "text": text + "x" * 20_000})})
    assert len(s.event.text) == MAX_TEXT_CHARS and "needlewordhere" in s.event.text[9000:]
    store.apply_snapshot(_snap("c1", 1, sighting=s))
    [stored] = store.sightings()
    assert stored.text == s.event.text
    assert [c.id for c in store.search(ClusterQuery(text="needlewordhere"))] == ["c1"]
    assert sighting_doc("c1", s)["text"] == s.event.text


def test_first_and_last_seen_compare_instants_not_texts(store):
    """Posts keep the UTC offset they gave. first/last seen were the least
    and greatest ``posted_at`` as text: 12:00+05:00 (07:00 UTC) came after
    10:00Z, so the earlier post was shown as the last one."""
    early = _sighting("early", "a" * 64, 0)
    late = _sighting("late", "b" * 64, 1)
    early.event.posted_at = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=5)))
    late.event.posted_at = datetime(2024, 1, 1, 10, 0, tzinfo=timezone.utc)
    merged = _sighting("merged", "c" * 64, 2)
    merged.event.posted_at = datetime(2024, 1, 1, 5, 0, tzinfo=timezone(timedelta(hours=-6)))  # 11:00 UTC
    store.apply_snapshots([_snap("c", 1, sighting=early), _snap("c", 2, sighting=late),
                           _snap("d", 1, sighting=merged), _snap("d", 2, merged_into="c"),
                           _snap("c", 3, merged_from=["d"])])
    c = store.cluster("c")
    assert (c.first_seen, c.last_seen) == ("2024-01-01T12:00:00+05:00", "2024-01-01T05:00:00-06:00")


def test_keys_and_hashtags_are_the_ones_both_stores_always_wrote(store):
    """Both stores now share one dead-letter key and one hashtag rule
    (``streams.findings``): the keys already stored must not change."""
    import hashlib

    from streams.es_docs import dead_letter_key, hashtags

    named = DeadLetter(event_id="e1", stage="fetch", reason="timeout", detail="d")
    anonymous = DeadLetter(stage="validate", reason="malformed_json", detail="d", payload_excerpt="{oops")
    long_id = DeadLetter(event_id="é" * 256, stage="validate", reason="schema_violation", detail="d")
    store.add_dead_letters([named, anonymous, long_id])
    keys = sorted(k for k, in store._db.execute("SELECT dl_key FROM dead_letters"))
    digest = hashlib.sha256(b"{oops").hexdigest()
    assert keys == sorted(["e1/fetch/timeout", f"sha256:{digest}/validate/malformed_json",
                           "é" * 256 + "/validate/schema_violation"])
    assert dead_letter_key(named) == "e1/fetch/timeout"
    assert dead_letter_key(long_id) == "sha256:" + hashlib.sha256(
        ("é" * 256 + "/validate/schema_violation").encode()).hexdigest()  # over 512 bytes: an _id digest
    s = _sighting("e2", "d" * 64, 3)
    s.event.hashtags = ["#Fire", "fire", " ", "#", "Harbour ", "#harbour", "news"]
    store.apply_snapshots([_snap("c", 1, sighting=s)])
    assert store._db.execute("SELECT hashtags FROM sightings WHERE event_id='e2'").fetchone()[0] == "fire harbour news"
    assert hashtags(s.event) == ["fire", "harbour", "news"]


def test_reading_a_few_clusters_resolves_their_merges_without_reading_every_cluster(tmp_path):
    # By-id reads (the desk's old cluster pages, its incremental refresh) read
    # every cluster's merge first: seconds at millions of clusters. Now only
    # the chains above and below the clusters asked for, with the same answer.
    import random

    db = SqliteFindingsStore(tmp_path / "findings.sqlite")
    rng = random.Random(7)
    ids = [f"c{i:03d}" for i in range(300)]
    into: dict[str, str | None] = {}
    for i, cid in enumerate(ids):  # a forest of merge chains: each cluster merged into an older one, or live
        into[cid] = rng.choice(ids[:i]) if i and rng.random() < 0.6 else None
    with db._db:
        db._db.executemany(
            "INSERT INTO clusters (cluster_id, revision, fake_score, verdict, evidence, velocity, platforms, engagement, "
            "stream_sightings, first_seen, last_seen, merged_into, merged_from, models_pending) VALUES "
            "(?, 1, 0.5, 'no-evidence', '[]', '{}', '[]', '{}', 0, '2026-11-20T10:00:00Z', '2026-11-20T10:00:00Z', ?, "
            "'[]', 0)", list(into.items()))
    everything = db._roots()
    for sample in (rng.sample(ids, 1) for _ in range(30)), (rng.sample(ids, 12) for _ in range(10)):
        for asked in sample:
            around = db._roots_around(set(asked))
            needed = set(asked) | {c for c, root in everything.items() if root in asked}
            assert needed <= around.keys()
            assert all(around[c] == everything[c] for c in around)  # the same survivors, each
    statements = []
    db._db.set_trace_callback(statements.append)
    db._roots_around({"c299"})
    assert statements and not any(s.strip().endswith("FROM clusters") for s in statements)  # no full read
    db.close()


# -- opening errors judged by SQLite's result code (sqlite_errorname), each provoked for real --------------------
def _damaged_page(path: Path) -> None:
    SqliteFindingsStore(path).close()
    raw = bytearray(path.read_bytes())
    raw[100:108] = b"\xff" * 8  # the schema table's page header (after the file header): page 1 unreadable
    path.write_bytes(bytes(raw))


def _damaged_schema(path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE clusters (cluster_id TEXT PRIMARY KEY)")
    db.commit()
    db.close()
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"CREATE TABLE clusters", b"CREATX TABLE clusters"))


@pytest.mark.parametrize("damage, code", [
    (lambda p: p.write_bytes(b"this is a text file, not a database\n" * 200), "SQLITE_NOTADB"),
    (_damaged_page, "SQLITE_CORRUPT"),
    (_damaged_schema, "SQLITE_CORRUPT"),
])
def test_a_damaged_store_file_is_said_to_be_unreadable_by_its_result_code(tmp_path, damage, code):
    from streams.store import StoreError

    path = tmp_path / "findings.sqlite"
    damage(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as e:
        SqliteFindingsStore(path).close()
    assert e.value.sqlite_errorname == code
    assert "is not a readable SQLite database" in str(e.value) and "move it aside" in str(e.value), str(e.value)
    assert path.read_bytes() == before


def test_an_error_whose_words_sound_like_damage_is_not_called_damage(tmp_path, monkeypatch):
    # SQLite's "malformed JSON" is an SQLITE_ERROR of a statement, not a damaged
    # file: told "move it aside", an operator would set a good store aside.
    import sqlite3

    from streams.store import StoreError

    path = tmp_path / "findings.sqlite"
    SqliteFindingsStore(path).close()

    def migrate(self, version):
        self._db.execute("SELECT json('{')")  # raised by SQLite itself

    monkeypatch.setattr(SqliteFindingsStore, "_migrate", migrate)
    with pytest.raises(StoreError) as e:
        SqliteFindingsStore(path)
    assert e.value.sqlite_errorname == "SQLITE_ERROR" and "malformed JSON" in str(e.value)
    assert "not a readable SQLite database" not in str(e.value) and "move it aside" not in str(e.value), str(e.value)
    assert "write access" not in str(e.value)
    with pytest.raises(sqlite3.OperationalError):  # the store itself is fine: only the statement failed
        sqlite3.connect(path).execute("SELECT json('{')")
    monkeypatch.undo()
    SqliteFindingsStore(path).close()


def test_a_store_in_a_read_only_directory_names_its_code_and_the_fix(tmp_path):
    """Permissions do not bind root: as root the store opens as the
    unprivileged ``nobody`` (setpriv), in a directory nobody may read but not
    write, holding a store it may not write either."""
    import json
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="deepwatch-ro-"))
    try:
        shared.chmod(0o755)
        data = shared / "data"
        data.mkdir()
        SqliteFindingsStore(data / "findings.sqlite").close()
        for p in data.iterdir():
            p.chmod(0o444)
        data.chmod(0o555)
        prefix: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot open the store as an unprivileged user")
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        code = ("import json, sys\nfrom streams.store import SqliteFindingsStore, StoreError\n"
                "try:\n    SqliteFindingsStore(sys.argv[1]).close()\n    print(json.dumps(None))\n"
                "except StoreError as e:\n    print(json.dumps([e.sqlite_errorname, str(e)]))\n")
        r = subprocess.run([*prefix, sys.executable, "-c", code, str(data / "findings.sqlite")], capture_output=True,
                           text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        if r.returncode != 0 and "Permission denied" in r.stderr:
            pytest.skip("the checkout is not readable by an unprivileged user")
        assert r.returncode == 0, r.stderr[-2000:]
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        assert answer is not None, "the store opened in a read-only directory"
        name, message = answer
        # measured here: SQLITE_READONLY_DIRECTORY, an extended code (judged by its primary one)
        assert name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")), answer
        assert "deepwatch needs write access to the file and its directory" in message, message
    finally:
        for p in [shared, *shared.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(shared)


def test_the_sqlite_store_says_what_it_offers_beyond_the_interface_by_its_type(store):
    """Readers check a store's optional capabilities by type (isinstance of a
    runtime-checkable Protocol), not by looking up attribute names: SQLite
    has a change counter and keyed members in a file, no kNN of its own, and
    its set-up before the first write is nothing (its tables exist once it opens)."""
    from streams.findings import (
        CandidateNominator, ChangeCounter, FindingsStore, KeyedMemberReader, MemberIndexFile, StoreSetup,
    )

    assert isinstance(store, FindingsStore)
    assert isinstance(store, ChangeCounter) and isinstance(store, KeyedMemberReader)
    assert isinstance(store, MemberIndexFile) and store.path.is_file()
    assert not isinstance(store, CandidateNominator)
    setup: StoreSetup = store
    setup.ensure_setup()
    store.apply_snapshot(_snap("c1", 1))
    assert store.cluster("c1") is not None
