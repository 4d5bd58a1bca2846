"""The four services in-process on port 0, wired together, for service-level tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dispatch.exec.server import start as start_exec
from dispatch.kernel.providers import Provider
from dispatch.kernel.server import start as start_kernel
from dispatch.kernel.tools import Tool
from dispatch.shared.config import (
    DispatchPolicy,
    ExecConfig,
    KernelConfig,
    RetryPolicy,
    StoreConfig,
    TransportConfig,
)
from dispatch.shared.server import Hosted
from dispatch.store.server import start as start_store
from dispatch.transport.server import start as start_transport
from dispatch.transport.service import LOCAL_TENANT
from dispatch.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, store_pb2, store_pb2_grpc, transport_pb2_grpc

TENANT = LOCAL_TENANT


def _with_key(details: Any, key: str) -> Any:
    return details._replace(metadata=(*(details.metadata or ()), ("authorization", f"Bearer {key}")))


# Two classes: grpc.aio files an interceptor under one kind of call only.
class _UnaryAuth(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: str):
        self.key = key

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_key(details, self.key), request)


class _StreamAuth(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, key: str):
        self.key = key

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_key(details, self.key), request)


def bearer_auth(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add ``authorization: Bearer <key>`` to every call on a channel."""
    return [_UnaryAuth(key), _StreamAuth(key)]


@dataclass
class Stack:
    workspace: Path
    hosted: dict[str, Hosted]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    # A key of TENANT's, made when the stack has a transport; `transport` sends it.
    api_key: str = ""

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.hosted[name].port}"

    def channel(self, name: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.address(name))
        self.channels.append(channel)
        return channel

    @property
    def store(self) -> store_pb2_grpc.ConversationStoreAsyncStub:
        return store_pb2_grpc.ConversationStoreStub(self.channel("store"))

    @property
    def kernel(self) -> kernel_pb2_grpc.KernelAsyncStub:
        return kernel_pb2_grpc.KernelStub(self.channel("kernel"))

    @property
    def transport(self) -> transport_pb2_grpc.DispatchAsyncStub:
        """The public API, authenticated as TENANT."""
        return self.transport_as(self.api_key)

    def transport_as(self, key: str) -> transport_pb2_grpc.DispatchAsyncStub:
        """The public API with ``key`` (empty: no authorization header)."""
        interceptors = bearer_auth(key) if key else []
        channel = grpc.aio.insecure_channel(self.address("transport"), interceptors=interceptors)
        self.channels.append(channel)
        return transport_pb2_grpc.DispatchStub(channel)

    async def new_key(self, tenant: str = TENANT) -> str:
        created = await self.store.CreateApiKey(store_pb2.CreateApiKeyRequest(tenant_id=tenant, name="test"))
        return str(created.secret)

    async def conversation(self) -> str:
        conv = await self.store.CreateConversation(store_pb2.CreateConversationRequest(tenant_id=TENANT))
        return conv.id

    async def stop(self, grace: float = 0.0) -> None:
        for channel in self.channels:
            await channel.close()
        for name in ("transport", "kernel", "exec", "store"):
            if name in self.hosted:
                await self.hosted[name].stop(grace)


async def start_stack(
    tmp_path: Path,
    provider: Provider | None = None,
    *,
    max_steps: int = 0,
    transport: bool = False,
    tools: Mapping[str, Tool] | None = None,
    policy: DispatchPolicy | None = None,
    retry: RetryPolicy | None = None,
    database_url: str = "",
    transport_options: Mapping[str, Any] | None = None,
    **kernel_options: Any,
) -> Stack:
    """A store, exec and kernel (and with ``transport``, a transport) on free ports;
    ``kernel_options`` are more KernelConfig fields (agents, max_concurrent_turns, ...).
    ``database_url``: the store's database (default: SQLite in ``tmp_path``);
    ``transport_options``: more TransportConfig fields (stream_token_secret, ...)."""
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    store = await start_store(
        StoreConfig(
            database_url=database_url or f"sqlite:///{tmp_path / 'store.db'}",
            default_workspace_root=str(workspace),
        )
    )
    exec_ = await start_exec(ExecConfig())
    kernel = await start_kernel(
        KernelConfig(
            store_address=f"127.0.0.1:{store.port}",
            exec_address=f"127.0.0.1:{exec_.port}",
            max_steps=max_steps,
            rpc_timeout=10.0,
            dispatch=policy or DispatchPolicy(),
            retry=retry or RetryPolicy(),
            **kernel_options,
        ),
        provider=provider,
        tools=tools,
    )
    hosted = {"store": store, "exec": exec_, "kernel": kernel}
    if transport:
        hosted["transport"] = await start_transport(
            TransportConfig(
                listen="127.0.0.1:0",
                kernel_address=f"127.0.0.1:{kernel.port}",
                store_address=f"127.0.0.1:{store.port}",
                **(transport_options or {}),
            )
        )
    stack = Stack(workspace, hosted)
    if transport:
        stack.api_key = await stack.new_key()
    return stack


def text_chunks(text: str) -> list[common_pb2.Chunk]:
    return [common_pb2.Chunk(text=common_pb2.TextChunk(text=text))]


async def run_turn(
    stack: Stack,
    conversation_id: str,
    text: str,
    *,
    policy: common_pb2.SendPolicy.ValueType = common_pb2.SEND_POLICY_UNSPECIFIED,
) -> tuple[kernel_pb2.StartTurnResponse, list[common_pb2.AgentEvent]]:
    """Start a turn through the kernel and collect its events up to turn_sealed (or the stream's end)."""
    kernel = stack.kernel
    started = await kernel.StartTurn(
        kernel_pb2.StartTurnRequest(
            tenant_id=TENANT, conversation_id=conversation_id, chunks=text_chunks(text), policy=policy
        )
    )
    events = await collect(stack, conversation_id, started.after_event_seq, until_turn=started.turn_id)
    return started, events


async def collect(
    stack: Stack,
    conversation_id: str,
    after_event_seq: int,
    *,
    until_turn: str = "",
    sink: list[common_pb2.AgentEvent] | None = None,
) -> list[common_pb2.AgentEvent]:
    """Events after ``after_event_seq`` until a turn_sealed (of ``until_turn`` if given),
    or until a turn ends unsealed because the store failed. ``sink`` fills as they arrive."""
    events: list[common_pb2.AgentEvent] = [] if sink is None else sink
    stream = stack.kernel.Subscribe(
        kernel_pb2.KernelSubscribeRequest(
            tenant_id=TENANT, conversation_id=conversation_id, after_event_seq=after_event_seq
        )
    )
    async for batch in stream:
        events.extend(batch.events)
        if any(
            e.HasField("turn_sealed") and (not until_turn or e.turn_id == until_turn) for e in batch.events
        ):
            stream.cancel()
            break
        if any(e.HasField("error") and e.error.message.startswith("turn not sealed") for e in batch.events):
            stream.cancel()
            break
    return events


def kinds(events: list[common_pb2.AgentEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]
