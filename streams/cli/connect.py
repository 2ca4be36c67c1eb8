"""Live sources: ``deepwatch connect bluesky|mastodon`` and ``deepwatch serve-ingest``."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlsplit

import typer

from streams.cli.app import app
from streams.cli.common import Config, DataDir, create_missing_topics, fail, say, settings_from
from streams.settings import Settings

log = logging.getLogger("deepwatch.connectors")

connect_app = typer.Typer(
    help="Read a platform live, map its image posts to schema-v1 events and produce them to a running "
         "pipeline's broker (or print them with --dry-run). Resumable: the cursor lives in --data-dir.",
    no_args_is_help=True,
)
# short_help: `deepwatch --help` cut the group's line at 45 characters ("... to schema-v1...")
app.add_typer(connect_app, name="connect", rich_help_panel="Run",
              short_help="Read a platform live and produce its image posts as events to a running pipeline's broker.")

BrokerOpt = typer.Option(None, "--broker", help="kafka://HOST:PORT of the running pipeline's broker (env DEEPWATCH_BROKER).")
DryRun = typer.Option(False, "--dry-run", help="Print mapped events as JSONL on stdout instead of producing them; the saved cursor is not used or moved.")
MetricsPort = typer.Option(None, "--metrics-port", min=0, max=65535, help="Serve Prometheus /metrics on this port.")
Duration = typer.Option(None, "--duration", min=0.1, help="Stop after this many seconds (default: run until Ctrl-C / SIGTERM).")


def _check_url(url: str, where: str, schemes: tuple[str, ...], example: str) -> None:
    """A connector's address, checked before it starts: a URL urlsplit cannot
    read was a bare "Invalid IPv6 URL", and a scheme httpx cannot speak was
    retried forever (UnsupportedProtocol in the log)."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # raises for a port that is not a number or out of range
    except ValueError as e:
        fail(f"{where} {url!r} is not a valid URL ({e}); give e.g. {example}")
    if parts.scheme.lower() not in schemes or not parts.hostname:
        fail(f"{where} {url!r} must be a {' or '.join(s + '://' for s in schemes)} URL with a host, e.g. {example}")


INSTANCE_EXAMPLE = "https://mastodon.social"
# A tag Mastodon can follow (its HASHTAG_NAME_RE, roughly): word characters, and inside a tag the
# separators it allows ("col·lecció", Japanese "・", the Persian zero-width non-joiner)
MASTODON_TAG = re.compile(r"\w(?:[\w\u00b7\u30fb\u200c]*\w)?")


def _check_instance(instance: str) -> str:
    """``--instance``: an http(s) URL with a host. Without a scheme the fix
    is the same address with https:// in front; another scheme (ftp://,
    wss://) or no host ("https://") was "must be a URL such as
    https://ftp://x", or accepted and retried for ever. Returns it stripped."""
    import re

    text = instance.strip()
    if "://" not in text:
        # "mastodon.social", "mastodon.social:8443/": the address as typed, with https:// in front
        host = re.fullmatch(r"([A-Za-z0-9.-]+)(:\d{1,5})?(/.*)?", text)
        example = f"https://{text}" if host and "." in host.group(1) else INSTANCE_EXAMPLE
        fail(f"--instance {instance!r} is not a URL: give the instance's web address, e.g. {example}")
    try:
        parts = urlsplit(text)
        parts.port  # what it cannot read ("https://[::1", port 99999) ended in a traceback later
    except ValueError as e:
        fail(f"--instance {instance!r} is not a valid URL ({e}); give e.g. {INSTANCE_EXAMPLE}")
    example = f"https://{parts.netloc}" if parts.hostname else INSTANCE_EXAMPLE
    if parts.scheme.lower() not in ("http", "https"):
        fail(f"--instance {instance!r}: {parts.scheme}:// is not an instance's address; give its http:// or https:// "
             f"address, e.g. {example}")
    if not parts.hostname:
        fail(f"--instance {instance!r} has no host; give the instance's address, e.g. {INSTANCE_EXAMPLE}")
    return text


def _setup(settings: Settings, metrics_port: Optional[int]) -> None:
    from streams import logs, metrics

    logs.setup(settings.log_level, settings.log_format)
    if metrics_port is not None:
        port = metrics.serve(metrics_port)
        log.info("metrics listening", extra={"port": port})


