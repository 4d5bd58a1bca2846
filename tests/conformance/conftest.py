"""One conformance stack for the whole session: every runner drives the same one."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.stack import ConformanceStack


@pytest.fixture(scope="session")
def conformance_stack() -> Iterator[ConformanceStack]:
    stack = ConformanceStack(Path(tempfile.mkdtemp(prefix="dispatch-conformance-"))).start()
    try:
        yield stack
    finally:
        stack.stop()
