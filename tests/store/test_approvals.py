"""The store contract for approvals and permission rules (issue 13): workspace permissions
and remembered rules, approvals created by a fenced Append with the turn's move, decided
exactly once (remembering a rule in the same transaction), closed by the seal that ends
their turn, read one by one or listed by conversation or turn, and left alone by Reconcile
while they wait.

Backend-agnostic, like test_conformance: every test talks gRPC to an in-process server
from ``store_stub``, once per backend in ``conftest.BACKENDS`` (PostgreSQL included, so the
races below run on real concurrent transactions). Time moves only when a test advances
``clock``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import pytest
from google.protobuf import timestamp_pb2

from dispatch.shared.ids import is_valid_id, new_id
from dispatch.v1 import common_pb2, store_pb2
from tests.store.harness import (
    OTHER_TENANT,
    TENANT,
    FakeClock,
    new_conversation,
    rpc_error,
    seconds,
    text_message,
)
from tests.store.test_durable_turns import BROKEN, fence, leased_turn, move, said

if TYPE_CHECKING:
    from tests.store.harness import Stub

S = common_pb2

OWNER = "kernel-1"
CLOSED_REASON = "the turn ended before it was decided"


def rule(tool: str, pattern: str = "", action: int = S.PERMISSION_ACTION_ASK) -> common_pb2.PermissionRule:
    return common_pb2.PermissionRule(tool=tool, pattern=pattern, action=action)  # type: ignore[arg-type]


def allow(tool: str, pattern: str = "") -> common_pb2.PermissionRule:
    return rule(tool, pattern, S.PERMISSION_ACTION_ALLOW)


def ask(call_id: str, tool: str = "shell", **fields: Any) -> common_pb2.Approval:
    """An approval as the kernel asks for one in an Append: the call, its input, the rule."""
    given: dict[str, Any] = {"input_json": '{"command": "git push"}', "rule": "shell `git push*` = ask"}
    return common_pb2.Approval(tool_call_id=call_id, tool_name=tool, **{**given, **fields})


def calls(turn_id: str, step_index: int, *call_ids: str) -> common_pb2.Message:
    return common_pb2.Message(
        role=S.ROLE_ASSISTANT,
        turn_id=turn_id,
        step_index=step_index,
        chunks=[
            common_pb2.Chunk(
                tool_call=common_pb2.ToolCallChunk(
                    id=call_id, name="shell", input_json="{}", step_id=f"{turn_id}#{step_index}"
                )
            )
            for call_id in call_ids
        ],
    )


def result(turn_id: str, step_index: int, call_id: str) -> common_pb2.Message:
    return common_pb2.Message(
        role=S.ROLE_TOOL,
        turn_id=turn_id,
        step_index=step_index,
        chunks=[
            common_pb2.Chunk(
                tool_result=common_pb2.ToolResultChunk(
                    tool_call_id=call_id, name="shell", content="pushed", step_id=f"{turn_id}#{step_index}"
                )
            )
        ],
    )


async def asking(
    stub: Stub,
    conversation_id: str,
    turn: common_pb2.Turn,
    *call_ids: str,
    step_index: int = 0,
    **fields: Any,
) -> store_pb2.AppendResponse:
    """The step's commit that asks: its calls, their approvals, the turn moved to wait."""
    return await stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conversation_id,
            messages=[calls(turn.id, step_index, *call_ids)],
            fence=fence(turn),
            approvals=[ask(c) for c in call_ids],
            move_to=S.TURN_STATE_WAITING_FOR_APPROVAL,
            **fields,
        )
    )


async def resolve(
    stub: Stub,
    approval_id: str,
    decision: int = S.APPROVAL_DECISION_APPROVE,
    *,
    tenant_id: str = TENANT,
    **fields: Any,
) -> common_pb2.Approval:
    return await stub.ResolveApproval(
        store_pb2.ResolveApprovalRequest(
            tenant_id=tenant_id,
            approval_id=approval_id,
            decision=decision,  # type: ignore[arg-type]
            **fields,
        )
    )


async def get_approval(stub: Stub, approval_id: str, tenant_id: str = TENANT) -> common_pb2.Approval:
    return await stub.GetApproval(store_pb2.GetApprovalRequest(tenant_id=tenant_id, approval_id=approval_id))


async def listed(
    stub: Stub, conversation_id: str = "", *, turn_id: str = "", pending_only: bool = False
) -> list[common_pb2.Approval]:
    resp = await stub.ListApprovals(
        store_pb2.ListApprovalsRequest(
            tenant_id=TENANT, conversation_id=conversation_id, turn_id=turn_id, pending_only=pending_only
        )
    )
    return list(resp.approvals)


