"""The SQLite backend: the embedded default.

Every database call runs on one dedicated worker thread. That keeps blocking
I/O off the event loop, and it serializes writes inside the process, which is
what makes seq assignment race-free without retry loops. Write transactions
still begin IMMEDIATE so a second process on the same file waits for the lock
instead of failing at commit.

Appends, turns, leases, the queue, approvals and reconcile are ``sql.SQLStore``'s logic over
``_SQLiteTx``, this dialect's statements; the rest is written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
from dispatch.store.sql import KERNEL_COLUMNS, UNENDED, RowDict, SQLStore, Tx, run_to_completion
from dispatch.v1 import common_pb2, store_pb2

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


def _sql_limit(limit: int) -> int:
    # SQLite reads a negative LIMIT as "no limit".
    return limit if limit > 0 else -1


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

    def __init__(
        self,
        path: str,
        *,
        default_workspace_root: str,
        max_append_bytes: int = MAX_APPEND_BYTES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.path = path
        # Seconds since the epoch, like time.time; tests pass a clock they advance
        # instead of sleeping until a lease expires.
        self._clock_ns: Callable[[], int] = (
            time.time_ns if clock is None else lambda: round(clock() * 1_000_000_000)
        )
        self.default_workspace_root = default_workspace_root
        self.max_append_bytes = max_append_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dispatch-store-sqlite")
        self._conn: sqlite3.Connection | None = None
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

    async def migrate(self) -> int:
        """Apply the migrations the database lacks; answer how many were applied."""
        return await self._call(self._migrate)

    async def schema_version(self) -> int:
        """The highest migration the database has applied."""
        return await self._call(self._schema_version)

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
                # _SQLiteTx never suspends: the whole operation runs here, in one transaction.
                return run_to_completion(operation(_SQLiteTx(self, conn)))

        return await self._call(run)

    def _now_ns(self) -> int:
        # Strictly increasing within the process (only the worker thread calls it),
        # so rows created back to back sort by creation and page cursors never tie.
        now = max(self._clock_ns(), self._last_ns + 1)
        self._last_ns = now
        return now

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
            self._conn = conn
            self._migrate()
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _schema_version(self) -> int:
        row = self._db().execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        return int(row[0])

    def _migrate(self) -> int:
        conn = self._db()
        with self._tx(write=True):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
            )
        found = self._schema_version()
        if found > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"database {self.path} has schema version {found}, newer than this store knows "
                f"({SCHEMA_VERSION}); run a newer dispatchd"
            )
        applied = 0
        for version, statements in MIGRATIONS:
            with self._tx(write=True):
                # Checked inside the transaction: another process may have just applied it.
                if conn.execute("SELECT 1 FROM schema_version WHERE version = ?", (version,)).fetchone():
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, time.time_ns()),
                )
                applied += 1
                log.info("SQLite %s: applied schema migration %d", self.path, version)
        return applied

    # --------------------------------------------------------- row lookups

    def _workspace_row(self, conn: sqlite3.Connection, tenant_id: str, workspace_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM workspaces WHERE id = ? AND tenant_id = ?", (workspace_id, tenant_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"workspace {workspace_id} not found")
        return row

    def _conversation_row(
        self, conn: sqlite3.Connection, tenant_id: str, conversation_id: str
    ) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM conversations WHERE id = ? AND tenant_id = ?", (conversation_id, tenant_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"conversation {conversation_id} not found")
        return row

    def _turn_row(self, conn: sqlite3.Connection, tenant_id: str, turn_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM turns WHERE id = ? AND tenant_id = ?", (turn_id, tenant_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"turn {turn_id} not found")
        return row

    def _insert_workspace(
        self,
        conn: sqlite3.Connection,
        tenant_id: str,
        *,
        name: str,
        root: str,
        default_computer_id: str,
        default_agent: str,
        is_default: bool,
        confine_tools: bool = False,
        permissions: Sequence[common_pb2.PermissionRule] = (),
    ) -> str:
        workspace_id = new_id(WORKSPACE_PREFIX)
        conn.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, default_computer_id, default_agent,"
            " confine_tools, permissions, is_default, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                workspace_id,
                tenant_id,
                name,
                root,
                default_computer_id,
                default_agent,
                int(confine_tools),
                rules_column(permissions),
                int(is_default),
                self._now_ns(),
            ),
        )
        return workspace_id

    @staticmethod
    def _update(conn: sqlite3.Connection, table: str, row_id: str, fields: dict[str, object]) -> None:
        # Column names come from our own keyword arguments, never from a request.
        assignments = ", ".join(f"{column} = ?" for column in fields)
        conn.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", (*fields.values(), row_id))

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

        def run() -> common_pb2.Workspace:
            with self._tx(write=True) as conn:
                workspace_id = self._insert_workspace(
                    conn,
                    tenant_id,
                    name=name,
                    root=root,
                    default_computer_id=default_computer_id,
                    default_agent=default_agent,
                    confine_tools=confine_tools,
                    permissions=permissions,
                    is_default=False,
                )
                return _workspace(self._workspace_row(conn, tenant_id, workspace_id))

        return await self._call(run)

    async def get_workspace(self, tenant_id: str, workspace_id: str) -> common_pb2.Workspace:
        def run() -> common_pb2.Workspace:
            with self._tx(write=False) as conn:
                return _workspace(self._workspace_row(conn, tenant_id, workspace_id))

        return await self._call(run)

    async def list_workspaces(
        self, tenant_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Workspace]:
        size = effective_page_size(page_size)
        cursor = decode_cursor(page_token)

        def run() -> Page[common_pb2.Workspace]:
            sql = "SELECT * FROM workspaces WHERE tenant_id = ?"
            args: list[object] = [tenant_id]
            if cursor is not None:
                sql += " AND (created_at, id) > (?, ?)"
                args += cursor
            sql += " ORDER BY created_at, id LIMIT ?"
            with self._tx(write=False) as conn:
                rows = conn.execute(sql, (*args, size + 1)).fetchall()
            return _page(rows, size, _workspace)

        return await self._call(run)

    async def set_default_workspace_root(self, root: str) -> int:
        self.default_workspace_root = root

        def run() -> int:
            with self._tx(write=True) as conn:
                cursor = conn.execute(
                    "UPDATE workspaces SET root = ? WHERE is_default = 1 AND root != ?", (root, root)
                )
                return cursor.rowcount

        return await self._call(run)

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

        def run() -> common_pb2.Workspace:
            with self._tx(write=True) as conn:
                self._workspace_row(conn, tenant_id, workspace_id)
                if fields:
                    self._update(conn, "workspaces", workspace_id, fields)
                return _workspace(self._workspace_row(conn, tenant_id, workspace_id))

        return await self._call(run)

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
        def run() -> common_pb2.Conversation:
            with self._tx(write=True) as conn:
                if workspace_id:
                    ws_id = str(self._workspace_row(conn, tenant_id, workspace_id)["id"])
                else:
                    ws_id = self._default_workspace(conn, tenant_id)
                conversation_id = new_id(CONVERSATION_PREFIX)
                now = self._now_ns()
                conn.execute(
                    "INSERT INTO conversations (id, tenant_id, workspace_id, title, cwd, computer_id, agent,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, tenant_id, ws_id, title, cwd, computer_id, agent, now, now),
                )
                return _conversation(self._conversation_row(conn, tenant_id, conversation_id))

        return await self._call(run)

    def _default_workspace(self, conn: sqlite3.Connection, tenant_id: str) -> str:
        row = conn.execute(
            "SELECT id FROM workspaces WHERE tenant_id = ? AND is_default = 1", (tenant_id,)
        ).fetchone()
        if row is not None:
            return str(row["id"])
        return self._insert_workspace(
            conn,
            tenant_id,
            name=DEFAULT_WORKSPACE_NAME,
            root=self.default_workspace_root,
            default_computer_id="",
            default_agent="",
            is_default=True,
        )

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> common_pb2.Conversation:
        def run() -> common_pb2.Conversation:
            with self._tx(write=False) as conn:
                return _conversation(self._conversation_row(conn, tenant_id, conversation_id))

        return await self._call(run)

    async def list_conversations(
        self, tenant_id: str, *, workspace_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Conversation]:
        size = effective_page_size(page_size)
        cursor = decode_cursor(page_token)

        def run() -> Page[common_pb2.Conversation]:
            sql = "SELECT * FROM conversations WHERE tenant_id = ?"
            args: list[object] = [tenant_id]
            if workspace_id:
                sql += " AND workspace_id = ?"
                args.append(workspace_id)
            if cursor is not None:
                sql += " AND (created_at, id) < (?, ?)"
                args += cursor
            sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
            with self._tx(write=False) as conn:
                if workspace_id:
                    self._workspace_row(conn, tenant_id, workspace_id)
                rows = conn.execute(sql, (*args, size + 1)).fetchall()
            return _page(rows, size, _conversation)

        return await self._call(run)

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

        def run() -> common_pb2.Conversation:
            with self._tx(write=True) as conn:
                self._conversation_row(conn, tenant_id, conversation_id)
                if fields:
                    self._update(
                        conn, "conversations", conversation_id, {**fields, "updated_at": self._now_ns()}
                    )
                return _conversation(self._conversation_row(conn, tenant_id, conversation_id))

        return await self._call(run)

    async def delete_conversation(self, tenant_id: str, conversation_id: str) -> None:
        def run() -> None:
            with self._tx(write=True) as conn:
                self._conversation_row(conn, tenant_id, conversation_id)
                # Explicit rather than left to ON DELETE CASCADE, which only acts
                # when foreign_keys is on for the connection doing the delete.
                for table in (
                    "messages",
                    "events",
                    "step_metrics",
                    "turn_metrics",
                    "queue",
                    "approvals",
                    "turns",
                ):
                    conn.execute(f"DELETE FROM {table} WHERE conversation_id = ?", (conversation_id,))
                conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

        await self._call(run)

    # --------------------------------------------------------------- history

    async def load_since(
        self, tenant_id: str, conversation_id: str, *, after_seq: int = 0, limit: int = 0
    ) -> History:
        def run() -> History:
            with self._tx(write=False) as conn:
                conv = self._conversation_row(conn, tenant_id, conversation_id)
                rows = conn.execute(
                    "SELECT body FROM messages WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (conversation_id, after_seq, _sql_limit(limit)),
                ).fetchall()
            return History(
                messages=[common_pb2.Message.FromString(r["body"]) for r in rows], last_seq=conv["last_seq"]
            )

        return await self._call(run)

    async def load_events(
        self, tenant_id: str, conversation_id: str, *, after_event_seq: int = 0, limit: int = 0
    ) -> EventHistory:
        def run() -> EventHistory:
            with self._tx(write=False) as conn:
                conv = self._conversation_row(conn, tenant_id, conversation_id)
                rows = conn.execute(
                    "SELECT body FROM events WHERE conversation_id = ? AND event_seq > ?"
                    " ORDER BY event_seq LIMIT ?",
                    (conversation_id, after_event_seq, _sql_limit(limit)),
                ).fetchall()
            return EventHistory(
                events=[common_pb2.AgentEvent.FromString(r["body"]) for r in rows],
                last_event_seq=conv["last_event_seq"],
            )

        return await self._call(run)

    # ----------------------------------------------------------------- turns

    async def get_turn(self, tenant_id: str, turn_id: str) -> common_pb2.Turn:
        def run() -> common_pb2.Turn:
            with self._tx(write=False) as conn:
                return _turn(self._turn_row(conn, tenant_id, turn_id))

        return await self._call(run)

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

        def run() -> Page[common_pb2.Turn]:
            sql = "SELECT * FROM turns WHERE conversation_id = ?"
            args: list[object] = [conversation_id]
            if wanted:
                sql += f" AND state IN ({', '.join('?' for _ in wanted)})"
                args += wanted
            if idempotency_key:
                sql += " AND idempotency_key = ?"
                args.append(idempotency_key)
            if cursor is not None:
                sql += " AND (created_at, id) > (?, ?)"
                args += cursor
            sql += " ORDER BY created_at, id LIMIT ?"
            with self._tx(write=False) as conn:
                self._conversation_row(conn, tenant_id, conversation_id)
                rows = conn.execute(sql, (*args, size + 1)).fetchall()
            return _page(rows, size, _turn)

        return await self._call(run)

    # ------------------------------------------------------------- execution

    async def resolve_execution(self, tenant_id: str, conversation_id: str, turn_id: str = "") -> Execution:
        def run() -> Execution:
            with self._tx(write=False) as conn:
                conv = self._conversation_row(conn, tenant_id, conversation_id)
                turn_computer = turn_cwd = ""
                if turn_id:
                    turn = self._turn_row(conn, tenant_id, turn_id)
                    if turn["conversation_id"] != conversation_id:
                        raise NotFound(f"turn {turn_id} not found in conversation {conversation_id}")
                    turn_computer, turn_cwd = turn["computer_id"], turn["cwd"]
                ws = self._workspace_row(conn, tenant_id, conv["workspace_id"])
            return Execution(
                computer_id=turn_computer or conv["computer_id"] or ws["default_computer_id"] or "",
                cwd=turn_cwd or conv["cwd"] or ws["root"],
                workspace_root=ws["root"],
                confine_tools=bool(ws["confine_tools"]),
                workspace_id=ws["id"],
                workspace_permissions=rules_from_column(ws["permissions"]),
                remembered=rules_from_column(conv["remembered"]),
            )

        return await self._call(run)

    # --------------------------------------------------------------- metrics

    def _turn_in_conversation(
        self, conn: sqlite3.Connection, tenant_id: str, conversation_id: str, turn_id: str
    ) -> sqlite3.Row:
        self._conversation_row(conn, tenant_id, conversation_id)
        row = self._turn_row(conn, tenant_id, turn_id)
        if row["conversation_id"] != conversation_id:
            raise NotFound(f"turn {turn_id} not found in conversation {conversation_id}")
        return row

    async def record_turn_metrics(self, tenant_id: str, metrics: common_pb2.TurnMetrics) -> None:
        check_turn_metrics(metrics)

        def run() -> None:
            with self._tx(write=True) as conn:
                if metrics.conversation_id:
                    turn = self._turn_in_conversation(
                        conn, tenant_id, metrics.conversation_id, metrics.turn_id
                    )
                else:
                    turn = self._turn_row(conn, tenant_id, metrics.turn_id)
                stored = common_pb2.TurnMetrics()
                stored.CopyFrom(metrics)
                stored.conversation_id = turn["conversation_id"]
                conn.execute(
                    "INSERT INTO turn_metrics (turn_id, conversation_id, body) VALUES (?, ?, ?)"
                    " ON CONFLICT (turn_id) DO UPDATE SET body = excluded.body",
                    (metrics.turn_id, turn["conversation_id"], stored.SerializeToString()),
                )

        await self._call(run)

    async def record_step_metrics(
        self, tenant_id: str, conversation_id: str, metrics: common_pb2.StepMetrics
    ) -> None:
        stored = normalized_step_metrics(metrics)

        def run() -> None:
            with self._tx(write=True) as conn:
                self._turn_in_conversation(conn, tenant_id, conversation_id, stored.turn_id)
                conn.execute(
                    "INSERT INTO step_metrics (turn_id, step_index, conversation_id, body)"
                    " VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (turn_id, step_index) DO UPDATE SET body = excluded.body",
                    (stored.turn_id, stored.step_index, conversation_id, stored.SerializeToString()),
                )

        await self._call(run)

    async def get_metrics(
        self, tenant_id: str, conversation_id: str, turn_id: str = ""
    ) -> list[common_pb2.TurnMetrics]:
        def run() -> list[common_pb2.TurnMetrics]:
            with self._tx(write=False) as conn:
                if turn_id:
                    self._turn_in_conversation(conn, tenant_id, conversation_id, turn_id)
                else:
                    self._conversation_row(conn, tenant_id, conversation_id)
                where = "t.conversation_id = ?" + (" AND t.id = ?" if turn_id else "")
                args = (conversation_id, turn_id) if turn_id else (conversation_id,)
                turns = conn.execute(
                    f"SELECT t.id, m.body FROM turns t LEFT JOIN turn_metrics m ON m.turn_id = t.id"
                    f" WHERE {where} ORDER BY t.created_at, t.id",
                    args,
                ).fetchall()
                steps = conn.execute(
                    "SELECT s.turn_id, s.body FROM step_metrics s JOIN turns t ON t.id = s.turn_id"
                    f" WHERE {where} ORDER BY s.turn_id, s.step_index",
                    args,
                ).fetchall()
            by_turn: dict[str, list[common_pb2.StepMetrics]] = {}
            for row in steps:
                by_turn.setdefault(row["turn_id"], []).append(common_pb2.StepMetrics.FromString(row["body"]))
            answer = []
            for row in turns:
                if row["body"] is None and row["id"] not in by_turn:
                    continue  # a turn nothing was recorded for
                if row["body"] is None:
                    metrics = common_pb2.TurnMetrics(turn_id=row["id"], conversation_id=conversation_id)
                else:
                    metrics = common_pb2.TurnMetrics.FromString(row["body"])
                metrics.step_metrics.extend(by_turn.get(row["id"], []))
                answer.append(metrics)
            return answer

        return await self._call(run)

    # -------------------------------------------------------------- api keys

    async def create_api_key(self, tenant_id: str, name: str = "") -> tuple[store_pb2.ApiKey, str]:
        secret = new_api_key_secret()

        def run() -> store_pb2.ApiKey:
            with self._tx(write=True) as conn:
                key_id = new_id(API_KEY_PREFIX)
                conn.execute(
                    "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_sha256, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (key_id, tenant_id, name, api_key_prefix(secret), hash_api_key(secret), self._now_ns()),
                )
                row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            return _api_key(row)

        return await self._call(run), secret

    async def list_api_keys(self, tenant_id: str = "") -> list[store_pb2.ApiKey]:
        def run() -> list[store_pb2.ApiKey]:
            sql = "SELECT * FROM api_keys"
            args: tuple[str, ...] = ()
            if tenant_id:
                sql += " WHERE tenant_id = ?"
                args = (tenant_id,)
            with self._tx(write=False) as conn:
                rows = conn.execute(sql + " ORDER BY created_at, id", args).fetchall()
            return [_api_key(r) for r in rows]

        return await self._call(run)

    async def revoke_api_key(self, key_id: str) -> store_pb2.ApiKey:
        def run() -> store_pb2.ApiKey:
            with self._tx(write=True) as conn:
                conn.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at = 0",
                    (self._now_ns(), key_id),
                )
                row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            return _api_key(row)

        return await self._call(run)

    async def authenticate(self, secret: str) -> store_pb2.ApiKey:
        digest = hash_api_key(secret)

        def run() -> store_pb2.ApiKey:
            with self._tx(write=False) as conn:
                row = conn.execute(
                    "SELECT * FROM api_keys WHERE secret_sha256 = ? AND revoked_at = 0", (digest,)
                ).fetchone()
            if row is None:
                raise NotFound("unknown or revoked API key")
            return _api_key(row)

        return await self._call(run)


class _SQLiteTx:
    """``sql.Tx`` on the worker thread's connection. Its coroutines never suspend; ``lock``
    asks nothing of SQLite, whose write transactions (BEGIN IMMEDIATE) exclude each other."""

    def __init__(self, store: SQLiteStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn

    def now_ns(self) -> int:
        return self._store._now_ns()

    def _one(self, sql: str, args: Sequence[object]) -> RowDict | None:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else dict(row)

    def _all(self, sql: str, args: Sequence[object]) -> list[RowDict]:
        return [dict(row) for row in self._conn.execute(sql, args).fetchall()]

    async def conversation(self, tenant_id: str, conversation_id: str, *, lock: bool = False) -> RowDict:
        return dict(self._store._conversation_row(self._conn, tenant_id, conversation_id))

    async def turn(self, tenant_id: str, turn_id: str, *, lock: bool = False) -> RowDict | None:
        return self._one("SELECT * FROM turns WHERE id = ? AND tenant_id = ?", (turn_id, tenant_id))

    async def turns(self, turn_ids: Sequence[str], *, lock: bool = False) -> list[RowDict]:
        return self._all(
            "SELECT * FROM turns WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (json.dumps(list(turn_ids)),),
        )

    async def turn_by_idempotency_key(self, conversation_id: str, idempotency_key: str) -> RowDict | None:
        return self._one(
            "SELECT * FROM turns WHERE conversation_id = ? AND idempotency_key = ?",
            (conversation_id, idempotency_key),
        )

    async def unended_turn(self, conversation_id: str) -> RowDict | None:
        return self._one(
            f"SELECT * FROM turns WHERE conversation_id = ? AND {UNENDED} ORDER BY created_at, id LIMIT 1",
            (conversation_id,),
        )

    async def unheld_turns(self, now_ns: int, limit: int) -> list[RowDict]:
        return self._all(
            f"SELECT * FROM turns WHERE {UNENDED} AND (lease_owner = '' OR lease_expires_at <= ?)"
            " ORDER BY lease_expires_at, created_at, id LIMIT ?",
            (now_ns, _sql_limit(limit)),
        )

    async def insert_turn(self, row: Mapping[str, Any]) -> None:
        columns = ", ".join(row)
        self._conn.execute(
            f"INSERT INTO turns ({columns}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())
        )

    async def update(self, table: str, row_id: str, fields: Mapping[str, Any]) -> None:
        SQLiteStore._update(self._conn, table, row_id, dict(fields))

    async def update_turns(self, turn_ids: Sequence[str], fields: Mapping[str, Any]) -> None:
        assignments = ", ".join(f"{column} = ?" for column in fields)
        self._conn.execute(
            f"UPDATE turns SET {assignments} WHERE id IN (SELECT value FROM json_each(?))",
            (*fields.values(), json.dumps(list(turn_ids))),
        )

    async def history(self, conversation_id: str) -> list[common_pb2.Message]:
        rows = self._conn.execute(
            "SELECT body FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
        ).fetchall()
        return [common_pb2.Message.FromString(r["body"]) for r in rows]

    async def insert_messages(self, conversation_id: str, messages: Sequence[common_pb2.Message]) -> None:
        self._conn.executemany(
            "INSERT INTO messages (conversation_id, seq, role, turn_id, step_index, created_at, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    conversation_id,
                    m.seq,
                    m.role,
                    m.turn_id,
                    m.step_index,
                    m.created_at.ToNanoseconds(),
                    m.SerializeToString(),
                )
                for m in messages
            ],
        )

    async def insert_events(self, conversation_id: str, events: Sequence[common_pb2.AgentEvent]) -> None:
        self._conn.executemany(
            "INSERT INTO events (conversation_id, event_seq, turn_id, body) VALUES (?, ?, ?, ?)",
            [(conversation_id, e.event_seq, e.turn_id, e.SerializeToString()) for e in events],
        )

    async def take_queue(self, conversation_id: str, now_ns: int) -> list[store_pb2.QueuedMessage]:
        rows = self._conn.execute(
            "SELECT * FROM queue WHERE conversation_id = ? AND drained_at = 0 ORDER BY id", (conversation_id,)
        ).fetchall()
        if rows:
            self._conn.execute(
                "UPDATE queue SET drained_at = ? WHERE conversation_id = ? AND drained_at = 0",
                (now_ns, conversation_id),
            )
        return [_queued(r) for r in rows]

    async def queued(self, conversation_id: str, idempotency_key: str) -> store_pb2.QueuedMessage | None:
        row = self._one(
            "SELECT * FROM queue WHERE conversation_id = ? AND idempotency_key = ?",
            (conversation_id, idempotency_key),
        )
        return None if row is None else _queued(row)

    async def insert_queued(
        self, conversation_id: str, idempotency_key: str, body: bytes, now_ns: int
    ) -> int:
        cursor = self._conn.execute(
            "INSERT INTO queue (conversation_id, idempotency_key, body, created_at) VALUES (?, ?, ?, ?)",
            (conversation_id, idempotency_key, body, now_ns),
        )
        return int(cursor.lastrowid or 0)

    async def approval(self, tenant_id: str, approval_id: str) -> RowDict | None:
        return self._one("SELECT * FROM approvals WHERE id = ? AND tenant_id = ?", (approval_id, tenant_id))

    async def approvals(self, conversation_id: str, *, pending_only: bool = False) -> list[RowDict]:
        pending = " AND decision = 0" if pending_only else ""
        return self._all(
            f"SELECT * FROM approvals WHERE conversation_id = ?{pending} ORDER BY created_at, id",
            (conversation_id,),
        )

    async def insert_approvals(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self._conn.execute(
                f"INSERT INTO approvals ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                tuple(row.values()),
            )

    async def upsert_step_metrics(
        self, conversation_id: str, metrics: Sequence[common_pb2.StepMetrics]
    ) -> None:
        self._conn.executemany(
            "INSERT INTO step_metrics (turn_id, step_index, conversation_id, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (turn_id, step_index) DO UPDATE SET body = excluded.body",
            [(m.turn_id, m.step_index, conversation_id, m.SerializeToString()) for m in metrics],
        )

    async def upsert_turn_metrics(self, conversation_id: str, metrics: common_pb2.TurnMetrics) -> None:
        self._conn.execute(
            "INSERT INTO turn_metrics (turn_id, conversation_id, body) VALUES (?, ?, ?)"
            " ON CONFLICT (turn_id) DO UPDATE SET body = excluded.body",
            (metrics.turn_id, conversation_id, metrics.SerializeToString()),
        )

    async def decide_approval(self, approval_id: str, fields: Mapping[str, Any]) -> bool:
        assignments = ", ".join(f"{column} = ?" for column in fields)
        cursor = self._conn.execute(
            f"UPDATE approvals SET {assignments} WHERE id = ? AND decision = 0",
            (*fields.values(), approval_id),
        )
        return cursor.rowcount == 1

    async def count_started(self) -> int:
        # Write transactions exclude each other whole: nothing else to lock.
        row = self._conn.execute(
            "SELECT count(*) FROM turns WHERE state IN (2, 3, 4)",
        ).fetchone()
        return int(row[0])

    async def put_kernel(self, row: Mapping[str, Any]) -> None:
        self._conn.execute(
            "INSERT INTO kernels (owner, address, run_slots, running, started_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner) DO UPDATE SET address = excluded.address,"
            " run_slots = excluded.run_slots, running = excluded.running, expires_at = excluded.expires_at",
            tuple(row[c] for c in KERNEL_COLUMNS),
        )

    async def live_kernels(self, now_ns: int) -> list[RowDict]:
        return self._all(
            f"SELECT {', '.join(KERNEL_COLUMNS)} FROM kernels WHERE expires_at > ?"
            " ORDER BY started_at, owner",
            (now_ns,),
        )

    async def delete_kernels(self, owner: str, expired_before_ns: int) -> None:
        self._conn.execute(
            "DELETE FROM kernels WHERE owner = ? OR expires_at < ?", (owner, expired_before_ns)
        )
