"""Configuration: flags over environment over file over defaults; bad values name their key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from dispatch.shared import config
from dispatch.shared.config import ConfigError


def test_no_model_means_the_demo() -> None:
    cfg = config.provider_config({}, {}, {})
    assert cfg.kind == "demo"
    assert "demo" in cfg.display


def test_a_model_from_the_environment_means_openai_with_its_key_kept_out_of_repr() -> None:
    env = {"DISPATCH_MODEL": "gpt-x", "OPENAI_API_KEY": "sk-123", "OPENAI_BASE_URL": "http://h:1/v1/"}
    cfg = config.provider_config({}, env, {})
    assert (cfg.kind, cfg.model, cfg.base_url, cfg.api_key) == ("openai", "gpt-x", "http://h:1/v1", "sk-123")
    assert "sk-123" not in repr(cfg)


def test_precedence_flag_then_env_then_file() -> None:
    file = {"provider": {"kind": "openai", "model": "from-file", "base_url": "http://file/v1"}}
    env = {"DISPATCH_MODEL": "from-env", "OPENAI_API_KEY": "sk"}
    assert config.provider_config({}, {"OPENAI_API_KEY": "sk"}, file).model == "from-file"
    assert config.provider_config({}, env, file).model == "from-env"
    assert config.provider_config({"model": "from-flag"}, env, file).model == "from-flag"
    assert config.provider_config({}, env, file).base_url == "http://file/v1"


def test_api_key_env_is_configurable() -> None:
    file = {"provider": {"model": "m", "api_key_env": "MY_KEY"}}
    assert config.provider_config({}, {"MY_KEY": "k"}, file).api_key == "k"


@pytest.mark.parametrize(
    ("flags", "env", "file", "key"),
    [
        ({"provider": "openai"}, {}, {}, "provider.model"),
        ({"provider": "scripted"}, {}, {}, "provider.script"),
        ({}, {"DISPATCH_PROVIDER": "llama"}, {}, "provider.kind"),
        ({}, {}, {"provider": "openai"}, "[provider]"),
        ({}, {"DISPATCH_REQUEST_TIMEOUT": "soon"}, {}, "provider.request_timeout"),
    ],
)
def test_bad_provider_config_names_the_key(flags: Any, env: Any, file: Any, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        config.provider_config(flags, env, file)


def test_kernel_and_transport_need_their_peers() -> None:
    with pytest.raises(ConfigError, match="DISPATCH_STORE_ADDRESS"):
        config.kernel_config({}, {"DISPATCH_EXEC_ADDRESS": "x:1"}, {})
    with pytest.raises(ConfigError, match="DISPATCH_KERNEL_ADDRESS"):
        config.transport_config({"store": "x:1"}, {}, {})
    cfg = config.transport_config({}, {"DISPATCH_KERNEL_ADDRESS": "k:1", "DISPATCH_STORE_ADDRESS": "s:1"}, {})
    assert (cfg.kernel_address, cfg.store_address, cfg.listen) == (
        "k:1",
        "s:1",
        config.DEFAULT_TRANSPORT_LISTEN,
    )


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_file(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[provider\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_file(str(bad))
    good = tmp_path / "good.toml"
    good.write_text('[provider]\nmodel = "m"\n')
    assert config.provider_config({}, {"OPENAI_API_KEY": "k"}, config.load_file(str(good))).model == "m"


def test_store_workspace_resolves_to_an_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    cfg = config.store_config({"workspace": str(tmp_path / "a" / ".." / "b")}, {}, {})
    assert cfg.default_workspace_root == str(tmp_path / "b")
    assert cfg.pin_default_workspace
    assert not config.store_config({}, {}, {}).pin_default_workspace


@pytest.mark.parametrize(("make", "words"), [(False, "does not exist"), (True, "is not a directory")])
def test_a_workspace_root_that_is_no_directory_is_refused(tmp_path: Path, make: bool, words: str) -> None:
    root = tmp_path / "root"
    if make:
        root.write_text("")
    for flags, env in (({"workspace": str(root)}, {}), ({}, {"DISPATCH_WORKSPACE": str(root)})):
        with pytest.raises(
            ConfigError, match=rf"store\.workspace \(--workspace, DISPATCH_WORKSPACE\).*{words}"
        ):
            config.store_config(flags, env, {})


@pytest.mark.parametrize(
    ("file", "env", "variable"),
    [
        ({"provider": {"model": "m"}}, {}, "OPENAI_API_KEY"),
        ({"provider": {"kind": "anthropic", "model": "m"}}, {}, "ANTHROPIC_API_KEY"),
        ({"provider": {"model": "m", "api_key_env": "MY_KEY"}}, {"OPENAI_API_KEY": "k"}, "MY_KEY"),
        ({"providers": {"x": {"model": "m"}}}, {}, "OPENAI_API_KEY"),
    ],
)
def test_a_provider_whose_key_variable_is_unset_is_refused_naming_it(
    file: dict[str, Any], env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError, match=rf"api_key_env: the environment variable {variable} is not set"):
        config.providers_config({}, env, file)


def test_a_keyless_endpoint_says_so() -> None:
    file = {"provider": {"model": "m", "base_url": "http://127.0.0.1:1/v1", "api_key_env": ""}}
    assert config.provider_config({}, {}, file).api_key == ""
    for value in ("", "none"):
        env = {"DISPATCH_MODEL": "m", "DISPATCH_API_KEY_ENV": value}
        assert config.provider_config({}, env, {}).api_key == ""
    assert (
        config.provider_config({}, {"DISPATCH_MODEL": "m", "DISPATCH_API_KEY_ENV": "K", "K": "v"}, {}).api_key
        == "v"
    )


@pytest.mark.parametrize(
    ("kind", "model", "words"),
    [("openai", "m", "openai-compatible model 'm'"), ("anthropic", "c", "Anthropic model 'c'")],
)
def test_the_display_names_the_provider_configured(kind: str, model: str, words: str) -> None:
    cfg = config.provider_config(
        {}, {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}, {"provider": {"kind": kind, "model": model}}
    )
    assert words in cfg.display and "demo" not in cfg.display


def test_dispatch_policy_from_the_config_file_and_environment() -> None:
    file = {
        "kernel": {
            "dispatch": {
                "max_concurrent": 4,
                "tool_limits": {"shell": 2},
                "eager": False,
                "dedup_exempt": ["shell"],
            }
        }
    }
    policy = config.dispatch_policy({"DISPATCH_SCHEDULER": "reference"}, file)
    assert policy == config.DispatchPolicy(
        max_concurrent=4,
        tool_limits={"shell": 2},
        eager=False,
        dedup_exempt=frozenset({"shell"}),
        scheduler="reference",
    )
    assert config.dispatch_policy({}, {}) == config.DispatchPolicy()


@pytest.mark.parametrize(
    ("dispatch", "key"),
    [
        ({"max_concurrent": "many"}, "kernel.dispatch.max_concurrent"),
        ({"max_concurrent": -1}, "kernel.dispatch.max_concurrent"),
        ({"tool_limits": {"shell": "two"}}, "kernel.dispatch.tool_limits.shell"),
        ({"tool_limits": ["shell"]}, "kernel.dispatch.tool_limits"),
        ({"dedup_exempt": "shell"}, "kernel.dispatch.dedup_exempt"),
        ({"eager": "yes"}, "kernel.dispatch.eager"),
        ({"scheduler": "go"}, "kernel.dispatch.scheduler"),
    ],
)
def test_bad_dispatch_policy_names_the_key(dispatch: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.dispatch_policy({}, {"kernel": {"dispatch": dispatch}})


def test_confine_tools_is_off_by_default_and_set_from_file_or_environment(tmp_path: Path) -> None:
    peers = {"DISPATCH_STORE_ADDRESS": "s:1", "DISPATCH_EXEC_ADDRESS": "e:1"}
    assert config.kernel_config({}, peers, {}).confine_tools is False
    file = tmp_path / "dispatch.toml"
    file.write_text("[kernel]\nconfine_tools = true\n")
    assert config.kernel_config({}, peers, config.load_file(str(file))).confine_tools is True
    assert config.kernel_config({}, {**peers, "DISPATCH_CONFINE_TOOLS": "1"}, {}).confine_tools is True
    on_in_file = {"kernel": {"confine_tools": True}}
    assert (
        config.kernel_config({}, {**peers, "DISPATCH_CONFINE_TOOLS": "0"}, on_in_file).confine_tools is False
    )
    with pytest.raises(ConfigError, match=r"kernel\.confine_tools"):
        config.kernel_config({}, {**peers, "DISPATCH_CONFINE_TOOLS": "maybe"}, {})
    with pytest.raises(ConfigError, match=r"kernel\.confine_tools"):
        config.kernel_config({}, peers, {"kernel": {"confine_tools": "sometimes"}})


def test_exec_ssh_config_from_file_env_or_the_home_default(tmp_path: Path) -> None:
    ssh_dir = tmp_path / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "config").write_text("Host box\n")
    other = tmp_path / "other_config"
    other.write_text("Host other\n")
    home = {"HOME": str(tmp_path)}
    assert config.exec_config({}, {}, {}).ssh_config in ("", str(Path.home() / ".ssh" / "config"))
    assert config.exec_config({}, {"HOME": str(tmp_path / "nowhere")}, {}).ssh_config == ""
    assert config.exec_config({}, home, {}).ssh_config == str(ssh_dir / "config")
    file = {"exec": {"ssh_config": str(other)}}
    assert config.exec_config({}, home, file).ssh_config == str(other)
    env = {**home, "DISPATCH_SSH_CONFIG": str(other)}
    assert config.exec_config({}, env, {}).ssh_config == str(other)
    with pytest.raises(ConfigError, match=r"exec\.ssh_config"):
        config.exec_config({}, {"DISPATCH_SSH_CONFIG": str(tmp_path / "missing")}, {})


def test_the_kernel_reads_its_retry_schedule_and_dispatch_policy_from_the_file(tmp_path: Path) -> None:
    peers = {"DISPATCH_STORE_ADDRESS": "s:1", "DISPATCH_EXEC_ADDRESS": "e:1"}
    default = config.kernel_config({}, peers, {})
    assert default.retry.schedule == (5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
    assert default.retry.budget == 8 * 3600
    file = tmp_path / "dispatch.toml"
    file.write_text(
        "[kernel.retry]\nschedule = [1, 2.5]\nbudget = 60\n[kernel.dispatch]\nmax_concurrent = 3\n"
    )
    cfg = config.kernel_config({}, peers, config.load_file(str(file)))
    assert cfg.retry == config.RetryPolicy(schedule=(1.0, 2.5), budget=60.0)
    assert cfg.dispatch.max_concurrent == 3


@pytest.mark.parametrize(
    ("retry", "key"),
    [
        ({"schedule": []}, "kernel.retry.schedule"),
        ({"schedule": 5}, "kernel.retry.schedule"),
        ({"schedule": [1, "soon"]}, r"kernel.retry.schedule\[1\]"),
        ({"budget": "long"}, "kernel.retry.budget"),
        ({"budget": -1}, "kernel.retry.budget"),
    ],
)
def test_a_bad_retry_policy_names_the_key(retry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        config.retry_policy({"kernel": {"retry": retry}})


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('[provider]\nmodle = "x"\n', "unknown key 'modle' in [provider]; did you mean 'model'?"),
        ("[kernal]\nmax_steps = 1\n", "unknown section [kernal]; did you mean [kernel]?"),
        (
            "[kernel.dispach]\neager = true\n",
            "unknown section [kernel.dispach]; did you mean [kernel.dispatch]?",
        ),
        ('[agents.a]\nprovder = "p"\n', "unknown key 'provder' in [agents.a]; did you mean 'provider'?"),
        ('[providers.p]\nbase = "u"\n', "unknown key 'base' in [providers.p]"),
        ('model = "x"\n', "unknown key 'model'; it belongs in [provider]"),
        ("[kernel.retry]\nbudgte = 5\n", "did you mean 'budget'?"),
        ('kernel = "x"\n', r"\[kernel\] must be a table"),
    ],
)
def test_unknown_keys_and_sections_are_refused_naming_the_nearest(
    tmp_path: Path, toml: str, words: str
) -> None:
    path = tmp_path / "dispatch.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(words) if "\\" not in words else words):
        config.load_file(str(path))


def test_every_key_the_loaders_read_is_in_the_schema(tmp_path: Path) -> None:
    # A file with one of everything loads: the schema knows each key the loaders read.
    path = tmp_path / "dispatch.toml"
    path.write_text(
        """
