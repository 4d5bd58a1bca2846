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
import shlex
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
from dispatch.shared.server import ensure_bindable, run
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

    async def stop(self, deadline: float) -> None:
        """SIGTERM, then SIGKILL if it is still running at ``deadline`` (loop time)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout_at(deadline):
                await self.proc.wait()
        except TimeoutError:
            log.warning("%s did not stop in time; killing it", self.name)
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


@dataclass(frozen=True)
class Plan:
    """What `up` starts, settled (and checked) before anything starts."""

    provider: config.ProviderConfig  # the default agent's
    data_dir: Path
    database_url: str
    # The default workspace root for a first start (the store keeps an older one unless
    # --workspace or DISPATCH_WORKSPACE says otherwise).
    workspace_root: str
    transport_listen: str
    http_listen: str


async def _up(args: argparse.Namespace, plan: Plan) -> int:
    database_url, data_dir = plan.database_url, plan.data_dir
    transport_listen, http_listen = plan.transport_listen, plan.http_listen
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
            root = await default_workspace_root(store.address) or plan.workspace_root
            _banner(transport.address, plan, key_file, root)
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
            await stop_all(children, args.grace)


# Past the grace, what a child needs to exit once it has drained (interpreter shutdown).
EXIT_SLACK = 2.0


async def stop_all(children: Sequence[Child], grace: float) -> None:
    """Stop the services within one ``grace`` in all, not one each: the transport and the
    kernel drain together (the transport ends its streams at once; the kernel lets turns
    reach their end and needs the store and exec meanwhile), then exec and the store."""
    deadline = asyncio.get_running_loop().time() + grace + EXIT_SLACK
    first = [c for c in children if c.name in ("transport", "kernel")]
    rest = [c for c in children if c not in first]
    for wave in (first, rest):
        await asyncio.gather(*(c.stop(deadline) for c in wave))


def _client_command(*, absolute: bool = False) -> str:
    """How to run the `dispatch` CLI installed next to this interpreter (relative to the
    current directory where that is shorter, unless ``absolute``)."""
    beside = Path(sys.executable).parent / "dispatch"
    if not beside.exists():
        return "dispatch"
    if absolute:
        return str(beside)
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


async def default_workspace_root(store_address: str) -> str:
    """The root of the local tenant's default workspace, if it has one yet."""
    async with grpc.aio.insecure_channel(store_address) as channel:
        stub = store_pb2_grpc.ConversationStoreStub(channel)
        request = store_pb2.ListWorkspacesRequest(tenant_id=LOCAL_TENANT, page_size=100)
        while True:
            page = await stub.ListWorkspaces(request, timeout=30)
            for ws in page.workspaces:
                if ws.is_default:
                    return ws.root
            if not page.next_page_token:
                return ""
            request.page_token = page.next_page_token


def chat_hint(address: str, data_dir: Path) -> str:
    """The chat command the banner prints, runnable as printed: it names the data directory
    (where the CLI finds the API key) unless it is the one the CLI looks in by default."""
    question = '"what is in this workspace?"'
    if data_dir == Path(".dispatch").resolve():
        return f"{_client_command()} chat --address {address} {question}"
    # Another data directory: a line that works from any directory.
    where = shlex.quote(str(data_dir))
    return f"{_client_command(absolute=True)} chat --address {address} --data-dir {where} {question}"


def _banner(address: str, plan: Plan, key_file: Path, workspace_root: str) -> None:
    lines = [
        "",
        f"Dispatch is up. Transport (gRPC): {address}",
        f"  HTTP:      http://{plan.http_listen} (NDJSON and Server-Sent Events)"
        if plan.http_listen
        else "  HTTP:      off",
        f"  model:     {plan.provider.display}",
        f"  workspace: {workspace_root} (tools run here; --workspace changes it)",
        f"  history:   {plan.database_url}",
        f"  API key:   {key_file} (the dispatch CLI reads it; other clients send",
        "             `authorization: Bearer <key>`, e.g. DISPATCH_API_KEY=$(cat that file))",
        "",
        "Chat with it from another terminal:",
        f"  {chat_hint(address, plan.data_dir)}",
    ]
    if plan.provider.kind == "demo":
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
    # Everything that can be refused is refused here, before any service starts, naming its key.
    peers = {"DISPATCH_STORE_ADDRESS": "-", "DISPATCH_EXEC_ADDRESS": "-"}  # known later
    kernel = config.kernel_config(vars(args), {**env, **peers}, file)
    from dispatch.kernel.agents import check_agents  # the agents' tools and permission rules
    from dispatch.kernel.tools import BUILTIN_TOOLS

    check_agents(kernel, BUILTIN_TOOLS)
    agent = kernel.all_agents()[kernel.default_agent]
    provider = kernel.all_providers()[agent.provider]
    store = config.store_config({"workspace": args.workspace}, env, file)
    transport_listen = args.listen or env.get("DISPATCH_TRANSPORT_LISTEN") or config.DEFAULT_TRANSPORT_LISTEN
    http_listen = args.http_listen or env.get("DISPATCH_HTTP_LISTEN") or config.DEFAULT_HTTP_LISTEN
    if http_listen == "off":
        http_listen = ""
    ensure_bindable(transport_listen, "--listen")
    if http_listen:
        ensure_bindable(http_listen, "--http-listen")
    data_dir = config.data_dir(args.data_dir, env)
    data_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan(
        provider=provider,
        data_dir=data_dir,
        database_url=config.local_database_url(data_dir, env),
        workspace_root=store.default_workspace_root,
        transport_listen=transport_listen,
        http_listen=http_listen,
    )
    result = 1

    async def main() -> None:
        nonlocal result
        result = await _up(args, plan)

    run(main)
    return result
