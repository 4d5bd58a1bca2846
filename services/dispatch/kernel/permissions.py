r"""Permission rules: which tool calls run, which ask a person first, which are refused.

A rule names a tool (``*``: any tool) and optionally a pattern over the call's
*subject*: the command of a ``shell`` call, the path of a file tool's call (relative to
the workspace root, so a path outside it starts with ``../``). A tool without a subject
(the model's own tools, say) takes rules without patterns only.

Patterns are globs: ``*`` matches any run of characters (for paths, within one path
segment), ``**`` any run at all (paths: across segments), ``?`` one character, ``\``
makes the next character literal; the rest is literal. ``git status*`` matches
``git status`` and ``git status -s``; ``rm *`` every ``rm``; ``src/**`` everything
under ``src``; ``../**`` everything outside the workspace.

Rules come in layers, and the first layer with a matching rule decides: what the
conversation remembered from approvals ("approve for the rest of the conversation"),
then the workspace's rules, then the agent's. Within a layer the most specific matching
rule wins: a named tool over ``*``; a pattern over none; more literal characters over
fewer; and on a tie the stricter action (deny over ask over allow). No matching rule:
``allow`` (the default: tools run as they always did).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from dispatch.v1 import common_pb2

ALLOW = common_pb2.PERMISSION_ACTION_ALLOW
ASK = common_pb2.PERMISSION_ACTION_ASK
DENY = common_pb2.PERMISSION_ACTION_DENY
ACTIONS = {"allow": ALLOW, "ask": ASK, "deny": DENY}
ACTION_NAMES = {value: name for name, value in ACTIONS.items()}
# On a tie in specificity, the stricter action wins.
_STRICTNESS = {ALLOW: 0, ASK: 1, DENY: 2}
MAX_PATTERN = 500


class RuleError(ValueError):
    """A rule that cannot be: an unknown tool, a bad pattern, an unknown action."""


@dataclass(frozen=True)
class Rule:
    tool: str
    pattern: str
    action: common_pb2.PermissionAction.ValueType
    # Where it comes from, for messages: "agent coder", "workspace ws_…", "remembered".
    source: str = ""

    def describe(self) -> str:
        what = f"{self.tool} `{self.pattern}`" if self.pattern else self.tool
        where = f" ({self.source})" if self.source else ""
        return f"{what} = {ACTION_NAMES.get(self.action, 'allow')}{where}"

    def to_proto(self) -> common_pb2.PermissionRule:
        return common_pb2.PermissionRule(tool=self.tool, pattern=self.pattern, action=self.action)

    @classmethod
    def from_proto(cls, rule: common_pb2.PermissionRule, source: str = "") -> Rule:
        return cls(rule.tool, rule.pattern, rule.action, source)

    def specificity(self) -> tuple[int, int, int, int]:
        literal = _literal(self.pattern)
        return (self.tool != "*", bool(self.pattern), literal, _STRICTNESS.get(self.action, 0))


def _literal(pattern: str) -> int:
    """How many characters of ``pattern`` match only themselves."""
    count = i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            count += 1
            i += 2
        else:
            count += pattern[i] not in "*?"
            i += 1
    return count


@dataclass(frozen=True)
class Subject:
    """What a tool's rules match: its ``field`` of the input, a command or a path."""

    field: str
    kind: str  # "command" or "path"


# The built-in tools' subjects; a tool not named here takes rules without patterns.
SUBJECTS: Mapping[str, Subject] = {
    "shell": Subject("command", "command"),
    "read_file": Subject("path", "path"),
    "write_file": Subject("path", "path"),
    "edit_file": Subject("path", "path"),
    "list_dir": Subject("path", "path"),
    "glob": Subject("path", "path"),
    "grep": Subject("path", "path"),
}


def check_pattern(pattern: str, where: str) -> None:
    if not pattern.strip():
        raise RuleError(f"{where}: an empty pattern; leave the pattern out to match every call")
    if len(pattern) > MAX_PATTERN:
        raise RuleError(f"{where}: the pattern is longer than {MAX_PATTERN} characters")
    if "\x00" in pattern:
        raise RuleError(f"{where}: the pattern holds a NUL character")


