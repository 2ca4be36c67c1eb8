"""One typed settings object for every deepwatch process.

Precedence (highest first): explicit overrides (CLI flags) > environment
(``DEEPWATCH_*``, nested with ``__``, e.g. ``DEEPWATCH_ALERTS__MIN_FAKE_SCORE``)
> TOML file (``--config`` or ``DEEPWATCH_CONFIG``) > defaults. Secrets are only
ever read from the environment: the TOML file names the variable, not the value.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import SettingsError as PydanticSettingsError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from detectors.model_names import DEFAULT_PIXEL_MODEL
from detectors.signals import PDQ, PHash

DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?", re.IGNORECASE)  # what ``detect.device`` and ``--device`` take


class _Section(BaseModel):
    # A misspelt key is an error naming the closest valid one (load_settings),
    # never a silently ignored setting. No inf or nan: inf passes every lower
    # bound, then overflows where a duration becomes an integer (an
    # ingest_broker_timeout_s of inf was an OverflowError traceback).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _level_name(value: Any) -> Any:
    """A level name as logging knows it: any case, WARN and FATAL as aliases
    (logging accepts them, so configurations may use them)."""
    if isinstance(value, str):
        value = value.strip().upper()
        return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(value, value)
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# Checked, so a mistake is one settings error line, not logging's ValueError
# traceback at start-up (level) or console output where JSON was meant (format).
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_level_name)]
LogFormat = Annotated[Literal["json", "console"], BeforeValidator(_lower)]


def check_public_url(value: str | None) -> str | None:
    """A service's address as people reach it (links in alerts): http or https
    with a host, a path at most, no trailing slash; "" is unset."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # raises for a port that is not a number or out of range
    except ValueError as e:
        raise ValueError(f"not a URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise ValueError("must be an http:// or https:// address with a host, e.g. https://desk.example.org")
    if "?" in value or "#" in value:
        raise ValueError("must not have a query (?) or fragment (#): links are made by appending paths to it")
    if "@" in parts.netloc:
        raise ValueError("must not hold a user or password: it is sent to every alert subscriber")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("must not contain spaces or control characters")
    return value.rstrip("/")


class FetchSettings(_Section):
    allow_private_networks: bool = False  # loopback/private/link-local refused unless set
    max_bytes: int = Field(25 * 1024 * 1024, gt=0)  # the largest image fetched or read; also the desk's upload bound
    connect_timeout_s: float = Field(5.0, gt=0)  # to connect to an image host
    read_timeout_s: float = Field(15.0, gt=0)  # longest wait for the next bytes of an image
    total_timeout_s: float = Field(30.0, gt=0)  # whole fetch incl. redirects and retries: a byte-a-second server cannot stall a task
    retries: int = Field(2, ge=0)  # further tries of a fetch that failed for a passing reason (DNS, timeouts, 5xx, refused connections), with backoff
    max_redirects: int = Field(3, ge=0)  # redirects followed (each checked as the first URL); more: a dead letter
    breaker_timeouts: int = Field(5, ge=0)  # timeouts in a row that pause a host (fetch:host_unavailable); 0: never
    breaker_cooldown_s: float = Field(30.0, gt=0)  # a paused host's first pause; doubles (to 5 min) while its try times out
    user_agent: str = "deepwatch/0.1"  # the User-Agent of image fetches; add where image hosts can reach you, e.g. "deepwatch/0.1 (+https://desk.example.org/contact)"


class DecodeSettings(_Section):
    max_pixels: int = Field(100_000_000, gt=0)  # 50-200 MP phone cameras exist; Pillow refuses > ~179 MP regardless
    max_dimension: int = Field(16_384, gt=0)  # the longest side, in pixels, of a picture decoded
    max_decode_mb: int = Field(320, gt=0)  # decoded bytes one image may cost at its peak (pixels in its mode, the RGB copy, a WebP, HEIF or AVIF decoder's buffers); also the per-process total
    max_jpeg_scans: int = Field(100, ge=1, le=10_000)  # scans a JPEG may have, each decoded over the whole image (real files: ~10)


class IngestSettings(_Section):
    max_inline_bytes: int = Field(2 * 1024 * 1024, gt=0)  # base64-decoded size cap for inline images
    image_roots: list[Path] = Field(default_factory=list)  # local `path` images allowed only below these
    event_deadline_s: float = Field(120.0, gt=0)  # one event's whole analyze stage (fetch, decode, hash); then a dead letter
    max_future_skew_s: float = Field(900.0, ge=0)  # posted_at later than ingest time + this is dead-lettered (future_posted_at)
    analyze_concurrency: int = Field(2, ge=1, le=64)  # events one pipeline worker decodes and hashes at once; more adds GIL contention
    fetch_concurrency: int = Field(8, ge=1, le=256)  # events one pipeline worker takes at once, fetching their images; analysed analyze_concurrency at a time


class DedupeSettings(_Section):
    phash_threshold: int = Field(PHash.default_threshold, ge=0)  # pHash bits (of 64) two pictures may differ in and be one picture
    pdq_threshold: int = Field(PDQ.default_threshold, ge=0)  # PDQ bits (of 256) two pictures may differ in and be one picture
    pdq_min_quality: int = Field(PDQ.default_min_quality, ge=0)  # PDQ hashes of lower quality (0-100: flat, featureless pictures) are not matched on
    view_threshold: int = Field(8, ge=0)  # pHash radius when a crop/trimmed view is involved (bench/neardup.py sweep)

    def thresholds(self) -> dict[str, int]:
        """The matching rule's keyword arguments, as ClusterIndex and BankStore take them."""
        return {"phash_threshold": self.phash_threshold, "pdq_threshold": self.pdq_threshold,
                "pdq_min_quality": self.pdq_min_quality, "view_threshold": self.view_threshold}
    # Clusters with no sighting for this long (event time) leave the hot index
    # and the changelog table; the findings store keeps them, and a compact
    # cold index of their hashes revives one if its picture resurfaces.
    hot_window_hours: float = Field(24 * 7, gt=0)  # clusters with no sighting for this long (event time) go to the cold tier
    evict_every_ops: int = Field(1000, gt=0)  # cluster ops between two sweeps that move idle clusters to the cold tier
    hot_max_members: int = Field(1_000_000, gt=0)  # members the hot index keeps at most (~2 KB each in the cluster stage's memory: 1M is ~2.2 GiB); past it the clusters seen longest ago go to the cold tier, down to 90%
    cold_max_clusters: int = Field(1_000_000, gt=0)  # evicted clusters the cold index keeps at most, the most recently evicted (~6 KB each in the cluster stage's memory; past it, trimmed to 95%); a copy of a picture whose cluster left it founds a new cluster


class DetectSettings(_Section):
    cheap: list[str] | None = None  # None = every registered cheap detector
    # learned models to run once per cluster; the packaged pixel probe needs nothing fetched
    models: list[str] = Field(default_factory=lambda: [DEFAULT_PIXEL_MODEL])  # learned models run once per cluster (vendor:NAME too)
    pixel_head: Path | None = None  # your own head for the pixel probe (deepwatch train --recipe pixel-probe)
    model_dir: Path | None = None  # default: <data_dir>/models
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # the packaged pixel model's torch forward: auto = bf16 autocast on CUDA (fp16 before
    # Ampere), fp32 elsewhere; off = fp32 everywhere; bf16 | fp16 = forced (CPU: torch, not onnxruntime)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # the pixel model's precision: auto = bf16/fp16 on CUDA, fp32 elsewhere
    max_batch: int = Field(16, gt=0)  # pictures in one model batch
    max_wait_ms: float = Field(20.0, gt=0)  # longest wait for a batch to fill before it runs as it is
    # a proxy or regional endpoint in front of a vendor; its API key stays in the environment
    vendor_urls: dict[str, str] = Field(default_factory=dict)  # base URL per vendor of detect.models, e.g. [detect.vendor_urls] "vendor:hive" = "https://hive-proxy.internal"; unset: the vendor's public API

    @field_validator("cheap")
    @classmethod
    def _cheap(cls, names: list[str] | None) -> list[str] | None:
        """Registered cheap detectors only: an unknown name crashed every
        analyze worker at start, and a model's name was dropped unsaid."""
        if names is None:
            return None
        from detectors.base import known_detectors

        known = known_detectors("cheap")
        wrong = [n for n in names if n not in known]
        if wrong:
            raise ValueError(f"unknown cheap detector {', '.join(map(repr, wrong))}; known: {', '.join(sorted(known))}")
        return names

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        # a typo such as "cdua" would run on the CPU without a word
        if not DEVICE_RE.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value.strip()

    @field_validator("vendor_urls")
    @classmethod
    def _vendor_urls(cls, urls: dict[str, str]) -> dict[str, str]:
        """Known vendors only (a misspelt name would leave the vendor on its
        public API unsaid), each an http(s) address that request paths are
        appended to."""
        if not urls:
            return urls
        from detectors.models.vendors import VENDORS

        out = {}
        for name, url in urls.items():
            if name not in VENDORS:
                raise ValueError(f"unknown vendor {name!r}; known: {', '.join(sorted(VENDORS))}")
            try:
                url = check_http_url(url)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            if "?" in url or "#" in url:
                raise ValueError(f"{name}: must not have a query (?) or fragment (#): request paths are appended to it")
            if "@" in urlsplit(url).netloc:
                raise ValueError(f"{name}: must not hold a user or password: the API key is read from "
                                 f"{VENDORS[name].key_env}")
            out[name] = url.rstrip("/")
        return out


def check_index_prefix(prefix: str) -> str:
    """``prefix`` (``findings.index_prefix``) as the start of deepwatch's index
    names (``<prefix>-clusters``, ``streams.es_templates.names``), by the rules
    Elasticsearch names an index by: refused at start, not at the first write."""
    if (not prefix or prefix != prefix.lower() or prefix[0] in "-_+" or prefix in (".", "..")
            or re.search(r'[\\/*?"<>|,# :]', prefix) or len(prefix.encode()) > 200):
        raise ValueError(f"{prefix!r} cannot start an Elasticsearch index name (lower case, no spaces or "
                         "\\/*?\"<>|,#:, not starting with - _ +)")
    return prefix


def check_http_url(value: str) -> str:
    """A URL deepwatch will POST to: http or https, a host, a port that is a
    number in range, no spaces or control characters. Refused at start, not
    at the first alert."""
    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # raises for a port that is not a number or out of range
    except ValueError as e:
        raise ValueError(f"not a URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. https://hooks.example.org/deepwatch")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("must not contain spaces or control characters")
    if "%" in parts.hostname:  # [fe80::1%25eth0]
        raise ValueError("an IPv6 zone id names an interface of this host (a link-local address): not a receiver")
    return value


# Kafka's rule for topic names (at most 249 characters), with room for the ".<name>" after the prefix.
TOPIC_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")

# A webhook target's key in the findings store and metrics (``streams.webhooks.hook_key``):
# ``scheme://host[:port]#<8 hex>``, or ``hook:<name>`` for a hook with a ``name``.
HOOK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TARGET_KEY_RE = re.compile(r"(?:[a-z][a-z0-9+.-]*://[^/?#@\s]+|<invalid webhook URL>)#[0-9a-f]{8}|hook:" + HOOK_NAME_RE.pattern)


def hook_origin(url: str) -> str:
    """``scheme://host:port`` of a webhook URL, the port always given: a
    nameless hook's identity (``streams.webhooks.hook_key``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{parts.port or (443 if scheme == 'https' else 80)}"


class WebhookSettings(_Section):
    """One ``[[alerts.webhooks]]`` target (TOML), or an object of the JSON
    list in ``DEEPWATCH_ALERTS__WEBHOOKS``."""

    url: str  # where alerts are POSTed (http or https); may carry a token in its path or query
    # deliveries are recorded under the hook's identity, not its URL: a changed path or token keeps them
    name: str | None = None  # the hook's stable identity (letters, digits, . _ -): its deliveries are kept as hook:NAME; default scheme://host:port, so needed for two hooks on one host
    previous_keys: list[str] = Field(default_factory=list)  # target keys (as `deepwatch redeliver` lists them) whose undelivered alerts this hook takes over and redelivers
    secret_env: str = "DEEPWATCH_WEBHOOK_SECRET"  # name of the env var holding the HMAC key; give each subscriber its own
    # a key rotation: both keys sign every delivery, so each receiver moves to the new key when it is ready
    previous_secret_env: str | None = None  # name of the env var holding the HMAC key being retired: it signs too (X-Deepwatch-Signature-Previous) until this is removed
    ca_certs: str | None = None  # PEM CA bundle that alone verifies this https hook's certificate (a receiver behind a private CA); default: the system's CAs
    timeout_s: float = Field(5.0, gt=0)  # per attempt: connect, send and the receiver's answer
    retries: int = Field(3, ge=0)  # further attempts after a failed one (timeouts, 5xx, 429), with backoff
    # a 429/503's Retry-After is honoured up to this: the wait before a retry, and after the last try how long the target is left alone
    retry_after_max_s: float = Field(300.0, ge=0)  # longest Retry-After (429/503) honoured, in seconds
    summary: bool = False  # add "summary", one line for people, to the alert JSON (strict schema validators must allow it)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_http_url(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not HOOK_NAME_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("previous_keys")
    @classmethod
    def _previous(cls, value: list[str]) -> list[str]:
        wrong = [k for k in value if not TARGET_KEY_RE.fullmatch(k)]
        if wrong:
            raise ValueError(f"{wrong[0]!r} is not a target key as `deepwatch redeliver` lists them "
                             "(scheme://host:port#hash or hook:NAME)")
        return value

    @field_validator("previous_secret_env")
    @classmethod
    def _previous_secret(cls, value: str | None, info: Any) -> str | None:
        if not value:
            return None
        if value == info.data.get("secret_env"):
            raise ValueError("is the same variable as secret_env: name the variable that holds the key being retired")
        return value

    @field_validator("ca_certs")
    @classmethod
    def _ca_certs(cls, value: str | None, info: Any) -> str | None:
        """The file itself is read where alerts are sent from
        (``streams.webhooks.unusable_ca_bundles``): a command that only
        reads findings, on a host without the bundle, must not be refused."""
        if value is None:
            return None
        url = info.data.get("url")  # absent when the URL itself was refused
        if url is not None and urlsplit(url).scheme.lower() != "https":
            raise ValueError("only for https:// URLs: an http:// receiver has no certificate to verify")
        return value


class AlertSettings(_Section):
    min_fake_score: float = Field(0.7, ge=0, le=1)  # a cluster alerts only with a fake score (0-1) at least this
    min_sightings_5m: int = Field(10, ge=0)  # velocity: sightings of the cluster in the trailing 5 minutes (at most 5000)
    min_sightings_1h: int = Field(0, ge=0)  # sightings in the trailing hour (at most 5000)
    # spread, not posts: one bot posting a fake 12 times in 5 minutes counts 3 and pages nobody, while a handful
    # of accounts pushing it hard still does; 1 counts accounts only, 5000 counts every post (as before)
    max_sightings_per_account: int = Field(3, ge=1)  # alert thresholds and escalations count at most this many sightings of one account per window (at most 5000)
    escalation_factor: float = Field(3.0, gt=1)  # an escalation re-alerts when velocity reaches this times the last alert's
    webhooks: list[WebhookSettings] = Field(default_factory=list)  # signed alert webhooks: [[alerts.webhooks]] tables in TOML, or a JSON list; fields below
    console: bool = True  # log each alert as one line (ALERT L1 cluster ...) besides storing it
    webhook_redeliver_s: float = Field(60.0, gt=0)  # how often failed webhook deliveries are tried again, oldest first
    # per target and worker; past it an alert waits in the findings store for the redelivery instead
    webhook_queue_max: int = Field(1000, ge=1)  # alerts waiting for one webhook target in a worker's memory
    # keep it under the supervisor's kill timeout (the local runner: 20 s; Kubernetes: terminationGracePeriodSeconds)
    webhook_stop_grace_s: float = Field(10.0, ge=0)  # a stopping worker's wait for its webhooks to deliver what they hold; the rest is redelivered
    # webhooks to loopback, private (RFC 1918), unique-local or other non-public addresses are refused without it
    allow_private_webhooks: bool = False  # let webhooks reach loopback and private-network receivers (checked on the address connected to)

    @field_validator("min_sightings_5m", "min_sightings_1h")
    @classmethod
    def _countable(cls, value: int) -> int:
        from streams.virality import MAX_RECENT

        if value > MAX_RECENT:
            raise ValueError(f"must be at most {MAX_RECENT}: a cluster's velocity counts at most {MAX_RECENT} "
                             "sightings (streams.virality.MAX_RECENT), so a higher threshold never fires")
        return value

    @field_validator("max_sightings_per_account")
    @classmethod
    def _cap_countable(cls, value: int) -> int:
        from streams.virality import MAX_RECENT

        if value > MAX_RECENT:
            raise ValueError(f"must be at most {MAX_RECENT}: a cluster's windows keep at most {MAX_RECENT} "
                             "sightings (streams.virality.MAX_RECENT), so a higher cap is never reached")
        return value

    @field_validator("webhooks")
    @classmethod
    def _distinct_hooks(cls, hooks: list[WebhookSettings]) -> list[WebhookSettings]:
        """Each hook's identity (``name``, else ``scheme://host:port``) is its
        key in the findings store: two hooks that would share one must be
        named apart (the same URL listed twice is one target). Errors name
        hosts only: URLs may carry a token."""
        seen: dict[str, tuple[int, str]] = {}
        for i, hook in enumerate(hooks):
            ident = f"name {hook.name!r}" if hook.name else f"host {hook_origin(hook.url)}"
            if ident in seen and seen[ident][1] != hook.url:
                j = seen[ident][0]
                raise ValueError(f"alerts.webhooks[{j}] and [{i}] share the {ident}; give each a distinct `name` "
                                 "(deliveries are kept per hook identity, so that a changed URL keeps them)")
            seen.setdefault(ident, (i, hook.url))
        return hooks


class KafkaSettings(_Section):
    """Client security for a managed Kafka (Confluent Cloud, MSK, Aiven...).
    The password is read from the environment variable named here."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"  # how clients connect to the brokers
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None  # with SASL_PLAINTEXT / SASL_SSL
    sasl_username: str | None = None  # the SASL user; its password from the variable sasl_password_env names
    sasl_password_env: str = "DEEPWATCH_KAFKA_PASSWORD"  # name of the env var holding the SASL password
    ssl_cafile: Path | None = None  # CA bundle; default: the system's
    ssl_certfile: Path | None = None  # client certificate (mutual TLS)
    ssl_keyfile: Path | None = None  # the client certificate's private key (mutual TLS)
    # The embedded broker (Tansu) needs workarounds (streams.tansu_compat); "auto" detects it
    # from the cluster id it reports, so the URL is kafka://HOST:PORT either way.
    quirks: Literal["auto", "tansu", "none"] = "auto"  # the embedded broker's workarounds: auto = when the broker is Tansu
    # 1 suits the single-node embedded broker; managed services may refuse fewer than 3.
    replication_factor: int = Field(1, ge=1, le=32)  # copies of each topic deepwatch creates; 3 on a production cluster
    broker_lost_s: float = Field(60.0, gt=0)  # a worker whose brokers take no connection this long exits 1, for its supervisor to restart


class ConnectorSettings(_Section):
    """Platform connectors (``deepwatch connect``) and the HTTP ingest endpoint."""

    jetstream_url: str = "wss://jetstream2.us-east.bsky.network/subscribe"  # the Bluesky Jetstream `connect bluesky` reads
    bluesky_image_url: str = "https://cdn.bsky.app/img/feed_fullsize/plain/{did}/{cid}@jpeg"  # where a post's image is fetched from ({did}, {cid})
    # a mirror inside the network is not refused as private; its redirects are checked like any host's
    plc_url: str = "https://plc.directory"  # the PLC directory did:plc accounts' handles are resolved at (then verified at the handle's own host)
    zstd_dictionary: Path | None = None  # Jetstream's dictionary file; set to ask for compressed frames
    cursor_overlap_s: float = Field(5.0, ge=0)  # resume this far before the saved cursor; duplicates are dropped by event id
    backoff_initial_s: float = Field(1.0, gt=0)  # first wait before reconnecting a dropped stream; doubles to backoff_max_s
    backoff_max_s: float = Field(60.0, gt=0)  # longest wait between reconnects
    idle_timeout_s: float = Field(60.0, gt=0)  # no frame (or Mastodon heartbeat) for this long: reconnect
    connect_timeout_s: float = Field(10.0, gt=0)  # to connect to the platform's stream (handshake included)
    checkpoint_every: int = Field(200, gt=0)  # events; the cursor is saved only after the broker has them
    checkpoint_interval_s: float = Field(2.0, gt=0)  # ...or after this many seconds, whichever comes first
    seen_ids_max: int = Field(500_000, gt=0)  # event ids remembered for de-duplication across reconnects and restarts
    post_cache_max: int = Field(200_000, gt=0)  # image posts remembered so reposts/quotes become sightings
    max_frame_bytes: int = Field(2 * 1024 * 1024, gt=0)  # the largest stream message taken (decompressed); a larger one ends the connection
    mastodon_backfill_pages: int = Field(5, ge=0)  # x 40 statuses, after a disconnect without Last-Event-ID support
    rate_limit_max_wait_s: float = Field(300.0, gt=0)  # longest pause a platform's rate limit (429, Retry-After) is waited out
    ingest_tokens_env: str = "DEEPWATCH_INGEST_TOKENS"  # NAME:TOKEN[,NAME:TOKEN...] in that variable
    ingest_max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)  # the largest request body serve-ingest takes (413 above)
    ingest_max_buffered_bytes: int = Field(64 * 1024 * 1024, gt=0)  # request bytes in memory, all requests together; over: 503 busy
    ingest_max_lines: int = Field(1000, gt=0)  # events one request may carry (and at most ingest_burst; 413 above)
    ingest_rate_per_s: float = Field(50.0, gt=0)  # events per second per token, sustained
    ingest_burst: int = Field(500, gt=0)  # events a token may send at once above its sustained rate
    ingest_broker_timeout_s: float = Field(5.0, gt=0)  # longer than this without the broker: 503 + Retry-After
    ingest_tls_proxy: bool = False  # clients reach serve-ingest only through a TLS-terminating proxy (or a loopback-only port mapping): no plain-http warning at start


