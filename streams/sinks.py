"""Sinks: the findings store, and alert delivery (console, webhooks).

Each sink is idempotent — snapshots keep the highest revision, sightings and
alerts are keyed by event id / alert id, webhook deliveries are recorded per
(alert, target) — so redelivered messages change nothing.

A store that cannot write (``sqlite3.OperationalError``: the file locked past
its busy timeout, the disk full, a read-only file) holds the batch: ``Sinks``
logs each failure and retries it with capped exponential backoff
(``findings.retry_initial_s`` doubling to ``retry_max_s``) until the store
takes it, and ``deepwatch_sink_behind_seconds`` says for how long (the
``DeepwatchFindingsSinkBehind`` rule). It does not raise: a Faust stream acks
the events it handed out once the agent's loop ends, however it ends, so an
agent that crashed on the error and was restarted had lost that batch.

``BulkSink`` is how findings reach Elasticsearch: the Faust agents hand it
batches (``stream.take(bulk_max_actions, within=bulk_flush_s)``: by size and
by time), it splits them by bytes, retries 429/5xx with capped exponential
backoff (the whole request or just the rejected items) and dead-letters only
an item Elasticsearch refuses for good (e.g. a mapping error) with the reason,
while the rest of the batch carries on. It never gives up on retryable
failures: the agent awaits it, so while it is behind the agent takes nothing
more from its topic, offsets are not committed, and Faust stops fetching once
its buffers fill (backpressure; nothing is dropped, a crash replays).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import httpx

from streams import metrics
from streams.records import Alert, ClusterSnapshot, DeadLetter
from streams.settings import FindingsSettings, Settings, WebhookSettings
from streams.findings import FindingsStore, open_findings
from streams.webhooks import WebhookError, deliver, delivery_status, target_label

log = logging.getLogger("deepwatch.alerts")

R = TypeVar("R")


class Sinks:
    """``retry_for_s``: how long a failing write is retried before its error
    is raised; None (the stream's sink agents) retries until the store takes
    it. A caller that answers someone (a desk request) gives a bound."""

    def __init__(self, settings: Settings, *, retry_for_s: float | None = None):
        self.settings = settings
        self.retry_for_s = retry_for_s
        self._store: FindingsStore | None = None
        self._client: httpx.AsyncClient | None = None
        self._open_lock = threading.Lock()
        self._retrying = 0  # writes now waiting out a failure, across this worker's sink agents
        self._behind_since: float | None = None

    @property
    def store(self) -> FindingsStore:
        # Opened by the first write's thread (not on the event loop: Elasticsearch
        # set-up is network round trips); two agents' first writes open one store.
        with self._open_lock:
            if self._store is None:
                store = open_findings(self.settings.findings.url, self.settings.data_dir, self.settings)
                # Elasticsearch: templates, ILM policy, script, aliases before the first write
                getattr(store, "ensure_setup", lambda: None)()
                self._store = store
        return self._store

    async def _write(self, what: str, items: int, write: Callable[[FindingsStore], R]) -> R:
        """``write(store)`` in a thread, again and again until the store takes
        it (see the module docstring): the agent awaits this, so its messages
        stay unacked meanwhile. Other errors are raised as they come."""
        delay = self.settings.findings.retry_initial_s
        failing = False
        started = time.monotonic()
        try:
            while True:
                try:
                    return await asyncio.to_thread(lambda: write(self.store))
                except sqlite3.OperationalError as e:
                    if self.retry_for_s is not None and time.monotonic() - started >= self.retry_for_s:
                        log.error(f"findings store write failed ({what}, {items} items): {e}; giving up",
                                  extra={"what": what, "items": items, "error": str(e)})
                        raise
                    if not failing:
                        failing = True
                        self._retrying += 1
                        if self._behind_since is None:
                            self._behind_since = time.monotonic()
                    metrics.SINK_BEHIND_SECONDS.set(time.monotonic() - self._behind_since)
                    log.error(f"findings store write failed ({what}, {items} items): {e}; retrying in {delay:g}s",
                              extra={"what": what, "items": items, "error": str(e), "delay_s": delay})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.findings.retry_max_s)
        finally:
            if failing:
                self._retrying -= 1
                if self._retrying == 0:
                    self._behind_since = None
                    metrics.SINK_BEHIND_SECONDS.set(0)

    async def snapshot(self, raw: bytes) -> None:
        await self.snapshots([raw])

    async def snapshots(self, raws: list[bytes]) -> None:
        """One batch in one store call (one bulk request on Elasticsearch)."""
        snaps = [ClusterSnapshot.loads(r) for r in raws]
        await self._write("snapshots", len(snaps), lambda store: store.apply_snapshots(snaps))

    async def dead_letter(self, raw: bytes) -> None:
        await self.dead_letters([raw])

    async def dead_letters(self, raws: list[bytes]) -> None:
        dls = [DeadLetter.loads(r) for r in raws]
        await self._write("dead letters", len(dls), lambda store: store.add_dead_letters(dls))

    async def alert(self, raw: bytes) -> None:
        alert = Alert.loads(raw)
        new = await self._write("alert", 1, lambda store: store.add_alert(alert))
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
        """Every receiver at once: a slow or failing one (its retries and
        timeouts add up) must not hold back the others."""
        hooks = self.settings.alerts.webhooks
        if not hooks:
            return
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        results = await asyncio.gather(*(self._webhook(hook, alert) for hook in hooks), return_exceptions=True)
        for r in results:  # raised only once all are done, so none runs on unawaited
            if isinstance(r, BaseException):
                raise r

    async def _webhook(self, hook: WebhookSettings, alert: Alert) -> None:
        if await self._write("delivery", 1, lambda store: store.delivered(alert.alert_id, hook.url)):
            return
        try:
            status = await deliver(hook, alert, self._client)
            metrics.WEBHOOKS.labels("delivered").inc()
        except WebhookError as e:
            status = delivery_status(e)
            metrics.WEBHOOKS.labels(status.split(":", 1)[0]).inc()  # failed | rejected
            log.error("webhook delivery failed",
                      extra={"alert_id": alert.alert_id, "target": target_label(hook.url), "error": str(e)})
        await self._write("delivery", 1, lambda store: store.mark_delivered(alert.alert_id, hook.url, status))


# ---------------------------------------------------------------------------
# Elasticsearch bulk writes
# ---------------------------------------------------------------------------
Action = tuple[dict[str, Any], "dict[str, Any] | None"]  # bulk header line, source line (None for delete)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass
class BulkResult:
    ok: int = 0  # applied (created, updated, no-op) or already there
    created: int = 0  # create actions that made a new document
    created_in: dict[str, int] = field(default_factory=dict)  # the same, by index (as the action named it)
    duplicates: int = 0  # create actions whose id was already there (redelivery)
    retried: int = 0  # item retries plus whole-request retries
    dead_lettered: int = 0


class BulkSink:
    """Sends bulk actions until each one is applied or dead-lettered."""

    def __init__(self, client: Any, settings: FindingsSettings, *, dead_letters_index: str,
                 processed_index: str | None = None, sleep: Callable[[float], None] = time.sleep):
        self.es = client
        self.settings = settings
        self.dead_letters_index = dead_letters_index
        self.processed_index = processed_index
        self.sleep = sleep
        self._behind_since: float | None = None

    def send(self, actions: list[Action]) -> BulkResult:
        result = BulkResult()
        for chunk in self._chunks(actions):
            self._send_chunk(chunk, result)
        return result

    def _chunks(self, actions: list[Action]):
        """Split by action count and NDJSON bytes; one oversized action goes alone."""
        chunk: list[Action] = []
        size = 0
        for a in actions:
            n = len(_ndjson([a]))
            if chunk and (len(chunk) >= self.settings.bulk_max_actions or size + n > self.settings.bulk_max_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append(a)
            size += n
        if chunk:
            yield chunk

    def _backoff(self, delay: float, why: str, count: int) -> float:
        if self._behind_since is None:
            self._behind_since = time.monotonic()
        metrics.SINK_BEHIND_SECONDS.set(time.monotonic() - self._behind_since)
        log.warning("findings sink behind: retrying", extra={"why": why, "items": count, "delay_s": delay})
        self.sleep(delay)
        return min(delay * 2, self.settings.retry_max_s)

    def _send_chunk(self, todo: list[Action], result: BulkResult, *, dead_letters: bool = True) -> None:
        from elasticsearch import ApiError, ConnectionError as EsConnectionError, ConnectionTimeout

        delay = self.settings.retry_initial_s
        while todo:
            try:
                # our own retrying (per item, never giving up), not the client's
                resp = self.es.options(max_retries=0, retry_on_status=()).bulk(operations=_lines(todo))
            except (EsConnectionError, ConnectionTimeout) as e:
                result.retried += 1
                delay = self._backoff(delay, f"{type(e).__name__}", len(todo))
                continue
            except ApiError as e:
                if e.meta.status in RETRYABLE_STATUS:
                    result.retried += 1
                    delay = self._backoff(delay, f"HTTP {e.meta.status}", len(todo))
                    continue
                from streams.es_store import explain

                raise explain(e, "the findings store") from None
            retry: list[Action] = []
            failed: list[tuple[Action, dict[str, Any]]] = []
            for action, item in zip(todo, resp["items"]):
                op, r = next(iter(item.items()))
                index = _index_key(action)
                status = r.get("status", 500)
                if 200 <= status < 300:
                    result.ok += 1
                    if op == "create" and r.get("result") == "created":
                        result.created += 1
                        result.created_in[index] = result.created_in.get(index, 0) + 1
                    metrics.SINK_ITEMS.labels(index, "ok").inc()
                elif status == 409 and op == "create":
                    result.ok += 1
                    result.duplicates += 1
                    metrics.SINK_ITEMS.labels(index, "duplicate").inc()
                elif status in RETRYABLE_STATUS or status == 409:
                    # 409 on an update: concurrent writers beat retry_on_conflict; the script is idempotent
                    retry.append(action)
                    metrics.SINK_ITEMS.labels(index, "retried").inc()
                else:
                    failed.append((action, r))
            if failed:
                if dead_letters:
                    self._dead_letter(failed, result)
                else:
                    for action, r in failed:
                        log.error("dead letter refused by the findings store; logged here only",
                                  extra={"action": action[0], "error": r.get("error")})
            if retry:
                result.retried += len(retry)
                delay = self._backoff(delay, "items rejected", len(retry))
            todo = retry
        if self._behind_since is not None:
            self._behind_since = None
            metrics.SINK_BEHIND_SECONDS.set(0)

    def _dead_letter(self, failed: list[tuple[Action, dict[str, Any]]], result: BulkResult) -> None:
        from streams.es_store import dead_letter_doc, dead_letter_key, processed_action
        from streams.records import SourceRef

        actions: list[Action] = []
        for (header, source), r in failed:
            op, meta = next(iter(header.items()))
            err = r.get("error") or {}
            reason = err.get("type", f"http_{r.get('status')}") if isinstance(err, dict) else str(err)
            detail = err.get("reason", str(err)) if isinstance(err, dict) else str(err)
            src = (source or {}).get("source")
            dl = DeadLetter(
                event_id=(source or {}).get("event_id") or meta.get("_id"), stage="sink", reason=reason[:200],
                detail=f"{op} {meta.get('_index')}/{meta.get('_id')}: {detail}"[:2000],
                source=SourceRef(**src) if isinstance(src, dict) else None,
                payload_excerpt=json.dumps(source, default=str)[:512] if source is not None else None,
            )
            metrics.DEAD_LETTERS.labels("sink", dl.reason).inc()
            metrics.SINK_ITEMS.labels(_index_key((header, source)), "dead_letter").inc()
            log.error("findings item refused; dead-lettered", extra={"reason": dl.reason, "detail": dl.detail})
            actions.append(({"create": {"_index": self.dead_letters_index, "_id": dead_letter_key(dl)}},
                            dead_letter_doc(dl)))
            if dl.source is not None and self.processed_index:
                actions.append(processed_action(self.processed_index, dl.source, "dead_letter", dl.event_id, op="index"))
            result.dead_lettered += 1
        self._send_chunk(actions, BulkResult(), dead_letters=False)


def _index_key(action: Action) -> str:
    meta = next(iter(action[0].values()))
    return str(meta.get("_index", "?"))


def _lines(actions: list[Action]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for header, source in actions:
        out.append(header)
        if source is not None:
            out.append(source)
    return out


def _ndjson(actions: list[Action]) -> bytes:
    return b"".join(json.dumps(x, separators=(",", ":"), default=str).encode() + b"\n" for x in _lines(actions))
