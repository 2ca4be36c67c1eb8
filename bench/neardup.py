"""Near-duplicate bench: robustness table, stage speed vs a naive pipeline, and
index throughput at millions of hashes, all measured in one run.

    .venv/bin/python bench/neardup.py [--quick] [DIR ...]

DIRs default to ../shared/data/detect-dev and detect-dev2 (relative to the repo).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.neardup_images import load_images  # noqa: E402
from bench.neardup_transforms import TRANSFORMS  # noqa: E402
from detectors.hashing import ImageHashes, compute_hashes  # noqa: E402
from detectors.imagedata import ImageData  # noqa: E402
from detectors.neardup import ClusterIndex, HammingIndex, pair_match  # noqa: E402


def _hex_bits(hexes: list[str], nbits: int) -> np.ndarray:
    return HammingIndex.codes_from_hex(hexes, nbits)


def _png(img) -> ImageData:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return ImageData(buf.getvalue())


# ------------------------------------------------------------------ quality
def robustness(images, pt: int, qt: int, mq: int, vt: int) -> None:
    t0 = time.perf_counter()
    origs = [compute_hashes(_png(im)) for _, im in images]
    variants = {name: [compute_hashes(ImageData(fn(im))) for _, im in images] for name, fn in TRANSFORMS.items()}
    rule = dict(phash_threshold=pt, pdq_threshold=qt, pdq_min_quality=mq, view_threshold=vt)
    print(f"\n## Robustness: {len(images)} distinct images, rule pHash<={pt} | (PDQ<={qt} & quality>={mq}), mirrors queried,"
          f" views (trimmed border, 90%/80% centre crops) <={vt}")
    print(f"originals with a detected border (trimmed view): {sum(o.trimmed for o in origs)}")
    print(f"{'transform':20s} {'recall':>7s} {'reverse':>7s} {'no views':>8s}  {'pHash med/p90':>13s}  {'best view med/p90':>17s}  {'PDQ med/p90':>11s}  trimmed")
    for name, vs in variants.items():
        # recall: the repost queried against the indexed original; reverse: the
        # original arriving after the repost was indexed; no views: the old rule
        hits = [pair_match(v, o, **rule) is not None for v, o in zip(vs, origs)]
        rev = [pair_match(o, v, **rule) is not None for v, o in zip(vs, origs)]
        bare = [pair_match(_noviews(v), _noviews(o), **rule) is not None for v, o in zip(vs, origs)]
        dp = [min(_d(v.phash, o.phash), _d(v.phash_mirror, o.phash)) for v, o in zip(vs, origs)]
        dv = [_best_view(v, o) for v, o in zip(vs, origs)]
        dq = [min(_d(v.pdq, o.pdq), _d(v.pdq_mirror, o.pdq)) for v, o in zip(vs, origs)]
        print(f"{name:20s} {np.mean(hits):7.1%} {np.mean(rev):7.1%} {np.mean(bare):8.1%}  {np.median(dp):6.0f}/{np.percentile(dp, 90):<6.0f}"
              f"  {np.median(dv):8.0f}/{np.percentile(dv, 90):<8.0f}  {np.median(dq):5.0f}/{np.percentile(dq, 90):<5.0f}  {np.mean([v.trimmed for v in vs]):5.0%}")
    # false matches: every pair of *different* images, over originals and all variants
    everything: list[ImageHashes] = origs + [h for vs in variants.values() for h in vs]
    owner = np.tile(np.arange(len(origs)), 1 + len(variants))
    fm, pairs, _ = _false_matches(everything, owner, pt, qt, mq, vt)
    print(f"false-match rate over {pairs:,} different-file pairs: {fm / pairs:.4%} ({fm} pairs), raw")
    # The sets hold some pictures twice under different files (one SD prompt+seed
    # rendered on CPU/GPU/NE, HDR on/off of one shot): group originals the rule
    # links, list them for a human to check, and count only across groups.
    group = list(range(len(origs)))
    for i in range(len(origs)):
        for j in range(i + 1, len(origs)):
            if pair_match(origs[i], origs[j], **rule) or pair_match(origs[j], origs[i], **rule):
                print(f"  same picture in the data: {images[i][0]}  ~  {images[j][0]}")
                gi, gj = group[i], group[j]
                group = [gi if g == gj else g for g in group]
    owner = np.tile(np.asarray(group), 1 + len(variants))
    fm, pairs, sweep = _false_matches(everything, owner, pt, qt, mq, vt)
    print(f"false-match rate over {pairs:,} different-picture pairs: {fm / pairs:.4%} ({fm} pairs)   [target <= 0.01%]")
    fm0, _, _ = _false_matches([_noviews(h) for h in everything], owner, pt, qt, mq, vt)
    print(f"  of which without views (the full-frame rule alone): {fm0 / pairs:.4%} ({fm0} pairs)")
    print("  view-threshold sweep (full rule fixed): " + ", ".join(f"<={t}: {c / pairs:.4%}" for t, c in sweep))
    print(f"  ({time.perf_counter() - t0:.0f} s)")


def _d(a: str | None, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count() if a else 1 << 30


def _noviews(h: ImageHashes) -> ImageHashes:
    return h.model_copy(update={"views": None, "trimmed": False})


def _best_view(q: ImageHashes, m: ImageHashes) -> int:
    """Smallest distance over the pHash pairs that involve a view (either side)."""
    qc, mc = _qcodes(q), _mcodes(m)
    ds = [_d(a, b) for k, a in enumerate(qc) for s, b in enumerate(mc) if a and b and _THR_KIND[k][s] == "v"]
    return min(ds) if ds else 64


# query-side codes: full, mirror, trimmed, crop90, crop80; indexed side: full, trimmed, crop90, crop80.
# "f": the full-frame rule (pHash threshold), "v": a view pair (view threshold), "": not compared
_THR_KIND = [
    ["f", "v", "v", "v"],
    ["f", "v", "v", "v"],
    ["v", "v", "v", "v"],
    ["v", "v", "", ""],
    ["v", "v", "", ""],
]


def _slots(h: ImageHashes) -> list[str | None]:
    views = list(h.views or [])
    trim = views.pop(0) if h.trimmed and views else None
    return [trim] + (views + [None, None])[:2]


def _qcodes(h: ImageHashes) -> list[str | None]:
    return [h.phash, h.phash_mirror] + _slots(h)


def _mcodes(h: ImageHashes) -> list[str | None]:
    return [h.phash] + _slots(h)


def _false_matches(hs: list[ImageHashes], owner: np.ndarray, pt: int, qt: int, mq: int, vt: int):
    def codes(rows: list[list[str | None]]) -> tuple[np.ndarray, np.ndarray]:
        k = len(rows[0])
        flat = [c or "0" * 16 for r in rows for c in r]
        valid = np.array([[c is not None for c in r] for r in rows])
        return _hex_bits(flat, 64).reshape(len(rows), k), valid

    qc, qv = codes([_qcodes(h) for h in hs])
    mc, mv = codes([_mcodes(h) for h in hs])
    pq = _hex_bits([h.pdq for h in hs], 256)
    pqm = _hex_bits([h.pdq_mirror or h.pdq for h in hs], 256)
    good = np.array([h.pdq_quality >= mq for h in hs])
    full = np.array([[k == "f" for k in row] for row in _THR_KIND])
    view = np.array([[k == "v" for k in row] for row in _THR_KIND])
    fm = pairs = 0
    sweep_ts = (6, 7, 8, 9, 10, 12)
    sweep = np.zeros(len(sweep_ts), dtype=np.int64)
    for i in range(len(hs)):  # row i as the query side against every indexed j
        d = np.bitwise_count(qc[i][:, None, None] ^ mc[None, :, :]).astype(np.int16)  # (5 query codes, n, 4 slots)
        ok = qv[i][:, None, None] & mv[None, :, :]
        d_full = np.where(ok & full[:, None, :], d, 999).min(axis=(0, 2))
        d_view = np.where(ok & view[:, None, :], d, 999).min(axis=(0, 2))
        dq = np.minimum(np.bitwise_count(pq[i] ^ pq).sum(1), np.bitwise_count(pqm[i] ^ pq).sum(1))
        other = owner != owner[i]
        base = (d_full <= pt) | ((dq <= qt) & good & good[i])
        hit = base | (d_view <= vt)
        fm += int((hit & other).sum())
        pairs += int(other.sum())
        sweep += np.array([int(((base | (d_view <= t)) & other).sum()) for t in sweep_ts])
    return fm, pairs, list(zip(sweep_ts, sweep.tolist()))


# -------------------------------------------------------------------- speed
def stage_speed(images, index_size: int, vt: int) -> None:
    import imagehash
    import pdqhash
    from PIL import Image

    rng = np.random.default_rng(0)
    jpegs = []
    for _, im in images[:40]:
        buf = io.BytesIO()
        im.convert("RGB").resize((1024, 768)).save(buf, "JPEG", quality=85)
        jpegs.append(buf.getvalue())
    hot = rng.integers(0, 2**63, (index_size, 1), dtype=np.uint64)  # the naive pipeline's linear-scan table
    index = ClusterIndex(view_threshold=vt)
    # pre-populate the cluster index through its public path (bulk random
    # members, each with two crop views and one in ten with a trimmed view, as
    # in the data); PDQ untrusted here, so only pHash codes are searched
    views = rng.integers(0, 2**63, (index_size, 3), dtype=np.uint64)
    t0 = time.perf_counter()
    for i in range(index_size):
        trimmed = i % 10 == 0
        vs = [f"{int(v):016x}" for v in views[i, (0 if trimmed else 1) :]]
        h = ImageHashes(phash=f"{int(hot[i, 0]):016x}", pdq="0" * 64, pdq_quality=0, views=vs, trimmed=trimmed)
        index.add(f"c{i}", f"s{i}", h)
    build = time.perf_counter() - t0

    def bare(data: bytes) -> None:
        ImageData(data).thumbnail(128)

    def naive(data: bytes) -> None:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        ph = int(str(imagehash.phash(img)), 16)
        pdqhash.compute(np.asarray(img))
        np.nonzero(np.bitwise_count(hot[:, 0] ^ np.uint64(ph)) <= 10)

    fresh = iter(range(10**9))

    def ours(data: bytes) -> None:
        d = ImageData(data)
        # a fresh key every call, so repeats across rounds never take the exact-sha256 shortcut
        index.assign(f"{d.sha256}:{next(fresh)}", compute_hashes(d))

    def per_image(fn) -> float:
        fn(jpegs[0])
        t = time.perf_counter()
        for data in jpegs:
            fn(data)
        return (time.perf_counter() - t) / len(jpegs) * 1e3

    # interleaved rounds, best of 3: the box is shared, so keep each variant's least-disturbed run
    rounds = [(per_image(bare), per_image(naive), per_image(ours)) for _ in range(3)]
    t_bare, t_naive, t_ours = (min(r[k] for r in rounds) for k in range(3))
    print(f"\n## Hash + dedupe stage, one core, 1024x768 JPEG q85, {len(jpegs)} images, hot set {index_size:,} members")
    print(f"bare draft decode      {t_bare:6.2f} ms/image")
    print(f"naive (full decode, imagehash.phash, pdqhash.compute, linear scan; no mirrors)  {t_naive:6.2f} ms/image")
    print(f"deepwatch (draft decode, pHash+PDQ+both mirrors+views, ClusterIndex.assign)     {t_ours:6.2f} ms/image")
    print(f"speed-up vs naive: {t_naive / t_ours:.1f}x  [target >= 5x]   vs bare decode: {t_ours / t_bare:.2f}x  [target <= 2.5x]")
    codes = len(index._phash) + len(index._phash_views)
    print(f"(cluster index of {index_size:,} members, {codes:,} pHash codes incl. views, built via add() in {build:.1f} s)")
    memory(200_000)


def memory(n: int) -> None:
    """Bytes per member of a compacted ClusterIndex with views and trusted PDQ."""
    rng = np.random.default_rng(2)
    ph = rng.integers(0, 2**63, (n, 4), dtype=np.uint64)
    pq = rng.integers(0, 2**63, (n, 4), dtype=np.uint64)
    index = ClusterIndex()
    for i in range(n):
        trimmed = i % 10 == 0
        vs = [f"{int(v):016x}" for v in ph[i, (1 if trimmed else 2) :]]
        pdq = "".join(f"{int(v):016x}" for v in pq[i])
        index.add(f"c{i}", f"s{i}", ImageHashes(phash=f"{int(ph[i, 0]):016x}", pdq=pdq, pdq_quality=90, views=vs, trimmed=trimmed))
    index._phash.compact()
    index._phash_views.compact()
    index._pdq.compact()

    def split(h: HammingIndex) -> tuple[float, float]:
        fixed = sum(t[0].nbytes for t in h._tables)  # bucket offsets: a constant per table, not per code
        return (h.nbytes - fixed) / n * 1e6 / 2**20, fixed / 2**20

    (fr_m, fr_fixed), (vw_m, vw_fixed), (pq_m, pq_fixed) = split(index._phash), split(index._phash_views), split(index._pdq)
    ph_m, ph_fixed = fr_m + vw_m, fr_fixed + vw_fixed
    codes_per_member = (len(index._phash) + len(index._phash_views)) / n
    print(f"index memory ({n:,} members with views and trusted PDQ, compacted): pHash incl. views {ph_m:.0f} MiB per million members"
          f" ({codes_per_member:.1f} codes each; {ph_m / codes_per_member:.0f} without views), PDQ {pq_m:.0f} MiB per million,"
          f" + fixed bucket tables {ph_fixed + pq_fixed:.0f} MiB")

def index_speed(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2**63, (n, 1), dtype=np.uint64) ^ (rng.integers(0, 2, (n, 1), dtype=np.uint64) << np.uint64(63))
    nq = 2000
    queries = codes[rng.integers(0, n, nq)].copy()
    for i in range(nq):  # near-duplicate queries: 0-10 bits away from an indexed hash
        for b in rng.choice(64, i % 11, replace=False):
            queries[i, 0] ^= np.uint64(1 << int(b))
    print(f"\n## Exact range search (r=10) over {n:,} random 64-bit hashes, one core")
    t = time.perf_counter()
    idx = HammingIndex(64)
    idx.add(np.arange(n), codes)
    idx.compact()
    print(f"HammingIndex (multi-index hashing) build {time.perf_counter() - t:.1f} s, "
          f"{idx.nbytes / n * 1e6 / 2**20:.1f} MiB per million hashes (total {idx.nbytes / 2**20:.0f} MiB)")
    t = time.perf_counter()
    qi, ids, _ = idx.search(queries, 10)
    ours_batched = nq / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(200):
        idx.search(queries[i : i + 1], 10)
    ours_single = 200 / (time.perf_counter() - t)

    flat = faiss.IndexBinaryFlat(64)
    fcodes = codes.view(np.uint8).reshape(n, 8)
    flat.add(fcodes)
    fq = queries.view(np.uint8).reshape(nq, 8)
    k = 60
    t = time.perf_counter()
    for i in range(k):
        flat.range_search(fq[i : i + 1], 11)
    faiss_single = k / (time.perf_counter() - t)
    t = time.perf_counter()
    lims, _, labels = flat.range_search(fq[:k * 4], 11)
    faiss_batched = k * 4 / (time.perf_counter() - t)
    ours = set(zip(qi.tolist(), ids.tolist()))
    ref = {(q, int(l)) for q in range(k * 4) for l in labels[lims[q] : lims[q + 1]]}
    exact = {p for p in ours if p[0] < k * 4} == ref
    print(f"faiss IndexBinaryFlat range_search: {faiss_single:8.0f} q/s one at a time, {faiss_batched:8.0f} q/s batched ({k * 4})  "
          f"[{fcodes.nbytes / n * 1e6 / 2**20:.1f} MiB/M]")
    print(f"HammingIndex.search:                {ours_single:8.0f} q/s one at a time, {ours_batched:8.0f} q/s batched ({nq})")
    print(f"speed-up vs faiss batched: {ours_batched / faiss_batched:.1f}x; results identical to faiss: {exact}  [target >= 1,000 q/s/core]")


def main(
    dirs: list[Path] = typer.Argument(None, help="Image directories (default: ../shared/data/detect-dev and detect-dev2)."),
    quick: bool = typer.Option(False, "--quick", help="1M hashes, fewer images: ~1 minute."),
    phash_threshold: int = typer.Option(10, help="pHash threshold (bits of 64)."),
    pdq_threshold: int = typer.Option(31, help="PDQ threshold (bits of 256)."),
    pdq_min_quality: int = typer.Option(50, help="Minimum PDQ quality on both sides for a PDQ match to count."),
    index_size: int = typer.Option(0, help="Hashes for the index bench (default 10M, 1M with --quick)."),
    view_threshold: int = typer.Option(8, help="pHash threshold for pairs involving a view (trimmed border, crops)."),
    skip_speed: bool = typer.Option(False, "--skip-speed", help="Robustness table only."),
) -> None:
    dirs = dirs or [REPO.parent / "shared" / "data" / "detect-dev", REPO.parent / "shared" / "data" / "detect-dev2"]
    images = load_images(dirs, limit=80 if quick else None)
    print(f"# deepwatch near-duplicate bench ({'quick' if quick else 'full'}): {len(images)} images from {', '.join(map(str, dirs))}")
    robustness(images, phash_threshold, pdq_threshold, pdq_min_quality, view_threshold)
    if skip_speed:
        return
    stage_speed(images, 20_000 if quick else 200_000, view_threshold)
    index_speed(index_size or (1_000_000 if quick else 10_000_000))


if __name__ == "__main__":
    typer.run(main)
