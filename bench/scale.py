"""Scale-out on PostgreSQL: two kernels and two transports against one of each, and failover.

Every service is its own process (``tests.faults.harness.Cluster``: ``dispatchd store``,
``exec``, each kernel, each transport, on fixed loopback ports), over a fresh database on
a throwaway PostgreSQL server (``tests.postgres.PostgresServer``), driven from this process
through the public transports with raw gRPC stubs.

Throughput: ``1x1`` is the ordinary single node (one kernel, one transport pointed at it
with ``--kernel host:port``); ``2x2`` is two kernels and two transports that find them
through the store (``--kernel store``). In each, C conversations each send turns back to
back (the next once the last is sealed): K ``list_dir`` steps through exec, then an
answer, from the scripted provider. Each conversation subscribes and sends through one
transport, round-robin; in 2x2 the conversations are picked so that each kernel is the
rendezvous home of half of them and each (kernel, transport) pair serves as many (with 8
conversations on 2 kernels, hashing alone splits them 7:1 one time in 16). After a
warm-up, the turns sealed in S seconds are counted; a turn's per-step cost is its wall
time (Send to turn_sealed) over its K + 1 steps. CPU comes from /proc/<pid>/stat of every
process (the services, PostgreSQL's server and backends, this client). Each round runs
both topologies, each on a fresh cluster and database, the order alternating, and the
ratio is 2x2 over 1x1 of the same round.

Failover: a 2x2 cluster with short leases (the harness's KernelSettings: lease_ttl 1 s,
sweep_interval 0.1 s). N times, on a new conversation: a long turn (steps of text, a
pause and a ``list_dir``); once a subscriber on each transport has its second step, after
a seeded random delay, the kernel holding the turn's lease gets SIGKILL. Measured from
the kill: when the store shows the turn claimed again (``attempts`` 2; also when the dead
kernel's lease ran out, its last ``lease_expires_at``), and when each subscriber receives
the first event of the resumed attempt (``events_lost`` or ``turn_resumed``). Then the
killed kernel is restarted, the turn cancelled, and the fault suite's checks
(``tests.faults.harness.check``) run on the conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatch.transport.kernels import SUSPECT_FOR, home
from dispatch.v1 import common_pb2, store_pb2, transport_pb2
from tests.faults.harness import (
    TENANT,
    TERMINAL,
    Cluster,
    Counts,
    KernelSettings,
    Recorder,
    Snapshots,
    call,
    check,
    list_turns,
    send,
    send_via_transport,
    sleep,
    state_name,
    text,
    until_ok,
    via_transport,
    write_script,
)
from tests.postgres import PostgresServer

TOPOLOGIES = {"1x1": (1, 1), "2x2": (2, 2)}
# How long a throughput turn may take to reach its subscriber's turn_sealed before the run fails.
SEAL_WITHIN = 30.0
ANSWER = "done"
# Throughput runs with the kernel's own defaults (lease_ttl 15 s, sweep_interval 5 s), so
# lease renewals cost what they cost in a deployment; failover with the harness's short leases.
THROUGHPUT_SETTINGS = KernelSettings(lease_ttl=15.0, sweep_interval=5.0, max_attempts=3)
FAILOVER_SETTINGS = KernelSettings()
# The long turn killed in: this many steps of words, a pause and a tool call.
FAILOVER_STEPS = 40
FAILOVER_PAUSE = 0.2
_TICK = os.sysconf("SC_CLK_TCK")


def _dirs(i: int) -> str:
    # Alternate directories: the same call three times in a row is a doom loop (default 3).
    return "a" if i % 2 else "b"


def throughput_script(k: int) -> list[list[dict[str, Any]]]:
    return [[call("list_dir", path=_dirs(i))] for i in range(k)] + [[text(ANSWER)]]


def failover_script() -> list[list[dict[str, Any]]]:
    steps = [
        [text(f"step {i} "), sleep(FAILOVER_PAUSE), call("list_dir", path=_dirs(i))]
        for i in range(FAILOVER_STEPS)
    ]
    return [*steps, [text(ANSWER)]]


# --------------------------------------------------------------------------- processes


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat); 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _processes(cluster: Cluster, server: PostgresServer) -> dict[int, str]:
    """Every process the measurement runs on, by pid: its group (store, kernel, ...)."""
    groups = {s.pid: s.kind for s in cluster.services if s.running}
    assert server.proc is not None
    groups[server.proc.pid] = "postgres"
    groups.update(dict.fromkeys(_children(server.proc.pid), "postgres"))
    groups[os.getpid()] = "client"
    return groups


def _cpu(pids: Sequence[int]) -> dict[int, float]:
    return {pid: _proc_cpu(pid) for pid in pids}


# Log lines worth reporting: what the services said at WARNING or above.
_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b")
_NUMBERS = re.compile(r"\b[a-z]+_[0-9a-z]{20,}\b|\d+(\.\d+)?")


@dataclass
class LogNotes:
    """Warning and error lines from the services' logs, counted by their shape."""

    lines: Counter[str] = field(default_factory=Counter)

    def read(self, cluster: Cluster) -> None:
        for service in cluster.services:
            for run in service.dirs:
                path = run / f"{service.kind}.log"
                if not path.exists():
                    continue
                for line in path.read_text(errors="replace").splitlines():
                    found = _LEVEL.search(line)
                    if found:
                        # From the level on, numbers as N: one kind of line counts once.
                        shape = _NUMBERS.sub("N", line[found.start() :])
                        self.lines[f"{service.kind}: {shape[:200]}"] += 1

    def report(self, what: str) -> None:
        if not self.lines:
            print(f"\n{what}: no service log line at WARNING or above")
            return
        print(f"\n{what}: service log lines at WARNING or above, by shape (numbers as N):")
        for line, count in self.lines.most_common(15):
            print(f"  {count:>5}  {line}")


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    # Under /tmp, not inside a private directory: as root, PostgresServer chowns this root to
    # the `postgres` user, who must be able to reach it.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="dispatch-bench-pg-"))).start()
    try:
        yield server
    finally:
        server.stop()


