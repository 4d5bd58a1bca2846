"""Anthropic Messages API over httpx, streaming.

``POST {base_url}/v1/messages`` with ``stream: true`` (a ``base_url`` that
already ends in ``/v1`` works too); the answer is a stream of named Server-Sent
Events (``message_start``, ``content_block_*``, ``message_delta``,
``message_stop``, ``ping``, ``error``).

What the kernel sees:

* Text and thinking arrive as ``TextDelta`` / ``ReasoningDelta`` as they stream.
* A thinking block's signature arrives as one ``ReasoningDelta(text="",
  signature=...)`` when the block ends: a signature closes the current
  thinking block, and the next ``ReasoningDelta`` starts a new one. Store it on
  that block's ``ThinkingChunk`` to send the block back in later requests.
* A ``redacted_thinking`` block is one ``ReasoningDelta(text="",
  signature=REDACTED_THINKING_PREFIX + data)``; ``to_anthropic_messages`` turns
  such a chunk back into a ``redacted_thinking`` block.
* Each ``ToolCall`` is yielded as soon as its ``tool_use`` block stops, before
  later blocks are read, so it can start eagerly.
* One ``Usage`` (``input_tokens`` counts cached prompt tokens too), then one
  ``Finish``, end a complete stream.
* An error frame ends it with the server's message: Anthropic's ``event: error``,
  and a proxy's bare ``data: {"error": {"message": ..., "code": "400"}}`` (no
  event name, no ``type``: what LiteLLM's Anthropic route sends when its
  upstream fails after the headers). Its status code, or without one its type,
  says whether a later attempt may succeed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
from dispatch.kernel.providers.openai import parse_retry_after
from dispatch.shared.config import ANTHROPIC_MAX_TOKENS, ProviderConfig
from dispatch.v1 import common_pb2

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"

# Marks a ThinkingChunk signature that carries a redacted_thinking block's
# opaque data. Real signatures are base64, so they never contain the colon.
REDACTED_THINKING_PREFIX = "redacted_thinking:"

# 529 is Anthropic's "overloaded".
_RETRYABLE_HTTP = RETRYABLE_STATUS | {529}

# Error types of a mid-stream ``error`` event that a later attempt may not hit.
_RETRYABLE_ERROR_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})

_FINISH: Mapping[str, common_pb2.FinishReason.ValueType] = {
    "end_turn": common_pb2.FINISH_REASON_STOP,
    "stop_sequence": common_pb2.FINISH_REASON_STOP,
    # The server paused a long-running turn; the kernel sees an ordinary stop.
    "pause_turn": common_pb2.FINISH_REASON_STOP,
    "tool_use": common_pb2.FINISH_REASON_TOOL_CALLS,
    "max_tokens": common_pb2.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": common_pb2.FINISH_REASON_LENGTH,
    "refusal": common_pb2.FINISH_REASON_CONTENT_FILTER,
}


# ------------------------------------------------------------------ requests


def _tool_input(input_json: str) -> dict[str, Any]:
    """A stored tool call's input as the object ``tool_use`` requires.

    Input that is empty, not JSON, or not a JSON object is sent as ``{}``: the
    API rejects anything but an object, and refusing the whole history over
    one bad past call would wedge the conversation.
    """
    if not input_json:
        return {}
    try:
        value = json.loads(input_json)
    except json.JSONDecodeError:
        log.warning("tool call input is not valid JSON; sending {} in its place")
        return {}
    if not isinstance(value, dict):
        log.warning("tool call input is not a JSON object; sending {} in its place")
        return {}
    return value


def _blocks(message: common_pb2.Message) -> list[dict[str, Any]]:
    """One message's chunks as content blocks, in chunk order."""
    assistant = message.role == common_pb2.ROLE_ASSISTANT
    blocks: list[dict[str, Any]] = []
    for chunk in message.chunks:
        kind = chunk.WhichOneof("kind")
        if kind == "text":
            # The API rejects empty and whitespace-only text blocks.
            if chunk.text.text.strip():
                blocks.append({"type": "text", "text": chunk.text.text})
        elif kind == "thinking" and assistant:
            sig = chunk.thinking.signature
            if sig.startswith(REDACTED_THINKING_PREFIX):
                blocks.append({"type": "redacted_thinking", "data": sig[len(REDACTED_THINKING_PREFIX) :]})
            elif sig:
                blocks.append({"type": "thinking", "thinking": chunk.thinking.text, "signature": sig})
            # Unsigned thinking (another provider's, or a cut-off block) is
            # dropped: the API rejects thinking without its signature.
        elif kind == "tool_call" and assistant:
            call = chunk.tool_call
            blocks.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call.input_json)}
            )
        elif kind == "tool_result" and not assistant:
            result = chunk.tool_result
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": result.tool_call_id,
                "is_error": result.is_error,
            }
            if result.content:
                block["content"] = result.content
            elif result.is_error:
                # The API requires content on an error result.
                block["content"] = "the tool failed without output"
            blocks.append(block)
    return blocks


