"""The filters the desk's pages and API read from a query string, as
dependencies that check them (a bad one is a ``RequestValidationError``,
named by its query parameter), and the links and forms made back from the
checked values: nothing of a request is echoed as sent."""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from typing import Any, Optional
from urllib.parse import urlencode

from fastapi import Depends, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from streams.desk.source import SEARCH_DESK_VERDICTS, AccountQuery, ClusterQuery
from streams.cluster_search import ClusterQuery as StoreQuery
from streams.cluster_search import SearchCursor, nameless_filter, through_day

# The fields of the queue's and the search page's forms (``page_with_error`` refills them as sent).
QUEUE_FORM = ("q", "verdict", "platform", "since", "sort", "limit")
SEARCH_FORM = ("q", "account", "hashtag", "platform", "since", "until", "verdict", "desk_verdict", "min_score", "sort",
               "limit")
# A time whose "+01:00" offset was not percent-encoded arrives as " 01:00"
# ("+" is a space in a query string): unambiguous after a time of day, so read
# as meant. Only there: after a date it is the time ("2026-11-20 10:05", as
# people type it, was read as the date at offset +10:05 and refused).
_UNENCODED_OFFSET = re.compile(r"(\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d(?::?\d\d)?)$")
# The desk shows every time as "2026-11-20 10:04:15 UTC" (views.when): one
# copied from a page into a filter was refused ("unexpected extra characters").
_UTC_SUFFIX = re.compile(r"(?<=\d)\s*UTC$", re.IGNORECASE)


def cluster_query(verdict: Optional[str] = Query(None), platform: Optional[str] = Query(None),
                  since: Optional[str] = Query(None), q: Optional[str] = Query(None),
                  sort: str = Query("velocity"), limit: int = Query(100),
                  cursor: Optional[str] = Query(None, description="the next page's cursor, from `X-Next-Cursor`")
                  ) -> ClusterQuery:
    try:
        return ClusterQuery(verdict=verdict or None, platform=platform or None, since=_time_param(since, name="since"),
                            q=q or None,
                            sort=sort, limit=limit, cursor=cursor or None)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("query", *err["loc"])} for err in e.errors()]) from None


def store_query(q: Optional[str] = Query(None, max_length=1000, description='words ANDed, "quoted phrases"'),
                since: Optional[str] = Query(None), until: Optional[str] = Query(None),
                platform: Optional[str] = Query(None), account: Optional[str] = Query(None),
                hashtag: Optional[str] = Query(None), verdict: Optional[str] = Query(None),
                min_score: Optional[str] = Query(None, description="0..1"), sort: Optional[str] = Query(None),
                limit: int = Query(100)) -> StoreQuery:
    try:
        query = StoreQuery(text=q, since=_time_param(since, name="since"),
                           until=_time_param(until, end_of_day=True, name="until"),
                           platform=platform, account=account, hashtag=hashtag, verdict=verdict or None,
                           min_score=min_score or None, sort=sort or None, limit=limit)
    except ValidationError as e:
        loc = {"text": "q"}
        raise RequestValidationError([{**err, "loc": ("query", *(loc.get(x, x) for x in err["loc"]))}
                                      for err in e.errors()]) from None
    if q and q.strip() and query.text is None:  # said as such, not as "give at least one of q, ..."
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "q"), "input": q,
                                       "msg": "has no word to search for (only punctuation or quotes)"}])
    # "@" or "#" alone normalises to no condition: the page answered a blank
    # (not even "no clusters match"), the API "give at least one of ...
    # account, hashtag", and beside another filter it was dropped unsaid.
    nameless = nameless_filter(query, account, hashtag)
    if nameless is not None:
        name, sent, why = nameless
        raise RequestValidationError([{"type": "value_error", "loc": ("query", name), "input": sent, "msg": why}])
    if query.since and query.until and _utc(query.since) > _utc(query.until):  # answered nothing, as if none matched
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "since"), "input": since,
                                       "msg": f"since {since} is after until {until}; swap them"}])
    return query


def search_asked(q: StoreQuery, desk_verdict: str | None) -> bool:
    """Whether a search asks for anything: a condition, a desk verdict, or a
    sort alone, which lists every cluster of the store in that order, page
    by page, as ``deepwatch search --sort`` does (the API answered that a
    422 while the page listed them). A page size alone asks nothing."""
    return q.filtered or q.sort is not None or desk_verdict is not None


def desk_verdict_query(desk_verdict: Optional[str] = Query(
        None, max_length=16, description="fake, authentic or needs-review: the desk's verdict (its own database)")
) -> Optional[str]:
    if desk_verdict and desk_verdict not in SEARCH_DESK_VERDICTS:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "desk_verdict"), "input": desk_verdict,
                                       "msg": f"must be one of {', '.join(SEARCH_DESK_VERDICTS)}"}])
    return desk_verdict or None


