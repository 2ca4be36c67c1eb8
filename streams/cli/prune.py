"""``deepwatch prune``: the blob store's retention, run by an operator or a
scheduled job (``deploy/k8s``), never by the workers (``streams.retention``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn

from streams.cli.app import app
from streams.cli.common import (
    Config, DataDir, FormatOpt, JsonAlias, check_format, err, fail, print_json, settings_from,
)
from streams.plurals import counted
from streams.cli.query import StoreOpt, _findings

_UNITS = {"d": 86400.0, "h": 3600.0}
_MIN_S = 3600.0  # under an hour, a picture being analysed right now could lose its blob
# A cutoff must stay a date: 999999d ended on "ValueError: year -711 is out of range".
_MAX_S = 36500 * 86400.0


def parse_period(text: str) -> float:
    """Seconds in a period written as ``30d`` or ``12h``; ValueError with the fix otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dh])\s*", text or "")
    if not m:
        raise ValueError(f"--older-than {text!r} is not a period: write days or hours, e.g. 30d or 36h")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < _MIN_S:
        raise ValueError(f"--older-than {text} is under an hour: pictures being analysed now could lose their "
                         "blob; give 1h or more")
    if seconds > _MAX_S:
        raise ValueError(f"--older-than {text} is over 100 years: give at most 36500d (to keep every picture, "
                         "do not run prune)")
    return seconds


@app.command(rich_help_panel="Findings")
def prune(
    older_than: str = typer.Option(..., "--older-than", metavar="PERIOD",
                                   help="Delete pictures not stored or seen for this long and in no cluster "
                                        "changed since: days or hours, e.g. 30d, 36h (at least 1h, at most 36500d)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be deleted; delete nothing."),
    data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, store_url: Optional[str] = StoreOpt,
    fmt: str = FormatOpt, as_json: bool = JsonAlias,
) -> None:
    """Delete stored pictures nobody has posted for a while (blob retention).

    The blob store (DATA_DIR/blobs) keeps every distinct picture the stream
    saw. This deletes a picture, with its analysis record, when it was not
    stored or seen again within PERIOD and is in no cluster whose findings
    changed within PERIOD (a spreading cluster keeps all its pictures).
    Findings (clusters, sightings, alerts) are never deleted. A deleted
    picture that is posted again is stored and analysed again; until then
    the desk shows no thumbnail of it, a desk verdict banks only its
    cluster's stored pictures, and clustering decides its reposts from the
    small record it keeps. Safe while workers run; schedule it (daily) with
    cron or the Kubernetes CronJob in deploy/k8s.
    """
    fmt = "json" if as_json else check_format(fmt)
    try:
        seconds = parse_period(older_than)
    except ValueError as e:
        fail(str(e))
    from streams.analyze import analysis_path
    from streams.blobstore import blob_dir
    from streams.retention import prune as run_prune

    settings = settings_from(config, data_dir=data_dir)
    blob_root = blob_dir(settings.data_dir)
    if not blob_root.is_dir():
        fail(f"no blob store at {blob_root}: check --data-dir (DEEPWATCH_DATA_DIR)")
    current = analysis_path(blob_root, "x").name[1:]  # the version suffix this code's workers read
    with _findings(data_dir, config, store_url) as store:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True,
                      disable=not err.is_terminal) as bar:  # off a terminal it left only a blank line
            task = bar.add_task("reading the clusters changed within the period")

            def looked_at(n: int) -> None:
                bar.update(task, description=f"{n:,} pictures looked at")

            report = run_prune(blob_root, store, seconds, dry_run=dry_run, progress=looked_at,
                               current_analysis=lambda name: name.endswith(current))
    if fmt == "json":
        print_json(report.as_json())
        return
    from datetime import datetime

    verb = "would delete" if dry_run else "deleted"
    # to the minute, for people: "2026-11-07T18:17:14.169177+00:00" read like a log line (JSON keeps it whole)
    since = datetime.fromisoformat(report.cutoff).strftime("%Y-%m-%d %H:%M UTC")
    Console(soft_wrap=True).print(
        f"{counted(report.blobs, 'picture')}: {verb} {report.deleted:,} ({report.deleted_bytes / 1e6:,.1f} MB with "
        f"{counted(report.analyses_deleted, 'analysis record')} and {counted(report.leftovers_deleted, 'leftover temp file')}); "
        f"kept {report.kept_recent:,} stored or seen since {since} and {report.kept_active:,} in "
        "clusters changed since", highlight=False)

