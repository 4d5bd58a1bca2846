"""The built-in tools against a real in-process exec service (and, for the
confinement wiring, a real kernel and store)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from dispatch.exec.server import start as start_exec
from dispatch.kernel import tools
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.kernel.server import start as start_kernel
from dispatch.kernel.streams import ExecClient
from dispatch.kernel.tools import BUILTIN_TOOLS, ToolContext, ToolResult
from dispatch.shared.config import ExecConfig, KernelConfig, StoreConfig
from dispatch.store.server import start as start_store
from dispatch.v1 import exec_pb2_grpc, store_pb2
from tests.stack import TENANT, Stack, run_turn, start_stack

if TYPE_CHECKING:
    from dispatch.kernel.streams import Exec

MakeCtx = Callable[..., ToolContext]


@pytest.fixture
async def exec_channel() -> AsyncIterator[grpc.aio.Channel]:
    hosted = await start_exec(ExecConfig(max_read_bytes=4096))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}")
    yield channel
    await channel.close()
    await hosted.stop(0)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return workspace


@pytest.fixture(params=["stub", "session"])
async def exec_client(request: pytest.FixtureRequest, exec_channel: grpc.aio.Channel) -> AsyncIterator[Exec]:
    """Every tool test runs on the unary stub and on the session stream the kernel uses:
    a tool cannot tell them apart."""
    stub = exec_pb2_grpc.ExecStub(exec_channel)
    if request.param == "stub":
        yield stub
        return
    session = ExecClient(stub)
    yield session
    await session.close()


@pytest.fixture
def make_ctx(exec_client: Exec, ws: Path) -> MakeCtx:
    def make(root: str | None = None, cwd: Path | None = None) -> ToolContext:
        return ToolContext(
            exec=exec_client,
            computer_id="",
            cwd=str(cwd or ws),
            rpc_timeout=10.0,
            root=root,
        )

    return make


async def call(ctx: ToolContext, name: str, **args: Any) -> ToolResult:
    return await BUILTIN_TOOLS[name].run(ctx, json.dumps(args))


def test_the_builtin_tools_and_which_may_run_together() -> None:
    assert list(BUILTIN_TOOLS) == [
        "list_dir",
        "read_file",
        "write_file",
        "edit_file",
        "glob",
        "grep",
        "shell",
        "read_tool_output",
    ]
    unsafe = {name for name, tool in BUILTIN_TOOLS.items() if not tool.concurrency_safe}
    assert unsafe == {"write_file", "edit_file", "shell"}


# ----------------------------------------------------------------- write_file


async def test_write_file_creates_parents_and_says_what_it_wrote(make_ctx: MakeCtx, ws: Path) -> None:
    result = await call(make_ctx(), "write_file", path="sub/dir/a.txt", content="héllo\n")
    assert not result.is_error
    assert result.content == f"wrote 7 bytes to {ws}/sub/dir/a.txt"
    assert (ws / "sub/dir/a.txt").read_text() == "héllo\n"
    again = await call(make_ctx(), "write_file", path="sub/dir/a.txt", content="")
    assert again.content == f"wrote 0 bytes to {ws}/sub/dir/a.txt"
    assert (ws / "sub/dir/a.txt").read_text() == ""


async def test_write_file_onto_a_directory_is_an_error_result(make_ctx: MakeCtx, ws: Path) -> None:
    (ws / "d").mkdir()
    result = await call(make_ctx(), "write_file", path="d", content="x")
    assert result.is_error
    assert "write_file failed:" in result.content and "is a directory" in result.content


# ----------------------------------------------------------------- edit_file


async def test_edit_file_replaces_a_unique_match(make_ctx: MakeCtx, ws: Path) -> None:
    (ws / "a.py").write_text("x = 1\ny = 2\n")
    result = await call(make_ctx(), "edit_file", path="a.py", old_string="y = 2", new_string="y = 3")
    assert not result.is_error
    assert result.content == f"replaced 1 occurrence in {ws}/a.py"
    assert (ws / "a.py").read_text() == "x = 1\ny = 3\n"


async def test_edit_file_keeps_the_file_mode(make_ctx: MakeCtx, ws: Path) -> None:
    script = ws / "run.sh"
    script.write_text("echo a\n")
    script.chmod(0o755)
    result = await call(make_ctx(), "edit_file", path="run.sh", old_string="a", new_string="b")
    assert not result.is_error
    assert script.read_text() == "echo b\n"
    assert script.stat().st_mode & 0o777 == 0o755


async def test_edit_file_with_no_match_says_so_and_changes_nothing(make_ctx: MakeCtx, ws: Path) -> None:
    (ws / "a.txt").write_text("alpha\n")
    result = await call(make_ctx(), "edit_file", path="a.txt", old_string="beta", new_string="gamma")
    assert result.is_error
    assert "not found" in result.content and f"{ws}/a.txt" in result.content
    assert (ws / "a.txt").read_text() == "alpha\n"


async def test_edit_file_with_several_matches_needs_context_or_replace_all(
    make_ctx: MakeCtx, ws: Path
) -> None:
    (ws / "a.txt").write_text("foo foo\nfoo\n")
    result = await call(make_ctx(), "edit_file", path="a.txt", old_string="foo", new_string="bar")
    assert result.is_error
    assert "matches 3 times" in result.content and "replace_all" in result.content
    assert (ws / "a.txt").read_text() == "foo foo\nfoo\n"
    result = await call(
        make_ctx(), "edit_file", path="a.txt", old_string="foo", new_string="bar", replace_all=True
    )
    assert not result.is_error
    assert result.content == f"replaced 3 occurrences in {ws}/a.txt"
    assert (ws / "a.txt").read_text() == "bar bar\nbar\n"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [("", "x", "old_string is empty"), ("same", "same", "are the same")],
)
async def test_edit_file_refuses_edits_that_change_nothing(
    make_ctx: MakeCtx, ws: Path, old: str, new: str, expected: str
) -> None:
    (ws / "a.txt").write_text("same\n")
    result = await call(make_ctx(), "edit_file", path="a.txt", old_string=old, new_string=new)
    assert result.is_error
    assert expected in result.content
    assert (ws / "a.txt").read_text() == "same\n"


async def test_edit_file_errors_on_missing_binary_and_too_large_files(make_ctx: MakeCtx, ws: Path) -> None:
    missing = await call(make_ctx(), "edit_file", path="nope.txt", old_string="a", new_string="b")
    assert missing.is_error and missing.content.startswith("edit_file failed:")
    assert not (ws / "nope.txt").exists()

    (ws / "blob.bin").write_bytes(b"a\0b")
    binary = await call(make_ctx(), "edit_file", path="blob.bin", old_string="a", new_string="c")
    assert binary.is_error and "binary file" in binary.content
    assert (ws / "blob.bin").read_bytes() == b"a\0b"

    # The exec server of these tests reads at most 4096 bytes at once.
    big = "a" * 5000
    (ws / "big.txt").write_text(big)
    large = await call(make_ctx(), "edit_file", path="big.txt", old_string="a", new_string="b")
    assert large.is_error and "5000 bytes" in large.content
    assert (ws / "big.txt").read_text() == big


# ----------------------------------------------------------------- glob


def tree(ws: Path, *files: str) -> None:
    for name in files:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(name)


async def test_glob_double_star_recurses_sorted_and_skips_git(make_ctx: MakeCtx, ws: Path) -> None:
    tree(ws, "b.py", "a.py", "notes.txt", "src/x.py", "src/deep/er/y.py", ".git/hook.py", "src/.git/z.py")
    result = await call(make_ctx(), "glob", pattern="**/*.py")
    assert not result.is_error
    assert result.content.splitlines() == [
        f"{ws}/a.py",
        f"{ws}/b.py",
        f"{ws}/src/deep/er/y.py",
        f"{ws}/src/x.py",
    ]


async def test_glob_star_stays_within_one_directory(make_ctx: MakeCtx, ws: Path) -> None:
    tree(ws, "a.py", "src/x.py", "src/deep/y.py")
    top = await call(make_ctx(), "glob", pattern="*.py")
    assert top.content.splitlines() == [f"{ws}/a.py"]
    under = await call(make_ctx(), "glob", pattern="*.py", path="src")
    assert under.content.splitlines() == [f"{ws}/src/x.py"]
    nested = await call(make_ctx(), "glob", pattern="src/**/?.py")
    assert nested.content.splitlines() == [f"{ws}/src/deep/y.py", f"{ws}/src/x.py"]


async def test_glob_with_no_match_and_on_a_missing_directory(make_ctx: MakeCtx, ws: Path) -> None:
    tree(ws, "a.py")
    none = await call(make_ctx(), "glob", pattern="**/*.rs")
    assert not none.is_error
    assert none.content == f"no files match **/*.rs under {ws}"
    missing = await call(make_ctx(), "glob", pattern="*.py", path="nowhere")
    assert missing.is_error and missing.content.startswith("glob failed:")


async def test_glob_caps_its_result_with_a_note(
    make_ctx: MakeCtx, ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "MAX_GLOB_RESULTS", 2)
    tree(ws, "a.txt", "b.txt", "c.txt", "d.txt")
    result = await call(make_ctx(), "glob", pattern="*.txt")
    lines = result.content.splitlines()
    assert lines[:2] == [f"{ws}/a.txt", f"{ws}/b.txt"]
    assert "2 more matches not shown" in lines[2]


# ----------------------------------------------------------------- grep


async def test_grep_returns_path_line_text(make_ctx: MakeCtx, ws: Path) -> None:
    (ws / "a.py").write_text("import os\nx = os.getcwd()\n")
    (ws / "src").mkdir()
    (ws / "src/b.txt").write_text("no\nOS here\n")
    (ws / ".git").mkdir()
    (ws / ".git/config").write_text("os\n")
    result = await call(make_ctx(), "grep", pattern=r"os\.|^OS")
    assert not result.is_error
    assert sorted(result.content.splitlines()) == [
        f"{ws}/a.py:2:x = os.getcwd()",
        f"{ws}/src/b.txt:2:OS here",
    ]
    only_py = await call(make_ctx(), "grep", pattern="os", glob="*.py")
    assert sorted(only_py.content.splitlines()) == [f"{ws}/a.py:1:import os", f"{ws}/a.py:2:x = os.getcwd()"]
    folded = await call(make_ctx(), "grep", pattern="os here", path="src", case_insensitive=True)
    assert folded.content == f"{ws}/src/b.txt:2:OS here"


async def test_grep_no_match_is_not_an_error_but_a_bad_regex_is(make_ctx: MakeCtx, ws: Path) -> None:
    (ws / "a.txt").write_text("alpha\n")
    none = await call(make_ctx(), "grep", pattern="beta")
    assert not none.is_error
    assert none.content == f"no matches for 'beta' in {ws}"
    bad = await call(make_ctx(), "grep", pattern="a(")
    assert bad.is_error
    assert bad.content.startswith("grep: grep failed (exit code 2)")
    missing = await call(make_ctx(), "grep", pattern="a", path="nope")
    assert missing.is_error and "exit code 2" in missing.content


@pytest.mark.parametrize(
    "args",
    [
        {"pattern": "x'; touch pwned; echo '"},
        {"pattern": "$(touch pwned)"},
        {"pattern": "--include=*"},
        {"pattern": "x", "path": "a.txt; touch pwned"},
        {"pattern": "x", "path": "$(touch pwned)"},
        {"pattern": "x", "glob": "*.txt --exclude=*; touch pwned"},
    ],
)
async def test_grep_input_reaches_grep_as_arguments_not_as_shell(
    make_ctx: MakeCtx, ws: Path, args: dict[str, Any]
) -> None:
    (ws / "a.txt").write_text("--include=*\n")
    result = await call(make_ctx(), "grep", **args)
    assert not (ws / "pwned").exists()
    assert not (Path.home() / "pwned").exists()
    if args["pattern"] == "--include=*":  # a pattern that looks like an option is still a pattern
        assert result.content == f"{ws}/a.txt:1:--include=*"


async def test_grep_caps_its_result_with_a_note(
    make_ctx: MakeCtx, ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "MAX_GREP_LINES", 3)
    (ws / "a.txt").write_text("hit\n" * 10)
    result = await call(make_ctx(), "grep", pattern="hit")
    lines = result.content.splitlines()
    assert lines[:3] == [f"{ws}/a.txt:{n}:hit" for n in (1, 2, 3)]
    assert "7 more matching lines not shown" in lines[3]


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("write_file", {"path": "a"}, "invalid input for write_file: 'content' is a required property"),
        ("write_file", {"path": "a", "content": 3}, "invalid input for write_file at 'content'"),
        ("write_file", {"path": "", "content": "x"}, "invalid input for write_file at 'path'"),
        ("edit_file", {"path": "a", "old_string": "x"}, "'new_string' is a required property"),
        (
            "edit_file",
            {"path": "a", "old_string": "x", "new_string": "y", "replace_all": "yes"},
            "invalid input for edit_file at 'replace_all'",
        ),
        ("glob", {}, "invalid input for glob: 'pattern' is a required property"),
        ("glob", {"pattern": "*", "recursive": True}, "Additional properties are not allowed"),
        ("grep", {"pattern": ""}, "invalid input for grep at 'pattern'"),
        ("grep", {"pattern": "x", "case_insensitive": 1}, "invalid input for grep at 'case_insensitive'"),
        ("grep", {"pattern": "x", "path": ["a"]}, "invalid input for grep at 'path'"),
    ],
)
async def test_bad_input_is_an_error_result_with_the_validation_message(
    make_ctx: MakeCtx, ws: Path, name: str, args: dict[str, Any], expected: str
) -> None:
    result = await call(make_ctx(), name, **args)
    assert result.is_error
    assert expected in result.content
    assert os.listdir(ws) == []


# ----------------------------------------------------------------- confinement


@pytest.fixture
def outside(tmp_path: Path, ws: Path) -> Path:
    """A directory next to the workspace, reachable through ws/escape."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("secret\n")
    (ws / "escape").symlink_to(out)
    (ws / "inside.txt").write_text("inside\n")
    (ws / "alias").symlink_to(ws / "inside.txt")
    return out


