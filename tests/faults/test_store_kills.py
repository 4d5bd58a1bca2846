"""Scenario 2: the store killed with SIGKILL mid-turn (while the model streams, just as a step
commits, while a tool runs) and restarted on the same port and database after a pause. A
turn whose outage stays well under ``store_outage`` continues and completes; one whose outage
outlasts it (the kernel restarted with a short one) ends with a clear error and is sealed once
the store is back. Every time, the
guarantees hold. (Store kills longer than a lease's time to live, at random points, are part of
scenario 1.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatch.v1 import common_pb2
from tests.faults.harness import (
    Cluster,
    Counts,
    KernelSettings,
    Recorder,
    Seen,
    SendFn,
    Snapshots,
    check,
    journal_turn,
    list_turns,
    new_message_works,
    report,
    say,
    send,
    send_via_transport,
    settle,
    state_name,
    via_transport,
    write_script,
)

pytestmark = pytest.mark.e2e

# A kernel cut off from the store for 3/4 of a lease's time to live stops its turns itself
# (another kernel may claim them) and recovers them later: the lease is long here wherever
# a turn is meant to ride an outage out, or to end it by store_outage.
LONG_LEASE = 16.0


def step_of(seen: Seen) -> int:
    return int(seen.step_id.rpartition("#")[2]) if seen.step_id else -1


def tool_event(seen: Seen) -> str:
    event = common_pb2.AgentEvent.FromString(seen.data)
    if seen.kind == "tool_call":
        return event.tool_call.name
    if seen.kind == "tool_result":
        return event.tool_result.name
    return ""


@dataclass
class StoreFaults:
    """A cluster, a client following one conversation, and a way to kill the store."""

    cluster: Cluster
    recorder: Recorder
    snapshots: Snapshots
    counts: Counts
    conv: str
    via: SendFn

    async def kill_store_at(
        self, turn_id: str, what: str, when: Callable[[Seen], bool], pause: float, *, snapshot: bool = True
    ) -> None:
        """Once the client has seen an event of ``turn_id`` that ``when`` picks, kill the store
        (after reading what it has committed, unless the kill must land at once) and start it
        again on the same port and database after ``pause`` seconds."""
        recorder, conv = self.recorder, self.conv
        await recorder.wait_for(
            f"{what} in turn {turn_id}",
            lambda: any(e.turn_id == turn_id and when(e) for e in recorder.received(conv)),
            20,
        )
        if snapshot:
            await self.snapshots.take(self.cluster.store_stub, [conv])
        self.cluster.store.kill()
        self.counts.kills["store"] += 1
        killed = time.monotonic()
        say(f"store killed {what} ({recorder.doing(conv)}); back in {pause:.2f}s")
        await asyncio.sleep(pause)
        await self.cluster.store.start()
        say(f"store serving again {time.monotonic() - killed:.2f}s after the kill")

    async def sealed(self, turn_id: str, within: float = 40) -> int:
        await self.recorder.wait_for(
            f"turn {turn_id} to be sealed",
            lambda: self.recorder.sealed(self.conv, turn_id) is not None,
            within,
        )
        sealed = self.recorder.sealed(self.conv, turn_id)
        assert sealed is not None
        return sealed.state

    def errors(self, turn_id: str) -> list[common_pb2.ErrorEvent]:
        return [
            common_pb2.AgentEvent.FromString(e.data).error
            for e in self.recorder.received(self.conv)
            if e.turn_id == turn_id and e.kind == "error"
        ]

    async def attempts(self, turn_id: str) -> int:
        return next(
            t.attempts for t in await list_turns(self.cluster.store_stub, self.conv) if t.id == turn_id
        )

    async def finish(self, name: str, seed: int | None = None) -> None:
        """Settle, run a new message, check every guarantee, print the counts."""
        await settle(self.cluster, self.recorder, [self.conv])
        problems = await new_message_works(self.via, self.recorder, self.conv)
        problems += await check(self.cluster, self.recorder, [self.conv], self.snapshots, self.counts)
        say(self.counts.line(name, seed))
        report(problems, self.cluster, seed)


@contextlib.asynccontextmanager
async def store_faults(
    tmp_path: Path, database_url: str, settings: KernelSettings
) -> AsyncIterator[StoreFaults]:
    script = write_script(tmp_path / "script.json", journal_turn("s"))
    cluster = Cluster(tmp_path, database_url, [script], settings)
    await cluster.start()
    recorder = Recorder()
    try:
        conv = await cluster.create_conversation()
        recorder.follow(conv, "transport", via_transport(cluster))
        yield StoreFaults(cluster, recorder, Snapshots(), Counts(), conv, send_via_transport(cluster))
    finally:
        await recorder.close()
        await cluster.close()


def brief(errors: list[common_pb2.ErrorEvent]) -> list[tuple[str, bool, str]]:
    return [(x.code, x.fatal, x.message[:90]) for x in errors]


def backend_of(database_url: str) -> str:
    return database_url.split(":", 1)[0]


@pytest.mark.timeout(90)
async def test_store_killed_mid_turn(tmp_path: Path, database_url: str, seed: int) -> None:
    """Short outages (a pause of up to a second, and the restart) ride out; then, with a
    store_outage shorter than the next outage, the turn ends with a clear error and is sealed
    (failed) once the store is back."""
    rng = random.Random(seed)
    name = f"scenario 2 ({backend_of(database_url)})"
    settings = KernelSettings(lease_ttl=LONG_LEASE, store_outage=10.0)
    say(f"{name}: seed {seed}, store_outage {settings.store_outage}s, lease_ttl {settings.lease_ttl}s")
    async with store_faults(tmp_path, database_url, settings) as faults:
        sent = await send(faults.via, faults.recorder, faults.conv, "a turn through short store outages")
        assert sent is not None
        pauses = [rng.uniform(0.2, 1.0) for _ in range(3)]
        await faults.kill_store_at(
            sent.turn_id, "while the model streams (step 0)", lambda e: e.kind == "text_delta", pauses[0]
        )
        await faults.kill_store_at(
            sent.turn_id,
            "as step 1 commits (its read_file just answered)",
            lambda e: e.kind == "tool_result" and tool_event(e) == "read_file",
            pauses[1],
            snapshot=False,  # the commit follows the result at once
        )
        await faults.kill_store_at(
            sent.turn_id,
            "while a shell runs (step 2)",
            lambda e: e.kind == "tool_call" and tool_event(e) == "shell" and step_of(e) == 2,
            pauses[2],
        )
        state = await faults.sealed(sent.turn_id)
        say(
            f"{name}: the turn sealed {state_name(state)} after {await faults.attempts(sent.turn_id)} "
            f"attempt(s); errors the client saw: {brief(faults.errors(sent.turn_id))}"
        )
        assert state == common_pb2.TURN_STATE_COMPLETED, faults.errors(sent.turn_id)

        # The same kernel, restarted (cleanly: no turn runs) with a store_outage of a second.
        faults.cluster.configure(KernelSettings(lease_ttl=LONG_LEASE, store_outage=1.0))
        kernel = faults.cluster.kernels[0]
        assert kernel.proc is not None
        kernel.proc.terminate()
        await kernel.start()
        outage = faults.cluster.settings.store_outage
        long = await send(faults.via, faults.recorder, faults.conv, "a turn through a long store outage")
        assert long is not None
        await faults.kill_store_at(
            long.turn_id,
            f"while a shell runs (step 0), for longer than store_outage ({outage}s)",
            lambda e: e.kind == "tool_call" and tool_event(e) == "shell",
            outage + 0.5,
        )
        state = await faults.sealed(long.turn_id)
        errors = faults.errors(long.turn_id)
        say(f"{name}: after the long outage the turn sealed {state_name(state)}; errors: {brief(errors)}")
        assert state == common_pb2.TURN_STATE_FAILED
        assert any(x.code == "store" and x.fatal and "unavailable" in x.message for x in errors), errors
        await faults.finish(name, seed)
