"""An in-process exec server on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dispatch.exec.server import start
from dispatch.shared.config import ExecConfig
from dispatch.v1 import exec_pb2_grpc
from tests.exec.helpers import OUTPUT_CAP, READ_CAP


@pytest.fixture
async def stub() -> AsyncIterator[exec_pb2_grpc.ExecAsyncStub]:
    hosted = await start(
        ExecConfig(listen="127.0.0.1:0", max_output_bytes=OUTPUT_CAP, max_read_bytes=READ_CAP)
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}")
    try:
        yield exec_pb2_grpc.ExecStub(channel)
    finally:
        await channel.close()
        await hosted.stop(0)


@pytest.fixture
def real_tmp(tmp_path: Path) -> Path:
    """``tmp_path`` with symlinks resolved, as ``pwd -P`` prints it."""
    return tmp_path.resolve()
