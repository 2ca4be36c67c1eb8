"""Desk speed: queue page load with 10,000 clusters in the findings store, and
thumbnail cache behaviour.

Runs `deepwatch serve` as its own process over a generated store (real
pictures in the blob store, real hashes, snapshots written through the
store's own apply_snapshot) and times HTTP requests; with Debian's chromium
present it also times the queue in a real browser (navigation to the load
event, thumbnails included). Ratios are against a baseline measured in the
same run: a 1,000-cluster store for the queue, the cached request for
thumbnails, and a full read of the store for the read cache after a write.

    python bench/desk.py [--clusters 10000] [--baseline 1000] [--json]
    python bench/desk.py --view [--view-clusters 20000] [--view-recent 2000]
    python bench/desk.py --verdict [--view-clusters 60000] [--view-recent 60000]

``--view`` measures only the desk's start-up read of its view (time, memory
held and peak) on a store of aged clusters, unbounded (``desk.view_days=0``,
``desk.max_view_clusters=0``: every cluster, the read made before there was a
view) against the 30-day window.

``--verdict`` measures the desk after a verdict at a large view (the
defaults: 60,000 clusters in the 30-day window, so the view holds the
50,000-cluster cap): ``deepwatch serve`` as its own process, the queue page
warm, then per verdict (needs-review, authentic and fake on clusters in the
view, fake on one outside it, needs-review again on a judged one) the
``POST /api/clusters/{id}/verdict`` and the first queue page after it, each
timed, and a warm page. A verdict re-read the whole view from the store
(``FindingsSource.invalidate``: in the verdict's alerts for ``fake``, else on
the next page); it now re-applies the overlay to the cached view in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.blobstore import DirectoryBlobStore  # noqa: E402
from streams.store import open_store  # noqa: E402
from streams.desk.source import MAX_VIEW_CLUSTERS  # noqa: E402
from tests.desk_support import T0, DeskServer, make_cluster  # noqa: E402

# Every cluster has its own picture bytes (one pixel differs), hashes are
# computed for 200 base pictures and reused: hashing 10k would dominate setup.
DISTINCT_PICTURES = 200


def build(data: Path, n: int) -> float:
    started = time.perf_counter()
    store = open_store(data)
    blobs = DirectoryBlobStore(data / "blobs")
    cache: dict = {}
    from datetime import timedelta

    for i in range(n):
        make_cluster(store, blobs, f"c{i:05d}", i % DISTINCT_PICTURES, posts=2, ai=i % 3 == 0,
                     platforms=("x", "weibo", "telegram")[i % 3:][:2] or ("x",), accounts=[f"a{i % 997}"],
                     t0=T0 + timedelta(seconds=7 * i), texts=[f"post {i} about storm {i % 50}"], hashes_cache=cache,
                     variant=i)
    store.close()
    return time.perf_counter() - started


def timed(url: str, n: int = 5) -> tuple[float, list[float]]:
    """(first request, the following n) in seconds."""
    with httpx.Client(timeout=120) as c:
        t = time.perf_counter()
        r = c.get(url)
        r.raise_for_status()
        first = time.perf_counter() - t
        rest = []
        for _ in range(n):
            t = time.perf_counter()
            c.get(url).raise_for_status()
            rest.append(time.perf_counter() - t)
    return first, rest


def browser_load(url: str) -> float | None:
    chromium = shutil.which("chromium")
    if not chromium:
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = b.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url, wait_until="load")  # warm the connection and the desk's cache
            times = []
            for _ in range(3):
                t = time.perf_counter()
                page.goto(url, wait_until="load")
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        finally:
            b.close()


def measure(n: int, root: Path) -> dict:
    data = root / f"store-{n}"
    build_s = build(data, n)
    desk = DeskServer(data)
    try:
        first, warm = timed(desk.url + "/")
        # A worker's sink commits: the desk's read cache (keyed on SQLite's
        # data_version) is rebuilt on the next request; time that request.
        changed = []
        for k in range(3):
            store = open_store(data)
            make_cluster(store, DirectoryBlobStore(data / "blobs"), f"new{k}", k, posts=1, ai=True)
            store.close()
            t = time.perf_counter()
            httpx.get(desk.url + "/", timeout=120).raise_for_status()
            changed.append(time.perf_counter() - t)
        api_first, api_warm = timed(desk.url + "/api/clusters?limit=1000", 3)
        load = browser_load(desk.url + "/")
        # thumbnails over HTTP: 20 members never asked for, then the same again (cached)
        shas = [c["members"][0]["sha256"] for c in httpx.get(desk.url + "/api/clusters?limit=40&sort=score").json()]
        shas = list(dict.fromkeys(shas))[:20]
        http_first, http_cached = [], []
        with httpx.Client(timeout=60) as c:
            for want in (http_first, http_cached):
                for sha in shas:
                    t = time.perf_counter()
                    c.get(f"{desk.url}/thumb/{sha}?px=128").raise_for_status()
                    want.append(time.perf_counter() - t)
        any_member = httpx.get(desk.url + "/api/clusters?limit=1").json()[0]["members"][0]["sha256"]
        cache = cache_refresh(data)
        return {**cache, "clusters": n, "build_s": round(build_s, 1), "queue_first_s": round(first, 3),
                "queue_warm_median_s": round(statistics.median(warm), 4),
                "queue_after_store_change_median_s": round(statistics.median(changed), 3),
                "api_1000_first_s": round(api_first, 3), "api_1000_warm_median_s": round(statistics.median(api_warm), 4),
                "browser_queue_load_s": round(load, 3) if load is not None else None, "_member": any_member,
                "thumb_http_first_median_ms": round(statistics.median(http_first) * 1000, 2),
                "thumb_http_cached_median_ms": round(statistics.median(http_cached) * 1000, 2),
                "_url": desk.url}
    finally:
        desk.stop()


def cache_refresh(data: Path, rounds: int = 3) -> dict:
    """The desk's read cache in process, on the same store: read again after
    one new cluster was written (only what changed, ``changes_since``) against
    a full read of every cluster (the cache invalidated), alternating."""
    from streams.desk.deskdb import DeskDB
    from streams.desk.source import FindingsSource

    src = FindingsSource(open_store(data), DeskDB(data / "bench-cache-desk.sqlite"))
    try:
        src._all()
        incremental, full = [], []
        for k in range(rounds):
            store = open_store(data)
            make_cluster(store, DirectoryBlobStore(data / "blobs"), f"cache{k}", k, posts=1, ai=True)
            store.close()
            t = time.perf_counter()
            src._all()
            incremental.append(time.perf_counter() - t)
            src.invalidate()
            t = time.perf_counter()
            src._all()
            full.append(time.perf_counter() - t)
    finally:
        src.close()
        src.desk.close()
    inc, whole = statistics.median(incremental), statistics.median(full)
    return {"cache_after_write_median_s": round(inc, 4), "cache_full_read_median_s": round(whole, 4),
            "full_over_incremental": round(whole / inc, 1)}


def thumbs(root: Path) -> dict:
    from streams.desk.thumbs import Thumbnails
    from tests.desk_support import jpeg
    from tests.support import picture

    blobs = DirectoryBlobStore(root / "tblobs")
    shas = [blobs.put(jpeg(picture(10_000 + i, (1600, 1200)), 90)) for i in range(30)]
    t = Thumbnails(root / "tblobs", root / "tcache", max_bytes=256 * 1024, max_pixels=10**8)
    first, cached = [], []
    for s in shas:
        a = time.perf_counter()
        t.get(s, 256)
        first.append(time.perf_counter() - a)
        a = time.perf_counter()
        t.get(s, 256)
        cached.append(time.perf_counter() - a)
    on_disk = sum(p.stat().st_size for p in (root / "tcache").glob("*.jpg"))
    return {"pictures": len(shas), "source": "1600x1200 JPEG", "thumb_px": 256,
            "first_median_ms": round(statistics.median(first) * 1000, 2),
            "cached_median_ms": round(statistics.median(cached) * 1000, 3),
            "first_over_cached": round(statistics.median(first) / statistics.median(cached), 1),
            "cache_bound_bytes": t.max_bytes, "cache_bytes_on_disk": on_disk,
            "within_bound": on_disk <= t.max_bytes, "misses": t.misses, "hits": t.hits}


def build_aged(data: Path, n: int, recent: int, view_days: float = 30.0) -> float:
    """A store of ``n`` clusters shaped as ``make_cluster`` writes them (one
    member, two sightings, AI evidence on a third) of which ``recent`` were
    last seen within ``view_days`` of the newest, the others spread over the
    year before: the view's bench. Snapshots straight into the store, no
    pictures (the desk's reads never open them)."""
    from detectors.base import Evidence
    from streams.records import ClusterSnapshot, Engagement, ImageEvent, ImageRef, Member, Sighting, SourceRef, Velocity
    from detectors.hashing import ImageHashes

    started = time.perf_counter()
    store = open_store(data)
    h = ImageHashes(phash="0" * 16, pdq="0" * 64, pdq_quality=100)
    batch = []
    for i in range(n):
        cid = f"c{i:06d}"
        age_days = (view_days * i / recent) if i < recent else view_days + 1 + 365 * (i - recent) / max(1, n - recent)
        last = T0 - timedelta(days=age_days)
        sha = f"{i:064x}"
        ai = i % 3 == 0
        evidence = [Evidence(detector="metadata", score=0.98, weight=3.0, sha256=sha,
                             detail="PNG text chunk names the generator: Stable Diffusion XL")] if ai else []
        member = Member(sha256=sha, phash=h.phash, pdq=h.pdq, pdq_quality=100, event_id=f"{cid}-e0", width=160,
                        height=120, format="JPEG", representative=True)
        for k in range(2):
            when = last - timedelta(seconds=30 * (1 - k))
            ev = ImageEvent(event_id=f"{cid}-e{k}", platform=("x", "weibo", "telegram")[i % 3], account_id=f"a{i % 997}",
                            account_handle=f"@a{i % 997}", post_url=f"https://example.org/{cid}/{k}", posted_at=when,
                            text=f"post {i} about storm {i % 50}", image=ImageRef(blob=sha))
            sighting = Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=2 * i + k),
                                sha256=sha, width=160, height=120, format="JPEG", hashes=h, evidence=evidence)
            batch.append(ClusterSnapshot(
                cluster_id=cid, revision=k + 1, fake_score=0.95 if ai else 0.2,
                verdict="likely-ai" if ai else "no-evidence", evidence=evidence, members=[member], sightings=k + 1,
                accounts=1, platforms=[ev.platform], engagement=Engagement(),
                velocity=Velocity(sightings_5m=k + 1, sightings_1h=k + 1), first_seen=last - timedelta(seconds=30),
                last_seen=when, new_sighting=sighting))
        if len(batch) >= 2000:
            store.apply_snapshots(batch)
            batch = []
    store.apply_snapshots(batch)
    store.close()
    return time.perf_counter() - started


