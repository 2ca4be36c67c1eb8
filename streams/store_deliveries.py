"""The alert deliveries of the SQLite findings store (``deliveries`` table):
each webhook target's state for each alert, and what redelivery still owes.
Targets are named by ``streams.webhooks.target_key``, never by their URL."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from streams.records import Alert


class DeliveryLog:
    """Delivery reads and writes of ``streams.store.SqliteFindingsStore``."""

    # Provided by ``SqliteFindingsStore``, which this is mixed into.
    _db: sqlite3.Connection
    if TYPE_CHECKING:
        def _tx(self) -> ContextManager[sqlite3.Connection]: ...
        def _valid(self, kind: str, key: Any, build: Callable[[], Any]) -> Any: ...

    def failed_deliveries(self, target: str) -> list[Alert]:
        """Alerts whose delivery to ``target`` failed (and may still go
        through: not ``rejected``), oldest first (per cluster that is also
        level order), for redelivery. Targets are named by
        ``streams.webhooks.target_key`` (never the URL: it may hold a token)."""
        rows = self._db.execute(
            """SELECT a.alert_id, a.doc FROM alerts a JOIN deliveries d ON d.alert_id = a.alert_id
               WHERE d.target=? AND d.status LIKE 'failed%' ORDER BY a.created_at, a.level, a.alert_id""",
            (target,),
        ).fetchall()
        return [self._valid("alert", alert_id, lambda: Alert.model_validate_json(doc)) for alert_id, doc in rows]

    def queued_deliveries(self, target: str, *, older_than_s: float) -> list[Alert]:
        """Alerts queued for ``target`` more than ``older_than_s`` ago and not
        tried since: the worker that queued them stopped (or is far behind);
        redelivery sends them. Oldest first."""
        rows = self._db.execute(
            """SELECT a.alert_id, a.doc FROM alerts a JOIN deliveries d ON d.alert_id = a.alert_id
               WHERE d.target=? AND d.status LIKE 'queued%' AND d.at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)
               ORDER BY a.created_at, a.level, a.alert_id""",
            (target, f"-{max(0.0, older_than_s):.3f} seconds"),
        ).fetchall()
        return [self._valid("alert", alert_id, lambda: Alert.model_validate_json(doc)) for alert_id, doc in rows]

    def undelivered_before(self, target: str, cluster_id: str, level: int) -> bool:
        """Whether an earlier alert of ``cluster_id`` still awaits delivery to
        ``target`` (failed, or queued and not tried yet)."""
        row = self._db.execute(
            """SELECT 1 FROM alerts a JOIN deliveries d ON d.alert_id = a.alert_id
               WHERE d.target=? AND a.cluster_id=? AND a.level<?
                 AND (d.status LIKE 'failed%' OR d.status LIKE 'queued%') LIMIT 1""",
            (target, cluster_id, level),
        ).fetchone()
        return row is not None

    def undelivered_counts(self) -> dict[str, dict[str, int]]:
        """target -> {queued, failed, rejected: how many deliveries are in that state}."""
        out: dict[str, dict[str, int]] = {}
        for target, state, n in self._db.execute(
            """SELECT target, CASE WHEN status LIKE 'queued%' THEN 'queued' WHEN status LIKE 'rejected%'
                                   THEN 'rejected' ELSE 'failed' END AS state, COUNT(*)
               FROM deliveries WHERE status != 'delivered' GROUP BY target, state"""
        ):
            out.setdefault(target, {})[state] = n
        return out

    def delivery_targets(self) -> list[str]:
        """Every target a delivery was recorded for (its key)."""
        return [t for t, in self._db.execute("SELECT DISTINCT target FROM deliveries ORDER BY target")]

    def requeue_deliveries(self, target: str, alert_ids: list[str] | None = None, *,
                           states: tuple[str, ...] = ("rejected",)) -> int:
        """Deliveries to ``target`` in ``states`` (all of them, or of
        ``alert_ids``) made ``failed`` again, so the next redelivery round
        sends them (``deepwatch redeliver``). Returns how many."""
        likes = " OR ".join("status LIKE ?" for _ in states)
        args: list[Any] = [target, *(f"{s}%" for s in states)]
        sql = (f"UPDATE deliveries SET status='failed: queued again by an operator (was ' || substr(status, 1, 200) || ')', "
               f"at=strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE target=? AND ({likes})")
        with self._tx() as db:
            if alert_ids is None:
                return db.execute(sql, args).rowcount
            n = 0
            ids = list(alert_ids)
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                n += db.execute(f"{sql} AND alert_id IN ({','.join('?' * len(chunk))})", [*args, *chunk]).rowcount
            return n

    def delivery_status(self, alert_ids: list[str] | None = None) -> dict[str, list[dict[str, str]]]:
        """alert id -> [{target, status, at}] for `deepwatch alerts`: of
        ``alert_ids`` only when given (a page of alerts, not every delivery)."""
        sql = "SELECT alert_id, target, status, at FROM deliveries"
        if alert_ids is None:
            rows = list(self._db.execute(sql))
        else:
            ids, rows = list(alert_ids), []
            for i in range(0, len(ids), 500):  # within SQLite's bound on parameters
                chunk = ids[i:i + 500]
                rows += self._db.execute(f"{sql} WHERE alert_id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        out: dict[str, list[dict[str, str]]] = {}
        for alert_id, target, status, at in sorted(rows, key=lambda r: (r[3], r[1])):  # by time, then target
            out.setdefault(alert_id, []).append({"target": target, "status": status, "at": at})
        return out

    def delivered(self, alert_id: str, target: str) -> bool:
        return self.delivery_state(alert_id, target) == "delivered"

    def delivery_state(self, alert_id: str, target: str) -> str | None:
        """The recorded status of this delivery; None when there is none."""
        row = self._db.execute(
            "SELECT status FROM deliveries WHERE alert_id=? AND target=?", (alert_id, target)
        ).fetchone()
        return row[0] if row else None

    def mark_delivered(self, alert_id: str, target: str, status: str) -> None:
        """Record a delivery's state and when (``at``, updated with it); never
        moving it away from ``delivered``."""
        with self._tx() as db:
            db.execute(
                # never back from delivered: a slow attempt that failed after the
                # redelivery loop's succeeded would have the receiver sent it again
                """INSERT INTO deliveries (alert_id, target, status) VALUES (?,?,?)
                   ON CONFLICT(alert_id, target) DO UPDATE SET status=excluded.status, at=excluded.at
                   WHERE deliveries.status != 'delivered'""",
                (alert_id, target, status),
            )
