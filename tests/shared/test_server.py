"""The shared service lifecycle: health, drain, stop."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatch.shared.server import bound_address, start_server


async def test_stop_turns_not_serving_then_drains_then_stops() -> None:
    draining = asyncio.Event()
    release = asyncio.Event()
    drained_with: list[float] = []

    async def drain(grace: float) -> None:
        drained_with.append(grace)
        draining.set()
        await release.wait()

    hosted = await start_server([], "127.0.0.1:0", drain=drain)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check  # type: ignore[attr-defined]
        assert (await check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(hosted.stop(5.0))
        await asyncio.wait_for(draining.wait(), 5)
        # While in-flight work drains, the server still answers, and says NOT_SERVING.
        assert (
            await check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stopping.done()
        release.set()
        await asyncio.wait_for(stopping, 5)
    assert drained_with == [5.0]


async def test_a_drain_that_overruns_the_grace_period_is_cut_short() -> None:
    async def drain(grace: float) -> None:
        await asyncio.sleep(3600)

    hosted = await start_server([], "127.0.0.1:0", drain=drain)
    await asyncio.wait_for(hosted.stop(0.2), 5)


def test_bound_address_names_a_reachable_host() -> None:
    assert bound_address("0.0.0.0:0", 5000) == "127.0.0.1:5000"
    assert bound_address("127.0.0.1:0", 5000) == "127.0.0.1:5000"
    assert bound_address("[::]:0", 7) == "127.0.0.1:7"


def test_services_run_on_uvloop() -> None:
    import uvloop

    from dispatch.shared.server import run

    seen: list[type] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))

    run(main)
    assert seen == [uvloop.Loop]
