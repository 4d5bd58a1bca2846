"""A fake OpenAI-compatible server: real HTTP on loopback, scripted replies and faults.

Each request to ``POST /v1/chat/completions`` takes the next queued reply.
The requests it received are kept, parsed, for assertions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tests.fakes.http import FakeServer, Hang, SseWriter, Status

__all__ = ["FakeOpenAI", "Hang", "Status", "Stream", "litellm_error", "text_chunks", "vllm_error"]


@dataclass
class Stream:
    """A 200 with these SSE ``data`` payloads (dicts are JSON-encoded; strings sent as is)."""

    events: Sequence[dict[str, Any] | str]
    done: bool = True
    # Close the connection after this many events, without [DONE].
    drop_after: int | None = None
    # Chunked transfer encoding, as real servers stream; False: the body ends
    # when the connection closes.
    chunked: bool = True


Reply = Stream | Status | Hang


def text_chunks(
    *pieces: str, usage: dict[str, Any] | None = None, finish: str = "stop"
) -> list[dict[str, Any]]:
    """The SSE payloads of a plain text answer."""
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not None:
        events.append({"choices": [], "usage": usage})
    return events


def litellm_error(message: str, code: str, error_type: str = "None") -> dict[str, Any]:
    """The frame LiteLLM's proxy streams when the call fails after the headers
    (``data: {"error": ProxyException.to_dict()}``): the status as a string in ``code``, a
    missing type spelled "None"."""
    return {"error": {"message": message, "type": error_type, "param": "None", "code": code}}


def vllm_error(message: str, code: int, error_type: str = "BadRequestError") -> dict[str, Any]:
    """vLLM's streaming error frame: its ErrorResponse, the status a number in ``code``."""
    return {"error": {"object": "error", "message": message, "type": error_type, "param": None, "code": code}}


class FakeOpenAI(FakeServer[Stream]):
    path = "/v1/chat/completions"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    async def start(self) -> FakeOpenAI:
        await self._listen()
        return self

    async def stream(self, reply: Stream, writer: asyncio.StreamWriter) -> None:
        out = SseWriter(writer, chunked=reply.chunked)
        await out.start()
        for i, event in enumerate(reply.events):
            if reply.drop_after is not None and i >= reply.drop_after:
                out.drop()
                return
            payload = event if isinstance(event, str) else json.dumps(event)
            await out.send(f"data: {payload}\n\n".encode())
        if reply.done:
            await out.send(b"data: [DONE]\n\n")
        await out.end()
