"""Address helpers shared by the model fetcher and the desk (no I/O)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP literals (``[::1]`` brackets allowed).
    Names other than ``localhost`` are not resolved: only literals count."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