ESCAPES: list[tuple[str, dict[str, Any]]] = [
    ("read_file", {"path": "../outside/secret.txt"}),
    ("read_file", {"path": "escape/secret.txt"}),
    ("list_dir", {"path": ".."}),
    ("list_dir", {"path": "escape"}),
    ("write_file", {"path": "../outside/new.txt", "content": "x"}),
    ("write_file", {"path": "escape/new.txt", "content": "x"}),
    ("write_file", {"path": "escape/secret.txt", "content": "x"}),
    ("edit_file", {"path": "../outside/secret.txt", "old_string": "secret", "new_string": "x"}),
    ("edit_file", {"path": "escape/secret.txt", "old_string": "secret", "new_string": "x"}),
    ("glob", {"pattern": "../outside/*"}),
    ("glob", {"pattern": "*", "path": "escape"}),
    ("grep", {"pattern": "secret", "path": ".."}),
    ("grep", {"pattern": "secret", "path": "escape"}),
    ("grep", {"pattern": "secret", "path": "/"}),
]


@pytest.mark.parametrize(("name", "args"), ESCAPES)
async def test_confined_tools_refuse_paths_outside_the_root(
    make_ctx: MakeCtx, ws: Path, outside: Path, name: str, args: dict[str, Any]
) -> None:
    result = await call(make_ctx(root=str(ws)), name, **args)
    assert result.is_error
    assert "is outside the workspace root" in result.content and str(ws) in result.content
    assert "secret" not in result.content.replace("secret.txt", "")
    assert os.listdir(outside) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "secret\n"


