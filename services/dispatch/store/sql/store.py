"""The SQL store's every operation, written once over ``Tx``.

Each operation is one transaction: a sequence of reads and writes through the ``Tx`` a
dialect supplies (``tx``: every statement, over its primitives), deciding with the rules of
``backend``. So SQLite and PostgreSQL differ only in how a statement reaches the database,
never in what the store sends or decides (temporal's SQL persistence over its per-database
``sqlplugin`` is the model).

``Tx`` methods are coroutines. PostgreSQL's await the server. SQLite's run on the store's
one worker thread and never suspend, so its dialect drives an operation to completion inside
one synchronous transaction (``run_to_completion``) instead of hopping between the thread and
the event loop per statement.

Locks, on a database that takes them (PostgreSQL; SQLite's write transactions exclude each
other whole): an operation that writes to a conversation locks the conversation row first and
the turn row after it, always in that order, so two operations can wait on each other but
never deadlock. Renewals lock only turn rows, in id order. Approvals are decided by a
compare-and-set on their row being pending (``Tx.decide_approval``), under their
conversation's lock, so a decision, a racing one and the seal that closes the turn's pending
approvals come one after the other, and only the first of them decides.
"""

from __future__ import annotations

import abc
import datetime
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from dispatch.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from dispatch.shared.ids import new_id
from dispatch.store.backend import (
    API_KEY_PREFIX,
    APPROVAL_PREFIX,
    CONVERSATION_PREFIX,
    DEFAULT_WORKSPACE_NAME,
    TERMINAL_STATES,
    TURN_PREFIX,
    WORKSPACE_PREFIX,
    Appended,
    ApprovalDecision,
    EventHistory,
    Execution,
    FinishReason,
    History,
    Lease,
    LeaseFence,
    LeaseRef,
    NextTurn,
    Page,
    Store,
    TurnSeal,
    TurnState,
    api_key_prefix,
    appended_metrics,
    check_append_request,
    check_approvable_turn,
    check_event_seqs,
    check_fence,
    check_lease_claim,
    check_lease_held,
    check_lease_release,
    check_new_approval,
    check_new_turn_lease,
    check_no_turn_in_flight,
    check_pending,
    check_permission_rules,
    check_queued_message,
    check_reservation,
    check_resolution,
    check_transition,
    check_turn_in_flight,
    check_turn_metrics,
    claimed_lease_fields,
    closed_approval,
    decided_approval,
    decode_cursor,
    effective_page_size,
    hash_api_key,
    holds_lease,
    initial_state,
    lease_ttl_ns,
    new_api_key_secret,
    new_approval,
    new_turn_row,
    normalized_step_metrics,
    raised_reservation,
    released_lease_fields,
    remembered_after,
    reservation_after_append,
    sealed_fields,
    steering_messages,
    synthesize_missing_results,
    transition_fields,
    turn_user_messages,
)
from dispatch.store.rows import (
    Row,
    api_key_from_row,
    approval_columns,
    approval_from_row,
    conversation_from_row,
    lease_from_row,
    page_from_rows,
    rules_column,
    rules_from_column,
    turn_from_row,
    workspace_from_row,
)
from dispatch.store.sql.tx import Tx
from dispatch.v1 import common_pb2, store_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

# (version, statements) in order: each applied in one transaction with its schema_version row.
Migrations = tuple[tuple[int, tuple[str, ...]], ...]


def kernel_from_row(row: Row) -> store_pb2.KernelInfo:
    return store_pb2.KernelInfo(
        owner=row["owner"],
        address=row["address"],
        run_slots=row["run_slots"],
        running=row["running"],
        started_at_unix_nanos=row["started_at"],
        expires_at_unix_nanos=row["expires_at"],
    )


class Schema(NamedTuple):
    """A dialect's schema: its tables' DDL, migration by migration."""

    # CREATE TABLE IF NOT EXISTS schema_version, in the dialect's types.
    version_table: str
    migrations: Migrations
    # The highest version in ``migrations``: the newest database this store can open.
    version: int


def numbered(
    conversation_id: str, last_seq: int, messages: Sequence[common_pb2.Message], now_ns: int
) -> list[common_pb2.Message]:
    """Messages as committed: the next gap-free seqs after ``last_seq``, the conversation,
    the commit time."""
    stored: list[common_pb2.Message] = []
    for seq, msg in enumerate(messages, start=last_seq + 1):
        copy = common_pb2.Message()
        copy.CopyFrom(msg)
        copy.conversation_id = conversation_id
        copy.seq = seq
        copy.created_at.FromNanoseconds(now_ns)
        stored.append(copy)
    return stored


def stamped(
    conversation_id: str, events: Sequence[common_pb2.AgentEvent], now_ns: int
) -> list[common_pb2.AgentEvent]:
    """Events as persisted: their conversation, and the commit time unless they carry one."""
    stored: list[common_pb2.AgentEvent] = []
    for event in events:
        if event.conversation_id == conversation_id and event.HasField("time"):
            stored.append(event)  # as the kernel sends them: persisted as they are, no copy
            continue
        copy = common_pb2.AgentEvent()
        copy.CopyFrom(event)
        copy.conversation_id = conversation_id
        if not copy.HasField("time"):
            copy.time.FromNanoseconds(now_ns)
        stored.append(copy)
    return stored


async def _turn(tx: Tx, tenant_id: str, turn_id: str, *, lock: bool = False) -> Row:
    row = await tx.turn(tenant_id, turn_id, lock=lock)
    if row is None:
        raise NotFound(f"turn {turn_id} not found")
    return row


