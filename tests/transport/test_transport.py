"""The public Dispatch service, over the in-process stack."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.v1 import common_pb2, transport_pb2
from tests.stack import Stack, start_stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    provider = ScriptedProvider.from_data(
        {
            "steps": [
                [{"type": "tool_call", "name": "list_dir", "input": {}}],
                [{"type": "text_delta", "text": "done"}],
            ]
        }
    )
    s = await start_stack(tmp_path, provider, transport=True)
    yield s
    await s.stop()


async def test_send_subscribe_and_history_through_the_transport(stack: Stack) -> None:
    api = stack.transport
    conv = await api.CreateConversation(transport_pb2.PublicCreateConversationRequest(title="t"))
    assert conv.title == "t" and conv.workspace_id
    sent = await api.Send(transport_pb2.SendRequest(conversation_id=conv.id, text="hello"))
    assert sent.state == common_pb2.TURN_STATE_RUNNING
    events: list[common_pb2.AgentEvent] = []
    stream = api.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv.id, after_event_seq=sent.after_event_seq)
    )
    async for response in stream:
        events.extend(response.events)
        if events[-1].HasField("turn_sealed"):
            stream.cancel()
            break
    assert events[0].HasField("turn_started") and events[0].turn_id == sent.turn_id
    history = await api.History(transport_pb2.HistoryRequest(conversation_id=conv.id))
    assert [m.seq for m in history.messages] == [1, 2, 3, 4]
    tail = await api.History(transport_pb2.HistoryRequest(conversation_id=conv.id, after_seq=3))
    assert [m.seq for m in tail.messages] == [4]
    assert tail.messages[0].chunks[0].text.text == "done"
    got = await api.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=conv.id))
    assert got.last_seq == 4
    listed = await api.ListConversations(transport_pb2.PublicListConversationsRequest())
    assert [c.id for c in listed.conversations] == [conv.id]


async def test_update_and_delete_a_conversation(stack: Stack) -> None:
    api = stack.transport
    conv = await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())
    updated = await api.UpdateConversation(
        transport_pb2.PublicUpdateConversationRequest(conversation_id=conv.id, cwd="/tmp", agent="default")
    )
    assert (updated.cwd, updated.agent, updated.title) == ("/tmp", "default", conv.title)
    await api.DeleteConversation(transport_pb2.PublicDeleteConversationRequest(conversation_id=conv.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=conv.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_agent_the_kernel_does_not_have_is_refused_and_nothing_changes(stack: Stack) -> None:
    api = stack.transport
    conv = await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())
    attempts: list[Awaitable[object]] = [
        api.UpdateConversation(
            transport_pb2.PublicUpdateConversationRequest(conversation_id=conv.id, agent="ghost", title="x")
        ),
        api.CreateConversation(transport_pb2.PublicCreateConversationRequest(agent="ghost")),
        api.CreateWorkspace(transport_pb2.PublicCreateWorkspaceRequest(name="w", default_agent="ghost")),
    ]
    for attempt in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await attempt
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no agent 'ghost' is configured; configured agents: default" in (err.value.details() or "")
    got = await api.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=conv.id))
    assert (got.agent, got.title) == ("", "")
    # The conversation still takes its next message.
    sent = await api.Send(transport_pb2.SendRequest(conversation_id=conv.id, text="hi"))
    assert sent.turn_id
    listed = await api.ListConversations(transport_pb2.PublicListConversationsRequest())
    assert [c.id for c in listed.conversations] == [conv.id]


@pytest.mark.parametrize(
    ("request_", "code", "phrase"),
    [
        (
            transport_pb2.SendRequest(conversation_id="", text="hi"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "conversation_id is required",
        ),
        (
            transport_pb2.SendRequest(conversation_id="conv_x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "message is empty",
        ),
        (
            transport_pb2.SendRequest(conversation_id="conv_00000000000000000000000000", text="hi"),
            grpc.StatusCode.NOT_FOUND,
            "conv_00000000000000000000000000",
        ),
    ],
)
async def test_send_validation(
    stack: Stack, request_: transport_pb2.SendRequest, code: grpc.StatusCode, phrase: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.transport.Send(request_)
    assert err.value.code() == code
    assert phrase in (err.value.details() or "")


async def test_a_malformed_approval_id_is_invalid_argument_saying_what_one_looks_like(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.transport.ResolveApproval(
            transport_pb2.PublicResolveApprovalRequest(
                approval_id="a", decision=common_pb2.APPROVAL_DECISION_APPROVE
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected apr_" in (err.value.details() or "")


async def test_models_and_computers(stack: Stack) -> None:
    models = await stack.transport.Models(transport_pb2.ModelsRequest())
    assert [(m.provider, m.model) for m in models.models] == [("scripted", "scripted")]
    computers = await stack.transport.Computers(transport_pb2.ComputersRequest())
    assert [c.local for c in computers.computers] == [True]


@pytest.mark.parametrize(
    ("service", "name"),
    [
        ("transport", "dispatch.v1.Dispatch"),
        ("kernel", "dispatch.v1.Kernel"),
        ("store", "dispatch.v1.ConversationStore"),
        ("exec", "dispatch.v1.Exec"),
    ],
)
async def test_every_service_serves_health_and_reflection(stack: Stack, service: str, name: str) -> None:
    channel = stack.channel(service)
    health = health_pb2_grpc.HealthStub(channel)
    for svc in ("", name):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=svc))  # type: ignore[attr-defined]
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert name in names and "grpc.health.v1.Health" in names


async def test_a_store_outage_reaches_the_client_without_internal_addresses(stack: Stack) -> None:
    api = stack.transport
    conv = await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())
    store_port = stack.hosted["store"].port
    await stack.hosted["store"].stop(0)
    for call in (
        api.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=conv.id)),
        api.Send(transport_pb2.SendRequest(conversation_id=conv.id, text="hi")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        details = err.value.details() or ""
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert str(store_port) not in details and "127.0.0.1" not in details and "ipv4:" not in details
