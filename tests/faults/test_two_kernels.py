"""Scenario 3: two kernels on one store, each on its own fixed port, the test talking to the
kernels directly. The one running two conversations' turns is killed with SIGKILL; the other
claims both turns and finishes them, while its own conversation's turn runs on undisturbed.
Then the first, restarted, is frozen with SIGSTOP past a turn's lease and let go once the
other has claimed the turn.

A turn never runs on both: each kernel replays its own script, whose words name it ("[k1]",
"k1 step1"), so every persisted event says which kernel made it; within one attempt (from its
turn_started or turn_resumed to the next) they are all one kernel's, the first attempt's
kernel1's and the second's kernel2's."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from dispatch.v1 import common_pb2
from tests.faults.harness import (
    Cluster,
    Counts,
    KernelSettings,
    Recorder,
    Seen,
    Snapshots,
    check,
    journal_turn,
    list_turns,
    load_events,
    new_message_works,
    report,
    say,
    send,
    send_via_kernel,
    settle,
    state_name,
    via_kernel,
    write_script,
)

pytestmark = pytest.mark.e2e

LABEL = re.compile(r"\bk([12])\b")


def made_by(event: common_pb2.AgentEvent) -> str:
    """Which kernel's script wrote the event ("k1", "k2"), or "" when nothing says (a tool's
    output reads the journal both write)."""
    kind = event.WhichOneof("kind")
    if kind == "text_delta":
        words = event.text_delta.text
    elif kind == "reasoning_delta":
        words = event.reasoning_delta.text
    elif kind == "tool_call":
        words = event.tool_call.input_json
    else:
        return ""
    found = {f"k{m}" for m in LABEL.findall(words)}
    assert len(found) <= 1, words
    return found.pop() if found else ""


def attempts_by_kernel(events: Sequence[common_pb2.AgentEvent], turn_id: str) -> list[tuple[int, set[str]]]:
    """The turn's persisted attempts in event_seq order: (attempt, the kernels that made its events)."""
    out: list[tuple[int, set[str]]] = []
    for event in events:
        if event.turn_id != turn_id:
            continue
        if event.HasField("turn_started"):
            out.append((1, set()))
        elif event.HasField("turn_resumed"):
            out.append((event.turn_resumed.attempt, set()))
        label = made_by(event)
        if label:
            if not out:
                out.append((0, set()))  # events before any start: itself a violation
            out[-1][1].add(label)
    return out


async def check_one_kernel_per_attempt(
    cluster: Cluster, conv: str, turn_id: str, first: str, later: str = "k2"
) -> list[str]:
    """Every persisted attempt of the turn was made by one kernel: the first by ``first``,
    the recovered ones by ``later``. (An attempt may make no event of its own: one that only
    had to seal a turn committed through its last step.)"""
    events = await load_events(cluster.store_stub, conv)
    attempts = attempts_by_kernel(events, turn_id)
    say(f"  turn {turn_id}: attempts {[(a, sorted(k)) for a, k in attempts]}")
    problems = []
    # (The first attempts' events may all be lost: a kernel that dies before its first commit.)
    numbers = [a for a, _ in attempts]
    if numbers != sorted(set(numbers)) or not numbers or numbers[0] < 1:
        problems.append(f"{conv}: turn {turn_id}: attempts in event order {numbers}")
    for attempt, kernels in attempts:
        allowed = {first} if attempt == 1 else {later}
        if not kernels <= allowed:
            problems.append(
                f"{conv}: turn {turn_id}: attempt {attempt} has events of {sorted(kernels)}; "
                f"expected only {sorted(allowed)}'s"
            )
    return problems


def _brief(seen: Seen) -> str:
    event = common_pb2.AgentEvent.FromString(seen.data)
    if seen.kind == "tool_result":
        return f"{event.tool_result.name}: {event.tool_result.content[:60]}"
    if seen.kind == "tool_call":
        return event.tool_call.name
    return ""


async def two_kernels(tmp_path: Path, database_url: str) -> Cluster:
    scripts = [write_script(tmp_path / f"k{i}.json", journal_turn(f"k{i}")) for i in (1, 2)]
    cluster = Cluster(tmp_path, database_url, scripts, KernelSettings(), transport=False)
    await cluster.start()
    return cluster


