"""Domain errors, mapped to gRPC status codes in one place.

Logic modules raise these; servicers let ``grpc_errors`` translate them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc

log = logging.getLogger(__name__)


class DispatchError(Exception):
    """Base of every error a service reports to its caller."""

    code = grpc.StatusCode.INTERNAL


class NotFound(DispatchError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DispatchError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgument(DispatchError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(DispatchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(DispatchError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DispatchError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(DispatchError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(DispatchError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DispatchError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(DispatchError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


# Servicer methods take this context; its type parameters do not matter to us.
Context = grpc.aio.ServicerContext[Any, Any]

F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Translate ``DispatchError`` raised by a servicer method into its gRPC status.

    Works for unary methods and for server-streaming async generators.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except DispatchError as exc:
                await context.abort(exc.code, str(exc))

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Context) -> Any:
        try:
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except DispatchError as exc:
            await context.abort(exc.code, str(exc))

    return cast(F, unary)


_PASS_THROUGH: dict[grpc.StatusCode, type[DispatchError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        ResourceExhausted,
        Unimplemented,
    )
}


# How grpc names a peer in its own error text: "ipv4:127.0.0.1:7603", "ipv6:[::1]:7603",
# "unix:/run/x.sock"; plain "host:port" pairs too.
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|unix-abstract|vsock|dns):(?://)?[^\s,;'\")]+"
    r"|\[[0-9a-fA-F:.]+\](?::\d+)?"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?"
)


def scrub_addresses(text: str) -> str:
    """``text`` without the internal addresses grpc puts in its errors (a client of the public
    API must not learn where the store listens)."""
    return _ADDRESS.sub("(internal address)", text)


def rpc_detail(exc: grpc.aio.AioRpcError) -> str:
    """A downstream error's status and message, fit to show a client: no internal address."""
    return f"{exc.code().name}: {scrub_addresses(exc.details() or '')}"


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> DispatchError:
    """A downstream service's error as ours: its status when it speaks of the caller's
    request, UNAVAILABLE with context when the downstream itself failed. The message never
    carries an internal address; the full one is logged."""
    cls = _PASS_THROUGH.get(exc.code())
    if cls is not None:
        return cls(scrub_addresses(exc.details() or what))
    log.warning("%s: %s: %s", what, exc.code().name, exc.details())
    return Unavailable(f"{what}: {rpc_detail(exc)}")
