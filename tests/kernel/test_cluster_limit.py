"""A cluster-wide limit on running turns (issue 15): every kernel on the store counts
against one ``cluster_max_concurrent_turns``, enforced by the store as each queued turn
moves to running; the turns beyond it wait queued, on whichever kernel, and run once a
slot is free. Two ``Kernel`` objects on one real store (both backends)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dispatch.kernel.kernel import Kernel
from dispatch.v1 import common_pb2
from tests.kernel.test_durability import crash, kernel_on, script, sealed, start, turn_of
from tests.stack import TENANT, Stack, start_stack

SLOW = script([{"type": "sleep", "seconds": 0.4}, {"type": "text_delta", "text": "done"}])


@pytest.fixture(params=["sqlite", "postgres"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    url = str(request.getfixturevalue("postgres_url")) if request.param == "postgres" else ""
    s = await start_stack(tmp_path, SLOW, database_url=url, sweep_interval=3600.0)
    yield s
    await s.stop()


@pytest.fixture
async def kernels() -> AsyncIterator[list[Kernel]]:
    made: list[Kernel] = []
    yield made
    for kernel in made:
        await crash(kernel)


async def two_kernels(stack: Stack, kernels: list[Kernel]) -> tuple[Kernel, Kernel]:
    """Two started kernels on the stack's store, under a cluster-wide limit of one turn."""
    a = kernel_on(stack, SLOW, max_running=1, follow_interval=0.05)
    b = kernel_on(stack, SLOW, max_running=1, follow_interval=0.05)
    kernels += [a, b]
    await a.start()
    await b.start()
    return a, b


async def test_turns_on_two_kernels_run_one_at_a_time_under_a_cluster_limit_of_one(
    stack: Stack, kernels: list[Kernel]
) -> None:
    a, b = await two_kernels(stack, kernels)
    convs = [await stack.conversation() for _ in range(4)]
    # Alternating kernels, each with run slots of its own to spare: only the cluster limits.
    turn_ids = await asyncio.gather(*(start(k, c) for k, c in zip([a, b, a, b], convs, strict=True)))
    done = [await sealed(stack, t) for t in turn_ids]
    assert all(t.state == common_pb2.TURN_STATE_COMPLETED for t in done)
    spans = sorted((t.started_at.ToNanoseconds(), t.ended_at.ToNanoseconds()) for t in done)
    for (_, ended), (began, _) in itertools.pairwise(spans):
        assert began >= ended, "a turn started while another was running"


async def test_a_queued_turn_waiting_for_the_cluster_can_be_cancelled(
    stack: Stack, kernels: list[Kernel]
) -> None:
    a, b = await two_kernels(stack, kernels)
    first, second = await stack.conversation(), await stack.conversation()
    running = await start(a, first)
    async with asyncio.timeout(10):
        while (await turn_of(stack, running)).state != common_pb2.TURN_STATE_RUNNING:
            await asyncio.sleep(0.01)
    waiting = await start(b, second)
    assert (await turn_of(stack, waiting)).state == common_pb2.TURN_STATE_QUEUED
    assert await b.cancel(TENANT, second, waiting) == waiting
    cancelled = await sealed(stack, waiting)
    assert cancelled.state == common_pb2.TURN_STATE_ABORTED
    assert (await sealed(stack, running)).state == common_pb2.TURN_STATE_COMPLETED
