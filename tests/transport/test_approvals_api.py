"""Approvals and permission rules on the public API, over the in-process stack: ResolveApproval
(validated here, decided by the kernel as the caller's key), ListApprovals (the store's,
tenant-scoped) and CreateWorkspace's permissions.

The tests under "the kernel's approval flow" need it (a permission rule that asks moves the
turn to waiting_for_approval and emits approval_requested; the kernel's ResolveApproval
decides it), and the default agent's ``permissions`` in KernelConfig; the one that reads
workspace permissions back needs the store to keep them. The others pass on their own."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from google.protobuf import duration_pb2

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import KernelConfig, TransportConfig
from dispatch.shared.server import Service, start_server
from dispatch.transport.server import start as start_transport
from dispatch.v1 import (
    common_pb2,
    kernel_pb2,
    kernel_pb2_grpc,
    store_pb2,
    transport_pb2,
    transport_pb2_grpc,
)
from tests.stack import TENANT, Stack, start_stack

C = common_pb2
MISSING_APPROVAL = "apr_00000000000000000000000000"
MISSING_CONV = "conv_00000000000000000000000000"
# shell asks, but for `echo safe...`; the rest runs as always.
RULES: Mapping[str, Any] = {"shell": {"echo safe*": "allow", "*": "ask"}}


def shell(command: str) -> dict[str, Any]:
    return {"type": "tool_call", "name": "shell", "input": {"command": command}}


# A call that runs without asking, then one that asks, then the answer.
ASK_ONCE: Mapping[str, Any] = {
    "steps": [[shell("echo safe-1")], [shell("echo hello")], [{"type": "text_delta", "text": "done"}]]
}
# The same call in two steps (remember: the second does not ask).
ASK_TWICE: Mapping[str, Any] = {
    "steps": [[shell("echo hello")], [shell("echo hello")], [{"type": "text_delta", "text": "done"}]]
}
SIMPLE: Mapping[str, Any] = {"steps": [[{"type": "text_delta", "text": "hi"}]]}


class Key(NamedTuple):
    id: str
    secret: str


async def new_key(stack: Stack, tenant: str = TENANT) -> Key:
    created = await stack.store.CreateApiKey(store_pb2.CreateApiKeyRequest(tenant_id=tenant, name="test"))
    return Key(created.key.id, created.secret)


MakeStack = Callable[..., Awaitable[Stack]]


def kernel_supports(**kernel_options: Any) -> None:
    """Fail the test unless KernelConfig takes ``kernel_options``; checked before any server
    starts, since a stack that fails half-way leaks the servers it started."""
    unknown = set(kernel_options) - {f.name for f in dataclasses.fields(KernelConfig)}
    if unknown:
        pytest.fail(f"KernelConfig has no {', '.join(sorted(unknown))} (the kernel's approval flow)")


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    """A stack with a transport whose model follows ``script``; ``kernel_options`` (such as the
    default agent's ``permissions``) go to the kernel."""
    stacks: list[Stack] = []

    async def make(script: Mapping[str, Any] = SIMPLE, **kernel_options: Any) -> Stack:
        kernel_supports(**kernel_options)
        stack = await start_stack(
            tmp_path, ScriptedProvider.from_data(script), transport=True, **kernel_options
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.stop()


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack()


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def resolve(approval_id: str = MISSING_APPROVAL, **fields: Any) -> transport_pb2.PublicResolveApprovalRequest:
    return transport_pb2.PublicResolveApprovalRequest(approval_id=approval_id, **fields)


APPROVE, REJECT, EDIT = C.APPROVAL_DECISION_APPROVE, C.APPROVAL_DECISION_REJECT, C.APPROVAL_DECISION_EDIT

# ------------------------------------------------------- ResolveApproval: validation

BAD_RESOLUTIONS = {
    "no id": (resolve("", decision=APPROVE), "approval_id is required"),
    "malformed id": (resolve("a", decision=APPROVE), "approval_id 'a' is malformed: expected apr_"),
    "another kind of id": (resolve(MISSING_CONV, decision=APPROVE), "is malformed: expected apr_"),
    "no decision": (resolve(), "decision must be approve, reject or edit, got unspecified"),
    "expired is the kernel's": (resolve(decision=C.APPROVAL_DECISION_EXPIRED), "got expired"),
    "closed is the kernel's": (resolve(decision=C.APPROVAL_DECISION_CLOSED), "got closed"),
    "an unknown decision": (resolve(decision=99), "got 99"),
    "edit without input": (resolve(decision=EDIT), "an edit decision needs edited_input_json"),
    "edit with no JSON": (resolve(decision=EDIT, edited_input_json="{nope"), "is not valid JSON"),
    "edit with an array": (
        resolve(decision=EDIT, edited_input_json="[1]"),
        "edited_input_json must be a JSON object, got list",
    ),
    "input with approve": (
        resolve(decision=APPROVE, edited_input_json="{}"),
        "edited_input_json is only taken with an edit decision",
    ),
    "input with reject": (resolve(decision=REJECT, edited_input_json="{}"), "only taken with an edit"),
    "remember with reject": (
        resolve(decision=REJECT, remember=True),
        "remember is only taken with approve or edit",
    ),
}


@pytest.mark.parametrize(("request_", "phrase"), BAD_RESOLUTIONS.values(), ids=BAD_RESOLUTIONS.keys())
async def test_a_bad_resolution_is_invalid_argument_saying_what_to_fix(
    stack: Stack, request_: transport_pb2.PublicResolveApprovalRequest, phrase: str
) -> None:
    err = await refused(stack.transport.ResolveApproval(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in (err.details() or "")


async def test_resolving_needs_a_key_before_anything_else(stack: Stack) -> None:
    for key in ("", "not-a-key"):
        err = await refused(stack.transport_as(key).ResolveApproval(resolve("a")))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


class RecordingKernel(kernel_pb2_grpc.KernelServicer):
    """A kernel that answers ResolveApproval with what it was asked, and records it."""

    def __init__(self) -> None:
        self.asked: list[kernel_pb2.KernelResolveApprovalRequest] = []

    async def ResolveApproval(
        self, request: kernel_pb2.KernelResolveApprovalRequest, context: Any
    ) -> common_pb2.Approval:
        self.asked.append(request)
        return common_pb2.Approval(
            id=request.approval_id,
            decision=request.decision,
            decided_by=request.decided_by,
            remember=request.remember,
            reason=request.reason,
            edited_input_json=request.edited_input_json,
        )


class Recording(NamedTuple):
    stack: Stack
    kernel: RecordingKernel


@pytest.fixture
async def recording(tmp_path: Path) -> AsyncIterator[Recording]:
    """A real store (it authenticates) and transport, in front of a kernel that records."""
    stack = await start_stack(tmp_path, ScriptedProvider.from_data(SIMPLE))
    # The calls it leaves out answer UNIMPLEMENTED (the generated base class), as needed here.
    kernel = RecordingKernel()  # type: ignore[abstract]
    fake = await start_server(
        [Service("dispatch.v1.Kernel", lambda s: kernel_pb2_grpc.add_KernelServicer_to_server(kernel, s))],
        "127.0.0.1:0",
    )
    try:
        stack.hosted["transport"] = await start_transport(
            TransportConfig(
                listen="127.0.0.1:0",
                kernel_address=f"127.0.0.1:{fake.port}",
                store_address=stack.address("store"),
            )
        )
        yield Recording(stack, kernel)
    finally:
        await stack.stop()
        await fake.stop(0)


async def test_the_kernel_is_asked_for_the_callers_tenant_as_the_callers_key(recording: Recording) -> None:
    acme = await new_key(recording.stack, "acme")
    api = recording.stack.transport_as(acme.secret)
    approved = await api.ResolveApproval(resolve(decision=APPROVE, remember=True))
    edited = await api.ResolveApproval(
        resolve(decision=EDIT, edited_input_json='{"command": "ls"}', remember=True)
    )
    rejected = await api.ResolveApproval(resolve(decision=REJECT, reason="not today"))
    assert acme.id.startswith("key_")
    assert [(a.tenant_id, a.decided_by, a.approval_id) for a in recording.kernel.asked] == [
        ("acme", acme.id, MISSING_APPROVAL)
    ] * 3
    assert (approved.decision, approved.remember, approved.decided_by) == (APPROVE, True, acme.id)
    assert (edited.decision, edited.edited_input_json, edited.remember) == (EDIT, '{"command": "ls"}', True)
    assert (rejected.decision, rejected.reason, rejected.remember) == (REJECT, "not today", False)


# ------------------------------------------------------------------ ListApprovals


async def a_turn(stack: Stack, api: transport_pb2_grpc.DispatchAsyncStub) -> tuple[str, str]:
    """A conversation of ``api``'s tenant (TENANT) with a turn that goes on, held in the store
    for a kernel of the test's own (approvals are made only for such a turn): (conversation
    id, turn id)."""
    conv = (await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    turn = await stack.store.CreateTurn(
        store_pb2.CreateTurnRequest(
            tenant_id=TENANT,
            conversation_id=conv,
            state=common_pb2.TURN_STATE_RUNNING,
            lease_owner="kernel-of-the-test",
            lease_ttl=duration_pb2.Duration(seconds=600),
        )
    )
    return conv, turn.id


async def stored_approval(stack: Stack, conv: str, turn: str, call: str, tenant: str = TENANT) -> str:
    """An approval made in the store, as the kernel would make it: its id."""
    created = await stack.store.CreateApproval(
        store_pb2.CreateApprovalRequest(
            tenant_id=tenant,
            approval=common_pb2.Approval(
                conversation_id=conv,
                turn_id=turn,
                tool_call_id=call,
                tool_name="shell",
                input_json=json.dumps({"command": f"echo {call}"}),
                rule="shell * = ask",
            ),
        )
    )
    return str(created.id)


async def test_list_approvals_answers_the_conversations_oldest_first_and_pending_only_if_asked(
    stack: Stack,
) -> None:
    api = stack.transport
    conv, turn = await a_turn(stack, api)
    assert (
        list(
            (
                await api.ListApprovals(transport_pb2.PublicListApprovalsRequest(conversation_id=conv))
            ).approvals
        )
        == []
    )
    first = await stored_approval(stack, conv, turn, "call_1")
    second = await stored_approval(stack, conv, turn, "call_2")
    await stack.store.ResolveApproval(
        store_pb2.ResolveApprovalRequest(tenant_id=TENANT, approval_id=first, decision=REJECT, reason="no")
    )
    listed = await api.ListApprovals(transport_pb2.PublicListApprovalsRequest(conversation_id=conv))
    assert [(a.id, a.tool_call_id, a.decision) for a in listed.approvals] == [
        (first, "call_1", REJECT),
        (second, "call_2", C.APPROVAL_DECISION_UNSPECIFIED),
    ]
    assert listed.approvals[1].rule == "shell * = ask" and listed.approvals[1].tool_name == "shell"
    pending = await api.ListApprovals(
        transport_pb2.PublicListApprovalsRequest(conversation_id=conv, pending_only=True)
    )
    assert [a.id for a in pending.approvals] == [second]


async def test_list_approvals_is_tenant_scoped_and_validated(stack: Stack) -> None:
    conv, turn = await a_turn(stack, stack.transport)
    await stored_approval(stack, conv, turn, "call_1")
    theirs = stack.transport_as((await new_key(stack, "acme")).secret)
    for conversation_id, code, phrase in [
        (conv, grpc.StatusCode.NOT_FOUND, conv),  # another tenant's: as if it did not exist
        (MISSING_CONV, grpc.StatusCode.NOT_FOUND, MISSING_CONV),
        ("conv_x", grpc.StatusCode.INVALID_ARGUMENT, "conversation_id 'conv_x' is malformed"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "conversation_id is required"),
    ]:
        err = await refused(
            theirs.ListApprovals(transport_pb2.PublicListApprovalsRequest(conversation_id=conversation_id))
        )
        assert err.code() == code and phrase in (err.details() or ""), err.details()
    err = await refused(
        stack.transport_as("").ListApprovals(transport_pb2.PublicListApprovalsRequest(conversation_id=conv))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------- CreateWorkspace: permissions


def rule(tool: str, pattern: str = "", action: int = C.PERMISSION_ACTION_ASK) -> common_pb2.PermissionRule:
    return common_pb2.PermissionRule(tool=tool, pattern=pattern, action=action)  # type: ignore[arg-type]


BAD_RULES = {
    "no tool": ([rule("")], "permissions[0] ('')"),
    "a blank tool": ([rule("shell"), rule("  ", "x")], "permissions[1] ('  ' 'x'): tool is required"),
    "no action": (
        [rule("shell", "git push*", C.PERMISSION_ACTION_UNSPECIFIED)],
        "permissions[0] ('shell' 'git push*'): action must be allow, ask or deny",
    ),
    "an unknown action": ([rule("shell", "", 7)], "permissions[0] ('shell'): action must be"),
    "a long pattern": ([rule("shell", "x" * 501)], "the pattern is longer than 500 characters"),
    "a NUL": ([rule("read_file", "a\x00b")], "the pattern holds a NUL character"),
}


@pytest.mark.parametrize(("rules", "phrase"), BAD_RULES.values(), ids=BAD_RULES.keys())
async def test_a_workspace_rule_of_the_wrong_shape_is_invalid_argument_naming_it(
    stack: Stack, rules: list[common_pb2.PermissionRule], phrase: str
) -> None:
    err = await refused(
        stack.transport.CreateWorkspace(
            transport_pb2.PublicCreateWorkspaceRequest(name="w", root=str(stack.workspace), permissions=rules)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in (err.details() or ""), err.details()
    listed = await stack.transport.ListWorkspaces(transport_pb2.PublicListWorkspacesRequest())
    assert "w" not in [w.name for w in listed.workspaces]


async def test_a_pattern_of_500_characters_is_taken(stack: Stack) -> None:
    ws = await stack.transport.CreateWorkspace(
        transport_pb2.PublicCreateWorkspaceRequest(
            name="w", root=str(stack.workspace), permissions=[rule("shell", "x" * 500)]
        )
    )
    assert ws.id.startswith("ws_")


async def test_workspace_permissions_are_kept_as_given(stack: Stack) -> None:
    rules = [
        rule("shell", "git status*", C.PERMISSION_ACTION_ALLOW),
        rule("shell", "", C.PERMISSION_ACTION_ASK),
        rule("*", "", C.PERMISSION_ACTION_DENY),
    ]
    created = await stack.transport.CreateWorkspace(
        transport_pb2.PublicCreateWorkspaceRequest(name="w", root=str(stack.workspace), permissions=rules)
    )
    assert list(created.permissions) == rules
    listed = await stack.transport.ListWorkspaces(transport_pb2.PublicListWorkspacesRequest())
    assert [list(w.permissions) for w in listed.workspaces if w.id == created.id] == [rules]


# ------------------------------------------------- the kernel's approval flow


async def events_until(
    api: transport_pb2_grpc.DispatchAsyncStub,
    conv: str,
    after: int,
    done: Callable[[common_pb2.AgentEvent], bool],
) -> list[common_pb2.AgentEvent]:
    """The conversation's events after ``after``, up to the first one ``done`` holds for;
    an ``AssertionError`` if a turn is sealed first."""
    events: list[common_pb2.AgentEvent] = []
    stream = api.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv, after_event_seq=after))
    async for response in stream:
        for event in response.events:
            events.append(event)
            if done(event):
                stream.cancel()
                return events
            if event.HasField("turn_sealed"):
                stream.cancel()
                raise AssertionError(f"the turn was sealed first: {kinds(events)}")
    raise AssertionError(
        f"the stream ended before the event looked for: {[e.WhichOneof('kind') for e in events]}"
    )


def kinds(events: list[common_pb2.AgentEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


class Waiting(NamedTuple):
    conv: str
    turn: str
    approval: common_pb2.Approval
    # The last event seen: where to go on from.
    seq: int
    events: list[common_pb2.AgentEvent]


async def until_asked(api: transport_pb2_grpc.DispatchAsyncStub) -> Waiting:
    """A new conversation whose turn waits for an approval."""
    conv = (await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())).id
    sent = await api.Send(transport_pb2.SendRequest(conversation_id=conv, text="go"))
    events = await events_until(api, conv, sent.after_event_seq, lambda e: e.HasField("approval_requested"))
    return Waiting(conv, sent.turn_id, events[-1].approval_requested.approval, events[-1].event_seq, events)


async def rest_of_turn(
    api: transport_pb2_grpc.DispatchAsyncStub, waiting: Waiting
) -> list[common_pb2.AgentEvent]:
    return await events_until(api, waiting.conv, waiting.seq, lambda e: e.HasField("turn_sealed"))


def output(content: str) -> str:
    """A shell result's output: without the exit-code line, or the note an edited call gets."""
    lines = [
        line
        for line in content.strip().splitlines()
        if not line.startswith(("[exit code", "(run with the input a person edited"))
    ]
    return "\n".join(lines).strip()


def results(events: list[common_pb2.AgentEvent]) -> list[tuple[str, bool]]:
    return [
        (output(e.tool_result.content), e.tool_result.is_error) for e in events if e.HasField("tool_result")
    ]


async def test_a_call_that_asks_waits_for_approval_then_runs_as_approved_by_the_key(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(ASK_ONCE, permissions=RULES)
    key = await new_key(stack)
    api = stack.transport_as(key.secret)
    waiting = await until_asked(api)
    # `echo safe-1` is allowed: it ran without asking; `echo hello` asks.
    assert results(waiting.events) == [("safe-1", False)]
    [asked_call] = [e.tool_call for e in waiting.events if e.HasField("tool_call")][1:]
    approval = waiting.approval
    assert approval.id.startswith("apr_") and approval.conversation_id == waiting.conv
    assert (approval.tool_call_id, approval.tool_name) == (asked_call.tool_call_id, "shell")
    assert json.loads(approval.input_json) == {"command": "echo hello"}
    assert "shell" in approval.rule and "ask" in approval.rule
    assert approval.decision == C.APPROVAL_DECISION_UNSPECIFIED
    turn = await api.GetTurn(
        transport_pb2.PublicGetTurnRequest(conversation_id=waiting.conv, turn_id=waiting.turn)
    )
    assert turn.state == C.TURN_STATE_WAITING_FOR_APPROVAL
    pending = await api.ListApprovals(
        transport_pb2.PublicListApprovalsRequest(conversation_id=waiting.conv, pending_only=True)
    )
    assert [a.id for a in pending.approvals] == [approval.id]

    decided = await api.ResolveApproval(resolve(approval.id, decision=APPROVE))
    assert (decided.id, decided.decision, decided.decided_by) == (approval.id, APPROVE, key.id)
    assert decided.HasField("resolved_at") and not decided.remember

    rest = await rest_of_turn(api, waiting)
    [resolved] = [e.approval_resolved.approval for e in rest if e.HasField("approval_resolved")]
    assert (resolved.id, resolved.decision, resolved.decided_by) == (approval.id, APPROVE, key.id)
    started = [e.tool_started for e in rest if e.HasField("tool_started")]
    assert [(s.tool_call_id, s.name) for s in started] == [(asked_call.tool_call_id, "shell")]
    assert (
        kinds(rest).index("approval_resolved")
        < kinds(rest).index("tool_started")
        < kinds(rest).index("tool_result")
    )
    assert results(rest) == [("hello", False)]
    assert rest[-1].turn_sealed.state == C.TURN_STATE_COMPLETED

    again = await refused(api.ResolveApproval(resolve(approval.id, decision=REJECT)))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (again.details() or "").startswith("already decided"), again.details()
    listed = await api.ListApprovals(transport_pb2.PublicListApprovalsRequest(conversation_id=waiting.conv))
    assert [(a.id, a.decision, a.decided_by) for a in listed.approvals] == [(approval.id, APPROVE, key.id)]


async def test_a_rejection_gives_the_model_an_error_result_with_the_reason(make_stack: MakeStack) -> None:
    stack = await make_stack(ASK_ONCE, permissions=RULES)
    api = stack.transport
    waiting = await until_asked(api)
    decided = await api.ResolveApproval(
        resolve(waiting.approval.id, decision=REJECT, reason="not on Fridays")
    )
    assert (decided.decision, decided.reason) == (REJECT, "not on Fridays")
    rest = await rest_of_turn(api, waiting)
    [(content, is_error)] = results(rest)
    assert is_error and "not on Fridays" in content
    assert not any(e.HasField("tool_started") for e in rest)  # it never ran
    [resolved] = [e.approval_resolved.approval for e in rest if e.HasField("approval_resolved")]
    assert (resolved.decision, resolved.reason) == (REJECT, "not on Fridays")


async def test_an_edit_runs_the_new_input_and_one_the_schema_refuses_leaves_the_approval_open(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(ASK_ONCE, permissions=RULES)
    api = stack.transport
    waiting = await until_asked(api)
    wrong = await refused(
        api.ResolveApproval(resolve(waiting.approval.id, decision=EDIT, edited_input_json='{"cmd": "ls"}'))
    )
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
    pending = await api.ListApprovals(
        transport_pb2.PublicListApprovalsRequest(conversation_id=waiting.conv, pending_only=True)
    )
    assert [a.id for a in pending.approvals] == [waiting.approval.id]

    edited_input = json.dumps({"command": "echo edited"})
    decided = await api.ResolveApproval(
        resolve(waiting.approval.id, decision=EDIT, edited_input_json=edited_input)
    )
    assert (decided.decision, json.loads(decided.edited_input_json)) == (EDIT, {"command": "echo edited"})
    rest = await rest_of_turn(api, waiting)
    assert results(rest) == [("edited", False)]


async def test_approve_and_remember_runs_the_same_call_without_asking_again(make_stack: MakeStack) -> None:
    stack = await make_stack(ASK_TWICE, permissions=RULES)
    api = stack.transport
    waiting = await until_asked(api)
    decided = await api.ResolveApproval(resolve(waiting.approval.id, decision=APPROVE, remember=True))
    assert decided.remember
    rest = await rest_of_turn(api, waiting)
    assert not any(e.HasField("approval_requested") for e in rest)  # the second call did not ask
    assert results(rest) == [("hello", False), ("hello", False)]
    conv = await api.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=waiting.conv))
    assert [(r.tool, r.action) for r in conv.remembered] == [("shell", C.PERMISSION_ACTION_ALLOW)]
    listed = await api.ListApprovals(transport_pb2.PublicListApprovalsRequest(conversation_id=waiting.conv))
    assert [(a.decision, a.remember) for a in listed.approvals] == [(APPROVE, True)]


async def test_an_unknown_or_another_tenants_approval_is_not_found(make_stack: MakeStack) -> None:
    stack = await make_stack(ASK_ONCE, permissions=RULES)
    waiting = await until_asked(stack.transport)
    theirs = stack.transport_as((await new_key(stack, "acme")).secret)
    for approval_id in (waiting.approval.id, MISSING_APPROVAL):
        err = await refused(theirs.ResolveApproval(resolve(approval_id, decision=APPROVE)))
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    # Untouched by the attempts: still pending for its own tenant.
    pending = await stack.transport.ListApprovals(
        transport_pb2.PublicListApprovalsRequest(conversation_id=waiting.conv, pending_only=True)
    )
    assert [a.id for a in pending.approvals] == [waiting.approval.id]
    await stack.transport.ResolveApproval(resolve(waiting.approval.id, decision=APPROVE))
