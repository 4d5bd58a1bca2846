"""The blocking client: the async client's methods, on gRPC's sync API.

with SyncDispatchClient() as client:
    conv = client.create_conversation(title="demo")
    for event in client.run_turn(conv.id, "what is in this workspace?"):
        ...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from dispatch_client._api import Api, SyncKind
from dispatch_client._calls import (
    DEFAULT_TIMEOUT,
    Call,
    Pages,
)
from dispatch_client._proto import common_pb2, transport_pb2, transport_pb2_grpc
from dispatch_client._stream import Resume, TurnFollower
from dispatch_client.errors import error_from_rpc

__all__ = ["Client", "SyncDispatchClient"]

R = TypeVar("R", bound=Message)
I = TypeVar("I")  # noqa: E741

Events = Generator[common_pb2.AgentEvent, None, None]


class SyncDispatchClient(Api, SyncKind):
    """A blocking client with the methods of ``DispatchClient``. Use as a context
    manager, or call ``close()``. Streams are generators; ``close()`` one (or leave
    the ``with contextlib.closing(...)`` block) to end it at once.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor] = (),
    ):
        self._configure(address, api_key, timeout)
        if credentials is not None:
            self._raw_channel = grpc.secure_channel(self.address, credentials, options=list(options))
        else:
            self._raw_channel = grpc.insecure_channel(self.address, options=list(options))
        channel = (
            grpc.intercept_channel(self._raw_channel, *interceptors) if interceptors else self._raw_channel
        )
        self._stub = transport_pb2_grpc.DispatchStub(channel)

    def __enter__(self) -> SyncDispatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls and streams still open on it end."""
        self._raw_channel.close()

    def _unary(self, call: Call[R]) -> R:
        method = getattr(self._stub, call.method)
        try:
            return cast(R, method(call.request, timeout=self._deadline(call), metadata=self._metadata))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _walk(self, pages: Pages[R, I]) -> Generator[I, None, None]:
        call: Call[R] | None = pages.first
        while call is not None:
            response = self._unary(call)
            yield from pages.items(response)
            call = pages.next(response)

    def _follow(self, resume: Resume) -> Events:
        while (delay := resume.next_delay()) is not None:
            time.sleep(delay)
            stream = self._stub.Subscribe(resume.request(), metadata=self._metadata)
            try:
                for response in stream:
                    yield from resume.accept(response)
                    if resume.resync:
                        break
                resume.ended()
            except grpc.RpcError as exc:
                resume.broke(exc)
            finally:
                stream.cancel()

    def _follow_turn(self, follower: TurnFollower) -> Events:
        resume = Resume(follower.conversation_id, after_event_seq=follower.after_event_seq)
        with contextlib.closing(self._follow(resume)) as events:
            for event in events:
                if follower.accept(event):
                    yield event
                if follower.done:
                    return

    def _run_turn(self, call: Call[transport_pb2.SendResponse]) -> Events:
        sent = self._unary(call)
        follower = TurnFollower(cast(transport_pb2.SendRequest, call.request).conversation_id, sent)
        with contextlib.closing(self._follow_turn(follower)) as turn:
            yield from turn


# The short name.
Client = SyncDispatchClient
