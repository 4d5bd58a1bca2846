"""Start Dispatch services as real OS processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``dispatchd <service>`` on a free loopback port; its address comes from the ready file."""

    def __init__(self, service: str, args: Sequence[str], tmp: Path, env: dict[str, str] | None = None):
        self.service = service
        self.ready_file = tmp / f"{service}.addr"
        self.log_path = tmp / f"{service}.log"
        self._log = self.log_path.open("wb")
        argv = [sys.executable, "-m", "dispatch.cli", service, "--listen", "127.0.0.1:0"]
        argv += ["--ready-file", str(self.ready_file), "--grace", "5", *args]
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.address = ""

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}:\n{self.log()}")
            if self.ready_file.exists():
                self.address = self.ready_file.read_text().strip()
                return self.address
            time.sleep(0.02)
        raise TimeoutError(f"{self.service} did not become ready:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def health_status(address: str, service: str = "") -> int:
    """The grpc.health.v1 status of ``address``; -1 if it cannot be reached."""
    with grpc.insecure_channel(address) as channel:
        stub: object = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)  # type: ignore[attr-defined]
        except grpc.RpcError:
            return -1
        return int(resp.status)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append(int(entry.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


class Up:
    """`dispatchd up` as a child process, with its output captured line by line."""

    def __init__(self, tmp: Path, *extra: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http = f"127.0.0.1:{free_port()}"
        self.data = tmp / "data"
        self.lines: list[str] = []
        argv = [
            sys.executable,
            "-m",
            "dispatch.cli",
            "up",
            "--listen",
            self.address,
            "--http-listen",
            self.http,
        ]
        argv += ["--data-dir", str(self.data), "--grace", "5", *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def api_key(self) -> str:
        return (self.data / "api_key").read_text().strip()

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                self._reader.join(5)  # the last lines
                raise AssertionError(f"dispatchd up exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output()}")

    def services(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for pid in children_of(self.proc.pid):
            words = cmdline(pid).split()
            for name in ("store", "exec", "kernel", "transport"):
                if name in words:
                    found[name] = pid
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
