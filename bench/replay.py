"""Streaming throughput and event→alert latency of the whole pipeline.

Prints, all measured in the same run (on a shared machine, only the ratios
mean much):
* the *naive* single-process pipeline on the same feed: parse, full decode,
  ``imagehash.phash`` + ``pdqhash.compute``, a linear scan over every hash seen
  so far (the baseline the issue sets);
* the in-process ceiling: deepwatch's own stages (validate, read, draft
  decode, hashes and views, cheap detectors, cluster engine) called directly;
* events/s through the real pipeline (``deepwatch replay``'s path: embedded
  Tansu broker, Faust worker processes), start-up excluded, and its ratio to
  the naive pipeline;
* where an event's time goes in-process (decode+hash, detectors, cluster
  engine, serialization);
* the latency from an event's ingest to its alert while several viral
  pictures arrive at a given rate (p50/p95).

Usage: python bench/replay.py [--pictures 60] [--reposts 6] [--workers 2] [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams import runner  # noqa: E402
from streams.analyze import Analyzer  # noqa: E402
from streams.clustering import ClusterEngine, ClusterState  # noqa: E402
from streams.demo_feed import BASE_TIME, a1111_png, jpeg_bytes, scene  # noqa: E402
from streams.ingest import produce_feed  # noqa: E402
from streams.records import ClusterOp, SourceRef  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.store import open_store  # noqa: E402
from streams.validate import parse_event  # noqa: E402


def build(root: Path, pictures: int, reposts: int, seed: int = 7) -> Path:
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    n = 0
    for p in range(pictures):
        pic = scene(10_000 + p, size=(1024, 768))
        variants = [jpeg_bytes(pic, 90), jpeg_bytes(pic, 70), jpeg_bytes(pic.resize((512, 384)), 80)]
        if p % 5 == 0:
            variants[0] = a1111_png(pic, "news photo")
        names = []
        for v, data in enumerate(variants):
            ext = "png" if data.startswith(b"\x89PNG") else "jpg"
            name = f"p{p}_{v}.{ext}"
            (images / name).write_bytes(data)
            names.append(name)
        for r in range(reposts):
            n += 1
            lines.append(json.dumps({
                "event_id": f"e{n}", "platform": rng.choice(["x", "bsky"]), "account_id": f"a{rng.randrange(10**6)}",
                "posted_at": (BASE_TIME + timedelta(seconds=n)).isoformat(), "image": {"path": f"images/{names[r % 3]}"},
            }))
    rng.shuffle(lines)
    feed = root / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    return feed


def naive(feed: Path) -> float:
    """The baseline: one process, full decode, imagehash + pdqhash, linear scan."""
    import imagehash
    import pdqhash
    from PIL import Image

    lines = feed.read_bytes().splitlines()
    seen: list[tuple[int, int, int]] = []  # (pHash, PDQ as one int, cluster)
    started = time.perf_counter()
    for raw in lines:
        ev = json.loads(raw)
        with Image.open(feed.parent / ev["image"]["path"]) as im:
            rgb = im.convert("RGB")
        ph = int(str(imagehash.phash(rgb)), 16)
        vec, _ = pdqhash.compute(np.asarray(rgb))
        pq = int("".join(map(str, vec.tolist())), 2)
        cluster = next((c for p, q, c in seen if (p ^ ph).bit_count() <= 10 or (q ^ pq).bit_count() <= 31), len(seen))
        seen.append((ph, pq, cluster))
    return len(lines) / (time.perf_counter() - started)


def in_process(feed: Path, settings: Settings) -> tuple[float, dict[str, float]]:
    """The ceiling: every stage called directly, no broker, no serialization
    hops; also where the time goes (seconds per stage, summed)."""
    analyzer = Analyzer(settings, Path(settings.data_dir) / "blobs-inproc")
    engine = ClusterEngine(settings)
    table: dict[str, bytes] = {}
    lines = feed.read_bytes().splitlines()
    spent = dict.fromkeys(("parse+read", "decode+hashes", "cheap detectors", "cluster engine", "serialization"), 0.0)
    real_detect = analyzer._detect

    def timed_detect(image):
        t = time.perf_counter()
        try:
            return real_detect(image)
        finally:
            spent["cheap detectors"] += time.perf_counter() - t

    analyzer._detect = timed_detect  # type: ignore[method-assign]
    started = time.perf_counter()
    for i, raw in enumerate(lines):
        t0 = time.perf_counter()
        ev = parse_event(raw)
        data = (feed.parent / ev.image.path).read_bytes()
        t1 = time.perf_counter()
        s = analyzer.analyze(ev, data, SourceRef(topic="t", partition=0, offset=i))
        t2 = time.perf_counter()
        op = ClusterOp.loads(ClusterOp(kind="sighting", sighting=s).dumps())  # the hop to the cluster stage
        t3 = time.perf_counter()
        out = engine.apply(op, i, lambda c: ClusterState.loads(table[c]) if c in table else None)
        t4 = time.perf_counter()
        for cid, st in out.writes.items():
            table[cid] = st.dumps()
        for snap in out.snapshots:
            snap.dumps()
        t5 = time.perf_counter()
        spent["parse+read"] += t1 - t0
        spent["decode+hashes"] += t2 - t1
        spent["serialization"] += (t3 - t2) + (t5 - t4)
        spent["cluster engine"] += t4 - t3
    spent["decode+hashes"] -= spent["cheap detectors"]
    return len(lines) / (time.perf_counter() - started), spent


def streaming(feed: Path, settings: Settings, workers: int) -> tuple[float, float]:
    with ExitStack() as stack:
        t0 = time.perf_counter()
        cluster = runner.start_cluster(settings, stack)
        for _ in range(workers):
            cluster.start_worker()
        warm = feed.with_name("warmup.jsonl")
        warm.write_text(feed.read_text().splitlines()[0] + "\n")
        p = produce_feed(warm, cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, p.offsets, timeout_s=180)
        startup = time.perf_counter() - t0
        started = time.perf_counter()
        produced = produce_feed(feed, cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=900)
        return len(produced.offsets) / (time.perf_counter() - started), startup


def latency(root: Path, settings: Settings, rate: float, pictures: int = 8, burst: int = 12) -> tuple[list[float], float]:
    """``pictures`` viral fakes arrive interleaved, one repost at a time, at
    ``rate`` events/s; returns (event->alert seconds of every alert, achieved rate)."""
    images = root / "lat-images"
    images.mkdir()
    for p in range(pictures):
        pic = scene(77_777 + p)
        (images / f"orig{p}.png").write_bytes(a1111_png(pic, "fake"))
        (images / f"repost{p}.jpg").write_bytes(jpeg_bytes(pic, 75))
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        cluster.wait_ready()
        offsets = set()
        started = time.perf_counter()
        n = 0
        for i in range(burst):
            for p in range(pictures):
                n += 1
                f = root / f"lat{n}.jsonl"
                f.write_text(json.dumps({
                    "event_id": f"lat{n}", "platform": "x", "account_id": f"u{n}",
                    "posted_at": (datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=10 * i)).isoformat(),
                    "image": {"path": str(images / (f"orig{p}.png" if i == 0 else f"repost{p}.jpg"))},
                }) + "\n")
                offsets |= produce_feed(f, cluster.bootstrap, settings).offsets
                time.sleep(max(0.0, started + n / rate - time.perf_counter()))
        achieved = n / (time.perf_counter() - started)
        assert runner.wait_until_processed(cluster, offsets, timeout_s=180)
    store = open_store(settings.data_dir)
    out = []
    for a in store.alerts():
        t0 = datetime.fromisoformat(a["trigger_ingested_at"])
        out.append((datetime.fromisoformat(a["created_at"]) - t0).total_seconds())
    return out, achieved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pictures", type=int, default=60)
    ap.add_argument("--reposts", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.0, help="events/s for the latency run (0: 80%% of the streaming rate)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dw-bench-") as tmp:
        root = Path(tmp)
        feed = build(root / "feed", args.pictures, args.reposts)
        n = args.pictures * args.reposts
        base = Settings(data_dir=root / "inproc")
        base.ingest.image_roots = [feed.parent]
        naive_eps = naive(feed)
        ceiling, spent = in_process(feed, base)
        s = Settings(data_dir=root / "stream")
        s.ingest.image_roots = [feed.parent]
        eps, startup = streaming(feed, s, args.workers)
        naive_after = naive(feed)  # the machine is shared: the baseline again, after
        rate = args.rate or 0.8 * eps
        lat_settings = Settings(data_dir=root / "latency", alerts={"min_sightings_5m": 5})
        lat_settings.ingest.image_roots = [root]
        lat, achieved = latency(root, lat_settings, rate)
    base_eps = (naive_eps + naive_after) / 2
    print(f"events: {n} ({args.pictures} pictures x {args.reposts} reposts, 1024x768, 20% PNG with metadata)")
    print(f"naive single process (full decode, imagehash+pdqhash, linear scan): {naive_eps:7.1f} events/s before, "
          f"{naive_after:7.1f} after the streaming run")
    print(f"in-process ceiling (deepwatch stages, no broker):                   {ceiling:7.1f} events/s "
          f"= {ceiling / base_eps:.2f}x naive")
    print(f"streaming, {args.workers} worker(s), embedded Tansu (deepwatch replay's path): {eps:7.1f} events/s "
          f"= {eps / base_eps:.2f}x naive  [target >= 3x]  (startup {startup:.1f}s excluded)")
    e2e = n / (n / eps + startup)
    print(f"  end to end incl. broker+worker startup: {e2e:7.1f} events/s = {e2e / base_eps:.2f}x naive")
    total = sum(spent.values())
    print("in-process time per event: " + ", ".join(f"{k} {v / n * 1000:.2f} ms ({v / total:.0%})" for k, v in spent.items()))
    if lat:
        lat.sort()
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        print(f"event->alert latency, {len(lat)} alerts, 8 viral pictures at {achieved:.1f} events/s: "
              f"median {statistics.median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms  [target < 3000 ms]")
    else:
        print("no alert raised in the latency run")


if __name__ == "__main__":
    main()
