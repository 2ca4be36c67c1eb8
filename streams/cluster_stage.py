"""The cluster stage: the single writer that turns cluster ops into cluster
decisions, as a unit of its own.

``ClusterStage`` owns everything the ``cluster`` agent in ``streams.app``
used to keep in a closure: the ``ClusterEngine`` (rebuilt from the changelog
table after a rebalance), the table itself, seeding a fresh table from
``streams.engine_state``, eviction to the cold tier and revival from it. The
app only wires it: topics in, topics out, the rebalance signal.

Per op: decode, ``ClusterEngine.apply``, write the states (engine state store
first, then the table: a crash in between replays the op, which the states'
``applied_offset`` makes idempotent), sweep idle clusters to the cold tier
when due, then send snapshots, detect requests and alerts. An op that fails
becomes one dead letter (stage ``cluster``) and the stream goes on.

Past one writer: see ``streams.clustering`` (module docstring) and the
README's "Cluster stage at scale" section for when one writer stops being
enough and how candidate search splits by hash bands.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

from streams import metrics
from streams.clustering import ClusterEngine, ClusterState
from streams.engine_state import SqliteEngineState
from streams.records import ClusterOp, DeadLetter, SourceRef
from streams.settings import Settings

log = logging.getLogger(__name__)

SendDead = Callable[[DeadLetter], Awaitable[None]]


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
    ):
        self.settings = settings
        self.table = table  # Faust table (or any mapping of bytes -> bytes) of ClusterState JSON
        self.states = states
        self.updates, self.detect_requests, self.alerts = updates, detect_requests, alerts
        self.send_dead = send_dead
        self._engine: ClusterEngine | None = None
        self._stale = True
        self._seeded: dict[str, ClusterState] = {}

    # -- state ----------------------------------------------------------------
    async def on_rebalance(self, sender: Any = None, **kwargs: Any) -> None:
        self._stale = True  # the table may have changed hands: rebuild the index

    def get_state(self, cluster_id: str) -> ClusterState | None:
        raw = self.table.get(cluster_id.encode())
        if raw:
            return ClusterState.loads(raw)
        if cluster_id in self._seeded:
            return self._seeded[cluster_id]
        archived = self.states.get_archived(cluster_id)  # evicted earlier: its exact state
        return ClusterState.loads(archived) if archived else None

    @property
    def engine(self) -> ClusterEngine:
        if self._engine is None or self._stale:
            self._engine = self._rebuild()
            self._stale = False
        return self._engine

    def _rebuild(self) -> ClusterEngine:
        eng = ClusterEngine(self.settings)
        states = [ClusterState.loads(v) for v in self.table.values() if v]
        self._seeded = {}
        if not states:
            # An empty table over an existing data dir is a fresh broker: carry
            # on from the engine state store. Its offsets belong to the old
            # broker, so they are cleared (the cold tier's too).
            states = [_fresh(ClusterState.loads(raw)) for _, raw in self.states.hot()]
            self._seeded = {s.cluster_id: s for s in states}
            stale = {cid: _fresh(ClusterState.loads(raw)).dumps() for cid, raw in self.states.archived()}
            self.states.archive(stale)
        eng.rebuild(states)
        # Clusters archived but not hot were evicted earlier: only their hashes
        # come back, into the cold index.
        hot = {s.cluster_id for s in states}
        for cid, raw in self.states.archived():
            if cid not in hot:
                archived = ClusterState.loads(raw)
                if archived.merged_into is None:
                    eng.add_cold(cid, archived.members)
        log.info("cluster index rebuilt", extra={"clusters": eng.index.n_clusters, "seeded": len(self._seeded)})
        return eng

    # -- the agent ---------------------------------------------------------------
    async def run(self, stream: Any) -> None:
        async for event in stream.events():
            await self.handle(event.value, event.message)

    async def handle(self, value: bytes, msg: Any) -> None:
        started = time.perf_counter()
        try:
            op = ClusterOp.loads(value)
            out = self.engine.apply(op, msg.offset, self.get_state)
            self._write({cid: st.dumps() for cid, st in out.writes.items()})
            if self.engine.evict_due():
                self._evict()
        except Exception as e:  # a bug or a poison op must not stop the single writer
            log.exception("cluster op failed", extra={"offset": msg.offset})
            src = SourceRef(topic=msg.topic, partition=msg.partition, offset=msg.offset)
            await self._dead(src, value, f"{type(e).__name__}: {e}")
            return
        for snap in out.snapshots:
            await self.updates.send(key=snap.cluster_id.encode(), value=snap.dumps())
        for req in out.detect_requests:
            await self.detect_requests.send(key=req.cluster_id.encode(), value=req.dumps())
        for alert in out.alerts:
            await self.alerts.send(key=alert.cluster_id.encode(), value=alert.dumps())
        eng = self.engine
        metrics.CLUSTERS.set(eng.index.n_clusters)
        metrics.CLUSTER_MEMBERS.set(eng.index.n_members)
        metrics.STAGE_SECONDS.labels("cluster").observe(time.perf_counter() - started)
        metrics.EVENTS.labels("cluster", "duplicate" if out.duplicate_event else "ok").inc()

    def _write(self, writes: dict[str, bytes]) -> None:
        if not writes:
            return
        self.states.put(writes)  # first: the table's changelog is what marks the op done
        for cid, raw in writes.items():
            self.table[cid.encode()] = raw
            self._seeded.pop(cid, None)

    def _evict(self) -> None:
        evicted = self.engine.evict(self.get_state)
        archive = {cid: st.dumps() for cid in evicted if (st := self.get_state(cid)) is not None}
        # Archive first, then tombstone: a crash in between leaves the state in
        # both places, never in neither.
        self.states.archive(archive)
        for cid in evicted:
            if self.table.get(cid.encode()):
                del self.table[cid.encode()]
            self._seeded.pop(cid, None)

    async def _dead(self, source: SourceRef, raw: bytes, detail: str) -> None:
        excerpt = raw[:512].decode("utf-8", "replace") if raw is not None else None
        await self.send_dead(DeadLetter(event_id=None, stage="cluster", reason="internal_error", detail=detail,
                                        source=source, payload_excerpt=excerpt))


def _fresh(state: ClusterState) -> ClusterState:
    """The state as a fresh broker sees it: no offsets applied yet."""
    state.applied_offset = -1
    state.created_offset = -1
    return state
