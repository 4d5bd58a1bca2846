"""The PostgreSQL dialect of the SQL store: for a store shared by more than one machine.

Every call borrows one connection from a pool of its own (``pool_size`` connections at
most) and runs in one transaction. Writes that depend on a conversation's high-water marks
lock the conversation row (``SELECT ... FOR UPDATE``) first, so concurrent appenders, in
this process or another, queue on that row and seq stays gap-free without retry loops.
Reads run REPEATABLE READ, so a conversation row and the history read with it come from one
snapshot.

The store's operations and statements are ``sql``'s; this is the pool, its transactions,
``PostgresTx`` (how a statement runs here) and the schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, AsyncCursor, pq
from psycopg.rows import DictRow, dict_row

from dispatch.shared.config import DEFAULT_POOL_SIZE, ConfigError
from dispatch.shared.errors import Unavailable
from dispatch.store.backend import MAX_APPEND_BYTES
from dispatch.store.rows import Row
from dispatch.store.sql import Schema, SQLStore, Tx, insert_sql

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")

# How long opening a connection may take before the store reports the database unavailable.
CONNECT_TIMEOUT_SECONDS = 10

# Taken (transaction-scoped) around every migration step, so two processes starting
# on one database migrate one after the other. Any fixed 64-bit number works; this
# one is "dispatch" in ASCII.
MIGRATION_LOCK_KEY = 0x6469737061746368

Cursor = AsyncCursor[DictRow]

T = TypeVar("T")

# Taken (transaction-scoped) by an admission under a cluster-wide limit on running turns
# (``count_started``), so two kernels never both see the last free slot.
ADMISSION_LOCK = 0x646973706174636B

# Append-only: a released migration is never edited, only followed by a new one.
# Each runs in its own transaction together with its schema_version row. Same tables
# and versions as the SQLite backend; timestamps are nanoseconds since the epoch, 0 = unset.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE workspaces (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                name TEXT NOT NULL,
                root TEXT NOT NULL,
                default_computer_id TEXT NOT NULL DEFAULT '',
                default_agent TEXT NOT NULL DEFAULT '',
                is_default BOOLEAN NOT NULL DEFAULT FALSE,
                created_at BIGINT NOT NULL
            )""",
            "CREATE INDEX workspaces_by_tenant ON workspaces (tenant_id, created_at, id)",
            # At most one default workspace per tenant, even if two processes race to create it.
            "CREATE UNIQUE INDEX workspaces_one_default ON workspaces (tenant_id) WHERE is_default",
            """CREATE TABLE conversations (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                workspace_id TEXT NOT NULL REFERENCES workspaces (id),
                title TEXT NOT NULL DEFAULT '',
                cwd TEXT NOT NULL DEFAULT '',
                computer_id TEXT NOT NULL DEFAULT '',
                agent TEXT NOT NULL DEFAULT '',
                last_seq BIGINT NOT NULL DEFAULT 0,
                last_event_seq BIGINT NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
            "CREATE INDEX conversations_by_tenant ON conversations (tenant_id, created_at, id)",
            "CREATE INDEX conversations_by_workspace ON conversations (workspace_id, created_at, id)",
            # body is the whole Message as committed (seq, created_at and chunks included);
            # the other columns are copies for filtering without parsing.
            """CREATE TABLE messages (
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                role INTEGER NOT NULL,
                turn_id TEXT NOT NULL,
                step_index INTEGER NOT NULL,
                created_at BIGINT NOT NULL,
                body BYTEA NOT NULL,
                PRIMARY KEY (conversation_id, seq)
            )""",
            """CREATE TABLE events (
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                event_seq BIGINT NOT NULL,
                turn_id TEXT NOT NULL,
                body BYTEA NOT NULL,
                PRIMARY KEY (conversation_id, event_seq)
            )""",
            """CREATE TABLE turns (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                state INTEGER NOT NULL,
                idempotency_key TEXT NOT NULL DEFAULT '',
                lease_owner TEXT NOT NULL DEFAULT '',
                lease_expires_at BIGINT NOT NULL DEFAULT 0,
                finish_reason INTEGER NOT NULL DEFAULT 0,
                error_message TEXT NOT NULL DEFAULT '',
                computer_id TEXT NOT NULL DEFAULT '',
                cwd TEXT NOT NULL DEFAULT '',
                agent TEXT NOT NULL DEFAULT '',
                user_message_seq BIGINT NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                started_at BIGINT NOT NULL DEFAULT 0,
                ended_at BIGINT NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX turns_by_conversation ON turns (conversation_id, created_at, id)",
            "CREATE UNIQUE INDEX turns_idempotency ON turns (conversation_id, idempotency_key) "
            "WHERE idempotency_key <> ''",
        ),
    ),
    (
        2,
        (
            # Leases, metrics, the message queue, approvals and API keys.
            "CREATE INDEX turns_by_lease_expiry ON turns (lease_expires_at) WHERE lease_owner <> ''",
            # body is the TurnMetrics without step_metrics, which live in step_metrics.
            """CREATE TABLE turn_metrics (
                turn_id TEXT PRIMARY KEY REFERENCES turns (id) ON DELETE CASCADE,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                body BYTEA NOT NULL
            )""",
            "CREATE INDEX turn_metrics_by_conversation ON turn_metrics (conversation_id)",
            """CREATE TABLE step_metrics (
                turn_id TEXT NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
                step_index INTEGER NOT NULL,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                body BYTEA NOT NULL,
                PRIMARY KEY (turn_id, step_index)
            )""",
            "CREATE INDEX step_metrics_by_conversation ON step_metrics (conversation_id)",
            # An identity never hands an id out twice, even after the queue drains. A drained
            # row stays (drained_at set) so its idempotency key keeps answering it.
            """CREATE TABLE queue (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                idempotency_key TEXT NOT NULL DEFAULT '',
                body BYTEA NOT NULL,
                created_at BIGINT NOT NULL,
                drained_at BIGINT NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX queue_pending ON queue (conversation_id, id) WHERE drained_at = 0",
            "CREATE UNIQUE INDEX queue_idempotency ON queue (conversation_id, idempotency_key) "
            "WHERE idempotency_key <> ''",
            # body is the whole Approval as it stands; decision is copied out for filtering.
            """CREATE TABLE approvals (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                decision INTEGER NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                body BYTEA NOT NULL
            )""",
            "CREATE INDEX approvals_by_conversation ON approvals (conversation_id, created_at, id)",
            """CREATE TABLE api_keys (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                name TEXT NOT NULL DEFAULT '',
                prefix TEXT NOT NULL,
                secret_sha256 TEXT NOT NULL UNIQUE,
                revoked_at BIGINT NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL
            )""",
            "CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at, id)",
        ),
    ),
    (
        3,
        ("ALTER TABLE workspaces ADD COLUMN confine_tools BOOLEAN NOT NULL DEFAULT FALSE",),
    ),
    (
        4,
        (
            # Durable turns: lease fences, recovery attempts, event_seq reservations.
            "ALTER TABLE turns ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE turns ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE conversations ADD COLUMN reserved_event_seq BIGINT NOT NULL DEFAULT 0",
            # Nothing was reserved past what is persisted before this migration.
            "UPDATE conversations SET reserved_event_seq = last_event_seq",
            # The sweep now also finds released and never-leased turns, so its index covers
            # every turn that has not ended (5-8 are the terminal states), not only leased ones.
            "DROP INDEX turns_by_lease_expiry",
            "CREATE INDEX turns_unended_by_lease_expiry ON turns (lease_expires_at, created_at, id)"
            " WHERE state NOT IN (5, 6, 7, 8)",
            "CREATE INDEX turns_unended_by_conversation ON turns (conversation_id, created_at, id)"
            " WHERE state NOT IN (5, 6, 7, 8)",
        ),
    ),
    (
        5,
        (
            # Approvals and permission rules. The approval's body stays the whole Approval;
            # these columns are copies of its new fields, written with it (rows.approval_columns).
            "ALTER TABLE approvals ADD COLUMN rule TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE approvals ADD COLUMN decided_by TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE approvals ADD COLUMN remember BOOLEAN NOT NULL DEFAULT FALSE",
            "ALTER TABLE approvals ADD COLUMN expires_at BIGINT NOT NULL DEFAULT 0",
            # Serialized PermissionRules; empty bytes are no rules.
            "ALTER TABLE workspaces ADD COLUMN permissions BYTEA NOT NULL DEFAULT ''::bytea",
            "ALTER TABLE conversations ADD COLUMN remembered BYTEA NOT NULL DEFAULT ''::bytea",
        ),
    ),
    (
        6,
        (
            # Kernels advertise themselves (scale-out): one heartbeat row per kernel process.
            """CREATE TABLE kernels (
                owner TEXT PRIMARY KEY,
                address TEXT NOT NULL,
                run_slots INTEGER NOT NULL DEFAULT 0,
                running INTEGER NOT NULL DEFAULT 0,
                started_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL
            )""",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
)


def redacted(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, fit for errors and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return url.partition("://")[0] + "://..."
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _scrub(text: str, url: str) -> str:
    # libpq messages may echo parts of the connection string; never the password.
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***").replace(urllib.parse.unquote(password), "***")
    return text


def check_url(url: str) -> None:
    """``ConfigError`` naming ``store.database_url`` unless ``url`` is a PostgreSQL URL."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(
            f"config key store.database_url: {redacted(url)!r} is not a PostgreSQL URL; "
            "expected postgresql://user:password@host:port/database"
        )
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"config key store.database_url: {redacted(url)!r} is not a valid PostgreSQL URL: "
            f"{_scrub(str(exc), url)}"
        ) from None


