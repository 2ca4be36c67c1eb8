"""A circuit breaker per image host: a host that keeps timing out is not
waited on again for a while.

A pipeline worker takes a few events at once (``ingest.fetch_concurrency``,
8 by default), and a fetch from a host that never answers holds its slot until
``fetch.total_timeout_s``. A burst of posts pointing at such a host (a
black-holed CDN, or a tarpit chosen on purpose) then held every slot and
stalled every other event behind it for minutes. After
``fetch.breaker_timeouts`` timeouts in a row from one host, its fetches fail at
once (``fetch:host_unavailable``) for ``fetch.breaker_cooldown_s``; then one
fetch is let through to try it, and the pause doubles (up to
``MAX_COOLDOWN_S``) each time that try times out too. Only timeouts count: a
refused connection or an HTTP error costs no waiting.

State is per worker process, kept only for hosts with timeouts (at most
``MAX_HOSTS``), and never shared: a worker's own experience of a host is what
decides for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from streams import metrics

log = logging.getLogger(__name__)

MAX_COOLDOWN_S = 300.0
MAX_HOSTS = 10_000


class HostUnavailable(Exception):
    """The host is paused: ``detail`` says how many timeouts paused it and for
    how much longer (or that a try is under way)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@dataclass
class _Host:
    timeouts: int = 0  # in a row
    open_until: float = 0.0  # the host is skipped before this (monotonic time)
    cooldown_s: float = 0.0  # the pause of the last opening, doubled on each failed try
    trying: bool = False  # one fetch let through after a pause, not yet answered


class HostBreaker:
    def __init__(self, timeouts: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeouts = timeouts  # 0: never open
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._hosts: dict[str, _Host] = {}

    def check(self, host: str) -> None:
        """Raise ``HostUnavailable`` if fetches from ``host`` are paused; the
        first call after a pause is let through as the try."""
        h = self._hosts.get(host)
        if h is None or not self._open(h):
            return
        now = self._clock()
        if now >= h.open_until and not h.trying:
            h.trying = True
            return
        when = f"for {h.open_until - now:.0f}s more" if now < h.open_until else "while one fetch tries it again"
        raise HostUnavailable(f"{host} timed out {h.timeouts} times in a row; not fetched from {when} "
                              "(fetch.breaker_timeouts, fetch.breaker_cooldown_s)")

    def timed_out(self, host: str) -> None:
        h = self._hosts.get(host)
        if h is None:
            if len(self._hosts) >= MAX_HOSTS:
                self._hosts.clear()  # a flood of distinct hosts: start over rather than grow
            h = self._hosts[host] = _Host()
        h.timeouts += 1
        if not self._open(h):
            return
        now = self._clock()
        if h.trying:  # the try after a pause timed out as well
            h.cooldown_s, h.trying = min(MAX_COOLDOWN_S, h.cooldown_s * 2), False
        elif h.open_until > now:
            return  # a fetch begun before the pause: already paused
        elif h.cooldown_s == 0:
            h.cooldown_s = self.cooldown_s
        h.open_until = now + h.cooldown_s
        metrics.FETCH_HOST_PAUSES.inc()
        log.warning("image host paused after timeouts", extra={
            "host": host, "timeouts": h.timeouts, "pause_s": h.cooldown_s})

    def answered(self, host: str) -> None:
        """The host answered (whatever it answered): it is not stalling."""
        if self._hosts.pop(host, None) is not None:
            log.info("image host answers again", extra={"host": host})

    def _open(self, h: _Host) -> bool:
        return self.timeouts > 0 and h.timeouts >= self.timeouts
