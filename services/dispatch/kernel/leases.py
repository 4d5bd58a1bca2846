"""The leases this kernel holds on the turns it runs.

A turn runs only while its kernel holds the turn's lease in the store (owner = the
kernel's instance id, with an epoch the store bumps on every claim). Every write of the
turn carries that fence, so a kernel that lost a turn cannot write into it. The keeper
renews every lease it holds in one store call, every third of the lease's time to live;
a lease the store says is gone (another kernel claimed the turn, or it ended) is handed
to the turn's ``on_lost``, which stops the turn without another write.

A renewal the store cannot take (it is down) is retried on the next beat: while the
store is down nobody can claim the turn either, and a renewal that succeeds later is
valid as long as nobody claimed the turn in between. But a kernel that has not renewed
a lease for most of its time to live (by its own clock) may lose it without being told
(it is cut off from the store, which may let another kernel claim the turn once the
lease expires there), so the turn is told (``on_unsure``) before that can happen: it
stops what it is running (the provider call, its tools) and waits. A renewal that
succeeds later says the lease held (``on_sure``): the turn goes on, running the cut step
again. One that says it is gone hands the turn to ``on_lost``. So a turn never runs on
two kernels at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2

from dispatch.kernel.every import Every
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)


def new_instance_id() -> str:
    """A name for this kernel process on the leases it holds: unique per start."""
    return f"kernel-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def ttl_duration(seconds: float) -> duration_pb2.Duration:
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(round(seconds * 1e9))
    return ttl


@dataclass
class Lease:
    """One turn's lease as this kernel holds it."""

    tenant_id: str
    turn_id: str
    epoch: int
    # Called once if the store says the lease is gone.
    on_lost: Callable[[], None]
    # When the store last confirmed the lease (loop time: the claim's or a renewal's start).
    confirmed_at: float = 0.0
    # Called when the lease went unconfirmed too long (stop running), and when a renewal
    # confirms it again (go on).
    on_unsure: Callable[[], None] = lambda: None
    on_sure: Callable[[], None] = lambda: None
    unsure: bool = False

    def fence(self, owner: str) -> store_pb2.LeaseFence:
        return store_pb2.LeaseFence(turn_id=self.turn_id, owner=owner, epoch=self.epoch)


