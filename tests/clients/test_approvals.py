"""The SDK's approval methods (approve, reject, edit, resolve_approval, list_approvals) and
workspace permissions, on both clients, against the in-process stack.

``test_a_turn_waits_for_approve_and_runs`` (async) and ``test_the_sync_client_rejects_and_edits``
need the kernel's approval flow, and ``test_create_workspace_keeps_the_permissions`` the store
keeping a workspace's rules; the others pass on their own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch_client import (
    DispatchClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SyncDispatchClient,
    permission_rules,
    transport_pb2,
    types,
)
from dispatch_client._calls import Call, approve, edit, input_json, reject, resolve_approval
from tests.stack import Stack, start_stack
from tests.transport.test_approvals_api import (
    ASK_ONCE,
    MISSING_APPROVAL,
    RULES,
    Recording,
    a_turn,
    kernel_supports,
    new_key,
    output,
    recording,
    stored_approval,
)

__all__ = ["recording"]  # a fixture

ALLOW, ASK, DENY = types.PERMISSION_ACTION_ALLOW, types.PERMISSION_ACTION_ASK, types.PERMISSION_ACTION_DENY


def rules_of(rules: list[types.PermissionRule]) -> list[tuple[str, str, int]]:
    return [(r.tool, r.pattern, r.action) for r in rules]


def sent(call: Call[types.Approval]) -> transport_pb2.PublicResolveApprovalRequest:
    return cast(transport_pb2.PublicResolveApprovalRequest, call.request)


def test_permissions_are_written_as_the_config_writes_them_or_as_rules() -> None:
    assert rules_of(
        permission_rules({"shell": {"git status*": "allow", "*": "ASK"}, "read_file": "allow", "*": "deny"})
    ) == [("shell", "git status*", ALLOW), ("shell", "", ASK), ("read_file", "", ALLOW), ("*", "", DENY)]
    given = [types.PermissionRule(tool="shell", pattern="rm *", action=DENY)]
    assert permission_rules(given) == given
    assert rules_of(permission_rules({"grep": types.PERMISSION_ACTION_ASK})) == [("grep", "", ASK)]
    assert permission_rules(()) == []
    with pytest.raises(
        ValueError, match=r"unknown permission action 'maybe': expected one of allow\|ask\|deny"
    ):
        permission_rules({"shell": {"*": "maybe"}})


def test_the_approval_requests_the_methods_make() -> None:
    approved = sent(approve("apr_1", remember=True))
    assert (approved.approval_id, approved.decision, approved.remember) == (
        "apr_1",
        types.APPROVAL_DECISION_APPROVE,
        True,
    )
    rejected = sent(reject("apr_1", "too risky"))
    assert (rejected.decision, rejected.reason, rejected.remember) == (
        types.APPROVAL_DECISION_REJECT,
        "too risky",
        False,
    )
    edited = sent(edit("apr_1", {"command": "ls -la"}))
    assert edited.decision == types.APPROVAL_DECISION_EDIT
    assert json.loads(edited.edited_input_json) == {"command": "ls -la"}
    assert sent(edit("apr_1", '{"command": "ls"}')).edited_input_json == '{"command": "ls"}'
    assert sent(resolve_approval("apr_1", "APPROVE", remember=True)).remember
    with pytest.raises(TypeError, match="a dict or a JSON string, not list"):
        input_json(["ls"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown approval decision 'expire'"):
        resolve_approval("apr_1", "expire")


async def test_both_clients_decide_as_their_key(recording: Recording) -> None:
    stack, kernel = recording
    key = await new_key(stack)
    address = stack.address("transport")
    async with DispatchClient(address, api_key=key.secret) as client:
        approved = await client.approve(MISSING_APPROVAL, remember=True)
        await client.reject(MISSING_APPROVAL, reason="no")
        await client.edit(MISSING_APPROVAL, {"command": "ls"})

    def sync() -> types.Approval:
        with SyncDispatchClient(address, api_key=key.secret) as client:
            client.approve(MISSING_APPROVAL)
            return client.edit(MISSING_APPROVAL, '{"command": "pwd"}', remember=True)

    edited = await asyncio.to_thread(sync)
    assert (approved.decided_by, approved.remember) == (key.id, True)
    assert (edited.decision, edited.edited_input_json, edited.remember) == (
        types.APPROVAL_DECISION_EDIT,
        '{"command": "pwd"}',
        True,
    )
    asked = [(int(a.decision), a.remember, a.reason, a.edited_input_json, a.decided_by) for a in kernel.asked]
    assert asked == [
        (types.APPROVAL_DECISION_APPROVE, True, "", "", key.id),
        (types.APPROVAL_DECISION_REJECT, False, "no", "", key.id),
        (types.APPROVAL_DECISION_EDIT, False, "", '{"command": "ls"}', key.id),
        (types.APPROVAL_DECISION_APPROVE, False, "", "", key.id),
        (types.APPROVAL_DECISION_EDIT, True, "", '{"command": "pwd"}', key.id),
    ]


async def test_a_bad_decision_is_invalid_argument(stack: Stack) -> None:
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        with pytest.raises(InvalidArgument, match="edited_input_json must be a JSON object"):
            await client.edit(MISSING_APPROVAL, "[1, 2]")
        with pytest.raises(InvalidArgument, match="approval_id 'apr_x' is malformed"):
            await client.approve("apr_x")


async def test_list_approvals_on_both_clients(stack: Stack) -> None:
    conv, turn = await a_turn(stack, stack.transport)
    first = await stored_approval(stack, conv, turn, "call_1")
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        assert [a.id for a in (await client.list_approvals(conv)).approvals] == [first]
        assert [a.id for a in (await client.list_approvals(conv, pending_only=True)).approvals] == [first]
        with pytest.raises(NotFound):
            await client.list_approvals("conv_00000000000000000000000000")

    def sync() -> list[str]:
        with SyncDispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
            return [a.id for a in client.list_approvals(conv, pending_only=True).approvals]

    assert await asyncio.to_thread(sync) == [first]


async def test_create_workspace_checks_the_permissions(stack: Stack) -> None:
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        with pytest.raises(InvalidArgument, match=r"permissions\[0\] \('' 'x'\): tool is required"):
            await client.create_workspace(
                name="w",
                root=str(stack.workspace),
                permissions=[types.PermissionRule(pattern="x", action=ASK)],
            )


async def test_create_workspace_keeps_the_permissions(stack: Stack) -> None:
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        ws = await client.create_workspace(
            name="w",
            root=str(stack.workspace),
            permissions={"shell": {"git push*": "ask"}, "read_file": "allow"},
        )
    assert rules_of(list(ws.permissions)) == [("shell", "git push*", ASK), ("read_file", "", ALLOW)]


# ------------------------------------------------- the kernel's approval flow


@pytest.fixture
async def asking(tmp_path: Path) -> AsyncIterator[Stack]:
    """A stack whose default agent's shell asks (but for `echo safe...`), running ASK_ONCE."""
    kernel_supports(permissions=RULES)
    stack = await start_stack(
        tmp_path, ScriptedProvider.from_data(ASK_ONCE), transport=True, permissions=RULES
    )
    yield stack
    await stack.stop()


