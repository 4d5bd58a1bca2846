"""Subscribe resumes by itself: after a resync, a broken or ended stream, a dropped
connection; never yields an event twice nor skips one; raises what resuming cannot fix.

Against a fake server that scripts each Subscribe call, for both clients; against
the real stack behind a proxy that cuts the connection mid-turn; and the shared
decision logic (``Resume``, ``TurnFollower``) on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from dispatch_client import (
    DeadlineExceeded,
    DispatchClient,
    DispatchError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SyncDispatchClient,
    Unauthenticated,
    Unavailable,
    types,
)
from dispatch_client._proto import transport_pb2, transport_pb2_grpc
from dispatch_client._stream import MAX_BACKOFF, Resume, TurnFollower
from tests.clients.conftest import STREAMING, MakeProxy, MakeStack

Context = grpc.aio.ServicerContext[Any, Any]
HANG = "hang"
# What one Subscribe call does, step by step: send a response, fail with a status, or hang.
# After the last step the stream ends normally.
Step = transport_pb2.SubscribeResponse | grpc.StatusCode | str


def ev(seq: int, kind: str = "text_delta", turn: str = "turn_a") -> types.AgentEvent:
    event = types.AgentEvent(conversation_id="conv_a", turn_id=turn, event_seq=seq)
    if kind == "text_delta":
        event.text_delta.text = f"<{seq}>"
    else:
        getattr(event, kind).SetInParent()
    return event


def batch(*events: int | types.AgentEvent) -> transport_pb2.SubscribeResponse:
    return transport_pb2.SubscribeResponse(
        events=[e if isinstance(e, types.AgentEvent) else ev(e) for e in events]
    )


def resync(after: int) -> transport_pb2.SubscribeResponse:
    return transport_pb2.SubscribeResponse(resync=transport_pb2.Resync(after_event_seq=after))


@dataclass
class FakeDispatch(transport_pb2_grpc.DispatchServicer):
    """Subscribe call n follows plans[n] (the last plan repeats); Models takes 5 s."""

    plans: Sequence[Sequence[Step]]
    requests: list[int] = field(default_factory=list)
    # The ``until`` of each Subscribe call.
    untils: list[int] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)

    async def Subscribe(
        self, request: transport_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[transport_pb2.SubscribeResponse]:
        self.requests.append(request.after_event_seq)
        self.untils.append(request.until)
        self.authorization.extend(
            str(v) for k, v in context.invocation_metadata() or () if k == "authorization"
        )
        for step in self.plans[min(len(self.requests), len(self.plans)) - 1]:
            if isinstance(step, transport_pb2.SubscribeResponse):
                yield step
            elif isinstance(step, grpc.StatusCode):
                await context.abort(step, f"scripted {step.name}")
            else:
                await asyncio.sleep(3600)

    async def Models(
        self, request: transport_pb2.ModelsRequest, context: Context
    ) -> transport_pb2.ModelsResponse:
        await asyncio.sleep(5)
        return transport_pb2.ModelsResponse()


@dataclass
class FakeServer:
    servicer: FakeDispatch
    server: grpc.aio.Server
    address: str


MakeFake = Callable[[Sequence[Sequence[Step]]], Awaitable[FakeServer]]


@pytest.fixture
async def fake() -> AsyncIterator[MakeFake]:
    """Starts a fake Dispatch server following ``plans``."""
    servers: list[FakeServer] = []

    async def make(plans: Sequence[Sequence[Step]]) -> FakeServer:
        servicer = FakeDispatch(plans)  # type: ignore[abstract]  # the calls it does not script fail
        server = grpc.aio.server()
        transport_pb2_grpc.add_DispatchServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(FakeServer(servicer, server, f"127.0.0.1:{port}"))
        return servers[-1]

    yield make
    for s in servers:
        await s.server.stop(0)


# Every way a stream can end but the last, and events repeated across reconnects.
EVERYTHING: list[list[Step]] = [
    [batch(1, 2, 3), batch(3, 4), grpc.StatusCode.UNAVAILABLE],  # broken after 4
    [batch(5), resync(5), batch(99)],  # the client stops reading at the resync
    [batch(4, 5, 6), batch(7)],  # repeats 4 and 5; then ends normally
    [grpc.StatusCode.INTERNAL],  # a dropped connection, no progress
    [grpc.StatusCode.UNKNOWN],
    [batch(8, ev(9, "turn_sealed")), HANG],
]
EVERYTHING_REQUESTS = [0, 4, 5, 7, 7, 7]


async def test_async_subscribe_resumes_from_the_last_event_it_yielded(
    fake: MakeFake,
) -> None:
    server = await fake(EVERYTHING)
    async with DispatchClient(server.address, api_key="k") as client:
        seqs = []
        async with contextlib.aclosing(client.subscribe("conv_a")) as events:
            async for event in events:
                seqs.append(event.event_seq)
                if event.HasField("turn_sealed"):
                    break
    assert seqs == list(range(1, 10))
    assert server.servicer.requests == EVERYTHING_REQUESTS
    assert set(server.servicer.authorization) == {"Bearer k"}


async def test_sync_subscribe_resumes_from_the_last_event_it_yielded(
    fake: MakeFake,
) -> None:
    server = await fake(EVERYTHING)

    def follow() -> list[int]:
        seqs = []
        with (
            SyncDispatchClient(server.address, api_key="k") as client,
            contextlib.closing(client.subscribe("conv_a")) as events,
        ):
            for event in events:
                seqs.append(event.event_seq)
                if event.HasField("turn_sealed"):
                    break
        return seqs

    assert await asyncio.to_thread(follow) == list(range(1, 10))
    assert server.servicer.requests == EVERYTHING_REQUESTS


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    ],
)
async def test_errors_resuming_cannot_fix_raise_at_once(
    fake: MakeFake, code: grpc.StatusCode, cls: type[DispatchError]
) -> None:
    server = await fake([[batch(1), code]])
    seen = []
    async with DispatchClient(server.address, api_key="k") as client:
        with pytest.raises(cls) as err:
            async for event in client.subscribe("conv_a"):
                seen.append(event.event_seq)
    assert err.value.code == code and f"scripted {code.name}" in str(err.value)
    assert seen == [1] and server.servicer.requests == [0]

    def sync() -> None:
        with SyncDispatchClient(server.address, api_key="k") as client:
            for _ in client.subscribe("conv_a", after_event_seq=1):
                pass

    with pytest.raises(cls):
        await asyncio.to_thread(sync)
    assert server.servicer.requests == [0, 1]


async def test_reconnecting_can_be_limited_or_turned_off(
    fake: MakeFake,
) -> None:
    server = await fake([[grpc.StatusCode.UNAVAILABLE]])
    async with DispatchClient(server.address, api_key="k") as client:
        with pytest.raises(Unavailable):
            async for _ in client.subscribe("conv_a", reconnect=False):
                pass
        assert server.servicer.requests == [0]
        with pytest.raises(Unavailable):
            async for _ in client.subscribe("conv_a", max_reconnects=2):
                pass
        assert server.servicer.requests == [0, 0, 0, 0]


async def test_without_follow_an_ended_stream_ends_the_iteration(
    fake: MakeFake,
) -> None:
    server = await fake([[batch(1, 2)]])
    async with DispatchClient(server.address, api_key="k") as client:
        assert [e.event_seq async for e in client.subscribe("conv_a", follow=False)] == [1, 2]

    def sync() -> list[int]:
        with SyncDispatchClient(server.address, api_key="k") as client:
            return [e.event_seq for e in client.subscribe("conv_a", after_event_seq=1, follow=False)]

    assert await asyncio.to_thread(sync) == [2]
    assert server.servicer.requests == [0, 1]
    # follow=False is how a caller asks the server to end the stream once caught up.
    assert server.servicer.untils == [types.SUBSCRIBE_UNTIL_CAUGHT_UP] * 2


# The server shuts down mid-stream (UNAVAILABLE), the next server ends the bounded stream with OK.
BOUNDED: list[list[Step]] = [[batch(1, 2), grpc.StatusCode.UNAVAILABLE], [batch(2, ev(3, "turn_sealed"))]]


@pytest.mark.parametrize(
    ("until", "sent"),
    [
        ("turn_sealed", types.SUBSCRIBE_UNTIL_TURN_SEALED),
        ("caught_up", types.SUBSCRIBE_UNTIL_CAUGHT_UP),
        (types.SUBSCRIBE_UNTIL_CAUGHT_UP, types.SUBSCRIBE_UNTIL_CAUGHT_UP),
    ],
)
async def test_a_bounded_stream_resumes_with_its_until_and_an_ok_end_is_the_end(
    fake: MakeFake, until: str | types.SubscribeUntil.ValueType, sent: int
) -> None:
    server = await fake(BOUNDED)
    async with DispatchClient(server.address, api_key="k") as client:
        # The stream ends by itself: a client that resubscribed after the OK end would
        # replay the last plan forever (and the per-test timeout would fail it).
        assert [e.event_seq async for e in client.subscribe("conv_a", until=until)] == [1, 2, 3]
    assert server.servicer.requests == [0, 2] and server.servicer.untils == [sent, sent]

    def sync() -> list[int]:
        with SyncDispatchClient(server.address, api_key="k") as client:
            return [e.event_seq for e in client.subscribe("conv_a", until=until)]

    assert await asyncio.to_thread(sync) == [2, 3]  # its first call meets the last plan
    assert server.servicer.requests == [0, 2, 0] and server.servicer.untils == [sent] * 3


async def test_a_follow_stream_asks_for_no_end_and_is_resumed_when_it_ends(fake: MakeFake) -> None:
    server = await fake([[batch(1)], [batch(2), HANG]])
    async with DispatchClient(server.address, api_key="k") as client:
        for follow in ({"until": "follow"}, {"follow": True}, {}):
            seqs = []
            async with contextlib.aclosing(client.subscribe("conv_a", **follow)) as events:
                async for event in events:
                    seqs.append(event.event_seq)
                    if len(seqs) == 2:
                        break
            assert seqs == [1, 2]
            server.servicer.requests.clear()
    assert set(server.servicer.untils) == {types.SUBSCRIBE_UNTIL_FOLLOW}


async def test_the_per_call_timeout_and_the_default_one(
    fake: MakeFake,
) -> None:
    server = await fake([[]])
    async with DispatchClient(server.address, api_key="k", timeout=0.2) as client:
        with pytest.raises(DeadlineExceeded):
            await client.models()
        with pytest.raises(DeadlineExceeded):
            await client.models(timeout=0.1)

    def sync() -> None:
        with SyncDispatchClient(server.address, api_key="k", timeout=60) as client:
            client.models(timeout=0.2)

    with pytest.raises(DeadlineExceeded) as err:
        await asyncio.to_thread(sync)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# ------------------------------------------------------- the real stack, cut


async def test_a_dropped_connection_mid_turn_loses_and_repeats_nothing(
    make_stack: MakeStack, make_proxy: MakeProxy
) -> None:
    stack = await make_stack(STREAMING)
    proxy = await make_proxy(stack)
    async with (
        DispatchClient(proxy.address, api_key=stack.api_key) as client,
        DispatchClient(stack.address("transport"), api_key=stack.api_key) as direct,
    ):
        conv = await direct.create_conversation()
        sent = await direct.send(conv.id, "go")
        got: list[types.AgentEvent] = []
        async with contextlib.aclosing(client.follow_turn(conv.id, sent)) as events:
            async for event in events:
                got.append(event)
                if len(got) in (3, 12):
                    proxy.drop()
        reference = [e async for e in direct.follow_turn(conv.id, sent)]
    assert got == reference
    assert len(got) > 30 and got[-1].HasField("turn_sealed")
    assert proxy.accepted >= 3  # the first connection and one after each drop


async def test_the_sync_client_resumes_after_a_dropped_connection_too(
    make_stack: MakeStack, make_proxy: MakeProxy
) -> None:
    stack = await make_stack(STREAMING)
    proxy = await make_proxy(stack)
    loop = asyncio.get_running_loop()
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as direct:
        conv = await direct.create_conversation()

        def run() -> tuple[list[types.AgentEvent], transport_pb2.SendResponse]:
            got = []
            with SyncDispatchClient(proxy.address, api_key=stack.api_key) as client:
                sent = client.send(conv.id, "go")
                with contextlib.closing(client.follow_turn(conv.id, sent)) as events:
                    for event in events:
                        got.append(event)
                        if len(got) == 5:
                            loop.call_soon_threadsafe(proxy.drop)
            return got, sent

        got, sent = await asyncio.to_thread(run)
        reference = [e async for e in direct.follow_turn(conv.id, sent)]
    assert got == reference and got[-1].HasField("turn_sealed")
    assert proxy.accepted >= 2


# ------------------------------------------------------- the shared logic alone


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")


def test_resume_drops_what_it_yielded_and_resubscribes_from_there() -> None:
    resume = Resume("conv_a", after_event_seq=2)
    assert resume.request().after_event_seq == 2
    assert [e.event_seq for e in resume.accept(batch(1, 2, 3, 4))] == [3, 4]
    assert [e.event_seq for e in resume.accept(batch(4, 3, 5))] == [5]
    assert resume.accept(resync(5)) == [] and resume.resync
    assert resume.ended() == 0.0  # a resync after progress: at once
    assert resume.request().after_event_seq == 5 and not resume.resync
    # Failures in a row back off exponentially, up to the cap.
    delays = [resume.broke(rpc_error(grpc.StatusCode.UNAVAILABLE)) for _ in range(8)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, MAX_BACKOFF, MAX_BACKOFF]
    resume.request()
    resume.accept(batch(6))
    assert resume.broke(rpc_error(grpc.StatusCode.INTERNAL)) == 0.1  # progress resets the backoff
    assert resume.ended() == 0.2  # follow: an ended stream is resumed too
    with pytest.raises(NotFound):
        resume.broke(rpc_error(grpc.StatusCode.NOT_FOUND))
    assert resume.reconnects == 11


def test_resume_without_follow_or_reconnect() -> None:
    assert Resume("c", follow=False).ended() is None
    assert Resume("c", until="turn_sealed").ended() is None
    assert Resume("c", until="follow").ended() == 0.1
    assert Resume("c", reconnect=False).ended() is None
    with pytest.raises(Unavailable):
        Resume("c", reconnect=False).broke(rpc_error(grpc.StatusCode.UNAVAILABLE))
    limited = Resume("c", max_reconnects=1)
    limited.broke(rpc_error(grpc.StatusCode.UNAVAILABLE))
    with pytest.raises(Unavailable):
        limited.broke(rpc_error(grpc.StatusCode.UNAVAILABLE))
    # A resync without anything new waits like a failure does.
    stuck = Resume("c", after_event_seq=5)
    stuck.request()
    stuck.accept(resync(5))
    assert stuck.ended() == 0.1


@pytest.mark.parametrize(
    ("options", "until"),
    [
        ({}, types.SUBSCRIBE_UNTIL_FOLLOW),
        ({"follow": True}, types.SUBSCRIBE_UNTIL_FOLLOW),
        ({"follow": False}, types.SUBSCRIBE_UNTIL_CAUGHT_UP),
        ({"until": "Caught_Up"}, types.SUBSCRIBE_UNTIL_CAUGHT_UP),
        ({"until": "SUBSCRIBE_UNTIL_TURN_SEALED", "follow": False}, types.SUBSCRIBE_UNTIL_TURN_SEALED),
        ({"until": types.SUBSCRIBE_UNTIL_FOLLOW, "follow": True}, types.SUBSCRIBE_UNTIL_FOLLOW),
    ],
)
def test_resume_until_from_until_or_follow(options: dict[str, Any], until: int) -> None:
    assert Resume("c", **options).request().until == until


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"until": "caught_up", "follow": True}, "follow=True contradicts until='caught_up'"),
        ({"until": "follow", "follow": False}, "follow=False contradicts until='follow'"),
        ({"until": "later"}, "unknown until 'later': expected one of follow|caught_up|turn_sealed"),
        ({"until": 0}, "unknown until 0"),
    ],
)
def test_resume_refuses_an_until_it_cannot_send(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        Resume("c", **options)


def test_turn_follower() -> None:
    sent = transport_pb2.SendResponse(turn_id="turn_a")
    follower = TurnFollower("conv_a", sent)
    stream = [ev(1, turn="turn_z"), ev(2, "turn_started"), ev(3), ev(4, "turn_done"), ev(5, "turn_sealed")]
    assert [follower.accept(e) for e in stream] == [False, True, True, True, True]
    assert follower.done and follower.sealed is not None

    # Queued behind turn_a and not taken as steering: the next turn is the message's.
    queued = TurnFollower("conv_a", transport_pb2.SendResponse(turn_id="turn_a", queued=True))
    stream = [
        ev(1),
        ev(2, "turn_sealed"),
        ev(3, "turn_started", turn="turn_b"),
        ev(4, turn="turn_b"),
        ev(5, "turn_sealed", turn="turn_b"),
    ]
    assert [queued.accept(e) for e in stream] == [True, True, True, True, True]
    assert queued.done and queued.turn_id == "turn_b"

    # Taken as steering: the running turn is the message's.
    steered = TurnFollower("conv_a", transport_pb2.SendResponse(turn_id="turn_a", queued=True))
    for event in (ev(1, "steering_injected"), ev(2, "turn_sealed")):
        steered.accept(event)
    assert steered.done

    # A turn that could not be sealed ends with a fatal error after turn_done.
    unsealed = TurnFollower("conv_a", sent)
    error = ev(3, "error")
    error.error.fatal = True
    assert unsealed.accept(error) and not unsealed.done  # fatal, but the turn goes on to turn_done
    unsealed.accept(ev(4, "turn_done"))
    assert unsealed.accept(error) and unsealed.done and unsealed.sealed is None
