"""Per-step cost of a turn through store, exec and kernel, against a baseline revision.

A step here is one scripted provider response that calls ``list_dir`` through exec,
committed to the store (SQLite, synced WAL) with its events: the whole per-step path
of a durable turn, minus a real model. Each turn runs ``--steps`` such steps and a
last one that answers; the cost per step is the turn's time from ``StartTurn`` to
``turn_sealed`` divided by its steps (so a turn's fixed costs, creating and sealing
it, are spread over its steps as in a real multi-step turn).

The same measurement runs on this working tree and on ``--baseline`` (a git revision;
default: the commit before durable turns), each in a process of its own with that
tree's code, the variants alternating, ``--repeats`` times; the median of each is
shown with the ratio. The baseline is checked out to a temporary worktree and shares
this tree's compiled scheduler module (the Rust crate did not change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The last commit before leases, fencing and reserved event numbers (issue 12).
DEFAULT_BASELINE = "bc332b9^"

WORKER = r"""
import asyncio, json, statistics, sys, tempfile, time
from pathlib import Path
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.v1 import common_pb2, kernel_pb2
from tests.stack import TENANT, start_stack, text_chunks

STEPS, TURNS = int(sys.argv[1]), int(sys.argv[2])

async def main():
    # Each step lists another directory: the same call three times in a row is a doom loop.
    calls = [[{"type": "tool_call", "name": "list_dir", "input": {"path": f"d{i}"}}] for i in range(STEPS)]
    provider = ScriptedProvider.from_data({"steps": [*calls, [{"type": "text_delta", "text": "done"}]]})
    stack = await start_stack(Path(tempfile.mkdtemp(prefix="dispatch-bench-steps-")), provider)
    for i in range(STEPS):
        (stack.workspace / f"d{i}").mkdir()
    per_step = []
    try:
        for i in range(TURNS + 1):  # the first turn warms up
            conv = await stack.conversation()
            stream = stack.kernel.Subscribe(
                kernel_pb2.KernelSubscribeRequest(tenant_id=TENANT, conversation_id=conv)
            )
            began = time.perf_counter()
            await stack.kernel.StartTurn(
                kernel_pb2.StartTurnRequest(tenant_id=TENANT, conversation_id=conv, chunks=text_chunks("go"))
            )
            async for batch in stream:
                if any(e.HasField("turn_sealed") for e in batch.events):
                    break
            stream.cancel()
            if i:
                per_step.append((time.perf_counter() - began) * 1000 / (STEPS + 1))
    finally:
        await stack.stop()
    print(json.dumps({"ms_per_step": statistics.median(per_step)}))

asyncio.run(main())
"""


def _worktree(revision: str, into: Path) -> Path:
    """``revision`` checked out at ``into``, sharing this tree's compiled scheduler."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(into), revision], check=True
    )
    for native in (ROOT / "services" / "dispatch").glob("_dispatcher*.so"):
        shutil.copy(native, into / "services" / "dispatch" / native.name)
    return into


def _measure(tree: Path, steps: int, turns: int) -> float:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'services'}{os.pathsep}{tree}"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(steps), str(turns)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"the measurement failed in {tree}:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["ms_per_step"])


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with")
    parser.add_argument("--steps", type=int, default=8, help="tool steps per turn (plus an answer)")
    parser.add_argument("--turns", type=int, default=20, help="turns per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements of each variant, alternating")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-baseline-") as tmp:
        baseline = _worktree(args.baseline, Path(tmp) / "tree")
        try:
            samples: dict[str, list[float]] = {"baseline": [], "this tree": []}
            for _ in range(args.repeats):
                samples["baseline"].append(_measure(baseline, args.steps, args.turns))
                samples["this tree"].append(_measure(ROOT, args.steps, args.turns))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False
            )
    base = statistics.median(samples["baseline"])
    print(
        f"per-step cost: {args.steps} list_dir steps + an answer per turn, {args.turns} turns per "
        f"measurement, median of {args.repeats}; SQLite; baseline {args.baseline}"
    )
    print(f"{'variant':<10} {'ms/step':>8} {'ratio':>6}  samples")
    for name, values in samples.items():
        median = statistics.median(values)
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:<10} {median:>8.2f} {median / base:>6.2f}  {shown}")
    return 0