async def conversation(stub: Stub, conversation_id: str) -> common_pb2.Conversation:
    return await stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conversation_id)
    )


async def get_turn(stub: Stub, turn_id: str) -> common_pb2.Turn:
    return await stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn_id))


async def reconcile(stub: Stub, conversation_id: str) -> list[common_pb2.Message]:
    resp = await stub.Reconcile(store_pb2.ReconcileRequest(tenant_id=TENANT, conversation_id=conversation_id))
    return list(resp.appended)


async def seal(
    stub: Stub,
    conversation_id: str,
    turn: common_pb2.Turn,
    state: int = S.TURN_STATE_ABORTED,
    error_message: str = "",
    **fields: Any,
) -> store_pb2.AppendResponse:
    return await stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conversation_id,
            fence=fence(turn),
            seal=store_pb2.TurnSeal(state=state, error_message=error_message),  # type: ignore[arg-type]
            **fields,
        )
    )


def closed_results(messages: list[common_pb2.Message]) -> set[str]:
    return {c.tool_result.tool_call_id for m in messages for c in m.chunks if c.HasField("tool_result")}


# ----------------------------------------------------------- permission rules


RULES = [rule("shell", "git push*"), allow("read_file"), rule("*", "", S.PERMISSION_ACTION_DENY)]


async def test_workspace_permissions_are_kept_answered_everywhere_and_replaced_when_set(
    store_stub: Stub,
) -> None:
    created = await store_stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w", permissions=RULES)
    )
    assert list(created.permissions) == RULES
    got = await store_stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=created.id)
    )
    assert list(got.permissions) == RULES
    page = await store_stub.ListWorkspaces(store_pb2.ListWorkspacesRequest(tenant_id=TENANT))
    assert [list(w.permissions) for w in page.workspaces] == [RULES]

    # Unset: kept, whatever else changes.
    renamed = await store_stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(tenant_id=TENANT, workspace_id=created.id, name="renamed")
    )
    assert (renamed.name, list(renamed.permissions)) == ("renamed", RULES)
    # Set: replaced whole.
    replaced = await store_stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(
            tenant_id=TENANT,
            workspace_id=created.id,
            permissions=store_pb2.PermissionRules(rules=[allow("shell", "make *")]),
        )
    )
    assert list(replaced.permissions) == [allow("shell", "make *")]
    # Set to no rules: cleared.
    cleared = await store_stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(
            tenant_id=TENANT, workspace_id=created.id, permissions=store_pb2.PermissionRules()
        )
    )
    assert list(cleared.permissions) == []
    got = await store_stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=created.id)
    )
    assert (got.name, list(got.permissions)) == ("renamed", [])


async def test_a_workspace_made_without_rules_and_the_default_one_have_none(store_stub: Stub) -> None:
    plain = await store_stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w")
    )
    assert list(plain.permissions) == []
    conv = await new_conversation(store_stub)
    default = await store_stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=conv.workspace_id)
    )
    assert default.is_default and list(default.permissions) == []
    assert list(conv.remembered) == []


BAD_RULES: dict[str, tuple[list[common_pb2.PermissionRule], str]] = {
    "no-tool": ([rule("shell"), rule("", "x")], "permissions[1].tool is required"),
    "no-action": (
        [common_pb2.PermissionRule(tool="shell")],
        "permissions[0].action must be allow, ask or deny",
    ),
    "unknown-action": ([rule("read_file"), rule("grep"), rule("shell", "", 42)], "permissions[2].action"),
}


