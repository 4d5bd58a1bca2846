"""``/healthz`` and ``/readyz`` on the HTTP bridge, over real HTTP, of a transport started as
``dispatchd transport --http-listen`` starts it, in front of real kernel and store servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from grpc_health.v1 import health_pb2

from dispatch.kernel.server import start as start_kernel
from dispatch.shared.config import KernelConfig, TransportConfig
from dispatch.shared.server import Hosted
from dispatch.transport.server import start as start_transport
from tests.stack import Stack, start_stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Store, exec and kernel in-process, and a transport with its HTTP bridge on port 0."""
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


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    port = stack.hosted["transport"].http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
        yield client


async def readyz(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await http.get("/readyz")
    assert response.headers["content-type"].startswith("application/json")
    return response.status_code, response.json()


async def ready_again(http: httpx.AsyncClient) -> dict[str, Any]:
    """/readyz's body once it answers 200 (a channel reconnects after a backoff of up to 2 s)."""
    for _ in range(200):
        status, body = await readyz(http)
        if status == 200:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz stayed {status}: {body}")


async def test_ready_with_every_backend_serving(http: httpx.AsyncClient) -> None:
    health = await http.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    status, body = await readyz(http)
    assert status == 200
    assert body == {
        "status": "ready",
        "checks": {"transport": "serving", "kernel": "serving", "store": "serving"},
    }


async def test_probes_need_no_key_and_take_no_query(http: httpx.AsyncClient) -> None:
    # No Authorization header above; a wrong one changes nothing either.
    response = await http.get("/readyz", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 200
    response = await http.get("/healthz?verbose=1")
    assert response.status_code == 400
    assert "verbose" in response.json()["error"]["message"]


async def test_kernel_stopped_is_not_ready_until_it_is_back(stack: Stack, http: httpx.AsyncClient) -> None:
    kernel_port = stack.hosted["kernel"].port
    await stack.hosted.pop("kernel").stop(0)

    status, body = await readyz(http)
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["checks"]["kernel"] == "unreachable (UNAVAILABLE)"
    assert body["checks"]["store"] == "serving"
    assert body["checks"]["transport"] == "serving"
    assert body["error"] == {
        "code": "UNAVAILABLE",
        "message": "not ready: kernel: unreachable (UNAVAILABLE)",
    }
    assert "127.0.0.1" not in str(body)  # no internal address
    # The process itself is alive: liveness must not restart it for its kernel's sake.
    health = await http.get("/healthz")
    assert health.status_code == 200

    # A kernel back on the same address: the transport's channel reconnects, ready again.
    stack.hosted["kernel"] = await start_kernel(
        KernelConfig(
            listen=f"127.0.0.1:{kernel_port}",
            store_address=stack.address("store"),
            exec_address=stack.address("exec"),
        )
    )
    body = await ready_again(http)
    assert body["checks"]["kernel"] == "serving"


async def test_draining_kernel_is_not_ready(stack: Stack, http: httpx.AsyncClient) -> None:
    # The first thing a kernel does on SIGTERM (Hosted.stop) is turn NOT_SERVING; it then
    # hands its turns over. A transport in front of it is not ready for new turns meanwhile.
    kernel: Hosted = stack.hosted["kernel"]
    await kernel.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    status, body = await readyz(http)
    assert status == 503
    assert body["checks"]["kernel"] == "not_serving"
    assert body["error"]["message"] == "not ready: kernel: not_serving"


async def test_store_stopped_is_not_ready(stack: Stack, http: httpx.AsyncClient) -> None:
    await stack.hosted.pop("store").stop(0)
    status, body = await readyz(http)
    assert status == 503
    assert body["checks"]["store"] == "unreachable (UNAVAILABLE)"
    assert body["checks"]["kernel"] == "serving"


async def test_transport_stopping_is_not_ready(stack: Stack, http: httpx.AsyncClient) -> None:
    # Hosted.stop turns the transport's own service NOT_SERVING before it drains.
    transport: Hosted = stack.hosted["transport"]
    await transport.health.set("dispatch.v1.Dispatch", health_pb2.HealthCheckResponse.NOT_SERVING)
    status, body = await readyz(http)
    assert status == 503
    assert body["checks"]["transport"] == "not_serving"


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    """As ``stack``, with a transport that finds its kernels through the store (--kernel store)."""
    s = await start_stack(tmp_path)
    s.hosted["transport"] = await start_transport(
        TransportConfig(
            listen="127.0.0.1:0",
            kernel_address="store",
            store_address=s.address("store"),
            http_listen="127.0.0.1:0",
        )
    )
    port = s.hosted["transport"].http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
        yield s, client
    await s.stop()


async def test_kernels_found_through_the_store(routed: tuple[Stack, httpx.AsyncClient]) -> None:
    stack, http = routed
    body = await ready_again(http)
    assert body["checks"] == {"transport": "serving", "kernel": "serving", "store": "serving"}

    # A kernel that stops retires its heartbeat row as it drains: not ready at once (its
    # address no longer answers), and once the list of live kernels (at most a second old)
    # is read again, none is live.
    await stack.hosted.pop("kernel").stop(1.0)
    seen = []
    for _ in range(100):
        status, body = await readyz(http)
        assert status == 503
        seen.append(body["checks"]["kernel"])
        if seen[-1].startswith("none live"):
            break
        await asyncio.sleep(0.05)
    assert set(seen) <= {"unreachable (UNAVAILABLE)", "none live (no kernel heartbeat in the store)"}
    assert seen[-1] == "none live (no kernel heartbeat in the store)"

    # Another kernel, anywhere: it advertises itself, and the transport is ready again.
    stack.hosted["kernel"] = await start_kernel(
        KernelConfig(
            listen="127.0.0.1:0", store_address=stack.address("store"), exec_address=stack.address("exec")
        )
    )
    body = await ready_again(http)
    assert body["checks"]["kernel"] == "serving"


async def test_store_gone_with_kernels_found_through_it(routed: tuple[Stack, httpx.AsyncClient]) -> None:
    stack, http = routed
    await ready_again(http)
    await stack.hosted.pop("store").stop(0)
    body: dict[str, Any] = {}
    for _ in range(100):  # the list of live kernels may be a second old
        status, body = await readyz(http)
        if body["checks"]["kernel"] != "serving":
            break
        await asyncio.sleep(0.05)
    assert status == 503
    assert body["checks"]["store"] == "unreachable (UNAVAILABLE)"
    assert body["checks"]["kernel"] == "unknown (the store did not list the kernels)"
