"""Every write a turn makes, fenced by its lease and kept through store outages.

A ``TurnWriter`` is the turn's only way to the store's write side. Each Append carries
the turn's lease fence (owner and epoch), every event not yet persisted, and a
reservation of event numbers ahead (see ``ConversationLog``), so:

* a kernel that lost the turn's lease cannot write into it: the store refuses, and the
  writer raises ``LeaseLost``;
* a store that is down (or restarting) is retried with back-off for ``outage`` seconds
  before the writer raises ``StoreFailed``; the seal is retried for as long as it takes;
* a write whose answer was lost (the store died after committing, a deadline passed) is
  never applied twice: before retrying, the writer asks the store whether the write's
  events landed (their event_seqs are unique to this turn's writes, and the fence makes
  this kernel the only writer), and if they did it rebuilds the answer from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from dispatch.kernel.events import ConversationLog
from dispatch.kernel.streams import StoreAppends
from dispatch.shared.errors import rpc_detail
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# Answers after which the write may or may not have been applied (or never reached the
# store): retry, once the store says whether it landed.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0


class LeaseLost(Exception):
    """The turn's lease is gone: another kernel took it over, or it ended. Write nothing more."""


class StoreFailed(Exception):
    """The store refused a write the turn depends on, or stayed unavailable too long."""


