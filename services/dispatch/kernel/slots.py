"""Run slots: at most ``limit`` turns run at once across the kernel; the rest wait in FIFO order."""

from __future__ import annotations

import asyncio
import collections


class RunSlots:
    """A FIFO counting semaphore whose waiters can be told apart from holders. ``limit`` 0:
    unlimited (every acquire succeeds at once)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def unlimited(self) -> bool:
        return not self.limit

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody waits for one."""
        if self.limit and (self.running >= self.limit or self.waiting):
            return False
        self.running += 1
        return True

    async def acquire(self) -> None:
        """Wait for a slot, behind everyone already waiting."""
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give the slot to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; `running` stays
                return
        self.running -= 1
