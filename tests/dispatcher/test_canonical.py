"""Canonical JSON, the dedup key: the same bytes from Rust and from the reference."""

from __future__ import annotations

import pytest

from dispatch import dispatcher, dispatcher_ref
from dispatch.dispatcher import InvalidInput
from tests.dispatcher.conftest import CanonicalKey

CANONICAL = [
    ('{ "b": [1, 2], "a": {"y": null, "x": true} }', '{"a":{"x":true,"y":null},"b":[1,2]}'),
    ('{"a": 1, "a": 2}', '{"a":2}'),
    ('"\\u0041\\/\\ud83d\\ude00"', '"A/\U0001f600"'),
    ('"tab\\there\\u0001\\u001f\\u007f"', '"tab\\there\\u0001\\u001f\x7f"'),
    ('"quote\\" backslash\\\\ newline\\n"', '"quote\\" backslash\\\\ newline\\n"'),
    ('{"\\u00e9": 1, "e": 2, "z": 3}', '{"e":2,"z":3,"é":1}'),  # code point order
    ("1", "1"),
    ("1.0", "1"),
    ("1e0", "1"),
    ("10E-1", "1"),
    ("0.10", "1e-1"),
    ("-0", "0"),
    ("-0.0e-7", "0"),
    ("100", "1e2"),
    ("-12.50", "-125e-1"),
    ("1E+400", "1e400"),
    ("123456789012345678901234567890", "12345678901234567890123456789e1"),
    ("9007199254740993", "9007199254740993"),
    ("0e99999999999999999999999999999999999999999999999", "0"),
    ("1e-0000000000000000000000000000000000000000000000001", "1e-1"),
    ("1e9223372036854775807", "1e9223372036854775807"),
    ("0.1e-9223372036854775807", "1e-9223372036854775808"),
    (" [ ] ", "[]"),
    ("[" * 127 + "]" * 127, "[" * 127 + "]" * 127),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL)
def test_canonical_form(canonical_key: CanonicalKey, text: str, canonical: str) -> None:
    assert canonical_key(text) == canonical.encode()
    assert canonical_key(text.encode()) == canonical.encode()


INVALID = [
    "",
    " ",
    "{",
    "[1,]",
    '{"a" 1}',
    "01",
    "1.",
    ".5",
    "+1",
    "NaN",
    "-Infinity",
    "[] []",
    "'a'",
    '"\\ud800"',
    '"\\udc00"',
    '"\\x41"',
    '"raw\ncontrol"',
    "\ufeff{}",
    "1e9223372036854775808",
    "1e-9223372036854775809",
    "[1e1000000000000000000000000000000000000000]",
    "[" * 128 + "]" * 128,
    "[" * 5000 + "]" * 5000,
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_input(canonical_key: CanonicalKey, text: str) -> None:
    with pytest.raises(InvalidInput, match="input is not valid JSON"):
        canonical_key(text)


@pytest.mark.parametrize(
    "data", [b'"\xff"', b'"\xed\xa0\x80"', b"\xc0\xaf", "\ud800".encode("utf-8", "surrogatepass")]
)
def test_invalid_utf8(canonical_key: CanonicalKey, data: bytes) -> None:
    with pytest.raises(InvalidInput):
        canonical_key(data)


def test_raw_lone_surrogate_in_str(canonical_key: CanonicalKey) -> None:
    with pytest.raises(InvalidInput):
        canonical_key('"\ud800"')


def test_syntax_errors_name_line_and_column() -> None:
    with pytest.raises(InvalidInput, match="line 2 column 3"):
        dispatcher.canonical_key('{"a": 1,\n  }')
    # Python's json words (and, across versions, places) the error its own way.
    with pytest.raises(InvalidInput, match=r"line \d+ column \d+"):
        dispatcher_ref.canonical_key('{"a": 1,\n  }')
