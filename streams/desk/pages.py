"""The desk's HTML pages and the forms posted from them: the queue, a
cluster, the accounts, the search, the picture lookup, the banks, and the
login."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from streams.desk import observe, views
from streams.desk.api import account_in_query, lookup_picture, members_after_query, record_verdict
from streams.desk.auth import Principal, UserEntry, credential_of
from streams.desk.guards import LOGIN_CSRF_COOKIE, SAFE_METHODS, SESSION_COOKIE, DeskRoute, editor_form, \
    login_form_csrf, principal, reader, reader_form
from streams.desk.lookup import Rejected
from streams.desk.queries import QUEUE_FORM, SEARCH_FORM, account_query, accounts_link, cluster_query, \
    desk_verdict_query, queue_form, queue_link, search_asked, search_cursor, search_form, search_link, \
    store_query
from streams.desk.source import SEARCH_DESK_VERDICTS, AccountQuery, ClusterQuery, NotAMember, NotFound
from streams.desk.state import MAX_WAITING_LOGINS, Desk, desk_of
from streams.desk.verdicts import VerdictIn
from streams.cluster_search import ClusterQuery as StoreQuery
from streams.cluster_search import SearchCursor
from streams.cursors import NOT_A_CURSOR, decode_cursor, encode_cursor
from streams.findings import MAX_RESULTS

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
_LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")  # what secrets.token_urlsafe(24) makes

router = APIRouter(route_class=DeskRoute)


def templates() -> Jinja2Templates:
    """The pages' templates, with the desk's filters and ``login_url``."""
    made = Jinja2Templates(directory=str(HERE / "templates"))
    views.register_filters(made.env)
    made.env.globals["login_url"] = lambda request: login_url(return_to(request))
    return made


def page(request: Request, name: str, me: Principal, **ctx: Any) -> HTMLResponse:
    desk = desk_of(request)
    return desk.templates.TemplateResponse(request, name, {"me": me, "settings": desk.settings, **ctx})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def queue(request: Request, q: ClusterQuery = Depends(cluster_query), partial: bool = False,
          me: Principal = Depends(reader)):
    desk = desk_of(request)
    rows, nxt = desk.source.clusters_page(q)
    spread = desk.source.spread(rows)
    platforms = sorted({p for c in rows for p in c["platforms"]})
    return page(request, "queue_rows.html" if partial else "queue.html", me, rows=rows, spread=spread,
                form=queue_form(q), filtered=any((q.verdict, q.platform, q.since, q.q)),
                store_empty=not rows and desk.source.cluster_count() == 0, view=desk.source.view_window(),
                platforms=platforms, refresh_s=desk.settings.desk.refresh_s,
                next_url=queue_link("/", q, nxt) if nxt else None,
                first_url=queue_link("/", q, None) if q.cursor else None,
                partial_url="/?" + urlencode({**{k: v for k, v in request.query_params.items()}, "partial": 1}))


@router.get("/clusters/{cluster_id}", response_class=HTMLResponse, include_in_schema=False)
def cluster_page(request: Request, cluster_id: str, me: Principal = Depends(reader),
                 members_after: Optional[str] = Depends(members_after_query)):
    desk = desk_of(request)
    try:
        full = desk.source.cluster(cluster_id)
    except NotFound:
        raise HTTPException(404, f"no cluster {cluster_id!r}") from None
    # a page of its variants (``DETAIL_MEMBERS``), the next through ``members_after``; the
    # bank entries of all of them
    try:
        doc, stale = desk.source.detail_of(full, members_after=members_after), False
    except NotAMember:  # the link's variant is gone (a viral cluster's document sheds its newest copies): the first page
        doc, stale, members_after = desk.source.detail_of(full), True, None
    nxt = (f"/clusters/{quote(cluster_id, safe='')}?{urlencode({'members_after': doc['members_next']})}#members"
           if doc["members_next"] else None)
    first = f"/clusters/{quote(cluster_id, safe='')}#members" if members_after else None
    return page(request, "cluster.html", me, c=doc, members_next_url=nxt, members_first_url=first, members_stale=stale,
                banks=views.bank_entries_for(desk.settings, [m["sha256"] for m in full["members"]]))


@router.post("/clusters/{cluster_id}/verdict", include_in_schema=False)
async def cluster_verdict_form(request: Request, cluster_id: str, verdict: str = Form(...), note: str = Form(""),
                               who: Principal = Depends(editor_form)):
    try:
        body = VerdictIn(verdict=verdict, note=note)
    except ValidationError as e:
        raise HTTPException(422, f"bad verdict: {e.errors()[0]['msg']}") from None
    await record_verdict(desk_of(request), cluster_id, body, who)
    return RedirectResponse(f"/clusters/{quote(cluster_id)}#history", 303)


@router.get("/accounts", response_class=HTMLResponse, include_in_schema=False)
def accounts_page(request: Request, q: AccountQuery = Depends(account_query), me: Principal = Depends(reader)):
    rows, nxt = desk_of(request).source.accounts_page(q)
    return page(request, "accounts.html", me, rows=rows, query=q,
                next_url=accounts_link("/accounts", q, nxt) if nxt else None,
                first_url=accounts_link("/accounts", q, None) if q.cursor else None)


@router.get("/accounts/{account_id:path}", response_class=HTMLResponse, include_in_schema=False)
def account_page(request: Request, account_id: str, me: Principal = Depends(reader),
                 in_query: Optional[str] = Depends(account_in_query)):
    account_id = account_id or in_query or ""  # "/accounts/?id=..": an id no path can carry (views.account_href)
    try:
        a = desk_of(request).source.account(account_id)
    except NotFound:
        raise HTTPException(404, f"no account {account_id!r}") from None
    return page(request, "account.html", me, a=a)


@router.get("/search", response_class=HTMLResponse, include_in_schema=False)
def search_page(request: Request, q: StoreQuery = Depends(store_query),
                desk_verdict: Optional[str] = Depends(desk_verdict_query),
                after: Optional[SearchCursor] = Depends(search_cursor), me: Principal = Depends(reader)):
    source = desk_of(request).source
    asked = search_asked(q, desk_verdict)
    rows, nxt, cut = source.analyst_search_page(q, desk_verdict, after) if asked else ([], None, False)
    # The first page of a cut answer also offers it again with a larger limit (one page is easier to
    # read through, and the substring match of a text in no post has no next page); a later one only pages.
    more = min(q.max_results * 10, MAX_RESULTS) if cut and after is None and q.max_results < MAX_RESULTS else None
    return page(request, "search.html", me, rows=rows, asked=asked, cut=cut, spread=source.spread(rows),
                form=search_form(q, desk_verdict),
                desk_verdict=desk_verdict, desk_verdicts=SEARCH_DESK_VERDICTS,
                more_url=search_link("/search", q, desk_verdict, limit=more) if more else None,
                next_url=search_link("/search", q, desk_verdict, nxt) if nxt else None,
                first_url=search_link("/search", q, desk_verdict) if after is not None else None)


@router.get("/similar", response_class=HTMLResponse, include_in_schema=False)
def similar_page(request: Request, me: Principal = Depends(reader)):
    return page(request, "similar.html", me, found=None, error=None,
                max_bytes=desk_of(request).settings.fetch.max_bytes)


@router.post("/similar", response_class=HTMLResponse, include_in_schema=False)
async def similar_form(request: Request, image: UploadFile = File(...), me: Principal = Depends(reader_form)):
    desk = desk_of(request)
    max_bytes = desk.settings.fetch.max_bytes
    try:
        found = await lookup_picture(desk, image, preview=True)
    except Rejected as e:
        resp = page(request, "similar.html", me, found=None, error=str(e), max_bytes=max_bytes)
        resp.status_code = e.status
        return resp
    # bank entries shown only if members
    members = {r["sha256"] for r in found.rows if r.get("sha256") and "cluster_id" not in r
               and await run_in_threadpool(desk.source.may_show, r["sha256"])}
    return page(request, "similar.html", me, found=found, error=None, max_bytes=max_bytes,
                filename=image.filename or "", members=members)


@router.get("/banks", response_class=HTMLResponse, include_in_schema=False)
def banks_page(request: Request, cursor: Optional[str] = Query(None, description="the next page's cursor"),
               me: Principal = Depends(reader)):
    settings = desk_of(request).settings
    before = _entries_cursor(cursor) if cursor else None
    entries, total, nxt = views.desk_entries(settings, before)
    return page(request, "banks.html", me, banks=views.banks(settings), entries=entries, entries_total=total,
                entries_paged=before is not None,
                next_url="/banks?" + urlencode({"cursor": encode_cursor([nxt])}) if nxt is not None else None)


def _entries_cursor(token: str) -> int:
    """The rowid a banks page's desk-verdict entries start before: the page's own cursor, else a 422 naming it."""
    try:
        [rowid] = decode_cursor(token)
        if isinstance(rowid, int) and rowid > 0:
            return rowid
    except ValueError:
        pass
    raise RequestValidationError([{"type": "value_error", "loc": ("query", "cursor"), "input": token,
                                   "msg": NOT_A_CURSOR}])


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request, next: str = "/"):
    desk = desk_of(request)
    # A token the browser already holds is kept: a new one would replace
    # the cookie, and the login form of another open tab would then fail.
    token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not _LOGIN_TOKEN.fullmatch(token):
        token = secrets.token_urlsafe(24)
    # Said before a password is typed: a login over plain http off loopback
    # cannot work. Not where TLS is configured (a TLS terminator that adds
    # no header looks like plain http here): a refused login says it then.
    # Where a proxy says its client elsewhere came over plain http, though,
    # TLS is configured in name only: said whatever the settings.
    notice = desk.plain_http_through_proxy(request) or (
        None if desk.tls_configured else desk.why_no_login_cookie(request))
    resp = desk.templates.TemplateResponse(request, "login.html", {"me": None, "signed_in": signed_in(request),
                                                                   "csrf": token, "next": safe_next(next),
                                                                   "error": notice, "has_users": len(desk.users) > 0})
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, **desk.cookie_attrs(request))
    return resp


@router.post("/login", include_in_schema=False)
async def login(request: Request, username: str = Form(..., max_length=64),
                password: str = Form(..., max_length=1024), next: str = Form("/"),
                expected: str = Depends(login_form_csrf)):
    desk = desk_of(request)
    client = request.client.host if request.client else "unknown"
    clear = desk.plain_http_through_proxy(request)
    if clear:
        # A proxy says this came over plain http from elsewhere: no password
        # checked, no session cookie sent back in clear (the form's cookie,
        # which a browser keeps over http, let it this far).
        raise LoginRefused(403, clear, headers={}, next_page=next)
    if desk.logins_waiting >= MAX_WAITING_LOGINS:
        # before the rate limit counts it: a flood from elsewhere must not charge the editor's own attempt
        observe.LOGINS.labels("busy").inc()
        raise LoginRefused(503, "too many logins are being checked at once; try again in a few seconds",
                           headers={"Retry-After": "5"}, next_page=next)
    wait, stamp = desk.limiter.attempt(client, username)  # in memory, under a lock held for microseconds
    if stamp is None:
        observe.LOGINS.labels("rate_limited").inc()
        raise LoginRefused(429, f"too many failed logins; try again in {int(wait) + 1} s",
                           headers={"Retry-After": str(int(wait) + 1)}, next_page=next)
    # On the desk's few password threads (``Desk.password_checks``): a flood of guesses waits there,
    # holding neither memory nor a request thread.
    desk.logins_waiting += 1
    try:
        user = await asyncio.get_running_loop().run_in_executor(desk.password_checks, desk.users.check, username,
                                                                password)
    finally:
        desk.logins_waiting -= 1
    if user is None:
        observe.LOGINS.labels("failed").inc()
        log.warning("desk login failed", extra={"user": username, "client": client})
        # The form again with the same token: a new one would set a new
        # cookie, and a login form open in another tab (or a second try
        # already on its way) would then fail its CSRF check.
        return desk.templates.TemplateResponse(request, "login.html", {
            "me": None, "signed_in": await run_in_threadpool(signed_in, request), "csrf": expected,
            "next": safe_next(next), "error": "wrong user name or password", "has_users": True}, status_code=401)
    desk.limiter.succeeded(stamp, client, username)
    # The session the browser held until now ends here, not only its cookie:
    # a copy of it (another user's, a shared machine's) must not outlive this login.
    token = await run_in_threadpool(_new_session, desk, request.cookies.get(SESSION_COOKIE), user)
    observe.LOGINS.labels("ok").inc()
    resp = RedirectResponse(safe_next(next), 303)
    resp.set_cookie(SESSION_COOKIE, token, max_age=int(desk.settings.desk.session_hours * 3600),
                    **desk.cookie_attrs(request))
    resp.delete_cookie(LOGIN_CSRF_COOKIE, **desk.cookie_attrs(request))
    return resp


@router.post("/logout", include_in_schema=False)
def logout(request: Request, me: Principal = Depends(reader_form)):
    desk = desk_of(request)
    if me.via == "session":
        desk.db.end_session(request.cookies.get(SESSION_COOKIE, ""))
    resp = RedirectResponse("/", 303)
    resp.delete_cookie(SESSION_COOKIE, **desk.cookie_attrs(request))
    return resp


def _new_session(desk: Desk, presented: str | None, user: UserEntry) -> str:
    """A new session for ``user`` (its cookie's token), after ending the one
    the browser ``presented``; desk.sqlite may wait on a busy file: off the loop."""
    if presented:
        desk.db.end_session(presented)
    return desk.db.new_session(user.name, user.role, desk.settings.desk.session_hours, credential_of(user))[0]


def signed_in(request: Request) -> Principal | None:
    """Whom the login page says the browser is logged in as: the session it
    holds (the page said nothing of it, and an editor already logged in took
    it for logged out), else nobody (not the open desk's reader). Said in the
    page, not as the header's name and logout form: that form's CSRF field
    would come before the login form's own."""
    try:
        me = principal(request)
    except HTTPException:  # a wrong bearer token: nobody
        return None
    return me if me is not None and me.via == "session" else None


def page_with_error(request: Request, status: int, message: str) -> Response | None:
    """The queue or the search page itself for a bad filter (422) or a
    search the store stopped (503): its form filled with the values as
    they were sent, to correct, and the message above it; None for any
    other request (the error page; a refresh's rows too). Only for a reader: the guards passed
    before the query was checked, so this finds one."""
    if request.method != "GET" or request.url.path not in ("/", "/search") or "partial" in request.query_params:
        return None
    try:
        me = reader(request)
    except HTTPException:
        return None
    sent = request.query_params
    if request.url.path == "/":
        resp = page(request, "queue.html", me, rows=[], spread={}, refresh_s=desk_of(request).settings.desk.refresh_s,
                    form={k: sent.get(k, "") for k in QUEUE_FORM}, error=message)
    else:
        resp = page(request, "search.html", me, rows=[], asked=False, spread={},
                    form={k: sent.get(k, "") for k in SEARCH_FORM}, desk_verdicts=SEARCH_DESK_VERDICTS,
                    error=message)
    resp.status_code = status
    return resp


def return_to(request: Request) -> str:
    """Where a login started from ``request`` comes back to: the page, with
    its query (a search's words and filters), as sent; for a form posted from
    a page (a verdict, a picture lookup, a logout), that page, whose GET is
    not the form's address (``/clusters/{id}/verdict`` -> ``/clusters/{id}``);
    from the login page, where it already leads."""
    if request.url.path == "/login":
        return safe_next(request.query_params.get("next", "/"))
    raw = request.scope.get("raw_path")  # as sent: a cluster id may hold an escaped "/" or "?"
    path = raw.decode("latin-1") if raw else quote(request.url.path)
    if request.method not in SAFE_METHODS:
        return "/" if path == "/logout" else path.removesuffix("/verdict")
    return path + ("?" + request.url.query if request.url.query else "")


class LoginRefused(HTTPException):
    """A login turned away before its password was checked (too many
    failures, or too many checks at once): its error page leads back to
    the login form, on to the page the login was for (``next_page``)."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str], next_page: str):
        super().__init__(status_code, detail, headers=headers)
        self.next_page = safe_next(next_page)


def login_url(target: str) -> str:
    """The login page, back to ``target`` (a path and query of the desk) after."""
    return "/login?next=" + quote(target, safe="/")


def safe_next(target: str) -> str:
    # Only same-site paths: "//evil.example" or "https://..." would be an open redirect.
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"
