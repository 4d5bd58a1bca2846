"""The public API's methods, declared once for both clients.

Each method is a builder of ``_calls`` bound as a descriptor: it has the
builder's signature and docstring, and hands what the builder returns to the
client's ``_unary`` (a ``Call``), ``_walk`` (``Pages``), ``_follow`` (a
``Resume``), ``_follow_turn`` (a ``TurnFollower``) or ``_run_turn`` (a ``Send``
call). What the method returns depends on the client: a coroutine or an async
generator on an ``AsyncKind`` client, the answer or a generator on a
``SyncKind`` one.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from typing import Any, ClassVar, Generic, ParamSpec, Self, TypeVar, overload

from google.protobuf.message import Message

from dispatch_client import _calls
from dispatch_client._calls import Call, Pages, auth_metadata, find_address, find_api_key
from dispatch_client._proto import common_pb2
from dispatch_client._stream import Resume, TurnFollower

P = ParamSpec("P")
R = TypeVar("R", bound=Message)
I = TypeVar("I")  # noqa: E741 - an item of a page
X = TypeVar("X")


class AsyncKind:
    """A client whose methods return coroutines and async generators."""


class SyncKind:
    """A client whose methods block and return the answer, or a generator."""


class _Bound(Generic[P, X]):
    # The client's method that makes the call with what the builder returns.
    via: ClassVar[str] = ""

    def __init__(self, build: Callable[P, X], doc: str | None = None, *, via: str = ""):
        self._build = build
        self._via = via or self.via
        self._name = build.__name__
        self.__doc__ = doc or build.__doc__
        # The builder's parameters; what the method returns is the client's business.
        self._signature = inspect.signature(build).replace(return_annotation=inspect.Signature.empty)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    def _bind(self, client: object) -> Callable[P, Any]:
        build, via = self._build, getattr(client, self._via)

        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return via(build(*args, **kwargs))

        method.__name__ = self._name
        method.__qualname__ = f"{type(client).__name__}.{self._name}"
        method.__doc__ = self.__doc__
        method.__signature__ = self._signature  # type: ignore[attr-defined]
        return method


class Unary(_Bound[P, Call[R]], Generic[P, R]):
    """A unary RPC: awaitable on an async client, blocking on a sync one."""

    via = "_unary"

    @overload
    def __get__(self, client: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self, client: AsyncKind, owner: type[Any] | None = None
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __get__(self, client: SyncKind, owner: type[Any] | None = None) -> Callable[P, R]: ...
    def __get__(self, client: object, owner: type[Any] | None = None) -> Any:
        return self if client is None else self._bind(client)


class Paged(_Bound[P, Pages[R, I]], Generic[P, R, I]):
    """A paged listing as one stream of items, fetched page by page."""

    via = "_walk"

    @overload
    def __get__(self, client: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self, client: AsyncKind, owner: type[Any] | None = None
    ) -> Callable[P, AsyncGenerator[I, None]]: ...
    @overload
    def __get__(
        self, client: SyncKind, owner: type[Any] | None = None
    ) -> Callable[P, Generator[I, None, None]]: ...
    def __get__(self, client: object, owner: type[Any] | None = None) -> Any:
        return self if client is None else self._bind(client)


class Events(_Bound[P, X], Generic[P, X]):
    """A stream of events: an async generator on an async client, a generator on a sync one."""

    @overload
    def __get__(self, client: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self, client: AsyncKind, owner: type[Any] | None = None
    ) -> Callable[P, AsyncGenerator[common_pb2.AgentEvent, None]]: ...
    @overload
    def __get__(
        self, client: SyncKind, owner: type[Any] | None = None
    ) -> Callable[P, Generator[common_pb2.AgentEvent, None, None]]: ...
    def __get__(self, client: object, owner: type[Any] | None = None) -> Any:
        return self if client is None else self._bind(client)


SUBSCRIBE_DOC = """Every event of the conversation after ``after_event_seq``, one by one:
history, then live, until ``until`` says it is over:

