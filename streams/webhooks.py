"""Signed webhook delivery for alerts.

Receivers verify ``X-Deepwatch-Signature: sha256=<hex>``, the HMAC-SHA256 of
``"<X-Deepwatch-Timestamp>.<raw body>"`` under the shared secret; the timestamp
is signed too so a captured request cannot be replayed once it is older than
the receiver's window (5 minutes in ``verify``). ``X-Deepwatch-Delivery`` is the
alert id, also in the signed body as ``alert_id``: deliveries are
at-least-once and a receiver dedupes on it. An alert id that is not printable
ASCII (an account alert's id holds the account id, which may be any text,
CR/LF included) cannot go in a header as it is: the header then carries its
UTF-8 percent-encoding (``urllib.parse.unquote`` gives the id back). Ids of
printable ASCII, every cluster alert's, go as they are.

A key rotation leaves no gap: while a hook's ``previous_secret_env`` names a
variable holding the key being retired, every delivery also carries
``X-Deepwatch-Signature-Previous: sha256=<hex>``, the same HMAC of the same
timestamp and body under that key. ``X-Deepwatch-Signature`` stays as it
was, under the current key (``secret_env``), so a receiver that checks only
that header verifies with the current key as before, and one that accepts
either header (the example below) verifies with the old key or the new: each
receiver switches when it is ready. The old key goes in a header of its own,
not as a second ``sha256=`` element of the first: existing verifiers compare
the whole header value, and HTTP stacks join a repeated header into one
``a, b`` value, so either would fail them. Once ``previous_secret_env`` is
removed only the current key signs. Set but its variable unset or empty, the
current key alone signs and the command that starts the worker warns
(``unset_previous_keys``): receivers still on the old key refuse those
deliveries (401/403, recorded ``rejected``; ``deepwatch redeliver`` sends
them again). Keys are read from the environment at each delivery and never
kept, logged or put in an error; only the variables' names are.

A hook with ``ca_certs`` checks its receiver's https certificate against
that PEM bundle alone instead of the system's CAs (a receiver behind a
private CA), host name included; verification is never turned off. The
bundle is read once per process (``ca_context``; commands that send
alerts refuse to start with a bundle that cannot verify,
``unusable_ca_bundles``, and settings refuse ``ca_certs`` on an http://
URL).

Each https hook has an HTTP client of its own, kept for the life of the
client its owner (the senders, the redelivery) shares (``aclose_clients``
closes them): trusting its ``ca_certs`` alone, or the system's CAs, and
never another hook's name on a connection (httpx pools connections by
address, not by the name verified on them). A burst of alerts to a hook
then pays one TLS handshake, not one per delivery. Keeping connections
weakens neither address check below: every delivery still resolves the
name, checks the address and pins the request to it, and a kept
connection only carries requests for that same address, never for one a
later DNS answer gives.

Every target (webhook URL) has its own queue and sender in the worker: a
receiver that is slow, hangs until ``timeout_s`` or is down holds back only
its own later alerts, never another subscriber's; each target gets its alerts
in the order they were raised. An alert is recorded as ``queued`` for each
target before the alert sink takes the next one. A stopping worker gives its
senders a bounded grace to deliver what they hold (``streams.sinks.Sinks.stop``);
an alert whose delivery a stopped or killed worker still left unfinished is
sent by the redelivery, once its ``queued`` record is
``2 × alerts.webhook_redeliver_s`` old. A worker's senders and its
redelivery share one ``Deliveries``: the alerts the senders have in hand
(redelivery leaves them to them), the targets that asked to wait and the
ordering gate.

A delivery that still fails after its retries is not forgotten: redelivery
(``streams.webhook_redelivery``) sends it again, in order per cluster. An
alert the receiver refuses for good (``WebhookRejected``: a 4xx other than
408/429, a 501 or 505, a redirect, a request the HTTP client refuses to send) is recorded
as ``rejected`` and not retried on its own; ``deepwatch redeliver TARGET``
queues it again once the cause is fixed.

A 401 or 403 whose ``Date`` is more than ``CLOCK_SKEW_S`` (290 s) off
this worker's clock is a clock's fault (this worker's or the receiver's),
not the alert's: receivers refuse a timestamp over 5 minutes off theirs.
It is recorded ``failed`` (redelivery sends it again once the clocks
agree) with the skew, not ``rejected`` for good.

A 429 or 503 with ``Retry-After`` (seconds or an HTTP date) is honoured: the
next try waits that long, at most the hook's ``retry_after_max_s``; after the
last try the target is left alone for that long (live deliveries are recorded
``failed`` at once, saying so, redelivery skips it) and redelivery sends
them afterwards.

``deepwatch_webhook_deliveries_total{outcome}`` counts the outcome of every
delivery attempt (after its retries), live and redelivered: ``delivered``
once per alert and target, ``failed`` every time one still fails (so a
receiver that stays down keeps counting), ``rejected`` every refusal.
``deepwatch_webhook_undelivered{target, status}`` is what waits per target:
``queued`` (being sent), ``failed`` (redelivery retries it), ``rejected``
(waits for an operator).

Each attempt is bounded in total by the hook's ``timeout_s`` (a receiver
trickling its answer cannot hold a delivery), only the answer's status
counts (its body is read, at most 64 KiB within half a second, only so that
its connection can be reused: ``_drained``), and redirects are never followed: a 3xx is a
configuration error reported with its ``Location``, not retried, and the
signed body never goes anywhere but the configured URL. Link-local and cloud
metadata addresses are never contacted, whether the URL names one or its host
resolves to one (the address checked is the one connected to); loopback,
private and other non-public addresses only with
``alerts.allow_private_webhooks`` (else the delivery is ``rejected``, saying
so and that the alerts rejected for it need ``deepwatch redeliver KEY`` once
the setting is on; a worker warns at start about each hook refused so,
``refused_receivers``). Logs, errors, delivery statuses and the command line name a target as
``scheme://host[:port]`` only, since webhook URLs often carry a token; the
findings store and metrics key it by the hook's identity (``hook_key``):
``hook:<name>`` for a hook with a ``name``, else ``scheme://host[:port]#<8
hex digits of the SHA-256 of scheme://host:port>``, so a new path or token in
the URL keeps the hook's undelivered alerts (settings refuse two nameless
hooks on one host). Records kept under a hook's earlier keys
(``legacy_keys``: the whole URL's hash, as before, and its
``previous_keys``) are redelivered as its own; keys no hook serves are
named in a warning (``webhook_redelivery.Redeliverer.warn_stranded``).

A receiver (Python)::

    import hmac, hashlib, time

    # during a key rotation the key being retired signs too, in a header of its own
    SIGNATURES = ("X-Deepwatch-Signature", "X-Deepwatch-Signature-Previous")

    def verify(secret: bytes, headers, raw_body: bytes, max_age_s=300) -> bool:
        # names in any case: HTTP/2, Lambda function URLs, dict(request.headers) in FastAPI give them lower-cased
        h = {name.lower(): value for name, value in headers.items()}
        ts = h.get("x-deepwatch-timestamp", "")
        # isascii too: str.isdigit() accepts "²" and "١", which int() refuses or reads
        if not (ts.isascii() and ts.isdigit()) or abs(time.time() - int(ts)) > max_age_s:
            return False  # stale: a replayed capture
        mac = hmac.new(secret, ts.encode() + b"." + raw_body, hashlib.sha256)
        mine = ("sha256=" + mac.hexdigest()).encode()
        return any(hmac.compare_digest(mine, h.get(name.lower(), "").encode()) for name in SIGNATURES)

A receiver holding either key, the old or the new, verifies a delivery made
during a rotation: it switches keys when it is ready, and needs no change
when the rotation ends.

Verify the raw bytes as received, before parsing the JSON. Then dedupe on the
body's ``alert_id`` (the delivery header carries the same value, percent-encoded
when it is not printable ASCII, but is not signed): within ``max_age_s`` a
captured request could be replayed with another header.

The body is the alert's JSON (``streams.records.Alert``). A hook with
``summary = true`` also gets ``"summary"``, one line for people (what the
console prints: cluster, level, fake score, velocity, top evidence, and when
the alert knows them the first-seen time in UTC, the platforms and one post
URL, ``alert_summary``); a
receiver that validates the body strictly against the alert schema must allow
that field. With ``desk.public_url`` set (the desk's address as people reach
it), every hook also gets ``"desk_url"``: the fact-check desk's page of the
alert's cluster, ``<desk.public_url>/clusters/<cluster_id>`` (the id
percent-encoded as a path segment; an account alert, whose ``cluster_id`` is
``account:<id>``, links its account's page, ``/accounts/<id>``), and the
``summary`` line ends with ``; desk: <desk_url>``. Without the setting neither
appears and the body is the alert's JSON as before. Both fields are in the
signed body, as sent.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import ssl
import re
import time
import weakref
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Mapping, Protocol
from urllib.parse import quote, urljoin, urlsplit

import httpx

from detectors.printable import one_line
from streams import metrics
from streams.findings import UNDELIVERED, DeliveryState, account_page_url, cluster_page_url
from streams.records import Alert, openable_url
from streams.safe_http import FetchError, Pinned, embedded_ipv4, pin  # embedded: IPv4-mapped, 6to4, Teredo, NAT64
from streams.safe_http import public_address, tls_context
from streams.settings import TARGET_KEY_RE, Settings, WebhookSettings, hook_origin

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Deepwatch-Signature"
PREVIOUS_SIGNATURE_HEADER = "X-Deepwatch-Signature-Previous"  # under the key being retired (previous_secret_env)
TIMESTAMP_HEADER = "X-Deepwatch-Timestamp"
USER_AGENT = "deepwatch-webhooks/1 (+https://github.com/deepwatch)"
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


# Printable ASCII but "%": what a header value holds as is (no space: leading or
# trailing ones are stripped by receivers' parsers; "%" is the escape itself).
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def delivery_header(alert_id: str) -> str:
    """``X-Deepwatch-Delivery`` for ``alert_id``: the id itself when it is
    printable ASCII without spaces, else its UTF-8 percent-encoding ("%" then
    encoded too, so ``urllib.parse.unquote`` gives the id back). Header values
    cannot hold CR/LF (the client refuses them: header injection) nor, in
    httpx, anything outside ASCII."""
    if all(" " < ch < "\x7f" for ch in alert_id):
        return alert_id
    return quote(alert_id, safe=_HEADER_SAFE)


def payload(target: Target, alert: Alert) -> bytes:
    """The signed body: the alert's JSON, plus ``desk_url`` when the desk's
    public address is set (``Target.desk_public_url``: ``hooks_by_key``
    gives it) and a line for people with the hook's ``summary``. Neither:
    the alert's JSON as it is (with the cluster's ``first_seen``,
    ``last_seen``, ``platforms`` and ``sample_posts``,
    ``streams.records.Alert``)."""
    link = desk_url(target.desk_public_url, alert)
    if not target.hook.summary and link is None:
        return alert.model_dump_json().encode()
    doc = json.loads(alert.model_dump_json())
    if link is not None:
        doc["desk_url"] = link
    if target.hook.summary:
        doc["summary"] = alert_summary(alert, link)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def desk_url(public_url: str | None, alert: Alert) -> str | None:
    """The desk's page of what ``alert`` is about under its public address
    (``desk.public_url``): the cluster's page (the desk's
    ``/clusters/{cluster_id}``), or for an account alert the account's
    (``/accounts/{account_id}``, or ``/accounts/?id=..`` for an id a browser
    would resolve away: ``account_page_url``); None without an address. The
    id is percent-encoded as one path segment."""
    if alert.account_id is not None:
        return account_page_url(public_url, alert.account_id)
    return cluster_page_url(public_url, alert.cluster_id)


def alert_summary(alert: Alert, desk_link: str | None = None) -> str:
    """One line for people; it ends with the desk link when there is one.
    Where the alert knows them: when the picture was first seen (UTC), on
    which platforms, and one post to open (``alert_spread``)."""
    top = top_evidence(alert)
    # the desk found an alerted picture authentic: say so first, not "alert"
    what = "correction" if alert.correction else "escalation" if alert.level > 1 else "alert"
    return (f"deepwatch {what} (level {alert.level}) for cluster {alert.cluster_id}: {alert_score(alert)}, "
            f"{alert.velocity.sightings_5m} sightings in 5 min, {alert.accounts} accounts; top evidence: "
            f"{top}{alert_spread(alert)}" + (f"; desk: {desk_link}" if desk_link else ""))


def alert_score(alert: Alert) -> str:
    """"fake score 0.91 (likely-ai)"; a correction's says the desk's
    verdict first and the score as what it overruled: its score is what the
    evidence fuses to, the desk's verdict among it (a generator's metadata
    can keep it high), its verdict the desk's, and "fake score 0.96
    (no-evidence)" after "found it authentic" read as a contradiction. For
    the webhook summary line and the console line alike."""
    if alert.correction:
        return f"the desk found it authentic, overruling a fake score of {alert.fake_score:.2f}"
    return f"fake score {alert.fake_score:.2f} ({alert.verdict})"


def top_evidence(alert: Alert) -> str:
    """The alert's strongest evidence as one printable line (its detail may be
    text read from the picture: ``detectors.printable``)."""
    return one_line(alert.evidence[0].detail) if alert.evidence else "no evidence detail"


def alert_spread(alert: Alert) -> str:
    """"; first seen 2026-12-06 04:10 UTC on bluesky, mastodon; post: URL" for
    what of it the alert knows (the earliest sample post with an http(s) URL),
    or ""."""
    spread = ""
    if alert.first_seen is not None:
        spread += f"; first seen {alert.first_seen.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"
    if alert.platforms:
        spread += f" on {', '.join(alert.platforms)}" if spread else f"; seen on {', '.join(alert.platforms)}"
    post = next((p.post_url for p in alert.sample_posts if openable_url(p.post_url)), None)
    if post:
        spread += f"; post: {post}"
    return spread


def failure_state(e: WebhookError) -> DeliveryState:
    """The state a delivery that did not go through is recorded in (why:
    ``str(e)``): rejected (for good: redelivery skips it, later alerts do
    not wait for it) or failed (tried again, and later alerts of its cluster
    queue behind it)."""
    return DeliveryState.REJECTED if isinstance(e, WebhookRejected) else DeliveryState.FAILED


# A URL in free text (an exception's, a stored delivery's why): up to a space, quote or angle bracket;
# a trailing ":,.;)" is the sentence's ("<url>: HTTP 503")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>:.,;)]")


def hide_urls(text: str) -> str:
    """``text`` with every URL in it as its label (``target_label``:
    scheme, host and port): a webhook URL often carries a token."""
    return _URL_IN_TEXT.sub(lambda m: target_label(m.group(0)), text) if "://" in text else text


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


_KEY = TARGET_KEY_RE


def target_key(url: str) -> str:
    """``target_label`` plus ``#`` and 8 hex digits of the SHA-256 of the
    whole URL: how a URL is shown where its token must not be (``deepwatch
    settings``), and the key deliveries were kept under before hooks were
    keyed by their identity (``hook_key``; ``legacy_keys`` reads those).
    A key maps to itself."""
    if _KEY.fullmatch(url):
        return url
    return f"{target_label(url)}#{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def hook_key(hook: WebhookSettings) -> str:
    """The stable name of a webhook target where it is kept and counted (the
    findings store's delivery records, metric labels, ``deepwatch
    redeliver``): ``hook:<name>`` for a hook with a ``name``, else
    ``scheme://host[:port]#`` and 8 hex digits of the SHA-256 of
    ``scheme://host:port``. Neither changes with the URL's path, query or
    user info, so rotating a token in the URL keeps the hook's undelivered
    alerts (settings refuse two nameless hooks on one host), and no token
    shows."""
    if hook.name:
        return f"hook:{hook.name}"
    try:
        origin = hook_origin(hook.url)
    except ValueError:
        return target_key(hook.url)
    shown = origin.removesuffix({"http": ":80", "https": ":443"}.get(origin.split(":", 1)[0], ""))
    return f"{shown}#{hashlib.sha256(origin.encode()).hexdigest()[:8]}"


def legacy_keys(hook: WebhookSettings) -> tuple[str, ...]:
    """Other names the undelivered deliveries of ``hook`` may be kept
    under: its ``previous_keys`` (an operator moved them to it), the key of
    its URL from before hooks were keyed by identity (``target_key``), and
    the URL itself (Elasticsearch records from before targets were keyed).
    Redelivery reads and settles them with the hook's own."""
    key = hook_key(hook)
    out: list[str] = []
    for name in (*hook.previous_keys, target_key(hook.url), hook.url):
        if name != key and name not in out:
            out.append(name)
    return tuple(out)


