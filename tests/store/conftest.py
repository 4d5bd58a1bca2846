"""A real store server on port 0 — over a SQLite file in tmp_path, and over a fresh
database on a real PostgreSQL server — and a real channel to it.

``store_stub`` is the conformance suite's entry point: one in-process server per
backend in ``BACKENDS``, on a clock the test advances (``clock``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from dispatch.shared.config import StoreConfig
from dispatch.shared.server import GRPC_OPTIONS
from dispatch.store.backend import Store
from dispatch.store.postgres import PostgresStore
from dispatch.store.server import serve
from dispatch.store.sqlite import SQLiteStore
from dispatch.v1 import store_pb2_grpc
from tests.store.harness import FakeClock, RunningStore

if TYPE_CHECKING:
    from tests.store.harness import Stub

# Every backend the store's suites run against, unchanged. PostgreSQL is a real
# server (tests/postgres.py), never skipped.
BACKENDS = ["sqlite", "postgres"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked sqlite_only look inside the SQLite file: run them on SQLite alone."""
    deselected = [
        item
        for item in items
        if item.get_closest_marker("sqlite_only") is not None
        and getattr(item, "callspec", None) is not None
        and item.callspec.params.get("store_cfg") == "postgres"  # type: ignore[attr-defined]
    ]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # A directory that does not exist yet: the store must create it.
    return tmp_path / "data" / "store.db"


@pytest.fixture(params=BACKENDS)
def store_cfg(request: pytest.FixtureRequest, tmp_path: Path, db_path: Path) -> StoreConfig:
    if request.param == "postgres":
        database_url = str(request.getfixturevalue("postgres_url"))
    else:
        database_url = f"sqlite:///{db_path}"
    return StoreConfig(
        listen="127.0.0.1:0",
        database_url=database_url,
        default_workspace_root=str(tmp_path / "default-root"),
    )


@pytest.fixture
async def store(store_cfg: StoreConfig) -> AsyncIterator[RunningStore]:
    running = await RunningStore.start(store_cfg)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def open_backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Store:
    name = request.param
    if name == "postgres":
        return await PostgresStore.open(
            str(request.getfixturevalue("postgres_url")),
            default_workspace_root=str(tmp_path / "default-root"),
            clock=clock,
        )
    if name == "sqlite":
        return await SQLiteStore.open(
            f"sqlite:///{tmp_path / 'conformance' / 'store.db'}",
            default_workspace_root=str(tmp_path / "default-root"),
            clock=clock,
        )
    raise ValueError(f"no conformance fixture for backend {name!r}")


@pytest.fixture(params=BACKENDS)
async def store_stub(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Stub]:
    backend = await open_backend(request, tmp_path, clock)
    hosted = await serve(backend, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}", options=GRPC_OPTIONS)
    try:
        yield store_pb2_grpc.ConversationStoreStub(channel)
    finally:
        await channel.close()
        await hosted.stop(1.0)
