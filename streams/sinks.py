"""Sinks: the findings store, and alert delivery (console, webhooks).

Each sink is idempotent — snapshots keep the highest revision, sightings and
alerts are keyed by event id / alert id, webhook deliveries are recorded per
(alert, target) — so redelivered messages change nothing.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import httpx

from streams import metrics
from streams.records import Alert, ClusterSnapshot, DeadLetter
from streams.settings import Settings
from streams.findings import FindingsStore, open_findings
from streams.webhooks import WebhookError, deliver

log = logging.getLogger("deepwatch.alerts")


class Sinks:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._store: FindingsStore | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def store(self) -> FindingsStore:
        if self._store is None:
            self._store = open_findings(self.settings.findings.url, self.settings.data_dir, self.settings)
        return self._store

    async def snapshot(self, raw: bytes) -> None:
        snap = ClusterSnapshot.loads(raw)
        await asyncio.to_thread(self.store.apply_snapshot, snap)

    async def dead_letter(self, raw: bytes) -> None:
        await asyncio.to_thread(self.store.add_dead_letter, DeadLetter.loads(raw))

    async def alert(self, raw: bytes) -> None:
        alert = Alert.loads(raw)
        new = await asyncio.to_thread(self.store.add_alert, alert)
        if new:
            metrics.ALERTS.labels(str(alert.level)).inc()
            if alert.trigger_ingested_at:
                lag = (datetime.now(timezone.utc) - alert.trigger_ingested_at).total_seconds()
                metrics.EVENT_TO_ALERT_SECONDS.observe(max(0.0, lag))
            if self.settings.alerts.console:
                top = alert.evidence[0].detail if alert.evidence else "no evidence detail"
                log.warning(
                    f"ALERT L{alert.level} cluster {alert.cluster_id}: fake score {alert.fake_score:.2f} ({alert.verdict}), "
                    f"{alert.velocity.sightings_5m} sightings in 5 min, {alert.accounts} accounts — {top}",
                    extra={"alert_id": alert.alert_id, "cluster_id": alert.cluster_id},
                )
        await self._webhooks(alert)

    async def _webhooks(self, alert: Alert) -> None:
        hooks = self.settings.alerts.webhooks
        if not hooks:
            return
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        for hook in hooks:
            if await asyncio.to_thread(self.store.delivered, alert.alert_id, hook.url):
                continue
            try:
                status = await deliver(hook, alert, self._client)
                metrics.WEBHOOKS.labels("delivered").inc()
            except WebhookError as e:
                status = f"failed: {e}"
                metrics.WEBHOOKS.labels("failed").inc()
                log.error("webhook delivery failed", extra={"alert_id": alert.alert_id, "error": str(e)})
            await asyncio.to_thread(self.store.mark_delivered, alert.alert_id, hook.url, status)