@pytest.mark.parametrize(("name", "args"), ESCAPES[:2] + ESCAPES[4:6])
async def test_without_a_root_the_same_paths_are_reachable(
    make_ctx: MakeCtx, ws: Path, outside: Path, name: str, args: dict[str, Any]
) -> None:
    result = await call(make_ctx(), name, **args)
    assert not result.is_error, result.content


async def test_symlinks_inside_the_root_are_allowed(make_ctx: MakeCtx, ws: Path, outside: Path) -> None:
    ctx = make_ctx(root=str(ws))
    assert (await call(ctx, "read_file", path="alias")).content == "inside\n"
    edited = await call(ctx, "edit_file", path="alias", old_string="inside", new_string="still inside")
    assert not edited.is_error, edited.content
    assert (ws / "inside.txt").read_text() == "still inside\n"
    assert not (await call(ctx, "grep", pattern="still", path="alias")).is_error
    written = await call(ctx, "write_file", path="./sub/../new.txt", content="n")
    assert written.content == f"wrote 1 bytes to {ws}/new.txt"
    globbed = await call(ctx, "glob", pattern="*.txt")
    assert globbed.content.splitlines() == [f"{ws}/inside.txt", f"{ws}/new.txt"]


async def test_a_confined_shell_must_start_inside_the_root(
    make_ctx: MakeCtx, ws: Path, outside: Path
) -> None:
    inside = await call(make_ctx(root=str(ws)), "shell", command="pwd")
    assert not inside.is_error and str(ws) in inside.content
    escaped = await call(make_ctx(root=str(ws), cwd=ws / "escape"), "shell", command="pwd")
    assert escaped.is_error and "is outside the workspace root" in escaped.content


