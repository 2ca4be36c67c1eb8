"""Query the findings store: clusters, alerts, dead letters, and analyst search.

Every command takes ``--store URL`` (``es://HOST:9200``, ``https://HOST:9200``)
to read Elasticsearch instead of the embedded SQLite file in ``--data-dir``."""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from streams.cli.app import app
from streams.cli.common import (
    Config, DataDir, FirstLines, FormatOpt, JsonAlias, check_format, check_store_option, err, fail, note_empty,
    json_text, print_json, settings_from, shown,
)
from streams.cluster_search import (
    RELEVANCE_UNPAGED, SORT_KEYS, SORT_ORDER, ClusterQuery, SearchCursor, SearchTimeout, nameless_filter, text_terms,
    through_day,
)
from streams.findings import (
    MAX_RESULTS, VERDICTS, ClusterRecord, DeliveryRecord, FindingsStore, Page, StoreURLError, open_findings,
    sqlite_file,
)

R = TypeVar("R")

# what `deepwatch search --sort` takes: the desk's and the API's sorts
SEARCH_SORTS = (*SORT_KEYS, "relevance")
# what each --sort orders by, as ``SORT_ORDER`` says it
_SORT_HELP = ("Highest first by " + "; ".join(
    f"{sort}: {', '.join(SORT_ORDER[sort])}"
    for sort in SORT_KEYS) + "; then by cluster id")

StoreOpt = typer.Option(
    None, "--store", callback=check_store_option,
    help="Findings store: es://HOST:9200 or https://HOST:9200 for Elasticsearch (credentials from "
         "DEEPWATCH_ES_API_KEY or DEEPWATCH_ES_USERNAME/PASSWORD, CA bundle from findings.ca_certs). "
         "Default: the embedded SQLite file in --data-dir (env DEEPWATCH_FINDINGS__URL).")


def _store(data_dir: Optional[Path], config: Optional[Path], store_url: Optional[str] = None) -> FindingsStore:
    """The findings store to read. Opening a SQLite file creates it (and its
    directories), so a mistyped path is refused here rather than answered
    with an empty store."""
    settings = settings_from(config, data_dir=data_dir)
    url = store_url or settings.findings.url or ""
    try:
        path = sqlite_file(url, settings.data_dir)
    except StoreURLError as e:
        raise typer.BadParameter(str(e), param_hint="--store") from None
    if path is not None and not path.exists():
        if not url.strip().startswith("sqlite://"):
            raise typer.BadParameter(f"no findings at {path}; run `deepwatch replay` or `deepwatch demo` first",
                                     param_hint="--data-dir")
        where = "--store" if store_url else "findings.url"
        fix = "" if store_url else " (DEEPWATCH_FINDINGS__URL or the settings file)"
        raise typer.BadParameter(f"no findings at {path}; check the path{fix}", param_hint=where)
    try:
        return open_findings(url, settings.data_dir, settings)
    except StoreURLError as e:
        raise typer.BadParameter(str(e), param_hint="--store") from None


@contextmanager
def _findings(data_dir: Optional[Path], config: Optional[Path], store_url: Optional[str]) -> Iterator[FindingsStore]:
    """The store, closed afterwards; a store that cannot answer becomes one line, not a traceback."""
    from streams.es_client import EsError

    try:
        store = _store(data_dir, config, store_url)
        try:
            yield store
        finally:
            store.close()
    except EsError as e:
        fail(str(e))


DEFAULT_LIMIT = 100
ALL_PAGE = 1000  # clusters a page of `search --all`: what it holds in memory at once


def _limit_opt(what: str) -> typer.Option:
    # bounded as `search` is: a huge N was an OverflowError traceback from SQLite
    return typer.Option(None, "--limit", min=0, max=10_000, show_default=False,
                        help=f"Show the newest N {what}, listed oldest first; 0: all of them. Default: the newest "
                             f"{DEFAULT_LIMIT} in a table, all of them in JSON (what tools read stays complete). "
                             "A note on stderr says when there were more.")


def _limit_for(limit: Optional[int], fmt: str) -> int:
    return limit if limit is not None else (0 if fmt == "json" else DEFAULT_LIMIT)


