"""The fault suites run every scenario on both store backends: a SQLite file and a fresh
database on the session's real PostgreSQL server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The seed of the random kill points when DISPATCH_FAULT_SEED does not give one.
DEFAULT_SEED = 1212


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("DISPATCH_FAULT_SEED", DEFAULT_SEED))
