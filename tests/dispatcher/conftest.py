"""Every scheduler test runs against the Rust scheduler and its Python reference."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, cast

import pytest

from dispatch import dispatcher, dispatcher_ref
from dispatch.dispatcher import StepScheduler


class SchedulerFactory(Protocol):
    def __call__(
        self,
        max_concurrent: int = 0,
        tool_limits: Mapping[str, int] | None = None,
        dedup_exempt: Iterable[str] = (),
    ) -> StepScheduler: ...


CanonicalKey = Callable[[str | bytes], bytes]


@pytest.fixture(params=[dispatcher.Scheduler, dispatcher_ref.ReferenceScheduler], ids=["rust", "reference"])
def make_scheduler(request: pytest.FixtureRequest) -> SchedulerFactory:
    return cast(SchedulerFactory, request.param)


@pytest.fixture(params=[dispatcher.canonical_key, dispatcher_ref.canonical_key], ids=["rust", "reference"])
def canonical_key(request: pytest.FixtureRequest) -> CanonicalKey:
    return cast(CanonicalKey, request.param)
