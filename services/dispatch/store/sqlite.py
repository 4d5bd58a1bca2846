"""The SQLite dialect of the SQL store: the embedded default.

Every database call runs on one dedicated worker thread. That keeps blocking
I/O off the event loop, and it serializes writes inside the process, which is
what makes seq assignment race-free without retry loops. Write transactions
still begin IMMEDIATE so a second process on the same file waits for the lock
instead of failing at commit; so they need no row locks.

The store's operations and statements are ``sql``'s; this is the connection, its
transactions on the worker thread, ``SQLiteTx`` (how a statement runs here) and the schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from dispatch.shared.config import ConfigError
from dispatch.shared.errors import Unavailable
from dispatch.store.backend import MAX_APPEND_BYTES
from dispatch.store.rows import Row
from dispatch.store.sql import Schema, SQLStore, Tx, insert_sql, run_to_completion

log = logging.getLogger(__name__)

T = TypeVar("T")

URL_PREFIX = "sqlite:///"
MEMORY = ":memory:"

# How long a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_SECONDS = 10.0

# Append-only: a released migration is never edited, only followed by a new one.
# Each runs in its own transaction together with its schema_version row.
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
                is_default INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL
            )""",
            "CREATE INDEX workspaces_by_tenant ON workspaces (tenant_id, created_at, id)",
            # At most one default workspace per tenant, even if two processes race to create it.
            "CREATE UNIQUE INDEX workspaces_one_default ON workspaces (tenant_id) WHERE is_default = 1",
            """CREATE TABLE conversations (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                workspace_id TEXT NOT NULL REFERENCES workspaces (id),
                title TEXT NOT NULL DEFAULT '',
                cwd TEXT NOT NULL DEFAULT '',
                computer_id TEXT NOT NULL DEFAULT '',
                agent TEXT NOT NULL DEFAULT '',
                last_seq INTEGER NOT NULL DEFAULT 0,
                last_event_seq INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL
            )""",
            "CREATE INDEX conversations_by_tenant ON conversations (tenant_id, created_at, id)",
            "CREATE INDEX conversations_by_workspace ON conversations (workspace_id, created_at, id)",
            # body is the whole Message as committed (seq, created_at and chunks included);
            # the other columns are copies for filtering without parsing.
            """CREATE TABLE messages (
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                seq INTEGER NOT NULL,
                role INTEGER NOT NULL,
                turn_id TEXT NOT NULL,
                step_index INTEGER NOT NULL,
                created_at INTEGER NOT NULL,
                body BLOB NOT NULL,
                PRIMARY KEY (conversation_id, seq)
            )""",
            """CREATE TABLE events (
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                event_seq INTEGER NOT NULL,
                turn_id TEXT NOT NULL,
                body BLOB NOT NULL,
                PRIMARY KEY (conversation_id, event_seq)
            )""",
            """CREATE TABLE turns (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                state INTEGER NOT NULL,
                idempotency_key TEXT NOT NULL DEFAULT '',
                lease_owner TEXT NOT NULL DEFAULT '',
                lease_expires_at INTEGER NOT NULL DEFAULT 0,
                finish_reason INTEGER NOT NULL DEFAULT 0,
                error_message TEXT NOT NULL DEFAULT '',
                computer_id TEXT NOT NULL DEFAULT '',
                cwd TEXT NOT NULL DEFAULT '',
                agent TEXT NOT NULL DEFAULT '',
                user_message_seq INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL,
                started_at INTEGER NOT NULL DEFAULT 0,
                ended_at INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX turns_by_conversation ON turns (conversation_id, created_at, id)",
            "CREATE UNIQUE INDEX turns_idempotency ON turns (conversation_id, idempotency_key) "
            "WHERE idempotency_key != ''",
        ),
    ),
    (
        2,
        (
            # Leases, metrics, the message queue, approvals and API keys.
            "CREATE INDEX turns_by_lease_expiry ON turns (lease_expires_at) WHERE lease_owner != ''",
            # body is the TurnMetrics without step_metrics, which live in step_metrics.
            """CREATE TABLE turn_metrics (
                turn_id TEXT PRIMARY KEY REFERENCES turns (id) ON DELETE CASCADE,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                body BLOB NOT NULL
            )""",
            "CREATE INDEX turn_metrics_by_conversation ON turn_metrics (conversation_id)",
            """CREATE TABLE step_metrics (
                turn_id TEXT NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
                step_index INTEGER NOT NULL,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                body BLOB NOT NULL,
                PRIMARY KEY (turn_id, step_index)
            )""",
            "CREATE INDEX step_metrics_by_conversation ON step_metrics (conversation_id)",
            # AUTOINCREMENT: an id is never handed out twice, even after the queue drains.
            # A drained row stays (drained_at set) so its idempotency key keeps answering it.
            """CREATE TABLE queue (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                idempotency_key TEXT NOT NULL DEFAULT '',
                body BLOB NOT NULL,
                created_at INTEGER NOT NULL,
                drained_at INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX queue_pending ON queue (conversation_id, id) WHERE drained_at = 0",
            "CREATE UNIQUE INDEX queue_idempotency ON queue (conversation_id, idempotency_key) "
            "WHERE idempotency_key != ''",
            # body is the whole Approval as it stands; decision is copied out for filtering.
            """CREATE TABLE approvals (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                decision INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL,
                body BLOB NOT NULL
            )""",
            "CREATE INDEX approvals_by_conversation ON approvals (conversation_id, created_at, id)",
            """CREATE TABLE api_keys (
                id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                name TEXT NOT NULL DEFAULT '',
                prefix TEXT NOT NULL,
                secret_sha256 TEXT NOT NULL UNIQUE,
                revoked_at INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL
            )""",
            "CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at, id)",
        ),
    ),
    (
        3,
        ("ALTER TABLE workspaces ADD COLUMN confine_tools INTEGER NOT NULL DEFAULT 0",),
    ),
    (
        4,
        (
            # Durable turns: lease fences, recovery attempts, event_seq reservations.
            "ALTER TABLE turns ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE turns ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE conversations ADD COLUMN reserved_event_seq INTEGER NOT NULL DEFAULT 0",
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
            "ALTER TABLE approvals ADD COLUMN remember INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE approvals ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0",
            # Serialized PermissionRules; empty bytes are no rules.
            "ALTER TABLE workspaces ADD COLUMN permissions BLOB NOT NULL DEFAULT x''",
            "ALTER TABLE conversations ADD COLUMN remembered BLOB NOT NULL DEFAULT x''",
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
                started_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL
            )""",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
)


def sqlite_path(url: str) -> str:
    """The database path of ``sqlite:///relative/path`` or ``sqlite:////absolute/path``.

    ``sqlite:///:memory:`` is accepted for throwaway stores. Anything else raises
    ``ConfigError`` naming ``store.database_url``.
    """
    usage = "expected sqlite:///relative/path or sqlite:////absolute/path"
    if not url.startswith(URL_PREFIX):
        raise ConfigError(f"config key store.database_url: {url!r} is not a SQLite URL; {usage}")
    path = url[len(URL_PREFIX) :]
    if not path or path.endswith("/"):
        raise ConfigError(f"config key store.database_url: {url!r} names no database file; {usage}")
    if "?" in path or "#" in path:
        raise ConfigError(
            f"config key store.database_url: {url!r}: query parameters are not supported; {usage}"
        )
    return path


def _create_private(path: str) -> None:
    """Create the database file readable by this user only, as the API key file is: it holds
    every conversation and the keys' hashes. SQLite gives its -wal and -shm files the same
    mode. A file that exists keeps its mode; one others can read gets a warning."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            log.warning(
                "%s is readable by other users (mode %o); `chmod 600` it to keep conversations private",
                path,
                mode & 0o777,
            )


