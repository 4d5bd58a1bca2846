"""One lifecycle for every service process.

A server is created inside the coroutine that ``uvloop.run()`` runs. It serves
grpc.health.v1 and server reflection next to its own services. On SIGTERM or
SIGINT health turns NOT_SERVING, the service drains its in-flight work within
the grace period, the server stops, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# Big enough for a file read or a long history; the store enforces its own caps.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class Service:
    """One gRPC service to host: its full name and how to register its servicer."""

    name: str
    register: Callable[[grpc.aio.Server], None]


@dataclass
class Hosted:
    """A running server and the hooks to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    names: list[str]
    drain: Callable[[float], Awaitable[None]] | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The transport's HTTP bridge, when it runs one.
    http_port: int = 0

    async def stop(self, grace: float) -> None:
        """Turn NOT_SERVING, drain in-flight work, then stop the server within ``grace``."""
        for name in ["", *self.names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.drain is not None:
            try:
                await asyncio.wait_for(self.drain(grace), timeout=grace)
            except TimeoutError:
                log.warning("drain did not finish within %.1fs; stopping anyway", grace)
        await self.server.stop(max(0.0, deadline - loop.time()))
        for close in self.closers:
            await close()


async def start_server(
    services: Sequence[Service],
    listen: str,
    *,
    drain: Callable[[float], Awaitable[None]] | None = None,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
) -> Hosted:
    """Start a grpc.aio server with health and reflection; answers with the bound port.
    ``max_receive_bytes`` caps one request message (a public server takes less than peers)."""
    options = [(k, v) for k, v in GRPC_OPTIONS if k != "grpc.max_receive_message_length"]
    server = grpc.aio.server(options=[*options, ("grpc.max_receive_message_length", max_receive_bytes)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for svc in services:
        svc.register(server)
    names = [svc.name for svc in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Hosted(server=server, port=port, health=health_servicer, names=names, drain=drain)


def bound_address(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


async def serve_until_signalled(
    hosted: Hosted, *, listen: str, grace: float, ready_file: Path | None, label: str
) -> None:
    """Block until SIGTERM/SIGINT, then stop ``hosted`` gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address = bound_address(listen, hosted.port)
    log.info("%s serving on %s", label, address)
    if hosted.http_port:
        log.info("%s HTTP bridge on port %d", label, hosted.http_port)
    if ready_file is not None:
        # Written atomically so a reader never sees half an address.
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(address)
        os.replace(tmp, ready_file)
    try:
        await stop.wait()
        log.info("%s stopping (grace %.1fs)", label, grace)
    finally:
        await hosted.stop(grace)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    log.info("%s stopped", label)


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run a service's main coroutine on uvloop."""
    uvloop.run(main())  # type: ignore[arg-type]