# ----------------------------------------------------------------- confine_tools through a turn


async def start_confined_stack(tmp_path: Path, provider: ScriptedProvider) -> Stack:
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    store = await start_store(
        StoreConfig(database_url=f"sqlite:///{tmp_path / 'store.db'}", default_workspace_root=str(workspace))
    )
    exec_ = await start_exec(ExecConfig())
    kernel = await start_kernel(
        KernelConfig(
            store_address=f"127.0.0.1:{store.port}",
            exec_address=f"127.0.0.1:{exec_.port}",
            rpc_timeout=10.0,
            confine_tools=True,
        ),
        provider=provider,
    )
    return Stack(workspace, {"store": store, "exec": exec_, "kernel": kernel})


def read_outside_then_stop() -> ScriptedProvider:
    return ScriptedProvider.from_data(
        {
            "steps": [
                [{"type": "tool_call", "id": "c1", "name": "read_file", "input": {"path": "../outside.txt"}}],
                [{"type": "text_delta", "text": "done"}],
            ]
        }
    )


@pytest.mark.parametrize("confine", [False, True])
async def test_confine_tools_keeps_a_turns_tools_in_the_workspace_and_is_off_by_default(
    tmp_path: Path, confine: bool
) -> None:
    (tmp_path / "outside.txt").write_text("outside\n")
    provider = read_outside_then_stop()
    if confine:
        stack = await start_confined_stack(tmp_path, provider)
    else:
        assert KernelConfig().confine_tools is False
        stack = await start_stack(tmp_path, provider)
    try:
        conv = await stack.conversation()
        _, events = await run_turn(stack, conv, "go")
    finally:
        await stack.stop()
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    if confine:
        assert result.is_error
        assert result.content == (
            f"read_file: path {tmp_path}/outside.txt is outside the workspace root {stack.workspace}"
        )
    else:
        assert (result.is_error, result.content) == (False, "outside\n")


