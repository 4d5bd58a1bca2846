"""The store contract for permission rules (issue 13): a workspace's rules, kept and
answered everywhere, replaced when an update sets them, their shape checked.

Backend-agnostic, like test_conformance: every test talks gRPC to an in-process server
from ``store_stub``, once per backend in ``conftest.BACKENDS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest

from dispatch.v1 import common_pb2, store_pb2
from tests.store.harness import TENANT, new_conversation, rpc_error

if TYPE_CHECKING:
    from tests.store.harness import Stub

S = common_pb2


def rule(tool: str, pattern: str = "", action: int = S.PERMISSION_ACTION_ASK) -> common_pb2.PermissionRule:
    return common_pb2.PermissionRule(tool=tool, pattern=pattern, action=action)  # type: ignore[arg-type]


def allow(tool: str, pattern: str = "") -> common_pb2.PermissionRule:
    return rule(tool, pattern, S.PERMISSION_ACTION_ALLOW)


# ----------------------------------------------------------- permission rules


RULES = [rule("shell", "git push*"), allow("read_file"), rule("*", "", S.PERMISSION_ACTION_DENY)]


async def test_workspace_permissions_are_kept_answered_everywhere_and_replaced_when_set(
    store_stub: Stub,
) -> None:
    created = await store_stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w", permissions=RULES)
    )
    assert list(created.permissions) == RULES
    got = await store_stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=created.id)
    )
    assert list(got.permissions) == RULES
    page = await store_stub.ListWorkspaces(store_pb2.ListWorkspacesRequest(tenant_id=TENANT))
    assert [list(w.permissions) for w in page.workspaces] == [RULES]

    # Unset: kept, whatever else changes.
    renamed = await store_stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(tenant_id=TENANT, workspace_id=created.id, name="renamed")
    )
    assert (renamed.name, list(renamed.permissions)) == ("renamed", RULES)
    # Set: replaced whole.
    replaced = await store_stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(
            tenant_id=TENANT,
            workspace_id=created.id,
            permissions=store_pb2.PermissionRules(rules=[allow("shell", "make *")]),
        )
    )
    assert list(replaced.permissions) == [allow("shell", "make *")]
    # Set to no rules: cleared.
    cleared = await store_stub.UpdateWorkspace(
        store_pb2.UpdateWorkspaceRequest(
            tenant_id=TENANT, workspace_id=created.id, permissions=store_pb2.PermissionRules()
        )
    )
    assert list(cleared.permissions) == []
    got = await store_stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=created.id)
    )
    assert (got.name, list(got.permissions)) == ("renamed", [])


async def test_a_workspace_made_without_rules_and_the_default_one_have_none(store_stub: Stub) -> None:
    plain = await store_stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w")
    )
    assert list(plain.permissions) == []
    conv = await new_conversation(store_stub)
    default = await store_stub.GetWorkspace(
        store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=conv.workspace_id)
    )
    assert default.is_default and list(default.permissions) == []
    assert list(conv.remembered) == []


BAD_RULES: dict[str, tuple[list[common_pb2.PermissionRule], str]] = {
    "no-tool": ([rule("shell"), rule("", "x")], "permissions[1].tool is required"),
    "no-action": (
        [common_pb2.PermissionRule(tool="shell")],
        "permissions[0].action must be allow, ask or deny",
    ),
    "unknown-action": ([rule("read_file"), rule("grep"), rule("shell", "", 42)], "permissions[2].action"),
}


@pytest.mark.parametrize("case", list(BAD_RULES))
async def test_a_rule_without_a_tool_or_an_action_is_refused_naming_its_index(
    store_stub: Stub, case: str
) -> None:
    rules, needle = BAD_RULES[case]
    err = await rpc_error(
        store_stub.CreateWorkspace(
            store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w", permissions=rules)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    page = await store_stub.ListWorkspaces(store_pb2.ListWorkspacesRequest(tenant_id=TENANT))
    assert list(page.workspaces) == []

    ws = await store_stub.CreateWorkspace(
        store_pb2.CreateWorkspaceRequest(tenant_id=TENANT, name="w", root="/srv/w", permissions=RULES)
    )
    err = await rpc_error(
        store_stub.UpdateWorkspace(
            store_pb2.UpdateWorkspaceRequest(
                tenant_id=TENANT,
                workspace_id=ws.id,
                name="renamed",
                permissions=store_pb2.PermissionRules(rules=rules),
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    got = await store_stub.GetWorkspace(store_pb2.GetWorkspaceRequest(tenant_id=TENANT, workspace_id=ws.id))
    assert (got.name, list(got.permissions)) == ("w", RULES)
