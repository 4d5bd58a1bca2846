"""What the fake model servers share: real HTTP/1.1 on loopback, a queue of scripted
replies, every request kept (parsed body, lower-cased headers, path) for assertions,
and the faults that are not about the stream's format (a status, a hang)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar


@dataclass
class Status:
    """A non-2xx answer."""

    status: int
    body: str = '{"error": {"message": "fault"}}'
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hang:
    """Accept the request and never send headers."""


S = TypeVar("S")


class FakeServer(abc.ABC, Generic[S]):
    """A fake whose 200 answers are streams of type ``S``, written by ``stream``."""

    # The one route it serves, and what it says when no reply is queued.
    path = "/"
    no_reply = Status(500, '{"error": "no reply queued"}')
    not_found = Status(404, '{"error": "no such path"}')

    def __init__(self) -> None:
        self.replies: list[S | Status | Hang] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self._server: asyncio.Server | None = None
        self._hung: list[asyncio.StreamWriter] = []

    @property
    def root(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

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
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.paths.append(path)
            self.headers.append(headers)
            self.requests.append(json.loads(body))
            if method != "POST" or path != self.path:
                reply: S | Status | Hang = self.not_found
            else:
                reply = self.replies.pop(0) if self.replies else self.no_reply
            await self._answer(reply, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def _answer(self, reply: S | Status | Hang, writer: asyncio.StreamWriter) -> None:
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
        await self.stream(reply, writer)
        with contextlib.suppress(ConnectionError):
            writer.close()

    @abc.abstractmethod
    async def stream(self, reply: S, writer: asyncio.StreamWriter) -> None:
        """Write a 200 and the stream ``reply`` scripts (``SseWriter`` helps)."""


class SseWriter:
    """A 200 ``text/event-stream`` response, chunked (as real servers stream) or ended by
    closing the connection."""

    def __init__(self, writer: asyncio.StreamWriter, *, chunked: bool):
        self.writer = writer
        self.chunked = chunked

    async def start(self) -> None:
        encoding = "Transfer-Encoding: chunked\r\n" if self.chunked else ""
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{encoding}Connection: close\r\n\r\n"
        self.writer.write(head.encode())
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        await self.writer.drain()

    def drop(self) -> None:
        """Abort the connection: the client sees a broken stream, not a clean end."""
        self.writer.transport.abort()

    async def end(self) -> None:
        if self.chunked:
            self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
