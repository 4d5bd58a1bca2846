"""The fault-injection harness: the four services as OS processes on fixed loopback ports,
killed with SIGKILL and restarted on the same address and database; a client that records
every event it receives and every send the server acknowledged; and the checks every
scenario ends with (``check``), against the store and the client's records.

What ``check`` holds the system to, after any fault:

* no committed message lost: every message the client saw committed (a store snapshot taken
  before a kill, a ``messages_committed`` range received live) is still in history, with
  the same content;
* no dangling tool call: every tool_call chunk in history has exactly one tool_result;
* no reused event number: every event the client received is in the store with identical
  bytes under the same event_seq, or its event_seq lies in an announced ``events_lost``
  range; no persisted event lies in such a range; the same event_seq never arrived twice
  with different bytes;
* no turn left running: every turn is terminal;
* every acknowledged send (queued or not) is in history as one user message;
* a new message on the conversation runs to ``turn_sealed`` (``new_message_works``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from dispatch.v1 import (
    common_pb2,
    kernel_pb2,
    kernel_pb2_grpc,
    store_pb2,
    store_pb2_grpc,
    transport_pb2,
    transport_pb2_grpc,
)
from tests.e2e.procs import ServiceProcess, free_port

T = TypeVar("T")

TENANT = "local"
TERMINAL = frozenset(
    {
        common_pb2.TURN_STATE_COMPLETED,
        common_pb2.TURN_STATE_FAILED,
        common_pb2.TURN_STATE_ABORTED,
        common_pb2.TURN_STATE_INTERRUPTED,
    }
)
# The test's own channels reconnect fast to a service restarted on the same port (gRPC's
# default backoff starts at a second); the services' channels keep their defaults: how
# they find a restarted peer is part of what is tested.
TEST_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def state_name(state: int) -> str:
    return common_pb2.TurnState.Name(state).removeprefix("TURN_STATE_").lower()  # type: ignore[arg-type]


def event_bytes(event: common_pb2.AgentEvent) -> bytes:
    return event.SerializeToString(deterministic=True)


def say(line: str) -> None:
    """One line of the run's log (shown with -s, and with a failure)."""
    print(f"[faults] {line}", flush=True)


# ---------------------------------------------------------------------- scripts


def text(words: str) -> dict[str, Any]:
    return {"type": "text_delta", "text": words}


def sleep(seconds: float) -> dict[str, Any]:
    return {"type": "sleep", "seconds": seconds}


def call(name: str, **tool_input: Any) -> dict[str, Any]:
    return {"type": "tool_call", "name": name, "input": tool_input}


def journal_turn(label: str, journal: str = "journal.txt") -> list[list[dict[str, Any]]]:
    """A four-step turn with real tool calls through exec: two shells that append to
    ``journal`` in the workspace and sleep (so kills land inside a tool run), a list_dir and a
    read_file, with sleeps between deltas (so they land inside the provider's stream) and step
    boundaries between. ``label`` marks what this script's kernel wrote."""
    return [
        [
            text(f"[{label}] Let me look"),
            sleep(0.2),
            text(" at the workspace."),
            call("list_dir", path="."),
            call(
                "shell",
                command=(
                    f"echo '{label} step1 start' >> {journal}; sleep 0.4; "
                    f"echo '{label} step1 end' >> {journal}"
                ),
            ),
            sleep(0.1),
            text(" (running)"),
        ],
        [
            {"type": "reasoning_delta", "text": f"[{label}] The journal should have grown."},
            sleep(0.2),
            call("read_file", path=journal),
            text(f"[{label}] Read it."),
        ],
        [
            text(f"[{label}] One more"),
            sleep(0.15),
            call("shell", command=f"sleep 0.5; echo '{label} step3' >> {journal}; tail -n 2 {journal}"),
        ],
        [text(f"[{label}] Done"), sleep(0.2), text(": the journal grew.")],
    ]


def write_script(path: Path, steps: list[list[dict[str, Any]]]) -> Path:
    # One turn: the scripted provider repeats its last turn for every user message.
    path.write_text(json.dumps({"steps": steps}))
    return path


# ---------------------------------------------------------------------- processes


