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
import datetime
import hashlib
import json
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

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

# A new turn is either waiting for a run slot or already running.
INITIAL_STATES: frozenset[TurnState] = frozenset(
    {common_pb2.TURN_STATE_QUEUED, common_pb2.TURN_STATE_RUNNING}
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
    takes_queue: bool = False,
) -> None:
    """Check an append's content before it touches the database.

    Raises ``InvalidArgument`` for an empty append (unless it takes the queue),
    a message without a role or chunks, an event without a kind, or anything
    addressed to another conversation; ``ResourceExhausted`` past ``max_bytes``.
    """
    if not messages and not events and not takes_queue:
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
    size = sum(m.ByteSize() for m in messages) + sum(e.ByteSize() for e in events)
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


def lease_ttl_ns(ttl: datetime.timedelta) -> int:
    """A lease's time to live in nanoseconds; ``InvalidArgument`` unless it is positive."""
    if ttl <= datetime.timedelta(0):
        raise InvalidArgument(f"ttl must be positive, got {ttl.total_seconds():g}s")
    return (ttl.days * 86_400 + ttl.seconds) * 1_000_000_000 + ttl.microseconds * 1_000


def _format_ns(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC).isoformat(timespec="milliseconds")


def lease_is_held(holder: str, expires_at_ns: int, now_ns: int) -> bool:
    """Whether somebody holds a lease that has not expired at ``now_ns``."""
    return bool(holder) and expires_at_ns > now_ns


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


def check_lease_renewal(turn_id: str, *, holder: str, expires_at_ns: int, owner: str, now_ns: int) -> None:
    """Raise ``FailedPrecondition`` unless ``owner`` holds the turn's lease and it has not expired."""
    if holder != owner:
        raise FailedPrecondition(
            f"turn {turn_id} is not leased to {owner} (lease holder: {holder or 'nobody'}); "
            "claim the lease instead of renewing it"
        )
    if expires_at_ns <= now_ns:
        raise FailedPrecondition(
            f"the lease of {owner} on turn {turn_id} expired at {_format_ns(expires_at_ns)}; "
            "claim it again instead of renewing it"
        )


def check_lease_release(turn_id: str, *, holder: str, expires_at_ns: int, owner: str, now_ns: int) -> None:
    """Raise ``FailedPrecondition`` when another owner holds the turn's lease.

    Releasing a lease nobody holds any more is a no-op, so a retried release succeeds.
    """
    if holder and holder != owner and lease_is_held(holder, expires_at_ns, now_ns):
        raise FailedPrecondition(
            f"turn {turn_id} is leased to {holder} until {_format_ns(expires_at_ns)}, not to {owner}; "
            "only the holder may release it"
        )


# -------------------------------------------------------------- reconcile


