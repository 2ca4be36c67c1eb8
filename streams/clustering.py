"""The single-writer cluster engine: near-duplicate assignment, per-cluster
virality, score fusion and alert decisions. Pure logic, no Faust: the cluster
stage (``streams.cluster_stage.ClusterStage``, run by the ``cluster`` agent in
``streams.app``) feeds it ops and persists what it returns, in the changelog
table and, write-through, in ``streams.engine_state``.

Why a single writer: near neighbours cannot be found by key-partitioning (two
reposts of one picture have unrelated sha256s), so every cluster decision is
made in one ordered place, the 1-partition ``cluster-ops`` topic. Its state is
a changelog-backed table, so any worker can take over (or keep a standby
replica) and rebuild the in-memory index from it; the expensive work (fetch,
decode, hash, detectors, models) happens in parallel before and after.

At-least-once without double counting: every state records the offset of the
last op applied to it (``applied_offset``), written atomically with the state
itself. An op redelivered after a crash finds its offset already applied and
only re-emits the derived outputs (snapshot, alert, detect request), which
every sink treats idempotently. Event-id duplicates (a producer retry) are
recognised from the trailing window (its every sighting's event id, whatever
time a resend claims: ``virality.seen``) and not counted twice.

A merge writes two states or more: the survivor, which folds the merged
clusters' counts in and lists them in ``merged_from``, and each merged
cluster, marked ``merged_into``. The stage writes survivors first
(``ClusterStage._write``), and a merge a crash left half-written is finished
when the states are loaded again (``ClusterEngine.rebuild`` finds it,
``_finish_merges`` writes it with the next op): a cluster listed by a live
survivor yet live itself is only marked (its counts are in the survivor
already), and one marked ``merged_into`` a survivor that does not list it
(written by a stage that wrote the merged cluster first) is folded in.
Folding is keyed on ``merged_from``, so no merge counts a cluster twice.

A state stays bounded however viral its picture: its trailing window is
kept sorted and read by bisection (``streams.virality``), and ``fit`` keeps
what is written under ``MAX_STATE_BYTES`` (Kafka's default record limit is
1 MB). ``bench/viral_cluster.py``: ~2 ms per sighting at 12,000 reposts.

Past one writer: per op the writer does a few batched Hamming range searches
over the representatives' codes, verification against a few representatives,
and the state update; hashing, decoding and detectors happen in the
partitioned stages before it. ``bench/cluster_scale.py`` measures ``assign``
alone at 324 ops/s with 1M members in the hot index and 167 ops/s with 10M
(synthetic codes; ~2 GiB per million members), against ~100-300 events/s for
the whole pipeline on 2 cores. When ingest outgrows that (more machines), or
memory does, candidate search splits by hash bands (docs/clusters.md): N searchers each own the MIH substring tables of one band
(exact by the pigeonhole argument in ``detectors.neardup.hamming``) and
answer candidate cluster ids; the writer keeps only verification against
representatives, the decision and merges, still on the one ordered topic, so
decisions stay deterministic and replayable.
"""

from __future__ import annotations

import base64
import binascii
import json
import itertools
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable

from pydantic import BaseModel, Field, ValidationError, field_serializer, model_validator

from detectors.base import Evidence, EvidenceKind
from detectors.fusion import fuse
from detectors.hash_record import ImageHashes
from detectors.hashing import THUMB_SIDE
from detectors.neardup import Assignment, ClusterIndex, MergeAudit
from detectors.neardup.localized import PixelSource
from detectors.signals import signal_types, view_signal_type
from streams import virality
from streams.records import (
    Alert,
    ClusterOp,
    ClusterSnapshot,
    DetectionResult,
    DetectRequest,
    Engagement,
    Member,
    SamplePost,
    Sighting,
    Velocity,
    earliest_posts,
)
from streams.blobstore import BlobStore
from streams.settings import Settings

MAX_ACCOUNTS = 10_000  # exact distinct-account counts live in the findings store

log = logging.getLogger(__name__)

# The ``ClusterState`` layout this code writes. A state of an older version
# loads (every field added since is optional) and is written back as this
# one; a newer one is refused (``NewerStateVersion``): its fields this code
# does not know would be dropped by the next write.
SCHEMA_VERSION = 7


class NewerStateVersion(Exception):
    """A stored cluster state written by a newer deepwatch than this one."""


# Alerts a cluster state remembers (``ClusterState.alerts``): more levels than
# one batch of ops raises for one cluster (an escalation needs its velocity
# times ``alerts.escalation_factor``, at least 1.x), each a few KB.
ALERTS_KEPT = 8


class RaisedAlert(BaseModel):
    offset: int  # of the op that raised it
    alert: Alert


