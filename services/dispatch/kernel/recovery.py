"""Recovery: turns whose kernel went away are found, claimed and continued.

On start and every ``sweep_interval`` a kernel asks the store for turns that have not
ended and that nobody holds (their lease expired, or their kernel handed them over),
and claims each (the store lets one claimant win and bumps the lease's epoch, which
fences the kernel that had it out). A claimed turn continues from its last committed
step, as the ``Resume`` built here says:

* history is reconciled (a tool call without a result gets one that says it was
  interrupted) and the next provider request is built from what is committed;
* the step that was running when the kernel went away runs again, with a note telling
  the model that its earlier attempt was interrupted and that any tool it called then
  may or may not have run (a turn handed over at a step boundary needs no note);
* its attempts are bounded: past ``max_attempts`` the turn ends interrupted, saying so,
  and is sealed like any other.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from dispatch.kernel.every import Every
from dispatch.kernel.turn import Resume, note_message
from dispatch.v1 import common_pb2, store_pb2

if TYPE_CHECKING:
    from dispatch.kernel.kernel import Kernel

log = logging.getLogger(__name__)

# Turns claimed per sweep; the rest wait for the next one.
SWEEP_LIMIT = 50


class Recovery:
    """The kernel's sweeper of turns nobody holds."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self._beat = Every("turn recovery", lambda: kernel.deps.sweep_interval, self.sweep, now=True)

    def start(self) -> None:
        self._beat.start()

    async def close(self) -> None:
        await self._beat.close()

    async def sweep(self) -> int:
        """Claim and continue the turns nobody holds; answers how many this kernel took."""
        kernel = self.kernel
        deps = kernel.deps
        try:
            found = await deps.store.ListExpiredLeases(
                store_pb2.ListExpiredLeasesRequest(limit=SWEEP_LIMIT), timeout=deps.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("recovery: the store could not list unheld turns: %s", exc.details())
            return 0
        taken = 0
        for turn in found.turns:
            if kernel.draining:
                break
            if kernel.running(turn.id):
                continue
            try:
                if await self.recover(turn):
                    taken += 1
            except Exception:
                log.exception("recovery: turn %s could not be recovered", turn.id)
        return taken

    async def recover(self, stale: common_pb2.Turn) -> bool:
        """Claim ``stale`` and continue it here; False if another kernel was faster, or the
        conversation already runs a turn here."""
        kernel = self.kernel
        deps = kernel.deps
        async with kernel.locked(stale.tenant_id, stale.conversation_id) as events:
            if kernel.busy(stale.conversation_id) or kernel.draining:
                return False
            # Nobody holds the turn, so nobody writes the conversation: the store's numbering
            # (with the reservation of the kernel that went away) is the truth.
            conv = await deps.store.GetConversation(
                store_pb2.GetConversationRequest(
                    tenant_id=stale.tenant_id, conversation_id=stale.conversation_id
                ),
                timeout=deps.rpc_timeout,
            )
            events.refresh(conv.last_event_seq, conv.reserved_event_seq)
            try:
                turn = await deps.store.ClaimLease(
                    store_pb2.ClaimLeaseRequest(
                        tenant_id=stale.tenant_id,
                        turn_id=stale.id,
                        owner=kernel.owner,
                        ttl=kernel.leases.ttl_proto,
                        reserve_event_seq=events.wanted_reservation(),
                    ),
                    timeout=deps.rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    return False  # claimed by another kernel first, or it ended
                raise
            events.reserve(events.wanted_reservation())
            resume, last_seq = await self._resume(stale, turn)
            agent = kernel.agent_named(turn.agent)
            if agent is None:
                agent = kernel.agent_named("")
                assert agent is not None
                resume.give_up = resume.give_up or (
                    f"the turn's agent {turn.agent!r} is not configured on this kernel"
                )
            log.info(
                "recovering turn %s of conversation %s (attempt %d, from step %d)%s",
                turn.id,
                turn.conversation_id,
                turn.attempts,
                resume.from_step,
                f": giving up: {resume.give_up}" if resume.give_up else "",
            )
            await kernel.resume(events, turn, agent, resume, last_seq)
            return True

    async def _resume(self, stale: common_pb2.Turn, turn: common_pb2.Turn) -> tuple[Resume, int]:
        """Where the claimed turn continues: its last committed step, what it used, whether
        the model must be told; and the seq of its last committed message."""
        deps = self.kernel.deps
        tenant, conversation = turn.tenant_id, turn.conversation_id
        await deps.store.Reconcile(
            store_pb2.ReconcileRequest(tenant_id=tenant, conversation_id=conversation),
            timeout=deps.rpc_timeout,
        )
        history = await deps.store.Load(
            store_pb2.LoadRequest(tenant_id=tenant, conversation_id=conversation), timeout=deps.rpc_timeout
        )
        mine = [m for m in history.messages if m.turn_id == turn.id]
        steps = [m.step_index for m in mine if m.role in (common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_TOOL)]
        from_step = max(steps) + 1 if steps else 0
        last_seq = mine[-1].seq if mine else turn.user_message_seq
        metrics = await deps.store.GetMetrics(
            store_pb2.GetMetricsRequest(tenant_id=tenant, conversation_id=conversation, turn_id=turn.id),
            timeout=deps.rpc_timeout,
        )
        usage = common_pb2.Usage()
        for step in (s for t in metrics.turns for s in t.step_metrics):
            usage.input_tokens += step.usage.input_tokens
            usage.output_tokens += step.usage.output_tokens
            usage.cache_read_tokens += step.usage.cache_read_tokens
            usage.cache_write_tokens += step.usage.cache_write_tokens
            usage.reasoning_tokens += step.usage.reasoning_tokens
        waiting = await self._waiting(turn, mine)
        if waiting:
            # Its last step committed calls that wait for approvals (or were decided while
            # nobody ran the turn): it goes on from there, waiting; nothing was cut short, so
            # a kernel that went away while it waited spends none of its attempts.
            return Resume(attempt=turn.attempts, from_step=max(steps), usage=usage, waiting=waiting), last_seq
        handed_over = await self._handed_over(turn)
        never_ran = stale.state == common_pb2.TURN_STATE_QUEUED and not steps
        note = None
        if not (handed_over or never_ran):
            note = note_message(turn.id, from_step, f"its kernel went away; attempt {turn.attempts}")
        # Committed through a step that called no tool (and no steering came after it): the
        # turn only lacked its seal.
        finished = (
            bool(mine)
            and mine[-1].role == common_pb2.ROLE_ASSISTANT
            and not any(c.HasField("tool_call") for c in mine[-1].chunks)
        )
        if finished:
            note = None
        give_up = ""
        if turn.attempts > deps.max_attempts:
            give_up = (
                f"the turn was interrupted {turn.attempts - 1} times (its kernel went away each time) "
                f"and has no attempt left (max_attempts = {deps.max_attempts})"
            )
        return (
            Resume(
                attempt=turn.attempts,
                from_step=from_step,
                note=note,
                usage=usage,
                give_up=give_up,
                finished=finished,
            ),
            last_seq,
        )

    async def _waiting(
        self, turn: common_pb2.Turn, mine: list[common_pb2.Message]
    ) -> list[common_pb2.Approval]:
        """The approvals of the turn's last step whose calls have no result yet."""
        if not mine:
            return []
        last = max(m.step_index for m in mine)
        calls = {
            c.tool_call.id for m in mine if m.step_index == last for c in m.chunks if c.HasField("tool_call")
        }
        answered = {
            c.tool_result.tool_call_id
            for m in mine
            if m.step_index == last
            for c in m.chunks
            if c.HasField("tool_result")
        }
        if not calls - answered:
            return []
        deps = self.kernel.deps
        found = await deps.store.ListApprovals(
            store_pb2.ListApprovalsRequest(tenant_id=turn.tenant_id, turn_id=turn.id),
            timeout=deps.rpc_timeout,
        )
        return [a for a in found.approvals if a.tool_call_id in calls - answered]

    async def _handed_over(self, turn: common_pb2.Turn) -> bool:
        """Whether the turn's last persisted event says its kernel handed it over at a step
        boundary (so no step was cut short)."""
        deps = self.kernel.deps
        conv = await deps.store.GetConversation(
            store_pb2.GetConversationRequest(tenant_id=turn.tenant_id, conversation_id=turn.conversation_id),
            timeout=deps.rpc_timeout,
        )
        if not conv.last_event_seq:
            return False
        last = await deps.store.LoadEvents(
            store_pb2.LoadEventsRequest(
                tenant_id=turn.tenant_id,
                conversation_id=turn.conversation_id,
                after_event_seq=conv.last_event_seq - 1,
                limit=1,
            ),
            timeout=deps.rpc_timeout,
        )
        return bool(
            last.events
            and last.events[-1].turn_id == turn.id
            and last.events[-1].HasField("turn_interrupted")
            and last.events[-1].turn_interrupted.resumable
            and last.events[-1].turn_interrupted.reason.startswith("handed over at a step boundary")
        )
