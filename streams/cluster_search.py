"""Analyst search over clusters, as both findings stores answer it
(``FindingsStore.search``): the query (``ClusterQuery``), the cluster
orders (``SORT_ORDER``, one definition every reader renders), keyset paging
(``SearchCursor``, ``SearchPage``), a search's time limit (``Deadline``) and
how text and hashtags are broken into what both stores match
(``text_terms``, ``normalize_hashtag``)."""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from datetime import date, datetime, timezone
from datetime import time as dtime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from detectors.fusion import Verdict
from streams.cursors import NOT_A_CURSOR, decode_cursor, encode_cursor
from streams.findings import MAX_RESULTS, SCORE_DECIMALS

if TYPE_CHECKING:
    from streams.findings import ClusterRecord

# The orders clusters are listed in (``SORT_ORDER``): `deepwatch search --sort`, the desk's queue and search.
SortKey = Literal["velocity", "score", "last_seen", "sightings"]
# A search's: those, or relevance (the best-matching sighting first, then velocity).
SearchSort = Literal[SortKey, "relevance"]


SORT_KEYS: tuple[str, ...] = get_args(SortKey)


class SearchTimeout(Exception):
    """A search ran longer than its time limit (``timeout_s``) and was
    stopped: no partial answer is given."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        super().__init__(f"search took longer than {timeout_s:g} s")


class Deadline:
    """A time limit over several reads of one search: ``left()`` is the time
    remaining, and raises ``SearchTimeout`` once there is none."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise SearchTimeout(self.timeout_s)
        return left

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def through_day(value: str) -> str:
    """An ``until`` as given, or for a date alone the last millisecond of
    that day (UTC): ``until 2026-11-20`` means through that day, where a date
    read as its midnight left out the very day named (``deepwatch search``,
    the desk). Milliseconds, the precision both stores compare times at:
    SQLite's ``julianday`` rounded the day's last microsecond up to the next
    midnight, so posts at 00:00 of the next day matched."""
    try:
        day = date.fromisoformat(value.strip())
    except ValueError:
        return value
    return datetime.combine(day, dtime(23, 59, 59, 999_000), timezone.utc).isoformat(timespec="milliseconds")


class ClusterQuery(BaseModel):
    """An analyst's search over clusters (``deepwatch search``, the desk).

    Sighting-level conditions (``text``, ``since``/``until``, ``platform``,
    ``account``, ``hashtag``) must all hold for one and the same sighting of
    the cluster (or of a cluster merged into it); cluster-level conditions
    (``verdict``, ``min_score``) hold for the surviving cluster. ``text`` is
    full text over post texts and hashtags: words are ANDed, ``"quoted
    phrases"`` kept together. Ranking: ``sort`` if given, else relevance when
    ``text`` is given, else velocity; ties by cluster id. Merged-away clusters
    are never returned (their survivor is). ``cluster_ids`` keeps only those
    surviving clusters: a condition the caller holds and the store does not
    (the desk's verdicts), applied by the store before its result window."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    text: str | None = Field(default=None, max_length=1000)
    since: datetime | None = None
    until: datetime | None = None
    platform: str | None = None
    account: str | None = None  # account id or handle (a leading @ is ignored)
    hashtag: str | None = None  # with or without the leading '#', case-insensitive
    verdict: Verdict | None = None
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    sort: SearchSort | None = None
    limit: int | None = Field(default=None, ge=1, le=MAX_RESULTS)  # None = every match (up to MAX_RESULTS)
    cluster_ids: frozenset[str] | None = Field(default=None, max_length=MAX_RESULTS)

    @field_validator("text", "platform", "account", "hashtag", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return v.strip() or None if isinstance(v, str) else v

    # What normalises to nothing ("@", "#", text of punctuation only) is no
    # filter at all, rather than a condition that matches every cluster.
    @field_validator("text")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return v if v and text_terms(v) else None

    @field_validator("since", "until")
    @classmethod
    def _utc_milliseconds(cls, v: datetime | None) -> datetime | None:
        """The instant in UTC (naive = UTC, as both stores read it), to the
        millisecond: one instant is one query however it was written. The desk
        kept "10:00" naive where ``deepwatch search`` made it "10:00+00:00",
        and "11:00+01:00" stayed apart too: each a digest of its own, so a
        cursor of one was refused by the other (``search_digest``)."""
        if v is None:
            return None
        aware = v if v.tzinfo else v.replace(tzinfo=timezone.utc)
        try:
            v = aware.astimezone(timezone.utc)
        except OverflowError:  # past year 9999 or before year 1 in UTC: the bound every time is within
            v = (datetime.max if aware.year > 1 else datetime.min).replace(tzinfo=timezone.utc)
        # the precision both stores compare times at (``through_day``): on SQLite
        # 9999-12-31T23:59:59.999999 rounded up past year 9999 and matched nothing
        return v.replace(microsecond=v.microsecond // 1000 * 1000)

    @field_validator("platform")
    @classmethod
    def _platform(cls, v: str | None) -> str | None:
        # platforms are stored in lower case (``ImageEvent``): "Bluesky" is that platform, and one search
        return v.lower() if v else v

    @field_validator("account")
    @classmethod
    def _account(cls, v: str | None) -> str | None:
        # NFC: "Zoë" typed or pasted decomposed (e + U+0308) is the handle stored composed, as posts give it
        return unicodedata.normalize("NFC", v.lstrip("@").strip()) or None if v else None

    @field_validator("hashtag")
    @classmethod
    def _hashtag(cls, v: str | None) -> str | None:
        return normalize_hashtag(v) or None if v else None

    @property
    def max_results(self) -> int:
        return self.limit or MAX_RESULTS

    @property
    def effective_sort(self) -> str:
        """``sort``, else relevance with ``text``, else velocity. Relevance
        without words ranks by velocity alone (every match equally relevant):
        that order, paged as velocity is, where it was one unpaged answer."""
        if self.sort == "relevance" and not self.text:
            return "velocity"
        return self.sort or ("relevance" if self.text else "velocity")

    @property
    def sighting_filtered(self) -> bool:
        return any(v is not None for v in (self.text, self.since, self.until, self.platform, self.account, self.hashtag))

    @property
    def filtered(self) -> bool:
        """Whether any condition narrows the result (``sort`` and ``limit`` do not)."""
        return (self.sighting_filtered or self.verdict is not None or self.min_score is not None
                or self.cluster_ids is not None)


def nameless_filter(q: ClusterQuery, account: str | None, hashtag: str | None) -> tuple[str, str, str] | None:
    """The first name filter given with something in it (not blank) that
    ``q`` normalised to no condition ("@" or "#" alone) as (field, what was
    given, why it is refused), else None. Dropped, such a filter answered
    every cluster, and beside another filter the answer of that one alone,
    unsaid; the desk's API and ``deepwatch search`` refuse it with this why."""
    for name, sent, kept, what in (("account", account, q.account, "an account id or @handle"),
                                   ("hashtag", hashtag, q.hashtag, "a tag")):
        if sent and sent.strip() and kept is None:
            return name, sent, f"has no name in it: give {what}"
    return None


