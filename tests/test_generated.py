"""Generated protobuf code is exactly what `make proto` would produce."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import cast

ROOT = Path(__file__).resolve().parent.parent


def _gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_matches_the_protos() -> None:
    # A fresh shell's environment: the venv's bin (where the mypy plugins live) is not on PATH,
    # as in CI and on a new machine, so the generator must find its plugins by itself.
    clean = {"HOME": os.environ.get("HOME", "/"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_check_catches_a_hand_edit(tmp_path: Path) -> None:
    gen = _gen()
    gen.generate(tmp_path)

    def problems() -> list[str]:
        return [
            line for dest, _ in gen.TARGETS for line in gen._diff(tmp_path / dest.relative_to(ROOT), dest)
        ]

    assert problems() == []
    edited = tmp_path / gen.SERVER_OUT.relative_to(ROOT) / "common_pb2.pyi"
    edited.write_text(edited.read_text() + "\n# hand edit\n")
    (tmp_path / gen.CLIENT_OUT.relative_to(ROOT) / "extra_pb2.py").write_text("")
    found = problems()
    assert any("common_pb2.pyi" in p for p in found)
    assert any("extra_pb2.py" in p for p in found)


def test_client_copy_stands_alone_with_relative_imports() -> None:
    imports = re.compile(r"^\s*(from|import)\s+dispatch\.v1\b", re.M)
    files = list((ROOT / "clients/python/dispatch_client/_proto").glob("*.py*"))
    assert files
    for path in files:
        assert not imports.search(path.read_text()), f"{path.name} imports the server package"


def test_both_copies_share_one_set_of_types() -> None:
    from dispatch.v1 import common_pb2 as server_types
    from dispatch_client._proto import common_pb2 as client_types

    event = server_types.AgentEvent(event_seq=7, text_delta=server_types.TextDelta(text="hi"))
    assert client_types.AgentEvent.FromString(event.SerializeToString()) == event
    assert cast(object, client_types.AgentEvent) is server_types.AgentEvent


def test_native_module_builds_and_imports() -> None:
    import dispatch
    from dispatch import dispatcher

    assert dispatcher.native_version == dispatch.__version__


def test_client_copy_carries_only_the_public_contract() -> None:
    gen = _gen()
    assert gen.public_protos() == ["common.proto", "transport.proto"]
    stems = {
        p.name.split(".")[0].removesuffix("_grpc")
        for p in (ROOT / "clients/python/dispatch_client/_proto").glob("*_pb2*")
    }
    assert stems == {"common_pb2", "transport_pb2"}


def test_go_copy_carries_only_the_public_contract_without_the_protoc_version() -> None:
    go = ROOT / "clients/go/dispatchv1"
    assert {p.name for p in go.iterdir()} == {"common.pb.go", "transport.pb.go", "transport_grpc.pb.go"}
    for path in go.iterdir():
        header = path.read_text().split("package dispatchv1", 1)[0]
        assert "DO NOT EDIT" in header
        # The plugins' versions are pinned; protoc's (whichever grpcio-tools is installed) is not written.
        assert not re.search(r"protoc\s+v\d", header), header
