"""Start the transport service."""

from __future__ import annotations

import grpc

from dispatch.shared.config import TransportConfig
from dispatch.shared.server import GRPC_OPTIONS, Hosted, Service, bound_address, start_server
from dispatch.transport.http import HttpBridge, start_http
from dispatch.transport.kernels import Kernels
from dispatch.transport.service import DispatchServicer
from dispatch.v1 import store_pb2_grpc, transport_pb2_grpc


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
                cfg.http_listen, bound_address(cfg.listen, hosted.port), rpc_timeout=cfg.rpc_timeout
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
