"""The test suite's sshd is a real OpenSSH server: the `ssh` client and asyncssh
reach it through the generated ssh_config's Host alias, with the generated keys."""

from __future__ import annotations

import asyncio
import subprocess

import asyncssh
import pytest

from tests.sshd import ALIAS, SshServer


def test_openssh_client_runs_a_command_through_the_alias(sshd: SshServer) -> None:
    result = subprocess.run(
        ["ssh", "-F", str(sshd.config), "-o", "BatchMode=yes", ALIAS, "echo", "hello from", "$USER"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello from {sshd.user}\n"


async def test_asyncssh_multiplexes_channels_on_one_connection(sshd: SshServer) -> None:
    async with asyncssh.connect(ALIAS, config=[str(sshd.config)]) as conn:
        results = await asyncio.gather(*(conn.run(f"echo {i}; exit {i % 3}") for i in range(10)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(10)]
    assert [r.exit_status for r in results] == [i % 3 for i in range(10)]


async def test_an_unknown_host_key_is_refused(sshd: SshServer) -> None:
    sshd.known_hosts.write_text("")
    try:
        with pytest.raises((asyncssh.HostKeyNotVerifiable, asyncssh.DisconnectError)):
            await asyncssh.connect(ALIAS, config=[str(sshd.config)])
    finally:
        host_pub = sshd.host_key.with_suffix(".pub").read_text().split()
        sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {host_pub[0]} {host_pub[1]}\n")
