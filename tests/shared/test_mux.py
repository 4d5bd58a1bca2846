"""Unary-like calls multiplexed on one stream (dispatch.shared.mux), against a real server.

The toy service answers Exec's Stat over ``Session`` (through ``MuxServer``) and as the
unary RPC, from one method: the path says what to do, so a test can hold a call open,
fail it, or answer it at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from dispatch.shared.errors import Context, NotFound, grpc_errors
from dispatch.shared.mux import MuxClient, MuxServer
from dispatch.shared.server import GRPC_OPTIONS, Hosted, Service, start_server
from dispatch.v1 import exec_pb2, exec_pb2_grpc

LONG = 30.0  # a deadline no test waits out


class Toy(exec_pb2_grpc.ExecServicer):
    """``Stat`` by path: ``echo:X`` answers X; ``gate:X`` waits for ``open(X)``; ``missing``
    raises NotFound; ``boom`` an unexpected error; ``abort`` aborts through the context."""

    def __init__(self, limit: int = 64):
        self.gates: dict[str, asyncio.Event] = {}
        self.started: set[str] = set()
        self.cancelled: set[str] = set()
        self.sessions = 0
        self.mux: MuxServer[exec_pb2.ExecSessionRequest, exec_pb2.ExecSessionResponse] = MuxServer(
            self._one, exec_pb2.ExecSessionResponse, what="toy", limit=limit
        )

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    @grpc_errors
    async def Stat(self, request: exec_pb2.StatRequest, context: Context) -> exec_pb2.FileInfo:
        kind, _, name = request.path.partition(":")
        if kind == "gate":
            self.started.add(name)
            try:
                await self.gate(name).wait()
            except asyncio.CancelledError:
                self.cancelled.add(name)
                raise
        elif kind == "missing":
            raise NotFound(f"no such file: {request.path}")
        elif kind == "boom":
            raise RuntimeError("boom")
        elif kind == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        return exec_pb2.FileInfo(name=name)

    async def _one(
        self, request: exec_pb2.ExecSessionRequest, context: Context
    ) -> exec_pb2.ExecSessionResponse:
        return exec_pb2.ExecSessionResponse(stat=await self.Stat(request.stat, context))

    async def Session(
        self, request_iterator: AsyncIterator[exec_pb2.ExecSessionRequest], context: Context
    ) -> AsyncIterator[exec_pb2.ExecSessionResponse]:
        self.sessions += 1
        try:
            async for reply in self.mux.serve(request_iterator, context):
                yield reply
        finally:
            self.sessions -= 1


async def serve(toy: Toy, listen: str = "127.0.0.1:0") -> Hosted:
    def register(server: grpc.aio.Server) -> None:
        exec_pb2_grpc.add_ExecServicer_to_server(toy, server)

    hosted = await start_server([Service("dispatch.v1.Exec", register)], listen)
    hosted.on_stop.append(toy.mux.drain)
    return hosted


@dataclass
class Peer:
    toy: Toy
    hosted: Hosted
    channel: grpc.aio.Channel
    mux: MuxClient[exec_pb2.ExecSessionRequest, exec_pb2.ExecSessionResponse]
    tasks: list[asyncio.Task[str]] = field(default_factory=list)

    @property
    def stub(self) -> exec_pb2_grpc.ExecAsyncStub:
        return exec_pb2_grpc.ExecStub(self.channel)

    async def stat(self, path: str, timeout: float = LONG) -> str:  # noqa: ASYNC109 - the call's deadline
        reply = await self.mux.call(
            exec_pb2.ExecSessionRequest(stat=exec_pb2.StatRequest(path=path)), timeout
        )
        return reply.stat.name

    def start(self, path: str, timeout: float = LONG) -> asyncio.Task[str]:
        task = asyncio.create_task(self.stat(path, timeout))
        self.tasks.append(task)
        return task

    async def started(self, name: str) -> None:
        while name not in self.toy.started:
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.mux.close()
        await self.channel.close()
        await self.hosted.stop(0)


async def open_peer(toy: Toy) -> Peer:
    hosted = await serve(toy)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}", options=GRPC_OPTIONS)
    return Peer(toy, hosted, channel, MuxClient(exec_pb2_grpc.ExecStub(channel).Session, "toy"))


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = await open_peer(Toy())  # type: ignore[abstract]  # only Stat and Session are served
    yield p
    for gate in p.toy.gates.values():
        gate.set()
    for task in p.tasks:
        task.cancel()
    await asyncio.gather(*p.tasks, return_exceptions=True)
    await p.close()


async def rpc_error(task: asyncio.Future[str]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await task
    return caught.value


async def test_answers_come_back_in_any_order_each_to_its_own_call(peer: Peer) -> None:
    first, second = peer.start("gate:first"), peer.start("gate:second")
    await peer.started("first")
    await peer.started("second")
    peer.toy.gate("second").set()
    assert await second == "second"
    assert not first.done()
    assert await peer.stat("echo:third") == "third"
    peer.toy.gate("first").set()
    assert await first == "first"
    assert peer.mux.opened == 1


async def test_each_call_has_its_own_deadline(peer: Peer) -> None:
    slow = peer.start("gate:slow")
    err = await rpc_error(peer.start("gate:stuck", timeout=0.3))
    assert (err.code(), err.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    # The store got the deadline too: the call's work was cancelled there, as a unary call's is.
    while "stuck" not in peer.toy.cancelled:
        await asyncio.sleep(0.01)
    assert not slow.done()
    peer.toy.gate("slow").set()
    assert await slow == "slow"
    assert peer.mux.opened == 1


@pytest.mark.parametrize("timeout", [None, 0, -1.0])
async def test_a_call_without_a_deadline_is_refused(peer: Peer, timeout: float | None) -> None:  # noqa: ASYNC109
    with pytest.raises(ValueError, match="needs a deadline"):
        await peer.stat("echo:x", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["missing", "boom", "abort"])
async def test_a_failed_call_carries_the_code_and_details_the_unary_call_gives(peer: Peer, path: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await peer.stub.Stat(exec_pb2.StatRequest(path=path), timeout=LONG)
    streamed = await rpc_error(peer.start(path))
    assert (streamed.code(), streamed.details()) == (unary.value.code(), unary.value.details())
    assert streamed.code() != grpc.StatusCode.OK
    # A failed call is that call's answer: the stream goes on.
    assert await peer.stat("echo:after") == "after"
    assert peer.mux.opened == 1


async def test_a_cancelled_caller_leaves_the_stream_to_the_others(peer: Peer) -> None:
    other = peer.start("gate:other")
    cancelled = peer.start("gate:cancelled")
    await peer.started("cancelled")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await peer.stat("echo:next") == "next"
    # Its answer, coming later, goes nowhere and disturbs nothing.
    peer.toy.gate("cancelled").set()
    assert await peer.stat("echo:after") == "after"
    peer.toy.gate("other").set()
    assert await other == "other"
    assert peer.mux.opened == 1


async def test_a_stopped_server_fails_pending_calls_unavailable_and_a_restart_serves_the_next() -> None:
    toy = Toy()  # type: ignore[abstract]
    peer = await open_peer(toy)
    port = peer.hosted.port
    try:
        pending = [peer.start("gate:a"), peer.start("gate:b")]
        await peer.started("a")
        await peer.started("b")
        await peer.hosted.server.stop(0)  # really gone: the stream breaks mid-call
        for task in pending:
            err = await rpc_error(task)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        # While it is down, a call fails as a unary call would, and nothing waits forever.
        err = await rpc_error(peer.start("echo:down"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        peer.hosted = await serve(toy, f"127.0.0.1:{port}")
        for _ in range(200):  # the channel reconnects within its back-off (2 s at most)
            try:
                assert await peer.stat("echo:back") == "back"
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.05)
        else:
            pytest.fail("no call succeeded after the restart")
        assert peer.mux.opened >= 2
    finally:
        await peer.close()


async def test_closing_answers_the_calls_in_flight_and_ends_the_stream(peer: Peer) -> None:
    in_flight = peer.start("gate:last")
    await peer.started("last")
    assert peer.toy.sessions == 1
    closing = asyncio.create_task(peer.mux.close())
    await asyncio.sleep(0)
    peer.toy.gate("last").set()
    assert await in_flight == "last"
    await closing
    while peer.toy.sessions:  # the server saw the stream end (it answers as it unwinds)
        await asyncio.sleep(0.01)
    err = await rpc_error(peer.start("echo:closed"))
    assert err.code() == grpc.StatusCode.CANCELLED


async def test_a_slow_call_holds_up_no_other_and_a_stream_runs_at_most_limit_calls() -> None:
    peer = await open_peer(Toy(limit=2))  # type: ignore[abstract]
    try:
        a, b = peer.start("gate:a"), peer.start("gate:b")
        await peer.started("a")
        await peer.started("b")
        third = peer.start("echo:third")
        # A unary round trip to the same server: the stream's third call has had time to be
        # read, and waits for a slot.
        await peer.stub.Stat(exec_pb2.StatRequest(path="echo:barrier"), timeout=LONG)
        assert not third.done()
        peer.toy.gate("b").set()  # either slot frees it; the other call is still held
        assert await third == "third"
        assert await b == "b"
        assert not a.done()
        peer.toy.gate("a").set()
        assert await a == "a"
    finally:
        await peer.close()


async def test_a_stopping_server_answers_what_it_read_then_ends_its_streams(peer: Peer) -> None:
    in_flight = peer.start("gate:read")
    await peer.started("read")
    stopping = asyncio.create_task(peer.hosted.stop(3600))
    while not peer.toy.mux._draining:
        await asyncio.sleep(0.01)
    peer.toy.gate("read").set()
    assert await in_flight == "read"
    # The stream ended without waiting out the hour's grace; the server is stopped.
    await asyncio.wait_for(stopping, 20)
    err = await rpc_error(peer.start("echo:gone"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
