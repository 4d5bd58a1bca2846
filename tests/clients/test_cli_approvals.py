"""The CLI's approvals: the Renderer's lines, the question asked at the terminal and how its
answers decide, `dispatch approvals`, `dispatch approve` and `dispatch reject`.

The tests under "the kernel's approval flow" need it (and KernelConfig.permissions): a turn
whose shell call asks, decided from the CLI, through a pipe and on a real terminal (a pty).
The others pass on their own."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import grpc
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.server import Service, start_server
from dispatch.v1 import common_pb2 as V
from dispatch.v1 import store_pb2, transport_pb2, transport_pb2_grpc
from dispatch_client import DispatchClient
from dispatch_client._prompt import QUESTION, Answer, TerminalReader, ask
from dispatch_client._proto import common_pb2
from dispatch_client.cli import (
    AskingSink,
    Renderer,
    TerminalDecider,
    approval_json,
    approval_line,
    main,
    parse_args,
)
from dispatch_client.errors import FailedPrecondition, InvalidArgument
from tests.clients.test_cli import Ran, cli_env
from tests.stack import Stack, start_stack
from tests.transport.test_approvals_api import (
    ASK_ONCE,
    MISSING_APPROVAL,
    RULES,
    Recording,
    a_turn,
    kernel_supports,
    new_key,
    recording,
    stored_approval,
)

__all__ = ["recording"]  # a fixture

S = common_pb2


def approval(**fields: Any) -> common_pb2.Approval:
    base: dict[str, Any] = {
        "id": "apr_1",
        "tool_call_id": "call_1",
        "tool_name": "shell",
        "input_json": '{"command": "git push origin main"}',
        "rule": "shell `git push*` = ask",
    }
    return common_pb2.Approval(**{**base, **fields})


def requested(**fields: Any) -> common_pb2.AgentEvent:
    return S.AgentEvent(approval_requested=S.ApprovalRequested(approval=approval(**fields)))


def resolved(**fields: Any) -> common_pb2.AgentEvent:
    return S.AgentEvent(approval_resolved=S.ApprovalResolved(approval=approval(**fields)))


def rendered(*events: common_pb2.AgentEvent) -> list[str]:
    out = io.StringIO()
    renderer = Renderer(out)
    for event in events:
        renderer.event(event)
    return out.getvalue().splitlines()


# ------------------------------------------------------------------ the Renderer


def test_an_approval_request_shows_the_tool_what_it_runs_the_rule_and_the_id() -> None:
    assert rendered(S.AgentEvent(text_delta=S.TextDelta(text="Pushing")), requested()) == [
        "Pushing",
        "? shell wants to run: git push origin main (rule: shell `git push*` = ask) — approval apr_1",
    ]
    other = requested(
        tool_name="write_file", input_json='{"path": "a.txt", "content": "' + "x" * 300 + '"}', rule=""
    )
    [line] = rendered(other)
    assert line.startswith('? write_file wants to run: {"path": "a.txt", "content": "xxx')
    assert line.endswith("…" + " — approval apr_1") and len(line) < 220


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({"decision": S.APPROVAL_DECISION_APPROVE, "decided_by": "key_7"}, "✓ shell approved by key_7"),
        (
            {"decision": S.APPROVAL_DECISION_APPROVE, "decided_by": "key_7", "remember": True},
            "✓ shell approved by key_7 (remembered)",
        ),
        (
            {
                "decision": S.APPROVAL_DECISION_EDIT,
                "decided_by": "key_7",
                "edited_input_json": '{"command": "ls"}',
            },
            "✓ shell approved with other input by key_7: ls",
        ),
        (
            {"decision": S.APPROVAL_DECISION_REJECT, "decided_by": "key_7", "reason": "not on main"},
            "✗ shell rejected by key_7: not on main",
        ),
        ({"decision": S.APPROVAL_DECISION_REJECT, "decided_by": "key_7"}, "✗ shell rejected by key_7"),
        (
            {"decision": S.APPROVAL_DECISION_EXPIRED, "decided_by": "kernel"},
            "✗ shell: the approval expired, nobody decided in time",
        ),
        (
            {"decision": S.APPROVAL_DECISION_CLOSED, "decided_by": "kernel"},
            "✗ shell: the approval closed, the turn ended before a decision",
        ),
    ],
)
def test_a_decision_says_how_and_by_whom(fields: dict[str, Any], line: str) -> None:
    assert rendered(resolved(**fields)) == [line]


def test_tool_started_shows_only_for_a_call_that_waited_for_approval() -> None:
    def started(call: str, computer: str = "") -> common_pb2.AgentEvent:
        return S.AgentEvent(tool_started=S.ToolStarted(tool_call_id=call, name="shell", computer_id=computer))

    assert rendered(
        started("call_0"),  # an ordinary call: its tool_call line says it all
        requested(),
        resolved(decision=S.APPROVAL_DECISION_APPROVE, decided_by="key_7"),
        started("call_1", "build-box"),
        started("call_1"),  # once
    ) == [
        "? shell wants to run: git push origin main (rule: shell `git push*` = ask) — approval apr_1",
        "✓ shell approved by key_7",
        "▸ shell started on build-box",
    ]


def test_approval_lines_and_json() -> None:
    pending = approval(id="apr_2")
    pending.created_at.FromSeconds(1_800_000_000)
    assert approval_line(pending) == (
        "apr_2  pending   shell  git push origin main  rule: shell `git push*` = ask  "
        "created 2027-01-15 08:00:00"
    )
    decided = approval(decision=S.APPROVAL_DECISION_REJECT, decided_by="key_7", reason="no", remember=False)
    decided.created_at.FromSeconds(1_800_000_000)
    decided.resolved_at.FromMilliseconds(1_800_000_002_500)
    assert approval_line(decided).endswith(
        "by key_7  reason: no  created 2027-01-15 08:00:00  decided +2.50s"
    )
    as_json = json.loads(approval_json(decided))
    assert list(as_json)[:3] == ["id", "state", "decision"]
    assert (as_json["state"], as_json["decision"], as_json["reason"]) == ("rejected", "reject", "no")
    assert (
        "decision" not in json.loads(approval_json(pending))
        and json.loads(approval_json(pending))["state"] == "pending"
    )


# ------------------------------------------------------------ the question


def reader(*lines: str | None) -> tuple[Callable[[str], Awaitable[str | None]], list[str]]:
    """A LineReader answering ``lines`` in turn (None: the input ends), and the prompts it showed."""
    answers = iter(lines)
    prompts: list[str] = []

    async def read(prompt: str) -> str | None:
        prompts.append(prompt)
        return next(answers, None)

    return read, prompts


@pytest.mark.parametrize(
    ("lines", "answer"),
    [
        (["y"], Answer("approve")),
        (["YES"], Answer("approve")),
        (["a"], Answer("approve", remember=True)),
        (["always"], Answer("approve", remember=True)),
        (["n", "too risky "], Answer("reject", reason="too risky")),
        (["no", ""], Answer("reject")),
        (["e", '{"command": "ls"}'], Answer("edit", edited_input_json='{"command": "ls"}')),
        (["e", "[1]", '{"command": "ls"}'], Answer("edit", edited_input_json='{"command": "ls"}')),
        (["e", "", "y"], Answer("approve")),  # empty: back to the question
        (["", "maybe", "y"], Answer("approve")),
        ([], None),
        (["e", None], None),
    ],
)
async def test_the_question_and_its_answers(lines: list[str | None], answer: Answer | None) -> None:
    read, prompts = reader(*lines)
    said = io.StringIO()
    assert await ask(approval(), read, said) == answer
    assert prompts[0] == f"{QUESTION}: " and QUESTION == "[y]es / [a]lways / [n]o / [e]dit"
    assert said.getvalue().startswith(
        'approve shell {"command": "git push origin main"} (rule: shell `git push*` = ask)?\n'
    )
    if "maybe" in lines:
        assert (
            "answer y (run it), a (run it, and the same call from now on without asking)" in said.getvalue()
        )
    if "[1]" in lines:
        assert "that is not a JSON object" in said.getvalue()


async def test_the_terminal_reader_reads_lines_and_the_end_and_leaves_no_reader_when_cancelled() -> None:
    read_fd, write_fd = os.pipe()
    said = io.StringIO()
    terminal = TerminalReader(read_fd, said)
    try:
        os.write(write_fd, b"y\r\nsecond\n")
        assert await terminal("one? ") == "y"
        assert await terminal("two? ") == "second"  # typed ahead: already read
        waiting = asyncio.ensure_future(terminal("three? "))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not asyncio.get_running_loop().remove_reader(read_fd)  # nothing left watching it
        os.write(write_fd, b"partial")
        os.close(write_fd)
        write_fd = -1
        assert await terminal("four? ") == "partial"
        assert await terminal("five? ") is None
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    assert said.getvalue() == "one? two? three? four? five? "


# ------------------------------------------------------------ AskingSink


class Decisions:
    """A ``decide`` the test finishes by hand: each call waits for its approval's future."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.done: dict[str, asyncio.Future[None]] = {}
        self.withdrawn: list[str] = []

    async def __call__(self, a: common_pb2.Approval) -> None:
        self.asked.append(a.id)
        self.done[a.id] = asyncio.get_running_loop().create_future()
        try:
            await self.done[a.id]
        except asyncio.CancelledError:
            self.withdrawn.append(a.id)
            raise


