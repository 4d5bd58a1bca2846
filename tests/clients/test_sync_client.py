"""The blocking client against the in-process stack.

The stack serves from the test's event loop, so each scenario runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from dispatch_client import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SyncDispatchClient,
    Unauthenticated,
    types,
)
from tests.clients.conftest import ENDLESS, SLOW, MakeStack
from tests.stack import Stack


async def test_a_conversation_through_the_whole_api(stack: Stack) -> None:
    address, key = stack.address("transport"), stack.api_key

    def scenario() -> None:
        with SyncDispatchClient(address, api_key=key) as client:
            conv = client.create_conversation(title="sync")
            workspace = client.create_workspace(name="other", root=str(stack.workspace))
            assert {w.id for w in client.iter_workspaces(page_size=1)} == {conv.workspace_id, workspace.id}
            assert [w.id for w in client.list_workspaces().workspaces if w.name == "other"] == [workspace.id]

            events = list(client.run_turn(conv.id, "what is here?"))
            assert events[0].HasField("turn_started") and events[-1].HasField("turn_sealed")
            assert len({e.turn_id for e in events}) == 1
            assert any(e.HasField("tool_call") for e in events)
            turn_id = events[0].turn_id

            sent = client.send(conv.id, "and now?", policy="enqueue")
            again = list(client.follow_turn(conv.id, sent))
            assert again[0].event_seq == events[-1].event_seq + 1 and again[-1].turn_id == sent.turn_id

            history = client.history(conv.id)
            assert [m.seq for m in history.messages] == list(range(1, 9)) and history.last_seq == 8
            assert [m.seq for m in client.iter_history(conv.id, after_seq=5, page_size=2)] == [6, 7, 8]
            metrics = client.metrics(conv.id)
            assert [t.turn_id for t in metrics.turns] == [turn_id, sent.turn_id]
            assert [m.model for m in client.models().models] == ["scripted"]
            assert [c.local for c in client.computers().computers] == [True]

            # subscribe is a generator: from 0, every event of both turns, then stop.
            seen = []
            with contextlib.closing(client.subscribe(conv.id)) as stream:
                for event in stream:
                    seen.append(event)
                    if event.HasField("turn_sealed") and event.turn_id == sent.turn_id:
                        break
            assert seen == events + again

            updated = client.update_conversation(conv.id, title="renamed", agent="")
            assert (updated.title, updated.agent) == ("renamed", "")
            assert [c.title for c in client.iter_conversations()] == ["renamed"]
            assert [c.id for c in client.list_conversations(workspace_id=workspace.id).conversations] == []
            assert client.get_conversation(conv.id).last_seq == 8
            client.delete_conversation(conv.id)
            with pytest.raises(NotFound) as missing:
                client.get_conversation(conv.id)
            assert missing.value.code == grpc.StatusCode.NOT_FOUND
            assert str(missing.value).startswith("NOT_FOUND: ")

    await asyncio.to_thread(scenario)


async def test_errors_carry_the_status(make_stack: MakeStack) -> None:
    stack = await make_stack(ENDLESS)
    address, key, other = stack.address("transport"), stack.api_key, await stack.new_key("other")

    def scenario() -> None:
        with Client(address, api_key=key) as client:
            conv = client.create_conversation()
            with pytest.raises(InvalidArgument):
                client.send(conv.id, "")
            sent = client.send(conv.id, "one")
            with pytest.raises(FailedPrecondition):
                client.send(conv.id, "two", policy=types.SEND_POLICY_REJECT)
            assert client.cancel(conv.id, sent.turn_id).turn_id == sent.turn_id
            assert list(client.follow_turn(conv.id, sent))[-1].turn_sealed.state == types.TURN_STATE_ABORTED
        with Client(address, api_key="not-a-key") as stranger:
            with pytest.raises(Unauthenticated) as refused:
                stranger.models()
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(Unauthenticated):
                next(stranger.subscribe(conv.id))
        with Client(address, api_key=other) as other_tenant, pytest.raises(NotFound):
            other_tenant.history(conv.id)

    await asyncio.to_thread(scenario)


async def test_the_key_and_address_come_from_the_environment(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_API_KEY", stack.api_key)
    monkeypatch.setenv("DISPATCH_ADDRESS", stack.address("transport"))

    def scenario() -> str:
        with SyncDispatchClient() as client:
            return client.create_conversation(title="from env").title

    assert await asyncio.to_thread(scenario) == "from env"


async def test_subscribe_ends_where_until_says(make_stack: MakeStack) -> None:
    stack = await make_stack(SLOW)
    address, key = stack.address("transport"), stack.api_key

    def scenario() -> None:
        with SyncDispatchClient(address, api_key=key) as client:
            conv = client.create_conversation()
            first = list(client.run_turn(conv.id, "one"))
            # Without following, the stream ends after the history so far.
            assert list(client.subscribe(conv.id, follow=False)) == first
            assert list(client.subscribe(conv.id, after_event_seq=1, until="caught_up")) == first[1:]
            second = client.send(conv.id, "two")
            events = list(client.subscribe(conv.id, until=types.SUBSCRIBE_UNTIL_TURN_SEALED))
            assert events[: len(first)] == first
            assert events[-1].HasField("turn_sealed") and events[-1].turn_id == second.turn_id

    await asyncio.to_thread(scenario)
