"""The desk's FastAPI application: pages, the REST API and their guards.

``create_app(settings, host)`` builds it; ``host`` is the address the server
binds, which decides whether reading is open (loopback) or needs a login. Open
reading is for requests from this machine only: never one through a reverse
proxy (``desk.trusted_proxies`` set, or proxy headers on the request), nor one
from another address (``Desk.why_login``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import ipaddress
import logging
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, Optional
from urllib.parse import quote, unquote_plus, urlencode

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from detectors.imagedata import ignore_pillow_warnings
from detectors.netaddr import is_loopback
from streams import metrics, similar
from streams.desk import observe, views
from streams.desk.accounts import check_accounts
from streams.desk.alerting import AlertPath
from streams.desk.auth import RANK, LoginLimiter, Principal, Users, credential_of, token_principal, tokens_from_env
from streams.desk.deskdb import DeskDB
from streams.desk.lookup import Lookup, Rejected, lookup, upload_bound
from streams.desk.source import SEARCH_DESK_VERDICTS, AccountQuery, ClusterQuery, FindingsSource, NotFound
from streams.desk.thumbs import SIZES as THUMB_SIZES, ThumbBusy, ThumbError, Thumbnails
from streams.desk.verdicts import Conflict, VerdictIn, Verdicts
from streams.findings import ClusterQuery as StoreQuery
from streams.findings import MAX_RESULTS, FindingsStore, SearchTimeout, open_findings, through_day
from streams.settings import Settings

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SESSION_COOKIE = "dw_session"
LOGIN_CSRF_COOKIE = "dw_login_csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SHA256 = r"^[0-9a-f]{64}$"
# The largest request body read: a verdict (a note of at most 4,000 characters,
# 6 bytes each when JSON-escaped) or a login form fits many times over.
# Picture uploads (``UPLOAD_PATHS``) have their own, larger bound.
MAX_BODY_BYTES = 64 * 1024
UPLOAD_PATHS = ("/api/similar", "/similar")
# The fields of the queue's and the search page's forms (``page_with_error`` refills them as sent).
QUEUE_FORM = ("q", "verdict", "platform", "since", "sort", "limit")
SEARCH_FORM = ("q", "account", "hashtag", "platform", "since", "until", "verdict", "desk_verdict", "min_score", "sort",
               "limit")
# Picture lookups in flight at once, counted from when their guards pass,
# before their uploads are read. Each holds its upload whole (up to
# fetch.max_bytes, 25 MiB by default) until it is answered, and waits for the
# decode memory budget and a worker thread; past about two a core more of them
# add memory, not answers (48 uploads of 23 MiB at once took the desk to
# 1.8 GiB). One over this is answered 503 with Retry-After, not queued: a
# queued upload would hold its connection and, once read, its bytes.
MAX_LOOKUPS = max(2, 2 * (os.cpu_count() or 1))
LOOKUP_RETRY_S = 2
# Headers a reverse proxy adds: a request carrying any of them is not read
# without a login, whether or not the proxy is one the desk trusts.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip")
DOCS_PATH, OPENAPI_PATH, SWAGGER_ASSETS = "/docs", "/openapi.json", "/docs/assets"
# Swagger UI 5 (the fastapi-swagger wheel's copy; 4.x cannot read the OpenAPI
# 3.1 that FastAPI writes): the files the docs page loads, and no others.
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                 "favicon-32x32.png": "image/png"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or as
    received) ends in 413 when the route reads it, one still arriving
    ``timeout_s`` after the route began to read it in 408; the paths in
    ``paths`` have a bound of their own (picture uploads). The guards answer
    before a body is read (``GuardFirst``), but a login form and every request
    that passes them are read: without a bound a client could make the desk
    hold gigabytes, or a connection for as long as it trickled bytes."""

    def __init__(self, app: Any, max_bytes: int, paths: dict[str, int] | None = None, timeout_s: float = 120.0):
        self.app, self.max_bytes, self.paths, self.timeout_s = app, max_bytes, dict(paths or {}), timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bound = self.paths.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        received = 0
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        body_done = False

        async def limited() -> dict[str, Any]:
            nonlocal received, deadline, body_done
            if body_done:  # after the body, a receive waits for the disconnect: no deadline on that
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            body_done = message.get("type") != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > bound or not declared.isdigit() or int(declared) > bound:
                # Raised inside the route's body read: its exception handlers answer.
                raise HTTPException(413, f"request body over {bound} bytes")
            return message

        await self.app(scope, limited, send)


class Slots:
    """At most ``n`` requests of a kind at once (``take``); one over that is
    refused with 503 and ``Retry-After``. Taken and given back on the event
    loop only, so the count needs no lock."""

    def __init__(self, n: int, what: str, retry_after_s: int):
        self.n, self.what, self.retry_after_s, self.busy = n, what, retry_after_s, 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.busy >= self.n:
            raise HTTPException(503, f"the desk is busy: {self.n} {self.what} are in flight, the most it takes at "
                                     f"once; try again in {self.retry_after_s} s",
                                headers={"Retry-After": str(self.retry_after_s)})
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


