"""One typed settings object for every deepwatch process.

Precedence (highest first): explicit overrides (CLI flags) > environment
(``DEEPWATCH_*``, nested with ``__``, e.g. ``DEEPWATCH_ALERTS__MIN_FAKE_SCORE``)
> TOML file (``--config`` or ``DEEPWATCH_CONFIG``) > defaults. Secrets are only
ever read from the environment: the TOML file names the variable, not the value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class FetchSettings(BaseModel):
    allow_private_networks: bool = False  # loopback/private/link-local refused unless set
    max_bytes: int = 25 * 1024 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    retries: int = 2
    max_redirects: int = 3
    user_agent: str = "deepwatch/0.1 (+https://github.com/deepwatch)"


class DecodeSettings(BaseModel):
    max_pixels: int = 100_000_000  # 50-200 MP phone cameras exist; Pillow refuses > ~179 MP regardless
    max_dimension: int = 16_384


class IngestSettings(BaseModel):
    max_inline_bytes: int = 2 * 1024 * 1024  # base64-decoded size cap for inline images
    image_roots: list[Path] = Field(default_factory=list)  # local `path` images allowed only below these


class DedupeSettings(BaseModel):
    phash_threshold: int = 10
    pdq_threshold: int = 31
    pdq_min_quality: int = 50
    view_threshold: int = 8  # pHash radius when a crop/trimmed view is involved (bench/neardup.py sweep)

    def thresholds(self) -> dict[str, int]:
        """The matching rule's keyword arguments, as ClusterIndex and BankStore take them."""
        return {"phash_threshold": self.phash_threshold, "pdq_threshold": self.pdq_threshold,
                "pdq_min_quality": self.pdq_min_quality, "view_threshold": self.view_threshold}
    # Clusters with no sighting for this long (event time) leave the hot index
    # and the changelog table; the findings store keeps them, and a compact
    # cold index of their hashes revives one if its picture resurfaces.
    hot_window_hours: float = 24 * 7
    evict_every_ops: int = 1000


class DetectSettings(BaseModel):
    cheap: list[str] | None = None  # None = every registered cheap detector
    # learned models to run once per cluster; the packaged pixel probe needs nothing fetched
    models: list[str] = Field(default_factory=lambda: ["pixel-probe-lite0"])
    pixel_head: Path | None = None  # your own head for the pixel probe (deepwatch train --recipe pixel-probe)
    model_dir: Path | None = None  # default: <data_dir>/models
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    max_batch: int = 16
    max_wait_ms: float = 20.0


class WebhookSettings(BaseModel):
    url: str
    secret_env: str = "DEEPWATCH_WEBHOOK_SECRET"  # name of the env var holding the HMAC key
    timeout_s: float = 5.0
    retries: int = 3


class AlertSettings(BaseModel):
    min_fake_score: float = 0.7
    min_sightings_5m: int = 10  # velocity: sightings of the cluster in the trailing 5 minutes
    min_sightings_1h: int = 0
    # escalation re-alerts when the 5-minute velocity reaches this multiple of the last alert's
    escalation_factor: float = 3.0
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    console: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPWATCH_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("deepwatch-data")
    broker: str = "embedded"  # "embedded" (Tansu) or kafka://host:port[,host:port]
    topic_prefix: str = "deepwatch"
    partitions: int = 4
    app_id: str = "deepwatch"
    metrics_port: int | None = None  # Prometheus /metrics on workers; 0 = any free port
    log_level: str = "INFO"
    log_format: str = "json"  # json | console

    fetch: FetchSettings = Field(default_factory=FetchSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    detect: DetectSettings = Field(default_factory=DetectSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

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

    def bank_store(self):
        """The banks of known pictures, matching with the configured rule."""
        from detectors.banks import BankStore

        return BankStore(self.banks_path, **self.dedupe.thresholds())

    def decode_limits(self):
        from detectors.imagedata import DecodeLimits

        return DecodeLimits(max_pixels=self.decode.max_pixels, max_dimension=self.decode.max_dimension,
                            max_bytes=self.fetch.max_bytes)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; ``config`` is a TOML file, ``overrides`` come from CLI flags
    (``None`` values are ignored so unset flags do not mask env/TOML)."""
    if config is not None:
        os.environ["DEEPWATCH_CONFIG"] = str(config)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
