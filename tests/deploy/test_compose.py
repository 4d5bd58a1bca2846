"""deploy/compose.yaml and deploy/nginx.conf. Docker does not run here, so the compose file is
checked for what would break it (every service healthy-checked, every dispatchd command one
dispatchd takes, addresses and ports that meet, volumes the image owns), and nginx.conf is
run for real by Debian's nginx in front of two real transports and two kernels found through
the store: gRPC (h2c) and the HTTP bridge through it, a whole turn included."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from dispatch import cli
from dispatch.shared import config
from dispatch_client import SyncDispatchClient
from tests.deploy.tools import BUILD_TIMEOUT, ROOT, run, yaml_documents
from tests.e2e.procs import ServiceProcess, free_port, health_status

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 60)

COMPOSE = ROOT / "deploy" / "compose.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}`` and ``${VAR:-default}``, in every string of ``value``."""
    if isinstance(value, str):
        return re.sub(
            r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] if m[2] is not None else ""), value
        )
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = yaml_documents(COMPOSE.read_text())
    parsed: dict[str, Any] = interpolate(doc, {})
    return parsed


def dispatch_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == "dispatch:dev"}


def argv(service: dict[str, Any]) -> list[str]:
    """The dispatchd arguments a service runs with (its entrypoint past ``dispatchd``, then its command)."""
    entrypoint = service.get("entrypoint", ["dispatchd"])
    assert entrypoint[0] == "dispatchd"
    return [*entrypoint[1:], *service.get("command", [])]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "tools" in service.get("profiles", []):
            continue  # run by hand, exits
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", name
    for name, service in compose["services"].items():
        for needed, condition in service.get("depends_on", {}).items():
            assert needed in compose["services"], f"{name} depends on {needed}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in compose["services"][needed], f"{name} waits for {needed}"


def test_commands_are_ones_dispatchd_takes(compose: dict[str, Any]) -> None:
    services = dispatch_services(compose)
    assert {"store", "exec", "kernel-1", "kernel-2", "transport-1", "transport-2", "keys"} <= set(services)
    for name, service in services.items():
        args = cli.parser().parse_args(argv(service) + (["list"] if name == "keys" else []))
        flags = vars(args)
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        # The same config loaders dispatchd runs, on the flags and environment given.
        if args.command == "kernel":
            cfg = config.kernel_config(flags, env, {})
            assert cfg.provider.kind == "demo"  # nothing configured: the built-in demo
        elif args.command == "transport":
            config.transport_config(flags, env, {})
        elif args.command == "exec":
            config.exec_config(flags, env, {})
        if args.command in ("store", "keys"):
            assert env["DISPATCH_DATABASE_URL"].startswith("postgresql://dispatch:dispatch@postgres:5432/")


def test_addresses_and_ports_meet(compose: dict[str, Any]) -> None:
    services = dispatch_services(compose)
    listen = {name: port(flag(argv(s), "--listen")) for name, s in services.items() if "--listen" in argv(s)}
    for name, service in services.items():
        args = argv(service)
        if "--listen" in args:
            # The image's own HEALTHCHECK (for `docker run`) asks this address.
            assert port(service["environment"]["DISPATCH_HEALTH_ADDRESS"]) == listen[name], name
            test = service["healthcheck"]["test"]
            if test[2] == "grpc":
                assert port(test[3]) == listen[name], name
        for peer_flag in ("--store", "--exec", "--advertise"):
            if peer_flag in args:
                host, peer_port = flag(args, peer_flag).rsplit(":", 1)
                assert int(peer_port) == listen[host], f"{name} {peer_flag}"
    for i in (1, 2):
        kernel = argv(services[f"kernel-{i}"])
        assert flag(kernel, "--exec") == "exec:7602"
        # What transports dial, found through the store: this service's own name.
        assert flag(kernel, "--advertise") == f"kernel-{i}:7601"
        assert flag(argv(services[f"transport-{i}"]), "--kernel") == "store"

    # nginx balances exactly the transports, on the ports they serve, and publishes its own.
    conf = NGINX_CONF.read_text()
    grpc_upstream = re.findall(r"server (\S+):(\d+) ", conf.split("upstream transports_http")[0])
    http_upstream = re.findall(
        r"server (\S+):(\d+) ", conf.split("upstream transports_http")[1].split("server {")[0]
    )
    transports = {name: s for name, s in services.items() if argv(s)[0] == "transport"}
    assert {(h, int(p)) for h, p in grpc_upstream} == {(n, listen[n]) for n in transports}
    assert {(h, int(p)) for h, p in http_upstream} == {
        (n, port(flag(argv(s), "--http-listen"))) for n, s in transports.items()
    }
    listens = {int(p) for p in re.findall(r"listen (\d+)", conf)}
    assert compose["services"]["lb"]["ports"] == ["7600:7600", "7610:7610"]
    assert listens == {7600, 7610}
    # Only the load balancer publishes anything.
    assert [n for n, s in compose["services"].items() if s.get("ports")] == ["lb"]


def test_volumes_are_declared_and_owned_by_the_image(compose: dict[str, Any]) -> None:
    dockerfile = DOCKERFILE.read_text()
    owned = set(re.findall(r"install -d -o dispatch -g dispatch -m \d+ (\S+)", dockerfile))
    assert owned == {"/data", "/workspace"}
    assert "COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/dispatch-healthcheck" in dockerfile
    for name, service in dispatch_services(compose).items():
        for mount in service.get("volumes", []):
            volume, target = mount.split(":")[:2]
            assert volume in compose["volumes"], name
            assert target in owned, f"{name} mounts {target}, which the image does not own"
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][1] == "dispatch-healthcheck"
        store_root = flag(argv(service), "--workspace") if "--workspace" in argv(service) else None
        if store_root is not None:
            assert store_root in owned