def _sink(settings: Settings, dry_run: bool):
    """The events topic of the configured broker, or stdout."""
    if dry_run:
        from streams.connectors.sinks import JsonlSink

        return JsonlSink()
    if settings.broker == "embedded" or "://" not in settings.broker:
        fail("a connector feeds a running pipeline: pass --broker kafka://HOST:PORT (or set DEEPWATCH_BROKER), "
              "or use --dry-run to print the mapped events")
    from streams.topics import topic_specs
    from streams.broker import BrokerError, bootstrap_of, ensure_topics
    from streams.connectors.sinks import KafkaSink

    bootstrap = bootstrap_of(settings.broker)
    try:
        ensure_topics(bootstrap, topic_specs(settings), timeout_s=15, settings=settings)
        return KafkaSink(bootstrap, settings, bootstrap_timeout_ms=15_000)
    except BrokerError as e:
        fail(str(e))  # says which address and what to do already
    except Exception as e:
        fail(f"cannot reach the broker at {bootstrap} ({type(e).__name__}: {e}); is the pipeline running?")


_ZSTD_DICT_MAGIC = b"\x37\xa4\x30\xec"  # a trained zstd dictionary's first four bytes (0xEC30A437, little-endian)


def _check_zstd_dictionary(path: Path, flag: str) -> None:
    """Jetstream's dictionary is a trained zstd dictionary: any other file
    (an empty one, a frame, random bytes) was taken as raw content, so the
    connector asked for compressed frames and then logged every frame as
    ``bad_compression``, emitting nothing, without one line saying why."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        fail(f"{flag} {path}: cannot read it ({e.strerror or e})")
    if head != _ZSTD_DICT_MAGIC:
        what = "is empty" if not head else "is not a zstd dictionary"
        fail(f"{flag} {path} {what}: give Jetstream's zstd_dictionary file (from the jetstream repository), "
             "or leave the option out for uncompressed frames")


# An NSID as atproto's spec gives it (at least three dot-separated segments, the last a
# name of letters and digits), or a prefix ending ".*" as Jetstream takes it for wantedCollections.
NSID = re.compile(r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
                  r"\.[a-zA-Z][a-zA-Z0-9]{0,62}")
NSID_PREFIX = re.compile(r"[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*\.\*")
MAX_COLLECTIONS = 100  # Jetstream refuses more wantedCollections (400 "too many wanted collections")


def _check_collections(collections: list[str]) -> list[str]:
    """``--collections``, checked before the connector starts: Jetstream
    answers a name that is not an NSID (``app.bsky.feed.post,app.bsky.feed.repost``
    given as one) or more than 100 of them with 400, which the connector took
    for a passing refusal and retried for ever. Returns them stripped."""
    from streams.connectors.bluesky import wanted_collections

    given = [c.strip() for c in collections if c.strip()]
    for c in given:
        if len(c) > 317 or not (NSID.fullmatch(c) or NSID_PREFIX.fullmatch(c)):
            hint = " (give --collections once per collection)" if "," in c or " " in c else ""
            fail(f"--collections {c!r} is not a collection NSID such as app.bsky.feed.post, nor a prefix such as "
                 f"app.bsky.feed.*{hint}")
    if given and len(wanted_collections(given)) > MAX_COLLECTIONS:
        fail(f"--collections names {len(wanted_collections(given))} collections; Jetstream takes at most "
             f"{MAX_COLLECTIONS} (a prefix such as app.bsky.feed.* counts as one)")
    return given


def _warn_no_posts(collections: list[str], settings: Settings) -> None:
    """A warning when ``--collections`` covers no posts: reposts and quotes
    become sightings only of posts the same run read, so such a run
    produces nothing."""
    from streams.connectors.bluesky import POST

    if collections and not any(c == POST or (c.endswith(".*") and POST.startswith(c[:-1])) for c in collections):
        say(f"--collections leaves out {POST}: reposts and quotes become sightings only of image posts this run "
            "reads itself, so it will produce nothing", fmt=settings.log_format, level="warning",
            msg="--collections leaves out posts", style="yellow", min_level=settings.log_level, collections=collections)


# How a connection attempt ended when it never got a stream: no connection
# (refused, no DNS, timed out), or an answer that refused it (http_503, rate_limited).
_NO_STREAM = re.compile(r"connect_failed|rate_limited|http_\d+")


def _report(runners, settings: Settings) -> bool:
    """The end-of-run line of each stream; True when a stream read nothing
    because every attempt to connect failed (``Emitter.session_ends``; each
    failure was logged as a warning, saying why): such a run ended "nothing
    read" with exit 0, as a quiet stream would. A stream that connected once
    (``Emitter.connected``) and read nothing had nothing come (a quiet
    hashtag): no failure; nor one whose only attempt the stop cut short."""
    from streams.connectors.base import host_of

    failed = False
    for r in runners:
        reasons = r.emitter.session_ends
        counts = ", ".join(f"{k}={v}" for k, v in sorted(r.emitter.counts.items())) or "nothing read"
        cursor = f"cursor {r.emitter.cursor}" if r.emitter.cursor is not None else "no cursor yet"
        say(f"{r.emitter.stream}: {counts}; {cursor}", fmt=settings.log_format,
            msg="connector stream ended", style="dim", stream=r.emitter.stream, counts=dict(r.emitter.counts),
            cursor=r.emitter.cursor)
        # an attempt cut short by the stop ("stopped") while connecting to a host that drops
        # packets never connected either: the emitter says whether one did
        if r.emitter.counts or r.emitter.connected or not any(_NO_STREAM.fullmatch(x) for x in reasons):
            continue
        failed = True
        host = host_of(getattr(r, "url", None) or getattr(r, "instance", ""))
        n = sum(reasons.values())
        tries = f"{n} {'try' if n == 1 else 'tries'}"
        text = (f"{r.emitter.stream}: never connected to {host} ({tries}: {', '.join(sorted(reasons))}; the "
                "warnings above say why); check the network, the address and any proxy")
        say(("error: " if settings.log_format != "json" else "") + text, fmt=settings.log_format,
            msg="connector never connected", level="error", stream=r.emitter.stream, host=host, reasons=dict(reasons))
    return failed


@connect_app.command("bluesky")
def bluesky(
    collections: List[str] = typer.Option([], "--collections", metavar="NSID", help="Jetstream wantedCollections (repeatable; default app.bsky.feed.post and app.bsky.feed.repost). Each set of collections keeps its own cursor in --data-dir."),
    filter_hashtag: List[str] = typer.Option([], "--filter-hashtag", metavar="TAG", help="Keep only image posts carrying one of these hashtags (repeatable; case-insensitive)."),
    broker: Optional[str] = BrokerOpt,
    jetstream_url: Optional[str] = typer.Option(None, "--jetstream-url", help="Jetstream /subscribe URL (default: connectors.jetstream_url)."),
    zstd_dictionary: Optional[Path] = typer.Option(None, "--zstd-dictionary", exists=True, dir_okay=False, help="Jetstream's zstd dictionary file: asks for compressed frames (about half the bandwidth)."),
    data_dir: Optional[Path] = DataDir,
    config: Optional[Path] = Config,
    dry_run: bool = DryRun,
    metrics_port: Optional[int] = MetricsPort,
    duration: Optional[float] = Duration,
) -> None:
    """Watch Bluesky's firehose (Jetstream) for image posts, reposts and quotes."""
    from streams.connectors.run import bluesky_stream_key, build_bluesky, open_state, run_until_signalled

    collections = _check_collections(collections)
    settings = settings_from(config, data_dir=data_dir, broker=broker)
    _warn_no_posts(collections, settings)  # in the log's format, which the settings give
    _check_url(jetstream_url or settings.connectors.jetstream_url,
               "--jetstream-url" if jetstream_url else "connectors.jetstream_url", ("ws", "wss", "http", "https"),
               "wss://jetstream2.us-east.bsky.network/subscribe")
    _check_url(settings.connectors.plc_url, "connectors.plc_url", ("http", "https"), "https://plc.directory")
    if zstd_dictionary:
        settings.connectors.zstd_dictionary = zstd_dictionary
    if settings.connectors.zstd_dictionary:
        _check_zstd_dictionary(Path(settings.connectors.zstd_dictionary),
                               "--zstd-dictionary" if zstd_dictionary else "connectors.zstd_dictionary")
    _setup(settings, metrics_port)
    sink = _sink(settings, dry_run)
    state = open_state(settings, bluesky_stream_key(collections, filter_hashtag), memory=dry_run)
    try:
        runner = build_bluesky(settings, sink, state, collections=collections or None, hashtags=filter_hashtag or None,
                               url=jetstream_url)
    except ValueError as e:  # a --jetstream-url that is not ws(s)/http(s), ...
        sink.close()
        state.close()
        fail(str(e))
    try:
        asyncio.run(run_until_signalled([runner], duration))
    finally:
        never_connected = _report([runner], settings)
        sink.close()
        state.close()
    if never_connected:
        raise typer.Exit(1)


