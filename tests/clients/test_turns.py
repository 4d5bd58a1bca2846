"""Turns through the SDK: ``get_turn``, ``list_turns`` and ``iter_turns`` on both clients,
against the in-process stack. Attempts and the lease owner are read back from the store
(the kernel sets them), not assumed."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dispatch.v1 import store_pb2
from dispatch_client import (
    TURN_STATE_NAMES,
    DispatchClient,
    InvalidArgument,
    NotFound,
    SyncDispatchClient,
    types,
)
from dispatch_client._calls import list_turns, turn_states
from tests.clients.conftest import MakeStack
from tests.stack import TENANT, Stack
from tests.transport.test_turns_api import MISSING_TURN, SCRIPT, three_turns


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    """Two turns that answer at once, then one that runs until cancelled, per conversation."""
    return await make_stack(SCRIPT)


async def in_store(stack: Stack, turn_id: str) -> tuple[int, str]:
    turn = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn_id))
    return turn.attempts, turn.lease_owner


def test_states_are_names_in_any_case_values_or_one_of_either() -> None:
    assert TURN_STATE_NAMES == [
        "queued",
        "running",
        "waiting_for_approval",
        "resuming",
        "completed",
        "failed",
        "aborted",
        "interrupted",
    ]
    assert turn_states("running") == [types.TURN_STATE_RUNNING]
    assert turn_states(types.TURN_STATE_FAILED) == [types.TURN_STATE_FAILED]
    assert turn_states(["Queued", "TURN_STATE_COMPLETED", types.TURN_STATE_ABORTED]) == [
        types.TURN_STATE_QUEUED,
        types.TURN_STATE_COMPLETED,
        types.TURN_STATE_ABORTED,
    ]
    assert turn_states(()) == []
    request = list_turns("conv_x", states="running", page_size=3).request
    assert list(request.states) == [types.TURN_STATE_RUNNING]  # type: ignore[attr-defined]
    for bad in ("asleep", "unspecified", 0, 99):
        with pytest.raises(ValueError, match=r"unknown turn state .*expected one of queued\|running"):
            turn_states(bad)  # type: ignore[arg-type]


async def test_the_async_client_gets_lists_and_iterates_turns(stack: Stack) -> None:
    conv, [first, second, third] = await three_turns(stack)
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        done = await client.get_turn(conv, first)
        assert (done.id, done.conversation_id) == (first, conv)
        assert (done.state, done.finish_reason) == (types.TURN_STATE_COMPLETED, types.FINISH_REASON_STOP)
        assert (done.attempts, done.lease_owner) == await in_store(stack, first)
        running = await client.get_turn(conv, third, timeout=5)
        assert running.state == types.TURN_STATE_RUNNING and not running.HasField("ended_at")
        assert (running.attempts, running.lease_owner) == await in_store(stack, third)
        assert (done.attempts, done.lease_owner) == (1, "")
        assert running.attempts == 1 and running.lease_owner.startswith("kernel-")

        page = await client.list_turns(conv, page_size=2)
        assert [t.id for t in page.turns] == [first, second] and page.next_page_token
        rest = await client.list_turns(conv, page_size=2, page_token=page.next_page_token)
        assert [t.id for t in rest.turns] == [third] and not rest.next_page_token

        assert [t.id async for t in client.iter_turns(conv, page_size=1)] == [first, second, third]
        assert [t.id async for t in client.iter_turns(conv, states="running")] == [third]
        assert [t.id async for t in client.iter_turns(conv, states=["completed"], page_size=1)] == [
            first,
            second,
        ]
        assert [t.id async for t in client.iter_turns(conv, states=[types.TURN_STATE_FAILED])] == []

        with pytest.raises(NotFound) as missing:
            await client.get_turn(conv, MISSING_TURN)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(InvalidArgument, match="turn_id 'turn_1' is malformed"):
            await client.get_turn(conv, "turn_1")
        with pytest.raises(ValueError, match="unknown turn state 'asleep'"):
            await client.list_turns(conv, states="asleep")
    async with DispatchClient(stack.address("transport"), api_key=await stack.new_key("other")) as theirs:
        with pytest.raises(NotFound):
            await theirs.get_turn(conv, first)
        with pytest.raises(NotFound):
            await theirs.list_turns(conv)


async def test_the_sync_client_gets_lists_and_iterates_turns(stack: Stack) -> None:
    conv, [first, second, third] = await three_turns(stack)
    address, key = stack.address("transport"), stack.api_key
    other = await stack.new_key("other")

    def scenario() -> None:
        with SyncDispatchClient(address, api_key=key) as client:
            done = client.get_turn(conv, second)
            assert (done.state, done.finish_reason) == (types.TURN_STATE_COMPLETED, types.FINISH_REASON_STOP)
            assert client.get_turn(conv, third).state == types.TURN_STATE_RUNNING
            page = client.list_turns(conv, states=["completed", "running"], page_size=2)
            assert [t.id for t in page.turns] == [first, second] and page.next_page_token
            assert [t.id for t in client.iter_turns(conv, page_size=2)] == [first, second, third]
            assert [t.id for t in client.iter_turns(conv, states="COMPLETED")] == [first, second]
            with pytest.raises(NotFound):
                client.get_turn(conv, MISSING_TURN)
            with pytest.raises(InvalidArgument, match="conversation_id 'conv_x' is malformed"):
                client.list_turns("conv_x")
        with SyncDispatchClient(address, api_key=other) as theirs, pytest.raises(NotFound):
            theirs.get_turn(conv, first)

    await asyncio.to_thread(scenario)
