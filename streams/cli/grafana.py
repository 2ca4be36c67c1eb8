"""``deepwatch grafana provision``: push the desk's dashboards, alert rules,
contact points and notification policy to a running Grafana (grafana-client).

The same artefacts are also provisioning files under
``dashboards/generated/grafana/provisioning`` for Grafanas that load them
from disk; this command is for shared or hosted instances."""

from __future__ import annotations

from typing import Optional

import typer

from streams.cli.app import app
from streams.cli.common import err, fail

grafana_app = typer.Typer(name="grafana", help="Grafana dashboards and desk alerting, as code.", no_args_is_help=True)
app.add_typer(grafana_app, name="grafana", rich_help_panel="Findings")


@grafana_app.command("provision")
def provision(
    url: Optional[str] = typer.Option(None, "--url", envvar="GRAFANA_URL", help="Grafana base URL (env GRAFANA_URL)."),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="GRAFANA_TOKEN",
        help="Service-account token with dashboard, alert-rule and notification write access. Prefer the "
             "GRAFANA_TOKEN environment variable: a flag ends up in shell history."),
    timeout: float = typer.Option(10.0, min=0.1, help="Seconds per Grafana request."),
) -> None:
    """Create or replace the deepwatch folder, the three dashboards (Pipeline
    health, Viral fakes now, One picture's spread), the desk rule group, the
    desk contact point (webhook, Slack, email from DEEPWATCH_DESK_WEBHOOK_URL,
    DEEPWATCH_DESK_SLACK_WEBHOOK_URL, DEEPWATCH_DESK_EMAILS) and the
    notification policy."""
    from dashboards import publish

    if not url:
        raise typer.BadParameter("give the Grafana URL, e.g. --url https://grafana.example", param_hint="--url")
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r} is not an http(s) URL; e.g. --url https://grafana.example", param_hint="--url")
    if not token:
        raise typer.BadParameter("set GRAFANA_TOKEN to a service-account token (or pass --token)", param_hint="--token")
    try:
        api = publish.client_from_env(timeout, url=url, token=token)
        result = publish.publish(api, message="deepwatch grafana provision")
    except publish.PublishError as e:
        fail(str(e))
    except Exception as e:  # connection refused, TLS, DNS: one line, not a traceback
        from streams.net_errors import network_reason

        fail(f"cannot reach Grafana at {url}: {network_reason(e)}")
    for line in publish.report(result, url.rstrip("/")):
        print(line)
    for line in publish.warnings(result):
        err.print(f"[yellow]{line}[/]")
