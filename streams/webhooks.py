"""Signed webhook delivery for alerts.

Receivers verify ``X-Deepwatch-Signature: sha256=<hex>``, the HMAC-SHA256 of
``"<X-Deepwatch-Timestamp>.<raw body>"`` under the shared secret; the timestamp
is signed too so a captured request cannot be replayed later.
``X-Deepwatch-Delivery`` is the alert id: deliveries are at-least-once and a
receiver dedupes on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time

import httpx

from streams.records import Alert
from streams.settings import WebhookSettings

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
