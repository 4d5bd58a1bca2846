"""The chart's API-key bootstrap (its Job runs this in the Dispatch image).

Makes one API key with ``dispatchd keys create`` and keeps its secret in a Kubernetes
Secret, through the Kubernetes API with the pod's service account, once: when the Secret
exists already, nothing is made, so every upgrade keeps the key. A key whose Secret cannot
be written is revoked again, so no key lives whose secret nobody has. The secret is never
printed. Standard library only.

Environment: DISPATCH_DATABASE_URL (the store's database), DISPATCH_KEY_SECRET (the Secret's
name), DISPATCH_KEY_TENANT, DISPATCH_KEY_NAME; DISPATCH_KUBE_API and DISPATCH_SA_DIR replace
the in-cluster API address and service-account directory (tests).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SECRET_KEY = "api-key"


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> int:
    """Call the Kubernetes API; answer the HTTP status."""
    sa = Path(os.environ.get("DISPATCH_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))
    base = os.environ.get("DISPATCH_KUBE_API") or (
        f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
    )
    request = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {(sa / 'token').read_text().strip()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    context = ssl.create_default_context(cafile=str(sa / "ca.crt")) if base.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _dispatchd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatch.cli", "keys", *args], capture_output=True, text=True, check=False
    )


def main() -> int:
    sa = Path(os.environ.get("DISPATCH_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))
    namespace = (sa / "namespace").read_text().strip()
    name = os.environ["DISPATCH_KEY_SECRET"]
    tenant = os.environ.get("DISPATCH_KEY_TENANT", "default")
    secrets = f"/api/v1/namespaces/{namespace}/secrets"

    status = _api("GET", f"{secrets}/{name}")
    if status == 200:
        print(f"Secret {name} exists: its key stays, no key made")
        return 0
    if status != 404:
        print(f"reading Secret {name} failed: HTTP {status}", file=sys.stderr)
        return 1

    made = _dispatchd(
        "create", "--tenant", tenant, "--name", os.environ.get("DISPATCH_KEY_NAME", "bootstrap")
    )
    if made.returncode != 0:
        sys.stderr.write(made.stderr)
        return made.returncode
    secret = made.stdout.strip()
    # stderr says "created key_...  tenant=...; the secret above is shown only once".
    created = re.search(r"^created (key_\S+)", made.stderr, re.MULTILINE)
    if not secret or created is None:
        sys.stderr.write(made.stderr)
        print("dispatchd keys create did not say which key it made", file=sys.stderr)
        return 1
    key_id = created[1]
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "dispatch"}},
        "type": "Opaque",
        "stringData": {SECRET_KEY: secret},
    }
    status = _api("POST", secrets, body)
    if status == 201:
        print(f"made key {key_id} for tenant {tenant}; its secret is in Secret {name}, key {SECRET_KEY}")
        return 0
    revoked = _dispatchd("revoke", key_id)
    if status == 409:  # another run wrote the Secret first: its key is the one kept
        print(f"Secret {name} appeared meanwhile: key {key_id} revoked, the Secret's key stays")
        return revoked.returncode
    print(f"writing Secret {name} failed: HTTP {status}; key {key_id} revoked", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
