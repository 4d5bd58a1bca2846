"""Providers: the OpenAI-compatible one over real HTTP to a fake server, the
scripted one, and the built-in demo."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import pytest

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
from dispatch.kernel.providers.demo import DemoProvider
from dispatch.kernel.providers.openai import OpenAIProvider, max_tokens_field, parse_retry_after
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import ConfigError, ProviderConfig
from dispatch.v1 import common_pb2
from tests.fakes.openai_server import (
    FakeOpenAI,
    Hang,
    Status,
    Stream,
    litellm_error,
    text_chunks,
    vllm_error,
)


def user(text: str) -> common_pb2.Message:
    return common_pb2.Message(
        role=common_pb2.ROLE_USER, chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=text))]
    )


def assistant_call(call_id: str, name: str, args: dict[str, Any]) -> common_pb2.Message:
    return common_pb2.Message(
        role=common_pb2.ROLE_ASSISTANT,
        chunks=[
            common_pb2.Chunk(text=common_pb2.TextChunk(text="looking")),
            common_pb2.Chunk(
                tool_call=common_pb2.ToolCallChunk(id=call_id, name=name, input_json=json.dumps(args))
            ),
        ],
    )


def tool_result(call_id: str, name: str, content: str) -> common_pb2.Message:
    return common_pb2.Message(
        role=common_pb2.ROLE_TOOL,
        chunks=[
            common_pb2.Chunk(
                tool_result=common_pb2.ToolResultChunk(tool_call_id=call_id, name=name, content=content)
            )
        ],
    )


async def collect(provider: Any, request: ProviderRequest) -> list[ProviderEvent]:
    return [ev async for ev in provider.stream(request)]


def openai(server: FakeOpenAI, **kw: Any) -> OpenAIProvider:
    cfg = ProviderConfig(kind="openai", model="m1", base_url=server.base_url, api_key="sk-secret", **kw)
    return OpenAIProvider(cfg)


REQUEST = ProviderRequest(model="m1", system="be brief", messages=[user("hi")])


async def test_openai_streams_text_and_usage_with_cached_tokens(fake_openai: FakeOpenAI) -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    fake_openai.replies.append(Stream(text_chunks("Hel", "lo", usage=usage)))
    provider = openai(fake_openai)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        Usage(input_tokens=100, output_tokens=7, cache_read_tokens=60, reasoning_tokens=3),
        Finish(common_pb2.FINISH_REASON_STOP),
    ]
    body = fake_openai.requests[0]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "m1"
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert fake_openai.headers[0]["authorization"] == "Bearer sk-secret"


async def test_openai_sends_the_response_cap(fake_openai: FakeOpenAI) -> None:
    fake_openai.replies.append(Stream(text_chunks("ok")))
    provider = openai(fake_openai, max_tokens=1234)
    await collect(provider, REQUEST)
    await provider.aclose()
    # Any server but OpenAI's own takes max_tokens (Ollama knows no other name).
    assert fake_openai.requests[0]["max_tokens"] == 1234
    assert "max_completion_tokens" not in fake_openai.requests[0]


async def test_openai_sends_no_cap_unless_one_is_configured(fake_openai: FakeOpenAI) -> None:
    fake_openai.replies.append(Stream(text_chunks("ok")))
    provider = openai(fake_openai)
    await collect(provider, REQUEST)
    await provider.aclose()
    assert "max_tokens" not in fake_openai.requests[0]
    assert "max_completion_tokens" not in fake_openai.requests[0]


@pytest.mark.parametrize(
    ("base_url", "field"),
    [
        ("https://api.openai.com/v1", "max_completion_tokens"),
        ("https://API.OpenAI.com/v1/", "max_completion_tokens"),
        ("https://my-res.openai.azure.com/openai/v1", "max_completion_tokens"),
        ("http://127.0.0.1:11434/v1", "max_tokens"),  # Ollama
        ("http://localhost:8000/v1", "max_tokens"),  # vLLM, llama.cpp
        ("http://litellm:4000/v1", "max_tokens"),
        ("https://openrouter.ai/api/v1", "max_tokens"),
        ("https://api.openai.com.evil.example/v1", "max_tokens"),
    ],
)
def test_openai_names_the_cap_as_the_host_requires(base_url: str, field: str) -> None:
    """OpenAI refuses max_tokens for its reasoning models and wants max_completion_tokens;
    the servers that imitate it take max_tokens."""
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=base_url, max_tokens=77))
    assert max_tokens_field(base_url + "/chat/completions") == field
    body = provider._body(REQUEST)
    assert body[field] == 77
    assert {"max_tokens", "max_completion_tokens"} & set(body) == {field}


async def test_openai_assembles_interleaved_tool_call_deltas_by_index(fake_openai: FakeOpenAI) -> None:
    def delta(index: int, **fn: str) -> dict[str, Any]:
        call: dict[str, Any] = {"index": index, "function": fn}
        if "name" in fn:
            call["id"] = f"call_{index}"
        return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}

    fake_openai.replies.append(
        Stream(
            [
                {"choices": [{"index": 0, "delta": {"reasoning_content": "need "}}]},
                {"choices": [{"index": 0, "delta": {"reasoning": "files"}}]},
                delta(0, name="read_file", arguments='{"pa'),
                delta(1, name="list_dir", arguments="{"),
                delta(0, arguments='th": "a.txt"}'),
                delta(1, arguments='"path": "."}'),
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            ]
        )
    )
    tools = [
        ToolSpec("read_file", "read", {"type": "object"}),
        ToolSpec("list_dir", "ls", {"type": "object"}),
    ]
    provider = openai(fake_openai)
    events = await collect(provider, ProviderRequest(model="", system="", messages=[user("x")], tools=tools))
    await provider.aclose()
    assert events == [
        ReasoningDelta("need "),
        ReasoningDelta("files"),
        ToolCall("call_0", "read_file", '{"path": "a.txt"}'),
        ToolCall("call_1", "list_dir", '{"path": "."}'),
        Finish(common_pb2.FINISH_REASON_TOOL_CALLS),
    ]
    sent_tools = fake_openai.requests[0]["tools"]
    assert [t["function"]["name"] for t in sent_tools] == ["read_file", "list_dir"]
    assert fake_openai.requests[0]["model"] == "m1"  # the provider's model when the request has none


async def test_openai_sends_history_with_tool_calls_and_results(fake_openai: FakeOpenAI) -> None:
    fake_openai.replies.append(Stream(text_chunks("ok")))
    history = [
        user("list"),
        assistant_call("c1", "list_dir", {"path": "."}),
        tool_result("c1", "list_dir", "a.txt"),
    ]
    provider = openai(fake_openai)
    await collect(provider, ProviderRequest(model="m1", system="", messages=history))
    await provider.aclose()
    assert fake_openai.requests[0]["messages"] == [
        {"role": "user", "content": "list"},
        {
            "role": "assistant",
            "content": "looking",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "list_dir", "arguments": '{"path": "."}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
    ]


@pytest.mark.parametrize(
    ("reply", "retryable", "status", "retry_after"),
    [
        (Status(429, headers={"Retry-After": "7"}), True, 429, 7.0),
        (Status(503), True, 503, None),
        (Status(400, '{"error": {"message": "bad model"}}'), False, 400, None),
        (Status(401), False, 401, None),
    ],
)
async def test_openai_http_errors(
    fake_openai: FakeOpenAI, reply: Status, retryable: bool, status: int, retry_after: float | None
) -> None:
    fake_openai.replies.append(reply)
    provider = openai(fake_openai)
    with pytest.raises(ProviderError) as err:
        await collect(provider, REQUEST)
    await provider.aclose()
    assert (err.value.retryable, err.value.status, err.value.retry_after) == (retryable, status, retry_after)
    assert "sk-secret" not in str(err.value)
    # The error names what was called, so a wrong base_url shows at once.
    assert f"POST {fake_openai.base_url}/chat/completions" in str(err.value)


async def test_openai_http_error_shows_the_servers_message_and_the_url(fake_openai: FakeOpenAI) -> None:
    body = {"error": {"message": "The model `m9` does not exist", "type": "invalid_request_error"}}
    fake_openai.replies.append(Status(404, json.dumps(body)))
    provider = openai(fake_openai)
    with pytest.raises(ProviderError) as err:
        await collect(provider, REQUEST)
    await provider.aclose()
    assert str(err.value) == (
        f"provider answered 404 to POST {fake_openai.base_url}/chat/completions: "
        "invalid_request_error: The model `m9` does not exist; "
        "check the provider's base_url and model (HTTP 404)"
    )


async def test_openai_a_base_url_without_v1_fails_naming_the_url(fake_openai: FakeOpenAI) -> None:
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url=fake_openai.root))
    with pytest.raises(ProviderError) as err:
        await collect(provider, REQUEST)
    await provider.aclose()
    assert fake_openai.paths == ["/chat/completions"]
    assert err.value.status == 404 and not err.value.retryable
    assert f"POST {fake_openai.root}/chat/completions" in str(err.value)
    assert "base_url" in str(err.value)


async def test_openai_errors_keep_credentials_out(fake_openai: FakeOpenAI) -> None:
    """A key the server echoes back, or one in the base URL's user info or query, never
    reaches the error."""
    echoed = {"error": {"message": "Incorrect API key provided: sk-secret"}}
    fake_openai.replies += [Status(401, json.dumps(echoed)), Status(400)]
    provider = openai(fake_openai)
    with pytest.raises(ProviderError) as err:
        await collect(provider, REQUEST)
    await provider.aclose()
    assert "sk-secret" not in str(err.value) and "[redacted]" in str(err.value)
    port = fake_openai.root.rsplit(":", 1)[1]
    cfg = ProviderConfig(kind="openai", model="m", base_url=f"http://user:pw-in-url@127.0.0.1:{port}/v1")
    provider = OpenAIProvider(cfg)
    with pytest.raises(ProviderError) as err:
        await collect(provider, REQUEST)
    await provider.aclose()
    assert "pw-in-url" not in str(err.value) and "pw-in-url" not in provider.endpoint
    assert f"POST http://127.0.0.1:{port}/v1/chat/completions" in str(err.value)


# A role chunk first, as real servers send it: an error after it still comes before any output.
ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}


@pytest.mark.parametrize(
    ("frame", "retryable", "status", "message"),
    [
        (litellm_error("litellm.RateLimitError: quota", "429"), True, 429, "litellm.RateLimitError: quota"),
        (
            litellm_error("litellm.ServiceUnavailableError: down", "503"),
            True,
            503,
            "litellm.ServiceUnavailableError",
        ),
        (
            litellm_error("litellm.BadRequestError: bad schema", "400"),
            False,
            400,
            "litellm.BadRequestError: bad",
        ),
        (vllm_error("max_tokens must be at least 1", 400), False, 400, "BadRequestError: max_tokens must"),
        (
            {
                "error": {
                    "message": "The server had an error",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            True,
            0,
            "server_error: The server had an error",
        ),
        (
            {"error": {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}},
            True,
            0,
            "tokens: Rate limit reached",
        ),
        ({"error": "model crashed"}, False, 0, "model crashed"),
    ],
    ids=[
        "litellm-429",
        "litellm-503",
        "litellm-400",
        "vllm-400",
        "openai-server-error",
        "openai-rate",
        "bare",
    ],
)
async def test_openai_error_inside_the_stream_is_the_servers_message(
    fake_openai: FakeOpenAI, frame: dict[str, Any], retryable: bool, status: int, message: str
) -> None:
    fake_openai.replies.append(Stream([ROLE, frame, *text_chunks("never")]))
    provider = openai(fake_openai)
    seen: list[ProviderEvent] = []
    with pytest.raises(ProviderError) as err:
        async for ev in provider.stream(REQUEST):
            seen.append(ev)
    await provider.aclose()
    assert seen == []
    assert (err.value.retryable, err.value.status) == (retryable, status)
    assert f"provider reported an error mid-stream: {message}" in str(err.value)
    assert "{" not in str(err.value)  # the message, not a printed dict
    assert "None" not in str(err.value)  # LiteLLM's type "None" is no type


async def test_openai_malformed_sse_is_a_clear_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.replies.append(Stream([{"choices": [{"index": 0, "delta": {"content": "a"}}]}, "{not json"]))
    provider = openai(fake_openai)
    with pytest.raises(ProviderError, match="malformed stream event"):
        await collect(provider, REQUEST)
    await provider.aclose()


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
async def test_openai_connection_dropped_mid_stream_is_retryable(
    fake_openai: FakeOpenAI, chunked: bool
) -> None:
    fake_openai.replies.append(Stream(text_chunks("a", "b", "c"), drop_after=1, chunked=chunked))
    provider = openai(fake_openai)
    seen: list[ProviderEvent] = []
    with pytest.raises(ProviderError) as err:
        async for ev in provider.stream(REQUEST):
            seen.append(ev)
    await provider.aclose()
    assert err.value.retryable
    assert seen == [TextDelta("a")]


async def test_openai_stream_without_done_but_with_finish_is_complete(fake_openai: FakeOpenAI) -> None:
    fake_openai.replies.append(Stream(text_chunks("a"), done=False))
    provider = openai(fake_openai)
    events = await collect(provider, REQUEST)
    await provider.aclose()
    assert events == [TextDelta("a"), Finish(common_pb2.FINISH_REASON_STOP)]


async def test_openai_hang_before_headers_times_out(fake_openai: FakeOpenAI) -> None:
    fake_openai.replies.append(Hang())
    provider = openai(fake_openai, request_timeout=0.3)
    with pytest.raises(ProviderError, match="timed out") as err:
        await collect(provider, REQUEST)
    await provider.aclose()
    assert err.value.retryable


async def test_openai_connection_refused_is_retryable() -> None:
    provider = OpenAIProvider(ProviderConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ProviderError, match="connection failed") as err:
        await collect(provider, REQUEST)
    await provider.aclose()
    assert err.value.retryable


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = time.time()
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(later, now=now) == pytest.approx(30, abs=1.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


SCRIPT = {
    "turns": [
        {
            "steps": [
                [
                    {"type": "reasoning_delta", "text": "hmm"},
                    {"type": "tool_call", "id": "c1", "name": "list_dir", "input": {"path": "."}},
                    {"type": "usage", "input_tokens": 10, "output_tokens": 2, "cache_read_tokens": 4},
                ],
                [{"type": "text_delta", "text": "done"}, {"type": "finish", "reason": "length"}],
            ]
        },
        {"steps": [[{"type": "text_delta", "text": "second turn"}]]},
    ]
}


async def test_scripted_replays_the_step_the_history_asks_for() -> None:
    provider = ScriptedProvider.from_data(SCRIPT)
    first = await collect(provider, ProviderRequest("m", "", [user("a")]))
    assert first == [
        ReasoningDelta("hmm"),
        ToolCall("c1", "list_dir", '{"path": "."}'),
        Usage(input_tokens=10, output_tokens=2, cache_read_tokens=4),
        Finish(common_pb2.FINISH_REASON_TOOL_CALLS),
    ]
    history = [user("a"), assistant_call("c1", "list_dir", {}), tool_result("c1", "list_dir", "x")]
    second = await collect(provider, ProviderRequest("m", "", history))
    assert second == [TextDelta("done"), Finish(common_pb2.FINISH_REASON_LENGTH)]
    third = await collect(provider, ProviderRequest("m", "", [*history, user("b")]))
    assert third == [TextDelta("second turn"), Finish(common_pb2.FINISH_REASON_STOP)]
    # Past its last turn the script repeats the last one.
    fourth = await collect(provider, ProviderRequest("m", "", [*history, user("b"), user("c")]))
    assert fourth == third


async def test_scripted_error_event_is_a_provider_error() -> None:
    provider = ScriptedProvider.from_data(
        {"steps": [[{"type": "error", "status": 503, "message": "overloaded", "retryable": True}]]}
    )
    with pytest.raises(ProviderError, match="overloaded") as err:
        await collect(provider, ProviderRequest("m", "", [user("a")]))
    assert err.value.status == 503 and err.value.retryable


async def test_scripted_runs_out_of_steps_clearly() -> None:
    provider = ScriptedProvider.from_data({"steps": [[{"type": "text_delta", "text": "x"}]]})
    history = [user("a"), assistant_call("c1", "list_dir", {})]
    with pytest.raises(ProviderError, match="no step 1"):
        await collect(provider, ProviderRequest("m", "", history))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "expected an object with 'turns' or 'steps'"),
        ({"steps": []}, "at least one turn"),
        ({"steps": [[{"type": "bogus"}]]}, r"turns\[0\]\.steps\[0\]\[0\] has type 'bogus'"),
        ({"steps": [[{"type": "finish", "reason": "tired"}]]}, "unknown reason"),
    ],
)
def test_scripted_rejects_bad_scripts_naming_the_place(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ScriptedProvider.from_data(data)


def test_scripted_from_missing_file_names_the_key(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"provider\.script"):
        ScriptedProvider.from_file(str(tmp_path / "nope.json"))


async def test_demo_lists_then_reads_a_file_from_the_listing_then_answers() -> None:
    demo = DemoProvider()
    first = await collect(demo, ProviderRequest("demo", "", [user("hi")]))
    calls = [e for e in first if isinstance(e, ToolCall)]
    assert [(c.name, json.loads(c.input_json)) for c in calls] == [("list_dir", {"path": "."})]
    listing = "src/\nnotes.txt (5 bytes)\nREADME.md (120 bytes)"
    history = [
        user("hi"),
        assistant_call("c1", "list_dir", {"path": "."}),
        tool_result("c1", "list_dir", listing),
    ]
    second = await collect(demo, ProviderRequest("demo", "", history))
    calls = [e for e in second if isinstance(e, ToolCall)]
    assert [(c.name, json.loads(c.input_json)["path"]) for c in calls] == [("read_file", "README.md")]
    history += [
        assistant_call("c2", "read_file", {"path": "README.md"}),
        tool_result("c2", "read_file", "# Title\n"),
    ]
    third = await collect(demo, ProviderRequest("demo", "", history))
    text = "".join(e.text for e in third if isinstance(e, TextDelta))
    assert "# Title" in text
    assert third[-1] == Finish(common_pb2.FINISH_REASON_STOP)
