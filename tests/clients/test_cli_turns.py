"""`dispatch turns` and the Renderer's lines for a turn's recovery events."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable

import pytest
from google.protobuf import timestamp_pb2

from dispatch.v1 import store_pb2
from dispatch_client import DispatchClient
from dispatch_client._proto import common_pb2
from dispatch_client.cli import Renderer, main, turn_json, turn_line, turn_status
from tests.clients.conftest import MakeStack
from tests.clients.test_cli import Ran
from tests.stack import TENANT, Stack
from tests.transport.test_turns_api import MISSING_TURN, SCRIPT, three_turns

S = common_pb2


def rendered(*events: common_pb2.AgentEvent) -> list[str]:
    out = io.StringIO()
    renderer = Renderer(out)
    for event in events:
        renderer.event(event)
    return out.getvalue().splitlines()


def test_the_recovery_events_each_get_a_line_of_their_own() -> None:
    assert rendered(
        S.AgentEvent(text_delta=S.TextDelta(text="half a sen")),
        S.AgentEvent(
            turn_interrupted=S.TurnInterrupted(
                attempt=1, reason="the kernel is shutting down", resumable=True
            )
        ),
        S.AgentEvent(
            events_lost=S.EventsLost(first_event_seq=12, last_event_seq=40, reason="kernel crashed")
        ),
        S.AgentEvent(turn_resumed=S.TurnResumed(attempt=2, from_step_index=3, reason="lease expired")),
        S.AgentEvent(text_delta=S.TextDelta(text="A sentence.")),
    ) == [
        "half a sen",
        "⏸ interrupted: the kernel is shutting down (resumable: another kernel continues it)",
        "(events 12-40 were lost: kernel crashed)",
        "↻ resumed (attempt 2) from step 3: lease expired",
        "A sentence.",
    ]


def test_the_recovery_lines_without_reasons_and_the_last_attempt() -> None:
    assert rendered(
        S.AgentEvent(turn_resumed=S.TurnResumed(attempt=3, from_step_index=0)),
        S.AgentEvent(events_lost=S.EventsLost(first_event_seq=7, last_event_seq=7)),
        S.AgentEvent(turn_interrupted=S.TurnInterrupted(attempt=3, reason="lease expired")),
        S.AgentEvent(turn_done=S.TurnDone(finish_reason=S.FINISH_REASON_INTERRUPTED, steps=1)),
    ) == [
        "↻ resumed (attempt 3) from step 0",
        "(event 7 was lost: their kernel went away)",
        "⏸ interrupted: lease expired (not resumable: attempt 3 was the last)",
        "— interrupted · 1 step(s) · 0 in / 0 out tokens · 0.00s",
    ]


def test_an_interrupted_turn_exits_1() -> None:
    renderer = Renderer(io.StringIO())
    renderer.event(S.AgentEvent(turn_done=S.TurnDone(finish_reason=S.FINISH_REASON_INTERRUPTED)))
    renderer.event(S.AgentEvent(turn_sealed=S.TurnSealed(state=S.TURN_STATE_FAILED)))
    assert turn_status(renderer) == 1


def stamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def test_a_turn_line_shows_the_lease_only_while_the_turn_runs() -> None:
    start = 1_796_000_000  # 2026-11-30 00:53:20 UTC
    running = S.Turn(
        id="turn_a",
        state=S.TURN_STATE_RUNNING,
        attempts=2,
        lease_owner="kernel-7f3",
        lease_epoch=2,
        created_at=stamp(start),
        started_at=stamp(start + 0.25),
    )
    assert turn_line(running) == (
        "turn_a  running    attempts 2  lease kernel-7f3  created 2026-11-30 00:53:20  started +0.25s"
    )
    failed = S.Turn(
        id="turn_b",
        state=S.TURN_STATE_FAILED,
        attempts=3,
        lease_owner="kernel-7f3",  # left behind: not shown once the turn is over
        finish_reason=S.FINISH_REASON_INTERRUPTED,
        error_message="gave up after 3 attempts\nlast: lease expired",
        created_at=stamp(start),
        started_at=stamp(start + 1),
        ended_at=stamp(start + 61.5),
    )
    assert turn_line(failed) == (
        "turn_b  failed     attempts 3  interrupted  created 2026-11-30 00:53:20  started +1.00s  "
        "ended +61.50s  error: gave up after 3 attempts … (+1 lines)"
    )
    assert turn_line(S.Turn(id="turn_c", state=S.TURN_STATE_QUEUED)) == "turn_c  queued     attempts 0"


def test_a_turn_as_json_names_state_and_finish_and_keeps_numbers_numbers() -> None:
    turn = S.Turn(
        id="turn_a",
        conversation_id="conv_a",
        state=S.TURN_STATE_ABORTED,
        finish_reason=S.FINISH_REASON_MAX_STEPS,
        lease_epoch=4,
        user_message_seq=9,
        created_at=stamp(1_796_000_000),
    )
    assert json.loads(turn_json(turn)) == {
        "id": "turn_a",
        "conversation_id": "conv_a",
        "state": "aborted",
        "attempts": 0,
        "finish_reason": "max_steps",
        "lease_epoch": 4,
        "user_message_seq": 9,
        "created_at": "2026-11-30T00:53:20Z",
    }
    assert "finish_reason" not in json.loads(turn_json(S.Turn(id="t", state=S.TURN_STATE_RUNNING)))


# ------------------------------------------------------------ the command, run


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack(SCRIPT)


@pytest.fixture
def cli(stack: Stack, capsys: pytest.CaptureFixture[str]) -> Callable[..., Awaitable[Ran]]:
    """Runs ``dispatch ARGS`` in-process, in a thread (the stack serves from this loop)."""

    async def run(*argv: str, key: str | None = None) -> Ran:
        options = [
            "--address",
            stack.address("transport"),
            "--api-key",
            stack.api_key if key is None else key,
        ]
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*options, *argv])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


async def test_turns_lists_one_line_per_turn_and_filters_by_state(
    stack: Stack, cli: Callable[..., Awaitable[Ran]]
) -> None:
    conv, ids = await three_turns(stack)
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        expected = [turn_line(await client.get_turn(conv, turn_id)) for turn_id in ids]
    listed = await cli("turns", conv)
    assert listed.code == 0, listed.err
    lines = listed.out.splitlines()
    # The running turn's line is as the store has it now (its lease may be renewed meanwhile).
    assert lines[:2] == expected[:2]
    assert [line.split()[:2] for line in lines] == [
        [ids[0], "completed"],
        [ids[1], "completed"],
        [ids[2], "running"],
    ]
    stored = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=ids[0]))
    assert f"  attempts {stored.attempts}  stop  created " in lines[0] and "  ended +" in lines[0]
    assert "ended" not in lines[2] and "started +" in lines[2]

    running = await cli("turns", conv, "--state", "running")
    assert [line.split()[0] for line in running.out.splitlines()] == [ids[2]]
    both = await cli("turns", conv, "--state", "RUNNING", "--state", "TURN_STATE_COMPLETED")
    assert [line.split()[0] for line in both.out.splitlines()] == ids
    none = await cli("turns", conv, "--state", "failed")
    assert (none.code, none.out) == (0, "")


async def test_turns_shows_one_turn_and_prints_json(stack: Stack, cli: Callable[..., Awaitable[Ran]]) -> None:
    conv, ids = await three_turns(stack)
    one = await cli("turns", conv, ids[1])
    assert one.code == 0, one.err
    async with DispatchClient(stack.address("transport"), api_key=stack.api_key) as client:
        assert one.out == turn_line(await client.get_turn(conv, ids[1])) + "\n"
    assert one.out.startswith(f"{ids[1]}  completed  attempts ")

    as_json = (await cli("turns", conv, "--json")).json_lines()
    assert [(t["id"], t["state"]) for t in as_json] == [
        (ids[0], "completed"),
        (ids[1], "completed"),
        (ids[2], "running"),
    ]
    stored = await stack.store.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=ids[0]))
    assert as_json[0]["attempts"] == stored.attempts and isinstance(as_json[0]["lease_epoch"], int)
    assert as_json[0]["finish_reason"] == "stop" and as_json[0]["conversation_id"] == conv
    assert as_json[0]["ended_at"].endswith("Z") and "finish_reason" not in as_json[2]
    [single] = (await cli("turns", conv, ids[2], "--json")).json_lines()
    assert (single["id"], single["state"]) == (ids[2], "running")


async def test_turns_failures_exit_with_their_status(
    stack: Stack, cli: Callable[..., Awaitable[Ran]], capsys: pytest.CaptureFixture[str]
) -> None:
    conv, ids = await three_turns(stack)
    missing = await cli("turns", conv, MISSING_TURN)
    assert missing.code == 4 and f"dispatch: NOT_FOUND: turn {MISSING_TURN} not found" in missing.err
    malformed = await cli("turns", conv, "turn_1")
    assert malformed.code == 6 and "turn_id 'turn_1' is malformed" in malformed.err
    theirs = await cli("turns", conv, key=await stack.new_key("other"))
    assert theirs.code == 4 and "NOT_FOUND" in theirs.err

    for argv in (["turns", conv, "--state", "asleep"], ["turns", conv, ids[0], "--state", "running"]):
        with pytest.raises(SystemExit) as usage:
            main(argv)
        assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'asleep'" in err and "--state filters the list" in err
