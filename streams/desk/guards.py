"""Who may do what at the desk: the dependencies that find a request's
principal (a bearer token, a session cookie, or open reading on loopback),
check its role and its CSRF token, and ``DeskRoute``, the route class that
runs them before a request's body is read."""

from __future__ import annotations

import secrets
from typing import Any, Callable, Coroutine, Iterator

from fastapi import Depends, Form, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from detectors.netaddr import is_loopback
from streams.desk.auth import RANK, Principal, credential_of, token_principal
from streams.desk.limits import UPLOAD_PATHS, Slots
from streams.desk.state import desk_of, host_name

SESSION_COOKIE = "dw_session"
LOGIN_CSRF_COOKIE = "dw_login_csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# Each runs twice a request, before the body is read (GuardFirst) and as a
# dependency: the credential lookup is done once.
def principal(request: Request) -> Principal | None:
    if "desk.principal" not in request.scope:
        request.scope["desk.principal"] = _principal(request)
    return request.scope["desk.principal"]


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header ("" when it names
    none), None without one. Another scheme is not the desk's: a reverse proxy
    with its own login (nginx's ``auth_basic``) passes the browser's
    ``Authorization: Basic`` on with every request, and read as a wrong token
    it refused every page, even with a session, and sent the browser round
    and round through the login page."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _principal(request: Request) -> Principal | None:
    desk = desk_of(request)
    token = bearer(request)
    if token is not None:
        p = token_principal(desk.tokens, token)
        if p is None:
            raise HTTPException(401, "invalid bearer token")
        return p
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        s = desk.db.session(cookie)
        # The users file decides, not the role at login: a user demoted or
        # removed since (`deepwatch desk-user`) must not keep an editor's
        # session, nor one whose password was changed (it may have leaked).
        user = desk.users.get(s.user) if s is not None else None
        if user is not None and secrets.compare_digest(s.credential, credential_of(user)):
            not_ours(request)
            return Principal(user=user.name, role=user.role, via="session", csrf=s.csrf)
    return None


def not_ours(request: Request, origin_too: bool = False) -> None:
    # A browser says where a request comes from (Sec-Fetch-Site; every
    # current one sends it): a write riding on the session cookie, or on
    # the open loopback desk's trust in its caller, from another site or a
    # sibling subdomain, is refused here, before its body is read. A
    # session's form token is only in its body, and browsers without the
    # header still meet the token check. The open desk has no token, so
    # there a browser without Sec-Fetch-Site must name the desk in Origin;
    # "null" tells nothing (Chromium sends it for the desk's own forms
    # under Referrer-Policy: no-referrer). Not for sessions: a proxy in
    # front may rewrite Host.
    if request.method in SAFE_METHODS:
        return
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site in ("cross-site", "same-site") or (
            origin_too and site is None and origin not in (None, "null")
            and not _same_origin(origin, request.headers.get("host", ""))):
        raise HTTPException(403, "a request from another site is refused (CSRF); use the desk's own pages, or a "
                                 "bearer token from a script")


def reader(request: Request) -> Principal:
    p = principal(request)
    if p is not None:
        return p
    why = desk_of(request).why_login(request)
    if why is None:
        # A web page the analyst visits can point its own name at
        # 127.0.0.1 (DNS rebinding) and read a loopback desk as if it
        # were its own origin; the Host header still carries its name.
        if not is_loopback(host_name(request.headers.get("host", ""))):
            raise HTTPException(403, "reading without a login is for requests addressed to this machine by a "
                                     "loopback name (localhost, 127.0.0.1, [::1]); use one of those, or log in")
        # Any page the analyst has open could post here (a picture to
        # decode, a logout): no cookie is needed to ride on.
        not_ours(request, origin_too=True)
        return Principal(user="anonymous", role="viewer", via="open")
    raise HTTPException(401, f"login required: {why}")


def editor(request: Request) -> Principal:
    p = principal(request)
    if p is None:
        raise HTTPException(401, "an editor login or bearer token is required to record verdicts")
    if RANK[p.role] < RANK["editor"]:
        raise HTTPException(403, f"{p.user} is a {p.role}; recording verdicts needs the editor role")
    return p


def check_csrf(p: Principal, presented: str | None) -> None:
    # Cookies ride along with cross-site requests; a bearer token does not.
    if p.via == "session" and not _same_token(presented, p.csrf):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")


def api_editor(request: Request) -> Principal:
    """An editor, with a session's CSRF token in ``X-CSRF-Token``."""
    who = editor(request)
    check_csrf(who, request.headers.get("x-csrf-token"))
    return who


def api_reader(request: Request) -> Principal:
    """A reader, with a session's CSRF token in ``X-CSRF-Token`` (a POST that only reads)."""
    me = reader(request)
    check_csrf(me, request.headers.get("x-csrf-token"))
    return me


def login_cookie(request: Request) -> None:
    # The login form's double-submit cookie; without one the form's token cannot match.
    if not request.cookies.get(LOGIN_CSRF_COOKIE):
        # Off loopback over plain http the browser refused the Secure cookie:
        # "reload the login page" would never help there.
        raise HTTPException(403, desk_of(request).why_no_login_cookie(request)
                            or "CSRF token missing or wrong; reload the login page and try again")
    not_ours(request)


# A form's CSRF token is in its body: these check it after the body is
# read, before the other fields are validated.
def editor_form(csrf: str = Form(""), who: Principal = Depends(editor)) -> Principal:
    check_csrf(who, csrf)
    return who


def reader_form(csrf: str = Form(""), me: Principal = Depends(reader)) -> Principal:
    check_csrf(me, csrf)
    return me


def login_form_csrf(request: Request, csrf: str = Form(""), _: None = Depends(login_cookie)) -> str:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not _same_token(csrf, expected):
        raise HTTPException(403, "CSRF token missing or wrong; reload the login page and try again")
    return expected


class GuardFirst(APIRoute):
    """A route whose guard runs before its body is read.

    FastAPI reads, parses and validates a request body before it runs any
    dependency, so an anonymous client would get 422 with the API's schema
    for a malformed body, and the desk would parse bodies for anyone. Here
    the route's guards (the dependencies in ``guards``, at any depth) run on
    the bare request first: no credentials end in 401, a wrong role or CSRF
    token in 403; then a route with ``slots`` (by path and method: the
    request's own ``Slots``) takes one of them or answers 503; and only then
    does FastAPI read the body and solve the dependencies as usual (the
    guards again: they are cheap, see ``principal``). The class of every
    route of the desk (``DeskRoute``); the routers that hold them are
    included with no prefix or dependencies of their own, so a route's own
    path and dependencies are the ones checked.
    """

    guards: frozenset[Any] = frozenset()
    slots: dict[tuple[str, str], Callable[[Request], Slots]] = {}

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guards = list(dict.fromkeys(_calls_in(self.dependant, self.guards)))
        slots = {m: self.slots[(self.path, m)] for m in self.methods or () if (self.path, m) in self.slots}
        if not guards and not slots:
            return handler

        async def guarded(request: Request) -> Response:
            for guard in guards:
                await run_in_threadpool(guard, request)  # sync, like FastAPI runs them
            slots_of = slots.get(request.method)
            if slots_of is None:
                return await handler(request)
            with slots_of(request).take():  # held until the answer is built: the upload's bytes are let go by then
                return await handler(request)

        return guarded


def _calls_in(dependant: Dependant, wanted: frozenset[Any]) -> Iterator[Any]:
    """The calls of ``dependant``'s dependencies found in ``wanted``, at any depth."""
    for d in dependant.dependencies:
        if d.call in wanted:
            yield d.call
        else:
            yield from _calls_in(d, wanted)


class DeskRoute(GuardFirst):
    guards = frozenset({reader, editor, api_editor, api_reader, login_cookie})
    # The picture lookups in flight, bounded before an upload is read.
    slots = {(path, "POST"): lambda request: desk_of(request).lookups for path in UPLOAD_PATHS}


def _same_token(presented: str | None, expected: str | None) -> bool:
    if not (presented and expected):
        return False
    # Bytes: compare_digest raises TypeError (a 500) on a str with non-ASCII characters.
    return secrets.compare_digest(presented.encode(errors="replace"), expected.encode(errors="replace"))


def _same_origin(origin: str, host: str) -> bool:
    """Whether a request's Origin header names the desk it was sent to (its
    Host header)."""
    scheme, sep, netloc = origin.partition("://")
    return bool(sep and host) and scheme in ("http", "https") and netloc.lower() == host.lower()
