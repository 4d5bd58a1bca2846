"""The deployment tools the tests run: helm and the manifest validator, from
scripts/ensure-helm.sh (built once, then cached under ~/.cache/dispatch/tools)."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "dispatch"
# The first run builds helm with Go: minutes, not seconds.
BUILD_TIMEOUT = 1200


class Tools(NamedTuple):
    helm: Path
    validate: Path


@functools.cache
def tools() -> Tools:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ensure-helm.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert out.returncode == 0, f"scripts/ensure-helm.sh failed:\n{out.stderr}"
    helm, validate = out.stdout.split()
    return Tools(Path(helm), Path(validate))


def run(*argv: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def yaml_documents(text: str) -> list[Any]:
    """The YAML documents of ``text`` as JSON values (read by the validator's -to-json)."""
    out = run(tools().validate, "-to-json", "-", stdin=text)
    assert out.returncode == 0, out.stderr
    docs: list[Any] = json.loads(out.stdout) or []
    return docs
