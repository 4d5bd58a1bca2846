"""A real OpenSSH server for tests: generated host and user keys, a free
loopback port, and an ssh_config whose Host alias points at it.

sshd comes from Debian's openssh-server, which `make test` installs
(scripts/ensure-system-deps.sh). The server runs as the current user on an
unprivileged port; the login user gets in with a key generated for the session.

Who logs in: as root, the dedicated user ``dispatch-test`` (created with
``useradd`` on first use), whose login shell is bash and whose start-up files
this module writes. They print to stdout and to stderr, with and without a
trailing newline, as real hosts' start-up files do (banners, pyenv warnings), so
every test over SSH runs against a chatty login and nothing depends on root's
own dotfiles. Run as anyone else, sshd can only log in as that same user, whose
start-up files are their own: the suite still passes, and the tests that need to
know exactly what the login prints skip (``SshServer.startup`` is None).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.e2e.procs import free_port

SSHD = "/usr/sbin/sshd"
# Where useradd lives: /usr/sbin, which a clean environment's PATH (CI's) does not hold.
USERADD = shutil.which("useradd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "/usr/sbin/useradd"
ALIAS = "testbox"
TEST_USER = "dispatch-test"

# The test user's start-up files. Debian's bash, started by sshd to run a command,
# reads ~/.bashrc (and the quiet /etc/bash.bashrc); a login shell would read
# ~/.bash_profile, and sh's would read ~/.profile.
STARTUP_FILES = {
    ".bashrc": (
        "# Written by tests/sshd.py: a login that talks, as real hosts' do.\n"
        "echo 'bashrc: a banner on stdout'\n"
        "echo 'bashrc: a warning on stderr' >&2\n"
        "printf 'bashrc: no newline on stdout'\n"
        "printf 'bashrc: no newline on stderr' >&2\n"
    ),
    ".bash_profile": (
        "# Written by tests/sshd.py.\n"
        "echo 'bash_profile: on stdout'\n"
        "printf 'bash_profile: on stderr, no newline' >&2\n"
        '. "$HOME/.bashrc"\n'
    ),
    ".profile": (
        "# Written by tests/sshd.py.\n"
        "printf 'profile: on stdout, no newline'\n"
        "echo 'profile: on stderr' >&2\n"
    ),
}
# What an exec channel carries before its command's output, on stdout and on stderr.
STARTUP_STDOUT = b"bashrc: a banner on stdout\nbashrc: no newline on stdout"
STARTUP_STDERR = b"bashrc: a warning on stderr\nbashrc: no newline on stderr"


def ensure_user(name: str, shell: str) -> pwd.struct_passwd:
    """The local user ``name``, created first if missing: a system user with no password,
    ``shell`` as its login shell and a home under /var/lib. Needs root."""
    with contextlib.suppress(KeyError):
        return _with_shell(pwd.getpwnam(name), shell)
    created = subprocess.run(
        [
            USERADD,
            "--system",
            "--password",
            "*",
            "--create-home",
            "--home-dir",
            f"/var/lib/{name}",
            "--shell",
            shell,
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # 9: the name is taken, by another test session creating it at the same time.
    if created.returncode not in (0, 9):
        raise RuntimeError(f"useradd {name} failed ({created.returncode}): {created.stderr.strip()}")
    return _with_shell(pwd.getpwnam(name), shell)


def _with_shell(user: pwd.struct_passwd, shell: str) -> pwd.struct_passwd:
    if user.pw_shell != shell:
        raise RuntimeError(f"user {user.pw_name!r} exists with the shell {user.pw_shell}, not {shell}")
    return user


def write_startup_files(home: Path) -> None:
    """Write ``STARTUP_FILES`` into ``home``, each replaced in one rename: concurrent test
    sessions write the same files, and a shell starting meanwhile reads a whole one."""
    for name, text in STARTUP_FILES.items():
        tmp = home / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(home / name)


def login_user() -> tuple[str, tuple[bytes, bytes] | None]:
    """Who the test sshd logs in as, and what that login prints before a command's output
    (stdout, stderr), when this module wrote its start-up files (see the module docstring)."""
    if os.geteuid() != 0:
        return getpass.getuser(), None
    user = ensure_user(TEST_USER, "/bin/bash")
    write_startup_files(Path(user.pw_dir))
    return TEST_USER, (STARTUP_STDOUT, STARTUP_STDERR)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


class SshServer:
    """One sshd, reachable as the Host alias ``testbox``."""

    def __init__(
        self,
        root: Path | None = None,
        user: str = "",
        *,
        startup: tuple[bytes, bytes] | None = None,
        sftp_subsystem: bool = True,
        force_command: str = "",
    ):
        """``root``: where keys, configs and work directories go (default: a new temporary
        directory; another user must be able to reach it, so not under pytest's private
        tmp root). ``user``: who logs in (default: the current user); another user needs
        sshd to run as root. ``startup``: what that login prints before a command's output
        on (stdout, stderr), if known. ``sftp_subsystem=False``: no ``sftp`` subsystem, as
        on a host that disabled it. ``force_command``: sshd's ForceCommand (the client's
        command is in ``$SSH_ORIGINAL_COMMAND``), to play a host with odd start-up."""
        self.root = (root or Path(tempfile.mkdtemp(prefix="dispatch-sshd-"))).resolve()
        self.sftp_subsystem = sftp_subsystem
        self.force_command = force_command
        self.port = free_port()
        self.user = user or getpass.getuser()
        self.startup = startup
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.user_key = self.root / "id_ed25519"
        self.config = self.root / "ssh_config"
        self.known_hosts = self.root / "known_hosts"
        self.proc: subprocess.Popen[bytes] | None = None

    def workdir(self) -> Path:
        """A new empty directory (symlinks resolved) that the login user owns and this process
        can use too: the files a test hands to the remote side."""
        path = Path(tempfile.mkdtemp(prefix="work-", dir=self.root))
        if self.user != getpass.getuser():
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

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
                    f"ForceCommand {self.force_command}" if self.force_command else "",
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
