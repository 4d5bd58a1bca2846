"""The Helm chart (deploy/helm/dispatch), checked with real tools: ``helm lint``, ``helm
template`` with the default values and with a multi-replica override, and every rendered
object decoded strictly into the Kubernetes API's Go types (deploy/helm/validate); then what
the rendered objects say, against what the services really take."""

from __future__ import annotations

import base64
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from dispatch import cli
from dispatch.shared import config
from tests.deploy.tools import BUILD_TIMEOUT, CHART, run, tools, yaml_documents

# The first test builds helm and the validator (scripts/ensure-helm.sh); later ones take seconds.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 60)

KUBE_VERSION = "1.31.0"
HA_VALUES = CHART / "ci" / "ha-values.yaml"
VALUES = {"default": [], "ha": ["-f", str(HA_VALUES)]}


def render(*args: str) -> str:
    out = run(tools().helm, "template", "t", CHART, "--kube-version", KUBE_VERSION, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def objects(*args: str) -> dict[tuple[str, str], Any]:
    """The rendered objects by (kind, name)."""
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml_documents(render(*args))}


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint(values: str) -> None:
    out = run(tools().helm, "lint", "--strict", CHART, *VALUES[values])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("values", VALUES)
def test_every_rendered_object_decodes_strictly(values: str) -> None:
    rendered = render(*VALUES[values])
    out = run(tools().validate, "-", stdin=rendered)
    assert out.returncode == 0, out.stderr
    kinds = sorted(line.rsplit(" ", 2)[-2] for line in out.stdout.splitlines())
    assert kinds == sorted(
        ["Deployment"] * 3
        + ["Service"] * 2  # store, transport; transports find kernels through the store
        + ["PodDisruptionBudget"] * 3
        + ["Job", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"]
        + ["Secret"]  # the transports' stream token secret
        + (["ConfigMap"] if values == "ha" else [])
    )


def test_replicas_follow_the_values() -> None:
    default, ha = objects(), objects("-f", str(HA_VALUES))
    for component, replicas, ha_replicas in (("store", 2, 3), ("kernel", 2, 4), ("transport", 2, 3)):
        assert default["Deployment", f"t-dispatch-{component}"]["spec"]["replicas"] == replicas
        assert ha["Deployment", f"t-dispatch-{component}"]["spec"]["replicas"] == ha_replicas
        pdb = default["PodDisruptionBudget", f"t-dispatch-{component}"]["spec"]
        assert pdb["maxUnavailable"] == 1
        assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == component


@pytest.mark.parametrize("values", VALUES)
def test_every_command_is_one_dispatchd_takes(values: str) -> None:
    # The chart's args, parsed by dispatchd's own parser: a flag it does not have fails here.
    for (kind, name), obj in objects(*VALUES[values]).items():
        if kind != "Deployment":
            continue
        for container in containers(obj["spec"]["template"]["spec"]):
            args = cli.parser().parse_args(container["args"])
            assert args.command == container["name"], name
            # Its environment through dispatchd's own config loaders (a Secret's value: a stand-in).
            env = {e["name"]: e.get("value", "from-a-secret-" * 3) for e in container.get("env", [])}
            flags = vars(args)
            if args.command == "kernel":
                # Kubernetes expands $(POD_IP) from the variable above it.
                assert env.pop("POD_IP") == "from-a-secret-" * 3
                assert env["DISPATCH_KERNEL_ADVERTISE"] == "$(POD_IP):7601"
                env["DISPATCH_KERNEL_ADVERTISE"] = "10.1.2.3:7601"
                cfg = config.kernel_config({**flags, "config": None}, env, {})
                assert cfg.lease_ttl == 15.0
                assert cfg.advertise == "10.1.2.3:7601"
                assert cfg.provider.kind == ("openai" if values == "ha" else "demo")
                assert cfg.cluster_max_concurrent_turns == (64 if values == "ha" else 0)
            elif args.command == "transport":
                transport = config.transport_config(flags, env, {})
                assert transport.http_listen == "0.0.0.0:7610"
                assert transport.kernel_address == "store"  # every kernel, found through the store
            elif args.command == "exec":
                ssh_config = env.pop("DISPATCH_SSH_CONFIG", None)  # a file of the mounted Secret
                if values == "ha":
                    mounts = {m["mountPath"] for m in container["volumeMounts"]}
                    assert ssh_config == "/etc/dispatch/ssh/config"
                    assert "/etc/dispatch/ssh" in mounts
                assert config.exec_config(flags, env, {}).listen == "127.0.0.1:7602"


def test_probes_ask_grpc_health_and_readyz() -> None:
    rendered = objects()
    for component, port in (("store", 7603), ("kernel", 7601)):
        pod = rendered["Deployment", f"t-dispatch-{component}"]["spec"]["template"]["spec"]
        (main,) = pod["containers"]
        assert main["readinessProbe"]["grpc"] == {"port": port}
        assert main["livenessProbe"]["grpc"] == {"port": port}
        assert main["resources"]["requests"]
    transport = rendered["Deployment", "t-dispatch-transport"]["spec"]["template"]["spec"]["containers"][0]
    assert transport["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert transport["livenessProbe"]["grpc"] == {"port": 7600}
    assert "--http-listen=0.0.0.0:7610" in transport["args"]


def test_kernel_drains_before_the_kubelet_kills_it() -> None:
    kernel = objects()["Deployment", "t-dispatch-kernel"]
    pod = kernel["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    grace = int(next(a for a in main["args"] if a.startswith("--grace=")).removeprefix("--grace="))
    # --grace to hand turns over, inside the pod's grace.
    assert pod["terminationGracePeriodSeconds"] > grace
    live = main["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= pod["terminationGracePeriodSeconds"]
    # A new kernel is ready before an old one stops, one at a time.
    assert kernel["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_liveness_shorter_than_a_drain_is_refused() -> None:
    out = run(
        tools().helm,
        "template",
        "t",
        CHART,
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "probes.liveness.failureThreshold=2",
    )
    assert out.returncode != 0
    assert "probes.liveness: periodSeconds * failureThreshold (20 s) must be at least" in out.stderr
    assert "termination grace (45 s = grace + stopMargin)" in out.stderr


def test_exec_is_a_loopback_sidecar_sharing_the_workspace() -> None:
    for values, volume in (
        ("default", {"emptyDir": {}}),
        ("ha", {"persistentVolumeClaim": {"claimName": "dispatch-workspace"}}),
    ):
        pod = objects(*VALUES[values])["Deployment", "t-dispatch-kernel"]["spec"]["template"]["spec"]
        (exec_,) = pod["initContainers"]
        assert exec_["name"] == "exec"
        assert exec_["restartPolicy"] == "Always"  # a native sidecar: stops after the kernel
        assert "--listen=127.0.0.1:7602" in exec_["args"]
        assert "--exec=127.0.0.1:7602" in pod["containers"][0]["args"]
        assert exec_["livenessProbe"]["exec"]["command"] == ["dispatch-healthcheck", "grpc", "127.0.0.1:7602"]
        (mount,) = [m for m in exec_["volumeMounts"] if m["name"] == "workspace"]
        assert mount["mountPath"] == "/workspace"
        assert {
            k: v
            for k, v in next(v for v in pod["volumes"] if v["name"] == "workspace").items()
            if k != "name"
        } == volume
    store = objects()["Deployment", "t-dispatch-store"]["spec"]["template"]["spec"]["containers"][0]
    assert "--workspace=/workspace" in store["args"]


def test_database_url_comes_from_the_secret() -> None:
    rendered = objects()
    for kind, name in (("Deployment", "t-dispatch-store"), ("Job", "t-dispatch-api-key")):
        container = rendered[kind, name]["spec"]["template"]["spec"]["containers"][0]
        (env,) = [e for e in container["env"] if e["name"] == "DISPATCH_DATABASE_URL"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "dispatch-postgres", "key": "url"}
        assert "postgresql://" not in str(container)


def test_every_transport_replica_shares_one_stream_token_secret_and_cors_is_off_by_default() -> None:
    rendered = objects()
    secret = rendered["Secret", "t-dispatch-stream-token"]
    assert len(base64.b64decode(secret["data"]["secret"])) >= 32
    container = rendered["Deployment", "t-dispatch-transport"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["DISPATCH_STREAM_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "t-dispatch-stream-token",
        "key": "secret",
    }
    assert "DISPATCH_CORS_ORIGINS" not in env

    own = objects(
        "--set",
        "transport.streamTokens.secretName=mine",
        "--set",
        "transport.http.corsOrigins={https://a.example,http://127.0.0.1:5173}",
    )
    assert ("Secret", "t-dispatch-stream-token") not in own
    container = own["Deployment", "t-dispatch-transport"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["DISPATCH_STREAM_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    assert env["DISPATCH_CORS_ORIGINS"]["value"] == "https://a.example,http://127.0.0.1:5173"


def test_api_key_job_runs_the_bootstrap_after_install() -> None:
    rendered = objects("-f", str(HA_VALUES))
    job = rendered["Job", "t-dispatch-api-key"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DISPATCH_KEY_SECRET"] == "acme-api-key"
    assert env["DISPATCH_KEY_TENANT"] == "acme"
    script = rendered["ConfigMap", "t-dispatch-api-key"]["data"]["bootstrap_api_key.py"]
    assert script == (CHART / "files" / "bootstrap_api_key.py").read_text()
    assert container["command"] == ["python", "/etc/dispatch/bootstrap/bootstrap_api_key.py"]
    role = rendered["Role", "t-dispatch-api-key"]
    assert {
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": ["acme-api-key"],
        "apiGroups": [""],
    } in role["rules"]


def test_kernel_config_and_provider_key() -> None:
    rendered = objects("-f", str(HA_VALUES))
    pod = rendered["Deployment", "t-dispatch-kernel"]["spec"]["template"]["spec"]
    kernel = pod["containers"][0]
    assert "--config=/etc/dispatch/dispatch.toml" in kernel["args"]
    env = {e["name"]: e for e in kernel["env"]}
    assert env["DISPATCH_PROVIDER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "openai",
        "key": "api-key",
    }
    assert env["DISPATCH_MODEL"]["value"] == "gpt-4o-mini"
    toml = rendered["ConfigMap", "t-dispatch-config"]["data"]["dispatch.toml"]
    # The file the kernel will load, checked by dispatchd's own config checks.
    config.check_keys(tomllib.loads(toml))
    assert config.dispatch_policy({}, tomllib.loads(toml)).tool_limits == {"shell": 2}


BAD_MANIFESTS = {
    "unknown field": (
        """
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
datta: {a: b}
""",
        'unknown field "datta"',
    ),
    "wrong type": (
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  replicas: two
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec: {containers: [{name: c, image: i}]}
""",
        "cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas of type int32",
    ),
    "unknown field in a container": (
        """
apiVersion: v1
kind: Pod
metadata: {name: x}
spec:
  containers: [{name: c, image: i, readinessProbe: {grpc: {port: 1, servce: x}}}]
""",
        'unknown field "spec.containers[0].readinessProbe.grpc.servce"',
    ),
    "unknown kind": ("apiVersion: apps/v1\nkind: Deploymnet\nmetadata: {name: x}\n", 'no kind "Deploymnet"'),
    "duplicate key": (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\nmetadata: {name: y}\n",
        "already set",
    ),
    "selector misses the template": (
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: c}}
    spec: {containers: [{name: c, image: i}]}
""",
        "does not match the pod template's labels",
    ),
    "mount without a volume": (
        """
apiVersion: batch/v1
kind: Job
metadata: {name: x}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: i, volumeMounts: [{name: data, mountPath: /data}]}]
""",
        'mounts "data", which is not a volume of the pod',
    ),
    "service selects nothing": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {selector: {a: b}, ports: [{port: 1}]}\n",
        "matches no pod template",
    ),
    "nothing at all": ("# only a comment\n", "no Kubernetes objects"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_validator_rejects_a_bad_manifest(case: str) -> None:
    manifest, message = BAD_MANIFESTS[case]
    out = run(tools().validate, "-", stdin=manifest)
    assert out.returncode == 1
    assert message in out.stderr
