"""Run the pipeline: demo, replay, ingest, worker, schema."""

from __future__ import annotations

import json
import os
import shlex
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streams.cli.app import app
from streams.cli.common import (
    Broker, Config, DataDir, check_alert_senders, check_banks, check_engine_state, check_writable_dir,
    create_missing_topics, err, fail, print_json, settings_from, write_out,
)
from streams.plurals import counted
from streams.cli.query import StoreOpt
from streams.settings import Settings


def _use_store(settings: Settings, store_url: Optional[str]) -> None:
    """--store: where findings go (checked now, so a typo fails before any broker starts)."""
    from streams.findings import StoreURLError, open_findings

    if store_url:
        settings.findings.url = store_url
    if settings.findings.url:
        from streams.es_client import EsError

        try:
            store = open_findings(settings.findings.url, settings.data_dir, settings)
            store.ensure_setup()  # Elasticsearch's templates and indices; nothing for SQLite
            store.close()
        except (StoreURLError, EsError) as e:
            raise typer.BadParameter(str(e), param_hint="--store") from None


def _check_feed_has_events(feed: Path) -> None:
    """A feed without one event line: replay started a broker and workers and
    ingest connected, both to report 0 events and exit 0."""
    from streams.ingest import iter_lines_at

    if next(iter(iter_lines_at(feed)), None) is None:
        raise typer.BadParameter(f"{feed} is empty (no event lines); give a JSONL feed of events "
                                 "(see `deepwatch schema`)", param_hint="FEED")


