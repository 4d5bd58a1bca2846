"""A step's events leave the kernel together when they follow each other at once: a quick
tool's call, start and result, and the step's commit, reach a subscriber in one message
(ConversationLog.hold, released by the step's end). A slow tool's start is held no longer
than the cap: subscribers see it while the tool still runs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dispatch.kernel import events as events_module
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.kernel.tools import Tool, ToolContext, ToolResult
from dispatch.v1 import common_pb2, kernel_pb2
from tests.stack import TENANT, start_stack

STEP = ["tool_call", "tool_started", "tool_result", "messages_committed", "step_completed"]


def waiting_tool(seconds: float) -> Tool:
    async def run(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        await asyncio.sleep(seconds)  # it yields: without a hold, its start leaves alone
        return ToolResult("done")

    return Tool("wait", "Waits.", {"type": "object"}, run_fn=run)


def script(steps: int) -> ScriptedProvider:
    calls = [[{"type": "tool_call", "name": "wait", "input": {"i": i}}] for i in range(steps)]
    return ScriptedProvider.from_data({"steps": [*calls, [{"type": "text_delta", "text": "ok"}]]})


async def batches_of_a_turn(tmp_path: Path, provider: ScriptedProvider, tool: Tool) -> list[list[str]]:
    """The kinds of events in each kernel Subscribe message, for one turn."""
    stack = await start_stack(tmp_path, provider, tools={"wait": tool})
    try:
        conv = await stack.conversation()
        stream = stack.kernel.Subscribe(
            kernel_pb2.KernelSubscribeRequest(tenant_id=TENANT, conversation_id=conv)
        )
        batches: list[list[str]] = []

        async def read() -> None:
            async for batch in stream:
                batches.append([str(e.WhichOneof("kind")) for e in batch.events])
                if "turn_sealed" in batches[-1]:
                    return

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.1)  # subscribed before the turn starts
        await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(
                tenant_id=TENANT,
                conversation_id=conv,
                chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text="go"))],
            )
        )
        await asyncio.wait_for(reader, 30)
        stream.cancel()
        return batches
    finally:
        await stack.stop()


async def test_a_quick_tool_s_step_reaches_subscribers_in_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cap no step here comes near, so the test does not depend on this machine's speed.
    monkeypatch.setattr(events_module, "HOLD_CAP", 5.0)
    batches = await batches_of_a_turn(tmp_path, script(3), waiting_tool(0.01))
    whole_steps = [b for b in batches if b == STEP]
    assert len(whole_steps) == 3, batches


async def test_a_slow_tool_s_start_is_seen_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "HOLD_CAP", 0.05)
    batches = await batches_of_a_turn(tmp_path, script(1), waiting_tool(1.0))
    started = next(i for i, b in enumerate(batches) if "tool_started" in b)
    result = next(i for i, b in enumerate(batches) if "tool_result" in b)
    assert started < result, batches  # the start left after the cap, not with the result


async def test_tokens_after_a_call_are_not_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "HOLD_CAP", 5.0)
    provider = ScriptedProvider.from_data(
        {
            "steps": [
                [
                    {"type": "tool_call", "name": "wait", "input": {}},
                    {"type": "sleep", "seconds": 0.2},
                    {"type": "text_delta", "text": "still writing"},
                    {"type": "sleep", "seconds": 0.2},
                ],
                [{"type": "text_delta", "text": "ok"}],
            ]
        }
    )
    batches = await batches_of_a_turn(tmp_path, provider, waiting_tool(0.0))
    delta = next(i for i, b in enumerate(batches) if "text_delta" in b)
    completed = next(i for i, b in enumerate(batches) if "step_completed" in b)
    # The delta released what the call held and left at once, not with the step's end (0.2 s
    # later, inside the cap): it came in a message before the step's commit.
    assert delta < completed, batches
    assert "tool_call" in batches[delta], batches  # what the call held left with it