def text(t: str) -> common_pb2.AgentEvent:
    return S.AgentEvent(text_delta=S.TextDelta(text=t))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_approvals_are_asked_one_at_a_time_and_what_follows_waits_for_the_answer() -> None:
    out = io.StringIO()
    decisions = Decisions()
    sink = AskingSink(Renderer(out), decisions)
    sink.event(requested(id="apr_1", tool_call_id="c1"))
    sink.event(requested(id="apr_2", tool_call_id="c2"))
    sink.event(text("held"))
    await settle()
    assert decisions.asked == ["apr_1"] and sink.deciding == "apr_1"
    assert "held" not in out.getvalue() and "apr_2" not in out.getvalue()
    decisions.done["apr_1"].set_result(None)
    await settle()
    # apr_2 was shown, then asked; the text after it waits for that answer.
    assert (
        decisions.asked == ["apr_1", "apr_2"] and "apr_2" in out.getvalue() and "held" not in out.getvalue()
    )
    decisions.done["apr_2"].set_result(None)
    await settle()
    assert out.getvalue().endswith("held") and sink.deciding == ""
    await sink.close()


async def test_an_approval_decided_elsewhere_withdraws_its_question_or_is_never_asked() -> None:
    out = io.StringIO()
    decisions = Decisions()
    sink = AskingSink(Renderer(out), decisions)
    sink.event(requested(id="apr_1", tool_call_id="c1"))
    sink.event(requested(id="apr_2", tool_call_id="c2"))
    await settle()
    sink.event(resolved(id="apr_2", decision=S.APPROVAL_DECISION_REJECT, decided_by="key_9"))
    sink.event(resolved(id="apr_1", decision=S.APPROVAL_DECISION_APPROVE, decided_by="key_9"))
    await settle()
    assert decisions.asked == ["apr_1"] and decisions.withdrawn == ["apr_1"]  # apr_2: decided before its turn
    assert rendered_lines(out)[-2:] == ["✗ shell rejected by key_9", "✓ shell approved by key_9"]
    await sink.close()


