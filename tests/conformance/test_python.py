"""The conformance scenario, run by the Python SDK against the session's stack (README.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from dispatch_client import DispatchClient, DispatchError
from tests.conformance.stack import ConformanceStack, load_scenario

CASES = load_scenario()["cases"]
ENDED = {"TURN_STATE_COMPLETED", "TURN_STATE_FAILED", "TURN_STATE_ABORTED", "TURN_STATE_INTERRUPTED"}
DEADLINE = 30.0


def as_data(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    kind = message.WhichOneof("kind") if "kind" in message.DESCRIPTOR.oneofs_by_name else None
    if kind:
        data["__kind"] = kind
    return data


def same(a: object, b: object) -> bool:
    """Equal, with numbers compared as numbers (proto3 JSON writes int64 as strings)."""
    try:
        return int(str(a)) == int(str(b))
    except ValueError:
        return a == b


class CallFailed(Exception):
    """A call ended with a gRPC status: ``code`` is its name (``NOT_FOUND``)."""

    def __init__(self, code: str, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details


class Runner:
    """Runs a case's steps with the Python SDK; ``call`` is what another client replaces."""

    def __init__(self, clients: dict[str, DispatchClient]):
        self.clients = clients
        self.saved: dict[str, Any] = {}

    def resolve(self, value: Any) -> Any:
        if not (isinstance(value, str) and value.startswith("$")):
            return value
        name, *path = value[1:].split(".")
        here: Any = self.saved[name]
        for segment in path:
            if isinstance(here, list):
                if segment == "count":
                    here = len(here)
                elif segment == "first":
                    here = here[0]
                elif segment == "last":
                    here = here[-1]
                elif segment.startswith("kind:"):
                    here = next(e for e in here if e.get("__kind") == segment[5:])
                else:
                    here = here[int(segment)]
            else:
                here = here[segment]
        return here

    def arg(self, step: dict[str, Any], name: str, default: Any = None) -> Any:
        return self.resolve(step[name]) if name in step else default

    async def run(self, steps: list[dict[str, Any]]) -> None:
        for index, step in enumerate(steps):
            try:
                await self.step(step)
            except AssertionError as exc:
                raise AssertionError(f"step {index} ({step['op']}): {exc}") from None

    async def step(self, step: dict[str, Any]) -> None:
        op = step["op"]
        if op == "expect":
            self.expect(step)
            return
        try:
            result = await self.call(op, step)
        except CallFailed as exc:
            assert step.get("error") == exc.code, f"failed with {exc.code}: {exc.details}"
            return
        assert "error" not in step, f"succeeded; expected {step['error']}"
        if "save" in step:
            self.saved[step["save"]] = result

    async def call(self, op: str, step: dict[str, Any]) -> Any:
        try:
            return await self.sdk_call(self.clients[step.get("as", "local")], op, step)
        except DispatchError as exc:
            raise CallFailed(exc.code.name, exc.details) from None

    async def sdk_call(self, client: DispatchClient, op: str, step: dict[str, Any]) -> Any:
        conv = self.arg(step, "conversation", "")
        if op == "create_conversation":
            return as_data(await client.create_conversation(agent=step["agent"], title=step.get("title", "")))
        if op == "get_conversation":
            return as_data(await client.get_conversation(conv))
        if op == "send":
            sent = await client.send(
                conv,
                self.arg(step, "text"),
                policy=self.arg(step, "policy", "SEND_POLICY_ENQUEUE").removeprefix("SEND_POLICY_").lower(),
                idempotency_key=self.arg(step, "idempotency_key", ""),
            )
            return as_data(sent)
        if op == "subscribe":
            return await asyncio.wait_for(self.subscribe(client, conv, step), DEADLINE)
        if op == "cancel":
            return as_data(await client.cancel(conv, self.arg(step, "turn_id", "")))
        if op == "get_turn":
            return as_data(await client.get_turn(conv, self.arg(step, "turn_id")))
        if op == "wait_turn":
            deadline = time.monotonic() + DEADLINE
            while True:
                turn = as_data(await client.get_turn(conv, self.arg(step, "turn_id")))
                if turn["state"] in ENDED:
                    return turn
                assert time.monotonic() < deadline, f"turn still {turn['state']} after {DEADLINE}s"
                await asyncio.sleep(0.05)
        if op == "list_turns":
            return as_data(await client.list_turns(conv))
        if op == "history":
            return as_data(await client.history(conv))
        if op == "list_approvals":
            return as_data(
                await client.list_approvals(conv, pending_only=self.arg(step, "pending_only", False))
            )
        if op == "resolve_approval":
            decision = self.arg(step, "decision").removeprefix("APPROVAL_DECISION_").lower()
            approval = await client.resolve_approval(
                self.arg(step, "approval_id"), decision, reason=self.arg(step, "reason", "")
            )
            return as_data(approval)
        raise AssertionError(f"unknown op {op!r}")

    async def subscribe(
        self, client: DispatchClient, conv: str, step: dict[str, Any]
    ) -> list[dict[str, Any]]:
        after = int(self.arg(step, "after_event_seq", 0))
        until = self.arg(step, "until")
        bounded = until.removeprefix("SUBSCRIBE_UNTIL_").lower() if until else "follow"
        events: list[dict[str, Any]] = []
        stream = client.subscribe(conv, after_event_seq=after, until=bounded)
        try:
            async for event in stream:
                events.append(as_data(event))
                if len(events) == step.get("stop_after") or events[-1]["__kind"] == step.get("stop_at"):
                    break  # drop the stream, as a lost connection would
        finally:
            await stream.aclose()
        return events

    def expect(self, step: dict[str, Any]) -> None:
        if "value" in step:
            value = self.resolve(step["value"])
            if "equals" in step:
                other = self.resolve(step["equals"])
                assert same(value, other), f"{step['value']} is {value!r}, not {other!r}"
            if "differs" in step:
                other = self.resolve(step["differs"])
                assert not same(value, other), f"{step['value']} is {value!r}, the same as {step['differs']}"
        if "events" in step:
            events = self.resolve(step["events"])
            check_events(events, step)
        if "joined" in step:
            joined = [e for part in step["joined"] for e in self.resolve(part)]
            whole = self.resolve(step["equals"])
            assert summary(joined) == summary(whole), f"joined {summary(joined)} != {summary(whole)}"
            assert text(joined) == text(whole)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["__kind"] for e in events]


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e["text_delta"]["text"] for e in events if e["__kind"] == "text_delta")


