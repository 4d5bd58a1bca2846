"""Asking a person at the terminal to decide an approval: the question, its answers, and
reading a line without blocking the event loop.

``ask`` is the conversation (``[y]es / [a]lways / [n]o / [e]dit``); it reads through a
``LineReader``, so a test can answer for the person. ``TerminalReader`` is the real one:
it reads the terminal's file descriptor from the event loop, so the turn's events keep
arriving while the question waits, and a cancelled question (the approval decided
elsewhere, Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

from dispatch_client._proto import common_pb2

QUESTION = "[y]es / [a]lways / [n]o / [e]dit"
# The most of a call's input the question shows.
MAX_SHOWN_INPUT = 2000

# A line typed at the terminal, after showing the prompt; None at the end of input.
LineReader = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True)
class Answer:
    """What the person decided: ``decision`` is approve, reject or edit."""

    decision: str
    remember: bool = False
    reason: str = ""
    edited_input_json: str = ""


def describe(approval: common_pb2.Approval) -> str:
    """The call an approval is about, on one line: its tool, its input and the rule that asked."""
    shown = approval.input_json
    with contextlib.suppress(ValueError):
        shown = json.dumps(json.loads(approval.input_json), ensure_ascii=False)
    if len(shown) > MAX_SHOWN_INPUT:
        shown = shown[:MAX_SHOWN_INPUT] + f"… ({len(shown) - MAX_SHOWN_INPUT} more characters)"
    rule = f" (rule: {approval.rule})" if approval.rule else ""
    return f"{approval.tool_name} {shown}{rule}"


def _edited(text: str) -> str | None:
    """``text`` if it is a JSON object, else None."""
    try:
        return text if isinstance(json.loads(text), dict) else None
    except ValueError:
        return None


async def ask(approval: common_pb2.Approval, read: LineReader, say: TextIO) -> Answer | None:
    """Ask whether ``approval``'s call may run until the answer is one of ``QUESTION``'s;
    None when the input ends first. ``no`` asks for a reason (optional), ``edit`` for the
    call's new input (a JSON object; empty goes back to the question)."""
    print(f"approve {describe(approval)}?", file=say, flush=True)
    while True:
        line = await read(f"{QUESTION}: ")
        if line is None:
            return None
        choice = line.strip().lower()
        if choice in ("y", "yes"):
            return Answer("approve")
        if choice in ("a", "always"):
            return Answer("approve", remember=True)
        if choice in ("n", "no"):
            reason = await read("reason (optional, for the model): ")
            return Answer("reject", reason=(reason or "").strip())
        if choice in ("e", "edit"):
            while True:
                text = await read(f"new input for {approval.tool_name} (a JSON object; empty: back): ")
                if text is None:
                    return None
                if not text.strip():
                    break
                edited = _edited(text.strip())
                if edited is not None:
                    return Answer("edit", edited_input_json=edited)
                print('that is not a JSON object, e.g. {"command": "ls"}', file=say, flush=True)
            continue
        print(
            "answer y (run it), a (run it, and the same call from now on without asking), "
            "n (refuse it) or e (run it with other input)",
            file=say,
            flush=True,
        )


class TerminalReader:
    """Lines typed at the terminal ``fd``, read from the event loop; each prompt goes to ``say``."""

    def __init__(self, fd: int, say: TextIO):
        self.fd = fd
        self.say = say
        self._buffer = b""
        self._eof = False

    async def __call__(self, prompt: str) -> str | None:
        self.say.write(prompt)
        self.say.flush()
        while b"\n" not in self._buffer and not self._eof:
            data = await self._read()
            if data:
                self._buffer += data
            else:
                self._eof = True
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    async def _read(self) -> bytes:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)
        try:
            return os.read(self.fd, 4096)
        except OSError:  # EIO: the terminal went away
            return b""
