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

With ``--filer`` (the issue's way): the wall time of ``deepwatch replay`` as a
user runs it (start-up included; by default once with replay's own worker
count and once with 1) against the naive pipeline as its own process, the
CPU seconds of each one's whole process tree (what a busy machine has to
find for it), and event→alert latency at 3x the naive pipeline's events/s (the issue's load)
and at fractions of the best replay's rate.

Usage: python bench/replay.py [--pictures 60] [--reposts 6] [--workers 2] [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.naive_pipeline import naive  # noqa: E402
from streams import runner  # noqa: E402
from streams.analyze import Analyzer  # noqa: E402
from streams.clustering import ClusterEngine, ClusterState  # noqa: E402
from streams.demo_feed import BASE_TIME, a1111_png, jpeg_bytes, scene  # noqa: E402
from streams.ingest import produce_feed  # noqa: E402
from streams.records import ClusterOp, SourceRef  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.store import open_store  # noqa: E402
from streams.topics import PIPELINE_ROLES  # noqa: E402
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
        t0 = a.trigger_ingested_at
        out.append((a.created_at - t0).total_seconds())
    return out, achieved


# ----------------------------------------------------------------- the filer's way
# The measurement, as a new user would take it: a feed of N events over
# P held-out pictures (each event one random variant of its picture), the wall
# time of `deepwatch replay` from process start to exit against a naive
# single-process pipeline run as its own process too -- start-up included on
# both sides.

FILER_DIRS = ["detect-dev", "detect-dev2"]  # held out from the pixel model's training (train-extra)
FILER_VARIANTS = ("jpeg_q70", "resize_0.5", "crop_90", "caption")  # re-encoded, half size, 90% crop, caption


def build_filer_feed(root: Path, events: int, pictures: int, seed: int = 10, max_side: int = 1024) -> Path | None:
    """The feed, or None when ``../shared`` is absent. Cached in ``root``
    (keyed by the arguments) so repeated runs skip the image work."""
    shared = REPO.parent / "shared" / "data"
    dirs = [shared / d for d in FILER_DIRS if (shared / d).is_dir()]
    if not dirs:
        return None
    root = root / f"filer-{events}-{pictures}-{seed}-{max_side}"
    feed = root / "feed.jsonl"
    if feed.exists():
        return feed
    from bench.neardup_images import load_images
    from bench.neardup_transforms import TRANSFORMS

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    pics = load_images(dirs, max_side=max_side, limit=pictures)
    for p, (_, img) in enumerate(pics):
        for v in FILER_VARIANTS:
            (images / f"p{p}_{v}.jpg").write_bytes(TRANSFORMS[v](img))
    rng = random.Random(seed)
    lines = []
    for n in range(events):
        p = rng.randrange(len(pics))
        lines.append(json.dumps({
            "event_id": f"e{n}", "platform": rng.choice(["x", "bsky", "mastodon"]), "account_id": f"a{rng.randrange(10**6)}",
            "posted_at": (BASE_TIME + timedelta(seconds=n)).isoformat(),
            "image": {"path": f"images/p{p}_{rng.choice(FILER_VARIANTS)}.jpg"},
        }))
    feed.write_text("\n".join(lines) + "\n")
    return feed


def children_cpu() -> float:
    """CPU seconds (user + system) of every descendant process waited for so
    far: around one ``subprocess.run`` it is that command's whole process
    tree (a replay's CLI, broker, zygote and workers: each is reaped by its
    parent before the command exits)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def naive_process(feed: Path) -> dict:
    """The naive pipeline as its own process (its imports and start-up count):
    wall seconds from spawn to exit, CPU seconds, and its loop's events/s."""
    t0, c0 = time.perf_counter(), children_cpu()
    out = subprocess.run([sys.executable, str(REPO / "bench" / "naive_pipeline.py"), str(feed)],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "cpu_s": children_cpu() - c0, "loop_eps": doc["eps"]}


def replay_process(feed: Path, data_dir: Path, workers: int | None, extra: list[str] = (), repo: Path = REPO) -> dict:
    """``deepwatch replay`` as a user runs it: wall seconds from spawn to exit
    (``repo``: the checkout whose code runs, e.g. an export of an older commit;
    ``workers`` None: replay's own default)."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    # the console script's module where the checkout has one (what `deepwatch` runs), else the package's
    entry = "streams.console" if (repo / "streams" / "console.py").is_file() else "streams.cli"
    cmd = [sys.executable, "-m", entry, "replay", str(feed),
           *([] if workers is None else ["--workers", str(workers)]),
           "--data-dir", str(data_dir), "--format", "json", *extra]
    t0, c0 = time.perf_counter(), children_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"replay failed ({out.returncode}):\n{out.stderr[-4000:]}")
    summary = json.loads(out.stdout)
    summary["wall_s"] = wall
    summary["cpu_s"] = children_cpu() - c0
    return summary


def paced_latency(feed: Path, root: Path, rate: float, workers: int, pictures: int = 12, reposts: int = 8,
                  every: int = 20, split: bool = False) -> dict:
    """Event->alert latency under load: the filer's feed produced at ``rate``
    events/s through ``workers`` pipeline workers (and the detect role), with
    one of ``pictures`` viral AI fakes (generator metadata) every ``every``
    events -- each picture posted ``reposts`` times 10 s of event time apart,
    so each alerts at ``min_sightings_5m=5``. ``split``: ``workers`` analyze
    workers and a cluster worker instead of pipeline workers (replay
    --split). Returns latencies, the rate achieved and the mean wait per
    stage."""
    from streams.ingest import produce_lines

    images = root / "viral"
    images.mkdir(parents=True, exist_ok=True)
    for p in range(pictures):
        pic = scene(77_777 + p)
        (images / f"orig{p}.png").write_bytes(a1111_png(pic, "fake"))
        (images / f"repost{p}.jpg").write_bytes(jpeg_bytes(pic, 75))
    lines = []
    viral = 0
    for n, raw in enumerate(feed.read_bytes().splitlines()):
        ev = json.loads(raw)
        ev["image"]["path"] = str(feed.parent / ev["image"]["path"])
        lines.append(json.dumps(ev).encode())
        if n % every == every - 1 and viral < reposts * pictures:
            p, k = viral % pictures, viral // pictures
            lines.append(json.dumps({
                "event_id": f"viral{viral}", "platform": "x", "account_id": f"v{viral}",
                "posted_at": (BASE_TIME + timedelta(seconds=10 * k)).isoformat(),
                "image": {"path": str(images / (f"orig{p}.png" if k == 0 else f"repost{p}.jpg"))},
            }).encode())
            viral += 1
    s = Settings(data_dir=root / "data", alerts={"min_sightings_5m": 5})
    s.ingest.image_roots = [feed.parent, images]
    with ExitStack() as stack:
        cluster = runner.start_cluster(s, stack)
        if split:
            cluster.start_worker("cluster")
        for _ in range(workers):
            cluster.start_worker("analyze" if split else "pipeline")
        cluster.start_worker("detect")
        cluster.wait_ready(roles=PIPELINE_ROLES)
        started = time.perf_counter()

        def paced():
            for i, line in enumerate(lines):
                time.sleep(max(0.0, started + i / rate - time.perf_counter()))
                yield line

        produced = produce_lines(enumerate(paced()), cluster.bootstrap, s, read_back=lines.__getitem__)
        achieved = len(lines) / (time.perf_counter() - started)
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=600, produced=produced)
        stages = cluster.stage_seconds()
        waits = mean_lags({k: v for role in PIPELINE_ROLES for k, v in stages.get(role, {}).items()})
    store = open_store(s.data_dir)
    lat = []
    for a in store.alerts():
        if a.trigger_ingested_at:
            t0 = a.trigger_ingested_at
            lat.append((a.created_at - t0).total_seconds())
    return {"latencies": lat, "rate": achieved, "events": len(lines), "waits": waits}


def mean_lags(stages: dict[str, float]) -> str:
    """'analyze 12 ms, cluster 40 ms': how long messages waited for each stage
    on average (``deepwatch_stage_lag_seconds``, summed over workers)."""
    return ", ".join(f"{k[8:]} {v / n * 1000:.0f} ms" for k, v in sorted(stages.items())
                     if k.startswith("lag_sum:") and (n := stages.get("lag_count:" + k[8:])))


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]


def filer(args: argparse.Namespace) -> None:
    cache = Path(args.cache or tempfile.gettempdir()) / "dw-bench-replay"
    feed = build_filer_feed(cache, args.events, args.filer_pictures)
    if feed is None:
        print(f"skipped: the filer's feed needs the shared sets ({REPO.parent / 'shared' / 'data'} is absent)")
        return
    n = args.events
    print(f"feed: {n} events over {args.filer_pictures} held-out pictures, variants {', '.join(FILER_VARIANTS)} "
          f"(<= 1024 px); load average before: {os.getloadavg()[0]:.2f}")
    from detectors.models.pixel_backbone import DEFAULT_BACKBONE, onnx_cache_path

    onnx = onnx_cache_path(DEFAULT_BACKBONE)
    print(f"pixel backbone ONNX export: {'cached at ' + str(onnx) if onnx and onnx.is_file() else 'not cached yet'} "
          "(the first replay on a machine exports it, ~2-10 s more)")
    runs: list[tuple[str, dict]] = []
    naive_walls: list[dict] = [naive_process(feed)]
    for spec in args.runs:
        workers, _, flags = spec.partition(":")
        count = None if workers == "default" else int(workers)
        extra = [*args.replay_arg, *(f"--{f}" for f in flags.split(",") if f)]
        with tempfile.TemporaryDirectory(prefix="dw-replay-") as tmp:
            summary = replay_process(feed, Path(tmp), count, extra)
            label = (f"{workers} worker(s)" if count else f"default ({summary.get('workers')} worker(s))") + (
                f", {' '.join(extra)}" if extra else "")
            runs.append((label, summary))
        if args.compare_repo and not flags:
            with tempfile.TemporaryDirectory(prefix="dw-replay-") as tmp:
                # an older checkout may not know the default: it gets the count this one chose
                runs.append((f"{count or summary.get('workers') or 1} worker(s), BEFORE ({args.compare_repo})",
                             replay_process(feed, Path(tmp), count or summary.get("workers") or 1, args.replay_arg,
                                            Path(args.compare_repo))))
        naive_walls.append(naive_process(feed))  # interleaved: the machine is shared
    naive_wall = statistics.median(r["wall_s"] for r in naive_walls)
    naive_loop = statistics.median(r["loop_eps"] for r in naive_walls)
    naive_cpu = statistics.median(r["cpu_s"] for r in naive_walls)
    print(f"naive single process (full decode, imagehash+pdqhash, linear scan), {len(naive_walls)} runs: "
          f"wall {naive_wall:.1f}s incl. start-up = {n / naive_wall:.1f} events/s; loop alone {naive_loop:.1f} events/s; "
          f"{naive_cpu:.1f} CPU-s")
    for label, s in runs:
        t = s.get("timings") or {}
        ingest = s.get("ingest_seconds") or s["seconds"]
        lat = p95(s.get("alert_latency_s") or [])
        print(f"deepwatch replay, {label}: wall {s['wall_s']:.1f}s = {n / s['wall_s']:.1f} events/s "
              f"= {naive_wall / s['wall_s']:.2f}x naive WITH start-up  [target >= 3x]; "
              f"every event accounted {ingest:.1f}s after the first was produced = {s['events_per_second']:.1f} events/s "
              f"= {s['events_per_second'] / naive_loop:.2f}x the naive loop WITHOUT start-up; returned after {s['seconds']:.1f}s "
              f"({s.get('models_pending', 0)} clusters without model result); complete={s['complete']}, "
              f"{s['sightings']} sightings, {sum(s['dead_letters'].values())} dead letters, {s['clusters']} clusters, "
              f"{s['alerts']} alerts (event->alert in this backlog replay: "
              f"{'-' if lat is None else f'p95 {lat * 1000:.0f} ms'}); "
              # the whole process tree's CPU: what a machine busy with other work has to find for it
              f"{s['cpu_s']:.1f} CPU-s = {s['cpu_s'] / naive_cpu:.2f}x the naive pipeline's")
        if t:
            print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if isinstance(v, (int, float))))
        for role, stages in (s.get("stage_seconds") or {}).items():
            secs = {k: v for k, v in stages.items() if not k.startswith(("events:", "lag_", "count:"))}
            counts = {k[7:]: int(v) for k, v in stages.items() if k.startswith("events:")}
            print(f"  {role} stage seconds (summed over its workers and concurrent actors): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(secs.items(), key=lambda kv: -kv[1])))
            if counts:
                print(f"  {role} events: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            if lags := mean_lags(stages):
                print(f"  {role} mean wait before each stage: {lags}")
    best = max((r for _, r in runs), key=lambda r: r["events_per_second"], default=None)
    rates = [args.rate] if args.rate else [f * best["events_per_second"] for f in args.latency_fractions] if best else []
    # The load: 3x the naive pipeline's events/s (start-up included), measured in this run.
    target_rate = 3 * n / naive_wall
    if not args.rate and best:
        rates.insert(0, target_rate)
    for rate in [] if args.no_latency else rates:
        workers = args.latency_workers
        with tempfile.TemporaryDirectory(prefix="dw-latency-") as tmp:
            lat = paced_latency(feed, Path(tmp), rate, workers)
        v = lat["latencies"]
        if v:
            print(f"event->alert latency under load: {lat['events']} events at {lat['rate']:.1f} events/s "
                  f"({'3x the naive pipeline, the target load: ' if rate == target_rate else ''}"
                  f"{rate / best['events_per_second']:.0%} of the best replay rate), {workers} worker(s) + detect role, "
                  f"{len(v)} alerts: median {statistics.median(v) * 1000:.0f} ms, p95 {p95(v) * 1000:.0f} ms, "
                  f"max {max(v) * 1000:.0f} ms  [target p95 < 3000 ms]; mean wait before each stage: "
                  f"{lat['waits'] or '-'}; load average {os.getloadavg()[0]:.2f}")
        else:
            print("event->alert latency under load: no alert raised")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pictures", type=int, default=60)
    ap.add_argument("--reposts", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.0, help="events/s for the latency run (0: 80%% of the streaming rate)")
    ap.add_argument("--filer", action="store_true",
                    help="measure the issue's way: wall time of `deepwatch replay` (start-up included) vs the naive "
                         "pipeline as its own process, on a feed over held-out shared pictures")
    ap.add_argument("--events", type=int, default=2000, help="--filer: events in the feed")
    ap.add_argument("--filer-pictures", type=int, default=200, help="--filer: pictures in the feed")
    ap.add_argument("--runs", nargs="+", default=["default", "1", "2:no-wait-models"],
                    help="--filer: replay runs to compare, each WORKERS[:FLAG,...] (WORKERS a count or `default`, "
                         "replay's own choice; flags are replay's long options without the dashes), "
                         "e.g. 2:no-wait-models")
    ap.add_argument("--replay-arg", action="append", default=[], help="--filer: extra argument for replay (repeatable)")
    ap.add_argument("--compare-repo", help="--filer: also run each flag-less replay with the code of this checkout "
                    "(e.g. `git archive OLD | tar -x -C DIR`), in the same run")
    ap.add_argument("--no-latency", action="store_true", help="--filer: skip the paced latency run")
    ap.add_argument("--latency-fractions", type=float, nargs="*", default=[0.5, 0.8],
                    help="--filer: paced latency runs at these fractions of the best replay's events/s (none given: "
                         "only the run at the issue's load, 3x the naive pipeline's events/s)")
    ap.add_argument("--latency-workers", type=int, default=2, help="--filer: pipeline workers in the latency run")
    ap.add_argument("--cache", help="--filer: where the built feed is cached (default: the temp dir)")
    args = ap.parse_args()
    if args.filer:
        filer(args)
        return
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
