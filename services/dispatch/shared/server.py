"""One lifecycle for every service process.

A server is created inside the coroutine that ``uvloop.run()`` runs. It serves
grpc.health.v1 and server reflection next to its own services. On SIGTERM or
SIGINT health turns NOT_SERVING, the service drains its in-flight work within
the grace period, the server stops, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import inspect
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dispatch.shared import reflection
from dispatch.shared.config import ListenError, parse_listen

log = logging.getLogger(__name__)

# Big enough for a file read or a long history; the store enforces its own caps.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# How often a channel pings an idle connection, so a dead peer is noticed.
KEEPALIVE_MS = 30_000


def channel_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """Options of every channel between our services (and the SDK's defaults)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", min(keepalive_ms, 20_000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A peer that restarts (a store back from an outage) is found within a second or two,
        # not after grpc's default back-off, which grows to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """Options of every server, agreeing with ``channel_options``: a server by default
    takes a ping without data at most every 5 minutes and answers more with GOAWAY
    ``too_many_pings`` (logged on both sides); ours accept the channels' pings, idle or not,
    at up to twice their rate. SO_REUSEPORT is off, so an address in use is an error
    instead of a port silently shared with another server."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
    ]


GRPC_OPTIONS = channel_options()


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
    # Called as the stop begins, before the drain: what ends at once (long-lived streams
    # whose in-flight calls the server's grace then lets finish).
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    # The transport's HTTP bridge, when it runs one.
    http_port: int = 0

    async def stop(self, grace: float) -> None:
        """Turn NOT_SERVING, drain in-flight work, then stop the server within ``grace``."""
        for name in ["", *self.names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for stopping in self.on_stop:
            stopping()
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
    keepalive_ms: int = KEEPALIVE_MS,
) -> Hosted:
    """Start a grpc.aio server with health and reflection; answers with the bound port.
    ``max_receive_bytes`` caps one request message (a public server takes less than peers).
    Raises ``ListenError`` for an address it cannot listen on (malformed, in use)."""
    if parse_listen(listen)[1] != 0:
        # Checked first so the usual failure (in use) is our one line, not grpc's log line too.
        ensure_bindable(listen)
    options = [(k, v) for k, v in server_options(keepalive_ms) if k != "grpc.max_receive_message_length"]
    server = grpc.aio.server(
        options=[*options, ("grpc.max_receive_message_length", max_receive_bytes)],
        interceptors=[DecodeGuard()],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for svc in services:
        svc.register(server)
    names = [svc.name for svc in services]
    reflection.enable(server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(listen, _why_not(listen))
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Hosted(server=server, port=port, health=health_servicer, names=names, drain=drain)


def bind_error(exc: OSError) -> str:
    """What a failed bind means, in words a person can act on."""
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (is another Dispatch running?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    return exc.strerror or str(exc)


def ensure_bindable(listen: str, flag: str = "--listen") -> None:
    """Raise ``ListenError`` (naming ``flag``) unless ``listen`` could be listened on now."""
    host, port = parse_listen(listen)
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ListenError(listen, bind_error(exc), flag) from None


def _why_not(listen: str) -> str:
    """Why the server could not bind ``listen``."""
    try:
        ensure_bindable(listen)
    except ListenError as exc:
        return exc.reason
    return "the server could not bind it"


class _Undecodable:
    """What a request's bytes became when they are not a valid message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and whatever a deserializer may raise
            return _Undecodable(str(exc) or type(exc).__name__)

    return deserialize


async def _refuse(request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request could not be decoded: {request.reason} "
        "(corrupt bytes, or a string field that is not valid UTF-8)",
    )


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answer a request whose bytes are not a valid message with INVALID_ARGUMENT.

    grpc.aio itself answers UNKNOWN ("Unexpected DecodeError") and logs a traceback. Each
    handler's deserializer is made lenient, and its behaviour refuses what that could not
    decode; handlers are wrapped once per method, not per call."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    # The handler types: typeshed describes grpc's sync ones, whose behaviours differ.
    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None or handler.request_deserializer is None:
                return handler
            wrapped = _guarded(handler)
            self._wrapped[method] = wrapped
        return wrapped


def _encoded_or(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``serializer``, except that a response already encoded (bytes) goes out as it is: a
    streaming handler may yield its messages pre-encoded (the transport's Subscribe does)."""
    if serializer is None:
        return None

    def serialize(message: Any) -> bytes:
        return message if type(message) is bytes else serializer(message)

    return serialize


def _guarded(handler: Any) -> Any:
    deserializer = _lenient(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_stream is not None or handler.stream_stream is not None:
        serializer = _encoded_or(serializer)
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def uu(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(request, context)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            uu, request_deserializer=deserializer, response_serializer=serializer
        )
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def us(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(request, context)
            result = unary_stream(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:  # a handler that writes through the context
                await result

        return grpc.unary_stream_rpc_method_handler(
            us, request_deserializer=deserializer, response_serializer=serializer
        )

    def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def each() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await _refuse(request, context)
                yield request

        return each()

    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def su(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await stream_unary(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(
            su, request_deserializer=deserializer, response_serializer=serializer
        )
    stream_stream = handler.stream_stream

    async def ss(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        result = stream_stream(checked(requests, context), context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        else:
            await result

    return grpc.stream_stream_rpc_method_handler(
        ss, request_deserializer=deserializer, response_serializer=serializer
    )


def bound_address(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def settle_heap() -> None:
    """Once a service has started: what start-up made (modules, descriptors, config) is
    kept out of the garbage collector's way for good (``gc.freeze``), so a collection while
    serving looks only at what serving made."""
    gc.collect()
    gc.freeze()


async def serve_until_signalled(
    hosted: Hosted, *, listen: str, grace: float, ready_file: Path | None, label: str
) -> None:
    """Block until SIGTERM/SIGINT, then stop ``hosted`` gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address = bound_address(listen, hosted.port)
    settle_heap()
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
