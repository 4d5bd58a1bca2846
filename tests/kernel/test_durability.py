"""Durable turns in one process: leases, recovery by another kernel, lost leases, bounded
attempts, handover on drain, event numbers that never lie.

Two ``Kernel`` objects share one real store and exec service. A "crash" here stops a
kernel's tasks where they are without another write (what kill -9 leaves); the real
kill -9 of real processes is in tests/faults/.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispatch.kernel.agents import build_agents
from dispatch.kernel.kernel import Kernel
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.kernel.tools import BUILTIN_TOOLS
from dispatch.kernel.turn import TurnDeps
from dispatch.shared.config import KernelConfig, StoreConfig
from dispatch.store.server import start as start_store
from dispatch.v1 import common_pb2, exec_pb2_grpc, store_pb2
from tests.stack import TENANT, Stack, start_stack, text_chunks

LEASE_TTL = 0.6
SWEEP = 0.1
# The stack's own kernel does not sweep during a test (its sweep would race the test's
# kernels for a turn whose lease expired).
QUIET = 3600.0


def script(*steps: list[dict[str, Any]]) -> ScriptedProvider:
    return ScriptedProvider.from_data({"steps": list(steps)})


# Three steps: a call, a slow call, an answer; time to crash in each.
THREE_STEPS = script(
    [{"type": "tool_call", "id": "a", "name": "list_dir", "input": {}}],
    [
        {"type": "text_delta", "text": "looking again"},
        {"type": "sleep", "seconds": 0.4},
        {"type": "tool_call", "id": "b", "name": "list_dir", "input": {}},
    ],
    [{"type": "sleep", "seconds": 0.2}, {"type": "text_delta", "text": "done"}],
)


def kernel_on(stack: Stack, provider: ScriptedProvider, **deps: Any) -> Kernel:
    """A kernel of the test's own on the stack's store and exec (not started)."""
    agents, _ = build_agents(KernelConfig(), BUILTIN_TOOLS, provider)
    options = {"lease_ttl": LEASE_TTL, "sweep_interval": SWEEP, **deps}
    return Kernel(
        TurnDeps(
            store=stack.store, exec=exec_pb2_grpc.ExecStub(stack.channel("exec")), agents=agents, **options
        )
    )


async def crash(kernel: Kernel) -> None:
    """What kill -9 leaves: the kernel's work stops where it is, and nothing more is written."""
    await kernel.recovery.close()
    await kernel.leases.close()
    tasks = list(kernel._tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(params=["sqlite", "postgres"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    # Both backends: the store decides who holds a lease, and what a fence lets through.
    url = str(request.getfixturevalue("postgres_url")) if request.param == "postgres" else ""
    s = await start_stack(tmp_path, THREE_STEPS, database_url=url, sweep_interval=QUIET)
    yield s
    await s.stop()


@pytest.fixture
async def kernels() -> AsyncIterator[list[Kernel]]:
    """The test's kernels, crashed at its end (before the stack stops: fixtures unwind in order)."""
    made: list[Kernel] = []
    yield made
    for kernel in made:
        await crash(kernel)


class Watcher:
    """Every event a live subscriber of ``kernel`` received, in order."""

    def __init__(self, kernel: Kernel, conversation_id: str, after: int = 0):
        self.events: list[common_pb2.AgentEvent] = []
        self._task = asyncio.create_task(self._watch(kernel, conversation_id, after))

    async def _watch(self, kernel: Kernel, conversation_id: str, after: int) -> None:
        with contextlib.suppress(Exception):
            async with contextlib.aclosing(kernel.subscribe(TENANT, conversation_id, after)) as stream:
                async for batch in stream:
                    self.events.extend(batch)

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("kind")) for e in self.events]

    async def until(self, kind: str, count: int = 1, within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            while self.kinds().count(kind) < count:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def start(kernel: Kernel, conv: str, text: str = "go") -> str:
    started = await kernel.start_turn(TENANT, conv, text_chunks(text), common_pb2.SEND_POLICY_UNSPECIFIED, "")
    return started.turn_id


async def turn_of(stack: Stack, turn_id: str) -> common_pb2.Turn:
    return await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn_id))


