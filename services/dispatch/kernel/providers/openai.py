"""OpenAI-compatible chat completions over httpx, streaming.

Works against any base URL that speaks ``POST /chat/completions`` with
``stream: true`` (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM, ...). Tool-call
argument deltas are assembled by index; ``reasoning_content`` / ``reasoning``
deltas become reasoning; usage comes from ``stream_options.include_usage``.

``[provider] max_tokens``, when set, caps every response (unset, none is sent:
a server's own default beats a fixed one that may not fit a small local model's
context). OpenAI's own API names the cap
``max_completion_tokens`` and refuses ``max_tokens`` for its reasoning models
(o-series, gpt-5); the servers that imitate it (vLLM, Ollama, llama.cpp,
LiteLLM, OpenRouter) all take ``max_tokens``, and Ollama knows no other name.
So requests to OpenAI's hosts (``api.openai.com``, Azure's
``*.openai.azure.com``) carry ``max_completion_tokens``, every other server
``max_tokens`` (LiteLLM renames it for the reasoning models it routes to).

An error inside the stream (``data: {"error": {...}}``, as OpenAI, vLLM and
LiteLLM send once the headers are out) ends the response with the server's
message; it is retryable when its status code (LiteLLM's ``"code": "429"``) or,
without one, its type says a later attempt may succeed.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from dispatch.kernel.providers.base import (
    RETRYABLE_STATUS,
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
    display_url,
    http_error,
    redacting,
    stream_error,
)
from dispatch.shared.config import ProviderConfig
from dispatch.v1 import common_pb2

log = logging.getLogger(__name__)

# Error types (or code words) of an error inside the stream without a status code that a later
# attempt may not hit: OpenAI's server_error and rate limits, and the Anthropic-style types
# proxies relay.
_RETRYABLE_ERROR_TYPES = frozenset(
    {"server_error", "rate_limit_exceeded", "rate_limit_error", "overloaded_error", "api_error"}
)

_FINISH: Mapping[str, common_pb2.FinishReason.ValueType] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": common_pb2.FINISH_REASON_TOOL_CALLS,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "content_filter": common_pb2.FINISH_REASON_CONTENT_FILTER,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def max_tokens_field(url: str) -> str:
    """The name the server at ``url`` gives the response cap (see the module docstring)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host == "api.openai.com" or host.endswith(".openai.azure.com"):
        return "max_completion_tokens"
    return "max_tokens"


