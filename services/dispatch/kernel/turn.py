"""One turn: a loop of steps, each streaming one provider response and running
the tool calls it contains, until a response calls no tool.

Persistence: the user messages are committed with the turn itself (the kernel's
CreateTurn), each step's messages when the step completes (with the events
produced so far, in the same transaction), and the seal in one last commit that
also starts the next turn when messages are queued; ``turn_sealed`` is sent only
once that commit succeeded. Every write goes through the turn's ``TurnWriter``:
fenced by its lease, retried through store outages. A turn recovered after its
kernel went away (``Resume``) continues from its last committed step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatch.dispatcher import canonical_key
from dispatch.kernel.agents import Agent
from dispatch.kernel.approvals import RUNS, ApprovalBoard, StepApprovals, why_not_run
from dispatch.kernel.context import (
    COMPACTION_PROMPT,
    CONTINUE,
    KEEP_SHARE,
    READ_TOOL,
    ContextFull,
    Gauge,
    find_tool_output,
    fit_tool_results,
    split_point,
    transcript,
    visible,
    with_summary,
)
from dispatch.kernel.dispatch import StepDispatcher
from dispatch.kernel.events import ConversationLog
from dispatch.kernel.leases import new_instance_id
from dispatch.kernel.permissions import ASK, DENY, Permissions, Rule, remembered_rule
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
from dispatch.kernel.writer import LeaseLost, StoreFailed, TurnWriter
from dispatch.shared.config import RetryPolicy
from dispatch.shared.ids import step_id as make_step_id
from dispatch.shared.timeutil import duration
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc

if TYPE_CHECKING:
    from dispatch.kernel.streams import Exec

log = logging.getLogger(__name__)

TERMINAL_STATE: Mapping[common_pb2.FinishReason.ValueType, common_pb2.TurnState.ValueType] = {
    common_pb2.FINISH_REASON_ABORTED: common_pb2.TURN_STATE_ABORTED,
    common_pb2.FINISH_REASON_ERROR: common_pb2.TURN_STATE_FAILED,
    common_pb2.FINISH_REASON_INTERRUPTED: common_pb2.TURN_STATE_INTERRUPTED,
}


@dataclass
class TurnDeps:
    """What every turn of a kernel shares."""

    store: store_pb2_grpc.ConversationStoreAsyncStub
    # The stub, or (in a served kernel) the client whose file calls share one session stream.
    exec: Exec
    agents: Mapping[str, Agent]
    default_agent: str = "default"
    max_steps: int = 0
    rpc_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    backoffs: Backoffs = field(default_factory=Backoffs)
    # Confine every turn's tools to its workspace root (ResolveExecution's workspace_root),
    # whatever the workspace says; off: only workspaces with confine_tools are confined.
    confine_tools: bool = False
    # Durable turns (see KernelConfig): this kernel's name on its leases, their time to
    # live, how often unheld turns are looked for, runs a turn may have, and how long a
    # write is retried through a store outage.
    owner: str = field(default_factory=new_instance_id)
    lease_ttl: float = 15.0
    sweep_interval: float = 5.0
    max_attempts: int = 3
    store_outage: float = 60.0
    # Scale-out: how often subscribers of a turn run elsewhere are moved, and the limit on
    # running turns across every kernel (KernelConfig); a turn waiting for one of those
    # run slots asks again every follow_interval.
    follow_interval: float = 0.5
    max_running: int = 0
    # The approvals this kernel's turns wait for (ResolveApproval wakes them).
    approvals: ApprovalBoard = field(default_factory=ApprovalBoard)


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
    # Calls the permission rules ask about: (call, the rule that asked), decided later.
    asks: list[tuple[ToolCall, str]] = field(default_factory=list)
    # Its assistant message is committed already (it asked for approvals): the step's last
    # commit holds only the results; ``committed``, what history lacks of it.
    assistant_committed: bool = False
    committed: list[common_pb2.Message] = field(default_factory=list)
    # Calls run with input a person edited: the result says so.
    edited: dict[str, str] = field(default_factory=dict)
    # Calls whose results history has already (a recovered step): not committed again.
    answered: set[str] = field(default_factory=set)
    # The request's estimated input tokens, before it was sent.
    context_estimate: int = 0

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

    def tool_message(self, turn_id: str, missing: str = "") -> common_pb2.Message | None:
        """The results of the step's calls; a call without one gets ``missing`` as an error
        result (a turn that ends while calls wait), so none dangles."""
        calls = [c for c in self.calls if c.id not in self.answered]
        if not calls:
            return None
        gone = ToolResult(missing or "not run", is_error=True)
        chunks = [
            common_pb2.Chunk(
                tool_result=common_pb2.ToolResultChunk(
                    tool_call_id=c.id,
                    name=c.name,
                    content=self.results.get(c.id, gone).content,
                    is_error=self.results.get(c.id, gone).is_error,
                    step_id=self.step_id,
                )
            )
            for c in calls
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


def interrupted_note(step_index: int, why: str) -> str:
    """What the model is told before a step that runs again because it was cut short."""
    return (
        f"Note from the runtime: this turn was interrupted while step {step_index + 1} was running "
        f"({why}), and it now continues. Anything done in that interrupted step may or may not "
        "have taken effect: tool calls made then may have run, partly or fully, or not at all. "
        "Check the current state before repeating an action that changes something."
    )


def text_chunks(text: str) -> list[common_pb2.Chunk]:
    return [common_pb2.Chunk(text=common_pb2.TextChunk(text=text))]


def note_message(turn_id: str, step_index: int, why: str) -> common_pb2.Message:
    return common_pb2.Message(
        role=common_pb2.ROLE_SYSTEM,
        turn_id=turn_id,
        step_index=step_index,
        chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=interrupted_note(step_index, why)))],
    )


class Handover(Exception):
    """The turn stops here, resumable, for another kernel to continue (this one drains)."""


@dataclass
class Resume:
    """How a turn recovered from a kernel that went away continues (``kernel/recovery.py``)."""

    # This run's number (2 for the first recovery).
    attempt: int
    # The first step to run: the one that was interrupted.
    from_step: int
    # Told to the model with that step and committed with it; None after a clean handover.
    note: common_pb2.Message | None = None
    # What the earlier runs used of the turn's limits and tokens.
    calls_used: int = 0
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    # Non-empty: no attempt is left; the turn ends interrupted, saying this.
    give_up: str = ""
    # Its last step was committed and called no tool: only the seal is missing.
    finished: bool = False
    # Its step ``from_step`` is committed with calls that wait for these approvals (or were
    # decided while no kernel ran the turn): it goes on waiting, nothing runs again.
    waiting: list[common_pb2.Approval] = field(default_factory=list)


class TurnRunner:
    """Runs one turn of one conversation and emits its events."""

    def __init__(
        self,
        deps: TurnDeps,
        events: ConversationLog,
        writer: TurnWriter,
        *,
        user_messages: int = 1,
        on_sealed: Callable[[store_pb2.AppendResponse], None] = lambda _resp: None,
        next_turn: Callable[[], store_pb2.NextTurn | None] = lambda: None,
        agent: Agent | None = None,
        slots: RunSlots | None = None,
        resume: Resume | None = None,
        confident: Callable[[], bool] = lambda: True,
    ):
        """``writer`` holds the turn (leased to this kernel); its user messages (``user_messages``
        of them, from ``turn.user_message_seq``) are committed. ``on_sealed`` gets the seal's
        answer (with the next turn, if it started one) before ``turn_sealed`` is sent;
        ``next_turn`` says how to start the next turn from queued messages (None: don't)."""
        self.deps = deps
        self.writer = writer
        # Whether the turn's lease is confirmed enough to start something (a step, a tool);
        # when it is not, the runner has already been told (lease_unsure).
        self._confident = confident
        turn = writer.turn
        self.agent = agent or deps.agents[turn.agent or deps.default_agent]
        self._on_sealed = on_sealed
        self._next_turn = next_turn
        self._start_next = True
        self.events = events
        self._user_messages = user_messages
        self.resume = resume
        # Where to wait for a run slot; None: the turn has one (or needs none).
        self._slots = slots
        self._slot_wait: asyncio.Task[None] | None = None
        self.has_slot = False
        self.abort_reason: common_pb2.TurnState.ValueType | None = None
        # Asked to stop for another kernel: at the next step boundary, or (forced) now.
        self._handover = ""
        self._handover_forced = False
        # The step was cut because the lease could not be renewed; set again when it is.
        self._suspended = False
        self._sure = asyncio.Event()
        self._sure.set()
        self._step_task: asyncio.Task[None] | None = None
        self._usage = common_pb2.Usage()
        if resume is not None:
            self._usage.CopyFrom(resume.usage)
        self._last_seq = turn.user_message_seq + user_messages - 1 if turn.user_message_seq else 0
        # Where tools run; resolved from the store when the turn starts.
        self._computer_id = ""
        self._cwd = ""
        self._root: str | None = None
        self._call_ids: set[str] = set()
        # Limits: calls let through so far, the last call's key and how many times in a row.
        self._calls_used = resume.calls_used if resume is not None else 0
        self._last_call: tuple[str, bytes] | None = None
        self._repeats = 0
        self._limit: common_pb2.FinishReason.ValueType | None = None
        # The agent's rules until the turn loads the workspace's and the conversation's.
        self._permissions = Permissions([], [], list(self.agent.rules))
        self._step_metrics: list[common_pb2.StepMetrics] = []
        # How full the model's window is, estimated before each request (kernel/context.py).
        self._gauge = Gauge(self.agent.window)
        self._context_size = 0
        # The conversation's history as the step loop has it (read_tool_output reads it).
        self._history: list[common_pb2.Message] = []

    @property
    def turn(self) -> common_pb2.Turn:
        return self.writer.turn

    def resume_last_seq(self, seq: int) -> None:
        """A recovered turn's last committed message (its seal names it)."""
        self._last_seq = seq

    @property
    def tenant_id(self) -> str:
        return self.events.tenant_id

    def abort(
        self,
        state: common_pb2.TurnState.ValueType = common_pb2.TURN_STATE_ABORTED,
        *,
        start_next: bool = True,
    ) -> None:
        """Abort the turn: the running step is cancelled, and the turn seals as aborted.
        ``start_next=False``: its seal leaves queued messages queued (a message that
        interrupts the turn starts the next one, and they wait behind it)."""
        if self.abort_reason is None:
            self.abort_reason = state
        if not start_next:
            self._start_next = False
        if self._slot_wait is not None:
            self._slot_wait.cancel()
        if self._step_task is not None:
            self._step_task.cancel()

    def request_handover(self, reason: str) -> None:
        """Stop at the next step boundary (after its commit) and let another kernel continue."""
        self._handover = self._handover or reason
        if self._slot_wait is not None:
            self._slot_wait.cancel()  # not started yet: nothing to finish

    def force_handover(self) -> None:
        """Stop now, without committing the running step: it runs again where the turn is
        resumed, with the model told that it was interrupted."""
        self._handover = self._handover or "the kernel is shutting down"
        self._handover_forced = True
        if self._slot_wait is not None:
            self._slot_wait.cancel()
        if self._step_task is not None:
            self._step_task.cancel()

    def lease_unsure(self) -> None:
        """The lease may expire before a renewal reaches the store: stop running the step (the
        provider call, its tools) and wait for ``lease_sure``; nothing of the step is kept."""
        self._sure.clear()
        if self._step_task is not None and not self._step_task.done():
            self._suspended = True
            self._step_task.cancel()

    def lease_sure(self) -> None:
        """A renewal confirmed the lease again: a suspended turn goes on."""
        self._sure.set()

    def lease_lost(self) -> None:
        """Another kernel holds the turn now: stop at once and write nothing more."""
        self.writer.lost = True
        self._sure.set()  # a turn waiting for the lease learns it is gone
        if self._slot_wait is not None:
            self._slot_wait.cancel()
        if self._step_task is not None:
            self._step_task.cancel()

    def _emit(self, step_id: str = "", *, after_persist: bool = False, **kind: object) -> None:
        self.events.emit(self.turn.id, step_id, after_persist=after_persist, **kind)

    async def _append(
        self,
        messages: Sequence[common_pb2.Message],
        *,
        take_queue: bool = False,
        move_to: common_pb2.TurnState.ValueType = common_pb2.TURN_STATE_UNSPECIFIED,
        step_metrics: Sequence[common_pb2.StepMetrics] = (),
    ) -> store_pb2.AppendResponse:
        """Commit messages with every event not yet persisted (``TurnWriter.append``); with
        ``take_queue``, the queued messages too (appended last, as this turn's)."""
        resp = await self.writer.append(
            messages, take_queue=take_queue, move_to=move_to, step_metrics=step_metrics
        )
        if resp.last_seq:
            self._last_seq = resp.last_seq
            self._committed(resp.first_seq, resp.last_seq)
        return resp

    async def _resumed(self) -> common_pb2.TurnState.ValueType:
        """The ``move_to`` of the commit that ends a step which waited for approvals: the
        turn goes waiting_for_approval → resuming (every call decided) → running with it."""
        if self.writer.turn.state == common_pb2.TURN_STATE_WAITING_FOR_APPROVAL:
            await self._append([], move_to=common_pb2.TURN_STATE_RESUMING)
        if self.writer.turn.state == common_pb2.TURN_STATE_RESUMING:
            return common_pb2.TURN_STATE_RUNNING
        return common_pb2.TURN_STATE_UNSPECIFIED

    def _committed(self, first_seq: int, last_seq: int) -> None:
        self._emit(messages_committed=common_pb2.MessagesCommitted(first_seq=first_seq, last_seq=last_seq))

    async def _wait_for_slot(self) -> None:
        """A queued turn waits here for a run slot of this kernel, then (under a cluster-wide
        limit) for one of the cluster's, which the store grants as it moves the turn to
        running; an abort ends the wait."""
        if self._slots is None and self.turn.state != common_pb2.TURN_STATE_QUEUED:
            return
        self._slot_wait = asyncio.create_task(self._admitted())
        try:
            await self._slot_wait
        except asyncio.CancelledError:
            if self.abort_reason is None and not self._handover and not self.writer.lost:
                raise  # the kernel itself is being cancelled
            return  # aborted, handed over or lost while queued: no step runs
        finally:
            self._slot_wait = None

    async def _admitted(self) -> None:
        if self._slots is not None:
            await self._slots.acquire()
            self.has_slot = True
        while self.turn.state == common_pb2.TURN_STATE_QUEUED:
            if not await self.writer.transition(
                common_pb2.TURN_STATE_RUNNING, max_running=self.deps.max_running
            ):
                await asyncio.sleep(self.deps.follow_interval)  # the cluster's slots are taken

    async def run(self) -> None:
        """Run the turn to its seal, or until it is handed over or its lease is lost."""
        self.events.reserver = self.writer.reserve_soon
        try:
            await self._run()
        except LeaseLost as exc:
            log.warning("%s; this kernel stops running it", exc)
        finally:
            if self.events.reserver == self.writer.reserve_soon:
                self.events.reserver = None
            await self.writer.close()

    async def _run(self) -> None:
        try:
            await self._wait_for_slot()
        except StoreFailed as exc:
            log.warning("turn %s: could not record it as running: %s", self.turn.id, exc)
        if self.writer.lost:
            raise LeaseLost(f"turn {self.turn.id}: the lease was lost while it waited")
        started = time.monotonic()
        lost = self.events.announce_lost()
        if lost is not None:
            self._emit(
                events_lost=common_pb2.EventsLost(
                    first_event_seq=lost[0],
                    last_event_seq=lost[1],
                    reason="the kernel that ran this conversation went away before persisting them",
                )
            )
        resume = self.resume
        if resume is None:
            self._emit(turn_started=common_pb2.TurnStarted(agent=self.turn.agent, model=self.agent.model))
            if self.turn.user_message_seq:
                self._committed(self.turn.user_message_seq, self._last_seq)
        else:
            self._emit(
                turn_resumed=common_pb2.TurnResumed(
                    attempt=resume.attempt,
                    from_step_index=resume.from_step,
                    reason="its kernel went away" if resume.note is not None else "handed over",
                )
            )
        if self._handover:
            await self._hand_over(mid_step=False)
            return
        finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_ERROR
        error = ""
        steps = resume.from_step if resume is not None else 0
        try:
            if resume is not None and resume.finished and not resume.give_up:
                finish = common_pb2.FINISH_REASON_STOP
            elif resume is not None and resume.give_up:
                error = resume.give_up
                finish = common_pb2.FINISH_REASON_INTERRUPTED
                self._emit(
                    turn_interrupted=common_pb2.TurnInterrupted(
                        attempt=resume.attempt, reason=error, resumable=False
                    )
                )
            else:
                finish, steps = await self._steps()
        except Handover:
            await self._hand_over(mid_step=self._handover_forced)
            return
        except LeaseLost:
            raise
        except StoreFailed as exc:
            error = str(exc)
            self._emit(error=common_pb2.ErrorEvent(message=error, code="store", fatal=True))
        except ProviderError as exc:
            error = str(exc)
            self._emit(error=common_pb2.ErrorEvent(message=error, code="provider", fatal=True))
        except RetryBudgetSpent as exc:
            error = str(exc)
            self._emit(error=common_pb2.ErrorEvent(message=error, code="provider_retry_budget", fatal=True))
        except ContextFull as exc:
            error = str(exc)
            self._emit(error=common_pb2.ErrorEvent(message=error, code="context_window", fatal=True))
        except Exception as exc:
            log.exception("turn %s failed", self.turn.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
            self._emit(error=common_pb2.ErrorEvent(message=error, code="internal", fatal=True))
        if self.writer.lost:
            raise LeaseLost(f"turn {self.turn.id}: the lease was lost")
        if self.abort_reason is not None:
            finish = common_pb2.FINISH_REASON_ABORTED
        self._emit(
            turn_done=common_pb2.TurnDone(
                finish_reason=finish,
                duration=duration(time.monotonic() - started),
                usage=self._usage,
                context_size=self._context_size,
                steps=steps,
                context_window=self.agent.window.tokens,
                context_used=self.agent.window.used(self._context_size),
            )
        )
        metrics = common_pb2.TurnMetrics(
            turn_id=self.turn.id,
            conversation_id=self.turn.conversation_id,
            duration=duration(time.monotonic() - started),
            usage=self._usage,
            steps=steps,
            tool_calls=sum(m.tool_calls for m in self._step_metrics),
            context_size=self._context_size,
            finish_reason=finish,
        )
        state = self.abort_reason or TERMINAL_STATE.get(finish, common_pb2.TURN_STATE_COMPLETED)
        await self._seal(state, finish, error, metrics)

    async def _hand_over(self, *, mid_step: bool) -> None:
        """Release the lease with the turn unfinished: another kernel (or this one, restarted)
        claims it at once and continues from the last committed step (running again, with
        the model told, a step cut short: ``mid_step``)."""
        where = "mid-step" if mid_step else "at a step boundary"
        self._emit(
            turn_interrupted=common_pb2.TurnInterrupted(
                attempt=max(self.turn.attempts, 1),
                reason=f"handed over {where}: {self._handover}",
                resumable=True,
            )
        )
        try:
            await self.writer.append(release=True)
        except StoreFailed as exc:
            # The lease expires by itself; the turn is recovered then.
            log.warning(
                "turn %s: could not hand it over (%s); it resumes when its lease expires", self.turn.id, exc
            )

    async def _seal(
        self,
        state: common_pb2.TurnState.ValueType,
        finish: common_pb2.FinishReason.ValueType,
        error: str,
        metrics: common_pb2.TurnMetrics | None = None,
    ) -> None:
        """End the turn in one commit with everything not yet persisted: its state and
        ``metrics``, its lease released, and the next turn started if messages are queued.
        ``turn_sealed`` rides in that commit and is sent only once it succeeded. A store that
        is down is waited out: the turn's end is written once it is back."""
        self._emit(
            after_persist=True, turn_sealed=common_pb2.TurnSealed(state=state, last_seq=self._last_seq)
        )
        seal = store_pb2.TurnSeal(state=state, finish_reason=finish, error_message=error)
        try:
            next_turn = self._next_turn() if self._start_next else None
            resp = await self.writer.append(
                seal=seal, next_turn=next_turn, turn_metrics=metrics, forever=True
            )
        except StoreFailed as exc:
            # Refused, not unavailable: a defect. The lease runs out and the turn is recovered.
            log.error("turn %s could not be sealed: %s", self.turn.id, exc)  # noqa: TRY400 - the cause is in exc
            self._emit(
                error=common_pb2.ErrorEvent(message=f"turn not sealed: {exc}", code="store", fatal=True)
            )
            return
        self._on_sealed(resp)

    async def _load_history(self) -> list[common_pb2.Message]:
        """The committed history the provider request is built from, and where tools run;
        read through a store outage like every write."""

        async def load() -> tuple[store_pb2.LoadResponse, store_pb2.ResolveExecutionResponse]:
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
            return resp, where

        resp, where = await self.writer.retrying("load the conversation", load)
        self.writer.committed_through(resp.last_seq)
        self._permissions = self._turn_permissions(where)
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

    def _turn_permissions(self, where: store_pb2.ResolveExecutionResponse) -> Permissions:
        """The turn's rules: what the conversation remembered, its workspace's, its agent's
        (the store answers the first two with where the turn runs)."""
        return Permissions(
            [Rule.from_proto(r, "remembered") for r in where.remembered],
            [Rule.from_proto(r, f"workspace {where.workspace_id}") for r in where.workspace_permissions],
            list(self.agent.rules),
            root=where.workspace_root,
            cwd=where.cwd or where.workspace_root,
        )

    def _step_cap(self) -> int:
        """Steps this turn may take before it must wrap up; 0: no cap."""
        caps = [c for c in (self.deps.max_steps, self.agent.steps or 0) if c > 0]
        return min(caps) if caps else 0

    async def _steps(self) -> tuple[common_pb2.FinishReason.ValueType, int]:
        """The step loop. Returns the turn's finish reason and its step count.

        A step cap, a spent tool budget or a doom loop does not cut the turn off: one more
        step runs with tools disabled, so the model can say where it got to (the wrap-up).
        """
        history = await self._load_history()
        self._history = history
        step_index = self.resume.from_step if self.resume is not None else 0
        # Told with the first step of a recovered turn, and committed with it.
        note = self.resume.note if self.resume is not None else None
        if self.resume is not None:
            self._restore_limits(history, step_index)
        while True:
            if self.abort_reason is not None:
                return common_pb2.FINISH_REASON_ABORTED, step_index
            if self._handover:
                raise Handover
            if not self._confident() or not self._sure.is_set():
                await self._wait_until_sure(step_index)  # no step starts on a doubtful lease
            wrap_up = self._limit
            step = StepState(step_index, make_step_id(self.turn.id, step_index))
            told = [*history, note] if note is not None else history
            waiting = self.resume.waiting if self.resume is not None else []
            if waiting:
                self.resume.waiting = []  # type: ignore[union-attr]
                self._waiting_step(step, history)
            self._step_task = asyncio.create_task(self._run_step(step, told, wrap_up, waiting))
            try:
                await self._step_task
            except asyncio.CancelledError:
                if self.writer.lost:
                    raise LeaseLost(f"turn {self.turn.id}: the lease was lost mid-step") from None
                if self._handover_forced:
                    raise Handover from None  # the step runs again where the turn resumes
                if self._suspended:
                    # Cut off from the store: wait until the lease is confirmed, then run the
                    # step again, with the model told (or give up, past store_outage).
                    await self._wait_until_sure(step_index)
                    note = note_message(self.turn.id, step_index, "the store was unreachable")
                    continue
                if self.abort_reason is None:
                    raise  # the kernel itself is being cancelled
            except (ProviderError, RetryBudgetSpent, ContextFull):
                # Keep what the step said before failing, without dangling tool calls.
                await self._commit_partial(step)
                raise
            finally:
                self._step_task = None
            if self.abort_reason is not None:
                await self._commit_partial(step)
                return common_pb2.FINISH_REASON_ABORTED, step_index + 1
            if step.assistant_committed:
                # It asked for approvals: note and assistant message are in; the results follow.
                history.extend(step.committed)
                messages = [m for m in (step.tool_message(self.turn.id),) if m is not None]
                back = await self._resumed()
            else:
                messages = [
                    m
                    for m in (
                        note,
                        step.assistant_message(self.turn.id, with_calls=True),
                        step.tool_message(self.turn.id),
                    )
                    if m is not None
                ]
            note = None
            cap = self._step_cap()
            if step.calls and wrap_up is None and self._limit is None and cap and step_index + 1 >= cap:
                self._limit = common_pb2.FINISH_REASON_MAX_STEPS
            # A tool-result boundary with another step to come: messages queued while the turn
            # ran join it as user messages (steering), taken by the store in this same commit,
            # so none is lost or taken twice.
            steer = bool(step.calls) and wrap_up is None and self._limit is None
            if not step.assistant_committed:
                back = common_pb2.TURN_STATE_UNSPECIFIED
            # The step's metrics ride in its commit: one round trip to the store per step.
            metrics = self._step_metrics_of(step, step.usage.to_proto())
            committed = await self._append(messages, take_queue=steer, move_to=back, step_metrics=[metrics])
            history.extend(committed.messages)
            self._complete_step(step, metrics)
            self.events.release()  # the step is done: what it held goes now
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
                return wrap_up, step_index
            if not step.calls:
                # A model that asked for tools it was not offered (their calls were ignored) is done.
                finish = step.finish
                if finish == common_pb2.FINISH_REASON_TOOL_CALLS:
                    finish = common_pb2.FINISH_REASON_STOP
                return finish, step_index

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

    async def _wait_until_sure(self, step_index: int) -> None:
        """A step cut because the lease went unconfirmed: wait for the store to confirm it
        (``lease_sure``); past ``store_outage`` the turn ends with an error."""
        log.warning(
            "turn %s: step %d cut while the store is unreachable; waiting for it", self.turn.id, step_index
        )
        try:
            async with asyncio.timeout(self.deps.store_outage):
                await self._sure.wait()
        except TimeoutError:
            raise StoreFailed(
                f"the store was unreachable for {self.deps.store_outage:.0f}s while step "
                f"{step_index} ran; the step was stopped and the turn cannot go on"
            ) from None
        finally:
            self._suspended = False
        if self.writer.lost:
            raise LeaseLost(f"turn {self.turn.id}: the lease was lost while the store was away")

    def _restore_limits(self, history: Sequence[common_pb2.Message], from_step: int) -> None:
        """A recovered turn's limits as its earlier runs left them: the step cap counts the
        steps committed, the doom loop the calls in a row, the budget the calls made."""
        calls = [
            (chunk.tool_call.name, chunk.tool_call.input_json)
            for message in history
            if message.turn_id == self.turn.id
            for chunk in message.chunks
            if chunk.HasField("tool_call")
        ]
        self._calls_used = max(self._calls_used, len(calls))
        for name, input_json in calls:
            try:
                key = (name, canonical_key(input_json))
            except Exception:  # not JSON: compared as written
                key = (name, input_json.encode())
            self._repeats = self._repeats + 1 if key == self._last_call else 1
            self._last_call = key
        cap = self._step_cap()
        if cap and from_step >= cap:
            self._limit = self._limit or common_pb2.FINISH_REASON_MAX_STEPS
        if self.agent.tool_budget and self._calls_used >= self.agent.tool_budget:
            self._limit = self._limit or common_pb2.FINISH_REASON_TOOL_BUDGET

    async def _commit_partial(self, step: StepState) -> None:
        if step.assistant_committed:
            # Its calls are committed (it waited for approvals): each gets a result now.
            why = "not run: the turn ended before this call was decided or finished"
            results = step.tool_message(self.turn.id, missing=why)
            # The turn stays waiting (or resuming) until its seal ends it from there.
            await self._append([results] if results is not None else [])
            return
        await self._commit_partial_text(step)

    async def _commit_partial_text(self, step: StepState) -> None:
        message = step.assistant_message(self.turn.id, with_calls=False)
        await self._append([message] if message is not None else [])

    def _step_metrics_of(self, step: StepState, usage: common_pb2.Usage) -> common_pb2.StepMetrics:
        """The step's timings, usage and calls, as recorded with its commit."""
        end = step.stream_end or time.monotonic()
        first = step.first_token or end
        ttft, decode, generation = first - step.started, end - first, end - step.started
        return common_pb2.StepMetrics(
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

    def _complete_step(self, step: StepState, metrics: common_pb2.StepMetrics) -> None:
        """The step is committed: ``step_completed`` says so, with its metrics and how full
        the model's window was."""
        usage = metrics.usage
        reported = usage.input_tokens + usage.output_tokens if usage.input_tokens else 0
        self._context_size = reported or step.context_estimate
        window = self.agent.window
        self._emit(
            step.step_id,
            step_completed=common_pb2.StepCompleted(
                step_index=step.index,
                finish_reason=step.finish,
                ttft=metrics.ttft,
                decode=metrics.decode,
                generation=metrics.generation,
                usage=metrics.usage,
                tool_calls=metrics.tool_calls,
                context_estimate=step.context_estimate,
                context_size=self._context_size,
                context_window=window.tokens,
                context_used=window.used(self._context_size),
            ),
        )
        self._step_metrics.append(metrics)

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

    def _waiting_step(self, step: StepState, history: Sequence[common_pb2.Message]) -> None:
        """A recovered turn's step that waits for approvals, as history has it: its calls (and
        text) committed, and the results it has so far."""
        mine = [m for m in history if m.turn_id == self.turn.id and m.step_index == step.index]
        for message in mine:
            for chunk in message.chunks:
                if chunk.HasField("tool_call"):
                    c = chunk.tool_call
                    step.calls.append(ToolCall(c.id, c.name, c.input_json))
                    self._call_ids.add(c.id)
                elif chunk.HasField("tool_result"):
                    r = chunk.tool_result
                    step.results[r.tool_call_id] = ToolResult(r.content, is_error=r.is_error)
                    step.answered.add(r.tool_call_id)
                elif chunk.HasField("text") and message.role == common_pb2.ROLE_ASSISTANT:
                    step.text.append(chunk.text.text)
        step.assistant_committed = True

    async def _run_step(
        self,
        step: StepState,
        history: Sequence[common_pb2.Message],
        wrap_up: common_pb2.FinishReason.ValueType | None = None,
        waiting: Sequence[common_pb2.Approval] = (),
    ) -> None:
        """Stream one provider response and run its calls; ``waiting``: the step is committed
        and waits for these approvals (a recovered turn), so nothing is streamed."""
        agent = self.agent
        request, shown = self._request(history, wrap_up)
        step.context_estimate = self._gauge.before(request, shown)
        budget = agent.window.input_budget
        if not waiting and agent.compact_at and step.context_estimate > agent.compact_at * budget:
            made = await self._compact(step, history, step.context_estimate)
            # The loop's history gets the record (``history`` may be a copy with a note).
            if history is not self._history:
                history = [*history, *made]
            self._history.extend(made)
            request, shown = self._request(history, wrap_up)
            step.context_estimate = self._gauge.before(request, shown)
        if not waiting and step.context_estimate > budget:
            raise ContextFull(
                f"the request is about {step.context_estimate} tokens, more than the "
                f"{budget} the model's window of {agent.window.tokens} leaves for input"
                + (" even after compacting" if agent.compact_at else "")
                + "; send a shorter message, or set a larger context_window if the model has one"
            )
        started: dict[str, float] = {}

        async def run_call(call: ToolCall) -> ToolResult:
            if not self._confident():
                # The lease may have been lost while this kernel was away (paused): the step
                # is cut now (lease_unsure cancels it), and runs again once it is confirmed.
                return ToolResult("not run: this kernel could not confirm the turn's lease", is_error=True)
            started[call.id] = time.monotonic()
            self._emit(
                step.step_id,
                tool_started=common_pb2.ToolStarted(
                    tool_call_id=call.id, name=call.name, computer_id=self._computer_id
                ),
            )
            return await self._run_tool(step, call)

        def on_result(call: ToolCall, result: ToolResult, duplicate_of: str) -> None:
            elapsed = time.monotonic() - started[call.id] if call.id in started else 0.0
            if call.id in step.edited:
                note = f"(run with the input a person edited: {step.edited[call.id]})\n"
                result = ToolResult(note + result.content, is_error=result.is_error)
            self._record_result(step, call, result, elapsed, duplicate_of)

        dispatcher = StepDispatcher(agent.policy, agent.tools, run_call, on_result)
        if waiting:
            try:
                await self._decide(step, history, dispatcher, approvals=waiting)
                await dispatcher.wait()
            except BaseException:
                await dispatcher.abort()
                raise
            return
        try:
            await self._stream_step(step, request, dispatcher, tools_allowed=wrap_up is None)
            self._gauge.after(shown, step.usage.to_proto())
            if wrap_up is not None and not "".join(step.text).strip():
                await self._wrap_up_once_more(step, request, dispatcher)
            if not agent.policy.eager:
                for call in step.calls:
                    self._submit(step, call, dispatcher)
            if step.asks:
                await self._decide(step, history, dispatcher)
            await dispatcher.wait()
        except BaseException:
            # Aborted, or the provider failed while eager calls ran: nothing
            # keeps running, and every unresolved call reads "Aborted".
            await dispatcher.abort()
            raise

    def _request(
        self, history: Sequence[common_pb2.Message], wrap_up: common_pb2.FinishReason.ValueType | None
    ) -> tuple[ProviderRequest, int]:
        """The provider request of a step over ``history``, and how many of its messages come
        from history: the latest compaction's summary in place of what it covers, and tool
        results over the agent's budget cut (history keeps everything whole)."""
        agent = self.agent
        record, messages = visible(history)
        messages = fit_tool_results(messages, agent.tool_output_chars, readable=READ_TOOL in agent.tools)
        if record is not None and (not messages or messages[0].role != common_pb2.ROLE_USER):
            # Some APIs want a user message first; the summary rides in the system prompt.
            messages.insert(0, common_pb2.Message(role=common_pb2.ROLE_USER, chunks=text_chunks(CONTINUE)))
        shown = len(messages)
        if wrap_up is not None:
            messages.append(_wrap_up_instruction(wrap_up, self._step_cap(), agent.tool_budget))
        request = ProviderRequest(
            model=agent.model,
            system=with_summary(agent.system_prompt, record),
            messages=messages,
            tools=[t.spec for t in agent.tools.values()],
            tools_disabled=wrap_up is not None,
        )
        return request, shown

    async def _compact(
        self, step: StepState, history: Sequence[common_pb2.Message], tokens: int
    ) -> list[common_pb2.Message]:
        """Summarise the older messages of ``history`` with the agent's model and commit the
        summary as a compaction record, which is returned: later requests carry it in their
        place. Nothing is deleted. A failure ends the turn (``ContextFull``)."""
        agent = self.agent
        window = agent.window
        record, messages = visible(history)
        at = split_point(messages, int(window.input_budget * KEEP_SHARE))
        if at == 0:
            raise ContextFull(
                f"the request is about {tokens} tokens, over {agent.compact_at:.0%} of the "
                f"{window.input_budget} the model's window of {window.tokens} leaves for input, and "
                "there is nothing older to summarise; send a shorter message, or set a larger "
                "context_window if the model has one"
            )
        covers = messages[at - 1].seq
        self._emit(
            step.step_id,
            compaction_started=common_pb2.CompactionStarted(
                tokens=tokens, context_window=window.tokens, covers_to_seq=covers
            ),
        )
        limit = int(window.input_budget * 0.9 - len(COMPACTION_PROMPT) / 4) * 4
        text = transcript(record, messages[:at], max(limit, 1_000))
        request = ProviderRequest(
            model=agent.model,
            system=COMPACTION_PROMPT,
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, chunks=text_chunks(text))],
            tools_disabled=True,
            omit_tools=True,
        )
        pieces: list[str] = []
        try:
            async with contextlib.aclosing(self._stream_with_retries(step, request)) as events:
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        pieces.append(ev.text)
        except (ProviderError, RetryBudgetSpent) as exc:
            raise ContextFull(
                f"the conversation needed compacting (about {tokens} tokens for a window of "
                f"{window.tokens}) and the summary request failed: {exc}; send the message again "
                "to retry, or start a new conversation"
            ) from None
        summary = "".join(pieces).strip()
        if not summary:
            raise ContextFull("the conversation needed compacting and the model's summary was empty")
        made = common_pb2.Message(
            role=common_pb2.ROLE_SYSTEM,
            turn_id=self.turn.id,
            step_index=step.index,
            chunks=text_chunks(summary),
        )
        made.compaction.covers_to_seq = covers
        made.compaction.model = agent.model
        made.compaction.tokens_before = tokens
        self._gauge = Gauge(window)  # the requests change shape: estimate them whole again
        probe = [*history, made]
        after, shown = self._request(probe, None)
        made.compaction.tokens_after = self._gauge.before(after, shown)
        committed = await self._append([made])
        self._emit(
            step.step_id,
            compaction_done=common_pb2.CompactionDone(
                tokens_before=tokens,
                tokens_after=made.compaction.tokens_after,
                covers_to_seq=covers,
                summary_seq=committed.last_seq,
                model=agent.model,
            ),
        )
        return list(committed.messages)

    async def _decide(
        self,
        step: StepState,
        history: Sequence[common_pb2.Message],
        dispatcher: StepDispatcher,
        approvals: Sequence[common_pb2.Approval] | None = None,
    ) -> None:
        """The calls of ``step`` that wait for approval: asked for (committed with the step's
        assistant message, the turn waiting), then run or answered as each is decided. A
        recovered turn passes the ``approvals`` it found instead of asking again."""
        asking = StepApprovals(
            self.deps.approvals,
            self.deps.store,
            self.writer,
            step_id=step.step_id,
            timeout=self.agent.approval_timeout,
            rpc_timeout=self.deps.rpc_timeout,
            emit=self._emit,
        )
        recovered = approvals is not None
        if approvals is None:
            # A recovered turn's note, told with this step and not committed yet, goes first.
            first = [m for m in history[-1:] if m.role == common_pb2.ROLE_SYSTEM and not m.seq]
            message = step.assistant_message(self.turn.id, with_calls=True)
            resp, approvals = await asking.ask([*first, *([message] if message else [])], step.asks)
            step.assistant_committed = True
            step.committed = list(resp.messages)
            if resp.last_seq:
                self._last_seq = resp.last_seq
                self._committed(resp.first_seq, resp.last_seq)
        calls = {c.id: c for c in step.calls}
        async for decided in asking.decisions(approvals, announce=recovered):
            call = calls.get(decided.tool_call_id)
            if call is None:
                continue
            if decided.decision in RUNS:
                if decided.decision == common_pb2.APPROVAL_DECISION_EDIT:
                    call = ToolCall(call.id, call.name, decided.edited_input_json)
                    step.edited[call.id] = decided.edited_input_json
                if decided.remember:
                    subject = self._permissions.decide(call.name, call.input_json).subject
                    self._permissions.remember(remembered_rule(call.name, subject))
                self._submit_allowed(step, call, dispatcher)
            else:
                self._record_result(step, call, ToolResult(why_not_run(decided), is_error=True), 0.0)
        # Every call is decided: what runs now, runs with the turn resuming.
        await self._resumed()

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
        """Hand ``call`` to the dispatcher, unless a rule refuses it (an error result naming
        the rule) or asks about it (it waits for a decision: ``_decide``), or a limit refuses
        it (an error result)."""
        decision = self._permissions.decide(call.name, call.input_json)
        if decision.action == DENY:
            rule = decision.rule.describe() if decision.rule is not None else "a rule"
            self._record_result(
                step, call, ToolResult(f"not run: denied by the rule {rule}", is_error=True), 0.0
            )
            return
        if decision.action == ASK:
            rule = decision.rule.describe() if decision.rule is not None else "a rule"
            step.asks.append((call, rule))
            return
        self._submit_allowed(step, call, dispatcher)

    def _submit_allowed(self, step: StepState, call: ToolCall, dispatcher: StepDispatcher) -> None:
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
            self.events.release()  # tokens are never held (a model writing after a call)
            self._emit(sid, text_delta={"text": ev.text})  # filled in place, not copied
        elif isinstance(ev, ReasoningDelta):
            if not step.thinking or step.thinking[-1][1]:  # none yet, or the last one is signed
                step.thinking.append(([], ""))
            pieces, _ = step.thinking[-1]
            if ev.text:
                pieces.append(ev.text)
                self.events.release()
                self._emit(sid, reasoning_delta={"text": ev.text})
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
            # A quick tool's call, start and result and the step's commit leave together, in
            # one message instead of two; a slow tool's are seen at most HOLD_CAP later.
            self.events.hold()
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
            tool_output=lambda tool_call_id: find_tool_output(self._history, tool_call_id),
            output_budget=self.agent.tool_output_chars,
        )
        return await tool.run(ctx, call.input_json)

    def _add_usage(self, usage: Usage) -> None:
        self._usage.input_tokens += usage.input_tokens
        self._usage.output_tokens += usage.output_tokens
        self._usage.cache_read_tokens += usage.cache_read_tokens
        self._usage.cache_write_tokens += usage.cache_write_tokens
        self._usage.reasoning_tokens += usage.reasoning_tokens
