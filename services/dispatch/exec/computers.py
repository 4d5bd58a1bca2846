"""Which backend serves a ``computer_id``: empty is this machine, anything else an SSH Host alias."""

from __future__ import annotations

import fnmatch
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from dispatch.exec.backend import Backend
from dispatch.exec.ssh import SSHBackend
from dispatch.shared.config import ExecConfig
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
    """Maps a ``computer_id`` to the ``Backend`` that runs on it: the local machine, or
    one ``SSHBackend`` (created on first use, then kept) per Host alias of the ssh_config.
    """

    def __init__(
        self,
        local: Backend,
        host_name: str | None = None,
        cfg: ExecConfig | None = None,
    ):
        self.local = local
        self.host_name = host_name if host_name is not None else socket.gethostname()
        self.cfg = cfg or ExecConfig()
        self.hosts = read_ssh_hosts(self.cfg.ssh_config) if self.cfg.ssh_config else []
        self._aliases = {host.id for host in self.hosts}
        self._remote: dict[str, SSHBackend] = {}

    def resolve(self, computer_id: str) -> Backend:
        """The backend for ``computer_id``; ``NotFound`` for an alias nobody configured."""
        if computer_id == LOCAL_ID:
            return self.local
        if computer_id not in self._aliases:
            raise NotFound(f"unknown computer {computer_id!r}: no SSH host with that alias is configured")
        backend = self._remote.get(computer_id)
        if backend is None:
            backend = self._remote[computer_id] = SSHBackend(computer_id, self.cfg, self.cfg.ssh_config)
        return backend

    def list(self) -> list[Computer]:
        """The local machine first, then the configured hosts."""
        return [Computer(id=LOCAL_ID, host_name=self.host_name, local=True), *self.hosts]

    async def aclose(self) -> None:
        """Release every backend's resources (SSH connections)."""
        remote, self._remote = list(self._remote.values()), {}
        for backend in remote:
            await backend.aclose()
        await self.local.aclose()


def _wildcard(pattern: str) -> bool:
    return any(c in pattern for c in "*?!")


def _matches(patterns: list[str], alias: str) -> bool:
    """ssh_config Host matching: a negated match excludes, otherwise any match includes."""
    matched = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if fnmatch.fnmatchcase(alias, pattern[1:]):
                return False
        elif fnmatch.fnmatchcase(alias, pattern):
            matched = True
    return matched


def read_ssh_hosts(path: str) -> list[Computer]:
    """The Host aliases of ``path`` (wildcard patterns skipped), in file order, each with the
    HostName, User and Port that apply to it (first value wins, as in ssh). ``Match`` blocks and
    ``Include`` are not followed."""
    blocks: list[tuple[list[str] | None, dict[str, str]]] = [(["*"], {})]
    for raw in Path(path).read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.replace("=", " ", 1).partition(" ")
        key = key.lower()
        value = value.strip()
        if key == "host":
            blocks.append((shlex.split(value), {}))
        elif key == "match":
            blocks.append((None, {}))
        elif key in ("hostname", "user", "port"):
            blocks[-1][1].setdefault(key, value.strip('"'))
    aliases: list[str] = []
    for patterns, _ in blocks[1:]:
        for pattern in patterns or []:
            if not _wildcard(pattern) and pattern not in aliases:
                aliases.append(pattern)
    hosts = []
    for alias in aliases:
        options: dict[str, str] = {}
        for patterns, values in blocks:
            if patterns is not None and _matches(patterns, alias):
                for key, value in values.items():
                    options.setdefault(key, value)
        port = options.get("port", "")
        hosts.append(
            Computer(
                id=alias,
                host_name=options.get("hostname", alias).replace("%h", alias),
                user=options.get("user", ""),
                port=int(port) if port.isdigit() else 0,
            )
        )
    return hosts
