"""Python SDK for Dispatch, an agent runtime served over gRPC.

async with DispatchClient("127.0.0.1:7600") as client:
    conv = await client.create_conversation()
    async for event in client.run_turn(conv.id, "what is in this workspace?"):
        ...

``SyncDispatchClient`` (also ``Client``) has the same methods, blocking. Calls
fail with a ``DispatchError`` subclass (``NotFound``, ``Unauthenticated``, ...)
that carries the gRPC status. ``types`` holds the message types
(``types.AgentEvent``, ``types.Conversation``, ...).
"""

from importlib import metadata as _metadata

from dispatch_client._calls import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    POLICY_NAMES,
    TURN_STATE_NAMES,
    find_address,
    find_api_key,
    permission_rules,
)
from dispatch_client._proto import common_pb2 as types
from dispatch_client._proto import transport_pb2
from dispatch_client.client import DispatchClient
from dispatch_client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    DispatchError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    error_for,
)
from dispatch_client.sync import Client, SyncDispatchClient

try:
    __version__ = _metadata.version("dispatch-client")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "POLICY_NAMES",
    "TURN_STATE_NAMES",
    "AlreadyExists",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "DispatchClient",
    "DispatchError",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SyncDispatchClient",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "error_for",
    "find_address",
    "find_api_key",
    "permission_rules",
    "transport_pb2",
    "types",
]
