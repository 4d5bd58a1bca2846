"""The kernel's step loop, against real in-process store and exec services."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispatch.kernel.providers.openai import OpenAIProvider
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import ProviderConfig, StoreConfig
from dispatch.store.server import start as start_store
from dispatch.v1 import common_pb2, kernel_pb2, store_pb2
from tests.fakes.openai_server import FakeOpenAI, Stream, text_chunks
from tests.stack import TENANT, Stack, collect, kinds, run_turn, start_stack
from tests.stack import text_chunks as user_text


def scripted(*steps: list[dict[str, Any]]) -> ScriptedProvider:
    return ScriptedProvider.from_data({"steps": list(steps)})


async def history(stack: Stack, conversation_id: str) -> list[common_pb2.Message]:
    resp = await stack.store.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conversation_id))
    return list(resp.messages)


LIST_THEN_ANSWER: tuple[list[dict[str, Any]], ...] = (
    [
        {"type": "reasoning_delta", "text": "look first"},
        {"type": "tool_call", "id": "c1", "name": "list_dir", "input": {"path": "."}},
        {"type": "usage", "input_tokens": 20, "output_tokens": 5, "cache_read_tokens": 8},
    ],
    [
        {"type": "text_delta", "text": "It has "},
        {"type": "text_delta", "text": "a.txt."},
        {"type": "usage", "input_tokens": 40, "output_tokens": 6},
    ],
)


async def test_two_step_turn_streams_commits_and_seals(make_stack: Any) -> None:
    stack = await make_stack(scripted(*LIST_THEN_ANSWER))
    (stack.workspace / "a.txt").write_text("hi")
    conv = await stack.conversation()
    started, events = await run_turn(stack, conv, "what is here?")
    turn = started.turn_id
    assert kinds(events) == [
        "turn_started",
        "messages_committed",  # the user message
        "reasoning_delta",
        "tool_call",
        "usage",
        "tool_started",
        "tool_result",
        "messages_committed",  # step 0: assistant + tool result
        "step_completed",
        "text_delta",
        "text_delta",
        "usage",
        "messages_committed",  # step 1
        "step_completed",
        "turn_done",
        "turn_sealed",
    ]
    assert [e.event_seq for e in events] == list(range(1, len(events) + 1))
    by_kind = {k: e for k, e in zip(kinds(events), events, strict=True)}
    assert by_kind["tool_call"].step_id == by_kind["tool_result"].step_id == f"{turn}#0"
    assert by_kind["text_delta"].step_id == f"{turn}#1"
    assert by_kind["tool_result"].tool_result.content == "a.txt (2 bytes)"
    committed = [e.messages_committed for e in events if e.HasField("messages_committed")]
    assert [(c.first_seq, c.last_seq) for c in committed] == [(1, 1), (2, 3), (4, 4)]
    done = by_kind["turn_done"].turn_done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.cache_read_tokens) == (60, 11, 8)
    assert done.context_size == 46  # the last step's input + output, not the sum
    assert done.steps == 2
    assert by_kind["turn_sealed"].turn_sealed.last_seq == 4

    messages = await history(stack, conv)
    assert [m.role for m in messages] == [
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
        common_pb2.ROLE_TOOL,
        common_pb2.ROLE_ASSISTANT,
    ]
    assert [c.WhichOneof("kind") for c in messages[1].chunks] == ["thinking", "tool_call"]
    assert messages[1].chunks[1].tool_call.step_id == f"{turn}#0"
    assert messages[2].chunks[0].tool_result.step_id == f"{turn}#0"
    assert messages[3].chunks[0].text.text == "It has a.txt."
    assert all(m.turn_id == turn for m in messages)
    row = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn))
    assert row.state == common_pb2.TURN_STATE_COMPLETED
    assert row.finish_reason == common_pb2.FINISH_REASON_STOP
    assert row.user_message_seq == 1


async def test_events_are_persisted_and_replay_exactly_once_after_the_turn(make_stack: Any) -> None:
    stack = await make_stack(scripted(*LIST_THEN_ANSWER))
    conv = await stack.conversation()
    _, live = await run_turn(stack, conv, "go")
    for after in (0, 4, len(live) - 1):
        replayed = await collect(stack, conv, after)
        assert replayed == live[after:]
    stored = await stack.store.LoadEvents(store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv))
    assert list(stored.events) == live


async def test_second_turn_sees_the_first_in_its_request_and_continues_event_seq(make_stack: Any) -> None:
    provider = ScriptedProvider.from_data(
        {
            "turns": [
                {"steps": [[{"type": "text_delta", "text": "one"}]]},
                {"steps": [[{"type": "text_delta", "text": "two"}]]},
            ]
        }
    )
    stack = await make_stack(provider)
    conv = await stack.conversation()
    _, first = await run_turn(stack, conv, "a")
    second_start, second = await run_turn(stack, conv, "b")
    assert second_start.after_event_seq == first[-1].event_seq
    assert second[0].event_seq == first[-1].event_seq + 1
    assert "".join(e.text_delta.text for e in second if e.HasField("text_delta")) == "two"
    assert [m.seq for m in await history(stack, conv)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            {"name": "no_such_tool", "input": {}},
            "unknown tool 'no_such_tool'; available tools: "
            "edit_file, glob, grep, list_dir, read_file, read_tool_output, shell, write_file",
        ),
        ({"name": "read_file", "input": {}}, "invalid input for read_file: 'path' is a required property"),
        (
            {"name": "read_file", "input": {"path": "a", "offset": -1}},
            "invalid input for read_file at 'offset'",
        ),
        ({"name": "read_file", "input": {"path": "missing.txt"}}, "read_file failed:"),
        ({"name": "shell", "input": {"command": "exit 3"}}, "[exit code 3]"),
    ],
)
async def test_tool_failures_are_error_results_the_model_can_read(
    make_stack: Any, call: dict[str, Any], expected: str
) -> None:
    stack = await make_stack(
        scripted([{"type": "tool_call", **call}], [{"type": "text_delta", "text": "ok"}])
    )
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "go")
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.is_error
    assert expected in result.content
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP  # the turn went on


async def test_shell_streams_output_as_tool_output_events(make_stack: Any) -> None:
    command = "echo out; echo err >&2; pwd"
    stack = await make_stack(
        scripted(
            [{"type": "tool_call", "name": "shell", "input": {"command": command}}],
            [{"type": "text_delta", "text": "k"}],
        )
    )
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "go")
    outputs = [e.tool_output for e in events if e.HasField("tool_output")]
    streams = {o.stream: b"".join(x.data for x in outputs if x.stream == o.stream) for o in outputs}
    assert streams[common_pb2.OUTPUT_STREAM_STDOUT] == f"out\n{stack.workspace}\n".encode()
    assert streams[common_pb2.OUTPUT_STREAM_STDERR] == b"err\n"
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert not result.is_error
    assert result.content.endswith("[exit code 0]")
    call_event = next(e for e in events if e.HasField("tool_call"))
    assert all(e.step_id == call_event.step_id for e in events if e.HasField("tool_output"))


async def test_provider_failure_ends_the_turn_with_an_error_keeping_partial_text(make_stack: Any) -> None:
    stack = await make_stack(
        scripted(
            [
                {"type": "text_delta", "text": "partial"},
                {"type": "error", "status": 400, "message": "bad request"},
            ]
        )
    )
    conv = await stack.conversation()
    started, events = await run_turn(stack, conv, "go")
    error = next(e.error for e in events if e.HasField("error"))
    assert (error.code, error.fatal) == ("provider", True)
    assert "bad request" in error.message
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    assert done.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert events[-1].turn_sealed.state == common_pb2.TURN_STATE_FAILED
    messages = await history(stack, conv)
    assert [c.text.text for c in messages[-1].chunks] == ["partial"]
    row = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=started.turn_id))
    assert (row.state, row.error_message) == (common_pb2.TURN_STATE_FAILED, "bad request (HTTP 400)")


async def test_cancel_during_a_long_tool_aborts_at_once_and_leaves_no_dangling_call(make_stack: Any) -> None:
    stack = await make_stack(
        ScriptedProvider.from_data(
            {
                "turns": [
                    {
                        "steps": [
                            [
                                {"type": "text_delta", "text": "sleeping"},
                                {"type": "tool_call", "name": "shell", "input": {"command": "sleep 60"}},
                            ]
                        ]
                    },
                    {"steps": [[{"type": "text_delta", "text": "awake"}]]},
                ]
            }
        )
    )
    conv = await stack.conversation()
    started = await stack.kernel.StartTurn(
        kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=user_text("sleep"))
    )
    events: list[common_pb2.AgentEvent] = []
    watcher = asyncio.create_task(
        collect(stack, conv, started.after_event_seq, until_turn=started.turn_id, sink=events)
    )
    # Wait until the shell is running, then cancel.
    while not any(e.HasField("tool_call") for e in events):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    cancelled = await stack.kernel.Cancel(
        kernel_pb2.KernelCancelRequest(tenant_id=TENANT, conversation_id=conv), timeout=5
    )
    assert cancelled.turn_id == started.turn_id
    await asyncio.wait_for(watcher, 5)
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert (result.content, result.is_error) == ("Aborted", True)
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    assert done.finish_reason == common_pb2.FINISH_REASON_ABORTED
    assert events[-1].turn_sealed.state == common_pb2.TURN_STATE_ABORTED
    messages = await history(stack, conv)
    # The step keeps its text but not its tool call, and no tool result is stored.
    assert [m.role for m in messages] == [common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT]
    assert [c.WhichOneof("kind") for c in messages[1].chunks] == ["text"]
    # The conversation takes the next message at once.
    _, next_events = await run_turn(stack, conv, "wake up")
    assert next_events[-1].turn_sealed.state == common_pb2.TURN_STATE_COMPLETED


async def test_send_policies_while_a_turn_runs(make_stack: Any) -> None:
    stack = await make_stack(
        ScriptedProvider.from_data(
            {
                "turns": [
                    {"steps": [[{"type": "sleep", "seconds": 30}]]},
                    {"steps": [[{"type": "text_delta", "text": "new"}]]},
                ]
            }
        )
    )
    conv = await stack.conversation()
    first = await stack.kernel.StartTurn(
        kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=user_text("slow"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(
                tenant_id=TENANT,
                conversation_id=conv,
                chunks=user_text("x"),
                policy=common_pb2.SEND_POLICY_REJECT,
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first.turn_id in (err.value.details() or "") and "has a running turn" in (
        err.value.details() or ""
    )
    _, events = await run_turn(stack, conv, "replace it", policy=common_pb2.SEND_POLICY_INTERRUPT)
    assert events[-1].turn_sealed.state == common_pb2.TURN_STATE_COMPLETED
    row = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=first.turn_id))
    assert row.state == common_pb2.TURN_STATE_ABORTED


@pytest.mark.parametrize(
    ("conversation", "chunks", "code"),
    [
        ("conv_00000000000000000000000000", user_text("hi"), grpc.StatusCode.NOT_FOUND),
        (None, [], grpc.StatusCode.INVALID_ARGUMENT),
        (None, user_text(""), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_start_turn_requests(
    make_stack: Any, conversation: str | None, chunks: list[common_pb2.Chunk], code: grpc.StatusCode
) -> None:
    stack = await make_stack(scripted([{"type": "text_delta", "text": "x"}]))
    conv = conversation or await stack.conversation()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=chunks)
        )
    assert err.value.code() == code


async def test_another_tenant_cannot_start_or_watch_a_turn(make_stack: Any) -> None:
    stack = await make_stack(scripted([{"type": "text_delta", "text": "x"}]))
    conv = await stack.conversation()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(tenant_id="intruder", conversation_id=conv, chunks=user_text("hi"))
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_max_steps_ends_the_turn_with_its_finish_reason(make_stack: Any) -> None:
    loop_step = [{"type": "tool_call", "name": "list_dir", "input": {}}]
    stack = await make_stack(scripted(loop_step, loop_step, loop_step), max_steps=2)
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "go")
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    # Two steps ran their tools; a third, the wrap-up, had tools disabled (its call was ignored).
    assert (done.finish_reason, done.steps) == (common_pb2.FINISH_REASON_MAX_STEPS, 3)
    assert kinds(events).count("tool_result") == 2
    assert kinds(events).count("tool_call") == 2


async def test_a_turn_through_a_real_openai_compatible_http_server(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "call_a", "function": {"name": "list_dir", "arguments": '{"path": "."}'}}
    fake_openai.replies += [
        Stream([{"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]}]),
        Stream(text_chunks("Nothing ", "much.", usage={"prompt_tokens": 50, "completion_tokens": 3})),
    ]
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    stack = await make_stack(provider)
    conv = await stack.conversation()
    _, events = await run_turn(stack, conv, "what is here?")
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == "Nothing much."
    second = fake_openai.requests[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool"]
    assert second[2]["tool_calls"][0]["id"] == "call_a"
    assert second[3] == {"role": "tool", "tool_call_id": "call_a", "content": f"{stack.workspace} is empty"}
    assert [t["function"]["name"] for t in fake_openai.requests[0]["tools"]] == [
        "list_dir",
        "read_file",
        "write_file",
        "edit_file",
        "glob",
        "grep",
        "shell",
        "read_tool_output",
    ]
    list_dir = fake_openai.requests[0]["tools"][0]["function"]
    assert list_dir["parameters"]["properties"]["path"]["type"] == "string"


async def _store_back(stack: Stack, tmp_path: Path) -> None:
    """Start the stack's store again, on its old port and database (it was stopped)."""
    port = stack.hosted["store"].port
    stack.hosted["store"] = await start_store(
        StoreConfig(
            listen=f"127.0.0.1:{port}",
            database_url=f"sqlite:///{tmp_path / 'store.db'}",
            default_workspace_root=str(tmp_path),
        )
    )


