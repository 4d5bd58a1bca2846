"""Per-step cost of an agent turn: Dispatch against LangGraph and the OpenAI Agents SDK.

Every variant runs turns of K tool steps and one final text step, with a scripted fake
model (no network, no tokens) and a tool that does next to nothing; the figure is the
turn's wall time divided by its K + 1 steps (model responses), in µs. Variants:

- ``dispatch-up``: ``dispatchd up`` (store, exec, kernel and transport as four
  processes, SQLite in a temporary data directory, the scripted provider), driven
  through the public transport with raw gRPC stubs from this worker process; the tool
  is ``read_file`` on a 6-byte file (through exec). Timed from ``Send`` to
  ``turn_sealed`` on a subscription opened before sending.
- ``dispatch-inproc``: the same four services in one process and one event loop
  (``tests.stack.start_stack``), the same client code in that loop, and a no-op tool
  in place of the built-in ones (so exec is never called).
- ``langgraph-none`` / ``langgraph-memory`` / ``langgraph-sqlite``: LangGraph's agent
  (``langchain.agents.create_agent``) with no checkpointer, with ``InMemorySaver``,
  and with ``AsyncSqliteSaver`` on a temporary file; ``ainvoke`` timed.
  ``langgraph-sqlite-sync`` is the last with ``durability="sync"`` (each step's checkpoint
  written before the next step, as Dispatch commits each step; the default, "async", writes
  it while the next step runs).
- ``openai-agents``: the OpenAI Agents SDK's ``Runner.run`` with tracing disabled.

Each variant runs in a worker process of its own (``python -m bench.turn --worker``)
that sets up once, warms up and then runs what it is asked; the rounds go over the
variants in turn (each round starting one further along), so drift on this machine
falls on every variant alike. The peers come from the optional ``bench`` extra; a
peer that is not installed is skipped, saying how to install it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ".venv/bin/pip install -e '.[bench]'"

DISPATCH_VARIANTS = ("dispatch-up", "dispatch-inproc")
PEER_VARIANTS = (
    "langgraph-none",
    "langgraph-memory",
    "langgraph-sqlite",
    "langgraph-sqlite-sync",
    "openai-agents",
)
VARIANTS = DISPATCH_VARIANTS + PEER_VARIANTS
# The modules a peer needs (from the `bench` extra).
NEEDS: dict[str, tuple[str, ...]] = {
    "langgraph-none": ("langchain", "langgraph"),
    "langgraph-memory": ("langchain", "langgraph"),
    "langgraph-sqlite": ("langchain", "langgraph", "langgraph.checkpoint.sqlite", "aiosqlite"),
    "langgraph-sqlite-sync": ("langchain", "langgraph", "langgraph.checkpoint.sqlite", "aiosqlite"),
    "openai-agents": ("agents",),
}
TINY_FILE = "tiny.txt"
TINY_TEXT = "hello\n"
READY_TIMEOUT = 90.0
ANSWER = "done"


# --------------------------------------------------------------------------- worker side


class Runner(Protocol):
    async def start(self, ks: Sequence[int]) -> None:
        """Set up for turns of each of ``ks`` tool steps."""
        ...

    async def turn(self, k: int) -> float:
        """Run one turn of ``k`` tool steps and an answer; its wall time in seconds."""
        ...

    def cpu(self) -> dict[str, list[float]]:
        """[user, system] CPU seconds used so far, by process (``name:loop``: its main thread,
        where the event loop runs, not counted again in the sums)."""
        ...

    async def close(self) -> None: ...


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int | str) -> list[float]:
    """[user, system] CPU seconds of a process, from /proc/<pid>/stat (utime, stime)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return [int(fields[11]) / _TICK, int(fields[12]) / _TICK]


