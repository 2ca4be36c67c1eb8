"""Cluster bench: does a feed of reposts end as one cluster per picture?

Pairwise match rates say little about clusters: one false link chains two
pictures together. So this bench builds a feed over the shared data sets --
every picture as its original plus every repost shape of
``bench.neardup_transforms.CLUSTER_TRANSFORMS`` (recompress, resize, centre and
off-centre crops, captions and bars top and bottom covering up to 1/6,
borders, mirrors, screenshots) -- shuffles it, feeds it to
``ClusterIndex.assign`` in that order (the engine's decision unit, without
broker) and reports:

* clusters per picture (target <= 1.02) and the pictures split;
* pictures per cluster: clusters holding two distinct pictures (target 0) and
  the largest chain (most distinct pictures in one cluster);
* splits per transform: variants not in their picture's main cluster;
* merges with their audit, and a replay of the whole feed (must change nothing);
* borderline joins re-verified on the variants' own pixels
  (``ClusterIndex(pixels=...)``, ``detectors.neardup.localized``): the
  bench hands the index a pixel source that re-renders a variant's bytes
  from its picture on demand (what the blob store is in the pipeline), and
  reports how often the check ran and its cost per assign;
* the session 9 rule on the same feed in the same run (``--baseline``, on
  by default, also with ``--no-compare``): decisions between pictures not
  re-verified on pixels (``merge_edit_from=None``), frame-relative pairs
  compared on 30% of each side (``min_overlap=0.3``);
* the same, on the same feed in the same run, for the records alone (no
  pixel source: the rule before session 9), for the rule without links by
  representatives (``ClusterIndex(representative_links=False)``) and for
  hashes alone: no pixel verification, no anchors, merges on pHash+PDQ only
  (``--no-compare`` skips both).

"Distinct pictures": the shared sets hold some pictures twice under different
names (one render saved twice, a camera JPEG and its HDR-off twin). Files whose
pixels are near-identical (32x32 grey thumbnails within 3 grey levels on
average, same aspect) count as one picture; the bench lists those groups.
Same-prompt different-seed generations are *different* pictures here, which is
exactly what a cluster must keep apart. The report also says how many impure
clusters are not even one *composition* (``LOOSE_DIFF``): the rest hold
generation variants of one seed or exposure variants of one shot.

    .venv/bin/python bench/clusters.py [--limit N] [--seed 1] [DIR ...]

DIRs default to ../shared/data/{detect-dev,detect-dev2,train-extra}; skips with
the reason when they are absent. Hashes are cached under the temp dir.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.neardup_images import load_images  # noqa: E402
from bench.neardup_transforms import CLUSTER_TRANSFORMS  # noqa: E402
from detectors.hashing import HASHES_VERSION, VIEW_BOXES, ImageHashes, compute_hashes  # noqa: E402
from detectors.imagedata import ImageData  # noqa: E402
from detectors.neardup import ClusterIndex  # noqa: E402

DEFAULT_DIRS = ["detect-dev", "detect-dev2", "train-extra"]
# A second, looser identity for the report only: same composition (32x32 grey
# within 12 levels on average) -- one seed rendered on different compute
# units, HDR on/off of one shot -- which a desk may well call one picture.
LOOSE_DIFF = 12.0


def _orig_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def picture_groups(images, max_diff: float = 3.0) -> list[int]:
    """Group id per image: near-identical pixels (see module docstring) share one."""
    thumbs = np.stack([np.asarray(im.convert("L").resize((32, 32)), dtype=np.float32) for _, im in images])
    aspect = np.array([im.width / im.height for _, im in images])
    group = list(range(len(images)))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(len(images)):
        diff = np.abs(thumbs[i + 1:] - thumbs[i]).mean(axis=(1, 2))
        for j in np.nonzero((diff <= max_diff) & (np.abs(aspect[i + 1:] / aspect[i] - 1) < 0.02))[0] + i + 1:
            group[find(int(j))] = find(i)
    return [find(i) for i in range(len(images))]


def hashed_variants(images, cache_dir: Path) -> list[tuple[int, str, str, ImageHashes]]:
    """(image index, transform, sha256, hashes) for every original and variant."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # hashes change with these (and the record's shape with its fields)
    views_key = hashlib.sha256(f"{HASHES_VERSION}{VIEW_BOXES!r}{sorted(ImageHashes.model_fields)}".encode()).hexdigest()[:8]
    out = []
    for i, (name, im) in enumerate(images):
        key = hashlib.sha256((name + "|" + ",".join(CLUSTER_TRANSFORMS)).encode()).hexdigest()[:24]
        f = cache_dir / f"{key}-{views_key}.json"
        if f.exists():
            rows = json.loads(f.read_text())
        else:
            rows = []
            for t, fn in {"original": _orig_bytes, **CLUSTER_TRANSFORMS}.items():
                data = ImageData(fn(im))
                rows.append([t, data.sha256, compute_hashes(data).model_dump()])
            f.write_text(json.dumps(rows))
        out.extend((i, t, sha, ImageHashes.model_validate(h)) for t, sha, h in rows)
    return out


