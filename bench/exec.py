"""Exec latency: spawning ``true`` locally, and a command on an SSH host, pooled or not.

Local: one ``true`` per call, back to back, through

- **subprocess.run** (baseline): Python's own fork/exec and wait, nothing else;
- **LocalBackend.spawn**: the exec service's backend (own process group, pidfd
  wait, output pumps), called in-process;
- **Exec/Spawn over gRPC**: the same through a real exec server on loopback,
  as the kernel calls it.

SSH, against a real OpenSSH sshd on a free loopback port (``tests.sshd``):

- **pooled** (``SSHBackend.spawn``): one exec channel on the backend's pooled
  connection per call, which is what the exec service does;
- **new ssh process** (baseline): ``ssh -F <config> <alias> true``, a new
  OpenSSH client process, connection, key exchange and authentication per call;
- **new asyncssh connection**: the same in-process, to tell the client's
  start-up from the handshake.

The login's shell runs for every command on every path (sshd runs ``$SHELL -c``),
so a shell that reads start-up files adds the same cost to all of them and hides
what pooling saves. As root the benchmark therefore logs in as a dedicated user,
``dispatch-bench``, whose shell is ``/bin/sh`` (created with ``useradd`` on first
use); as anyone else it logs in as the current user, and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import platform
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import grpc

from dispatch.exec.backend import Exit
from dispatch.exec.local import LocalBackend
from dispatch.exec.server import start
from dispatch.exec.ssh import SSHBackend
from dispatch.shared.config import ExecConfig
from dispatch.shared.server import GRPC_OPTIONS, bound_address
from dispatch.v1 import exec_pb2, exec_pb2_grpc

BENCH_USER = "dispatch-bench"
TARGET = 10.0  # new ssh process / pooled, wanted (the issue)


@dataclass(frozen=True)
class Row:
    group: str
    what: str
    latencies: list[float]  # seconds, one per call

    @property
    def per_s(self) -> float:
        return len(self.latencies) / sum(self.latencies)

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3


Call = Callable[[], Awaitable[object]]


async def timed(call: Call, seconds: float, min_calls: int) -> list[float]:
    """Latency of each of ``call``'s runs, back to back, for ``seconds`` and at least ``min_calls``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < min_calls or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)
    return latencies


async def spawn_true(backend: LocalBackend | SSHBackend) -> None:
    async for event in backend.spawn(["true"]):
        if isinstance(event, Exit) and event.exit_code != 0:
            raise RuntimeError(f"true exited with {event}")


async def local_rows(seconds: float, min_calls: int) -> list[Row]:
    group = "local"

    async def raw() -> None:
        # Blocking, as a baseline should be: the loop has nothing else to do.
        subprocess.run(["true"], check=True)  # noqa: ASYNC221

    backend = LocalBackend(ExecConfig())
    rows = [Row(group, "subprocess.run (baseline)", await timed(raw, seconds, min_calls))]
    await timed(lambda: spawn_true(backend), 0.2, 5)  # warm-up; not shown
    rows.append(
        Row(group, "LocalBackend.spawn", await timed(lambda: spawn_true(backend), seconds, min_calls))
    )
    cfg = ExecConfig(listen="127.0.0.1:0")
    hosted = await start(cfg)
    try:
        async with grpc.aio.insecure_channel(
            bound_address(cfg.listen, hosted.port), options=GRPC_OPTIONS
        ) as ch:
            stub = exec_pb2_grpc.ExecStub(ch)

            async def over_grpc() -> None:
                async for response in stub.Spawn(exec_pb2.SpawnRequest(argv=["true"])):
                    if response.HasField("exit") and response.exit.exit_code != 0:
                        raise RuntimeError(f"true exited with {response.exit}")

            await timed(over_grpc, 0.2, 5)
            rows.append(Row(group, "Exec/Spawn over gRPC", await timed(over_grpc, seconds, min_calls)))
    finally:
        await hosted.stop(1.0)
    return rows