class GuardFirst(APIRoute):
    """A route whose guard runs before its body is read.

    FastAPI reads, parses and validates a request body before it runs any
    dependency, so an anonymous client would get 422 with the API's schema
    for a malformed body, and the desk would parse bodies for anyone. Here
    the route's guards (the dependencies in ``guards``, at any depth) run on
    the bare request first: no credentials end in 401, a wrong role or CSRF
    token in 403; then a route with ``slots`` (by path and method) takes one
    of them or answers 503; and only then does FastAPI read the body and
    solve the dependencies as usual (the guards again: they are cheap, see
    ``principal``). Set as the app's ``route_class`` before any route.
    """

    guards: frozenset[Any] = frozenset()
    slots: dict[tuple[str, str], Slots] = {}

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guards = list(dict.fromkeys(_calls_in(self.dependant, self.guards)))
        slots = {m: self.slots[(self.path, m)] for m in self.methods or () if (self.path, m) in self.slots}
        if not guards and not slots:
            return handler

        async def guarded(request: Request) -> Response:
            for guard in guards:
                await run_in_threadpool(guard, request)  # sync, like FastAPI runs them
            bound = slots.get(request.method)
            if bound is None:
                return await handler(request)
            with bound.take():  # held until the answer is built: the upload's bytes are let go by then
                return await handler(request)

        return guarded


def _calls_in(dependant: Dependant, wanted: frozenset[Any]) -> Iterator[Any]:
    """The calls of ``dependant``'s dependencies found in ``wanted``, at any depth."""
    for d in dependant.dependencies:
        if d.call in wanted:
            yield d.call
        else:
            yield from _calls_in(d, wanted)


class Desk:
    """Everything one running desk holds, built once per app."""

    def __init__(self, settings: Settings, host: str, store: FindingsStore):
        self.settings = settings
        data = Path(settings.data_dir)
        loopback = is_loopback(host)
        # A reverse proxy on the same machine sends its clients' requests from
        # 127.0.0.1, often with Host: 127.0.0.1: a desk behind one is never
        # read without a login (``why_login`` also refuses requests that carry
        # proxy headers, for a proxy not listed here).
        proxied = bool(settings.desk.trusted_proxies)
        self.open_read = loopback and not settings.desk.require_login_on_loopback and not proxied
        # Why an anonymous read is refused (when it is): said in the 401.
        self.login_reason = ("this desk is not on a loopback address" if not loopback else
                             "reading needs a login on this loopback desk too (desk.require_login_on_loopback is set)"
                             if settings.desk.require_login_on_loopback else
                             "this desk is behind a reverse proxy (desk.trusted_proxies is set), which always needs a "
                             "login")
        # Off loopback, or where people reach the desk over https: the session
        # cookie is Secure and HSTS is sent (``secure``).
        self.loopback = loopback
        self.secure_cookies = not loopback or (settings.desk.public_url or "").lower().startswith("https:")
        self.tls_configured = tls_configured(settings.desk)
        self.lookups = Slots(MAX_LOOKUPS, "picture lookups", LOOKUP_RETRY_S)
        self.db = DeskDB(data / "desk.sqlite")
        self.source = FindingsSource(store, self.db, search_timeout_s=settings.findings.search_timeout_s,
                                     view_days=settings.desk.view_days,
                                     max_view_clusters=settings.desk.max_view_clusters)
        self.users = Users(settings.desk.users_file or data / "desk-users.json")
        len(self.users)  # a broken users file stops the start with its reason
        self.tokens = tokens_from_env(settings.desk.tokens_env)
        self.limiter = LoginLimiter(settings.desk.login_failures_per_minute)
        self.alerts = AlertPath(settings)
        self.verdicts = Verdicts(settings, self.source, self.db, self.alerts)
        self.account_check: asyncio.Future | None = None  # the timer's check in flight, if any
        self.thumbs = Thumbnails(data / "blobs", data / "desk" / "thumbs",
                                 max_bytes=settings.desk.thumb_cache_mb * 1024 * 1024, limits=settings.decode_limits(),
                                 sizes=(*THUMB_SIZES, settings.desk.thumb_px))

    def secure(self, request: Request) -> bool:
        """Whether the answer sets Secure cookies and HSTS: off loopback, with
        an https ``public_url``, or for a request made over https (its scheme
        as a trusted proxy's X-Forwarded-Proto says, which uvicorn applies)."""
        return self.secure_cookies or request.url.scheme == "https"

    def cookie_attrs(self, request: Request) -> dict[str, Any]:
        """The attributes the desk's cookies are set with, and deleted with:
        a browser may ignore a deletion whose attributes differ (Chromium
        leaves a Secure cookie alone when a plain-http page's Set-Cookie
        without Secure names it)."""
        return {"httponly": True, "samesite": "strict", "secure": self.secure(request)}

    def why_no_login_cookie(self, request: Request) -> str | None:
        """Why a browser cannot have sent back the login form's cookie, when
        the reason is the desk's address, not the browser: off loopback the
        cookies are Secure, and a browser keeps none from a plain-http page
        (one at a loopback name, http://127.0.0.1, is trusted as if it were
        https). None where https is in use (uvicorn's scheme, which a trusted
        proxy's X-Forwarded-Proto sets; or such a header from a proxy the desk
        does not trust, which the browser's https page then reached it
        through) or the cookie could have been kept."""
        if self.loopback or request.url.scheme == "https" or _says_https(request):
            return None
        if is_loopback(_host_name(request.headers.get("host", ""))):
            return None
        return ("this desk needs HTTPS off loopback: it listens on a non-loopback address, where its login cookie "
                "is Secure, and this page came over plain http, where browsers do not keep Secure cookies, so no "
                "browser can log in. Put a TLS-terminating reverse proxy in front of the desk, list the proxy's "
                "address in desk.trusted_proxies (its X-Forwarded-Proto: https is then believed) and set "
                "desk.public_url to the https address people use; or run the desk on a loopback address "
                "(--host 127.0.0.1) to use it from this machine only")

    def why_login(self, request: Request) -> str | None:
        """Why this request may not read without a login (None: it may).
        Open reading is for a browser or script on this machine: a request a
        proxy passed on (its headers name a client elsewhere, trusted or not)
        or one from another address (after a trusted proxy's X-Forwarded-For)
        always logs in."""
        if not self.open_read:
            return self.login_reason
        if any(h in request.headers for h in PROXY_HEADERS):
            return ("this request came through a reverse proxy (it carries Forwarded or X-Forwarded-* headers), and "
                    "a proxied desk always needs a login")
        # An address that is not an IP literal is no network peer (a test
        # harness's); uvicorn gives the peer's IP, or the forwarded client's.
        client = request.client.host if request.client else ""
        if _is_ip(client) and not is_loopback(client):
            return f"this request comes from {client}, not from this machine"
        return None

    def close(self) -> None:
        self.alerts.close()
        try:  # the picture lookup's member index, for the next start (streams.similar.save_index)
            similar.save_index(self.settings, self.source.store)
        except Exception:  # a stop goes on: the next desk indexes the store again
            log.exception("saving the member index failed")
        self.source.close()
        self.db.close()


