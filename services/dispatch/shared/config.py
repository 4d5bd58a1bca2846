"""Typed configuration, loaded in one place and passed down explicitly.

Precedence: command-line flags, then environment variables, then the TOML
config file (``--config`` or ``DISPATCH_CONFIG``), then defaults. Nothing else
in the code base reads the environment.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatch.shared.errors import InvalidArgument

DEFAULT_TRANSPORT_LISTEN = "127.0.0.1:7600"
# Where `dispatchd up` serves the HTTP bridge unless told otherwise.
DEFAULT_HTTP_LISTEN = "127.0.0.1:7610"
# Connections a PostgreSQL store holds open at most.
DEFAULT_POOL_SIZE = 8


class ConfigError(InvalidArgument):
    """A configuration value is missing or wrong; the message names the key."""


class ListenError(ConfigError):
    """An address a server cannot listen on; ``flag`` names the setting that chose it."""

    def __init__(self, listen: str, reason: str, flag: str = "--listen"):
        self.listen = listen
        self.reason = reason
        self.flag = flag
        super().__init__(f"cannot listen on {listen}: {reason}; choose another address with {flag}")

    def for_flag(self, flag: str) -> ListenError:
        """The same error, naming ``flag`` as the setting to change."""
        return ListenError(self.listen, self.reason, flag)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` as its host and port (0 picks a free one); ``ListenError`` if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ListenError(listen, "the address must be host:port, e.g. 127.0.0.1:7600")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ListenError(listen, f"the port must be a number from 0 to 65535, not {port!r}")
    return host, int(port)


@dataclass(frozen=True)
class StoreConfig:
    listen: str = "127.0.0.1:0"
    # sqlite:///relative/path, sqlite:////absolute/path
    database_url: str = "sqlite:///.dispatch/dispatch.db"
    # Root of the default workspace created on first use.
    default_workspace_root: str = "."
    # The root was given (--workspace, DISPATCH_WORKSPACE, [store] workspace): every start
    # makes it the root of the default workspaces that exist too, not only of new ones.
    pin_default_workspace: bool = False
    # PostgreSQL: connections open at once, at most (SQLite has its one, on its one thread).
    pool_size: int = DEFAULT_POOL_SIZE


@dataclass(frozen=True)
class ExecConfig:
    listen: str = "127.0.0.1:0"
    # Output past this many bytes per spawn is dropped with a marker.
    max_output_bytes: int = 1 << 20
    # ReadFile never returns more than this many bytes in one call.
    max_read_bytes: int = 8 << 20
    # The ssh_config whose Host aliases are the remote computers; empty: none.
    ssh_config: str = ""


@dataclass(frozen=True)
class ProviderConfig:
    # "demo" (built in, no model), "scripted" (replays `script`), "openai".
    kind: str = "demo"
    model: str = ""
    base_url: str = "https://api.openai.com/v1"
    api_key: str = field(default="", repr=False)  # never printed
    script: str = ""
    # Per-attempt limit on waiting for response headers, in seconds.
    request_timeout: float = 120.0
    # Cap on one response's output tokens; 0: the kind's default, which is no cap for an
    # OpenAI-compatible server (a local model's context may be smaller than any fixed
    # default) and ANTHROPIC_MAX_TOKENS for Anthropic, which requires one.
    max_tokens: int = 0
    # The model's context window and what of it is kept for the response, in tokens;
    # 0: the model's known window (kernel/context.py) and max_tokens or an eighth of it.
    context_window: int = 0
    output_reserve: int = 0

    @property
    def display(self) -> str:
        if self.kind == "openai":
            return f"openai-compatible model {self.model!r} at {self.base_url}"
        if self.kind == "anthropic":
            return f"Anthropic model {self.model!r} at {self.base_url}"
        if self.kind == "scripted":
            return f"scripted provider replaying {self.script}"
        return "built-in demo script (no model configured)"


@dataclass(frozen=True)
class DispatchPolicy:
    """How a step's tool calls are scheduled."""

    # Cap on running calls; 0 = unlimited.
    max_concurrent: int = 0
    # Per-tool caps, e.g. {"shell": 2}.
    tool_limits: Mapping[str, int] = field(default_factory=dict)
    # Start a call as soon as it is complete in the provider stream (True), or
    # only after the stream ends (False).
    eager: bool = True
    # Tools whose identical calls within one step all run.
    dedup_exempt: frozenset[str] = frozenset()
    # "rust", or "reference" (the pure-Python twin, for debugging).
    scheduler: str = "rust"


