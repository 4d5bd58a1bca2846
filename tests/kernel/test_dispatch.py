"""Tool dispatch inside a real kernel: the seed's run-turn behaviours, with the
Rust scheduler and with its Python reference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.kernel.tools import Tool, ToolContext, ToolResult
from dispatch.shared.config import DispatchPolicy
from dispatch.v1 import common_pb2, kernel_pb2
from tests.stack import TENANT, Stack, collect, run_turn, start_stack
from tests.stack import text_chunks as user_text


class Recorder:
    """Test tools that log when they start and end, and how many run at once."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.running = 0
        self.peak = 0
        self.peak_by_tool: dict[str, int] = {}
        self._by_tool: dict[str, int] = {}
        self.release = asyncio.Event()

    def tool(self, name: str, *, safe: bool = True, hold: float = 0.05, gated: bool = False) -> Tool:
        async def run(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
            label = f"{name}{args.get('k', '')}"
            self.log.append(f"start {label}")
            self.running += 1
            self._by_tool[name] = self._by_tool.get(name, 0) + 1
            self.peak = max(self.peak, self.running)
            self.peak_by_tool[name] = max(self.peak_by_tool.get(name, 0), self._by_tool[name])
            try:
                if gated:
                    await self.release.wait()
                else:
                    await asyncio.sleep(hold)
            finally:
                self.running -= 1
                self._by_tool[name] -= 1
            self.log.append(f"end {label}")
            return ToolResult(f"{label} done")

        return Tool(name, f"test tool {name}", {"type": "object"}, run_fn=run, concurrency_safe=safe)


def call(name: str, k: object = "", **extra: object) -> dict[str, Any]:
    return {"type": "tool_call", "name": name, "input": {"k": k, **extra} if k != "" else extra}


def one_step(*events: dict[str, Any]) -> ScriptedProvider:
    return ScriptedProvider.from_data({"steps": [list(events), [{"type": "text_delta", "text": "done"}]]})


@pytest.fixture(params=["rust", "reference"])
def scheduler(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make(tmp_path: Path, scheduler: str) -> AsyncIterator[Any]:
    stacks: list[Stack] = []

    async def make(provider: ScriptedProvider, tools: list[Tool], **policy: Any) -> Stack:
        stack = await start_stack(
            tmp_path,
            provider,
            tools={t.name: t for t in tools},
            policy=DispatchPolicy(scheduler=scheduler, **policy),
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.stop()


async def turn(stack: Stack) -> list[common_pb2.AgentEvent]:
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "go")
    return events


def results(events: list[common_pb2.AgentEvent]) -> dict[str, common_pb2.ToolResultEvent]:
    return {e.tool_result.tool_call_id: e.tool_result for e in events if e.HasField("tool_result")}


async def test_sequential_with_max_concurrent_1(make: Any) -> None:
    rec = Recorder()
    stack = await make(one_step(call("a", 1), call("a", 2), call("a", 3)), [rec.tool("a")], max_concurrent=1)
    await turn(stack)
    assert rec.log == ["start a1", "end a1", "start a2", "end a2", "start a3", "end a3"]
    assert rec.peak == 1


@pytest.mark.parametrize(("max_concurrent", "peak"), [(2, 2), (0, 4)])
async def test_parallel_up_to_the_cap(make: Any, max_concurrent: int, peak: int) -> None:
    rec = Recorder()
    provider = one_step(*(call("a", i) for i in range(4)))
    stack = await make(provider, [rec.tool("a", hold=0.1)], max_concurrent=max_concurrent)
    events = await turn(stack)
    assert rec.peak == peak
    assert len(results(events)) == 4
    assert rec.log[:peak] == [f"start a{i}" for i in range(peak)]


@pytest.mark.parametrize(
    ("eager", "expected"), [(True, ["tool_result", "text_delta"]), (False, ["text_delta", "tool_result"])]
)
async def test_eager_launch_starts_a_call_before_the_stream_ends(
    make: Any, eager: bool, expected: list[str]
) -> None:
    rec = Recorder()
    provider = one_step(
        call("a", 1), {"type": "sleep", "seconds": 0.3}, {"type": "text_delta", "text": "later"}
    )
    stack = await make(provider, [rec.tool("a", hold=0.01)], eager=eager)
    events = await turn(stack)
    step0 = [e for e in events if e.step_id.endswith("#0")]
    order = [e.WhichOneof("kind") for e in step0 if e.WhichOneof("kind") in ("tool_result", "text_delta")]
    assert order == expected


async def test_abort_mid_step_gives_error_results_for_unresolved_calls(make: Any) -> None:
    rec = Recorder()
    stack = await make(one_step(call("a", 1), call("a", 2)), [rec.tool("a", gated=True)], max_concurrent=1)
    conv = await stack.conversation()
    started = await stack.kernel.StartTurn(
        kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=user_text("go"))
    )
    events: list[common_pb2.AgentEvent] = []
    watcher = asyncio.create_task(
        collect(stack, conv, started.after_event_seq, until_turn=started.turn_id, sink=events)
    )
    while rec.log != ["start a1"]:
        await asyncio.sleep(0.01)
    await stack.kernel.Cancel(kernel_pb2.KernelCancelRequest(tenant_id=TENANT, conversation_id=conv))
    await asyncio.wait_for(watcher, 10)
    got = results(events)
    assert len(got) == 2
    assert all((r.content, r.is_error) == ("Aborted", True) for r in got.values())
    assert rec.log == ["start a1"]  # the queued call never started
    assert events[-1].turn_sealed.state == common_pb2.TURN_STATE_ABORTED


async def test_duplicate_calls_run_once_and_share_the_result(make: Any) -> None:
    rec = Recorder()
    provider = one_step(
        {"type": "tool_call", "id": "c1", "name": "a", "input": {"k": 1, "opts": {"x": 1.0, "y": [1, 2]}}},
        {"type": "tool_call", "id": "c2", "name": "a", "input": {"opts": {"y": [1, 2], "x": 1}, "k": 1}},
        {"type": "tool_call", "id": "c3", "name": "a", "input": {"k": 2}},
    )
    stack = await make(provider, [rec.tool("a")])
    got = results(await turn(stack))
    assert sorted(rec.log) == ["end a1", "end a2", "start a1", "start a2"]
    assert (got["c2"].content, got["c2"].duplicate_of) == (got["c1"].content, "c1")
    assert got["c1"].duplicate_of == got["c3"].duplicate_of == ""


async def test_dedup_opt_out_runs_every_call(make: Any) -> None:
    rec = Recorder()
    stack = await make(one_step(call("a", 1), call("a", 1)), [rec.tool("a")], dedup_exempt=frozenset({"a"}))
    await turn(stack)
    assert rec.log.count("start a1") == 2


async def test_an_unsafe_tool_runs_alone_even_with_max_concurrent_5(make: Any) -> None:
    rec = Recorder()
    provider = one_step(call("s", 1), call("u", 1), call("s", 2))
    stack = await make(
        provider, [rec.tool("s", hold=0.1), rec.tool("u", safe=False, hold=0.1)], max_concurrent=5
    )
    await turn(stack)
    # u waits for s1, and s2 (queued behind u) does not overtake it.
    assert rec.log == ["start s1", "end s1", "start u1", "end u1", "start s2", "end s2"]


async def test_per_tool_limit_holds_beside_the_global_cap(make: Any) -> None:
    rec = Recorder()
    provider = one_step(*(call("sh", i) for i in range(4)), call("r", 1))
    stack = await make(provider, [rec.tool("sh", hold=0.1), rec.tool("r", hold=0.1)], tool_limits={"sh": 2})
    await turn(stack)
    assert rec.peak_by_tool["sh"] == 2
    # r was not held up behind the shells waiting on their limit.
    assert rec.log.index("start r1") < rec.log.index("start sh2")


async def test_unknown_tool_is_an_error_result(make: Any) -> None:
    rec = Recorder()
    stack = await make(one_step(call("nope", 1), call("a", 1)), [rec.tool("a")])
    got = list(results(await turn(stack)).values())
    errors = [r for r in got if r.is_error]
    assert [r.name for r in errors] == ["nope"]
    assert "unknown tool 'nope'" in errors[0].content