class SQLiteStore(SQLStore):
    """``Store`` on a SQLite file, in WAL mode with ``synchronous=FULL``.

    FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power
    loss, and an acknowledged append must survive that. Build with ``open``.
    """

    dialect = "SQLite"

    def __init__(
        self,
        path: str,
        *,
        default_workspace_root: str,
        max_append_bytes: int = MAX_APPEND_BYTES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            default_workspace_root=default_workspace_root, max_append_bytes=max_append_bytes, clock=clock
        )
        self.path = self.location = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dispatch-store-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        default_workspace_root: str = ".",
        max_append_bytes: int = MAX_APPEND_BYTES,
        clock: Callable[[], float] | None = None,
    ) -> SQLiteStore:
        """Open (creating the file and its directory if needed) and migrate the database at ``url``.

        ``clock`` (seconds since the epoch; default ``time.time``) stamps rows and times leases.
        """
        store = cls(
            sqlite_path(url),
            default_workspace_root=default_workspace_root,
            max_append_bytes=max_append_bytes,
            clock=clock,
        )
        try:
            await store._call(store._connect)
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Queued behind any call already submitted, so those finish first.
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=True)

    def _schema(self) -> Schema:
        # The module's, read now: tests replace them to make databases of older versions.
        return Schema(VERSION_TABLE, MIGRATIONS, SCHEMA_VERSION)

    # ------------------------------------------------------------ plumbing

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise Unavailable("the conversation store's database is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.OperationalError as exc:
            # Locked past the busy timeout, disk full, I/O error: the caller may retry later.
            raise Unavailable(f"the conversation store's database failed: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Unavailable("the conversation store's database is not open")
        return self._conn

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        # IMMEDIATE takes the write lock up front: a read that later upgrades to a
        # write can fail with SQLITE_BUSY without waiting; reads get one snapshot.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _run(self, operation: Callable[[Tx], Coroutine[Any, Any, T]], *, write: bool = True) -> T:
        def run() -> T:
            with self._tx(write=write) as conn:
                # SQLiteTx never suspends: the whole operation runs here, in one transaction.
                return run_to_completion(operation(SQLiteTx(self._now_ns, conn)))

        return await self._call(run)

    def _connect(self) -> None:
        if self.path != MEMORY:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            _create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self.path != MEMORY:
                log.warning(
                    "SQLite at %s refused WAL mode (got %s); writers will block readers", self.path, mode
                )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SQLiteTx(Tx):
    """``sql.Tx`` on the worker thread's connection. Its coroutines never suspend. It takes no
    row locks: its write transactions (BEGIN IMMEDIATE) exclude each other whole, migrations
    included."""

    # The partial indexes say ``is_default = 1``; SQLite matches TRUE with neither them nor
    # an ON CONFLICT target.
    true = "1"
    # SQLite reads a negative LIMIT as "no limit".
    no_limit = -1

    def __init__(self, now_ns: Callable[[], int], conn: sqlite3.Connection) -> None:
        super().__init__(now_ns)
        self._conn = conn

    async def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        return self._conn.execute(sql, args).rowcount

    async def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._conn.executemany(sql, rows)

    # sqlite3.Row, not copied into dicts: a copy costs more than the query that read it.
    async def row(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        found: sqlite3.Row | None = self._conn.execute(sql, args).fetchone()
        return found

    async def rows(self, sql: str, args: Sequence[object] = ()) -> Sequence[Row]:
        found: list[sqlite3.Row] = self._conn.execute(sql, args).fetchall()
        return found

    async def values(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        return [r[0] for r in self._conn.execute(sql, args).fetchall()]

    async def insert_rows(
        self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[object]]
    ) -> None:
        self._conn.executemany(insert_sql(table, columns), rows)

    async def insert_returning(self, table: str, row: Mapping[str, Any]) -> Row:
        # RETURNING needs SQLite 3.35; every table here has a rowid.
        cursor = self._conn.execute(insert_sql(table, tuple(row)), tuple(row.values()))
        stored = await self.row(f"SELECT * FROM {table} WHERE rowid = ?", (cursor.lastrowid,))
        assert stored is not None
        return stored

    def any_of(self, column: str, values: Sequence[object]) -> tuple[str, object]:
        # One argument however many values (SQLite caps a statement's arguments).
        return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))

    async def lock_migrations(self) -> None:
        pass  # BEGIN IMMEDIATE has locked the database already

    async def lock_admissions(self) -> None:
        pass  # so it has for an admission: write transactions exclude each other whole
