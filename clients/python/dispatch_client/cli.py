"""``dispatch``: talk to a Dispatch server from the terminal.

dispatch chat "what is in this workspace?"          # a new conversation, one turn
dispatch conversations create --title notes         # prints the new id
dispatch send CONV "and now?"                       # send, render the turn
dispatch watch CONV --json                          # follow the event stream
dispatch watch CONV --until-sealed                  # ... until the running turn is sealed
dispatch history CONV                               # committed messages
dispatch cancel CONV                                # abort the running turn
dispatch turns CONV --state running                 # the turns running now
dispatch approvals CONV --pending                   # the tool calls waiting for a decision
dispatch approve apr_... [--remember]               # let one run (--edit JSON: with other input)
dispatch reject apr_... --reason "not on main"      # refuse it; the model is told why

The key comes from ``--api-key``, else the ``api_key`` file in ``--data-dir``,
else ``DISPATCH_API_KEY``, else the file ``dispatchd up`` writes
(``$DISPATCH_DATA_DIR/api_key``, default ``.dispatch/api_key``). Failures print
``dispatch: STATUS: message`` to stderr. Ctrl-C while ``chat`` or ``send``
follows a turn cancels that turn on the server; a second Ctrl-C exits at once.
When the turn's tool call waits for approval, ``chat`` and ``send`` ask at the
terminal (``[y]es / [a]lways / [n]o / [e]dit``); without one, or with
``--no-prompt``, they say how to decide it and keep following the turn.

Exit status:

=====  ==========================================================================
0      success
1      the turn finished badly (error, aborted, max steps, tool budget, doom loop,
       content filter, interrupted) or ended unsealed
2      usage: a bad command line, or no readable ``api_key`` in ``--data-dir``
3      the server is unreachable or too slow (UNAVAILABLE, DEADLINE_EXCEEDED)
4      not found (NOT_FOUND: no such conversation, or another tenant's)
5      not allowed (UNAUTHENTICATED, PERMISSION_DENIED)
6      the request was refused (INVALID_ARGUMENT, FAILED_PRECONDITION,
       ALREADY_EXISTS, OUT_OF_RANGE, RESOURCE_EXHAUSTED)
7      any other error of the server (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)
130    interrupted (Ctrl-C)
=====  ==========================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TextIO

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from dispatch_client import __version__
from dispatch_client._calls import DEFAULT_TIMEOUT, POLICY_NAMES, TURN_STATE_NAMES, UNTIL_NAMES
from dispatch_client._prompt import LineReader, TerminalReader, ask
from dispatch_client._proto import common_pb2, transport_pb2
from dispatch_client.client import DEFAULT_ADDRESS, DispatchClient
from dispatch_client.errors import DispatchError, InvalidArgument

EXIT_OK = 0
EXIT_TURN_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_NOT_ALLOWED = 5
EXIT_REFUSED = 6
EXIT_SERVER_ERROR = 7
EXIT_INTERRUPTED = 130

_EXIT_BY_STATUS = {
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_NOT_ALLOWED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_NOT_ALLOWED,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_REFUSED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_REFUSED,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_REFUSED,
}


def exit_status(error: DispatchError) -> int:
    """The exit status of a command that failed with ``error`` (see the module's table)."""
    return _EXIT_BY_STATUS.get(error.code, EXIT_SERVER_ERROR)


# How long Ctrl-C waits for the server to take the turn's cancel before giving up.
CANCEL_DEADLINE = 5.0

_FINISH_WORDS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content filter",
    common_pb2.FINISH_REASON_MAX_STEPS: "max steps",
    common_pb2.FINISH_REASON_TOOL_BUDGET: "tool budget",
    common_pb2.FINISH_REASON_DOOM_LOOP: "doom loop",
    common_pb2.FINISH_REASON_ABORTED: "aborted",
    common_pb2.FINISH_REASON_ERROR: "error",
    common_pb2.FINISH_REASON_INTERRUPTED: "interrupted",
}
_GOOD_FINISH = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)

# SGR codes.
_BOLD, _DIM, _RED, _GREEN, _YELLOW, _CYAN = "1", "2", "31", "32", "33", "36"
# Every line of the model's reasoning starts with this, so it stands apart from the
# answer without colour too.
REASONING_PREFIX = "│ "


def use_color(choice: str, out: TextIO, env: dict[str, str] | None = None) -> bool:
    """Whether to colour what goes to ``out``: ``always``, ``never``, or (``auto``) when it
    is a terminal, ``NO_COLOR`` is unset or empty (https://no-color.org) and TERM is not dumb."""
    if choice != "auto":
        return choice == "always"
    env = dict(os.environ) if env is None else env
    if env.get("NO_COLOR", "") or env.get("TERM") == "dumb":
        return False
    try:
        return out.isatty()
    except ValueError:  # closed
        return False


class Sink(Protocol):
    """Where a command writes a turn's events: for people or as JSON lines."""

    # How the last turn_done said its turn finished, and whether the last event was a seal.
    finish: common_pb2.FinishReason.ValueType
    sealed: bool

    def event(self, event: common_pb2.AgentEvent) -> None: ...

    def end_line(self) -> None: ...


