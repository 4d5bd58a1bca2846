"""A fake OpenAI-compatible server: real HTTP on loopback, scripted replies and faults.

Each request to ``POST /v1/chat/completions`` takes the next queued reply.
The requests it received are kept, parsed, for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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


@dataclass
class Status:
    """A non-2xx answer."""

    status: int
    body: str = '{"error": {"message": "fault"}}'
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hang:
    """Accept the request and never send headers."""


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


class FakeOpenAI:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._server: asyncio.Server | None = None
        self._hung: list[asyncio.StreamWriter] = []

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def start(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        for writer in self._hung:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.headers.append(headers)
            self.requests.append(json.loads(body))
            reply = self.replies.pop(0) if self.replies else Status(500, '{"error": "no reply queued"}')
            await self._answer(reply, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def _answer(self, reply: Reply, writer: asyncio.StreamWriter) -> None:
        if isinstance(reply, Hang):
            self._hung.append(writer)
            return
        if isinstance(reply, Status):
            extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
            body = reply.body.encode()
            writer.write(
                f"HTTP/1.1 {reply.status} Fault\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            writer.close()
            return
        encoding = "Transfer-Encoding: chunked\r\n" if reply.chunked else ""
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{encoding}Connection: close\r\n\r\n"
        writer.write(head.encode())

        def send(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data) if reply.chunked else data)

        for i, event in enumerate(reply.events):
            if reply.drop_after is not None and i >= reply.drop_after:
                # Abort the connection: the client sees a broken stream, not a clean end.
                writer.transport.abort()
                return
            payload = event if isinstance(event, str) else json.dumps(event)
            send(f"data: {payload}\n\n".encode())
            await writer.drain()
        if reply.done:
            send(b"data: [DONE]\n\n")
        if reply.chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            writer.close()
