"""The replay summary's reads of the Elasticsearch findings store
(``ReplayAccounting``: ``dead_letter_counts``, ``dead_letters_of``,
``alerts_created_since``, ``processed_among``; SQLite's twins are in
``streams.store``): aggregations, or searches keyed by what the run holds
(its event ids, offsets, start time), never a scan of a whole index."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Collection, Iterator

from streams import es_requests as R
from streams.findings import AlertRecord, DeadLetterRecord

if TYPE_CHECKING:
    from streams.cluster_search import Deadline

# ``dead_letters``' and ``alerts``' order, and the fields their records leave out
DEAD_LETTER_ORDER = [{"@timestamp": "asc"}, {"dl_key": "asc"}]
DEAD_LETTER_SOURCE = {"excludes": ["@timestamp", "dl_key", "schema_version"]}
ALERT_ORDER = [{"created_at": "asc"}, {"alert_id": "asc"}]
ALERT_SOURCE = {"excludes": ["@timestamp", "evidence_summary"]}
COUNT_PAGE = 1000  # stage or reason buckets per composite page (each with one top hit)
# an alert's creation time is kept to the millisecond: the range reaches this far before the
# start asked for, and each record's own time decides
SINCE_MARGIN_MS = 1000


class EsSummaryQueries:
    """Replay-summary reads of ``streams.es_store.EsFindingsStore``, which this is mixed into."""

    # Provided by ``EsFindingsStore``.
    names: dict[str, str]
    if TYPE_CHECKING:
        def _scan(self, index: str, query: dict, sort: list, source: Any = True,
                  deadline: Deadline | None = None) -> Iterator[dict[str, Any]]: ...
        def _composite(self, index: str, query: dict[str, Any], field: str, aggs: dict[str, Any],
                       page: int, deadline: Deadline | None = None) -> Iterator[dict[str, Any]]: ...
        def alerts(self, *, limit: int | None = None) -> list[AlertRecord]: ...

    def dead_letter_counts(self) -> dict[str, int]:
        """A composite aggregation over stages, then one over each stage's
        reasons (exact, paged: no terms size to cut a rare reason off), each
        bucket with its first dead letter in ``dead_letters``' order."""
        index = self.names["dead_letters"]
        first = {"first": {"top_hits": {"size": 1, "sort": DEAD_LETTER_ORDER, "_source": False}}}
        groups = []
        for stage in self._composite(index, {"match_all": {}}, "stage", {}, COUNT_PAGE):
            name = stage["key"]["key"]
            for b in self._composite(index, {"term": {"stage": name}}, "reason", first, COUNT_PAGE):
                hits = b["first"]["hits"]["hits"]
                groups.append((_sort_key(hits[0]["sort"]) if hits else (), f"{name}:{b['key']['key']}", b["doc_count"]))
        out: dict[str, int] = {}
        for _first, key, n in sorted(groups, key=lambda g: g[0]):
            out[key] = out.get(key, 0) + n
        return out

    def dead_letters_of(self, event_ids: Collection[str], topic: str,
                        offsets: Collection[tuple[int, int]]) -> list[DeadLetterRecord]:
        index = self.names["dead_letters"]
        queries = [{"terms": {"event_id": chunk}} for chunk in _chunks(sorted(set(event_ids)))]
        queries += [{"bool": {"filter": [{"term": {"source.topic": topic}}, {"term": {"source.partition": p}},
                                         {"terms": {"source.offset": chunk}}]}}
                    for p, chunk in _by_partition(offsets)]
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for query in queries:
            for h in self._scan(index, query, DEAD_LETTER_ORDER, DEAD_LETTER_SOURCE):
                found[(h["_index"], h["_id"])] = h
        return [DeadLetterRecord.model_validate(h["_source"])
                for h in sorted(found.values(), key=lambda h: _sort_key(h["sort"]))]

    def alerts_created_since(self, since: datetime | None) -> list[AlertRecord]:
        if since is None:
            return list(self.alerts())
        query = {"range": {"created_at": {"gte": int(since.timestamp() * 1000) - SINCE_MARGIN_MS,
                                          "format": "epoch_millis"}}}
        records = [AlertRecord.model_validate(h["_source"])
                   for h in self._scan(self.names["alerts"], query, ALERT_ORDER, ALERT_SOURCE)]
        return [a for a in records if a.created_at >= since]

    def processed_among(self, topic: str, offsets: Collection[tuple[int, int]]) -> set[tuple[int, int]]:
        """A marker per run that ended an offset: several may answer one."""
        out: set[tuple[int, int]] = set()
        for p, chunk in _by_partition(offsets):
            query = {"bool": {"filter": [{"term": {"topic": topic}}, {"term": {"partition": p}},
                                         {"terms": {"offset": chunk}}]}}
            for h in self._scan(self.names["processed"], query, [{"partition": "asc"}, {"offset": "asc"}],
                                ["partition", "offset"]):
                out.add((h["_source"]["partition"], h["_source"]["offset"]))
        return out


def _chunks(values: list[Any]) -> Iterator[list[Any]]:
    """``values`` a terms query at a time (index.max_terms_count)."""
    for i in range(0, len(values), R.ID_CHUNK):
        yield values[i:i + R.ID_CHUNK]


def _by_partition(offsets: Collection[tuple[int, int]]) -> Iterator[tuple[int, list[int]]]:
    by: dict[int, list[int]] = {}
    for p, o in sorted(set(offsets)):
        by.setdefault(p, []).append(o)
    for p, offs in by.items():
        for chunk in _chunks(offs):
            yield p, chunk


def _sort_key(values: list[Any]) -> tuple:
    """A hit's sort values, comparable: a missing one (null) last."""
    return tuple((v is None, v if v is not None else 0) for v in values)
