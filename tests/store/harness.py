"""A store server in this process, a real channel to it, and request builders."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import grpc
import pytest
from google.protobuf import duration_pb2

from dispatch.shared.config import StoreConfig
from dispatch.shared.errors import FailedPrecondition
from dispatch.shared.server import GRPC_OPTIONS, Hosted
from dispatch.store.backend import Store
from dispatch.store.server import start as start_store
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc

TENANT = "acme"
OTHER_TENANT = "globex"

if TYPE_CHECKING:
    # The async stub type exists only in the generated .pyi.
    Stub: TypeAlias = store_pb2_grpc.ConversationStoreAsyncStub

# Written out from the contract, not imported, so a wrong table in the code fails here.
CONTRACT_TRANSITIONS: dict[int, set[int]] = {
    common_pb2.TURN_STATE_QUEUED: {common_pb2.TURN_STATE_RUNNING, common_pb2.TURN_STATE_ABORTED},
    common_pb2.TURN_STATE_RUNNING: {
        common_pb2.TURN_STATE_WAITING_FOR_APPROVAL,
        common_pb2.TURN_STATE_COMPLETED,
        common_pb2.TURN_STATE_FAILED,
        common_pb2.TURN_STATE_ABORTED,
        common_pb2.TURN_STATE_INTERRUPTED,
    },
    common_pb2.TURN_STATE_WAITING_FOR_APPROVAL: {
        common_pb2.TURN_STATE_RESUMING,
        common_pb2.TURN_STATE_ABORTED,
        common_pb2.TURN_STATE_FAILED,
        common_pb2.TURN_STATE_INTERRUPTED,
    },
    common_pb2.TURN_STATE_RESUMING: {
        common_pb2.TURN_STATE_RUNNING,
        common_pb2.TURN_STATE_ABORTED,
        common_pb2.TURN_STATE_FAILED,
        common_pb2.TURN_STATE_INTERRUPTED,
    },
    common_pb2.TURN_STATE_COMPLETED: set(),
    common_pb2.TURN_STATE_FAILED: set(),
    common_pb2.TURN_STATE_ABORTED: set(),
    common_pb2.TURN_STATE_INTERRUPTED: set(),
}


class FakeClock:
    """A store clock (seconds since the epoch) that moves only when a test advances it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningStore:
    """One store process's worth of state, in this process: server, channel, stub."""

    cfg: StoreConfig
    hosted: Hosted
    channel: grpc.aio.Channel
    stub: Stub

    @classmethod
    async def start(cls, cfg: StoreConfig) -> RunningStore:
        hosted = await start_store(cfg)
        # The options every Dispatch service dials with: an Append answer echoes its
        # messages, so it can be as big as the request.
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}", options=GRPC_OPTIONS)
        return cls(cfg, hosted, channel, store_pb2_grpc.ConversationStoreStub(channel))

    async def stop(self) -> None:
        await self.channel.close()
        await self.hosted.stop(1.0)


def text_message(text: str, role: common_pb2.Role.ValueType = common_pb2.ROLE_USER) -> common_pb2.Message:
    return common_pb2.Message(role=role, chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=text))])


def text_of(message: common_pb2.Message) -> str:
    return "".join(c.text.text for c in message.chunks)


def delta_event(event_seq: int, text: str = "x") -> common_pb2.AgentEvent:
    return common_pb2.AgentEvent(event_seq=event_seq, text_delta=common_pb2.TextDelta(text=text))


async def new_conversation(stub: Stub, tenant_id: str = TENANT, **fields: str) -> common_pb2.Conversation:
    return await stub.CreateConversation(store_pb2.CreateConversationRequest(tenant_id=tenant_id, **fields))


async def append(
    stub: Stub,
    conversation_id: str,
    messages: list[common_pb2.Message],
    events: list[common_pb2.AgentEvent] | None = None,
    tenant_id: str = TENANT,
) -> store_pb2.AppendResponse:
    return await stub.Append(
        store_pb2.AppendRequest(
            tenant_id=tenant_id, conversation_id=conversation_id, messages=messages, events=events or []
        )
    )


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The gRPC error ``call`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def seconds(value: float) -> duration_pb2.Duration:
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(round(value * 1e9))
    return ttl


# ------------------------------------------------------------ migration 5

# Approvals as the code of schema version 4 stored them: the whole Approval as the body
# (without the fields version 5 added), ids the tests name.
V4_PENDING = common_pb2.Approval(
    id="apr_v4_pending",
    conversation_id="conv_v4",
    turn_id="turn_v4",
    tool_call_id="call_1",
    tool_name="shell",
    input_json='{"command": "git push"}',
    step_id="turn_v4#0",
)
V4_DECIDED = common_pb2.Approval(
    id="apr_v4_decided",
    conversation_id="conv_v4",
    turn_id="turn_v4",
    tool_call_id="call_2",
    tool_name="shell",
    decision=common_pb2.APPROVAL_DECISION_APPROVE,
    reason="ok",
    step_id="turn_v4#0",
)
V4_DECIDED.created_at.FromNanoseconds(2)
V4_DECIDED.resolved_at.FromNanoseconds(3)
V4_PENDING.created_at.FromNanoseconds(1)


async def check_upgraded_from_v4(store: Store) -> None:
    """What a database written by schema version 4 (workspace ws_v4, conversation conv_v4,
    running turn turn_v4, approvals V4_PENDING and V4_DECIDED) holds after migration 5: no
    rules anywhere, the approvals with their tenant and nothing of the new fields, the
    pending one decidable once (remembering its rule), the decided one not again."""
    ws = await store.get_workspace(TENANT, "ws_v4")
    assert (list(ws.permissions), ws.confine_tools) == ([], True)
    conv = await store.get_conversation(TENANT, "conv_v4")
    assert list(conv.remembered) == []
    pending = await store.get_approval(TENANT, V4_PENDING.id)
    assert (pending.tenant_id, pending.rule, pending.decided_by, pending.remember) == (TENANT, "", "", False)
    assert not pending.HasField("expires_at") and pending.input_json == V4_PENDING.input_json
    listed = await store.list_approvals(TENANT, turn_id="turn_v4")
    assert [a.id for a in listed] == [V4_PENDING.id, V4_DECIDED.id]
    assert [a.id for a in await store.list_approvals(TENANT, "conv_v4", pending_only=True)] == [V4_PENDING.id]
    with pytest.raises(FailedPrecondition, match="already decided: approval apr_v4_decided was approved by"):
        await store.resolve_approval(TENANT, V4_DECIDED.id, common_pb2.APPROVAL_DECISION_REJECT)

    push = common_pb2.PermissionRule(
        tool="shell", pattern="git push", action=common_pb2.PERMISSION_ACTION_ALLOW
    )
    decided = await store.resolve_approval(
        TENANT,
        V4_PENDING.id,
        common_pb2.APPROVAL_DECISION_APPROVE,
        decided_by="key_v5",
        remember=True,
        remembered_rule=push,
    )
    assert (decided.decided_by, decided.remember) == ("key_v5", True)
    assert list((await store.get_conversation(TENANT, "conv_v4")).remembered) == [push]
    ask = common_pb2.PermissionRule(tool="shell", pattern="rm *", action=common_pb2.PERMISSION_ACTION_ASK)
    assert list((await store.update_workspace(TENANT, "ws_v4", permissions=[ask])).permissions) == [ask]