async def sealed(stack: Stack, turn_id: str, within: float = 20.0) -> common_pb2.Turn:
    """The turn once it has ended; a store that is back from a stop may refuse a moment
    (grpc's reconnect back-off), which is waited out too."""
    async with asyncio.timeout(within):
        while True:
            try:
                turn = await turn_of(stack, turn_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            else:
                if turn.ended_at.seconds or turn.ended_at.nanos:
                    return turn
            await asyncio.sleep(0.05)


async def history(stack: Stack, conv: str) -> list[common_pb2.Message]:
    return list(
        (await stack.store.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv))).messages
    )


async def persisted_events(stack: Stack, conv: str) -> list[common_pb2.AgentEvent]:
    resp = await stack.store.LoadEvents(store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv))
    return list(resp.events)


def no_number_lies(seen: Sequence[common_pb2.AgentEvent], persisted: Sequence[common_pb2.AgentEvent]) -> int:
    """Every event seen live is persisted as seen under its event_seq, or its number was
    announced lost; answers how many were announced lost."""
    by_seq = {e.event_seq: e for e in persisted}
    lost = [
        (e.events_lost.first_event_seq, e.events_lost.last_event_seq)
        for e in persisted
        if e.HasField("events_lost")
    ]
    announced = 0
    for event in seen:
        if any(first <= event.event_seq <= last for first, last in lost):
            assert event.event_seq not in by_seq, f"event_seq {event.event_seq} announced lost, then used"
            announced += 1
            continue
        assert by_seq.get(event.event_seq) == event, f"event_seq {event.event_seq} names another event now"
    seqs = [e.event_seq for e in persisted]
    assert seqs == sorted(set(seqs)), "persisted event_seqs repeat or go back"
    return announced


def no_dangling_calls(messages: Sequence[common_pb2.Message]) -> None:
    calls = {c.tool_call.id for m in messages for c in m.chunks if c.HasField("tool_call")}
    results = {c.tool_result.tool_call_id for m in messages for c in m.chunks if c.HasField("tool_result")}
    assert calls <= results, f"tool calls without a result: {calls - results}"


async def test_a_running_turn_is_leased_to_its_kernel_and_released_when_sealed(
    stack: Stack, kernels: list[Kernel]
) -> None:
    kernel = kernel_on(stack, THREE_STEPS)
    kernels.append(kernel)
    await kernel.start()
    conv = await stack.conversation()
    watcher = Watcher(kernel, conv)
    turn_id = await start(kernel, conv)
    await watcher.until("tool_result")
    running = await turn_of(stack, turn_id)
    assert (running.lease_owner, running.attempts, running.lease_epoch) == (kernel.owner, 1, 1)
    first_expiry = running.lease_expires_at.ToNanoseconds()
    await watcher.until("tool_result", 2)  # past a beat of the lease keeper (ttl / 3)
    assert (await turn_of(stack, turn_id)).lease_expires_at.ToNanoseconds() > first_expiry
    done = await sealed(stack, turn_id)
    assert (done.state, done.lease_owner) == (common_pb2.TURN_STATE_COMPLETED, "")
    conversation = await stack.store.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv)
    )
    # Sealed: nothing reserved past what is persisted, so a later load continues with no gap.
    assert conversation.reserved_event_seq == conversation.last_event_seq
    await watcher.stop()


