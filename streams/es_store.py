"""Findings in Elasticsearch: the same ``FindingsStore`` as the embedded
SQLite file, for deployments with more than one node.

Layout (``streams.es_templates``): one ``deepwatch-clusters`` document per
cluster (``_id`` = cluster id, upserted once a sink batch by a stored
painless script that keeps the highest revision: ``batch_actions``), a
``deepwatch-sightings`` data stream (``_id`` = event id), and
``deepwatch-alerts``, ``deepwatch-dead-letters``, ``deepwatch-deliveries``
keyed by alert id, dead-letter key and (alert, target). Counts shown for a
cluster (sightings, accounts, platforms, first and last seen) are computed
from the sightings, merges resolved, as the SQLite store computes them:
exactly, but for accounts past 40,000 distinct ones, which Elasticsearch's
cardinality aggregation estimates (``_sighting_stats``).

The connection and its error lines are ``streams.es_client``; the documents
and the records read back from them, ``streams.es_docs``; what is put in
place at start, ``streams.es_store_setup``; delivery records,
``streams.es_store_deliveries``; the desk's account views,
``streams.es_store_accounts``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

from streams import es_requests as R
from streams import es_templates as T
from streams.es_client import EsConfig, EsError, es_error_body, explain
from streams.es_docs import (
    SIGHTING_SOURCE, batch_sightings, cluster_doc, dead_letter_doc, dead_letter_key, doc_id, hex_bits,
    processed_action, record_from_doc, sighting_doc, sighting_from_doc, sighting_params,
)
from streams.es_store_accounts import EsAccountQueries
from streams.es_store_deliveries import EsDeliveryLog, ago, in_states
from streams.es_store_setup import IndexSetup
from streams.es_store_summary import (
    ALERT_ORDER, ALERT_SOURCE, DEAD_LETTER_ORDER, DEAD_LETTER_SOURCE, EsSummaryQueries,
)
from streams.cluster_search import (
    SORT_KEYS, VELOCITY_FIELDS, ClusterQuery, Deadline, SearchCursor, SearchPage, SearchTimeout, sort_key, sort_order,
    text_terms,
)
from streams.findings import (
    MAX_RESULTS, QUEUED_RECENT_S, AlertRecord, ClusterRecord, DeadLetterRecord, DeliveryState, MemberRow, Page,
    PostIdentity, SightingRecord, StoredDeadLetter, cluster_page_url, legacy_dead_letter_identity, plan_dead_letters,
    read_limit, score_floor, shown_score, stored_at, superseded_by_sighting, surviving_cluster, unstored_alerts,
)
from streams.records import Alert, ClusterSnapshot, DeadLetter, SourceRef

log = logging.getLogger("deepwatch.es")

PROCESSED_MARGIN_MS = 30_000  # re-read window of processed_since and changes_since: refresh interval + writer clock skew
MATCH_PAGE = 10_000  # composite-aggregation buckets per page (search.max_buckets is 65,536)
STATS_CHUNK = 200  # clusters per sightings-statistics request


def _epoch_ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


class EsFindingsStore(IndexSetup, EsDeliveryLog, EsAccountQueries, EsSummaryQueries):
    changes_margin_ms = PROCESSED_MARGIN_MS  # how far before its cursor ``changes_since`` looks again

    def __init__(self, config: EsConfig, *, prefix: str = "deepwatch", settings: Any | None = None, client: Any = None):
        self.config = config
        self.prefix = prefix
        self.names = T.names(prefix)
        self.settings = settings
        self.es = client if client is not None else config.client()
        self._ready = False
        self._server: dict[str, Any] | None = None
        from streams.settings import FindingsSettings
        from streams.es_bulk import BulkSink

        fs = settings.findings if settings is not None else FindingsSettings()
        self.bulk = BulkSink(self.es, fs, dead_letters_index=self.names["dead_letters"],
                             processed_index=self.names["processed"], url=self.config.url)

    @classmethod
    def from_url(cls, url: str, settings: Any | None = None) -> "EsFindingsStore":
        from streams.settings import FindingsSettings

        fs = getattr(settings, "findings", None) or FindingsSettings()
        cfg = EsConfig.from_url(url, ca_certs=fs.ca_certs, verify_certs=fs.verify_certs,
                                request_timeout_s=fs.request_timeout_s)
        return cls(cfg, prefix=fs.index_prefix, settings=settings)

    def close(self) -> None:
        self.es.close()

    # -- setup ----------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        if self._server is None:
            try:
                self._server = dict(self.es.info())
            except Exception as e:
                raise explain(e, self.config.url) from None
            number = self._server.get("version", {}).get("number", "0.0.0")
            major, minor = (int(x) for x in number.split(".")[:2])
            if (major, minor) < (8, 15):
                raise EsError(f"Elasticsearch {number} at {self.config.url} is too old: deepwatch needs >= 8.15 "
                              "(bit-vector kNN for picture lookups)")
        return self._server

    def refresh(self) -> None:
        """Make everything written so far visible to searches (tests, CLI)."""
        self.ensure_setup()
        self.es.indices.refresh(index=",".join(self.names.values()))

    flush = refresh

    # -- writes ---------------------------------------------------------------
    def cluster_actions(self, snap: ClusterSnapshot) -> list[tuple[dict, dict | None]]:
        """One snapshot's actions (``batch_actions`` of it alone)."""
        return self.batch_actions([snap])

    def batch_actions(self, snaps: list[ClusterSnapshot]) -> list[tuple[dict, dict | None]]:
        """A batch's actions: each sighting's ``create`` in batch order, then
        one update per cluster with the batch's newest
        revision of it (the first of equal ones, as the script keeps the
        first it sees) and its sightings in batch order. A viral cluster
        sighted 500 times a batch was 500 updates, each carrying the whole
        document (its members) and each making Elasticsearch re-index it,
        for one document kept; the samples the script adds are the same
        either way (``batch_sightings``), so a batch redelivered, or split
        differently, ends in the same documents. Then each sighting's
        processed marker."""
        n = self.names
        out: list[tuple[dict, dict | None]] = []
        # every offset, duplicates of an earlier event included: replay accounting. Written last,
        # after the cluster updates (a bulk is cut into several requests): an offset counted as
        # processed has its cluster written, as when each sighting's actions came together
        processed: list[tuple[dict, dict | None]] = []
        newest: dict[str, ClusterSnapshot] = {}  # in order of first appearance
        sightings: dict[str, list[dict]] = {}
        for snap in snaps:
            cid, s = snap.cluster_id, snap.new_sighting
            params = sightings.setdefault(cid, [])
            if s is not None:
                out.append(({"create": {"_index": n["sightings"], "_id": doc_id(s.event.event_id)}},
                            sighting_doc(cid, s)))
                processed.append(processed_action(n["processed"], s.source, "sighting", s.event.event_id))
                params.append(sighting_params(s))
            if cid not in newest or snap.revision > newest[cid].revision:
                newest[cid] = snap
        for cid, snap in newest.items():
            out.append((
                {"update": {"_index": n["clusters"], "_id": cid, "retry_on_conflict": 5}},
                {"scripted_upsert": True, "upsert": {},
                 "script": {"id": T.SCRIPT_ID,
                            "params": {"doc": cluster_doc(snap, self._picture_url(cid)),
                                       "sightings": batch_sightings(sightings[cid], T.CAPS), "caps": T.CAPS}}},
            ))
        return out + processed

    def _picture_url(self, cluster_id: str) -> str | None:
        """The cluster's desk page under ``desk.public_url`` (None without one), as alerts link it."""
        return cluster_page_url(getattr(getattr(self.settings, "desk", None), "public_url", None), cluster_id)

    def apply_snapshot(self, snap: ClusterSnapshot) -> None:
        self.apply_snapshots([snap])

    def apply_snapshots(self, snaps: Iterable[ClusterSnapshot]) -> None:
        self.ensure_setup()
        snaps = list(snaps)
        new = [s.new_sighting.event.event_id for s in snaps if s.new_sighting is not None]
        stored = self._stored_sightings(new)
        actions = [a for a in self.batch_actions(snaps)
                   if not (stored and "create" in a[0] and a[0]["create"]["_index"] == self.names["sightings"]
                           and a[1]["event_id"] in stored)]
        # One outcome per event, in the request that stores the sighting: the event's earlier
        # failures go, and where each sat reads as a sighting (as the SQLite store does). A
        # conflict (another post under the id) stays. Only failures already searchable are
        # seen (the index's refresh interval, 1 s by default); one written in that moment stays.
        rows, where = self._stored_dead_letters(sorted(set(new) - stored))
        for row in rows:
            if superseded_by_sighting(row.stage, row.reason):
                actions.append(({"delete": {"_index": where[row.key], "_id": row.key}}, None))
                if row.source is not None:
                    actions.append(processed_action(self.names["processed"], row.source, "sighting", row.event_id,
                                                    op="index"))
        self.bulk.send(actions)

    def _stored_sightings(self, event_ids: list[str]) -> set[str]:
        """Which of ``event_ids`` already have a searchable sighting. A
        ``create`` by event id refuses a second copy only within one backing
        index: a sink batch redelivered after a crash that straddles a
        rollover of the sightings data stream would write its sightings
        again. One terms search per batch, on a keyword field."""
        found: set[str] = set()
        for i in range(0, len(event_ids), R.ID_CHUNK):
            chunk = event_ids[i:i + R.ID_CHUNK]
            hits = self._search(self.names["sightings"], query={"terms": {"event_id": chunk}},
                                size=len(chunk), source=["event_id"])["hits"]["hits"]
            found.update(h["_source"]["event_id"] for h in hits)
        return found

    def add_dead_letter(self, dl: DeadLetter) -> bool:
        return self.add_dead_letters([dl]) == 1

    def add_dead_letters(self, dls: Iterable[DeadLetter]) -> int:
        """One document per failed event, as the SQLite store keeps one row
        (``plan_dead_letters``), in one bulk request: a failure of an event
        with a searchable sighting is not kept, an event's latest failure
        replaces its earlier ones (deleted by id). Returns how many
        documents were created."""
        self.ensure_setup()
        dls = list(dls)
        ids = sorted({dl.event_id for dl in dls if dl.event_id is not None})
        nameless = {dead_letter_key(dl) for dl in dls if dl.event_id is None}
        # and the id an older store gave such a message, without its digest
        nameless |= {doc_id(k) for dl in dls if dl.event_id is None and (k := legacy_dead_letter_identity(dl))}
        rows, where = self._stored_dead_letters(ids, nameless)
        plan = plan_dead_letters(dls, rows, self._stored_sightings(ids), key=doc_id)
        actions: list = [({"delete": {"_index": where[row.key], "_id": row.key}}, None) for row in plan.delete]
        for dl in plan.write:
            actions.append(({"create": {"_index": self.names["dead_letters"], "_id": dead_letter_key(dl)}}, dead_letter_doc(dl)))
        for outcome, done in (("dead_letter", (*plan.write, *plan.older)), ("duplicate", plan.succeeded)):
            actions += [processed_action(self.names["processed"], dl.source, outcome, dl.event_id)
                        for dl in done if dl.source is not None]
        res = self.bulk.send(actions)
        return res.created_in.get(self.names["dead_letters"], 0)

    def _stored_dead_letters(self, event_ids: list[str],
                             keys: Iterable[str] = ()) -> tuple[list[StoredDeadLetter], dict[str, str]]:
        """The dead letters of ``event_ids``, and those under the document ids
        ``keys``, as searchable now, and each one's concrete index by id (a
        delete names it: the alias may front several indices)."""
        keys = sorted(keys)
        out: list[StoredDeadLetter] = []
        where: dict[str, str] = {}
        for values, query_of in ((event_ids, lambda vs: {"terms": {"event_id": vs}}),
                                 (keys, lambda vs: {"ids": {"values": vs}})):
            for i in range(0, len(values), R.ID_CHUNK):
                query = query_of(values[i:i + R.ID_CHUNK])
                for h in self._scan(self.names["dead_letters"], query, [{"dl_key": "asc"}],
                                    ["event_id", "stage", "reason", "at", "source"]):
                    doc = h["_source"]
                    where[h["_id"]] = h["_index"]
                    out.append(StoredDeadLetter(h["_id"], doc.get("event_id"), doc["stage"], doc["reason"],
                                                stored_at(doc.get("at")),
                                                SourceRef.model_validate(doc["source"]) if doc.get("source") else None))
        return out, where

    def add_alert(self, alert: Alert) -> bool:
        self.ensure_setup()
        doc = alert.model_dump(mode="json")
        doc["@timestamp"] = doc["created_at"]
        doc["evidence_summary"] = alert.evidence[0].detail if alert.evidence else None
        # an account alert's id holds the account id (up to 1,024 UTF-8 bytes): as a raw _id past
        # 512 bytes it had the whole request refused; reads find alerts by the alert_id field
        res = self.bulk.send([({"create": {"_index": self.names["alerts"], "_id": doc_id(alert.alert_id)}}, doc)])
        return res.created_in.get(self.names["alerts"], 0) == 1

    # -- per-run accounting and duplicate checks -------------------------------
    def mark_processed(self, source: SourceRef, outcome: str, event_id: str | None) -> None:
        """An event that ends as neither a new sighting nor a dead letter (an
        exact duplicate of a stored sighting) is still accounted for."""
        self.ensure_setup()
        self.bulk.send([processed_action(self.names["processed"], source, outcome, event_id)])

    def sighting_identity(self, event_id: str) -> PostIdentity | None:
        """The picture, platform and account a stored sighting of
        ``event_id`` carries (searchable sightings only: the analyze stage's
        own memory covers the last moments)."""
        hits = self._search(self.names["sightings"], query={"term": {"event_id": event_id}}, size=1,
                            source=["sha256", "platform", "account_id"])["hits"]["hits"]
        if not hits:
            return None
        doc = hits[0]["_source"]
        return PostIdentity(doc["sha256"], doc["platform"], doc["account_id"])

    # -- reads ----------------------------------------------------------------
    def _search(self, index: str, deadline: Deadline | None = None, **body: Any) -> dict[str, Any]:
        """One search request. With ``deadline``: sent with the time left
        as its ``timeout`` and as the client's request timeout (no
        retries), and an answer Elasticsearch marks ``timed_out``
        (the hits and buckets found before the shards gave up: a part,
        unsaid which) raises ``SearchTimeout`` instead of being used. An
        answer some shards failed (``_shards.failed``), or one timed out
        without a deadline (the cluster's ``search.default_search_timeout``),
        is never used either: ``EsError``, held (it may answer whole later)."""
        from elasticsearch import ConnectionTimeout, NotFoundError

        es = self.es
        if deadline is not None:
            left = deadline.left()
            body["timeout"] = f"{max(1, int(left * 1000))}ms"  # the shards' own (soft) limit
            # and the request's: no waiting past the time left, no retries
            es = es.options(request_timeout=left, max_retries=0)
        try:
            res = dict(es.search(index=index, **body))
        except ConnectionTimeout as e:
            if deadline is not None:
                raise SearchTimeout(deadline.timeout_s) from None
            raise explain(e, self.config.url) from None
        except NotFoundError as e:
            if not es_error_body(e):  # a 404 page from a server that is not Elasticsearch (a wrong URL)
                raise explain(e, self.config.url) from None
            # nothing written yet: no index behind the alias
            return {"hits": {"total": {"value": 0, "relation": "eq"}, "hits": []}, "aggregations": {}}
        except Exception as e:
            raise explain(e, self.config.url) from None
        partial = _shard_failures(res)
        if partial:
            # 200 with some shards' hits and buckets missing (a node left, a thread pool refused:
            # ``allow_partial_search_results`` defaults to true). Used, it read as fewer sightings,
            # a stored sighting not found (written again across a rollover), an offset not processed.
            raise EsError(f"Elasticsearch at {self.config.url}: {partial}; the partial answer is not used", hold=True)
        if res.get("timed_out"):
            if deadline is not None:
                raise SearchTimeout(deadline.timeout_s)
            # the cluster's ``search.default_search_timeout`` bounds a search sent without one:
            # what the shards had collected by then, a part, unsaid which
            raise EsError(f"Elasticsearch at {self.config.url}: the search timed out (the cluster's "
                          "search.default_search_timeout); the partial answer is not used", hold=True)
        return res

    def _scan(self, index: str, query: dict, sort: list, source: Any = True,
              deadline: Deadline | None = None) -> Iterator[dict[str, Any]]:
        """Every hit, paged with search_after (no scroll contexts to leak)."""
        after = None
        while True:
            body: dict[str, Any] = {"query": query, "sort": sort, "size": R.PAGE, "source": source}
            if after is not None:
                body["search_after"] = after
            hits = self._search(index, deadline, **body)["hits"]["hits"]
            yield from hits
            if len(hits) < R.PAGE:
                return
            after = hits[-1]["sort"]

    def clusters(self, *, include_merged: bool = False, limit: int | None = None) -> list[ClusterRecord]:
        """Clusters, highest fake score first, ties by id (SQLite's order).
        With ``limit`` only those are read, in one search (the live table
        asks for the top 15 every refresh), not every cluster."""
        query: dict[str, Any] = {"match_all": {}} if include_merged else _live()
        return self._records(self._first(query, [{"fake_score": "desc"}, {"cluster_id": "asc"}], limit))

    def _first(self, query: dict[str, Any], sort: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
        """The first ``limit`` cluster documents (all: None) in ``sort``
        order: one sized search within the result window, else a scan
        stopped at the limit."""
        if limit and limit <= R.MAX_CANDIDATES:
            return [h["_source"] for h in self._search(self.names["clusters"], query=query, sort=sort, size=int(limit),
                                                       source=_READ_SOURCE)["hits"]["hits"]]
        scan = self._scan(self.names["clusters"], query, sort, _READ_SOURCE)
        return [h["_source"] for h in (itertools.islice(scan, int(limit)) if limit else scan)]

    def clusters_by_id(self, ids: set[str]) -> list[ClusterRecord]:
        """These clusters' records (merged ones too), built exactly as ``clusters`` builds them."""
        wanted = sorted(ids)
        docs: list[dict[str, Any]] = []
        for i in range(0, len(wanted), R.PAGE):
            docs += [h["_source"] for h in self._scan(self.names["clusters"], {"ids": {"values": wanted[i:i + R.PAGE]}},
                                                      [{"cluster_id": "asc"}], _READ_SOURCE)]
        return self._records(docs)

    def changes_since(self, cursor: int | None) -> tuple[set[str] | None, int]:
        """The clusters whose records may differ from when ``cursor`` (a value
        this method returned) was taken, and the cursor to ask with next time;
        None instead of a set when there is no cursor yet (read everything).
        Every revision of a cluster -- a sighting, a merge, a model result --
        rewrites its document with its writer's clock (``updated_at``). The
        cursor is the newest ``updated_at`` seen (epoch ms), and each call
        re-reads a margin before it, as ``processed_since`` does (refresh
        interval plus clock skew between writers): a document made visible
        late is still seen, at the price of re-reading the last margin's
        clusters."""
        index = self.names["clusters"]
        if cursor is None:
            hits = self._search(index, query={"match_all": {}}, size=1, sort=[{"updated_at": "desc"}],
                                source=["updated_at"])["hits"]["hits"]
            newest = _epoch_ms(hits[0]["_source"]["updated_at"]) if hits and hits[0]["_source"].get("updated_at") else 0
            return None, newest
        query = {"range": {"updated_at": {"gte": cursor - self.changes_margin_ms, "format": "epoch_millis"}}}
        ids: set[str] = set()
        newest = cursor
        for h in self._scan(index, query, [{"updated_at": "asc"}, {"cluster_id": "asc"}], ["cluster_id", "updated_at"]):
            ids.add(h["_source"]["cluster_id"])
            newest = max(newest, _epoch_ms(h["_source"]["updated_at"]))
        return ids, newest

    def newest_last_seen(self) -> datetime | None:
        hits = self._search(self.names["clusters"], query={"match_all": {}}, size=1,
                            sort=[{"last_seen": "desc"}, {"cluster_id": "asc"}], source=["last_seen"])["hits"]["hits"]
        if not hits or not hits[0]["_source"].get("last_seen"):
            return None
        d = datetime.fromisoformat(hits[0]["_source"]["last_seen"])
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)

    def recent_clusters(self, since: datetime | None = None, *, limit: int | None = None) -> list[ClusterRecord]:
        """See ``FindingsStore.recent_clusters``: one sorted search (paged past
        ``R.MAX_CANDIDATES``), the records in its order."""
        query: dict[str, Any] = _live()
        if since is not None:
            query = {"bool": {"filter": [query, {"range": {"last_seen": {
                "gte": int(since.timestamp() * 1000), "format": "epoch_millis"}}}]}}
        return self._records(self._first(query, [{"last_seen": "desc"}, {"cluster_id": "asc"}], limit))

    def verdict_cluster_ids(self, verdict: str) -> dict[str, list[str]]:
        query = {"bool": {"filter": [_live(), {"term": {"verdict": verdict}}]}}
        return {h["_source"]["cluster_id"]: list(h["_source"].get("merged_from") or [])
                for h in self._scan(self.names["clusters"], query, [{"cluster_id": "asc"}], ["cluster_id", "merged_from"])}

    def has_member(self, sha256: str) -> bool:
        res = self._search(self.names["clusters"], query={"term": {"blob_refs": sha256}}, size=0, track_total_hits=1)
        return res["hits"]["total"]["value"] > 0

    def cluster(self, cluster_id: str) -> ClusterRecord | None:
        hits = self._search(self.names["clusters"], query={"ids": {"values": [cluster_id]}}, size=1,
                            source=_READ_SOURCE)["hits"]["hits"]
        return self._records([hits[0]["_source"]])[0] if hits else None

    def search(self, q: ClusterQuery, *, timeout_s: float | None = None,
               after: SearchCursor | None = None) -> SearchPage:
        """See ``FindingsStore.search``. ``timeout_s`` bounds the requests
        that find and rank the matches, each sent with the time left as its
        ``timeout`` (``_search``); building the few records found is bounded
        by their number. ``after`` (a sorted search's: relevance is not
        paged, ``SearchCursor``): the candidates are pre-selected from it on, by a
        keyset filter on the stored values (``_es_after``) rather than
        ``search_after``, whose place is one of the stored values: the pages
        are in the order shown (a rounded score), and a page must start
        within the run of rows that show the cursor's values."""
        deadline = None if timeout_s is None else Deadline(timeout_s)
        relevance: dict[str, float] | None = None
        chunks: list[list[str] | None] = [None]
        if q.sighting_filtered:
            relevance = self._matching_clusters(q, deadline)
            if not relevance:
                return SearchPage([], [], q)
            ids = sorted(relevance)
            # every matching cluster, however many: a terms filter per chunk
            # (index.max_terms_count is 65,536), not only a first result window
            chunks = [ids[i:i + R.ID_CHUNK] for i in range(0, len(ids), R.ID_CHUNK)]
        base: list[dict[str, Any]] = []
        if q.verdict:
            base.append({"term": {"verdict": q.verdict}})
        if q.min_score is not None:
            base.append({"range": {"fake_score": {"gte": score_floor(q.min_score)}}})
        if q.cluster_ids is not None:  # at most MAX_RESULTS (ClusterQuery): one terms filter
            base.append({"terms": {"cluster_id": sorted(q.cluster_ids)}})
        sort = q.effective_sort
        if after is not None:  # a sorted search's (``SearchCursor``)
            base.append(_es_after(after))

        def query(chunk: list[str] | None) -> dict[str, Any]:
            filters = list(base)
            if chunk is not None:
                filters.append({"bool": {"should": [{"terms": {"cluster_id": chunk}}, {"terms": {"merged_from": chunk}}],
                                         "minimum_should_match": 1}})
            return {"bool": {"filter": filters, "must_not": [{"exists": {"field": "merged_into"}}]}}

        if sort == "relevance":
            # rank every surviving cluster by its best sighting (its own or a
            # merged one's), then velocity, from a few fields; build only the top
            score_of = relevance or {}
            rank: dict[str, tuple] = {}
            doc_velocity = sort_key("velocity", _doc_field)  # velocity's order, on these documents' fields
            for chunk in chunks:
                for h in self._scan(self.names["clusters"], query(chunk), [{"cluster_id": "asc"}],
                                    ["cluster_id", "merged_from", "velocity", "fake_score"], deadline):
                    d = h["_source"]
                    best = max(score_of.get(i, 0.0) for i in [d["cluster_id"], *(d.get("merged_from") or [])])
                    rank[d["cluster_id"]] = (-best, *doc_velocity(d))
            top = {k[-1]: k for k in heapq.nsmallest(q.max_results, rank.values())}
            by_velocity = sort_key("velocity")
            ranked = sorted(((top[c.id][0], *by_velocity(c)), c) for c in self.clusters_by_id(set(top)))
            return SearchPage([c for _k, c in ranked], [k[:-1] for k, _c in ranked], q)
        # pre-select by the stream's values on the documents (a margin wide, as
        # the SQLite store does), then order by the exact counts shown
        want = min(R.MAX_CANDIDATES, q.max_results * 4 + 100)
        orders = [next(iter(x.values())) for x in ES_SORT[sort]]
        picked: dict[str, tuple[tuple, dict[str, Any]]] = {}
        for chunk in chunks:
            hits = self._search(self.names["clusters"], deadline, query=query(chunk), size=want, sort=ES_SORT[sort],
                                source=_READ_SOURCE)["hits"]["hits"]
            for h in hits:
                picked[h["_source"]["cluster_id"]] = (_sort_order_key(h.get("sort") or [], orders), h["_source"])
            if len(picked) > want:  # the best ``want`` over the chunks so far
                picked = dict(heapq.nsmallest(want, picked.items(), key=lambda kv: kv[1][0]))
        exact = sort_key(sort)
        ranked = sorted(((exact(c), c) for c in self._records([doc for _key, doc in picked.values()])),
                        key=lambda kc: kc[0])
        if after is not None:
            ranked = [(k, c) for k, c in ranked if after.passed(k[:-1], c.id)]
        ranked = ranked[: q.max_results]
        return SearchPage([c for _k, c in ranked], [k[:-1] for k, _c in ranked], q)

    def cluster_sightings(self, cluster_id: str, *, limit: int = 200) -> list[SightingRecord]:
        """The cluster's posts, newest first, those of clusters merged into it included."""
        doc = self._search(self.names["clusters"], query={"ids": {"values": [cluster_id]}}, size=1,
                           source=["merged_from"])["hits"]["hits"]
        ids = [cluster_id, *((doc[0]["_source"].get("merged_from") or []) if doc else [])]
        hits = self._search(self.names["sightings"], query={"terms": {"cluster_id": ids}}, size=min(limit, R.MAX_CANDIDATES),
                            sort=[{"@timestamp": "desc"}, {"event_id": "asc"}],
                            source=SIGHTING_SOURCE)
        return [sighting_from_doc(h["_source"]) for h in hits["hits"]["hits"]]

    def sightings(self, *, cluster_ids: list[str] | None = None, account_id: str | None = None,
                  newest_first: bool = False, limit: int | None = None) -> list[SightingRecord]:
        """Sightings as recorded (see ``FindingsStore.sightings``): a terms /
        term filter over the sightings data stream, paged with search_after."""
        filters: list[dict[str, Any]] = []
        if cluster_ids is not None:
            if not cluster_ids:
                return []
            filters.append({"terms": {"cluster_id": sorted(set(cluster_ids))}})
        if account_id is not None:
            filters.append({"term": {"account_id": account_id}})
        order = "desc" if newest_first else "asc"
        hits = self._scan(self.names["sightings"], {"bool": {"filter": filters}},
                          [{"@timestamp": order}, {"event_id": order}], SIGHTING_SOURCE)
        out: list[SightingRecord] = []
        for h in hits:
            out.append(sighting_from_doc(h["_source"]))
            if limit and len(out) >= limit:
                break
        return out

    def _matching_clusters(self, q: ClusterQuery, deadline: Deadline | None = None) -> dict[str, float]:
        """Cluster id (as recorded on the sighting) -> best score among the
        sightings meeting every sighting-level condition (1.0 each unless
        the search ranks by relevance): every matching cluster, one
        composite-aggregation bucket each."""
        must: list[dict[str, Any]] = []
        if q.text:
            terms = text_terms(q.text)
            if not terms:
                return {}
            must = [{"multi_match": {"query": t, "type": "phrase", "fields": ["text", "hashtags.text"]}} for t in terms]
        filters: list[dict[str, Any]] = []
        if q.since or q.until:
            rng: dict[str, str] = {}
            if q.since:
                rng["gte"] = q.since.isoformat()
            if q.until:
                rng["lte"] = q.until.isoformat()
            filters.append({"range": {"@timestamp": rng}})
        if q.platform:
            # case-insensitive: documents stored before platforms were lower-cased keep their
            # spelling (SQLite folds its rows once, at the schema-3 migration), the keyword has no
            # normalizer, and ``case_insensitive`` (term on keyword, ES >= 7.10) folds at query time
            filters.append({"term": {"platform": {"value": q.platform, "case_insensitive": True}}})
        if q.account:
            filters.append({"bool": {"should": [{"term": {"account_id": q.account}},
                                                {"term": {"account_handle_norm": q.account.lower()}}],
                                     "minimum_should_match": 1}})
        if q.hashtag:
            filters.append({"term": {"hashtags": q.hashtag}})
        query = {"bool": {"must": must or [{"match_all": {}}], "filter": filters}}
        # Every matching cluster, paged (a composite aggregation): a collapsed
        # search stops at index.max_result_window (10,000 clusters), and which
        # 10,000 it keeps (by score, ties by id) is not what a sorted or a
        # verdict-filtered search needs.
        scored = q.effective_sort == "relevance"
        out: dict[str, float] = {}
        after: dict[str, Any] | None = None
        while True:
            comp: dict[str, Any] = {"size": MATCH_PAGE, "sources": [{"cluster_id": {"terms": {"field": "cluster_id"}}}]}
            if after:
                comp["after"] = after
            agg: dict[str, Any] = {"composite": comp}
            if scored:  # the best-matching sighting's score
                agg["aggs"] = {"best": {"max": {"script": {"source": "_score"}}}}
            res = self._search(self.names["sightings"], deadline, size=0, query=query, aggs={"clusters": agg})
            part = (res.get("aggregations") or {}).get("clusters") or {}
            buckets = part.get("buckets") or []
            for b in buckets:
                out[b["key"]["cluster_id"]] = float((b.get("best") or {}).get("value") or 0.0) if scored else 1.0
            after = part.get("after_key")
            if len(buckets) < MATCH_PAGE or not after:
                return out

    def _records(self, docs: list[dict[str, Any]]) -> list[ClusterRecord]:
        live = [d for d in docs if not d.get("merged_into")]
        stats: dict[str, dict[str, Any]] = {}
        for i in range(0, len(live), STATS_CHUNK):
            stats.update(self._sighting_stats(live[i:i + STATS_CHUNK]))
        return [record_from_doc(d, stats.get(d["cluster_id"])) for d in docs]

    def _sighting_stats(self, docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Exact per-cluster sightings statistics, merged-away ids included."""
        if not docs:
            return {}
        filters = {d["cluster_id"]: {"terms": {"cluster_id": [d["cluster_id"], *d.get("merged_from", [])]}} for d in docs}
        aggs = {"by_cluster": {"filters": {"filters": filters}, "aggs": {
            # exact below precision_threshold (40000, the maximum); above it ES estimates within ~1%
            "accounts": {"cardinality": {"field": "account_id", "precision_threshold": 40000}},
            "platforms": R.PLATFORMS_AGG,
            "first": {"top_hits": {"size": 1, "sort": [{"@timestamp": "asc"}], "_source": ["posted_at"]}},
            "last": {"top_hits": {"size": 1, "sort": [{"@timestamp": "desc"}], "_source": ["posted_at"]}},
        }}}
        # only these clusters' sightings: under match_all every sighting was read, the
        # sub-aggregations (top_hits, cardinality) defeating ES's filter-by-filter shortcut
        ids = sorted({i for f in filters.values() for i in f["terms"]["cluster_id"]})
        res = self._search(self.names["sightings"], size=0, query=R.in_ids("cluster_id", ids), aggs=aggs)
        out: dict[str, dict[str, Any]] = {}
        for cid, b in ((res.get("aggregations") or {}).get("by_cluster", {}).get("buckets") or {}).items():
            if not b["doc_count"]:
                continue
            first = b["first"]["hits"]["hits"]
            last = b["last"]["hits"]["hits"]
            out[cid] = {"n": b["doc_count"], "accounts": int(b["accounts"]["value"]),
                        "platforms": R.platforms_of(b["platforms"]["buckets"]),
                        "first": first[0]["_source"]["posted_at"] if first else None,
                        "last": last[0]["_source"]["posted_at"] if last else None}
        return out

    def _composite(self, index: str, query: dict[str, Any], field: str, aggs: dict[str, Any],
                   page: int, deadline: Deadline | None = None) -> Iterator[dict[str, Any]]:
        """Every bucket of a composite aggregation over ``field`` (keys
        ascending), ``page`` buckets a request, each with ``aggs``."""
        after: dict[str, Any] | None = None
        while True:
            comp: dict[str, Any] = {"size": page, "sources": [{"key": {"terms": {"field": field}}}]}
            if after:
                comp["after"] = after
            agg: dict[str, Any] = {"composite": comp}
            if aggs:
                agg["aggs"] = aggs
            res = self._search(index, deadline, size=0, query=query, aggs={"by": agg})
            part = (res.get("aggregations") or {}).get("by") or {}
            buckets = part.get("buckets") or []
            yield from buckets
            after = part.get("after_key")
            if len(buckets) < page or not after:
                return

    def match_sightings(self, text: str, *, limit: int = MAX_RESULTS,
                        timeout_s: float | None = None) -> list[str]:
        """See ``FindingsStore.match_sightings``: a ``term`` on the event id
        and case-insensitive ``wildcard`` queries (``*needle*``) on the
        account id, handle and post URL (the URL is a doc-values-only
        keyword: ES answers that by scanning, slower but allowed), the
        distinct cluster ids by a composite aggregation. Leading wildcards
        are expensive queries: a cluster with ``search.allow_expensive_queries``
        off refuses them. ``timeout_s`` as for ``search``."""
        exact = text.strip()
        if not exact:
            return []
        pattern = "*" + "".join("\\" + c if c in "*?\\" else c for c in exact.lower()) + "*"
        query = {"bool": {"should": [
            {"term": {"event_id": exact}},
            *({"wildcard": {f: {"value": pattern, "case_insensitive": True}}}
              for f in ("account_id", "account_handle", "post_url")),
        ], "minimum_should_match": 1}}
        out: list[str] = []
        deadline = None if timeout_s is None else Deadline(timeout_s)
        for b in self._composite(self.names["sightings"], query, "cluster_id", {}, min(max(1, limit), MATCH_PAGE),
                                 deadline):
            out.append(b["key"]["key"])
            if len(out) >= limit:
                break
        return out

    def sighting_histogram(self, cluster_ids: list[str], start: datetime, end: datetime,
                           buckets: int) -> dict[str, list[int]]:
        """See ``FindingsStore.sighting_histogram``: one request, a
        ``date_range`` aggregation whose ranges are the buckets (the first
        and last open-ended, as the clamp), each split by platform."""
        out: dict[str, list[int]] = {}
        if not cluster_ids or buckets < 1:
            return out
        step_ms = max((end - start).total_seconds(), 1.0) * 1000 / max(buckets - 1, 1)
        edges = [str(round(start.timestamp() * 1000 + k * step_ms)) for k in range(1, buckets)]
        ranges: list[dict[str, str]] = []
        for k in range(buckets):
            r = {"key": str(k)}
            if k > 0:
                r["from"] = edges[k - 1]
            if k < buckets - 1:
                r["to"] = edges[k]
            ranges.append(r)
        if buckets == 1:
            ranges = [{"key": "0", "from": "0"}, {"key": "0", "to": "0"}]  # a range needs an end: both halves of time
        aggs = {"spread": {"date_range": {"field": "@timestamp", "format": "epoch_millis", "ranges": ranges},
                           "aggs": {"platforms": R.PLATFORMS_AGG}}}
        query = {"bool": {"filter": [{"terms": {"cluster_id": sorted(set(cluster_ids))}}]}}
        res = self._search(self.names["sightings"], size=0, query=query, aggs=aggs)
        for b in (res.get("aggregations") or {}).get("spread", {}).get("buckets") or []:
            for p in b["platforms"]["buckets"]:  # "Bluesky" stored before events were lower-cased is "bluesky"
                out.setdefault(R.platform_key(p["key"]), [0] * buckets)[int(b["key"])] += p["doc_count"]
        return out

    def alerts(self, *, limit: int | None = None) -> Page[AlertRecord]:
        hits = self._newest(self.names["alerts"], ALERT_ORDER, ALERT_SOURCE, limit)
        return Page([AlertRecord.model_validate(h["_source"]) for h in hits], hits.total)

    def dead_letters(self, *, limit: int | None = None) -> Page[DeadLetterRecord]:
        hits = self._newest(self.names["dead_letters"], DEAD_LETTER_ORDER, DEAD_LETTER_SOURCE, limit)
        return Page([DeadLetterRecord.model_validate(h["_source"]) for h in hits], hits.total)

    def _newest(self, index: str, order: list[dict[str, str]], source: Any,
                limit: int | None) -> Page[dict[str, Any]]:
        """Every hit of ``index`` in ``order`` (ascending fields); with ``limit`` only
        the last ``limit``: read newest first, ``size`` at most a page and
        ``search_after`` beyond it (never past index.max_result_window), the
        exact total from the first page (``track_total_hits``)."""
        limit = read_limit(limit)
        if limit is None:
            return Page(self._scan(index, {"match_all": {}}, order, source))
        sort = [{f: "desc"} for by in order for f in by]
        out: list[dict[str, Any]] = []
        total, after = 0, None
        while len(out) < limit:
            body: dict[str, Any] = {"query": {"match_all": {}}, "sort": sort, "size": min(R.PAGE, limit - len(out)),
                                    "source": source}
            if after is None:
                body["track_total_hits"] = True
            else:
                body["search_after"] = after
            res = self._search(index, **body)["hits"]
            if after is None:
                total = int(res["total"]["value"])
            out += res["hits"]
            if len(res["hits"]) < body["size"]:
                break
            after = res["hits"][-1]["sort"]
        out.reverse()
        return Page(out, total)

    def processed_offsets(self, topic: str) -> set[tuple[int, int]]:
        return {(h["_source"]["partition"], h["_source"]["offset"])
                for h in self._scan(self.names["processed"], {"term": {"topic": topic}},
                                    [{"partition": "asc"}, {"offset": "asc"}], ["partition", "offset"])}

    def processed_since(self, topic: str, after_rowid: int) -> tuple[set[tuple[int, int]], int]:
        """Offsets marked since the watermark ``after_rowid`` (epoch ms of the
        newest marker seen; 0 = all), and the new watermark. No row ids here:
        markers carry their write time, and each poll re-reads a margin
        before the watermark (refresh interval plus clock skew between
        writers), so a marker made visible late is still seen; the caller
        unions the sets."""
        return self._markers_since([{"term": {"topic": topic}}], after_rowid)

    def run_processed_since(self, run: str, topic: str, after_rowid: int) -> tuple[set[tuple[int, int]], int]:
        """Like ``processed_since`` but only events produced by ``run``: a fresh
        broker reuses (partition, offset) pairs an earlier run left in the store."""
        return self._markers_since([{"term": {"topic": topic}}, {"term": {"run": run}}], after_rowid)

    def run_outcomes(self, run: str, topic: str) -> dict[tuple[int, int], tuple[str, str | None]]:
        query = {"bool": {"filter": [{"term": {"topic": topic}}, {"term": {"run": run}}]}}
        return {(h["_source"]["partition"], h["_source"]["offset"]): (h["_source"]["outcome"], h["_source"].get("event_id"))
                for h in self._scan(self.names["processed"], query, [{"partition": "asc"}, {"offset": "asc"}],
                                    ["partition", "offset", "outcome", "event_id"])}

    def _markers_since(self, filters: list[dict[str, Any]], after_rowid: int) -> tuple[set[tuple[int, int]], int]:
        filters = list(filters)
        if after_rowid:
            filters.append({"range": {"@timestamp": {"gte": after_rowid - PROCESSED_MARGIN_MS, "format": "epoch_millis"}}})
        query: dict[str, Any] = {"bool": {"filter": filters}}
        out: set[tuple[int, int]] = set()
        newest = after_rowid
        for h in self._scan(self.names["processed"], query, [{"@timestamp": "asc"}, {"partition": "asc"}, {"offset": "asc"}],
                            ["partition", "offset", "@timestamp"]):
            src = h["_source"]
            out.add((src["partition"], src["offset"]))
            newest = max(newest, _epoch_ms(src["@timestamp"]))
        return out, newest

    def count_sightings(self) -> int:
        return self._count(self.names["sightings"], {"match_all": {}})

    def count_alerts(self) -> int:
        return self._count(self.names["alerts"], {"match_all": {}})

    def count_clusters(self) -> int:
        return self._count(self.names["clusters"], _live())

    def count_models_pending(self) -> int:
        res = self._search(self.names["clusters"], size=0, query=_live(), aggs={
            "models_pending": {"filter": {"term": {"models_pending": True}}},
        })
        return int(((res.get("aggregations") or {}).get("models_pending") or {}).get("doc_count") or 0)

    def _count(self, index: str, query: dict[str, Any]) -> int:
        res = self._search(index, size=0, query=query, track_total_hits=True)
        return int(res["hits"]["total"]["value"])

    def pending_work(self) -> dict[str, int]:
        """As ``SqliteFindingsStore.pending_work``: model results not yet in,
        and alerts the cluster engine raised that are not stored
        (``unstored_alerts``: per cluster that raised any, merged-away ones
        too, read with the alerts of it and of what merged into it)."""
        pending = self.count_models_pending()
        raised = [(h["_source"]["cluster_id"], h["_source"].get("alert_level") or 0, h["_source"].get("merged_from") or [])
                  for h in self._scan(self.names["clusters"], {"range": {"alert_level": {"gt": 0}}},
                                      [{"cluster_id": "asc"}], ["cluster_id", "alert_level", "merged_from"])]
        ids = sorted({cid for c, _level, merged in raised for cid in (c, *merged)})
        stored = [(h["_source"]["alert_id"], h["_source"]["cluster_id"], h["_source"]["level"])
                  for i in range(0, len(ids), R.ID_CHUNK)
                  for h in self._scan(self.names["alerts"], {"terms": {"cluster_id": ids[i:i + R.ID_CHUNK]}},
                                      [{"alert_id": "asc"}], ["alert_id", "cluster_id", "level"])]
        unstored = unstored_alerts(raised, stored)
        # as in SQLite: deliveries queued and not tried yet are alert work still going on;
        # one queued longer ago than any attempt takes is redelivery's, not this run's
        # (a count: ``in_states`` matches queued documents exactly, old ones too)
        recent = {"range": {"at": {"gte": ago(QUEUED_RECENT_S)}}}
        queued = self._search(self.names["deliveries"], size=0, track_total_hits=True, query={"bool": {"filter": [
            in_states([DeliveryState.QUEUED]), recent]}})["hits"]["total"]["value"]
        return {"models": pending, "alerts": unstored + queued, "deliveries": queued}

    def iter_members(self) -> Iterator[MemberRow]:
        """Every stored member's hashes (crop views included) under its
        surviving cluster, each picture once, as
        ``SqliteFindingsStore.iter_members`` gives them (its members table
        is keyed by sha256). A survivor's document lists the members of the
        clusters merged into it, which their own documents list too: live
        documents are read first, and a merged-away document adds only
        pictures no other document gave (its survivor not written yet)."""
        docs = [h["_source"] for h in self._scan(
            self.names["clusters"], {"match_all": {}}, [{"cluster_id": "asc"}],
            ["cluster_id", "merged_into", "members.sha256", "members.phash", "members.pdq", "members.pdq_quality",
             "members.views", "members.trimmed"])]
        into = {d["cluster_id"]: d.get("merged_into") for d in docs}
        seen: set[str] = set()
        for d in sorted(docs, key=lambda d: bool(d.get("merged_into"))):  # stable: by id within each
            root = surviving_cluster(d["cluster_id"], into)
            for m in d.get("members") or []:
                if m["sha256"] in seen:
                    continue
                seen.add(m["sha256"])
                yield MemberRow(root, m["sha256"], m["phash"], m["pdq"], m["pdq_quality"], m.get("views") or None,
                                bool(m.get("trimmed")))

    def member_shas_updated_since(self, since: datetime) -> set[str]:
        """As ``SqliteFindingsStore.member_shas_updated_since``: members of
        the clusters whose documents were written at or after ``since``
        (``updated_at``). A survivor's document lists the members of the
        clusters merged into it, and a merge rewrites it: the clusters
        written since are read, not every cluster."""
        query = {"range": {"updated_at": {"gte": int(since.timestamp() * 1000), "format": "epoch_millis"}}}
        return {m["sha256"] for h in self._scan(self.names["clusters"], query, [{"cluster_id": "asc"}],
                                                ["members.sha256"])
                for m in h["_source"].get("members") or []}

    # -- picture lookups (deepwatch similar) -----------------------------------
    def similar_candidates(self, sha256: str, hashes: Any, k: int = 20) -> list[MemberRow]:
        """Every member of the live clusters that have a member near the
        picture by bit-vector kNN (Hamming on PDQ and pHash, mirrored and view
        hashes too) or its sha256, cluster by cluster in the search's order.
        Only candidates: the caller applies the embedded matching rule and
        ranking to them (``streams.similar.similar_clusters``)."""
        knn = []
        for field, codes in (("members.pdq_bits", [hashes.pdq, hashes.pdq_mirror]),
                             ("members.phash_bits", [hashes.phash, hashes.phash_mirror, *(hashes.views or [])])):
            for code in filter(None, codes):
                knn.append({"field": field, "query_vector": hex_bits(code), "k": k, "num_candidates": max(100, 5 * k),
                            "filter": _live()})
        res = self._search(
            self.names["clusters"], knn=knn, size=len(knn) * k + 10,
            query={"bool": {"should": [{"nested": {"path": "members", "query": {"term": {"members.sha256": sha256}}}}],
                            "must_not": [{"exists": {"field": "merged_into"}}]}},
            source=["cluster_id", "members.sha256", "members.phash", "members.pdq", "members.pdq_quality",
                     "members.views", "members.trimmed"])
        # Live clusters only (the filters above): each one's own id is the surviving one.
        return [MemberRow(doc["cluster_id"], m["sha256"], m["phash"], m["pdq"], m["pdq_quality"],
                          m.get("views") or None, bool(m.get("trimmed")))
                for doc in (h["_source"] for h in res["hits"]["hits"]) for m in doc.get("members") or []]


# Each field of an order (``streams.cluster_search.SORT_ORDER``) as the cluster
# documents hold it: the stream's own values, which searches pre-select by
# before ordering the records built exactly, as the SQLite store does
# (``sightings``: the stream's running count; the exact one is counted from
# the sightings when a record is built).
_ES_FIELDS = {"sightings_5m": "velocity.sightings_5m", "sightings_1h": "velocity.sightings_1h",
              "fake_score": "fake_score", "sightings": "stream_sightings", "last_seen": "last_seen"}
# a missing value comes last either way (Elasticsearch's default), as SQLite's NULL does there
ES_SORT = {sort: [{_ES_FIELDS[name]: "desc"} for name in sort_order(sort)] + [{"cluster_id": "asc"}]
           for sort in SORT_KEYS}


def _es_after(after: SearchCursor) -> dict[str, Any]:
    """The clusters a sorted search's next page is chosen from, as a filter
    on the stored values (``_ES_FIELDS``): those whose value of the first
    field is below the cursor's band (``SearchCursor.bands``), or within it
    and after it by the next field, and so on to the cluster id (a range on
    the keyword: its terms' order, the one ``cluster_id: asc`` sorts by). A
    missing value is last, as Elasticsearch sorts it."""
    cond: dict[str, Any] = {"range": {"cluster_id": {"gt": after.cluster_id}}}
    for name, lo, hi in reversed(after.bands()):
        field = _ES_FIELDS[name]
        missing = {"bool": {"must_not": [{"exists": {"field": field}}]}}
        if lo is None or hi is None:
            cond = {"bool": {"filter": [missing, cond]}}
            continue
        below: dict[str, Any] = {"lt": lo}
        band: dict[str, Any] = {"gte": lo, "lte": hi}
        if name == "last_seen":  # a date is whole epoch milliseconds
            below = {"lt": math.ceil(lo * 1000), "format": "epoch_millis"}
            band = {"gte": math.ceil(lo * 1000), "lte": math.floor(hi * 1000), "format": "epoch_millis"}
        cond = {"bool": {"should": [{"range": {field: below}},
                                    {"bool": {"filter": [{"range": {field: band}}, cond]}},
                                    *([missing] if name == "last_seen" else [])],
                         "minimum_should_match": 1}}
    return cond


def _doc_field(doc: dict[str, Any], name: str) -> Any:
    """``sort_key``'s field reader for a cluster document's source: the values
    its record shows where the document holds them (``record_from_doc``)."""
    if name == "id":
        return doc["cluster_id"]
    if name in VELOCITY_FIELDS:
        return (doc.get("velocity") or {}).get(name) or 0
    if name == "fake_score":
        return shown_score(doc.get("fake_score") or 0.0)
    return doc.get(_ES_FIELDS[name])


_READ_SOURCE = {"excludes": ["members.pdq_bits", "members.phash_bits", "sample_texts", "post_urls"]}


def _sort_order_key(values: list, orders: list[str]) -> tuple:
    """A hit's ``sort`` values as a Python key in the order ES sorted by
    (missing values last, as ES puts them by default)."""
    out = []
    for v, order in zip(values, orders):
        if isinstance(v, str) and v in ("Infinity", "-Infinity"):
            v = float(v)
        if v is None:
            out.append((1, 0))
        elif isinstance(v, str):  # keyword tie-breaker, ascending
            out.append((0, v))
        else:
            out.append((0, -v if order == "desc" else v))
    return tuple(out)


def _shard_failures(res: dict[str, Any]) -> str | None:
    """How many shards failed a search answered 200, and the first one's
    reason, in one line; None when every shard answered."""
    shards = res.get("_shards") or {}
    failed = shards.get("failed") or 0
    if not failed:
        return None
    failures = shards.get("failures") or [{}]
    first = failures[0] if isinstance(failures[0], dict) else {}
    reason = first.get("reason") if isinstance(first.get("reason"), dict) else {}
    why = " ".join(f"{reason.get('type') or 'unknown'}: {reason.get('reason') or ''}".split())[:300]
    return f"{failed} of {shards.get('total', '?')} shards failed the search ({first.get('index') or '?'}: {why})"


def _live() -> dict[str, Any]:
    return {"bool": {"must_not": [{"exists": {"field": "merged_into"}}]}}
