"""Alert deliveries in the Elasticsearch findings store: one document per
(alert, target) in ``<prefix>-deliveries``, whose state never moves away
from ``delivered`` (``DELIVERY_SCRIPT``), and the reads redelivery,
``deepwatch alerts`` and the senders' ordering check make of them
(``FindingsStore``'s ``RedeliveryQueue``; SQLite's twin is
``streams.store_deliveries``)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Collection, Iterator, Sequence

from streams import es_requests as R
from streams.es_client import EsConfig, explain
from streams.es_docs import alert_from_doc, doc_id, now
from streams.findings import (
    UNDELIVERED, DeliveryRecord, DeliveryState, legacy_delivery, requeued_detail,
    without_webhook_urls,
)
from streams.records import Alert

if TYPE_CHECKING:
    from streams.cluster_search import Deadline

TARGET_PAGE = 500  # targets per composite page (a delivery_targets request)

# mark_delivered's guard: once delivered, a delivery stays delivered (the update is then a noop).
# A document from before mapping v4 has no state: "delivered" was then its whole status text.
DELIVERY_SCRIPT = ("if ('delivered'.equals(ctx._source.state) "
                   "|| (ctx._source.state == null && 'delivered'.equals(ctx._source.status))) { ctx.op = 'noop' } "
                   "else { ctx._source.state = params.state; ctx._source.status = params.detail; "
                   "ctx._source.at = params.at }")


class EsDeliveryLog:
    """Delivery records of ``streams.es_store.EsFindingsStore``, which this is mixed into."""

    # Provided by ``EsFindingsStore``.
    es: Any
    config: EsConfig
    names: dict[str, str]
    bulk: Any
    if TYPE_CHECKING:
        def ensure_setup(self) -> None: ...
        def _search(self, index: str, deadline: Deadline | None = None, **body: Any) -> dict[str, Any]: ...
        def _scan(self, index: str, query: dict, sort: list, source: Any = True,
                  deadline: Deadline | None = None) -> Iterator[dict[str, Any]]: ...
        def _composite(self, index: str, query: dict[str, Any], field: str, aggs: dict[str, Any],
                       page: int, deadline: Deadline | None = None) -> Iterator[dict[str, Any]]: ...

    def _delivery_id(self, alert_id: str, target: str) -> str:
        return hashlib.sha256(f"{alert_id}\0{target}".encode()).hexdigest()

    def delivered(self, alert_id: str, target: str) -> bool:
        return self.delivery_state(alert_id, target) is DeliveryState.DELIVERED

    def delivery_state(self, alert_id: str, target: str) -> DeliveryState | None:
        """The recorded state of this delivery (a real-time GET); None when there is none."""
        doc = self._delivery_doc(alert_id, target)
        return None if doc is None else _delivery_of(doc)[0]

    def _delivery_doc(self, alert_id: str, target: str) -> dict[str, Any] | None:
        """The delivery record's document, read by id (real-time: no refresh delay); None when there is none."""
        from elasticsearch import NotFoundError

        try:
            return self.es.get(index=self.names["deliveries"], id=self._delivery_id(alert_id, target))["_source"]
        except NotFoundError:
            return None
        except Exception as e:
            raise explain(e, self.config.url) from None

    def mark_delivered(self, alert_id: str, target: str, state: DeliveryState, detail: str = "",
                       moved_from: Sequence[str] = ()) -> None:
        """Record a delivery attempt's outcome (its state, and why in
        ``status``), never moving a record away from ``delivered``: a slow
        attempt that failed, recorded after a redelivery that succeeded,
        would have the alert sent again. One update with the guard in
        painless (``ctx.op = 'noop'``) and the first record as its
        ``upsert``, so the check and the write are one step on the shard.
        The alert's documents under ``moved_from`` (its hook's earlier
        keys) are deleted in the same bulk request: one record per alert
        and hook; one of them that is ``delivered`` (read by id, real-time)
        is the record kept (its why and when)."""
        self.ensure_setup()
        state, at = DeliveryState(state), None
        moved = [t for t in dict.fromkeys(moved_from) if t != target]
        # a moved record that says delivered wins over this outcome: the alert, read as
        # undelivered under the hook's key, would be sent again
        for t in moved:
            doc = self._delivery_doc(alert_id, t)
            if doc is not None and _delivery_of(doc)[0] is DeliveryState.DELIVERED:
                state, detail, at = DeliveryState.DELIVERED, _delivery_of(doc)[1], doc.get("at")
                break
        self.bulk.send([self._delivery_action(alert_id, target, state, detail, at),
                        *(({"delete": {"_index": self.names["deliveries"], "_id": self._delivery_id(alert_id, t)}},
                           None) for t in moved)])

    def _delivery_action(self, alert_id: str, target: str, state: DeliveryState, detail: str,
                         at: str | None = None) -> tuple[dict, dict]:
        at = at or now()
        return (
            {"update": {"_index": self.names["deliveries"], "_id": self._delivery_id(alert_id, target),
                        "retry_on_conflict": 5}},
            {"script": {"source": DELIVERY_SCRIPT, "lang": "painless",
                        "params": {"state": state.value, "detail": detail, "at": at}},
             "upsert": {"alert_id": alert_id, "target": target, "state": state.value, "status": detail, "at": at}},
        )

    def _deliveries(self, query: dict[str, Any],
                    states: Collection[DeliveryState]) -> Iterator[tuple[str, DeliveryRecord]]:
        """(alert id, record) of the delivery documents matching ``query``
        whose state is one of ``states``, by alert id then target. Reads
        what searches see (the refresh interval)."""
        for h in self._scan(self.names["deliveries"], {"bool": {"filter": [query, in_states(states)]}},
                            [{"alert_id": "asc"}, {"target": "asc"}], ["alert_id", "target", "state", "status", "at"]):
            src = h["_source"]
            state, detail = _delivery_of(src)
            if state in states:
                yield src["alert_id"], DeliveryRecord(target=src["target"], state=state, detail=detail, at=src["at"])

    def failed_deliveries(self, target: str, *, limit: int | None = None) -> list[Alert]:
        """Alerts whose delivery to ``target`` failed, oldest first (per
        cluster that is also level order), for redelivery: the oldest
        ``limit`` when given (a redelivery round's page); not those queued
        for a live sender (``queued_deliveries``). Reads what searches see: a
        failure marked within the refresh interval waits for the next round."""
        failed = self._deliveries({"term": {"target": target}}, [DeliveryState.FAILED])
        return self._alerts_by_id([alert_id for alert_id, _ in failed], limit)

    def queued_deliveries(self, target: str, *, older_than_s: float, limit: int | None = None) -> list[Alert]:
        """Alerts queued for ``target`` more than ``older_than_s`` ago and not
        tried since: the worker that queued them stopped (or is far behind);
        redelivery sends them. Oldest first; the oldest ``limit`` when given."""
        return self._alerts_by_id([a for a, _ in self._deliveries(
            {"bool": {"filter": [{"term": {"target": target}}, {"range": {"at": {"lt": ago(older_than_s)}}}]}},
            [DeliveryState.QUEUED])], limit)

    def _alerts_by_id(self, ids: list[str], limit: int | None = None) -> list[Alert]:
        """The alerts of ``ids``, oldest first (created, level, id); with
        ``limit`` only the oldest that many: each page of ids is searched for
        its oldest ``limit`` (sorted by the store), so at most ``limit`` alert
        documents per page are read, not every one."""
        alerts: list[Alert] = []
        order = [{"created_at": "asc"}, {"level": "asc"}, {"alert_id": "asc"}]
        for i in range(0, len(ids), R.PAGE):
            query = {"terms": {"alert_id": ids[i:i + R.PAGE]}}
            if limit is None:
                hits = self._scan(self.names["alerts"], query, [{"alert_id": "asc"}], True)
            else:
                hits = self._search(self.names["alerts"], query=query, sort=order, size=limit)["hits"]["hits"]
            alerts += [alert_from_doc(h["_source"]) for h in hits]
            if limit is not None:
                alerts.sort(key=lambda a: (a.created_at, a.level, a.alert_id))
                del alerts[limit:]
        alerts.sort(key=lambda a: (a.created_at, a.level, a.alert_id))
        return alerts

    def undelivered_counts(self) -> dict[str, dict[DeliveryState, int]]:
        """target -> {queued, failed, rejected: how many deliveries are in
        that state}. Counted from the records (those from before mapping v4
        have no ``state`` to aggregate on), which are few unless a receiver
        has been down for long."""
        out: dict[str, dict[DeliveryState, int]] = {}
        for _alert_id, d in self._deliveries({"match_all": {}}, UNDELIVERED):
            counts = out.setdefault(d.target, {})
            counts[d.state] = counts.get(d.state, 0) + 1
        return out

    def delivery_targets(self) -> list[str]:
        """Every target a delivery was recorded for (its key)."""
        return [b["key"]["key"] for b in self._composite(self.names["deliveries"], {"match_all": {}}, "target", {},
                                                         TARGET_PAGE)]

    def requeue_deliveries(self, target: str, alert_ids: list[str] | None = None) -> int:
        """Rejected deliveries to ``target`` (all of them, or of
        ``alert_ids``) made ``failed`` again, so the next redelivery round
        sends them (``deepwatch redeliver``). Returns how many."""
        self.ensure_setup()
        queries = ([{"term": {"target": target}}] if alert_ids is None else
                   [{"bool": {"filter": [{"term": {"target": target}}, {"terms": {"alert_id": alert_ids[i:i + R.PAGE]}}]}}
                    for i in range(0, len(alert_ids), R.PAGE)])
        picked = [found for q in queries for found in self._deliveries(q, (DeliveryState.REJECTED,))]
        for i in range(0, len(picked), R.PAGE):
            self.bulk.send([self._delivery_action(alert_id, target, DeliveryState.FAILED, requeued_detail(d))
                            for alert_id, d in picked[i:i + R.PAGE]])
        return len(picked)

    def undelivered_before(self, target: str, cluster_id: str, level: int) -> bool:
        """Whether an earlier alert of ``cluster_id`` still awaits delivery to
        ``target`` (failed, or queued and not tried yet), of the alerts
        stored, as SQLite's join answers. Everything is read in real time
        (GET by id), so an alert stored and a failure marked a moment ago
        already hold the next alert back: the cluster engine's alerts have
        the ids ``<cluster_id>:<level>`` (``streams.clustering``), so levels
        1 to ``level - 1`` are read by id; a search (which sees only what
        the last refresh made visible) adds alerts with other ids (the
        desk's)."""
        searched = {h["_source"]["alert_id"] for h in self._search(
            self.names["alerts"], size=R.MAX_CANDIDATES, source=["alert_id"], query={"bool": {"filter": [
                {"term": {"cluster_id": cluster_id}}, {"range": {"level": {"lt": level}}}]}})["hits"]["hits"]}
        by_level = [f"{cluster_id}:{k}" for k in range(1, level)]
        for alert_id in [*by_level, *sorted(searched - set(by_level))]:
            doc = self._delivery_doc(alert_id, target)
            # none: never attempted to this target, nothing to wait for
            if doc is None or _delivery_of(doc)[0].settled:
                continue
            # a delivery is queued before its alert is stored: one whose alert never was
            # (refused, dead-lettered) holds nothing back, as in SQLite
            if alert_id in searched or self._alert_stored(alert_id):
                return True
        return False

    def _alert_stored(self, alert_id: str) -> bool:
        """Whether the alert is stored (a real-time GET by its ``_id``)."""
        from elasticsearch import NotFoundError

        try:
            self.es.get(index=self.names["alerts"], id=doc_id(alert_id), source=False)
            return True
        except NotFoundError:
            return False
        except Exception as e:
            raise explain(e, self.config.url) from None

    def delivery_status(self, alert_ids: list[str] | None = None) -> dict[str, list[DeliveryRecord]]:
        """alert id -> its deliveries, by time then target, for `deepwatch
        alerts`: of ``alert_ids`` only when given (a page of alerts, not
        every delivery)."""
        if alert_ids is None:
            queries = [{"match_all": {}}]
        else:
            ids = list(alert_ids)
            queries = [{"terms": {"alert_id": ids[i:i + R.PAGE]}} for i in range(0, len(ids), R.PAGE)]
        found = [d for q in queries for d in self._deliveries(q, list(DeliveryState))]
        out: dict[str, list[DeliveryRecord]] = {}
        for alert_id, d in sorted(found, key=lambda f: (f[1].at, f[1].target)):
            out.setdefault(alert_id, []).append(d)
        return out


