"""The TypeScript client's generated code: ts-proto over the public protos.

``make_typescript(out)`` writes into the empty directory ``out`` the messages of
``transport.proto`` and every proto it imports (``public_protos()``: the public
contract, never the internal services), and the ``Dispatch`` service as a
framework-free definition (``outputServices=generic-definitions``). The Node
client turns that definition into a grpc-js client; the browser entry point uses
only the messages' JSON methods, so nothing generated imports grpc-js or a Node
API and the same files serve both.

protoc is grpc_tools' (the version the venv pins), and the plugin is the
``ts-proto`` that ``clients/typescript/package-lock.json`` pins, from its
``node_modules`` (``make install`` puts it there), so the output is reproducible.
``scripts/gen_protos.py`` lists this as one of its targets, over its ``public_protos()``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = ROOT / "clients" / "typescript"
TS_OUT = PACKAGE / "src" / "gen"
PLUGIN = PACKAGE / "node_modules" / ".bin" / "protoc-gen-ts_proto"

# Each choice is the client's: see clients/typescript/README.md ("Generated code").
OPTIONS = [
    "outputServices=generic-definitions",  # a plain object: no grpc-js import in generated code
    "esModuleInterop=true",
    "env=both",  # bytes as Uint8Array, base64 without Buffer: the browser bundle shares these files
    "importSuffix=.js",  # ESM under NodeNext module resolution
    "oneof=unions-value",  # AgentEvent.kind is {$case, value}
    "forceLong=number",  # int64 (event_seq, seq) as number; safe far beyond any real count
    "useDate=true",  # Timestamp as Date
    "outputClientImpl=false",
    # DeepPartial, protobufPackage, ... stay private: one module re-exports both files.
    "exportCommonSymbols=false",
]


def make_typescript(out: Path, protos: list[str]) -> None:
    """Write the TypeScript messages and service definition of ``protos`` (paths under
    ``proto/``, ``dispatch/v1/transport.proto``) into the empty directory ``out``."""
    if not PLUGIN.exists():
        raise SystemExit(
            f"{PLUGIN.relative_to(ROOT)} is missing: run `make install` (it runs `npm ci` in "
            "clients/typescript), then generate again"
        )
    if shutil.which("node") is None:
        raise SystemExit("node (20 or later) is not on PATH: ts-proto's protoc plugin runs on it")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-ts_proto={PLUGIN}",
        f"--ts_proto_out={out}",
        f"--ts_proto_opt={','.join(OPTIONS)}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc (ts-proto) failed")
