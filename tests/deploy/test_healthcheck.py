"""``dispatch-healthcheck`` (deploy/healthcheck.py), the image's health check and the exec
sidecar's probe, run as a process against real servers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from dispatch.shared.config import TransportConfig
from dispatch.transport.server import start as start_transport
from tests.deploy.tools import ROOT
from tests.e2e.procs import free_port
from tests.stack import Stack, start_stack

SCRIPT = ROOT / "deploy" / "healthcheck.py"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path)
    s.hosted["transport"] = await start_transport(
        TransportConfig(
            listen="127.0.0.1:0",
            kernel_address=s.address("kernel"),
            store_address=s.address("store"),
            http_listen="127.0.0.1:0",
        )
    )
    yield s
    await s.stop()


async def healthcheck(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), *args, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_grpc_serving_not_serving_and_unreachable(stack: Stack) -> None:
    assert await healthcheck("grpc", stack.address("exec")) == (0, "")
    assert (await healthcheck("grpc", stack.address("transport"), "dispatch.v1.Dispatch"))[0] == 0
    await stack.hosted["exec"].health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    code, err = await healthcheck("grpc", stack.address("exec"))
    assert code == 1
    assert "NOT_SERVING" in err
    code, err = await healthcheck("grpc", f"127.0.0.1:{free_port()}")
    assert code == 1
    assert "unreachable: UNAVAILABLE" in err


async def test_http_readyz(stack: Stack) -> None:
    readyz = f"http://127.0.0.1:{stack.hosted['transport'].http_port}/readyz"
    assert await healthcheck("http", readyz) == (0, "")
    await stack.hosted.pop("kernel").stop(0)
    code, err = await healthcheck("http", readyz)
    assert code == 1
    assert "HTTP 503" in err
    assert "kernel: unreachable (UNAVAILABLE)" in err


async def test_usage() -> None:
    code, err = await healthcheck("tcp", "x")
    assert code == 2
    assert "dispatch-healthcheck grpc HOST:PORT" in err
