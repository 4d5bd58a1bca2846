"""The shared service lifecycle: health, drain, stop; addresses, keepalive, undecodable requests."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatch.shared.config import ListenError
from dispatch.shared.server import (
    KEEPALIVE_MS,
    bound_address,
    channel_options,
    server_options,
    start_server,
)


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


# ------------------------------------------------------------------ undecodable requests

UTF8_BAD = b"\x0a\x03\xff\xfe\xfd"  # field 1 (a string) holding bytes that are not UTF-8
CORRUPT = b"\x0a\x10ab"  # field 1 claims 16 bytes and has 2


@pytest.mark.parametrize("payload", [UTF8_BAD, CORRUPT], ids=["bad-utf8", "corrupt"])
async def test_undecodable_requests_are_invalid_argument_on_every_kind_of_method(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    hosted = await start_server([], "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}") as channel:
            # Raw bytes in, raw bytes out: no serializer stands between the test and the wire.
            unary: Any = channel.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(payload, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not be decoded" in (info.value.details() or "")
            # A server stream (Health.Watch) and a bidirectional one (reflection).
            watch: Any = channel.unary_stream("/grpc.health.v1.Health/Watch")
            reflect: Any = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            )
            for call in (watch(payload, timeout=5), reflect(iter([payload]), timeout=5)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The service still answers properly afterwards.
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check  # type: ignore[attr-defined]
            answer = await check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await hosted.stop(0)
    assert "Traceback" not in caplog.text and "Unexpected" not in caplog.text


# ------------------------------------------------------------------ addresses


async def test_an_address_in_use_is_refused_not_shared() -> None:
    first = await start_server([], "127.0.0.1:0")
    try:
        with pytest.raises(ListenError, match=r"already in use.*--listen"):
            await start_server([], f"127.0.0.1:{first.port}")
    finally:
        await first.stop(0)


@pytest.mark.parametrize(
    ("listen", "words"),
    [("127.0.0.1:99999", "0 to 65535"), ("localhost:abc", "0 to 65535"), ("7600", "host:port")],
)
async def test_a_malformed_address_is_refused(listen: str, words: str) -> None:
    with pytest.raises(ListenError, match=words):
        await start_server([], listen)


# ------------------------------------------------------------------ keepalive


async def test_idle_channels_keepalive_pings_are_welcome(capfd: pytest.CaptureFixture[str]) -> None:
    """The channels ping idle connections every KEEPALIVE_MS; a server that polices pings
    more strictly than that answers GOAWAY too_many_pings (logged by grpc on both sides).
    Here both sides run at 1/30 of the real interval, for a few pings' worth of idling."""
    keepalive_ms = 1000
    hosted = await start_server([], "127.0.0.1:0", keepalive_ms=keepalive_ms)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{hosted.port}", options=channel_options(keepalive_ms)
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check  # type: ignore[attr-defined]
            await check(health_pb2.HealthCheckRequest(), timeout=5)
            await asyncio.sleep(6 * keepalive_ms / 1000)  # idle: only keepalive pings
            await check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await hosted.stop(0)
    logged = capfd.readouterr().err
    assert "too_many_pings" not in logged and "GOAWAY" not in logged


def test_server_and_channel_options_agree() -> None:
    for keepalive_ms in (1000, KEEPALIVE_MS):
        server = dict(server_options(keepalive_ms))
        channel = dict(channel_options(keepalive_ms))
        assert server["grpc.so_reuseport"] == 0
        assert server["grpc.keepalive_permit_without_calls"] == 1
        assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] < channel["grpc.keepalive_time_ms"]


def test_settle_heap_freezes_what_start_up_made() -> None:
    import gc

    from dispatch.shared.server import settle_heap

    try:
        settle_heap()
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's way
    finally:
        gc.unfreeze()
