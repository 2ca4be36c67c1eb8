"""A small, realistic findings history written through the sink interface:
three pictures, one merge, texts, hashtags, accounts, platforms and times.
Every store backend is filled with exactly this and must answer the same."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from detectors.base import Evidence
from streams.records import (
    Alert, ClusterSnapshot, DeadLetter, Engagement, ImageEvent, Member, Sighting, SourceRef, Velocity,
)

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)
TOPIC = "deepwatch.events"
SHA = {name: (name * 64)[:64] for name in ("a", "b", "c", "d")}

# (event id, cluster, picture, account, handle, platform, minute, text, hashtags)
POSTS = [
    ("e1", "c-fire", "a", "u1", "@newsbot", "x", 0, "Huge fire at the harbour right now", ["Breaking", "fire"]),
    ("e2", "c-fire", "a", "u2", "@citydesk", "x", 1, "Harbour fire spreading, stay away", ["breaking"]),
    ("e3", "c-fire", "a", "u3", None, "bluesky", 2, "Is this harbour fire real?", []),
    ("e4", "c-pope", "b", "u4", "@memes", "x", 5, "The pope in a white puffer jacket", ["AI", "pope"]),
    ("e5", "c-pope", "b", "u5", None, "mastodon", 7, "pope drip", ["pope"]),
    ("e6", "c-flood", "c", "u6", "@weather", "bluesky", 30, "Flooded streets downtown after the storm", ["storm"]),
    # c-flood2 is the same picture recropped; the engine merges it into c-flood
    ("e7", "c-flood2", "d", "u7", None, "x", 40, "storm surge floods the subway", ["storm", "subway"]),
]

SCORES = {"c-fire": (0.91, "likely-ai"), "c-pope": (0.62, "inconclusive"), "c-flood": (0.2, "no-evidence"),
          "c-flood2": (0.2, "no-evidence")}


def _sighting(i: int, post: tuple) -> Sighting:
    eid, _cid, pic, account, handle, platform, minute, text, tags = post
    ev = ImageEvent(event_id=eid, platform=platform, account_id=account, account_handle=handle,
                    posted_at=T0 + timedelta(minutes=minute), text=text, hashtags=tags, lang="en",
                    post_url=f"https://{platform}.example/{eid}", image={"path": f"{pic}.jpg"},
                    engagement=Engagement(likes=i))
    return Sighting(event=ev, source=SourceRef(topic=TOPIC, partition=0, offset=i), sha256=SHA[pic], width=64,
                    height=64, format="PNG",
                    hashes={"phash": f"{i:016x}", "pdq": f"{i:064x}", "pdq_quality": 100})


def _member(sighting: Sighting, distance: int | None = None) -> Member:
    h = sighting.hashes
    return Member(sha256=sighting.sha256, phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality,
                  event_id=sighting.event.event_id, width=64, height=64, format="PNG", distance=distance)


def snapshots() -> list[ClusterSnapshot]:
    """What the cluster engine would publish, in publication order."""
    out: list[ClusterSnapshot] = []
    members: dict[str, list[Member]] = {}
    revision: dict[str, int] = {}
    seen: dict[str, list[Sighting]] = {}
    for i, post in enumerate(POSTS):
        cid = post[1]
        s = _sighting(i, post)
        seen.setdefault(cid, []).append(s)
        if s.sha256 not in {m.sha256 for m in members.get(cid, [])}:
            members.setdefault(cid, []).append(_member(s))
        revision[cid] = revision.get(cid, 0) + 1
        out.append(_snap(cid, revision[cid], members[cid], seen[cid], new=s))
    # the merge: c-flood2 folds into c-flood
    revision["c-flood2"] += 1
    out.append(_snap("c-flood2", revision["c-flood2"], members["c-flood2"], seen["c-flood2"], merged_into="c-flood"))
    revision["c-flood"] += 1
    out.append(_snap("c-flood", revision["c-flood"], members["c-flood"] + members["c-flood2"],
                     seen["c-flood"] + seen["c-flood2"], merged_from=["c-flood2"]))
    return out


def _snap(cid: str, rev: int, members: list[Member], seen: list[Sighting], *, new: Sighting | None = None,
          merged_into: str | None = None, merged_from: list[str] | None = None) -> ClusterSnapshot:
    score, verdict = SCORES[cid]
    times = [s.event.posted_at for s in seen]
    return ClusterSnapshot(
        cluster_id=cid, revision=rev, fake_score=score, verdict=verdict,
        evidence=[Evidence(detector="metadata", score=score, detail=f"{cid} evidence", weight=2.0)],
        members=list(members), sightings=len(seen), accounts=len({s.event.account_id for s in seen}),
        platforms=sorted({s.event.platform for s in seen}), engagement=Engagement(likes=len(seen)),
        velocity=Velocity(sightings_5m=len(seen) * {"c-fire": 3, "c-flood": 2}.get(cid, 1), sightings_1h=len(seen)),
        first_seen=min(times), last_seen=max(times), merged_into=merged_into, merged_from=merged_from or [],
        alert_level=1 if cid == "c-fire" and len(seen) >= 3 else 0, new_sighting=new,
    )


def alerts() -> list[Alert]:
    return [Alert(alert_id="c-fire:1", cluster_id="c-fire", rule="viral_fake", level=1, fake_score=0.91,
                  verdict="likely-ai", velocity=Velocity(sightings_5m=9), sightings=3, accounts=3,
                  evidence=[Evidence(detector="metadata", score=0.91, detail="c-fire evidence")],
                  at=T0 + timedelta(minutes=2), trigger_event_id="e3", created_at=T0 + timedelta(minutes=2))]


def dead_letters() -> list[DeadLetter]:
    return [DeadLetter(event_id="bad-1", stage="fetch", reason="fetch_blocked", detail="private address",
                       source=SourceRef(topic=TOPIC, partition=0, offset=len(POSTS)), at=T0)]


def fill(store) -> None:
    """Write the history through the sink methods, with one stale snapshot
    replayed out of order (must change nothing)."""
    snaps = snapshots()
    for snap in snaps:
        store.apply_snapshot(snap)
    store.apply_snapshot(snaps[0])  # stale revision 1 of c-fire, redelivered
    for a in alerts():
        store.add_alert(a)
    for d in dead_letters():
        store.add_dead_letter(d)


def filled_store(request, tmp_path, kind: str, write=fill):
    """A findings store of ``kind`` ("sqlite", or "es" on the loopback fake
    Elasticsearch) that ``write`` filled, closed after the test: the body
    of a fixture parametrized over both stores (``yield from``)."""
    if kind == "sqlite":
        from streams.store import SqliteFindingsStore

        s = SqliteFindingsStore(tmp_path / "findings.sqlite")
        write(s)
    else:
        from streams.es_store import EsFindingsStore

        s = EsFindingsStore.from_url(request.getfixturevalue("fake_es").url)
        write(s)
        s.flush()
    yield s
    s.close()


def stored_findings(request, tmp_path, kind: str, write=fill):
    """(data dir, store URL: None for the data dir's SQLite file) of a store
    ``filled_store`` wrote and closed: what a desk or CLI test opens."""
    for _ in filled_store(request, tmp_path, kind, write):
        pass
    return tmp_path, request.getfixturevalue("fake_es").url if kind == "es" else None
