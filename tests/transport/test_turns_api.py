"""GetTurn and ListTurns on the public API, over the in-process stack: a turn's state,
attempts, lease owner and finish reason, tenant-scoped and validated.

Attempts and the lease owner are whatever the store holds (the kernel sets them): the
tests read the store back rather than assume a value."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.v1 import common_pb2, store_pb2, transport_pb2, transport_pb2_grpc
from tests.stack import TENANT, Stack, start_stack

S = common_pb2
# A conversation's first two turns answer at once; from the third on, a turn runs until
# it is cancelled.
SCRIPT = {
    "turns": [
        {"steps": [[{"type": "text_delta", "text": "one"}]]},
        {"steps": [[{"type": "text_delta", "text": "two"}]]},
        {"steps": [[{"type": "text_delta", "text": "thinking"}, {"type": "sleep", "seconds": 60}]]},
    ]
}
MISSING_CONV = "conv_00000000000000000000000000"
MISSING_TURN = "turn_00000000000000000000000000"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, ScriptedProvider.from_data(SCRIPT), transport=True)
    yield s
    await s.stop()


async def send(api: transport_pb2_grpc.DispatchAsyncStub, conv: str, text: str, *, until: str) -> str:
    """Send ``text``; return the id of the turn that takes it once its events reach ``until``
    (an event kind)."""
    sent = await api.Send(transport_pb2.SendRequest(conversation_id=conv, text=text))
    # Sent just after the last turn's seal, the message may be queued behind that turn
    # (``sent`` names it) and start the next one.
    turn_id = "" if sent.queued else sent.turn_id
    stream = api.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv, after_event_seq=sent.after_event_seq)
    )
    async for response in stream:
        for e in response.events:
            if not turn_id and e.HasField("turn_started") and e.turn_id != sent.turn_id:
                turn_id = e.turn_id
            if turn_id and e.turn_id == turn_id and e.WhichOneof("kind") == until:
                stream.cancel()
                return turn_id
    raise AssertionError(f"the stream ended before {until}")


async def three_turns(stack: Stack) -> tuple[str, list[str]]:
    """A conversation with two completed turns and a third that is running."""
    api = stack.transport
    conv = (await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    first = await send(api, conv, "1", until="turn_sealed")
    second = await send(api, conv, "2", until="turn_sealed")
    third = await send(api, conv, "3", until="text_delta")
    return conv, [first, second, third]


async def stored(stack: Stack, turn_id: str) -> common_pb2.Turn:
    return await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn_id))


async def get(stack: Stack, conv: str, turn_id: str) -> common_pb2.Turn:
    return await stack.transport.GetTurn(
        transport_pb2.PublicGetTurnRequest(conversation_id=conv, turn_id=turn_id)
    )


async def listed(stack: Stack, conv: str, *states: common_pb2.TurnState.ValueType) -> list[str]:
    resp = await stack.transport.ListTurns(
        transport_pb2.PublicListTurnsRequest(conversation_id=conv, states=states)
    )
    assert not resp.next_page_token
    return [t.id for t in resp.turns]


async def test_a_finished_turn_shows_completed_its_finish_reason_times_and_what_the_store_holds(
    stack: Stack,
) -> None:
    api = stack.transport
    conv = (await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    turn_id = await send(api, conv, "hello", until="turn_sealed")
    turn = await get(stack, conv, turn_id)
    assert (turn.id, turn.conversation_id) == (turn_id, conv)
    assert turn.state == S.TURN_STATE_COMPLETED
    assert turn.finish_reason == S.FINISH_REASON_STOP
    assert turn.error_message == ""
    assert turn.HasField("created_at") and turn.HasField("started_at") and turn.HasField("ended_at")
    assert turn.created_at.ToNanoseconds() <= turn.started_at.ToNanoseconds() <= turn.ended_at.ToNanoseconds()
    # Attempts, lease owner and epoch are the kernel's to set: exactly what the store has.
    in_store = await stored(stack, turn_id)
    assert (turn.attempts, turn.lease_owner, turn.lease_epoch) == (
        in_store.attempts,
        in_store.lease_owner,
        in_store.lease_epoch,
    )
    assert turn == in_store
    # Run once, by one kernel, whose lease was released when the turn sealed.
    assert (turn.attempts, turn.lease_owner, turn.lease_epoch) == (1, "", 1)
    # The listing shows the same turn.
    resp = await api.ListTurns(transport_pb2.PublicListTurnsRequest(conversation_id=conv))
    assert list(resp.turns) == [turn]


async def test_a_running_turn_shows_running_then_aborted_once_cancelled(stack: Stack) -> None:
    conv, [_, _, running] = await three_turns(stack)
    turn = await get(stack, conv, running)
    assert turn.state == S.TURN_STATE_RUNNING
    assert turn.finish_reason == S.FINISH_REASON_UNSPECIFIED
    assert turn.HasField("started_at") and not turn.HasField("ended_at")
    in_store = await stored(stack, running)
    assert (turn.attempts, turn.lease_owner) == (in_store.attempts, in_store.lease_owner)
    # Leased to the kernel running it, until a moment from now.
    assert turn.attempts == 1 and turn.lease_owner.startswith("kernel-")
    assert turn.lease_expires_at.ToNanoseconds() > turn.started_at.ToNanoseconds()

    await stack.transport.Cancel(transport_pb2.CancelRequest(conversation_id=conv, turn_id=running))
    stream = stack.transport.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv, until=S.SUBSCRIBE_UNTIL_TURN_SEALED)
    )
    async for _ in stream:
        pass
    turn = await get(stack, conv, running)
    assert (turn.state, turn.finish_reason) == (S.TURN_STATE_ABORTED, S.FINISH_REASON_ABORTED)
    assert turn.HasField("ended_at")


async def test_list_turns_oldest_first_and_filtered_by_state(stack: Stack) -> None:
    conv, [first, second, third] = await three_turns(stack)
    assert await listed(stack, conv) == [first, second, third]
    assert await listed(stack, conv, S.TURN_STATE_COMPLETED) == [first, second]
    assert await listed(stack, conv, S.TURN_STATE_RUNNING) == [third]
    assert await listed(stack, conv, S.TURN_STATE_RUNNING, S.TURN_STATE_COMPLETED) == [first, second, third]
    assert await listed(stack, conv, S.TURN_STATE_FAILED, S.TURN_STATE_QUEUED) == []
    # Another conversation of the same tenant has none of them.
    other = (await stack.transport.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    assert await listed(stack, other) == []


async def test_list_turns_pages(stack: Stack) -> None:
    conv, turns = await three_turns(stack)
    api = stack.transport
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        resp = await api.ListTurns(
            transport_pb2.PublicListTurnsRequest(conversation_id=conv, page_size=2, page_token=token)
        )
        seen += [t.id for t in resp.turns]
        sizes.append(len(resp.turns))
        token = resp.next_page_token
        if not token:
            break
    assert (seen, sizes) == (turns, [2, 1])
    # Paging keeps the filter.
    first = await api.ListTurns(
        transport_pb2.PublicListTurnsRequest(
            conversation_id=conv, states=[S.TURN_STATE_COMPLETED], page_size=1
        )
    )
    assert [t.id for t in first.turns] == turns[:1] and first.next_page_token
    rest = await api.ListTurns(
        transport_pb2.PublicListTurnsRequest(
            conversation_id=conv,
            states=[S.TURN_STATE_COMPLETED],
            page_size=1,
            page_token=first.next_page_token,
        )
    )
    assert [t.id for t in rest.turns] == turns[1:2]
    # A page size past the store's cap is capped, not refused.
    big = await api.ListTurns(transport_pb2.PublicListTurnsRequest(conversation_id=conv, page_size=10_000))
    assert [t.id for t in big.turns] == turns and not big.next_page_token


async def test_another_tenants_or_conversations_turn_is_not_found(stack: Stack) -> None:
    conv, [turn_id, *_] = await three_turns(stack)
    theirs = stack.transport_as(await stack.new_key("other-tenant"))
    their_conv = (await theirs.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    mine_elsewhere = (
        await stack.transport.CreateConversation(transport_pb2.PublicCreateConversationRequest())
    ).id
    calls: list[Awaitable[Any]] = [
        # Our turn, asked for by another tenant: through our conversation or theirs.
        theirs.GetTurn(transport_pb2.PublicGetTurnRequest(conversation_id=conv, turn_id=turn_id)),
        theirs.GetTurn(transport_pb2.PublicGetTurnRequest(conversation_id=their_conv, turn_id=turn_id)),
        theirs.ListTurns(transport_pb2.PublicListTurnsRequest(conversation_id=conv)),
        # Our turn, through another of our conversations.
        stack.transport.GetTurn(
            transport_pb2.PublicGetTurnRequest(conversation_id=mine_elsewhere, turn_id=turn_id)
        ),
        # Well-formed ids of nothing.
        stack.transport.GetTurn(
            transport_pb2.PublicGetTurnRequest(conversation_id=conv, turn_id=MISSING_TURN)
        ),
        stack.transport.ListTurns(transport_pb2.PublicListTurnsRequest(conversation_id=MISSING_CONV)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert "other-tenant" not in (err.value.details() or "")
    # Nor does their conversation list our turns.
    assert not (
        await theirs.ListTurns(transport_pb2.PublicListTurnsRequest(conversation_id=their_conv))
    ).turns
    # And ours is untouched.
    assert (await get(stack, conv, turn_id)).state == S.TURN_STATE_COMPLETED


Call: TypeAlias = "Callable[[transport_pb2_grpc.DispatchAsyncStub, str, str], Awaitable[Any]]"


def _get(conv: str | None = None, turn: str | None = None) -> Call:
    def call(api: transport_pb2_grpc.DispatchAsyncStub, real_conv: str, real_turn: str) -> Awaitable[Any]:
        return api.GetTurn(
            transport_pb2.PublicGetTurnRequest(
                conversation_id=real_conv if conv is None else conv,
                turn_id=real_turn if turn is None else turn,
            )
        )

    return call


def _list(conv: str | None = None, **fields: Any) -> Call:
    def call(api: transport_pb2_grpc.DispatchAsyncStub, real_conv: str, _turn: str) -> Awaitable[Any]:
        return api.ListTurns(
            transport_pb2.PublicListTurnsRequest(
                conversation_id=real_conv if conv is None else conv, **fields
            )
        )

    return call


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (_get(conv=""), "conversation_id is required"),
        (_get(conv="conv_x"), "conversation_id 'conv_x' is malformed"),
        (_get(conv=MISSING_TURN), "is malformed: expected conv_"),
        (_get(turn=""), "turn_id is required"),
        (_get(turn="turn_1"), "turn_id 'turn_1' is malformed"),
        (_get(turn=MISSING_CONV), "is malformed: expected turn_"),
        (_list(conv=""), "conversation_id is required"),
        (_list(conv="../../etc"), "is malformed"),
        (_list(states=[99]), "states: 99 is not a turn state; expected one of TURN_STATE_QUEUED"),
        (_list(states=[S.TURN_STATE_RUNNING, S.TURN_STATE_UNSPECIFIED]), "states: 0 is not a turn state"),
        (_list(page_size=-1), "page_size must be 0 or more"),
        (_list(page_token="not a token"), "page_token"),
    ],
)
async def test_bad_requests_are_invalid_argument(stack: Stack, call: Call, phrase: str) -> None:
    api = stack.transport
    conv = (await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    turn_id = await send(api, conv, "hello", until="turn_sealed")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(api, conv, turn_id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in (err.value.details() or ""), err.value.details()
