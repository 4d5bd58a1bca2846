"""The SSH backend's own concerns: the login's start-up output and the spawn's marker.

The exec channel's streams carry whatever the login's shell start-up prints, then
the marker lines the spawn's command prints first, then the command's output
(``dispatch.exec.ssh``). The first tests feed an exec channel's session by hand,
cut at every byte; the rest run spawns through real sshds whose logins print, or
whose ForceCommand plays a host with stranger start-up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterable

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.exec.backend import Exit, OutputBatch, SpawnEvent, Stream
from dispatch.exec.ssh import STARTUP_BYTES, SSHBackend, _Session
from dispatch.shared.config import ExecConfig
from tests.sshd import ALIAS, SshServer

MARKER = "__DISPATCH_START_0123456789abcdef__"
STDOUT_LINE = f"{MARKER}\n".encode()
STDERR_LINE = f"{MARKER} 4242\n".encode()
Feed = list[tuple[Stream, bytes]]


def _datatype(stream: Stream) -> asyncssh.DataType:
    return asyncssh.EXTENDED_DATA_STDERR if stream is Stream.STDERR else None


def _drain(session: _Session) -> tuple[bytes, bytes, bool]:
    """What the session queued so far, per stream, and whether it ended."""
    out = {Stream.STDOUT: b"", Stream.STDERR: b""}
    ended = False
    while not session.queue.empty():
        item = session.queue.get_nowait()
        if item is None:
            ended = True
        else:
            out[item[0]] += item[1]
    return out[Stream.STDOUT], out[Stream.STDERR], ended


async def _session(
    feed: Iterable[tuple[Stream, bytes]], *, close: bool = True
) -> tuple[_Session, bytes, bytes]:
    session = _Session(MARKER)
    for stream, data in feed:
        session.data_received(data, _datatype(stream))
    if close:
        session.connection_lost(None)
    stdout, stderr, ended = _drain(session)
    assert ended == close
    return session, stdout, stderr


def _bytewise(stream: Stream, data: bytes) -> Feed:
    return [(stream, data[i : i + 1]) for i in range(len(data))]


STARTUP = [
    pytest.param(b"", b"", id="quiet"),
    pytest.param(b"banner\n", b"pyenv: cannot rehash: /root/.pyenv/shims isn't writable\n", id="lines"),
    pytest.param(b"no newline", b"no newline either", id="mid-line"),
    pytest.param(b"a\nb\r\nc", b"\n\n", id="mixed"),
    # What looks like the start of a marker, and markers of other spawns, are start-up output too.
    pytest.param(b"__DISPATCH_START_", b"__DISPATCH_START_feedfacefeedface__ 1\n__DISP", id="lookalikes"),
    pytest.param(b"x" * (STARTUP_BYTES - 10), b"y" * (STARTUP_BYTES // 2), id="near-the-bound"),
]


@pytest.mark.parametrize(("stdout_startup", "stderr_startup"), STARTUP)
@pytest.mark.parametrize("cut", ["whole", "bytewise"])
async def test_start_up_output_and_the_marker_lines_are_taken_out(
    stdout_startup: bytes, stderr_startup: bytes, cut: str
) -> None:
    stdout = stdout_startup + STDOUT_LINE + b"the command's\nstdout"
    stderr = stderr_startup + STDERR_LINE + b"its stderr\n"
    if cut == "whole" or len(stdout) + len(stderr) > 4096:
        feed = [(Stream.STDOUT, stdout), (Stream.STDERR, stderr)]
    else:  # interleaved a byte at a time: the marker arrives cut at every point
        out, err = _bytewise(Stream.STDOUT, stdout), _bytewise(Stream.STDERR, stderr)
        feed = [item for pair in zip(out, err, strict=False) for item in pair]
        feed += out[len(err) :] + err[len(out) :]
    session, got_out, got_err = await _session(feed)
    assert (got_out, got_err) == (b"the command's\nstdout", b"its stderr\n")
    assert session.pgid == 4242


@settings(max_examples=200, deadline=None)
@given(
    startup=st.binary(max_size=200),
    output=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=8),
)
def test_any_start_up_output_cut_anywhere_leaves_exactly_the_command_s_output(
    startup: bytes, output: bytes, cuts: list[int]
) -> None:
    async def run() -> tuple[bytes, bytes]:
        data = startup + STDERR_LINE + output
        points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
        feed = [(Stream.STDERR, data[a:b]) for a, b in itertools.pairwise(points)]
        session, got_out, got_err = await _session(feed)
        assert session.pgid == 4242
        return got_out, got_err

    assert asyncio.run(run()) == (b"", output)


async def test_output_before_a_marker_goes_on_past_the_bound_and_the_marker_still_never() -> None:
    session = _Session(MARKER)
    chunk = b"s" * 4096
    fed = 0
    got = {Stream.STDOUT: b"", Stream.STDERR: b""}
    while fed < 4 * STARTUP_BYTES:
        session.data_received(chunk, asyncssh.EXTENDED_DATA_STDERR)
        session.data_received(chunk, None)
        fed += len(chunk)
        stdout, stderr, _ = _drain(session)
        got[Stream.STDOUT] += stdout
        got[Stream.STDERR] += stderr
        # Held back: the bound's worth at most (and what may be a marker's start); the rest went on.
        assert all(fed - len(out) <= STARTUP_BYTES + len(MARKER) for out in got.values())
    assert session.pgid_known.is_set()  # a kill must not wait for a group that may never be told
    assert session.pgid is None
    session.data_received(STDOUT_LINE[:5], None)
    session.data_received(STDOUT_LINE[5:] + b"out", None)
    session.data_received(STDERR_LINE[:5], asyncssh.EXTENDED_DATA_STDERR)
    session.data_received(STDERR_LINE[5:] + b"err", asyncssh.EXTENDED_DATA_STDERR)
    session.connection_lost(None)
    stdout, stderr, ended = _drain(session)
    assert ended
    # All the start-up output went on (it ran past the bound), then the command's; no marker.
    assert got[Stream.STDOUT] + stdout == b"s" * fed + b"out"
    assert got[Stream.STDERR] + stderr == b"s" * fed + b"err"
    assert session.pgid == 4242


@pytest.mark.parametrize(
    ("feed", "expected"),
    [
        # A host that never runs the command: its output is all there is.
        pytest.param(
            [(Stream.STDOUT, b"forced\n"), (Stream.STDERR, b"no marker here")],
            (b"forced\n", b"no marker here", None),
            id="no-marker",
        ),
        # The channel closes in the middle of the marker line: still not passed on.
        pytest.param(
            [(Stream.STDOUT, b"hi" + STDOUT_LINE[:-1]), (Stream.STDERR, b"warn" + STDERR_LINE[:-3])],
            (b"", b"", 42),
            id="cut-marker-line",
        ),
        # Something wrote into the marker's line: the marker goes, what follows it stays.
        pytest.param(
            [(Stream.STDERR, MARKER.encode() + b"x" * 100 + b"\nerr")],
            (b"", b"x" * 100 + b"\nerr", None),
            id="overlong-marker-line",
        ),
        # A part of the marker is not the marker: it is output.
        pytest.param(
            [(Stream.STDOUT, b"out" + MARKER.encode()[:10])],
            (b"out" + MARKER.encode()[:10], b"", None),
            id="marker-prefix",
        ),
    ],
)
async def test_what_is_held_back_goes_on_when_the_channel_closes(
    feed: Feed, expected: tuple[bytes, bytes, int | None]
) -> None:
    session, stdout, stderr = await _session(feed)
    assert (stdout, stderr, session.pgid) == expected
    assert session.pgid_known.is_set()


async def test_giving_up_on_the_markers_passes_on_what_is_held_and_still_takes_a_late_marker_out() -> None:
    partial = MARKER.encode()[:7]
    session, stdout, stderr = await _session(
        [(Stream.STDOUT, b"forced" + partial), (Stream.STDERR, STDERR_LINE + b"err")], close=False
    )
    assert (stdout, stderr) == (b"", b"err")
    assert session.pgid == 4242
    assert session.give_up()  # the command exited, the output went quiet: no more holding back
    assert _drain(session) == (b"forced", b"", False)  # what may begin a marker waits
    assert not session.give_up()  # nothing more to pass on
    session.data_received(MARKER.encode()[7:] + b"\nlate", None)
    session.data_received(b"\nmore", None)
    session.connection_lost(None)
    assert _drain(session) == (b"late\nmore", b"", True)


async def test_start_up_output_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dispatch.exec.ssh"):
        await _session([(Stream.STDERR, b"pyenv: cannot rehash\n" + STDERR_LINE)])
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "pyenv: cannot rehash" in caplog.records[0].getMessage()


# ------------------------------------------------------------------ through a real sshd


async def _events(
    backend: SSHBackend,
    argv: list[str],
    timeout: float = 0.0,  # noqa: ASYNC109 - the spawn's own timeout
    max_output_bytes: int = 0,
) -> list[SpawnEvent]:
    return [e async for e in backend.spawn(argv, timeout=timeout, max_output_bytes=max_output_bytes)]


def _outputs(events: list[SpawnEvent]) -> tuple[bytes, bytes]:
    out = {Stream.STDOUT: b"", Stream.STDERR: b""}
    for event in events:
        if isinstance(event, OutputBatch):
            for chunk in event.chunks:
                assert b"__DISPATCH_START_" not in chunk.data  # no marker, nor a piece of one
                out[chunk.stream] += chunk.data
    return out[Stream.STDOUT], out[Stream.STDERR]


def _startup(sshd: SshServer) -> tuple[bytes, bytes]:
    if sshd.startup is None:
        pytest.skip("needs root: the test sshd logs in as the current user, whose start-up output is theirs")
    return sshd.startup


@pytest.fixture
async def backend(sshd: SshServer) -> AsyncIterator[SSHBackend]:
    backend = SSHBackend(ALIAS, ExecConfig(), str(sshd.config))
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("true", (b"", b"")),
        ("printf out", (b"out", b"")),
        ("printf err >&2", (b"", b"err")),
        ("echo out; echo err >&2", (b"out\n", b"err\n")),
    ],
)
async def test_a_chatty_login_s_start_up_output_never_reaches_the_caller(
    sshd: SshServer, backend: SSHBackend, line: str, expected: tuple[bytes, bytes]
) -> None:
    startup_out, startup_err = _startup(sshd)
    conn = await backend.connection()
    raw = await conn.run(line, encoding=None)  # the same command on a bare channel
    assert (raw.stdout, raw.stderr) == (startup_out + expected[0], startup_err + expected[1])
    events = await _events(backend, ["sh", "-c", line])
    assert _outputs(events) == expected
    assert isinstance(events[-1], Exit) and events[-1].exit_code == 0


async def _group_alive(backend: SSHBackend, pgid: int) -> bool:
    events = await _events(backend, ["sh", "-c", f"kill -0 -{pgid} 2>/dev/null && echo alive; true"])
    return _outputs(events)[0] == b"alive\n"


@pytest.mark.timeout(30)
async def test_a_chatty_login_s_spawns_still_die_by_group_on_timeout_and_cancel(
    sshd: SshServer, backend: SSHBackend
) -> None:
    _startup(sshd)
    events = await _events(backend, ["sh", "-c", "sleep 100 & echo $$; sleep 100"], timeout=0.5)
    exit_ = events[-1]
    assert isinstance(exit_, Exit) and exit_.timed_out
    pgid = int(_outputs(events)[0])
    assert await _until_empty(backend, pgid)

    spawn = backend.spawn(["sh", "-c", "sleep 100 & echo $$; wait"])
    first = await anext(spawn)
    assert isinstance(first, OutputBatch)
    pgid = int(first.chunks[0].data)
    assert await _group_alive(backend, pgid)
    await spawn.aclose()  # the caller goes away
    assert await _until_empty(backend, pgid)


async def _until_empty(backend: SSHBackend, pgid: int, within: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while await _group_alive(backend, pgid):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.fixture
async def odd_host(request: pytest.FixtureRequest, sshd: SshServer) -> AsyncIterator[SSHBackend]:
    """A backend on a second sshd, whose ForceCommand is the test's parameter."""
    server = SshServer(user=sshd.user, startup=sshd.startup, force_command=request.param).start()
    backend = SSHBackend(ALIAS, ExecConfig(max_output_bytes=1000), str(server.config))
    try:
        yield backend
    finally:
        await backend.aclose()
        server.stop()