async def test_closing_withdraws_the_open_question_and_writes_what_was_held() -> None:
    out = io.StringIO()
    decisions = Decisions()
    sink = AskingSink(Renderer(out), decisions)
    sink.event(requested())
    sink.event(text("after"))
    await settle()
    await sink.close()
    assert decisions.withdrawn == ["apr_1"] and out.getvalue().endswith("after")
    sink.event(requested(id="apr_3"))  # closed: shown, never asked
    await settle()
    assert decisions.asked == ["apr_1"] and "apr_3" in out.getvalue()


def rendered_lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


# ------------------------------------------------------------ TerminalDecider


class FakeClient:
    """Records resolve_approval calls and fails them with ``failures`` in turn."""

    def __init__(self, *failures: Exception | None):
        self.failures = list(failures)
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def resolve_approval(self, approval_id: str, decision: str, **options: Any) -> common_pb2.Approval:
        self.calls.append((approval_id, decision, options))
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return approval()


def as_client(fake: FakeClient) -> DispatchClient:
    return cast(DispatchClient, fake)


@pytest.fixture
def args(tmp_path: Path) -> Any:
    (tmp_path / "api_key").write_text("k")
    return parse_args(["--address", "10.0.0.1:7600", "--data-dir", str(tmp_path), "approvals", "conv_x"])


async def test_the_decider_asks_again_after_an_edit_the_server_refuses(args: Any) -> None:
    client = FakeClient(
        InvalidArgument("edited_input_json does not fit shell's schema: 'command' is required")
    )
    read, _ = reader("e", '{"cmd": "ls"}', "e", '{"command": "ls"}')
    said = io.StringIO()
    await TerminalDecider(as_client(client), args, read, said)(approval())
    assert [(c[1], c[2]["edited_input_json"]) for c in client.calls] == [
        ("edit", '{"cmd": "ls"}'),
        ("edit", '{"command": "ls"}'),
    ]
    assert "dispatch: INVALID_ARGUMENT: edited_input_json does not fit" in said.getvalue()


