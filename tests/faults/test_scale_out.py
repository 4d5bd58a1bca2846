"""Scenario 6: scale-out on PostgreSQL. Two kernels and two transports, each its own
process; the transports find the kernels through the store's heartbeat rows
(``--kernel store``), so any transport serves any conversation.

6a: a client subscribed on each transport; a turn sent through one; the kernel running it
is killed with SIGKILL mid-turn. The other kernel resumes the turn within the lease's time
to live and a sweep, and both subscribers see it continue to its seal with no gap and no
reused event_seq, on either transport; a new message through either transport runs.

6b: a transport killed with SIGKILL mid-turn; its client subscribes again through the
other transport from its last event_seq, and sees the turn to its seal with no gap.

Then every guarantee ``check`` holds the system to."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.v1 import common_pb2, store_pb2
from tests.faults.harness import (
    Cluster,
    Counts,
    KernelSettings,
    Recorder,
    Snapshots,
    call,
    check,
    list_turns,
    load_events,
    new_message_works,
    report,
    say,
    send,
    send_via_transport,
    settle,
    sleep,
    text,
    until_ok,
    via_transport,
    write_script,
)

pytestmark = pytest.mark.e2e

# A turn long enough to be killed in: steps of words, a tool call, a pause.
STEPS = [
    [text(f"step {i} "), sleep(0.3), call("list_dir", path="." if i % 2 else "..")] for i in range(8)
] + [[text("all done")]]


async def _cluster(tmp_path: Path, postgres_url: str) -> Cluster:
    script = write_script(tmp_path / "script.json", STEPS)
    cluster = Cluster(tmp_path, postgres_url, [script, script], KernelSettings(), transports=2)
    await cluster.start()

    async def both_advertised() -> int:
        kernels = (await cluster.store_stub.ListKernels(store_pb2.ListKernelsRequest(), timeout=5)).kernels
        if len(kernels) < 2:
            raise AssertionError(f"{len(kernels)} kernel(s) advertised")
        return len(kernels)

    await until_ok("both kernels to advertise themselves", both_advertised)
    return cluster


async def _owner(cluster: Cluster, conv: str, turn_id: str) -> str:
    for turn in await list_turns(cluster.store_stub, conv):
        if turn.id == turn_id:
            return turn.lease_owner
    raise AssertionError(f"turn {turn_id} not found")


@pytest.mark.timeout(120)
async def test_a_kernel_killed_mid_turn_is_taken_over_and_every_transport_sees_it_through(
    tmp_path: Path, postgres_url: str
) -> None:
    cluster = await _cluster(tmp_path, postgres_url)
    recorder = Recorder()
    snapshots = Snapshots()
    counts = Counts()
    try:
        conv = await cluster.create_conversation()
        recorder.follow(conv, "transport1", via_transport(cluster, 0))
        recorder.follow(conv, "transport2", via_transport(cluster, 1))
        sent = await send(send_via_transport(cluster, 0), recorder, conv, "go")
        assert sent is not None

        def both_in_step_3() -> bool:
            # By what each subscriber received (``Seen.source`` names only the first to get
            # an event: a transport that is always second would never count).
            third = {e.seq for e in recorder.received(conv) if e.step_id.endswith("#2")}
            return all(third & recorder.by_source[(conv, s)] for s in ("transport1", "transport2"))

        await recorder.wait_for("both subscribers to see the turn's third step", both_in_step_3, 20)
        owner = await _owner(cluster, conv, sent.turn_id)
        victim = cluster.kernel_owning(owner)
        await snapshots.take(cluster.store_stub, [conv])
        victim.kill()
        counts.kills["kernel"] += 1
        say(f"scenario 6a: killed {victim.name} (lease owner {owner}) at {recorder.doing(conv)}")
        await settle(cluster, recorder, [conv])
        turns = {t.id: t for t in await list_turns(cluster.store_stub, conv)}
        done = turns[sent.turn_id]
        assert done.state == common_pb2.TURN_STATE_COMPLETED, done
        assert done.attempts == 2, "the other kernel took the turn over"
        # Each subscriber, on either transport, got every persisted event: no gap.
        persisted = {e.event_seq for e in await load_events(cluster.store_stub, conv)}
        for source in ("transport1", "transport2"):
            await recorder.wait_for(
                f"the subscriber on {source} to have every persisted event",
                lambda source=source: persisted <= recorder.by_source[(conv, source)],  # type: ignore[misc]
                10,
            )
        problems: list[str] = []
        # Any transport serves the conversation after the kill.
        for i in (0, 1):
            problems += await new_message_works(send_via_transport(cluster, i), recorder, conv)
        problems += await check(cluster, recorder, [conv], snapshots, counts)
        say(counts.line("scenario 6a (postgres)"))
        report(problems, cluster)
    finally:
        await recorder.close()
        await cluster.close()


@pytest.mark.timeout(120)
async def test_a_transport_killed_mid_turn_its_client_resumes_on_the_other_with_no_gap(
    tmp_path: Path, postgres_url: str
) -> None:
    cluster = await _cluster(tmp_path, postgres_url)
    recorder = Recorder()
    snapshots = Snapshots()
    counts = Counts()
    try:
        conv = await cluster.create_conversation()
        # A client behind a load balancer: transport 1 while it runs, else transport 2.
        recorder.follow(conv, "client", via_transport(cluster, 0, 1))
        sent = await send(send_via_transport(cluster, 0, 1), recorder, conv, "go")
        assert sent is not None
        await recorder.wait_for(
            "the turn's third step",
            lambda: any(e.step_id.endswith("#2") for e in recorder.received(conv)),
            20,
        )
        await snapshots.take(cluster.store_stub, [conv])
        cluster.transports[0].kill()
        counts.kills["transport"] += 1
        say(f"scenario 6b: killed transport 1 at {recorder.doing(conv)}")
        await settle(cluster, recorder, [conv])
        assert any(e.kind == "turn_sealed" for e in recorder.received(conv))
        assert recorder.subscriptions >= 2, "the client subscribed again, to the other transport"
        problems = await new_message_works(send_via_transport(cluster, 0, 1), recorder, conv)
        problems += await check(cluster, recorder, [conv], snapshots, counts)
        say(counts.line("scenario 6b (postgres)"))
        report(problems, cluster)
    finally:
        await recorder.close()
        await cluster.close()
