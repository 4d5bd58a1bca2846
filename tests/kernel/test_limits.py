"""Turn limits: the step cap (global and per agent), text-only agents, the tool budget and
doom-loop detection, each ending in a wrap-up step streamed with tools disabled; and the
metrics a turn leaves in the store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dispatch.kernel.providers.openai import OpenAIProvider
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import AgentConfig, ProviderConfig
from dispatch.v1 import common_pb2, store_pb2
from tests.fakes.openai_server import FakeOpenAI, Stream, text_chunks
from tests.stack import TENANT, Stack, kinds, run_turn


def tool_call(path: str, call_id: str = "") -> dict[str, Any]:
    return {"type": "tool_call", "id": call_id, "name": "list_dir", "input": {"path": path}}


def scripted(*steps: list[dict[str, Any]]) -> ScriptedProvider:
    return ScriptedProvider.from_data({"steps": list(steps)})


def agent(**kw: Any) -> dict[str, AgentConfig]:
    return {"default": AgentConfig(**kw)}


async def turn(stack: Stack, text: str = "go") -> list[common_pb2.AgentEvent]:
    _, events = await run_turn(stack, await stack.conversation(), text)
    return events


def done(events: list[common_pb2.AgentEvent]) -> common_pb2.TurnDone:
    return next(e.turn_done for e in events if e.HasField("turn_done"))


def results(events: list[common_pb2.AgentEvent]) -> list[common_pb2.ToolResultEvent]:
    return [e.tool_result for e in events if e.HasField("tool_result")]


def errors(events: list[common_pb2.AgentEvent]) -> list[common_pb2.ErrorEvent]:
    return [e.error for e in events if e.HasField("error")]


def said(events: list[common_pb2.AgentEvent], step: int) -> str:
    return "".join(
        e.text_delta.text for e in events if e.HasField("text_delta") and e.step_id.endswith(f"#{step}")
    )


WRAP = [{"type": "text_delta", "text": "Summary: listed things."}]


@pytest.mark.parametrize(("max_steps", "agent_steps", "cap"), [(2, None, 2), (0, 2, 2), (3, 2, 2), (2, 5, 2)])
async def test_the_step_cap_ends_with_a_wrap_up_and_finish_reason_max_steps(
    make_stack: Any, max_steps: int, agent_steps: int | None, cap: int
) -> None:
    steps = [[tool_call(str(i))] for i in range(cap)] + [WRAP]
    stack = await make_stack(scripted(*steps), max_steps=max_steps, agents=agent(steps=agent_steps))
    events = await turn(stack)
    assert (done(events).finish_reason, done(events).steps) == (common_pb2.FINISH_REASON_MAX_STEPS, cap + 1)
    assert len(results(events)) == cap
    assert said(events, cap) == "Summary: listed things."
    assert kinds(events)[-1] == "turn_sealed"


async def test_the_wrap_up_request_disables_tools_and_says_why(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "list_dir", "arguments": '{"path": "."}'}}
    calls = [{"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]}]
    # The wrap-up answer also tries a call: it is ignored, not run.
    fake_openai.replies += [Stream(calls), Stream(calls + text_chunks("I listed the workspace."))]
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(provider, agents=agent(steps=1))
    events = await turn(stack)
    wrap_up = fake_openai.requests[1]
    assert wrap_up["tool_choice"] == "none"
    assert [t["function"]["name"] for t in wrap_up["tools"]]  # still declared: history calls them
    assert wrap_up["messages"][-1]["role"] == "system"
    assert "limit of 1 steps" in wrap_up["messages"][-1]["content"]
    assert "tool_choice" not in fake_openai.requests[0]
    assert done(events).finish_reason == common_pb2.FINISH_REASON_MAX_STEPS
    assert kinds(events).count("tool_call") == 1 and len(results(events)) == 1
    # The ignored call is visible; with a text answer there, nobody asks again.
    [ignored] = errors(events)
    assert (ignored.code, ignored.fatal) == ("tool_call_ignored", False)
    assert "list_dir" in ignored.message and "not run" in ignored.message
    assert len(fake_openai.requests) == 2
    # The instruction is not history: the next turn's request does not carry it.
    fake_openai.replies.append(Stream(text_chunks("ok")))
    await run_turn(stack, events[0].conversation_id, "and now?")
    assert all(
        "Tools are no longer available" not in str(m.get("content"))
        for m in fake_openai.requests[2]["messages"]
    )


CALL = {"index": 0, "id": "c1", "function": {"name": "list_dir", "arguments": '{"path": "."}'}}
CALLS = [{"choices": [{"index": 0, "delta": {"tool_calls": [CALL]}, "finish_reason": "tool_calls"}]}]


async def test_a_wrap_up_that_only_calls_a_tool_is_asked_again_without_tools(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    """A model that ignores tool_choice "none" in the wrap-up: its call is not run, and the
    wrap-up is asked once more with the tools left out (chat completions needs none declared
    for the calls in history); that answer is the turn's wrap-up."""
    fake_openai.replies += [Stream(CALLS), Stream(CALLS), Stream(text_chunks("I listed the workspace."))]
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(provider, agents=agent(steps=1))
    events = await turn(stack)
    assert len(fake_openai.requests) == 3
    again = fake_openai.requests[2]
    assert "tools" not in again and "tool_choice" not in again
    assert [m["role"] for m in again["messages"][-2:]] == ["system", "system"]
    assert "limit of 1 steps" in again["messages"][-2]["content"]
    assert "called list_dir" in again["messages"][-1]["content"]
    # Still the history the first wrap-up request had: the ignored call is not in it.
    assert again["messages"][:-1] == fake_openai.requests[1]["messages"]
    assert said(events, 1) == "I listed the workspace."
    assert [(e.code, e.fatal) for e in errors(events)] == [("tool_call_ignored", False)]
    assert (done(events).finish_reason, done(events).steps) == (common_pb2.FINISH_REASON_MAX_STEPS, 2)
    history = await stack.store.Load(
        store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=events[0].conversation_id)
    )
    assert [c.WhichOneof("kind") for c in history.messages[-1].chunks] == ["text"]
    assert history.messages[-1].chunks[0].text.text == "I listed the workspace."