STARTS_LONG = "head -c 100000 /dev/zero | tr '\\0' x; printf 'long start' >&2; eval \"$SSH_ORIGINAL_COMMAND\""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("odd_host", [STARTS_LONG], indirect=True)
async def test_start_up_output_past_the_bound_goes_on_and_the_group_is_still_killed(
    sshd: SshServer, odd_host: SSHBackend, backend: SSHBackend
) -> None:
    startup_out, _ = _startup(sshd)
    events = await _events(odd_host, ["sh", "-c", "echo out; echo err >&2"], max_output_bytes=1 << 20)
    # stdout's start-up output ran past the bound, so it went on; stderr's did not.
    assert _outputs(events) == (startup_out + b"x" * 100000 + b"out\n", b"err\n")
    events = await _events(
        odd_host, ["sh", "-c", "sleep 100 & echo $$; sleep 100"], timeout=0.5, max_output_bytes=1 << 20
    )
    stdout, _ = _outputs(events)
    exit_ = events[-1]
    assert isinstance(exit_, Exit) and exit_.timed_out
    pgid = int(stdout.removeprefix(startup_out + b"x" * 100000))
    assert await _until_empty(backend, pgid)  # asked on the plain host: the same machine and user


@pytest.mark.parametrize(
    ("odd_host", "stderr"),
    [
        ("echo forced; echo forced-err >&2", b"forced-err\n"),
        # A background job holds the output open past the exit: the call ends without an EOF.
        ("echo forced; sleep 2 &", b""),
    ],
    indirect=["odd_host"],
)
async def test_a_host_that_never_runs_the_command_answers_with_its_output(
    sshd: SshServer, odd_host: SSHBackend, stderr: bytes
) -> None:
    startup_out, startup_err = _startup(sshd)
    events = await _events(odd_host, ["sh", "-c", "echo never"])
    # No marker ever came: nothing tells start-up output from the rest, so all of it goes on.
    assert _outputs(events) == (startup_out + b"forced\n", startup_err + stderr)
    assert isinstance(events[-1], Exit) and events[-1].exit_code == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("odd_host", ["yes"], indirect=True)
async def test_start_up_output_that_never_ends_goes_on_and_the_timeout_still_ends_the_call(
    sshd: SshServer, odd_host: SSHBackend
) -> None:
    startup_out, _ = _startup(sshd)
    events = await _events(odd_host, ["true"], timeout=0.5)
    exit_ = events[-1]
    assert isinstance(exit_, Exit) and exit_.timed_out and exit_.truncated
    assert _outputs(events)[0] == (startup_out + b"y\n" * 1000)[:1000]