class Renderer:
    """Writes a turn's events as they arrive: text as it streams, the model's
    reasoning set off line by line (``│ ``, dim), each tool call and its
    result, and how the turn finished. With ``show_turns``, a line also marks
    where each turn starts (for a stream of many turns)."""

    def __init__(self, out: TextIO, *, color: bool = False, show_turns: bool = False):
        self.out = out
        self.color = color
        self.show_turns = show_turns
        self._mid_line = False
        self._reasoning = False
        self.finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
        self.sealed = False
        # Calls that waited for an approval: their tool_started gets a line (other calls'
        # would only repeat their tool_call's).
        self._asked: set[str] = set()

    def _style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and code and text else text

    def end_line(self) -> None:
        """Finish the line being written, if any (before something else is printed)."""
        if self._mid_line:
            self.out.write("\n")
            self._mid_line = False
        self.out.flush()

    def _line(self, text: str, code: str = "") -> None:
        self.end_line()
        self.out.write(self._style(text, code) + "\n")
        self._reasoning = False

    def _write(self, text: str, code: str = "") -> None:
        # Styled line by line, so a newline never sits inside an escape sequence.
        for piece in text.splitlines(keepends=True):
            body = piece.rstrip("\n")
            self.out.write(self._style(body, code) + piece[len(body) :])
            self._mid_line = not piece.endswith("\n")

    def _leave_reasoning(self) -> None:
        # What follows the reasoning starts on a line of its own.
        if self._reasoning:
            self.end_line()
            self._reasoning = False

    def _reason(self, text: str) -> None:
        if not self._reasoning:
            self.end_line()
            self._reasoning = True
        for piece in text.splitlines(keepends=True):
            if not self._mid_line:
                self.out.write(self._style(REASONING_PREFIX, _DIM))
            self._write(piece, _DIM)

    def event(self, event: common_pb2.AgentEvent) -> None:
        kind = event.WhichOneof("kind")
        self.sealed = kind == "turn_sealed"
        if kind == "turn_started" and self.show_turns:
            started = event.turn_started
            self._line(f"▶ turn {event.turn_id} ({started.agent or 'agent'} · {started.model})", _BOLD)
        elif kind == "text_delta":
            self._leave_reasoning()
            self._write(event.text_delta.text)
        elif kind == "reasoning_delta":
            self._reason(event.reasoning_delta.text)
        elif kind == "tool_call":
            call = event.tool_call
            self._line(f"→ {call.name} {_compact(call.input_json)}", _CYAN)
        elif kind == "tool_output":
            self._leave_reasoning()
            self._write(event.tool_output.data.decode("utf-8", "replace"), _DIM)
        elif kind == "tool_result":
            result = event.tool_result
            mark, code = ("✗", _RED) if result.is_error else ("←", _GREEN)
            self._line(f"{mark} {result.name}: {_preview(result.content)}", code)
        elif kind == "approval_requested":
            approval = event.approval_requested.approval
            self._asked.add(approval.tool_call_id)
            self._line(approval_requested_line(approval), _YELLOW)
        elif kind == "approval_resolved":
            approval = event.approval_resolved.approval
            ran = approval.decision in (
                common_pb2.APPROVAL_DECISION_APPROVE,
                common_pb2.APPROVAL_DECISION_EDIT,
            )
            if not ran:
                self._asked.discard(approval.tool_call_id)
            self._line(approval_resolved_line(approval), _GREEN if ran else _RED)
        elif kind == "tool_started" and event.tool_started.tool_call_id in self._asked:
            began = event.tool_started
            self._asked.discard(began.tool_call_id)
            where = f" on {began.computer_id}" if began.computer_id else ""
            self._line(f"▸ {began.name} started{where}", _DIM)
        elif kind == "provider_retry":
            retry = event.provider_retry
            self._line(f"(provider retry {retry.attempt}: {retry.reason})", _YELLOW)
        elif kind == "steering_injected" and self.show_turns:
            count = len(event.steering_injected.message_seqs)
            self._line(f"(steering: {count} queued message(s) taken)", _YELLOW)
        elif kind == "turn_resumed":
            resumed = event.turn_resumed
            why = f": {resumed.reason}" if resumed.reason else ""
            self._line(
                f"↻ resumed (attempt {resumed.attempt}) from step {resumed.from_step_index}{why}", _YELLOW
            )
        elif kind == "turn_interrupted":
            stopped = event.turn_interrupted
            then = (
                "resumable: another kernel continues it"
                if stopped.resumable
                else f"not resumable: attempt {stopped.attempt} was the last"
            )
            self._line(f"⏸ interrupted: {stopped.reason or 'its kernel went away'} ({then})", _YELLOW)
        elif kind == "events_lost":
            lost = event.events_lost
            first, last = lost.first_event_seq, lost.last_event_seq
            span = f"event {first} was" if first == last else f"events {first}-{last} were"
            self._line(f"({span} lost: {lost.reason or 'their kernel went away'})", _YELLOW)
        elif kind == "error":
            self._line(f"error: {event.error.message}", _RED)
        elif kind == "turn_done":
            done = event.turn_done
            self.finish = done.finish_reason
            usage = done.usage
            self._line(
                f"— {_FINISH_WORDS.get(done.finish_reason, 'done')} · {done.steps} step(s) · "
                f"{usage.input_tokens} in / {usage.output_tokens} out tokens · "
                f"{done.duration.ToMilliseconds() / 1000:.2f}s",
                _DIM,
            )
        self.out.flush()


