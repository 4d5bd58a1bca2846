"""The kernel's live state: active turns (one per conversation), event logs,
leases, and starting, cancelling, recovering and draining turns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from dispatch.kernel.agents import Agent
from dispatch.kernel.events import ConversationLog, replay_and_follow
from dispatch.kernel.every import Every
from dispatch.kernel.leases import LeaseKeeper
from dispatch.kernel.permissions import Rule, remembered_rule, subject_of
from dispatch.kernel.recovery import Recovery
from dispatch.kernel.slots import RunSlots
from dispatch.kernel.streams import StoreAppends
from dispatch.kernel.tools import Tool
from dispatch.kernel.turn import Resume, TurnDeps, TurnRunner
from dispatch.kernel.writer import TurnWriter
from dispatch.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from dispatch.shared.limits import MAX_MESSAGE_CHARS
from dispatch.store.backend import UNENDED_STATES
from dispatch.v1 import common_pb2, kernel_pb2, store_pb2

log = logging.getLogger(__name__)


# The store's words when a conversation's turn runs (or waits for recovery) elsewhere, and
# when a message would be queued behind a turn that has just ended.
IN_FLIGHT = "turn in flight"
NONE_IN_FLIGHT = "no turn in flight"
HANDOVER = "the kernel is shutting down"


def _refusal(exc: grpc.aio.AioRpcError, words: str) -> bool:
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (exc.details() or "").startswith(words)


@dataclass
class ActiveTurn:
    runner: TurnRunner
    task: asyncio.Task[None]


class Kernel:
    """Runs turns; the gRPC servicer is a thin layer over this."""

    def __init__(self, deps: TurnDeps, max_concurrent_turns: int = 0):
        self.deps = deps
        self._logs: dict[str, ConversationLog] = {}
        self._active: dict[str, ActiveTurn] = {}
        # Every turn task until it ends, including one that has sealed and
        # freed its conversation but still persists its last events.
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining = False
        self.slots = RunSlots(max_concurrent_turns)
        self.leases = LeaseKeeper(deps.store, deps.owner, deps.lease_ttl, deps.rpc_timeout)
        self.recovery = Recovery(self)
        # Every turn's appends travel on this one stream (opened at the first).
        self.appends = StoreAppends(deps.store)
        # Scale-out: subscribers of a conversation whose turn runs on another kernel move there.
        self._follow = Every("follower", lambda: deps.follow_interval, self._follow_turns, now=False)

    @property
    def owner(self) -> str:
        return self.deps.owner

    @property
    def draining(self) -> bool:
        return self._draining

    def advertise(self, address: str) -> None:
        """Advertise this kernel at ``address`` through the store (with every lease beat),
        so that transports find it, and follow turns that other kernels run."""
        self.leases.advertise = lambda: store_pb2.KernelInfo(
            address=address, run_slots=self.slots.limit, running=self.slots.running
        )

    async def start(self) -> None:
        """Renew leases, and look for turns nobody holds: at once, then every sweep_interval.
        An advertised kernel beats at once, so transports can reach it from now on."""
        if self.leases.advertise is not None:
            await self.leases.renew()
            self._follow.start()
        self.leases.start()
        self.recovery.start()

    async def _follow_turns(self) -> None:
        """End the live streams of conversations this kernel has subscribers for but whose
        turn another live kernel runs: each subscriber subscribes again, and its transport
        finds that kernel (the live tail is the owner's). Only while other kernels live."""
        others = self.leases.others()
        if not others:
            return
        for conversation_id, events in list(self._logs.items()):
            if conversation_id in self._active or not events.movable_subscribers:
                continue
            try:
                resp = await self.deps.store.ListTurns(
                    store_pb2.ListTurnsRequest(
                        tenant_id=events.tenant_id, conversation_id=conversation_id, states=UNENDED_STATES
                    ),
                    timeout=self.deps.rpc_timeout,
                )
            except grpc.aio.AioRpcError:
                return  # the store is away: the next beat tries again
            if conversation_id in self._active:
                continue  # started here meanwhile
            if any(turn.lease_owner in others for turn in resp.turns):
                events.close_subscribers(moved=True)

    def running(self, turn_id: str) -> bool:
        return any(a.runner.turn.id == turn_id for a in self._active.values())

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        return self._locks.setdefault(conversation_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def pinned(self, tenant_id: str, conversation_id: str) -> AsyncIterator[ConversationLog]:
        """The conversation's log, kept (not forgotten as idle) while the block runs."""
        events = await self._log(tenant_id, conversation_id)
        events.pins += 1
        try:
            yield events
        finally:
            self._unpin(events)

    @contextlib.asynccontextmanager
    async def locked(self, tenant_id: str, conversation_id: str) -> AsyncIterator[ConversationLog]:
        """``pinned``, holding the conversation's lock: one decision about its turn at a time."""
        async with self.pinned(tenant_id, conversation_id) as events, self._lock(conversation_id):
            yield events

    def _unpin(self, events: ConversationLog) -> None:
        """Release a pin; an idle log is forgotten, so the kernel's memory follows the
        conversations in use, not every one it has ever served."""
        events.pins -= 1
        conversation_id = events.conversation_id
        if events.idle and self._logs.get(conversation_id) is events and conversation_id not in self._active:
            del self._logs[conversation_id]
            lock = self._locks.get(conversation_id)
            if lock is not None and not lock.locked():
                del self._locks[conversation_id]

    def _forget(self, events: ConversationLog) -> None:
        """Drop a log whose numbering another kernel now owns (this one lost the turn): its
        subscribers resume through a fresh one."""
        if self._logs.get(events.conversation_id) is events:
            del self._logs[events.conversation_id]
        events.close_subscribers(shutting_down=True)

    async def _log(self, tenant_id: str, conversation_id: str) -> ConversationLog:
        """The conversation's event log, loaded from the store on first use (NOT_FOUND if absent)."""
        if not tenant_id:
            raise InvalidArgument("tenant_id is required")
        if not conversation_id:
            raise InvalidArgument("conversation_id is required")
        existing = self._logs.get(conversation_id)
        if existing is not None:
            if existing.tenant_id != tenant_id:
                raise NotFound(f"conversation {conversation_id} not found")
            return existing
        try:
            conv = await self.deps.store.GetConversation(
                store_pb2.GetConversationRequest(tenant_id=tenant_id, conversation_id=conversation_id),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not load the conversation") from None
        # Another caller may have created it while we awaited the store.
        return self._logs.setdefault(
            conversation_id,
            ConversationLog(tenant_id, conversation_id, conv.last_event_seq, conv.reserved_event_seq),
        )

    # ------------------------------------------------------------------ starting turns

    async def start_turn(
        self,
        tenant_id: str,
        conversation_id: str,
        chunks: Sequence[common_pb2.Chunk],
        policy: common_pb2.SendPolicy.ValueType,
        idempotency_key: str,
    ) -> kernel_pb2.StartTurnResponse:
        if not chunks:
            raise InvalidArgument("the message is empty: send at least one text chunk")
        size = sum(len(c.text.text) for c in chunks)
        if size == 0:
            raise InvalidArgument("the message has no text")
        if size > MAX_MESSAGE_CHARS:
            raise InvalidArgument(f"the message has {size} characters; the limit is {MAX_MESSAGE_CHARS}")
        if self._draining:
            raise Unavailable("the kernel is shutting down; retry on another kernel")
        async with self.locked(tenant_id, conversation_id) as events:
            if idempotency_key:
                repeated = await self._turn_with_key(tenant_id, conversation_id, idempotency_key)
                if repeated is not None:
                    # A retried send: join the turn it started (running or done), start nothing.
                    return kernel_pb2.StartTurnResponse(
                        turn_id=repeated.id,
                        state=repeated.state,
                        after_event_seq=await self._seq_before(events, repeated.id),
                    )
            running = self._active.get(conversation_id)
            if running is not None:
                if policy == common_pb2.SEND_POLICY_INTERRUPT:
                    # This message starts the next turn; messages queued before it wait behind it.
                    running.runner.abort(start_next=False)
                    await asyncio.wait([running.task])
                elif policy == common_pb2.SEND_POLICY_REJECT:
                    raise FailedPrecondition(
                        f"conversation {conversation_id} has a running turn {running.runner.turn.id}; "
                        "send with policy interrupt to replace it, or enqueue to have it taken in turn"
                    )
                elif await self._enqueue(tenant_id, conversation_id, chunks, idempotency_key):
                    # Enqueue (the default): the running turn takes it at its next tool-result
                    # boundary, or the next turn starts with it, in the commit that seals it.
                    return kernel_pb2.StartTurnResponse(
                        turn_id=running.runner.turn.id,
                        state=running.runner.turn.state,
                        queued=True,
                        after_event_seq=events.last_seq,
                    )
                # Refused: the turn ended in the meantime; start one.
            return await self._launch(events, [list(chunks)], policy, idempotency_key)

    async def _turn_with_key(self, tenant_id: str, conversation_id: str, key: str) -> common_pb2.Turn | None:
        try:
            found = await self.deps.store.ListTurns(
                store_pb2.ListTurnsRequest(
                    tenant_id=tenant_id, conversation_id=conversation_id, idempotency_key=key, page_size=1
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not look up the idempotency key") from None
        return found.turns[0] if found.turns else None

    async def _seq_before(self, events: ConversationLog, turn_id: str) -> int:
        """The event_seq just before ``turn_id``'s turn_started, so a subscriber from there sees
        the whole turn; the live edge if it has not started. For a turn long past this scans the
        conversation's persisted events from the start: the path of a retried send only."""
        for event in events.unpersisted:
            if event.turn_id == turn_id and event.HasField("turn_started"):
                return event.event_seq - 1
        cursor = 0
        while cursor < events.persisted_seq:
            try:
                page = await self.deps.store.LoadEvents(
                    store_pb2.LoadEventsRequest(
                        tenant_id=events.tenant_id,
                        conversation_id=events.conversation_id,
                        after_event_seq=cursor,
                        limit=1000,
                    ),
                    timeout=self.deps.rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, "the store could not load the conversation's events") from None
            if not page.events:
                break
            for event in page.events:
                if event.turn_id == turn_id and event.HasField("turn_started"):
                    return event.event_seq - 1
            cursor = page.events[-1].event_seq
        return events.last_seq

    async def _enqueue(
        self, tenant_id: str, conversation_id: str, chunks: Sequence[common_pb2.Chunk], idempotency_key: str
    ) -> bool:
        """Queue the message behind the conversation's turn in flight; False if the store
        says none is (it ended a moment ago): then the caller starts one instead."""
        message = common_pb2.Message(role=common_pb2.ROLE_USER, chunks=chunks)
        try:
            await self.deps.store.Enqueue(
                store_pb2.EnqueueRequest(
                    tenant_id=tenant_id,
                    conversation_id=conversation_id,
                    message=message,
                    idempotency_key=idempotency_key,
                    only_behind_turn=True,
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if _refusal(exc, NONE_IN_FLIGHT):
                return False
            raise from_rpc_error(exc, "the store could not queue the message") from None
        return True

    async def _in_flight(self, tenant_id: str, conversation_id: str) -> common_pb2.Turn | None:
        """The conversation's turn that has not ended (running elsewhere, or awaiting recovery)."""
        try:
            found = await self.deps.store.ListTurns(
                store_pb2.ListTurnsRequest(
                    tenant_id=tenant_id, conversation_id=conversation_id, states=UNENDED_STATES, page_size=1
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not list the conversation's turns") from None
        return found.turns[0] if found.turns else None

    async def _launch(
        self,
        events: ConversationLog,
        user_messages: Sequence[Sequence[common_pb2.Chunk]],
        policy: common_pb2.SendPolicy.ValueType = common_pb2.SEND_POLICY_UNSPECIFIED,
        idempotency_key: str = "",
    ) -> kernel_pb2.StartTurnResponse:
        """Create a turn for ``user_messages`` (committed with it, leased to this kernel) and
        start it; the conversation's lock is held. Without a free run slot the turn is created
        queued and waits for one. A turn of the conversation in flight elsewhere (another
        kernel's, or one awaiting recovery) takes the message as queued instead."""
        tenant_id, conversation_id = events.tenant_id, events.conversation_id
        agent, conv = await self._agent_of(tenant_id, conversation_id)
        # With no turn in flight nobody writes the conversation: the store's numbering is
        # the truth (another kernel may have run a turn of it since this log was loaded).
        events.refresh(conv.last_event_seq, conv.reserved_event_seq)
        has_slot = self.slots.try_acquire()
        # Under a cluster-wide limit every turn starts queued: the store admits it.
        running = has_slot and not self.deps.max_running
        state = common_pb2.TURN_STATE_RUNNING if running else common_pb2.TURN_STATE_QUEUED
        try:
            turn = await self.deps.store.CreateTurn(
                store_pb2.CreateTurnRequest(
                    tenant_id=tenant_id,
                    conversation_id=conversation_id,
                    idempotency_key=idempotency_key,
                    state=state,
                    agent=agent.name,
                    lease_owner=self.owner,
                    lease_ttl=self.leases.ttl_proto,
                    reserve_event_seq=events.wanted_reservation(),
                    user_messages=[
                        common_pb2.Message(role=common_pb2.ROLE_USER, chunks=chunks)
                        for chunks in user_messages
                    ],
                    exclusive=True,
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if has_slot:
                self.slots.release()
            if _refusal(exc, IN_FLIGHT):
                return await self._behind_turn_elsewhere(events, user_messages, policy, idempotency_key)
            raise from_rpc_error(exc, "the store could not create the turn") from None
        events.reserve(events.wanted_reservation())
        after = events.last_seq
        writer = self._writer(events, turn)
        writer.committed_through(turn.user_message_seq + len(user_messages) - 1)
        runner = self._runner(events, writer, agent, user_messages=len(user_messages), has_slot=has_slot)
        self._start(events, runner, has_slot)
        return kernel_pb2.StartTurnResponse(turn_id=turn.id, state=state, after_event_seq=after)

    async def _behind_turn_elsewhere(
        self,
        events: ConversationLog,
        user_messages: Sequence[Sequence[common_pb2.Chunk]],
        policy: common_pb2.SendPolicy.ValueType,
        idempotency_key: str,
    ) -> kernel_pb2.StartTurnResponse:
        tenant_id, conversation_id = events.tenant_id, events.conversation_id
        other = await self._in_flight(tenant_id, conversation_id)
        if other is None:
            raise Unavailable(f"conversation {conversation_id} is between turns; send again")
        if policy not in (common_pb2.SEND_POLICY_UNSPECIFIED, common_pb2.SEND_POLICY_ENQUEUE):
            where = other.lease_owner or "being recovered"
            raise FailedPrecondition(
                f"conversation {conversation_id} has a turn {other.id} running on another kernel "
                f"({where}); send with policy enqueue to have it taken in turn"
            )
        for chunks in user_messages:
            if not await self._enqueue(tenant_id, conversation_id, chunks, idempotency_key):
                raise Unavailable(f"conversation {conversation_id} is between turns; send again")
        return kernel_pb2.StartTurnResponse(
            turn_id=other.id, state=other.state, queued=True, after_event_seq=events.last_seq
        )

    def _writer(self, events: ConversationLog, turn: common_pb2.Turn) -> TurnWriter:
        return TurnWriter(
            self.deps.store,
            events,
            turn,
            self.owner,
            rpc_timeout=self.deps.rpc_timeout,
            outage=self.deps.store_outage,
            appends=self.appends,
        )

    def _runner(
        self,
        events: ConversationLog,
        writer: TurnWriter,
        agent: Agent,
        *,
        user_messages: int = 0,
        has_slot: bool = True,
        resume: Resume | None = None,
    ) -> TurnRunner:
        turn = writer.turn
        runner = TurnRunner(
            self.deps,
            events,
            writer,
            confident=lambda: self.leases.confident(turn.id),
            user_messages=user_messages,
            on_sealed=lambda resp: self._sealed(events, turn.id, resp),
            next_turn=lambda: self._next_turn_spec(events),
            agent=agent,
            slots=None if has_slot else self.slots,
            resume=resume,
        )
        if self._draining:
            runner.request_handover(HANDOVER)
        return runner

    def _next_turn_spec(self, events: ConversationLog) -> store_pb2.NextTurn:
        """How the commit that seals a turn starts the next one, when messages are queued: its
        lease, and event numbers reserved for it (the seal lowers the reservation first)."""
        unlimited = self.slots.unlimited and not self.deps.max_running
        state = common_pb2.TURN_STATE_RUNNING if unlimited else common_pb2.TURN_STATE_QUEUED
        # The seal's own turn_sealed is numbered already: the next turn's come after it.
        return store_pb2.NextTurn(
            state=state, lease_ttl=self.leases.ttl_proto, reserve_event_seq=events.wanted_reservation()
        )

    def _start(self, events: ConversationLog, runner: TurnRunner, has_slot: bool) -> None:
        """Run ``runner``'s turn as the conversation's active one, its lease renewed."""
        turn = runner.turn
        conversation_id = events.conversation_id
        self.leases.hold(
            events.tenant_id,
            turn,
            runner.lease_lost,
            on_unsure=runner.lease_unsure,
            on_sure=runner.lease_sure,
        )

        async def run() -> None:
            try:
                await runner.run()
            finally:
                self.leases.drop(turn.id)
                if has_slot or runner.has_slot:
                    self.slots.release()

        task = asyncio.create_task(run(), name=f"turn {turn.id}")
        events.pins += 1  # until the turn's task has ended (it persists its last events)
        self._active[conversation_id] = ActiveTurn(runner, task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Also on a turn that ends unsealed (handed over, lost, the store failed) or crashes.
        task.add_done_callback(lambda _t: self._finished(conversation_id, turn.id))
        task.add_done_callback(lambda _t: events.turn_over(turn.id))
        task.add_done_callback(lambda _t: self._forget(events) if runner.writer.lost else None)
        task.add_done_callback(lambda _t: self._unpin(events))

    def _sealed(self, events: ConversationLog, turn_id: str, resp: store_pb2.AppendResponse) -> None:
        """A turn's seal committed: free the conversation, or give it to the next turn the
        same commit started from queued messages."""
        self._finished(events.conversation_id, turn_id)
        if not resp.HasField("next_turn"):
            return
        turn = resp.next_turn
        agent = self.deps.agents.get(turn.agent) or self.deps.agents[self.deps.default_agent]
        has_slot = turn.state == common_pb2.TURN_STATE_RUNNING and self.slots.try_acquire()
        writer = self._writer(events, turn)
        writer.committed_through(max(m.seq for m in resp.next_turn_messages))
        runner = self._runner(
            events, writer, agent, user_messages=len(resp.next_turn_messages), has_slot=has_slot
        )
        self._start(events, runner, has_slot)

    async def resume(
        self,
        events: ConversationLog,
        turn: common_pb2.Turn,
        agent: Agent,
        resume: Resume,
        last_seq: int,
    ) -> None:
        """Run a turn this kernel has just claimed (``kernel/recovery.py``); the lock is held."""
        has_slot = self.slots.try_acquire()
        writer = self._writer(events, turn)
        writer.committed_through(last_seq)
        runner = self._runner(events, writer, agent, has_slot=has_slot, resume=resume)
        runner.resume_last_seq(last_seq)
        self._start(events, runner, has_slot)

    def agent_named(self, name: str) -> Agent | None:
        return self.deps.agents.get(name or self.deps.default_agent)

    async def _agent_of(self, tenant_id: str, conversation_id: str) -> tuple[Agent, common_pb2.Conversation]:
        """The agent the conversation selects, else its workspace's default, else the kernel's;
        and the conversation as the store has it now."""
        try:
            conv = await self.deps.store.GetConversation(
                store_pb2.GetConversationRequest(tenant_id=tenant_id, conversation_id=conversation_id),
                timeout=self.deps.rpc_timeout,
            )
            name, chosen_by = conv.agent, f"conversation {conversation_id}"
            if not name:
                ws = await self.deps.store.GetWorkspace(
                    store_pb2.GetWorkspaceRequest(tenant_id=tenant_id, workspace_id=conv.workspace_id),
                    timeout=self.deps.rpc_timeout,
                )
                name, chosen_by = ws.default_agent, f"workspace {conv.workspace_id}"
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not load the conversation") from None
        if not name:
            return self.deps.agents[self.deps.default_agent], conv
        agent = self.deps.agents.get(name)
        if agent is None:
            raise FailedPrecondition(
                f"{chosen_by} selects agent {name!r}, which this kernel does not have; "
                f"configured agents: {', '.join(sorted(self.deps.agents))}"
            )
        return agent, conv

    def _finished(self, conversation_id: str, turn_id: str) -> None:
        active = self._active.get(conversation_id)
        if active is not None and active.runner.turn.id == turn_id:
            del self._active[conversation_id]

    def busy(self, conversation_id: str) -> bool:
        return conversation_id in self._active

    # ------------------------------------------------------------------ approvals

    async def resolve_approval(
        self,
        tenant_id: str,
        approval_id: str,
        decision: common_pb2.ApprovalDecision.ValueType,
        *,
        edited_input_json: str = "",
        reason: str = "",
        decided_by: str = "",
        remember: bool = False,
    ) -> common_pb2.Approval:
        """Decide a pending approval in the store (once), and wake the call behind it if it
        waits here (a turn on another kernel finds the decision in the store). An edit is
        checked against the tool's schema first: invalid, the approval stays open."""
        store, timeout = self.deps.store, self.deps.rpc_timeout
        try:
            approval = await store.GetApproval(
                store_pb2.GetApprovalRequest(tenant_id=tenant_id, approval_id=approval_id), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not load the approval") from None
        if decision == common_pb2.APPROVAL_DECISION_EDIT:
            tool = await self._tool_of(tenant_id, approval)
            invalid = tool.check_input(edited_input_json) if tool is not None else ""
            if invalid:
                raise InvalidArgument(f"edited_input_json: {invalid}; the approval stays open")
        remembered = common_pb2.PermissionRule()
        if remember:
            remembered = (await self._remembered(tenant_id, approval, edited_input_json)).to_proto()
        try:
            decided = await store.ResolveApproval(
                store_pb2.ResolveApprovalRequest(
                    tenant_id=tenant_id,
                    approval_id=approval_id,
                    decision=decision,
                    edited_input_json=edited_input_json,
                    reason=reason,
                    decided_by=decided_by,
                    remember=remember,
                    remembered_rule=remembered if remember else None,
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not record the decision") from None
        self.deps.approvals.decided(decided)
        return decided

    async def _tool_of(self, tenant_id: str, approval: common_pb2.Approval) -> Tool | None:
        """The tool an approval's call names, as the turn's agent has it."""
        try:
            turn = await self.deps.store.GetTurn(
                store_pb2.GetTurnRequest(tenant_id=tenant_id, turn_id=approval.turn_id),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not load the approval's turn") from None
        agent = self.agent_named(turn.agent)
        return agent.tools.get(approval.tool_name) if agent is not None else None

    async def _remembered(
        self, tenant_id: str, approval: common_pb2.Approval, edited_input_json: str
    ) -> Rule:
        """What approving for the rest of the conversation remembers: this call's tool and
        subject (its command, its path, as the rules see it)."""
        try:
            where = await self.deps.store.ResolveExecution(
                store_pb2.ResolveExecutionRequest(
                    tenant_id=tenant_id, conversation_id=approval.conversation_id, turn_id=approval.turn_id
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not resolve where the call runs") from None
        subject = subject_of(
            approval.tool_name,
            edited_input_json or approval.input_json,
            root=where.workspace_root,
            cwd=where.cwd or where.workspace_root,
        )
        return remembered_rule(approval.tool_name, subject)

    # ------------------------------------------------------------------ subscribing

    async def subscribe(
        self,
        tenant_id: str,
        conversation_id: str,
        after_event_seq: int,
        until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
        *,
        movable: bool = False,
    ) -> AsyncGenerator[list[common_pb2.AgentEvent], None]:
        """The conversation's events after ``after_event_seq``, following the live tail, or up
        to where ``until`` ends them; ``movable``: ended (``Unavailable``) while another
        kernel runs the conversation's turn."""
        if after_event_seq < 0:
            raise InvalidArgument("after_event_seq must be 0 or more")
        if until not in common_pb2.SubscribeUntil.values():
            raise InvalidArgument(f"until must be one of {', '.join(common_pb2.SubscribeUntil.keys())}")

        async def load(after: int, limit: int) -> list[common_pb2.AgentEvent]:
            resp = await self.deps.store.LoadEvents(
                store_pb2.LoadEventsRequest(
                    tenant_id=tenant_id, conversation_id=conversation_id, after_event_seq=after, limit=limit
                ),
                timeout=self.deps.rpc_timeout,
            )
            return list(resp.events)

        async with self.pinned(tenant_id, conversation_id) as events:
            # Read with no await before the subscription registers, so the turn named is the
            # one running at that instant.
            running = self._active.get(conversation_id)
            stream = replay_and_follow(
                events,
                after_event_seq,
                load,
                until=until,
                running_turn=running.runner.turn.id if running is not None else "",
                movable=movable,
            )
            # Closed before the pin is released, so the log can be forgotten once idle.
            async with contextlib.aclosing(stream):
                async for batch in stream:
                    yield batch

    async def cancel(self, tenant_id: str, conversation_id: str, turn_id: str) -> str:
        async with self.pinned(tenant_id, conversation_id):
            pass  # NOT_FOUND for another tenant's conversation
        running = self._active.get(conversation_id)
        if running is None or (turn_id and running.runner.turn.id != turn_id):
            return ""
        running.runner.abort()
        await asyncio.wait([running.task])
        return running.runner.turn.id

    # ------------------------------------------------------------------ stopping

    async def drain(self, grace: float) -> None:
        """Stop taking turns and hand the running ones over: each stops at its next step
        boundary within ``grace`` (or, past it, where it is) and releases its lease, so
        another kernel, or this one restarted, continues it at once from its last committed
        step. Then live event streams end with UNAVAILABLE (subscribe again)."""
        self._draining = True
        await self.leases.retire()  # transports stop sending it new work at once
        await self._follow.close()
        await self.recovery.close()
        for active in list(self._active.values()):
            active.runner.request_handover(HANDOVER)
        tasks = list(self._tasks)
        if tasks:
            log.info("handing over %d running turn(s)", len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, grace - 1.0))
            for active in list(self._active.values()):
                if active.task in pending:
                    active.runner.force_handover()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for events in self._logs.values():
            events.close_subscribers(shutting_down=True)
        await self.leases.close()

    async def close(self) -> None:
        """Stop the background work (tests that never drain)."""
        await self._follow.close()
        await self.recovery.close()
        await self.leases.close()
        await self.appends.close()
