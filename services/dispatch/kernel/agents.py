"""Agents as a turn uses them: the configured ``AgentConfig`` with its provider built and
its tools looked up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dispatch.kernel.context import Window, output_budget, window_for
from dispatch.kernel.permissions import Rule, RuleError, parse
from dispatch.kernel.providers import Provider, build_provider
from dispatch.kernel.tools import Tool
from dispatch.shared.config import AgentConfig, ConfigError, DispatchPolicy, KernelConfig, ProviderConfig
from dispatch.v1 import common_pb2


@dataclass(frozen=True)
class Agent:
    name: str
    provider: Provider
    # What the provider is asked for: the agent's model, else the provider's.
    model: str
    system_prompt: str
    # Offered to the model; empty for a text-only agent.
    tools: Mapping[str, Tool]
    # None: no cap of its own; 0: text only.
    steps: int | None
    tool_budget: int
    doom_loop: int
    policy: DispatchPolicy
    # Which of its calls run, ask or are refused (kernel/permissions.py).
    rules: tuple[Rule, ...] = ()
    # Seconds an approval may wait; 0: forever.
    approval_timeout: float = 0.0
    # Its model's context window (kernel/context.py).
    window: Window = field(default_factory=lambda: window_for(""))
    # The most characters of one tool result the model is shown (kernel/context.py).
    tool_output_chars: int = 32_000
    # Compact before a request estimated past this fraction of the window's input; 0: never.
    compact_at: float = 0.8

    @property
    def text_only(self) -> bool:
        return self.steps == 0


def build_agents(
    cfg: KernelConfig, tools: Mapping[str, Tool], provider: Provider | None = None
) -> tuple[dict[str, Agent], list[Provider]]:
    """Every configured agent by name, and the providers they use (each built once).

    ``provider`` replaces every configured provider (tests). A bad agent fails here
    with a ``ConfigError`` naming its key.
    """
    built: dict[str, Provider] = {}

    def provider_named(name: str) -> Provider:
        if provider is not None:
            return provider
        if name not in built:
            built[name] = build_provider(cfg.all_providers()[name])
        return built[name]

    check_agents(cfg, tools)
    agents = {
        name: _agent(
            name,
            a,
            tools,
            provider_named,
            _rules(cfg, name, a, tools),
            provider_cfg=cfg.all_providers()[a.provider],
        )
        for name, a in cfg.all_agents().items()
    }
    return agents, ([provider] if provider is not None else list(built.values()))


def _rules_key(cfg: KernelConfig, name: str) -> str:
    return "kernel.permissions" if not cfg.agents else f"agents.{name}.permissions"


def _rules(cfg: KernelConfig, name: str, a: AgentConfig, tools: Mapping[str, Tool]) -> tuple[Rule, ...]:
    try:
        return tuple(
            parse(a.permissions, tools, f"config key {_rules_key(cfg, name)}", source=f"agent {name}")
        )
    except RuleError as exc:
        raise ConfigError(str(exc)) from None


def check_agents(cfg: KernelConfig, tools: Mapping[str, Tool]) -> None:
    """What ``build_agents`` would refuse about the agents' tools and rules, without
    building anything (``dispatchd up`` asks before it starts the kernel)."""
    for name, a in cfg.all_agents().items():
        if a.tools is not None:
            unknown = sorted(set(a.tools) - set(tools))
            if unknown:
                raise ConfigError(
                    f"config key agents.{name}.tools: unknown tool(s) {', '.join(unknown)}; "
                    f"the tools are {', '.join(sorted(tools))}"
                )
        _rules(cfg, name, a, tools)


def _agent(
    name: str,
    a: AgentConfig,
    tools: Mapping[str, Tool],
    provider_named: Callable[[str], Provider],
    rules: tuple[Rule, ...],
    *,
    provider_cfg: ProviderConfig,
) -> Agent:
    offered = dict(tools) if a.tools is None else {t: tools[t] for t in a.tools}
    provider = provider_named(a.provider)
    model = a.model or provider.model
    window = window_for(
        model,
        window=a.context_window or provider_cfg.context_window,
        reserve=a.output_reserve or provider_cfg.output_reserve,
        max_tokens=provider_cfg.max_tokens,
    )
    return Agent(
        name=name,
        provider=provider,
        model=model,
        system_prompt=a.system_prompt,
        tools={} if a.steps == 0 else offered,
        steps=a.steps,
        tool_budget=a.tool_budget,
        doom_loop=a.doom_loop,
        policy=a.dispatch,
        rules=rules,
        approval_timeout=a.approval_timeout,
        window=window,
        tool_output_chars=output_budget(window, a.tool_output_budget),
        compact_at=a.compact_at,
    )


def model_infos(agents: Mapping[str, Agent]) -> list[common_pb2.ModelInfo]:
    """One entry per (provider, model) in use, naming the agents that use it."""
    by_model: dict[tuple[str, str], list[Agent]] = {}
    for agent in agents.values():
        by_model.setdefault((agent.provider.name, agent.model), []).append(agent)
    return [
        common_pb2.ModelInfo(
            provider=provider,
            model=model,
            agents=sorted(a.name for a in users),
            # Agents may set their own: the smallest is what every one of them can count on.
            context_window=min(a.window.tokens for a in users),
            output_reserve=max(a.window.reserve for a in users),
        )
        for (provider, model), users in sorted(by_model.items())
    ]