async def _start(
    tmp: Path, url: str, script: Path, settings: KernelSettings, *, kernels: int, transports: int
) -> Cluster:
    cluster = Cluster(tmp, url, [script] * kernels, settings, transports=transports)
    for name in ("a", "b"):
        (cluster.workspace / name).mkdir()
        (cluster.workspace / name / "file.txt").write_text("x\n")
    await cluster.start()
    await _until_advertised(cluster)
    return cluster


async def _until_advertised(cluster: Cluster) -> list[store_pb2.KernelInfo]:
    """Until the store lists exactly the running kernels (a killed one's row has run out)."""

    async def advertised() -> list[store_pb2.KernelInfo]:
        kernels = list(
            (await cluster.store_stub.ListKernels(store_pb2.ListKernelsRequest(), timeout=5)).kernels
        )
        running = {f"-{k.pid}-" for k in cluster.kernels if k.running}
        found = {tag for tag in running for k in kernels if tag in k.owner}
        if found != running or len(kernels) != len(running):
            raise AssertionError(
                f"{len(kernels)} kernel(s) advertised, {len(found)} of the {len(running)} running"
            )
        return kernels

    deadline = time.monotonic() + 30
    while True:
        try:
            return await until_ok("the kernels to advertise themselves", advertised)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- throughput


@dataclass
class Tally:
    steps: int = 0
    results: int = 0
    errors: int = 0
    state: int = 0
    sealed_at: float = 0.0


