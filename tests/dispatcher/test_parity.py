"""Parity: the Rust scheduler and the Python reference give the same answers.

Hypothesis drives both with the same random operation sequences and demands
identical return values, exception classes (and messages, except the JSON
parsers' own wording) and queued/running views after every step. Inputs come
from a small pool of JSON values, each rendered anew every time (keys
shuffled, whitespace, number and string respellings), so duplicates are
common; a few are invalid."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeAlias

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch import dispatcher, dispatcher_ref
from dispatch.dispatcher import InvalidInput, SchedulerError, StepScheduler


@dataclass(frozen=True)
class Num:
    """The JSON number mantissa * 10**exponent."""

    mantissa: int
    exponent: int


Model: TypeAlias = "bool | Num | str | list[Model] | dict[str, Model] | None"

TOOLS = ("read", "shell", "edit", "grep")

numbers = st.builds(
    Num,
    st.one_of(st.integers(-20, 20), st.integers(-(10**25), 10**25)),
    st.integers(-30, 30),
)
strings = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)
models: st.SearchStrategy[Model] = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(strings, children, max_size=4),
    max_leaves=10,
)

INVALID_INPUTS = [
    "",
    "{",
    '{"a": 1,}',
    "[1 2]",
    "NaN",
    '"\\ud800"',
    "1e9223372036854775808",
    "[" * 128 + "]" * 128,
    "\ufeff{}",
]


def render_number(num: Num, rng: random.Random) -> str:
    m, e = num.mantissa, num.exponent
    if m == 0:
        return rng.choice(["0", "-0", "0.0", "0e5", "-0.000E-3", "0E+0"])
    sign = "-" if m < 0 else ""
    pad = rng.randrange(3)
    digits = str(abs(m)) + "0" * pad
    e -= pad
    style = rng.randrange(4)
    if style == 0:
        return f"{sign}{digits}e{e}"
    if style == 1:
        return f"{sign}{digits}E{'+' if e >= 0 else ''}{e}"
    if style == 2 and 0 <= e < 30:
        return sign + digits + "0" * e
    point = len(digits) + e  # value = 0.<digits> * 10**point
    if point <= 0:
        body = "0." + "0" * -point + digits
    elif point >= len(digits):
        body = digits + "0" * (point - len(digits)) + ".0"
    else:
        body = digits[:point] + "." + digits[point:]
    return sign + body + rng.choice(["", "", "e0", "E-0", "e+00"])


SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def render_string(text: str, rng: random.Random) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        must_escape = char in '"\\' or code < 0x20
        choice = rng.randrange(4)
        if not must_escape and choice < 2:
            out.append(char)
        elif char in SHORT_ESCAPES and choice < 3:
            out.append(SHORT_ESCAPES[char])
        elif code < 0x10000:
            out.append(f"\\u{code:04x}" if choice % 2 else f"\\u{code:04X}")
        else:
            high, low = divmod(code - 0x10000, 0x400)
            out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}")
    out.append('"')
    return "".join(out)


def render(model: Model, rng: random.Random) -> str:
    def ws() -> str:
        return rng.choice(["", "", "", " ", "\n", "\t ", "\r\n  "])

    if model is None:
        text = "null"
    elif model is True:
        text = "true"
    elif model is False:
        text = "false"
    elif isinstance(model, Num):
        text = render_number(model, rng)
    elif isinstance(model, str):
        text = render_string(model, rng)
    elif isinstance(model, list):
        text = "[" + ",".join(ws() + render(item, rng) + ws() for item in model) + "]"
    else:
        items = list(model.items())
        rng.shuffle(items)
        members = (ws() + render_string(k, rng) + ws() + ":" + ws() + render(v, rng) + ws() for k, v in items)
        text = "{" + ",".join(members) + ws() + "}"
    return ws() + text + ws()


def value_key(model: Model) -> object:
    """An independent oracle: equal keys iff the values are the same JSON value."""
    if isinstance(model, bool) or model is None:
        return ("literal", model)
    if isinstance(model, Num):
        return ("number", Fraction(model.mantissa) * Fraction(10) ** model.exponent)
    if isinstance(model, str):
        return ("string", model)
    if isinstance(model, list):
        return ("array", tuple(value_key(item) for item in model))
    return ("object", tuple(sorted((k, value_key(v)) for k, v in model.items())))


Outcome = tuple[object, ...]


def outcome(operation: Callable[[], object]) -> Outcome:
    try:
        return ("ok", operation())
    except SchedulerError as err:
        message = str(err)
        if isinstance(err, InvalidInput):
            # The JSON parsers word their errors differently; the rest must match.
            message = message.partition(" is not valid JSON")[0]
        return ("error", type(err), message)


def canonical_outcome(canonical: Callable[[str | bytes], bytes], text: str | bytes) -> Outcome:
    try:
        return ("ok", canonical(text))
    except InvalidInput:
        return ("invalid",)


# --- scheduler parity ------------------------------------------------------


@st.composite
def configs(draw: st.DrawFn) -> dict[str, object]:
    return {
        "max_concurrent": draw(st.integers(0, 3)),
        "tool_limits": draw(st.dictionaries(st.sampled_from(TOOLS), st.integers(0, 2), max_size=3)),
        "dedup_exempt": draw(st.lists(st.sampled_from(TOOLS), max_size=2, unique=True)),
    }


class Driver:
    """Applies each operation to both schedulers and checks they agree."""

    def __init__(self, data: st.DataObject, config: dict[str, object]) -> None:
        self.data = data
        self.rust: StepScheduler = dispatcher.Scheduler(**config)  # type: ignore[arg-type]
        self.reference: StepScheduler = dispatcher_ref.ReferenceScheduler(**config)  # type: ignore[arg-type]
        self.pool = data.draw(st.lists(models, min_size=1, max_size=3), label="input pool")
        self.rng = data.draw(st.randoms(use_true_random=False), label="renderer")
        self.submitted: list[str] = []
        self.next_id = 0

    def new_id(self) -> str:
        self.next_id += 1
        prefix = self.data.draw(st.sampled_from(["c", "é", "call-", "🔧"]), label="id prefix")
        return f"{prefix}{self.next_id}"

    def new_call(self, id: str) -> tuple[str, str, str | bytes, bool]:
        draw = self.data.draw
        tool = draw(st.sampled_from(TOOLS), label="tool")
        if draw(st.integers(0, 9), label="input kind") == 0:
            text = draw(st.sampled_from(INVALID_INPUTS), label="invalid input")
        else:
            text = render(draw(st.sampled_from(self.pool), label="input"), self.rng)
        input_json: str | bytes = text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text
        safe = draw(st.integers(0, 4), label="safety") > 0
        return id, tool, input_json, safe

    def check(self, name: str, op: Callable[[StepScheduler], object]) -> None:
        got = outcome(lambda: op(self.rust))
        want = outcome(lambda: op(self.reference))
        assert got == want, name
        assert self.rust.queued == self.reference.queued, name
        assert self.rust.running == self.reference.running, name
        assert self.rust.closed == self.reference.closed, name

    def complete(self, id: str) -> None:
        self.check(f"complete {id}", lambda s: s.complete(id))

    def step(self) -> None:
        draw = self.data.draw
        kind = draw(
            st.sampled_from(
                ["submit"] * 6
                + ["complete running"] * 5
                + ["complete other", "resubmit", "submit many", "abort"]
            ),
            label="operation",
        )
        if kind == "submit":
            call = self.new_call(self.new_id())
            self.submitted.append(call[0])
            self.check(f"submit {call}", lambda s: s.submit(*call))
        elif kind == "complete running" and self.reference.running:
            self.complete(draw(st.sampled_from(self.reference.running), label="running id"))
        elif kind == "complete other":
            self.complete(draw(st.sampled_from([*self.submitted, "unknown"]), label="other id"))
        elif kind == "resubmit" and self.submitted:
            call = self.new_call(draw(st.sampled_from(self.submitted), label="reused id"))
            self.check(f"resubmit {call}", lambda s: s.submit(*call))
        elif kind == "submit many":
            ids = [self.new_id() for _ in range(draw(st.integers(0, 4), label="batch size"))]
            if ids and self.submitted and draw(st.integers(0, 4)) == 0:
                ids[-1] = draw(st.sampled_from([*self.submitted, ids[0]]), label="reused id in batch")
            batch = [self.new_call(id) for id in ids]
            self.submitted.extend(ids)
            self.check(f"submit_many {batch}", lambda s: s.submit_many(batch))
        elif kind == "abort" and draw(st.integers(0, 2)) == 0:
            self.check("abort", lambda s: s.abort())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), config=configs())
def test_rust_and_reference_agree_on_every_step(data: st.DataObject, config: dict[str, object]) -> None:
    driver = Driver(data, config)
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        driver.step()
    # Drain: completing every running call, in any order, ends with an empty queue
    # (unless aborted, which emptied it already).
    while driver.reference.running:
        driver.complete(driver.reference.running[0])
    assert driver.rust.queued == driver.reference.queued == []


# --- canonical JSON parity ---------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(a=models, b=models, same=st.booleans(), rng=st.randoms(use_true_random=False))
def test_canonical_equality_matches_the_reference_and_the_value(
    a: Model, b: Model, same: bool, rng: random.Random
) -> None:
    if same:
        b = a
    text_a, text_b = render(a, rng), render(b, rng)
    rust_a = canonical_outcome(dispatcher.canonical_key, text_a)
    rust_b = canonical_outcome(dispatcher.canonical_key, text_b)
    assert rust_a == canonical_outcome(dispatcher_ref.canonical_key, text_a)
    assert rust_b == canonical_outcome(dispatcher_ref.canonical_key, text_b)
    assert rust_a[0] == "ok", text_a
    assert (rust_a == rust_b) == (value_key(a) == value_key(b)), (text_a, text_b)


JSONISH = st.text(
    st.sampled_from([*'{}[]":,.-+eE0123456789 \n\t\\/ubfnrtalsdDF8', "\x00", "é", "\ud800", "\U0001f600"]),
    max_size=24,
)


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(JSONISH, st.text(max_size=12), st.binary(max_size=12)))
def test_canonical_accepts_and_refuses_the_same_inputs(text: str | bytes) -> None:
    assert canonical_outcome(dispatcher.canonical_key, text) == canonical_outcome(
        dispatcher_ref.canonical_key, text
    )
