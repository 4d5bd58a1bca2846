"""Metrics that ride in a fenced Append (issue 14: one store round trip per step): recorded
in the same transaction as RecordStepMetrics and RecordTurnMetrics record them, only for
the fenced turn. Run against ``store_stub``, once per backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from dispatch.v1 import common_pb2, store_pb2
from tests.store.harness import TENANT, new_conversation, rpc_error, text_message
from tests.store.test_conformance import metrics_of, step_metrics
from tests.store.test_durable_turns import fence, leased_turn, seal

if TYPE_CHECKING:
    from tests.store.harness import Stub

S = common_pb2


async def test_a_steps_metrics_ride_in_its_commit_and_the_turns_in_its_seal(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            messages=[text_message("step 0")],
            fence=fence(turn),
            step_metrics=[step_metrics(turn.id, 0, 10)],
        )
    )
    # Again for the same step (a retried commit): replaced, not doubled.
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            fence=fence(turn),
            step_metrics=[step_metrics(turn.id, 0, 12), step_metrics(turn.id, 1, 20)],
        )
    )
    await store_stub.Append(
        store_pb2.AppendRequest(
            tenant_id=TENANT,
            conversation_id=conv.id,
            fence=fence(turn),
            seal=seal(),
            turn_metrics=common_pb2.TurnMetrics(steps=2, tool_calls=2, finish_reason=S.FINISH_REASON_STOP),
        )
    )
    [got] = await metrics_of(store_stub, conv.id, turn.id)
    assert (got.turn_id, got.conversation_id, got.steps, got.tool_calls) == (turn.id, conv.id, 2, 2)
    assert [(m.step_index, m.usage.output_tokens, m.step_id) for m in got.step_metrics] == [
        (0, 12, f"{turn.id}#0"),
        (1, 20, f"{turn.id}#1"),
    ]


async def test_metrics_in_an_append_need_its_fence_and_must_be_the_fenced_turns(store_stub: Stub) -> None:
    conv = await new_conversation(store_stub)
    turn = await leased_turn(store_stub, conv.id)
    other = await leased_turn(store_stub, conv.id, owner="kernel-2")
    cases = [
        (
            store_pb2.AppendRequest(
                tenant_id=TENANT, conversation_id=conv.id, step_metrics=[step_metrics(turn.id, 0, 1)]
            ),
            "step_metrics needs a fence",
        ),
        (
            store_pb2.AppendRequest(
                tenant_id=TENANT, conversation_id=conv.id, turn_metrics=common_pb2.TurnMetrics(steps=1)
            ),
            "turn_metrics needs a fence",
        ),
        (
            store_pb2.AppendRequest(
                tenant_id=TENANT,
                conversation_id=conv.id,
                fence=fence(turn),
                step_metrics=[step_metrics(other.id, 0, 1)],
            ),
            f"step_metrics[0].turn_id is {other.id}, not the fenced turn {turn.id}",
        ),
        (
            store_pb2.AppendRequest(
                tenant_id=TENANT,
                conversation_id=conv.id,
                fence=fence(turn),
                step_metrics=[common_pb2.StepMetrics(turn_id=turn.id, step_index=-1)],
            ),
            "step_index must be 0 or more",
        ),
    ]
    for request, words in cases:
        err = await rpc_error(store_stub.Append(request))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert words in (err.details() or "")
    # Nothing of the refused appends was recorded.
    assert not any(m.step_metrics for m in await metrics_of(store_stub, conv.id, turn.id))
