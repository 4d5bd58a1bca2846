"""The `dispatch` CLI: its rendering of a turn, and its commands against the in-process stack."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dispatch_client import DispatchClient
from dispatch_client._proto import common_pb2
from dispatch_client.cli import Renderer, main
from tests.clients.conftest import ENDLESS, MakeStack
from tests.stack import Stack


def ev(**kind: object) -> common_pb2.AgentEvent:
    return common_pb2.AgentEvent(**kind)  # type: ignore[arg-type]


def test_renders_text_as_it_streams_tool_calls_results_and_the_finish() -> None:
    out = io.StringIO()
    r = Renderer(out)
    r.event(ev(text_delta=common_pb2.TextDelta(text="Let me ")))
    assert out.getvalue() == "Let me "  # written at once, no newline
    r.event(ev(text_delta=common_pb2.TextDelta(text="look.")))
    r.event(ev(tool_call=common_pb2.ToolCallEvent(name="list_dir", input_json='{"path":"."}')))
    r.event(ev(tool_result=common_pb2.ToolResultEvent(name="list_dir", content="a.txt (1 bytes)\nb/\nc\nd")))
    r.event(ev(tool_result=common_pb2.ToolResultEvent(name="shell", content="boom", is_error=True)))
    done = common_pb2.TurnDone(
        finish_reason=common_pb2.FINISH_REASON_STOP,
        steps=2,
        usage=common_pb2.Usage(input_tokens=10, output_tokens=4),
    )
    done.duration.FromMilliseconds(1500)
    r.event(ev(turn_done=done))
    assert out.getvalue().splitlines() == [
        "Let me look.",
        '→ list_dir {"path": "."}',
        "← list_dir: a.txt (1 bytes) ⏎ b/ ⏎ c … (+1 lines)",
        "✗ shell: boom",
        "— stop · 2 step(s) · 10 in / 4 out tokens · 1.50s",
    ]
    assert r.finish == common_pb2.FINISH_REASON_STOP


def test_errors_are_rendered_on_their_own_line() -> None:
    out = io.StringIO()
    r = Renderer(out)
    r.event(ev(text_delta=common_pb2.TextDelta(text="partial")))
    r.event(ev(error=common_pb2.ErrorEvent(message="provider answered 500")))
    assert out.getvalue() == "partial\nerror: provider answered 500\n"


# ------------------------------------------------------------ the commands, run


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines()]


@pytest.fixture
def cli(stack: Stack, capsys: pytest.CaptureFixture[str]) -> Callable[..., Awaitable[Ran]]:
    """Runs ``dispatch ARGS`` in-process (in a thread: the stack serves from this loop)
    against ``stack`` with its key, or with the global options given."""

    async def run(*argv: str, address: str = "", key: str | None = None) -> Ran:
        options = [
            "--address",
            address or stack.address("transport"),
            "--api-key",
            stack.api_key if key is None else key,
        ]
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*options, *argv])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


async def test_conversations_create_list_and_delete(cli: Callable[..., Awaitable[Ran]]) -> None:
    created = await cli("conversations", "create", "--title", "notes", "--cwd", "/tmp", "--agent", "")
    assert created.code == 0 and created.out.startswith("conv_")
    conv_id = created.out.strip()
    second = await cli("conversations", "--json", "create", "--title", "second")
    [second_json] = second.json_lines()
    assert second_json["title"] == "second" and second_json["last_seq"] == 0

    listed = await cli("conversations")
    assert listed.code == 0
    assert {line.split()[0] for line in listed.out.splitlines()} == {conv_id, second_json["id"]}
    assert "notes" in listed.out
    as_json = (await cli("conversations", "--json")).json_lines()
    assert {c["id"]: (c["title"], c.get("cwd", "")) for c in as_json} == {
        conv_id: ("notes", "/tmp"),
        second_json["id"]: ("second", ""),
    }

    assert (await cli("conversations", "delete", conv_id)).code == 0
    assert [c["id"] for c in (await cli("conversations", "--json")).json_lines()] == [second_json["id"]]


async def test_send_renders_the_turn_and_history_prints_it(
    cli: Callable[..., Awaitable[Ran]], stack: Stack
) -> None:
    (stack.workspace / "notes.txt").write_text("hi")
    conv_id = (await cli("conversations", "create")).out.strip()
    sent = await cli("send", conv_id, "what is here?")
    assert sent.code == 0, sent.err
    assert sent.out.splitlines() == [
        "→ list_dir {}",
        "← list_dir: notes.txt (2 bytes)",
        "The workspace is empty.",
        sent.out.splitlines()[-1],
    ]
    assert sent.out.splitlines()[-1].startswith("— stop · 2 step(s)")

    history = await cli("history", conv_id)
    assert history.code == 0
    assert history.out.splitlines() == [
        "#1 user: what is here?",
        "#2 assistant: → list_dir {}",
        "#3 tool: ← list_dir: notes.txt (2 bytes)",
        "#4 assistant: The workspace is empty.",
    ]
    tail = (await cli("history", conv_id, "--after", "2", "--json")).json_lines()
    assert [(m["seq"], m["role"]) for m in tail] == [(3, "tool"), (4, "assistant")]
    assert tail[1]["text"] == "The workspace is empty." and tail[1]["turn_id"].startswith("turn_")
    assert [m["seq"] for m in (await cli("history", conv_id, "--limit", "1", "--json")).json_lines()] == [1]

    as_json = await cli("send", conv_id, "again", "--json", "--idempotency-key", "k2")
    events = as_json.json_lines()
    assert events[0]["kind"] == "turn_started" and events[-1]["kind"] == "turn_sealed"
    assert all(isinstance(e["event_seq"], int) for e in events)


async def test_send_without_waiting_then_watch_the_stream(cli: Callable[..., Awaitable[Ran]]) -> None:
    conv_id = (await cli("conversations", "create")).out.strip()
    sent = await cli("send", conv_id, "hello", "--no-wait")
    assert sent.code == 0 and sent.out.startswith("turn_")
    turn_id = sent.out.strip()

    watched = await cli("watch", conv_id, "--json", "--until-sealed")
    assert watched.code == 0, watched.err
    events = watched.json_lines()
    assert [e["event_seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["kind"] == "turn_started" and events[-1]["kind"] == "turn_sealed"
    assert {e["turn_id"] for e in events} == {turn_id}
    assert events[-1]["turn_sealed"]["state"] == "TURN_STATE_COMPLETED"

    # From the middle: only what came after; rendered for people, with the turn's start marked.
    after = await cli("watch", conv_id, "--after", "3", "--json", "--until-sealed")
    assert [e["event_seq"] for e in after.json_lines()] == [e["event_seq"] for e in events[3:]]
    rendered = await cli("watch", conv_id, "--until-sealed")
    assert rendered.out.splitlines()[0].startswith(f"▶ turn {turn_id}")
    assert "The workspace is empty." in rendered.out

    second = (await cli("send", conv_id, "again", "--no-wait", "--json")).json_lines()
    assert second[0]["after_event_seq"] == events[-1]["event_seq"] and second[0]["turn_id"] != turn_id


async def test_cancel_and_send_policies(make_stack: MakeStack, capsys: pytest.CaptureFixture[str]) -> None:
    stack = await make_stack(ENDLESS)

    async def cli(*argv: str) -> Ran:
        capsys.readouterr()
        code = await asyncio.to_thread(
            main, ["--address", stack.address("transport"), "--api-key", stack.api_key, *argv]
        )
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    conv_id = (await cli("conversations", "create")).out.strip()
    turn_id = (await cli("send", conv_id, "one", "--no-wait")).out.strip()
    refused = await cli("send", conv_id, "two", "--policy", "reject", "--no-wait")
    assert refused.code == 1 and refused.err.startswith("dispatch: FAILED_PRECONDITION: ")
    queued = await cli("send", conv_id, "three", "--no-wait")
    assert queued.out.strip() == turn_id and "queued" in queued.err

    not_this = await cli("cancel", conv_id, "--turn", "turn_other")
    assert not_this.code == 0 and not_this.out == "" and "not running" in not_this.err
    cancelled = await cli("cancel", conv_id)
    assert cancelled.code == 0 and cancelled.out.strip() == turn_id
    # The queued message started the next turn; interrupt it with another.
    interrupted = await cli("send", conv_id, "four", "--policy", "interrupt", "--no-wait")
    assert interrupted.code == 0 and interrupted.out.strip() not in ("", turn_id)
    assert (await cli("cancel", conv_id)).out.strip() == interrupted.out.strip()
    nothing = await cli("cancel", conv_id)
    assert nothing.code == 0 and "nothing to cancel" in nothing.err


async def test_chat_starts_a_conversation_and_continues_it(cli: Callable[..., Awaitable[Ran]]) -> None:
    first = await cli("chat", "hello")
    assert first.code == 0 and "The workspace is empty." in first.out
    conv_id = first.err.splitlines()[0].removeprefix("conversation ")
    assert f"dispatch chat -c {conv_id}" in first.err
    again = await cli("chat", "-c", conv_id, "and now?")
    assert again.code == 0 and "— stop" in again.out
    assert len((await cli("history", conv_id, "--json")).json_lines()) == 8


async def test_failures_print_the_status_and_exit_1(
    cli: Callable[..., Awaitable[Ran]], stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = await cli("history", "conv_00000000000000000000000000")
    assert missing.code == 1 and missing.out == ""
    assert missing.err.startswith("dispatch: NOT_FOUND: ") and missing.err.count("\n") == 1
    refused = await cli("conversations", key="not-a-key")
    assert refused.code == 1 and refused.err.startswith("dispatch: UNAUTHENTICATED: ")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    down = await cli("conversations", address=closed)
    assert down.code == 1 and down.err.startswith("dispatch: UNAVAILABLE: ") and "dispatchd up" in down.err

    for usage in (["send"], ["send", "c", "t", "--policy", "later"], ["nonsense"], []):
        with pytest.raises(SystemExit) as exited:
            main(usage)
        assert exited.value.code == 2
    assert "usage: dispatch" in capsys.readouterr().err


async def test_global_options_after_the_command_and_the_key_file(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DISPATCH_API_KEY", raising=False)
    monkeypatch.setenv("DISPATCH_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api_key").write_text(stack.api_key + "\n")
    address = stack.address("transport")
    assert (
        await asyncio.to_thread(main, ["conversations", "create", "--title", "t", "--address", address]) == 0
    )
    assert await asyncio.to_thread(main, ["conversations", "--json", "--address", address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[1])["id"] == out[0]
    monkeypatch.setenv("DISPATCH_ADDRESS", address)
    assert await asyncio.to_thread(main, ["conversations"]) == 0


async def test_watch_follows_until_interrupted_and_exits_130_quietly(stack: Stack) -> None:
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        conv = await client.create_conversation()
        [e async for e in client.run_turn(conv.id, "hello")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatch_client.cli",
        "watch",
        conv.id,
        "--json",
        env={**os.environ, "DISPATCH_API_KEY": stack.api_key, "DISPATCH_ADDRESS": stack.address("transport")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    while not lines or json.loads(lines[-1])["kind"] != "turn_sealed":
        lines.append((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
    proc.send_signal(signal.SIGINT)
    rest, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130
    assert err == b"" and rest == b""
