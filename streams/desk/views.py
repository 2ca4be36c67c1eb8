"""Small read helpers and Jinja filters for the desk pages."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

from detectors.signals import CopyKind, describe_via

from streams.desk.source import FindingsSource
from streams.findings import account_page_path
from streams.plurals import counted
from streams.settings import Settings

# The cluster view the set was made from, held (not its id(): a freed view's
# id is reused by the next one, which would then be answered from the old set).
_member_cache: tuple[dict[str, Any] | None, set[str]] = (None, set())


def member_shas(source: FindingsSource) -> set[str]:
    """Pictures the desk may show: members of stored clusters."""
    global _member_cache
    docs = source._all()
    if _member_cache[0] is not docs:
        _member_cache = (docs, {m["sha256"] for d in docs.values() for m in d["members"]})
    return _member_cache[1]


def _banks_db(settings: Settings) -> sqlite3.Connection | None:
    path = settings.banks_path
    if not path.exists():
        return None
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)


def banks(settings: Settings) -> list[dict[str, Any]]:
    db = _banks_db(settings)
    if db is None:
        return []
    try:
        rows = db.execute("SELECT b.name, b.verdict, COUNT(e.rowid) FROM banks b LEFT JOIN entries e ON e.bank = b.name "
                          "GROUP BY b.name ORDER BY b.name").fetchall()
        return [{"name": n, "verdict": v, "entries": c} for n, v, c in rows]
    finally:
        db.close()


# Entries a page lists at once (the banks page's desk-verdict entries, a cluster's bank matches).
ENTRIES_PAGE = 500
_DESK_BANKS = "e.bank IN ('desk-fake', 'desk-authentic')"


def _entries(settings: Settings, where: str, args: list[Any], limit: int = ENTRIES_PAGE) -> list[dict[str, Any]]:
    """Up to ``limit`` entries matching ``where``, newest first, each with its ``rowid`` (where a page ends)."""
    db = _banks_db(settings)
    if db is None:
        return []
    try:
        rows = db.execute(f"SELECT e.rowid, e.bank, b.verdict, e.entry_id, e.label, e.sha256 FROM entries e "
                          f"JOIN banks b ON b.name = e.bank WHERE {where} ORDER BY e.rowid DESC LIMIT ?",
                          [*args, limit]).fetchall()
        return [dict(zip(("rowid", "bank", "verdict", "entry_id", "label", "sha256"), r)) for r in rows]
    finally:
        db.close()


def bank_entries_for(settings: Settings, shas: list[str]) -> list[dict[str, Any]]:
    """The newest ``ENTRIES_PAGE`` bank entries of the pictures ``shas`` (a
    cluster's members). One parameter, a JSON array, whatever their number: a
    viral cluster's thousands of files, one ``?`` each, passed SQLite's bound
    on a statement's parameters (32,766 by default, 999 before 3.32)."""
    if not shas:
        return []
    return _entries(settings, "e.sha256 IN (SELECT value FROM json_each(?))", [json.dumps(list(shas))])


def desk_entries(settings: Settings, before: int | None = None,
                 limit: int = ENTRIES_PAGE) -> tuple[list[dict[str, Any]], int, int | None]:
    """The entries desk verdicts added, newest first: up to ``limit`` of
    those older than the entry of rowid ``before`` (None: from the newest),
    how many there are in all, and the rowid the next page starts before
    (None: this page holds the last). The page listed the newest 500 and
    said neither how many there were nor that it stopped there."""
    where, args = _DESK_BANKS, []
    if before is not None:
        where, args = f"{_DESK_BANKS} AND e.rowid < ?", [before]
    rows = _entries(settings, where, args, limit + 1)  # one more: whether another page follows
    db = _banks_db(settings)
    total = 0
    if db is not None:
        try:
            total = db.execute(f"SELECT COUNT(*) FROM entries e WHERE {_DESK_BANKS}").fetchone()[0]
        finally:
            db.close()
    return rows[:limit], total, rows[limit - 1]["rowid"] if len(rows) > limit else None


def sparkline(counts: list[int], width: int = 120, height: int = 24) -> Markup:
    """Inline SVG of the cluster's spread: cumulative sightings over its
    lifetime (a steep rise is a burst; per-bucket counts of a few sightings
    would only zigzag)."""
    if not counts:
        return Markup("")
    total = 0
    cumulative = []
    for c in counts:
        total += c
        cumulative.append(total)
    counts = cumulative
    top = max(counts) or 1
    step = width / max(len(counts) - 1, 1)
    pts = " ".join(f"{i * step:.1f},{height - 2 - (c / top) * (height - 4):.1f}" for i, c in enumerate(counts))
    return Markup(
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="spread: {counted(counts[-1], "sighting")}"><polyline fill="none" stroke="currentColor" '
        f'stroke-width="1.5" points="{pts}"/></svg>'
    )


LEGEND_TEXT = "#1d1d1f"  # desk.css --fg: 16:1 on the page's #fafafa
PLATFORM_COLORS = ["#d9480f", "#1c7ed6", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#5c940d", "#c2255c"]


def spread_chart(spread: dict[str, Any], width: int = 640, height: int = 160) -> Markup:
    """Multi-line SVG: cumulative sightings over time, one line per platform."""
    series = {}
    for platform, counts in (spread.get("platforms") or {}).items():
        total, cum = 0, []
        for c in counts:
            total += c
            cum.append(total)
        series[platform] = cum
    if not series:
        return Markup('<p class="muted">no sightings</p>')
    top = max(max(v) for v in series.values()) or 1
    n = spread["buckets"]
    step = (width - 20) / max(n - 1, 1)
    parts = [f'<svg class="chart" width="{width}" height="{height + 20}" viewBox="0 0 {width} {height + 20}" role="img" '
             # role="img" hides the legend from a screen reader: the label carries its totals
             f'aria-label="spread over time by platform: '
             f'{_esc(", ".join(f"{k} {v[-1]}" for k, v in sorted(series.items())))} sightings">',
             f'<line x1="10" y1="{height}" x2="{width - 10}" y2="{height}" stroke="#999"/>']
    legend_x = 10
    for i, (platform, counts) in enumerate(sorted(series.items())):
        color = PLATFORM_COLORS[i % len(PLATFORM_COLORS)]
        pts = " ".join(f"{10 + j * step:.1f},{height - (c / top) * (height - 10):.1f}" for j, c in enumerate(counts))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"><title>{_esc(platform)}</title></polyline>')
        # The legend's words in the page's text colour beside a swatch of the
        # line's: as text on the page the lighter line colours fell short of
        # 4.5:1 (#e67700 was 2.9:1).
        parts.append(f'<rect x="{legend_x}" y="{height + 6}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{height + 15}" fill="{LEGEND_TEXT}" font-size="12">'
                     f'{_esc(platform)} ({counts[-1]})</text>')
        legend_x += 26 + 8 * (len(platform) + 5)
    parts.append("</svg>")
    return Markup("".join(parts))


def _esc(s: str) -> str:
    return str(Markup.escape(s))


def when(value: Any) -> str:
    """A time as the desk shows every time: in UTC, and saying so. Posts keep
    the offset they were posted with, so two rows showed 20:00 and 12:00 for
    one and the same moment; a time without an offset is UTC."""
    if not value:
        return "—"
    try:
        d = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if d.tzinfo is not None:
        d = d.astimezone(timezone.utc)
    return d.strftime("%Y-%m-%d %H:%M:%S UTC")


def band(doc: dict[str, Any]) -> str:
    desk = (doc.get("desk") or {}).get("verdict")
    if desk:
        return desk
    return doc["verdict"]


def segment(value: object) -> str:
    """An id as one path segment of a link, '/' escaped too: Jinja's
    ``urlencode`` keeps it, and an account named "../../logout" linked to
    /logout."""
    return quote(str(value), safe="")


def account_href(account_id: object) -> str:
    """The link to an account's page (``streams.findings.account_page_path``:
    ``?id=`` for an id a browser would resolve away, "." or "..")."""
    return account_page_path(str(account_id))


def isolated(values: Any, sep: str = ", ") -> Markup:
    """Names from posts (platforms) joined, each in a ``<bdi>``: a name
    carrying a bidi control (U+202E, "right-to-left override") reversed
    everything after it to the end of its paragraph, the counts and times
    beside it included ("3 posts" read "stsop 3")."""
    return Markup(sep).join(Markup("<bdi>%s</bdi>") % v for v in values or ())


def web_link(url: object) -> bool:
    """Whether a post's URL may be a link on the page: http(s) only (a
    ``javascript:`` URL is script), the scheme in any case (``HTTPS://`` is
    as good a link; it was hidden)."""
    return isinstance(url, str) and url[:8].lower().startswith(("https://", "http://"))


# How a lookup's match reads on the page, per ``via`` of
# ``detectors.neardup.pairing.Via``: "sha256 d=0" and "phash_view d=7" told a
# journalist nothing about how close the copy is. The kind of copy, and a hash
# match's label and width, come from the via's description
# (``detectors.signals.describe_via``), as bank evidence's do.
_KIND_WORDS = {CopyKind.NEAR: "a near copy", CopyKind.MIRRORED: "a mirrored copy",
               CopyKind.VIEW: "a crop or framed copy"}


def match_words(via: object, distance: object) -> str:
    """A match in words: what kind of copy it is and how close (``distance``
    in the unit of its ``via``: bits of its signal type's hash, or grey levels
    for "uniform"). A via nothing registered reads (a newer writer's) is named
    as it stands, not passed off as some hash's bits."""
    d = describe_via(str(via))
    match d.kind:
        case CopyKind.SAME_FILE:
            return "the same file (identical bytes)"
        case CopyKind.ONE_COLOUR:
            return f"a one-colour picture, {distance} grey levels apart"
        case CopyKind.UNKNOWN:
            return f"a match by {via}, distance {distance}"
    return f"{_KIND_WORDS[d.kind]}: {distance} of {d.bits} {d.label} bits differ"


def number(value: object) -> str:
    """A figure as people read it: at most two decimals, no trailing zeros
    (an evidence weight showed as 1.902209672327087)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    return f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def status_phrase(status: object) -> str:
    """An HTTP status's reason ("Not Found"), for the error page's heading: a
    bare "404" told a reader nothing."""
    try:
        return HTTPStatus(int(str(status))).phrase
    except ValueError:
        return ""


def register_filters(env) -> None:
    env.tests["web_link"] = web_link
    env.filters["isolated"] = isolated
    env.filters["segment"] = segment
    env.filters["account_href"] = account_href
    env.filters["sparkline"] = sparkline
    env.filters["spread_chart"] = spread_chart
    env.filters["when"] = when
    env.filters["match_words"] = match_words
    env.filters["number"] = number
    env.filters["status_phrase"] = status_phrase
    env.filters["counted"] = counted  # "1 sighting", "2,000 sightings" (``streams.plurals``)
    env.globals["band"] = band
