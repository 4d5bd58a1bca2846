"""The conversation store over gRPC on a real PostgreSQL server: a real server on port 0,
a fresh database per test, a real channel."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest

from dispatch.shared.config import ConfigError, StoreConfig
from dispatch.shared.errors import FailedPrecondition, NotFound, Unavailable
from dispatch.store import postgres as postgres_backend
from dispatch.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore
from dispatch.store.server import open_store
from dispatch.v1 import common_pb2, store_pb2
from tests.store.harness import (
    OTHER_TENANT,
    TENANT,
    V4_DECIDED,
    V4_PENDING,
    FakeClock,
    RunningStore,
    append,
    check_upgraded_from_v4,
    delta_event,
    new_conversation,
    text_message,
    text_of,
)

if TYPE_CHECKING:
    from tests.store.harness import Stub

S = common_pb2

MiB = 1024 * 1024


@pytest.fixture
def pg_cfg(postgres_url: str, tmp_path: Path) -> StoreConfig:
    return StoreConfig(
        listen="127.0.0.1:0",
        database_url=postgres_url,
        default_workspace_root=str(tmp_path / "default-root"),
    )


@pytest.fixture
async def pg(pg_cfg: StoreConfig) -> AsyncIterator[RunningStore]:
    running = await RunningStore.start(pg_cfg)
    try:
        yield running
    finally:
        await running.stop()


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def transition(stub: Stub, turn_id: str, to: common_pb2.TurnState.ValueType) -> Awaitable[common_pb2.Turn]:
    return stub.TransitionTurn(store_pb2.TransitionTurnRequest(tenant_id=TENANT, turn_id=turn_id, to=to))


async def test_first_conversation_creates_the_tenant_default_workspace(
    pg: RunningStore, pg_cfg: StoreConfig
) -> None:
    first, second = await asyncio.gather(
        new_conversation(pg.stub, title="one"), new_conversation(pg.stub, title="two")
    )
    # Two concurrent first conversations still share one default workspace.
    assert first.workspace_id and first.workspace_id == second.workspace_id
    ws = await pg.stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=first.workspace_id)
    )
    assert (ws.name, ws.root, ws.tenant_id) == ("default", pg_cfg.default_workspace_root, TENANT)
    listed = await pg.stub.ListWorkspaces(store_pb2.ListWorkspacesRequest(tenant_id=TENANT))
    assert [w.id for w in listed.workspaces] == [ws.id]


async def test_append_assigns_gap_free_seqs_across_calls(pg: RunningStore) -> None:
    conv = await new_conversation(pg.stub)
    first = await append(pg.stub, conv.id, [text_message("a"), text_message("b")])
    second = await append(pg.stub, conv.id, [text_message("c")])
    third = await append(pg.stub, conv.id, [text_message("d"), text_message("e"), text_message("f")])
    assert [(r.first_seq, r.last_seq) for r in (first, second, third)] == [(1, 2), (3, 3), (4, 6)]
    assert [m.seq for m in third.messages] == [4, 5, 6]
    assert all(m.conversation_id == conv.id and m.created_at.seconds > 0 for m in third.messages)
    loaded = await pg.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert [(m.seq, text_of(m)) for m in loaded.messages] == list(enumerate("abcdef", start=1))
    got = await pg.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert got.last_seq == 6


async def test_twenty_concurrent_appenders_leave_seq_gap_free_and_each_call_contiguous(
    pg: RunningStore,
) -> None:
    conv = await new_conversation(pg.stub)
    sizes = [1 + i % 3 for i in range(20)]
    responses = await asyncio.gather(
        *(append(pg.stub, conv.id, [text_message(f"{i}.{j}") for j in range(n)]) for i, n in enumerate(sizes))
    )
    total = sum(sizes)
    assert sorted(m.seq for r in responses for m in r.messages) == list(range(1, total + 1))
    loaded = await pg.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert [m.seq for m in loaded.messages] == list(range(1, total + 1))
    text_at = {m.seq: text_of(m) for m in loaded.messages}
    for i, (n, resp) in enumerate(zip(sizes, responses, strict=True)):
        assert resp.last_seq - resp.first_seq + 1 == n
        assert [text_at[s] for s in range(resp.first_seq, resp.last_seq + 1)] == [
            f"{i}.{j}" for j in range(n)
        ]


async def test_events_persist_with_append_and_load_after_an_event_seq(pg: RunningStore) -> None:
    conv = await new_conversation(pg.stub)
    first = await append(
        pg.stub,
        conv.id,
        [text_message("hi")],
        [delta_event(1, "a"), delta_event(2, "b"), delta_event(3, "c")],
    )
    assert (first.first_seq, first.last_seq, first.last_event_seq) == (1, 1, 3)
    only_events = await append(pg.stub, conv.id, [], [delta_event(4, "d"), delta_event(7, "e")])
    assert (only_events.first_seq, only_events.last_seq, only_events.last_event_seq) == (0, 0, 7)

    resp = await pg.stub.LoadEvents(
        store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv.id, after_event_seq=2)
    )
    assert [(e.event_seq, e.text_delta.text) for e in resp.events] == [(3, "c"), (4, "d"), (7, "e")]
    assert all(e.conversation_id == conv.id and e.time.seconds > 0 for e in resp.events)
    assert resp.last_event_seq == 7
    limited = await pg.stub.LoadEvents(
        store_pb2.LoadEventsRequest(tenant_id=TENANT, conversation_id=conv.id, limit=2)
    )
    assert [e.event_seq for e in limited.events] == [1, 2]

    # An event_seq that does not rise rejects the whole append, messages included.
    err = await rpc_error(append(pg.stub, conv.id, [text_message("no")], [delta_event(7)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    got = await pg.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert (got.last_seq, got.last_event_seq) == (1, 7)


@pytest.mark.parametrize(
    ("after_seq", "limit", "expected"),
    [(0, 0, [1, 2, 3, 4, 5]), (2, 0, [3, 4, 5]), (2, 2, [3, 4]), (0, 1, [1]), (5, 0, []), (9, 0, [])],
)
async def test_load_since(pg: RunningStore, after_seq: int, limit: int, expected: list[int]) -> None:
    conv = await new_conversation(pg.stub)
    await append(pg.stub, conv.id, [text_message(str(i)) for i in range(1, 6)])
    resp = await pg.stub.LoadSince(
        store_pb2.LoadSinceRequest(
            tenant_id=TENANT, conversation_id=conv.id, after_seq=after_seq, limit=limit
        )
    )
    assert [m.seq for m in resp.messages] == expected
    assert [text_of(m) for m in resp.messages] == [str(s) for s in expected]
    assert resp.last_seq == 5


async def test_another_tenant_gets_not_found_and_changes_nothing(pg: RunningStore) -> None:
    conv = await new_conversation(pg.stub)
    await append(pg.stub, conv.id, [text_message("mine")])
    turn = await pg.stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
    attempts: list[Awaitable[object]] = [
        pg.stub.GetConversation(
            store_pb2.GetConversationRequest(tenant_id=OTHER_TENANT, conversation_id=conv.id)
        ),
        append(pg.stub, conv.id, [text_message("theirs")], tenant_id=OTHER_TENANT),
        pg.stub.LoadSince(store_pb2.LoadSinceRequest(tenant_id=OTHER_TENANT, conversation_id=conv.id)),
        pg.stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=OTHER_TENANT, turn_id=turn.id)),
        pg.stub.GetWorkspace(
            store_pb2.GetWorkspaceRequest(tenant_id=OTHER_TENANT, workspace_id=conv.workspace_id)
        ),
        pg.stub.DeleteConversation(
            store_pb2.DeleteConversationRequest(tenant_id=OTHER_TENANT, conversation_id=conv.id)
        ),
    ]
    for attempt in attempts:
        err = await rpc_error(attempt)
        assert err.code() == grpc.StatusCode.NOT_FOUND
    loaded = await pg.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
    assert [text_of(m) for m in loaded.messages] == ["mine"]
    theirs = await pg.stub.ListConversations(store_pb2.ListConversationsRequest(tenant_id=OTHER_TENANT))
    assert not theirs.conversations


async def test_duplicate_idempotency_key_is_already_exists(pg: RunningStore) -> None:
    conv = await new_conversation(pg.stub)
    other = await new_conversation(pg.stub)

    def create(conversation_id: str) -> Awaitable[common_pb2.Turn]:
        return pg.stub.CreateTurn(
            store_pb2.CreateTurnRequest(
                tenant_id=TENANT, conversation_id=conversation_id, idempotency_key="k1"
            )
        )

    first = await create(conv.id)
    err = await rpc_error(create(conv.id))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id in (err.details() or "")
    # The same key in another conversation is a different turn.
    assert (await create(other.id)).id != first.id
    # Racing creators: exactly one wins, the others name the winner.
    raced = await asyncio.gather(
        *(
            pg.stub.CreateTurn(
                store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id, idempotency_key="race")
            )
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    won = [r for r in raced if isinstance(r, common_pb2.Turn)]
    lost = [r for r in raced if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 7
    assert all(e.code() == grpc.StatusCode.ALREADY_EXISTS and won[0].id in (e.details() or "") for e in lost)


async def test_completed_turn_cannot_run_again(pg: RunningStore) -> None:
    conv = await new_conversation(pg.stub)
    turn = await pg.stub.CreateTurn(store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id))
    running = await transition(pg.stub, turn.id, S.TURN_STATE_RUNNING)
    assert running.HasField("started_at")
    done = await transition(pg.stub, turn.id, S.TURN_STATE_COMPLETED)
    assert done.HasField("ended_at")
    err = await rpc_error(transition(pg.stub, turn.id, S.TURN_STATE_RUNNING))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "completed" in (err.details() or "")
    stayed = await pg.stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn.id))
    assert stayed.state == S.TURN_STATE_COMPLETED


async def test_oversize_append_is_resource_exhausted_and_changes_nothing(pg: RunningStore) -> None:
    conv = await new_conversation(pg.stub)
    err = await rpc_error(append(pg.stub, conv.id, [text_message("x" * (17 * MiB))], [delta_event(1)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "16 MiB" in (err.details() or "")
    got = await pg.stub.GetConversation(
        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
    )
    assert (got.last_seq, got.last_event_seq) == (0, 0)


@dataclass(frozen=True)
class Overrides:
    ws_computer: str = ""
    conv_computer: str = ""
    conv_cwd: str = ""
    # (computer_id, cwd) of a turn, or no turn at all.
    turn: tuple[str, str] | None = None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(Overrides(), ("", "/srv/ws"), id="nothing-set-local-at-root"),
        pytest.param(Overrides(ws_computer="box"), ("box", "/srv/ws"), id="workspace-default"),
        pytest.param(
            Overrides("box", "gpu", "/srv/ws/sub"), ("gpu", "/srv/ws/sub"), id="conversation-overrides"
        ),
        pytest.param(
            Overrides("box", "gpu", "/srv/ws/sub", ("edge", "/tmp/t")),
            ("edge", "/tmp/t"),
            id="turn-overrides",
        ),
        pytest.param(Overrides(turn=("edge", "")), ("edge", "/srv/ws"), id="turn-over-local"),
        pytest.param(
            Overrides("box", "gpu", "/srv/ws/sub", ("", "")),
            ("gpu", "/srv/ws/sub"),
            id="turn-without-overrides",
        ),
    ],
)
async def test_resolve_execution_precedence(
    pg: RunningStore, given: Overrides, expected: tuple[str, str]
) -> None:
    ws = await pg.stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(
            tenant_id=TENANT, name="w", root="/srv/ws", default_computer_id=given.ws_computer
        )
    )
    conv = await new_conversation(
        pg.stub, workspace_id=ws.id, computer_id=given.conv_computer, cwd=given.conv_cwd
    )
    turn_id = ""
    if given.turn is not None:
        computer_id, cwd = given.turn
        created = await pg.stub.CreateTurn(
            store_pb2.CreateTurnRequest(
                tenant_id=TENANT, conversation_id=conv.id, computer_id=computer_id, cwd=cwd
            )
        )
        turn_id = created.id
    where = await pg.stub.ResolveExecution(
        store_pb2.ResolveExecutionRequest(tenant_id=TENANT, conversation_id=conv.id, turn_id=turn_id)
    )
    assert (where.computer_id, where.cwd, where.workspace_root) == (*expected, "/srv/ws")


async def test_data_survives_a_restart(pg_cfg: StoreConfig) -> None:
    first = await RunningStore.start(pg_cfg)
    try:
        conv = await new_conversation(first.stub, title="kept")
        await append(first.stub, conv.id, [text_message("a"), text_message("b")], [delta_event(1)])
        turn = await first.stub.CreateTurn(
            store_pb2.CreateTurnRequest(tenant_id=TENANT, conversation_id=conv.id)
        )
    finally:
        await first.stop()
    second = await RunningStore.start(pg_cfg)
    try:
        got = await second.stub.GetConversation(
            store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv.id)
        )
        assert (got.title, got.last_seq, got.last_event_seq) == ("kept", 2, 1)
        loaded = await second.stub.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv.id))
        assert [text_of(m) for m in loaded.messages] == ["a", "b"]
        assert (
            await second.stub.GetTurn(store_pb2.GetTurnRequest(tenant_id=TENANT, turn_id=turn.id))
        ).id == turn.id
        # Seqs continue where they stopped.
        assert (await append(second.stub, conv.id, [text_message("c")])).first_seq == 3
    finally:
        await second.stop()


async def test_migrations_run_twice_and_concurrently_are_a_no_op(postgres_url: str) -> None:
    first, second = await asyncio.gather(
        PostgresStore.open(postgres_url, default_workspace_root="/r"),
        PostgresStore.open(postgres_url, default_workspace_root="/r"),
    )
    try:
        conv = await first.create_conversation(TENANT)
        assert await first.migrate() == 0
        assert await second.migrate() == 0
        assert await first.schema_version() == SCHEMA_VERSION
        # Nothing was dropped or recreated by the second run.
        assert (await second.get_conversation(TENANT, conv.id)).id == conv.id
    finally:
        await first.close()
        await second.close()
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cur = await conn.execute("SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in await cur.fetchall()] == list(range(1, SCHEMA_VERSION + 1))


async def test_a_version_3_database_upgrades_to_durable_turns(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", MIGRATIONS[:3])
    monkeypatch.setattr(postgres_backend, "SCHEMA_VERSION", 3)
    await (await PostgresStore.open(postgres_url, default_workspace_root="/w")).close()
    # Rows as version 3's code wrote them: events up to 7, a turn leased (and expired), one ended.
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in await cur.fetchall()] == [1, 2, 3]
        await conn.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, is_default, confine_tools, created_at)"
            " VALUES ('ws_v3', %s, 'default', '/w', TRUE, TRUE, 1)",
            (TENANT,),
        )
        await conn.execute(
            "INSERT INTO conversations (id, tenant_id, workspace_id, last_seq, last_event_seq,"
            " created_at, updated_at) VALUES ('conv_v3', %s, 'ws_v3', 2, 7, 1, 1)",
            (TENANT,),
        )
        await conn.execute(
            "INSERT INTO turns (id, tenant_id, conversation_id, state, lease_owner, lease_expires_at,"
            " created_at, started_at) VALUES ('turn_v3', %s, 'conv_v3', %s, 'k-old', 5, 1, 1)",
            (TENANT, S.TURN_STATE_RUNNING),
        )
        await conn.execute(
            "INSERT INTO turns (id, tenant_id, conversation_id, state, created_at, ended_at)"
            " VALUES ('turn_v3_done', %s, 'conv_v3', %s, 2, 2)",
            (TENANT, S.TURN_STATE_COMPLETED),
        )

    monkeypatch.undo()
    # Two stores at once: migration 4 is applied once, under the lock.
    first, second = await asyncio.gather(
        PostgresStore.open(postgres_url, default_workspace_root="/w"),
        PostgresStore.open(postgres_url, default_workspace_root="/w"),
    )
    try:
        conv = await first.get_conversation(TENANT, "conv_v3")
        assert (conv.last_event_seq, conv.reserved_event_seq) == (7, 7)
        turn = await first.get_turn(TENANT, "turn_v3")
        assert (turn.lease_owner, turn.lease_epoch, turn.attempts) == ("k-old", 0, 0)
        assert [t.id for t in await second.list_expired_leases()] == ["turn_v3"]
        claimed = await second.claim_lease(TENANT, "turn_v3", "k-new", datetime.timedelta(seconds=5))
        assert (claimed.lease_owner, claimed.lease_epoch, claimed.attempts) == ("k-new", 1, 1)
        assert await first.migrate() == 0
    finally:
        await first.close()
        await second.close()
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cur = await conn.execute("SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in await cur.fetchall()] == [v for v, _ in MIGRATIONS]
        cur = await conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'turns'")
        indexes = {r[0] for r in await cur.fetchall()}
    assert {"turns_unended_by_lease_expiry", "turns_unended_by_conversation"} <= indexes
    assert "turns_by_lease_expiry" not in indexes


async def test_a_version_4_database_upgrades_to_approvals_and_permission_rules(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", MIGRATIONS[:4])
    monkeypatch.setattr(postgres_backend, "SCHEMA_VERSION", 4)
    await (await PostgresStore.open(postgres_url, default_workspace_root="/w")).close()
    # Rows as version 4's code wrote them: a workspace, a conversation, a leased turn and two
    # approvals, one pending and one decided.
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in await cur.fetchall()] == [1, 2, 3, 4]
        await conn.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, is_default, confine_tools, created_at)"
            " VALUES ('ws_v4', %s, 'default', '/w', TRUE, TRUE, 1)",
            (TENANT,),
        )
        await conn.execute(
            "INSERT INTO conversations (id, tenant_id, workspace_id, created_at, updated_at)"
            " VALUES ('conv_v4', %s, 'ws_v4', 1, 1)",
            (TENANT,),
        )
        await conn.execute(
            "INSERT INTO turns (id, tenant_id, conversation_id, state, lease_owner, lease_expires_at,"
            " lease_epoch, attempts, created_at, started_at) VALUES ('turn_v4', %s, 'conv_v4', %s, 'k', 5,"
            " 1, 1, 1, 1)",
            (TENANT, S.TURN_STATE_WAITING_FOR_APPROVAL),
        )
        for approval in (V4_PENDING, V4_DECIDED):
            await conn.execute(
                "INSERT INTO approvals (id, tenant_id, conversation_id, decision, created_at, body)"
                " VALUES (%s, %s, 'conv_v4', %s, %s, %s)",
                (
                    approval.id,
                    TENANT,
                    approval.decision,
                    approval.created_at.ToNanoseconds(),
                    approval.SerializeToString(),
                ),
            )

    monkeypatch.undo()
    # Two stores at once: migration 5 is applied once, under the lock.
    first, second = await asyncio.gather(
        PostgresStore.open(postgres_url, default_workspace_root="/w"),
        PostgresStore.open(postgres_url, default_workspace_root="/w"),
    )
    try:
        await check_upgraded_from_v4(first)
        assert await first.migrate() == 0 and await second.migrate() == 0
        assert (await second.get_workspace(TENANT, "ws_v4")).permissions[0].pattern == "rm *"
    finally:
        await first.close()
        await second.close()
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cur = await conn.execute("SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in await cur.fetchall()] == [v for v, _ in MIGRATIONS]
        cur = await conn.execute("SELECT decided_by, remember FROM approvals WHERE id = %s", (V4_PENDING.id,))
        # The copies are written with the body.
        assert await cur.fetchall() == [("key_v5", True)]


async def test_open_store_takes_both_url_schemes(postgres_url: str) -> None:
    assert postgres_url.startswith(("postgresql://", "postgres://"))
    _, rest = postgres_url.split("://", 1)
    for scheme in ("postgresql", "postgres"):
        store = await open_store(f"{scheme}://{rest}", default_workspace_root="/r")
        try:
            assert isinstance(store, PostgresStore)
        finally:
            await store.close()


async def test_an_unreachable_server_is_unavailable_without_the_password() -> None:
    with pytest.raises(Unavailable) as info:
        # Port 1 on loopback: nothing listens there.
        await open_store("postgresql://dispatch:s3cret-pw@127.0.0.1:1/db", default_workspace_root="/r")
    assert "s3cret-pw" not in str(info.value)
    assert "127.0.0.1" in str(info.value)


async def test_a_malformed_url_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        await open_store("postgresql://u:s3cret-pw@h/db?bogus_option=1", default_workspace_root="/r")
    assert "store.database_url" in str(info.value)
    assert "s3cret-pw" not in str(info.value)


async def test_a_closed_store_is_unavailable(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url, default_workspace_root="/r")
    await store.close()
    await store.close()
    with pytest.raises(Unavailable):
        await store.create_conversation(TENANT)


# ------------------------------------------------- leases, metrics, queue, approvals, keys


@pytest.fixture
async def backend(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, FakeClock]]:
    clock = FakeClock()
    store = await PostgresStore.open(postgres_url, default_workspace_root="/r", clock=clock)
    try:
        yield store, clock
    finally:
        await store.close()


async def test_leases_claim_renew_expire_and_release(backend: tuple[PostgresStore, FakeClock]) -> None:
    store, clock = backend
    conv = await store.create_conversation(TENANT)
    turn = await store.create_turn(TENANT, conv.id, state=S.TURN_STATE_RUNNING)
    ttl = datetime.timedelta(seconds=30)
    held = await store.claim_lease(TENANT, turn.id, "k1", ttl)
    assert held.lease_owner == "k1"
    with pytest.raises(FailedPrecondition, match="leased to k1"):
        await store.claim_lease(TENANT, turn.id, "k2", ttl)
    clock.advance(20)
    await store.renew_lease(TENANT, turn.id, "k1", ttl)
    clock.advance(20)
    assert await store.list_expired_leases() == []
    clock.advance(20)
    assert [t.id for t in await store.list_expired_leases()] == [turn.id]
    # Expired but not claimed by anyone else: the holder may still renew.
    await store.renew_lease(TENANT, turn.id, "k1", ttl)
    clock.advance(31)
    assert (await store.claim_lease(TENANT, turn.id, "k2", ttl)).lease_owner == "k2"
    with pytest.raises(FailedPrecondition, match=r"^lease lost:"):
        await store.renew_lease(TENANT, turn.id, "k1", ttl)
    assert (await store.release_lease(TENANT, turn.id, "k2")).lease_owner == ""
    with pytest.raises(NotFound):
        await store.claim_lease(OTHER_TENANT, turn.id, "k3", ttl)


async def test_reconcile_closes_dangling_tool_calls_once(backend: tuple[PostgresStore, FakeClock]) -> None:
    store, _ = backend
    conv = await store.create_conversation(TENANT)
    call = common_pb2.Chunk(tool_call=common_pb2.ToolCallChunk(id="c1", name="shell", input_json="{}"))
    await store.append(
        TENANT, conv.id, [common_pb2.Message(role=S.ROLE_ASSISTANT, chunks=[call], turn_id="t")]
    )
    closed = await store.reconcile(TENANT, conv.id)
    assert [m.seq for m in closed] == [2]
    assert closed[0].chunks[0].tool_result.tool_call_id == "c1" and closed[0].chunks[0].tool_result.is_error
    assert await store.reconcile(TENANT, conv.id) == []
    assert (await store.get_conversation(TENANT, conv.id)).last_seq == 2


async def test_queue_metrics_approvals_and_api_keys(backend: tuple[PostgresStore, FakeClock]) -> None:
    store, _ = backend
    conv = await store.create_conversation(TENANT)
    turn = await store.create_turn(TENANT, conv.id)

    a = await store.enqueue(TENANT, conv.id, text_message("one"), idempotency_key="q1")
    b = await store.enqueue(TENANT, conv.id, text_message("two"))
    assert (await store.enqueue(TENANT, conv.id, text_message("again"), idempotency_key="q1")).id == a.id
    assert [(q.id, text_of(q.message)) for q in await store.drain_queue(TENANT, conv.id)] == [
        (a.id, "one"),
        (b.id, "two"),
    ]
    assert await store.drain_queue(TENANT, conv.id) == []
    # A drained item keeps answering its key.
    assert (await store.enqueue(TENANT, conv.id, text_message("late"), idempotency_key="q1")).id == a.id

    await store.record_step_metrics(TENANT, conv.id, common_pb2.StepMetrics(turn_id=turn.id, step_index=0))
    await store.record_turn_metrics(TENANT, common_pb2.TurnMetrics(turn_id=turn.id, steps=1))
    [metrics] = await store.get_metrics(TENANT, conv.id)
    assert (metrics.steps, metrics.conversation_id) == (1, conv.id)
    assert [s.step_id for s in metrics.step_metrics] == [f"{turn.id}#0"]

    approval = await store.create_approval(
        TENANT,
        common_pb2.Approval(conversation_id=conv.id, turn_id=turn.id, tool_call_id="c1", tool_name="shell"),
    )
    assert [p.id for p in await store.list_approvals(TENANT, conv.id, pending_only=True)] == [approval.id]
    resolved = await store.resolve_approval(TENANT, approval.id, S.APPROVAL_DECISION_APPROVE)
    assert resolved.HasField("resolved_at")
    with pytest.raises(FailedPrecondition):
        await store.resolve_approval(TENANT, approval.id, S.APPROVAL_DECISION_REJECT)
    assert await store.list_approvals(TENANT, conv.id, pending_only=True) == []

    key, secret = await store.create_api_key(TENANT, "ci")
    assert (await store.authenticate(secret)).id == key.id
    assert [k.id for k in await store.list_api_keys(TENANT)] == [key.id]
    assert (await store.revoke_api_key(key.id)).revoked
    with pytest.raises(NotFound, match="unknown or revoked API key"):
        await store.authenticate(secret)