class FindingsSettings(_Section):
    """Where findings go. ``url`` None = the embedded SQLite file in data_dir;
    ``es://host:9200`` / ``https://host:9200`` = Elasticsearch, its https
    certificate checked against ``ca_certs`` (credentials only from the
    environment: DEEPWATCH_ES_API_KEY, or DEEPWATCH_ES_USERNAME +
    DEEPWATCH_ES_PASSWORD)."""

    url: str | None = None  # None: SQLite in data_dir; es://HOST:9200 or https://HOST:9200: Elasticsearch
    ca_certs: Path | None = None  # PEM bundle of the private CA that signed Elasticsearch's https certificate (ECK's <name>-es-http-certs-public); None: the system's CAs
    verify_certs: bool = True  # false: Elasticsearch's https certificate is not checked (throwaway test clusters only)
    index_prefix: str = "deepwatch"  # Elasticsearch indices are named <prefix>-clusters, <prefix>-sightings...
    bulk_max_actions: int = Field(500, gt=0)  # a bulk request is sent at this many actions...
    bulk_max_bytes: int = Field(5 * 1024 * 1024, gt=0)  # ...or this many bytes of NDJSON...
    bulk_flush_s: float = Field(0.2, gt=0)  # ...or every this many seconds: how stale the store may be behind the stream
    # the store's writes and the duplicate lookup, while it cannot answer for a reason that passes
    retry_initial_s: float = Field(0.5, gt=0)  # backoff on a lock, a full disk, ES 429/5xx; doubles to retry_max_s
    retry_max_s: float = Field(30.0, gt=0)  # the longest wait between those retries
    request_timeout_s: float = Field(30.0, gt=0)  # one Elasticsearch request (a bulk write, a lookup)
    # the desk's search and its queue's text filter: stopped past this, not held on to (`deepwatch search` takes --timeout)
    search_timeout_s: float = Field(10.0, gt=0, le=3600)  # the longest one analyst search may read the store

    @field_validator("index_prefix")
    @classmethod
    def _index_prefix(cls, value: str) -> str:
        return check_index_prefix(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        from streams.findings import check_store_url  # the rules open_findings applies

        return check_store_url(value)


class DeskSettings(_Section):
    """The fact-check desk (``deepwatch serve``). Users live in a JSON users file
    (hashed passwords, made with ``deepwatch desk-user``); API tokens only in
    the environment variable named by ``tokens_env`` as ``role:name:token``
    items separated by commas. There are no default credentials."""

    users_file: Path | None = None  # default: <data_dir>/desk-users.json
    tokens_env: str = "DEEPWATCH_DESK_TOKENS"  # name of the env var holding API tokens, role:name:token[,...]
    require_login_on_loopback: bool = False  # reading is open on 127.0.0.1/::1 unless set
    session_hours: float = Field(12.0, gt=0)  # a login lasts this long
    # per client address and user name; 4x this per address, and per user name (but not where it logged in lately)
    login_failures_per_minute: int = Field(5, gt=0)  # failed logins a client address may make for one user name a minute
    # Reverse proxies whose X-Forwarded-For/-Proto the desk believes (addresses or CIDR
    # ranges, "*" for any): the login limits then count the client's address, not the
    # proxy's, and a loopback desk needs a login (a proxy's clients are not this machine).
    # Empty: the peer's address counts, and the headers are ignored.
    trusted_proxies: list[str] = Field(default_factory=list)  # proxies whose X-Forwarded-For/-Proto are believed: addresses, CIDR ranges or "*"
    refresh_s: int = Field(30, ge=0)  # queue auto-refresh
    # The queue's view (held in memory, ~3.6 KB a cluster): clusters last seen within view_days
    # of the newest last_seen in the store (stream time, not the wall clock), at most
    # max_view_clusters of them (the most recently seen), plus every cluster with a desk
    # verdict. Older clusters stay reachable: cluster pages, links and search read them by id.
    view_days: float = Field(30.0, ge=0)  # the queue's window in days of stream time; 0: every cluster
    max_view_clusters: int = Field(50_000, ge=0)  # the most recently seen clusters the queue holds at most; 0: no cap
    thumb_px: int = Field(256, ge=32, le=1024)  # the size of the pages' larger thumbnails, in pixels (32 to 1024)
    thumb_cache_mb: int = Field(64, gt=0)  # memory the thumbnails made are kept in
    # account alerts: at least this many likely-AI pictures, and this share of
    # the account's pictures, within the trailing window before its last post
    account_min_ai_pictures: int = Field(5, ge=0)  # an account alert needs at least this many likely-AI pictures...
    account_min_ai_share: float = Field(0.6, ge=0, le=1)  # ...and this share of the account's pictures...
    account_window_hours: float = Field(24 * 7, gt=0)  # ...within this window before its last post
    account_check_s: float = Field(30.0, gt=0)  # how often the desk looks for accounts to alert on
    # The desk as people reach it (behind a proxy, say): alert webhooks then carry "desk_url",
    # a link to the alert's cluster page, and a hook's summary line ends with it.
    public_url: str | None = None  # the desk's address for links in alerts, e.g. https://desk.example.org; None: no links

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return check_public_url(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an address or CIDR range (or \"*\")") from None
        return value


class BatchSettings(_Section):
    """The streaming cost per message. The cluster stage takes ops in batches,
    which spreads a store transaction, changelog writes and produce requests
    over many; it waits at most ``cluster_within_s`` for a batch to fill,
    which bounds the latency this adds."""

    # Cluster ops per engine-state transaction. A batch is applied without
    # yielding to the event loop (no rebalance can land half-way), so this
    # also bounds how long the worker's other agents wait: ~50-100 ms.
    cluster_max_ops: int = Field(50, ge=1, le=10_000)  # cluster ops applied in one engine-state transaction
    cluster_within_s: float = Field(0.02, gt=0, le=5.0)  # longest wait for a batch of cluster ops to fill
    # Pictures up to this many pixels are analysed on the worker's event loop,
    # larger ones in a thread (0: always a thread). A thread hop per event
    # costs more than decoding and hashing a small picture (streams.stage).
    # With an Elasticsearch findings store, events whose id must be looked up
    # still take the thread (a network round trip must not hold the loop).
    analyze_inline_max_pixels: int = Field(4_000_000, ge=0)  # pictures up to this many pixels are analysed on the event loop; 0: always a thread


class Settings(BaseSettings):
    # env_parse_none_str: an empty variable unsets a setting that may be unset
    # (settings_check._empty_mistake refuses it for the others)
    model_config = SettingsConfigDict(env_prefix="DEEPWATCH_", env_nested_delimiter="__", extra="ignore",
                                      allow_inf_nan=False, env_parse_none_str="")  # inf/nan: as in _Section

    data_dir: Path = Path("deepwatch-data")  # findings (SQLite), the blob store, engine state, banks, models
    broker: str = "embedded"  # "embedded" (Tansu) or kafka://host:port[,host:port]
    topic_prefix: str = "deepwatch"  # topics are named <prefix>.events etc.: letters, digits, . _ -, at most 200
    # a huge count was a struct.error from the Kafka client; brokers cap far lower anyway
    partitions: int = Field(4, gt=0, le=10_000)  # of the topics deepwatch creates: the most workers of one role that share the work
    app_id: str = "deepwatch"  # the Faust app id: consumer groups and internal topics; one per deployment on a broker
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus /metrics on workers; 0 = any free port
    log_level: LogLevel = "INFO"  # in any case; WARN and FATAL are taken as WARNING and CRITICAL
    log_format: LogFormat = "json"  # json: one object per line, for log shippers; console: readable lines, each record's fields as key=value
    # Forked from one process that imported the pipeline once (streams.zygote:
    # about a second of CPU less per worker), or each a fresh interpreter.
    # `deepwatch worker` is always a process of its own.
    local_workers: Literal["fork", "spawn"] = "fork"  # how replay/demo/run start local workers: fork / spawn

    fetch: FetchSettings = Field(default_factory=FetchSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    detect: DetectSettings = Field(default_factory=DetectSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    connectors: ConnectorSettings = Field(default_factory=ConnectorSettings)
    findings: FindingsSettings = Field(default_factory=FindingsSettings)
    desk: DeskSettings = Field(default_factory=DeskSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        # the broker refused a bad name only once a worker created its topics
        if not TOPIC_PREFIX_RE.fullmatch(value):
            raise ValueError("use letters, digits, . _ - (1 to 200 characters), e.g. deepwatch: Kafka topic names allow no others")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("DEEPWATCH_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    @property
    def model_dir(self) -> Path:
        return self.detect.model_dir or self.data_dir / "models"

    @property
    def banks_path(self) -> Path:
        return Path(self.data_dir) / "banks.sqlite"

    def bank_store(self, *, read_only: bool = False):
        """The banks of known pictures, matching with the configured rule
        (``read_only``: an existing file, opened for reading only)."""
        from detectors.banks import BankStore
        from streams.private_files import SQLITE_COMPANIONS, owner_only, private_dir

        if not read_only:  # here, not in detectors/ (no deployment policy there): desks' hash lists and thumbnails
            try:
                private_dir(self.banks_path.parent)
            except OSError:  # BankStore's own mkdir says why, in its words
                pass
            # another user's file is left to BankStore, whose error says why it cannot be written
            # (a warning about its mode first was a second line of a one-line mistake)
            if not self.banks_path.exists() or self.banks_path.stat().st_uid == os.geteuid():
                owner_only(self.banks_path, "banks file", SQLITE_COMPANIONS)
        return BankStore(self.banks_path, read_only=read_only, **self.dedupe.thresholds())

    def decode_limits(self):
        from detectors.imagedata import DecodeLimits

        return DecodeLimits(max_pixels=self.decode.max_pixels, max_dimension=self.decode.max_dimension,
                            max_bytes=self.fetch.max_bytes, max_decode_bytes=self.decode.max_decode_mb << 20,
                            max_jpeg_scans=self.decode.max_jpeg_scans)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"


def setting_source(name: str) -> Literal["env", "toml"] | None:
    """Where top-level setting ``name`` of ``Settings`` built now comes from,
    asked of the sources ``Settings`` reads, in its own precedence
    (``settings_customise_sources``): "env" (its ``DEEPWATCH_`` variable),
    "toml" (the settings file, ``DEEPWATCH_CONFIG``), or None: neither gives
    it, so it is the default, or an argument (a CLI flag) these do not see.
    A source that cannot be read (already reported when the settings were
    built) gives nothing."""
    for kind, values in source_values():
        if name in values:
            return kind
    return None


def source_values() -> list[tuple[Literal["env", "toml"], dict[str, Any]]]:
    """What the environment and the settings file each give ``Settings`` now,
    as nested dicts (``{"alerts": {"min_fake_score": "1.5"}}``), highest
    precedence first, so that a refusal can say where each value came from
    (``settings_check.origin``). A source that cannot be read gives nothing:
    its own error is reported already."""
    from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource, InitSettingsSource, SecretsSettingsSource

    sources = Settings.settings_customise_sources(
        Settings, init_settings=InitSettingsSource(Settings, {}), env_settings=EnvSettingsSource(Settings),
        dotenv_settings=DotEnvSettingsSource(Settings), file_secret_settings=SecretsSettingsSource(Settings))
    out: list[tuple[Literal["env", "toml"], dict[str, Any]]] = []
    for source in sources:
        kind: Literal["env", "toml"] | None = (
            "env" if isinstance(source, EnvSettingsSource)
            else "toml" if isinstance(source, TomlConfigSettingsSource) else None)
        if kind is None:
            continue
        try:
            out.append((kind, source()))
        except (PydanticSettingsError, OSError, ValueError):
            continue
    return out


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; ``config`` is a TOML file, ``overrides`` come from CLI flags
    (``None`` values are ignored so unset flags do not mask env/TOML)."""
    if config is not None:
        os.environ["DEEPWATCH_CONFIG"] = str(config)
    from streams.settings_check import (SettingsError, environment_mistakes, explain_lines, explain_source_error,
                                        refusal, toml_mistakes)

    # The model ignores extra keys (the environment holds unrelated
    # DEEPWATCH_ variables, which environment_mistakes judges): a misspelt
    # override from a CLI flag would be dropped silently.
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise TypeError(f"load_settings: no such setting {', '.join(map(repr, unknown))}")
    # Every mistake in one refusal: an operator upgrading with three outdated
    # keys fixed one a run. The model ignores the variables and top-level
    # keys refused here, so its own errors are still worth collecting.
    by_name = environment_mistakes(os.environ)
    mistakes = [message for _, message in by_name]
    if os.environ.get("DEEPWATCH_CONFIG"):
        try:
            mistakes += toml_mistakes(Path(os.environ["DEEPWATCH_CONFIG"]))
        except SettingsError as e:  # not a readable TOML file: there is nothing more to check
            raise refusal([*mistakes, str(e)]) from None
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        mistakes += explain_lines(e, given, reported=frozenset(name.upper() for name, _ in by_name))
    except PydanticSettingsError as e:
        mistakes.append(str(explain_source_error(e, os.environ)))
    if mistakes:
        raise refusal(mistakes)
    return settings
