"""grpcurl, a third-party tool, through server reflection only (no .proto files, no descriptor
set): it lists and describes the public API, and runs the scenario's unary cases."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from dispatch_client._proto import common_pb2, transport_pb2
from tests.conformance.stack import ConformanceStack, load_scenario
from tests.conformance.test_python import ENDED, CallFailed, Runner, as_data

ROOT = Path(__file__).resolve().parents[2]
UNARY = [c for c in load_scenario()["cases"] if c["unary"]]

# op -> (method, response type, request fields from the step's arguments)
METHODS: dict[str, tuple[str, type[Message], dict[str, str]]] = {
    "create_conversation": ("CreateConversation", common_pb2.Conversation, {"agent": "agent"}),
    "get_conversation": ("GetConversation", common_pb2.Conversation, {"conversation_id": "conversation"}),
    "send": (
        "Send",
        transport_pb2.SendResponse,
        {
            "conversation_id": "conversation",
            "text": "text",
            "policy": "policy",
            "idempotency_key": "idempotency_key",
        },
    ),
    "cancel": (
        "Cancel",
        transport_pb2.CancelResponse,
        {"conversation_id": "conversation", "turn_id": "turn_id"},
    ),
    "get_turn": ("GetTurn", common_pb2.Turn, {"conversation_id": "conversation", "turn_id": "turn_id"}),
    "list_turns": ("ListTurns", common_pb2.ListTurnsResponse, {"conversation_id": "conversation"}),
    "history": ("History", transport_pb2.HistoryResponse, {"conversation_id": "conversation"}),
}


@pytest.fixture(scope="module")
def grpcurl() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/ensure-grpcurl.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return out.stdout.strip().splitlines()[-1]


def run(
    grpcurl: str, address: str, *args: str, key: str = "", data: str = ""
) -> subprocess.CompletedProcess[str]:
    argv = [grpcurl, "-plaintext", "-max-time", "30"]
    if key:
        argv += ["-H", f"authorization: Bearer {key}"]
    if data:
        argv += ["-d", data]
    return subprocess.run([*argv, address, *args], capture_output=True, text=True, timeout=60, check=False)


def test_lists_and_describes_through_reflection(conformance_stack: ConformanceStack, grpcurl: str) -> None:
    listed = run(grpcurl, conformance_stack.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"dispatch.v1.Dispatch", "grpc.reflection.v1.ServerReflection"} <= services
    assert "grpc.reflection.v1alpha.ServerReflection" in services  # older tools still work
    method = run(grpcurl, conformance_stack.address, "describe", "dispatch.v1.Dispatch.Send")
    assert method.returncode == 0, method.stderr
    assert "rpc Send ( .dispatch.v1.SendRequest ) returns ( .dispatch.v1.SendResponse )" in method.stdout
    message = run(grpcurl, conformance_stack.address, "describe", "dispatch.v1.AgentEvent")
    assert message.returncode == 0 and "turn_sealed" in message.stdout, message.stderr
    itself = run(grpcurl, conformance_stack.address, "describe", "grpc.reflection.v1.ServerReflection")
    assert itself.returncode == 0 and "ServerReflectionInfo" in itself.stdout, itself.stderr


def test_a_call_through_reflection(conformance_stack: ConformanceStack, grpcurl: str) -> None:
    made = run(
        grpcurl,
        conformance_stack.address,
        "dispatch.v1.Dispatch/CreateConversation",
        key=conformance_stack.api_key,
        data='{"title": "from grpcurl"}',
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["title"] == "from grpcurl"
    refused = run(grpcurl, conformance_stack.address, "dispatch.v1.Dispatch/ListWorkspaces", data="{}")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def status_name(stderr: str) -> str:
    """grpcurl's ``Code: NotFound`` as the status's name, ``NOT_FOUND``."""
    found = re.search(r"Code: (\w+)", stderr)
    assert found, stderr
    return re.sub(r"(?<!^)(?=[A-Z])", "_", found.group(1)).upper()


class GrpcurlRunner(Runner):
    def __init__(self, grpcurl: str, address: str, keys: dict[str, str]):
        super().__init__({})
        self.grpcurl, self.address, self.keys = grpcurl, address, keys

    async def call(self, op: str, step: dict[str, Any]) -> dict[str, Any]:
        op = "get_turn" if op == "wait_turn" else op
        method, response, fields = METHODS[op]
        request = {field: self.arg(step, arg) for field, arg in fields.items() if arg in step}
        for _ in range(600):
            done = await asyncio.to_thread(
                run,
                self.grpcurl,
                self.address,
                f"dispatch.v1.Dispatch/{method}",
                key=self.keys[step.get("as", "local")],
                data=json.dumps(request),
            )
            if done.returncode != 0:
                raise CallFailed(status_name(done.stderr), done.stderr.strip())
            result = as_data(json_format.Parse(done.stdout, response()))
            if step["op"] != "wait_turn" or result["state"] in ENDED:
                return result
            await asyncio.sleep(0.05)
        raise AssertionError("the turn did not end")


@pytest.mark.parametrize("case", UNARY, ids=[c["name"] for c in UNARY])
async def test_unary_cases(conformance_stack: ConformanceStack, grpcurl: str, case: dict[str, Any]) -> None:
    keys = {"local": conformance_stack.api_key, "other": conformance_stack.other_key, "nobody": "not-a-key"}
    await GrpcurlRunner(grpcurl, conformance_stack.address, keys).run(case["steps"])
