"""The model's context window: how big it is, and how much of it a request fills.

``window_for`` names a model's window (the configured one, else a table of common
models, else ``DEFAULT_WINDOW``) and what of it is kept for the response. ``Gauge``
estimates a provider request's input tokens before it is sent: the last response's
reported input tokens, plus an estimate of the messages added since (``estimate``:
about four characters a token, with a small overhead per message and per part). The
first request of a turn, or one after a provider that reports no usage, is estimated
whole. What a step used is reported on ``step_completed`` and ``turn_done``
(``context_window``, ``context_used``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dispatch.kernel.providers.base import ProviderRequest
from dispatch.v1 import common_pb2

# An unknown model: a common window of local models. Say `context_window` for others.
DEFAULT_WINDOW = 32_768
# What a response keeps, when neither output_reserve nor max_tokens says: an eighth of the
# window, at most this.
MAX_DEFAULT_RESERVE = 16_384
CHARS_PER_TOKEN = 4
# Role and framing tokens of each message, and of each part (a call, a result) in one.
MESSAGE_OVERHEAD = 4
PART_OVERHEAD = 3

# Known windows by model-name prefix (the longest prefix wins; a provider prefix such as
# "openai/" is ignored). Windows as their makers publish them, in tokens.
KNOWN_WINDOWS: dict[str, int] = {
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude-": 200_000,
    "gemini-1.5": 1_048_576,
    "gemini-2": 1_048_576,
    "llama3.1": 131_072,
    "llama3.2": 131_072,
    "llama3.3": 131_072,
    "llama-3.1": 131_072,
    "llama-3.3": 131_072,
    "qwen2.5": 32_768,
    "qwen3": 40_960,
    "mistral": 32_768,
    "mixtral": 32_768,
    "deepseek": 65_536,
    "gemma2": 8_192,
    "gemma3": 131_072,
    "phi3": 4_096,
    "phi4": 16_384,
}


@dataclass(frozen=True)
class Window:
    """A model's context window and the part of it kept for the response, in tokens."""

    tokens: int
    reserve: int

    @property
    def input_budget(self) -> int:
        """What a request's input may fill."""
        return max(0, self.tokens - self.reserve)

    def used(self, tokens: int) -> float:
        """``tokens`` as a fraction of the window."""
        return tokens / self.tokens if self.tokens else 0.0


def known_window(model: str) -> int | None:
    """The window of a model the table knows, by the longest matching prefix."""
    name = model.strip().lower().rpartition("/")[2]
    best = max((p for p in KNOWN_WINDOWS if name.startswith(p)), key=len, default=None)
    return None if best is None else KNOWN_WINDOWS[best]


