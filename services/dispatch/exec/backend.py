"""What a computer can do for a tool, independent of how it is reached.

A ``Backend`` runs processes and touches files on one computer: this machine
(``LocalBackend``) or, later, an SSH host. Both answer with the plain values
below and raise the domain errors of ``dispatch.shared.errors``; the servicer
turns those into protobuf and gRPC status.
"""

from __future__ import annotations

import abc
import enum
import errno
import posixpath
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from dispatch.shared.errors import DispatchError, FailedPrecondition, InvalidArgument, NotFound

# Shell conventions, so a caller reads a spawn failure like a shell's answer.
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


class Stream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: Stream
    data: bytes


@dataclass(frozen=True, slots=True)
class OutputBatch:
    """Output that arrived together; it travels as one message."""

    chunks: tuple[OutputChunk, ...]


@dataclass(frozen=True, slots=True)
class Exit:
    """How a spawned process ended. Exactly one of ``exit_code`` and ``signal`` is set."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    truncated: bool
    duration: float  # seconds


SpawnEvent = OutputBatch | Exit


class FileType(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str
    path: str
    type: FileType
    size: int
    mode: int  # permission bits only
    modified_ns: int
    symlink_target: str = ""


@dataclass(frozen=True, slots=True)
class FileData:
    data: bytes
    size: int  # of the whole file
    truncated: bool  # the file continues past ``data``


class Backend(abc.ABC):
    """The primitives of one computer. Paths are absolute POSIX paths on that computer."""

    @abc.abstractmethod
    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str = "",
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        timeout: float = 0.0,
        max_output_bytes: int = 0,
    ) -> AsyncGenerator[SpawnEvent, None]:
        """Run ``argv`` in its own process group: yield ``OutputBatch`` values as output
        arrives, then exactly one ``Exit``.

        ``cwd`` empty means the backend's default directory; ``env`` is added to the
        backend's environment; ``timeout`` zero means none; ``max_output_bytes`` zero
        means the backend's cap. Closing the generator early (or cancelling the task
        that iterates it) kills the whole process group. A missing executable is an
        ``Exit`` with code 127, not an error; a missing ``cwd`` raises ``NotFound``.
        """

    @abc.abstractmethod
    async def read_file(self, path: str, offset: int = 0, limit: int = 0) -> FileData:
        """Up to ``limit`` bytes from ``offset`` (``limit`` zero or past the cap: the cap)."""

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes, mode: int = 0) -> int:
        """Replace ``path`` atomically with ``data``, creating parent directories.

        ``mode`` (zero: 0o644) applies to a new file; an existing file keeps its mode.
        Answers the number of bytes written.
        """

    @abc.abstractmethod
    async def stat(self, path: str) -> FileInfo:
        """Describe ``path`` itself; a symlink is reported, not followed."""

    @abc.abstractmethod
    async def list_dir(self, path: str) -> list[FileInfo]:
        """The entries of a directory, sorted by name, symlinks not followed."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook; local has nothing to release
        """Release what the backend holds (connections); the default holds nothing."""


# ----------------------------------------------------------------- shared checks


def require_absolute(path: str, what: str = "path") -> str:
    """``path`` if it is absolute; ``InvalidArgument`` naming ``what`` otherwise."""
    if not path:
        raise InvalidArgument(f"{what} is required and must be absolute")
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    if not posixpath.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be absolute")
    return path


def check_spawn_args(
    argv: Sequence[str], env: Mapping[str, str], timeout: float, max_output_bytes: int
) -> None:
    """Reject what no backend can run, before anything is started."""
    if not argv or not argv[0]:
        raise InvalidArgument("argv must name a program: it is empty")
    if any("\0" in arg for arg in argv):
        raise InvalidArgument("argv must not contain NUL bytes")
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise InvalidArgument(f"env name {key!r} is not valid: it must be non-empty, without '=' or NUL")
        if "\0" in value:
            raise InvalidArgument(f"env value of {key!r} contains a NUL byte")
    if timeout < 0:
        raise InvalidArgument(f"timeout must not be negative, got {timeout}s")
    if max_output_bytes < 0:
        raise InvalidArgument(f"max_output_bytes must not be negative, got {max_output_bytes}")


def truncation_marker(limit: int) -> bytes:
    """The stderr line appended when output past ``limit`` bytes was dropped."""
    return f"\n[dispatch: output truncated after {limit} bytes]\n".encode()


def os_error(exc: OSError, path: str, what: str = "") -> DispatchError:
    """An ``OSError`` about ``path`` as the domain error a caller can act on."""
    subject = f"{what} {path}" if what else path
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{subject}: no such file or directory")
    if isinstance(exc, IsADirectoryError):
        return FailedPrecondition(f"{subject} is a directory")
    if isinstance(exc, NotADirectoryError):
        return FailedPrecondition(f"{subject}: not a directory (a component of the path is a file)")
    if isinstance(exc, PermissionError):
        return FailedPrecondition(f"{subject}: permission denied")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidArgument(f"{subject}: file name too long")
    return FailedPrecondition(f"{subject}: {exc.strerror or exc}")