def view_start(data: Path, view_days: float, max_view: int) -> dict:
    """The desk's start-up read of its view (``FindingsSource._all``): time
    (without tracemalloc), then in a second source, traced, the memory it
    holds after and its peak during the read; then a first queue page and a
    cluster outside the view."""
    import gc
    import tracemalloc

    from streams.desk.deskdb import DeskDB
    from streams.desk.source import ClusterQuery, FindingsSource

    def source() -> FindingsSource:
        return FindingsSource(open_store(data), DeskDB(data / "bench-view-desk.sqlite"), view_days=view_days,
                              max_view_clusters=max_view)

    src = source()
    try:
        t = time.perf_counter()
        held = len(src._all())
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        src.clusters_page(ClusterQuery())
        page_s = time.perf_counter() - t
        oldest = "c%06d" % (int(src.store._db.execute("SELECT COUNT(*) FROM clusters").fetchone()[0]) - 1)
        t = time.perf_counter()
        src.cluster(oldest)
        outside_s = time.perf_counter() - t
        t = time.perf_counter()
        src._ai()
        ai_s = time.perf_counter() - t
    finally:
        src.close()
        src.desk.close()
    gc.collect()
    src = source()
    try:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        src._all()
        gc.collect()
        now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        src.close()
        src.desk.close()
    return {"view_days": view_days, "max_view_clusters": max_view, "clusters_held": held,
            "start_read_s": round(read_s, 3), "first_queue_page_s": round(page_s, 3),
            "cluster_outside_view_s": round(outside_s, 4), "account_ai_ids_s": round(ai_s, 4),
            "held_mb": round((now - base) / 2**20, 1), "peak_mb": round((peak - base) / 2**20, 1)}


