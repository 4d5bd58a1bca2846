"""Approvals at the kernel: a call the rules ask about waits for a decision, the rest of its
step runs meanwhile, and every way it can end (approve, remember, reject, edit, expiry,
cancel, interrupt, a kernel that goes away) leaves a conversation that takes its next
message, with no dangling call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispatch.kernel.agents import build_agents
from dispatch.kernel.kernel import Kernel
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.kernel.tools import BUILTIN_TOOLS
from dispatch.kernel.turn import TurnDeps
from dispatch.shared.config import KernelConfig
from dispatch.v1 import common_pb2, exec_pb2_grpc, kernel_pb2, store_pb2
from tests.kernel.test_durability import LEASE_TTL, QUIET, SWEEP, Watcher, crash, start, turn_of
from tests.kernel.test_durability import sealed as turn_ended
from tests.stack import TENANT, Stack, start_stack, text_chunks

S = common_pb2

# Step 0: a shell call (asks) and a list_dir call (allowed); step 1: an answer.
TWO_CALLS = ScriptedProvider.from_data(
    {
        "steps": [
            [
                {"type": "tool_call", "id": "sh", "name": "shell", "input": {"command": "echo hi > out.txt"}},
                {"type": "tool_call", "id": "ls", "name": "list_dir", "input": {}},
            ],
            [{"type": "text_delta", "text": "done"}],
        ]
    }
)
RULES = {"shell": {"echo *": "ask", "rm *": "deny"}, "list_dir": "allow"}


async def stack_with(tmp_path: Path, provider: ScriptedProvider = TWO_CALLS, **options: Any) -> Stack:
    return await start_stack(tmp_path, provider, permissions=RULES, **options)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await stack_with(tmp_path)
    yield s
    await s.stop()


class Follow:
    """The conversation's events, as they come."""

    def __init__(self, stack: Stack, conv: str, after: int = 0):
        self.events: list[common_pb2.AgentEvent] = []
        self._call = stack.kernel.Subscribe(
            kernel_pb2.KernelSubscribeRequest(tenant_id=TENANT, conversation_id=conv, after_event_seq=after)
        )
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for batch in self._call:
                self.events.extend(batch.events)
        except grpc.aio.AioRpcError:
            pass

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("kind")) for e in self.events]

    async def until(self, kind: str, count: int = 1, within: float = 20.0) -> common_pb2.AgentEvent:
        async with asyncio.timeout(within):
            while self.kinds().count(kind) < count:
                await asyncio.sleep(0.01)
        return [e for e in self.events if e.WhichOneof("kind") == kind][count - 1]

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def send(stack: Stack, conv: str, text: str = "go", policy: int = 0) -> kernel_pb2.StartTurnResponse:
    return await stack.kernel.StartTurn(
        kernel_pb2.StartTurnRequest(
            tenant_id=TENANT,
            conversation_id=conv,
            chunks=text_chunks(text),
            policy=policy,  # type: ignore[arg-type]
        )
    )


async def resolve(stack: Stack, approval_id: str, decision: int, **fields: Any) -> common_pb2.Approval:
    return await stack.kernel.ResolveApproval(
        kernel_pb2.KernelResolveApprovalRequest(
            tenant_id=TENANT,
            approval_id=approval_id,
            decision=decision,  # type: ignore[arg-type]
            decided_by="key_test",
            **fields,
        )
    )


async def turn_state(stack: Stack, turn_id: str) -> int:
    return (await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn_id))).state


async def history(stack: Stack, conv: str) -> list[common_pb2.Message]:
    return list(
        (await stack.store.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv))).messages
    )


def results(messages: list[common_pb2.Message]) -> dict[str, common_pb2.ToolResultChunk]:
    return {
        c.tool_result.tool_call_id: c.tool_result
        for m in messages
        for c in m.chunks
        if c.HasField("tool_result")
    }


def no_dangling_calls(messages: list[common_pb2.Message]) -> None:
    calls = {c.tool_call.id for m in messages for c in m.chunks if c.HasField("tool_call")}
    assert calls <= set(results(messages)), f"dangling calls: {calls - set(results(messages))}"


async def sealed(follow: Follow, turn_id: str) -> common_pb2.AgentEvent:
    async with asyncio.timeout(20):
        while True:
            for e in follow.events:
                if e.HasField("turn_sealed") and e.turn_id == turn_id:
                    return e
            await asyncio.sleep(0.01)