def feed_pixels(images, feed) -> tuple[Callable[[str], bytes | None], list[float]]:
    """A pixel source over the feed: a variant's bytes re-rendered from its
    picture (deterministic encoders, so the same sha256), and the seconds
    spent rendering (not the check's own cost: a blob read in the pipeline)."""
    where = {sha: (i, t) for i, t, sha, _ in feed}
    spent = [0.0]

    def get(sha256: str) -> bytes | None:
        if sha256 not in where:
            return None
        t0 = time.perf_counter()
        i, t = where[sha256]
        im = images[i][1]
        data = _orig_bytes(im) if t == "original" else CLUSTER_TRANSFORMS[t](im)
        spent[0] += time.perf_counter() - t0
        return data
    return get, spent


def run(feed, index: ClusterIndex) -> tuple[dict[str, str], list]:
    merges = []
    for _, _, sha, h in feed:
        a = index.assign(sha, h)
        merges.extend(a.merge_audit)
    return {sha: index.cluster_of(sha) for _, _, sha, _ in feed}, merges


def measure(feed, group: list[int], loose: list[int], index: ClusterIndex, render: list[float] | None = None) -> dict:
    """Run the feed through ``index``, then again (replay), and the metrics.
    ``render``: the pixel source's re-rendering seconds (``feed_pixels``)."""
    r0 = render[0] if render else 0.0
    t1 = time.perf_counter()
    cluster_of, merges = run(feed, index)
    took = time.perf_counter() - t1
    before = (index.n_clusters, index.n_members)
    replay, replay_merges = run(feed, index)
    first_file: dict[int, int] = {}
    for i, g in enumerate(group):
        first_file.setdefault(g, i)
    clusters_by_pic: dict[int, Counter] = defaultdict(Counter)
    pics_by_cluster: dict[str, set[int]] = defaultdict(set)
    for i, _, sha, _ in feed:
        clusters_by_pic[group[i]][cluster_of[sha]] += 1
        pics_by_cluster[cluster_of[sha]].add(group[i])
    main_cluster = {p: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for p, c in clusters_by_pic.items()}
    impure = {cid: ps for cid, ps in pics_by_cluster.items() if len(ps) > 1}
    per_t: dict[str, list[bool]] = defaultdict(list)
    for i, t, sha, _ in feed:
        per_t[t].append(cluster_of[sha] != main_cluster[group[i]])
    return {
        "clusters": index.n_clusters,
        "cpp": float(np.mean([len(c) for c in clusters_by_pic.values()])),
        "split": sum(len(c) > 1 for c in clusters_by_pic.values()),
        "ppc": float(np.mean([len(p) for p in pics_by_cluster.values()])),
        "impure": impure,
        "in_impure": sum(len(ps) for ps in impure.values()),
        "loose_impure": sum(len({loose[first_file[p]] for p in ps}) > 1 for ps in impure.values()),
        "largest": max(len(ps) for ps in pics_by_cluster.values()),
        "merges": merges,
        "replay_same": replay == cluster_of and not replay_merges and (index.n_clusters, index.n_members) == before,
        "per_t": per_t,
        "ops": len(feed) / took,
        "checks": index.edits.runs if index.edits else 0,
        "check_s": index.edits.seconds if index.edits else 0.0,
        "render_s": (render[0] - r0) if render else 0.0,
    }