class JsonLines:
    """Writes each event as one JSON line (``event_json``)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
        self.sealed = False

    def event(self, event: common_pb2.AgentEvent) -> None:
        print(event_json(event), file=self.out, flush=True)
        self.sealed = event.HasField("turn_sealed")
        if event.HasField("turn_done"):
            self.finish = event.turn_done.finish_reason

    def end_line(self) -> None:
        pass


def _compact(input_json: str) -> str:
    try:
        return json.dumps(json.loads(input_json), separators=(", ", ": "))
    except json.JSONDecodeError:
        return input_json


def _short(text: str, width: int = 160) -> str:
    """``text`` on one line, at most ``width`` characters (``…`` where it was cut)."""
    flat = " ⏎ ".join(text.splitlines())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _call_subject(tool: str, input_json: str) -> str:
    """What a call does, for people: a shell's command, else its input."""
    try:
        value = json.loads(input_json)
    except json.JSONDecodeError:
        return _short(input_json)
    if tool == "shell" and isinstance(value, dict) and isinstance(value.get("command"), str):
        return _short(value["command"])
    return _short(json.dumps(value, separators=(", ", ": "), ensure_ascii=False))


def approval_requested_line(approval: common_pb2.Approval) -> str:
    """``? shell wants to run: git push (rule: shell `git push*` = ask) — approval apr_…``"""
    rule = f" (rule: {approval.rule})" if approval.rule else ""
    subject = _call_subject(approval.tool_name, approval.input_json)
    return f"? {approval.tool_name} wants to run: {subject}{rule} — approval {approval.id}"


def approval_resolved_line(approval: common_pb2.Approval) -> str:
    """How an approval was decided, and by whom: ``✓ shell approved by key_… (remembered)``,
    ``✗ shell rejected by key_…: not on main``, expired or closed by the kernel."""
    decision = approval.decision
    by = f" by {approval.decided_by}" if approval.decided_by and approval.decided_by != "kernel" else ""
    remembered = " (remembered)" if approval.remember else ""
    tool = approval.tool_name or "the call"
    why = f": {_short(approval.reason)}" if approval.reason else ""
    if decision == common_pb2.APPROVAL_DECISION_APPROVE:
        return f"✓ {tool} approved{by}{remembered}"
    if decision == common_pb2.APPROVAL_DECISION_EDIT:
        edited = _call_subject(approval.tool_name, approval.edited_input_json)
        return f"✓ {tool} approved with other input{by}{remembered}: {edited}"
    if decision == common_pb2.APPROVAL_DECISION_REJECT:
        return f"✗ {tool} rejected{by}{why}"
    if decision == common_pb2.APPROVAL_DECISION_EXPIRED:
        return f"✗ {tool}: the approval expired, nobody decided in time{why}"
    if decision == common_pb2.APPROVAL_DECISION_CLOSED:
        return f"✗ {tool}: the approval closed, the turn ended before a decision{why}"
    return f"? {tool}: approval {approval.id} is still pending"


def _preview(content: str, lines: int = 3, width: int = 160) -> str:
    shown = content.splitlines()[:lines]
    text = " ⏎ ".join(line[:width] for line in shown)
    more = len(content.splitlines()) - len(shown)
    return text + (f" … (+{more} lines)" if more > 0 else "")


# ------------------------------------------------------------------ JSON lines


def _as_dict(message: Message, **first: Any) -> dict[str, Any]:
    """``message`` in protobuf's JSON mapping, after ``first`` (int64 counters there stay numbers)."""
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return {**first, **{k: v for k, v in body.items() if k not in first}}


def event_json(event: common_pb2.AgentEvent) -> str:
    """One event as a JSON line: ``event_seq`` (a number) and ``kind`` first."""
    return json.dumps(
        _as_dict(event, event_seq=event.event_seq, kind=event.WhichOneof("kind")), ensure_ascii=False
    )


def message_text(message: common_pb2.Message) -> str:
    return "".join(chunk.text.text for chunk in message.chunks if chunk.HasField("text"))


def message_json(message: common_pb2.Message) -> str:
    role = common_pb2.Role.Name(message.role).removeprefix("ROLE_").lower()
    fields = _as_dict(message, seq=message.seq, role=role, text=message_text(message))
    return json.dumps(fields, ensure_ascii=False)


def conversation_json(conv: common_pb2.Conversation) -> str:
    fields = _as_dict(conv, id=conv.id, last_seq=conv.last_seq, last_event_seq=conv.last_event_seq)
    return json.dumps(fields, ensure_ascii=False)


# A turn in these states has not ended; its lease owner is the kernel running it.
_UNENDED = (
    common_pb2.TURN_STATE_QUEUED,
    common_pb2.TURN_STATE_RUNNING,
    common_pb2.TURN_STATE_WAITING_FOR_APPROVAL,
    common_pb2.TURN_STATE_RESUMING,
)


def _state_name(state: common_pb2.TurnState.ValueType) -> str:
    return common_pb2.TurnState.Name(state).removeprefix("TURN_STATE_").lower()


def _since(start: timestamp_pb2.Timestamp, then: timestamp_pb2.Timestamp) -> str:
    return f"+{(then.ToNanoseconds() - start.ToNanoseconds()) / 1e9:.2f}s"


def turn_line(turn: common_pb2.Turn) -> str:
    """One turn for people: id, state, attempts, the lease owner while it has not ended, the
    finish reason once it has, when it was created (UTC) and started and ended after that."""
    parts = [turn.id, f"{_state_name(turn.state):<9}", f"attempts {turn.attempts}"]
    if turn.state in _UNENDED and turn.lease_owner:
        parts.append(f"lease {turn.lease_owner}")
    if turn.finish_reason:
        parts.append(_FINISH_WORDS.get(turn.finish_reason, "done"))
    if turn.HasField("created_at"):
        parts.append(f"created {turn.created_at.ToDatetime().strftime('%Y-%m-%d %H:%M:%S')}")
        if turn.HasField("started_at"):
            parts.append(f"started {_since(turn.created_at, turn.started_at)}")
        if turn.HasField("ended_at"):
            parts.append(f"ended {_since(turn.created_at, turn.ended_at)}")
    if turn.error_message:
        parts.append(f"error: {_preview(turn.error_message, lines=1)}")
    return "  ".join(parts)


