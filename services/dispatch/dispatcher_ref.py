"""Pure-Python reference of the tool-dispatch scheduler.

Same API, rules, errors (the same exception classes) and answers as
``dispatch.dispatcher.Scheduler``, whose docstring states the rules. This one
is written to be obviously right rather than fast: the pass over the queue is
the literal FIFO walk of the rules, and canonical JSON is built from
``json.loads`` with exact number literals. A property test drives it and the
Rust scheduler with random operation sequences and demands identical answers.

Numbers are normalised from their literal text (sign, significant digits,
exponent) rather than with ``decimal.Decimal.normalize()``, which rounds to
the context's precision (28 digits by default) and would merge numbers that
differ further down; the text route is exact and mirrors the Rust code.
"""

from __future__ import annotations

import json
import operator
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from json.encoder import encode_basestring
from typing import TypeAlias

from dispatch.dispatcher import CallSpec, InvalidInput, InvalidState, Submitted, UnknownCall

#: The deepest nesting of arrays/objects accepted (serde_json's limit).
MAX_DEPTH = 127

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
# Exponent literals with more significant digits are out of range whatever
# the rest of the number is (and `int()` of them stays cheap).
_MAX_EXPONENT_DIGITS = 38


class _NotCanonical(ValueError):
    """An input with no canonical form; the message says why."""


