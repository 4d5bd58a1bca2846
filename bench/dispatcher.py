"""Scheduling overhead per tool call: the Rust scheduler, its Python reference,
and a plain ``asyncio.Semaphore`` baseline, in one process and one run.

Each measurement drives a scheduler through one step of N calls the same way:
create it, submit every call, then complete the running calls in FIFO order
(each completion may start more) until none is left. The time per call is the
whole of that divided by N, so it covers deciding, deduplicating and
completing every call, plus creating the scheduler once per step. No tool
runs: this is the bookkeeping a dispatcher adds on top of the tools.

The baseline is what a minimal asyncio dispatcher does per call: acquire an
``asyncio.Semaphore(max_concurrent)`` (or queue the call when it is locked),
release it on completion and hand the slot to the next queued call. It knows
nothing of dedup, per-tool limits or exclusive calls, and parses no JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatch.dispatcher import CallSpec, Scheduler, StepScheduler
from dispatch.dispatcher_ref import ReferenceScheduler

MAX_CONCURRENT = 8
SIZES = (1, 10, 100, 10_000)
#: Each sample drives at least this many calls (several steps for small N).
CALLS_PER_SAMPLE = 10_000

SAFE_TOOLS = ("read_file", "grep", "glob", "list_dir")


@dataclass(frozen=True)
class Mix:
    name: str
    description: str
    duplicates: float = 0.0  # share of calls repeating an earlier call's input, respelled
    shell: float = 0.0  # share of calls to "shell" (limited by tool_limits)
    unsafe: float = 0.0  # share of non-concurrency-safe calls ("write_file")
    tool_limits: dict[str, int] = field(default_factory=dict)


MIXES = (
    Mix("distinct", "all distinct, concurrency-safe calls"),
    Mix("dup30", "~30% repeat an earlier input (keys reordered, respaced, 1 vs 1.0)", duplicates=0.3),
    Mix("shell-limit", "~25% shell calls, shell limit 2", shell=0.25, tool_limits={"shell": 2}),
    Mix("unsafe10", "~10% non-concurrency-safe calls, which run alone", unsafe=0.1),
)


def make_calls(mix: Mix, n: int, seed: int = 7) -> list[CallSpec]:
    """N calls of the mix, with inputs the size of real tool inputs."""
    rng = random.Random(seed)
    calls: list[CallSpec] = []
    inputs: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        roll = rng.random()
        if inputs and roll < mix.duplicates:
            tool, args = rng.choice(inputs)
            # The same input, spelled differently: reversed keys, other spacing, 200 -> 200.0.
            respelled = {k: (float(v) if isinstance(v, int) else v) for k, v in reversed(args.items())}
            input_json = json.dumps(respelled, indent=1)
        elif roll < mix.shell:
            tool, args = "shell", {"command": f"pytest -q tests/test_{i}.py", "timeout": 120}
            input_json = json.dumps(args)
        elif roll < mix.unsafe:
            tool, args = "write_file", {"path": f"src/out_{i}.txt", "content": f"line {i}\n"}
            input_json = json.dumps(args)
        else:
            tool = SAFE_TOOLS[i % len(SAFE_TOOLS)]
            args = {"path": f"src/dispatch/module_{i}.py", "offset": i % 50, "limit": 200}
            input_json = json.dumps(args)
        if tool != "shell" or mix.duplicates:
            inputs.append((tool, args))
        calls.append((f"toolu_{i:06d}", tool, input_json, tool != "write_file"))
    return calls


# --- the drivers: identical work for every implementation ---------------------


def drive(scheduler: StepScheduler, calls: Sequence[CallSpec]) -> int:
    """Submit every call one by one, then complete running calls in FIFO order."""
    fifo: deque[str] = deque()
    submit = scheduler.submit
    for id, tool_name, input_json, safe in calls:
        fifo.extend(submit(id, tool_name, input_json, safe)[0])
    complete = scheduler.complete
    started = 0
    while fifo:
        started += 1
        fifo.extend(complete(fifo.popleft()))
    return started


def drive_batched(scheduler: StepScheduler, calls: Sequence[CallSpec]) -> int:
    """The same, but the step's calls cross into the scheduler in one submit_many."""
    fifo: deque[str] = deque()
    for start, _ in scheduler.submit_many(calls):
        fifo.extend(start)
    complete = scheduler.complete
    started = 0
    while fifo:
        started += 1
        fifo.extend(complete(fifo.popleft()))
    return started


class SemaphoreBaseline:
    """A minimal asyncio dispatcher: max_concurrent via a Semaphore, a FIFO of waiting calls."""

    def __init__(self, max_concurrent: int) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self._waiting: deque[str] = deque()

    async def submit(self, id: str, tool_name: str, input_json: str | bytes, safe: bool) -> list[str]:
        if self._slots.locked():
            self._waiting.append(id)
            return []
        await self._slots.acquire()  # free slot: returns at once
        return [id]

    async def complete(self, id: str) -> list[str]:
        self._slots.release()
        if self._waiting:
            await self._slots.acquire()
            return [self._waiting.popleft()]
        return []


