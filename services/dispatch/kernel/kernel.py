"""The kernel's live state: active turns (one per conversation), event logs,
and starting, cancelling and draining turns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from dispatch.kernel.agents import Agent
from dispatch.kernel.events import ConversationLog, replay_and_follow
from dispatch.kernel.slots import RunSlots
from dispatch.kernel.turn import TurnDeps, TurnRunner
from dispatch.shared.errors import (
    DispatchError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from dispatch.shared.limits import MAX_MESSAGE_CHARS
from dispatch.v1 import common_pb2, kernel_pb2, store_pb2

log = logging.getLogger(__name__)


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

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        return self._locks.setdefault(conversation_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _pinned(self, tenant_id: str, conversation_id: str) -> AsyncIterator[ConversationLog]:
        """The conversation's log, kept (not forgotten as idle) while the block runs."""
        events = await self._log(tenant_id, conversation_id)
        events.pins += 1
        try:
            yield events
        finally:
            self._unpin(events)

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
            conversation_id, ConversationLog(tenant_id, conversation_id, conv.last_event_seq)
        )

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
        async with self._pinned(tenant_id, conversation_id) as events, self._lock(conversation_id):
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
                    running.runner.abort()
                    await asyncio.wait([running.task])
                elif policy == common_pb2.SEND_POLICY_REJECT:
                    raise FailedPrecondition(
                        f"conversation {conversation_id} has a running turn {running.runner.turn.id}; "
                        "send with policy interrupt to replace it, or enqueue to have it taken in turn"
                    )
                else:
                    # Enqueue (the default): the running turn takes it at its next tool-result
                    # boundary, or the next turn starts with it right after the seal.
                    await self._enqueue(tenant_id, conversation_id, chunks, idempotency_key)
                    return kernel_pb2.StartTurnResponse(
                        turn_id=running.runner.turn.id,
                        state=running.runner.turn.state,
                        queued=True,
                        after_event_seq=events.last_seq,
                    )
            return await self._launch(tenant_id, conversation_id, [list(chunks)], idempotency_key)

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
    ) -> None:
        message = common_pb2.Message(role=common_pb2.ROLE_USER, chunks=chunks)
        try:
            await self.deps.store.Enqueue(
                store_pb2.EnqueueRequest(
                    tenant_id=tenant_id,
                    conversation_id=conversation_id,
                    message=message,
                    idempotency_key=idempotency_key,
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the store could not queue the message") from None

    async def _launch(
        self,
        tenant_id: str,
        conversation_id: str,
        user_messages: Sequence[Sequence[common_pb2.Chunk]],
        idempotency_key: str = "",
    ) -> kernel_pb2.StartTurnResponse:
        """Create and start a turn for ``user_messages``; the conversation's lock is held.
        Without a free run slot the turn is created queued and waits for one."""
        async with self._pinned(tenant_id, conversation_id) as events:
            agent = await self._agent_of(tenant_id, conversation_id)
            has_slot = self.slots.try_acquire()
            state = common_pb2.TURN_STATE_RUNNING if has_slot else common_pb2.TURN_STATE_QUEUED
            try:
                turn = await self.deps.store.CreateTurn(
                    store_pb2.CreateTurnRequest(
                        tenant_id=tenant_id,
                        conversation_id=conversation_id,
                        idempotency_key=idempotency_key,
                        state=state,
                        agent=agent.name,
                    ),
                    timeout=self.deps.rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if has_slot:
                    self.slots.release()
                raise from_rpc_error(exc, "the store could not create the turn") from None
            after = events.last_seq
            runner = TurnRunner(
                self.deps,
                events,
                turn,
                user_messages[0],
                on_sealed=lambda: self._finished(conversation_id, turn.id),
                agent=agent,
                more_user=user_messages[1:],
                slots=None if has_slot else self.slots,
            )

            async def run() -> None:
                try:
                    await runner.run()
                finally:
                    if has_slot or runner.has_slot:
                        self.slots.release()

            task = asyncio.create_task(run(), name=f"turn {turn.id}")
            events.pins += 1  # until the turn's task has ended (it persists its last events)
            self._active[conversation_id] = ActiveTurn(runner, task)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # Also on a turn that ends unsealed (the store failed) or crashes.
            task.add_done_callback(lambda _t: self._finished(conversation_id, turn.id))
            task.add_done_callback(lambda _t: events.turn_over(turn.id))
            task.add_done_callback(lambda _t: self._unpin(events))
            task.add_done_callback(lambda _t: self._after_turn(tenant_id, conversation_id))
            return kernel_pb2.StartTurnResponse(turn_id=turn.id, state=state, after_event_seq=after)

    def _after_turn(self, tenant_id: str, conversation_id: str) -> None:
        """A turn ended: messages queued behind it (and not taken as steering) start the next."""
        if self._draining:
            return
        task = asyncio.create_task(self._start_queued(tenant_id, conversation_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_queued(self, tenant_id: str, conversation_id: str) -> None:
        async with self._pinned(tenant_id, conversation_id), self._lock(conversation_id):
            if conversation_id in self._active or self._draining:
                return  # a turn runs again: it takes the queue at its boundaries, or after it
            try:
                drained = await self.deps.store.DrainQueue(
                    store_pb2.DrainQueueRequest(tenant_id=tenant_id, conversation_id=conversation_id),
                    timeout=self.deps.rpc_timeout,
                )
                if drained.messages:
                    await self._launch(
                        tenant_id, conversation_id, [list(q.message.chunks) for q in drained.messages]
                    )
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, DispatchError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.error(  # noqa: TRY400 - the cause is in detail
                    "conversation %s: could not start the turn for its queued messages: %s",
                    conversation_id,
                    detail,
                )

    async def _agent_of(self, tenant_id: str, conversation_id: str) -> Agent:
        """The agent the conversation selects, else its workspace's default, else the kernel's."""
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
            return self.deps.agents[self.deps.default_agent]
        agent = self.deps.agents.get(name)
        if agent is None:
            raise FailedPrecondition(
                f"{chosen_by} selects agent {name!r}, which this kernel does not have; "
                f"configured agents: {', '.join(sorted(self.deps.agents))}"
            )
        return agent

    def _finished(self, conversation_id: str, turn_id: str) -> None:
        active = self._active.get(conversation_id)
        if active is not None and active.runner.turn.id == turn_id:
            del self._active[conversation_id]

    async def subscribe(
        self,
        tenant_id: str,
        conversation_id: str,
        after_event_seq: int,
        until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
    ) -> AsyncIterator[list[common_pb2.AgentEvent]]:
        """The conversation's events after ``after_event_seq``, following the live tail, or up
        to where ``until`` ends them."""
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

        async with self._pinned(tenant_id, conversation_id) as events:
            # Read with no await before the subscription registers, so the turn named is the
            # one running at that instant.
            running = self._active.get(conversation_id)
            stream = replay_and_follow(
                events,
                after_event_seq,
                load,
                until=until,
                running_turn=running.runner.turn.id if running is not None else "",
            )
            async for batch in stream:
                yield batch

    async def cancel(self, tenant_id: str, conversation_id: str, turn_id: str) -> str:
        async with self._pinned(tenant_id, conversation_id):
            pass  # NOT_FOUND for another tenant's conversation
        running = self._active.get(conversation_id)
        if running is None or (turn_id and running.runner.turn.id != turn_id):
            return ""
        running.runner.abort()
        await asyncio.wait([running.task])
        return running.runner.turn.id

    async def drain(self, grace: float) -> None:
        """Stop taking turns, let running ones finish within ``grace``, interrupt the rest."""
        self._draining = True
        tasks = list(self._tasks)
        if tasks:
            log.info("draining %d running turn(s)", len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, grace - 1.0))
            for active in list(self._active.values()):
                if active.task in pending:
                    active.runner.abort(common_pb2.TURN_STATE_INTERRUPTED)
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for events in self._logs.values():
            events.close_subscribers(shutting_down=True)
