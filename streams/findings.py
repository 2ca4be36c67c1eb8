"""The findings interface: what sinks write and what queries, the desk and
alert tooling read, whatever the backend (embedded SQLite or Elasticsearch).

Read records are typed and versioned; ``ClusterRecord.as_json()`` is exactly
the object ``deepwatch clusters --format json`` and ``deepwatch search`` print.
The cluster engine's own state (cold tier, revival, seeding) is not part of
this interface (``streams.engine_state``). Findings are written at the end of
the flow; upstream, the analyze stage reads one thing of them, the post an
event id was already stored with (``sighting_identity``: duplicates and
conflicting resends, exact and unbounded in time), and records each event
it settles there (``mark_processed``), so a replayed offset is counted once.

Read records are read by attribute, as typed (a datetime, an enum, a nested
model); none reads as a dict (``record["field"]``, ``.get``, ``.items()``,
``"field" in record``). ``as_json()`` is the JSON object where one is wanted:
an API answer, ``--format json``.

The analyst search both stores answer (its query, orders, paging and time
limit) is ``streams.cluster_search``; the page cursors clients carry,
``streams.cursors``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import (
    TYPE_CHECKING, Any, Callable, Collection, Generic, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar,
    get_args, runtime_checkable,
)
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from detectors.base import EvidenceKind
from detectors.fusion import Verdict
from streams.cursors import NOT_A_CURSOR, decode_cursor, encode_cursor
from streams.es_client import CREDENTIALS_IN_URL
from streams.records import Alert, ClusterSnapshot, DeadLetter, Engagement, SamplePost, SourceRef, Velocity

if TYPE_CHECKING:  # these modules import this one's records (``streams.cluster_search``, ``streams.store_members``)
    from streams.cluster_search import ClusterQuery, SearchCursor, SearchPage
    from streams.store_members import KeyedMember

MAX_RESULTS = 10_000  # one Elasticsearch result window; the same bound on SQLite
SCORE_DECIMALS = 4  # a cluster's fake score as every record shows it
# a delivery queued longer ago than any attempt takes was left by a stopped worker: redelivery's
# to send, no longer a run's pending work
QUEUED_RECENT_S = 900
VERDICTS: tuple[str, ...] = get_args(Verdict)  # the stream's verdicts (``detectors.fusion``)


def shown_score(score: float) -> float:
    """A fake score as records show it (``SCORE_DECIMALS``)."""
    return round(score, SCORE_DECIMALS)


def score_floor(min_score: float) -> float:
    """The stored score a ``min_score`` condition compares with: the least
    one shown as ``min_score`` or more (``min_score`` first taken up to the
    shown precision: no shown score lies between). Compared unrounded,
    ``--min-score 1`` left out every cluster shown with a score of 1.0
    (stored 0.99999...)."""
    step = 10 ** -SCORE_DECIMALS
    return math.ceil(round(min_score / step, 6)) * step - step / 2


class _ReadRecord(BaseModel):
    """A typed store read, read by attribute; ``as_json`` is the JSON object
    it serialises to."""

    # Fields it does not know are ignored: a rollback reads rows a newer deepwatch stored, with the
    # fields it added (the forward-compatibility rule of ``streams.records``); refused, each such row
    # read as "changed outside deepwatch", and redelivery stopped at it.
    model_config = ConfigDict(frozen=True, extra="ignore")

    # Every read record says its shape's version in a field of its own, ``schema_version: int = 1``
    # (an addition: none is renamed). A row stored before records were versioned carries none, or a
    # reader hands on its document's missing one as None: it reads as version 1.
    @field_validator("schema_version", mode="before", check_fields=False)
    @classmethod
    def _unversioned(cls, v: Any) -> Any:
        return 1 if v is None else v

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def __contains__(self, key: object) -> bool:
        # pydantic iterates a model as (name, value) pairs: without this a check left over from the
        # dict rows (``"suppressed" in record``) answered False, whatever the record holds
        raise TypeError(f"a {type(self).__name__} is read by attribute, not by key: "
                        f"getattr(record, {key!r}), or as_json() for its JSON object")


R = TypeVar("R")


MAX_MERGE_HOPS = 64


def surviving_cluster(cluster_id: str, merged_into: Mapping[str, str | None]) -> str:
    """The cluster ``cluster_id`` was merged into, following the chain
    (``merged_into``: cluster id -> the cluster it was merged into, or
    nothing). Every store reads merges so: sightings keep the id they were
    recorded under, and a chain longer than ``MAX_MERGE_HOPS`` (or a cycle)
    stops there."""
    cur, hops = cluster_id, 0
    while merged_into.get(cur) and hops < MAX_MERGE_HOPS:
        cur, hops = merged_into[cur], hops + 1  # type: ignore[assignment]
    return cur


class Page(list, Generic[R]):
    """The rows of a bounded read (``alerts(limit=...)``, ``dead_letters(limit=...)``):
    a plain list, plus ``total``, how many rows there are in all (``len(page) <
    page.total`` when the limit cut the read)."""

    def __init__(self, rows: Iterable[R] = (), total: int | None = None):
        super().__init__(rows)
        self.total = len(self) if total is None else max(total, len(self))

    @property
    def cut(self) -> bool:
        return len(self) < self.total


def read_limit(limit: int | None) -> int | None:
    """``limit`` as the stores take it: None (or 0) = every row, else at least 1."""
    if limit is None or limit == 0:
        return None
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    return int(limit)


class EvidenceItem(BaseModel):
    """One detector finding as stored on a cluster (``Evidence`` without Nones)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    detector: str
    kind: EvidenceKind | None = None  # None: stored before evidence had kinds (``Evidence`` recovers it)
    score: float
    detail: str
    weight: float = 1.0
    sha256: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class MemberItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sha256: str
    phash: str
    pdq: str
    pdq_quality: int
    event_id: str
    width: int | None = None
    height: int | None = None
    format: str | None = None
    distance: int | None = None