def results(events: list[types.AgentEvent]) -> list[tuple[str, bool]]:
    return [
        (output(e.tool_result.content), e.tool_result.is_error) for e in events if e.HasField("tool_result")
    ]


async def test_a_turn_waits_for_approve_and_runs(asking: Stack) -> None:
    events: list[types.AgentEvent] = []
    asked: list[str] = []
    async with DispatchClient(asking.address("transport"), api_key=asking.api_key) as client:
        conv = await client.create_conversation()
        async for event in client.run_turn(conv.id, "go"):
            events.append(event)
            if event.HasField("approval_requested"):
                asked.append(event.approval_requested.approval.id)
                pending = await client.list_approvals(conv.id, pending_only=True)
                assert [a.id for a in pending.approvals] == asked
                decided = await client.approve(asked[-1])
                assert decided.decision == types.APPROVAL_DECISION_APPROVE
        assert len(asked) == 1
        with pytest.raises(FailedPrecondition) as again:
            await client.approve(asked[0])
        assert again.value.details.startswith("already decided"), again.value
    assert results(events) == [("safe-1", False), ("hello", False)]
    assert events[-1].turn_sealed.state == types.TURN_STATE_COMPLETED


async def test_the_sync_client_rejects_and_edits(asking: Stack) -> None:
    address, key = asking.address("transport"), asking.api_key

    def scenario(answer: str) -> list[tuple[str, bool]]:
        seen: list[types.AgentEvent] = []
        with SyncDispatchClient(address, api_key=key) as client:
            conv = client.create_conversation()
            for event in client.run_turn(conv.id, "go"):
                seen.append(event)
                if event.HasField("approval_requested"):
                    approval_id = event.approval_requested.approval.id
                    if answer == "reject":
                        client.reject(approval_id, "not now")
                    else:
                        with pytest.raises(InvalidArgument):  # the shell's schema wants a command
                            client.edit(approval_id, {"cmd": "ls"})
                        client.edit(approval_id, {"command": "echo edited"})
        return results(seen)

    rejected = await asyncio.to_thread(scenario, "reject")
    assert rejected[0] == ("safe-1", False)
    assert rejected[1][1] and "not now" in rejected[1][0]
    assert await asyncio.to_thread(scenario, "edit") == [("safe-1", False), ("edited", False)]