async def test_a_call_that_asks_waits_while_the_rest_of_its_step_runs_then_runs_once_approved(
    stack: Stack,
) -> None:
    conv = await stack.conversation()
    follow = Follow(stack, conv)
    sent = await send(stack, conv)
    requested = (await follow.until("approval_requested")).approval_requested.approval
    assert (requested.tool_call_id, requested.tool_name) == ("sh", "shell")
    assert json.loads(requested.input_json) == {"command": "echo hi > out.txt"}
    assert requested.rule == "shell `echo *` = ask (agent default)"
    # The allowed call of the same step ran meanwhile; the shell did not.
    await follow.until("tool_result")
    started = [e.tool_started.tool_call_id for e in follow.events if e.HasField("tool_started")]
    assert started == ["ls"]
    assert not (stack.workspace / "out.txt").exists()
    assert await turn_state(stack, sent.turn_id) == S.TURN_STATE_WAITING_FOR_APPROVAL
    decided = await resolve(stack, requested.id, S.APPROVAL_DECISION_APPROVE)
    assert (decided.decision, decided.decided_by) == (S.APPROVAL_DECISION_APPROVE, "key_test")
    await sealed(follow, sent.turn_id)
    kinds = follow.kinds()
    assert kinds.index("approval_resolved") < [i for i, k in enumerate(kinds) if k == "tool_started"][1]
    assert (stack.workspace / "out.txt").read_text() == "hi\n"
    messages = await history(stack, conv)
    no_dangling_calls(messages)
    assert not results(messages)["sh"].is_error
    assert await turn_state(stack, sent.turn_id) == S.TURN_STATE_COMPLETED
    # Deciding again is refused, and says what was decided.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await resolve(stack, requested.id, S.APPROVAL_DECISION_REJECT)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already decided" in (again.value.details() or "")
    await follow.close()


async def test_a_rejection_is_an_error_result_with_the_reason_and_the_turn_goes_on(stack: Stack) -> None:
    conv = await stack.conversation()
    follow = Follow(stack, conv)
    sent = await send(stack, conv)
    requested = (await follow.until("approval_requested")).approval_requested.approval
    await resolve(stack, requested.id, S.APPROVAL_DECISION_REJECT, reason="not in this repo")
    await sealed(follow, sent.turn_id)
    result = results(await history(stack, conv))["sh"]
    assert result.is_error and "rejected by key_test: not in this repo" in result.content
    assert not (stack.workspace / "out.txt").exists()
    await follow.close()


async def test_an_edit_is_checked_against_the_schema_then_runs_instead(stack: Stack) -> None:
    conv = await stack.conversation()
    follow = Follow(stack, conv)
    sent = await send(stack, conv)
    requested = (await follow.until("approval_requested")).approval_requested.approval
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await resolve(stack, requested.id, S.APPROVAL_DECISION_EDIT, edited_input_json='{"command": ""}')
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the approval stays open" in (bad.value.details() or "")
    edited = json.dumps({"command": "echo edited > out.txt"})
    await resolve(stack, requested.id, S.APPROVAL_DECISION_EDIT, edited_input_json=edited)
    await sealed(follow, sent.turn_id)
    assert (stack.workspace / "out.txt").read_text() == "edited\n"
    assert "run with the input a person edited" in results(await history(stack, conv))["sh"].content
    await follow.close()


async def test_approve_and_remember_lets_the_same_call_run_without_asking_from_then_on(stack: Stack) -> None:
    conv = await stack.conversation()
    follow = Follow(stack, conv)
    first = await send(stack, conv)
    requested = (await follow.until("approval_requested")).approval_requested.approval
    await resolve(stack, requested.id, S.APPROVAL_DECISION_APPROVE, remember=True)
    await sealed(follow, first.turn_id)
    second = await send(stack, conv, "again")
    await sealed(follow, second.turn_id)
    assert follow.kinds().count("approval_requested") == 1  # the second turn did not ask
    conversation = await stack.store.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv)
    )
    assert [(r.tool, r.pattern) for r in conversation.remembered] == [("shell", "echo hi > out.txt")]
    await follow.close()


