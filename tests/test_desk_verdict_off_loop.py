"""Recording a verdict does not hold the desk's event loop: the store reads,
the desk database's writes and the view's update after the verdict
(``refresh``: the overlay re-read) run in worker threads, so
other requests (/healthz here) are answered while a verdict is recorded.

Each case makes one step of ``Verdicts.record`` slow: the step waits until
/healthz has been answered (at most ``HOLD_S``). Run on the event loop, the
step holds /healthz back until it gives up; off the loop, /healthz is
answered at once and the step goes on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from streams.desk import create_app
from streams.settings import Settings
from tests.desk_support import small_store

EDITOR_TOKEN = "editor-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
HOLD_S = 5.0  # how long a slow step waits for /healthz to be answered


class Gate:
    """Wraps a callable: its first call (once armed) says it has started,
    then waits for /healthz to be answered before doing its work."""

    def __init__(self, fn):
        self.fn = fn
        self.entered = threading.Event()
        self.answered = threading.Event()
        self.answered_while_held: bool | None = None
        self._used = False

    def __call__(self, *args, **kwargs):
        if not self._used:
            self._used = True
            self.entered.set()
            self.answered_while_held = self.answered.wait(HOLD_S)
        return self.fn(*args, **kwargs)


@pytest.fixture
def data(tmp_path) -> Path:
    small_store(tmp_path)
    return tmp_path


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")


@pytest.mark.parametrize("owner,name,verdict,cold", [
    # the cluster's own read, when the cache is cold: a full reload of the findings
    ("store", "recent_clusters", "needs-review", True),
    # the view brought up to date after the verdict: the overlay table re-read (no store read any more)
    ("db", "overlay", "fake", False),
    # the audit row and the effects row: SQLite writes with a 30 s busy timeout
    ("db", "add_verdict", "needs-review", False),
    ("db", "record_effects", "fake", False),
    # refresh() waits on the lock a page request's reload holds
    ("source", "refresh", "needs-review", False),
], ids=["cold-read", "reload-after-verdict", "add-verdict", "record-effects", "refresh"])
def test_desk_answers_while_a_verdict_is_recorded(data, env, monkeypatch, owner, name, verdict, cold):
    s = Settings(data_dir=data)
    s.desk.account_check_s = 3600  # the background check runs once at start
    with TestClient(create_app(s), base_url="http://127.0.0.1") as c:
        desk = c.app.state.desk
        assert c.get("/api/clusters/c-quiet", headers=EDITOR).status_code == 200  # the cache is warm
        target = {"store": desk.source.store, "db": desk.db, "source": desk.source}[owner]
        gate = Gate(getattr(target, name))
        monkeypatch.setattr(target, name, gate)
        if cold:
            desk.source.invalidate()

        got = {}
        poster = threading.Thread(target=lambda: got.update(r=c.post(
            "/api/clusters/c-quiet/verdict", json={"verdict": verdict, "note": "checked"}, headers=EDITOR)))
        poster.start()
        try:
            assert gate.entered.wait(30), f"{owner}.{name} was not called by the verdict"
            t0 = time.monotonic()
            health = c.get("/healthz")
            took = time.monotonic() - t0
        finally:
            gate.answered.set()
            poster.join(60)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert gate.answered_while_held, f"/healthz waited for {owner}.{name} ({took:.1f} s): it ran on the event loop"
        assert took < HOLD_S / 2

        # the verdict itself is recorded as before, with its effects
        r = got["r"]
        assert r.status_code == 201, r.text
        rec = r.json()
        assert rec["cluster_id"] == "c-quiet" and rec["verdict"] == verdict
        assert "c-quiet" in rec["effects"]["clusters"]
        if verdict == "fake":
            assert rec["effects"]["bank"] == "desk-fake" and rec["effects"]["bank_entries_added"] >= 1
            assert "c-quiet:desk-fake" in rec["effects"]["alerts"]
        else:
            assert rec["effects"]["alerts"] == []
        detail = c.get("/api/clusters/c-quiet", headers=EDITOR).json()
        assert detail["desk"]["verdict"] == verdict
        assert [h["verdict"] for h in detail["verdict_history"]] == [verdict]
