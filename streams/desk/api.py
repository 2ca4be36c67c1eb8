"""The desk's JSON API (``/api/...``) and its thumbnails (``/thumb/...``):
the routes scripts call, in the shapes of the CLI's ``--format json``."""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from streams.desk import observe, views
from streams.desk.accounts import check_accounts
from streams.desk.apidocs import READ_ERRORS, DeskError, DeskValidationError, error_responses
from streams.desk.auth import Principal
from streams.desk.guards import DeskRoute, api_editor, api_reader, reader
from streams.desk.lookup import Lookup, Rejected
from streams.desk.queries import account_query, accounts_link, cluster_query, desk_verdict_query, queue_link, \
    search_asked, search_cursor, search_link, store_query
from streams.desk.source import (
    DETAIL_MEMBERS, LIST_MEMBERS, MAX_DETAIL_MEMBERS, AccountQuery, ClusterQuery, FindingsSource, NotAMember, NotFound,
    members_page, state_page,
)
from streams.desk.state import Desk, desk_of
from streams.desk.thumbs import ThumbBusy, ThumbError
from streams.desk.verdicts import Conflict, VerdictIn
from streams.cluster_search import ClusterQuery as StoreQuery
from streams.cluster_search import SearchCursor

log = logging.getLogger(__name__)

router = APIRouter(route_class=DeskRoute)


@router.get("/api/clusters", tags=["clusters"], summary="Clusters, in the `deepwatch clusters --format json` shape",
            responses=error_responses(*READ_ERRORS))
def api_clusters(request: Request, response: Response, q: ClusterQuery = Depends(cluster_query),
                 _: Principal = Depends(reader)) -> list[dict[str, Any]]:
    """One page of the queue's order. When there are more, `X-Next-Cursor` carries the next page's `cursor` and
    `Link` its address (`rel="next"`); the last page has neither. The queue lists the desk's view: `X-Desk-View`
    says which clusters it holds (see docs/desk.md, "The desk's view")."""
    source = desk_of(request).source
    rows, nxt = source.clusters_page(q)
    response.headers["X-Desk-View"] = view_header(source.view_window())
    if nxt is not None:
        next_page(response, queue_link("/api/clusters", q, nxt), nxt)
    return [members_page(r, LIST_MEMBERS) for r in rows]


def members_limit_query(members_limit: int = Query(
        DETAIL_MEMBERS, ge=1, le=MAX_DETAIL_MEMBERS,
        description=f"members the answer lists at once (default {DETAIL_MEMBERS}, at most {MAX_DETAIL_MEMBERS}); "
                    "`members_total` says how many the cluster has")) -> int:
    return members_limit


def members_after_query(members_after: Optional[str] = Query(
        None, pattern="^[0-9a-f]{64}$",
        description="list the members after this one (a sha256): the `members_next` of the page before")
) -> Optional[str]:
    return members_after


@router.get("/api/clusters/{cluster_id}", tags=["clusters"],
            summary="One cluster with members, sightings over time, evidence and verdict history",
            responses=error_responses(*READ_ERRORS, 404, e404="no such cluster",
                                      e422="bad `members_limit` or `members_after`, or a `members_after` that is "
                                           "none of the cluster's members"))
def api_cluster(request: Request, cluster_id: str, _: Principal = Depends(reader),
                members_limit: int = Depends(members_limit_query),
                members_after: Optional[str] = Depends(members_after_query)) -> dict[str, Any]:
    """`members` lists a page of the cluster's members (`members_limit`, in the store's order: the founding
    picture first), `members_total` how many it has and `members_next` the `members_after` of the next page
    (null on the last)."""
    return cluster_detail(desk_of(request).source, cluster_id, members_limit, members_after)


@router.post("/api/clusters/{cluster_id}/verdict", tags=["verdicts"], status_code=201,
             summary="Record a verdict (editor): fake / authentic feed the banks; needs-review flags it",
             responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503, e404="no such cluster",
                                       e413="the request body is over 64 KiB",
                                       e503="the findings store is not answering (nothing recorded), or the verdict "
                                            "was recorded and carrying out its effects failed (the error says which)"))
async def api_verdict(request: Request, cluster_id: str, body: VerdictIn,
                      who: Principal = Depends(api_editor)) -> dict[str, Any]:
    return state_page((await record_verdict(desk_of(request), cluster_id, body, who)).model_dump(mode="json"))