async def test_a_workspace_created_with_confine_tools_confines_its_turns_and_no_others(
    tmp_path: Path,
) -> None:
    (tmp_path / "outside.txt").write_text("outside\n")
    confined_root, open_root = tmp_path / "confined", tmp_path / "open"
    confined_root.mkdir()
    open_root.mkdir()
    provider = ScriptedProvider.from_data(
        {
            "steps": [
                [{"type": "tool_call", "id": "c1", "name": "read_file", "input": {"path": "../outside.txt"}}],
                [{"type": "text_delta", "text": "done"}],
            ]
        }
    )
    stack = await start_stack(tmp_path, provider)  # kernel.confine_tools off
    results = {}
    try:
        for name, root, confine in (("confined", confined_root, True), ("open", open_root, False)):
            ws = await stack.store.CreateWorkspace(
                store_pb2.CreateWorkspaceRequest(
                    tenant_id=TENANT, name=name, root=str(root), confine_tools=confine
                )
            )
            assert ws.confine_tools is confine
            conv = await stack.store.CreateConversation(
                store_pb2.CreateConversationRequest(tenant_id=TENANT, workspace_id=ws.id)
            )
            _, events = await run_turn(stack, conv.id, "go")
            results[name] = next(e.tool_result for e in events if e.HasField("tool_result"))
    finally:
        await stack.stop()
    assert results["confined"].is_error
    assert results["confined"].content == (
        f"read_file: path {tmp_path}/outside.txt is outside the workspace root {confined_root}"
    )
    assert (results["open"].is_error, results["open"].content) == (False, "outside\n")