async def test_a_wrap_up_still_without_text_ends_with_an_error_event_saying_so(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.replies += [Stream(CALLS), Stream(CALLS), Stream(CALLS), Stream(text_chunks("never asked"))]
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(provider, agents=agent(steps=1))
    events = await turn(stack)
    assert len(fake_openai.requests) == 3  # asked again once, not more
    assert [(e.code, e.fatal) for e in errors(events)] == [
        ("tool_call_ignored", False),
        ("tool_call_ignored", False),
        ("no_wrap_up", False),
    ]
    assert errors(events)[-1].message == (
        "the model gave no wrap-up: asked twice, it answered without text (it called list_dir instead)"
    )
    assert said(events, 1) == ""
    assert done(events).finish_reason == common_pb2.FINISH_REASON_MAX_STEPS
    assert kinds(events)[-1] == "turn_sealed"


async def test_a_text_only_agent_is_offered_no_tools_and_its_stray_calls_are_ignored(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "shell", "arguments": '{"command": "rm -rf /"}'}}
    stray = [{"choices": [{"index": 0, "delta": {"content": "Hello.", "tool_calls": [call]}}]}]
    fake_openai.replies.append(
        Stream([*stray, {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}])
    )
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(provider, agents=agent(steps=0))
    events = await turn(stack)
    assert "tools" not in fake_openai.requests[0]
    assert "tool_call" not in kinds(events) and results(events) == []
    [ignored] = errors(events)
    assert (ignored.code, ignored.fatal) == ("tool_call_ignored", False)
    assert ignored.message == "the model called shell, but this agent has no tools: the call was not run"
    assert (done(events).steps, done(events).finish_reason) == (1, common_pb2.FINISH_REASON_STOP)
    history = await stack.store.Load(
        store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=events[0].conversation_id)
    )
    assert [c.WhichOneof("kind") for c in history.messages[-1].chunks] == ["text"]