def login_user() -> tuple[str, str]:
    """Who the SSH benchmark logs in as, and a note on that user's shell."""
    if os.geteuid() != 0:
        user = getpass.getuser()
        return user, f"the current user ({pwd.getpwnam(user).pw_shell}; its start-up files count)"
    from tests.sshd import ensure_user  # the test sshd's dedicated user is made the same way

    try:
        pwd.getpwnam(BENCH_USER)
    except KeyError:
        print(f"creating the user {BENCH_USER!r} (shell /bin/sh) to log in as over SSH")
    entry = ensure_user(BENCH_USER, "/bin/sh")
    return BENCH_USER, f"{BENCH_USER!r} ({entry.pw_shell}, no start-up files)"


@contextlib.contextmanager
def ssh_server(user: str) -> Iterator[object]:
    from tests.sshd import SshServer  # the test fixture's server: keys, free port, ssh_config

    server = SshServer(Path(tempfile.mkdtemp(prefix="dispatch-bench-sshd-")), user=user).start()
    try:
        yield server
    finally:
        server.stop()


async def ssh_rows(seconds: float, min_calls: int) -> tuple[list[Row], str]:
    from tests.sshd import ALIAS

    user, note = login_user()
    group = "ssh"
    with ssh_server(user) as server:
        config = str(server.config)  # type: ignore[attr-defined]
        backend = SSHBackend(ALIAS, ExecConfig(), ssh_config=config)
        try:
            await timed(lambda: spawn_true(backend), 0.2, 5)  # connects; not shown
            pooled = await timed(lambda: spawn_true(backend), seconds, min_calls)
            opened = backend.connections_opened
        finally:
            await backend.aclose()
        if opened != 1:
            raise RuntimeError(f"the pooled backend opened {opened} connections, not 1")

        async def new_process() -> None:
            proc = await asyncio.to_thread(
                subprocess.run,
                ["ssh", "-F", config, "-o", "BatchMode=yes", ALIAS, "true"],
                capture_output=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"ssh failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")

        async def new_connection() -> None:
            async with asyncssh.connect(ALIAS, config=[config]) as conn:
                await conn.run("true", check=True)

        rows = [
            Row(group, "pooled SSHBackend.spawn", pooled),
            Row(group, "new ssh process (baseline)", await timed(new_process, seconds, min_calls)),
            Row(group, "new asyncssh connection", await timed(new_connection, seconds, min_calls)),
        ]
    return rows, note


HEADER = f"{'':<6} {'measurement':<28} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs baseline':>11}"


def format_row(row: Row, baseline: Row) -> str:
    return (
        f"{row.group:<6} {row.what:<28} {row.per_s:>8.1f} {row.p(50):>8.2f} {row.p(99):>8.2f}"
        f" {baseline.p(50) / row.p(50):>10.2f}x"
    )


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench exec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="how long each measurement runs")
    parser.add_argument("--min-calls", type=int, default=20, help="fewest calls per measurement")
    parser.add_argument("--only", choices=["local", "ssh"], help="run one half")
    args = parser.parse_args(argv)
    print(f"exec spawn latency, {args.seconds:g} s (and >= {args.min_calls} calls) per measurement")
    print(f"python {platform.python_version()} on {platform.machine()}, asyncssh {asyncssh.__version__}")
    print()
    print(HEADER)
    if args.only != "ssh":
        local = asyncio.run(local_rows(args.seconds, args.min_calls))
        for row in local:
            print(format_row(row, local[0]), flush=True)
    if args.only != "local":
        if shutil.which("ssh") is None or not os.path.exists("/usr/sbin/sshd"):
            raise SystemExit("the SSH benchmark needs OpenSSH (`make system-deps` installs it)")
        ssh, note = asyncio.run(ssh_rows(args.seconds, args.min_calls))
        baseline = ssh[1]
        for row in ssh:
            print(format_row(row, baseline), flush=True)
        speedup = baseline.p(50) / ssh[0].p(50)
        print()
        print(f"ssh logs in as {note}")
        verdict = "met" if speedup >= TARGET else "NOT met"
        print(
            f"target: pooled >= {TARGET:g}x faster than a new ssh process (p50);"
            f" measured {speedup:.1f}x: {verdict}"
        )
    print()
    print("vs baseline: the group's baseline p50 over this row's p50 (above 1: faster than the baseline).")
    return 0
