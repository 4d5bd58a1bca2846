"""The SSH backend: processes and files on a host reached through an ssh_config Host alias.

One connection per host, opened on first use and reused by every call (processes
on exec channels, files over one SFTP client); a dropped connection is opened
again by the next call. A spawn runs in the session's own process group (sshd
starts each session with ``setsid``).

sshd runs every command through the login's shell, and that shell's start-up
files may print first: Debian's bash reads ``~/.bashrc`` even for ``bash -c``
when sshd starts it, zsh reads ``~/.zshenv``, and hosts print banners and
warnings (pyenv's, say) from them. Nothing in the command can stop that, since
it runs after them. So a spawn's command first prints a per-spawn marker line
on each stream, ``<marker>`` on stdout and ``<marker> <pgid>`` on stderr (the
group id is the shell's ``$$``), then ``exec``s the argv. On each stream,
everything before its marker is start-up output, not the command's: it is
dropped from the spawn's output and logged at debug level; the marker line
itself never reaches the caller, wherever it lands (start-up output without a
trailing newline puts it mid-line). Memory stays bounded and no call waits on
a marker that does not come: output is held back for it only up to
``STARTUP_BYTES`` per stream, and only until the command has exited and its
output gone quiet; past either, what is held and what follows go on to the
caller as they come (a host that prints more before the marker, or never
prints it, like a ForceCommand that ignores the command, has its start-up output
passed on), and what is held when the channel closes goes on too. The marker
is still taken out if it comes later: it never reaches the caller. The sftp-server
fallback (a host without the ``sftp`` subsystem) marks stdout the same way
before the SFTP protocol starts, which start-up output would otherwise corrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

log = logging.getLogger(__name__)

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
# Output held back per stream while looking for the spawn's marker (the login's start-up
# output comes first); past it, output goes on to the caller as it comes.
STARTUP_BYTES = 64 << 10
# What may follow the marker on its line: " <pgid>" on stderr, nothing on stdout.
MARKER_LINE_BYTES = 32
# Start-up output shown in one debug log record, at most.
STARTUP_LOG_BYTES = 1024
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
                    self._sftp = await _start_sftp(conn, self.alias)
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
        marker = _marker()
        conn = await self.connection()
        started = time.monotonic()
        async with self.channels:
            session = _Session(marker, self.alias)
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
                        if session.exited_at is not None and session.give_up():
                            continue  # output held back for a marker that never came: take it first
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


class _Marked:
    """One output stream of a spawn: the login's start-up output, then the marker line the
    spawn's command prints first, then the command's own output (see the module docstring)."""

    def __init__(self, marker: bytes):
        self.marker = marker
        self.held = b""  # not yet known to be the command's output
        self.seen = False  # past the marker line (or given up on it at close): all is output now
        self.overflowed = False  # more than STARTUP_BYTES before any marker: output goes on
        self.tail: bytes | None = None  # what followed the marker on its line, once seen
        self.startup = b""  # the start-up output taken out before the marker

    def feed(self, data: bytes) -> bytes:
        """The command's output in what held back so far and ``data`` add up to."""
        if self.seen:
            return data
        buf = self.held + data
        at = buf.find(self.marker)
        if at >= 0:
            line = at + len(self.marker)
            end = buf.find(b"\n", line, line + MARKER_LINE_BYTES + 1)
            if end >= 0:
                return self._past_marker(buf, at, buf[line:end], buf[end + 1 :])
            if len(buf) - line > MARKER_LINE_BYTES:
                # Not a line this spawn printed (something wrote into it): drop the marker alone.
                return self._past_marker(buf, at, None, buf[line:])
        # All before ``cut`` is start-up output; what follows may still be (the start of) the
        # marker line. Past the bound, start-up output goes on as it comes.
        cut = self._cut(buf, at)
        if not self.overflowed and cut <= STARTUP_BYTES:
            self.held = buf
            return b""
        self.overflowed = True
        self.held = buf[cut:]
        return buf[:cut]

    def give_up(self) -> bytes:
        """Hold back no more start-up output (the command exited and its output went quiet
        with no marker yet): what is held goes on, but for what may still be the marker's."""
        if self.seen:
            return b""
        self.overflowed = True
        cut = self._cut(self.held, self.held.find(self.marker))
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def _cut(self, buf: bytes, at: int) -> int:
        """Where what may still be the marker line starts in ``buf``: at the marker, else at
        the longest end of ``buf`` that the marker starts with."""
        if at >= 0:
            return at
        for n in range(min(len(self.marker) - 1, len(buf)), 0, -1):
            if buf.endswith(self.marker[:n]):
                return len(buf) - n
        return len(buf)

    def release(self) -> bytes:
        """The stream ended (or went quiet after the command exited) before its marker line
        did: what is held back is output, less a marker if it is in there."""
        if self.seen:
            return b""
        buf = self.held
        at = buf.find(self.marker)
        if at >= 0:
            return self._past_marker(buf, at, buf[at + len(self.marker) :], b"")
        self.seen = True
        self.held = b""
        return buf

    def _past_marker(self, buf: bytes, at: int, tail: bytes | None, rest: bytes) -> bytes:
        self.seen = True
        self.held = b""
        self.tail = tail
        if self.overflowed:  # what came before the marker has gone on already; so does its end
            return buf[:at] + rest
        self.startup = buf[:at]
        return rest