async def test_the_decider_reports_an_approval_already_decided_and_goes_on(args: Any) -> None:
    client = FakeClient(FailedPrecondition("already decided: approval apr_1 was approved by key_2"))
    read, _ = reader("a")
    said = io.StringIO()
    await TerminalDecider(as_client(client), args, read, said)(approval())
    assert client.calls == [("apr_1", "approve", {"edited_input_json": "", "reason": "", "remember": True})]
    assert "could not decide approval apr_1: FAILED_PRECONDITION: already decided" in said.getvalue()


async def test_without_input_the_decider_says_how_to_decide_from_elsewhere(args: Any, tmp_path: Path) -> None:
    client = FakeClient()
    read, prompts = reader()  # the input has ended
    said = io.StringIO()
    decider = TerminalDecider(as_client(client), args, read, said)
    await decider(approval())
    await decider(approval(id="apr_2"))  # not asked again: the input is over
    assert client.calls == [] and len(prompts) == 1
    lines = said.getvalue().splitlines()
    hint = f"--address 10.0.0.1:7600 --data-dir {tmp_path}"
    assert lines[-1] == (
        f"dispatch: approval apr_2 waits for a decision: dispatch approve apr_2 {hint} "
        f"[--remember] [--edit JSON], or dispatch reject apr_2 {hint} [--reason TEXT]"
    )
    assert TerminalDecider(as_client(client), args, None, said).read is None  # --no-prompt: the same, at once


def test_chat_and_send_take_no_prompt() -> None:
    assert parse_args(["chat", "hi", "--no-prompt"]).no_prompt
    assert not parse_args(["send", "conv_x", "hi"]).no_prompt
    assert parse_args(["approve", "apr_1", "--remember", "--edit", "{}"]).edit == "{}"
    assert parse_args(["reject", "apr_1", "--reason", "no"]).reason == "no"


def test_reject_needs_an_id(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["reject"])
    assert exited.value.code == 2


# ------------------------------------------------------------ the commands


def cli_for(stack: Stack, capsys: pytest.CaptureFixture[str]) -> Callable[..., Awaitable[Ran]]:
    async def run(*argv: str, key: str | None = None) -> Ran:
        options = ["--address", stack.address("transport"), "--api-key", key or stack.api_key]
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*options, *argv])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


async def test_approvals_lists_a_conversations_approvals(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = cli_for(stack, capsys)
    conv, turn = await a_turn(stack, stack.transport)
    first = await stored_approval(stack, conv, turn, "call_1")
    second = await stored_approval(stack, conv, turn, "call_2")
    await stack.store.ResolveApproval(
        store_pb2.ResolveApprovalRequest(
            tenant_id="local", approval_id=first, decision=V.APPROVAL_DECISION_REJECT, reason="no"
        )
    )
    listed = await cli("approvals", conv)
    assert listed.code == 0, listed.err
    lines = listed.out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        [first, "rejected", "shell"],
        [second, "pending", "shell"],
    ]
    assert "echo call_2  rule: shell * = ask" in lines[1] and "reason: no" in lines[0]
    pending = await cli("approvals", conv, "--pending", "--json")
    assert [(a["id"], a["state"], a["tool_call_id"]) for a in pending.json_lines()] == [
        (second, "pending", "call_2")
    ]
    missing = await cli("approvals", "conv_00000000000000000000000000")
    assert missing.code == 4 and missing.err.startswith("dispatch: NOT_FOUND: ")


