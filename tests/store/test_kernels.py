"""Scale-out in the store (issue 15). Kernels advertise themselves: a heartbeat row per
kernel, renewed with its leases in one RenewLeases, live until its time to live runs out,
gone at once when the kernel retires. A cluster-wide limit on running turns is enforced
as each queued turn moves to running. Every backend; time moves only with ``clock``."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc

from dispatch.v1 import common_pb2, store_pb2
from tests.store.harness import TENANT, FakeClock, new_conversation, rpc_error, seconds

if TYPE_CHECKING:
    from tests.store.harness import Stub


async def beat(store: Stub, owner: str, address: str, *, ttl: float = 10.0, running: int = 0) -> list[str]:
    resp = await store.RenewLeases(
        store_pb2.RenewLeasesRequest(
            owner=owner,
            ttl=seconds(ttl),
            kernel=store_pb2.KernelInfo(address=address, run_slots=4, running=running),
        )
    )
    return [k.owner for k in resp.kernels]


async def queued_turn(store: Stub, conversation_id: str) -> str:
    """A new turn of the conversation, queued, leased to k1."""
    turn = await store.CreateTurn(
        store_pb2.CreateTurnRequest(
            tenant_id=TENANT,
            conversation_id=conversation_id,
            state=common_pb2.TURN_STATE_QUEUED,
            lease_owner="k1",
            lease_ttl=seconds(30),
        )
    )
    return turn.id


async def live(store: Stub) -> dict[str, store_pb2.KernelInfo]:
    return {k.owner: k for k in (await store.ListKernels(store_pb2.ListKernelsRequest())).kernels}


async def test_a_heartbeat_advertises_a_kernel_until_its_ttl_runs_out(
    store_stub: Stub, clock: FakeClock
) -> None:
    assert await beat(store_stub, "k1", "10.0.0.1:7601") == ["k1"]
    clock.advance(1)
    # The answer names every live kernel, oldest first: each kernel learns its peers.
    assert await beat(store_stub, "k2", "10.0.0.2:7601", running=2) == ["k1", "k2"]
    kernels = await live(store_stub)
    assert (kernels["k2"].address, kernels["k2"].run_slots, kernels["k2"].running) == ("10.0.0.2:7601", 4, 2)
    assert kernels["k2"].expires_at_unix_nanos > kernels["k2"].started_at_unix_nanos
    clock.advance(9.5)  # k1's beat expires, k2's not yet
    assert list(await live(store_stub)) == ["k2"]
    # A later beat keeps the first one's start: k1 back is still the older kernel.
    started = kernels["k1"].started_at_unix_nanos
    assert await beat(store_stub, "k1", "10.0.0.1:7602") == ["k1", "k2"]
    again = await live(store_stub)
    assert (again["k1"].started_at_unix_nanos, again["k1"].address) == (started, "10.0.0.1:7602")


async def test_a_retired_kernel_is_gone_at_once_and_renewals_without_a_heartbeat_leave_rows_alone(
    store_stub: Stub, clock: FakeClock
) -> None:
    await beat(store_stub, "k1", "a:1")
    await beat(store_stub, "k2", "b:1")
    await store_stub.RetireKernel(store_pb2.RetireKernelRequest(owner="k1"))
    assert list(await live(store_stub)) == ["k2"]
    await store_stub.RetireKernel(store_pb2.RetireKernelRequest(owner="nobody"))  # nothing to do
    resp = await store_stub.RenewLeases(store_pb2.RenewLeasesRequest(owner="k3", ttl=seconds(5)))
    assert list(resp.kernels) == [] and list(await live(store_stub)) == ["k2"]


async def test_a_heartbeat_without_an_address_or_with_negative_counts_is_refused(store_stub: Stub) -> None:
    bad = [
        store_pb2.KernelInfo(),
        store_pb2.KernelInfo(address="a:1", run_slots=-1),
        store_pb2.KernelInfo(address="a:1", running=-2),
    ]
    for kernel in bad:
        err = await rpc_error(
            store_stub.RenewLeases(store_pb2.RenewLeasesRequest(owner="k1", ttl=seconds(5), kernel=kernel))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, kernel
    err = await rpc_error(store_stub.RetireKernel(store_pb2.RetireKernelRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await live(store_stub) == {}


async def test_a_cluster_limit_admits_a_queued_turn_only_while_fewer_turns_run(store_stub: Stub) -> None:
    convs = [(await new_conversation(store_stub)).id for _ in range(3)]

    def admit(turn_id: str, to: common_pb2.TurnState.ValueType = common_pb2.TURN_STATE_RUNNING) -> Any:
        return store_stub.TransitionTurn(
            store_pb2.TransitionTurnRequest(
                tenant_id=TENANT,
                turn_id=turn_id,
                to=to,
                lease_owner="k1",
                max_running=2,
            )
        )

    first, second, third = [await queued_turn(store_stub, c) for c in convs]
    await admit(first)
    await admit(second)
    err = await rpc_error(admit(third))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 2" in (err.details() or "")
    # A turn waiting for approval still holds its slot; one that ends frees it.
    await admit(first, common_pb2.TURN_STATE_WAITING_FOR_APPROVAL)
    assert (await rpc_error(admit(third))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await admit(second, common_pb2.TURN_STATE_COMPLETED)
    admitted = await admit(third)
    assert admitted.state == common_pb2.TURN_STATE_RUNNING
    # Without a limit nothing is counted; a negative one is refused.
    err = await rpc_error(
        store_stub.TransitionTurn(
            store_pb2.TransitionTurnRequest(
                tenant_id=TENANT, turn_id=third, to=common_pb2.TURN_STATE_COMPLETED, max_running=-1
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_racing_admissions_never_pass_the_cluster_limit(store_stub: Stub) -> None:
    # Ten queued turns race for 3 slots (on PostgreSQL, each on a connection of its own).
    turns = []
    for _ in range(10):
        turns.append(await queued_turn(store_stub, (await new_conversation(store_stub)).id))
    results = await asyncio.gather(
        *(
            store_stub.TransitionTurn(
                store_pb2.TransitionTurnRequest(
                    tenant_id=TENANT,
                    turn_id=t,
                    to=common_pb2.TURN_STATE_RUNNING,
                    lease_owner="k1",
                    max_running=3,
                )
            )
            for t in turns
        ),
        return_exceptions=True,
    )
    admitted = [r for r in results if isinstance(r, common_pb2.Turn)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(admitted) == 3 and len(refused) == 7
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
