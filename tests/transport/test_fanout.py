"""Fan-out: one upstream subscription per conversation feeds every subscriber, in batches;
a slow subscriber is told to resync without holding anyone up; and a subscriber cut off at
any point and resumed from its last event_seq misses nothing and sees nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.transport import fanout as fanout_module
from dispatch.transport.fanout import Fanout
from dispatch.v1 import common_pb2, kernel_pb2, transport_pb2, transport_pb2_grpc
from tests.stack import TENANT, Stack, bearer_auth, start_stack

DELTAS = 60


def chatty(turns: int = 1, pause: float = 0.002, size: int = 0) -> ScriptedProvider:
    """Each turn: a tool call, then DELTAS text deltas (``size`` bytes of padding each) with a
    pause between them."""
    step2: list[dict[str, Any]] = []
    for i in range(DELTAS):
        step2 += [{"type": "sleep", "seconds": pause}, {"type": "text_delta", "text": f"w{i} " + "x" * size}]
    steps = [[{"type": "tool_call", "name": "list_dir", "input": {}}], step2]
    return ScriptedProvider.from_data({"turns": [{"steps": steps}] * turns})


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, chatty(turns=3), transport=True)
    yield s
    await s.stop()


def stalled_subscription(stack: Stack, conv: str) -> Any:
    """A subscription whose reader takes nothing: with HTTP/2's window left at 64 KiB (no
    BDP probing), what it is sent backs up into the transport's queue for it."""
    channel = grpc.aio.insecure_channel(
        stack.address("transport"),
        options=[("grpc.http2.bdp_probe", 0)],
        interceptors=bearer_auth(stack.api_key),
    )
    stack.channels.append(channel)
    return transport_pb2_grpc.DispatchStub(channel).Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv)
    )


async def send(stack: Stack, conv: str, text: str = "go") -> transport_pb2.SendResponse:
    return await stack.transport.Send(transport_pb2.SendRequest(conversation_id=conv, text=text))


async def read_until_sealed(
    stream: AsyncIterable[Any], turn_id: str, *, pause: float = 0.0
) -> tuple[list[common_pb2.AgentEvent], int | None]:
    """Events until turn_sealed of ``turn_id``, or until a resync (its after_event_seq)."""
    events: list[common_pb2.AgentEvent] = []
    async for response in stream:
        if response.HasField("resync"):
            return events, response.resync.after_event_seq
        events.extend(response.events)
        if any(e.HasField("turn_sealed") and e.turn_id == turn_id for e in response.events):
            return events, None
        if pause:
            await asyncio.sleep(pause)
    return events, None


async def test_subscribers_share_one_upstream_and_see_the_same_events(stack: Stack) -> None:
    fan = Fanout(stack.kernel)
    conv = await stack.conversation()
    try:
        streams = [fan.subscribe(TENANT, conv, 0) for _ in range(3)]
        sent = await stack.kernel.StartTurn(
            kernel_pb2.StartTurnRequest(
                tenant_id=TENANT,
                conversation_id=conv,
                chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text="go"))],
            )
        )
        results = await asyncio.gather(*(collect_batches(s, sent.turn_id) for s in streams))
        assert len(fan.hubs) == 1  # one upstream subscription for the conversation
        seqs = [[e.event_seq for e in events] for events, _ in results]
        assert seqs[0] == seqs[1] == seqs[2]
        assert seqs[0] == list(range(1, len(seqs[0]) + 1))
        # Batched: fewer messages than events.
        assert all(batches < len(events) for events, batches in results)
    finally:
        await fan.close()


async def collect_batches(
    stream: AsyncIterator[fanout_module.Batch], turn_id: str
) -> tuple[list[common_pb2.AgentEvent], int]:
    events: list[common_pb2.AgentEvent] = []
    batches = 0
    async for batch in stream:
        batches += 1
        events.extend(batch.events)
        if any(e.HasField("turn_sealed") and e.turn_id == turn_id for e in batch.events):
            await stream.aclose()  # type: ignore[attr-defined]
            break
    return events, batches


async def test_a_slow_subscriber_is_told_to_resync_and_the_others_do_not_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout_module, "SUBSCRIBER_QUEUE", 16)
    stack = await start_stack(tmp_path, chatty(size=4096), transport=True)
    try:
        await _slow_and_fast(stack)
    finally:
        await stack.stop()


async def _slow_and_fast(stack: Stack) -> None:
    conv = await stack.conversation()
    api = stack.transport
    # The 240 KiB of this turn back up into the transport's queue for a reader taking nothing.
    slow_stream = stalled_subscription(stack, conv)
    fast_streams = [api.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv)) for _ in range(3)]
    # Let the streams attach before the turn starts.
    await asyncio.sleep(0.2)
    sent = await send(stack, conv)
    # The fast ones finish the whole turn while the slow one has not read a thing.
    fast = await asyncio.wait_for(
        asyncio.gather(*(read_until_sealed(s, sent.turn_id) for s in fast_streams)), 30
    )
    full = [e.event_seq for e in fast[0][0]]
    assert all([e.event_seq for e in events] == full and resync is None for events, resync in fast)
    slow_events, resync = await asyncio.wait_for(read_until_sealed(slow_stream, sent.turn_id), 30)
    assert resync is not None and slow_events and resync == slow_events[-1].event_seq
    # It resumes from where it was told and ends up with exactly the same events.
    rest, again = await read_until_sealed(
        api.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv, after_event_seq=resync)),
        sent.turn_id,
    )
    assert again is None
    assert [e.event_seq for e in slow_events + rest] == full


BURST = 30_000


