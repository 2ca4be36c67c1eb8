"""The alert deliveries of the SQLite findings store (``deliveries`` table):
each webhook target's state for each alert, and what redelivery still owes.
Targets are named by ``streams.webhooks.hook_key``, never by their URL.
Rows are read by their ``state`` (``streams.findings.DeliveryState``); the
``status`` column holds only why, for people."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

from streams.findings import (
    UNDELIVERED, DeliveryRecord, DeliveryState, legacy_delivery, requeued_detail,
    without_webhook_urls,
)
from streams.records import Alert


class DeliveryLog:
    """Delivery reads and writes of ``streams.store.SqliteFindingsStore``."""

    # Provided by ``SqliteFindingsStore``, which this is mixed into.
    _db: sqlite3.Connection
    if TYPE_CHECKING:
        def _tx(self) -> ContextManager[sqlite3.Connection]: ...
        def _valid(self, kind: str, key: Any, build: Callable[[], Any]) -> Any: ...

    def failed_deliveries(self, target: str, *, limit: int | None = None) -> list[Alert]:
        """Alerts whose delivery to ``target`` failed (and may still go
        through: not ``rejected``), oldest first (per cluster that is also
        level order), for redelivery: the oldest ``limit`` when given (a
        redelivery round's page). Targets are named by
        ``streams.webhooks.hook_key`` (never the URL: it may hold a token)."""
        rows = self._db.execute(
            """SELECT a.alert_id, a.doc FROM alerts a JOIN deliveries d ON d.alert_id = a.alert_id
               WHERE d.target=? AND d.state=? ORDER BY a.created_at, a.level, a.alert_id LIMIT ?""",
            (target, DeliveryState.FAILED.value, -1 if limit is None else limit),
        ).fetchall()
        return [self._valid("alert", alert_id, lambda: Alert.loads(doc)) for alert_id, doc in rows]

    def queued_deliveries(self, target: str, *, older_than_s: float, limit: int | None = None) -> list[Alert]:
        """Alerts queued for ``target`` more than ``older_than_s`` ago and not
        tried since: the worker that queued them stopped (or is far behind);
        redelivery sends them. Oldest first; the oldest ``limit`` when given."""
        rows = self._db.execute(
            """SELECT a.alert_id, a.doc FROM alerts a JOIN deliveries d ON d.alert_id = a.alert_id
               WHERE d.target=? AND d.state=? AND d.at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)
               ORDER BY a.created_at, a.level, a.alert_id LIMIT ?""",
            (target, DeliveryState.QUEUED.value, f"-{max(0.0, older_than_s):.3f} seconds",
             -1 if limit is None else limit),
        ).fetchall()
        return [self._valid("alert", alert_id, lambda: Alert.loads(doc)) for alert_id, doc in rows]

    def undelivered_before(self, target: str, cluster_id: str, level: int) -> bool:
        """Whether an earlier alert of ``cluster_id`` still awaits delivery to
        ``target`` (failed, or queued and not tried yet)."""
        row = self._db.execute(
            """SELECT 1 FROM alerts a JOIN deliveries d ON d.alert_id = a.alert_id
               WHERE d.target=? AND a.cluster_id=? AND a.level<? AND d.state IN (?, ?) LIMIT 1""",
            (target, cluster_id, level, DeliveryState.FAILED.value, DeliveryState.QUEUED.value),
        ).fetchone()
        return row is not None

    def undelivered_counts(self) -> dict[str, dict[DeliveryState, int]]:
        """target -> {queued, failed, rejected: how many deliveries are in that state}."""
        out: dict[str, dict[DeliveryState, int]] = {}
        for target, state, n in self._db.execute(
            f"SELECT target, state, COUNT(*) FROM deliveries WHERE state IN ({','.join('?' * len(UNDELIVERED))}) "
            "GROUP BY target, state", [s.value for s in UNDELIVERED]
        ):
            out.setdefault(target, {})[DeliveryState(state)] = n
        return out

    def delivery_targets(self) -> list[str]:
        """Every target a delivery was recorded for (its key)."""
        return [t for t, in self._db.execute("SELECT DISTINCT target FROM deliveries ORDER BY target")]

    def requeue_deliveries(self, target: str, alert_ids: list[str] | None = None) -> int:
        """Rejected deliveries to ``target`` (all of them, or of
        ``alert_ids``) made ``failed`` again, so the next redelivery round
        sends them (``deepwatch redeliver``). Returns how many."""
        with self._tx() as db:
            rows = _of_alerts(db, "SELECT alert_id, state, status, at FROM deliveries WHERE target=? AND state=?",
                              [target, DeliveryState.REJECTED.value], alert_ids)
            db.executemany(
                "UPDATE deliveries SET state=?, status=?, at=strftime('%Y-%m-%dT%H:%M:%fZ','now') "
                "WHERE alert_id=? AND target=?",
                [(DeliveryState.FAILED.value, requeued_detail(self._record(alert_id, target, state, status, at)),
                  alert_id, target) for alert_id, state, status, at in rows])
            return len(rows)

    def delivery_status(self, alert_ids: list[str] | None = None) -> dict[str, list[DeliveryRecord]]:
        """alert id -> its deliveries, by time then target, for `deepwatch
        alerts`: of ``alert_ids`` only when given (a page of alerts, not
        every delivery)."""
        rows = _of_alerts(self._db, "SELECT alert_id, target, state, status, at FROM deliveries WHERE TRUE", [],
                          alert_ids)
        out: dict[str, list[DeliveryRecord]] = {}
        for alert_id, target, state, status, at in sorted(rows, key=lambda r: (r[4], r[1])):  # by time, then target
            out.setdefault(alert_id, []).append(self._record(alert_id, target, state, status, at))
        return out

    def _record(self, alert_id: str, target: str, state: str | None, status: str, at: str) -> DeliveryRecord:
        if state is None:  # written by a schema-1 worker still running beside this one (``_derive_delivery_states``)
            legacy, status = legacy_delivery(status)
            state = legacy.value
        else:  # a file whose old rows a writer has not cleaned yet (``_key_delivery_targets``): never show a token
            status = without_webhook_urls(status)
        return self._valid("delivery", f"{alert_id} to {target}",
                           lambda: DeliveryRecord(target=target, state=state, detail=status, at=at))

    def delivered(self, alert_id: str, target: str) -> bool:
        return self.delivery_state(alert_id, target) is DeliveryState.DELIVERED

    def delivery_state(self, alert_id: str, target: str) -> DeliveryState | None:
        """The recorded state of this delivery; None when there is none."""
        row = self._db.execute(
            "SELECT state, status, at FROM deliveries WHERE alert_id=? AND target=?", (alert_id, target)
        ).fetchone()
        return self._record(alert_id, target, *row).state if row else None

    def mark_delivered(self, alert_id: str, target: str, state: DeliveryState, detail: str = "",
                       moved_from: Sequence[str] = ()) -> None:
        """Record a delivery's state, why (``status``) and when (``at``,
        updated with them); never moving it away from ``delivered``. The
        alert's records under ``moved_from`` (its hook's earlier keys) go
        in the same transaction: one record per alert and hook; one of them
        that is ``delivered`` is the record kept (its why and when)."""
        state, at = DeliveryState(state), None
        with self._tx() as db:
            moved = [t for t in dict.fromkeys(moved_from) if t != target]
            rows = _of_targets(db, alert_id, moved)
            # a moved record that says delivered wins over this outcome: the alert, read as
            # undelivered under the hook's key, would be sent again
            kept = next((r for r in (self._record(alert_id, *row) for row in rows)
                         if r.state is DeliveryState.DELIVERED), None)
            if kept is not None:
                state, detail, at = kept.state, kept.detail, kept.at
            db.executemany("DELETE FROM deliveries WHERE alert_id=? AND target=?", [(alert_id, t) for t in moved])
            db.execute(
                # never back from delivered: a slow attempt that failed after the
                # redelivery loop's succeeded would have the receiver sent it again
                # (a row without a state: a schema-1 worker's, whose "delivered" was its whole status)
                """INSERT INTO deliveries (alert_id, target, state, status, at)
                   VALUES (?,?,?,?, COALESCE(?, strftime('%Y-%m-%dT%H:%M:%fZ','now')))
                   ON CONFLICT(alert_id, target) DO UPDATE SET state=excluded.state, status=excluded.status,
                                                                at=excluded.at
                   WHERE COALESCE(deliveries.state, deliveries.status) IS NOT ?""",
                (alert_id, target, state.value, detail, at, DeliveryState.DELIVERED.value),
            )


def _of_targets(db: sqlite3.Connection, alert_id: str, targets: list[str]) -> list[Any]:
    """(target, state, status, at) of the alert's records under ``targets``."""
    if not targets:
        return []
    return db.execute("SELECT target, state, status, at FROM deliveries WHERE alert_id=? "
                      "AND target IN (SELECT value FROM json_each(?))", (alert_id, json.dumps(targets))).fetchall()


def _of_alerts(db: sqlite3.Connection, sql: str, args: list[Any], alert_ids: list[str] | None) -> list[Any]:
    """The rows of ``sql`` (a query with a WHERE clause): all of them, or
    those of ``alert_ids`` when given (one JSON parameter, as the store's
    other id lists: no bound on how many)."""
    if alert_ids is None:
        return db.execute(sql, args).fetchall()
    return db.execute(f"{sql} AND alert_id IN (SELECT value FROM json_each(?))",
                      [*args, json.dumps(list(alert_ids))]).fetchall()
