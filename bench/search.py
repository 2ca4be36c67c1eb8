"""Analyst search on the embedded SQLite store: `deepwatch search` latency as
a ratio of listing every cluster (`deepwatch clusters`), measured in the same
run on a synthetic store.

    python bench/search.py [--clusters 3000]

Each cluster gets 4 sightings with random 3-word texts and a hashtag from a
10-word vocabulary (so a two-word query hits ~10 % of clusters). Prints the
best of 3 for each query; a ratio well under 1 means the search builds only
its candidates, not the whole table.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.base import Evidence  # noqa: E402
from detectors.hashing import ImageHashes  # noqa: E402
from streams.cluster_search import ClusterQuery  # noqa: E402
from streams.records import ClusterSnapshot, Engagement, ImageEvent, Member, Sighting, SourceRef, Velocity  # noqa: E402
from streams.store import SqliteFindingsStore  # noqa: E402

WORDS = "fire flood pope storm harbour subway protest election rally crash".split()
T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)


def fill(store: SqliteFindingsStore, n: int, rng: random.Random) -> None:
    for c in range(n):
        cid, sha = f"c{c:06d}", f"{c:064x}"
        member = Member(sha256=sha, phash="0" * 16, pdq="0" * 64, pdq_quality=100, event_id=f"e{c * 4}")
        for k in range(4):
            i = c * 4 + k
            ev = ImageEvent(event_id=f"e{i}", platform=rng.choice(["x", "bsky"]), account_id=f"u{rng.randrange(5000)}",
                            posted_at=T0 + timedelta(minutes=i % 600), text=" ".join(rng.sample(WORDS, 3)),
                            hashtags=[rng.choice(WORDS)], image={"path": "p.jpg"})
            s = Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=i), sha256=sha,
                         width=8, height=8, format="PNG", hashes=ImageHashes(phash="0" * 16, pdq="0" * 64, pdq_quality=100))
            store.apply_snapshot(ClusterSnapshot(
                cluster_id=cid, revision=k + 1, fake_score=rng.random(), verdict="inconclusive",
                evidence=[Evidence(detector="d", score=0.5, detail="x")], members=[member], sightings=k + 1,
                accounts=k + 1, platforms=[ev.platform], engagement=Engagement(), velocity=Velocity(sightings_5m=k),
                first_seen=T0, last_seen=ev.posted_at, new_sighting=s))


def best_of(fn, n: int = 3) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(n):
        t = time.perf_counter()
        size = len(fn())
        best = min(best, time.perf_counter() - t)
    return best, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = SqliteFindingsStore(Path(d) / "findings.sqlite")
        t = time.perf_counter()
        fill(store, args.clusters, random.Random(1))
        print(f"store: {args.clusters} clusters, {4 * args.clusters} sightings (filled in {time.perf_counter() - t:.1f} s)")
        base, n_all = best_of(store.clusters)
        print(f"baseline  clusters(): {base * 1000:7.1f} ms  ({n_all} clusters)")
        for q in (ClusterQuery(text="fire flood"), ClusterQuery(hashtag="storm", sort="score"),
                  ClusterQuery(platform="x", since=T0 + timedelta(hours=9), sort="last_seen"),
                  ClusterQuery(sort="velocity", limit=50)):
            dt, n = best_of(lambda: store.search(q))
            label = ", ".join(f"{k}={v}" for k, v in q.model_dump(exclude_defaults=True, mode="json").items())
            print(f"search({label}): {dt * 1000:7.1f} ms  ({n} hits)  ratio to baseline {dt / base:.2f}")
        store.close()


if __name__ == "__main__":
    main()
