"""What the async and the sync client share: each public call as a request to send.

Every builder here returns a ``Call`` (the RPC's name, its request and an
optional per-call timeout) or ``Pages`` (how to walk a paged listing). ``_api``
makes them the clients' methods; the two clients only say how a ``Call``
travels (awaited or blocking), so a method is written once, here, for both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeAlias, TypeVar

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from dispatch_client._proto import common_pb2, transport_pb2

DEFAULT_ADDRESS = "127.0.0.1:7600"
# Unary calls fail after this many seconds unless the client or the call says otherwise.
DEFAULT_TIMEOUT = 30.0

R = TypeVar("R", bound=Message)
I = TypeVar("I")  # noqa: E741 - an item of a page

SendPolicyLike: TypeAlias = "str | common_pb2.SendPolicy.ValueType"
UntilLike: TypeAlias = "str | common_pb2.SubscribeUntil.ValueType"
DecisionLike: TypeAlias = "str | common_pb2.ApprovalDecision.ValueType"
TurnStateLike: TypeAlias = "str | common_pb2.TurnState.ValueType"
# Permission rules: as the config writes them (``{"shell": {"git status*": "allow", "*": "ask"},
# "read_file": "allow"}``), or as ``PermissionRule`` messages.
# (The mapping's values are ``object``: a narrower type makes mypy refuse a literal mixing
# ``"allow"`` and ``{"*": "ask"}``; ``permission_rules`` checks them.)
PermissionsLike: TypeAlias = "Mapping[str, object] | Iterable[common_pb2.PermissionRule]"


@dataclass(frozen=True)
class Call(Generic[R]):
    """One unary RPC to make: ``method`` of the Dispatch service, answered with an ``R``."""

    method: str
    request: Message
    # None: the client's default.
    timeout: float | None = None


@dataclass(frozen=True)
class Pages(Generic[R, I]):
    """A paged listing: the first page's call, a page's items, and the next page's call (None: done)."""

    first: Call[R]
    items: Callable[[R], Iterable[I]]
    next: Callable[[R], Call[R] | None]


# ------------------------------------------------------------------ settings


def find_api_key(given: str | None = None) -> str:
    """The API key: ``given``, else ``DISPATCH_API_KEY``, else the ``api_key`` file that
    ``dispatchd up`` writes to its data directory (``DISPATCH_DATA_DIR``, default ``.dispatch``)."""
    if given:
        return given
    if os.environ.get("DISPATCH_API_KEY", "").strip():
        return os.environ["DISPATCH_API_KEY"].strip()
    path = Path(os.environ.get("DISPATCH_DATA_DIR") or ".dispatch") / "api_key"
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def find_address(given: str | None = None) -> str:
    """The server's address: ``given``, else ``DISPATCH_ADDRESS``, else ``DEFAULT_ADDRESS``."""
    return given or os.environ.get("DISPATCH_ADDRESS", "").strip() or DEFAULT_ADDRESS


def auth_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _enum_value(value: str | int, enum: EnumDescriptor, prefix: str, what: str) -> int:
    """``value`` as a number of ``enum``: a name with or without ``prefix``, any case, or a number."""
    numbers = {v.name.removeprefix(prefix).lower(): v.number for v in enum.values if v.number != 0}
    if isinstance(value, int) and not isinstance(value, bool):
        if value in numbers.values():
            return value
    elif isinstance(value, str) and value.strip().lower().removeprefix(prefix.lower()) in numbers:
        return numbers[value.strip().lower().removeprefix(prefix.lower())]
    raise ValueError(f"unknown {what} {value!r}: expected one of {'|'.join(numbers)}")


POLICY_NAMES = [
    v.name.removeprefix("SEND_POLICY_").lower() for v in common_pb2.SendPolicy.DESCRIPTOR.values if v.number
]


def send_policy(value: SendPolicyLike) -> common_pb2.SendPolicy.ValueType:
    """A send policy from ``"enqueue"|"interrupt"|"reject"`` (any case) or a ``SendPolicy`` value."""
    return common_pb2.SendPolicy.ValueType(
        _enum_value(value, common_pb2.SendPolicy.DESCRIPTOR, "SEND_POLICY_", "send policy")
    )