async def test_a_burst_resyncs_no_subscriber_that_keeps_up(tmp_path: Path) -> None:
    """One step emits BURST events at once: several times what a subscriber's queue holds
    (SUBSCRIBER_QUEUE) and what the kernel buffers for the hub. Readers that read as fast
    as they can get every event; only one that reads nothing is resynced."""
    provider = ScriptedProvider.from_data({"steps": [[{"type": "text_delta", "text": "x"}] * BURST]})
    stack = await start_stack(tmp_path, provider, transport=True)
    try:
        conv = await stack.conversation()
        api = stack.transport
        stalled = stalled_subscription(stack, conv)
        readers = [api.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv)) for _ in range(3)]
        await asyncio.sleep(0.2)  # attached before the turn starts
        sent = await send(stack, conv)
        results = await asyncio.wait_for(
            asyncio.gather(*(read_until_sealed(r, sent.turn_id) for r in readers)), 50
        )
        for events, resync in results:
            assert resync is None
            assert [e.event_seq for e in events] == list(range(1, len(events) + 1))
            assert sum(e.HasField("text_delta") for e in events) == BURST
        # The one that read nothing while the burst went by fell behind by its bound.
        _, resync = await asyncio.wait_for(read_until_sealed(stalled, sent.turn_id), 30)
        assert resync is not None
    finally:
        await stack.stop()


async def test_a_late_subscriber_from_far_back_catches_up_then_joins_live(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout_module, "RECENT_EVENTS", 8)  # the hub remembers little
    conv = await stack.conversation()
    api = stack.transport
    first = await send(stack, conv)
    full, _ = await read_until_sealed(
        api.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv)), first.turn_id
    )
    # A live subscriber keeps the hub up; a second turn runs; a newcomer asks from 0.
    live = api.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv, after_event_seq=full[-1].event_seq)
    )
    second = await send(stack, conv)
    newcomer, _ = await read_until_sealed(
        api.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv)), second.turn_id
    )
    tail, _ = await read_until_sealed(live, second.turn_id)
    seqs = [e.event_seq for e in newcomer]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e.event_seq for e in full + tail] == seqs


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6))
def test_cutting_the_connection_anywhere_and_resuming_loses_and_repeats_nothing(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[int]
) -> None:
    asyncio.run(_cut_and_resume(tmp_path_factory.mktemp("cut"), cuts))


async def _cut_and_resume(tmp: Path, cuts: list[int]) -> None:
    stack = await start_stack(tmp, chatty(turns=2), transport=True)
    try:
        api = stack.transport
        conv = await stack.conversation()
        reference = api.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv))
        await asyncio.sleep(0.05)
        first = await send(stack, conv, "one")
        joined: list[common_pb2.AgentEvent] = []
        cursor = 0
        plan = list(cuts)
        second_sent: transport_pb2.SendResponse | None = None
        while True:
            stream = api.Subscribe(
                transport_pb2.SubscribeRequest(conversation_id=conv, after_event_seq=cursor)
            )
            budget = plan.pop(0) if plan else None
            taken = 0
            done = False
            async for response in stream:
                for event in response.events:
                    joined.append(event)
                    cursor = event.event_seq
                    taken += 1
                    if (
                        event.HasField("turn_sealed")
                        and event.turn_id == first.turn_id
                        and second_sent is None
                    ):
                        second_sent = await send(stack, conv, "two")
                    if (
                        second_sent is not None
                        and event.HasField("turn_sealed")
                        and event.turn_id == second_sent.turn_id
                    ):
                        done = True
                if done or (budget is not None and taken >= budget):
                    stream.cancel()  # cut: mid-batch events beyond the cursor are simply not seen
                    break
            if done:
                break
        assert second_sent is not None
        uninterrupted, _ = await read_until_sealed(reference, second_sent.turn_id)
        assert [e.event_seq for e in joined] == [e.event_seq for e in uninterrupted]
        assert joined == uninterrupted
    finally:
        await stack.stop()


class FakeKernelStream:
    """A kernel Subscribe call fed by the test: batches put on ``batches`` arrive in order."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[list[common_pb2.AgentEvent]] = asyncio.Queue()

    def Subscribe(self, request: kernel_pb2.KernelSubscribeRequest) -> FakeKernelStream:
        return self

    def __aiter__(self) -> FakeKernelStream:
        return self

    async def __anext__(self) -> common_pb2.EventBatch:
        return common_pb2.EventBatch(events=await self.batches.get())

    def cancel(self) -> bool:
        return True


def deltas(first: int, count: int) -> list[common_pb2.AgentEvent]:
    return [
        common_pb2.AgentEvent(event_seq=seq, text_delta=common_pb2.TextDelta(text="x"))
        for seq in range(first, first + count)
    ]


async def test_a_hub_held_back_by_a_stalled_subscriber_serves_a_newcomer() -> None:
    kernel = FakeKernelStream()
    hub = fanout_module.Hub(kernel, TENANT, "conv_x", 0, lambda _hub: None)  # type: ignore[arg-type]
    try:
        stalled = hub.attach(0)  # never reads
        batch = fanout_module.LOW_WATER + 10
        await kernel.batches.put(deltas(1, batch))
        while len(stalled.queue) < batch:
            await asyncio.sleep(0)
        # The hub now waits for room: its only subscriber is behind. A newcomer at the live
        # edge has room; the hub must read on for it.
        newcomer = hub.attach(batch)
        await kernel.batches.put(deltas(batch + 1, 3))
        got = await asyncio.wait_for(newcomer.next(window=0), 5)
        assert got is not None and [e.event_seq for e in got.events] == [batch + 1, batch + 2, batch + 3]
    finally:
        hub.close()
        await hub.wait_closed()
