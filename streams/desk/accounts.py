"""Account-level alerts: an account whose recent posts cross
``account_min_ai_pictures`` likely-AI pictures at an AI share of at least
``account_min_ai_share`` (within ``account_window_hours`` before its last
post) raises one alert, through the same path as cluster alerts. The alert's
``cluster_id`` is ``account:<id>`` so subscribers can tell them apart; its id
is stable (``account:<id>:1``), so re-checks never duplicate it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from detectors.base import Evidence
from streams.desk.alerting import AlertPath
from streams.desk.deskdb import DeskDB
from streams.desk.source import FindingsSource
from streams.records import Alert, Velocity
from streams.settings import Settings

log = logging.getLogger(__name__)


async def check_accounts(settings: Settings, source: FindingsSource, desk: DeskDB, alerts: AlertPath) -> list[str]:
    """Raise alerts for accounts newly over the line; returns their alert ids."""
    async with alerts.account_lock:
        return await _check(settings, source, desk, alerts)


async def _check(settings: Settings, source: FindingsSource, desk: DeskDB, alerts: AlertPath) -> list[str]:
    cfg = settings.desk
    raised = []
    # Counted by the store, which can skip accounts below the line at once; still
    # a pass over every account: off the event loop, so pages keep answering.
    windows = await asyncio.to_thread(source.account_windows, timedelta(hours=cfg.account_window_hours),
                                      cfg.account_min_ai_pictures)
    for a in windows:
        if a["ai_pictures"] < cfg.account_min_ai_pictures or a["ai_share"] < cfg.account_min_ai_share:
            continue
        if await asyncio.to_thread(desk.account_alerted, a["id"]):  # the desk database waits on a busy file
            continue
        detail = (f"account {a['id']} posted {a['ai_pictures']} likely-AI pictures of {a['pictures']} "
                  f"({a['ai_share']:.0%}) within {cfg.account_window_hours:g} h on {', '.join(a['platforms'])}")
        alert = Alert(
            alert_id=f"account:{a['id']}:1", cluster_id=f"account:{a['id']}", rule="account-ai-share", level=1,
            fake_score=round(a["ai_share"], 4), verdict="likely-ai", velocity=Velocity(), sightings=a["posts"], accounts=1,
            evidence=[Evidence(detector="desk:accounts", score=round(a["ai_share"], 4), detail=detail,
                               data={"account_id": a["id"], "ai_pictures": a["ai_pictures"], "pictures": a["pictures"]})],
            at=a["last_seen"], last_seen=a["last_seen"], platforms=a["platforms"],
            sample_posts=await asyncio.to_thread(source.sample_posts, account_id=a["id"], newest=True),  # its latest
            account_id=a["id"],
        )
        await alerts.raise_alert(alert)
        await asyncio.to_thread(desk.mark_account_alerted, a["id"], alert.alert_id)
        raised.append(alert.alert_id)
    return raised
