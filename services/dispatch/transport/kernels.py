"""Which kernel a transport sends a conversation's calls to.

One kernel (``--kernel host:port``): always that one. Several (``--kernel store``): the
kernels advertise themselves through the store (heartbeat rows, renewed with their
leases), and a conversation's calls go to the kernel that holds the lease of its unended
turn, where its live events are; a conversation with none goes to its home kernel,
chosen by rendezvous hashing over the live kernels with a free run slot, so every
transport picks the same one and a new turn starts where its subscribers already listen.
A kernel a call could not reach is passed over for a while (``suspect``), or until a new
process advertises itself at its address (it was restarted); when every live kernel is
passed over, they are all tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from dispatch.shared.errors import Unavailable
from dispatch.shared.server import GRPC_OPTIONS
from dispatch.store.backend import UNENDED_STATES
from dispatch.transport.fanout import OpenStream, event_view
from dispatch.v1 import common_pb2, kernel_pb2_grpc, store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)

# The value of --kernel that finds the kernels through the store.
DISCOVER = "store"
# How stale the list of live kernels may be before a call refreshes it, in seconds.
REFRESH = 1.0
# How long a kernel that could not be reached is passed over, in seconds.
SUSPECT_FOR = 5.0
# A channel to a kernel no longer advertised is closed after this long, in seconds.
FORGET_AFTER = 60.0


@dataclass
class Route:
    """One kernel as a transport calls it."""

    address: str
    stub: kernel_pb2_grpc.KernelAsyncStub
    open_stream: OpenStream
    channel: grpc.aio.Channel | None = None
    last_seen: float = field(default_factory=time.monotonic)


class Kernels:
    """The kernel(s) behind a transport. ``discover``: found through ``store``."""

    def __init__(
        self,
        address: str,
        store: store_pb2_grpc.ConversationStoreAsyncStub,
        rpc_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.discover = address == DISCOVER
        self.store = store
        self.timeout = rpc_timeout
        self._clock = clock
        self._routes: dict[str, Route] = {}
        self._live: list[store_pb2.KernelInfo] = []
        self._fetched_at = -1e18
        self._refreshing: asyncio.Task[None] | None = None
        # Address -> (passed over until, the owners advertised there when it was).
        self._suspects: dict[str, tuple[float, frozenset[str]]] = {}
        self._static: Route | None = None if self.discover else self._route(address)

    @property
    def static(self) -> Route | None:
        """The one kernel, when there is one at a fixed address."""
        return self._static

    @property
    def relocates(self) -> bool:
        """Whether a stream cut by one kernel can go on from another."""
        return self.discover

    def _route(self, address: str) -> Route:
        route = self._routes.get(address)
        if route is None:
            channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            route = Route(address, kernel_pb2_grpc.KernelStub(channel), event_view(channel), channel)
            self._routes[address] = route
        route.last_seen = self._clock()
        return route

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for route in self._routes.values():
            if route.channel is not None:
                await route.channel.close()
        self._routes.clear()

    def suspect(self, address: str) -> None:
        """``address`` could not be reached: pass it over for a while."""
        if self.discover and address:
            owners = frozenset(k.owner for k in self._live if k.address == address)
            self._suspects[address] = (self._clock() + SUSPECT_FOR, owners)
            self._fetched_at = -1e18  # and look again at who is alive

    async def live(self) -> list[store_pb2.KernelInfo]:
        """The live kernels not passed over, oldest first (refreshed at most every REFRESH)."""
        if self._clock() - self._fetched_at > REFRESH:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(self._refresh())
            await asyncio.shield(self._refreshing)
        now = self._clock()
        trusted = [k for k in self._live if not self._suspected(k, now)]
        return trusted or list(self._live)

    def _suspected(self, kernel: store_pb2.KernelInfo, now: float) -> bool:
        """Passed over: its time is not up, and the same process is still there."""
        until, owners = self._suspects.get(kernel.address, (0.0, frozenset()))
        return until > now and kernel.owner in owners

    async def _refresh(self) -> None:
        try:
            resp = await self.store.ListKernels(store_pb2.ListKernelsRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"could not find the kernels through the store: {exc.details()}") from None
        self._live = list(resp.kernels)
        self._fetched_at = self._clock()
        now = self._clock()
        for k in self._live:
            self._route(k.address)
        for address, route in list(self._routes.items()):
            if now - route.last_seen > FORGET_AFTER and route.channel is not None:
                del self._routes[address]
                await route.channel.close()

    async def any(self) -> Route:
        """A kernel for a call any kernel answers (ListModels, ListComputers)."""
        if self._static is not None:
            return self._static
        live = await self.live()
        if not live:
            raise Unavailable("no kernel is running: none has a live heartbeat in the store")
        return self._route(live[0].address)

    async def for_conversation(self, tenant_id: str, conversation_id: str) -> Route:
        """The kernel for the conversation's calls: the one running its unended turn, else
        its home kernel."""
        if self._static is not None:
            return self._static
        live = await self.live()
        if not live:
            raise Unavailable("no kernel is running: none has a live heartbeat in the store")
        by_owner = {k.owner: k for k in live}
        try:
            resp = await self.store.ListTurns(
                store_pb2.ListTurnsRequest(
                    tenant_id=tenant_id, conversation_id=conversation_id, states=UNENDED_STATES
                ),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError:
            resp = common_pb2.ListTurnsResponse()  # the kernel answers for it (NOT_FOUND, ...)
        for turn in resp.turns:
            owner = by_owner.get(turn.lease_owner)
            if owner is not None:
                return self._route(owner.address)
        return self._route(home(conversation_id, live).address)


def home(conversation_id: str, live: Sequence[store_pb2.KernelInfo]) -> store_pb2.KernelInfo:
    """The conversation's home among ``live`` (rendezvous hashing): the same on every
    transport, and moved only when its kernel goes or comes back. Kernels with no free run
    slot are passed over while another has one."""
    free = [k for k in live if not k.run_slots or k.running < k.run_slots] or list(live)

    def weight(k: store_pb2.KernelInfo) -> bytes:
        return hashlib.blake2b(f"{k.owner}\0{conversation_id}".encode(), digest_size=8).digest()

    return max(free, key=weight)
