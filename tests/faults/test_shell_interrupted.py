"""Scenario 4 (issue 12, point 3): a shell that appends to a file, its kernel killed with
SIGKILL while it runs. The recovered turn runs the step again, and the model is told: history
holds the runtime's note (its tools may or may not have run) before the step that ran again.
What the file shows is stated, not assumed: the line may be there once or twice."""

from __future__ import annotations

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

FILE = "appended.txt"
COMMAND = f"echo started >> {FILE}; sleep 1.2; echo finished >> {FILE}"


@pytest.mark.timeout(90)
async def test_shell_killed_while_it_appends(tmp_path: Path, database_url: str) -> None:
    backend = database_url.split(":", 1)[0]
    steps = [
        [text("Appending."), call("shell", command=COMMAND)],
        [call("read_file", path=FILE)],
        [text("Done.")],
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
        sent = await send(via, recorder, conv, "append a line")
        assert sent is not None and not sent.queued
        # Inside the shell's sleep: "started" is written, "finished" is not yet.
        await recorder.wait_for(
            "the shell to start",
            lambda: (
                (cluster.workspace / FILE).exists() and "started" in (cluster.workspace / FILE).read_text()
            ),
            15,
        )
        await snapshots.take(cluster.store_stub, [conv])
        before = (cluster.workspace / FILE).read_text()
        say(f"scenario 4 ({backend}): kill while the shell runs; {FILE} holds {before.split()} ")
        cluster.kernels[0].kill()
        counts.kills["kernel"] += 1
        await cluster.kernels[0].start()
        await settle(cluster, recorder, [conv])

        history = await load_history(cluster.store_stub, conv)
        mine = [m for m in history if m.turn_id == sent.turn_id]
        notes = [
            m
            for m in mine
            if m.role == common_pb2.ROLE_SYSTEM and "may or may not" in "".join(c.text.text for c in m.chunks)
        ]
        assert len(notes) == 1, f"expected one interrupted-step note in the turn's history, found: {mine}"
        note = notes[0]
        rerun = [m for m in mine if m.role == common_pb2.ROLE_ASSISTANT and m.step_index == note.step_index]
        assert rerun, f"no step {note.step_index} after the note: {mine}"
        assert note.seq < rerun[0].seq, "the note must come before the step that ran again"
        assert any(c.tool_call.name == "shell" for c in rerun[0].chunks), (
            "the step that ran again is the shell's"
        )
        turn_resumed = [
            common_pb2.AgentEvent.FromString(e.data).turn_resumed
            for e in recorder.received(conv)
            if e.kind == "turn_resumed" and e.turn_id == sent.turn_id
        ]
        assert [(r.attempt, r.from_step_index) for r in turn_resumed] == [(2, note.step_index)]

        lines = (cluster.workspace / FILE).read_text().split()
        say(
            f"scenario 4 ({backend}): after recovery {FILE} holds {lines}: the shell ran "
            f"{lines.count('started')} time(s), {lines.count('finished')} finished; history: note seq "
            f"{note.seq} (step {note.step_index}) before the step run again (seq {rerun[0].seq})"
        )
        # The step ran again (a second "started"); the first run may have been cut off by the
        # kill or finished anyway: either is what the model was told may have happened.
        assert lines.count("started") == 2, lines

        problems = await new_message_works(via, recorder, conv)
        problems += await check(cluster, recorder, [conv], snapshots, counts)
        say(counts.line(f"scenario 4 ({backend})"))
        report(problems, cluster)
    finally:
        await recorder.close()
        await cluster.close()
