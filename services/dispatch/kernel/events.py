"""Per-conversation event logs: event_seq assignment, live fan-out, resume.

Every event a conversation produces gets the next ``event_seq``. Events are
held in memory until the store has persisted them (they travel with the next
Append, so the kernel never calls the store per delta); a subscriber that
resumes from ``after_event_seq`` reads the persisted part from the store and
the rest from memory, then follows the live tail — every event exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from dispatch.shared.errors import ResourceExhausted, Unavailable
from dispatch.v1 import common_pb2

# Events a subscriber may fall behind by before it is told to resubscribe.
SUBSCRIBER_BUFFER = 10_000
# Largest batch one stream message carries.
MAX_BATCH = 256
# The longest a hold keeps events from subscribers (ConversationLog.hold): a quick tool's
# run and the step's commit fit inside it; a slow one's start is seen this much later.
HOLD_CAP = 0.005


class Subscription:
    """One subscriber's bounded buffer of live events, and where it ends.

    A bounded subscription (``Until``) ends after ``stop_seq``, known at once
    (caught up) or once its turn is over, or right after ``stop_turn``'s
    ``turn_sealed``.
    """

    def __init__(self, limit: int = SUBSCRIBER_BUFFER, gate: asyncio.Event | None = None):
        """``gate``: the log's; while it is clear, what is queued waits (``ConversationLog.hold``)."""
        self._events: list[common_pb2.AgentEvent] = []
        self._gate = gate
        self._wake = asyncio.Event()
        self._limit = limit
        self.overflowed = False
        self.closed = False
        # Closed because the kernel is shutting down: the subscriber resumes elsewhere.
        self.shutting_down = False
        # Closed because another kernel runs the conversation's turn: resume there. Only a
        # movable subscription (its subscriber follows the turn to its kernel) is.
        self.moved = False
        self.movable = False
        # Nothing after this event_seq is delivered; None: no such bound (yet).
        self.stop_seq: int | None = None
        # The stream ends with this turn's turn_sealed; empty: with no turn's.
        self.stop_turn = ""

    def push(self, event: common_pb2.AgentEvent) -> None:
        if self.overflowed:
            return
        if len(self._events) >= self._limit:
            # Never block the turn for a slow reader: drop it and let it resume.
            self.overflowed = True
            self._events.clear()
        else:
            self._events.append(event)
        self._wake.set()

    def close(self, *, shutting_down: bool = False, moved: bool = False) -> None:
        self.closed = True
        self.shutting_down = shutting_down
        self.moved = moved
        self._wake.set()

    def stop_at(self, seq: int) -> None:
        """End once everything up to ``seq`` is delivered (the turn it waited for is over)."""
        if self.stop_seq is None:
            self.stop_seq = seq
            self._wake.set()

    async def next_batch(self) -> list[common_pb2.AgentEvent] | None:
        """The events queued so far (at least one), or None once closed, overflowed or at
        its end."""
        while not self._events:
            if self.closed or self.overflowed or self.stop_seq is not None:
                return None
            self._wake.clear()
            await self._wake.wait()
        if self._gate is not None and not self._gate.is_set() and not self.closed:
            # What follows at once leaves in the same message. Once: a hold that begins again
            # before this runs does not hold these events a second time.
            await self._gate.wait()
            if not self._events:  # overflowed or closed meanwhile
                return await self.next_batch()
        batch = self._events[:MAX_BATCH]
        del self._events[:MAX_BATCH]
        return batch

    def clip(self, batch: list[common_pb2.AgentEvent]) -> tuple[list[common_pb2.AgentEvent], bool]:
        """``batch`` cut where this subscription ends, and whether it ends there."""
        for i, event in enumerate(batch):
            if self.stop_seq is not None and event.event_seq > self.stop_seq:
                return batch[:i], True
            if self.stop_turn and event.turn_id == self.stop_turn and event.HasField("turn_sealed"):
                return batch[: i + 1], True
        return batch, self.stop_seq is not None and bool(batch) and batch[-1].event_seq >= self.stop_seq


@dataclass
class Snapshot:
    persisted_seq: int
    unpersisted: list[common_pb2.AgentEvent]