@dataclass(frozen=True)
class Target:
    """A configured hook as this deployment sends to it: the hook's own
    settings and what the deployment adds to every hook (``hooks_by_key``
    makes them from the settings, which stay as configured)."""

    hook: WebhookSettings
    desk_public_url: str | None = None  # desk.public_url: the body links the desk's page of the alert ("desk_url")
    allow_private: bool = False  # alerts.allow_private_webhooks: else public receiver addresses only

    @property
    def key(self) -> str:
        """The target's name in the findings store and metrics (``hook_key``)."""
        return hook_key(self.hook)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP
    date, RFC 9110 10.2.3); None when absent or unreadable."""
    v = (value or "").strip()
    if not v:
        return None
    if v.isascii() and v.isdigit():
        return float(int(v))
    try:
        when = parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class WebhookError(Exception):
    pass


class WebhookRejected(WebhookError):
    """The receiver (or its URL) refused this alert for good: a 4xx other than
    408/429, a 501 or 505 (``PERMANENT_5XX``), a redirect, an invalid or
    refused address, a request the HTTP client refuses to send. Recorded as
    ``rejected``, not ``failed``:
    redelivery skips it, so one alert a receiver will never take does not hold
    every later alert to it back forever. A 401/403 from a receiver whose
    clock is far off this worker's (``clock_skew_s``) is a plain
    ``WebhookError`` instead: it passes once the clock is fixed."""


class WebhookHeld(WebhookError):
    """Not sent at all (no attempt, not counted): an earlier alert of the
    cluster is undelivered, or the receiver asked to wait (``Retry-After``).
    Stored as ``failed``: redelivery sends it in its turn."""


class OrderingGate(Protocol):
    """What holds a live delivery back behind an undelivered earlier alert
    of its cluster (``webhook_redelivery.Redeliverer``)."""

    async def earlier_pending(self, target: Target, alert: Alert) -> bool: ...


class Deliveries:
    """What the webhook deliveries of one worker process share: the targets
    left alone for a while (their Retry-After), the alerts its live senders
    have in hand, the series of ``deepwatch_webhook_undelivered`` it set and
    the ordering gate. The worker makes one (``streams.app``) and hands it
    to its ``streams.sinks.Sinks`` and its ``webhook_redelivery.Redeliverer``; a sink with no
    redelivery beside it (the desk's) has one of its own."""

    def __init__(self) -> None:
        self._held_until: dict[str, float] = {}  # target key -> time.monotonic() it is left alone until
        # target key -> alert ids this process's senders have in hand (queued or being
        # sent): redelivery of ``queued`` records leaves those to them
        self._live: dict[str, set[str]] = {}
        self._exported: set[tuple[str, str]] = set()  # (target, status) series set, to drop the unconfigured ones
        # ``webhook_redelivery.install_redelivery``'s: a live delivery waits behind an undelivered earlier alert of its cluster
        self.gate: OrderingGate | None = None

    def held_for(self, key: str) -> float:
        """Seconds target ``key`` is still left alone (its Retry-After); 0: it is not."""
        left = self._held_until.get(key, 0.0) - time.monotonic()
        if left <= 0:
            self._held_until.pop(key, None)
            return 0.0
        return left

    def hold(self, key: str, seconds: float) -> None:
        """Leave target ``key`` alone for ``seconds`` (its Retry-After, capped)."""
        self._held_until[key] = time.monotonic() + seconds

    def live_add(self, key: str, alert_id: str) -> None:
        self._live.setdefault(key, set()).add(alert_id)

    def live_discard(self, key: str, alert_id: str) -> None:
        self._live.get(key, set()).discard(alert_id)

    def is_live(self, key: str, alert_id: str) -> bool:
        return alert_id in self._live.get(key, ())

    def live(self, key: str) -> frozenset[str]:
        """The alert ids this process's senders have in hand for ``key``."""
        return frozenset(self._live.get(key, ()))

    def export_undelivered(self, counts: dict[str, dict[DeliveryState, int]], keys: list[str]) -> None:
        """Set ``deepwatch_webhook_undelivered`` for the configured targets from
        the store's counts (``undelivered_counts``); series of targets no longer
        configured are dropped."""
        now = {(key, state.value) for key in keys for state in UNDELIVERED}
        for labels in self._exported - now:
            try:
                metrics.WEBHOOK_UNDELIVERED.remove(*labels)
            except KeyError:
                pass
        for key, state in now:
            metrics.WEBHOOK_UNDELIVERED.labels(key, state).set(counts.get(key, {}).get(state, 0))
        self._exported = now


async def deliver(target: Target, alert: Alert, client: httpx.AsyncClient, deliveries: Deliveries) -> DeliveryState:
    """POST the alert; returns ``DeliveryState.DELIVERED`` or raises WebhookError after retries."""
    gate = deliveries.gate
    if gate is not None and await gate.earlier_pending(target, alert):
        raise WebhookHeld(f"{target_label(target.hook.url)}: queued behind an undelivered earlier alert of cluster "
                          f"{alert.cluster_id}")
    return await post(target, alert, client, deliveries)


def _scrub(message: str, url: str, shown: str, *extra: str) -> str:
    """``message`` (an exception's text) without the URL or its parts that
    may hold a token: httpx may quote the URL it was given (here the one
    with the checked address in place of the host)."""
    for whole in (url, *extra):
        if whole:
            message = message.replace(whole, shown)
    try:
        parts = urlsplit(url)
    except ValueError:
        return message
    for part in (parts.netloc.rpartition("@")[0], parts.path if len(parts.path) > 1 else "", parts.query, parts.fragment):
        if part:
            message = message.replace(part, "…")
    return message


async def post(target: Target, alert: Alert, client: httpx.AsyncClient, deliveries: Deliveries) -> DeliveryState:
    """``deliver`` without the ordering gate: redelivery orders its own
    rounds (``streams.webhook_redelivery``)."""
    hook = target.hook
    secret = os.environ.get(hook.secret_env)
    if not secret:
        raise WebhookError(f"webhook secret env var {hook.secret_env} is not set; refusing to send unsigned")
    # unset or empty: the current key alone signs (check_alert_senders warned at start)
    previous = os.environ.get(hook.previous_secret_env) if hook.previous_secret_env else None
    shown = target_label(hook.url)
    problem = _url_problem(hook.url)
    if problem:
        raise WebhookRejected(f"{shown}: invalid webhook URL ({problem})")
    key = target.key
    held = deliveries.held_for(key)
    if held:
        raise WebhookHeld(f"{shown}: the receiver asked to wait (Retry-After); {held:.0f} s left")
    body = payload(target, alert)
    last = "no attempt"
    http = _client_for(target, client)
    for attempt in range(hook.retries + 1):
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,  # not httpx's: receivers and their firewalls can tell deepwatch by it
            SIGNATURE_HEADER: sign(secret.encode(), ts, body),
            TIMESTAMP_HEADER: ts,
            DELIVERY_HEADER: delivery_header(alert.alert_id),
        }
        if previous:
            headers[PREVIOUS_SIGNATURE_HEADER] = sign(previous.encode(), ts, body)
        wait = backoff_s(attempt)
        try:
            status, location, retry_after, date = await _attempt(target, body, headers, http)
        except TimeoutError:
            last = f"no answer within {hook.timeout_s:g} s"
        except _Refused as e:
            hint = requeue_hint(key) if isinstance(e, _Private) else ""
            raise WebhookRejected(f"{shown}: refused: {e}{hint}") from None
        except _Unresolved as e:
            last = str(e)  # "cannot resolve HOST: ...", "resolving HOST took longer than ..."
        except _BadUrl:  # a name IDNA cannot encode, a NUL byte: the detail may quote the URL (a token)
            raise WebhookRejected(f"{shown}: invalid webhook URL (no host name httpx or DNS can take)") from None
        except httpx.LocalProtocolError as e:
            # the client refuses to send this request (a header value it will not write, say):
            # the same request fails the same way every time
            raise WebhookRejected(f"{shown}: request refused by the HTTP client: "
                                  f"{_scrub(f'{type(e).__name__}: {e}', hook.url, shown)}"[:500]) from None
        except (httpx.InvalidURL, UnicodeError) as e:  # what _url_problem did not catch (IDNA); never gets better
            raise WebhookRejected(f"{shown}: invalid webhook URL ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            # httpx may quote the URL in its message; it can hold a token
            last = _scrub(f"{type(e).__name__}: {e}", hook.url, shown)
        else:
            if 200 <= status < 300:
                return DeliveryState.DELIVERED
            last = f"HTTP {status}"
            if 300 <= status < 400:
                # Never followed (the signed alert would go where the receiver
                # says, internal addresses included) and never retried: the
                # configured URL is what has to change.
                where = target_label(urljoin(hook.url, location)) if location else "no Location"
                raise WebhookRejected(f"{shown}: {last} redirect to {where} not followed; update the webhook URL")
            skew = clock_skew_s(date) if status in (401, 403) else None
            if skew is not None and abs(skew) > CLOCK_SKEW_S:
                # A clock, not the alert: every alert this worker signs is refused until
                # the clocks agree, then each goes through. Failed (redelivery retries it),
                # not rejected for good (which waits for an operator's `deepwatch redeliver`).
                raise WebhookError(f"{shown}: {last}; this worker's clock is {skew:+.0f} s off the receiver's "
                                   "(its Date header) and receivers refuse signatures timestamped over 5 minutes "
                                   "off their own: fix the clock that is wrong (NTP); redelivery sends it again")
            if 400 <= status < 500 and status not in (408, 429) or status in PERMANENT_5XX:
                raise WebhookRejected(f"{shown}: {last}")  # the receiver rejected it; retrying will not help
            asked = retry_after_s(retry_after) if status in (429, 503) else None
            if asked is not None:
                wait = min(asked, hook.retry_after_max_s)
                last = f"HTTP {status}, Retry-After {asked:.0f} s"
                if attempt == hook.retries:
                    # no try left: leave the target alone for as long as it asked
                    # (capped); redelivery sends this alert afterwards
                    if wait > 0:
                        deliveries.hold(key, wait)
                    raise WebhookError(f"{shown}: {last}; not tried again for {wait:.3g} s")
        if attempt < hook.retries:
            await asyncio.sleep(wait)
    raise WebhookError(f"{shown}: {last}")


# The clients of https hooks, by the shared client of their owner (a
# ``streams.sinks.Sinks``' senders, a ``Redeliverer``): they live as long as
# it (``aclose_clients``). Weak keys: an owner that only closes the shared
# client (a test's ``async with``) does not keep them reachable for ever.
_OWN_CLIENTS: "weakref.WeakKeyDictionary[httpx.AsyncClient, dict[tuple[str, str, str], httpx.AsyncClient]]" = \
    weakref.WeakKeyDictionary()


def _client_for(target: Target, shared: httpx.AsyncClient) -> httpx.AsyncClient:
    """The client a delivery to ``target`` goes through: for an https hook
    its own, made on its first delivery and kept with ``shared``, trusting
    the hook's ``ca_certs`` alone or else the system's CAs (``tls_context``,
    what ``shared`` trusts); ``shared`` for an http one. One per target:
    httpx pools connections by the address in the (pinned) URL, not by the
    name whose certificate was verified on them, so two hooks whose names
    resolve to one address would otherwise share a connection verified for
    one name only, and one hook's alerts would go where only the other's
    certificate was checked."""
    hook = target.hook
    if hook.ca_certs:
        try:
            trusted = ca_context(hook.ca_certs)
        except OSError as e:  # ssl.SSLError too; settings read it at start: since moved or replaced
            raise WebhookError(f"{target_label(hook.url)}: cannot read ca_certs {hook.ca_certs!r}: "
                               f"{getattr(e, 'reason', None) or e.strerror or e}") from None
    elif hook.url[:8].lower() == "https://":
        trusted = tls_context()
    else:
        return shared  # no certificate to verify: a connection serves any name on its address alike
    own = _OWN_CLIENTS.setdefault(shared, {})
    key = (target.key, hook.url, hook.ca_certs or "")
    client = own.get(key)
    if client is None or client.is_closed:
        client = own[key] = httpx.AsyncClient(verify=trusted, trust_env=False, follow_redirects=False)
    return client


async def aclose_clients(shared: httpx.AsyncClient) -> None:
    """Close ``shared`` and the https hooks' clients kept with it (``_client_for``)."""
    for client in _OWN_CLIENTS.pop(shared, {}).values():
        await client.aclose()
    await shared.aclose()


@functools.cache
def ca_context(path: str) -> ssl.SSLContext:
    """A verifying TLS context that trusts the PEM CA bundle at ``path``
    alone, built once per process: reading a bundle costs milliseconds a
    delivery need not pay. A bundle changed on disk is read at the next start."""
    return ssl.create_default_context(cafile=path)


# 5xx answers that say the request can never succeed as sent: the URL takes no
# POST (501) or the server refuses HTTP/1.1 (505). Retried, they came back on
# every try and redelivery sent them forever.
PERMANENT_5XX = frozenset({501, 505})

# Past this many seconds between this worker's clock and a receiver's (its
# ``Date``), a 401/403 is read as the signature's timestamp refused: the
# 5-minute window receivers are told to allow (``verify``), less 10 s for the
# request on its way and ``Date``'s whole seconds. Lower, a real refusal (a
# wrong secret) from a receiver 4-5 minutes off was "failed" and redelivered
# forever, holding that cluster's later alerts behind it.
CLOCK_SKEW_S = 290.0


def clock_skew_s(date: str | None, now: float | None = None) -> float | None:
    """How far this worker's clock (``time.time``, what signs the
    timestamp) is ahead of the receiver's, by its ``Date`` header (RFC 9110
    6.6.1, one-second resolution); None when absent or unreadable."""
    try:
        when = parsedate_to_datetime((date or "").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (time.time() if now is None else now) - when.timestamp()


def backoff_s(attempt: int) -> float:
    """The pause after failed attempt ``attempt`` (0-based) when the
    receiver named none (Retry-After)."""
    return min(0.5 * 2**attempt, 8.0)


def longest_delivery_s(hook: WebhookSettings) -> float:
    """The longest one delivery to ``hook`` takes by its own bounds: every
    try within ``timeout_s`` and the backoffs between them, plus a second for
    the store's records. A Retry-After pause can be longer."""
    return hook.timeout_s * (hook.retries + 1) + sum(backoff_s(a) for a in range(hook.retries)) + 1.0


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
    if "%" in parts.hostname:  # [fe80::1%25eth0]: was "cannot resolve", failed and retried every round
        return "an IPv6 zone id names an interface of this host (a link-local address): never a webhook receiver"
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


class _Private(_Refused):
    """A non-public receiver address, refused only because
    ``alerts.allow_private_webhooks`` is off: the setting is the fix."""


def _metadata_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    return any(a in net for a in (ip, *inner) for net in _METADATA_NETS if a.version == net.version)


def _refuse_metadata(host: str, addrs: list) -> None:
    refused = [str(a) for a in addrs if _metadata_address(a)]
    if refused:
        # any refused address refuses the host: a mixed answer is a rebinding trick
        raise _Refused(f"{host} resolves to {', '.join(refused)}: link-local and cloud metadata "
                       "addresses are never webhook receivers")


def _refuse_private(host: str, addrs: list) -> None:
    """Without ``alerts.allow_private_webhooks``: metadata addresses, and
    every address that is not public (loopback, RFC 1918, unique-local,
    CGNAT... the fetch stage's rule, ``streams.safe_http``)."""
    _refuse_metadata(host, addrs)
    refused = [str(a) for a in addrs if not public_address(a)]
    if refused:
        raise _Private(f"{host} resolves to non-public address {', '.join(refused)} (loopback or private network); "
                       "set alerts.allow_private_webhooks = true to deliver to it")


def requeue_hint(key: str) -> str:
    """What an alert rejected for a non-public receiver address needs once
    ``alerts.allow_private_webhooks`` is set: said in its stored reason and
    in the start-up warning (``refused_receivers``).

    Not retried on its own once the setting allows the address: decisions
    read a delivery's state, never the text of why (``DeliveryState``), so
    telling these rejections from a receiver's 403 would need a state of
    their own, which a worker of an older version beside this one would
    misread; and the alerts may be days old by then, which the operator
    should choose to send or not."""
    return (f"; alerts rejected for this are not sent again on their own: once the setting allows the address, "
            f"`deepwatch redeliver {key}` queues them again")


async def refused_receivers(settings: Settings) -> list[str]:
    """One line per configured hook whose receiver address every delivery
    would refuse (a non-public address without
    ``alerts.allow_private_webhooks``, a link-local or metadata one ever),
    checked as a delivery checks it (``_pinned``; a literal address needs
    no DNS), every hook at once within one DNS timeout. Such a hook's every
    alert would be recorded ``rejected`` with nothing said at start: the
    worker warns with these (``webhook_redelivery.install_redelivery``). A
    name that does not resolve now is left to the deliveries (it may
    later)."""
    async def check(i: int, target: Target) -> str | None:
        if _url_problem(target.hook.url):
            return None  # every delivery says so, rejected as an invalid URL
        try:
            await _pinned(target)
        except _Refused as e:
            fix = requeue_hint(target.key) if isinstance(e, _Private) else "; change the hook's url"
            return (f"alerts.webhooks[{i}] ({target_label(target.hook.url)}, {target.key}): every delivery is "
                    f"refused, each alert recorded rejected: {e}{fix}")
        except (_Unresolved, _BadUrl):
            return None
        return None

    seen: dict[str, tuple[int, Target]] = {}
    for i, hook in enumerate(settings.alerts.webhooks):
        target = Target(hook, settings.desk.public_url, settings.alerts.allow_private_webhooks)
        seen.setdefault(target.key, (i, target))
    lines = await asyncio.gather(*(check(i, t) for i, t in seen.values()))
    return [line for line in lines if line]


async def _pinned(target: Target) -> Pinned:
    """The target's URL resolved once (on the fetch stage's DNS threads),
    checked (``Target.allow_private``: metadata addresses only, else every
    address that is not public) and pinned to the checked address
    (``streams.safe_http.pin``): a DNS answer that changes between the check and
    the connection (rebinding) cannot slip a refused address in."""
    try:
        return await pin(target.hook.url, _refuse_metadata if target.allow_private else _refuse_private)
    except FetchError as e:
        if e.reason == "dns_failure":
            raise _Unresolved(e.detail) from None
        raise _BadUrl(e.detail) from None


class _Unresolved(Exception):
    """The receiver's name did not resolve (in time): worth another try."""


class _BadUrl(Exception):
    """A URL no request can be sent to; never gets better."""


async def _attempt(target: Target, body: bytes, headers: dict[str, str],
                   client: httpx.AsyncClient) -> tuple[int, str | None, str | None, str | None]:
    """One POST; returns the status, any ``Location``, ``Retry-After`` and ``Date``. Bounded in total by
    ``hook.timeout_s``, name resolution included: httpx's timeout applies to
    each read, so a receiver sending a byte a second would otherwise hold the
    delivery (and the alert sink behind it) forever. The status alone
    counts; the answer's body is read only so that its connection can carry
    the next delivery (``_drained``), at most ``DRAIN_BYTES`` within
    ``DRAIN_S``: a receiver answering with gigabytes, or trickling its body,
    costs that much and its connection is just closed."""
    hook = target.hook
    async with asyncio.timeout(hook.timeout_s) as bound:
        pinned = await _pinned(target)
        async with client.stream("POST", pinned.url, content=body, headers={**headers, "Host": pinned.host_header},
                                 extensions={"sni_hostname": pinned.sni},
                                 timeout=hook.timeout_s, follow_redirects=False) as resp:
            await _drained(resp, bound.when())
            h = resp.headers
            return resp.status_code, h.get("location"), h.get("retry-after"), h.get("date")


DRAIN_BYTES = 64 * 1024  # of an answer's body read to keep its connection; more, and the connection is closed
DRAIN_S = 0.5  # the longest an answer's body is read for, past its status and headers


async def _drained(resp: httpx.Response, deadline: float | None) -> None:
    """Read what is left of ``resp``'s body, at most ``DRAIN_BYTES`` within
    ``DRAIN_S`` and ending before ``deadline`` (the attempt's own, so the
    status already in hand is never lost to its timeout). httpx returns a
    connection to its pool only once its answer was read to the end:
    unread, every delivery paid a new connection and TLS handshake. Never
    raises: the body changes nothing about the delivery."""
    loop = asyncio.get_running_loop()
    until = loop.time() + DRAIN_S
    if deadline is not None:
        until = min(until, deadline - 0.05)  # the attempt's timeout must not fire while draining
    if until <= loop.time():
        return
    read = 0
    try:
        async with asyncio.timeout_at(until):
            async for chunk in resp.aiter_raw():
                read += len(chunk)
                if read > DRAIN_BYTES:
                    return  # closed unread with the stream: not worth keeping
    except (TimeoutError, httpx.HTTPError):
        pass  # the stream's close discards the connection


def unsigned_hooks(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per configured hook whose HMAC key (the variable its
    ``secret_env`` names) is unset or empty: such a hook's every delivery
    would fail (nothing is sent unsigned). Commands that send alerts refuse to
    start with any, instead of recording each alert as failed."""
    return [f"alerts.webhooks[{i}] ({target_label(hook.url)}): {hook.secret_env} is not set; export the HMAC key "
            f"receivers verify as {hook.secret_env}, or name another variable in its secret_env"
            for i, hook in enumerate(settings.alerts.webhooks) if not environ.get(hook.secret_env)]


def ca_bundle_problem(path: str) -> str | None:
    """Why the PEM CA bundle at ``path`` cannot verify a receiver (missing,
    unreadable, not PEM, or holding no CA certificate); None when it can."""
    if not os.path.exists(path):
        return f"no such file: {path!r}"
    if not os.path.isfile(path):
        return f"{path!r} is not a file"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as e:
        return f"{path!r} is not a PEM CA bundle ({e.reason or e})"
    except OSError as e:
        return f"cannot read {path!r}: {e.strerror or e}"
    if not ctx.cert_store_stats()["x509_ca"]:
        return f"{path!r} holds no CA certificate (a server's own certificate cannot verify it)"
    return None


def unusable_ca_bundles(settings: Settings) -> list[str]:
    """One line per hook whose ``ca_certs`` no delivery could use: commands
    that send alerts refuse to start with any (``check_alert_senders``),
    rather than record every delivery to the hook as failed."""
    return [f"alerts.webhooks[{i}] ({target_label(hook.url)}): ca_certs: {problem}; give the PEM bundle of the CA "
            "that signed the receiver's certificate"
            for i, hook in enumerate(settings.alerts.webhooks)
            if hook.ca_certs and (problem := ca_bundle_problem(hook.ca_certs))]


def unset_previous_keys(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per hook in a key rotation (``previous_secret_env`` set)
    whose retiring key's variable is unset or empty. Not a refusal: the
    current key still signs, so receivers that hold it keep getting alerts;
    those still on the retiring key refuse them until they switch."""
    return [f"alerts.webhooks[{i}] ({target_label(hook.url)}): previous_secret_env names {hook.previous_secret_env}, "
            f"which is not set; deliveries are signed with the current key ({hook.secret_env}) only, so receivers "
            f"still verifying with the retiring key refuse them: export {hook.previous_secret_env}, or remove "
            "previous_secret_env once every receiver holds the current key"
            for i, hook in enumerate(settings.alerts.webhooks)
            if hook.previous_secret_env and not environ.get(hook.previous_secret_env)]


def hooks_by_key(settings: Settings) -> dict[str, Target]:
    """The configured hooks as ``Target``s by ``hook_key`` (one per identity:
    a URL listed twice is one target), each with the desk's public address
    (``desk.public_url``) its bodies link to and whether it may reach a
    private address (``alerts.allow_private_webhooks``)."""
    out: dict[str, Target] = {}
    for hook in settings.alerts.webhooks:
        key = hook_key(hook)
        if key not in out:
            out[key] = Target(hook, settings.desk.public_url, settings.alerts.allow_private_webhooks)
    return out


def stranded_keys(settings: Settings, counts: dict[str, dict[DeliveryState, int]]) -> list[str]:
    """Target keys with deliveries still waiting (queued, failed or
    rejected) that no configured hook serves (neither its key nor one of
    its ``legacy_keys``): a hook removed, or renamed without
    ``previous_keys``. Nothing sends them."""
    served = {name for key, target in hooks_by_key(settings).items() for name in (key, *legacy_keys(target.hook))}
    return sorted(k for k, by_state in counts.items() if k not in served and any(by_state.values()))


def shared_secret_hooks(settings: Settings) -> list[str]:
    """One line per HMAC key variable (``secret_env``, or a rotation's
    ``previous_secret_env``) that hooks on different hosts share: each of
    those subscribers holds the key the others verify with, so any of them
    can sign an alert the others accept."""
    hosts: dict[str, dict[str, str]] = {}  # key variable -> host -> its label
    for hook in settings.alerts.webhooks:
        try:
            host = urlsplit(hook.url).hostname or ""
        except ValueError:
            host = ""
        for env in filter(None, (hook.secret_env, hook.previous_secret_env)):
            hosts.setdefault(env, {}).setdefault(host, target_label(hook.url))
    return [f"webhooks on {len(by_host)} hosts ({', '.join(by_host.values())}) share the HMAC key in {env}: "
            "each subscriber can sign alerts the others accept; give each its own key (secret_env)"
            for env, by_host in hosts.items() if len(by_host) > 1]
