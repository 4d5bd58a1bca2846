"""A real store server on port 0 over a SQLite file in tmp_path, and a real channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dispatch.shared.config import StoreConfig
from tests.store.harness import RunningStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # A directory that does not exist yet: the store must create it.
    return tmp_path / "data" / "store.db"


@pytest.fixture
def store_cfg(tmp_path: Path, db_path: Path) -> StoreConfig:
    return StoreConfig(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{db_path}",
        default_workspace_root=str(tmp_path / "default-root"),
    )


@pytest.fixture
async def store(store_cfg: StoreConfig) -> AsyncIterator[RunningStore]:
    running = await RunningStore.start(store_cfg)
    try:
        yield running
    finally:
        await running.stop()