@pytest.mark.parametrize("outage", ["short", "long"])
async def test_a_store_outage_mid_turn_is_waited_out_or_ends_the_turn_sealed_once_the_store_is_back(
    tmp_path: Path, outage: str
) -> None:
    # Writes are retried for store_outage seconds. A short outage: the turn goes on as if
    # nothing happened. A long one: the turn ends with a clear error, and its end (state,
    # seal) is written once the store is back; subscribers see turn_sealed then.
    stack = await start_stack(
        tmp_path,
        scripted(
            [{"type": "tool_call", "id": "c1", "name": "list_dir", "input": {}}],
            [{"type": "sleep", "seconds": 0.3}, {"type": "text_delta", "text": "after the outage"}],
        ),
        store_outage=5.0 if outage == "short" else 0.3,
    )
    try:
        conv = await stack.conversation()
        started = await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=user_text("go"))
        )
        events: list[common_pb2.AgentEvent] = []
        watcher = asyncio.create_task(
            collect(stack, conv, started.after_event_seq, until_turn=started.turn_id, sink=events)
        )
        # The user message and step 0 are committed; then the store goes away.
        while kinds(events).count("messages_committed") < 2:
            await asyncio.sleep(0.01)
        await stack.hosted["store"].stop(0)
        if outage == "long":
            while not any(e.HasField("turn_done") for e in events):
                await asyncio.sleep(0.01)
            assert not any(e.HasField("turn_sealed") for e in events)  # not before it is written
        else:
            await asyncio.sleep(1.0)
        await _store_back(stack, tmp_path)
        await asyncio.wait_for(watcher, 30)
        turn = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=started.turn_id))
        loaded = await history(stack, conv)
        persisted = await stack.store.LoadEvents(
            store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv)
        )
    finally:
        await stack.stop()
    assert events[-1].HasField("turn_sealed")
    assert [e.event_seq for e in persisted.events][-1] == events[-1].event_seq  # the seal is persisted
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    # What was committed before the outage is all there.
    assert loaded[2].chunks[0].tool_result.tool_call_id == "c1"
    if outage == "short":
        assert done.finish_reason == common_pb2.FINISH_REASON_STOP
        assert turn.state == common_pb2.TURN_STATE_COMPLETED
        assert loaded[-1].chunks[-1].text.text == "after the outage"
        assert not any(e.HasField("error") for e in events)
    else:
        errors = [e.error for e in events if e.HasField("error")]
        assert errors[0].code == "store" and errors[0].fatal
        assert errors[0].message.startswith("the store was unavailable for")
        assert "127.0.0.1" not in errors[0].message
        assert done.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert turn.state == common_pb2.TURN_STATE_FAILED
        assert [m.role for m in loaded] == [
            common_pb2.ROLE_USER,
            common_pb2.ROLE_ASSISTANT,
            common_pb2.ROLE_TOOL,
        ]


