"""Runs one step's tool calls as the scheduler allows.

The decisions — which call may start, which call duplicates which — come
from the scheduler (``dispatch.dispatcher``: Rust, or the Python reference
for debugging). This module only runs the coroutines and routes results.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

from dispatch.dispatcher import InvalidInput, Scheduler, SchedulerError
from dispatch.dispatcher_ref import ReferenceScheduler
from dispatch.kernel.providers.base import ToolCall
from dispatch.kernel.tools import Tool, ToolResult
from dispatch.shared.config import DispatchPolicy

ABORTED = ToolResult("Aborted", is_error=True)

__all__ = ["DispatchPolicy", "StepDispatcher"]


def make_scheduler(policy: DispatchPolicy) -> Scheduler | ReferenceScheduler:
    """The scheduler the policy names: Rust, or its Python reference for debugging."""
    cls = ReferenceScheduler if policy.scheduler == "reference" else Scheduler
    return cls(
        max_concurrent=policy.max_concurrent,
        tool_limits=dict(policy.tool_limits),
        dedup_exempt=policy.dedup_exempt,
    )


RunCall = Callable[[ToolCall], Awaitable[ToolResult]]
OnResult = Callable[[ToolCall, ToolResult, str], None]


class StepDispatcher:
    """One step's calls: submit them as they arrive, then wait for every result."""

    def __init__(
        self, policy: DispatchPolicy, tools: Mapping[str, Tool], run_call: RunCall, on_result: OnResult
    ) -> None:
        self._scheduler = make_scheduler(policy)
        self._tools = tools
        self._run_call = run_call
        self._on_result = on_result
        self._calls: dict[str, ToolCall] = {}
        self._results: dict[str, asyncio.Future[ToolResult]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def submit(self, call: ToolCall) -> None:
        """Register a call; it starts as soon as the scheduler allows."""
        result: asyncio.Future[ToolResult] = asyncio.get_running_loop().create_future()
        self._calls[call.id] = call
        self._results[call.id] = result
        tool = self._tools.get(call.name)
        try:
            started, duplicate_of = self._scheduler.submit(
                call.id, call.name, call.input_json, tool.concurrency_safe if tool is not None else True
            )
        except InvalidInput as exc:
            self._resolve(call, ToolResult(f"invalid input for {call.name}: not valid JSON ({exc})", True))
            return
        except SchedulerError as exc:
            self._resolve(call, ToolResult(f"{call.name} was not run: {exc}", True))
            return
        if duplicate_of is not None:
            original = self._results[duplicate_of]
            original.add_done_callback(lambda done: self._resolve(call, done.result(), duplicate_of))
        self._launch(started)

    def _launch(self, ids: list[str]) -> None:
        for call_id in ids:
            self._running[call_id] = asyncio.create_task(
                self._run(self._calls[call_id]), name=f"tool {call_id}"
            )

    async def _run(self, call: ToolCall) -> None:
        try:
            result = await self._run_call(call)
        finally:
            self._running.pop(call.id, None)
        self._resolve(call, result)
        self._launch(self._scheduler.complete(call.id))

    def _resolve(self, call: ToolCall, result: ToolResult, duplicate_of: str = "") -> None:
        future = self._results[call.id]
        if future.done():
            return
        future.set_result(result)
        self._on_result(call, result, duplicate_of)

    async def wait(self) -> dict[str, ToolResult]:
        """Every submitted call's result, by call id."""
        # Shielded: cancelling the waiter (an abort) must not cancel the
        # results themselves; abort() resolves them as "Aborted".
        return {call_id: await asyncio.shield(future) for call_id, future in list(self._results.items())}

    async def abort(self) -> None:
        """Queued calls never start; running ones are cancelled. All resolve "Aborted" at once."""
        for call_id in self._scheduler.abort():
            self._resolve(self._calls[call_id], ABORTED)
        running = list(self._running.values())
        for task in running:
            task.cancel()
        for call in self._calls.values():
            self._resolve(call, ABORTED)
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
