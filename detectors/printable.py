"""Text read from untrusted input (image metadata, posts) made safe to show.

What must not reach a terminal, a log line or a chat message: C0/C1 control
characters (ESC starts sequences that clear the screen, recolour it or plant
a link; CR rewrites the line it ends) and the bidirectional overrides that
make text read backwards. Newlines and tabs stay: they only wrap."""

from __future__ import annotations

import re

UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escaped(text: str) -> str:
    """``text`` with each unshowable character written as its escape (``\\x1b``)."""
    return UNSHOWABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def one_line(text: str) -> str:
    """``escaped(text)`` with its runs of blanks, newlines and tabs as one space."""
    return " ".join(escaped(text).split())