def tls_configured(desk: Any) -> bool:
    """Whether the desk settings (``DeskSettings``) say a TLS-terminating
    proxy is in front: ``desk.trusted_proxies`` (whose X-Forwarded-Proto
    says https), or an https ``desk.public_url`` (where people reach it).
    Without either, a desk bound off loopback speaks plain http to browsers,
    which then keep none of its Secure cookies (``deepwatch serve`` warns)."""
    return bool(desk.trusted_proxies) or (desk.public_url or "").lower().startswith("https:")


def _open_store(settings: Settings) -> FindingsStore:
    """The findings store to read; a missing SQLite file is refused (opening
    would create an empty one), an unreachable Elasticsearch says why."""
    url = (settings.findings.url or "").strip()
    if not url or url.startswith("sqlite"):
        rest = url[len("sqlite://"):] if url.startswith("sqlite://") else ""
        path = Path(rest) if rest else Path(settings.data_dir) / "findings.sqlite"
        if not path.exists():
            raise FileNotFoundError(f"no findings at {path}; run `deepwatch demo` or `deepwatch replay` first")
    try:
        store = open_findings(url or None, settings.data_dir, settings)
    except ValueError:
        raise
    except Exception as e:  # e.g. an Elasticsearch address it cannot use
        raise ValueError(str(e)) from None
    try:
        store.count_sightings()  # fail at start, not on the first page
    except Exception as e:
        store.close()
        raise ValueError(f"cannot read the findings store {url}: {e}") from None
    return store


# A time whose "+01:00" offset was not percent-encoded arrives as " 01:00"
# ("+" is a space in a query string): unambiguous, so read as meant.
_UNENCODED_OFFSET = re.compile(r"(\d) (\d\d(?::?\d\d)?)$")


def _time_param(value: Optional[str], end_of_day: bool = False) -> Optional[str]:
    """``since``/``until`` as sent, made what the analyst meant: an offset's
    unencoded ``+`` read back, and a date alone for ``until`` the end of that
    day (``through_day``)."""
    if not value:
        return None
    value = _UNENCODED_OFFSET.sub(r"\1+\2", value.strip())
    return through_day(value) if end_of_day else value


