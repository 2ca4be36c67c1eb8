"""Builds findings stores for the desk tests and bench: real pictures in the
blob store, real hashes, and cluster snapshots written through the store's
own ``apply_snapshot`` (as the stream's sink writes them)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from detectors.base import Evidence
from detectors.hashing import compute_hashes
from detectors.imagedata import ImageData
from streams.blobstore import DirectoryBlobStore
from streams.records import ClusterSnapshot, Engagement, ImageEvent, ImageRef, Member, Sighting, SourceRef, Velocity
from streams.store import open_store
from tests.support import picture

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parents[1]


def jpeg(img, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def ai_evidence(sha: str) -> Evidence:
    return Evidence(detector="metadata", score=0.98, weight=3.0, sha256=sha,
                    detail="PNG text chunk names the generator: Stable Diffusion XL")


def make_cluster(store, blobs, cid: str, seed: int, *, posts: int, ai: bool, platforms=("x",), accounts=None,
                 t0: datetime = T0, texts=None, size=(160, 120), hashes_cache: dict | None = None,
                 variant: int | None = None, img=None) -> str:
    """One cluster of ``posts`` sightings of one picture (``img``, else the
    seed's ``picture`` at ``size``); returns its sha256.
    ``variant`` changes one pixel: distinct bytes (its own blob and member
    row) with the seed's hashes reused from ``hashes_cache`` (for benches)."""
    img = picture(seed, size) if img is None else img.convert("RGB")
    size = img.size
    if variant is not None:
        img.putpixel((0, 0), (variant % 256, (variant // 256) % 256, (variant // 65536) % 256))
    data = jpeg(img)
    sha = blobs.put(data)
    h = (hashes_cache or {}).get(seed) or compute_hashes(ImageData(data))
    if hashes_cache is not None:
        hashes_cache[seed] = h
    evidence = [ai_evidence(sha)] if ai else []
    score, verdict = (0.95, "likely-ai") if ai else (0.2, "no-evidence")
    member = Member(sha256=sha, phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality, event_id=f"{cid}-e0",
                    width=size[0], height=size[1], format="JPEG", views=h.views, trimmed=h.trimmed, representative=True)
    for i in range(posts):
        when = t0 + timedelta(seconds=30 * i)
        account = (accounts or [f"{cid}-acct{i}"])[i % len(accounts or [f"{cid}-acct{i}"])]
        ev = ImageEvent(event_id=f"{cid}-e{i}", platform=platforms[i % len(platforms)], account_id=account,
                        account_handle=f"@{account}", post_url=f"https://example.org/{cid}/{i}", posted_at=when,
                        text=(texts or ["a picture"])[i % len(texts or ["a picture"])], image=ImageRef(blob=sha))
        s = Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=hash((cid, i)) & 0xFFFFFFF),
                     sha256=sha, width=size[0], height=size[1], format="JPEG", hashes=h, evidence=evidence)
        store.apply_snapshot(ClusterSnapshot(
            cluster_id=cid, revision=i + 1, fake_score=score, verdict=verdict, evidence=evidence, members=[member],
            sightings=i + 1, accounts=i + 1, platforms=sorted(set(platforms)), engagement=Engagement(),
            velocity=Velocity(sightings_5m=min(i + 1, 10), sightings_1h=i + 1), first_seen=t0, last_seen=when,
            alert_level=1 if ai and i >= 9 else 0, new_sighting=s))
    return sha


def small_store(data: Path, store=None) -> dict[str, str]:
    """Four clusters: a viral likely-AI one, a quiet likely-AI one, an ordinary
    photo, and a persona account posting AI pictures. Returns id -> sha256.
    Written to ``store`` (any findings store; it is flushed and closed) or
    else to the SQLite file in ``data``; pictures go to ``data``/blobs."""
    store = store if store is not None else open_store(data)
    blobs = DirectoryBlobStore(data / "blobs")
    out = {
        "c-viral": make_cluster(store, blobs, "c-viral", 1, posts=12, ai=True, platforms=("x", "weibo"),
                                texts=["flooded subway station", "is this real?"]),
        "c-quiet": make_cluster(store, blobs, "c-quiet", 2, posts=2, ai=True, platforms=("telegram",)),
        "c-photo": make_cluster(store, blobs, "c-photo", 3, posts=4, ai=False, platforms=("x",), texts=["harbour at dawn"]),
    }
    for k in range(5):  # a persona account: five AI pictures, nothing else
        cid = f"c-persona{k}"
        out[cid] = make_cluster(store, blobs, cid, 100 + k, posts=1, ai=True, platforms=("xiaohongshu",),
                                accounts=["persona1"], t0=T0 + timedelta(hours=k))
    getattr(store, "flush", lambda: None)()  # Elasticsearch: make the writes searchable
    store.close()
    return out


def bulk_sightings(path: Path, n: int, cluster_id: str = "c-bulk") -> None:
    """``n`` more sightings in the SQLite findings file at ``path``, written
    in one statement (a store big enough for a search to take its time, in
    a second or two): posts of 5,000 accounts every second from 2026-11-01,
    with random text and hashtags, recorded under ``cluster_id``. Not in the
    full-text index: they make scans long, not matches."""
    import sqlite3

    db = sqlite3.connect(path)
    with db:
        db.execute(
            """WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
               INSERT INTO sightings (event_id, cluster_id, sha256, platform, account_id, account_handle, post_url,
                                      posted_at, engagement, text, hashtags)
               SELECT 'bulk-' || i, ?, printf('%064d', i), 'x', 'bulk' || (i % 5000), '@bulk' || (i % 5000),
                      'https://example.org/bulk/' || i,
                      strftime('%Y-%m-%dT%H:%M:%f+00:00', '2026-11-01', '+' || i || ' seconds'), '{}',
                      'filler words ' || i || ' ' || hex(randomblob(40)), 'tag' || (i % 97) || ' ' || hex(randomblob(30))
               FROM n""", (n - 1, cluster_id))
    db.close()


def close_sources(*sources) -> None:
    """Close desk read sources (``FindingsSource``) a test opened, with their desk databases."""
    for s in sources:
        if s is not None:
            s.close()
            s.desk.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeskServer:
    """``deepwatch serve`` as a real process on a free loopback port."""

    def __init__(self, data: Path, env: dict[str, str] | None = None, host: str = "127.0.0.1", extra: tuple = ()):
        self.port = free_port()
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.log = data / f"desk-{self.port}.log"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli.__main__", "serve", "--data-dir", str(data), "--host", host,
                 "--port", str(self.port), *extra], stdout=out, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"desk exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                httpx.get(self.url + "/openapi.json", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("desk did not start: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
