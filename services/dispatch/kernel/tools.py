"""Built-in tools, each written against the exec service's primitives.

A tool declares its name, description, JSON-schema parameters,
``concurrency_safe`` and ``requires_approval``. Input is validated against the
schema before the tool runs; a bad input — or any failure — is an error result
the model can read, never a crash of the turn.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import jsonschema

from dispatch.kernel.providers.base import ToolSpec
from dispatch.shared.errors import scrub_addresses
from dispatch.shared.timeutil import duration
from dispatch.v1 import common_pb2, exec_pb2

if TYPE_CHECKING:
    from dispatch.kernel.streams import Exec

# History keeps at most this much of a tool's output (the rest is streamed to subscribers as
# tool_output, but not kept). The model sees less: a result over the agent's tool output
# budget is sent head and tail (kernel/context.py), and read_tool_output reads the rest.
MAX_RESULT_CHARS = 1_000_000


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


@dataclass
class ToolContext:
    """What a running tool may use: the exec service, where to run, and where to stream output."""

    exec: Exec
    computer_id: str
    cwd: str
    rpc_timeout: float
    on_output: Callable[[common_pb2.OutputStream.ValueType, bytes], None] = lambda stream, data: None
    # When set, every path a tool touches must stay inside this directory (on
    # the target computer, symlinks resolved); None: no confinement.
    root: str | None = None
    # The whole output of an earlier call of the conversation, by its id (None: no such call),
    # and the most read_tool_output gives at once, in characters.
    tool_output: Callable[[str], str | None] = lambda tool_call_id: None
    output_budget: int = 32_000

    def resolve(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.cwd, path))


class ToolError(Exception):
    """A tool refuses its input; the message becomes an error result the model reads."""


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

    def check_input(self, input_json: str) -> str:
        """Why ``input_json`` is not a valid input of this tool ("" if it is)."""
        try:
            args = json.loads(input_json or "{}")
        except json.JSONDecodeError as exc:
            return f"invalid input for {self.name}: not valid JSON ({exc})"
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(args))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            at = f" at '{where}'" if where else ""
            return f"invalid input for {self.name}{at}: {error.message}"
        return ""

    async def run(self, ctx: ToolContext, input_json: str) -> ToolResult:
        """Validate the input, run the tool, and turn every failure into an error result."""
        invalid = self.check_input(input_json)
        if invalid:
            return ToolResult(invalid, is_error=True)
        args = json.loads(input_json or "{}")
        try:
            return await self.run_fn(ctx, args)
        except ToolError as exc:
            return ToolResult(f"{self.name}: {exc}", is_error=True)
        except grpc.aio.AioRpcError as exc:
            return ToolResult(f"{self.name} failed: {scrub_addresses(exc.details() or '')}", is_error=True)


def _clip(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[:MAX_RESULT_CHARS] + f"\n[dispatch: {len(text) - MAX_RESULT_CHARS} more characters not shown]"


# glob lists at most this many paths, grep at most this many lines.
MAX_GLOB_RESULTS = 1000
MAX_GREP_LINES = 500
# A grep line longer than this is cut (minified files would drown the result).
MAX_GREP_LINE_CHARS = 500
# Deadline and output cap of the find/grep processes behind glob and grep.
SEARCH_TIMEOUT_SECONDS = 60.0
SEARCH_MAX_OUTPUT_BYTES = 4 << 20


@dataclass(frozen=True)
class _Ran:
    """A finished helper process: its output, stream by stream, and its exit."""

    stdout: bytes
    stderr: bytes
    exit: exec_pb2.Exit

    @property
    def exit_code(self) -> int | None:
        return self.exit.exit_code if self.exit.HasField("exit_code") else None

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


async def _run(
    ctx: ToolContext, argv: list[str], *, deadline: float, max_output_bytes: int = 0, cwd: str = ""
) -> _Ran:
    """Run ``argv`` (never through a shell) on the tool's computer and collect its output."""
    request = exec_pb2.SpawnRequest(
        computer_id=ctx.computer_id,
        argv=argv,
        cwd=cwd,
        timeout=duration(deadline),
        max_output_bytes=max_output_bytes,
    )
    stdout: list[bytes] = []
    stderr: list[bytes] = []
    exit_info: exec_pb2.Exit | None = None
    async for resp in ctx.exec.Spawn(request):
        if resp.WhichOneof("kind") == "output":
            for chunk in resp.output.chunks:
                (stderr if chunk.stream == common_pb2.OUTPUT_STREAM_STDERR else stdout).append(chunk.data)
        else:
            exit_info = resp.exit
    if exit_info is None:
        raise ToolError(f"the exec service ended {argv[0]} without an exit status")
    if exit_info.timed_out:
        raise ToolError(f"{argv[0]} timed out after {deadline:g}s")
    return _Ran(b"".join(stdout), b"".join(stderr), exit_info)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