def ago(seconds: float) -> str:
    """The time ``seconds`` before now, as ``es_docs.now`` writes it (stored ``at`` values compare as dates)."""
    return (datetime.now(timezone.utc) - timedelta(seconds=max(0.0, seconds))).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _delivery_of(src: dict[str, Any]) -> tuple[DeliveryState, str]:
    """A delivery document's state and why. One written before mapping v4
    has no ``state``: its ``status`` is then the old text holding both, read
    by ``legacy_delivery`` (such documents are not rewritten)."""
    if src.get("state") is None:
        state, why = legacy_delivery(src.get("status") or "")
    else:
        state, why = DeliveryState(src["state"]), src.get("status") or ""
    # an old document's why may hold its target's whole URL, token and all ("<url>: HTTP 503")
    return state, without_webhook_urls(why, src.get("target") or "")


def in_states(states: Collection[DeliveryState]) -> dict[str, Any]:
    """A filter: delivery documents in one of ``states``, by ``state``, and
    documents from before mapping v4 (no ``state``) that may be. Of those,
    the old text was the state alone for queued and delivered ones, matched
    exactly; a failed or rejected one's went on with why, not matched by
    any query here (past ``ignore_above`` it is not even indexed), so every
    other old document matches and ``_delivery_of`` tells them apart."""
    exact = (DeliveryState.QUEUED, DeliveryState.DELIVERED)
    old: list[dict[str, Any]] = [{"term": {"status": s.value}} for s in exact if s in states]
    if set(states) - set(exact):
        old.append({"bool": {"must_not": [{"terms": {"status": [s.value for s in exact]}}]}})
    return {"bool": {"should": [{"terms": {"state": sorted(s.value for s in states)}},
                                {"bool": {"must_not": [{"exists": {"field": "state"}}], "should": old,
                                          "minimum_should_match": 1}}],
                     "minimum_should_match": 1}}
