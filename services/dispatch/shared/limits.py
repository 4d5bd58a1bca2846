"""Limits that more than one service enforces, kept in one place."""

from __future__ import annotations

# Characters of text in one user message (the transport checks it first; the kernel again).
MAX_MESSAGE_CHARS = 1_000_000