async def _confine(ctx: ToolContext, path: str) -> str:
    """``path`` resolved against the cwd; with a root set, refused unless it stays inside
    the root both as written (``..``) and as the target computer resolves it (symlinks)."""
    resolved = ctx.resolve(path)
    if ctx.root is None:
        return resolved
    root = posixpath.normpath(ctx.root)
    if not _within(resolved, root):
        raise ToolError(f"path {resolved} is outside the workspace root {root}")
    # -m: the path may not exist yet (write_file); -z: names may hold newlines.
    ran = await _run(ctx, ["realpath", "-m", "-z", "--", root, resolved], deadline=ctx.rpc_timeout)
    parts = ran.stdout.split(b"\0")
    if ran.exit_code != 0 or len(parts) < 2:
        # Fail closed: without the real path there is no telling where it leads.
        raise ToolError(
            f"cannot check that {resolved} is inside the workspace root {root}: "
            f"realpath failed: {ran.error_text or f'exit {ran.exit_code}'}"
        )
    real_root, real_path = (p.decode("utf-8", "surrogateescape") for p in parts[:2])
    if not _within(real_path, real_root):
        raise ToolError(f"path {resolved} is outside the workspace root {root} (it resolves to {real_path})")
    return resolved


async def _list_dir(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    path = await _confine(ctx, args.get("path", "."))
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
    path = await _confine(ctx, args["path"])
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
    # Confinement can only place a shell: once running, it can reach anything.
    await _confine(ctx, ".")
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


async def _write_file(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    path = await _confine(ctx, args["path"])
    resp = await ctx.exec.WriteFile(
        exec_pb2.WriteFileRequest(computer_id=ctx.computer_id, path=path, data=args["content"].encode()),
        timeout=ctx.rpc_timeout,
    )
    return ToolResult(f"wrote {resp.bytes_written} bytes to {path}")


async def _edit_file(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    old, new, replace_all = args["old_string"], args["new_string"], bool(args.get("replace_all", False))
    if not old:
        raise ToolError(
            "old_string is empty; give the exact text to replace (use write_file to create a file)"
        )
    if old == new:
        raise ToolError("old_string and new_string are the same; there is nothing to change")
    path = await _confine(ctx, args["path"])
    resp = await ctx.exec.ReadFile(
        exec_pb2.ReadFileRequest(computer_id=ctx.computer_id, path=path), timeout=ctx.rpc_timeout
    )
    if resp.truncated:
        raise ToolError(
            f"{path} is {resp.size} bytes, more than can be read in one piece ({len(resp.data)} bytes); "
            "edit it with shell instead"
        )
    if b"\0" in resp.data:
        raise ToolError(f"{path} is a binary file ({resp.size} bytes); edit_file only edits text")
    try:
        text = resp.data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{path} is not valid UTF-8 text; edit_file only edits text") from None
    count = text.count(old)
    if count == 0:
        raise ToolError(f"old_string was not found in {path}; it must match exactly, whitespace included")
    if count > 1 and not replace_all:
        raise ToolError(
            f"old_string matches {count} times in {path}; include more surrounding context to make it "
            "unique, or pass replace_all=true to replace every match"
        )
    text = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    await ctx.exec.WriteFile(
        exec_pb2.WriteFileRequest(computer_id=ctx.computer_id, path=path, data=text.encode()),
        timeout=ctx.rpc_timeout,
    )
    replaced = count if replace_all else 1
    return ToolResult(f"replaced {replaced} occurrence{'s' if replaced != 1 else ''} in {path}")


_GLOB_CHARS = frozenset("*?[")


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Path segments against pattern segments: '**' is any number of directories
    (none included); other segments match one name (fnmatch: * ? [...])."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _glob_match(parts[1:], rest)


async def _glob(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    full = posixpath.normpath(posixpath.join(ctx.resolve(args.get("path", ".")), args["pattern"]))
    segments = full.split("/")[1:]  # full is absolute: drop the empty first segment
    # find starts at the longest literal prefix, so "src/**/*.py" walks only src.
    literal = 0
    while literal < len(segments) - 1 and not _GLOB_CHARS & set(segments[literal]):
        literal += 1
    base = await _confine(ctx, "/" + "/".join(segments[:literal]))
    pattern = segments[literal:]
    info = await ctx.exec.Stat(
        exec_pb2.StatRequest(computer_id=ctx.computer_id, path=base), timeout=ctx.rpc_timeout
    )
    if info.type != exec_pb2.FILE_TYPE_DIRECTORY:
        raise ToolError(f"{base} is not a directory")
    # Every non-directory under base, .git pruned; matched here rather than with
    # find -path, whose '*' also crosses '/'.
    ran = await _run(
        ctx,
        ["find", "-H", base, "-name", ".git", "-prune", "-o", "!", "-type", "d", "-print0"],
        deadline=SEARCH_TIMEOUT_SECONDS,
        max_output_bytes=SEARCH_MAX_OUTPUT_BYTES,
    )
    prefix = base.rstrip("/") + "/"
    matches = sorted(
        found
        for found in (p.decode("utf-8", "surrogateescape") for p in ran.stdout.split(b"\0") if p)
        if found.startswith(prefix) and _glob_match(found[len(prefix) :].split("/"), pattern)
    )
    notes = []
    if ran.exit.truncated:
        notes.append("[dispatch: the file listing was cut short; narrow the pattern or the path]")
    if ran.exit_code != 0 and ran.error_text:
        notes.append(f"[find reported: {ran.error_text.splitlines()[0]}]")
    if len(matches) > MAX_GLOB_RESULTS:
        notes.append(
            f"[dispatch: {len(matches) - MAX_GLOB_RESULTS} more matches not shown; narrow the pattern]"
        )
        matches = matches[:MAX_GLOB_RESULTS]
    if not matches:
        return ToolResult("\n".join([f"no files match {args['pattern']} under {base}", *notes]))
    return ToolResult(_clip("\n".join(matches + notes)))


async def _grep(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    path = await _confine(ctx, args.get("path", "."))
    # argv, never a shell line: -e keeps a pattern that starts with '-' a pattern,
    # '--' keeps the path a path. -I skips binary files, -H always names the file.
    argv = ["grep", "-rnHIE", "--exclude-dir=.git"]
    if args.get("case_insensitive"):
        argv.append("-i")
    if args.get("glob"):
        argv.append(f"--include={args['glob']}")
    argv += ["-e", args["pattern"], "--", path]
    ran = await _run(ctx, argv, deadline=SEARCH_TIMEOUT_SECONDS, max_output_bytes=SEARCH_MAX_OUTPUT_BYTES)
    if ran.exit_code == 1:
        return ToolResult(f"no matches for {args['pattern']!r} in {path}")
    if ran.exit_code != 0:
        status = f"exit code {ran.exit_code}" if ran.exit_code is not None else f"signal {ran.exit.signal}"
        raise ToolError(f"grep failed ({status}): {ran.error_text or 'no message'}")
    lines = ran.stdout.decode("utf-8", "replace").splitlines()
    notes = []
    if ran.exit.truncated:
        notes.append("[dispatch: grep's output was cut short; narrow the pattern, path or glob]")
    if len(lines) > MAX_GREP_LINES:
        notes.append(f"[dispatch: {len(lines) - MAX_GREP_LINES} more matching lines not shown]")
        lines = lines[:MAX_GREP_LINES]
    lines = [
        line if len(line) <= MAX_GREP_LINE_CHARS else line[:MAX_GREP_LINE_CHARS] + " [line cut]"
        for line in lines
    ]
    return ToolResult(_clip("\n".join(lines + notes)))


async def _read_tool_output(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    call_id = str(args["tool_call_id"])
    content = ctx.tool_output(call_id)
    if content is None:
        raise ToolError(f"no tool call {call_id!r} in this conversation")
    offset = int(args.get("offset", 0))
    limit = min(int(args.get("limit", ctx.output_budget)), ctx.output_budget)
    if offset >= len(content):
        raise ToolError(f"offset {offset} is past the end: the output has {len(content)} characters")
    end = min(len(content), offset + limit)
    more = f"; more from offset={end}" if end < len(content) else ""
    return ToolResult(f"{content[offset:end]}\n[dispatch: characters {offset}-{end} of {len(content)}{more}]")


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
    "the result ends with the exit code. Workspace confinement only places the shell's working "
    "directory inside the workspace root; the command itself can reach anything.",
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

WRITE_FILE = Tool(
    name="write_file",
    description="Write a text file, replacing it if it exists and creating parent directories. "
    "Relative paths resolve against the working directory.",
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "content": {"type": "string"},
        },
        "required": ["path", "content"],
        "additionalProperties": False,
    },
    run_fn=_write_file,
    concurrency_safe=False,
)

EDIT_FILE = Tool(
    name="edit_file",
    description="Replace exact text in a file. old_string must match exactly (whitespace included) and "
    "be unique in the file unless replace_all is true; include surrounding lines to make it unique.",
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "old_string": {"type": "string"},
            "new_string": {"type": "string"},
            "replace_all": {"type": "boolean", "default": False},
        },
        "required": ["path", "old_string", "new_string"],
        "additionalProperties": False,
    },
    run_fn=_edit_file,
    concurrency_safe=False,
)

GLOB = Tool(
    name="glob",
    description="Find files by name pattern, e.g. '**/*.py' or 'src/*.ts': '*' and '?' match within one "
    "name, '**' any number of directories. Searches under path (default: the working directory), "
    f"skips .git, returns sorted paths (at most {MAX_GLOB_RESULTS}).",
    parameters={
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "minLength": 1},
            "path": {"type": "string", "description": "Directory to search; default '.'"},
        },
        "required": ["pattern"],
        "additionalProperties": False,
    },
    run_fn=_glob,
)

