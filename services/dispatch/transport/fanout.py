"""Fan-out of a conversation's events to any number of subscribers.

One upstream kernel subscription per conversation (a ``Hub``) serves every
client subscribed to it. The hub keeps the most recent events, so a client
resuming from a recent ``event_seq`` joins it directly; one resuming from
further back first catches up on a stream of its own (the kernel replays the
store), then joins the hub at the point it reached, so the joined stream has
no gap and no repeat.

Each event is encoded once, however many subscribers it goes to: the hub reads
the kernel's batches without decoding their events (``EventBatchView``), keeps
each event as the bytes it has inside a ``SubscribeResponse``, in one buffer
shared by every subscriber, and a subscriber's message is a slice of that
buffer joined into one string. A subscriber is a position in the buffer, so an
event costs the hub the same for one subscriber as for a hundred.

Events are batched for the wire: what a subscriber has pending when it is
ready to send, plus, when that is already more than one event (a burst), what
arrives within ``BATCH_WINDOW`` seconds, up to ``BATCH_MAX`` events per
message. A subscriber that falls more than its bound behind is dropped from the
hub and told to resubscribe from the last ``event_seq`` it was sent (a
``Resync``); the turn and the other subscribers never wait for it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from dispatch.shared.errors import DispatchError, Unavailable, from_rpc_error
from dispatch.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, transport_pb2

if TYPE_CHECKING:
    from dispatch.transport.kernels import Kernels

log = logging.getLogger(__name__)

# Events the hub keeps for subscribers that join or resume behind the live edge.
RECENT_EVENTS = 4096
# Events one subscriber may have queued before it is told to resync.
SUBSCRIBER_QUEUE = 4096
BATCH_MAX = 64
# The hub reads on from the kernel once some subscriber's queue is down to this.
LOW_WATER = 2 * BATCH_MAX
BATCH_WINDOW = 0.001
# The hub forgets events it no longer needs this many at a time (or when it holds twice
# RECENT_EVENTS), not one by one.
TRIM_CHUNK = 256
# How long a hub outlives its last subscriber (a reconnect within it resumes from memory).
LINGER_SECONDS = 10.0
SHUTTING_DOWN = "the server is shutting down"


# A hub whose kernel stream is cut goes on from another kernel (several kernels), trying
# again after RELOCATE_BACKOFF, then twice as long up to a second, until streams have
# failed for this long with no event between; then its subscribers subscribe again.
RELOCATE_FOR = 60.0
RELOCATE_BACKOFF = 0.05
# What a kernel says when the conversation's turn runs on another kernel (not an outage).
MOVED = "runs on another kernel"

# Opens the kernel's Subscribe: a call that yields EventBatchView (or EventBatch) messages.
OpenStream = Callable[[kernel_pb2.KernelSubscribeRequest], Any]


def event_view(channel: grpc.aio.Channel) -> OpenStream:
    """The kernel's ``Subscribe`` on ``channel``, each message decoded as an
    ``EventBatchView``: the same bytes as an ``EventBatch``, its events left encoded."""
    return channel.unary_stream(
        "/dispatch.v1.Kernel/Subscribe",
        request_serializer=kernel_pb2.KernelSubscribeRequest.SerializeToString,
        response_deserializer=common_pb2.EventBatchView.FromString,
    )


def resume_elsewhere(why: str, cursor: int) -> Unavailable:
    """The status that tells a subscriber to subscribe again (to this server or another)."""
    return Unavailable(f"{why}; subscribe again with after_event_seq={cursor}")


def frame(encoded: bytes) -> bytes:
    """An encoded ``AgentEvent`` as one element of ``SubscribeResponse.events`` (field 1,
    length-delimited): such frames joined are a ``SubscribeResponse`` with those events."""
    return _EVENTS_TAG + _varint(len(encoded)) + encoded


_EVENTS_TAG = b"\x0a"  # field 1, wire type 2: `events` in EventBatch and SubscribeResponse


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:  # most events: 128 bytes to 16 KiB
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def frames_of(message: Any) -> tuple[list[bytes], list[int]]:
    """The frames and event_seqs of one kernel message: an ``EventBatchView`` (events left
    encoded) or a decoded ``EventBatch`` (a stub that decodes them, as tests use)."""
    if isinstance(message, common_pb2.EventBatchView):
        if len(message.event_seqs) != len(message.events):
            raise Unavailable("the kernel sent an event batch without its event_seqs")
        return [frame(encoded) for encoded in message.events], list(message.event_seqs)
    events = message.events
    return [frame(e.SerializeToString()) for e in events], [e.event_seq for e in events]


@dataclass(frozen=True)
class Batch:
    """Events for the wire, or (``resync_after`` set) the request to resubscribe from there.

    ``payload`` is the events as a ``SubscribeResponse`` encodes them (the frames joined);
    ``last_seq`` the last one's event_seq."""

    payload: bytes = b""
    count: int = 0
    last_seq: int = 0
    resync_after: int | None = None

    @property
    def events(self) -> list[common_pb2.AgentEvent]:
        """The events, decoded (the transport sends ``payload`` as it is)."""
        return list(transport_pb2.SubscribeResponse.FromString(self.payload).events)

    @staticmethod
    def of(frames: list[bytes], last_seq: int) -> Batch:
        return Batch(b"".join(frames), len(frames), last_seq)


