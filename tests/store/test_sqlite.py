"""The SQLite backend on its own: URLs, pragmas, migrations, closing, seq invariants."""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.shared.config import ConfigError
from dispatch.shared.errors import FailedPrecondition, Unavailable
from dispatch.store import sqlite as sqlite_backend
from dispatch.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore, sqlite_path
from dispatch.v1 import common_pb2
from tests.store.harness import TENANT, V4_DECIDED, V4_PENDING, check_upgraded_from_v4, text_message


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative/dispatch.db", "relative/dispatch.db"),
        ("sqlite:////var/lib/dispatch/dispatch.db", "/var/lib/dispatch/dispatch.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_url_names_the_file(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/db",
        "sqlite:///data/",
        "sqlite:///db?mode=ro",
        "file:///x.db",
    ],
)
def test_a_bad_sqlite_url_is_a_config_error_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError, match=r"store\.database_url"):
        sqlite_path(url)


async def test_a_relative_url_resolves_against_the_working_directory_and_creates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = await SQLiteStore.open("sqlite:///nested/dir/dispatch.db", default_workspace_root="/w")
    await store.close()
    assert (tmp_path / "nested" / "dir" / "dispatch.db").is_file()


async def test_the_connection_is_wal_with_full_sync(tmp_path: Path) -> None:
    store = await SQLiteStore.open(url_of(tmp_path / "db"), default_workspace_root="/w")
    try:
        # Reached through the worker because the connection belongs to its thread.
        pragmas = await store._call(
            lambda: tuple(
                store._db().execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys")
            )
        )
    finally:
        await store.close()
    assert pragmas == ("wal", 2, 1)  # synchronous 2 is FULL


def schema_versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY version")]


async def test_migrations_are_safe_to_run_twice(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    try:
        conv = await store.create_conversation(TENANT, title="kept")
        assert await store.migrate() == 0
        assert await store.schema_version() == SCHEMA_VERSION
    finally:
        await store.close()

    again = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    try:
        assert await again.migrate() == 0
        assert (await again.get_conversation(TENANT, conv.id)).title == "kept"
    finally:
        await again.close()
    assert schema_versions(path) == [v for v, _ in MIGRATIONS]


async def test_a_failing_migration_is_rolled_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    await (await SQLiteStore.open(url_of(path), default_workspace_root="/w")).close()
    broken = (*MIGRATIONS, (SCHEMA_VERSION + 1, ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL")))
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", broken)
    with pytest.raises(Unavailable, match="syntax error"):
        await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchall() == []
    assert schema_versions(path) == [v for v, _ in MIGRATIONS]

    monkeypatch.undo()
    store = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    await store.close()


async def test_a_database_from_a_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    await (await SQLiteStore.open(url_of(path), default_workspace_root="/w")).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    with pytest.raises(FailedPrecondition, match="schema version 99"):
        await SQLiteStore.open(url_of(path), default_workspace_root="/w")


async def test_a_closed_store_refuses_calls_and_closes_twice(tmp_path: Path) -> None:
    store = await SQLiteStore.open(url_of(tmp_path / "db"), default_workspace_root="/w")
    conv = await store.create_conversation(TENANT)
    await store.close()
    await store.close()
    with pytest.raises(Unavailable, match="closed"):
        await store.get_conversation(TENANT, conv.id)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=12))
def test_seq_is_gap_free_whatever_the_batches(sizes: list[int]) -> None:
    async def run() -> None:
        store = await SQLiteStore.open("sqlite:///:memory:", default_workspace_root="/w")
        try:
            conv = await store.create_conversation(TENANT)
            results = await asyncio.gather(
                *(store.append(TENANT, conv.id, [text_message(str(i))] * n) for i, n in enumerate(sizes))
            )
            history = await store.load_since(TENANT, conv.id)
        finally:
            await store.close()
        total = sum(sizes)
        assert [m.seq for m in history.messages] == list(range(1, total + 1))
        assert history.last_seq == total
        for n, done in zip(sizes, results, strict=True):
            assert [m.seq for m in done.messages] == list(range(done.first_seq, done.first_seq + n))

    asyncio.run(run())


async def test_a_version_1_database_upgrades_and_keeps_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", MIGRATIONS[:1])
    monkeypatch.setattr(sqlite_backend, "SCHEMA_VERSION", 1)
    old = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    await old.close()
    assert schema_versions(path) == [1]
    # Rows as version 1's code wrote them (today's code writes columns version 1 lacks).
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, is_default, created_at)"
            " VALUES ('ws_v1', ?, 'default', '/w', 1, 1)",
            (TENANT,),
        )
        db.execute(
            "INSERT INTO conversations (id, tenant_id, workspace_id, title, created_at, updated_at)"
            " VALUES ('conv_v1', ?, 'ws_v1', 'from v1', 1, 1)",
            (TENANT,),
        )
        db.execute(
            "INSERT INTO turns (id, tenant_id, conversation_id, state, created_at)"
            " VALUES ('turn_v1', ?, 'conv_v1', ?, 1)",
            (TENANT, common_pb2.TURN_STATE_QUEUED),
        )
    db.close()

    monkeypatch.undo()
    store = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    try:
        conv = await store.get_conversation(TENANT, "conv_v1")
        assert conv.title == "from v1"
        turn = await store.get_turn(TENANT, "turn_v1")
        # Migration 3: workspaces from before it are not confined.
        assert (await store.get_workspace(TENANT, "ws_v1")).confine_tools is False
        where = await store.resolve_execution(TENANT, conv.id)
        assert (where.workspace_root, where.confine_tools) == ("/w", False)
        # The tables of the later migrations are there and usable.
        await store.enqueue(TENANT, conv.id, text_message("queued"))
        [queued] = await store.drain_queue(TENANT, conv.id)
        assert queued.message.chunks[0].text.text == "queued"
        assert (
            await store.claim_lease(TENANT, turn.id, "k", datetime.timedelta(seconds=5))
        ).lease_owner == "k"
    finally:
        await store.close()
    assert schema_versions(path) == [v for v, _ in MIGRATIONS]


