"""What deepwatch writes into its data directory is owner-only: after
`deepwatch replay` and a desk verdict, findings.sqlite (whose alerts hold the
verdict's note and editor name), engine-state.sqlite* and logs/*.log were
-rw-r--r-- in a 0755 data dir at umask 0022, while desk.sqlite was 0600. Now
each is made 0600 (SQLite gives -wal and -shm the database's mode), a data
dir or logs dir deepwatch makes is 0700, and a file found wider is narrowed
when this process owns it (``streams.private_files``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.settings import Settings
from tests.desk_support import REPO
from tests.support import mode_of


def _use_all(data: Path) -> list:
    """Each store opened in ``data`` and written, so that its -wal and -shm
    are there (the last connection to close removes them): the open stores,
    to close."""
    from streams.desk.deskdb import DeskDB
    from streams.engine_state import open_engine_state
    from streams.store import SqliteFindingsStore

    store = SqliteFindingsStore(data / "findings.sqlite")
    state = open_engine_state(data)
    desk = DeskDB(data / "desk.sqlite")
    state.put({"c1": b"state"})
    desk.new_session("alice", "editor", 1, "x")
    store._db.execute("CREATE TABLE IF NOT EXISTS probe (x)")
    store._db.execute("INSERT INTO probe VALUES (1)")
    return [store, state, desk]


def _close(opened: list) -> None:
    for s in opened:
        s.close()


STORES = ("findings.sqlite", "engine-state.sqlite", "desk.sqlite")
ALL = {name + suffix for name in STORES for suffix in ("", "-wal", "-shm")}


def test_each_store_is_created_owner_only_in_a_data_dir_deepwatch_makes_0700(tmp_path, umask_022):
    data = tmp_path / "new" / "data"
    opened = _use_all(data)
    try:
        assert {p.name: mode_of(p) for p in data.iterdir() if p.is_file()} == dict.fromkeys(ALL, 0o600)
    finally:
        _close(opened)
    assert mode_of(data) == 0o700 and mode_of(data.parent) == 0o700


def test_files_made_wider_before_are_narrowed_and_a_users_own_directory_is_left_alone(tmp_path, umask_022, caplog):
    data = tmp_path / "mine"
    data.mkdir(mode=0o755)  # the user's own data dir: shared on purpose, perhaps
    first = _use_all(data)
    try:
        for p in data.iterdir():
            os.chmod(p, 0o644)  # as deepwatch before this one left them
        with caplog.at_level(logging.WARNING, logger="streams.private_files"):
            second = _use_all(data)
        # each narrowing said (an upgrade takes a shared group's access away), naming the file and both modes
        said = [r.getMessage() for r in caplog.records if r.name == "streams.private_files"]
        assert len(said) == len(ALL) and all("owner-only (-rw-r--r-- -> -rw-------)" in m for m in said), said
        assert any(str(data / "findings.sqlite") + " " in m for m in said)
        assert {p.name: mode_of(p) for p in data.iterdir() if p.is_file()} == dict.fromkeys(ALL, 0o600)
        _close(second)
    finally:
        _close(first)
    assert mode_of(data) == 0o755


def test_a_file_of_another_user_is_left_as_it_is_with_a_warning(tmp_path, umask_022, caplog):
    from streams.private_files import owner_only

    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    path = tmp_path / "findings.sqlite"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    os.chown(path, 65534, 65534)
    with caplog.at_level(logging.WARNING, logger="streams.private_files"):
        owner_only(path, "findings store")
    assert mode_of(path) == 0o644
    [said] = [r.getMessage() for r in caplog.records]
    assert "cannot make the findings store" in said and "owned by uid 65534" in said and "-rw-r--r--" in said


def test_owner_only_leaves_a_directory_in_the_files_place_and_a_closed_file_alone(tmp_path, umask_022):
    from streams.private_files import owner_only, private_dir

    (tmp_path / "findings.sqlite").mkdir()  # the store's error says this, not a chmod to 0600
    owner_only(tmp_path / "findings.sqlite", "findings store")
    assert mode_of(tmp_path / "findings.sqlite") == 0o755
    closed = tmp_path / "closed"
    closed.write_bytes(b"")
    os.chmod(closed, 0o000)  # never widened
    owner_only(closed, "file")
    assert mode_of(closed) == 0
    owner_only(tmp_path / "missing" / "x", "file")  # no directory to make it in: left to the opener
    assert not (tmp_path / "missing").exists()
    made = private_dir(tmp_path / "a" / "b")
    assert made.is_dir() and mode_of(tmp_path / "a") == 0o700 and mode_of(made) == 0o700
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FileExistsError):
        private_dir(tmp_path / "f")


def replay_two_pictures(tmp_path: Path, data: Path) -> None:
    """``deepwatch replay`` of a two-picture feed (made in ``tmp_path``) into ``data``, as a user runs it."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    lines = []
    for i in range(2):
        Image.new("RGB", (160, 120), (40 + 90 * i, 20, 200 - 80 * i)).save(tmp_path / "images" / f"p{i}.jpg")
        lines.append(json.dumps({"event_id": f"e{i}", "platform": "x", "account_id": "acct",
                                 "posted_at": "2026-12-01T10:00:00Z", "image": {"path": f"images/p{i}.jpg"}}))
    (tmp_path / "feed.jsonl").write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "replay", "feed.jsonl", "--data-dir", str(data),
                        "--workers", "1", "--no-wait-models"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "2 new sightings" in r.stderr, r.stderr[-3000:]


def test_a_replay_leaves_its_store_state_and_logs_owner_only(tmp_path, umask_022):
    data = tmp_path / "data"
    replay_two_pictures(tmp_path, data)
    assert mode_of(data) == 0o700 and mode_of(data / "logs") == 0o700
    wide = {str(p.relative_to(data)): oct(mode_of(p)) for pattern in ("findings.sqlite*", "engine-state.sqlite*",
                                                                      "logs/*.log")
            for p in data.glob(pattern) if mode_of(p) != 0o600}
    assert not wide, wide
    # its -wal and -shm are gone with the last connection (their modes: test_each_store_is_created_owner_only...)
    assert (data / "findings.sqlite").exists()
    assert any(p.name.startswith("worker-pipeline") for p in data.glob("logs/*.log"))
    assert (data / "logs" / "tansu.log").exists()


def test_a_banks_file_is_created_owner_only_in_a_data_dir_deepwatch_makes_0700(tmp_path, umask_022):
    """The banks hold desks' hash lists (ids, labels, maybe under sharing
    agreements) and thumbnails of banked pictures: as private as findings."""
    data = tmp_path / "new" / "data"
    store = Settings(data_dir=data).bank_store()
    try:
        assert store.list_banks() == []
    finally:
        store.close()
    assert {p.name: mode_of(p) for p in data.iterdir() if p.is_file()} == {"banks.sqlite": 0o600}
    assert mode_of(data) == 0o700
