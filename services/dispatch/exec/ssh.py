"""The SSH backend: processes and files on a host reached through an ssh_config Host alias.

One connection per host, opened on first use and reused by every call (processes
on exec channels, files over one SFTP client); a dropped connection is opened
again by the next call. A spawn runs in the session's own process group (sshd
starts each session with ``setsid``), whose id the remote shell reports on the
first stderr line behind a per-spawn marker; that line never reaches the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import secrets
import shlex
import signal
import stat
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping, Sequence

import asyncssh

from dispatch.exec.backend import (
    Backend,
    Exit,
    FileData,
    FileInfo,
    FileType,
    OutputBatch,
    OutputChunk,
    SpawnEvent,
    Stream,
    check_spawn_args,
    require_absolute,
    truncation_marker,
)
from dispatch.shared.config import ExecConfig
from dispatch.shared.errors import DispatchError, FailedPrecondition, InvalidArgument, NotFound, Unavailable

# Channels open at once on one connection; sshd's MaxSessions defaults to 10.
MAX_CHANNELS = 10
CONNECT_SECONDS = 15.0
# After the main process exits, its output may stay open only this long (a
# background grandchild holding it would otherwise hold the answer hostage).
DRAIN_SECONDS = 0.1
# How long a kill (its own exec channel) may take.
KILL_SECONDS = 5.0
# How long to wait for the remote shell to report its process group.
PGID_SECONDS = 5.0
COALESCE_SECONDS = 0.002
# Output queued for the caller past this many bytes pauses reading the channel (the
# SSH window then fills and the remote process blocks on its pipe, as it would
# locally); reading resumes once the caller has taken the queue below LOW_WATER.
HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10
# Where sftp-server lives on common systems, for a host without the sftp subsystem.
SFTP_SERVER_COMMAND = (
    "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server"
    ' /usr/lib/sftp-server; do [ -x "$p" ] && exec "$p"; done; echo sftp-server not found >&2; exit 127'
)

_Item = tuple[Stream, bytes] | None


class SSHBackend(Backend):
    """Runs processes and touches files on the host ``alias`` names in ``ssh_config``."""

    def __init__(self, alias: str, cfg: ExecConfig, ssh_config: str = ""):
        self.alias = alias
        self.ssh_config = ssh_config
        self.max_output_bytes = cfg.max_output_bytes
        self.max_read_bytes = cfg.max_read_bytes
        self.channels = asyncio.Semaphore(MAX_CHANNELS)
        self.connections_opened = 0
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- connection

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The pooled connection, opened (again) if there is none or it closed."""
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            self._conn = None
            self._sftp = None
            try:
                async with asyncio.timeout(CONNECT_SECONDS):
                    conn = await asyncssh.connect(
                        self.alias, config=[self.ssh_config] if self.ssh_config else (), keepalive_interval=30
                    )
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                raise Unavailable(
                    f"cannot connect to SSH host {self.alias!r}: {exc or type(exc).__name__}"
                ) from None
            self.connections_opened += 1
            self._conn = conn
            return conn

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        conn = await self.connection()
        async with self._lock:
            if self._sftp is None or self._conn is not conn:
                try:
                    self._sftp = await _start_sftp(conn)
                except (OSError, asyncssh.Error) as exc:
                    raise self._lost(conn, exc) from None
            return self._sftp

    def _lost(self, conn: asyncssh.SSHClientConnection, exc: BaseException) -> Unavailable:
        """Forget ``conn`` (the next call reconnects) and say what happened."""
        if self._conn is conn:
            self._conn = None
            self._sftp = None
        conn.close()
        return Unavailable(f"lost the connection to SSH host {self.alias!r}: {exc or type(exc).__name__}")

    def _drop(self, exc: BaseException) -> Unavailable:
        """Like ``_lost``, for the current connection, whichever it is (none: nothing to close)."""
        conn = self._conn
        if conn is None:
            return Unavailable(f"lost the connection to SSH host {self.alias!r}: {exc or type(exc).__name__}")
        return self._lost(conn, exc)

    async def aclose(self) -> None:
        """Close the connection; running spawns end."""
        conn, self._conn, self._sftp = self._conn, None, None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    # ------------------------------------------------------------------ spawn

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str = "",
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        timeout: float = 0.0,  # noqa: ASYNC109 - the process's deadline (kills it, reports timed_out)
        max_output_bytes: int = 0,
    ) -> AsyncGenerator[SpawnEvent, None]:
        """See ``Backend.spawn``; without a cwd the process starts in the login directory."""
        env = env or {}
        check_spawn_args(argv, env, timeout, max_output_bytes)
        if cwd:
            require_absolute(cwd, "cwd")
            await self._check_workdir(cwd)
        limit = max_output_bytes or self.max_output_bytes
        marker = f"__DISPATCH_PGID_{secrets.token_hex(8)}__"
        conn = await self.connection()
        started = time.monotonic()
        async with self.channels:
            session = _Session(marker)
            try:
                chan, _ = await conn.create_session(
                    lambda: session, _command(marker, argv, cwd, env), encoding=None
                )
            except asyncssh.ChannelOpenError as exc:
                raise Unavailable(f"SSH host {self.alias!r} refused a channel: {exc.reason}") from None
            except (OSError, asyncssh.Error) as exc:
                raise self._lost(conn, exc) from None
            killed = False
            try:
                if stdin:
                    chan.write(stdin)
                chan.write_eof()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout if timeout else None
                emitted = 0
                truncated = False
                timed_out = False
                drained = False
                while True:
                    wait_until = deadline
                    if session.exited_at is not None:
                        # Counted from the last output too: a paused channel may still hold some.
                        drain = max(session.exited_at, session.last_output_at) + DRAIN_SECONDS
                        wait_until = drain if deadline is None else min(deadline, drain)
                    try:
                        async with asyncio.timeout_at(wait_until):
                            item = await session.queue.get()
                    except TimeoutError:
                        timed_out = session.exited_at is None
                        drained = not timed_out
                        break
                    if item is None:
                        break
                    items: list[_Item] = [item]
                    if item[1] and session.queue.empty():
                        await asyncio.sleep(COALESCE_SECONDS)
                    while not session.queue.empty():
                        items.append(session.queue.get_nowait())
                    session.took(sum(len(it[1]) for it in items if it is not None))
                    chunks: list[OutputChunk] = []
                    done = False
                    for it in items:
                        if it is None:
                            done = True
                            continue
                        stream, data = it
                        room = limit - emitted
                        if len(data) > room:
                            truncated = True
                            data = data[: max(room, 0)]
                        if not data:
                            continue
                        emitted += len(data)
                        if chunks and chunks[-1].stream is stream:
                            chunks[-1] = OutputChunk(stream, chunks[-1].data + data)
                        else:
                            chunks.append(OutputChunk(stream, data))
                    if chunks:
                        yield OutputBatch(tuple(chunks))
                    if done:
                        break
                if timed_out or drained:
                    killed = True
                    await self._kill(conn, session, chan)
                if truncated:
                    yield OutputBatch((OutputChunk(Stream.STDERR, truncation_marker(limit)),))
                duration = time.monotonic() - started
                if timed_out:
                    yield Exit(None, int(signal.SIGKILL), True, truncated, duration)
                    return
                if session.exit_signal is not None:
                    yield Exit(None, session.exit_signal, False, truncated, duration)
                elif session.exit_status is not None:
                    yield Exit(session.exit_status, None, False, truncated, duration)
                else:
                    raise self._lost(
                        conn, session.error or ConnectionError("the channel closed without an exit status")
                    )
            finally:
                if not killed and session.exited_at is None and not session.closed:
                    # The caller went away: the group dies, whatever happens to this task.
                    task = self._background(self._kill(conn, session, chan))
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.shield(task)
                else:
                    chan.close()
                    if not killed and session.pgid is not None:
                        # Background jobs that let go of the output outlive the exit in the
                        # group, as they would locally until the group is killed: kill it
                        # too, without holding up the answer.
                        self._background(self._kill_leftovers(conn, session.pgid))

    def _background(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        """Run ``coro`` to the end even if its caller goes away; ``aclose`` waits for it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _kill_leftovers(self, conn: asyncssh.SSHClientConnection, pgid: int) -> None:
        """SIGKILL what is left of an exited spawn's process group (usually nothing)."""
        async with self.channels:
            if conn.is_closed():
                return
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                async with asyncio.timeout(KILL_SECONDS):
                    await conn.run(f"kill -9 -{pgid} 2>/dev/null", check=False)

    async def _kill(
        self, conn: asyncssh.SSHClientConnection, session: _Session, chan: asyncssh.SSHClientChannel[bytes]
    ) -> None:
        """SIGKILL the spawn's process group through a channel of its own, then close its channel."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PGID_SECONDS):
                    await session.pgid_known.wait()
            if session.pgid is not None and not conn.is_closed():
                with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                    async with asyncio.timeout(KILL_SECONDS):
                        await conn.run(f"kill -9 -{session.pgid} 2>/dev/null", check=False)
        finally:
            chan.close()

    async def _check_workdir(self, path: str) -> None:
        sftp = await self._sftp_client()
        try:
            attrs = await sftp.stat(path)
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, path, "cwd") from None
        except (OSError, asyncssh.Error) as exc:
            raise self._drop(exc) from None
        if not stat.S_ISDIR(attrs.permissions or 0):
            raise FailedPrecondition(f"cwd {path} is not a directory")

    # ------------------------------------------------------------------ files

    async def _files(self, path: str) -> asyncssh.SFTPClient:
        require_absolute(path)
        return await self._sftp_client()

    async def read_file(self, path: str, offset: int = 0, limit: int = 0) -> FileData:
        """See ``Backend.read_file``; the cap is ``ExecConfig.max_read_bytes``."""
        require_absolute(path)
        if offset < 0:
            raise InvalidArgument(f"offset must not be negative, got {offset}")
        if limit < 0:
            raise InvalidArgument(f"limit must not be negative, got {limit}")
        count = min(limit, self.max_read_bytes) if limit else self.max_read_bytes
        sftp = await self._files(path)
        try:
            attrs = await sftp.stat(path)
            mode = attrs.permissions or 0
            if stat.S_ISDIR(mode):
                raise FailedPrecondition(f"{path} is a directory")
            if not stat.S_ISREG(mode):
                raise FailedPrecondition(f"{path} is not a regular file")
            async with sftp.open(path, "rb") as f:
                got = await f.read(count, offset) if count else b""
            data = got if isinstance(got, bytes) else got.encode()
        except DispatchError:
            raise
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, path) from None
        except (OSError, asyncssh.Error) as exc:
            raise self._drop(exc) from None
        size = attrs.size or 0
        return FileData(data=data, size=size, truncated=offset + len(data) < size)

    async def write_file(self, path: str, data: bytes, mode: int = 0) -> int:
        """See ``Backend.write_file``: a temporary file beside the target, then ``posix_rename``."""
        require_absolute(path)
        if mode > 0o7777 or mode < 0:
            raise InvalidArgument(f"mode {mode:#o} is not a permission mode (at most 0o7777)")
        mode = mode or 0o644
        sftp = await self._files(path)
        try:
            target = path
            with contextlib.suppress(asyncssh.SFTPError):
                # Write through a symlink, like a shell's ``>``.
                if stat.S_ISLNK((await sftp.lstat(path)).permissions or 0):
                    target = await sftp.realpath(path)
            parent, name = posixpath.split(target)
            try:
                await sftp.makedirs(parent, exist_ok=True)
            except asyncssh.SFTPError as exc:
                raise _sftp_error(exc, parent, "parent directory") from None
            try:
                attrs = await sftp.stat(target)
            except asyncssh.SFTPNoSuchFile:
                pass
            else:
                existing = attrs.permissions or 0
                if stat.S_ISDIR(existing):
                    raise FailedPrecondition(f"{path} is a directory")
                if not stat.S_ISREG(existing):
                    raise FailedPrecondition(f"{path} is not a regular file; refusing to replace it")
                mode = stat.S_IMODE(existing)
            tmp = posixpath.join(parent, f".{name}.{secrets.token_hex(6)}.dispatch-tmp")
            try:
                async with sftp.open(tmp, "wb", asyncssh.SFTPAttrs(permissions=0o600)) as f:
                    await f.write(data)
                await sftp.chmod(tmp, mode)
                await sftp.posix_rename(tmp, target)
            except BaseException:
                with contextlib.suppress(Exception):
                    await sftp.remove(tmp)
                raise
        except DispatchError:
            raise
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, path) from None
        except (OSError, asyncssh.Error) as exc:
            raise self._drop(exc) from None
        return len(data)

    async def stat(self, path: str) -> FileInfo:
        """See ``Backend.stat``."""
        sftp = await self._files(path)
        try:
            attrs = await sftp.lstat(path)
            return await _info(sftp, path, posixpath.basename(path.rstrip("/")) or "/", attrs)
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, path) from None
        except (OSError, asyncssh.Error) as exc:
            raise self._drop(exc) from None

    async def list_dir(self, path: str) -> list[FileInfo]:
        """See ``Backend.list_dir``."""
        sftp = await self._files(path)
        try:
            attrs = await sftp.stat(path)
            if not stat.S_ISDIR(attrs.permissions or 0):
                raise FailedPrecondition(f"{path}: not a directory")
            names = await sftp.readdir(path)
            infos = []
            for entry in names:
                name = str(entry.filename)
                if name in (".", ".."):
                    continue
                full = posixpath.join(path, name)
                infos.append(await _info(sftp, full, name, entry.attrs))
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, path) from None
        except (OSError, asyncssh.Error) as exc:
            raise self._drop(exc) from None
        infos.sort(key=lambda info: info.name)
        return infos


class _Session(asyncssh.SSHClientSession[bytes]):
    """One exec channel: output into a queue, the first stderr line parsed for the group id."""

    def __init__(self, marker: str):
        self.marker = marker.encode()
        # Unbounded, but reading pauses while it holds more than HIGH_WATER bytes.
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.queued_bytes = 0
        self.paused = False
        self.last_output_at = 0.0
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.pgid: int | None = None
        self.pgid_known = asyncio.Event()
        self.head = b""  # stderr before the marker line is complete
        self.exit_status: int | None = None
        self.exit_signal: int | None = None
        self.exited_at: float | None = None
        self.closed = False
        self.error: Exception | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def _put(self, stream: Stream, data: bytes) -> None:
        self.queue.put_nowait((stream, data))
        self.queued_bytes += len(data)
        self.last_output_at = asyncio.get_running_loop().time()
        if self.queued_bytes > HIGH_WATER and not self.paused and self.chan is not None:
            self.paused = True
            self.chan.pause_reading()

    def took(self, n: int) -> None:
        """The caller took ``n`` bytes off the queue."""
        self.queued_bytes -= n
        if self.paused and self.queued_bytes <= LOW_WATER and self.chan is not None:
            self.paused = False
            self.last_output_at = asyncio.get_running_loop().time()
            self.chan.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype != asyncssh.EXTENDED_DATA_STDERR:
            self._put(Stream.STDOUT, data)
            return
        if not self.pgid_known.is_set():
            self.head += data
            line, newline, rest = self.head.partition(b"\n")
            if not newline:
                return
            self.head = b""
            self._marker_line(line)
            data = rest
            if not data:
                return
        self._put(Stream.STDERR, data)

    def _marker_line(self, line: bytes) -> None:
        word, _, pgid = line.partition(b" ")
        if word == self.marker and pgid.strip().isdigit():
            self.pgid = int(pgid)
        self.pgid_known.set()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status
        self._exited()

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        try:
            self.exit_signal = _signal_number(signal)
        except KeyError:
            self.exit_signal = 9
        self._exited()

    def _exited(self) -> None:
        self.exited_at = asyncio.get_running_loop().time()
        # Wake the reader (an empty chunk) so that it starts the drain clock now: a background
        # job may hold the output open, and no more output need come to wake it otherwise.
        self.queue.put_nowait((Stream.STDOUT, b""))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head:  # stderr that never completed a line: not the marker
            self._put(Stream.STDERR, self.head)
            self.head = b""
        self.pgid_known.set()
        self.closed = True
        self.error = exc
        self.queue.put_nowait(None)


async def _start_sftp(conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
    """An SFTP client on the ``sftp`` subsystem, or, on a host whose sshd configures none,
    on the sftp-server program run as a command."""
    try:
        return await conn.start_sftp_client()
    except (asyncssh.ChannelOpenError, asyncssh.SFTPError):
        if conn.is_closed():
            raise
    writer, reader, _ = await conn.open_session(SFTP_SERVER_COMMAND, encoding=None)
    return await asyncssh.sftp.start_sftp_client(
        conn, asyncio.get_running_loop(), "strict", reader, writer, "utf-8", "strict", 3
    )


def _signal_number(name: str) -> int:
    return int(signal.Signals[f"SIG{name}"])


def _command(marker: str, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The remote shell line: report the group (the session's, $$), enter ``cwd``, exec ``argv``."""
    parts = [f"printf '%s %s\\n' {marker} \"$$\" >&2"]
    if cwd:
        parts.append(f"cd -- {shlex.quote(cwd)}")
    run = " ".join(shlex.quote(arg) for arg in argv)
    if env:
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        run = f"env -- {assignments} {run}"
    parts.append(f"exec {run}")
    return " && ".join(parts)


def _sftp_error(exc: asyncssh.SFTPError, path: str, what: str = "") -> DispatchError:
    subject = f"{what} {path}" if what else path
    if isinstance(exc, asyncssh.SFTPNoSuchFile | asyncssh.SFTPNoSuchPath):
        return NotFound(f"{subject}: no such file or directory")
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return FailedPrecondition(f"{subject}: permission denied")
    if isinstance(exc, asyncssh.SFTPFileIsADirectory):
        return FailedPrecondition(f"{subject} is a directory")
    if isinstance(exc, asyncssh.SFTPNotADirectory):
        return FailedPrecondition(f"{subject}: not a directory (a component of the path is a file)")
    if isinstance(exc, asyncssh.SFTPInvalidFilename):
        return InvalidArgument(f"{subject}: invalid file name")
    return FailedPrecondition(f"{subject}: {exc.reason or exc}")


async def _info(sftp: asyncssh.SFTPClient, path: str, name: str, attrs: asyncssh.SFTPAttrs) -> FileInfo:
    mode = attrs.permissions or 0
    target = ""
    if stat.S_ISLNK(mode):
        kind = FileType.SYMLINK
        with contextlib.suppress(asyncssh.SFTPError):
            target = str(await sftp.readlink(path))
    elif stat.S_ISDIR(mode):
        kind = FileType.DIRECTORY
    elif stat.S_ISREG(mode):
        kind = FileType.FILE
    else:
        kind = FileType.OTHER
    mtime_ns = attrs.mtime_ns if attrs.mtime_ns is not None else (attrs.mtime or 0) * 1_000_000_000
    return FileInfo(
        name=name,
        path=path,
        type=kind,
        size=attrs.size or 0,
        mode=stat.S_IMODE(mode),
        modified_ns=int(mtime_ns),
        symlink_target=target,
    )
