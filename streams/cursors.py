"""Page cursors as a client carries them: a short list of strings and
finite numbers, as JSON in unpadded base64url, bounded and checked before it
is read (``encode_cursor`` / ``decode_cursor``). A cursor only says where a
page starts, never what to list: the desk's account pages
(``streams.findings.AccountCursor``), analyst search
(``streams.cluster_search.SearchCursor``) and the desk's queue carry them."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

# base64 (4/3) of the JSON of a cursor's counts and times and its one id
# (an event or cluster id, at most 256 characters, each at worst a 6-character
# \u escape: 1,536): about 2,300 at worst, with room to spare
CURSOR_MAX_CHARS = 8192
_CURSOR_CHARS = re.compile(r"[A-Za-z0-9_-]+")
NOT_A_CURSOR = "not a cursor this desk gave"
# Past this a cursor's number is forged: the largest a real key holds is NEVER's 1e18.
MAX_CURSOR_NUMBER = 1e18


def encode_cursor(items: list[Any]) -> str:
    """A page cursor as a client carries it: the list (strings and finite
    numbers) as JSON in unpadded base64url, so it passes through a URL or a
    header as it is."""
    raw = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> list[Any]:
    """``encode_cursor``'s list back, or ValueError: bounded in length and
    alphabet before it is decoded, and only strings and finite numbers
    inside (no booleans, nulls, nesting, NaN or infinities)."""
    if not token or len(token) > CURSOR_MAX_CHARS or not _CURSOR_CHARS.fullmatch(token):
        raise ValueError(NOT_A_CURSOR)
    try:
        items = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(NOT_A_CURSOR) from None
    if not isinstance(items, list) or not all(isinstance(x, str) or _cursor_number(x) for x in items):
        raise ValueError(NOT_A_CURSOR)
    return items


def _cursor_number(x: Any) -> bool:
    # abs() first: math.isfinite raises OverflowError on an int too large for a float
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) <= MAX_CURSOR_NUMBER
            and math.isfinite(x))
