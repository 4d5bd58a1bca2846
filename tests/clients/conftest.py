"""Fixtures of the SDK's tests: the in-process stack with a scripted model, and a TCP proxy
that can drop every connection through it (a network failure, as the client sees one)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from tests.stack import Stack, start_stack

# A tool call, then text in two deltas.
TOOL_THEN_TEXT: Mapping[str, Any] = {
    "steps": [
        [{"type": "tool_call", "name": "list_dir", "input": {}}],
        [{"type": "text_delta", "text": "The workspace "}, {"type": "text_delta", "text": "is empty."}],
    ]
}
# A turn that runs until it is cancelled.
ENDLESS: Mapping[str, Any] = {
    "steps": [[{"type": "text_delta", "text": "thinking"}, {"type": "sleep", "seconds": 60}]]
}
# Text that streams for a while: 30 deltas 20 ms apart.
STREAMING: Mapping[str, Any] = {
    "steps": [
        [
            e
            for i in range(30)
            for e in ({"type": "text_delta", "text": f"w{i} "}, {"type": "sleep", "seconds": 0.02})
        ]
    ]
}
# Each turn takes a moment, then answers.
SLOW: Mapping[str, Any] = {
    "steps": [
        [
            {"type": "text_delta", "text": "a"},
            {"type": "sleep", "seconds": 0.4},
            {"type": "text_delta", "text": "b"},
        ]
    ]
}

MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    """Starts a stack with a transport whose model follows ``script``."""
    stacks: list[Stack] = []

    async def make(script: Mapping[str, Any] = TOOL_THEN_TEXT) -> Stack:
        stack = await start_stack(tmp_path, ScriptedProvider.from_data(script), transport=True)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.stop()


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack()


class Proxy:
    """Forwards TCP connections to ``target``; ``drop()`` cuts every one of them."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}
        pipes = [
            asyncio.create_task(self._pipe(client_r, server_w)),
            asyncio.create_task(self._pipe(server_r, client_w)),
        ]
        self._tasks.update(pipes)
        await asyncio.wait(pipes)
        for writer in (client_w, server_w):
            writer.transport.abort()
            self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    def drop(self) -> None:
        """Abort every connection, as a network failure would."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


MakeProxy = Callable[[Stack], Awaitable[Proxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    """Starts a proxy in front of a stack's transport."""
    proxies: list[Proxy] = []

    async def make(stack: Stack) -> Proxy:
        proxy = await Proxy(stack.hosted["transport"].port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.stop()