class SearchCursor(BaseModel):
    """A place in one search's order: the key the store ordered the last row
    shown by (``SearchPage.keys``: ascending, the cluster id left out) and
    that row's cluster id, which makes the order total, so pages never repeat
    or skip a row however many share a key. ``search`` keeps only the rows
    after it (keyset paging: rows added meanwhile move no page boundary).
    Carried by a client as an opaque token (``encode``/``decode``) naming the
    sort and a digest of the query's conditions: a token from another search
    is refused, not read as a place in this one.

    Sorted searches only: a relevance rank (BM25 on both stores) depends on
    every post indexed, so each post the stream adds moves every match's
    rank, and a page boundary kept as a rank skipped rows (measured: 17 of 44
    after one post added between pages)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sort: SortKey
    query: str = Field(min_length=1, max_length=64)  # ``search_digest`` of the query it was made for
    key: tuple[float, ...]
    cluster_id: str = Field(min_length=1, max_length=256)

    def encode(self) -> str:
        return encode_cursor([self.sort, self.query, *self.key, self.cluster_id])

    @classmethod
    def decode(cls, token: str, q: ClusterQuery) -> "SearchCursor":
        """``encode``'s token back if it was made for ``q``'s search; ValueError for anything else,
        a key no row could have included (a store would refuse it, or overflow reading it)."""
        sort = q.effective_sort
        if sort == "relevance":
            raise ValueError(RELEVANCE_UNPAGED)
        items = decode_cursor(token)
        if (len(items) != 3 + len(sort_order(sort)) or items[0] != sort or items[1] != search_digest(q)
                or not isinstance(items[-1], str) or any(isinstance(x, str) for x in items[2:-1])):
            raise ValueError(f"{NOT_A_CURSOR} for this search (its conditions and sort)")
        key = tuple(float(x) for x in items[2:-1])
        if not all(_key_in_range(name, k) for name, k in zip(sort_order(sort), key)):
            raise ValueError(NOT_A_CURSOR)
        try:
            return cls(sort=sort, query=items[1], key=key, cluster_id=items[-1])
        except ValueError:
            raise ValueError(NOT_A_CURSOR) from None

    def passed(self, key: tuple[Any, ...], cluster_id: str) -> bool:
        """Whether a row of this ``key`` and id comes after the cursor."""
        return (tuple(key), cluster_id) > (self.key, self.cluster_id)

    def bands(self) -> list[tuple[SortField, float | None, float | None]]:
        """Per field of a sorted search's order (``SORT_ORDER``), the stored
        values ``lo``..``hi`` of the rows that show the cursor's value: a
        row storing less shows less (it comes after), one storing more comes
        before, and within the band the next field decides. What the stores
        select the next page's candidates by (their stored values, which
        they pre-select by: ``streams.store``, ``streams.es_store``). A score
        shows rounded (``shown_score``); a time is read to the millisecond
        (Elasticsearch's precision; SQLite's ``julianday`` is finer). None
        for ``last_seen``: the cursor's row has none (``NEVER``). A stored
        value that differs from the one shown otherwise (a stream count that
        lost a sighting: ``stream_sightings``) places its row by the stored
        one at a page's start, as the pre-selection places it anyway."""
        out: list[tuple[SortField, float | None, float | None]] = []
        for name, k in zip(sort_order(self.sort), self.key):
            v = -k
            if name == "fake_score":
                # a stored score half a step under may round either way: the foot is a hair above it, so such a
                # row is always a candidate (its record, ordered exactly, is then kept only if it comes after)
                out.append((name, v - 0.999 * _HALF_STEP, v + _HALF_STEP))
            elif name == "last_seen":
                out.append((name, None, None) if v <= NEVER else (name, v - 0.0005, v + 0.0005))
            else:
                out.append((name, v, v))
        return out


