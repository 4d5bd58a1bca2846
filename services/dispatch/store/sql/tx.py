"""Every statement the SQL store sends, written once, over a dialect's few primitives.

The SQL here has ``?`` placeholders and speaks what SQLite and PostgreSQL both understand
(``ON CONFLICT ... DO UPDATE`` upserts, row values, ``<>``). Where the two differ, a
statement asks its ``Tx`` for the dialect's word (``for_update``, ``true``, ``no_limit``,
``any_of``) or leaves the work to a primitive (``insert_rows``, ``insert_returning``,
``lock_migrations``). A dialect subclasses ``Tx`` with those and nothing else: how to run a
statement on its driver (its placeholders, its rows), how to lock, how to return what an
insert made, how to take many rows at once.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

from dispatch.shared.errors import NotFound
from dispatch.store.backend import STARTED_STATES, TERMINAL_STATES
from dispatch.store.rows import Row, queued_from_row
from dispatch.v1 import common_pb2, store_pb2

T = TypeVar("T")

# "Has not ended", as SQL both dialects speak. Migration 4's partial indexes carry the same
# predicate, literally, so that the planners use them for the queries that say this.
UNENDED = f"state NOT IN ({', '.join(str(int(s)) for s in sorted(TERMINAL_STATES))})"

MESSAGE_COLUMNS = ("conversation_id", "seq", "role", "turn_id", "step_index", "created_at", "body")
EVENT_COLUMNS = ("conversation_id", "event_seq", "turn_id", "body")

# A conversation's rows in other tables, the turns' dependants before the turns.
CONVERSATION_TABLES = ("messages", "events", "step_metrics", "turn_metrics", "queue", "approvals", "turns")


def run_to_completion(operation: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends: an operation over a synchronous ``Tx``."""
    try:
        operation.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    operation.close()
    raise RuntimeError("a store operation suspended inside a synchronous transaction")


KERNEL_COLUMNS = ("owner", "address", "run_slots", "running", "started_at", "expires_at")


@functools.lru_cache(maxsize=256)
def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT`` of one row of ``columns`` (names from our code, never a request)."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"


