"""Approvals: tool calls that wait for a person's decision.

A call the permission rules say to ``ask`` about (``kernel/permissions.py``) does not run.
Once the provider's response is complete, the step commits its assistant message (with
every call) together with one pending approval per such call, and the turn moves to
``waiting_for_approval``, in one fenced transaction; ``approval_requested`` says so.
Other calls of the step run meanwhile. A decision reaches the waiting call through
``ApprovalBoard`` (``ResolveApproval`` on this kernel), or is found in the store by a
poll (decided through another kernel), or is made by the kernel when the approval
expires. Approved (or edited) calls then run; rejected, expired or closed ones get an
error result the model can read. The step completes, and commits, when every call is
decided and done.

Because the pending approvals and the call behind them are in the store, a kernel that
goes away leaves them pending; the kernel that recovers the turn waits for them again,
and a decision made meanwhile is found there. A turn that ends while it waits (cancel,
interrupt) closes its approvals in its seal, with error results for the calls, so the
conversation's next request has no dangling call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from dispatch.kernel.providers.base import ToolCall
from dispatch.kernel.writer import TurnWriter
from dispatch.shared.timeutil import now_ts
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)

PENDING = common_pb2.APPROVAL_DECISION_UNSPECIFIED
RUNS = (common_pb2.APPROVAL_DECISION_APPROVE, common_pb2.APPROVAL_DECISION_EDIT)
# How often a waiting turn asks the store for decisions made through another kernel.
POLL_SECONDS = 1.0


class ApprovalBoard:
    """The approvals this kernel's turns wait for, by id: a decision wakes its call."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[common_pb2.Approval]] = {}

    def wait_for(self, approval_id: str) -> asyncio.Future[common_pb2.Approval]:
        future = self._waiting.get(approval_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._waiting[approval_id] = future
        return future

    def decided(self, approval: common_pb2.Approval) -> None:
        """``approval`` has its decision: wake the call that waits for it, if one does here."""
        future = self._waiting.pop(approval.id, None)
        if future is not None and not future.done():
            future.set_result(approval)

    def forget(self, approval_ids: Sequence[str]) -> None:
        for approval_id in approval_ids:
            future = self._waiting.pop(approval_id, None)
            if future is not None and not future.done():
                future.cancel()


def why_not_run(approval: common_pb2.Approval) -> str:
    """The error result of a call whose approval did not let it run."""
    by = f" by {approval.decided_by}" if approval.decided_by else ""
    reason = f": {approval.reason}" if approval.reason else ""
    if approval.decision == common_pb2.APPROVAL_DECISION_EXPIRED:
        return f"not run: nobody approved this call in time{reason}"
    if approval.decision == common_pb2.APPROVAL_DECISION_CLOSED:
        return f"not run: the turn ended before the call was decided{reason}"
    return f"not run: the call was rejected{by}{reason}"


class StepApprovals:
    """One step's approvals: asked for in the step's commit, then waited for."""

    def __init__(
        self,
        board: ApprovalBoard,
        store: store_pb2_grpc.ConversationStoreAsyncStub,
        writer: TurnWriter,
        *,
        step_id: str,
        timeout: float,
        rpc_timeout: float,
        emit: Callable[..., None],
        poll: float = POLL_SECONDS,
    ):
        self.board = board
        self.store = store
        self.writer = writer
        self.step_id = step_id
        self.timeout = timeout
        self.rpc_timeout = rpc_timeout
        self._emit = emit
        self.poll = poll

    async def ask(
        self,
        messages: Sequence[common_pb2.Message],
        asks: Sequence[tuple[ToolCall, str]],
    ) -> tuple[store_pb2.AppendResponse, list[common_pb2.Approval]]:
        """Commit ``messages`` (the step's assistant message, with every call) and a pending
        approval for each of ``asks`` (a call, the rule that asked), and move the turn to
        waiting_for_approval, in one transaction; announce each approval."""
        turn = self.writer.turn
        pending = []
        for call, rule in asks:
            approval = common_pb2.Approval(
                tenant_id=self.writer.tenant_id,
                conversation_id=turn.conversation_id,
                turn_id=turn.id,
                tool_call_id=call.id,
                tool_name=call.name,
                input_json=call.input_json,
                step_id=self.step_id,
                rule=rule,
            )
            if self.timeout > 0:
                approval.expires_at.FromNanoseconds(now_ts().ToNanoseconds() + round(self.timeout * 1e9))
            pending.append(approval)
        resp = await self.writer.append(
            messages, approvals=pending, move_to=common_pb2.TURN_STATE_WAITING_FOR_APPROVAL
        )
        for approval in resp.approvals:
            self._emit(self.step_id, approval_requested=common_pb2.ApprovalRequested(approval=approval))
        return resp, list(resp.approvals)

    async def decisions(
        self, approvals: Sequence[common_pb2.Approval], *, announce: bool = False
    ) -> AsyncIterator[common_pb2.Approval]:
        """Each of ``approvals`` once decided, in the order the decisions come: made here
        (ResolveApproval), found in the store, or made by the kernel at expiry. ``announce``
        (a recovered turn): the pending ones are announced again, since the kernel that asked
        may have gone away before its ``approval_requested`` was persisted."""
        open_ = {a.id: a for a in approvals if a.decision == PENDING}
        if announce:
            for approval in open_.values():
                self._emit(self.step_id, approval_requested=common_pb2.ApprovalRequested(approval=approval))
        for approval in approvals:
            if approval.decision != PENDING:  # decided while no kernel ran the turn
                self._emit(self.step_id, approval_resolved=common_pb2.ApprovalResolved(approval=approval))
                yield approval
        futures = {self.board.wait_for(a.id): a.id for a in open_.values()}
        poller = asyncio.create_task(self._poll(set(open_)), name=f"approvals {self.step_id}")
        try:
            while futures:
                wait = self._next_expiry(open_)
                done, _ = await asyncio.wait(futures, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    await self._expire(open_)
                    continue
                for future in done:
                    approval_id = futures.pop(future)
                    decided = future.result()
                    open_.pop(approval_id, None)
                    self._emit(self.step_id, approval_resolved=common_pb2.ApprovalResolved(approval=decided))
                    yield decided
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            self.board.forget(list(open_))

    def _next_expiry(self, open_: dict[str, common_pb2.Approval]) -> float | None:
        times = [a.expires_at.ToNanoseconds() for a in open_.values() if a.HasField("expires_at")]
        if not times:
            return None
        return max(0.0, (min(times) - now_ts().ToNanoseconds()) / 1e9)

    async def _expire(self, open_: dict[str, common_pb2.Approval]) -> None:
        """Decide every approval past its expiry as EXPIRED (unless a person was faster)."""
        now = now_ts().ToNanoseconds()
        for approval in list(open_.values()):
            if not approval.HasField("expires_at") or approval.expires_at.ToNanoseconds() > now:
                continue
            decided = await self._decide_expired(approval)
            if decided is not None:
                self.board.decided(decided)

    async def _decide_expired(self, approval: common_pb2.Approval) -> common_pb2.Approval | None:
        try:
            decided: common_pb2.Approval = await self.store.ResolveApproval(
                store_pb2.ResolveApprovalRequest(
                    tenant_id=self.writer.tenant_id,
                    approval_id=approval.id,
                    decision=common_pb2.APPROVAL_DECISION_EXPIRED,
                    reason=f"no decision within {self.timeout:g}s",
                    decided_by="kernel",
                ),
                timeout=self.rpc_timeout,
            )
            return decided
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return await self._read(approval.id)  # decided meanwhile: that decision stands
            log.warning("approval %s: could not record its expiry: %s", approval.id, exc.details())
            return None

    async def _read(self, approval_id: str) -> common_pb2.Approval | None:
        try:
            found: common_pb2.Approval = await self.store.GetApproval(
                store_pb2.GetApprovalRequest(tenant_id=self.writer.tenant_id, approval_id=approval_id),
                timeout=self.rpc_timeout,
            )
            return found
        except grpc.aio.AioRpcError:
            return None

    async def _poll(self, open_ids: set[str]) -> None:
        """Find decisions made through another kernel (or before this one took the turn)."""
        while open_ids:
            await asyncio.sleep(self.poll)
            try:
                resp = await self.store.ListApprovals(
                    store_pb2.ListApprovalsRequest(
                        tenant_id=self.writer.tenant_id, turn_id=self.writer.turn.id
                    ),
                    timeout=self.rpc_timeout,
                )
            except grpc.aio.AioRpcError:
                continue  # the store is away: the next poll tries again
            for approval in resp.approvals:
                if approval.id in open_ids and approval.decision != PENDING:
                    open_ids.discard(approval.id)
                    self.board.decided(approval)
