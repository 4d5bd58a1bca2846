"""The conversation store over gRPC: a real server on port 0, a real SQLite file, a real channel."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import pytest

from dispatch.shared.config import ConfigError, StoreConfig
from dispatch.shared.ids import new_id
from dispatch.store.server import start as start_store
from dispatch.store.service import StoreServicer
from dispatch.store.sqlite import MIGRATIONS
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc
from tests.store.harness import (
    CONTRACT_TRANSITIONS,
    OTHER_TENANT,
    TENANT,
    RunningStore,
    append,
    delta_event,
    new_conversation,
    text_message,
    text_of,
)

if TYPE_CHECKING:
    from tests.store.harness import Stub

S = common_pb2  # states and roles read shorter in tables

MiB = 1024 * 1024


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


@dataclass
class Seeded:
    """A workspace, a conversation in it with two messages and two events, and a turn."""

    workspace_id: str
    conversation_id: str
    turn_id: str


async def seed(stub: Stub) -> Seeded:
    ws = await stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w")
    )
    conv = await new_conversation(stub, workspace_id=ws.id)
    await append(stub, conv.id, [text_message("a"), text_message("b")], [delta_event(1), delta_event(2)])
    turn = await stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
    return Seeded(ws.id, conv.id, turn.id)


# ----------------------------------------------------------------- workspaces


async def test_first_conversation_creates_the_tenant_default_workspace(
    store: RunningStore, store_cfg: StoreConfig
) -> None:
    first = await new_conversation(store.stub, title="one")
    second = await new_conversation(store.stub, title="two")
    assert first.workspace_id and first.workspace_id == second.workspace_id

    ws = await store.stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=first.workspace_id)
    )
    assert (ws.name, ws.root, ws.tenant_id) == ("default", store_cfg.default_workspace_root, TENANT)
    assert ws.is_default
    listed = await store.stub.ListWorkspaces(store_pb2.ListWorkspacesRequest(tenant_id=TENANT))
    assert [w.id for w in listed.workspaces] == [ws.id]

    theirs = await new_conversation(store.stub, tenant_id=OTHER_TENANT)
    assert theirs.workspace_id != ws.id


@pytest.mark.parametrize("pinned", [True, False])
async def test_a_restart_with_a_workspace_root_moves_the_default_workspaces(
    store: RunningStore, store_cfg: StoreConfig, tmp_path: Path, pinned: bool
) -> None:
    mine = await new_conversation(store.stub)
    theirs = await new_conversation(store.stub, tenant_id=OTHER_TENANT)
    other = await store.stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w")
    )
    await store.stop()
    # As `dispatchd up --workspace B` after a first start with A (or with no flag at all).
    moved = dataclasses.replace(
        store_cfg, default_workspace_root=str(tmp_path / "b"), pin_default_workspace=pinned
    )
    again = await RunningStore.start(moved)
    try:
        roots = {
            ws.id: ws.root
            for tenant in (TENANT, OTHER_TENANT)
            for ws in (
                await again.stub.ListWorkspaces(store_pb2.ListWorkspacesRequest(tenant_id=tenant))
            ).workspaces
        }
        expected = moved.default_workspace_root if pinned else store_cfg.default_workspace_root
        assert roots[mine.workspace_id] == roots[theirs.workspace_id] == expected
        assert roots[other.id] == "/srv/w"  # a workspace of its own is never moved
        assert not other.is_default
    finally:
        await again.stop()


async def test_workspaces_paginate_oldest_first_and_update_optional_fields(store: RunningStore) -> None:
    created = [
        await store.stub.CreateWorkspace(
            store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name=f"w{i}", root=f"/srv/{i}")
        )
        for i in range(5)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await store.stub.ListWorkspaces(
            store_pb2.ListWorkspacesRequest(tenant_id=TENANT, page_size=2, page_token=token)
        )
        assert len(page.workspaces) <= 2
        seen += [w.id for w in page.workspaces]
        token = page.next_page_token
        if not token:
            break
    assert seen == [w.id for w in created]

    updated = await store.stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(
            tenant_id=TENANT, workspace_id=created[0].id, default_computer_id="gpu-box"
        )
    )
    assert (updated.name, updated.root, updated.default_computer_id) == ("w0", "/srv/0", "gpu-box")
    renamed = await store.stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(tenant_id=TENANT, workspace_id=created[0].id, name="main")
    )
    assert (renamed.name, renamed.default_computer_id) == ("main", "gpu-box")


# -------------------------------------------------------------- conversations


async def test_conversations_list_newest_first_across_pages(store: RunningStore) -> None:
    created = [await new_conversation(store.stub, title=f"c{i}") for i in range(5)]
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await store.stub.ListConversations(
            store_pb2.ListConversationsRequest(tenant_id=TENANT, page_size=2, page_token=token)
        )
        seen += [c.title for c in page.conversations]
        token = page.next_page_token
        if not token:
            break
    assert seen == [c.title for c in reversed(created)]


async def test_list_conversations_of_one_workspace(store: RunningStore) -> None:
    ws = await store.stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/w")
    )
    mine = await new_conversation(store.stub, workspace_id=ws.id)
    await new_conversation(store.stub)  # in the default workspace
    page = await store.stub.ListConversations(
        store_pb2.ListConversationsRequest(tenant_id=TENANT, workspace_id=ws.id)
    )
    assert [c.id for c in page.conversations] == [mine.id]


async def test_update_conversation_sets_only_given_fields_and_empty_clears(store: RunningStore) -> None:
    conv = await new_conversation(store.stub, title="t", cwd="/srv/a", computer_id="box")

    def update(**fields: str) -> Awaitable[common_pb2.Conversation]:
        return store.stub.UpdateConversation(
            store_pb2.UpdateConversationRequest(tenant_id=TENANT, conversation_id=conv.id, **fields)
        )

    after_title = await update(title="renamed")
    assert (after_title.title, after_title.cwd, after_title.computer_id) == ("renamed", "/srv/a", "box")
    cleared = await update(cwd="")
    assert (cleared.title, cleared.cwd, cleared.computer_id) == ("renamed", "", "box")
    assert cleared.updated_at.ToNanoseconds() > conv.updated_at.ToNanoseconds()


@pytest.mark.sqlite_only
async def test_delete_conversation_removes_its_messages_events_and_turns(
    store: RunningStore, db_path: Path
) -> None:
    ids = await seed(store.stub)
    kept = await seed(store.stub)
    await store.stub.DeleteConversation(
        store_pb2.DeleteConversationRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)
    )
    for call in (
        store.stub.GetConversation(
            store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)
        ),
        store.stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=ids.turn_id)),
        store.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND
    with sqlite3.connect(db_path) as db:
        for table in ("messages", "events", "turns"):
            rows = db.execute(
                f"SELECT conversation_id, COUNT(*) FROM {table} GROUP BY conversation_id"
            ).fetchall()
            assert dict(rows) == {kept.conversation_id: 1 if table == "turns" else 2}, table


# ------------------------------------------------------------------- messages


async def test_append_assigns_gap_free_seqs_across_calls(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    sizes = [2, 3, 1]
    expected_first = 1
    for n in sizes:
        resp = await append(store.stub, conv.id, [text_message(f"m{expected_first + i}") for i in range(n)])
        assert (resp.first_seq, resp.last_seq) == (expected_first, expected_first + n - 1)
        assert [m.seq for m in resp.messages] == list(range(resp.first_seq, resp.last_seq + 1))
        assert all(m.conversation_id == conv.id and m.created_at.seconds > 0 for m in resp.messages)
        expected_first += n

    loaded = await store.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert [m.seq for m in loaded.messages] == [1, 2, 3, 4, 5, 6]
    assert [text_of(m) for m in loaded.messages] == [f"m{i}" for i in range(1, 7)]
    assert loaded.last_seq == 6
    got = await store.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert got.last_seq == 6


async def test_append_ignores_a_caller_supplied_seq(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    forged = text_message("x")
    forged.seq = 99
    resp = await append(store.stub, conv.id, [forged])
    assert [m.seq for m in resp.messages] == [1]


async def test_append_keeps_every_chunk_kind(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    turn = new_id("turn")
    msg = common_pb2.Message(
        role=S.ROLE_ASSISTANT,
        turn_id=turn,
        step_index=3,
        chunks=[
            common_pb2.Chunk(thinking=common_pb2.ThinkingChunk(text="hmm", signature="sig")),
            common_pb2.Chunk(text=common_pb2.TextChunk(text="running ls")),
            common_pb2.Chunk(
                tool_call=common_pb2.ToolCallChunk(
                    id="c1", name="shell", input_json='{"cmd":"ls"}', step_id="s"
                )
            ),
        ],
    )
    result = common_pb2.Message(
        role=S.ROLE_TOOL,
        chunks=[
            common_pb2.Chunk(
                tool_result=common_pb2.ToolResultChunk(
                    tool_call_id="c1", name="shell", content="a\n", is_error=True
                )
            ),
            common_pb2.Chunk(error=common_pb2.ErrorChunk(message="boom", code="tool")),
        ],
    )
    await append(store.stub, conv.id, [msg, result])
    loaded = await store.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert list(loaded.messages[0].chunks) == list(msg.chunks)
    assert (loaded.messages[0].turn_id, loaded.messages[0].step_index) == (turn, 3)
    assert list(loaded.messages[1].chunks) == list(result.chunks)


async def test_twenty_concurrent_appenders_leave_seq_gap_free_and_each_call_contiguous(
    store: RunningStore,
) -> None:
    conv = await new_conversation(store.stub)
    sizes = [1 + i % 3 for i in range(20)]
    responses = await asyncio.gather(
        *(
            append(store.stub, conv.id, [text_message(f"{i}.{j}") for j in range(n)])
            for i, n in enumerate(sizes)
        )
    )
    total = sum(sizes)
    assert sorted(m.seq for r in responses for m in r.messages) == list(range(1, total + 1))

    loaded = await store.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert [m.seq for m in loaded.messages] == list(range(1, total + 1))
    text_at = {m.seq: text_of(m) for m in loaded.messages}
    for i, (n, resp) in enumerate(zip(sizes, responses, strict=True)):
        # Atomic per call: one call's messages are never interleaved with another's.
        assert resp.last_seq - resp.first_seq + 1 == n
        assert [text_at[s] for s in range(resp.first_seq, resp.last_seq + 1)] == [
            f"{i}.{j}" for j in range(n)
        ]


@pytest.mark.parametrize(
    ("after_seq", "limit", "expected"),
    [
        (0, 0, [1, 2, 3, 4, 5]),
        (2, 0, [3, 4, 5]),
        (2, 2, [3, 4]),
        (0, 1, [1]),
        (5, 0, []),
        (9, 0, []),
    ],
)
async def test_load_since(store: RunningStore, after_seq: int, limit: int, expected: list[int]) -> None:
    conv = await new_conversation(store.stub)
    await append(store.stub, conv.id, [text_message(str(i)) for i in range(1, 6)])
    resp = await store.stub.LoadSince(
        store_pb2.LoadSinceRequest(
            tenant_id=TENANT, conversation_id=conv.id, after_seq=after_seq, limit=limit
        )
    )
    assert [m.seq for m in resp.messages] == expected
    assert [text_of(m) for m in resp.messages] == [str(s) for s in expected]
    # The conversation's high-water mark, so a caller paging with a limit knows more remain.
    assert resp.last_seq == 5


# --------------------------------------------------------------------- events


async def test_events_persist_with_append_and_load_after_an_event_seq(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    first = await append(
        store.stub,
        conv.id,
        [text_message("hi")],
        [delta_event(1, "a"), delta_event(2, "b"), delta_event(3, "c")],
    )
    assert (first.first_seq, first.last_seq, first.last_event_seq) == (1, 1, 3)
    # Events alone (the kernel flushing turn_sealed) append no message.
    only_events = await append(store.stub, conv.id, [], [delta_event(4, "d"), delta_event(7, "e")])
    assert (only_events.first_seq, only_events.last_seq, only_events.last_event_seq) == (0, 0, 7)
    assert not only_events.messages

    resp = await store.stub.LoadEvents(
        store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv.id, after_event_seq=2)
    )
    assert [(e.event_seq, e.text_delta.text) for e in resp.events] == [(3, "c"), (4, "d"), (7, "e")]
    assert all(e.conversation_id == conv.id for e in resp.events)
    assert resp.last_event_seq == 7

    limited = await store.stub.LoadEvents(
        store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv.id, after_event_seq=0, limit=2)
    )
    assert [e.event_seq for e in limited.events] == [1, 2]
    assert limited.last_event_seq == 7
    got = await store.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert (got.last_seq, got.last_event_seq) == (1, 7)


@pytest.mark.parametrize(
    "event_seqs",
    [
        pytest.param([3], id="equal-to-last"),
        pytest.param([2], id="below-last"),
        pytest.param([5, 5], id="repeated"),
        pytest.param([6, 4], id="decreasing"),
    ],
)
async def test_bad_event_seq_rejects_the_whole_append(store: RunningStore, event_seqs: list[int]) -> None:
    conv = await new_conversation(store.stub)
    await append(store.stub, conv.id, [text_message("a")], [delta_event(1), delta_event(2), delta_event(3)])
    err = await rpc_error(
        append(store.stub, conv.id, [text_message("b")], [delta_event(s) for s in event_seqs])
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event_seq" in (err.details() or "")
    # Nothing of the failed call was committed: neither its message nor its events.
    loaded = await store.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert [text_of(m) for m in loaded.messages] == ["a"]
    events = await store.stub.LoadEvents(
        store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert [e.event_seq for e in events.events] == [1, 2, 3]


@pytest.mark.parametrize(
    ("megabytes", "code"),
    [(15, grpc.StatusCode.OK), (17, grpc.StatusCode.RESOURCE_EXHAUSTED)],
)
async def test_append_size_cap(store: RunningStore, megabytes: int, code: grpc.StatusCode) -> None:
    conv = await new_conversation(store.stub)
    big = [text_message("x" * (megabytes * MiB))]
    if code == grpc.StatusCode.OK:
        assert (await append(store.stub, conv.id, big)).last_seq == 1
        return
    err = await rpc_error(append(store.stub, conv.id, big, [delta_event(1)]))
    assert err.code() == code
    assert "16 MiB" in (err.details() or "")
    got = await store.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert (got.last_seq, got.last_event_seq) == (0, 0)


# ---------------------------------------------------------------------- turns


async def test_create_turn_defaults_to_queued_and_running_stamps_started_at(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    queued = await store.stub.CreateTurn(
        store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert queued.state == S.TURN_STATE_QUEUED
    assert not queued.HasField("started_at") and queued.created_at.seconds > 0
    running = await store.stub.CreateTurn(
        store_pb2.CreateTurnRequest(
            tenant_id=TENANT, conversation_id=conv.id, state=S.TURN_STATE_RUNNING, agent="coder", cwd="/x"
        )
    )
    assert running.state == S.TURN_STATE_RUNNING and running.HasField("started_at")
    assert (running.agent, running.cwd, running.conversation_id) == ("coder", "/x", conv.id)


async def test_idempotency_key_is_unique_per_conversation(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    other = await new_conversation(store.stub)

    def create(conversation_id: str, key: str) -> Awaitable[common_pb2.Turn]:
        return store.stub.CreateTurn(
            store_pb2.CreateTurnRequest(
                tenant_id=TENANT, conversation_id=conversation_id, idempotency_key=key
            )
        )

    first = await create(conv.id, "send-1")
    err = await rpc_error(create(conv.id, "send-1"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id in (err.details() or "")
    # The same key elsewhere, and no key at all, are not repeats.
    await create(other.id, "send-1")
    await create(conv.id, "")
    await create(conv.id, "")
    listed = await store.stub.ListTurns(store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert len(listed.turns) == 3
    # The key finds the turn it started, and only that one.
    keyed = await store.stub.ListTurns(
        store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv.id, idempotency_key="send-1")
    )
    assert [t.id for t in keyed.turns] == [first.id]
    none = await store.stub.ListTurns(
        store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv.id, idempotency_key="send-2")
    )
    assert list(none.turns) == []


# How to reach each state from queued.
PATH = {
    S.TURN_STATE_QUEUED: [],
    S.TURN_STATE_RUNNING: [S.TURN_STATE_RUNNING],
    S.TURN_STATE_WAITING_FOR_APPROVAL: [S.TURN_STATE_RUNNING, S.TURN_STATE_WAITING_FOR_APPROVAL],
    S.TURN_STATE_RESUMING: [S.TURN_STATE_RUNNING, S.TURN_STATE_WAITING_FOR_APPROVAL, S.TURN_STATE_RESUMING],
    S.TURN_STATE_COMPLETED: [S.TURN_STATE_RUNNING, S.TURN_STATE_COMPLETED],
    S.TURN_STATE_FAILED: [S.TURN_STATE_RUNNING, S.TURN_STATE_FAILED],
    S.TURN_STATE_ABORTED: [S.TURN_STATE_ABORTED],
    S.TURN_STATE_INTERRUPTED: [S.TURN_STATE_RUNNING, S.TURN_STATE_INTERRUPTED],
}


def transition(
    stub: Stub, turn_id: str, to: common_pb2.TurnState.ValueType, **fields: Any
) -> Awaitable[common_pb2.Turn]:
    return stub.TransitionTurn(
        store_pb2.TransitionTurnRequest(tenant_id=TENANT, turn_id=turn_id, to=to, **fields)
    )


@pytest.mark.parametrize("start", list(PATH), ids=common_pb2.TurnState.Name)
async def test_transitions_from_each_state_follow_the_state_machine(
    store: RunningStore, start: common_pb2.TurnState.ValueType
) -> None:
    conv = await new_conversation(store.stub)
    for to in PATH:
        turn = await store.stub.CreateTurn(
            store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id)
        )
        for step in PATH[start]:
            await transition(store.stub, turn.id, step)
        if to in CONTRACT_TRANSITIONS[start]:
            moved = await transition(store.stub, turn.id, to)
            assert moved.state == to
        else:
            err = await rpc_error(transition(store.stub, turn.id, to))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (start, to)
            stayed = await store.stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn.id))
            assert stayed.state == start


async def test_completed_turn_cannot_run_again(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    turn = await store.stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
    await transition(store.stub, turn.id, S.TURN_STATE_RUNNING)
    await transition(store.stub, turn.id, S.TURN_STATE_COMPLETED)
    err = await rpc_error(transition(store.stub, turn.id, S.TURN_STATE_RUNNING))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"turn {turn.id} is completed; cannot move to running" in (err.details() or "")


async def test_transition_stamps_times_and_records_the_outcome(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    turn = await store.stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
    running = await transition(store.stub, turn.id, S.TURN_STATE_RUNNING)
    assert running.HasField("started_at") and not running.HasField("ended_at")
    await transition(store.stub, turn.id, S.TURN_STATE_WAITING_FOR_APPROVAL)
    await transition(store.stub, turn.id, S.TURN_STATE_RESUMING)
    again = await transition(store.stub, turn.id, S.TURN_STATE_RUNNING)
    assert again.started_at == running.started_at  # only the first start counts
    failed = await transition(
        store.stub,
        turn.id,
        S.TURN_STATE_FAILED,
        finish_reason=S.FINISH_REASON_ERROR,
        error_message="provider said 500",
        user_message_seq=4,
    )
    assert (
        failed.HasField("ended_at") and failed.ended_at.ToNanoseconds() >= failed.started_at.ToNanoseconds()
    )
    assert (failed.finish_reason, failed.error_message, failed.user_message_seq) == (
        S.FINISH_REASON_ERROR,
        "provider said 500",
        4,
    )


async def test_transition_with_a_lease_owner_needs_the_lease(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    turn = await store.stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
    err = await rpc_error(transition(store.stub, turn.id, S.TURN_STATE_RUNNING, lease_owner="kernel-1"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not leased to kernel-1" in (err.details() or "")


async def test_list_turns_filters_by_state(store: RunningStore) -> None:
    conv = await new_conversation(store.stub)
    turns = [
        await store.stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
        for _ in range(4)
    ]
    await transition(store.stub, turns[1].id, S.TURN_STATE_RUNNING)
    await transition(store.stub, turns[2].id, S.TURN_STATE_ABORTED)

    async def listed(*states: common_pb2.TurnState.ValueType) -> list[str]:
        resp = await store.stub.ListTurns(
            store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=conv.id, states=states)
        )
        return [t.id for t in resp.turns]

    assert await listed() == [t.id for t in turns]
    assert await listed(S.TURN_STATE_QUEUED) == [turns[0].id, turns[3].id]
    assert await listed(S.TURN_STATE_RUNNING, S.TURN_STATE_ABORTED) == [turns[1].id, turns[2].id]


# ------------------------------------------------------------------ execution


@dataclass(frozen=True)
class Overrides:
    """Which level sets what; ``turn_computer`` None means the request names no turn."""

    ws_computer: str = ""
    conv_computer: str = ""
    turn_computer: str | None = None
    conv_cwd: str = ""
    turn_cwd: str = ""


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(Overrides(), ("", "/srv/ws"), id="nothing-set-local-at-root"),
        pytest.param(Overrides(ws_computer="box"), ("box", "/srv/ws"), id="workspace-default"),
        pytest.param(
            Overrides(ws_computer="box", conv_computer="gpu", conv_cwd="/srv/ws/sub"),
            ("gpu", "/srv/ws/sub"),
            id="conversation-overrides",
        ),
        pytest.param(
            Overrides("box", "gpu", "edge", "/srv/ws/sub", "/tmp/t"),
            ("edge", "/tmp/t"),
            id="turn-overrides-all",
        ),
        pytest.param(Overrides(turn_computer="edge"), ("edge", "/srv/ws"), id="turn-over-local"),
        pytest.param(
            Overrides("box", "gpu", "", "/srv/ws/sub", ""),
            ("gpu", "/srv/ws/sub"),
            id="turn-without-overrides",
        ),
    ],
)
async def test_resolve_execution_precedence(
    store: RunningStore, given: Overrides, expected: tuple[str, str]
) -> None:
    ws = await store.stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(
            tenant_id=TENANT, name="w", root="/srv/ws", default_computer_id=given.ws_computer
        )
    )
    conv = await new_conversation(
        store.stub, workspace_id=ws.id, computer_id=given.conv_computer, cwd=given.conv_cwd
    )
    turn_id = ""
    if given.turn_computer is not None:
        turn = await store.stub.CreateTurn(
            store_pb2.CreateTurnRequest(
                tenant_id=TENANT, conversation_id=conv.id, computer_id=given.turn_computer, cwd=given.turn_cwd
            )
        )
        turn_id = turn.id
    where = await store.stub.ResolveExecution(
        store_pb2.ResolveExecutionRequest(tenant_id=TENANT, conversation_id=conv.id, turn_id=turn_id)
    )
    assert (where.computer_id, where.cwd) == expected
    assert where.workspace_root == "/srv/ws"


async def test_a_workspace_confines_tools_only_when_created_or_updated_to(store: RunningStore) -> None:
    plain = await store.stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="plain", root="/srv/plain")
    )
    confined = await store.stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="c", root="/srv/c", confine_tools=True)
    )
    assert (plain.confine_tools, confined.confine_tools) == (False, True)

    async def resolved(ws: common_pb2.Workspace) -> tuple[str, bool]:
        conv = await new_conversation(store.stub, workspace_id=ws.id, cwd="/elsewhere")
        where = await store.stub.ResolveExecution(
            store_pb2.ResolveExecutionRequest(tenant_id=TENANT, conversation_id=conv.id)
        )
        return where.workspace_root, where.confine_tools

    assert await resolved(plain) == ("/srv/plain", False)
    assert await resolved(confined) == ("/srv/c", True)
    # An update that leaves confine_tools out leaves it; one that sets it, sets it.
    renamed = await store.stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(tenant_id=TENANT, workspace_id=confined.id, name="renamed")
    )
    assert renamed.confine_tools is True
    opened = await store.stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(tenant_id=TENANT, workspace_id=confined.id, confine_tools=False)
    )
    assert opened.confine_tools is False
    assert await resolved(opened) == ("/srv/c", False)
    got = await store.stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=plain.id)
    )
    assert got.confine_tools is False


async def test_clearing_the_conversation_override_falls_back_to_the_workspace(store: RunningStore) -> None:
    ws = await store.stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(
            tenant_id=TENANT, name="w", root="/srv/ws", default_computer_id="box"
        )
    )
    conv = await new_conversation(store.stub, workspace_id=ws.id, computer_id="gpu")
    await store.stub.UpdateConversation(
        store_pb2.UpdateConversationRequest(tenant_id=TENANT, conversation_id=conv.id, computer_id="")
    )
    where = await store.stub.ResolveExecution(
        store_pb2.ResolveExecutionRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert where.computer_id == "box"


# ------------------------------------------------------- tenancy and errors


if TYPE_CHECKING:
    Call: TypeAlias = Callable[[Stub, Seeded, str], Awaitable[object]]
    Invalid: TypeAlias = Callable[[Stub, Seeded], Awaitable[object]]

# Every scoped RPC, called with the seeded rows' ids and a given tenant.
SCOPED: dict[str, Call] = {
    "GetWorkspace": lambda s, i, t: s.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=t, workspace_id=i.workspace_id)
    ),
    "UpdateWorkspace": lambda s, i, t: s.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(tenant_id=t, workspace_id=i.workspace_id, name="stolen")
    ),
    "CreateConversation": lambda s, i, t: s.CreateConversation(
        store_pb2.CreateConversationRequest(tenant_id=t, workspace_id=i.workspace_id)
    ),
    "ListConversations": lambda s, i, t: s.ListConversations(
        store_pb2.ListConversationsRequest(tenant_id=t, workspace_id=i.workspace_id)
    ),
    "GetConversation": lambda s, i, t: s.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=t, conversation_id=i.conversation_id)
    ),
    "UpdateConversation": lambda s, i, t: s.UpdateConversation(
        store_pb2.UpdateConversationRequest(tenant_id=t, conversation_id=i.conversation_id, title="stolen")
    ),
    "DeleteConversation": lambda s, i, t: s.DeleteConversation(
        store_pb2.DeleteConversationRequest(tenant_id=t, conversation_id=i.conversation_id)
    ),
    "Append": lambda s, i, t: append(s, i.conversation_id, [text_message("stolen")], tenant_id=t),
    "Load": lambda s, i, t: s.Load(store_pb2.LoadRequest(tenant_id=t, conversation_id=i.conversation_id)),
    "LoadSince": lambda s, i, t: s.LoadSince(
        store_pb2.LoadSinceRequest(tenant_id=t, conversation_id=i.conversation_id)
    ),
    "LoadEvents": lambda s, i, t: s.LoadEvents(
        store_pb2.LoadEventsRequest(tenant_id=t, conversation_id=i.conversation_id)
    ),
    "CreateTurn": lambda s, i, t: s.CreateTurn(
        store_pb2.CreateTurnRequest(tenant_id=t, conversation_id=i.conversation_id)
    ),
    "GetTurn": lambda s, i, t: s.GetTurn(store_pb2.GetTurnRequest(tenant_id=t, turn_id=i.turn_id)),
    "ListTurns": lambda s, i, t: s.ListTurns(
        store_pb2.ListTurnsRequest(tenant_id=t, conversation_id=i.conversation_id)
    ),
    "TransitionTurn": lambda s, i, t: s.TransitionTurn(
        store_pb2.TransitionTurnRequest(tenant_id=t, turn_id=i.turn_id, to=S.TURN_STATE_ABORTED)
    ),
    "ResolveExecution": lambda s, i, t: s.ResolveExecution(
        store_pb2.ResolveExecutionRequest(tenant_id=t, conversation_id=i.conversation_id, turn_id=i.turn_id)
    ),
}


@pytest.mark.parametrize("method", list(SCOPED))
async def test_another_tenant_gets_not_found_and_changes_nothing(store: RunningStore, method: str) -> None:
    ids = await seed(store.stub)
    err = await rpc_error(SCOPED[method](store.stub, ids, OTHER_TENANT))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    # The owner still sees everything as it was.
    ws = await store.stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=ids.workspace_id)
    )
    assert ws.name == "w"
    conv = await store.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)
    )
    assert (conv.title, conv.last_seq, conv.last_event_seq) == ("", 2, 2)
    turn = await store.stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=ids.turn_id))
    assert turn.state == S.TURN_STATE_QUEUED
    listed = await store.stub.ListTurns(
        store_pb2.ListTurnsRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)
    )
    assert len(listed.turns) == 1
    theirs = await store.stub.ListConversations(store_pb2.ListConversationsRequest(tenant_id=OTHER_TENANT))
    assert not theirs.conversations


@pytest.mark.parametrize("method", list(SCOPED))
async def test_unknown_ids_are_not_found(store: RunningStore, method: str) -> None:
    await seed(store.stub)
    unknown = Seeded(new_id("ws"), new_id("conv"), new_id("turn"))
    err = await rpc_error(SCOPED[method](store.stub, unknown, TENANT))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in (err.details() or "")


@pytest.mark.parametrize("method", list(SCOPED))
async def test_empty_tenant_is_invalid(store: RunningStore, method: str) -> None:
    ids = await seed(store.stub)
    err = await rpc_error(SCOPED[method](store.stub, ids, ""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_id" in (err.details() or "")


def _append_msgs(*messages: common_pb2.Message) -> Invalid:
    return lambda s, i: append(s, i.conversation_id, list(messages))


INVALID: dict[str, tuple[Invalid, str]] = {
    "malformed-conversation-id": (
        lambda s, i: s.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id="conv_nope")),
        "conversation_id",
    ),
    "missing-conversation-id": (
        lambda s, i: s.Load(store_pb2.LoadRequest(tenant_id=TENANT)),
        "conversation_id is required",
    ),
    "turn-id-of-wrong-kind": (
        lambda s, i: s.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=i.conversation_id)),
        "turn_id",
    ),
    "empty-append": (lambda s, i: append(s, i.conversation_id, []), "at least one message or event"),
    "message-without-chunks": (
        _append_msgs(common_pb2.Message(role=S.ROLE_USER)),
        "no chunks",
    ),
    "message-without-role": (
        _append_msgs(text_message("x", role=S.ROLE_UNSPECIFIED)),
        "role",
    ),
    "empty-chunk": (
        _append_msgs(common_pb2.Message(role=S.ROLE_USER, chunks=[common_pb2.Chunk()])),
        "empty",
    ),
    "message-for-another-conversation": (
        _append_msgs(
            common_pb2.Message(
                conversation_id=new_id("conv"),
                role=S.ROLE_USER,
                chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text="x"))],
            )
        ),
        "belongs to conversation",
    ),
    "event-without-kind": (
        lambda s, i: append(s, i.conversation_id, [], [common_pb2.AgentEvent(event_seq=9)]),
        "no kind",
    ),
    "negative-after-seq": (
        lambda s, i: s.LoadSince(
            store_pb2.LoadSinceRequest(tenant_id=TENANT, conversation_id=i.conversation_id, after_seq=-1)
        ),
        "after_seq",
    ),
    "negative-page-size": (
        lambda s, i: s.ListConversations(store_pb2.ListConversationsRequest(tenant_id=TENANT, page_size=-1)),
        "page_size",
    ),
    "foreign-page-token": (
        lambda s, i: s.ListConversations(
            store_pb2.ListConversationsRequest(tenant_id=TENANT, page_token="!!")
        ),
        "page_token",
    ),
    "workspace-without-root": (
        lambda s, i: s.CreateWorkspace(store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w")),
        "root is required",
    ),
    "workspace-renamed-to-nothing": (
        lambda s, i: s.UpdateWorkspace(
            store_pb2.UpdateWorkspaceRequest(tenant_id=TENANT, workspace_id=i.workspace_id, name="")
        ),
        "name",
    ),
    "turn-created-completed": (
        lambda s, i: s.CreateTurn(
            store_pb2.CreateTurnRequest(
                tenant_id=TENANT, conversation_id=i.conversation_id, state=S.TURN_STATE_COMPLETED
            )
        ),
        "queued or running",
    ),
    "transition-to-nothing": (
        lambda s, i: s.TransitionTurn(store_pb2.TransitionTurnRequest(tenant_id=TENANT, turn_id=i.turn_id)),
        "to must be a turn state",
    ),
    "transition-to-unknown-state": (
        lambda s, i: s.TransitionTurn(
            store_pb2.TransitionTurnRequest(tenant_id=TENANT, turn_id=i.turn_id, to=42)  # type: ignore[arg-type]
        ),
        "turn state",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_arguments(store: RunningStore, case: str) -> None:
    ids = await seed(store.stub)
    call, needle = INVALID[case]
    err = await rpc_error(call(store.stub, ids))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    conv = await store.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)
    )
    assert (conv.last_seq, conv.last_event_seq) == (2, 2)


def test_the_servicer_answers_every_rpc_of_the_contract() -> None:
    # A method left to the generated base class answers UNIMPLEMENTED with "Method not implemented!".
    methods = store_pb2.DESCRIPTOR.services_by_name["ConversationStore"].methods_by_name
    inherited = [
        name
        for name in methods
        if getattr(StoreServicer, name) is getattr(store_pb2_grpc.ConversationStoreServicer, name)
    ]
    assert inherited == []


# ---------------------------------------------------------------- lifecycle


async def test_data_survives_a_restart(store_cfg: StoreConfig) -> None:
    first = await RunningStore.start(store_cfg)
    try:
        ids = await seed(first.stub)
        await transition(first.stub, ids.turn_id, S.TURN_STATE_RUNNING)
    finally:
        await first.stop()

    second = await RunningStore.start(store_cfg)
    try:
        loaded = await second.stub.Load(
            store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)
        )
        assert [(m.seq, text_of(m)) for m in loaded.messages] == [(1, "a"), (2, "b")]
        events = await second.stub.LoadEvents(
            store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=ids.conversation_id)
        )
        assert [e.event_seq for e in events.events] == [1, 2]
        turn = await second.stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=ids.turn_id))
        assert turn.state == S.TURN_STATE_RUNNING
        # Numbering carries on where it stopped.
        resp = await append(second.stub, ids.conversation_id, [text_message("c")], [delta_event(3)])
        assert (resp.first_seq, resp.last_event_seq) == (3, 3)
    finally:
        await second.stop()


@pytest.mark.sqlite_only
async def test_stop_closes_the_database(store_cfg: StoreConfig, db_path: Path) -> None:
    running = await RunningStore.start(store_cfg)
    try:
        await seed(running.stub)
        wal = db_path.with_name(db_path.name + "-wal")
        assert wal.exists()  # WAL mode, with a connection open
    finally:
        await running.stop()
    # SQLite checkpoints and removes the WAL when its last connection closes.
    assert not wal.exists()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2


@pytest.mark.sqlite_only
async def test_two_servers_starting_on_one_database_migrate_once(
    store_cfg: StoreConfig, db_path: Path
) -> None:
    first = await RunningStore.start(store_cfg)
    try:
        second = await RunningStore.start(store_cfg)
        try:
            conv = await new_conversation(first.stub)
            got = await second.stub.GetConversation(
                store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
            )
            assert got.id == conv.id
        finally:
            await second.stop()
    finally:
        await first.stop()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [
            (version,) for version, _ in MIGRATIONS
        ]


@pytest.mark.parametrize(
    "url",
    ["mongodb://root:hunter2@db/dispatch", "mysql://root:hunter2@db/x", "/var/lib/dispatch.db"],
)
async def test_an_unsupported_database_url_is_a_config_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as info:
        await start_store(StoreConfig(database_url=url, default_workspace_root=str(tmp_path)))
    assert "store.database_url" in str(info.value)
    assert "hunter2" not in str(info.value)