def turn_json(turn: common_pb2.Turn) -> str:
    """One turn as a JSON line: protobuf's JSON mapping, with ``state`` and ``finish_reason``
    as their short lower-case names and ``attempts`` and ``lease_epoch`` as numbers, always."""
    first: dict[str, Any] = {"id": turn.id, "state": _state_name(turn.state), "attempts": turn.attempts}
    if turn.finish_reason:
        first["finish_reason"] = (
            common_pb2.FinishReason.Name(turn.finish_reason).removeprefix("FINISH_REASON_").lower()
        )
    first["lease_epoch"] = turn.lease_epoch
    first["user_message_seq"] = turn.user_message_seq
    return json.dumps(_as_dict(turn, **first), ensure_ascii=False)


_APPROVAL_STATES = {
    common_pb2.APPROVAL_DECISION_UNSPECIFIED: "pending",
    common_pb2.APPROVAL_DECISION_APPROVE: "approved",
    common_pb2.APPROVAL_DECISION_REJECT: "rejected",
    common_pb2.APPROVAL_DECISION_EDIT: "edited",
    common_pb2.APPROVAL_DECISION_EXPIRED: "expired",
    common_pb2.APPROVAL_DECISION_CLOSED: "closed",
}


def approval_line(approval: common_pb2.Approval) -> str:
    """One approval for people: id, state (pending, approved, rejected, edited, expired,
    closed), the call (tool and what it runs), the rule that asked, who decided, whether it
    was remembered, the reason or the edited input, and when it was created (UTC) and decided."""
    state = _APPROVAL_STATES.get(approval.decision, "decided")
    parts: list[str] = [
        approval.id,
        f"{state:<8}",
        approval.tool_name,
        _call_subject(approval.tool_name, approval.input_json),
    ]
    if approval.rule:
        parts.append(f"rule: {approval.rule}")
    if approval.decided_by:
        parts.append(f"by {approval.decided_by}")
    if approval.remember:
        parts.append("remembered")
    if approval.edited_input_json:
        parts.append(f"input: {_call_subject(approval.tool_name, approval.edited_input_json)}")
    if approval.reason:
        parts.append(f"reason: {_short(approval.reason)}")
    if approval.HasField("created_at"):
        parts.append(f"created {approval.created_at.ToDatetime().strftime('%Y-%m-%d %H:%M:%S')}")
        if approval.HasField("resolved_at"):
            parts.append(f"decided {_since(approval.created_at, approval.resolved_at)}")
    return "  ".join(part for part in parts if part)


def approval_json(approval: common_pb2.Approval) -> str:
    """One approval as a JSON line: protobuf's JSON mapping, with ``state`` (as ``approval_line``
    names it) first and ``decision`` as its short name (``"approve"``; absent while pending)."""
    first: dict[str, Any] = {"id": approval.id, "state": _APPROVAL_STATES.get(approval.decision, "decided")}
    if approval.decision:
        first["decision"] = (
            common_pb2.ApprovalDecision.Name(approval.decision).removeprefix("APPROVAL_DECISION_").lower()
        )
    return json.dumps(_as_dict(approval, **first), ensure_ascii=False)


def _chunk_line(chunk: common_pb2.Chunk) -> str:
    kind = chunk.WhichOneof("kind")
    if kind == "text":
        return chunk.text.text
    if kind == "thinking":
        return f"(thinking) {_preview(chunk.thinking.text)}"
    if kind == "tool_call":
        return f"→ {chunk.tool_call.name} {_compact(chunk.tool_call.input_json)}"
    if kind == "tool_result":
        mark = "✗" if chunk.tool_result.is_error else "←"
        return f"{mark} {chunk.tool_result.name}: {_preview(chunk.tool_result.content)}"
    if kind == "error":
        return f"error: {chunk.error.message}"
    return ""


def message_line(message: common_pb2.Message) -> str:
    role = common_pb2.Role.Name(message.role).removeprefix("ROLE_").lower()
    body = "\n    ".join(line for line in map(_chunk_line, message.chunks) if line)
    return f"#{message.seq} {role}: {body}"


# ------------------------------------------------------------------ Ctrl-C


class Interrupts:
    """Ctrl-C while a command runs. The first cancels the command's task: a command
    following a turn catches that and cancels the turn on the server (``_follow_turn``),
    the others just end. The second exits at once, whatever is under way."""

    def __init__(self, task: asyncio.Task[Any]):
        self.task = task
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        if self.count == 1:
            self.task.cancel()
            return
        print("\ndispatch: interrupted again; exiting now", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)


