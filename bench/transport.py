"""Transport fan-out: events/s to 1 and 100 subscribers, and token-to-client latency, against raw grpc.aio.

The whole stack runs in this process on free loopback ports (``tests.stack``:
the store on SQLite in a temporary directory, exec, kernel, transport), with a
provider that replays ``ScriptedProvider`` scripts, picked by the user
message's text. Each subscriber is a ``dispatch.v1.Dispatch/Subscribe`` call on
a channel of its own (``GRPC_OPTIONS`` plus a channel-local subchannel pool, so
100 subscribers are 100 TCP connections), authenticated with per-call metadata
(no client interceptor). Every subscriber checks that it gets each event once
and in order, and follows a ``Resync`` by subscribing again, as a client must.

- **Throughput**: the subscribers subscribe to a fresh conversation and wait
  for a one-delta "ping" turn to seal, so all of them are live on the
  transport's hub; then ``Send`` starts a turn that streams N ~20-byte text
  deltas with no pause (the scripted provider never yields to the loop between
  them: the kernel emits the deltas in one burst). Time runs from ``Send`` to
  the last subscriber receiving ``turn_sealed``; delivered events/s = the
  turn's events x subscribers / that time. It includes everything the turn does
  before it seals (starting it, committing its events to SQLite, its metrics):
  the cost of the whole path, not of the fan-out alone. ``--yield-deltas``
  puts a ``sleep 0`` before each delta instead, as a provider reading a socket
  yields to the loop between chunks.
- **Raw baseline**: a plain ``grpc.aio`` server in the same process, with
  ``GRPC_OPTIONS``, and one server-streaming method returning
  ``SubscribeResponse``. Each subscriber's handler waits for a start signal,
  then streams the very events the transport delivered for that turn (captured
  in an untimed run): one event per message (**raw 1/msg**, the naive way), or
  ``BATCH_MAX`` (64) per message (**raw 64/msg**, batched like the transport,
  minus its 1 ms window). Same readers and channels; timed from the start
  signal to the last subscriber receiving the last event (``turn_sealed``).
- **Latency**: one subscriber, a turn of M text deltas, each after a 5 ms
  pause. Token-to-client latency = the client's wall clock when the message
  arrives - the event's ``time`` (stamped by the kernel when it emits the
  event; one machine, one clock). The raw server streams the same events at
  the same pace, one per message, stamping ``time`` as it yields each.

Clients and servers share one process and one event loop (uvloop, as the
services run; ``--loop asyncio`` for the default loop), so the clients' own
work counts against both sides alike. Samples of the three paths alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import uvloop

from dispatch.kernel.providers.base import ProviderEvent, ProviderRequest, text_of
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.server import GRPC_OPTIONS
from dispatch.transport.fanout import BATCH_MAX, BATCH_WINDOW
from dispatch.v1 import common_pb2, transport_pb2, transport_pb2_grpc

if TYPE_CHECKING:
    from tests.stack import Stack

TEXT_BYTES = 20  # bytes of text per delta: a streamed token or two
PACE = 0.005  # seconds before each delta of the latency turn
PING = "ping"
TARGET_RATIO = 0.7  # transport / raw delivered events/s, wanted (the issue)
TARGET_P99_MS = 5.0  # token-to-client p99 on loopback, wanted (the issue)
TIMEOUT = 300.0  # seconds one measured turn may take before the benchmark gives up
RAW_SERVICE, RAW_METHOD = "bench.RawStream", "Subscribe"
# Every subscriber on its own connection: grpc otherwise shares one between like channels.
CLIENT_OPTIONS: list[tuple[str, int]] = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
RAW_NAIVE, RAW_BATCHED, RAW_PACED = "raw 1/msg", f"raw {BATCH_MAX}/msg", "raw paced"


def delta(i: int) -> str:
    return f"tok{i:06d} ".ljust(TEXT_BYTES, "x")


def burst_script(n: int, *, yield_between: bool = False) -> dict[str, Any]:
    step: list[dict[str, Any]] = []
    for i in range(n):
        if yield_between:
            step.append({"type": "sleep", "seconds": 0})
        step.append({"type": "text_delta", "text": delta(i)})
    return {"steps": [step]}


def paced_script(n: int) -> dict[str, Any]:
    step: list[dict[str, Any]] = []
    for i in range(n):
        step += [{"type": "sleep", "seconds": PACE}, {"type": "text_delta", "text": delta(i)}]
    return {"steps": [step]}


class ScriptRouter:
    """A provider that replays the ``ScriptedProvider`` named by the last user message's text."""

    name = "scripted"
    model = "scripted"
    endpoint = "scripted:bench"

    def __init__(self, scripts: Mapping[str, dict[str, Any]]):
        self.scripts = {key: ScriptedProvider.from_data(data, where=key) for key, data in scripts.items()}

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        users = [m for m in request.messages if m.role == common_pb2.ROLE_USER]
        return self.scripts[text_of(users[-1])].stream(request)

    async def aclose(self) -> None:
        return None


