"""The operator's drill on a long-lived embedded broker: a worker is killed
with SIGKILL mid-stream and restarted while the webhook receiver is down;
then the receiver comes back.

Nothing is lost, no sighting is counted twice (store and stream agree),
every alert exists exactly once, and the receiver gets every alert, signed,
in level order per cluster (redelivery every 2 s here instead of the default
60 s: ``alerts.webhook_redeliver_s``).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from datetime import timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from streams import runner
from streams.broker import free_port
from streams.demo_feed import BASE_TIME, a1111_png, camera_jpeg, scene
from streams.ingest import produce_feed
from streams.records import Alert
from streams.settings import Settings
from streams.store import open_store
from tests.support import split_feed
from tests.test_webhooks import ENV, SECRET, _ReceiverHandler
from tests.test_worker_restart import wait_processed_at_least

pytestmark = pytest.mark.slow


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int):
        self.statuses = [200]
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _ReceiverHandler)


def drill_feed(out: Path) -> tuple[Path, int]:
    """Two viral pictures (one AI-generated, one camera photo), 10 s apart,
    the AI one escalating through several alert levels; plus a duplicate."""
    (out / "img").mkdir(parents=True)
    (out / "img" / "fake.png").write_bytes(a1111_png(scene(1001), "flooded subway station, news photo"))
    (out / "img" / "real.jpg").write_bytes(camera_jpeg(scene(3000)))
    lines = []
    for i in range(48):
        kind = "fake" if i % 2 == 0 else "real"
        doc = {"event_id": f"drill-{i:03d}", "platform": "x", "account_id": f"acct-{i}",
               "posted_at": (BASE_TIME + timedelta(seconds=10 * i)).isoformat(),
               "image": {"path": f"img/{kind}.{'png' if kind == 'fake' else 'jpg'}"}}
        lines.append(json.dumps(doc))
    lines.insert(30, lines[7])  # a producer retry
    feed = out / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    return feed, 48


def test_kill_9_and_receiver_outage_lose_nothing_and_count_nothing_twice(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)  # inherited by the worker processes
    feed, events = drill_feed(tmp_path / "feed")
    first, second = split_feed(feed, 2)
    port = free_port()
    hook = f"http://127.0.0.1:{port}/hook"
    settings = Settings(data_dir=tmp_path / "data", alerts={
        "min_sightings_5m": 4, "escalation_factor": 1.25, "webhook_redeliver_s": 2.0,
        "allow_private_webhooks": True,  # the receiver listens on loopback
        "webhooks": [{"url": hook, "secret_env": ENV, "retries": 0, "timeout_s": 2}],
    })
    settings.ingest.image_roots = [feed.parent.resolve()]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        w1 = cluster.start_worker()
        cluster.wait_ready()
        p1 = produce_feed(first, cluster.bootstrap, settings)
        wait_processed_at_least(settings, 6)
        w1.kill()  # SIGKILL mid-stream: no clean shutdown, no final commit
        p2 = produce_feed(second, cluster.bootstrap, settings)
        cluster.start_worker()
        if not runner.wait_until_processed(cluster, p1.offsets | p2.offsets, timeout_s=240):
            done = open_store(settings.data_dir).processed_offsets(settings.topic("events"))
            stalls = [line for w in cluster.workers for line in w.log_path.read_text(errors="replace").splitlines()
                      if "woke up too late" in line or "locked" in line][:5]
            pytest.fail(f"{len((p1.offsets | p2.offsets) - done)} event(s) never processed "
                        f"after the restart; loop stalls / lock errors: {stalls}")

        store = open_store(settings.data_dir)
        stack.callback(store.close)
        alerts = [Alert.model_validate(a.as_json()) for a in store.alerts()]
        assert max(a.level for a in alerts) >= 3, "the drill needs escalations to check their order"
        status = store.delivery_status()
        assert all(s.status != "delivered" for a in alerts for s in status.get(a.alert_id, [])), \
            "nothing can have been delivered while the receiver was down"

        receiver = _Receiver(port)  # the receiver comes back
        threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        stack.callback(receiver.server_close)
        stack.callback(receiver.shutdown)
        deadline = time.monotonic() + 60
        want = {a.alert_id for a in alerts}
        while time.monotonic() < deadline:
            with receiver.lock:
                got = {r["headers"]["X-Deepwatch-Delivery"] for r in receiver.requests}
            if want <= got:
                break
            time.sleep(0.2)
        assert want <= got, f"not redelivered: {want - got}"
        # the status write follows the POST
        while time.monotonic() < deadline + 30:
            status = store.delivery_status()
            if all(any(s.status == "delivered" for s in status.get(a.alert_id, [])) for a in alerts):
                break
            time.sleep(0.2)

        # Every alert delivered, signed, in level order per cluster.
        with receiver.lock:
            requests = list(receiver.requests)
        assert all(r["valid"] for r in requests)
        first_seen: list[Alert] = []
        for r in requests:
            a = Alert.model_validate_json(r["body"])
            if a.alert_id not in {x.alert_id for x in first_seen}:
                first_seen.append(a)
        for cid in {a.cluster_id for a in first_seen}:
            levels = [a.level for a in first_seen if a.cluster_id == cid]
            assert levels == sorted(levels) == list(range(1, len(levels) + 1)), (cid, levels)
        status = store.delivery_status()
        assert all(any(s.status == "delivered" for s in status[a.alert_id]) for a in alerts)

        # Exactly once in the store; the stream's counts equal the store's.
        assert len({(a.cluster_id, a.level) for a in alerts}) == len(alerts)
        clusters = store.clusters()
        assert sum(c.sightings for c in clusters) == events
        for c in clusters:
            assert c.stream_sightings == c.sightings, c.id
