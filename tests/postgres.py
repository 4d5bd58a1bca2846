"""A real PostgreSQL server for tests: initdb in a temporary directory, a free
loopback port, stopped at the end of the session.

The server binaries come from Debian's package, which `make test` installs
(scripts/ensure-system-deps.sh). PostgreSQL refuses to run as root, so when
the tests run as root the server runs as the package's `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.e2e.procs import free_port

USER = "dispatch"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: run `make test` (it installs it) or apt-get install postgresql"
        )
    return Path(found[-1]).parent


class PostgresServer:
    """One server for the test session; each test takes a fresh database from it."""

    def __init__(self, root: Path):
        self.bin = _bin_dir()
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # As root, run the server as the package's `postgres` user (and none of root's groups).
        run_as = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._run_as = run_as
        self._uid = run_as.pw_uid if run_as else None
        self._gid = run_as.pw_gid if run_as else None
        self._groups: list[int] | None = [] if run_as else None

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            argv, check=False, capture_output=True, user=self._uid, group=self._gid, extra_groups=self._groups
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.decode(errors='replace')}")

    def start(self) -> PostgresServer:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        log = (self.root / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._uid,
            group=self._gid,
            extra_groups=self._groups,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL did not start:\n{(self.root / 'server.log').read_text(errors='replace')}"
                    ) from None
                time.sleep(0.05)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database, dropped afterwards; yields its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: PostgreSQL's smart shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
