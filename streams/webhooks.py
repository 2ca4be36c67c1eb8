"""Signed webhook delivery for alerts.

Receivers verify ``X-Deepwatch-Signature: sha256=<hex>``, the HMAC-SHA256 of
``"<X-Deepwatch-Timestamp>.<raw body>"`` under the shared secret; the timestamp
is signed too so a captured request cannot be replayed once it is older than
the receiver's window (5 minutes in ``verify``). ``X-Deepwatch-Delivery`` is the
alert id, also in the signed body as ``alert_id``: deliveries are
at-least-once and a receiver dedupes on it.

A delivery that still fails after its retries is not forgotten: the
``Redeliverer`` tries failed deliveries again every
``alerts.webhook_redeliver_s`` (and at worker start), oldest first, stopping
at the first failure so a receiver that comes back gets every alert of a
cluster in order. While an older alert of a cluster is undelivered, a newer
one queues behind it rather than overtaking it. An alert the receiver refuses
for good (``WebhookRejected``) is recorded as ``rejected`` and skipped.

Each attempt is bounded in total by the hook's ``timeout_s`` (a receiver
trickling its answer cannot hold a delivery), the answer's body is never read
(only its status counts), and redirects are never followed: a 3xx is a
configuration error reported with its ``Location``, not retried, and the
signed body never goes anywhere but the configured URL. Link-local and cloud
metadata addresses are never contacted, whether the URL names one or its host
resolves to one (the address checked is the one connected to). Logs and delivery
statuses name a target as ``scheme://host[:port]`` only, since webhook URLs
often carry a token.

A receiver (Python)::

    import hmac, hashlib, time

    def verify(secret: bytes, headers, raw_body: bytes, max_age_s=300) -> bool:
        ts = headers.get("X-Deepwatch-Timestamp", "")
        sig = headers.get("X-Deepwatch-Signature", "")
        if not ts.isdigit() or abs(time.time() - int(ts)) > max_age_s:
            return False  # stale: a replayed capture
        mac = hmac.new(secret, ts.encode() + b"." + raw_body, hashlib.sha256)
        return hmac.compare_digest(("sha256=" + mac.hexdigest()).encode(), sig.encode())

Verify the raw bytes as received, before parsing the JSON. Then dedupe on the
body's ``alert_id`` (the delivery header carries the same value but is not
signed): within ``max_age_s`` a captured request could be replayed with
another header.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import socket
import time
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

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


def verify(secret: bytes, timestamp: str | None, body: bytes, signature: str | None, *,
           max_age_s: float = 300) -> bool:
    """Receiver-side check (also what our tests use). Any malformed or missing
    header is a plain ``False``, never an exception a receiver would answer 500 to."""
    try:
        age = abs(time.time() - float(timestamp or ""))
    except ValueError:
        return False
    if not math.isfinite(age) or age > max_age_s:  # "nan" compares false with everything
        return False
    # bytes, not str: compare_digest raises TypeError on non-ASCII str
    return hmac.compare_digest(sign(secret, timestamp, body).encode(), (signature or "").encode(errors="replace"))


def delivery_status(e: WebhookError) -> str:
    """The stored status of a delivery that did not go through: ``rejected:``
    (for good: redelivery skips it, later alerts do not wait for it) or
    ``failed:`` (tried again, and later alerts of its cluster queue behind it)."""
    return f"{'rejected' if isinstance(e, WebhookRejected) else 'failed'}: {e}"


def target_label(url: str) -> str:
    """``scheme://host[:port]`` of a webhook URL, for logs and delivery
    statuses: the path, query or user info of a webhook URL often holds a token."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "<invalid webhook URL>"
    if not host:
        return "<invalid webhook URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


class WebhookError(Exception):
    pass


class WebhookRejected(WebhookError):
    """The receiver (or its URL) refused this alert for good: a 4xx other than
    408/429, a redirect, an invalid or refused address. Recorded as
    ``rejected``, not ``failed``: redelivery skips it, so one alert a receiver
    will never take does not hold every later alert to it back forever."""


async def deliver(hook: WebhookSettings, alert: Alert, client: httpx.AsyncClient) -> str:
    """POST the alert; returns "delivered" or raises WebhookError after retries."""
    if _gate is not None and await _gate.earlier_pending(hook, alert):
        raise WebhookError(f"{target_label(hook.url)}: queued behind an undelivered earlier alert of cluster {alert.cluster_id}")
    return await _post(hook, alert, client)


