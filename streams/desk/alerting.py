"""Desk alerts (a verdict confirming a fake, an account crossing the AI-share
line) take the same path as the stream's cluster alerts: ``streams.sinks.Sinks``
stores them, logs them on the console and delivers signed webhooks, and when a
broker is configured they are also published on the alerts topic for its
subscribers. Alert ids are stable, so the worker's alert sink seeing the
published copy, or a second verdict, changes nothing: no duplicates.
"""

from __future__ import annotations

import asyncio
import logging

from streams.records import Alert
from streams.settings import Settings
from streams.sinks import Sinks

log = logging.getLogger(__name__)


class AlertPath:
    def __init__(self, settings: Settings):
        self.settings = settings
        # bounded: a verdict request waits this long at most on a findings
        # file that cannot be written, then fails (the stream's sinks hold on)
        self.sinks = Sinks(settings, retry_for_s=10)
        self._producer = None
        # Account checks run from a timer and after verdicts: one at a time,
        # so an account crossing the line is raised once, not once per check.
        self.account_lock = asyncio.Lock()

    def _publish(self, alert: Alert) -> None:
        from streams.broker import bootstrap_of, kafka_producer

        if self._producer is None:
            self._producer = kafka_producer(bootstrap_of(self.settings.broker), self.settings, client_id="deepwatch-desk",
                                            acks="all")
        self._producer.send(self.settings.topic("alerts"), key=alert.cluster_id.encode(), value=alert.dumps())
        self._producer.flush(timeout=10)

    async def raise_alert(self, alert: Alert) -> None:
        await self.sinks.alert(alert.dumps())
        if self.settings.broker != "embedded":
            try:
                await asyncio.to_thread(self._publish, alert)
            except Exception as e:  # the store and webhooks have it already; say the topic missed it
                log.error("alert not published on the alerts topic", extra={"alert_id": alert.alert_id, "error": str(e)})

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
        if self.sinks._store is not None:
            self.sinks._store.close()