def _utc(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)  # naive = UTC, as the stores read it


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def create_app(settings: Settings, host: str = "127.0.0.1", store_url: str | None = None) -> FastAPI:
    """The desk over the findings in ``settings.data_dir`` (or ``store_url``:
    ``sqlite:///PATH`` or an Elasticsearch ``es://HOST:9200``); raises
    FileNotFoundError/ValueError with a message fit for the command line."""
    if store_url:
        # Desk alerts go through the sinks: make them write to the store the desk reads.
        settings = settings.model_copy(deep=True)
        settings.findings.url = store_url
    ignore_pillow_warnings()  # thumbnails and lookups decode in the threadpool, at once
    desk = Desk(settings, host, _open_store(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_account_loop(desk))
        beats = asyncio.create_task(metrics.beat_forever())  # for the liveness probe on the metrics port
        try:
            yield
        finally:
            beats.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # A check cancelled mid-write would leave a thread writing to a
            # store we are about to close: let it finish first.
            if desk.account_check is not None:
                with contextlib.suppress(Exception):
                    await desk.account_check
            desk.close()

    # The API docs are routes of their own below: behind the reader guard,
    # with Swagger UI from the installed wheel. FastAPI's would load a CDN's
    # script into the desk's origin, and be open when reading is not.
    # Trailing-slash redirects are off: Starlette builds them from the Host
    # header, a redirect to wherever a client says the desk is.
    app = FastAPI(title="deepwatch desk", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False,
                  description="Fact-check desk: the queue of image clusters, evidence, verdicts and accounts.")
    app.state.desk = desk
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    views.register_filters(templates.env)
    templates.env.globals["login_url"] = lambda request: _login_url(_return_to(request))
    docs_page = get_swagger_ui_html(openapi_url=OPENAPI_PATH, title="deepwatch desk API",
                                    swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
                                    swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
                                    swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
                                    swagger_ui_parameters={"validatorUrl": None}).body
    docs_script = _inline_script_hash(docs_page)
    swagger_dir = Path(importlib.util.find_spec("fastapi_swagger.resources").origin).parent
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # -- guards ---------------------------------------------------------------
    # Each runs twice a request, before the body is read (GuardFirst) and as a
    # dependency: the credential lookup is done once.
    def principal(request: Request) -> Principal | None:
        if "desk.principal" not in request.scope:
            request.scope["desk.principal"] = _principal(request)
        return request.scope["desk.principal"]

    def _principal(request: Request) -> Principal | None:
        auth = request.headers.get("authorization", "")
        if auth:
            scheme, _, token = auth.partition(" ")
            p = token_principal(desk.tokens, token.strip()) if scheme.lower() == "bearer" else None
            if p is None:
                raise _error(401, "invalid bearer token")
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
            raise _error(403, "a request from another site is refused (CSRF); use the desk's own pages, or a "
                              "bearer token from a script")

    def reader(request: Request) -> Principal:
        p = principal(request)
        if p is not None:
            return p
        why = desk.why_login(request)
        if why is None:
            # A web page the analyst visits can point its own name at
            # 127.0.0.1 (DNS rebinding) and read a loopback desk as if it
            # were its own origin; the Host header still carries its name.
            if not is_loopback(_host_name(request.headers.get("host", ""))):
                raise _error(403, "reading without a login is for requests addressed to this machine by a loopback "
                                  "name (localhost, 127.0.0.1, [::1]); use one of those, or log in")
            # Any page the analyst has open could post here (a picture to
            # decode, a logout): no cookie is needed to ride on.
            not_ours(request, origin_too=True)
            return Principal(user="anonymous", role="viewer", via="open")
        raise _error(401, f"login required: {why}")

    def editor(request: Request) -> Principal:
        p = principal(request)
        if p is None:
            raise _error(401, "an editor login or bearer token is required to record verdicts")
        if RANK[p.role] < RANK["editor"]:
            raise _error(403, f"{p.user} is a {p.role}; recording verdicts needs the editor role")
        return p

    def check_csrf(p: Principal, presented: str | None) -> None:
        # Cookies ride along with cross-site requests; a bearer token does not.
        if p.via == "session" and not _same_token(presented, p.csrf):
            raise _error(403, "CSRF token missing or wrong; reload the page and try again")

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
            raise _error(403, desk.why_no_login_cookie(request)
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
            raise _error(403, "CSRF token missing or wrong; reload the login page and try again")
        return expected

    class DeskRoute(GuardFirst):
        guards = frozenset({reader, editor, api_editor, api_reader, login_cookie})
        slots = {(path, "POST"): desk.lookups for path in UPLOAD_PATHS}  # before an upload is read

    app.router.route_class = DeskRoute  # every route below runs its guards before its body is read

    # -- errors -----------------------------------------------------------------
    def known(request: Request) -> Principal | None:
        """Who an error page is for, so its header does not show a logged-in
        editor as logged out; None where that is itself the error."""
        try:
            return principal(request)
        except HTTPException:
            return None

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith(("/api/", "/thumb/")) or request.url.path == OPENAPI_PATH

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        # The exception's own headers stay: Allow on a 405, Retry-After on a 429.
        headers = dict(exc.headers or {})
        if wants_json(request):
            if exc.status_code == 401:
                headers["WWW-Authenticate"] = "Bearer"
            return JSONResponse({"error": exc.detail, "status": exc.status_code}, exc.status_code, headers=headers)
        # A page (or a form posted from one: a session that expired before an
        # editor pressed Record) goes to the login and back; a script with a
        # bearer token gets the 401 it can act on.
        if exc.status_code == 401 and (request.method == "GET" or "authorization" not in request.headers):
            return RedirectResponse(_login_url(_return_to(request)), 303)
        if isinstance(exc, _SearchStopped):
            shown = page_with_error(request, exc.status_code, exc.detail)
            if shown is not None:
                return shown
        return templates.TemplateResponse(request, "error.html", {"status": exc.status_code, "message": exc.detail,
                                                                  "me": known(request)}, status_code=exc.status_code,
                                          headers=headers)

    @app.exception_handler(SearchTimeout)
    async def search_timeout(request: Request, exc: SearchTimeout):
        # The store stopped the search (findings.search_timeout_s): the worker thread is free again.
        return await http_error(request, _SearchStopped(
            503, f"search took longer than {settings.findings.search_timeout_s:g} s and was stopped; narrow it with "
                 "since/until/platform (or account, hashtag)"))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        msg = "bad request: " + "; ".join(_problem(e) for e in exc.errors())
        if wants_json(request):
            return JSONResponse({"error": msg, "status": 422, "detail": [
                {"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]}, 422)
        shown = page_with_error(request, 422, msg)
        if shown is not None:
            return shown
        return templates.TemplateResponse(request, "error.html", {"status": 422, "message": msg, "me": known(request)},
                                          status_code=422)

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
            resp = page(request, "queue.html", me, rows=[], spread={}, refresh_s=settings.desk.refresh_s,
                        form={k: sent.get(k, "") for k in QUEUE_FORM}, error=message)
        else:
            resp = page(request, "search.html", me, rows=[], asked=False, spread={},
                        form={k: sent.get(k, "") for k in SEARCH_FORM}, desk_verdicts=SEARCH_DESK_VERDICTS,
                        error=message)
        resp.status_code = status
        return resp

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES,  # innermost: its 413 gets the headers below
                       paths={p: upload_bound(settings) for p in UPLOAD_PATHS})

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if _CONTROL.search(unquote_plus(request.url.query)):
            # SQLite would read a NUL as the end of a LIKE pattern, which then
            # matches everything; no filter of the desk needs a control character.
            resp = await http_error(request, _error(422, "bad request: query parameters must not contain control "
                                                         "characters"))
        else:
            try:
                resp = await call_next(request)
            except Exception:
                # Answered here, not by Starlette's last-resort handler, so that
                # the answer has the headers below and the desk's own shape.
                log.exception("desk request failed", extra={"path": request.url.path})
                resp = await http_error(request, _error(500, "internal error; the desk's log has the details"))
        resp.headers["Content-Security-Policy"] = (
            f"default-src 'self'; img-src 'self' data:; script-src 'self' {docs_script}; style-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'" if request.url.path == DOCS_PATH else
            "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        if not request.url.path.startswith("/static/"):
            # Findings and verdicts are not for a shared cache, nor for the
            # browser's after a logout; a thumbnail sets its own (private).
            resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        # Another origin (a page on another local port, say) cannot embed the
        # desk's answers: an <img> of /thumb/{sha} told it which pictures the
        # desk holds by loading or failing.
        resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        if desk.secure(request):
            resp.headers["Strict-Transport-Security"] = "max-age=31536000"
        return resp

    app.middleware("http")(observe.observe)  # outermost: it also counts what the inner layers answered

    @app.get(OPENAPI_PATH, include_in_schema=False)
    def openapi(_: Principal = Depends(reader)) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs(_: Principal = Depends(reader)) -> HTMLResponse:
        return HTMLResponse(docs_page)

    @app.get(SWAGGER_ASSETS + "/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        # Swagger UI's own public files: no findings in them, no login needed
        if name not in SWAGGER_FILES:
            raise _error(404, f"no docs asset {name!r}")
        return FileResponse(swagger_dir / name, media_type=SWAGGER_FILES[name],
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)  # uptime checkers send HEAD
    def healthz() -> dict[str, str]:
        # For liveness and readiness probes: open, like the probes that call it.
        return {"status": "ok"}

    def cluster_query(verdict: Optional[str] = Query(None), platform: Optional[str] = Query(None),
                      since: Optional[str] = Query(None), q: Optional[str] = Query(None),
                      sort: str = Query("velocity"), limit: int = Query(100),
                      cursor: Optional[str] = Query(None, description="the next page's cursor, from `X-Next-Cursor`")
                      ) -> ClusterQuery:
        try:
            return ClusterQuery(verdict=verdict or None, platform=platform or None, since=since or None, q=q or None,
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
            query = StoreQuery(text=q, since=_time_param(since), until=_time_param(until, end_of_day=True),
                               platform=platform, account=account, hashtag=hashtag, verdict=verdict or None,
                               min_score=min_score or None, sort=sort or None, limit=limit)
        except ValidationError as e:
            loc = {"text": "q"}
            raise RequestValidationError([{**err, "loc": ("query", *(loc.get(x, x) for x in err["loc"]))}
                                          for err in e.errors()]) from None
        if q and q.strip() and query.text is None:  # said as such, not as "give at least one of q, ..."
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "q"), "input": q,
                                           "msg": "has no word to search for (only punctuation or quotes)"}])
        if query.since and query.until and _utc(query.since) > _utc(query.until):  # answered nothing, as if none matched
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "since"), "input": since,
                                           "msg": f"since {since} is after until {until}; swap them"}])
        return query

    def searched(q: StoreQuery, desk_verdict: str | None) -> tuple[list[dict[str, Any]], bool]:
        """The analyst search's answer and whether it was cut: one more than
        ``q.limit`` is asked for, so a page holding exactly the matches does
        not claim there are more; at the store's ``MAX_RESULTS`` a full answer
        may have been cut."""
        if q.max_results < MAX_RESULTS:
            rows = desk.source.analyst_search(q.model_copy(update={"limit": q.max_results + 1}), desk_verdict)
            return rows[: q.max_results], len(rows) > q.max_results
        rows = desk.source.analyst_search(q, desk_verdict)
        return rows, len(rows) >= MAX_RESULTS

    def desk_verdict_query(desk_verdict: Optional[str] = Query(
            None, max_length=16, description="fake, authentic or needs-review: the desk's verdict (its own database)")
    ) -> Optional[str]:
        if desk_verdict and desk_verdict not in SEARCH_DESK_VERDICTS:
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "desk_verdict"), "input": desk_verdict,
                                           "msg": f"must be one of {', '.join(SEARCH_DESK_VERDICTS)}"}])
        return desk_verdict or None

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

    def search_link(q: StoreQuery, desk_verdict: str | None, limit: int) -> str:
        """The search page for ``q`` with another ``limit``, from the checked values."""
        params = {"q": q.text, "since": q.since.isoformat() if q.since else None,
                  "until": q.until.isoformat() if q.until else None, "platform": q.platform, "account": q.account,
                  "hashtag": q.hashtag, "verdict": q.verdict, "desk_verdict": desk_verdict,
                  "min_score": q.min_score, "sort": q.sort}
        return "/search?" + urlencode({**{k: v for k, v in params.items() if v is not None}, "limit": limit})

    def next_page(response: Response, link: str, cursor: str) -> None:
        response.headers["X-Next-Cursor"] = cursor
        response.headers["Link"] = f'<{link}>; rel="next"'

    def accounts_link(path: str, q: AccountQuery, cursor: str | None) -> str:
        """``q``'s filters from ``cursor`` on (None: the first page), built from
        the checked values: nothing of the request is echoed."""
        params: dict[str, Any] = {"min_ai_share": q.min_ai_share, "min_posts": q.min_posts, "limit": q.limit}
        return path + "?" + urlencode(params if cursor is None else {**params, "cursor": cursor})

    def view_header(w: dict[str, Any]) -> str:
        """``X-Desk-View``: ``all`` (every cluster), or the window's bounds and start (stream time)."""
        if w["all"]:
            return "all"
        parts = [f"days={w['days']:g}" if w["days"] else None,
                 f"max_clusters={w['max_clusters']}" if w["max_clusters"] else None,
                 f"since={w['since']}" if w["since"] else None]
        return "; ".join(p for p in parts if p)

    def get_cluster(cluster_id: str) -> dict[str, Any]:
        try:
            return desk.source.detail(cluster_id)
        except NotFound:
            raise _error(404, f"no cluster {cluster_id!r}") from None

    # -- API --------------------------------------------------------------------
    @app.get("/api/clusters", tags=["clusters"], summary="Clusters, in the `deepwatch clusters --format json` shape")
    def api_clusters(response: Response, q: ClusterQuery = Depends(cluster_query),
                     _: Principal = Depends(reader)) -> list[dict[str, Any]]:
        """One page of the queue's order. When there are more, `X-Next-Cursor` carries the next page's `cursor` and
        `Link` its address (`rel="next"`); the last page has neither. The queue lists the desk's view: `X-Desk-View`
        says which clusters it holds (see docs/desk.md, "The desk's view")."""
        rows, nxt = desk.source.clusters_page(q)
        response.headers["X-Desk-View"] = view_header(desk.source.view_window())
        if nxt is not None:
            next_page(response, queue_link("/api/clusters", q, nxt), nxt)
        return rows

    @app.get("/api/clusters/{cluster_id}", tags=["clusters"],
             summary="One cluster with members, sightings over time, evidence and verdict history")
    def api_cluster(cluster_id: str, _: Principal = Depends(reader)) -> dict[str, Any]:
        return get_cluster(cluster_id)

    @app.post("/api/clusters/{cluster_id}/verdict", tags=["verdicts"], status_code=201,
              summary="Record a verdict (editor): fake / authentic feed the banks; needs-review flags it")
    async def api_verdict(cluster_id: str, body: VerdictIn, who: Principal = Depends(api_editor)) -> dict[str, Any]:
        return (await _record(cluster_id, body, who)).model_dump(mode="json")

    @app.get("/api/accounts", tags=["accounts"], summary="Accounts with posts, pictures, AI share, first/last seen, platforms")
    def api_accounts(response: Response, q: AccountQuery = Depends(account_query),
                     _: Principal = Depends(reader)) -> list[dict[str, Any]]:
        """One page, best ranked first. When there are more, `X-Next-Cursor` carries the next page's `cursor` and
        `Link` its address (`rel="next"`); the last page has neither."""
        rows, nxt = desk.source.accounts_page(q)
        if nxt is not None:
            next_page(response, accounts_link("/api/accounts", q, nxt), nxt)
        return rows

    @app.get("/api/accounts/{account_id:path}", tags=["accounts"], summary="One account with its recent posts")
    def api_account(account_id: str, _: Principal = Depends(reader)) -> dict[str, Any]:
        try:
            return desk.source.account(account_id)
        except NotFound:
            raise _error(404, f"no account {account_id!r}") from None

    @app.get("/api/search", tags=["clusters"],
             summary="Analyst search of the findings store: full text over posts and hashtags plus filters")
    def api_search(q: StoreQuery = Depends(store_query), desk_verdict: Optional[str] = Depends(desk_verdict_query),
                   _: Principal = Depends(reader)) -> list[dict[str, Any]]:
        if not q.filtered and desk_verdict is None:
            raise _error(422, "bad request: give at least one of q, since, until, platform, account, hashtag, verdict, "
                              "desk_verdict, min_score")
        rows, cut = searched(q, desk_verdict)
        # the body stays the array; a cut answer says so (a larger limit, or a narrower search, gives the rest)
        return JSONResponse(rows, headers={"X-Result-Cut": "true"} if cut else None)

    @app.get("/api/banks", tags=["verdicts"], summary="Banks of known pictures and their sizes")
    def api_banks(_: Principal = Depends(reader)) -> list[dict[str, Any]]:
        return views.banks(settings)

    @app.get("/thumb/{sha256}", tags=["pictures"], summary="A resized JPEG of a cluster member (never the original bytes)")
    def thumb(sha256: str, px: int = Query(settings.desk.thumb_px, ge=32, le=1024), _: Principal = Depends(reader)) -> Response:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise _error(400, "not a sha256 hex digest")
        if not desk.source.may_show(sha256):
            raise _error(404, f"no cluster member {sha256}")
        try:
            data = desk.thumbs.get(sha256, px)
        except ThumbBusy as e:  # a page's <img> asks again on its next load; a client, after Retry-After
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
        except ThumbError as e:
            raise _error(404, str(e)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.post("/api/similar", tags=["pictures"],
              summary="Have we seen this picture? Clusters and bank entries showing an uploaded image, nearest first")
    async def api_similar(image: UploadFile = File(..., description="the picture (multipart field `image`), at most "
                                                                   "fetch.max_bytes"),
                          _: Principal = Depends(api_reader)) -> Any:
        """Rows in the `deepwatch similar --format json` shape (`[]`: not seen); a cluster row adds `desk_url`
        and `cluster` (the `GET /api/clusters` shape), a bank row the entry's `sha256`."""
        try:
            return (await _lookup(image)).rows
        except Rejected as e:
            return JSONResponse({"error": str(e), "status": e.status, "reason": e.reason}, e.status)

    async def _lookup(image: UploadFile, preview: bool = False) -> Lookup:
        """The lookup, counted by outcome; decoding and the store's reads in a thread, off the event loop."""
        try:
            data = await image.read()
            found = await run_in_threadpool(lookup, settings, desk.source, data, preview=preview)
        except Rejected:
            observe.LOOKUPS.labels("rejected").inc()
            raise
        observe.LOOKUPS.labels(found.outcome).inc()
        return found

    async def _record(cluster_id: str, body: VerdictIn, who: Principal):
        try:
            rec = await desk.verdicts.record(cluster_id, body, who)
            observe.VERDICTS.labels(body.verdict).inc()
        except NotFound:
            raise _error(404, f"no cluster {cluster_id!r}") from None
        except Conflict as e:
            raise _error(409, str(e)) from None
        await check_accounts(settings, desk.source, desk.db, desk.alerts)
        return rec

    # -- pages ------------------------------------------------------------------
    def page(request: Request, name: str, me: Principal, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"me": me, "settings": settings, **ctx})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def queue(request: Request, q: ClusterQuery = Depends(cluster_query), partial: bool = False,
              me: Principal = Depends(reader)):
        rows, nxt = desk.source.clusters_page(q)
        spread = desk.source.spread(rows)
        platforms = sorted({p for c in rows for p in c["platforms"]})
        return page(request, "queue_rows.html" if partial else "queue.html", me, rows=rows, spread=spread,
                    form=queue_form(q), filtered=any((q.verdict, q.platform, q.since, q.q)),
                    store_empty=not rows and desk.source.cluster_count() == 0, view=desk.source.view_window(),
                    platforms=platforms, refresh_s=settings.desk.refresh_s,
                    next_url=queue_link("/", q, nxt) if nxt else None,
                    first_url=queue_link("/", q, None) if q.cursor else None,
                    partial_url="/?" + urlencode({**{k: v for k, v in request.query_params.items()}, "partial": 1}))

    @app.get("/clusters/{cluster_id}", response_class=HTMLResponse, include_in_schema=False)
    def cluster_page(request: Request, cluster_id: str, me: Principal = Depends(reader)):
        doc = get_cluster(cluster_id)
        return page(request, "cluster.html", me, c=doc, banks=views.bank_entries_for(settings, doc))

    @app.post("/clusters/{cluster_id}/verdict", include_in_schema=False)
    async def cluster_verdict_form(cluster_id: str, verdict: str = Form(...), note: str = Form(""),
                                   who: Principal = Depends(editor_form)):
        try:
            body = VerdictIn(verdict=verdict, note=note)
        except ValidationError as e:
            raise _error(422, f"bad verdict: {e.errors()[0]['msg']}") from None
        await _record(cluster_id, body, who)
        return RedirectResponse(f"/clusters/{quote(cluster_id)}#history", 303)

    @app.get("/accounts", response_class=HTMLResponse, include_in_schema=False)
    def accounts_page(request: Request, q: AccountQuery = Depends(account_query), me: Principal = Depends(reader)):
        rows, nxt = desk.source.accounts_page(q)
        return page(request, "accounts.html", me, rows=rows, query=q,
                    next_url=accounts_link("/accounts", q, nxt) if nxt else None,
                    first_url=accounts_link("/accounts", q, None) if q.cursor else None)

    @app.get("/accounts/{account_id:path}", response_class=HTMLResponse, include_in_schema=False)
    def account_page(request: Request, account_id: str, me: Principal = Depends(reader)):
        try:
            a = desk.source.account(account_id)
        except NotFound:
            raise _error(404, f"no account {account_id!r}") from None
        return page(request, "account.html", me, a=a)

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request, q: StoreQuery = Depends(store_query),
                    desk_verdict: Optional[str] = Depends(desk_verdict_query), me: Principal = Depends(reader)):
        asked = q != StoreQuery(limit=q.limit) or desk_verdict is not None
        rows, cut = searched(q, desk_verdict) if asked else ([], False)
        # A search is one ranked answer of up to MAX_RESULTS (the store's result window): a cut one
        # offers the same search with a larger limit, not a cursor (its relevance rank is the store's).
        more = min(q.max_results * 10, MAX_RESULTS) if cut and q.max_results < MAX_RESULTS else None
        return page(request, "search.html", me, rows=rows, asked=asked, cut=cut, spread=desk.source.spread(rows),
                    form=search_form(q, desk_verdict),
                    desk_verdict=desk_verdict, desk_verdicts=SEARCH_DESK_VERDICTS,
                    more_url=search_link(q, desk_verdict, more) if more else None)

    @app.get("/similar", response_class=HTMLResponse, include_in_schema=False)
    def similar_page(request: Request, me: Principal = Depends(reader)):
        return page(request, "similar.html", me, found=None, error=None, max_bytes=settings.fetch.max_bytes)

    @app.post("/similar", response_class=HTMLResponse, include_in_schema=False)
    async def similar_form(request: Request, image: UploadFile = File(...), me: Principal = Depends(reader_form)):
        try:
            found = await _lookup(image, preview=True)
        except Rejected as e:
            resp = page(request, "similar.html", me, found=None, error=str(e), max_bytes=settings.fetch.max_bytes)
            resp.status_code = e.status
            return resp
        # bank entries shown only if members
        members = {r["sha256"] for r in found.rows if r.get("sha256") and "cluster_id" not in r
                   and await run_in_threadpool(desk.source.may_show, r["sha256"])}
        return page(request, "similar.html", me, found=found, error=None, max_bytes=settings.fetch.max_bytes,
                    filename=image.filename or "", members=members)

    @app.get("/banks", response_class=HTMLResponse, include_in_schema=False)
    def banks_page(request: Request, me: Principal = Depends(reader)):
        return page(request, "banks.html", me, banks=views.banks(settings), entries=views.desk_entries(settings))

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/"):
        # A token the browser already holds is kept: a new one would replace
        # the cookie, and the login form of another open tab would then fail.
        token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not _LOGIN_TOKEN.fullmatch(token):
            token = secrets.token_urlsafe(24)
        # Said before a password is typed: a login over plain http off loopback
        # cannot work. Not where TLS is configured (a TLS terminator that adds
        # no header looks like plain http here): a refused login says it then.
        notice = None if desk.tls_configured else desk.why_no_login_cookie(request)
        resp = templates.TemplateResponse(request, "login.html", {"me": None, "csrf": token, "next": _safe_next(next),
                                                                   "error": notice, "has_users": len(desk.users) > 0})
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, **desk.cookie_attrs(request))
        return resp

    @app.post("/login", include_in_schema=False)
    def login(request: Request, username: str = Form(..., max_length=64), password: str = Form(..., max_length=1024),
              next: str = Form("/"), expected: str = Depends(login_form_csrf)):
        client = request.client.host if request.client else "unknown"
        wait, stamp = desk.limiter.attempt(client, username)
        if stamp is None:
            observe.LOGINS.labels("rate_limited").inc()
            raise HTTPException(429, f"too many failed logins; try again in {int(wait) + 1} s",
                                headers={"Retry-After": str(int(wait) + 1)})
        user = desk.users.check(username, password)
        if user is None:
            observe.LOGINS.labels("failed").inc()
            log.warning("desk login failed", extra={"user": username, "client": client})
            # The form again with the same token: a new one would set a new
            # cookie, and a login form open in another tab (or a second try
            # already on its way) would then fail its CSRF check.
            return templates.TemplateResponse(request, "login.html", {"me": None, "csrf": expected, "next": _safe_next(next),
                                                                       "error": "wrong user name or password",
                                                                       "has_users": True}, status_code=401)
        desk.limiter.succeeded(stamp, client, username)
        # The session the browser held until now ends here, not only its cookie:
        # a copy of it (another user's, a shared machine's) must not outlive this login.
        presented = request.cookies.get(SESSION_COOKIE)
        if presented:
            desk.db.end_session(presented)
        token, _ = desk.db.new_session(user.name, user.role, settings.desk.session_hours, credential_of(user))
        observe.LOGINS.labels("ok").inc()
        resp = RedirectResponse(_safe_next(next), 303)
        resp.set_cookie(SESSION_COOKIE, token, max_age=int(settings.desk.session_hours * 3600),
                        **desk.cookie_attrs(request))
        resp.delete_cookie(LOGIN_CSRF_COOKIE, **desk.cookie_attrs(request))
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, me: Principal = Depends(reader_form)):
        if me.via == "session":
            desk.db.end_session(request.cookies.get(SESSION_COOKIE, ""))
        resp = RedirectResponse("/", 303)
        resp.delete_cookie(SESSION_COOKIE, **desk.cookie_attrs(request))
        return resp

    return app


