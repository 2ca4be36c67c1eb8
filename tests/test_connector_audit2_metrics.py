"""Second connector audit: the cursor lag gauge. It was set at each
checkpoint under the connector's name alone, so one Mastodon connector's
hashtag streams overwrote each other's value, and a stream that no longer
checkpointed (platform gone, broker down, a reconnect storm) showed the small
lag of its last good moment for as long as it stayed stuck."""

from __future__ import annotations

import asyncio
import io
import time

from prometheus_client import REGISTRY

from streams.connectors.run import build_bluesky, open_state
from streams.connectors.sinks import JsonlSink
from tests.connector_servers import JetstreamServer
from tests.test_connector_audit2_cursor import PUBLIC, T0, _post
from tests.test_connector_bluesky import run_until, settings_for


def _lag(stream: str) -> float | None:
    return REGISTRY.get_sample_value("deepwatch_connector_cursor_lag_seconds",
                                     {"connector": "bluesky", "stream": stream})


def test_cursor_lag_is_per_stream_and_grows_while_a_stream_makes_no_progress(tmp_path):
    s = settings_for(tmp_path, bluesky_image_url=PUBLIC)
    hour_us = 3600 * 1_000_000
    for tag, t in (("audit2lag-a", T0), ("audit2lag-b", T0 + hour_us)):
        runner = build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, tag), hashtags=[tag])
        with JetstreamServer([_post("p", t)]) as server:
            runner.url = server.url
            asyncio.run(run_until(runner, lambda: runner.emitter.cursor == str(t), timeout=30))
    a, b = _lag("bluesky-audit2lag-a"), _lag("bluesky-audit2lag-b")
    assert a is not None and b is not None
    assert abs((a - b) - 3600) < 5  # each stream its own series: the second did not overwrite the first
    # Both have stopped (their platform is gone): their lag keeps growing, it is not frozen at the last checkpoint.
    time.sleep(0.3)
    assert _lag("bluesky-audit2lag-a") >= a + 0.25


def test_the_cursor_ahead_counter_is_exported_at_zero_before_its_first_frame(tmp_path):
    # increase() over a series that first appears at 1 reads 0: the first refused cursor would go unseen
    s = settings_for(tmp_path, bluesky_image_url=PUBLIC)
    build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, "audit2ahead0"), hashtags=["audit2ahead0"])
    assert REGISTRY.get_sample_value("deepwatch_connector_cursor_ahead_total", {"connector": "bluesky"}) is not None