@pytest.mark.timeout(120)
async def test_the_other_kernel_takes_over(tmp_path: Path, database_url: str, seed: int) -> None:
    rng = random.Random(seed)
    name = f"scenario 3 ({database_url.split(':', 1)[0]})"
    cluster = await two_kernels(tmp_path, database_url)
    recorder = Recorder()
    snapshots = Snapshots()
    counts = Counts()
    try:
        names = {n: await cluster.create_conversation() for n in "ABCD"}
        convs = list(names.values())
        for conv in convs:
            recorder.follow(conv, "kernel1", via_kernel(cluster, 0))
            recorder.follow(conv, "kernel2", via_kernel(cluster, 1))
        on1, on2 = send_via_kernel(cluster, 0), send_via_kernel(cluster, 1)
        kernel1 = cluster.kernels[0]

        # SIGKILL: kernel1 runs A's and B's turns, kernel2 C's.
        a = await send(on1, recorder, names["A"], "A on kernel1")
        b = await send(on1, recorder, names["B"], "B on kernel1")
        c = await send(on2, recorder, names["C"], "C on kernel2")
        assert a and b and c
        await recorder.wait_for(
            "both of kernel1's turns to stream",
            lambda: all(any(e.kind == "text_delta" for e in recorder.received(names[n])) for n in "AB"),
            15,
        )
        delay = rng.uniform(0.0, 1.0)
        await asyncio.sleep(delay)
        await snapshots.take(cluster.store_stub, convs)
        doing = "; ".join(f"{n}: {recorder.doing(names[n])}" for n in "ABC")
        kernel1.kill()
        counts.kills["kernel1"] += 1
        killed = time.monotonic()
        say(f"{name}: seed {seed}: kernel1 killed {delay:.2f}s into its turns; doing: {doing}")
        await settle(cluster, recorder, convs)
        say(f"{name}: settled {time.monotonic() - killed:.2f}s after the kill")
        problems: list[str] = []
        for sent, first in ((a, "k1"), (b, "k1"), (c, "k2")):
            turn = next(
                t for t in await list_turns(cluster.store_stub, sent.conversation_id) if t.id == sent.turn_id
            )
            say(f"  {sent.text}: {state_name(turn.state)} after {turn.attempts} attempt(s)")
            if turn.state != common_pb2.TURN_STATE_COMPLETED:
                problems.append(f"{sent.text}: turn {turn.id} ended {state_name(turn.state)}")
            problems += await check_one_kernel_per_attempt(cluster, sent.conversation_id, sent.turn_id, first)

        # SIGSTOP: kernel1 (restarted) runs D's turn and is frozen past its lease; it comes back
        # still believing it runs the turn, after kernel2 has claimed it. Nothing it does then
        # may land: its writes are fenced, and what it still sends its subscribers lies in the
        # range kernel2 announced lost; no tool of its may run any more.
        await kernel1.start()
        journal = cluster.workspace / "journal.txt"
        offset = len(journal.read_text().splitlines())
        d = await send(on1, recorder, names["D"], "D on kernel1")
        assert d is not None
        await recorder.wait_for(
            "kernel1's turn to stream",
            lambda: any(
                e.turn_id == d.turn_id and e.kind == "text_delta" for e in recorder.received(names["D"])
            ),
            15,
        )
        await snapshots.take(cluster.store_stub, [names["D"]])
        doing = recorder.doing(names["D"])
        kernel1.freeze()
        counts.kills["kernel1 (SIGSTOP)"] += 1
        say(f"{name}: kernel1 frozen ({doing})")
        await recorder.wait_for(
            "kernel2 to resume the turn",
            lambda: any(
                e.turn_id == d.turn_id and e.kind == "turn_resumed" and e.source == "kernel2"
                for e in recorder.received(names["D"])
            ),
            20,
        )
        thawed = time.monotonic()
        kernel1.thaw()
        await settle(cluster, recorder, convs)
        await asyncio.sleep(0.5)  # whatever kernel1 still sends, it has sent by now
        after = [e for e in recorder.received(names["D"]) if e.source == "kernel1" and e.at >= thawed]
        say(
            f"{name}: kernel2 resumed D's turn; kernel1, let go, sent {len(after)} event(s) more: "
            f"{[(e.seq, e.kind, _brief(e)) for e in after]}"
        )
        problems += await check_one_kernel_per_attempt(cluster, names["D"], d.turn_id, "k1")
        lines = journal.read_text().splitlines()[offset:]
        say(f"{name}: D's journal lines: {lines}")
        first_k2 = next((i for i, line in enumerate(lines) if line.startswith("k2")), len(lines))
        late = [line for line in lines[first_k2:] if line.startswith("k1")]
        if late:
            problems.append(f"kernel1 ran tools after kernel2 took D's turn over: {late}")

        # Both kernels take new messages on every conversation.
        for found in await asyncio.gather(*(new_message_works(on2, recorder, conv) for conv in convs)):
            problems += found
        problems += await new_message_works(on1, recorder, names["A"])
        problems += await check(cluster, recorder, convs, snapshots, counts)
        say(counts.line(name, seed))
        report(problems, cluster, seed)
    finally:
        await recorder.close()
        await cluster.close()
