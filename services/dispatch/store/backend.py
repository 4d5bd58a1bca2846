"""The store's backend interface, and the rules every backend enforces alike.

A backend takes plain Python arguments and answers with the protobuf messages
(``Workspace``, ``Conversation``, ``Message``, ``Turn``, ``AgentEvent``) as its
records, so the servicer only translates requests. The turn state machine, the
append checks and the page-token format live here, next to the interface, so the
SQLite and PostgreSQL backends cannot drift apart on semantics.
"""

from __future__ import annotations

import abc
import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from dispatch.shared.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from dispatch.shared.ids import step_id
from dispatch.v1 import common_pb2, store_pb2

T = TypeVar("T")

TurnState: TypeAlias = common_pb2.TurnState.ValueType
FinishReason: TypeAlias = common_pb2.FinishReason.ValueType

WORKSPACE_PREFIX = "ws"
CONVERSATION_PREFIX = "conv"
TURN_PREFIX = "turn"
APPROVAL_PREFIX = "apr"
API_KEY_PREFIX = "key"

# What a caller sees of a tool call the store had to close: the call never got its result.
INTERRUPTED_TOOL_RESULT = "Tool call was interrupted before it returned a result"

# An API key secret is this marker and 32 url-safe random characters (192 bits);
# only its SHA-256 is stored, and the first API_KEY_DISPLAY_CHARS tell keys apart.
API_KEY_SECRET_PREFIX = "dsp_"
API_KEY_RANDOM_BYTES = 24
API_KEY_DISPLAY_CHARS = 8

ApprovalDecision: TypeAlias = common_pb2.ApprovalDecision.ValueType

DEFAULT_WORKSPACE_NAME = "default"

# One Append carries at most one step's messages and events; anything bigger is
# a runaway tool output, and SQLite would hold its write lock for the whole copy.
MAX_APPEND_BYTES = 16 * 1024 * 1024

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

ROLES: frozenset[common_pb2.Role.ValueType] = frozenset(
    {common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_TOOL}
)

TERMINAL_STATES: frozenset[TurnState] = frozenset(
    {
        common_pb2.TURN_STATE_COMPLETED,
        common_pb2.TURN_STATE_FAILED,
        common_pb2.TURN_STATE_ABORTED,
        common_pb2.TURN_STATE_INTERRUPTED,
    }
)
# A turn that has not ended; of them, those that started (a cluster-wide limit counts them).
STARTED_STATES: tuple[TurnState, ...] = (
    common_pb2.TURN_STATE_RUNNING,
    common_pb2.TURN_STATE_WAITING_FOR_APPROVAL,
    common_pb2.TURN_STATE_RESUMING,
)
UNENDED_STATES: tuple[TurnState, ...] = (common_pb2.TURN_STATE_QUEUED, *STARTED_STATES)

# A new turn is either waiting for a run slot or already running.
INITIAL_STATES: frozenset[TurnState] = frozenset(
    {common_pb2.TURN_STATE_QUEUED, common_pb2.TURN_STATE_RUNNING}
)

# Where an append's move_to may take its fenced turn (from where, ``TRANSITIONS`` says).
MOVABLE_STATES: frozenset[TurnState] = frozenset(
    {
        common_pb2.TURN_STATE_WAITING_FOR_APPROVAL,
        common_pb2.TURN_STATE_RESUMING,
        common_pb2.TURN_STATE_RUNNING,
    }
)

TRANSITIONS: dict[TurnState, frozenset[TurnState]] = {
    common_pb2.TURN_STATE_QUEUED: frozenset({common_pb2.TURN_STATE_RUNNING, common_pb2.TURN_STATE_ABORTED}),
    common_pb2.TURN_STATE_RUNNING: frozenset(
        {
            common_pb2.TURN_STATE_WAITING_FOR_APPROVAL,
            common_pb2.TURN_STATE_COMPLETED,
            common_pb2.TURN_STATE_FAILED,
            common_pb2.TURN_STATE_ABORTED,
            common_pb2.TURN_STATE_INTERRUPTED,
        }
    ),
    common_pb2.TURN_STATE_WAITING_FOR_APPROVAL: frozenset(
        {
            common_pb2.TURN_STATE_RESUMING,
            common_pb2.TURN_STATE_ABORTED,
            common_pb2.TURN_STATE_FAILED,
            common_pb2.TURN_STATE_INTERRUPTED,
        }
    ),
    common_pb2.TURN_STATE_RESUMING: frozenset(
        {
            common_pb2.TURN_STATE_RUNNING,
            common_pb2.TURN_STATE_ABORTED,
            common_pb2.TURN_STATE_FAILED,
            common_pb2.TURN_STATE_INTERRUPTED,
        }
    ),
    **{state: frozenset() for state in TERMINAL_STATES},
}


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; ``next_page_token`` is empty on the last page."""

    items: list[T]
    next_page_token: str


@dataclass(frozen=True)
class Appended:
    """What an append committed: the messages as stored, and the new high-water marks."""

    messages: list[common_pb2.Message]
    # Both 0 when no message was appended: the range of this call, not the
    # conversation's high-water mark (the kernel announces a commit only when set).
    first_seq: int
    last_seq: int
    # The conversation's, whether or not this call carried events.
    last_event_seq: int
    # How many of ``messages`` (the last ones) were taken from the queue.
    dequeued: int = 0
    # The fenced turn after the call (sealed or released when asked); None unfenced.
    turn: common_pb2.Turn | None = None
    # The turn a sealing append started from the queue, and its user messages (numbered
    # after ``messages``); None and empty when the queue was empty or none was asked for.
    next_turn: common_pb2.Turn | None = None
    next_turn_messages: list[common_pb2.Message] = dataclasses.field(default_factory=list)
    # The conversation's after the call.
    reserved_event_seq: int = 0
    # The approvals the call created, in the order asked, as they stand after it.
    approvals: list[common_pb2.Approval] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class History:
    """Messages in seq order, and the conversation's highest seq (which may lie past a limit)."""

    messages: list[common_pb2.Message]
    last_seq: int


@dataclass(frozen=True)
class EventHistory:
    """Events in event_seq order, and the conversation's highest persisted event_seq."""

    events: list[common_pb2.AgentEvent]
    last_event_seq: int


@dataclass(frozen=True)
class Execution:
    """Where a turn's tools run: ``computer_id`` empty means this machine."""

    computer_id: str
    cwd: str
    workspace_root: str
    confine_tools: bool = False
    # The rules a turn applies besides its agent's (kernel/permissions.py).
    workspace_id: str = ""
    workspace_permissions: list[common_pb2.PermissionRule] = dataclasses.field(default_factory=list)
    remembered: list[common_pb2.PermissionRule] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class LeaseFence:
    """A write that belongs to ``turn_id`` and happens only while ``owner`` holds the turn's
    lease with ``epoch`` (the lease_epoch its claim answered)."""

    turn_id: str
    owner: str
    epoch: int


@dataclass(frozen=True)
class TurnSeal:
    """How an append ends its fenced turn: a terminal state, why, and the error if any."""

    state: TurnState
    finish_reason: FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED
    error_message: str = ""


@dataclass(frozen=True)
class NextTurn:
    """The turn a sealing append starts from the queued messages, leased to the fence's owner."""

    lease_ttl: datetime.timedelta
    state: TurnState = common_pb2.TURN_STATE_QUEUED
    agent: str = ""
    reserve_event_seq: int = 0


