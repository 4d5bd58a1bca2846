"""The store contract for reconcile, leases, metrics, the queue, approvals and API keys.

Backend-agnostic: every test talks gRPC to an in-process server from ``store_stub``,
which runs once per backend in ``conftest.BACKENDS``. Time moves only when a test
advances ``clock``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import grpc
import pytest
from google.protobuf import duration_pb2

from dispatch.shared.ids import is_valid_id, new_id
from dispatch.v1 import common_pb2, store_pb2
from tests.store.harness import OTHER_TENANT, TENANT, FakeClock, append, new_conversation, text_message

if TYPE_CHECKING:
    from tests.store.harness import Stub

S = common_pb2

INTERRUPTED = "Tool call was interrupted before it returned a result"


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def seconds(value: float) -> duration_pb2.Duration:
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(round(value * 1e9))
    return ttl


async def new_turn(stub: Stub, conversation_id: str, tenant_id: str = TENANT) -> common_pb2.Turn:
    return await stub.CreateTurn(
        store_pb2.CreateTurnRequest(tenant_id=tenant_id, conversation_id=conversation_id)
    )


def calls(turn_id: str, step_index: int, *call_ids: str) -> common_pb2.Message:
    sid = f"{turn_id}#{step_index}"
    return common_pb2.Message(
        role=S.ROLE_ASSISTANT,
        turn_id=turn_id,
        step_index=step_index,
        chunks=[
            common_pb2.Chunk(text=common_pb2.TextChunk(text="let me look")),
            *(
                common_pb2.Chunk(
                    tool_call=common_pb2.ToolCallChunk(
                        id=call_id, name=f"tool_{call_id}", input_json="{}", step_id=sid
                    )
                )
                for call_id in call_ids
            ),
        ],
    )


def results(turn_id: str, step_index: int, *call_ids: str) -> common_pb2.Message:
    sid = f"{turn_id}#{step_index}"
    return common_pb2.Message(
        role=S.ROLE_TOOL,
        turn_id=turn_id,
        step_index=step_index,
        chunks=[
            common_pb2.Chunk(
                tool_result=common_pb2.ToolResultChunk(
                    tool_call_id=call_id, name=f"tool_{call_id}", content="ok", step_id=sid
                )
            )
            for call_id in call_ids
        ],
    )


def dangling(history: list[common_pb2.Message]) -> set[str]:
    called = {c.tool_call.id for m in history for c in m.chunks if c.WhichOneof("kind") == "tool_call"}
    answered = {c.tool_result.tool_call_id for m in history for c in m.chunks if c.HasField("tool_result")}
    return called - answered


async def load(stub: Stub, conversation_id: str) -> store_pb2.LoadResponse:
    return await stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conversation_id))


async def reconcile(stub: Stub, conversation_id: str) -> list[common_pb2.Message]:
    resp = await stub.Reconcile(store_pb2.ReconcileRequest(tenant_id=TENANT, conversation_id=conversation_id))
    return list(resp.appended)


# ------------------------------------------------------------------ reconcile


async def test_reconcile_closes_every_dangling_call_with_an_error_result(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await append(
        store_stub,
        conv.id,
        [
            text_message("list the repo"),
            calls(turn.id, 0, "call_a", "call_b"),
            results(turn.id, 0, "call_a"),
            calls(turn.id, 1, "call_c"),
        ],
    )

    appended = await reconcile(store_stub, conv.id)

    # One tool message per step that had dangling calls, numbered after the history.
    assert [m.seq for m in appended] == [5, 6]
    assert [(m.role, m.turn_id, m.step_index) for m in appended] == [
        (S.ROLE_TOOL, turn.id, 0),
        (S.ROLE_TOOL, turn.id, 1),
    ]
    got = [
        (c.tool_result.tool_call_id, c.tool_result.name, c.tool_result.step_id)
        for m in appended
        for c in m.chunks
    ]
    assert got == [("call_b", "tool_call_b", f"{turn.id}#0"), ("call_c", "tool_call_c", f"{turn.id}#1")]
    assert all(c.tool_result.is_error for m in appended for c in m.chunks)
    assert all(INTERRUPTED in c.tool_result.content for m in appended for c in m.chunks)

    history = await load(store_stub, conv.id)
    assert [m.seq for m in history.messages] == [1, 2, 3, 4, 5, 6]
    assert list(history.messages[4:]) == appended
    assert dangling(list(history.messages)) == set()


async def test_a_second_reconcile_appends_nothing(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await append(store_stub, conv.id, [calls(turn.id, 0, "call_a")])
    assert len(await reconcile(store_stub, conv.id)) == 1
    assert await reconcile(store_stub, conv.id) == []
    assert (await load(store_stub, conv.id)).last_seq == 2


@pytest.mark.parametrize(
    "history",
    [
        pytest.param([], id="empty"),
        pytest.param([text_message("hi"), text_message("hello", role=S.ROLE_ASSISTANT)], id="no-calls"),
        pytest.param([calls("turn_x", 0, "call_a"), results("turn_x", 0, "call_a")], id="all-answered"),
    ],
)
async def test_reconcile_of_a_clean_history_appends_nothing(
    store_stub: Stub, history: list[common_pb2.Message]
) -> None:
    conv = await new_conversation(store_stub)
    if history:
        await append(store_stub, conv.id, history)
    assert await reconcile(store_stub, conv.id) == []
    assert (await load(store_stub, conv.id)).last_seq == len(history)


# --------------------------------------------------------------------- leases


async def claim(stub: Stub, turn_id: str, owner: str, ttl: float = 30.0) -> common_pb2.Turn:
    return await stub.ClaimLease(
        store_pb2.ClaimLeaseRequest(tenant_id=TENANT, turn_id=turn_id, owner=owner, ttl=seconds(ttl))
    )


async def renew(stub: Stub, turn_id: str, owner: str, ttl: float = 30.0) -> common_pb2.Turn:
    return await stub.RenewLease(
        store_pb2.RenewLeaseRequest(tenant_id=TENANT, turn_id=turn_id, owner=owner, ttl=seconds(ttl))
    )


async def release(stub: Stub, turn_id: str, owner: str) -> common_pb2.Turn:
    return await stub.ReleaseLease(
        store_pb2.ReleaseLeaseRequest(tenant_id=TENANT, turn_id=turn_id, owner=owner)
    )


async def get_turn(stub: Stub, turn_id: str) -> common_pb2.Turn:
    return await stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn_id))


async def move(stub: Stub, turn_id: str, to: int, owner: str = "") -> common_pb2.Turn:
    return await stub.TransitionTurn(
        store_pb2.TransitionTurnRequest(tenant_id=TENANT, turn_id=turn_id, to=to, lease_owner=owner)  # type: ignore[arg-type]
    )


async def expired(stub: Stub, limit: int = 0) -> list[str]:
    resp = await stub.ListExpiredLeases(store_pb2.ListExpiredLeasesRequest(limit=limit))
    return [t.id for t in resp.turns]


async def test_claim_sets_the_owner_and_an_expiry_on_the_store_clock(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    leased = await claim(store_stub, turn.id, "kernel-1", ttl=30)
    assert leased.lease_owner == "kernel-1"
    assert leased.lease_expires_at.seconds == int(clock.now) + 30
    assert (await get_turn(store_stub, turn.id)).lease_owner == "kernel-1"


async def test_ten_owners_claiming_at_once_leave_exactly_one(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    owners = [f"kernel-{i}" for i in range(10)]
    outcomes = await asyncio.gather(*(claim(store_stub, turn.id, o) for o in owners), return_exceptions=True)

    won = [o for o, r in zip(owners, outcomes, strict=True) if isinstance(r, common_pb2.Turn)]
    assert len(won) == 1
    lost = [r for r in outcomes if not isinstance(r, common_pb2.Turn)]
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in lost)
    for err in lost:
        assert isinstance(err, grpc.aio.AioRpcError)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert won[0] in (err.details() or "")
    assert (await get_turn(store_stub, turn.id)).lease_owner == won[0]


async def test_the_lease_passes_to_another_owner_only_after_it_expires(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    first = await claim(store_stub, turn.id, "kernel-a", ttl=30)

    clock.advance(29)
    err = await rpc_error(claim(store_stub, turn.id, "kernel-b"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert "kernel-a" in details
    expiry = first.lease_expires_at.ToDatetime().isoformat(timespec="seconds")
    assert expiry in details  # the expiry, so the caller knows when to try again

    clock.advance(2)
    taken = await claim(store_stub, turn.id, "kernel-b", ttl=30)
    assert taken.lease_owner == "kernel-b"

    # The old owner lost everything the lease gave it.
    err = await rpc_error(renew(store_stub, turn.id, "kernel-a"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = await rpc_error(move(store_stub, turn.id, S.TURN_STATE_RUNNING, owner="kernel-a"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    running = await move(store_stub, turn.id, S.TURN_STATE_RUNNING, owner="kernel-b")
    assert running.state == S.TURN_STATE_RUNNING


async def test_the_holder_may_claim_again_to_extend(store_stub: Stub, clock: FakeClock) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await claim(store_stub, turn.id, "kernel-1", ttl=30)
    clock.advance(20)
    again = await claim(store_stub, turn.id, "kernel-1", ttl=30)
    assert again.lease_expires_at.seconds == int(clock.now) + 30


async def test_renew_extends_the_holders_lease_until_another_claims_it(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await claim(store_stub, turn.id, "kernel-1", ttl=30)
    clock.advance(25)
    renewed = await renew(store_stub, turn.id, "kernel-1", ttl=30)
    assert renewed.lease_expires_at.seconds == int(clock.now) + 30

    err = await rpc_error(renew(store_stub, turn.id, "kernel-2"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "kernel-1" in (err.details() or "")

    # Expired, but nobody claimed it since: the holder is still the only writer, and renews.
    # (Before durable turns a renewal after expiry was refused.)
    clock.advance(31)
    late = await renew(store_stub, turn.id, "kernel-1", ttl=30)
    assert (late.lease_owner, late.lease_expires_at.seconds) == ("kernel-1", int(clock.now) + 30)

    # Once another owner claims it, the old holder's renewal is refused.
    clock.advance(31)
    await claim(store_stub, turn.id, "kernel-2")
    err = await rpc_error(renew(store_stub, turn.id, "kernel-1"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert details.startswith("lease lost:") and turn.id in details and "kernel-2" in details
    assert (await get_turn(store_stub, turn.id)).lease_owner == "kernel-2"


async def test_release_by_the_holder_frees_the_turn_at_once(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await claim(store_stub, turn.id, "kernel-1")

    err = await rpc_error(release(store_stub, turn.id, "kernel-2"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get_turn(store_stub, turn.id)).lease_owner == "kernel-1"

    released = await release(store_stub, turn.id, "kernel-1")
    assert released.lease_owner == ""
    assert not released.HasField("lease_expires_at")
    # A retried release of a lease nobody holds is harmless.
    assert (await release(store_stub, turn.id, "kernel-1")).lease_owner == ""
    assert (await claim(store_stub, turn.id, "kernel-2")).lease_owner == "kernel-2"


async def test_transition_with_the_lease_succeeds_until_another_claims_it(
    store_stub: Stub, clock: FakeClock
) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await claim(store_stub, turn.id, "kernel-1", ttl=30)
    assert (await move(store_stub, turn.id, S.TURN_STATE_RUNNING, "kernel-1")).state == S.TURN_STATE_RUNNING
    # Expiry alone does not take the lease away (as with a fence).
    clock.advance(31)
    waiting = await move(store_stub, turn.id, S.TURN_STATE_WAITING_FOR_APPROVAL, "kernel-1")
    assert waiting.state == S.TURN_STATE_WAITING_FOR_APPROVAL
    clock.advance(31)
    await claim(store_stub, turn.id, "kernel-2")
    err = await rpc_error(move(store_stub, turn.id, S.TURN_STATE_RESUMING, "kernel-1"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.details() or "").startswith("lease lost:")
    assert (await get_turn(store_stub, turn.id)).state == S.TURN_STATE_WAITING_FOR_APPROVAL


async def test_an_ended_turn_cannot_be_leased(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await move(store_stub, turn.id, S.TURN_STATE_ABORTED)
    err = await rpc_error(claim(store_stub, turn.id, "kernel-1"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "aborted" in (err.details() or "")


async def test_list_expired_leases_finds_live_turns_of_every_tenant(
    store_stub: Stub, clock: FakeClock
) -> None:
    ours = await new_conversation(store_stub)
    theirs = await new_conversation(store_stub, tenant_id=OTHER_TENANT)
    short = await new_turn(store_stub, ours.id)
    long = await new_turn(store_stub, ours.id)
    ended = await new_turn(store_stub, ours.id)
    released = await new_turn(store_stub, ours.id)
    never = await new_turn(store_stub, ours.id)
    foreign = await new_turn(store_stub, theirs.id, tenant_id=OTHER_TENANT)

    await claim(store_stub, short.id, "k", ttl=10)
    await claim(store_stub, long.id, "k", ttl=100)
    await claim(store_stub, ended.id, "k", ttl=10)
    await claim(store_stub, released.id, "k", ttl=10)
    await store_stub.ClaimLease(
        store_pb2.ClaimLeaseRequest(tenant_id=OTHER_TENANT, turn_id=foreign.id, owner="k", ttl=seconds(20))
    )
    await move(store_stub, ended.id, S.TURN_STATE_ABORTED)
    await release(store_stub, released.id, "k")
    # Nobody holds a released or never-leased turn: they are listed from the start
    # (their expiry is 0, so they come first, oldest first).
    assert await expired(store_stub) == [released.id, never.id]

    clock.advance(50)
    # Earliest expiry first; ended and unexpired turns are not listed.
    assert await expired(store_stub) == [released.id, never.id, short.id, foreign.id]
    assert await expired(store_stub, limit=1) == [released.id]
    assert await expired(store_stub, limit=3) == [released.id, never.id, short.id]
    # Each with its tenant: the sweeping kernel claims it in that tenant.
    listed = await store_stub.ListExpiredLeases(store_pb2.ListExpiredLeasesRequest())
    assert [t.tenant_id for t in listed.turns] == [TENANT, TENANT, TENANT, OTHER_TENANT]


@pytest.mark.parametrize("ttl", [0.0, -5.0])
async def test_a_lease_needs_a_positive_ttl(store_stub: Stub, ttl: float) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    err = await rpc_error(claim(store_stub, turn.id, "kernel-1", ttl=ttl))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl" in (err.details() or "")
    await claim(store_stub, turn.id, "kernel-1")
    err = await rpc_error(renew(store_stub, turn.id, "kernel-1", ttl=ttl))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await get_turn(store_stub, turn.id)).lease_owner == "kernel-1"


async def test_a_lease_needs_an_owner(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    err = await rpc_error(claim(store_stub, turn.id, ""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "owner" in (err.details() or "")


# -------------------------------------------------------------------- metrics


def step_metrics(turn_id: str, step_index: int, output_tokens: int) -> common_pb2.StepMetrics:
    return common_pb2.StepMetrics(
        turn_id=turn_id,
        step_index=step_index,
        usage=common_pb2.Usage(input_tokens=100, output_tokens=output_tokens),
        tool_calls=1,
        finish_reason=S.FINISH_REASON_TOOL_CALLS,
    )


async def record_step(stub: Stub, conversation_id: str, metrics: common_pb2.StepMetrics) -> None:
    await stub.RecordStepMetrics(
        store_pb2.RecordStepMetricsRequest(tenant_id=TENANT, conversation_id=conversation_id, metrics=metrics)
    )


async def record_turn(stub: Stub, metrics: common_pb2.TurnMetrics) -> None:
    await stub.RecordTurnMetrics(store_pb2.RecordTurnMetricsRequest(tenant_id=TENANT, metrics=metrics))


async def metrics_of(stub: Stub, conversation_id: str, turn_id: str = "") -> list[common_pb2.TurnMetrics]:
    resp = await stub.GetMetrics(
        store_pb2.GetMetricsRequest(tenant_id=TENANT, conversation_id=conversation_id, turn_id=turn_id)
    )
    return list(resp.turns)


async def test_metrics_are_upserted_per_turn_and_step_and_read_back_together(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    first = await new_turn(store_stub, conv.id)
    second = await new_turn(store_stub, conv.id)

    await record_step(store_stub, conv.id, step_metrics(first.id, 1, 20))
    await record_step(store_stub, conv.id, step_metrics(first.id, 0, 10))
    await record_step(store_stub, conv.id, step_metrics(first.id, 1, 25))  # a rewrite replaces
    await record_turn(
        store_stub,
        common_pb2.TurnMetrics(turn_id=first.id, conversation_id=conv.id, steps=2, context_size=125),
    )
    await record_turn(
        store_stub,
        common_pb2.TurnMetrics(
            turn_id=first.id,
            conversation_id=conv.id,
            steps=2,
            context_size=130,
            finish_reason=S.FINISH_REASON_STOP,
        ),
    )
    await record_turn(store_stub, common_pb2.TurnMetrics(turn_id=second.id, steps=1))

    turns = await metrics_of(store_stub, conv.id)
    assert [t.turn_id for t in turns] == [first.id, second.id]
    assert (turns[0].context_size, turns[0].finish_reason) == (130, S.FINISH_REASON_STOP)
    assert [(s.step_index, s.usage.output_tokens, s.step_id) for s in turns[0].step_metrics] == [
        (0, 10, f"{first.id}#0"),
        (1, 25, f"{first.id}#1"),
    ]
    assert turns[1].conversation_id == conv.id
    assert list(turns[1].step_metrics) == []

    only = await metrics_of(store_stub, conv.id, turn_id=second.id)
    assert [t.turn_id for t in only] == [second.id]
    # Metrics stay out of the history.
    assert (await load(store_stub, conv.id)).last_seq == 0


async def test_step_metrics_show_before_the_turn_is_summed_up(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    await new_turn(store_stub, conv.id)  # nothing recorded: not listed
    await record_step(store_stub, conv.id, step_metrics(turn.id, 0, 10))
    turns = await metrics_of(store_stub, conv.id)
    assert [(t.turn_id, len(t.step_metrics)) for t in turns] == [(turn.id, 1)]


async def test_metrics_of_a_turn_in_another_conversation_are_not_found(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    other = await new_conversation(store_stub)
    turn = await new_turn(store_stub, other.id)
    err = await rpc_error(record_step(store_stub, conv.id, step_metrics(turn.id, 0, 1)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(metrics_of(store_stub, conv.id, turn_id=turn.id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(
        record_turn(store_stub, common_pb2.TurnMetrics(turn_id=turn.id, conversation_id=conv.id))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert await metrics_of(store_stub, other.id) == []


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        (common_pb2.StepMetrics(step_index=0), "turn_id"),
        (common_pb2.StepMetrics(turn_id="TURN", step_index=-1), "step_index"),
        (common_pb2.StepMetrics(turn_id="TURN", step_index=2, step_id="elsewhere#0"), "step_id"),
    ],
)
async def test_bad_step_metrics_are_refused(
    store_stub: Stub, metrics: common_pb2.StepMetrics, needle: str
) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    if metrics.turn_id:
        metrics.turn_id = turn.id
    err = await rpc_error(record_step(store_stub, conv.id, metrics))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    assert await metrics_of(store_stub, conv.id) == []


async def test_turn_metrics_carrying_step_metrics_are_refused(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    err = await rpc_error(
        record_turn(
            store_stub, common_pb2.TurnMetrics(turn_id=turn.id, step_metrics=[step_metrics(turn.id, 0, 1)])
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RecordStepMetrics" in (err.details() or "")


# ---------------------------------------------------------------------- queue


async def enqueue(stub: Stub, conversation_id: str, text: str, key: str = "") -> store_pb2.QueuedMessage:
    resp = await stub.Enqueue(
        store_pb2.EnqueueRequest(
            tenant_id=TENANT, conversation_id=conversation_id, message=text_message(text), idempotency_key=key
        )
    )
    return resp.queued


async def drain(stub: Stub, conversation_id: str) -> list[store_pb2.QueuedMessage]:
    resp = await stub.DrainQueue(
        store_pb2.DrainQueueRequest(tenant_id=TENANT, conversation_id=conversation_id)
    )
    return list(resp.messages)


def texts(items: list[store_pb2.QueuedMessage]) -> list[str]:
    return ["".join(c.text.text for c in q.message.chunks) for q in items]


async def test_append_can_take_the_queue_in_the_same_transaction(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await store_stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
    for text in ("steer one", "steer two"):
        await enqueue(store_stub, conv.id, text)
    resp = await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            messages=[text_message("the step so far", role=common_pb2.ROLE_ASSISTANT)],
            take_queue_for_turn=turn.id,
        )
    )
    assert resp.dequeued == 2
    assert [m.seq for m in resp.messages] == [1, 2, 3]
    taken = resp.messages[-2:]
    assert ["".join(c.text.text for c in m.chunks) for m in taken] == ["steer one", "steer two"]
    assert all(m.role == common_pb2.ROLE_USER and m.turn_id == turn.id for m in taken)
    # Taken means gone from the queue, and in history.
    assert await drain(store_stub, conv.id) == []
    assert (await load(store_stub, conv.id)).last_seq == 3
    # An empty queue takes nothing; a take with nothing else to append appends nothing.
    empty = await store_stub.Append(
        store_pb2.AppendRequest(tenant_id=TENANT, conversation_id=conv.id, take_queue_for_turn=turn.id)
    )
    assert (empty.dequeued, list(empty.messages), empty.last_seq) == (0, [], 0)
    err = await rpc_error(
        store_stub.Append(
            store_pb2.AppendRequest(tenant_id=TENANT, conversation_id=conv.id, take_queue_for_turn="nope")
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_drain_answers_the_queue_in_order_and_empties_it(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    other = await new_conversation(store_stub)
    queued = [await enqueue(store_stub, conv.id, t) for t in ("one", "two", "three")]
    await enqueue(store_stub, other.id, "elsewhere")
    ids = [q.id for q in queued]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(q.conversation_id == conv.id for q in queued)

    drained = await drain(store_stub, conv.id)
    assert texts(drained) == ["one", "two", "three"]
    assert [q.id for q in drained] == ids
    assert await drain(store_stub, conv.id) == []
    # Queued messages are not history.
    assert (await load(store_stub, conv.id)).last_seq == 0

    later = await enqueue(store_stub, conv.id, "four")
    assert later.id > ids[-1]
    assert texts(await drain(store_stub, conv.id)) == ["four"]
    assert texts(await drain(store_stub, other.id)) == ["elsewhere"]


async def test_a_repeated_idempotency_key_answers_the_first_item(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    other = await new_conversation(store_stub)
    first = await enqueue(store_stub, conv.id, "hello", key="send-1")
    again = await enqueue(store_stub, conv.id, "hello, retried", key="send-1")
    assert again == first
    # Keys are per conversation; and the empty key never deduplicates.
    assert (await enqueue(store_stub, other.id, "hello", key="send-1")).id != first.id
    await enqueue(store_stub, conv.id, "x")
    await enqueue(store_stub, conv.id, "x")
    assert texts(await drain(store_stub, conv.id)) == ["hello", "x", "x"]
    # A retry that arrives after delivery does not deliver twice.
    assert (await enqueue(store_stub, conv.id, "hello", key="send-1")).id == first.id
    assert await drain(store_stub, conv.id) == []


async def test_concurrent_drains_deliver_each_message_once(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    for i in range(20):
        await enqueue(store_stub, conv.id, str(i))
    drains = await asyncio.gather(*(drain(store_stub, conv.id) for _ in range(5)))
    delivered = [t for d in drains for t in texts(d)]
    assert sorted(delivered, key=int) == [str(i) for i in range(20)]


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (common_pb2.Message(), "message is required"),
        (common_pb2.Message(role=S.ROLE_USER), "no chunks"),
        (text_message("x", role=S.ROLE_UNSPECIFIED), "role"),
    ],
)
async def test_enqueue_refuses_a_message_history_would_refuse(
    store_stub: Stub, message: common_pb2.Message, needle: str
) -> None:
    conv = await new_conversation(store_stub)
    err = await rpc_error(
        store_stub.Enqueue(
            store_pb2.EnqueueRequest(tenant_id=TENANT, conversation_id=conv.id, message=message)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    assert await drain(store_stub, conv.id) == []


# ------------------------------------------------------------------ approvals


async def create_approval(
    stub: Stub, conversation_id: str, turn_id: str, call_id: str = "call_1"
) -> common_pb2.Approval:
    return await stub.CreateApproval(
        store_pb2.CreateApprovalRequest(
            tenant_id=TENANT,
            approval=common_pb2.Approval(
                conversation_id=conversation_id,
                turn_id=turn_id,
                tool_call_id=call_id,
                tool_name="shell",
                input_json='{"command": "rm -rf build"}',
                step_id=f"{turn_id}#0",
            ),
        )
    )


async def resolve(
    stub: Stub, approval_id: str, decision: int, edited: str = "", reason: str = ""
) -> common_pb2.Approval:
    return await stub.ResolveApproval(
        store_pb2.ResolveApprovalRequest(
            tenant_id=TENANT,
            approval_id=approval_id,
            decision=decision,  # type: ignore[arg-type]
            edited_input_json=edited,
            reason=reason,
        )
    )


async def approvals(
    stub: Stub, conversation_id: str, pending_only: bool = False
) -> list[common_pb2.Approval]:
    resp = await stub.ListApprovals(
        store_pb2.ListApprovalsRequest(
            tenant_id=TENANT, conversation_id=conversation_id, pending_only=pending_only
        )
    )
    return list(resp.approvals)


async def test_an_approval_is_created_pending_and_resolved_once(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    created = await create_approval(store_stub, conv.id, turn.id)
    assert is_valid_id(created.id, "apr")
    assert created.decision == S.APPROVAL_DECISION_UNSPECIFIED
    assert created.HasField("created_at") and not created.HasField("resolved_at")
    assert (created.tool_name, created.step_id) == ("shell", f"{turn.id}#0")

    approved = await resolve(store_stub, created.id, S.APPROVAL_DECISION_APPROVE, reason="looks fine")
    assert (approved.decision, approved.reason) == (S.APPROVAL_DECISION_APPROVE, "looks fine")
    assert approved.HasField("resolved_at")

    err = await rpc_error(resolve(store_stub, created.id, S.APPROVAL_DECISION_REJECT))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.details() or "").startswith("already decided")
    assert (await approvals(store_stub, conv.id))[0].decision == S.APPROVAL_DECISION_APPROVE


async def test_list_approvals_oldest_first_and_pending_only(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    created = [await create_approval(store_stub, conv.id, turn.id, f"call_{i}") for i in range(3)]
    await resolve(store_stub, created[1].id, S.APPROVAL_DECISION_REJECT)
    assert [a.id for a in await approvals(store_stub, conv.id)] == [a.id for a in created]
    assert [a.id for a in await approvals(store_stub, conv.id, pending_only=True)] == [
        created[0].id,
        created[2].id,
    ]


async def test_an_edit_carries_valid_json_input(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    created = await create_approval(store_stub, conv.id, turn.id)

    for bad, needle in [
        ("", "edited_input_json"),
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
    ]:
        err = await rpc_error(resolve(store_stub, created.id, S.APPROVAL_DECISION_EDIT, bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (err.details() or "")
    assert [a.id for a in await approvals(store_stub, conv.id, pending_only=True)] == [created.id]

    edited = await resolve(
        store_stub, created.id, S.APPROVAL_DECISION_EDIT, '{"command": "rm -rf build/tmp"}'
    )
    assert (edited.decision, edited.edited_input_json) == (
        S.APPROVAL_DECISION_EDIT,
        '{"command": "rm -rf build/tmp"}',
    )


@pytest.mark.parametrize("decision", [S.APPROVAL_DECISION_UNSPECIFIED, 42])
async def test_resolving_needs_a_decision(store_stub: Stub, decision: int) -> None:
    conv = await new_conversation(store_stub)
    turn = await new_turn(store_stub, conv.id)
    created = await create_approval(store_stub, conv.id, turn.id)
    err = await rpc_error(resolve(store_stub, created.id, decision))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decision" in (err.details() or "")


async def test_an_approval_must_name_its_call_and_belong_to_its_conversation(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    other = await new_conversation(store_stub)
    turn = await new_turn(store_stub, other.id)
    err = await rpc_error(create_approval(store_stub, conv.id, turn.id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(
        store_stub.CreateApproval(
            store_pb2.CreateApprovalRequest(
                tenant_id=TENANT,
                approval=common_pb2.Approval(conversation_id=other.id, turn_id=turn.id, tool_name="shell"),
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tool_call_id" in (err.details() or "")
    assert await approvals(store_stub, conv.id) == await approvals(store_stub, other.id) == []


# ------------------------------------------------------------------- api keys


async def create_key(stub: Stub, tenant_id: str = TENANT, name: str = "ci") -> store_pb2.CreateApiKeyResponse:
    return await stub.CreateApiKey(store_pb2.CreateApiKeyRequest(tenant_id=tenant_id, name=name))


async def authenticate(stub: Stub, secret: str) -> store_pb2.AuthenticateResponse:
    return await stub.Authenticate(store_pb2.AuthenticateRequest(secret=secret))


async def test_a_new_key_authenticates_as_its_tenant(store_stub: Stub) -> None:
    created = await create_key(store_stub)
    assert created.secret.startswith("dsp_") and len(created.secret) == 36
    assert created.key.prefix == created.secret[:8] and created.key.prefix != created.secret
    assert (created.key.tenant_id, created.key.name, created.key.revoked) == (TENANT, "ci", False)

    who = await authenticate(store_stub, created.secret)
    assert (who.tenant_id, who.key_id) == (TENANT, created.key.id)

    theirs = await create_key(store_stub, tenant_id=OTHER_TENANT)
    assert theirs.secret != created.secret
    assert (await authenticate(store_stub, theirs.secret)).tenant_id == OTHER_TENANT


async def test_a_revoked_or_unknown_key_is_refused_without_echoing_it(
    store_stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await create_key(store_stub)
    revoked = await store_stub.RevokeApiKey(store_pb2.RevokeApiKeyRequest(key_id=created.key.id))
    assert revoked.key.revoked
    # Revoking twice is harmless.
    assert (await store_stub.RevokeApiKey(store_pb2.RevokeApiKeyRequest(key_id=created.key.id))).key.revoked

    for secret in (created.secret, "dsp_" + "x" * 32, created.secret + "x"):
        err = await rpc_error(authenticate(store_stub, secret))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "unknown or revoked API key"
    assert created.secret not in caplog.text


async def test_listing_keys_never_shows_a_secret(store_stub: Stub) -> None:
    ours = [await create_key(store_stub, name=f"k{i}") for i in range(2)]
    theirs = await create_key(store_stub, tenant_id=OTHER_TENANT)
    await store_stub.RevokeApiKey(store_pb2.RevokeApiKeyRequest(key_id=ours[0].key.id))

    mine = await store_stub.ListApiKeys(store_pb2.ListApiKeysRequest(tenant_id=TENANT))
    assert [(k.id, k.revoked) for k in mine.keys] == [(ours[0].key.id, True), (ours[1].key.id, False)]
    everyone = await store_stub.ListApiKeys(store_pb2.ListApiKeysRequest())
    assert {k.id for k in everyone.keys} == {ours[0].key.id, ours[1].key.id, theirs.key.id}
    raw = everyone.SerializeToString()
    assert all(c.secret.encode() not in raw for c in (*ours, theirs))


async def test_revoking_an_unknown_key_is_not_found(store_stub: Stub) -> None:
    err = await rpc_error(store_stub.RevokeApiKey(store_pb2.RevokeApiKeyRequest(key_id=new_id("key"))))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda s: s.Authenticate(store_pb2.AuthenticateRequest()), "secret is required"),
        (lambda s: s.CreateApiKey(store_pb2.CreateApiKeyRequest(name="x")), "tenant_id"),
        (lambda s: s.RevokeApiKey(store_pb2.RevokeApiKeyRequest(key_id="nope")), "key_id"),
    ],
)
async def test_api_key_calls_check_their_fields(
    store_stub: Stub, call: Callable[[Stub], Awaitable[object]], needle: str
) -> None:
    err = await rpc_error(call(store_stub))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")


# -------------------------------------------------------------------- tenancy


@dataclass
class Rows:
    conversation_id: str
    turn_id: str
    approval_id: str


if TYPE_CHECKING:
    Scoped: TypeAlias = Callable[[Stub, Rows, str], Awaitable[object]]

SCOPED: dict[str, Scoped] = {
    "Reconcile": lambda s, r, t: s.Reconcile(
        store_pb2.ReconcileRequest(tenant_id=t, conversation_id=r.conversation_id)
    ),
    "ClaimLease": lambda s, r, t: s.ClaimLease(
        store_pb2.ClaimLeaseRequest(tenant_id=t, turn_id=r.turn_id, owner="thief", ttl=seconds(30))
    ),
    "RenewLease": lambda s, r, t: s.RenewLease(
        store_pb2.RenewLeaseRequest(tenant_id=t, turn_id=r.turn_id, owner="kernel-1", ttl=seconds(30))
    ),
    "ReleaseLease": lambda s, r, t: s.ReleaseLease(
        store_pb2.ReleaseLeaseRequest(tenant_id=t, turn_id=r.turn_id, owner="kernel-1")
    ),
    "RecordTurnMetrics": lambda s, r, t: s.RecordTurnMetrics(
        store_pb2.RecordTurnMetricsRequest(
            tenant_id=t, metrics=common_pb2.TurnMetrics(turn_id=r.turn_id, steps=9)
        )
    ),
    "RecordStepMetrics": lambda s, r, t: s.RecordStepMetrics(
        store_pb2.RecordStepMetricsRequest(
            tenant_id=t, conversation_id=r.conversation_id, metrics=step_metrics(r.turn_id, 5, 1)
        )
    ),
    "GetMetrics": lambda s, r, t: s.GetMetrics(
        store_pb2.GetMetricsRequest(tenant_id=t, conversation_id=r.conversation_id)
    ),
    "Enqueue": lambda s, r, t: s.Enqueue(
        store_pb2.EnqueueRequest(tenant_id=t, conversation_id=r.conversation_id, message=text_message("x"))
    ),
    "DrainQueue": lambda s, r, t: s.DrainQueue(
        store_pb2.DrainQueueRequest(tenant_id=t, conversation_id=r.conversation_id)
    ),
    "CreateApproval": lambda s, r, t: s.CreateApproval(
        store_pb2.CreateApprovalRequest(
            tenant_id=t,
            approval=common_pb2.Approval(
                conversation_id=r.conversation_id, turn_id=r.turn_id, tool_call_id="c", tool_name="shell"
            ),
        )
    ),
    "ResolveApproval": lambda s, r, t: s.ResolveApproval(
        store_pb2.ResolveApprovalRequest(
            tenant_id=t, approval_id=r.approval_id, decision=S.APPROVAL_DECISION_APPROVE
        )
    ),
    "ListApprovals": lambda s, r, t: s.ListApprovals(
        store_pb2.ListApprovalsRequest(tenant_id=t, conversation_id=r.conversation_id)
    ),
    "ListApprovals-of-a-turn": lambda s, r, t: s.ListApprovals(
        store_pb2.ListApprovalsRequest(tenant_id=t, turn_id=r.turn_id)
    ),
    "GetApproval": lambda s, r, t: s.GetApproval(
        store_pb2.GetApprovalRequest(tenant_id=t, approval_id=r.approval_id)
    ),
}


async def seed(stub: Stub) -> Rows:
    conv = await new_conversation(stub)
    turn = await new_turn(stub, conv.id)
    await append(stub, conv.id, [calls(turn.id, 0, "call_a")])
    await claim(stub, turn.id, "kernel-1")
    await record_turn(stub, common_pb2.TurnMetrics(turn_id=turn.id, steps=1))
    await enqueue(stub, conv.id, "queued")
    approval = await create_approval(stub, conv.id, turn.id)
    return Rows(conv.id, turn.id, approval.id)


@pytest.mark.parametrize("method", list(SCOPED))
async def test_another_tenant_gets_not_found_and_changes_nothing(store_stub: Stub, method: str) -> None:
    rows = await seed(store_stub)
    err = await rpc_error(SCOPED[method](store_stub, rows, OTHER_TENANT))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    history = await load(store_stub, rows.conversation_id)
    assert history.last_seq == 1 and dangling(list(history.messages)) == {"call_a"}
    assert (await get_turn(store_stub, rows.turn_id)).lease_owner == "kernel-1"
    [metrics] = await metrics_of(store_stub, rows.conversation_id)
    assert (metrics.steps, list(metrics.step_metrics)) == (1, [])
    [pending] = await approvals(store_stub, rows.conversation_id, pending_only=True)
    assert pending.id == rows.approval_id
    assert texts(await drain(store_stub, rows.conversation_id)) == ["queued"]


@pytest.mark.parametrize("method", list(SCOPED))
async def test_new_scoped_calls_need_a_tenant(store_stub: Stub, method: str) -> None:
    rows = await seed(store_stub)
    err = await rpc_error(SCOPED[method](store_stub, rows, ""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_id" in (err.details() or "")
