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
- Failed logins are limited per client address and user name, per address,
  and per user name (but not for an address the user logged in from lately).

There are no default credentials: with no users file and no tokens, the desk
is read-only (and only on loopback).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, defaultdict, deque
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from streams.tokens import MAKE_ONE, MIN_TOKEN_CHARS, TokenConfigError, presented, token_entries

log = logging.getLogger(__name__)

Role = Literal["viewer", "editor"]
RANK = {"viewer": 1, "editor": 2}
# scrypt cost: 2^15 * 8 * 128 B = 32 MiB per check (OWASP's minimum is N=2^17 with r=8 at 128 MiB or
# this N with more p); with the login rate limit it keeps guessing slow without starving 2 cores.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024


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
        self._read_once = False
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
                self._users = {u.name: u for u in _read_users(self.path)[1]}
            except ValueError as e:
                if not self._read_once:
                    raise  # at start: the desk does not start on a broken file
                # Broken by hand while the desk runs: every request reads the
                # users now (sessions follow roles), so raising would answer 500
                # to everyone. Keep the users read last, say so once per change.
                log.error("users file not valid; keeping the users read before it changed",
                          extra={"path": str(self.path), "error": str(e)})
            self._mtime = mtime
            self._read_once = True

    def check(self, name: str, password: str) -> UserEntry | None:
        self._load()
        user = self._users.get(name)
        ok = verify_password(password, user.password if user else self._dummy)
        return user if ok and user else None

    def get(self, name: str) -> UserEntry | None:
        """The user as the file says now (sessions follow a changed role or a removed user)."""
        self._load()
        return self._users.get(name)

    def __len__(self) -> int:
        self._load()
        return len(self._users)


def _read_users(path: Path) -> tuple[dict, list[UserEntry]]:
    """The users file as read and its entries; ValueError naming the file
    and the problem when it is not valid."""
    try:
        doc = json.loads(path.read_text())
        return doc, [UserEntry.model_validate(x) for x in doc.get("users", [])]
    except ValidationError as e:  # schema: say which file and field, not a traceback
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"users file {path} is not valid: {where}: {err['msg']}") from None
    except (ValueError, AttributeError) as e:  # not JSON, or not an object
        raise ValueError(f"users file {path} is not valid: {e}".splitlines()[0]) from None


def credential_of(user: UserEntry) -> str:
    """Names the password a user has now (a digest of its salted hash, not
    the hash): a session opened with it lasts only while it is the same."""
    return hashlib.sha256(user.password.encode()).hexdigest()


def add_user(path: Path, name: str, role: str, password: str) -> None:
    """Create or replace one user in the users file (written 0600). A users
    file that is not valid raises ValueError and is left as it is. The same
    password given again keeps its stored hash, so a change of role alone
    leaves the user's sessions open (they follow the new role); a new
    password ends them (``credential_of``)."""
    doc = _read_users(path)[0] if path.exists() else {"users": []}
    before = next((u for u in doc.get("users", []) if u.get("name") == name), None)
    kept = before.get("password") if before and verify_password(password, str(before.get("password", ""))) else None
    entry = UserEntry(name=name, role=role, password=kept or hash_password(password))
    doc["users"] = [u for u in doc.get("users", []) if u.get("name") != name] + [entry.model_dump()]
    _write_users(path, doc)


def read_users(path: Path) -> list[UserEntry]:
    """The users in the users file (none when there is no file); ValueError
    naming the file and the problem when it is not valid."""
    return _read_users(path)[1] if path.exists() else []


def remove_user(path: Path, name: str) -> bool:
    """Remove one user from the users file, written as ``add_user`` writes it;
    False when there is no such user (nothing written). Their password no
    longer logs in, and their sessions end at their next request (the desk
    reads the file on each one)."""
    if not path.exists():
        return False
    doc, users = _read_users(path)
    if not any(u.name == name for u in users):
        return False
    doc["users"] = [u for u in doc.get("users", []) if u.get("name") != name]
    _write_users(path, doc)
    return True


