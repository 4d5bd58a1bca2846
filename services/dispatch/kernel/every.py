"""A background task that does one thing every so often, until closed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Every:
    """Run ``work`` every ``interval`` seconds (``now``: first at once) in a task of its own;
    a failure is logged and the next beat comes anyway."""

    def __init__(
        self, name: str, interval: Callable[[], float], work: Callable[[], Awaitable[object]], *, now: bool
    ):
        self.name = name
        self._interval = interval
        self._work = work
        self._now = now
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        if not self._now:
            await asyncio.sleep(self._interval())
        while True:
            try:
                await self._work()
            except Exception:
                log.exception("%s failed; it runs again in %.1fs", self.name, self._interval())
            await asyncio.sleep(self._interval())
