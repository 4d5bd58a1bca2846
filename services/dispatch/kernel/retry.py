"""Retrying provider requests: the delay schedule, its budget, and one back-off per endpoint.

A step retries a retryable failure only while it has emitted nothing (see
``TurnRunner``); this module decides how long to wait. The back-off is shared:
when an endpoint answers 429, every turn that calls it waits out the same
Retry-After, instead of each one finding out on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dispatch.kernel.providers.base import ProviderError
from dispatch.shared.config import RetryPolicy


class RetryBudgetSpent(Exception):
    """Waiting once more would exceed the retry budget; the step gives up."""


@dataclass
class Retrying:
    """One step's retries: how many so far and how long they have waited."""

    policy: RetryPolicy
    attempts: int = 0
    waited: float = 0.0

    def next_delay(self, error: ProviderError) -> float:
        """The wait before the next attempt: the server's Retry-After if it gave one, else the
        schedule's next delay (its last one repeats). Raises ``RetryBudgetSpent`` when that wait
        would take the step past the budget."""
        schedule = self.policy.schedule
        planned = schedule[min(self.attempts, len(schedule) - 1)] if schedule else 0.0
        delay = error.retry_after if error.retry_after is not None else planned
        if self.waited + delay > self.policy.budget:
            raise RetryBudgetSpent(
                f"gave up after {self.attempts + 1} attempt(s) and {self.waited:.0f}s of waiting: "
                f"the next wait ({delay:.0f}s) would pass the retry budget "
                f"({self.policy.budget:.0f}s, kernel.retry.budget); last error: {error}"
            )
        self.attempts += 1
        self.waited += delay
        return delay


@dataclass
class EndpointBackoff:
    """When an endpoint may be called again (event-loop time)."""

    until: float = 0.0

    def hold(self, seconds: float) -> None:
        """Nobody calls the endpoint for ``seconds`` from now (or longer, if already held)."""
        self.until = max(self.until, asyncio.get_running_loop().time() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.until - asyncio.get_running_loop().time())


@dataclass
class Backoffs:
    """The kernel's back-offs, one per provider endpoint."""

    _by_endpoint: dict[str, EndpointBackoff] = field(default_factory=dict)

    def __call__(self, endpoint: str) -> EndpointBackoff:
        return self._by_endpoint.setdefault(endpoint, EndpointBackoff())