def parse(table: Mapping[str, object], tools: Iterable[str], where: str, source: str = "") -> list[Rule]:
    """Rules from a config table: ``tool = "action"`` or ``tool = { "pattern" = "action", ... }``
    (``"*"`` as a pattern: every call). Raises ``RuleError`` naming the key."""
    known = set(tools)
    rules: list[Rule] = []
    for tool, value in table.items():
        key = f"{where}.{tool}"
        if tool != "*" and tool not in known:
            near = _nearest(tool, known)
            hint = f"; did you mean {near!r}?" if near else ""
            raise RuleError(
                f"{key}: no tool {tool!r}{hint} (tools: {', '.join(sorted(known))}, or * for any)"
            )
        if isinstance(value, str):
            rules.append(Rule(tool, "", _action(value, key), source))
            continue
        if not isinstance(value, Mapping):
            raise RuleError(f"{key} must be allow, ask or deny, or a table of pattern = action")
        for pattern, action in value.items():
            pattern_key = f"{key}.{json.dumps(pattern)}"
            if pattern == "*":
                rules.append(Rule(tool, "", _action(action, pattern_key), source))
                continue
            if tool != "*" and tool not in SUBJECTS:
                raise RuleError(
                    f"{pattern_key}: {tool} takes no patterns (its calls have no command or path)"
                )
            check_pattern(str(pattern), pattern_key)
            rules.append(Rule(tool, str(pattern), _action(action, pattern_key), source))
    return rules


def _action(value: object, key: str) -> common_pb2.PermissionAction.ValueType:
    if not isinstance(value, str) or value.lower() not in ACTIONS:
        raise RuleError(f"{key} must be allow, ask or deny, got {value!r}")
    return ACTIONS[value.lower()]


def _nearest(name: str, known: Iterable[str]) -> str:
    import difflib

    near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return near[0] if near else ""


@lru_cache(maxsize=4096)
def _compile(pattern: str, kind: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*" if kind == "path" else ".*")
        elif char == "?":
            out.append("[^/]" if kind == "path" else ".")
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def matches(pattern: str, subject: str, kind: str) -> bool:
    """Whether glob ``pattern`` matches all of ``subject`` (see the module docstring)."""
    return _compile(pattern, kind).fullmatch(subject) is not None


def subject_of(tool: str, input_json: str, *, root: str, cwd: str) -> str | None:
    """The call's subject as rules match it: the command, or the path relative to the
    workspace root (``..`` resolved lexically); None if the tool has none or the input
    holds none."""
    spec = SUBJECTS.get(tool)
    if spec is None:
        return None
    try:
        args = json.loads(input_json or "{}")
    except json.JSONDecodeError:
        return None
    value = args.get(spec.field, "." if spec.kind == "path" else None) if isinstance(args, dict) else None
    if not isinstance(value, str):
        return None
    if spec.kind == "command":
        return value.strip()
    base = cwd or root or "/"
    full = posixpath.normpath(posixpath.join(base, value))
    if not root:
        return full
    return posixpath.relpath(full, posixpath.normpath(root))


@dataclass(frozen=True)
class Decision:
    action: common_pb2.PermissionAction.ValueType
    rule: Rule | None
    # The call's subject (for a remembered approval).
    subject: str | None = None


class Permissions:
    """The rules a turn applies, in layers (remembered, workspace, agent)."""

    def __init__(self, *layers: Sequence[Rule], root: str = "", cwd: str = ""):
        self.layers = [list(layer) for layer in layers]
        self.root = root
        self.cwd = cwd

    def remember(self, rule: Rule) -> None:
        """Add a remembered rule (the first layer) for the rest of the turn."""
        if self.layers:
            self.layers[0].append(rule)
        else:
            self.layers.append([rule])

    def decide(self, tool: str, input_json: str) -> Decision:
        subject = subject_of(tool, input_json, root=self.root, cwd=self.cwd)
        kind = SUBJECTS[tool].kind if tool in SUBJECTS else "command"
        for layer in self.layers:
            found = [
                rule
                for rule in layer
                if rule.tool in (tool, "*")
                and (not rule.pattern or (subject is not None and matches(rule.pattern, subject, kind)))
            ]
            if found:
                best = max(found, key=Rule.specificity)
                return Decision(best.action, best, subject)
        return Decision(ALLOW, None, subject)


def remembered_rule(tool: str, subject: str | None) -> Rule:
    """What approving "for the rest of the conversation" remembers: this tool with this very
    subject (its command, its path), allowed; a tool without a subject: the tool."""
    if subject is None:
        return Rule(tool, "", ALLOW, "remembered")
    literal = re.sub(r"([\\*?])", r"\\\1", subject)
    return Rule(tool, literal, ALLOW, "remembered")
