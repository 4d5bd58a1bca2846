"""The PostgreSQL backend: for a store shared by more than one machine.

Every call borrows one connection from a small pool of its own and runs in one
transaction. Writes that depend on a conversation's high-water marks lock the
conversation row (``SELECT ... FOR UPDATE``) first, so concurrent appenders, in
this process or another, queue on that row and seq stays gap-free without retry
loops. Reads run REPEATABLE READ, so a conversation row and the history read
with it come from one snapshot.

Appends, turns, leases, the queue, approvals and reconcile are ``sql.SQLStore``'s logic over
``_PostgresTx``, this dialect's statements; the rest is written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, AsyncCursor, pq
from psycopg.rows import DictRow, dict_row

from dispatch.shared.config import ConfigError
from dispatch.shared.errors import FailedPrecondition, NotFound, Unavailable
from dispatch.shared.ids import new_id
from dispatch.store.backend import (
    API_KEY_PREFIX,
    CONVERSATION_PREFIX,
    DEFAULT_WORKSPACE_NAME,
    MAX_APPEND_BYTES,
    WORKSPACE_PREFIX,
    EventHistory,
    Execution,
    History,
    Page,
    TurnState,
    api_key_prefix,
    check_permission_rules,
    check_turn_metrics,
    decode_cursor,
    effective_page_size,
    hash_api_key,
    new_api_key_secret,
    normalized_step_metrics,
)
from dispatch.store.rows import (
    api_key_from_row as _api_key,
)
from dispatch.store.rows import (
    conversation_from_row as _conversation,
)
from dispatch.store.rows import (
    page_from_rows as _page,
)
from dispatch.store.rows import (
    queued_from_row as _queued,
)
from dispatch.store.rows import (
    rules_column,
    rules_from_column,
)
from dispatch.store.rows import (
    turn_from_row as _turn,
)
from dispatch.store.rows import (
    workspace_from_row as _workspace,
)
from dispatch.store.sql import KERNEL_COLUMNS, UNENDED, RowDict, SQLStore, Tx
from dispatch.v1 import common_pb2, store_pb2

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")

DEFAULT_POOL_SIZE = 8

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


def _sql_limit(limit: int) -> int | None:
    # LIMIT NULL is "no limit" in PostgreSQL.
    return limit if limit > 0 else None


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
        self._url = url
        # Seconds since the epoch, like time.time; tests pass a clock they advance.
        self._clock_ns: Callable[[], int] = (
            time.time_ns if clock is None else lambda: round(clock() * 1_000_000_000)
        )
        self.default_workspace_root = default_workspace_root
        self.max_append_bytes = max_append_bytes
        self._pool = _Pool(url, pool_size)
        self._closed = False
        self._last_ns = 0

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
        ``clock`` (seconds since the epoch; default ``time.time``) stamps rows and times leases.
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

    async def migrate(self) -> int:
        """Apply the migrations the database lacks; answer how many were applied."""
        async with self._tx(write=True) as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
            )
        found = await self.schema_version()
        if found > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"database {redacted(self._url)} has schema version {found}, newer than this store "
                f"knows ({SCHEMA_VERSION}); run a newer dispatchd"
            )
        applied = 0
        for version, statements in MIGRATIONS:
            async with self._tx(write=True) as cur:
                await cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                # Checked under the lock: another process may have just applied it.
                await cur.execute("SELECT 1 FROM schema_version WHERE version = %s", (version,))
                if await cur.fetchone() is not None:
                    continue
                for statement in statements:
                    await cur.execute(statement)
                await cur.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)",
                    (version, time.time_ns()),
                )
                applied += 1
                log.info("PostgreSQL %s: applied schema migration %d", redacted(self._url), version)
        return applied

    async def schema_version(self) -> int:
        """The highest migration the database has applied."""
        async with self._tx(write=False) as cur:
            await cur.execute("SELECT COALESCE(MAX(version), 0) AS version FROM schema_version")
            row = await cur.fetchone()
        return int(row["version"]) if row else 0

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
                f"the conversation store's database at {redacted(self._url)} failed: "
                f"{_scrub(str(exc).strip(), self._url)}"
            ) from exc

    async def _run(self, operation: Callable[[Tx], Coroutine[Any, Any, T]], *, write: bool = True) -> T:
        async with self._tx(write=write) as cur:
            return await operation(_PostgresTx(self, cur))

    def _now_ns(self) -> int:
        # Strictly increasing within the process, so rows created back to back sort
        # by creation; page cursors also carry the id, so ties across processes are fine.
        now = max(self._clock_ns(), self._last_ns + 1)
        self._last_ns = now
        return now

    # --------------------------------------------------------- row lookups

    @staticmethod
    async def _one(cur: Cursor, sql: str, args: Sequence[object]) -> DictRow | None:
        await cur.execute(sql, args)
        return await cur.fetchone()

    @staticmethod
    async def _all(cur: Cursor, sql: str, args: Sequence[object]) -> list[DictRow]:
        await cur.execute(sql, args)
        return await cur.fetchall()

    async def _workspace_row(self, cur: Cursor, tenant_id: str, workspace_id: str) -> DictRow:
        row = await self._one(
            cur, "SELECT * FROM workspaces WHERE id = %s AND tenant_id = %s", (workspace_id, tenant_id)
        )
        if row is None:
            raise NotFound(f"workspace {workspace_id} not found")
        return row

    async def _conversation_row(
        self, cur: Cursor, tenant_id: str, conversation_id: str, *, lock: bool = False
    ) -> DictRow:
        sql = "SELECT * FROM conversations WHERE id = %s AND tenant_id = %s"
        row = await self._one(cur, sql + (" FOR UPDATE" if lock else ""), (conversation_id, tenant_id))
        if row is None:
            raise NotFound(f"conversation {conversation_id} not found")
        return row

    async def _turn_row(self, cur: Cursor, tenant_id: str, turn_id: str, *, lock: bool = False) -> DictRow:
        sql = "SELECT * FROM turns WHERE id = %s AND tenant_id = %s"
        row = await self._one(cur, sql + (" FOR UPDATE" if lock else ""), (turn_id, tenant_id))
        if row is None:
            raise NotFound(f"turn {turn_id} not found")
        return row

    async def _turn_in_conversation(
        self, cur: Cursor, tenant_id: str, conversation_id: str, turn_id: str
    ) -> DictRow:
        # The conversation first, so a missing conversation is reported as such.
        await self._conversation_row(cur, tenant_id, conversation_id)
        turn = await self._turn_row(cur, tenant_id, turn_id)
        if turn["conversation_id"] != conversation_id:
            raise NotFound(f"turn {turn_id} not found in conversation {conversation_id}")
        return turn

    async def _insert_workspace(
        self,
        cur: Cursor,
        tenant_id: str,
        *,
        name: str,
        root: str,
        default_computer_id: str,
        default_agent: str,
        confine_tools: bool,
        permissions: Sequence[common_pb2.PermissionRule],
    ) -> str:
        workspace_id = new_id(WORKSPACE_PREFIX)
        await cur.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, default_computer_id, default_agent,"
            " confine_tools, permissions, is_default, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, FALSE, %s)",
            (
                workspace_id,
                tenant_id,
                name,
                root,
                default_computer_id,
                default_agent,
                confine_tools,
                rules_column(permissions),
                self._now_ns(),
            ),
        )
        return workspace_id

    @staticmethod
    async def _update(cur: Cursor, table: str, row_id: str, fields: dict[str, object]) -> None:
        # Table and column names come from our own code, never from a request.
        assignments = ", ".join(f"{column} = %s" for column in fields)
        await cur.execute(
            f"UPDATE {table} SET {assignments} WHERE id = %s",
            (*fields.values(), row_id),
        )

    # ------------------------------------------------------------ workspaces

    async def create_workspace(
        self,
        tenant_id: str,
        *,
        name: str,
        root: str,
        default_computer_id: str = "",
        default_agent: str = "",
        confine_tools: bool = False,
        permissions: Sequence[common_pb2.PermissionRule] = (),
    ) -> common_pb2.Workspace:
        check_permission_rules(permissions)
        async with self._tx(write=True) as cur:
            workspace_id = await self._insert_workspace(
                cur,
                tenant_id,
                name=name,
                root=root,
                default_computer_id=default_computer_id,
                default_agent=default_agent,
                confine_tools=confine_tools,
                permissions=permissions,
            )
            return _workspace(await self._workspace_row(cur, tenant_id, workspace_id))

    async def get_workspace(self, tenant_id: str, workspace_id: str) -> common_pb2.Workspace:
        async with self._tx(write=False) as cur:
            return _workspace(await self._workspace_row(cur, tenant_id, workspace_id))

    async def list_workspaces(
        self, tenant_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Workspace]:
        size = effective_page_size(page_size)
        cursor = decode_cursor(page_token)
        sql = "SELECT * FROM workspaces WHERE tenant_id = %s"
        args: list[object] = [tenant_id]
        if cursor is not None:
            sql += " AND (created_at, id) > (%s, %s)"
            args += cursor
        sql += " ORDER BY created_at, id LIMIT %s"
        async with self._tx(write=False) as cur:
            rows = await self._all(cur, sql, (*args, size + 1))
        return _page(rows, size, _workspace)

    async def set_default_workspace_root(self, root: str) -> int:
        self.default_workspace_root = root
        async with self._tx(write=True) as cur:
            await cur.execute("UPDATE workspaces SET root = %s WHERE is_default AND root <> %s", (root, root))
            return cur.rowcount

    async def update_workspace(
        self,
        tenant_id: str,
        workspace_id: str,
        *,
        name: str | None = None,
        root: str | None = None,
        default_computer_id: str | None = None,
        default_agent: str | None = None,
        confine_tools: bool | None = None,
        permissions: Sequence[common_pb2.PermissionRule] | None = None,
    ) -> common_pb2.Workspace:
        given = {
            "name": name,
            "root": root,
            "default_computer_id": default_computer_id,
            "default_agent": default_agent,
            "confine_tools": confine_tools,
        }
        fields: dict[str, object] = {k: v for k, v in given.items() if v is not None}
        if permissions is not None:
            check_permission_rules(permissions)
            fields["permissions"] = rules_column(permissions)
        async with self._tx(write=True) as cur:
            await self._workspace_row(cur, tenant_id, workspace_id)
            if fields:
                await self._update(cur, "workspaces", workspace_id, fields)
            return _workspace(await self._workspace_row(cur, tenant_id, workspace_id))

    # --------------------------------------------------------- conversations

    async def create_conversation(
        self,
        tenant_id: str,
        *,
        workspace_id: str = "",
        title: str = "",
        cwd: str = "",
        computer_id: str = "",
        agent: str = "",
    ) -> common_pb2.Conversation:
        async with self._tx(write=True) as cur:
            if workspace_id:
                ws_id = str((await self._workspace_row(cur, tenant_id, workspace_id))["id"])
            else:
                ws_id = await self._default_workspace(cur, tenant_id)
            conversation_id = new_id(CONVERSATION_PREFIX)
            now = self._now_ns()
            await cur.execute(
                "INSERT INTO conversations (id, tenant_id, workspace_id, title, cwd, computer_id, agent,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (conversation_id, tenant_id, ws_id, title, cwd, computer_id, agent, now, now),
            )
            return _conversation(await self._conversation_row(cur, tenant_id, conversation_id))

    async def _default_workspace(self, cur: Cursor, tenant_id: str) -> str:
        # ON CONFLICT waits for a concurrent creator to commit, then the SELECT
        # (a fresh READ COMMITTED snapshot) sees whichever row won.
        await cur.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, is_default, created_at)"
            " VALUES (%s, %s, %s, %s, TRUE, %s)"
            " ON CONFLICT (tenant_id) WHERE is_default DO NOTHING",
            (
                new_id(WORKSPACE_PREFIX),
                tenant_id,
                DEFAULT_WORKSPACE_NAME,
                self.default_workspace_root,
                self._now_ns(),
            ),
        )
        row = await self._one(
            cur, "SELECT id FROM workspaces WHERE tenant_id = %s AND is_default", (tenant_id,)
        )
        assert row is not None  # inserted above, or by the transaction it conflicted with
        return str(row["id"])

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> common_pb2.Conversation:
        async with self._tx(write=False) as cur:
            return _conversation(await self._conversation_row(cur, tenant_id, conversation_id))

    async def list_conversations(
        self, tenant_id: str, *, workspace_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Conversation]:
        size = effective_page_size(page_size)
        cursor = decode_cursor(page_token)
        sql = "SELECT * FROM conversations WHERE tenant_id = %s"
        args: list[object] = [tenant_id]
        if workspace_id:
            sql += " AND workspace_id = %s"
            args.append(workspace_id)
        if cursor is not None:
            sql += " AND (created_at, id) < (%s, %s)"
            args += cursor
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        async with self._tx(write=False) as cur:
            if workspace_id:
                await self._workspace_row(cur, tenant_id, workspace_id)
            rows = await self._all(cur, sql, (*args, size + 1))
        return _page(rows, size, _conversation)

    async def update_conversation(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        title: str | None = None,
        cwd: str | None = None,
        computer_id: str | None = None,
        agent: str | None = None,
    ) -> common_pb2.Conversation:
        given = {"title": title, "cwd": cwd, "computer_id": computer_id, "agent": agent}
        fields: dict[str, object] = {k: v for k, v in given.items() if v is not None}
        async with self._tx(write=True) as cur:
            await self._conversation_row(cur, tenant_id, conversation_id, lock=True)
            if fields:
                await self._update(
                    cur, "conversations", conversation_id, {**fields, "updated_at": self._now_ns()}
                )
            return _conversation(await self._conversation_row(cur, tenant_id, conversation_id))

    async def delete_conversation(self, tenant_id: str, conversation_id: str) -> None:
        async with self._tx(write=True) as cur:
            await self._conversation_row(cur, tenant_id, conversation_id, lock=True)
            # Messages, events, turns, metrics, queue and approvals go by ON DELETE CASCADE,
            # which PostgreSQL always enforces.
            await cur.execute("DELETE FROM conversations WHERE id = %s", (conversation_id,))

    # --------------------------------------------------------------- history

    async def load_since(
        self, tenant_id: str, conversation_id: str, *, after_seq: int = 0, limit: int = 0
    ) -> History:
        async with self._tx(write=False) as cur:
            conv = await self._conversation_row(cur, tenant_id, conversation_id)
            rows = await self._all(
                cur,
                "SELECT body FROM messages WHERE conversation_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (conversation_id, after_seq, _sql_limit(limit)),
            )
        return History(
            messages=[common_pb2.Message.FromString(r["body"]) for r in rows], last_seq=conv["last_seq"]
        )

    async def load_events(
        self, tenant_id: str, conversation_id: str, *, after_event_seq: int = 0, limit: int = 0
    ) -> EventHistory:
        async with self._tx(write=False) as cur:
            conv = await self._conversation_row(cur, tenant_id, conversation_id)
            rows = await self._all(
                cur,
                "SELECT body FROM events WHERE conversation_id = %s AND event_seq > %s"
                " ORDER BY event_seq LIMIT %s",
                (conversation_id, after_event_seq, _sql_limit(limit)),
            )
        return EventHistory(
            events=[common_pb2.AgentEvent.FromString(r["body"]) for r in rows],
            last_event_seq=conv["last_event_seq"],
        )

    # ----------------------------------------------------------------- turns

    async def get_turn(self, tenant_id: str, turn_id: str) -> common_pb2.Turn:
        async with self._tx(write=False) as cur:
            return _turn(await self._turn_row(cur, tenant_id, turn_id))

    async def list_turns(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        states: Collection[TurnState] = (),
        page_size: int = 0,
        page_token: str = "",
        idempotency_key: str = "",
    ) -> Page[common_pb2.Turn]:
        size = effective_page_size(page_size)
        cursor = decode_cursor(page_token)
        wanted = sorted(set(states))
        sql = "SELECT * FROM turns WHERE conversation_id = %s"
        args: list[object] = [conversation_id]
        if wanted:
            sql += " AND state = ANY(%s::integer[])"
            args.append([int(s) for s in wanted])
        if idempotency_key:
            sql += " AND idempotency_key = %s"
            args.append(idempotency_key)
        if cursor is not None:
            sql += " AND (created_at, id) > (%s, %s)"
            args += cursor
        sql += " ORDER BY created_at, id LIMIT %s"
        async with self._tx(write=False) as cur:
            await self._conversation_row(cur, tenant_id, conversation_id)
            rows = await self._all(cur, sql, (*args, size + 1))
        return _page(rows, size, _turn)

    # ------------------------------------------------------------- execution

    async def resolve_execution(self, tenant_id: str, conversation_id: str, turn_id: str = "") -> Execution:
        async with self._tx(write=False) as cur:
            conv = await self._conversation_row(cur, tenant_id, conversation_id)
            turn_computer = turn_cwd = ""
            if turn_id:
                turn = await self._turn_in_conversation(cur, tenant_id, conversation_id, turn_id)
                turn_computer, turn_cwd = turn["computer_id"], turn["cwd"]
            ws = await self._workspace_row(cur, tenant_id, conv["workspace_id"])
        return Execution(
            computer_id=turn_computer or conv["computer_id"] or ws["default_computer_id"] or "",
            cwd=turn_cwd or conv["cwd"] or ws["root"],
            workspace_root=ws["root"],
            confine_tools=bool(ws["confine_tools"]),
            workspace_id=ws["id"],
            workspace_permissions=rules_from_column(ws["permissions"]),
            remembered=rules_from_column(conv["remembered"]),
        )

    # --------------------------------------------------------------- metrics

    async def record_turn_metrics(self, tenant_id: str, metrics: common_pb2.TurnMetrics) -> None:
        check_turn_metrics(metrics)
        async with self._tx(write=True) as cur:
            if metrics.conversation_id:
                turn = await self._turn_in_conversation(
                    cur, tenant_id, metrics.conversation_id, metrics.turn_id
                )
            else:
                turn = await self._turn_row(cur, tenant_id, metrics.turn_id)
            stored = common_pb2.TurnMetrics()
            stored.CopyFrom(metrics)
            stored.conversation_id = turn["conversation_id"]
            await cur.execute(
                "INSERT INTO turn_metrics (turn_id, conversation_id, body) VALUES (%s, %s, %s)"
                " ON CONFLICT (turn_id) DO UPDATE SET body = EXCLUDED.body",
                (metrics.turn_id, turn["conversation_id"], stored.SerializeToString()),
            )

    async def record_step_metrics(
        self, tenant_id: str, conversation_id: str, metrics: common_pb2.StepMetrics
    ) -> None:
        stored = normalized_step_metrics(metrics)
        async with self._tx(write=True) as cur:
            await self._turn_in_conversation(cur, tenant_id, conversation_id, stored.turn_id)
            await cur.execute(
                "INSERT INTO step_metrics (turn_id, step_index, conversation_id, body)"
                " VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (turn_id, step_index) DO UPDATE SET body = EXCLUDED.body",
                (stored.turn_id, stored.step_index, conversation_id, stored.SerializeToString()),
            )

    async def get_metrics(
        self, tenant_id: str, conversation_id: str, turn_id: str = ""
    ) -> list[common_pb2.TurnMetrics]:
        async with self._tx(write=False) as cur:
            if turn_id:
                await self._turn_in_conversation(cur, tenant_id, conversation_id, turn_id)
            else:
                await self._conversation_row(cur, tenant_id, conversation_id)
            only = " AND t.id = %s" if turn_id else ""
            args: tuple[object, ...] = (conversation_id, turn_id) if turn_id else (conversation_id,)
            turns = await self._all(
                cur,
                "SELECT t.id, m.body FROM turns t LEFT JOIN turn_metrics m ON m.turn_id = t.id"
                f" WHERE t.conversation_id = %s{only} ORDER BY t.created_at, t.id",
                args,
            )
            steps = await self._all(
                cur,
                "SELECT turn_id, body FROM step_metrics WHERE conversation_id = %s"
                + (" AND turn_id = %s" if turn_id else "")
                + " ORDER BY turn_id, step_index",
                args,
            )
        by_turn: dict[str, list[common_pb2.StepMetrics]] = {}
        for row in steps:
            by_turn.setdefault(row["turn_id"], []).append(common_pb2.StepMetrics.FromString(row["body"]))
        answer = []
        for row in turns:
            if row["body"] is None and row["id"] not in by_turn:
                continue
            if row["body"] is None:
                metrics = common_pb2.TurnMetrics(turn_id=row["id"], conversation_id=conversation_id)
            else:
                metrics = common_pb2.TurnMetrics.FromString(row["body"])
            metrics.step_metrics.extend(by_turn.get(row["id"], []))
            answer.append(metrics)
        return answer

    # -------------------------------------------------------------- api keys

    async def create_api_key(self, tenant_id: str, name: str = "") -> tuple[store_pb2.ApiKey, str]:
        secret = new_api_key_secret()
        key_id = new_id(API_KEY_PREFIX)
        async with self._tx(write=True) as cur:
            row = await self._one(
                cur,
                "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_sha256, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s) RETURNING *",
                (key_id, tenant_id, name, api_key_prefix(secret), hash_api_key(secret), self._now_ns()),
            )
        assert row is not None
        return _api_key(row), secret

    async def list_api_keys(self, tenant_id: str = "") -> list[store_pb2.ApiKey]:
        async with self._tx(write=False) as cur:
            if tenant_id:
                rows = await self._all(
                    cur, "SELECT * FROM api_keys WHERE tenant_id = %s ORDER BY created_at, id", (tenant_id,)
                )
            else:
                rows = await self._all(cur, "SELECT * FROM api_keys ORDER BY created_at, id", ())
        return [_api_key(r) for r in rows]

    async def revoke_api_key(self, key_id: str) -> store_pb2.ApiKey:
        async with self._tx(write=True) as cur:
            await cur.execute(
                "UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at = 0",
                (self._now_ns(), key_id),
            )
            row = await self._one(cur, "SELECT * FROM api_keys WHERE id = %s", (key_id,))
        if row is None:
            raise NotFound(f"API key {key_id} not found")
        return _api_key(row)

    async def authenticate(self, secret: str) -> store_pb2.ApiKey:
        async with self._tx(write=False) as cur:
            row = await self._one(
                cur,
                "SELECT * FROM api_keys WHERE secret_sha256 = %s AND revoked_at = 0",
                (hash_api_key(secret),),
            )
        if row is None:
            raise NotFound("unknown or revoked API key")
        return _api_key(row)


class _PostgresTx:
    """``sql.Tx`` on one cursor of one transaction; ``lock`` is ``SELECT ... FOR UPDATE``."""

    def __init__(self, store: PostgresStore, cur: Cursor) -> None:
        self._store = store
        self._cur = cur

    def now_ns(self) -> int:
        return self._store._now_ns()

    async def _one(self, sql: str, args: Sequence[object]) -> RowDict | None:
        await self._cur.execute(sql, args)
        return await self._cur.fetchone()

    async def _all(self, sql: str, args: Sequence[object]) -> list[RowDict]:
        await self._cur.execute(sql, args)
        return await self._cur.fetchall()

    async def conversation(self, tenant_id: str, conversation_id: str, *, lock: bool = False) -> RowDict:
        return await self._store._conversation_row(self._cur, tenant_id, conversation_id, lock=lock)

    async def turn(self, tenant_id: str, turn_id: str, *, lock: bool = False) -> RowDict | None:
        sql = "SELECT * FROM turns WHERE id = %s AND tenant_id = %s"
        return await self._one(sql + (" FOR UPDATE" if lock else ""), (turn_id, tenant_id))

    async def turns(self, turn_ids: Sequence[str], *, lock: bool = False) -> list[RowDict]:
        # ORDER BY before FOR UPDATE: rows are locked in id order, so two batches never deadlock.
        sql = "SELECT * FROM turns WHERE id = ANY(%s) ORDER BY id"
        return await self._all(sql + (" FOR UPDATE" if lock else ""), (list(turn_ids),))

    async def turn_by_idempotency_key(self, conversation_id: str, idempotency_key: str) -> RowDict | None:
        return await self._one(
            "SELECT * FROM turns WHERE conversation_id = %s AND idempotency_key = %s",
            (conversation_id, idempotency_key),
        )

    async def unended_turn(self, conversation_id: str) -> RowDict | None:
        return await self._one(
            f"SELECT * FROM turns WHERE conversation_id = %s AND {UNENDED} ORDER BY created_at, id LIMIT 1",
            (conversation_id,),
        )

    async def unheld_turns(self, now_ns: int, limit: int) -> list[RowDict]:
        return await self._all(
            f"SELECT * FROM turns WHERE {UNENDED} AND (lease_owner = '' OR lease_expires_at <= %s)"
            " ORDER BY lease_expires_at, created_at, id LIMIT %s",
            (now_ns, _sql_limit(limit)),
        )

    async def insert_turn(self, row: Mapping[str, Any]) -> None:
        await self._cur.execute(
            f"INSERT INTO turns ({', '.join(row)}) VALUES ({', '.join('%s' for _ in row)})",
            tuple(row.values()),
        )

    async def update(self, table: str, row_id: str, fields: Mapping[str, Any]) -> None:
        await PostgresStore._update(self._cur, table, row_id, dict(fields))

    async def update_turns(self, turn_ids: Sequence[str], fields: Mapping[str, Any]) -> None:
        assignments = ", ".join(f"{column} = %s" for column in fields)
        await self._cur.execute(
            f"UPDATE turns SET {assignments} WHERE id = ANY(%s)", (*fields.values(), list(turn_ids))
        )

    async def history(self, conversation_id: str) -> list[common_pb2.Message]:
        rows = await self._all(
            "SELECT body FROM messages WHERE conversation_id = %s ORDER BY seq", (conversation_id,)
        )
        return [common_pb2.Message.FromString(r["body"]) for r in rows]

    async def insert_messages(self, conversation_id: str, messages: Sequence[common_pb2.Message]) -> None:
        if not messages:
            return
        # One statement for the whole batch: one round trip however many messages.
        await self._cur.execute(
            "INSERT INTO messages (conversation_id, seq, role, turn_id, step_index, created_at, body)"
            " SELECT %s, * FROM unnest(%s::bigint[], %s::integer[], %s::text[], %s::integer[],"
            " %s::bigint[], %s::bytea[])",
            (
                conversation_id,
                [m.seq for m in messages],
                [m.role for m in messages],
                [m.turn_id for m in messages],
                [m.step_index for m in messages],
                [m.created_at.ToNanoseconds() for m in messages],
                [m.SerializeToString() for m in messages],
            ),
        )

    async def insert_events(self, conversation_id: str, events: Sequence[common_pb2.AgentEvent]) -> None:
        if not events:
            return
        await self._cur.execute(
            "INSERT INTO events (conversation_id, event_seq, turn_id, body)"
            " SELECT %s, * FROM unnest(%s::bigint[], %s::text[], %s::bytea[])",
            (
                conversation_id,
                [e.event_seq for e in events],
                [e.turn_id for e in events],
                [e.SerializeToString() for e in events],
            ),
        )

    async def take_queue(self, conversation_id: str, now_ns: int) -> list[store_pb2.QueuedMessage]:
        rows = await self._all(
            "UPDATE queue SET drained_at = %s WHERE conversation_id = %s AND drained_at = 0 RETURNING *",
            (now_ns, conversation_id),
        )
        return [_queued(r) for r in sorted(rows, key=lambda r: int(r["id"]))]

    async def queued(self, conversation_id: str, idempotency_key: str) -> store_pb2.QueuedMessage | None:
        row = await self._one(
            "SELECT * FROM queue WHERE conversation_id = %s AND idempotency_key = %s",
            (conversation_id, idempotency_key),
        )
        return None if row is None else _queued(row)

    async def insert_queued(
        self, conversation_id: str, idempotency_key: str, body: bytes, now_ns: int
    ) -> int:
        row = await self._one(
            "INSERT INTO queue (conversation_id, idempotency_key, body, created_at)"
            " VALUES (%s, %s, %s, %s) RETURNING id",
            (conversation_id, idempotency_key, body, now_ns),
        )
        assert row is not None
        return int(row["id"])

    async def approval(self, tenant_id: str, approval_id: str) -> RowDict | None:
        return await self._one(
            "SELECT * FROM approvals WHERE id = %s AND tenant_id = %s", (approval_id, tenant_id)
        )

    async def approvals(self, conversation_id: str, *, pending_only: bool = False) -> list[RowDict]:
        pending = " AND decision = 0" if pending_only else ""
        return await self._all(
            f"SELECT * FROM approvals WHERE conversation_id = %s{pending} ORDER BY created_at, id",
            (conversation_id,),
        )

    async def insert_approvals(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        await self._cur.executemany(
            f"INSERT INTO approvals ({', '.join(columns)}) VALUES ({', '.join('%s' for _ in columns)})",
            [tuple(row[c] for c in columns) for row in rows],
        )

    async def upsert_step_metrics(
        self, conversation_id: str, metrics: Sequence[common_pb2.StepMetrics]
    ) -> None:
        await self._cur.executemany(
            "INSERT INTO step_metrics (turn_id, step_index, conversation_id, body) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (turn_id, step_index) DO UPDATE SET body = EXCLUDED.body",
            [(m.turn_id, m.step_index, conversation_id, m.SerializeToString()) for m in metrics],
        )

    async def upsert_turn_metrics(self, conversation_id: str, metrics: common_pb2.TurnMetrics) -> None:
        await self._cur.execute(
            "INSERT INTO turn_metrics (turn_id, conversation_id, body) VALUES (%s, %s, %s)"
            " ON CONFLICT (turn_id) DO UPDATE SET body = EXCLUDED.body",
            (metrics.turn_id, conversation_id, metrics.SerializeToString()),
        )

    async def decide_approval(self, approval_id: str, fields: Mapping[str, Any]) -> bool:
        # The compare-and-set: under READ COMMITTED a racing decision that committed first
        # leaves no pending row to update here.
        assignments = ", ".join(f"{column} = %s" for column in fields)
        await self._cur.execute(
            f"UPDATE approvals SET {assignments} WHERE id = %s AND decision = 0",
            (*fields.values(), approval_id),
        )
        return self._cur.rowcount == 1

    async def count_started(self) -> int:
        await self._cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADMISSION_LOCK,))
        found = await self._one("SELECT count(*) AS n FROM turns WHERE state IN (2, 3, 4)", ())
        assert found is not None
        return int(found["n"])

    async def put_kernel(self, row: Mapping[str, Any]) -> None:
        await self._cur.execute(
            "INSERT INTO kernels (owner, address, run_slots, running, started_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (owner) DO UPDATE SET address = EXCLUDED.address,"
            " run_slots = EXCLUDED.run_slots, running = EXCLUDED.running, expires_at = EXCLUDED.expires_at",
            tuple(row[c] for c in KERNEL_COLUMNS),
        )

    async def live_kernels(self, now_ns: int) -> list[RowDict]:
        return await self._all(
            f"SELECT {', '.join(KERNEL_COLUMNS)} FROM kernels WHERE expires_at > %s"
            " ORDER BY started_at, owner",
            (now_ns,),
        )

    async def delete_kernels(self, owner: str, expired_before_ns: int) -> None:
        await self._cur.execute(
            "DELETE FROM kernels WHERE owner = %s OR expires_at < %s", (owner, expired_before_ns)
        )
