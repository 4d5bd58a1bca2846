"""Running a spawn to completion, and watching processes die."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.v1 import common_pb2, exec_pb2, exec_pb2_grpc

# Small caps so the tests can cross them cheaply.
OUTPUT_CAP = 64 * 1024
READ_CAP = 4096


@dataclass
class Ran:
    """Everything one Spawn answered."""

    stdout: bytes = b""
    stderr: bytes = b""
    batches: list[exec_pb2.OutputBatch] = field(default_factory=list)
    exit: exec_pb2.Exit | None = None


async def spawn(stub: exec_pb2_grpc.ExecAsyncStub, request: exec_pb2.SpawnRequest) -> Ran:
    """Run ``request`` to completion; fails if anything follows the exit."""
    ran = Ran()
    async for resp in stub.Spawn(request):
        assert ran.exit is None, "nothing may follow the exit"
        if resp.WhichOneof("kind") == "output":
            ran.batches.append(resp.output)
            for chunk in resp.output.chunks:
                if chunk.stream == common_pb2.OUTPUT_STREAM_STDOUT:
                    ran.stdout += chunk.data
                else:
                    assert chunk.stream == common_pb2.OUTPUT_STREAM_STDERR
                    ran.stderr += chunk.data
        else:
            ran.exit = resp.exit
    assert ran.exit is not None, "the stream ended without an exit"
    return ran


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def still_alive(pids: Iterable[int], within: float = 5.0) -> list[int]:
    """The ``pids`` still running after waiting up to ``within`` seconds for them to die."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    left = [pid for pid in pids if alive(pid)]
    while left and loop.time() < deadline:
        await asyncio.sleep(0.02)
        left = [pid for pid in left if alive(pid)]
    return left


def written_bytes(pid: int) -> int:
    """Bytes process ``pid`` (on this machine) has written so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")