async def test_after_an_abort_the_next_request_to_the_model_has_no_dangling_call(
    make_stack: Any, fake_openai: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "shell", "arguments": '{"command": "sleep 60"}'}}
    fake_openai.replies += [
        Stream(
            [
                {"choices": [{"index": 0, "delta": {"content": "Sleeping."}}]},
                {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]},
            ]
        ),
        Stream(text_chunks("Awake.")),
    ]
    stack = await make_stack(
        OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.base_url))
    )
    conv = await stack.conversation()
    started = await stack.kernel.StartTurn(
        kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=user_text("sleep"))
    )
    events: list[common_pb2.AgentEvent] = []
    watcher = asyncio.create_task(
        collect(stack, conv, started.after_event_seq, until_turn=started.turn_id, sink=events)
    )
    while not any(e.HasField("tool_output") or e.HasField("tool_call") for e in events):
        await asyncio.sleep(0.01)
    await stack.kernel.Cancel(
        kernel_pb2.KernelCancelRequest(tenant_id=TENANT, conversation_id=conv), timeout=10
    )
    await asyncio.wait_for(watcher, 10)
    assert next(e.tool_result for e in events if e.HasField("tool_result")).content == "Aborted"
    await run_turn(stack, conv, "wake up")
    messages = fake_openai.requests[1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2] == {"role": "assistant", "content": "Sleeping."}  # text kept, call dropped