def to_anthropic_messages(messages: Iterable[common_pb2.Message]) -> list[dict[str, Any]]:
    """Our history as Messages API ``messages``, strictly alternating user / assistant.

    USER and TOOL messages become user messages; SYSTEM messages in the
    history also become user text, since ``messages`` has no system role (the
    request's own system prompt goes in the top-level ``system``). Messages
    that end up with no blocks are skipped, then consecutive messages of one
    role are merged into one; in a merged user message the ``tool_result``
    blocks come first, as the API requires after a ``tool_use``.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == common_pb2.ROLE_ASSISTANT:
            role = "assistant"
        elif message.role in (common_pb2.ROLE_USER, common_pb2.ROLE_SYSTEM, common_pb2.ROLE_TOOL):
            role = "user"
        else:
            continue
        blocks = _blocks(message)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for msg in out:
        if msg["role"] == "user":
            content = msg["content"]
            msg["content"] = [b for b in content if b["type"] == "tool_result"] + [
                b for b in content if b["type"] != "tool_result"
            ]
    return out


def to_anthropic_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]


# ----------------------------------------------------------------- responses


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[SSEEvent]:
    """The events of a Server-Sent Events stream, with their ``event`` names."""
    event = ""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield SSEEvent(event, "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield SSEEvent(event, "\n".join(data))


@dataclass
class _Block:
    """A content block being streamed."""

    type: str
    id: str = ""
    name: str = ""
    start_input: Any = None
    parts: list[str] = field(default_factory=list)
    signature: list[str] = field(default_factory=list)

    def tool_call(self) -> ToolCall:
        if self.parts:
            input_json = "".join(self.parts)
        elif isinstance(self.start_input, dict) and self.start_input:
            input_json = json.dumps(self.start_input)
        else:
            input_json = "{}"
        return ToolCall(id=self.id, name=self.name, input_json=input_json)


@dataclass
class _Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def update(self, raw: Any) -> None:
        """Take the counts present in ``raw``; later reports replace earlier ones."""
        if not isinstance(raw, Mapping):
            return
        for key in (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ):
            value = raw.get(key)
            if isinstance(value, int):
                setattr(self, key, value)

    def event(self) -> Usage:
        cached = self.cache_read_input_tokens + self.cache_creation_input_tokens
        return Usage(
            input_tokens=self.input_tokens + cached,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_input_tokens,
            cache_write_tokens=self.cache_creation_input_tokens,
        )


def _malformed(payload: str) -> ProviderError:
    return ProviderError(f"provider sent a malformed stream event: {payload[:200]!r}")


async def _events(stream: AsyncIterator[SSEEvent]) -> AsyncIterator[ProviderEvent]:
    """Provider events from the SSE events of one Messages API response."""
    blocks: dict[int, _Block] = {}
    usage = _Usage()
    stop_reason: str | None = None
    saw_tool_use = False
    complete = False
    async for sse in stream:
        try:
            data = json.loads(sse.data)
        except json.JSONDecodeError as exc:
            raise _malformed(sse.data) from exc
        if not isinstance(data, dict):
            raise _malformed(sse.data)
        kind = data.get("type") or sse.event
        if not kind and "error" in data:
            kind = "error"  # a proxy's error frame: no event name, no type
        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, Mapping):
                usage.update(message.get("usage"))
        elif kind == "content_block_start":
            index, raw = data.get("index"), data.get("content_block")
            if not isinstance(index, int) or not isinstance(raw, Mapping):
                raise _malformed(sse.data)
            block = _Block(type=str(raw.get("type") or ""))
            blocks[index] = block
            if block.type == "text" and raw.get("text"):
                yield TextDelta(str(raw["text"]))
            elif block.type == "thinking" and raw.get("thinking"):
                yield ReasoningDelta(str(raw["thinking"]))
            elif block.type == "redacted_thinking":
                yield ReasoningDelta("", signature=REDACTED_THINKING_PREFIX + str(raw.get("data") or ""))
            elif block.type == "tool_use":
                block.id, block.name = str(raw.get("id") or ""), str(raw.get("name") or "")
                block.start_input = raw.get("input")
                if not block.name:
                    raise ProviderError(f"provider sent tool_use block #{index} without a name")
                if not block.id:
                    block.id = f"toolu_{index}"
        elif kind == "content_block_delta":
            index, delta = data.get("index"), data.get("delta")
            if not isinstance(delta, Mapping):
                raise _malformed(sse.data)
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                if delta.get("text"):
                    yield TextDelta(str(delta["text"]))
            elif delta_type == "thinking_delta":
                if delta.get("thinking"):
                    yield ReasoningDelta(str(delta["thinking"]))
            elif delta_type == "signature_delta":
                target = blocks.get(index) if isinstance(index, int) else None
                if target is None:
                    raise ProviderError(f"provider sent a signature for block {index!r} that never started")
                target.signature.append(str(delta.get("signature") or ""))
            elif delta_type == "input_json_delta":
                target = blocks.get(index) if isinstance(index, int) else None
                if target is None or target.type != "tool_use":
                    raise ProviderError(f"provider sent tool input for block {index!r}, not a tool_use block")
                target.parts.append(str(delta.get("partial_json") or ""))
            # Other deltas (citations, ...) carry nothing the kernel keeps.
        elif kind == "content_block_stop":
            index = data.get("index")
            done = blocks.pop(index, None) if isinstance(index, int) else None
            if done is None:
                continue
            if done.type == "thinking" and done.signature:
                yield ReasoningDelta("", signature="".join(done.signature))
            elif done.type == "tool_use":
                saw_tool_use = True
                yield done.tool_call()
        elif kind == "message_delta":
            delta = data.get("delta")
            if isinstance(delta, Mapping) and delta.get("stop_reason"):
                stop_reason = str(delta["stop_reason"])
            usage.update(data.get("usage"))
        elif kind == "message_stop":
            complete = True
            break
        elif kind == "error":
            raise stream_error(
                data.get("error"), retryable_status=_RETRYABLE_HTTP, retryable_types=_RETRYABLE_ERROR_TYPES
            )
        # "ping" and event types added after this was written are ignored.
    if not complete:
        # A close-delimited body that stops early looks like a clean end to HTTP.
        raise ProviderError("provider stream ended before the response was complete", retryable=True)
    # Tool blocks the server never stopped are whole once the message is.
    for index in sorted(blocks):
        if blocks[index].type == "tool_use":
            saw_tool_use = True
            yield blocks[index].tool_call()
    yield usage.event()
    if stop_reason is None:
        finish = common_pb2.FINISH_REASON_TOOL_CALLS if saw_tool_use else common_pb2.FINISH_REASON_STOP
    else:
        finish = _FINISH.get(stop_reason, common_pb2.FINISH_REASON_STOP)
        if stop_reason not in _FINISH:
            log.warning("unknown Anthropic stop_reason %r; treating it as a stop", stop_reason)
    yield Finish(finish)


async def _check_response(response: httpx.Response, url: str) -> None:
    """Raise for an error status, or for a 2xx that is not an event stream."""
    status = response.status_code
    if status >= 400:
        raise http_error(
            status,
            url,
            await response.aread(),
            response.reason_phrase,
            retryable=status in _RETRYABLE_HTTP,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    content_type = response.headers.get("content-type", "").lower()
    if not content_type.startswith("text/event-stream"):
        body = (await response.aread())[:200].decode("utf-8", "replace")
        raise ProviderError(
            f"provider answered {status} to POST {display_url(url)} with "
            f"{content_type or 'no content type'}, not an event stream: {body!r}",
            status=status,
        )


def messages_url(base_url: str) -> str:
    """The Messages API URL under ``base_url``, given as Anthropic's docs do
    (``https://api.anthropic.com``) or with the ``/v1`` that OpenAI-style base URLs carry."""
    base = base_url.rstrip("/")
    return f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"


def _has_tool_blocks(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(
        isinstance(block, Mapping) and block.get("type") in ("tool_use", "tool_result")
        for message in messages
        for block in message.get("content") or ()
    )


# ------------------------------------------------------------------ provider


class AnthropicProvider:
    """The Anthropic Messages API, streaming.

    ``endpoint`` is the messages URL (without any credential the base URL may
    carry); the kernel keys its per-endpoint back-off on it, so providers sharing
    a URL share the back-off.
    """

    name = "anthropic"

    def __init__(self, cfg: ProviderConfig, client: httpx.AsyncClient | None = None):
        self.model = cfg.model
        self._url = messages_url(cfg.base_url)
        self.endpoint = display_url(self._url)
        self._api_key = cfg.api_key
        self._max_tokens = cfg.max_tokens or ANTHROPIC_MAX_TOKENS
        # request_timeout bounds waiting for the headers and each read after them.
        self._timeout = httpx.Timeout(cfg.request_timeout, connect=min(cfg.request_timeout, 30.0))
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=self._timeout)

    def _body(self, request: ProviderRequest) -> dict[str, Any]:
        messages = to_anthropic_messages(request.messages)
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "max_tokens": self._max_tokens,
            "stream": True,
            "messages": messages,
        }
        if request.system:
            body["system"] = request.system
        # The API refuses a request whose history holds tool_use or tool_result blocks
        # without tool definitions: omit_tools leaves them out only when it holds none.
        if request.tools and not (request.omit_tools and not _has_tool_blocks(messages)):
            body["tools"] = to_anthropic_tools(request.tools)
            if request.tools_disabled or request.omit_tools:
                body["tool_choice"] = {"type": "none"}
        return body

    def _headers(self) -> dict[str, str]:
        headers = {
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        return redacting(self._attempt(request), self._api_key)

    async def _attempt(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        try:
            async with self._client.stream(
                "POST",
                self._url,
                json=self._body(request),
                headers=self._headers(),
                timeout=self._timeout,
            ) as response:
                await _check_response(response, self._url)
                async for event in _events(sse_events(response.aiter_lines())):
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

    async def aclose(self) -> None:
        """Close the HTTP client, if this provider created it."""
        if self._owns_client:
            await self._client.aclose()
