"""The context window: known and configured windows, the request estimate, and what a turn
reports of it (issue 17, point 1)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dispatch.kernel.context import (
    COMPACTION_PROMPT,
    DEFAULT_WINDOW,
    MESSAGE_OVERHEAD,
    Gauge,
    cut,
    estimate,
    estimate_message,
    estimate_request,
    find_tool_output,
    fit_tool_results,
    known_window,
    output_budget,
    window_for,
)
from dispatch.kernel.providers.base import Finish, ProviderRequest, TextDelta, ToolCall, Usage
from dispatch.kernel.providers.openai import OpenAIProvider
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import AgentConfig, ConfigError, ProviderConfig, kernel_config
from dispatch.v1 import common_pb2, transport_pb2
from tests.fakes.openai_server import FakeOpenAI, Stream, text_chunks
from tests.kernel.test_turn import history
from tests.stack import run_turn


def message(role: common_pb2.Role.ValueType, *chunks: common_pb2.Chunk) -> common_pb2.Message:
    return common_pb2.Message(role=role, chunks=list(chunks))


def text(value: str) -> common_pb2.Chunk:
    return common_pb2.Chunk(text=common_pb2.TextChunk(text=value))


def result(value: str) -> common_pb2.Chunk:
    return common_pb2.Chunk(tool_result=common_pb2.ToolResultChunk(tool_call_id="c1", content=value))


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("gpt-4o-2024-08-06", 128_000),
        ("openai/gpt-4o-mini", 128_000),
        ("gpt-4", 8_192),
        ("gpt-4.1-mini", 1_047_576),
        ("claude-sonnet-4-5", 200_000),
        ("qwen2.5:7b", 32_768),
        ("Llama3.1:8B", 131_072),
    ],
)
def test_common_models_have_their_windows(model: str, window: int) -> None:
    assert known_window(model) == window
    assert window_for(model).tokens == window


def test_a_configured_window_wins_and_the_reserve_is_said_or_derived() -> None:
    assert known_window("my-own-model") is None
    assert window_for("my-own-model").tokens == DEFAULT_WINDOW
    assert window_for("gpt-4o", window=50_000).tokens == 50_000
    assert window_for("gpt-4o", window=50_000).reserve == 50_000 // 8
    assert window_for("gpt-4o").reserve == 16_000  # an eighth
    assert window_for("claude-opus-4").reserve == 16_384  # an eighth, capped
    assert window_for("gpt-4o", max_tokens=2_000).reserve == 2_000
    assert window_for("gpt-4o", reserve=1_000, max_tokens=2_000).reserve == 1_000
    small = window_for("x", window=4_096, reserve=100_000)
    assert small.reserve < small.tokens and small.input_budget == 1
    assert window_for("x", window=10_000).used(2_500) == 0.25


def test_the_estimate_grows_with_the_text_and_counts_every_message() -> None:
    short = message(common_pb2.ROLE_USER, text("hi"))
    long = message(common_pb2.ROLE_TOOL, result("x" * 4_000))
    assert estimate_message(short) == MESSAGE_OVERHEAD + 1
    assert estimate_message(long) == MESSAGE_OVERHEAD + 1_001  # 4 000 characters and its id
    assert estimate([short, long]) == estimate_message(short) + estimate_message(long)
    assert estimate([short], system="s" * 400) == estimate([short]) + 100 + MESSAGE_OVERHEAD


def test_the_gauge_starts_from_the_last_reported_input_and_adds_what_came_since() -> None:
    gauge = Gauge(window_for("gpt-4o"))
    first = [message(common_pb2.ROLE_USER, text("list it"))]
    request = ProviderRequest(model="m", system="be brief", messages=first)
    assert gauge.before(request, 1) == estimate(first, "be brief")
    gauge.after(1, common_pb2.Usage(input_tokens=900, output_tokens=20))
    added = [message(common_pb2.ROLE_ASSISTANT, text("ok")), message(common_pb2.ROLE_TOOL, result("y" * 400))]
    second = ProviderRequest(model="m", system="be brief", messages=[*first, *added])
    assert gauge.before(second, 3) == 900 + sum(estimate_message(m) for m in added)
    # A provider that reports nothing: estimated whole again.
    gauge.after(3, common_pb2.Usage())
    assert gauge.before(second, 3) == estimate(second.messages, "be brief")


def test_config_takes_windows_per_provider_and_per_agent_and_refuses_nonsense() -> None:
    file: dict[str, Any] = {
        "providers": {
            "p": {"kind": "scripted", "script": "s.json", "context_window": 8_192, "output_reserve": 512}
        },
        "agents": {"a": {"provider": "p"}, "b": {"provider": "p", "context_window": 4_096}},
        "kernel": {"default_agent": "a", "store": "127.0.0.1:1", "exec": "127.0.0.1:2"},
    }
    cfg = kernel_config({}, {}, file)
    assert (cfg.providers["p"].context_window, cfg.providers["p"].output_reserve) == (8_192, 512)
    assert cfg.agents["b"].context_window == 4_096 and cfg.agents["a"].context_window == 0
    for table, bad, words in (
        ("providers", {"context_window": 100}, "at least 1024"),
        ("providers", {"context_window": 2_048, "output_reserve": 2_048}, "less than context_window"),
        ("agents", {"output_reserve": -1}, "0 or more"),
    ):
        broken = {
            **file,
            table: {**file[table], next(iter(file[table])): {**next(iter(file[table].values())), **bad}},
        }
        with pytest.raises(ConfigError, match=words):
            kernel_config({}, {}, broken)


STEPS = (
    [
        {"type": "tool_call", "id": "c1", "name": "list_dir", "input": {"path": "."}},
        {"type": "usage", "input_tokens": 1_000, "output_tokens": 30},
    ],
    [{"type": "text_delta", "text": "done"}, {"type": "usage", "input_tokens": 1_100, "output_tokens": 4}],
)


async def test_a_turn_reports_its_window_and_how_full_each_step_was(make_stack: Any) -> None:
    stack = await make_stack(
        ScriptedProvider.from_data({"steps": list(STEPS)}),
        transport=True,
        agents={"default": AgentConfig(context_window=10_000, output_reserve=1_000)},
    )
    (stack.workspace / "a.txt").write_text("hi")
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "what is here?")
    steps = [e.step_completed for e in events if e.HasField("step_completed")]
    assert [s.context_window for s in steps] == [10_000, 10_000]
    assert [s.context_size for s in steps] == [1_030, 1_104]
    assert [s.context_used for s in steps] == [0.103, 0.1104]
    # Step 0 was estimated whole; step 1 from step 0's reported input plus what was added.
    assert 0 < steps[0].context_estimate < 1_000
    assert steps[1].context_estimate > 1_000
    (done,) = [e.turn_done for e in events if e.HasField("turn_done")]
    assert (done.context_size, done.context_window, done.context_used) == (1_104, 10_000, 0.1104)

    models = await stack.transport.Models(transport_pb2.ModelsRequest())
    assert [(m.context_window, m.output_reserve) for m in models.models] == [(10_000, 1_000)]


# ------------------------------------------------------------ tool output (point 2)


def test_a_result_within_budget_is_whole_and_a_larger_one_is_head_marker_tail() -> None:
    assert cut("short", 100, "c1", readable=True) == "short"
    lines = "".join(f"line {i:05d}\n" for i in range(2_000))  # 22 000 characters
    shown = cut(lines, 2_000, "c1", readable=True)
    head, _, rest = shown.partition("\n[dispatch: ")
    marker, _, tail = rest.partition("]\n")
    assert lines.startswith(head) and lines.endswith(tail)
    assert len(shown) < 2_000 + 200
    # Cut at line ends, and the marker says what is missing and how to read it.
    assert head.endswith("\n") and tail.startswith("line ")
    left_out = int(marker.split(" of ")[0])
    start = len(head)
    assert f"characters {start}-{start + left_out}" in marker
    assert f'read_tool_output(tool_call_id="c1", offset={start})' in marker
    assert lines[:start] + lines[start + left_out :] == head + tail
    assert "read_tool_output" not in cut(lines, 2_000, "c1", readable=False)


def test_only_tool_messages_over_budget_are_copied_and_cut() -> None:
    big = message(common_pb2.ROLE_TOOL, result("z" * 5_000))
    small = message(common_pb2.ROLE_TOOL, result("ok"))
    user = message(common_pb2.ROLE_USER, text("u" * 5_000))
    shown = fit_tool_results([user, small, big], 1_000, readable=True)
    assert shown[0] is user and shown[1] is small
    assert len(shown[2].chunks[0].tool_result.content) < 1_200
    assert big.chunks[0].tool_result.content == "z" * 5_000  # history keeps it whole
    assert find_tool_output([user, small, big], "c1") == "z" * 5_000
    assert find_tool_output([user], "c1") is None


def test_the_budget_is_at_most_a_quarter_of_the_input_window() -> None:
    assert output_budget(window_for("gpt-4o"), 8_000) == 32_000
    small = window_for("x", window=2_000, reserve=250)
    assert output_budget(small, 8_000) == (1_750 // 4) * 4


BIG = "".join(f"{i:06d} some output of a noisy build\n" for i in range(3_000))  # ~111 000 chars


async def test_a_huge_tool_result_is_stored_whole_sent_cut_and_read_on_demand(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    """Through a real OpenAI-compatible HTTP server: the model is sent the cut result, asks for
    what was left out with read_tool_output, and gets it; history holds every character."""
    call = {
        "index": 0,
        "id": "call_big",
        "function": {"name": "read_file", "arguments": '{"path": "big.log"}'},
    }
    fake_openai.replies += [
        Stream([{"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]}]),
        Stream([]),  # replaced below, once the marker's offset is known
        Stream(text_chunks("Found it.")),
    ]
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(
        provider,
        transport=True,
        agents={"default": AgentConfig(context_window=8_192, output_reserve=1_024, tool_output_budget=500)},
    )
    (stack.workspace / "big.log").write_text(BIG)
    budget = output_budget(window_for("m", window=8_192, reserve=1_024), 500)
    start = int(cut(BIG, budget, "call_big", readable=True).partition("offset=")[2].partition(")")[0])
    read = {
        "index": 0,
        "id": "call_read",
        "function": {
            "name": "read_tool_output",
            "arguments": json.dumps({"tool_call_id": "call_big", "offset": start, "limit": 200}),
        },
    }
    fake_openai.replies[1] = Stream(
        [{"choices": [{"index": 0, "delta": {"tool_calls": [read]}, "finish_reason": "tool_calls"}]}]
    )
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "what failed?")
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == "Found it."

    sent = fake_openai.requests[1]["messages"][-1]
    assert sent["role"] == "tool" and sent["tool_call_id"] == "call_big"
    assert len(sent["content"]) < budget + 300 and "left out here" in sent["content"]
    asked = fake_openai.requests[2]["messages"][-1]
    assert asked["content"].startswith(BIG[start : start + 200])
    assert f"characters {start}-{start + 200} of {len(BIG)}" in asked["content"]
    for request in fake_openai.requests:
        assert all(len(m.get("content") or "") <= budget + 300 for m in request["messages"])
    stored = [
        c.tool_result.content
        for m in await history(stack, conv)
        for c in m.chunks
        if c.HasField("tool_result") and c.tool_result.tool_call_id == "call_big"
    ]
    assert stored == [BIG]


# ------------------------------------------------------------------ compaction (point 3, 4, 5)


class Model:
    """A model that answers by what it is asked (the turn's steps cannot be scripted in order:
    where compaction requests fall depends on the estimates): a summary for a compaction
    request, else a read_file call until ``calls`` have been made, then a final text. It
    reports the request's size as a provider would, and keeps every request."""

    name = "model"
    model = "window-model"
    endpoint = "test:model"

    def __init__(self, calls: int, files: int):
        self.calls, self.files = calls, files
        self.requests: list[ProviderRequest] = []
        self.summaries = 0

    async def stream(self, request: ProviderRequest) -> Any:
        self.requests.append(request)
        if request.system == COMPACTION_PROMPT:
            self.summaries += 1
            yield TextDelta(f"summary {self.summaries}: read files so far; keep going")
            yield Finish(common_pb2.FINISH_REASON_STOP)
            return
        made = sum(1 for m in request.messages for c in m.chunks if c.HasField("tool_call"))
        made += (
            int(re.findall(r"calls made: (\d+)", request.system)[-1]) if "calls made" in request.system else 0
        )
        usage = Usage(input_tokens=estimate_request(request), output_tokens=10)
        n = len([r for r in self.requests if r.system != COMPACTION_PROMPT])
        if n <= self.calls:
            path = f"f{n % self.files}.txt"
            yield ToolCall(f"call{n}", "read_file", json.dumps({"path": path}))
            yield usage
            yield Finish(common_pb2.FINISH_REASON_TOOL_CALLS)
        else:
            yield TextDelta("done")
            yield usage
            yield Finish(common_pb2.FINISH_REASON_STOP)

    async def aclose(self) -> None:
        pass


