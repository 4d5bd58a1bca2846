"""The rules every backend shares: the turn state machine, append checks, page tokens,
leases and fences, event_seq reservations."""

from __future__ import annotations

import base64

import pytest

from dispatch.shared.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from dispatch.store.backend import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Lease,
    LeaseFence,
    check_event_seqs,
    check_fence,
    check_lease_held,
    check_lease_release,
    check_transition,
    claimed_lease_fields,
    decode_cursor,
    effective_page_size,
    encode_cursor,
    holds_lease,
    initial_state,
    new_turn_row,
    released_lease_fields,
    reservation_after_append,
    validate_append,
)
from dispatch.store.postgres import MIGRATIONS as postgres_migrations
from dispatch.store.sql import UNENDED
from dispatch.store.sqlite import MIGRATIONS as sqlite_migrations
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


# ------------------------------------------------------------ durable turns

NOW = 1_800_000_000 * 10**9


def lease(
    state: common_pb2.TurnState.ValueType = common_pb2.TURN_STATE_RUNNING,
    owner: str = "k1",
    epoch: int = 1,
    expires: int = NOW + 1,
) -> Lease:
    return Lease("turn_x", "conv_x", state, owner, epoch, expires)


@pytest.mark.parametrize(
    ("held", "owner", "epoch", "holds"),
    [
        pytest.param(lease(), "k1", 1, True, id="owner-and-epoch"),
        pytest.param(lease(), "k1", 0, True, id="any-epoch"),
        pytest.param(lease(expires=NOW - 10), "k1", 1, True, id="expired-but-unclaimed"),
        pytest.param(lease(epoch=2), "k1", 1, False, id="a-later-claim"),
        pytest.param(lease(), "k2", 1, False, id="another-owner"),
        pytest.param(lease(owner=""), "k1", 1, False, id="released"),
        pytest.param(lease(owner=""), "", 0, False, id="nobody-is-not-an-owner"),
        pytest.param(lease(state=common_pb2.TURN_STATE_COMPLETED), "k1", 1, False, id="ended"),
        pytest.param(lease(state=common_pb2.TURN_STATE_QUEUED), "k1", 1, True, id="queued"),
        pytest.param(lease(state=common_pb2.TURN_STATE_RESUMING), "k1", 1, True, id="resuming"),
    ],
)
def test_who_holds_a_lease(held: Lease, owner: str, epoch: int, holds: bool) -> None:
    assert holds_lease(held, owner, epoch) is holds
    if holds:
        check_lease_held(held, owner, epoch)
    else:
        with pytest.raises(FailedPrecondition, match=r"^lease lost: turn turn_x "):
            check_lease_held(held, owner, epoch)


def test_a_fence_on_a_turn_of_another_conversation_is_lost() -> None:
    fence = LeaseFence(turn_id="turn_x", owner="k1", epoch=1)
    check_fence(fence, lease(), "conv_x")
    for found in (None, Lease("turn_x", "conv_y", common_pb2.TURN_STATE_RUNNING, "k1", 1, NOW)):
        with pytest.raises(
            FailedPrecondition, match=r"^lease lost: turn turn_x is not a turn of conversation conv_x"
        ):
            check_fence(fence, found, "conv_x")


@pytest.mark.parametrize(
    ("held", "owner", "epoch", "outcome"),
    [
        pytest.param(lease(), "k1", 0, True, id="holder"),
        pytest.param(lease(), "k1", 1, True, id="holder-with-its-epoch"),
        pytest.param(lease(state=common_pb2.TURN_STATE_FAILED), "k1", 1, True, id="holder-of-an-ended-turn"),
        pytest.param(lease(owner=""), "k1", 0, False, id="nobody-holds-it"),
        pytest.param(lease(owner="k2", expires=NOW - 1), "k1", 0, False, id="another-expired"),
        pytest.param(lease(owner="k2"), "k1", 0, None, id="another-live"),
        pytest.param(lease(epoch=2), "k1", 1, None, id="a-later-live-claim"),
    ],
)
def test_what_a_release_does(held: Lease, owner: str, epoch: int, outcome: bool | None) -> None:
    if outcome is None:
        with pytest.raises(FailedPrecondition, match="only the holder may release it"):
            check_lease_release(held, owner, epoch, NOW)
    else:
        assert check_lease_release(held, owner, epoch, NOW) is outcome


@pytest.mark.parametrize(
    # (reserved, last_event_seq, asked, lowered, next turn's, after)
    "case",
    [
        (5, 3, 0, False, None, 5),  # kept
        (5, 3, 4, False, None, 5),  # never lowered by asking
        (5, 3, 9, False, None, 9),  # raised
        (5, 8, 0, False, None, 8),  # never below what is persisted
        (9, 4, 20, True, None, 4),  # a seal or release lowers it to what is persisted
        (9, 4, 0, True, 12, 12),  # ...and a next turn raises it again
        (9, 4, 0, True, 2, 4),  # never below what is persisted
    ],
)
def test_the_reservation_after_an_append(case: tuple[int, int, int, bool, int | None, int]) -> None:
    reserved, last, asked, lowered, next_reserve, after = case
    got = reservation_after_append(reserved, last, asked, lowered=lowered, next_turn_reserve=next_reserve)
    assert got == after


def test_a_claim_is_a_new_epoch_and_attempt_and_a_release_keeps_the_epoch() -> None:
    assert claimed_lease_fields(lease(epoch=3), 2, "k9", NOW + 5) == {
        "lease_owner": "k9",
        "lease_expires_at": NOW + 5,
        "lease_epoch": 4,
        "attempts": 3,
    }
    assert "lease_epoch" not in released_lease_fields()


def test_a_turn_born_leased_is_its_first_attempt_under_epoch_1() -> None:
    leased = new_turn_row(
        "turn_a",
        "t",
        "conv_a",
        state=common_pb2.TURN_STATE_RUNNING,
        now_ns=NOW,
        lease_owner="k1",
        lease_expires_at=NOW + 9,
    )
    assert (leased["lease_epoch"], leased["attempts"], leased["started_at"]) == (1, 1, NOW)
    plain = new_turn_row(
        "turn_b", "t", "conv_a", state=common_pb2.TURN_STATE_QUEUED, now_ns=NOW, lease_expires_at=NOW + 9
    )
    assert (plain["lease_epoch"], plain["attempts"], plain["started_at"], plain["lease_expires_at"]) == (
        0,
        0,
        0,
        0,
    )


@pytest.mark.parametrize("migrations", [sqlite_migrations, postgres_migrations], ids=["sqlite", "postgres"])
def test_the_partial_indexes_say_not_ended_as_the_queries_do(
    migrations: tuple[tuple[int, tuple[str, ...]], ...],
) -> None:
    # The planners use a partial index only for a query whose WHERE carries its predicate.
    assert UNENDED == "state NOT IN (5, 6, 7, 8)"
    [(_, statements)] = [m for m in migrations if m[0] == 4]
    indexes = [s for s in statements if s.startswith("CREATE INDEX")]
    assert len(indexes) == 2 and all(s.endswith(f" WHERE {UNENDED}") for s in indexes)
