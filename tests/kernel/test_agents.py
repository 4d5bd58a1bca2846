"""Agents and providers from the config: a conversation (or its workspace) selects an agent,
whose prompt, model and tools reach the provider; ListModels reports them; a bad config
fails at start naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from dispatch.kernel.agents import build_agents
from dispatch.kernel.providers.openai import OpenAIProvider
from dispatch.kernel.tools import BUILTIN_TOOLS
from dispatch.shared import config
from dispatch.shared.config import AgentConfig, ConfigError, KernelConfig, ProviderConfig
from dispatch.v1 import kernel_pb2, store_pb2
from tests.fakes.openai_server import FakeOpenAI, Stream, text_chunks
from tests.stack import TENANT, run_turn, start_stack

AGENTS = {
    "default": AgentConfig(system_prompt="You are the default."),
    "reader": AgentConfig(
        system_prompt="You only read.", model="reader-model", tools=("read_file", "list_dir")
    ),
}


async def test_the_conversation_then_its_workspace_selects_the_agent(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    provider = OpenAIProvider(
        ProviderConfig(kind="openai", model="base-model", base_url=fake_openai.base_url)
    )
    stack = await start_stack(tmp_path, provider, agents=AGENTS)
    try:
        fake_openai.replies += [Stream(text_chunks("ok")) for _ in range(3)]
        plain = await stack.conversation()
        _, events = await run_turn(stack, plain, "hi")
        chosen = await stack.store.CreateConversation(
            store_pb2.CreateConversationRequest(tenant_id=TENANT, agent="reader")
        )
        _, chosen_events = await run_turn(stack, chosen.id, "hi")
        ws = await stack.store.CreateWorkspace(
            store_pb2.CreateWorkspaceRequest(
                tenant_id=TENANT, name="w", root=str(tmp_path), default_agent="reader"
            )
        )
        in_ws = await stack.store.CreateConversation(
            store_pb2.CreateConversationRequest(tenant_id=TENANT, workspace_id=ws.id)
        )
        await run_turn(stack, in_ws.id, "hi")
    finally:
        await stack.stop()
    default_req, reader_req, ws_req = fake_openai.requests
    assert default_req["model"] == "base-model"
    assert default_req["messages"][0] == {"role": "system", "content": "You are the default."}
    assert len(default_req["tools"]) == len(BUILTIN_TOOLS)
    for req in (reader_req, ws_req):
        assert req["model"] == "reader-model"
        assert req["messages"][0] == {"role": "system", "content": "You only read."}
        assert sorted(t["function"]["name"] for t in req["tools"]) == ["list_dir", "read_file"]
    started = next(e.turn_started for e in chosen_events if e.HasField("turn_started"))
    assert (started.agent, started.model) == ("reader", "reader-model")
    assert next(e.turn_started for e in events if e.HasField("turn_started")).agent == "default"


async def test_a_conversation_that_selects_an_unknown_agent_is_refused_with_the_known_ones(
    tmp_path: Path,
) -> None:
    stack = await start_stack(tmp_path, agents=AGENTS)
    try:
        conv = await stack.store.CreateConversation(
            store_pb2.CreateConversationRequest(tenant_id=TENANT, agent="ghost")
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run_turn(stack, conv.id, "hi")
    finally:
        await stack.stop()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "agent 'ghost'" in (err.value.details() or "") and "default, reader" in (err.value.details() or "")


async def test_list_models_reports_each_model_and_the_agents_using_it(tmp_path: Path) -> None:
    cfg = KernelConfig(
        providers={
            "a": ProviderConfig(kind="openai", model="m-a", base_url="http://127.0.0.1:9/v1"),
            "b": ProviderConfig(kind="anthropic", model="m-b", base_url="http://127.0.0.1:9"),
        },
        agents={
            "one": AgentConfig(provider="a"),
            "two": AgentConfig(provider="a"),
            "three": AgentConfig(provider="b", model="m-b-large"),
        },
        default_agent="one",
    )
    agents, providers = build_agents(cfg, BUILTIN_TOOLS)
    assert len(providers) == 2  # each provider is built once
    stack = await start_stack(tmp_path, providers=cfg.providers, agents=cfg.agents, default_agent="one")
    try:
        got = await stack.kernel.ListModels(kernel_pb2.KernelListModelsRequest())
    finally:
        await stack.stop()
        for p in providers:
            await p.aclose()
    assert [(m.provider, m.model, list(m.agents)) for m in got.models] == [
        ("anthropic", "m-b-large", ["three"]),
        ("openai", "m-a", ["one", "two"]),
    ]
    assert {a.name for a in agents.values()} == {"one", "two", "three"}


def test_agents_and_providers_from_the_config_file(tmp_path: Path) -> None:
    file = tmp_path / "dispatch.toml"
    file.write_text(
        """
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:8000/v1"
model = "qwen"
api_key_env = "LOCAL_KEY"