async def drive_semaphore(calls: Sequence[CallSpec]) -> int:
    baseline = SemaphoreBaseline(MAX_CONCURRENT)
    fifo: deque[str] = deque()
    submit = baseline.submit
    for id, tool_name, input_json, safe in calls:
        fifo.extend(await submit(id, tool_name, input_json, safe))
    complete = baseline.complete
    started = 0
    while fifo:
        started += 1
        fifo.extend(await complete(fifo.popleft()))
    return started


# --- timing --------------------------------------------------------------------

Sampler = Callable[[], float]


def sampler(run: Callable[[], None], calls: int) -> Sampler:
    """One sample: ns per call over enough steps of `calls` calls."""
    steps = max(1, CALLS_PER_SAMPLE // calls)

    def sample() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(steps):
            run()
        return (time.perf_counter_ns() - t0) / (steps * calls)

    return sample


def semaphore_sampler(runner: asyncio.Runner, calls: Sequence[CallSpec]) -> Sampler:
    """As `sampler`, timed inside the event loop (loop start-up excluded)."""
    steps = max(1, CALLS_PER_SAMPLE // len(calls))

    async def sample() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(steps):
            await drive_semaphore(calls)
        return (time.perf_counter_ns() - t0) / (steps * len(calls))

    return lambda: runner.run(sample())


def medians(samplers: dict[str, Sampler], repeats: int) -> dict[str, float]:
    """Median ns per call of each sampler. Samples are taken round-robin, so a
    drift of the machine's speed during the run touches every implementation alike."""
    for sample in samplers.values():
        sample()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    gc.collect()
    gc.disable()  # like timeit: collector pauses are not the scheduler's
    try:
        for _ in range(repeats):
            for name, sample in samplers.items():
                samples[name].append(sample())
                gc.collect()
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Row:
    mix: str
    calls: int
    rust: float
    rust_batched: float
    reference: float
    semaphore: float


def check_same_work(mix: Mix, calls: list[CallSpec]) -> None:
    """Every implementation starts the same calls, in the same order."""
    orders: list[list[str]] = []
    for factory in (Scheduler, ReferenceScheduler):
        scheduler = factory(MAX_CONCURRENT, mix.tool_limits)
        order: list[str] = []
        fifo: deque[str] = deque()
        for call in calls:
            fifo.extend(scheduler.submit(*call)[0])
        while fifo:
            order.append(fifo.popleft())
            fifo.extend(scheduler.complete(order[-1]))
        assert not scheduler.queued and not scheduler.running
        orders.append(order)
    if orders[0] != orders[1]:
        raise AssertionError(f"{mix.name}: Rust and the reference started different calls")


def measure(mix: Mix, n: int, repeats: int, runner: asyncio.Runner) -> Row:
    calls = make_calls(mix, n)
    check_same_work(mix, calls)

    def rust() -> None:
        drive(Scheduler(MAX_CONCURRENT, mix.tool_limits), calls)

    def rust_batched() -> None:
        drive_batched(Scheduler(MAX_CONCURRENT, mix.tool_limits), calls)

    def reference() -> None:
        drive(ReferenceScheduler(MAX_CONCURRENT, mix.tool_limits), calls)

    ns = medians(
        {
            "rust": sampler(rust, n),
            "rust_batched": sampler(rust_batched, n),
            "reference": sampler(reference, n),
            "semaphore": semaphore_sampler(runner, calls),
        },
        repeats,
    )
    return Row(mix.name, n, **ns)


HEADER = (
    f"{'mix':<12} {'calls':>6} {'rust':>8} {'rust+many':>10} {'reference':>10} {'semaphore':>10}"
    f" {'rust/ref':>9} {'rust/sem':>9}"
)


def format_row(row: Row) -> str:
    return (
        f"{row.mix:<12} {row.calls:>6} {row.rust:>8.0f} {row.rust_batched:>10.0f} {row.reference:>10.0f}"
        f" {row.semaphore:>10.0f} {row.rust / row.reference:>9.3f} {row.rust / row.semaphore:>9.2f}"
    )


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="samples per cell; the median is shown")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="calls per step, comma-separated")
    parser.add_argument("--mixes", default=",".join(m.name for m in MIXES), help="which mixes to run")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    mixes = [m for m in MIXES if m.name in args.mixes.split(",")]

    print(f"scheduler overhead, ns per call (median of {args.repeats}); max_concurrent={MAX_CONCURRENT}")
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu n/a'}")
    for mix in mixes:
        print(f"  {mix.name}: {mix.description}")
    print()
    print(HEADER)
    rows: list[Row] = []
    with asyncio.Runner() as runner:
        measure(MIXES[0], 100, 1, runner)  # warm the CPU and the allocators; not shown
        for mix in mixes:
            for n in sizes:
                rows.append(measure(mix, n, args.repeats, runner))
                print(format_row(rows[-1]), flush=True)
    print()
    print("rust: Scheduler, one submit() per call; rust+many: one submit_many() per step;")
    print("rust/ref and rust/sem compare the one-submit-per-call drivers (lower is better for rust).")
    return 0
