"""The tool-dispatch scheduler of one step, compiled from ``dispatcher_rs``.

The native module ``dispatch._dispatcher`` is private; import from here. The
scheduler is a pure, synchronous state machine: it never runs anything, holds
no Python objects, and answers every call at once. The kernel runs the tool
coroutines and tells it what happened::

    scheduler = Scheduler(max_concurrent=4, tool_limits={"shell": 2}, dedup_exempt=["shell"])
    start, duplicate_of = scheduler.submit(call.id, call.name, call.input_json, tool.concurrency_safe)
    # ... start the ids in ``start``; give ``call`` the result of ``duplicate_of`` if set ...
    start = scheduler.complete(finished_id)   # each time a running call finishes
    never_started = scheduler.abort()         # on abort: resolve these as "Aborted"

``dispatch.dispatcher_ref.ReferenceScheduler`` is a pure-Python twin with the
same API, errors and answers, kept for parity tests and as the readable
specification; use this one in production.

API (both implementations)
--------------------------
``Scheduler(max_concurrent=0, tool_limits=None, dedup_exempt=())``
    ``max_concurrent`` caps the running calls (0 = unlimited); ``tool_limits``
    caps the running calls per tool name (a limit of 0 = unlimited);
    ``dedup_exempt`` names tools whose calls are never deduplicated (a bare
    ``str`` is refused with ``TypeError``). A negative number raises
    ``InvalidInput``.
``submit(id, tool_name, input_json, concurrency_safe) -> (start, duplicate_of)``
    Registers a call. ``input_json`` is ``str`` or UTF-8 ``bytes``. ``start``
    lists the ids that may start now, in start order (this call and/or calls
    queued earlier). ``duplicate_of`` is the id of the earlier call this one
    duplicates; such a call is neither queued nor run (``start`` is ``[]``)
    and takes that call's result.
``submit_many(calls) -> list[(start, duplicate_of)]``
    ``submit`` for each ``(id, tool_name, input_json, concurrency_safe)`` tuple
    in one crossing of the boundary. All or nothing: if any call would be
    refused, the first refusal (in batch order) is raised and none of the
    batch is registered.
``complete(id) -> start``
    A running call finished; returns the ids that may start next.
``abort() -> never_started``
    Returns the queued ids (in queue order) and closes the scheduler: they
    will never start, and later ``submit`` raises ``InvalidState``. Running
    calls may still ``complete`` (which then starts nothing). Calling
    ``abort`` again returns ``[]``.
``queued`` (queue order), ``running`` (start order), ``closed``
    Read-only views.
``canonical_key(input_json) -> bytes``
    The canonical form used for dedup (below), as compact JSON.

Rules
-----
A queued call may start iff

1. no non-concurrency-safe ("unsafe") call is running;
2. if the call is unsafe, nothing at all is running;
3. ``max_concurrent`` is 0 or fewer than ``max_concurrent`` calls are running;
4. its tool has no limit, or fewer calls of that tool than its limit are
   running (unsafe calls count toward their tool's limit too).

After every ``submit`` and ``complete`` the scheduler makes one pass over the
queue in FIFO order and starts each call that may start, with these stops and
skips:

- a call that cannot start and is **unsafe ends the pass**: an unsafe call is
  a barrier that nothing queued behind it overtakes, so it cannot starve. A
  consequence to know: while an unsafe call waits for running calls to
  finish, safe calls submitted after it wait too, even with free slots;
- a call that cannot start because of the global cap, or because an unsafe
  call is running, ends the pass;
- a call blocked **only by its own tool's limit is skipped**: calls of other
  tools behind it may start, while calls of its own tool stay blocked and so
  keep their relative order.

So an unsafe call starts only at the head of the queue with nothing running,
and runs alone.

Dedup: the key of a call is ``(tool_name, canonical(input))``. A call whose
tool is not dedup-exempt and whose key equals that of an earlier call of this
scheduler is a duplicate of it, whether that call is queued, running or
completed (a duplicate always names the original call, never another
duplicate). The canonical form ignores object key order and whitespace, keeps
array order, compares strings by their decoded value (``"\\u0041" == "A"``)
and numbers as exact decimals (``1 == 1.0 == 1e0 == 10E-1``, ``0.1 == 0.10``,
``-0 == 0``; large integers never go through a float). A key given twice in
one object keeps its last value. Canonical keys are compared in full, so a
hash collision never merges two calls. Inputs must be JSON documents (any
JSON value) with at most 127 levels of nested arrays/objects, paired
surrogates only, no ``NaN``/``Infinity``, and numbers whose normalised
exponent fits in a signed 64-bit integer.

Errors
------
All are ``SchedulerError``; a refused operation changes nothing.

- ``UnknownCall`` (also a ``LookupError``): ``complete`` of an id never
  submitted.
- ``InvalidState``: ``submit`` of an id already submitted in this scheduler;
  ``submit`` after ``abort``; ``complete`` of a call that is not running
  (queued, already completed, a duplicate, or dropped by ``abort``).
- ``InvalidInput`` (also a ``ValueError``): input that is not a JSON document
  (the message carries the parser's line and column), or a negative limit.
- ``TypeError`` for arguments of the wrong type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dispatch import __version__ as _package_version
from dispatch._dispatcher import (
    InvalidInput,
    InvalidState,
    Scheduler,
    SchedulerError,
    UnknownCall,
    canonical_key,
)
from dispatch._dispatcher import __version__ as native_version

if native_version != _package_version:  # a stale build of the extension
    raise ImportError(
        f"dispatch._dispatcher is version {native_version} but the package is {_package_version}: "
        "rebuild it with `make install`"
    )

#: One call for ``submit_many``: (id, tool_name, input_json, concurrency_safe).
CallSpec = tuple[str, str, str | bytes, bool]

#: What ``submit`` returns: (ids that may start now, id of the call this one duplicates).
Submitted = tuple[list[str], str | None]


class StepScheduler(Protocol):
    """What ``Scheduler`` and ``ReferenceScheduler`` both provide."""

    def submit(
        self, id: str, tool_name: str, input_json: str | bytes, concurrency_safe: bool
    ) -> Submitted: ...
    def submit_many(self, calls: Sequence[CallSpec]) -> list[Submitted]: ...
    def complete(self, id: str) -> list[str]: ...
    def abort(self) -> list[str]: ...
    @property
    def queued(self) -> list[str]: ...
    @property
    def running(self) -> list[str]: ...
    @property
    def closed(self) -> bool: ...


__all__ = [
    "CallSpec",
    "InvalidInput",
    "InvalidState",
    "Scheduler",
    "SchedulerError",
    "StepScheduler",
    "Submitted",
    "UnknownCall",
    "canonical_key",
    "native_version",
]
