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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from dispatch.shared.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from dispatch.v1 import common_pb2

T = TypeVar("T")

TurnState: TypeAlias = common_pb2.TurnState.ValueType
FinishReason: TypeAlias = common_pb2.FinishReason.ValueType

WORKSPACE_PREFIX = "ws"
CONVERSATION_PREFIX = "conv"
TURN_PREFIX = "turn"

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
) -> None:
    """Check an append's content before it touches the database.

    Raises ``InvalidArgument`` for an empty append, a message without a role or
    chunks, an event without a kind, or anything addressed to another
    conversation; ``ResourceExhausted`` past ``max_bytes``.
    """
    if not messages and not events:
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
        self, tenant_id: str, *, name: str, root: str, default_computer_id: str = "", default_agent: str = ""
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
    async def update_workspace(
        self,
        tenant_id: str,
        workspace_id: str,
        *,
        name: str | None = None,
        root: str | None = None,
        default_computer_id: str | None = None,
        default_agent: str | None = None,
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
    ) -> Appended:
        """Commit messages and events in one transaction.

        Messages get the next gap-free seqs, the conversation id and the commit
        time; events keep their event_seq, which must rise strictly above the
        conversation's ``last_event_seq``.
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
    ) -> Page[common_pb2.Turn]:
        """The conversation's turns, oldest first, only those in ``states`` when given."""

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
