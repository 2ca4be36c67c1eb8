"""Virality of a cluster in event time: trailing windows ending at the newest
sighting the cluster has seen (not wall-clock, so a replayed feed alerts
exactly as the live one did)."""

from __future__ import annotations

from pydantic import BaseModel

from streams.records import Velocity

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


def trim(recent: list[RecentSighting], now: float) -> list[RecentSighting]:
    kept = [r for r in recent if r.t > now - WINDOW_1H]
    kept.sort(key=lambda r: r.t)
    return kept[-MAX_RECENT:]


def velocity(recent: list[RecentSighting], now: float) -> Velocity:
    in_5m = [r for r in recent if r.t > now - WINDOW_5M]
    in_1h = [r for r in recent if r.t > now - WINDOW_1H]
    return Velocity(
        sightings_5m=len(in_5m),
        sightings_1h=len(in_1h),
        accounts_1h=len({r.a for r in in_1h}),
        engagement_1h=sum(r.g for r in in_1h),
    )
