"""Messages sent while a turn runs: queued durably, injected as steering at the next
tool-result boundary, or starting the next turn right after the seal; and run slots
(max_concurrent_turns), with turns beyond them waiting in FIFO order."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from dispatch.kernel.providers.openai import OpenAIProvider
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import ProviderConfig
from dispatch.v1 import common_pb2, kernel_pb2, store_pb2
from tests.fakes.openai_server import FakeOpenAI, Stream, text_chunks
from tests.stack import TENANT, Stack, collect, kinds
from tests.stack import text_chunks as user_text


async def send(stack: Stack, conv: str, text: str, key: str = "") -> kernel_pb2.StartTurnResponse:
    return await stack.kernel.StartTurn(
        kernel_pb2.StartTurnRequest(
            tenant_id=TENANT, conversation_id=conv, chunks=user_text(text), idempotency_key=key
        )
    )


def watch(
    stack: Stack, conv: str, after: int, sink: list[common_pb2.AgentEvent], until_turn: str = ""
) -> asyncio.Task[Any]:
    return asyncio.create_task(collect(stack, conv, after, until_turn=until_turn, sink=sink))


async def follow(stack: Stack, conv: str, after: int, sink: list[common_pb2.AgentEvent]) -> None:
    """Every event after ``after``, into ``sink``, until cancelled."""
    stream = stack.kernel.Subscribe(
        kernel_pb2.KernelSubscribeRequest(tenant_id=TENANT, conversation_id=conv, after_event_seq=after)
    )
    async for batch in stream:
        sink.extend(batch.events)


async def until(events: list[common_pb2.AgentEvent], kind: str, count: int = 1) -> None:
    while kinds(events).count(kind) < count:
        await asyncio.sleep(0.01)


async def test_a_message_sent_during_a_tool_is_injected_as_steering_at_the_boundary(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "shell", "arguments": '{"command": "sleep 0.5"}'}}
    fake_openai.replies += [
        Stream([{"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]}]),
        Stream(text_chunks("Checked both.")),
    ]
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(provider)
    conv = await stack.conversation()
    first = await send(stack, conv, "run it")
    events: list[common_pb2.AgentEvent] = []
    watcher = watch(stack, conv, first.after_event_seq, events, until_turn=first.turn_id)
    await until(events, "tool_call")
    queued = await send(stack, conv, "also check the logs")
    assert (queued.queued, queued.turn_id) == (True, first.turn_id)
    await asyncio.wait_for(watcher, 20)

    [steering] = [e for e in events if e.HasField("steering_injected")]
    assert steering.steering_injected.step_index == 1
    assert steering.step_id == f"{first.turn_id}#1"
    # After the tool result, before the step that took it.
    order = kinds(events)
    assert order.index("tool_result") < order.index("steering_injected") < order.index("text_delta")
    roles = [m["role"] for m in fake_openai.requests[1]["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert fake_openai.requests[1]["messages"][-1]["content"] == "also check the logs"
    # Committed in the turn, with the seq the event names; no second turn was started.
    history = await stack.store.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv))
    injected = [m for m in history.messages if m.seq in steering.steering_injected.message_seqs]
    assert [(m.role, m.turn_id, m.chunks[0].text.text) for m in injected] == [
        (common_pb2.ROLE_USER, first.turn_id, "also check the logs")
    ]
    assert len(fake_openai.requests) == 2
    turns = await stack.store.ListTurns(store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv))
    assert [t.id for t in turns.turns] == [first.turn_id]


async def test_a_message_queued_behind_a_turn_without_tool_calls_starts_the_next_turn_after_the_seal(
    make_stack: Any,
) -> None:
    provider = ScriptedProvider.from_data(
        {
            "turns": [
                {
                    "steps": [
                        [{"type": "sleep", "seconds": 0.3}, {"type": "text_delta", "text": "first answer"}]
                    ]
                },
                {"steps": [[{"type": "text_delta", "text": "second answer"}]]},
            ]
        }
    )
    stack = await make_stack(provider)
    conv = await stack.conversation()
    first = await send(stack, conv, "one")
    events: list[common_pb2.AgentEvent] = []
    watcher = asyncio.create_task(follow(stack, conv, first.after_event_seq, events))
    await until(events, "turn_started")
    queued = await send(stack, conv, "two", key="k-two")
    again = await send(stack, conv, "two", key="k-two")  # a retried send: queued once
    assert queued.queued and again.queued
    await until(events, "turn_sealed", 2)
    watcher.cancel()
    sealed = [e for e in events if e.HasField("turn_sealed")]
    second_turn = sealed[1].turn_id
    assert second_turn != first.turn_id
    # The second turn starts only after the first is sealed.
    assert (
        kinds(events).index("turn_sealed")
        < [i for i, e in enumerate(events) if e.HasField("turn_started")][1]
    )
    history = await stack.store.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv))
    users = [(m.turn_id, m.chunks[0].text.text) for m in history.messages if m.role == common_pb2.ROLE_USER]
    assert users == [(first.turn_id, "one"), (second_turn, "two")]
    texts = "".join(
        e.text_delta.text for e in events if e.HasField("text_delta") and e.turn_id == second_turn
    )
    assert texts == "second answer"


async def test_turns_beyond_the_run_slots_wait_queued_in_fifo_order(make_stack: Any) -> None:
    provider = ScriptedProvider.from_data(
        {"steps": [[{"type": "sleep", "seconds": 0.3}, {"type": "text_delta", "text": "done"}]]}
    )
    stack = await make_stack(provider, max_concurrent_turns=1)
    convs = [await stack.conversation() for _ in range(3)]
    started = [await send(stack, c, "go") for c in convs]
    assert [s.state for s in started] == [
        common_pb2.TURN_STATE_RUNNING,
        common_pb2.TURN_STATE_QUEUED,
        common_pb2.TURN_STATE_QUEUED,
    ]
    row = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=started[2].turn_id))
    assert row.state == common_pb2.TURN_STATE_QUEUED
    sinks: list[list[common_pb2.AgentEvent]] = [[], [], []]
    watchers = [
        watch(stack, c, s.after_event_seq, sink, until_turn=s.turn_id)
        for c, s, sink in zip(convs, started, sinks, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*watchers), 20)
    rows = [
        await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=s.turn_id))
        for s in started
    ]
    assert all(r.state == common_pb2.TURN_STATE_COMPLETED for r in rows)
    # One at a time, in the order they were sent: each starts after the one before ended.
    for before, after in itertools.pairwise(rows):
        assert after.started_at.ToNanoseconds() >= before.ended_at.ToNanoseconds()


async def test_cancelling_a_queued_turn_seals_it_aborted_without_running_it(make_stack: Any) -> None:
    provider = ScriptedProvider.from_data(
        {"steps": [[{"type": "sleep", "seconds": 30}, {"type": "text_delta", "text": "late"}]]}
    )
    stack = await make_stack(provider, max_concurrent_turns=1)
    busy, waiting = await stack.conversation(), await stack.conversation()
    running = await send(stack, busy, "hog the slot")
    queued = await send(stack, waiting, "wait")
    assert queued.state == common_pb2.TURN_STATE_QUEUED
    events: list[common_pb2.AgentEvent] = []
    watcher = watch(stack, waiting, queued.after_event_seq, events, until_turn=queued.turn_id)
    await stack.kernel.Cancel(kernel_pb2.KernelCancelRequest(tenant_id=TENANT, conversation_id=waiting))
    await asyncio.wait_for(watcher, 10)
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    assert (done.finish_reason, done.steps) == (common_pb2.FINISH_REASON_ABORTED, 0)
    assert events[-1].turn_sealed.state == common_pb2.TURN_STATE_ABORTED
    # The running turn still holds its slot, untouched.
    row = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=running.turn_id))
    assert row.state == common_pb2.TURN_STATE_RUNNING
    await stack.kernel.Cancel(kernel_pb2.KernelCancelRequest(tenant_id=TENANT, conversation_id=busy))


async def test_a_send_repeated_with_its_idempotency_key_joins_the_turn_it_started(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.replies += [Stream(text_chunks("warm")), Stream(text_chunks("only", " once"))]
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(provider)
    conv = await stack.conversation()
    warm = await send(stack, conv, "warm up")  # an earlier turn, so the second starts mid-log
    await watch(stack, conv, warm.after_event_seq, [], until_turn=warm.turn_id)
    first = await send(stack, conv, "do it", key="k-1")
    assert not first.queued
    events: list[common_pb2.AgentEvent] = []
    await watch(stack, conv, first.after_event_seq, events, until_turn=first.turn_id)
    again = await send(stack, conv, "do it", key="k-1")
    assert (again.turn_id, again.queued) == (first.turn_id, False)
    assert again.state == common_pb2.TURN_STATE_COMPLETED
    # Subscribing from its after_event_seq replays exactly that turn, from turn_started.
    replay: list[common_pb2.AgentEvent] = []
    await watch(stack, conv, again.after_event_seq, replay, until_turn=first.turn_id)
    assert replay[0].HasField("turn_started") and replay[0].turn_id == first.turn_id
    assert [e.event_seq for e in replay] == [e.event_seq for e in events]
    # The model answered the turn once; the repeat started nothing.
    assert len(fake_openai.requests) == 2
    turns = await stack.store.ListTurns(store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv))
    assert len(turns.turns) == 2