def search_cursor(q: StoreQuery = Depends(store_query),
                  cursor: Optional[str] = Query(None, description="the next page's cursor, from `X-Next-Cursor`")
                  ) -> Optional[SearchCursor]:
    """Where the search's page starts: a cursor of this very search (its
    conditions and sort, ``SearchCursor.decode``), else a 422 naming it."""
    if not cursor:
        return None
    try:
        return SearchCursor.decode(cursor, q)
    except ValueError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "cursor"), "input": cursor,
                                       "msg": str(e)}]) from None


def account_query(min_ai_share: float = Query(0.0), min_posts: int = Query(1), limit: int = Query(200),
                  cursor: Optional[str] = Query(None, description="the next page's cursor, from `X-Next-Cursor`")
                  ) -> AccountQuery:
    try:
        return AccountQuery(min_ai_share=min_ai_share, min_posts=min_posts, limit=limit, cursor=cursor)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("query", *err["loc"])} for err in e.errors()]) from None


def queue_link(path: str, q: ClusterQuery, cursor: str | None) -> str:
    """The queue's filters from ``cursor`` on (None: the first page), from the checked values."""
    params: dict[str, Any] = {k: v for k, v in (("verdict", q.verdict), ("platform", q.platform), ("q", q.q),
                                                 ("since", q.since.isoformat() if q.since else None))
                              if v is not None}
    params.update(sort=q.sort, limit=q.limit)
    return path + "?" + urlencode(params if cursor is None else {**params, "cursor": cursor})


def queue_form(q: ClusterQuery) -> dict[str, str]:
    """The queue form's fields (``QUEUE_FORM``) as checked."""
    return {"q": q.q or "", "verdict": q.verdict or "", "platform": q.platform or "",
            "since": q.since.isoformat() if q.since else "", "sort": q.sort, "limit": str(q.limit)}


def search_form(q: StoreQuery, desk_verdict: str | None) -> dict[str, str]:
    """The search form's fields (``SEARCH_FORM``) as checked."""
    return {"q": q.text or "", "account": q.account or "", "hashtag": q.hashtag or "", "platform": q.platform or "",
            "since": q.since.isoformat() if q.since else "", "until": q.until.isoformat() if q.until else "",
            "verdict": q.verdict or "", "desk_verdict": desk_verdict or "",
            "min_score": "" if q.min_score is None else str(q.min_score), "sort": q.sort or "",
            "limit": str(q.limit or "")}


def search_link(path: str, q: StoreQuery, desk_verdict: str | None, cursor: str | None = None,
                limit: int | None = None) -> str:
    """``path`` (the search page or ``/api/search``) for ``q`` from ``cursor``
    on (None: the first page), with another ``limit`` if given, from the
    checked values."""
    params = {"q": q.text, "since": q.since.isoformat() if q.since else None,
              "until": q.until.isoformat() if q.until else None, "platform": q.platform, "account": q.account,
              "hashtag": q.hashtag, "verdict": q.verdict, "desk_verdict": desk_verdict,
              "min_score": q.min_score, "sort": q.sort, "limit": limit or q.limit, "cursor": cursor}
    return path + "?" + urlencode({k: v for k, v in params.items() if v is not None})


def accounts_link(path: str, q: AccountQuery, cursor: str | None) -> str:
    """``q``'s filters from ``cursor`` on (None: the first page), built from
    the checked values: nothing of the request is echoed."""
    params: dict[str, Any] = {"min_ai_share": q.min_ai_share, "min_posts": q.min_posts, "limit": q.limit}
    return path + "?" + urlencode(params if cursor is None else {**params, "cursor": cursor})


def _time_param(value: Optional[str], end_of_day: bool = False, name: str = "since") -> Optional[str]:
    """``since``/``until`` as sent, made what the analyst meant: an offset's
    unencoded ``+`` read back, a time as the pages print it (`` UTC`` at its
    end: naive, which is UTC) read, a compact date (``20261120``) read as
    that date, and a date alone for ``until`` the end of that day
    (``through_day``). Any other number is refused (422, ``name`` the
    field): pydantic read it as seconds since 1970, so ``since=20990101``
    matched every cluster while ``deepwatch search`` read the day."""
    if not value:
        return None
    raw = value
    value = _UTC_SUFFIX.sub("", _UNENCODED_OFFSET.sub(r"\1+\2", value.strip()))
    if value.isascii() and value.isdigit():
        try:
            value = date.fromisoformat(value).isoformat() if len(value) == 8 else ""
        except ValueError:
            value = ""
        if not value:
            raise RequestValidationError([{"type": "datetime_from_number", "loc": ("query", name),
                                           "msg": "a number is not a date or time", "input": raw}])
    return through_day(value) if end_of_day else value


def _utc(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)  # naive = UTC, as the stores read it
