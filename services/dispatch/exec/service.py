"""The Exec gRPC servicer: protobuf in, backend calls, protobuf out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from dispatch.exec.backend import Exit, FileInfo, FileType, OutputBatch, SpawnEvent, Stream
from dispatch.exec.computers import Computers
from dispatch.shared.errors import Context, InvalidArgument, grpc_errors
from dispatch.shared.mux import MuxServer
from dispatch.shared.timeutil import duration, ts_from_ns
from dispatch.v1 import common_pb2, exec_pb2, exec_pb2_grpc

_STREAMS = {Stream.STDOUT: common_pb2.OUTPUT_STREAM_STDOUT, Stream.STDERR: common_pb2.OUTPUT_STREAM_STDERR}
_FILE_TYPES = {
    FileType.FILE: exec_pb2.FILE_TYPE_FILE,
    FileType.DIRECTORY: exec_pb2.FILE_TYPE_DIRECTORY,
    FileType.SYMLINK: exec_pb2.FILE_TYPE_SYMLINK,
    FileType.OTHER: exec_pb2.FILE_TYPE_OTHER,
}


class ExecServicer(exec_pb2_grpc.ExecServicer):
    """Serves ``dispatch.v1.Exec`` over the backends ``computers`` resolves."""

    def __init__(self, computers: Computers):
        self.computers = computers
        # Session's calls: each answered by its unary method itself, so checks, computer
        # selection and errors are the same either way.
        self.sessions: MuxServer[exec_pb2.ExecSessionRequest, exec_pb2.ExecSessionResponse] = MuxServer(
            self._session_call, exec_pb2.ExecSessionResponse, what="exec session"
        )

    @grpc_errors
    async def Spawn(
        self, request: exec_pb2.SpawnRequest, context: Context
    ) -> AsyncIterator[exec_pb2.SpawnResponse]:
        backend = self.computers.resolve(request.computer_id)
        events = backend.spawn(
            list(request.argv),
            cwd=request.cwd,
            env=dict(request.env),
            stdin=request.stdin,
            timeout=request.timeout.ToNanoseconds() / 1e9,
            max_output_bytes=request.max_output_bytes,
        )
        # Closing the backend's generator is what kills the process group, so
        # it must not wait for garbage collection when this stream ends early.
        async with contextlib.aclosing(events):
            async for event in events:
                yield _spawn_response(event)

    @grpc_errors
    async def ReadFile(
        self, request: exec_pb2.ReadFileRequest, context: Context
    ) -> exec_pb2.ReadFileResponse:
        backend = self.computers.resolve(request.computer_id)
        got = await backend.read_file(request.path, request.offset, request.limit)
        return exec_pb2.ReadFileResponse(data=got.data, size=got.size, truncated=got.truncated)

    @grpc_errors
    async def WriteFile(
        self, request: exec_pb2.WriteFileRequest, context: Context
    ) -> exec_pb2.WriteFileResponse:
        backend = self.computers.resolve(request.computer_id)
        written = await backend.write_file(request.path, request.data, request.mode)
        return exec_pb2.WriteFileResponse(bytes_written=written)

    @grpc_errors
    async def Stat(self, request: exec_pb2.StatRequest, context: Context) -> exec_pb2.FileInfo:
        backend = self.computers.resolve(request.computer_id)
        return _file_info(await backend.stat(request.path))

    @grpc_errors
    async def ListDir(self, request: exec_pb2.ListDirRequest, context: Context) -> exec_pb2.ListDirResponse:
        backend = self.computers.resolve(request.computer_id)
        entries = await backend.list_dir(request.path)
        return exec_pb2.ListDirResponse(entries=[_file_info(e) for e in entries])

    async def Session(
        self, request_iterator: AsyncIterator[exec_pb2.ExecSessionRequest], context: Context
    ) -> AsyncIterator[exec_pb2.ExecSessionResponse]:
        async for reply in self.sessions.serve(request_iterator, context):
            yield reply

    @grpc_errors
    async def _session_call(
        self, request: exec_pb2.ExecSessionRequest, context: Context
    ) -> exec_pb2.ExecSessionResponse:
        kind = request.WhichOneof("call")
        if kind == "read_file":
            return exec_pb2.ExecSessionResponse(read_file=await self.ReadFile(request.read_file, context))
        if kind == "write_file":
            return exec_pb2.ExecSessionResponse(write_file=await self.WriteFile(request.write_file, context))
        if kind == "stat":
            return exec_pb2.ExecSessionResponse(stat=await self.Stat(request.stat, context))
        if kind == "list_dir":
            return exec_pb2.ExecSessionResponse(list_dir=await self.ListDir(request.list_dir, context))
        raise InvalidArgument("an exec session request needs one of read_file, write_file, stat, list_dir")

    @grpc_errors
    async def ListComputers(
        self, request: exec_pb2.ListComputersRequest, context: Context
    ) -> exec_pb2.ListComputersResponse:
        return exec_pb2.ListComputersResponse(
            computers=[
                common_pb2.Computer(id=c.id, host_name=c.host_name, user=c.user, port=c.port, local=c.local)
                for c in self.computers.list()
            ]
        )


def _spawn_response(event: SpawnEvent) -> exec_pb2.SpawnResponse:
    if isinstance(event, OutputBatch):
        return exec_pb2.SpawnResponse(
            output=exec_pb2.OutputBatch(
                chunks=[exec_pb2.OutputChunk(stream=_STREAMS[c.stream], data=c.data) for c in event.chunks]
            )
        )
    return exec_pb2.SpawnResponse(exit=_exit(event))


def _exit(event: Exit) -> exec_pb2.Exit:
    msg = exec_pb2.Exit(
        timed_out=event.timed_out, truncated=event.truncated, duration=duration(event.duration)
    )
    if event.exit_code is not None:
        msg.exit_code = event.exit_code
    if event.signal is not None:
        msg.signal = event.signal
    return msg


def _file_info(info: FileInfo) -> exec_pb2.FileInfo:
    return exec_pb2.FileInfo(
        name=info.name,
        path=info.path,
        type=_FILE_TYPES[info.type],
        size=info.size,
        mode=info.mode,
        modified_at=ts_from_ns(info.modified_ns),
        symlink_target=info.symlink_target,
    )