def synthesize_missing_results(history: Sequence[common_pb2.Message]) -> list[common_pb2.Message]:
    """Tool messages answering every tool call in ``history`` that has no result.

    One ROLE_TOOL message per message that carried dangling calls (a step), with
    that message's turn and step, each result an error with the call's name and
    step_id. Empty when nothing dangles. seq and conversation are left for the
    append to fill in.
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


def check_new_approval(approval: common_pb2.Approval) -> None:
    """``InvalidArgument`` unless the approval names its conversation, turn and call and is pending."""
    for field in ("conversation_id", "turn_id", "tool_call_id", "tool_name"):
        if not getattr(approval, field):
            raise InvalidArgument(f"approval.{field} is required")
    if approval.input_json:
        _json_object(approval.input_json, "approval.input_json")
    if approval.decision != common_pb2.APPROVAL_DECISION_UNSPECIFIED:
        raise InvalidArgument("a new approval is pending: leave decision unset and resolve it later")


def check_resolution(decision: ApprovalDecision, edited_input_json: str) -> None:
    """``InvalidArgument`` unless the decision is one, and edited input comes exactly with EDIT."""
    if decision not in common_pb2.ApprovalDecision.values() or (
        decision == common_pb2.APPROVAL_DECISION_UNSPECIFIED
    ):
        raise InvalidArgument(f"decision must be approve, reject or edit, got {decision}")
    if decision == common_pb2.APPROVAL_DECISION_EDIT:
        if not edited_input_json:
            raise InvalidArgument("an edit decision needs edited_input_json")
        _json_object(edited_input_json, "edited_input_json")
    elif edited_input_json:
        raise InvalidArgument("edited_input_json is only taken with an edit decision")


def check_pending(approval: common_pb2.Approval) -> None:
    """``FailedPrecondition`` when the approval has already been resolved."""
    if approval.decision != common_pb2.APPROVAL_DECISION_UNSPECIFIED:
        decision = common_pb2.ApprovalDecision.Name(approval.decision).removeprefix("APPROVAL_DECISION_")
        raise FailedPrecondition(f"approval {approval.id} was already resolved ({decision.lower()})")


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
    ) -> common_pb2.Workspace:
        """Create a workspace rooted at ``root``."""

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
    ) -> common_pb2.Workspace:
        """Set the fields that are not ``None``; answer the workspace as updated."""

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
    ) -> Appended:
        """Commit messages and events in one transaction.

        Messages get the next gap-free seqs, the conversation id and the commit
        time; events keep their event_seq, which must rise strictly above the
        conversation's ``last_event_seq``. With ``take_queue_for_turn``, the
        queued messages are drained in the same transaction and appended last,
        as user messages of that turn.
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
    ) -> common_pb2.Turn:
        """Create a turn, queued or running. A non-empty ``idempotency_key`` already
        used in the conversation raises ``AlreadyExists`` naming the existing turn."""

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
    ) -> common_pb2.Turn:
        """Move the turn to ``to`` if the state machine allows it (else ``FailedPrecondition``).

        Entering running stamps ``started_at`` once; entering a terminal state
        stamps ``ended_at``. With ``lease_owner`` set the move only happens while
        that owner holds an unexpired lease.
        """

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
        self, tenant_id: str, turn_id: str, owner: str, ttl: datetime.timedelta
    ) -> common_pb2.Turn:
        """Lease the turn to ``owner`` until now + ``ttl`` (``check_lease_claim``)."""

    @abc.abstractmethod
    async def renew_lease(
        self, tenant_id: str, turn_id: str, owner: str, ttl: datetime.timedelta
    ) -> common_pb2.Turn:
        """Extend ``owner``'s unexpired lease to now + ``ttl`` (``check_lease_renewal``)."""

    @abc.abstractmethod
    async def release_lease(self, tenant_id: str, turn_id: str, owner: str) -> common_pb2.Turn:
        """Clear ``owner``'s lease (``check_lease_release``)."""

    @abc.abstractmethod
    async def list_expired_leases(self, *, limit: int = 0) -> list[common_pb2.Turn]:
        """Turns of every tenant that have not ended and whose lease expired, earliest
        expiry first, at most ``limit`` (0 = all). Administrative: not tenant-scoped."""

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
        self, tenant_id: str, conversation_id: str, message: common_pb2.Message, idempotency_key: str = ""
    ) -> store_pb2.QueuedMessage:
        """Queue a message (``check_queued_message``) under the next id of the store. A non-empty
        ``idempotency_key`` the conversation already used answers that item instead, drained or not."""

    @abc.abstractmethod
    async def drain_queue(self, tenant_id: str, conversation_id: str) -> list[store_pb2.QueuedMessage]:
        """Every queued message in enqueue order, taken off the queue in the same transaction."""

    # --------------------------------------------------------------- approvals

    @abc.abstractmethod
    async def create_approval(self, tenant_id: str, approval: common_pb2.Approval) -> common_pb2.Approval:
        """Store a pending approval (``check_new_approval``) under a new ``apr_`` id, stamped
        ``created_at``; its turn must belong to its conversation."""

    @abc.abstractmethod
    async def resolve_approval(
        self,
        tenant_id: str,
        approval_id: str,
        decision: ApprovalDecision,
        *,
        edited_input_json: str = "",
        reason: str = "",
    ) -> common_pb2.Approval:
        """Record the decision (``check_resolution``) on a pending approval (``check_pending``),
        stamped ``resolved_at``."""

    @abc.abstractmethod
    async def list_approvals(
        self, tenant_id: str, conversation_id: str, *, pending_only: bool = False
    ) -> list[common_pb2.Approval]:
        """The conversation's approvals, oldest first; only the pending ones when asked."""

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
