"""Each event is encoded once on its way through the transport: the hub reads the kernel's
batches without decoding their events, keeps one copy of each for all its subscribers, and
a subscriber's message is those bytes joined, exactly what ``SubscribeResponse`` would
encode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispatch.shared.errors import Unavailable
from dispatch.transport import fanout as fanout_module
from dispatch.transport.fanout import Batch, frames_of
from dispatch.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, transport_pb2
from tests.stack import TENANT, start_stack
from tests.transport.test_fanout import FakeKernelStream, chatty, send


def events(sizes: list[int], first: int = 1) -> list[common_pb2.AgentEvent]:
    return [
        common_pb2.AgentEvent(
            conversation_id="conv_x", event_seq=first + i, text_delta=common_pb2.TextDelta(text="y" * n)
        )
        for i, n in enumerate(sizes)
    ]


# One byte, and lengths whose varint takes 1, 2 and 3 bytes.
SIZES = [0, 1, 100, 127, 128, 300, 16_383, 16_384, 70_000]


def test_a_kernel_batch_read_as_a_view_is_sent_as_the_subscribe_response_would_encode_it() -> None:
    batch = events(SIZES)
    wire = common_pb2.EventBatch(events=batch, event_seqs=[e.event_seq for e in batch]).SerializeToString()
    frames, seqs = frames_of(common_pb2.EventBatchView.FromString(wire))
    assert seqs == list(range(1, len(SIZES) + 1))
    sent = Batch.of(frames, seqs[-1])
    assert sent.payload == transport_pb2.SubscribeResponse(events=batch).SerializeToString()
    assert sent.events == batch and sent.count == len(batch) and sent.last_seq == len(batch)
    # A decoded batch (a stub that decodes) gives the same frames.
    assert frames_of(common_pb2.EventBatch.FromString(wire)) == (frames, seqs)


def test_a_view_without_its_event_seqs_is_refused() -> None:
    wire = common_pb2.EventBatch(events=events([3, 4])).SerializeToString()
    with pytest.raises(Unavailable, match="event_seqs"):
        frames_of(common_pb2.EventBatchView.FromString(wire))


async def test_a_hundred_subscribers_share_one_copy_of_each_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout_module, "RECENT_EVENTS", 64)
    monkeypatch.setattr(fanout_module, "TRIM_CHUNK", 16)
    kernel = FakeKernelStream()
    hub = fanout_module.Hub(kernel, TENANT, "conv_x", 0, lambda _hub: None)  # type: ignore[arg-type]
    try:
        subs = [hub.attach(0) for _ in range(100)]
        total = 0
        for round_ in range(10):
            await kernel.batches.put(events([10] * 50, first=total + 1))
            total += 50
            while hub.end < total:
                await asyncio.sleep(0)
            # One copy of each event however many subscribers: the hub holds at most what
            # the slowest subscriber is owed plus what it remembers for newcomers.
            assert len(hub.frames) <= 50 + 2 * fanout_module.RECENT_EVENTS
            payloads = set()
            for sub in subs:
                got: list[int] = []
                while len(got) < 50:
                    batch = await asyncio.wait_for(sub.next(window=0), 5)
                    assert batch is not None and batch.resync_after is None
                    got += [e.event_seq for e in batch.events]
                    payloads.add(batch.payload)
                assert got == list(range(round_ * 50 + 1, total + 1))
            assert len(payloads) == 1  # every subscriber was sent the same bytes
        assert hub.base > 0  # it forgot what nobody needs any more
        late = hub.attach(hub.base)
        batch = await asyncio.wait_for(late.next(window=0), 5)
        assert batch is not None and batch.events[0].event_seq == hub.base + 1
    finally:
        hub.close()
        await hub.wait_closed()


async def test_the_kernel_names_each_batch_s_event_seqs(tmp_path: Path) -> None:
    stack = await start_stack(tmp_path, chatty(), transport=True)
    try:
        conv = await stack.conversation()
        sent = await send(stack, conv)
        kernel: kernel_pb2_grpc.KernelAsyncStub = stack.kernel
        stream = kernel.Subscribe(
            kernel_pb2.KernelSubscribeRequest(
                tenant_id=TENANT,
                conversation_id=conv,
                until=common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED,
            )
        )
        seen: list[int] = []
        async for batch in stream:
            assert list(batch.event_seqs) == [e.event_seq for e in batch.events]
            seen += batch.event_seqs
        assert seen == list(range(1, len(seen) + 1)) and len(seen) > 60
        assert sent.turn_id
    finally:
        await stack.stop()


def test_a_stream_handler_may_answer_pre_encoded_bytes() -> None:
    from dispatch.shared.server import _encoded_or

    serialize = _encoded_or(transport_pb2.SubscribeResponse.SerializeToString)
    assert serialize is not None
    message = transport_pb2.SubscribeResponse(events=events([5]))
    assert serialize(message) == message.SerializeToString()
    assert serialize(b"\x0a\x00") == b"\x0a\x00"  # bytes go out as they are
    assert _encoded_or(None) is None