[providers.claude]
kind = "anthropic"
model = "claude-x"
max_tokens = 4096

[agents.coder]
provider = "claude"
system_prompt = "Write code."
steps = 40
tool_budget = 100
doom_loop = 4
tools = ["read_file", "shell"]
[agents.coder.dispatch]
max_concurrent = 4
tool_limits = { shell = 2 }

[agents.chat]
provider = "local"
steps = 0

[kernel]
default_agent = "coder"
max_concurrent_turns = 3
"""
    )
    env = {
        "DISPATCH_STORE_ADDRESS": "s:1",
        "DISPATCH_EXEC_ADDRESS": "e:1",
        "LOCAL_KEY": "k1",
        "ANTHROPIC_API_KEY": "k2",
    }
    cfg = config.kernel_config({}, env, config.load_file(str(file)))
    assert set(cfg.providers) == {"local", "claude"}
    assert (cfg.providers["local"].api_key, cfg.providers["claude"].api_key) == ("k1", "k2")
    assert cfg.providers["claude"].base_url == "https://api.anthropic.com"
    assert cfg.providers["claude"].max_tokens == 4096
    coder = cfg.agents["coder"]
    assert (coder.provider, coder.steps, coder.tool_budget, coder.doom_loop) == ("claude", 40, 100, 4)
    assert coder.tools == ("read_file", "shell")
    assert (coder.dispatch.max_concurrent, dict(coder.dispatch.tool_limits)) == (4, {"shell": 2})
    assert cfg.agents["chat"].steps == 0
    assert (cfg.default_agent, cfg.max_concurrent_turns) == ("coder", 3)
    # The environment picks another default agent.
    assert (
        config.kernel_config({}, {**env, "DISPATCH_AGENT": "chat"}, config.load_file(str(file))).default_agent
        == "chat"
    )


PEERS = {"DISPATCH_STORE_ADDRESS": "s:1", "DISPATCH_EXEC_ADDRESS": "e:1"}


@pytest.mark.parametrize(
    ("file", "key"),
    [
        ({"agents": {"a": {"provider": "nowhere"}}}, "agents.a.provider"),
        ({"agents": {"a": {"steps": -1}}}, "agents.a.steps"),
        ({"agents": {"a": {"tool_budget": "lots"}}}, "agents.a.tool_budget"),
        ({"agents": {"a": {"doom_loop": 1}}}, "agents.a.doom_loop must be 0"),
        ({"agents": {"a": {"tools": "shell"}}}, "agents.a.tools"),
        ({"agents": {"a": {"dispatch": {"max_concurrent": -2}}}}, "agents.a.dispatch.max_concurrent"),
        ({"agents": {"a": "coder"}}, r"\[agents.a\]"),
        ({"providers": {"p": {"kind": "gemini"}}}, "providers.p.kind"),
        ({"providers": {"p": {"kind": "anthropic"}}}, "providers.p.model"),
        (
            {"providers": {"p": {"kind": "openai", "model": "m", "max_tokens": 0}}},
            "providers.p.max_tokens must be more than 0",
        ),
        ({"kernel": {"default_agent": "ghost"}}, "kernel.default_agent"),
        ({"kernel": {"max_concurrent_turns": -1}}, "kernel.max_concurrent_turns"),
    ],
)
def test_a_bad_agent_or_provider_config_names_the_key(file: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        config.kernel_config({}, PEERS, file)


def test_an_agent_naming_an_unknown_tool_fails_at_start_naming_the_key() -> None:
    cfg = KernelConfig(agents={"default": AgentConfig(tools=("read_file", "teleport"))})
    with pytest.raises(ConfigError, match=r"agents\.default\.tools: unknown tool\(s\) teleport"):
        build_agents(cfg, BUILTIN_TOOLS)


def test_without_agents_tables_one_default_agent_uses_the_kernel_prompt_and_policy() -> None:
    cfg = config.kernel_config(
        {}, PEERS, {"kernel": {"system_prompt": "Be terse.", "dispatch": {"max_concurrent": 2}}}
    )
    [(name, agent)] = cfg.all_agents().items()
    assert (name, agent.provider, agent.system_prompt, agent.dispatch.max_concurrent) == (
        "default",
        "default",
        "Be terse.",
        2,
    )
    assert agent.steps is None and agent.tool_budget == 0 and agent.doom_loop == 3
