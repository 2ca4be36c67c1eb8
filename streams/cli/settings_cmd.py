"""``deepwatch settings``: the settings reference, and the values in effect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from streams.cli.app import app
from streams.cli.common import Config, settings_from, write_out
from streams.settings_check import redact_userinfo


@app.command("settings", rich_help_panel="Run")
def settings_cmd(
    fmt: str = typer.Option("markdown", "--format", "-f", help="markdown (the reference, as in docs/settings.md) or json (the values in effect)."),
    config: Optional[Path] = Config,
    out: Optional[Path] = typer.Option(None, help="Write to this file instead of stdout."),
) -> None:
    """Every setting with its environment variable, type, default and meaning,
    then the variables read that are not settings (secrets, DEEPWATCH_CONFIG,
    DEEPWATCH_ES_*) (markdown), or the values this environment and --config
    resolve to (json).
    Unknown DEEPWATCH_* variables and TOML keys are errors naming the closest
    valid key."""
    from streams.settings_check import reference_markdown

    if fmt == "markdown":
        # loaded for its checks alone: the help promises that unknown
        # variables and keys are errors, and markdown exited 0 with them
        settings_from(config)
        doc = reference_markdown()
    elif fmt == "json":
        doc = json.dumps(_redacted(_hooks_shown(json.loads(settings_from(config).model_dump_json()))), indent=2) + "\n"
    else:
        raise typer.BadParameter("must be 'markdown' or 'json'", param_hint="--format")
    if out:
        write_out(out, doc)
    else:
        typer.echo(doc, nl=False)


def _hooks_shown(doc: dict[str, Any]) -> dict[str, Any]:
    """Webhook URLs as ``scheme://host[:port]#<8 hex of the URL's SHA-256>``
    (``streams.webhooks.target_key``, as logs name them): their path or
    query often holds the subscriber's token. The hash still tells two
    URLs apart."""
    from streams.webhooks import target_key

    for hook in (doc.get("alerts") or {}).get("webhooks") or []:
        if isinstance(hook, dict) and isinstance(hook.get("url"), str):
            hook["url"] = target_key(hook["url"])
    return doc


def _redacted(value: Any) -> Any:
    """Values with any user:password in a URL (findings.url, broker, webhook
    URLs) as ``***@``: this output gets pasted into tickets, and deepwatch
    takes credentials only from the environment anyway."""
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        return redact_userinfo(value)
    return value
