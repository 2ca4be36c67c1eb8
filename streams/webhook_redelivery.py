"""Redelivery of webhook alerts that were not delivered (``streams.webhooks``
sends them live).

A delivery that still fails after its retries is not forgotten: the
``Redeliverer`` tries failed deliveries again every
``alerts.webhook_redeliver_s`` on the leader worker (its first round one period
after it starts), each target on its own, oldest first, the oldest
``REDELIVERY_PAGE`` alerts of a target a round. A delivery that fails again
holds back the later alerts of its own cluster (a receiver that comes back
gets every alert of a cluster in level order) but not those of other
clusters: one alert a receiver keeps failing on does not hold every later one
back. After ``REDELIVERY_GIVE_UP`` failures in a row the round stops for that
target (it looks down; the next round tries again). While an older alert of a
cluster is undelivered, a newer live one queues behind it rather than
overtaking it (``Redeliverer.earlier_pending``, the live senders' ordering
gate). Rejected deliveries wait for ``deepwatch redeliver TARGET``; records
kept under a hook's earlier keys are redelivered as its own and moved onto
its key as they are (one record per alert and hook), and keys no hook serves
are named in a warning (``Redeliverer.warn_stranded``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import httpx

from streams import metrics
from streams.findings import DeliveryState
from streams.records import Alert
from streams.settings import Settings
from streams.shared_handle import once
from streams.webhooks import (
    Deliveries, Target, WebhookError, WebhookHeld, WebhookRejected, aclose_clients, failure_state, hooks_by_key,
    legacy_keys, post, refused_receivers, stranded_keys, target_key, target_label,
)

log = logging.getLogger("streams.webhooks")  # one logger for every webhook line, live or redelivered

REDELIVERY_GIVE_UP = 3  # failures in a row after which a redelivery round stops for a target (it looks down)
REDELIVERY_PAGE = 500  # undelivered alerts one redelivery round reads per target (its oldest); the rest wait their round


class Redeliverer:
    """Retries failed webhook deliveries from the findings store (and
    ``queued`` ones a stopped worker left), each target on its own.
    ``deliveries``: what it shares with the worker's live senders (its own
    when not given)."""

    def __init__(self, settings: Settings, store_factory: Callable[[], Any], deliveries: Deliveries | None = None):
        self.settings = settings
        self.deliveries = deliveries if deliveries is not None else Deliveries()
        self._db = once(store_factory)  # opened in a worker thread on first use, never on the event loop
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._rounds: dict[str, asyncio.Task[int]] = {}  # target key -> its latest round
        self._stranded: list[str] = []  # what warn_stranded last warned about

    async def earlier_pending(self, target: Target, alert: Alert) -> bool:
        names = (target.key, *legacy_keys(target.hook))
        try:
            return await asyncio.to_thread(
                lambda: any(self._db().undelivered_before(n, alert.cluster_id, alert.level) for n in names))
        except Exception:  # the gate only orders deliveries; it must never stop one
            log.exception("webhook ordering check failed")
            return False

    def start_rounds(self) -> dict[str, asyncio.Task[int]]:
        """Start a round for each target whose last one has ended, and return
        them. Each target on its own: one that is slow, hangs until its
        timeout or asked to wait (Retry-After) neither holds back another's
        round nor gets a second one started beside its own."""
        loop = asyncio.get_running_loop()
        started: dict[str, asyncio.Task[int]] = {}
        for key, target in hooks_by_key(self.settings).items():
            running = self._rounds.get(key)
            if running is not None and not running.done() and running.get_loop() is loop:
                continue
            started[key] = self._rounds[key] = loop.create_task(self._round(key, target),
                                                                name=f"webhook redelivery {key}")
        return started

    async def run_once(self) -> int:
        """Deliver what failed before; returns how many got through (in the
        rounds this call started)."""
        started = self.start_rounds()
        done = sum(await asyncio.gather(*started.values())) if started else 0
        await self.refresh_gauge()
        return done

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:  # a client belongs to its event loop
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
            self._client_loop = loop
        return self._client

    def _todo(self, key: str, target: Target) -> list[tuple[Alert, tuple[str, ...]]]:
        """What to send to ``key`` this round: the oldest ``REDELIVERY_PAGE``,
        oldest first, each with any other target name its record is kept
        under (``legacy_keys``: the hook's key before its identity was its
        key or before an operator moved them to it; Elasticsearch keeps the
        oldest records by URL). The rest waits for the next rounds."""
        store = self._db()
        older = 2 * self.settings.alerts.webhook_redeliver_s
        found: dict[str, tuple[Alert, tuple[str, ...]]] = {}
        for name in (key, *legacy_keys(target.hook)):
            also = () if name == key else (name,)
            for a in [*store.failed_deliveries(name, limit=REDELIVERY_PAGE),
                      *store.queued_deliveries(name, older_than_s=older, limit=REDELIVERY_PAGE)]:
                was = found.get(a.alert_id)
                found[a.alert_id] = (a, also) if was is None else (was[0], tuple(dict.fromkeys((*was[1], *also))))
        return sorted(found.values(), key=lambda p: (p[0].created_at, p[0].level, p[0].alert_id))[:REDELIVERY_PAGE]

    async def _mark(self, alert: Alert, key: str, also: tuple[str, ...], state: DeliveryState, detail: str = "") -> None:
        """Record the outcome under the hook's key and move the alert's
        records under its earlier keys (``also``) onto it: written under
        both, each old alert counted twice per hook (the redeliver summary,
        the undelivered gauge, `deepwatch alerts`) for one POST."""
        await asyncio.to_thread(lambda: self._db().mark_delivered(alert.alert_id, key, state, detail, moved_from=also))

    async def _round(self, key: str, target: Target) -> int:
        try:
            return await self._deliver_waiting(key, target)
        except Exception as e:  # the next round tries again
            log.error("webhook redelivery round failed for a target; the next round tries again",
                      extra={"target": key, "error": f"{type(e).__name__}: {e}"})
            return 0

    async def _deliver_waiting(self, key: str, target: Target) -> int:
        if self.deliveries.held_for(key):
            return 0  # the receiver asked to wait (Retry-After)
        client = self._http()
        shown = target_label(target.hook.url)
        # Every store call in a thread, opening included: SQLite may
        # wait on a lock, and the event loop must never wait with it.
        todo = await asyncio.to_thread(self._todo, key, target)
        blocked: set[str] = set()  # clusters with an earlier alert still undelivered: theirs wait
        in_a_row = done = 0
        for alert, also in todo:
            if alert.cluster_id in blocked or self.deliveries.is_live(key, alert.alert_id):
                blocked.add(alert.cluster_id)  # a live sender has it in hand: the cluster's later ones wait
                continue
            try:
                state = await post(target, alert, client, self.deliveries)
            except WebhookHeld:
                break  # asked to wait (Retry-After): the rest waits too
            except WebhookRejected as e:
                await self._mark(alert, key, also, failure_state(e), str(e))
                metrics.WEBHOOKS.labels("rejected").inc()
                log.error("webhook receiver rejected an alert for good; going on with the next",
                          extra={"alert_id": alert.alert_id, "target": key, "receiver": shown, "error": str(e)})
                in_a_row = 0  # the receiver answered
                continue
            except WebhookError as e:
                await self._mark(alert, key, also, failure_state(e), str(e))
                metrics.WEBHOOKS.labels("failed").inc()
                blocked.add(alert.cluster_id)  # keep the cluster's order: its later alerts wait for this one
                in_a_row += 1
                log.warning("webhook redelivery failed; will retry",
                            extra={"alert_id": alert.alert_id, "target": key, "receiver": shown, "error": str(e)})
                if in_a_row >= REDELIVERY_GIVE_UP:
                    break  # the receiver looks down: the next round tries again
                continue
            await self._mark(alert, key, also, state)
            metrics.WEBHOOKS.labels("delivered").inc()
            log.info("webhook redelivered", extra={"alert_id": alert.alert_id, "target": key, "receiver": shown})
            in_a_row = 0
            done += 1
        return done

    async def refresh_gauge(self) -> None:
        """``deepwatch_webhook_undelivered`` from the store (a hook's
        ``legacy_keys`` counted as its own), and a warning naming what no
        configured hook serves (``stranded_keys``) when that changes."""
        targets = hooks_by_key(self.settings)
        try:
            counts = await asyncio.to_thread(lambda: self._db().undelivered_counts())
        except Exception:
            log.exception("counting undelivered webhook deliveries failed")
            return
        merged: dict[str, dict[DeliveryState, int]] = {}
        for key, target in targets.items():
            for name in (key, *legacy_keys(target.hook)):
                for state, n in counts.get(name, {}).items():
                    merged.setdefault(key, {})[state] = merged.setdefault(key, {}).get(state, 0) + n
        self.deliveries.export_undelivered(merged, list(targets))
        self.warn_stranded(counts)

    def warn_stranded(self, counts: dict[str, dict[DeliveryState, int]]) -> list[str]:
        """Log (once per change) the target keys with waiting deliveries
        that no configured hook serves, and how to hand them to one."""
        stranded = stranded_keys(self.settings, counts)
        if stranded and stranded != self._stranded:
            waiting: dict[str, int] = {}
            for k in stranded:
                # an Elasticsearch document from before targets were keyed names its whole URL
                # (a token in it, often): named by that URL's key, never the URL
                shown = target_key(k)
                waiting[shown] = waiting.get(shown, 0) + sum(counts[k].values())
            log.warning(
                "undelivered webhook alerts are kept under target keys no configured hook serves: "
                + ", ".join(f"{k} ({n})" for k, n in waiting.items())
                + "; nothing sends them. To hand them to a hook, add the key to its "
                  "alerts.webhooks[].previous_keys (`deepwatch redeliver` lists the keys)",
                extra={"targets": list(waiting)})
        self._stranded = stranded
        return stranded

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        running = [t for t in self._rounds.values() if not t.done() and t.get_loop() is loop]
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self._client is not None:
            await aclose_clients(self._client)  # and the https hooks' own clients kept with it
            self._client = self._client_loop = None


async def warn_refused_receivers(settings: Settings) -> list[str]:
    """Log a warning per configured hook whose receiver address every
    delivery would refuse (``webhooks.refused_receivers``); returns the lines."""
    try:
        lines = await refused_receivers(settings)
    except Exception:  # a check at start; deliveries say the same per alert
        log.exception("checking the webhook receivers' addresses failed")
        return []
    for line in lines:
        log.warning(line)
    return lines


def install_redelivery(app: Any, settings: Settings, deliveries: Deliveries) -> Redeliverer | None:
    """Register the redelivery timer on a Faust app (leader worker only, so
    two workers do not both resend), the undelivered gauge's timer (every
    worker: each exports the same counts from the shared store), a warning
    at start per hook whose receiver address is refused
    (``warn_refused_receivers``) and the ordering gate for the live
    deliveries that share ``deliveries`` (the worker's
    ``streams.sinks.Sinks``)."""
    if not settings.alerts.webhooks:
        return None
    from streams.findings import open_findings

    # the store the alert sink records deliveries in (SQLite or Elasticsearch)
    redeliverer = Redeliverer(settings, lambda: open_findings(settings.findings.url, settings.data_dir, settings),
                              deliveries)
    deliveries.gate = redeliverer

    @app.timer(interval=settings.alerts.webhook_redeliver_s, on_leader=True)
    async def redeliver_failed_webhooks() -> None:
        # each target's round runs on its own task: the timer waits for none of them
        # (a target that hangs would delay the next tick for every other)
        try:
            redeliverer.start_rounds()
        except Exception:  # the next tick tries again; a timer that raises stops for good
            log.exception("webhook redelivery round failed to start")

    @app.timer(interval=settings.alerts.webhook_redeliver_s)
    async def count_undelivered_webhooks() -> None:
        await redeliverer.refresh_gauge()  # logs its own failures

    @app.task
    async def check_stranded_webhook_deliveries() -> None:
        # at start, not one period later: deliveries a URL or name change left
        # behind are named (``Redeliverer.warn_stranded``), and the gauge set
        await redeliverer.refresh_gauge()  # logs its own failures

    @app.task
    async def check_refused_webhook_receivers() -> None:
        # at start: a receiver on a private address without alerts.allow_private_webhooks
        # otherwise turns every alert into a rejected one with nothing said
        await warn_refused_receivers(settings)

    return redeliverer
