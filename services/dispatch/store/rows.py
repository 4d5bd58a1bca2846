"""Rows to protobuf records, shared by every SQL backend: their schemas use
the same column names, so one mapping serves SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from dispatch.store.backend import Lease, Page, encode_cursor
from dispatch.v1 import common_pb2, store_pb2


class Row(Protocol):
    """A result row addressable by column name (sqlite3.Row, psycopg's dict rows), whose
    columns ``keys`` names (so ``{**row, **changes}`` is the row changed)."""

    def __getitem__(self, key: str, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


T = TypeVar("T")
R = TypeVar("R", bound=Row)


def set_timestamp(field: Any, ns: int) -> None:
    # 0 is how the tables spell "not yet", which the proto spells as an unset field.
    if ns:
        field.FromNanoseconds(ns)


def rules_column(rules: Sequence[common_pb2.PermissionRule]) -> bytes:
    """Permission rules as their column holds them: a serialized ``PermissionRules``
    (no rules: empty bytes, the column's default)."""
    return store_pb2.PermissionRules(rules=rules).SerializeToString()


def rules_from_column(data: bytes) -> list[common_pb2.PermissionRule]:
    return list(store_pb2.PermissionRules.FromString(bytes(data)).rules)


def workspace_from_row(row: Row) -> common_pb2.Workspace:
    ws = common_pb2.Workspace(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        root=row["root"],
        default_computer_id=row["default_computer_id"],
        default_agent=row["default_agent"],
        confine_tools=bool(row["confine_tools"]),
        is_default=bool(row["is_default"]),
        permissions=rules_from_column(row["permissions"]),
    )
    set_timestamp(ws.created_at, row["created_at"])
    return ws


def conversation_from_row(row: Row) -> common_pb2.Conversation:
    conv = common_pb2.Conversation(
        id=row["id"],
        tenant_id=row["tenant_id"],
        workspace_id=row["workspace_id"],
        title=row["title"],
        cwd=row["cwd"],
        computer_id=row["computer_id"],
        agent=row["agent"],
        last_seq=row["last_seq"],
        last_event_seq=row["last_event_seq"],
        reserved_event_seq=row["reserved_event_seq"],
        remembered=rules_from_column(row["remembered"]),
    )
    set_timestamp(conv.created_at, row["created_at"])
    set_timestamp(conv.updated_at, row["updated_at"])
    return conv


def turn_from_row(row: Row) -> common_pb2.Turn:
    turn = common_pb2.Turn(
        id=row["id"],
        tenant_id=row["tenant_id"],
        conversation_id=row["conversation_id"],
        state=row["state"],
        idempotency_key=row["idempotency_key"],
        lease_owner=row["lease_owner"],
        finish_reason=row["finish_reason"],
        error_message=row["error_message"],
        computer_id=row["computer_id"],
        cwd=row["cwd"],
        agent=row["agent"],
        user_message_seq=row["user_message_seq"],
        attempts=row["attempts"],
        lease_epoch=row["lease_epoch"],
    )
    set_timestamp(turn.lease_expires_at, row["lease_expires_at"])
    set_timestamp(turn.created_at, row["created_at"])
    set_timestamp(turn.started_at, row["started_at"])
    set_timestamp(turn.ended_at, row["ended_at"])
    return turn


def lease_from_row(row: Row) -> Lease:
    return Lease(
        turn_id=row["id"],
        conversation_id=row["conversation_id"],
        state=row["state"],
        owner=row["lease_owner"],
        epoch=row["lease_epoch"],
        expires_at_ns=row["lease_expires_at"],
    )


def approval_from_row(row: Row) -> common_pb2.Approval:
    # The body is the whole Approval; its tenant is the row's (bodies from before
    # migration 5 lack it).
    approval = common_pb2.Approval.FromString(bytes(row["body"]))
    approval.tenant_id = row["tenant_id"]
    return approval


def approval_columns(approval: common_pb2.Approval) -> dict[str, Any]:
    """Every column of an approval's row, from the approval as it stands: the body, and the
    copies of its fields that queries filter on (or that a person reading the table wants)."""
    return {
        "id": approval.id,
        "tenant_id": approval.tenant_id,
        "conversation_id": approval.conversation_id,
        "decision": approval.decision,
        "created_at": approval.created_at.ToNanoseconds(),
        "rule": approval.rule,
        "decided_by": approval.decided_by,
        "remember": approval.remember,
        "expires_at": approval.expires_at.ToNanoseconds() if approval.HasField("expires_at") else 0,
        "body": approval.SerializeToString(),
    }


def api_key_from_row(row: Row) -> store_pb2.ApiKey:
    return store_pb2.ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        prefix=row["prefix"],
        revoked=bool(row["revoked_at"]),
    )


def queued_from_row(row: Row) -> store_pb2.QueuedMessage:
    return store_pb2.QueuedMessage(
        id=row["id"],
        conversation_id=row["conversation_id"],
        message=common_pb2.Message.FromString(row["body"]),
        idempotency_key=row["idempotency_key"],
    )


def page_from_rows(rows: Sequence[R], size: int, convert: Callable[[R], T]) -> Page[T]:
    # The query fetched one row more than the page holds, only to learn whether another page exists.
    more = len(rows) > size
    rows = rows[:size]
    token = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else ""
    return Page(items=[convert(r) for r in rows], next_page_token=token)
