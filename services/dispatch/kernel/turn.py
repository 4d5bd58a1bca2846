"""One turn: a loop of steps, each streaming one provider response and running
the tool calls it contains, until a response calls no tool.

Persistence: the user message when the turn starts, each step's messages when
the step completes (with the events produced so far, in the same
transaction), and ``turn_sealed`` only after the final append succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from dispatch.dispatcher import canonical_key
from dispatch.kernel.agents import Agent
from dispatch.kernel.dispatch import StepDispatcher
from dispatch.kernel.events import ConversationLog
from dispatch.kernel.providers.base import (
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    Usage,
)
from dispatch.kernel.retry import Backoffs, RetryBudgetSpent, Retrying
from dispatch.kernel.slots import RunSlots
from dispatch.kernel.tools import ToolContext, ToolResult
from dispatch.shared.config import RetryPolicy
from dispatch.shared.errors import rpc_detail
from dispatch.shared.ids import step_id as make_step_id
from dispatch.shared.timeutil import duration
from dispatch.v1 import common_pb2, exec_pb2_grpc, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)

TERMINAL_STATE: Mapping[common_pb2.FinishReason.ValueType, common_pb2.TurnState.ValueType] = {
    common_pb2.FINISH_REASON_ABORTED: common_pb2.TURN_STATE_ABORTED,
    common_pb2.FINISH_REASON_ERROR: common_pb2.TURN_STATE_FAILED,
}


@dataclass
class TurnDeps:
    """What every turn of a kernel shares."""

    store: store_pb2_grpc.ConversationStoreAsyncStub
    exec: exec_pb2_grpc.ExecAsyncStub
    agents: Mapping[str, Agent]
    default_agent: str = "default"
    max_steps: int = 0
    rpc_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    backoffs: Backoffs = field(default_factory=Backoffs)
    # Confine every turn's tools to its workspace root (ResolveExecution's workspace_root),
    # whatever the workspace says; off: only workspaces with confine_tools are confined.
    confine_tools: bool = False


@dataclass
class StepState:
    """What a step has produced so far; kept apart so an abort can keep text and thinking."""

    index: int
    step_id: str
    started: float = field(default_factory=time.monotonic)
    text: list[str] = field(default_factory=list)
    # Thinking blocks as (text pieces, signature); a signature closes its block (providers
    # that sign thinking must get each block back with its own signature).
    thinking: list[tuple[list[str], str]] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    results: dict[str, ToolResult] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_STOP
    first_token: float | None = None
    stream_end: float | None = None
    # Tools the model called where none may run (a wrap-up, a text-only agent): not run.
    ignored_calls: list[str] = field(default_factory=list)

    def assistant_message(self, turn_id: str, *, with_calls: bool) -> common_pb2.Message | None:
        chunks: list[common_pb2.Chunk] = []
        chunks.extend(
            common_pb2.Chunk(thinking=common_pb2.ThinkingChunk(text="".join(pieces), signature=signature))
            for pieces, signature in self.thinking
            if pieces or signature
        )
        if self.text:
            chunks.append(common_pb2.Chunk(text=common_pb2.TextChunk(text="".join(self.text))))
        if with_calls:
            chunks.extend(
                common_pb2.Chunk(
                    tool_call=common_pb2.ToolCallChunk(
                        id=c.id, name=c.name, input_json=c.input_json, step_id=self.step_id
                    )
                )
                for c in self.calls
            )
        if not chunks:
            return None
        return common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, chunks=chunks, turn_id=turn_id, step_index=self.index
        )

    def tool_message(self, turn_id: str) -> common_pb2.Message | None:
        if not self.calls:
            return None
        chunks = [
            common_pb2.Chunk(
                tool_result=common_pb2.ToolResultChunk(
                    tool_call_id=c.id,
                    name=c.name,
                    content=self.results[c.id].content,
                    is_error=self.results[c.id].is_error,
                    step_id=self.step_id,
                )
            )
            for c in self.calls
        ]
        return common_pb2.Message(
            role=common_pb2.ROLE_TOOL, chunks=chunks, turn_id=turn_id, step_index=self.index
        )


_WRAP_UP = {
    common_pb2.FINISH_REASON_MAX_STEPS: "This turn has reached its limit of {steps} steps.",
    common_pb2.FINISH_REASON_TOOL_BUDGET: "This turn has spent its budget of {budget} tool calls.",
    common_pb2.FINISH_REASON_DOOM_LOOP: "This turn kept repeating the same tool call, so it is stopping.",
}


def _wrap_up_instruction(
    reason: common_pb2.FinishReason.ValueType, steps: int, budget: int
) -> common_pb2.Message:
    """The note that asks for the wrap-up reply; sent with the wrap-up step only, never stored."""
    why = _WRAP_UP[reason].format(steps=steps, budget=budget)
    text = (
        f"{why} Tools are no longer available. In a few sentences, tell the user what you did, "
        "what you found, and what is left to do."
    )
    return common_pb2.Message(
        role=common_pb2.ROLE_SYSTEM, chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=text))]
    )


def _tool_names(names: Sequence[str]) -> str:
    return ", ".join(sorted(set(names)))


def _wrap_up_again(ignored: Sequence[str]) -> common_pb2.Message:
    """The note that asks once more for a wrap-up that came back without text; never stored."""
    if ignored:
        why = f"Your last reply called {_tool_names(ignored)} instead of answering; no tool can run now."
    else:
        why = "Your last reply had no text."
    text = f"{why} Answer in plain text only, without calling any tool."
    return common_pb2.Message(
        role=common_pb2.ROLE_SYSTEM, chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=text))]
    )


class StoreFailed(Exception):
    """The store refused or failed a write the turn depends on."""


class TurnRunner:
    """Runs one turn of one conversation and emits its events."""

    def __init__(
        self,
        deps: TurnDeps,
        events: ConversationLog,
        turn: common_pb2.Turn,
        user_chunks: Sequence[common_pb2.Chunk],
        on_sealed: Callable[[], None] = lambda: None,
        *,
        agent: Agent | None = None,
        more_user: Sequence[Sequence[common_pb2.Chunk]] = (),
        slots: RunSlots | None = None,
    ):
        self.deps = deps
        self.agent = agent or deps.agents[turn.agent or deps.default_agent]
        # Frees the conversation for its next turn; called just before turn_sealed.
        self._on_sealed = on_sealed
        self.events = events
        self.turn = turn
        self.user_chunks = list(user_chunks)
        # Further user messages that start the turn with the first (queued behind another turn).
        self.more_user = [list(m) for m in more_user]
        # Where to wait for a run slot; None: the turn has one (or needs none).
        self._slots = slots
        self._slot_wait: asyncio.Task[None] | None = None
        self.has_slot = False
        self.abort_reason: common_pb2.TurnState.ValueType | None = None
        self._step_task: asyncio.Task[None] | None = None
        self._usage = common_pb2.Usage()
        self._last_seq = 0
        # Where tools run; resolved from the store when the turn starts.
        self._computer_id = ""
        self._cwd = ""
        self._root: str | None = None
        self._call_ids: set[str] = set()
        # Limits: calls let through so far, the last call's key and how many times in a row.
        self._calls_used = 0
        self._last_call: tuple[str, bytes] | None = None
        self._repeats = 0
        self._limit: common_pb2.FinishReason.ValueType | None = None
        self._step_metrics: list[common_pb2.StepMetrics] = []

    @property
    def tenant_id(self) -> str:
        return self.events.tenant_id

    def abort(self, state: common_pb2.TurnState.ValueType = common_pb2.TURN_STATE_ABORTED) -> None:
        """Abort the turn: the running step is cancelled, and the turn seals as aborted."""
        if self.abort_reason is None:
            self.abort_reason = state
        if self._slot_wait is not None:
            self._slot_wait.cancel()
        if self._step_task is not None:
            self._step_task.cancel()

    def _emit(self, step_id: str = "", **kind: object) -> None:
        self.events.emit(self.turn.id, step_id, **kind)

    async def _append(
        self, messages: Sequence[common_pb2.Message], *, take_queue: bool = False
    ) -> store_pb2.AppendResponse:
        """Commit messages together with every event not yet persisted, in one transaction;
        with ``take_queue``, the queued messages too (appended last, as this turn's)."""
        async with self.events.commit_lock:
            pending = list(self.events.unpersisted)
            if not messages and not pending and not take_queue:
                return store_pb2.AppendResponse()
            try:
                resp: store_pb2.AppendResponse = await self.deps.store.Append(
                    store_pb2.AppendRequest(
                        tenant_id=self.tenant_id,
                        conversation_id=self.turn.conversation_id,
                        messages=messages,
                        events=pending,
                        take_queue_for_turn=self.turn.id if take_queue else "",
                    ),
                    timeout=self.deps.rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                raise StoreFailed(f"the store failed to commit: {rpc_detail(exc)}") from exc
            if pending:
                self.events.mark_persisted(pending[-1].event_seq)
        if resp.last_seq:
            self._last_seq = resp.last_seq
            self._emit(
                messages_committed=common_pb2.MessagesCommitted(
                    first_seq=resp.first_seq, last_seq=resp.last_seq
                )
            )
        return resp

    async def _wait_for_slot(self) -> None:
        """A queued turn waits here for a run slot (an abort ends the wait), then is running."""
        if self._slots is None:
            return
        self._slot_wait = asyncio.create_task(self._slots.acquire())
        try:
            await self._slot_wait
            self.has_slot = True
        except asyncio.CancelledError:
            if self.abort_reason is None:
                raise  # the kernel itself is being cancelled
            return  # aborted while queued: the turn seals at once, without a step
        finally:
            self._slot_wait = None
        try:
            self.turn = await self.deps.store.TransitionTurn(
                store_pb2.TransitionTurnRequest(
                    tenant_id=self.tenant_id, turn_id=self.turn.id, to=common_pb2.TURN_STATE_RUNNING
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("turn %s: could not record it as running: %s", self.turn.id, exc.details())

    async def run(self) -> None:
        await self._wait_for_slot()
        started = time.monotonic()
        self._emit(turn_started=common_pb2.TurnStarted(agent=self.turn.agent, model=self.agent.model))
        finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_ERROR
        error = ""
        steps = 0
        last_step_usage = common_pb2.Usage()
        user_seq = 0
        try:
            users = [
                common_pb2.Message(role=common_pb2.ROLE_USER, chunks=chunks, turn_id=self.turn.id)
                for chunks in (self.user_chunks, *self.more_user)
            ]
            user_seq = (await self._append(users)).first_seq
            finish, steps, last_step_usage = await self._steps()
        except StoreFailed as exc:
            error = str(exc)
            self._emit(error=common_pb2.ErrorEvent(message=error, code="store", fatal=True))
        except ProviderError as exc:
            error = str(exc)
            self._emit(error=common_pb2.ErrorEvent(message=error, code="provider", fatal=True))
        except RetryBudgetSpent as exc:
            error = str(exc)
            self._emit(error=common_pb2.ErrorEvent(message=error, code="provider_retry_budget", fatal=True))
        except Exception as exc:
            log.exception("turn %s failed", self.turn.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
            self._emit(error=common_pb2.ErrorEvent(message=error, code="internal", fatal=True))
        if self.abort_reason is not None:
            finish = common_pb2.FINISH_REASON_ABORTED
        self._emit(
            turn_done=common_pb2.TurnDone(
                finish_reason=finish,
                duration=duration(time.monotonic() - started),
                usage=self._usage,
                context_size=last_step_usage.input_tokens + last_step_usage.output_tokens,
                steps=steps,
            )
        )
        await self._record_metrics(
            turn=common_pb2.TurnMetrics(
                turn_id=self.turn.id,
                conversation_id=self.turn.conversation_id,
                duration=duration(time.monotonic() - started),
                usage=self._usage,
                steps=steps,
                tool_calls=sum(m.tool_calls for m in self._step_metrics),
                context_size=last_step_usage.input_tokens + last_step_usage.output_tokens,
                finish_reason=finish,
            )
        )
        state = self.abort_reason or TERMINAL_STATE.get(finish, common_pb2.TURN_STATE_COMPLETED)
        await self._seal(state, finish, error, user_seq)

    async def _record_metrics(
        self, *, step: common_pb2.StepMetrics | None = None, turn: common_pb2.TurnMetrics | None = None
    ) -> None:
        """Persist a step's or the turn's metrics. A failure is logged, not fatal: metrics
        never cost a turn its answer."""
        try:
            if step is not None:
                await self.deps.store.RecordStepMetrics(
                    store_pb2.RecordStepMetricsRequest(
                        tenant_id=self.tenant_id, conversation_id=self.turn.conversation_id, metrics=step
                    ),
                    timeout=self.deps.rpc_timeout,
                )
            if turn is not None:
                await self.deps.store.RecordTurnMetrics(
                    store_pb2.RecordTurnMetricsRequest(tenant_id=self.tenant_id, metrics=turn),
                    timeout=self.deps.rpc_timeout,
                )
        except grpc.aio.AioRpcError as exc:
            log.warning("turn %s: metrics not recorded: %s: %s", self.turn.id, exc.code().name, exc.details())

    async def _seal(
        self,
        state: common_pb2.TurnState.ValueType,
        finish: common_pb2.FinishReason.ValueType,
        error: str,
        user_seq: int,
    ) -> None:
        try:
            await self._append([])
            await self.deps.store.TransitionTurn(
                store_pb2.TransitionTurnRequest(
                    tenant_id=self.tenant_id,
                    turn_id=self.turn.id,
                    to=state,
                    finish_reason=finish,
                    error_message=error,
                    user_message_seq=user_seq,
                ),
                timeout=self.deps.rpc_timeout,
            )
        except (StoreFailed, grpc.aio.AioRpcError) as exc:
            # Not sealed: what was committed stays; the turn's row is reconciled later.
            detail = str(exc) if isinstance(exc, StoreFailed) else rpc_detail(exc)
            log.error("turn %s could not be sealed: %s", self.turn.id, detail)  # noqa: TRY400 - the cause is in detail
            self._emit(
                error=common_pb2.ErrorEvent(message=f"turn not sealed: {detail}", code="store", fatal=True)
            )
            return
        # Free the conversation before announcing the seal: a client that sends
        # its next message on turn_sealed must find it free.
        self._on_sealed()
        self._emit(turn_sealed=common_pb2.TurnSealed(state=state, last_seq=self._last_seq))
        try:
            await self._append([])
        except StoreFailed as exc:
            log.warning(
                "turn %s: turn_sealed not persisted (it will be with the next append): %s", self.turn.id, exc
            )

    async def _load_history(self) -> list[common_pb2.Message]:
        try:
            resp = await self.deps.store.Load(
                store_pb2.LoadRequest(tenant_id=self.tenant_id, conversation_id=self.turn.conversation_id),
                timeout=self.deps.rpc_timeout,
            )
            where = await self.deps.store.ResolveExecution(
                store_pb2.ResolveExecutionRequest(
                    tenant_id=self.tenant_id, conversation_id=self.turn.conversation_id, turn_id=self.turn.id
                ),
                timeout=self.deps.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise StoreFailed(f"the store failed to load the conversation: {rpc_detail(exc)}") from exc
        self._computer_id, self._cwd = where.computer_id, where.cwd
        if where.confine_tools or self.deps.confine_tools:
            # Without a root, confinement would silently mean none at all: refuse the turn.
            if not (where.workspace_root or where.cwd):
                why = "the workspace says so" if where.confine_tools else "kernel.confine_tools is set"
                raise StoreFailed(
                    f"tools are confined to the workspace root ({why}), "
                    "but the store knows no root or cwd for this conversation"
                )
            self._root = where.workspace_root or where.cwd
        return list(resp.messages)

    def _step_cap(self) -> int:
        """Steps this turn may take before it must wrap up; 0: no cap."""
        caps = [c for c in (self.deps.max_steps, self.agent.steps or 0) if c > 0]
        return min(caps) if caps else 0

    async def _steps(self) -> tuple[common_pb2.FinishReason.ValueType, int, common_pb2.Usage]:
        """The step loop. Returns the turn's finish reason, its step count and the last step's usage.

        A step cap, a spent tool budget or a doom loop does not cut the turn off: one more
        step runs with tools disabled, so the model can say where it got to (the wrap-up).
        """
        history = await self._load_history()
        last_usage = common_pb2.Usage()
        step_index = 0
        while True:
            if self.abort_reason is not None:
                return common_pb2.FINISH_REASON_ABORTED, step_index, last_usage
            wrap_up = self._limit
            step = StepState(step_index, make_step_id(self.turn.id, step_index))
            self._step_task = asyncio.create_task(self._run_step(step, history, wrap_up))
            try:
                await self._step_task
            except asyncio.CancelledError:
                if self.abort_reason is None:
                    raise  # the kernel itself is being cancelled
            except (ProviderError, RetryBudgetSpent):
                # Keep what the step said before failing, without dangling tool calls.
                await self._commit_partial(step)
                raise
            finally:
                self._step_task = None
            if self.abort_reason is not None:
                await self._commit_partial(step)
                return common_pb2.FINISH_REASON_ABORTED, step_index + 1, step.usage.to_proto()
            messages = [
                m
                for m in (
                    step.assistant_message(self.turn.id, with_calls=True),
                    step.tool_message(self.turn.id),
                )
                if m is not None
            ]
            cap = self._step_cap()
            if step.calls and wrap_up is None and self._limit is None and cap and step_index + 1 >= cap:
                self._limit = common_pb2.FINISH_REASON_MAX_STEPS
            # A tool-result boundary with another step to come: messages queued while the turn
            # ran join it as user messages (steering), taken by the store in this same commit,
            # so none is lost or taken twice.
            steer = bool(step.calls) and wrap_up is None and self._limit is None
            committed = await self._append(messages, take_queue=steer)
            history.extend(committed.messages)
            last_usage = step.usage.to_proto()
            await self._record_metrics(step=self._complete_step(step, last_usage))
            step_index += 1
            if committed.dequeued:
                self._emit(
                    make_step_id(self.turn.id, step_index),
                    steering_injected=common_pb2.SteeringInjected(
                        step_index=step_index,
                        message_seqs=[m.seq for m in committed.messages[-committed.dequeued :]],
                    ),
                )
            if wrap_up is not None:
                return wrap_up, step_index, last_usage
            if not step.calls:
                # A model that asked for tools it was not offered (their calls were ignored) is done.
                finish = step.finish
                if finish == common_pb2.FINISH_REASON_TOOL_CALLS:
                    finish = common_pb2.FINISH_REASON_STOP
                return finish, step_index, last_usage

    def _gate(self, call: ToolCall) -> str:
        """Why ``call`` must not run (the turn's tool budget is spent, or it repeats the
        previous call once too often), or "" to let it through. Counts it either way."""
        try:
            key = (call.name, canonical_key(call.input_json))
        except Exception:  # not JSON: compared as written
            key = (call.name, call.input_json.encode())
        self._repeats = self._repeats + 1 if key == self._last_call else 1
        self._last_call = key
        agent = self.agent
        if agent.doom_loop and self._repeats >= agent.doom_loop:
            self._limit = self._limit or common_pb2.FINISH_REASON_DOOM_LOOP
            return (
                f"not run: this is the same {call.name} call {self._repeats} times in a row; "
                "the turn is ending (doom loop). Do not repeat it."
            )
        if agent.tool_budget and self._calls_used >= agent.tool_budget:
            self._limit = self._limit or common_pb2.FINISH_REASON_TOOL_BUDGET
            return f"not run: the turn's tool budget ({agent.tool_budget} calls) is spent"
        self._calls_used += 1
        if agent.tool_budget and self._calls_used >= agent.tool_budget:
            self._limit = self._limit or common_pb2.FINISH_REASON_TOOL_BUDGET
        return ""

    async def _commit_partial(self, step: StepState) -> None:
        message = step.assistant_message(self.turn.id, with_calls=False)
        await self._append([message] if message is not None else [])

    def _complete_step(self, step: StepState, usage: common_pb2.Usage) -> common_pb2.StepMetrics:
        end = step.stream_end or time.monotonic()
        first = step.first_token or end
        ttft, decode, generation = first - step.started, end - first, end - step.started
        self._emit(
            step.step_id,
            step_completed=common_pb2.StepCompleted(
                step_index=step.index,
                finish_reason=step.finish,
                ttft=duration(ttft),
                decode=duration(decode),
                generation=duration(generation),
                usage=usage,
                tool_calls=len(step.calls),
            ),
        )
        self._step_metrics.append(
            metrics := common_pb2.StepMetrics(
                turn_id=self.turn.id,
                step_index=step.index,
                step_id=step.step_id,
                ttft=duration(ttft),
                decode=duration(decode),
                generation=duration(generation),
                usage=usage,
                tool_calls=len(step.calls),
                finish_reason=step.finish,
            )
        )
        return metrics

    def _unique(self, call: ToolCall) -> ToolCall:
        """The call with an id no earlier call of this turn has: a provider that
        repeats an id must not leave two calls answering to it in history."""
        if call.id not in self._call_ids:
            self._call_ids.add(call.id)
            return call
        n = 2
        while f"{call.id}_{n}" in self._call_ids:
            n += 1
        renamed = ToolCall(f"{call.id}_{n}", call.name, call.input_json)
        self._call_ids.add(renamed.id)
        return renamed

    async def _run_step(
        self,
        step: StepState,
        history: Sequence[common_pb2.Message],
        wrap_up: common_pb2.FinishReason.ValueType | None = None,
    ) -> None:
        agent = self.agent
        messages = list(history)
        if wrap_up is not None:
            messages.append(_wrap_up_instruction(wrap_up, self._step_cap(), agent.tool_budget))
        request = ProviderRequest(
            model=agent.model,
            system=agent.system_prompt,
            messages=messages,
            tools=[t.spec for t in agent.tools.values()],
            tools_disabled=wrap_up is not None,
        )
        started: dict[str, float] = {}

        async def run_call(call: ToolCall) -> ToolResult:
            started[call.id] = time.monotonic()
            return await self._run_tool(step, call)

        def on_result(call: ToolCall, result: ToolResult, duplicate_of: str) -> None:
            elapsed = time.monotonic() - started[call.id] if call.id in started else 0.0
            self._record_result(step, call, result, elapsed, duplicate_of)

        dispatcher = StepDispatcher(agent.policy, agent.tools, run_call, on_result)
        try:
            await self._stream_step(step, request, dispatcher, tools_allowed=wrap_up is None)
            if wrap_up is not None and not "".join(step.text).strip():
                await self._wrap_up_once_more(step, request, dispatcher)
            if not agent.policy.eager:
                for call in step.calls:
                    self._submit(step, call, dispatcher)
            await dispatcher.wait()
        except BaseException:
            # Aborted, or the provider failed while eager calls ran: nothing
            # keeps running, and every unresolved call reads "Aborted".
            await dispatcher.abort()
            raise

    async def _stream_step(
        self, step: StepState, request: ProviderRequest, dispatcher: StepDispatcher, *, tools_allowed: bool
    ) -> None:
        """Stream one provider response into the step."""
        try:
            async with contextlib.aclosing(self._stream_with_retries(step, request)) as events:
                async for ev in events:
                    self._on_provider_event(step, ev, dispatcher, tools_allowed=tools_allowed)
        finally:
            step.stream_end = time.monotonic()
            self._add_usage(step.usage)

    async def _wrap_up_once_more(
        self, step: StepState, request: ProviderRequest, dispatcher: StepDispatcher
    ) -> None:
        """A wrap-up came back without text (a model that ignores tool_choice "none" calls a
        tool instead): ask once more, with the tools left out of the request where the API
        allows it. Still no text: an error event says there is no wrap-up; the turn ends with
        its limit's finish reason all the same."""
        log.info("turn %s step %d: the wrap-up had no text; asking once more", self.turn.id, step.index)
        again = dataclasses.replace(
            request, messages=[*request.messages, _wrap_up_again(step.ignored_calls)], omit_tools=True
        )
        # The first answer is dropped whole (its thinking too: signed thinking must go back
        # with the response it came from); its usage is counted in the turn's already.
        step.thinking.clear()
        step.usage = Usage()
        await self._stream_step(step, again, dispatcher, tools_allowed=False)
        if "".join(step.text).strip():
            return
        instead = f" (it called {_tool_names(step.ignored_calls)} instead)" if step.ignored_calls else ""
        self._emit(
            step.step_id,
            error=common_pb2.ErrorEvent(
                message=f"the model gave no wrap-up: asked twice, it answered without text{instead}",
                code="no_wrap_up",
                fatal=False,
            ),
        )

    def _record_result(
        self, step: StepState, call: ToolCall, result: ToolResult, elapsed: float, duplicate_of: str = ""
    ) -> None:
        step.results[call.id] = result
        self._emit(
            step.step_id,
            tool_result=common_pb2.ToolResultEvent(
                tool_call_id=call.id,
                name=call.name,
                content=result.content,
                is_error=result.is_error,
                duration=duration(elapsed),
                duplicate_of=duplicate_of,
            ),
        )

    def _submit(self, step: StepState, call: ToolCall, dispatcher: StepDispatcher) -> None:
        """Hand ``call`` to the dispatcher, or answer it with an error if a limit refuses it."""
        refused = self._gate(call)
        if refused:
            self._record_result(step, call, ToolResult(refused, is_error=True), 0.0)
        else:
            dispatcher.submit(call)

    def _on_provider_event(
        self, step: StepState, ev: ProviderEvent, dispatcher: StepDispatcher, *, tools_allowed: bool = True
    ) -> None:
        sid = step.step_id
        if step.first_token is None and not isinstance(ev, (Usage, Finish)):
            step.first_token = time.monotonic()
        if isinstance(ev, TextDelta):
            step.text.append(ev.text)
            self._emit(sid, text_delta=common_pb2.TextDelta(text=ev.text))
        elif isinstance(ev, ReasoningDelta):
            if not step.thinking or step.thinking[-1][1]:  # none yet, or the last one is signed
                step.thinking.append(([], ""))
            pieces, _ = step.thinking[-1]
            if ev.text:
                pieces.append(ev.text)
                self._emit(sid, reasoning_delta=common_pb2.ReasoningDelta(text=ev.text))
            if ev.signature:
                step.thinking[-1] = (pieces, ev.signature)
        elif isinstance(ev, ToolCall):
            if not tools_allowed or self.agent.text_only:
                # No tools were offered: a call now has no tool to run and no place in history.
                # Subscribers see it was made and not run.
                where = "this agent has no tools" if self.agent.text_only else "the wrap-up has no tools"
                log.warning(
                    "turn %s step %d: ignored a call to %r (%s)", self.turn.id, step.index, ev.name, where
                )
                step.ignored_calls.append(ev.name)
                self._emit(
                    sid,
                    error=common_pb2.ErrorEvent(
                        message=f"the model called {ev.name}, but {where}: the call was not run",
                        code="tool_call_ignored",
                        fatal=False,
                    ),
                )
                return
            call = self._unique(ev)
            step.calls.append(call)
            self._emit(
                sid,
                tool_call=common_pb2.ToolCallEvent(
                    tool_call_id=call.id, name=call.name, input_json=call.input_json
                ),
            )
            if self.agent.policy.eager:
                self._submit(step, call, dispatcher)
        elif isinstance(ev, Usage):
            step.usage = ev
            self._emit(sid, usage=common_pb2.UsageEvent(usage=ev.to_proto()))
        elif isinstance(ev, Finish):
            step.finish = ev.reason

    async def _stream_with_retries(
        self, step: StepState, request: ProviderRequest
    ) -> AsyncGenerator[ProviderEvent, None]:
        """The provider's events for this step. A retryable failure before the step has
        emitted anything is retried after a ``provider_retry`` event and a wait; any other
        failure, or one after output has reached subscribers, ends the step."""
        provider = self.agent.provider
        backoff = self.deps.backoffs(provider.endpoint)
        retrying = Retrying(self.deps.retry)
        while True:
            held = backoff.remaining()
            if held > 0:
                # Another turn's 429 holds the endpoint: wait it out rather than add to the load.
                self._emit(
                    step.step_id,
                    provider_retry=common_pb2.ProviderRetry(
                        attempt=retrying.attempts,
                        delay=duration(held),
                        status=429,
                        reason=f"{provider.endpoint} is rate limited; waiting out its back-off",
                    ),
                )
                await asyncio.sleep(held)
                continue
            emitted = False
            try:
                # Closed at once when the step ends early (an abort): the HTTP response with it.
                async with contextlib.aclosing(provider.stream(request)) as events:
                    async for ev in events:
                        emitted = True
                        yield ev
                return
            except ProviderError as exc:
                if not exc.retryable or emitted:
                    raise
                delay = retrying.next_delay(exc)
                if exc.status == 429:
                    backoff.hold(delay)
                self._emit(
                    step.step_id,
                    provider_retry=common_pb2.ProviderRetry(
                        attempt=retrying.attempts, delay=duration(delay), status=exc.status, reason=str(exc)
                    ),
                )
                log.warning(
                    "turn %s step %d: provider failed (%s); retry %d in %.1fs",
                    self.turn.id,
                    step.index,
                    exc,
                    retrying.attempts,
                    delay,
                )
                await asyncio.sleep(delay)  # an abort cancels the step, and this sleep with it

    async def _run_tool(self, step: StepState, call: ToolCall) -> ToolResult:
        tool = self.agent.tools.get(call.name)
        if tool is None:
            return ToolResult(
                f"unknown tool {call.name!r}; available tools: {', '.join(sorted(self.agent.tools))}",
                is_error=True,
            )

        def on_output(stream: common_pb2.OutputStream.ValueType, data: bytes) -> None:
            self._emit(
                step.step_id,
                tool_output=common_pb2.ToolOutput(tool_call_id=call.id, stream=stream, data=data),
            )

        ctx = ToolContext(
            exec=self.deps.exec,
            computer_id=self._computer_id,
            cwd=self._cwd,
            rpc_timeout=self.deps.rpc_timeout,
            on_output=on_output,
            root=self._root,
        )
        return await tool.run(ctx, call.input_json)

    def _add_usage(self, usage: Usage) -> None:
        self._usage.input_tokens += usage.input_tokens
        self._usage.output_tokens += usage.output_tokens
        self._usage.cache_read_tokens += usage.cache_read_tokens
        self._usage.cache_write_tokens += usage.cache_write_tokens
        self._usage.reasoning_tokens += usage.reasoning_tokens