class ClusterRecord(_ReadRecord):
    """One picture's cluster as every findings reader sees it (schema v1).

    Fields up to ``updated_at`` are the original ``clusters --format json``
    shape; later ones are additions (never renames)."""

    id: str
    fake_score: float
    verdict: Verdict
    evidence: list[EvidenceItem]
    sightings: int
    accounts: int
    platforms: list[str]
    first_seen: str
    last_seen: str
    velocity: Velocity
    engagement: Engagement
    members: list[MemberItem]
    merged_from: list[str]
    merged_into: str | None
    models_pending: bool
    suppressed: str | None
    alert_level: int
    stream_sightings: int  # the stream's own running count; equals ``sightings`` unless something was lost
    revision: int
    updated_at: str | None
    schema_version: int = 1

    @field_validator("evidence", mode="before")
    @classmethod
    def _evidence(cls, v: Any) -> Any:
        return [e.model_dump(exclude_none=True) if isinstance(e, BaseModel) else e for e in v]

    def as_json(self) -> dict[str, Any]:
        """The JSON object, plus ``members_total``: how many members the
        cluster has, where a reader shows a page of ``members`` (the desk's
        API, ``deepwatch clusters --members``)."""
        doc = self.model_dump(mode="json")
        doc["evidence"] = [e.model_dump(mode="json", exclude_none=True) for e in self.evidence]
        doc["members_total"] = len(self.members)
        return doc


class AlertRecord(_ReadRecord):
    """A stored alert: the ``Alert`` message as the alert sink kept it."""

    model_config = ConfigDict(frozen=True, extra="allow")
    schema_version: int = 1
    alert_id: str
    cluster_id: str
    rule: str
    level: int
    fake_score: float
    verdict: Verdict
    velocity: Velocity
    sightings: int
    accounts: int
    evidence: list[EvidenceItem]
    at: datetime
    trigger_event_id: str | None = None
    trigger_ingested_at: datetime | None = None
    created_at: datetime
    # absent from alerts stored before they existed (``Alert``)
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    platforms: list[str] = Field(default_factory=list)
    sample_posts: list[SamplePost] = Field(default_factory=list)
    account_id: str | None = None  # an account alert's account
    merged_from: list[str] = Field(default_factory=list)


class DeadLetterRecord(_ReadRecord):
    event_id: str | None
    stage: str
    reason: str
    detail: str
    source: SourceRef | None
    payload_excerpt: str | None
    at: str
    schema_version: int = 1


class SightingRecord(_ReadRecord):
    """One post carrying a cluster's picture (schema v1): what the desk shows
    for "where, when, by whom"."""

    event_id: str
    cluster_id: str  # the cluster it was recorded under (may since be merged into another)
    sha256: str
    platform: str
    account_id: str
    account_handle: str | None
    post_url: str | None
    posted_at: str
    text: str | None
    hashtags: list[str]
    lang: str | None
    engagement: Engagement
    schema_version: int = 1


class AccountAggregate(_ReadRecord):
    """One account's sightings, counted by the store (schema v1): what the
    desk's account list and account page are built from, without the desk
    reading the sightings. "AI" is the caller's set of cluster ids
    (``FindingsStore.account_aggregates``)."""

    account_id: str
    handle: str | None  # the first non-empty handle, in posting order
    posts: int
    pictures: int  # distinct sha256
    ai_pictures: int  # distinct sha256 among its sightings recorded under an AI cluster id
    first_seen: str  # posted_at of its first post (store order: posted_at, then event id), as recorded
    last_seen: str  # and of its last
    first_event_id: str  # ties in the ranking go to the account that posted first
    platforms: list[str]  # sorted
    cluster_ids: list[str]  # sorted, as recorded (not resolved through merges)
    median_gap_s: float | None  # between consecutive posts, to the millisecond; None with one post
    schema_version: int = 1


class AccountWindow(_ReadRecord):
    """One account's posts within a window before its own last post (schema
    v1): what account alerts are decided on."""

    account_id: str
    pictures: int  # distinct sha256 within the window
    ai_pictures: int
    posts: int
    platforms: list[str]  # sorted
    last_seen: str  # posted_at of its last post, as recorded
    schema_version: int = 1


@dataclass(frozen=True)
class MemberRow:
    """One stored picture of a cluster, under the cluster that survives its
    merges: the hashes a similar-picture lookup compares (``streams.similar``),
    read from either store."""

    cluster_id: str
    sha256: str
    phash: str
    pdq: str
    pdq_quality: int
    views: list[str] | None = None
    trimmed: bool = False


@dataclass(frozen=True)
class PostIdentity:
    """What a resend of an event must repeat to be the same post: its
    picture, platform and account. Text, hashtags, engagement and the
    claimed time may change (an edited status, updated counts); anything
    here that differs under one event id is a producer's bug
    (``dedupe:conflict``), not a repost to drop unseen."""

    sha256: str
    platform: str
    account_id: str

    def __post_init__(self) -> None:
        # events store their platform in lower case (``ImageEvent``), sightings stored before did not:
        # a resend of a post stored as "X" is the same post as "x", not a conflict
        object.__setattr__(self, "platform", self.platform.strip().lower())

    def differences(self, other: "PostIdentity") -> str:
        """What ``other`` (a later event under the same id) changed, in words."""
        return "; ".join(f"{name} {getattr(self, name)!r} -> {getattr(other, name)!r}"
                         for name in ("platform", "account_id") if getattr(self, name) != getattr(other, name))


def account_rank(ai_pictures: int, pictures: int, posts: int) -> tuple[float, int, int]:
    """The account list's order, descending: AI share as shown (rounded to
    4 places), then AI pictures, then posts (then, ascending, first post)."""
    return round(ai_pictures / pictures if pictures else 0.0, 4), ai_pictures, posts