class Tx(abc.ABC):
    """One open transaction: the store's statements, over the primitives a dialect supplies.

    Rows are read by column name (``rows.Row``: a dialect need not copy its driver's rows into
    dicts). Table and column names in these statements come from our code, never from a request.
    """

    # A SELECT that ends with this holds its rows until the transaction ends.
    for_update: ClassVar[str] = ""
    # True, as a boolean column is compared with it where a partial index must match.
    true: ClassVar[str]
    # The LIMIT argument that is no limit.
    no_limit: ClassVar[object]

    def __init__(self, now_ns: Callable[[], int]) -> None:
        # The store clock, strictly increasing within the process.
        self.now_ns = now_ns

    # ------------------------------------------------------------ primitives

    @abc.abstractmethod
    async def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        """Run one statement; answer how many rows it changed."""

    @abc.abstractmethod
    async def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Run one statement once per row of arguments, in order."""

    @abc.abstractmethod
    async def row(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        """The first row the query answers, or None."""

    @abc.abstractmethod
    async def rows(self, sql: str, args: Sequence[object] = ()) -> Sequence[Row]:
        """Every row the query answers."""

    @abc.abstractmethod
    async def values(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        """The first column of every row the query answers."""

    @abc.abstractmethod
    async def insert_rows(
        self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[object]]
    ) -> None:
        """Insert rows of ``columns`` (as many as they are, or none)."""

    @abc.abstractmethod
    async def insert_returning(self, table: str, row: Mapping[str, Any]) -> Row:
        """Insert one row; answer it as stored (with the columns the database filled in)."""

    @abc.abstractmethod
    def any_of(self, column: str, values: Sequence[object]) -> tuple[str, object]:
        """A condition that ``column`` is one of ``values``, and the one argument it takes."""

    @abc.abstractmethod
    async def lock_migrations(self) -> None:
        """Hold, until the transaction ends, the lock that makes migrations one at a time."""

    @abc.abstractmethod
    async def lock_admissions(self) -> None:
        """Hold, until the transaction ends, the lock that makes admissions under a
        cluster-wide limit one at a time."""

    # ------------------------------------------------------------- rows by key

    def _locked(self, sql: str, lock: bool) -> str:
        return sql + self.for_update if lock else sql

    async def insert(self, table: str, row: Mapping[str, Any]) -> None:
        """Insert one row with the columns given."""
        await self.execute(insert_sql(table, tuple(row)), tuple(row.values()))

    async def update(self, table: str, row_id: str, fields: Mapping[str, Any]) -> None:
        """Set ``fields`` on one row of ``table``."""
        assignments = ", ".join(f"{column} = ?" for column in fields)
        await self.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", (*fields.values(), row_id))

    async def workspace(self, tenant_id: str, workspace_id: str) -> Row:
        """The workspace's row in this tenant, or ``NotFound``."""
        row = await self.row(
            "SELECT * FROM workspaces WHERE id = ? AND tenant_id = ?", (workspace_id, tenant_id)
        )
        if row is None:
            raise NotFound(f"workspace {workspace_id} not found")
        return row

    async def conversation(self, tenant_id: str, conversation_id: str, *, lock: bool = False) -> Row:
        """The conversation's row, or ``NotFound``; ``lock`` holds it until the end."""
        row = await self.row(
            self._locked("SELECT * FROM conversations WHERE id = ? AND tenant_id = ?", lock),
            (conversation_id, tenant_id),
        )
        if row is None:
            raise NotFound(f"conversation {conversation_id} not found")
        return row

    async def turn(self, tenant_id: str, turn_id: str, *, lock: bool = False) -> Row | None:
        """The turn's row in this tenant, or None; ``lock`` holds it until the end."""
        return await self.row(
            self._locked("SELECT * FROM turns WHERE id = ? AND tenant_id = ?", lock), (turn_id, tenant_id)
        )

    async def turns(self, turn_ids: Sequence[str], *, lock: bool = False) -> Sequence[Row]:
        """The rows of these turns, of any tenant, in id order (locked in that order)."""
        # ORDER BY before FOR UPDATE: rows are locked in id order, so two batches never deadlock.
        where, ids = self.any_of("id", turn_ids)
        return await self.rows(self._locked(f"SELECT * FROM turns WHERE {where} ORDER BY id", lock), (ids,))

    async def update_turns(self, turn_ids: Sequence[str], fields: Mapping[str, Any]) -> None:
        """Set ``fields`` on every one of these turns."""
        assignments = ", ".join(f"{column} = ?" for column in fields)
        where, ids = self.any_of("id", turn_ids)
        await self.execute(f"UPDATE turns SET {assignments} WHERE {where}", (*fields.values(), ids))

    async def page(
        self,
        table: str,
        where: str,
        args: Sequence[object],
        after: tuple[int, str] | None,
        size: int,
        *,
        newest_first: bool = False,
    ) -> Sequence[Row]:
        """Rows of ``table`` where ``where`` holds, in creation order (or newest first), past the
        page cursor ``after``: one more than ``size``, to tell whether another page follows."""
        order, past = (" DESC", "<") if newest_first else ("", ">")
        if after is not None:
            where += f" AND (created_at, id) {past} (?, ?)"
            args = (*args, *after)
        return await self.rows(
            f"SELECT * FROM {table} WHERE {where} ORDER BY created_at{order}, id{order} LIMIT ?",
            (*args, size + 1),
        )

    # -------------------------------------------------------------- workspaces

    async def default_workspace(self, tenant_id: str) -> str | None:
        """The id of the tenant's default workspace, or None."""
        found = await self.values(
            f"SELECT id FROM workspaces WHERE tenant_id = ? AND is_default = {self.true}", (tenant_id,)
        )
        return str(found[0]) if found else None

    async def insert_default_workspace(self, row: Mapping[str, Any]) -> None:
        """Insert a default workspace, unless the tenant has one: a concurrent creator's insert
        is waited for (PostgreSQL; SQLite's writers exclude each other whole) and wins."""
        await self.execute(
            insert_sql("workspaces", tuple(row))
            + f" ON CONFLICT (tenant_id) WHERE is_default = {self.true} DO NOTHING",
            tuple(row.values()),
        )

    async def set_default_workspace_roots(self, root: str) -> int:
        """Give every default workspace ``root``; answer how many changed."""
        return await self.execute(
            f"UPDATE workspaces SET root = ? WHERE is_default = {self.true} AND root <> ?", (root, root)
        )

    # ----------------------------------------------------------- conversations

    async def delete_conversation(self, conversation_id: str) -> None:
        """Delete the conversation and every row of it. Explicitly rather than left to ON DELETE
        CASCADE, which SQLite only applies on a connection with foreign_keys on."""
        for table in CONVERSATION_TABLES:
            await self.execute(f"DELETE FROM {table} WHERE conversation_id = ?", (conversation_id,))
        await self.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ------------------------------------------------------------------ turns

    async def turn_by_idempotency_key(self, conversation_id: str, idempotency_key: str) -> Row | None:
        """The turn the key started in the conversation, or None."""
        return await self.row(
            "SELECT * FROM turns WHERE conversation_id = ? AND idempotency_key = ?",
            (conversation_id, idempotency_key),
        )

    async def unended_turn(self, conversation_id: str) -> Row | None:
        """The conversation's oldest turn that has not ended, or None."""
        return await self.row(
            f"SELECT * FROM turns WHERE conversation_id = ? AND {UNENDED} ORDER BY created_at, id LIMIT 1",
            (conversation_id,),
        )

    async def unheld_turns(self, now_ns: int, limit: int) -> Sequence[Row]:
        """Turns of every tenant that have not ended whose lease nobody holds at ``now_ns``,
        earliest expiry first (0 = no limit)."""
        return await self.rows(
            f"SELECT * FROM turns WHERE {UNENDED} AND (lease_owner = '' OR lease_expires_at <= ?)"
            " ORDER BY lease_expires_at, created_at, id LIMIT ?",
            (now_ns, self._limit(limit)),
        )

    def _limit(self, limit: int) -> object:
        return limit if limit > 0 else self.no_limit

    # ---------------------------------------------------------------- history

    async def history(self, conversation_id: str) -> list[common_pb2.Message]:
        """Every message of the conversation, in seq order."""
        return [common_pb2.Message.FromString(b) for b in await self.bodies("messages", conversation_id)]

    async def bodies(self, table: str, conversation_id: str, after: int = 0, limit: int = 0) -> list[bytes]:
        """The bodies of the conversation's ``messages`` past seq ``after`` (or ``events``, past
        event_seq ``after``), in order (0 = no limit)."""
        seq = "seq" if table == "messages" else "event_seq"
        return await self.values(
            f"SELECT body FROM {table} WHERE conversation_id = ? AND {seq} > ? ORDER BY {seq} LIMIT ?",
            (conversation_id, after, self._limit(limit)),
        )

    async def insert_messages(self, conversation_id: str, messages: Sequence[common_pb2.Message]) -> None:
        """Insert messages as ``numbered`` made them."""
        await self.insert_rows(
            "messages",
            MESSAGE_COLUMNS,
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
        """Insert events as ``stamped`` made them."""
        await self.insert_rows(
            "events",
            EVENT_COLUMNS,
            [(conversation_id, e.event_seq, e.turn_id, e.SerializeToString()) for e in events],
        )

    # ------------------------------------------------------------------ queue

    async def take_queue(self, conversation_id: str, now_ns: int) -> list[store_pb2.QueuedMessage]:
        """Mark every waiting message of the queue drained; answer them in enqueue order. The
        caller holds the conversation's lock, as every writer of its queue does."""
        rows = await self.rows(
            "SELECT * FROM queue WHERE conversation_id = ? AND drained_at = 0 ORDER BY id", (conversation_id,)
        )
        if rows:
            await self.execute(
                "UPDATE queue SET drained_at = ? WHERE conversation_id = ? AND drained_at = 0",
                (now_ns, conversation_id),
            )
        return [queued_from_row(r) for r in rows]

    async def queued(self, conversation_id: str, idempotency_key: str) -> store_pb2.QueuedMessage | None:
        """The queue item the key made, drained or not, or None."""
        row = await self.row(
            "SELECT * FROM queue WHERE conversation_id = ? AND idempotency_key = ?",
            (conversation_id, idempotency_key),
        )
        return None if row is None else queued_from_row(row)

    async def insert_queued(
        self, conversation_id: str, idempotency_key: str, body: bytes, now_ns: int
    ) -> int:
        """Queue a message body; answer its id."""
        row = await self.insert_returning(
            "queue",
            {
                "conversation_id": conversation_id,
                "idempotency_key": idempotency_key,
                "body": body,
                "created_at": now_ns,
            },
        )
        return int(row["id"])

    # -------------------------------------------------------------- approvals

    async def approval(self, tenant_id: str, approval_id: str) -> Row | None:
        """The approval's row in this tenant, or None."""
        return await self.row(
            "SELECT * FROM approvals WHERE id = ? AND tenant_id = ?", (approval_id, tenant_id)
        )

    async def approvals(self, conversation_id: str, *, pending_only: bool = False) -> Sequence[Row]:
        """The conversation's approvals (only the pending ones when asked), oldest first."""
        pending = " AND decision = 0" if pending_only else ""
        return await self.rows(
            f"SELECT * FROM approvals WHERE conversation_id = ?{pending} ORDER BY created_at, id",
            (conversation_id,),
        )

    async def insert_approvals(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert approvals with every column given (``rows.approval_columns``)."""
        if rows:
            columns = tuple(rows[0])
            await self.insert_rows("approvals", columns, [tuple(row[c] for c in columns) for row in rows])

    async def decide_approval(self, approval_id: str, fields: Mapping[str, Any]) -> bool:
        """Set ``fields`` on the approval only if it is still pending (decision 0); answer
        whether it was."""
        # The compare-and-set: under READ COMMITTED a racing decision that committed first
        # leaves no pending row to update here.
        assignments = ", ".join(f"{column} = ?" for column in fields)
        changed = await self.execute(
            f"UPDATE approvals SET {assignments} WHERE id = ? AND decision = 0",
            (*fields.values(), approval_id),
        )
        return changed == 1

    # ---------------------------------------------------------------- kernels

    async def count_started(self) -> int:
        """How many turns of every tenant have started and not ended (running, waiting for
        approval, resuming), holding the admissions lock until the transaction ends."""
        await self.lock_admissions()
        started = ", ".join(str(int(s)) for s in STARTED_STATES)
        [count] = await self.values(f"SELECT count(*) FROM turns WHERE state IN ({started})")
        return int(count)

    async def put_kernel(self, row: Mapping[str, Any]) -> None:
        """Insert or replace a kernel's heartbeat row (keeping its ``started_at``)."""
        await self.execute(
            insert_sql("kernels", KERNEL_COLUMNS) + " ON CONFLICT (owner) DO UPDATE SET"
            " address = excluded.address, run_slots = excluded.run_slots,"
            " running = excluded.running, expires_at = excluded.expires_at",
            tuple(row[c] for c in KERNEL_COLUMNS),
        )

    async def live_kernels(self, now_ns: int) -> Sequence[Row]:
        """The kernel rows whose heartbeat expires after ``now_ns``, oldest first."""
        return await self.rows(
            f"SELECT {', '.join(KERNEL_COLUMNS)} FROM kernels WHERE expires_at > ?"
            " ORDER BY started_at, owner",
            (now_ns,),
        )

    async def delete_kernels(self, owner: str, expired_before_ns: int) -> None:
        """Delete ``owner``'s row, and every row that expired before ``expired_before_ns``."""
        await self.execute(
            "DELETE FROM kernels WHERE owner = ? OR expires_at < ?", (owner, expired_before_ns)
        )

    # ---------------------------------------------------------------- metrics

    async def upsert_step_metrics(
        self, conversation_id: str, metrics: Iterable[common_pb2.StepMetrics]
    ) -> None:
        """Record step metrics as ``normalized_step_metrics`` made them (one row per turn and
        step; again replaces it, also within one call)."""
        await self.execute_many(
            "INSERT INTO step_metrics (turn_id, step_index, conversation_id, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (turn_id, step_index) DO UPDATE SET body = excluded.body",
            [(m.turn_id, m.step_index, conversation_id, m.SerializeToString()) for m in metrics],
        )

    async def upsert_turn_metrics(self, conversation_id: str, metrics: common_pb2.TurnMetrics) -> None:
        """Record a turn's metrics (one row per turn; again replaces it)."""
        await self.execute(
            "INSERT INTO turn_metrics (turn_id, conversation_id, body) VALUES (?, ?, ?)"
            " ON CONFLICT (turn_id) DO UPDATE SET body = excluded.body",
            (metrics.turn_id, conversation_id, metrics.SerializeToString()),
        )

    async def recorded_metrics(
        self, conversation_id: str, turn_id: str = ""
    ) -> tuple[Sequence[Row], Sequence[Row]]:
        """The conversation's turns (only ``turn_id`` if given) in creation order with their turn
        metrics' body (None: none recorded), and their step metrics, by turn and step."""
        args: tuple[str, ...] = (conversation_id, turn_id) if turn_id else (conversation_id,)
        turns = await self.rows(
            "SELECT t.id, m.body FROM turns t LEFT JOIN turn_metrics m ON m.turn_id = t.id"
            f" WHERE t.conversation_id = ?{' AND t.id = ?' if turn_id else ''} ORDER BY t.created_at, t.id",
            args,
        )
        steps = await self.rows(
            "SELECT turn_id, body FROM step_metrics"
            f" WHERE conversation_id = ?{' AND turn_id = ?' if turn_id else ''} ORDER BY turn_id, step_index",
            args,
        )
        return turns, steps

    # --------------------------------------------------------------- api keys

    async def api_key(self, key_id: str) -> Row | None:
        return await self.row("SELECT * FROM api_keys WHERE id = ?", (key_id,))

    async def api_keys(self, tenant_id: str = "") -> Sequence[Row]:
        """Every key (of the tenant, if given), oldest first."""
        where, args = (" WHERE tenant_id = ?", (tenant_id,)) if tenant_id else ("", ())
        return await self.rows(f"SELECT * FROM api_keys{where} ORDER BY created_at, id", args)

    async def revoke_api_key(self, key_id: str, now_ns: int) -> None:
        """Revoke the key, unless it is revoked already (it keeps its first revocation time)."""
        await self.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at = 0", (now_ns, key_id)
        )

    async def unrevoked_api_key(self, secret_sha256: str) -> Row | None:
        """The key whose secret has this hash, unless it is revoked."""
        return await self.row(
            "SELECT * FROM api_keys WHERE secret_sha256 = ? AND revoked_at = 0", (secret_sha256,)
        )

    # ------------------------------------------------------------- migrations

    async def schema_version(self) -> int:
        """The highest migration the database has applied."""
        found = await self.values("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        return int(found[0])

    async def has_migration(self, version: int) -> bool:
        return await self.row("SELECT 1 FROM schema_version WHERE version = ?", (version,)) is not None

    async def record_migration(self, version: int, applied_at_ns: int) -> None:
        await self.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, applied_at_ns)
        )
