""""Have we seen this picture?" on the SQLite findings store: latency and
peak memory of `deepwatch similar` / the desk's `POST /api/similar`, the
index over every member rebuilt per lookup (the old way: ``iter_members``)
against the process's member hash index (``similar.near_members``), measured
in the same run on the same store.

    python bench/similar.py [--sizes 10000,100000] [--old-max 100000] [--lookups 5]
    python bench/similar.py --sizes 1000000          # the 1M-member store (~1 min to build)

Each store holds N synthetic members (random pHash, PDQ and, for one in
three, four crop views; two members a cluster) around a few real pictures'
clusters (an original, a crop, a mirror, one merged into another). Queries:
copies, a crop and a mirror of the real pictures, and an unseen picture.
Each way runs in its own process, so its peak RSS is its own: "cold" is the
first lookup of a process (what the CLI pays: the new way builds its index
there), "warm" the median of the next ones (what the desk pays per
request), "saved" the new way's first lookup of a process that starts from
the copy of the index the previous one saved (what `deepwatch similar` pays
from its second run on). The answers of both ways are compared; they must be equal.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _jpeg(img, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def build(data: Path, n: int) -> None:
    """The store in ``data`` (``findings.sqlite``, blobs) and the queries (``data``/q-*.jpg)."""
    from PIL import ImageOps

    from detectors.hashing import compute_hashes
    from detectors.imagedata import ImageData
    from streams.blobstore import DirectoryBlobStore
    from streams.records import ClusterSnapshot, Engagement, Member, Velocity
    from streams.store import open_store
    from tests.support import picture

    blobs = DirectoryBlobStore(data / "blobs")
    store = open_store(data)

    def member(img, quality=85) -> Member:
        b = _jpeg(img, quality)
        sha = blobs.put(b)
        h = compute_hashes(ImageData(b))
        return Member(sha256=sha, phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality, event_id=f"e-{sha[:12]}",
                      views=h.views, trimmed=h.trimmed)

    def snap(cid, members, merged_into=None) -> ClusterSnapshot:
        return ClusterSnapshot(cluster_id=cid, revision=1, fake_score=0.2, verdict="no-evidence", evidence=[],
                               members=members, sightings=1, accounts=1, platforms=["x"], engagement=Engagement(),
                               velocity=Velocity(), first_seen=T0, last_seen=T0, merged_into=merged_into)

    real = []
    for k in (1, 2, 3):
        p = picture(k, (320, 240))
        real += [snap(f"real{k}", [member(p, 90), member(p.resize((240, 180)), 60)]),
                 snap(f"real{k}-crop", [member(p.crop((24, 18, 296, 222)))]),
                 snap(f"real{k}-mirror", [member(ImageOps.mirror(p))]),
                 snap(f"real{k}-old", [member(p.resize((200, 150)), 50)], merged_into=f"real{k}")]
        (data / f"q-copy{k}.jpg").write_bytes(_jpeg(p.resize((256, 192)), 70))
    (data / "q-crop1.jpg").write_bytes(_jpeg(picture(1, (320, 240)).crop((10, 10, 300, 230)), 70))
    (data / "q-mirror2.jpg").write_bytes(_jpeg(ImageOps.mirror(picture(2, (320, 240))), 70))
    (data / "q-unseen.jpg").write_bytes(_jpeg(picture(99, (320, 240)), 70))
    store.apply_snapshots(real[:6])
    rng = np.random.default_rng(n)
    db = store._db
    for lo in range(0, n, 50_000):
        k = min(50_000, n - lo)
        ph = rng.integers(0, 2**63, size=k, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
        pdq = rng.integers(0, 2**63, size=(k, 4), dtype=np.int64).astype(np.uint64)
        views = rng.integers(0, 2**63, size=(k, 4), dtype=np.int64)
        rows = []
        for j in range(k):
            i = lo + j
            v = json.dumps([f"{int(x):016x}" for x in views[j]]) if i % 3 == 0 else None
            rows.append((f"{i:064x}", f"s{i // 2:07d}", f"{int(ph[j]):016x}", "".join(f"{int(w):016x}" for w in pdq[j]),
                         100, f"s{i}", v, 0))
        db.execute("BEGIN")
        db.executemany("INSERT INTO members (sha256, cluster_id, phash, pdq, pdq_quality, event_id, views, trimmed) "
                       "VALUES (?,?,?,?,?,?,?,?)", rows)
        db.execute("COMMIT")
        if lo == 0:
            store.apply_snapshots(real[6:])  # some real clusters among the synthetic ones
    store.close()


class _AllMembers:
    """The store as lookups read it before: every member, every lookup."""

    def __init__(self, store):
        self.store = store

    def iter_members(self):
        return self.store.iter_members()


def child(mode: str, data: Path, lookups: int) -> None:
    from streams import similar
    from streams.settings import Settings
    from streams.store import open_store

    settings = Settings(data_dir=data)
    store = open_store(data)
    queries = {q.stem: similar.read_picture(q.read_bytes(), settings.decode_limits()) for q in sorted(data.glob("q-*.jpg"))}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    target = _AllMembers(store) if mode == "old" else store
    times, answers = [], {}
    for i in range(lookups):
        for name, pic in queries.items():
            t = time.perf_counter()
            if mode == "saved" and not times:  # what `deepwatch similar` pays: load the copy, then look up
                assert similar.load_index(settings, store), "no saved copy of the index to load"
            rows = similar.as_json(similar.find(settings, pic, target))
            times.append((i, time.perf_counter() - t))
            answers[name] = rows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "new":
        similar.save_index(settings, store)  # for the "saved" way, as `deepwatch similar` does
    # the old way rebuilds everything per lookup: one round, every lookup "warm" too
    print(json.dumps({"cold": times[0][1], "warm": median([t for i, t in times if i > 0] or [t for _, t in times]),
                      "peak_mb": peak / 1024, "added_mb": (peak - base) / 1024, "answers": answers}))


def run_child(mode: str, data: Path, lookups: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data), "--lookups", str(lookups)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="members in the store, comma-separated")
    ap.add_argument("--old-max", type=int, default=100_000, help="measure the old way up to this size (it is slow)")
    ap.add_argument("--lookups", type=int, default=3, help="rounds over the queries in each process")
    ap.add_argument("--child", choices=("old", "new", "saved"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.lookups)
        return 0
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print(f"{'members':>9} {'way':>4} {'build s':>8} {'cold s':>8} {'warm ms':>9} {'peak MB':>8} {'added MB':>9}")
    bad = 0
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            t = time.perf_counter()
            build(data, n)
            built = time.perf_counter() - t
            res = {"new": run_child("new", data, args.lookups)}
            res["saved"] = run_child("saved", data, args.lookups)
            if n <= args.old_max:
                res["old"] = run_child("old", data, 1)
            for way, r in res.items():
                print(f"{n:>9} {way:>4} {built:>8.1f} {r['cold']:>8.3f} {r['warm'] * 1e3:>9.1f} {r['peak_mb']:>8.0f} "
                      f"{r['added_mb']:>9.0f}")
            new, saved = res["new"], res["saved"]
            print(f"{'':>9} saved copy of the index: answers equal {saved['answers'] == new['answers']}, "
                  f"cold without/with {new['cold'] / saved['cold']:.1f}x")
            bad += saved["answers"] != new["answers"]
            seen = {k: [x.get("cluster_id") or x.get("bank") for x in v] for k, v in new["answers"].items()}
            print(f"{'':>9} found: " + "; ".join(f"{k[2:]}={','.join(v) or '-'}" for k, v in seen.items()))
            # (picture(1)'s hashes are near its mirror's: its mirror cluster may rank first)
            if not all(f"real{k}" in seen[f"q-copy{k}"] for k in (1, 2, 3)) or seen["q-unseen"]:
                print("  WRONG: a real picture's copy does not find its cluster, or the unseen picture finds one")
                bad += 1
            if "old" in res:
                old = res["old"]
                same = old["answers"] == new["answers"]
                bad += not same
                print(f"{'':>9} answers equal: {same}; warm old/new {old['warm'] / new['warm']:.0f}x, "
                      f"cold old/new {old['cold'] / new['cold']:.1f}x, added memory old/new "
                      f"{old['added_mb'] / max(1.0, new['added_mb']):.1f}x")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