async def test_a_denied_call_does_not_run_and_the_model_reads_the_rule(tmp_path: Path) -> None:
    provider = ScriptedProvider.from_data(
        {
            "steps": [
                [{"type": "tool_call", "id": "rm", "name": "shell", "input": {"command": "rm -rf src"}}],
                [{"type": "text_delta", "text": "ok"}],
            ]
        }
    )
    stack = await stack_with(tmp_path, provider)
    try:
        (stack.workspace / "src").mkdir()
        conv = await stack.conversation()
        follow = Follow(stack, conv)
        sent = await send(stack, conv)
        await sealed(follow, sent.turn_id)
        result = results(await history(stack, conv))["rm"]
        assert result.is_error and "denied by the rule shell `rm *` = deny (agent default)" in result.content
        assert (stack.workspace / "src").is_dir()
        assert "approval_requested" not in follow.kinds() and "tool_started" not in follow.kinds()
        await follow.close()
    finally:
        await stack.stop()


async def test_cancel_while_waiting_ends_the_turn_aborted_and_closes_its_approvals(stack: Stack) -> None:
    conv = await stack.conversation()
    follow = Follow(stack, conv)
    sent = await send(stack, conv)
    requested = (await follow.until("approval_requested")).approval_requested.approval
    await stack.kernel.Cancel(kernel_pb2.KernelCancelRequest(tenant_id=TENANT, conversation_id=conv))
    sealed_event = await sealed(follow, sent.turn_id)
    assert sealed_event.turn_sealed.state == S.TURN_STATE_ABORTED
    closed = await stack.store.GetApproval(
        store_pb2.GetApprovalRequest(tenant_id=TENANT, approval_id=requested.id)
    )
    assert closed.decision == S.APPROVAL_DECISION_CLOSED
    messages = await history(stack, conv)
    no_dangling_calls(messages)
    # The conversation takes its next message (and this one asks again, and is approved).
    nxt = await send(stack, conv, "try again")
    again = (await follow.until("approval_requested", 2)).approval_requested.approval
    await resolve(stack, again.id, S.APPROVAL_DECISION_APPROVE)
    await sealed(follow, nxt.turn_id)
    assert await turn_state(stack, nxt.turn_id) == S.TURN_STATE_COMPLETED
    await follow.close()


@pytest.mark.parametrize("policy", [S.SEND_POLICY_ENQUEUE, S.SEND_POLICY_INTERRUPT, S.SEND_POLICY_REJECT])
async def test_a_message_sent_while_a_turn_waits_follows_its_policy(stack: Stack, policy: int) -> None:
    conv = await stack.conversation()
    follow = Follow(stack, conv)
    first = await send(stack, conv)
    requested = (await follow.until("approval_requested")).approval_requested.approval
    if policy == S.SEND_POLICY_REJECT:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(stack, conv, "now", policy)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await resolve(stack, requested.id, S.APPROVAL_DECISION_APPROVE)
        await sealed(follow, first.turn_id)
    elif policy == S.SEND_POLICY_ENQUEUE:
        queued = await send(stack, conv, "after it", policy)
        # The API says why it waits: the turn it queued behind waits for approval.
        assert queued.queued and queued.state == S.TURN_STATE_WAITING_FOR_APPROVAL
        await resolve(stack, requested.id, S.APPROVAL_DECISION_APPROVE)
        # It joins the turn as steering once the step's calls are decided and done; the
        # scripted model, told something new, calls again, and asks again.
        again = (await follow.until("approval_requested", 2)).approval_requested.approval
        await resolve(stack, again.id, S.APPROVAL_DECISION_APPROVE)
        await sealed(follow, first.turn_id)
        assert "steering_injected" in follow.kinds()
        users = [m.chunks[0].text.text for m in await history(stack, conv) if m.role == S.ROLE_USER]
        async with asyncio.timeout(20):
            while "after it" not in users:
                await asyncio.sleep(0.05)
                users = [m.chunks[0].text.text for m in await history(stack, conv) if m.role == S.ROLE_USER]
    else:
        second = await send(stack, conv, "instead", policy)
        assert (await turn_state(stack, first.turn_id)) == S.TURN_STATE_ABORTED
        closed = await stack.store.GetApproval(
            store_pb2.GetApprovalRequest(tenant_id=TENANT, approval_id=requested.id)
        )
        assert closed.decision == S.APPROVAL_DECISION_CLOSED
        again = (await follow.until("approval_requested", 2)).approval_requested.approval
        await resolve(stack, again.id, S.APPROVAL_DECISION_REJECT)
        await sealed(follow, second.turn_id)
    no_dangling_calls(await history(stack, conv))
    await follow.close()