async def test_a_crashed_kernels_turn_continues_on_another_from_its_last_committed_step(
    stack: Stack, kernels: list[Kernel]
) -> None:
    a = kernel_on(stack, THREE_STEPS)
    b = kernel_on(stack, THREE_STEPS)
    kernels += [a, b]
    await a.start()
    conv = await stack.conversation()
    watcher = Watcher(a, conv)
    turn_id = await start(a, conv)
    # Step 0 committed; step 1 streams (its text seen live, not yet persisted): crash.
    await watcher.until("step_completed")
    await watcher.until("text_delta")
    await crash(a)
    await watcher.stop()
    await b.start()
    done = await sealed(stack, turn_id)
    assert (done.state, done.attempts, done.lease_epoch) == (common_pb2.TURN_STATE_COMPLETED, 2, 2)
    messages = await history(stack, conv)
    no_dangling_calls(messages)
    steps = [(m.role, m.step_index) for m in messages if m.role != common_pb2.ROLE_USER]
    # Step 0 once (committed before the crash), the note, then steps 1 and 2.
    assert steps == [
        (common_pb2.ROLE_ASSISTANT, 0),
        (common_pb2.ROLE_TOOL, 0),
        (common_pb2.ROLE_SYSTEM, 1),
        (common_pb2.ROLE_ASSISTANT, 1),
        (common_pb2.ROLE_TOOL, 1),
        (common_pb2.ROLE_ASSISTANT, 2),
    ]
    note = next(m for m in messages if m.role == common_pb2.ROLE_SYSTEM).chunks[0].text.text
    assert "interrupted" in note and "may or may not" in note
    assert {c.tool_call.step_id for m in messages for c in m.chunks if c.HasField("tool_call")} == {
        f"{turn_id}#0",
        f"{turn_id}#1",
    }
    persisted = await persisted_events(stack, conv)
    resumed = next(e.turn_resumed for e in persisted if e.HasField("turn_resumed"))
    assert (resumed.attempt, resumed.from_step_index) == (2, 1)
    # What the subscriber saw of step 1 before the crash was announced lost, not reused.
    assert no_number_lies(watcher.events, persisted) >= 1
    assert any(e.HasField("events_lost") for e in persisted)
    # The conversation takes its next message.
    assert (await sealed(stack, await start(b, conv, "and now?"))).state == common_pb2.TURN_STATE_COMPLETED


SLOW_STEP = script(
    [{"type": "tool_call", "id": "a", "name": "list_dir", "input": {}}],
    [
        {"type": "text_delta", "text": "looking again"},
        {"type": "sleep", "seconds": 3 * LEASE_TTL},
        {"type": "tool_call", "id": "b", "name": "list_dir", "input": {}},
    ],
    [{"type": "text_delta", "text": "done"}],
)


async def test_a_kernel_that_lost_its_lease_writes_nothing_more_into_the_turn(
    stack: Stack, kernels: list[Kernel]
) -> None:
    a = kernel_on(stack, SLOW_STEP)
    b = kernel_on(stack, SLOW_STEP)
    kernels += [a, b]
    await a.start()
    conv = await stack.conversation()
    watcher = Watcher(a, conv)
    turn_id = await start(a, conv)
    await watcher.until("tool_result")
    # A's renewals stop (as if it were cut off from the store) while its turn goes on: it
    # stops running the step itself, before its lease runs out; then B takes the turn over.
    await a.leases.close()
    await b.start()
    done = await sealed(stack, turn_id)
    assert done.attempts == 2 and done.state == common_pb2.TURN_STATE_COMPLETED
    # A gets through to the store again: it learns the lease is gone, and stops for good.
    a.leases.start()
    async with asyncio.timeout(10):
        while a._tasks:
            await asyncio.sleep(0.05)
    messages = await history(stack, conv)
    no_dangling_calls(messages)
    # Each step's answer is in history once: A's writes after the takeover were refused.
    for index in (0, 1, 2):
        assert [m.step_index for m in messages if m.role == common_pb2.ROLE_ASSISTANT].count(index) == 1
    sealed_events = [e for e in await persisted_events(stack, conv) if e.HasField("turn_sealed")]
    assert len(sealed_events) == 1
    await watcher.stop()