class Subscriber:
    """One client's place in a hub: the next event it is owed (a position in the hub's
    buffer, ``pos``), the last event_seq it was given, and how far behind it may fall."""

    def __init__(self, hub: Hub, pos: int, cursor: int, limit: int = SUBSCRIBER_QUEUE):
        self.hub = hub
        self.pos = pos
        self.cursor = cursor
        self.limit = limit
        self.wake = asyncio.Event()
        self.overflowed = False
        self.error: DispatchError | None = None
        self.closed = False
        # Set when the stream must end now, whatever is pending (the transport shuts down,
        # the kernel went away): why, for the UNAVAILABLE that says where to resume.
        self.interrupted = ""

    @property
    def pending(self) -> int:
        """Events published that this subscriber has not been sent."""
        return 0 if self.overflowed else self.hub.end - self.pos

    @property
    def queue(self) -> list[bytes]:
        """The frames this subscriber is owed (a copy: for looking, not for the hot path)."""
        if self.overflowed:
            return []
        first = self.pos - self.hub.start
        return self.hub.frames[first:]

    def end(self, error: DispatchError | None = None) -> None:
        self.error = error
        self.closed = True
        self.wake.set()

    def interrupt(self, why: str) -> None:
        self.interrupted = why
        self.end()

    async def next(self, window: float = BATCH_WINDOW, batch_max: int = BATCH_MAX) -> Batch | None:
        """The next batch: at least one event, or a resync; None when the stream is over.
        Raises the hub's error, if it failed, and ``Unavailable`` when the transport shuts down."""
        while not self.pending or self.interrupted:
            if self.interrupted:
                raise resume_elsewhere(self.interrupted, self.cursor)
            if self.overflowed:
                return Batch(resync_after=self.cursor)
            if self.closed:
                if self.error is not None:
                    raise self.error
                return None
            self.wake.clear()
            await self.wake.wait()
        if 1 < self.pending < batch_max and window > 0:
            # A burst is under way: let it gather into one message. A lone event (a token
            # from a model streaming at human pace) leaves at once.
            await asyncio.sleep(window)
        if self.interrupted:
            raise resume_elsewhere(self.interrupted, self.cursor)
        if self.overflowed:
            return Batch(resync_after=self.cursor)
        hub = self.hub
        first = self.pos - hub.start
        n = min(batch_max, hub.end - self.pos)
        batch = Batch.of(hub.frames[first : first + n], hub.seqs[first + n - 1])
        self.pos += n
        self.cursor = batch.last_seq
        if hub.end - self.pos <= LOW_WATER:
            hub.room.set()
        return batch


def _subscribe_of(kernel: kernel_pb2_grpc.KernelAsyncStub | None) -> OpenStream:
    if kernel is not None:
        return kernel.Subscribe

    def none(request: kernel_pb2.KernelSubscribeRequest) -> Any:
        raise Unavailable("no kernel to subscribe to")

    return none


async def opener(
    default: OpenStream, kernels: Kernels | None, tenant_id: str, conversation_id: str
) -> tuple[OpenStream, str]:
    """How to open the conversation's kernel stream, and the kernel's address ("": the one
    kernel): on the kernel running its turn, when there are several."""
    if kernels is None:
        return default, ""
    route = await kernels.for_conversation(tenant_id, conversation_id)
    return route.open_stream, route.address


