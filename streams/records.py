"""Typed, versioned records for every message on a deepwatch topic.

Every record carries ``schema_version``. The input event (``ImageEvent``,
from producers outside deepwatch) is checked by ``streams.validate``: an
unknown version is dead-lettered there. The records on deepwatch's own
topics are forward compatible (as Kafka schema registries define it), so
that two versions of deepwatch can share a broker (a rolling upgrade, a
rollback) without losing events:

* Within a ``schema_version`` fields are only added, each with a default,
  and a reader ignores the fields it does not know (``_Record.loads``):
  a worker one release behind reads what the newer one wrote, less the new
  fields. Unlike Protobuf it does not keep them: what such a worker writes
  on (a cluster's state and snapshot, an alert) lacks them, until a newer
  worker writes that record again. A writer that adds a field older readers must not ignore (one that
  changes what the others mean) bumps ``schema_version`` instead.
* A record whose ``schema_version`` (its own or a nested record's) is newer
  than this code knows is neither guessed at nor dead-lettered:
  ``loads`` raises ``NewerSchema`` ("written by a newer deepwatch: upgrade
  this worker") and the stage that read it holds it unacked, uncommitted
  (``streams.held_records``), for an upgraded worker to process. A dead
  letter would have lost it: it keeps only the first 512 bytes, and no tool
  sends a dead letter's record again.

The models themselves stay strict (``extra="forbid"``): a record this code
builds with a misspelt field fails where it is built. Only ``loads``, the
read path, lets unknown fields pass. The input event's JSON
Schema is published at ``streams/schemas/event-v1.schema.json`` (regenerate
with ``deepwatch schema``) so producers outside this code base can validate;
an alert webhook's body at ``streams/schemas/alert-v1.schema.json``
(``deepwatch schema alert``) so subscribers can.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Iterable, Literal, get_args

from pydantic import (
    AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

from detectors.base import Evidence
from detectors.fusion import Verdict
from detectors.hash_record import ImageHashes


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class NewerSchema(Exception):
    """A record written by a newer deepwatch, at a ``schema_version`` this
    one does not know (the module docstring's rule). Not a ``ValueError``,
    unlike a record that does not validate: readers that dead-letter what
    does not read must not dead-letter this one, which is valid, only newer."""

    def __init__(self, record: str, version: int, known: int):
        super().__init__(f"{record} record at schema_version {version} (this deepwatch reads up to {known}): "
                         "written by a newer deepwatch: upgrade this worker")
        self.record, self.version, self.known = record, version, known


_KNOWN_VERSION: dict[type, int] = {}  # record class -> the highest ``schema_version`` it reads


class _Record(BaseModel):
    # Strict where this code builds a record (a misspelt field fails there);
    # ``loads`` is the forward-compatible read path (module docstring).
    model_config = ConfigDict(extra="forbid")

    @field_validator("schema_version", mode="before", check_fields=False)
    @classmethod
    def _not_newer(cls, value: Any) -> Any:
        if type(value) is not int:  # a bool, or no number: the field's own type refuses it
            return value
        known = _KNOWN_VERSION.get(cls)
        if known is None:  # once per class: this runs for every record read (three per cluster op)
            known = _KNOWN_VERSION[cls] = max(get_args(cls.model_fields["schema_version"].annotation))
        if value > known:
            raise PydanticCustomError("newer_schema", "schema_version {version} is newer than this deepwatch "
                                      "reads ({known})", {"version": value, "known": known, "record": cls.__name__})
        return value

    def dumps(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def loads(cls, raw: bytes | str):
        """The record ``raw`` holds, read forward-compatibly: fields this code
        does not know (a newer writer's, within the same ``schema_version``)
        are ignored at any depth (pydantic's ``extra`` for this validation
        alone); ``NewerSchema`` for a record (or a record in it) at a newer
        ``schema_version``; pydantic's ``ValidationError`` for anything else
        that does not read."""
        try:
            return cls.model_validate_json(raw, extra="ignore")
        except ValidationError as e:
            raise _newer(e, cls) from None

    @classmethod
    def from_doc(cls, doc: dict[str, Any]):
        """``loads`` for a record already parsed (an Elasticsearch ``_source``)."""
        try:
            return cls.model_validate(doc, extra="ignore")
        except ValidationError as e:
            raise _newer(e, cls) from None


def _newer(e: ValidationError, cls: type) -> Exception:
    """``NewerSchema`` where ``e`` is a newer ``schema_version``'s refusal, else ``e``."""
    for err in e.errors():
        if err["type"] == "newer_schema":
            ctx = err.get("ctx") or {}
            return NewerSchema(ctx.get("record", cls.__name__), ctx.get("version"), ctx.get("known"))
    return e


# --------------------------------------------------------------------------
# Input: the social-media image event (schema v1)
# --------------------------------------------------------------------------
# Counts above 2**53 are not exact in JSON consumers (JavaScript, Elasticsearch
# doubles) and no real post has them: refuse rather than carry a bignum around.
MAX_COUNT = 2**53


class Engagement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    likes: int = Field(default=0, ge=0, le=MAX_COUNT)
    reposts: int = Field(default=0, ge=0, le=MAX_COUNT)
    replies: int = Field(default=0, ge=0, le=MAX_COUNT)
    views: int = Field(default=0, ge=0, le=MAX_COUNT)

    def __add__(self, other: "Engagement") -> "Engagement":
        # A cluster's running total saturates: two posts each claiming
        # MAX_COUNT likes failed validation here, and every later sighting of
        # that cluster with it (it never updated or alerted again).
        def cap(a: int, b: int) -> int:
            return min(a + b, MAX_COUNT)

        return Engagement(likes=cap(self.likes, other.likes), reposts=cap(self.reposts, other.reposts),
                          replies=cap(self.replies, other.replies), views=cap(self.views, other.views))

    @property
    def total(self) -> int:
        # views dwarf everything else and are often estimated; keep them out of the sum
        return self.likes + self.reposts + self.replies


class ImageRef(BaseModel):
    """Exactly one of ``url``, ``path``, ``base64`` or ``blob`` (the sha256 of
    bytes already in deepwatch's blob store; used for inline images once
    ingested, so image bytes never ride on internal topics)."""

    model_config = ConfigDict(extra="forbid")
    # Empty strings are refused, not read as absent: the fetch stage goes by
    # which field is set (``is not None``), and ``{"url": ..., "base64": ""}``
    # passed here as a URL image, then was fetched as an empty inline one.
    url: str | None = Field(default=None, min_length=1, max_length=4096)
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    base64: str | None = Field(default=None, min_length=1)
    blob: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    mime: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        given = [k for k in ("url", "path", "base64", "blob") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"image needs exactly one of url, path, base64, blob (got {given or 'none'})")
        if self.url is not None and not self.url.lower().startswith(("http://", "https://")):
            raise ValueError("image.url must be http(s)")
        return self


# Size bounds on everything an event carries besides inline image bytes: a
# sighting (the event plus hashes and evidence) must always fit in one broker
# message, so no stage downstream can be handed a record it cannot send.
MAX_TEXT_CHARS = 10_000
MAX_TAG_CHARS = 256
# posted_at's UTC offset: the real ones span -12:00..+14:00.
MAX_UTC_OFFSET = timedelta(hours=14)
# C0 and C1 control characters and DEL: nothing an id holds
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# How a posted_at string starts: a date, a separator pydantic takes ('T',
# 't', space or '_') and hours:minutes.
_DATE_TIME_FORM = re.compile(r"\d{4}-\d{2}-\d{2}[Tt _]\d{2}:\d{2}", re.ASCII)


class ImageEvent(_Record):
    """Schema v1. Unknown top-level fields are ignored (not an error), so a
    producer may add fields before deepwatch knows them; unknown fields inside
    ``image`` or ``engagement`` and an unknown ``schema_version`` are still
    refused. ``text`` longer than ``MAX_TEXT_CHARS`` is truncated, not refused."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": True})
    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=256, json_schema_extra={"pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]+$"})
    platform: str = Field(min_length=1, max_length=64, description="stored in lower case: X and x are one platform")
    post_id: str | None = Field(default=None, max_length=256)
    post_url: str | None = Field(default=None, max_length=4096)
    account_id: str = Field(min_length=1, max_length=256, json_schema_extra={"pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]+$"})
    account_handle: str | None = Field(default=None, max_length=256)
    # The pattern: what the date-time checks below require of the string's
    # start, for schema validators that do not assert "format".
    posted_at: AwareDatetime = Field(json_schema_extra={"pattern": "^" + _DATE_TIME_FORM.pattern})
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    lang: str | None = Field(default=None, max_length=16)
    hashtags: list[Annotated[str, StringConstraints(max_length=MAX_TAG_CHARS)]] = Field(default_factory=list, max_length=64)
    engagement: Engagement = Field(default_factory=Engagement)
    image: ImageRef

    @field_validator("platform")
    @classmethod
    def _platform_in_lower_case(cls, value: str) -> str:
        # "X" and "x" are one platform: searches compared them alike, while lists,
        # counts and the desk's spread chart showed two
        value = value.strip().lower()
        if not value:
            raise ValueError("must not be blank")
        return value

    @field_validator("event_id", "account_id")
    @classmethod
    def _event_id_printable(cls, value: str) -> str:
        # An id is a key in every store, log line and terminal table: a C0/C1
        # control (ESC starting a terminal sequence, a newline) in one rewrote
        # the operator's screen and split log lines. No platform's ids hold any.
        # An account id is also the desk's key for the account (its page's
        # path, ``?id=``, the search's ``account=``): one with "\r\n" was
        # stored, and its page could then not be opened (404, or 422 for a
        # control in the query).
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("text", "account_handle")
    @classmethod
    def _composed(cls, value: str | None) -> str | None:
        # One form for what people search: a post or handle written with
        # combining accents ("Zoe" + U+0308, as some keyboards and macOS file
        # names produce) matched no query typed composed, on either store;
        # hashtags are composed where they are stored (``normalize_hashtag``).
        return unicodedata.normalize("NFC", value) if value else value

    @field_validator("posted_at", mode="before")
    @classmethod
    def _posted_at_is_a_date_time(cls, value: Any) -> Any:
        # pydantic's lax mode reads a string of digits ("1700000000") as
        # seconds (or milliseconds) since 1970; the schema says date-time.
        # Only the form is checked here, pydantic parses the rest.
        if isinstance(value, datetime):
            return value
        if not isinstance(value, str) or not _DATE_TIME_FORM.match(value):
            raise ValueError("must be an ISO 8601 date-time with a UTC offset, e.g. 2024-01-01T12:00:00Z "
                             "(epoch numbers are not read)")
        return value

    @field_validator("posted_at")
    @classmethod
    def _posted_at_in_utc_range(cls, value: datetime) -> datetime:
        # ISO 8601 takes offsets up to +-23:59 and any year 1-9999 in local
        # time: "0001-01-01T00:00:00+14:00" is before the earliest datetime
        # in UTC, so converting it later overflows. Real offsets are within
        # -12:00..+14:00; SQLite's julianday() (the store orders and windows
        # sightings by it) returns NULL past +-14:59.
        offset = value.utcoffset()
        if offset is not None and abs(offset) > MAX_UTC_OFFSET:
            minutes = int(abs(offset).total_seconds()) // 60
            shown = f"{'-' if offset < timedelta(0) else '+'}{minutes // 60:02d}:{minutes % 60:02d}"
            raise ValueError(f"UTC offset {shown} is beyond +-14:00 (no time zone uses it)")
        try:
            value.astimezone(timezone.utc)
        except OverflowError:
            raise ValueError(f"{value.isoformat()} is outside the years 1-9999 in UTC") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _truncate_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("text"), str) and len(data["text"]) > MAX_TEXT_CHARS:
            data = {**data, "text": data["text"][: MAX_TEXT_CHARS - 1] + "…"}
        return data


def usable_event_id(value: Any) -> str | None:
    """``value`` if it can serve as an event id in keys, logs and the store
    (a string of 1..256 characters without control characters that encodes
    as UTF-8), else None. Used to name an event in a dead letter even when
    the event itself is invalid."""
    if not isinstance(value, str) or not 0 < len(value) <= 256 or _CONTROL.search(value):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        return None
    return value


def named_event(about: Any) -> tuple[str | None, "SourceRef | None"]:
    """The event id and source that a record which does not validate still
    names: a sighting's ``event.event_id`` (or a dead letter's ``event_id``,
    ``usable_event_id``) and its ``source``, each None where it does not
    read. So the dead letter of an unreadable record accounts for its event."""
    if not isinstance(about, dict):
        return None, None
    event = about.get("event")
    event_id = usable_event_id(event.get("event_id") if isinstance(event, dict) else about.get("event_id"))
    try:
        source = SourceRef.model_validate(about.get("source"))
    except ValueError:
        source = None
    return event_id, source


def _clip(text: str, limit: int) -> str:
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------
# Internal topics
# --------------------------------------------------------------------------
class SourceRef(BaseModel):
    """Where a message came from on the events topic: the unit of accounting
    for "every event is processed or dead-lettered"."""

    model_config = ConfigDict(extra="forbid")
    topic: str
    partition: int
    offset: int
    run: str | None = None  # the producing run (`deepwatch-run` header): how replay knows what is its own


DeadLetterStage = Literal["validate", "fetch", "decode", "hash", "blob", "dedupe", "detect", "cluster", "sink"]


class DeadLetter(_Record):
    """Always small and always encodable, whatever the event that caused it:
    fields are clipped and made valid UTF-8 on construction, so writing the
    dead letter can never fail the way the event did."""

    schema_version: Literal[1] = 1
    event_id: str | None = None
    stage: DeadLetterStage
    reason: str  # short code, e.g. "blocked_address", "decompression_bomb"
    detail: str  # human-readable
    source: SourceRef | None = None
    payload_excerpt: str | None = None  # first bytes of the raw message, for debugging
    # sha256 of the whole raw message (``payload_sha256``): two different events
    # failing alike under one event id (or sharing their first bytes) are two
    # dead letters, the same message failing again is one (``dead_letter_identity``)
    payload_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("event_id") is not None:
            data["event_id"] = usable_event_id(data["event_id"]) or _clip(str(data["event_id"]), 200)
        for key, limit in (("reason", 64), ("detail", 2000), ("payload_excerpt", 512)):
            if isinstance(data.get(key), str):
                data[key] = _clip(data[key], limit)
        return data

    @classmethod
    def of(cls, stage: DeadLetterStage, reason: str, detail: str, raw: bytes | str | None, *,
           source: SourceRef | None = None, event_id: str | None = None, excerpt: bool = True,
           digest: bool = True) -> "DeadLetter":
        """The dead letter of the message ``raw``: its first 512 bytes (as
        UTF-8, undecodable bytes replaced) in ``payload_excerpt`` (none when
        not ``excerpt``), and the digest of the whole message in
        ``payload_sha256`` (none when not ``digest``), which keeps two
        messages sharing their first bytes two dead letters
        (``streams.findings.dead_letter_identity``). Only the excerpt's bytes
        are decoded, whatever the message's size."""
        shown = None
        if raw is not None and excerpt:
            head = raw[:512]
            shown = head if isinstance(head, str) else bytes(head).decode("utf-8", "replace")
        sha = None
        if raw is not None and digest:
            sha = payload_sha256(raw if isinstance(raw, (bytes, str)) else bytes(raw))
        return cls(event_id=event_id, stage=stage, reason=reason, detail=detail, source=source,
                   payload_excerpt=shown, payload_sha256=sha)


def payload_sha256(raw: bytes | str) -> str:
    """The digest of a whole message for ``DeadLetter.payload_sha256``
    (text as UTF-8, lone surrogates kept apart from each other)."""
    return hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")).hexdigest()


class Sighting(_Record):
    """One event whose image was fetched, decoded and hashed."""

    schema_version: Literal[1] = 1
    event: ImageEvent  # with image.base64 removed: bytes never travel on topics
    source: SourceRef
    sha256: str
    width: int
    height: int
    format: str
    hashes: ImageHashes
    evidence: list[Evidence] = Field(default_factory=list)  # cheap detectors on this image
    # the banks were asked about these bytes: their items in ``evidence`` are
    # the banks' whole answer now (none: no entry matches any more)
    banks_checked: bool = False
    ingested_at: datetime | None = None  # broker timestamp of the event: the latency clock starts here
    fetched_at: datetime = Field(default_factory=utcnow)


class DetectRequest(_Record):
    schema_version: Literal[1] = 1
    cluster_id: str
    sha256: str


class DetectionResult(_Record):
    schema_version: Literal[1] = 1
    cluster_id: str
    sha256: str
    evidence: list[Evidence]
    models: list[str]
    error: str | None = None


class ClusterOp(_Record):
    """What the single-writer cluster agent consumes: a new sighting or the
    result of the once-per-cluster model detection; or ``resume``, which
    changes nothing and only makes the writer start (a replay sends it when
    clusters of an earlier run still wait for a model result: over a fresh
    broker the writer then asks the models again, ``streams.cluster_stage``,
    even when none of the run's events reaches it)."""

    schema_version: Literal[1] = 1
    kind: Literal["sighting", "detection", "resume"]
    sighting: Sighting | None = None
    detection: DetectionResult | None = None


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    phash: str
    pdq: str
    pdq_quality: int
    event_id: str  # the event that first brought this image
    width: int = 0
    height: int = 0
    format: str = ""
    distance: int | None = None  # distance to the cluster representative when it joined
    representative: bool = False  # founded its cluster: the bound against chaining is measured from here
    views: list[str] | None = None  # pHashes of crop/trimmed views, so rebuilt indexes still match crops
    trimmed: bool = False
    thumb: str | None = None  # representatives: the grey thumbnail hash matches are verified on
    content_box: tuple[float, float, float, float] | None = None  # representatives: ``ImageHashes.content_box``


class Velocity(BaseModel):
    # Unknown counts are ignored, not refused: a version before accounts_5m refused every
    # snapshot and alert that carried it (dead-lettered while two versions overlapped);
    # counts added later read in this one
    model_config = ConfigDict(extra="ignore")
    sightings_5m: int = 0
    sightings_1h: int = 0
    accounts_1h: int = 0
    engagement_1h: int = 0
    # distinct accounts (platform and id) in the 5 minutes: what a bot reposting counts once.
    # Added after v1 shipped: records stored before it read 0, and schema_version stays 1
    accounts_5m: int = 0


class ClusterSnapshot(_Record):
    """The cluster as the stream sees it after one op; sinks upsert it, keeping
    the highest ``revision`` so replays and reordering change nothing."""

    schema_version: Literal[1] = 1
    cluster_id: str
    revision: int
    fake_score: float
    verdict: Verdict  # what fusion decided (``detectors.fusion``): a record reads back only these
    evidence: list[Evidence]
    members: list[Member]
    sightings: int
    accounts: int
    platforms: list[str]
    engagement: Engagement
    velocity: Velocity
    first_seen: datetime
    last_seen: datetime
    merged_from: list[str] = Field(default_factory=list)
    merged_into: str | None = None
    models_pending: bool = False
    suppressed: str | None = None  # why alerts are suppressed (e.g. authentic-bank match)
    alert_level: int = 0
    new_sighting: Sighting | None = None  # the sighting this revision added, if any

    def dumps(self) -> bytes:
        # Verification thumbnails, content boxes and view hashes of the new
        # sighting are engine state (the cluster table, engine-state.sqlite):
        # no sink stores them, and they were half of every snapshot's bytes,
        # sent once per event. Members keep their views: banks and desk
        # verdicts read them from the findings store.
        return self.model_dump_json(exclude_none=True, exclude=_ENGINE_ONLY).encode()


_ENGINE_ONLY = {"members": {"__all__": {"thumb", "content_box"}},
                "new_sighting": {"hashes": {"thumb", "views", "content_box"}}}


# An alert's sample posts: the cluster's earliest few (``ClusterState``
# keeps them) plus the post that triggered it, so a subscriber can open one
# without the desk. Bounded in count here and in bytes by the field limits
# below (each post's JSON stays under ~5 KB, an alert's samples under ~20 KB).
MAX_SAMPLE_POSTS = 3  # the earliest posts kept per cluster; an alert adds its trigger post


def openable_url(url: str | None) -> str | None:
    """``url`` when it is an http(s) URL (what a subscriber's browser opens
    and a page may link), else None: a post URL is the producer's text, and
    ``javascript:`` or ``data:`` has no place in a link."""
    if url and url[:8].lower().startswith(("http://", "https://")):
        return url
    return None


class SamplePost(BaseModel):
    """One post of a cluster, as an alert carries it: enough to open the post
    (``post_url``, only ever http(s): ``openable_url``) or find it again
    (``event_id``, platform and account)."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(min_length=1, max_length=256)
    platform: str = Field(max_length=64)
    account_id: str = Field(max_length=256)
    account_handle: str | None = Field(default=None, max_length=256)
    post_url: str | None = Field(default=None, max_length=4096)
    posted_at: datetime

    @field_validator("post_url")
    @classmethod
    def _openable(cls, value: str | None) -> str | None:
        return openable_url(value)

    @classmethod
    def of(cls, ev: "ImageEvent") -> "SamplePost":
        return cls(event_id=ev.event_id, platform=ev.platform, account_id=ev.account_id,
                   account_handle=ev.account_handle, post_url=ev.post_url, posted_at=ev.posted_at)

    def order(self) -> tuple[datetime, str]:
        """Earliest first, by the time posted then the event id: the same
        posts sort alike whatever order they arrived in."""
        return self.posted_at.astimezone(timezone.utc), self.event_id


def earliest_posts(posts: Iterable[SamplePost], n: int = MAX_SAMPLE_POSTS) -> list[SamplePost]:
    """The ``n`` earliest of ``posts`` (``SamplePost.order``), one per event id
    (the earliest it was sent with)."""
    by_id: dict[str, SamplePost] = {}
    for p in sorted(posts, key=SamplePost.order):
        by_id.setdefault(p.event_id, p)
    return list(by_id.values())[:n]


# The rule of the desk's correction: a picture subscribers were alerted about
# was found authentic (``streams.desk.verdicts``).
CORRECTION_RULE = "desk-verdict-authentic"


class Alert(_Record):
    """What a subscriber receives (the webhook body) and the findings store
    keeps. ``first_seen``/``last_seen``/``platforms`` are the cluster's when
    the alert was raised; ``sample_posts`` its earliest posts
    (``MAX_SAMPLE_POSTS``) and the trigger post, earliest first. The desk's
    alerts fill them from the findings store (an account alert: the
    account's platforms, last post and latest posts). All four are absent
    from alerts raised before they existed. ``account_id`` names the account
    an account alert (``streams.desk.accounts``) is about: its ``cluster_id``
    is then ``account:<id>``, a key for its deliveries, not a cluster.
    ``merged_from`` lists the clusters merged into this one (see below)."""

    schema_version: Literal[1] = 1
    alert_id: str  # stable: cluster id + level, so redelivery is idempotent
    cluster_id: str
    rule: str
    level: int  # 1 = first alert, 2+ = escalations
    fake_score: float
    verdict: Verdict  # the stream's (``detectors.fusion``); a desk alert's is likely-ai, its correction's no-evidence
    velocity: Velocity
    sightings: int
    accounts: int
    evidence: list[Evidence]
    # when the alert stands: for the cluster engine's, the cluster's latest post
    # as posted (its ``last_seen`` when raised), not the trigger post's time
    # (``trigger_event_id``); the desk's: the account's latest post, or when
    # the verdict was given
    at: datetime
    trigger_event_id: str | None = None
    trigger_ingested_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    first_seen: datetime | None = None  # the cluster's earliest post (as posted)
    last_seen: datetime | None = None  # its latest post (as posted)
    platforms: list[str] = Field(default_factory=list)  # where it was seen, in the order it reached each
    sample_posts: list[SamplePost] = Field(default_factory=list, max_length=MAX_SAMPLE_POSTS + 1)
    account_id: str | None = None
    # clusters merged into this one (``ClusterState.merged_from``), sorted; [] for none and in alerts
    # raised before the field existed (schema_version 1, additive). After a merge the survivor's
    # alert level continues from the highest of the merged clusters': its next alert may be
    # level N+1 of a cluster a subscriber never saw alerted before; these ids link it back.
    merged_from: list[str] = Field(default_factory=list)

    @property
    def correction(self) -> bool:
        """The desk found the picture of an earlier alert authentic: this
        alert takes that one back (``CORRECTION_RULE``)."""
        return self.rule == CORRECTION_RULE


class AlertBody(Alert):
    """A webhook's body: the alert, plus what ``streams.webhooks.payload``
    adds for one hook. Used for the published JSON Schema, so a subscriber can
    validate what it receives; each addition is absent when not configured."""

    desk_url: str | None = Field(default=None, description="the desk's page of the alert's cluster or account "
                                 "(with `desk.public_url` set)")
    summary: str | None = Field(default=None, description="one line for people (the hook's `summary` option)")


def _published(model: type[BaseModel], name: str, title: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://deepwatch.dev/schemas/{name}.schema.json"
    schema["title"] = title
    return schema


def event_json_schema() -> dict[str, Any]:
    return _published(ImageEvent, "event-v1", "deepwatch image event v1")


def alert_json_schema() -> dict[str, Any]:
    """The JSON Schema of an alert webhook's body (``AlertBody``), schema v1.
    Fields are only ever added within a version, so it allows fields it does
    not name. What it names is v1's: the verdicts, the evidence kinds and at
    most ``MAX_SAMPLE_POSTS`` + 1 sample posts; a new value of either enum or
    a larger cap is a new schema version."""
    schema = _published(AlertBody, "alert-v1", "deepwatch alert webhook body v1")
    # The records' docstrings speak to this code's maintainers, not to subscribers.
    schema["description"] = ("What deepwatch POSTs to an alert webhook, signed (X-Deepwatch-Signature). "
                             "See the README's Webhooks section for the fields and alert levels.")
    for d in schema.get("$defs", {}).values():
        d.pop("description", None)

    def open_objects(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("additionalProperties") is False:
                del node["additionalProperties"]
            for v in node.values():
                open_objects(v)
        elif isinstance(node, list):
            for v in node:
                open_objects(v)

    open_objects(schema)
    return schema