[provider]
kind = "openai"
model = "m"
base_url = "http://127.0.0.1:1/v1"
api_key_env = ""
request_timeout = 5
max_tokens = 100
[providers.other]
kind = "scripted"
script = "s.json"
[agents.a]
provider = "default"
model = ""
system_prompt = "p"
tools = ["shell"]
steps = 3
tool_budget = 4
doom_loop = 0
[agents.a.dispatch]
max_concurrent = 1
tool_limits = { shell = 1 }
eager = false
dedup_exempt = []
scheduler = "rust"
[kernel]
listen = "127.0.0.1:0"
store = "s:1"
exec = "e:1"
system_prompt = "p"
default_agent = "a"
max_concurrent_turns = 1
max_steps = 2
confine_tools = true
[kernel.dispatch]
eager = true
[kernel.retry]
schedule = [1]
budget = 2
[store]
listen = "127.0.0.1:0"
database_url = "sqlite:///x.db"
workspace = "."
[exec]
listen = "127.0.0.1:0"
max_output_bytes = 10
max_read_bytes = 10
[transport]
listen = "127.0.0.1:0"
kernel = "k:1"
store = "s:1"
max_request_bytes = 10
http_listen = ""
"""
    )
    file = config.load_file(str(path))
    kernel = config.kernel_config({}, {}, file)
    assert kernel.agents["a"].steps == 3 and kernel.max_steps == 2
    assert config.store_config({}, {}, file).database_url == "sqlite:///x.db"
    assert config.exec_config({}, {}, file).max_read_bytes == 10
    assert config.transport_config({}, {}, file).max_request_bytes == 10


def test_max_tokens_defaults_to_none_for_openai_and_a_cap_for_anthropic() -> None:
    env = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}
    openai = config.provider_config({}, env, {"provider": {"model": "m"}})
    anthropic = config.provider_config({}, env, {"provider": {"kind": "anthropic", "model": "m"}})
    assert (openai.max_tokens, anthropic.max_tokens) == (0, config.ANTHROPIC_MAX_TOKENS)
    capped = config.provider_config({}, env, {"provider": {"model": "m", "max_tokens": 512}})
    assert capped.max_tokens == 512


def test_scale_out_settings_are_read_and_checked() -> None:
    peers = {"DISPATCH_STORE_ADDRESS": "s:1", "DISPATCH_EXEC_ADDRESS": "x:1"}
    cfg = config.kernel_config(
        {"advertise": "10.0.0.5:7601"},
        {**peers, "DISPATCH_CLUSTER_MAX_CONCURRENT_TURNS": "8"},
        {"kernel": {"follow_interval": 0.2}},
    )
    assert (cfg.advertise, cfg.cluster_max_concurrent_turns, cfg.follow_interval) == ("10.0.0.5:7601", 8, 0.2)
    for flags, env, file, words in (
        ({"advertise": "nohost"}, {}, {}, "host:port"),
        ({"advertise": "h:0"}, {}, {}, "not 0"),
        ({}, {"DISPATCH_CLUSTER_MAX_CONCURRENT_TURNS": "-1"}, {}, "cluster_max_concurrent_turns"),
        ({}, {}, {"kernel": {"follow_interval": 0}}, "follow_interval"),
    ):
        with pytest.raises(config.ConfigError, match=words):
            config.kernel_config(flags, {**peers, **env}, file)
    transport = config.transport_config({"kernel": "store", "store": "s:1"}, {}, {})
    assert transport.kernel_address == "store"
