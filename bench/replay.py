"""Streaming throughput and event→alert latency of the whole pipeline.

Prints:
* events/s through the real pipeline (embedded Tansu broker, Faust worker
  processes) against the in-process ceiling: the same stages (validate, read,
  decode, hash, cheap detectors, cluster engine) called directly on the same
  events in this process, measured in the same run;
* the latency from an event's ingest to its alert, with the feed paced like a
  live stream (so it measures the pipeline, not a queue built by a batch).

Usage: python bench/replay.py [--pictures 60] [--reposts 6] [--workers 1] [--rate 20]
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


def in_process(feed: Path, settings: Settings) -> float:
    """The ceiling: every stage called directly, no broker, no serialization hops."""
    analyzer = Analyzer(settings, Path(settings.data_dir) / "blobs-inproc")
    engine = ClusterEngine(settings)
    table: dict[str, bytes] = {}
    lines = feed.read_bytes().splitlines()
    started = time.perf_counter()
    for i, raw in enumerate(lines):
        ev = parse_event(raw)
        data = (feed.parent / ev.image.path).read_bytes()
        s = analyzer.analyze(ev, data, SourceRef(topic="t", partition=0, offset=i))
        out = engine.apply(ClusterOp(kind="sighting", sighting=s), i,
                           lambda c: ClusterState.loads(table[c]) if c in table else None)
        for cid, st in out.writes.items():
            table[cid] = st.dumps()
    return len(lines) / (time.perf_counter() - started)


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


def latency(root: Path, settings: Settings, rate: float, burst: int = 14) -> list[float]:
    """A viral fake arrives one repost at a time at ``rate`` events/s."""
    images = root / "lat-images"
    images.mkdir()
    pic = scene(77_777)
    (images / "orig.png").write_bytes(a1111_png(pic, "fake"))
    (images / "repost.jpg").write_bytes(jpeg_bytes(pic, 75))
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        cluster.start_worker()
        offsets = set()
        for i in range(burst):
            f = root / f"lat{i}.jsonl"
            f.write_text(json.dumps({
                "event_id": f"lat{i}", "platform": "x", "account_id": f"u{i}",
                "posted_at": (datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=10 * i)).isoformat(),
                "image": {"path": str(images / ("orig.png" if i == 0 else "repost.jpg"))},
            }) + "\n")
            offsets |= produce_feed(f, cluster.bootstrap, settings).offsets
            if i == 0:  # let the worker finish starting before the clock matters
                assert runner.wait_until_processed(cluster, offsets, timeout_s=180)
            time.sleep(1 / rate)
        assert runner.wait_until_processed(cluster, offsets, timeout_s=180)
    store = open_store(settings.data_dir)
    out = []
    for a in store.alerts():
        t0 = datetime.fromisoformat(a["trigger_ingested_at"])
        out.append((datetime.fromisoformat(a["created_at"]) - t0).total_seconds())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pictures", type=int, default=60)
    ap.add_argument("--reposts", type=int, default=6)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rate", type=float, default=20.0, help="events/s for the latency run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dw-bench-") as tmp:
        root = Path(tmp)
        feed = build(root / "feed", args.pictures, args.reposts)
        n = args.pictures * args.reposts
        base = Settings(data_dir=root / "inproc")
        base.ingest.image_roots = [feed.parent]
        ceiling = in_process(feed, base)
        s = Settings(data_dir=root / "stream")
        s.ingest.image_roots = [feed.parent]
        eps, startup = streaming(feed, s, args.workers)
        lat_settings = Settings(data_dir=root / "latency", alerts={"min_sightings_5m": 10})
        lat_settings.ingest.image_roots = [root]
        lat = latency(root, lat_settings, args.rate)
    print(f"events: {n} ({args.pictures} pictures x {args.reposts} reposts, 1024x768, 20% PNG with metadata)")
    print(f"in-process ceiling (same stages, no broker): {ceiling:8.1f} events/s")
    print(f"streaming, {args.workers} worker(s), embedded Tansu: {eps:8.1f} events/s "
          f"= {eps / ceiling:.2f}x the in-process ceiling (startup {startup:.1f}s, excluded)")
    if lat:
        print(f"event->alert latency at {args.rate:g} events/s: "
              f"{', '.join(f'{x * 1000:.0f} ms' for x in lat)} (median {statistics.median(lat) * 1000:.0f} ms)")
    else:
        print("no alert raised in the latency run")


if __name__ == "__main__":
    main()
