"""A real OpenSSH server for tests: generated host and user keys, a free
loopback port, and an ssh_config whose Host alias points at it.

sshd comes from Debian's openssh-server, which `make test` installs
(scripts/ensure-system-deps.sh). The server runs as the current user on an
unprivileged port; the test user logs in with a key generated for the session.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.e2e.procs import free_port

SSHD = "/usr/sbin/sshd"
ALIAS = "testbox"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


class SshServer:
    """One sshd for the test session, reachable as the Host alias ``testbox``."""

    def __init__(self, root: Path, user: str = "", *, sftp_subsystem: bool = True):
        """``user``: who logs in (default: the current user). Another user needs sshd to run
        as root, and must be able to read ``root`` (it is opened to everyone).
        ``sftp_subsystem=False``: no ``sftp`` subsystem, as on a host that disabled it."""
        self.root = root
        self.sftp_subsystem = sftp_subsystem
        self.port = free_port()
        self.user = user or getpass.getuser()
        self.host_key = root / "ssh_host_ed25519_key"
        self.user_key = root / "id_ed25519"
        self.config = root / "ssh_config"
        self.known_hosts = root / "known_hosts"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SshServer:
        self.root.mkdir(parents=True, exist_ok=True)
        _keygen(self.host_key)
        _keygen(self.user_key)
        authorized = self.root / "authorized_keys"
        shutil.copy(self.user_key.with_suffix(".pub"), authorized)
        if self.user != getpass.getuser():
            # sshd reads authorized_keys as the user who logs in.
            self.root.chmod(0o755)
            authorized.chmod(0o644)
        if os.geteuid() == 0:
            # sshd's privilege separation wants this directory to exist.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd_config = self.root / "sshd_config"
        sshd_config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    # The keys live in a temporary directory, not a home.
                    "StrictModes no",
                    "UsePAM no",
                    f"AllowUsers {self.user}",
                    # The exec backend multiplexes many channels on one connection.
                    "MaxSessions 64",
                    # As a stock sshd does; without it the backend runs sftp-server itself.
                    "Subsystem sftp internal-sftp" if self.sftp_subsystem else "",
                    "MaxStartups 64:30:128",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.config.write_text(
            "\n".join(
                [
                    f"Host {ALIAS}",
                    "    HostName 127.0.0.1",
                    f"    Port {self.port}",
                    f"    User {self.user}",
                    f"    IdentityFile {self.user_key}",
                    "    IdentitiesOnly yes",
                    f"    UserKnownHostsFile {self.known_hosts}",
                    "    StrictHostKeyChecking yes",
                    "",
                ]
            )
        )
        log = (self.root / "sshd.log").open("wb")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(sshd_config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"sshd did not start:\n{(self.root / 'sshd.log').read_text(errors='replace')}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