@connect_app.command("mastodon")
def mastodon(
    instance: str = typer.Option(..., "--instance", help="The instance, e.g. https://mastodon.social"),
    hashtag: List[str] = typer.Option([], "--hashtag", metavar="TAG", help="Hashtag to stream (repeatable: one stream each; implies --timeline hashtag). With --timeline public/local/user: keep only statuses carrying one of them."),
    timeline: Optional[str] = typer.Option(None, "--timeline", metavar="public|local|hashtag|user", help="public | local | hashtag | user (default: hashtag with --hashtag, else public)."),
    token_env: Optional[str] = typer.Option(None, "--token-env", help="Name of the environment variable holding an access token (many instances require one for streaming)."),
    streaming_url: Optional[str] = typer.Option(None, "--streaming-url", help="Streaming server base URL (default: asked from /api/v1/instance)."),
    broker: Optional[str] = BrokerOpt,
    data_dir: Optional[Path] = DataDir,
    config: Optional[Path] = Config,
    dry_run: bool = DryRun,
    metrics_port: Optional[int] = MetricsPort,
    duration: Optional[float] = Duration,
) -> None:
    """Watch a Mastodon instance's public, local, hashtag or home (user) timeline for images."""
    from streams.connectors.run import build_mastodon, mastodon_stream_key, open_state, run_until_signalled

    instance = _check_instance(instance)
    if streaming_url is not None:
        # the stream is read over HTTP (server-sent events); ws(s):// as the
        # instance itself reports it (urls.streaming_api) means the same server
        _check_url(streaming_url, "--streaming-url", ("http", "https", "ws", "wss"), "https://streaming.mastodon.social")
        from streams.connectors.mastodon import http_streaming_url

        streaming_url = http_streaming_url(streaming_url)
    tl = timeline or ("hashtag" if hashtag else "public")
    if tl not in ("public", "local", "hashtag", "user"):
        fail(f"--timeline must be public, local, hashtag or user (got {tl!r})")
    if tl == "hashtag" and not hashtag:
        fail("--timeline hashtag needs at least one --hashtag")
    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            fail(f"--token-env names {token_env}, which is not set in the environment")
    elif tl == "user":
        fail("the user timeline needs an access token: --token-env NAME")
    # checked before the broker is reached (a bad tag came after its connection, or its timeout)
    tags = [h.lstrip("#") for h in hashtag] if tl == "hashtag" else [None]
    if tl == "hashtag" and not all(tags):
        fail("--hashtag needs a tag after the '#', e.g. --hashtag breaking")
    for h in hashtag:
        if h.lstrip("#") and not MASTODON_TAG.fullmatch(h.lstrip("#")):
            # "bad tag!" streamed nothing, for ever, without a word
            fail(f"--hashtag {h!r} is not a Mastodon hashtag: letters, digits and _ (and the · ・ and zero-width "
                 "non-joiner Mastodon allows inside a tag), e.g. --hashtag breaking_news")
    settings = settings_from(config, data_dir=data_dir, broker=broker)
    _setup(settings, metrics_port)
    sink = _sink(settings, dry_run)
    states, runners = [], []
    for tag in tags:
        state = open_state(settings, mastodon_stream_key(instance, tl, tag), memory=dry_run)
        states.append(state)
        try:
            # a channel each: one stream's failed flush must not drop another's unconfirmed sends
            runners.append(build_mastodon(settings, sink.channel(), state, instance=instance, timeline=tl, hashtag=tag,
                                          token=token, streaming_url=streaming_url,
                                          filter_hashtags=None if tl == "hashtag" else (hashtag or None)))
        except ValueError as e:  # what the builder refuses, as for bluesky
            sink.close()
            for st in states:
                st.close()
            fail(str(e))

    async def main() -> None:
        try:
            await run_until_signalled(runners, duration)
        finally:
            for r in runners:
                await r.aclose()

    from streams.connectors.mastodon import FatalStreamError

    try:
        asyncio.run(main())
    except FatalStreamError as e:
        fail(str(e))
    finally:
        never_connected = _report(runners, settings)
        sink.close()
        for s in states:
            s.close()
    if never_connected:
        raise typer.Exit(1)