@router.get("/api/accounts", tags=["accounts"],
            summary="Accounts with posts, pictures, AI share, first/last seen, platforms",
            responses=error_responses(*READ_ERRORS))
def api_accounts(request: Request, response: Response, q: AccountQuery = Depends(account_query),
                 _: Principal = Depends(reader)) -> list[dict[str, Any]]:
    """One page, best ranked first. When there are more, `X-Next-Cursor` carries the next page's `cursor` and
    `Link` its address (`rel="next"`); the last page has neither."""
    rows, nxt = desk_of(request).source.accounts_page(q)
    if nxt is not None:
        next_page(response, accounts_link("/api/accounts", q, nxt), nxt)
    return rows


def account_in_query(account: Optional[str] = Query(
        None, alias="id", max_length=1024,
        description='the account id, for one no path can carry: `/api/accounts/?id=..` (clients resolve a path '
                    'segment "." or ".." away, escaped or not)')
) -> Optional[str]:
    """``?id=``: the account of ``/accounts/`` and ``/api/accounts/`` with no id in the path."""
    return account


@router.get("/api/accounts/{account_id:path}", tags=["accounts"], summary="One account with its recent posts",
            responses=error_responses(*READ_ERRORS, 404, e404="no such account"))
def api_account(request: Request, account_id: str, _: Principal = Depends(reader),
                in_query: Optional[str] = Depends(account_in_query)) -> dict[str, Any]:
    # "/api/accounts/?id=..": an id whose path a client resolves away ("." or "..")
    account_id = account_id or in_query or ""
    try:
        return desk_of(request).source.account(account_id)
    except NotFound:
        raise HTTPException(404, f"no account {account_id!r}") from None


@router.get("/api/search", tags=["clusters"],
            summary="Analyst search of the findings store: full text over posts and hashtags plus filters",
            responses=error_responses(*READ_ERRORS, e422="bad filters, or none at all (give a condition or a sort)"))
def api_search(request: Request, q: StoreQuery = Depends(store_query),
               desk_verdict: Optional[str] = Depends(desk_verdict_query),
               after: Optional[SearchCursor] = Depends(search_cursor),
               _: Principal = Depends(reader)) -> list[dict[str, Any]]:
    """One page (`limit`), best first. When there are more, `X-Next-Cursor` carries the next page's `cursor` and
    `Link` its address (`rel="next"`); the last page has neither. `X-Result-Cut: true` whenever more matched than
    the page holds (a text that is in no post, matched as a substring, is one page: a larger `limit` gives more).
    A `sort` alone lists every cluster in that order; a request with no condition and no sort is a 422."""
    if not search_asked(q, desk_verdict):
        raise HTTPException(422, "bad request: give at least one of q, since, until, platform, account, hashtag, "
                                 "verdict, desk_verdict, min_score, or a sort alone to list every cluster")
    rows, nxt, cut = desk_of(request).source.analyst_search_page(q, desk_verdict, after)
    # the body stays the array
    response = JSONResponse([members_page(r, LIST_MEMBERS) for r in rows],
                            headers={"X-Result-Cut": "true"} if cut else None)
    if nxt is not None:
        next_page(response, search_link("/api/search", q, desk_verdict, nxt), nxt)
    return response


@router.get("/api/banks", tags=["verdicts"], summary="Banks of known pictures and their sizes",
            responses=error_responses(401, 403, 422))
def api_banks(request: Request, _: Principal = Depends(reader)) -> list[dict[str, Any]]:
    return views.banks(desk_of(request).settings)


