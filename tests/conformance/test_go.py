"""The conformance scenario, run by the Go client (clients/go/conformance) against the session's stack.

``go test -json ./conformance/...`` runs once per session, every case a subtest named by the case,
with the stack's environment (README.md); each case here reports its subtest, with its output
when it failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.stack import ConformanceStack, load_scenario

ROOT = Path(__file__).resolve().parents[2]
GO_MODULE = ROOT / "clients" / "go"
CASES = load_scenario()["cases"]
# Compiling the client and its modules (downloaded by `make test` beforehand), then every case.
GO_TEST_TIMEOUT = 600
PARENT = "TestScenario"


def find_go() -> str:
    """Go from PATH, else where the machine installs it (/usr/local/go/bin)."""
    found = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")
    if found is None:
        pytest.fail("Go is required for the Go client's conformance run (https://go.dev/dl)")
    return found


@dataclass
class GoRun:
    """What one `go test -json` run said: each test's last action and its output."""

    returncode: int
    actions: dict[str, str] = field(default_factory=dict)
    output: dict[str, list[str]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)

    def text(self, test: str) -> str:
        return "".join(self.output.get(test, []))


def parse(stdout: str, returncode: int) -> GoRun:
    run = GoRun(returncode)
    for line in stdout.splitlines():
        try:
            event: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            run.other.append(line + "\n")
            continue
        test = event.get("Test")
        action = event.get("Action", "")
        if not test:
            run.other.append(str(event.get("Output", "")))
        elif action == "output":
            run.output.setdefault(test, []).append(str(event.get("Output", "")))
        elif action in {"pass", "fail", "skip"}:
            run.actions[test] = action
    return run


@pytest.fixture(scope="session")
def go_conformance(conformance_stack: ConformanceStack) -> GoRun:
    go = find_go()
    env = {
        **conformance_stack.env(),
        "GOFLAGS": "-mod=readonly",
        "PATH": f"{os.environ.get('PATH', '')}{os.pathsep}{Path(go).parent}",
    }
    try:
        done = subprocess.run(
            [go, "test", "-json", "-count=1", "-run", f"^{PARENT}$", "./conformance/..."],
            cwd=GO_MODULE,
            env=env,
            capture_output=True,
            text=True,
            timeout=GO_TEST_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"go test did not finish in {GO_TEST_TIMEOUT}s:\n{out[-4000:]}")
    run = parse(done.stdout, done.returncode)
    run.other.append(done.stderr)
    return run


@pytest.mark.timeout(GO_TEST_TIMEOUT + 60)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_scenario(go_conformance: GoRun, case: dict[str, Any]) -> None:
    name = f"{PARENT}/{case['name']}"
    action = go_conformance.actions.get(name)
    if action is None:
        said = (go_conformance.text(PARENT) + "".join(go_conformance.other))[-4000:]
        pytest.fail(f"go test ran no case {case['name']!r} (exit {go_conformance.returncode}):\n{said}")
    assert action == "pass", f"{case['name']}: {action}\n{go_conformance.text(name)}"


def test_every_case_ran_and_nothing_else_failed(go_conformance: GoRun) -> None:
    prefix = f"{PARENT}/"
    ran = {name.removeprefix(prefix) for name in go_conformance.actions if name.startswith(prefix)}
    assert ran == {c["name"] for c in CASES}
    assert go_conformance.actions.get(PARENT) == "pass", go_conformance.text(PARENT)
    assert go_conformance.returncode == 0, "".join(go_conformance.other)[-4000:]
