"""Start the transport service."""

from __future__ import annotations

import grpc

from dispatch.shared.config import TransportConfig
from dispatch.shared.errors import Unavailable
from dispatch.shared.server import GRPC_OPTIONS, Hosted, Service, bound_address, start_server
from dispatch.transport.http import HttpBridge, health_of, start_http
from dispatch.transport.kernels import Kernels
from dispatch.transport.service import DispatchServicer
from dispatch.transport.tokens import StreamTokens
from dispatch.v1 import store_pb2_grpc, transport_pb2_grpc


async def kernel_ready(kernels: Kernels) -> str:
    """/readyz's kernel check: the kernel this transport sends calls to answers SERVING (with
    --kernel store: the first live kernel it would ask; none live is not ready)."""
    if kernels.discover:
        try:
            if not await kernels.live():
                return "none live (no kernel heartbeat in the store)"
            route = await kernels.any()
        except Unavailable:
            return "unknown (the store did not list the kernels)"
    else:
        assert kernels.static is not None
        route = kernels.static
    if route.channel is None:
        return "unreachable (no channel)"
    return await health_of(route.channel)


async def start(cfg: TransportConfig) -> Hosted:
    store_channel = grpc.aio.insecure_channel(cfg.store_address, options=GRPC_OPTIONS)
    store = store_pb2_grpc.ConversationStoreStub(store_channel)
    # One kernel at a fixed address, or every kernel the store knows (--kernel store).
    kernels = Kernels(cfg.kernel_address, store, cfg.rpc_timeout)
    one = kernels.static
    servicer = DispatchServicer(
        None if one is None else one.stub,
        store,
        cfg.rpc_timeout,
        kernel_events=None if one is None else one.open_stream,
        kernels=kernels if kernels.discover else None,
        stream_tokens=StreamTokens.from_config(cfg.stream_token_secret),
    )
    hosted = await start_server(
        [
            Service(
                "dispatch.v1.Dispatch",
                lambda server: transport_pb2_grpc.add_DispatchServicer_to_server(servicer, server),
            )
        ],
        cfg.listen,
        max_receive_bytes=cfg.max_request_bytes,
    )

    bridge: HttpBridge | None = None
    if cfg.http_listen:
        try:
            bridge = await start_http(
                cfg.http_listen,
                bound_address(cfg.listen, hosted.port),
                rpc_timeout=cfg.rpc_timeout,
                checks={"kernel": lambda: kernel_ready(kernels), "store": lambda: health_of(store_channel)},
                cors_origins=cfg.cors_origins,
            )
        except BaseException:
            await hosted.stop(0)
            await kernels.close()
            await store_channel.close()
            raise
        hosted.http_port = bridge.port

    async def drain(grace: float) -> None:
        # Every event stream ends at once, telling its client to subscribe again (to
        # another transport); unary calls in flight finish within the grace.
        await servicer.fanout.close()
        if bridge is not None:
            await bridge.stop()

    hosted.drain = drain

    async def close() -> None:
        if bridge is not None:
            await bridge.stop()
        await servicer.fanout.close()
        await kernels.close()
        await store_channel.close()

    hosted.closers.append(close)
    return hosted
