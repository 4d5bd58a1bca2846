"""Conversation-store throughput and latency over a real gRPC channel, on SQLite and PostgreSQL.

Each backend is served in-process by ``dispatch.store.server.start`` on
127.0.0.1:0 and driven through a ``grpc.aio`` channel with the services'
``GRPC_OPTIONS``; client and server share one event loop and one process.
SQLite lives in a temporary directory; PostgreSQL is a throwaway server
(``tests.postgres.PostgresServer``: initdb, a free port, stopped afterwards).

The baseline is the same server's ``grpc.health.v1.Health/Check``: a unary
round trip that does no work, measured the same way in the same run, so every
rate also reads as a share of what the channel itself allows. The AppendStream rows
are the same one-message appends sent as the kernel sends them, as messages on one
long-lived stream (``dispatch.shared.mux``), beside the unary Append rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatch.shared.config import StoreConfig
from dispatch.shared.mux import MuxClient
from dispatch.shared.server import GRPC_OPTIONS, bound_address
from dispatch.store.server import start
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc

TENANT = "bench"
TEXT = "x" * 100  # ~100-byte text chunks, about a streamed model delta's size
BATCH = 100  # messages per call in the batched append
CONCURRENT = 8  # callers in the concurrent append, one conversation each
LONG = 10_000  # messages in the long conversation read by LoadSince
SHORT = 100  # messages in the short one
TAIL = 50  # LoadSince reads the last TAIL messages
TARGETS = {"sqlite": 20_000.0, "postgres": 10_000.0}  # batched chunks/s wanted (the issue)


def message(text: str = TEXT) -> common_pb2.Message:
    return common_pb2.Message(
        role=common_pb2.ROLE_ASSISTANT, chunks=[common_pb2.Chunk(text=common_pb2.TextChunk(text=text))]
    )


@dataclass(frozen=True)
class Row:
    backend: str
    what: str
    calls_per_s: float
    chunks_per_call: int  # 0: not an append
    p50_ms: float
    p99_ms: float
    callers: int

    @property
    def chunks_per_s(self) -> float:
        return self.calls_per_s * self.chunks_per_call


Call = Callable[[], Awaitable[object]]


async def rate(calls: Sequence[Call], seconds: float) -> tuple[float, list[float]]:
    """Calls per second of one loop per ``calls`` item, each awaiting its call back to back
    for ``seconds``; and every call's latency (s)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(call: Call) -> None:
        while (t0 := time.perf_counter()) < deadline:
            await call()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(call) for call in calls))
    return len(latencies) / (time.perf_counter() - t0), latencies


