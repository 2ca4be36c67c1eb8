"""Request bounds Elasticsearch sets, and the id filter every part of the
Elasticsearch findings store builds (``streams.es_store`` and its parts):
one home, so a test that shrinks a bound shrinks it for every part."""

from __future__ import annotations

from typing import Any, Collection

MAX_CANDIDATES = 10_000  # index.max_result_window: the most hits one search request may ask for
ID_CHUNK = 10_000  # ids per terms filter (index.max_terms_count is 65,536)
PAGE = 1000  # hits per search_after page of a scan


def in_ids(field: str, ids: Collection[str]) -> dict[str, Any]:
    """A filter: ``field`` is one of ``ids`` (none: matches nothing), a terms
    query per ``ID_CHUNK`` ids (index.max_terms_count is 65,536 a query)."""
    wanted = sorted(set(ids))
    if len(wanted) <= ID_CHUNK:
        return {"terms": {field: wanted}}
    return {"bool": {"should": [{"terms": {field: wanted[i:i + ID_CHUNK]}} for i in range(0, len(wanted), ID_CHUNK)],
                     "minimum_should_match": 1}}


def platform_key(platform: str) -> str:
    """A platform as events carry it (``ImageEvent`` lower-cases it). The
    sightings' ``platform`` is a keyword without a normalizer, and those
    stored before events were lower-cased may hold "Bluesky": a ``terms``
    aggregation answers each spelling as a bucket of its own, so every
    reader folds the keys with this (filters fold with ``case_insensitive``)."""
    return platform.strip().lower()


def platforms_of(buckets: list[dict[str, Any]]) -> list[str]:
    """The distinct platforms of a ``terms`` aggregation on ``platform``, folded (``platform_key``), sorted."""
    return sorted({platform_key(str(b["key"])) for b in buckets})


# a terms aggregation of the platforms: each spelling a bucket (``platforms_of`` folds them);
# 100 spellings is far beyond the platforms deepwatch reads
PLATFORMS_AGG: dict[str, Any] = {"terms": {"field": "platform", "size": 100, "order": {"_key": "asc"}}}
