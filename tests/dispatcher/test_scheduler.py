"""The scheduling rules, table-driven, against both implementations.

A scenario is a configuration and a script of operations, each with the
answer the scheduler must give (the ids it starts, in start order)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from dispatch.dispatcher import (
    InvalidInput,
    InvalidState,
    Scheduler,
    SchedulerError,
    StepScheduler,
    UnknownCall,
)
from dispatch.dispatcher_ref import ReferenceScheduler
from tests.dispatcher.conftest import SchedulerFactory


@dataclass(frozen=True)
class Submit:
    id: str
    starts: tuple[str, ...] = ()
    tool: str = "read"
    safe: bool = True
    input: str | None = None  # default: an input unique to this id
    duplicate_of: str | None = None


@dataclass(frozen=True)
class Complete:
    id: str
    starts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Abort:
    never_started: tuple[str, ...] = ()


@dataclass(frozen=True)
class Expect:
    queued: tuple[str, ...] | None = None
    running: tuple[str, ...] | None = None


Step = Submit | Complete | Abort | Expect


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    max_concurrent: int = 0
    tool_limits: dict[str, int] = field(default_factory=dict)
    dedup_exempt: tuple[str, ...] = ()


def run(make_scheduler: SchedulerFactory, scenario: Scenario) -> StepScheduler:
    scheduler = make_scheduler(scenario.max_concurrent, scenario.tool_limits, scenario.dedup_exempt)
    for n, step in enumerate(scenario.steps):
        where = f"step {n}: {step}"
        match step:
            case Submit():
                input_json = step.input if step.input is not None else json.dumps({"call": step.id})
                started, duplicate_of = scheduler.submit(step.id, step.tool, input_json, step.safe)
                assert (started, duplicate_of) == (list(step.starts), step.duplicate_of), where
            case Complete():
                assert scheduler.complete(step.id) == list(step.starts), where
            case Abort():
                assert scheduler.abort() == list(step.never_started), where
            case Expect():
                if step.queued is not None:
                    assert scheduler.queued == list(step.queued), where
                if step.running is not None:
                    assert scheduler.running == list(step.running), where
    return scheduler


SCENARIOS = [
    Scenario(
        "max_concurrent=1 runs calls one after another, in order",
        max_concurrent=1,
        steps=(
            Submit("a", ("a",)),
            Submit("b"),
            Submit("c"),
            Expect(queued=("b", "c"), running=("a",)),
            Complete("a", ("b",)),
            Complete("b", ("c",)),
            Complete("c"),
            Expect(queued=(), running=()),
        ),
    ),
    Scenario(
        "max_concurrent=2 runs two at a time; a freed slot goes to the next queued call",
        max_concurrent=2,
        steps=(
            Submit("a", ("a",)),
            Submit("b", ("b",)),
            Submit("c"),
            Submit("d"),
            Expect(queued=("c", "d"), running=("a", "b")),
            Complete("b", ("c",)),
            Expect(running=("a", "c")),
            Complete("a", ("d",)),
            Complete("c"),
            Complete("d"),
        ),
    ),
    Scenario(
        "max_concurrent=0 is unlimited: every call starts at once",
        max_concurrent=0,
        steps=(
            *(Submit(i, (i,)) for i in "abcdefgh"),
            Expect(queued=(), running=tuple("abcdefgh")),
        ),
    ),
    Scenario(
        "a per-tool limit holds under the global cap, and the cap holds too",
        max_concurrent=3,
        tool_limits={"shell": 2},
        steps=(
            Submit("s1", ("s1",), tool="shell"),
            Submit("s2", ("s2",), tool="shell"),
            Submit("s3", tool="shell"),  # shell is full
            Submit("r1", ("r1",)),  # overtakes s3: another tool
            Submit("r2"),  # the global cap is reached
            Expect(queued=("s3", "r2"), running=("s1", "s2", "r1")),
            Complete("s1", ("s3",)),  # first in the queue, and shell has room again
            Complete("r1", ("r2",)),
            Complete("s2"),
            Expect(queued=(), running=("s3", "r2")),
        ),
    ),
    Scenario(
        "a call blocked by its tool's limit does not block other tools; its tool keeps its order",
        tool_limits={"shell": 1},
        steps=(
            Submit("s1", ("s1",), tool="shell"),
            Submit("s2", tool="shell"),
            Submit("r1", ("r1",)),
            Submit("s3", tool="shell"),
            Submit("r2", ("r2",)),
            Expect(queued=("s2", "s3"), running=("s1", "r1", "r2")),
            Complete("s1", ("s2",)),
            Complete("s2", ("s3",)),
        ),
    ),
    Scenario(
        "a limit of 0 for a tool means unlimited",
        tool_limits={"shell": 0},
        steps=(
            Submit("s1", ("s1",), tool="shell"),
            Submit("s2", ("s2",), tool="shell"),
            Submit("s3", ("s3",), tool="shell"),
        ),
    ),
    Scenario(
        "an unsafe call waits for running calls and then runs alone, even with max_concurrent=5",
        max_concurrent=5,
        steps=(
            Submit("a", ("a",)),
            Submit("b", ("b",)),
            Submit("w", tool="write", safe=False),
            Complete("a"),  # b still runs
            Complete("b", ("w",)),
            Expect(queued=(), running=("w",)),
            Submit("c"),  # nothing starts while w runs
            Submit("d"),
            Expect(queued=("c", "d"), running=("w",)),
            Complete("w", ("c", "d")),
        ),
    ),
    Scenario(
        "a queued unsafe call is a barrier: later safe calls wait behind it despite free slots",
        max_concurrent=5,
        steps=(
            Submit("a", ("a",)),
            Submit("w", tool="write", safe=False),
            Submit("b"),  # slots are free, but w is ahead of it
            Submit("c"),
            Expect(queued=("w", "b", "c"), running=("a",)),
            Complete("a", ("w",)),
            Complete("w", ("b", "c")),
        ),
    ),
    Scenario(
        "unsafe calls in a row run one by one, each alone",
        steps=(
            Submit("w1", ("w1",), tool="write", safe=False),
            Submit("w2", tool="write", safe=False),
            Submit("r"),
            Submit("w3", tool="edit", safe=False),
            Complete("w1", ("w2",)),
            Complete("w2", ("r",)),
            Complete("r", ("w3",)),
            Complete("w3"),
        ),
    ),
    Scenario(
        "an unsafe call submitted when nothing runs starts at once",
        max_concurrent=1,
        steps=(Submit("w", ("w",), tool="write", safe=False),),
    ),
    Scenario(
        "safe calls ahead of an unsafe call still start, also past a tool-limited one",
        max_concurrent=4,
        tool_limits={"shell": 1},
        steps=(
            Submit("s1", ("s1",), tool="shell"),
            Submit("s2", tool="shell"),
            Submit("r1", ("r1",)),
            Submit("w", tool="write", safe=False),
            Submit("r2"),
            Complete("s1", ("s2",)),
            Complete("r1"),
            Complete("s2", ("w",)),
            Complete("w", ("r2",)),
        ),
    ),
    Scenario(
        "an unsafe call counts toward its tool's limit",
        tool_limits={"edit": 1},
        steps=(
            Submit("e1", ("e1",), tool="edit", safe=False),
            Submit("e2", tool="edit"),
            Submit("e3", tool="edit"),
            Complete("e1", ("e2",)),
            Complete("e2", ("e3",)),
        ),
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scheduling(make_scheduler: SchedulerFactory, scenario: Scenario) -> None:
    run(make_scheduler, scenario)


# Pairs of inputs the same tool is called with: equal means the second call is deduplicated.
DEDUP_PAIRS = [
    ('{"path": "a.txt", "limit": 10}', '{"limit":10,"path":"a.txt"}', True),
    ('{"path": "a.txt"}', ' {\n\t"path" :\r "a.txt" } ', True),
    ('{"x": 1}', '{"x": 1.0}', True),
    ('{"x": 1}', '{"x": 1e0}', True),
    ('{"x": 1}', '{"x": 10E-1}', True),
    ('{"x": 0.1}', '{"x": 0.10}', True),
    ('{"x": 0}', '{"x": -0}', True),
    ('{"x": 100}', '{"x": 1E+2}', True),
    ('{"x": "A"}', '{"x": "\\u0041"}', True),
    ('{"\\u00e9": 1}', '{"é": 1}', True),
    ('{"a": {"b": [1, {"c": 2, "d": 3}]}}', '{"a":{"b":[1,{"d":3,"c":2}]}}', True),
    ('{"a": 1, "a": 2}', '{"a": 2}', True),
    ('{"path": "a.txt"}', '{"path": "b.txt"}', False),
    ('{"x": [1, 2]}', '{"x": [2, 1]}', False),
    ('{"x": 1}', '{"x": "1"}', False),
    ('{"x": 0.1}', '{"x": 0.2}', False),
    ('{"x": null}', "{}", False),
    ('{"x": 9007199254740993}', '{"x": 9007199254740992}', False),  # equal as floats
    ('{"x": 123456789012345678901234567890}', '{"x": 123456789012345678901234567891}', False),
    ('{"x": true}', '{"x": 1}', False),
    ("[]", "{}", False),
]


@pytest.mark.parametrize(("first", "second", "same"), DEDUP_PAIRS)
def test_dedup_uses_canonical_json(
    make_scheduler: SchedulerFactory, first: str, second: str, same: bool
) -> None:
    scheduler = make_scheduler(max_concurrent=1)
    assert scheduler.submit("a", "read", first, True) == (["a"], None)
    started, duplicate_of = scheduler.submit("b", "read", second, True)
    if same:
        assert (started, duplicate_of) == ([], "a")
        assert scheduler.queued == []
    else:
        assert (started, duplicate_of) == ([], None)
        assert scheduler.queued == ["b"]


def test_bytes_and_str_inputs_dedup_alike(make_scheduler: SchedulerFactory) -> None:
    scheduler = make_scheduler()
    scheduler.submit("a", "read", b'{"path": "\xc3\xa9"}', True)
    assert scheduler.submit("b", "read", '{"path":"é"}', True) == ([], "a")


def test_dedup_is_per_tool(make_scheduler: SchedulerFactory) -> None:
    scheduler = make_scheduler()
    scheduler.submit("a", "read", '{"path": "x"}', True)
    assert scheduler.submit("b", "grep", '{"path": "x"}', True) == (["b"], None)


def test_dedup_exempt_tools_always_run(make_scheduler: SchedulerFactory) -> None:
    scheduler = make_scheduler(dedup_exempt=["shell"])
    assert scheduler.submit("a", "shell", '{"cmd": "date"}', False) == (["a"], None)
    assert scheduler.submit("b", "shell", '{"cmd":"date"}', False) == ([], None)
    assert scheduler.complete("a") == ["b"]
    # Other tools still dedup.
    scheduler.submit("c", "read", "{}", True)
    assert scheduler.submit("d", "read", "{ }", True) == ([], "c")


def test_dedup_holds_whatever_the_original_is_doing(make_scheduler: SchedulerFactory) -> None:
    scheduler = make_scheduler(max_concurrent=1)
    scheduler.submit("a", "read", '{"n": 1}', True)
    scheduler.submit("b", "read", '{"n": 2}', True)
    assert scheduler.submit("b2", "read", '{"n": 2.0}', True) == ([], "b")  # original queued
    assert scheduler.submit("a2", "read", '{"n": 1.0}', True) == ([], "a")  # original running
    assert scheduler.complete("a") == ["b"]
    assert scheduler.submit("a3", "read", '{"n": 1e0}', True) == ([], "a")  # original completed
    assert scheduler.submit("a4", "read", '{"n": 1}', True) == ([], "a")  # never a duplicate's id
    assert scheduler.queued == []
    assert scheduler.running == ["b"]


def test_abort_returns_queued_ids_and_closes(make_scheduler: SchedulerFactory) -> None:
    scheduler = make_scheduler(max_concurrent=1)
    scheduler.submit("a", "read", "1", True)
    scheduler.submit("b", "read", "2", True)
    scheduler.submit("w", "write", "3", False)
    scheduler.submit("c", "read", "4", True)
    assert not scheduler.closed
    assert scheduler.abort() == ["b", "w", "c"]
    assert scheduler.closed
    assert scheduler.queued == []
    assert scheduler.running == ["a"]
    with pytest.raises(InvalidState, match="cannot submit call 'd': the scheduler was aborted"):
        scheduler.submit("d", "read", "5", True)
    with pytest.raises(InvalidState, match="the scheduler was aborted"):
        scheduler.submit_many([("d", "read", "5", True)])
    assert scheduler.complete("a") == []  # still allowed; starts nothing
    assert scheduler.running == []
    assert scheduler.abort() == []


def test_submit_many_answers_like_submit(make_scheduler: SchedulerFactory) -> None:
    batch = [
        ("a", "read", "1", True),
        ("b", "read", "1.0", True),
        ("c", "shell", "2", True),
        ("d", "shell", "3", True),
        ("w", "write", "4", False),
        ("e", "read", "5", True),
    ]
    one_by_one = make_scheduler(max_concurrent=3, tool_limits={"shell": 1})
    expected = [one_by_one.submit(*call) for call in batch]
    batched = make_scheduler(max_concurrent=3, tool_limits={"shell": 1})
    assert batched.submit_many(batch) == expected
    assert expected == [(["a"], None), ([], "a"), (["c"], None), ([], None), ([], None), ([], None)]
    assert batched.queued == one_by_one.queued == ["d", "w", "e"]
    assert batched.submit_many([]) == []


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        ([("x", "read", "1", True), ("y", "read", "{", True)], InvalidInput, "call 'y'"),
        ([("x", "read", "1", True), ("x", "read", "2", True)], InvalidState, "call id 'x' was already"),
        ([("x", "read", "1", True), ("a", "read", "2", True)], InvalidState, "call id 'a' was already"),
    ],
)
def test_submit_many_is_all_or_nothing(
    make_scheduler: SchedulerFactory,
    batch: list[tuple[str, str, str, bool]],
    error: type[SchedulerError],
    message: str,
) -> None:
    scheduler = make_scheduler(max_concurrent=1)
    scheduler.submit("a", "read", "0", True)
    with pytest.raises(error, match=message):
        scheduler.submit_many(batch)
    assert scheduler.queued == []
    assert scheduler.submit("x", "read", "1", True) == ([], None)  # x was not registered


def started_a(scheduler: StepScheduler) -> None:
    scheduler.submit("a", "read", '{"n": 1}', True)


def a_queued_behind_b(scheduler: StepScheduler) -> None:
    scheduler.submit("b", "read", '{"n": 2}', True)
    scheduler.submit("a", "read", '{"n": 1}', True)


def a_completed(scheduler: StepScheduler) -> None:
    scheduler.submit("a", "read", '{"n": 1}', True)
    scheduler.complete("a")


def dup_of_a(scheduler: StepScheduler) -> None:
    scheduler.submit("a", "read", '{"n": 1}', True)
    scheduler.submit("dup", "read", '{"n":1.0}', True)


def a_aborted(scheduler: StepScheduler) -> None:
    scheduler.submit("b", "read", '{"n": 2}', True)
    scheduler.submit("a", "read", '{"n": 1}', True)
    scheduler.abort()


def aborted(scheduler: StepScheduler) -> None:
    scheduler.abort()


ERRORS = [
    (
        "complete an unknown id",
        started_a,
        lambda s: s.complete("nope"),
        UnknownCall,
        "unknown call id 'nope'",
    ),
    ("complete twice", a_completed, lambda s: s.complete("a"), InvalidState, "call 'a' already completed"),
    (
        "complete a queued call",
        a_queued_behind_b,
        lambda s: s.complete("a"),
        InvalidState,
        "call 'a' is queued, not running",
    ),
    (
        "complete a duplicate",
        dup_of_a,
        lambda s: s.complete("dup"),
        InvalidState,
        "call 'dup' is a duplicate of 'a' and never runs: complete 'a'",
    ),
    (
        "complete a call dropped by abort",
        a_aborted,
        lambda s: s.complete("a"),
        InvalidState,
        "call 'a' never started: the scheduler was aborted",
    ),
    (
        "submit an id twice",
        started_a,
        lambda s: s.submit("a", "grep", "{}", True),
        InvalidState,
        "call id 'a' was already submitted in this step",
    ),
    (
        "submit a duplicate's id again",
        dup_of_a,
        lambda s: s.submit("dup", "read", "{}", True),
        InvalidState,
        "call id 'dup' was already submitted",
    ),
    (
        "invalid JSON",
        started_a,
        lambda s: s.submit("b", "read", '{"path": }', True),
        InvalidInput,
        r"input of call 'b' \(tool 'read'\) is not valid JSON: .*line 1 column",
    ),
    (
        "invalid JSON on a later line",
        started_a,
        lambda s: s.submit("b", "read", '{\n  "path": "x",\n}', True),
        InvalidInput,
        r"line \d+ column \d+",
    ),
    ("empty input", started_a, lambda s: s.submit("b", "read", "", True), InvalidInput, "call 'b'"),
    ("NaN", started_a, lambda s: s.submit("b", "read", '{"x": NaN}', True), InvalidInput, "call 'b'"),
    (
        "lone surrogate",
        started_a,
        lambda s: s.submit("b", "read", '"\\ud800"', True),
        InvalidInput,
        "call 'b'",
    ),
    ("not UTF-8", started_a, lambda s: s.submit("b", "read", b'"\xff"', True), InvalidInput, "call 'b'"),
    (
        "exponent out of range",
        started_a,
        lambda s: s.submit("b", "read", "1e9223372036854775808", True),
        InvalidInput,
        "exponent out of range",
    ),
    (
        "too deeply nested",
        started_a,
        lambda s: s.submit("b", "read", "[" * 128 + "]" * 128, True),
        InvalidInput,
        "call 'b'",
    ),
    (
        "submit after abort",
        aborted,
        lambda s: s.submit("a", "read", "{}", True),
        InvalidState,
        "cannot submit call 'a': the scheduler was aborted",
    ),
]


@pytest.mark.parametrize(
    ("setup", "operation", "error", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors(
    make_scheduler: SchedulerFactory,
    setup: object,
    operation: object,
    error: type[SchedulerError],
    message: str,
) -> None:
    assert callable(setup) and callable(operation)
    scheduler = make_scheduler(max_concurrent=1)
    setup(scheduler)
    queued, running = scheduler.queued, scheduler.running
    with pytest.raises(error, match=message) as raised:
        operation(scheduler)
    assert type(raised.value) is error
    assert isinstance(raised.value, SchedulerError)
    # A refused operation changes nothing.
    assert (scheduler.queued, scheduler.running) == (queued, running)


def test_rust_reports_serde_line_and_column() -> None:
    with pytest.raises(InvalidInput, match="trailing comma at line 3 column 1"):
        Scheduler().submit("b", "read", '{\n  "path": "x",\n}', True)


def test_a_refused_submit_leaves_the_id_free(make_scheduler: SchedulerFactory) -> None:
    scheduler = make_scheduler()
    with pytest.raises(InvalidInput):
        scheduler.submit("a", "read", "{", True)
    assert scheduler.submit("a", "read", "{}", True) == (["a"], None)


def test_error_classes_fit_python_hierarchies() -> None:
    assert issubclass(UnknownCall, LookupError)
    assert issubclass(InvalidInput, ValueError)
    for cls in (UnknownCall, InvalidState, InvalidInput):
        assert issubclass(cls, SchedulerError)
    assert issubclass(SchedulerError, Exception)
    assert UnknownCall.__module__ == "dispatch._dispatcher"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrent": -1}, r"max_concurrent must be >= 0 \(0 means unlimited\), got -1"),
        (
            {"tool_limits": {"shell": -2}},
            r"the limit of tool 'shell' must be >= 0 \(0 means unlimited\), got -2",
        ),
    ],
)
def test_negative_limits_are_refused(
    make_scheduler: SchedulerFactory, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as raised:
        make_scheduler(**kwargs)  # type: ignore[arg-type]
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    "call",
    [
        lambda make: make(dedup_exempt="shell"),
        lambda make: make(max_concurrent=1.5),
        lambda make: make(tool_limits={"shell": "2"}),
        lambda make: make().submit("a", "read", {"x": 1}, True),
        lambda make: make().submit("a", "read", "{}", 1),
        lambda make: make().submit(1, "read", "{}", True),
        lambda make: make().complete(None),
    ],
)
def test_wrong_argument_types_raise_type_error(make_scheduler: SchedulerFactory, call: object) -> None:
    assert callable(call)
    with pytest.raises(TypeError):
        call(make_scheduler)


def test_tool_limits_accepts_any_mapping(make_scheduler: SchedulerFactory) -> None:
    from types import MappingProxyType

    scheduler = make_scheduler(tool_limits=MappingProxyType({"shell": 1}), dedup_exempt=iter(["shell"]))
    assert scheduler.submit("a", "shell", "{}", True) == (["a"], None)
    assert scheduler.submit("b", "shell", "{}", True) == ([], None)


def test_both_implementations_are_step_schedulers() -> None:
    schedulers: list[StepScheduler] = [Scheduler(), ReferenceScheduler()]
    assert [s.submit("a", "t", "{}", True) for s in schedulers] == [(["a"], None)] * 2
