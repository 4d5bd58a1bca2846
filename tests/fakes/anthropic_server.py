"""A fake Anthropic Messages API: real HTTP on loopback, scripted replies and faults.

Each request to ``POST /v1/messages`` takes the next queued reply. The requests
it received (parsed bodies, lower-cased headers, paths) are kept for assertions.
Streams are named SSE events: ``event: <type>\\ndata: <json>\\n\\n``; an event
with no name (a payload without "type", or the name "") is sent as its ``data``
line alone, as proxies send their error frames.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fakes import http
from tests.fakes.http import FakeServer, Hang, SseWriter

__all__ = ["FakeAnthropic", "Hang", "Status", "Stream"]

# A payload dict (its "type" names the event), or (event name, payload); a str
# payload is sent as is, to script malformed data. No name: no ``event:`` line.
Event = dict[str, Any] | tuple[str, dict[str, Any] | str]


@dataclass
class Stream:
    """A 200 streaming these events."""

    events: Sequence[Event]
    # Abort the connection after this many events.
    drop_after: int | None = None
    # Chunked transfer encoding, as real servers stream; False: the body ends
    # when the connection closes.
    chunked: bool = True
    # Before sending event number ``hold_at``, wait until ``release`` is set.
    hold_at: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # How many events have been written so far.
    sent: int = 0


@dataclass
class Status(http.Status):
    """A non-2xx answer, its body shaped like Anthropic's errors."""

    body: str = '{"type": "error", "error": {"type": "api_error", "message": "fault"}}'


Reply = Stream | Status | Hang


# ------------------------------------------------------------ event builders


def message_start(
    input_tokens: int = 10, output_tokens: int = 1, cache_read: int = 0, cache_creation: int = 0
) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": "claude-fake",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_read_input_tokens": cache_read,
                "cache_creation_input_tokens": cache_creation,
            },
        },
    }


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def block_delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def text_block(index: int, *pieces: str) -> list[dict[str, Any]]:
    return [
        block_start(index, {"type": "text", "text": ""}),
        *(block_delta(index, {"type": "text_delta", "text": p}) for p in pieces),
        block_stop(index),
    ]


def thinking_block(index: int, *pieces: str, signature: str) -> list[dict[str, Any]]:
    return [
        block_start(index, {"type": "thinking", "thinking": ""}),
        *(block_delta(index, {"type": "thinking_delta", "thinking": p}) for p in pieces),
        block_delta(index, {"type": "signature_delta", "signature": signature}),
        block_stop(index),
    ]


def tool_block(index: int, call_id: str, name: str, *partial_json: str) -> list[dict[str, Any]]:
    return [
        block_start(index, {"type": "tool_use", "id": call_id, "name": name, "input": {}}),
        *(block_delta(index, {"type": "input_json_delta", "partial_json": p}) for p in partial_json),
        block_stop(index),
    ]


def message_end(stop_reason: str = "end_turn", output_tokens: int = 5) -> list[dict[str, Any]]:
    return [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
        {"type": "message_stop"},
    ]


def text_reply(*pieces: str, stop_reason: str = "end_turn") -> list[dict[str, Any]]:
    """The events of a plain text answer."""
    return [message_start(), *text_block(0, *pieces), *message_end(stop_reason)]


def proxy_error(message: str, code: str) -> dict[str, Any]:
    """The error frame LiteLLM's Anthropic route (``/v1/messages``) sends when its upstream
    fails after the headers: no ``event:`` line, no "type", only its ProxyException as
    ``{"error": {...}}``, the status a string in ``code``, a missing type spelled "None"."""
    return {"error": {"message": message, "type": "None", "param": "None", "code": code}}


# -------------------------------------------------------------------- server


class FakeAnthropic(FakeServer[Stream]):
    path = "/v1/messages"
    no_reply = Status(500, '{"type": "error", "error": {"type": "api_error", "message": "no reply"}}')
    not_found = Status(
        404, '{"type": "error", "error": {"type": "not_found_error", "message": "no such path"}}'
    )

    def __init__(self) -> None:
        super().__init__()
        self._streams: list[Stream] = []

    @property
    def base_url(self) -> str:
        """Like ``https://api.anthropic.com``: no ``/v1``."""
        return self.root

    async def start(self) -> FakeAnthropic:
        await self._listen()
        return self

    async def stop(self) -> None:
        for stream in self._streams:
            stream.release.set()
        await super().stop()

    async def stream(self, reply: Stream, writer: asyncio.StreamWriter) -> None:
        self._streams.append(reply)
        out = SseWriter(writer, chunked=reply.chunked)
        await out.start()
        for i, event in enumerate(reply.events):
            if reply.drop_after is not None and i >= reply.drop_after:
                out.drop()
                return
            if reply.hold_at == i:
                await reply.release.wait()
            name, payload = (str(event.get("type", "")), event) if isinstance(event, dict) else event
            data = payload if isinstance(payload, str) else json.dumps(payload)
            head = f"event: {name}\n" if name else ""
            await out.send(f"{head}data: {data}\n\n".encode())
            reply.sent += 1
        await out.end()
