"""Soak: is a worker's memory flat over a long stream?

Drives the worker's per-event path in this process — validate, the analyze
stage (fetch, decode/hash with its analysis cache, dedupe), the cluster
engine with an in-memory table (the worker's Faust table is ``memory://``) —
over synthetic events: ``--pictures`` distinct pictures reposted by fresh
accounts, one event every ``--gap`` seconds of event time, with a hostile
line every 50 events. Prints RSS every ``--every`` events, then:

* the baseline: RSS after the first 10% of the run (caches and the hot index
  warm), measured in this run;
* the growth after it, as MiB per 100k events and as a ratio end/baseline;
* the RSS this slope extrapolates to at 1M events, when the run stopped
  earlier (``--seconds`` bounds it; 1M events can take longer than a shared
  2-core machine should spend). The extrapolation is linear and says so.

Usage: python bench/soak.py [--events 1000000] [--seconds 600] [--pictures 200]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.analyze import Analyzer  # noqa: E402
from streams.clustering import ClusterEngine, ClusterState  # noqa: E402
from streams.demo_feed import BASE_TIME  # noqa: E402
from streams.records import ClusterOp, SourceRef  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stage import AnalyzeStage  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pictures(n: int) -> list[bytes]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support import picture

    out = []
    for i in range(n):
        buf = io.BytesIO()
        picture(10_000 + i, (160, 120)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


class PictureFetcher:
    """Serves the event's picture from memory (the soak is about the stages'
    memory, not disk or network)."""

    def __init__(self, pics: list[bytes]):
        self.pics = pics

    async def get(self, ev) -> bytes:
        return self.pics[int(ev.image.path.split("-")[1])]


class NoStore:
    """The findings store is disk, not worker memory; dedupe lookups miss."""

    def sighting_identity(self, event_id: str) -> None:
        return None

    def mark_processed(self, *a) -> None:
        pass


def event_line(i: int, n_pics: int, gap: float) -> bytes:
    if i % 50 == 49:
        return [b"{not json", b"[" * 5000, json.dumps({"event_id": "x" * 600}).encode()][i // 50 % 3]
    doc = {"event_id": f"soak-{i}", "platform": "x", "account_id": f"acct-{i % 100_000}",
           "posted_at": (BASE_TIME + timedelta(seconds=i * gap)).isoformat(),
           "text": "repost " * 20, "image": {"path": f"pic-{i % n_pics}"}}
    return json.dumps(doc).encode()


async def soak(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="deepwatch-soak-"))
    settings = Settings(data_dir=tmp)
    stage = AnalyzeStage(settings, PictureFetcher(pictures(args.pictures)), Analyzer(settings, tmp / "blobs"),
                         lambda data, sha256: None, NoStore)
    engine = ClusterEngine(settings)
    table: dict[str, bytes] = {}

    def get(cid: str) -> ClusterState | None:
        raw = table.get(cid)
        return ClusterState.loads(raw) if raw else None

    samples: list[tuple[int, float]] = [(0, rss_mib())]
    started = time.monotonic()
    outcomes = {"sighting": 0, "dead_letter": 0}
    i = 0
    while i < args.events and time.monotonic() - started < args.seconds:
        src = SourceRef(topic="soak", partition=0, offset=i)
        result = await stage.process(event_line(i, args.pictures, args.gap), src)
        if result.op is not None:
            out = engine.apply(ClusterOp.loads(result.op), i, get)
            for cid, st in out.writes.items():
                table[cid] = st.dumps()
            if engine.evict_due():
                for cid in engine.evict(get):
                    table.pop(cid, None)
            outcomes["sighting"] += 1
        else:
            outcomes["dead_letter"] += 1
        i += 1
        if i % args.every == 0:
            samples.append((i, rss_mib()))
            print(f"{i:>9} events  RSS {samples[-1][1]:7.1f} MiB  {i / (time.monotonic() - started):6.0f} events/s",
                  flush=True)
    seconds = time.monotonic() - started
    if samples[-1][0] != i:
        samples.append((i, rss_mib()))
    return {"events": i, "seconds": round(seconds, 1), "samples": samples, "outcomes": outcomes,
            "table_bytes": sum(len(v) for v in table.values()), "clusters": len(table)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--pictures", type=int, default=200)
    p.add_argument("--gap", type=float, default=0.1, help="event-time seconds between events")
    p.add_argument("--every", type=int, default=20_000)
    p.add_argument("--quick", action="store_true", help="50k events (make bench)")
    args = p.parse_args()
    if args.quick:
        args.events, args.every = 50_000, 5_000
    r = asyncio.run(soak(args))
    samples = r["samples"]
    warm = next((s for s in samples if s[0] >= r["events"] * 0.1), samples[-1])
    end = samples[-1]
    span = max(1, end[0] - warm[0])
    slope = (end[1] - warm[1]) / span * 100_000  # MiB per 100k events
    print(f"\nsoak: {r['events']} events in {r['seconds']} s "
          f"({r['outcomes']['sighting']} sightings, {r['outcomes']['dead_letter']} dead letters), "
          f"{r['clusters']} clusters, table {r['table_bytes'] / 2**20:.1f} MiB")
    print(f"baseline RSS (after {warm[0]} events, same run): {warm[1]:.1f} MiB; end: {end[1]:.1f} MiB; "
          f"ratio end/baseline {end[1] / warm[1]:.3f}; growth {slope:+.2f} MiB per 100k events")
    if r["events"] < 1_000_000:
        projected = end[1] + slope * (1_000_000 - end[0]) / 100_000
        print(f"stopped at {r['events']} events (--seconds {args.seconds}); linear extrapolation to 1M events: "
              f"{projected:.1f} MiB (an estimate, not a measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