def window_for(model: str, *, window: int = 0, reserve: int = 0, max_tokens: int = 0) -> Window:
    """``model``'s window: ``window`` when configured, else the known one, else
    ``DEFAULT_WINDOW``; the reserve: ``reserve``, else ``max_tokens``, else an eighth of the
    window (at most ``MAX_DEFAULT_RESERVE``), and always less than the window."""
    tokens = window or known_window(model) or DEFAULT_WINDOW
    kept = reserve or max_tokens or min(tokens // 8, MAX_DEFAULT_RESERVE)
    return Window(tokens, min(kept, tokens - 1))


def estimate_message(message: common_pb2.Message) -> int:
    """About how many tokens ``message`` takes in a request."""
    chars = 0
    parts = 0
    for chunk in message.chunks:
        kind = chunk.WhichOneof("kind")
        parts += 1
        if kind == "text":
            chars += len(chunk.text.text)
        elif kind == "tool_call":
            chars += len(chunk.tool_call.name) + len(chunk.tool_call.input_json) + len(chunk.tool_call.id)
        elif kind == "tool_result":
            chars += len(chunk.tool_result.content) + len(chunk.tool_result.tool_call_id)
        elif kind == "thinking":
            chars += len(chunk.thinking.text) + len(chunk.thinking.signature)
        else:
            chars += chunk.ByteSize()
    return MESSAGE_OVERHEAD + PART_OVERHEAD * max(0, parts - 1) + math.ceil(chars / CHARS_PER_TOKEN)


def estimate(messages: Sequence[common_pb2.Message], system: str = "", tools_json: int = 0) -> int:
    """About how many tokens a request of ``messages`` takes, with ``system`` and tool
    definitions of ``tools_json`` characters."""
    fixed = math.ceil((len(system) + tools_json) / CHARS_PER_TOKEN) + (MESSAGE_OVERHEAD if system else 0)
    return fixed + sum(estimate_message(m) for m in messages)


def _tools_chars(request: ProviderRequest) -> int:
    return sum(len(t.name) + len(t.description) + len(str(t.parameters)) for t in request.tools)


def estimate_request(request: ProviderRequest) -> int:
    """About how many input tokens ``request`` takes, all of it."""
    return estimate(request.messages, request.system, _tools_chars(request))


class Gauge:
    """A turn's running estimate of its requests' input tokens (see the module's docstring)."""

    def __init__(self, window: Window):
        self.window = window
        # The last request with reported usage: how many messages it held, and its input tokens.
        self._count = 0
        self._reported = 0

    def before(self, request: ProviderRequest, history_len: int) -> int:
        """The estimate for ``request``, whose first ``history_len`` messages are history."""
        if self._reported and self._count <= history_len:
            return self._reported + sum(estimate_message(m) for m in request.messages[self._count :])
        return estimate_request(request)

    def after(self, history_len: int, usage: common_pb2.Usage) -> None:
        """The provider reported ``usage`` for the request whose first ``history_len`` messages
        were history: later estimates start from it."""
        if usage.input_tokens > 0:
            self._count, self._reported = history_len, usage.input_tokens
        else:
            self._count, self._reported = 0, 0


# What of a cut tool result the model is shown: this much from the head, the rest from the tail.
HEAD_SHARE = 0.6
READ_TOOL = "read_tool_output"


def output_budget(window: Window, tokens: int) -> int:
    """The most characters of one tool result sent to the model: ``tokens`` (the agent's
    tool output budget), at most a quarter of what the window leaves for input."""
    return max(1_000, min(tokens, window.input_budget // 4) * CHARS_PER_TOKEN)


def _line_start(text: str, at: int, *, forward: bool) -> int:
    """The start of a line near ``at`` (the nearest before it, or with ``forward`` after it,
    within a tenth of the text), or ``at`` itself when there is none."""
    near = max(1, len(text) // 10)
    found = text.find("\n", at, at + near) if forward else text.rfind("\n", max(0, at - near), at)
    return at if found < 0 else found + 1


def cut(content: str, budget: int, tool_call_id: str, *, readable: bool) -> str:
    """``content`` as the model is shown it: whole when it fits ``budget`` characters, else its
    head and tail around a marker saying what was left out and (``readable``: the agent has
    ``read_tool_output``) how to read it."""
    if len(content) <= budget:
        return content
    head_end = _line_start(content, int(budget * HEAD_SHARE), forward=False)
    tail_start = max(head_end, _line_start(content, len(content) - (budget - head_end), forward=True))
    left_out = tail_start - head_end
    how = (
        f'; read them with {READ_TOOL}(tool_call_id="{tool_call_id}", offset={head_end})' if readable else ""
    )
    marker = (
        f"\n[dispatch: {left_out} of {len(content)} characters left out here "
        f"(characters {head_end}-{tail_start}){how}]\n"
    )
    return content[:head_end] + marker + content[tail_start:]


def fit_tool_results(
    messages: Sequence[common_pb2.Message], budget: int, *, readable: bool
) -> list[common_pb2.Message]:
    """``messages`` with every tool result over ``budget`` characters cut (``cut``): copies of
    the messages changed, the others as they are. History itself keeps every result whole."""
    out: list[common_pb2.Message] = []
    for message in messages:
        if message.role != common_pb2.ROLE_TOOL or not any(
            len(c.tool_result.content) > budget for c in message.chunks if c.HasField("tool_result")
        ):
            out.append(message)
            continue
        shown = common_pb2.Message()
        shown.CopyFrom(message)
        for chunk in shown.chunks:
            if chunk.HasField("tool_result"):
                r = chunk.tool_result
                r.content = cut(r.content, budget, r.tool_call_id, readable=readable)
        out.append(shown)
    return out


def find_tool_output(messages: Sequence[common_pb2.Message], tool_call_id: str) -> str | None:
    """The whole output of call ``tool_call_id`` in ``messages`` (the latest such), or None."""
    for message in reversed(messages):
        if message.role == common_pb2.ROLE_TOOL:
            for chunk in message.chunks:
                if chunk.HasField("tool_result") and chunk.tool_result.tool_call_id == tool_call_id:
                    return chunk.tool_result.content
    return None


# ------------------------------------------------------------------ compaction

# What the summary keeps of each tool result it is made from, in characters.
SUMMARY_RESULT_CHARS = 2_000
# The share of the window's input the messages kept verbatim after a compaction may fill.
KEEP_SHARE = 0.3

COMPACTION_PROMPT = (
    "You summarise the earlier part of a conversation between a user and an AI agent that uses "
    "tools, so that the agent can carry on the work from your summary and the most recent "
    "messages alone. Write a complete, concise summary: the user's goals and instructions "
    "(verbatim where the wording matters), decisions made, what has been done (files read or "
    "changed, commands run and what they showed), what failed and why, what is still open, and "
    "the next steps. Keep paths, names, numbers and error messages exact. Invent nothing."
)
SUMMARY_INTRO = "A summary of the conversation's earlier messages (they are not shown):"
CONTINUE = "(The earlier conversation is summarised above. Continue.)"


class ContextFull(Exception):
    """A request does not fit the model's window, even compacted: the turn ends with this."""


def visible(
    history: Sequence[common_pb2.Message],
) -> tuple[common_pb2.Message | None, list[common_pb2.Message]]:
    """The latest compaction record in ``history`` (None: none) and the messages a request
    carries: those after what it covers (and uncommitted ones), records left out."""
    record = next((m for m in reversed(history) if m.HasField("compaction")), None)
    covers = record.compaction.covers_to_seq if record is not None else 0
    return record, [m for m in history if not m.HasField("compaction") and (m.seq == 0 or m.seq > covers)]


def summary_text(record: common_pb2.Message | None) -> str:
    return "".join(c.text.text for c in record.chunks if c.HasField("text")) if record is not None else ""


def with_summary(system: str, record: common_pb2.Message | None) -> str:
    """The system prompt, and the summary after it when there is one."""
    summary = summary_text(record)
    return f"{system}\n\n{SUMMARY_INTRO}\n{summary}" if summary else system


def split_point(messages: Sequence[common_pb2.Message], keep_tokens: int) -> int:
    """Where to cut ``messages`` into what a summary covers and what stays verbatim: the
    earliest index whose tail fits ``keep_tokens``, else the latest possible. Never before a
    tool message (a call and its results stay together), never after an uncommitted message,
    and never 0 (something is covered). 0: there is no such place."""
    candidates = [
        i
        for i in range(1, len(messages))
        if messages[i].role != common_pb2.ROLE_TOOL and all(m.seq for m in messages[:i])
    ]
    if not candidates:
        return 0
    tail = 0
    fits = []
    sizes = [estimate_message(m) for m in messages]
    for i in range(len(messages) - 1, 0, -1):
        tail += sizes[i]
        if tail > keep_tokens:
            break
        if i in candidates:
            fits.append(i)
    return min(fits) if fits else max(candidates)


def transcript(
    record: common_pb2.Message | None, messages: Sequence[common_pb2.Message], limit_chars: int
) -> str:
    """``messages`` as plain text for the summary request (tool results cut short), after the
    previous summary; at most ``limit_chars`` (the oldest messages go first)."""
    parts = []
    for m in messages:
        role = common_pb2.Role.Name(m.role).removeprefix("ROLE_").lower()
        for chunk in m.chunks:
            kind = chunk.WhichOneof("kind")
            if kind == "text":
                parts.append(f"[{role}] {chunk.text.text}")
            elif kind == "tool_call":
                c = chunk.tool_call
                parts.append(f"[{role} called {c.name} {c.input_json} (call {c.id})]")
            elif kind == "tool_result":
                r = chunk.tool_result
                error = " (error)" if r.is_error else ""
                content = cut(r.content, SUMMARY_RESULT_CHARS, r.tool_call_id, readable=False)
                parts.append(f"[result of call {r.tool_call_id}{error}] {content}")
            elif kind == "error":
                parts.append(f"[error] {chunk.error.message}")
    body = "\n\n".join(parts)
    previous = summary_text(record)
    head = f"{SUMMARY_INTRO}\n{previous}\n\n" if previous else ""
    room = max(0, limit_chars - len(head))
    if len(body) > room:
        body = "[... the oldest messages are left out ...]\n" + body[len(body) - room :]
    return head + body
