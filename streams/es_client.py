"""Connecting to Elasticsearch: the address, TLS options and credentials
(``EsConfig``: the CA bundle and certificate checking from the settings,
``findings.ca_certs`` and ``findings.verify_certs``; credentials only from
the environment, never the URL) and one line an operator can act on for
whatever the client raised (``explain``).

Client compatibility: elasticsearch-py 9.x sends ``compatible-with=9``,
which 8.x servers refuse (400 ``media_type_header_exception``); the 8.x
client sends ``compatible-with=8``, which 8.x and 9.x servers both accept.
deepwatch therefore pins ``elasticsearch>=8.15,<9`` and turns the 400 into
one clear line saying so (``EsCompatError``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field as dc_field
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("deepwatch.es")


class EsError(RuntimeError):
    """Elasticsearch is unreachable or refused a request; the message says what
    to do. ``hold``: it may take the request later (unreachable, overloaded,
    refusing the credentials until an operator fixes them), so a writer keeps
    its batch and retries rather than drop it."""

    def __init__(self, message: str, *, hold: bool = False):
        super().__init__(message)
        self.hold = hold


# Answers after which the same request may succeed later: auth (an operator
# renews the key), timeouts, overload and a server or proxy in trouble.
# credentials belong in their environment variables; ``findings.check_store_url`` refuses them at settings load
CREDENTIALS_IN_URL = ("put Elasticsearch credentials in DEEPWATCH_ES_API_KEY or DEEPWATCH_ES_USERNAME/"
                      "DEEPWATCH_ES_PASSWORD, not in the URL")
HOLD_STATUS = frozenset({401, 403, 408, 429, 500, 502, 503, 504})


def store_unavailable(e: BaseException) -> bool:
    """Whether Elasticsearch could not take a request now but may later (see
    ``EsError.hold``), from what the client raised or ``explain`` made of it."""
    if isinstance(e, EsError):
        return e.hold
    from elasticsearch import ApiError, ConnectionError as EsConnectionError, ConnectionTimeout

    # not every TransportError: a SerializationError fails again however long it waits
    if isinstance(e, (EsConnectionError, ConnectionTimeout)):
        return True
    return isinstance(e, ApiError) and e.meta.status in HOLD_STATUS


class EsCompatError(EsError):
    pass


@dataclass(frozen=True)
class EsConfig:
    url: str  # http(s)://host:port
    api_key: str | None = dc_field(default=None, repr=False)  # secrets stay out of reprs, tracebacks and logs
    username: str | None = None
    password: str | None = dc_field(default=None, repr=False)
    ca_certs: str | None = None
    verify_certs: bool = True
    request_timeout_s: float = 30.0

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None, *, ca_certs: str | os.PathLike[str] | None = None,
                 verify_certs: bool = True, request_timeout_s: float = 30.0) -> "EsConfig":
        """``es://`` = http, ``ess://`` = https; credentials never in the URL
        (they would end up in shell history and process lists): only from
        DEEPWATCH_ES_API_KEY or DEEPWATCH_ES_USERNAME/DEEPWATCH_ES_PASSWORD in
        ``env`` (default: the process environment). ``ca_certs`` and
        ``verify_certs`` are not secrets: the caller passes them from the
        settings (``findings.ca_certs``, ``findings.verify_certs``)."""
        env = os.environ if env is None else env
        parts = urlsplit(url)
        scheme = {"es": "http", "ess": "https"}.get(parts.scheme, parts.scheme)
        if scheme not in ("http", "https") or not parts.hostname:
            raise EsError(f"cannot use {_without_userinfo(url)!r} as an Elasticsearch address: "
                          "give es://HOST:9200 or https://HOST:9200")
        if parts.username or parts.password:
            raise EsError(CREDENTIALS_IN_URL)
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in (parts.hostname or "") and parts.hostname and not netloc.startswith("["):
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        if parts.port is None:
            netloc += ":9200"
        return cls(
            url=urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", "")),
            api_key=env.get("DEEPWATCH_ES_API_KEY") or None,
            username=env.get("DEEPWATCH_ES_USERNAME") or None,
            password=env.get("DEEPWATCH_ES_PASSWORD") or None,
            ca_certs=os.fspath(ca_certs) if ca_certs else None,
            verify_certs=verify_certs,
            request_timeout_s=request_timeout_s,
        )

    def client(self):
        """The client. It retries a request once, at once, only when the
        connection failed (a pooled keep-alive connection the server had
        closed): elastic-transport retries with no pause, so a 429 retried
        by it was no relief for an overloaded cluster, and a read retried on
        timeout blocked up to four request timeouts. Overload, 5xx and
        timeouts are raised (``explain``: held), and whoever holds the work
        retries with backoff (``streams.sinks``, ``streams.store_errors``);
        the bulk sink does its own retrying. Warns once when credentials
        would cross plain http, or a CA bundle is set for an http URL.
        Raises EsError when the CA bundle is not a readable file: the client
        takes such a path and then fails every request with a TLS error."""
        from elasticsearch import Elasticsearch

        kw: dict[str, Any] = {"request_timeout": self.request_timeout_s,
                              "max_retries": 1, "retry_on_status": (), "retry_on_timeout": False}
        if self.api_key:
            kw["api_key"] = self.api_key
        elif self.username:
            kw["basic_auth"] = (self.username, self.password or "")
        if self.url.startswith("https://"):
            kw["verify_certs"] = self.verify_certs
            if self.ca_certs:
                _check_ca_file(self.ca_certs)
                kw["ca_certs"] = self.ca_certs
        else:
            if self.api_key or self.username:
                log.warning(f"Elasticsearch at {self.url} is plain http (es:// means http): the "
                            f"{'API key' if self.api_key else 'password'} is sent in cleartext; use ess:// or "
                            "https:// unless the network between is trusted", extra={"url": self.url})
            if self.ca_certs:
                log.warning(f"findings.ca_certs is set but Elasticsearch at {self.url} is plain http: the CA "
                            "bundle is not used; use ess:// or https://", extra={"url": self.url})
        return Elasticsearch(self.url, **kw)


def _check_ca_file(path: str) -> None:
    # as streams.broker checks kafka.ssl_cafile; stat and access, not open: a FIFO named by mistake would block
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise EsError(f"findings.ca_certs {path!r} is not a readable file (DEEPWATCH_FINDINGS__CA_CERTS); give the "
                      "path of the PEM bundle of the CA that signed Elasticsearch's certificate, or unset it for the "
                      "system's CAs")


def _without_userinfo(url: str) -> str:
    """``url`` as it may be shown: whatever precedes an ``@`` in its
    authority (a user and password) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{path}"


