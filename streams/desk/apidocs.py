"""The desk's API docs: its OpenAPI schema and Swagger UI page.

They are routes of their own here: behind the reader guard, with
Swagger UI from the installed wheel. FastAPI's would load a CDN's script into
the desk's origin, and be open when reading is not.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
from pathlib import Path

from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from streams.desk.auth import Principal
from streams.desk.guards import DeskRoute, reader

DOCS_PATH, OPENAPI_PATH, SWAGGER_ASSETS = "/docs", "/openapi.json", "/docs/assets"
# Swagger UI 5 (the fastapi-swagger wheel's copy; 4.x cannot read the OpenAPI
# 3.1 that FastAPI writes): the files the docs page loads, and no others.
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                 "favicon-32x32.png": "image/png"}

router = APIRouter(route_class=DeskRoute)


def _inline_script_hash(page: bytes) -> str:
    """The CSP source that allows the page's one inline script and no other."""
    body = re.search(rb"<script>(.*?)</script>", page, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"


DOCS_PAGE = get_swagger_ui_html(openapi_url=OPENAPI_PATH, title="deepwatch desk API",
                                swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
                                swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
                                swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
                                swagger_ui_parameters={"validatorUrl": None}).body
# FastAPI's page names no language (a screen reader guesses its voice), and Swagger UI's badges and links fail
# contrast: the desk's own stylesheet after Swagger's darkens them (static/docs.css). Before the script's hash.
DOCS_PAGE = DOCS_PAGE.replace(b"<html>", b'<html lang="en">', 1).replace(
    b"</title>", b'</title>\n    <link type="text/css" rel="stylesheet" href="/static/docs.css">', 1)
DOCS_SCRIPT = _inline_script_hash(DOCS_PAGE)  # the docs page's Content-Security-Policy allows it
SWAGGER_DIR = Path(importlib.util.find_spec("fastapi_swagger.resources").origin).parent


# How the API is called with a token (docs/desk.md, "Who may do what"): declared
# in the schema, so that /docs offers "Authorize" and its "Try it out" sends the
# token. Without it the page had no way to send one: every write tried from it
# was a 401 (or a 403 for want of a CSRF header, from a logged-in browser).
BEARER_SCHEME = {"type": "http", "scheme": "bearer",
                 "description": "a token from DEEPWATCH_DESK_TOKENS (role:name:token), sent as "
                                "`Authorization: Bearer <token>`; an editor's token may record verdicts"}
AUTH_NOTE = ("Reading is open to this machine when the desk listens on loopback, and needs a viewer "
             "otherwise; recording a verdict always needs an editor. Scripts send a token from "
             "DEEPWATCH_DESK_TOKENS as `Authorization: Bearer <token>` (\"Authorize\" on this page sends it with "
             "\"Try it out\"). Errors are `{\"error\": \"...\", \"status\": N}`; lists page by `X-Next-Cursor`.")


class ErrorItem(BaseModel):
    """One thing wrong with a request: where, and what, in a sentence."""

    loc: list[Union[str, int]] = Field(description='where: `["query", "limit"]`, `["body", "verdict"]`, `["body"]`')
    msg: str = Field(description="what is wrong with it, in words")


class DeskError(BaseModel):
    """Every error of the API and of ``/thumb`` (``errors.http_error``)."""

    error: str = Field(description="what went wrong and, where there is one, what to do about it")
    status: int = Field(description="the HTTP status, again")
    reason: Optional[str] = Field(None, description="`POST /api/similar` only: why the upload is not a picture "
                                                    "the desk looks up (`undecodable`, `too_large`, `busy`...)")


class DeskValidationError(BaseModel):
    """A 422: bad filters or body (``errors.bad_request``). A 422 the desk
    raises itself (a search with no condition, a ``members_after`` that is
    none of the cluster's members) has no ``detail``."""

    error: str = Field(description="`bad request: ` and each problem as `field: what is wrong`")
    status: int = Field(description="422")
    detail: list[ErrorItem] = Field(default_factory=list, description="each problem, by field")


# What each status means on the desk's API (docs/desk.md, the table's errors).
ERRORS: dict[int, str] = {
    400: "a body the JSON parser gives up on (nested thousands deep, bytes that are not UTF-8)",
    401: "a login or a bearer token is needed: the error says why (`WWW-Authenticate: Bearer`)",
    403: "refused: the role does not allow it, a CSRF token is missing or wrong, or the request came from another "
         "site",
    404: "no such cluster, account or member",
    409: "a verdict on a merged-away cluster: give it on the cluster it merged into",
    413: "the request body is too large (64 KiB; a picture: fetch.max_bytes)",
    422: "bad filters or body; `detail` names each field",
    503: "the findings store is not answering, or a search ran past findings.search_timeout_s; try again after "
         "`Retry-After` where it is sent",
}


def error_responses(*codes: int, models: dict[int, Any] | None = None,
                    **described: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route of the API: the desk's error shape
    (``DeskError``; a 422, ``DeskValidationError``; else as ``models`` says
    for a code) for each of ``codes``, described as ``ERRORS`` says or as
    ``described`` (``e413=...``) words it for this route. The 422 replaces
    FastAPI's own, which documents a body (``{"detail": [{"loc", "msg",
    "type"}]}``) the desk never sends."""
    default = {422: DeskValidationError}
    return {code: {"model": (models or {}).get(code, default.get(code, DeskError)),
                   "description": described.get(f"e{code}", ERRORS[code])} for code in codes}


# Every reading route: a login needed (401), refused (403), bad filters (a query with a control character
# too: 422), the store not answering (503).
READ_ERRORS = (401, 403, 422, 503)


def schema_with_auth(schema: dict) -> dict:
    """The app's OpenAPI schema saying how to authenticate: the bearer scheme,
    optional for every operation (``{}``: no credential, as on an open
    loopback desk), and the rules after the API's own description."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = BEARER_SCHEME
    schema["security"] = [{"bearer": []}, {}]
    info = schema.setdefault("info", {})
    # after the app's own description (what the API is), not instead of it
    info["description"] = f"{info.get('description') or ''}\n\n{AUTH_NOTE}".strip()
    return schema


@router.get(OPENAPI_PATH, include_in_schema=False)
def openapi(request: Request, _: Principal = Depends(reader)) -> JSONResponse:
    return JSONResponse(schema_with_auth(request.app.openapi()))


@router.get(DOCS_PATH, include_in_schema=False)
def docs(_: Principal = Depends(reader)) -> HTMLResponse:
    return HTMLResponse(DOCS_PAGE)


@router.get(SWAGGER_ASSETS + "/{name}", include_in_schema=False)
def docs_asset(name: str) -> FileResponse:
    # Swagger UI's own public files: no findings in them, no login needed
    if name not in SWAGGER_FILES:
        raise HTTPException(404, f"no docs asset {name!r}")
    return FileResponse(SWAGGER_DIR / name, media_type=SWAGGER_FILES[name],
                        headers={"Cache-Control": "public, max-age=86400"})
