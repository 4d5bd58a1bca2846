"""The turn's writer against a real store: a commit whose answer is lost is never applied
twice, and a commit that did not reach the store is sent again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from dispatch.kernel.events import ConversationLog
from dispatch.kernel.writer import LeaseLost, TurnWriter
from dispatch.v1 import common_pb2, store_pb2
from tests.stack import TENANT, Stack, start_stack, text_chunks

OWNER = "kernel-test"


class LossyStore:
    """The real store stub, but the next Appends' answers are lost: ``after`` ones after the
    store committed them, ``before`` ones before they reached it."""

    def __init__(self, real: Any):
        self.real = real
        self.lose_after = 0
        self.lose_before = 0
        self.appends = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def Append(self, request: store_pb2.AppendRequest, **kw: Any) -> store_pb2.AppendResponse:
        self.appends += 1
        if self.lose_before:
            self.lose_before -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused"
            )
        resp: store_pb2.AppendResponse = await self.real.Append(request, **kw)
        if self.lose_after:
            self.lose_after -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "Socket closed"
            )
        return resp


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path)
    yield s
    await s.stop()


async def writer_for(stack: Stack, store: LossyStore) -> TurnWriter:
    conv = await stack.conversation()
    ttl = duration_pb2.Duration(seconds=60)
    turn = await stack.store.CreateTurn(
        store_pb2.CreateTurnRequest(
            tenant_id=TENANT,
            conversation_id=conv,
            state=common_pb2.TURN_STATE_RUNNING,
            lease_owner=OWNER,
            lease_ttl=ttl,
            reserve_event_seq=100,
            user_messages=[common_pb2.Message(role=common_pb2.ROLE_USER, chunks=text_chunks("go"))],
        )
    )
    # As the kernel has it: loaded before the turn, then the turn's reservation.
    events = ConversationLog(TENANT, conv, 0, reserved_event_seq=0)
    events.reserve(100)
    writer = TurnWriter(store, events, turn, OWNER, rpc_timeout=10.0, outage=10.0)  # type: ignore[arg-type]
    writer.committed_through(turn.user_message_seq)
    return writer


def answer(turn_id: str, step: int) -> common_pb2.Message:
    return common_pb2.Message(
        role=common_pb2.ROLE_ASSISTANT, chunks=text_chunks(f"step {step}"), turn_id=turn_id, step_index=step
    )


@pytest.mark.parametrize("lost", ["after", "before"])
async def test_a_commit_whose_answer_was_lost_is_applied_once(stack: Stack, lost: str) -> None:
    store = LossyStore(stack.store)
    writer = await writer_for(stack, store)
    writer.events.emit(writer.turn.id, text_delta=common_pb2.TextDelta(text="hi"))
    if lost == "after":
        store.lose_after = 1
    else:
        store.lose_before = 1
    resp = await writer.append([answer(writer.turn.id, 0)])
    assert [m.chunks[0].text.text for m in resp.messages] == ["step 0"]
    assert resp.first_seq == resp.last_seq == 2
    history = await stack.store.Load(
        store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=writer.turn.conversation_id)
    )
    assert [m.seq for m in history.messages] == [1, 2]  # once, whatever happened to the answer
    assert writer.events.persisted_seq == 1 and not writer.events.unpersisted
    # Lost after committing: not sent again (the store was asked instead). Before: sent again.
    assert store.appends == (1 if lost == "after" else 2)


async def test_a_lost_answer_of_a_seal_that_started_the_next_turn_is_read_back(stack: Stack) -> None:
    store = LossyStore(stack.store)
    writer = await writer_for(stack, store)
    conv = writer.turn.conversation_id
    await stack.store.Enqueue(
        store_pb2.EnqueueRequest(
            tenant_id=TENANT,
            conversation_id=conv,
            message=common_pb2.Message(role=common_pb2.ROLE_USER, chunks=text_chunks("next")),
        )
    )
    writer.events.emit(writer.turn.id, after_persist=True, turn_sealed=common_pb2.TurnSealed())
    store.lose_after = 1
    resp = await writer.append(
        seal=store_pb2.TurnSeal(state=common_pb2.TURN_STATE_COMPLETED),
        next_turn=store_pb2.NextTurn(
            state=common_pb2.TURN_STATE_RUNNING,
            lease_ttl=duration_pb2.Duration(seconds=60),
            reserve_event_seq=200,
        ),
        forever=True,
    )
    assert resp.turn.state == common_pb2.TURN_STATE_COMPLETED
    assert resp.HasField("next_turn") and resp.next_turn.lease_owner == OWNER
    assert [m.chunks[0].text.text for m in resp.next_turn_messages] == ["next"]
    assert resp.reserved_event_seq == 200 and writer.events.reserved == 200
    assert writer.events.delivered_seq == 1  # turn_sealed, persisted, was sent
    turns = await stack.store.ListTurns(store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv))
    assert len(turns.turns) == 2  # one next turn, not two


async def test_a_fenced_write_of_a_turn_another_kernel_claimed_is_lease_lost(stack: Stack) -> None:
    writer = await writer_for(stack, LossyStore(stack.store))
    # Our lease lapses (released here, as expiry would), and another kernel claims the turn.
    await stack.store.ReleaseLease(
        store_pb2.ReleaseLeaseRequest(
            tenant_id=TENANT, turn_id=writer.turn.id, owner=OWNER, epoch=writer.turn.lease_epoch
        )
    )
    await stack.store.ClaimLease(
        store_pb2.ClaimLeaseRequest(
            tenant_id=TENANT,
            turn_id=writer.turn.id,
            owner="kernel-other",
            ttl=duration_pb2.Duration(seconds=60),
        )
    )
    writer.events.emit(writer.turn.id, text_delta=common_pb2.TextDelta(text="mine"))
    with pytest.raises(LeaseLost):
        await writer.append([answer(writer.turn.id, 0)])
    assert writer.lost
    history = await stack.store.Load(
        store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=writer.turn.conversation_id)
    )
    assert [m.role for m in history.messages] == [common_pb2.ROLE_USER]  # nothing of ours landed
