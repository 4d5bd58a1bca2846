"""Built-in tools, each written against the exec service's primitives.

A tool declares its name, description, JSON-schema parameters,
``concurrency_safe`` and ``requires_approval``. Input is validated against the
schema before the tool runs; a bad input — or any failure — is an error result
the model can read, never a crash of the turn.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import jsonschema

from dispatch.kernel.providers.base import ToolSpec
from dispatch.shared.timeutil import duration
from dispatch.v1 import common_pb2, exec_pb2, exec_pb2_grpc

# The model sees at most this much of a tool's output; the rest is streamed
# to subscribers as tool_output but not fed back.
MAX_RESULT_CHARS = 30_000


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


@dataclass
class ToolContext:
    """What a running tool may use: the exec service, where to run, and where to stream output."""

    exec: exec_pb2_grpc.ExecAsyncStub
    computer_id: str
    cwd: str
    rpc_timeout: float
    on_output: Callable[[common_pb2.OutputStream.ValueType, bytes], None] = lambda stream, data: None

    def resolve(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.cwd, path))


ToolFn = Callable[[ToolContext, Mapping[str, Any]], Awaitable[ToolResult]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run_fn: ToolFn
    concurrency_safe: bool = True
    requires_approval: bool = False
    _validator: jsonschema.protocols.Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cls = jsonschema.validators.validator_for(self.parameters)
        cls.check_schema(self.parameters)
        object.__setattr__(self, "_validator", cls(self.parameters))

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    async def run(self, ctx: ToolContext, input_json: str) -> ToolResult:
        """Validate the input, run the tool, and turn every failure into an error result."""
        try:
            args = json.loads(input_json or "{}")
        except json.JSONDecodeError as exc:
            return ToolResult(f"invalid input for {self.name}: not valid JSON ({exc})", is_error=True)
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(args))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            at = f" at '{where}'" if where else ""
            return ToolResult(f"invalid input for {self.name}{at}: {error.message}", is_error=True)
        try:
            return await self.run_fn(ctx, args)
        except grpc.aio.AioRpcError as exc:
            return ToolResult(f"{self.name} failed: {exc.details()}", is_error=True)


def _clip(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[:MAX_RESULT_CHARS] + f"\n[dispatch: {len(text) - MAX_RESULT_CHARS} more characters not shown]"


async def _list_dir(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    path = ctx.resolve(args.get("path", "."))
    resp = await ctx.exec.ListDir(
        exec_pb2.ListDirRequest(computer_id=ctx.computer_id, path=path), timeout=ctx.rpc_timeout
    )
    lines = []
    for e in resp.entries:
        if e.type == exec_pb2.FILE_TYPE_DIRECTORY:
            lines.append(f"{e.name}/")
        elif e.type == exec_pb2.FILE_TYPE_SYMLINK:
            lines.append(f"{e.name} -> {e.symlink_target}")
        else:
            lines.append(f"{e.name} ({e.size} bytes)")
    return ToolResult(_clip("\n".join(lines)) if lines else f"{path} is empty")


async def _read_file(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    path = ctx.resolve(args["path"])
    offset = int(args.get("offset", 0))
    resp = await ctx.exec.ReadFile(
        exec_pb2.ReadFileRequest(
            computer_id=ctx.computer_id, path=path, offset=offset, limit=int(args.get("limit", 0))
        ),
        timeout=ctx.rpc_timeout,
    )
    if b"\0" in resp.data:
        return ToolResult(f"{path} is a binary file ({resp.size} bytes); not shown")
    text = resp.data.decode("utf-8", "replace")
    if resp.truncated:
        end = offset + len(resp.data)
        text += f"\n[dispatch: showing bytes {offset}-{end} of {resp.size}; read on with offset={end}]"
    return ToolResult(_clip(text))


async def _shell(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    request = exec_pb2.SpawnRequest(
        computer_id=ctx.computer_id,
        argv=["sh", "-c", args["command"]],
        cwd=ctx.cwd,
        timeout=duration(float(args.get("timeout_seconds", 120))),
    )
    output: list[str] = []
    exit_info: exec_pb2.Exit | None = None
    async for resp in ctx.exec.Spawn(request):
        if resp.WhichOneof("kind") == "output":
            for chunk in resp.output.chunks:
                ctx.on_output(chunk.stream, chunk.data)
                output.append(chunk.data.decode("utf-8", "replace"))
        else:
            exit_info = resp.exit
    if exit_info is None:
        return ToolResult("shell: the exec service ended the command without an exit status", is_error=True)
    text = "".join(output)
    if exit_info.timed_out:
        status = f"[timed out after {args.get('timeout_seconds', 120)}s; process group killed]"
    elif exit_info.HasField("signal"):
        status = f"[killed by signal {exit_info.signal}]"
    else:
        status = f"[exit code {exit_info.exit_code}]"
    failed = exit_info.timed_out or exit_info.HasField("signal") or exit_info.exit_code != 0
    return ToolResult(_clip(f"{text}\n{status}" if text else status), is_error=failed)


LIST_DIR = Tool(
    name="list_dir",
    description="List a directory: one entry per line, directories end with '/'. "
    "Relative paths resolve against the working directory.",
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string", "description": "Directory to list; default '.'"}},
        "additionalProperties": False,
    },
    run_fn=_list_dir,
)

READ_FILE = Tool(
    name="read_file",
    description="Read a text file. Use offset and limit (in bytes) to page through large files.",
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "offset": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
        },
        "required": ["path"],
        "additionalProperties": False,
    },
    run_fn=_read_file,
)

SHELL = Tool(
    name="shell",
    description="Run a shell command (sh -c) in the working directory. Output streams as it is produced; "
    "the result ends with the exit code.",
    parameters={
        "type": "object",
        "properties": {
            "command": {"type": "string", "minLength": 1},
            "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
    run_fn=_shell,
    # A shell can change anything, so it runs alone.
    concurrency_safe=False,
)

BUILTIN_TOOLS: Mapping[str, Tool] = {t.name: t for t in (LIST_DIR, READ_FILE, SHELL)}