class AccountCursor(BaseModel):
    """A place in the account ranking (``account_rank``, then first post):
    ``account_aggregates(after=...)`` answers only the accounts ranked after
    it. Made from the last account of a page (``of``), it pages by the
    ranking's own key, so rows added meanwhile move no page boundary the way
    an offset would; an account whose counts changed between two pages is
    where its new counts rank it. A first post's event id is one account's
    only, so the order is total. Carried by a client as an opaque token
    (``encode``/``decode``): it only says where to start in the list the
    query's filters select, never what to list."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ai_share: float = Field(ge=0.0, le=1.0)  # rounded as ``account_rank`` rounds it
    ai_pictures: int = Field(ge=0, le=2**63 - 1)
    posts: int = Field(ge=0, le=2**63 - 1)
    first_seen: str = Field(min_length=1, max_length=64)  # posted_at of its first post, as recorded
    first_event_id: str = Field(min_length=1, max_length=256)

    @field_validator("first_seen")
    @classmethod
    def _iso(cls, v: str) -> str:
        datetime.fromisoformat(v)  # ValueError: not a time
        return v

    @classmethod
    def of(cls, a: "AccountAggregate") -> "AccountCursor":
        share, ai, posts = account_rank(a.ai_pictures, a.pictures, a.posts)
        return cls(ai_share=share, ai_pictures=ai, posts=posts, first_seen=a.first_seen,
                   first_event_id=a.first_event_id)

    def first_ms(self) -> int:
        """The first post's time in whole epoch milliseconds (finer digits
        dropped, no offset read as UTC): what Elasticsearch sorts a date by."""
        d = datetime.fromisoformat(self.first_seen)
        d = d if d.tzinfo else d.replace(tzinfo=timezone.utc)
        return (d - _EPOCH) // timedelta(milliseconds=1)

    def encode(self) -> str:
        return encode_cursor([self.ai_share, self.ai_pictures, self.posts, self.first_seen, self.first_event_id])

    @classmethod
    def decode(cls, token: str) -> "AccountCursor":
        """``encode``'s token back; ValueError for anything else."""
        items = decode_cursor(token)
        if len(items) != 5:
            raise ValueError(NOT_A_CURSOR)
        share, ai, posts, first_seen, event_id = items
        if not (isinstance(share, (int, float)) and isinstance(ai, int) and isinstance(posts, int)
                and isinstance(first_seen, str) and isinstance(event_id, str)):
            raise ValueError(NOT_A_CURSOR)
        try:
            return cls(ai_share=float(share), ai_pictures=ai, posts=posts, first_seen=first_seen,
                       first_event_id=event_id)
        except ValueError:  # pydantic's ValidationError is one
            raise ValueError(NOT_A_CURSOR) from None


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def dead_letter_identity(dl: DeadLetter) -> str:
    """A dead letter's key in both stores (Elasticsearch makes an over-long
    one a digest, ``streams.es_docs.doc_id``): what the event is, not where
    it sat on the broker, so the same bad event replayed later is still one
    dead letter. With the digest of the whole message
    (``DeadLetter.payload_sha256``), different events failing alike are told
    apart: two posts sent under one event id, or two unparseable lines that
    share their first 512 bytes, are two dead letters (byte-identical
    messages are one event sent twice)."""
    if dl.payload_sha256 is not None:
        return f"{dl.event_id or 'sha256:' + dl.payload_sha256}/{dl.stage}/{dl.reason}/{dl.payload_sha256[:32]}"
    ident = dl.event_id or "sha256:" + hashlib.sha256((dl.payload_excerpt or dl.detail).encode()).hexdigest()
    return f"{ident}/{dl.stage}/{dl.reason}"


def legacy_dead_letter_identity(dl: DeadLetter) -> str | None:
    """The key a store written before dead letters carried their message's
    digest holds ``dl``'s failure under (``dead_letter_identity`` without
    ``payload_sha256``: event id, or the digest of the excerpt, then stage
    and reason), or None for a dead letter without a digest, whose key is
    that already. The stores look rows of events without an id up by key,
    so they ask for this one too (``_same_event`` matches it)."""
    if dl.payload_sha256 is None:
        return None
    return dead_letter_identity(dl.model_copy(update={"payload_sha256": None}))


# One outcome per event: the rules both stores apply when they write a
# sighting or a dead letter (``plan_dead_letters``, ``superseded_by_sighting``).
# A key stays ``dead_letter_identity`` (stored keys and document ids never
# change); what an event is, across stages and reasons, is found by matching
# a stored row's key against the identity the new dead letter would have had
# with the row's stage and reason (``_same_event``), so rows written before
# these rules are matched too.


@dataclass(frozen=True)
class StoredDeadLetter:
    """What a store holds of one dead letter, as the write rules read it:
    its stored ``key`` (``dead_letter_identity``, or for Elasticsearch its
    ``doc_id``), the event it names, why, when, and where it sat."""

    key: str
    event_id: str | None
    stage: str
    reason: str
    at: datetime
    source: SourceRef | None


@dataclass
class DeadLetterPlan:
    """What a batch of dead letters does to a store (``plan_dead_letters``).
    ``write``: store under its key (none is stored there);
    ``delete``: stored rows of the same events that an event's later failure
    replaces; ``older``: failures older than the one stored for their event,
    the same failure again, and the earlier of one event's failures within
    the batch (accounted as dead letters, nothing written); ``succeeded``: failures of events the
    store already holds as a sighting (accounted, never kept: the event
    succeeded)."""

    write: list[DeadLetter]
    delete: list[StoredDeadLetter]
    older: list[DeadLetter]
    succeeded: list[DeadLetter]


def superseded_by_sighting(stage: str, reason: str) -> bool:
    """Whether a sighting stored under a dead letter's event id replaces it
    (and keeps a later one out). Every failure of the event does (a fetch
    that timed out, a host that was down: the event was tried again and got
    through); a conflict does not: it is another post sent under an id a
    stored sighting took (``streams.stage``), the only record of that post.

    A different post sent under the id that failed before the conflict
    check could see it (its picture could not be fetched) cannot be told
    from a failed copy of the stored one: a sighting has no digest of its
    message. It is taken for a failed copy."""
    return not (stage == "dedupe" and reason == "conflict")


def _at(dl_at: datetime) -> datetime:
    return dl_at if dl_at.tzinfo else dl_at.replace(tzinfo=timezone.utc)


def stored_at(text: str | None) -> datetime:
    """A stored dead letter's ``at`` (``DeadLetter.at`` as ISO text) for
    ``StoredDeadLetter``; one that does not read (edited by hand) as the
    oldest time, so any new failure of its event replaces it rather than a
    sink batch failing on it for good."""
    try:
        return _at(datetime.fromisoformat(text or ""))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)


