"""The test suite's PostgreSQL is a real server: it takes connections,
transactions and concurrent clients, and each test gets its own database."""

from __future__ import annotations

import psycopg

from tests.postgres import PostgresServer


def test_each_test_gets_a_fresh_database_on_a_real_server(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    with psycopg.connect(postgres_url) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None and int(version[0]) >= 150000
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
    with postgres_server.database() as other, psycopg.connect(other) as conn:
        # Another database on the same server does not see this test's table.
        found = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'").fetchone()
        assert found == (0,)


async def test_concurrent_async_clients(postgres_url: str) -> None:
    conns = [await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) for _ in range(5)]
    try:
        await conns[0].execute("CREATE TABLE c (n int)")
        for i, conn in enumerate(conns):
            await conn.execute("INSERT INTO c VALUES (%s)", (i,))
        cur = await conns[-1].execute("SELECT sum(n) FROM c")
        assert await cur.fetchone() == (10,)
    finally:
        for conn in conns:
            await conn.close()
