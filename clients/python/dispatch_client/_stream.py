"""What the async and the sync client share about event streams.

``Resume`` is a subscription's cursor and its reconnect decisions: which
request to send, which events of a response are new, and after a stream ends
or breaks whether (and after how long) to subscribe again. ``TurnFollower``
picks the events of one sent message's turn out of the conversation's stream.
The clients only run the loop, awaiting or blocking.
"""

from __future__ import annotations

import logging

import grpc

from dispatch_client._calls import UntilLike, subscribe_until
from dispatch_client._proto import common_pb2, transport_pb2
from dispatch_client.errors import DispatchError, error_for, error_from_rpc

log = logging.getLogger("dispatch_client")

# A broken stream is resumed on these; any other status is the caller's to handle.
# INTERNAL and UNKNOWN are what a connection dropped mid-stream often surfaces as;
# RESOURCE_EXHAUSTED is how a server without Resync messages says "you fell behind".
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0


def _until(until: UntilLike | None, follow: bool | None) -> common_pb2.SubscribeUntil.ValueType:
    """The ``until`` of a subscription from the two ways of saying it: ``until`` itself, or the
    older ``follow`` (True: follow, False: until caught up). Both given must agree."""
    if until is None:
        return common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP if follow is False else common_pb2.SUBSCRIBE_UNTIL_FOLLOW
    value = subscribe_until(until)
    if follow is not None and follow != (value == common_pb2.SUBSCRIBE_UNTIL_FOLLOW):
        name = common_pb2.SubscribeUntil.Name(value).removeprefix("SUBSCRIBE_UNTIL_").lower()
        raise ValueError(f"follow={follow} contradicts until={name!r}; give one of them")
    return value


class Resume:
    """The cursor of one subscription and when to reconnect it.

    The loop is::

        resume = Resume(conversation_id, after_event_seq=after_event_seq)
        while (delay := resume.next_delay()) is not None:
            sleep(delay)
            call = stub.Subscribe(resume.request())
            try:
                for response in call:
                    yield from resume.accept(response)
                    if resume.resync:
                        break
                resume.ended()
            except grpc.RpcError as exc:
                resume.broke(exc)  # raises what is not resumable
            finally:
                call.cancel()
    """

    def __init__(
        self,
        conversation_id: str,
        *,
        after_event_seq: int = 0,
        until: UntilLike | None = None,
        follow: bool | None = None,
        reconnect: bool = True,
        max_reconnects: int | None = None,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ):
        self.conversation_id = conversation_id
        # The last event_seq yielded (or the caller's starting point).
        self.cursor = after_event_seq
        self.until = _until(until, follow)
        # A follow stream never ends by design: one that does is resumed. A bounded one that
        # ends with OK is over; one that breaks is resumed with the same ``until``.
        self.follow = self.until == common_pb2.SUBSCRIBE_UNTIL_FOLLOW
        self.reconnect = reconnect
        self.max_reconnects = max_reconnects
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        # Set by a response carrying Resync: the server ends the stream; subscribe again.
        self.resync = False
        self.reconnects = 0
        # Reconnects in a row without an event in between: the backoff's exponent.
        self._failures = 0
        self._progress = False
        # The wait before the next subscription; None: stop.
        self._next: float | None = 0.0

    def next_delay(self) -> float | None:
        """Seconds to wait before (re)subscribing, or None when the subscription is over."""
        return self._next

    def request(self) -> transport_pb2.SubscribeRequest:
        """The request of the next (re)subscription: from the last event yielded."""
        self.resync = False
        self._progress = False
        return transport_pb2.SubscribeRequest(
            conversation_id=self.conversation_id, after_event_seq=self.cursor, until=self.until
        )

    def accept(self, response: transport_pb2.SubscribeResponse) -> list[common_pb2.AgentEvent]:
        """The response's events not yielded yet, in order; the cursor moves past them."""
        fresh: list[common_pb2.AgentEvent] = []
        for event in response.events:
            if event.event_seq > self.cursor:
                self.cursor = event.event_seq
                fresh.append(event)
        if fresh:
            self._progress = True
            self._failures = 0
        if response.HasField("resync"):
            self.resync = True
            log.info(
                "conversation %s: the server asked for a resync after event %d; resubscribing from %d",
                self.conversation_id,
                response.resync.after_event_seq,
                self.cursor,
            )
        return fresh

    def ended(self) -> float | None:
        """The stream ended without an error (or after a resync): the delay before
        subscribing again, or None to stop. A bounded stream that ends with OK has reached
        its end; only a follow stream, which should never end, is resumed."""
        if self.resync:
            self._next = self._backoff(None, immediate=self._progress)
        elif self.follow and self.reconnect:
            log.info("conversation %s: the event stream ended; resubscribing", self.conversation_id)
            self._next = self._backoff(None)
        else:
            self._next = None
        return self._next

    def broke(self, exc: BaseException) -> float:
        """The stream failed with ``exc``: the delay before subscribing again.
        Raises the ``DispatchError`` when the failure is not one to resume from."""
        error = error_from_rpc(exc)
        if not self.reconnect or error.code not in RESUMABLE:
            raise error from None
        self._next = self._backoff(error)
        log.warning(
            "conversation %s: the event stream broke (%s); resubscribing in %.1fs",
            self.conversation_id,
            error,
            self._next,
        )
        return self._next

    def _backoff(self, error: DispatchError | None, *, immediate: bool = False) -> float:
        if self.max_reconnects is not None and self.reconnects >= self.max_reconnects:
            gave_up = f"gave up after {self.reconnects} reconnects"
            if error is None:
                raise error_for(grpc.StatusCode.UNAVAILABLE, f"the event stream ended; {gave_up}")
            raise error_for(error.code, f"{error.details} ({gave_up})") from None
        self.reconnects += 1
        if immediate:
            delay = 0.0
        else:
            delay = min(self.initial_backoff * 2**self._failures, self.max_backoff)
            self._failures += 1
        return delay


class TurnFollower:
    """Which events of a conversation's stream belong to the turn a Send answered
    (``sent``), and when it is over.

    A message queued behind a running turn (``queued``, with that turn's id) is
    either taken by that turn as steering, or starts the next turn after the
    seal: without a ``steering_injected`` in the running turn, the follower
    goes on to the next turn that starts.
    """

    def __init__(self, conversation_id: str, sent: transport_pb2.SendResponse):
        self.conversation_id = conversation_id
        # Where the turn's events start.
        self.after_event_seq = sent.after_event_seq
        self.turn_id = sent.turn_id
        self._queued = sent.queued
        self._steered = False
        self._turn_done = False
        self.done = False
        # The turn_sealed (None if the turn ended unsealed, or has not ended).
        self.sealed: common_pb2.TurnSealed | None = None

    def accept(self, event: common_pb2.AgentEvent) -> bool:
        """Whether ``event`` is one of the turn's; sets ``done`` on its last."""
        kind = event.WhichOneof("kind")
        if not self.turn_id:
            # Waiting for the turn that takes the queued message.
            if kind != "turn_started":
                return False
            self.turn_id = event.turn_id
            self._queued = False
        if event.turn_id != self.turn_id or self.done:
            return False
        if kind == "steering_injected":
            self._steered = True
        elif kind == "turn_done":
            self._turn_done = True
        elif kind == "turn_sealed":
            if self._queued and not self._steered:
                self.turn_id = ""  # the message starts the next turn
                self._turn_done = False
            else:
                self.done = True
                self.sealed = event.turn_sealed
        elif kind == "error" and event.error.fatal and self._turn_done:
            # After turn_done, a fatal error is the turn ending unsealed (the store failed).
            self.done = True
        return True
