# Stub for the native module built from dispatcher_rs/ (kept true by mypy.stubtest in `make lint`).
# Import these through `dispatch.dispatcher`, whose docstring states the rules.
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, final

__all__ = [
    "InvalidInput",
    "InvalidState",
    "Scheduler",
    "SchedulerError",
    "UnknownCall",
    "__version__",
    "canonical_key",
]

__version__: Final[str]

class SchedulerError(Exception):
    """Base class of the scheduler's errors."""

class UnknownCall(SchedulerError, LookupError):
    """complete() of an id the scheduler never accepted."""

class InvalidState(SchedulerError):
    """An operation the call's or the scheduler's state does not allow."""

class InvalidInput(SchedulerError, ValueError):
    """Input that is not a JSON document, or a bad constructor argument."""

@final
class Scheduler:
    """The scheduling state machine of one step's tool calls."""

    def __new__(
        cls,
        max_concurrent: int = 0,
        tool_limits: Mapping[str, int] | None = None,
        dedup_exempt: Iterable[str] = (),
    ) -> Scheduler: ...
    def submit(
        self, id: str, tool_name: str, input_json: str | bytes, concurrency_safe: bool
    ) -> tuple[list[str], str | None]: ...
    def submit_many(
        self, calls: Sequence[tuple[str, str, str | bytes, bool]]
    ) -> list[tuple[list[str], str | None]]: ...
    def complete(self, id: str) -> list[str]: ...
    def abort(self) -> list[str]: ...
    @property
    def queued(self) -> list[str]: ...
    @property
    def running(self) -> list[str]: ...
    @property
    def closed(self) -> bool: ...

def canonical_key(input_json: str | bytes) -> bytes: ...
