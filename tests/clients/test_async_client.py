"""The async client against the in-process stack."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket

import grpc
import pytest

from dispatch_client import (
    DispatchClient,
    DispatchError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    types,
)
from tests.clients.conftest import ENDLESS, SLOW, MakeStack
from tests.stack import Stack


def kinds(events: list[types.AgentEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


def client_of(stack: Stack, key: str | None = None) -> DispatchClient:
    return DispatchClient(stack.address("transport"), api_key=stack.api_key if key is None else key)


async def test_a_conversation_through_the_whole_api(stack: Stack) -> None:
    async with client_of(stack) as client:
        conv = await client.create_conversation(title="first", agent="")
        assert conv.title == "first" and conv.workspace_id  # the default workspace
        second = await client.create_workspace(name="second", root=str(stack.workspace))
        assert second.name == "second" and second.id != conv.workspace_id
        listed = await client.list_workspaces()
        assert {w.id for w in listed.workspaces} == {conv.workspace_id, second.id}
        assert sorted([w.id async for w in client.iter_workspaces(page_size=1)]) == sorted(
            [conv.workspace_id, second.id]
        )

        events = [e async for e in client.run_turn(conv.id, "what is here?")]
        assert kinds(events)[0] == "turn_started" and kinds(events)[-1] == "turn_sealed"
        assert {"tool_call", "tool_result", "text_delta", "turn_done"} <= set(kinds(events))
        assert len({e.turn_id for e in events}) == 1
        seqs = [e.event_seq for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert events[-1].turn_sealed.state == types.TURN_STATE_COMPLETED
        turn_id = events[0].turn_id

        history = await client.history(conv.id)
        assert [m.seq for m in history.messages] == [1, 2, 3, 4] and history.last_seq == 4
        assert history.messages[-1].chunks[0].text.text == "The workspace is empty."
        paged = [m async for m in client.iter_history(conv.id, page_size=1)]
        assert [m.seq for m in paged] == [1, 2, 3, 4]
        assert [m.seq for m in (await client.history(conv.id, after_seq=2, limit=1)).messages] == [3]

        metrics = await client.metrics(conv.id)
        assert [t.turn_id for t in metrics.turns] == [turn_id] and metrics.turns[0].steps == 2
        assert [t.turn_id for t in (await client.metrics(conv.id, turn_id)).turns] == [turn_id]
        assert [(m.provider, m.model) for m in (await client.models()).models] == [("scripted", "scripted")]
        assert [c.local for c in (await client.computers()).computers] == [True]
        token = await client.create_stream_token(conv.id, ttl_seconds=60)
        assert token.conversation_id == conv.id and token.token.startswith("dst1.")

        other = await client.create_conversation(workspace_id=second.id, title="second", cwd="/tmp")
        assert (other.workspace_id, other.cwd) == (second.id, "/tmp")
        everyone = [c.id async for c in client.iter_conversations(page_size=1)]
        assert sorted(everyone) == sorted([conv.id, other.id])
        only_second = await client.list_conversations(workspace_id=second.id)
        assert [c.id for c in only_second.conversations] == [other.id]

        updated = await client.update_conversation(conv.id, title="renamed", cwd="/srv", computer_id="")
        assert (updated.title, updated.cwd, updated.agent) == ("renamed", "/srv", "")
        untouched = await client.update_conversation(conv.id, agent="")
        assert (untouched.title, untouched.cwd) == ("renamed", "/srv")
        got = await client.get_conversation(conv.id)
        assert got.last_seq == 4 and got.last_event_seq >= seqs[-1] and got.title == "renamed"

        await client.delete_conversation(conv.id)
        with pytest.raises(NotFound) as missing:
            await client.get_conversation(conv.id)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert isinstance(missing.value, DispatchError)
        assert str(missing.value).startswith("NOT_FOUND: ") and conv.id in str(missing.value)


async def test_errors_carry_the_status(stack: Stack) -> None:
    async with client_of(stack) as client:
        conv = await client.create_conversation()
        with pytest.raises(NotFound):
            await client.send("conv_00000000000000000000000000", "hi")
        with pytest.raises(NotFound):
            await client.history("conv_00000000000000000000000000")
        with pytest.raises(InvalidArgument, match="message is empty"):
            await client.send(conv.id, "")
        with pytest.raises(InvalidArgument, match="expected apr_"):
            await client.resolve_approval("appr_x", "approve")
        with pytest.raises(ValueError, match=r"expected one of enqueue\|interrupt\|reject"):
            await client.send(conv.id, "hi", policy="later")
        with pytest.raises(NotFound):  # a stream fails at once on what reconnecting cannot fix
            async for _ in client.subscribe("conv_00000000000000000000000000"):
                pass

    for key in ("not-a-key", ""):
        async with client_of(stack, key) as anonymous:
            with pytest.raises(Unauthenticated) as refused:
                await anonymous.list_conversations()
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(Unauthenticated):
                async for _ in anonymous.subscribe(conv.id):
                    pass

    # Another tenant's conversation does not exist for this key.
    async with client_of(stack, await stack.new_key("other")) as stranger:
        with pytest.raises(NotFound):
            await stranger.get_conversation(conv.id)
        assert [c async for c in stranger.iter_conversations()] == []


async def test_a_repeated_idempotency_key_does_not_start_another_turn(stack: Stack) -> None:
    async with client_of(stack) as client:
        conv = await client.create_conversation()
        events = [e async for e in client.run_turn(conv.id, "once", idempotency_key="k1")]
        assert events[-1].HasField("turn_sealed")
        again = await client.send(conv.id, "once", idempotency_key="k1")
        assert (again.turn_id, again.state) == (events[0].turn_id, types.TURN_STATE_COMPLETED)
        # Following the repeat replays the turn it answers.
        assert [e async for e in client.run_turn(conv.id, "once", idempotency_key="k1")] == events
        assert len((await client.metrics(conv.id)).turns) == 1


async def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with DispatchClient(f"127.0.0.1:{port}", api_key="k", timeout=5) as client:
        with pytest.raises(Unavailable) as err:
            await client.models()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_send_policies_while_a_turn_runs(make_stack: MakeStack) -> None:
    stack = await make_stack(ENDLESS)
    async with client_of(stack) as client:
        conv = await client.create_conversation()
        first = await client.send(conv.id, "one")
        assert first.state == types.TURN_STATE_RUNNING and not first.queued
        with pytest.raises(FailedPrecondition) as refused:
            await client.send(conv.id, "two", policy="reject")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        queued = await client.send(conv.id, "three", policy=types.SEND_POLICY_ENQUEUE)
        assert queued.queued and queued.turn_id == first.turn_id
        second = await client.send(conv.id, "four", policy="INTERRUPT")
        assert second.turn_id != first.turn_id and not second.queued
        # The first turn was aborted to make way.
        first_events = [e async for e in client.follow_turn(conv.id, first)]
        assert first_events[-1].turn_sealed.state == types.TURN_STATE_ABORTED

        cancelled = await client.cancel(conv.id, "turn_not_this_one")
        assert cancelled.turn_id == ""
        cancelled = await client.cancel(conv.id)
        assert cancelled.turn_id == second.turn_id
        events = [e async for e in client.follow_turn(conv.id, second)]
        done = next(e for e in events if e.HasField("turn_done")).turn_done
        assert done.finish_reason == types.FINISH_REASON_ABORTED
        assert events[-1].turn_sealed.state == types.TURN_STATE_ABORTED
        # "three", queued before the interrupt, starts its turn in the commit that sealed
        # the second one; cancelled too, nothing runs any more.
        third = await client.cancel(conv.id)
        assert third.turn_id not in ("", first.turn_id, second.turn_id)
        assert (await client.cancel(conv.id)).turn_id == ""
        turns = await client.list_turns(conv.id)
        assert [t.state for t in turns.turns] == [types.TURN_STATE_ABORTED] * 3


async def test_run_turn_follows_a_queued_message_into_the_turn_that_takes_it(make_stack: MakeStack) -> None:
    stack = await make_stack(SLOW)
    async with client_of(stack) as client:
        conv = await client.create_conversation()
        first = await client.send(conv.id, "one")
        events = [e async for e in client.run_turn(conv.id, "two")]
        turns = list(dict.fromkeys(e.turn_id for e in events))
        # The running turn (it had no tool-result boundary to take the message at), then the next.
        assert turns[0] == first.turn_id and len(turns) == 2
        assert events[-1].HasField("turn_sealed") and events[-1].turn_id == turns[1]
        history = await client.history(conv.id)
        users = [m for m in history.messages if m.role == types.ROLE_USER]
        assert [m.chunks[0].text.text for m in users] == ["one", "two"]
        assert users[1].turn_id == turns[1]


async def test_subscribe_replays_then_follows_live_and_stops_when_asked(stack: Stack) -> None:
    async with client_of(stack) as client:
        conv = await client.create_conversation()
        first = [e async for e in client.run_turn(conv.id, "one")]
        seen: list[types.AgentEvent] = []
        sent: list[str] = []

        async def watch() -> None:
            async with contextlib.aclosing(client.subscribe(conv.id)) as events:
                async for event in events:
                    seen.append(event)
                    if event.HasField("turn_sealed") and event.turn_id in sent:
                        return

        watcher = asyncio.create_task(watch())
        second = await client.send(conv.id, "two")
        sent.append(second.turn_id)
        await asyncio.wait_for(watcher, 30)
        assert [e.event_seq for e in seen] == list(range(1, len(seen) + 1))
        assert seen[: len(first)] == first
        assert {e.turn_id for e in seen} == {first[0].turn_id, second.turn_id}
        # From the middle: only what came after.
        tail = []
        async with contextlib.aclosing(client.subscribe(conv.id, after_event_seq=len(first))) as events:
            async for event in events:
                tail.append(event)
                if event.HasField("turn_sealed"):
                    break
        assert tail == seen[len(first) :]


async def test_subscribe_ends_where_until_says(make_stack: MakeStack) -> None:
    stack = await make_stack(SLOW)
    async with client_of(stack) as client:
        conv = await client.create_conversation()
        first = [e async for e in client.run_turn(conv.id, "one")]
        # Caught up: the history so far, then the stream ends; follow=False says the same.
        assert [e async for e in client.subscribe(conv.id, until="caught_up")] == first
        assert [e async for e in client.subscribe(conv.id, follow=False)] == first
        tail = client.subscribe(conv.id, after_event_seq=2, until=types.SUBSCRIBE_UNTIL_CAUGHT_UP)
        assert [e async for e in tail] == first[2:]

        # Until sealed, from 0: past the first turn's seal, up to the seal of the turn running now.
        second = await client.send(conv.id, "two")
        events = [e async for e in client.subscribe(conv.id, until="turn_sealed")]
        assert events[: len(first)] == first
        assert [e.turn_id for e in events if e.HasField("turn_sealed")] == [first[0].turn_id, second.turn_id]
        assert events[-1].HasField("turn_sealed") and events[-1].turn_id == second.turn_id
        assert [e.event_seq for e in events] == list(range(1, len(events) + 1))
        # With no turn running it ends caught up.
        assert [e async for e in client.subscribe(conv.id, until="turn_sealed")] == events

        with pytest.raises(ValueError, match="contradicts"):
            client.subscribe(conv.id, until="caught_up", follow=True)


def test_every_public_rpc_has_a_method() -> None:
    """A new RPC in transport.proto fails here until the SDK calls it."""
    import inspect

    from dispatch_client import _calls, client
    from dispatch_client._proto import transport_pb2

    called = set(re.findall(r'Call\("(\w+)"', inspect.getsource(_calls)))
    called |= set(re.findall(r"_stub\.(\w+)\(", inspect.getsource(client)))  # the stream
    service = transport_pb2.DESCRIPTOR.services_by_name["Dispatch"]
    assert {m.name for m in service.methods} - called == set()
