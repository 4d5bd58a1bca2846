"""The provider interface: a request in, a stream of provider events out."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
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
    """A failed provider request. ``status`` is the HTTP status, 0 when there was none."""

    message: str
    status: int = 0
    retryable: bool = False
    retry_after: float | None = field(default=None)

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status else self.message


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
