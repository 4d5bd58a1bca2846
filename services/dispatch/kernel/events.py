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

from dispatch.shared.errors import ResourceExhausted
from dispatch.shared.timeutil import now_ts
from dispatch.v1 import common_pb2

# Events a subscriber may fall behind by before it is told to resubscribe.
SUBSCRIBER_BUFFER = 10_000
# Largest batch one stream message carries.
MAX_BATCH = 256


class Subscription:
    """One subscriber's bounded buffer of live events."""

    def __init__(self, limit: int = SUBSCRIBER_BUFFER):
        self._events: list[common_pb2.AgentEvent] = []
        self._wake = asyncio.Event()
        self._limit = limit
        self.overflowed = False
        self.closed = False

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

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next_batch(self) -> list[common_pb2.AgentEvent] | None:
        """The events queued so far (at least one), or None once closed or overflowed."""
        while not self._events:
            if self.closed or self.overflowed:
                return None
            self._wake.clear()
            await self._wake.wait()
        batch = self._events[:MAX_BATCH]
        del self._events[:MAX_BATCH]
        return batch


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

    def subscribe(self) -> tuple[Subscription, Snapshot]:
        """Register for live events and take, at the same instant, what came before."""
        sub = Subscription()
        self._subscribers.add(sub)
        return sub, Snapshot(self.persisted_seq, list(self.unpersisted))

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def close_subscribers(self) -> None:
        for sub in list(self._subscribers):
            sub.close()


LoadPersisted = Callable[[int, int], Awaitable[list[common_pb2.AgentEvent]]]


async def replay_and_follow(
    log: ConversationLog, after_event_seq: int, load_persisted: LoadPersisted, page: int = 1000
) -> AsyncIterator[list[common_pb2.AgentEvent]]:
    """Batches of every event after ``after_event_seq``: persisted, then in memory, then live.

    ``load_persisted(after, limit)`` reads persisted events from the store.
    """
    sub, snap = log.subscribe()
    cursor = after_event_seq
    try:
        while cursor < snap.persisted_seq:
            events = await load_persisted(cursor, page)
            events = [e for e in events if e.event_seq > cursor]
            if not events:
                break
            cursor = events[-1].event_seq
            for i in range(0, len(events), MAX_BATCH):
                yield events[i : i + MAX_BATCH]
        fresh = [e for e in snap.unpersisted if e.event_seq > cursor]
        for i in range(0, len(fresh), MAX_BATCH):
            yield fresh[i : i + MAX_BATCH]
        if fresh:
            cursor = fresh[-1].event_seq
        while True:
            batch = await sub.next_batch()
            if batch is None:
                if sub.overflowed:
                    raise ResourceExhausted(
                        f"subscriber fell more than {SUBSCRIBER_BUFFER} events behind; "
                        f"subscribe again with after_event_seq={cursor}"
                    )
                return
            batch = [e for e in batch if e.event_seq > cursor]
            if batch:
                cursor = batch[-1].event_seq
                yield batch
    finally:
        log.unsubscribe(sub)