@dataclass(frozen=True)
class RetryPolicy:
    """How long a step waits before retrying a retryable provider failure."""

    # Delays in seconds, one per retry; the last one repeats. A Retry-After from
    # the server replaces the delay it applies to.
    schedule: tuple[float, ...] = (5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
    # Total waiting one step may do before it gives up, in seconds.
    budget: float = 8 * 3600.0


DEFAULT_SYSTEM_PROMPT = (
    "You are Dispatch, a careful agent. Use the tools to inspect the workspace before answering."
)


@dataclass(frozen=True)
class AgentConfig:
    """A named way of running turns: which model, what it is told, which tools, which limits."""

    name: str = "default"
    # A key of KernelConfig.providers.
    provider: str = "default"
    # Empty: the provider's model.
    model: str = ""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Built-in tool names offered; None: all of them.
    tools: tuple[str, ...] | None = None
    # Steps per turn; None: no cap of the agent's own; 0: text only (no tools offered).
    steps: int | None = None
    # Tool calls per turn; 0: no budget.
    tool_budget: int = 0
    # The same call (tool and canonical input) this many times in a row ends the turn; 0: off.
    doom_loop: int = 3
    dispatch: DispatchPolicy = field(default_factory=DispatchPolicy)
    # Permission rules, as the config table has them (``tool = "allow"|"ask"|"deny"`` or
    # ``tool = { pattern = action }``); checked against the tools by the kernel's agents.
    permissions: Mapping[str, Any] = field(default_factory=dict)
    # Seconds an approval may wait before it expires (a rejection); 0: it never does.
    approval_timeout: float = 0.0
    # The agent's model's context window and output reserve, in tokens; 0: the provider's.
    context_window: int = 0
    output_reserve: int = 0
    # The most of one tool result the model is shown, in tokens (at most a quarter of the
    # window's input); history keeps it whole and read_tool_output reads the rest.
    tool_output_budget: int = 8_000
    # A request estimated past this fraction of the window's input is compacted first (older
    # messages summarised, kernel/context.py); 0: never.
    compact_at: float = 0.8


@dataclass(frozen=True)
class KernelConfig:
    listen: str = "127.0.0.1:0"
    store_address: str = ""
    exec_address: str = ""
    # The provider named "default", and the default agent's prompt and dispatch
    # policy, when `providers` / `agents` do not say otherwise.
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Named providers and agents; empty: one of each, named "default", from the fields above.
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    agents: Mapping[str, AgentConfig] = field(default_factory=dict)
    # The agent of a conversation that selects none (nor does its workspace).
    default_agent: str = "default"
    # Turns running at once across the kernel; more wait, in order, in state queued. 0 = unlimited.
    max_concurrent_turns: int = 0
    # Turns running at once across every kernel on the store (give every kernel the same
    # value), enforced by the store as each turn starts; more wait in state queued. 0 = none.
    cluster_max_concurrent_turns: int = 0
    # Steps per turn, for every agent; 0 = unlimited.
    max_steps: int = 0
    # Deadline on every unary call to the store and exec, in seconds.
    rpc_timeout: float = 30.0
    dispatch: DispatchPolicy = field(default_factory=DispatchPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Keep every workspace's file tools inside its root (and shells' cwd); off:
    # only workspaces created with confine_tools are confined, and tools in the
    # others may touch any path the exec service can.
    confine_tools: bool = False
    # Durable turns. This kernel's name on the leases it holds; empty: made up at start
    # (host, pid and a random suffix), so a restarted kernel is a new owner.
    instance_id: str = ""
    # How long a turn's lease lasts without renewal, in seconds (renewed every third of it);
    # a kernel that dies loses its turns to another kernel after at most this long.
    lease_ttl: float = 15.0
    # How often the kernel looks for turns nobody holds (expired or released leases).
    sweep_interval: float = 5.0
    # Runs a turn may have in all: the first, and recoveries after its kernel went away.
    max_attempts: int = 3
    # How long a turn retries a write the store does not take (it is unavailable) before
    # the turn ends with an error; its end is still written once the store is back.
    store_outage: float = 60.0
    # The default agent's permission rules and approval timeout ([kernel.permissions],
    # [kernel] approval_timeout) when `agents` does not say otherwise.
    permissions: Mapping[str, Any] = field(default_factory=dict)
    approval_timeout: float = 0.0
    # Scale-out. Where transports reach this kernel (host:port), advertised through the
    # store with every lease beat; empty: the address it listens on (its host, when that
    # is a wildcard, is this machine's name).
    advertise: str = ""
    # How often a kernel checks whether a conversation it has subscribers for, but does
    # not run, has a turn running on another kernel (then those subscribers move there).
    # Only while other kernels are alive.
    follow_interval: float = 0.5

    def all_providers(self) -> Mapping[str, ProviderConfig]:
        """``providers``, or ``provider`` as the one named ``default``."""
        return self.providers or {"default": self.provider}

    def all_agents(self) -> Mapping[str, AgentConfig]:
        """``agents``, or one named ``default`` from ``system_prompt`` and ``dispatch`` on the
        first provider."""
        if self.agents:
            return self.agents
        providers = self.all_providers()
        provider = "default" if "default" in providers else next(iter(providers))
        return {
            "default": AgentConfig(
                provider=provider,
                system_prompt=self.system_prompt,
                dispatch=self.dispatch,
                permissions=self.permissions,
                approval_timeout=self.approval_timeout,
            )
        }


@dataclass(frozen=True)
class TransportConfig:
    listen: str = DEFAULT_TRANSPORT_LISTEN
    # The kernel's host:port, or "store": every live kernel, found through the store's
    # heartbeat rows (several kernels; each conversation's calls go to the kernel running it).
    kernel_address: str = ""
    store_address: str = ""
    rpc_timeout: float = 30.0
    # Largest request message a client may send (bytes); larger ones are RESOURCE_EXHAUSTED.
    max_request_bytes: int = 4 * 1024 * 1024
    # The HTTP bridge (NDJSON and Server-Sent Events); empty: off.
    http_listen: str = ""
    # Web origins whose pages may call the HTTP bridge (CORS), as "scheme://host[:port]";
    # "*" allows any. Empty: none (no CORS headers are sent).
    cors_origins: tuple[str, ...] = ()
    # The HMAC secret stream tokens are signed with; every transport replica must share it.
    # Empty: a random secret of this process (tokens work on this transport, until it restarts).
    stream_token_secret: str = field(default="", repr=False)


def data_dir(flag: Path | None, env: Mapping[str, str]) -> Path:
    """Where `dispatchd up` keeps SQLite and its API key: ``--data-dir``, else
    ``DISPATCH_DATA_DIR``, else ``./.dispatch``."""
    return (flag or Path(env.get("DISPATCH_DATA_DIR") or ".dispatch")).resolve()


def local_database_url(data: Path, env: Mapping[str, str]) -> str:
    """``DISPATCH_DATABASE_URL``, else the SQLite file in the data directory ``data``."""
    return env.get("DISPATCH_DATABASE_URL") or f"sqlite:///{data / 'dispatch.db'}"


def load_file(path: str | None) -> dict[str, Any]:
    """Read the TOML config file, or nothing when none is given; a key or section the
    file may not have is an error naming it (and the nearest valid one)."""
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    try:
        check_keys(data)
    except ConfigError as exc:
        raise ConfigError(f"config file {path!r}: {exc}") from None
    return data


# What a config file may hold: a key's entry is None (a value), a schema (a table), or ANY
# (a table of names the user chooses, such as tool_limits); "*" stands for any table name.
ANY: Mapping[str, Any] = {}
_PROVIDER = dict.fromkeys(
    (
        "kind",
        "model",
        "base_url",
        "api_key_env",
        "script",
        "request_timeout",
        "max_tokens",
        "context_window",
        "output_reserve",
    )
)
_DISPATCH = {
    **dict.fromkeys(("max_concurrent", "eager", "dedup_exempt", "scheduler")),
    "tool_limits": ANY,
}
SCHEMA: Mapping[str, Any] = {
    "provider": _PROVIDER,
    "providers": {"*": _PROVIDER},
    "agents": {
        "*": {
            **dict.fromkeys(
                ("provider", "model", "system_prompt", "tools", "steps", "tool_budget", "doom_loop")
            ),
            "dispatch": _DISPATCH,
            "permissions": ANY,
            "approval_timeout": None,
            "context_window": None,
            "output_reserve": None,
            "tool_output_budget": None,
            "compact_at": None,
        }
    },
    "kernel": {
        **dict.fromkeys(
            (
                "listen",
                "store",
                "exec",
                "system_prompt",
                "default_agent",
                "max_concurrent_turns",
                "cluster_max_concurrent_turns",
                "max_steps",
                "confine_tools",
                "instance_id",
                "lease_ttl",
                "sweep_interval",
                "max_attempts",
                "store_outage",
                "approval_timeout",
                "advertise",
                "follow_interval",
            )
        ),
        "permissions": ANY,
        "dispatch": _DISPATCH,
        "retry": dict.fromkeys(("schedule", "budget")),
    },
    "store": dict.fromkeys(("listen", "database_url", "workspace", "pool_size")),
    "exec": dict.fromkeys(("listen", "max_output_bytes", "max_read_bytes", "ssh_config")),
    "transport": dict.fromkeys(
        (
            "listen",
            "kernel",
            "store",
            "max_request_bytes",
            "http_listen",
            "cors_origins",
            "stream_token_secret",
        )
    ),
}


def check_keys(data: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA, where: str = "") -> None:
    """Refuse a key or section ``schema`` does not know, naming it and its nearest valid
    neighbour (``modle`` → ``model``, ``[kernal]`` → ``[kernel]``)."""
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        sub = schema["*"] if "*" in schema else schema.get(key, _MISSING)
        if sub is _MISSING:
            table = isinstance(value, Mapping)
            what = f"section [{path}]" if table else f"key {key!r}" + (f" in [{where}]" if where else "")
            near = difflib.get_close_matches(key, [k for k in schema if k != "*"], n=1, cutoff=0.6)
            hint = ""
            if near and table:
                hint = f"; did you mean [{where + '.' if where else ''}{near[0]}]?"
            elif near:
                hint = f"; did you mean {near[0]!r}?"
            elif not where and not table:
                homes = [
                    f"[{name}]" for name, sec in SCHEMA.items() if isinstance(sec, Mapping) and key in sec
                ]
                hint = f"; it belongs in {' or '.join(homes)}" if homes else ""
            valid = ", ".join(sorted(schema))
            inside = f"[{where}]" if where else "the top level"
            raise ConfigError(f"unknown {what}{hint} ({inside} takes: {valid})")
        if sub is None or sub is ANY:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key [{path}] must be a table")
        check_keys(value, sub, path)


_MISSING: Any = object()


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key [{name}] must be a table")
    return value


def _pick(
    flag: Any, env: Mapping[str, str], env_names: tuple[str, ...], file_value: Any, default: Any
) -> Any:
    if flag is not None:
        return flag
    for name in env_names:
        if env.get(name):
            return env[name]
    if file_value is not None:
        return file_value
    return default


def _float(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key} must be a number, got {value!r}") from None


def _origins(value: Any, key: str) -> tuple[str, ...]:
    """CORS origins: a list (the file) or a comma-separated string (the environment), each
    ``*`` or ``scheme://host[:port]`` with no path, as a browser sends it in ``Origin``."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f'config key {key} must be a list of origins like "https://app.example.com"')
    origins = tuple(item.strip().rstrip("/") for item in items if item.strip())
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest):
            raise ConfigError(
                f"config key {key}: {origin!r} is not an origin; write scheme://host[:port] "
                '("https://app.example.com", "http://127.0.0.1:5173") or "*"'
            )
    return origins


def _int(value: Any, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key} must be an integer, got {value!r}") from None


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"config key {key} must be true or false, got {value!r}")


PROVIDER_KINDS = ("demo", "scripted", "openai", "anthropic")
# Anthropic's Messages API requires a cap on every response; this one unless configured.
ANTHROPIC_MAX_TOKENS = 8192
_DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
_DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def provider_config(
    flags: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]
) -> ProviderConfig:
    """The ``[provider]`` table (the provider named ``default``), with flags and environment over it."""
    return _provider(_section(file, "provider"), "provider", env, flags)


def _provider(
    sec: Mapping[str, Any], key: str, env: Mapping[str, str], flags: Mapping[str, Any] | None = None
) -> ProviderConfig:
    """One provider table; ``key`` is its name in messages. Flags and the DISPATCH_* environment
    apply only to the default provider (``flags`` given)."""
    default = flags is not None
    flags = flags or {}
    env_for_default = env if default else {}

    def pick(flag: str, names: tuple[str, ...], name: str, fallback: Any) -> Any:
        return _pick(flags.get(flag), env_for_default, names, sec.get(name), fallback)

    model = pick("model", ("DISPATCH_MODEL",), "model", "")
    script = pick("script", ("DISPATCH_SCRIPT",), "script", "")
    kind_default = "openai" if model else ("scripted" if script else "demo")
    kind = pick("provider", ("DISPATCH_PROVIDER",), "kind", kind_default)
    if kind not in PROVIDER_KINDS:
        raise ConfigError(f"config key {key}.kind must be one of {', '.join(PROVIDER_KINDS)}, got {kind!r}")
    key_env = str(sec.get("api_key_env", _DEFAULT_KEY_ENV.get(kind, "OPENAI_API_KEY")))
    if default and "DISPATCH_API_KEY_ENV" in env:
        key_env = env["DISPATCH_API_KEY_ENV"]
    if key_env.strip().lower() == "none":
        key_env = ""
    api_key = (env_for_default.get("DISPATCH_PROVIDER_API_KEY") or env.get(key_env, "")) if key_env else ""
    url_env = ("DISPATCH_BASE_URL", "ANTHROPIC_BASE_URL" if kind == "anthropic" else "OPENAI_BASE_URL")
    base_url = pick("base_url", url_env, "base_url", _DEFAULT_BASE_URL.get(kind, ProviderConfig.base_url))
    timeout = _float(
        _pick(None, env_for_default, ("DISPATCH_REQUEST_TIMEOUT",), sec.get("request_timeout"), 120.0),
        f"{key}.request_timeout",
    )
    max_tokens = _int(
        sec.get("max_tokens", ANTHROPIC_MAX_TOKENS if kind == "anthropic" else 0), f"{key}.max_tokens"
    )
    if "max_tokens" in sec and max_tokens <= 0:
        raise ConfigError(f"config key {key}.max_tokens must be more than 0 (leave it out for no cap)")
    if timeout <= 0:
        raise ConfigError(f"config key {key}.request_timeout must be more than 0")
    window, reserve = _window(sec, key)
    if kind in ("openai", "anthropic") and not model:
        hint = " (or DISPATCH_MODEL)" if default else ""
        raise ConfigError(f"config key {key}.model{hint} is required for provider kind {kind}")
    if kind == "scripted" and not script:
        hint = " (or DISPATCH_SCRIPT)" if default else ""
        raise ConfigError(f"config key {key}.script{hint} is required for provider kind scripted")
    if kind in ("openai", "anthropic") and key_env and not api_key:
        keyless = 'api_key_env = ""' + (" (or DISPATCH_API_KEY_ENV=none)" if default else "")
        raise ConfigError(
            f"config key {key}.api_key_env: the environment variable {key_env} is not set; "
            f"export it with the API key, or, for an endpoint that takes no key, set {keyless}"
        )
    return ProviderConfig(
        kind=kind,
        model=model,
        base_url=str(base_url).rstrip("/"),
        api_key=api_key,
        script=script,
        request_timeout=timeout,
        max_tokens=max_tokens,
        context_window=window,
        output_reserve=reserve,
    )


def _window(sec: Mapping[str, Any], key: str) -> tuple[int, int]:
    """A table's ``context_window`` and ``output_reserve`` (0: not said), checked."""
    window = _int(sec.get("context_window", 0), f"{key}.context_window")
    reserve = _int(sec.get("output_reserve", 0), f"{key}.output_reserve")
    if window < 0 or ("context_window" in sec and window < 1024):
        raise ConfigError(f"config key {key}.context_window must be at least 1024 tokens, got {window}")
    if reserve < 0:
        raise ConfigError(f"config key {key}.output_reserve must be 0 or more tokens, got {reserve}")
    if window and reserve >= window:
        raise ConfigError(
            f"config key {key}.output_reserve ({reserve}) must be less than context_window ({window})"
        )
    return window, reserve


def providers_config(
    flags: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]
) -> dict[str, ProviderConfig]:
    """Every configured provider by name: the ``[providers.NAME]`` tables, and ``[provider]``
    (or, without any table, the flags and environment) as ``default``."""
    tables = _section(file, "providers")
    providers: dict[str, ProviderConfig] = {}
    for name, sec in tables.items():
        if not isinstance(sec, Mapping):
            raise ConfigError(f"config key [providers.{name}] must be a table")
        providers[str(name)] = _provider(sec, f"providers.{name}", env)
    if "default" not in providers and ("provider" in file or not providers):
        providers["default"] = provider_config(flags, env, file)
    return providers


