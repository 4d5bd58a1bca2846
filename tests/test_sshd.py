"""The test suite's sshd is a real OpenSSH server: the `ssh` client and asyncssh
reach it through the generated ssh_config's Host alias, with the generated keys.
As root it logs in as a dedicated user whose start-up files print."""

from __future__ import annotations

import asyncio
import getpass
import os
import subprocess

import asyncssh
import pytest

from tests.sshd import ALIAS, STARTUP_STDERR, STARTUP_STDOUT, TEST_USER, SshServer


def test_openssh_client_runs_a_command_through_the_alias(sshd: SshServer) -> None:
    result = subprocess.run(
        ["ssh", "-F", str(sshd.config), "-o", "BatchMode=yes", ALIAS, "echo", "hello from", "$USER"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"hello from {sshd.user}\n")


def test_the_login_is_a_dedicated_user_as_root_and_the_current_user_otherwise(sshd: SshServer) -> None:
    if os.geteuid() == 0:
        assert sshd.user == TEST_USER
        assert sshd.startup == (STARTUP_STDOUT, STARTUP_STDERR)
    else:
        assert sshd.user == getpass.getuser()
        assert sshd.startup is None


async def test_the_login_prints_its_start_up_output_before_every_command(sshd: SshServer) -> None:
    if sshd.startup is None:
        pytest.skip("needs root: the test sshd logs in as the current user, whose start-up files are theirs")
    async with asyncssh.connect(ALIAS, config=[str(sshd.config)]) as conn:
        result = await conn.run("echo out; echo err >&2", encoding=None)
    assert (result.stdout, result.stderr) == (STARTUP_STDOUT + b"out\n", STARTUP_STDERR + b"err\n")


async def test_asyncssh_multiplexes_channels_on_one_connection(sshd: SshServer) -> None:
    async with asyncssh.connect(ALIAS, config=[str(sshd.config)]) as conn:
        results = await asyncio.gather(*(conn.run(f"echo {i}; exit {i % 3}") for i in range(10)))
    if sshd.startup is not None:  # else the login's own start-up output is unknown: look at the end
        outputs = [str(r.stdout).removeprefix(sshd.startup[0].decode()) for r in results]
    else:
        outputs = [str(r.stdout)[-2:] for r in results]
    assert outputs == [f"{i}\n" for i in range(10)]
    assert [r.exit_status for r in results] == [i % 3 for i in range(10)]


async def test_an_unknown_host_key_is_refused(sshd: SshServer) -> None:
    sshd.known_hosts.write_text("")
    try:
        with pytest.raises((asyncssh.HostKeyNotVerifiable, asyncssh.DisconnectError)):
            await asyncssh.connect(ALIAS, config=[str(sshd.config)])
    finally:
        host_pub = sshd.host_key.with_suffix(".pub").read_text().split()
        sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {host_pub[0]} {host_pub[1]}\n")
