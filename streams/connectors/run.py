"""Assemble and run a connector: state file, URL policy, emitter, sink.
Shared by ``deepwatch connect`` and the end-to-end tests."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from streams.connectors.atproto_identity import HandleResolver
from streams.connectors.base import ConnectorState, Emitter, Sink, UrlPolicy
from streams.connectors.bluesky import DEFAULT_COLLECTIONS, BlueskyConnector, BlueskyMapper, wanted_collections
from streams.connectors.mastodon import MastodonConnector, MastodonMapper, Timeline
from streams.settings import Settings

log = logging.getLogger("deepwatch.connectors")


def state_path(settings: Settings, stream: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in stream)
    return Path(settings.data_dir) / "connectors" / f"{safe}.sqlite"


def open_state(settings: Settings, stream: str, *, memory: bool = False) -> ConnectorState:
    cfg = settings.connectors
    if not memory:
        _adopt_legacy_state(settings, stream)
    return ConnectorState(":memory:" if memory else state_path(settings, stream),
                          seen_max=cfg.seen_ids_max, posts_max=cfg.post_cache_max)


def _adopt_legacy_state(settings: Settings, stream: str) -> None:
    """A Bluesky stream of its own ``--collections`` (``bluesky[-TAGS]@...``)
    kept its state under ``bluesky[-TAGS]`` before streams were keyed by
    their collections: its first run under the new key starts from a copy of
    that file (cursor, seen ids, remembered posts, handles), not from
    Jetstream's live tip, which lost every post of the restart. A copy, not
    a move: a run of the default collections may read the old file too."""
    legacy, sep, _ = stream.partition("@")
    path, old = state_path(settings, stream), state_path(settings, legacy)
    if not sep or path.exists() or not old.exists():
        return
    import sqlite3

    src = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".adopting")
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # consistent under a writer, WAL included
            with dst:  # the cursor is kept per stream name: the new name resumes at the old one's
                dst.execute("INSERT OR IGNORE INTO cursor (stream, value, updated) "
                            "SELECT ?, value, updated FROM cursor WHERE stream = ?", (stream, legacy))
        finally:
            dst.close()
        tmp.replace(path)
    finally:
        src.close()
    log.warning("connector state adopted from before streams were keyed by their collections",
                extra={"stream": stream, "from": str(old), "to": str(path)})


MAX_READABLE_COLLECTIONS = 80  # characters of --collections a stream key spells out; more are hashed


def bluesky_stream_key(collections: list[str] | None, hashtags: list[str] | None) -> str:
    """The stream (saved cursor, seen ids, remembered posts: one state file)
    of a Bluesky run. Runs that read different collections are different
    streams: sharing one, the second resumed from the first's cursor and
    took its seen ids, skipping what only it reads. The order and repeats of
    ``collections`` do not matter, and the default collections add nothing,
    so a run without ``--collections`` keeps the key (``bluesky``, or
    ``bluesky-TAG...`` with hashtags) that earlier versions saved under."""
    key = "bluesky" + (f"-{'-'.join(sorted(h.lstrip('#').lower() for h in hashtags))}" if hashtags else "")
    wanted = wanted_collections(collections)
    if wanted == sorted(DEFAULT_COLLECTIONS):
        return key
    spelled = "+".join(wanted)
    if len(spelled) > MAX_READABLE_COLLECTIONS:
        # a file name has at most 255 bytes; Jetstream takes up to 100 collections
        spelled = "sha256-" + hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]
    return f"{key}@{spelled}"


def build_bluesky(settings: Settings, sink: Sink, state: ConnectorState, *, collections: list[str] | None = None,
                  hashtags: list[str] | None = None, url: str | None = None, plc_url: str | None = None,
                  resolver: HandleResolver | None = None) -> BlueskyConnector:
    """A Bluesky connector whose events carry verified handles: ``resolver``,
    by default one on ``state`` asking the PLC directory at ``plc_url``
    (default: ``connectors.plc_url``), under
    the fetch stage's private-address rule (``fetch.allow_private_networks``)."""
    cfg = settings.connectors
    emitter = Emitter("bluesky", bluesky_stream_key(collections, hashtags), state, sink, UrlPolicy(settings.fetch),
                      cfg, cursor_time=lambda c: int(c) / 1e6)
    if resolver is None:
        resolver = HandleResolver(state, plc_url=plc_url or cfg.plc_url, allow_private=settings.fetch.allow_private_networks)
    mapper = BlueskyMapper(cfg.bluesky_image_url, hashtags=hashtags, recall=state.recall,
                           max_future_skew_s=settings.ingest.max_future_skew_s, resolver=resolver)
    return BlueskyConnector(emitter, mapper, cfg, collections=collections, url=url)


def mastodon_stream_key(instance: str, timeline: str, hashtag: str | None) -> str:
    host = urlsplit(instance).hostname or instance
    return f"mastodon-{host}-{timeline}" + (f"-{hashtag.lower()}" if hashtag else "")


def _snowflake_time(cursor: str) -> float:
    # Mastodon ids are (ms since epoch) << 16 | sequence.
    return (int(cursor) >> 16) / 1000 if cursor.isdigit() else datetime.now(timezone.utc).timestamp()


def build_mastodon(settings: Settings, sink: Sink, state: ConnectorState, *, instance: str,
                   timeline: Timeline = "public", hashtag: str | None = None, token: str | None = None,
                   streaming_url: str | None = None, filter_hashtags: list[str] | None = None) -> MastodonConnector:
    cfg = settings.connectors
    emitter = Emitter("mastodon", mastodon_stream_key(instance, timeline, hashtag), state, sink,
                      UrlPolicy(settings.fetch), cfg, cursor_time=_snowflake_time)
    mapper = MastodonMapper(instance, hashtags=filter_hashtags)
    return MastodonConnector(emitter, mapper, cfg, instance=instance, timeline=timeline, hashtag=hashtag,
                             token=token, streaming_url=streaming_url)


async def run_until_signalled(runners: list, duration_s: float | None = None) -> None:
    """Run connectors until SIGINT/SIGTERM (or ``duration_s``), then stop them
    cleanly so each saves its cursor."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if duration_s is not None:
        loop.call_later(duration_s, stop.set)
    await asyncio.gather(*(r.run(stop) for r in runners))
