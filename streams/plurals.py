"""Counts as people read them: "1 file", "2,000 files", "1 entry", "3
entries", never "file(s)". One helper for the CLI, the desk's pages (the
``counted`` Jinja filter, ``streams.desk.views``) and the lines services
print; it imports nothing of either, so each may import it."""

from __future__ import annotations


def counted(n: object, noun: str, plural: str | None = None) -> str:
    """``n`` and its noun, singular for exactly one, else ``plural`` (the
    noun plus "s" unless given: ``counted(n, "entry", "entries")``). A whole
    number is shown with thousands separators ("2,000"); anything else (a
    template's missing value) as it prints."""
    shown = f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else str(n)
    return f"{shown} {noun if n == 1 else plural or noun + 's'}"
