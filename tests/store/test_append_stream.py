"""AppendStream answers every append exactly as unary Append does (issue 14: the kernel's
appends travel on one stream): the same commits, the same fencing, the same refusals with
the same status and details, and an answer only once the commit is durable. Run against
``store_stub``, once per backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from dispatch.kernel.streams import StoreAppends
from dispatch.shared.config import StoreConfig
from dispatch.shared.mux import MuxClient
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc
from tests.store.harness import (
    TENANT,
    FakeClock,
    RunningStore,
    delta_event,
    new_conversation,
    rpc_error,
    text_message,
    text_of,
)
from tests.store.test_durable_turns import OTHER, OWNER, claim, fence, history, leased_turn, said

if TYPE_CHECKING:
    from tests.store.harness import Stub

TIMEOUT = 30.0

Appends = MuxClient[store_pb2.AppendStreamRequest, store_pb2.AppendStreamResponse]


@pytest.fixture
async def streamed(store_stub: Stub) -> AsyncIterator[Appends]:
    client: Appends = MuxClient(store_stub.AppendStream, "store append")
    yield client
    await client.close()


async def on_stream(client: Appends, request: store_pb2.AppendRequest) -> store_pb2.AppendResponse:
    reply = await client.call(store_pb2.AppendStreamRequest(append=request), TIMEOUT)
    return reply.append


def request(conversation_id: str, *texts: str, **fields: object) -> store_pb2.AppendRequest:
    fields.setdefault("messages", [text_message(t) for t in texts])
    return store_pb2.AppendRequest(tenant_id=TENANT, conversation_id=conversation_id, **fields)  # type: ignore[arg-type]


async def test_a_streamed_append_commits_and_answers_as_unary_append_does(
    store_stub: Stub, streamed: Appends
) -> None:
    conv = await new_conversation(store_stub)
    first = await store_stub.Append(request(conv.id, "a", events=[delta_event(1)]))
    second = await on_stream(streamed, request(conv.id, "b", "c", events=[delta_event(2)]))
    third = await store_stub.Append(request(conv.id, "d"))
    assert [(r.first_seq, r.last_seq) for r in (first, second, third)] == [(1, 1), (2, 3), (4, 4)]
    assert (second.last_event_seq, [text_of(m) for m in second.messages]) == (2, ["b", "c"])
    assert [m.seq for m in second.messages] == [2, 3]
    # Committed: a fresh read sees it.
    assert [(m.seq, text_of(m)) for m in await history(store_stub, conv.id)] == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
        (4, "d"),
    ]


async def test_concurrent_appends_on_one_stream_stay_gap_free_and_each_contiguous(
    store_stub: Stub, streamed: Appends
) -> None:
    conv = await new_conversation(store_stub)
    answers = await asyncio.gather(
        *(on_stream(streamed, request(conv.id, f"{i}.0", f"{i}.1", f"{i}.2")) for i in range(20))
    )
    seqs = sorted(seq for a in answers for seq in range(a.first_seq, a.last_seq + 1))
    assert seqs == list(range(1, 61))
    for a in answers:
        assert a.last_seq - a.first_seq == 2
        assert {text_of(m).split(".")[0] for m in a.messages} == {text_of(a.messages[0]).split(".")[0]}
    assert streamed.opened == 1


async def test_a_stale_fence_is_refused_on_the_stream_as_by_unary_append_and_writes_nothing(
    store_stub: Stub, streamed: Appends, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    written = await on_stream(streamed, request(conv.id, fence=fence(turn), messages=[said("step 0")]))
    assert written.last_seq == 1
    clock.advance(31)  # the lease expires, and another kernel claims the turn
    taken = await claim(store_stub, turn.id, OTHER)
    for stale in (fence(turn), fence(turn, owner="nobody"), fence(taken, epoch=taken.lease_epoch + 1)):
        stale_request = request(conv.id, fence=stale, messages=[said("stale")])
        unary = await rpc_error(store_stub.Append(stale_request))
        streamed_err = await rpc_error(on_stream(streamed, stale_request))
        assert unary.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (streamed_err.code(), streamed_err.details()) == (unary.code(), unary.details())
    assert [text_of(m) for m in await history(store_stub, conv.id)] == ["step 0"]
    # The holder's fence still writes, on the same stream.
    resp = await on_stream(streamed, request(conv.id, fence=fence(taken), messages=[said("step 1")]))
    assert resp.last_seq == 2
    assert streamed.opened == 1


BAD: dict[str, store_pb2.AppendRequest] = {
    "no-tenant": store_pb2.AppendRequest(conversation_id="conv_x", messages=[text_message("x")]),
    "malformed-conversation-id": store_pb2.AppendRequest(
        tenant_id=TENANT, conversation_id="conv_nope", messages=[text_message("x")]
    ),
    "unknown-conversation": store_pb2.AppendRequest(
        tenant_id=TENANT, conversation_id="conv_0123456789abcdef0123456789", messages=[text_message("x")]
    ),
}


@pytest.mark.parametrize(
    "case",
    [*BAD, "empty-append", "message-without-chunks", "event-without-kind", "fence-of-unknown-turn"],
)
async def test_bad_input_gets_the_unary_status_and_details_on_the_stream(
    store_stub: Stub, streamed: Appends, case: str
) -> None:
    conv = await new_conversation(store_stub)
    made = {
        "empty-append": request(conv.id),
        "message-without-chunks": store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER)],
        ),
        "event-without-kind": store_pb2.AppendRequest(
            tenant_id=TENANT, conversation_id=conv.id, events=[common_pb2.AgentEvent(event_seq=1)]
        ),
        "fence-of-unknown-turn": request(
            conv.id, "x", fence=store_pb2.LeaseFence(turn_id="turn_nope", owner=OWNER, epoch=1)
        ),
    }
    bad = BAD.get(case) or made[case]
    unary = await rpc_error(store_stub.Append(bad))
    streamed_err = await rpc_error(on_stream(streamed, bad))
    assert unary.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), unary
    assert (streamed_err.code(), streamed_err.details()) == (unary.code(), unary.details())
    # Refused, it wrote nothing, and the stream carries on.
    assert await history(store_stub, conv.id) == []
    assert (await on_stream(streamed, request(conv.id, "fine"))).last_seq == 1
    assert streamed.opened == 1


async def test_what_a_stream_committed_survives_a_restart(store_cfg: StoreConfig) -> None:
    first = await RunningStore.start(store_cfg)
    client: Appends = MuxClient(first.stub.AppendStream, "store append")
    try:
        conv = await new_conversation(first.stub)
        resp = await on_stream(client, request(conv.id, "kept", events=[delta_event(1)]))
        assert resp.last_seq == 1
    finally:
        await client.close()
        await first.stop()
    second = await RunningStore.start(store_cfg)
    try:
        assert [text_of(m) for m in await history(second.stub, conv.id)] == ["kept"]
    finally:
        await second.stop()


class OlderStore(store_pb2_grpc.ConversationStoreServicer):
    """A store of before AppendStream: unary Append only (forwarded to the real one)."""

    def __init__(self, real: Stub):
        self.real = real

    async def Append(self, request: store_pb2.AppendRequest, context: object) -> store_pb2.AppendResponse:
        resp: store_pb2.AppendResponse = await self.real.Append(request, timeout=TIMEOUT)
        return resp


async def test_a_kernel_falls_back_to_unary_appends_on_a_store_without_append_stream(
    store_stub: Stub,
) -> None:
    server = grpc.aio.server()
    store_pb2_grpc.add_ConversationStoreServicer_to_server(OlderStore(store_stub), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    appends = StoreAppends(store_pb2_grpc.ConversationStoreStub(channel))
    try:
        conv = (await new_conversation(store_stub)).id
        first = await appends.Append(request(conv, "one"), TIMEOUT)
        assert appends.unary and appends.mux.unimplemented  # learnt once, then unary for good
        second = await appends.Append(request(conv, "two"), TIMEOUT)
        assert (first.last_seq, second.last_seq) == (1, 2)
        assert [text_of(m) for m in await history(store_stub, conv)] == ["one", "two"]
    finally:
        await appends.close()
        await channel.close()
        await server.stop(0)
