"""The single-writer cluster engine, without Kafka: assignment, counting,
redelivery, merges and alert rules."""

from __future__ import annotations

from datetime import timedelta

from PIL import Image

from detectors.base import Evidence
from detectors.hashing import ImageHashes, compute_hashes
from detectors.imagedata import ImageData
from streams.clustering import SCHEMA_VERSION, ClusterEngine, ClusterState
from streams.demo_feed import BASE_TIME, jpeg_bytes, scene
from streams.records import ClusterOp, DetectionResult, ImageEvent, Sighting, SourceRef
from streams.settings import Settings


def sighting(img: Image.Image, eid: str, minute: float, account: str = "a", evidence=(), quality: int = 90) -> Sighting:
    data = jpeg_bytes(img, quality)
    im = ImageData(data)
    ev = ImageEvent.model_validate({
        "event_id": eid, "platform": "x", "account_id": account, "posted_at": (BASE_TIME + timedelta(minutes=minute)).isoformat(),
        "image": {"url": "https://img.example/x.jpg"},
    })
    return Sighting(
        event=ev, source=SourceRef(topic="events", partition=0, offset=0), sha256=im.sha256,
        width=im.size[0], height=im.size[1], format=im.format, hashes=compute_hashes(im),
        evidence=[e.model_copy(update={"sha256": im.sha256}) for e in evidence],
    )


AI = Evidence(detector="generator-metadata", score=0.99, weight=5.0, detail="A1111 parameters chunk")


