"""The desk's "have we seen this picture?": an uploaded image against the
stored clusters and the banks (``streams.similar``, as ``deepwatch similar``
answers), with what the desk knows of each cluster found.

Rows keep the ``deepwatch similar --format json`` shape; the desk adds, to a
cluster row, ``desk_url`` (its page) and ``cluster`` (the cluster in the
``GET /api/clusters`` shape, ``null`` when the desk's view of the store does
not hold it yet), and to a bank row ``sha256`` (the entry's picture, ``null``
for an entry imported as hashes only).
"""

from __future__ import annotations

import base64
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from detectors.imagedata import ImageRejected
from streams import similar
from streams.desk.source import LIST_MEMBERS, FindingsSource, NotFound, members_page
from streams.settings import Settings

# Room for the multipart envelope around the picture (boundaries, part
# headers, the form's CSRF field) above ``fetch.max_bytes``.
UPLOAD_OVERHEAD = 64 * 1024
PREVIEW_PX = 160

log = logging.getLogger(__name__)


def upload_bound(settings: Settings) -> int:
    """The largest request body a picture lookup reads: a picture of
    ``fetch.max_bytes`` (the largest deepwatch fetches) and its envelope."""
    return settings.fetch.max_bytes + UPLOAD_OVERHEAD


class Rejected(Exception):
    """An upload that is not a picture the desk looks up: ``status`` (413 for
    too large, 503 while the decode budget or the store is busy, else 422)
    and ``reason`` (``ImageRejected``'s code, or ``store``)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


@dataclass
class Lookup:
    sha256: str
    size: tuple[int, int]
    format: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    preview: str | None = None  # a data: URL of a small re-encoded copy, for the page

    @property
    def outcome(self) -> str:
        """``seen`` (a cluster shows it), ``banked`` (only bank entries do) or ``not_seen``."""
        if any("cluster_id" in r for r in self.rows):
            return "seen"
        return "banked" if self.rows else "not_seen"


def lookup(settings: Settings, source: FindingsSource, data: bytes, *, preview: bool = False) -> Lookup:
    """Matches for the picture in ``data``, nearest first. Decodes pixels and
    reads the store: run it in a thread, never on the event loop."""
    from streams.es_client import EsError

    try:
        picture = similar.read_picture(data, settings.decode_limits(), preview_px=PREVIEW_PX if preview else None)
    except ImageRejected as e:
        status = 413 if e.reason == "too_large" else 503 if e.reason == "busy" else 422
        raise Rejected(status, e.reason, f"not a picture the desk can look up: {e}") from None
    # Elasticsearch nominates candidates by kNN, SQLite from the hash index this
    # process keeps of its members (``similar.near_members``); other stores give
    # every member (``iter_members``).
    store = source.store
    similar.load_index(settings, store)  # a restarted desk's first lookup: from the copy saved beside the store
    try:
        rows = similar.as_json(similar.find(settings, picture, store))
    except EsError as e:
        raise Rejected(503, "store", f"the findings store did not answer: {e}") from None
    try:  # kept fresh while it runs, so a desk killed outright restarts from a recent copy
        similar.save_index(settings, store, every_s=similar.DESK_SAVE_EVERY_S)
    except Exception:  # the answer stands; the copy is saved again later or at the stop
        log.exception("saving the member index failed")
    base = (settings.desk.public_url or "").rstrip("/")
    entries = _entry_shas(settings, [(r["bank"], r["entry_id"]) for r in rows if "bank" in r])
    for r in rows:
        if "cluster_id" in r:
            r["desk_url"] = f"{base}/clusters/{quote(r['cluster_id'], safe='')}"
            try:
                r["cluster"] = members_page(source.cluster(r["cluster_id"]), LIST_MEMBERS)
            except NotFound:
                r["cluster"] = None
        else:
            r["sha256"] = entries.get((r["bank"], r["entry_id"]))
    out = Lookup(picture.sha256, picture.size, picture.format, rows)
    if picture.preview is not None:
        out.preview = "data:image/jpeg;base64," + base64.b64encode(picture.preview).decode()
    return out


def _entry_shas(settings: Settings, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
    if not keys or not settings.banks_path.exists():
        return {}
    db = sqlite3.connect(settings.banks_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    out: dict[tuple[str, str], str | None] = {}
    try:
        for i in range(0, len(keys), 200):  # well under SQLite's bound on parameters
            chunk = keys[i:i + 200]
            out.update({(b, e): sha for b, e, sha in db.execute(
                "SELECT bank, entry_id, sha256 FROM entries WHERE " + " OR ".join(["(bank = ? AND entry_id = ?)"] * len(chunk)),
                [x for k in chunk for x in k])})
    finally:
        db.close()
    return out