def events_of(events: list[common_pb2.AgentEvent], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.HasField(kind)]  # type: ignore[arg-type]


SMALL = AgentConfig(context_window=4_096, output_reserve=512, tool_output_budget=200, compact_at=0.8)


async def test_a_long_turn_compacts_and_no_request_exceeds_the_window(make_stack: Any) -> None:
    model = Model(calls=60, files=5)
    stack = await make_stack(model, transport=True, agents={"default": SMALL})
    for i in range(5):
        (stack.workspace / f"f{i}.txt").write_text("".join(f"file {i} line {j:04d}\n" for j in range(200)))
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "read every file, over and over")

    (done,) = events_of(events, "turn_done")
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP and done.steps == 61
    budget = window_for("m", window=4_096, reserve=512).input_budget
    turns = [r for r in model.requests if r.system != COMPACTION_PROMPT]
    assert len(turns) == 61
    assert max(estimate_request(r) for r in model.requests) <= budget
    started, finished = events_of(events, "compaction_started"), events_of(events, "compaction_done")
    assert len(started) == len(finished) == model.summaries >= 3
    assert all(d.tokens_after < d.tokens_before for d in finished)
    assert [d.covers_to_seq for d in finished] == sorted({d.covers_to_seq for d in finished})

    # Nothing is lost: history holds every message whole, and grows by the summaries only.
    messages = await history(stack, conv)
    records = [m for m in messages if m.HasField("compaction")]
    assert len(records) == model.summaries
    assert [m.seq for m in records] == [d.summary_seq for d in finished]
    results = [c.tool_result.content for m in messages for c in m.chunks if c.HasField("tool_result")]
    assert len(results) == 60 and all(len(r) == 200 * len("file 0 line 0000\n") for r in results)
    assert len(messages) == 1 + 60 * 2 + 1 + len(records)
    # A request after a compaction carries its summary, not the messages it covers.
    last = turns[-1]
    assert f"summary {model.summaries}:" in last.system
    covered = finished[-1].covers_to_seq
    assert all(m.seq == 0 or m.seq > covered for m in last.messages)
    # Calls and their results stay together: no request starts with a tool message.
    for request in turns:
        roles = [m.role for m in request.messages]
        assert roles[0] == common_pb2.ROLE_USER
        for i, role in enumerate(roles):
            if role == common_pb2.ROLE_TOOL:
                assert roles[i - 1] == common_pb2.ROLE_ASSISTANT


async def test_a_message_larger_than_the_window_fails_clearly_and_the_next_one_runs(make_stack: Any) -> None:
    model = Model(calls=0, files=1)
    stack = await make_stack(model, transport=True, agents={"default": SMALL})
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "x " * 20_000)
    (error,) = [e for e in events_of(events, "error") if e.fatal]
    assert error.code == "context_window"
    assert "send a shorter message" in error.message and "window of 4096" in error.message
    (done,) = events_of(events, "turn_done")
    assert done.finish_reason == common_pb2.FINISH_REASON_ERROR

    # The next message runs: the huge one is summarised away (history keeps it).
    _, events = await run_turn(stack, conv, "short question")
    assert events_of(events, "compaction_done")
    (done,) = events_of(events, "turn_done")
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    messages = await history(stack, conv)
    assert messages[0].chunks[0].text.text == "x " * 20_000