async def test_approve_and_reject_print_the_decision(
    recording: Recording, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, kernel = recording
    key = await new_key(stack)
    cli = cli_for(stack, capsys)
    approved = await cli("approve", MISSING_APPROVAL, "--remember", key=key.secret)
    assert approved.code == 0, approved.err
    assert (
        approved.out.split()[:2] == [MISSING_APPROVAL, "approved"]
        and f"by {key.id}  remembered" in approved.out
    )
    edited = await cli("approve", MISSING_APPROVAL, "--edit", '{"command": "ls"}', key=key.secret)
    assert edited.out.split()[1] == "edited" and 'input: {"command": "ls"}' in edited.out
    rejected = await cli("reject", MISSING_APPROVAL, "--reason", "not today", key=key.secret)
    assert rejected.out.split()[1] == "rejected" and "reason: not today" in rejected.out
    assert [(int(a.decision), a.remember, a.reason) for a in kernel.asked] == [
        (S.APPROVAL_DECISION_APPROVE, True, ""),
        (S.APPROVAL_DECISION_EDIT, False, ""),
        (S.APPROVAL_DECISION_REJECT, False, "not today"),
    ]


async def test_a_refused_decision_exits_6(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    cli = cli_for(stack, capsys)
    malformed = await cli("approve", "apr_x")
    assert malformed.code == 6 and "approval_id 'apr_x' is malformed" in malformed.err
    not_an_object = await cli("approve", MISSING_APPROVAL, "--edit", "[1]")
    assert not_an_object.code == 6 and "must be a JSON object" in not_an_object.err


# ------------------------------------- the question on a real terminal (a pty)
# Against a Dispatch server that plays one turn by the contract: its shell call asks, and
# the turn goes on when ResolveApproval decides (a refused edit leaves it waiting). So the
# CLI's side is tested on a terminal now, whatever the kernel does; the same scenarios run
# against the real stack below.

FAKE_CONV = "conv_0000000000000000000000000f"
FAKE_TURN = "turn_0000000000000000000000000f"
FAKE_APPROVAL = "apr_0000000000000000000000000f"


class FakeDispatch(transport_pb2_grpc.DispatchServicer):
    """One conversation, one turn: ``echo hello`` waits for approval."""

    def __init__(self) -> None:
        self.events: list[V.AgentEvent] = []
        self.changed = asyncio.Event()
        self.decided: list[transport_pb2.PublicResolveApprovalRequest] = []
        self.cancelled = False
        self.approval = V.Approval(
            id=FAKE_APPROVAL,
            conversation_id=FAKE_CONV,
            turn_id=FAKE_TURN,
            tool_call_id="call_1",
            tool_name="shell",
            input_json='{"command": "echo hello"}',
            rule="shell = ask (agent default)",
        )

    def emit(self, **kind: Any) -> None:
        self.events.append(
            V.AgentEvent(conversation_id=FAKE_CONV, turn_id=FAKE_TURN, event_seq=len(self.events) + 1, **kind)
        )
        self.changed.set()

    async def CreateConversation(self, request: Any, context: Any) -> V.Conversation:
        return V.Conversation(id=FAKE_CONV)

    async def Send(self, request: Any, context: Any) -> transport_pb2.SendResponse:
        self.emit(turn_started=V.TurnStarted(agent="default", model="fake"))
        self.emit(
            tool_call=V.ToolCallEvent(
                tool_call_id="call_1", name="shell", input_json=self.approval.input_json
            )
        )
        self.emit(approval_requested=V.ApprovalRequested(approval=self.approval))
        return transport_pb2.SendResponse(turn_id=FAKE_TURN, state=V.TURN_STATE_RUNNING, after_event_seq=0)

    async def Subscribe(self, request: Any, context: Any) -> AsyncIterator[transport_pb2.SubscribeResponse]:
        sent = request.after_event_seq
        while True:
            if sent < len(self.events):
                yield transport_pb2.SubscribeResponse(events=self.events[sent:])
                sent = len(self.events)
            self.changed.clear()
            await self.changed.wait()

    async def ResolveApproval(self, request: Any, context: Any) -> V.Approval:
        if self.decided:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "already decided")
        command = json.loads(self.approval.input_json)["command"]
        if request.decision == V.APPROVAL_DECISION_EDIT:
            edited = json.loads(request.edited_input_json)
            if "command" not in edited:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "edited input: 'command' is a required property"
                )
            command = edited["command"]
        self.decided.append(request)
        decided = V.Approval()
        decided.CopyFrom(self.approval)
        decided.decision, decided.reason, decided.remember = (
            request.decision,
            request.reason,
            request.remember,
        )
        decided.edited_input_json, decided.decided_by = request.edited_input_json, "key_fake"
        self.emit(approval_resolved=V.ApprovalResolved(approval=decided))
        if request.decision == V.APPROVAL_DECISION_REJECT:
            self.emit(
                tool_result=V.ToolResultEvent(
                    tool_call_id="call_1", name="shell", content=request.reason, is_error=True
                )
            )
        else:
            self.emit(tool_started=V.ToolStarted(tool_call_id="call_1", name="shell"))
            self.emit(
                tool_result=V.ToolResultEvent(
                    tool_call_id="call_1", name="shell", content=command.removeprefix("echo ")
                )
            )
        self.finish(V.FINISH_REASON_STOP)
        return decided

    async def Cancel(self, request: Any, context: Any) -> transport_pb2.CancelResponse:
        self.cancelled = True
        self.finish(V.FINISH_REASON_ABORTED)
        return transport_pb2.CancelResponse(turn_id=FAKE_TURN)

    def finish(self, reason: V.FinishReason.ValueType) -> None:
        self.emit(turn_done=V.TurnDone(finish_reason=reason, steps=1))
        self.emit(turn_sealed=V.TurnSealed(state=V.TURN_STATE_COMPLETED))