def client_major() -> int:
    import elasticsearch

    return int(elasticsearch.__versionstr__.split(".")[0])


def explain(e: Exception, url: str) -> EsError:
    """One line an operator can act on, from whatever the client raised."""
    from elasticsearch import ApiError, AuthenticationException, AuthorizationException, TransportError

    if isinstance(e, EsError):
        return e
    if isinstance(e, ApiError):
        err = e.body.get("error") if isinstance(e.body, dict) else None
        kind = err.get("type") if isinstance(err, dict) else None
        if kind == "media_type_header_exception":
            cause = (err.get("caused_by") or {}).get("reason") or err.get("reason")
            import elasticsearch

            return EsCompatError(
                f"Elasticsearch at {url} refused the API version this client asks for ({cause}). "
                f"elasticsearch-py {elasticsearch.__versionstr__} sends compatible-with={client_major()}; "
                "8.x servers only accept 7 or 8. Install the pinned client: pip install 'elasticsearch>=8.15,<9' "
                "(it talks to 8.x and 9.x servers).")
        hold = e.meta.status in HOLD_STATUS
        if isinstance(e, AuthenticationException):
            return EsError(f"Elasticsearch at {url} refused the credentials: set DEEPWATCH_ES_API_KEY "
                           "(or DEEPWATCH_ES_USERNAME and DEEPWATCH_ES_PASSWORD)", hold=hold)
        if isinstance(e, AuthorizationException):
            return EsError(f"Elasticsearch at {url}: the credentials lack a privilege ({error_reason(e)}); "
                           "see docs/elasticsearch.md for the role deepwatch needs", hold=hold)
        if not es_error_body(e):  # not an Elasticsearch error body: an HTML page, a proxy's answer
            return EsError(f"{url} answered {e.meta.status} with no Elasticsearch error ({error_reason(e)}); "
                           "is it an Elasticsearch server? check --store / DEEPWATCH_FINDINGS__URL", hold=hold)
        return EsError(f"Elasticsearch at {url} answered {e.meta.status}: {error_reason(e)}", hold=hold)
    if isinstance(e, TransportError):
        from streams.net_errors import network_reason

        return EsError(f"cannot reach Elasticsearch at {url} ({network_reason(e)}); "
                       "check --store / DEEPWATCH_FINDINGS__URL and that the server is up",
                       hold=store_unavailable(e))
    return EsError(f"Elasticsearch at {url}: {type(e).__name__}: {e}")


def es_error_body(e: Any) -> bool:
    """Whether an error response carries Elasticsearch's own error document."""
    body = getattr(e, "body", None)
    return isinstance(body, dict) and isinstance(body.get("error"), (dict, str))


def error_reason(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        said = f"{err.get('type')}: {err.get('reason')}"
        # "search_phase_execution_exception: all shards failed" says nothing:
        # the shards' own refusal is the root cause
        roots = err.get("root_cause") if isinstance(err.get("root_cause"), list) else []
        root = roots[0] if roots and isinstance(roots[0], dict) else err.get("caused_by")
        if isinstance(root, dict) and root.get("reason") and root.get("reason") != err.get("reason"):
            said += f" ({root.get('type')}: {root.get('reason')})"
        return said
    text = " ".join(str(getattr(e, "message", e)).split())  # one line, however the server formatted it
    return text if len(text) <= 200 else text[:200] + "..."