async def test_a_version_3_database_upgrades_to_durable_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", MIGRATIONS[:3])
    monkeypatch.setattr(sqlite_backend, "SCHEMA_VERSION", 3)
    old = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    await old.close()
    assert schema_versions(path) == [1, 2, 3]
    # Rows as version 3's code wrote them: events up to 7, a turn leased (and expired), one ended.
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, is_default, confine_tools, created_at)"
            " VALUES ('ws_v3', ?, 'default', '/w', 1, 1, 1)",
            (TENANT,),
        )
        db.execute(
            "INSERT INTO conversations (id, tenant_id, workspace_id, last_seq, last_event_seq,"
            " created_at, updated_at) VALUES ('conv_v3', ?, 'ws_v3', 2, 7, 1, 1)",
            (TENANT,),
        )
        db.execute(
            "INSERT INTO turns (id, tenant_id, conversation_id, state, lease_owner, lease_expires_at,"
            " created_at, started_at) VALUES ('turn_v3', ?, 'conv_v3', ?, 'k-old', 5, 1, 1)",
            (TENANT, common_pb2.TURN_STATE_RUNNING),
        )
        db.execute(
            "INSERT INTO turns (id, tenant_id, conversation_id, state, created_at, ended_at)"
            " VALUES ('turn_v3_done', ?, 'conv_v3', ?, 2, 2)",
            (TENANT, common_pb2.TURN_STATE_COMPLETED),
        )
    db.close()

    monkeypatch.undo()
    store = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    try:
        # Migration 4: nothing was reserved past what was persisted; no epoch, no attempt yet.
        conv = await store.get_conversation(TENANT, "conv_v3")
        assert (conv.last_event_seq, conv.reserved_event_seq) == (7, 7)
        turn = await store.get_turn(TENANT, "turn_v3")
        assert (turn.lease_owner, turn.lease_epoch, turn.attempts) == ("k-old", 0, 0)
        # The sweep finds the expired lease (not the ended turn), and a claim starts epoch 1.
        assert [t.id for t in await store.list_expired_leases()] == ["turn_v3"]
        claimed = await store.claim_lease(TENANT, "turn_v3", "k-new", datetime.timedelta(seconds=5))
        assert (claimed.lease_owner, claimed.lease_epoch, claimed.attempts) == ("k-new", 1, 1)
        assert (await store.get_workspace(TENANT, "ws_v3")).confine_tools is True
    finally:
        await store.close()
    assert schema_versions(path) == [v for v, _ in MIGRATIONS]
    with sqlite3.connect(path) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert {"turns_unended_by_lease_expiry", "turns_unended_by_conversation"} <= indexes
    assert "turns_by_lease_expiry" not in indexes