def _write_users(path: Path, doc: dict) -> None:
    """Replace the users file (mode 0600) through a temporary file renamed
    over it, so the desk never reads half a file."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        # it read "[Errno 13] Permission denied: 'data/desk-users.tmp'": a temp file the user never named
        raise OSError(f"cannot write the users file {path} ({e.strerror or e}): check the permissions of its "
                      "directory, or give another --data-dir or desk.users_file") from None


def tokens_from_env(var: str) -> dict[str, tuple[str, Role]]:
    """token -> (name, role) from ``role:name:token,...``
    (``streams.tokens.token_entries``); a malformed item is refused loudly."""
    out: dict[str, tuple[str, Role]] = {}
    for parts in token_entries(var, 3):
        if len(parts) != 3 or parts[0] not in RANK or not parts[1]:
            raise TokenConfigError(f"{var}: each item must be role:name:token with role viewer|editor, a name, and a "
                                   f"token of {MIN_TOKEN_CHARS}+ characters (e.g. {MAKE_ONE})")
        out[parts[2]] = (parts[1], parts[0])  # type: ignore[assignment]
    return out


def token_principal(tokens: dict[str, tuple[str, Role]], given: str) -> Principal | None:
    found = presented(tokens, given)
    return None if found is None else Principal(user=found[0], role=found[1], via="token")


class LoginLimiter:
    """Failed logins in a sliding minute, counted three ways: per client
    address and user name together (at most ``per_minute``), and per address
    and per user name over all the others (at most ``spread`` times that).
    Successes do not count.

    The pair is the tight limit: one address guessing one user's password. A
    guesser from one address cannot lock a user out of the desk from everywhere
    else (as a per-name limit alone would), nor the others behind a shared
    address (a newsroom's NAT or proxy); the per-address limit still slows
    guessing spread over many names.

    The per-name limit caps guessing spread over many addresses, but it does
    not apply to an address the user logged in from within ``KNOWN_FOR_S``
    (a "known device", as OWASP calls it): guesses from four addresses with
    five wrong passwords each locked the user out of the desk everywhere,
    her own desk included. A user at an address new to her waits out a
    guessing storm on her name (or uses an API token).

    ``attempt`` checks and counts in one step, before the password is checked:
    parallel guesses must not all pass the check while none has failed yet."""

    KNOWN_FOR_S = 30 * 86400.0
    MAX_KNOWN = 10_000  # (user, address) pairs remembered: the oldest go first

    def __init__(self, per_minute: int, spread: int = 4):
        self.per_minute, self.spread = per_minute, spread
        self._fails: dict[str, deque[float]] = defaultdict(deque)
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()  # (user, address) -> last login
        self._lock = threading.Lock()  # logins run in the threadpool

    def _limits(self, client: str, user: str) -> dict[str, int]:
        """The pair's, the address's and the name's keys and limits, in that order."""
        wide = self.per_minute * self.spread
        return {f"pair:{client}\n{user}": self.per_minute, f"addr:{client}": wide, f"user:{user}": wide}

    def attempt(self, client: str, user: str) -> tuple[float, float | None]:
        """(seconds to wait, 0 when allowed; the attempt's stamp, counted as a
        failure until ``succeeded`` withdraws it, None when refused)."""
        limits = self._limits(client, user)
        with self._lock:
            known = self._known.get((user, client))
            checked = dict(limits)
            if known is not None and time.monotonic() - known < self.KNOWN_FOR_S:
                del checked[f"user:{user}"]  # her own desk: a storm of guesses elsewhere does not lock her out
            wait = self._blocked(checked)
            return (wait, None) if wait > 0 else (0.0, self._count(*limits))

    def succeeded(self, stamp: float, client: str, user: str) -> None:
        with self._lock:
            for k in self._limits(client, user):
                with contextlib.suppress(ValueError):
                    self._fails.get(k, deque()).remove(stamp)
            self._known[(user, client)] = time.monotonic()
            self._known.move_to_end((user, client))
            while len(self._known) > self.MAX_KNOWN:
                self._known.popitem(last=False)

    def _recent(self, key: str) -> deque[float]:
        # ``get``, not the defaultdict's insertion: a refused attempt (a spray
        # of new user names from one blocked address) must add no key.
        q = self._fails.get(key)
        if q is None:
            return deque()
        cutoff = time.monotonic() - 60
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def _blocked(self, limits: dict[str, int]) -> float:
        """Seconds to wait, 0 when allowed."""
        wait = 0.0
        for k, limit in limits.items():
            q = self._recent(k)
            if len(q) >= limit:
                wait = max(wait, 60 - (time.monotonic() - q[0]))
        return wait

    def _count(self, *keys: str) -> float:
        now = time.monotonic()
        if len(self._fails) > 10_000:  # bound memory under a spray of names/addresses
            for k in [k for k in self._fails if not self._recent(k)]:
                del self._fails[k]
        for k in keys:
            self._fails[k].append(now)
        return now
