"""The kernel's long-lived streams to its peers: store appends and exec file calls.

Each step of a turn appends to the store, and most tools read or write a file through
exec; as unary calls, each costs a full gRPC round trip. These clients carry the same
calls as messages on one stream per peer (``dispatch.shared.mux``), with the unary stubs'
method names and signatures, and fail as the unary calls fail (``grpc.aio.AioRpcError``,
the same status code and details), so callers written against the stubs need no change.
"""

# The methods take ``timeout`` as the unary stubs do (the call's deadline, enforced per call).
# ruff: noqa: ASYNC109

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import grpc

from dispatch.shared.mux import MuxClient, rpc_error
from dispatch.v1 import exec_pb2, exec_pb2_grpc, store_pb2, store_pb2_grpc


class StoreAppends:
    """``Append`` over ``AppendStream``: every turn of a kernel shares the one stream."""

    def __init__(self, store: store_pb2_grpc.ConversationStoreAsyncStub):
        self.mux: MuxClient[store_pb2.AppendStreamRequest, store_pb2.AppendStreamResponse] = MuxClient(
            store.AppendStream, "store append"
        )

    async def Append(self, request: store_pb2.AppendRequest, timeout: float) -> store_pb2.AppendResponse:
        reply = await self.mux.call(store_pb2.AppendStreamRequest(append=request), timeout)
        return reply.append

    async def close(self) -> None:
        await self.mux.close()


class ExecClient:
    """The exec service as the kernel's tools call it: ``ReadFile``, ``WriteFile``, ``Stat``
    and ``ListDir`` over one ``Session`` stream, ``Spawn`` and ``ListComputers`` as the
    stub's own calls (a spawn is a stream of its own; listing computers is rare)."""

    def __init__(self, stub: exec_pb2_grpc.ExecAsyncStub):
        self.stub = stub
        self.Spawn = stub.Spawn
        self.ListComputers = stub.ListComputers
        self.mux: MuxClient[exec_pb2.ExecSessionRequest, exec_pb2.ExecSessionResponse] = MuxClient(
            stub.Session, "exec session"
        )

    async def _call(
        self, request: exec_pb2.ExecSessionRequest, timeout: float
    ) -> exec_pb2.ExecSessionResponse:
        kind = request.WhichOneof("call")
        reply = await self.mux.call(request, timeout)
        if reply.WhichOneof("result") != kind:
            # Only an exec that speaks another version of the protocol answers this.
            raise rpc_error(
                grpc.StatusCode.INTERNAL, f"exec answered a {kind} call with {reply.WhichOneof('result')}"
            )
        return reply

    async def ReadFile(self, request: exec_pb2.ReadFileRequest, timeout: float) -> exec_pb2.ReadFileResponse:
        return (await self._call(exec_pb2.ExecSessionRequest(read_file=request), timeout)).read_file

    async def WriteFile(
        self, request: exec_pb2.WriteFileRequest, timeout: float
    ) -> exec_pb2.WriteFileResponse:
        return (await self._call(exec_pb2.ExecSessionRequest(write_file=request), timeout)).write_file

    async def Stat(self, request: exec_pb2.StatRequest, timeout: float) -> exec_pb2.FileInfo:
        return (await self._call(exec_pb2.ExecSessionRequest(stat=request), timeout)).stat

    async def ListDir(self, request: exec_pb2.ListDirRequest, timeout: float) -> exec_pb2.ListDirResponse:
        return (await self._call(exec_pb2.ExecSessionRequest(list_dir=request), timeout)).list_dir

    async def close(self) -> None:
        await self.mux.close()


if TYPE_CHECKING:
    # What a tool or the kernel calls exec through: the plain stub (tests) or the session
    # client. (The async stub type exists for the type checker only.)
    Exec: TypeAlias = exec_pb2_grpc.ExecAsyncStub | ExecClient