class Harness:
    """Applies ops like the Faust agent does: persist writes, count offsets."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.engine = ClusterEngine(self.settings)
        self.table: dict[str, bytes] = {}
        self.offset = 0
        self.alerts = []
        self.requests = []

    def get(self, cid: str) -> ClusterState | None:
        raw = self.table.get(cid)
        return ClusterState.loads(raw) if raw else None

    def apply(self, op: ClusterOp, offset: int | None = None):
        if offset is None:
            offset, self.offset = self.offset, self.offset + 1
        out = self.engine.apply(op, offset, self.get)
        for cid, st in out.writes.items():
            self.table[cid] = st.dumps()
        self.alerts += out.alerts
        self.requests += out.detect_requests
        return out

    def see(self, s: Sighting, offset: int | None = None):
        return self.apply(ClusterOp(kind="sighting", sighting=s), offset)


def test_reposts_join_one_cluster_and_count_once_per_event():
    h = Harness()
    pic = scene(1)
    first = h.see(sighting(pic, "e1", 0, "a1", [AI]))
    cid = first.snapshots[-1].cluster_id
    h.see(sighting(pic.resize((384, 256)), "e2", 1, "a2"))
    h.see(sighting(pic, "e3", 2, "a3", quality=60))
    dup = h.see(sighting(pic, "e3", 2, "a3", quality=60))  # producer retry: same event id
    other = h.see(sighting(scene(2), "e4", 3, "a4"))
    assert dup.duplicate_event
    assert other.snapshots[-1].cluster_id != cid
    st = h.get(cid)
    assert st.sightings == 3 and len(st.members) == 3 and sorted(st.accounts) == ["a1", "a2", "a3"]
    assert st.verdict == "likely-ai" and st.fake_score >= 0.9  # evidence of the original raises the cluster


def test_an_event_resent_with_another_time_counts_once():
    # An event id names one post: a resend claiming another posted_at (a feed
    # written twice, a platform correcting the time) was counted as a second
    # sighting, while the findings store kept one (its key is the event id).
    h = Harness()
    pic = scene(1)
    cid = h.see(sighting(pic, "e1", 0, "a1")).snapshots[-1].cluster_id
    h.see(sighting(pic, "e2", 1, "a2"))
    again = h.see(sighting(pic, "e1", 7, "a1"))
    assert again.duplicate_event
    st = h.get(cid)
    assert st.sightings == 2 and len(st.recent) == 2 and st.engagement.total == 0


def test_redelivered_op_is_not_applied_twice_but_outputs_are_reemitted():
    h = Harness(Settings(alerts={"min_sightings_5m": 2}))
    pic = scene(3)
    h.see(sighting(pic, "e1", 0, "a1", [AI]), offset=10)
    s2 = sighting(pic, "e2", 1, "a2")
    h.see(s2, offset=11)
    assert len(h.alerts) == 1
    again = h.see(s2, offset=11)  # crash before commit: the same op comes back
    assert again.already_applied
    st = h.get(again.snapshots[-1].cluster_id)
    assert st.sightings == 2
    assert [a.alert_id for a in again.alerts] == [h.alerts[0].alert_id]  # same id: idempotent downstream


def hashed(s: Sighting, phash: int, pdq_bits: int = 0) -> Sighting:
    """The same sighting with a chosen pHash and PDQ (its lowest ``pdq_bits``
    set, trusted), to put pictures at exact Hamming distances from each other."""
    return s.model_copy(update={"sha256": f"{phash:064x}", "hashes": ImageHashes(
        phash=f"{phash:016x}", pdq=f"{(1 << pdq_bits) - 1:064x}", pdq_quality=90)})


def test_image_linking_two_clusters_merges_them_and_counts_add_up():
    h = Harness(Settings(dedupe={"phash_threshold": 10}))
    pic = scene(5)
    a = h.see(hashed(sighting(pic, "e1", 0, "a1", [AI]), 0)).snapshots[-1].cluster_id
    b = h.see(hashed(sighting(pic, "e2", 1, "a2"), 0xFFFFF, 40)).snapshots[-1].cluster_id  # 20 / 40 bits away
    assert a != b
    out = h.see(hashed(sighting(pic, "e3", 2, "a3"), 0x3FF, 20))  # 10 / 20 bits from each: both hashes link them
    survivor = out.snapshots[-1]
    merged = [s for s in out.snapshots if s.merged_into]
    assert len(merged) == 1 and merged[0].merged_into == survivor.cluster_id
    assert {survivor.cluster_id, merged[0].cluster_id} == {a, b}
    assert survivor.sightings == 3 and survivor.merged_from == [merged[0].cluster_id]
    assert len(survivor.members) == 3 and survivor.verdict == "likely-ai"  # evidence travels with the merge
    audit = h.get(survivor.cluster_id).merges
    assert [(m.other, m.link_sha256, m.into_phash, m.into_pdq) for m in audit] == [(merged[0].cluster_id, f"{0x3FF:064x}", 10, 20)]
    # Ops addressed to the merged cluster land in the survivor.
    later = h.see(hashed(sighting(pic, "e4", 3, "a4"), 0xFFFFF, 40))
    assert later.snapshots[-1].cluster_id == survivor.cluster_id


def test_ops_read_again_after_a_crash_send_every_alert_they_raised_not_only_the_last():
    # The stage writes a batch's states before it sends the batch's alerts: a
    # worker killed in between came back, read the batch again and sent only
    # the cluster's last alert, so the levels before it in that batch were
    # never stored nor delivered (crash audit: levels 1-5 of 8 lost).
    h = Harness(Settings(alerts={"min_sightings_5m": 3, "escalation_factor": 2.0}))
    pic = scene(7)
    ops = [sighting(pic, "e0", 0, "a0", [AI])] + [sighting(pic, f"e{i}", i * 0.2, f"a{i}") for i in range(1, 12)]
    raised = {}
    for offset, s in enumerate(ops):
        for a in h.see(s, offset=offset).alerts:
            raised[a.alert_id] = offset
    assert sorted(raised.values()) == [2, 5, 11]  # levels 1, 2, 3
    again = [a.alert_id for offset in range(3, 12) for a in h.see(ops[offset], offset=offset).alerts]
    assert set(again) == {aid for aid, at in raised.items() if at >= 3}  # levels 2 and 3: the batch's own
    state = h.get(h.alerts[0].cluster_id)
    assert [a.alert.level for a in state.alerts] == [1, 2, 3] and state.sightings == 12


def test_a_version_5_state_keeps_its_last_alert_for_a_read_again_op():
    import json

    h = Harness(Settings(alerts={"min_sightings_5m": 2}))
    pic = scene(3)
    h.see(sighting(pic, "e1", 0, "a1", [AI]), offset=10)
    s2 = sighting(pic, "e2", 1, "a2")
    [alert] = h.see(s2, offset=11).alerts
    (cid, raw), = h.table.items()
    doc = json.loads(raw)
    doc["last_alert"] = doc.pop("alerts")[0]["alert"]
    doc["schema_version"] = 5
    h.table[cid] = json.dumps(doc).encode()  # as a version-5 writer left it
    assert [a.alert.alert_id for a in h.get(cid).alerts] == [alert.alert_id]
    assert [a.alert_id for a in h.see(s2, offset=11).alerts] == [alert.alert_id]
    assert "last_alert" not in json.loads(h.get(cid).dumps())


def test_alert_once_then_escalate_on_velocity():
    h = Harness(Settings(alerts={"min_sightings_5m": 3, "escalation_factor": 2.0}))
    pic = scene(7)
    h.see(sighting(pic, "e0", 0, "a0", [AI]))
    for i in range(1, 12):
        h.see(sighting(pic, f"e{i}", i * 0.2, f"a{i}"))
    levels = [a.level for a in h.alerts]
    assert levels[0] == 1 and levels == sorted(levels) and len(set(levels)) == len(levels)
    assert levels == [1, 2, 3], levels  # 3 sightings in 5 min -> L1; 6 -> L2; 12 -> L3
    assert h.alerts[0].velocity.sightings_5m == 3


def test_no_alert_without_evidence_or_when_allow_listed():
    h = Harness(Settings(alerts={"min_sightings_5m": 2}))
    real = scene(8)
    for i in range(5):
        h.see(sighting(real, f"r{i}", i * 0.1, f"a{i}"))
    allow = Evidence(detector="bank:wire-photos", score=0.02, weight=6.0, detail="matches authentic bank entry 7",
                     data={"verdict": "authentic", "suppress": True})
    fake = scene(9)
    h.see(sighting(fake, "f0", 0, "b0", [AI, allow]))
    for i in range(1, 5):
        h.see(sighting(fake, f"f{i}", i * 0.1, f"b{i}"))
    assert h.alerts == []
    suppressed = [ClusterState.loads(v) for v in h.table.values() if ClusterState.loads(v).suppressed]
    assert suppressed and "allow-listed" in suppressed[0].suppressed


def test_models_run_once_per_cluster_and_their_result_updates_the_score():
    h = Harness(Settings(detect={"models": ["tiny"]}, alerts={"min_sightings_5m": 2}))
    pic = scene(11)
    h.see(sighting(pic, "e1", 0, "a1"))
    h.see(sighting(pic.resize((300, 200)), "e2", 0.5, "a2"))
    assert len(h.requests) == 1  # once per cluster, not per repost
    req = h.requests[0]
    st = h.get(req.cluster_id)
    assert st.models_pending and h.alerts == []
    model_ev = Evidence(detector="model:tiny", score=0.97, weight=3.0, detail="tiny v1: 0.97")
    h.apply(ClusterOp(kind="detection", detection=DetectionResult(
        cluster_id=req.cluster_id, sha256=req.sha256, evidence=[model_ev], models=["tiny"])))
    st = h.get(req.cluster_id)
    assert not st.models_pending and st.fake_score > 0.7
    assert len(h.alerts) == 1  # the model result pushed an already-viral cluster over the line


def test_rebuilt_engine_assigns_like_the_original():
    h = Harness()
    pics = [scene(20 + i) for i in range(4)]
    for i, p in enumerate(pics):
        h.see(sighting(p, f"e{i}", i))
    fresh = ClusterEngine(h.settings)
    fresh.rebuild(ClusterState.loads(v) for v in h.table.values())
    probe = sighting(pics[2].resize((400, 266)), "probe", 9)
    a1 = h.engine.index.lookup(probe.sha256, probe.hashes)
    a2 = fresh.index.lookup(probe.sha256, probe.hashes)
    assert a1 and a2 and a1[0].cluster_id == a2[0].cluster_id


def test_cold_clusters_are_evicted_and_revived_when_their_picture_resurfaces():
    h = Harness(Settings(dedupe={"hot_window_hours": 1, "evict_every_ops": 1}))
    old, other = scene(30), scene(31)
    first = h.see(sighting(old, "o1", 0, "a1", [AI])).snapshots[-1].cluster_id
    h.see(sighting(other, "n1", 180, "a2"))  # three hours later: `old` is cold
    assert h.engine.evict_due()
    evicted = h.engine.evict(h.get)
    assert evicted == [first]
    assert first not in h.engine.index and first in h.engine.cold
    # The agent deletes the evicted entry from the table; the store would
    # serve it back through the getter, which this harness keeps in `archive`.
    archive = {first: h.table.pop(first)}
    h.get = lambda cid: ClusterState.loads(h.table.get(cid) or archive[cid]) if (cid in h.table or cid in archive) else None
    back = h.see(sighting(old.resize((384, 256)), "o2", 200, "a3"))
    assert back.snapshots[-1].cluster_id == first  # revived, not a new cluster
    st = h.get(first)
    assert st.sightings == 2 and st.verdict == "likely-ai" and first not in h.engine.cold


def test_the_cold_index_keeps_the_most_recently_evicted_clusters_within_its_bound():
    # unbounded, it grew by every picture ever seen (~6 KB each) for the worker's life
    h = Harness(Settings(dedupe={"hot_window_hours": 1, "evict_every_ops": 1, "cold_max_clusters": 4}))
    ids = []
    for i in range(6):  # three hours apart: each sighting makes the one before it cold
        ids.append(h.see(sighting(scene(40 + i), f"p{i}", i * 180, f"a{i}")).snapshots[-1].cluster_id)
        h.engine.evict(h.get)
    # five evicted, one past the bound: trimmed to 95% of it (3), the longest evicted out
    assert [cid in h.engine.cold for cid in ids] == [False, False, True, True, True, False]
    assert h.engine.cold.n_clusters == 3
    archive = {cid: h.table.pop(cid) for cid in ids[:5]}
    h.get = lambda cid: ClusterState.loads(h.table.get(cid) or archive[cid]) if (cid in h.table or cid in archive) else None
    half = (384, 256)  # a resized copy: other bytes, so only the cold index can lead it to its cluster
    assert h.see(sighting(scene(42).resize(half), "back2", 1200, "b2")).snapshots[-1].cluster_id == ids[2]  # revived
    assert h.see(sighting(scene(40).resize(half), "back0", 1201, "b0")).snapshots[-1].cluster_id not in ids  # dropped


def test_the_hot_index_keeps_at_most_its_members_and_the_clusters_it_let_go_come_back():
    # bounded by time alone, a week's window outgrew the cluster worker's memory (~2 KB a member)
    h = Harness(Settings(dedupe={"evict_every_ops": 1, "hot_max_members": 4}))
    ids = [h.see(sighting(scene(50 + i), f"p{i}", i, f"a{i}")).snapshots[-1].cluster_id for i in range(5)]
    assert h.engine.index.n_members == 5  # within the hot window: time alone evicts nothing
    evicted = h.engine.evict(h.get)
    # down to 90% of the bound (3 members): the two seen longest ago, into the cold index
    assert evicted == sorted(ids[:2]) and h.engine.index.n_members == 3
    assert all(cid in h.engine.cold for cid in ids[:2]) and all(cid in h.engine.index for cid in ids[2:])
    assert h.engine.evict(h.get) == []  # under the bound: nothing more
    archive = {cid: h.table.pop(cid) for cid in evicted}
    h.get = lambda cid: ClusterState.loads(h.table.get(cid) or archive[cid]) if (cid in h.table or cid in archive) else None
    back = h.see(sighting(scene(50).resize((384, 256)), "back0", 10, "b0"))
    assert back.snapshots[-1].cluster_id == ids[0] and h.get(ids[0]).sightings == 2  # revived, not a new cluster


def test_a_clearly_better_copy_is_sent_to_the_models_again():
    h = Harness(Settings(detect={"models": ["clip-probe"]}))
    pic = scene(11)
    small = h.see(sighting(pic.resize((320, 240)), "e1", 0))
    assert [r.sha256 for r in small.detect_requests] == [small.snapshots[-1].new_sighting.sha256]
    cid = small.snapshots[-1].cluster_id
    same = h.see(sighting(pic.resize((320, 240)), "e2", 1, quality=70))  # no better: no new request
    assert same.snapshots[-1].cluster_id == cid and same.detect_requests == []
    big = h.see(sighting(pic.resize((640, 480)), "e3", 2))  # 4x the pixels
    assert big.snapshots[-1].cluster_id == cid
    assert [(r.cluster_id, r.sha256) for r in big.detect_requests] == [(cid, big.snapshots[-1].new_sighting.sha256)]
    assert h.get(cid).models_pending and h.get(cid).detect_sha256 == big.snapshots[-1].new_sighting.sha256
    # The first copy's result arrives late: its evidence counts, but the better
    # copy's request is still in flight (replay would stop waiting for it).
    model_ev = Evidence(detector="model:clip-probe", score=0.6, weight=3.0, detail="clip-probe v1: 0.6")
    h.apply(ClusterOp(kind="detection", detection=DetectionResult(
        cluster_id=cid, sha256=small.snapshots[-1].new_sighting.sha256, evidence=[model_ev], models=["clip-probe"])))
    assert h.get(cid).models_pending and h.get(cid).model_evidence == [model_ev]
    h.apply(ClusterOp(kind="detection", detection=DetectionResult(
        cluster_id=cid, sha256=big.snapshots[-1].new_sighting.sha256, evidence=[model_ev], models=["clip-probe"])))
    assert not h.get(cid).models_pending


def test_version_1_states_load_and_rebuild_next_to_version_2():
    """A state written before thumbnails and representative links (schema 1:
    no ``thumb``, audits without ``representative_*``) still loads, and a
    rebuilt engine matches its picture on hashes alone."""
    h = Harness()
    pic = scene(40)
    h.see(sighting(pic, "v1", 0))
    (cid, raw), = h.table.items()
    st = ClusterState.loads(raw)
    assert st.schema_version == SCHEMA_VERSION and st.members[0].thumb is not None
    import json

    doc = json.loads(raw)
    doc["schema_version"] = 1
    for m in doc["members"]:
        m.pop("thumb", None)
    doc["merges"] = [{"into": cid, "other": "0" * 16, "link_sha256": "a" * 64, "into_phash": 2, "other_phash": 3}]
    old = ClusterState.loads(json.dumps(doc).encode())
    assert old.schema_version == 1 and old.members[0].thumb is None
    assert old.merges[0].representative_sha256 is None
    fresh = ClusterEngine(h.settings)
    fresh.rebuild([old])
    probe = sighting(pic.resize((400, 266)), "probe", 9)
    assert [m.cluster_id for m in fresh.index.lookup(probe.sha256, probe.hashes)] == [cid]


def test_engagement_past_the_largest_exact_count_saturates_instead_of_freezing_the_cluster():
    # Two posts each claiming 2**53 likes: the cluster's running total failed
    # validation, and every later sighting of the cluster with it.
    from streams.records import MAX_COUNT, Engagement

    h = Harness()
    pic = scene(7)
    huge = Engagement(likes=MAX_COUNT, views=MAX_COUNT)
    cid = None
    for i in range(3):
        s = sighting(pic, f"e{i}", i, f"a{i}")
        s = s.model_copy(update={"event": s.event.model_copy(update={"engagement": huge})})
        cid = h.see(s).snapshots[-1].cluster_id
    st = h.get(cid)
    assert st.engagement.likes == MAX_COUNT and st.engagement.views == MAX_COUNT
    assert st.sightings == 3


def test_a_copy_dated_ahead_does_not_move_the_window_past_the_real_burst():
    # One copy dated 14 minutes ahead (validation allows 15) moved the cluster's
    # window end with it: the picture's burst of 15 posts fell outside the
    # 5-minute window and the viral fake was never alerted.
    h = Harness(Settings(alerts={"min_sightings_5m": 5}))
    pic = scene(5)

    def at(s: Sighting, ingested_minute: float) -> Sighting:
        return s.model_copy(update={"ingested_at": BASE_TIME + timedelta(minutes=ingested_minute)})

    h.see(at(sighting(pic, "ahead", 14, "a0", [AI]), 0))  # reached the broker at minute 0
    for i in range(1, 16):
        h.see(at(sighting(pic, f"b{i}", i / 6, f"a{i}"), i / 6 + 0.01))
    assert h.alerts and h.alerts[0].velocity.sightings_5m >= 5
    state = h.get(h.alerts[0].cluster_id)
    assert state.last_seen == BASE_TIME + timedelta(minutes=14)  # the post keeps its date as posted


# -- what an alert tells a subscriber: when, where, and posts to open ------------------
def posted(s: Sighting, platform: str, url: str | None = None, handle: str | None = None) -> Sighting:
    """``s`` as posted on ``platform`` at ``url`` by ``handle``."""
    ev = s.event.model_copy(update={"platform": platform, "post_url": url, "account_handle": handle})
    return s.model_copy(update={"event": ev})


def spread_feed(pic) -> list[Sighting]:
    """Posts of one picture, not in the order they were posted: the third to
    arrive was the first posted, a late one (minute -1) arrives after the
    first alert; one URL is not http(s)."""
    return [
        posted(sighting(pic, "late", 2.0, "a1", [AI]), "mastodon", "https://m.example/@a1/2", "@a1"),
        posted(sighting(pic, "b", 0.5, "a2"), "bluesky", "javascript:alert(1)", "@a2"),
        posted(sighting(pic, "a", 0.0, "a3"), "x", "https://x.example/a3/1", "@a3"),
        posted(sighting(pic, "c", 1.0, "a4"), "x", "HTTPS://x.example/a4/1"),
        posted(sighting(pic, "d", 3.0, "a5"), "bluesky", "https://bsky.example/a5/1"),  # 5th: the first alert
        posted(sighting(pic, "early", -1.0, "a6"), "telegram", "https://t.example/a6"),
        *(posted(sighting(pic, f"r{i}", 3 + i / 10, f"b{i}"), "x", f"https://x.example/b{i}/1") for i in range(1, 5)),
    ]


def _ids(alert) -> list[str]:
    return [p.event_id for p in alert.sample_posts]


def test_an_alert_says_when_and_where_the_picture_was_seen_with_its_earliest_posts():
    settings = Settings(alerts={"min_sightings_5m": 5, "escalation_factor": 2.0})
    h = Harness(settings)
    feed = spread_feed(scene(7))
    for s in feed:
        h.see(s)
    first, second = h.alerts
    assert (first.level, second.level) == (1, 2)
    # L1, raised by "d": the three earliest posts then so far, by time posted, and the trigger
    assert first.first_seen == BASE_TIME and first.last_seen == BASE_TIME + timedelta(minutes=3)
    # in the order the picture reached them (a at 0 on x, b at 0.5 on bluesky, late at 2 on mastodon), not arrival
    assert first.platforms == ["x", "bluesky", "mastodon"]
    assert _ids(first) == ["a", "b", "c", "d"]
    a, b, c, d = first.sample_posts
    assert (a.platform, a.account_id, a.account_handle, a.post_url, a.posted_at) == (
        "x", "a3", "@a3", "https://x.example/a3/1", BASE_TIME)
    assert b.post_url is None and b.account_handle == "@a2", "only http(s) URLs: a subscriber may link them"
    assert c.post_url == "HTTPS://x.example/a4/1" and d.event_id == first.trigger_event_id
    # L2 after ten posts: "early" (arrived sixth) is the first seen now; still at most 3 + the trigger
    assert second.first_seen == BASE_TIME - timedelta(minutes=1)
    assert second.platforms == ["telegram", "x", "bluesky", "mastodon"]
    assert _ids(second) == ["early", "a", "b", second.trigger_event_id] and second.trigger_event_id == "r4"
    state = h.get(second.cluster_id)
    assert [p.event_id for p in state.sample_posts] == ["early", "a", "b"] and state.sightings == len(feed)
    # deterministic: the same feed again raises the same alerts; in another order the same earliest posts
    again = Harness(settings)
    for s in feed:
        again.see(s)
    assert [x.model_dump(exclude={"created_at"}) for x in again.alerts] == [x.model_dump(exclude={"created_at"}) for x in h.alerts]
    shuffled = Harness(settings)
    for s in reversed(feed):
        shuffled.see(s)
    assert shuffled.get(second.cluster_id).sample_posts == state.sample_posts
    assert shuffled.get(second.cluster_id).platforms == second.platforms
    # a redelivered op re-emits the stored alert, samples and all
    assert h.see(feed[-1], offset=len(feed) - 1).alerts == [second]


def test_the_earliest_posts_of_merged_clusters_are_kept_and_alerted():
    h = Harness(Settings(dedupe={"phash_threshold": 10}, alerts={"min_sightings_5m": 5}))
    pic = scene(5)
    ca = h.see(hashed(posted(sighting(pic, "e1", 0, "a1", [AI]), "x", "https://x.example/1"), 0)).snapshots[-1].cluster_id
    h.see(hashed(posted(sighting(pic, "e5", 3, "a5"), "x", "https://x.example/5"), 0))
    cb = h.see(hashed(posted(sighting(pic, "e0", -0.5, "a0"), "bluesky", "https://bsky.example/0"), 0xFFFFF, 40)).snapshots[-1].cluster_id
    h.see(hashed(posted(sighting(pic, "e2", 1, "a2"), "bluesky", "https://bsky.example/2"), 0xFFFFF, 40))
    assert ca != cb and h.alerts == []
    assert [p.event_id for p in h.get(cb).sample_posts] == ["e0", "e2"]
    out = h.see(hashed(posted(sighting(pic, "e3", 2, "a3"), "mastodon", "https://m.example/3"), 0x3FF, 20))  # links them
    survivor = out.snapshots[-1].cluster_id
    assert {survivor, *(s.cluster_id for s in out.snapshots if s.merged_into)} == {ca, cb}
    assert [p.event_id for p in h.get(survivor).sample_posts] == ["e0", "e1", "e2"]  # from both clusters, earliest 3
    [alert] = h.alerts
    assert alert.cluster_id == survivor and alert.trigger_event_id == "e3"
    assert [(p.event_id, p.post_url) for p in alert.sample_posts] == [
        ("e0", "https://bsky.example/0"), ("e1", "https://x.example/1"), ("e2", "https://bsky.example/2"),
        ("e3", "https://m.example/3")]
    assert alert.first_seen == BASE_TIME - timedelta(minutes=0.5) and alert.last_seen == BASE_TIME + timedelta(minutes=3)
    assert alert.platforms == ["bluesky", "x", "mastodon"]  # e0 on bluesky, e1 on x, e3 on mastodon


def test_a_version_4_state_without_sample_posts_loads_and_alerts_with_its_trigger_post():
    import json

    h = Harness(Settings(alerts={"min_sightings_5m": 3}))
    pic = scene(12)
    h.see(posted(sighting(pic, "p0", 0, "a0", [AI]), "x", "https://x.example/0"))
    h.see(posted(sighting(pic, "p1", 1, "a1"), "x", "https://x.example/1"))
    (cid, raw), = h.table.items()
    doc = json.loads(raw)
    assert [p["event_id"] for p in doc.pop("sample_posts")] == ["p0", "p1"]
    del doc["platform_since"]
    doc["schema_version"] = 4
    h.table[cid] = json.dumps(doc).encode()  # as a version-4 writer left it
    old = h.get(cid)
    assert old.schema_version == 4 and old.sample_posts == [] and old.first_seen == BASE_TIME
    h.see(posted(sighting(pic, "p2", 2, "a2"), "mastodon", "https://m.example/2"))
    [alert] = h.alerts
    assert [p.event_id for p in alert.sample_posts] == ["p2"]  # the earlier posts are not known any more
    assert alert.first_seen == BASE_TIME and alert.platforms == ["x", "mastodon"]
    assert json.loads(h.table[cid])["schema_version"] == SCHEMA_VERSION  # written back as the current version
    assert h.get(cid).schema_version == SCHEMA_VERSION


def test_a_state_of_a_newer_version_is_refused_not_loaded_without_its_fields():
    # A version-99 state loaded silently and its unknown fields were dropped
    # by the next write.
    import json

    import pytest

    from streams.clustering import NewerStateVersion

    h = Harness()
    h.see(sighting(scene(12), "p0", 0, "a0"))
    (cid, raw), = h.table.items()
    doc = json.loads(raw)
    assert doc["schema_version"] == SCHEMA_VERSION == 7
    doc.update(schema_version=99, future_field=1)
    with pytest.raises(NewerStateVersion, match="schema_version 99 is newer than this deepwatch's 7"):
        ClusterState.loads(json.dumps(doc))
    doc["sightings"] = "many"  # a field this version cannot read either: still the version named
    with pytest.raises(NewerStateVersion, match="schema_version 99"):
        ClusterState.loads(json.dumps(doc).encode())


# -- evidence that arrives with repeats of a member's bytes ------------------------
BANK_AUTHENTIC = Evidence(detector="bank:wire", kind="bank", score=0.02, weight=6.0, detail="authentic bank entry 7",
                          data={"verdict": "authentic", "suppress": True})
BANK_FAKE = Evidence(detector="bank:factcheck", kind="bank", score=0.98, weight=6.0, detail="fake bank entry 3",
                     data={"verdict": "fake"})


def test_an_authentic_bank_match_on_exact_reposts_suppresses_the_cluster():
    # An entry banked while the picture was viral: the Analyzer attaches it to
    # every later repost of the same bytes, but evidence was merged only when a
    # new member image joined, so 11 reposts carried it and alerts L1-L3 fired.
    h = Harness(Settings(alerts={"min_sightings_5m": 3, "escalation_factor": 2.0}))
    pic = scene(7)
    cid = h.see(sighting(pic, "e0", 0, "a0", [AI])).snapshots[-1].cluster_id
    for i in range(1, 12):
        h.see(sighting(pic, f"e{i}", i * 0.2, f"a{i}", [BANK_AUTHENTIC]))
    st = h.get(cid)
    assert st.suppressed == "allow-listed: authentic bank entry 7" and h.alerts == []
    assert len(st.members) == 1 and st.sightings == 12
    assert [e.detector for e in st.evidence] == ["generator-metadata", "bank:wire"]  # once, not once per repost
    # a redelivered repost changes nothing
    before = h.table[cid]
    again = h.see(sighting(pic, "e11", 11 * 0.2, "a11", [BANK_AUTHENTIC]), offset=h.offset - 1)
    assert again.already_applied and h.table[cid] == before


def test_a_changed_desk_verdict_replaces_the_clusters_bank_evidence_for_those_bytes():
    # The desk banks a picture in desk-authentic, then an editor finds it
    # fake: the entry moves to desk-fake (streams.desk.verdicts withdraws it
    # from the other bank). Later reposts carry only the desk-fake item, but
    # the cluster kept the desk-authentic one too and stayed suppressed.
    def desk(verdict: str) -> Evidence:
        return Evidence(detector=f"bank:desk-{verdict}", kind="bank", score=0.97 if verdict == "fake" else 0.03,
                        weight=3.0, detail=f"matches 'desk-{verdict}' entry 1",
                        data={"verdict": verdict, "suppress": verdict == "authentic"})

    def repost(eid: str, minute: float, *bank: Evidence) -> Sighting:
        return sighting(pic, eid, minute, f"a-{eid}", bank).model_copy(update={"banks_checked": True})

    h = Harness(Settings(alerts={"min_sightings_5m": 3}))
    pic = scene(9)
    cid = h.see(repost("e0", 0, desk("authentic"))).snapshots[-1].cluster_id
    assert h.get(cid).suppressed == "allow-listed: matches 'desk-authentic' entry 1"
    for i in range(1, 4):
        h.see(repost(f"e{i}", i * 0.2, desk("fake")))
    st = h.get(cid)
    assert [(e.detector, e.data["verdict"]) for e in st.evidence] == [("bank:desk-fake", "fake")]
    assert st.suppressed is None and st.verdict == "likely-ai" and [a.level for a in h.alerts] == [1]
    # withdrawn from both (needs-review): the next repost's banks answer nothing, and nothing stays
    h.see(repost("e4", 1.0))
    assert [e for e in h.get(cid).evidence if e.kind == "bank"] == []
    # a sighting whose worker has no banks says nothing of them: what the cluster has stays
    h.see(repost("e5", 1.2, desk("fake")))
    h.see(sighting(pic, "e6", 1.4, "a-e6"))
    assert [e.detector for e in h.get(cid).evidence] == ["bank:desk-fake"]


def test_a_fake_bank_match_on_exact_reposts_raises_the_cluster_and_alerts():
    h = Harness(Settings(alerts={"min_sightings_5m": 3}))
    pic = scene(8)
    cid = h.see(sighting(pic, "e0", 0, "a0")).snapshots[-1].cluster_id
    assert h.get(cid).verdict == "no-evidence"
    for i in range(1, 4):
        h.see(sighting(pic, f"e{i}", i * 0.2, f"a{i}", [BANK_FAKE]))
    st = h.get(cid)
    assert st.verdict == "likely-ai" and st.fake_score > 0.99 and st.suppressed is None
    assert [e.detector for e in st.evidence] == ["bank:factcheck"]
    assert [(a.level, a.trigger_event_id) for a in h.alerts] == [(1, "e2")]


# -- a merge a crash left half-written --------------------------------------------
def _half_merge(keep: str):
    """Two clusters linked by a third image, the merge's writes cut after the
    survivor's (``keep="survivor"``) or after the merged cluster's
    (``keep="merged"``, what a stage writing merged clusters first left),
    then the writer restarted from the table."""
    h = Harness(Settings(dedupe={"phash_threshold": 10}))
    pic = scene(5)
    a = h.see(hashed(sighting(pic, "e1", 0, "a1", [AI]), 0)).snapshots[-1].cluster_id
    b = h.see(hashed(sighting(pic, "e2", 1, "a2"), 0xFFFFF, 40)).snapshots[-1].cluster_id
    before = dict(h.table)
    link = hashed(sighting(pic, "e3", 2, "a3"), 0x3FF, 20)
    out = h.engine.apply(ClusterOp(kind="sighting", sighting=link), 2, h.get)
    survivor = out.snapshots[-1].cluster_id
    other = ({a, b} - {survivor}).pop()
    assert list(out.writes) == [survivor, other]  # the survivor first
    h.table = dict(before)
    h.table[survivor if keep == "survivor" else other] = out.writes[survivor if keep == "survivor" else other].dumps()
    h.engine = ClusterEngine(h.settings)
    h.engine.rebuild(ClusterState.loads(v) for v in h.table.values())
    return h, link, survivor, other


def test_a_merge_cut_after_the_survivor_is_finished_when_its_op_comes_back():
    # The merged cluster stayed live for good: the redelivered op found its
    # image a member already, and the index gave no merge to finish.
    h, link, survivor, other = _half_merge("survivor")
    assert other not in h.engine.index  # the survivor holds its members
    again = h.see(link, offset=2)
    assert again.already_applied
    assert h.get(other).merged_into == survivor and h.get(other).sightings == 1
    st = h.get(survivor)
    assert st.sightings == 3 and len(st.members) == 3 and st.merged_from == [other]  # counted once
    assert [s.merged_into for s in again.snapshots if s.cluster_id == other] == [survivor]
    settled = dict(h.table)
    h.see(link, offset=2)  # once more: nothing left to do
    assert h.table == settled


def test_a_merge_cut_after_the_merged_cluster_is_folded_in_when_its_op_comes_back():
    # The merged cluster was marked, its sightings and members never reached
    # the survivor (2 sightings, 2 members, no merged_from).
    h, link, survivor, other = _half_merge("merged")
    again = h.see(link, offset=2)
    assert not again.already_applied  # the survivor had not been written: the op applies now
    st = h.get(survivor)
    assert st.sightings == 3 and len(st.members) == 3 and st.merged_from == [other]
    assert [e.detector for e in st.evidence] == ["generator-metadata"] and st.verdict == "likely-ai"
    assert st.applied_offset == 2 and h.get(other).merged_into == survivor
    settled = dict(h.table)
    h.see(link, offset=2)
    assert h.table == settled


def test_a_revived_cluster_is_indexed_at_event_time_not_at_a_date_posted_ahead():
    h = Harness(Settings(dedupe={"hot_window_hours": 1, "evict_every_ops": 1}))
    old, other = scene(30), scene(31)
    first = h.see(sighting(old, "o1", 0, "a1")).snapshots[-1].cluster_id
    h.see(sighting(other, "n1", 180, "a2"))
    assert h.engine.evict(h.get) == [first]
    # posted "at minute 214", reached the broker at minute 200
    back = sighting(old, "o2", 214, "a3").model_copy(update={"ingested_at": BASE_TIME + timedelta(minutes=200)})
    assert h.see(back).snapshots[-1].cluster_id == first
    assert h.engine.index._clusters[first].last_seen == (BASE_TIME + timedelta(minutes=200)).timestamp()
