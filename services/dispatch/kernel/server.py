"""Start the kernel service: its peers, its provider, its servicer."""

from __future__ import annotations

import socket
from collections.abc import Mapping

import grpc

from dispatch.kernel.agents import build_agents
from dispatch.kernel.kernel import Kernel
from dispatch.kernel.providers import Provider
from dispatch.kernel.service import KernelServicer
from dispatch.kernel.streams import ExecClient
from dispatch.kernel.tools import BUILTIN_TOOLS, Tool
from dispatch.kernel.turn import TurnDeps
from dispatch.shared.config import KernelConfig, parse_listen
from dispatch.shared.server import GRPC_OPTIONS, Hosted, Service, start_server
from dispatch.v1 import exec_pb2_grpc, kernel_pb2_grpc, store_pb2_grpc

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def advertised_address(listen: str, port: int) -> str:
    """Where other machines reach a kernel listening on ``listen`` (bound to ``port``): its
    host, or this machine's name when it listens on every interface."""
    host, _ = parse_listen(listen)
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"{host}:{port}"


async def start(
    cfg: KernelConfig, provider: Provider | None = None, tools: Mapping[str, Tool] | None = None
) -> Hosted:
    """Start the kernel on ``cfg.listen``; ``provider`` and ``tools`` override the configured ones (tests)."""
    store_channel = grpc.aio.insecure_channel(cfg.store_address, options=GRPC_OPTIONS)
    exec_channel = grpc.aio.insecure_channel(cfg.exec_address, options=GRPC_OPTIONS)
    exec_client = ExecClient(exec_pb2_grpc.ExecStub(exec_channel))
    agents, providers = build_agents(cfg, BUILTIN_TOOLS if tools is None else tools, provider)
    deps = TurnDeps(
        store=store_pb2_grpc.ConversationStoreStub(store_channel),
        exec=exec_client,
        agents=agents,
        default_agent=cfg.default_agent,
        max_steps=cfg.max_steps,
        rpc_timeout=cfg.rpc_timeout,
        retry=cfg.retry,
        confine_tools=cfg.confine_tools,
        lease_ttl=cfg.lease_ttl,
        sweep_interval=cfg.sweep_interval,
        max_attempts=cfg.max_attempts,
        store_outage=cfg.store_outage,
        follow_interval=cfg.follow_interval,
        max_running=cfg.cluster_max_concurrent_turns,
    )
    if cfg.instance_id:
        deps.owner = cfg.instance_id
    kernel = Kernel(deps, cfg.max_concurrent_turns)
    servicer = KernelServicer(kernel)
    hosted = await start_server(
        [
            Service(
                "dispatch.v1.Kernel",
                lambda server: kernel_pb2_grpc.add_KernelServicer_to_server(servicer, server),
            )
        ],
        cfg.listen,
        drain=kernel.drain,
    )
    kernel.advertise(cfg.advertise or advertised_address(cfg.listen, hosted.port))
    await kernel.start()

    async def close() -> None:
        await kernel.close()
        for p in providers:
            await p.aclose()
        await exec_client.close()
        await store_channel.close()
        await exec_channel.close()

    hosted.closers.append(close)
    return hosted
