"""The store logic both SQL backends share, written once over ``Tx``.

Appends, turns, leases, the queue, approvals and reconcile are each one transaction here: a
sequence of reads and writes through a ``Tx`` that the dialect supplies (its SQL,
its row locks, its type conversions), deciding with the rules of ``backend``.
So SQLite and PostgreSQL differ only in what a ``Tx`` method sends to the
database, never in what the store decides (temporal's SQL persistence over its
per-database ``sqlplugin`` is the model).

``Tx`` methods are coroutines. PostgreSQL's await the server. SQLite's run on the
store's one worker thread and never suspend, so its dialect drives an operation
to completion inside one synchronous transaction (``run_to_completion``) instead
of hopping between the thread and the event loop per statement.

Locks, on a database that takes them (PostgreSQL; SQLite's write transactions
exclude each other whole): an operation that writes to a conversation locks the
conversation row first and the turn row after it, always in that order, so two
operations can wait on each other but never deadlock. Renewals lock only turn
rows, in id order. Approvals are decided by a compare-and-set on their row being
pending (``Tx.decide_approval``), under their conversation's lock, so a decision,
a racing one and the seal that closes the turn's pending approvals come one after
the other, and only the first of them decides.
"""

from __future__ import annotations

import abc
import datetime
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

from dispatch.shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from dispatch.shared.ids import new_id
from dispatch.store.backend import (
    APPROVAL_PREFIX,
    TERMINAL_STATES,
    TURN_PREFIX,
    Appended,
    ApprovalDecision,
    FinishReason,
    Lease,
    LeaseFence,
    LeaseRef,
    NextTurn,
    Store,
    TurnSeal,
    TurnState,
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
    check_queued_message,
    check_reservation,
    check_resolution,
    check_transition,
    check_turn_in_flight,
    claimed_lease_fields,
    closed_approval,
    decided_approval,
    holds_lease,
    initial_state,
    lease_ttl_ns,
    new_approval,
    new_turn_row,
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
    approval_columns,
    approval_from_row,
    lease_from_row,
    rules_column,
    rules_from_column,
    turn_from_row,
)
from dispatch.v1 import common_pb2, store_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

RowDict = dict[str, Any]

# "Has not ended", as SQL both dialects speak. Migration 4's partial indexes carry the same
# predicate, literally, so that the planners use them for the queries that say this.
UNENDED = f"state NOT IN ({', '.join(str(int(s)) for s in sorted(TERMINAL_STATES))})"


class Tx(Protocol):
    """One open transaction of a dialect. Rows are dicts keyed by column name."""

    def now_ns(self) -> int:
        """The store clock, strictly increasing within the process."""

    async def conversation(self, tenant_id: str, conversation_id: str, *, lock: bool = False) -> RowDict:
        """The conversation's row, or ``NotFound``; ``lock`` holds it until the end."""

    async def turn(self, tenant_id: str, turn_id: str, *, lock: bool = False) -> RowDict | None:
        """The turn's row in this tenant, or None; ``lock`` holds it until the end."""

    async def turns(self, turn_ids: Sequence[str], *, lock: bool = False) -> list[RowDict]:
        """The rows of these turns, of any tenant, in id order (locked in that order)."""

    async def turn_by_idempotency_key(self, conversation_id: str, idempotency_key: str) -> RowDict | None:
        """The turn the key started in the conversation, or None."""

    async def unended_turn(self, conversation_id: str) -> RowDict | None:
        """The conversation's oldest turn that has not ended, or None."""

    async def unheld_turns(self, now_ns: int, limit: int) -> list[RowDict]:
        """Turns of every tenant that have not ended whose lease nobody holds at ``now_ns``,
        earliest expiry first (0 = no limit)."""

    async def insert_turn(self, row: Mapping[str, Any]) -> None:
        """Insert a turn with every column given."""

    async def update(self, table: str, row_id: str, fields: Mapping[str, Any]) -> None:
        """Set ``fields`` on one row of ``table`` (names from our code, never a request)."""

    async def update_turns(self, turn_ids: Sequence[str], fields: Mapping[str, Any]) -> None:
        """Set ``fields`` on every one of these turns."""

    async def history(self, conversation_id: str) -> list[common_pb2.Message]:
        """Every message of the conversation, in seq order."""

    async def insert_messages(self, conversation_id: str, messages: Sequence[common_pb2.Message]) -> None:
        """Insert messages as ``numbered`` made them."""

    async def insert_events(self, conversation_id: str, events: Sequence[common_pb2.AgentEvent]) -> None:
        """Insert events as ``stamped`` made them."""

    async def take_queue(self, conversation_id: str, now_ns: int) -> list[store_pb2.QueuedMessage]:
        """Mark every waiting message of the queue drained; answer them in enqueue order."""

    async def queued(self, conversation_id: str, idempotency_key: str) -> store_pb2.QueuedMessage | None:
        """The queue item the key made, drained or not, or None."""

    async def insert_queued(
        self, conversation_id: str, idempotency_key: str, body: bytes, now_ns: int
    ) -> int:
        """Queue a message body; answer its id."""

    async def approval(self, tenant_id: str, approval_id: str) -> RowDict | None:
        """The approval's row in this tenant, or None."""

    async def approvals(self, conversation_id: str, *, pending_only: bool = False) -> list[RowDict]:
        """The conversation's approvals (only the pending ones when asked), oldest first."""

    async def insert_approvals(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert approvals with every column given (``rows.approval_columns``)."""

    async def upsert_step_metrics(
        self, conversation_id: str, metrics: Sequence[common_pb2.StepMetrics]
    ) -> None:
        """Record step metrics as ``normalized_step_metrics`` made them (one row per turn
        and step; again replaces it)."""

    async def upsert_turn_metrics(self, conversation_id: str, metrics: common_pb2.TurnMetrics) -> None:
        """Record a turn's metrics (one row per turn; again replaces it)."""

    async def decide_approval(self, approval_id: str, fields: Mapping[str, Any]) -> bool:
        """Set ``fields`` on the approval only if it is still pending (decision 0); answer
        whether it was."""


def run_to_completion(operation: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends: an operation over a synchronous ``Tx``."""
    try:
        operation.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    operation.close()
    raise RuntimeError("a store operation suspended inside a synchronous transaction")


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


async def _turn(tx: Tx, tenant_id: str, turn_id: str, *, lock: bool = False) -> RowDict:
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


class SQLStore(Store):
    """The operations of ``Store`` that both SQL dialects share, over ``_run``."""

    max_append_bytes: int

    @abc.abstractmethod
    async def _run(self, operation: Callable[[Tx], Coroutine[Any, Any, T]], *, write: bool = True) -> T:
        """Run ``operation`` in one transaction (read-only unless ``write``); commit when it
        returns, roll back when it raises."""

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
            fenced: RowDict | None = None
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
                    await tx.insert_turn(row)
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
            await tx.insert_turn(row)
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
            conv: RowDict | None = None
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