def view_bench(n: int, recent: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="deepwatch-bench-view-") as tmp:
        data = Path(tmp)
        build_s = build_aged(data, n, recent)
        every = view_start(data, 0, 0)  # the view unbounded: the read the desk made before there was a view
        window = view_start(data, 30.0, MAX_VIEW_CLUSTERS)
    return {"clusters": n, "in_window": recent, "build_s": round(build_s, 1), "every_cluster": every,
            "window": window}


VERDICT_TOKEN = "bench-editor-token-0123456789abcdef"


def verdict_bench(n: int, recent: int) -> dict:
    """Verdicts over HTTP on a store of ``n`` aged clusters (``build_aged``),
    ``recent`` of them in the window: per verdict, the POST and the first
    queue page after it (the view the page lists, held by the desk process)."""
    with tempfile.TemporaryDirectory(prefix="deepwatch-bench-verdict-") as tmp:
        data = Path(tmp)
        build_s = build_aged(data, n, recent)
        desk = DeskServer(data, env={"DEEPWATCH_DESK_TOKENS": f"editor:bench:{VERDICT_TOKEN}"})
        auth = {"Authorization": f"Bearer {VERDICT_TOKEN}"}
        try:
            with httpx.Client(timeout=600, headers=auth) as c:
                t = time.perf_counter()
                c.get(desk.url + "/").raise_for_status()
                start_s = time.perf_counter() - t
                view = c.get(desk.url + "/api/clusters", params={"limit": 1}).headers.get("X-Desk-View")
                warm = []
                for _ in range(3):
                    t = time.perf_counter()
                    c.get(desk.url + "/").raise_for_status()
                    warm.append(time.perf_counter() - t)
                outside = "c%06d" % (n - 1)  # the oldest: past the cap (or the window) when there are more
                held = min(recent, MAX_VIEW_CLUSTERS)  # build_aged numbers the clusters newest first
                steps = [("c000010", "needs-review"), ("c000011", "authentic"), ("c000012", "fake"),
                         (outside, "fake"), ("c000012", "needs-review")]
                rows = []
                for cid, verdict in steps:
                    t = time.perf_counter()
                    r = c.post(f"{desk.url}/api/clusters/{cid}/verdict", json={"verdict": verdict, "note": "bench"})
                    post_s = time.perf_counter() - t
                    r.raise_for_status()
                    t = time.perf_counter()
                    c.get(desk.url + "/").raise_for_status()
                    page_s = time.perf_counter() - t
                    t = time.perf_counter()
                    c.get(desk.url + "/").raise_for_status()
                    again_s = time.perf_counter() - t
                    shown = c.get(f"{desk.url}/api/clusters/{cid}").json()
                    assert (shown.get("desk") or {}).get("verdict") == verdict, shown.get("desk")
                    rows.append({"cluster": cid, "verdict": verdict, "in_view": int(cid[1:]) < held,
                                 "post_s": round(post_s, 3), "first_page_after_s": round(page_s, 3),
                                 "post_and_page_s": round(post_s + page_s, 3), "page_again_s": round(again_s, 3)})
        finally:
            desk.stop()
        in_process = overlay_refresh(data)
    return {"clusters": n, "in_window": recent, "build_s": round(build_s, 1), "view": view,
            "first_page_s": round(start_s, 3), "page_warm_median_s": round(statistics.median(warm), 3),
            "verdicts": rows,
            "post_and_page_median_s": round(statistics.median(r["post_and_page_s"] for r in rows), 3),
            "in_process": in_process}


