"""Permission rules: parsing (errors naming the key), matching, and which rule decides."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dispatch.kernel.permissions import (
    ALLOW,
    ASK,
    DENY,
    Permissions,
    Rule,
    RuleError,
    matches,
    parse,
    remembered_rule,
    subject_of,
)

TOOLS = ["shell", "read_file", "write_file", "edit_file", "list_dir", "glob", "grep", "calculator"]
NAMES: dict[int, str] = {ALLOW: "allow", ASK: "ask", DENY: "deny"}


@pytest.mark.parametrize(
    ("pattern", "subject", "kind", "expected"),
    [
        ("git status*", "git status", "command", True),
        ("git status*", "git status -s", "command", True),
        ("git status*", "git stash", "command", False),
        ("rm *", "rm -rf /", "command", True),
        ("rm *", "git rm x", "command", False),
        ("npm ? test", "npm a test", "command", True),
        ("ls \\*.py", "ls *.py", "command", True),
        ("ls \\*.py", "ls a.py", "command", False),
        ("src/**", "src/a/b.py", "path", True),
        ("src/*", "src/a.py", "path", True),
        ("src/*", "src/a/b.py", "path", False),
        ("**/*.py", "a/b/c.py", "path", True),
        ("../**", "../etc/passwd", "path", True),
        ("../**", "src/x", "path", False),
        ("*.md", "README.md", "path", True),
        ("*.md", "docs/a.md", "path", False),
    ],
)
def test_globs_match_whole_subjects(pattern: str, subject: str, kind: str, expected: bool) -> None:
    assert matches(pattern, subject, kind) is expected


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("shell", {"command": "  git status  "}, "git status"),
        ("read_file", {"path": "src/a.py"}, "src/a.py"),
        ("read_file", {"path": "/w/src/a.py"}, "src/a.py"),
        ("write_file", {"path": "../x"}, "../x"),
        ("write_file", {"path": "/etc/passwd"}, "../etc/passwd"),
        ("edit_file", {"path": "sub/../a"}, "a"),
        ("list_dir", {}, "."),
        ("calculator", {"x": 1}, None),
        ("shell", {}, None),
    ],
)
def test_the_subject_is_the_command_or_the_path_relative_to_the_root(
    tool: str, args: dict[str, Any], expected: str | None
) -> None:
    assert subject_of(tool, json.dumps(args), root="/w", cwd="/w") == expected


def test_a_path_relative_to_the_cwd_is_seen_from_the_root() -> None:
    assert subject_of("read_file", '{"path": "a.py"}', root="/w", cwd="/w/sub") == "sub/a.py"


CODER = {
    "read_file": "allow",
    "list_dir": "allow",
    "shell": {"git status*": "allow", "git diff*": "allow", "rm -rf *": "deny", "*": "ask"},
    "write_file": {"../**": "deny", "*": "allow"},
    "*": "ask",
}


@pytest.mark.parametrize(
    ("tool", "args", "action", "rule"),
    [
        ("read_file", {"path": "src/a.py"}, ALLOW, "read_file = allow"),
        ("shell", {"command": "git status -s"}, ALLOW, "shell `git status*` = allow"),
        ("shell", {"command": "rm -rf build"}, DENY, "shell `rm -rf *` = deny"),
        ("shell", {"command": "make test"}, ASK, "shell = ask"),
        ("write_file", {"path": "src/x.py", "content": ""}, ALLOW, "write_file = allow"),
        ("write_file", {"path": "../outside", "content": ""}, DENY, "write_file `../**` = deny"),
        ("glob", {"pattern": "*"}, ASK, "* = ask"),
    ],
)
def test_the_most_specific_rule_decides(tool: str, args: dict[str, Any], action: int, rule: str) -> None:
    permissions = Permissions([], [], parse(CODER, TOOLS, "agents.coder.permissions"), root="/w", cwd="/w")
    decision = permissions.decide(tool, json.dumps(args))
    assert NAMES[decision.action] == NAMES[action]
    assert decision.rule is not None and decision.rule.describe() == rule


def test_no_rule_means_allow() -> None:
    decision = Permissions([], [], []).decide("shell", '{"command": "rm -rf /"}')
    assert (decision.action, decision.rule) == (ALLOW, None)


def test_on_a_tie_the_stricter_action_wins() -> None:
    rules = [Rule("shell", "git *", ALLOW), Rule("shell", "* push", DENY)]
    assert Permissions([], [], rules).decide("shell", '{"command": "git push"}').action == DENY


def test_the_workspace_overrides_the_agent_and_remembered_rules_override_both() -> None:
    agent = [Rule("shell", "", ALLOW, "agent a")]
    workspace = [Rule("shell", "", ASK, "workspace w")]
    remembered = [remembered_rule("shell", "make test")]
    permissions = Permissions(remembered, workspace, agent)
    assert permissions.decide("shell", '{"command": "make lint"}').action == ASK
    assert permissions.decide("shell", '{"command": "make test"}').action == ALLOW
    assert permissions.decide("read_file", '{"path": "a"}').action == ALLOW  # no layer names it


def test_a_remembered_rule_matches_that_very_command_only() -> None:
    rule = remembered_rule("shell", "ls *.py")
    permissions = Permissions([rule], [], [Rule("shell", "", ASK)])
    assert permissions.decide("shell", '{"command": "ls *.py"}').action == ALLOW
    assert permissions.decide("shell", '{"command": "ls a.py"}').action == ASK


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"shel": "ask"}, "agents.a.permissions.shel: no tool 'shel'; did you mean 'shell'?"),
        ({"shell": "maybe"}, "agents.a.permissions.shell must be allow, ask or deny"),
        ({"shell": {"": "ask"}}, 'agents.a.permissions.shell."": an empty pattern'),
        ({"shell": {"rm *": "nope"}}, 'agents.a.permissions.shell."rm *" must be allow, ask or deny'),
        ({"calculator": {"1+1": "allow"}}, "calculator takes no patterns"),
        ({"shell": 3}, "must be allow, ask or deny, or a table"),
        ({"shell": {"x" * 501: "ask"}}, "longer than 500"),
    ],
)
def test_bad_rules_are_refused_naming_the_key(table: dict[str, Any], words: str) -> None:
    with pytest.raises(RuleError) as info:
        parse(table, TOOLS, "agents.a.permissions")
    assert words in str(info.value)
