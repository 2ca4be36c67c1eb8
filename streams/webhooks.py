"""Signed webhook delivery for alerts.

Receivers verify ``X-Deepwatch-Signature: sha256=<hex>``, the HMAC-SHA256 of
``"<X-Deepwatch-Timestamp>.<raw body>"`` under the shared secret; the timestamp
is signed too so a captured request cannot be replayed later.
``X-Deepwatch-Delivery`` is the alert id: deliveries are at-least-once and a
receiver dedupes on it.

A delivery that still fails after its retries is not forgotten: the
``Redeliverer`` tries failed deliveries again every
``alerts.webhook_redeliver_s`` (and at worker start), oldest first, stopping
at the first failure so a receiver that comes back gets every alert of a
cluster in order. While an older alert of a cluster is undelivered, a newer
one queues behind it rather than overtaking it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from typing import Any, Callable

import httpx

from streams.records import Alert
from streams.settings import Settings, WebhookSettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Deepwatch-Signature"
TIMESTAMP_HEADER = "X-Deepwatch-Timestamp"
DELIVERY_HEADER = "X-Deepwatch-Delivery"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, *, max_age_s: float = 300) -> bool:
    """Receiver-side check (also what our tests use)."""
    try:
        if abs(time.time() - float(timestamp)) > max_age_s:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookError(Exception):
    pass


async def deliver(hook: WebhookSettings, alert: Alert, client: httpx.AsyncClient) -> str:
    """POST the alert; returns "delivered" or raises WebhookError after retries."""
    if _gate is not None and await _gate.earlier_pending(hook, alert):
        raise WebhookError(f"{hook.url}: queued behind an undelivered earlier alert of cluster {alert.cluster_id}")
    return await _post(hook, alert, client)


async def _post(hook: WebhookSettings, alert: Alert, client: httpx.AsyncClient) -> str:
    secret = os.environ.get(hook.secret_env)
    if not secret:
        raise WebhookError(f"webhook secret env var {hook.secret_env} is not set; refusing to send unsigned")
    body = alert.model_dump_json().encode()
    last = "no attempt"
    for attempt in range(hook.retries + 1):
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret.encode(), ts, body),
            TIMESTAMP_HEADER: ts,
            DELIVERY_HEADER: alert.alert_id,
        }
        try:
            resp = await client.post(hook.url, content=body, headers=headers, timeout=hook.timeout_s)
            if 200 <= resp.status_code < 300:
                return "delivered"
            last = f"HTTP {resp.status_code}"
            if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                break  # the receiver rejected it; retrying will not help
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if attempt < hook.retries:
            await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
    raise WebhookError(f"{hook.url}: {last}")


class Redeliverer:
    """Retries failed webhook deliveries from the findings store."""

    def __init__(self, settings: Settings, store_factory: Callable[[], Any]):
        from streams.stage import once

        self.settings = settings
        self._db = once(store_factory)  # opened in a worker thread on first use, never on the event loop
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def earlier_pending(self, hook: WebhookSettings, alert: Alert) -> bool:
        try:
            return await asyncio.to_thread(lambda: self._db().undelivered_before(hook.url, alert.cluster_id, alert.level))
        except Exception:  # the gate only orders deliveries; it must never stop one
            log.exception("webhook ordering check failed")
            return False

    async def run_once(self) -> int:
        """Deliver what failed before; returns how many got through."""
        hooks = self.settings.alerts.webhooks
        if not hooks:
            return 0
        async with self._lock:
            if self._client is None:
                self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
            done = 0
            for hook in hooks:
                # Every store call in a thread, opening included: SQLite may
                # wait on a lock, and the event loop must never wait with it.
                for alert in await asyncio.to_thread(lambda: self._db().failed_deliveries(hook.url)):
                    try:
                        status = await _post(hook, alert, self._client)
                    except WebhookError as e:
                        failed = f"failed: {e}"
                        await asyncio.to_thread(lambda: self._db().mark_delivered(alert.alert_id, hook.url, failed))
                        log.warning("webhook redelivery failed; will retry", extra={"alert_id": alert.alert_id, "error": str(e)})
                        break  # still down: keep the order, try again next round
                    await asyncio.to_thread(lambda: self._db().mark_delivered(alert.alert_id, hook.url, status))
                    log.info("webhook redelivered", extra={"alert_id": alert.alert_id, "target": hook.url})
                    done += 1
            return done

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


_gate: Redeliverer | None = None


def install_redelivery(app: Any, settings: Settings) -> Redeliverer | None:
    """Register the redelivery timer on a Faust app (leader worker only, so
    two workers do not both resend) and the ordering gate for live deliveries."""
    global _gate
    if not settings.alerts.webhooks:
        return None
    from streams.findings import open_findings

    # the store the alert sink records deliveries in (SQLite or Elasticsearch)
    redeliverer = Redeliverer(settings, lambda: open_findings(settings.findings.url, settings.data_dir, settings))
    _gate = redeliverer

    @app.timer(interval=settings.alerts.webhook_redeliver_s, on_leader=True)
    async def redeliver_failed_webhooks() -> None:
        try:
            await redeliverer.run_once()
        except Exception:  # the next round tries again; a timer that raises stops for good
            log.exception("webhook redelivery round failed")

    return redeliverer
