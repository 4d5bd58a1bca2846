"""Provider retries at the kernel level: what is retried, the provider_retry events, Retry-After,
the budget, aborting a wait, and the back-off one endpoint's turns share.

The faults come from the fake OpenAI-compatible server (real HTTP on loopback) and
from the scripted provider.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dispatch.kernel.providers.openai import OpenAIProvider
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import ProviderConfig, RetryPolicy
from dispatch.v1 import common_pb2, kernel_pb2
from tests.fakes.openai_server import FakeOpenAI, Hang, Status, Stream, litellm_error, text_chunks
from tests.stack import TENANT, collect, kinds, run_turn, start_stack
from tests.stack import text_chunks as user_text

FAST = RetryPolicy(schedule=(0.01, 0.02), budget=5.0)


def openai(server: FakeOpenAI, request_timeout: float = 120.0) -> OpenAIProvider:
    return OpenAIProvider(
        ProviderConfig(kind="openai", model="m1", base_url=server.base_url, request_timeout=request_timeout)
    )


def retries(events: list[common_pb2.AgentEvent]) -> list[common_pb2.ProviderRetry]:
    return [e.provider_retry for e in events if e.HasField("provider_retry")]


def done(events: list[common_pb2.AgentEvent]) -> common_pb2.TurnDone:
    return next(e.turn_done for e in events if e.HasField("turn_done"))


def text(events: list[common_pb2.AgentEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.HasField("text_delta"))


async def one_turn(
    tmp_path: Path, provider: OpenAIProvider | ScriptedProvider, retry: RetryPolicy = FAST
) -> list[common_pb2.AgentEvent]:
    stack = await start_stack(tmp_path, provider, retry=retry)
    try:
        _, events = await run_turn(stack, await stack.conversation(), "hi")
    finally:
        await stack.stop()
    return events


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Status(503), 503),
        (Status(500), 500),
        (Status(502), 502),
        (Status(504), 504),
        (Status(408), 408),
        (Status(425), 425),
        (Stream(text_chunks("lost"), drop_after=0), 0),  # connection dropped before any output
    ],
    ids=["503", "500", "502", "504", "408", "425", "dropped-before-output"],
)
async def test_a_retryable_failure_before_any_output_is_retried_after_a_provider_retry_event(
    tmp_path: Path, fake_openai: FakeOpenAI, fault: Status | Stream, status: int
) -> None:
    fake_openai.replies += [fault, Stream(text_chunks("recovered"))]
    events = await one_turn(tmp_path, openai(fake_openai))
    [retry] = retries(events)
    assert (retry.attempt, retry.status, retry.delay.ToNanoseconds()) == (1, status, 10_000_000)
    assert retry.reason
    assert retry.HasField("delay")
    # The event comes before the retried attempt's output, in the step it belongs to.
    order = kinds(events)
    assert order.index("provider_retry") < order.index("text_delta")
    assert events[order.index("provider_retry")].step_id.endswith("#0")
    assert text(events) == "recovered"
    assert done(events).finish_reason == common_pb2.FINISH_REASON_STOP
    assert len(fake_openai.requests) == 2


async def test_a_429_waits_out_retry_after_in_seconds(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    fake_openai.replies += [Status(429, headers={"Retry-After": "1"}), Stream(text_chunks("ok"))]
    t0 = time.monotonic()
    events = await one_turn(tmp_path, openai(fake_openai))
    [retry] = retries(events)
    assert (retry.status, retry.delay.ToNanoseconds()) == (429, 1_000_000_000)
    assert time.monotonic() - t0 >= 1.0  # it did wait (the schedule alone says 10 ms)
    assert text(events) == "ok"


async def test_a_failure_after_output_is_not_retried(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    fake_openai.replies += [Stream(text_chunks("half", "more"), drop_after=1), Stream(text_chunks("never"))]
    events = await one_turn(tmp_path, openai(fake_openai))
    assert retries(events) == []
    assert len(fake_openai.requests) == 1
    error = next(e.error for e in events if e.HasField("error"))
    assert error.code == "provider" and error.fatal
    assert done(events).finish_reason == common_pb2.FINISH_REASON_ERROR
    assert text(events) == "half"


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Status(400, '{"error": {"message": "model not found"}}'), "model not found"),
        (Status(401, '{"error": {"message": "bad key"}}'), "bad key"),
        (Stream(["{not json"]), "malformed stream event"),
    ],
    ids=["400", "401", "malformed-sse"],
)
async def test_a_non_retryable_failure_ends_the_turn_with_a_clear_error(
    tmp_path: Path, fake_openai: FakeOpenAI, fault: Status | Stream, message: str
) -> None:
    fake_openai.replies.append(fault)
    events = await one_turn(tmp_path, openai(fake_openai))
    assert retries(events) == []
    error = next(e.error for e in events if e.HasField("error"))
    assert message in error.message
    assert done(events).finish_reason == common_pb2.FINISH_REASON_ERROR
    assert kinds(events)[-1] == "turn_sealed"


# The role chunk real servers send first: it carries no output.
ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}


@pytest.mark.parametrize("code", ["429", "503"])
async def test_a_retryable_error_inside_the_stream_before_any_output_is_retried(
    tmp_path: Path, fake_openai: FakeOpenAI, code: str
) -> None:
    """LiteLLM reports an upstream failure after the headers as ``data: {"error": ...}`` with
    the status in ``code``: before any output, 429 and 503 are retried like the statuses."""
    fake_openai.replies += [
        Stream([ROLE, litellm_error("litellm.RateLimitError: upstream busy", code)]),
        Stream(text_chunks("recovered")),
    ]
    events = await one_turn(tmp_path, openai(fake_openai))
    [retry] = retries(events)
    assert retry.status == int(code)
    assert "litellm.RateLimitError: upstream busy" in retry.reason
    assert text(events) == "recovered"
    assert done(events).finish_reason == common_pb2.FINISH_REASON_STOP
    assert len(fake_openai.requests) == 2


async def test_a_retryable_error_inside_the_stream_after_output_is_not_retried(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.replies += [
        Stream([*text_chunks("half")[:1], litellm_error("litellm.APIError: upstream reset", "503")]),
        Stream(text_chunks("never")),
    ]
    events = await one_turn(tmp_path, openai(fake_openai))
    assert retries(events) == []
    assert len(fake_openai.requests) == 1
    error = next(e.error for e in events if e.HasField("error"))
    assert "litellm.APIError: upstream reset" in error.message
    assert text(events) == "half"


async def test_a_permanent_error_inside_the_stream_ends_the_turn_at_once_with_the_servers_message(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.replies += [
        Stream([ROLE, litellm_error("litellm.BadRequestError: Invalid tool schema for 'shell'", "400")]),
        Stream(text_chunks("never")),
    ]
    events = await one_turn(tmp_path, openai(fake_openai))
    assert retries(events) == []
    assert len(fake_openai.requests) == 1
    error = next(e.error for e in events if e.HasField("error"))
    assert error.code == "provider" and error.fatal
    assert error.message == (
        "provider reported an error mid-stream: "
        "litellm.BadRequestError: Invalid tool schema for 'shell' (HTTP 400)"
    )
    assert done(events).finish_reason == common_pb2.FINISH_REASON_ERROR


async def test_a_hang_before_headers_times_out_per_attempt_and_is_retried(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.replies += [Hang(), Stream(text_chunks("awake"))]
    events = await one_turn(tmp_path, openai(fake_openai, request_timeout=0.3))
    [retry] = retries(events)
    assert retry.status == 0 and "timed out" in retry.reason
    assert text(events) == "awake"


async def test_malformed_tool_call_json_becomes_an_error_result_the_model_reads(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "read_file", "arguments": '{"path": '}}
    fake_openai.replies += [
        Stream(
            [
                {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            ]
        ),
        Stream(text_chunks("I will fix the JSON.")),
    ]
    events = await one_turn(tmp_path, openai(fake_openai))
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.is_error and "JSON" in result.content
    # The model saw the error result in its next request, answering the call.
    tool_messages = [m for m in fake_openai.requests[1]["messages"] if m["role"] == "tool"]
    assert tool_messages == [{"role": "tool", "tool_call_id": "c1", "content": result.content}]
    assert done(events).finish_reason == common_pb2.FINISH_REASON_STOP


async def test_a_spent_budget_ends_the_turn_with_an_error_and_finish_reason_error(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.replies += [Status(503)] * 4
    events = await one_turn(tmp_path, openai(fake_openai), RetryPolicy(schedule=(0.05,), budget=0.12))
    # 0.05 + 0.05 fit in 0.12; a third wait would not.
    assert [r.attempt for r in retries(events)] == [1, 2]
    error = next(e.error for e in events if e.HasField("error"))
    assert error.code == "provider_retry_budget" and "retry budget" in error.message
    assert done(events).finish_reason == common_pb2.FINISH_REASON_ERROR
    assert len(fake_openai.requests) == 3


async def test_the_schedule_runs_in_order_and_repeats_its_last_delay(tmp_path: Path) -> None:
    failing = {"type": "error", "status": 503, "message": "busy", "retryable": True, "times": 4}
    provider = ScriptedProvider.from_data({"steps": [[failing, {"type": "text_delta", "text": "up"}]]})
    events = await one_turn(tmp_path, provider, RetryPolicy(schedule=(0.01, 0.02, 0.03), budget=5.0))
    assert [(r.attempt, r.delay.ToMilliseconds()) for r in retries(events)] == [
        (1, 10),
        (2, 20),
        (3, 30),
        (4, 30),
    ]
    assert text(events) == "up"


async def test_cancel_ends_a_retry_wait_at_once(tmp_path: Path) -> None:
    failing = {"type": "error", "status": 503, "message": "busy", "retryable": True}
    provider = ScriptedProvider.from_data({"steps": [[failing]]})
    stack = await start_stack(tmp_path, provider, retry=RetryPolicy(schedule=(3600.0,), budget=8 * 3600.0))
    try:
        conv = await stack.conversation()
        started = await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=user_text("hi"))
        )
        seen: list[common_pb2.AgentEvent] = []
        collecting = asyncio.create_task(
            collect(stack, conv, started.after_event_seq, until_turn=started.turn_id, sink=seen)
        )
        while "provider_retry" not in kinds(seen):
            await asyncio.sleep(0.01)
        # Cancel answers once the turn has ended: with the hour-long wait still running, it would not.
        await stack.kernel.Cancel(
            kernel_pb2.KernelCancelRequest(tenant_id=TENANT, conversation_id=conv, turn_id=started.turn_id),
            timeout=30,
        )
        events = await collecting
    finally:
        await stack.stop()
    assert done(events).finish_reason == common_pb2.FINISH_REASON_ABORTED


async def test_a_429_holds_every_turn_on_the_endpoint(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    """Turn A's 429 (Retry-After 1 s) makes turn B, started during the hold, wait without
    calling the endpoint; B's first request comes only after the hold."""
    fake_openai.replies += [Status(429, headers={"Retry-After": "1"})]
    stack = await start_stack(tmp_path, openai(fake_openai), retry=FAST)
    try:
        conv_a, conv_b = await stack.conversation(), await stack.conversation()
        a = await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv_a, chunks=user_text("a"))
        )
        seen_a: list[common_pb2.AgentEvent] = []
        collecting_a = asyncio.create_task(
            collect(stack, conv_a, a.after_event_seq, until_turn=a.turn_id, sink=seen_a)
        )
        while "provider_retry" not in kinds(seen_a):
            await asyncio.sleep(0.01)
        held_at = time.monotonic()
        fake_openai.replies += [Stream(text_chunks("a done")), Stream(text_chunks("b done"))]
        _, events_b = await run_turn(stack, conv_b, "b")
        events_a = await collecting_a
    finally:
        await stack.stop()
    assert time.monotonic() - held_at >= 0.5
    [waited] = retries(events_b)
    assert waited.status == 429 and "back-off" in waited.reason
    assert waited.delay.ToMilliseconds() > 500
    # Whichever of A and B asked first after the hold got the first answer.
    assert {text(events_a), text(events_b)} == {"a done", "b done"}
    # Three requests in all: A's 429, then A and B once the hold ended; B never hit the 429.
    assert len(fake_openai.requests) == 3