- ``"follow"`` (the default): never; follow the live tail until you stop.
- ``"caught_up"``: after the events up to the live edge at the moment of
  subscribing (history up to now).
- ``"turn_sealed"``: after the ``turn_sealed`` of the turn running (or queued)
  at the moment of subscribing, or once that turn is over unsealed; with no
  turn running, as ``"caught_up"``. Replaying from 0, earlier turns' seals
  pass by.

``until`` also takes a ``types.SubscribeUntil`` value. ``follow=False`` (the
older spelling) means ``"caught_up"`` and ``follow=True`` ``"follow"``; given
with ``until``, the two must agree (else ``ValueError``).

When the server asks for a resync, the stream breaks (UNAVAILABLE, as when
the server shuts down or a connection drops) or a follow stream just ends, it
subscribes again from the last ``event_seq`` it yielded, with the same
``until``, backing off exponentially between failed attempts
(``initial_backoff`` doubling up to ``max_backoff`` seconds; ``max_reconnects``:
give up after that many; ``reconnect=False``: raise instead). A bounded stream
that ends with OK is over; a resumed one ends where the server says when it
resubscribes (so a ``"turn_sealed"`` stream that broke and comes back after its
turn is over ends caught up, or with the turn running then). No event is
missed or yielded twice. Other failures
(UNAUTHENTICATED, NOT_FOUND, ...) raise at once. Break out of the loop to
stop; ``contextlib.aclosing`` (async) or ``contextlib.closing`` (sync) ends
the stream at once."""

FOLLOW_TURN_DOC = """The events of the turn ``sent`` (what ``send`` answered) started or was
queued into, up to its ``turn_sealed``; see ``run_turn``."""

RUN_TURN_DOC = """Send a message (the arguments of ``send``), then yield the events of the turn
that takes it, up to that turn's ``turn_sealed``. A message queued behind a
running turn yields that turn's events, and the next turn's when the running
one did not take the message as steering."""


class Api:
    """The methods of the public API, with the signatures and docstrings of ``_calls``.

    Every unary method takes ``timeout=`` (seconds; None: the client's default).
    """

    address: str
    # Seconds a unary call may take unless it says otherwise; None: no limit.
    timeout: float | None
    _metadata: tuple[tuple[str, str], ...]

    def _configure(self, address: str | None, api_key: str | None, timeout: float | None) -> None:
        self.address = find_address(address)
        self.timeout = timeout
        self._metadata = auth_metadata(find_api_key(api_key))

    def _deadline(self, call: Call[Any]) -> float | None:
        return self.timeout if call.timeout is None else call.timeout

    create_workspace = Unary(_calls.create_workspace)
    list_workspaces = Unary(_calls.list_workspaces)
    iter_workspaces = Paged(_calls.iter_workspaces)
    create_conversation = Unary(_calls.create_conversation)
    list_conversations = Unary(_calls.list_conversations)
    iter_conversations = Paged(_calls.iter_conversations)
    get_conversation = Unary(_calls.get_conversation)
    update_conversation = Unary(_calls.update_conversation)
    delete_conversation = Unary(_calls.delete_conversation)
    send = Unary(_calls.send)
    subscribe = Events(Resume, SUBSCRIBE_DOC, via="_follow")
    run_turn = Events(_calls.send, RUN_TURN_DOC, via="_run_turn")
    follow_turn = Events(TurnFollower, FOLLOW_TURN_DOC, via="_follow_turn")
    cancel = Unary(_calls.cancel)
    get_turn = Unary(_calls.get_turn)
    list_turns = Unary(_calls.list_turns)
    iter_turns = Paged(_calls.iter_turns)
    resolve_approval = Unary(_calls.resolve_approval)
    approve = Unary(_calls.approve)
    reject = Unary(_calls.reject)
    edit = Unary(_calls.edit)
    list_approvals = Unary(_calls.list_approvals)
    history = Unary(_calls.history)
    iter_history = Paged(_calls.iter_history)
    metrics = Unary(_calls.metrics)
    models = Unary(_calls.models)
    computers = Unary(_calls.computers)
    create_stream_token = Unary(_calls.create_stream_token)