async def test_a_version_4_database_upgrades_to_approvals_and_permission_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", MIGRATIONS[:4])
    monkeypatch.setattr(sqlite_backend, "SCHEMA_VERSION", 4)
    await (await SQLiteStore.open(url_of(path), default_workspace_root="/w")).close()
    assert schema_versions(path) == [1, 2, 3, 4]
    # Rows as version 4's code wrote them: a workspace, a conversation, a leased turn and two
    # approvals, one pending and one decided.
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO workspaces (id, tenant_id, name, root, is_default, confine_tools, created_at)"
            " VALUES ('ws_v4', ?, 'default', '/w', 1, 1, 1)",
            (TENANT,),
        )
        db.execute(
            "INSERT INTO conversations (id, tenant_id, workspace_id, created_at, updated_at)"
            " VALUES ('conv_v4', ?, 'ws_v4', 1, 1)",
            (TENANT,),
        )
        db.execute(
            "INSERT INTO turns (id, tenant_id, conversation_id, state, lease_owner, lease_expires_at,"
            " lease_epoch, attempts, created_at, started_at) VALUES ('turn_v4', ?, 'conv_v4', ?, 'k', 5,"
            " 1, 1, 1, 1)",
            (TENANT, common_pb2.TURN_STATE_WAITING_FOR_APPROVAL),
        )
        for approval in (V4_PENDING, V4_DECIDED):
            db.execute(
                "INSERT INTO approvals (id, tenant_id, conversation_id, decision, created_at, body)"
                " VALUES (?, ?, 'conv_v4', ?, ?, ?)",
                (
                    approval.id,
                    TENANT,
                    approval.decision,
                    approval.created_at.ToNanoseconds(),
                    approval.SerializeToString(),
                ),
            )
    db.close()

    monkeypatch.undo()
    store = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    try:
        await check_upgraded_from_v4(store)
        assert await store.migrate() == 0
    finally:
        await store.close()
    assert schema_versions(path) == [v for v, _ in MIGRATIONS]
    with sqlite3.connect(path) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(approvals)")}
        [(decided_by, remember)] = db.execute(
            "SELECT decided_by, remember FROM approvals WHERE id = ?", (V4_PENDING.id,)
        ).fetchall()
    db.close()
    assert {"rule", "decided_by", "remember", "expires_at"} <= columns
    # The copies are written with the body.
    assert (decided_by, remember) == ("key_v5", 1)


async def test_secrets_are_stored_only_as_hashes(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = await SQLiteStore.open(url_of(path), default_workspace_root="/w")
    try:
        _, secret = await store.create_api_key(TENANT, "ci")
    finally:
        await store.close()
    assert secret.encode() not in path.read_bytes()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT * FROM api_keys").fetchall()
    assert rows and all(secret not in str(value) for row in rows for value in row)


async def test_a_new_database_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "dispatch.db"
    store = await SQLiteStore.open(url_of(path))
    try:
        conv = await store.create_conversation(TENANT)
        await store.append(TENANT, conv.id, [text_message("hi")])
        # The write-ahead log holds the newest messages; it inherits the database's mode.
        files = [p for p in path.parent.iterdir() if p.name.startswith("dispatch.db")]
        assert path in files and any(p.name.endswith("-wal") for p in files)
        for p in files:
            assert p.stat().st_mode & 0o777 == 0o600, p.name
    finally:
        await store.close()


async def test_an_existing_database_keeps_its_mode_and_a_readable_one_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dispatch.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    store = await SQLiteStore.open(url_of(path))
    await store.close()
    assert path.stat().st_mode & 0o777 == 0o644
    assert "readable by other users" in caplog.text
