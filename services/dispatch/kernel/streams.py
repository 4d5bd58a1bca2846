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

import logging
from typing import TYPE_CHECKING, TypeAlias

import grpc

from dispatch.shared.mux import MuxClient, rpc_error
from dispatch.v1 import exec_pb2, exec_pb2_grpc, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)

# Each Session call's unary method.
_UNARY = {"read_file": "ReadFile", "write_file": "WriteFile", "stat": "Stat", "list_dir": "ListDir"}


class StoreAppends:
    """``Append`` over ``AppendStream``: every turn of a kernel shares the one stream.

    A store without ``AppendStream`` (an older one, mid-upgrade) answers UNIMPLEMENTED:
    the call that learnt it is made unary (it never ran: the method does not exist there),
    and so is every later one."""

    def __init__(self, store: store_pb2_grpc.ConversationStoreAsyncStub):
        self.store = store
        self.unary = False
        self.mux: MuxClient[store_pb2.AppendStreamRequest, store_pb2.AppendStreamResponse] = MuxClient(
            store.AppendStream, "store append"
        )

    async def Append(self, request: store_pb2.AppendRequest, timeout: float) -> store_pb2.AppendResponse:
        if not self.unary:
            try:
                reply = await self.mux.call(store_pb2.AppendStreamRequest(append=request), timeout)
                return reply.append
            except grpc.aio.AioRpcError:
                if not self.mux.unimplemented:
                    raise
                self.unary = True
                log.warning("the store has no AppendStream (an older version?): appending with unary calls")
        resp: store_pb2.AppendResponse = await self.store.Append(request, timeout=timeout)
        return resp

    async def close(self) -> None:
        await self.mux.close()


class ExecClient:
    """The exec service as the kernel's tools call it: ``ReadFile``, ``WriteFile``, ``Stat``
    and ``ListDir`` over one ``Session`` stream, ``Spawn`` and ``ListComputers`` as the
    stub's own calls (a spawn is a stream of its own; listing computers is rare)."""

    def __init__(self, stub: exec_pb2_grpc.ExecAsyncStub):
        self.stub = stub
        # An exec without Session (older, mid-upgrade): every call unary, as with the stub.
        self.unary = False
        self.Spawn = stub.Spawn
        self.ListComputers = stub.ListComputers
        self.mux: MuxClient[exec_pb2.ExecSessionRequest, exec_pb2.ExecSessionResponse] = MuxClient(
            stub.Session, "exec session"
        )

    async def _call(
        self, request: exec_pb2.ExecSessionRequest, timeout: float
    ) -> exec_pb2.ExecSessionResponse:
        kind = request.WhichOneof("call")
        assert kind is not None
        if not self.unary:
            try:
                reply = await self.mux.call(request, timeout)
            except grpc.aio.AioRpcError:
                if not self.mux.unimplemented:
                    raise
                self.unary = True
                log.warning("exec has no Session (an older version?): file calls go unary")
        if self.unary:
            method = getattr(self.stub, _UNARY[kind])
            answer = await method(getattr(request, kind), timeout=timeout)
            return exec_pb2.ExecSessionResponse(**{kind: answer})
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
