"""A pipeline worker fetches more events than it analyses at once
(``ingest.fetch_concurrency`` against ``ingest.analyze_concurrency``): an
event waiting on a slow image host holds no analysis slot, so the posts of
other hosts go on being analysed meanwhile."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

from streams.records import SourceRef
from streams.settings import Settings
from streams.stage import AnalyzeStage, SharedIds
from tests.connector_servers import ImageServer

REPO = Path(__file__).resolve().parents[1]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((96, 96), 40 + seed).convert("RGB").resize((200, 150)).save(buf, "PNG")
    return buf.getvalue()


def test_posts_of_a_fast_host_are_analysed_while_a_slow_host_holds_its_posts(tmp_path):
    # Real broker, `deepwatch replay`, one pipeline worker. Six posts at a host
    # that answers only when released come first in the feed; the eight posts
    # of a live host after them must all be stored while those six still wait.
    # Before, the worker's two analyze slots both waited on the slow host and
    # the live host's posts were stored only after it answered.
    from streams.store import open_store

    opened = threading.Event()  # the slow host answers once set (or after 90 s)
    slow_images = {f"/s{i}.png": _png(90 + i) for i in range(6)}
    images = {f"/p{i}.png": _png(i) for i in range(8)}
    data = tmp_path / "data"
    released_by: list[str] = []

    def release_when_stored() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not opened.is_set():
            try:
                store = open_store(data)
                try:
                    ok = {e for e in store.sighting_times() if e.startswith("ok")}
                finally:
                    store.close()
            except Exception:  # noqa: BLE001 - the data dir is not there yet
                ok = set()
            if len(ok) == 8:
                released_by.append(f"stored while held ({len(slow.hits)} slow requests open)")
                opened.set()
                return
            time.sleep(0.2)
        released_by.append("deadline")
        opened.set()

    with ImageServer(slow_images, before_answer=lambda: opened.wait(90)) as slow, ImageServer(images) as good:
        feed = tmp_path / "feed.jsonl"
        lines = [{"event_id": f"slow{i}", "url": f"{slow.url}/s{i}.png"} for i in range(6)]
        lines += [{"event_id": f"ok{i}", "url": f"{good.url}/p{i}.png"} for i in range(8)]
        feed.write_text("".join(json.dumps({"schema_version": 1, "event_id": x["event_id"], "platform": "x",
                                            "account_id": "a", "posted_at": "2026-11-20T10:00:00Z",
                                            "image": {"url": x["url"]}}) + "\n" for x in lines))
        watcher = threading.Thread(target=release_when_stored, daemon=True)
        watcher.start()
        env = {**os.environ, "DEEPWATCH_FETCH__ALLOW_PRIVATE_NETWORKS": "true", "DEEPWATCH_FETCH__RETRIES": "0",
               "DEEPWATCH_FETCH__READ_TIMEOUT_S": "120", "DEEPWATCH_FETCH__TOTAL_TIMEOUT_S": "120",
               "DEEPWATCH_DETECT__MODELS": "[]"}
        try:
            r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir",
                                str(data), "--json", "--timeout", "180", "--workers", "1"],
                               capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        finally:
            opened.set()
            watcher.join(5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert released_by and released_by[0].startswith("stored while held"), released_by
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["processed"] == 14
    store = open_store(data)
    try:
        assert set(store.sighting_times()) == {f"slow{i}" for i in range(6)} | {f"ok{i}" for i in range(8)}
    finally:
        store.close()


class _SlowAnalyzer:
    """Stands in for the analyzer: records how many events it analyses at once."""

    def __init__(self):
        self.now = self.most = 0
        self._lock = threading.Lock()

    def knows(self, sha256: str) -> bool:
        return False

    def analyze(self, ev, data, source, sha256):
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)
        with self._lock:
            self.now -= 1
        raise ValueError("stand-in")  # a dead letter: the stage's failure rule, not this test's subject


class _Fetcher:
    async def get(self, ev):
        await asyncio.sleep(0.01)
        return b"not an image header"  # judged in a thread, where the stand-in counts it


class _Store:
    def sighting_identity(self, event_id):
        return None


def test_the_analysis_slots_bound_the_events_analysed_at_once(tmp_path):
    settings = Settings(data_dir=tmp_path)
    shared = SharedIds(analyze_slots=2)
    analyzer = _SlowAnalyzer()

    async def go():
        stages = [AnalyzeStage(settings, _Fetcher(), analyzer, lambda d, s: None, _Store, shared) for _ in range(8)]
        raws = [json.dumps({"event_id": f"e{i}", "platform": "x", "account_id": "a",
                            "posted_at": "2026-11-20T10:00:00Z", "image": {"url": "https://cdn.example/x.png"}}).encode()
                for i in range(8)]
        return await asyncio.gather(*(st.process(raw, SourceRef(topic="events", partition=0, offset=i))
                                      for i, (st, raw) in enumerate(zip(stages, raws))))

    results = asyncio.run(go())
    assert [r.dead.reason for r in results] == ["internal_error"] * 8
    assert analyzer.most == 2