async def test_attempts_are_bounded_and_the_last_ends_the_turn_interrupted_and_sealed(
    stack: Stack, kernels: list[Kernel]
) -> None:
    a = kernel_on(stack, THREE_STEPS, max_attempts=1)
    b = kernel_on(stack, THREE_STEPS, max_attempts=1)
    kernels += [a, b]
    await a.start()
    conv = await stack.conversation()
    watcher = Watcher(a, conv)
    turn_id = await start(a, conv)
    # Past the first step's commit (which takes what is queued as steering): a message
    # queued now waits behind the turn, acknowledged, so it must run.
    await watcher.until("step_completed")
    queued = await a.start_turn(TENANT, conv, text_chunks("then this"), common_pb2.SEND_POLICY_ENQUEUE, "")
    assert queued.queued
    await crash(a)
    await watcher.stop()
    await b.start()
    done = await sealed(stack, turn_id)
    assert (done.state, done.finish_reason) == (
        common_pb2.TURN_STATE_INTERRUPTED,
        common_pb2.FINISH_REASON_INTERRUPTED,
    )
    assert "no attempt left" in done.error_message
    persisted = await persisted_events(stack, conv)
    interrupted = next(e.turn_interrupted for e in persisted if e.HasField("turn_interrupted"))
    assert not interrupted.resumable
    kinds_of_turn = [e.WhichOneof("kind") for e in persisted if e.turn_id == turn_id]
    assert kinds_of_turn[-2:] == ["turn_done", "turn_sealed"]
    # The queued message started the next turn in the commit that sealed this one.
    turns = (
        await stack.store.ListTurns(store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv))
    ).turns
    assert len(turns) == 2
    nxt = await sealed(stack, turns[1].id)
    assert nxt.state == common_pb2.TURN_STATE_COMPLETED
    users = [m for m in await history(stack, conv) if m.role == common_pb2.ROLE_USER]
    assert [m.chunks[0].text.text for m in users] == ["go", "then this"]


async def test_drain_hands_a_turn_over_at_a_step_boundary_and_another_kernel_continues_at_once(
    stack: Stack, kernels: list[Kernel]
) -> None:
    # A lease far longer than the test: only the handover lets B take the turn.
    a = kernel_on(stack, THREE_STEPS, lease_ttl=600.0)
    b = kernel_on(stack, THREE_STEPS, lease_ttl=600.0)
    kernels += [a, b]
    await a.start()
    await b.start()
    conv = await stack.conversation()
    watcher = Watcher(a, conv)
    turn_id = await start(a, conv)
    await watcher.until("text_delta")  # step 1 is streaming; its boundary comes after its tool
    await a.drain(grace=10.0)
    assert "turn_interrupted" in watcher.kinds()
    done = await sealed(stack, turn_id)
    assert (done.state, done.attempts) == (common_pb2.TURN_STATE_COMPLETED, 2)
    messages = await history(stack, conv)
    # Handed over after step 1 was committed: no step ran twice, and no note was needed.
    assert not any(m.role == common_pb2.ROLE_SYSTEM for m in messages)
    assert [m.step_index for m in messages if m.role == common_pb2.ROLE_ASSISTANT] == [0, 1, 2]
    persisted = await persisted_events(stack, conv)
    interrupted = next(e.turn_interrupted for e in persisted if e.HasField("turn_interrupted"))
    assert interrupted.resumable and "at a step boundary" in interrupted.reason
    assert no_number_lies(watcher.events, persisted) == 0
    await watcher.stop()


async def test_a_message_queued_while_no_kernel_runs_the_turn_runs_when_one_does(
    stack: Stack, kernels: list[Kernel]
) -> None:
    a = kernel_on(stack, THREE_STEPS)
    b = kernel_on(stack, THREE_STEPS)
    kernels += [a, b]
    await a.start()
    conv = await stack.conversation()
    watcher = Watcher(a, conv)
    turn_id = await start(a, conv)
    await watcher.until("tool_result")
    await crash(a)
    await watcher.stop()
    # B is not sweeping yet: the turn is in flight with nobody running it. A send queues.
    queued = await b.start_turn(
        TENANT, conv, text_chunks("while nobody runs it"), common_pb2.SEND_POLICY_UNSPECIFIED, ""
    )
    assert queued.queued and queued.turn_id == turn_id
    await b.start()
    await sealed(stack, turn_id)
    async with asyncio.timeout(20):
        while True:
            users = [m for m in await history(stack, conv) if m.role == common_pb2.ROLE_USER]
            if any(m.chunks[0].text.text == "while nobody runs it" for m in users):
                break
            await asyncio.sleep(0.05)
    turns = (
        await stack.store.ListTurns(store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv))
    ).turns
    for turn in turns:
        assert (await sealed(stack, turn.id)).state == common_pb2.TURN_STATE_COMPLETED