async def _post(hook: WebhookSettings, alert: Alert, client: httpx.AsyncClient) -> str:
    secret = os.environ.get(hook.secret_env)
    if not secret:
        raise WebhookError(f"webhook secret env var {hook.secret_env} is not set; refusing to send unsigned")
    shown = target_label(hook.url)
    problem = _url_problem(hook.url)
    if problem:
        raise WebhookRejected(f"{shown}: invalid webhook URL ({problem})")
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
            status, location = await _attempt(hook, body, headers, client)
        except TimeoutError:
            last = f"no answer within {hook.timeout_s:g} s"
        except _Refused as e:
            raise WebhookRejected(f"{shown}: refused: {e}") from None
        except OSError as e:  # name resolution (socket.gaierror)
            last = f"cannot resolve: {e}"
        except (httpx.InvalidURL, UnicodeError) as e:  # what _url_problem did not catch (IDNA); never gets better
            raise WebhookRejected(f"{shown}: invalid webhook URL ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            # httpx may quote the URL in its message; it can hold a token
            last = f"{type(e).__name__}: {e}".replace(hook.url, shown)
        else:
            if 200 <= status < 300:
                return "delivered"
            last = f"HTTP {status}"
            if 300 <= status < 400:
                # Never followed (the signed alert would go where the receiver
                # says, internal addresses included) and never retried: the
                # configured URL is what has to change.
                where = target_label(urljoin(hook.url, location)) if location else "no Location"
                raise WebhookRejected(f"{shown}: {last} redirect to {where} not followed; update the webhook URL")
            if 400 <= status < 500 and status not in (408, 429):
                raise WebhookRejected(f"{shown}: {last}")  # the receiver rejected it; retrying will not help
        if attempt < hook.retries:
            await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
    raise WebhookError(f"{shown}: {last}")


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be posted to, or None. Checked before sending:
    httpx raises some of these as exceptions no retry loop expects (a port
    out of range surfaces as an ExceptionGroup), which would stop the alert
    sink instead of failing one delivery."""
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError when out of range or not a number
    except ValueError as e:
        return str(e)
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r} is not http or https"
    if not parts.hostname:
        return "no host"
    return None


# Never a webhook receiver, whatever the configuration says: cloud instance
# metadata services (credentials) and link-local addresses. A subscriber's DNS
# name pointed here would otherwise make the worker POST to them.
_METADATA_NETS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10",  # link-local: AWS/GCP/Azure/OpenStack metadata at 169.254.169.254
    "fd00:ec2::254/128",  # AWS metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
))


class _Refused(Exception):
    """A receiver address that is never contacted; retrying does not help."""


def _metadata_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    from streams.fetch import embedded_ipv4  # IPv4-mapped, 6to4, Teredo, NAT64 forms

    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    return any(a in net for a in (ip, *inner) for net in _METADATA_NETS if a.version == net.version)


async def _pinned_url(url: str) -> tuple[httpx.URL, str]:
    """``url`` with its host replaced by the address it was checked at, and
    the host name (for the Host header and TLS). Resolving once and
    connecting to that address means a DNS answer that changes between the
    check and the connection (rebinding) cannot slip a refused address in."""
    parsed = httpx.URL(url)
    host = parsed.host
    infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80),
                                                       type=socket.SOCK_STREAM)
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    refused = [str(a) for a in addrs if _metadata_address(a)]
    if refused or not addrs:
        # any refused address refuses the host: a mixed answer is a rebinding trick
        raise _Refused(f"{host} resolves to {', '.join(refused) or 'nothing'}: link-local and cloud metadata "
                       "addresses are never webhook receivers")
    return parsed.copy_with(host=str(addrs[0])), parsed.netloc.decode("ascii").rpartition("@")[2]


async def _attempt(hook: WebhookSettings, body: bytes, headers: dict[str, str],
                   client: httpx.AsyncClient) -> tuple[int, str | None]:
    """One POST; returns the status and any ``Location``. Bounded in total by
    ``hook.timeout_s``, name resolution included: httpx's timeout applies to
    each read, so a receiver sending a byte a second would otherwise hold the
    delivery (and the alert sink behind it) forever. The response body is
    never read: a receiver answering with gigabytes costs nothing, the
    connection is just closed."""
    async with asyncio.timeout(hook.timeout_s):
        url, host_header = await _pinned_url(hook.url)
        async with client.stream("POST", url, content=body, headers={**headers, "Host": host_header},
                                 extensions={"sni_hostname": httpx.URL(hook.url).host},
                                 timeout=hook.timeout_s, follow_redirects=False) as resp:
            return resp.status_code, resp.headers.get("location")


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
                    except WebhookRejected as e:
                        rejected = delivery_status(e)
                        await asyncio.to_thread(lambda: self._db().mark_delivered(alert.alert_id, hook.url, rejected))
                        log.error("webhook receiver rejected an alert for good; going on with the next",
                                  extra={"alert_id": alert.alert_id, "error": str(e)})
                        continue
                    except WebhookError as e:
                        failed = delivery_status(e)
                        await asyncio.to_thread(lambda: self._db().mark_delivered(alert.alert_id, hook.url, failed))
                        log.warning("webhook redelivery failed; will retry", extra={"alert_id": alert.alert_id, "error": str(e)})
                        break  # still down: keep the order, try again next round
                    await asyncio.to_thread(lambda: self._db().mark_delivered(alert.alert_id, hook.url, status))
                    log.info("webhook redelivered", extra={"alert_id": alert.alert_id, "target": target_label(hook.url)})
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
