"""``dispatchd up``: the four services as separate processes on loopback.

Internal services listen on free loopback ports and report the address they
bound through a ready file; the kernel and the transport are started once
their peers are known. ``up`` waits until all four report SERVING over
grpc.health.v1, then watches them: Ctrl-C or SIGTERM stops all four (the
public side first), and if one dies it says which and why and stops the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatch.shared import config
from dispatch.shared.server import run
from dispatch.v1 import store_pb2, store_pb2_grpc

log = logging.getLogger("dispatchd.up")

READY_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # If `up` is killed outright its children must not outlive it.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_file: Path
    proc: asyncio.subprocess.Process | None = None
    address: str = ""
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Own session: Ctrl-C reaches `up` only, which stops the children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            print(line, file=sys.stderr, flush=True)

    def why(self) -> str:
        assert self.proc is not None
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        last = "\n".join(f"    {line}" for line in list(self.tail)[-8:])
        return f"{self.name} {how}" + (f"; its last words:\n{last}" if last else "")

    async def wait_ready(self, deadline: float) -> str:
        loop = asyncio.get_running_loop()
        assert self.proc is not None
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise ChildDied(self)
            if self.ready_file.exists():
                self.address = self.ready_file.read_text().strip()
                return self.address
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start within {READY_TIMEOUT:.0f}s")

    async def stop(self, grace: float) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=grace + 2.0)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", self.name, grace + 2.0)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self.pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pump, timeout=1.0)


class ChildDied(Exception):
    def __init__(self, child: Child):
        super().__init__(child.why())
        self.child = child


async def wait_serving(address: str, deadline: float) -> None:
    """Poll grpc.health.v1 until the server at ``address`` says SERVING."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed omits its methods
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{address} did not report SERVING in time")
            await asyncio.sleep(0.05)


def _flag_args(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


async def _up(
    args: argparse.Namespace, env: Mapping[str, str], provider: config.ProviderConfig, data_dir: Path
) -> int:
    database_url = config.local_database_url(data_dir, env)
    transport_listen = args.listen or env.get("DISPATCH_TRANSPORT_LISTEN") or config.DEFAULT_TRANSPORT_LISTEN
    http_listen = args.http_listen or env.get("DISPATCH_HTTP_LISTEN") or config.DEFAULT_HTTP_LISTEN
    if http_listen == "off":
        http_listen = ""
    py = [sys.executable, "-m", "dispatch.cli"]
    common = ["--grace", str(args.grace), "--log-level", args.log_level, *_flag_args(args, ["config"])]

    with tempfile.TemporaryDirectory(prefix="dispatch-up-") as tmp:
        run_dir = Path(tmp)

        def child(name: str, extra: list[str], listen: str = "127.0.0.1:0") -> Child:
            ready = run_dir / f"{name}.addr"
            argv = [*py, name, "--listen", listen, "--ready-file", str(ready), *common, *extra]
            return Child(name, argv, ready)

        workspace = ["--workspace", args.workspace] if args.workspace else []
        store = child("store", ["--database-url", database_url, *workspace])
        exec_ = child("exec", [])
        children = [store, exec_]
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            deadline = loop.time() + READY_TIMEOUT
            for c in children:
                await c.start()
            await asyncio.gather(*(c.wait_ready(deadline) for c in children))
            key_file = await ensure_local_key(store.address, data_dir)
            kernel = child(
                "kernel",
                [
                    "--store",
                    store.address,
                    "--exec",
                    exec_.address,
                    *_flag_args(args, ["provider", "model", "base_url", "script"]),
                ],
            )
            children.append(kernel)
            await kernel.start()
            await kernel.wait_ready(deadline)
            http = ["--http-listen", http_listen] if http_listen else []
            transport = child(
                "transport", ["--kernel", kernel.address, "--store", store.address, *http], transport_listen
            )
            children.append(transport)
            await transport.start()
            await transport.wait_ready(deadline)
            await asyncio.gather(*(wait_serving(c.address, deadline) for c in children))
            _banner(transport.address, provider, database_url, key_file, http_listen)
            exited = [asyncio.create_task(c.proc.wait()) for c in children if c.proc is not None]
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopping, *exited], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stopping in done:
                print("\nstopping Dispatch ...", file=sys.stderr)
                return 0
            dead = next(c for c in children if c.proc is not None and c.proc.returncode is not None)
            print(f"dispatchd up: {dead.why()}\nstopping the other services.", file=sys.stderr)
            return 1
        except ChildDied as exc:
            print(f"dispatchd up: {exc}\nstopping the other services.", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"dispatchd up: {exc}; stopping.", file=sys.stderr)
            return 1
        finally:
            # Public side first, so no new work arrives while the rest drain.
            for c in reversed(children):
                await c.stop(args.grace)


