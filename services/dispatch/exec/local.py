"""The local backend: processes and files on the machine the exec service runs on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import pwd
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import IO

from dispatch.exec.backend import (
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
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
    os_error,
    require_absolute,
    truncation_marker,
)
from dispatch.shared.config import ExecConfig, environ
from dispatch.shared.errors import FailedPrecondition, InvalidArgument

# One pipe read. Together with QUEUE_ITEMS this bounds what a spawn buffers
# (about 1 MiB): a slow consumer stalls the readers, the pipes fill, and the
# process blocks on write instead of our memory growing.
CHUNK_BYTES = 64 * 1024
QUEUE_ITEMS = 16
# A small read waits this long for company, so a chatty process sends one
# message per few milliseconds instead of one per write(2).
COALESCE_SECONDS = 0.002
# After the main process exits, its pipes may stay open only this long: a
# grandchild that inherited them would otherwise hold the answer hostage.
DRAIN_SECONDS = 0.1
# Once the group is killed nothing in it can write; if EOF still does not come,
# something outside the group (a setsid daemon) holds the pipes and we stop.
EOF_AFTER_KILL_SECONDS = 0.5
# SIGKILL cannot be ignored, so reaping is quick; bounded for a process stuck
# in uninterruptible sleep.
REAP_SECONDS = 1.0

# A queue item: output, ``(stream, b"")`` at a stream's EOF, or None once the
# main process has exited and been reaped.
_Item = tuple[Stream, bytes] | None


class LocalBackend(Backend):
    """Runs processes and touches files on this machine, as the service's user."""

    def __init__(self, cfg: ExecConfig, base_env: Mapping[str, str] | None = None):
        self.max_output_bytes = cfg.max_output_bytes
        self.max_read_bytes = cfg.max_read_bytes
        self.base_env = dict(environ() if base_env is None else base_env)
        # Like an SSH session, a spawn without a cwd starts in the user's home.
        self.home = self.base_env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir

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
        """See ``Backend.spawn``."""
        env = env or {}
        check_spawn_args(argv, env, timeout, max_output_bytes)
        workdir = require_absolute(cwd, "cwd") if cwd else self.home
        await asyncio.to_thread(_check_workdir, workdir)
        limit = max_output_bytes or self.max_output_bytes
        started = time.monotonic()
        try:
            # Not asyncio.create_subprocess_exec: under uvloop (what the service
            # runs on) the forked child runs Python (PyOS_AfterFork_Child) before
            # it execs, and with gRPC's threads busy that child now and then dies
            # of SIGSEGV. Popen runs no Python between fork and exec; the pipes
            # and the exit are then watched through the loop's fd readiness.
            # It runs on the loop, as asyncio's own subprocess_exec does: a
            # vfork+exec is about a millisecond, and from a worker thread a
            # cancellation could orphan the new process.
            proc = subprocess.Popen(  # noqa: ASYNC220
                list(argv),
                cwd=workdir,
                env={**self.base_env, **env},
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            if exc.filename == workdir:  # the cwd vanished between the check and the exec
                raise os_error(exc, workdir, "cwd") from None
            code, reason = _exec_failure(exc)
            yield OutputBatch((OutputChunk(Stream.STDERR, f"dispatch: {argv[0]}: {reason}\n".encode()),))
            yield Exit(code, None, False, False, time.monotonic() - started)
            return

        run = _Run(proc, stdin, limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        drain_until: float | None = None
        timed_out = False
        try:
            while not (run.exited and run.open_streams == 0):
                if not run.exited:
                    wait_until = deadline
                elif not run.group_killed:
                    if drain_until is None:
                        drain_until = loop.time() + DRAIN_SECONDS
                    wait_until = drain_until
                else:
                    wait_until = loop.time() + EOF_AFTER_KILL_SECONDS
                chunks = await run.collect(wait_until)
                if chunks is None:
                    if not run.exited:
                        timed_out = True
                        run.kill_group()
                        # What was read before the kill, without waiting for more.
                        chunks = run.collect_ready()
                        if chunks:
                            yield OutputBatch(tuple(chunks))
                        break
                    if run.group_killed:
                        break
                    run.kill_group()
                    continue
                if chunks:
                    yield OutputBatch(tuple(chunks))
            # Grandchildren that let go of the pipes are still in the group.
            run.kill_group()
            returncode = await run.reaped()
            if run.truncated:
                yield OutputBatch((OutputChunk(Stream.STDERR, truncation_marker(limit)),))
            exit_code, killed_by = _exit_status(returncode)
            yield Exit(exit_code, killed_by, timed_out, run.truncated, time.monotonic() - started)
        finally:
            # Reached on timeout, on exit, and when the caller goes away (the
            # generator is closed or its task cancelled): the group dies first,
            # before any await, so nothing can delay it.
            run.kill_group()
            await run.close()

    # ------------------------------------------------------------------ files

    async def read_file(self, path: str, offset: int = 0, limit: int = 0) -> FileData:
        """See ``Backend.read_file``; the cap is ``ExecConfig.max_read_bytes``."""
        require_absolute(path)
        if offset < 0:
            raise InvalidArgument(f"offset must not be negative, got {offset}")
        if limit < 0:
            raise InvalidArgument(f"limit must not be negative, got {limit}")
        count = min(limit, self.max_read_bytes) if limit else self.max_read_bytes
        return await asyncio.to_thread(_read_file, path, offset, count)

    async def write_file(self, path: str, data: bytes, mode: int = 0) -> int:
        """See ``Backend.write_file``; symlinks are written through, like a shell's ``>``."""
        require_absolute(path)
        if mode > 0o7777 or mode < 0:
            raise InvalidArgument(f"mode {mode:#o} is not a permission mode (at most 0o7777)")
        return await asyncio.to_thread(_write_file, path, data, mode or 0o644)

    async def stat(self, path: str) -> FileInfo:
        """See ``Backend.stat``."""
        require_absolute(path)
        return await asyncio.to_thread(_stat, path)

    async def list_dir(self, path: str) -> list[FileInfo]:
        """See ``Backend.list_dir``."""
        require_absolute(path)
        return await asyncio.to_thread(_list_dir, path)


class _Run:
    """One running process: its pipes, its output accounting, its process group."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: bytes, limit: int):
        self.proc = proc
        self.limit = limit
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_ITEMS)
        self.emitted = 0
        self.truncated = False
        self.open_streams = 2
        self.exited = False
        self.group_killed = False
        self.reaped_event = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self.tasks = [
            asyncio.create_task(_pump(proc.stdout, Stream.STDOUT, self.queue)),
            asyncio.create_task(_pump(proc.stderr, Stream.STDERR, self.queue)),
            asyncio.create_task(self._watch()),
        ]
        if proc.stdin is not None:
            self.tasks.append(asyncio.create_task(_feed(proc.stdin, stdin)))

    async def _watch(self) -> None:
        await _reap(self.proc)
        self.reaped_event.set()
        await self.queue.put(None)

    async def reaped(self) -> int | None:
        """The returncode once the process is reaped, waiting at most ``REAP_SECONDS``."""
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reaped_event.wait(), REAP_SECONDS)
        return self.proc.returncode

    async def collect(self, wait_until: float | None) -> list[OutputChunk] | None:
        """What arrives by ``wait_until`` (None: no limit), coalesced; None if nothing did."""
        try:
            item = self.queue.get_nowait()
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout_at(wait_until):
                    item = await self.queue.get()
            except TimeoutError:
                return None
        pieces: list[tuple[Stream, list[bytes]]] = []
        self._take(item, pieces)
        if item is not None and 0 < len(item[1]) < CHUNK_BYTES and self.queue.empty():
            await asyncio.sleep(COALESCE_SECONDS)
        return self.collect_ready(pieces)

    def collect_ready(self, pieces: list[tuple[Stream, list[bytes]]] | None = None) -> list[OutputChunk]:
        """``pieces`` and what is already queued, without waiting, as chunks."""
        pieces = [] if pieces is None else pieces
        while True:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._take(item, pieces)
        return [OutputChunk(stream, b"".join(parts)) for stream, parts in pieces]

    def _take(self, item: _Item, pieces: list[tuple[Stream, list[bytes]]]) -> None:
        if item is None:
            self.exited = True
            return
        stream, data = item
        if not data:
            self.open_streams -= 1
            return
        room = self.limit - self.emitted
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
            if not data:
                return
        self.emitted += len(data)
        # Neighbouring reads of one stream become one chunk.
        if pieces and pieces[-1][0] is stream:
            pieces[-1][1].append(data)
        else:
            pieces.append((stream, [data]))

    def kill_group(self) -> None:
        """SIGKILL the whole process group, once; a group already gone is fine."""
        if self.group_killed:
            return
        self.group_killed = True
        # PermissionError: the group is gone and its id was reused by someone else's.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Reap the (killed) process, stop the readers and close the pipes."""
        try:
            await self.reaped()
        finally:
            if self.proc.returncode is None:
                # Cancelled while reaping (the server is going away) or stuck:
                # a thread reaps it, so no zombie outlives the call.
                threading.Thread(
                    target=self.proc.wait, name=f"dispatch-reap-{self.proc.pid}", daemon=True
                ).start()
            for task in self.tasks:
                task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # A task cancelled before it ever ran has not closed its pipe.
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


async def _ready(fd: int, *, write: bool = False) -> None:
    """Until ``fd`` is readable (or writable), through the running loop: asyncio or uvloop."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _pump(pipe: IO[bytes], stream: Stream, queue: asyncio.Queue[_Item]) -> None:
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, CHUNK_BYTES)
            except BlockingIOError:
                await _ready(fd)
                continue
            except OSError:
                data = b""  # a read error ends the stream like EOF
            await queue.put((stream, data))
            if not data:
                return
    finally:
        pipe.close()


async def _feed(pipe: IO[bytes], data: bytes) -> None:
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await _ready(fd, write=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # a process need not read all of its input
    finally:
        pipe.close()


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Until ``proc`` has exited and is reaped; its pipes may well stay open."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+
        await _reap_in_thread(proc)
        return
    try:
        while proc.poll() is None:
            await _ready(pidfd)
    finally:
        os.close(pidfd)


async def _reap_in_thread(proc: subprocess.Popen[bytes]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    def wait() -> None:
        proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(wake)

    # A thread of its own, not the default executor: a long-running process
    # must not hold a worker that file I/O needs.
    threading.Thread(target=wait, name=f"dispatch-reap-{proc.pid}", daemon=True).start()
    await done


def _exit_status(returncode: int | None) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` from the returncode (negative: killed by that signal)."""
    if returncode is None:  # killed but not reaped in time: it was our SIGKILL
        return None, int(signal.SIGKILL)
    if returncode < 0:
        return None, -returncode
    return returncode, None


def _exec_failure(exc: OSError) -> tuple[int, str]:
    if isinstance(exc, FileNotFoundError):
        return EXIT_NOT_FOUND, "command not found"
    if isinstance(exc, PermissionError):
        return EXIT_NOT_EXECUTABLE, "permission denied"
    return EXIT_NOT_EXECUTABLE, exc.strerror or str(exc)


def _check_workdir(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(exc, path, "cwd") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"cwd {path} is not a directory")


# ---------------------------------------------------------- file helpers (threads)


def _read_file(path: str, offset: int, count: int) -> FileData:
    try:
        # O_NONBLOCK: opening a FIFO must not hang the thread waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"{path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{path} is not a regular file")
        parts: list[bytes] = []
        got = 0
        while got < count:
            part = os.pread(fd, count - got, offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    except OSError as exc:
        raise os_error(exc, path) from None
    finally:
        os.close(fd)
    data = b"".join(parts)
    return FileData(data=data, size=st.st_size, truncated=offset + len(data) < st.st_size)


def _write_file(path: str, data: bytes, mode: int) -> int:
    target = os.path.realpath(path)
    parent, name = posixpath.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:
        raise FailedPrecondition(f"cannot create {path}: {parent} exists and is not a directory") from None
    except OSError as exc:
        raise os_error(exc, parent, "parent directory") from None
    try:
        st = os.stat(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, path) from None
    else:
        if stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"{path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{path} is not a regular file; refusing to replace it")
        mode = stat.S_IMODE(st.st_mode)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=".dispatch-tmp")
    except OSError as exc:
        raise os_error(exc, parent, "parent directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            # Without it a crash after the rename can leave an empty file in
            # place of the old one on some filesystems.
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise os_error(exc, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(data)


def _info(path: str, name: str, st: os.stat_result) -> FileInfo:
    target = ""
    if stat.S_ISLNK(st.st_mode):
        kind = FileType.SYMLINK
        with contextlib.suppress(OSError):
            target = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        kind = FileType.DIRECTORY
    elif stat.S_ISREG(st.st_mode):
        kind = FileType.FILE
    else:
        kind = FileType.OTHER
    return FileInfo(
        name=name,
        path=path,
        type=kind,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        modified_ns=st.st_mtime_ns,
        symlink_target=target,
    )


def _stat(path: str) -> FileInfo:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    return _info(path, posixpath.basename(path.rstrip("/")) or "/", st)


def _list_dir(path: str) -> list[FileInfo]:
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as exc:
        raise os_error(exc, path) from None
    infos = []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we listed
        except OSError as exc:
            raise os_error(exc, entry.path) from None
        infos.append(_info(entry.path, entry.name, st))
    infos.sort(key=lambda info: info.name)
    return infos