def _children(pid: int) -> dict[str, int]:
    """The processes whose parent is ``pid``, by their ``dispatch.cli`` action (store, ...)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
            ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if ppid == pid and b"dispatch.cli" in argv:
            at = argv.index(b"dispatch.cli")
            found[argv[at + 1].decode()] = int(entry.name)
    return found


def _script(k: int, call: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """A scripted-provider script: ``k`` steps that each call a tool, then an answer."""
    steps: list[list[dict[str, Any]]] = [[{"type": "tool_call", **call(i)}] for i in range(k)]
    steps.append([{"type": "text_delta", "text": ANSWER}])
    return {"steps": steps}


def _read_file_call(i: int) -> dict[str, Any]:
    # A different limit each step: the same call three times in a row is a doom loop (default 3).
    return {"name": "read_file", "input": {"path": TINY_FILE, "limit": 1000 + i}}


def _noop_call(i: int) -> dict[str, Any]:
    return {"name": "noop", "input": {"i": i}}


def _write_scripts(into: Path, ks: Sequence[int], call: Callable[[int], dict[str, Any]]) -> dict[int, Path]:
    paths = {}
    for k in ks:
        paths[k] = into / f"k{k}.json"
        paths[k].write_text(json.dumps(_script(k, call)))
    return paths


class _TransportClient:
    """Turns through the public Dispatch service: CreateConversation (agent ``k<K>``),
    Subscribe, then Send, timed from Send to turn_sealed."""

    def __init__(self, address: str, api_key: str):
        import grpc

        from dispatch.v1 import transport_pb2_grpc

        self.channel = grpc.aio.insecure_channel(address)
        self.stub = transport_pb2_grpc.DispatchStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    async def turn(self, k: int) -> float:
        from dispatch.v1 import transport_pb2

        conv = await self.stub.CreateConversation(
            transport_pb2.PublicCreateConversationRequest(agent=f"k{k}"), metadata=self.metadata
        )
        stream = self.stub.Subscribe(
            transport_pb2.SubscribeRequest(conversation_id=conv.id), metadata=self.metadata
        )
        # The stream says nothing before the turn's first event, so there is no "subscribed"
        # to wait for: the call goes out first, and it replays from the conversation's start.
        reader = asyncio.create_task(self._until_sealed(stream))
        await asyncio.sleep(0)
        began = time.perf_counter()
        await self.stub.Send(
            transport_pb2.SendRequest(conversation_id=conv.id, text="go"), metadata=self.metadata
        )
        sealed_at, steps, results, errors = await reader
        stream.cancel()
        if steps != k + 1 or results != k or errors:
            raise RuntimeError(
                f"the turn did not run as scripted: steps={steps} (want {k + 1}) "
                f"tool results={results} (want {k}) errors={errors}"
            )
        return sealed_at - began

    @staticmethod
    async def _until_sealed(stream: Any) -> tuple[float, int, int, int]:
        """When turn_sealed arrived, the turn's steps, its tool results and how many failed."""
        steps = results = errors = 0
        async for response in stream:
            for event in response.events:
                kind = event.WhichOneof("kind")
                if kind == "tool_result":
                    results += 1
                    errors += event.tool_result.is_error
                elif kind == "turn_done":
                    steps = event.turn_done.steps
                elif kind == "turn_sealed":
                    return time.perf_counter(), steps, results, errors
        raise RuntimeError("the subscription ended before turn_sealed")

    async def close(self) -> None:
        await self.channel.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DispatchUp:
    """``dispatchd up`` in a temporary directory, one scripted agent per K."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="dispatch-bench-turn-")
        self.proc: asyncio.subprocess.Process | None = None
        self.client: _TransportClient | None = None
        self.pids: dict[str, int] = {}

    async def start(self, ks: Sequence[int]) -> None:
        tmp = Path(self.tmp.name)
        workspace, data = tmp / "ws", tmp / "data"
        workspace.mkdir()
        (workspace / TINY_FILE).write_text(TINY_TEXT)
        scripts = _write_scripts(tmp, ks, _read_file_call)
        # `--provider scripted --script` names one script, so each K is a named agent
        # whose provider replays its script (the same thing, per conversation).
        config = "".join(
            f'[providers.k{k}]\nkind = "scripted"\nscript = "{path}"\n\n[agents.k{k}]\nprovider = "k{k}"\n\n'
            for k, path in scripts.items()
        )
        config += f'[kernel]\ndefault_agent = "k{ks[0]}"\n'
        (tmp / "dispatch.toml").write_text(config)
        beside = Path(sys.executable).parent / "dispatchd"
        command = [str(beside)] if beside.exists() else [sys.executable, "-m", "dispatch.cli"]
        address = f"127.0.0.1:{_free_port()}"
        argv = [*command, "up", "--config", str(tmp / "dispatch.toml"), "--listen", address]
        argv += ["--http-listen", "off", "--data-dir", str(data), "--workspace", str(workspace)]
        with (tmp / "up.out").open("wb") as out, (tmp / "up.err").open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=tmp
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while b"Dispatch is up" not in (tmp / "up.out").read_bytes():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                tail = (tmp / "up.err").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"dispatchd up did not start (exit {self.proc.returncode}):\n{tail}")
            await asyncio.sleep(0.05)
        self.pids = {"up": self.proc.pid, **_children(self.proc.pid)}
        self.client = _TransportClient(address, (data / "api_key").read_text().strip())

    async def turn(self, k: int) -> float:
        assert self.client is not None
        return await self.client.turn(k)

    def cpu(self) -> dict[str, list[float]]:
        pids = {**self.pids, "client": os.getpid()}
        used = {name: _proc_cpu(pid) for name, pid in pids.items()}
        # The main thread runs the event loop; the others are gRPC's and, in the store,
        # the SQLite writer.
        used.update({f"{name}:loop": _proc_cpu(f"{pid}/task/{pid}") for name, pid in pids.items()})
        return used

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.tmp.cleanup()


class DispatchInproc:
    """tests.stack's four services in this process, a no-op tool, one scripted agent per K."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="dispatch-bench-turn-")
        self.stack: Any = None
        self.client: _TransportClient | None = None

    async def start(self, ks: Sequence[int]) -> None:
        from dispatch.kernel.tools import Tool, ToolContext, ToolResult
        from dispatch.shared.config import AgentConfig, ProviderConfig
        from tests.stack import start_stack

        async def noop(ctx: ToolContext, args: Any) -> ToolResult:
            return ToolResult("ok")

        tool = Tool(
            name="noop",
            description="Does nothing.",
            parameters={"type": "object", "properties": {"i": {"type": "integer"}}},
            run_fn=noop,
        )
        tmp = Path(self.tmp.name)
        scripts = _write_scripts(tmp, ks, _noop_call)
        self.stack = await start_stack(
            tmp,
            transport=True,
            tools={"noop": tool},
            providers={f"k{k}": ProviderConfig(kind="scripted", script=str(p)) for k, p in scripts.items()},
            agents={f"k{k}": AgentConfig(name=f"k{k}", provider=f"k{k}") for k in ks},
            default_agent=f"k{ks[0]}",
        )
        self.client = _TransportClient(self.stack.address("transport"), self.stack.api_key)

    async def turn(self, k: int) -> float:
        assert self.client is not None
        return await self.client.turn(k)

    def cpu(self) -> dict[str, list[float]]:
        return {"worker": _proc_cpu("self")}

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.stack is not None:
            await self.stack.stop()
        self.tmp.cleanup()


