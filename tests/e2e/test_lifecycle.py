"""Each service is its own process: on SIGTERM it turns NOT_SERVING, drains
in-flight work within the grace period, and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from dispatch.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, store_pb2, store_pb2_grpc
from tests.e2e.procs import ServiceProcess, health_status

pytestmark = pytest.mark.e2e

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", ["store", "exec"])
def test_an_idle_service_exits_0_on_sigterm(tmp_path: Path, service: str) -> None:
    args = ["--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"] if service == "store" else []
    proc = ServiceProcess(service, args, tmp_path)
    address = proc.wait_ready()
    assert health_status(address) == SERVING
    assert proc.terminate() == 0, proc.log()


def test_kernel_drains_a_running_turn_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "slow.json"
    script.write_text(
        json.dumps(
            {
                "steps": [
                    [
                        {"type": "text_delta", "text": "working"},
                        {"type": "sleep", "seconds": 1.5},
                        {"type": "text_delta", "text": " done"},
                    ]
                ]
            }
        )
    )
    store = ServiceProcess("store", ["--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"], tmp_path)
    exec_ = ServiceProcess("exec", [], tmp_path)
    kernel = None
    try:
        store_address, exec_address = store.wait_ready(), exec_.wait_ready()
        kernel = ServiceProcess(
            "kernel",
            [
                "--store",
                store_address,
                "--exec",
                exec_address,
                "--provider",
                "scripted",
                "--script",
                str(script),
            ],
            tmp_path,
        )
        kernel_address = kernel.wait_ready()
        events, statuses = asyncio.run(_turn_across_sigterm(kernel, store_address, kernel_address))
        assert NOT_SERVING in statuses, "health never reported NOT_SERVING while draining"
        assert kernel.proc.wait(20) == 0, kernel.log()
        text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
        assert text == "working done", "the in-flight turn was cut instead of drained"
        assert events[-1].turn_sealed.state == common_pb2.TURN_STATE_COMPLETED
    finally:
        for proc in (kernel, exec_, store):
            if proc is not None:
                proc.terminate()


async def _turn_across_sigterm(
    kernel: ServiceProcess, store_address: str, kernel_address: str
) -> tuple[list[common_pb2.AgentEvent], list[int]]:
    async with (
        grpc.aio.insecure_channel(store_address) as store_channel,
        grpc.aio.insecure_channel(kernel_address) as kernel_channel,
    ):
        store = store_pb2_grpc.ConversationStoreStub(store_channel)
        conv = await store.CreateConversation(store_pb2.CreateConversationRequest(tenant_id="local"))
        stub = kernel_pb2_grpc.KernelStub(kernel_channel)
        started = await stub.StartTurn(
            kernel_pb2.StartTurnRequest(
                tenant_id="local",
                conversation_id=conv.id,
                chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text="go"))],
            )
        )
        events: list[common_pb2.AgentEvent] = []
        statuses: list[int] = []
        stream = stub.Subscribe(
            kernel_pb2.KernelSubscribeRequest(
                tenant_id="local", conversation_id=conv.id, after_event_seq=started.after_event_seq
            )
        )
        async for batch in stream:
            events.extend(batch.events)
            if any(e.HasField("text_delta") for e in events) and not statuses:
                kernel.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and NOT_SERVING not in statuses:
                    statuses.append(await asyncio.to_thread(health_status, kernel_address))
            if events[-1].HasField("turn_sealed"):
                break
        return events, statuses
