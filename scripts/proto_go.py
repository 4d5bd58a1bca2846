"""The Go client's generated code (``clients/go/dispatchv1``), for ``gen_protos.py``.

``go_target(protos)`` is a ``TARGETS`` entry's maker: it runs protoc (grpc_tools', the one
``gen_protos.py`` runs) with protoc-gen-go and protoc-gen-go-grpc, built at pinned versions by
``scripts/ensure-protoc-gen-go.sh``, over ``protos`` (the public contract) and writes the
``.pb.go`` files flat into an empty directory: the protos' ``go_package`` is
``github.com/dispatch-run/dispatch/clients/go/dispatchv1``, and ``module=`` strips it.

Both plugins write the protoc version into each file's header; it is replaced with a fixed
line, so the output depends on the pinned plugins and the protos, not on which grpcio-tools
happens to be installed.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_PKG = "dispatch/v1"
GO_OUT = ROOT / "clients" / "go" / "dispatchv1"
GO_PACKAGE = "github.com/dispatch-run/dispatch/clients/go/dispatchv1"
ENSURE = ROOT / "scripts" / "ensure-protoc-gen-go.sh"

# protoc-gen-go's `// \tprotoc        v6.35.1` and protoc-gen-go-grpc's `// - protoc             v6.35.1`.
_PROTOC_VERSION = re.compile(r"^(//\s+(?:-\s+)?protoc\s+)(\S.*)$", re.M)
PROTOC_LINE = "(grpcio-tools, see scripts/proto_go.py)"


def plugins() -> tuple[Path, Path]:
    """protoc-gen-go and protoc-gen-go-grpc, built (first run only) by ensure-protoc-gen-go.sh."""
    try:
        done = subprocess.run(["bash", str(ENSURE)], capture_output=True, text=True, check=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{ENSURE.name} failed:\n{exc.stderr}") from None
    lines = done.stdout.splitlines()
    if len(lines) < 2:
        raise SystemExit(f"{ENSURE.name} printed {done.stdout!r}: expected the two plugins' paths")
    go, go_grpc = lines[-2:]
    return Path(go), Path(go_grpc)


def _stable(text: str) -> str:
    return _PROTOC_VERSION.sub(lambda m: m.group(1) + PROTOC_LINE, text)


def generate_go(out: Path, protos: list[str]) -> None:
    """Write the Go code of ``protos`` (names under proto/dispatch/v1) flat into ``out``."""
    go, go_grpc = plugins()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-go={go}",
            f"--plugin=protoc-gen-go-grpc={go_grpc}",
            f"--go_out={tmp}",
            f"--go_opt=module={GO_PACKAGE}",
            f"--go-grpc_out={tmp}",
            f"--go-grpc_opt=module={GO_PACKAGE}",
            *(f"{PROTO_PKG}/{name}" for name in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc (Go) failed")
        made = sorted(Path(tmp).iterdir())
        if not made or any(not p.is_file() or p.suffix != ".go" for p in made):
            raise SystemExit(f"protoc (Go) wrote {[p.name for p in made]}: expected .go files only")
        out.mkdir(parents=True, exist_ok=True)
        for src in made:
            (out / src.name).write_text(_stable(src.read_text()))


def go_target(protos: list[str]) -> Callable[[Path], None]:
    """A ``TARGETS`` maker: the Go code of ``protos`` into an empty directory."""

    def run(out: Path) -> None:
        generate_go(out, protos)

    return run
