"""Durability: SIGKILL the store process during a stream of appends, restart it,
and every acknowledged append is there, whole; none is half-written."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import grpc
import pytest

from dispatch.shared.server import GRPC_OPTIONS
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc
from tests.e2e.procs import ServiceProcess

pytestmark = pytest.mark.e2e

TENANT = "t-durable"
WRITERS = 4
BATCH = 5
KILL_AFTER_ACKS = 40
_TEXT = re.compile(r"^w(\d+)b(\d+)m(\d+)$")


def _batch(writer: int, batch: int) -> list[common_pb2.Message]:
    return [
        common_pb2.Message(
            role=common_pb2.ROLE_USER,
            chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=f"w{writer}b{batch}m{i}"))],
        )
        for i in range(BATCH)
    ]


async def _append_until_killed(
    address: str, conversation_id: str, proc: ServiceProcess
) -> dict[tuple[int, int], list[int]]:
    """Writers append batches until the store dies; returns the acknowledged batches' seqs."""
    acked: dict[tuple[int, int], list[int]] = {}
    killed = asyncio.Event()
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = store_pb2_grpc.ConversationStoreStub(channel)

        async def writer(w: int) -> None:
            for b in range(10_000):
                try:
                    resp = await stub.Append(
                        store_pb2.AppendRequest(
                            tenant_id=TENANT, conversation_id=conversation_id, messages=_batch(w, b)
                        ),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError:
                    return  # the store is gone: this batch was never acknowledged
                acked[(w, b)] = [m.seq for m in resp.messages]
                if len(acked) >= KILL_AFTER_ACKS and not killed.is_set():
                    killed.set()
                    # Mid-stream: the other writers have appends in flight right now.
                    os.kill(proc.proc.pid, signal.SIGKILL)

        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    assert killed.is_set()
    return acked


async def _create_conversation(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = store_pb2_grpc.ConversationStoreStub(channel)
        conv = await stub.CreateConversation(
            store_pb2.CreateConversationRequest(tenant_id=TENANT), timeout=10
        )
        return conv.id


async def _load(address: str, conversation_id: str) -> list[common_pb2.Message]:
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = store_pb2_grpc.ConversationStoreStub(channel)
        resp = await stub.Load(
            store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conversation_id), timeout=30
        )
        return list(resp.messages)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_mid_append_loses_no_acknowledged_append_and_half_writes_none(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        url = str(request.getfixturevalue("postgres_url"))
    else:
        url = f"sqlite:///{tmp_path / 'durable.db'}"
    args = ["--database-url", url, "--workspace", str(tmp_path)]

    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = ServiceProcess("store", args, tmp_path / "first")
    try:
        address = first.wait_ready()
        conversation_id = asyncio.run(_create_conversation(address))
        acked = asyncio.run(_append_until_killed(address, conversation_id, first))
        assert first.proc.wait(10) == -signal.SIGKILL
    finally:
        first.terminate()

    second = ServiceProcess("store", args, tmp_path / "second")
    try:
        history = asyncio.run(_load(second.wait_ready(), conversation_id))
    finally:
        assert second.terminate() == 0, second.log()

    # seq is gap-free from 1, whatever was lost in flight.
    assert [m.seq for m in history] == list(range(1, len(history) + 1))
    by_seq = {m.seq: m.chunks[0].text.text for m in history}
    # Every acknowledged append is there, with the seqs it was acknowledged with.
    for (w, b), seqs in acked.items():
        assert [by_seq.get(s) for s in seqs] == [f"w{w}b{b}m{i}" for i in range(BATCH)]
    # No append is half-written: each batch present is whole and contiguous.
    batches: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for m in history:
        match = _TEXT.match(m.chunks[0].text.text)
        assert match is not None
        w, b, i = (int(g) for g in match.groups())
        batches.setdefault((w, b), []).append((i, m.seq))
    for key, parts in batches.items():
        indexes = [i for i, _ in parts]
        seqs = [s for _, s in parts]
        assert indexes == list(range(BATCH)), f"batch {key} is half-written: {indexes}"
        assert seqs == list(range(seqs[0], seqs[0] + BATCH)), f"batch {key} is not contiguous"
    assert len(acked) >= KILL_AFTER_ACKS
