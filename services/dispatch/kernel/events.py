"""Per-conversation event logs: event_seq assignment, live fan-out, resume.

Every event a conversation produces gets the next ``event_seq``. Events are
held in memory until the store has persisted them (they travel with the next
Append, so the kernel never calls the store per delta); a subscriber that
resumes from ``after_event_seq`` reads the persisted part from the store and
the rest from memory, then follows the live tail — every event exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from dispatch.shared.errors import ResourceExhausted, Unavailable
from dispatch.shared.timeutil import now_ts
from dispatch.v1 import common_pb2

# Events a subscriber may fall behind by before it is told to resubscribe.
SUBSCRIBER_BUFFER = 10_000
# Largest batch one stream message carries.
MAX_BATCH = 256


class Subscription:
    """One subscriber's bounded buffer of live events, and where it ends.

    A bounded subscription (``Until``) ends after ``stop_seq``, known at once
    (caught up) or once its turn is over, or right after ``stop_turn``'s
    ``turn_sealed``.
    """

    def __init__(self, limit: int = SUBSCRIBER_BUFFER):
        self._events: list[common_pb2.AgentEvent] = []
        self._wake = asyncio.Event()
        self._limit = limit
        self.overflowed = False
        self.closed = False
        # Closed because the kernel is shutting down: the subscriber resumes elsewhere.
        self.shutting_down = False
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

    def close(self, *, shutting_down: bool = False) -> None:
        self.closed = True
        self.shutting_down = shutting_down
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


class ConversationLog:
    """The event stream of one conversation as this kernel knows it."""

    def __init__(self, tenant_id: str, conversation_id: str, last_event_seq: int):
        self.tenant_id = tenant_id
        self.conversation_id = conversation_id
        self.last_seq = last_event_seq
        self.persisted_seq = last_event_seq
        # Invariant: exactly the events with seq in (persisted_seq, last_seq].
        self.unpersisted: list[common_pb2.AgentEvent] = []
        # Held across an Append that carries unpersisted events, so two turns
        # of the conversation (one sealing, the next starting) never send the
        # same events twice.
        self.commit_lock = asyncio.Lock()
        self._subscribers: set[Subscription] = set()
        # Users holding this log (a call in progress, a turn's task); the kernel forgets an
        # idle log, and a later caller reads the conversation's last_event_seq afresh.
        self.pins = 0

    @property
    def idle(self) -> bool:
        """Nobody uses it and the store has every event: it can be dropped and rebuilt."""
        return self.pins == 0 and not self._subscribers and not self.unpersisted

    def emit(self, turn_id: str, step_id: str = "", **kind: object) -> common_pb2.AgentEvent:
        """Stamp an event with the envelope and the next event_seq, and fan it out."""
        self.last_seq += 1
        event = common_pb2.AgentEvent(
            conversation_id=self.conversation_id,
            turn_id=turn_id,
            event_seq=self.last_seq,
            step_id=step_id,
            time=now_ts(),
            **kind,  # type: ignore[arg-type]
        )
        self.unpersisted.append(event)
        for sub in self._subscribers:
            sub.push(event)
        return event

    def mark_persisted(self, upto_seq: int) -> None:
        drop = 0
        while drop < len(self.unpersisted) and self.unpersisted[drop].event_seq <= upto_seq:
            drop += 1
        del self.unpersisted[:drop]
        self.persisted_seq = max(self.persisted_seq, upto_seq)

    def subscribe(
        self,
        until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
        running_turn: str = "",
    ) -> tuple[Subscription, Snapshot]:
        """Register for live events and take, at the same instant, what came before.
        ``until`` bounds the subscription: caught up with the events so far, or (with
        ``running_turn``, the turn running now) that turn's seal; without a running turn,
        TURN_SEALED is caught up too."""
        sub = Subscription()
        if until == common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP or (
            until == common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED and not running_turn
        ):
            sub.stop_seq = self.last_seq
        elif until == common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED:
            sub.stop_turn = running_turn
        self._subscribers.add(sub)
        return sub, Snapshot(self.persisted_seq, list(self.unpersisted))

    def turn_over(self, turn_id: str) -> None:
        """``turn_id`` emits nothing more (sealed or not): subscriptions waiting for its seal
        end after what has been emitted so far."""
        for sub in self._subscribers:
            if sub.stop_turn == turn_id:
                sub.stop_at(self.last_seq)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def close_subscribers(self, *, shutting_down: bool = False) -> None:
        for sub in list(self._subscribers):
            sub.close(shutting_down=shutting_down)


LoadPersisted = Callable[[int, int], Awaitable[list[common_pb2.AgentEvent]]]


async def replay_and_follow(
    log: ConversationLog,
    after_event_seq: int,
    load_persisted: LoadPersisted,
    page: int = 1000,
    *,
    until: common_pb2.SubscribeUntil.ValueType = common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
    running_turn: str = "",
) -> AsyncIterator[list[common_pb2.AgentEvent]]:
    """Batches of every event after ``after_event_seq``: persisted, then in memory, then live,
    until the end ``until`` sets (see ``ConversationLog.subscribe``), if any.

    ``load_persisted(after, limit)`` reads persisted events from the store. Raises
    ``Unavailable`` when the kernel shuts down under a live subscription (resume elsewhere)
    and ``ResourceExhausted`` when the subscriber fell too far behind.
    """
    sub, snap = log.subscribe(until, running_turn)
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