# A log without a reservation discipline numbers freely (see ConversationLog).
UNBOUNDED = 2**62
# How many event numbers a turn reserves ahead (see ConversationLog): a kernel that goes
# away loses at most this many numbers to an events_lost announcement.
RESERVE_BLOCK = 10_000


class ConversationLog:
    """The event stream of one conversation as this kernel knows it.

    Numbering is durable ahead of delivery: an event is sent to subscribers only once
    its event_seq is inside the conversation's reservation (``reserved``, raised in the
    store before it is used: the turn's lease claim, then every Append). A kernel that
    takes the conversation over after a crash numbers past the reservation, so a number
    anyone may have seen is never reused; what was reserved but not persisted is
    announced as lost (``lost``). An event emitted with ``after_persist`` is held until
    it is persisted too (``turn_sealed``); delivery is always in event_seq order.
    """

    def __init__(
        self,
        tenant_id: str,
        conversation_id: str,
        last_event_seq: int,
        reserved_event_seq: int | None = None,
    ):
        """``reserved_event_seq``: the conversation's reservation as the store has it; None:
        numbering needs none (a log no other kernel can take over, as in unit tests)."""
        self.tenant_id = tenant_id
        self.conversation_id = conversation_id
        self.persisted_seq = last_event_seq
        unbounded = reserved_event_seq is None
        reserved = last_event_seq if reserved_event_seq is None else reserved_event_seq
        self.reserved = max(reserved, last_event_seq)
        # Numbers past the last persisted event that a kernel may have sent before it went
        # away: announced (events_lost) by the next turn to run, and never used again.
        self.lost: tuple[int, int] | None = (
            (last_event_seq + 1, self.reserved) if self.reserved > last_event_seq else None
        )
        self.last_seq = self.reserved
        if unbounded:
            self.reserved = UNBOUNDED
        # Invariant: exactly the events with seq in (persisted_seq, last_seq].
        self.unpersisted: list[common_pb2.AgentEvent] = []
        # The last event_seq sent to subscribers; the rest of `unpersisted` is held.
        self.delivered_seq = self.last_seq
        # event_seqs that wait for their own persistence before they are sent.
        self._after_persist: set[int] = set()
        # Asked for a larger reservation when numbering nears the end of this one (the
        # running turn sets it: it holds the lease that fences the write).
        self.reserver: Callable[[int], None] | None = None
        # Held across an Append that carries unpersisted events, so two turns
        # of the conversation (one sealing, the next starting) never send the
        # same events twice.
        self.commit_lock = asyncio.Lock()
        self._subscribers: set[Subscription] = set()
        # Clear while delivery is held (see `hold`): subscriptions wait, then take it all.
        self._gate = asyncio.Event()
        self._gate.set()
        self._hold_timer: asyncio.TimerHandle | None = None
        # Users holding this log (a call in progress, a turn's task); the kernel forgets an
        # idle log, and a later caller reads the conversation's last_event_seq afresh.
        self.pins = 0

    @property
    def idle(self) -> bool:
        """Nobody uses it and the store has every event: it can be dropped and rebuilt."""
        return self.pins == 0 and not self._subscribers and not self.unpersisted

    def wanted_reservation(self) -> int:
        """How far the next write should reserve: a block past the numbers used so far."""
        return self.last_seq + RESERVE_BLOCK

    def emit(
        self, turn_id: str, step_id: str = "", *, after_persist: bool = False, **kind: object
    ) -> common_pb2.AgentEvent:
        """Stamp an event with the envelope and the next event_seq, and fan it out once it
        may be sent (inside the reservation; with ``after_persist``, once persisted)."""
        self.last_seq += 1
        ns = time.time_ns()
        event = common_pb2.AgentEvent(
            conversation_id=self.conversation_id,
            turn_id=turn_id,
            event_seq=self.last_seq,
            step_id=step_id,
            # A dict, not a Timestamp: the field is filled in place rather than copied (the
            # hot path of a streaming model: this runs once per token).
            time={"seconds": ns // 1_000_000_000, "nanos": ns % 1_000_000_000},  # type: ignore[arg-type]
            **kind,  # type: ignore[arg-type]
        )
        self.unpersisted.append(event)
        if after_persist:
            self._after_persist.add(event.event_seq)
        if self.delivered_seq == event.event_seq - 1 and self._sendable(event.event_seq):
            self.delivered_seq = event.event_seq
            for sub in self._subscribers:
                sub.push(event)
        if self.reserver is not None and self.last_seq > self.reserved - RESERVE_BLOCK // 2:
            self.reserver(self.wanted_reservation())
        return event

    def hold(self, cap: float | None = None) -> None:
        """Hold delivery to subscribers from now until ``release``, for at most ``cap`` seconds,
        so that what follows at once leaves in the same message: a step's tool_call and
        tool_started, its tool result, its commit and step_completed, one message rather
        than two. Only when events are delivered changes, never which or in what order.
        Holding while held keeps the first deadline."""
        if self._gate.is_set():
            self._gate.clear()
            wait = HOLD_CAP if cap is None else cap
            self._hold_timer = asyncio.get_running_loop().call_later(wait, self.release)

    def release(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._gate.set()

    def _sendable(self, seq: int) -> bool:
        return seq <= self.reserved and (seq not in self._after_persist or seq <= self.persisted_seq)

    def _release(self) -> None:
        """Send the held events that may now be sent, in order."""
        for event in self.unpersisted:
            seq = event.event_seq
            if seq <= self.delivered_seq:
                continue
            if seq != self.delivered_seq + 1 or not self._sendable(seq):
                break
            self.delivered_seq = seq
            for sub in self._subscribers:
                sub.push(event)

    def reserve(self, through: int) -> None:
        """The store holds the reservation through ``through`` (it never lowers it)."""
        if through > self.reserved:
            self.reserved = through
            self._release()

    def mark_persisted(self, upto_seq: int) -> None:
        self.persisted_seq = max(self.persisted_seq, upto_seq)
        # Persisted events are in the store, which never reserves less than it holds.
        self.reserved = max(self.reserved, self.persisted_seq)
        self._release()  # before the persisted events leave `unpersisted`
        drop = 0
        while drop < len(self.unpersisted) and self.unpersisted[drop].event_seq <= upto_seq:
            self._after_persist.discard(self.unpersisted[drop].event_seq)
            drop += 1
        del self.unpersisted[:drop]

    def sealed(self, reserved_event_seq: int) -> None:
        """The turn that numbered events ended (or was handed over): the store lowered the
        reservation to the last persisted event, then raised it to ``reserved_event_seq``
        for the next turn it started, if any. That figure is the reservation now, never
        what this log held before: numbers past it are not reserved any more."""
        if self.reserved != UNBOUNDED:
            self.reserved = max(reserved_event_seq, self.persisted_seq)

    def refresh(self, last_event_seq: int, reserved_event_seq: int) -> None:
        """Take the store's word for the conversation's numbering, before this kernel starts
        or claims a turn of it: another kernel may have run turns of it since this log was
        loaded. Only while this log numbers nothing of its own (``unpersisted`` is empty).
        Subscribers it fed are told to resubscribe: what the other kernel wrote reaches
        them from the store."""
        if self.unpersisted or self.reserved == UNBOUNDED:
            return
        if last_event_seq == self.persisted_seq and reserved_event_seq <= self.reserved:
            return
        moved = last_event_seq != self.persisted_seq
        self.persisted_seq = max(self.persisted_seq, last_event_seq)
        # A range this log took as lost (it was loaded while another kernel's turn ran) is
        # not lost where that kernel has persisted since: only what lies past it still is.
        stale = self.lost if self.lost is not None and self.lost[1] > self.persisted_seq else None
        reserved = max(reserved_event_seq, self.persisted_seq)
        first = self.persisted_seq + 1
        if reserved > self.persisted_seq:
            self.lost = (first, max(reserved, stale[1]) if stale else reserved)
        else:
            self.lost = (max(first, stale[0]), stale[1]) if stale else None
        self.reserved = max(self.reserved, reserved)
        self.last_seq = max(self.last_seq, self.reserved)
        self.delivered_seq = self.last_seq
        if moved:
            self.close_subscribers(shutting_down=True)

    def announce_lost(self) -> tuple[int, int] | None:
        """The range of numbers lost before this log was loaded, once: the next turn to run
        announces it."""
        lost, self.lost = self.lost, None
        return lost

    def subscribe(
        self,
        until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
        running_turn: str = "",
        *,
        movable: bool = False,
    ) -> tuple[Subscription, Snapshot]:
        """Register for live events and take, at the same instant, what came before.
        ``until`` bounds the subscription: caught up with the events so far, or (with
        ``running_turn``, the turn running now) that turn's seal; without a running turn,
        TURN_SEALED is caught up too."""
        sub = Subscription(gate=self._gate)
        sub.movable = movable
        if until == common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP or (
            until == common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED and not running_turn
        ):
            sub.stop_seq = self.last_seq
        elif until == common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED:
            sub.stop_turn = running_turn
        self._subscribers.add(sub)
        sent = [e for e in self.unpersisted if e.event_seq <= self.delivered_seq]
        return sub, Snapshot(self.persisted_seq, sent)

    def turn_over(self, turn_id: str) -> None:
        """``turn_id`` emits nothing more (sealed or not): subscriptions waiting for its seal
        end after what has been emitted so far."""
        for sub in self._subscribers:
            if sub.stop_turn == turn_id:
                sub.stop_at(self.last_seq)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def movable_subscribers(self) -> bool:
        return any(sub.movable for sub in self._subscribers)

    def close_subscribers(self, *, shutting_down: bool = False, moved: bool = False) -> None:
        """End every subscription, telling its subscriber to resume elsewhere when this kernel
        stops (``shutting_down``); ``moved``: only the movable ones, as another kernel runs the
        conversation now."""
        for sub in list(self._subscribers):
            if sub.movable or not moved:
                sub.close(shutting_down=shutting_down, moved=moved)


LoadPersisted = Callable[[int, int], Awaitable[list[common_pb2.AgentEvent]]]


async def replay_and_follow(
    log: ConversationLog,
    after_event_seq: int,
    load_persisted: LoadPersisted,
    page: int = 1000,
    *,
    until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
    running_turn: str = "",
    movable: bool = False,
) -> AsyncGenerator[list[common_pb2.AgentEvent], None]:
    """Batches of every event after ``after_event_seq``: persisted, then in memory, then live,
    until the end ``until`` sets (see ``ConversationLog.subscribe``), if any.

    ``load_persisted(after, limit)`` reads persisted events from the store. Raises
    ``Unavailable`` when the kernel shuts down under a live subscription (resume elsewhere)
    and ``ResourceExhausted`` when the subscriber fell too far behind.
    """
    sub, snap = log.subscribe(until, running_turn, movable=movable)
    cursor = after_event_seq

    def ended() -> bool:
        return sub.stop_seq is not None and cursor >= sub.stop_seq

    try:
        while cursor < snap.persisted_seq and not ended():
            events = await load_persisted(cursor, page)
            events = [e for e in events if e.event_seq > cursor]
            if not events:
                break
            events, last = sub.clip(events)
            if events:
                cursor = events[-1].event_seq
            for i in range(0, len(events), MAX_BATCH):
                yield events[i : i + MAX_BATCH]
            if last:
                return
        fresh, last = sub.clip([e for e in snap.unpersisted if e.event_seq > cursor])
        for i in range(0, len(fresh), MAX_BATCH):
            yield fresh[i : i + MAX_BATCH]
        if fresh:
            cursor = fresh[-1].event_seq
        if last:
            return
        while not ended():
            batch = await sub.next_batch()
            if batch is None:
                if sub.overflowed:
                    raise ResourceExhausted(
                        f"subscriber fell more than {SUBSCRIBER_BUFFER} events behind; "
                        f"subscribe again with after_event_seq={cursor}"
                    )
                if sub.moved:
                    raise Unavailable(
                        "the conversation's turn runs on another kernel; "
                        f"subscribe again with after_event_seq={cursor}"
                    )
                if sub.shutting_down:
                    raise Unavailable(
                        f"the kernel is shutting down; subscribe again with after_event_seq={cursor}"
                    )
                return
            batch, last = sub.clip([e for e in batch if e.event_seq > cursor])
            if batch:
                cursor = batch[-1].event_seq
                yield batch
            if last:
                return
    finally:
        log.unsubscribe(sub)