def _interrupted() -> None:
    # The task's cancellation was ours to handle (Ctrl-C); later awaits must not see it.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _cancel_turn(client: DispatchClient, conversation_id: str, turn_id: str) -> None:
    """Ctrl-C while following ``turn_id``: ask the server to abort it, briefly, and say so."""
    print(
        f"dispatch: interrupted; cancelling turn {turn_id} (Ctrl-C again to exit at once)",
        file=sys.stderr,
        flush=True,
    )
    try:
        cancelled = await client.cancel(conversation_id, turn_id, timeout=CANCEL_DEADLINE)
    except DispatchError as exc:
        print(f"dispatch: could not cancel turn {turn_id}: {exc}", file=sys.stderr, flush=True)
        return
    if cancelled.turn_id:
        print(f"dispatch: cancelled turn {turn_id}", file=sys.stderr, flush=True)
    else:
        print(f"dispatch: turn {turn_id} had already ended", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ approvals

# Decides one approval request of the turn shown (asks at the terminal, or says how).
Decide = Callable[[common_pb2.Approval], Awaitable[None]]


class AskingSink:
    """A sink that has each approval request of its turn decided by ``decide``, one at a time,
    in the order they come. While one is being decided the events after it are held and
    written once it is, so nothing is printed over the question; one decided elsewhere
    (another client, its expiry, the turn ending) withdraws its question."""

    def __init__(self, sink: Sink, decide: Decide):
        self.sink = sink
        self.decide = decide
        self._waiting: deque[common_pb2.Approval] = deque()
        self._current = ""
        self._task: asyncio.Future[None] | None = None
        self._held: list[common_pb2.AgentEvent] = []
        # Approvals known to be decided, held events included: never asked.
        self._resolved: set[str] = set()
        self._closed = False
        # What went wrong deciding (not a refusal of the server's: ``decide`` reports those).
        self._failure: BaseException | None = None

    @property
    def finish(self) -> common_pb2.FinishReason.ValueType:
        return self.sink.finish

    @property
    def sealed(self) -> bool:
        return self.sink.sealed

    @property
    def deciding(self) -> str:
        """The id of the approval being decided now, or ""."""
        return self._current

    def end_line(self) -> None:
        self.sink.end_line()

    def event(self, event: common_pb2.AgentEvent) -> None:
        if event.HasField("approval_resolved"):
            self._resolved.add(event.approval_resolved.approval.id)
        if self._task is None:
            self._show(event)
            return
        if event.HasField("approval_resolved") and event.approval_resolved.approval.id == self._current:
            self._task.cancel()  # decided (here, or elsewhere): the question is over
        self._held.append(event)

    def _show(self, event: common_pb2.AgentEvent) -> None:
        self.sink.event(event)
        if event.HasField("approval_requested"):
            self._waiting.append(event.approval_requested.approval)
        self._waiting = deque(a for a in self._waiting if a.id not in self._resolved)
        if self._task is None and self._waiting and not self._closed:
            approval = self._waiting.popleft()
            self._current = approval.id
            self.sink.end_line()
            self._task = asyncio.ensure_future(self.decide(approval))
            self._task.add_done_callback(self._decided)

    def _decided(self, task: asyncio.Future[None]) -> None:
        self._task, self._current = None, ""
        if not task.cancelled() and task.exception() is not None:
            self._failure = self._failure or task.exception()
        held, self._held = self._held, []
        for i, event in enumerate(held):
            if self._task is not None:  # another question: the rest waits for it
                self._held.extend(held[i:])
                return
            self._show(event)

    async def close(self) -> None:
        """Withdraw the question still open, if any, and write what was held."""
        self._closed = True
        self._waiting.clear()
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self._task is task:  # its done callback has not run yet
                self._decided(task)
        for event in self._held:
            self.sink.event(event)
        self._held = []
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure


def decide_hint(args: argparse.Namespace, approval_id: str) -> str:
    """How to decide ``approval_id`` from another terminal, with the options this run needed to
    reach the server (never the API key)."""

    def command(*words: str) -> str:
        line = ["dispatch", *words]
        if args.address_given:
            line += ["--address", args.address]
        if args.data_dir:
            line += ["--data-dir", os.path.abspath(Path(args.data_dir).expanduser())]
        return " ".join(shlex.quote(w) for w in line)

    return (
        f"approval {approval_id} waits for a decision: {command('approve', approval_id)} "
        f"[--remember] [--edit JSON], or {command('reject', approval_id)} [--reason TEXT]"
    )


class TerminalDecider:
    """Decides approvals by asking at the terminal (``read``, questions on ``say``); when the
    input ends, or ``read`` is None, it says how to decide them elsewhere instead. An edit the
    server refuses (not the tool's schema) asks again; any other failure is reported, and the
    turn goes on being followed."""

    def __init__(
        self, client: DispatchClient, args: argparse.Namespace, read: LineReader | None, say: TextIO
    ):
        self.client = client
        self.args = args
        self.read = read
        self.say = say

    async def __call__(self, approval: common_pb2.Approval) -> None:
        while self.read is not None:
            try:
                answer = await ask(approval, self.read, self.say)
            except asyncio.CancelledError:
                print(file=self.say, flush=True)  # the prompt's line ends; the stream says why
                raise
            if answer is None:
                self.read = None  # the input ended: no more questions
                break
            try:
                await self.client.resolve_approval(
                    approval.id,
                    answer.decision,
                    edited_input_json=answer.edited_input_json,
                    reason=answer.reason,
                    remember=answer.remember,
                )
                return
            except InvalidArgument as exc:
                print(f"dispatch: {exc}", file=self.say, flush=True)
            except DispatchError as exc:
                print(f"dispatch: could not decide approval {approval.id}: {exc}", file=self.say, flush=True)
                return
        print(f"dispatch: {decide_hint(self.args, approval.id)}", file=self.say, flush=True)


def _on_a_terminal(*streams: TextIO) -> bool:
    try:
        return all(stream.isatty() for stream in streams)
    except (AttributeError, ValueError, OSError):
        return False


def _decider(args: argparse.Namespace, client: DispatchClient) -> TerminalDecider:
    """Ask at the terminal when stdin and stderr are one and ``--no-prompt`` is not given;
    else only say how to decide."""
    prompt = not getattr(args, "no_prompt", False) and _on_a_terminal(sys.stdin, sys.stderr)
    read = TerminalReader(sys.stdin.fileno(), sys.stderr) if prompt else None
    return TerminalDecider(client, args, read, sys.stderr)


async def _follow_turn(
    client: DispatchClient,
    conversation_id: str,
    text: str,
    sink: Sink,
    *,
    decide: Decide | None = None,
    **send_options: Any,
) -> transport_pb2.SendResponse:
    """Send ``text`` and write the events of the turn that takes it to ``sink``, up to its
    seal; its approval requests go to ``decide``, one at a time (see ``AskingSink``). Ctrl-C
    (the task cancelled) cancels the turn being shown on the server, then lets the
    cancellation through."""
    sending = asyncio.ensure_future(client.send(conversation_id, text, **send_options))
    try:
        sent = await asyncio.shield(sending)
    except asyncio.CancelledError:
        # The message is on its way and may start a turn: learn which, to cancel it.
        _interrupted()
        try:
            sent = await sending
        except DispatchError:
            raise asyncio.CancelledError from None  # it did not get through: nothing to cancel
        await _cancel_turn(client, conversation_id, sent.turn_id)
        raise
    shown = sent.turn_id
    events = client.follow_turn(conversation_id, sent)
    asking = AskingSink(sink, decide) if decide is not None else None
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                shown = event.turn_id or shown
                (asking or sink).event(event)
    except asyncio.CancelledError:
        _interrupted()
        if asking is not None:
            await asking.close()
        sink.end_line()
        await _cancel_turn(client, conversation_id, shown)
        raise
    finally:
        if asking is not None:
            await asking.close()
    return sent


# -------------------------------------------------------------------- commands


def _client(args: argparse.Namespace) -> DispatchClient:
    return DispatchClient(args.address, api_key=args.api_key, timeout=args.timeout)


def _sink(args: argparse.Namespace, out: TextIO, *, as_json: bool = False, show_turns: bool = False) -> Sink:
    if as_json:
        return JsonLines(out)
    return Renderer(out, color=use_color(args.color, out), show_turns=show_turns)


def turn_status(sink: Sink) -> int:
    """The exit status of a command that showed a turn to its end: 0 if the turn finished with
    stop or length and was sealed, else 1."""
    return EXIT_OK if sink.finish in _GOOD_FINISH and sink.sealed else EXIT_TURN_FAILED


def _continue_hint(args: argparse.Namespace, conversation_id: str) -> str:
    """How to continue the conversation, with the options this run needed to reach the server
    (never the API key)."""
    words = ["dispatch", "chat", "-c", conversation_id]
    if args.address_given:
        words += ["--address", args.address]
    if args.data_dir:
        words += ["--data-dir", os.path.abspath(Path(args.data_dir).expanduser())]
    return " ".join(shlex.quote(w) for w in words) + ' "..."'


async def _chat(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        conversation_id = args.conversation
        if not conversation_id:
            conversation_id = (await client.create_conversation()).id
            print(f"conversation {conversation_id}", file=sys.stderr)
        sink = _sink(args, out)
        await _follow_turn(client, conversation_id, args.message, sink, decide=_decider(args, client))
        print(f"continue with: {_continue_hint(args, conversation_id)}", file=sys.stderr)
        return turn_status(sink)


async def _send(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        options: dict[str, Any] = {"policy": args.policy, "idempotency_key": args.idempotency_key}
        if args.no_wait:
            sent = await client.send(args.conversation, args.text, **options)
            if args.json:
                print(json.dumps(_as_dict(sent, after_event_seq=sent.after_event_seq)), file=out)
            else:
                print(sent.turn_id, file=out)
                if sent.queued:
                    print(f"queued behind the running turn {sent.turn_id}", file=sys.stderr)
            return EXIT_OK
        sink = _sink(args, out, as_json=args.json)
        await _follow_turn(
            client, args.conversation, args.text, sink, decide=_decider(args, client), **options
        )
        return turn_status(sink)


async def _watch(args: argparse.Namespace, out: TextIO) -> int:
    until = args.until
    sink = _sink(args, out, as_json=args.json, show_turns=True)
    async with _client(args) as client:
        events = client.subscribe(args.conversation, after_event_seq=args.after, until=until)
        async with contextlib.aclosing(events):
            async for event in events:
                sink.event(event)
    # Waiting for a turn's seal is waiting for how it finishes: say it, as send does
    # (a conversation without turns has nothing to say).
    if until == "turn_sealed" and sink.finish != common_pb2.FINISH_REASON_UNSPECIFIED:
        return turn_status(sink)
    return EXIT_OK


async def _history(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        page = min(args.limit, 500) if args.limit > 0 else 500
        messages = client.iter_history(args.conversation, after_seq=args.after, page_size=page)
        async with contextlib.aclosing(messages):
            count = 0
            async for message in messages:
                print(message_json(message) if args.json else message_line(message), file=out)
                count += 1
                if args.limit and count >= args.limit:
                    break
    return EXIT_OK


async def _conversations(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        if args.action == "create":
            conv = await client.create_conversation(
                workspace_id=args.workspace,
                title=args.title,
                cwd=args.cwd,
                computer_id=args.computer,
                agent=args.agent,
            )
            print(conversation_json(conv) if args.json else conv.id, file=out)
            return EXIT_OK
        if args.action == "delete":
            await client.delete_conversation(args.id)
            return EXIT_OK
        convs = client.iter_conversations(workspace_id=args.workspace)
        async with contextlib.aclosing(convs):
            async for conv in convs:
                if args.json:
                    print(conversation_json(conv), file=out)
                else:
                    when = (
                        conv.updated_at.ToDatetime().strftime("%Y-%m-%d %H:%M")
                        if conv.updated_at.seconds
                        else "-"
                    )
                    print(
                        f"{conv.id}  {when}  {conv.last_seq:>4} msg  {conv.title or '(untitled)'}", file=out
                    )
    return EXIT_OK


async def _cancel(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        cancelled = await client.cancel(args.conversation, args.turn)
    if cancelled.turn_id:
        print(cancelled.turn_id, file=out)
    else:
        which = f"turn {args.turn} is not running" if args.turn else "no turn is running"
        print(f"nothing to cancel: {which}", file=sys.stderr)
    return EXIT_OK


async def _turns(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        if args.turn:
            turn = await client.get_turn(args.conversation, args.turn)
            print(turn_json(turn) if args.json else turn_line(turn), file=out)
            return EXIT_OK
        turns = client.iter_turns(args.conversation, states=args.state)
        async with contextlib.aclosing(turns):
            async for turn in turns:
                print(turn_json(turn) if args.json else turn_line(turn), file=out)
    return EXIT_OK


async def _approvals(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        listed = await client.list_approvals(args.conversation, pending_only=args.pending)
    for approval in listed.approvals:
        print(approval_json(approval) if args.json else approval_line(approval), file=out)
    return EXIT_OK


async def _approve(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        if args.edit is not None:
            decided = await client.edit(args.approval, args.edit, remember=args.remember)
        else:
            decided = await client.approve(args.approval, remember=args.remember)
    print(approval_line(decided), file=out)
    return EXIT_OK


async def _reject(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        decided = await client.reject(args.approval, args.reason)
    print(approval_line(decided), file=out)
    return EXIT_OK


Command = Callable[[argparse.Namespace, TextIO], Coroutine[Any, Any, int]]

_COMMANDS: dict[str, Command] = {
    "chat": _chat,
    "send": _send,
    "watch": _watch,
    "history": _history,
    "conversations": _conversations,
    "cancel": _cancel,
    "turns": _turns,
    "approvals": _approvals,
    "approve": _approve,
    "reject": _reject,
}


def _turn_state_arg(value: str) -> str:
    """``--state``'s value as its short name: ``RUNNING`` and ``TURN_STATE_RUNNING`` are ``running``."""
    return value.strip().lower().removeprefix("turn_state_")


def parser() -> argparse.ArgumentParser:
    # The global options, accepted before the command or after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        help=f"transport address (env: DISPATCH_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="API key (default: the api_key file in --data-dir, else env DISPATCH_API_KEY, "
        "else $DISPATCH_DATA_DIR/api_key)",
    )
    common.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="the data directory of `dispatchd up`, where it wrote api_key "
        "(overrides DISPATCH_DATA_DIR and DISPATCH_API_KEY)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds a call may take (default {DEFAULT_TIMEOUT:g}; streams have no limit)",
    )
    common.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default=argparse.SUPPRESS,
        help="colour the output (default auto: on a terminal, unless NO_COLOR is set)",
    )

    top = argparse.ArgumentParser(
        prog="dispatch",
        description="Talk to a Dispatch server.",
        epilog="exit status: 0 ok, 1 the turn finished badly, 2 usage, 3 unavailable or too slow, "
        "4 not found, 5 unauthenticated or permission denied, 6 request refused, "
        "7 other server error, 130 interrupted",
        parents=[common],
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    no_prompt = "on a tool call waiting for approval, only say how to decide it (default: ask, on a terminal)"
    p = command("chat", "send a message and stream the turn (Ctrl-C cancels it)")
    p.add_argument("message")
    p.add_argument("--conversation", "-c", default="", help="continue this conversation (default: a new one)")
    p.add_argument("--no-prompt", action="store_true", help=no_prompt)

    p = command("send", "send a message to a conversation and render its turn (Ctrl-C cancels it)")
    p.add_argument("conversation")
    p.add_argument("text")
    p.add_argument(
        "--policy", choices=POLICY_NAMES, default="enqueue", help="when a turn runs (default: enqueue)"
    )
    p.add_argument("--idempotency-key", default="", help="a repeat with this key does not start another turn")
    p.add_argument("--no-wait", action="store_true", help="print the turn id and return at once")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument("--no-prompt", action="store_true", help=no_prompt)

    p = command("watch", "follow a conversation's events (reconnecting by itself)")
    p.add_argument("conversation")
    p.add_argument(
        "--after", type=int, default=0, metavar="N", help="events after event_seq N (default 0: all)"
    )
    p.add_argument("--json", action="store_true", help="one JSON event per line, with event_seq")
    ends = p.add_mutually_exclusive_group()
    ends.add_argument(
        "--until",
        choices=UNTIL_NAMES,
        default="follow",
        help="follow: until Ctrl-C (default); caught_up: the events so far, then exit; "
        "turn_sealed: until the turn running now is sealed (with none running: caught_up)",
    )
    ends.add_argument(
        "--until-sealed",
        dest="until",
        action="store_const",
        const="turn_sealed",
        help="--until turn_sealed",
    )

    p = command("history", "print a conversation's committed messages")
    p.add_argument("conversation")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="messages after seq SEQ")
    p.add_argument("--limit", type=int, default=0, help="at most this many messages")
    p.add_argument("--json", action="store_true", help="one JSON message per line")

    p = command("conversations", "list conversations, or create or delete one")
    p.add_argument("--workspace", default="", help="only this workspace's (create: in this workspace)")
    p.add_argument("--json", action="store_true", help="one JSON conversation per line")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    create = actions.add_parser("create", help="create a conversation; prints its id", parents=[common])
    create.add_argument("--title", default="")
    create.add_argument("--cwd", default="", help="directory tools start in (default: the workspace root)")
    create.add_argument("--computer", default="", help="SSH Host alias tools run on (default: this machine)")
    create.add_argument("--agent", default="", help="agent to use (default: the workspace's)")
    create.add_argument("--workspace", default=argparse.SUPPRESS, help="create it in this workspace")
    create.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print it as JSON")
    delete = actions.add_parser("delete", help="delete a conversation", parents=[common])
    delete.add_argument("id")

    p = command("cancel", "abort a conversation's running turn")
    p.add_argument("conversation")
    p.add_argument("--turn", default="", metavar="ID", help="only if this turn is the one running")

    p = command("turns", "list a conversation's turns (oldest first), or show one")
    p.add_argument("conversation")
    p.add_argument("turn", nargs="?", default="", metavar="TURN_ID", help="show only this turn")
    p.add_argument(
        "--state",
        action="append",
        type=_turn_state_arg,
        choices=TURN_STATE_NAMES,
        default=[],
        metavar="STATE",
        help=f"only turns in this state; repeat for several ({', '.join(TURN_STATE_NAMES)})",
    )
    p.add_argument("--json", action="store_true", help="one JSON turn per line")

    p = command("approvals", "list a conversation's approvals (oldest first)")
    p.add_argument("conversation")
    p.add_argument("--pending", action="store_true", help="only those waiting for a decision")
    p.add_argument("--json", action="store_true", help="one JSON approval per line")

    p = command("approve", "let a tool call waiting for approval run")
    p.add_argument("approval", metavar="APPROVAL_ID")
    p.add_argument(
        "--remember",
        action="store_true",
        help="and the same call, without asking, for the rest of the conversation",
    )
    p.add_argument("--edit", metavar="JSON", help="run it with this input instead (a JSON object)")

    p = command("reject", "refuse a tool call waiting for approval (the model gets an error result)")
    p.add_argument("approval", metavar="APPROVAL_ID")
    p.add_argument("--reason", default="", metavar="TEXT", help="why, for the model")
    return top


class _StderrHandler(logging.Handler):
    """The SDK's warnings (a stream that broke and is being resumed) as ``dispatch: ...`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"dispatch: {self.format(record)}", file=sys.stderr, flush=True)


def _show_sdk_warnings() -> None:
    sdk = logging.getLogger("dispatch_client")
    if not any(isinstance(h, _StderrHandler) for h in sdk.handlers):
        sdk.addHandler(_StderrHandler(logging.WARNING))
        sdk.setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the global options' defaults filled in; exits 2 on a bad one."""
    top = parser()
    args = top.parse_args(argv)
    # The global options' defaults, filled in here: set_defaults would reach the subcommands'
    # copies of the options too, and override what was given before the command.
    given = getattr(args, "address", None)
    args.address_given = bool(given)
    args.address = given or os.environ.get("DISPATCH_ADDRESS") or DEFAULT_ADDRESS
    args.api_key = getattr(args, "api_key", None)
    args.data_dir = getattr(args, "data_dir", None)
    args.timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    args.color = getattr(args, "color", "auto")
    if args.command == "turns" and args.turn and args.state:
        top.error("turns: --state filters the list; it does not go with TURN_ID")
    if not args.api_key and args.data_dir:
        # The flag beats the environment: the key of the server whose data dir was named.
        key_file = Path(args.data_dir).expanduser() / "api_key"
        try:
            args.api_key = key_file.read_text().strip()
        except OSError as exc:
            top.error(f"--data-dir: cannot read the API key in {key_file}: {exc.strerror or exc}")
        if not args.api_key:
            top.error(f"--data-dir: {key_file} is empty")
    return args


async def _run(command: Command, args: argparse.Namespace, out: TextIO) -> int:
    """Run ``command`` with Ctrl-C handled by ``Interrupts``: its first press ends the command
    (after it cancels what it follows) with exit status 130."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupts = Interrupts(task)
    try:
        loop.add_signal_handler(signal.SIGINT, interrupts)
        handled = True
    except (NotImplementedError, RuntimeError, ValueError):
        # Not the main thread (or no signals on this platform): Ctrl-C is KeyboardInterrupt.
        handled = False
    try:
        return await command(args, out)
    except asyncio.CancelledError:
        if not interrupts.count:
            raise
        return EXIT_INTERRUPTED
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _show_sdk_warnings()
    out = sys.stdout
    try:
        return asyncio.run(_run(_COMMANDS[args.command], args, out))
    except DispatchError as exc:
        hint = (
            " — is the server running? start it with `dispatchd up`"
            if exc.code == grpc.StatusCode.UNAVAILABLE
            else ""
        )
        print(f"dispatch: {exc}{hint}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`dispatch watch --json | head`): not an error of ours.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
