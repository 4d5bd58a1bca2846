"""The floor under every hop: a request and its answer between two processes, as a unary
gRPC call and as two messages on a bidirectional stream that is already open.

``python -m bench rpc [--calls N] [--repeats R] [--bytes B]``

A server process (``python -m bench.rpc --serve PORT``, uvloop, ``GRPC_OPTIONS``) echoes
bytes on one unary method and one bidi-streaming method, with identity serializers (no
protobuf on either side: the transport alone). The client, in this process, makes N calls
back to back of B bytes each, one at a time, alternating the two paths R times. Reported:
median µs of wall time per round trip, and CPU µs per round trip in the client and the
server (``/proc/<pid>/stat``, user + system), and the stream's figures over the unary's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
import uvloop

from dispatch.shared.server import GRPC_OPTIONS

SERVICE = "bench.Rpc"


def _same(data: bytes) -> bytes:
    return data


async def _serve(port: int) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def echo(requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> object:
        async for request in requests:  # type: ignore[attr-defined]
            yield request

    server = grpc.aio.server(options=GRPC_OPTIONS)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same),
        "Echo": grpc.stream_stream_rpc_method_handler(echo, _same, _same),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _cpu(pid: int | str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    port: int, server_pid: int, calls: int, repeats: int, size: int
) -> dict[str, list[tuple[float, ...]]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), 30)
    payload = b"x" * size
    unary = channel.unary_unary(f"/{SERVICE}/Unary", _same, _same)
    stream = channel.stream_stream(f"/{SERVICE}/Echo", _same, _same)()
    samples: dict[str, list[tuple[float, ...]]] = {"unary call": [], "stream messages": []}

    async def by_unary() -> None:
        for _ in range(calls):
            await unary(payload, timeout=30)

    async def by_stream() -> None:
        for _ in range(calls):
            await stream.write(payload)
            await stream.read()

    paths = {"unary call": by_unary, "stream messages": by_stream}
    try:
        for run in paths.values():  # warm-up
            await run()
        for _ in range(repeats):
            for name, run in paths.items():
                client0, server0, began = _cpu("self"), _cpu(server_pid), time.perf_counter()
                await run()
                wall = time.perf_counter() - began
                client, server = _cpu("self") - client0, _cpu(server_pid) - server0
                samples[name].append((wall / calls * 1e6, client / calls * 1e6, server / calls * 1e6))
    finally:
        await stream.done_writing()
        await channel.close()
    return samples


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench rpc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="round trips per sample")
    parser.add_argument("--repeats", type=int, default=5, help="samples per path (median shown)")
    parser.add_argument("--bytes", type=int, default=200, help="request (and answer) size")
    args = parser.parse_args(list(argv))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.rpc", "--serve", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            print("the echo server did not start", file=sys.stderr)
            return 1
        samples = uvloop.run(_measure(port, server.pid, args.calls, args.repeats, args.bytes))
    finally:
        server.kill()
        server.wait()
    print(
        f"a round trip between two processes, loopback, uvloop, {args.bytes} bytes each way; "
        f"{args.calls} back to back per sample, median of {args.repeats}"
    )
    print(f"{'path':<16} {'wall µs':>8} {'client cpu µs':>14} {'server cpu µs':>14} {'cpu µs, both':>13}")
    medians = {}
    for name, rows in samples.items():
        wall, client, server_cpu = (statistics.median(column) for column in zip(*rows, strict=True))
        medians[name] = (wall, client + server_cpu)
        print(f"{name:<16} {wall:>8.0f} {client:>14.0f} {server_cpu:>14.0f} {client + server_cpu:>13.0f}")
    (unary_wall, unary_cpu), (stream_wall, stream_cpu) = medians["unary call"], medians["stream messages"]
    print(f"stream / unary: wall {stream_wall / unary_wall:.2f}x, cpu {stream_cpu / unary_cpu:.2f}x")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        uvloop.run(_serve(int(sys.argv[2])))
    else:
        sys.exit(main(sys.argv[1:]))