async def _unended(tx: Tx, conversation_id: str) -> Lease | None:
    row = await tx.unended_turn(conversation_id)
    return None if row is None else lease_from_row(row)


def _decision_columns(approval: common_pb2.Approval) -> dict[str, Any]:
    """The columns a decision changes."""
    columns = approval_columns(approval)
    return {name: columns[name] for name in ("decision", "decided_by", "remember", "body")}


async def _close_pending_approvals(
    tx: Tx, conversation_id: str, turn_id: str, error_message: str, now_ns: int
) -> dict[str, common_pb2.Approval]:
    """Close the turn's pending approvals (``closed_approval``), as its end requires: a call
    nobody will run must not stay open. Answers them by id, as closed."""
    closed: dict[str, common_pb2.Approval] = {}
    for row in await tx.approvals(conversation_id, pending_only=True):
        approval = approval_from_row(row)
        if approval.turn_id != turn_id:
            continue
        done = closed_approval(approval, error_message, now_ns)
        if await tx.decide_approval(approval.id, _decision_columns(done)):
            closed[approval.id] = done
    return closed


async def _turn_of(tx: Tx, tenant_id: str, conversation_id: str, turn_id: str) -> Row:
    """The turn's row, or ``NotFound`` unless it is the conversation's."""
    row = await _turn(tx, tenant_id, turn_id)
    if row["conversation_id"] != conversation_id:
        raise NotFound(f"turn {turn_id} not found in conversation {conversation_id}")
    return row


async def _turn_in_conversation(tx: Tx, tenant_id: str, conversation_id: str, turn_id: str) -> Row:
    # The conversation first, so a missing conversation is reported as such.
    await tx.conversation(tenant_id, conversation_id)
    return await _turn_of(tx, tenant_id, conversation_id, turn_id)


def _workspace_columns(
    workspace_id: str,
    tenant_id: str,
    now_ns: int,
    *,
    name: str,
    root: str,
    is_default: bool,
    default_computer_id: str = "",
    default_agent: str = "",
    confine_tools: bool = False,
    permissions: Sequence[common_pb2.PermissionRule] = (),
) -> dict[str, Any]:
    """Every column of a new workspace's row."""
    return {
        "id": workspace_id,
        "tenant_id": tenant_id,
        "name": name,
        "root": root,
        "default_computer_id": default_computer_id,
        "default_agent": default_agent,
        "confine_tools": confine_tools,
        "permissions": rules_column(permissions),
        "is_default": is_default,
        "created_at": now_ns,
    }


