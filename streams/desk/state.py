"""What one running desk holds: ``Desk``, built once per app by
``create_app`` and kept on ``app.state.desk``; a route, guard or handler
reaches it from its request with ``desk_of``."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from fastapi import Request
from fastapi.templating import Jinja2Templates

from detectors.netaddr import is_loopback
from streams import similar
from streams.blobstore import blob_dir
from streams.desk.alerting import AlertPath
from streams.desk.auth import LoginLimiter, Users, tokens_from_env
from streams.desk.deskdb import DeskDB
from streams.desk.limits import Slots
from streams.desk.lookup import Lookup
from streams.desk.source import FindingsSource
from streams.desk.thumbs import SIZES as THUMB_SIZES, Thumbnails
from streams.desk.verdicts import Verdicts
from streams.findings import FindingsStore
from streams.settings import Settings

log = logging.getLogger(__name__)
# Password checks at once (``Desk.password_checks``): more than the cores add memory (32 MiB each), not
# answers, and four already check some 20-40 passwords a second.
PASSWORD_CHECKS = min(4, max(2, os.cpu_count() or 1))
# Logins waiting for a password check, beyond which a login is answered 503 at once: the pool's queue has
# no bound of its own, and guesses from many addresses (the rate limit counts per address and name) arriving
# faster than 20-40 a second would queue without end, an editor's own login behind them.
MAX_WAITING_LOGINS = 32
# Headers a reverse proxy adds: a request carrying any of them is not read
# without a login, whether or not the proxy is one the desk trusts.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip")


class Desk:
    """Everything one running desk holds, built once per app.

    ``lookups`` bounds the picture lookups in flight, ``picture_lookup`` is
    the lookup itself (``streams.desk.lookup.lookup``) and ``templates`` the
    pages' templates: ``create_app`` makes all three."""

    def __init__(self, settings: Settings, host: str, store: FindingsStore, *, lookups: Slots,
                 picture_lookup: Callable[..., Lookup], templates: Jinja2Templates):
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
        self.public_https = (settings.desk.public_url or "").lower().startswith("https:")
        self.secure_cookies = not loopback or self.public_https
        self.tls_configured = tls_configured(settings.desk)
        self.lookups = lookups
        self.picture_lookup = picture_lookup
        self.templates = templates
        self.db = DeskDB(data / "desk.sqlite")
        self.source = FindingsSource(store, self.db, search_timeout_s=settings.findings.search_timeout_s,
                                     view_days=settings.desk.view_days,
                                     max_view_clusters=settings.desk.max_view_clusters)
        self.users = Users(settings.desk.users_file or data / "desk-users.json")
        len(self.users)  # a broken users file stops the start with its reason
        self.tokens = tokens_from_env(settings.desk.tokens_env)
        self.limiter = LoginLimiter(settings.desk.login_failures_per_minute)
        # Password checks (scrypt: 32 MiB and ~0.1 s of a core each) run here, a few at a time, not in the
        # request threads: 19 wrong logins at once from one address took the desk from 120 MB to 666 MB and
        # held as many of the 40 threads every page needs (from many addresses: all of them). The rest wait
        # their turn without a thread.
        self.password_checks = ThreadPoolExecutor(max_workers=PASSWORD_CHECKS, thread_name_prefix="desk-password")
        self.logins_waiting = 0  # on the event loop only: checks in the pool or queued for it
        self.alerts = AlertPath(settings)
        self.verdicts = Verdicts(settings, self.source, self.db, self.alerts)
        self.account_check: asyncio.Future | None = None  # the timer's check in flight, if any
        self.thumbs = Thumbnails(blob_dir(data), data / "desk" / "thumbs",
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
        through) or the cookie could have been kept. A proxy saying its
        client elsewhere came over plain http is refused on loopback too
        (``plain_http_through_proxy``)."""
        proxied = self.plain_http_through_proxy(request)
        if proxied:
            return proxied
        if self.loopback or request.url.scheme == "https" or _says_https(request):
            return None
        if is_loopback(host_name(request.headers.get("host", ""))):
            return None
        return ("this desk needs HTTPS off loopback: it listens on a non-loopback address, where its login cookie "
                "is Secure, and this page came over plain http, where browsers do not keep Secure cookies, so no "
                "browser can log in. Put a TLS-terminating reverse proxy in front of the desk, list the proxy's "
                "address in desk.trusted_proxies (its X-Forwarded-Proto: https is then believed) and set "
                "desk.public_url to the https address people use; or run the desk on a loopback address "
                "(--host 127.0.0.1) to use it from this machine only")

    def plain_http_through_proxy(self, request: Request) -> str | None:
        """Why no login is taken over this request although the desk may
        be on loopback: a proxy says, in ``X-Forwarded-Proto: http`` (or
        ``Forwarded: proto=http``), that its client reached it over plain
        http, and that client is elsewhere (not a loopback address after a
        trusted proxy's X-Forwarded-For, which uvicorn applies): the password
        and the session cookie would cross the network in clear. None
        otherwise: over https, without such a header (a TLS terminator that
        adds none cannot be told from plain http), for a client on this
        machine (or a test harness's, which is no IP address), or where
        ``desk.public_url`` is https: people reach the desk over https and its
        cookies are Secure (no browser sends them over plain http), so the
        http the proxy names is a hop behind the TLS terminator (a load
        balancer in front of nginx, whose ``$scheme`` says http).
        Where cookies are Secure anyway (bound off loopback),
        ``why_no_login_cookie`` says the rest."""
        if request.url.scheme == "https" or not _says_http(request) or self.public_https:
            return None
        client = request.client.host if request.client else ""
        if not _is_ip(client) or is_loopback(client):
            return None
        return ("this desk needs HTTPS off loopback: the reverse proxy in front of it says this request came from "
                f"{client} over plain http (X-Forwarded-Proto: http), where the password and the session cookie "
                "would cross the network in clear, so the desk takes no login over it. Serve https at the proxy "
                "(listed in desk.trusted_proxies, whose X-Forwarded-Proto: https is then believed) and set "
                "desk.public_url to the https address people use (where TLS ends at a load balancer before "
                "this proxy, that setting is what tells the desk so); or use the desk from this machine only "
                "(--host 127.0.0.1, no proxy)")

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
        self.password_checks.shutdown(wait=False, cancel_futures=True)


def desk_of(request: Request) -> Desk:
    """The desk ``request`` came to."""
    return request.app.state.desk


def tls_configured(desk: Any) -> bool:
    """Whether the desk settings (``DeskSettings``) say a TLS-terminating
    proxy is in front: ``desk.trusted_proxies`` (whose X-Forwarded-Proto
    says https), or an https ``desk.public_url`` (where people reach it).
    Without either, a desk bound off loopback speaks plain http to browsers,
    which then keep none of its Secure cookies (``deepwatch serve`` warns)."""
    return bool(desk.trusted_proxies) or (desk.public_url or "").lower().startswith("https:")


def host_name(host: str) -> str:
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


def _says_http(request: Request) -> bool:
    """Whether a proxy's header says the client's request came over plain
    http (``X-Forwarded-Proto: http`` or ``Forwarded: proto=http``; the
    first proxy's word where several are listed), believed or not."""
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    forwarded = request.headers.get("forwarded", "").lower().replace(" ", "").replace('"', "")
    first = forwarded.split(",")[0]
    return proto == "http" or (not proto and any(p == "proto=http" for p in first.split(";")))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