class Client:
    """One conversation: a subscription through its transport, and turns sent back to back."""

    def __init__(self, cluster: Cluster, conversation_id: str, transport: int, k: int):
        self.cluster = cluster
        self.transport = transport
        self.stub = cluster.transport_stub_of(transport)
        self.metadata = cluster.metadata
        self.conversation_id = conversation_id
        self.k = k
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.changed = asyncio.Event()
        self.turns: list[tuple[float, float]] = []  # (sent, sealed), perf_counter
        self.queued = 0
        self.reader: asyncio.Task[None] | None = None
        self.last_seq = 0
        self.stuck = ""

    async def _read(self) -> None:
        stream = self.stub.Subscribe(
            transport_pb2.SubscribeRequest(conversation_id=self.conversation_id), metadata=self.metadata
        )
        try:
            async for response in stream:
                if response.HasField("resync"):
                    raise RuntimeError(f"{self.conversation_id}: the subscription was told to resync")
                for event in response.events:
                    self.last_seq = max(self.last_seq, event.event_seq)
                    kind = event.WhichOneof("kind")
                    if kind == "tool_result":
                        tally = self.tallies[event.turn_id]
                        tally.results += 1
                        tally.errors += event.tool_result.is_error
                    elif kind == "turn_done":
                        self.tallies[event.turn_id].steps = event.turn_done.steps
                    elif kind == "turn_sealed":
                        tally = self.tallies[event.turn_id]
                        tally.state = event.turn_sealed.state
                        tally.sealed_at = time.perf_counter()
                        self.changed.set()
        finally:
            stream.cancel()
            self.changed.set()  # a turn waiting for its seal looks at why the stream ended
        raise RuntimeError(f"{self.conversation_id}: the subscription ended")

    async def run(self, stop: asyncio.Event) -> None:
        self.reader = asyncio.create_task(self._read())
        await asyncio.sleep(0)
        try:
            while not stop.is_set():
                began = time.perf_counter()
                sent = await self.stub.Send(
                    transport_pb2.SendRequest(conversation_id=self.conversation_id, text="go"),
                    metadata=self.metadata,
                    timeout=30,
                )
                self.queued += sent.queued
                tally = self.tallies[sent.turn_id]
                try:
                    async with asyncio.timeout(SEAL_WITHIN):
                        while not tally.sealed_at:
                            if self.reader.done():
                                self.reader.result()
                            self.changed.clear()
                            await self.changed.wait()
                except TimeoutError:
                    # Reported with the round's figures; this conversation sends no more.
                    self.stuck = await self._stuck(sent.turn_id)
                    return
                if (
                    tally.state != common_pb2.TURN_STATE_COMPLETED
                    or tally.steps != self.k + 1
                    or tally.results != self.k
                    or tally.errors
                ):
                    raise RuntimeError(
                        f"turn {sent.turn_id} did not run as scripted: state {tally.state}, steps "
                        f"{tally.steps} (want {self.k + 1}), tool results {tally.results} (want {self.k}), "
                        f"errors {tally.errors}"
                    )
                self.turns.append((began, tally.sealed_at))
                del self.tallies[sent.turn_id]
        finally:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader

    async def _stuck(self, turn_id: str) -> str:
        """What the store says of a turn whose seal the subscriber has not received."""
        store = self.cluster.store_stub
        turn = next((t for t in await list_turns(store, self.conversation_id) if t.id == turn_id), None)
        conv = await store.GetConversation(
            store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=self.conversation_id),
            timeout=10,
        )
        said = (
            f"{state_name(turn.state)}, attempts {turn.attempts}, lease {turn.lease_owner or '-'}"
            if turn is not None
            else "not found"
        )
        return (
            f"{self.conversation_id}: no turn_sealed of turn {turn_id} through transport "
            f"{self.transport + 1} in {SEAL_WITHIN:g} s; the store: turn {said}, last event_seq "
            f"{conv.last_event_seq}; the subscriber has events up to {self.last_seq}"
        )


@dataclass
class Sample:
    """One topology in one round."""

    topology: str
    turns_per_s: float
    steps_per_s: float
    step_us_p50: float
    step_us_p90: float
    cpu_cores: float  # CPU seconds per second of wall time, every process
    cpu_us_per_step: dict[str, float]  # by group
    split: str  # conversations per (kernel, transport)
    queued: int
    stuck: list[str]  # turns whose turn_sealed never reached their subscriber, and why


