"""Fixtures of the kernel's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack, start_stack

MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    """``await make_stack(provider, **start_stack options)``: an in-process stack, each in a
    directory of its own, all stopped after the test."""
    stacks: list[Stack] = []

    async def make(provider: Any, **kw: Any) -> Stack:
        root = tmp_path / f"stack{len(stacks)}"
        root.mkdir()
        stack = await start_stack(root, provider, **kw)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.stop()