def pictures(thumb_px: int) -> APIRouter:
    """The picture routes, after ``router``'s. Made for each app: ``/thumb``'s
    ``px`` defaults to the desk's ``desk.thumb_px``, and the API's schema
    shows that default."""
    pics = APIRouter(route_class=DeskRoute)

    @pics.get("/thumb/{sha256}", tags=["pictures"],
              summary="A resized JPEG of a cluster member (never the original bytes)",
              responses=error_responses(400, *READ_ERRORS, 404, e400="the name is not a sha256 hex digest",
                                        e404="no cluster member with this sha256, or its picture cannot be read",
                                        e503="thumbnailing is busy (try again after `Retry-After`), or the "
                                             "findings store is not answering"))
    def thumb(request: Request, sha256: str, px: int = Query(thumb_px, ge=32, le=1024),
              _: Principal = Depends(reader)) -> Response:
        return thumbnail(desk_of(request), sha256, px)

    pics.post("/api/similar", tags=["pictures"],
              summary="Have we seen this picture? Clusters and bank entries showing an uploaded image, nearest first",
              responses=error_responses(
                  401, 403, 413, 422, 503, models={422: Union[DeskValidationError, DeskError]},
                  e413="the picture is over fetch.max_bytes (or decode.max_dimension): `reason` `too_large`",
                  e422="no picture in the field `image` (`detail`), or one the desk does not look up (`reason`: "
                       "`undecodable`, `empty`, `decompression_bomb`...)",
                  e503="decoding is busy (`reason` `busy`) or the findings store is not answering"))(api_similar)
    return pics


def thumbnail(desk: Desk, sha256: str, px: int) -> Response:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise HTTPException(400, "not a sha256 hex digest")
    if not desk.source.may_show(sha256):
        raise HTTPException(404, f"no cluster member {sha256}")
    try:
        data = desk.thumbs.get(sha256, px)
    except ThumbBusy as e:  # a page's <img> asks again on its next load; a client, after Retry-After
        raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
    except ThumbError as e:
        raise HTTPException(404, str(e)) from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


async def api_similar(request: Request,
                      image: UploadFile = File(..., description="the picture (multipart field `image`), at most "
                                                                "fetch.max_bytes"),
                      _: Principal = Depends(api_reader)) -> Any:
    """Rows in the `deepwatch similar --format json` shape (`[]`: not seen); a cluster row adds `desk_url`
    and `cluster` (the `GET /api/clusters` shape), a bank row the entry's `sha256`."""
    try:
        return (await lookup_picture(desk_of(request), image)).rows
    except Rejected as e:
        return JSONResponse({"error": str(e), "status": e.status, "reason": e.reason}, e.status)


async def lookup_picture(desk: Desk, image: UploadFile, preview: bool = False) -> Lookup:
    """The lookup, counted by outcome; decoding and the store's reads in a thread, off the event loop."""
    try:
        data = await image.read()
        found = await run_in_threadpool(desk.picture_lookup, desk.settings, desk.source, data, preview=preview)
    except Rejected:
        observe.LOOKUPS.labels("rejected").inc()
        raise
    observe.LOOKUPS.labels(found.outcome).inc()
    return found


async def record_verdict(desk: Desk, cluster_id: str, body: VerdictIn, who: Principal):
    try:
        rec = await desk.verdicts.record(cluster_id, body, who)
        observe.VERDICTS.labels(body.verdict).inc()
    except NotFound:
        raise HTTPException(404, f"no cluster {cluster_id!r}") from None
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    try:
        await check_accounts(desk.settings, desk.source, desk.db, desk.alerts)
    except Exception as e:  # the verdict stands: a failed check is no reason to send it again
        # (the timer checks accounts every desk.account_check_s anyway)
        log.warning("account check after a verdict failed; the next timed check runs it",
                    extra={"verdict_id": rec.verdict_id, "error": f"{type(e).__name__}: {e}"[:300]})
    return rec


def cluster_detail(source: FindingsSource, cluster_id: str, members_limit: int = DETAIL_MEMBERS,
                   members_after: str | None = None) -> dict[str, Any]:
    """``source.detail_of`` the cluster: 404 when there is none, 422 when ``members_after`` is
    none of its members."""
    try:
        return source.detail_of(source.cluster(cluster_id), members_limit=members_limit, members_after=members_after)
    except NotFound:
        raise HTTPException(404, f"no cluster {cluster_id!r}") from None
    except NotAMember as e:
        raise HTTPException(422, str(e)) from None


def next_page(response: Response, link: str, cursor: str) -> None:
    response.headers["X-Next-Cursor"] = cursor
    response.headers["Link"] = f'<{link}>; rel="next"'


def view_header(w: dict[str, Any]) -> str:
    """``X-Desk-View``: ``all`` (every cluster), or the window's bounds and start (stream time)."""
    if w["all"]:
        return "all"
    parts = [f"days={w['days']:g}" if w["days"] else None,
             f"max_clusters={w['max_clusters']}" if w["max_clusters"] else None,
             f"since={w['since']}" if w["since"] else None]
    return "; ".join(p for p in parts if p)
