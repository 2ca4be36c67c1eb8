"""The cluster stage's decision unit alone at scale: ``ClusterIndex.assign``
ops/s with N members already in the hot index (default 1M and 10M).

The members are *synthetic* codes (random 64-bit pHashes with 24 view codes
each, random 256-bit PDQs, and for representatives a random 32x32 grey
thumbnail, the 1 KB pixel verification keeps per representative), four
members per cluster, one of them the representative -- no image set holds millions of pictures. Queries are a mix
like a live feed: half reposts of indexed pictures (0-6 pHash bits and 0-20 PDQ
bits flipped, the representative's thumbnail with a little noise: they join
after pixel verification), half new pictures (they found clusters and are
indexed). Random codes are the easy case for candidate search (few
near-collisions); real pictures cluster in hash space somewhat, so read these
as an upper bound for the search and an exact cost for everything else.

    .venv/bin/python bench/cluster_scale.py [--sizes 1000000,10000000] [--queries 2000]

Prints build time, resident memory growth and ops/s per size, one core; and
in the same run, on further query sets of the same mix, ops/s with pixel
verification off (hashes alone) and without links by representatives
(``ClusterIndex(representative_links=False)``, the rule before them) for the ratios.
"""

from __future__ import annotations

import base64
import resource
import sys
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.hashing import ImageHashes  # noqa: E402
from detectors.neardup import ClusterIndex  # noqa: E402

VIEWS = 24
PER_CLUSTER = 4


def _flip(x: np.ndarray, bits: int, rng: np.random.Generator, width: int) -> np.ndarray:
    x = x.copy()
    for b in rng.choice(width, bits, replace=False):
        x[b // 64] ^= np.uint64(1) << np.uint64(b % 64)
    return x


def build(n: int, rng: np.random.Generator, chunk: int = 1_000_000) -> tuple[ClusterIndex, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    index = ClusterIndex()
    reps = []
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        ph = rng.integers(0, 2**63, m, dtype=np.uint64) << np.uint64(1) | rng.integers(0, 2, m, dtype=np.uint64)
        pq = rng.integers(0, 2**63, (m, 4), dtype=np.uint64)
        vw = rng.integers(0, 2**63, (m, VIEWS), dtype=np.uint64)
        ids = np.arange(lo, lo + m)
        rep = ids % PER_CLUSTER == 0
        cids = [f"c{i // PER_CLUSTER:015x}" for i in ids.tolist()]
        shas = [f"{i:064x}" for i in ids.tolist()]
        th = rng.integers(0, 256, (int(rep.sum()), 32, 32), dtype=np.uint8)  # representatives only keep one
        slot = np.cumsum(rep) - 1
        thumbs = [th[slot[i]] if r else None for i, r in enumerate(rep.tolist())]
        index.add_bulk(cids, shas, ph, pq, np.full(m, 90), vw, rep, thumbs=thumbs)
        reps.append((ph[rep], pq[rep], vw[rep], th))
    index._phash.compact()
    index._phash_views.compact()
    index._pdq.compact()
    ph, pq, vw, th = (np.concatenate(x) for x in zip(*reps))
    return index, ph, pq, vw, th


def queries(k: int, ph: np.ndarray, pq: np.ndarray, vw: np.ndarray, th: np.ndarray,
            rng: np.random.Generator) -> list[tuple[str, ImageHashes]]:
    out = []
    for i in range(k):
        if i % 2 == 0:  # a repost of an indexed picture
            j = int(rng.integers(0, len(ph)))
            p = _flip(ph[j : j + 1], int(rng.integers(0, 7)), rng, 64)[0]
            q = _flip(pq[j], int(rng.integers(0, 21)), rng, 256)
            v = vw[j]
            t = np.clip(th[j].astype(np.int16) + rng.integers(-3, 4, th[j].shape), 0, 255).astype(np.uint8)
        else:  # a new picture
            p = rng.integers(0, 2**63, dtype=np.uint64)
            q = rng.integers(0, 2**63, 4, dtype=np.uint64)
            v = rng.integers(0, 2**63, VIEWS, dtype=np.uint64)
            t = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        h = ImageHashes(phash=f"{int(p):016x}", pdq="".join(f"{int(w):016x}" for w in q), pdq_quality=90,
                        phash_mirror=f"{int(p) ^ 0x5555555555555555:016x}", pdq_mirror=None,
                        views=[f"{int(x):016x}" for x in v], trimmed=False,
                        thumb=base64.b64encode(t.tobytes()).decode())
        out.append((f"q{i:063x}", h))
    return out


def main(
    sizes: str = typer.Option("1000000,10000000", help="members in the index, comma-separated"),
    n_queries: int = typer.Option(2000, "--queries"),
) -> None:
    print("# cluster stage alone: ClusterIndex.assign with N synthetic members in the hot index, one core")
    print(f"# {PER_CLUSTER} members per cluster (1 representative), {VIEWS} view codes per member, queries half reposts / half new")
    print(f"{'members':>12s} {'reps indexed':>13s} {'build s':>8s} {'RSS +GiB':>9s} {'assign ops/s':>13s} {'joined':>7s} "
          f"{'founded':>8s} {'ops/s unverified':>17s} {'ops/s no rep-link':>16s}")
    for n in (int(x) for x in sizes.split(",")):
        rng = np.random.default_rng(n)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        index, ph, pq, vw, th = build(n, rng)
        built = time.perf_counter() - t
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
        qs = queries(n_queries, ph, pq, vw, th, rng)
        plain_qs = [(f"u{s[1:]}", h) for s, h in queries(n_queries, ph, pq, vw, th, rng)]
        nolink_qs = [(f"v{s[1:]}", h) for s, h in queries(n_queries, ph, pq, vw, th, rng)]
        # alternate blocks of the query sets so all see the same machine load and index growth:
        # the rule as is, hashes alone (no verification), and without links by representatives
        verify_max, spent, res = index.verify_max, [0.0, 0.0, 0.0], []
        for lo in range(0, n_queries, 100):
            for k, block in enumerate((qs[lo:lo + 100], plain_qs[lo:lo + 100], nolink_qs[lo:lo + 100])):
                index.verify_max = None if k == 1 else verify_max
                index.representative_links = k == 0
                t = time.perf_counter()
                out = [index.assign(s, h) for s, h in block]
                spent[k] += time.perf_counter() - t
                if k == 0:
                    res += out
        index.verify_max, index.representative_links = verify_max, True
        ops, plain, nolink = len(qs) / spent[0], len(plain_qs) / spent[1], len(nolink_qs) / spent[2]
        joined = sum(not r.new_cluster for r in res)
        print(f"{n:12,d} {len(ph):13,d} {built:8.0f} {rss:9.1f} {ops:13,.0f} {joined:7d} {len(res) - joined:8d} {plain:17,.0f}"
              f" {nolink:16,.0f}", flush=True)
        del index, ph, pq, vw, th


if __name__ == "__main__":
    typer.run(main)