async def test_an_approval_nobody_decides_expires_as_a_rejection(tmp_path: Path) -> None:
    stack = await stack_with(tmp_path, approval_timeout=0.5)
    try:
        conv = await stack.conversation()
        follow = Follow(stack, conv)
        sent = await send(stack, conv)
        requested = (await follow.until("approval_requested")).approval_requested.approval
        assert requested.HasField("expires_at")
        await sealed(follow, sent.turn_id)
        resolved = (await follow.until("approval_resolved")).approval_resolved.approval
        assert (resolved.decision, resolved.decided_by) == (S.APPROVAL_DECISION_EXPIRED, "kernel")
        result = results(await history(stack, conv))["sh"]
        assert result.is_error and "nobody approved this call in time" in result.content
        await follow.close()
    finally:
        await stack.stop()


async def test_unknown_or_another_tenants_approval_is_not_found(stack: Stack) -> None:
    conv = await stack.conversation()
    follow = Follow(stack, conv)
    await send(stack, conv)
    requested = (await follow.until("approval_requested")).approval_requested.approval
    for tenant, approval_id in (("other", requested.id), (TENANT, "apr_" + "0" * 26)):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stack.kernel.ResolveApproval(
                kernel_pb2.KernelResolveApprovalRequest(
                    tenant_id=tenant, approval_id=approval_id, decision=S.APPROVAL_DECISION_APPROVE
                )
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    await resolve(stack, requested.id, S.APPROVAL_DECISION_APPROVE)
    await follow.close()


# ----------------------------------------------------- a kernel that goes away while waiting


def kernel_with_rules(stack: Stack, provider: ScriptedProvider = TWO_CALLS) -> Kernel:
    """A kernel of the test's own on the stack's store and exec, with RULES (not started)."""
    agents, _ = build_agents(KernelConfig(permissions=RULES), BUILTIN_TOOLS, provider)
    return Kernel(
        TurnDeps(
            store=stack.store,
            exec=exec_pb2_grpc.ExecStub(stack.channel("exec")),
            agents=agents,
            lease_ttl=LEASE_TTL,
            sweep_interval=SWEEP,
        )
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def durable(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Stack, list[Kernel]]]:
    url = str(request.getfixturevalue("postgres_url")) if request.param == "postgres" else ""
    s = await start_stack(tmp_path, TWO_CALLS, database_url=url, permissions=RULES, sweep_interval=QUIET)
    made: list[Kernel] = []
    yield s, made
    for kernel in made:
        await crash(kernel)
    await s.stop()


async def _crashed_while_waiting(
    stack: Stack, kernels: list[Kernel]
) -> tuple[str, str, common_pb2.Approval, Kernel]:
    """A turn on kernel A whose shell call waits for approval (its list_dir ran), then A
    crashes; answers the conversation, the turn, the approval and kernel B (not started)."""
    a, b = kernel_with_rules(stack), kernel_with_rules(stack)
    kernels += [a, b]
    await a.start()
    conv = await stack.conversation()
    watcher = Watcher(a, conv)
    turn_id = await start(a, conv)
    await watcher.until("approval_requested")
    await watcher.until("tool_result")  # list_dir ran; its result is not committed yet
    [pending] = (
        await stack.store.ListApprovals(store_pb2.ListApprovalsRequest(tenant_id=TENANT, turn_id=turn_id))
    ).approvals
    await crash(a)
    await watcher.stop()
    return conv, turn_id, pending, b


async def test_a_turn_waiting_when_its_kernel_dies_waits_on_another_and_runs_once_approved(
    durable: tuple[Stack, list[Kernel]],
) -> None:
    stack, kernels = durable
    conv, turn_id, pending, b = await _crashed_while_waiting(stack, kernels)
    watcher = Watcher(b, conv)
    await b.start()
    # B takes the turn over and waits for the same approval: nothing asked twice, nothing run.
    async with asyncio.timeout(20):
        while (await turn_of(stack, turn_id)).attempts < 2:
            await asyncio.sleep(0.05)
    assert (await turn_of(stack, turn_id)).state == S.TURN_STATE_WAITING_FOR_APPROVAL
    assert not (stack.workspace / "out.txt").exists()
    # B asks again before it is answered (claimed is not yet waiting: decided sooner, B would
    # find the decision and never ask).
    await watcher.until("approval_requested")
    decided = await b.resolve_approval(TENANT, pending.id, S.APPROVAL_DECISION_APPROVE, decided_by="key_test")
    assert decided.decision == S.APPROVAL_DECISION_APPROVE
    done = await turn_ended(stack, turn_id)
    assert done.state == S.TURN_STATE_COMPLETED
    assert (stack.workspace / "out.txt").read_text() == "hi\n"
    messages = await history(stack, conv)
    no_dangling_calls(messages)
    found = results(messages)
    assert not found["sh"].is_error
    # list_dir ran on A, whose result was lost with it: it reads as interrupted, once.
    assert found["ls"].is_error
    answers = [c.tool_result.tool_call_id for m in messages for c in m.chunks if c.HasField("tool_result")]
    assert sorted(answers) == ["ls", "sh"]
    # Announced again by B (A's announcement may not have been persisted before it died).
    assert await approvals_requested(stack, conv) == {pending.id}
    assert watcher.kinds().count("approval_requested") >= 1
    await watcher.stop()
    # The conversation takes its next message.
    again = await start(b, conv, "again")
    await b.resolve_approval(TENANT, (await first_approval(stack, again)).id, S.APPROVAL_DECISION_REJECT)
    assert (await turn_ended(stack, again)).state == S.TURN_STATE_COMPLETED


async def test_a_decision_made_while_no_kernel_runs_the_turn_is_carried_out_when_one_does(
    durable: tuple[Stack, list[Kernel]],
) -> None:
    stack, kernels = durable
    conv, turn_id, pending, b = await _crashed_while_waiting(stack, kernels)
    # Decided through a kernel that does not run the turn (B, not started: no recovery yet).
    await b.resolve_approval(TENANT, pending.id, S.APPROVAL_DECISION_APPROVE, decided_by="key_test")
    assert not (stack.workspace / "out.txt").exists()
    await b.start()
    done = await turn_ended(stack, turn_id)
    assert (done.state, done.attempts) == (S.TURN_STATE_COMPLETED, 2)
    assert (stack.workspace / "out.txt").read_text() == "hi\n"
    messages = await history(stack, conv)
    no_dangling_calls(messages)
    assert not results(messages)["sh"].is_error


async def first_approval(stack: Stack, turn_id: str) -> common_pb2.Approval:
    async with asyncio.timeout(20):
        while True:
            found = await stack.store.ListApprovals(
                store_pb2.ListApprovalsRequest(tenant_id=TENANT, turn_id=turn_id)
            )
            if found.approvals:
                return found.approvals[0]
            await asyncio.sleep(0.05)


async def approvals_requested(stack: Stack, conv: str) -> set[str]:
    """The approvals whose approval_requested events the conversation persisted."""
    events = await stack.store.LoadEvents(store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv))
    return {e.approval_requested.approval.id for e in events.events if e.HasField("approval_requested")}


