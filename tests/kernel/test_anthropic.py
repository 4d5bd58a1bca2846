"""The Anthropic Messages API provider, over real HTTP to a fake server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatch.kernel.providers.anthropic import (
    REDACTED_THINKING_PREFIX,
    AnthropicProvider,
    to_anthropic_messages,
)
from dispatch.kernel.providers.base import (
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
)
from dispatch.shared.config import AgentConfig, ProviderConfig, RetryPolicy
from dispatch.v1 import common_pb2
from tests.fakes.anthropic_server import (
    FakeAnthropic,
    Hang,
    Status,
    Stream,
    block_delta,
    block_start,
    block_stop,
    message_end,
    message_start,
    proxy_error,
    text_block,
    text_reply,
    thinking_block,
    tool_block,
)
from tests.stack import run_turn, start_stack

API_KEY = "sk-ant-secret-key"


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic().start()
    try:
        yield server
    finally:
        await server.stop()


def anthropic(server: FakeAnthropic, **kw: Any) -> AnthropicProvider:
    cfg = ProviderConfig(
        kind="anthropic", model="claude-test", base_url=server.base_url + "/", api_key=API_KEY, **kw
    )
    return AnthropicProvider(cfg)


async def collect(provider: AnthropicProvider, request: ProviderRequest) -> list[ProviderEvent]:
    return [ev async for ev in provider.stream(request)]


async def failure(provider: AnthropicProvider, request: ProviderRequest) -> tuple[ProviderError, list[Any]]:
    """The error a stream ends with, and the events it yielded before."""
    seen: list[ProviderEvent] = []
    with pytest.raises(ProviderError) as err:
        async for ev in provider.stream(request):
            seen.append(ev)
    await provider.aclose()
    assert API_KEY not in str(err.value)
    return err.value, seen


def text(t: str) -> common_pb2.Chunk:
    return common_pb2.Chunk(text=common_pb2.TextChunk(text=t))


def thinking(t: str, signature: str = "") -> common_pb2.Chunk:
    return common_pb2.Chunk(thinking=common_pb2.ThinkingChunk(text=t, signature=signature))


def call(call_id: str, name: str, input_json: str) -> common_pb2.Chunk:
    return common_pb2.Chunk(tool_call=common_pb2.ToolCallChunk(id=call_id, name=name, input_json=input_json))


def result(call_id: str, content: str, *, is_error: bool = False) -> common_pb2.Chunk:
    return common_pb2.Chunk(
        tool_result=common_pb2.ToolResultChunk(
            tool_call_id=call_id, name="t", content=content, is_error=is_error
        )
    )


def msg(role: common_pb2.Role.ValueType, *chunks: common_pb2.Chunk) -> common_pb2.Message:
    return common_pb2.Message(role=role, chunks=chunks)


USER, ASSISTANT, TOOL, SYSTEM = (
    common_pb2.ROLE_USER,
    common_pb2.ROLE_ASSISTANT,
    common_pb2.ROLE_TOOL,
    common_pb2.ROLE_SYSTEM,
)
REQUEST = ProviderRequest(model="", system="be brief", messages=[msg(USER, text("hi"))])
TOOLS = [
    ToolSpec("read_file", "Read a file.", {"type": "object", "properties": {"path": {"type": "string"}}}),
    ToolSpec("list_dir", "List a directory.", {"type": "object"}),
]


# ------------------------------------------------------------------ streaming


async def test_streams_text_and_usage_with_cache_tokens(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(
        Stream(
            [
                message_start(input_tokens=100, cache_read=60, cache_creation=20),
                {"type": "ping"},
                *text_block(0, "Hel", "lo"),
                *message_end("end_turn", output_tokens=7),
            ]
        )
    )
    provider = anthropic(fake_anthropic)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        # input_tokens is the whole prompt: uncached + read from + written to the cache.
        Usage(input_tokens=180, output_tokens=7, cache_read_tokens=60, cache_write_tokens=20),
        Finish(common_pb2.FINISH_REASON_STOP),
    ]
    assert fake_anthropic.paths == ["/v1/messages"]
    assert provider.endpoint == fake_anthropic.base_url + "/v1/messages"


async def test_sends_model_max_tokens_system_tools_and_headers(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(Stream(text_reply("ok")))
    provider = anthropic(fake_anthropic, max_tokens=1234)
    request = ProviderRequest(
        model="claude-override", system="be brief", messages=[msg(USER, text("hi"))], tools=TOOLS
    )
    await collect(provider, request)
    await provider.aclose()
    assert fake_anthropic.requests[0] == {
        "model": "claude-override",
        "max_tokens": 1234,
        "stream": True,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "tools": [
            {
                "name": "read_file",
                "description": "Read a file.",
                "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
            },
            {"name": "list_dir", "description": "List a directory.", "input_schema": {"type": "object"}},
        ],
    }
    headers = fake_anthropic.headers[0]
    assert headers["x-api-key"] == API_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "text/event-stream"
    assert "authorization" not in headers


async def test_omits_empty_system_tools_and_missing_key(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(Stream(text_reply("ok")))
    cfg = ProviderConfig(kind="anthropic", model="claude-test", base_url=fake_anthropic.base_url)
    provider = AnthropicProvider(cfg)
    await collect(provider, ProviderRequest(model="", system="", messages=[msg(USER, text("hi"))]))
    await provider.aclose()
    body = fake_anthropic.requests[0]
    assert body["model"] == "claude-test"  # the provider's model when the request has none
    assert "system" not in body
    assert "tools" not in body
    assert "x-api-key" not in fake_anthropic.headers[0]


async def test_thinking_with_signature_then_text(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(
        Stream(
            [
                message_start(),
                *thinking_block(0, "let me ", "think", signature="c2lnbmVk"),
                *text_block(1, "answer"),
                *message_end(),
            ]
        )
    )
    provider = anthropic(fake_anthropic)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events[:4] == [
        ReasoningDelta("let me "),
        ReasoningDelta("think"),
        # The signature closes the thinking block it belongs to.
        ReasoningDelta("", signature="c2lnbmVk"),
        TextDelta("answer"),
    ]
    assert events[-1] == Finish(common_pb2.FINISH_REASON_STOP)


async def test_redacted_thinking_round_trips(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(
        Stream(
            [
                message_start(),
                block_start(0, {"type": "redacted_thinking", "data": "opaque=="}),
                block_stop(0),
                *text_block(1, "hi"),
                *message_end(),
            ]
        )
    )
    provider = anthropic(fake_anthropic)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    redacted = ReasoningDelta("", signature=REDACTED_THINKING_PREFIX + "opaque==")
    assert events[:2] == [redacted, TextDelta("hi")]
    history = [msg(USER, text("q")), msg(ASSISTANT, thinking("", redacted.signature), text("hi"))]
    assert to_anthropic_messages(history)[1]["content"] == [
        {"type": "redacted_thinking", "data": "opaque=="},
        {"type": "text", "text": "hi"},
    ]


async def test_tool_calls_are_assembled_and_yielded_as_each_block_stops(
    fake_anthropic: FakeAnthropic,
) -> None:
    events = [
        message_start(),
        *text_block(0, "checking"),
        *tool_block(1, "toolu_1", "read_file", '{"pa', 'th": "a', '.txt"}'),
        *tool_block(2, "toolu_2", "list_dir", "", '{"path"', ': "."}'),
        *message_end("tool_use"),
    ]
    second_block = events.index(
        block_start(2, {"type": "tool_use", "id": "toolu_2", "name": "list_dir", "input": {}})
    )
    reply = Stream(events, hold_at=second_block)
    fake_anthropic.replies.append(reply)
    provider = anthropic(fake_anthropic)
    seen: list[ProviderEvent] = []
    async for ev in provider.stream(ProviderRequest("", "", [msg(USER, text("x"))], TOOLS)):
        seen.append(ev)
        if ev == ToolCall("toolu_1", "read_file", '{"path": "a.txt"}'):
            # The server is holding the second block back: the first call came out
            # before anything of the second block was sent, let alone read.
            assert reply.sent == second_block
            reply.release.set()
    await provider.aclose()
    assert seen == [
        TextDelta("checking"),
        ToolCall("toolu_1", "read_file", '{"path": "a.txt"}'),
        ToolCall("toolu_2", "list_dir", '{"path": "."}'),
        Usage(input_tokens=10, output_tokens=5),
        Finish(common_pb2.FINISH_REASON_TOOL_CALLS),
    ]


async def test_tool_use_without_input_deltas_is_an_empty_object(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(
        Stream([message_start(), *tool_block(0, "toolu_1", "list_dir"), *message_end("tool_use")])
    )
    provider = anthropic(fake_anthropic)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events[0] == ToolCall("toolu_1", "list_dir", "{}")


async def test_message_delta_may_update_input_counts_and_unknown_events_are_ignored(
    fake_anthropic: FakeAnthropic,
) -> None:
    fake_anthropic.replies.append(
        Stream(
            [
                message_start(input_tokens=50),
                {"type": "future_event", "whatever": 1},
                block_start(0, {"type": "future_block"}),
                block_delta(0, {"type": "future_delta", "x": 1}),
                block_stop(0),
                *text_block(1, "ok"),
                block_delta(1, {"type": "citations_delta", "citation": {}}),
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"input_tokens": 55, "cache_read_input_tokens": 5, "output_tokens": 9},
                },
                {"type": "message_stop"},
            ]
        )
    )
    provider = anthropic(fake_anthropic)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events == [
        TextDelta("ok"),
        Usage(input_tokens=60, output_tokens=9, cache_read_tokens=5),
        Finish(common_pb2.FINISH_REASON_STOP),
    ]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", common_pb2.FINISH_REASON_STOP),
        ("stop_sequence", common_pb2.FINISH_REASON_STOP),
        ("pause_turn", common_pb2.FINISH_REASON_STOP),
        ("tool_use", common_pb2.FINISH_REASON_TOOL_CALLS),
        ("max_tokens", common_pb2.FINISH_REASON_LENGTH),
        ("refusal", common_pb2.FINISH_REASON_CONTENT_FILTER),
    ],
)
async def test_stop_reasons(
    fake_anthropic: FakeAnthropic, stop_reason: str, finish: common_pb2.FinishReason.ValueType
) -> None:
    fake_anthropic.replies.append(Stream(text_reply("x", stop_reason=stop_reason)))
    provider = anthropic(fake_anthropic)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events[-1] == Finish(finish)
    assert isinstance(events[-2], Usage)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("reply", "retryable", "retry_after"),
    [
        (Status(429, headers={"retry-after": "7"}), True, 7.0),
        (Status(529), True, None),
        (Status(503), True, None),
        (
            Status(
                400,
                json.dumps(
                    {
                        "type": "error",
                        "error": {"type": "invalid_request_error", "message": "max_tokens: too big"},
                    }
                ),
            ),
            False,
            None,
        ),
        (Status(401), False, None),
    ],
    ids=["429", "529", "503", "400", "401"],
)
async def test_http_errors(
    fake_anthropic: FakeAnthropic, reply: Status, retryable: bool, retry_after: float | None
) -> None:
    fake_anthropic.replies.append(reply)
    err, _ = await failure(anthropic(fake_anthropic), REQUEST)
    assert (err.status, err.retryable, err.retry_after) == (reply.status, retryable, retry_after)
    if reply.status == 400:
        assert "invalid_request_error: max_tokens: too big" in str(err)


async def test_a_base_url_ending_in_v1_works_too(fake_anthropic: FakeAnthropic) -> None:
    """LiteLLM and other proxies are often given as .../v1, like OpenAI base URLs."""
    fake_anthropic.replies.append(Stream(text_reply("ok")))
    provider = AnthropicProvider(
        ProviderConfig(
            kind="anthropic", model="m", base_url=fake_anthropic.base_url + "/v1/", api_key=API_KEY
        )
    )
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events[0] == TextDelta("ok")
    assert fake_anthropic.paths == ["/v1/messages"]
    assert provider.endpoint == fake_anthropic.base_url + "/v1/messages"


async def test_a_404_names_the_url_that_was_called(fake_anthropic: FakeAnthropic) -> None:
    cfg = ProviderConfig(
        kind="anthropic", model="m", base_url=fake_anthropic.base_url + "/api", api_key=API_KEY
    )
    err, _ = await failure(AnthropicProvider(cfg), REQUEST)
    assert fake_anthropic.paths == ["/api/v1/messages"]
    assert (err.status, err.retryable) == (404, False)
    assert str(err) == (
        f"provider answered 404 to POST {fake_anthropic.base_url}/api/v1/messages: "
        "not_found_error: no such path; check the provider's base_url and model (HTTP 404)"
    )


async def test_a_400_names_the_url_and_keeps_the_servers_message(fake_anthropic: FakeAnthropic) -> None:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "tools: bad schema"}}
    fake_anthropic.replies.append(Status(400, json.dumps(body)))
    err, _ = await failure(anthropic(fake_anthropic), REQUEST)
    assert f"POST {fake_anthropic.base_url}/v1/messages: invalid_request_error: tools: bad schema" in str(err)


async def test_http_error_body_is_truncated(fake_anthropic: FakeAnthropic) -> None:
    message = "x" * 5000
    body = json.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
    fake_anthropic.replies.append(Status(400, body))
    err, _ = await failure(anthropic(fake_anthropic), REQUEST)
    assert len(err.message) < 600


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [("overloaded_error", True), ("api_error", True), ("invalid_request_error", False)],
)
async def test_error_event_mid_stream(
    fake_anthropic: FakeAnthropic, error_type: str, retryable: bool
) -> None:
    fake_anthropic.replies.append(
        Stream(
            [
                message_start(),
                block_start(0, {"type": "text", "text": ""}),
                block_delta(0, {"type": "text_delta", "text": "a"}),
                {"type": "error", "error": {"type": error_type, "message": "Overloaded"}},
            ]
        )
    )
    err, seen = await failure(anthropic(fake_anthropic), REQUEST)
    assert seen == [TextDelta("a")]
    assert err.retryable is retryable
    assert error_type in str(err) and "Overloaded" in str(err)


@pytest.mark.parametrize(
    ("frame", "status", "retryable", "message"),
    [
        (
            proxy_error("litellm.BadRequestError: AnthropicException - bad schema", "400"),
            400,
            False,
            "bad schema",
        ),
        ({"error": {"message": "prompt is too long", "code": "400"}}, 400, False, "prompt is too long"),
        (proxy_error("litellm.RateLimitError: slow down", "429"), 429, True, "slow down"),
        (proxy_error("litellm.InternalServerError: Overloaded", "529"), 529, True, "Overloaded"),
        (proxy_error("litellm.ServiceUnavailableError: no upstream", "503"), 503, True, "no upstream"),
    ],
    ids=["litellm-400", "minimal-400", "429", "529", "503"],
)
async def test_a_proxy_error_frame_without_event_or_type_ends_the_stream_with_its_message(
    fake_anthropic: FakeAnthropic, frame: dict[str, Any], status: int, retryable: bool, message: str
) -> None:
    """What LiteLLM's /v1/messages sends when its upstream fails after the headers: a bare
    ``data: {"error": {...}}`` with no ``event:`` line and no type, the status in ``code``."""
    fake_anthropic.replies.append(Stream([message_start(), frame, *text_block(0, "never"), *message_end()]))
    err, seen = await failure(anthropic(fake_anthropic), REQUEST)
    assert seen == []
    assert (err.status, err.retryable) == (status, retryable)
    assert message in str(err)
    assert "ended before the response was complete" not in str(err)
    assert "None" not in str(err) and "{" not in str(err)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
async def test_connection_dropped_mid_stream_is_retryable(
    fake_anthropic: FakeAnthropic, chunked: bool
) -> None:
    fake_anthropic.replies.append(Stream(text_reply("a", "b", "c"), drop_after=3, chunked=chunked))
    err, seen = await failure(anthropic(fake_anthropic), REQUEST)
    assert err.retryable
    assert seen == [TextDelta("a")]


async def test_stream_ending_cleanly_without_message_stop_is_retryable(fake_anthropic: FakeAnthropic) -> None:
    events = text_reply("a")[:-1]  # everything but message_stop, then a clean close
    fake_anthropic.replies.append(Stream(events, chunked=False))
    err, seen = await failure(anthropic(fake_anthropic), REQUEST)
    assert err.retryable
    assert "ended before the response was complete" in str(err)
    assert seen == [TextDelta("a")]


async def test_malformed_data_line_is_a_clear_error(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(Stream([message_start(), ("content_block_delta", "{not json")]))
    err, _ = await failure(anthropic(fake_anthropic), REQUEST)
    assert "malformed stream event" in str(err)
    assert not err.retryable


async def test_hang_before_headers_times_out(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(Hang())
    err, _ = await failure(anthropic(fake_anthropic, request_timeout=0.3), REQUEST)
    assert err.retryable
    assert "timed out" in str(err)


async def test_connection_refused_is_retryable() -> None:
    provider = AnthropicProvider(
        ProviderConfig(kind="anthropic", model="m", base_url="http://127.0.0.1:9", api_key=API_KEY)
    )
    err, _ = await failure(provider, REQUEST)
    assert err.retryable
    assert "connection failed" in str(err)


async def test_api_key_echoed_by_the_server_is_redacted(fake_anthropic: FakeAnthropic) -> None:
    body = json.dumps(
        {"type": "error", "error": {"type": "authentication_error", "message": f"bad key {API_KEY}"}}
    )
    fake_anthropic.replies.append(Status(401, body))
    fake_anthropic.replies.append(
        Stream([message_start(), {"type": "error", "error": {"type": "api_error", "message": API_KEY}}])
    )
    fake_anthropic.replies.append(Stream([("message_start", f"{{{API_KEY}")]))
    for _ in range(3):
        err, _ = await failure(anthropic(fake_anthropic), REQUEST)  # asserts the key is absent
        assert "[redacted]" in str(err)


async def test_aclose_leaves_a_client_it_was_given_open(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(Stream(text_reply("ok")))
    async with httpx.AsyncClient() as client:
        cfg = ProviderConfig(kind="anthropic", model="m", base_url=fake_anthropic.base_url)
        provider = AnthropicProvider(cfg, client=client)
        await provider.aclose()
        assert not client.is_closed
        events = [e async for e in provider.stream(REQUEST)]
        assert events[0] == TextDelta("ok")


# -------------------------------------------------------------------- history


def test_history_conversion_merges_roles_and_keeps_only_signed_thinking() -> None:
    history = [
        msg(SYSTEM, text("workspace is /srv")),
        msg(USER, text("list files")),
        msg(ASSISTANT, thinking("unsigned"), text(""), call("c1", "list_dir", '{"path": "."}')),
        msg(TOOL, result("c1", "a.txt\nb.txt")),
        msg(USER, text("also read b")),  # steering after the tool results
        msg(
            ASSISTANT,
            thinking("plan", "sig1"),
            text("reading"),
            call("c2", "read_file", '{"path": "a.txt"}'),
            call("c3", "read_file", "{oops"),
            call("c4", "read_file", "[1, 2]"),
        ),
        msg(TOOL, result("c2", "A"), result("c3", "", is_error=True), result("c4", "")),
        msg(ASSISTANT, thinking("only unsigned thinking")),  # nothing to send: skipped
        msg(USER, text("  ")),  # whitespace only: skipped
        msg(USER, text("thanks")),
    ]
    assert to_anthropic_messages(history) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "workspace is /srv"},
                {"type": "text", "text": "list files"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "c1", "name": "list_dir", "input": {"path": "."}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "a.txt\nb.txt", "is_error": False},
                {"type": "text", "text": "also read b"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "plan", "signature": "sig1"},
                {"type": "text", "text": "reading"},
                {"type": "tool_use", "id": "c2", "name": "read_file", "input": {"path": "a.txt"}},
                # Inputs that are not a JSON object are sent as {}.
                {"type": "tool_use", "id": "c3", "name": "read_file", "input": {}},
                {"type": "tool_use", "id": "c4", "name": "read_file", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c2", "content": "A", "is_error": False},
                {
                    "type": "tool_result",
                    "tool_use_id": "c3",
                    "content": "the tool failed without output",
                    "is_error": True,
                },
                {"type": "tool_result", "tool_use_id": "c4", "is_error": False},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


def test_history_conversion_puts_tool_results_first_in_a_merged_user_message() -> None:
    history = [
        msg(USER, text("go")),
        msg(ASSISTANT, call("c1", "list_dir", "{}")),
        msg(SYSTEM, text("note: approval granted")),
        msg(TOOL, result("c1", "ok")),
    ]
    assert to_anthropic_messages(history)[2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "ok", "is_error": False},
            {"type": "text", "text": "note: approval granted"},
        ],
    }


async def test_history_is_sent_converted(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.replies.append(Stream(text_reply("done")))
    history = [
        msg(USER, text("list")),
        msg(ASSISTANT, thinking("t", "sig"), call("c1", "list_dir", '{"path": "."}')),
        msg(TOOL, result("c1", "a.txt")),
    ]
    provider = anthropic(fake_anthropic)
    await collect(provider, ProviderRequest("", "", history))
    await provider.aclose()
    assert fake_anthropic.requests[0]["messages"] == to_anthropic_messages(history)
    assert [m["role"] for m in fake_anthropic.requests[0]["messages"]] == ["user", "assistant", "user"]


# ------------------------------------------------------- through a kernel turn


async def test_a_turn_keeps_each_signed_thinking_block_and_sends_it_back(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    """Two signed thinking blocks and a tool call in step 0: step 1's request carries both
    blocks with their own signatures, the tool_use, and its tool_result; the wrap-up of a
    one-step agent disables tools with tool_choice none."""
    fake_anthropic.replies += [
        Stream(
            [
                message_start(),
                *thinking_block(0, "First, ", "look.", signature="sig-one"),
                *thinking_block(1, "Then list.", signature="sig-two"),
                *tool_block(2, "toolu_1", "list_dir", '{"path":', ' "."}'),
                *message_end("tool_use"),
            ]
        ),
        Stream(text_reply("Empty.")),
    ]
    stack = await start_stack(tmp_path, anthropic(fake_anthropic), agents={"default": AgentConfig(steps=1)})
    try:
        _, events = await run_turn(stack, await stack.conversation(), "what is here?")
    finally:
        await stack.stop()
    assert [e.reasoning_delta.text for e in events if e.HasField("reasoning_delta")] == [
        "First, ",
        "look.",
        "Then list.",
    ]
    second = fake_anthropic.requests[1]
    assistant = second["messages"][1]
    assert assistant["role"] == "assistant"
    assert [b["type"] for b in assistant["content"]] == ["thinking", "thinking", "tool_use"]
    assert [(b["thinking"], b["signature"]) for b in assistant["content"][:2]] == [
        ("First, look.", "sig-one"),
        ("Then list.", "sig-two"),
    ]
    assert assistant["content"][2]["input"] == {"path": "."}
    results = second["messages"][2]["content"]
    assert results[0]["type"] == "tool_result" and results[0]["tool_use_id"] == "toolu_1"
    assert second["tool_choice"] == {"type": "none"}  # the wrap-up step of a 1-step agent
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    assert done.finish_reason == common_pb2.FINISH_REASON_MAX_STEPS


async def test_a_turn_ends_at_once_on_a_proxy_error_frame_with_a_permanent_code(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    """Before, the frame was skipped: the stream looked cut off, and the turn retried until
    the budget ran out, the server's message lost."""
    fake_anthropic.replies.append(
        Stream([message_start(), proxy_error("litellm.BadRequestError: bad", "400")])
    )
    retry = RetryPolicy(schedule=(0.01,), budget=0.05)
    stack = await start_stack(tmp_path, anthropic(fake_anthropic), retry=retry)
    try:
        _, events = await run_turn(stack, await stack.conversation(), "hi")
    finally:
        await stack.stop()
    assert not any(e.HasField("provider_retry") for e in events)
    assert len(fake_anthropic.requests) == 1
    error = next(e.error for e in events if e.HasField("error"))
    assert (error.code, error.fatal) == ("provider", True)
    assert error.message == "provider reported an error mid-stream: litellm.BadRequestError: bad (HTTP 400)"
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    assert done.finish_reason == common_pb2.FINISH_REASON_ERROR


