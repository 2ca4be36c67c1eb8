"""What every answer of the desk carries: errors in the desk's own shape (a
JSON error for the API and thumbnails, a page or a login for a browser),
and the security headers (``security_headers``)."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote_plus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException

from streams.desk.auth import Principal
from streams.desk.guards import bearer, principal, reader
from streams.desk.apidocs import DOCS_PATH, DOCS_SCRIPT, OPENAPI_PATH
from streams.desk.pages import LoginRefused, login_url, page_with_error, return_to
from streams.desk.state import desk_of
from streams.cluster_search import SearchTimeout
from streams.desk.verdicts import VerdictEffectsFailed
from streams.store_errors import may_pass

log = logging.getLogger(__name__)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
STORE_UNAVAILABLE = ("the findings store is not answering for now (restarting, overloaded or unreachable); "
                     "try again in a minute. The desk's log has the store's error")
STORE_RETRY_AFTER_S = 30
# The forms a since/until takes, as the filters' placeholders and the pages' own times show them.
TIME_EXAMPLES = "2026-11-20, 2026-11-20 10:05 or 2026-11-20T10:05:00+01:00 (UTC unless an offset is given)"


class _SearchStopped(HTTPException):
    """The 503 of a search the store stopped (``SearchTimeout``): the page
    it was asked from shows it (``page_with_error``)."""


def known(request: Request) -> Principal | None:
    """Who an error page is for, so its header does not show a logged-in
    editor as logged out, nor an open loopback desk's reader as one who must
    log in (``reader``: "read-only (loopback)", as on every other page);
    None where that is itself the error."""
    try:
        return principal(request) or reader(request)
    except HTTPException:
        return None


def error_page(request: Request, status: int, message: str, headers: dict[str, str] | None = None,
               next_page: str | None = None):
    """The error page: the message, and a link back: from the login, to the
    login form (then on to ``next_page``, where the login was going: a
    lockout's 429 led to the queue, away from the form to try again at),
    else to the queue."""
    back = (login_url(next_page or return_to(request)), "back to the login form") \
        if request.url.path == "/login" else ("/", "back to the queue")
    return desk_of(request).templates.TemplateResponse(
        request, "error.html", {"status": status, "message": message, "me": known(request), "back": back},
        status_code=status, headers=headers)


def wants_json(request: Request) -> bool:
    # "/api" itself too: a script that dropped the slash got the HTML 404 page.
    path = request.url.path
    return path.startswith(("/api/", "/thumb/")) or path in ("/api", "/thumb", OPENAPI_PATH)


async def http_error(request: Request, exc: HTTPException):
    # The exception's own headers stay: Allow on a 405, Retry-After on a 429.
    headers = dict(exc.headers or {})
    if wants_json(request):
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found" and request.url.path.startswith("/api"):
            # the router's own words for a path no route has: an analyst who typed /api got "Not Found" alone
            detail = f"no API route {request.url.path}; the routes are listed at {DOCS_PATH} ({OPENAPI_PATH})"
        return JSONResponse({"error": detail, "status": exc.status_code}, exc.status_code, headers=headers)
    # A page (or a form posted from one: a session that expired before an
    # editor pressed Record) goes to the login and back; a script with a
    # bearer token gets the 401 it can act on.
    if exc.status_code == 401 and (request.method == "GET" or bearer(request) is None):
        return RedirectResponse(login_url(return_to(request)), 303)
    if isinstance(exc, _SearchStopped):
        shown = page_with_error(request, exc.status_code, exc.detail)
        if shown is not None:
            return shown
    return error_page(request, exc.status_code, exc.detail, headers,
                      exc.next_page if isinstance(exc, LoginRefused) else None)


async def search_timeout(request: Request, exc: SearchTimeout):
    # The store stopped the search (findings.search_timeout_s): the worker thread is free again.
    return await http_error(request, _SearchStopped(
        503, f"search took longer than {desk_of(request).settings.findings.search_timeout_s:g} s and was stopped; "
             "narrow it with since/until/platform (or account, hashtag)"))


async def bad_request(request: Request, exc: RequestValidationError):
    errors = _distinct(exc.errors())
    msg = "bad request: " + "; ".join(_problem(e) for e in errors)
    if wants_json(request):
        return JSONResponse({"error": msg, "status": 422, "detail": [
            {"loc": list(e["loc"]), "msg": _words(e)} for e in errors]}, 422)
    shown = page_with_error(request, 422, msg)
    if shown is not None:
        return shown
    return error_page(request, 422, msg)


def _distinct(errors: Any) -> list[dict[str, Any]]:
    """``errors`` without repeats: a parameter two of a route's dependencies
    read (``/search``'s ``limit``) was checked, and its problem told, twice."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for e in errors:
        key = (tuple(e["loc"]), e.get("type"), e.get("msg"))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _problem(err: dict[str, Any]) -> str:
    """One validation error as ``field: message``; the field is the parameter's
    name, or ``body`` when the body as a whole is wrong (not JSON, not an object)."""
    if err.get("type") == "json_invalid":
        return f"body: not valid JSON ({err.get('ctx', {}).get('error', err['msg'])} at character {err['loc'][-1]})"
    field = ".".join(str(x) for x in err["loc"] if x not in ("query", "body", "path")) or str(err["loc"][0])
    words = _words(err)
    # a validator's sentence that names its field ("verdict must be one of ...") names it once, before the colon
    return f"{field}: {words.removeprefix(field + ' ') if words.startswith(field + ' must ') else words}"


# What a pattern a parameter must match is, in words (pydantic gave the regex itself).
PATTERN_WORDS = {"^[0-9a-f]{64}$": "a sha256 (64 characters, 0-9 and a-f)"}
# pydantic's prefixes before a validator's own sentence
_PREFIXES = ("Value error, ", "Assertion failed, ")


def _words(err: dict[str, Any]) -> str:
    """What is wrong with one field, in a sentence for people: pydantic's
    words where they say it (``Field required``), else the validator's own
    sentence without pydantic's ``Value error,`` before it, and for a number,
    a pattern, a choice or a time what was sent and what would do."""
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    sent = repr(str(err.get("input"))[:64])
    if kind.startswith(("datetime_", "date_")):
        # pydantic's words ("input is too short") said neither what was sent nor what would do
        return f"{sent} is not a date or time; write it as {TIME_EXAMPLES}"
    if kind == "int_parsing":
        return f"{sent} is not a whole number"
    if kind == "float_parsing":
        return f"{sent} is not a number"
    if kind == "string_pattern_mismatch":
        return f"{sent} is not {PATTERN_WORDS.get(str(ctx.get('pattern')), 'in the form this field takes')}"
    if kind in ("literal_error", "enum") and "expected" in ctx:
        return f"{sent} is not one of {ctx['expected']}"
    bounds = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
              "greater_than": ("more than", "gt"), "less_than": ("less than", "lt")}
    if kind in bounds and bounds[kind][1] in ctx:
        return f"must be {bounds[kind][0]} {ctx[bounds[kind][1]]} ({sent} was sent)"
    msg = str(err.get("msg", ""))
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


async def security_headers(request: Request, call_next):
    """HTTP middleware: the desk's security and cache headers on every
    answer, an error's too (it answers an unexpected one itself)."""
    if _CONTROL.search(unquote_plus(request.url.query)):
        # SQLite would read a NUL as the end of a LIKE pattern, which then
        # matches everything; no filter of the desk needs a control character.
        resp = await http_error(request, HTTPException(422, "bad request: query parameters must not contain "
                                                            "control characters"))
    else:
        try:
            resp = await call_next(request)
        except Exception as e:
            # Answered here, not by Starlette's last-resort handler, so that
            # the answer has the headers below and the desk's own shape.
            if isinstance(e, VerdictEffectsFailed):
                # Recorded, then the rest failed: no Retry-After (a client would send it again,
                # a second verdict in the audit trail); say what happened instead
                passing = may_pass(e.__cause__)
                log.error("verdict recorded; carrying out its effects failed", exc_info=e.__cause__,
                          extra={"path": request.url.path, "verdict_id": e.verdict_id})
                resp = await http_error(request, HTTPException(503 if passing else 500, (
                    f"verdict {e.verdict_id} was recorded, but carrying out what it means (banks, the desk's view, "
                    "alerts) failed" + (": the findings store is not answering" if passing else "") +
                    ". Give the verdict again once the desk answers (the audit trail will show both); "
                    "the desk's log has the details")))
            elif may_pass(e):
                # The findings store cannot answer for now (Elasticsearch down,
                # overloaded or missing shards; SQLite locked past its timeout):
                # a 500 "internal error" sent people looking for a desk bug and
                # told scripts not to try again. Nothing was recorded (a verdict
                # that was raises VerdictEffectsFailed, above).
                log.warning("desk request failed: the findings store is not answering",
                            extra={"path": request.url.path, "error": str(e)[:500]})
                resp = await http_error(request, HTTPException(
                    503, STORE_UNAVAILABLE, headers={"Retry-After": str(STORE_RETRY_AFTER_S)}))
            else:
                log.exception("desk request failed", extra={"path": request.url.path})
                resp = await http_error(request, HTTPException(500, "internal error; the desk's log has the details"))
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'self'; img-src 'self' data:; script-src 'self' {DOCS_SCRIPT}; style-src 'self'; "
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
    if desk_of(request).secure(request):
        resp.headers["Strict-Transport-Security"] = "max-age=31536000"
    return resp