_HALF_STEP = 0.5 * 10 ** -SCORE_DECIMALS
RELEVANCE_UNPAGED = ("a search ranked by relevance has no next page: each post the stream adds moves the ranks, so "
                     "pages would skip results; sort it (velocity, score, last_seen or sightings) to page through all")
_MAX_COUNT = 2**31 - 1  # the stores' integer fields
_YEARS_1_TO_9999 = (-62135596800.0, 253402300799.0)  # epoch seconds


def _key_in_range(name: str, k: float) -> bool:
    """Whether ``k`` (a key's value: the field's, negated) is one a row can have."""
    v = -k
    if name == "fake_score":
        return 0.0 <= v <= 1.0
    if name == "last_seen":
        return v == NEVER or _YEARS_1_TO_9999[0] <= v <= _YEARS_1_TO_9999[1]
    return 0 <= v <= _MAX_COUNT


def search_digest(q: ClusterQuery) -> str:
    """What a ``SearchCursor`` is bound to: ``q``'s conditions and sort.
    Neither ``limit`` (a page's size) nor ``cluster_ids`` (the desk's
    verdicts, which change between pages) moves a place in the order, nor
    how the text was written (its terms are what is searched)."""
    conditions = q.model_dump(mode="json", exclude={"limit", "cluster_ids", "sort"})
    # the words searched for, as both stores match them: "Harbour  Fire" is the search "harbour fire"
    conditions["text"] = text_terms(q.text) if q.text else None
    raw = json.dumps([q.effective_sort, conditions], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class SearchPage(list):
    """``search``'s rows, a plain list, plus each row's key in the store's
    order (``keys``, the same length): ``cursor(i)`` is where the page after
    row ``i`` starts."""

    def __init__(self, rows: Iterable["ClusterRecord"], keys: Iterable[tuple[float, ...]], query: ClusterQuery):
        super().__init__(rows)
        self.keys = [tuple(float(x) for x in k) for k in keys]
        self.sort = query.effective_sort
        self.digest = search_digest(query)

    def cursor(self, i: int = -1) -> str | None:
        """The token of the place after row ``i`` (the last by default);
        None for a relevance ranking (``SearchCursor``: not paged)."""
        if self.sort == "relevance":
            return None
        return SearchCursor(sort=self.sort, query=self.digest, key=self.keys[i], cluster_id=self[i].id).encode()


_TERM = re.compile(r'"([^"]+)"|(\S+)')


def text_terms(text: str) -> list[str]:
    """``text`` as search terms: each quoted phrase or bare word, broken into
    words where the stores' tokenizers break it and lowercased, one code point
    at a time. Combining marks stay in their word ("cafe" + U+0301, as some
    keyboards type "café"), and a letter whose lower case is longer keeps its
    case ("İ" lowercases to "i" + U+0307): either way the word was cut in two,
    and "İstanbul" and a decomposed "café" found nothing on either store.
    Composed first (NFC), as events store their text (``ImageEvent``)."""
    out: list[str] = []
    for phrase, word in _TERM.findall(unicodedata.normalize("NFC", text)):
        words = _words("".join(c if len(low := c.lower()) != 1 else low for c in phrase or word))
        if words:
            out.append(" ".join(words))
    return out


def _words(text: str) -> list[str]:
    """Runs of letters, digits, ``_`` and combining marks (what ``\\w`` finds, marks kept in) that hold a
    letter or digit."""
    out: list[str] = []
    start = None
    for i, ch in enumerate(text + " "):
        inside = ch.isalnum() or ch == "_" or unicodedata.category(ch)[0] == "M"
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            out.append(text[start:i])
            start = None
    # a run without a letter or digit (a stray combining mark, "_") is no word: the stores' phrase of it is
    # empty, and ANDed with the others it matched nothing
    return [w for w in out if any(c.isalnum() for c in w)]


def normalize_hashtag(tag: str) -> str:
    """A hashtag as stored and searched: no ``#``, lower case, composed
    (NFC: "#Café" typed decomposed is the tag posted composed), and no
    whitespace inside, as people write them (``#NewYork``). The schema lets
    an event carry "new york"; kept with its space, SQLite's space-separated
    hashtag list read it back as two tags ("new" and "york") where
    Elasticsearch kept one. Control characters (NUL, ESC, C1) are dropped:
    the desk and the CLI refuse them in a search, so a tag that kept them
    could never be found."""
    kept = "".join(c for c in tag if unicodedata.category(c) != "Cc")  # first: "#\x00#rome" is "rome"
    return "".join(unicodedata.normalize("NFC", kept.strip().lstrip("#").lower()).split())


def event_hashtags(ev: Any) -> list[str]:
    """An event's hashtags as both stores keep and search them: normalised,
    once each, in the order they came."""
    return [t for t in dict.fromkeys(normalize_hashtag(h) for h in ev.hashtags) if t]


SortField = Literal["sightings_5m", "sightings_1h", "fake_score", "sightings", "last_seen"]

# The one definition of each cluster order: these fields in turn, each the
# largest first, then the cluster id ascending. Every reader renders it from here: the
# Python key of a finished result (``sort_key``; the desk's queue and its
# cursor, ``sort_values``), the SQLite store's pre-selection (``ORDER BY``)
# and the Elasticsearch store's (``sort``). Fields are the values a cluster
# record shows: ``sightings_5m``/``sightings_1h`` its velocity, ``fake_score``,
# ``sightings`` (the exact count, merges included) and ``last_seen`` (as an
# instant; none: before any). Each order breaks its ties by the other measure
# of how much a cluster matters (more sightings, a higher score) before the id.
SORT_ORDER: dict[str, tuple[SortField, ...]] = {
    "velocity": ("sightings_5m", "sightings_1h", "fake_score"),
    "score": ("fake_score", "sightings"),
    "last_seen": ("last_seen",),
    "sightings": ("sightings", "fake_score"),
}
assert set(SORT_ORDER) == set(SORT_KEYS)
NEVER = -1e18  # the ``last_seen`` of a cluster without one, in epoch seconds: before any instant
VELOCITY_FIELDS = ("sightings_5m", "sightings_1h")  # the sort fields read from a record's velocity


def sort_order(sort: str) -> tuple[SortField, ...]:
    """``SORT_ORDER[sort]``; relevance (and no sort) ranks by velocity after the match."""
    return SORT_ORDER.get(sort, SORT_ORDER["velocity"])


def record_field(c: "ClusterRecord", name: str) -> Any:
    """``sort_key``'s field reader for a ``ClusterRecord``."""
    return getattr(c.velocity, name) if name in VELOCITY_FIELDS else getattr(c, name)


def instant(ts: str | None) -> float:
    """An ISO time as epoch seconds (naive = UTC); ``NEVER`` for none or not a time."""
    try:
        d = datetime.fromisoformat(ts) if ts else None
    except ValueError:
        d = None
    if d is None:
        return NEVER
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()


def sort_values(sort: str, get: Callable[[Any, str], Any] = record_field) -> Callable[[Any], tuple[float, ...]]:
    """A row's values in ``sort``'s order (``SORT_ORDER``) as numbers, the
    larger first: the key without the id, what the desk's queue carries in its cursor.
    ``get(row, name)`` reads a row's field (``record_field``: a
    ``ClusterRecord``'s; the desk reads its documents through its own); a
    missing number is 0."""
    fields = sort_order(sort)

    def values(row: Any) -> tuple[float, ...]:
        out = []
        for name in fields:
            raw = get(row, name)
            out.append(instant(raw) if name == "last_seen" else float(raw or 0))
        return tuple(out)

    return values


def sort_key(sort: str, get: Callable[[Any, str], Any] = record_field):
    """Python ordering (ascending) for a finished result list: ``sort``'s
    values (``sort_values``), the larger first, then the ``id`` ascending."""
    values = sort_values(sort, get)
    return lambda c: (*(-v for v in values(c)), get(c, "id"))