class SQLStore(Store):
    """``Store`` on a SQL database, over the ``Tx`` of a dialect's ``_run``."""

    # How the dialect names itself and its database in logs and errors (never a password).
    dialect: ClassVar[str]
    location: str

    def __init__(
        self, *, default_workspace_root: str, max_append_bytes: int, clock: Callable[[], float] | None
    ) -> None:
        # Seconds since the epoch, like time.time; tests pass a clock they advance
        # instead of sleeping until a lease expires.
        self._clock_ns: Callable[[], int] = (
            time.time_ns if clock is None else lambda: round(clock() * 1_000_000_000)
        )
        self.default_workspace_root = default_workspace_root
        self.max_append_bytes = max_append_bytes
        self._last_ns = 0

    def _now_ns(self) -> int:
        # Strictly increasing within the process (one thread calls it: the event loop's, or
        # SQLite's worker), so rows created back to back sort by creation; page cursors
        # also carry the id, so ties across processes are fine.
        now = max(self._clock_ns(), self._last_ns + 1)
        self._last_ns = now
        return now

    @abc.abstractmethod
    async def _run(self, operation: Callable[[Tx], Coroutine[Any, Any, T]], *, write: bool = True) -> T:
        """Run ``operation`` in one transaction (read-only unless ``write``); commit when it
        returns, roll back when it raises."""

    @abc.abstractmethod
    def _schema(self) -> Schema:
        """The dialect's schema, as it stands when asked."""

    # ------------------------------------------------------------- migrations

    async def migrate(self) -> int:
        """Apply the migrations the database lacks; answer how many were applied. Each runs in
        its own transaction together with its schema_version row, under the migration lock,
        so two processes starting on one database migrate one after the other."""
        schema = self._schema()

        async def create(tx: Tx) -> None:
            await tx.lock_migrations()
            await tx.execute(schema.version_table)

        await self._run(create)
        found = await self.schema_version()
        if found > schema.version:
            raise FailedPrecondition(
                f"database {self.location} has schema version {found}, newer than this store knows "
                f"({schema.version}); run a newer dispatchd"
            )
        applied = 0
        for version, statements in schema.migrations:

            async def step(tx: Tx, version: int = version, statements: tuple[str, ...] = statements) -> bool:
                await tx.lock_migrations()
                # Checked under the lock: another process may have just applied it.
                if await tx.has_migration(version):
                    return False
                for statement in statements:
                    await tx.execute(statement)
                await tx.record_migration(version, time.time_ns())
                return True

            if await self._run(step):
                applied += 1
                log.info("%s %s: applied schema migration %d", self.dialect, self.location, version)
        return applied

    async def schema_version(self) -> int:
        """The highest migration the database has applied."""

        async def op(tx: Tx) -> int:
            return await tx.schema_version()

        return await self._run(op, write=False)

    # ------------------------------------------------------------- workspaces

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
        workspace_id = new_id(WORKSPACE_PREFIX)

        async def op(tx: Tx) -> common_pb2.Workspace:
            row = _workspace_columns(
                workspace_id,
                tenant_id,
                tx.now_ns(),
                name=name,
                root=root,
                is_default=False,
                default_computer_id=default_computer_id,
                default_agent=default_agent,
                confine_tools=confine_tools,
                permissions=permissions,
            )
            return workspace_from_row(await tx.insert_returning("workspaces", row))

        return await self._run(op)

    async def get_workspace(self, tenant_id: str, workspace_id: str) -> common_pb2.Workspace:
        async def op(tx: Tx) -> common_pb2.Workspace:
            return workspace_from_row(await tx.workspace(tenant_id, workspace_id))

        return await self._run(op, write=False)

    async def list_workspaces(
        self, tenant_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Workspace]:
        size = effective_page_size(page_size)
        after = decode_cursor(page_token)

        async def op(tx: Tx) -> Page[common_pb2.Workspace]:
            rows = await tx.page("workspaces", "tenant_id = ?", (tenant_id,), after, size)
            return page_from_rows(rows, size, workspace_from_row)

        return await self._run(op, write=False)

    async def set_default_workspace_root(self, root: str) -> int:
        self.default_workspace_root = root

        async def op(tx: Tx) -> int:
            return await tx.set_default_workspace_roots(root)

        return await self._run(op)

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

        async def op(tx: Tx) -> common_pb2.Workspace:
            await tx.workspace(tenant_id, workspace_id)
            if fields:
                await tx.update("workspaces", workspace_id, fields)
            return workspace_from_row(await tx.workspace(tenant_id, workspace_id))

        return await self._run(op)

    async def _default_workspace(self, tx: Tx, tenant_id: str) -> str:
        found = await tx.default_workspace(tenant_id)
        if found is not None:
            return found
        row = _workspace_columns(
            new_id(WORKSPACE_PREFIX),
            tenant_id,
            tx.now_ns(),
            name=DEFAULT_WORKSPACE_NAME,
            root=self.default_workspace_root,
            is_default=True,
        )
        await tx.insert_default_workspace(row)
        # Inserted above, or by the transaction it conflicted with (committed by now, and
        # seen by this statement: PostgreSQL's READ COMMITTED takes a snapshot per statement).
        found = await tx.default_workspace(tenant_id)
        assert found is not None
        return found

    # ---------------------------------------------------------- conversations

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
        conversation_id = new_id(CONVERSATION_PREFIX)

        async def op(tx: Tx) -> common_pb2.Conversation:
            if workspace_id:
                ws_id = str((await tx.workspace(tenant_id, workspace_id))["id"])
            else:
                ws_id = await self._default_workspace(tx, tenant_id)
            now = tx.now_ns()
            row = await tx.insert_returning(
                "conversations",
                {
                    "id": conversation_id,
                    "tenant_id": tenant_id,
                    "workspace_id": ws_id,
                    "title": title,
                    "cwd": cwd,
                    "computer_id": computer_id,
                    "agent": agent,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            return conversation_from_row(row)

        return await self._run(op)

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> common_pb2.Conversation:
        async def op(tx: Tx) -> common_pb2.Conversation:
            return conversation_from_row(await tx.conversation(tenant_id, conversation_id))

        return await self._run(op, write=False)

    async def list_conversations(
        self, tenant_id: str, *, workspace_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Conversation]:
        size = effective_page_size(page_size)
        after = decode_cursor(page_token)

        async def op(tx: Tx) -> Page[common_pb2.Conversation]:
            where, args = "tenant_id = ?", [tenant_id]
            if workspace_id:
                await tx.workspace(tenant_id, workspace_id)
                where += " AND workspace_id = ?"
                args.append(workspace_id)
            rows = await tx.page("conversations", where, args, after, size, newest_first=True)
            return page_from_rows(rows, size, conversation_from_row)

        return await self._run(op, write=False)

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

        async def op(tx: Tx) -> common_pb2.Conversation:
            await tx.conversation(tenant_id, conversation_id, lock=True)
            if fields:
                await tx.update("conversations", conversation_id, {**fields, "updated_at": tx.now_ns()})
            return conversation_from_row(await tx.conversation(tenant_id, conversation_id))

        return await self._run(op)

    async def delete_conversation(self, tenant_id: str, conversation_id: str) -> None:
        async def op(tx: Tx) -> None:
            await tx.conversation(tenant_id, conversation_id, lock=True)
            await tx.delete_conversation(conversation_id)

        await self._run(op)

    # --------------------------------------------------------------- history

    async def append(
        self,
        tenant_id: str,
        conversation_id: str,
        messages: Sequence[common_pb2.Message],
        events: Sequence[common_pb2.AgentEvent] = (),
        take_queue_for_turn: str = "",
        *,
        fence: LeaseFence | None = None,
        reserve_event_seq: int = 0,
        seal: TurnSeal | None = None,
        release_lease: bool = False,
        next_turn: NextTurn | None = None,
        approvals: Sequence[common_pb2.Approval] = (),
        move_to: TurnState = common_pb2.TURN_STATE_UNSPECIFIED,
        step_metrics: Sequence[common_pb2.StepMetrics] = (),
        turn_metrics: common_pb2.TurnMetrics | None = None,
    ) -> Appended:
        asked = check_append_request(
            conversation_id,
            messages,
            events,
            self.max_append_bytes,
            take_queue_for_turn=take_queue_for_turn,
            fence=fence,
            reserve_event_seq=reserve_event_seq,
            seal=seal,
            release_lease=release_lease,
            next_turn=next_turn,
            approvals=approvals,
            move_to=move_to,
            step_metrics=step_metrics,
            turn_metrics=turn_metrics,
        )
        steps, turn_totals = appended_metrics(conversation_id, fence, step_metrics, turn_metrics)
        approval_ids = [new_id(APPROVAL_PREFIX) for _ in asked]
        next_turn_id = new_id(TURN_PREFIX) if next_turn is not None else ""
        next_ttl_ns = lease_ttl_ns(next_turn.lease_ttl) if next_turn is not None else 0

        async def op(tx: Tx) -> Appended:
            # The conversation first: it orders concurrent appenders, in any process.
            conv = await tx.conversation(tenant_id, conversation_id, lock=True)
            fenced: Row | None = None
            turn_fields: dict[str, Any] = {}
            now = tx.now_ns()
            if fence is not None:
                fenced = await tx.turn(tenant_id, fence.turn_id, lock=True)
                check_fence(fence, None if fenced is None else lease_from_row(fenced), conversation_id)
                assert fenced is not None
                if seal is not None:
                    turn_fields = sealed_fields(lease_from_row(fenced), fenced["started_at"], seal, now)
                else:
                    if move_to != common_pb2.TURN_STATE_UNSPECIFIED:
                        check_transition(fence.turn_id, fenced["state"], move_to)
                        turn_fields = transition_fields(
                            started_at=fenced["started_at"], to=move_to, now_ns=now
                        )
                    if release_lease:
                        turn_fields.update(released_lease_fields())
            check_event_seqs(events, conv["last_event_seq"])

            taken = await tx.take_queue(conversation_id, now) if take_queue_for_turn else []
            stored = numbered(
                conversation_id,
                conv["last_seq"],
                [*messages, *steering_messages(taken, take_queue_for_turn)],
                now,
            )
            await tx.insert_messages(conversation_id, stored)
            seq = stored[-1].seq if stored else int(conv["last_seq"])
            if events:
                await tx.insert_events(conversation_id, stamped(conversation_id, events, now))
            last_event_seq = events[-1].event_seq if events else int(conv["last_event_seq"])

            turn = None
            created: list[common_pb2.Approval] = []
            if fence is not None and fenced is not None:
                # Each its own instant, so that they list in the order asked (oldest first).
                created = [
                    new_approval(a, approval_id, tenant_id, tx.now_ns())
                    for a, approval_id in zip(asked, approval_ids, strict=True)
                ]
                if created:
                    await tx.insert_approvals([approval_columns(a) for a in created])
                if steps:
                    await tx.upsert_step_metrics(conversation_id, steps)
                if turn_totals is not None:
                    await tx.upsert_turn_metrics(conversation_id, turn_totals)
                if turn_fields:
                    await tx.update("turns", fence.turn_id, turn_fields)
                turn = turn_from_row({**fenced, **turn_fields})
                if seal is not None:
                    closed = await _close_pending_approvals(
                        tx, conversation_id, fence.turn_id, seal.error_message, now
                    )
                    created = [closed.get(a.id, a) for a in created]

            started = None
            started_messages: list[common_pb2.Message] = []
            if next_turn is not None and fence is not None:
                queued = await tx.take_queue(conversation_id, now)
                if queued:
                    started_messages = numbered(
                        conversation_id, seq, steering_messages(queued, next_turn_id), now
                    )
                    row = new_turn_row(
                        next_turn_id,
                        tenant_id,
                        conversation_id,
                        state=initial_state(next_turn.state),
                        now_ns=now,
                        agent=next_turn.agent,
                        lease_owner=fence.owner,
                        lease_expires_at=now + next_ttl_ns,
                        user_message_seq=started_messages[0].seq,
                    )
                    await tx.insert("turns", row)
                    await tx.insert_messages(conversation_id, started_messages)
                    seq = started_messages[-1].seq
                    started = turn_from_row(row)

            reserved = reservation_after_append(
                conv["reserved_event_seq"],
                last_event_seq,
                reserve_event_seq,
                lowered=seal is not None or release_lease,
                next_turn_reserve=None
                if started is None or next_turn is None
                else next_turn.reserve_event_seq,
            )
            await tx.update(
                "conversations",
                conversation_id,
                {
                    "last_seq": seq,
                    "last_event_seq": last_event_seq,
                    "reserved_event_seq": reserved,
                    "updated_at": now,
                },
            )
            return Appended(
                messages=stored,
                first_seq=stored[0].seq if stored else 0,
                last_seq=stored[-1].seq if stored else 0,
                last_event_seq=last_event_seq,
                dequeued=len(taken),
                turn=turn,
                next_turn=started,
                next_turn_messages=started_messages,
                reserved_event_seq=reserved,
                approvals=created,
            )

        return await self._run(op)

    async def load_since(
        self, tenant_id: str, conversation_id: str, *, after_seq: int = 0, limit: int = 0
    ) -> History:
        async def op(tx: Tx) -> History:
            conv = await tx.conversation(tenant_id, conversation_id)
            bodies = await tx.bodies("messages", conversation_id, after_seq, limit)
            return History(
                messages=[common_pb2.Message.FromString(b) for b in bodies], last_seq=conv["last_seq"]
            )

        return await self._run(op, write=False)

    async def load_events(
        self, tenant_id: str, conversation_id: str, *, after_event_seq: int = 0, limit: int = 0
    ) -> EventHistory:
        async def op(tx: Tx) -> EventHistory:
            conv = await tx.conversation(tenant_id, conversation_id)
            bodies = await tx.bodies("events", conversation_id, after_event_seq, limit)
            return EventHistory(
                events=[common_pb2.AgentEvent.FromString(b) for b in bodies],
                last_event_seq=conv["last_event_seq"],
            )

        return await self._run(op, write=False)

    # ----------------------------------------------------------------- turns

    async def create_turn(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        idempotency_key: str = "",
        state: TurnState = common_pb2.TURN_STATE_QUEUED,
        computer_id: str = "",
        cwd: str = "",
        agent: str = "",
        lease_owner: str = "",
        lease_ttl: datetime.timedelta | None = None,
        reserve_event_seq: int = 0,
        user_messages: Sequence[common_pb2.Message] = (),
        exclusive: bool = False,
    ) -> common_pb2.Turn:
        start = initial_state(state)
        ttl_ns = check_new_turn_lease(lease_owner, lease_ttl)
        check_reservation(reserve_event_seq, "reserve_event_seq")
        turn_id = new_id(TURN_PREFIX)
        firsts = turn_user_messages(conversation_id, turn_id, user_messages, self.max_append_bytes)

        async def op(tx: Tx) -> common_pb2.Turn:
            # Locked, so that racing creators check the key and the turn in flight one by one.
            conv = await tx.conversation(tenant_id, conversation_id, lock=True)
            if idempotency_key:
                existing = await tx.turn_by_idempotency_key(conversation_id, idempotency_key)
                if existing is not None:
                    raise AlreadyExists(
                        f"idempotency key {idempotency_key!r} already started turn {existing['id']} "
                        f"in conversation {conversation_id}"
                    )
            if exclusive:
                check_no_turn_in_flight(conversation_id, await _unended(tx, conversation_id))
            now = tx.now_ns()
            stored = numbered(conversation_id, conv["last_seq"], firsts, now)
            row = new_turn_row(
                turn_id,
                tenant_id,
                conversation_id,
                state=start,
                now_ns=now,
                idempotency_key=idempotency_key,
                computer_id=computer_id,
                cwd=cwd,
                agent=agent,
                lease_owner=lease_owner,
                lease_expires_at=now + ttl_ns,
                user_message_seq=stored[0].seq if stored else 0,
            )
            await tx.insert("turns", row)
            changes: dict[str, Any] = {}
            if stored:
                await tx.insert_messages(conversation_id, stored)
                changes.update(last_seq=stored[-1].seq, updated_at=now)
            reserved = raised_reservation(
                conv["reserved_event_seq"], conv["last_event_seq"], reserve_event_seq
            )
            if reserved != conv["reserved_event_seq"]:
                changes["reserved_event_seq"] = reserved
            if changes:
                await tx.update("conversations", conversation_id, changes)
            return turn_from_row(row)

        return await self._run(op)

    async def get_turn(self, tenant_id: str, turn_id: str) -> common_pb2.Turn:
        async def op(tx: Tx) -> common_pb2.Turn:
            return turn_from_row(await _turn(tx, tenant_id, turn_id))

        return await self._run(op, write=False)

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
        after = decode_cursor(page_token)
        wanted = sorted({int(s) for s in states})

        async def op(tx: Tx) -> Page[common_pb2.Turn]:
            await tx.conversation(tenant_id, conversation_id)
            where = "conversation_id = ?"
            args: list[object] = [conversation_id]
            if wanted:
                state_in, arg = tx.any_of("state", wanted)
                where += f" AND {state_in}"
                args.append(arg)
            if idempotency_key:
                where += " AND idempotency_key = ?"
                args.append(idempotency_key)
            rows = await tx.page("turns", where, args, after, size)
            return page_from_rows(rows, size, turn_from_row)

        return await self._run(op, write=False)

    async def transition_turn(
        self,
        tenant_id: str,
        turn_id: str,
        to: TurnState,
        *,
        finish_reason: FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED,
        error_message: str = "",
        user_message_seq: int = 0,
        lease_owner: str = "",
        lease_epoch: int = 0,
        max_running: int = 0,
    ) -> common_pb2.Turn:
        if lease_epoch and not lease_owner:
            raise InvalidArgument("lease_epoch needs lease_owner: the epoch is of that owner's claim")

        ends = to in TERMINAL_STATES

        async def op(tx: Tx) -> common_pb2.Turn:
            if ends:
                # Its end closes its pending approvals: the conversation's row before the
                # turn's, as every writer locks them.
                unlocked = await _turn(tx, tenant_id, turn_id)
                await tx.conversation(tenant_id, unlocked["conversation_id"], lock=True)
            row = await _turn(tx, tenant_id, turn_id, lock=True)
            check_transition(turn_id, row["state"], to)
            if lease_owner:
                check_lease_held(lease_from_row(row), lease_owner, lease_epoch)
            if (
                max_running
                and row["state"] == common_pb2.TURN_STATE_QUEUED
                and to == common_pb2.TURN_STATE_RUNNING
            ):
                # Admissions one at a time across the cluster, so two never both see a free slot.
                running = await tx.count_started()
                if running >= max_running:
                    raise ResourceExhausted(
                        f"{running} turns are running in the cluster; its limit is {max_running}"
                    )
            now = tx.now_ns()
            fields = transition_fields(
                started_at=row["started_at"],
                to=to,
                now_ns=now,
                finish_reason=finish_reason,
                error_message=error_message,
                user_message_seq=user_message_seq,
            )
            await tx.update("turns", turn_id, fields)
            if ends:
                await _close_pending_approvals(tx, row["conversation_id"], turn_id, error_message, now)
            return turn_from_row({**row, **fields})

        return await self._run(op)

    # ------------------------------------------------------------- execution

    async def resolve_execution(self, tenant_id: str, conversation_id: str, turn_id: str = "") -> Execution:
        async def op(tx: Tx) -> Execution:
            conv = await tx.conversation(tenant_id, conversation_id)
            turn_computer = turn_cwd = ""
            if turn_id:
                turn = await _turn_of(tx, tenant_id, conversation_id, turn_id)
                turn_computer, turn_cwd = turn["computer_id"], turn["cwd"]
            ws = await tx.workspace(tenant_id, conv["workspace_id"])
            return Execution(
                computer_id=turn_computer or conv["computer_id"] or ws["default_computer_id"] or "",
                cwd=turn_cwd or conv["cwd"] or ws["root"],
                workspace_root=ws["root"],
                confine_tools=bool(ws["confine_tools"]),
                workspace_id=ws["id"],
                workspace_permissions=rules_from_column(ws["permissions"]),
                remembered=rules_from_column(conv["remembered"]),
            )

        return await self._run(op, write=False)

    # ------------------------------------------------------------- reconcile

    async def reconcile(self, tenant_id: str, conversation_id: str) -> list[common_pb2.Message]:
        async def op(tx: Tx) -> list[common_pb2.Message]:
            # Locked like an append, so no append slips in between the read and the write.
            conv = await tx.conversation(tenant_id, conversation_id, lock=True)
            # A call with an approval, in a turn that goes on, is the turn's to answer: it waits
            # for its decision, or runs (or is refused) as decided when its turn is recovered.
            asked = list(map(approval_from_row, await tx.approvals(conversation_id)))
            going_on = {
                row["id"]
                for row in (await tx.turns(sorted({a.turn_id for a in asked})) if asked else [])
                if row["state"] not in TERMINAL_STATES
            }
            waiting = {(a.turn_id, a.tool_call_id) for a in asked if a.turn_id in going_on}
            missing = synthesize_missing_results(await tx.history(conversation_id), waiting)
            if not missing:
                return []
            now = tx.now_ns()
            stored = numbered(conversation_id, conv["last_seq"], missing, now)
            await tx.insert_messages(conversation_id, stored)
            await tx.update("conversations", conversation_id, {"last_seq": stored[-1].seq, "updated_at": now})
            return stored

        stored = await self._run(op)
        if stored:
            log.info(
                "reconciled conversation %s: closed %d dangling tool call(s)",
                conversation_id,
                sum(len(m.chunks) for m in stored),
            )
        return stored

    # ---------------------------------------------------------------- leases

    async def claim_lease(
        self,
        tenant_id: str,
        turn_id: str,
        owner: str,
        ttl: datetime.timedelta,
        *,
        reserve_event_seq: int = 0,
    ) -> common_pb2.Turn:
        ttl_ns = lease_ttl_ns(ttl)
        check_reservation(reserve_event_seq, "reserve_event_seq")

        async def op(tx: Tx) -> common_pb2.Turn:
            conv: Row | None = None
            if reserve_event_seq:
                # The conversation's row before the turn's, as every writer locks them.
                unlocked = await _turn(tx, tenant_id, turn_id)
                conv = await tx.conversation(tenant_id, unlocked["conversation_id"], lock=True)
            row = await _turn(tx, tenant_id, turn_id, lock=True)
            now = tx.now_ns()
            check_lease_claim(
                turn_id,
                row["state"],
                holder=row["lease_owner"],
                expires_at_ns=row["lease_expires_at"],
                owner=owner,
                now_ns=now,
            )
            fields = claimed_lease_fields(lease_from_row(row), row["attempts"], owner, now + ttl_ns)
            await tx.update("turns", turn_id, fields)
            if conv is not None:
                reserved = raised_reservation(
                    conv["reserved_event_seq"], conv["last_event_seq"], reserve_event_seq
                )
                if reserved != conv["reserved_event_seq"]:
                    await tx.update("conversations", conv["id"], {"reserved_event_seq": reserved})
            return turn_from_row({**row, **fields})

        return await self._run(op)

    async def renew_lease(
        self, tenant_id: str, turn_id: str, owner: str, ttl: datetime.timedelta, *, epoch: int = 0
    ) -> common_pb2.Turn:
        ttl_ns = lease_ttl_ns(ttl)

        async def op(tx: Tx) -> common_pb2.Turn:
            row = await _turn(tx, tenant_id, turn_id, lock=True)
            check_lease_held(lease_from_row(row), owner, epoch)
            fields = {"lease_expires_at": tx.now_ns() + ttl_ns}
            await tx.update("turns", turn_id, fields)
            return turn_from_row({**row, **fields})

        return await self._run(op)

    async def renew_leases(
        self, owner: str, ttl: datetime.timedelta, leases: Sequence[LeaseRef]
    ) -> list[str]:
        ttl_ns = lease_ttl_ns(ttl)
        if not leases:
            return []

        async def op(tx: Tx) -> list[str]:
            rows = await tx.turns(sorted({ref.turn_id for ref in leases}), lock=True)
            by_key = {(row["tenant_id"], row["id"]): row for row in rows}
            renewed: list[str] = []
            lost: list[str] = []
            for ref in leases:
                row = by_key.get((ref.tenant_id, ref.turn_id))
                held = row is not None and holds_lease(lease_from_row(row), owner, ref.epoch)
                bucket = renewed if held else lost
                if ref.turn_id not in bucket:
                    bucket.append(ref.turn_id)
            if renewed:
                await tx.update_turns(renewed, {"lease_expires_at": tx.now_ns() + ttl_ns})
            return lost

        return await self._run(op)

    async def release_lease(
        self, tenant_id: str, turn_id: str, owner: str, *, epoch: int = 0
    ) -> common_pb2.Turn:
        async def op(tx: Tx) -> common_pb2.Turn:
            row = await _turn(tx, tenant_id, turn_id, lock=True)
            fields: dict[str, Any] = {}
            if check_lease_release(lease_from_row(row), owner, epoch, tx.now_ns()):
                fields = released_lease_fields()
                await tx.update("turns", turn_id, fields)
            return turn_from_row({**row, **fields})

        return await self._run(op)

    async def list_expired_leases(self, *, limit: int = 0) -> list[common_pb2.Turn]:
        async def op(tx: Tx) -> list[common_pb2.Turn]:
            return [turn_from_row(r) for r in await tx.unheld_turns(tx.now_ns(), limit)]

        return await self._run(op, write=False)

    # --------------------------------------------------------------- kernels

    async def heartbeat(
        self, kernel: store_pb2.KernelInfo, ttl: datetime.timedelta
    ) -> list[store_pb2.KernelInfo]:
        ttl_ns = lease_ttl_ns(ttl)

        async def op(tx: Tx) -> list[store_pb2.KernelInfo]:
            now = tx.now_ns()
            # Rows long dead (ten lease times) are swept here: nothing else writes them.
            await tx.delete_kernels("", now - 10 * ttl_ns)
            await tx.put_kernel(
                {
                    "owner": kernel.owner,
                    "address": kernel.address,
                    "run_slots": kernel.run_slots,
                    "running": kernel.running,
                    "started_at": now,
                    "expires_at": now + ttl_ns,
                }
            )
            return [kernel_from_row(r) for r in await tx.live_kernels(now)]

        return await self._run(op)

    async def list_kernels(self) -> list[store_pb2.KernelInfo]:
        async def op(tx: Tx) -> list[store_pb2.KernelInfo]:
            return [kernel_from_row(r) for r in await tx.live_kernels(tx.now_ns())]

        return await self._run(op, write=False)

    async def retire_kernel(self, owner: str) -> None:
        async def op(tx: Tx) -> None:
            await tx.delete_kernels(owner, 0)

        await self._run(op)

    # ---------------------------------------------------------------- metrics

    async def record_turn_metrics(self, tenant_id: str, metrics: common_pb2.TurnMetrics) -> None:
        check_turn_metrics(metrics)

        async def op(tx: Tx) -> None:
            if metrics.conversation_id:
                turn = await _turn_in_conversation(tx, tenant_id, metrics.conversation_id, metrics.turn_id)
            else:
                turn = await _turn(tx, tenant_id, metrics.turn_id)
            stored = common_pb2.TurnMetrics()
            stored.CopyFrom(metrics)
            stored.conversation_id = turn["conversation_id"]
            await tx.upsert_turn_metrics(turn["conversation_id"], stored)

        await self._run(op)

    async def record_step_metrics(
        self, tenant_id: str, conversation_id: str, metrics: common_pb2.StepMetrics
    ) -> None:
        stored = normalized_step_metrics(metrics)

        async def op(tx: Tx) -> None:
            await _turn_in_conversation(tx, tenant_id, conversation_id, stored.turn_id)
            await tx.upsert_step_metrics(conversation_id, [stored])

        await self._run(op)

    async def get_metrics(
        self, tenant_id: str, conversation_id: str, turn_id: str = ""
    ) -> list[common_pb2.TurnMetrics]:
        async def op(tx: Tx) -> tuple[Sequence[Row], Sequence[Row]]:
            if turn_id:
                await _turn_in_conversation(tx, tenant_id, conversation_id, turn_id)
            else:
                await tx.conversation(tenant_id, conversation_id)
            return await tx.recorded_metrics(conversation_id, turn_id)

        turns, steps = await self._run(op, write=False)
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

    # ----------------------------------------------------------------- queue

    async def enqueue(
        self,
        tenant_id: str,
        conversation_id: str,
        message: common_pb2.Message,
        idempotency_key: str = "",
        *,
        only_behind_turn: bool = False,
    ) -> store_pb2.QueuedMessage:
        check_queued_message(conversation_id, message)
        stored = common_pb2.Message()
        stored.CopyFrom(message)
        stored.conversation_id = conversation_id
        stored.seq = 0  # a queued message has no place in history yet

        async def op(tx: Tx) -> store_pb2.QueuedMessage:
            # Locked like an append, so a seal that takes the queue comes wholly before or after.
            await tx.conversation(tenant_id, conversation_id, lock=True)
            if idempotency_key:
                existing = await tx.queued(conversation_id, idempotency_key)
                if existing is not None:
                    return existing
            if only_behind_turn:
                check_turn_in_flight(conversation_id, await _unended(tx, conversation_id))
            queued_id = await tx.insert_queued(
                conversation_id, idempotency_key, stored.SerializeToString(), tx.now_ns()
            )
            return store_pb2.QueuedMessage(
                id=queued_id, conversation_id=conversation_id, message=stored, idempotency_key=idempotency_key
            )

        return await self._run(op)

    async def drain_queue(self, tenant_id: str, conversation_id: str) -> list[store_pb2.QueuedMessage]:
        async def op(tx: Tx) -> list[store_pb2.QueuedMessage]:
            await tx.conversation(tenant_id, conversation_id, lock=True)
            return await tx.take_queue(conversation_id, tx.now_ns())

        return await self._run(op)

    # ------------------------------------------------------------- approvals

    async def create_approval(self, tenant_id: str, approval: common_pb2.Approval) -> common_pb2.Approval:
        check_new_approval(approval)
        approval_id = new_id(APPROVAL_PREFIX)

        async def op(tx: Tx) -> common_pb2.Approval:
            # Locked, so a seal of the turn comes wholly before (refused here) or after (closed there).
            await tx.conversation(tenant_id, approval.conversation_id, lock=True)
            turn = await tx.turn(tenant_id, approval.turn_id)
            if turn is None or turn["conversation_id"] != approval.conversation_id:
                raise NotFound(
                    f"turn {approval.turn_id} not found in conversation {approval.conversation_id}"
                )
            check_approvable_turn(approval.turn_id, turn["state"])
            stored = new_approval(approval, approval_id, tenant_id, tx.now_ns())
            await tx.insert_approvals([approval_columns(stored)])
            return stored

        return await self._run(op)

    async def resolve_approval(
        self,
        tenant_id: str,
        approval_id: str,
        decision: ApprovalDecision,
        *,
        edited_input_json: str = "",
        reason: str = "",
        decided_by: str = "",
        remember: bool = False,
        remembered_rule: common_pb2.PermissionRule | None = None,
    ) -> common_pb2.Approval:
        check_resolution(decision, edited_input_json, remember=remember, remembered_rule=remembered_rule)
        rule = common_pb2.PermissionRule()
        if remember and remembered_rule is not None:
            rule.CopyFrom(remembered_rule)

        async def op(tx: Tx) -> common_pb2.Approval:
            row = await tx.approval(tenant_id, approval_id)
            if row is None:
                raise NotFound(f"approval {approval_id} not found")
            current = approval_from_row(row)
            # The conversation's row first, as every writer locks it: its remembered rules
            # change with the decision, and a seal closing this approval waits or is waited for.
            conv = await tx.conversation(tenant_id, current.conversation_id, lock=True)
            check_pending(current)
            now = tx.now_ns()
            decided = decided_approval(
                current,
                decision,
                now,
                edited_input_json=edited_input_json,
                reason=reason,
                decided_by=decided_by,
                remember=remember,
            )
            if not await tx.decide_approval(approval_id, _decision_columns(decided)):
                # Decided since it was read: by a racing call, or closed by its turn's end.
                again = await tx.approval(tenant_id, approval_id)
                check_pending(approval_from_row(again if again is not None else row))
                raise FailedPrecondition(f"already decided: approval {approval_id} is no longer pending")
            if remember:
                rules = remembered_after(rules_from_column(conv["remembered"]), rule)
                if rules is not None:
                    await tx.update(
                        "conversations",
                        current.conversation_id,
                        {"remembered": rules_column(rules), "updated_at": now},
                    )
            return decided

        return await self._run(op)

    async def get_approval(self, tenant_id: str, approval_id: str) -> common_pb2.Approval:
        async def op(tx: Tx) -> common_pb2.Approval:
            row = await tx.approval(tenant_id, approval_id)
            if row is None:
                raise NotFound(f"approval {approval_id} not found")
            return approval_from_row(row)

        return await self._run(op, write=False)

    async def list_approvals(
        self, tenant_id: str, conversation_id: str = "", *, turn_id: str = "", pending_only: bool = False
    ) -> list[common_pb2.Approval]:
        if not conversation_id and not turn_id:
            raise InvalidArgument("conversation_id or turn_id is required")

        async def op(tx: Tx) -> list[common_pb2.Approval]:
            of = conversation_id
            if turn_id:
                turn = await tx.turn(tenant_id, turn_id)
                if turn is None or (conversation_id and turn["conversation_id"] != conversation_id):
                    where = f" in conversation {conversation_id}" if conversation_id else ""
                    raise NotFound(f"turn {turn_id} not found{where}")
                of = turn["conversation_id"]
            else:
                await tx.conversation(tenant_id, conversation_id)
            found = [approval_from_row(r) for r in await tx.approvals(of, pending_only=pending_only)]
            return [a for a in found if a.turn_id == turn_id] if turn_id else found

        return await self._run(op, write=False)

    # --------------------------------------------------------------- api keys

    async def create_api_key(self, tenant_id: str, name: str = "") -> tuple[store_pb2.ApiKey, str]:
        secret = new_api_key_secret()
        key_id = new_id(API_KEY_PREFIX)

        async def op(tx: Tx) -> store_pb2.ApiKey:
            row = await tx.insert_returning(
                "api_keys",
                {
                    "id": key_id,
                    "tenant_id": tenant_id,
                    "name": name,
                    "prefix": api_key_prefix(secret),
                    "secret_sha256": hash_api_key(secret),
                    "created_at": tx.now_ns(),
                },
            )
            return api_key_from_row(row)

        return await self._run(op), secret

    async def list_api_keys(self, tenant_id: str = "") -> list[store_pb2.ApiKey]:
        async def op(tx: Tx) -> list[store_pb2.ApiKey]:
            return [api_key_from_row(r) for r in await tx.api_keys(tenant_id)]

        return await self._run(op, write=False)

    async def revoke_api_key(self, key_id: str) -> store_pb2.ApiKey:
        async def op(tx: Tx) -> store_pb2.ApiKey:
            await tx.revoke_api_key(key_id, tx.now_ns())
            row = await tx.api_key(key_id)
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            return api_key_from_row(row)

        return await self._run(op)

    async def authenticate(self, secret: str) -> store_pb2.ApiKey:
        digest = hash_api_key(secret)

        async def op(tx: Tx) -> store_pb2.ApiKey:
            row = await tx.unrevoked_api_key(digest)
            if row is None:
                raise NotFound("unknown or revoked API key")
            return api_key_from_row(row)

        return await self._run(op, write=False)