def _same_event(dl: DeadLetter, row: StoredDeadLetter, key: Callable[[str], str]) -> bool:
    """``row`` is a failure of the message ``dl`` failed on: the same event
    id and payload digest (or, for a dead letter without a digest, the
    same event id and none), whatever the stage and reason; or a row an
    older store keyed without the digest (``legacy_dead_letter_identity``)."""
    if row.event_id != dl.event_id:
        return False
    as_row = dl.model_copy(update={"stage": row.stage, "reason": row.reason})
    if key(dead_letter_identity(as_row)) == row.key:
        return True
    # a row written before dead letters carried their message's digest: keyed by event (or, without an
    # event id, the digest of the excerpt), stage and reason; a message past the excerpt shares that key
    # with any other sharing its first 512 bytes, which the older store already kept as one row
    legacy = legacy_dead_letter_identity(as_row)
    return legacy is not None and key(legacy) == row.key


def plan_dead_letters(dls: Iterable[DeadLetter], stored: Iterable[StoredDeadLetter], sighted: Collection[str],
                      key: Callable[[str], str] = lambda k: k) -> DeadLetterPlan:
    """One row per failed event in the store, whatever order copies of it
    come in: ``dls`` to write, given the rows the store holds of their
    events (``stored``: any superset, e.g. every row with one of their event
    ids) and which of their event ids have a stored sighting (``sighted``).

    A failure of an event stored as a sighting is not kept
    (``superseded_by_sighting``). Failures of one event (same event id and
    payload digest) are one row: the latest (``at``) replaces the others,
    whatever their stage and reason; the same dead letter again (the same
    stage and reason, even with a later ``at``: a redelivery built anew), or
    an older one (a replay of the dead-letter topic), changes nothing. Two
    different messages under one event id stay two rows
    (``dead_letter_identity``). ``key`` maps an identity to the stored key."""
    rows = list(stored)
    latest: dict[tuple[str | None, str], DeadLetter] = {}
    plan = DeadLetterPlan([], [], [], [])
    for dl in dls:
        if dl.event_id is not None and dl.event_id in sighted and superseded_by_sighting(dl.stage, dl.reason):
            plan.succeeded.append(dl)
            continue
        # one event's failures within the batch: the latest stands for them (the first of equal times)
        slot = (dl.event_id, dl.payload_sha256 or ("" if dl.event_id else key(dead_letter_identity(dl))))
        have = latest.get(slot)
        if have is None or _at(dl.at) > _at(have.at):
            if have is not None:
                plan.older.append(have)
            latest[slot] = dl
        else:
            plan.older.append(dl)
    for dl in latest.values():
        mine = key(dead_letter_identity(dl))
        same = [r for r in rows if _same_event(dl, r, key)]
        if any(r.key == mine or _at(r.at) > _at(dl.at) for r in same):
            plan.older.append(dl)  # this very failure is stored (a redelivery, built anew or not), or a later one
            continue
        plan.write.append(dl)
        plan.delete.extend(r for r in same if r.key != mine)
    return plan


class DeliveryState(StrEnum):
    """Where the delivery of an alert to one webhook target stands. Every
    decision (what redelivery sends, what waits, what is counted) reads
    this, never the text of why (``DeliveryRecord.detail``)."""

    QUEUED = "queued"  # handed to its target's sender, not tried yet
    DELIVERED = "delivered"
    FAILED = "failed"  # still owed: redelivery tries it again, later alerts of its cluster wait for it
    REJECTED = "rejected"  # refused for good: only an operator's `deepwatch redeliver` queues it again

    @property
    def settled(self) -> bool:
        """Over: delivered, or rejected. Neither is sent again on its own."""
        return self in (DeliveryState.DELIVERED, DeliveryState.REJECTED)


# what waits per target (``undelivered_counts``, `deepwatch redeliver`, the undelivered gauge), in this order
UNDELIVERED: tuple[DeliveryState, ...] = (DeliveryState.QUEUED, DeliveryState.FAILED, DeliveryState.REJECTED)


