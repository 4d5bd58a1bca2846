"""Model providers: one streaming interface, several backends."""

from __future__ import annotations

from dispatch.kernel.providers.anthropic import AnthropicProvider
from dispatch.kernel.providers.base import Provider, ProviderError
from dispatch.kernel.providers.demo import DemoProvider
from dispatch.kernel.providers.openai import OpenAIProvider
from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import ProviderConfig


def build_provider(cfg: ProviderConfig) -> Provider:
    """The provider the configuration asks for."""
    if cfg.kind == "openai":
        return OpenAIProvider(cfg)
    if cfg.kind == "anthropic":
        return AnthropicProvider(cfg)
    if cfg.kind == "scripted":
        return ScriptedProvider.from_file(cfg.script)
    return DemoProvider()


__all__ = ["Provider", "ProviderError", "build_provider"]