class Hub:
    """One upstream subscription to a conversation's events and the subscribers it feeds.

    ``frames``/``seqs`` hold the events from absolute position ``start`` to ``end``: the
    most recent ones (for subscribers that join behind the live edge) and every one some
    subscriber has not been sent yet."""

    def __init__(
        self,
        kernel: kernel_pb2_grpc.KernelAsyncStub | None,
        tenant_id: str,
        conversation_id: str,
        after_event_seq: int,
        on_idle: Callable[[Hub], None],
        *,
        open_stream: OpenStream | None = None,
        kernels: Kernels | None = None,
    ):
        """``open_stream`` opens the kernel's Subscribe (see ``Fanout``); by default the
        stub's. ``kernels``: several kernels, each stream opened on the one running the
        conversation's turn (``open_stream`` is not used then)."""
        self.open_stream: OpenStream = open_stream or _subscribe_of(kernel)
        self.kernels = kernels
        self.tenant_id = tenant_id
        self.conversation_id = conversation_id
        # Invariant: the hub has every event after `base` (in `frames`, then live).
        self.base = after_event_seq
        self.frames: list[bytes] = []
        self.seqs: list[int] = []
        self.start = 0
        self.subscribers: set[Subscriber] = set()
        # Set when the subscriber furthest ahead has room for more (see _wait_for_room).
        self.room = asyncio.Event()
        self.done = False
        self._on_idle = on_idle
        self._linger: asyncio.TimerHandle | None = None
        self._task = asyncio.create_task(self._pump(), name=f"fan-out {conversation_id}")

    @property
    def end(self) -> int:
        return self.start + len(self.frames)

    def can_serve(self, after_event_seq: int) -> bool:
        return not self.done and after_event_seq >= self.base

    def attach(self, after_event_seq: int, limit: int = SUBSCRIBER_QUEUE) -> Subscriber:
        """A subscriber fed from ``after_event_seq`` on; ``can_serve`` must hold. No await
        separates finding its place from joining, so nothing can slip between them."""
        pos = self.start + bisect.bisect_right(self.seqs, after_event_seq)
        # The backlog is owed in full; the limit bounds how far it may fall behind from here.
        sub = Subscriber(self, pos, after_event_seq, limit + (self.end - pos))
        self.subscribers.add(sub)
        self.room.set()  # the newcomer may have room while everyone else is behind
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        return sub

    def detach(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.room.set()  # it may have been the one the hub waited for
        if not self.subscribers and not self.done and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def close(self, error: DispatchError | None = None, *, interrupted: str = "") -> None:
        """End the hub: its subscribers end with ``error`` (None: cleanly), or at once, with
        UNAVAILABLE saying ``interrupted`` and where each resumes."""
        if self.done:
            return
        self.done = True
        self.room.set()
        if self._linger is not None:
            self._linger.cancel()
        if self._task is not asyncio.current_task():
            self._task.cancel()
        for sub in list(self.subscribers):
            if interrupted:
                sub.interrupt(interrupted)
            else:
                sub.end(error)
        self._on_idle(self)

    async def _pump(self) -> None:
        last = self.base
        error: DispatchError | None = None
        interrupted = ""
        loop = asyncio.get_running_loop()
        # Since when streams fail with no event between (None: the last one delivered).
        failing_since: float | None = None
        backoff = RELOCATE_BACKOFF
        while True:
            try:
                open_stream, address = await opener(
                    self.open_stream, self.kernels, self.tenant_id, self.conversation_id
                )
            except DispatchError as exc:
                open_stream, address = None, ""
                failing_since = loop.time() if failing_since is None else failing_since
                if not self._relocating(failing_since):
                    error = exc
                    break
            if open_stream is None:
                await asyncio.sleep(backoff)
                backoff = min(1.0, 2 * backoff)
                continue
            call = open_stream(
                kernel_pb2.KernelSubscribeRequest(
                    tenant_id=self.tenant_id,
                    conversation_id=self.conversation_id,
                    after_event_seq=last,
                    movable=self.kernels is not None,
                )
            )
            try:
                async for message in call:
                    failing_since, backoff = None, RELOCATE_BACKOFF
                    frames, seqs = frames_of(message)
                    if seqs and seqs[0] <= last:  # a repeat (never expected): skip what we have
                        keep = bisect.bisect_right(seqs, last)
                        frames, seqs = frames[keep:], seqs[keep:]
                    if seqs:
                        last = seqs[-1]
                        self._publish(frames, seqs)
                    await self._wait_for_room()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    continue  # the hub fell behind the kernel: pick up where it was
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    failing_since = loop.time() if failing_since is None else failing_since
                    if self._relocating(failing_since):
                        # Several kernels: go on from the one running the turn now (at once
                        # when the kernel says where the turn went).
                        if MOVED not in (exc.details() or ""):
                            assert self.kernels is not None
                            self.kernels.suspect(address)
                            await asyncio.sleep(backoff)
                            backoff = min(1.0, 2 * backoff)
                        continue
                    # The kernel shuts down or went away: each subscriber resumes, later or
                    # elsewhere, from its own place.
                    interrupted = "the conversation's event stream was interrupted (kernel unavailable)"
                else:
                    error = from_rpc_error(exc, "the conversation's event stream broke")
            except DispatchError as exc:
                error = exc
            finally:
                call.cancel()
            break
        self.close(error, interrupted=interrupted)

    def _relocating(self, failing_since: float) -> bool:
        """Whether a cut stream goes on from another kernel: there are several, and streams
        have not been failing for RELOCATE_FOR."""
        if self.kernels is None or not self.kernels.relocates or self.done:
            return False
        return asyncio.get_running_loop().time() - failing_since < RELOCATE_FOR

    async def _wait_for_room(self) -> None:
        """Read on from the kernel only as fast as the fastest subscriber takes events.

        The kernel delivers in big messages and keeps what the hub has not read (in memory,
        then in the store), while each subscriber's stream pays per message; without this,
        a burst fills every subscriber's bound faster than any stream can send it, and
        subscribers that read as fast as they can are resynced with the slow ones. Waiting
        here never slows the turn: the kernel drops a hub that falls too far behind, and the
        hub resumes from its last event. A subscriber slower than the fastest still
        overflows its own bound."""
        while not self.done and self.subscribers:
            self.room.clear()
            end = self.end
            if any(end - sub.pos <= LOW_WATER and not sub.overflowed for sub in self.subscribers):
                return
            await self.room.wait()

    def _publish(self, frames: list[bytes], seqs: list[int]) -> None:
        self.frames += frames
        self.seqs += seqs
        end = self.end
        keep_from = end - RECENT_EVENTS
        overflowed = []
        for sub in self.subscribers:
            if end - sub.pos > sub.limit:
                # Never hold the others (or memory) for it: it resyncs from its cursor.
                sub.overflowed = True
                overflowed.append(sub)
            elif sub.pos < keep_from:
                keep_from = sub.pos
            sub.wake.set()
        for sub in overflowed:
            self.subscribers.discard(sub)  # it resyncs; the hub stops feeding it
        drop = keep_from - self.start
        if drop > 0 and (drop >= TRIM_CHUNK or len(self.frames) > 2 * RECENT_EVENTS):
            self.base = self.seqs[drop - 1]
            del self.frames[:drop]
            del self.seqs[:drop]
            self.start = keep_from


class Fanout:
    """The transport's hubs, one per (tenant, conversation).

    ``kernel`` is the kernel's stub; ``open_stream``, when given, opens the kernel's
    ``Subscribe`` decoding each message as an ``EventBatchView`` (see ``event_view``), so
    no event is decoded on its way through. Without it the stub's ``Subscribe`` serves, and
    each event is encoded again."""

    def __init__(
        self,
        kernel: kernel_pb2_grpc.KernelAsyncStub | None,
        *,
        open_stream: OpenStream | None = None,
        kernels: Kernels | None = None,
        subscriber_queue: int | None = None,
        batch_window: float = BATCH_WINDOW,
        batch_max: int = BATCH_MAX,
    ):
        self.kernel = kernel
        self.open_stream: OpenStream = open_stream or _subscribe_of(kernel)
        self.kernels = kernels
        self.subscriber_queue = SUBSCRIBER_QUEUE if subscriber_queue is None else subscriber_queue
        self.batch_window = batch_window
        self.batch_max = batch_max
        self.hubs: dict[tuple[str, str], Hub] = {}
        # Streams of one subscriber's own (catch-up, bounded), cancelled on close.
        self._own: set[Any] = set()
        self.closing = False

    def _hub(self, tenant_id: str, conversation_id: str, after_event_seq: int) -> Hub:
        key = (tenant_id, conversation_id)
        hub = self.hubs.get(key)
        if hub is None or hub.done:
            hub = Hub(
                self.kernel,
                tenant_id,
                conversation_id,
                after_event_seq,
                self._forget,
                open_stream=self.open_stream,
                kernels=self.kernels,
            )
            self.hubs[key] = hub
        return hub

    def _forget(self, hub: Hub) -> None:
        key = (hub.tenant_id, hub.conversation_id)
        if self.hubs.get(key) is hub:
            del self.hubs[key]

    async def subscribe(
        self,
        tenant_id: str,
        conversation_id: str,
        after_event_seq: int,
        until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
    ) -> AsyncIterator[Batch]:
        """Every event after ``after_event_seq``, in batches, ending with a resync batch if
        the subscriber falls behind, or where ``until`` says. Raises ``DispatchError`` if the
        conversation's stream fails, ``Unavailable`` when the transport shuts down."""
        if self.closing:
            raise resume_elsewhere(SHUTTING_DOWN, after_event_seq)
        if until not in (common_pb2.SUBSCRIBE_UNTIL_UNSPECIFIED, common_pb2.SUBSCRIBE_UNTIL_FOLLOW):
            # A bounded stream is short and ends on its own: the kernel, which knows which
            # turn runs and where the live edge is, ends it; no hub is shared for it.
            async for caught in self._catch_up(tenant_id, conversation_id, after_event_seq, until):
                yield caught
            return
        cursor = after_event_seq
        hub = self._hub(tenant_id, conversation_id, cursor)
        if not hub.can_serve(cursor):
            # Behind the hub's memory: catch up on a stream of our own, then join.
            async for caught in self._catch_up(tenant_id, conversation_id, cursor):
                cursor = caught.last_seq
                yield caught
                hub = self._hub(tenant_id, conversation_id, cursor)
                if hub.can_serve(cursor):
                    break
            else:
                return  # the kernel ended the stream (it is shutting down)
        sub = hub.attach(cursor, self.subscriber_queue)
        try:
            while True:
                live = await sub.next(self.batch_window, self.batch_max)
                if live is None:
                    return
                yield live
                if live.resync_after is not None:
                    return
        finally:
            hub.detach(sub)

    async def _catch_up(
        self,
        tenant_id: str,
        conversation_id: str,
        after_event_seq: int,
        until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
    ) -> AsyncIterator[Batch]:
        """A stream of the subscriber's own, straight from the kernel."""
        cursor = after_event_seq
        open_stream, _ = await opener(self.open_stream, self.kernels, tenant_id, conversation_id)
        call = open_stream(
            kernel_pb2.KernelSubscribeRequest(
                tenant_id=tenant_id,
                conversation_id=conversation_id,
                after_event_seq=after_event_seq,
                until=until,
            )
        )
        self._own.add(call)
        try:
            async for message in call:
                frames, seqs = frames_of(message)
                for i in range(0, len(frames), self.batch_max):
                    chunk = frames[i : i + self.batch_max]
                    yield Batch.of(chunk, seqs[i + len(chunk) - 1])
                if seqs:
                    cursor = seqs[-1]
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the conversation's event stream broke") from None
        except asyncio.CancelledError:
            if self.closing and call.cancelled():
                raise resume_elsewhere(SHUTTING_DOWN, cursor) from None
            raise
        finally:
            self._own.discard(call)
            call.cancel()
        if self.closing:
            raise resume_elsewhere(SHUTTING_DOWN, cursor)

    async def close(self) -> None:
        """End every subscription at once with UNAVAILABLE (subscribe again, to another
        transport) and wait for the upstream calls to end."""
        self.closing = True
        hubs = list(self.hubs.values())
        for hub in hubs:
            hub.close(interrupted=SHUTTING_DOWN)
        for call in list(self._own):
            call.cancel()
        await asyncio.gather(*(hub.wait_closed() for hub in hubs), return_exceptions=True)
