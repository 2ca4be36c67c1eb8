"""One picture going viral through the cluster stage: the single writer's cost
per sighting, and the bytes it writes per state, as the cluster's last hour
fills up.

Every sighting of a cluster rewrites the cluster's whole state (the Faust
table's changelog record and ``engine-state.sqlite``); a viral picture's
state holds up to ``virality.MAX_RECENT`` sightings of its last hour and
``MAX_ACCOUNTS`` accounts. This feeds N reposts of one picture (a new account
each, Bluesky-style ids: ``did:plc:`` accounts and ``at://`` post ids, 20
reposts per second of event time) through ``ClusterStage`` in batches as the
agent takes them (a dict for the table, the real SQLite engine state store),
and prints, per slice of the feed, ms per sighting, the largest state
written, and the ratio to the first slice (the same run's baseline: a
cluster still small). With ``--compare-repo DIR`` it also runs the same feed
with the code of that checkout (e.g. ``git archive HEAD~1``) in a subprocess.

    .venv/bin/python bench/viral_cluster.py [--reposts 12000] [--compare-repo DIR]

Needs nothing outside the repository.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KAFKA_DEFAULT_MAX_MESSAGE = 1_048_588  # the broker's message.max.bytes default


@dataclass
class _Msg:
    offset: int
    topic: str = "cluster-ops"
    partition: int = 0


class _Topic:
    async def send(self, key: bytes, value: bytes) -> None:
        pass


def run(reposts: int, slices: int, batch: int) -> list[tuple[int, float, int]]:
    """(reposts so far, ms per sighting over the slice, largest state written in it)."""
    from detectors.hashing import compute_hashes
    from detectors.imagedata import ImageData
    from streams.cluster_stage import ClusterStage
    from streams.demo_feed import BASE_TIME, jpeg_bytes, scene
    from streams.engine_state import open_engine_state
    from streams.records import ClusterOp, ImageEvent, Sighting, SourceRef
    from streams.settings import Settings

    data = jpeg_bytes(scene(7), 85)
    im = ImageData(data)
    hashes = compute_hashes(im)

    def op(i: int) -> bytes:
        ev = ImageEvent.model_validate({
            "event_id": f"at://did:plc:{i:024d}/app.bsky.feed.post/{i:013d}", "platform": "bsky",
            "account_id": f"did:plc:{i:024d}", "posted_at": (BASE_TIME + timedelta(seconds=i / 20)).isoformat(),
            "image": {"url": "https://img.example/x.jpg"},
        })
        s = Sighting(event=ev, source=SourceRef(topic="events", partition=0, offset=i), sha256=im.sha256,
                     width=im.size[0], height=im.size[1], format=im.format, hashes=hashes)
        return ClusterOp(kind="sighting", sighting=s).dumps()

    ops = [op(i) for i in range(reposts)]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=tmp)

        class Sized(dict):
            """The table, remembering the largest state written to it."""
            largest = 0

            def __setitem__(self, k, v):
                Sized.largest = max(Sized.largest, len(v))
                super().__setitem__(k, v)

        table = Sized()
        dead: list = []

        async def send_dead(dl):
            dead.append(dl)

        stage = ClusterStage(settings, table, open_engine_state(tmp), updates=_Topic(), detect_requests=_Topic(),
                             alerts=_Topic(), send_dead=send_dead)
        rows = []
        step = max(1, reposts // slices)

        async def go():
            for start in range(0, reposts, step):
                Sized.largest = 0
                t0 = time.process_time()
                for b in range(start, min(reposts, start + step), batch):
                    await stage.handle_batch([(ops[i], _Msg(i)) for i in range(b, min(reposts, start + step, b + batch))])
                n = min(reposts, start + step) - start
                rows.append((start + n, (time.process_time() - t0) / n * 1e3, Sized.largest))

        asyncio.run(go())
        if dead:
            raise SystemExit(f"{len(dead)} ops became dead letters: {dead[0].detail}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reposts", type=int, default=12000)
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--batch", type=int, default=0, help="ops per batch (0: the settings' batch.cluster_max_ops)")
    ap.add_argument("--compare-repo", help="also run the same feed with the code of this checkout")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", default=str(REPO), help=argparse.SUPPRESS)  # whose streams/ and detectors/ run
    args = ap.parse_args()
    sys.path.insert(0, args.code)
    if not args.batch:
        from streams.settings import Settings

        args.batch = Settings().batch.cluster_max_ops
    rows = run(args.reposts, args.slices, args.batch)
    if args.rows_only:
        print(repr(rows))
        return
    before = None
    if args.compare_repo:
        out = subprocess.run([sys.executable, __file__, "--rows-only", "--code", str(Path(args.compare_repo).resolve()),
                              "--reposts", str(args.reposts), "--slices", str(args.slices), "--batch", str(args.batch)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"--compare-repo run failed:\n{out.stderr[-2000:]}")
        before = {n: (ms, size) for n, ms, size in ast.literal_eval(out.stdout.strip().splitlines()[-1])}
    print(f"# one picture reposted by {args.reposts} accounts (Bluesky-style ids, 20/s of event time), "
          f"through ClusterStage in batches of {args.batch}; one core")
    head = f"{'reposts':>8} {'ms/sighting':>12} {'x first slice':>14} {'largest state':>14}"
    print(head + (f" {'BEFORE ms':>10} {'BEFORE state':>13} {'speed-up':>9}" if before else ""))
    base = rows[0][1]
    for n, ms, size in rows:
        line = f"{n:>8} {ms:>12.2f} {ms / base:>14.1f} {size / 1024:>11.0f} KB"
        if before and n in before:
            bms, bsize = before[n]
            line += f" {bms:>10.2f} {bsize / 1024:>10.0f} KB {bms / ms:>8.1f}x"
        print(line)
    largest = max(size for _, _, size in rows)
    print(f"largest state written: {largest / 1024:.0f} KB ({'under' if largest < KAFKA_DEFAULT_MAX_MESSAGE else 'OVER'}"
          f" Kafka's default max.message.bytes, {KAFKA_DEFAULT_MAX_MESSAGE / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