class DeliveryRecord(_ReadRecord):
    """The delivery of one alert to one webhook target as the store keeps
    it: its ``state``, why (``detail``: an HTTP status, the reason it
    waits; empty when there is nothing to say) and when (``at``).
    ``status`` is the line `deepwatch alerts` has always shown for it,
    ``<state>: <detail>``."""

    target: str
    state: DeliveryState
    detail: str = ""
    at: str
    schema_version: int = 1

    @computed_field
    @property
    def status(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else str(self.state)


def requeued_detail(was: DeliveryRecord) -> str:
    """The why of a delivery an operator queued again (``requeue_deliveries``): what it was."""
    return f"queued again by an operator (was {was.status[:200]})"


def legacy_delivery(status: str) -> tuple[DeliveryState, str]:
    """The state and why of a delivery recorded before records had a state
    of their own (SQLite files of schema 1, Elasticsearch documents of
    mapping v3), whose one ``status`` text held both: "queued",
    "delivered", "failed: <why>", "rejected: <why>". The one reader of that
    text's prefix, for those records only: the SQLite store derives each
    old row's state with it once, when it opens the file; Elasticsearch
    documents are not rewritten, so its store reads each old one through it.
    A text of none of these forms (never written) reads as failed, as the
    old readers counted it."""
    head, _, why = status.partition(": ")
    try:
        return DeliveryState(head), without_webhook_urls(why)
    except ValueError:
        return DeliveryState.FAILED, without_webhook_urls(status)


def without_webhook_urls(text: str, *urls: str) -> str:
    """``text`` (a delivery's why) with every URL in it shown as its
    target's label (``streams.webhooks.target_label``: scheme, host and
    port): ``urls`` (a record's own target URL) wherever they appear, then
    anything else shaped like one. deepwatch before targets were keyed
    wrote the whole webhook URL into each delivery's status ("failed:
    http://host/hook?token=...: HTTP 503"), a token with it; every reader of
    old records (``legacy_delivery``, the stores' migration and reads) puts
    them through this, so no command, page, log or metric shows one. Text
    written since holds labels only and comes back unchanged."""
    from streams.webhooks import hide_urls, target_label  # webhooks imports this module

    for url in urls:
        if url and "://" in url:
            text = text.replace(url, target_label(url))
    return hide_urls(text)


def unstored_alerts(clusters: Iterable[tuple[str, int, Iterable[str]]],
                    stored: Iterable[tuple[str, str, int]]) -> int:
    """How many stream alerts the cluster engine raised that the store does
    not hold (``pending_work``). ``clusters``: (cluster id, alert level, the
    ids merged into it) of every cluster with a level, merged-away ones too;
    ``stored``: (alert id, cluster id, level) of stored alerts.

    A cluster at level L raised levels 1..L, each under its own id or, where
    it took a higher level over in a merge, under a cluster merged into it
    (``streams.clustering``: the survivor keeps the higher level): every
    level k <= L needs a stored alert of level k under the cluster or one
    merged into it. Only the engine's alerts count (id ``<cluster>:<level>``):
    the desk's (``<cluster>:desk-<verdict>``, with ``:<verdict id>`` when said
    again) and account alerts (``account:...``, no cluster of that id) are
    never raised by the stream."""
    levels: dict[str, set[int]] = {}
    for alert_id, cluster_id, level in stored:
        if alert_id == f"{cluster_id}:{level}":
            levels.setdefault(cluster_id, set()).add(int(level))
    missing = 0
    for cluster_id, level, merged_from in clusters:
        have: set[int] = set()
        for cid in (cluster_id, *merged_from):
            have |= levels.get(cid, set())
        missing += sum(1 for k in range(1, int(level) + 1) if k not in have)
    return missing


def cluster_page_url(public_url: str | None, cluster_id: str) -> str | None:
    """The desk's page of a cluster (``/clusters/{cluster_id}``, the id
    percent-encoded as one path segment) under ``desk.public_url``; None
    without an address."""
    if not public_url:
        return None
    return f"{public_url}/clusters/{quote(cluster_id, safe='')}"


# Path segments a browser resolves before it sends the request (WHATWG URL:
# "." and "..", and their escapes "%2e", ".%2e", ... alike, so no escaping
# helps): an account named ".." linked as /accounts/.. opened the queue, one
# named "." /accounts/ (a 404). The empty id would be that 404 too.
_DOT_SEGMENTS = frozenset({"", ".", ".."})


def account_page_path(account_id: str) -> str:
    """The desk's page of an account: ``/accounts/<id as one segment>``, or,
    for an id a browser would resolve away (``_DOT_SEGMENTS``), the same page
    with the id in the query (``/accounts/?id=..``, which the desk reads)."""
    if account_id in _DOT_SEGMENTS:
        return "/accounts/?" + urlencode({"id": account_id})
    return "/accounts/" + quote(account_id, safe="")


def account_page_url(public_url: str | None, account_id: str) -> str | None:
    """``account_page_path`` under ``desk.public_url``; None without an address."""
    return f"{public_url}{account_page_path(account_id)}" if public_url else None


class SinkWriter(Protocol):
    """What a worker's sinks write (``streams.sinks.Sinks``: the snapshot,
    dead-letter and alert agents, and the webhook senders), and the one
    record they read back: a delivery's own state, so an alert is not sent
    twice. The redelivery worker (``streams.webhook_redelivery.Redeliverer``) records
    its attempts through ``mark_delivered`` too. A role of its own because
    the write path lists and searches nothing: it can be given, faked or
    wrapped without the store's reads."""

    def apply_snapshot(self, snap: ClusterSnapshot) -> None: ...
    def apply_snapshots(self, snaps: Iterable[ClusterSnapshot]) -> None: ...
    def add_dead_letter(self, dl: DeadLetter) -> bool: ...
    def add_dead_letters(self, dls: Iterable[DeadLetter]) -> int:
        """Store dead letters one row per failed event (``plan_dead_letters``;
        a sighting written by ``apply_snapshots`` supersedes its event's):
        returns how many rows were written."""
        ...
    def add_alert(self, alert: Alert) -> bool: ...
    def delivered(self, alert_id: str, target: str) -> bool: ...
    def delivery_state(self, alert_id: str, target: str) -> DeliveryState | None:
        """The recorded state of the delivery of ``alert_id`` to ``target``
        (None: none recorded), read as written (no refresh delay)."""
        ...
    def mark_delivered(self, alert_id: str, target: str, state: DeliveryState, detail: str = "",
                       moved_from: Sequence[str] = ()) -> None:
        """Record a delivery's state and why (``DeliveryRecord``), never
        moving it away from ``delivered``; the alert's records under
        ``moved_from`` (its hook's earlier keys) go with it, so each alert
        has one record per hook; one of those that reads ``delivered`` is
        the one kept (the alert was sent)."""
        ...


class RedeliveryQueue(Protocol):
    """The webhook deliveries still owed, across alerts: what the leader
    worker's redelivery reads (``streams.webhook_redelivery.Redeliverer``: failed and
    stalled deliveries, an earlier alert still owed, the undelivered gauge)
    and what ``deepwatch redeliver`` counts and requeues
    (``streams.cli.redeliver``). Apart from ``SinkWriter``, which records one
    delivery at a time: a sink never reads the backlog."""

    def failed_deliveries(self, target: str, *, limit: int | None = None) -> list[Alert]: ...
    def undelivered_before(self, target: str, cluster_id: str, level: int) -> bool: ...
    def queued_deliveries(self, target: str, *, older_than_s: float, limit: int | None = None) -> list[Alert]:
        """Alerts queued for ``target`` more than ``older_than_s`` ago and not
        tried since (their worker stopped): redelivery sends them."""
        ...
    def undelivered_counts(self) -> dict[str, dict[DeliveryState, int]]:
        """target -> {queued, failed, rejected: deliveries in that state}."""
        ...
    def delivery_targets(self) -> list[str]: ...
    def requeue_deliveries(self, target: str, alert_ids: list[str] | None = None) -> int:
        """Rejected deliveries to ``target`` made ``failed`` again (the next
        redelivery round sends them); how many."""
        ...


class ClusterReader(Protocol):
    """The cluster listing and the analyst search: what ``deepwatch
    clusters`` and ``deepwatch search`` (``streams.cli.query``), the replay
    summary (``streams.runner``) and the live pipeline table
    (``streams.cli.pipeline``) read; the desk reads them too
    (``DeskReader``). Apart because those commands need none of the desk's
    view, sightings or accounts."""

    def clusters(self, *, include_merged: bool = False, limit: int | None = None) -> list[ClusterRecord]: ...
    def search(self, query: ClusterQuery, *, timeout_s: float | None = None,
               after: SearchCursor | None = None) -> SearchPage:
        """``query``'s clusters (see ``ClusterQuery``); with ``after`` only
        those ordered after it (the next page). With ``timeout_s``
        the search is stopped once it has run that long (SQLite: interrupted
        between steps of its queries; Elasticsearch: each request's
        ``timeout``, and a ``timed_out`` answer is not used) and raises
        ``SearchTimeout`` instead of answering in part."""
        ...


class MemberReader(Protocol):
    """Every stored member's hashes: what a similar-picture lookup falls
    back on for a store with no index of its own (``streams.similar.find``,
    from ``deepwatch similar`` and the desk's lookup alike) and what the
    desk matches judged pictures against (``streams.desk.verdicts``). Apart
    because ``similar`` is handed a store and reads nothing else of it."""

    def iter_members(self) -> Iterator[MemberRow]:
        """Every stored member's hashes (crop views included) under its
        surviving cluster, each picture once."""
        ...


class StoreLifecycle(Protocol):
    """Closing the handle: whoever opened the store (``open_findings``) or
    was handed it to own (``streams.desk.source.FindingsSource``) closes it.
    Apart so that the roles a consumer reads or writes through say nothing
    about who owns the connection. Nothing sets up or migrates here: that is
    ``StoreSetup``, which only the writers need."""

    def close(self) -> None: ...


class StoreSetup(Protocol):
    """Putting the store's structures in place before the first write (the
    sinks, ``deepwatch pipeline``). Apart from ``StoreLifecycle`` so that a
    reader (the desk, a test's stand-in store) need not answer it."""

    def ensure_setup(self) -> None:
        """Elasticsearch: the ILM policy, templates, script and aliases;
        SQLite: nothing (its file gets its tables when it opens). Idempotent."""
        ...


# Capabilities only some stores have: each reader checks for the one it can use
# (isinstance, so a store's type says what it offers, not an attribute name
# looked up by hand) and falls back on the FindingsStore interface without it.
@runtime_checkable
class ChangeCounter(Protocol):
    """A cheap signal that the findings changed (SQLite's ``PRAGMA
    data_version``): the desk caches its derived views until it moves.
    Elasticsearch has none (``changes_since`` costs a search)."""

    def data_version(self) -> int: ...


@runtime_checkable
class CandidateNominator(Protocol):
    """A store that nominates the members a picture may match by an index of
    its own (Elasticsearch: bit-vector kNN over its member documents)."""

    def similar_candidates(self, sha256: str, hashes: Any, k: int = 20) -> list[MemberRow]: ...


@runtime_checkable
class KeyedMemberReader(MemberReader, Protocol):
    """Members under keys in the order they were stored (SQLite: the members
    table's rowids), so a process's hash index of them grows from the members
    stored since it last looked, and the members of the clusters it lands in
    are read by key (``streams.similar.near_members``)."""

    def members_after(self, after: int, limit: int = 20_000) -> list[KeyedMember]: ...
    def members_count_after(self, after: int) -> int: ...
    def member_key(self, key: int) -> str | None: ...
    def members_near(self, keys: Collection[int], sha256: str | None = None) -> list[MemberRow]: ...


@runtime_checkable
class MemberIndexFile(KeyedMemberReader, Protocol):
    """A keyed member store in a file, beside which a copy of the process's
    hash index of its members is kept (``streams.similar.index_file``)."""

    path: Path


class DeskReader(ClusterReader, MemberReader, StoreLifecycle, Protocol):
    """What the desk reads (``streams.desk.source.FindingsSource``, its one
    adapter to the store, which owns and closes the store it is given): its
    cached view and what changed since, clusters by id, whether a picture
    may be shown, sightings and their histograms, the accounts pages and
    account alerts, the text search's sighting matches; with the cluster
    listing, search and members. Apart from the writes, the deliveries and
    the replay accounting so that the desk, or a test's stand-in store,
    runs on whatever answers these reads."""

    def cluster(self, cluster_id: str) -> ClusterRecord | None: ...
    def clusters_by_id(self, ids: set[str]) -> list[ClusterRecord]:
        """These clusters' records (merged ones too; ids the store does not
        have are left out), built as ``clusters`` builds them."""
        ...
    def changes_since(self, cursor: Any) -> tuple[set[str] | None, Any]:
        """The clusters whose records may differ from when ``cursor`` (a value
        this method returned, opaque to the caller) was taken, and the cursor
        to ask with next time; None instead of a set when there is no cursor
        yet (read everything). What the desk's cached view reads again."""
        ...
    def newest_last_seen(self) -> datetime | None:
        """The newest stored ``last_seen`` of any cluster (merged ones too;
        None: no clusters): where the desk's view window ends, in the
        stream's event time. One indexed read."""
        ...
    def recent_clusters(self, since: datetime | None = None, *, limit: int | None = None) -> list[ClusterRecord]:
        """Surviving clusters (not merged away) whose stored ``last_seen`` is
        at or after ``since`` (None: any), most recently seen first (by the
        stored ``last_seen``, then cluster id), the first ``limit`` of them
        (None: all), built as ``clusters`` builds them. Selected by an index
        on ``last_seen``: the cost is the clusters returned, not the store's."""
        ...
    def verdict_cluster_ids(self, verdict: str) -> dict[str, list[str]]:
        """Surviving cluster id -> the ids merged into it (``merged_from``),
        for every surviving cluster whose stream verdict is ``verdict``: ids
        only, no records built (the desk's account views count a store's
        likely-AI clusters by them)."""
        ...
    def has_member(self, sha256: str) -> bool:
        """Whether a stored cluster has the picture ``sha256`` as a member."""
        ...
    def cluster_sightings(self, cluster_id: str, *, limit: int = 200) -> list[SightingRecord]: ...
    def sightings(self, *, cluster_ids: list[str] | None = None, account_id: str | None = None,
                  newest_first: bool = False, limit: int | None = None) -> list[SightingRecord]:
        """Sightings as recorded (``cluster_id`` not resolved through merges),
        those of any of ``cluster_ids`` and/or of ``account_id`` (None: no
        condition), ordered by ``posted_at`` (then event id), up to ``limit``
        (None: all). For readers that aggregate many clusters or accounts."""
        ...
    def sighting_histogram(self, cluster_ids: list[str], start: datetime, end: datetime,
                           buckets: int) -> dict[str, list[int]]:
        """Sightings of any of ``cluster_ids`` per platform in ``buckets``
        equal steps from ``start`` to ``end``: a sighting at ``t`` counts in
        bucket ``int((t - start) / width * (buckets - 1))`` (width: ``end -
        start``, at least a second), clamped to the first and last bucket.
        Counted by the store, so a cluster of millions of sightings costs one
        answer of platforms x buckets, not its sightings."""
        ...
    def account_aggregates(self, ai_cluster_ids: Collection[str], *, account_id: str | None = None,
                           min_posts: int = 0, min_ai_share: float = 0.0,
                           limit: int | None = None, after: AccountCursor | None = None) -> list[AccountAggregate]:
        """Per account (only ``account_id`` when given): posts, distinct
        pictures, distinct pictures among its sightings recorded under one of
        ``ai_cluster_ids`` (the caller decides what is AI, merged-away ids
        included), first/last post, platforms. Only accounts with at least
        ``min_posts`` posts and an AI share (``ai_pictures / pictures``) of at
        least ``min_ai_share``; ranked by ``account_rank`` descending, then by
        first post (``posted_at``, event id) ascending; only those ranked
        after ``after`` (keyset paging, see ``AccountCursor``); the first
        ``limit`` of them (None: all). ``cluster_ids`` and ``median_gap_s`` are computed for the
        returned accounts only: their cost is those accounts' posts, never the
        store's. Counted by the store, whatever the number of sightings."""
        ...
    def account_windows(self, window: timedelta, ai_cluster_ids: Collection[str], *,
                        min_ai_pictures: int = 0) -> list[AccountWindow]:
        """Per account, its posts from ``window`` before its own last post up
        to it (times to the millisecond): distinct pictures, distinct AI
        pictures (as in ``account_aggregates``), posts, platforms. Only
        accounts with at least ``min_ai_pictures`` AI pictures in their
        window, ordered by account id."""
        ...
    def match_sightings(self, text: str, *, limit: int = MAX_RESULTS,
                        timeout_s: float | None = None) -> list[str]:
        """Cluster ids (as recorded, sorted, at most ``limit``) of the
        sightings whose event id is ``text`` (stripped), or whose account id,
        account handle or post URL contain it, ignoring case. ``timeout_s``
        as for ``search``."""
        ...


class AuditReader(Protocol):
    """Stored alerts with their deliveries, and dead letters, listed: what
    ``deepwatch alerts`` and ``deepwatch dead-letters``
    (``streams.cli.query``) and the replay summary (``streams.runner``)
    read. Apart from the cluster reads: records of what the stream did, not
    findings about pictures, read by operators' commands, not the desk."""

    def delivery_status(self, alert_ids: list[str] | None = None) -> dict[str, list[DeliveryRecord]]:
        """alert id -> its deliveries, by time then target, for `deepwatch
        alerts`: of ``alert_ids`` only when given (a page of alerts)."""
        ...
    def alerts(self, *, limit: int | None = None) -> Page[AlertRecord]:
        """Stored alerts, oldest first (``created_at``, then alert id); with
        ``limit`` only the newest ``limit`` of them (still oldest first), the
        bound pushed into the query. ``total`` counts them all."""
        ...
    def dead_letters(self, *, limit: int | None = None) -> Page[DeadLetterRecord]:
        """Dead letters, oldest first (``at``, then their key); ``limit`` as for ``alerts``."""
        ...


class RetentionReader(Protocol):
    """What ``deepwatch prune`` (``streams.retention.prune``) asks before it
    deletes pictures: which belong to a cluster written since the cutoff.
    Alone because pruning deletes files on this one answer, and a check of
    what it depends on should find nothing else."""

    def member_shas_updated_since(self, since: datetime) -> set[str]:
        """The sha256 of every member whose surviving cluster (or own, merged
        away) was written at or after ``since`` (``streams.retention``)."""
        ...


class IdentityCheck(Protocol):
    """What the analyze stage asks of the findings upstream, before any
    sighting of the event exists (``streams.stage``: the duplicate and
    conflicting-resend check by event id), and the one thing it records
    there, a duplicate accounted as processed. Apart because it is the only
    use of the store away from the end of the flow, through a handle the
    stage's threads share (``streams.shared_handle.Serialized``)."""

    def mark_processed(self, source: SourceRef, outcome: str, event_id: str | None) -> None: ...
    def sighting_identity(self, event_id: str) -> PostIdentity | None: ...


class ReplayAccounting(Protocol):
    """Which events have ended, and what work still waits (every event is a
    sighting or a dead letter): what ``deepwatch replay`` and ``demo`` poll
    and sum up (``streams.runner``), ``count_sightings`` also the engine
    state's check for stored sightings (``streams.engine_state``) and the
    desk's check at start that the store answers. Apart because offsets and
    counters serve the replay harness and start-up checks, not readers of
    the findings."""

    def processed_since(self, topic: str, after_rowid: int) -> tuple[set[tuple[int, int]], int]: ...
    def processed_offsets(self, topic: str) -> set[tuple[int, int]]: ...
    def run_processed_since(self, run: str, topic: str, after_rowid: int) -> tuple[set[tuple[int, int]], int]: ...
    def run_outcomes(self, run: str, topic: str) -> dict[tuple[int, int], tuple[str, str | None]]:
        """(partition, offset) -> (outcome, event id) of each event ``run``
        produced that has ended so far. Outcome: ``sighting``, ``duplicate``
        (its post was already stored when it came) or ``dead_letter``; where
        a dead letter sat that its event's sighting superseded reads
        ``sighting`` (not where an earlier failure sat that a later one had
        replaced first: ``runner.summarize`` reads those by event). A post
        repeated within the run may end either way (it depends on whether the
        first copy was stored yet); its event id tells."""
        ...
    def pending_work(self) -> dict[str, int]: ...
    def count_sightings(self) -> int: ...
    # The replay summary's reads (``runner.summarize``): counted by the store, or looked up by
    # what the run itself holds (its event ids, offsets, start time), so the summary's memory is the
    # run's size, not the store's (an earlier run's millions of rows are counted, not read).
    def count_alerts(self) -> int:
        """How many alerts are stored (``alerts().total``), counted."""
        ...
    def count_clusters(self) -> int:
        """How many clusters ``clusters()`` lists (those not merged away), counted."""
        ...
    def count_models_pending(self) -> int:
        """``pending_work()["models"]`` alone: the surviving clusters whose
        model results are not in yet, counted (``pending_work`` also reads
        every alerting cluster and its alerts)."""
        ...
    def dead_letter_counts(self) -> dict[str, int]:
        """``"stage:reason"`` -> how many dead letters are stored with that
        stage and reason, counted by the store, each in the order of its
        oldest dead letter (``dead_letters``' order)."""
        ...
    def dead_letters_of(self, event_ids: Collection[str], topic: str,
                        offsets: Collection[tuple[int, int]]) -> list[DeadLetterRecord]:
        """The stored dead letters of ``event_ids``, and those whose source is
        one of ``offsets`` ((partition, offset)) of ``topic``, each once, in
        ``dead_letters``' order: looked up by id and by source, in chunks."""
        ...
    def alerts_created_since(self, since: datetime | None) -> list[AlertRecord]:
        """The alerts created at or after ``since`` (None: all), in
        ``alerts``' order: selected by the store on their creation time."""
        ...
    def processed_among(self, topic: str, offsets: Collection[tuple[int, int]]) -> set[tuple[int, int]]:
        """Those of ``offsets`` that have ended (``processed_offsets(topic) &
        offsets``): looked up, in chunks."""
        ...


# The union of the roles: what ``open_findings`` returns and both backends
# implement, so existing annotations and the isinstance check keep working;
# a consumer that needs less takes the roles it uses.
@runtime_checkable
class FindingsStore(SinkWriter, RedeliveryQueue, DeskReader, ClusterReader, MemberReader, AuditReader,
                    RetentionReader, IdentityCheck, ReplayAccounting, StoreLifecycle, StoreSetup, Protocol):
    """What every findings backend provides. Writes are idempotent upserts
    keyed by what the stream already makes stable (cluster id + revision,
    event id, alert id, the event behind a dead letter)."""


class StoreURLError(ValueError):
    """A --store value that names no backend deepwatch knows."""


# Elasticsearch addresses: es:// is http, ess:// https (streams.es_client.EsConfig)
STORE_SCHEMES = ("es", "ess", "http", "https")


def _is_sqlite(url: str) -> bool:
    return not url or url in ("sqlite", "sqlite:") or url.startswith("sqlite://")


def reads_are_local(store_url: str | None) -> bool:
    """Whether the store ``open_findings`` gives for this URL answers reads from a local file
    (SQLite: a read never waits on the network, and in WAL mode not on writers either)."""
    return _is_sqlite((store_url or "").strip())


def sqlite_file(store_url: str | None, data_dir: Path | str) -> Path | None:
    """The SQLite file ``open_findings`` opens for this URL (creating it, and
    its directories, if missing), or None for another backend."""
    url = (store_url or "").strip()
    if not _is_sqlite(url):
        return None
    if not url.startswith("sqlite://"):
        return Path(data_dir) / "findings.sqlite"  # as streams.store.open_store
    if url == "sqlite://":
        raise StoreURLError("sqlite:// needs a path, e.g. sqlite:///srv/deepwatch/findings.sqlite")
    return Path(url[len("sqlite://"):])


def open_findings(store_url: str | None, data_dir: Path | str, settings: Any | None = None) -> FindingsStore:
    """The findings store a command or worker should use.

    ``None``/``""``/``sqlite`` -> the embedded SQLite file in ``data_dir``
    (``sqlite:///path/file.sqlite`` for another file); ``es://host:9200``,
    ``ess://`` (TLS) or ``http(s)://host:9200`` -> Elasticsearch, credentials
    from the environment, the CA bundle and certificate checks from
    ``findings.ca_certs``/``verify_certs`` (see ``streams.es_client.EsConfig``)."""
    url = (store_url or "").strip()
    path = sqlite_file(url, data_dir)
    if path is not None:
        from streams.store import SqliteFindingsStore

        return SqliteFindingsStore(path)
    if url.split("://", 1)[0] in STORE_SCHEMES:
        from streams.es_store import EsFindingsStore

        return EsFindingsStore.from_url(url, settings=settings)
    raise StoreURLError(
        f"unknown findings store {store_url!r}: use es://HOST:9200, https://HOST:9200 or sqlite:///PATH "
        "(leave --store out for the embedded SQLite file in --data-dir)")


def check_store_url(value: str | None) -> str | None:
    """``value`` if ``open_findings`` can use it as an address: SQLite (unset,
    ``sqlite``, ``sqlite:///PATH``) or Elasticsearch with a host and a port
    that is a number in range, and no user info (``user:password@``: secrets
    belong in the environment variables meant for them, not in a setting
    that is printed, logged and kept in files). Checked when settings load
    and on ``--store``: a bad port was a ValueError traceback in every
    command that opened the store, and credentials in the URL loaded with
    the settings, to be refused only by a command that opened the store.
    Raises ValueError saying what to give instead (never the value)."""
    if value is None or not value.strip():
        return value
    url = value.strip()
    if _is_sqlite(url):
        sqlite_file(url, ".")  # "sqlite:// needs a path"
        return value
    example = "give es://HOST:9200 or https://HOST:9200"
    if url.split("://", 1)[0] not in STORE_SCHEMES or "://" not in url:
        raise ValueError(f"unknown findings store: {example}, or sqlite:///PATH")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"not a URL ({e}); {example}") from None
    # user info, wherever urlsplit puts it: a password with "/", "?" or "#" in it ends the host part early
    if "@" in url.split("://", 1)[1]:
        raise ValueError(CREDENTIALS_IN_URL)
    try:
        port = parts.port
    except ValueError as e:
        if "Port" not in str(e):
            raise ValueError(f"not a URL ({e}); {example}") from None
        why = "is out of range (0-65535)" if "range" in str(e) else "is not a number"
        raise ValueError(f"port {why}; {example}") from None
    if not parts.hostname:
        raise ValueError(f"has no host; {example}")
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to; {example}")
    return value