GREP = Tool(
    name="grep",
    description="Search file contents with an extended regular expression (grep -E), recursively under "
    "path (default: the working directory; a file also works), skipping binary files and .git. "
    "glob limits the files searched by name, e.g. '*.py'. Returns path:line:text lines "
    f"(at most {MAX_GREP_LINES}).",
    parameters={
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "minLength": 1},
            "path": {"type": "string"},
            "glob": {"type": "string", "minLength": 1},
            "case_insensitive": {"type": "boolean", "default": False},
        },
        "required": ["pattern"],
        "additionalProperties": False,
    },
    run_fn=_grep,
)

READ_TOOL_OUTPUT = Tool(
    name="read_tool_output",
    description="Read the whole output of an earlier tool call of this conversation, when the result you "
    "were shown was cut (it says so, with the characters left out). offset and limit are in characters.",
    parameters={
        "type": "object",
        "properties": {
            "tool_call_id": {"type": "string", "minLength": 1},
            "offset": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
        },
        "required": ["tool_call_id"],
        "additionalProperties": False,
    },
    run_fn=_read_tool_output,
)

BUILTIN_TOOLS: Mapping[str, Tool] = {
    t.name: t for t in (LIST_DIR, READ_FILE, WRITE_FILE, EDIT_FILE, GLOB, GREP, SHELL, READ_TOOL_OUTPUT)
}
