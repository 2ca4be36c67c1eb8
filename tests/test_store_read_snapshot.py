"""A cluster read of the SQLite findings store is made of several statements
(merges, sighting counts, first/last seen, members, cluster rows). In WAL mode
each autocommit statement sees the file as of its own start, so a writer
committing between two of them gave a record that was never stored: a
``last_seen`` newer than its sighting count, a cluster without its members.
Here a second connection commits between each pair of statements of a real
read, and the record read must be the store as it was before that commit or
as it is after it, never a mix."""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta

import pytest

from detectors.base import Evidence
from streams.records import ClusterSnapshot, Engagement, ImageEvent, Member, Sighting, SourceRef, Velocity
from streams.store import SqliteFindingsStore
from tests.findings_fixture import T0, TOPIC, fill


def _sighting(eid: str, sha: str, account: str, platform: str, minute: int, offset: int) -> Sighting:
    ev = ImageEvent(event_id=eid, platform=platform, account_id=account, posted_at=T0 + timedelta(minutes=minute),
                    post_url=f"https://{platform}.example/{eid}", image={"path": f"{eid}.jpg"})
    return Sighting(event=ev, source=SourceRef(topic=TOPIC, partition=0, offset=offset), sha256=sha, width=64,
                    height=64, format="PNG", hashes={"phash": f"{offset:016x}", "pdq": f"{offset:064x}",
                                                     "pdq_quality": 100})


def _member(s: Sighting) -> Member:
    return Member(sha256=s.sha256, phash=s.hashes.phash, pdq=s.hashes.pdq, pdq_quality=s.hashes.pdq_quality,
                  event_id=s.event.event_id, width=64, height=64, format="PNG")


def _snap(cid: str, revision: int, members: list[Member], n: int, new: Sighting) -> ClusterSnapshot:
    return ClusterSnapshot(
        cluster_id=cid, revision=revision, fake_score=0.9, verdict="likely-ai",
        evidence=[Evidence(detector="metadata", score=0.9, detail="later")], members=members, sightings=n,
        accounts=n, platforms=[new.event.platform], engagement=Engagement(), velocity=Velocity(sightings_5m=n),
        first_seen=T0, last_seen=new.event.posted_at, new_sighting=new)


def _later_commit() -> list[ClusterSnapshot]:
    """One batch (one commit): a fourth sighting of c-fire, by a new account
    on a new platform, an hour after the others and with a new picture; and
    a new cluster with its sighting and member."""
    fire = _sighting("e-late", "e" * 64, "u-late", "mastodon", 60, 100)
    new = _sighting("e-new", "f" * 64, "u-new", "x", 61, 101)
    return [_snap("c-fire", 10, [_member(fire)], 4, fire), _snap("c-new", 1, [_member(new)], 1, new)]


READS = {
    "cluster": lambda store: store.cluster("c-fire"),
    "clusters": lambda store: store.clusters(),
    "top clusters": lambda store: store.clusters(limit=2),
    "recent clusters": lambda store: store.recent_clusters(),
}


def _statements(tmp_path, read) -> int:
    """How many ``_select`` calls one ``read`` makes (each one statement or more)."""
    store = SqliteFindingsStore(tmp_path / "count" / "findings.sqlite")
    fill(store)
    calls = []
    plain = store._select

    def counted(sql, ids, args=()):
        calls.append(sql)
        yield from plain(sql, ids, args)

    store._select = counted
    read(store)
    store.close()
    return len(calls)


@pytest.mark.parametrize("name", sorted(READS))
def test_a_commit_between_the_statements_of_a_read_is_all_in_it_or_not_at_all(tmp_path, name):
    read = READS[name]
    n = _statements(tmp_path, read)
    assert n >= 3  # merges, counts, members, rows: several statements to commit between
    for k in range(n):
        path = tmp_path / str(k) / "findings.sqlite"
        store = SqliteFindingsStore(path)
        fill(store)
        writer = SqliteFindingsStore(path)  # a connection of its own, as another worker's
        before = read(store)
        plain, calls, commit_s = store._select, [], []

        def select(sql, ids, args=(), k=k, plain=plain, calls=calls, commit_s=commit_s, writer=writer):
            yield from plain(sql, ids, args)
            calls.append(sql)
            if len(calls) == k + 1:  # after the k-th statement, before the next
                t = time.monotonic()
                writer.apply_snapshots(_later_commit())
                commit_s.append(time.monotonic() - t)

        store._select = select
        during = read(store)
        store._select = plain
        after = read(store)
        assert commit_s, "the writer never committed inside the read"
        # a read in progress must not hold the writer up (busy_timeout is 30 s)
        assert commit_s[0] < 5
        assert after != before  # the commit changed what the read answers
        assert during in (before, after), (
            f"{name}: a commit after statement {k + 1} of {n} ({calls[k][:60]!r}) gave a record that was never stored")
        writer.close()
        store.close()


def test_the_commit_is_read_whole_after_the_read(tmp_path):
    """What the test above compares against: the later commit, read whole."""
    store = SqliteFindingsStore(tmp_path / "findings.sqlite")
    fill(store)
    writer = SqliteFindingsStore(tmp_path / "findings.sqlite")
    writer.apply_snapshots(_later_commit())
    fire = store.cluster("c-fire")
    assert (fire.sightings, fire.accounts, fire.platforms) == (4, 4, ["bluesky", "mastodon", "x"])
    assert fire.last_seen == (T0 + timedelta(minutes=60)).isoformat()
    assert "e" * 64 in {m.sha256 for m in fire.members}
    new = store.cluster("c-new")
    assert new.sightings == 1 and [m.sha256 for m in new.members] == ["f" * 64]
    writer.close()
    store.close()


def test_a_failed_read_leaves_no_snapshot_open(tmp_path):
    """A read that raises between its statements ends its transaction: the
    next read sees later commits, and a checkpoint can pass every snapshot
    (it could not past a read left open)."""
    path = tmp_path / "findings.sqlite"
    store = SqliteFindingsStore(path)
    fill(store)
    plain = store._select

    def failing(sql, ids, args=()):
        yield from plain(sql, ids, args)
        raise RuntimeError("lost between two statements")

    store._select = failing
    with pytest.raises(RuntimeError, match="lost between"):
        store.cluster("c-fire")
    store._select = plain
    writer = SqliteFindingsStore(path)
    writer.apply_snapshots(_later_commit())
    assert store.cluster("c-fire").sightings == 4
    probe = sqlite3.connect(path, timeout=5)
    busy, _log, _done = probe.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    probe.close()
    writer.close()
    store.close()
