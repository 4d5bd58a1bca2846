"""Identifiers: sortable, prefixed, and checked at the boundary."""

from __future__ import annotations

import os
import re
import time

from dispatch.shared.errors import InvalidArgument

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_ID_RE = re.compile(r"^[a-z]{2,5}_[0-9a-hjkmnp-tv-z]{26}$")


def new_id(prefix: str) -> str:
    """A ULID-style id: 48 bits of milliseconds then 80 random bits, base32, with a prefix.

    Ids sort by creation time, which keeps list pagination and logs readable.
    """
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def is_valid_id(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and _ID_RE.match(value) is not None


def require_id(value: str, field: str, prefix: str) -> str:
    """``value`` if it is an id with ``prefix``; else ``InvalidArgument`` naming ``field``."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not is_valid_id(value, prefix):
        raise InvalidArgument(
            f"{field} {value[:80]!r} is malformed: expected {prefix}_ and 26 base32 characters"
        )
    return value


def step_id(turn_id: str, step_index: int) -> str:
    """``<turn_id>#<step_index>``: groups a step's parallel tool calls, live and in history."""
    return f"{turn_id}#{step_index}"
