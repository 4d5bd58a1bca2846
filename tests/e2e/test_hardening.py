"""What a new user hits in the first hour, through real processes: an address in use, a
settings mistake, a restart with another workspace, and stopping with streams open."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from dispatch_client import DispatchClient
from tests.e2e.procs import ServiceProcess, Up, free_port

pytestmark = pytest.mark.e2e


def dispatchd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_a_second_up_on_the_same_address_is_refused(tmp_path: Path) -> None:
    first = Up(tmp_path / "a")
    try:
        first.wait_for("Dispatch is up")
        # The same transport address, and (with another transport address) the same HTTP one.
        taken = dispatchd("up", "--data-dir", str(tmp_path / "b"), "--listen", first.address)
        assert taken.returncode == 2
        line = one_line(taken.stderr)
        assert f"cannot listen on {first.address}" in line and "already in use" in line
        assert "--listen" in line
        free = f"127.0.0.1:{free_port()}"
        args = ("up", "--data-dir", str(tmp_path / "b"), "--listen", free, "--http-listen", first.http)
        http = dispatchd(*args)
        assert http.returncode == 2
        assert "already in use" in one_line(http.stderr) and "--http-listen" in http.stderr
        # Nothing of the refused stacks started: the first one is still the only one answering.
        assert not (tmp_path / "b" / "api_key").exists()
    finally:
        assert first.stop() == 0


def test_a_second_store_on_the_same_port_is_refused(tmp_path: Path) -> None:
    store = ServiceProcess("store", ["--database-url", f"sqlite:///{tmp_path / 'one.db'}"], tmp_path)
    try:
        address = store.wait_ready()
        second = dispatchd("store", "--listen", address, "--database-url", f"sqlite:///{tmp_path / 'two.db'}")
        assert second.returncode == 2
        line = one_line(second.stderr)
        assert "already in use" in line and "--listen" in line
        assert not (tmp_path / "two.db").exists()  # refused before opening a database
    finally:
        store.terminate()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("transport", "--kernel", "k:1", "--store", "s:1", "--listen", "127.0.0.1:99999"), "0 to 65535"),
        (("store", "--listen", "localhost:abc"), "0 to 65535"),
        (("exec", "--listen", "7600"), "host:port"),
        (("store", "--log-level", "LOUD"), "not a log level"),
        (("store", "--grace", "-5"), "0 or more seconds"),
        (("up", "--workspace", "/no/such/dir"), "does not exist"),
        (("up", "--model", "gpt-x"), "OPENAI_API_KEY is not set"),
    ],
)
def test_bad_flags_get_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    if args[0] == "up":
        args = (*args, "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}")
    result = dispatchd(*args)
    assert result.returncode == 2
    assert words in one_line(result.stderr)


def test_an_unknown_config_key_is_refused_naming_the_nearest(tmp_path: Path) -> None:
    config = tmp_path / "dispatch.toml"
    config.write_text('[kernal]\nmax_steps = 3\n[provider]\nmodle = "x"\n')
    result = dispatchd("up", "--config", str(config), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "unknown section [kernal]; did you mean [kernel]?" in one_line(result.stderr)


def _list_dir_root(up: Up) -> str:
    async def turn() -> str:
        async with DispatchClient(up.address, api_key=up.api_key()) as client:
            conv = await client.create_conversation()
            async for event in client.run_turn(conv.id, "what is here?"):
                if event.HasField("tool_result") and event.tool_result.name == "list_dir":
                    return event.tool_result.content
        raise AssertionError("no list_dir result")

    return asyncio.run(turn())


def test_workspace_applies_on_every_start(tmp_path: Path) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    for root, name in ((a, "only-in-a.txt"), (b, "only-in-b.txt")):
        root.mkdir()
        (root / name).write_text("x\n")
    data = ["--data-dir", str(tmp_path / "data")]
    first = Up(tmp_path, *data, "--workspace", str(a))
    try:
        first.wait_for("Dispatch is up")
        assert f"workspace: {a}" in first.output()
        assert "only-in-a.txt" in _list_dir_root(first)
    finally:
        assert first.stop() == 0
    second = Up(tmp_path, *data, "--workspace", str(b))
    try:
        second.wait_for("Dispatch is up")
        assert f"workspace: {b}" in second.output()
        listed = _list_dir_root(second)
        assert "only-in-b.txt" in listed and "only-in-a.txt" not in listed
    finally:
        assert second.stop() == 0
    # No flag: the root in use is kept, and the banner says which it is.
    third = Up(tmp_path, *data)
    try:
        third.wait_for("Dispatch is up")
        assert f"workspace: {b}" in third.output()
    finally:
        assert third.stop() == 0


def test_the_banner_chat_hint_works_as_printed_from_elsewhere(tmp_path: Path) -> None:
    up = Up(tmp_path, "--data-dir", str(tmp_path / "custom-data"))
    try:
        up.wait_for("Ctrl-C stops")
        hint = next(line for line in up.lines if " chat --address " in line).strip()
        assert f"--data-dir {tmp_path / 'custom-data'}" in hint
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        chat = subprocess.run(
            hint,  # exactly as printed
            shell=True,
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert chat.returncode == 0, chat.stderr
        assert "— stop" in chat.stdout
    finally:
        assert up.stop() == 0


GRACE = 20.0


def test_stopping_ends_open_streams_at_once_and_up_within_one_grace(tmp_path: Path) -> None:
    up = Up(tmp_path, "--grace", str(GRACE))
    up.wait_for("Dispatch is up")
    statuses: list[tuple[grpc.StatusCode, str]] = []
    subscribed = asyncio.Event()

    async def follow(conv: str, client: DispatchClient) -> None:
        from dispatch_client._proto import transport_pb2, transport_pb2_grpc

        stub = transport_pb2_grpc.DispatchStub(client._channel)
        call = stub.Subscribe(
            transport_pb2.SubscribeRequest(conversation_id=conv),
            metadata=(("authorization", f"Bearer {up.api_key()}"),),
        )
        try:
            async for response in call:
                if response.events:
                    subscribed.set()
        except grpc.aio.AioRpcError as exc:
            statuses.append((exc.code(), exc.details() or ""))

    async def scenario() -> None:
        async with DispatchClient(up.address, api_key=up.api_key()) as client:
            conv = await client.create_conversation()
            async for _ in client.run_turn(conv.id, "hello"):
                pass
            streams = [asyncio.create_task(follow(conv.id, client)) for _ in range(3)]
            await asyncio.wait_for(subscribed.wait(), 30)
            up.proc.send_signal(signal.SIGTERM)
            # They end at once; within the grace is the bound the old behaviour missed.
            await asyncio.wait_for(asyncio.gather(*streams), GRACE)

    asyncio.run(scenario())
    code = up.stop()  # waits for the exit
    assert code == 0, up.output()
    # Each stream ended with the status that says: subscribe again, from here.
    assert len(statuses) == 3
    for status, details in statuses:
        assert status == grpc.StatusCode.UNAVAILABLE
        # The transport's own drain, or its kernel's (they stop together), said it first.
        assert "subscribe again with after_event_seq=" in details
        assert "Cancelling all calls" not in details
    assert "did not finish within" not in up.output() and "killing it" not in up.output()


def test_an_idle_transport_stops_without_waiting_out_its_grace(tmp_path: Path) -> None:
    args = ["--kernel", "127.0.0.1:1", "--store", "127.0.0.1:1", "--grace", "60"]
    proc = ServiceProcess("transport", args, tmp_path)
    proc.wait_ready()
    proc.proc.send_signal(signal.SIGTERM)
    # Nothing to drain: stopping must not wait out any of the grace.
    assert proc.proc.wait(timeout=30) == 0
    assert "drain did not finish" not in proc.log()
    proc.terminate()


def test_the_http_bridge_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = dispatchd(
            "transport",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            f"127.0.0.1:{port}",
            "--kernel",
            "k:1",
            "--store",
            "s:1",
        )
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "already in use" in line and "--http-listen" in line


def test_dispatchd_has_a_version() -> None:
    import dispatch

    result = dispatchd("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"dispatchd {dispatch.__version__}")


@pytest.mark.parametrize(
    "permissions, words",
    [
        ('shel = "ask"', "config key kernel.permissions.shel: no tool 'shel'; did you mean 'shell'?"),
        ('shell = "maybe"', "config key kernel.permissions.shell must be allow, ask or deny, got 'maybe'"),
        ('shell = { "" = "ask" }', 'config key kernel.permissions.shell."": an empty pattern'),
    ],
)
def test_a_bad_permission_rule_is_refused_at_start_naming_its_key(
    tmp_path: Path, permissions: str, words: str
) -> None:
    config = tmp_path / "dispatch.toml"
    config.write_text(f"[kernel.permissions]\n{permissions}\n")
    result = dispatchd(
        "up", "--config", str(config), "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}"
    )
    assert result.returncode == 2, result.stderr
    assert words in one_line(result.stderr)
