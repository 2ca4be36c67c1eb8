"""What a connector costs per platform event: mapping throughput from the
recorded frames in tests/frames/, multiplied into a stream.

Prints, for Bluesky (Jetstream commit frames) and Mastodon (status JSON):
* the baseline: ``json.loads`` of the same frames, measured in the same run
  (the least any reader of the stream must spend);
* the mapper alone (typed parse + mapping to schema-v1 events);
* the whole connector path minus the network: mapper, repost memory and
  de-duplication in the SQLite state file, the URL policy (cached per host),
  JSONL serialisation, checkpoints.
Each as frames/s, image events/s and the ratio to the baseline.

Usage: python bench/connectors.py [--frames 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.connectors.base import ConnectorState, Emitter, UrlPolicy  # noqa: E402
from streams.connectors.bluesky import BlueskyMapper  # noqa: E402
from streams.connectors.mastodon import MastodonMapper  # noqa: E402
from streams.connectors.sinks import JsonlSink  # noqa: E402
from streams.settings import Settings  # noqa: E402

FRAMES = ROOT / "tests" / "frames"
# An address literal: the policy check needs no DNS here and passes (public address).
IMAGE_URL = "https://151.101.0.1/img/feed_fullsize/plain/{did}/{cid}@jpeg"


def bluesky_stream(n: int) -> list[bytes]:
    """The recorded frames repeated with fresh DIDs, record keys and times,
    so reposts and quotes still point at posts of their own copy."""
    recorded = [ln for ln in (FRAMES / "jetstream.jsonl").read_text().splitlines() if ln.strip()]
    did = re.compile(r"(did:plc:[a-z2-7]{24})")
    tid = re.compile(r"\b(3l[a-z2-7]{11})\b")
    us = re.compile(r'"time_us":(\d+)')
    out, t = [], 1_732_960_800_000_000
    copy = 0
    while len(out) < n:
        for ln in recorded:
            t += 1000
            ln = us.sub(f'"time_us":{t}', tid.sub(rf"\1x{copy}", did.sub(rf"\1x{copy}", ln)))
            out.append(ln.encode())
            if len(out) == n:
                break
        copy += 1
    return out


def mastodon_stream(n: int) -> list[bytes]:
    blocks = (FRAMES / "mastodon_stream.sse").read_text().split("\n\n")
    statuses = [json.loads(b.split("data: ", 1)[1]) for b in blocks if "event: update\n" in b]
    statuses += json.loads((FRAMES / "mastodon_backfill.json").read_text())
    out, i = [], 0
    while len(out) < n:
        for s in statuses:
            s = json.loads(json.dumps(s))
            i += 1
            s["id"] = str(113_571_100_000_000_000 + i)
            for m in s["media_attachments"]:
                m["id"] = f"{m['id']}{i}"
            out.append(json.dumps(s).encode())
            if len(out) == n:
                break
    return out


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    events = fn()
    return time.perf_counter() - t0, events


def baseline(frames: list[bytes]) -> tuple[float, int]:
    def run():
        for f in frames:
            json.loads(f)
        return 0
    return timed(run)


def bluesky_mapper_only(frames: list[bytes]) -> tuple[float, int]:
    st = ConnectorState(":memory:")
    m = BlueskyMapper(IMAGE_URL, recall=st.recall)

    def run():
        n = 0
        for f in frames:
            r = m.map(f)
            if r.remember:
                st.remember(*r.remember)
            if r.forget:
                st.forget(r.forget)
            n += len(r.events)
        return n
    return timed(run)


def mastodon_mapper_only(frames: list[bytes]) -> tuple[float, int]:
    m = MastodonMapper("https://mastodon.example")

    def run():
        return sum(len(m.map_update(f).events) for f in frames)
    return timed(run)


def full_path(frames: list[bytes], platform: str, tmp: Path) -> tuple[float, int]:
    settings = Settings(data_dir=tmp)
    state = ConnectorState(tmp / f"{platform}.sqlite")
    with open(os.devnull, "w") as devnull:
        sink = JsonlSink(devnull)
        emitter = Emitter(platform, platform, state, sink, UrlPolicy(settings.fetch), settings.connectors)
        if platform == "bluesky":
            mapper = BlueskyMapper(IMAGE_URL, recall=state.recall)
            for_frame = mapper.map
        else:
            for_frame = MastodonMapper("https://mastodon.example").map_update

        async def run():
            for f in frames:
                await emitter.apply(for_frame(f))
            await emitter.checkpoint()
            return emitter.counts.get("events_produced", 0)

        t0 = time.perf_counter()
        events = asyncio.run(run())
        seconds = time.perf_counter() - t0
    state.close()
    return seconds, events


def report(name: str, n: int, base: tuple[float, int], rows: list[tuple[str, tuple[float, int]]]) -> None:
    b = n / base[0]
    print(f"\n{name}: {n} frames")
    print(f"  {'json.loads (baseline)':34s} {b:>10,.0f} frames/s")
    for label, (secs, events) in rows:
        fps = n / secs
        print(f"  {label:34s} {fps:>10,.0f} frames/s  {events / secs:>9,.0f} image events/s  "
              f"{fps / b:5.3f}x baseline  ({events} events)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bsky = bluesky_stream(args.frames)
        report("Bluesky (Jetstream)", len(bsky), baseline(bsky), [
            ("mapper", bluesky_mapper_only(bsky)),
            ("connector path (no network)", full_path(bsky, "bluesky", Path(tmp))),
        ])
        masto = mastodon_stream(args.frames)
        report("Mastodon (streaming API)", len(masto), baseline(masto), [
            ("mapper", mastodon_mapper_only(masto)),
            ("connector path (no network)", full_path(masto, "mastodon", Path(tmp))),
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