# ------------------------------------------------------------------ tool_started


async def test_tool_started_comes_when_a_call_runs_not_when_it_is_made(tmp_path: Path) -> None:
    """A call queued behind an exclusive tool (shell runs alone) starts once the one before
    it is done; ``tool_started`` says when, and where."""
    provider = ScriptedProvider.from_data(
        {
            "steps": [
                [
                    {
                        "type": "tool_call",
                        "id": "first",
                        "name": "shell",
                        "input": {"command": "sleep 0.3; echo a"},
                    },
                    {"type": "tool_call", "id": "second", "name": "shell", "input": {"command": "echo b"}},
                ],
                [{"type": "text_delta", "text": "done"}],
            ]
        }
    )
    stack = await start_stack(tmp_path, provider)
    try:
        conv = await stack.conversation()
        follow = Follow(stack, conv)
        sent = await send(stack, conv)
        await sealed(follow, sent.turn_id)
        order = [
            (str(e.WhichOneof("kind")), e.tool_started.tool_call_id or e.tool_result.tool_call_id)
            for e in follow.events
            if e.HasField("tool_started") or e.HasField("tool_result")
        ]
        assert order == [
            ("tool_started", "first"),
            ("tool_result", "first"),
            ("tool_started", "second"),
            ("tool_result", "second"),
        ]
        started = next(e.tool_started for e in follow.events if e.HasField("tool_started"))
        assert (started.name, started.computer_id) == ("shell", "")  # empty: this machine
        # Both calls were made (streamed) before either started.
        kinds = follow.kinds()
        assert kinds.index("tool_started") > max(i for i, k in enumerate(kinds) if k == "tool_call")
        await follow.close()
    finally:
        await stack.stop()
