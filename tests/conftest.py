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
