#!/usr/bin/env python3
"""``dispatch-healthcheck``: exit 0 when a Dispatch service is healthy, 1 (saying why) when not.

For container health checks and probes that cannot dial the service from outside (the exec
service listens on loopback only). Installed into the image by deploy/Dockerfile.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from typing import Any

TIMEOUT = 3.0
USAGE = """usage:
  dispatch-healthcheck grpc HOST:PORT [SERVICE]   grpc.health.v1 answers SERVING
  dispatch-healthcheck http URL                   the URL answers 2xx (the bridge's /readyz)"""


def check_grpc(address: str, service: str = "") -> str | None:
    """None when ``address`` serves ``service``; else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed omits its methods
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"unreachable: {code.name if code else exc}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def check_http(url: str) -> str | None:
    """None when ``url`` answers 2xx; else the status and the start of the body."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read(500).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "grpc" and len(argv) <= 3:
        problem = check_grpc(argv[1], argv[2] if len(argv) == 3 else "")
    elif len(argv) == 2 and argv[0] == "http":
        problem = check_http(argv[1])
    else:
        print(USAGE, file=sys.stderr)
        return 2
    if problem is not None:
        print(f"{' '.join(argv)}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