def _tool_names(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"config key {key} must be a list of tool names")
    return tuple(value)


def agent_config(
    name: str, sec: Mapping[str, Any], env: Mapping[str, str], providers: Mapping[str, ProviderConfig]
) -> AgentConfig:
    key = f"agents.{name}"
    provider = str(sec.get("provider", "default" if "default" in providers else next(iter(providers), "")))
    if provider not in providers:
        known = ", ".join(sorted(providers)) or "none"
        raise ConfigError(
            f"config key {key}.provider: no provider {provider!r} is configured (have: {known})"
        )
    steps = sec.get("steps")
    agent = AgentConfig(
        name=name,
        provider=provider,
        model=str(sec.get("model", "")),
        system_prompt=str(sec.get("system_prompt", DEFAULT_SYSTEM_PROMPT)),
        tools=_tool_names(sec.get("tools"), f"{key}.tools"),
        steps=None if steps is None else _int(steps, f"{key}.steps"),
        tool_budget=_int(sec.get("tool_budget", 0), f"{key}.tool_budget"),
        doom_loop=_int(sec.get("doom_loop", AgentConfig.doom_loop), f"{key}.doom_loop"),
        dispatch=dispatch_policy(
            env, {"kernel": {"dispatch": sec.get("dispatch", {})}}, key=f"{key}.dispatch"
        ),
        permissions=_permissions(sec.get("permissions"), f"{key}.permissions"),
        approval_timeout=_float(sec.get("approval_timeout", 0.0), f"{key}.approval_timeout"),
        context_window=_window(sec, key)[0],
        output_reserve=_window(sec, key)[1],
        tool_output_budget=_int(sec.get("tool_output_budget", 8_000), f"{key}.tool_output_budget"),
        compact_at=_float(sec.get("compact_at", AgentConfig.compact_at), f"{key}.compact_at"),
    )
    if not 0 <= agent.compact_at < 1:
        raise ConfigError(
            f"config key {key}.compact_at must be from 0 (never) to less than 1, got {agent.compact_at}"
        )
    if agent.tool_output_budget < 100:
        raise ConfigError(f"config key {key}.tool_output_budget must be at least 100 tokens")
    if agent.approval_timeout < 0:
        raise ConfigError(f"config key {key}.approval_timeout must be 0 (never) or more seconds")
    for field_name in ("steps", "tool_budget", "doom_loop"):
        value = getattr(agent, field_name)
        if value is not None and value < 0:
            raise ConfigError(f"config key {key}.{field_name} must be 0 or more, got {value}")
    if agent.doom_loop == 1:
        raise ConfigError(f"config key {key}.doom_loop must be 0 (off) or 2 or more: 1 refuses every call")
    return agent


