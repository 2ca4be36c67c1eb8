"""Fetching ahead: ``deepwatch replay`` of the filer's feed with its pictures
served over HTTP by a loopback image host that answers each request after a
fixed latency (a CDN's round trip), at ``ingest.fetch_concurrency`` 2 (what
a worker fetched at once before: one per analysis slot) and at the default.

With ``--local`` the feed keeps its local paths (no image host): what the
setting costs where there is no network to wait on.

Prints the wall time of each replay (start-up included), alternating the two
settings, and the ratio of their medians measured in the same run. Skips
with the reason when ``../shared`` is absent.

Usage: python bench/fetch_ahead.py [--latency-ms 80] [--rounds 2] [--events 1000] [--local]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.replay import build_filer_feed  # noqa: E402


def serve(root: Path, latency_s: float) -> ThreadingHTTPServer:
    """Serves files under ``root``, each answer sent ``latency_s`` after its request."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a CDN

        def log_message(self, *a):
            pass

        def do_GET(self):
            time.sleep(latency_s)
            path = (root / self.path.lstrip("/")).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def url_feed(feed: Path, base: str, out: Path) -> Path:
    lines = []
    for raw in feed.read_text().splitlines():
        ev = json.loads(raw)
        ev["image"] = {"url": f"{base}/{ev['image']['path']}"}
        lines.append(json.dumps(ev))
    out.write_text("\n".join(lines) + "\n")
    return out


def replay(feed: Path, data_dir: Path, fetch_concurrency: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), DEEPWATCH_FETCH__ALLOW_PRIVATE_NETWORKS="true",
               DEEPWATCH_INGEST__FETCH_CONCURRENCY=str(fetch_concurrency))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "streams.console", "replay", str(feed), "--data-dir", str(data_dir),
                          "--format", "json"], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"replay failed ({out.returncode}):\n{out.stderr[-4000:]}")
    summary = json.loads(out.stdout)
    return {"wall_s": wall, "sightings": summary.get("sightings"), "dead": summary.get("dead_letters")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=80.0, help="the image host's answer delay per request")
    ap.add_argument("--rounds", type=int, default=2, help="replays of each setting, alternating")
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--ahead", type=int, default=None, help="fetch_concurrency to compare with 2 (default: the setting's default)")
    ap.add_argument("--local", action="store_true", help="the feed's local paths, no image host")
    args = ap.parse_args()

    from streams.settings import IngestSettings

    ahead = args.ahead or IngestSettings().fetch_concurrency
    cache = Path(tempfile.gettempdir()) / "dw-bench-replay"
    feed = build_filer_feed(cache, args.events, 200)
    if feed is None:
        print("skipped: ../shared/data is absent (the feed is built from its held-out pictures)")
        return
    httpd = serve(feed.parent.resolve(), args.latency_ms / 1000)
    try:
        with tempfile.TemporaryDirectory(prefix="dw-fetch-ahead-") as tmp:
            urls = feed if args.local else url_feed(feed, f"http://127.0.0.1:{httpd.server_address[1]}",
                                                    Path(tmp) / "feed.jsonl")
            walls: dict[int, list[float]] = {2: [], ahead: []}
            for r in range(args.rounds):
                for conc in (2, ahead):
                    res = replay(urls, Path(tmp) / f"data-{conc}-{r}", conc)
                    walls[conc].append(res["wall_s"])
                    print(f"fetch_concurrency {conc:>3}: {res['wall_s']:6.1f} s wall, {args.events / res['wall_s']:6.1f} "
                          f"events/s (sightings {res['sightings']}, dead letters {res['dead']})", flush=True)
    finally:
        httpd.shutdown()
    before, now = statistics.median(walls[2]), statistics.median(walls[ahead])
    host = "local files" if args.local else f"image host latency {args.latency_ms:g} ms"
    print(f"\n{args.events} events, {host}, load average {os.getloadavg()[0]:.1f}")
    print(f"median wall: fetch_concurrency 2 {before:.1f} s, {ahead} {now:.1f} s: {before / now:.2f}x")


if __name__ == "__main__":
    main()