@pytest.mark.parametrize("case", list(BAD_RULES))
async def test_a_rule_without_a_tool_or_an_action_is_refused_naming_its_index(
    store_stub: Stub, case: str
) -> None:
    rules, needle = BAD_RULES[case]
    err = await rpc_error(
        store_stub.CreateWorkspace(
            store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w", permissions=rules)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    page = await store_stub.ListWorkspaces(store_pb2.ListWorkspacesRequest(tenant_id=TENANT))
    assert list(page.workspaces) == []

    ws = await store_stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w", permissions=RULES)
    )
    err = await rpc_error(
        store_stub.UpdateWorkspace(
            store_pb2.UpdateWorkspaceRequest(
                tenant_id=TENANT,
                workspace_id=ws.id,
                name="renamed",
                permissions=store_pb2.PermissionRules(rules=rules),
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    got = await store_stub.GetWorkspace(store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=ws.id))
    assert (got.name, list(got.permissions)) == ("w", RULES)


async def test_every_conversation_answer_carries_the_remembered_rules(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    [approval] = (await asking(store_stub, conv.id, turn, "call_1")).approvals
    await resolve(store_stub, approval.id, remember=True, remembered_rule=allow("shell", "git push"))

    expected = [allow("shell", "git push")]
    assert list((await conversation(store_stub, conv.id)).remembered) == expected
    page = await store_stub.ListConversations(store_pb2.ListConversationsRequest(tenant_id=TENANT))
    assert [list(c.remembered) for c in page.conversations] == [expected]
    updated = await store_stub.UpdateConversation(
        store_pb2.UpdateConversationRequest(tenant_id=TENANT, conversation_id=conv.id, title="t")
    )
    assert list(updated.remembered) == expected


# ------------------------------------------------------ approvals in an Append


async def test_a_fenced_append_creates_the_turns_approvals_and_moves_it_in_one_transaction(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    expiry = timestamp_pb2.Timestamp(seconds=int(clock.now) + 600)
    resp = await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            messages=[calls(turn.id, 0, "call_1", "call_2")],
            fence=fence(turn),
            approvals=[
                ask("call_1", step_id=f"{turn.id}#0", expires_at=expiry),
                # Ids and decisions are the store's: whatever the caller says is replaced.
                ask("call_2", id="apr_mine", reason="stale", decided_by="me", remember=True),
            ],
            move_to=S.TURN_STATE_WAITING_FOR_APPROVAL,
        )
    )
    first, second = resp.approvals
    assert [a.tool_call_id for a in resp.approvals] == ["call_1", "call_2"]
    for approval in resp.approvals:
        assert is_valid_id(approval.id, "apr")
        assert (approval.tenant_id, approval.conversation_id, approval.turn_id) == (TENANT, conv.id, turn.id)
        assert approval.decision == S.APPROVAL_DECISION_UNSPECIFIED
        assert (approval.reason, approval.decided_by, approval.remember) == ("", "", False)
        assert approval.created_at.seconds == int(clock.now) and not approval.HasField("resolved_at")
        assert approval.rule == "shell `git push*` = ask"
    assert (first.step_id, first.expires_at) == (f"{turn.id}#0", expiry)
    assert not second.HasField("expires_at")
    assert (resp.turn.state, resp.first_seq) == (S.TURN_STATE_WAITING_FOR_APPROVAL, 1)

    assert await listed(store_stub, turn_id=turn.id) == list(resp.approvals)
    assert await listed(store_stub, conv.id, pending_only=True) == list(resp.approvals)
    assert await get_approval(store_stub, first.id) == first
    now = await get_turn(store_stub, turn.id)
    assert (now.state, now.lease_owner) == (S.TURN_STATE_WAITING_FOR_APPROVAL, OWNER)


async def test_move_to_takes_the_turn_through_waiting_resuming_and_running(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    for state in (
        S.TURN_STATE_WAITING_FOR_APPROVAL,
        S.TURN_STATE_RESUMING,
        S.TURN_STATE_RUNNING,
        S.TURN_STATE_WAITING_FOR_APPROVAL,
    ):
        # Nothing else to write: the move alone is an append.
        resp = await store_stub.Append(
            store_pb2.AppendRequest(
                tenant_id=TENANT, conversation_id=conv.id, fence=fence(turn), move_to=state
            )
        )
        assert resp.turn.state == state and resp.last_seq == 0
        assert (await get_turn(store_stub, turn.id)).state == state


async def test_a_move_the_state_machine_refuses_writes_nothing(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    err = await rpc_error(
        store_stub.Append(
            store_pb2.AppendRequest(
                tenant_id=TENANT,
                conversation_id=conv.id,
                messages=[calls(turn.id, 0, "call_1")],
                fence=fence(turn),
                approvals=[ask("call_1")],
                move_to=S.TURN_STATE_RESUMING,
            )
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "running; cannot move to resuming" in (err.details() or "")
    assert await listed(store_stub, conv.id) == []
    assert (await conversation(store_stub, conv.id)).last_seq == 0
    assert (await get_turn(store_stub, turn.id)).state == S.TURN_STATE_RUNNING


if TYPE_CHECKING:
    Fields: TypeAlias = Callable[[common_pb2.Turn], dict[str, Any]]

INVALID_APPENDS: dict[str, tuple[Fields, str]] = {
    "approvals-without-fence": (lambda t: {"approvals": [ask("call_1")]}, "approvals needs a fence"),
    "move-without-fence": (
        lambda t: {"move_to": S.TURN_STATE_WAITING_FOR_APPROVAL},
        "move_to needs a fence",
    ),
    "move-to-an-end": (
        lambda t: {"fence": fence(t), "move_to": S.TURN_STATE_COMPLETED},
        "move_to must be a state that has not ended",
    ),
    "move-to-queued": (
        lambda t: {"fence": fence(t), "move_to": S.TURN_STATE_QUEUED},
        "got queued",
    ),
    "move-to-no-state": (lambda t: {"fence": fence(t), "move_to": 42}, "move_to must be a turn state"),
    "move-and-seal": (
        lambda t: {
            "fence": fence(t),
            "move_to": S.TURN_STATE_WAITING_FOR_APPROVAL,
            "seal": store_pb2.TurnSeal(state=S.TURN_STATE_COMPLETED),
        },
        "move_to and seal",
    ),
    "approval-of-another-turn": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1"), ask("call_2", turn_id=new_id("turn"))]},
        "approvals[1].turn_id is",
    ),
    "approval-of-another-conversation": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1", conversation_id=new_id("conv"))]},
        "approvals[0].conversation_id is",
    ),
    "approval-with-a-malformed-turn-id": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1", turn_id="nope")]},
        "approvals[0].turn_id 'nope' is malformed",
    ),
    "approval-without-its-call": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1"), ask("")]},
        "approvals[1].tool_call_id is required",
    ),
    "approval-without-its-tool": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1", tool="")]},
        "approvals[0].tool_name is required",
    ),
    "approval-already-decided": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1", decision=S.APPROVAL_DECISION_APPROVE)]},
        "approvals[0] is new, so pending",
    ),
    "approval-with-input-not-json": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1", input_json="{nope")]},
        "approvals[0].input_json is not valid JSON",
    ),
    "one-call-asked-twice": (
        lambda t: {"fence": fence(t), "approvals": [ask("call_1"), ask("call_1")]},
        "approvals[1] asks about tool call call_1 again",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_APPENDS))
async def test_an_append_whose_approvals_or_move_do_not_fit_is_invalid_and_writes_nothing(
    store_stub: Stub, case: str
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    build, needle = INVALID_APPENDS[case]
    err = await rpc_error(
        store_stub.Append(
            store_pb2.AppendRequest(
                tenant_id=TENANT, conversation_id=conv.id, messages=[said("x")], **build(turn)
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    assert await listed(store_stub, conv.id) == []
    assert (await conversation(store_stub, conv.id)).last_seq == 0
    assert (await get_turn(store_stub, turn.id)).state == S.TURN_STATE_RUNNING


@pytest.mark.parametrize("case", list(BROKEN))
async def test_a_lost_owners_append_creates_no_approval_and_moves_nothing(
    store_stub: Stub, clock: FakeClock, case: str
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    broken = await BROKEN[case](store_stub, conv.id, turn, clock)
    before = await get_turn(store_stub, turn.id)

    err = await rpc_error(
        store_stub.Append(
            store_pb2.AppendRequest(
                tenant_id=TENANT,
                conversation_id=conv.id,
                messages=[calls(turn.id, 0, "call_1")],
                fence=broken,
                approvals=[ask("call_1")],
                move_to=S.TURN_STATE_WAITING_FOR_APPROVAL,
            )
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.details() or "").startswith("lease lost:")
    assert await listed(store_stub, conv.id) == []
    assert (await conversation(store_stub, conv.id)).last_seq == 0
    assert await get_turn(store_stub, turn.id) == before


# ------------------------------------------------------------------- deciding


@pytest.mark.parametrize(
    ("decision", "edited", "said_as"),
    [
        (S.APPROVAL_DECISION_APPROVE, "", "approved"),
        (S.APPROVAL_DECISION_REJECT, "", "rejected"),
        (S.APPROVAL_DECISION_EDIT, '{"command": "git push --dry-run"}', "approved with edited input"),
        (S.APPROVAL_DECISION_EXPIRED, "", "expired"),
        (S.APPROVAL_DECISION_CLOSED, "", "closed"),
    ],
)
async def test_an_approval_is_decided_once_and_a_second_decision_says_what_and_by_whom(
    store_stub: Stub, clock: FakeClock, decision: int, edited: str, said_as: str
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    [approval] = (await asking(store_stub, conv.id, turn, "call_1")).approvals
    clock.advance(7)

    decided = await resolve(
        store_stub,
        approval.id,
        decision,
        edited_input_json=edited,
        reason="checked it",
        decided_by="key_alice",
    )
    assert (decided.decision, decided.edited_input_json, decided.reason, decided.decided_by) == (
        decision,
        edited,
        "checked it",
        "key_alice",
    )
    assert decided.resolved_at.seconds == int(clock.now) and decided.created_at == approval.created_at
    assert (decided.tool_call_id, decided.rule, decided.tenant_id) == ("call_1", approval.rule, TENANT)
    assert await get_approval(store_stub, approval.id) == decided

    clock.advance(1)
    for again in (S.APPROVAL_DECISION_REJECT, S.APPROVAL_DECISION_APPROVE):
        err = await rpc_error(resolve(store_stub, approval.id, again, decided_by="key_bob"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.details() or ""
        assert details.startswith("already decided"), details
        assert f"was {said_as} by key_alice" in details and "checked it" in details
        assert "key_bob" not in details
    assert await get_approval(store_stub, approval.id) == decided
    assert await listed(store_stub, conv.id, pending_only=True) == []


BAD_DECISIONS: dict[str, tuple[dict[str, Any], str]] = {
    "no-decision": ({"decision": S.APPROVAL_DECISION_UNSPECIFIED}, "decision must be approve"),
    "unknown-decision": ({"decision": 42}, "decision must be approve"),
    "edit-without-input": ({"decision": S.APPROVAL_DECISION_EDIT}, "needs edited_input_json"),
    "edit-not-json": ({"decision": S.APPROVAL_DECISION_EDIT, "edited_input_json": "{no"}, "not valid JSON"),
    "edit-not-an-object": (
        {"decision": S.APPROVAL_DECISION_EDIT, "edited_input_json": '["git"]'},
        "must be a JSON object",
    ),
    "input-without-edit": (
        {"decision": S.APPROVAL_DECISION_APPROVE, "edited_input_json": "{}"},
        "only taken with an edit",
    ),
    "remember-a-rejection": (
        {"decision": S.APPROVAL_DECISION_REJECT, "remember": True, "remembered_rule": allow("shell")},
        "remember is only taken with approve or edit, not reject",
    ),
    "remember-an-expiry": (
        {"decision": S.APPROVAL_DECISION_EXPIRED, "remember": True, "remembered_rule": allow("shell")},
        "not expired",
    ),
    "remember-without-a-rule": ({"remember": True}, "remember needs remembered_rule"),
    "remember-a-rule-without-a-tool": (
        {"remember": True, "remembered_rule": allow("", "git push")},
        "remembered_rule.tool is required",
    ),
    "remember-an-ask-rule": (
        {"remember": True, "remembered_rule": rule("shell", "git push")},
        "remembered_rule.action must be allow, got ask",
    ),
    "remember-a-rule-without-an-action": (
        {"remember": True, "remembered_rule": common_pb2.PermissionRule(tool="shell")},
        "got unspecified",
    ),
    "a-rule-without-remember": ({"remembered_rule": allow("shell")}, "only taken with remember"),
}


@pytest.mark.parametrize("case", list(BAD_DECISIONS))
async def test_a_bad_decision_is_invalid_and_the_approval_stays_pending(store_stub: Stub, case: str) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    [approval] = (await asking(store_stub, conv.id, turn, "call_1")).approvals
    fields, needle = BAD_DECISIONS[case]
    fields = {"decision": S.APPROVAL_DECISION_APPROVE, **fields}
    err = await rpc_error(
        store_stub.ResolveApproval(
            store_pb2.ResolveApprovalRequest(tenant_id=TENANT, approval_id=approval.id, **fields)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or ""), err.details()
    assert await get_approval(store_stub, approval.id) == approval
    assert list((await conversation(store_stub, conv.id)).remembered) == []
    # Still decidable.
    assert (await resolve(store_stub, approval.id)).decision == S.APPROVAL_DECISION_APPROVE


async def test_an_unknown_or_another_tenants_approval_is_not_found(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    [approval] = (await asking(store_stub, conv.id, turn, "call_1")).approvals
    for approval_id, tenant_id in ((new_id("apr"), TENANT), (approval.id, OTHER_TENANT)):
        for call in (
            resolve(store_stub, approval_id, tenant_id=tenant_id),
            get_approval(store_stub, approval_id, tenant_id=tenant_id),
        ):
            err = await rpc_error(call)
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert f"approval {approval_id} not found" in (err.details() or "")
    assert await get_approval(store_stub, approval.id) == approval
    err = await rpc_error(get_approval(store_stub, "apr_nope"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "approval_id" in (err.details() or "")


async def test_remember_appends_the_rule_to_the_conversation_once(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    approvals = (await asking(store_stub, conv.id, turn, "c1", "c2", "c3", "c4")).approvals
    push, dry_run = allow("shell", "git push"), allow("shell", "git push --dry-run")

    decided = await resolve(store_stub, approvals[0].id, remember=True, remembered_rule=push, decided_by="k")
    assert decided.remember is True
    assert list((await conversation(store_stub, conv.id)).remembered) == [push]
    # The identical rule again: remembered once.
    await resolve(
        store_stub,
        approvals[1].id,
        S.APPROVAL_DECISION_EDIT,
        edited_input_json='{"command": "git push"}',
        remember=True,
        remembered_rule=push,
    )
    assert list((await conversation(store_stub, conv.id)).remembered) == [push]
    # Another pattern, and a decision without remember, which remembers nothing.
    await resolve(store_stub, approvals[2].id, remember=True, remembered_rule=dry_run)
    plain = await resolve(store_stub, approvals[3].id)
    assert plain.remember is False
    assert list((await conversation(store_stub, conv.id)).remembered) == [push, dry_run]
    # Another conversation remembers nothing of this one.
    other = await new_conversation(store_stub)
    assert list((await conversation(store_stub, other.id)).remembered) == []


async def test_racing_decisions_leave_exactly_one(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    for attempt in range(5):
        [approval] = (
            await store_stub.Append(
                store_pb2.AppendRequest(
                    tenant_id=TENANT,
                    conversation_id=conv.id,
                    fence=fence(turn),
                    approvals=[ask(f"call_{attempt}")],
                )
            )
        ).approvals
        deciders = [f"key_{i}" for i in range(2 if attempt % 2 == 0 else 6)]
        outcomes = await asyncio.gather(
            *(
                resolve(
                    store_stub,
                    approval.id,
                    S.APPROVAL_DECISION_APPROVE if i % 2 == 0 else S.APPROVAL_DECISION_REJECT,
                    decided_by=who,
                    remember=i % 2 == 0,
                    remembered_rule=allow("shell", f"git push {attempt}") if i % 2 == 0 else None,
                )
                for i, who in enumerate(deciders)
            ),
            return_exceptions=True,
        )
        won = [o for o in outcomes if isinstance(o, common_pb2.Approval)]
        lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(won) == 1 and len(lost) == len(deciders) - 1, outcomes
        [winner] = won
        for err in lost:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (err.details() or "").startswith("already decided")
            assert f"by {winner.decided_by}" in (err.details() or "")
        stored = await get_approval(store_stub, approval.id)
        assert (stored.decision, stored.decided_by) == (winner.decision, winner.decided_by)
    remembered = list((await conversation(store_stub, conv.id)).remembered)
    assert len(remembered) == len(set(r.pattern for r in remembered))


# ---------------------------------------------------------- the end of a turn


async def test_the_seal_closes_the_turns_pending_approvals_and_leaves_decided_ones(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    # Another turn of the conversation, in flight too: its approvals are not this seal's.
    other = await leased_turn(store_stub, conv.id, owner="kernel-2")
    mine = (await asking(store_stub, conv.id, turn, "c1", "c2", "c3")).approvals
    [theirs] = (await asking(store_stub, conv.id, other, "c9", step_index=1)).approvals
    approved = await resolve(store_stub, mine[1].id, decided_by="key_alice")
    clock.advance(30)

    sealed = await seal(store_stub, conv.id, turn, S.TURN_STATE_FAILED, "provider said 500")
    assert sealed.turn.state == S.TURN_STATE_FAILED
    for pending in (mine[0], mine[2]):
        closed = await get_approval(store_stub, pending.id)
        assert (closed.decision, closed.decided_by, closed.reason) == (
            S.APPROVAL_DECISION_CLOSED,
            "kernel",
            "provider said 500",
        )
        assert closed.resolved_at.seconds == int(clock.now)
        err = await rpc_error(resolve(store_stub, pending.id, decided_by="key_bob"))
        assert (err.details() or "").startswith("already decided")
        assert "was closed by kernel" in (err.details() or "")
    assert await get_approval(store_stub, mine[1].id) == approved
    assert await get_approval(store_stub, theirs.id) == theirs
    assert [a.id for a in await listed(store_stub, conv.id, pending_only=True)] == [theirs.id]


async def test_a_seal_without_an_error_closes_with_the_turn_ended_reason(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    [approval] = (await asking(store_stub, conv.id, turn, "c1")).approvals
    await seal(store_stub, conv.id, turn, S.TURN_STATE_ABORTED)
    closed = await get_approval(store_stub, approval.id)
    assert (closed.decision, closed.decided_by, closed.reason) == (
        S.APPROVAL_DECISION_CLOSED,
        "kernel",
        CLOSED_REASON,
    )


async def test_approvals_asked_in_the_sealing_append_are_answered_closed(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    resp = await seal(store_stub, conv.id, turn, S.TURN_STATE_INTERRUPTED, approvals=[ask("c1"), ask("c2")])
    assert [(a.tool_call_id, a.decision) for a in resp.approvals] == [
        ("c1", S.APPROVAL_DECISION_CLOSED),
        ("c2", S.APPROVAL_DECISION_CLOSED),
    ]
    assert await listed(store_stub, turn_id=turn.id) == list(resp.approvals)


async def test_a_turn_ended_by_transition_closes_its_pending_approvals_too(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    [approval] = (await asking(store_stub, conv.id, turn, "c1")).approvals
    await move(store_stub, turn.id, S.TURN_STATE_ABORTED, error_message="cancelled by the user")
    closed = await get_approval(store_stub, approval.id)
    assert (closed.decision, closed.decided_by, closed.reason) == (
        S.APPROVAL_DECISION_CLOSED,
        "kernel",
        "cancelled by the user",
    )


async def test_no_approval_is_created_for_a_turn_that_has_ended(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await seal(store_stub, conv.id, turn, S.TURN_STATE_COMPLETED)
    err = await rpc_error(
        store_stub.CreateApproval(
            store_pb2.CreateApprovalRequest(
                tenant_id=TENANT, approval=ask("c1", conversation_id=conv.id, turn_id=turn.id)
            )
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has ended (completed)" in (err.details() or "")
    assert await listed(store_stub, conv.id) == []


async def test_a_seal_racing_a_decision_leaves_one_outcome(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    for attempt in range(6):
        turn = await leased_turn(store_stub, conv.id)
        [approval] = (await asking(store_stub, conv.id, turn, f"c{attempt}")).approvals
        racers: list[Awaitable[object]] = [
            resolve(store_stub, approval.id, decided_by="key_alice"),
            seal(store_stub, conv.id, turn, S.TURN_STATE_ABORTED),
        ]
        if attempt % 2:
            racers.reverse()
        outcomes = await asyncio.gather(*racers, return_exceptions=True)
        sealed = [o for o in outcomes if isinstance(o, store_pb2.AppendResponse)]
        assert len(sealed) == 1, outcomes  # the seal always lands
        stored = await get_approval(store_stub, approval.id)
        decision = next(o for o in outcomes if not isinstance(o, store_pb2.AppendResponse))
        if isinstance(decision, common_pb2.Approval):
            assert stored == decision and stored.decided_by == "key_alice"
        else:
            assert isinstance(decision, grpc.aio.AioRpcError)
            assert (decision.details() or "").startswith("already decided")
            assert (stored.decision, stored.decided_by) == (S.APPROVAL_DECISION_CLOSED, "kernel")


# -------------------------------------------------------------------- listing


async def test_approvals_list_by_conversation_or_by_turn_oldest_first(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    first = await leased_turn(store_stub, conv.id)
    second = await leased_turn(store_stub, conv.id, owner="kernel-2")
    a = (await asking(store_stub, conv.id, first, "a1", "a2")).approvals
    clock.advance(1)
    b = (await asking(store_stub, conv.id, second, "b1", step_index=1)).approvals
    clock.advance(1)
    await resolve(store_stub, a[0].id, S.APPROVAL_DECISION_REJECT)

    ids = [x.id for x in await listed(store_stub, conv.id)]
    assert ids == [a[0].id, a[1].id, b[0].id]
    assert [x.id for x in await listed(store_stub, conv.id, pending_only=True)] == [a[1].id, b[0].id]
    assert [x.id for x in await listed(store_stub, turn_id=first.id)] == [a[0].id, a[1].id]
    assert [x.id for x in await listed(store_stub, turn_id=first.id, pending_only=True)] == [a[1].id]
    assert [x.id for x in await listed(store_stub, turn_id=second.id)] == [b[0].id]
    # Both given: the turn's, which must be the conversation's.
    assert [x.id for x in await listed(store_stub, conv.id, turn_id=second.id)] == [b[0].id]
    elsewhere = await new_conversation(store_stub)
    err = await rpc_error(listed(store_stub, elsewhere.id, turn_id=second.id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # A turn with none, and a conversation with none.
    quiet = await leased_turn(store_stub, elsewhere.id)
    assert await listed(store_stub, turn_id=quiet.id) == []
    assert await listed(store_stub, elsewhere.id) == []


async def test_listing_needs_a_conversation_or_a_turn_of_this_tenant(store_stub: Stub) -> None:
    err = await rpc_error(listed(store_stub))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conversation_id or turn_id is required" in (err.details() or "")
    theirs = await new_conversation(store_stub, tenant_id=OTHER_TENANT)
    turn = await store_stub.CreateTurn(
        store_pb2.CreateTurnRequest(
            tenant_id=OTHER_TENANT,
            conversation_id=theirs.id,
            state=S.TURN_STATE_RUNNING,
            lease_owner=OWNER,
            lease_ttl=seconds(30),
        )
    )
    for call in (listed(store_stub, turn_id=turn.id), listed(store_stub, turn_id=new_id("turn"))):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------ reconcile


async def test_reconcile_leaves_an_asked_call_to_its_turn_and_closes_it_once_the_turn_ends(
    store_stub: Stub,
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    # Three calls in one step: one ran, one waits for its approval, one dangles.
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            messages=[calls(turn.id, 0, "ran", "waits", "dangles"), result(turn.id, 0, "ran")],
            fence=fence(turn),
            approvals=[ask("waits")],
            move_to=S.TURN_STATE_WAITING_FOR_APPROVAL,
        )
    )
    [approval] = await listed(store_stub, turn_id=turn.id)

    first = await reconcile(store_stub, conv.id)
    assert closed_results(first) == {"dangles"}
    assert await reconcile(store_stub, conv.id) == []

    # Decided while its turn goes on: still the turn's to answer (the kernel that recovers
    # the turn runs or refuses it as decided).
    await resolve(store_stub, approval.id, S.APPROVAL_DECISION_REJECT, reason="no")
    assert await reconcile(store_stub, conv.id) == []
    # Its turn ended without answering it: dangling now.
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            fence=fence(turn),
            seal=store_pb2.TurnSeal(state=S.TURN_STATE_ABORTED),
        )
    )
    second = await reconcile(store_stub, conv.id)
    assert closed_results(second) == {"waits"}
    assert second[0].chunks[0].tool_result.is_error
    assert await reconcile(store_stub, conv.id) == []


async def test_reconcile_leaves_nothing_to_do_for_a_decided_call_that_got_its_result(
    store_stub: Stub,
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    [approval] = (await asking(store_stub, conv.id, turn, "c1")).approvals
    await resolve(store_stub, approval.id)
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            messages=[result(turn.id, 0, "c1")],
            fence=fence(turn),
            move_to=S.TURN_STATE_RESUMING,
        )
    )
    assert await reconcile(store_stub, conv.id) == []


async def test_a_pending_approval_shields_only_its_own_turns_call(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    old = await leased_turn(store_stub, conv.id)
    new = await leased_turn(store_stub, conv.id, owner="kernel-2")
    # The same call id in two turns (a scripted provider numbers its calls from 1 every turn).
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT, conversation_id=conv.id, messages=[calls(old.id, 0, "call_1")], fence=fence(old)
        )
    )
    await asking(store_stub, conv.id, new, "call_1", step_index=1)
    [closed] = await reconcile(store_stub, conv.id)
    assert closed.turn_id == old.id and closed_results([closed]) == {"call_1"}


async def test_reconcile_of_a_conversation_without_approvals_works_as_before(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT, conversation_id=conv.id, messages=[text_message("hi"), calls("t", 0, "c1")]
        )
    )
    assert closed_results(await reconcile(store_stub, conv.id)) == {"c1"}


async def test_resolve_execution_answers_the_rules_a_turn_applies(store_stub: Stub) -> None:
    """Where a turn runs and the rules besides its agent's, in one call (issue 14)."""
    ws = await store_stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w", permissions=RULES)
    )
    conv = await new_conversation(store_stub, workspace_id=ws.id)
    turn = await leased_turn(store_stub, conv.id)
    where = await store_stub.ResolveExecution(
        store_pb2.ResolveExecutionRequest(tenant_id=TENANT, conversation_id=conv.id, turn_id=turn.id)
    )
    assert (where.workspace_id, list(where.workspace_permissions), list(where.remembered)) == (
        ws.id,
        RULES,
        [],
    )
    [approval] = (await asking(store_stub, conv.id, turn, "call_1")).approvals
    await resolve(store_stub, approval.id, remember=True, remembered_rule=allow("shell", "git push"))
    where = await store_stub.ResolveExecution(
        store_pb2.ResolveExecutionRequest(tenant_id=TENANT, conversation_id=conv.id, turn_id=turn.id)
    )
    assert list(where.remembered) == [allow("shell", "git push")]
