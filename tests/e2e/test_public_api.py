"""The public API end to end through real processes (`dispatchd up`): two subscribers see the
same events; a subscriber process killed mid-turn and restarted from its last event_seq
misses nothing; `interrupt` aborts the running turn and starts the new one; `reject`
answers FAILED_PRECONDITION; the transport lists its services through reflection."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dispatch_client import DispatchClient, DispatchError, types
from tests.e2e.procs import Up

pytestmark = pytest.mark.e2e

WORDS = 40


def slow_turn(words: int = WORDS, pause: float = 0.05) -> list[list[dict[str, Any]]]:
    step: list[dict[str, Any]] = []
    for i in range(words):
        step += [{"type": "sleep", "seconds": pause}, {"type": "text_delta", "text": f"w{i} "}]
    return [step]


@pytest.fixture
def up(tmp_path: Path) -> Any:
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            {
                "turns": [
                    {"steps": slow_turn()},  # 1: watched by two subscribers and a killed one
                    {"steps": slow_turn(400, 0.05)},  # 2: long; interrupted
                    {"steps": [[{"type": "text_delta", "text": "the new one"}]]},  # 3: replaces it
                ]
            }
        )
    )
    ws = tmp_path / "ws"
    ws.mkdir()
    server = Up(tmp_path, "--workspace", str(ws), "--provider", "scripted", "--script", str(script))
    try:
        server.wait_for("Dispatch is up")
        yield server
    finally:
        assert server.stop() == 0, server.output()


async def follow(client: DispatchClient, conv: str, after: int, turn_id: str) -> list[types.AgentEvent]:
    events = []
    async for event in client.subscribe(conv, after_event_seq=after):
        events.append(event)
        if event.HasField("turn_sealed") and event.turn_id == turn_id:
            break
    return events


def watcher(up: Up, conv: str, after: int, out: Path) -> subprocess.Popen[bytes]:
    """A `dispatch watch --json` process appending one event per line to ``out``."""
    with out.open("ab") as sink:  # the child has its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dispatch_client.cli",
                "--address",
                up.address,
                "watch",
                conv,
                "--after",
                str(after),
                "--json",
            ],
            stdout=sink,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "DISPATCH_API_KEY": up.api_key()},
        )


def seqs_in(path: Path) -> list[int]:
    seqs = []
    for line in path.read_text().splitlines():
        try:
            seqs.append(int(json.loads(line)["event_seq"]))
        except (ValueError, KeyError):
            break  # a line cut short by the kill
    return seqs


def test_subscribers_processes_and_send_policies_end_to_end(up: Up, tmp_path: Path) -> None:
    asyncio.run(_scenario(up, tmp_path))


async def _scenario(up: Up, tmp_path: Path) -> None:
    async with (
        DispatchClient(up.address, api_key=up.api_key()) as a,
        DispatchClient(up.address, api_key=up.api_key()) as b,
    ):
        conv = (await a.create_conversation()).id
        out = tmp_path / "watch.ndjson"
        proc = watcher(up, conv, 0, out)
        sent = await a.send(conv, "one")
        following = asyncio.gather(
            follow(a, conv, sent.after_event_seq, sent.turn_id),
            follow(b, conv, sent.after_event_seq, sent.turn_id),
        )
        # The watcher process is killed mid-turn, then restarted from the last event_seq it wrote.
        deadline = time.monotonic() + 30
        while len(seqs_in(out)) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = seqs_in(out)
        out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[: len(seen)]))
        proc = watcher(up, conv, seen[-1], out)
        first, second = await following
        last = first[-1].event_seq
        assert seen[-1] < last, "the watcher was to be killed before the turn ended"
        try:
            while last not in seqs_in(out) and time.monotonic() < deadline + 30:
                await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        # Killed and restarted, it missed nothing and saw nothing twice.
        assert seqs_in(out) == list(range(1, last + 1))
        # Two subscribers, the same events.
        assert first == second
        assert [e.event_seq for e in first] == list(range(sent.after_event_seq + 1, last + 1))

        # reject while a turn runs: FAILED_PRECONDITION; interrupt: the running turn aborts, the new one runs.
        long = await a.send(conv, "two")
        with pytest.raises(DispatchError) as refused:
            await b.send(conv, "not now", policy="reject")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        replaced = await b.send(conv, "three", policy="interrupt")
        assert replaced.turn_id != long.turn_id and not replaced.queued
        tail = await follow(a, conv, long.after_event_seq, replaced.turn_id)
        done = {e.turn_id: e.turn_done.finish_reason for e in tail if e.HasField("turn_done")}
        assert done[long.turn_id] == types.FINISH_REASON_ABORTED
        assert done[replaced.turn_id] == types.FINISH_REASON_STOP
        text = "".join(
            e.text_delta.text for e in tail if e.HasField("text_delta") and e.turn_id == replaced.turn_id
        )
        assert text == "the new one"


def test_the_transport_lists_its_services_through_reflection(up: Up) -> None:
    with grpc.insecure_channel(up.address) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
    names = {s.name for s in answer.list_services_response.service}
    assert {"dispatch.v1.Dispatch", "grpc.health.v1.Health"} <= names