def summary(events: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(int(e["event_seq"]), e["__kind"]) for e in events]


def check_events(events: list[dict[str, Any]], step: dict[str, Any]) -> None:
    seen = kinds(events)
    if "count" in step:
        assert len(events) == step["count"], f"{len(events)} events: {seen}"
    if "starts_with" in step:
        assert seen[: len(step["starts_with"])] == step["starts_with"], f"starts {seen}"
    if "ends_with" in step:
        assert seen[-len(step["ends_with"]) :] == step["ends_with"], f"ends {seen}"
    if "contains" in step:
        rest = iter(seen)
        assert all(k in rest for k in step["contains"]), f"{step['contains']} not in order in {seen}"
    for kind in step.get("excludes", []):
        assert kind not in seen, f"{kind} in {seen}"
    if "text" in step:
        assert text(events) == step["text"]
    if "consecutive_from" in step:
        seqs = [int(e["event_seq"]) for e in events]
        first = step["consecutive_from"]
        assert seqs == list(range(first, first + len(seqs))), f"event_seqs {seqs}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
async def test_scenario(conformance_stack: ConformanceStack, case: dict[str, Any]) -> None:
    keys = {"local": conformance_stack.api_key, "other": conformance_stack.other_key, "nobody": "not-a-key"}
    clients = {who: DispatchClient(conformance_stack.address, api_key=key) for who, key in keys.items()}
    try:
        await Runner(clients).run(case["steps"])
    finally:
        for client in clients.values():
            await client.close()
