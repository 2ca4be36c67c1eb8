"""The cluster stage: the single writer that turns cluster ops into cluster
decisions, as a unit of its own.

``ClusterStage`` owns everything the ``cluster`` agent in ``streams.app``
used to keep in a closure: the ``ClusterEngine`` (rebuilt from the changelog
table after a rebalance), the table itself, seeding a fresh table from
``streams.engine_state`` (and asking the models again for the seeded
clusters whose requests the old broker took with it), eviction to the cold
tier and revival from it. The app (``streams.app``) only wires it: topics
in, topics out, the rebalance signal.

Ops come in batches (``settings.batch``: up to ``cluster_max_ops``, or what
arrived within ``cluster_within_s``). Each op is decoded and applied through
``ClusterEngine.apply`` in offset order, exactly as one at a time; what a
batch changes is the streaming cost around them:

* the states the batch wrote reach the engine state store in one
  transaction and the table once per cluster (its last state: every state
  carries the ``applied_offset`` of the last op that touched it) -- engine
  state store first, then the table, so a crash in between replays the
  batch, which ``applied_offset`` makes idempotent. In the table the
  survivors of merges go first, the clusters merged into them last: a stop
  in between leaves survivors that list clusters still live, which the
  rebuild that follows finds and the next op finishes
  (``ClusterEngine.rebuild``); the other way round left a cluster marked
  merged into a survivor that never got its counts;
* the ops are acked only after those writes and after every snapshot,
  detect request, alert and dead letter of the batch was handed to the
  producer (whose flush precedes every offset commit), so a crash anywhere
  in a batch re-reads all of it.

Snapshots are all sent, not only each cluster's last: a snapshot carries the
sighting its revision added (``new_sighting``), which is how sightings reach
the findings store. Alerts are never coalesced either. While a batch is
applied, ``get_state`` reads the batch's own pending states first, so op
*k+1* sees what op *k* did. An op that fails becomes one dead letter (stage
``cluster``) and the rest of the batch goes on; its pending states are the
ones before it, as a failed op leaves the table today. One the engine
refused up front (``InvalidOp``: malformed hashes) or the record refused
(non-finite evidence, say: ``detectors.base.Evidence``), reason
``invalid_op``, changed nothing; any other failure (reason
``internal_error``) may have changed the index half-way, so
the batch so far is written and the index rebuilt from the table. A batch
whose writes fail makes every op of it not yet written a dead letter and
rebuilds the index from the table -- unless the engine state store could not
write for a reason that passes (``streams.store_errors.may_pass``: the file
locked past its busy timeout, the disk full or failing): the events are fine, so the index is rebuilt and the
whole batch applied again after a backoff, until it is written
(``applied_offset`` makes the ops already written no-ops): dead-lettering them
lost valid events for good, and a replay's resend made some of them sightings
as well.

An op a newer deepwatch wrote (``records.NewerSchema``: a ``schema_version``
this one does not know) is not dead-lettered: the ops before it are applied
and sent, then the stage holds it (``_hold_newer``): one critical line, and
the batch stays unacked, so uncommitted, until this worker stops or the
partition moves -- an upgraded worker applies it and the ops after it, in
order, and the ops before it again (``applied_offset`` makes that a no-op).
Not a dead letter: that keeps 512 bytes of the op and nothing sends a dead
letter again, so the event was lost; not skipped either: the single writer
applies ops in offset order. Fields a newer writer added within a version
are ignored (``ClusterOp.loads``): such an op applies as ever.

The index is rebuilt (after a rebalance, a failed op or batch) off the event
loop, in a thread, before the ops that need it (``_ensure_engine``): at
scale a rebuild takes minutes, and on the loop it held commits, the broker
heartbeat and ``/healthz``, whose 503 restarted the pod into another rebuild.

Past one writer: see ``streams.clustering`` (module docstring) and the
README's "The single writer at scale" (in "Clusters") for when one writer
stops being enough and how candidate search splits by hash bands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, Awaitable, Callable

from detectors.neardup.localized import PixelSource
from streams import metrics
from streams.clustering import ClusterEngine, ClusterState, InvalidOp, Outcome, fit, model_request
from streams.engine_state import SqliteEngineState
from streams.held_records import hold_newer
from streams.records import ClusterOp, DeadLetter, DetectRequest, NewerSchema, SourceRef, named_event
from streams.settings import Settings
from streams.store_errors import may_pass

log = logging.getLogger(__name__)

SendDead = Callable[[DeadLetter], Awaitable[None]]
# A batch the engine state store could not write is applied again after this
# long, doubling up to the max (as the findings sinks back off).
STORE_RETRY_INITIAL_S, STORE_RETRY_MAX_S = 0.5, 30.0
# Model requests without any result for this long are worth a warning: a CPU
# detect worker answers a backlog of new clusters within minutes.
MODELS_OVERDUE_S = 600


class ClusterStage:
    def __init__(
        self,
        settings: Settings,
        table: Any,
        states: SqliteEngineState,
        *,
        updates: Any,
        detect_requests: Any,
        alerts: Any,
        send_dead: SendDead,
        pixels: PixelSource | None = None,
    ):
        self.settings = settings
        self.pixels = pixels  # borderline joins re-verified on these (``ClusterIndex``); None: the records alone
        self.table = table  # Faust table (or any mapping of bytes -> bytes) of ClusterState JSON
        self.states = states
        self.updates, self.detect_requests, self.alerts = updates, detect_requests, alerts
        self.send_dead = send_dead
        self._engine: ClusterEngine | None = None
        self._stale_marks = 0  # how often the index was marked stale (``_stale``): a rebuild it overtook is dropped
        self._stale = True
        self._seeded: dict[str, ClusterState] = {}
        self._pending: dict[str, bytes] = {}  # states the batch being applied wrote, not yet in the table
        self._away: set[str] = set()  # ... those of them marked ``merged_into``: written last (``_write``)
        # ... and those states as objects: the next op of the batch takes them
        # as they are instead of parsing them again (a viral cluster's state is
        # hundreds of KB: its parse was most of each op's time). ``_read``: the
        # clusters the op being applied asked for, whose objects it may have
        # changed -- if it fails, they are parsed again from ``_pending``.
        self._live: dict[str, ClusterState] = {}
        self._read: set[str] = set()
        # Seeded clusters still waiting for a model result: their requests were
        # on the old broker, so they are asked again, once (``_ask_again``).
        self._asked: set[str] = set()
        self._to_ask: list[DetectRequest] = []
        # Since when model requests went out with no result back (None: every
        # request since the last result is younger, or none was sent): a
        # deployment without a detect worker leaves every cluster waiting,
        # which nothing else here would say (``MODELS_OVERDUE_S``).
        self._unanswered_since: float | None = None
        self._overdue_said = False
        self._newer: NewerSchema | None = None  # why ``_apply_all`` stopped at a newer writer's op

    # -- state ----------------------------------------------------------------
    async def on_rebalance(self, sender: Any = None, **kwargs: Any) -> None:
        # The table may have changed hands: rebuild the index. Always, not only
        # when this worker's partitions differ: a worker that lost the table's
        # partition and got it back between two signals (dropped from the group
        # and rejoined) sees the same partitions, over a table recovery filled
        # with another writer's states.
        self._stale = True

    @property
    def _stale(self) -> bool:
        """The index must be rebuilt from the table before the next op."""
        return self._stale_now

    @_stale.setter
    def _stale(self, stale: bool) -> None:
        if stale:
            self._stale_marks += 1
        self._stale_now = stale

    def get_state(self, cluster_id: str) -> ClusterState | None:
        live = self._live.get(cluster_id)
        if live is not None:
            self._read.add(cluster_id)
            return live
        # A state the batch being applied wrote is newer than the table's.
        raw = self._pending.get(cluster_id) or self.table.get(cluster_id.encode())
        if raw:
            return ClusterState.loads(raw)
        if cluster_id in self._seeded:
            # a copy: the op may change it and then fail, and the seed must
            # stay as the store had it (for the next op, and a rebuild)
            return self._seeded[cluster_id].model_copy(deep=True)
        archived = self.states.get_archived(cluster_id)  # evicted earlier: its exact state
        return ClusterState.loads(archived) if archived else None

    @property
    def engine(self) -> ClusterEngine:
        """The index, rebuilt here and now when it is due. The agent rebuilds
        it off the event loop before it applies a batch (``_ensure_engine``):
        this is the fallback, for the ops of a batch after one that made the
        index stale when that rebuild could not run, and for callers outside
        the agent (tests, benches)."""
        if self._engine is None or self._stale:
            self._rebuild()
        return self._engine

    def _rebuild(self) -> ClusterEngine:
        """Rebuild the index in the calling thread (``engine``)."""
        return self._install(self._build(self._table_rows(), dict(self._seeded)))

    async def _ensure_engine(self) -> None:
        """Rebuild the index, when due, in a thread: at scale a rebuild takes
        minutes (about 30 s per million members), and on the event loop it
        held commits, the broker heartbeat and ``/healthz`` (503 past
        ``metrics.LIVENESS_S``: the pod restarted, and rebuilt again).

        The table is read here, on the loop, in one go (Faust's table is the
        loop's; that read is the cheap part); parsing the states, the engine
        state store's reads and indexing run in the thread (the store's
        connection is not bound to a thread, and nothing else uses it while
        the agent waits here, before its batch). What the rebuild changes on
        the stage (the seeds, the model requests to send again) is set here
        once it returned. A rebalance that began while it ran (the table may
        change hands, or be refilled by recovery) drops the result and it is
        done again, from the table as that rebalance left it.

        A rebuild that fails for a reason that passes (the store locked)
        raises, for ``handle_batch`` to back off; one that fails otherwise is
        logged and left to the batch, whose ops rebuild the index through
        ``engine`` (each failing one a dead letter, as before)."""
        while self._engine is None or self._stale:
            app = getattr(self.table, "app", None)  # a Faust table's app; None for a plain mapping
            while _rebalancing(app):  # recovery may be refilling the table: wait for it to finish
                await asyncio.sleep(REBALANCE_POLL_S)
            marks, rebalances = self._stale_marks, getattr(app, "rebalancing_count", None)
            rows = self._table_rows()
            try:
                built = await asyncio.to_thread(self._build, rows, dict(self._seeded))
            except Exception as e:
                if may_pass(e):
                    raise
                log.exception("cluster index not rebuilt off the event loop; the batch rebuilds it")
                return
            if (self._stale_marks != marks or getattr(app, "rebalancing_count", None) != rebalances
                    or _rebalancing(app)):
                log.info("a rebalance came while the cluster index was rebuilt: rebuilt again from the table",
                         extra={"clusters": built.engine.index.n_clusters})
                continue
            self._install(built)

    def _table_rows(self) -> list[tuple[Any, bytes]]:
        """The table's states as they are now (tombstones left out)."""
        return [(k, v) for k, v in self.table.items() if v]

    def _build(self, rows: list[tuple[Any, bytes]], seeded: dict[str, ClusterState]) -> "_Built":
        """A new index from the table's ``rows`` (and the stage's ``seeded``
        clusters), or from the engine state store when the table is empty.
        Touches nothing of the stage but the engine state store (a thread
        may run it: ``_ensure_engine``); ``_install`` puts the result in place."""
        eng = ClusterEngine(self.settings, pixels=self.pixels)
        states = _loadable(rows, "table")
        new_seeds: dict[str, ClusterState] | None = None
        waiting: list[DetectRequest] = []
        if states:
            # Seeded clusters not written yet are in no table: a rebuild
            # (rebalance, failed batch) after a fresh broker's seeding keeps
            # them, or their pictures would found new clusters from zero.
            in_table = {s.cluster_id for s in states}
            states += [s for cid, s in seeded.items() if cid not in in_table]
        else:
            # An empty table over an existing data dir is a fresh broker: carry
            # on from the engine state store. Its offsets belong to the old
            # broker, so they are cleared (the cold tier's too: rewriting them
            # cleared is the same whether or not this rebuild is the one kept).
            states = [_fresh(s) for s in _loadable(self.states.hot(), "engine state")]
            new_seeds = {s.cluster_id: s for s in states}
            stale = [_fresh(s) for s in _loadable(self.states.archived(), "cold tier")]
            self.states.archive({s.cluster_id: s.dumps() for s in stale})
            if eng.models_enabled:
                waiting = _waiting([*states, *stale])
        eng.rebuild(states)
        # Clusters archived but not hot were evicted earlier: only their hashes
        # come back, into the cold index.
        hot = {s.cluster_id for s in states}
        # Only the most recently evicted, which the cold index keeps
        # (``ClusterEngine.trim_cold``), are read, in eviction order.
        recent = self.states.archived(newest=self.settings.dedupe.cold_max_clusters)
        for archived in _loadable(((cid, raw) for cid, raw in recent if cid not in hot), "cold tier"):
            if archived.merged_into is None:
                eng.add_cold(archived.cluster_id, archived.members)
        return _Built(eng, new_seeds, waiting)

    def _install(self, built: "_Built") -> ClusterEngine:
        """Put a rebuilt index in place, with what its rebuild found: the
        seeds of a fresh table, and the model requests to send again."""
        if built.seeded is not None:
            self._seeded = built.seeded
            self._ask_again(built.waiting)
        self._engine = built.engine
        self._stale = False
        log.info("cluster index rebuilt",
                 extra={"clusters": built.engine.index.n_clusters, "seeded": len(self._seeded)})
        return built.engine

    def _ask_again(self, requests: list[DetectRequest]) -> None:
        """Queue, for the batch being handled, the model requests
        (``_waiting``) of the seeded clusters still waiting for one. A fresh
        broker has no ``detect-requests`` of the old one: a cluster left
        waiting (a replay with ``--no-wait-models``, a broker restarted) was
        never answered and would wait for good. Each is asked once per stage,
        however often the table is seeded again (a rebalance before anything
        was written)."""
        for req in requests:
            if req.cluster_id not in self._asked:
                self._asked.add(req.cluster_id)
                self._to_ask.append(req)
        if self._to_ask:
            log.info("asking the models again for clusters an earlier broker's requests left waiting",
                     extra={"clusters": len(self._to_ask)})

    # -- the agent ---------------------------------------------------------------
    async def run(self, stream: Any) -> None:
        """Consume ``stream`` in batches, acking each batch's events only once
        everything it produced is written and handed to the producer."""
        batch = self.settings.batch
        async for events in stream.noack_take(batch.cluster_max_ops, within=batch.cluster_within_s):
            await self.handle_batch([(e.value, e.message) for e in events])
            for e in events:
                await stream.ack(e)

    async def handle(self, value: bytes, msg: Any) -> None:
        """One op as a batch of one (the op-by-op behaviour batches are checked against)."""
        await self.handle_batch([(value, msg)])

    async def handle_batch(self, items: list[tuple[bytes, Any]]) -> None:
        started = time.perf_counter()
        for _, msg in items:
            metrics.observe_lag("cluster", getattr(msg, "timestamp", None))
        delay = STORE_RETRY_INITIAL_S
        outs: list[Outcome] = []
        failed: list[tuple[tuple[bytes, Any], str, str]] = []
        todo = items
        app = getattr(self.table, "app", None)  # a Faust table's app; None for a plain mapping
        rebalances = getattr(app, "rebalancing_count", None)
        while True:
            try:
                # Off the event loop (``_ensure_engine``), before the batch and
                # again for the rest of a batch an op made the index stale in.
                await self._ensure_engine()
                todo = _still_owned(app, rebalances, todo)
                done, dead, todo = self._apply_all(todo)
            except Exception as e:
                if not may_pass(e):
                    raise
                log.error(f"engine state not written ({e}); the batch of {len(todo)} ops is held and applied "
                          f"again in {delay:g}s", extra={"ops": len(todo), "error": str(e), "delay_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)
                continue
            outs += done
            failed += dead
            if not todo or self._newer is not None:
                break
        for out in outs:
            for snap in out.snapshots:
                await self.updates.send(key=snap.cluster_id.encode(), value=snap.dumps())
            for req in out.detect_requests:
                await self._ask(req)
            for alert in out.alerts:
                await self.alerts.send(key=alert.cluster_id.encode(), value=alert.dumps())
        asking, self._to_ask = self._to_ask, []
        for req in asking:
            await self._ask(req)
        self._say_if_models_overdue()
        for (value, msg), reason, detail in failed:
            src = SourceRef(topic=msg.topic, partition=msg.partition, offset=msg.offset)
            await self._dead(src, value, reason, detail)
        eng = self._engine
        if eng is not None and not self._stale:  # else the next batch rebuilds it (off the loop) and sets them
            metrics.CLUSTERS.set(eng.index.n_clusters)
            metrics.CLUSTER_MEMBERS.set(eng.index.n_members)
        # Per op, as before batching: each op of the batch is observed with its share of the batch's
        # time, so the histogram's count stays ops and its sum stays the stage's busy time.
        share = (time.perf_counter() - started) / max(1, len(items))
        for _ in items:
            metrics.STAGE_SECONDS.labels("cluster").observe(share)
        for out in outs:
            metrics.EVENTS.labels("cluster", "duplicate" if out.duplicate_event else "ok").inc()
        if self._newer is not None:
            await self._hold_newer(app, rebalances, todo)

    async def _hold_newer(self, app: Any, rebalances: int | None, held: list[tuple[bytes, Any]]) -> None:
        """Hold ``held`` (its first op a newer deepwatch's: module docstring)
        until this worker stops (cancelled here: the batch stays unacked) or
        the partition moves to another worker (returns: acking then commits
        nothing, ``_still_owned``)."""
        error, self._newer = self._newer, None
        await hold_newer("cluster op", held[0][1], {"ops": len(held)}, error,
                         lambda: bool(_still_owned(app, rebalances, held)))

    async def _ask(self, req: DetectRequest) -> None:
        await self.detect_requests.send(key=req.cluster_id.encode(), value=req.dumps())
        metrics.MODEL_REQUESTS.inc()
        if self._unanswered_since is None:
            self._unanswered_since = time.monotonic()

    def _answered(self) -> None:
        self._unanswered_since, self._overdue_said = None, False

    def _say_if_models_overdue(self) -> None:
        """Once, when model requests went unanswered for ``MODELS_OVERDUE_S``:
        the pixel model is on by default, and without a detect worker every
        cluster waits for it with nothing but ``models_pending`` to show."""
        since = self._unanswered_since
        if since is None or self._overdue_said or time.monotonic() - since < MODELS_OVERDUE_S:
            return
        self._overdue_said = True
        log.warning(f"no model result for {MODELS_OVERDUE_S // 60} minutes after a model request: is a detect worker "
                    "running (`deepwatch worker --role detect`)? Meanwhile clusters wait for their model evidence "
                    "(models_pending)", extra={"models": list(self.settings.detect.models)})

    def _apply_all(self, items: list[tuple[bytes, Any]]) -> tuple[
            list[Outcome], list[tuple[tuple[bytes, Any], str, str]], list[tuple[bytes, Any]]]:
        """Apply a batch in order and write what it changed; no await in here,
        so no rebalance can swap the engine half-way through what it applies.
        Returns the outcomes of the ops that applied and were written, the
        failed ops with their dead letter's reason and detail, and the ops
        left to apply: an op that failed half-way makes the index stale
        (written up to it), and the rest of the batch is handed back, to be
        applied once ``handle_batch`` rebuilt the index off the event loop
        (rebuilt here, through ``engine``, it held the loop). An op of a
        newer writer ends the batch there too, setting ``_newer``: it and
        the ops after it are handed back, for ``handle_batch`` to hold."""
        written: list[Outcome] = []
        unwritten: list[tuple[tuple[bytes, Any], Outcome]] = []  # applied since the last flush
        failed: list[tuple[tuple[bytes, Any], str, str]] = []

        def flush() -> None:
            writes, self._pending = self._pending, {}
            away, self._away = self._away, set()
            self._live = {}
            self._write(writes, away)
            written.extend(out for _, out in unwritten)
            unwritten.clear()

        self._pending, self._live, self._away = {}, {}, set()
        self._newer = None
        done = 0  # items attempted so far
        try:
            for value, msg in items:
                if done and self._stale:
                    break  # written up to here (``flush`` above): the rest after a rebuild
                done += 1
                self._read = set()
                applying = False
                try:
                    op = ClusterOp.loads(value)
                    applying = True
                    out = self.engine.apply(op, msg.offset, self.get_state)
                    if op.kind == "detection":
                        self._answered()
                    writes = {cid: fit(st) for cid, st in out.writes.items()}
                except NewerSchema as e:
                    # held, with the ops after it (``handle_batch``). None of it applied: only
                    # ``ClusterOp.loads`` raises it (a newer stored state is ``NewerStateVersion``,
                    # ``clustering``), before the engine sees the op
                    self._newer = e
                    done -= 1
                    break
                except Exception as e:  # a bug or a poison op must not stop the single writer
                    if may_pass(e):
                        raise  # the store, not the op (reading an archived state): the batch is held
                    log.exception("cluster op failed", extra={"offset": msg.offset})
                    # an op the record refuses (a non-finite evidence weight, say) is as invalid as one
                    # the engine refuses
                    reason = "invalid_op" if isinstance(e, InvalidOp) or not applying else "internal_error"
                    failed.append(((value, msg), reason, f"{type(e).__name__}: {e}"))
                    for cid in self._read:  # it may have changed them half-way: the states before it
                        self._live.pop(cid, None)
                    if applying and not isinstance(e, InvalidOp):
                        # ... and the index too (a member or cluster no state
                        # has): rebuild it from the states before this op
                        flush()
                        self._stale = True
                    continue
                self._pending.update(writes)
                self._live.update(out.writes)
                self._away.update(cid for cid, st in out.writes.items() if st.merged_into is not None)
                unwritten.append(((value, msg), out))
                if self.engine.evict_due():
                    flush()  # eviction reads and deletes table entries: they must be current
                    self._evict()
            flush()
        except Exception as e:  # the store or the table refused the batch's writes
            self._pending, self._live, self._away = {}, {}, set()
            self._stale = True  # the index is ahead of the table now: rebuild it from the table
            if may_pass(e):
                raise  # handle_batch holds the batch and applies it again
            log.exception("cluster batch not written", extra={"ops": len(items)})
            detail = f"{type(e).__name__}: {e}"
            failed += [(item, "internal_error", detail) for item, _ in unwritten]
            if self._newer is not None:  # still held, not dead-lettered: it was never applied
                return written, failed, items[done:]
            failed += [(item, "internal_error", detail) for item in items[done:]]
            return written, failed, []
        return written, failed, items[done:]

    def _write(self, writes: dict[str, bytes], away: set[str] = frozenset()) -> None:
        """The engine state store (one transaction), then the table: first
        every cluster not in ``away`` (those marked ``merged_into``), then
        those, so a stop half-way leaves a merge ``ClusterEngine.rebuild``
        can finish (a survivor listing a cluster still live), never a
        cluster marked merged into a survivor that lacks its counts."""
        if not writes:
            return
        self.states.put(writes)  # first: the table's changelog is what marks the op done
        for cid in sorted(writes, key=lambda c: c in away):  # stable: the batch's order otherwise
            self.table[cid.encode()] = writes[cid]
            self._seeded.pop(cid, None)

    def _evict(self) -> None:
        evicted = self.engine.evict(self.get_state)
        archive = {cid: fit(st) for cid in evicted if (st := self.get_state(cid)) is not None}
        # Archive first, then tombstone: a crash in between leaves the state in
        # both places, never in neither.
        self.states.archive(archive)
        for cid in evicted:
            if self.table.get(cid.encode()):
                del self.table[cid.encode()]
            self._seeded.pop(cid, None)

    async def _dead(self, source: SourceRef, raw: bytes, reason: str, detail: str) -> None:
        event_id = None
        try:  # a sighting op that decodes names its event: the dead letter accounts for that event
            op = ClusterOp.loads(raw)
        except Exception:  # noqa: BLE001 - the record refuses it: its event and source as far as they read
            op = None
        if op is not None and op.sighting is not None:
            event_id = op.sighting.event.event_id
            detail = f"{detail} (cluster op at {source.topic}:{source.partition}:{source.offset})"
            source = op.sighting.source
        elif op is None:
            event_id, named = _named_event(raw)
            if event_id is not None:
                detail = f"{detail} (cluster op at {source.topic}:{source.partition}:{source.offset})"
                source = named or source
        # The digest tells apart ops that name no event. An op that names one
        # is not digested: its bytes hold where that copy of the event sat
        # and when it was fetched, so each copy (a replay's resend, a
        # redelivery) would be a dead letter of its own for one event.
        await self.send_dead(DeadLetter.of("cluster", reason, detail, raw, source=source, event_id=event_id,
                                           digest=event_id is None))


# While a rebalance is under way, a rebuild waits this long between looks.
REBALANCE_POLL_S = 0.1


def _still_owned(app: Any, rebalances: int | None, items: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
    """The ``items`` of partitions this worker still owns, when a rebalance
    came since the batch was taken (``rebalances``: the app's count then).
    The batch waits for its index to be rebuilt, and meanwhile its partition
    may have moved: the new owner applies those ops from its last commit,
    and applying them here too would make two writers of one cluster table.
    Left unapplied, they are acked, which commits nothing for a partition
    this worker no longer has."""
    if app is None or getattr(app, "rebalancing_count", None) == rebalances:
        return items
    try:
        owned = app.assignor.assigned_actives()
    except Exception:  # noqa: BLE001 - no assignment known: judged by the ops, as before
        return items
    kept = [(v, m) for v, m in items if (m.topic, m.partition) in owned]
    if len(kept) < len(items):
        log.info("cluster ops left to their partition's new owner after a rebalance",
                 extra={"ops": len(items) - len(kept)})
    return kept


@dataclasses.dataclass
class _Built:
    """A rebuilt index (``ClusterStage._build``) and what its rebuild found."""

    engine: ClusterEngine
    seeded: dict[str, ClusterState] | None  # the seeds of an empty table; None: the table had states
    waiting: list[DetectRequest]  # the requests the seeded clusters wait on (``ClusterStage._ask_again``)


def _rebalancing(app: Any) -> bool:
    """Whether the Faust app of the table is rebalancing (None: no app)."""
    return getattr(app, "rebalancing", False) is True


def _waiting(states: list[ClusterState]) -> list[DetectRequest]:
    """The model requests the live ones of ``states`` wait on."""
    out = []
    for state in states:
        req = model_request(state) if state.merged_into is None else None
        if req is not None:
            out.append(req)
    return out


def _named_event(raw: bytes | None) -> tuple[str | None, SourceRef | None]:
    """The event id and source a cluster op the record refuses still names
    (its ``sighting``: ``records.named_event``)."""
    try:
        sighting = json.loads(raw)["sighting"]
    except Exception:  # noqa: BLE001 - not JSON, or no sighting
        return None, None
    return named_event(sighting)


def _loadable(raws: Any, where: str) -> list[ClusterState]:
    """The states of ``raws`` ((key, bytes) pairs) that load. One that does
    not (damaged, or written by another version) is logged and left out: it
    stopped the whole stage (the rebuild raised on every batch, so no op was
    applied again); left out, only the ops that read that cluster fail, each
    one dead letter."""
    out = []
    for key, raw in raws:
        try:
            out.append(ClusterState.loads(raw))
        except Exception as e:
            name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            log.error("cluster state does not load; left out of the index",
                      extra={"cluster_id": name[:64], "where": where, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return out


def _fresh(state: ClusterState) -> ClusterState:
    """The state as a fresh broker sees it: no offsets applied yet."""
    state.applied_offset = -1
    state.created_offset = -1
    return state