class Service:
    """One dispatchd service on a fixed port, killed and restarted on it; each start (an
    incarnation) logs to its own directory, so every log survives."""

    def __init__(self, kind: str, name: str, root: Path, args: Callable[[], list[str]]):
        self.kind = kind
        self.name = name
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._args = args
        self.starts = 0
        self.proc: ServiceProcess | None = None
        self.dirs: list[Path] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    async def start(self) -> None:
        self.starts += 1
        run = self.root / f"{self.name}.{self.starts}"
        run.mkdir(parents=True)
        self.dirs.append(run)
        # The later --listen wins: the fixed port, so a restart is found where it was.
        self.proc = ServiceProcess(self.kind, [*self._args(), "--listen", self.address], run)
        proc = self.proc
        await asyncio.to_thread(proc.wait_ready, 30.0)

    def kill(self) -> None:
        """SIGKILL: no drain, no handover, nothing flushed."""
        assert self.proc is not None
        os.kill(self.pid, signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.terminate()  # closes its log

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def restart(self) -> None:
        if self.running:
            self.kill()
        await self.start()

    def stop(self) -> None:
        """At the end of a test: killed too (a clean shutdown is tests/e2e's business), and
        its log closed."""
        if self.proc is not None:
            if self.proc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.proc.wait(10)
            self.proc.terminate()

    def logs(self, tail: int = 0) -> str:
        out = []
        for run in self.dirs:
            path = run / f"{self.kind}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                out.append(f"--- {self.name} incarnation {run.name}:")
                out.extend(lines[-tail:] if tail else lines)
        return "\n".join(out)


@dataclass
class KernelSettings:
    lease_ttl: float = 1.0
    sweep_interval: float = 0.1
    max_attempts: int = 4
    store_outage: float = 60.0
    # The default agent's [kernel.permissions] table, as TOML lines (``shell = "ask"``).
    permissions: str = ""

    def toml(self) -> str:
        return (
            "[kernel]\n"
            f"lease_ttl = {self.lease_ttl}\n"
            f"sweep_interval = {self.sweep_interval}\n"
            f"max_attempts = {self.max_attempts}\n"
            f"store_outage = {self.store_outage}\n"
        ) + (f"[kernel.permissions]\n{self.permissions}\n" if self.permissions else "")


class Cluster:
    """store, exec, one or more kernels and a transport (pointed at the first kernel), each
    its own process, over one database. ``transports`` > 1 or ``discover``: that many
    transports, each finding every kernel through the store (``--kernel store``)."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        scripts: Sequence[Path],
        settings: KernelSettings,
        *,
        transport: bool = True,
        transports: int = 1,
        discover: bool = False,
    ):
        self.tmp = tmp
        self.workspace = tmp / "workspace"
        self.workspace.mkdir()
        self.database_url = database_url
        config = tmp / "kernel.toml"
        self._config = config
        self.configure(settings)
        self.store = Service(
            "store",
            "store",
            tmp,
            lambda: ["--database-url", self.database_url, "--workspace", str(self.workspace)],
        )
        self.exec = Service("exec", "exec", tmp, lambda: [])

        def kernel_args(script: Path) -> Callable[[], list[str]]:
            return lambda: [
                "--store",
                self.store.address,
                "--exec",
                self.exec.address,
                "--provider",
                "scripted",
                "--script",
                str(script),
                "--config",
                str(config),
            ]

        self.kernels = [
            Service("kernel", f"kernel{i + 1}", tmp, kernel_args(script)) for i, script in enumerate(scripts)
        ]
        discover = discover or transports > 1

        def transport_args() -> list[str]:
            kernel = "store" if discover else self.kernels[0].address
            return ["--kernel", kernel, "--store", self.store.address]

        names = ["transport"] + [f"transport{i + 1}" for i in range(1, transports)]
        self.transports = (
            [Service("transport", name, tmp, transport_args) for name in names] if transport else []
        )
        self.transport: Service | None = self.transports[0] if self.transports else None
        self.api_key = ""
        self._channels: dict[str, grpc.aio.Channel] = {}

    def configure(self, settings: KernelSettings) -> None:
        """The kernels' settings from their next start on."""
        self.settings = settings
        self._config.write_text(settings.toml())

    @property
    def services(self) -> list[Service]:
        return [self.store, self.exec, *self.kernels, *self.transports]

    async def start(self) -> None:
        await asyncio.gather(self.store.start(), self.exec.start())
        # The transport connects to its kernel on its first call: they start together.
        await asyncio.gather(*(k.start() for k in self.kernels), *(t.start() for t in self.transports))
        if self.transport is not None:
            created = await self.store_stub.CreateApiKey(
                store_pb2.CreateApiKeyRequest(tenant_id=TENANT, name="faults"), timeout=10
            )
            self.api_key = created.secret

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        for service in reversed(self.services):
            service.stop()

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=TEST_CHANNEL_OPTIONS)
        return self._channels[address]

    @property
    def store_stub(self) -> store_pb2_grpc.ConversationStoreAsyncStub:
        return store_pb2_grpc.ConversationStoreStub(self._channel(self.store.address))

    def kernel_stub(self, index: int = 0) -> kernel_pb2_grpc.KernelAsyncStub:
        return kernel_pb2_grpc.KernelStub(self._channel(self.kernels[index].address))

    @property
    def transport_stub(self) -> transport_pb2_grpc.DispatchAsyncStub:
        assert self.transport is not None
        return transport_pb2_grpc.DispatchStub(self._channel(self.transport.address))

    def transport_stub_of(self, index: int) -> transport_pb2_grpc.DispatchAsyncStub:
        return transport_pb2_grpc.DispatchStub(self._channel(self.transports[index].address))

    def kernel_owning(self, owner: str) -> Service:
        """The kernel process whose lease owner name is ``owner`` (it names the pid)."""
        for kernel in self.kernels:
            if kernel.running and f"-{kernel.pid}-" in owner:
                return kernel
        raise AssertionError(f"no running kernel is {owner!r}")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)

    async def create_conversation(self) -> str:
        if self.transport is not None:
            conv = await self.transport_stub.CreateConversation(
                transport_pb2.PublicCreateConversationRequest(), metadata=self.metadata, timeout=10
            )
        else:
            conv = await self.store_stub.CreateConversation(
                store_pb2.CreateConversationRequest(tenant_id=TENANT), timeout=10
            )
        return conv.id

    def logs(self, tail: int = 60) -> str:
        return "\n".join(s.logs(tail) for s in self.services)