class ClusterState(BaseModel):
    # 2: members may carry ``thumb`` (pixel verification) and merge audits the
    # ``representative_*`` of a link by representatives; both optional, so a
    # version-1 state loads as it is (and its members match on hashes alone);
    # 3: representatives may carry ``content_box`` (hashes v6), optional too;
    # 4: ``apart`` (ClusterIndex: the edit check told the picture from a
    # look-alike), False when absent;
    # 5: ``sample_posts`` (the earliest posts, which alerts carry), empty when
    # absent: a version-4 cluster's alerts carry only their trigger post
    # until it sees posts again (its earliest ones are no longer known);
    # 6: ``alerts`` (the last ``ALERTS_KEPT`` raised, with the offset of the
    # op that raised each) in place of ``last_alert``, which a version-5
    # state's ``alerts`` is read from;
    # 7: ``platform_since`` (each platform's earliest post), by which
    # ``platforms`` is ordered; absent, the platforms seen before keep their
    # order, first.
    # ``schema_version`` is the version a state was stored at: ``loads``
    # refuses one newer than ``SCHEMA_VERSION``, ``dumps`` always writes
    # ``SCHEMA_VERSION`` (a state read at an older version is upgraded when
    # written again).
    schema_version: int = SCHEMA_VERSION
    cluster_id: str
    revision: int = 0
    applied_offset: int = -1
    created_offset: int = -1
    members: list[Member] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list)  # cheap, per member image
    model_evidence: list[Evidence] = Field(default_factory=list)  # once per cluster
    models_pending: bool = False
    sightings: int = 0
    accounts: list[str] = Field(default_factory=list)
    # in the order the picture reached them (``platform_since``), not the order
    # their posts arrived in: a replay's workers analyse copies in any order
    platforms: list[str] = Field(default_factory=list)
    platform_since: dict[str, datetime] = Field(default_factory=dict)  # platform -> its earliest post's time
    engagement: Engagement = Field(default_factory=Engagement)
    recent: list[virality.RecentSighting] = Field(default_factory=list)
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    fake_score: float = 0.0
    verdict: str = "no-evidence"
    suppressed: str | None = None
    alert_level: int = 0
    alert_velocity: int = 0
    # the last ALERTS_KEPT alerts raised, oldest first: what an op read again
    # after a crash sends again (``_reemit``)
    alerts: list[RaisedAlert] = Field(default_factory=list)
    last_alert: Alert | None = Field(default=None, exclude=True)  # version <= 5: read into ``alerts``
    merged_into: str | None = None
    merged_from: list[str] = Field(default_factory=list)
    merges: list[MergeAudit] = Field(default_factory=list)  # why each merged cluster was linked
    detect_sha256: str | None = None  # the copy models last ran (or are pending) on: the best seen
    apart: bool = False  # has a look-alike edit: joins re-verified on pixels (``ClusterIndex``, ``Assignment.apart``)
    # the earliest ``MAX_SAMPLE_POSTS`` posts (``earliest_posts``): a few KB at most, never shed by ``fit``
    sample_posts: list[SamplePost] = Field(default_factory=list)

    @field_serializer("schema_version")
    def _written_as_current(self, version: int) -> int:
        return SCHEMA_VERSION

    @model_validator(mode="after")
    def _alerts_of_version_5(self) -> "ClusterState":
        if self.last_alert is not None and not self.alerts:
            self.alerts = [RaisedAlert(offset=self.applied_offset, alert=self.last_alert)]
        self.last_alert = None
        return self

    def dumps(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def loads(cls, raw: bytes | str) -> "ClusterState":
        """The state ``raw`` holds; ``NewerStateVersion`` for one a newer
        deepwatch wrote (also where its fields fail to validate here)."""
        try:
            state = cls.model_validate_json(raw)
        except ValidationError:
            _refuse_newer(_stored_version(raw))
            raise
        _refuse_newer(state.schema_version)
        return state


def _stored_version(raw: bytes | str) -> object:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get("schema_version") if isinstance(doc, dict) else None


def _refuse_newer(version: object) -> None:
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise NewerStateVersion(f"cluster state schema_version {version} is newer than this deepwatch's "
                                f"{SCHEMA_VERSION}: refusing to load it (its unknown fields would be lost "
                                "on the next write); run the newer version")


# Faust's producer refuses a record over 1,000,000 bytes (its
# ``producer_max_request_size``: aiokafka raises MessageSizeTooLargeError),
# Kafka's default max.message.bytes is 1 MB, and the cluster table's changelog
# carries a cluster's whole state on every update. A viral picture's last hour
# and accounts alone pass that: 1.1 MB measured with 12,000 Bluesky-style ids
# (accounts of 32 characters, events of 70; the schema allows 256) reposting
# one picture. So no state is written larger than this (``fit``).
MAX_STATE_BYTES = 768 * 1024
_FIT_TO = 0.75  # of the budget, once shed: the next updates have room, so shedding stays rare


def fit(state: ClusterState, limit: int = MAX_STATE_BYTES) -> bytes:
    """``state.dumps()``, at most ``limit`` bytes where shedding can get it
    there. Over the limit, the state sheds down to ``_FIT_TO`` of it: the
    oldest sightings of its last hour and its newest accounts, in proportion
    to the bytes each takes (its windows then count fewer, as past
    ``virality.MAX_RECENT``; the account list is a lower bound already past
    ``MAX_ACCOUNTS``, and the findings store counts accounts exactly), then
    the newest members that are not representatives (the findings store
    keeps every member it was sent; the index keeps them until a rebuild,
    after which their copies join through the representatives). The
    earliest posts (``sample_posts``, at most ``MAX_SAMPLE_POSTS``) and the
    alerts (at most ``ALERTS_KEPT``) are bounded on their own and never shed. Depends on the state
    alone, so a replay sheds alike. Mutates ``state``."""
    raw = state.dumps()
    if len(raw) <= limit:
        return raw
    before = len(raw)
    target = int(limit * _FIT_TO)
    while len(raw) > target and (_shed_window(state, len(raw) - target) or _shed_members(state, len(raw) - target)):
        raw = state.dumps()
    log.warning("cluster state shed to fit the changelog", extra={
        "cluster_id": state.cluster_id, "bytes_before": before, "bytes": len(raw), "recent": len(state.recent),
        "accounts": len(state.accounts), "members": len(state.members)})
    return raw


def _shed_count(over: int, entry_bytes: int, n: int) -> int:
    return min(n, over // max(1, entry_bytes) + 1)


def _shed_window(state: ClusterState, over: int) -> bool:
    """``over`` bytes off the last hour's oldest sightings and the newest
    accounts, each its share by size; False when both are empty."""
    r_each = len(state.recent[-1].model_dump_json()) + 1 if state.recent else 0
    a_each = len(state.accounts[-1]) + 3 if state.accounts else 0
    r_bytes, a_bytes = r_each * len(state.recent), a_each * len(state.accounts)
    if r_bytes + a_bytes == 0:
        return False
    if state.recent:
        state.recent = state.recent[_shed_count(over * r_bytes // (r_bytes + a_bytes), r_each, len(state.recent)):]
    if state.accounts:
        del state.accounts[-_shed_count(over * a_bytes // (r_bytes + a_bytes), a_each, len(state.accounts)):]
    return True


def _shed_members(state: ClusterState, over: int) -> bool:
    # the first member stays too: the copy that founded the cluster
    others = [i for i, m in enumerate(state.members) if not m.representative and i > 0]
    if not others:
        return False
    k = _shed_count(over, len(state.members[others[-1]].model_dump_json(exclude_none=True)) + 1, len(others))
    drop = set(others[-k:])
    state.members = [m for i, m in enumerate(state.members) if i not in drop]
    return True


@dataclass
class Outcome:
    writes: dict[str, ClusterState] = field(default_factory=dict)
    snapshots: list[ClusterSnapshot] = field(default_factory=list)
    detect_requests: list[DetectRequest] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    duplicate_event: bool = False
    already_applied: bool = False


Getter = Callable[[str], ClusterState | None]


def blob_pixels(blobs: BlobStore) -> PixelSource:
    """The blob store as the index's pixel source: a member's bytes, or None
    once its blob is gone (then the 32x32 record alone decides)."""
    def get(sha256: str) -> bytes | None:
        try:
            return blobs.get(sha256)
        except (OSError, ValueError):
            return None
    return get


def _reached(state: ClusterState, since: dict[str, datetime]) -> None:
    """Take each platform's earlier first post from ``since`` and order
    ``platforms`` by when the picture reached each. Platforms with no known
    time (a state written before version 7) were seen before the others
    were timed, and keep their order, first."""
    changed = False
    for platform, at in since.items():
        was = state.platform_since.get(platform)
        if was is None or at < was:
            state.platform_since[platform] = at
            changed = True
    if changed:
        known = state.platform_since
        state.platforms.sort(key=lambda p: (p in known, known.get(p) or datetime.min.replace(tzinfo=timezone.utc)))


class ClusterEngine:
    def __init__(self, settings: Settings, pixels: PixelSource | None = None):
        """``pixels``: image bytes by sha256 (``blob_pixels``), for
        re-verifying borderline joins on full pixels (``ClusterIndex``)."""
        self.settings = settings
        self.pixels = pixels
        self.index = self._new_index()
        self.models_enabled = bool(settings.detect.models)
        self.cold = self._new_index()  # hashes of evicted clusters only, not their state
        # its clusters, the longest evicted first: at most dedupe.cold_max_clusters
        # are kept, or memory would grow with every picture ever seen
        self._cold_order: dict[str, None] = {}
        self.max_event_time = 0.0
        self._ops_since_sweep = 0
        # merges a crash left half-written, found by ``rebuild``: (merged cluster, survivor)
        self._unfinished: list[tuple[str, str]] = []

    def _new_index(self) -> ClusterIndex:
        return ClusterIndex(**self.settings.dedupe.thresholds(), pixels=self.pixels,
                            pixel_limits=self.settings.decode_limits())

    # -- eviction -----------------------------------------------------------
    def evict_due(self) -> bool:
        return self._ops_since_sweep >= self.settings.dedupe.evict_every_ops

    def evict(self, get: Getter) -> list[str]:
        """Move clusters idle for longer than the hot window (event time) to the
        cold index, and, past ``dedupe.hot_max_members``, the clusters seen
        longest ago down to 90% of it; the caller deletes their table entries
        (the findings store already holds their latest snapshot). Either way a
        picture of theirs that comes back revives its cluster (``_revive``)."""
        self._ops_since_sweep = 0
        cutoff = self.max_event_time - self.settings.dedupe.hot_window_hours * 3600
        evicted = self.index.evict_older_than(cutoff)
        cap = self.settings.dedupe.hot_max_members
        if self.index.n_members > cap:
            # The hot index costs ~2 KB a member: at 150 events/s a week's
            # window outgrew the cluster worker's memory (docs/clusters.md).
            # Down to 90%, so a full index does not evict at every sweep.
            crowded = self.index.evict_least_recent(int(cap * 0.9))
            log.info("hot index full: the clusters seen longest ago moved to the cold tier",
                     extra={"evicted": len(crowded), "members": self.index.n_members, "hot_max_members": cap})
            evicted = sorted(evicted + crowded)
        for cid in evicted:
            state = get(cid)
            if state is not None:
                self.add_cold(cid, state.members)
        self.trim_cold()
        return evicted

    def add_cold(self, cluster_id: str, members: Iterable[Member]) -> None:
        """Index an evicted cluster's hashes in the cold index (``trim_cold``
        keeps it within its bound)."""
        for m in members:
            self.cold.add(cluster_id, m.sha256, _member_hashes(m), representative=m.representative,
                          founder=m.representative and m.distance is None)
        self._cold_order.pop(cluster_id, None)
        self._cold_order[cluster_id] = None

    def trim_cold(self) -> None:
        """Past ``dedupe.cold_max_clusters``, drop the longest-evicted clusters
        from the cold index down to 95% of it, in one removal: each removal
        scans the whole index, and once it is full every sweep would trim."""
        cap = self.settings.dedupe.cold_max_clusters
        if len(self._cold_order) <= cap:
            return
        excess = len(self._cold_order) - int(cap * 0.95)
        oldest = list(itertools.islice(self._cold_order, excess))
        for cid in oldest:
            del self._cold_order[cid]
        self.cold.remove_clusters(oldest)
        log.info("cold index full: the longest-evicted clusters dropped (a picture of theirs that returns founds a "
                 "new cluster)", extra={"dropped": excess, "kept": len(self._cold_order)})

    def _revive(self, s: Sighting, get: Getter) -> None:
        """A picture of an evicted cluster is back: put the cluster (its state
        comes back through ``get``, from the store) into the hot index first,
        at the sighting's event time (``event_time``), so the sighting joins
        it instead of founding a new cluster."""
        # Cold tier first: it is usually empty or small, while a hot lookup
        # costs as much as the assign that follows (measured: ~40% of the
        # writer's time when done for every op).
        if not self.cold.n_clusters:
            return
        matches = self.cold.lookup(s.sha256, s.hashes)
        if not matches or self.index.lookup(s.sha256, s.hashes):
            return
        for match in matches:
            state = get(match.cluster_id)
            self.cold.remove_cluster(match.cluster_id)
            self._cold_order.pop(match.cluster_id, None)
            if state is None or state.merged_into:
                continue
            # at event time, as every index timestamp: a copy dated ahead must
            # not keep the cluster hot past its real activity
            self._index_state(state, event_time(s))

    # -- recovery -----------------------------------------------------------
    def rebuild(self, states: Iterable[ClusterState]) -> None:
        """Index the stored ``states`` again, and find the merges a crash left
        half-written (``_unfinished_merges``): the index takes them as
        finished, and the next op writes them (``_finish_merges``)."""
        self.index = self._new_index()
        by_id = {s.cluster_id: s for s in states}
        self._unfinished = _unfinished_merges(by_id)
        away = {other for other, _ in self._unfinished}
        # Re-add in creation order so the index's tie-breaks match the original run.
        live = [s for s in by_id.values() if s.merged_into is None and s.cluster_id not in away]
        ends: dict[str, float | None] = {}
        for state in sorted(live, key=lambda s: (s.created_offset, s.cluster_id)):
            end = ends[state.cluster_id] = _window_end(state) if (state.recent or state.last_seen) else None
            if end is not None:
                self.max_event_time = max(self.max_event_time, end)
            self._index_state(state, end)
        for other_id, into_id in self._unfinished:
            other = by_id[other_id]
            if other.merged_into is not None and into_id in self.index:
                # marked, not folded: its members join the survivor's as the merge would have
                self._index_state(other, ends.get(into_id))
                self.index.merge(into_id, other_id)

    def _index_state(self, state: ClusterState, ts: float | None) -> None:
        """Put a stored cluster back into the hot index: its members, which of
        them stand for its picture, and its ``apart`` mark."""
        marked = any(m.representative for m in state.members)
        for i, m in enumerate(state.members):
            rep = m.representative if marked else i == 0  # states written before the flag existed
            # founders joined nothing (no distance); larger copies promoted later did
            self.index.add(state.cluster_id, m.sha256, _member_hashes(m), representative=rep,
                           founder=rep and m.distance is None, ts=ts)
        if state.apart:
            self.index.mark_apart(state.cluster_id)

    # -- ops ----------------------------------------------------------------
    def apply(self, op: ClusterOp, offset: int, get: Getter) -> Outcome:
        _check(op)
        if not ((op.kind == "sighting" and op.sighting is not None)
                or (op.kind == "detection" and op.detection is not None) or op.kind == "resume"):
            raise InvalidOp(f"cluster op of kind {op.kind!r} carries no payload")
        finished = Outcome()
        get = self._finish_merges(get, finished)
        if op.kind == "sighting" and op.sighting is not None:
            out = self._sighting(op.sighting, offset, get)
        elif op.kind == "detection" and op.detection is not None:
            out = self._detection(op.detection, offset, get)
        else:
            out = Outcome()  # changes nothing: the stage seeds (and asks again) before any op applies
        if finished.writes:
            out.writes = {**finished.writes, **out.writes}
            out.snapshots = finished.snapshots + out.snapshots
        return out

    def _finish_merges(self, get: Getter, out: Outcome) -> Getter:
        """Write the merges ``rebuild`` found half-written (a crash between
        the survivor's write and the merged cluster's, in either order): the
        merged cluster marked ``merged_into``, and folded into the survivor
        where the survivor does not list it yet (``_absorb``). Neither
        state's ``applied_offset`` moves: the survivor's tells whether the
        op that merged is still to apply (then it applies now, on the
        finished state). Returns ``get`` seeing the states it changed."""
        pending, self._unfinished = self._unfinished, []
        if not pending:
            return get
        fixed: dict[str, ClusterState] = {}

        def seeing(cluster_id: str) -> ClusterState | None:
            return fixed.get(cluster_id) or get(cluster_id)

        for other_id, into_id in pending:
            into, other = _resolve(seeing, into_id), seeing(other_id)
            if into is None or other is None or other.cluster_id == into.cluster_id:
                continue
            if other.merged_into == into.cluster_id and other.cluster_id in into.merged_from:
                continue  # finished meanwhile
            if self._absorb(into, other, None):
                into.revision += 1
                fixed[into.cluster_id] = into
            fixed[other.cluster_id] = other
            log.warning("half-written cluster merge finished", extra={"cluster_id": into.cluster_id,
                                                                      "merged": other.cluster_id})
        for state in fixed.values():
            out.writes[state.cluster_id] = state
            out.snapshots.append(self._snapshot(state, None))
        return seeing

    def _sighting(self, s: Sighting, offset: int, get: Getter) -> Outcome:
        out = Outcome()
        t = event_time(s)
        self.max_event_time = max(self.max_event_time, t)
        self._ops_since_sweep += 1
        self._revive(s, get)
        assignment: Assignment = self.index.assign(s.sha256, s.hashes, ts=t)
        state = _resolve(get, assignment.cluster_id) or ClusterState(
            cluster_id=assignment.cluster_id, created_offset=offset
        )
        if state.applied_offset >= offset:
            return self._reemit(state, out, s, offset, get=get, merged=assignment.merged)

        for other_id in assignment.merged:
            other = _resolve(get, other_id)
            if other is None or other.cluster_id == state.cluster_id:
                continue
            self._absorb(state, other, offset)
            out.writes[other.cluster_id] = other
            out.snapshots.append(self._snapshot(other, None))

        state.merges.extend(a for a in assignment.merge_audit if a not in state.merges)
        for cid in assignment.apart:
            marked = state if cid == state.cluster_id else _resolve(get, cid)
            if marked is not None and not marked.apart:
                marked.apart = True
                if marked is not state:
                    out.writes[marked.cluster_id] = marked  # a look-alike's cluster, not otherwise touched
        if assignment.new_member and all(m.sha256 != s.sha256 for m in state.members):
            better = not assignment.new_cluster and _better_copy(s, state.members)
            state.members.append(Member(
                sha256=s.sha256, phash=s.hashes.phash, pdq=s.hashes.pdq, pdq_quality=s.hashes.pdq_quality,
                event_id=s.event.event_id, width=s.width, height=s.height, format=s.format,
                distance=assignment.distance, representative=assignment.representative,
                # only representatives are matched against (and indexed), so
                # only they keep their ~25 view hashes in the state
                views=s.hashes.views if assignment.representative else None, trimmed=s.hashes.trimmed,
                thumb=s.hashes.thumb if assignment.representative else None,
                content_box=s.hashes.content_box if assignment.representative else None,
            ))
            # Models run once per cluster, on its first copy, and again when a
            # clearly better copy (larger, or lossless where all were lossy)
            # joins: detectors see more of the generator's traces in it.
            if (assignment.new_cluster or better) and self.models_enabled:
                state.models_pending = True
                state.detect_sha256 = s.sha256
                out.detect_requests.append(DetectRequest(cluster_id=state.cluster_id, sha256=s.sha256))
        # Every sighting's cheap evidence the cluster lacks (one item per
        # detector and copy), a repost of a member's exact bytes as much as
        # a new member: what is known of the bytes changes while a picture
        # spreads (a bank entry added meanwhile matches every later repost,
        # and only those), so a repeat can bring what its first copy did not.
        # The banks' items the cluster has for these bytes give way to the
        # repeat's when the banks were asked (``banks_checked``): a desk
        # verdict changed moves the entry from one desk bank to the other, or
        # withdraws it, and the first answer stayed, suppressing (or not) for good.
        if s.banks_checked:
            state.evidence = [e for e in state.evidence if not (e.kind is EvidenceKind.BANK and e.sha256 == s.sha256)]
        known = {(e.detector, e.sha256) for e in state.evidence}
        state.evidence.extend(e for e in s.evidence if (e.detector, e.sha256) not in known)

        if virality.seen(state.recent, s.event.event_id):
            out.duplicate_event = True
        else:
            self._count(state, s, t)
        return self._commit(state, out, offset, s)

    def _detection(self, r: DetectionResult, offset: int, get: Getter) -> Outcome:
        out = Outcome()
        state = _resolve(get, r.cluster_id)
        if state is None:
            return out  # cluster evicted meanwhile; the result has nothing to attach to
        if state.applied_offset >= offset:
            return self._reemit(state, out, None, offset, get=get, merged=[])
        names = {e.detector for e in r.evidence}
        state.model_evidence = [e for e in state.model_evidence if e.detector not in names] + list(r.evidence)
        # Only the answer for the copy the models were last asked about ends the
        # wait: an older copy's result (a better copy joined meanwhile) or a
        # merged-away cluster's still leaves a request in flight.
        if state.detect_sha256 in (None, r.sha256):
            state.models_pending = False
        return self._commit(state, out, offset, None)

    def _commit(self, state: ClusterState, out: Outcome, offset: int, s: Sighting | None) -> Outcome:
        """Score, decide on an alert, and stamp the op's offset on the state:
        the offset is what makes a redelivered op recognisable."""
        top = self._score(state)
        v = self._velocity(state)  # once: it reads the whole last hour
        self._maybe_alert(state, out, s, top, v, offset)
        state.revision += 1
        state.applied_offset = offset
        # the survivor of a merge first, then the clusters it merged (the
        # stage writes in this order, merged-away ones last: ``ClusterStage._write``)
        out.writes = {state.cluster_id: state, **{c: w for c, w in out.writes.items() if c != state.cluster_id}}
        out.snapshots.append(self._snapshot(state, s, top, v))
        return out

    # -- pieces -------------------------------------------------------------
    def _count(self, state: ClusterState, s: Sighting, t: float) -> None:
        ev = s.event
        state.sightings += 1
        if ev.account_id not in state.accounts and len(state.accounts) < MAX_ACCOUNTS:
            state.accounts.append(ev.account_id)
        if ev.platform not in state.platforms:
            state.platforms.append(ev.platform)
        _reached(state, {ev.platform: ev.posted_at})
        g = ev.engagement
        state.engagement = state.engagement + g
        state.first_seen = min(filter(None, [state.first_seen, ev.posted_at]))
        state.last_seen = max(filter(None, [state.last_seen, ev.posted_at]))
        state.sample_posts = earliest_posts([*state.sample_posts, SamplePost.of(ev)])
        state.recent = virality.add(state.recent, virality.RecentSighting(t=t, e=ev.event_id, a=ev.account_id,
                                                                          p=ev.platform, g=g.total),
                                    max(t, _window_end(state)))

    def _absorb(self, into: ClusterState, other: ClusterState, offset: int | None) -> bool:
        """Merge ``other`` into ``into`` once: where ``into`` lists it in
        ``merged_from`` already (its fold was written, its mark was not),
        ``other`` is only marked. ``offset``: the merging op's, stamped on
        ``other``; None leaves its ``applied_offset``. Returns whether
        ``into`` changed."""
        if other.cluster_id in into.merged_from:
            other.merged_into = into.cluster_id
            other.revision += 1
            if offset is not None:
                other.applied_offset = offset
            return False
        self._fold(into, other, offset)
        return True

    def _fold(self, into: ClusterState, other: ClusterState, offset: int | None) -> None:
        """Merge ``other`` into ``into``: counts add up, ``other`` keeps its id
        with ``merged_into`` so analysts can see what merged. Not idempotent
        on its own: ``_absorb`` decides."""
        seen = {m.sha256 for m in into.members}
        into.members.extend(m for m in other.members if m.sha256 not in seen)
        known = {(e.detector, e.sha256) for e in into.evidence}
        into.evidence.extend(e for e in other.evidence if (e.detector, e.sha256) not in known)
        names = {e.detector for e in into.model_evidence}
        into.model_evidence.extend(e for e in other.model_evidence if e.detector not in names)
        into.sightings += other.sightings
        known_accounts = set(into.accounts)
        into.accounts.extend(a for a in other.accounts if a not in known_accounts)
        into.accounts = into.accounts[:MAX_ACCOUNTS]
        into.platforms.extend(p for p in other.platforms if p not in into.platforms)
        _reached(into, other.platform_since)
        into.engagement = into.engagement + other.engagement
        ids = {r.e for r in into.recent}
        into.recent.extend(r for r in other.recent if r.e not in ids)
        into.first_seen = min(filter(None, [into.first_seen, other.first_seen]), default=None)
        into.last_seen = max(filter(None, [into.last_seen, other.last_seen]), default=None)
        into.sample_posts = earliest_posts([*into.sample_posts, *other.sample_posts])
        if into.recent:  # windows end at event time (``event_time``), not at a date posted ahead
            into.recent = virality.trim(into.recent, max(r.t for r in into.recent))
        # Levels continue from the higher; the next escalation is measured from the fastest
        # velocity either part was alerted at. Taken from the higher level only, two parts
        # alerted at one level kept the survivor's velocity: which cluster survived decided
        # whether the merge alone "escalated" (1 at 3 and 1 at 12 merged at 16: "16 >= 4x 3"
        # when the survivor was the slower part, nothing when it was the faster).
        into.alert_level = max(into.alert_level, other.alert_level)
        into.alert_velocity = max(into.alert_velocity, other.alert_velocity)
        # both clusters' alerts: an op read again sends those it (or a later op) raised, whichever cluster raised them
        into.alerts = sorted([*into.alerts, *(a for a in other.alerts if a not in into.alerts)],
                             key=lambda a: a.offset)[-ALERTS_KEPT:]
        into.models_pending = into.models_pending and other.models_pending
        into.merged_from = sorted({*into.merged_from, other.cluster_id, *other.merged_from})
        into.merges.extend(a for a in other.merges if a not in into.merges)
        into.apart = into.apart or other.apart
        other.merged_into = into.cluster_id
        other.revision += 1
        if offset is not None:
            other.applied_offset = offset

    def _score(self, state: ClusterState) -> list[Evidence]:
        """Fuse the cluster's evidence; returns it ranked, for the snapshot and any alert."""
        fused = fuse(state.evidence + state.model_evidence)
        state.fake_score, state.verdict = fused.score, fused.verdict
        allow = [e for e in state.evidence if e.data.get("suppress")]
        state.suppressed = f"allow-listed: {allow[0].detail}" if allow else None
        return fused.evidence

    def _velocity(self, state: ClusterState):
        return virality.velocity(state.recent, _window_end(state))

    def _maybe_alert(self, state: ClusterState, out: Outcome, trigger: Sighting | None, top: list[Evidence],
                     v: Velocity, offset: int) -> None:
        cfg = self.settings.alerts
        if state.suppressed or state.fake_score < cfg.min_fake_score:
            return
        if state.alert_level == 0:
            needed = cfg.min_sightings_5m
        elif state.alert_velocity < virality.MAX_RECENT:
            # velocity counts at most MAX_RECENT sightings: the target is capped there (escalating once
            # on reaching it), or a cluster past MAX_RECENT / factor would never escalate again
            needed = min(max(1, state.alert_velocity) * cfg.escalation_factor, virality.MAX_RECENT)
        else:
            return
        # Spread, not posts: an account's sightings past ``max_sightings_per_account`` in a window do
        # not count (one bot posting a fake 10 times in 5 minutes paged everyone as "viral"), for
        # the first alert and escalations alike. The alert still reports ``v``, the posts. Counted
        # only where the posts reach the thresholds: the count is at most the posts.
        if v.sightings_5m < max(needed, cfg.min_sightings_5m) or v.sightings_1h < cfg.min_sightings_1h:
            return
        per_account = cfg.max_sightings_per_account
        end = _window_end(state)
        spread_5m = virality.spread(state.recent, end, virality.WINDOW_5M, per_account)
        if spread_5m < max(needed, cfg.min_sightings_5m) or (
                cfg.min_sightings_1h
                and virality.spread(state.recent, end, virality.WINDOW_1H, per_account) < cfg.min_sightings_1h):
            return
        if state.alert_level == 0:
            rule = f"fake_score>={cfg.min_fake_score} and sightings_5m>={cfg.min_sightings_5m}"
        else:
            rule = f"escalation: sightings_5m {spread_5m} >= {cfg.escalation_factor}x {state.alert_velocity}"
            if max(1, state.alert_velocity) * cfg.escalation_factor > virality.MAX_RECENT:
                rule += f" (capped at {virality.MAX_RECENT}, the most velocity counts)"
        if spread_5m != v.sightings_5m:  # the subscriber sees v.sightings_5m: say why the rule counts fewer
            rule += f" (counting at most {per_account} per account: {spread_5m} of {v.sightings_5m} sightings)"
        rule += _behind(state, trigger)
        state.alert_level += 1
        state.alert_velocity = spread_5m
        alert = Alert(
            alert_id=f"{state.cluster_id}:{state.alert_level}", cluster_id=state.cluster_id, rule=rule,
            level=state.alert_level, fake_score=state.fake_score, verdict=state.verdict, velocity=v,
            sightings=state.sightings, accounts=len(state.accounts), evidence=top,
            at=state.last_seen or datetime.now(timezone.utc),
            trigger_event_id=trigger.event.event_id if trigger else None,
            trigger_ingested_at=trigger.ingested_at if trigger else None,
            first_seen=state.first_seen, last_seen=state.last_seen, platforms=list(state.platforms),
            sample_posts=alert_samples(state, trigger), merged_from=list(state.merged_from),
        )
        state.alerts = [*state.alerts, RaisedAlert(offset=offset, alert=alert)][-ALERTS_KEPT:]
        out.alerts.append(alert)

    def _reemit(self, state: ClusterState, out: Outcome, s: Sighting | None, offset: int, *, get: Getter,
                merged: list[str]) -> Outcome:
        """An op already applied to ``state``: a crash may have landed between
        the state write and the sends, so send again (sinks are idempotent)
        the snapshot and every alert this op or a later one raised.
        A merge that crash left half-written was finished before this op
        (``rebuild``, ``_finish_merges``). ``merged``: clusters the index
        linked again on this op; each is absorbed (``_absorb``: marked, and
        folded only where ``state`` does not list it), ``applied_offset``
        unchanged."""
        out.already_applied = True
        changed = False
        for other_id in merged:
            other = _resolve(get, other_id)
            if other is None or other.cluster_id == state.cluster_id:
                continue
            changed = self._absorb(state, other, None) or changed
            out.writes[other.cluster_id] = other
            out.snapshots.append(self._snapshot(other, None))
        if changed:
            state.revision += 1
            self._score(state)
            out.writes[state.cluster_id] = state
        out.snapshots.append(self._snapshot(state, s))
        # Every alert this op or a later one raised: the stage writes a
        # batch's states before it sends the batch's alerts, so a worker
        # killed in between lost all but the last level of a batch that
        # raised several (the sink keys alerts by id: sending one again is harmless).
        # Ops are one partition's: offsets order them all.
        out.alerts.extend(a.alert for a in state.alerts if a.offset >= offset)
        req = model_request(state)
        if req is not None:
            out.detect_requests.append(req)
        return out

    def _snapshot(self, state: ClusterState, s: Sighting | None, top: list[Evidence] | None = None,
                  v: Velocity | None = None) -> ClusterSnapshot:
        now = datetime.now(timezone.utc)
        return ClusterSnapshot(
            cluster_id=state.cluster_id, revision=state.revision, fake_score=state.fake_score,
            verdict=state.verdict, evidence=_top(state) if top is None else top, members=state.members,
            sightings=state.sightings, accounts=len(state.accounts), platforms=state.platforms,
            engagement=state.engagement, velocity=self._velocity(state) if v is None else v,
            first_seen=state.first_seen or now, last_seen=state.last_seen or now,
            merged_from=state.merged_from, merged_into=state.merged_into,
            models_pending=state.models_pending, suppressed=state.suppressed,
            alert_level=state.alert_level, new_sighting=s,
        )


class InvalidOp(ValueError):
    """An op refused before it changed anything (``_check``)."""


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check(op: ClusterOp) -> None:
    """Refuse, before anything changes, an op the index or the state cannot
    take. A hash of the wrong length or a bad thumbnail failed half-way
    through ``assign`` (or, where only a later op parses it, failed that
    op), and codes whose lengths only add up were indexed misaligned; a
    non-finite number is written to the state as JSON ``null``, which no
    later read of that cluster's state (nor an index rebuild) can load."""
    if op.sighting is not None:
        h = op.sighting.hashes
        # the sha256 names the cluster it founds (``cluster_id_for``): a short
        # one could equal an existing id at every length ``_found`` tries
        bad = ["sha256"] if not _SHA256.fullmatch(op.sighting.sha256) else []
        bad += _bad_codes(h)
        if h.thumb is not None and not _thumb_ok(h.thumb):
            bad.append("thumb")
        if h.content_box is not None and not all(math.isfinite(x) for x in h.content_box):
            bad.append("content_box")
        if bad:
            raise InvalidOp(f"sighting {op.sighting.sha256[:64]!r} is malformed: {', '.join(bad[:8])}")


_FIELD_ORDER = {f: i for i, f in enumerate(ImageHashes.model_fields)}


def _bad_codes(h: ImageHashes) -> list[str]:
    """The record's fields (and ``views[i]``) whose code is not its signal
    type's (``detectors.signals``: each type's hex length), in the record's
    field order."""
    codes = sorted(((f, v, st) for st in signal_types() for f, v in st.values(h)), key=lambda c: _FIELD_ORDER[c[0]])
    bad = [f for f, v, st in codes if v is not None and not st.is_valid(v)]
    if (vt := view_signal_type()) is not None:  # the views are codes of one type (pHash)
        bad += [f"views[{i}]" for i, v in enumerate(h.views or []) if not vt.is_valid(v)]
    return bad


def _thumb_ok(thumb: str) -> bool:
    try:
        return len(base64.b64decode(thumb, validate=True)) == THUMB_SIDE * THUMB_SIDE
    except (binascii.Error, ValueError):
        return False


def event_time(s: Sighting) -> float:
    """When a sighting counts in the virality windows (and the event-time
    clock): when it was posted, but never after it reached the broker. A post
    dated ahead (up to ``ingest.max_future_skew_s`` passes validation) moved
    its cluster's window end with it: one copy dated 14 minutes ahead left the
    picture's real burst of 15 posts outside the 5-minute window, and the
    viral fake was never alerted."""
    t = s.event.posted_at.timestamp()
    return min(t, s.ingested_at.timestamp()) if s.ingested_at is not None else t


def _window_end(state: ClusterState) -> float:
    """The end of a cluster's virality windows: its newest sighting's event
    time (``event_time``), not ``last_seen``, which keeps the date as posted."""
    if state.recent:
        return state.recent[-1].t
    return state.last_seen.timestamp() if state.last_seen else 0.0


# How far behind its feed an alert's windows may end before the alert says so.
STALE_AFTER_S = virality.WINDOW_1H


def _behind(state: ClusterState, trigger: Sighting | None) -> str:
    """What an alert's rule adds when its windows ended long before it was
    raised: the velocity is the spread as it was then (event time), not
    now: a replay of last week's feed, a backlog, a connector catching up.
    Measured against the trigger's broker time (``ingested_at``: the same
    on every read of its op), else (a model result, a sighting without
    one) this worker's clock. "" for a live feed."""
    end = _window_end(state)
    if end <= 0:
        return ""  # no sighting timed: nothing to date
    now = trigger.ingested_at if trigger is not None and trigger.ingested_at is not None else None
    behind = (now or datetime.now(timezone.utc)).timestamp() - end
    if behind <= STALE_AFTER_S:
        return ""
    hours = behind / 3600
    age = f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
    as_of = datetime.fromtimestamp(end, timezone.utc)
    return f"; replayed or late feed: velocity as of {as_of:%Y-%m-%d %H:%M} UTC, {age} before this alert"


def _better_copy(s: Sighting, members: list[Member]) -> bool:
    """A clearly better copy than every member so far: at least 1.5x the
    pixels of the largest, or as large and lossless (PNG) where all were lossy."""
    area = s.width * s.height
    best = max((m.width * m.height for m in members), default=0)
    if best and area >= 1.5 * best:
        return True
    lossless = s.format.upper() in {"PNG", "TIFF", "BMP"}
    return lossless and area >= best > 0 and not any(m.format.upper() in {"PNG", "TIFF", "BMP"} for m in members)


def alert_samples(state: ClusterState, trigger: Sighting | None) -> list[SamplePost]:
    """The posts an alert carries: the cluster's earliest (``sample_posts``)
    and the post that triggered it when it is not one of them, earliest
    first; at most ``MAX_SAMPLE_POSTS`` + 1. From the state and the op
    alone, so a replay raises the same alert."""
    posts = list(state.sample_posts)
    if trigger is not None and all(p.event_id != trigger.event.event_id for p in posts):
        posts.append(SamplePost.of(trigger.event))
    return sorted(posts, key=SamplePost.order)


def _top(state: ClusterState) -> list[Evidence]:
    return fuse(state.evidence + state.model_evidence).evidence


def model_request(state: ClusterState) -> DetectRequest | None:
    """The request a cluster waiting for a model result waits on, to send
    again (its best copy's: the one an answer must name to end the wait);
    None when it waits for none."""
    if not (state.models_pending and state.members):
        return None
    return DetectRequest(cluster_id=state.cluster_id, sha256=state.detect_sha256 or state.members[0].sha256)


def _resolve(get: Getter, cluster_id: str) -> ClusterState | None:
    """Follow ``merged_into`` so ops addressed to a merged cluster land in its survivor."""
    state = get(cluster_id)
    for _ in range(64):
        if state is None or state.merged_into is None:
            return state
        state = get(state.merged_into)
    return state


def _unfinished_merges(states: dict[str, ClusterState]) -> list[tuple[str, str]]:
    """The merges among ``states`` (by id) a crash left half-written, as
    (merged cluster, survivor) pairs, sorted: a live cluster that a live
    survivor lists in ``merged_from`` (the survivor was written, the mark was
    not; a survivor that is itself listed hands it on to its own), and one
    marked ``merged_into`` a live cluster that does not list it (the mark was
    written, the survivor was not: a stage that wrote merged clusters first).
    From the states alone, so every rebuild finds the same."""
    live = {cid: s for cid, s in states.items() if s.merged_into is None}
    listed: dict[str, str] = {}
    for cid in sorted(live):
        for other in live[cid].merged_from:
            if other in live and other != cid:
                listed.setdefault(other, cid)

    def survivor(cid: str) -> str:
        seen = {cid}
        while cid in listed and listed[cid] not in seen:
            cid = listed[cid]
            seen.add(cid)
        return cid

    pairs = {other: survivor(into) for other, into in listed.items()}
    for cid, s in states.items():
        into = s.merged_into
        if into is not None and into in live and into not in pairs and cid not in live[into].merged_from:
            pairs[cid] = into
    return sorted((other, into) for other, into in pairs.items() if other != into)


def _member_hashes(m: Member):
    from detectors.hashing import ImageHashes

    return ImageHashes(phash=m.phash, pdq=m.pdq, pdq_quality=m.pdq_quality, views=m.views, trimmed=m.trimmed,
                       thumb=m.thumb, content_box=m.content_box)
