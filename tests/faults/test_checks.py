"""The checks the fault scenarios end with catch what they claim to: each is fed a record
that breaks one guarantee (no processes; the scenarios run the real ones)."""

from __future__ import annotations

import time

from dispatch.v1 import common_pb2
from tests.faults import harness
from tests.faults.harness import Counts, Recorder, Sent, Snapshots

CONV = "conv_1"


def event(seq: int, turn: str = "turn_1", **kind: object) -> common_pb2.AgentEvent:
    if not kind:
        kind = {"text_delta": common_pb2.TextDelta(text=f"word {seq}")}
    return common_pb2.AgentEvent(conversation_id=CONV, turn_id=turn, event_seq=seq, **kind)  # type: ignore[arg-type]


def lost(first: int, last: int, seq: int) -> common_pb2.AgentEvent:
    return event(seq, events_lost=common_pb2.EventsLost(first_event_seq=first, last_event_seq=last))


def received(*events: common_pb2.AgentEvent, source: str = "client") -> Recorder:
    recorder = Recorder()
    for e in events:
        recorder._record(CONV, e, source, 0)
    return recorder


def events_problems(persisted: list[common_pb2.AgentEvent], recorder: Recorder) -> list[str]:
    return harness._check_events(CONV, persisted, recorder, Counts())


def test_events_that_hold_pass() -> None:
    # 3..5 were sent, then lost with their kernel; 6 announces it.
    persisted = [event(1), event(2), lost(3, 5, 6), event(7)]
    assert (
        events_problems(persisted, received(event(1), event(2), event(3), event(4), lost(3, 5, 6), event(7)))
        == []
    )


def test_a_received_event_neither_persisted_nor_announced_is_caught() -> None:
    persisted = [event(1), event(2), lost(4, 5, 6)]
    found = events_problems(persisted, received(event(1), event(2), event(3)))
    assert any("event_seq 3" in p and "neither persisted nor" in p for p in found), found


def test_a_reused_event_number_is_caught() -> None:
    persisted = [event(1), event(2, text_delta=common_pb2.TextDelta(text="another"))]
    found = events_problems(persisted, received(event(1), event(2)))
    assert any("event_seq 2 was received" in p for p in found), found


def test_the_same_number_twice_with_different_bytes_is_caught() -> None:
    recorder = received(event(1), event(2))
    recorder._record(CONV, event(2, text_delta=common_pb2.TextDelta(text="another")), "client", 2)
    assert recorder.conflicts


def test_a_persisted_event_in_an_announced_lost_range_is_caught() -> None:
    persisted = [event(1), lost(2, 3, 4), event(3)]
    found = events_problems(sorted(persisted, key=lambda e: e.event_seq), received(event(1)))
    assert any("lies in an announced lost range" in p for p in found), found


def test_an_unannounced_gap_is_caught() -> None:
    found = events_problems([event(1), event(5)], received(event(1), event(5)))
    assert any("2..4 are missing" in p for p in found), found


def test_a_subscriber_that_skipped_persisted_events_is_caught() -> None:
    persisted = [event(1), event(2), event(3)]
    recorder = received(event(1), event(2), event(3), source="kernel1")
    for e in (event(1), event(3)):
        recorder._record(CONV, e, "kernel2", 0)
    found = events_problems(persisted, recorder)
    assert any("subscriber kernel2 never received persisted events 2" in p for p in found), found


def message(
    seq: int, role: common_pb2.Role.ValueType, *chunks: common_pb2.Chunk, turn: str = "turn_1"
) -> common_pb2.Message:
    return common_pb2.Message(seq=seq, role=role, chunks=chunks, turn_id=turn)


def user(seq: int, words: str, turn: str = "turn_1") -> common_pb2.Message:
    return message(
        seq, common_pb2.ROLE_USER, common_pb2.Chunk(text=common_pb2.TextChunk(text=words)), turn=turn
    )


def test_a_dangling_or_doubly_answered_tool_call_is_caught() -> None:
    call = common_pb2.Chunk(tool_call=common_pb2.ToolCallChunk(id="c1", name="shell"))
    result = common_pb2.Chunk(tool_result=common_pb2.ToolResultChunk(tool_call_id="c1"))
    history = [user(1, "go"), message(2, common_pb2.ROLE_ASSISTANT, call)]
    assert harness._check_tool_calls(CONV, history, Counts())
    history.append(message(3, common_pb2.ROLE_TOOL, result))
    assert harness._check_tool_calls(CONV, history, Counts()) == []
    history.append(message(4, common_pb2.ROLE_TOOL, result))
    assert harness._check_tool_calls(CONV, history, Counts())


def test_a_lost_or_changed_committed_message_is_caught() -> None:
    snapshots = Snapshots()
    snapshots.messages[CONV] = {1: user(1, "go").SerializeToString(deterministic=True)}
    committed = received(event(1, messages_committed=common_pb2.MessagesCommitted(first_seq=1, last_seq=2)))
    found = harness._check_messages(CONV, [user(1, "go")], snapshots, committed, Counts())
    assert any("seq 2 is gone" in p for p in found), found
    found = harness._check_messages(CONV, [user(1, "went"), user(2, "x")], snapshots, committed, Counts())
    assert any("seq 1 changed" in p for p in found), found


def test_an_acknowledged_send_missing_or_doubled_is_caught() -> None:
    recorder = Recorder()
    recorder.sends.append(Sent(CONV, "hello", "k", True, "turn_1", 1, time.monotonic()))
    done = [common_pb2.Turn(id="turn_1", state=common_pb2.TURN_STATE_COMPLETED)]
    assert harness._check_sends(CONV, [user(1, "go")], done, recorder, Counts())
    assert harness._check_sends(CONV, [user(1, "hello")], done, recorder, Counts()) == []
    assert harness._check_sends(CONV, [user(1, "hello"), user(2, "hello")], done, recorder, Counts())
    running = [common_pb2.Turn(id="turn_1", state=common_pb2.TURN_STATE_RUNNING)]
    assert harness._check_sends(CONV, [user(1, "hello")], running, recorder, Counts())


def test_a_turn_left_running_is_caught() -> None:
    turns = [
        common_pb2.Turn(id="turn_1", state=common_pb2.TURN_STATE_COMPLETED),
        common_pb2.Turn(id="turn_2", state=common_pb2.TURN_STATE_RUNNING, lease_owner="kernel-x"),
    ]
    found = harness._check_turns(CONV, turns, Counts())
    assert found == [f"{CONV}: turn turn_2 left running (attempts 0)"], found
