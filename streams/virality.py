"""Virality of a cluster in event time: trailing windows ending at the newest
sighting the cluster has seen, not at the wall clock, so a feed replayed
hours later counts as it did live (its alerts' rule then says the velocity
is from then: ``streams.clustering._behind``). When an alert fires still depends on the
order the cluster stage sees the copies in: the fake score crosses when the
copy with the evidence is analysed, and with several workers that copy may
come after many of its reposts (the alert then fires at a higher velocity,
and an escalation waits for ``alerts.escalation_factor`` times that)."""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import Counter

from pydantic import BaseModel

from streams.records import MAX_COUNT, Velocity

WINDOW_5M = 300.0
WINDOW_1H = 3600.0
# Bounds the per-cluster state written to the changelog on every update. Above
# this many sightings in an hour the windows undercount, which only matters for
# clusters already far past any alert threshold.
MAX_RECENT = 5000


class RecentSighting(BaseModel):
    t: float  # event time, epoch seconds
    e: str  # event id
    a: str  # account id
    p: str  # platform
    g: int  # engagement (likes + reposts + replies)


def _t(r: RecentSighting) -> float:
    return r.t


# ``recent`` is kept sorted by event time (``trim`` sorts, ``add`` inserts in
# place), so the windows are found by bisection: a viral cluster holds
# MAX_RECENT sightings, and scanning and sorting all of them on every sighting
# was ~4 of the ~19 ms its single writer spent per sighting (16,000 reposts of
# one picture; most of the rest was parsing the state, see ``ClusterStage``).
def trim(recent: list[RecentSighting], now: float) -> list[RecentSighting]:
    """The last hour before ``now``, sorted by time, at most ``MAX_RECENT``."""
    kept = [r for r in recent if r.t > now - WINDOW_1H]
    kept.sort(key=_t)
    return kept[-MAX_RECENT:]


def add(recent: list[RecentSighting], r: RecentSighting, now: float) -> list[RecentSighting]:
    """``trim(recent + [r], now)`` for a ``recent`` that ``trim`` or ``add``
    returned: ``r`` inserted after the sightings of its time, the window cut
    by bisection."""
    insort(recent, r, key=_t)
    start = max(bisect_right(recent, now - WINDOW_1H, key=_t), len(recent) - MAX_RECENT)
    return recent[start:] if start > 0 else recent


def seen(recent: list[RecentSighting], event_id: str) -> bool:
    """Is the event ``event_id`` one of ``recent``? An event id names one
    post whatever time a resend of it claims, so every sighting is compared
    (an event resent with another ``posted_at`` counted twice when only the
    sightings of its time were). Beyond the window an old id is forgotten.
    The scan took 0.26 ms at ``MAX_RECENT`` (2-core VM), beside the ~19 ms
    the single writer spends per sighting of such a cluster (above)."""
    return any(r.e == event_id for r in recent)


def velocity(recent: list[RecentSighting], now: float) -> Velocity:
    """The trailing windows ending at ``now``, over ``recent`` sorted by time
    (as ``trim`` and ``add`` leave it). Sightings count posts (an account
    posting twice counts twice; alerts decide on ``spread``); ``accounts_5m`` and
    ``accounts_1h`` distinct accounts as ``spread`` keys them (platform and id: the same
    handle on two platforms is two people), so a reader outside the stream (the desk's
    Grafana rule) can tell one bot's 12 posts from 12 accounts; ``engagement_1h``
    saturates at ``MAX_COUNT``."""
    hour_start = bisect_right(recent, now - WINDOW_1H, key=_t)
    start_5m = bisect_right(recent, now - WINDOW_5M, key=_t)
    # the hour's accounts are the 5 minutes' and those before: each sighting keyed once
    # (a viral cluster's MAX_RECENT sightings may all be in the 5 minutes)
    accounts_5m = {(r.p, r.a) for r in recent[start_5m:]}
    accounts_1h = accounts_5m.union((r.p, r.a) for r in recent[hour_start:start_5m])
    return Velocity(
        sightings_5m=len(recent) - start_5m,
        sightings_1h=len(recent) - hour_start,
        accounts_1h=len(accounts_1h),
        # one post may claim 3 * MAX_COUNT; past MAX_COUNT a JSON consumer (the
        # desk, Grafana) reads the sum inexactly, why events refuse larger counts
        engagement_1h=min(sum(r.g for r in recent[hour_start:]), MAX_COUNT),
        accounts_5m=len(accounts_5m),
    )


def spread(recent: list[RecentSighting], now: float, window: float, per_account: int) -> int:
    """The sightings of ``recent`` (sorted by time) in the trailing ``window``
    ending at ``now``, counting at most ``per_account`` of one account's: what
    an alert decides on. Sightings count posts, so one account posting a fake
    10 times in 5 minutes read as 10 accounts spreading it and paged every
    subscriber. An account is its platform and id (ids are the platform's)."""
    counts = Counter((r.p, r.a) for r in recent[bisect_right(recent, now - window, key=_t):])
    return sum(min(n, per_account) for n in counts.values())