class Fake(NamedTuple):
    dispatch: FakeDispatch
    env: dict[str, str]


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    # The calls it leaves out answer UNIMPLEMENTED (the generated base class).
    dispatch = FakeDispatch()  # type: ignore[abstract]
    server = await start_server(
        [
            Service(
                "dispatch.v1.Dispatch",
                lambda s: transport_pb2_grpc.add_DispatchServicer_to_server(dispatch, s),
            )
        ],
        "127.0.0.1:0",
    )
    try:
        yield Fake(
            dispatch, cli_env(DISPATCH_API_KEY="k", DISPATCH_ADDRESS=f"127.0.0.1:{server.port}", NO_COLOR="1")
        )
    finally:
        await server.stop(0)


async def on_terminal(
    env: dict[str, str], argv: list[str], script: Callable[[Terminal], None]
) -> tuple[int, str]:
    """Run ``dispatch ARGV`` on a pty, ``script`` typing at it; its exit status and all it showed."""

    def run() -> tuple[int, str]:
        with terminal(argv, env) as t:
            script(t)
            return t.finish(), t.seen.decode(errors="replace")

    return await asyncio.to_thread(run)


def answer(*lines: str) -> Callable[[Terminal], None]:
    def script(t: Terminal) -> None:
        for line in lines:
            t.expect(QUESTION if line in ("y", "a", "n", "e", "?") else ": ")
            t.type(line)

    return script


async def test_on_a_terminal_chat_asks_and_yes_runs_the_call(fake: Fake) -> None:
    code, shown = await on_terminal(fake.env, ["chat", "go"], answer("y"))
    assert code == 0, shown
    [decided] = fake.dispatch.decided
    assert (decided.approval_id, decided.decision, decided.remember) == (
        FAKE_APPROVAL,
        V.APPROVAL_DECISION_APPROVE,
        False,
    )


async def test_always_remembers(fake: Fake) -> None:
    code, shown = await on_terminal(fake.env, ["chat", "go"], answer("a"))
    assert code == 0, shown
    assert "✓ shell approved by key_fake (remembered)" in shown and "▸ shell started" in shown
    assert [d.remember for d in fake.dispatch.decided] == [True]


async def test_no_asks_for_a_reason_the_model_is_given(fake: Fake) -> None:
    code, shown = await on_terminal(fake.env, ["chat", "go"], answer("n", "not on main"))
    assert code == 0, shown
    assert [(d.decision, d.reason) for d in fake.dispatch.decided] == [
        (V.APPROVAL_DECISION_REJECT, "not on main")
    ]
    assert "✗ shell rejected by key_fake: not on main" in shown and "✗ shell: not on main" in shown


async def test_an_edit_the_server_refuses_is_asked_again(fake: Fake) -> None:
    def script(t: Terminal) -> None:
        t.expect(QUESTION)
        t.type("e")
        t.expect("new input for shell (a JSON object; empty: back): ")
        t.type("[1]")
        t.expect("that is not a JSON object")
        t.type('{"cmd": "ls"}')
        t.expect("dispatch: INVALID_ARGUMENT: edited input: 'command' is a required property")
        t.expect(QUESTION)
        t.type("e")
        t.expect("new input for shell")
        t.type('{"command": "echo edited"}')

    code, shown = await on_terminal(fake.env, ["chat", "go"], script)
    assert code == 0, shown
    assert [json.loads(d.edited_input_json) for d in fake.dispatch.decided] == [{"command": "echo edited"}]
    assert (
        "✓ shell approved with other input by key_fake: echo edited" in shown and "← shell: edited" in shown
    )


