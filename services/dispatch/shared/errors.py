"""Domain errors, mapped to gRPC status codes in one place.

Logic modules raise these; servicers let ``grpc_errors`` translate them.
"""

from __future__ import annotations

import functools
import inspect
import logging
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


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> DispatchError:
    """A downstream service's error as ours: its status when it speaks of the caller's
    request, UNAVAILABLE with context when the downstream itself failed."""
    cls = _PASS_THROUGH.get(exc.code())
    if cls is not None:
        return cls(exc.details() or what)
    return Unavailable(f"{what}: {exc.code().name}: {exc.details()}")