UNTIL_NAMES = [
    v.name.removeprefix("SUBSCRIBE_UNTIL_").lower()
    for v in common_pb2.SubscribeUntil.DESCRIPTOR.values
    if v.number
]


def subscribe_until(value: UntilLike) -> common_pb2.SubscribeUntil.ValueType:
    """Where a subscription ends, from ``"follow"|"caught_up"|"turn_sealed"`` (any case) or a
    ``SubscribeUntil`` value."""
    return common_pb2.SubscribeUntil.ValueType(
        _enum_value(value, common_pb2.SubscribeUntil.DESCRIPTOR, "SUBSCRIBE_UNTIL_", "until")
    )


def approval_decision(value: DecisionLike) -> common_pb2.ApprovalDecision.ValueType:
    """A decision from ``"approve"|"reject"|"edit"`` or an ``ApprovalDecision`` value."""
    return common_pb2.ApprovalDecision.ValueType(
        _enum_value(value, common_pb2.ApprovalDecision.DESCRIPTOR, "APPROVAL_DECISION_", "approval decision")
    )


def _rule_action(value: object, where: str) -> common_pb2.PermissionAction.ValueType:
    if isinstance(value, (str, int)):
        try:
            return common_pb2.PermissionAction.ValueType(
                _enum_value(
                    value, common_pb2.PermissionAction.DESCRIPTOR, "PERMISSION_ACTION_", "permission action"
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    raise ValueError(f"{where}: expected allow, ask or deny, or a table of pattern: action, got {value!r}")


def permission_rules(permissions: PermissionsLike) -> list[common_pb2.PermissionRule]:
    """``permissions`` as ``PermissionRule`` messages, in order. The mapping form is the
    config's: ``tool: action`` (every call of the tool), or ``tool: {pattern: action}``,
    where the pattern ``"*"`` means every call (an empty pattern); an action is
    ``"allow"|"ask"|"deny"`` (any case) or a ``PermissionAction`` value. A bad one is a
    ``ValueError`` naming the rule."""
    if not isinstance(permissions, Mapping):
        return [
            common_pb2.PermissionRule(tool=r.tool, pattern=r.pattern, action=r.action) for r in permissions
        ]
    rules: list[common_pb2.PermissionRule] = []
    for tool, value in permissions.items():
        if isinstance(value, Mapping):
            for pattern, action in value.items():
                rule = common_pb2.PermissionRule(tool=tool, pattern="" if pattern == "*" else str(pattern))
                rule.action = _rule_action(action, f"permissions: {tool} {pattern!r}")
                rules.append(rule)
        else:
            rules.append(
                common_pb2.PermissionRule(tool=tool, action=_rule_action(value, f"permissions: {tool}"))
            )
    return rules


def input_json(value: str | Mapping[str, object]) -> str:
    """A tool's input as JSON text: a mapping is encoded, a string is taken as it is (the
    server checks it is a JSON object the tool's schema takes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value)
    raise TypeError(f"the input must be a dict or a JSON string, not {type(value).__name__}")


TURN_STATE_NAMES = [
    v.name.removeprefix("TURN_STATE_").lower() for v in common_pb2.TurnState.DESCRIPTOR.values if v.number
]


def turn_state(value: TurnStateLike) -> common_pb2.TurnState.ValueType:
    """A turn state from its name (``"running"``, ``"TURN_STATE_RUNNING"``, any case) or a
    ``TurnState`` value."""
    return common_pb2.TurnState.ValueType(
        _enum_value(value, common_pb2.TurnState.DESCRIPTOR, "TURN_STATE_", "turn state")
    )


def turn_states(states: TurnStateLike | Iterable[TurnStateLike]) -> list[common_pb2.TurnState.ValueType]:
    """``states`` (one, or several) as ``TurnState`` values; a lone string is one state."""
    if isinstance(states, (str, int)):
        return [turn_state(states)]
    return [turn_state(s) for s in states]


# ------------------------------------------------------------- the public API


def create_workspace(
    *,
    name: str = "",
    root: str = "",
    default_computer_id: str = "",
    default_agent: str = "",
    confine_tools: bool = False,
    permissions: PermissionsLike = (),
    timeout: float | None = None,
) -> Call[common_pb2.Workspace]:
    """Create a workspace: a ``root`` directory tools resolve paths against (confined to it
    with ``confine_tools``), the computer and agent its conversations default to, and
    ``permissions``, rules over the agents' (``{"shell": {"git status*": "allow", "*": "ask"}}``
    or ``PermissionRule`` messages; see ``permission_rules``)."""
    request = transport_pb2.PublicCreateWorkspaceRequest(
        name=name,
        root=root,
        default_computer_id=default_computer_id,
        default_agent=default_agent,
        confine_tools=confine_tools,
        permissions=permission_rules(permissions),
    )
    return Call("CreateWorkspace", request, timeout)


def list_workspaces(
    *, page_size: int = 0, page_token: str = "", timeout: float | None = None
) -> Call[common_pb2.ListWorkspacesResponse]:
    """One page of the tenant's workspaces; see ``iter_workspaces`` for all of them."""
    request = transport_pb2.PublicListWorkspacesRequest(page_size=page_size, page_token=page_token)
    return Call("ListWorkspaces", request, timeout)


def iter_workspaces(
    *, page_size: int = 0, timeout: float | None = None
) -> Pages[common_pb2.ListWorkspacesResponse, common_pb2.Workspace]:
    """Every workspace of the tenant, page by page."""

    def page(token: str) -> Call[common_pb2.ListWorkspacesResponse]:
        return list_workspaces(page_size=page_size, page_token=token, timeout=timeout)

    return Pages(
        page(""), lambda r: r.workspaces, lambda r: page(r.next_page_token) if r.next_page_token else None
    )


def create_conversation(
    *,
    workspace_id: str = "",
    title: str = "",
    cwd: str = "",
    computer_id: str = "",
    agent: str = "",
    timeout: float | None = None,
) -> Call[common_pb2.Conversation]:
    """Create a conversation (in the default workspace unless ``workspace_id`` is given);
    ``cwd``, ``computer_id`` and ``agent`` override the workspace's."""
    request = transport_pb2.PublicCreateConversationRequest(
        workspace_id=workspace_id, title=title, cwd=cwd, computer_id=computer_id, agent=agent
    )
    return Call("CreateConversation", request, timeout)


def list_conversations(
    *, workspace_id: str = "", page_size: int = 0, page_token: str = "", timeout: float | None = None
) -> Call[common_pb2.ListConversationsResponse]:
    """One page of conversations (of ``workspace_id`` if given); see ``iter_conversations``."""
    request = transport_pb2.PublicListConversationsRequest(
        workspace_id=workspace_id, page_size=page_size, page_token=page_token
    )
    return Call("ListConversations", request, timeout)


def iter_conversations(
    *, workspace_id: str = "", page_size: int = 0, timeout: float | None = None
) -> Pages[common_pb2.ListConversationsResponse, common_pb2.Conversation]:
    """Every conversation (of ``workspace_id`` if given), page by page."""

    def page(token: str) -> Call[common_pb2.ListConversationsResponse]:
        return list_conversations(
            workspace_id=workspace_id, page_size=page_size, page_token=token, timeout=timeout
        )

    return Pages(
        page(""), lambda r: r.conversations, lambda r: page(r.next_page_token) if r.next_page_token else None
    )


def get_conversation(conversation_id: str, *, timeout: float | None = None) -> Call[common_pb2.Conversation]:
    """The conversation; ``NotFound`` if it does not exist (or is another tenant's)."""
    request = transport_pb2.PublicGetConversationRequest(conversation_id=conversation_id)
    return Call("GetConversation", request, timeout)


def update_conversation(
    conversation_id: str,
    *,
    title: str | None = None,
    cwd: str | None = None,
    computer_id: str | None = None,
    agent: str | None = None,
    timeout: float | None = None,
) -> Call[common_pb2.Conversation]:
    """Set the fields given; None leaves a field alone, ``""`` clears an override."""
    request = transport_pb2.PublicUpdateConversationRequest(
        conversation_id=conversation_id, title=title, cwd=cwd, computer_id=computer_id, agent=agent
    )
    return Call("UpdateConversation", request, timeout)


def delete_conversation(
    conversation_id: str, *, timeout: float | None = None
) -> Call[common_pb2.DeleteConversationResponse]:
    """Delete the conversation with its messages and events."""
    request = transport_pb2.PublicDeleteConversationRequest(conversation_id=conversation_id)
    return Call("DeleteConversation", request, timeout)


def send(
    conversation_id: str,
    text: str = "",
    *,
    chunks: Sequence[common_pb2.Chunk] = (),
    policy: SendPolicyLike = "enqueue",
    idempotency_key: str = "",
    timeout: float | None = None,
) -> Call[transport_pb2.SendResponse]:
    """Send a user message (``text``, or ``chunks``). With a turn running, ``policy`` says what
    happens: ``enqueue`` (the default: the answer has ``queued`` and the running turn's id),
    ``interrupt`` or ``reject`` (``FailedPrecondition``). Subscribe with the answer's
    ``after_event_seq`` to follow the turn, or use ``run_turn``."""
    request = transport_pb2.SendRequest(
        conversation_id=conversation_id,
        text=text,
        chunks=chunks,
        policy=send_policy(policy),
        idempotency_key=idempotency_key,
    )
    return Call("Send", request, timeout)


def cancel(
    conversation_id: str, turn_id: str = "", *, timeout: float | None = None
) -> Call[transport_pb2.CancelResponse]:
    """Abort the running turn (only if it is ``turn_id``, when given). The answer's ``turn_id``
    is the turn aborted, empty when none was."""
    request = transport_pb2.CancelRequest(conversation_id=conversation_id, turn_id=turn_id)
    return Call("Cancel", request, timeout)


def get_turn(conversation_id: str, turn_id: str, *, timeout: float | None = None) -> Call[common_pb2.Turn]:
    """The turn: its ``state``, ``attempts`` (one more each time a kernel recovered it), the
    kernel holding its lease (``lease_owner``, ``lease_expires_at``), its ``finish_reason``
    and ``error_message`` once it ended, and when it was created, started and ended.
    ``NotFound`` if the conversation has no such turn (or is another tenant's)."""
    request = transport_pb2.PublicGetTurnRequest(conversation_id=conversation_id, turn_id=turn_id)
    return Call("GetTurn", request, timeout)


def list_turns(
    conversation_id: str,
    *,
    states: TurnStateLike | Iterable[TurnStateLike] = (),
    page_size: int = 0,
    page_token: str = "",
    timeout: float | None = None,
) -> Call[common_pb2.ListTurnsResponse]:
    """One page of the conversation's turns, oldest first; only those in ``states`` when given
    (``"running"``, ``["queued", "running"]`` or ``types.TurnState`` values). See ``iter_turns``."""
    request = transport_pb2.PublicListTurnsRequest(
        conversation_id=conversation_id,
        states=turn_states(states),
        page_size=page_size,
        page_token=page_token,
    )
    return Call("ListTurns", request, timeout)


def iter_turns(
    conversation_id: str,
    *,
    states: TurnStateLike | Iterable[TurnStateLike] = (),
    page_size: int = 0,
    timeout: float | None = None,
) -> Pages[common_pb2.ListTurnsResponse, common_pb2.Turn]:
    """Every turn of the conversation (in ``states`` when given), oldest first, page by page."""
    wanted = turn_states(states)

    def page(token: str) -> Call[common_pb2.ListTurnsResponse]:
        return list_turns(
            conversation_id, states=wanted, page_size=page_size, page_token=token, timeout=timeout
        )

    return Pages(
        page(""), lambda r: r.turns, lambda r: page(r.next_page_token) if r.next_page_token else None
    )


def resolve_approval(
    approval_id: str,
    decision: DecisionLike,
    *,
    edited_input_json: str = "",
    reason: str = "",
    remember: bool = False,
    timeout: float | None = None,
) -> Call[common_pb2.Approval]:
    """Answer a tool call's approval request: ``approve``, ``reject`` (with a ``reason`` the
    model is told) or ``edit`` (with ``edited_input_json``, the call's new input); ``remember``
    (approve or edit) lets the same call run without asking for the rest of the conversation.
    Answers the decided ``Approval``; deciding one twice is ``FailedPrecondition``."""
    request = transport_pb2.PublicResolveApprovalRequest(
        approval_id=approval_id,
        decision=approval_decision(decision),
        edited_input_json=edited_input_json,
        reason=reason,
        remember=remember,
    )
    return Call("ResolveApproval", request, timeout)


def approve(
    approval_id: str, *, remember: bool = False, timeout: float | None = None
) -> Call[common_pb2.Approval]:
    """Let the waiting call run; with ``remember``, the same call runs without asking for the
    rest of the conversation."""
    return resolve_approval(approval_id, "approve", remember=remember, timeout=timeout)


def reject(approval_id: str, reason: str = "", *, timeout: float | None = None) -> Call[common_pb2.Approval]:
    """Refuse the waiting call: it does not run, and the model gets an error result with ``reason``."""
    return resolve_approval(approval_id, "reject", reason=reason, timeout=timeout)


def edit(
    approval_id: str,
    input: str | Mapping[str, object],
    *,
    remember: bool = False,
    timeout: float | None = None,
) -> Call[common_pb2.Approval]:
    """Run the waiting call with ``input`` instead (a dict, or a JSON object as a string); input
    the tool's schema does not take is ``InvalidArgument``, and the approval stays open."""
    return resolve_approval(
        approval_id, "edit", edited_input_json=input_json(input), remember=remember, timeout=timeout
    )


def list_approvals(
    conversation_id: str, *, pending_only: bool = False, timeout: float | None = None
) -> Call[common_pb2.ListApprovalsResponse]:
    """The conversation's approvals, oldest first; only those still waiting for a decision with
    ``pending_only``."""
    request = transport_pb2.PublicListApprovalsRequest(
        conversation_id=conversation_id, pending_only=pending_only
    )
    return Call("ListApprovals", request, timeout)


def history(
    conversation_id: str, *, after_seq: int = 0, limit: int = 0, timeout: float | None = None
) -> Call[transport_pb2.HistoryResponse]:
    """Committed messages with seq > ``after_seq``, at most ``limit`` (0: all); the answer's
    ``last_seq`` is the conversation's highest seq."""
    request = transport_pb2.HistoryRequest(conversation_id=conversation_id, after_seq=after_seq, limit=limit)
    return Call("History", request, timeout)


def iter_history(
    conversation_id: str, *, after_seq: int = 0, page_size: int = 500, timeout: float | None = None
) -> Pages[transport_pb2.HistoryResponse, common_pb2.Message]:
    """Every committed message with seq > ``after_seq``, ``page_size`` per call."""

    def page(after: int) -> Call[transport_pb2.HistoryResponse]:
        return history(conversation_id, after_seq=after, limit=page_size, timeout=timeout)

    def next_page(r: transport_pb2.HistoryResponse) -> Call[transport_pb2.HistoryResponse] | None:
        if not r.messages or r.messages[-1].seq >= r.last_seq:
            return None
        return page(r.messages[-1].seq)

    return Pages(page(after_seq), lambda r: r.messages, next_page)


def metrics(
    conversation_id: str, turn_id: str = "", *, timeout: float | None = None
) -> Call[common_pb2.GetMetricsResponse]:
    """Per-turn (and per-step) metrics of the conversation, of one turn when ``turn_id`` is given."""
    request = transport_pb2.MetricsRequest(conversation_id=conversation_id, turn_id=turn_id)
    return Call("Metrics", request, timeout)


def models(*, timeout: float | None = None) -> Call[transport_pb2.ModelsResponse]:
    """The models the server's agents use."""
    return Call("Models", transport_pb2.ModelsRequest(), timeout)


def computers(*, timeout: float | None = None) -> Call[transport_pb2.ComputersResponse]:
    """The computers tools can run on: this machine and the SSH config's hosts."""
    return Call("Computers", transport_pb2.ComputersRequest(), timeout)


def create_stream_token(
    conversation_id: str, ttl_seconds: int = 0, *, timeout: float | None = None
) -> Call[transport_pb2.StreamToken]:
    """A short-lived token that opens ``conversation_id``'s event stream in place of the API key,
    for a browser's ``EventSource`` (``GET .../events?stream_token=``): good for ``ttl_seconds``
    (0: the server's default, 300; at most 3600), for nothing but that conversation's events."""
    request = transport_pb2.CreateStreamTokenRequest(conversation_id=conversation_id, ttl_seconds=ttl_seconds)
    return Call("CreateStreamToken", request, timeout)