async def test_the_end_of_input_says_how_to_decide_and_the_turn_is_still_followed(fake: Fake) -> None:
    def script(t: Terminal) -> None:
        t.expect(QUESTION)
        os.write(t.parent, b"\x04")  # Ctrl-D: the end of input
        t.expect(f"approval {FAKE_APPROVAL} waits for a decision: dispatch approve {FAKE_APPROVAL}")
        asyncio.run_coroutine_threadsafe(decide_elsewhere(), loop).result(30)

    async def decide_elsewhere() -> None:
        req = transport_pb2.PublicResolveApprovalRequest(
            approval_id=FAKE_APPROVAL, decision=V.APPROVAL_DECISION_APPROVE
        )
        await fake.dispatch.ResolveApproval(req, None)

    loop = asyncio.get_running_loop()
    code, shown = await on_terminal(fake.env, ["chat", "go"], script)
    assert code == 0, shown
    assert "✓ shell approved by key_fake" in shown and "← shell: hello" in shown


async def test_an_approval_decided_elsewhere_withdraws_the_question(fake: Fake) -> None:
    async def decide_elsewhere() -> None:
        req = transport_pb2.PublicResolveApprovalRequest(
            approval_id=FAKE_APPROVAL, decision=V.APPROVAL_DECISION_REJECT, reason="from CI"
        )
        await fake.dispatch.ResolveApproval(req, None)

    loop = asyncio.get_running_loop()

    def script(t: Terminal) -> None:
        t.expect(QUESTION)
        asyncio.run_coroutine_threadsafe(decide_elsewhere(), loop).result(30)

    code, shown = await on_terminal(fake.env, ["chat", "go"], script)
    assert code == 0, shown
    assert (
        "✗ shell rejected by key_fake: from CI" in shown.split(QUESTION)[1]
    )  # after the question, not typed


async def test_no_prompt_says_how_even_on_a_terminal(fake: Fake) -> None:
    loop = asyncio.get_running_loop()

    async def decide_elsewhere() -> None:
        req = transport_pb2.PublicResolveApprovalRequest(
            approval_id=FAKE_APPROVAL, decision=V.APPROVAL_DECISION_APPROVE
        )
        await fake.dispatch.ResolveApproval(req, None)

    def script(t: Terminal) -> None:
        t.expect("waits for a decision: dispatch approve")
        asyncio.run_coroutine_threadsafe(decide_elsewhere(), loop).result(30)

    code, shown = await on_terminal(fake.env, ["send", FAKE_CONV, "go", "--no-prompt"], script)
    assert code == 0, shown
    assert QUESTION not in shown and "✓ shell approved by key_fake" in shown


async def test_ctrl_c_at_the_question_cancels_the_turn(fake: Fake) -> None:
    def script(t: Terminal) -> None:
        t.expect(QUESTION)
        t.proc.send_signal(signal.SIGINT)
        t.expect("dispatch: cancelled turn")

    code, shown = await on_terminal(fake.env, ["chat", "go"], script)
    assert code == 130, shown
    assert fake.dispatch.cancelled and fake.dispatch.decided == []


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


async def pending_approval(stack: Stack, conv: str) -> str:
    """The id of the conversation's approval once one waits (the CLI's turn asked)."""
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        async for event in client.subscribe(conv):
            if event.HasField("approval_requested"):
                return event.approval_requested.approval.id
    raise AssertionError("no approval was requested")


