"""Two desks on one data dir: a verdict recorded on one is what the other
shows, without a restart. Each desk caches its view of the clusters with the
overlay applied, keyed on the desk database's version; that version counted
only the desk's own writes, so a verdict recorded by a second ``deepwatch
serve`` showed in the first desk's verdict-history table (read from
desk.sqlite on every page) while its cluster document said ``desk: null`` and
its ``?verdict=`` filters missed the cluster until it restarted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from streams.desk import create_app
from streams.settings import Settings
from tests.desk_support import DeskServer, small_store
from tests.test_desk_verdict_overlay import FULL_READS, Counting

EDITOR_TOKEN = "editor-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
TOKENS = {"DEEPWATCH_DESK_TOKENS": f"editor:ed:{EDITOR_TOKEN}"}


def queue_ids(get, **params) -> set[str]:
    r = get("/api/clusters", params={"limit": 100, **params}, headers=EDITOR)
    assert r.status_code == 200, r.text
    return {d["id"] for d in r.json()}


def test_a_verdict_on_one_desk_process_shows_on_the_other(tmp_path):
    small_store(tmp_path)
    a = DeskServer(tmp_path, env=TOKENS)
    try:
        b = DeskServer(tmp_path, env=TOKENS)
        try:
            with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
                # both views warm (cached) before the verdict
                assert on_a.get("/api/clusters/c-photo", headers=EDITOR).json().get("desk") is None
                assert "c-photo" not in queue_ids(on_a.get, verdict="authentic")
                assert "c-photo" in queue_ids(on_a.get, verdict="unreviewed")
                on_b.get("/api/clusters/c-photo", headers=EDITOR)

                r = on_b.post("/api/clusters/c-photo/verdict", json={"verdict": "authentic", "note": "on desk B"},
                              headers=EDITOR)
                assert r.status_code == 201, r.text

                doc = on_a.get("/api/clusters/c-photo", headers=EDITOR).json()
                assert (doc.get("desk") or {}).get("verdict") == "authentic", doc.get("desk")
                assert [h["note"] for h in doc["verdict_history"]] == ["on desk B"]
                assert "c-photo" in queue_ids(on_a.get, verdict="authentic")
                assert "c-photo" not in queue_ids(on_a.get, verdict="unreviewed")
                page = on_a.get("/", params={"verdict": "authentic"}, headers=EDITOR).text
                assert "/clusters/c-photo" in page
                # and the other way round: desk A changes its mind, desk B follows
                r = on_a.post("/api/clusters/c-photo/verdict", json={"verdict": "fake", "note": "on desk A"},
                              headers=EDITOR)
                assert r.status_code == 201, r.text
                assert on_b.get("/api/clusters/c-photo", headers=EDITOR).json()["desk"]["verdict"] == "fake"
                assert "c-photo" in queue_ids(on_b.get, verdict="fake")
                assert "c-photo" not in queue_ids(on_b.get, verdict="authentic")
        finally:
            b.stop()
    finally:
        a.stop()


def app_client(data: Path) -> TestClient:
    s = Settings(data_dir=data)
    s.desk.account_check_s = 3600  # the background check runs once at start
    return TestClient(create_app(s), base_url="http://127.0.0.1")


def test_another_desks_verdict_is_applied_in_place_and_its_logins_cost_no_read(tmp_path, monkeypatch):
    """In one process, two desk apps (each its own desk.sqlite connection):
    the other desk's verdict is applied to the cached view in place
    (``_reoverlay``), as the desk's own is, not by a full read of the view;
    a write that changes no verdict (the other desk's login session) leaves
    the view as it was."""
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")
    small_store(tmp_path)
    with app_client(tmp_path) as a, app_client(tmp_path) as b:
        src = a.app.state.desk.source
        assert "c-quiet" not in queue_ids(a.get, verdict="fake")
        src.store = store = Counting(src.store)
        before = src._all()

        b.app.state.desk.db.new_session("bob", "viewer", 1.0, "")  # desk B writes, no verdict
        assert src._all() is before
        assert store.take() == Counter()

        r = b.post("/api/clusters/c-quiet/verdict", json={"verdict": "fake", "note": "from B"}, headers=EDITOR)
        assert r.status_code == 201, r.text
        assert "c-quiet" in queue_ids(a.get, verdict="fake")
        assert a.get("/api/clusters/c-quiet", headers=EDITOR).json()["desk"]["verdict"] == "fake"
        assert not set(store.take()) & set(FULL_READS)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
