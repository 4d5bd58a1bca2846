"""The Exec servicer: computer resolution, ListComputers, and the server's lifecycle."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from dispatch.exec.server import start
from dispatch.shared.config import ExecConfig
from dispatch.v1 import exec_pb2, exec_pb2_grpc
from tests.exec.helpers import spawn, still_alive

if TYPE_CHECKING:
    from dispatch.v1.exec_pb2_grpc import ExecAsyncStub as Stub

UNKNOWN: dict[str, Any] = {
    "Spawn": exec_pb2.SpawnRequest(computer_id="build-box", argv=["true"]),
    "ReadFile": exec_pb2.ReadFileRequest(computer_id="build-box", path="/etc/hostname"),
    "WriteFile": exec_pb2.WriteFileRequest(computer_id="build-box", path="/tmp/x", data=b"x"),
    "Stat": exec_pb2.StatRequest(computer_id="build-box", path="/"),
    "ListDir": exec_pb2.ListDirRequest(computer_id="build-box", path="/"),
}


@pytest.mark.parametrize("method", sorted(UNKNOWN))
async def test_an_unknown_computer_is_not_found(stub: Stub, method: str) -> None:
    request = UNKNOWN[method]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if method == "Spawn":
            await spawn(stub, request)
        else:
            await getattr(stub, method)(request)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == ("unknown computer 'build-box': no SSH host with that alias is configured")


async def test_list_computers_shows_this_machine(stub: Stub) -> None:
    resp = await stub.ListComputers(exec_pb2.ListComputersRequest())
    assert [(c.id, c.host_name, c.local) for c in resp.computers] == [("", socket.gethostname(), True)]


async def test_stopping_the_server_kills_running_spawns() -> None:
    hosted = await start(ExecConfig(listen="127.0.0.1:0"))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}")
    try:
        call = exec_pb2_grpc.ExecStub(channel).Spawn(
            exec_pb2.SpawnRequest(argv=["sh", "-c", "sleep 100 & echo $$ $!; wait"])
        )
        first = await call.read()
        assert isinstance(first, exec_pb2.SpawnResponse)
        pids = [int(word) for word in first.output.chunks[0].data.split()]
        await hosted.stop(0)
        assert await still_alive(pids) == []
    finally:
        await channel.close()
        await hosted.stop(0)
