"""The conformance scenario, run by the TypeScript client (clients/typescript) against the
session's stack: its runner (`test/conformance.ts`) runs every case once and reports each
on a JSON line; each case is a test here, failing with the runner's words."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.stack import ConformanceStack, load_scenario

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "typescript"
CASES = [c["name"] for c in load_scenario()["cases"]]
# The whole scenario, every case's 30 s deadlines included, ends well within this.
RUNNER_DEADLINE = 240


@functools.cache
def build() -> None:
    """Compile the client and its runner (tsc, a few seconds), once a session: the tests run
    today's sources."""
    if shutil.which("node") is None:
        pytest.fail("node (20 or later) is not on PATH")
    if not (PACKAGE / "node_modules" / ".bin" / "tsc").exists():
        pytest.fail("clients/typescript/node_modules is missing: run `make install`")
    done = subprocess.run(
        ["npm", "run", "--silent", "build"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"npm run build failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def typescript_results(conformance_stack: ConformanceStack) -> dict[str, dict[str, Any]]:
    build()
    try:
        done = subprocess.run(
            ["node", "dist/test/conformance.js"],
            cwd=PACKAGE,
            env=conformance_stack.env(),
            capture_output=True,
            text=True,
            timeout=RUNNER_DEADLINE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the TypeScript runner did not finish within {RUNNER_DEADLINE}s:\n{exc.stdout!r}")
    results: dict[str, dict[str, Any]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["case"]] = result
    if not results:
        pytest.fail(f"the TypeScript runner reported no case (exit {done.returncode}):\n{done.stderr}")
    results["__stderr__"] = {"stderr": done.stderr}
    return results


@pytest.mark.timeout(RUNNER_DEADLINE + 120)
@pytest.mark.parametrize("case", CASES)
def test_scenario(typescript_results: dict[str, dict[str, Any]], case: str) -> None:
    result = typescript_results.get(case)
    stderr = typescript_results["__stderr__"]["stderr"]
    assert result is not None, f"the TypeScript runner did not report {case}:\n{stderr}"
    assert result["ok"], f"{case}: {result.get('error')}\n{stderr}"
