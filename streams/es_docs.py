"""The documents deepwatch writes to Elasticsearch and reads back: a
cluster, a sighting, a dead letter, a processed-offset marker, and the
records the store returns from them (``streams.es_templates`` maps them).
Document ids are deterministic (``doc_id``), so a redelivery writes the
same document again.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from streams.cluster_search import event_hashtags
from streams.es_requests import platform_key
from streams.findings import ClusterRecord, SightingRecord, dead_letter_identity, shown_score
from streams.records import Alert, ClusterSnapshot, DeadLetter, Sighting


def now() -> str:
    """The time now as the documents store it (``at``, ``updated_at``,
    ``@timestamp``): to the millisecond, as a ``date`` field keeps it and as
    the SQLite store writes ``updated_at`` (``strftime('%f')``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def hex_bits(hex_hash: str) -> str:
    """A hash as the hex string ES takes for an ``element_type: bit`` vector."""
    return hex_hash.lower()


MAX_ID_BYTES = 512  # Elasticsearch refuses a longer _id, and in a bulk request the whole request (400)


def doc_id(key: str) -> str:
    """``key`` as a document ``_id``: itself, or its digest when over 512 UTF-8
    bytes. An event id is at most 256 characters, which can be 1,024 bytes;
    one such id in a bulk request made Elasticsearch refuse every document in
    it (elastic/elasticsearch#54549). Deterministic, so a redelivery is still
    the same document."""
    if len(key.encode()) <= MAX_ID_BYTES:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def dead_letter_key(dl: DeadLetter) -> str:
    """The SQLite store's key (``dead_letter_identity``: what the event is,
    not where it sat) as a document ``_id``."""
    return doc_id(dead_letter_identity(dl))


hashtags = event_hashtags  # an event's hashtags as stored and searched (both stores)


def processed_action(index: str, source: Any, outcome: str, event_id: str | None,
                     op: str = "create") -> tuple[dict, dict]:
    """Marks one event offset as handled (a sighting or a dead letter), keyed
    by the offset so redelivery is a no-op: the same job as SQLite's
    ``processed`` and ``processed_runs`` tables. An event carrying its
    producing run is keyed by run and offset: a fresh broker reuses offsets
    an earlier run marked, and this run's marker must not be refused as a
    duplicate of that one. ``op="index"`` overwrites: a sighting the store
    then refused for good is relabelled a dead letter."""
    run = getattr(source, "run", None)
    key = f"{source.topic}/{source.partition}/{source.offset}"
    doc = {"topic": source.topic, "partition": source.partition, "offset": source.offset, "outcome": outcome,
           "event_id": event_id, "@timestamp": now()}
    if run:
        doc["run"] = run
    return ({op: {"_index": index, "_id": doc_id(f"{run}/{key}" if run else key)}}, doc)


def alert_from_doc(doc: dict[str, Any]) -> Alert:
    """The ``Alert`` message back from its stored document (``add_alert``),
    read as its topic record is (``Alert.from_doc``): a rollback reads the
    alerts a newer deepwatch stored, less the fields it added."""
    return Alert.from_doc({k: v for k, v in doc.items() if k not in ("@timestamp", "evidence_summary")})


SIGHTING_SOURCE = {"excludes": ["@timestamp", "schema_version", "account_handle_norm", "source"]}


def sighting_from_doc(doc: dict[str, Any]) -> SightingRecord:
    src = dict(doc)
    src["text"] = src.get("text") or None
    # a sighting stored before events were lower-cased ("Bluesky") reads as the platform its
    # cluster's platforms and the spread name, and as the SQLite store keeps it (folded at open)
    src["platform"] = platform_key(src["platform"]) if isinstance(src.get("platform"), str) else src.get("platform")
    return SightingRecord.model_validate({k: src.get(k) for k in SightingRecord.model_fields})


def sighting_doc(cluster_id: str, s: Sighting) -> dict[str, Any]:
    ev = s.event
    handle = ev.account_handle
    return {
        "@timestamp": ev.posted_at.isoformat(), "posted_at": ev.posted_at.isoformat(), "schema_version": 1,
        "event_id": ev.event_id, "cluster_id": cluster_id, "sha256": s.sha256, "platform": ev.platform,
        "account_id": ev.account_id, "account_handle": handle,
        "account_handle_norm": handle.lstrip("@").lower() if handle else None,
        "post_url": ev.post_url, "text": ev.text or "",
        "hashtags": hashtags(ev), "lang": ev.lang,
        "engagement": ev.engagement.model_dump(), "source": s.source.model_dump(exclude_none=True),
    }


def sighting_params(s: Sighting) -> dict[str, Any]:
    """What a sighting adds to its cluster document's samples (the upsert script's ``params.sightings``)."""
    ev = s.event
    return {"text": (ev.text or "")[:2000] or None, "hashtags": hashtags(ev), "lang": ev.lang,
            "account": ev.account_handle or ev.account_id, "post_url": ev.post_url}


# the sample each sighting param adds to: its cap's key in ``T.CAPS`` (hashtags apart: a list)
_SAMPLES = {"text": "texts", "lang": "languages", "account": "accounts", "post_url": "post_urls"}


def batch_sightings(sightings: list[dict[str, Any]], caps: dict[str, int]) -> list[dict[str, Any]]:
    """One cluster's ``sighting_params`` of a batch, in batch order, less what
    the upsert script would not add: a value an earlier sighting of the batch
    carries (already in the list, or refused because it was full, which it
    still is), and a field's values past its ``cap``-th distinct one in the
    batch (each of the first ``cap`` is in the list or refused for a full
    one). The script stores the same samples from these as from all of them,
    while the cluster's one update a batch carries at most the caps' worth
    of values (a few KB of short posts), however many sightings the batch
    has of it; a sighting left with nothing is dropped."""
    seen: dict[str, set] = {k: set() for k in (*_SAMPLES, "hashtags")}
    cap = {**{k: caps[c] for k, c in _SAMPLES.items()}, "hashtags": caps["hashtags"]}

    def fresh(field: str, value: Any) -> bool:
        if value is None or value == "" or value in seen[field] or len(seen[field]) >= cap[field]:
            return False
        seen[field].add(value)
        return True

    out = []
    for p in sightings:
        kept = {k: p.get(k) if fresh(k, p.get(k)) else None for k in _SAMPLES}
        tags = [h for h in p.get("hashtags") or [] if fresh("hashtags", h)]
        if tags or any(v is not None for v in kept.values()):
            out.append({**kept, "hashtags": tags})
    return out


def cluster_doc(snap: ClusterSnapshot, picture_url: str | None = None) -> dict[str, Any]:
    evidence = [e.model_dump(mode="json", exclude_none=True) for e in snap.evidence]
    scores: dict[str, float] = {}
    for e in snap.evidence:
        scores[e.detector] = max(scores.get(e.detector, 0.0), e.score)
    return {
        "schema_version": 1, "cluster_id": snap.cluster_id, "revision": snap.revision,
        "fake_score": snap.fake_score, "verdict": snap.verdict, "evidence": evidence,
        "evidence_summary": snap.evidence[0].detail if snap.evidence else None,
        "detector_scores": scores, "velocity": snap.velocity.model_dump(), "engagement": snap.engagement.model_dump(),
        "stream_sightings": snap.sightings, "stream_accounts": snap.accounts, "platforms": snap.platforms,
        "first_seen": snap.first_seen.isoformat(), "last_seen": snap.last_seen.isoformat(),
        "merged_into": snap.merged_into, "merged_from": snap.merged_from, "models_pending": snap.models_pending,
        "suppressed": snap.suppressed, "alert_level": snap.alert_level, "updated_at": now(),
        "blob_refs": [m.sha256 for m in snap.members], "picture_url": picture_url,
        "members": [
            # the verification thumbnail and content box are engine state
            # (engine-state.sqlite), not search fields
            {**m.model_dump(exclude={"thumb", "content_box"}), "pdq_bits": hex_bits(m.pdq), "phash_bits": hex_bits(m.phash)}
            for m in snap.members
        ],
    }


def dead_letter_doc(dl: DeadLetter) -> dict[str, Any]:
    return {
        "schema_version": 1, "dl_key": dead_letter_key(dl), "event_id": dl.event_id, "stage": dl.stage,
        "reason": dl.reason, "detail": dl.detail, "source": dl.source.model_dump(exclude_none=True) if dl.source else None,
        "payload_excerpt": dl.payload_excerpt, "at": dl.at.isoformat(), "@timestamp": dl.at.isoformat(),
    }


MEMBER_KEYS = ("sha256", "phash", "pdq", "pdq_quality", "event_id", "width", "height", "format", "distance")


def record_from_doc(doc: dict[str, Any], stats: dict[str, Any] | None) -> ClusterRecord:
    merged = bool(doc.get("merged_into"))
    st = stats or {"n": 0, "accounts": 0, "platforms": [], "first": None, "last": None}
    return ClusterRecord(
        id=doc["cluster_id"], fake_score=shown_score(doc["fake_score"]), verdict=doc["verdict"],
        evidence=doc.get("evidence") or [], sightings=st["n"], accounts=st["accounts"], platforms=st["platforms"],
        first_seen=st["first"] or doc["first_seen"], last_seen=st["last"] or doc["last_seen"],
        velocity=doc["velocity"], engagement=doc["engagement"],
        members=[] if merged else [{k: m.get(k) for k in MEMBER_KEYS} for m in doc.get("members") or []],
        merged_from=doc.get("merged_from") or [], merged_into=doc.get("merged_into"),
        models_pending=bool(doc.get("models_pending")), suppressed=doc.get("suppressed"),
        alert_level=doc.get("alert_level") or 0, stream_sightings=doc.get("stream_sightings") or 0,
        revision=doc["revision"], updated_at=doc.get("updated_at"),
    )
