"""Shared fixtures."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.postgres import PostgresServer
from tests.sshd import SshServer, login_user


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server, started once per test session."""
    # Not under pytest's tmp root: that is private to this user, and the
    # server may run as the `postgres` user.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="dispatch-pg-"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server."""
    with postgres_server.database() as url:
        yield url


@pytest.fixture(scope="session")
def sshd() -> Iterator[SshServer]:
    """A real OpenSSH server on loopback, reachable as the Host alias in ``sshd.config``; as
    root it logs in as a dedicated user whose start-up files print (``tests.sshd``)."""
    user, startup = login_user()
    server = SshServer(user=user, startup=startup).start()
    try:
        yield server
    finally:
        server.stop()
