"""Typed, versioned records for every message on a deepwatch topic.

Every record carries ``schema_version``; consumers accept the versions they
know and dead-letter the rest rather than guessing. The input event's JSON
Schema is published at ``streams/schemas/event-v1.schema.json`` (regenerate
with ``deepwatch schema``) so producers outside this code base can validate.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from detectors.base import Evidence
from detectors.hashing import ImageHashes


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def dumps(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def loads(cls, raw: bytes | str):
        return cls.model_validate_json(raw)


# --------------------------------------------------------------------------
# Input: the social-media image event (schema v1)
# --------------------------------------------------------------------------
class Engagement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    likes: int = Field(default=0, ge=0)
    reposts: int = Field(default=0, ge=0)
    replies: int = Field(default=0, ge=0)
    views: int = Field(default=0, ge=0)

    def __add__(self, other: "Engagement") -> "Engagement":
        return Engagement(likes=self.likes + other.likes, reposts=self.reposts + other.reposts,
                          replies=self.replies + other.replies, views=self.views + other.views)

    @property
    def total(self) -> int:
        # views dwarf everything else and are often estimated; keep them out of the sum
        return self.likes + self.reposts + self.replies


class ImageRef(BaseModel):
    """Exactly one of ``url``, ``path``, ``base64`` or ``blob`` (the sha256 of
    bytes already in deepwatch's blob store; used for inline images once
    ingested, so image bytes never ride on internal topics)."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(default=None, max_length=4096)
    path: str | None = Field(default=None, max_length=4096)
    base64: str | None = None
    blob: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    mime: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        given = [k for k in ("url", "path", "base64", "blob") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"image needs exactly one of url, path, base64, blob (got {given or 'none'})")
        if self.url and not self.url.lower().startswith(("http://", "https://")):
            raise ValueError("image.url must be http(s)")
        return self


class ImageEvent(_Record):
    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=256)
    platform: str = Field(min_length=1, max_length=64)
    post_id: str | None = Field(default=None, max_length=256)
    post_url: str | None = Field(default=None, max_length=4096)
    account_id: str = Field(min_length=1, max_length=256)
    account_handle: str | None = Field(default=None, max_length=256)
    posted_at: AwareDatetime
    text: str | None = Field(default=None, max_length=100_000)
    lang: str | None = Field(default=None, max_length=16)
    hashtags: list[str] = Field(default_factory=list, max_length=256)
    engagement: Engagement = Field(default_factory=Engagement)
    image: ImageRef


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


class DeadLetter(_Record):
    schema_version: Literal[1] = 1
    event_id: str | None = None
    stage: Literal["validate", "fetch", "decode", "hash", "detect", "cluster", "sink"]
    reason: str  # short code, e.g. "fetch_blocked", "decompression_bomb"
    detail: str  # human-readable
    source: SourceRef | None = None
    payload_excerpt: str | None = None  # first bytes of the raw message, for debugging
    at: datetime = Field(default_factory=utcnow)


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
    result of the once-per-cluster model detection."""

    schema_version: Literal[1] = 1
    kind: Literal["sighting", "detection"]
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


class Velocity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sightings_5m: int = 0
    sightings_1h: int = 0
    accounts_1h: int = 0
    engagement_1h: int = 0


class ClusterSnapshot(_Record):
    """The cluster as the stream sees it after one op; sinks upsert it, keeping
    the highest ``revision`` so replays and reordering change nothing."""

    schema_version: Literal[1] = 1
    cluster_id: str
    revision: int
    fake_score: float
    verdict: str
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


class Alert(_Record):
    schema_version: Literal[1] = 1
    alert_id: str  # stable: cluster id + level, so redelivery is idempotent
    cluster_id: str
    rule: str
    level: int  # 1 = first alert, 2+ = escalations
    fake_score: float
    verdict: str
    velocity: Velocity
    sightings: int
    accounts: int
    evidence: list[Evidence]
    at: datetime  # event time that triggered it
    trigger_event_id: str | None = None
    trigger_ingested_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


def event_json_schema() -> dict[str, Any]:
    schema = ImageEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://deepwatch.dev/schemas/event-v1.schema.json"
    schema["title"] = "deepwatch image event v1"
    return schema
