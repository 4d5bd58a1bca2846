"""The stack every conformance runner drives: `dispatchd up` with the scenario's agents.

``ConformanceStack(tmp).start()`` writes the agents of ``scenario.json``'s ``stack`` into
a config file (one scripted provider and one agent each), runs ``dispatchd up`` on free
loopback ports as a real child process, and makes a second tenant's key with
``dispatchd keys``. ``env()`` is what a runner in any language is told (README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.procs import Up

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "scenario.json"
OTHER_TENANT = "conformance-other"


def load_scenario() -> dict[str, Any]:
    return dict(json.loads(SCENARIO.read_text()))


def _toml_value(value: object) -> str:
    return json.dumps(value)  # strings, numbers and booleans read the same in TOML


def write_config(tmp: Path, scenario: dict[str, Any], extra: str = "") -> Path:
    """The config of the scenario's stack; ``extra``: more TOML after it (other sections)."""
    agents: dict[str, Any] = scenario["stack"]["agents"]
    lines: list[str] = []
    for name, agent in agents.items():
        script = tmp / f"script-{name}.json"
        script.write_text(json.dumps(agent["script"]))
        lines += [f"[providers.{name}]", 'kind = "scripted"', f"script = {_toml_value(str(script))}", ""]
        lines += [f"[agents.{name}]", f"provider = {_toml_value(name)}", ""]
        if agent.get("permissions"):
            lines.append(f"[agents.{name}.permissions]")
            lines += [f"{tool} = {_toml_value(action)}" for tool, action in agent["permissions"].items()]
            lines.append("")
    lines += ["[kernel]", f"default_agent = {_toml_value(next(iter(agents)))}", ""]
    path = tmp / "dispatch.toml"
    path.write_text("\n".join(lines) + extra)
    return path


class ConformanceStack:
    """``extra_agents`` join the scenario's (same format); ``extra_config`` is appended to the
    config (a ``[transport]`` section, say): for a test that needs more of the same stack."""

    def __init__(self, tmp: Path, *, extra_agents: dict[str, Any] | None = None, extra_config: str = ""):
        self.tmp = tmp
        self.scenario = load_scenario()
        self.scenario["stack"]["agents"].update(extra_agents or {})
        self.extra_config = extra_config
        self.up: Up | None = None
        self.api_key = ""
        self.other_key = ""

    def start(self) -> ConformanceStack:
        config = write_config(self.tmp, self.scenario, self.extra_config)
        workspace = self.tmp / "workspace"
        workspace.mkdir()
        (workspace / "README.md").write_text("a file for list_dir to find\n")
        self.up = Up(self.tmp, "--config", str(config), "--workspace", str(workspace))
        self.up.wait_for("Dispatch is up")
        self.api_key = self.up.api_key()
        keys = [sys.executable, "-m", "dispatch.cli", "keys", "create", "--data-dir", str(self.up.data)]
        made = subprocess.run(
            [*keys, "--tenant", OTHER_TENANT, "--name", "conformance"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        self.other_key = made.stdout.strip()
        return self

    @property
    def address(self) -> str:
        assert self.up is not None
        return self.up.address

    @property
    def http(self) -> str:
        assert self.up is not None
        return self.up.http

    def env(self) -> dict[str, str]:
        """The environment a runner gets: the process's own plus where the stack is."""
        return {
            **os.environ,
            "DISPATCH_ADDRESS": self.address,
            "DISPATCH_HTTP_ADDRESS": self.http,
            "DISPATCH_API_KEY": self.api_key,
            "DISPATCH_CONFORMANCE_OTHER_KEY": self.other_key,
            "DISPATCH_CONFORMANCE_SCENARIO": str(SCENARIO),
        }

    def stop(self) -> None:
        if self.up is not None:
            self.up.stop()
