"""The async client for Dispatch's public API."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from dispatch_client._proto import common_pb2, store_pb2, transport_pb2, transport_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:7600"

_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class DispatchError(Exception):
    """A call failed; ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def wrap(cls, exc: grpc.aio.AioRpcError) -> DispatchError:
        return cls(exc.code(), exc.details() or "")


def find_api_key(given: str | None = None) -> str:
    """The API key: ``given``, else ``DISPATCH_API_KEY``, else the ``api_key`` file that
    ``dispatchd up`` writes to its data directory (``DISPATCH_DATA_DIR``, default ``.dispatch``)."""
    if given:
        return given
    if os.environ.get("DISPATCH_API_KEY"):
        return os.environ["DISPATCH_API_KEY"].strip()
    path = Path(os.environ.get("DISPATCH_DATA_DIR") or ".dispatch") / "api_key"
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class DispatchClient:
    """An async client. Use as an async context manager, or call ``close()``."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, api_key: str | None = None, timeout: float = 30.0):
        self.address = address
        self.timeout = timeout
        key = find_api_key(api_key)
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = transport_pb2_grpc.DispatchStub(self._channel)

    async def __aenter__(self) -> DispatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise DispatchError.wrap(exc) from None

    async def create_conversation(
        self,
        *,
        workspace_id: str = "",
        title: str = "",
        cwd: str = "",
        computer_id: str = "",
        agent: str = "",
    ) -> common_pb2.Conversation:
        """Create a conversation (in the default workspace unless ``workspace_id`` is given)."""
        request = transport_pb2.PublicCreateConversationRequest(
            workspace_id=workspace_id, title=title, cwd=cwd, computer_id=computer_id, agent=agent
        )
        result: common_pb2.Conversation = await self._unary(self._stub.CreateConversation, request)
        return result

    async def get_conversation(self, conversation_id: str) -> common_pb2.Conversation:
        request = transport_pb2.PublicGetConversationRequest(conversation_id=conversation_id)
        result: common_pb2.Conversation = await self._unary(self._stub.GetConversation, request)
        return result

    async def list_conversations(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> store_pb2.ListConversationsResponse:
        request = transport_pb2.PublicListConversationsRequest(page_size=page_size, page_token=page_token)
        result: store_pb2.ListConversationsResponse = await self._unary(self._stub.ListConversations, request)
        return result

    async def send(
        self,
        conversation_id: str,
        text: str,
        *,
        policy: common_pb2.SendPolicy.ValueType = common_pb2.SEND_POLICY_ENQUEUE,
        idempotency_key: str = "",
    ) -> transport_pb2.SendResponse:
        """Send a user message. Subscribe with the response's ``after_event_seq`` to follow the turn."""
        request = transport_pb2.SendRequest(
            conversation_id=conversation_id, text=text, policy=policy, idempotency_key=idempotency_key
        )
        result: transport_pb2.SendResponse = await self._unary(self._stub.Send, request)
        return result

    async def subscribe(
        self, conversation_id: str, *, after_event_seq: int = 0, reconnect: bool = True
    ) -> AsyncIterator[common_pb2.AgentEvent]:
        """Every event after ``after_event_seq``, history then live.

        When the connection drops (or the server asks for a resync), it
        reconnects and resumes from the last ``event_seq`` it yielded, so no
        event is missed or repeated.
        """
        cursor = after_event_seq
        delay = 0.1
        while True:
            call = self._stub.Subscribe(
                transport_pb2.SubscribeRequest(conversation_id=conversation_id, after_event_seq=cursor),
                metadata=self._metadata,
            )
            try:
                async for response in call:
                    delay = 0.1
                    for event in response.events:
                        if event.event_seq > cursor:
                            cursor = event.event_seq
                            yield event
                    if response.HasField("resync"):
                        break
                else:
                    return
            except grpc.aio.AioRpcError as exc:
                if not reconnect or exc.code() not in _RESUMABLE:
                    raise DispatchError.wrap(exc) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                call.cancel()

    async def history(
        self, conversation_id: str, *, after_seq: int = 0, limit: int = 0
    ) -> transport_pb2.HistoryResponse:
        """Committed messages with seq > ``after_seq``."""
        request = transport_pb2.HistoryRequest(
            conversation_id=conversation_id, after_seq=after_seq, limit=limit
        )
        result: transport_pb2.HistoryResponse = await self._unary(self._stub.History, request)
        return result

    async def cancel(self, conversation_id: str, turn_id: str = "") -> transport_pb2.CancelResponse:
        """Abort the running turn (or ``turn_id`` if it is the one running)."""
        request = transport_pb2.CancelRequest(conversation_id=conversation_id, turn_id=turn_id)
        result: transport_pb2.CancelResponse = await self._unary(self._stub.Cancel, request)
        return result

    async def models(self) -> transport_pb2.ModelsResponse:
        result: transport_pb2.ModelsResponse = await self._unary(
            self._stub.Models, transport_pb2.ModelsRequest()
        )
        return result

    async def computers(self) -> transport_pb2.ComputersResponse:
        result: transport_pb2.ComputersResponse = await self._unary(
            self._stub.Computers, transport_pb2.ComputersRequest()
        )
        return result