@dataclass(frozen=True)
class LeaseRef:
    """One lease of a batch renewal; ``epoch`` 0 matches any epoch."""

    tenant_id: str
    turn_id: str
    epoch: int = 0


@dataclass(frozen=True)
class Lease:
    """What the lease rules read of a turn: its state and who holds it, since which claim."""

    turn_id: str
    conversation_id: str
    state: TurnState
    owner: str
    epoch: int
    expires_at_ns: int

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES


def steering_messages(queued: Sequence[store_pb2.QueuedMessage], turn_id: str) -> list[common_pb2.Message]:
    """Queued messages as the user messages of ``turn_id`` that they become when taken."""
    return [
        common_pb2.Message(role=common_pb2.ROLE_USER, chunks=q.message.chunks, turn_id=turn_id)
        for q in queued
    ]


def state_name(state: int) -> str:
    """``TURN_STATE_WAITING_FOR_APPROVAL`` → ``waiting_for_approval``, for messages people read."""
    try:
        return common_pb2.TurnState.Name(state).removeprefix("TURN_STATE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return f"unknown state {state}"


def check_transition(turn_id: str, current: TurnState, to: TurnState) -> None:
    """Raise ``FailedPrecondition`` unless the state machine allows ``current`` → ``to``."""
    if to in TRANSITIONS.get(current, frozenset()):
        return
    allowed = sorted(TRANSITIONS.get(current, frozenset()))
    hint = (
        "it has ended"
        if current in TERMINAL_STATES
        else "from there it may move to " + ", ".join(state_name(s) for s in allowed)
    )
    raise FailedPrecondition(
        f"turn {turn_id} is {state_name(current)}; cannot move to {state_name(to)} ({hint})"
    )


def initial_state(state: TurnState) -> TurnState:
    """The state a new turn starts in: queued unless given; only queued or running."""
    if state == common_pb2.TURN_STATE_UNSPECIFIED:
        return common_pb2.TURN_STATE_QUEUED
    if state not in INITIAL_STATES:
        raise InvalidArgument(f"a turn starts queued or running, not {state_name(state)}")
    return state


def effective_page_size(requested: int) -> int:
    """The number of rows to return for a requested page size (0 = the default)."""
    if requested < 0:
        raise InvalidArgument(f"page_size must be 0 or more, got {requested}")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_cursor(created_at_ns: int, row_id: str) -> str:
    """An opaque page token pointing just past the row ``(created_at_ns, row_id)``."""
    return base64.urlsafe_b64encode(f"{created_at_ns}:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[int, str] | None:
    """The row a page token points past; ``None`` for the empty token (the first page)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, row_id = raw.split(":", 1)
        return int(created), row_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument(
            f"page_token {token!r} is not a token this store issued; pass next_page_token back unchanged"
        ) from None


def validate_append(
    conversation_id: str,
    messages: Sequence[common_pb2.Message],
    events: Sequence[common_pb2.AgentEvent],
    max_bytes: int = MAX_APPEND_BYTES,
    *,
    allow_empty: bool = False,
    extra_bytes: int = 0,
) -> None:
    """Check an append's content before it touches the database.

    Raises ``InvalidArgument`` for an empty append (unless it has something else to do),
    a message without a role or chunks, an event without a kind, or anything
    addressed to another conversation; ``ResourceExhausted`` past ``max_bytes``.
    """
    if not messages and not events and not allow_empty:
        raise InvalidArgument("append needs at least one message or event")
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            raise InvalidArgument(
                f"message {i} has no valid role (got {msg.role}); set system, user, assistant or tool"
            )
        if not msg.chunks:
            raise InvalidArgument(f"message {i} has no chunks")
        for j, chunk in enumerate(msg.chunks):
            if chunk.WhichOneof("kind") is None:
                raise InvalidArgument(
                    f"chunk {j} of message {i} is empty: set text, thinking, tool_call, ..."
                )
        if msg.step_index < 0:
            raise InvalidArgument(f"message {i} has step_index {msg.step_index}; it must be 0 or more")
        if msg.conversation_id and msg.conversation_id != conversation_id:
            raise InvalidArgument(
                f"message {i} belongs to conversation {msg.conversation_id}, not {conversation_id}"
            )
    for i, event in enumerate(events):
        if event.WhichOneof("kind") is None:
            raise InvalidArgument(f"event {i} (event_seq {event.event_seq}) has no kind")
        if event.conversation_id and event.conversation_id != conversation_id:
            raise InvalidArgument(
                f"event {i} belongs to conversation {event.conversation_id}, not {conversation_id}"
            )
    size = sum(m.ByteSize() for m in messages) + sum(e.ByteSize() for e in events) + extra_bytes
    if size > max_bytes:
        raise ResourceExhausted(
            f"append of {size} bytes is over the store's limit of {max_bytes} bytes "
            f"({max_bytes / (1024 * 1024):g} MiB) per call; truncate large tool output or split the append"
        )


def check_event_seqs(events: Sequence[common_pb2.AgentEvent], last_event_seq: int) -> None:
    """Raise ``InvalidArgument`` unless event_seqs rise strictly from above ``last_event_seq``."""
    previous = last_event_seq
    for i, event in enumerate(events):
        if event.event_seq <= previous:
            what = "the conversation's last_event_seq" if i == 0 else f"event {i - 1}'s event_seq"
            raise InvalidArgument(
                f"event {i} has event_seq {event.event_seq}, not above {what} ({previous}); "
                "event_seq must rise strictly"
            )
        previous = event.event_seq


# ----------------------------------------------------------------- leases


def lease_ttl_ns(ttl: datetime.timedelta, field: str = "ttl") -> int:
    """A lease's time to live in nanoseconds; ``InvalidArgument`` unless it is positive."""
    if ttl <= datetime.timedelta(0):
        raise InvalidArgument(f"{field} must be positive, got {ttl.total_seconds():g}s")
    return (ttl.days * 86_400 + ttl.seconds) * 1_000_000_000 + ttl.microseconds * 1_000


def _format_ns(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC).isoformat(timespec="milliseconds")


def lease_is_held(holder: str, expires_at_ns: int, now_ns: int) -> bool:
    """Whether somebody holds a lease that has not expired at ``now_ns``."""
    return bool(holder) and expires_at_ns > now_ns


def _whose(owner: str, epoch: int) -> str:
    return f"{owner} (epoch {epoch})" if epoch else owner


def _holder(lease: Lease) -> str:
    """Who holds the turn now, for the messages of refusals."""
    if lease.ended:
        return f"it has ended ({state_name(lease.state)}) and nobody holds it"
    if not lease.owner:
        return "nobody holds it (released or never claimed)"
    return f"{lease.owner} holds it (epoch {lease.epoch}, until {_format_ns(lease.expires_at_ns)})"


def holds_lease(lease: Lease, owner: str, epoch: int = 0) -> bool:
    """Whether ``owner`` (with ``epoch``; 0 = any) holds the lease of a turn that has not ended.

    Expiry alone takes nothing away: until another owner claims the turn, its holder is
    still the only writer (the store serializes writes), so it may renew and write on.
    """
    return not lease.ended and bool(owner) and lease.owner == owner and epoch in (0, lease.epoch)


def check_lease_held(lease: Lease, owner: str, epoch: int = 0) -> None:
    """``FailedPrecondition`` ("lease lost: ...", naming the holder now) unless ``holds_lease``."""
    if not holds_lease(lease, owner, epoch):
        raise FailedPrecondition(
            f"lease lost: turn {lease.turn_id} is not leased to {_whose(owner, epoch)}; {_holder(lease)}"
        )


def check_fence(fence: LeaseFence, lease: Lease | None, conversation_id: str) -> None:
    """``FailedPrecondition`` ("lease lost: ...") unless the fence holds: its turn exists in
    this tenant and conversation, has not ended, and is leased to its owner with its epoch.

    An unknown turn is a lost lease too, so another tenant's turn reads like no turn at all.
    """
    if lease is None or lease.conversation_id != conversation_id:
        raise FailedPrecondition(
            f"lease lost: turn {fence.turn_id} is not a turn of conversation {conversation_id}; "
            "nobody holds it"
        )
    check_lease_held(lease, fence.owner, fence.epoch)


def check_lease_claim(
    turn_id: str, state: TurnState, *, holder: str, expires_at_ns: int, owner: str, now_ns: int
) -> None:
    """Raise ``FailedPrecondition`` unless ``owner`` may claim the turn's lease now.

    A claim succeeds on a live turn whose lease is free, expired, or already ``owner``'s.
    """
    if state in TERMINAL_STATES:
        raise FailedPrecondition(f"turn {turn_id} is {state_name(state)}; an ended turn cannot be leased")
    if holder != owner and lease_is_held(holder, expires_at_ns, now_ns):
        raise FailedPrecondition(
            f"turn {turn_id} is leased to {holder} until {_format_ns(expires_at_ns)}; "
            "it can be claimed once that lease expires or is released"
        )


def claimed_lease_fields(lease: Lease, attempts: int, owner: str, expires_at_ns: int) -> dict[str, Any]:
    """The turn's columns after a claim: every claim is a new epoch and a new attempt, so a
    write fenced with the epoch before it is refused."""
    return {
        "lease_owner": owner,
        "lease_expires_at": expires_at_ns,
        "lease_epoch": lease.epoch + 1,
        "attempts": attempts + 1,
    }


def released_lease_fields() -> dict[str, Any]:
    """The turn's columns once nobody holds it. The epoch stays: the next claim goes past it."""
    return {"lease_owner": "", "lease_expires_at": 0}


def check_lease_release(lease: Lease, owner: str, epoch: int, now_ns: int) -> bool:
    """Whether releasing clears the lease: it does when ``owner`` (with ``epoch``; 0 = any)
    holds it, ended turn or not.

    Releasing a lease nobody holds any more is a no-op (``False``), so a retried release
    succeeds; a live lease of another owner, or a later claim of the same owner, is
    ``FailedPrecondition``.
    """
    if lease.owner == owner and epoch in (0, lease.epoch):
        return True
    if lease_is_held(lease.owner, lease.expires_at_ns, now_ns):
        raise FailedPrecondition(
            f"turn {lease.turn_id} is leased to {_whose(lease.owner, lease.epoch)} until "
            f"{_format_ns(lease.expires_at_ns)}, not to {_whose(owner, epoch)}; "
            "only the holder may release it"
        )
    return False


def check_fence_fields(fence: LeaseFence, field: str = "fence") -> None:
    """``InvalidArgument`` unless a fence names its turn, its owner and a claim's epoch."""
    if not fence.turn_id:
        raise InvalidArgument(f"{field}.turn_id is required")
    if not fence.owner:
        raise InvalidArgument(f"{field}.owner is required")
    if fence.epoch <= 0:
        raise InvalidArgument(
            f"{field}.epoch must be the lease_epoch of the claim (1 or more), got {fence.epoch}"
        )


# ------------------------------------------------------- event_seq reservations


def raised_reservation(reserved: int, last_event_seq: int, wanted: int = 0) -> int:
    """reserved_event_seq after a raise to ``wanted``: it never lowers, and it is never
    below what is persisted."""
    return max(reserved, last_event_seq, wanted)


def reservation_after_append(
    reserved: int,
    last_event_seq: int,
    reserve_event_seq: int,
    *,
    lowered: bool,
    next_turn_reserve: int | None = None,
) -> int:
    """reserved_event_seq after an append that persisted up to ``last_event_seq``.

    A seal or a release (``lowered``) brings it down to ``last_event_seq``: the kernel that
    numbered events past it sent none of them. A next turn then raises it to its own
    reservation.
    """
    after = last_event_seq if lowered else raised_reservation(reserved, last_event_seq, reserve_event_seq)
    if next_turn_reserve is not None:
        after = max(after, next_turn_reserve)
    return after


def check_reservation(value: int, field: str) -> int:
    """``InvalidArgument`` for a negative event_seq reservation."""
    if value < 0:
        raise InvalidArgument(f"{field} must be 0 or more, got {value}")
    return value


# ------------------------------------------------------------- turn rows


def transition_fields(
    *,
    started_at: int,
    to: TurnState,
    now_ns: int,
    finish_reason: FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED,
    error_message: str = "",
    user_message_seq: int = 0,
) -> dict[str, Any]:
    """The turn's columns after a move to ``to`` (already checked with ``check_transition``):
    running stamps started_at once, a terminal state stamps ended_at; the outcome is kept
    when given."""
    fields: dict[str, Any] = {"state": to}
    if to == common_pb2.TURN_STATE_RUNNING and not started_at:
        fields["started_at"] = now_ns
    if to in TERMINAL_STATES:
        fields["ended_at"] = now_ns
    if finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
        fields["finish_reason"] = finish_reason
    if error_message:
        fields["error_message"] = error_message
    if user_message_seq:
        fields["user_message_seq"] = user_message_seq
    return fields


def sealed_fields(lease: Lease, started_at: int, seal: TurnSeal, now_ns: int) -> dict[str, Any]:
    """The fenced turn's columns after a seal: ended as the seal says (``check_transition``
    applies), its lease released."""
    check_transition(lease.turn_id, lease.state, seal.state)
    return {
        **transition_fields(
            started_at=started_at,
            to=seal.state,
            now_ns=now_ns,
            finish_reason=seal.finish_reason,
            error_message=seal.error_message,
        ),
        **released_lease_fields(),
    }


def new_turn_row(
    turn_id: str,
    tenant_id: str,
    conversation_id: str,
    *,
    state: TurnState,
    now_ns: int,
    idempotency_key: str = "",
    computer_id: str = "",
    cwd: str = "",
    agent: str = "",
    lease_owner: str = "",
    lease_expires_at: int = 0,
    user_message_seq: int = 0,
) -> dict[str, Any]:
    """Every column of a new turn. A turn born leased is its first attempt under epoch 1;
    one born unleased gets both from its first claim."""
    leased = 1 if lease_owner else 0
    return {
        "id": turn_id,
        "tenant_id": tenant_id,
        "conversation_id": conversation_id,
        "state": state,
        "idempotency_key": idempotency_key,
        "lease_owner": lease_owner,
        "lease_expires_at": lease_expires_at if lease_owner else 0,
        "lease_epoch": leased,
        "attempts": leased,
        "finish_reason": common_pb2.FINISH_REASON_UNSPECIFIED,
        "error_message": "",
        "computer_id": computer_id,
        "cwd": cwd,
        "agent": agent,
        "user_message_seq": user_message_seq,
        "created_at": now_ns,
        "started_at": now_ns if state == common_pb2.TURN_STATE_RUNNING else 0,
        "ended_at": 0,
    }


def _in_flight(lease: Lease) -> str:
    holder = (
        f"leased to {lease.owner} (epoch {lease.epoch}) until {_format_ns(lease.expires_at_ns)}"
        if lease.owner
        else "leased to nobody"
    )
    return f"turn {lease.turn_id} ({state_name(lease.state)}, {holder})"


def check_no_turn_in_flight(conversation_id: str, in_flight: Lease | None) -> None:
    """``FailedPrecondition`` ("turn in flight: ...", naming the turn, its state and its lease
    holder) when the conversation has a turn that has not ended."""
    if in_flight is not None:
        raise FailedPrecondition(
            f"turn in flight: conversation {conversation_id} has {_in_flight(in_flight)}; "
            "wait for it to end, or queue the message behind it"
        )


def check_turn_in_flight(conversation_id: str, in_flight: Lease | None) -> None:
    """``FailedPrecondition`` ("no turn in flight: ...") unless the conversation has a turn
    that has not ended: a message queued behind none would wait for no one."""
    if in_flight is None:
        raise FailedPrecondition(
            f"no turn in flight: conversation {conversation_id} has no turn that has not ended, "
            "so a queued message would wait for no one; start a turn with it instead"
        )


def turn_user_messages(
    conversation_id: str, turn_id: str, messages: Sequence[common_pb2.Message], max_bytes: int
) -> list[common_pb2.Message]:
    """The user messages a new turn starts with, as appended: role user, turn ``turn_id``;
    ``InvalidArgument`` (as for an append) for one history would refuse."""
    copies = []
    for message in messages:
        copy = common_pb2.Message()
        copy.CopyFrom(message)
        copy.role = common_pb2.ROLE_USER
        copy.turn_id = turn_id
        copies.append(copy)
    validate_append(conversation_id, copies, (), max_bytes, allow_empty=True)
    return copies


def check_new_turn_lease(lease_owner: str, lease_ttl: datetime.timedelta | None) -> int:
    """The lease a new turn is born with, in nanoseconds (0: none). A lease needs an owner
    and a positive lease_ttl, and a lease_ttl needs an owner."""
    if lease_owner:
        return lease_ttl_ns(lease_ttl or datetime.timedelta(0), "lease_ttl")
    if lease_ttl:
        raise InvalidArgument("lease_ttl is set but lease_owner is empty: say who the turn is leased to")
    return 0


def check_append_request(
    conversation_id: str,
    messages: Sequence[common_pb2.Message],
    events: Sequence[common_pb2.AgentEvent],
    max_bytes: int = MAX_APPEND_BYTES,
    *,
    take_queue_for_turn: str = "",
    fence: LeaseFence | None = None,
    reserve_event_seq: int = 0,
    seal: TurnSeal | None = None,
    release_lease: bool = False,
    next_turn: NextTurn | None = None,
    approvals: Sequence[common_pb2.Approval] = (),
    move_to: TurnState = common_pb2.TURN_STATE_UNSPECIFIED,
    step_metrics: Sequence[common_pb2.StepMetrics] = (),
    turn_metrics: common_pb2.TurnMetrics | None = None,
) -> list[common_pb2.Approval]:
    """Check an append request before it touches the database: its content
    (``validate_append``) and how its parts go together. seal, release_lease, next_turn,
    approvals and move_to act on a fenced turn; next_turn only with seal; a fenced append
    steers only its own turn; a seal ends the turn (a terminal state); move_to keeps it going
    (``MOVABLE_STATES``), so not with a seal; a next turn starts queued or running.

    Answers the approvals to create (``check_appended_approvals``)."""
    check_reservation(reserve_event_seq, "reserve_event_seq")
    if fence is None:
        for name, given in (
            ("seal", seal is not None),
            ("release_lease", release_lease),
            ("next_turn", next_turn is not None),
            ("approvals", bool(approvals)),
            ("move_to", move_to != common_pb2.TURN_STATE_UNSPECIFIED),
            ("step_metrics", bool(step_metrics)),
            ("turn_metrics", turn_metrics is not None),
        ):
            if given:
                raise InvalidArgument(
                    f"{name} needs a fence: the lease (turn_id, owner, epoch) it acts under"
                )
    else:
        check_fence_fields(fence)
        if take_queue_for_turn and take_queue_for_turn != fence.turn_id:
            raise InvalidArgument(
                f"take_queue_for_turn is {take_queue_for_turn}, not the fenced turn {fence.turn_id}; "
                "a fenced append steers only its own turn"
            )
    if seal is not None and seal.state not in TERMINAL_STATES:
        raise InvalidArgument(
            "seal.state must be a terminal state (completed, failed, aborted or interrupted), "
            f"got {state_name(seal.state)}"
        )
    if move_to != common_pb2.TURN_STATE_UNSPECIFIED:
        if move_to not in MOVABLE_STATES:
            raise InvalidArgument(
                "move_to must be a state that has not ended (waiting_for_approval, resuming or "
                f"running), got {state_name(move_to)}; a seal ends a turn"
            )
        if seal is not None:
            raise InvalidArgument(
                "move_to and seal both set the turn's state: a seal ends it, move_to does not"
            )
    if next_turn is not None:
        if seal is None:
            raise InvalidArgument("next_turn needs seal: the next turn starts only as this one ends")
        initial_state(next_turn.state)
        lease_ttl_ns(next_turn.lease_ttl, "next_turn.lease_ttl")
        check_reservation(next_turn.reserve_event_seq, "next_turn.reserve_event_seq")
    created = check_appended_approvals(approvals, conversation_id, fence.turn_id) if fence is not None else []
    acts = (
        bool(take_queue_for_turn)
        or seal is not None
        or release_lease
        or reserve_event_seq > 0
        or bool(created)
        or move_to != common_pb2.TURN_STATE_UNSPECIFIED
        or bool(step_metrics)
        or turn_metrics is not None
    )
    validate_append(
        conversation_id,
        messages,
        events,
        max_bytes,
        allow_empty=acts,
        extra_bytes=sum(a.ByteSize() for a in created),
    )
    return created


# -------------------------------------------------------------- reconcile


def synthesize_missing_results(
    history: Sequence[common_pb2.Message], waiting: Collection[tuple[str, str]] = ()
) -> list[common_pb2.Message]:
    """Tool messages answering every tool call in ``history`` that has no result.

    One ROLE_TOOL message per message that carried dangling calls (a step), with
    that message's turn and step, each result an error with the call's name and
    step_id. Empty when nothing dangles. seq and conversation are left for the
    append to fill in. A call in ``waiting`` (turn id, tool call id: it has an approval
    and its turn goes on) is its turn's to answer, and is left alone.
    """
    answered = {
        chunk.tool_result.tool_call_id
        for msg in history
        for chunk in msg.chunks
        if chunk.WhichOneof("kind") == "tool_result"
    }
    synthesized: list[common_pb2.Message] = []
    for msg in history:
        results = []
        for chunk in msg.chunks:
            if chunk.WhichOneof("kind") != "tool_call" or chunk.tool_call.id in answered:
                continue
            if (msg.turn_id, chunk.tool_call.id) in waiting:
                continue
            call = chunk.tool_call
            answered.add(call.id)
            results.append(
                common_pb2.Chunk(
                    tool_result=common_pb2.ToolResultChunk(
                        tool_call_id=call.id,
                        name=call.name,
                        content=INTERRUPTED_TOOL_RESULT,
                        is_error=True,
                        step_id=call.step_id,
                    )
                )
            )
        if results:
            synthesized.append(
                common_pb2.Message(
                    role=common_pb2.ROLE_TOOL,
                    chunks=results,
                    turn_id=msg.turn_id,
                    step_index=msg.step_index,
                )
            )
    return synthesized


# ---------------------------------------------------------------- metrics


def check_turn_metrics(metrics: common_pb2.TurnMetrics) -> None:
    """``InvalidArgument`` unless the turn metrics name their turn and carry no step metrics."""
    if not metrics.turn_id:
        raise InvalidArgument("metrics.turn_id is required")
    if metrics.step_metrics:
        raise InvalidArgument("turn metrics carry no step_metrics; record each step with RecordStepMetrics")


def appended_metrics(
    conversation_id: str,
    fence: LeaseFence | None,
    step_metrics: Sequence[common_pb2.StepMetrics],
    turn_metrics: common_pb2.TurnMetrics | None,
) -> tuple[list[common_pb2.StepMetrics], common_pb2.TurnMetrics | None]:
    """The metrics a fenced append records, as stored: each must be the fenced turn's
    (``InvalidArgument`` naming the one that is not; the fence check makes the turn the
    conversation's); a turn's may leave its turn_id out."""
    if fence is None:
        return [], None
    steps = []
    for i, metrics in enumerate(step_metrics):
        stored = normalized_step_metrics(metrics)
        if stored.turn_id != fence.turn_id:
            raise InvalidArgument(
                f"step_metrics[{i}].turn_id is {stored.turn_id}, not the fenced turn {fence.turn_id}"
            )
        steps.append(stored)
    if turn_metrics is None:
        return steps, None
    if turn_metrics.turn_id and turn_metrics.turn_id != fence.turn_id:
        raise InvalidArgument(
            f"turn_metrics.turn_id is {turn_metrics.turn_id}, not the fenced turn {fence.turn_id}"
        )
    totals = common_pb2.TurnMetrics()
    totals.CopyFrom(turn_metrics)
    totals.turn_id = fence.turn_id
    totals.conversation_id = conversation_id
    check_turn_metrics(totals)
    return steps, totals


def normalized_step_metrics(metrics: common_pb2.StepMetrics) -> common_pb2.StepMetrics:
    """The step metrics as stored: step_id filled in from turn and step; ``InvalidArgument``
    for a missing turn, a negative step index or a step_id of another step."""
    if not metrics.turn_id:
        raise InvalidArgument("metrics.turn_id is required")
    if metrics.step_index < 0:
        raise InvalidArgument(f"metrics.step_index must be 0 or more, got {metrics.step_index}")
    expected = step_id(metrics.turn_id, metrics.step_index)
    if metrics.step_id and metrics.step_id != expected:
        raise InvalidArgument(f"metrics.step_id is {metrics.step_id!r}, but turn and step say {expected!r}")
    stored = common_pb2.StepMetrics()
    stored.CopyFrom(metrics)
    stored.step_id = expected
    return stored


# ------------------------------------------------------------------ queue


def check_queued_message(conversation_id: str, message: common_pb2.Message) -> None:
    """``InvalidArgument`` unless ``message`` could be appended to the conversation."""
    if message.ByteSize() == 0:
        raise InvalidArgument("message is required")
    validate_append(conversation_id, [message], [])


# -------------------------------------------------------------- approvals


def _json_object(text: str, field: str) -> None:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{field} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a JSON object, got {type(value).__name__}")


def decision_name(decision: int) -> str:
    """``APPROVAL_DECISION_EDIT`` → ``edit``, for messages people read."""
    try:
        return common_pb2.ApprovalDecision.Name(decision).removeprefix("APPROVAL_DECISION_").lower()  # type: ignore[arg-type]
    except ValueError:
        return f"unknown decision {decision}"


def check_new_approval(approval: common_pb2.Approval, field: str = "approval") -> None:
    """``InvalidArgument`` unless the approval names its conversation, turn and call and is pending."""
    for name in ("conversation_id", "turn_id", "tool_call_id", "tool_name"):
        if not getattr(approval, name):
            raise InvalidArgument(f"{field}.{name} is required")
    if approval.input_json:
        _json_object(approval.input_json, f"{field}.input_json")
    if approval.decision != common_pb2.APPROVAL_DECISION_UNSPECIFIED:
        raise InvalidArgument(f"{field} is new, so pending: leave decision unset and resolve it later")


def check_appended_approvals(
    approvals: Sequence[common_pb2.Approval], conversation_id: str, turn_id: str
) -> list[common_pb2.Approval]:
    """The approvals an append creates, for the fenced turn and its conversation: copies with
    both filled in where empty; ``InvalidArgument`` (naming the index) for one of another
    turn or conversation, one ``check_new_approval`` refuses, or a call asked about twice."""
    copies: list[common_pb2.Approval] = []
    seen: set[str] = set()
    for i, approval in enumerate(approvals):
        field = f"approvals[{i}]"
        copy = common_pb2.Approval()
        copy.CopyFrom(approval)
        for name, wanted in (("conversation_id", conversation_id), ("turn_id", turn_id)):
            given = getattr(copy, name)
            if given and given != wanted:
                raise InvalidArgument(
                    f"{field}.{name} is {given}, not {wanted}: an append creates approvals "
                    "for its fenced turn only"
                )
            setattr(copy, name, wanted)
        check_new_approval(copy, field)
        if copy.tool_call_id in seen:
            raise InvalidArgument(f"{field} asks about tool call {copy.tool_call_id} again")
        seen.add(copy.tool_call_id)
        copies.append(copy)
    return copies


def new_approval(
    approval: common_pb2.Approval, approval_id: str, tenant_id: str, now_ns: int
) -> common_pb2.Approval:
    """A pending approval as stored: its id, tenant and creation time; nothing decided yet
    (decision, edited input, reason, who decided, remember, resolved_at cleared). Its rule,
    step and expiry are kept as given."""
    stored = common_pb2.Approval()
    stored.CopyFrom(approval)
    stored.id = approval_id
    stored.tenant_id = tenant_id
    for name in ("decision", "edited_input_json", "reason", "decided_by", "remember", "resolved_at"):
        stored.ClearField(name)
    stored.created_at.FromNanoseconds(now_ns)
    return stored


# Who decides the approvals that nobody did: closed with their turn, or expired.
KERNEL_DECIDER = "kernel"
CLOSED_REASON = "the turn ended before it was decided"

APPROVAL_DECISIONS: frozenset[ApprovalDecision] = frozenset(
    d for d in common_pb2.ApprovalDecision.values() if d != common_pb2.APPROVAL_DECISION_UNSPECIFIED
)
# The decisions that let the call run, so the only ones that may be remembered.
APPROVING: frozenset[ApprovalDecision] = frozenset(
    {common_pb2.APPROVAL_DECISION_APPROVE, common_pb2.APPROVAL_DECISION_EDIT}
)


def check_resolution(
    decision: ApprovalDecision,
    edited_input_json: str,
    *,
    remember: bool = False,
    remembered_rule: common_pb2.PermissionRule | None = None,
) -> None:
    """``InvalidArgument`` unless the decision is one, edited input comes exactly with EDIT
    (a JSON object), and a remembered rule comes exactly with remember, which only an
    approval (approve or edit) takes; the rule names its tool and allows."""
    if decision not in APPROVAL_DECISIONS:
        raise InvalidArgument(
            f"decision must be approve, reject, edit, expired or closed, got {decision_name(decision)}"
        )
    if decision == common_pb2.APPROVAL_DECISION_EDIT:
        if not edited_input_json:
            raise InvalidArgument("an edit decision needs edited_input_json")
        _json_object(edited_input_json, "edited_input_json")
    elif edited_input_json:
        raise InvalidArgument("edited_input_json is only taken with an edit decision")
    given = remembered_rule is not None and remembered_rule.ByteSize() > 0
    if not remember:
        if given:
            raise InvalidArgument("remembered_rule is only taken with remember")
        return
    if decision not in APPROVING:
        raise InvalidArgument(f"remember is only taken with approve or edit, not {decision_name(decision)}")
    if remembered_rule is None or not given:
        raise InvalidArgument("remember needs remembered_rule: the tool and pattern to allow from now on")
    if not remembered_rule.tool:
        raise InvalidArgument("remembered_rule.tool is required")
    if remembered_rule.action != common_pb2.PERMISSION_ACTION_ALLOW:
        raise InvalidArgument(
            f"remembered_rule.action must be allow, got {action_name(remembered_rule.action)}"
        )


_DECIDED: dict[int, str] = {
    common_pb2.APPROVAL_DECISION_APPROVE: "approved",
    common_pb2.APPROVAL_DECISION_REJECT: "rejected",
    common_pb2.APPROVAL_DECISION_EDIT: "approved with edited input",
    common_pb2.APPROVAL_DECISION_EXPIRED: "expired",
    common_pb2.APPROVAL_DECISION_CLOSED: "closed",
}


def check_pending(approval: common_pb2.Approval) -> None:
    """``FailedPrecondition`` ("already decided: ...", saying what and by whom) unless the
    approval is pending."""
    if approval.decision == common_pb2.APPROVAL_DECISION_UNSPECIFIED:
        return
    who = approval.decided_by or "a caller that gave no name"
    when = (
        f" at {_format_ns(approval.resolved_at.ToNanoseconds())}" if approval.HasField("resolved_at") else ""
    )
    why = f" ({approval.reason})" if approval.reason else ""
    raise FailedPrecondition(
        f"already decided: approval {approval.id} was {_DECIDED.get(approval.decision, 'decided')} "
        f"by {who}{when}{why}"
    )


def decided_approval(
    approval: common_pb2.Approval,
    decision: ApprovalDecision,
    now_ns: int,
    *,
    edited_input_json: str = "",
    reason: str = "",
    decided_by: str = "",
    remember: bool = False,
) -> common_pb2.Approval:
    """The approval after its decision (``check_resolution`` and ``check_pending`` applied)."""
    stored = common_pb2.Approval()
    stored.CopyFrom(approval)
    stored.decision = decision
    stored.edited_input_json = edited_input_json
    stored.reason = reason
    stored.decided_by = decided_by
    stored.remember = remember
    stored.resolved_at.FromNanoseconds(now_ns)
    return stored


def closed_approval(approval: common_pb2.Approval, error_message: str, now_ns: int) -> common_pb2.Approval:
    """A pending approval whose turn ended: closed by the kernel, with the turn's error as
    the reason (else ``CLOSED_REASON``)."""
    return decided_approval(
        approval,
        common_pb2.APPROVAL_DECISION_CLOSED,
        now_ns,
        reason=error_message or CLOSED_REASON,
        decided_by=KERNEL_DECIDER,
    )


def check_approvable_turn(turn_id: str, state: TurnState) -> None:
    """``FailedPrecondition`` for an approval on a turn that has ended: nobody would run the
    call, and nothing would ever close it."""
    if state in TERMINAL_STATES:
        raise FailedPrecondition(
            f"turn {turn_id} has ended ({state_name(state)}); an approval needs a turn that goes on"
        )


# ------------------------------------------------------- permission rules

PERMISSION_ACTIONS: frozenset[int] = frozenset(
    {common_pb2.PERMISSION_ACTION_ALLOW, common_pb2.PERMISSION_ACTION_ASK, common_pb2.PERMISSION_ACTION_DENY}
)


def action_name(action: int) -> str:
    """``PERMISSION_ACTION_ASK`` → ``ask``; the unset action reads ``unspecified``."""
    try:
        return common_pb2.PermissionAction.Name(action).removeprefix("PERMISSION_ACTION_").lower()  # type: ignore[arg-type]
    except ValueError:
        return f"unknown action {action}"


def check_permission_rules(rules: Sequence[common_pb2.PermissionRule], field: str = "permissions") -> None:
    """``InvalidArgument`` naming the rule's index unless every rule names a tool and an
    action. Only the shape: what a pattern means is the kernel's (kernel/permissions.py)."""
    for i, rule in enumerate(rules):
        if not rule.tool:
            raise InvalidArgument(f'{field}[{i}].tool is required: a tool\'s name, or "*" for any tool')
        if rule.action not in PERMISSION_ACTIONS:
            raise InvalidArgument(
                f"{field}[{i}].action must be allow, ask or deny, got {action_name(rule.action)}"
            )


def remembered_after(
    remembered: Sequence[common_pb2.PermissionRule], rule: common_pb2.PermissionRule
) -> list[common_pb2.PermissionRule] | None:
    """The conversation's remembered rules with ``rule`` appended, or None when an identical
    rule is already there."""
    if any(r == rule for r in remembered):
        return None
    return [*remembered, rule]


# --------------------------------------------------------------- api keys


def new_api_key_secret() -> str:
    """A fresh API key secret; shown once, never stored."""
    return API_KEY_SECRET_PREFIX + secrets.token_urlsafe(API_KEY_RANDOM_BYTES)


def hash_api_key(secret: str) -> str:
    """The stored form of a secret. A plain SHA-256 suffices: the secret is 192 random bits,
    so there is nothing to brute-force that a slow hash would protect."""
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_prefix(secret: str) -> str:
    """The first characters of a secret, to tell keys apart in listings."""
    return secret[:API_KEY_DISPLAY_CHARS]


class Store(abc.ABC):
    """The conversation store's operations, scoped by tenant.

    Every method takes a non-empty ``tenant_id``; a row of another tenant is
    reported as ``NotFound``, exactly like a row that does not exist. Errors are
    the domain errors of ``dispatch.shared.errors``.
    """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the database; later calls fail with ``Unavailable``. Safe to call twice."""

    # ------------------------------------------------------------ workspaces

    @abc.abstractmethod
    async def create_workspace(
        self,
        tenant_id: str,
        *,
        name: str,
        root: str,
        default_computer_id: str = "",
        default_agent: str = "",
        confine_tools: bool = False,
        permissions: Sequence[common_pb2.PermissionRule] = (),
    ) -> common_pb2.Workspace:
        """Create a workspace rooted at ``root``, with its permission rules
        (``check_permission_rules``)."""

    @abc.abstractmethod
    async def get_workspace(self, tenant_id: str, workspace_id: str) -> common_pb2.Workspace:
        """The workspace, or ``NotFound``."""

    @abc.abstractmethod
    async def list_workspaces(
        self, tenant_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Workspace]:
        """The tenant's workspaces, oldest first."""

    @abc.abstractmethod
    async def set_default_workspace_root(self, root: str) -> int:
        """Make ``root`` the root of every tenant's default workspace, and of those made
        from now on; answers how many existing ones changed."""

    @abc.abstractmethod
    async def update_workspace(
        self,
        tenant_id: str,
        workspace_id: str,
        *,
        name: str | None = None,
        root: str | None = None,
        default_computer_id: str | None = None,
        default_agent: str | None = None,
        confine_tools: bool | None = None,
        permissions: Sequence[common_pb2.PermissionRule] | None = None,
    ) -> common_pb2.Workspace:
        """Set the fields that are not ``None`` (``permissions`` replaces every rule);
        answer the workspace as updated."""

    # --------------------------------------------------------- conversations

    @abc.abstractmethod
    async def create_conversation(
        self,
        tenant_id: str,
        *,
        workspace_id: str = "",
        title: str = "",
        cwd: str = "",
        computer_id: str = "",
        agent: str = "",
    ) -> common_pb2.Conversation:
        """Create a conversation; an empty ``workspace_id`` means the tenant's default
        workspace, created on first use."""

    @abc.abstractmethod
    async def get_conversation(self, tenant_id: str, conversation_id: str) -> common_pb2.Conversation:
        """The conversation, or ``NotFound``."""

    @abc.abstractmethod
    async def list_conversations(
        self, tenant_id: str, *, workspace_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[common_pb2.Conversation]:
        """The tenant's conversations (of one workspace when given), newest first."""

    @abc.abstractmethod
    async def update_conversation(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        title: str | None = None,
        cwd: str | None = None,
        computer_id: str | None = None,
        agent: str | None = None,
    ) -> common_pb2.Conversation:
        """Set the fields that are not ``None``; ``""`` clears an override."""

    @abc.abstractmethod
    async def delete_conversation(self, tenant_id: str, conversation_id: str) -> None:
        """Delete the conversation with its messages, events and turns."""

    # --------------------------------------------------------------- history

    @abc.abstractmethod
    async def append(
        self,
        tenant_id: str,
        conversation_id: str,
        messages: Sequence[common_pb2.Message],
        events: Sequence[common_pb2.AgentEvent] = (),
        take_queue_for_turn: str = "",
        *,
        fence: LeaseFence | None = None,
        reserve_event_seq: int = 0,
        seal: TurnSeal | None = None,
        release_lease: bool = False,
        next_turn: NextTurn | None = None,
        approvals: Sequence[common_pb2.Approval] = (),
        move_to: TurnState = common_pb2.TURN_STATE_UNSPECIFIED,
        step_metrics: Sequence[common_pb2.StepMetrics] = (),
        turn_metrics: common_pb2.TurnMetrics | None = None,
    ) -> Appended:
        """Commit messages and events in one transaction (``check_append_request``).

        Messages get the next gap-free seqs, the conversation id and the commit
        time; events keep their event_seq, which must rise strictly above the
        conversation's ``last_event_seq``. With ``take_queue_for_turn``, the
        queued messages are drained in the same transaction and appended last,
        as user messages of that turn.

        With ``fence`` the whole append happens only while the fence holds
        (``check_fence``), and it may also end the fenced turn (``seal``), hand
        its lease back (``release_lease``) and start the next turn from the
        queue (``next_turn``), in the same transaction. reserved_event_seq is
        raised to ``reserve_event_seq`` and never left below last_event_seq; a
        seal or release lowers it to last_event_seq (``reservation_after_append``).
        A fenced append may also create pending ``approvals`` for its turn and move
        the turn to ``move_to`` (``check_transition``); a seal closes the turn's pending
        approvals (``closed_approval``). It may record the fenced turn's ``step_metrics``
        and ``turn_metrics`` too (``appended_metrics``), as RecordStepMetrics and
        RecordTurnMetrics would, so a step costs the store one round trip.
        """

    @abc.abstractmethod
    async def load_since(
        self, tenant_id: str, conversation_id: str, *, after_seq: int = 0, limit: int = 0
    ) -> History:
        """Messages with seq above ``after_seq`` in seq order, at most ``limit`` (0 = all)."""

    @abc.abstractmethod
    async def load_events(
        self, tenant_id: str, conversation_id: str, *, after_event_seq: int = 0, limit: int = 0
    ) -> EventHistory:
        """Persisted events above ``after_event_seq`` in order, at most ``limit`` (0 = all)."""

    # ----------------------------------------------------------------- turns

    @abc.abstractmethod
    async def create_turn(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        idempotency_key: str = "",
        state: TurnState = common_pb2.TURN_STATE_QUEUED,
        computer_id: str = "",
        cwd: str = "",
        agent: str = "",
        lease_owner: str = "",
        lease_ttl: datetime.timedelta | None = None,
        reserve_event_seq: int = 0,
        user_messages: Sequence[common_pb2.Message] = (),
        exclusive: bool = False,
    ) -> common_pb2.Turn:
        """Create a turn, queued or running, in one transaction. A non-empty
        ``idempotency_key`` already used in the conversation raises ``AlreadyExists``
        naming the existing turn (checked first).

        With ``lease_owner`` the turn is born leased for ``lease_ttl`` (epoch 1,
        attempt 1); ``reserve_event_seq`` raises the conversation's reservation;
        ``user_messages`` are appended as the turn's user messages (its
        user_message_seq is the first one's seq); ``exclusive`` refuses
        (``check_no_turn_in_flight``) while the conversation has a turn that has
        not ended."""

    @abc.abstractmethod
    async def get_turn(self, tenant_id: str, turn_id: str) -> common_pb2.Turn:
        """The turn, or ``NotFound``."""

    @abc.abstractmethod
    async def list_turns(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        states: Collection[TurnState] = (),
        page_size: int = 0,
        page_token: str = "",
        idempotency_key: str = "",
    ) -> Page[common_pb2.Turn]:
        """The conversation's turns, oldest first, only those in ``states`` (and with
        ``idempotency_key``) when given."""

    @abc.abstractmethod
    async def transition_turn(
        self,
        tenant_id: str,
        turn_id: str,
        to: TurnState,
        *,
        finish_reason: FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED,
        error_message: str = "",
        user_message_seq: int = 0,
        lease_owner: str = "",
        lease_epoch: int = 0,
        max_running: int = 0,
    ) -> common_pb2.Turn:
        """Move the turn to ``to`` if the state machine allows it (else ``FailedPrecondition``).

        Entering running stamps ``started_at`` once; entering a terminal state
        stamps ``ended_at``. With ``lease_owner`` set the move only happens while
        that owner holds the lease (with ``lease_epoch`` set, that epoch's), as a
        fence would (``check_lease_held``).
         ``max_running``: a move from queued to running is refused (``ResourceExhausted``)
        while that many turns of every tenant have started and not ended."""

    # ------------------------------------------------------------- execution

    @abc.abstractmethod
    async def resolve_execution(self, tenant_id: str, conversation_id: str, turn_id: str = "") -> Execution:
        """Effective computer and cwd: turn override → conversation → workspace → local."""

    # ---------------------------------------------------------------- reconcile

    @abc.abstractmethod
    async def reconcile(self, tenant_id: str, conversation_id: str) -> list[common_pb2.Message]:
        """Append ``synthesize_missing_results`` of the whole history in one transaction
        (no append may slip in between the read and the write); answer what was appended."""

    # ------------------------------------------------------------------ leases

    @abc.abstractmethod
    async def claim_lease(
        self,
        tenant_id: str,
        turn_id: str,
        owner: str,
        ttl: datetime.timedelta,
        *,
        reserve_event_seq: int = 0,
    ) -> common_pb2.Turn:
        """Lease the turn to ``owner`` until now + ``ttl`` (``check_lease_claim``), as a new
        epoch and a new attempt (``claimed_lease_fields``), and raise the conversation's
        reserved_event_seq to ``reserve_event_seq`` in the same transaction."""

    @abc.abstractmethod
    async def renew_lease(
        self, tenant_id: str, turn_id: str, owner: str, ttl: datetime.timedelta, *, epoch: int = 0
    ) -> common_pb2.Turn:
        """Extend ``owner``'s lease (of ``epoch`` when set) to now + ``ttl`` while it holds
        it (``check_lease_held``), expired or not: only another claim takes it away."""

    @abc.abstractmethod
    async def renew_leases(
        self, owner: str, ttl: datetime.timedelta, leases: Sequence[LeaseRef]
    ) -> list[str]:
        """Renew, in one transaction, every lease of ``leases`` that ``owner`` still holds
        (``holds_lease``); answer the turn ids of the others, in the order given: another
        owner or epoch holds them, they ended, or they do not exist. Every tenant's."""

    @abc.abstractmethod
    async def release_lease(
        self, tenant_id: str, turn_id: str, owner: str, *, epoch: int = 0
    ) -> common_pb2.Turn:
        """Clear ``owner``'s lease (of ``epoch`` when set) (``check_lease_release``)."""

    @abc.abstractmethod
    async def heartbeat(
        self, kernel: store_pb2.KernelInfo, ttl: datetime.timedelta
    ) -> list[store_pb2.KernelInfo]:
        """Record ``kernel``'s heartbeat (its row, live until now + ``ttl``; its first
        heartbeat's time kept), and answer every live kernel, oldest first."""

    @abc.abstractmethod
    async def list_kernels(self) -> list[store_pb2.KernelInfo]:
        """Every kernel whose heartbeat has not expired, oldest first."""

    @abc.abstractmethod
    async def retire_kernel(self, owner: str) -> None:
        """Forget ``owner``'s heartbeat at once (it shuts down); nothing if there is none."""

    @abc.abstractmethod
    async def list_expired_leases(self, *, limit: int = 0) -> list[common_pb2.Turn]:
        """Turns of every tenant that have not ended and that nobody holds (their lease
        expired, was released or was never taken), earliest expiry first, at most ``limit``
        (0 = all). Administrative: not tenant-scoped."""

    # ----------------------------------------------------------------- metrics

    @abc.abstractmethod
    async def record_turn_metrics(self, tenant_id: str, metrics: common_pb2.TurnMetrics) -> None:
        """Insert or replace the turn's metrics (``check_turn_metrics``); the turn must
        exist, in ``metrics.conversation_id`` when that is set."""

    @abc.abstractmethod
    async def record_step_metrics(
        self, tenant_id: str, conversation_id: str, metrics: common_pb2.StepMetrics
    ) -> None:
        """Insert or replace one step's metrics (``normalized_step_metrics``); the turn
        must belong to the conversation."""

    @abc.abstractmethod
    async def get_metrics(
        self, tenant_id: str, conversation_id: str, turn_id: str = ""
    ) -> list[common_pb2.TurnMetrics]:
        """Metrics of the conversation's turns (or one turn), oldest turn first, each with
        its step metrics by step index. A turn with step metrics but no turn metrics yet
        is answered with only its ids and steps."""

    # ------------------------------------------------------------------- queue

    @abc.abstractmethod
    async def enqueue(
        self,
        tenant_id: str,
        conversation_id: str,
        message: common_pb2.Message,
        idempotency_key: str = "",
        *,
        only_behind_turn: bool = False,
    ) -> store_pb2.QueuedMessage:
        """Queue a message (``check_queued_message``) under the next id of the store. A non-empty
        ``idempotency_key`` the conversation already used answers that item instead, drained or not
        (checked first). ``only_behind_turn`` refuses (``check_turn_in_flight``) unless the
        conversation has a turn that has not ended, in the same transaction as the insert."""

    @abc.abstractmethod
    async def drain_queue(self, tenant_id: str, conversation_id: str) -> list[store_pb2.QueuedMessage]:
        """Every queued message in enqueue order, taken off the queue in the same transaction."""

    # --------------------------------------------------------------- approvals

    @abc.abstractmethod
    async def create_approval(self, tenant_id: str, approval: common_pb2.Approval) -> common_pb2.Approval:
        """Store a pending approval (``check_new_approval``, ``new_approval``) under a new
        ``apr_`` id; its turn must belong to its conversation and not have ended."""

    @abc.abstractmethod
    async def resolve_approval(
        self,
        tenant_id: str,
        approval_id: str,
        decision: ApprovalDecision,
        *,
        edited_input_json: str = "",
        reason: str = "",
        decided_by: str = "",
        remember: bool = False,
        remembered_rule: common_pb2.PermissionRule | None = None,
    ) -> common_pb2.Approval:
        """Decide a pending approval once (``check_resolution``; a compare-and-set on it
        being pending, else ``check_pending``'s "already decided"), stamped ``resolved_at``.
        With ``remember``, ``remembered_rule`` joins the conversation's remembered rules in
        the same transaction (``remembered_after``)."""

    @abc.abstractmethod
    async def get_approval(self, tenant_id: str, approval_id: str) -> common_pb2.Approval:
        """The approval, or ``NotFound``."""

    @abc.abstractmethod
    async def list_approvals(
        self, tenant_id: str, conversation_id: str = "", *, turn_id: str = "", pending_only: bool = False
    ) -> list[common_pb2.Approval]:
        """The conversation's approvals, or the turn's (``turn_id``; with both, the turn must
        be the conversation's), oldest first; only the pending ones when asked."""

    # ---------------------------------------------------------------- api keys

    @abc.abstractmethod
    async def create_api_key(self, tenant_id: str, name: str = "") -> tuple[store_pb2.ApiKey, str]:
        """A new key for the tenant and its secret (``new_api_key_secret``); only
        ``hash_api_key`` of the secret is stored."""

    @abc.abstractmethod
    async def list_api_keys(self, tenant_id: str = "") -> list[store_pb2.ApiKey]:
        """The tenant's keys, oldest first, revoked ones included; every tenant's when empty."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str) -> store_pb2.ApiKey:
        """Revoke a key for good (again is a no-op); ``NotFound`` for an unknown id."""

    @abc.abstractmethod
    async def authenticate(self, secret: str) -> store_pb2.ApiKey:
        """The live key whose hash matches ``secret``; ``NotFound("unknown or revoked API key")``
        otherwise. The secret never appears in an error or a log."""
