"""One cluster update per cluster and sink batch (``EsFindingsStore.batch_actions``)
against the loopback fake (tests/fake_es.py): a viral cluster sighted 500
times in one batch was 500 updates, each carrying the whole cluster document
(its members) and each re-indexing it for one document kept. The documents
stored must be those the one-update-per-sighting writes stored (the same
snapshots applied one by one), whatever the batches and however often one
is redelivered. The same comparison runs on a real cluster when
DEEPWATCH_ES_URL is set (``test_batches_store_what_sightings_one_by_one_store_on_a_real_cluster``)."""

from __future__ import annotations

import json
import os
import random
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from detectors.base import Evidence
from detectors.hash_record import ImageHashes
from streams import es_templates as T
from streams.es_docs import batch_sightings
from streams.records import ClusterSnapshot, Engagement, ImageEvent, ImageRef, Member, Sighting, SourceRef, Velocity
from tests.fake_es import FakeElasticsearch, _cluster_upsert
from tests.test_es_store import _store

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
VIRAL = "c-viral"
OTHERS = ("c-a", "c-b", "c-c")

# The stored script of mapping v6 (``deepwatch-cluster-upsert-v6``), verbatim: what
# workers of the version before name and run while a rolling upgrade replaces them.
V6_SCRIPT_ID = "deepwatch-cluster-upsert-v6"
V6_SCRIPT = """
void addCapped(Map src, String field, def value, int cap) {
  if (value == null || value == '') { return; }
  if (src[field] == null) { src[field] = new ArrayList(); }
  List l = src[field];
  if (!l.contains(value) && l.size() < cap) { l.add(value); }
}
def d = params.doc;
boolean newer = ctx._source.revision == null || d.revision > ctx._source.revision;
if (newer) {
  for (def e : d.entrySet()) { ctx._source[e.getKey()] = e.getValue(); }
} else if (params.sighting == null) {
  ctx.op = 'noop';
  return;
}
def s = params.sighting;
if (s != null) {
  addCapped(ctx._source, 'sample_texts', s.text, params.caps.texts);
  for (def h : s.hashtags) { addCapped(ctx._source, 'hashtags', h, params.caps.hashtags); }
  addCapped(ctx._source, 'languages', s.lang, params.caps.languages);
  addCapped(ctx._source, 'accounts_sample', s.account, params.caps.accounts);
  addCapped(ctx._source, 'post_urls', s.post_url, params.caps.post_urls);
}
""".strip()


def _sighting(cid: str, i: int) -> Sighting:
    """Sighting ``i``: more distinct texts, hashtags, languages, accounts and
    post URLs than the cluster document's samples keep (``T.CAPS``), so which
    ones it keeps depends on the order they came in; some carry none."""
    sha = f"{i:064x}"
    ev = ImageEvent(event_id=f"{cid}-e{i}", platform=("x", "bluesky")[i % 2], account_id=f"acct{i % 80}",
                    account_handle=None if i % 9 == 0 else f"@a{i % 70}",
                    post_url=None if i % 13 == 0 else f"https://example.org/{cid}/{i}",
                    posted_at=T0 + timedelta(seconds=i), text=None if i % 11 == 0 else f"is this real? take {i % 31}",
                    hashtags=[] if i % 7 == 0 else [f"tag{i % 130}", "viral"], lang=None if i % 5 == 0 else f"l{i % 27}",
                    image=ImageRef(blob=sha))
    return Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=i), sha256=sha,
                    width=640, height=480, format="JPEG", hashes=ImageHashes(phash=sha[-16:], pdq=sha, pdq_quality=100))


def _snap(cid: str, rev: int, members: list[Member], s: Sighting | None, **update) -> ClusterSnapshot:
    return ClusterSnapshot(
        cluster_id=cid, revision=rev, fake_score=round(0.5 + rev / 10_000, 4), verdict="likely-ai",
        evidence=[Evidence(detector="metadata", score=0.9, weight=2.0, detail=f"{cid} r{rev}")],
        members=list(members), sightings=rev, accounts=rev, platforms=["bluesky", "x"], engagement=Engagement(likes=rev),
        velocity=Velocity(sightings_5m=rev), first_seen=T0, last_seen=T0 + timedelta(seconds=rev),
        new_sighting=s, **update)


