"""Exec's Session stream answers ReadFile, WriteFile, Stat and ListDir exactly as their unary
RPCs do (issue 14: the kernel's file calls travel on one stream), through the client the
kernel uses (``ExecClient``): the same answers, the same computer selection, the same
errors with the same status and details."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from dispatch.kernel.streams import ExecClient
from dispatch.shared.mux import MuxClient
from dispatch.v1 import exec_pb2, exec_pb2_grpc
from tests.exec.helpers import READ_CAP

if TYPE_CHECKING:
    from dispatch.v1.exec_pb2_grpc import ExecAsyncStub as Stub

TIMEOUT = 30.0


@pytest.fixture
async def session(stub: Stub) -> AsyncIterator[ExecClient]:
    client = ExecClient(stub)
    yield client
    await client.close()


# Each case: the method, and its request given the test's directory.
Case = tuple[str, Callable[[Path], Any]]
CASES: dict[str, Case] = {
    "read": ("ReadFile", lambda d: exec_pb2.ReadFileRequest(path=str(d / "f.txt"))),
    "read-part": ("ReadFile", lambda d: exec_pb2.ReadFileRequest(path=str(d / "f.txt"), offset=2, limit=3)),
    "read-over-cap": ("ReadFile", lambda d: exec_pb2.ReadFileRequest(path=str(d / "big.bin"))),
    "read-missing": ("ReadFile", lambda d: exec_pb2.ReadFileRequest(path=str(d / "nope"))),
    "read-a-directory": ("ReadFile", lambda d: exec_pb2.ReadFileRequest(path=str(d / "sub"))),
    "read-relative": ("ReadFile", lambda d: exec_pb2.ReadFileRequest(path="f.txt")),
    "read-unknown-computer": (
        "ReadFile",
        lambda d: exec_pb2.ReadFileRequest(computer_id="build-box", path=str(d / "f.txt")),
    ),
    "write": (
        "WriteFile",
        lambda d: exec_pb2.WriteFileRequest(path=str(d / "new.txt"), data=b"new", mode=0o600),
    ),
    "write-over-a-directory": (
        "WriteFile",
        lambda d: exec_pb2.WriteFileRequest(path=str(d / "sub"), data=b"x"),
    ),
    "write-making-its-dirs": (
        "WriteFile",
        lambda d: exec_pb2.WriteFileRequest(path=str(d / "no" / "such" / "dir" / "x"), data=b"x"),
    ),
    "write-unknown-computer": (
        "WriteFile",
        lambda d: exec_pb2.WriteFileRequest(computer_id="build-box", path=str(d / "x"), data=b"x"),
    ),
    "stat": ("Stat", lambda d: exec_pb2.StatRequest(path=str(d / "f.txt"))),
    "stat-link": ("Stat", lambda d: exec_pb2.StatRequest(path=str(d / "link"))),
    "stat-missing": ("Stat", lambda d: exec_pb2.StatRequest(path=str(d / "nope"))),
    "list": ("ListDir", lambda d: exec_pb2.ListDirRequest(path=str(d))),
    "list-a-file": ("ListDir", lambda d: exec_pb2.ListDirRequest(path=str(d / "f.txt"))),
    "list-unknown-computer": (
        "ListDir",
        lambda d: exec_pb2.ListDirRequest(computer_id="build-box", path="/"),
    ),
}


def populate(d: Path) -> None:
    (d / "f.txt").write_text("hello world\n")
    (d / "big.bin").write_bytes(b"x" * (READ_CAP + 10))
    (d / "sub").mkdir()
    (d / "link").symlink_to("f.txt")


async def outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", await call
    except grpc.aio.AioRpcError as exc:
        return "error", (exc.code(), exc.details())


@pytest.mark.parametrize("case", list(CASES))
async def test_a_session_call_answers_as_the_unary_call_does(
    stub: Stub, session: ExecClient, real_tmp: Path, case: str
) -> None:
    method, make = CASES[case]
    populate(real_tmp)
    unary = await outcome(getattr(stub, method)(make(real_tmp), timeout=TIMEOUT))
    streamed = await outcome(getattr(session, method)(make(real_tmp), timeout=TIMEOUT))
    refused = ("missing", "a-directory", "relative", "unknown", "a-file")
    assert (unary[0] == "error") == any(word in case for word in refused), unary
    assert streamed == unary
    if case == "write":
        assert (real_tmp / "new.txt").read_bytes() == b"new"
        assert ((real_tmp / "new.txt").stat().st_mode & 0o777) == 0o600


async def test_a_session_request_of_no_kind_is_invalid(stub: Stub) -> None:
    client: MuxClient[exec_pb2.ExecSessionRequest, exec_pb2.ExecSessionResponse] = MuxClient(
        stub.Session, "exec session"
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.call(exec_pb2.ExecSessionRequest(), TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "read_file, write_file, stat, list_dir" in (err.value.details() or "")
    finally:
        await client.close()


async def test_the_calls_of_a_session_share_one_stream_and_run_side_by_side(
    session: ExecClient, real_tmp: Path
) -> None:
    populate(real_tmp)
    read = session.ReadFile(exec_pb2.ReadFileRequest(path=str(real_tmp / "f.txt")), timeout=TIMEOUT)
    writes = [
        session.WriteFile(
            exec_pb2.WriteFileRequest(path=str(real_tmp / f"w{i}"), data=str(i).encode()), timeout=TIMEOUT
        )
        for i in range(10)
    ]
    got, written = await asyncio.gather(read, asyncio.gather(*writes))
    assert got.data == b"hello world\n"
    assert [w.bytes_written for w in written] == [1] * 10
    listed = await session.ListDir(exec_pb2.ListDirRequest(path=str(real_tmp)), timeout=TIMEOUT)
    assert {e.name for e in listed.entries} >= {f"w{i}" for i in range(10)}
    assert session.mux.opened == 1


class OlderExec(exec_pb2_grpc.ExecServicer):
    """An exec of before Session: unary file calls only (forwarded to the real one)."""

    def __init__(self, real: Stub):
        self.real = real

    async def ReadFile(self, request: exec_pb2.ReadFileRequest, context: object) -> exec_pb2.ReadFileResponse:
        resp: exec_pb2.ReadFileResponse = await self.real.ReadFile(request, timeout=TIMEOUT)
        return resp

    async def Stat(self, request: exec_pb2.StatRequest, context: object) -> exec_pb2.FileInfo:
        resp: exec_pb2.FileInfo = await self.real.Stat(request, timeout=TIMEOUT)
        return resp


async def test_file_calls_fall_back_to_unary_on_an_exec_without_session(stub: Stub, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"hello")
    server = grpc.aio.server()
    exec_pb2_grpc.add_ExecServicer_to_server(OlderExec(stub), server)  # type: ignore[abstract]  # the rest: UNIMPLEMENTED
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = ExecClient(exec_pb2_grpc.ExecStub(channel))
    try:
        read = await client.ReadFile(exec_pb2.ReadFileRequest(path=str(tmp_path / "f.txt")), timeout=TIMEOUT)
        assert read.data == b"hello"
        assert client.unary and client.mux.unimplemented
        info = await client.Stat(exec_pb2.StatRequest(path=str(tmp_path / "f.txt")), timeout=TIMEOUT)
        assert info.size == 5
    finally:
        await client.close()
        await channel.close()
        await server.stop(0)
