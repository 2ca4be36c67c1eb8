"""A host that keeps timing out is paused (streams.host_breaker), against real
loopback sockets: a tarpit that accepts and never answers, and a live server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

from streams.fetch import ImageFetcher
from streams.host_breaker import MAX_COOLDOWN_S, HostBreaker, HostUnavailable
from streams.records import ImageEvent
from streams.safe_http import FetchError
from streams.settings import FetchSettings, IngestSettings
from tests.connector_servers import ImageServer
from tests.test_fetch import PNG

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_timeouts_in_a_row_pause_a_host_then_one_try_decides():
    clock = Clock()
    b = HostBreaker(timeouts=2, cooldown_s=10, clock=clock)
    b.timed_out("cdn:443")
    b.check("cdn:443")  # one timeout is not a pattern
    b.timed_out("cdn:443")
    with pytest.raises(HostUnavailable, match="timed out 2 times in a row; not fetched from for 10s more"):
        b.check("cdn:443")
    b.check("other:443")  # per host
    clock.now += 5
    b.timed_out("cdn:443")  # a fetch begun before the pause: the pause is not lengthened
    clock.now += 5
    b.check("cdn:443")  # the pause is over: this fetch is the try
    with pytest.raises(HostUnavailable, match="while one fetch tries it again"):
        b.check("cdn:443")  # the others wait for its answer
    b.timed_out("cdn:443")  # the try timed out too: twice the pause
    clock.now += 19
    with pytest.raises(HostUnavailable):
        b.check("cdn:443")
    clock.now += 1
    b.check("cdn:443")
    b.answered("cdn:443")  # it answers: forgotten
    b.check("cdn:443")
    b.timed_out("cdn:443")
    b.check("cdn:443")  # counting starts again


def test_the_pause_stops_doubling_at_its_cap_and_zero_means_never():
    clock = Clock()
    b = HostBreaker(timeouts=1, cooldown_s=100, clock=clock)
    b.timed_out("h:80")
    for _ in range(5):
        clock.now += MAX_COOLDOWN_S
        b.check("h:80")
        b.timed_out("h:80")
    clock.now += MAX_COOLDOWN_S - 1
    with pytest.raises(HostUnavailable):
        b.check("h:80")
    clock.now += 1
    b.check("h:80")
    never = HostBreaker(timeouts=0, cooldown_s=100, clock=clock)
    for _ in range(50):
        never.timed_out("h:80")
    never.check("h:80")


class Tarpit:
    """Accepts connections and never answers (a black-holed host that
    completes the handshake, or one chosen to hold fetchers)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def _event(url: str, i: int) -> ImageEvent:
    return ImageEvent.model_validate({"event_id": f"e{i}", "platform": "x", "account_id": "a",
                                      "posted_at": "2026-11-20T10:00:00+00:00", "image": {"url": url}})


def test_a_tarpit_host_is_paused_and_other_hosts_are_still_fetched():
    # Two pipeline slots per worker: posts pointing at a host that never
    # answers held them read_timeout_s x (retries + 1) each, every other event
    # waiting behind. Now the third fetch from it fails at once.
    tarpit = Tarpit()
    cfg = FetchSettings(allow_private_networks=True, retries=0, read_timeout_s=0.3, connect_timeout_s=1,
                        breaker_timeouts=2, breaker_cooldown_s=30)
    with ImageServer({"/img.png": PNG}) as good:
        async def main():
            f = ImageFetcher(cfg, IngestSettings())
            try:
                outcomes = []
                for i in range(6):
                    t0 = time.monotonic()
                    try:
                        await f.get(_event(f"http://127.0.0.1:{tarpit.port}/a{i}.jpg", i))
                        outcomes.append(("ok", time.monotonic() - t0))
                    except FetchError as e:
                        outcomes.append((e.reason, time.monotonic() - t0))
                fetched = await f.get(_event(f"{good.url}/img.png", 99))
                return outcomes, fetched
            finally:
                await f.aclose()

        outcomes, fetched = asyncio.run(main())
    tarpit.close()
    assert [r for r, _ in outcomes] == ["timeout", "timeout"] + ["host_unavailable"] * 4
    assert all(s >= 0.25 for _, s in outcomes[:2]) and all(s < 0.1 for _, s in outcomes[2:])
    assert tarpit.accepted == 2  # the paused host was not connected to again
    assert fetched == PNG