def _history(n: int = 500) -> list[ClusterSnapshot]:
    """What the engine publishes: ``n`` sightings of the viral cluster (a new
    member every tenth), one of another cluster every 25th, a revision with
    no sighting, and a merge folding ``c-c`` into ``c-a``."""
    out: list[ClusterSnapshot] = []
    members: dict[str, list[Member]] = {}
    rev: dict[str, int] = {}

    def add(cid: str, i: int, **update) -> None:
        s = _sighting(cid, i)
        if i % 10 == 0 or cid not in members:
            members.setdefault(cid, []).append(Member(sha256=s.sha256, phash=s.hashes.phash, pdq=s.hashes.pdq,
                                                      pdq_quality=100, event_id=s.event.event_id, width=640,
                                                      height=480, format="JPEG", distance=i % 9))
        rev[cid] = rev.get(cid, 0) + 1
        out.append(_snap(cid, rev[cid], members[cid], s, **update))

    for i in range(n):
        add(VIRAL, i)
        if i % 25 == 0:
            add(OTHERS[i // 25 % 3], 100_000 + i)
        if i == 250:  # a revision without a sighting (a model finished)
            rev[VIRAL] += 1
            out.append(_snap(VIRAL, rev[VIRAL], members[VIRAL], None, models_pending=False))
    rev["c-c"] += 1
    out.append(_snap("c-c", rev["c-c"], members["c-c"], None, merged_into="c-a"))
    rev["c-a"] += 1
    out.append(_snap("c-a", rev["c-a"], members["c-a"] + members["c-c"], None, merged_from=["c-c"]))
    return out


def _stored(es: FakeElasticsearch) -> dict[str, object]:
    """Everything a store wrote that a batch could change: the cluster
    documents (but the time of the write), the sightings and the processed
    markers (but their time)."""
    clusters = {k: {f: v for f, v in d.items() if f != "updated_at"}
                for k, d in es.docs[T.concrete("deepwatch-clusters")].items()}
    sightings = es.docs[es.data_streams["deepwatch-sightings"]]
    processed = {k: {f: v for f, v in d.items() if f != "@timestamp"}
                 for k, d in es.docs[T.concrete("deepwatch-processed")].items()}
    return {"clusters": clusters, "sightings": sightings, "processed": processed}


def _bulk_lines(es: FakeElasticsearch, since: int = 0) -> tuple[list[dict], int]:
    bulks = [r for r in es.requests[since:] if r.path.endswith("/_bulk")]
    return [line for r in bulks for line in r.body], sum(r.size for r in bulks)


def _fresh() -> FakeElasticsearch:
    return FakeElasticsearch().start()


def _done(es: FakeElasticsearch) -> None:
    es.stop()
    assert not es.crashes and not es.unhandled


@pytest.fixture(scope="module")
def one_by_one():
    """The history written one snapshot a request: one update per sighting,
    as every batch was written before. Returns (what it stored, the bulk
    lines and bytes the fake received)."""
    es = _fresh()
    s = _store(es)
    try:
        s.ensure_setup()
        n = len(es.requests)
        for snap in _history():
            s.apply_snapshot(snap)
        lines, size = _bulk_lines(es, n)
        yield _stored(es), lines, size
    finally:
        s.close()
        _done(es)


def test_a_batch_writes_each_cluster_once_with_what_one_by_one_writes_stored(fake_es, one_by_one):
    reference, lines_one, bytes_one = one_by_one
    history = _history()
    s = _store(fake_es)
    s.ensure_setup()
    n = len(fake_es.requests)
    s.apply_snapshots(history)
    lines, size = _bulk_lines(fake_es, n)
    updates = [line["update"]["_id"] for line in lines if "update" in line]
    assert sorted(updates) == sorted({VIRAL, *OTHERS})  # one each, not one per sighting
    assert len([x for x in lines_one if "update" in x]) == len(history)  # what it was
    # the sightings and markers are still one each
    assert len([x for x in lines if "create" in x]) == len([x for x in lines_one if "create" in x]) == 2 * 520
    # the viral cluster's update: one document and its samples' worth of sightings, not 500 of them
    [viral] = [lines[i + 1] for i, x in enumerate(lines) if x.get("update", {}).get("_id") == VIRAL]
    params = viral["script"]["params"]
    assert params["doc"]["revision"] == max(x.revision for x in history if x.cluster_id == VIRAL)
    assert 0 < len(params["sightings"]) <= sum(T.CAPS.values()) < 500
    assert size * 10 < bytes_one, (size, bytes_one)
    assert _stored(fake_es) == reference
    s.close()


@pytest.mark.parametrize("split", [
    [137, 400],  # three batches
    list(range(7, 523, 7)),  # the sink's small batches
    list(range(1, 523)),  # one snapshot a batch
], ids=["thirds", "sevens", "ones"])
def test_redelivered_and_differently_split_batches_store_the_same(one_by_one, split):
    reference = one_by_one[0]
    history = _history()
    assert len(history) == 523
    bounds = [0, *split, len(history)]
    batches = [history[a:b] for a, b in zip(bounds, bounds[1:])]
    es = _fresh()
    s = _store(es)
    try:
        s.apply_snapshots(batches[0])
        s.apply_snapshots(batches[0])  # redelivered: the sink's offsets were not committed
        for b in batches[1:]:
            s.apply_snapshots(b)
        assert _stored(es) == reference
        s.apply_snapshots(history)  # the whole history again, in one batch
        s.apply_snapshots(history[100:300])
        assert _stored(es) == reference
    finally:
        s.close()
        _done(es)


def test_the_newest_revision_is_stored_whatever_its_place_in_the_batch(fake_es):
    history = [x for x in _history(60) if x.cluster_id == VIRAL]
    newest = history[-1]
    tie = newest.model_copy(update={"fake_score": 0.01, "new_sighting": None})  # the same revision, later
    s = _store(fake_es)
    s.apply_snapshots([newest, *reversed(history[:-1]), tie])
    doc = fake_es.docs[T.concrete("deepwatch-clusters")][VIRAL]
    assert (doc["revision"], doc["fake_score"]) == (newest.revision, newest.fake_score)
    assert len(doc["members"]) == len(newest.members) and doc["stream_sightings"] == newest.sightings
    version = fake_es.meta[T.concrete("deepwatch-clusters")][VIRAL]["version"]
    # stale, and no sighting to add: a no-op, the nested document not re-indexed
    s.apply_snapshots([history[3].model_copy(update={"new_sighting": None}), tie])
    assert fake_es.meta[T.concrete("deepwatch-clusters")][VIRAL]["version"] == version
    assert fake_es.docs[T.concrete("deepwatch-clusters")][VIRAL] == doc
    s.close()


def test_the_sightings_left_out_of_an_update_are_those_the_script_would_not_add():
    """``batch_sightings`` against the script (its Python twin): from any
    stored samples (empty, part full, full, past a cap that was larger),
    the sightings it keeps add what all of them add, in the same order."""
    rng = random.Random(7)
    fields = {"sample_texts": "text", "languages": "lang", "accounts_sample": "account", "post_urls": "post_url"}
    for _ in range(2000):
        caps = {k: rng.randint(1, 4) for k in T.CAPS}
        pool = lambda: rng.choice([None, "", *"abcdefg"])  # noqa: E731
        sightings = [{"text": pool(), "lang": pool(), "account": pool(), "post_url": pool(),
                      "hashtags": [h for h in (pool() for _ in range(rng.randint(0, 3))) if h is not None]}
                     for _ in range(rng.randint(0, 12))]
        stored = {"revision": 5, **{f: rng.sample("abcdefgh", rng.randint(0, 6)) for f in (*fields, "hashtags")}}
        doc = {"revision": 5}  # not newer: only the samples change
        got, want = json.loads(json.dumps(stored)), json.loads(json.dumps(stored))
        kept = batch_sightings(sightings, caps)
        ops = (_cluster_upsert(got, {"doc": doc, "sightings": kept, "caps": caps}),
               _cluster_upsert(want, {"doc": doc, "sightings": sightings, "caps": caps}))
        assert got == want, (caps, stored, sightings, kept)
        assert len(kept) <= len(sightings) and (ops[0] == "noop") == (not kept)


def test_an_upgrade_stores_the_new_script_beside_the_one_old_writers_name(fake_es):
    """A rolling upgrade: workers of the version before still name
    ``deepwatch-cluster-upsert-v6`` and send its params (one ``sighting``).
    A new worker's start stores its own script under its own id and leaves
    theirs as it is; had it replaced the source under their id, every update
    they sent would fail (and each of their starts would put it back)."""
    fake_es.scripts[V6_SCRIPT_ID] = {"lang": "painless", "source": V6_SCRIPT}
    s = _store(fake_es)
    s.ensure_setup()
    assert T.SCRIPT_ID != V6_SCRIPT_ID
    assert fake_es.scripts == {V6_SCRIPT_ID: {"lang": "painless", "source": V6_SCRIPT},
                               T.SCRIPT_ID: {"lang": "painless", "source": T.CLUSTER_UPSERT_SCRIPT}}
    assert [r.path for r in fake_es.requests if r.method == "PUT" and "/_scripts/" in r.path] == [
        "/_scripts/" + T.SCRIPT_ID]
    s.close()


URL = os.environ.get("DEEPWATCH_ES_URL")


@pytest.mark.live
@pytest.mark.skipif(not URL, reason="DEEPWATCH_ES_URL is not set: no live Elasticsearch to test against")
def test_batches_store_what_sightings_one_by_one_store_on_a_real_cluster():
    """The painless itself (the fake runs its Python twin): a batch and the
    same snapshots one by one store the same cluster documents."""
    from tests.test_es_live import _drop, _live_store

    history = _history(120)
    got = {}
    for how in ("batch", "one_by_one"):
        prefix = f"deepwatch-test-{uuid.uuid4().hex[:8]}"
        s = _live_store(prefix)
        try:
            if how == "batch":
                s.apply_snapshots(history[:50])
                s.apply_snapshots(history)  # redelivered, with more
            else:
                for snap in history:
                    s.apply_snapshot(snap)
            s.refresh()
            hits = s.es.search(index=s.names["clusters"], size=100)["hits"]["hits"]
            got[how] = {h["_id"]: json.dumps({k: v for k, v in h["_source"].items() if k != "updated_at"},
                                             sort_keys=True) for h in hits}
        finally:
            _drop(s, prefix)
    assert got["batch"] == got["one_by_one"] and set(got["batch"]) == {VIRAL, *OTHERS}