def timed(
    backend: str,
    what: str,
    per_s: float,
    latencies: Sequence[float],
    *,
    chunks_per_call: int = 0,
    callers: int = 1,
) -> Row:
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    return Row(backend, what, per_s, chunks_per_call, p50_ms=p50, p99_ms=p99, callers=callers)


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure_backend(name: str, database_url: str, workdir: str, seconds: float) -> list[Row]:
    cfg = StoreConfig(listen="127.0.0.1:0", database_url=database_url, default_workspace_root=workdir)
    hosted = await start(cfg)
    try:
        async with grpc.aio.insecure_channel(
            bound_address(cfg.listen, hosted.port), options=GRPC_OPTIONS
        ) as ch:
            store = store_pb2_grpc.ConversationStoreStub(ch)
            health = health_pb2_grpc.HealthStub(ch)

            async def conversation() -> str:
                conv = await store.CreateConversation(store_pb2.CreateConversationRequest(tenant_id=TENANT))
                return str(conv.id)

            async def fill(conversation_id: str, n: int) -> int:
                last = 0
                for i in range(0, n, BATCH):
                    req = store_pb2.AppendRequest(
                        tenant_id=TENANT,
                        conversation_id=conversation_id,
                        messages=[message() for _ in range(min(BATCH, n - i))],
                    )
                    last = (await store.Append(req)).last_seq
                return last

            rows: list[Row] = []
            check = health_pb2.HealthCheckRequest(service="")

            async def health_check() -> None:
                await health.Check(check)  # type: ignore[attr-defined]

            await rate([health_check], min(0.3, seconds))  # warm the channel and the loop; not shown
            rows.append(timed(name, "health Check (baseline)", *await rate([health_check], seconds)))
            rows.append(
                timed(
                    name,
                    f"health Check, {CONCURRENT} callers",
                    *await rate([health_check] * CONCURRENT, seconds),
                    callers=CONCURRENT,
                )
            )

            def appender(conversation_id: str, n: int) -> Call:
                # A fresh request per call, as a real caller builds one; it is timed with the call.
                def call() -> Awaitable[object]:
                    messages = [message() for _ in range(n)]
                    return store.Append(
                        store_pb2.AppendRequest(
                            tenant_id=TENANT, conversation_id=conversation_id, messages=messages
                        )
                    )

                return call

            one = appender(await conversation(), 1)
            await rate([one], min(0.3, seconds))  # warm-up
            rows.append(timed(name, "Append 1 msg, 1 caller", *await rate([one], seconds), chunks_per_call=1))
            callers = [appender(await conversation(), 1) for _ in range(CONCURRENT)]
            rows.append(
                timed(
                    name,
                    f"Append 1 msg, {CONCURRENT} callers",
                    *await rate(callers, seconds),
                    chunks_per_call=1,
                    callers=CONCURRENT,
                )
            )
            # The same appends as messages on one AppendStream (as the kernel sends them).
            appends: MuxClient[store_pb2.AppendStreamRequest, store_pb2.AppendStreamResponse] = MuxClient(
                store.AppendStream, "store append"
            )

            def streamer(conversation_id: str) -> Call:
                def call() -> Awaitable[object]:
                    request = store_pb2.AppendRequest(
                        tenant_id=TENANT, conversation_id=conversation_id, messages=[message()]
                    )
                    return appends.call(store_pb2.AppendStreamRequest(append=request), 30.0)

                return call

            streamed = streamer(await conversation())
            await rate([streamed], min(0.3, seconds))  # warm-up (opens the stream)
            rows.append(
                timed(
                    name, "AppendStream 1 msg, 1 caller", *await rate([streamed], seconds), chunks_per_call=1
                )
            )
            on_one_stream = [streamer(await conversation()) for _ in range(CONCURRENT)]
            rows.append(
                timed(
                    name,
                    f"AppendStream 1 msg, {CONCURRENT} callers",
                    *await rate(on_one_stream, seconds),
                    chunks_per_call=1,
                    callers=CONCURRENT,
                )
            )
            await appends.close()
            batched = appender(await conversation(), BATCH)
            rows.append(
                timed(
                    name,
                    f"Append {BATCH} msgs, 1 caller",
                    *await rate([batched], seconds),
                    chunks_per_call=BATCH,
                )
            )

            for size in (LONG, SHORT):
                conversation_id = await conversation()
                last = await fill(conversation_id, size)
                req = store_pb2.LoadSinceRequest(
                    tenant_id=TENANT, conversation_id=conversation_id, after_seq=last - TAIL, limit=0
                )

                async def load(req: store_pb2.LoadSinceRequest = req) -> None:
                    got = await store.LoadSince(req)
                    assert len(got.messages) == TAIL, len(got.messages)

                await load()
                label = f"LoadSince last {TAIL} of {size:,}".replace(",", " ")
                rows.append(timed(name, label, *await rate([load], seconds)))
            return rows
    finally:
        await hosted.stop(1.0)


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A fresh database on a throwaway PostgreSQL server; the server is stopped afterwards."""
    from tests.postgres import PostgresServer  # only this benchmark needs psycopg and the server binaries

    # Under /tmp, not inside a private directory: as root, PostgresServer chowns this root to
    # the `postgres` user, who must be able to reach it.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="dispatch-bench-pg-"))).start()
    try:
        with server.database() as url:
            yield url
    finally:
        server.stop()


async def run(backends: Sequence[str], seconds: float) -> list[Row]:
    rows: list[Row] = []
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="dispatch-bench-store-") as tmp:
            if backend == "sqlite":
                rows += await measure_backend(backend, f"sqlite:///{tmp}/store.db", tmp, seconds)
            else:
                with postgres() as url:
                    rows += await measure_backend(backend, url, tmp, seconds)
        for row in rows:
            if row.backend == backend:
                print(format_row(row, baseline(rows, backend, row.callers)), flush=True)
    return rows


def baseline(rows: Sequence[Row], backend: str, callers: int) -> float:
    """The health Check rate of the backend's server with as many callers."""
    return next(
        r.calls_per_s
        for r in rows
        if r.backend == backend and r.what.startswith("health Check") and r.callers == callers
    )


HEADER = (
    f"{'backend':<9} {'measurement':<30} {'calls/s':>9} {'chunks/s':>9} {'vs health':>9}"
    f" {'p50 ms':>7} {'p99 ms':>7}"
)


def format_row(row: Row, health_per_s: float) -> str:
    chunks = f"{row.chunks_per_s:>9.0f}" if row.chunks_per_call else f"{'':>9}"
    return (
        f"{row.backend:<9} {row.what:<30} {row.calls_per_s:>9.0f} {chunks}"
        f" {row.calls_per_s / health_per_s:>9.2f} {row.p50_ms:>7.2f} {row.p99_ms:>7.2f}"
    )


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="how long each measurement runs")
    parser.add_argument("--backends", default="sqlite,postgres", help="sqlite, postgres or both")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(TARGETS)
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")

    print(f"conversation store over gRPC, {args.seconds:g} s per measurement; ~{len(TEXT)}-byte text chunks")
    print(f"python {platform.python_version()} on {platform.machine()}, grpc {grpc.__version__}")
    print()
    print(HEADER)
    rows = asyncio.run(run(backends, args.seconds))
    print()
    print("vs health: calls/s over the same server's health Check calls/s with as many callers;")
    print("chunks/s = calls/s x text chunks per call; p50/p99: latency of one call, in ms.")
    for backend in backends:
        got = next(r.chunks_per_s for r in rows if r.backend == backend and r.chunks_per_call == BATCH)
        target = TARGETS[backend]
        verdict = "met" if got >= target else "NOT met"
        print(f"target {backend}: >= {target:,.0f} chunks/s batched; measured {got:,.0f}: {verdict}")
    return 0
