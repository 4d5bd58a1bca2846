"""The HTTP bridge's approval routes, over real HTTP in front of the in-process stack:
``GET /v1/conversations/{id}/approvals`` (``?pending=``), ``POST /v1/approvals/{id}/resolve``
(short decision names, ``remember``) and permission rules in a workspace body.

``test_the_approval_flow_over_http`` needs the kernel's approval flow, and
``test_workspace_permissions_are_answered_in_the_proto_mapping`` the store keeping a
workspace's rules; the others pass on their own."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from dispatch.transport.http import HttpBridge, start_http, to_dict
from dispatch.v1 import common_pb2, store_pb2, transport_pb2
from tests.stack import Stack
from tests.transport.test_approvals_api import (
    ASK_ONCE,
    MISSING_APPROVAL,
    RULES,
    MakeStack,
    Recording,
    a_turn,
    make_stack,
    new_key,
    recording,
    stack,
    stored_approval,
)
from tests.transport.test_http import http

__all__ = ["make_stack", "recording", "stack"]  # fixtures


@pytest.fixture
async def bridge(stack: Stack) -> AsyncIterator[HttpBridge]:
    b = await start_http("127.0.0.1:0", stack.address("transport"))
    yield b
    await b.stop()


@pytest.fixture
async def client(bridge: HttpBridge, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with http(bridge, stack.api_key) as c:
        yield c


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    error: dict[str, str] = response.json()["error"]
    return error


async def test_list_approvals_answers_the_grpc_listing_and_pending_true_only_the_waiting(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    conv, turn = await a_turn(stack, stack.transport)
    decided = await stored_approval(stack, conv, turn, "call_1")
    waiting = await stored_approval(stack, conv, turn, "call_2")
    await stack.store.ResolveApproval(
        store_pb2.ResolveApprovalRequest(
            tenant_id="local", approval_id=decided, decision=common_pb2.APPROVAL_DECISION_APPROVE
        )
    )
    everything = await client.get(f"/v1/conversations/{conv}/approvals")
    assert everything.status_code == 200, everything.text
    grpc_listed = await stack.transport.ListApprovals(
        transport_pb2.PublicListApprovalsRequest(conversation_id=conv)
    )
    assert everything.json() == to_dict(grpc_listed)
    assert [a["id"] for a in everything.json()["approvals"]] == [decided, waiting]
    assert everything.json()["approvals"][1]["rule"] == "shell * = ask"
    for value in ("true", "TRUE", "True"):
        pending = await client.get(f"/v1/conversations/{conv}/approvals", params={"pending": value})
        assert [a["id"] for a in pending.json()["approvals"]] == [waiting]
    not_pending = await client.get(f"/v1/conversations/{conv}/approvals", params={"pending": "false"})
    assert [a["id"] for a in not_pending.json()["approvals"]] == [decided, waiting]


async def test_list_approvals_refusals(stack: Stack, client: httpx.AsyncClient, bridge: HttpBridge) -> None:
    conv, _ = await a_turn(stack, stack.transport)
    path = f"/v1/conversations/{conv}/approvals"
    bad = error_of(await client.get(path, params={"pending": "yes"}), 400)
    assert bad["code"] == "INVALID_ARGUMENT" and "pending must be true or false, got 'yes'" in bad["message"]
    typo = error_of(await client.get(path, params={"pendng": "true"}), 400)
    assert "unknown query parameter pendng" in typo["message"] and "it takes pending" in typo["message"]
    malformed = error_of(await client.get("/v1/conversations/conv_x/approvals"), 400)
    assert "conversation_id 'conv_x' is malformed" in malformed["message"]
    async with http(bridge, (await new_key(stack, "acme")).secret) as theirs:
        assert error_of(await theirs.get(path), 404)["code"] == "NOT_FOUND"
    async with http(bridge, None) as anonymous:
        assert error_of(await anonymous.get(path), 401)["code"] == "UNAUTHENTICATED"
    wrong_method = error_of(await client.post(path), 405)
    assert wrong_method["code"] == "METHOD_NOT_ALLOWED"


RESOLVE_REFUSALS = {
    "remember with reject": ({"decision": "reject", "remember": True}, "remember is only taken with approve"),
    "remember not a boolean": ({"decision": "approve", "remember": "yes"}, "remember"),
    "an unknown decision": ({"decision": "maybe"}, "decision must be one of approve, reject, edit"),
    "the kernel's decision": ({"decision": "APPROVAL_DECISION_EXPIRED"}, "must be one of approve, reject"),
    "edit without input": ({"decision": "edit"}, "an edit decision needs edited_input_json"),
    "a malformed id": ({"decision": "approve", "approval_id": "a"}, "approval_id 'a' is malformed"),
}


@pytest.mark.parametrize(("body", "phrase"), RESOLVE_REFUSALS.values(), ids=RESOLVE_REFUSALS.keys())
async def test_resolve_refusals(client: httpx.AsyncClient, body: dict[str, Any], phrase: str) -> None:
    approval_id = body.pop("approval_id", MISSING_APPROVAL)
    response = await client.post(f"/v1/approvals/{approval_id}/resolve", json=body)
    error = error_of(response, 400)
    assert error["code"] == "INVALID_ARGUMENT" and phrase in error["message"], error


async def test_resolve_takes_short_decisions_and_remember_to_the_kernel_as_the_key(
    recording: Recording,
) -> None:
    stack, kernel = recording
    key = await new_key(stack)
    bridge = await start_http("127.0.0.1:0", stack.address("transport"))
    try:
        async with http(bridge, key.secret) as client:
            path = f"/v1/approvals/{MISSING_APPROVAL}/resolve"
            approved = await client.post(path, json={"decision": "approve", "remember": True})
            edited = await client.post(
                path, json={"decision": "edit", "edited_input_json": '{"command": "ls"}', "remember": True}
            )
            rejected = await client.post(path, json={"decision": "REJECT", "reason": "no"})
            typo = await client.post(path + "?remember=true", json={"decision": "approve"})
    finally:
        await bridge.stop()
    assert approved.status_code == 200, approved.text
    assert approved.json() == {
        "id": MISSING_APPROVAL,
        "decision": "APPROVAL_DECISION_APPROVE",
        "decided_by": key.id,
        "remember": True,
    }
    assert edited.json()["decision"] == "APPROVAL_DECISION_EDIT"
    assert rejected.json()["reason"] == "no"
    assert [(a.decision, a.remember, a.decided_by) for a in kernel.asked] == [
        (common_pb2.APPROVAL_DECISION_APPROVE, True, key.id),
        (common_pb2.APPROVAL_DECISION_EDIT, True, key.id),
        (common_pb2.APPROVAL_DECISION_REJECT, False, key.id),
    ]
    assert "unknown query parameter remember" in error_of(typo, 400)["message"]


async def test_workspace_permission_refusals_name_the_rule(stack: Stack, client: httpx.AsyncClient) -> None:
    def body(*rules: dict[str, Any]) -> dict[str, Any]:
        return {"name": "w", "root": str(stack.workspace), "permissions": list(rules)}

    unknown = error_of(
        await client.post(
            "/v1/workspaces", json=body({"tool": "shell", "action": "ask"}, {"tool": "x", "action": "maybe"})
        ),
        400,
    )
    assert "permissions[1].action must be one of allow, ask, deny" in unknown["message"]
    no_tool = error_of(
        await client.post("/v1/workspaces", json=body({"pattern": "*.env", "action": "deny"})), 400
    )
    assert "permissions[0] ('' '*.env'): tool is required" in no_tool["message"]
    no_action = error_of(await client.post("/v1/workspaces", json=body({"tool": "shell"})), 400)
    assert "permissions[0] ('shell'): action must be allow, ask or deny" in no_action["message"]
    not_a_list = error_of(
        await client.post("/v1/workspaces", json={"name": "w", "permissions": "shell"}), 400
    )
    assert "permissions" in not_a_list["message"]


SHORT_RULES = [
    {"tool": "shell", "pattern": "git status*", "action": "allow"},
    {"tool": "shell", "action": "ASK"},
    {"tool": "*", "action": "PERMISSION_ACTION_DENY"},
]


async def test_workspace_permissions_take_short_action_names(stack: Stack, client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/v1/workspaces", json={"name": "w", "root": str(stack.workspace), "permissions": SHORT_RULES}
    )
    assert created.status_code == 200, created.text


async def test_workspace_permissions_are_answered_in_the_proto_mapping(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    created = await client.post(
        "/v1/workspaces", json={"name": "w", "root": str(stack.workspace), "permissions": SHORT_RULES}
    )
    assert created.json()["permissions"] == [
        {"tool": "shell", "pattern": "git status*", "action": "PERMISSION_ACTION_ALLOW"},
        {"tool": "shell", "action": "PERMISSION_ACTION_ASK"},
        {"tool": "*", "action": "PERMISSION_ACTION_DENY"},
    ]


async def test_the_approval_flow_over_http(make_stack: MakeStack) -> None:
    stack = await make_stack(ASK_ONCE, permissions=RULES)
    key = await new_key(stack)
    bridge = await start_http("127.0.0.1:0", stack.address("transport"))
    try:
        async with http(bridge, key.secret) as client:
            conv = (await client.post("/v1/conversations", json={})).json()["id"]
            await client.post(f"/v1/conversations/{conv}/messages", json={"text": "go"})
            approval: dict[str, Any] = {}
            async with client.stream("GET", f"/v1/conversations/{conv}/events") as events:
                async for line in events.aiter_lines():
                    event = json.loads(line)
                    if "approval_requested" in event:
                        approval = event["approval_requested"]["approval"]
                        break
            assert approval["id"].startswith("apr_") and approval["tool_name"] == "shell"
            pending = await client.get(f"/v1/conversations/{conv}/approvals", params={"pending": "true"})
            assert [a["id"] for a in pending.json()["approvals"]] == [approval["id"]]
            decided = await client.post(
                f"/v1/approvals/{approval['id']}/resolve", json={"decision": "approve", "remember": True}
            )
            assert decided.status_code == 200, decided.text
            assert decided.json()["decided_by"] == key.id and decided.json()["remember"] is True
            async with client.stream(
                "GET", f"/v1/conversations/{conv}/events", params={"until": "turn_sealed"}
            ) as events:
                seen = [json.loads(line) async for line in events.aiter_lines()]
            shown = ("approval_resolved", "tool_started", "turn_sealed")
            assert [k for e in seen for k in shown if k in e][-3:] == list(shown)
            again = await client.post(f"/v1/approvals/{approval['id']}/resolve", json={"decision": "reject"})
            assert error_of(again, 409)["code"] == "FAILED_PRECONDITION"
            pending = await client.get(f"/v1/conversations/{conv}/approvals", params={"pending": "true"})
            assert pending.json() == {}
    finally:
        await bridge.stop()
