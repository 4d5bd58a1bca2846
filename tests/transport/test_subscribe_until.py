"""Subscribe streams that end by themselves: caught up, or when the running turn seals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.v1 import common_pb2, transport_pb2
from tests.stack import Stack, start_stack

UNTIL = common_pb2.SubscribeUntil


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    # Each turn: a tool call, then (after a pause that keeps the turn running a while) an answer.
    provider = ScriptedProvider.from_data(
        {
            "steps": [
                [{"type": "tool_call", "name": "list_dir", "input": {}}],
                [{"type": "sleep", "seconds": 0.3}, {"type": "text_delta", "text": "done"}],
            ]
        }
    )
    s = await start_stack(tmp_path, provider, transport=True)
    yield s
    await s.stop()


async def _all(
    stack: Stack, conv: str, until: UNTIL.ValueType, after: int = 0
) -> list[common_pb2.AgentEvent]:
    """Every event of a bounded subscription; the stream must end by itself (the per-test
    timeout fails a stream that never ends)."""
    events: list[common_pb2.AgentEvent] = []
    call = stack.transport.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv, after_event_seq=after, until=until)
    )
    async for response in call:
        events.extend(response.events)
    assert await call.code() == grpc.StatusCode.OK
    return events


async def _sealed(stack: Stack, conv: str, text: str) -> transport_pb2.SendResponse:
    sent = await stack.transport.Send(transport_pb2.SendRequest(conversation_id=conv, text=text))
    await _all(stack, conv, common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED, sent.after_event_seq)
    return sent


async def test_caught_up_ends_after_the_history_so_far(stack: Stack) -> None:
    conv = (await stack.transport.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    assert await _all(stack, conv, common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP) == []
    await _sealed(stack, conv, "one")
    events = await _all(stack, conv, common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP)
    assert [e.event_seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].HasField("turn_sealed")
    tail = await _all(stack, conv, common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP, after=len(events) - 2)
    assert [e.event_seq for e in tail] == [len(events) - 1, len(events)]


async def test_turn_sealed_follows_the_running_turn_past_earlier_seals(stack: Stack) -> None:
    conv = (await stack.transport.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    first = await _sealed(stack, conv, "one")
    second = await stack.transport.Send(transport_pb2.SendRequest(conversation_id=conv, text="two"))
    # From the very start: the replay passes the first turn's seal and ends at the second's.
    events = await _all(stack, conv, common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED)
    seals = [e.turn_id for e in events if e.HasField("turn_sealed")]
    assert seals == [first.turn_id, second.turn_id]
    assert events[-1].HasField("turn_sealed") and events[-1].turn_id == second.turn_id


async def test_turn_sealed_with_no_turn_running_ends_caught_up(stack: Stack) -> None:
    conv = (await stack.transport.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    sent = await _sealed(stack, conv, "one")
    events = await _all(stack, conv, common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED)
    assert events[-1].HasField("turn_sealed") and events[-1].turn_id == sent.turn_id


async def test_a_follow_stream_keeps_going_past_the_seal(stack: Stack) -> None:
    conv = (await stack.transport.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    await _sealed(stack, conv, "one")
    call = stack.transport.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv))
    seen: list[common_pb2.AgentEvent] = []
    async for response in call:
        seen.extend(response.events)
        if seen[-1].HasField("turn_sealed"):
            break
    sent = await stack.transport.Send(transport_pb2.SendRequest(conversation_id=conv, text="two"))
    async for response in call:
        seen.extend(response.events)
        if seen[-1].HasField("turn_sealed"):
            break
    call.cancel()
    assert seen[-1].turn_id == sent.turn_id


async def test_an_unknown_until_is_invalid_argument(stack: Stack) -> None:
    conv = (await stack.transport.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    call = stack.transport.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv, until=99)  # type: ignore[arg-type]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "until must be one of" in (info.value.details() or "")