def check_pool_size(pool_size: int) -> int:
    """``pool_size``, or ``ConfigError`` naming ``store.pool_size`` unless it is 1 or more."""
    if pool_size < 1:
        raise ConfigError(f"config key store.pool_size must be 1 or more connections, got {pool_size!r}")
    return pool_size


class _Pool:
    """At most ``size`` connections, opened on demand and reused.

    A connection that comes back outside an idle transaction state (broken, or
    left mid-query by a cancellation) is closed instead of reused.
    """

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._slots = asyncio.Semaphore(size)
        self._idle: list[AsyncConnection[DictRow]] = []
        self._open: set[AsyncConnection[DictRow]] = set()

    async def _connect(self) -> AsyncConnection[DictRow]:
        conn = await AsyncConnection.connect(
            self._url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
        self._open.add(conn)
        return conn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[DictRow]]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            reusable = False
            try:
                yield conn
                reusable = True
            finally:
                if reusable and not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                    self._idle.append(conn)
                else:
                    self._open.discard(conn)
                    await conn.close()

    async def close(self) -> None:
        conns, self._open, self._idle = self._open, set(), []
        for conn in conns:
            await conn.close()


class PostgresStore(SQLStore):
    """``Store`` on a PostgreSQL database. Build with ``open``."""

    dialect = "PostgreSQL"

    def __init__(
        self,
        url: str,
        *,
        default_workspace_root: str,
        max_append_bytes: int = MAX_APPEND_BYTES,
        clock: Callable[[], float] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        check_url(url)
        super().__init__(
            default_workspace_root=default_workspace_root, max_append_bytes=max_append_bytes, clock=clock
        )
        self._url = url
        self.location = redacted(url)
        self._pool = _Pool(url, check_pool_size(pool_size))
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        default_workspace_root: str = ".",
        max_append_bytes: int = MAX_APPEND_BYTES,
        clock: Callable[[], float] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> PostgresStore:
        """Connect to the database at ``url`` and migrate it.

        ``Unavailable`` (without the password) when the server cannot be reached;
        ``clock`` (seconds since the epoch; default ``time.time``) stamps rows and times leases;
        at most ``pool_size`` connections are open at once.
        """
        store = cls(
            url,
            default_workspace_root=default_workspace_root,
            max_append_bytes=max_append_bytes,
            clock=clock,
            pool_size=pool_size,
        )
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pool.close()

    def _schema(self) -> Schema:
        # The module's, read now: tests replace them to make databases of older versions.
        return Schema(VERSION_TABLE, MIGRATIONS, SCHEMA_VERSION)

    # ------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def _tx(self, *, write: bool) -> AsyncIterator[Cursor]:
        if self._closed:
            raise Unavailable("the conversation store's database is closed")
        try:
            async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                if not write:
                    await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield cur
        except psycopg.OperationalError as exc:
            # Unreachable server, dropped connection, deadlock, shutdown: the caller may retry later.
            raise Unavailable(
                f"the conversation store's database at {self.location} failed: "
                f"{_scrub(str(exc).strip(), self._url)}"
            ) from exc

    async def _run(self, operation: Callable[[Tx], Coroutine[Any, Any, T]], *, write: bool = True) -> T:
        async with self._tx(write=write) as cur:
            return await operation(PostgresTx(self._now_ns, cur))


@functools.lru_cache(maxsize=1024)
def _pyformat(sql: str) -> str:
    """``sql`` with psycopg's placeholders for ``?`` (and its ``%`` escaped)."""
    return sql.replace("%", "%%").replace("?", "%s")


# The type each column's Python values travel as, in inserts of many rows; PostgreSQL casts
# them to the columns' own types (bigint to integer, for one) on insert.
_TYPE_OF = {bool: "boolean", int: "bigint", str: "text", bytes: "bytea"}


class PostgresTx(Tx):
    """``sql.Tx`` on one cursor of one transaction; a lock is ``SELECT ... FOR UPDATE``."""

    for_update = " FOR UPDATE"
    true = "TRUE"
    # LIMIT NULL is "no limit" in PostgreSQL.
    no_limit = None

    def __init__(self, now_ns: Callable[[], int], cur: Cursor) -> None:
        super().__init__(now_ns)
        self._cur = cur

    async def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        await self._cur.execute(_pyformat(sql), args)
        return self._cur.rowcount

    async def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        await self._cur.executemany(_pyformat(sql), rows)

    async def row(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        await self._cur.execute(_pyformat(sql), args)
        return await self._cur.fetchone()

    async def rows(self, sql: str, args: Sequence[object] = ()) -> Sequence[Row]:
        await self._cur.execute(_pyformat(sql), args)
        return await self._cur.fetchall()

    async def values(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        await self._cur.execute(_pyformat(sql), args)
        return [next(iter(r.values())) for r in await self._cur.fetchall()]

    async def insert_rows(
        self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[object]]
    ) -> None:
        if not rows:
            return
        # One statement for the whole batch, one round trip however many rows: a column is an
        # array, or one value if it is every row's (the conversation; often the turn and time).
        same: list[tuple[str, str, object]] = []
        varying: list[tuple[str, str, object]] = []
        for name, values in zip(columns, zip(*rows, strict=True), strict=True):
            pg_type = _TYPE_OF[type(values[0])]
            if values.count(values[0]) == len(values):
                same.append((name, f"%s::{pg_type}", values[0]))
            else:
                varying.append((name, f"%s::{pg_type}[]", list(values)))
        names = ", ".join(name for name, _, _ in (*same, *varying))
        select = ", ".join([arg for _, arg, _ in same] + (["*"] if varying else []))
        unnest = f" FROM unnest({', '.join(arg for _, arg, _ in varying)})" if varying else ""
        await self._cur.execute(
            f"INSERT INTO {table} ({names}) SELECT {select}{unnest}",
            [value for _, _, value in (*same, *varying)],
        )

    async def insert_returning(self, table: str, row: Mapping[str, Any]) -> Row:
        stored = await self.row(insert_sql(table, tuple(row)) + " RETURNING *", tuple(row.values()))
        assert stored is not None
        return stored

    def any_of(self, column: str, values: Sequence[object]) -> tuple[str, object]:
        return f"{column} = ANY(?)", list(values)

    async def lock_migrations(self) -> None:
        await self.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))

    async def lock_admissions(self) -> None:
        await self.execute("SELECT pg_advisory_xact_lock(?)", (ADMISSION_LOCK,))