def to_openai_messages(system: str, messages: Iterable[common_pb2.Message]) -> list[dict[str, Any]]:
    """Our history as chat-completions messages. Thinking is not sent back."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for m in messages:
        texts = [c.text.text for c in m.chunks if c.WhichOneof("kind") == "text"]
        if m.role == common_pb2.ROLE_USER:
            out.append({"role": "user", "content": "".join(texts)})
        elif m.role == common_pb2.ROLE_SYSTEM:
            out.append({"role": "system", "content": "".join(texts)})
        elif m.role == common_pb2.ROLE_ASSISTANT:
            calls = [
                {
                    "id": c.tool_call.id,
                    "type": "function",
                    "function": {"name": c.tool_call.name, "arguments": c.tool_call.input_json or "{}"},
                }
                for c in m.chunks
                if c.WhichOneof("kind") == "tool_call"
            ]
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
            if calls:
                msg["tool_calls"] = calls
            if msg["content"] is None and not calls:
                continue  # a step that produced nothing but thinking
            out.append(msg)
        elif m.role == common_pb2.ROLE_TOOL:
            out.extend(
                {"role": "tool", "tool_call_id": c.tool_result.tool_call_id, "content": c.tool_result.content}
                for c in m.chunks
                if c.WhichOneof("kind") == "tool_result"
            )
    return out


def to_openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` payloads of a Server-Sent Events stream."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _usage(raw: Mapping[str, Any]) -> Usage:
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=int(raw.get("prompt_tokens") or 0),
        output_tokens=int(raw.get("completion_tokens") or 0),
        cache_read_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


class OpenAIProvider:
    name = "openai"

    def __init__(self, cfg: ProviderConfig, client: httpx.AsyncClient | None = None):
        self.model = cfg.model
        self._url = f"{cfg.base_url.rstrip('/')}/chat/completions"
        # Shown in provider_retry events: without any credential the base URL may carry.
        self.endpoint = display_url(self._url)
        self._api_key = cfg.api_key
        self._max_tokens = cfg.max_tokens
        self._max_tokens_field = max_tokens_field(self._url)
        self._timeout = httpx.Timeout(cfg.request_timeout, connect=min(cfg.request_timeout, 30.0))
        self._client = client or httpx.AsyncClient(timeout=self._timeout)

    def _body(self, request: ProviderRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": to_openai_messages(request.system, request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._max_tokens > 0:
            body[self._max_tokens_field] = self._max_tokens
        # Chat completions needs no tool definitions for the tool calls in the history, so
        # omit_tools leaves them out entirely.
        if request.tools and not request.omit_tools:
            body["tools"] = to_openai_tools(request.tools)
            if request.tools_disabled:
                body["tool_choice"] = "none"
        return body

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        return redacting(self._attempt(request), self._api_key)

    async def _attempt(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            async with self._client.stream(
                "POST", self._url, json=self._body(request), headers=headers, timeout=self._timeout
            ) as response:
                status = response.status_code
                if status >= 400:
                    raise http_error(
                        status,
                        self._url,
                        await response.aread(),
                        response.reason_phrase,
                        retryable=status in RETRYABLE_STATUS,
                        retry_after=parse_retry_after(response.headers.get("retry-after")),
                    )
                async for event in self._events(_sse_data(response.aiter_lines())):
                    yield event
        except httpx.TimeoutException as exc:
            raise ProviderError(
                f"provider timed out ({type(exc).__name__}) on POST {self.endpoint}", retryable=True
            ) from exc
        except httpx.TransportError as exc:
            # Connection refused, reset, or dropped mid-stream.
            raise ProviderError(
                f"provider connection failed on POST {self.endpoint}: {exc or type(exc).__name__}",
                retryable=True,
            ) from exc

    async def _events(self, payloads: AsyncIterator[str]) -> AsyncIterator[ProviderEvent]:
        calls: dict[int, _PendingCall] = {}
        finish: common_pb2.FinishReason.ValueType | None = None
        done = False
        async for payload in payloads:
            if payload.strip() == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError as exc:
                raise ProviderError(f"provider sent a malformed stream event: {payload[:200]!r}") from exc
            if not isinstance(chunk, dict):
                raise ProviderError(f"provider sent a malformed stream event: {payload[:200]!r}")
            if chunk.get("error"):
                raise stream_error(
                    chunk["error"], retryable_status=RETRYABLE_STATUS, retryable_types=_RETRYABLE_ERROR_TYPES
                )
            if chunk.get("usage"):
                yield _usage(chunk["usage"])
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    yield ReasoningDelta(str(reasoning))
                if delta.get("content"):
                    yield TextDelta(str(delta["content"]))
                for tc in delta.get("tool_calls") or ():
                    pending = calls.setdefault(int(tc.get("index", len(calls))), _PendingCall())
                    pending.id = tc.get("id") or pending.id
                    fn = tc.get("function") or {}
                    pending.name = fn.get("name") or pending.name
                    pending.arguments += fn.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish = _FINISH.get(choice["finish_reason"], common_pb2.FINISH_REASON_STOP)
        if not done and finish is None:
            # A close-delimited body that stops early looks like a clean end to
            # HTTP; without [DONE] or a finish_reason the answer is truncated.
            raise ProviderError("provider stream ended before the response was complete", retryable=True)
        for index in sorted(calls):
            call = calls[index]
            if not call.name:
                raise ProviderError(f"provider sent tool call #{index} without a function name")
            yield ToolCall(id=call.id or f"call_{index}", name=call.name, input_json=call.arguments or "{}")
        if finish is None:
            finish = common_pb2.FINISH_REASON_TOOL_CALLS if calls else common_pb2.FINISH_REASON_STOP
        yield Finish(finish)

    async def aclose(self) -> None:
        await self._client.aclose()
