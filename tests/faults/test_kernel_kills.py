"""Scenario 1: the kernel killed with SIGKILL at random points of scripted multi-step turns
with tool calls, and restarted on the same port, again and again; messages sent while turns
run (queued) and while the kernel is down or dying. Then every guarantee is checked."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from dispatch.v1 import common_pb2
from tests.faults.harness import (
    Cluster,
    Counts,
    KernelSettings,
    Recorder,
    Snapshots,
    call,
    check,
    describe,
    journal_turn,
    list_turns,
    new_message_works,
    report,
    say,
    send,
    send_via_transport,
    settle,
    sleep,
    text,
    via_transport,
    write_script,
)

pytestmark = pytest.mark.e2e

# Kernel kills per run (per backend); DISPATCH_FAULT_KILLS raises it for a longer soak.
KILLS = int(os.environ.get("DISPATCH_FAULT_KILLS", "20"))
# Store kills mixed in among them, each down for longer than a lease's time to live.
STORE_KILLS = 2
LIVE = frozenset(
    {
        common_pb2.TURN_STATE_QUEUED,
        common_pb2.TURN_STATE_RUNNING,
        common_pb2.TURN_STATE_RESUMING,
        common_pb2.TURN_STATE_WAITING_FOR_APPROVAL,
    }
)


@pytest.mark.timeout(170 + 6 * max(0, KILLS - 20))
async def test_kernel_killed_at_random_points(tmp_path: Path, database_url: str, seed: int) -> None:
    rng = random.Random(seed)
    backend = database_url.split(":", 1)[0]
    say(f"scenario 1 ({backend}): seed {seed} (DISPATCH_FAULT_SEED={seed} reruns these kill points)")
    script = write_script(tmp_path / "script.json", journal_turn("k"))
    cluster = Cluster(tmp_path, database_url, [script], KernelSettings())
    await cluster.start()
    recorder = Recorder()
    snapshots = Snapshots()
    counts = Counts()
    sends: list[asyncio.Task[object]] = []
    try:
        names = {"A": await cluster.create_conversation(), "B": await cluster.create_conversation()}
        convs = list(names.values())
        for conv in convs:
            recorder.follow(conv, "transport", via_transport(cluster))
        kernel = cluster.kernels[0]
        via = send_via_transport(cluster)
        began = time.monotonic()
        last_send: dict[str, float] = {}
        n = 0

        async def send_at(delay: float, name: str, queued_hint: str) -> object:
            await asyncio.sleep(delay)
            conv = names[name]
            last_send[conv] = time.monotonic()
            nonlocal n
            n += 1
            return await send(via, recorder, conv, f"{name} message {n} ({queued_hint})")

        store_kills = set(rng.sample(range(2, KILLS + STORE_KILLS), STORE_KILLS))
        kernel_kills = 0
        for cycle in range(1, KILLS + STORE_KILLS + 1):
            incarnation = time.monotonic()
            # Something to kill: a conversation without a turn in flight gets a new one.
            for name, conv in names.items():
                if not any(t.state in LIVE for t in await list_turns(cluster.store_stub, conv)):
                    sends.append(asyncio.create_task(send_at(0, name, "new turn")))
            await recorder.wait_for(
                f"kernel incarnation {kernel.starts} to run a turn",
                lambda incarnation=incarnation: any(recorder.since(c, incarnation) for c in convs),  # type: ignore[misc]
                20,
            )
            delay = rng.uniform(0.05, 1.3)
            for _ in range(rng.choice([0, 1, 1, 2])):
                # Messages while turns run (queued), or racing the kill, or to a restarting kernel.
                at = rng.uniform(0, delay + 0.3)
                sends.append(asyncio.create_task(send_at(at, rng.choice(list(names)), "mid-turn")))
            await asyncio.sleep(delay)
            await snapshots.take(cluster.store_stub, convs)
            now = time.monotonic()
            doing = describe(names, recorder)
            since_send = "; ".join(
                f"{name}: last send {now - last_send[conv]:.2f}s ago"
                for name, conv in names.items()
                if conv in last_send
            )
            when = (
                f"at +{now - began:.1f}s, {delay:.2f}s after the kernel ran a turn; {since_send}; "
                f"doing: {doing}"
            )
            if cycle in store_kills:
                pause = rng.uniform(1.1, 1.6)
                cluster.store.kill()
                counts.kills["store"] += 1
                say(f"store kill (down {pause:.2f}s, longer than the lease) {when}")
                await asyncio.sleep(pause)
                await cluster.store.start()
                continue
            pid = kernel.pid
            kernel.kill()
            kernel_kills += 1
            counts.kills["kernel"] += 1
            say(f"kill {kernel_kills}/{KILLS}: kernel pid {pid} (incarnation {kernel.starts}) {when}")
            await kernel.start()
        await asyncio.gather(*sends)
        await settle(cluster, recorder, convs)
        problems: list[str] = []
        for found in await asyncio.gather(*(new_message_works(via, recorder, conv) for conv in convs)):
            problems += found
        problems += await check(cluster, recorder, convs, snapshots, counts)
        say(counts.line(f"scenario 1 ({backend})", seed))
        if recorder.unacknowledged:
            say(f"never acknowledged (not checked): {recorder.unacknowledged}")
        report(problems, cluster, seed)
    finally:
        for task in sends:
            task.cancel()
        await recorder.close()
        await cluster.close()


@pytest.mark.timeout(90)
async def test_kernel_killed_as_a_seal_starts_the_next_turn(tmp_path: Path, database_url: str) -> None:
    """A message queued during a turn's last step starts the next turn in the commit that seals
    the running one; the kernel is killed right after the next turn's first events reached the
    client, before that turn commits anything. The numbers the client saw must not name other
    events later (they are persisted as sent, or announced lost)."""
    backend = database_url.split(":", 1)[0]
    steps = [
        [text("working"), sleep(1.0), call("list_dir", path=".")],
        [text("Done"), sleep(1.0), text(" here.")],
    ]
    cluster = Cluster(
        tmp_path, database_url, [write_script(tmp_path / "script.json", steps)], KernelSettings()
    )
    await cluster.start()
    recorder = Recorder()
    snapshots = Snapshots()
    counts = Counts()
    try:
        conv = await cluster.create_conversation()
        recorder.follow(conv, "transport", via_transport(cluster))
        via = send_via_transport(cluster)
        first = await send(via, recorder, conv, "the first turn")
        assert first is not None
        await recorder.wait_for(
            "the first turn's last step",
            lambda: any(
                e.turn_id == first.turn_id and e.step_id.endswith("#1") for e in recorder.received(conv)
            ),
            15,
        )
        queued = await send(via, recorder, conv, "queued behind it")
        assert queued is not None and queued.queued, queued
        await recorder.wait_for(
            "the next turn to start",
            lambda: any(
                e.kind == "turn_started" and e.turn_id != first.turn_id for e in recorder.received(conv)
            ),
            15,
        )
        await snapshots.take(cluster.store_stub, [conv])
        doing = recorder.doing(conv)
        cluster.kernels[0].kill()
        counts.kills["kernel"] += 1
        say(f"scenario 1b ({backend}): kernel killed as the next turn started ({doing})")
        await cluster.kernels[0].start()
        await settle(cluster, recorder, [conv])
        problems = await new_message_works(via, recorder, conv)
        problems += await check(cluster, recorder, [conv], snapshots, counts)
        say(counts.line(f"scenario 1b ({backend})"))
        report(problems, cluster)
    finally:
        await recorder.close()
        await cluster.close()
