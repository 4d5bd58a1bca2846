"""The scripted provider: deterministic replay of a script file.

A script is JSON::

    {"turns": [
      {"steps": [
        [{"type": "reasoning_delta", "text": "Let me look."},
         {"type": "tool_call", "name": "list_dir", "input": {"path": "."}},
         {"type": "usage", "input_tokens": 12, "output_tokens": 5},
         {"type": "finish", "reason": "tool_calls"}],
        [{"type": "text_delta", "text": "Done."}]
      ]}
    ]}

``{"steps": [...]}`` at the top level is one turn. The turn answered is the
number of user messages so far (the last turn repeats); the step is the number
of assistant messages since the last user message. Event types: text_delta,
reasoning_delta, tool_call (id optional), usage, finish (reason optional: it
defaults to tool_calls when the step called a tool, else stop), sleep
(seconds: to make streaming observable), error (status, message, retryable,
retry_after: a provider failure; with ``times`` only the step's first that many
attempts fail, so a retry gets past it).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dispatch.kernel.providers.base import (
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    Usage,
    steps_since_last_user,
)
from dispatch.shared.config import ConfigError
from dispatch.v1 import common_pb2

FINISH_REASONS: Mapping[str, common_pb2.FinishReason.ValueType] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "content_filter": common_pb2.FINISH_REASON_CONTENT_FILTER,
}

Step = Sequence[Mapping[str, Any]]
_KNOWN = {"text_delta", "reasoning_delta", "tool_call", "usage", "finish", "sleep", "error"}


def _validate(turns: Sequence[Sequence[Step]], where: str) -> None:
    if not turns or not all(turns):
        raise ConfigError(f"script {where}: needs at least one turn with at least one step")
    for t, steps in enumerate(turns):
        for s, step in enumerate(steps):
            for e, event in enumerate(step):
                kind = event.get("type") if isinstance(event, Mapping) else None
                if kind not in _KNOWN:
                    raise ConfigError(
                        f"script {where}: turns[{t}].steps[{s}][{e}] has type {kind!r}; "
                        f"expected one of {sorted(_KNOWN)}"
                    )
                if kind == "finish" and event.get("reason", "stop") not in FINISH_REASONS:
                    raise ConfigError(f"script {where}: turns[{t}].steps[{s}][{e}] has an unknown reason")


class ScriptedProvider:
    """Replays a script; what tests and the demo use."""

    name = "scripted"

    def __init__(self, turns: Sequence[Sequence[Step]], *, model: str = "scripted", where: str = "<inline>"):
        _validate(turns, where)
        self._turns = turns
        self.model = model
        self.endpoint = f"scripted:{where}"
        # Failed attempts so far per (turn, step, event index), for errors with "times".
        self._failures: dict[tuple[int, int, int], int] = {}

    @classmethod
    def from_data(cls, data: Any, *, where: str = "<inline>") -> ScriptedProvider:
        if isinstance(data, Mapping) and "turns" in data:
            turns = [t["steps"] for t in data["turns"]]
        elif isinstance(data, Mapping) and "steps" in data:
            turns = [data["steps"]]
        else:
            raise ConfigError(f"script {where}: expected an object with 'turns' or 'steps'")
        return cls(turns, model=str(data.get("model", "scripted")), where=where)

    @classmethod
    def from_file(cls, path: str) -> ScriptedProvider:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config key provider.script: {path!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config key provider.script: {path!r} is not valid JSON: {exc}") from None
        return cls.from_data(data, where=path)

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        users, step = steps_since_last_user(request.messages)
        steps = self._turns[min(max(users - 1, 0), len(self._turns) - 1)]
        if step >= len(steps):
            raise ProviderError(f"script has no step {step} for this turn (it has {len(steps)})")
        called = False
        finished = False
        for index, event in enumerate(steps[step]):
            kind = event["type"]
            if kind == "text_delta":
                yield TextDelta(str(event["text"]))
            elif kind == "reasoning_delta":
                yield ReasoningDelta(str(event["text"]))
            elif kind == "tool_call":
                called = True
                yield ToolCall(
                    id=str(event.get("id") or f"call_{uuid.uuid4().hex[:16]}"),
                    name=str(event["name"]),
                    input_json=json.dumps(event.get("input", {})),
                )
            elif kind == "usage":
                yield Usage(
                    input_tokens=int(event.get("input_tokens", 0)),
                    output_tokens=int(event.get("output_tokens", 0)),
                    cache_read_tokens=int(event.get("cache_read_tokens", 0)),
                    cache_write_tokens=int(event.get("cache_write_tokens", 0)),
                    reasoning_tokens=int(event.get("reasoning_tokens", 0)),
                )
            elif kind == "finish":
                finished = True
                yield Finish(FINISH_REASONS[event.get("reason", "stop")])
            elif kind == "sleep":
                await asyncio.sleep(float(event.get("seconds", 0)))
            elif kind == "error":
                key = (users, step, index)
                failed = self._failures.get(key, 0)
                if "times" in event and failed >= int(event["times"]):
                    continue  # failed its "times" attempts already: this attempt gets past it
                self._failures[key] = failed + 1
                raise ProviderError(
                    str(event.get("message", "scripted failure")),
                    status=int(event.get("status", 0)),
                    retryable=bool(event.get("retryable", False)),
                    retry_after=float(event["retry_after"]) if "retry_after" in event else None,
                )
        if not finished:
            yield Finish(common_pb2.FINISH_REASON_TOOL_CALLS if called else common_pb2.FINISH_REASON_STOP)

    async def aclose(self) -> None:
        return None