async def until_ok(what: str, fn: Callable[[], Awaitable[T]], within: float = 20.0) -> T:
    """``fn()``, retried while the service it calls is down (restarting), for ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await fn()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RESUMABLE or time.monotonic() > deadline:
                raise AssertionError(f"{what}: {exc.code().name}: {exc.details()}") from None
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------- the client's records


@dataclass
class Seen:
    """One event as a client received it."""

    seq: int
    data: bytes
    kind: str
    turn_id: str
    step_id: str
    at: float
    source: str


# A client's resubscription backoff: doubling from the first, reset by every event.
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 0.4

Subscribe = Callable[[str, int], AsyncIterator[Sequence[common_pb2.AgentEvent]]]


def _transport(cluster: Cluster, order: Sequence[int]) -> transport_pb2_grpc.DispatchAsyncStub:
    """The first running transport of ``order`` (a load balancer's pick); the first if none runs."""
    if not order:
        return cluster.transport_stub
    running = [i for i in order if cluster.transports[i].running] or list(order)
    return cluster.transport_stub_of(running[0])


def via_transport(cluster: Cluster, *order: int) -> Subscribe:
    """Subscribe through the transport (``order``: the first of those transports running)."""

    async def subscribe(conversation_id: str, after: int) -> AsyncIterator[Sequence[common_pb2.AgentEvent]]:
        stream = _transport(cluster, order).Subscribe(
            transport_pb2.SubscribeRequest(conversation_id=conversation_id, after_event_seq=after),
            metadata=cluster.metadata,
        )
        try:
            async for resp in stream:
                if resp.HasField("resync"):
                    return
                yield resp.events
        finally:
            stream.cancel()

    return subscribe


def via_kernel(cluster: Cluster, index: int) -> Subscribe:
    async def subscribe(conversation_id: str, after: int) -> AsyncIterator[Sequence[common_pb2.AgentEvent]]:
        stream = cluster.kernel_stub(index).Subscribe(
            kernel_pb2.KernelSubscribeRequest(
                tenant_id=TENANT, conversation_id=conversation_id, after_event_seq=after
            )
        )
        try:
            async for batch in stream:
                yield batch.events
        finally:
            stream.cancel()

    return subscribe


SendFn = Callable[[str, str, str], Awaitable[tuple[bool, str]]]


def send_via_transport(cluster: Cluster, *order: int) -> SendFn:
    async def send_one(conversation_id: str, words: str, key: str) -> tuple[bool, str]:
        resp = await _transport(cluster, order).Send(
            transport_pb2.SendRequest(conversation_id=conversation_id, text=words, idempotency_key=key),
            metadata=cluster.metadata,
            timeout=10,
        )
        return resp.queued, resp.turn_id

    return send_one


def send_via_kernel(cluster: Cluster, index: int) -> SendFn:
    async def send_one(conversation_id: str, words: str, key: str) -> tuple[bool, str]:
        resp = await cluster.kernel_stub(index).StartTurn(
            kernel_pb2.StartTurnRequest(
                tenant_id=TENANT,
                conversation_id=conversation_id,
                chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=words))],
                idempotency_key=key,
            ),
            timeout=10,
        )
        return resp.queued, resp.turn_id

    return send_one


@dataclass
class Sent:
    conversation_id: str
    text: str
    key: str
    queued: bool
    turn_id: str
    tries: int
    at: float