# ------------------------------------------------------------------ nginx.conf, run for real


def nginx() -> Path:
    out = run("bash", ROOT / "scripts" / "ensure-nginx.sh")
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def runnable_conf(tmp: Path, upstreams: dict[str, str], grpc_port: int, http_port: int) -> Path:
    """deploy/nginx.conf on loopback: the upstreams' names and the listen ports replaced, and
    the paths a packaged nginx would own (temp files) moved into ``tmp``."""
    conf = NGINX_CONF.read_text()
    for name, address in upstreams.items():
        assert name in conf, name
        conf = conf.replace(f"server {name} ", f"server {address} ")
    conf = conf.replace("listen 7600 http2;", f"listen 127.0.0.1:{grpc_port} http2;")
    conf = conf.replace("listen 7610;", f"listen 127.0.0.1:{http_port};")
    temp = "".join(
        f"    {kind}_temp_path {tmp / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


class Cluster:
    """The processes a test started, stopped in reverse at its end."""

    def __init__(self) -> None:
        self.procs: list[ServiceProcess] = []
        self.nginx: subprocess.Popen[bytes] | None = None
        self.nginx_log: IO[bytes] | None = None

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(10)
        if self.nginx_log is not None:
            self.nginx_log.close()
        for proc in reversed(self.procs):
            proc.terminate()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.stop()


@pytest.mark.e2e
def test_nginx_conf_balances_grpc_and_http_over_two_transports(cluster: Cluster, tmp_path: Path) -> None:
    binary = nginx()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "README.md").write_text("hello from the workspace\n")
    database = f"sqlite:///{tmp_path / 'store.db'}"

    def proc(service: str, tag: str, *args: str) -> ServiceProcess:
        sub = tmp_path / tag
        sub.mkdir()
        p = ServiceProcess(service, args, sub)
        cluster.procs.append(p)
        return p

    store = proc("store", "store", "--database-url", database, "--workspace", str(workspace))
    exec_ = proc("exec", "exec")
    store_address, exec_address = store.wait_ready(), exec_.wait_ready()
    kernels = [
        proc("kernel", f"kernel-{i}", "--store", store_address, "--exec", exec_address) for i in (1, 2)
    ]
    for kernel in kernels:
        kernel.wait_ready()  # each advertises 127.0.0.1:<its port> through the store
    http_ports = [free_port(), free_port()]
    transports = [
        proc(
            "transport",
            f"transport-{i + 1}",
            "--kernel",
            "store",
            "--store",
            store_address,
            "--http-listen",
            f"127.0.0.1:{http_ports[i]}",
        )
        for i in range(2)
    ]
    grpc_addresses = [t.wait_ready() for t in transports]

    grpc_port, http_port = free_port(), free_port()
    upstreams = {}
    for i in range(2):
        upstreams[f"transport-{i + 1}:7600"] = grpc_addresses[i]
        upstreams[f"transport-{i + 1}:7610"] = f"127.0.0.1:{http_ports[i]}"
    conf = runnable_conf(tmp_path, upstreams, grpc_port, http_port)
    pid = tmp_path / "nginx.pid"
    checked = run(binary, "-t", "-e", "stderr", "-c", conf, "-g", f"pid {pid};")
    assert checked.returncode == 0, checked.stderr
    cluster.nginx_log = (tmp_path / "nginx.log").open("wb")
    cluster.nginx = subprocess.Popen(
        [str(binary), "-e", "stderr", "-c", str(conf), "-g", f"daemon off; pid {pid};"],
        stdout=cluster.nginx_log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/lb/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    else:
        raise AssertionError(f"nginx did not start:\n{(tmp_path / 'nginx.log').read_text()}")

    # The compose file's `keys` service: a key straight in the database.
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "dispatch.cli",
            "keys",
            "create",
            "--tenant",
            "acme",
            "--database-url",
            database,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=os.environ,
    )
    key = made.stdout.strip()

    # gRPC through nginx: health, and a whole turn (send, then its events to the seal) with
    # the built-in demo, whose tool calls read the workspace through a kernel's exec.
    address = f"127.0.0.1:{grpc_port}"
    assert health_status(address, "dispatch.v1.Dispatch") == 1  # SERVING
    with SyncDispatchClient(address, api_key=key) as client:
        conversation = client.create_conversation()
        events = list(client.run_turn(conversation.id, "what is in this workspace?"))
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "turn_started"
    assert kinds[-1] == "turn_sealed"
    assert "tool_result" in kinds
    assert any("README.md" in e.tool_result.content for e in events if e.HasField("tool_result"))

    # HTTP through nginx: readiness, and the same events as Server-Sent Events.
    http = f"http://127.0.0.1:{http_port}"
    ready = httpx.get(f"{http}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    with httpx.stream(
        "GET",
        f"{http}/v1/conversations/{conversation.id}/events?until=caught_up",
        headers={"Authorization": f"Bearer {key}", "Accept": "text/event-stream"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [int(d["event_seq"]) for d in data] == [e.event_seq for e in events]
    unauthenticated = httpx.get(f"{http}/v1/conversations", timeout=10)
    assert unauthenticated.status_code == 401  # the transport's answer, passed through
