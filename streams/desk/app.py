"""The desk's FastAPI application: ``create_app`` puts it together.

``create_app(settings, host)`` builds it; ``host`` is the address the server
binds, which decides whether reading is open (loopback) or needs a login. Open
reading is for requests from this machine only: never one through a reverse
proxy (``desk.trusted_proxies`` set, or proxy headers on the request), nor one
from another address (``Desk.why_login``).

Its parts, each a module of its own: the per-app state (``state.Desk``, on
``app.state.desk``), the guards (``guards``), the query parameters
(``queries``), the JSON API (``api``), the pages (``pages``), the API docs
(``apidocs``), the errors and security headers (``errors``) and the request
bounds (``limits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from detectors.imagedata import ignore_pillow_warnings
from streams import metrics
from streams.desk import api, apidocs, errors, observe, pages
from streams.desk.accounts import check_accounts
from streams.desk.guards import DeskRoute
from streams.desk.limits import MAX_BODY_BYTES, UPLOAD_PATHS, BodyLimit, Slots
from streams.desk.lookup import lookup, upload_bound
from streams.desk.state import Desk, tls_configured
from streams.cluster_search import SearchTimeout
from streams.findings import FindingsStore, open_findings
from streams.settings import Settings

__all__ = ["create_app", "tls_configured"]  # streams.cli.serve imports tls_configured from here

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
# Picture lookups in flight at once, counted from when their guards pass,
# before their uploads are read. Each holds its upload whole (up to
# fetch.max_bytes, 25 MiB by default) until it is answered, and waits for the
# decode memory budget and a worker thread; past about two a core more of them
# add memory, not answers (48 uploads of 23 MiB at once took the desk to
# 1.8 GiB). One over this is answered 503 with Retry-After, not queued: a
# queued upload would hold its connection and, once read, its bytes.
MAX_LOOKUPS = max(2, 2 * (os.cpu_count() or 1))
LOOKUP_RETRY_S = 2


def create_app(settings: Settings, host: str = "127.0.0.1", store_url: str | None = None) -> FastAPI:
    """The desk over the findings in ``settings.data_dir`` (or ``store_url``:
    ``sqlite:///PATH`` or an Elasticsearch ``es://HOST:9200``); raises
    FileNotFoundError/ValueError with a message fit for the command line."""
    if store_url:
        # Desk alerts go through the sinks: make them write to the store the desk reads.
        settings = settings.model_copy(deep=True)
        settings.findings.url = store_url
    ignore_pillow_warnings()  # thumbnails and lookups decode in the threadpool, at once
    # MAX_LOOKUPS and lookup are read from this module when the app is made: a test swaps either here.
    desk = Desk(settings, host, _open_store(settings), lookups=Slots(MAX_LOOKUPS, "picture lookups", LOOKUP_RETRY_S),
                picture_lookup=lookup, templates=pages.templates())

    # The API docs are routes of their own (``apidocs``), so FastAPI's are off.
    # Trailing-slash redirects are off: Starlette builds them from the Host
    # header, a redirect to wherever a client says the desk is.
    app = FastAPI(title="deepwatch desk", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False,
                  description="Fact-check desk: the queue of image clusters, evidence, verdicts and accounts.")
    app.state.desk = desk
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.router.route_class = DeskRoute  # every route runs its guards before its body is read

    app.add_exception_handler(HTTPException, errors.http_error)
    app.add_exception_handler(SearchTimeout, errors.search_timeout)
    app.add_exception_handler(RequestValidationError, errors.bad_request)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES,  # innermost: its 413 gets the headers below
                       paths={p: upload_bound(settings) for p in UPLOAD_PATHS})
    app.middleware("http")(errors.security_headers)
    app.middleware("http")(observe.observe)  # it also counts what the inner layers answered
    app.add_middleware(HeadAsGet)  # outermost: every layer sees (and counts) the GET; the server sends no body

    # In this order: a route is matched in the order it was added.
    app.include_router(apidocs.router)

    @app.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)  # uptime checkers send HEAD
    def healthz() -> dict[str, str]:
        # For liveness and readiness probes: open, like the probes that call it.
        return {"status": "ok"}

    app.include_router(api.router)
    app.include_router(api.pictures(settings.desk.thumb_px))
    app.include_router(pages.router)
    return app


class HeadAsGet:
    """ASGI middleware: a HEAD answered as its GET would be, without the body.
    A server that answers GET answers HEAD (RFC 9110, 9.1); the desk's routes
    are GET only, so an uptime checker's or a link checker's HEAD of a page
    or of /api/clusters got 405. The routes, guards included, run as for the
    GET (a login-only page still redirects). The server keeps its own scope,
    which still says HEAD, so it sends no body either way."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    desk: Desk = app.state.desk
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