def _permissions(value: Any, key: str) -> Mapping[str, Any]:
    """A permissions table's shape (the kernel checks tools, patterns and actions)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key [{key}] must be a table of tool = action")
    return dict(value)


def store_config(flags: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]) -> StoreConfig:
    sec = _section(file, "store")
    workspace = _pick(flags.get("workspace"), env, ("DISPATCH_WORKSPACE",), sec.get("workspace"), None)
    root = Path(str(workspace) if workspace is not None else ".").expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(
            f"config key store.workspace (--workspace, DISPATCH_WORKSPACE): {str(workspace)!r} "
            + ("is not a directory" if root.exists() else "does not exist")
        )
    return StoreConfig(
        listen=_pick(
            flags.get("listen"), env, ("DISPATCH_STORE_LISTEN",), sec.get("listen"), StoreConfig.listen
        ),
        database_url=_pick(
            flags.get("database_url"),
            env,
            ("DISPATCH_DATABASE_URL",),
            sec.get("database_url"),
            StoreConfig.database_url,
        ),
        default_workspace_root=str(root),
        pin_default_workspace=workspace is not None,
        pool_size=pool_size(flags, env, sec),
    )


def pool_size(flags: Mapping[str, Any], env: Mapping[str, str], sec: Mapping[str, Any]) -> int:
    """``--pool-size``, ``DISPATCH_STORE_POOL_SIZE`` or ``[store] pool_size``: 1 or more."""
    key = "store.pool_size (--pool-size, DISPATCH_STORE_POOL_SIZE)"
    value = _pick(
        flags.get("pool_size"), env, ("DISPATCH_STORE_POOL_SIZE",), sec.get("pool_size"), DEFAULT_POOL_SIZE
    )
    if isinstance(value, (bool, float)):  # TOML's true or 2.5 is no number of connections
        raise ConfigError(f"config key {key} must be an integer, got {value!r}")
    size = _int(value, key)
    if size < 1:
        raise ConfigError(f"config key {key} must be 1 or more connections, got {size}")
    return size


def exec_config(flags: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]) -> ExecConfig:
    sec = _section(file, "exec")
    return ExecConfig(
        listen=_pick(
            flags.get("listen"), env, ("DISPATCH_EXEC_LISTEN",), sec.get("listen"), ExecConfig.listen
        ),
        max_output_bytes=_int(
            sec.get("max_output_bytes", ExecConfig.max_output_bytes), "exec.max_output_bytes"
        ),
        max_read_bytes=_int(sec.get("max_read_bytes", ExecConfig.max_read_bytes), "exec.max_read_bytes"),
        ssh_config=_ssh_config(env, sec),
    )


def _ssh_config(env: Mapping[str, str], sec: Mapping[str, Any]) -> str:
    """``[exec] ssh_config`` or ``DISPATCH_SSH_CONFIG``; else ``~/.ssh/config`` if there is one."""
    chosen = _pick(None, env, ("DISPATCH_SSH_CONFIG",), sec.get("ssh_config"), "")
    if chosen:
        path = Path(str(chosen)).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key exec.ssh_config: {str(chosen)!r} is not a file")
        return str(path)
    home = env.get("HOME", "")
    default = Path(home, ".ssh", "config") if home else None
    return str(default) if default is not None and default.is_file() else ""


def dispatch_policy(
    env: Mapping[str, str], file: Mapping[str, Any], key: str = "kernel.dispatch"
) -> DispatchPolicy:
    """``[kernel.dispatch]`` of ``file``; ``key`` names it in messages (an agent's own policy)."""
    sec = _section(_section(file, "kernel"), "dispatch")
    limits = sec.get("tool_limits", {})
    if not isinstance(limits, Mapping):
        raise ConfigError(f"config key {key}.tool_limits must be a table of tool name = limit")
    tool_limits = {str(k): _int(v, f"{key}.tool_limits.{k}") for k, v in limits.items()}
    exempt = sec.get("dedup_exempt", [])
    if not isinstance(exempt, list) or not all(isinstance(x, str) for x in exempt):
        raise ConfigError(f"config key {key}.dedup_exempt must be a list of tool names")
    eager = sec.get("eager", True)
    if not isinstance(eager, bool):
        raise ConfigError(f"config key {key}.eager must be true or false, got {eager!r}")
    scheduler = _pick(None, env, ("DISPATCH_SCHEDULER",), sec.get("scheduler"), "rust")
    if scheduler not in ("rust", "reference"):
        raise ConfigError(f"config key {key}.scheduler must be rust or reference, got {scheduler!r}")
    policy = DispatchPolicy(
        max_concurrent=_int(sec.get("max_concurrent", 0), f"{key}.max_concurrent"),
        tool_limits=tool_limits,
        eager=eager,
        dedup_exempt=frozenset(exempt),
        scheduler=scheduler,
    )
    if policy.max_concurrent < 0 or any(v < 0 for v in tool_limits.values()):
        raise ConfigError(f"config keys {key}.max_concurrent and tool_limits must be 0 or more")
    return policy


def retry_policy(file: Mapping[str, Any]) -> RetryPolicy:
    sec = _section(_section(file, "kernel"), "retry")
    schedule = sec.get("schedule", list(RetryPolicy.schedule))
    if not isinstance(schedule, list) or not schedule:
        raise ConfigError("config key kernel.retry.schedule must be a non-empty list of seconds")
    delays = tuple(_float(v, f"kernel.retry.schedule[{i}]") for i, v in enumerate(schedule))
    budget = _float(sec.get("budget", RetryPolicy.budget), "kernel.retry.budget")
    if any(d < 0 for d in delays) or budget < 0:
        raise ConfigError("config keys kernel.retry.schedule and kernel.retry.budget must be 0 or more")
    return RetryPolicy(schedule=delays, budget=budget)


def kernel_config(flags: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]) -> KernelConfig:
    sec = _section(file, "kernel")
    providers = providers_config(flags, env, file)
    agents = _section(file, "agents")
    for name, table in agents.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"config key [agents.{name}] must be a table")
    cfg = KernelConfig(
        listen=_pick(
            flags.get("listen"), env, ("DISPATCH_KERNEL_LISTEN",), sec.get("listen"), KernelConfig.listen
        ),
        store_address=_pick(flags.get("store"), env, ("DISPATCH_STORE_ADDRESS",), sec.get("store"), ""),
        exec_address=_pick(flags.get("exec"), env, ("DISPATCH_EXEC_ADDRESS",), sec.get("exec"), ""),
        provider=providers.get("default", ProviderConfig()),
        system_prompt=sec.get("system_prompt", KernelConfig.system_prompt),
        providers=providers,
        agents={str(name): agent_config(str(name), table, env, providers) for name, table in agents.items()},
        default_agent=str(
            _pick(None, env, ("DISPATCH_AGENT",), sec.get("default_agent"), KernelConfig.default_agent)
        ),
        max_concurrent_turns=_int(
            _pick(None, env, ("DISPATCH_MAX_CONCURRENT_TURNS",), sec.get("max_concurrent_turns"), 0),
            "kernel.max_concurrent_turns",
        ),
        cluster_max_concurrent_turns=_int(
            _pick(
                None,
                env,
                ("DISPATCH_CLUSTER_MAX_CONCURRENT_TURNS",),
                sec.get("cluster_max_concurrent_turns"),
                0,
            ),
            "kernel.cluster_max_concurrent_turns",
        ),
        max_steps=_int(
            _pick(None, env, ("DISPATCH_MAX_STEPS",), sec.get("max_steps"), 0), "kernel.max_steps"
        ),
        confine_tools=_bool(
            _pick(None, env, ("DISPATCH_CONFINE_TOOLS",), sec.get("confine_tools"), False),
            "kernel.confine_tools",
        ),
        dispatch=dispatch_policy(env, file),
        retry=retry_policy(file),
        instance_id=str(_pick(None, env, ("DISPATCH_KERNEL_ID",), sec.get("instance_id"), "")),
        lease_ttl=_float(
            _pick(None, env, ("DISPATCH_LEASE_TTL",), sec.get("lease_ttl"), 15.0), "kernel.lease_ttl"
        ),
        sweep_interval=_float(sec.get("sweep_interval", 5.0), "kernel.sweep_interval"),
        max_attempts=_int(sec.get("max_attempts", 3), "kernel.max_attempts"),
        store_outage=_float(sec.get("store_outage", 60.0), "kernel.store_outage"),
        permissions=_permissions(sec.get("permissions"), "kernel.permissions"),
        approval_timeout=_float(sec.get("approval_timeout", 0.0), "kernel.approval_timeout"),
        advertise=str(
            _pick(flags.get("advertise"), env, ("DISPATCH_KERNEL_ADVERTISE",), sec.get("advertise"), "")
        ),
        follow_interval=_float(sec.get("follow_interval", 0.5), "kernel.follow_interval"),
    )
    if cfg.advertise:
        try:
            _, port = parse_listen(cfg.advertise)
        except ListenError as exc:
            raise ConfigError(
                f"kernel.advertise (--advertise, DISPATCH_KERNEL_ADVERTISE): {exc.reason}"
            ) from None
        if port == 0:
            raise ConfigError(
                f"kernel.advertise must name the port transports dial, not 0: {cfg.advertise!r}"
            )
    if cfg.approval_timeout < 0:
        raise ConfigError("config key kernel.approval_timeout must be 0 (never) or more seconds")
    for key, value in (
        ("lease_ttl", cfg.lease_ttl),
        ("sweep_interval", cfg.sweep_interval),
        ("max_attempts", cfg.max_attempts),
        ("follow_interval", cfg.follow_interval),
    ):
        if not value > 0:
            raise ConfigError(f"config key kernel.{key} must be more than 0, got {value}")
    if cfg.store_outage < 0:
        raise ConfigError(f"config key kernel.store_outage must be 0 or more, got {cfg.store_outage}")
    if not cfg.store_address:
        raise ConfigError("kernel needs the store's address: --store or DISPATCH_STORE_ADDRESS")
    if not cfg.exec_address:
        raise ConfigError("kernel needs the exec service's address: --exec or DISPATCH_EXEC_ADDRESS")
    if cfg.max_steps < 0 or cfg.max_concurrent_turns < 0:
        raise ConfigError("config keys kernel.max_steps and kernel.max_concurrent_turns must be 0 or more")
    if cfg.cluster_max_concurrent_turns < 0:
        raise ConfigError(
            "config key kernel.cluster_max_concurrent_turns must be 0 (no cluster-wide limit) or more"
        )
    if cfg.default_agent not in cfg.all_agents():
        known = ", ".join(sorted(cfg.all_agents()))
        raise ConfigError(
            f"config key kernel.default_agent: no agent {cfg.default_agent!r} is configured (have: {known})"
        )
    return cfg