class _Number:
    """A JSON number, already in normal form."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_ZERO = _Number("0")


def _number(literal: str) -> _Number:
    """Normalise a JSON number literal: ``[-]digits[e<exp>]``, exactly."""
    negative = literal.startswith("-")
    mantissa, _, exponent_text = literal.removeprefix("-").lower().partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    significant = (int_part + frac_part).lstrip("0")
    if not significant:
        return _ZERO
    digits = significant.rstrip("0")

    sign = -1 if exponent_text.startswith("-") else 1
    exponent_digits = exponent_text.lstrip("+-").lstrip("0")
    if len(exponent_digits) > _MAX_EXPONENT_DIGITS:
        raise _NotCanonical(f"number {literal} has an exponent out of range")
    exponent = sign * int(exponent_digits or "0") - len(frac_part) + (len(significant) - len(digits))
    if not _I64_MIN <= exponent <= _I64_MAX:
        raise _NotCanonical(f"number {literal} has an exponent out of range")
    text = f"-{digits}" if negative else digits
    return _Number(f"{text}e{exponent}" if exponent else text)


def _reject_constant(name: str) -> None:
    raise _NotCanonical(f"{name} is not a JSON value")


_Json: TypeAlias = "bool | _Number | str | list[_Json] | dict[str, _Json] | None"


def _write(value: _Json, out: list[str], depth: int) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, _Number):
        out.append(value.text)
    elif isinstance(value, str):
        out.append(encode_basestring(value))
    else:
        if depth >= MAX_DEPTH:
            raise _NotCanonical(f"more than {MAX_DEPTH} nested arrays/objects")
        if isinstance(value, list):
            out.append("[")
            for i, item in enumerate(value):
                if i:
                    out.append(",")
                _write(item, out, depth + 1)
            out.append("]")
        else:
            out.append("{")
            for i, key in enumerate(sorted(value)):
                if i:
                    out.append(",")
                out.append(encode_basestring(key))
                out.append(":")
                _write(value[key], out, depth + 1)
            out.append("}")


def _canonical(input_json: str | bytes) -> bytes:
    """The canonical form of a JSON document; ``_NotCanonical`` if it has none."""
    try:
        text = input_json.decode("utf-8") if isinstance(input_json, bytes) else input_json
        value: _Json = json.loads(
            text, parse_int=_number, parse_float=_number, parse_constant=_reject_constant
        )
    except (UnicodeError, json.JSONDecodeError) as err:
        raise _NotCanonical(str(err)) from None
    except RecursionError:
        raise _NotCanonical(f"more than {MAX_DEPTH} nested arrays/objects") from None
    out: list[str] = []
    _write(value, out, 0)
    try:
        # Lone surrogates (escaped, or raw in a str) have no UTF-8 form.
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        raise _NotCanonical("lone surrogate in a string") from None


def canonical_key(input_json: str | bytes) -> bytes:
    """The canonical form of a JSON document, as compact JSON bytes (the dedup key)."""
    _check_input_type(input_json)
    try:
        return _canonical(input_json)
    except _NotCanonical as err:
        raise InvalidInput(f"input is not valid JSON: {err}") from None


def _check_input_type(input_json: object) -> None:
    if not isinstance(input_json, str | bytes):
        raise TypeError(f"input_json must be str or bytes, not {type(input_json).__name__}")


def _check_call_types(id: object, tool_name: object, input_json: object, concurrency_safe: object) -> None:
    if not isinstance(id, str) or not isinstance(tool_name, str):
        raise TypeError("id and tool_name must be str")
    if not isinstance(concurrency_safe, bool):
        raise TypeError("concurrency_safe must be bool")
    _check_input_type(input_json)


def _limit(value: object, what: str) -> int:
    """A limit from the caller; 0 (unlimited) stays 0."""
    limit = operator.index(value)  # type: ignore[arg-type]
    if limit < 0:
        raise InvalidInput(f"{what} must be >= 0 (0 means unlimited), got {limit}")
    return limit


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    DUPLICATE = "duplicate"
    ABORTED = "aborted"


@dataclass(slots=True)
class _Call:
    id: str
    tool_name: str
    safe: bool
    state: _State
    duplicate_of: str | None = None


class _Verdict(Enum):
    START = "start"
    SKIP = "skip"  # blocked only by its own tool's limit
    STOP = "stop"  # ends the pass


class ReferenceScheduler:
    """The scheduling state machine of one step's tool calls, in plain Python."""

    def __init__(
        self,
        max_concurrent: int = 0,
        tool_limits: Mapping[str, int] | None = None,
        dedup_exempt: Iterable[str] = (),
    ) -> None:
        limits: list[tuple[str, object]] = list((tool_limits or {}).items())
        if isinstance(dedup_exempt, str):
            raise TypeError("dedup_exempt must be an iterable of tool names, not a str")
        exempt = list(dedup_exempt)
        if not all(isinstance(name, str) for name, _ in limits) or not all(
            isinstance(name, str) for name in exempt
        ):
            raise TypeError("tool names must be str")
        self._max_concurrent = _limit(max_concurrent, "max_concurrent")
        self._tool_limits = {name: _limit(limit, f"the limit of tool '{name}'") for name, limit in limits}
        self._dedup_exempt = frozenset(exempt)
        self._calls: dict[str, _Call] = {}
        self._originals: dict[tuple[str, bytes], str] = {}  # dedup key -> id of the original call
        self._queue: deque[_Call] = deque()
        self._running: dict[str, _Call] = {}  # in start order
        self._running_per_tool: dict[str, int] = {}
        self._unsafe_running = False
        self._closed = False

    def submit(self, id: str, tool_name: str, input_json: str | bytes, concurrency_safe: bool) -> Submitted:
        """Register a call: (ids that may start now, id of the call this one duplicates)."""
        _check_call_types(id, tool_name, input_json, concurrency_safe)
        self._check_new_call(id)
        key = self._canonical_input(id, tool_name, input_json)
        return self._register(id, tool_name, key, concurrency_safe)

    def submit_many(self, calls: Sequence[CallSpec]) -> list[Submitted]:
        """``submit`` for each call; all or nothing."""
        calls = list(calls)
        for call in calls:
            if not isinstance(call, tuple) or len(call) != 4:
                raise TypeError("each call must be a tuple (id, tool_name, input_json, concurrency_safe)")
            _check_call_types(*call)
        prepared: list[tuple[str, str, bytes, bool]] = []
        batch_ids: set[str] = set()
        for id, tool_name, input_json, concurrency_safe in calls:
            self._check_new_call(id)
            if id in batch_ids:
                raise InvalidState(f"call id '{id}' was already submitted in this step")
            batch_ids.add(id)
            key = self._canonical_input(id, tool_name, input_json)
            prepared.append((id, tool_name, key, concurrency_safe))
        return [self._register(*call) for call in prepared]

    def complete(self, id: str) -> list[str]:
        """A running call finished: the ids that may start next."""
        if not isinstance(id, str):
            raise TypeError("id must be str")
        call = self._calls.get(id)
        if call is None:
            raise UnknownCall(f"unknown call id '{id}'")
        match call.state:
            case _State.RUNNING:
                pass
            case _State.QUEUED:
                raise InvalidState(f"call '{id}' is queued, not running: only a started call can complete")
            case _State.COMPLETED:
                raise InvalidState(f"call '{id}' already completed")
            case _State.DUPLICATE:
                original = call.duplicate_of
                raise InvalidState(
                    f"call '{id}' is a duplicate of '{original}' and never runs: complete '{original}'"
                )
            case _State.ABORTED:
                raise InvalidState(f"call '{id}' never started: the scheduler was aborted")
        call.state = _State.COMPLETED
        del self._running[id]
        self._running_per_tool[call.tool_name] -= 1
        if not call.safe:
            self._unsafe_running = False
        return self._pump()

    def abort(self) -> list[str]:
        """Close the scheduler: the queued ids that never started, in queue order."""
        self._closed = True
        aborted = [call.id for call in self._queue]
        for call in self._queue:
            call.state = _State.ABORTED
        self._queue.clear()
        return aborted

    @property
    def queued(self) -> list[str]:
        """The queued ids, in queue order."""
        return [call.id for call in self._queue]

    @property
    def running(self) -> list[str]:
        """The running ids, in start order."""
        return list(self._running)

    @property
    def closed(self) -> bool:
        """Whether abort() was called."""
        return self._closed

    def _check_new_call(self, id: str) -> None:
        if self._closed:
            raise InvalidState(f"cannot submit call '{id}': the scheduler was aborted")
        if id in self._calls:
            raise InvalidState(f"call id '{id}' was already submitted in this step")

    @staticmethod
    def _canonical_input(id: str, tool_name: str, input_json: str | bytes) -> bytes:
        try:
            return _canonical(input_json)
        except _NotCanonical as err:
            raise InvalidInput(
                f"input of call '{id}' (tool '{tool_name}') is not valid JSON: {err}"
            ) from None

    def _register(self, id: str, tool_name: str, key: bytes, concurrency_safe: bool) -> Submitted:
        if tool_name not in self._dedup_exempt:
            original = self._originals.get((tool_name, key))
            if original is not None:
                self._calls[id] = _Call(id, tool_name, concurrency_safe, _State.DUPLICATE, original)
                return [], original
            self._originals[tool_name, key] = id
        call = _Call(id, tool_name, concurrency_safe, _State.QUEUED)
        self._calls[id] = call
        self._queue.append(call)
        return self._pump(), None

    def _verdict(self, call: _Call) -> _Verdict:
        if self._unsafe_running:
            return _Verdict.STOP
        if not call.safe and self._running:
            return _Verdict.STOP  # a barrier
        if self._max_concurrent and len(self._running) >= self._max_concurrent:
            return _Verdict.STOP
        limit = self._tool_limits.get(call.tool_name, 0)
        if limit and self._running_per_tool.get(call.tool_name, 0) >= limit:
            return _Verdict.SKIP if call.safe else _Verdict.STOP
        return _Verdict.START

    def _pump(self) -> list[str]:
        """One FIFO pass over the queue, starting every call that may start."""
        started: list[str] = []
        skipped: list[_Call] = []
        queue = self._queue
        while queue:
            verdict = self._verdict(queue[0])
            if verdict is _Verdict.STOP:
                break
            call = queue.popleft()
            if verdict is _Verdict.SKIP:
                skipped.append(call)
                continue
            call.state = _State.RUNNING
            self._running[call.id] = call
            self._running_per_tool[call.tool_name] = self._running_per_tool.get(call.tool_name, 0) + 1
            if not call.safe:
                self._unsafe_running = True
            started.append(call.id)
        queue.extendleft(reversed(skipped))
        return started


__all__ = ["MAX_DEPTH", "ReferenceScheduler", "canonical_key"]