async def test_without_a_terminal_send_says_how_to_decide_and_follows_the_turn_to_its_end(
    asking: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = cli_for(asking, capsys)
    conv = (await cli("conversations", "create")).out.strip()
    sending = asyncio.ensure_future(cli("send", conv, "go"))
    approval_id = await pending_approval(asking, conv)
    async with DispatchClient(asking.address("transport"), api_key=asking.api_key) as client:
        await client.approve(approval_id)
    sent = await sending
    assert sent.code == 0, sent.err
    assert (
        f"dispatch: approval {approval_id} waits for a decision: dispatch approve {approval_id}" in sent.err
    )
    lines = sent.out.splitlines()
    asked = next(i for i, line in enumerate(lines) if line.startswith("? shell wants to run: echo hello"))
    assert lines[asked].endswith(f"— approval {approval_id}")
    assert lines[asked + 1].startswith("✓ shell approved by key_")
    assert "▸ shell started" in lines[asked + 2] and "← shell: hello" in sent.out


class Terminal:
    """``dispatch ARGV`` on a pty (stdin, stdout and stderr): read what it writes, type at it."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.parent, child = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch_client.cli", *argv],
            stdin=child,
            stdout=child,
            stderr=child,
            env=env,
        )
        os.close(child)
        self.seen = b""
        # Where the next expect starts looking.
        self.read_to = 0

    def expect(self, text: str, within: float = 30.0) -> None:
        """Read until ``text`` has been written; fails after ``within`` seconds (a bound of its
        own: this runs in a thread, where the test's timeout cannot stop a blocked read)."""
        deadline = time.monotonic() + within
        wanted = text.encode()
        while wanted not in self.seen[self.read_to :]:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.parent], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(
                    f"{text!r} did not come within {within:.0f}s; the terminal showed "
                    f"{self.seen.decode(errors='replace')!r}"
                )
            try:
                data = os.read(self.parent, 65536)
            except OSError:  # EIO: the process closed the terminal
                data = b""
            if not data:
                raise AssertionError(
                    f"{text!r} never came; the terminal showed {self.seen.decode(errors='replace')!r}"
                )
            self.seen += data
        # What follows is looked for after it: a prompt shown before this one does not count.
        self.read_to = self.seen.index(wanted, self.read_to) + len(wanted)

    def type(self, line: str) -> None:
        os.write(self.parent, line.encode() + b"\n")

    def finish(self) -> int:
        with contextlib.suppress(AssertionError):
            self.expect("\x00never")  # read to the end
        os.close(self.parent)
        return self.proc.wait(30)


@contextlib.contextmanager
def terminal(argv: list[str], env: dict[str, str]) -> Iterator[Terminal]:
    t = Terminal(argv, env)
    try:
        yield t
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait(30)


async def test_chat_asks_at_the_terminal_and_always_remembers(asking: Stack) -> None:
    env = cli_env(DISPATCH_API_KEY=asking.api_key, DISPATCH_ADDRESS=asking.address("transport"), NO_COLOR="1")

    def scenario() -> tuple[int, str]:
        with terminal(["chat", "go"], env) as t:
            t.expect("? shell wants to run: echo hello")
            t.expect('approve shell {"command": "echo hello"} (rule: ')
            t.expect(QUESTION)
            t.type("a")
            return t.finish(), t.seen.decode()

    code, shown = await asyncio.to_thread(scenario)
    assert code == 0, shown
    assert "✓ shell approved by key_" in shown and "(remembered)" in shown
    assert "← shell: hello" in shown and "— stop" in shown


async def test_chat_asks_again_when_the_kernel_refuses_an_edit(asking: Stack) -> None:
    env = cli_env(DISPATCH_API_KEY=asking.api_key, DISPATCH_ADDRESS=asking.address("transport"), NO_COLOR="1")

    def scenario() -> tuple[int, str]:
        with terminal(["chat", "go"], env) as t:
            t.expect(QUESTION)
            t.type("e")
            t.expect("new input for shell")
            t.type('{"cmd": "echo nope"}')
            t.expect("dispatch: INVALID_ARGUMENT: ")
            t.expect(QUESTION)
            t.type("e")
            t.expect("new input for shell")
            t.type('{"command": "echo edited"}')
            return t.finish(), t.seen.decode()

    code, shown = await asyncio.to_thread(scenario)
    assert code == 0, shown
    assert "✓ shell approved with other input by key_" in shown
    assert '← shell: (run with the input a person edited: {"command": "echo edited"})' in shown


async def test_no_prompt_on_a_terminal_only_says_how(asking: Stack) -> None:
    env = cli_env(DISPATCH_API_KEY=asking.api_key, DISPATCH_ADDRESS=asking.address("transport"), NO_COLOR="1")
    async with DispatchClient(asking.address("transport"), api_key=asking.api_key) as client:
        conv = (await client.create_conversation()).id

        def scenario() -> tuple[int, str]:
            with terminal(["send", conv, "go", "--no-prompt"], env) as t:
                t.expect("waits for a decision: dispatch approve")
                return t.finish(), t.seen.decode()

        running = asyncio.ensure_future(asyncio.to_thread(scenario))
        approval_id = await pending_approval(asking, conv)
        await client.reject(approval_id, "no thanks")
        code, shown = await running
    assert QUESTION not in shown
    assert "✗ shell rejected by key_" in shown and "no thanks" in shown
    assert code == 0, shown
