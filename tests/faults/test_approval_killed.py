"""Scenario 5 (issue 13, point 4): a tool call waits for approval and its kernel is killed
with SIGKILL. The approval stays pending in the store; the restarted kernel takes the turn
over, announces the approval again (same id) and waits; approving it through the public API
runs the call once, and the turn completes. Then every guarantee is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.v1 import common_pb2, transport_pb2
from tests.faults.harness import (
    Cluster,
    Counts,
    KernelSettings,
    Recorder,
    Snapshots,
    call,
    check,
    list_turns,
    load_history,
    new_message_works,
    report,
    say,
    send,
    send_via_transport,
    settle,
    text,
    via_transport,
    write_script,
)

pytestmark = pytest.mark.e2e

FILE = "approved.txt"
COMMAND = f"echo ran >> {FILE}"


def requested(recorder: Recorder, conv: str) -> list[common_pb2.Approval]:
    return [
        common_pb2.AgentEvent.FromString(e.data).approval_requested.approval
        for e in recorder.received(conv)
        if e.kind == "approval_requested"
    ]


@pytest.mark.timeout(90)
async def test_approve_after_the_kernel_was_killed_while_the_call_waited(
    tmp_path: Path, database_url: str
) -> None:
    backend = database_url.split(":", 1)[0]
    steps = [
        [text("Asking first."), call("shell", command=COMMAND), call("list_dir")],
        [text("Done.")],
    ]
    settings = KernelSettings(permissions='shell = "ask"')
    cluster = Cluster(tmp_path, database_url, [write_script(tmp_path / "script.json", steps)], settings)
    await cluster.start()
    recorder = Recorder()
    snapshots = Snapshots()
    counts = Counts()
    try:
        conv = await cluster.create_conversation()
        recorder.follow(conv, "transport", via_transport(cluster))
        via = send_via_transport(cluster)
        sent = await send(via, recorder, conv, "run it once I say so")
        assert sent is not None and not sent.queued
        await recorder.wait_for("the approval request", lambda: bool(requested(recorder, conv)), 20)
        [asked] = requested(recorder, conv)
        await snapshots.take(cluster.store_stub, [conv])
        say(f"scenario 5 ({backend}): kill while {asked.id} waits for its decision")
        cluster.kernels[0].kill()
        counts.kills["kernel"] += 1
        await cluster.kernels[0].start()

        # The restarted kernel takes the turn over (attempt 2) and waits for the same approval.
        async def taken_over() -> bool:
            [turn] = [t for t in await list_turns(cluster.store_stub, conv) if t.id == sent.turn_id]
            return turn.attempts == 2 and turn.state == common_pb2.TURN_STATE_WAITING_FOR_APPROVAL

        await recorder.wait_for(
            "the approval announced again", lambda: len(requested(recorder, conv)) >= 2, 20
        )
        assert {a.id for a in requested(recorder, conv)} == {asked.id}
        assert await taken_over()
        assert not (cluster.workspace / FILE).exists(), "the call ran before it was approved"

        decided = await cluster.transport_stub.ResolveApproval(
            transport_pb2.PublicResolveApprovalRequest(
                approval_id=asked.id, decision=common_pb2.APPROVAL_DECISION_APPROVE, remember=True
            ),
            metadata=cluster.metadata,
            timeout=10,
        )
        assert decided.decision == common_pb2.APPROVAL_DECISION_APPROVE and decided.decided_by
        await settle(cluster, recorder, [conv])

        [turn] = [t for t in await list_turns(cluster.store_stub, conv) if t.id == sent.turn_id]
        assert (turn.state, turn.attempts) == (common_pb2.TURN_STATE_COMPLETED, 2)
        assert (cluster.workspace / FILE).read_text().split() == ["ran"]
        history = await load_history(cluster.store_stub, conv)
        results = {
            c.tool_result.tool_call_id: c.tool_result
            for m in history
            if m.turn_id == sent.turn_id
            for c in m.chunks
            if c.HasField("tool_result")
        }
        assert not results[asked.tool_call_id].is_error, results[asked.tool_call_id]
        say(
            f"scenario 5 ({backend}): approved after the kill; the shell ran once; "
            f"{len(requested(recorder, conv))} approval_requested events for one approval"
        )
        # Remembered: the next turn's same call runs without asking, so it can be sealed.
        problems = await new_message_works(via, recorder, conv)
        problems += await check(cluster, recorder, [conv], snapshots, counts)
        say(counts.line(f"scenario 5 ({backend})"))
        report(problems, cluster)
    finally:
        await recorder.close()
        await cluster.close()
