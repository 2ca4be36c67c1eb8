from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


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