def _note_cut(rows: Page, what: str) -> None:
    """One line on stderr when --limit left rows out (stdout, table or JSON array, stays as it was)."""
    if rows.cut:
        err.print(f"showing the newest {len(rows):,} of {rows.total:,} {what}; --limit N for more, --limit 0 for all",
                  highlight=False, soft_wrap=True)


def _emit(rows: list[R], fmt: str, title: str, columns: tuple[str, ...], cells: Callable[[R], tuple],
          as_json: Callable[[R], object]) -> None:
    """JSON (the contract for tools, each row by ``as_json``) or a table (for
    people, each row by ``cells``)."""
    if fmt == "json":
        print_json([as_json(r) for r in rows])
        return
    # the clusters table's compact style (no outer edge or column rules): the boxed one spent 17 of 80
    # columns on rules, and the time and cluster id of every alert wrapped ("2026-11-20T1 / 0:02:00Z")
    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
              padding=(0, 0))
    for col in columns:
        t.add_column(col, overflow="fold")  # wrap long evidence and ids; never cut them off
    for row in rows:
        t.add_row(*(shown(c) for c in cells(row)))  # the store's text is the posters' and the images'
    Console().print(t)
    if not rows:
        note_empty(f"no {title.lower()}")


# A table row shows the start of the strongest evidence (a pixel model's
# explanation runs to a paragraph): at most EVIDENCE_LINES lines at the width
# the column gets, and at most EVIDENCE_SHOWN characters on a wide terminal.
# JSON carries all of it. Three lines: beside a 16-character id an 80-column
# terminal leaves evidence about 19 columns, and three of them hold a typical
# metadata finding ("AUTOMATIC1111-style metadata in a PNG tEXt chunk") whole.
EVIDENCE_SHOWN = 160
EVIDENCE_LINES = 3
EVIDENCE_MIN_WIDTH = 8
# After the verdict of a cluster whose learned models' result has not come
# back yet (``models_pending``): its score and verdict may still change.
PENDING_MARK = "*"
PENDING_CAPTION = f"{PENDING_MARK} waiting for a model result (`deepwatch worker --role detect` runs the models)"
# the same, broken before the command where the table is narrower than the one line
PENDING_CAPTION_LINES = (f"{PENDING_MARK} waiting for a model result; a detect worker runs the models:",
                         "  `deepwatch worker --role detect`")


class _PendingCaption:
    """``PENDING_CAPTION`` on one line where the table is wide enough, else
    on two, the command whole on the second (wrapped where it fell, the
    command was cut in two: ``deepwatch worker`` / ``--role detect``)."""

    def __rich_console__(self, console, options):
        one = len(PENDING_CAPTION) <= options.max_width
        yield Text(PENDING_CAPTION if one else "\n".join(PENDING_CAPTION_LINES), justify="left")

    def __str__(self) -> str:
        return PENDING_CAPTION


def count_cell(n: int) -> str:
    """A count in at most 4 characters: exact below 10,000, then 12k, 999k,
    1.2M, 25M (rounded down; JSON has the exact number). A viral picture's
    six-digit counts took the evidence column's last readable width."""
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n // 1000}k"
    if n < 10_000_000:
        return f"{n // 100_000 / 10:.1f}M"
    return f"{n // 1_000_000}M"


