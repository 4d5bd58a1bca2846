"""What a caller of the Exec service sees, the same on this machine and over SSH.

Each test runs twice through a real Exec server: once with ``computer_id`` empty
(the local backend) and once with the test sshd's Host alias (the SSH backend).
The sshd runs on this machine, so both see the same files: each test works in
a directory the SSH login owns (``Target.tmp``). As root that login is a
dedicated user whose shell start-up prints to stdout and stderr before every
command (``tests.sshd``), so every SSH case here also shows that none of it, nor
the backend's own marker, reaches the caller.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import grpc
import pytest

from dispatch.exec.backend import Exit, OutputBatch
from dispatch.exec.server import start
from dispatch.exec.ssh import SSHBackend
from dispatch.shared.config import ExecConfig
from dispatch.shared.timeutil import duration
from dispatch.v1 import exec_pb2, exec_pb2_grpc
from tests.exec.helpers import OUTPUT_CAP, READ_CAP, spawn, written_bytes
from tests.sshd import ALIAS, SshServer


@dataclass
class Target:
    stub: exec_pb2_grpc.ExecAsyncStub
    computer_id: str
    tmp: Path  # a fresh directory, symlinks resolved, that the local process and the SSH login share

    def sh(self, line: str, **kw: object) -> exec_pb2.SpawnRequest:
        return exec_pb2.SpawnRequest(computer_id=self.computer_id, argv=["sh", "-c", line], **kw)  # type: ignore[arg-type]

    async def alive(self, pids: list[int]) -> list[int]:
        """The ``pids`` running on the target, asked through a spawn there."""
        ran = await spawn(
            self.stub, self.sh(" ".join(f"kill -0 {pid} 2>/dev/null && echo {pid};" for pid in pids))
        )
        return [int(word) for word in ran.stdout.split()]

    async def dead(self, pids: list[int], within: float = 5.0) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while await self.alive(pids):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


@pytest.fixture(params=["local", "ssh"])
async def target(request: pytest.FixtureRequest, sshd: SshServer) -> AsyncIterator[Target]:
    cfg = ExecConfig(
        listen="127.0.0.1:0",
        max_output_bytes=OUTPUT_CAP,
        max_read_bytes=READ_CAP,
        ssh_config=str(sshd.config),
    )
    hosted = await start(cfg)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}")
    try:
        yield Target(
            exec_pb2_grpc.ExecStub(channel), "" if request.param == "local" else ALIAS, sshd.workdir()
        )
    finally:
        await channel.close()
        await hosted.stop(0)


# ------------------------------------------------------------------ spawn


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("echo hello world", (b"hello world\n", b"", 0, None)),
        ("echo out; echo err >&2; echo out2; exit 3", (b"out\nout2\n", b"err\n", 3, None)),
        ("exit 255", (b"", b"", 255, None)),
        ("kill -TERM $$", (b"", b"", None, 15)),
        ("kill -KILL $$", (b"", b"", None, 9)),
    ],
)
async def test_output_and_exit(
    target: Target, line: str, expected: tuple[bytes, bytes, int | None, int | None]
) -> None:
    stdout, stderr, exit_code, signal = expected
    ran = await spawn(target.stub, target.sh(line))
    assert (ran.stdout, ran.stderr) == (stdout, stderr)
    assert ran.exit is not None
    assert (ran.exit.exit_code if ran.exit.HasField("exit_code") else None) == exit_code
    assert (ran.exit.signal if ran.exit.HasField("signal") else None) == signal
    assert not ran.exit.timed_out and not ran.exit.truncated


async def test_argv_is_passed_verbatim(target: Target) -> None:
    args = ["it's", "a b", "$HOME", "*", '"q"', ""]
    ran = await spawn(
        target.stub,
        exec_pb2.SpawnRequest(computer_id=target.computer_id, argv=["printf", "[%s]\n", *args]),
    )
    assert ran.stdout == b"".join(f"[{a}]\n".encode() for a in args)


async def test_env_and_cwd(target: Target) -> None:
    real = target.tmp
    ran = await spawn(
        target.stub,
        target.sh('echo "$GREETING"; pwd -P', env={"GREETING": "hi 'there' $x"}, cwd=str(real)),
    )
    assert ran.stdout == f"hi 'there' $x\n{real}\n".encode()


async def test_stdin_reaches_the_process(target: Target) -> None:
    ran = await spawn(target.stub, target.sh("cat; echo done", stdin=b"line one\nline two\n"))
    assert ran.stdout == b"line one\nline two\ndone\n"


async def test_a_missing_program_exits_127_and_a_missing_cwd_is_not_found(target: Target) -> None:
    ran = await spawn(
        target.stub, exec_pb2.SpawnRequest(computer_id=target.computer_id, argv=["no-such-program-xyz"])
    )
    assert ran.exit is not None and ran.exit.exit_code == 127
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await spawn(target.stub, target.sh("true", cwd="/no/such/dir"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(20)
async def test_timeout_kills_the_process_group(target: Target) -> None:
    ran = await spawn(target.stub, target.sh("sleep 100 & echo $$ $!; sleep 100", timeout=duration(0.5)))
    assert ran.exit is not None
    assert ran.exit.timed_out
    assert ran.exit.signal == 9
    pids = [int(word) for word in ran.stdout.split()]
    assert len(pids) == 2
    assert await target.dead(pids)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "line",
    [
        # The background job inherits stdout and stderr: EOF never comes on its own.
        "sleep 100 & echo $!",
        # The same, and nothing is printed after the job starts.
        "sleep 100 & echo $! >pid",
        # It lets go of the output, but must not outlive the call either.
        "sleep 100 >/dev/null 2>&1 & echo $!",
    ],
    ids=["holding-output", "holding-output-silently", "detached-from-output"],
)
async def test_a_normal_exit_answers_promptly_and_leaves_no_background_job(target: Target, line: str) -> None:
    ran = await spawn(target.stub, target.sh(line, cwd=str(target.tmp)))
    assert ran.exit is not None and ran.exit.exit_code == 0 and not ran.exit.timed_out
    pid = ran.stdout or (target.tmp / "pid").read_bytes()
    assert await target.dead([int(pid)])


@pytest.mark.timeout(20)
async def test_cancelling_kills_the_process_group(target: Target) -> None:
    call = target.stub.Spawn(target.sh("sleep 100 & echo $$ $!; wait"))
    first = await call.read()
    assert isinstance(first, exec_pb2.SpawnResponse)
    pids = [int(word) for word in first.output.chunks[0].data.split()]
    assert await target.alive(pids) == pids
    call.cancel()
    assert await target.dead(pids)


async def test_output_past_the_cap_is_truncated_with_a_marker(target: Target) -> None:
    ran = await spawn(target.stub, target.sh("head -c 5000 /dev/zero; echo tail", max_output_bytes=1000))
    assert ran.exit is not None and ran.exit.truncated and ran.exit.exit_code == 0
    assert ran.stdout == b"\0" * 1000
    assert ran.stderr == b"\n[dispatch: output truncated after 1000 bytes]\n"


# ------------------------------------------------------------------ files


async def test_write_read_stat_and_list(target: Target) -> None:
    root = target.tmp
    path = root / "sub" / "dir" / "file.txt"
    cid = target.computer_id
    written = await target.stub.WriteFile(
        exec_pb2.WriteFileRequest(computer_id=cid, path=str(path), data=b"0123456789", mode=0o640)
    )
    assert written.bytes_written == 10
    assert path.read_bytes() == b"0123456789"
    assert path.stat().st_mode & 0o7777 == 0o640
    # Replacing keeps the mode and leaves no temporary file behind.
    await target.stub.WriteFile(
        exec_pb2.WriteFileRequest(computer_id=cid, path=str(path), data=b"abcdefghij")
    )
    assert path.stat().st_mode & 0o7777 == 0o640
    assert os.listdir(path.parent) == ["file.txt"]

    got = await target.stub.ReadFile(exec_pb2.ReadFileRequest(computer_id=cid, path=str(path)))
    assert (got.data, got.size, got.truncated) == (b"abcdefghij", 10, False)
    got = await target.stub.ReadFile(
        exec_pb2.ReadFileRequest(computer_id=cid, path=str(path), offset=2, limit=3)
    )
    assert (got.data, got.size, got.truncated) == (b"cde", 10, True)
    big = root / "big"
    big.write_bytes(b"x" * (READ_CAP + 10))
    got = await target.stub.ReadFile(exec_pb2.ReadFileRequest(computer_id=cid, path=str(big)))
    assert (len(got.data), got.size, got.truncated) == (READ_CAP, READ_CAP + 10, True)

    (root / "link").symlink_to("sub/dir/file.txt")
    info = await target.stub.Stat(exec_pb2.StatRequest(computer_id=cid, path=str(root / "link")))
    assert info.type == exec_pb2.FILE_TYPE_SYMLINK and info.symlink_target == "sub/dir/file.txt"
    info = await target.stub.Stat(exec_pb2.StatRequest(computer_id=cid, path=str(path)))
    assert (info.name, info.type, info.size, info.mode) == ("file.txt", exec_pb2.FILE_TYPE_FILE, 10, 0o640)
    assert info.modified_at.seconds == int(path.stat().st_mtime)

    listing = await target.stub.ListDir(exec_pb2.ListDirRequest(computer_id=cid, path=str(root)))
    assert [(e.name, e.type) for e in listing.entries] == [
        ("big", exec_pb2.FILE_TYPE_FILE),
        ("link", exec_pb2.FILE_TYPE_SYMLINK),
        ("sub", exec_pb2.FILE_TYPE_DIRECTORY),
    ]
    assert [e.path for e in listing.entries] == [str(root / n) for n in ("big", "link", "sub")]


@pytest.mark.parametrize("method", ["ReadFile", "Stat", "ListDir"])
async def test_a_missing_file_is_not_found(target: Target, method: str) -> None:
    request = {
        "ReadFile": exec_pb2.ReadFileRequest,
        "Stat": exec_pb2.StatRequest,
        "ListDir": exec_pb2.ListDirRequest,
    }[method](computer_id=target.computer_id, path=str(target.tmp / "missing"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(target.stub, method)(request)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------ computers


async def test_an_unknown_alias_is_not_found_and_the_configured_one_is_listed(
    target: Target, sshd: SshServer
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await spawn(target.stub, exec_pb2.SpawnRequest(computer_id="no-such-alias", argv=["true"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'no-such-alias'" in (err.value.details() or "")
    resp = await target.stub.ListComputers(exec_pb2.ListComputersRequest())
    assert [(c.id, c.local) for c in resp.computers] == [("", True), (ALIAS, False)]
    assert (resp.computers[1].host_name, resp.computers[1].user, resp.computers[1].port) == (
        "127.0.0.1",
        sshd.user,
        sshd.port,
    )


# ------------------------------------------------------------------ the SSH connection


async def _run(backend: SSHBackend, line: str) -> bytes:
    out = b""
    async for event in backend.spawn(["sh", "-c", line]):
        if isinstance(event, OutputBatch):
            out += b"".join(c.data for c in event.chunks)
        else:
            assert isinstance(event, Exit) and event.exit_code == 0
    return out


async def test_calls_share_one_connection_and_reconnect_after_it_drops(sshd: SshServer) -> None:
    backend = SSHBackend(ALIAS, ExecConfig(), str(sshd.config))
    try:
        assert await _run(backend, "echo one") == b"one\n"
        results = await asyncio.gather(*(_run(backend, f"echo {i}") for i in range(15)))
        assert results == [f"{i}\n".encode() for i in range(15)]
        await backend.stat("/")
        assert backend.connections_opened == 1

        conn = await backend.connection()
        conn.close()
        await conn.wait_closed()
        assert await _run(backend, "echo again") == b"again\n"
        assert (await backend.stat("/")).name == "/"
        assert backend.connections_opened == 2
    finally:
        await backend.aclose()


async def test_an_unreachable_host_is_unavailable(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host gone\n    HostName 127.0.0.1\n    Port 1\n")
    hosted = await start(ExecConfig(listen="127.0.0.1:0", ssh_config=str(config)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hosted.port}")
    try:
        stub = exec_pb2_grpc.ExecStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Stat(exec_pb2.StatRequest(computer_id="gone", path="/"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "'gone'" in (err.value.details() or "")
    finally:
        await channel.close()
        await hosted.stop(0)


@pytest.mark.timeout(30)
async def test_a_slow_ssh_consumer_slows_the_remote_process_and_loses_nothing(sshd: SshServer) -> None:
    total = 40 << 20
    backend = SSHBackend(ALIAS, ExecConfig(max_output_bytes=total + 100), str(sshd.config))
    events = backend.spawn(["sh", "-c", f"echo $$; exec head -c {total} /dev/zero"])
    try:
        first = await anext(events)
        assert isinstance(first, OutputBatch)
        pid = int(first.chunks[0].data.split(b"\n")[0])
        received = len(first.chunks[0].data)
        await asyncio.sleep(0.5)  # take nothing: an unbounded reader would have it all by now
        try:
            paused_at = written_bytes(pid)  # the test sshd runs on this machine
        except FileNotFoundError:
            pytest.fail("the remote process wrote all its output while nobody read it")
        # The queue's high-water mark, the SSH window and the pipes between; far from 40 MiB.
        assert paused_at < 12 << 20
        async for event in events:  # now read on: the process resumes and finishes
            if isinstance(event, OutputBatch):
                received += sum(len(c.data) for c in event.chunks)
            else:
                assert (event.exit_code, event.truncated) == (0, False)
        assert received == len(first.chunks[0].data.split(b"\n")[0]) + 1 + total
    finally:
        await events.aclose()
        await backend.aclose()


async def test_files_work_on_a_host_without_the_sftp_subsystem(sshd: SshServer) -> None:
    server = SshServer(user=sshd.user, startup=sshd.startup, sftp_subsystem=False).start()
    tmp = server.workdir()
    backend = SSHBackend(ALIAS, ExecConfig(), str(server.config))
    try:
        conn = await backend.connection()
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.start_sftp_client()  # the subsystem really is refused
        path = str(tmp / "sub" / "note.txt")
        assert await backend.write_file(path, b"over sftp-server\n") == 17
        assert (await backend.read_file(path)).data == b"over sftp-server\n"
        assert (await backend.stat(path)).size == 17
        assert [info.name for info in await backend.list_dir(str(tmp / "sub"))] == ["note.txt"]
    finally:
        await backend.aclose()
        server.stop()