@app.command("serve-ingest", rich_help_panel="Run")
def serve_ingest(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for all interfaces)."),
    port: int = typer.Option(8087, "--port", min=1, max=65535, help="Port to listen on."),
    broker: Optional[str] = BrokerOpt,
    config: Optional[Path] = Config,
    metrics_port: Optional[int] = typer.Option(
        None, "--metrics-port", min=0, max=65535,
        help="Serve Prometheus /metrics on this port instead of --port (their labels name the token holders); "
             "for an endpoint facing the internet. Default: DEEPWATCH_METRICS_PORT, else on --port."),
    create_topics: bool = typer.Option(
        False, help="Create missing topics (as `deepwatch worker` does) before listening: with topic auto-creation "
                    "off, requests are answered 503 until the topics exist. Needs the broker up at start."),
) -> None:
    """HTTP endpoint for tiplines and scrapers: POST /ingest with one JSON
    event or NDJSON, bearer tokens from DEEPWATCH_INGEST_TOKENS
    (NAME:TOKEN,...), 202 with a result per line; GET /metrics (on
    --metrics-port when given)."""
    from streams.ingest_server import TokenConfigError, load_tokens, serve
    from streams.net_errors import ensure_port_free

    settings = settings_from(config, broker=broker, metrics_port=metrics_port)
    metrics_port = settings.metrics_port
    if settings.broker == "embedded" or "://" not in settings.broker:
        fail("serve-ingest feeds a running pipeline: pass --broker kafka://HOST:PORT (or set DEEPWATCH_BROKER)")
    from streams.broker import BrokerError, bootstrap_of

    try:
        # The producer is made on the first request: a URL it can never use
        # would otherwise start fine and answer every request 503 "re-send".
        bootstrap_of(settings.broker)
    except BrokerError as e:
        fail(str(e))
    env = settings.connectors.ingest_tokens_env
    try:
        if not load_tokens(env):
            fail(f"no ingest tokens: set {env}=NAME:TOKEN[,NAME:TOKEN] (tokens are read only from the environment)")
    except TokenConfigError as e:
        fail(str(e))
    if metrics_port == port:
        fail(f"--metrics-port {metrics_port} is --port too; give metrics a port of their own")
    ensure_port_free(host, port, "pick another --port")
    from streams import logs

    # the topic check's warnings are the endpoint's log (JSON for a shipper), not Python's bare last-resort lines
    logs.setup(settings.log_level, settings.log_format)
    if create_topics:
        create_missing_topics(settings, bootstrap_of(settings.broker))
    for warning in ingest_exposure_warnings(host, metrics_port, tls_proxy=settings.connectors.ingest_tls_proxy):
        say(warning, fmt=settings.log_format, level="warning", msg="ingest endpoint exposed off loopback",
            style="yellow", min_level=settings.log_level)
    serve(settings, host, port, metrics_port=metrics_port)


def ingest_exposure_warnings(host: str, metrics_port: int | None, *, tls_proxy: bool = False) -> list[str]:
    """What to say at start when serve-ingest listens off loopback: it speaks
    plain http, so its bearer tokens cross the network in clear text unless a
    TLS-terminating proxy is in front (which it cannot tell: the operator says
    so with ``connectors.ingest_tls_proxy``), and /metrics on the main port
    names the token holders to whoever can reach it."""
    from detectors.netaddr import is_loopback

    if is_loopback(host):
        return []
    out = [] if tls_proxy else [
        f"serve-ingest listens on {host} over plain http: bearer tokens cross the network in clear text unless a "
        "TLS-terminating reverse proxy is in front of it (then set DEEPWATCH_CONNECTORS__INGEST_TLS_PROXY=true), "
        "or bind --host 127.0.0.1"]
    if metrics_port is None:
        out.append("/metrics is served on --port, where its labels name your token holders to anyone who can reach "
                   "it: give --metrics-port and keep that port off the network")
    return out
