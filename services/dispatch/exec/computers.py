"""Which backend serves a ``computer_id``: empty is this machine, anything else an SSH Host alias."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from dispatch.exec.backend import Backend
from dispatch.shared.errors import NotFound

LOCAL_ID = ""


@dataclass(frozen=True, slots=True)
class Computer:
    """A place tools run, as ``ListComputers`` shows it."""

    id: str
    host_name: str
    user: str = ""
    port: int = 0
    local: bool = False


class Computers:
    """Maps a ``computer_id`` to the ``Backend`` that runs on it.

    Only the local machine is known for now; the SSH backend will add one
    entry per Host alias of the SSH config, resolved here and nowhere else.
    """

    def __init__(self, local: Backend, host_name: str | None = None):
        self.local = local
        self.host_name = host_name if host_name is not None else socket.gethostname()

    def resolve(self, computer_id: str) -> Backend:
        """The backend for ``computer_id``; ``NotFound`` for an alias nobody configured."""
        if computer_id == LOCAL_ID:
            return self.local
        raise NotFound(f"unknown computer {computer_id!r}: no SSH host with that alias is configured")

    def list(self) -> list[Computer]:
        """The local machine first, then the configured hosts."""
        return [Computer(id=LOCAL_ID, host_name=self.host_name, local=True)]

    async def aclose(self) -> None:
        """Release every backend's resources (SSH connections, later)."""
        await self.local.aclose()
