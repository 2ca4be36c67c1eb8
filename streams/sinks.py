"""Sinks: the findings store, and alert delivery (console, webhooks).

Each sink is idempotent — snapshots keep the highest revision, sightings and
alerts are keyed by event id / alert id, webhook deliveries are recorded per
(alert, target) — so redelivered messages change nothing.

Webhooks: ``alert`` records each delivery as ``queued`` (before the alert
itself, so from then on the store knows what is owed) and hands it to its
target's sender (``_Sender``: one queue and task per target, one alert at a
time, in order); the alerts agent goes on with the next alert at once. A
receiver that hangs or is down delays only its own target. A sender that
stops (the worker does) leaves its alerts ``queued``: redelivery
(``streams.webhook_redelivery``) sends them.

A worker that stops (SIGTERM, a rolling restart, the end of a replay) first
gives its senders a grace period to deliver what they hold (``stop``: at
most ``alerts.webhook_stop_grace_s``, less when the hooks' own timeouts say every
held alert is done sooner), so subscribers get an alert the worker had in
hand now rather than at the next redelivery (``2 x
alerts.webhook_redeliver_s`` later). A receiver that hangs does not hold the
stop past the grace: what is still held then stays ``queued``.

A store that cannot write for a reason that passes (``streams.store_errors.may_pass``:
the SQLite file locked past its busy timeout, the disk full, a read-only file;
Elasticsearch unreachable, overloaded or refusing the credentials, in any of its
calls, not only the bulk requests) holds the batch: ``Sinks``
logs each failure and retries it with capped exponential backoff
(``findings.retry_initial_s`` doubling to ``retry_max_s``) until the store
takes it, and ``deepwatch_sink_behind_seconds`` says for how long (the
``DeepwatchFindingsSinkBehind`` rule). It does not raise: a Faust stream acks
the events it handed out once the agent's loop ends, however it ends, so an
agent that crashed on the error and was restarted had lost that batch.

``BulkSink`` is how findings reach Elasticsearch: the sink agents
(``streams.sink_stage``) hand it batches (``bulk_max_actions`` within
``bulk_flush_s``: by size and by time), it splits them by bytes, retries 429/5xx with capped exponential
backoff (the whole request or just the rejected items; an item answered 500,
or 409 on an update, at most ``ITEM_MAX_ATTEMPTS`` times), splits a request
refused whole for what it carries (413, an Elasticsearch 400) until the
refused action is alone, and dead-letters only an item Elasticsearch refuses
for good (e.g. a mapping error) with the reason, while the rest of the batch
carries on; a refusal naming no action (401/403, a wrong path) is raised
held, never acked unstored. It never gives up on retryable
failures: the agent awaits it, so while it is behind the agent takes nothing
more from its topic, offsets are not committed, and Faust stops fetching once
its buffers fill (backpressure; nothing is dropped, a crash replays).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Literal, TypeVar

import httpx

from streams import metrics
from streams.records import Alert, ClusterSnapshot, DeadLetter, SourceRef, named_event
from streams.settings import FindingsSettings, Settings
from streams.store_errors import may_pass
from streams.findings import DeliveryState, FindingsStore, SinkWriter, open_findings
from streams.webhooks import (
    Deliveries, Target, WebhookError, WebhookHeld, aclose_clients, alert_score, alert_spread, deliver, desk_url,
    failure_state, hooks_by_key, longest_delivery_s, target_label, top_evidence,
)

log = logging.getLogger("deepwatch.alerts")

R = TypeVar("R")
Rec = TypeVar("Rec", ClusterSnapshot, DeadLetter, Alert)

# ``deepwatch_sink_behind_seconds``: the oldest write of this process still
# retrying (a sink agent's batch, a bulk request), 0 when none is.
BEHIND = metrics.OldestWait(metrics.SINK_BEHIND_SECONDS)


class Sinks:
    """``retry_for_s``: how long a failing write is retried before its error
    is raised; None (the stream's sink agents) retries until the store takes
    it. A caller that answers someone (a desk request) gives a bound: its
    webhook deliveries are then one attempt each (no retries, no
    Retry-After pause), and what does not go through is left ``failed``
    for the leader worker's redelivery.

    ``deliveries``: what its webhook senders share with the worker's
    redelivery (``streams.webhooks.Deliveries``, the one the worker gave its
    ``Redeliverer``); a sink with no redelivery beside it (the desk's) has
    its own."""

    def __init__(self, settings: Settings, *, retry_for_s: float | None = None,
                 deliveries: Deliveries | None = None):
        self.settings = settings
        self.retry_for_s = retry_for_s
        self.deliveries = deliveries if deliveries is not None else Deliveries()
        self._store: FindingsStore | None = None  # what it opened, whole: desk.alerting closes it
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._senders: dict[str, _Sender] = {}  # webhook target key -> its queue and sender
        self._stopped_loop: asyncio.AbstractEventLoop | None = None  # the loop ``stop`` ran on: no new senders there
        self._open_lock = threading.Lock()

    @property
    def store(self) -> SinkWriter:
        # Opened by the first write's thread (not on the event loop: Elasticsearch
        # set-up is network round trips); two agents' first writes open one store.
        with self._open_lock:
            if self._store is None:
                store = open_findings(self.settings.findings.url, self.settings.data_dir, self.settings)
                # Elasticsearch: templates, ILM policy, script, aliases before the first write
                store.ensure_setup()
                self._store = store
        return self._store

    async def _write(self, what: str, items: int, write: Callable[[SinkWriter], R]) -> R:
        """``write(store)`` in a thread, again and again until the store takes
        it (see the module docstring): the agent awaits this, so its messages
        stay unacked meanwhile. Other errors are raised as they come."""
        delay = self.settings.findings.retry_initial_s
        started = time.monotonic()
        me = object()  # this write, in the clock of writes that are behind
        try:
            while True:
                try:
                    return await asyncio.to_thread(lambda: write(self.store))
                except Exception as e:
                    if not may_pass(e):
                        raise
                    if self.retry_for_s is not None and time.monotonic() - started >= self.retry_for_s:
                        log.error(f"findings store write failed ({what}, {items} items): {e}; giving up",
                                  extra={"what": what, "items": items, "error": str(e)})
                        raise
                    BEHIND.waiting(me)
                    log.error(f"findings store write failed ({what}, {items} items): {e}; retrying in {delay:g}s",
                              extra={"what": what, "items": items, "error": str(e), "delay_s": delay})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.findings.retry_max_s)
        finally:
            BEHIND.done(me)

    async def snapshots(self, raws: list[bytes]) -> None:
        """One batch in one store call (one bulk request on Elasticsearch).
        Each record is read on its own: one that does not read (a newer
        writer's, a damaged one) is dead-lettered (``unreadable``) and the
        rest of the batch is stored."""
        snaps, bad = _read(ClusterSnapshot, "snapshot", raws)
        if snaps:
            await self._write("snapshots", len(snaps), lambda store: store.apply_snapshots(snaps))
        if bad:
            await self._write("dead letters", len(bad), lambda store: store.add_dead_letters(bad))

    async def dead_letters(self, raws: list[bytes]) -> None:
        """As ``snapshots``: an unreadable dead letter becomes one of the sink's own, in the same batch."""
        dls, bad = _read(DeadLetter, "dead letter", raws)
        dls += bad
        if dls:
            await self._write("dead letters", len(dls), lambda store: store.add_dead_letters(dls))

    async def alert(self, raw: bytes) -> None:
        """Store the alert, log it, and hand it to each webhook target's
        sender. Returns once the deliveries are recorded as ``queued``, not
        once they are done: a slow or hanging receiver holds back neither
        the alert sink nor another target (``drain`` waits for them). A
        bounded sink (``retry_for_s``: the desk, answering a request) waits
        for this alert's deliveries too."""
        alerts, bad = _read(Alert, "alert", [raw])
        if bad:
            await self._write("dead letters", 1, lambda store: store.add_dead_letters(bad))
            return
        alert = alerts[0]
        targets = hooks_by_key(self.settings)
        if self.retry_for_s is not None:
            # the caller waits for these deliveries (a desk verdict request, holding the verdict lock):
            # one attempt, bounded by timeout_s, never a retry or a Retry-After sleep; a receiver that
            # does not take it now gets it from the leader worker's redelivery
            targets = {k: replace(t, hook=t.hook.model_copy(update={"retries": 0})) for k, t in targets.items()}
        todo: list[str] = []
        if targets:
            def queue(store: SinkWriter) -> list[str]:
                # before the alert itself: from the alert's record on, every
                # delivery it owes is on record (pending_work, redelivery).
                # A redelivered alert message leaves a settled delivery alone:
                # delivered, or rejected for good (only `deepwatch redeliver`
                # sends that again)
                out = []
                for key in targets:
                    state = store.delivery_state(alert.alert_id, key)
                    if state is None or not state.settled:
                        store.mark_delivered(alert.alert_id, key, DeliveryState.QUEUED)
                        out.append(key)
                return out

            todo = await self._write("delivery", len(targets), queue)
        new = await self._write("alert", 1, lambda store: store.add_alert(alert))
        if new:
            if not alert.correction:  # a correction takes an alert back: not one more "going viral"
                metrics.ALERTS.labels(str(alert.level)).inc()
            if alert.trigger_ingested_at:
                lag = (datetime.now(timezone.utc) - alert.trigger_ingested_at).total_seconds()
                metrics.EVENT_TO_ALERT_SECONDS.observe(max(0.0, lag))
            if self.settings.alerts.console:
                top = top_evidence(alert)
                link = desk_url(self.settings.desk.public_url, alert)
                what = (f"CORRECTION cluster {alert.cluster_id}" if alert.correction
                        else f"ALERT L{alert.level} cluster {alert.cluster_id}")
                log.warning(
                    f"{what}: {alert_score(alert)}, "
                    f"{alert.velocity.sightings_5m} sightings in 5 min, {alert.accounts} accounts — {top}"
                    f"{alert_spread(alert)}" + (f"; desk: {link}" if link else ""),
                    extra={"alert_id": alert.alert_id, "cluster_id": alert.cluster_id},
                )
        if todo and self._stopped_loop is asyncio.get_running_loop():
            # the worker is stopping and its senders are closed: the deliveries stay "queued", redelivery sends them
            log.info("worker stopping; webhook deliveries left to redelivery",
                     extra={"alert_id": alert.alert_id, "targets": len(todo)})
            todo = []
        done = [self._sender(key, targets[key]).put(alert) for key in todo]
        waiting = [d for d in done if d is not None]
        if self.retry_for_s is not None and waiting:
            # a caller that answers someone (the desk) says the alert went out: it waits for this
            # alert's deliveries (each target still on its own, one attempt), at most as long as one
            # attempt of the slowest hook takes; a delivery still running then goes on by itself
            bound = max(longest_delivery_s(targets[k].hook) for k in todo) + self.retry_for_s
            await asyncio.wait([asyncio.ensure_future(d) for d in waiting], timeout=bound)

    def _sender(self, key: str, target: Target) -> "_Sender":
        loop = asyncio.get_running_loop()
        sender = self._senders.get(key)
        if sender is None or sender.loop is not loop or sender.task.done():
            if self._client is None or self._client_loop is not loop:
                # a client belongs to the loop it was first used on
                self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
                self._client_loop = loop
            sender = self._senders[key] = _Sender(self, key, target, self.settings.alerts.webhook_queue_max)
        return sender

    async def drain(self) -> None:
        """Wait until every alert handed to a webhook sender of this event loop is done."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(s.queue.join() for s in list(self._senders.values()) if s.loop is loop))

    async def stop(self, grace_s: float | None = None) -> None:
        """The worker stops: give this loop's webhook senders up to
        ``grace_s`` (default ``alerts.webhook_stop_grace_s``; less when the
        hooks' timeouts end every held delivery sooner) to deliver what they
        hold, then ``aclose``. What is still
        held stays ``queued`` for redelivery; alerts handed over afterwards
        are left to it too. Returns at once when nothing is held."""
        loop = asyncio.get_running_loop()
        self._stopped_loop = loop
        senders = [s for s in self._senders.values() if s.loop is loop and not s.task.done()]
        held = sum(s.held for s in senders)
        if held:
            # every held alert of a target is done (delivered or failed) within its hook's bound
            grace_s = self.settings.alerts.webhook_stop_grace_s if grace_s is None else grace_s
            bound = min(grace_s, max(s.held * longest_delivery_s(s.target.hook) for s in senders))
            before = [dict(s.outcomes) for s in senders]
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.drain(), bound)
            except TimeoutError:
                pass
            ended: dict[str, int] = {}  # how the deliveries that ended meanwhile ended
            for s, was in zip(senders, before):
                for outcome, n in s.outcomes.items():
                    ended[outcome] = ended.get(outcome, 0) + n - was.get(outcome, 0)
            delivered, left = ended.get("delivered", 0), sum(s.held for s in senders)
            log.info(f"webhook senders drained at stop: {delivered} delivered, {left} left queued for redelivery",
                     extra={"held": held, "delivered": delivered, "failed": ended.get("failed", 0),
                            "rejected": ended.get("rejected", 0), "left_queued": left,
                            "seconds": round(time.monotonic() - started, 2), "grace_s": round(bound, 2)})
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the senders (what they still held stays ``queued`` in the
        store: redelivery sends it) and close the HTTP clients (the shared
        one and each https hook's own: ``streams.webhooks.aclose_clients``)."""
        loop = asyncio.get_running_loop()
        senders = [s for s in self._senders.values() if s.loop is loop]
        for s in senders:
            s.task.cancel()
        await asyncio.gather(*(s.task for s in senders), return_exceptions=True)
        self._senders = {k: s for k, s in self._senders.items() if s.loop is not loop}
        if self._client is not None and self._client_loop is loop:
            await aclose_clients(self._client)  # and the https hooks' own clients kept with it
            self._client = self._client_loop = None

    async def _webhook(self, key: str, target: Target, alert: Alert) -> DeliveryState | Literal["skipped"]:
        """Deliver and record; returns the recorded state ("skipped": it was already delivered)."""
        if await self._write("delivery", 1, lambda store: store.delivered(alert.alert_id, key)):
            return "skipped"  # redelivery (or another worker) got it there first
        assert self._client is not None
        detail = ""
        try:
            state = await deliver(target, alert, self._client, self.deliveries)
            metrics.WEBHOOKS.labels("delivered").inc()
        except WebhookHeld as e:  # not an attempt: nothing counted, redelivery sends it in its turn
            state, detail = failure_state(e), str(e)
            log.info("webhook delivery held", extra={"alert_id": alert.alert_id, "target": key, "reason": detail})
        except WebhookError as e:
            state, detail = failure_state(e), str(e)
            metrics.WEBHOOKS.labels(state.value).inc()  # failed | rejected
            log.error("webhook delivery failed",
                      extra={"alert_id": alert.alert_id, "target": key, "receiver": target_label(target.hook.url),
                             "error": detail})
        await self._write("delivery", 1, lambda store: store.mark_delivered(alert.alert_id, key, state, detail))
        return state


def unreadable(what: str, raw: Any, error: Exception) -> DeadLetter:
    """The dead letter for a sink record that does not read as its record
    (``what``: "snapshot", "alert", "dead letter"): stage ``sink``, reason
    ``malformed_json`` (not a JSON object) or ``schema_violation`` (the
    names ``streams.validate`` gives events). Where the record still names
    the event behind it (a snapshot's new sighting, a dead letter's event),
    the dead letter carries its id and offset, so the event is accounted
    for as dead-lettered rather than lost."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray, memoryview)) else str(raw)
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    event_id: str | None = None
    source: SourceRef | None = None
    if isinstance(doc, dict):
        event_id, source = named_event(doc.get("new_sighting") if what == "snapshot"
                                       else doc if what == "dead letter" else None)
    errors = getattr(error, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        why = f"{'.'.join(str(p) for p in first['loc']) or '(root)'}: {first['msg']}"
    else:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DeadLetter(
        event_id=event_id, stage="sink", reason="schema_violation" if isinstance(doc, dict) else "malformed_json",
        detail=f"unreadable {what} record ({why})",
        source=source, payload_excerpt=text[:512],
    )


def _read(kind: type[Rec], what: str, raws: list[bytes]) -> tuple[list[Rec], list[DeadLetter]]:
    """``raws`` read one by one as ``kind``: the records, and a dead letter
    (``unreadable``) for each one that does not read."""
    out: list[Rec] = []
    bad: list[DeadLetter] = []
    for raw in raws:
        try:
            out.append(kind.loads(raw))
        except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            dl = unreadable(what, raw, e)
            metrics.DEAD_LETTERS.labels(dl.stage, dl.reason).inc()
            log.error(f"unreadable {what} record; dead-lettered, the rest of its batch goes on",
                      extra={"reason": dl.reason, "detail": dl.detail, "event_id": dl.event_id})
            bad.append(dl)
    return out, bad


class _Sender:
    """One webhook target's queue and the task that delivers it, one alert
    at a time in the order they came: each target waits only on its own
    receiver (its ``timeout_s`` and retries), never on another's."""

    def __init__(self, sinks: Sinks, key: str, target: Target, maxsize: int):
        self.sinks, self.key, self.target = sinks, key, target
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Alert, asyncio.Future[None]]] = asyncio.Queue(maxsize)
        self.held = 0  # alerts queued or being sent
        self.outcomes: dict[str, int] = {}  # how its deliveries ended: a DeliveryState, or "skipped"
        self.task = self.loop.create_task(self._run(), name=f"webhook sender {key}")

    def put(self, alert: Alert) -> "asyncio.Future[None] | None":
        """Queue ``alert``; the future is done once its delivery is (None: the queue was full)."""
        done: asyncio.Future[None] = self.loop.create_future()
        try:
            self.queue.put_nowait((alert, done))
        except asyncio.QueueFull:
            # stays "queued" in the store; redelivery sends it (in order: a later alert of its
            # cluster waits for it)
            log.warning("webhook queue full; the alert waits in the findings store for redelivery",
                        extra={"alert_id": alert.alert_id, "target": self.key, "queued": self.queue.qsize()})
            return None
        self.sinks.deliveries.live_add(self.key, alert.alert_id)
        self.held += 1
        return done

    async def _run(self) -> None:
        while True:
            alert, done = await self.queue.get()
            outcome: str = DeliveryState.QUEUED  # what the record says unless the delivery ends
            try:
                outcome = await self.sinks._webhook(self.key, self.target, alert)
            except Exception:  # the record stays "queued": redelivery sends it
                log.exception("webhook delivery could not be recorded",
                              extra={"alert_id": alert.alert_id, "target": self.key})
            finally:
                self.held -= 1
                if outcome != DeliveryState.QUEUED:
                    self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                self.sinks.deliveries.live_discard(self.key, alert.alert_id)
                self.queue.task_done()
                if not done.done():
                    done.set_result(None)


# ---------------------------------------------------------------------------
# Elasticsearch bulk writes
# ---------------------------------------------------------------------------
Action = tuple[dict[str, Any], "dict[str, Any] | None"]  # bulk header line, source line (None for delete)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Item answers retried a bounded number of times only: a 500 (an error inside
# the shard about this document) or a 409 on an update (concurrent writers
# beat ``retry_on_conflict`` again and again) can come back every time, and
# one such document retried for ever stopped the sink for good. A 429 or a
# 502/503/504 item is the cluster's state (overload, a shard unavailable),
# not the document's: those wait as long as the cluster does.
CAPPED_ITEM_STATUS = frozenset({500, 409})
# Whole-request answers that do not say whether Elasticsearch applied the
# request: a gateway's (a proxy or load balancer between) gave up waiting or
# lost the upstream. 429 and 503 are Elasticsearch refusing before it applies.
AMBIGUOUS_STATUS = frozenset({502, 504})
ITEM_MAX_ATTEMPTS = 10  # with the doubling backoff: about two minutes at the defaults, then a dead letter


@dataclass
class BulkResult:
    ok: int = 0  # applied (created, updated, no-op) or already there
    created: int = 0  # create actions that made a new document (in an unanswered attempt of this call too)
    created_in: dict[str, int] = field(default_factory=dict)  # the same, by index (as the action named it)
    duplicates: int = 0  # create actions whose id was already there (redelivery)
    retried: int = 0  # item retries plus whole-request retries
    dead_lettered: int = 0
    split: int = 0  # requests refused whole (413, 400) and sent again as two halves


class BulkSink:
    """Sends bulk actions until each one is applied or dead-lettered.

    A request refused as a whole never loses its actions: 429/5xx and
    connection errors are retried with backoff; 413 (a proxy's or the
    server's body limit) and an Elasticsearch 400 about the request (an
    ``_id`` over 512 bytes refuses every action with it) are split in halves
    until the refused action is alone, which alone becomes a dead letter;
    any other refusal (401/403, a 404 from a wrong path, the API version) is
    raised held (``EsError.hold``), so ``Sinks`` keeps the batch and retries
    it rather than the agent acking what was never stored."""

    def __init__(self, client: Any, settings: FindingsSettings, *, dead_letters_index: str,
                 processed_index: str | None = None, sleep: Callable[[float], None] = time.sleep,
                 url: str = "the findings store"):
        self.es = client
        self.url = url  # as errors name it
        self.settings = settings
        self.dead_letters_index = dead_letters_index
        self.processed_index = processed_index
        self.sleep = sleep
        # the smallest request (NDJSON bytes) answered 413 so far: later chunks stay under it, so
        # a body limit below ``bulk_max_bytes`` (an ingress's 1 MiB) costs one split, not one a batch
        self.refused_bytes: int | None = None

    def send(self, actions: list[Action]) -> BulkResult:
        result = BulkResult()
        me = object()  # this call, in the clock of writes that are behind: agents share this sink
        try:
            for chunk in self._chunks(actions):
                self._send_chunk(chunk, result, me)
        finally:
            BEHIND.done(me)
        return result

    def max_bytes(self) -> int:
        """``bulk_max_bytes``, or less once a smaller request was answered 413."""
        cap = self.settings.bulk_max_bytes
        return cap if self.refused_bytes is None else max(1, min(cap, self.refused_bytes - 1))

    def _chunks(self, actions: list[Action]):
        """Split by action count and NDJSON bytes; one oversized action goes alone."""
        chunk: list[Action] = []
        size = 0
        for a in actions:
            n = len(_ndjson([a]))
            if chunk and (len(chunk) >= self.settings.bulk_max_actions or size + n > self.max_bytes()):
                yield chunk
                chunk, size = [], 0
            chunk.append(a)
            size += n
        if chunk:
            yield chunk

    def _backoff(self, delay: float, why: str, count: int, me: object) -> float:
        BEHIND.waiting(me)
        log.warning("findings sink behind: retrying", extra={"why": why, "items": count, "delay_s": delay})
        self.sleep(delay)
        return min(delay * 2, self.settings.retry_max_s)

    def _send_chunk(self, todo: list[Action], result: BulkResult, me: object, *, dead_letters: bool = True,
                    unanswered: set[int] | None = None) -> None:
        from elasticsearch import ApiError, ConnectionError as EsConnectionError, ConnectionTimeout

        delay = self.settings.retry_initial_s
        attempts: dict[int, int] = {}  # id(action) -> its answers in CAPPED_ITEM_STATUS so far
        # id(action) of actions sent in a request whose answer never came (a timeout, a dropped
        # connection, a gateway's 502/504): Elasticsearch may have applied them, so a 409 on
        # their ``create`` now is this call's own document, not one stored before it
        unanswered = set() if unanswered is None else unanswered
        while todo:
            try:
                # our own retrying (per item, never giving up), not the client's
                resp = self.es.options(max_retries=0, retry_on_status=()).bulk(operations=_lines(todo))
            except (EsConnectionError, ConnectionTimeout) as e:
                result.retried += 1
                unanswered.update(id(a) for a in todo)
                delay = self._backoff(delay, f"{type(e).__name__}", len(todo), me)
                continue
            except ApiError as e:
                if e.meta.status in RETRYABLE_STATUS:
                    if e.meta.status in AMBIGUOUS_STATUS:
                        unanswered.update(id(a) for a in todo)
                    result.retried += 1
                    delay = self._backoff(delay, f"HTTP {e.meta.status}", len(todo), me)
                    continue
                if self._refused_whole(e, todo, result, me, dead_letters, unanswered):
                    return
                from streams.es_client import explain

                # 401/403 (an operator fixes the credentials), a 404 or 405 (a wrong path or a
                # proxy in the way), the API version: nothing the actions carry, so nothing to
                # dead-letter; held, so ``Sinks`` retries the batch with backoff rather than the
                # agent acking what was never stored
                err = explain(e, self.url)
                err.hold = True
                raise err from None
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
                elif status == 404 and op == "delete":
                    # already gone (a superseded dead letter another writer removed first): what was asked
                    result.ok += 1
                    metrics.SINK_ITEMS.labels(index, "ok").inc()
                elif op == "delete" and status not in RETRYABLE_STATUS:
                    # a superseded dead letter that may not be deleted (a role without the ``delete``
                    # privilege: docs/elasticsearch.md): no event of its own to dead-letter; it stays
                    # beside its event's newer outcome, said here
                    log.error("superseded dead letter not deleted" + ("; grant the role the 'delete' index privilege"
                                                                       if status == 403 else ""),
                              extra={"action": action[0], "status": status, "error": r.get("error")})
                elif status == 409 and op == "create" and id(action) in unanswered:
                    # created by this call's unanswered request: an alert stored so is a new alert
                    # (its console line and count), not a redelivered one
                    result.ok += 1
                    result.created += 1
                    result.created_in[index] = result.created_in.get(index, 0) + 1
                    metrics.SINK_ITEMS.labels(index, "ok").inc()
                elif status == 409 and op == "create":
                    result.ok += 1
                    result.duplicates += 1
                    metrics.SINK_ITEMS.labels(index, "duplicate").inc()
                elif status in RETRYABLE_STATUS or status == 409:
                    # 409 on an update: concurrent writers beat retry_on_conflict; the script is idempotent
                    if status in CAPPED_ITEM_STATUS:
                        n = attempts[id(action)] = attempts.get(id(action), 0) + 1
                        if n >= ITEM_MAX_ATTEMPTS:
                            failed.append((action, {**r, "attempts": n}))
                            continue
                    retry.append(action)
                    metrics.SINK_ITEMS.labels(index, "retried").inc()
                elif _script_missing(r):
                    from streams.es_client import EsError

                    # the stored upsert script is not installed (a role without cluster ``manage``
                    # relies on an admin installing it): no document's fault, so none is
                    # dead-lettered; held until it is installed
                    raise EsError(f"Elasticsearch at {self.url}: {r['error'].get('reason')}: install the stored "
                                  "script as an admin (docs/elasticsearch.md, \"The role deepwatch needs\")", hold=True)
                else:
                    failed.append((action, r))
            # a superseded dead letter's delete that still fails names no event: logged, never dead-lettered
            # (a dead letter named after the deleted one's key was a third outcome of its event)
            for action, r in [(a, r) for a, r in failed if _op(a) == "delete"]:
                log.error("superseded dead letter not deleted", extra={"action": action[0], "error": r.get("error")})
            failed = [(a, r) for a, r in failed if _op(a) != "delete"]
            if failed:
                if dead_letters:
                    self._dead_letter(failed, result, me)
                else:
                    for action, r in failed:
                        log.error("dead letter refused by the findings store; logged here only",
                                  extra={"action": action[0], "error": r.get("error")})
            if retry:
                result.retried += len(retry)
                delay = self._backoff(delay, "items rejected", len(retry), me)
            todo = retry

    def _refused_whole(self, e: Any, todo: list[Action], result: BulkResult, me: object, dead_letters: bool,
                       unanswered: set[int]) -> bool:
        """A request refused for what it carries: 413 (too large for the
        server or a proxy in front of it, whatever the body says) or an
        Elasticsearch 400 other than the API-version one (request
        validation refuses every action of a request for one bad action:
        an ``_id`` over 512 bytes, elastic/elasticsearch#54549). Sent again
        as two halves until the refused action is alone; that one is
        dead-lettered (logged, for a dead letter's own request). False: not
        such a refusal, the caller raises it."""
        from streams.es_client import error_reason, es_error_body

        status = e.meta.status
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        if status == 413:
            size = len(_ndjson(todo))
            self.refused_bytes = size if self.refused_bytes is None else min(self.refused_bytes, size)
            kind = err.get("type") or "request_entity_too_large"
        elif status == 400 and es_error_body(e) and err.get("type") != "media_type_header_exception":
            kind = err.get("type") or "http_400"
        else:
            return False
        if len(todo) > 1:
            result.split += 1
            half = len(todo) // 2
            log.warning(f"findings bulk request refused whole (HTTP {status}); sending it again as two halves",
                        extra={"status": status, "items": len(todo), "error": error_reason(e)})
            for part in (todo[:half], todo[half:]):
                self._send_chunk(part, result, me, dead_letters=dead_letters, unanswered=unanswered)
            return True
        why = {"type": kind, "reason": f"the request of this action alone was refused (HTTP {status}): {error_reason(e)}"}
        if _op(todo[0]) == "delete":  # a superseded dead letter's delete names no event of its own
            log.error("superseded dead letter not deleted", extra={"action": todo[0][0], "error": why})
        elif dead_letters:
            self._dead_letter([(todo[0], {"status": status, "error": why})], result, me)
        else:
            log.error("dead letter refused by the findings store; logged here only",
                      extra={"action": todo[0][0], "error": why})
        return True

    def _dead_letter(self, failed: list[tuple[Action, dict[str, Any]]], result: BulkResult, me: object) -> None:
        from streams.es_docs import dead_letter_doc, dead_letter_key, processed_action
        from streams.records import SourceRef

        actions: list[Action] = []
        for (header, source), r in failed:
            op, meta = next(iter(header.items()))
            err = r.get("error") or {}
            reason = _refusal_reason(err, r.get("status"))  # a metric label: bounded, the text goes in detail
            detail = err.get("reason", str(err)) if isinstance(err, dict) else str(err)
            if r.get("attempts"):
                detail = f"still refused (HTTP {r.get('status')}) after {r['attempts']} attempts: {detail}"
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
        self._send_chunk(actions, BulkResult(), me, dead_letters=False)


# An Elasticsearch error type (``document_parsing_exception``): one of a fixed set of names
_ERROR_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,99}")


def _refusal_reason(err: Any, status: Any) -> str:
    """The dead letter's reason for a refused bulk item, which is also the
    ``reason`` label of ``deepwatch_dead_letters_total``: Elasticsearch's error
    type, else ``http_<status>``. Never the error's text: a proxy's or an
    older server's string error (an id, a document's values) was the label,
    one new series per refused item."""
    kind = err.get("type") if isinstance(err, dict) else None
    if isinstance(kind, str) and _ERROR_TYPE.fullmatch(kind):
        return kind
    return f"http_{status}" if isinstance(status, int) and 100 <= status <= 599 else "refused"


def _script_missing(r: dict[str, Any]) -> bool:
    """A bulk item refused because the stored script it names is not there."""
    err = r.get("error")
    return (isinstance(err, dict) and err.get("type") == "resource_not_found_exception"
            and "script" in str(err.get("reason") or ""))


def _op(action: Action) -> str:
    """The bulk operation of ``action``: create, index, update or delete."""
    return next(iter(action[0]))


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
