"""Prometheus metrics of the desk (``deepwatch serve``): requests, verdicts, logins, picture lookups.

They are served on ``metrics_port`` by ``streams.metrics.serve``, as the
workers' are, and not on the desk's own port. That port may face the newsroom
through a proxy, while metrics are for the operator's Prometheus.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, get_args

from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from streams.desk.deskdb import DeskVerdict

REQUESTS = Counter("deepwatch_desk_requests_total", "Desk HTTP requests, by route template, method and status",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram("deepwatch_desk_request_seconds", "Desk request time, by route template", ["route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
VERDICTS = Counter("deepwatch_desk_verdicts_total", "Verdicts recorded at the desk, by verdict", ["verdict"])
LOGINS = Counter("deepwatch_desk_logins_total", "Desk login attempts, by outcome (ok, failed, rate_limited, busy: too many checks waiting)",
                 ["outcome"])
LOOKUPS = Counter("deepwatch_desk_lookups_total",
                  "Picture lookups at the desk (POST /api/similar, the Find a picture page), by outcome: seen (a "
                  "cluster shows it), banked (only bank entries do), not_seen, rejected (not a picture it reads)",
                  ["outcome"])
LOOKUP_OUTCOMES = ("seen", "banked", "not_seen", "rejected")
# At 0 from the start, so the first verdict or failed login is an increase a rule can see.
for _verdict in get_args(DeskVerdict):
    VERDICTS.labels(_verdict)
for _outcome in ("ok", "failed", "rate_limited", "busy"):
    LOGINS.labels(_outcome)
for _outcome in LOOKUP_OUTCOMES:
    LOOKUPS.labels(_outcome)


def route_of(scope: dict[str, Any]) -> str:
    """The matched route's template (``/clusters/{cluster_id}``), never the
    raw path: ids in label values would grow the series without bound."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


# The methods the desk answers, and what a client may send besides (HEAD,
# OPTIONS, ...). Any other name a client sends is counted as OTHER: a raw
# method in a label value (the server takes any token, ~12 KB long) would
# add series without bound, before any authentication.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_of(request: Request) -> str:
    return request.method if request.method in METHODS else "OTHER"


async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """HTTP middleware: count and time every request by route and status."""
    started = time.perf_counter()
    status = 500  # what the client gets when a handler raises past the exception handlers
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = route_of(request.scope)
        REQUESTS.labels(route, method_of(request), str(status)).inc()
        REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