def test_a_fetch_cut_by_the_total_timeout_counts_and_a_host_that_answers_again_is_forgotten():
    # A host trickling bytes never trips the read timeout; the fetch's total
    # deadline (or the event's) cancels it, and that is a stall too.
    tarpit = Tarpit()
    cfg = FetchSettings(allow_private_networks=True, retries=0, read_timeout_s=30, connect_timeout_s=1,
                        total_timeout_s=0.3, breaker_timeouts=2, breaker_cooldown_s=30)
    clock = Clock()

    async def main():
        f = ImageFetcher(cfg, IngestSettings())
        f.breaker._clock = clock
        try:
            reasons = []
            for i in range(3):
                try:
                    await f.get(_event(f"http://127.0.0.1:{tarpit.port}/a.jpg", i))
                except FetchError as e:
                    reasons.append(e.reason)
            return f, reasons
        finally:
            await f.aclose()

    f, reasons = asyncio.run(main())
    tarpit.close()
    assert reasons == ["timeout", "timeout", "host_unavailable"]
    host = f"127.0.0.1:{tarpit.port}"
    clock.now += 30
    f.breaker.check(host)  # the try
    f.breaker.answered(host)
    f.breaker.check(host)
    f.breaker.check(host)


def test_in_the_pipeline_posts_at_a_tarpit_end_fast_and_the_others_are_all_seen(tmp_path):
    # Real broker, `deepwatch replay` and its workers: 16 posts at a host that
    # never answers, 16 at a live one. Each end as one outcome; most tarpit
    # posts end at once as host_unavailable instead of each holding a slot.
    import io
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    from streams.store import open_store

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.effect_noise((96, 96), 40 + seed).convert("RGB").resize((200, 150)).save(buf, "PNG")
        return buf.getvalue()

    tarpit = Tarpit()
    images = {f"/p{i}.png": png(i) for i in range(16)}
    with ImageServer(images) as good:
        feed = tmp_path / "feed.jsonl"
        lines = []
        for i in range(16):
            for kind, url in (("slow", f"http://127.0.0.1:{tarpit.port}/x{i}.jpg"), ("ok", f"{good.url}/p{i}.png")):
                lines.append(json.dumps({"schema_version": 1, "event_id": f"{kind}{i}", "platform": "x", "account_id": "a",
                                         "posted_at": "2026-11-20T10:00:00Z", "image": {"url": url}}))
        feed.write_text("\n".join(lines) + "\n")
        # Two fetch slots per worker (8 by default): with 16 tarpit posts, 8 at
        # once per worker would all time out together before the pause.
        env = {**os.environ, "DEEPWATCH_FETCH__ALLOW_PRIVATE_NETWORKS": "true", "DEEPWATCH_FETCH__RETRIES": "0",
               "DEEPWATCH_FETCH__READ_TIMEOUT_S": "1", "DEEPWATCH_FETCH__BREAKER_TIMEOUTS": "2",
               "DEEPWATCH_INGEST__FETCH_CONCURRENCY": "2"}
        r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "replay", str(feed), "--data-dir",
                            str(tmp_path / "data"), "--json", "--timeout", "180", "--workers", "2"],
                           capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    tarpit.close()
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["processed"] == 32
    store = open_store(tmp_path / "data")
    try:
        seen = set(store.sighting_times())
        dead = {d.event_id: d.reason for d in store.dead_letters()}
    finally:
        store.close()
    assert seen == {f"ok{i}" for i in range(16)}
    assert set(dead) == {f"slow{i}" for i in range(16)}
    reasons = sorted(dead.values())
    # Each of the 2 workers pauses the host after 2 timeouts; a fetch its other
    # fetch slot began before that still times out: at most 3 per worker.
    assert reasons.count("timeout") <= 2 * 3 and reasons.count("host_unavailable") >= 10, reasons
    assert reasons.count("host_unavailable") + reasons.count("timeout") == 16, reasons
    assert tarpit.accepted <= 2 * 3


def test_a_try_that_fails_unexpectedly_does_not_leave_the_host_paused_for_good(monkeypatch):
    # The try let through after a pause must end the wait however it ends; a
    # try that raised something unforeseen left every later fetch refused.
    clock = Clock()
    f = ImageFetcher(FetchSettings(allow_private_networks=True, breaker_timeouts=1), IngestSettings())
    f.breaker._clock = clock
    host = "127.0.0.1:9"
    f.breaker.timed_out(host)
    clock.now += 60

    async def broken(*args):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(f, "_hop", broken)

    async def main():
        try:
            with pytest.raises(RuntimeError):
                await f.get(_event(f"http://{host}/a.jpg", 1))
        finally:
            await f.aclose()

    asyncio.run(main())
    f.breaker.check(host)  # not paused: that try answered, if badly