def cluster_table(clusters: list[ClusterRecord], title: str = "Image clusters") -> Table:
    # Fits 80 columns: no outer edge or column rules (the header rule stays),
    # one space between columns, numbers with short headers, and evidence
    # last, the one column that wraps, so it takes what is left (at least
    # EVIDENCE_MIN_WIDTH) instead of a column being cropped off the right
    # edge, where the alert level was lost; counts take at most 4 columns
    # (``count_cell``), so beside 16-character ids an 80-column terminal
    # leaves evidence at least 19.
    t = Table(title=shown(title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
              padding=(0, 0))
    for col, kw in (("cluster", {"no_wrap": True}), ("fake", {"justify": "right", "no_wrap": True}),
                    ("verdict", {"no_wrap": True}), ("alert", {"no_wrap": True}),
                    ("seen", {"justify": "right", "no_wrap": True}), ("accts", {"justify": "right", "no_wrap": True}),
                    ("5m", {"justify": "right", "no_wrap": True}), ("imgs", {"justify": "right", "no_wrap": True}),
                    ("evidence", {"min_width": EVIDENCE_MIN_WIDTH, "overflow": "fold"})):
        t.add_column(col, **kw)
    pending = False
    for c in clusters:
        color = {"likely-ai": "red", "inconclusive": "yellow"}.get(c.verdict, "green")
        ev = c.evidence[0].detail if c.evidence else "—"
        if len(ev) > EVIDENCE_SHOWN:
            ev = ev[: EVIDENCE_SHOWN - 1] + "…"
        alert = (Text("supp.") if c.suppressed else
                 Text(f"L{c.alert_level}", style="bold red") if c.alert_level else Text(""))
        verdict = Text(c.verdict, style=color)
        if c.models_pending:
            pending = True
            verdict.append(PENDING_MARK, style="bold")
        t.add_row(
            shown(c.id), Text(f"{c.fake_score:.2f}", style=color), verdict, alert,
            count_cell(c.sightings), count_cell(c.accounts), count_cell(c.velocity.sightings_5m),
            count_cell(len(c.members)), FirstLines(shown(ev), EVIDENCE_LINES),
        )
    if pending:
        t.caption = _PendingCaption()  # type: ignore[assignment]  # any renderable does
        t.caption_justify = "left"
    return t


@app.command(rich_help_panel="Findings")
def clusters(
    data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
    store_url: Optional[str] = StoreOpt,
    include_merged: bool = typer.Option(False, help="Also list clusters that were merged into another (they carry merged_into)."),
    limit: Optional[int] = typer.Option(None, min=1, max=10_000, help="At most this many clusters, highest fake score first (1-10000)."),
    members: Optional[int] = typer.Option(None, "--members", min=0, help="JSON: at most this many members a cluster, the first joined first (members_total has the count; default: every member; a viral picture's reposts are thousands of files)."),
    as_json: bool = JsonAlias,
) -> None:
    """List image clusters: fake score, verdict, evidence, spread and member images.

    A viral picture's members are thousands of files: --members N lists the
    first N of each cluster's, and members_total says how many it has.

    JSON form: an array of objects with id, fake_score, verdict, evidence
    (detector, score, detail), sightings, accounts, first_seen, last_seen and
    members (sha256, phash, pdq, event_id), plus velocity, engagement,
    platforms, merged_from, merged_into, models_pending, suppressed,
    alert_level, stream_sightings, revision, updated_at and members_total.
    """
    fmt = "json" if as_json else check_format(fmt)
    with _findings(data_dir, config, store_url) as store:
        # one more than asked: whether --limit left clusters out
        rows = store.clusters(include_merged=include_merged, limit=limit + 1 if limit else None)
    if limit and len(rows) > limit:
        rows = rows[:limit]
        err.print(f"showing the first {limit:,} clusters by fake score; there are more: --limit N for more, "
                  "or leave it out for all", highlight=False, soft_wrap=True)
    if fmt == "json":
        docs = [r.as_json() for r in rows]
        if members is not None:
            for d in docs:
                d["members"] = d["members"][:members]
        print_json(docs)
    else:
        Console().print(cluster_table(rows))
        if not rows:
            note_empty("no clusters yet")


def _when(value: Optional[str], flag: str, end_of_day: bool = False) -> Optional[datetime]:
    """An ISO time (naive = UTC, as the desk reads times), or one as the desk
    and these tables print it (``2026-11-20 10:04:15 UTC``). A date alone is
    that day's start, or with ``end_of_day`` (``--until``) its last instant
    (``through_day``)."""
    if value is None:
        return None
    plain = re.sub(r"(?<=\d)\s*UTC$", "", value.strip(), flags=re.IGNORECASE)
    try:
        ts = datetime.fromisoformat((through_day(plain) if end_of_day else plain).replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 time; use e.g. 2026-11-20T10:00:00Z or 2026-11-20",
                                 param_hint=flag) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


@app.command(rich_help_panel="Findings")
def search(
    query: Optional[str] = typer.Argument(None, metavar="QUERY", help="Full text over post texts and hashtags: words are ANDed, \"quoted phrases\" kept together (at most 1000 characters)."),
    data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
    store_url: Optional[str] = StoreOpt,
    since: Optional[str] = typer.Option(None, help="Only clusters with a sighting posted at or after this ISO time (naive = UTC; as the desk prints times too: 2026-11-20 10:04:15 UTC)."),
    until: Optional[str] = typer.Option(None, help="Only clusters with a sighting posted at or before this ISO time (a date alone: the end of that day; as the desk prints times too)."),
    platform: Optional[str] = typer.Option(None, help="Only clusters seen on this platform."),
    account: Optional[str] = typer.Option(None, help="Only clusters posted by this account (id or @handle)."),
    hashtag: Optional[str] = typer.Option(None, help="Only clusters posted with this hashtag (with or without #)."),
    verdict: Optional[str] = typer.Option(None, help="likely-ai, inconclusive or no-evidence."),
    min_score: Optional[float] = typer.Option(None, help="Only clusters with a fused fake score at least this (0-1)."),
    sort: Optional[str] = typer.Option(None, help=f"{', '.join(SEARCH_SORTS[:-1])} or {SEARCH_SORTS[-1]} (default: relevance "
                                       f"with QUERY, else velocity). {_SORT_HELP}; relevance: the best-matching "
                                       "sighting first, one page (as the desk's search)."),
    limit: Optional[int] = typer.Option(None, help="At most this many clusters (default: every match, up to 10000)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", show_default=False,
                                            help="Stop the search after this many seconds (default: no limit; the desk uses findings.search_timeout_s)."),
    cursor: Optional[str] = typer.Option(None, "--cursor", help="Start after this place: the cursor a search printed on stderr (next page: --cursor ...)."),
    every: bool = typer.Option(False, "--all", help=f"Every match, page by page (--limit clusters a page, default {ALL_PAGE}), as JSON lines: one cluster object a line, whatever --format."),
    as_json: bool = JsonAlias,
) -> None:
    """Search clusters by text, hashtag, account, platform, time, verdict and score.

    The sighting conditions (QUERY, --since/--until, --platform, --account,
    --hashtag) must all hold for one sighting of the cluster. JSON form: an
    array of cluster objects, exactly as `deepwatch clusters --format json`
    prints them, best first. Same answers on SQLite (FTS5) and Elasticsearch.
    When more follow, stderr ends with the next page's `--cursor`; --all
    reads them all.
    """
    fmt = "json" if as_json else check_format(fmt)
    if verdict is not None and verdict not in VERDICTS:
        raise typer.BadParameter(f"must be one of {', '.join(VERDICTS[:-1])} or {VERDICTS[-1]}", param_hint="--verdict")
    if sort is not None and sort not in SEARCH_SORTS:
        raise typer.BadParameter(f"must be one of {', '.join(SEARCH_SORTS)}", param_hint="--sort")
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise typer.BadParameter("must be between 0 and 1", param_hint="--min-score")
    if limit is not None and not 1 <= limit <= 10_000:
        raise typer.BadParameter("must be between 1 and 10000", param_hint="--limit")
    if timeout is not None and not 0 < timeout <= 3600:
        raise typer.BadParameter("must be more than 0 and at most 3600 seconds", param_hint="--timeout")
    if query is not None and query.strip() and not text_terms(query):
        # the search drops quotes and brackets: '"' matched every cluster
        raise typer.BadParameter(f"{query!r} has no word to search for; give words, e.g. 'flooded subway', "
                                 "or leave QUERY out", param_hint="QUERY")
    start, end = _when(since, "--since"), _when(until, "--until", end_of_day=True)
    if start is not None and end is not None and start > end:  # answered nothing, as if no cluster matched
        raise typer.BadParameter(f"--since {since} is after --until {until}; swap them", param_hint="--since")
    try:
        q = ClusterQuery(text=query, since=start, until=end, platform=platform,
                         account=account, hashtag=hashtag, verdict=verdict, min_score=min_score, sort=sort)
    except ValidationError as e:  # a QUERY over 1000 characters ended on a pydantic traceback
        first = e.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else ""
        hint = "QUERY" if field == "text" else f"--{field.replace('_', '-')}" if field else "QUERY"
        got = f" (got {len(first['input']):,} characters)" if isinstance(first.get("input"), str) else ""
        raise typer.BadParameter(f"{first['msg'][0].lower()}{first['msg'][1:]}{got}", param_hint=hint) from None
    nameless = nameless_filter(q, account, hashtag)
    if nameless is not None:  # "#" alone was no condition: every cluster, or another filter's answer alone
        name, sent, why = nameless
        raise typer.BadParameter(f"{sent!r} {why}", param_hint=f"--{name}")
    if every and q.effective_sort == "relevance":
        fail(f"--all: {RELEVANCE_UNPAGED}, e.g. --sort last_seen")
    try:
        after = SearchCursor.decode(cursor, q) if cursor is not None else None
    except ValueError as e:
        fail(f"--cursor: {e}; give the one a search with the same QUERY, conditions and --sort printed")
    with _findings(data_dir, config, store_url) as store:
        if every:
            _search_all(store, q, limit or ALL_PAGE, after, timeout)
            return
        rows, more, nxt = _search_page(store, q, limit, after, timeout)
    if more:
        where = "the first " if after is None else ""
        then = "the next page" if nxt is not None else "--sort velocity, score, last_seen or sightings to page"
        if limit is not None and limit < MAX_RESULTS:
            err.print(f"showing {where}{limit:,} matches; there are more: --limit N for more, or {then}",
                      highlight=False, soft_wrap=True)
        else:
            err.print(f"showing {where}{MAX_RESULTS:,} matches, the most one search returns; there may be more: "
                      f"{then}", highlight=False, soft_wrap=True)
    if fmt == "json":
        print_json([r.as_json() for r in rows])
    else:
        Console().print(cluster_table(rows, title=f"Search: {query}" if query else "Search"))
        if not rows:  # the empty table alone read like a display fault
            note_empty("no clusters match this search")
    if nxt is not None:  # last, where a script reads it: the page's rows stay the whole of stdout
        err.print(f"next page: --cursor {nxt}", markup=False, highlight=False, soft_wrap=True)


def _search_page(store: FindingsStore, q: ClusterQuery, limit: int | None, after: SearchCursor | None,
                 timeout: float | None) -> tuple[list[ClusterRecord], bool, str | None]:
    """Up to ``limit`` clusters after ``after`` (None: from the top), whether
    more follow, and the next page's cursor (None: no more, or a relevance
    ranking, which is not paged). One more than ``limit`` is asked for, so a
    page holding exactly the rest offers no next; a page of the store's
    ``MAX_RESULTS`` (no ``limit``) offers one when full."""
    ask = limit + 1 if limit is not None and limit < MAX_RESULTS else limit
    try:
        # no limit unless asked: it holds no desk worker thread
        rows = store.search(q.model_copy(update={"limit": ask}), timeout_s=timeout, after=after)
    except SearchTimeout:
        fail(f"search took longer than {timeout:g} s and was stopped; narrow it with --since/--until/--platform "
             "(or --account, --hashtag), or give --timeout more")
    shown = min(len(rows), limit or MAX_RESULTS)
    more = len(rows) > shown or len(rows) >= MAX_RESULTS
    nxt = rows.cursor(shown - 1) if more else None
    return rows[:shown], more, nxt


def _search_all(store: FindingsStore, q: ClusterQuery, page: int, after: SearchCursor | None,
                timeout: float | None) -> None:
    """Every match from ``after`` on as JSON lines, ``page`` clusters at a
    time (``--timeout`` is each page's): only one page is held. Past the
    first page, how many so far goes to stderr."""
    done = 0
    while True:
        rows, _more, nxt = _search_page(store, q, page, after, timeout)
        for r in rows:
            sys.stdout.write(json_text(r.as_json(), indent=None) + "\n")
        sys.stdout.flush()
        done += len(rows)
        if nxt is None:
            return
        err.print(f"{done:,} clusters so far", highlight=False)
        after = SearchCursor.decode(nxt, q)


@app.command(rich_help_panel="Findings")
def alerts(data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
           store_url: Optional[str] = StoreOpt, as_json: bool = JsonAlias,
           limit: Optional[int] = _limit_opt("alerts")) -> None:
    """List alerts raised when a likely fake spread fast (one per cluster, plus escalations).

    A table shows the newest 100 by default, JSON all of them (--limit),
    oldest first. JSON form: an array of objects with alert_id, cluster_id,
    rule, level, fake_score, verdict, velocity, sightings, accounts,
    evidence, at (event time), created_at and deliveries (per webhook
    target: status, at, and the status in its parts, state - queued,
    delivered, failed or rejected - and detail; a failed delivery is
    retried every alerts.webhook_redeliver_s).
    """
    fmt = "json" if as_json else check_format(fmt)
    limit = _limit_for(limit, fmt)
    with _findings(data_dir, config, store_url) as store:
        found = store.alerts(limit=limit)
        status = store.delivery_status([a.alert_id for a in found] if limit else None)
        rows = [dict(a.as_json(), deliveries=[_delivery_json(d) for d in status.get(a.alert_id, [])]) for a in found]
    _note_cut(found, "alerts")

    def delivery(a: dict) -> str:
        # the target names the hook (`deepwatch redeliver TARGET`): several hooks may share a receiver's host
        return "; ".join(f"{d['target']}: {d['status'][:60]}" for d in a["deliveries"]) or "—"

    _emit(rows, fmt, "Alerts",
          ("time (UTC)", "cluster", "level", "fake", "5m", "accts", "rule", "webhook"),
          lambda a: (_table_time(a["at"]), a["cluster_id"], str(a["level"]), f"{a['fake_score']:.2f}",
                     str(a["velocity"]["sightings_5m"]), str(a["accounts"]), a["rule"], delivery(a)),
          as_json=lambda a: a)


def _delivery_json(d: DeliveryRecord) -> dict:
    """A delivery as `deepwatch alerts` shows it: an Elasticsearch document
    from before targets were keyed still names its target by the whole
    webhook URL (a token in it, often), shown as that URL's key
    (``target_key``: the name `deepwatch redeliver` takes)."""
    from streams.webhooks import target_key

    return dict(d.as_json(), target=target_key(d.target))


def _table_time(at: str) -> str:
    """An alert's time in a table: a space between date and time, where a
    narrow column breaks it ("2026-11-20T1" / "0:02:00Z" was cut mid-hour),
    to the second (a desk verdict's alert, stamped by the clock, showed its
    microseconds beside the stream's whole seconds)."""
    text = str(at)
    if text.endswith("Z"):
        text = text[:-1]
    elif text.endswith("+00:00"):
        text = text[:-6]
    return re.sub(r"(:\d\d)\.\d+$", r"\1", text).replace("T", " ", 1)


@app.command("dead-letters", rich_help_panel="Findings")
def dead_letters(data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
                 store_url: Optional[str] = StoreOpt, as_json: bool = JsonAlias,
                 limit: Optional[int] = _limit_opt("dead letters")) -> None:
    """List events that could not be processed, with the stage and reason.

    A table shows the newest 100 by default, JSON all of them (--limit),
    oldest first. JSON form: an array of objects with event_id (when the
    event had one), stage, reason, detail, source (topic, partition, offset)
    and at.
    """
    fmt = "json" if as_json else check_format(fmt)
    limit = _limit_for(limit, fmt)
    with _findings(data_dir, config, store_url) as store:
        rows = store.dead_letters(limit=limit)
    _note_cut(rows, "dead letters")
    _emit(rows, fmt, "Dead letters",
          ("event", "stage", "reason", "detail"),
          lambda d: (d.event_id or "—", d.stage, d.reason, d.detail), as_json=lambda d: d.as_json())
