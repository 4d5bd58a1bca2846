"""What a step costs in calls to the store (issue 14): a tool step is one Append, with its
messages, its events and its metrics; the seal carries the turn's metrics; and the appends
are messages on the kernel's one AppendStream, never unary calls. Counted, not timed: each
extra step of a turn must add exactly one store message."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dispatch.kernel.agents import build_agents
from dispatch.kernel.kernel import Kernel
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.kernel.tools import BUILTIN_TOOLS
from dispatch.kernel.turn import TurnDeps
from dispatch.shared.config import KernelConfig
from dispatch.v1 import common_pb2, exec_pb2_grpc, store_pb2
from tests.kernel.test_durability import QUIET, crash, start
from tests.stack import TENANT, Stack, start_stack


class CountingStream:
    """A stream call that counts the messages written on it."""

    def __init__(self, call: Any, calls: collections.Counter[str], name: str):
        self._call = call
        self._calls = calls
        self._name = name

    async def write(self, message: Any) -> None:
        self._calls[f"{self._name} message"] += 1
        await self._call.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class Counting:
    """A store stub that counts the calls made through it, by method, and the messages
    written on the streams it opens (as "<method> message")."""

    def __init__(self, stub: Any):
        self._stub = stub
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name.endswith("Stream"):
                return CountingStream(method(*args, **kwargs), self.calls, name)
            return method(*args, **kwargs)

        return call


def steps(k: int) -> ScriptedProvider:
    calls = [[{"type": "tool_call", "name": "list_dir", "input": {"path": f"d{i}"}}] for i in range(k)]
    return ScriptedProvider.from_data({"steps": [*calls, [{"type": "text_delta", "text": "done"}]]})


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, steps(1), sweep_interval=QUIET)
    yield s
    await s.stop()


async def store_calls(stack: Stack, k: int) -> collections.Counter[str]:
    """The store calls of one turn of ``k`` tool steps and an answer, on a kernel of its own."""
    for i in range(k):
        (stack.workspace / f"d{i}").mkdir(exist_ok=True)
    counting = Counting(stack.store)
    agents, _ = build_agents(KernelConfig(), BUILTIN_TOOLS, steps(k))
    kernel = Kernel(
        TurnDeps(
            store=counting,  # type: ignore[arg-type]
            exec=exec_pb2_grpc.ExecStub(stack.channel("exec")),
            agents=agents,
            sweep_interval=QUIET,
        )
    )
    await kernel.start()
    try:
        conv = await stack.conversation()
        turn_id = await start(kernel, conv)
        while (
            await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn_id))
        ).state != common_pb2.TURN_STATE_COMPLETED or kernel.busy(conv):
            await asyncio.sleep(0.02)
        metrics = await stack.store.GetMetrics(
            store_pb2.GetMetricsRequest(tenant_id=TENANT, conversation_id=conv, turn_id=turn_id)
        )
        [turn] = metrics.turns
        assert (turn.steps, len(turn.step_metrics)) == (k + 1, k + 1)  # every step's metrics recorded
        return counting.calls
    finally:
        await crash(kernel)


async def test_each_tool_step_costs_one_store_call_with_its_metrics_inside(stack: Stack) -> None:
    two, six = await store_calls(stack, 2), await store_calls(stack, 6)
    assert "RecordStepMetrics" not in six and "RecordTurnMetrics" not in six
    # The permission rules come with where the turn runs (ResolveExecution), not in calls of
    # their own: the one GetWorkspace is the start's (the workspace's default agent).
    assert (six["ResolveExecution"], six["GetWorkspace"], six["GetConversation"]) == (1, 1, 2), six
    # Every append of the turn is a message on the one stream its kernel opened.
    assert "Append" not in six and six["AppendStream"] == 1, six
    extra = six - two
    # Only the lease keeper's renewals may differ with the turn's length.
    extra.pop("RenewLeases", None)
    assert dict(extra) == {"AppendStream message": 4}, (two, six)