def transport_config(
    flags: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]
) -> TransportConfig:
    sec = _section(file, "transport")
    cfg = TransportConfig(
        listen=_pick(
            flags.get("listen"),
            env,
            ("DISPATCH_TRANSPORT_LISTEN",),
            sec.get("listen"),
            TransportConfig.listen,
        ),
        kernel_address=_pick(flags.get("kernel"), env, ("DISPATCH_KERNEL_ADDRESS",), sec.get("kernel"), ""),
        store_address=_pick(flags.get("store"), env, ("DISPATCH_STORE_ADDRESS",), sec.get("store"), ""),
        max_request_bytes=_int(
            sec.get("max_request_bytes", TransportConfig.max_request_bytes), "transport.max_request_bytes"
        ),
        http_listen=str(
            _pick(flags.get("http_listen"), env, ("DISPATCH_HTTP_LISTEN",), sec.get("http_listen"), "")
        ),
        cors_origins=_origins(
            _pick(None, env, ("DISPATCH_CORS_ORIGINS",), sec.get("cors_origins"), ()),
            "transport.cors_origins",
        ),
        stream_token_secret=str(
            _pick(None, env, ("DISPATCH_STREAM_TOKEN_SECRET",), sec.get("stream_token_secret"), "")
        ),
    )
    if cfg.max_request_bytes <= 0:
        raise ConfigError("config key transport.max_request_bytes must be more than 0")
    if cfg.stream_token_secret and len(cfg.stream_token_secret.encode()) < 16:
        raise ConfigError(
            "the stream token secret (transport.stream_token_secret or DISPATCH_STREAM_TOKEN_SECRET)"
            " must be at least 16 bytes; `openssl rand -hex 32` makes a good one"
        )
    if not cfg.kernel_address:
        raise ConfigError(
            "transport needs the kernel's address (or 'store' to find every kernel through the store):"
            " --kernel or DISPATCH_KERNEL_ADDRESS"
        )
    if not cfg.store_address:
        raise ConfigError("transport needs the store's address: --store or DISPATCH_STORE_ADDRESS")
    return cfg


def environ() -> Mapping[str, str]:
    """The process environment: read here and only here."""
    return dict(os.environ)
