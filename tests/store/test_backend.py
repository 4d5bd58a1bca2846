"""The rules every backend shares: the turn state machine, append checks, page tokens."""

from __future__ import annotations

import base64

import pytest

from dispatch.shared.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from dispatch.store.backend import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    check_event_seqs,
    check_transition,
    decode_cursor,
    effective_page_size,
    encode_cursor,
    initial_state,
    validate_append,
)
from dispatch.v1 import common_pb2
from tests.store.harness import CONTRACT_TRANSITIONS, delta_event, text_message

STATES = [s for s in common_pb2.TurnState.values() if s != common_pb2.TURN_STATE_UNSPECIFIED]


@pytest.mark.parametrize("current", STATES, ids=common_pb2.TurnState.Name)
@pytest.mark.parametrize("to", STATES, ids=common_pb2.TurnState.Name)
def test_state_machine_matches_the_contract(current: int, to: int) -> None:
    if to in CONTRACT_TRANSITIONS[current]:
        check_transition("turn_x", current, to)  # type: ignore[arg-type]
    else:
        with pytest.raises(FailedPrecondition):
            check_transition("turn_x", current, to)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("current", "to", "message"),
    [
        (
            common_pb2.TURN_STATE_COMPLETED,
            common_pb2.TURN_STATE_RUNNING,
            "turn t1 is completed; cannot move to running (it has ended)",
        ),
        (
            common_pb2.TURN_STATE_QUEUED,
            common_pb2.TURN_STATE_COMPLETED,
            "turn t1 is queued; cannot move to completed (from there it may move to running, aborted)",
        ),
    ],
)
def test_a_refused_transition_says_where_the_turn_is_and_may_go(
    current: common_pb2.TurnState.ValueType, to: common_pb2.TurnState.ValueType, message: str
) -> None:
    with pytest.raises(FailedPrecondition) as info:
        check_transition("t1", current, to)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (common_pb2.TURN_STATE_UNSPECIFIED, common_pb2.TURN_STATE_QUEUED),
        (common_pb2.TURN_STATE_QUEUED, common_pb2.TURN_STATE_QUEUED),
        (common_pb2.TURN_STATE_RUNNING, common_pb2.TURN_STATE_RUNNING),
        (common_pb2.TURN_STATE_RESUMING, None),
        (common_pb2.TURN_STATE_COMPLETED, None),
    ],
)
def test_initial_state(
    given: common_pb2.TurnState.ValueType, expected: common_pb2.TurnState.ValueType | None
) -> None:
    if expected is None:
        with pytest.raises(InvalidArgument):
            initial_state(given)
    else:
        assert initial_state(given) == expected


@pytest.mark.parametrize(("created", "row_id"), [(0, "ws_a"), (1_700_000_000_123_456_789, "conv_b:c")])
def test_page_cursor_round_trips(created: int, row_id: str) -> None:
    assert decode_cursor(encode_cursor(created, row_id)) == (created, row_id)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize("token", ["!!", "a", _b64(b"no-colon"), _b64(b"soon:ws_a"), _b64(b"\xff\xfe:ws_a")])
def test_a_token_the_store_did_not_issue_is_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_cursor(token)


def test_the_empty_token_is_the_first_page() -> None:
    assert decode_cursor("") is None


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(0, DEFAULT_PAGE_SIZE), (1, 1), (MAX_PAGE_SIZE, MAX_PAGE_SIZE), (MAX_PAGE_SIZE + 1, MAX_PAGE_SIZE)],
)
def test_page_size(requested: int, expected: int) -> None:
    assert effective_page_size(requested) == expected


def test_append_size_is_capped_at_the_byte() -> None:
    msg = text_message("x" * 100)
    event = delta_event(1)
    exact = msg.ByteSize() + event.ByteSize()
    validate_append("conv_a", [msg], [event], max_bytes=exact)
    with pytest.raises(ResourceExhausted, match=f"append of {exact} bytes"):
        validate_append("conv_a", [msg], [event], max_bytes=exact - 1)


@pytest.mark.parametrize(
    ("last", "seqs", "ok"),
    [
        (0, [1, 2, 3], True),
        (0, [5, 9], True),  # gaps are the kernel's business; only order is checked
        (3, [4], True),
        (3, [3], False),
        (0, [0], False),
        (0, [2, 2], False),
        (0, [2, 1], False),
    ],
)
def test_event_seqs_must_rise_strictly_above_the_last(last: int, seqs: list[int], ok: bool) -> None:
    events = [delta_event(s) for s in seqs]
    if ok:
        check_event_seqs(events, last)
    else:
        with pytest.raises(InvalidArgument, match="event_seq"):
            check_event_seqs(events, last)