async def test_the_tool_budget_refuses_calls_past_it_then_wraps_up(make_stack: Any) -> None:
    # Four different calls (a doom loop is not what stops them).
    first = [tool_call(".", "c1"), tool_call("./", "c2")]
    second = [tool_call("./.", "c3"), tool_call("././", "c4")]
    stack = await make_stack(scripted(first, second, WRAP), agents=agent(tool_budget=3))
    events = await turn(stack)
    got = {r.tool_call_id: r for r in results(events)}
    assert {k: r.is_error for k, r in got.items()} == {"c1": False, "c2": False, "c3": False, "c4": True}
    assert got["c4"].content == "not run: the turn's tool budget (3 calls) is spent"
    assert (done(events).finish_reason, done(events).steps) == (common_pb2.FINISH_REASON_TOOL_BUDGET, 3)
    assert said(events, 2) == "Summary: listed things."


async def test_the_same_call_three_times_in_a_row_is_a_doom_loop(make_stack: Any) -> None:
    same = [tool_call(".")]
    # The third is the same call spelled differently: canonical JSON makes it equal.
    respelled = [{"type": "tool_call", "name": "list_dir", "input": json.loads('{"path":  "."}')}]
    stack = await make_stack(scripted(same, same, respelled, WRAP))
    events = await turn(stack)
    got = results(events)
    assert [r.is_error for r in got] == [False, False, True]
    assert "same list_dir call 3 times in a row" in got[2].content
    assert done(events).finish_reason == common_pb2.FINISH_REASON_DOOM_LOOP
    assert said(events, 3) == "Summary: listed things."


async def test_different_calls_between_repeats_are_not_a_doom_loop(make_stack: Any) -> None:
    steps = [
        [tool_call(".")],
        [tool_call("x")],
        [tool_call(".")],
        [tool_call(".")],
        [{"type": "text_delta", "text": "done"}],
    ]
    stack = await make_stack(scripted(*steps))
    events = await turn(stack)
    assert done(events).finish_reason == common_pb2.FINISH_REASON_STOP
    assert len(results(events)) == 4


async def test_doom_loop_detection_can_be_turned_off(make_stack: Any) -> None:
    same = [tool_call(".")]
    stack = await make_stack(
        scripted(same, same, same, same, [{"type": "text_delta", "text": "done"}]), agents=agent(doom_loop=0)
    )
    events = await turn(stack)
    assert done(events).finish_reason == common_pb2.FINISH_REASON_STOP
    assert [r.is_error for r in results(events)] == [False] * 4


async def test_a_turn_persists_its_metrics_and_step_metrics(make_stack: Any) -> None:
    usage1 = {"type": "usage", "input_tokens": 100, "output_tokens": 10, "cache_read_tokens": 60}
    usage2 = {"type": "usage", "input_tokens": 130, "output_tokens": 20, "cache_write_tokens": 5}
    stack = await make_stack(
        scripted([tool_call("."), tool_call("x"), usage1], [{"type": "text_delta", "text": "ok"}, usage2])
    )
    events = await turn(stack)
    metrics = await stack.store.GetMetrics(
        store_pb2.GetMetricsRequest(tenant_id=TENANT, conversation_id=events[0].conversation_id)
    )
    [m] = metrics.turns
    assert m.turn_id == events[0].turn_id
    assert (m.steps, m.tool_calls, m.finish_reason) == (2, 2, common_pb2.FINISH_REASON_STOP)
    assert (m.usage.input_tokens, m.usage.output_tokens) == (230, 30)
    assert (m.usage.cache_read_tokens, m.usage.cache_write_tokens) == (60, 5)
    assert m.context_size == 150  # the last step's input plus output, not the sum
    assert m.duration.ToNanoseconds() > 0
    assert [s.step_index for s in m.step_metrics] == [0, 1]
    assert [s.tool_calls for s in m.step_metrics] == [2, 0]
    assert m.step_metrics[0].step_id == f"{m.turn_id}#0"
    assert all(s.generation.ToNanoseconds() >= s.ttft.ToNanoseconds() > 0 for s in m.step_metrics)
    # turn_done says the same.
    assert done(events).context_size == 150
    assert done(events).usage == m.usage
