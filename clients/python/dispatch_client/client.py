"""The async client for Dispatch's public API.

async with DispatchClient() as client:
    conv = await client.create_conversation(title="demo")
    async for event in client.run_turn(conv.id, "what is in this workspace?"):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from dispatch_client._api import Api, AsyncKind
from dispatch_client._calls import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    Call,
    Pages,
    find_api_key,
)
from dispatch_client._proto import common_pb2, transport_pb2, transport_pb2_grpc
from dispatch_client._stream import Resume, TurnFollower
from dispatch_client.errors import DispatchError, error_from_rpc

__all__ = ["DEFAULT_ADDRESS", "DispatchClient", "DispatchError", "find_api_key"]

R = TypeVar("R", bound=Message)
I = TypeVar("I")  # noqa: E741


class DispatchClient(Api, AsyncKind):
    """An async client. Use as an async context manager, or call ``close()``.

    ``address`` defaults to ``DISPATCH_ADDRESS`` or ``127.0.0.1:7600``; ``api_key`` to
    ``find_api_key()``. ``timeout`` is the default deadline of a unary call, in
    seconds (each method also takes ``timeout=``); streams have none. Every
    failed call raises a ``DispatchError`` subclass that names the status.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ):
        self._configure(address, api_key, timeout)
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(
                self.address, credentials, options=list(options), interceptors=list(interceptors)
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                self.address, options=list(options), interceptors=list(interceptors)
            )
        self._stub = transport_pb2_grpc.DispatchStub(self._channel)

    async def __aenter__(self) -> DispatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls and streams still open on it end."""
        await self._channel.close()

    async def _unary(self, call: Call[R]) -> R:
        method = getattr(self._stub, call.method)
        try:
            return cast(R, await method(call.request, timeout=self._deadline(call), metadata=self._metadata))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def _walk(self, pages: Pages[R, I]) -> AsyncGenerator[I, None]:
        call: Call[R] | None = pages.first
        while call is not None:
            response = await self._unary(call)
            for item in pages.items(response):
                yield item
            call = pages.next(response)

    async def _follow(self, resume: Resume) -> AsyncGenerator[common_pb2.AgentEvent, None]:
        while (delay := resume.next_delay()) is not None:
            await asyncio.sleep(delay)
            stream = self._stub.Subscribe(resume.request(), metadata=self._metadata)
            try:
                async for response in stream:
                    for event in resume.accept(response):
                        yield event
                    if resume.resync:
                        break
                resume.ended()
            except grpc.aio.AioRpcError as exc:
                resume.broke(exc)
            finally:
                stream.cancel()

    async def _follow_turn(self, follower: TurnFollower) -> AsyncGenerator[common_pb2.AgentEvent, None]:
        events = self._follow(Resume(follower.conversation_id, after_event_seq=follower.after_event_seq))
        async with contextlib.aclosing(events):
            async for event in events:
                if follower.accept(event):
                    yield event
                if follower.done:
                    return

    async def _run_turn(
        self, call: Call[transport_pb2.SendResponse]
    ) -> AsyncGenerator[common_pb2.AgentEvent, None]:
        sent = await self._unary(call)
        turn = self._follow_turn(
            TurnFollower(cast(transport_pb2.SendRequest, call.request).conversation_id, sent)
        )
        async with contextlib.aclosing(turn):
            async for event in turn:
                yield event
