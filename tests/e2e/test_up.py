"""End to end through real processes: `dispatchd up` starts the four services,
a scripted two-step turn makes a real list_dir call through exec, the events
stream back through the transport, and the history lands in SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc
from dispatch_client import DispatchClient, DispatchError, types
from tests.e2e.procs import ServiceProcess, Up, alive

pytestmark = pytest.mark.e2e

SCRIPT = {
    "steps": [
        [
            {"type": "tool_call", "name": "list_dir", "input": {"path": "."}},
            {"type": "usage", "input_tokens": 30, "output_tokens": 8},
        ],
        [
            {"type": "text_delta", "text": "The workspace holds "},
            {"type": "text_delta", "text": "notes.txt and src."},
            {"type": "usage", "input_tokens": 60, "output_tokens": 9},
            {"type": "finish", "reason": "stop"},
        ],
    ]
}

ORDER = ["turn_started", "tool_call", "tool_result", "text_delta", "turn_done", "turn_sealed"]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "notes.txt").write_text("remember the milk\n")
    return ws


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(SCRIPT))
    return path


async def run_turn(address: str, text: str, api_key: str) -> tuple[str, list[types.AgentEvent]]:
    async with DispatchClient(address, api_key=api_key) as client:
        conversation = await client.create_conversation()
        sent = await client.send(conversation.id, text)
        events = []
        async for event in client.subscribe(conversation.id, after_event_seq=sent.after_event_seq):
            events.append(event)
            if event.WhichOneof("kind") == "turn_sealed":
                break
        return conversation.id, events


def test_up_runs_a_scripted_two_step_turn_end_to_end(tmp_path: Path, workspace: Path, script: Path) -> None:
    up = Up(tmp_path, "--workspace", str(workspace), "--provider", "scripted", "--script", str(script))
    try:
        up.wait_for("Dispatch is up")
        assert f"Transport (gRPC): {up.address}" in up.output()
        assert "dispatch chat" in up.output()
        assert f"HTTP:      http://{up.http}" in up.output()
        # The HTTP bridge answers with the same key, and refuses without it.
        models = httpx.get(f"http://{up.http}/v1/models", headers={"authorization": f"Bearer {up.api_key()}"})
        assert models.status_code == 200 and models.json()["models"][0]["provider"] == "scripted"
        assert httpx.get(f"http://{up.http}/v1/models").status_code == 401
        services = up.services()
        assert sorted(services) == ["exec", "kernel", "store", "transport"], up.output()

        # First start: a key of the local tenant, readable by this user only; calls need it.
        key_file = up.data / "api_key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert str(key_file) in up.output() and up.api_key() not in up.output()
        with pytest.raises(DispatchError) as refused:
            asyncio.run(run_turn(up.address, "who am I?", "not-a-key"))
        assert refused.value.code.name == "UNAUTHENTICATED"
        conversation_id, events = asyncio.run(run_turn(up.address, "what is here?", up.api_key()))

        kinds = [e.WhichOneof("kind") for e in events]
        assert [k for k in kinds if k in ORDER] == [
            "turn_started",
            "tool_call",
            "tool_result",
            "text_delta",
            "text_delta",
            "turn_done",
            "turn_sealed",
        ]
        seqs = [e.event_seq for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "event_seq must be gap-free here"
        turn_id = events[0].turn_id
        assert all(e.turn_id == turn_id and e.conversation_id == conversation_id for e in events)
        call = next(e for e in events if e.HasField("tool_call"))
        result = next(e for e in events if e.HasField("tool_result"))
        assert call.step_id == result.step_id == f"{turn_id}#0"
        assert (result.tool_result.name, result.tool_result.is_error) == ("list_dir", False)
        assert "notes.txt" in result.tool_result.content and "src/" in result.tool_result.content
        done = next(e for e in events if e.HasField("turn_done")).turn_done
        assert done.finish_reason == types.FINISH_REASON_STOP
        assert (done.steps, done.usage.input_tokens, done.usage.output_tokens, done.context_size) == (
            2,
            90,
            17,
            69,
        )
        sealed = events[-1].turn_sealed
        assert sealed.state == types.TURN_STATE_COMPLETED

        # The CLI renders the same kind of turn as it streams.
        chat = subprocess.run(
            [sys.executable, "-m", "dispatch_client.cli", "--address", up.address, "chat", "and now?"],
            env={**os.environ, "DISPATCH_DATA_DIR": str(up.data)},  # where the CLI finds the key
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert chat.returncode == 0, chat.stderr
        assert "→ list_dir" in chat.stdout
        assert "← list_dir: notes.txt" in chat.stdout
        assert "The workspace holds notes.txt and src." in chat.stdout
        assert "— stop · 2 step(s)" in chat.stdout
    finally:
        code = up.stop()
    assert code == 0, up.output()
    assert not any(alive(pid) for pid in services.values()), "dispatchd up left services running"

    # The history is in SQLite: read the file directly, then through a fresh store process.
    db = up.data / "dispatch.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
    assert rows[0] == 4  # user, assistant (tool call), tool (result), assistant (text)
    store = ServiceProcess("store", ["--database-url", f"sqlite:///{db}"], tmp_path)
    try:
        address = store.wait_ready()
        history = asyncio.run(_load(address, conversation_id))
    finally:
        store.terminate()
    assert [m.seq for m in history] == [1, 2, 3, 4]
    assert [m.role for m in history] == [
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
        common_pb2.ROLE_TOOL,
        common_pb2.ROLE_ASSISTANT,
    ]
    assert history[0].chunks[0].text.text == "what is here?"
    tool_call = history[1].chunks[0].tool_call
    assert (tool_call.name, json.loads(tool_call.input_json), tool_call.step_id) == (
        "list_dir",
        {"path": "."},
        f"{turn_id}#0",
    )
    assert history[2].chunks[0].tool_result.tool_call_id == tool_call.id
    assert history[3].chunks[0].text.text == "The workspace holds notes.txt and src."


async def _load(address: str, conversation_id: str) -> list[common_pb2.Message]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = store_pb2_grpc.ConversationStoreStub(channel)
        resp = await stub.Load(
            store_pb2.LoadRequest(tenant_id="local", conversation_id=conversation_id), timeout=10
        )
        return list(resp.messages)


def test_up_without_a_model_says_so_and_the_demo_makes_real_tool_calls(
    tmp_path: Path, workspace: Path
) -> None:
    up = Up(tmp_path, "--workspace", str(workspace))
    try:
        up.wait_for("Dispatch is up")
        assert "No model is configured" in up.output()
        _, events = asyncio.run(run_turn(up.address, "hello", up.api_key()))
    finally:
        assert up.stop() == 0
    calls = [
        (e.tool_call.name, json.loads(e.tool_call.input_json)) for e in events if e.HasField("tool_call")
    ]
    assert calls == [("list_dir", {"path": "."}), ("read_file", {"path": "notes.txt", "limit": 2000})]
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert not any(r.is_error for r in results)
    assert "remember the milk" in results[1].content
    text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert "remember the milk" in text


def test_up_reports_a_dead_service_and_stops_the_rest(tmp_path: Path, workspace: Path) -> None:
    up = Up(tmp_path, "--workspace", str(workspace))
    try:
        up.wait_for("Dispatch is up")
        services = up.services()
        services_alive = dict(services)
        import os

        os.kill(services_alive.pop("kernel"), signal.SIGKILL)
        assert up.proc.wait(30) == 1
        up._reader.join(5)
        assert "kernel was killed by signal 9" in up.output()
        assert "stopping the other services" in up.output()
        assert not any(alive(pid) for pid in services_alive.values())
    finally:
        up.stop()


def test_up_refuses_a_bad_provider_config_naming_the_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dispatch.cli", "up", "--provider", "openai", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "provider.model" in result.stderr