class LeaseKeeper:
    """Renews the leases of the turns this kernel runs."""

    def __init__(
        self,
        store: store_pb2_grpc.ConversationStoreAsyncStub,
        owner: str,
        ttl: float,
        rpc_timeout: float,
    ):
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self.rpc_timeout = rpc_timeout
        self._leases: dict[str, Lease] = {}
        # Every third of the TTL; every tenth while renewals fail, so a blip is retried in time.
        self._beat = Every(
            "lease keeper", lambda: self.ttl / (10 if self._failing else 3), self._renew_or_stop, now=False
        )
        self._failing = False
        # Scale-out: what this kernel advertises with every beat (None: nothing, as in tests
        # that run a bare kernel), and the live kernels the store answered with.
        self.advertise: Callable[[], store_pb2.KernelInfo] | None = None
        self.peers: dict[str, store_pb2.KernelInfo] = {}
        self._retired = False

    @property
    def ttl_proto(self) -> duration_pb2.Duration:
        return ttl_duration(self.ttl)

    def hold(
        self,
        tenant_id: str,
        turn: common_pb2.Turn,
        on_lost: Callable[[], None],
        on_unsure: Callable[[], None] = lambda: None,
        on_sure: Callable[[], None] = lambda: None,
    ) -> Lease:
        """Keep ``turn``'s lease (as its row says this kernel holds it) renewed."""
        lease = Lease(tenant_id, turn.id, turn.lease_epoch, on_lost, self._now(), on_unsure, on_sure)
        self._leases[turn.id] = lease
        return lease

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def drop(self, turn_id: str) -> None:
        """Stop renewing: the turn ended, was handed over, or was lost."""
        self._leases.pop(turn_id, None)

    def held(self) -> list[Lease]:
        return list(self._leases.values())

    def start(self) -> None:
        self._beat.start()

    async def close(self) -> None:
        await self._beat.close()
        await self.retire()

    def others(self) -> dict[str, store_pb2.KernelInfo]:
        """The other live kernels, as of the last beat."""
        return {owner: k for owner, k in self.peers.items() if owner != self.owner}

    async def retire(self) -> None:
        """Stop advertising this kernel (it shuts down): its heartbeat row goes at once, so
        transports stop sending it new work. Its leases are still renewed until handed over."""
        if self.advertise is None or self._retired:
            return
        self._retired = True
        try:
            await self.store.RetireKernel(
                store_pb2.RetireKernelRequest(owner=self.owner), timeout=min(self.rpc_timeout, 2.0)
            )
        except grpc.aio.AioRpcError as exc:
            # Its row expires by itself within a lease's time.
            log.warning("could not retire this kernel's heartbeat: %s: %s", exc.code().name, exc.details())

    def confident(self, turn_id: str) -> bool:
        """Whether ``turn_id`` may go on running now: its lease was confirmed within 3/4 of
        its time to live. If not (the kernel was paused, or cut off, longer than its beat
        noticed), the turn is told at once (``on_unsure``): asked before a tool starts, so
        a kernel that wakes up late never starts one on a lease it may have lost."""
        lease = self._leases.get(turn_id)
        if lease is None:
            return True  # not renewed by this keeper (its own writes are fenced all the same)
        if not lease.unsure and lease.confirmed_at >= self._now() - 0.75 * self.ttl:
            return True
        self._doubt()
        return False

    async def _renew_or_stop(self) -> None:
        self._doubt()
        await self.renew()

    async def renew(self) -> None:
        """Renew every held lease in one call, with this kernel's heartbeat; hand each lost
        one to its turn."""
        leases = self.held()
        heartbeat = self.advertise() if self.advertise is not None and not self._retired else None
        if not leases and heartbeat is None:
            return
        sent = self._now()
        try:
            resp = await self.store.RenewLeases(
                store_pb2.RenewLeasesRequest(
                    owner=self.owner,
                    ttl=self.ttl_proto,
                    kernel=heartbeat,
                    leases=[
                        store_pb2.LeaseRef(
                            tenant_id=lease.tenant_id, turn_id=lease.turn_id, epoch=lease.epoch
                        )
                        for lease in leases
                    ],
                ),
                timeout=min(self.rpc_timeout, self.ttl / 10),
            )
        except grpc.aio.AioRpcError as exc:
            if not self._failing:
                log.warning(
                    "could not renew %d lease(s): %s: %s; retrying every %.1fs",
                    len(leases),
                    exc.code().name,
                    exc.details(),
                    self.ttl / 3,
                )
            self._failing = True
            return
        if self._failing:
            log.info("leases renewed again")
        self._failing = False
        if heartbeat is not None:
            self.peers = {k.owner: k for k in resp.kernels}
        lost = set(resp.lost_turn_ids)
        for held in leases:
            if held.turn_id not in lost:
                held.confirmed_at = sent
                if held.unsure:
                    held.unsure = False
                    log.info("turn %s: its lease held through the outage; it goes on", held.turn_id)
                    held.on_sure()
        for turn_id in resp.lost_turn_ids:
            lease = self._leases.pop(turn_id, None)
            if lease is not None:
                log.warning(
                    "turn %s: lease lost (another kernel holds it, or it ended); stopping it", turn_id
                )
                lease.on_lost()

    def _doubt(self) -> None:
        """Tell the turns whose lease the store has not confirmed for 3/4 of its time to live
        (a few renewals failed in a row) to stop running: it may expire there soon, and
        another kernel may claim it then. Checked before each renewal, which come every
        tenth of the TTL while they fail, so this happens before the lease can expire."""
        deadline = self._now() - 0.75 * self.ttl
        for lease in self.held():
            if lease.confirmed_at < deadline and not lease.unsure:
                lease.unsure = True
                log.warning(
                    "turn %s: its lease was not renewed for %.1fs (the store is unreachable); "
                    "it stops running until the store confirms the lease",
                    lease.turn_id,
                    self._now() - lease.confirmed_at,
                )
                lease.on_unsure()
