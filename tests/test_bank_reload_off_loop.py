"""A changed bank file is reloaded off the event loop: small pictures are
analysed on the loop (``streams.stage``), and reading a large bank takes
seconds (or waits out a writer's lock, then raises). Until the new banks are
loaded the loop matches against the ones it has; a thread waits for them."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sqlite3
import threading
import time
from functools import partial
from types import SimpleNamespace

import pytest

import detectors.banks as banks_module
from streams.analyze import Analyzer
from streams.records import ImageEvent, SourceRef
from streams.settings import Settings
from tests.support import picture

SOURCE = SourceRef(topic="events", partition=0, offset=0)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed, (200, 150)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _event(n: int) -> ImageEvent:
    return ImageEvent.model_validate({"event_id": f"e{n}", "platform": "x", "account_id": "a",
                                      "posted_at": "2026-12-01T10:00:00Z",
                                      "image": {"url": f"https://img.example/{n}.jpg"}})


def _banked(seen) -> list[str]:
    return [e.detector for e in seen.evidence if e.kind == "bank"]


@pytest.fixture
def world(tmp_path):
    """A bank holding picture 1 (bank "old"), loaded by an analyzer; picture 2
    is on disk, ready to be banked (bank "new")."""
    settings = Settings(data_dir=tmp_path / "data")
    pics = {}
    for seed in (1, 2):
        pics[seed] = _jpeg(seed)
        (tmp_path / f"p{seed}.jpg").write_bytes(pics[seed])
    store = settings.bank_store()
    store.add_images("old", "fake", [tmp_path / "p1.jpg"])
    store.close()
    analyzer = Analyzer(settings, tmp_path / "blobs")
    first = analyzer.analyze(_event(0), pics[1], SOURCE)  # no running loop: loaded at once
    assert first.banks_checked and _banked(first) == ["bank:old"]

    def bank_picture_2():
        store = settings.bank_store()
        store.add_images("new", "fake", [tmp_path / "p2.jpg"])
        store.close()
        _bump_mtime(settings.banks_path)

    return SimpleNamespace(settings=settings, pics=pics, analyzer=analyzer, bank_picture_2=bank_picture_2)


def _bump_mtime(path) -> None:
    # a change the 2 s check cannot miss, however coarse the file system's clock
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _check_now(analyzer: Analyzer) -> None:
    analyzer._banks_checked = float("-inf")  # the next analysis looks at the bank file (at most every 2 s)


def _on_loop(fn, *args):
    """``fn(*args)`` called on a running event loop, as the analyze stage does
    for small pictures; returns its result and how long it took."""
    async def call():
        started = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - started
    return asyncio.run(call())


def test_a_slow_reload_does_not_hold_the_loop_which_answers_from_the_banks_it_has(world, monkeypatch):
    real_load = banks_module.BankStore._load
    release = threading.Event()

    def slow_load(self):
        if self._cache is None:
            release.wait(30)  # a bank of a few hundred thousand entries, held until the loop has answered
        return real_load(self)

    monkeypatch.setattr(banks_module.BankStore, "_load", slow_load)
    world.bank_picture_2()
    _check_now(world.analyzer)
    seen, took = _on_loop(world.analyzer.analyze, _event(1), world.pics[1], SOURCE)
    assert took < 10, f"the loop waited {took:.1f}s for the bank reload"  # held: 30 s
    assert seen.banks_checked and _banked(seen) == ["bank:old"]  # the banks loaded before
    before, _ = _on_loop(world.analyzer.analyze, _event(2), world.pics[2], SOURCE)
    assert before.banks_checked and _banked(before) == []  # not loaded yet

    release.set()
    world.analyzer.bank_reload().result(timeout=30)
    after, _ = _on_loop(world.analyzer.analyze, _event(3), world.pics[2], SOURCE)
    assert after.banks_checked and _banked(after) == ["bank:new"]


def test_a_bank_locked_by_a_writer_neither_raises_nor_drops_the_banks(world, monkeypatch, caplog):
    # `deepwatch bank import` of a large list holds the file's lock; opening
    # it waits SQLite's timeout (5 s; 0.2 s here), then raises.
    monkeypatch.setattr(banks_module, "sqlite3", SimpleNamespace(connect=partial(sqlite3.connect, timeout=0.2)))
    writer = sqlite3.connect(world.settings.banks_path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        _bump_mtime(world.settings.banks_path)
        _check_now(world.analyzer)
        with caplog.at_level(logging.WARNING, logger="streams.analyze"):
            seen, _ = _on_loop(world.analyzer.analyze, _event(1), world.pics[1], SOURCE)
            assert seen.banks_checked and _banked(seen) == ["bank:old"]
            world.analyzer.bank_reload().result(timeout=30)
            assert any("bank reload failed" in r.getMessage() for r in caplog.records)
            # a thread waits for the reload, which fails again: still the banks it had
            _check_now(world.analyzer)
            seen = world.analyzer.analyze(_event(2), world.pics[1], SOURCE)
            assert seen.banks_checked and _banked(seen) == ["bank:old"]
    finally:
        writer.rollback()
        writer.close()
    # the lock gone, the next check loads the file again, new entries included
    world.bank_picture_2()
    _check_now(world.analyzer)
    seen = world.analyzer.analyze(_event(3), world.pics[2], SOURCE)  # a thread: it waits, and sees them at once
    assert seen.banks_checked and _banked(seen) == ["bank:new"]


def test_a_worker_that_starts_with_a_bank_uses_it_from_its_first_picture_on_the_loop(tmp_path):
    # nothing to answer from yet: the first load is waited for, even on the
    # loop (once), or the first sightings of a restarted worker would miss
    # the allow-list
    settings = Settings(data_dir=tmp_path / "data")
    data = _jpeg(1)
    (tmp_path / "p1.jpg").write_bytes(data)
    store = settings.bank_store()
    store.add_images("wire", "authentic", [tmp_path / "p1.jpg"])
    store.close()
    seen, _ = _on_loop(Analyzer(settings, tmp_path / "blobs").analyze, _event(0), data, SOURCE)
    assert seen.banks_checked and _banked(seen) == ["bank:wire"]