async def test_a_kernel_with_an_old_view_of_the_conversation_numbers_after_what_another_wrote(
    stack: Stack, kernels: list[Kernel]
) -> None:
    a = kernel_on(stack, THREE_STEPS)
    b = kernel_on(stack, THREE_STEPS)
    kernels += [a, b]
    await a.start()
    await b.start()
    conv = await stack.conversation()
    # B loads the conversation (a subscriber through B), then A runs a whole turn of it.
    watcher = Watcher(b, conv)
    while conv not in b._logs:
        await asyncio.sleep(0.01)
    first = await start(a, conv)
    await sealed(stack, first)
    # Now B starts the next turn: its numbering continues after A's, with no gap and no clash.
    second = await start(b, conv, "again")
    assert (await sealed(stack, second)).state == common_pb2.TURN_STATE_COMPLETED
    persisted = await persisted_events(stack, conv)
    seqs = [e.event_seq for e in persisted]
    assert seqs == list(range(1, len(seqs) + 1))
    assert not any(e.HasField("events_lost") for e in persisted)
    assert {e.turn_id for e in persisted} == {first, second}
    await watcher.stop()


LONG_STREAM = script(
    [{"type": "tool_call", "id": "a", "name": "list_dir", "input": {}}],
    [
        {"type": "text_delta", "text": "thinking"},
        {"type": "sleep", "seconds": 4.0},
        {"type": "text_delta", "text": "ok"},
    ],
    [{"type": "text_delta", "text": "done"}],
)


async def test_a_kernel_cut_off_from_the_store_stops_its_turn_before_the_lease_can_expire(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    # The store is stopped and started again on its port and file: SQLite only.
    stack = await start_stack(tmp_path, THREE_STEPS, sweep_interval=QUIET)
    try:
        await _cut_off(stack, kernels, tmp_path)
    finally:
        await stack.stop()


async def _cut_off(stack: Stack, kernels: list[Kernel], tmp_path: Path) -> None:
    a = kernel_on(stack, LONG_STREAM, lease_ttl=1.0, store_outage=30.0)
    kernels.append(a)
    await a.start()
    conv = await stack.conversation()
    watcher = Watcher(a, conv)
    turn_id = await start(a, conv)
    await watcher.until("text_delta")  # step 1 streams, for seconds
    port = stack.hosted["store"].port
    await stack.hosted["store"].stop(0)
    # Renewals fail; before the lease can run out in the store, A stops running the step
    # (its provider call is cut) and waits for the store.
    await asyncio.sleep(2.5)
    runner = next(iter(a._active.values())).runner
    assert runner._step_task is None or runner._step_task.done()
    stack.hosted["store"] = await start_store(
        StoreConfig(
            listen=f"127.0.0.1:{port}",
            database_url=f"sqlite:///{tmp_path / 'store.db'}",
            default_workspace_root=str(tmp_path),
        )
    )
    # The store answers, the renewal says the lease held (nobody could claim it): the turn
    # goes on, here, and runs the cut step again with the model told.
    done = await sealed(stack, turn_id, within=30)
    assert (done.state, done.attempts) == (common_pb2.TURN_STATE_COMPLETED, 1)
    messages = await history(stack, conv)
    no_dangling_calls(messages)
    steps = [(m.role, m.step_index) for m in messages if m.role != common_pb2.ROLE_USER]
    assert steps[2] == (common_pb2.ROLE_SYSTEM, 1)
    assert "the store was unreachable" in messages[3].chunks[0].text.text
    # Step 1 (text only, it ends the turn) ran once more after the note, and only that.
    assert [m.step_index for m in messages if m.role == common_pb2.ROLE_ASSISTANT] == [0, 1]
    assert messages[-1].chunks[-1].text.text == "thinkingok"  # the whole step, run again
    await watcher.stop()