def default_workers(settings: Settings) -> int:
    """Pipeline workers when ``--workers`` is not given: one per core this
    process may use, at most one per events partition (more would idle).
    Measured on 2 cores (docs/clusters.md, "Session 8"): one pipeline process
    is the bottleneck, and 2 workers won every quiet same-run pair (2.59-3.33x
    the naive pipeline against 2.28-2.72x); on a loaded machine the two were
    close, the second worker's imports costing start-up."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, settings.partitions))


def _replay(settings: Settings, feed: Path, *, workers: int, timeout_s: float, live_table: bool,
            wait_models: bool = True, split: bool = False):
    """Start, produce, wait, summarize, stop. Waits for every event to be a
    sighting or dead letter and for the alerts that raised; with
    ``wait_models`` also for the detect role's results (the embedded broker
    forgets unanswered requests when it stops). ``timings`` in the summary
    holds the start-up and shutdown phases."""
    from streams import runner
    from streams.ingest import count_lines, produce_feed
    from streams.topics import PIPELINE_ROLES

    timings: dict[str, float] = {}
    started_at = datetime.now(timezone.utc)  # this run's alerts are those raised from here on
    age = runner.process_age()
    if age is not None:
        timings["imports"] = age  # interpreter start to here: the CLI's own imports
    models = bool(settings.detect.models)
    with ExitStack() as stack:
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=False,
        )
        what = "the embedded broker and " if settings.broker == "embedded" else ""
        err.print(f"[dim]starting {what}{workers} worker(s); logs in {Path(settings.data_dir) / 'logs'}[/]")
        cluster = runner.start_cluster(settings, stack)
        timings.update(cluster.timings)
        # before the workers start: an earlier run's clusters still waiting for
        # the models are asked again and waited for like this run's
        pending_at_start = runner.ask_models_again(cluster) if models else 0
        spawned: float | None = None

        def spawn() -> None:
            nonlocal spawned
            spawned = time.monotonic()
            if models:
                # First: its imports and model load are the longest start-up; it
                # is niced, so the pipeline workers still get the cores.
                cluster.start_worker("detect")
            if split:
                cluster.start_worker("cluster")
            for _ in range(workers):
                cluster.start_worker("analyze" if split else "pipeline")

        def spawn_when_ready() -> None:
            # The zygote's imports take longer than this command's own and the
            # broker's start (measured on the filer's feed: the first spawn
            # waited 0.4-0.7 s for it). Meanwhile the feed is produced (below),
            # and the workers are forked the moment it is ready: the producing
            # then no longer takes CPU from the workers' start, and a large
            # feed does not hold them back.
            if spawned is None and cluster.can_spawn_now():
                spawn()

        spawn_when_ready()
        lines = count_lines(feed)
        live = None
        if live_table:
            from streams.cli.query import cluster_table
            from streams.findings import open_findings

            store = open_findings(settings.findings.url, settings.data_dir, settings)

            def render():
                return Group(cluster_table(store.clusters(limit=15), title="deepwatch — live clusters"), progress)

            out = Console()
            # Off a terminal, rich leaves the last frame without a newline: whatever
            # comes next (the summary, on stderr, in a `2>&1 | tee` log) would join it.
            stack.callback(lambda: out.is_terminal or out.line())
            live = stack.enter_context(Live(render(), console=out, refresh_per_second=2))
        else:
            stack.enter_context(progress)
        t_ingest = progress.add_task("ingest", total=lines)
        t_proc = progress.add_task("processed", total=lines)
        # The feed goes in while the zygote imports and the workers start (a
        # new group reads from the earliest offset), so producing costs no
        # wall time of its own.
        producing = time.monotonic()

        def produced_some(n: int) -> None:
            progress.advance(t_ingest, n)
            spawn_when_ready()

        produced = produce_feed(feed, cluster.bootstrap, settings, progress=produced_some)
        timings["produce"] = time.monotonic() - producing
        if spawned is None:  # the zygote still imports: ``start_worker`` waits for it
            spawn()
        assert spawned is not None
        progress.update(t_proc, total=len(produced.offsets), completed=0)
        cluster.wait_ready(roles=PIPELINE_ROLES)
        started = time.monotonic()  # throughput counts from here: start-up is reported as its own phase
        timings["workers_ready"] = started - spawned
        err.print(f"[dim]workers ready after {started - spawned:.1f}s[/]")

        def on_progress(done: int) -> None:
            progress.update(t_proc, completed=done)
            if live is not None:
                live.update(render())

        marks: dict[str, float] = {}
        resends = runner.Resends()
        complete = runner.wait_until_processed(
            cluster, produced.offsets, timeout_s=timeout_s, on_progress=on_progress, models=models and wait_models,
            produced=produced, marks=marks, resends=resends,
        )
        seconds = time.monotonic() - started
        if live is not None:
            live.update(render())
        stage_seconds = cluster.stage_seconds()  # from the workers' /metrics: while they run
        for w in cluster.workers:
            for phase, secs in w.log_times().items():
                key = f"{w.role}_{phase}"
                timings[key] = max(timings.get(key, 0.0), secs)
        stopping = time.monotonic()
        # The workers stop before the summary counts the store: what they still end while
        # stopping (an op or a batch in hand) lands first. Counted before, a copy of an event
        # landing then changed the store under a summary already taken.
        cluster.stop()
        stopped = time.monotonic()
        summary = runner.summarize(settings, produced.lines, produced.offsets, produced.refused, seconds, complete,
                                   run=produced.run, ingest_seconds=marks.get("events_done", started + seconds) - started,
                                   started_at=started_at)
        summarized_s = time.monotonic() - stopped
        summary.stage_seconds = stage_seconds
        summary.workers = workers
        summary.models_pending_at_start = pending_at_start
        summary.resent, summary.resent_unsettled = resends.events, resends.unsettled
    timings["shutdown"] = time.monotonic() - stopping - summarized_s
    summary.timings = {k: round(v, 3) for k, v in timings.items()}
    # after the workers stopped: what their senders left is what stays until a redelivery
    summary.run_alert_deliveries = _run_alert_deliveries(settings, started_at)
    return summary


# An alert sent to several hooks counts once, under its least settled
# delivery: not tried yet, tried and still owed, refused for good, else delivered.
_LEAST_SETTLED_FIRST = ("queued", "failed", "rejected", "delivered")
# the order the summary says them in (``run_alert_deliveries``)
_DELIVERY_STATES = ("delivered", "failed", "rejected", "queued")


def _run_alert_deliveries(settings: Settings, started_at: datetime) -> dict[str, int]:
    """This run's alerts (raised from ``started_at`` on) by where their
    webhook deliveries stand, as ``_LEAST_SETTLED_FIRST`` counts them; an alert
    without a delivery (no hook configured) is not counted. Replay sends each
    alert once (with the hook's retries) and stops long before the first
    redelivery round (``alerts.webhook_redeliver_s``): a delivery that failed
    stays failed until a worker's redelivery sends it."""
    from streams.findings import open_findings

    counts = dict.fromkeys(_DELIVERY_STATES, 0)
    if not settings.alerts.webhooks:
        return counts
    store = open_findings(settings.findings.url, settings.data_dir, settings)
    try:
        mine = [a.alert_id for a in store.alerts_created_since(started_at)]
        status = store.delivery_status(mine) if mine else {}
    finally:
        store.close()
    for alert_id in mine:
        states = {str(d.state) for d in status.get(alert_id, [])}
        least = next((s for s in _LEAST_SETTLED_FIRST if s in states), None)
        if least is not None:
            counts[least] += 1
    return counts


def _print_summary(summary, fmt_json: bool, settings: Settings | None = None) -> None:
    if fmt_json:
        print_json(summary.__dict__)
        _warn_all_dead(summary)  # on stderr: the JSON stays clean
        _warn_undelivered(summary, settings)
        _warn_unsettled(summary, settings)
        return
    ended = summary.run_outcomes
    dl = ", ".join(f"{k}={v}" for k, v in sorted(summary.dead_letters.items())) or "none"
    # events/s is over the time every event took to end (``ingest_seconds``);
    # the model results that land after that are said apart
    ingest = summary.ingest_seconds if summary.ingest_seconds is not None else summary.seconds
    then = f", model results in after {summary.seconds}s" if summary.seconds > ingest else ""
    err.print(
        f"[bold]{'done' if summary.complete else 'TIMED OUT'}[/]: {summary.events} events "
        f"({summary.produced} produced, {summary.refused_at_ingest} refused at ingest) ended in {ingest}s "
        f"= {summary.events_per_second} events/s{then}; this run: {ended.get('sighting', 0)} new sightings, "
        f"{ended.get('duplicate', 0)} already stored, {ended.get('dead_letter', 0)} dead letters"
    )
    # the store's totals: earlier runs into the same data dir count too
    err.print(f"data dir: {counted(summary.sightings, 'sighting')}, {counted(summary.clusters, 'cluster')}, "
              f"{counted(summary.alerts, 'alert')}; dead letters: {dl} (`deepwatch dead-letters` lists them)")
    if summary.models_pending_at_start:
        err.print(f"{summary.models_pending_at_start} cluster(s) an earlier run left waiting for a model result "
                  "were asked again")
    if summary.models_pending:
        err.print(f"{summary.models_pending} cluster(s) still wait for a model result; their scores lack model "
                  "evidence (a later replay into this data dir asks again)")
    if summary.alert_latency_s:
        err.print(f"event→alert latency of this run's alerts (s): {summary.alert_latency_s}")
    sent = summary.run_alert_deliveries
    if any(sent.values()):
        err.print("this run's alerts by webhook delivery: " + ", ".join(f"{sent[s]} {s}" for s in _DELIVERY_STATES),
                  highlight=False)
    resent = getattr(summary, "resent", 0)
    if resent and not getattr(summary, "resent_unsettled", 0):
        err.print(f"{counted(resent, 'event')} stood still and {'was' if resent == 1 else 'were'} sent again "
                  "(each still ends once); both copies of each ended before these counts", highlight=False)
    _warn_all_dead(summary)
    _warn_undelivered(summary, settings)
    _warn_unsettled(summary, settings)


def _warn_all_dead(summary) -> None:
    """`replay /etc/passwd` ended "done", exit 0, as a feed of hostile events
    would: say why, by what ended most of this run's events (the feed itself,
    local paths, or image hosts out of reach)."""
    if not (summary.events and summary.run_outcomes.get("dead_letter", 0) == summary.events):
        return
    mine = summary.run_dead_letters or summary.dead_letters  # a summary without the run's own: the store's
    top = max(mine, key=lambda k: mine[k], default="validate:")
    stage, _, reason = top.partition(":")
    if stage == "validate":
        why = "is FEED a deepwatch event feed, one JSON event per line (`deepwatch schema` prints its JSON Schema)?"
    elif stage == "fetch" and reason in _LOCAL_PATH_REASONS:
        why = ("no picture of this run could be read: a relative image path is read from the feed's directory, "
               "and every path must lie under it or an --image-root.")
    elif stage == "fetch":
        why = f"no picture of this run could be fetched (most: {top}): are the image hosts reachable from here?"
    else:
        why = f"most of them at {top}."
    err.print(f"warning: every event of this run was dead-lettered: {why} `deepwatch dead-letters` says why for "
              "each.", style="yellow", markup=False, highlight=False)


def _warn_undelivered(summary, settings: Settings | None) -> None:
    """A replay whose webhook deliveries did not all go through ended "done"
    without a word, and nothing of it sends them again: say how many and
    what does (``_run_alert_deliveries``)."""
    sent = summary.run_alert_deliveries
    left = {s: sent[s] for s in _DELIVERY_STATES if s != "delivered" and sent.get(s)}
    if not left:
        return
    n = sum(left.values())
    where = ""
    if settings is not None:  # the store this run wrote to, as `redeliver` is told of it
        where = f" --data-dir {shlex.quote(str(settings.data_dir))}"
        if settings.findings.url and settings.findings.url.strip():
            where += f" --store {shlex.quote(settings.findings.url.strip())}"
    prog = _prog()
    how = ", ".join(f"{v} {k}" for k, v in left.items())
    err.print(f"warning: {n} of this run's alerts {'was' if n == 1 else 'were'} not delivered to every webhook "
              f"({how}): replay tries each once (with the hook's retries), not again; a `{prog} worker` on this "
              f"store sends failed and queued ones (its leader's redelivery, every alerts.webhook_redeliver_s), "
              f"`{prog} redeliver TARGET` queues rejected ones again, and `{prog} redeliver{where}` lists what "
              "waits per target.",
              style="yellow", markup=False, highlight=False, soft_wrap=True)


def _warn_unsettled(summary, settings: Settings | None) -> None:
    """Events replay sent again with a copy that never ended while it
    waited (``runner.Resends``): counted by the copy that did, which the
    other may still change (one outcome per event: a sighting replaces the
    event's dead letter) where it is left in a broker that outlives replay."""
    left = getattr(summary, "resent_unsettled", 0)
    if not left:
        return
    external = settings is not None and settings.broker != "embedded"
    then = ("they stay in the broker's events topic, where a later worker of the group may still read them and "
            "change these counts (a dead letter replaced by the event's sighting)" if external else
            "the embedded broker stopped with them, so nothing changes these counts any more")
    err.print(f"warning: {left} of the {counted(summary.resent, 'event')} replay sent again after a stall had a copy that "
              f"never ended (lost in a worker, or still queued when replay stopped waiting): each is counted by "
              f"the copy that ended; {then}.", style="yellow", markup=False, highlight=False, soft_wrap=True)


# fetch's reasons for a local image path that cannot be read (streams.fetch)
_LOCAL_PATH_REASONS = {"not_found", "path_not_allowed", "bad_path"}


def _check_state_files(settings: Settings) -> None:
    """The data dir the workers write (a read-only one started, then logged
    "findings store write failed" for good) and the SQLite files they open
    at start: the banks (the analyze stage matches every picture against
    them) and the engine state."""
    check_writable_dir(Path(settings.data_dir), "--data-dir")
    check_banks(settings)
    check_engine_state(settings)


def _check_external_broker(settings: Settings) -> None:
    """A --broker (or DEEPWATCH_BROKER) that is not a Kafka URL, or that
    nothing answers at, is one line before anything starts: replay printed
    "starting 2 worker(s)" first, as if it had begun."""
    if settings.broker == "embedded":
        return
    from streams.broker import bootstrap_of, check_reachable

    check_reachable(bootstrap_of(settings.broker))  # BrokerError: one line naming the address and the fix


def _warn_lost_engine_state(settings: Settings) -> None:
    """One line when the engine state holds no cluster while the findings
    store holds sightings (``streams.engine_state.lost_state``): the run
    would count every cluster from zero. The workers log it too (WARNING)."""
    from streams.engine_state import lost_state

    msg = lost_state(settings, fresh_table=settings.broker == "embedded")
    if msg:
        err.print(f"warning: {msg}", style="yellow", markup=False, highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Run")
def replay(
    feed: Path = typer.Argument(..., metavar="FEED", exists=True, dir_okay=False, help="JSONL file of schema-v1 events (see `deepwatch schema`)."),
    data_dir: Optional[Path] = DataDir,
    image_root: List[Path] = typer.Option([], "--image-root", help="Extra directory local image paths may point into (repeatable). The feed's own directory is always allowed."),
    broker: Optional[str] = Broker,
    config: Optional[Path] = Config,
    workers: Optional[int] = typer.Option(None, min=1, max=8, show_default="one per CPU core, at most the events topic's partitions", help="Pipeline worker processes to run (with --split: analyze workers)."),
    timeout: float = typer.Option(600, min=1, help="Give up (exit 1) if the feed is not fully processed within this many seconds."),
    json_summary: bool = typer.Option(False, "--json", help="Same as --format json."),
    fmt: str = typer.Option("table", "--format", "-f", help="Summary format: table (a line on stderr, for people) or json (on stdout, for tools)."),
    store_url: Optional[str] = StoreOpt,
    split: bool = typer.Option(False, "--split/--no-split", help="Run the single writer and the sinks in a process of their own (role cluster) beside WORKERS analyze workers, instead of WORKERS pipeline workers that each run every stage."),
    wait_models: bool = typer.Option(True, "--wait-models/--no-wait-models", help="Also wait for the learned models' results (detect role) before exiting. Without: exit once every event is a sighting or dead letter and its alerts are stored; clusters whose model result had not landed keep models_pending (the embedded broker forgets their requests)."),
) -> None:
    """Run the full streaming pipeline over FEED and exit when every event is
    processed or dead-lettered (and, by default, every model result is in).

    Starts the embedded broker (unless --broker names a Kafka cluster) and the
    workers, produces the feed, waits, prints a summary (throughput, clusters,
    alerts, dead letters, event→alert latency) and stops everything. Findings
    stay in --data-dir for `deepwatch clusters|alerts|dead-letters`. Local
    image paths are allowed only under the feed's directory and --image-root.
    """
    from streams.cli.common import check_format

    json_summary = json_summary or check_format(fmt) == "json"
    if not feed.is_file():
        raise typer.BadParameter(f"{feed} is not a regular file (a pipe?): replay reads the feed more than once "
                                 "(to count it, and to resend stalled events); save it to a file first",
                                 param_hint="FEED")
    for root in image_root:  # as `deepwatch worker` does: a mistyped root would dead-letter every path under it
        if not root.is_dir():
            raise typer.BadParameter(f"{root} is not a directory", param_hint="--image-root")
    roots = [feed.resolve().parent, *[r.resolve() for r in image_root]]
    settings = settings_from(config, data_dir=data_dir, broker=broker)
    _check_state_files(settings)
    _use_store(settings, store_url)
    _warn_lost_engine_state(settings)
    check_alert_senders(settings)
    _check_feed_has_events(feed)
    _check_external_broker(settings)
    settings.ingest.image_roots = roots + [r for r in settings.ingest.image_roots if r not in roots]
    summary = _replay(settings, feed, workers=workers or default_workers(settings), timeout_s=timeout,
                      live_table=False, wait_models=wait_models, split=split)
    _print_summary(summary, json_summary, settings)
    raise typer.Exit(0 if summary.complete else 1)


def _prog() -> str:
    """How the user invoked deepwatch, so printed hints run as printed."""
    import shutil
    import sys

    invoked = sys.argv[0]
    name = Path(invoked).name
    on_path = shutil.which("deepwatch")
    if name == "deepwatch":
        if on_path and Path(on_path).resolve() == Path(invoked).resolve():
            return "deepwatch"
        return shlex.quote(invoked)  # e.g. .venv/bin/deepwatch (make demo) with the venv not activated
    if name != "__main__.py" and on_path:
        return "deepwatch"
    return f"{shlex.quote(sys.executable)} -m streams.cli"


@app.command(rich_help_panel="Run")
def demo(
    data_dir: Optional[Path] = DataDir,
    config: Optional[Path] = Config,
    burst: int = typer.Option(14, min=3, max=10_000, help="Reposts in the demo's viral bursts (3-10000)."),
    store_url: Optional[str] = StoreOpt,
) -> None:
    """The embedded default, end to end: start a broker and a worker, replay a
    bundled demo feed (a viral AI fake, a ComfyUI image, camera photos, hostile
    input) and show the clusters live. Findings stay queryable afterwards."""
    from streams.demo_feed import build_feed

    settings = settings_from(config, data_dir=data_dir)
    _check_state_files(settings)
    _use_store(settings, store_url)
    _warn_lost_engine_state(settings)
    check_alert_senders(settings)
    _check_external_broker(settings)
    feed_dir = Path(settings.data_dir) / "demo-feed"
    feed, _ = build_feed(feed_dir, burst=burst)
    settings.ingest.image_roots = [feed_dir.resolve()]
    summary = _replay(settings, feed, workers=1, timeout_s=600, live_table=True)
    _print_summary(summary, False, settings)
    d = shlex.quote(str(settings.data_dir))
    prog = _prog()
    sample = shlex.quote(str(feed_dir / "images" / "flood_q70.jpg"))
    err.print(
        f"\nExplore the findings:\n  {prog} clusters --data-dir {d}\n  {prog} alerts --data-dir {d} --format json\n"
        f"  {prog} dead-letters --data-dir {d}\n  {prog} similar {sample} --data-dir {d}\n"
        f"The fact-check desk (read-only on this machine; a verdict needs an editor's login):\n"
        f"  {prog} desk-user NAME --role editor --data-dir {d}\n  {prog} serve --data-dir {d}   # http://127.0.0.1:8080/",
        markup=False, highlight=False, soft_wrap=True,
    )
    raise typer.Exit(0 if summary.complete else 1)


def _check_ingest_feed(feed: Path) -> None:
    """Ingest reads a regular file, or a stream piped in (a pipe or socket:
    `cat feed | deepwatch ingest /dev/stdin`; the terminal it runs in, typed
    into). Anything else is refused before it is opened: a device such as
    /dev/zero is one endless line, read and dropped for ever at full CPU."""
    import os
    import stat

    from detectors.regular_file import special_kind

    kind = special_kind(feed)
    if kind is None:  # a regular file (typer refuses a directory or a missing path)
        return
    mode = os.stat(feed).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or _is_own_terminal(feed):
        return
    fail(f"{feed} is {kind}: give a JSONL file of events, or pipe them in "
         "(`cat FEED.jsonl | deepwatch ingest /dev/stdin`)")


def _is_own_terminal(feed: Path) -> bool:
    """``feed`` is the terminal this command reads its input from
    (/dev/stdin at a prompt): events typed in, ended with Ctrl-D."""
    import os

    try:
        if not os.isatty(0):
            return False
        mine, named = os.fstat(0), os.stat(feed)
    except OSError:
        return False
    return mine.st_rdev == named.st_rdev


@app.command(rich_help_panel="Run")
def ingest(
    # not exists=True: Typer's check took "-" for a file that does not exist (its allow_dash compares a
    # Path with "-"); the existence is checked below
    feed: Path = typer.Argument(..., metavar="FEED", dir_okay=False,
                                help="JSONL file of schema-v1 events; - (or /dev/stdin) reads them from a pipe, "
                                     "e.g. `cat FEED.jsonl | deepwatch ingest - --broker ...`."),
    broker: Optional[str] = typer.Option(None, "--broker", help="kafka://HOST:PORT of the running pipeline's broker (`deepwatch broker` prints it); default: DEEPWATCH_BROKER."),
    config: Optional[Path] = Config,
    create_topics: bool = typer.Option(
        True, help="Create missing topics with the workers' partition counts first (as `deepwatch worker` does): "
                   "a broker that creates a topic on first use gives it its own default count."),
) -> None:
    """Produce FEED's events to a running pipeline's events topic (malformed
    lines too: the pipeline dead-letters them with a reason)."""
    from streams.broker import bootstrap_of, check_reachable
    from streams.ingest import Produced, count_lines, produce_feed

    if str(feed) == "-":  # the usual name for "read stdin": was "file '-' does not exist"
        feed = Path("/dev/stdin")
    elif not os.path.exists(feed):
        raise typer.BadParameter(f"file {str(feed)!r} does not exist", param_hint="'FEED'")
    _check_ingest_feed(feed)
    settings = settings_from(config, broker=broker)
    if settings.broker == "embedded":
        raise typer.BadParameter("ingest sends to a running broker: pass --broker kafka://HOST:PORT or set DEEPWATCH_BROKER", param_hint="--broker")
    if feed.is_file():  # a pipe can be read once only: it is not looked into first
        _check_feed_has_events(feed)
    bootstrap = bootstrap_of(settings.broker)
    check_reachable(bootstrap)
    if create_topics:
        create_missing_topics(settings, bootstrap, timeout_s=15)
    # A pipe (`cat feed | deepwatch ingest /dev/stdin`) can be read only once:
    # counting its lines first left nothing to send ("produced 0 events").
    lines = count_lines(feed) if feed.is_file() else None
    produced = Produced()
    try:
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), console=err) as progress:
            task = progress.add_task("ingest", total=lines)
            produce_feed(feed, bootstrap, settings, progress=lambda n: progress.advance(task, n), keep=False,
                         out=produced)
    except KeyboardInterrupt:  # typer turns it into a silent exit 130: say how far the feed got
        total = lines if lines is not None else f"{produced.lines} read"
        err.print(f"interrupted: {produced.sent} of {total} events confirmed by the broker (run {produced.run}); "
                  "the others may be missing: re-run the feed (event ids make resent events harmless)",
                  markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    err.print(f"produced {produced.sent} events to {settings.topic('events')} (run {produced.run}); "
              f"refused {produced.refused} (too large)")


@app.command(rich_help_panel="Run")
def worker(
    role: str = typer.Option("pipeline", help="pipeline (ingest → cluster → sinks), detect (learned models, own consumer group), or the pipeline in two halves: analyze (ingest → cluster ops, own consumer group) plus cluster (the single writer and the sinks). Run pipeline workers or analyze+cluster workers on a feed, not both."),
    broker: Optional[str] = typer.Option(None, "--broker", help="kafka://HOST:PORT[,HOST:PORT] (`deepwatch broker` prints one); default: DEEPWATCH_BROKER. The embedded broker's quirks are detected, not configured."),
    data_dir: Optional[Path] = DataDir,
    config: Optional[Path] = Config,
    image_root: List[Path] = typer.Option([], "--image-root", help="Directory local image `path`s may point into (repeatable; adds to ingest.image_roots)."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0, max=65535, help="Serve Prometheus /metrics on this port (0 = any free port; env DEEPWATCH_METRICS_PORT)."),
    create_topics: bool = typer.Option(True, help="Create missing topics with the right partition counts before starting."),
    store_url: Optional[str] = StoreOpt,
) -> None:
    """Run one long-lived worker process against an existing broker."""
    from streams import worker as worker_mod
    from streams.topics import ROLES
    from streams.broker import bootstrap_of

    if role not in ROLES:
        raise typer.BadParameter(f"unknown role {role!r}: {', '.join(ROLES[:-1])} or {ROLES[-1]}", param_hint="--role")
    settings = settings_from(config, data_dir=data_dir, broker=broker, metrics_port=metrics_port)
    _check_state_files(settings)
    _use_store(settings, store_url)
    if role in ("pipeline", "cluster"):  # the roles whose sinks send alerts
        check_alert_senders(settings)
    if settings.broker == "embedded":
        raise typer.BadParameter("a worker joins an existing broker: pass --broker kafka://HOST:PORT (`deepwatch broker` starts one) or set DEEPWATCH_BROKER", param_hint="--broker")
    for root in image_root:
        if not root.is_dir():
            raise typer.BadParameter(f"{root} is not a directory", param_hint="--image-root")
    settings.ingest.image_roots = [*settings.ingest.image_roots, *[r.resolve() for r in image_root]]
    from streams import logs

    # The topic check's warnings are the worker's log (JSON for a shipper), not Python's bare last-resort lines
    logs.setup(settings.log_level, settings.log_format)
    if create_topics:
        create_missing_topics(settings, bootstrap_of(settings.broker))
    worker_mod.run(settings, role)


@app.command(rich_help_panel="Run")
def broker(
    data_dir: Optional[Path] = DataDir,
    port: int = typer.Option(9092, min=0, max=65535, help="Port to listen on (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default: the embedded broker has no authentication)."),
    config: Optional[Path] = Config,
) -> None:
    """Run the embedded Kafka-compatible broker (Tansu) in the foreground and
    print its URL; workers and `deepwatch ingest` take it as --broker. Topics
    are created up front. Storage is in memory: stopping it (Ctrl-C, SIGTERM)
    forgets the topics, while findings stay in the workers' data dir."""
    import signal

    from streams.topics import topic_specs
    from streams.broker import EmbeddedBroker, ensure_topics, free_port

    from streams.net_errors import ensure_port_free

    settings = settings_from(config, data_dir=data_dir)
    ensure_port_free(host, port, "pick another --port, or --port 0 for any free one")
    # its log goes in the data dir: one that cannot be written ended on "[Errno 13] Permission denied: '.../logs'"
    check_writable_dir(Path(settings.data_dir), "--data-dir")
    log_dir = Path(settings.data_dir) / "logs"
    b = EmbeddedBroker(log_dir, host=host)
    b.port = port or free_port(host)
    try:
        b.start()
    except (RuntimeError, TimeoutError) as e:
        raise typer.BadParameter(f"cannot start the broker on {host}:{b.port} ({e}); is the port taken? try --port 0", param_hint="--port") from None
    stopping = {"now": False}

    def stop(*_: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        typer.echo(b.url, err=False)  # stdout: the one line a script captures
        err.print(f"[dim]broker listening; log {b.log_path}. Next: deepwatch worker --broker {b.url} --data-dir DIR; "
                  f"deepwatch ingest FEED.jsonl --broker {b.url}. Ctrl-C stops it.[/]")
        import sys

        sys.stdout.flush()
        while not stopping["now"]:
            if b._proc is not None and b._proc.poll() is not None:
                raise typer.BadParameter(f"the broker exited with {b._proc.returncode}; see {b.log_path}")
            time.sleep(0.2)
    finally:
        b.stop()


class SchemaKind(str, Enum):
    event = "event"
    alert = "alert"


@app.command(rich_help_panel="Run")
def schema(
    what: SchemaKind = typer.Argument(SchemaKind.event, metavar="KIND", help="event: the input events deepwatch reads; alert: the "
                                      "body of an alert webhook (what a subscriber receives)."),
    out: Optional[Path] = typer.Option(None, help="Write to this file instead of stdout."),
) -> None:
    """Print a JSON Schema (v1): of input events, or of an alert webhook's body."""
    from streams.records import alert_json_schema, event_json_schema

    doc = json.dumps(event_json_schema() if what is SchemaKind.event else alert_json_schema(), indent=2) + "\n"
    if out:
        write_out(out, doc)
    else:
        typer.echo(doc, nl=False)
