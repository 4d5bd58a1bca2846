"""`dispatchd up` stopped mid-turn hands the turn over; started again, it continues the
turn at once (no lease to wait out) from its last committed step."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from dispatch_client import DispatchClient, types
from tests.e2e.procs import Up

pytestmark = pytest.mark.e2e

SCRIPT = {
    "steps": [
        [{"type": "tool_call", "id": "a", "name": "list_dir", "input": {}}],
        [
            {"type": "text_delta", "text": "one more look"},
            {"type": "sleep", "seconds": 1.0},
            {"type": "tool_call", "id": "b", "name": "list_dir", "input": {}},
        ],
        [{"type": "text_delta", "text": "done"}],
    ]
}


@pytest.mark.timeout(120)
def test_a_stopped_stack_hands_its_turn_over_and_the_next_start_continues_it(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    # A lease longer than the test: only a handover lets the next start continue at once.
    config = tmp_path / "dispatch.toml"
    config.write_text("[kernel]\nlease_ttl = 600\nsweep_interval = 0.2\n")
    args = ("--provider", "scripted", "--script", str(script), "--config", str(config))
    data = ("--data-dir", str(tmp_path / "data"))

    first = Up(tmp_path, *data, *args)
    first.wait_for("Dispatch is up")

    async def start_and_stop() -> tuple[str, str]:
        async with DispatchClient(first.address, api_key=first.api_key()) as client:
            conv = await client.create_conversation()
            sent = await client.send(conv.id, "look twice")
            async for event in client.subscribe(conv.id, after_event_seq=sent.after_event_seq):
                if event.HasField("text_delta"):  # step 1 streams: stop the stack now
                    first.proc.send_signal(signal.SIGTERM)
                    break
            return conv.id, sent.turn_id

    conv, turn_id = asyncio.run(start_and_stop())
    assert first.stop() == 0, first.output()

    second = Up(tmp_path, *data, *args)
    try:
        second.wait_for("Dispatch is up")

        async def follow() -> tuple[types.Turn, list[types.Message]]:
            async with DispatchClient(second.address, api_key=second.api_key()) as client:
                turn = await client.get_turn(conv, turn_id)
                async with asyncio.timeout(30):
                    while turn.state not in (types.TURN_STATE_COMPLETED, types.TURN_STATE_FAILED):
                        await asyncio.sleep(0.1)
                        turn = await client.get_turn(conv, turn_id)
                messages = [m async for m in client.iter_history(conv)]
                return turn, messages

        turn, messages = asyncio.run(follow())
    finally:
        assert second.stop() == 0, second.output()
    assert (turn.state, turn.attempts) == (types.TURN_STATE_COMPLETED, 2)
    # Step 1 finished before the handover (its boundary was within the grace): no step
    # ran twice, and the model needed no note.
    assert [m.step_index for m in messages if m.role == types.ROLE_ASSISTANT] == [0, 1, 2]
    assert not any(m.role == types.ROLE_SYSTEM for m in messages)
