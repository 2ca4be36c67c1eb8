"""Recording a verdict and carrying out what it means.

1. The audit row (who, when, note, the cluster's state at that moment) is
   written first: whatever fails later, the decision is on record.
2. Banks: ``fake`` puts the cluster's pictures in the ``desk-fake`` bank,
   ``authentic`` in ``desk-authentic`` (the banks file every analyze stage
   re-reads within seconds, so the very next repost carries the match);
   a changed mind withdraws the cluster's pictures from the other desk bank,
   ``needs-review`` from both.
3. Retroactively: every stored cluster whose members match the judged
   pictures (same rule as the banks) gets the verdict in the desk overlay,
   which re-scores it on read (``source._apply_overlay``). The desk's cached
   view is not read again: the overlay is applied again in place to the
   clusters whose rows changed (``FindingsSource._reoverlay``).
4. Alerts: ``fake`` raises/confirms one alert per affected cluster with a
   stable id (``<cluster>:desk-fake``) through the shared alert path;
   ``authentic`` marks them suppressed and, for each affected cluster
   subscribers were told about (a stream alert, or an earlier ``fake``
   verdict's), raises one correction (``<cluster>:desk-authentic``).
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from detectors.banks import BankStore
from detectors.base import Evidence
from detectors.hashing import ImageHashes
from streams.analyze import recorded_hashes
from streams.blobstore import DirectoryBlobStore, blob_dir
from streams.desk.alerting import AlertPath
from streams.desk.auth import Principal
from streams.desk.deskdb import DeskDB, DeskVerdict, OverlayRow, VerdictRecord
from streams.desk.source import DESK_BANKS, FindingsSource, desk_bank_evidence
from streams.records import CORRECTION_RULE, Alert, Velocity
from streams.settings import Settings



class VerdictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: DeskVerdict
    note: str = Field(default="", max_length=4000)

    @field_validator("note")
    @classmethod
    def _printable(cls, v: str) -> str:
        # Line breaks and tabs, but no other control character: a NUL cuts the
        # note short in a tool that reads the audit trail as C strings.
        if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", v):
            raise ValueError("must not contain control characters (line breaks and tabs are fine)")
        return v


class Conflict(Exception):
    pass


def cluster_state(doc: dict[str, Any]) -> dict[str, Any]:
    """What the editor saw: kept with the verdict in the audit trail."""
    keys = ("fake_score", "verdict", "sightings", "accounts", "platforms", "first_seen", "last_seen", "velocity",
            "alert_level", "suppressed", "revision", "desk")
    state = {k: doc.get(k) for k in keys}
    state["evidence"] = [{"detector": e["detector"], "score": e["score"], "detail": e["detail"]} for e in doc["evidence"][:5]]
    state["members"] = [m["sha256"] for m in doc["members"]]
    return state


class VerdictEffectsFailed(Exception):
    """The verdict is in the audit trail; carrying out what it means (banks,
    overlay, alerts) failed part-way, the cause chained. Told apart from a
    request that recorded nothing: sent again, it is a second verdict."""

    def __init__(self, verdict_id: int):
        super().__init__(f"verdict {verdict_id} was recorded; carrying out its effects failed")
        self.verdict_id = verdict_id


class Verdicts:
    def __init__(self, settings: Settings, source: FindingsSource, desk: DeskDB, alerts: AlertPath):
        self.settings, self.source, self.desk, self.alerts = settings, source, desk, alerts
        self.blobs = DirectoryBlobStore(blob_dir(settings.data_dir))
        self._lock = asyncio.Lock()  # one verdict at a time: bank and overlay rewrites must not interleave

    async def record(self, cluster_id: str, body: VerdictIn, who: Principal) -> VerdictRecord:
        # Store reads and SQLite writes in a thread: a cluster read may reload
        # every finding (seconds on a big store, paged requests to
        # Elasticsearch) or wait for a page's reload, and the desk database
        # waits up to 30 s on a busy file; on the loop every desk request
        # (/healthz too) would wait with it.
        async with self._lock:
            doc = await asyncio.to_thread(self.source.cluster, cluster_id)  # NotFound -> 404
            if doc.get("merged_into"):
                raise Conflict(f"cluster {cluster_id} was merged into {doc['merged_into']}; record the verdict there")
            rec = await asyncio.to_thread(self.desk.add_verdict, cluster_id, body.verdict, body.note, who.user, who.role,
                                          cluster_state(doc))
            try:
                effects = await asyncio.to_thread(self._banks_and_overlay, rec, doc)
                # the overlay applied again to the cached view in place (no read of the view):
                # takes the lock a page's reload holds
                await asyncio.to_thread(self.source.refresh)
                effects["alerts"] = await self._alerts(rec, effects["clusters"])
                await asyncio.to_thread(self.desk.record_effects, rec.verdict_id, effects)
            except Exception as e:
                raise VerdictEffectsFailed(rec.verdict_id) from e
            rec.effects = effects
            return rec

    # -- banks and the retroactive overlay ---------------------------------------
    def _banks_and_overlay(self, rec: VerdictRecord, doc: dict[str, Any]) -> dict[str, Any]:
        shas = [m["sha256"] for m in doc["members"] if self.blobs.exists(m["sha256"])]
        withdrawn = self._withdraw(shas, [b for v, b in DESK_BANKS.items() if v != rec.verdict])
        detail = f"desk verdict {rec.verdict} by {rec.user} on cluster {rec.cluster_id}" + (f": {rec.note}" if rec.note else "")
        rows = [OverlayRow(cluster_id=rec.cluster_id, verdict=rec.verdict, verdict_id=rec.verdict_id,
                           source_cluster=rec.cluster_id, detail=detail)]
        added = 0
        if rec.verdict in DESK_BANKS and shas:
            # Read from the blob store one at a time as each is hashed, not
            # written out first: a viral cluster's recompressed reposts are
            # thousands of files, more than a read-only root's /tmp holds.
            # Entries are named after the cluster (the label a bank hit shows).
            pictures = [(f"cluster-{rec.cluster_id}-{sha[:12]}", functools.partial(self.blobs.get, sha))
                        for sha in shas]
            bank = self.settings.bank_store()
            try:
                added = bank.add_image_bytes(DESK_BANKS[rec.verdict], rec.verdict, pictures)
            finally:
                bank.close()
            matched = self._matching_clusters(pictures, rec.verdict)
            for cid in sorted(matched - {rec.cluster_id}):
                rows.append(OverlayRow(cluster_id=cid, verdict=rec.verdict, verdict_id=rec.verdict_id,
                                       source_cluster=rec.cluster_id, detail=detail + f" (matches cluster {rec.cluster_id})"))
        self.desk.set_overlay(rows, clear_source=rec.cluster_id)
        return {"bank": DESK_BANKS.get(rec.verdict), "bank_entries_added": added, "withdrawn": withdrawn,
                "clusters": [r.cluster_id for r in rows]}

    def _withdraw(self, shas: list[str], banks: list[str]) -> int:
        """Remove these pictures from desk banks a new verdict contradicts,
        all or none (one transaction), however many there are.
        BankStore has no delete: the desk owns these two banks' rows."""
        path = self.settings.banks_path
        if not shas or not banks or not path.exists():
            return 0
        db = sqlite3.connect(path, timeout=30)
        try:
            # One variable per picture, and a statement takes at most the
            # build's limit (999 before SQLite 3.32, 32766 after, whatever a
            # distribution compiled in): chunks under the connection's own.
            per = max(1, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - len(banks))
            removed = 0
            with db:
                for i in range(0, len(shas), per):
                    chunk = shas[i:i + per]
                    removed += db.execute(
                        f"DELETE FROM entries WHERE bank IN ({','.join('?' * len(banks))}) "
                        f"AND sha256 IN ({','.join('?' * len(chunk))})", [*banks, *chunk]).rowcount
            return removed
        finally:
            db.close()

    def _matching_clusters(self, pictures: list[tuple[str, Callable[[], bytes]]], verdict: str) -> set[str]:
        """Stored clusters with a member matching the judged pictures ((label,
        loader) pairs, read one at a time), using a private in-memory bank of
        just these pictures and the banks' own rule.
        Stored members carry hashes but no thumbnail, so a member the hashes
        nominate is checked again on its pixels from the blob store, as a repost
        would be (``recorded_hashes``): a look-alike (one prompt's other seed)
        is not judged with it. A member with neither is taken on its hashes."""
        probe = BankStore(":memory:", **self.settings.dedupe.thresholds())
        try:
            probe.add_image_bytes("probe", verdict, pictures)
            hits: set[str] = set()
            for m in self.source.iter_members():
                if m.cluster_id in hits:
                    continue
                h = ImageHashes(phash=m.phash, pdq=m.pdq, pdq_quality=m.pdq_quality, views=m.views, trimmed=m.trimmed)
                if probe.match(h) and self._pixels_agree(probe, m.sha256):
                    hits.add(m.cluster_id)
            return hits
        finally:
            probe.close()

    def _pixels_agree(self, probe: BankStore, sha256: str) -> bool:
        full = recorded_hashes(self.settings, sha256)
        return full is None or bool(probe.match(full))  # no record nor bytes: the hashes decide, as before

    # -- alerts ------------------------------------------------------------------
    async def _alerts(self, rec: VerdictRecord, cluster_ids: list[str]) -> list[str]:
        """``fake``: an alert for every affected cluster. ``authentic``: a
        correction for every affected cluster subscribers were told was fake,
        by the stream (its alert level) or by a ``fake`` verdict (on it or on
        a cluster whose pictures it matched: ``DeskDB.desk_alerts_sent``):
        without one, a subscriber who acted on the alert never learned the
        desk found the picture authentic. What a cluster's subscribers heard
        last decides: the same verdict again raises nothing new (the same
        id), and a verdict that turns back (fake, authentic, fake) is said
        again under an id of its own (``<cluster>:desk-fake:<verdict id>``):
        under the first id the sinks took it for a redelivery and the last
        word subscribers had was "authentic"."""
        if rec.verdict not in ("fake", "authentic"):
            return []
        raised = []
        for cid in cluster_ids:
            try:
                # the view's lock, or a read by id outside the view: in a thread
                doc = await asyncio.to_thread(self.source.cluster, cid)
            except LookupError:
                continue
            sent = await asyncio.to_thread(self.desk.desk_alerts_sent, cid, before=rec.verdict_id)
            said = sent[-1].verdict if sent else None
            base = f"{cid}:desk-{rec.verdict}"
            if said == rec.verdict:
                alert_id = sent[-1].alert_id  # said already: the sinks take it as a redelivery
            elif rec.verdict == "authentic" and said is None and not (doc.get("alert_level") or 0) > 0:
                continue  # nobody was told it was fake: nothing to correct
            else:
                alert_id = base if base not in {a.alert_id for a in sent} else f"{base}:{rec.verdict_id}"
            desk = doc.get("desk") or {}
            ev = desk_bank_evidence(rec.verdict, OverlayRow(cluster_id=cid, verdict=rec.verdict,
                                                            verdict_id=rec.verdict_id, source_cluster=rec.cluster_id,
                                                            detail=desk.get("detail", "")))
            alert = Alert(
                alert_id=alert_id, cluster_id=cid,
                rule="desk-verdict-fake" if rec.verdict == "fake" else CORRECTION_RULE,
                level=max(1, doc.get("alert_level") or 0),
                fake_score=doc["fake_score"], verdict=doc["verdict"], velocity=Velocity(**doc["velocity"]),
                sightings=doc["sightings"], accounts=doc["accounts"],
                evidence=[ev] + [Evidence.model_validate(e) for e in doc["evidence"] if e["detector"] != ev.detector][:4],
                at=datetime.now(timezone.utc), first_seen=doc.get("first_seen"), last_seen=doc.get("last_seen"),
                platforms=doc.get("platforms") or [],
                sample_posts=await asyncio.to_thread(self.source.sample_posts,
                                                     cluster_ids=[cid, *(doc.get("merged_from") or [])]),
                merged_from=sorted(doc.get("merged_from") or []),
            )
            await self.alerts.raise_alert(alert)
            raised.append(alert.alert_id)
        return raised