class Recorder:
    """Follows conversations (as a client would: resubscribing from its last event_seq when
    a stream breaks) and records every event received, and every acknowledged send."""

    def __init__(self) -> None:
        self.events: dict[str, dict[int, Seen]] = defaultdict(dict)
        # The same event_seq received twice with different bytes.
        self.conflicts: list[str] = []
        # The same event_seq received again with the same bytes (a stream resumed from a
        # cursor must not send it again).
        self.repeats: list[str] = []
        # Within one stream, an event_seq not above the one before.
        self.disorder: list[str] = []
        # A stream that failed with a status a client does not resume from.
        self.errors: list[str] = []
        # Every event_seq each subscriber (source) received, per conversation.
        self.by_source: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.sends: list[Sent] = []
        self.unacknowledged: list[str] = []
        self.subscriptions = 0
        # How subscriptions ended: "ok" or the status they broke with.
        self.endings: dict[str, int] = defaultdict(int)
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()

    def follow(self, conversation_id: str, source: str, subscribe: Subscribe) -> None:
        self._tasks.append(
            asyncio.create_task(self._follow(conversation_id, source, subscribe), name=f"follow {source}")
        )

    async def _follow(self, conversation_id: str, source: str, subscribe: Subscribe) -> None:
        cursor = 0
        backoff = FIRST_BACKOFF
        while True:
            self.subscriptions += 1
            last = cursor
            try:
                async for batch in subscribe(conversation_id, cursor):
                    for event in batch:
                        if event.event_seq <= last:
                            self.disorder.append(
                                f"{source}: event {event.event_seq} after {last} (subscribed after {cursor})"
                            )
                        last = max(last, event.event_seq)
                        self._record(conversation_id, event, source, cursor)
                    cursor = max(cursor, last)
                    backoff = FIRST_BACKOFF
                self.endings["ok"] += 1
            except grpc.aio.AioRpcError as exc:
                self.endings[exc.code().name] += 1
                if exc.code() not in RESUMABLE:
                    self.errors.append(f"{source}: {exc.code().name}: {exc.details()}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _record(self, conversation_id: str, event: common_pb2.AgentEvent, source: str, cursor: int) -> None:
        data = event_bytes(event)
        self.by_source[(conversation_id, source)].add(event.event_seq)
        seen = self.events[conversation_id]
        earlier = seen.get(event.event_seq)
        if earlier is not None:
            if earlier.data != data:
                self.conflicts.append(
                    f"conversation {conversation_id} event_seq {event.event_seq}: first received "
                    f"({earlier.source}) as {earlier.kind} of {earlier.turn_id}, later ({source}) as "
                    f"{event.WhichOneof('kind')} of {event.turn_id}"
                )
            elif event.event_seq <= cursor:
                self.repeats.append(
                    f"{source}: event {event.event_seq} again after subscribing from {cursor}"
                )
            return
        seen[event.event_seq] = Seen(
            seq=event.event_seq,
            data=data,
            kind=event.WhichOneof("kind") or "",
            turn_id=event.turn_id,
            step_id=event.step_id,
            at=time.monotonic(),
            source=source,
        )
        self._changed.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def received(self, conversation_id: str) -> list[Seen]:
        return [self.events[conversation_id][s] for s in sorted(self.events[conversation_id])]

    def since(self, conversation_id: str, at: float) -> list[Seen]:
        return [e for e in self.received(conversation_id) if e.at >= at]

    async def wait_for(self, what: str, ready: Callable[[], bool], within: float) -> None:
        """Until ``ready()``; fails saying ``what`` after ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            self._changed.clear()  # before looking: an event from now on wakes the wait
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))

    def sealed(self, conversation_id: str, turn_id: str) -> common_pb2.TurnSealed | None:
        for seen in self.received(conversation_id):
            if seen.turn_id == turn_id and seen.kind == "turn_sealed":
                return common_pb2.AgentEvent.FromString(seen.data).turn_sealed
        return None

    def doing(self, conversation_id: str) -> str:
        """What the conversation's turn was doing, as far as its last events tell."""
        events = self.received(conversation_id)
        if not events:
            return "no events yet"
        last = events[-1]
        turn = [e for e in events if e.turn_id == last.turn_id]
        step = last.step_id.rpartition("#")[2] if last.step_id else "?"
        if last.kind == "turn_sealed":
            return f"idle (turn {last.turn_id} sealed)"
        open_calls: dict[str, str] = {}
        for seen in turn:
            event = common_pb2.AgentEvent.FromString(seen.data)
            if seen.kind == "tool_call":
                open_calls[event.tool_call.tool_call_id] = event.tool_call.name
            elif seen.kind == "tool_result":
                open_calls.pop(event.tool_result.tool_call_id, None)
            elif seen.kind in ("turn_resumed", "step_completed"):
                open_calls.clear()
        where = f"turn {last.turn_id} step {step}"
        if open_calls:
            streaming = " while streaming" if last.kind in ("text_delta", "reasoning_delta") else ""
            return f"{where}: running {', '.join(sorted(open_calls.values()))}{streaming}"
        return f"{where}: " + {
            "text_delta": "streaming the model's text",
            "reasoning_delta": "streaming the model's reasoning",
            "tool_call": "starting a tool",
            "tool_output": "a tool printing",
            "tool_result": "a tool just finished",
            "messages_committed": "between steps (a commit landed)",
            "step_completed": "between steps",
            "steering_injected": "between steps (steering taken)",
            "turn_started": "starting the turn",
            "turn_resumed": "resuming the turn",
            "events_lost": "announcing lost events",
            "turn_done": "sealing",
            "turn_interrupted": "giving up",
            "error": "after an error",
        }.get(last.kind, last.kind)


async def send(
    via: SendFn, recorder: Recorder, conversation_id: str, words: str, *, within: float = 20.0
) -> Sent | None:
    """Send as a careful client: retried with the same idempotency key while the kernel is
    down. Recorded when acknowledged; None if it never was."""
    key = uuid.uuid4().hex
    deadline = time.monotonic() + within
    tries = 0
    while True:
        tries += 1
        try:
            queued, turn_id = await via(conversation_id, words, key)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RESUMABLE and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                continue
            recorder.unacknowledged.append(f"{words!r}: {exc.code().name}: {exc.details()}")
            return None
        sent = Sent(conversation_id, words, key, queued, turn_id, tries, time.monotonic())
        recorder.sends.append(sent)
        return sent


# ---------------------------------------------------------------------- the store's view


async def load_history(
    store: store_pb2_grpc.ConversationStoreAsyncStub, conv: str
) -> list[common_pb2.Message]:
    resp = await until_ok(
        "load history",
        lambda: store.Load(store_pb2.LoadRequest(tenant_id=TENANT, conversation_id=conv), timeout=10),
    )
    return list(resp.messages)


async def load_events(
    store: store_pb2_grpc.ConversationStoreAsyncStub, conv: str
) -> list[common_pb2.AgentEvent]:
    events: list[common_pb2.AgentEvent] = []
    cursor = 0
    while True:
        after = cursor
        page = await until_ok(
            "load events",
            lambda after=after: store.LoadEvents(  # type: ignore[misc]
                store_pb2.LoadEventsRequest(
                    tenant_id=TENANT, conversation_id=conv, after_event_seq=after, limit=1000
                ),
                timeout=10,
            ),
        )
        if not page.events:
            return events
        events.extend(page.events)
        cursor = page.events[-1].event_seq


async def list_turns(store: store_pb2_grpc.ConversationStoreAsyncStub, conv: str) -> list[common_pb2.Turn]:
    turns: list[common_pb2.Turn] = []
    token = ""
    while True:
        page_token = token
        page = await until_ok(
            "list turns",
            lambda page_token=page_token: store.ListTurns(  # type: ignore[misc]
                store_pb2.ListTurnsRequest(
                    tenant_id=TENANT, conversation_id=conv, page_size=100, page_token=page_token
                ),
                timeout=10,
            ),
        )
        turns.extend(page.turns)
        if not page.next_page_token:
            return turns
        token = page.next_page_token


class Snapshots:
    """Histories read from the store before each kill: what was committed then."""

    def __init__(self) -> None:
        self.messages: dict[str, dict[int, bytes]] = defaultdict(dict)
        self.taken = 0

    async def take(
        self, store: store_pb2_grpc.ConversationStoreAsyncStub, conversations: Iterable[str]
    ) -> None:
        for conv in conversations:
            for message in await load_history(store, conv):
                self.messages[conv][message.seq] = message.SerializeToString(deterministic=True)
        self.taken += 1


def user_text(message: common_pb2.Message) -> str:
    return "".join(c.text.text for c in message.chunks if c.HasField("text"))


async def settle(
    cluster: Cluster, recorder: Recorder, conversations: Sequence[str], within: float = 45.0
) -> None:
    """Wait (bounded) until every turn is terminal, every acknowledged send is in history and
    the client has received every persisted event: a stuck turn fails here, saying which, with
    the kernels' logs."""
    deadline = time.monotonic() + within
    while True:
        pending: list[str] = []
        for conv in conversations:
            turns = await list_turns(cluster.store_stub, conv)
            pending += [
                f"turn {t.id} of {conv}: {state_name(t.state)}, attempts {t.attempts}, "
                f"lease {t.lease_owner or '-'} epoch {t.lease_epoch}"
                for t in turns
                if t.state not in TERMINAL
            ]
            texts = [user_text(m) for m in await load_history(cluster.store_stub, conv)]
            pending += [
                f"acknowledged send {s.text!r} not in history yet"
                for s in recorder.sends
                if s.conversation_id == conv and s.text not in texts
            ]
            # The client has caught up: it has every persisted event (or a later one).
            last = (
                await until_ok(
                    "get the conversation",
                    lambda conv=conv: cluster.store_stub.GetConversation(  # type: ignore[misc]
                        store_pb2.GetConversationRequest(tenant_id=TENANT, conversation_id=conv), timeout=10
                    ),
                )
            ).last_event_seq
            got = max(recorder.events[conv], default=0)
            if got < last:
                pending.append(f"the client of {conv} has events up to {got}; the store up to {last}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled after {within:.0f}s:\n  "
                + "\n  ".join(pending)
                + "\n"
                + "\n".join(k.logs(40) for k in cluster.kernels)
            )
        await asyncio.sleep(0.2)


async def new_message_works(
    via: SendFn, recorder: Recorder, conversation_id: str, within: float = 30.0
) -> list[str]:
    """A new message on the conversation runs to its turn_sealed; the problems if not."""
    sent = await send(via, recorder, conversation_id, f"after the faults {uuid.uuid4().hex[:6]}")
    if sent is None:
        return [f"{conversation_id}: a new message was refused: {recorder.unacknowledged[-1]}"]
    if sent.queued:
        return [f"{conversation_id}: a new message was queued behind a turn that should be over"]
    try:
        await recorder.wait_for(
            f"the new turn {sent.turn_id} of {conversation_id} to be sealed",
            lambda: recorder.sealed(conversation_id, sent.turn_id) is not None,
            within,
        )
    except AssertionError as exc:
        return [str(exc)]
    sealed = recorder.sealed(conversation_id, sent.turn_id)
    assert sealed is not None
    if sealed.state != common_pb2.TURN_STATE_COMPLETED:
        return [f"{conversation_id}: the new turn {sent.turn_id} sealed {state_name(sealed.state)}"]
    return []


# ---------------------------------------------------------------------- the checks


@dataclass
class Counts:
    """What a run did and checked; printed at its end (docs/durability.md quotes them)."""

    kills: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    conversations: int = 0
    turns: int = 0
    turn_states: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    resumed: int = 0
    events_received: int = 0
    events_persisted: int = 0
    events_checked: int = 0
    in_lost_ranges: int = 0
    lost_ranges: int = 0
    messages_checked: int = 0
    tool_calls_checked: int = 0
    sends: int = 0
    queued_sends: int = 0
    subscriptions: int = 0
    endings: dict[str, int] = field(default_factory=dict)
    # Not a violation, but what a client sees: a fatal error received for a turn that then
    # went on and completed (the error lay in an announced lost range).
    fatal_then_completed: list[str] = field(default_factory=list)

    def line(self, name: str, seed: int | None = None) -> str:
        kills = ", ".join(f"{k} {n}" for k, n in sorted(self.kills.items())) or "none"
        states = ", ".join(f"{k} {n}" for k, n in sorted(self.turn_states.items()))
        return (
            f"{name}{f' seed={seed}' if seed is not None else ''}: kills: {kills}; "
            f"conversations {self.conversations}, turns {self.turns} ({states}), "
            f"turn_resumed {self.resumed}; events received {self.events_received}, persisted "
            f"{self.events_persisted}, checked {self.events_checked} (of them in lost ranges "
            f"{self.in_lost_ranges}); events_lost ranges announced {self.lost_ranges}; messages checked "
            f"{self.messages_checked}; tool calls checked {self.tool_calls_checked}; sends acknowledged "
            f"{self.sends} (queued {self.queued_sends}); subscriptions {self.subscriptions} "
            f"(ended: {', '.join(f'{k} {n}' for k, n in sorted(self.endings.items()))})"
            + (
                f"; fatal errors received for turns that then completed: {self.fatal_then_completed}"
                if self.fatal_then_completed
                else ""
            )
        )


async def check(
    cluster: Cluster,
    recorder: Recorder,
    conversations: Sequence[str],
    snapshots: Snapshots,
    counts: Counts,
) -> list[str]:
    """Every guarantee of the module docstring, for ``conversations``; the violations."""
    store = cluster.store_stub
    problems: list[str] = []
    problems += [f"client: {p}" for p in recorder.conflicts]
    problems += [f"client: {p}" for p in recorder.repeats]
    problems += [f"client: {p}" for p in recorder.disorder]
    problems += [f"client: stream failed: {p}" for p in recorder.errors]
    counts.subscriptions = recorder.subscriptions
    counts.endings = dict(recorder.endings)
    counts.conversations += len(conversations)
    counts.resumed += resumed_count(recorder, conversations)
    for conv in conversations:
        history = await load_history(store, conv)
        events = await load_events(store, conv)
        turns = await list_turns(store, conv)
        problems += _check_turns(conv, turns, counts)
        _note_fatal_errors(conv, turns, recorder, counts)
        problems += _check_messages(conv, history, snapshots, recorder, counts)
        problems += _check_tool_calls(conv, history, counts)
        problems += _check_events(conv, events, recorder, counts)
        problems += _check_sends(conv, history, turns, recorder, counts)
    return problems


def _note_fatal_errors(
    conv: str, turns: Sequence[common_pb2.Turn], recorder: Recorder, counts: Counts
) -> None:
    completed = {t.id for t in turns if t.state == common_pb2.TURN_STATE_COMPLETED}
    for seen in recorder.received(conv):
        if seen.kind == "error" and seen.turn_id in completed:
            error = common_pb2.AgentEvent.FromString(seen.data).error
            if error.fatal:
                counts.fatal_then_completed.append(f"{seen.turn_id} #{seen.seq}: {error.message[:80]}")


def _check_turns(conv: str, turns: Sequence[common_pb2.Turn], counts: Counts) -> list[str]:
    counts.turns += len(turns)
    problems = []
    for turn in turns:
        counts.turn_states[state_name(turn.state)] += 1
        if turn.state not in TERMINAL:
            problems.append(
                f"{conv}: turn {turn.id} left {state_name(turn.state)} (attempts {turn.attempts})"
            )
        if turn.state in TERMINAL and turn.lease_owner:
            problems.append(
                f"{conv}: turn {turn.id} is {state_name(turn.state)} but leased to {turn.lease_owner}"
            )
    return problems


def _check_messages(
    conv: str,
    history: Sequence[common_pb2.Message],
    snapshots: Snapshots,
    recorder: Recorder,
    counts: Counts,
) -> list[str]:
    problems = []
    now = {m.seq: m.SerializeToString(deterministic=True) for m in history}
    seqs = [m.seq for m in history]
    if seqs != sorted(set(seqs)):
        problems.append(f"{conv}: history seqs are not strictly increasing: {seqs}")
    committed: set[int] = set(snapshots.messages.get(conv, {}))
    for seen in recorder.received(conv):
        if seen.kind == "messages_committed":
            event = common_pb2.AgentEvent.FromString(seen.data)
            committed.update(range(event.messages_committed.first_seq, event.messages_committed.last_seq + 1))
    for seq in sorted(committed):
        counts.messages_checked += 1
        if seq not in now:
            problems.append(f"{conv}: committed message seq {seq} is gone from history")
            continue
        before = snapshots.messages.get(conv, {}).get(seq)
        if before is not None and before != now[seq]:
            problems.append(f"{conv}: committed message seq {seq} changed")
    return problems


def _check_tool_calls(conv: str, history: Sequence[common_pb2.Message], counts: Counts) -> list[str]:
    calls: dict[str, int] = {}
    results: dict[str, int] = defaultdict(int)
    for message in history:
        for chunk in message.chunks:
            if chunk.HasField("tool_call"):
                calls[chunk.tool_call.id] = message.seq
            elif chunk.HasField("tool_result"):
                results[chunk.tool_result.tool_call_id] += 1
    counts.tool_calls_checked += len(calls)
    problems = [
        f"{conv}: tool call {call_id} (message seq {seq}) has {results[call_id]} results"
        for call_id, seq in calls.items()
        if results[call_id] != 1
    ]
    problems += [
        f"{conv}: tool result for unknown call {call_id}" for call_id in results if call_id not in calls
    ]
    return problems


def lost_ranges(events: Iterable[common_pb2.AgentEvent]) -> list[tuple[int, int]]:
    return [
        (e.events_lost.first_event_seq, e.events_lost.last_event_seq)
        for e in events
        if e.HasField("events_lost")
    ]


def _check_events(
    conv: str, events: Sequence[common_pb2.AgentEvent], recorder: Recorder, counts: Counts
) -> list[str]:
    problems = []
    persisted = {e.event_seq: event_bytes(e) for e in events}
    seqs = [e.event_seq for e in events]
    if seqs != sorted(set(seqs)):
        problems.append(f"{conv}: persisted event_seqs are not strictly increasing")
    lost = lost_ranges(events)
    # An announcement received live but not persisted (its kernel died too) still counts:
    # the client was told.
    for seen in recorder.received(conv):
        if seen.kind == "events_lost":
            lost += lost_ranges([common_pb2.AgentEvent.FromString(seen.data)])
    lost = sorted(set(lost))
    counts.lost_ranges += len(lost)
    counts.events_persisted += len(events)

    def in_lost(seq: int) -> bool:
        return any(first <= seq <= last for first, last in lost)

    def covered(first: int, last: int) -> bool:
        """Whether the announced ranges together cover first..last."""
        at = first
        for low, high in lost:  # sorted
            if low <= at <= high:
                at = high + 1
            if at > last:
                return True
        return at > last

    for seq in seqs:
        if in_lost(seq):
            problems.append(f"{conv}: persisted event {seq} lies in an announced lost range {lost}")
    # Every number up to the last persisted one is persisted or announced lost.
    previous = 0
    for seq in seqs:
        if seq > previous + 1 and not covered(previous + 1, seq - 1):
            problems.append(
                f"{conv}: event_seqs {previous + 1}..{seq - 1} are missing and not announced lost"
            )
        previous = seq
    # Each subscriber got every persisted event up to the last it received: no gap, even
    # across resubscriptions and kernels.
    for (of, source), got in recorder.by_source.items():
        if of != conv or not got:
            continue
        missed = [seq for seq in seqs if seq <= max(got) and seq not in got]
        if missed:
            problems.append(
                f"{conv}: subscriber {source} never received persisted events {_ranges(missed)} "
                f"(it received up to {max(got)})"
            )
    for seen in recorder.received(conv):
        counts.events_received += 1
        counts.events_checked += 1
        if seen.seq in persisted:
            if persisted[seen.seq] != seen.data:
                stored = common_pb2.AgentEvent.FromString(persisted[seen.seq])
                problems.append(
                    f"{conv}: event_seq {seen.seq} was received as {seen.kind} of turn {seen.turn_id} "
                    f"({seen.source}) but is persisted as {stored.WhichOneof('kind')} of turn "
                    f"{stored.turn_id}"
                )
        elif in_lost(seen.seq):
            counts.in_lost_ranges += 1
        else:
            problems.append(
                f"{conv}: event_seq {seen.seq} ({seen.kind} of turn {seen.turn_id}, {seen.source}) was "
                "received but is neither persisted nor in an announced lost range"
            )
    return problems


def _ranges(seqs: Sequence[int]) -> str:
    out: list[str] = []
    for seq in seqs:
        if out and int(out[-1].rpartition("..")[2]) == seq - 1:
            out[-1] = f"{out[-1].partition('..')[0]}..{seq}"
        else:
            out.append(f"{seq}..{seq}")
    return ", ".join(r if r.partition("..")[0] != r.partition("..")[2] else r.partition("..")[0] for r in out)


def _check_sends(
    conv: str,
    history: Sequence[common_pb2.Message],
    turns: Sequence[common_pb2.Turn],
    recorder: Recorder,
    counts: Counts,
) -> list[str]:
    problems = []
    states = {t.id: t.state for t in turns}
    users = [m for m in history if m.role == common_pb2.ROLE_USER]
    for sent in (s for s in recorder.sends if s.conversation_id == conv):
        counts.sends += 1
        counts.queued_sends += sent.queued
        found = [m for m in users if user_text(m) == sent.text]
        if len(found) != 1:
            problems.append(
                f"{conv}: acknowledged send {sent.text!r} (queued={sent.queued}, {sent.tries} tries) is in "
                f"history {len(found)} times"
            )
            continue
        owner = found[0].turn_id
        if states.get(owner) not in TERMINAL:
            problems.append(f"{conv}: send {sent.text!r} was taken by turn {owner!r}, which has not ended")
    return problems


def resumed_count(recorder: Recorder, conversations: Iterable[str]) -> int:
    return sum(1 for c in conversations for e in recorder.received(c) if e.kind == "turn_resumed")


def report(problems: Sequence[str], cluster: Cluster, seed: int | None = None) -> None:
    """Fail with every violation found, the seed and the services' last log lines."""
    if problems:
        raise AssertionError(
            f"{len(problems)} violation(s)"
            + (f" (seed {seed}; rerun with DISPATCH_FAULT_SEED={seed})" if seed is not None else "")
            + ":\n  "
            + "\n  ".join(problems[:60])
            + "\n\nservice logs (tails):\n"
            + cluster.logs()
        )


def describe(conversations: Mapping[str, str], recorder: Recorder) -> str:
    return "; ".join(f"{name}: {recorder.doing(conv)}" for name, conv in conversations.items())
