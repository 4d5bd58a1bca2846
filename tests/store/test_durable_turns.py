"""The store contract for durable turns (issue 12): lease fences and epochs, attempts,
event_seq reservations, seal / release / next turn in one Append, leased and exclusive
CreateTurn, batch renewal, the sweep's listing and Enqueue behind a turn.

Backend-agnostic, like test_conformance: every test talks gRPC to an in-process server
from ``store_stub``, once per backend in ``conftest.BACKENDS``. Time moves only when a
test advances ``clock``; nothing sleeps (``asyncio.sleep(0)`` only yields, to shuffle
racing calls).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import pytest

from dispatch.shared.ids import new_id
from dispatch.v1 import common_pb2, store_pb2
from tests.store.harness import (
    OTHER_TENANT,
    TENANT,
    FakeClock,
    delta_event,
    new_conversation,
    rpc_error,
    seconds,
    text_message,
    text_of,
)

if TYPE_CHECKING:
    from tests.store.harness import Stub

S = common_pb2

OWNER = "kernel-1"
OTHER = "kernel-2"

UNENDED_STATES = [
    S.TURN_STATE_QUEUED,
    S.TURN_STATE_RUNNING,
    S.TURN_STATE_WAITING_FOR_APPROVAL,
    S.TURN_STATE_RESUMING,
]
# How to reach each not-ended state from running.
FROM_RUNNING: dict[int, list[int]] = {
    S.TURN_STATE_RUNNING: [],
    S.TURN_STATE_WAITING_FOR_APPROVAL: [S.TURN_STATE_WAITING_FOR_APPROVAL],
    S.TURN_STATE_RESUMING: [S.TURN_STATE_WAITING_FOR_APPROVAL, S.TURN_STATE_RESUMING],
}


# -------------------------------------------------------------------- helpers


async def leased_turn(
    stub: Stub,
    conversation_id: str,
    *,
    owner: str = OWNER,
    ttl: float = 30.0,
    state: int = S.TURN_STATE_RUNNING,
    tenant_id: str = TENANT,
    **fields: Any,
) -> common_pb2.Turn:
    return await stub.CreateTurn(
        store_pb2.CreateTurnRequest(
            tenant_id=tenant_id,
            conversation_id=conversation_id,
            state=state,  # type: ignore[arg-type]
            lease_owner=owner,
            lease_ttl=seconds(ttl),
            **fields,
        )
    )


async def turn_in_state(stub: Stub, conversation_id: str, state: int) -> common_pb2.Turn:
    """A turn leased to OWNER in a state that has not ended."""
    if state == S.TURN_STATE_QUEUED:
        return await leased_turn(stub, conversation_id, state=S.TURN_STATE_QUEUED)
    turn = await leased_turn(stub, conversation_id)
    for step in FROM_RUNNING[state]:
        turn = await move(stub, turn.id, step)
    return turn


def fence(turn: common_pb2.Turn, owner: str | None = None, epoch: int | None = None) -> store_pb2.LeaseFence:
    return store_pb2.LeaseFence(
        turn_id=turn.id,
        owner=turn.lease_owner if owner is None else owner,
        epoch=turn.lease_epoch if epoch is None else epoch,
    )


def seal(state: int = S.TURN_STATE_COMPLETED, reason: int = S.FINISH_REASON_STOP) -> store_pb2.TurnSeal:
    return store_pb2.TurnSeal(state=state, finish_reason=reason)  # type: ignore[arg-type]


def next_turn(
    state: int = S.TURN_STATE_RUNNING, ttl: float = 30.0, reserve: int = 0, agent: str = ""
) -> store_pb2.NextTurn:
    return store_pb2.NextTurn(
        state=state,  # type: ignore[arg-type]
        lease_ttl=seconds(ttl),
        reserve_event_seq=reserve,
        agent=agent,
    )


async def fenced(
    stub: Stub,
    conversation_id: str,
    lease: store_pb2.LeaseFence,
    messages: list[common_pb2.Message] | None = None,
    events: list[common_pb2.AgentEvent] | None = None,
    **fields: Any,
) -> store_pb2.AppendResponse:
    return await stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conversation_id,
            messages=messages or [],
            events=events or [],
            fence=lease,
            **fields,
        )
    )


def said(text: str) -> common_pb2.Message:
    return text_message(text, role=S.ROLE_ASSISTANT)


async def conversation(stub: Stub, conversation_id: str) -> common_pb2.Conversation:
    return await stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conversation_id)
    )


async def get_turn(stub: Stub, turn_id: str, tenant_id: str = TENANT) -> common_pb2.Turn:
    return await stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=tenant_id, turn_id=turn_id))


async def move(stub: Stub, turn_id: str, to: int, **fields: Any) -> common_pb2.Turn:
    return await stub.TransitionTurn(
        store_pb2.TransitionTurnRequest(tenant_id=TENANT, turn_id=turn_id, to=to, **fields)  # type: ignore[arg-type]
    )


async def claim(
    stub: Stub, turn_id: str, owner: str, *, ttl: float = 30.0, reserve: int = 0, tenant_id: str = TENANT
) -> common_pb2.Turn:
    return await stub.ClaimLease(
        store_pb2.ClaimLeaseRequest(
            tenant_id=tenant_id, turn_id=turn_id, owner=owner, ttl=seconds(ttl), reserve_event_seq=reserve
        )
    )


async def enqueue(
    stub: Stub, conversation_id: str, text: str, *, behind: bool = False, key: str = ""
) -> store_pb2.QueuedMessage:
    resp = await stub.Enqueue(
        store_pb2.EnqueueRequest(
            tenant_id=TENANT,
            conversation_id=conversation_id,
            message=text_message(text),
            idempotency_key=key,
            only_behind_turn=behind,
        )
    )
    return resp.queued


async def drain(stub: Stub, conversation_id: str) -> list[str]:
    resp = await stub.DrainQueue(
        store_pb2.DrainQueueRequest(tenant_id=TENANT, conversation_id=conversation_id)
    )
    return [text_of(q.message) for q in resp.messages]


async def history(stub: Stub, conversation_id: str) -> list[common_pb2.Message]:
    resp = await stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conversation_id))
    return list(resp.messages)


async def event_seqs(stub: Stub, conversation_id: str) -> list[int]:
    resp = await stub.LoadEvents(
        store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conversation_id)
    )
    return [e.event_seq for e in resp.events]


async def turns_of(stub: Stub, conversation_id: str) -> list[common_pb2.Turn]:
    resp = await stub.ListTurns(store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conversation_id))
    return list(resp.turns)


async def expired(stub: Stub, limit: int = 0) -> list[str]:
    resp = await stub.ListExpiredLeases(store_pb2.ListExpiredLeasesRequest(limit=limit))
    return [t.id for t in resp.turns]


# ---------------------------------------------------------------- migration 4


async def test_conversations_and_turns_start_with_nothing_reserved_or_attempted(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    assert (conv.last_event_seq, conv.reserved_event_seq) == (0, 0)
    plain = await store_stub.CreateTurn(
        store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert (plain.lease_owner, plain.lease_epoch, plain.attempts) == ("", 0, 0)
    # The first claim is the first attempt under epoch 1.
    claimed = await claim(store_stub, plain.id, OWNER)
    assert (claimed.lease_epoch, claimed.attempts) == (1, 1)
    assert (await get_turn(store_stub, plain.id)).lease_epoch == 1


async def test_every_conversation_answer_carries_the_reservation(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id, reserve_event_seq=12)
    assert turn.lease_epoch == 1
    assert (await conversation(store_stub, conv.id)).reserved_event_seq == 12
    listed = await store_stub.ListConversations(store_pb2.ListConversationsRequest(tenant_id=TENANT))
    assert [c.reserved_event_seq for c in listed.conversations] == [12]
    updated = await store_stub.UpdateConversation(
        store_pb2.UpdateConversationRequest(tenant_id=TENANT, conversation_id=conv.id, title="t")
    )
    assert updated.reserved_event_seq == 12


# --------------------------------------------------------------------- fences


async def test_a_fenced_append_writes_while_the_fence_holds_even_past_expiry(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    first = await fenced(store_stub, conv.id, fence(turn), [said("step 0")], [delta_event(1), delta_event(2)])
    assert (first.first_seq, first.last_seq, first.last_event_seq) == (1, 1, 2)
    assert first.turn.id == turn.id and first.turn.lease_owner == OWNER
    assert first.reserved_event_seq == 2  # never below what is persisted

    # Expired, but nobody claimed it: the owner is still the only writer.
    clock.advance(120)
    late = await fenced(store_stub, conv.id, fence(turn), [said("step 1")], [delta_event(3)])
    assert (late.first_seq, late.last_event_seq) == (2, 3)
    assert [text_of(m) for m in await history(store_stub, conv.id)] == ["step 0", "step 1"]


async def test_the_old_owner_is_fenced_off_once_another_claims_and_writes_nothing(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await fenced(store_stub, conv.id, fence(turn), [said("step 0")], [delta_event(1)], reserve_event_seq=4)
    await enqueue(store_stub, conv.id, "steer me")
    clock.advance(31)
    taken = await claim(store_stub, turn.id, OTHER, reserve=9)
    assert (taken.lease_owner, taken.lease_epoch, taken.attempts) == (OTHER, 2, 2)
    before = await conversation(store_stub, conv.id)

    for extra in (
        {},
        {"take_queue_for_turn": turn.id},
        {"seal": seal()},
        {"release_lease": True},
        {"seal": seal(), "next_turn": next_turn()},
        {"reserve_event_seq": 50},
    ):
        err = await rpc_error(
            fenced(store_stub, conv.id, fence(turn, OWNER, 1), [said("stale")], [delta_event(2)], **extra)
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, extra
        details = err.details() or ""
        assert details.startswith("lease lost:"), details
        assert turn.id in details and OTHER in details and OWNER in details

    # Nothing was written: messages, events, the queue, the turn, the conversation.
    assert [text_of(m) for m in await history(store_stub, conv.id)] == ["step 0"]
    assert await event_seqs(store_stub, conv.id) == [1]
    after = await conversation(store_stub, conv.id)
    assert (after.last_seq, after.last_event_seq, after.reserved_event_seq) == (1, 1, 9)
    assert after.reserved_event_seq == before.reserved_event_seq
    now = await get_turn(store_stub, turn.id)
    assert (now.state, now.lease_owner, now.lease_epoch) == (S.TURN_STATE_RUNNING, OTHER, 2)
    assert [t.id for t in await turns_of(store_stub, conv.id)] == [turn.id]
    # The new holder's fence holds, and the queued message is still there for it.
    steered = await fenced(store_stub, conv.id, fence(taken), [said("step 1")], take_queue_for_turn=turn.id)
    assert [text_of(m) for m in steered.messages] == ["step 1", "steer me"]


if TYPE_CHECKING:
    Breaker: TypeAlias = Callable[[Stub, str, common_pb2.Turn, FakeClock], Awaitable[store_pb2.LeaseFence]]


async def _another_owner(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    clock.advance(31)
    await claim(stub, turn.id, OTHER)
    return fence(turn)


async def _same_owner_claimed_again(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    await claim(stub, turn.id, OWNER)  # epoch 2: the fence's epoch 1 is stale
    return fence(turn)


async def _wrong_owner(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    return fence(turn, owner=OTHER)


async def _future_epoch(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    return fence(turn, epoch=7)


async def _sealed(stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock) -> store_pb2.LeaseFence:
    await fenced(stub, conv_id, fence(turn), seal=seal())
    return fence(turn)


async def _ended_by_transition(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    await move(stub, turn.id, S.TURN_STATE_ABORTED)  # ends the turn but leaves the lease row as it was
    return fence(turn)


async def _released(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    await stub.ReleaseLease(store_pb2.ReleaseLeaseRequest(tenant_id=TENANT, turn_id=turn.id, owner=OWNER))
    return fence(turn)


async def _turn_of_another_conversation(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    elsewhere = await new_conversation(stub)
    return fence(await leased_turn(stub, elsewhere.id))


async def _unknown_turn(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    return store_pb2.LeaseFence(turn_id=new_id("turn"), owner=OWNER, epoch=1)


async def _turn_of_another_tenant(
    stub: Stub, conv_id: str, turn: common_pb2.Turn, clock: FakeClock
) -> store_pb2.LeaseFence:
    theirs = await new_conversation(stub, tenant_id=OTHER_TENANT)
    return fence(await leased_turn(stub, theirs.id, tenant_id=OTHER_TENANT))


BROKEN: dict[str, Breaker] = {
    "another-owner-claimed": _another_owner,
    "same-owner-claimed-again": _same_owner_claimed_again,
    "wrong-owner": _wrong_owner,
    "epoch-never-claimed": _future_epoch,
    "turn-sealed": _sealed,
    "turn-ended-by-transition": _ended_by_transition,
    "lease-released": _released,
    "turn-of-another-conversation": _turn_of_another_conversation,
    "unknown-turn": _unknown_turn,
    "turn-of-another-tenant": _turn_of_another_tenant,
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_a_broken_fence_is_lease_lost_naming_the_turn(
    store_stub: Stub, clock: FakeClock, case: str
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await fenced(store_stub, conv.id, fence(turn), [said("step 0")], [delta_event(1)])
    broken = await BROKEN[case](store_stub, conv.id, turn, clock)
    before = await conversation(store_stub, conv.id)

    err = await rpc_error(fenced(store_stub, conv.id, broken, [said("stale")], [delta_event(5)]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert details.startswith("lease lost:") and broken.turn_id in details

    after = await conversation(store_stub, conv.id)
    assert (after.last_seq, after.last_event_seq, after.reserved_event_seq) == (
        before.last_seq,
        before.last_event_seq,
        before.reserved_event_seq,
    )


async def test_unfenced_appends_work_as_before(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    await leased_turn(store_stub, conv.id)
    resp = await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT, conversation_id=conv.id, messages=[said("x")], events=[delta_event(3)]
        )
    )
    assert (resp.first_seq, resp.last_event_seq, resp.reserved_event_seq) == (1, 3, 3)
    assert not resp.HasField("turn") and not resp.HasField("next_turn")


if TYPE_CHECKING:
    Request: TypeAlias = Callable[[str, common_pb2.Turn], store_pb2.AppendRequest]


def _req(**fields: Any) -> Request:
    def build(conversation_id: str, turn: common_pb2.Turn) -> store_pb2.AppendRequest:
        given = {k: (v(turn) if callable(v) else v) for k, v in fields.items()}
        return store_pb2.AppendRequest(
            tenant_id=TENANT, conversation_id=conversation_id, messages=[said("x")], **given
        )

    return build


INVALID_APPENDS: dict[str, tuple[Request, str]] = {
    "seal-without-fence": (_req(seal=seal()), "seal needs a fence"),
    "release-without-fence": (_req(release_lease=True), "release_lease needs a fence"),
    "next-turn-without-fence": (_req(next_turn=next_turn()), "next_turn needs a fence"),
    "next-turn-without-seal": (_req(fence=fence, next_turn=next_turn()), "next_turn needs seal"),
    "seal-to-a-live-state": (
        _req(fence=fence, seal=seal(S.TURN_STATE_WAITING_FOR_APPROVAL)),
        "seal.state must be a terminal state",
    ),
    "seal-to-nothing": (_req(fence=fence, seal=store_pb2.TurnSeal()), "seal.state"),
    "fence-without-epoch": (_req(fence=lambda t: fence(t, epoch=0)), "fence.epoch"),
    "fence-without-owner": (_req(fence=lambda t: fence(t, owner="")), "fence.owner"),
    "fence-with-a-bad-turn-id": (
        _req(fence=store_pb2.LeaseFence(turn_id="nope", owner=OWNER, epoch=1)),
        "fence.turn_id",
    ),
    "steering-another-turn": (
        _req(fence=fence, take_queue_for_turn=new_id("turn")),
        "not the fenced turn",
    ),
    "next-turn-without-ttl": (
        _req(fence=fence, seal=seal(), next_turn=next_turn(ttl=0)),
        "next_turn.lease_ttl must be positive",
    ),
    "next-turn-born-ended": (
        _req(fence=fence, seal=seal(), next_turn=next_turn(state=S.TURN_STATE_COMPLETED)),
        "queued or running",
    ),
    "negative-reservation": (_req(fence=fence, reserve_event_seq=-1), "reserve_event_seq"),
    "negative-next-reservation": (
        _req(fence=fence, seal=seal(), next_turn=next_turn(reserve=-1)),
        "next_turn.reserve_event_seq",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_APPENDS))
async def test_an_append_whose_parts_do_not_fit_is_invalid_and_writes_nothing(
    store_stub: Stub, case: str
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await enqueue(store_stub, conv.id, "queued")
    build, needle = INVALID_APPENDS[case]
    err = await rpc_error(store_stub.Append(build(conv.id, turn)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    assert (await conversation(store_stub, conv.id)).last_seq == 0
    assert (await get_turn(store_stub, turn.id)).state == S.TURN_STATE_RUNNING
    assert await drain(store_stub, conv.id) == ["queued"]


# ----------------------------------------------------------------------- seal


async def test_seal_ends_the_turn_releases_its_lease_and_lowers_the_reservation(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    step = await fenced(
        store_stub, conv.id, fence(turn), [said("step")], [delta_event(1)], reserve_event_seq=10
    )
    assert step.reserved_event_seq == 10
    clock.advance(5)

    sealed = await fenced(
        store_stub,
        conv.id,
        fence(turn),
        [said("the answer")],
        [delta_event(2), delta_event(3)],
        seal=store_pb2.TurnSeal(
            state=S.TURN_STATE_FAILED, finish_reason=S.FINISH_REASON_ERROR, error_message="provider said 500"
        ),
        reserve_event_seq=40,  # a seal lowers it whatever this says: nothing past 3 was sent
    )
    ended = sealed.turn
    assert (ended.state, ended.finish_reason, ended.error_message) == (
        S.TURN_STATE_FAILED,
        S.FINISH_REASON_ERROR,
        "provider said 500",
    )
    assert ended.HasField("ended_at") and ended.ended_at.seconds == int(clock.now)
    assert ended.lease_owner == "" and not ended.HasField("lease_expires_at")
    assert (ended.lease_epoch, ended.attempts) == (1, 1)  # the epoch is kept
    assert (sealed.last_event_seq, sealed.reserved_event_seq) == (3, 3)
    assert await get_turn(store_stub, turn.id) == ended
    conv_after = await conversation(store_stub, conv.id)
    assert (conv_after.last_event_seq, conv_after.reserved_event_seq) == (3, 3)
    # Sealed means over: no more fenced writes, no claim, not swept.
    err = await rpc_error(fenced(store_stub, conv.id, fence(turn), [said("more")]))
    assert (err.details() or "").startswith("lease lost:")
    assert "failed" in (err.details() or "")
    err = await rpc_error(claim(store_stub, turn.id, OTHER))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert turn.id not in await expired(store_stub)


async def test_a_seal_alone_needs_no_messages_or_events(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    sealed = await fenced(
        store_stub, conv.id, fence(turn), seal=seal(S.TURN_STATE_ABORTED, S.FINISH_REASON_ABORTED)
    )
    assert (sealed.turn.state, sealed.first_seq, sealed.last_seq) == (S.TURN_STATE_ABORTED, 0, 0)
    assert list(sealed.messages) == []


async def test_a_seal_follows_the_state_machine(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    queued = await leased_turn(store_stub, conv.id, state=S.TURN_STATE_QUEUED)
    err = await rpc_error(
        fenced(store_stub, conv.id, fence(queued), [said("x")], [delta_event(1)], seal=seal())
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "queued; cannot move to completed" in (err.details() or "")
    assert (await conversation(store_stub, conv.id)).last_seq == 0
    assert (await get_turn(store_stub, queued.id)).state == S.TURN_STATE_QUEUED
    # Queued may be aborted; it never started.
    aborted = await fenced(store_stub, conv.id, fence(queued), seal=seal(S.TURN_STATE_ABORTED))
    assert aborted.turn.state == S.TURN_STATE_ABORTED and not aborted.turn.HasField("started_at")


async def test_release_lease_hands_the_turn_over_without_ending_it(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    released = await fenced(
        store_stub,
        conv.id,
        fence(turn),
        [said("step")],
        [delta_event(1)],
        reserve_event_seq=8,
        release_lease=True,
    )
    assert (released.turn.state, released.turn.lease_owner, released.turn.lease_epoch) == (
        S.TURN_STATE_RUNNING,
        "",
        1,
    )
    assert not released.turn.HasField("ended_at")
    assert released.reserved_event_seq == 1
    # Claimable at once, by anyone; the sweep sees it before any expiry.
    assert await expired(store_stub) == [turn.id]
    taken = await claim(store_stub, turn.id, OTHER, reserve=6)
    assert (taken.lease_owner, taken.lease_epoch, taken.attempts) == (OTHER, 2, 2)
    assert (await conversation(store_stub, conv.id)).reserved_event_seq == 6
    err = await rpc_error(fenced(store_stub, conv.id, fence(turn, OWNER, 1), [said("stale")]))
    assert (err.details() or "").startswith("lease lost:")


# ------------------------------------------------------------------ next turn


async def test_seal_with_next_turn_starts_it_from_exactly_the_queued_messages(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id, user_messages=[text_message("first question")])
    for text in ("follow-up one", "follow-up two"):
        await enqueue(store_stub, conv.id, text)

    resp = await fenced(
        store_stub,
        conv.id,
        fence(turn),
        [said("first answer")],
        [delta_event(1), delta_event(2)],
        seal=seal(),
        next_turn=next_turn(S.TURN_STATE_RUNNING, ttl=45, reserve=25, agent="coder"),
    )
    assert resp.turn.state == S.TURN_STATE_COMPLETED and resp.turn.lease_owner == ""
    # This turn's messages, then the next turn's: its user messages, in queue order.
    assert [(m.seq, text_of(m)) for m in resp.messages] == [(2, "first answer")]
    assert (resp.first_seq, resp.last_seq, resp.dequeued) == (2, 2, 0)
    started = resp.next_turn
    assert started.id and started.id != turn.id
    assert (started.conversation_id, started.tenant_id) == (conv.id, TENANT)
    assert (started.state, started.agent, started.lease_owner) == (S.TURN_STATE_RUNNING, "coder", OWNER)
    assert (started.lease_epoch, started.attempts) == (1, 1)
    assert started.lease_expires_at.seconds == int(clock.now) + 45
    assert started.HasField("started_at") and not started.HasField("ended_at")
    assert [(m.seq, m.role, m.turn_id, text_of(m)) for m in resp.next_turn_messages] == [
        (3, S.ROLE_USER, started.id, "follow-up one"),
        (4, S.ROLE_USER, started.id, "follow-up two"),
    ]
    assert started.user_message_seq == 3
    # The reservation: lowered to what is persisted by the seal, raised for the next turn.
    assert (resp.last_event_seq, resp.reserved_event_seq) == (2, 25)

    assert await get_turn(store_stub, started.id) == started
    assert await drain(store_stub, conv.id) == []
    assert [(m.turn_id, text_of(m)) for m in await history(store_stub, conv.id)] == [
        (turn.id, "first question"),
        ("", "first answer"),
        (started.id, "follow-up one"),
        (started.id, "follow-up two"),
    ]
    # The next turn is fenced like any other, and its own seal with nothing queued starts none.
    last = await fenced(
        store_stub,
        conv.id,
        fence(started),
        [said("second answer")],
        [delta_event(3)],
        seal=seal(),
        next_turn=next_turn(),
    )
    assert not last.HasField("next_turn") and list(last.next_turn_messages) == []
    assert (last.turn.state, last.reserved_event_seq) == (S.TURN_STATE_COMPLETED, 3)
    assert [t.id for t in await turns_of(store_stub, conv.id)] == [turn.id, started.id]


async def test_a_next_turn_may_wait_queued_for_a_run_slot(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await enqueue(store_stub, conv.id, "later")
    resp = await fenced(
        store_stub, conv.id, fence(turn), seal=seal(), next_turn=next_turn(S.TURN_STATE_QUEUED)
    )
    assert resp.next_turn.state == S.TURN_STATE_QUEUED and not resp.next_turn.HasField("started_at")
    assert resp.next_turn.lease_owner == OWNER
    assert [text_of(m) for m in resp.next_turn_messages] == ["later"]


async def test_steering_and_next_turn_in_one_append_take_the_queue_once(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await enqueue(store_stub, conv.id, "steer")
    resp = await fenced(
        store_stub,
        conv.id,
        fence(turn),
        [said("step")],
        take_queue_for_turn=turn.id,
        seal=seal(),
        next_turn=next_turn(),
    )
    # The fenced turn took it as steering, so nothing was left to start a turn with.
    assert [(m.turn_id, text_of(m)) for m in resp.messages] == [("", "step"), (turn.id, "steer")]
    assert resp.dequeued == 1 and not resp.HasField("next_turn")


async def _race_seal_chain_against_senders(
    stub: Stub, rng: random.Random, *, senders: int, each: int
) -> None:
    """One round: a kernel seals turn after turn, each seal taking the queue for the next
    turn; ``senders`` tasks queue behind the running turn meanwhile. Every message must be
    refused or taken by exactly one turn, in queue order; none is left behind."""
    conv = await new_conversation(stub)
    first = await leased_turn(stub, conv.id, user_messages=[text_message("start")])
    accepted: list[tuple[int, str]] = []  # (queue id, text)
    refused: list[str] = []

    async def yield_a_little(most: int) -> None:
        for _ in range(rng.randrange(most + 1)):
            await asyncio.sleep(0)

    async def sender(n: int) -> None:
        for i in range(each):
            await yield_a_little(3)
            text = f"s{n}m{i}"
            try:
                queued = await enqueue(stub, conv.id, text, behind=True)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert (err.details() or "").startswith("no turn in flight:")
                refused.append(text)
            else:
                accepted.append((queued.id, text))

    taken: list[tuple[str, str]] = []  # (turn that took it, text)
    started: list[str] = []
    event_seq = 0

    async def kernel() -> None:
        nonlocal event_seq
        turn = first
        while True:
            for step in range(rng.randrange(3)):
                event_seq += 1
                await fenced(stub, conv.id, fence(turn), [said(f"step {step}")], [delta_event(event_seq)])
                await yield_a_little(2)
            event_seq += 1
            resp = await fenced(
                stub,
                conv.id,
                fence(turn),
                [said("done")],
                [delta_event(event_seq)],
                seal=seal(),
                next_turn=next_turn(reserve=event_seq + 5),
            )
            assert resp.turn.state == S.TURN_STATE_COMPLETED
            if not resp.HasField("next_turn"):
                assert resp.reserved_event_seq == event_seq
                return
            assert resp.next_turn.user_message_seq == resp.next_turn_messages[0].seq
            assert resp.reserved_event_seq == event_seq + 5
            taken.extend((resp.next_turn.id, text_of(m)) for m in resp.next_turn_messages)
            started.append(resp.next_turn.id)
            turn = resp.next_turn
            await yield_a_little(2)

    await asyncio.gather(kernel(), *(sender(n) for n in range(senders)))

    assert len(accepted) + len(refused) == senders * each
    # Taken exactly once each, in the order they were queued, by the turns that started.
    assert [text for _, text in taken] == [text for _, text in sorted(accepted)]
    assert {turn_id for turn_id, _ in taken} == set(started)
    assert await drain(stub, conv.id) == []
    # History agrees, and every turn ended: nothing waits behind a turn that is gone.
    users = [(m.turn_id, text_of(m)) for m in await history(stub, conv.id) if m.role == S.ROLE_USER]
    assert users == [(first.id, "start"), *taken]
    assert all(t.state == S.TURN_STATE_COMPLETED for t in await turns_of(stub, conv.id))
    err = await rpc_error(enqueue(stub, conv.id, "too late", behind=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("seed", range(3))
async def test_seal_with_next_turn_racing_enqueue_behind_it_orphans_no_message(
    store_stub: Stub, seed: int
) -> None:
    rng = random.Random(seed)
    for _ in range(6):
        await _race_seal_chain_against_senders(store_stub, rng, senders=4, each=6)


# --------------------------------------------------------------- reservations


async def test_the_reservation_only_rises_until_a_seal_or_release(store_stub: Stub, clock: FakeClock) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id, reserve_event_seq=5)
    assert (await conversation(store_stub, conv.id)).reserved_event_seq == 5
    f = fence(turn)

    async def reserved_after(**fields: Any) -> int:
        events = fields.pop("events", [])
        resp = await fenced(store_stub, conv.id, f, fields.pop("messages", []), events, **fields)
        assert (await conversation(store_stub, conv.id)).reserved_event_seq == resp.reserved_event_seq
        return resp.reserved_event_seq

    assert await reserved_after(reserve_event_seq=3) == 5  # never lowers
    assert await reserved_after(reserve_event_seq=9) == 9
    assert await reserved_after(events=[delta_event(i) for i in range(1, 5)]) == 9
    # Never below what is persisted, even unasked.
    assert await reserved_after(events=[delta_event(11), delta_event(12)]) == 12
    # A claim raises it too, in the same transaction.
    clock.advance(31)
    f = fence(await claim(store_stub, turn.id, OTHER, reserve=20))
    assert (await conversation(store_stub, conv.id)).reserved_event_seq == 20
    await claim(store_stub, turn.id, OTHER, reserve=15)  # ...and never lowers it
    f = fence(await get_turn(store_stub, turn.id))
    assert (await conversation(store_stub, conv.id)).reserved_event_seq == 20
    # So does a create, for any turn.
    await store_stub.CreateTurn(
        store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id, reserve_event_seq=22)
    )
    assert (await conversation(store_stub, conv.id)).reserved_event_seq == 22
    # A release lowers it to what is persisted.
    assert await reserved_after(events=[delta_event(13)], release_lease=True) == 13


@pytest.mark.parametrize("seed", range(3))
async def test_the_reservation_is_never_below_last_event_seq_and_falls_only_at_seal_or_release(
    store_stub: Stub, clock: FakeClock, seed: int
) -> None:
    rng = random.Random(seed)
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id, reserve_event_seq=rng.randrange(5))
    owner = OWNER
    last = 0
    reserved = (await conversation(store_stub, conv.id)).reserved_event_seq
    for i in range(40):
        op = rng.choice(["events", "reserve", "claim", "release", "seal"])
        lowered = False
        if op == "events":
            count = rng.randrange(1, 4)
            events = [delta_event(last + 1 + j) for j in range(count)]
            await fenced(
                store_stub, conv.id, fence(turn), [said(str(i))], events, reserve_event_seq=rng.randrange(40)
            )
        elif op == "reserve":
            await fenced(store_stub, conv.id, fence(turn), reserve_event_seq=rng.randrange(40))
        elif op == "claim":
            clock.advance(31)
            owner = rng.choice([OWNER, OTHER])
            turn = await claim(store_stub, turn.id, owner, reserve=rng.randrange(40))
        elif op == "release":
            await fenced(store_stub, conv.id, fence(turn), release_lease=True)
            turn = await claim(store_stub, turn.id, owner)
            lowered = True
        else:
            await enqueue(store_stub, conv.id, f"q{i}")
            resp = await fenced(
                store_stub, conv.id, fence(turn), seal=seal(), next_turn=next_turn(reserve=rng.randrange(40))
            )
            turn = resp.next_turn  # leased to the fence's owner
            lowered = True
        now = await conversation(store_stub, conv.id)
        assert now.reserved_event_seq >= now.last_event_seq, (i, op)
        if not lowered:
            assert now.reserved_event_seq >= reserved, (i, op)
        last, reserved = now.last_event_seq, now.reserved_event_seq


# ----------------------------------------------------------------- CreateTurn


async def test_a_turn_is_born_leased_with_its_user_messages(store_stub: Stub, clock: FakeClock) -> None:
    conv = await new_conversation(store_stub)
    await store_stub.Append(
        store_pb2.AppendRequest(tenant_id=TENANT, conversation_id=conv.id, messages=[said("earlier")])
    )
    turn = await leased_turn(
        store_stub,
        conv.id,
        ttl=20,
        reserve_event_seq=7,
        agent="coder",
        idempotency_key="send-1",
        # The role is forced to user, the turn to the new one.
        user_messages=[text_message("do it", role=S.ROLE_ASSISTANT), text_message("and this")],
    )
    assert (turn.lease_owner, turn.lease_epoch, turn.attempts, turn.tenant_id) == (OWNER, 1, 1, TENANT)
    assert turn.lease_expires_at.seconds == int(clock.now) + 20
    assert (turn.state, turn.agent, turn.idempotency_key) == (S.TURN_STATE_RUNNING, "coder", "send-1")
    assert turn.user_message_seq == 2
    assert [(m.seq, m.role, m.turn_id, text_of(m)) for m in await history(store_stub, conv.id)] == [
        (1, S.ROLE_ASSISTANT, "", "earlier"),
        (2, S.ROLE_USER, turn.id, "do it"),
        (3, S.ROLE_USER, turn.id, "and this"),
    ]
    after = await conversation(store_stub, conv.id)
    assert (after.last_seq, after.reserved_event_seq) == (3, 7)
    assert await get_turn(store_stub, turn.id) == turn
    # A born-leased turn is fenced at once with epoch 1.
    step = await fenced(store_stub, conv.id, fence(turn), [said("answer")], [delta_event(1)])
    assert step.turn.lease_epoch == 1


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        pytest.param({"lease_owner": OWNER}, "lease_ttl must be positive", id="owner-without-ttl"),
        pytest.param({"lease_owner": OWNER, "lease_ttl": seconds(-1)}, "lease_ttl", id="negative-ttl"),
        pytest.param({"lease_ttl": seconds(30)}, "lease_owner is empty", id="ttl-without-owner"),
        pytest.param({"reserve_event_seq": -2}, "reserve_event_seq", id="negative-reservation"),
        pytest.param(
            {"user_messages": [common_pb2.Message(role=S.ROLE_USER)]},
            "no chunks",
            id="message-without-chunks",
        ),
        pytest.param(
            {"user_messages": [text_message("x"), common_pb2.Message(chunks=[common_pb2.Chunk()])]},
            "empty",
            id="empty-chunk",
        ),
    ],
)
async def test_a_bad_create_turn_is_invalid_and_creates_nothing(
    store_stub: Stub, fields: dict[str, Any], needle: str
) -> None:
    conv = await new_conversation(store_stub)
    err = await rpc_error(
        store_stub.CreateTurn(
            store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id, **fields)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    assert await turns_of(store_stub, conv.id) == []
    assert (await conversation(store_stub, conv.id)).last_seq == 0


@pytest.mark.parametrize("state", UNENDED_STATES, ids=S.TurnState.Name)
async def test_an_exclusive_create_is_refused_while_a_turn_is_in_flight(store_stub: Stub, state: int) -> None:
    conv = await new_conversation(store_stub)
    busy = await turn_in_state(store_stub, conv.id, state)
    err = await rpc_error(
        leased_turn(store_stub, conv.id, owner=OTHER, exclusive=True, user_messages=[text_message("hi")])
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert details.startswith("turn in flight:")
    name = S.TurnState.Name(state).removeprefix("TURN_STATE_").lower()  # type: ignore[arg-type]
    assert busy.id in details and name in details and OWNER in details
    assert [t.id for t in await turns_of(store_stub, conv.id)] == [busy.id]
    assert (await conversation(store_stub, conv.id)).last_seq == 0

    # Once it has ended, an exclusive create goes through.
    await move(store_stub, busy.id, S.TURN_STATE_ABORTED)
    created = await leased_turn(store_stub, conv.id, owner=OTHER, exclusive=True)
    assert created.lease_owner == OTHER


async def test_the_idempotency_key_is_checked_before_exclusive(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    first = await leased_turn(store_stub, conv.id, exclusive=True, idempotency_key="send-1")
    err = await rpc_error(leased_turn(store_stub, conv.id, exclusive=True, idempotency_key="send-1"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id in (err.details() or "")
    err = await rpc_error(leased_turn(store_stub, conv.id, exclusive=True, idempotency_key="send-2"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("with_messages", [False, True], ids=["bare", "with-user-messages"])
async def test_ten_racing_exclusive_creates_leave_one_turn(store_stub: Stub, with_messages: bool) -> None:
    for _ in range(12):
        conv = await new_conversation(store_stub)
        owners = [f"kernel-{i}" for i in range(10)]
        outcomes = await asyncio.gather(
            *(
                leased_turn(
                    store_stub,
                    conv.id,
                    owner=o,
                    exclusive=True,
                    user_messages=[text_message(o)] if with_messages else [],
                )
                for o in owners
            ),
            return_exceptions=True,
        )
        won = [r for r in outcomes if isinstance(r, common_pb2.Turn)]
        assert len(won) == 1, outcomes
        winner = won[0]
        for lost in outcomes:
            if isinstance(lost, common_pb2.Turn):
                continue
            assert isinstance(lost, grpc.aio.AioRpcError)
            assert lost.code() == grpc.StatusCode.FAILED_PRECONDITION, lost.details()
            assert (lost.details() or "").startswith("turn in flight:") and winner.id in (
                lost.details() or ""
            )
        assert [t.id for t in await turns_of(store_stub, conv.id)] == [winner.id]
        expected = [(winner.id, winner.lease_owner)] if with_messages else []
        assert [(m.turn_id, text_of(m)) for m in await history(store_stub, conv.id)] == expected


# --------------------------------------------------------------------- leases


async def test_every_claim_is_a_new_epoch_and_attempt(store_stub: Stub, clock: FakeClock) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    again = await claim(store_stub, turn.id, OWNER)  # the holder extending by a claim
    assert (again.lease_epoch, again.attempts) == (2, 2)
    clock.advance(31)
    taken = await claim(store_stub, turn.id, OTHER)
    assert (taken.lease_owner, taken.lease_epoch, taken.attempts) == (OTHER, 3, 3)
    assert await get_turn(store_stub, turn.id) == taken


async def test_racing_claims_leave_one_owner_and_strictly_increasing_epochs(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id, owner="kernel-0")
    epoch = turn.lease_epoch
    for _ in range(3):
        clock.advance(31)
        owners = [f"kernel-{i}" for i in range(1, 11)]
        outcomes = await asyncio.gather(
            *(claim(store_stub, turn.id, o) for o in owners), return_exceptions=True
        )
        won = [r for r in outcomes if isinstance(r, common_pb2.Turn)]
        assert len(won) == 1
        assert won[0].lease_epoch == epoch + 1 and won[0].attempts == epoch + 1
        for lost in outcomes:
            if not isinstance(lost, common_pb2.Turn):
                assert isinstance(lost, grpc.aio.AioRpcError)
                assert lost.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert won[0].lease_owner in (lost.details() or "")
        epoch = won[0].lease_epoch
        assert (await get_turn(store_stub, turn.id)).lease_owner == won[0].lease_owner

    # The holder re-claiming ten times at once: no claim is lost, each gets its own epoch.
    holder = won[0].lease_owner
    again = await asyncio.gather(*(claim(store_stub, turn.id, holder) for _ in range(10)))
    assert sorted(t.lease_epoch for t in again) == list(range(epoch + 1, epoch + 11))
    final = await get_turn(store_stub, turn.id)
    assert (final.lease_owner, final.lease_epoch, final.attempts) == (holder, epoch + 10, epoch + 10)
    # Only the last epoch's fence holds.
    for stale in range(1, epoch + 10):
        err = await rpc_error(fenced(store_stub, conv.id, fence(final, epoch=stale), [said("x")]))
        assert (err.details() or "").startswith("lease lost:")
    await fenced(store_stub, conv.id, fence(final), [said("x")])


async def test_renew_release_and_transition_take_the_epoch(store_stub: Stub, clock: FakeClock) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await claim(store_stub, turn.id, OWNER)  # epoch 2

    def renew(epoch: int) -> Awaitable[common_pb2.Turn]:
        return store_stub.RenewLease(
            store_pb2.RenewLeaseRequest(
                tenant_id=TENANT, turn_id=turn.id, owner=OWNER, ttl=seconds(60), epoch=epoch
            )
        )

    def release(epoch: int) -> Awaitable[common_pb2.Turn]:
        return store_stub.ReleaseLease(
            store_pb2.ReleaseLeaseRequest(tenant_id=TENANT, turn_id=turn.id, owner=OWNER, epoch=epoch)
        )

    err = await rpc_error(renew(1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.details() or "").startswith("lease lost:") and "epoch 2" in (err.details() or "")
    assert (await renew(2)).lease_expires_at.seconds == int(clock.now) + 60
    assert (await renew(0)).lease_epoch == 2  # 0: any epoch, as before

    err = await rpc_error(
        move(store_stub, turn.id, S.TURN_STATE_WAITING_FOR_APPROVAL, lease_owner=OWNER, lease_epoch=1)
    )
    assert (err.details() or "").startswith("lease lost:")
    moved = await move(
        store_stub, turn.id, S.TURN_STATE_WAITING_FOR_APPROVAL, lease_owner=OWNER, lease_epoch=2
    )
    assert moved.state == S.TURN_STATE_WAITING_FOR_APPROVAL
    err = await rpc_error(move(store_stub, turn.id, S.TURN_STATE_RESUMING, lease_epoch=2))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "lease_epoch needs lease_owner" in (
        err.details() or ""
    )

    # A release with an older epoch must not free the newer claim.
    err = await rpc_error(release(1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get_turn(store_stub, turn.id)).lease_owner == OWNER
    released = await release(2)
    assert (released.lease_owner, released.lease_epoch) == ("", 2)
    assert (await release(2)).lease_owner == ""  # retried: harmless


async def test_renew_leases_renews_what_the_owner_holds_and_names_the_rest(
    store_stub: Stub, clock: FakeClock
) -> None:
    ours = await new_conversation(store_stub)
    theirs = await new_conversation(store_stub, tenant_id=OTHER_TENANT)
    held = await leased_turn(store_stub, ours.id)
    held_elsewhere = await leased_turn(store_stub, theirs.id, tenant_id=OTHER_TENANT)
    named_with_our_tenant = await leased_turn(store_stub, theirs.id, tenant_id=OTHER_TENANT)
    expired_unclaimed = await leased_turn(store_stub, ours.id, ttl=5)
    claimed_away = await leased_turn(store_stub, ours.id, ttl=5)
    sealed = await leased_turn(store_stub, ours.id)
    reclaimed = await leased_turn(store_stub, ours.id)
    clock.advance(10)
    await claim(store_stub, claimed_away.id, OTHER)
    await fenced(store_stub, ours.id, fence(sealed), seal=seal())
    await claim(store_stub, reclaimed.id, OWNER)  # now epoch 2
    unknown = new_id("turn")

    refs = [
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=held.id, epoch=1),
        store_pb2.LeaseRef(tenant_id=OTHER_TENANT, turn_id=held_elsewhere.id, epoch=1),
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=expired_unclaimed.id, epoch=1),
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=claimed_away.id, epoch=1),
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=sealed.id, epoch=1),
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=reclaimed.id, epoch=1),
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=unknown, epoch=1),
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=named_with_our_tenant.id, epoch=1),  # not ours
        store_pb2.LeaseRef(tenant_id=TENANT, turn_id=held.id),  # again, any epoch
    ]
    resp = await store_stub.RenewLeases(
        store_pb2.RenewLeasesRequest(owner=OWNER, ttl=seconds(60), leases=refs)
    )
    assert list(resp.lost_turn_ids) == [
        claimed_away.id,
        sealed.id,
        reclaimed.id,
        unknown,
        named_with_our_tenant.id,
    ]

    until = int(clock.now) + 60
    assert (await get_turn(store_stub, held_elsewhere.id, OTHER_TENANT)).tenant_id == OTHER_TENANT
    for turn_id, tenant in (
        (held.id, TENANT),
        (expired_unclaimed.id, TENANT),
        (held_elsewhere.id, OTHER_TENANT),
    ):
        renewed = await get_turn(store_stub, turn_id, tenant)
        assert (renewed.lease_owner, renewed.lease_expires_at.seconds) == (OWNER, until)
    assert (await get_turn(store_stub, claimed_away.id)).lease_owner == OTHER
    untouched = await get_turn(store_stub, named_with_our_tenant.id, OTHER_TENANT)
    assert untouched.lease_expires_at.seconds != until
    assert (await get_turn(store_stub, reclaimed.id)).lease_expires_at.seconds != until
    empty = await store_stub.RenewLeases(store_pb2.RenewLeasesRequest(owner=OWNER, ttl=seconds(60)))
    assert list(empty.lost_turn_ids) == []


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        pytest.param(store_pb2.RenewLeasesRequest(ttl=seconds(5)), "owner is required", id="no-owner"),
        pytest.param(store_pb2.RenewLeasesRequest(owner=OWNER), "ttl must be positive", id="no-ttl"),
        pytest.param(
            store_pb2.RenewLeasesRequest(
                owner=OWNER, ttl=seconds(5), leases=[store_pb2.LeaseRef(turn_id=new_id("turn"))]
            ),
            "leases[0].tenant_id",
            id="no-tenant",
        ),
        pytest.param(
            store_pb2.RenewLeasesRequest(
                owner=OWNER, ttl=seconds(5), leases=[store_pb2.LeaseRef(tenant_id=TENANT, turn_id="conv_x")]
            ),
            "leases[0].turn_id",
            id="bad-turn-id",
        ),
        pytest.param(
            store_pb2.RenewLeasesRequest(
                owner=OWNER,
                ttl=seconds(5),
                leases=[store_pb2.LeaseRef(tenant_id=TENANT, turn_id=new_id("turn"), epoch=-1)],
            ),
            "leases[0].epoch",
            id="negative-epoch",
        ),
    ],
)
async def test_renew_leases_checks_its_fields(
    store_stub: Stub, request_: store_pb2.RenewLeasesRequest, needle: str
) -> None:
    err = await rpc_error(store_stub.RenewLeases(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")


@pytest.mark.parametrize("state", UNENDED_STATES, ids=S.TurnState.Name)
async def test_every_state_that_has_not_ended_is_swept_once_its_lease_expires(
    store_stub: Stub, clock: FakeClock, state: int
) -> None:
    conv = await new_conversation(store_stub)
    turn = await turn_in_state(store_stub, conv.id, state)
    ended = await leased_turn(store_stub, conv.id, ttl=1)
    await move(store_stub, ended.id, S.TURN_STATE_COMPLETED)
    assert await expired(store_stub) == []
    clock.advance(31)
    assert await expired(store_stub) == [turn.id]


# ---------------------------------------------------------------------- queue


async def test_enqueue_behind_a_turn_needs_one_in_flight(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    err = await rpc_error(enqueue(store_stub, conv.id, "nobody listens", behind=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert details.startswith("no turn in flight:") and conv.id in details
    # Without the flag, as before: queued whatever runs.
    await enqueue(store_stub, conv.id, "plain")
    assert await drain(store_stub, conv.id) == ["plain"]

    turn = await leased_turn(store_stub, conv.id)
    queued = await enqueue(store_stub, conv.id, "behind", behind=True, key="send-1")
    await fenced(store_stub, conv.id, fence(turn), seal=seal())
    err = await rpc_error(enqueue(store_stub, conv.id, "after the seal", behind=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A retry of an accepted send answers its item, turn or no turn.
    assert (await enqueue(store_stub, conv.id, "behind", behind=True, key="send-1")).id == queued.id
    assert await drain(store_stub, conv.id) == ["behind"]


@pytest.mark.parametrize("state", UNENDED_STATES, ids=S.TurnState.Name)
async def test_every_state_that_has_not_ended_takes_a_message_behind_it(store_stub: Stub, state: int) -> None:
    conv = await new_conversation(store_stub)
    await turn_in_state(store_stub, conv.id, state)
    await enqueue(store_stub, conv.id, "behind", behind=True)
    assert await drain(store_stub, conv.id) == ["behind"]


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        pytest.param(
            lambda s, t: s.RenewLease(
                store_pb2.RenewLeaseRequest(
                    tenant_id=TENANT, turn_id=t, owner=OWNER, ttl=seconds(5), epoch=-1
                )
            ),
            "epoch must be 0 or more",
            id="RenewLease",
        ),
        pytest.param(
            lambda s, t: s.ReleaseLease(
                store_pb2.ReleaseLeaseRequest(tenant_id=TENANT, turn_id=t, owner=OWNER, epoch=-1)
            ),
            "epoch must be 0 or more",
            id="ReleaseLease",
        ),
        pytest.param(
            lambda s, t: s.TransitionTurn(
                store_pb2.TransitionTurnRequest(
                    tenant_id=TENANT, turn_id=t, to=S.TURN_STATE_ABORTED, lease_owner=OWNER, lease_epoch=-1
                )
            ),
            "lease_epoch must be 0 or more",
            id="TransitionTurn",
        ),
        pytest.param(
            lambda s, t: s.ClaimLease(
                store_pb2.ClaimLeaseRequest(
                    tenant_id=TENANT, turn_id=t, owner=OTHER, ttl=seconds(5), reserve_event_seq=-1
                )
            ),
            "reserve_event_seq must be 0 or more",
            id="ClaimLease",
        ),
    ],
)
async def test_a_negative_epoch_or_reservation_is_invalid(
    store_stub: Stub, call: Callable[[Stub, str], Awaitable[object]], needle: str
) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    err = await rpc_error(call(store_stub, turn.id))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    assert await get_turn(store_stub, turn.id) == turn
