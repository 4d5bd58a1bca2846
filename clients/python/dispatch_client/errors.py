"""The SDK's exceptions: one class per common gRPC status, all under ``DispatchError``.

try:
    await client.get_conversation("conv_x")
except NotFound:
    ...
except DispatchError as exc:  # any other status
    print(exc.code.name, exc.details)
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class DispatchError(Exception):
    """A call failed; ``code`` is the gRPC status, ``details`` the server's message.

    ``str(exc)`` reads ``NOT_FOUND: conversation conv_x not found``. Catch a
    subclass (``NotFound``, ``Unauthenticated``, ...) for one status, or this
    class for all of them.
    """

    def __init__(self, code: grpc.StatusCode, details: str = ""):
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"

    def __reduce__(self) -> tuple[object, tuple[grpc.StatusCode, str]]:
        return error_for, (self.code, self.details)

    @classmethod
    def wrap(cls, exc: grpc.RpcError) -> DispatchError:
        """The exception for a failed gRPC call (of the sync or the async API)."""
        return error_from_rpc(exc)


class _Status(DispatchError):
    """A ``DispatchError`` whose status is fixed by its class."""

    CODE: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = ""):
        super().__init__(self.CODE, details)


class Cancelled(_Status):
    CODE = grpc.StatusCode.CANCELLED


class InvalidArgument(_Status):
    CODE = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(_Status):
    CODE = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(_Status):
    CODE = grpc.StatusCode.NOT_FOUND


class AlreadyExists(_Status):
    CODE = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(_Status):
    CODE = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(_Status):
    CODE = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(_Status):
    CODE = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(_Status):
    CODE = grpc.StatusCode.UNIMPLEMENTED


class Internal(_Status):
    CODE = grpc.StatusCode.INTERNAL


class Unavailable(_Status):
    CODE = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(_Status):
    CODE = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[_Status]] = {
    cls.CODE: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Unimplemented,
        Internal,
        Unavailable,
        Unauthenticated,
    )
}


def error_for(code: grpc.StatusCode, details: str = "") -> DispatchError:
    """The most specific ``DispatchError`` for ``code``."""
    cls = _BY_CODE.get(code)
    return cls(details) if cls is not None else DispatchError(code, details)


def error_from_rpc(exc: BaseException) -> DispatchError:
    """``exc`` (a ``grpc.RpcError`` of the sync API or a ``grpc.aio.AioRpcError``) as a ``DispatchError``."""
    if isinstance(exc, DispatchError):
        return exc
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if not callable(code):
        return DispatchError(grpc.StatusCode.UNKNOWN, str(exc))
    status = code()
    if not isinstance(status, grpc.StatusCode):
        status = grpc.StatusCode.UNKNOWN
    return error_for(status, str((details() if callable(details) else "") or ""))
