"""The per-conversation event log: event_seq, fan-out, and resume from
persisted + in-memory + live events exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from dispatch.kernel.agents import build_agents
from dispatch.kernel.events import ConversationLog, Subscription, replay_and_follow
from dispatch.kernel.kernel import Kernel
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.kernel.turn import TurnDeps
from dispatch.shared.config import KernelConfig
from dispatch.shared.errors import ResourceExhausted, Unavailable
from dispatch.v1 import common_pb2, exec_pb2_grpc, store_pb2
from tests.stack import TENANT, start_stack


class FakeStore:
    """Persisted events, as the store would return them."""

    def __init__(self) -> None:
        self.events: list[common_pb2.AgentEvent] = []
        self.loads = 0

    async def load(self, after: int, limit: int) -> list[common_pb2.AgentEvent]:
        self.loads += 1
        return [e for e in self.events if e.event_seq > after][:limit]

    def persist(self, log: ConversationLog) -> None:
        self.events.extend(log.unpersisted)
        log.mark_persisted(log.unpersisted[-1].event_seq)


def emit_text(log: ConversationLog, n: int) -> None:
    for i in range(n):
        log.emit("turn_1", "turn_1#0", text_delta=common_pb2.TextDelta(text=str(i)))


async def take(stream: object, count: int) -> list[int]:
    seqs: list[int] = []
    async for batch in stream:  # type: ignore[attr-defined]
        seqs.extend(e.event_seq for e in batch)
        if len(seqs) >= count:
            break
    return seqs


def test_emit_stamps_the_envelope() -> None:
    log = ConversationLog("t", "conv_1", last_event_seq=41)
    event = log.emit("turn_1", "turn_1#0", text_delta=common_pb2.TextDelta(text="x"))
    assert (event.conversation_id, event.turn_id, event.event_seq, event.step_id) == (
        "conv_1",
        "turn_1",
        42,
        "turn_1#0",
    )
    assert event.time.seconds > 0
    assert event.WhichOneof("kind") == "text_delta"


@pytest.mark.parametrize("after", [0, 3, 5, 7, 9, 12])
async def test_resume_joins_persisted_memory_and_live_exactly_once(after: int) -> None:
    store = FakeStore()
    log = ConversationLog("t", "c", 0)
    emit_text(log, 5)
    store.persist(log)  # 1..5 in the store
    emit_text(log, 4)  # 6..9 in memory only
    stream = replay_and_follow(log, after, store.load, page=2)
    task = asyncio.create_task(take(stream, 13 - after))
    await asyncio.sleep(0)
    emit_text(log, 4)  # 10..13 live
    assert await asyncio.wait_for(task, 5) == list(range(after + 1, 14))


async def test_events_persisted_while_a_subscriber_replays_are_not_repeated() -> None:
    store = FakeStore()
    log = ConversationLog("t", "c", 0)
    emit_text(log, 3)
    stream = replay_and_follow(log, 0, store.load)
    first = await anext(stream)  # the in-memory snapshot 1..3
    store.persist(log)
    emit_text(log, 2)
    second = await anext(stream)
    assert [e.event_seq for e in first + second] == [1, 2, 3, 4, 5]


async def test_two_subscribers_see_the_same_events() -> None:
    store = FakeStore()
    log = ConversationLog("t", "c", 0)
    a = asyncio.create_task(take(replay_and_follow(log, 0, store.load), 6))
    b = asyncio.create_task(take(replay_and_follow(log, 0, store.load), 6))
    await asyncio.sleep(0)
    emit_text(log, 6)
    assert await asyncio.wait_for(a, 5) == await asyncio.wait_for(b, 5) == [1, 2, 3, 4, 5, 6]


async def test_a_slow_subscriber_overflows_without_blocking_the_log() -> None:
    sub = Subscription(limit=3)
    for i in range(5):
        sub.push(common_pb2.AgentEvent(event_seq=i + 1))
    assert sub.overflowed
    assert await sub.next_batch() is None


async def test_overflow_tells_the_subscriber_where_to_resume() -> None:
    log = ConversationLog("t", "c", 0)
    store = FakeStore()
    stream = replay_and_follow(log, 0, store.load)
    emit_text(log, 1)
    assert [e.event_seq for e in await anext(stream)] == [1]
    sub = next(iter(log._subscribers))
    sub._limit = 2
    emit_text(log, 5)
    with pytest.raises(ResourceExhausted, match="after_event_seq=1"):
        await anext(stream)
    assert not log._subscribers  # unsubscribed on the way out


async def test_closing_ends_live_streams() -> None:
    log = ConversationLog("t", "c", 0)
    stream = replay_and_follow(log, 0, FakeStore().load)
    task = asyncio.create_task(take(stream, 1))
    await asyncio.sleep(0)
    log.close_subscribers()
    assert await asyncio.wait_for(task, 5) == []


async def test_shutting_down_tells_live_streams_where_to_resume() -> None:
    log = ConversationLog("t", "c", 0)
    stream = replay_and_follow(log, 0, FakeStore().load)
    emit_text(log, 2)
    assert [e.event_seq for e in await anext(stream)] == [1, 2]
    log.close_subscribers(shutting_down=True)
    with pytest.raises(Unavailable, match="after_event_seq=2"):
        await anext(stream)


async def _drain(stream: object) -> list[int]:
    return await asyncio.wait_for(take(stream, 10**9), 5)


@pytest.mark.parametrize("persisted", [0, 3, 6])
async def test_caught_up_ends_at_the_live_edge_of_the_moment(persisted: int) -> None:
    store = FakeStore()
    log = ConversationLog("t", "c", 0)
    emit_text(log, 6)
    if persisted:
        store.events.extend(log.unpersisted[:persisted])
        log.mark_persisted(persisted)
    stream = replay_and_follow(log, 1, store.load, page=2, until=common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP)
    first = await anext(stream)
    emit_text(log, 3)  # after the subscription began: not part of it
    rest = await _drain(stream)
    assert [e.event_seq for e in first] + rest == [2, 3, 4, 5, 6]


def _seal(log: ConversationLog, turn_id: str) -> None:
    log.emit(turn_id, turn_sealed=common_pb2.TurnSealed(state=common_pb2.TURN_STATE_COMPLETED))


async def test_turn_sealed_ends_after_the_running_turns_seal() -> None:
    log = ConversationLog("t", "c", 0)
    log.emit("turn_0", text_delta=common_pb2.TextDelta(text="old"))
    _seal(log, "turn_0")
    stream = replay_and_follow(
        log, 0, FakeStore().load, until=common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED, running_turn="turn_1"
    )
    task = asyncio.create_task(_drain(stream))
    while not log._subscribers:
        await asyncio.sleep(0)
    log.emit("turn_1", text_delta=common_pb2.TextDelta(text="new"))
    _seal(log, "turn_1")
    log.emit("turn_2", turn_started=common_pb2.TurnStarted())  # the next turn: not wanted
    assert await task == [1, 2, 3, 4]


async def test_turn_sealed_ends_when_its_turn_is_over_without_a_seal() -> None:
    log = ConversationLog("t", "c", 0)
    stream = replay_and_follow(
        log, 0, FakeStore().load, until=common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED, running_turn="turn_1"
    )
    task = asyncio.create_task(_drain(stream))
    while not log._subscribers:
        await asyncio.sleep(0)
    log.emit("turn_1", error=common_pb2.ErrorEvent(message="turn not sealed", fatal=True))
    log.turn_over("turn_1")
    log.emit("turn_2", turn_started=common_pb2.TurnStarted())
    assert await task == [1]


async def test_the_kernel_forgets_an_idle_conversation_and_picks_its_event_seq_up_again(
    tmp_path: Path,
) -> None:
    provider = ScriptedProvider.from_data({"steps": [[{"type": "text_delta", "text": "x"}]]})
    stack = await start_stack(tmp_path, provider)
    # A kernel of the test's own, on the stack's store, to look at what it keeps.
    kernel = Kernel(
        TurnDeps(
            store=stack.store,
            exec=exec_pb2_grpc.ExecStub(stack.channel("exec")),
            agents=build_agents(KernelConfig(), {}, provider)[0],
        )
    )
    try:
        conv = await stack.conversation()
        chunks = [common_pb2.Chunk(text=common_pb2.TextChunk(text="hi"))]
        for _ in range(2):
            started = await kernel.start_turn(TENANT, conv, chunks, common_pb2.SEND_POLICY_UNSPECIFIED, "")
            seen = []
            async with contextlib.aclosing(kernel.subscribe(TENANT, conv, started.after_event_seq)) as stream:
                async for batch in stream:
                    seen += batch
                    if any(e.HasField("turn_sealed") for e in batch):
                        break
            while kernel._tasks:  # the turn persists its last events, then lets go
                await asyncio.sleep(0.01)
            assert conv not in kernel._logs  # nothing holds it: forgotten
            assert seen[0].event_seq == started.after_event_seq + 1
        # The second turn's events continued the first's: no event_seq was reused.
        events = await stack.store.LoadEvents(
            store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv)
        )
        seqs = [e.event_seq for e in events.events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len({e.turn_id for e in events.events}) == 2
    finally:
        await stack.stop()


# ------------------------------------------------------------------ reservations


async def test_events_past_the_reservation_wait_for_it_and_keep_their_order() -> None:
    log = ConversationLog("t", "c", 0, reserved_event_seq=0)
    log.reserve(2)  # as a lease claim would
    asked: list[int] = []
    log.reserver = asked.append
    stream = replay_and_follow(log, 0, FakeStore().load)
    first = asyncio.ensure_future(anext(stream))
    while not log._subscribers:
        await asyncio.sleep(0)
    emit_text(log, 4)  # 1 and 2 are reserved; 3 and 4 are not yet
    assert [e.event_seq for e in await first] == [1, 2]
    assert asked and asked[-1] >= 4  # numbering near the end asked for more
    assert log.delivered_seq == 2
    log.reserve(10)
    assert [e.event_seq for e in await anext(stream)] == [3, 4]


async def test_an_event_sent_only_once_persisted_holds_back_what_follows() -> None:
    log = ConversationLog("t", "c", 0, reserved_event_seq=0)
    log.reserve(100)
    store = FakeStore()
    stream = replay_and_follow(log, 0, store.load)
    first = asyncio.ensure_future(anext(stream))
    while not log._subscribers:
        await asyncio.sleep(0)
    emit_text(log, 1)
    log.emit("turn_1", after_persist=True, turn_sealed=common_pb2.TurnSealed())
    emit_text(log, 1)  # after it: waits behind it
    assert [e.event_seq for e in await first] == [1]
    assert log.delivered_seq == 1
    store.persist(log)  # 1..3 persisted: the seal may go, and what follows it
    assert [e.event_seq for e in await anext(stream)] == [2, 3]


def test_a_log_loaded_after_a_crash_numbers_past_the_reservation_and_names_what_was_lost() -> None:
    # The store persisted events up to 5 and had reserved up to 40 for a kernel that died.
    log = ConversationLog("t", "c", 5, reserved_event_seq=40)
    assert log.announce_lost() == (6, 40)
    assert log.announce_lost() is None  # announced once
    event = log.emit("turn_2", text_delta=common_pb2.TextDelta(text="x"))
    assert event.event_seq == 41


def test_a_sealed_turn_lowers_the_reservation_so_the_next_load_continues_without_a_gap() -> None:
    log = ConversationLog("t", "c", 0, reserved_event_seq=0)
    log.reserve(10_000)
    emit_text(log, 3)
    log.mark_persisted(3)
    log.sealed(3)  # the store's reservation after the seal: what is persisted
    assert log.reserved == 3
    again = ConversationLog("t", "c", log.persisted_seq, reserved_event_seq=log.reserved)
    assert again.announce_lost() is None and again.last_seq == 3


def test_a_seal_that_starts_the_next_turn_keeps_only_the_reservation_the_store_made_for_it() -> None:
    log = ConversationLog("t", "c", 0, reserved_event_seq=0)
    log.reserve(10_000)
    emit_text(log, 3)
    log.mark_persisted(3)
    # The store lowered the reservation to 3, then reserved up to 50 for the next turn.
    log.sealed(50)
    assert log.reserved == 50
    emit_text(log, 60)  # the next turn's: past 50, they wait for a reservation
    assert log.delivered_seq == 50


def test_a_log_loaded_during_another_kernels_turn_takes_nothing_that_kernel_persisted_as_lost() -> None:
    # Loaded while another kernel's turn ran: its reservation looks lost from here.
    log = ConversationLog("t", "c", last_event_seq=10058, reserved_event_seq=20058)
    assert log.lost == (10059, 20058)
    # That kernel persisted 10059-10066 and sealed (the store lowered the reservation): only
    # numbers past what it persisted may be announced lost, and new ones come after them all.
    log.refresh(10066, 10066)
    assert log.lost == (10067, 20058)
    assert log.announce_lost() == (10067, 20058)
    assert log.last_seq >= 20058
    # A log whose lost range was all persisted since announces nothing.
    other = ConversationLog("t", "c", last_event_seq=5, reserved_event_seq=9)
    other.refresh(12, 12)
    assert other.lost is None
    # Reserved past what is persisted again (a kernel that died mid-turn): that range.
    again = ConversationLog("t", "c", last_event_seq=5, reserved_event_seq=9)
    again.refresh(7, 30)
    assert again.lost == (8, 30)
