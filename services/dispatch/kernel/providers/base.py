"""The provider interface: a request in, a stream of provider events out."""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispatch.v1 import common_pb2


@dataclass(frozen=True)
class ToolSpec:
    """What the model is told about a tool."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ProviderRequest:
    model: str
    system: str
    # The conversation so far, in seq order, plus this turn's uncommitted steps.
    messages: Sequence[common_pb2.Message]
    tools: Sequence[ToolSpec] = ()
    # The tools stay declared (history may hold calls to them) but the model must not call
    # any: the wrap-up step of a turn that hit a limit.
    tools_disabled: bool = False
    # Leave the tool definitions out of the request where the API allows it, and let the model
    # call none (implies ``tools_disabled``): a wrap-up asked again because the model called a
    # tool anyway. A provider whose API needs the tools declared (Anthropic, when the history
    # holds tool calls) keeps them, with calls disabled.
    omit_tools: bool = False


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str
    signature: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A tool call, complete: its input is the whole JSON document."""

    id: str
    name: str
    input_json: str


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def to_proto(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )


@dataclass(frozen=True)
class Finish:
    reason: common_pb2.FinishReason.ValueType


ProviderEvent = TextDelta | ReasoningDelta | ToolCall | Usage | Finish


@dataclass
class ProviderError(Exception):
    """A failed provider request. ``status`` is the HTTP status, or the status code an error
    inside the stream carried; 0 when there was none."""

    message: str
    status: int = 0
    retryable: bool = False
    retry_after: float | None = field(default=None)

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status else self.message


# HTTP statuses (and status codes in a stream's error) that a later attempt may not hit.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# How much of a server's error message an error keeps.
MAX_DETAIL = 500


@dataclass(frozen=True)
class ErrorDetail:
    """What a server's error object says."""

    type: str = ""
    message: str = ""
    # An HTTP status the object carries in ``code`` (LiteLLM: "429", vLLM: 400); 0 if none.
    status: int = 0
    # A ``code`` that is a word instead (OpenAI: "rate_limit_exceeded").
    code: str = ""

    def text(self) -> str:
        text = f"{self.type}: {self.message}" if self.type and self.message else self.type or self.message
        return text[:MAX_DETAIL]


def _status_code(code: Any) -> int:
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        return code
    return 0


def error_detail(error: Any) -> ErrorDetail:
    """An error object in any of the shapes servers send: OpenAI's ``{message, type, param,
    code}`` (``code`` a word, or null), LiteLLM's (the same, ``code`` the status as a string,
    ``type`` sometimes the string "None"), vLLM's (``code`` the status as a number),
    Anthropic's ``{type, message}``, or a bare string."""
    if not isinstance(error, Mapping):
        return ErrorDetail(message=str(error or ""))
    kind = str(error.get("type") or "")
    if kind == "None":  # LiteLLM's ProxyException spells a missing type so
        kind = ""
    message = "" if error.get("message") is None else str(error["message"])
    code = error.get("code")
    status = _status_code(code)
    word = code if isinstance(code, str) and not status else ""
    return ErrorDetail(kind, message, status, word)


def stream_error(
    error: Any, *, retryable_status: frozenset[int], retryable_types: frozenset[str]
) -> ProviderError:
    """The error an ``error`` frame inside a stream reports. A status code in it decides whether
    it is worth retrying (LiteLLM's "400" is not, its "429" is); without one, its type or code
    word does."""
    detail = error_detail(error)
    if detail.status:
        retryable = detail.status in retryable_status
    else:
        retryable = bool({detail.type, detail.code} & retryable_types)
    return ProviderError(
        f"provider reported an error mid-stream: {detail.text() or 'no message given'}",
        status=detail.status,
        retryable=retryable,
    )


def http_error_detail(body: bytes, reason: str) -> str:
    """The useful part of an HTTP error body: the server's error type and message when it is
    JSON that has them, else the body itself (truncated), else the reason phrase."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, Mapping):
        if "error" in parsed:
            detail = error_detail(parsed["error"])
        elif "message" in parsed:  # vLLM before 0.7: the error object itself, unwrapped
            detail = error_detail(parsed)
        else:  # FastAPI's {"detail": ...}
            detail = ErrorDetail(message=str(parsed.get("detail") or ""))
        if detail.text():
            return detail.text()
    return text[:MAX_DETAIL] or reason


def display_url(url: str) -> str:
    """``url`` as an error message may show it: without user info or query, where a
    credential could be."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def http_error(
    status: int, url: str, body: bytes, reason: str, *, retryable: bool, retry_after: float | None
) -> ProviderError:
    """A non-2xx answer to ``POST url``, naming the URL (a wrong base_url shows at once)."""
    detail = http_error_detail(body, reason)
    hint = "; check the provider's base_url and model" if status == 404 else ""
    return ProviderError(
        f"provider answered {status} to POST {display_url(url)}: {detail}{hint}",
        status=status,
        retryable=retryable,
        retry_after=retry_after,
    )


def redact(text: str, secret: str) -> str:
    """``text`` without ``secret``: what a server echoes back is untrusted."""
    return text.replace(secret, "[redacted]") if secret else text


async def redacting(
    events: AsyncGenerator[ProviderEvent, None], secret: str
) -> AsyncGenerator[ProviderEvent, None]:
    """``events``, closed with the caller, with ``secret`` kept out of any ``ProviderError``
    they end in (a server may echo the key back in its error body)."""
    try:
        async with contextlib.aclosing(events) as each:
            async for event in each:
                yield event
    except ProviderError as exc:
        exc.message = redact(exc.message, secret)
        raise


class Provider(Protocol):
    """A model endpoint. ``stream`` yields events until the response ends."""

    name: str
    model: str
    # Where requests go (a URL); turns calling the same endpoint share one back-off.
    endpoint: str

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]: ...

    async def aclose(self) -> None: ...


def text_of(message: common_pb2.Message) -> str:
    return "".join(c.text.text for c in message.chunks if c.WhichOneof("kind") == "text")


def steps_since_last_user(messages: Sequence[common_pb2.Message]) -> tuple[int, int]:
    """(number of user messages, assistant messages after the last user message).

    Deterministic providers use these to know which step of which turn they are
    answering, from the request alone: replay needs no state of its own.
    """
    users = 0
    assistant_since = 0
    for m in messages:
        if m.role == common_pb2.ROLE_USER:
            users += 1
            assistant_since = 0
        elif m.role == common_pb2.ROLE_ASSISTANT:
            assistant_since += 1
    return users, assistant_since
