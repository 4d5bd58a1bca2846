"""The PostgreSQL store's pool size: configured by flag, environment or file, checked, and
honoured: a store never holds more connections than it says."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dispatch.shared import config
from dispatch.shared.config import DEFAULT_POOL_SIZE, ConfigError, StoreConfig
from dispatch.store.postgres import PostgresStore
from dispatch.store.server import open_store
from dispatch.store.sqlite import SQLiteStore
from dispatch.v1 import store_pb2
from tests.store.harness import TENANT, RunningStore, new_conversation

POOL_SIZE_KEY = r"store\.pool_size \(--pool-size, DISPATCH_STORE_POOL_SIZE\)"


@pytest.mark.parametrize(
    ("flags", "env", "file", "size"),
    [
        ({}, {}, {}, DEFAULT_POOL_SIZE),
        ({}, {}, {"store": {"pool_size": 3}}, 3),
        ({}, {"DISPATCH_STORE_POOL_SIZE": "5"}, {"store": {"pool_size": 3}}, 5),
        ({"pool_size": "2"}, {"DISPATCH_STORE_POOL_SIZE": "5"}, {"store": {"pool_size": 3}}, 2),
        ({"pool_size": None}, {"DISPATCH_STORE_POOL_SIZE": ""}, {}, DEFAULT_POOL_SIZE),
    ],
)
def test_the_pool_size_comes_from_flag_then_environment_then_file(
    flags: dict[str, Any], env: dict[str, str], file: dict[str, Any], size: int
) -> None:
    assert config.store_config(flags, env, file).pool_size == size


@pytest.mark.parametrize(
    ("flags", "env", "file", "words"),
    [
        ({"pool_size": "0"}, {}, {}, "must be 1 or more connections, got 0"),
        ({}, {"DISPATCH_STORE_POOL_SIZE": "-2"}, {}, "must be 1 or more connections, got -2"),
        ({}, {"DISPATCH_STORE_POOL_SIZE": "many"}, {}, "must be an integer, got 'many'"),
        ({}, {}, {"store": {"pool_size": 2.5}}, "must be an integer, got 2.5"),
        ({}, {}, {"store": {"pool_size": True}}, "must be an integer, got True"),
        ({}, {}, {"store": {"pool_size": "eight"}}, "must be an integer, got 'eight'"),
    ],
)
def test_a_bad_pool_size_is_a_config_error_naming_its_key(
    flags: dict[str, Any], env: dict[str, str], file: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^config key {POOL_SIZE_KEY} {words}$"):
        config.store_config(flags, env, file)


def test_the_config_file_takes_the_pool_size_key(tmp_path: Path) -> None:
    path = tmp_path / "dispatch.toml"
    path.write_text("[store]\npool_size = 4\n")
    assert config.store_config({}, {}, config.load_file(str(path))).pool_size == 4
    path.write_text("[store]\npool_sise = 4\n")
    with pytest.raises(ConfigError, match="did you mean 'pool_size'"):
        config.load_file(str(path))


def test_dispatchd_store_takes_a_pool_size_flag() -> None:
    from dispatch import cli

    args = cli.parser().parse_args(["store", "--pool-size", "3"])
    assert config.store_config(vars(args), {}, {}).pool_size == 3


async def test_a_store_opened_with_no_connections_is_refused(postgres_url: str) -> None:
    with pytest.raises(ConfigError, match=r"store\.pool_size must be 1 or more connections, got 0"):
        await PostgresStore.open(postgres_url, default_workspace_root="/r", pool_size=0)


async def connections_to(url: str, where: str = "pid <> pg_backend_pid()") -> int:
    """How many connections to ``url``'s database the server has (other than the one asking)
    for which ``where`` holds."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {where}"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("size", [1, 3])
async def test_a_store_holds_at_most_pool_size_connections(postgres_url: str, size: int) -> None:
    store = await open_store(postgres_url, default_workspace_root="/r", pool_size=size)
    try:
        conv = await store.create_conversation(TENANT)
        # Many more calls at once than connections: they wait for one, and all succeed.
        got = await asyncio.gather(*(store.get_conversation(TENANT, conv.id) for _ in range(4 * size + 4)))
        assert {c.id for c in got} == {conv.id}
        # Opened on demand and kept: as many as the calls could use, never more.
        assert await connections_to(postgres_url) == size
    finally:
        await store.close()
    assert await connections_to(postgres_url) == 0


async def waiting_for_locks(url: str) -> int:
    return await connections_to(url, "wait_event_type = 'Lock'")


async def test_the_store_server_opens_postgresql_with_the_configured_pool_size(
    postgres_url: str, tmp_path: Path
) -> None:
    cfg = StoreConfig(
        listen="127.0.0.1:0",
        database_url=postgres_url,
        default_workspace_root=str(tmp_path),
        pool_size=2,
    )
    running = await RunningStore.start(cfg)
    try:
        conv = await new_conversation(running.stub)
        rename = store_pb2.UpdateConversationRequest(tenant_id=TENANT, conversation_id=conv.id, title="t")
        async with await psycopg.AsyncConnection.connect(postgres_url) as holder:
            async with holder.transaction():
                # Every rename waits for the conversation's row, on a connection of its own.
                await holder.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (conv.id,))
                renames = [asyncio.ensure_future(running.stub.UpdateConversation(rename)) for _ in range(6)]
                while await waiting_for_locks(postgres_url) < 2:
                    await asyncio.sleep(0.01)
                # Room for the other four, had the pool more connections than configured.
                await asyncio.sleep(0.3)
                assert await waiting_for_locks(postgres_url) == 2
            assert {r.title for r in await asyncio.gather(*renames)} == {"t"}
        assert await connections_to(postgres_url) == 2
    finally:
        await running.stop()


async def test_sqlite_takes_no_pool_size_and_keeps_its_one_connection(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'db'}", default_workspace_root="/r", pool_size=1)
    try:
        assert isinstance(store, SQLiteStore)
        conv = await store.create_conversation(TENANT)
        await asyncio.gather(*(store.get_conversation(TENANT, conv.id) for _ in range(8)))
    finally:
        await store.close()