def lease_lost(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (exc.details() or "").startswith(
        "lease lost"
    )


class TurnWriter:
    """Writes of one turn: fenced, reserved ahead, retried through outages, never doubled."""

    def __init__(
        self,
        store: store_pb2_grpc.ConversationStoreAsyncStub,
        events: ConversationLog,
        turn: common_pb2.Turn,
        owner: str,
        *,
        rpc_timeout: float,
        outage: float,
        appends: StoreAppends | None = None,
    ):
        self.store = store
        # Where appends go: the kernel's shared append stream, or (alone, in tests) unary calls.
        self.appends: StoreAppends | store_pb2_grpc.ConversationStoreAsyncStub = appends or store
        self.events = events
        self.turn = turn
        self.owner = owner
        self.rpc_timeout = rpc_timeout
        self.outage = outage
        self.lost = False
        # Sealed or handed over: nothing more is written.
        self.done = False
        self._reserving: asyncio.Task[None] | None = None

    @property
    def tenant_id(self) -> str:
        return self.events.tenant_id

    @property
    def fence(self) -> store_pb2.LeaseFence:
        return store_pb2.LeaseFence(turn_id=self.turn.id, owner=self.owner, epoch=self.turn.lease_epoch)

    # ------------------------------------------------------------------ retries

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]], *, forever: bool = False) -> T:
        """``call()``, retried on transient failures for ``outage`` seconds (``forever``:
        until it succeeds). Raises ``LeaseLost`` and ``StoreFailed``."""
        loop = asyncio.get_running_loop()
        # The outage is counted from the first failure, and given up on only once it lasted.
        failing_since: float | None = None
        delay = FIRST_BACKOFF
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if lease_lost(exc):
                    self.lost = True
                    raise LeaseLost(f"turn {self.turn.id}: {exc.details()}") from None
                if exc.code() not in TRANSIENT:
                    raise StoreFailed(f"the store refused to {what}: {rpc_detail(exc)}") from exc
                now = loop.time()
                if failing_since is None:
                    failing_since = now
                    log.warning("turn %s: could not %s (%s); retrying", self.turn.id, what, rpc_detail(exc))
                left = failing_since + self.outage - now
                if not forever and left <= 0:
                    lasted = now - failing_since
                    raise StoreFailed(
                        f"the store was unavailable for {lasted:.0f}s ({what}): {rpc_detail(exc)}"
                    ) from exc
            await asyncio.sleep(delay if forever else max(0.0, min(delay, left)))
            delay = min(delay * 2, MAX_BACKOFF)

    # ------------------------------------------------------------------ appends

    async def append(
        self,
        messages: Sequence[common_pb2.Message] = (),
        *,
        take_queue: bool = False,
        seal: store_pb2.TurnSeal | None = None,
        release: bool = False,
        next_turn: store_pb2.NextTurn | None = None,
        approvals: Sequence[common_pb2.Approval] = (),
        move_to: common_pb2.TurnState.ValueType = common_pb2.TURN_STATE_UNSPECIFIED,
        step_metrics: Sequence[common_pb2.StepMetrics] = (),
        turn_metrics: common_pb2.TurnMetrics | None = None,
        forever: bool = False,
    ) -> store_pb2.AppendResponse:
        """Commit ``messages`` and every event not yet persisted, in one fenced transaction
        (with the queue taken as steering, the turn sealed or its lease released, as
        asked); retried as ``_retrying`` says. Sends the events it persisted that waited
        for it."""
        async with self.events.commit_lock:
            pending = list(self.events.unpersisted)
            if not (
                messages or pending or take_queue or seal or release or approvals or move_to or step_metrics
            ):
                return store_pb2.AppendResponse()
            request = store_pb2.AppendRequest(
                tenant_id=self.tenant_id,
                conversation_id=self.turn.conversation_id,
                messages=messages,
                events=pending,
                take_queue_for_turn=self.turn.id if take_queue else "",
                fence=self.fence,
                reserve_event_seq=0 if (seal or release) else self.events.wanted_reservation(),
                seal=seal,
                release_lease=release,
                next_turn=next_turn,
                approvals=approvals,
                move_to=move_to,
                step_metrics=step_metrics,
                turn_metrics=turn_metrics,
            )
            last_event = pending[-1].event_seq if pending else 0
            attempts = 0

            async def attempt() -> store_pb2.AppendResponse:
                nonlocal attempts
                attempts += 1
                if attempts > 1 and last_event:
                    landed = await self._landed(request, last_event)
                    if landed is not None:
                        return landed
                resp: store_pb2.AppendResponse = await self.appends.Append(request, timeout=self.rpc_timeout)
                return resp

            what = "seal the turn" if seal else "hand the turn over" if release else "commit the turn's step"
            resp = await self.retrying(what, attempt, forever=forever)
            if resp.HasField("turn"):
                self.turn = resp.turn  # its state (waiting, running, sealed) as the store has it
            self.committed_through(max([resp.last_seq, *(m.seq for m in resp.next_turn_messages)]))
            if seal is not None or release:
                self.done = True
            if pending:
                self.events.mark_persisted(last_event)
            if seal is not None or release:
                # The store lowered the reservation to what is persisted (and, starting the
                # next turn, raised it again for that turn): take its figure, never a higher one.
                self.events.sealed(resp.reserved_event_seq)
            else:
                self.events.reserve(resp.reserved_event_seq)
            return resp

    async def _landed(
        self, request: store_pb2.AppendRequest, last_event: int
    ) -> store_pb2.AppendResponse | None:
        """Whether an Append whose answer was lost was applied: its last event is in the
        store. If so, its answer as the store would have given it; None to send it again."""
        conv = await self.store.GetConversation(
            store_pb2.GetConversationRequest(
                tenant_id=self.tenant_id, conversation_id=request.conversation_id
            ),
            timeout=self.rpc_timeout,
        )
        if conv.last_event_seq < last_event:
            return None
        log.info("turn %s: a commit whose answer was lost had landed; not sending it again", self.turn.id)
        return await self._rebuild(request, conv)

    async def _rebuild(
        self, request: store_pb2.AppendRequest, conv: common_pb2.Conversation
    ) -> store_pb2.AppendResponse:
        """The answer of an applied Append, read back: the messages it appended (ours, the
        queue's, the next turn's), the fenced turn, the next turn."""
        first = self._last_seq_before
        loaded = await self.store.LoadSince(
            store_pb2.LoadSinceRequest(
                tenant_id=self.tenant_id, conversation_id=request.conversation_id, after_seq=first
            ),
            timeout=self.rpc_timeout,
        )
        appended = list(loaded.messages)
        ours = [m for m in appended if m.turn_id == self.turn.id]
        theirs = [m for m in appended if m.turn_id != self.turn.id]
        resp = store_pb2.AppendResponse(
            messages=ours,
            first_seq=ours[0].seq if ours else 0,
            last_seq=ours[-1].seq if ours else 0,
            last_event_seq=conv.last_event_seq,
            dequeued=max(0, len(ours) - len(request.messages)) if request.take_queue_for_turn else 0,
            reserved_event_seq=conv.reserved_event_seq,
        )
        turn = await self.store.GetTurn(
            store_pb2.GetTurnRequest(tenant_id=self.tenant_id, turn_id=self.turn.id), timeout=self.rpc_timeout
        )
        resp.turn.CopyFrom(turn)
        if request.approvals:
            found = await self.store.ListApprovals(
                store_pb2.ListApprovalsRequest(tenant_id=self.tenant_id, turn_id=self.turn.id),
                timeout=self.rpc_timeout,
            )
            by_call = {a.tool_call_id: a for a in found.approvals}
            resp.approvals.extend(
                by_call[a.tool_call_id] for a in request.approvals if a.tool_call_id in by_call
            )
        if theirs:
            next_turn = await self.store.GetTurn(
                store_pb2.GetTurnRequest(tenant_id=self.tenant_id, turn_id=theirs[0].turn_id),
                timeout=self.rpc_timeout,
            )
            resp.next_turn.CopyFrom(next_turn)
            resp.next_turn_messages.extend(theirs)
        return resp

    # The conversation's last message seq as this turn knows it (for _rebuild).
    _last_seq_before = 0

    def committed_through(self, seq: int) -> None:
        """The conversation's messages up to ``seq`` are known to the turn (history)."""
        self._last_seq_before = max(self._last_seq_before, seq)

    # ------------------------------------------------------------------ the rest

    def reserve_soon(self, through: int) -> None:
        """Raise the reservation in the background (numbering nears its end between commits)."""
        if self._reserving is not None or self.lost or self.done:
            return

        async def reserve() -> None:
            try:
                async with self.events.commit_lock:  # after any commit in flight, never beside it
                    if self.done or self.lost or self.events.reserved >= through:
                        return
                    await self._reserve_only(through)
            except (LeaseLost, StoreFailed) as exc:
                # Events past the reservation wait; the next commit reserves again.
                log.warning("turn %s: could not reserve event numbers: %s", self.turn.id, exc)
            finally:
                self._reserving = None

        self._reserving = asyncio.create_task(reserve(), name=f"reserve {self.turn.id}")

    async def _reserve_only(self, through: int) -> None:
        request = store_pb2.AppendRequest(
            tenant_id=self.tenant_id,
            conversation_id=self.turn.conversation_id,
            fence=self.fence,
            reserve_event_seq=through,
        )

        async def call() -> store_pb2.AppendResponse:
            resp: store_pb2.AppendResponse = await self.appends.Append(request, timeout=self.rpc_timeout)
            return resp

        resp = await self.retrying("reserve event numbers", call)
        self.events.reserve(resp.reserved_event_seq)

    async def transition(self, to: common_pb2.TurnState.ValueType, *, max_running: int = 0) -> bool:
        """Move the turn (queued → running), fenced; False if ``max_running`` turns run in the
        cluster already (the store refused: try again later)."""

        async def call() -> common_pb2.Turn | None:
            try:
                turn: common_pb2.Turn = await self.store.TransitionTurn(
                    store_pb2.TransitionTurnRequest(
                        tenant_id=self.tenant_id,
                        turn_id=self.turn.id,
                        to=to,
                        lease_owner=self.owner,
                        lease_epoch=self.turn.lease_epoch,
                        max_running=max_running,
                    ),
                    timeout=self.rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if max_running and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return None
                raise
            return turn

        turn = await self.retrying("record the turn's state", call)
        if turn is None:
            return False
        self.turn = turn
        return True

    async def close(self) -> None:
        if self._reserving is not None:
            self._reserving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reserving