def _langchain_model_class() -> Any:
    """A chat model that answers like the scripted provider: a tool call for each of the
    first ``steps`` responses of a turn (counted since the last user message), then text."""
    language_models = importlib.import_module("langchain_core.language_models")
    messages = importlib.import_module("langchain_core.messages")
    outputs = importlib.import_module("langchain_core.outputs")

    base: Any = language_models.BaseChatModel

    class ScriptedChatModel(base):  # type: ignore[misc]
        steps: int = 0

        @property
        def _llm_type(self) -> str:
            return "bench-scripted"

        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

        def _answer(self, history: list[Any]) -> Any:
            step = 0
            for message in reversed(history):
                if isinstance(message, messages.HumanMessage):
                    break
                step += isinstance(message, messages.AIMessage)
            if step < self.steps:
                call = {"name": "noop", "args": {"i": step}, "id": f"call_{step}", "type": "tool_call"}
                answer = messages.AIMessage(content="", tool_calls=[call])
            else:
                answer = messages.AIMessage(content=ANSWER)
            return outputs.ChatResult(generations=[outputs.ChatGeneration(message=answer)])

        def _generate(self, history: list[Any], stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
            return self._answer(history)

        async def _agenerate(
            self, history: list[Any], stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            return self._answer(history)

    return ScriptedChatModel


async def noop(i: int) -> str:
    """Does nothing."""
    return "ok"


# Real annotations, not this module's strings: LangChain resolves a tool's type hints on
# every call, and strings would cost it an eval each time.
noop.__annotations__ = {"i": int, "return": str}


class LangGraph:
    """``create_agent`` with no checkpointer, ``InMemorySaver`` or ``AsyncSqliteSaver`` (``saver``
    none, memory, sqlite); ``sqlite-sync`` is AsyncSqliteSaver with ``durability="sync"``."""

    def __init__(self, saver: str):
        self.saver, _, sync = saver.partition("-")
        # LangGraph's default durability is "async": a step's checkpoint is written while
        # the next step runs. "sync" writes it before the next step starts, as Dispatch does.
        self.durability = "sync" if sync else None
        self.tmp = tempfile.TemporaryDirectory(prefix="dispatch-bench-turn-")
        self.exit = contextlib.AsyncExitStack()
        self.graphs: dict[int, Any] = {}

    async def start(self, ks: Sequence[int]) -> None:
        create_agent = importlib.import_module("langchain.agents").create_agent
        tool = importlib.import_module("langchain_core.tools").tool
        model_class = _langchain_model_class()
        checkpointer: Any = None
        if self.saver == "memory":
            checkpointer = importlib.import_module("langgraph.checkpoint.memory").InMemorySaver()
        elif self.saver == "sqlite":
            saver = importlib.import_module("langgraph.checkpoint.sqlite.aio").AsyncSqliteSaver
            path = str(Path(self.tmp.name) / "checkpoints.db")
            checkpointer = await self.exit.enter_async_context(saver.from_conn_string(path))
        noop_tool = tool(noop)
        for k in ks:
            self.graphs[k] = create_agent(model_class(steps=k), [noop_tool], checkpointer=checkpointer)

    async def turn(self, k: int) -> float:
        config = {"configurable": {"thread_id": uuid.uuid4().hex}, "recursion_limit": 2 * k + 10}
        began = time.perf_counter()
        state = await self.graphs[k].ainvoke(
            {"messages": [{"role": "user", "content": "go"}]}, config, durability=self.durability
        )
        elapsed = time.perf_counter() - began
        history = state["messages"]
        tools = sum(type(m).__name__ == "ToolMessage" for m in history)
        if tools != k or history[-1].content != ANSWER:
            raise RuntimeError(f"the turn did not run as scripted: {tools} tool results (want {k})")
        return elapsed

    def cpu(self) -> dict[str, list[float]]:
        return {"worker": _proc_cpu("self")}

    async def close(self) -> None:
        await self.exit.aclose()
        self.tmp.cleanup()


def _item_type(item: Any) -> Any:
    return item.get("type") if isinstance(item, dict) else getattr(item, "type", None)


class OpenAIAgents:
    """``Runner.run`` with a fake ``Model`` and a no-op function tool, tracing disabled."""

    def __init__(self) -> None:
        self.agents: dict[int, Any] = {}
        self.sdk: Any = None

    async def start(self, ks: Sequence[int]) -> None:
        sdk = self.sdk = importlib.import_module("agents")
        interface = importlib.import_module("agents.models.interface")
        responses = importlib.import_module("openai.types.responses")
        sdk.set_tracing_disabled(True)

        base: Any = interface.Model

        class ScriptedModel(base):  # type: ignore[misc]
            def __init__(self, steps: int):
                self.steps = steps

            async def get_response(self, system_instructions: Any, input: Any, *args: Any, **kw: Any) -> Any:
                step = 0 if isinstance(input, str) else sum(_item_type(i) == "function_call" for i in input)
                if step < self.steps:
                    output: Any = responses.ResponseFunctionToolCall(
                        type="function_call",
                        id=f"fc_{step}",
                        call_id=f"call_{step}",
                        name="noop",
                        arguments=json.dumps({"i": step}),
                        status="completed",
                    )
                else:
                    text = responses.ResponseOutputText(type="output_text", text=ANSWER, annotations=[])
                    output = responses.ResponseOutputMessage(
                        id="msg_answer", type="message", role="assistant", status="completed", content=[text]
                    )
                return sdk.ModelResponse(output=[output], usage=sdk.Usage(), response_id=None)

            async def stream_response(self, *args: Any, **kw: Any) -> Any:
                raise NotImplementedError
                yield

        noop_tool = sdk.function_tool(noop)
        for k in ks:
            self.agents[k] = sdk.Agent(
                name="bench", instructions="", model=ScriptedModel(k), tools=[noop_tool]
            )

    async def turn(self, k: int) -> float:
        config = self.sdk.RunConfig(tracing_disabled=True)
        began = time.perf_counter()
        result = await self.sdk.Runner.run(self.agents[k], "go", max_turns=k + 5, run_config=config)
        elapsed = time.perf_counter() - began
        calls = sum(_item_type(i) == "function_call_output" for i in result.to_input_list())
        if calls != k or result.final_output != ANSWER:
            raise RuntimeError(f"the turn did not run as scripted: {calls} tool results (want {k})")
        return elapsed

    def cpu(self) -> dict[str, list[float]]:
        return {"worker": _proc_cpu("self")}

    async def close(self) -> None:
        return None


def _runner(variant: str) -> Runner:
    if variant == "dispatch-up":
        return DispatchUp()
    if variant == "dispatch-inproc":
        return DispatchInproc()
    if variant.startswith("langgraph-"):
        return LangGraph(variant.removeprefix("langgraph-"))
    return OpenAIAgents()


def _reply(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


async def _serve(variant: str, ks: Sequence[int], warmup: int, out: IO[str]) -> None:
    """Set up, warm up, say ready, then run each ``{"k", "turns"}`` asked on stdin."""
    runner = _runner(variant)
    try:
        await runner.start(ks)
        for _ in range(warmup):
            for k in ks:
                await runner.turn(k)
        _reply(out, {"ready": True, "pid": os.getpid()})
        while line := await asyncio.to_thread(sys.stdin.readline):
            ask = json.loads(line)
            cpu_before = runner.cpu()
            times = [await runner.turn(ask["k"]) for _ in range(ask["turns"])]
            cpu_after = runner.cpu()
            cpu = {
                name: [
                    after - before
                    for after, before in zip(used, cpu_before.get(name, [0.0, 0.0]), strict=True)
                ]
                for name, used in cpu_after.items()
            }
            _reply(out, {"times": times, "cpu": cpu})
    finally:
        await runner.close()


def _worker(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn --worker")
    parser.add_argument("--worker", choices=VARIANTS, required=True)
    parser.add_argument("--ks", required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    # The protocol owns stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    coroutine = _serve(args.worker, ks, args.warmup, out)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
    return 0


# --------------------------------------------------------------------------- parent side


class Worker:
    def __init__(self, variant: str, ks: Sequence[int], warmup: int, loop: str, log: Path):
        self.variant = variant
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.turn",
                "--worker",
                variant,
                "--ks",
                ",".join(map(str, ks)),
                "--warmup",
                str(warmup),
                "--loop",
                loop,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
        )
        self.pid = int(self._read()["pid"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text(errors="replace")[-4000:]
            raise SystemExit(
                f"bench turn: the {self.variant} worker failed (exit {self.proc.returncode}):\n{tail}"
            )
        return dict(json.loads(line))

    def ask(self, k: int, turns: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"k": k, "turns": turns}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _missing(variant: str) -> list[str]:
    missing = []
    for module in NEEDS.get(variant, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers of 1 or more, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench turn", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ks", type=_ints, default=[10, 50, 100], help="tool steps per turn (default 10,50,100)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="rounds over the variants (default 7)")
    parser.add_argument(
        "--only",
        type=_names,
        default=list(VARIANTS),
        help=f"variants to run, comma-separated: {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="steps per variant, K and round: max(1, STEPS // (K+1)) turns, whose median is the sample "
        "(default 100)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed turns of each K per worker first (default 1)"
    )
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="every worker's event loop"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be 1 or more")
    ks: list[int] = args.ks
    variants = [v for v in VARIANTS if v in args.only]
    for variant in list(variants):
        if missing := _missing(variant):
            print(
                f"{variant}: skipped, {', '.join(missing)} not installed; install the peers with: {INSTALL}"
            )
            variants.remove(variant)
    if not variants:
        return 1
    turns = {k: max(1, args.steps // (k + 1)) for k in ks}
    samples: dict[tuple[str, int], list[float]] = {(v, k): [] for v in variants for k in ks}
    # [user, system] CPU seconds by process, and the steps they were spent on.
    cpu: dict[tuple[str, int], dict[str, list[float]]] = {(v, k): {} for v in variants for k in ks}
    steps_run: dict[tuple[str, int], int] = dict.fromkeys(samples, 0)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-turn-logs-") as logs:
        workers: dict[str, Worker] = {}
        try:
            for variant in variants:  # one at a time: set-up and warm-up do not overlap
                workers[variant] = Worker(variant, ks, args.warmup, args.loop, Path(logs) / f"{variant}.log")
            for round_ in range(args.repeats):
                shift = round_ % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    for k in ks:
                        answer = workers[variant].ask(k, turns[k])
                        samples[variant, k].append(
                            statistics.median(t * 1e6 / (k + 1) for t in answer["times"])
                        )
                        for name, (user, system) in answer["cpu"].items():
                            total = cpu[variant, k].setdefault(name, [0.0, 0.0])
                            total[0] += user
                            total[1] += system
                        steps_run[variant, k] += turns[k] * (k + 1)
        finally:
            for worker in workers.values():
                worker.stop()
    _report(
        variants=variants,
        ks=ks,
        turns=turns,
        args=args,
        samples=samples,
        cpu=cpu,
        steps_run=steps_run,
        seconds=time.monotonic() - began,
    )
    return 0


def _report(
    *,
    variants: Sequence[str],
    ks: Sequence[int],
    turns: dict[int, int],
    args: argparse.Namespace,
    samples: dict[tuple[str, int], list[float]],
    cpu: dict[tuple[str, int], dict[str, list[float]]],
    steps_run: dict[tuple[str, int], int],
    seconds: float,
) -> None:
    median = {key: statistics.median(values) for key, values in samples.items()}
    print(
        f"per-step cost of a turn of K tool steps and an answer: µs per step = turn wall time / (K+1); "
        f"{args.repeats} rounds, each sample the median of "
        f"{', '.join(f'{turns[k]} turn(s) at K={k}' for k in ks)}; {args.loop}; {seconds:.0f} s in all"
    )
    ours = [v for v in variants if v in DISPATCH_VARIANTS]
    peers = [v for v in variants if v in PEER_VARIANTS]
    if ours and peers:
        print("\nratios (Dispatch median / peer median, same run):")
        print(f"{'':<16} {'K':>4} " + "".join(f"{p:>23}" for p in peers))
        for variant in ours:
            for k in ks:
                print(
                    f"{variant:<16} {k:>4} "
                    + "".join(f"{median[variant, k] / median[p, k]:>22.2f}x" for p in peers)
                )
    print(
        "\nµs per step: median of the rounds, [interquartile range], (min-max); "
        "CPU µs per step (all processes)"
    )
    print(f"{'variant':<21} {'K':>4} {'median':>8} {'IQR':>15} {'min-max':>15} {'cpu':>8}")
    for variant in variants:
        for k in ks:
            values = samples[variant, k]
            low, high = _quartiles(values)
            spent = (sum(pair) for name, pair in cpu[variant, k].items() if ":" not in name)
            used = sum(spent) * 1e6 / steps_run[variant, k]
            print(
                f"{variant:<21} {k:>4} {median[variant, k]:>8.0f} {f'[{low:.0f}-{high:.0f}]':>15} "
                f"{f'({min(values):.0f}-{max(values):.0f})':>15} {used:>8.0f}"
            )
    if "dispatch-up" in variants:
        _report_processes(ks, cpu, steps_run, median)


def _report_processes(
    ks: Sequence[int],
    cpu: dict[tuple[str, int], dict[str, list[float]]],
    steps_run: dict[tuple[str, int], int],
    median: dict[tuple[str, int], float],
) -> None:
    names = sorted({n for k in ks for n in cpu["dispatch-up", k] if ":" not in n}, key=_process_order)
    print(
        "\ndispatch-up: CPU µs per step by process (/proc/<pid>/stat over every round): all threads "
        "(of which system time), and the main thread alone (the event loop)"
    )
    print(f"{'K':>4} {'threads':<7} " + "".join(f"{n:>13}" for n in names) + f"{'total':>13}{'wall':>7}")
    for k in ks:
        used = cpu["dispatch-up", k]
        for threads, suffix in (("all", ""), ("loop", ":loop")):
            per = [
                [v * 1e6 / steps_run["dispatch-up", k] for v in used.get(n + suffix, [0, 0])] for n in names
            ]
            cells = "".join(f"{f'{sum(u):.0f} ({u[1]:.0f})':>13}" for u in per)
            total = [sum(u[0] for u in per), sum(u[1] for u in per)]
            wall = f"{median['dispatch-up', k]:>7.0f}" if threads == "all" else ""
            print(f"{k:>4} {threads:<7} {cells}{f'{sum(total):.0f} ({total[1]:.0f})':>13}{wall}")


def _process_order(name: str) -> int:
    order = ("store", "kernel", "exec", "transport", "up", "client")
    return order.index(name) if name in order else len(order)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
