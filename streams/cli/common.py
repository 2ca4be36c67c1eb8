"""Options and helpers shared by the command modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from streams.settings import Settings, load_settings

err = Console(stderr=True)

DataDir = typer.Option(None, "--data-dir", "-d", help="Directory for findings, blobs and logs (env DEEPWATCH_DATA_DIR; default ./deepwatch-data).")
Config = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="TOML settings file (env DEEPWATCH_CONFIG). Environment variables override it.")
Broker = typer.Option(None, "--broker", help="'embedded' (start a Tansu broker) or kafka://HOST:PORT[,HOST:PORT] for an external cluster.")
FormatOpt = typer.Option("table", "--format", "-f", help="Output format: table (for people) or json (a stable contract for tools).")


def settings_from(config: Optional[Path] = None, **overrides: Any) -> Settings:
    return load_settings(config, **overrides)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def check_format(fmt: str) -> str:
    if fmt not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="--format")
    return fmt
