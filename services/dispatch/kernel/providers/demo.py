"""The built-in demo: what runs when no model is configured.

It makes real tool calls through exec — list the workspace, read a file from
the listing — and then says what it saw, so a newcomer sees the whole path
(transport → kernel → provider → tools → store) work without an API key.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from dispatch.kernel.providers.base import (
    Finish,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    ToolCall,
    Usage,
    steps_since_last_user,
)
from dispatch.v1 import common_pb2

_PREFERRED = ("README.md", "README", "README.rst", "pyproject.toml", "package.json")


def _last_tool_result(request: ProviderRequest) -> str:
    for message in reversed(request.messages):
        for chunk in message.chunks:
            if chunk.WhichOneof("kind") == "tool_result":
                return chunk.tool_result.content
    return ""


def _pick_file(listing: str) -> str | None:
    files = [line for line in listing.splitlines() if line and not line.endswith("/")]
    files = [re.sub(r"\s+\(\d+ bytes\)$", "", f) for f in files]
    for name in _PREFERRED:
        if name in files:
            return name
    return files[0] if files else None


def _words(text: str) -> AsyncIterator[ProviderEvent]:
    async def gen() -> AsyncIterator[ProviderEvent]:
        for piece in re.findall(r"\S+\s*", text):
            yield TextDelta(piece)

    return gen()


class DemoProvider:
    name = "demo"
    model = "demo"
    endpoint = "demo"

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        _, step = steps_since_last_user(request.messages)
        if step == 0:
            async for ev in _words(
                "No model is configured, so this is the built-in demo. Listing the workspace."
            ):
                yield ev
            yield ToolCall(f"call_{uuid.uuid4().hex[:16]}", "list_dir", json.dumps({"path": "."}))
            yield Usage(input_tokens=40, output_tokens=20)
            yield Finish(common_pb2.FINISH_REASON_TOOL_CALLS)
            return
        if step == 1:
            listing = _last_tool_result(request)
            chosen = _pick_file(listing)
            if chosen is not None:
                async for ev in _words(f" Reading {chosen}."):
                    yield ev
                yield ToolCall(
                    f"call_{uuid.uuid4().hex[:16]}", "read_file", json.dumps({"path": chosen, "limit": 2000})
                )
                yield Usage(input_tokens=80, output_tokens=20)
                yield Finish(common_pb2.FINISH_REASON_TOOL_CALLS)
                return
        content = _last_tool_result(request)
        first = next((line.strip() for line in content.splitlines() if line.strip()), "")
        summary = f"\n\nThe file begins with: {first[:120]!r}." if first else "\n\nThe workspace is empty."
        async for ev in _words(
            summary + " Point Dispatch at a real model (see the README) to do actual work."
        ):
            yield ev
        yield Usage(input_tokens=120, output_tokens=30)
        yield Finish(common_pb2.FINISH_REASON_STOP)

    async def aclose(self) -> None:
        return None
