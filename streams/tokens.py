"""Bearer tokens read from the environment, and the constant-time lookup of
one a request presents. The ingest server (``NAME:TOKEN``) and the desk's API
(``ROLE:NAME:TOKEN``) read their lists here, so both parse them alike: the
desk once kept the blank in ``editor:erin: TOKEN`` as part of the token, and
no request could ever match it."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from typing import TypeVar

MIN_TOKEN_CHARS = 16
MAKE_ONE = "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"

V = TypeVar("V")


class TokenConfigError(ValueError):
    pass


def token_entries(env_name: str, fields: int, environ: Mapping[str, str] | None = None) -> list[list[str]]:
    """The comma-separated entries of ``env_name``, each split on its first
    ``fields - 1`` colons into ``fields`` parts with the blanks around each
    part dropped; the token is the last part. An entry with fewer parts is
    returned as it is (its caller says what it lacks). A token with blanks
    inside (no bearer token has any, RFC 6750: likely a missing comma) or
    shorter than ``MIN_TOKEN_CHARS`` is refused."""
    raw = (environ if environ is not None else os.environ).get(env_name, "")
    out: list[list[str]] = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        parts = [p.strip() for p in item.split(":", fields - 1)]
        if len(parts) == fields:
            token = parts[-1]
            if any(c.isspace() for c in token):
                raise TokenConfigError(f"{env_name}: the token for {':'.join(parts[:-1])!r} contains whitespace, "
                                       "which no bearer token has; separate entries with commas")
            if len(token) < MIN_TOKEN_CHARS:
                raise TokenConfigError(f"{env_name}: the token for {':'.join(parts[:-1])!r} is shorter than "
                                       f"{MIN_TOKEN_CHARS} characters; use e.g. {MAKE_ONE}")
        out.append(parts)
    return out


def presented(tokens: Mapping[str, V], given: str) -> V | None:
    """What ``tokens`` holds for the token a request presented, or None.
    Every token is compared, so the time taken says nothing about which one
    (or which prefix) matched."""
    found = None
    wanted = given.strip().encode()
    for token, value in tokens.items():
        if hmac.compare_digest(token.encode(), wanted):
            found = value
    return found
