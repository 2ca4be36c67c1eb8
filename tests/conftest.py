from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _no_settings_file_leaks():
    """A command run in this process with ``--config`` exports it as
    DEEPWATCH_CONFIG (``streams.settings.load_settings``, as the real CLI
    does for its workers): put it back as it was, so the next test in this
    pytest worker, and every process it starts, does not read that file."""
    before = os.environ.get("DEEPWATCH_CONFIG")
    yield
    if before is None:
        os.environ.pop("DEEPWATCH_CONFIG", None)
    else:
        os.environ["DEEPWATCH_CONFIG"] = before


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared test data (../shared/data), read in place."""
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip(f"shared test data not found at {d} (only present beside the project checkout)")
    return d


@pytest.fixture
def fake_es():
    """A loopback fake of the Elasticsearch endpoints deepwatch uses (tests/fake_es.py)."""
    from tests.fake_es import FakeElasticsearch

    es = FakeElasticsearch().start()
    yield es
    es.stop()
    assert not es.crashes, "fake ES hit a gap:\n" + "\n".join(es.crashes)
    assert not es.unhandled, f"deepwatch called endpoints the fake does not know: {[(r.method, r.path) for r in es.unhandled]}"


@pytest.fixture(params=["sqlite", "es"])
def backend(request, tmp_path) -> tuple[Path, str | None]:
    """The desk tests' small store (tests/desk_support.py) on each findings
    backend: the SQLite file in the data dir, or Elasticsearch (the loopback
    fake in tests/fake_es.py). Yields (data dir, store URL; None = the data
    dir's SQLite file)."""
    from tests.desk_support import small_store

    if request.param == "sqlite":
        small_store(tmp_path)
        yield tmp_path, None
        return
    from streams.es_store import EsFindingsStore

    es = request.getfixturevalue("fake_es")
    small_store(tmp_path, EsFindingsStore.from_url(es.url))
    assert not (tmp_path / "findings.sqlite").exists()  # the desk must not fall back to a SQLite file
    yield tmp_path, es.url


@pytest.fixture
def umask_022():
    """The common umask, under which a file made without a mode of its own is
    readable by every local user (``streams.private_files``)."""
    old = os.umask(0o022)
    yield
    os.umask(old)