# Opens a subscriber's stream from an event_seq.
OpenStream = Callable[[int], AsyncIterator[transport_pb2.SubscribeResponse]]


class Reader:
    """One subscriber: reads its stream, checks that every event arrives once and in order,
    subscribes again after a resync, and notes when each turn's ``turn_sealed`` arrived."""

    def __init__(self, open_stream: OpenStream, after_event_seq: int, *, latency: bool = False):
        self.open_stream = open_stream
        self.cursor = after_event_seq
        self.resyncs = 0
        self.messages = 0
        # Wall clock at arrival - event.time, of every text delta (ns).
        self.latency_ns: list[int] | None = [] if latency else None
        self.captured: list[common_pb2.AgentEvent] | None = None
        # perf_counter() when the last turn_started, and the last text delta, arrived.
        self.started = 0.0
        self.last_delta = 0.0
        self.error: BaseException | None = None
        self._sealed: dict[str, asyncio.Future[float]] = {}
        self.task = asyncio.create_task(self._run())

    def reset(self) -> None:
        self.messages = self.resyncs = 0
        if self.latency_ns is not None:
            self.latency_ns.clear()

    def sealed(self, turn_id: str) -> asyncio.Future[float]:
        """perf_counter() when ``turn_sealed`` of ``turn_id`` arrived (or the reader's failure)."""
        fut = self._sealed.get(turn_id)
        if fut is None:
            fut = self._sealed[turn_id] = asyncio.get_running_loop().create_future()
            if self.error is not None:
                fut.set_exception(self.error)
        return fut

    async def _run(self) -> None:
        try:
            while True:
                call = self.open_stream(self.cursor)
                try:
                    async for response in call:
                        now = time.perf_counter()
                        if response.HasField("resync"):
                            self.resyncs += 1
                            break
                        self._take(response.events, now)
                    else:
                        return
                finally:
                    call.cancel()  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
            for fut in self._sealed.values():
                if not fut.done():
                    fut.set_exception(exc)

    def _take(self, events: Sequence[common_pb2.AgentEvent], now: float) -> None:
        self.messages += 1
        first, last = events[0].event_seq, events[-1].event_seq
        if first != self.cursor + 1 or last != self.cursor + len(events):
            raise AssertionError(f"got events {first}..{last} ({len(events)}) after {self.cursor}")
        self.cursor = last
        if self.latency_ns is not None:
            wall = time.time_ns()
            self.latency_ns += [wall - e.time.ToNanoseconds() for e in events if e.HasField("text_delta")]
        if self.captured is not None:
            self.captured += events
        for e in events:
            kind = e.WhichOneof("kind")
            if kind == "text_delta":
                self.last_delta = now
            elif kind == "turn_started":
                self.started = now
            elif kind == "turn_sealed":
                fut = self.sealed(e.turn_id)
                if not fut.done():
                    fut.set_result(now)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class RawServer:
    """A plain grpc.aio server that streams pre-built events to every subscriber on a signal."""

    def __init__(self) -> None:
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        handler = grpc.unary_stream_rpc_method_handler(
            self._subscribe,
            request_deserializer=transport_pb2.SubscribeRequest.FromString,
            response_serializer=transport_pb2.SubscribeResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(RAW_SERVICE, {RAW_METHOD: handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.arm(RAW_NAIVE, [], 0)

    def arm(self, mode: str, events: Sequence[common_pb2.AgentEvent], subscribers: int) -> None:
        """Get ready for ``subscribers`` calls; ``ready`` is set when all have arrived."""
        self.mode = mode
        self.events = list(events)
        self.expected = subscribers
        self.arrived = 0
        self.ready = asyncio.Event()
        self.go = asyncio.Event()

    async def _subscribe(
        self, request: transport_pb2.SubscribeRequest, context: Any
    ) -> AsyncIterator[transport_pb2.SubscribeResponse]:
        self.arrived += 1
        if self.arrived == self.expected:
            self.ready.set()
        await self.go.wait()
        events = self.events
        if self.mode == RAW_NAIVE:
            for e in events:
                yield transport_pb2.SubscribeResponse(events=[e])
        elif self.mode == RAW_BATCHED:
            for i in range(0, len(events), BATCH_MAX):
                yield transport_pb2.SubscribeResponse(events=events[i : i + BATCH_MAX])
        else:  # paced: the pause before each delta, stamped as it is sent
            for e in events:
                if e.HasField("text_delta"):
                    await asyncio.sleep(PACE)
                stamped = common_pb2.AgentEvent()
                stamped.CopyFrom(e)
                stamped.time.FromNanoseconds(time.time_ns())
                yield transport_pb2.SubscribeResponse(events=[stamped])


@dataclass(frozen=True)
class Sample:
    seconds: float  # to the last subscriber's turn_sealed
    first: float  # seconds to the last subscriber's turn_started
    last_delta: float  # seconds to the last subscriber's last text delta
    events: int  # the turn's events (each subscriber gets them all)
    subscribers: int
    messages: int  # stream messages, all subscribers
    resyncs: int

    @property
    def per_s(self) -> float:
        return self.events * self.subscribers / self.seconds


async def settle(readers: Sequence[Reader], turn_id: str, t0: float, after_event_seq: int) -> Sample:
    """Wait for every reader to see ``turn_id`` (its events follow ``after_event_seq``) sealed;
    the sample, timed from ``t0``."""
    ends = await asyncio.wait_for(asyncio.gather(*(r.sealed(turn_id) for r in readers)), TIMEOUT)
    if any(r.cursor != readers[0].cursor for r in readers):
        raise AssertionError("the subscribers ended at different events")
    return Sample(
        seconds=max(ends) - t0,
        first=max(r.started for r in readers) - t0,
        last_delta=max(r.last_delta for r in readers) - t0,
        events=readers[0].cursor - after_event_seq,
        subscribers=len(readers),
        messages=sum(r.messages for r in readers),
        resyncs=sum(r.resyncs for r in readers),
    )


@dataclass
class Bench:
    stack: Stack
    raw: RawServer
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.stack.api_key}"),)

    def channel(self, port: int) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
        self.channels.append(ch)
        return ch

    def dispatch(self) -> transport_pb2_grpc.DispatchAsyncStub:
        return transport_pb2_grpc.DispatchStub(self.channel(self.stack.hosted["transport"].port))

    async def close_channels(self) -> None:
        for ch in self.channels:
            await ch.close()
        self.channels.clear()

    async def transport_turn(
        self, script: str, subscribers: int, *, latency: bool = False, capture: bool = False
    ) -> tuple[Sample, list[Reader]]:
        """``subscribers`` on a fresh conversation, a ping turn, then the turn ``script``, timed."""
        api = self.dispatch()
        conv = await api.CreateConversation(
            transport_pb2.PublicCreateConversationRequest(), metadata=self.metadata
        )
        readers = []
        for _ in range(subscribers):
            stub = self.dispatch()

            def open_stream(after: int, stub: transport_pb2_grpc.DispatchAsyncStub = stub) -> Any:
                request = transport_pb2.SubscribeRequest(conversation_id=conv.id, after_event_seq=after)
                return stub.Subscribe(request, metadata=self.metadata)

            readers.append(Reader(open_stream, 0, latency=latency))
        try:
            ping = await api.Send(
                transport_pb2.SendRequest(conversation_id=conv.id, text=PING), metadata=self.metadata
            )
            await asyncio.wait_for(asyncio.gather(*(r.sealed(ping.turn_id) for r in readers)), TIMEOUT)
            for r in readers:
                r.reset()
            if capture:
                readers[0].captured = []
            t0 = time.perf_counter()
            sent = await api.Send(
                transport_pb2.SendRequest(conversation_id=conv.id, text=script), metadata=self.metadata
            )
            return await settle(readers, sent.turn_id, t0, sent.after_event_seq), readers
        finally:
            for r in readers:
                await r.close()

    async def raw_turn(
        self, mode: str, events: Sequence[common_pb2.AgentEvent], subscribers: int, *, latency: bool = False
    ) -> tuple[Sample, list[Reader]]:
        """The raw server streams ``events`` to ``subscribers``, timed from the start signal."""
        self.raw.arm(mode, events, subscribers)
        readers = []
        for _ in range(subscribers):
            method = self.channel(self.raw.port).unary_stream(
                f"/{RAW_SERVICE}/{RAW_METHOD}",
                request_serializer=transport_pb2.SubscribeRequest.SerializeToString,
                response_deserializer=transport_pb2.SubscribeResponse.FromString,
            )

            def open_stream(after: int, method: Any = method) -> Any:
                return method(transport_pb2.SubscribeRequest())

            readers.append(Reader(open_stream, events[0].event_seq - 1, latency=latency))
        try:
            await asyncio.wait_for(self.raw.ready.wait(), TIMEOUT)
            t0 = time.perf_counter()
            self.raw.go.set()
            return await settle(readers, events[-1].turn_id, t0, events[0].event_seq - 1), readers
        finally:
            for r in readers:
                await r.close()


@dataclass
class Result:
    subscribers: int
    events: int
    samples: dict[str, list[Sample]]

    def rate(self, path: str) -> float:
        return statistics.median(s.per_s for s in self.samples[path])


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def check_payload(events: Sequence[common_pb2.AgentEvent]) -> None:
    kinds = [e.WhichOneof("kind") for e in events]
    if not kinds or kinds[0] != "turn_started" or kinds[-1] != "turn_sealed":
        raise AssertionError(f"captured {len(kinds)} events, not one whole turn: {kinds[:3]}...{kinds[-3:]}")


async def run(args: argparse.Namespace) -> tuple[list[Result], dict[str, list[float]]]:
    from tests.stack import start_stack  # the test fixture's in-process stack; only this benchmark needs it

    pairs = list(zip(args.subscribers, args.events, strict=True))
    paced = f"paced {args.latency_deltas}"
    scripts: dict[str, dict[str, Any]] = {PING: burst_script(1), paced: paced_script(args.latency_deltas)}
    for _, n in pairs:
        scripts[f"burst {n}"] = burst_script(n, yield_between=args.yield_deltas)
    results: list[Result] = []
    latency: dict[str, list[float]] = {"transport": [], RAW_PACED: []}
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-transport-") as tmp:
        stack = await start_stack(Path(tmp), ScriptRouter(scripts), transport=True)
        raw = RawServer()
        await raw.server.start()
        bench = Bench(stack, raw)
        try:
            for subscribers, n in pairs:
                script = f"burst {n}"
                # Untimed: warms both paths, and captures the turn's events for the raw server.
                _, readers = await bench.transport_turn(script, 1, capture=True)
                payload = readers[0].captured or []
                check_payload(payload)
                await bench.raw_turn(RAW_NAIVE, payload, 1)
                await bench.close_channels()
                result = Result(subscribers, len(payload), {"transport": [], RAW_NAIVE: [], RAW_BATCHED: []})
                for _ in range(args.repeats):
                    result.samples["transport"].append((await bench.transport_turn(script, subscribers))[0])
                    await bench.close_channels()
                    for mode in (RAW_NAIVE, RAW_BATCHED):
                        result.samples[mode].append((await bench.raw_turn(mode, payload, subscribers))[0])
                        await bench.close_channels()
                results.append(result)
                print(format_result(result), flush=True)
            await bench.transport_turn(PING, 1)  # warm-up
            for _ in range(args.repeats):
                _, readers = await bench.transport_turn(paced, 1, latency=True, capture=True)
                latency["transport"] += [ns / 1e6 for ns in readers[0].latency_ns or []]
                payload = readers[0].captured or []
                check_payload(payload)
                _, readers = await bench.raw_turn(RAW_PACED, payload, 1, latency=True)
                latency[RAW_PACED] += [ns / 1e6 for ns in readers[0].latency_ns or []]
                await bench.close_channels()
        finally:
            await bench.close_channels()
            await raw.server.stop(1.0)
            await stack.stop(1.0)
    return results, latency


HEADER = (
    f"{'subs':>4} {'events':>6}  {'path':<10} {'events/s':>9} {'ratio':>6} {'1st ms':>7} {'deltas ms':>9}"
    f" {'sealed ms':>9} {'msgs/sub':>8} {'resyncs':>7}"
)


def format_result(result: Result) -> str:
    transport = result.rate("transport")
    lines = []
    for path, samples in result.samples.items():
        rate = result.rate(path)
        ratio = "" if path == "transport" else f"{transport / rate:.2f}"
        mid = sorted(samples, key=lambda s: s.per_s)[len(samples) // 2]
        lines.append(
            f"{result.subscribers:>4} {result.events:>6}  {path:<10} {rate:>9.0f} {ratio:>6}"
            f" {mid.first * 1e3:>7.1f} {mid.last_delta * 1e3:>9.1f} {mid.seconds * 1e3:>9.1f}"
            f" {mid.messages / mid.subscribers:>8.0f} {sum(s.resyncs for s in samples):>7}"
        )
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench transport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int_list, default=[1, 100], help="subscriber counts: 1,100")
    parser.add_argument(
        "--events",
        type=int_list,
        default=[5000, 1000],
        help="text deltas in the throughput turn: one count, or one per subscriber count",
    )
    parser.add_argument("--latency-deltas", type=int, default=400, help="paced deltas in the latency turn")
    parser.add_argument("--repeats", type=int, default=3, help="samples per measurement (median shown)")
    parser.add_argument(
        "--yield-deltas", action="store_true", help="the provider yields to the loop before each delta"
    )
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    if len(args.events) == 1:
        args.events = args.events * len(args.subscribers)
    if len(args.events) != len(args.subscribers):
        parser.error("--events takes one count, or one per subscriber count")

    producer = "a sleep 0 before each" if args.yield_deltas else "in one burst"
    print(f"transport fan-out vs a raw grpc.aio server: one process, loopback, {args.loop}")
    print(f"python {platform.python_version()} on {platform.machine()}, grpc {grpc.__version__}")
    print(
        f"~{TEXT_BYTES}-byte text deltas, {producer}; the transport batches up to {BATCH_MAX} events,"
        f" {BATCH_WINDOW * 1e3:g} ms window; median of {args.repeats} samples"
    )
    print()
    print(HEADER)
    runner = uvloop.run if args.loop == "uvloop" else asyncio.run
    results, latency = runner(run(args))
    print()
    print(f"token-to-client latency, 1 subscriber, {args.latency_deltas} deltas {PACE * 1e3:g} ms apart:")
    print(f"{'path':<10} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'samples':>8}")
    for path, ms in latency.items():
        print(
            f"{path:<10} {percentile(ms, 50):>7.2f} {percentile(ms, 90):>7.2f} {percentile(ms, 99):>7.2f}"
            f" {max(ms):>7.2f} {len(ms):>8}"
        )
    print()
    print("events/s = the turn's events x subscribers / the time to the last subscriber's turn_sealed;")
    print("ratio = transport events/s / the row's; 1st, deltas, sealed: ms to the last subscriber's")
    print("turn_started, last text delta and turn_sealed (from Send, or the raw start signal).")
    for result in results:
        for path in (RAW_NAIVE, RAW_BATCHED):
            ratio = result.rate("transport") / result.rate(path)
            verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
            print(
                f"target, {result.subscribers} subscriber(s): transport >= {TARGET_RATIO:g} x {path};"
                f" measured {ratio:.2f}: {verdict}"
            )
    p99 = percentile(latency["transport"], 99)
    verdict = "met" if p99 <= TARGET_P99_MS else "NOT met"
    print(f"target: token-to-client p99 <= {TARGET_P99_MS:g} ms; measured {p99:.2f} ms: {verdict}")
    return 0
