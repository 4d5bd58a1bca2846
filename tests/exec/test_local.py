"""The local backend: through a real Exec server, where a caller sees it, and directly for
what only the backend shows (buffering, batching, the loop it runs on)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import pytest
import uvloop

from dispatch.exec.backend import Exit, OutputBatch, SpawnEvent, Stream
from dispatch.exec.local import CHUNK_BYTES, LocalBackend
from dispatch.shared.config import ExecConfig
from dispatch.shared.timeutil import duration
from dispatch.v1 import common_pb2, exec_pb2
from tests.exec.helpers import OUTPUT_CAP, READ_CAP, alive, spawn, still_alive, written_bytes

if TYPE_CHECKING:
    from dispatch.v1.exec_pb2_grpc import ExecAsyncStub as Stub


def sh(line: str, **kw: object) -> exec_pb2.SpawnRequest:
    return exec_pb2.SpawnRequest(argv=["sh", "-c", line], **kw)  # type: ignore[arg-type]


def pids_of(text: bytes) -> list[int]:
    return [int(word) for word in text.split()]


# ------------------------------------------------------------------ spawn


async def test_echo_streams_stdout_and_exits_zero(stub: Stub) -> None:
    ran = await spawn(stub, exec_pb2.SpawnRequest(argv=["echo", "hello", "world"]))
    assert ran.stdout == b"hello world\n"
    assert ran.stderr == b""
    assert ran.exit is not None
    assert ran.exit.HasField("exit_code") and ran.exit.exit_code == 0
    assert not ran.exit.HasField("signal")
    assert not ran.exit.timed_out and not ran.exit.truncated
    assert ran.exit.duration.ToNanoseconds() > 0


async def test_stderr_travels_apart_from_stdout(stub: Stub) -> None:
    ran = await spawn(stub, sh("echo out; echo err >&2; echo out2"))
    assert ran.stdout == b"out\nout2\n"
    assert ran.stderr == b"err\n"


@pytest.mark.parametrize(
    ("line", "exit_code", "signal"),
    [
        ("exit 0", 0, None),
        ("exit 3", 3, None),
        ("exit 255", 255, None),
        ("kill -TERM $$", None, 15),
        ("kill -KILL $$", None, 9),
    ],
)
async def test_exit_reports_code_or_signal(
    stub: Stub, line: str, exit_code: int | None, signal: int | None
) -> None:
    ran = await spawn(stub, sh(line))
    assert ran.exit is not None
    assert (ran.exit.exit_code if ran.exit.HasField("exit_code") else None) == exit_code
    assert (ran.exit.signal if ran.exit.HasField("signal") else None) == signal
    assert not ran.exit.timed_out


async def test_env_is_added_to_the_service_environment_and_cwd_is_honoured(
    stub: Stub, real_tmp: Path
) -> None:
    request = sh(
        'echo "$GREETING|$HOME"; pwd -P; command -v sh >/dev/null && echo path-kept',
        env={"GREETING": "hi there", "HOME": "/nowhere"},
        cwd=str(real_tmp),
    )
    ran = await spawn(stub, request)
    assert ran.stdout.decode().splitlines() == ["hi there|/nowhere", str(real_tmp), "path-kept"]


async def test_no_cwd_starts_in_home(stub: Stub) -> None:
    ran = await spawn(stub, sh('test "$(pwd -P)" = "$(cd "$HOME" && pwd -P)" && echo home'))
    assert ran.stdout == b"home\n"


@pytest.mark.parametrize(
    ("stdin", "line", "expected"),
    [
        (b"abc\x00\xffdef", "cat", b"abc\x00\xffdef"),
        (b"x" * 1_000_000, "wc -c | tr -d ' '", b"1000000\n"),
        # A process that never reads its input must not hang or fail the call.
        (b"y" * 1_000_000, "echo ignored", b"ignored\n"),
        (b"", "cat", b""),
    ],
    ids=["binary", "large", "unread", "none"],
)
async def test_stdin_is_fed(stub: Stub, stdin: bytes, line: str, expected: bytes) -> None:
    ran = await spawn(stub, sh(line, stdin=stdin))
    assert ran.stdout == expected
    assert ran.exit is not None and ran.exit.exit_code == 0


async def test_timeout_kills_the_whole_group(stub: Stub) -> None:
    request = sh("sleep 100 & echo $$ $!; sleep 100", timeout=duration(0.5))
    ran = await spawn(stub, request)  # the test's timeout guards against waiting the 100 s
    assert ran.exit is not None
    assert ran.exit.timed_out
    assert ran.exit.HasField("signal") and ran.exit.signal == 9
    assert not ran.exit.HasField("exit_code")
    pids = pids_of(ran.stdout)
    assert len(pids) == 2
    assert await still_alive(pids) == []


async def test_cancelling_the_call_kills_the_whole_group(stub: Stub) -> None:
    call = stub.Spawn(sh("sleep 100 & echo $$ $!; wait"))
    first = await call.read()
    assert isinstance(first, exec_pb2.SpawnResponse)
    pids = pids_of(first.output.chunks[0].data)
    assert len(pids) == 2
    assert all(alive(pid) for pid in pids)
    call.cancel()
    assert await still_alive(pids) == []


async def test_output_written_just_before_exit_is_kept(stub: Stub) -> None:
    ran = await spawn(
        stub, sh("head -c 3000000 /dev/zero | tr '\\0' a; echo; echo done >&2", max_output_bytes=10_000_000)
    )
    assert ran.stdout == b"a" * 3_000_000 + b"\n"
    assert ran.stderr == b"done\n"
    assert ran.exit is not None and not ran.exit.truncated


@pytest.mark.parametrize(
    ("line", "max_output_bytes", "cap"),
    [
        ("head -c 5000000 /dev/zero", 1000, 1000),
        ("head -c 800 /dev/zero; head -c 800 /dev/zero >&2", 1000, 1000),
        ("head -c 5000000 /dev/zero", 0, OUTPUT_CAP),
    ],
    ids=["stdout", "stdout-and-stderr-together", "service-default-cap"],
)
async def test_output_past_the_cap_is_dropped_with_a_marker(
    stub: Stub, line: str, max_output_bytes: int, cap: int
) -> None:
    ran = await spawn(stub, sh(line, max_output_bytes=max_output_bytes))
    marker = f"\n[dispatch: output truncated after {cap} bytes]\n".encode()
    assert ran.exit is not None
    assert ran.exit.truncated
    assert ran.exit.exit_code == 0
    last = ran.batches[-1].chunks[-1]
    assert last.stream == common_pb2.OUTPUT_STREAM_STDERR and last.data.endswith(marker)
    assert ran.stderr.endswith(marker)
    assert len(ran.stdout) + len(ran.stderr) - len(marker) == cap


async def test_output_exactly_at_the_cap_is_not_truncated(stub: Stub) -> None:
    ran = await spawn(stub, sh("head -c 1000 /dev/zero", max_output_bytes=1000))
    assert ran.exit is not None and not ran.exit.truncated
    assert ran.stdout == b"\0" * 1000 and ran.stderr == b""


@pytest.mark.parametrize(
    ("argv", "exit_code", "says"),
    [
        (["no-such-program-dispatch"], 127, b"no-such-program-dispatch: command not found"),
        (["/no/such/dir/prog"], 127, b"command not found"),
        (["/"], 126, b"permission denied"),
    ],
)
async def test_a_program_that_cannot_run_is_an_exit_not_an_error(
    stub: Stub, argv: list[str], exit_code: int, says: bytes
) -> None:
    ran = await spawn(stub, exec_pb2.SpawnRequest(argv=argv))
    assert ran.exit is not None and ran.exit.exit_code == exit_code
    assert says in ran.stderr


@pytest.mark.parametrize(
    ("request_", "code", "says"),
    [
        (exec_pb2.SpawnRequest(argv=[]), grpc.StatusCode.INVALID_ARGUMENT, "argv"),
        (sh("true", cwd="relative/dir"), grpc.StatusCode.INVALID_ARGUMENT, "must be absolute"),
        (sh("true", cwd="/no/such/dir"), grpc.StatusCode.NOT_FOUND, "cwd /no/such/dir"),
        (sh("true", cwd=sys.executable), grpc.StatusCode.FAILED_PRECONDITION, "not a directory"),
        (sh("true", env={"A=B": "x"}), grpc.StatusCode.INVALID_ARGUMENT, "env name"),
        (sh("true", timeout=duration(-1)), grpc.StatusCode.INVALID_ARGUMENT, "timeout"),
        (sh("true", max_output_bytes=-1), grpc.StatusCode.INVALID_ARGUMENT, "max_output_bytes"),
    ],
    ids=[
        "empty-argv",
        "relative-cwd",
        "missing-cwd",
        "cwd-is-a-file",
        "bad-env",
        "negative-timeout",
        "negative-cap",
    ],
)
async def test_bad_spawn_requests_are_refused(
    stub: Stub, request_: exec_pb2.SpawnRequest, code: grpc.StatusCode, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await spawn(stub, request_)
    assert err.value.code() == code
    assert says in (err.value.details() or "")


# ------------------------------------------------------------------ files

CONTENT = bytes(range(256)) * 4  # binary, 1024 bytes


@pytest.mark.parametrize(
    ("offset", "limit", "expected"),
    [
        (0, 0, (CONTENT, False)),
        (10, 20, (CONTENT[10:30], True)),
        (1000, 100, (CONTENT[1000:], False)),
        (1024, 0, (b"", False)),
        (5000, 10, (b"", False)),
    ],
)
async def test_read_file_honours_offset_and_limit(
    stub: Stub, tmp_path: Path, offset: int, limit: int, expected: tuple[bytes, bool]
) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(CONTENT)
    resp = await stub.ReadFile(exec_pb2.ReadFileRequest(path=str(path), offset=offset, limit=limit))
    assert (resp.data, resp.truncated) == expected
    assert resp.size == len(CONTENT)


@pytest.mark.parametrize("limit", [0, READ_CAP + 1, 10 * READ_CAP])
async def test_read_file_is_capped(stub: Stub, tmp_path: Path, limit: int) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * READ_CAP))
    resp = await stub.ReadFile(exec_pb2.ReadFileRequest(path=str(path), limit=limit))
    assert resp.data == path.read_bytes()[:READ_CAP]
    assert resp.size == 3 * READ_CAP and resp.truncated


@pytest.mark.parametrize(
    ("name", "code", "says"),
    [
        ("missing.txt", grpc.StatusCode.NOT_FOUND, "no such file"),
        ("", grpc.StatusCode.FAILED_PRECONDITION, "is a directory"),
    ],
)
async def test_read_file_errors(
    stub: Stub, tmp_path: Path, name: str, code: grpc.StatusCode, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReadFile(exec_pb2.ReadFileRequest(path=str(tmp_path / name)))
    assert err.value.code() == code
    assert says in (err.value.details() or "")


async def test_write_file_creates_parents_with_the_default_mode(stub: Stub, tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.bin"
    resp = await stub.WriteFile(exec_pb2.WriteFileRequest(path=str(path), data=CONTENT))
    assert resp.bytes_written == len(CONTENT)
    assert path.read_bytes() == CONTENT
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["c.bin"]


async def test_write_file_mode_applies_to_a_new_file_and_an_existing_file_keeps_its_own(
    stub: Stub, tmp_path: Path
) -> None:
    path = tmp_path / "script.sh"
    await stub.WriteFile(exec_pb2.WriteFileRequest(path=str(path), data=b"one", mode=0o750))
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    await stub.WriteFile(exec_pb2.WriteFileRequest(path=str(path), data=b"two", mode=0o600))
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    assert path.read_bytes() == b"two"


async def test_write_file_replaces_atomically(stub: Stub, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"old contents")
    with path.open("rb") as reader:
        await stub.WriteFile(exec_pb2.WriteFileRequest(path=str(path), data=b"new"))
        # A reader that had the file open keeps seeing the whole old version:
        # the new one was renamed into place, not written over it.
        assert reader.read() == b"old contents"
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


async def test_write_file_writes_through_a_symlink(stub: Stub, tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_bytes(b"old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    await stub.WriteFile(exec_pb2.WriteFileRequest(path=str(tmp_path / "link.txt"), data=b"new"))
    assert (tmp_path / "link.txt").is_symlink()
    assert (tmp_path / "real.txt").read_bytes() == b"new"


@pytest.mark.parametrize(
    ("make", "target", "says"),
    [
        ("dir", "thing", "is a directory"),
        ("file", "thing/child.txt", "not a directory"),
    ],
)
async def test_write_file_refuses_what_it_cannot_replace_and_leaves_nothing_behind(
    stub: Stub, tmp_path: Path, make: str, target: str, says: str
) -> None:
    if make == "dir":
        (tmp_path / "thing").mkdir()
    else:
        (tmp_path / "thing").write_bytes(b"x")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WriteFile(exec_pb2.WriteFileRequest(path=str(tmp_path / target), data=b"data"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert says in (err.value.details() or "")
    assert os.listdir(tmp_path) == ["thing"]


async def test_stat_reports_files_directories_and_symlinks(stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(CONTENT)
    f.chmod(0o640)
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("f.bin")

    info = await stub.Stat(exec_pb2.StatRequest(path=str(f)))
    assert (info.name, info.path, info.type, info.size, info.mode) == (
        "f.bin",
        str(f),
        exec_pb2.FILE_TYPE_FILE,
        len(CONTENT),
        0o640,
    )
    assert info.modified_at.ToNanoseconds() == f.stat().st_mtime_ns

    info = await stub.Stat(exec_pb2.StatRequest(path=str(tmp_path / "d")))
    assert (info.name, info.type) == ("d", exec_pb2.FILE_TYPE_DIRECTORY)

    info = await stub.Stat(exec_pb2.StatRequest(path=str(tmp_path / "l")))
    assert (info.name, info.type, info.symlink_target) == ("l", exec_pb2.FILE_TYPE_SYMLINK, "f.bin")

    info = await stub.Stat(exec_pb2.StatRequest(path="/dev/null"))
    assert info.type == exec_pb2.FILE_TYPE_OTHER

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Stat(exec_pb2.StatRequest(path=str(tmp_path / "missing")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_dir_is_sorted_and_does_not_follow_symlinks(stub: Stub, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"bb")
    (tmp_path / "a").mkdir()
    (tmp_path / "C").symlink_to("a")
    (tmp_path / "c.txt").write_bytes(b"c")
    resp = await stub.ListDir(exec_pb2.ListDirRequest(path=str(tmp_path)))
    got = [(e.name, e.path, e.type, e.symlink_target) for e in resp.entries]
    assert got == [
        ("C", str(tmp_path / "C"), exec_pb2.FILE_TYPE_SYMLINK, "a"),
        ("a", str(tmp_path / "a"), exec_pb2.FILE_TYPE_DIRECTORY, ""),
        ("b.txt", str(tmp_path / "b.txt"), exec_pb2.FILE_TYPE_FILE, ""),
        ("c.txt", str(tmp_path / "c.txt"), exec_pb2.FILE_TYPE_FILE, ""),
    ]
    assert [e.size for e in resp.entries if e.type == exec_pb2.FILE_TYPE_FILE] == [2, 1]


@pytest.mark.parametrize(
    ("name", "code"),
    [("missing", grpc.StatusCode.NOT_FOUND), ("file.txt", grpc.StatusCode.FAILED_PRECONDITION)],
)
async def test_list_dir_errors(stub: Stub, tmp_path: Path, name: str, code: grpc.StatusCode) -> None:
    (tmp_path / "file.txt").write_bytes(b"")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListDir(exec_pb2.ListDirRequest(path=str(tmp_path / name)))
    assert err.value.code() == code


@pytest.mark.parametrize("method", ["ReadFile", "WriteFile", "Stat", "ListDir"])
@pytest.mark.parametrize("path", ["relative/file.txt", "", "./x"])
async def test_a_relative_path_is_refused(stub: Stub, method: str, path: str) -> None:
    request = {
        "ReadFile": exec_pb2.ReadFileRequest(path=path),
        "WriteFile": exec_pb2.WriteFileRequest(path=path, data=b"x"),
        "Stat": exec_pb2.StatRequest(path=path),
        "ListDir": exec_pb2.ListDirRequest(path=path),
    }[method]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(stub, method)(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be absolute" in (err.value.details() or "")


async def test_cancelling_a_call_whose_output_is_not_read_kills_the_group(stub: Stub) -> None:
    call = stub.Spawn(sh("echo $$; exec yes", max_output_bytes=1 << 40))
    first = await call.read()
    assert isinstance(first, exec_pb2.SpawnResponse)
    pid = int(first.output.chunks[0].data.split(b"\n")[0])
    # Not reading: flow control stalls the server in the middle of a send.
    await asyncio.sleep(0.5)
    call.cancel()
    assert await still_alive([pid]) == []


# ------------------------------------------------- the backend, without a server


@pytest.fixture
def backend() -> LocalBackend:
    return LocalBackend(ExecConfig(max_output_bytes=1 << 40))


async def test_a_slow_consumer_slows_the_process_instead_of_buffering(backend: LocalBackend) -> None:
    events = backend.spawn(["sh", "-c", "echo $$; exec head -c 200000000 /dev/zero"])
    try:
        first = await anext(events)
        assert isinstance(first, OutputBatch)
        pid = int(first.chunks[0].data.split(b"\n")[0])
        await asyncio.sleep(0.5)  # consume nothing; an unbounded reader would take it all by now
        assert alive(pid)
        assert written_bytes(pid) < 8 << 20
    finally:
        await events.aclose()
    assert await still_alive([pid]) == []


async def test_output_that_piles_up_travels_in_one_batch(backend: LocalBackend) -> None:
    events = backend.spawn(["sh", "-c", "echo first; sleep 0.1; head -c 2000000 /dev/zero; echo done >&2"])
    batches: list[OutputBatch] = []
    async with contextlib.aclosing(events):
        batches.append(cast(OutputBatch, await anext(events)))
        await asyncio.sleep(0.5)  # nobody reads: the reads pile up in the queue
        async for event in events:
            if isinstance(event, OutputBatch):
                batches.append(event)
            else:
                assert event.exit_code == 0
    chunks = [c for b in batches for c in b.chunks]
    assert b"".join(c.data for c in chunks if c.stream is Stream.STDOUT) == b"first\n" + b"\0" * 2_000_000
    assert b"".join(c.data for c in chunks if c.stream is Stream.STDERR) == b"done\n"
    # Everything queued while nobody read leaves in one message, more than any one read.
    assert len(batches[1].chunks) == 1
    assert len(batches[1].chunks[0].data) > CHUNK_BYTES
    # Neighbouring pieces of one stream are joined, not sent as separate chunks.
    assert all(a.stream is not b.stream for batch in batches for a, b in itertools.pairwise(batch.chunks))


async def test_closing_the_generator_kills_the_group(backend: LocalBackend) -> None:
    events = backend.spawn(["sh", "-c", "sleep 100 & echo $$ $!; wait"])
    first = await anext(events)
    assert isinstance(first, OutputBatch)
    pids = pids_of(first.chunks[0].data)
    await events.aclose()
    assert await still_alive(pids) == []


async def drain(events: AsyncIterator[SpawnEvent]) -> tuple[bytes, Exit]:
    out = b""
    async for event in events:
        if isinstance(event, Exit):
            return out, event
        out += b"".join(c.data for c in event.chunks)
    raise AssertionError("no exit")


async def check_the_essentials(backend: LocalBackend) -> None:
    out, exit_ = await drain(backend.spawn(["sh", "-c", "echo hi; exit 3"]))
    assert (out, exit_.exit_code) == (b"hi\n", 3)
    out, exit_ = await drain(backend.spawn(["sh", "-c", "sleep 100 & echo $!"]))
    assert exit_.exit_code == 0
    assert await still_alive(pids_of(out)) == []
    out, exit_ = await drain(backend.spawn(["sh", "-c", "sleep 100 & echo $!; sleep 100"], timeout=0.3))
    assert exit_.timed_out and exit_.signal == 9
    assert await still_alive(pids_of(out)) == []
    out, exit_ = await drain(backend.spawn(["cat"], stdin=b"z" * 500_000))
    assert out == b"z" * 500_000


def test_the_backend_works_on_uvloop(backend: LocalBackend) -> None:
    # The service runs on uvloop; the other tests run on asyncio's own loop.
    uvloop.run(check_the_essentials(backend))


async def test_the_backend_works_without_pidfd(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open is not available")

    # As on macOS or an old kernel: a thread waits for the process instead.
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    await check_the_essentials(backend)
