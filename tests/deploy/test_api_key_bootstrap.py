"""The Helm chart's API-key Job (deploy/helm/dispatch/files/bootstrap_api_key.py), run as the
Job runs it, against a real store database and a stand-in for the Kubernetes API on loopback
that keeps Secrets the way the API server's REST paths do."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dispatch.store.server import open_store
from tests.deploy.tools import CHART

SCRIPT = CHART / "files" / "bootstrap_api_key.py"
TOKEN = "service-account-token"
SECRETS = "/api/v1/namespaces/dispatch/secrets"


class FakeKubernetes:
    """Secrets by name; ``post_status`` other than 201 refuses a create with that status."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.post_status = 201
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self) -> bool:
                fake.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.answer(401, {"kind": "Status", "code": 401})
                    return False
                return True

            def do_GET(self) -> None:
                if not self.authorized():
                    return
                name = self.path.removeprefix(SECRETS + "/")
                if self.path.startswith(SECRETS + "/") and name in fake.secrets:
                    self.answer(200, fake.secrets[name])
                else:
                    self.answer(404, {"kind": "Status", "code": 404})

            def do_POST(self) -> None:
                if not self.authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != SECRETS:
                    self.answer(404, {"kind": "Status", "code": 404})
                elif fake.post_status != 201:
                    self.answer(fake.post_status, {"kind": "Status", "code": fake.post_status})
                else:
                    fake.secrets[body["metadata"]["name"]] = body
                    self.answer(201, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kubernetes() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()
    yield fake
    fake.close()


@pytest.fixture
def job_env(tmp_path: Path, kubernetes: FakeKubernetes) -> dict[str, str]:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "namespace").write_text("dispatch")
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(sys.path),
        "DISPATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "DISPATCH_KEY_SECRET": "dispatch-api-key",
        "DISPATCH_KEY_TENANT": "acme",
        "DISPATCH_KEY_NAME": "bootstrap",
        "DISPATCH_KUBE_API": kubernetes.url,
        "DISPATCH_SA_DIR": str(sa),
    }


def run_job(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def keys(env: dict[str, str]) -> list[tuple[str, bool]]:
    store = await open_store(env["DISPATCH_DATABASE_URL"], default_workspace_root=".")
    try:
        return [(k.tenant_id, k.revoked) for k in await store.list_api_keys("")]
    finally:
        await store.close()


async def authenticates(env: dict[str, str], secret: str) -> str:
    store = await open_store(env["DISPATCH_DATABASE_URL"], default_workspace_root=".")
    try:
        return str((await store.authenticate(secret)).tenant_id)
    finally:
        await store.close()


async def test_makes_a_key_once_and_keeps_it_in_the_secret(
    job_env: dict[str, str], kubernetes: FakeKubernetes
) -> None:
    first = run_job(job_env)
    assert first.returncode == 0, first.stderr
    secret = kubernetes.secrets["dispatch-api-key"]
    assert secret["type"] == "Opaque"
    key = secret["stringData"]["api-key"]
    assert await authenticates(job_env, key) == "acme"
    assert key not in first.stdout + first.stderr  # the secret is never printed
    assert "its secret is in Secret dispatch-api-key" in first.stdout

    # An upgrade runs the Job again: the Secret is there, so nothing is made.
    again = run_job(job_env)
    assert again.returncode == 0, again.stderr
    assert "exists" in again.stdout
    assert kubernetes.secrets["dispatch-api-key"]["stringData"]["api-key"] == key
    assert await keys(job_env) == [("acme", False)]
    assert kubernetes.requests[-1] == ("GET", SECRETS + "/dispatch-api-key")


@pytest.mark.parametrize(("status", "returncode"), [(500, 1), (403, 1), (409, 0)])
async def test_a_key_whose_secret_is_not_written_is_revoked(
    job_env: dict[str, str], kubernetes: FakeKubernetes, status: int, returncode: int
) -> None:
    kubernetes.post_status = status
    out = run_job(job_env)
    assert out.returncode == returncode, out.stdout + out.stderr
    # 409: another run wrote the Secret first; this run's key is not the one kept.
    assert await keys(job_env) == [("acme", True)]
    assert "revoked" in out.stdout + out.stderr


async def test_a_failing_read_makes_no_key(job_env: dict[str, str], kubernetes: FakeKubernetes) -> None:
    (Path(job_env["DISPATCH_SA_DIR"]) / "token").write_text("wrong")
    out = run_job(job_env)
    assert out.returncode == 1
    assert "HTTP 401" in out.stderr
    assert await keys(job_env) == []