async def _conversations(cluster: Cluster, count: int) -> list[tuple[str, int]]:
    """``count`` conversations and the transport each uses: with one kernel, transports in
    turn; with several, as many homed on each kernel, and each kernel's spread over the
    transports in turn."""
    transports = len(cluster.transports)
    kernels = len(cluster.kernels)
    if kernels == 1:
        return [(await cluster.create_conversation(), i % transports) for i in range(count)]
    live = await _until_advertised(cluster)
    want = {k.owner: count // kernels + (i < count % kernels) for i, k in enumerate(live)}
    picked: dict[str, list[str]] = defaultdict(list)
    for _ in range(count * 50):
        if all(len(picked[o]) >= n for o, n in want.items()):
            break
        conv = await cluster.create_conversation()
        owner = home(conv, live).owner
        if len(picked[owner]) < want[owner]:
            picked[owner].append(conv)
    else:
        raise RuntimeError("could not pick conversations homed evenly on the kernels")
    return [
        (conv, (i + j) % transports) for j, owner in enumerate(want) for i, conv in enumerate(picked[owner])
    ]


async def measure(
    server: PostgresServer, root: Path, topology: str, args: argparse.Namespace, notes: LogNotes
) -> Sample:
    kernels, transports = TOPOLOGIES[topology]
    with server.database() as url:
        tmp = Path(tempfile.mkdtemp(prefix=f"{topology}-", dir=root))
        script = write_script(tmp / "script.json", throughput_script(args.steps))
        cluster = await _start(tmp, url, script, THROUGHPUT_SETTINGS, kernels=kernels, transports=transports)
        stop = asyncio.Event()
        clients: list[Client] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            placed = await _conversations(cluster, args.conversations)
            # Conversations per (kernel, transport): kernels in the store's order (oldest first).
            listed = await _until_advertised(cluster)
            index = {k.owner: i for i, k in enumerate(listed)}
            split = Counter((index[home(conv, listed).owner], t) for conv, t in placed)
            clients = [Client(cluster, conv, t, args.steps) for conv, t in placed]
            tasks = [asyncio.create_task(c.run(stop)) for c in clients]
            await _watch(tasks, args.warmup)
            pids = _processes(cluster, server)
            cpu_before = _cpu(list(pids))
            t0 = time.perf_counter()
            await _watch(tasks, args.seconds)
            t1 = time.perf_counter()
            pids = {**pids, **_processes(cluster, server)}  # backends that connected since
            cpu_after = _cpu(list(pids))
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await cluster.close()
            notes.read(cluster)
    seconds = t1 - t0
    done = [end for c in clients for _, end in c.turns if t0 <= end < t1]
    within = [
        (end - began) * 1e6 / (args.steps + 1)
        for c in clients
        for began, end in c.turns
        if began >= t0 and end < t1
    ]
    if not done or not within:
        raise RuntimeError(f"{topology}: no turn ran within the {seconds:.1f} s measured")
    steps = len(done) * (args.steps + 1)
    used: dict[str, float] = defaultdict(float)
    for pid, group in pids.items():
        used[group] += cpu_after.get(pid, 0.0) - cpu_before.get(pid, 0.0)
    return Sample(
        topology=topology,
        turns_per_s=len(done) / seconds,
        steps_per_s=steps / seconds,
        step_us_p50=statistics.median(within),
        step_us_p90=_quantile(within, 90),
        cpu_cores=sum(used.values()) / seconds,
        cpu_us_per_step={g: v * 1e6 / steps for g, v in used.items()},
        split=" ".join(f"k{k + 1}t{t + 1}:{n}" for (k, t), n in sorted(split.items())),
        queued=sum(c.queued for c in clients),
        stuck=[c.stuck for c in clients if c.stuck],
    )


async def _watch(tasks: Sequence[asyncio.Task[None]], seconds: float) -> None:
    """Wait ``seconds``, failing at once if a client fails (one that gave up on a stuck turn
    has returned, and is reported)."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()


def _quantile(values: Sequence[float], percent: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


# --------------------------------------------------------------------------- failover


@dataclass
class Kill:
    victim: str
    delay: float  # after the second step reached both subscribers
    lease_ran_out: float | None  # s after the kill: the dead kernel's last lease_expires_at
    claimed: float | None  # s after the kill: attempts went up in the store
    resumed: list[float | None]  # s after the kill, per subscriber (transport)
    state: str = ""
    problems: list[str] = field(default_factory=list)


async def _claim(
    cluster: Cluster, conv: str, turn_id: str, killed_at: float, wall: float
) -> tuple[float | None, float | None]:
    """Polls the store: seconds from the kill until the turn's attempts went up, and until
    the lease the dead kernel last held ran out."""
    expires: float | None = None
    deadline = killed_at + 30
    while time.monotonic() < deadline:
        for turn in await list_turns(cluster.store_stub, conv):
            if turn.id != turn_id:
                continue
            if turn.attempts >= 2:
                return time.monotonic() - killed_at, (expires - wall if expires is not None else None)
            if turn.lease_owner:
                expires = turn.lease_expires_at.ToNanoseconds() / 1e9
        await asyncio.sleep(0.01)
    return None, None


def _first_resumed(
    recorder: Recorder, conv: str, turn_id: str, before: int, killed_at: float
) -> float | None:
    """Seconds from the kill until this subscriber received the resumed attempt's first
    event: its events_lost (if any) or turn_resumed, and none of the first attempt's."""
    events = [e for e in recorder.received(conv) if e.turn_id == turn_id and e.seq > before]
    resumed = [e.seq for e in events if e.kind == "turn_resumed"]
    if not resumed:
        return None
    first = min([e.seq for e in events if e.kind == "events_lost" and e.seq < resumed[0]] + [resumed[0]])
    return min(e.at for e in events if e.seq >= first) - killed_at


async def failover(
    server: PostgresServer, root: Path, args: argparse.Namespace, notes: LogNotes
) -> list[Kill]:
    rng = random.Random(args.seed)
    kills: list[Kill] = []
    with server.database() as url:
        tmp = Path(tempfile.mkdtemp(prefix="failover-", dir=root))
        script = write_script(tmp / "script.json", failover_script())
        cluster = await _start(tmp, url, script, FAILOVER_SETTINGS, kernels=2, transports=2)
        try:
            for n in range(args.kills):
                if n:
                    # A transport passes over a kernel it could not reach for SUSPECT_FOR: a
                    # kill before that ran out would also measure the last one's (see README).
                    await asyncio.sleep(args.pause)
                kills.append(await _one_kill(cluster, rng, n))
                k = kills[-1]
                print(
                    f"  kill {n + 1}: {k.victim} after {k.delay * 1000:.0f} ms; lease ran out "
                    f"{_ms(k.lease_ran_out)}, claimed {_ms(k.claimed)}, first resumed event "
                    + ", ".join(f"t{i + 1} {_ms(r)}" for i, r in enumerate(k.resumed))
                    + f"; turn {k.state}"
                    + (f"; {len(k.problems)} problem(s): {k.problems[:3]}" if k.problems else ""),
                    flush=True,
                )
        finally:
            await cluster.close()
            notes.read(cluster)
    return kills


async def _one_kill(cluster: Cluster, rng: random.Random, n: int) -> Kill:
    conv = await cluster.create_conversation()
    recorders = [Recorder() for _ in cluster.transports]
    try:
        for i, recorder in enumerate(recorders):
            recorder.follow(conv, f"transport{i + 1}", via_transport(cluster, i))
        sent = await send(send_via_transport(cluster, n % len(cluster.transports)), recorders[0], conv, "go")
        if sent is None:
            raise RuntimeError(f"kill {n + 1}: the send was refused: {recorders[0].unacknowledged}")
        for recorder in recorders:
            await recorder.wait_for(
                "the turn's second step",
                lambda r=recorder: any(e.step_id.endswith("#1") for e in r.received(conv)),  # type: ignore[misc]
                30,
            )
        delay = rng.uniform(0, FAILOVER_PAUSE * 2)
        await asyncio.sleep(delay)
        owner = next(
            t.lease_owner for t in await list_turns(cluster.store_stub, conv) if t.id == sent.turn_id
        )
        victim = cluster.kernel_owning(owner)
        before = [max(r.events[conv], default=0) for r in recorders]
        wall, killed_at = time.time(), time.monotonic()
        victim.kill()
        claim = asyncio.create_task(_claim(cluster, conv, sent.turn_id, killed_at, wall))
        for recorder in recorders:
            with contextlib.suppress(AssertionError):
                await recorder.wait_for(
                    "the resumed attempt",
                    lambda r=recorder: any(  # type: ignore[misc]
                        e.kind == "turn_resumed" and e.turn_id == sent.turn_id for e in r.received(conv)
                    ),
                    30,
                )
        claimed, ran_out = await claim
        resumed = [
            _first_resumed(r, conv, sent.turn_id, b, killed_at)
            for r, b in zip(recorders, before, strict=True)
        ]
        await victim.start()
        await _until_advertised(cluster)
        with contextlib.suppress(Exception):
            await cluster.transport_stub.Cancel(
                transport_pb2.CancelRequest(conversation_id=conv, turn_id=sent.turn_id),
                metadata=cluster.metadata,
                timeout=10,
            )
        state = await _until_ended(cluster, conv, sent.turn_id)
        problems: list[str] = []
        for recorder in recorders:
            await _caught_up(cluster, recorder, conv)
            problems += await check(cluster, recorder, [conv], Snapshots(), Counts())
        return Kill(victim.name, delay, ran_out, claimed, resumed, state, sorted(set(problems)))
    finally:
        for recorder in recorders:
            await recorder.close()


async def _until_ended(cluster: Cluster, conv: str, turn_id: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        turn = next(t for t in await list_turns(cluster.store_stub, conv) if t.id == turn_id)
        if turn.state in TERMINAL or time.monotonic() > deadline:
            return state_name(turn.state)
        await asyncio.sleep(0.05)


async def _caught_up(cluster: Cluster, recorder: Recorder, conv: str) -> None:
    """Until the subscriber has the conversation's last persisted event (bounded)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        last = (
            await cluster.store_stub.GetConversation(
                store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv), timeout=10
            )
        ).last_event_seq
        if max(recorder.events[conv], default=0) >= last:
            return
        await asyncio.sleep(0.1)


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


# --------------------------------------------------------------------------- report


def _report_throughput(samples: dict[str, list[Sample]], args: argparse.Namespace) -> None:
    print(
        f"\nthroughput, median of {args.rounds} round(s) (per round: a fresh cluster and database per "
        f"topology, {args.seconds:g} s measured after {args.warmup:g} s of warm-up):"
    )
    print(
        f"{'topology':<9} {'turns/s':>8} {'steps/s':>8} {'µs/step p50':>12} {'p90':>7} {'cores busy':>11}"
        f" {'cpu µs/step':>12}"
    )
    for topology, runs in samples.items():
        print(
            f"{topology:<9} {_med(runs, 'turns_per_s'):>8.1f} {_med(runs, 'steps_per_s'):>8.0f} "
            f"{_med(runs, 'step_us_p50'):>12.0f} {_med(runs, 'step_us_p90'):>7.0f} "
            f"{_med(runs, 'cpu_cores'):>11.2f} {statistics.median(_cpu_total(s) for s in runs):>12.0f}"
        )
    groups = ["store", "exec", "kernel", "transport", "postgres", "client"]
    print("\nCPU µs per step by process group (median of the rounds; kernels and transports summed):")
    print(f"{'topology':<9} " + "".join(f"{g:>10}" for g in groups))
    for topology, runs in samples.items():
        print(
            f"{topology:<9} "
            + "".join(
                f"{statistics.median(s.cpu_us_per_step.get(g, 0.0) for s in runs):>10.0f}" for g in groups
            )
        )
    print("\nper round:")
    for topology, runs in samples.items():
        for i, s in enumerate(runs):
            print(
                f"  {i + 1} {topology}: {s.turns_per_s:.1f} turns/s, p50 {s.step_us_p50:.0f} µs/step, "
                f"{s.cpu_cores:.2f} cores busy; conversations per kernel and transport {s.split}"
                + (f"; {s.queued} send(s) queued" if s.queued else "")
            )
            for stuck in s.stuck:
                print(f"    STUCK: {stuck}")
    if "1x1" in samples and "2x2" in samples:
        pairs = list(zip(samples["1x1"], samples["2x2"], strict=True))
        print("\nratios 2x2 / 1x1 (median of the rounds' ratios; each round's in brackets):")
        for label, attr in (
            ("turns/s", "turns_per_s"),
            ("µs/step p50", "step_us_p50"),
            ("µs/step p90", "step_us_p90"),
            ("cores busy", "cpu_cores"),
        ):
            ratios = [getattr(b, attr) / getattr(a, attr) for a, b in pairs]
            print(
                f"  {label:<12} {statistics.median(ratios):.2f}x  [{', '.join(f'{r:.2f}' for r in ratios)}]"
            )
        cpu = [sum(b.cpu_us_per_step.values()) / sum(a.cpu_us_per_step.values()) for a, b in pairs]
        print(f"  {'cpu µs/step':<12} {statistics.median(cpu):.2f}x  [{', '.join(f'{r:.2f}' for r in cpu)}]")


def _cpu_total(sample: Sample) -> float:
    return sum(sample.cpu_us_per_step.values())


def _med(runs: Sequence[Sample], attr: str) -> float:
    return float(statistics.median(getattr(s, attr) for s in runs))


def _report_failover(kills: Sequence[Kill]) -> None:
    print(
        f"\nfailover, {len(kills)} kill(s) (SIGKILL of the kernel holding the turn's lease; 2 kernels, "
        f"2 transports; lease_ttl {FAILOVER_SETTINGS.lease_ttl:g} s, sweep_interval "
        f"{FAILOVER_SETTINGS.sweep_interval:g} s), ms from the kill:"
    )
    print(f"{'':<40} {'p50':>6} {'p99':>6} {'min':>6} {'max':>6} {'n':>4}")
    rows: list[tuple[str, list[float | None]]] = [
        ("the dead kernel's lease ran out", [k.lease_ran_out for k in kills]),
        ("turn claimed (attempts 2 in the store)", [k.claimed for k in kills]),
    ]
    for i in range(len(kills[0].resumed) if kills else 0):
        rows.append((f"first resumed event, transport {i + 1}", [k.resumed[i] for k in kills]))
    rows.append(("first resumed event, either transport", [_earliest(k.resumed) for k in kills]))
    for label, values in rows:
        got = [v * 1000 for v in values if v is not None]
        missing = len(values) - len(got)
        if not got:
            print(f"{label:<40} {'never':>6}")
            continue
        print(
            f"{label:<40} {statistics.median(got):>6.0f} {_quantile(got, 99):>6.0f} {min(got):>6.0f} "
            f"{max(got):>6.0f} {len(got):>4}" + (f"  ({missing} never)" if missing else "")
        )
    victims = Counter(k.victim for k in kills)
    states = Counter(k.state for k in kills)
    problems = sum(len(k.problems) for k in kills)
    print(
        f"killed: {', '.join(f'{v} {n}' for v, n in sorted(victims.items()))}; turns ended "
        f"{', '.join(f'{s} {n}' for s, n in sorted(states.items()))}; fault-suite check problems: {problems}"
    )


def _earliest(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return min(got) if got else None


async def run(args: argparse.Namespace) -> int:
    notes = {"throughput": LogNotes(), "failover": LogNotes()}
    began = time.monotonic()
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(postgres_server())
        root = args.logs or stack.enter_context(tempfile.TemporaryDirectory(prefix="dispatch-bench-scale-"))
        samples: dict[str, list[Sample]] = {t: [] for t in TOPOLOGIES}
        for round_ in range(args.rounds):
            order = list(TOPOLOGIES) if round_ % 2 == 0 else list(reversed(TOPOLOGIES))
            for topology in order:
                sample = await measure(server, Path(root), topology, args, notes["throughput"])
                samples[topology].append(sample)
                print(
                    f"  round {round_ + 1} {topology}: {sample.turns_per_s:.1f} turns/s, "
                    f"p50 {sample.step_us_p50:.0f} µs/step",
                    flush=True,
                )
        kills = await failover(server, Path(root), args, notes["failover"]) if args.kills else []
    if args.rounds:
        _report_throughput(samples, args)
        notes["throughput"].report("throughput runs")
    if kills:
        _report_failover(kills)
        notes["failover"].report("failover run")
    stuck = sum(len(s.stuck) for runs in samples.values() for s in runs)
    if stuck:
        print(f"\n{stuck} turn(s) never reached their turn_sealed (STUCK above): the run failed")
    print(
        f"\n{time.monotonic() - began:.0f} s in all; load average {load[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs"
    )
    return 1 if stuck else 0


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per topology and round (default 10)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    parser.add_argument("--conversations", type=int, default=8, help="concurrent conversations (default 8)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over both topologies; 0: none (default 3)"
    )
    parser.add_argument(
        "--kills", type=int, default=10, help="kernel kills in the failover run; 0: none (default 10)"
    )
    parser.add_argument("--steps", type=int, default=5, help="tool steps per throughput turn (default 5)")
    parser.add_argument(
        "--logs", help="keep every service's logs under this directory (default: thrown away)"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=SUSPECT_FOR + 0.5,
        help="seconds between one kill's turn ending and the next kill's turn starting "
        f"(default {SUSPECT_FOR + 0.5:g}: the transports' SUSPECT_FOR and a margin)",
    )
    parser.add_argument("--seed", type=int, default=15, help="of the delays before each kill (default 15)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.conversations < 1 or args.steps < 1:
        parser.error("--seconds and --conversations and --steps must be positive, --warmup not negative")
    if args.rounds < 0 or args.kills < 0 or args.pause < 0:
        parser.error("--rounds, --kills and --pause must not be negative")
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        args.logs = str(Path(args.logs).resolve())
    print(
        f"scale-out on PostgreSQL: 1x1 (1 kernel, 1 transport) against 2x2 (2 kernels, 2 transports, "
        f"--kernel store); {args.conversations} conversations sending turns back to back, each "
        f"{args.steps} list_dir step(s) and an answer; µs per step = turn wall time / {args.steps + 1}",
        flush=True,
    )
    import uvloop

    return uvloop.run(run(args))