def _client_command() -> str:
    """How to run the `dispatch` CLI installed next to this interpreter."""
    beside = Path(sys.executable).parent / "dispatch"
    if not beside.exists():
        return "dispatch"
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


LOCAL_TENANT = "local"
KEY_FILE = "api_key"


async def ensure_local_key(store_address: str, data_dir: Path) -> Path:
    """The data directory's API key file, made on first start: a key of the local tenant,
    readable by this user only. The dispatch CLI finds it there."""
    path = data_dir / KEY_FILE
    if path.exists():
        return path
    async with grpc.aio.insecure_channel(store_address) as channel:
        created = await store_pb2_grpc.ConversationStoreStub(channel).CreateApiKey(
            store_pb2.CreateApiKeyRequest(tenant_id=LOCAL_TENANT, name=f"dispatchd up ({data_dir})"),
            timeout=30,
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(created.secret + "\n")
    print(f"created an API key for tenant {LOCAL_TENANT!r} in {path} (only you can read it)", flush=True)
    return path


def _banner(
    address: str, provider: config.ProviderConfig, database_url: str, key_file: Path, http_listen: str
) -> None:
    lines = [
        "",
        f"Dispatch is up. Transport (gRPC): {address}",
        f"  HTTP:     http://{http_listen} (NDJSON and Server-Sent Events)"
        if http_listen
        else "  HTTP:     off",
        f"  model:    {provider.display}",
        f"  history:  {database_url}",
        f"  API key:  {key_file} (the dispatch CLI reads it; other clients send",
        "            `authorization: Bearer <key>`, e.g. DISPATCH_API_KEY=$(cat that file))",
        "",
        "Chat with it from another terminal:",
        f'  {_client_command()} chat --address {address} "what is in this workspace?"',
    ]
    if provider.kind == "demo":
        lines += [
            "",
            "No model is configured, so the kernel runs a built-in demo script that makes real",
            "tool calls (it lists the workspace and reads a file). For a real model:",
            "  DISPATCH_MODEL=gpt-4o-mini OPENAI_API_KEY=... dispatchd up",
            "  (any OpenAI-compatible endpoint: add DISPATCH_BASE_URL=http://host:port/v1)",
        ]
    lines += ["", "Ctrl-C stops all four services."]
    print("\n".join(lines), flush=True)


def up(args: argparse.Namespace, env: Mapping[str, str], file: Mapping[str, Any]) -> int:
    provider = config.provider_config(vars(args), env, file)  # fail early, naming the key
    # The same for the providers and agents tables; the peers' addresses come later.
    peers = {"DISPATCH_STORE_ADDRESS": "-", "DISPATCH_EXEC_ADDRESS": "-"}
    config.kernel_config(vars(args), {**env, **peers}, file)
    data_dir = config.data_dir(args.data_dir, env)
    data_dir.mkdir(parents=True, exist_ok=True)
    result = 1

    async def main() -> None:
        nonlocal result
        result = await _up(args, env, provider, data_dir)

    run(main)
    return result
