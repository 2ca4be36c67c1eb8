"""Query the findings store: clusters, alerts, dead letters."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from streams.cli.app import app
from streams.cli.common import Config, DataDir, FormatOpt, JsonAlias, check_format, print_json, settings_from
from streams.store import open_store


def _store(data_dir: Optional[Path], config: Optional[Path]):
    settings = settings_from(config, data_dir=data_dir)
    path = Path(settings.data_dir) / "findings.sqlite"
    if not path.exists():
        raise typer.BadParameter(f"no findings at {path}; run `deepwatch replay` or `deepwatch demo` first", param_hint="--data-dir")
    return open_store(settings.data_dir)


def _emit(rows: list[dict], fmt: str, title: str, columns: tuple[str, ...], cells: Callable[[dict], tuple]) -> None:
    """JSON (the contract for tools) or a table (for people)."""
    if fmt == "json":
        print_json(rows)
        return
    t = Table(title=title)
    for col in columns:
        t.add_column(col, overflow="fold")  # wrap long evidence and ids; never cut them off
    for row in rows:
        t.add_row(*cells(row))
    Console().print(t)


def cluster_table(clusters: list[dict], title: str = "Image clusters") -> Table:
    t = Table(title=title, expand=True)
    for col, kw in (("cluster", {"no_wrap": True, "min_width": 16}), ("fake", {"justify": "right"}),
                    ("verdict", {"no_wrap": True}),
                    ("evidence", {"ratio": 1, "overflow": "fold"}),
                    ("sightings", {"justify": "right"}), ("accounts", {"justify": "right"}),
                    ("5m", {"justify": "right"}), ("images", {"justify": "right"}), ("alert", {})):
        t.add_column(col, **kw)
    for c in clusters:
        color = {"likely-ai": "red", "inconclusive": "yellow"}.get(c["verdict"], "green")
        ev = c["evidence"][0]["detail"] if c["evidence"] else "—"
        t.add_row(
            c["id"], f"[{color}]{c['fake_score']:.2f}[/]", f"[{color}]{c['verdict']}[/]", ev,
            str(c["sightings"]), str(c["accounts"]), str(c["velocity"].get("sightings_5m", 0)),
            str(len(c["members"])),
            ("suppressed" if c.get("suppressed") else (f"[bold red]L{c['alert_level']}[/]" if c.get("alert_level") else "")),
        )
    return t


@app.command(rich_help_panel="Findings")
def clusters(
    data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
    include_merged: bool = typer.Option(False, help="Also list clusters that were merged into another (they carry merged_into)."),
    limit: Optional[int] = typer.Option(None, help="At most this many clusters, highest fake score first."),
    as_json: bool = JsonAlias,
) -> None:
    """List image clusters: fake score, verdict, evidence, spread and member images.

    JSON form: an array of objects with id, fake_score, verdict, evidence
    (detector, score, detail), sightings, accounts, first_seen, last_seen and
    members (sha256, phash, pdq, event_id), plus velocity, platforms, merges.
    """
    fmt = "json" if as_json else check_format(fmt)
    store = _store(data_dir, config)
    rows = store.clusters(include_merged=include_merged, limit=limit)
    if fmt == "json":
        print_json(rows)
    else:
        Console().print(cluster_table(rows))


@app.command(rich_help_panel="Findings")
def alerts(data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
           as_json: bool = JsonAlias) -> None:
    """List alerts raised when a likely fake spread fast (one per cluster, plus escalations).

    JSON form: an array of objects with alert_id, cluster_id, rule, level,
    fake_score, verdict, velocity, sightings, accounts, evidence, at (event
    time), created_at and deliveries (per webhook target: status, at; a
    failed delivery is retried every alerts.webhook_redeliver_s).
    """
    store = _store(data_dir, config)
    rows = store.alerts()
    status = store.delivery_status()
    for a in rows:
        a["deliveries"] = status.get(a["alert_id"], [])

    def delivery(a: dict) -> str:
        if not a["deliveries"]:
            return "—"
        return "; ".join(f"{d['status'][:60]}" for d in a["deliveries"])

    _emit(rows, "json" if as_json else check_format(fmt), "Alerts",
          ("time", "cluster", "level", "fake", "5m", "accounts", "rule", "webhook"),
          lambda a: (a["at"], a["cluster_id"], str(a["level"]), f"{a['fake_score']:.2f}",
                     str(a["velocity"]["sightings_5m"]), str(a["accounts"]), a["rule"], delivery(a)))


@app.command("dead-letters", rich_help_panel="Findings")
def dead_letters(data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
                 as_json: bool = JsonAlias) -> None:
    """List events that could not be processed, with the stage and reason.

    JSON form: an array of objects with event_id (when the event had one),
    stage, reason, detail, source (topic, partition, offset) and at.
    """
    _emit(_store(data_dir, config).dead_letters(), "json" if as_json else check_format(fmt), "Dead letters",
          ("event", "stage", "reason", "detail"),
          lambda d: (d["event_id"] or "—", d["stage"], d["reason"], d["detail"]))
