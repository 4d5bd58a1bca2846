"""The `dispatch` CLI: its rendering of a turn, and its commands against the in-process stack."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispatch_client import DispatchClient, types
from dispatch_client._proto import common_pb2, transport_pb2, transport_pb2_grpc
from dispatch_client.cli import JsonLines, Renderer, main, turn_status, use_color
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


def test_reasoning_is_set_off_line_by_line_and_the_answer_starts_on_a_line_of_its_own() -> None:
    out = io.StringIO()
    r = Renderer(out)
    r.event(ev(reasoning_delta=common_pb2.ReasoningDelta(text="The user wants")))
    r.event(ev(reasoning_delta=common_pb2.ReasoningDelta(text=" a list.\nI will")))
    r.event(ev(reasoning_delta=common_pb2.ReasoningDelta(text=" call list_dir.")))
    r.event(ev(tool_call=common_pb2.ToolCallEvent(name="list_dir", input_json="{}")))
    r.event(ev(reasoning_delta=common_pb2.ReasoningDelta(text="Empty.")))
    r.event(ev(text_delta=common_pb2.TextDelta(text="The workspace ")))
    r.event(ev(text_delta=common_pb2.TextDelta(text="is empty.")))
    assert out.getvalue().splitlines() == [
        "│ The user wants a list.",
        "│ I will call list_dir.",
        "→ list_dir {}",
        "│ Empty.",
        "The workspace is empty.",
    ]


def test_in_colour_reasoning_is_dim_and_each_line_is_styled_on_its_own() -> None:
    out = io.StringIO()
    r = Renderer(out, color=True)
    r.event(ev(reasoning_delta=common_pb2.ReasoningDelta(text="hmm\n")))
    r.event(ev(tool_output=common_pb2.ToolOutput(data=b"out\n")))
    r.event(ev(tool_call=common_pb2.ToolCallEvent(name="shell", input_json="{}")))
    r.event(ev(text_delta=common_pb2.TextDelta(text="ok")))
    assert out.getvalue() == (
        "\x1b[2m│ \x1b[0m\x1b[2mhmm\x1b[0m\n"  # the newline outside the escape sequence
        "\x1b[2mout\x1b[0m\n"  # and no blank line after it
        "\x1b[36m→ shell {}\x1b[0m\n"
        "ok"
    )


@pytest.mark.parametrize("sink", [Renderer, JsonLines])
@pytest.mark.parametrize(
    ("finish", "last", "status"),
    [
        (common_pb2.FINISH_REASON_STOP, "turn_sealed", 0),
        (common_pb2.FINISH_REASON_LENGTH, "turn_sealed", 0),
        (common_pb2.FINISH_REASON_ABORTED, "turn_sealed", 1),
        (common_pb2.FINISH_REASON_MAX_STEPS, "turn_sealed", 1),
        (common_pb2.FINISH_REASON_STOP, "error", 1),  # finished, but the seal failed
    ],
)
def test_the_turn_status_is_how_the_turn_finished_and_whether_it_was_sealed(
    sink: type[Renderer] | type[JsonLines], finish: common_pb2.FinishReason.ValueType, last: str, status: int
) -> None:
    shown = sink(io.StringIO())
    shown.event(ev(turn_done=common_pb2.TurnDone(finish_reason=finish)))
    assert turn_status(shown) == 1  # not sealed yet
    shown.event(ev(**{last: {}}))
    assert turn_status(shown) == status


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("choice", "out", "env", "color"),
    [
        ("auto", Terminal(), {}, True),
        ("auto", io.StringIO(), {}, False),
        ("auto", Terminal(), {"NO_COLOR": "1"}, False),
        ("auto", Terminal(), {"NO_COLOR": "0"}, False),  # any non-empty value
        ("auto", Terminal(), {"NO_COLOR": ""}, True),
        ("auto", Terminal(), {"TERM": "dumb"}, False),
        ("always", io.StringIO(), {"NO_COLOR": "1"}, True),  # the flag beats the environment
        ("never", Terminal(), {}, False),
    ],
)
def test_when_to_colour(choice: str, out: io.StringIO, env: dict[str, str], color: bool) -> None:
    assert use_color(choice, out, env) is color


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"dispatch {metadata.version('dispatch-client')}\n"


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
    assert refused.code == 6 and refused.err.startswith("dispatch: FAILED_PRECONDITION: ")
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


async def test_chat_starts_a_conversation_and_continues_it(
    cli: Callable[..., Awaitable[Ran]], stack: Stack
) -> None:
    first = await cli("chat", "hello")
    assert first.code == 0 and "The workspace is empty." in first.out
    conv_id = first.err.splitlines()[0].removeprefix("conversation ")
    # The hint carries the address this run was given (never the key).
    hint = f'dispatch chat -c {conv_id} --address {stack.address("transport")} "..."'
    assert f"continue with: {hint}" in first.err and stack.api_key not in first.err
    again = await cli("chat", "-c", conv_id, "and now?")
    assert again.code == 0 and "— stop" in again.out
    assert len((await cli("history", conv_id, "--json")).json_lines()) == 8


async def test_failures_exit_with_the_status_of_their_class(
    cli: Callable[..., Awaitable[Ran]], stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = await cli("history", "conv_00000000000000000000000000")
    assert missing.code == 4 and missing.out == ""
    assert missing.err.startswith("dispatch: NOT_FOUND: ") and missing.err.count("\n") == 1
    refused = await cli("conversations", key="not-a-key")
    assert refused.code == 5 and refused.err.startswith("dispatch: UNAUTHENTICATED: ")
    conv_id = (await cli("conversations", "create")).out.strip()
    empty = await cli("send", conv_id, "")
    assert empty.code == 6 and empty.err.startswith("dispatch: INVALID_ARGUMENT: ")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    down = await cli("conversations", address=closed)
    assert down.code == 3 and down.err.startswith("dispatch: UNAVAILABLE: ") and "dispatchd up" in down.err

    for usage in (
        ["send"],
        ["send", "c", "t", "--policy", "later"],
        ["watch", "c", "--until", "later"],
        ["watch", "c", "--until", "caught_up", "--until-sealed"],
        ["chat", "hi", "--color", "sometimes"],
        ["nonsense"],
        [],
    ):
        with pytest.raises(SystemExit) as exited:
            main(usage)
        assert exited.value.code == 2
    assert "usage: dispatch" in capsys.readouterr().err


class Refusing(transport_pb2_grpc.DispatchServicer):
    """A server whose ListConversations fails with ``code``."""

    def __init__(self, code: grpc.StatusCode):
        self.code = code

    async def ListConversations(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(self.code, f"scripted {self.code.name}")


@pytest.fixture
async def refusing() -> AsyncIterator[Callable[[grpc.StatusCode], Awaitable[str]]]:
    servers: list[grpc.aio.Server] = []

    async def start(code: grpc.StatusCode) -> str:
        server = grpc.aio.server()
        transport_pb2_grpc.add_DispatchServicer_to_server(Refusing(code), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.UNAVAILABLE, 3),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 3),
        (grpc.StatusCode.NOT_FOUND, 4),
        (grpc.StatusCode.UNAUTHENTICATED, 5),
        (grpc.StatusCode.PERMISSION_DENIED, 5),
        (grpc.StatusCode.INVALID_ARGUMENT, 6),
        (grpc.StatusCode.FAILED_PRECONDITION, 6),
        (grpc.StatusCode.ALREADY_EXISTS, 6),
        (grpc.StatusCode.OUT_OF_RANGE, 6),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 6),
        (grpc.StatusCode.INTERNAL, 7),
        (grpc.StatusCode.UNKNOWN, 7),
        (grpc.StatusCode.UNIMPLEMENTED, 7),
        (grpc.StatusCode.DATA_LOSS, 7),
    ],
)
async def test_every_status_has_its_exit_status(
    refusing: Callable[[grpc.StatusCode], Awaitable[str]],
    capsys: pytest.CaptureFixture[str],
    code: grpc.StatusCode,
    status: int,
) -> None:
    address = await refusing(code)
    assert await asyncio.to_thread(main, ["--address", address, "--api-key", "k", "conversations"]) == status
    assert capsys.readouterr().err.startswith(f"dispatch: {code.name}: scripted {code.name}")


FAILING: Mapping[str, Any] = {"steps": [[{"type": "error", "status": 400, "message": "bad request"}]]}


async def test_a_turn_that_finishes_badly_exits_1(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack(FAILING)

    async def cli(*argv: str) -> Ran:
        capsys.readouterr()
        code = await asyncio.to_thread(
            main, ["--address", stack.address("transport"), "--api-key", stack.api_key, *argv]
        )
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    conv_id = (await cli("conversations", "create")).out.strip()
    sent = await cli("send", conv_id, "hi")
    assert sent.code == 1 and "— error" in sent.out
    assert (await cli("send", conv_id, "hi", "--json")).code == 1
    # Waiting for the turn's seal is waiting for how it finished; following is not.
    assert (await cli("watch", conv_id, "--until-sealed")).code == 1
    assert (await cli("watch", conv_id, "--until", "caught_up")).code == 0


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


# ------------------------------------------------------- the CLI as a process


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI process: this one's, without anything that picks a server,
    a key or colours, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_") and k != "NO_COLOR"}
    return {**env, **extra}


async def spawn(*argv: str, env: dict[str, str], cwd: Path | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatch_client.cli",
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> Ran:
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def on_a_terminal(argv: list[str], env: dict[str, str]) -> bytes:
    """What ``dispatch ARGV`` writes to a terminal (a pty) as its stdout."""
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch_client.cli", *argv], stdout=child, stderr=subprocess.DEVNULL, env=env
    )
    os.close(child)
    written = b""
    while True:
        try:
            data = os.read(parent, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        written += data
    os.close(parent)
    assert proc.wait(30) == 0
    return written


async def test_no_color_turns_colour_off_on_a_terminal(stack: Stack) -> None:
    env = cli_env(DISPATCH_API_KEY=stack.api_key, DISPATCH_ADDRESS=stack.address("transport"))
    coloured = await asyncio.to_thread(on_a_terminal, ["chat", "hello"], env)
    assert b"\x1b[36m\xe2\x86\x92 list_dir" in coloured  # "→ list_dir" in cyan
    plain = await asyncio.to_thread(on_a_terminal, ["chat", "hello"], {**env, "NO_COLOR": "1"})
    assert b"\xe2\x86\x92 list_dir" in plain and b"\x1b" not in plain
    never = await asyncio.to_thread(on_a_terminal, ["chat", "hello", "--color", "never"], env)
    assert b"\xe2\x86\x92 list_dir" in never and b"\x1b" not in never


async def test_the_data_dir_option_finds_the_key_and_the_hint_works_as_printed(
    stack: Stack, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "api_key").write_text(stack.api_key + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    address = stack.address("transport")
    # As the `dispatchd up` banner prints it, run from another directory, with a key in the
    # environment that is not this server's: the flag wins.
    env = cli_env(DISPATCH_API_KEY="someone-elses-key", DISPATCH_DATA_DIR=str(elsewhere))
    first = await finish(
        await spawn("chat", "--address", address, "--data-dir", "../data", "hello", env=env, cwd=elsewhere)
    )
    assert first.code == 0, first.err
    assert "The workspace is empty." in first.out
    hint = first.err.splitlines()[-1].removeprefix("continue with: ")
    assert f"--data-dir {data}" in hint  # absolute: it works from anywhere
    argv = shlex.split(hint.replace('"..."', '"and now?"'))
    assert argv[:2] == ["dispatch", "chat"]
    again = await finish(await spawn(*argv[1:], env=env, cwd=tmp_path))
    assert again.code == 0, again.err
    assert "The workspace is empty." in again.out


def test_a_data_dir_without_a_key_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--data-dir", str(tmp_path), "conversations"])
    assert exited.value.code == 2
    assert f"--data-dir: cannot read the API key in {tmp_path / 'api_key'}" in capsys.readouterr().err


# A turn that takes a while: a first answer, then a pause, then the rest.
PAUSING: Mapping[str, Any] = {
    "steps": [
        [
            {"type": "text_delta", "text": "first "},
            {"type": "sleep", "seconds": 1},
            {"type": "text_delta", "text": "then the rest"},
        ]
    ]
}


async def test_watch_until_sealed_follows_the_turn_send_started(
    make_stack: MakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack(PAUSING)

    async def cli(*argv: str) -> Ran:
        capsys.readouterr()
        code = await asyncio.to_thread(
            main, ["--address", stack.address("transport"), "--api-key", stack.api_key, *argv]
        )
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    conv_id = (await cli("conversations", "create")).out.strip()
    earlier = (await cli("send", conv_id, "one", "--json")).json_lines()
    assert earlier[-1]["kind"] == "turn_sealed"
    turn_id = (await cli("send", conv_id, "two", "--no-wait")).out.strip()

    # From event 0: past the earlier turn's seal, to the seal of the turn send started.
    watched = await cli("watch", conv_id, "--json", "--until-sealed")
    assert watched.code == 0, watched.err
    events = watched.json_lines()
    assert [e["event_seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["turn_id"] for e in events if e["kind"] == "turn_sealed"] == [earlier[0]["turn_id"], turn_id]
    assert events[-1]["kind"] == "turn_sealed" and events[-1]["turn_id"] == turn_id
    texts = [e["text_delta"]["text"] for e in events if e["kind"] == "text_delta" and e["turn_id"] == turn_id]
    assert texts == ["first ", "then the rest"]

    # Caught up: everything so far, then exit; rendered for people, each turn marked.
    caught_up = await cli("watch", conv_id, "--until", "caught_up")
    assert caught_up.code == 0
    marks = [line.split()[2] for line in caught_up.out.splitlines() if line.startswith("▶ turn")]
    assert marks == [earlier[0]["turn_id"], turn_id]
    assert caught_up.out.count("first then the rest") == 2


async def test_ctrl_c_cancels_the_turn_being_followed_and_exits_130(make_stack: MakeStack) -> None:
    stack = await make_stack(ENDLESS)
    env = cli_env(DISPATCH_API_KEY=stack.api_key, DISPATCH_ADDRESS=stack.address("transport"))
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        for argv in (["chat", "-c", "{conv}", "go"], ["send", "{conv}", "go"]):
            conv = (await client.create_conversation()).id
            proc = await spawn(*(a.format(conv=conv) for a in argv), env=env)
            assert proc.stdout is not None
            # The turn runs: its first words are on the screen (then it sleeps for a minute).
            assert await asyncio.wait_for(proc.stdout.readexactly(len(b"thinking")), 30) == b"thinking"
            proc.send_signal(signal.SIGINT)
            ran = await finish(proc)
            assert ran.code == 130, ran.err
            [turn] = (await client.metrics(conv)).turns
            assert f"cancelling turn {turn.turn_id}" in ran.err
            assert f"cancelled turn {turn.turn_id}" in ran.err
            # On the server the turn is over, aborted: not running on for its minute.
            events = [e async for e in client.subscribe(conv, until="turn_sealed")]
            assert events[-1].turn_sealed.state == types.TURN_STATE_ABORTED
            done = [e.turn_done for e in events if e.HasField("turn_done")]
            assert [d.finish_reason for d in done] == [types.FINISH_REASON_ABORTED]


class Stuck(transport_pb2_grpc.DispatchServicer):
    """A server that starts a turn, streams a word of it, and never answers a Cancel."""

    async def Send(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return transport_pb2.SendResponse(turn_id="turn_stuck", state=types.TURN_STATE_RUNNING)

    async def Subscribe(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        event = types.AgentEvent(conversation_id=request.conversation_id, turn_id="turn_stuck", event_seq=1)
        event.text_delta.text = "thinking"
        yield transport_pb2.SubscribeResponse(events=[event])
        await asyncio.sleep(3600)

    async def Cancel(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await asyncio.sleep(3600)


async def test_a_second_ctrl_c_exits_at_once() -> None:
    server = grpc.aio.server()
    transport_pb2_grpc.add_DispatchServicer_to_server(Stuck(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        proc = await spawn(
            "--address", f"127.0.0.1:{port}", "--api-key", "k", "send", "conv_x", "go", env=cli_env()
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert await asyncio.wait_for(proc.stdout.readexactly(len(b"thinking")), 30) == b"thinking"
        proc.send_signal(signal.SIGINT)
        cancelling = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert "cancelling turn turn_stuck" in cancelling
        proc.send_signal(signal.SIGINT)  # while the Cancel waits for an answer that never comes
        ran = await finish(proc)
    finally:
        await server.stop(0)
    assert ran.code == 130
    # It left at once: not after the Cancel's deadline ran out.
    assert "interrupted again; exiting now" in ran.err and "could not cancel" not in ran.err