def main(
    dirs: list[Path] = typer.Argument(None, help="image directories (default: the shared data sets)"),
    limit: int = typer.Option(0, help="use only the first N distinct images (0: all)"),
    seed: int = typer.Option(1, help="feed order"),
    cache: Path = typer.Option(Path(tempfile.gettempdir()) / "dw-cluster-bench", help="hash cache directory"),
    compare: bool = typer.Option(True, help="also run the rule without representative links, and hashes alone, on the same feed"),
    pixels: bool = typer.Option(True, help="re-verify borderline joins on the variants' pixels (and compare with the records alone)"),
    baseline: bool = typer.Option(True, help="also run the session 9 rule (pixels for borderline joins only, merges not "
                                  "re-verified, merge_edit_from=None; frame-relative pairs on 30%, min_overlap=0.3) "
                                  "on the same feed, also with --no-compare"),
) -> None:
    dirs = dirs or [REPO.parent / "shared" / "data" / d for d in DEFAULT_DIRS]
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        print(f"SKIP: image directories not found: {', '.join(map(str, missing))} (the shared data sets live in ../shared/data)")
        raise typer.Exit(0)
    t0 = time.perf_counter()
    images = load_images(dirs, limit=limit or None)
    group = picture_groups(images)
    loose = picture_groups(images, LOOSE_DIFF)
    members: dict[int, list[str]] = defaultdict(list)
    for i, g in enumerate(group):
        members[g].append(images[i][0])
    twins = [v for v in members.values() if len(v) > 1]
    feed = hashed_variants(images, cache)
    random.Random(seed).shuffle(feed)
    prep = time.perf_counter() - t0

    source, render = feed_pixels(images, feed)
    now = measure(feed, group, loose, ClusterIndex(pixels=source if pixels else None), render)
    # the session 9 rule: decisions between pictures not re-verified on
    # pixels, frame-relative pairs compared on 30% of each side
    s9 = measure(feed, group, loose, ClusterIndex(pixels=source, merge_edit_from=None, min_overlap=0.3), render) \
        if baseline and pixels else None
    # the records alone: no pixel source (the rule before session 9)
    plain = measure(feed, group, loose, ClusterIndex()) if compare and pixels else None
    # without links by representatives (the rule before them), and hashes
    # alone (no pixel verification, no anchors, merges on pHash+PDQ only)
    nolink = measure(feed, group, loose, ClusterIndex(representative_links=False)) if compare else None
    old = measure(feed, group, loose, ClusterIndex(verify_max=None)) if compare else None
    n_pics = len({g for g in group})

    print(f"# deepwatch cluster bench: {len(images)} files from {', '.join(str(d) for d in dirs)}")
    print(f"{n_pics} distinct pictures ({len(twins)} groups of near-identical files counted once), "
          f"{len(feed)} events ({1 + len(CLUSTER_TRANSFORMS)} per file: original + every transform), seed {seed}")
    for v in twins:
        print(f"  one picture: {'  ~  '.join(v)}")
    cols = [("now", now)] + ([("session 9", s9)] if s9 else []) + ([("records alone", plain)] if plain else []) + (
        [("no rep links", nolink), ("hashes alone", old)] if old and nolink else [])
    print(f"\n{'metric':40s} " + " ".join(f"{c:>13s}" for c, _ in cols) + "  target")
    rows = [("clusters", "clusters", "d", ""), ("clusters per picture", "cpp", ".3f", "<= 1.02"),
            ("pictures split over >1 cluster", "split", "d", ""), ("pictures per cluster", "ppc", ".3f", ""),
            ("clusters holding >1 distinct picture", None, "d", "0"), ("  pictures in those clusters", "in_impure", "d", ""),
            ("  of which not one composition (loose)", "loose_impure", "d", ""),
            ("largest chain (pictures in one cluster)", "largest", "d", "1"), ("merges (audited)", None, "d", ""),
            ("replay of the whole feed changes nothing", "replay_same", "", "True"), ("assign ops/s", "ops", ",.0f", "")]
    for label, key, fmt, target in rows:
        vals = []
        for _, m in cols:
            v = len(m["impure"]) if label.startswith("clusters holding") else len(m["merges"]) if key is None else m[key]
            vals.append(f"{str(v) if fmt == '' else format(v, fmt):>13s}")
        print(f"{label:40s} " + " ".join(vals) + f"  {target}")
    print(f"\n{'splits per transform':24s} " + " ".join(f"{c:>13s}" for c, _ in cols) + f" {'of':>5s}")
    for t in ["original", *CLUSTER_TRANSFORMS]:
        print(f"{t:24s} " + " ".join(f"{sum(m['per_t'][t]):13d}" for _, m in cols) + f" {len(now['per_t'][t]):5d}")
    for cid, ps in sorted(now["impure"].items()):
        print(f"  impure cluster {cid}: " + " + ".join(members[p][0] for p in sorted(ps)))
    for m in now["merges"][:10]:
        print(f"  merge: {m.model_dump_json()}")
    if pixels:
        print(f"\npixel re-verifications (residual >= {ClusterIndex().edit_from}; decisions between pictures "
              f"from {ClusterIndex().merge_edit_from}), over {len(feed)} assigns (replay included):")
    for label, m in [("now", now)] + ([("session 9", s9)] if s9 else []) if pixels else []:
        n, secs = m["checks"], m["check_s"] - m["render_s"]
        print(f"  {label}: {n} checks, {secs:.1f} s decode+compare ({1000 * secs / max(n, 1):.0f} ms each, "
              f"{1000 * secs / len(feed):.2f} ms per assign), plus {m['render_s']:.1f} s re-rendering variants "
              "(the bench's stand-in for blob reads)")
    print(f"\n(in-process, one core; prep {prep:.0f} s incl. decode+hash)")


if __name__ == "__main__":
    typer.run(main)
