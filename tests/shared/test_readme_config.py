"""The README's config examples are valid: each ```toml block loads and configures a kernel."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from dispatch.kernel.agents import build_agents
from dispatch.kernel.tools import BUILTIN_TOOLS
from dispatch.shared import config

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
async def test_a_readme_config_example_configures_a_kernel(block: str) -> None:
    file = tomllib.loads(block)
    # The keys a user exports before starting with such a file.
    env = {
        "DISPATCH_STORE_ADDRESS": "s:1",
        "DISPATCH_EXEC_ADDRESS": "e:1",
        "OPENAI_API_KEY": "sk-test",
        "ANTHROPIC_API_KEY": "sk-ant-test",
    }
    cfg = config.kernel_config({}, env, file)
    agents, providers = build_agents(cfg, BUILTIN_TOOLS)
    try:
        assert cfg.default_agent in agents
    finally:
        for provider in providers:
            await provider.aclose()
