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

Elasticsearch's bulk writes (``BulkSink``) are ``streams.es_bulk``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, Literal, TypeVar

import httpx

from streams import metrics
from streams.es_bulk import BEHIND
from streams.records import Alert, ClusterSnapshot, DeadLetter, SourceRef, named_event
from streams.settings import Settings
from streams.store_errors import may_pass
from streams.findings import DeliveryState, FindingsStore, SinkWriter, open_findings
from streams.webhooks import (
    Deliveries, Target, WebhookError, WebhookHeld, aclose_clients, alert_score, alert_spread, deliver, desk_url,
    failure_state, hooks_by_key, longest_delivery_s, target_label, top_evidence,
)

log = logging.getLogger("deepwatch.alerts")

R = TypeVar("R")
Rec = TypeVar("Rec", ClusterSnapshot, DeadLetter, Alert)


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
        Each record is read on its own: one that does not read (a damaged
        one) is dead-lettered (``unreadable``) and the rest of the batch is
        stored; a newer deepwatch's raises ``NewerSchema``, for the stage to
        hold its batch (``streams.held_records``)."""
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
