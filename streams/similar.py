"""Have we seen this picture? One image against the stored clusters and the
banks of known pictures, nearest first: the lookup behind ``deepwatch
similar`` and the desk's ``POST /api/similar`` / "Find a picture" page.

``read_picture`` takes the image's bytes under the configured decode limits
(the decode memory budget shared with the analyze stage included);
``find`` answers for it from a findings store (SQLite or Elasticsearch) and
the banks file. Clusters the hashes nominate are checked again on their
members' pixels (``recorded_hashes``), as the cluster writer decides, so a
look-alike (one prompt's other seed) is not called the same picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Union

from pydantic import BaseModel

from detectors.banks import Verdict, Via
from detectors.hashing import ImageHashes, compute_hashes
from detectors.imagedata import DecodeLimits, ImageData, process_budget
from streams.settings import Settings


class ClusterMatch(BaseModel):
    """A stored cluster showing the picture (its surviving id, never a merged-away one)."""

    cluster_id: str
    distance: int
    via: str


class BankMatch(BaseModel):
    """A bank entry showing the picture."""

    bank: str
    entry_id: str
    verdict: Verdict
    label: str | None
    distance: int
    via: Via


Match = Union[ClusterMatch, BankMatch]


@dataclass(frozen=True)
class Picture:
    """What a lookup needs of an image: its digest and its hashes."""

    sha256: str
    hashes: ImageHashes
    size: tuple[int, int]
    format: str
    preview: bytes | None = None  # a small JPEG of it, when asked for (``preview_px``)


def read_picture(data: bytes, limits: DecodeLimits, *, preview_px: int | None = None) -> Picture:
    """The picture in ``data``, hashed within ``limits``; raises
    ``ImageRejected`` (its ``reason``: ``empty``, ``too_large``,
    ``decompression_bomb``, ``undecodable``, ``memory_budget``, ``busy``...).
    Decodes pixels: call it off the event loop."""
    return picture_of(ImageData(data, limits=limits), preview_px=preview_px)


def picture_of(image: ImageData, *, preview_px: int | None = None) -> Picture:
    """``image`` hashed (and, with ``preview_px``, a JPEG of it at most that
    many pixels a side: re-encoded, never the original bytes)."""
    # The decode shares the process's memory budget (the analyze stage's, where one runs):
    # lookups arriving together wait their turn instead of multiplying the peak.
    with process_budget(image.limits.max_decode_bytes).reserve(image.decode_cost):
        hashes = compute_hashes(image)
        preview = _preview(image, preview_px) if preview_px else None
    return Picture(image.sha256, hashes, image.size, image.format, preview)


def _preview(image: ImageData, px: int) -> bytes:
    import io

    small = image.thumbnail(px).convert("RGB")
    small.thumbnail((px, px))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=80)
    return out.getvalue()


def find(settings: Settings, picture: Picture, store: Any | None) -> list[Match]:
    """Clusters in ``store`` (a findings store; None: none to look in) and
    bank entries showing ``picture``, nearest first (the banks' ranking:
    distance over the rule's threshold). Errors of the store (an unreachable
    Elasticsearch: ``EsError``) are the caller's to report."""
    ranked: list[tuple[tuple[float, int], Match]] = [
        *((_rank(settings, m.distance, m.via), m) for m in similar_clusters(settings, picture, store)),
        *((_rank(settings, m.distance, m.via), m) for m in similar_banks(settings, picture)),
    ]
    ranked.sort(key=lambda r: r[0])  # stable: a tie keeps clusters before banks
    return [m for _, m in ranked]


def as_json(matches: Iterable[Match]) -> list[dict[str, Any]]:
    """The ``deepwatch similar --format json`` rows (a contract: fields only ever added)."""
    return [m.model_dump() for m in matches]


def _rank(settings: Settings, distance: int, via: str) -> tuple[float, int]:
    from detectors.neardup.clusters import rank_key

    return rank_key(distance, via, settings.dedupe.phash_threshold, settings.dedupe.pdq_threshold)


def similar_clusters(settings: Settings, picture: Picture, store: Any | None) -> list[ClusterMatch]:
    """Clusters of ``store`` showing the picture. Elasticsearch: bit-vector
    kNN nominates candidate clusters (``similar_candidates``); a store
    without it (SQLite) gives every member (``iter_members``). Either way the
    embedded index's matching rule and ranking decide."""
    if store is None:
        return []
    from detectors.neardup import ClusterIndex

    # members are indexed as-is: the writer already applied the chaining bound
    # when it clustered them, so the read side only asks "near any member?"
    index = ClusterIndex(**settings.dedupe.thresholds(), max_representative_distance=1 << 20)
    members: dict[str, list[tuple[str, ImageHashes]]] = {}
    candidates = getattr(store, "similar_candidates", None)
    if candidates is not None:
        for doc in candidates(picture.sha256, picture.hashes):
            for m in doc.get("members") or []:
                h = ImageHashes(phash=m["phash"], pdq=m["pdq"], pdq_quality=m["pdq_quality"], views=m.get("views"),
                                trimmed=bool(m.get("trimmed")))
                index.add(doc["cluster_id"], m["sha256"], h)
                members.setdefault(doc["cluster_id"], []).append((m["sha256"], h))
    else:
        for row in store.iter_members():
            h = ImageHashes(phash=row.phash, pdq=row.pdq, pdq_quality=row.pdq_quality, views=row.views,
                            trimmed=row.trimmed)
            index.add(row.cluster_id, row.sha256, h)
            members.setdefault(row.cluster_id, []).append((row.sha256, h))
    return _on_pixels(settings, picture, index.lookup(picture.sha256, picture.hashes), members)


def _on_pixels(settings: Settings, picture: Picture, found: list[Any],
               members: dict[str, list[tuple[str, ImageHashes]]]) -> list[ClusterMatch]:
    """The clusters the hashes found, kept when the image matches one of their
    members on pixels too, as the cluster writer decides. Stored members carry
    hashes without the thumbnail, so each found cluster's members are read
    with their whole record (``recorded_hashes``); a member with neither record
    nor bytes keeps its stored hashes, which then decide alone. Without this,
    look-alikes (one prompt's other seed) come back as "the same picture"."""
    from detectors.neardup import ClusterIndex
    from streams.analyze import recorded_hashes

    index = ClusterIndex(**settings.dedupe.thresholds(), max_representative_distance=1 << 20)
    for f in found:
        for sha, stored in members.get(f.cluster_id, []):
            index.add(f.cluster_id, sha, recorded_hashes(settings, sha) or stored, representative=True)
    return [ClusterMatch(cluster_id=m.cluster_id, distance=m.distance, via=m.via)
            for m in index.lookup(picture.sha256, picture.hashes)]


def similar_banks(settings: Settings, picture: Picture) -> list[BankMatch]:
    """Bank entries showing the picture; none when there is no banks file
    (opening one would create it)."""
    if not settings.banks_path.exists():
        return []
    banks = settings.bank_store()
    try:
        found = banks.match(picture.hashes)
    finally:
        banks.close()
    return [BankMatch(bank=m.bank, entry_id=m.entry_id, verdict=m.verdict, label=m.label, distance=m.distance,
                      via=m.via) for m in found]
