"""The naive baseline the issue sets: one process, full decode, imagehash +
pdqhash, a linear scan over every hash seen so far.

Its own module (no deepwatch imports) so that, run as a process, its start-up
is only what such a script really pays: ``python bench/naive_pipeline.py FEED``
prints ``{"events": N, "eps": loop events/s}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import imagehash
import numpy as np
import pdqhash
from PIL import Image


def naive(feed: Path) -> float:
    """Events/s of the loop alone (start-up excluded)."""
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


if __name__ == "__main__":
    feed = Path(sys.argv[1])
    eps = naive(feed)
    print(json.dumps({"events": sum(1 for _ in feed.open("rb")), "eps": eps}))