def overlay_refresh(data: Path, rounds: int = 3) -> dict:
    """The desk's view in process, on the same store: the view (``_all``) and
    the queue's first page after one overlay row was written as a verdict
    writes it (applied in place), against the page after a full read of the
    view (the cache invalidated), alternating."""
    from streams.desk.deskdb import DeskDB, OverlayRow
    from streams.desk.source import ClusterQuery, FindingsSource

    src = FindingsSource(open_store(data), DeskDB(data / "bench-overlay-desk.sqlite"))
    try:
        src._all()
        view, in_place, full = [], [], []
        for k in range(rounds):
            cid = "c%06d" % (20 + k)
            src.desk.set_overlay([OverlayRow(cluster_id=cid, verdict=("fake", "authentic", "needs-review")[k % 3],
                                             verdict_id=k + 1, source_cluster=cid, detail="bench")], clear_source=cid)
            t = time.perf_counter()
            src._all()
            view.append(time.perf_counter() - t)
            src.clusters_page(ClusterQuery())
            in_place.append(time.perf_counter() - t)
            src.invalidate()
            t = time.perf_counter()
            src.clusters_page(ClusterQuery())
            full.append(time.perf_counter() - t)
        held = len(src._all())
    finally:
        src.close()
        src.desk.close()
    a, b = statistics.median(in_place), statistics.median(full)
    return {"clusters_held": held, "view_after_overlay_row_median_s": round(statistics.median(view), 4),
            "page_after_overlay_row_median_s": round(a, 4), "page_after_full_read_median_s": round(b, 3),
            "full_over_in_place": round(b / a, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--baseline", type=int, default=1_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--view", action="store_true", help="only the view's start-up read: --view-clusters clusters, "
                                                        "--view-recent of them in the 30-day window")
    ap.add_argument("--verdict", action="store_true", help="only verdicts at a large view: the POST and the first "
                                                           "queue page after each (--view-clusters, --view-recent; "
                                                           "defaults 60,000 and 60,000: the 50,000 cap)")
    ap.add_argument("--view-clusters", type=int, default=None)
    ap.add_argument("--view-recent", type=int, default=None)
    args = ap.parse_args()
    if args.verdict:
        n = args.view_clusters or 60_000
        print(json.dumps(verdict_bench(n, args.view_recent or n), indent=2))
        return
    args.view_clusters = args.view_clusters or 20_000
    args.view_recent = args.view_recent or 2_000
    if args.view:
        print(json.dumps(view_bench(args.view_clusters, args.view_recent), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="deepwatch-bench-desk-") as tmp:
        root = Path(tmp)
        base = measure(args.baseline, root)
        big = measure(args.clusters, root)
        th = thumbs(root)
    for d in (base, big):
        d.pop("_member"), d.pop("_url")
    out = {"baseline": base, "measured": big, "thumbnails": th,
           "queue_warm_ratio": round(big["queue_warm_median_s"] / base["queue_warm_median_s"], 2),
           "queue_after_change_ratio": round(big["queue_after_store_change_median_s"] / base["queue_after_store_change_median_s"], 2)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for d in (base, big):
        print(f"{d['clusters']:>6} clusters: queue first {d['queue_first_s']*1000:.0f} ms, "
              f"after a store change {d['queue_after_store_change_median_s']*1000:.0f} ms (read cache rebuilt), warm {d['queue_warm_median_s']*1000:.0f} ms; /api/clusters?limit=1000 warm {d['api_1000_warm_median_s']*1000:.0f} ms; "
              f"browser load {'%.0f ms' % (d['browser_queue_load_s']*1000) if d['browser_queue_load_s'] else 'n/a'}")
    print(f"thumbnails over HTTP (160x120 JPEG members -> 128 px, {big['clusters']} clusters): first "
          f"{big['thumb_http_first_median_ms']} ms, cached {big['thumb_http_cached_median_ms']} ms")
    print(f"queue warm ratio {big['clusters']}/{base['clusters']}: {out['queue_warm_ratio']}x; after-change ratio {out['queue_after_change_ratio']}x")
    for d in (base, big):
        print(f"{d['clusters']:>6} clusters: read cache after one write {d['cache_after_write_median_s']*1000:.1f} ms "
              f"(only what changed) against a full read {d['cache_full_read_median_s']*1000:.0f} ms, same store: "
              f"{d['full_over_incremental']}x")
    print(f"thumbnails ({th['source']} -> {th['thumb_px']} px): first {th['first_median_ms']} ms, cached {th['cached_median_ms']} ms "
          f"({th['first_over_cached']}x); cache {th['cache_bytes_on_disk']} B on disk <= bound {th['cache_bound_bytes']} B: {th['within_bound']}")


if __name__ == "__main__":
    main()