def _problem(err: dict[str, Any]) -> str:
    """One validation error as ``field: message``; the field is the parameter's
    name, or ``body`` when the body as a whole is wrong (not JSON, not an object)."""
    if err.get("type") == "json_invalid":
        return f"body: not valid JSON ({err.get('ctx', {}).get('error', err['msg'])} at character {err['loc'][-1]})"
    field = ".".join(str(x) for x in err["loc"] if x not in ("query", "body", "path"))
    return f"{field or err['loc'][0]}: {err['msg']}"


def _same_token(presented: str | None, expected: str | None) -> bool:
    if not (presented and expected):
        return False
    # Bytes: compare_digest raises TypeError (a 500) on a str with non-ASCII characters.
    return secrets.compare_digest(presented.encode(errors="replace"), expected.encode(errors="replace"))


_LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")  # what secrets.token_urlsafe(24) makes


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8080`` -> ``[::1]``."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _says_https(request: Request) -> bool:
    """Whether a proxy's header says the client's request came over https
    (``X-Forwarded-Proto: https`` or ``Forwarded: proto=https``), believed or not."""
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    forwarded = request.headers.get("forwarded", "").lower().replace(" ", "").replace('"', "")
    return proto == "https" or any(p == "proto=https" for p in re.split(r"[;,]", forwarded))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _inline_script_hash(page: bytes) -> str:
    """The CSP source that allows the page's one inline script and no other."""
    body = re.search(rb"<script>(.*?)</script>", page, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"


def _same_origin(origin: str, host: str) -> bool:
    """Whether a request's Origin header names the desk it was sent to (its
    Host header)."""
    scheme, sep, netloc = origin.partition("://")
    return bool(sep and host) and scheme in ("http", "https") and netloc.lower() == host.lower()


class _SearchStopped(HTTPException):
    """The 503 of a search the store stopped (``SearchTimeout``): the page
    it was asked from shows it (``page_with_error``)."""


def _return_to(request: Request) -> str:
    """Where a login started from ``request`` comes back to: the page, with
    its query (a search's words and filters), as sent; for a form posted from
    a page (a verdict, a picture lookup, a logout), that page, whose GET is
    not the form's address (``/clusters/{id}/verdict`` -> ``/clusters/{id}``);
    from the login page, where it already leads."""
    if request.url.path == "/login":
        return _safe_next(request.query_params.get("next", "/"))
    raw = request.scope.get("raw_path")  # as sent: a cluster id may hold an escaped "/" or "?"
    path = raw.decode("latin-1") if raw else quote(request.url.path)
    if request.method not in SAFE_METHODS:
        return "/" if path == "/logout" else path.removesuffix("/verdict")
    return path + ("?" + request.url.query if request.url.query else "")


def _login_url(target: str) -> str:
    """The login page, back to ``target`` (a path and query of the desk) after."""
    return "/login?next=" + quote(target, safe="/")


def _safe_next(target: str) -> str:
    # Only same-site paths: "//evil.example" or "https://..." would be an open redirect.
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


async def _account_loop(desk: Desk) -> None:
    while True:
        desk.account_check = asyncio.ensure_future(check_accounts(desk.settings, desk.source, desk.db, desk.alerts))
        try:
            await asyncio.shield(desk.account_check)  # shutdown waits for it instead (see lifespan)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("account alert check failed")
        await asyncio.sleep(desk.settings.desk.account_check_s)