async def test_a_proxy_error_frame_with_a_retryable_code_is_retried_before_any_output(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.replies += [
        Stream([message_start(), proxy_error("litellm.InternalServerError: Overloaded", "529")]),
        Stream(text_reply("back")),
    ]
    retry = RetryPolicy(schedule=(0.01,), budget=5.0)
    stack = await start_stack(tmp_path, anthropic(fake_anthropic), retry=retry)
    try:
        _, events = await run_turn(stack, await stack.conversation(), "hi")
    finally:
        await stack.stop()
    [retried] = [e.provider_retry for e in events if e.HasField("provider_retry")]
    assert retried.status == 529 and "Overloaded" in retried.reason
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == "back"


async def test_a_wrap_up_asked_again_keeps_the_tools_declared_when_history_calls_them(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    """The Messages API refuses tool_use blocks in history without tool definitions: asking
    again for a wrap-up that called a tool keeps the tools, with tool_choice none."""
    fake_anthropic.replies += [
        Stream(
            [
                message_start(),
                *tool_block(0, "toolu_1", "list_dir", '{"path": "."}'),
                *message_end("tool_use"),
            ]
        ),
        Stream(
            [
                message_start(),
                *thinking_block(0, "one more look", signature="sig-dropped"),
                *tool_block(1, "toolu_2", "list_dir", '{"path": "."}'),
                *message_end("tool_use"),
            ]
        ),
        Stream(text_reply("The workspace is empty.")),
    ]
    stack = await start_stack(tmp_path, anthropic(fake_anthropic), agents={"default": AgentConfig(steps=1)})
    try:
        conv = await stack.conversation()
        _, events = await run_turn(stack, conv, "what is here?")
        fake_anthropic.replies.append(Stream(text_reply("ok")))
        await run_turn(stack, conv, "thanks")
    finally:
        await stack.stop()
    again = fake_anthropic.requests[2]
    assert [t["name"] for t in again["tools"]] and again["tool_choice"] == {"type": "none"}
    assert "called list_dir" in again["messages"][-1]["content"][-1]["text"]
    said = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert said == "The workspace is empty."
    assert [e.error.code for e in events if e.HasField("error")] == ["tool_call_ignored"]
    done = next(e.turn_done for e in events if e.HasField("turn_done"))
    assert done.finish_reason == common_pb2.FINISH_REASON_MAX_STEPS
    # The dropped answer's signed thinking does not go back with the wrap-up's text.
    wrap_up = fake_anthropic.requests[3]["messages"][-2]
    assert wrap_up == {"role": "assistant", "content": [{"type": "text", "text": "The workspace is empty."}]}
