"""Who may read and write at the desk.

- Users: a JSON file ``{"users": [{"name", "role", "password"}]}`` where
  ``password`` is ``scrypt$N$r$p$salt_hex$hash_hex`` (``hash_password``;
  ``deepwatch desk-user`` writes it). Roles: ``viewer`` reads, ``editor``
  reads and records verdicts.
- API tokens: only from the environment variable named by
  ``settings.desk.tokens_env``, as ``role:name:token`` items separated by
  commas; sent as ``Authorization: Bearer <token>``.
- Browser sessions: a random cookie (only its hash is stored) with a CSRF
  token that every form and every cookie-authenticated POST must echo.
- Failed logins are limited per client address and per user name.

There are no default credentials: with no users file and no tokens, the desk
is read-only (and only on loopback).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

Role = Literal["viewer", "editor"]
RANK = {"viewer": 1, "editor": 2}
# scrypt cost: 2^15 * 8 * 128 B = 32 MiB per check (OWASP's minimum is N=2^17 with r=8 at 128 MiB or
# this N with more p); with the login rate limit it keeps guessing slow without starving 2 cores.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Principal(BaseModel):
    user: str
    role: Role
    via: Literal["session", "token", "open"]
    csrf: str | None = None


class UserEntry(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Role
    password: str


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=_MAXMEM, dklen=len(digest) // 2)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got.hex(), digest)


class Users:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._users: dict[str, UserEntry] = {}
        self._mtime: float | None = None
        # A fixed dummy hash, checked for unknown names so a login takes as
        # long for a name that does not exist as for a wrong password.
        self._dummy = hash_password(secrets.token_hex(8))

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._users, self._mtime = {}, None
            return
        if mtime != self._mtime:
            try:
                doc = json.loads(self.path.read_text())
                self._users = {u.name: u for u in (UserEntry.model_validate(x) for x in doc.get("users", []))}
            except ValidationError as e:  # schema: say which file and field, not a traceback
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise ValueError(f"users file {self.path} is not valid: {where}: {err['msg']}") from None
            except (ValueError, AttributeError) as e:  # not JSON, or not an object
                raise ValueError(f"users file {self.path} is not valid: {e}".splitlines()[0]) from None
            self._mtime = mtime

    def check(self, name: str, password: str) -> UserEntry | None:
        self._load()
        user = self._users.get(name)
        ok = verify_password(password, user.password if user else self._dummy)
        return user if ok and user else None

    def __len__(self) -> int:
        self._load()
        return len(self._users)


def add_user(path: Path, name: str, role: str, password: str) -> None:
    """Create or replace one user in the users file (written 0600)."""
    entry = UserEntry(name=name, role=role, password=hash_password(password))
    doc = json.loads(path.read_text()) if path.exists() else {"users": []}
    doc["users"] = [u for u in doc.get("users", []) if u.get("name") != name] + [entry.model_dump()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def tokens_from_env(var: str) -> dict[str, tuple[str, Role]]:
    """token -> (name, role) from ``role:name:token,...``; malformed items are refused loudly."""
    raw = os.environ.get(var, "").strip()
    out: dict[str, tuple[str, Role]] = {}
    if not raw:
        return out
    for item in raw.split(","):
        parts = item.strip().split(":", 2)
        if len(parts) != 3 or parts[0] not in RANK or len(parts[2]) < 16:
            raise ValueError(f"{var}: each item must be role:name:token with role viewer|editor and a token of 16+ characters")
        out[parts[2]] = (parts[1], parts[0])  # type: ignore[assignment]
    return out


def token_principal(tokens: dict[str, tuple[str, Role]], presented: str) -> Principal | None:
    # Compare against every token so timing says nothing about which prefix matched.
    found = None
    for token, (name, role) in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = Principal(user=name, role=role, via="token")
    return found


class LoginLimiter:
    """At most ``per_minute`` failed logins per key (client address, user
    name) in a sliding minute; successes do not count."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._fails: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, key: str) -> deque[float]:
        q = self._fails[key]
        cutoff = time.monotonic() - 60
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def blocked(self, *keys: str) -> float:
        """Seconds to wait, 0 when allowed."""
        wait = 0.0
        for k in keys:
            q = self._recent(k)
            if len(q) >= self.per_minute:
                wait = max(wait, 60 - (time.monotonic() - q[0]))
        return wait

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        if len(self._fails) > 10_000:  # bound memory under a spray of names/addresses
            for k in [k for k in self._fails if not self._recent(k)]:
                del self._fails[k]
        for k in keys:
            self._fails[k].append(now)