class _Session(asyncssh.SSHClientSession[bytes]):
    """One exec channel: output into a queue, with each stream's start-up output and marker
    line taken out, the group id read off stderr's marker line."""

    def __init__(self, marker: str, alias: str = ""):
        self.alias = alias
        self.streams = {Stream.STDOUT: _Marked(marker.encode()), Stream.STDERR: _Marked(marker.encode())}
        # Unbounded, but reading pauses while it holds more than HIGH_WATER bytes.
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.queued_bytes = 0
        self.paused = False
        self.last_output_at = 0.0
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.pgid: int | None = None
        self.pgid_known = asyncio.Event()
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
        stream = Stream.STDERR if datatype == asyncssh.EXTENDED_DATA_STDERR else Stream.STDOUT
        marked = self.streams[stream]
        was_seen = marked.seen
        out = marked.feed(data)
        if marked.seen and not was_seen:
            self._marker_seen(stream, marked)
        elif marked.overflowed:
            # No marker within the bound (stdout's comes before stderr's): the group may never
            # be known, so a kill waits no longer for it; if the marker comes, it is read then.
            self.pgid_known.set()
        if out:
            self._put(stream, out)

    def give_up(self) -> bool:
        """Pass on what the streams hold back for markers that have not come (see
        ``_Marked.give_up``); whether there was any."""
        passed = False
        for stream, marked in self.streams.items():
            out = marked.give_up()
            if out:
                self._put(stream, out)
                passed = True
        self.pgid_known.set()  # a kill waits no longer for a group that may never be told
        return passed

    def _release(self) -> None:
        """The channel closed: what the streams hold back is output, less any marker."""
        for stream, marked in self.streams.items():
            was_seen = marked.seen
            out = marked.release()
            if marked.seen and not was_seen:
                self._marker_seen(stream, marked)
            if out:
                self._put(stream, out)

    def _marker_seen(self, stream: Stream, marked: _Marked) -> None:
        if marked.startup and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "SSH host %r: %d bytes of start-up output on %s before the command, dropped: %r",
                self.alias,
                len(marked.startup),
                stream.value,
                marked.startup[:STARTUP_LOG_BYTES],
            )
        if stream is Stream.STDERR:
            pgid = (marked.tail or b"").strip()
            if pgid.isdigit():
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
        self._release()
        self.pgid_known.set()
        self.closed = True
        self.error = exc
        self.queue.put_nowait(None)


async def _start_sftp(conn: asyncssh.SSHClientConnection, alias: str = "") -> asyncssh.SFTPClient:
    """An SFTP client on the ``sftp`` subsystem, or, on a host whose sshd configures none,
    on the sftp-server program run as a command, after the login's start-up output."""
    try:
        return await conn.start_sftp_client()
    except (asyncssh.ChannelOpenError, asyncssh.SFTPError):
        if conn.is_closed():
            raise
    marker = _marker()
    writer, reader, _ = await conn.open_session(
        f"printf '%s\\n' {marker} && {SFTP_SERVER_COMMAND}", encoding=None
    )
    try:
        # Bounded: the stream stops reading (and this fails) once its buffer is full.
        head = await reader.readuntil(f"{marker}\n".encode())
    except asyncio.IncompleteReadError as exc:
        writer.close()
        raise ConnectionError(
            f"sftp-server did not start; the host printed {exc.partial[-STARTUP_LOG_BYTES:]!r}"
        ) from None
    startup = head[: -len(marker) - 1]
    if startup:
        log.debug(
            "SSH host %r: %d bytes of start-up output before sftp-server, dropped: %r",
            alias,
            len(startup),
            startup[:STARTUP_LOG_BYTES],
        )
    return await asyncssh.sftp.start_sftp_client(
        conn, asyncio.get_running_loop(), "strict", reader, writer, "utf-8", "strict", 3
    )


def _signal_number(name: str) -> int:
    return int(signal.Signals[f"SIG{name}"])


def _marker() -> str:
    """A new marker: no start-up output or command can know it in advance."""
    return f"__DISPATCH_START_{secrets.token_hex(8)}__"


def _command(marker: str, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The remote shell line: mark both streams, the stderr marker with the group (the
    session's, ``$$``), enter ``cwd``, exec ``argv``."""
    parts = [f"printf '%s\\n' {marker}", f"printf '%s %s\\n' {marker} \"$$\" >&2"]
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
