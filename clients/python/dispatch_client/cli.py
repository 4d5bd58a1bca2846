"""``dispatch``: talk to a Dispatch server from the terminal.

dispatch chat "what is in this workspace?"          # a new conversation, one turn
dispatch conversations create --title notes         # prints the new id
dispatch send CONV "and now?"                       # send, render the turn
dispatch watch CONV --json                          # follow the event stream
dispatch history CONV                               # committed messages
dispatch cancel CONV                                # abort the running turn

The key comes from ``--api-key``, else ``DISPATCH_API_KEY``, else the file
``dispatchd up`` writes (``$DISPATCH_DATA_DIR/api_key``). Failures print
``dispatch: STATUS: message`` and exit 1; usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from dispatch_client._calls import DEFAULT_TIMEOUT, POLICY_NAMES
from dispatch_client._proto import common_pb2
from dispatch_client.client import DEFAULT_ADDRESS, DispatchClient
from dispatch_client.errors import DispatchError

_FINISH_WORDS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content filter",
    common_pb2.FINISH_REASON_MAX_STEPS: "max steps",
    common_pb2.FINISH_REASON_TOOL_BUDGET: "tool budget",
    common_pb2.FINISH_REASON_DOOM_LOOP: "doom loop",
    common_pb2.FINISH_REASON_ABORTED: "aborted",
    common_pb2.FINISH_REASON_ERROR: "error",
}
_GOOD_FINISH = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)


class Renderer:
    """Writes a turn's events as they arrive: text as it streams, each tool
    call and its result, and how the turn finished. With ``show_turns``, a
    line also marks where each turn starts (for a stream of many turns)."""

    def __init__(self, out: TextIO, *, color: bool = False, show_turns: bool = False):
        self.out = out
        self.color = color
        self.show_turns = show_turns
        self._mid_line = False
        self.finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED

    def _style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def _line(self, text: str) -> None:
        if self._mid_line:
            self.out.write("\n")
        self.out.write(text + "\n")
        self._mid_line = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self._mid_line = not text.endswith("\n")

    def event(self, event: common_pb2.AgentEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "turn_started" and self.show_turns:
            started = event.turn_started
            self._line(
                self._style(f"▶ turn {event.turn_id} ({started.agent or 'agent'} · {started.model})", "1")
            )
        elif kind == "text_delta":
            self._write(event.text_delta.text)
        elif kind == "reasoning_delta":
            self._write(self._style(event.reasoning_delta.text, "2"))
        elif kind == "tool_call":
            call = event.tool_call
            self._line(self._style(f"→ {call.name} {_compact(call.input_json)}", "36"))
        elif kind == "tool_output":
            self._write(self._style(event.tool_output.data.decode("utf-8", "replace"), "2"))
        elif kind == "tool_result":
            result = event.tool_result
            mark = "✗" if result.is_error else "←"
            self._line(
                self._style(
                    f"{mark} {result.name}: {_preview(result.content)}", "31" if result.is_error else "32"
                )
            )
        elif kind == "provider_retry":
            retry = event.provider_retry
            self._line(self._style(f"(provider retry {retry.attempt}: {retry.reason})", "33"))
        elif kind == "steering_injected" and self.show_turns:
            count = len(event.steering_injected.message_seqs)
            self._line(self._style(f"(steering: {count} queued message(s) taken)", "33"))
        elif kind == "error":
            self._line(self._style(f"error: {event.error.message}", "31"))
        elif kind == "turn_done":
            done = event.turn_done
            self.finish = done.finish_reason
            usage = done.usage
            self._line(
                self._style(
                    f"— {_FINISH_WORDS.get(done.finish_reason, 'done')} · {done.steps} step(s) · "
                    f"{usage.input_tokens} in / {usage.output_tokens} out tokens · "
                    f"{done.duration.ToMilliseconds() / 1000:.2f}s",
                    "2",
                )
            )
        self.out.flush()


def _compact(input_json: str) -> str:
    try:
        return json.dumps(json.loads(input_json), separators=(", ", ": "))
    except json.JSONDecodeError:
        return input_json


def _preview(content: str, lines: int = 3, width: int = 160) -> str:
    shown = content.splitlines()[:lines]
    text = " ⏎ ".join(line[:width] for line in shown)
    more = len(content.splitlines()) - len(shown)
    return text + (f" … (+{more} lines)" if more > 0 else "")


# ------------------------------------------------------------------ JSON lines


def _as_dict(message: Message, **first: Any) -> dict[str, Any]:
    """``message`` in protobuf's JSON mapping, after ``first`` (int64 counters there stay numbers)."""
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return {**first, **{k: v for k, v in body.items() if k not in first}}


def event_json(event: common_pb2.AgentEvent) -> str:
    """One event as a JSON line: ``event_seq`` (a number) and ``kind`` first."""
    return json.dumps(
        _as_dict(event, event_seq=event.event_seq, kind=event.WhichOneof("kind")), ensure_ascii=False
    )


def message_text(message: common_pb2.Message) -> str:
    return "".join(chunk.text.text for chunk in message.chunks if chunk.HasField("text"))


def message_json(message: common_pb2.Message) -> str:
    role = common_pb2.Role.Name(message.role).removeprefix("ROLE_").lower()
    fields = _as_dict(message, seq=message.seq, role=role, text=message_text(message))
    return json.dumps(fields, ensure_ascii=False)


def conversation_json(conv: common_pb2.Conversation) -> str:
    fields = _as_dict(conv, id=conv.id, last_seq=conv.last_seq, last_event_seq=conv.last_event_seq)
    return json.dumps(fields, ensure_ascii=False)


def _chunk_line(chunk: common_pb2.Chunk) -> str:
    kind = chunk.WhichOneof("kind")
    if kind == "text":
        return chunk.text.text
    if kind == "thinking":
        return f"(thinking) {_preview(chunk.thinking.text)}"
    if kind == "tool_call":
        return f"→ {chunk.tool_call.name} {_compact(chunk.tool_call.input_json)}"
    if kind == "tool_result":
        mark = "✗" if chunk.tool_result.is_error else "←"
        return f"{mark} {chunk.tool_result.name}: {_preview(chunk.tool_result.content)}"
    if kind == "error":
        return f"error: {chunk.error.message}"
    return ""


def message_line(message: common_pb2.Message) -> str:
    role = common_pb2.Role.Name(message.role).removeprefix("ROLE_").lower()
    body = "\n    ".join(line for line in map(_chunk_line, message.chunks) if line)
    return f"#{message.seq} {role}: {body}"


# -------------------------------------------------------------------- commands


def _client(args: argparse.Namespace) -> DispatchClient:
    return DispatchClient(args.address, api_key=args.api_key, timeout=args.timeout)


async def _render(events: AsyncIterator[common_pb2.AgentEvent], out: TextIO, *, as_json: bool) -> int:
    """Write a turn's events; the exit status says whether it finished well."""
    renderer = Renderer(out, color=out.isatty() and not as_json)
    async for event in events:
        if as_json:
            print(event_json(event), file=out, flush=True)
            if event.HasField("turn_done"):
                renderer.finish = event.turn_done.finish_reason
        else:
            renderer.event(event)
    return 0 if renderer.finish in _GOOD_FINISH else 1


async def chat(
    address: str,
    conversation_id: str,
    text: str,
    out: TextIO,
    *,
    color: bool,
    api_key: str | None = None,
    rpc_timeout: float | None = DEFAULT_TIMEOUT,
) -> int:
    """Send ``text`` and render the turn until it is sealed. Returns the exit status."""
    async with DispatchClient(address, api_key=api_key, timeout=rpc_timeout) as client:
        if not conversation_id:
            conversation_id = (await client.create_conversation()).id
            print(f"conversation {conversation_id}", file=sys.stderr)
        renderer = Renderer(out, color=color)
        async with contextlib.aclosing(client.run_turn(conversation_id, text)) as events:
            async for event in events:
                renderer.event(event)
        print(f'continue with: dispatch chat -c {conversation_id} "..."', file=sys.stderr)
        return 0 if renderer.finish in _GOOD_FINISH else 1


async def _chat(args: argparse.Namespace, out: TextIO) -> int:
    return await chat(
        args.address,
        args.conversation,
        args.message,
        out,
        color=out.isatty(),
        api_key=args.api_key,
        rpc_timeout=args.timeout,
    )


async def _send(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        options: dict[str, Any] = {"policy": args.policy, "idempotency_key": args.idempotency_key}
        if args.no_wait:
            sent = await client.send(args.conversation, args.text, **options)
            if args.json:
                print(json.dumps(_as_dict(sent, after_event_seq=sent.after_event_seq)), file=out)
            else:
                print(sent.turn_id, file=out)
                if sent.queued:
                    print(f"queued behind the running turn {sent.turn_id}", file=sys.stderr)
            return 0
        async with contextlib.aclosing(client.run_turn(args.conversation, args.text, **options)) as events:
            return await _render(events, out, as_json=args.json)


async def _watch(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        renderer = Renderer(out, color=out.isatty() and not args.json, show_turns=True)
        async with contextlib.aclosing(
            client.subscribe(args.conversation, after_event_seq=args.after)
        ) as events:
            async for event in events:
                if args.json:
                    print(event_json(event), file=out, flush=True)
                else:
                    renderer.event(event)
                if args.until_sealed and event.HasField("turn_sealed"):
                    break
    return 0


async def _history(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        page = min(args.limit, 500) if args.limit > 0 else 500
        messages = client.iter_history(args.conversation, after_seq=args.after, page_size=page)
        async with contextlib.aclosing(messages):
            count = 0
            async for message in messages:
                print(message_json(message) if args.json else message_line(message), file=out)
                count += 1
                if args.limit and count >= args.limit:
                    break
    return 0


async def _conversations(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        if args.action == "create":
            conv = await client.create_conversation(
                workspace_id=args.workspace,
                title=args.title,
                cwd=args.cwd,
                computer_id=args.computer,
                agent=args.agent,
            )
            print(conversation_json(conv) if args.json else conv.id, file=out)
            return 0
        if args.action == "delete":
            await client.delete_conversation(args.id)
            return 0
        convs = client.iter_conversations(workspace_id=args.workspace)
        async with contextlib.aclosing(convs):
            async for conv in convs:
                if args.json:
                    print(conversation_json(conv), file=out)
                else:
                    when = (
                        conv.updated_at.ToDatetime().strftime("%Y-%m-%d %H:%M")
                        if conv.updated_at.seconds
                        else "-"
                    )
                    print(
                        f"{conv.id}  {when}  {conv.last_seq:>4} msg  {conv.title or '(untitled)'}", file=out
                    )
    return 0


async def _cancel(args: argparse.Namespace, out: TextIO) -> int:
    async with _client(args) as client:
        cancelled = await client.cancel(args.conversation, args.turn)
    if cancelled.turn_id:
        print(cancelled.turn_id, file=out)
    else:
        which = f"turn {args.turn} is not running" if args.turn else "no turn is running"
        print(f"nothing to cancel: {which}", file=sys.stderr)
    return 0


_COMMANDS = {
    "chat": _chat,
    "send": _send,
    "watch": _watch,
    "history": _history,
    "conversations": _conversations,
    "cancel": _cancel,
}


def parser() -> argparse.ArgumentParser:
    # The global options, accepted before the command or after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        help=f"transport address (env: DISPATCH_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="API key (default: env DISPATCH_API_KEY, else $DISPATCH_DATA_DIR/api_key)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds a call may take (default {DEFAULT_TIMEOUT:g}; streams have no limit)",
    )

    top = argparse.ArgumentParser(prog="dispatch", description="Talk to a Dispatch server.", parents=[common])
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = command("chat", "send a message and stream the turn")
    p.add_argument("message")
    p.add_argument("--conversation", "-c", default="", help="continue this conversation (default: a new one)")

    p = command("send", "send a message to a conversation and render its turn")
    p.add_argument("conversation")
    p.add_argument("text")
    p.add_argument(
        "--policy", choices=POLICY_NAMES, default="enqueue", help="when a turn runs (default: enqueue)"
    )
    p.add_argument("--idempotency-key", default="", help="a repeat with this key does not start another turn")
    p.add_argument("--no-wait", action="store_true", help="print the turn id and return at once")
    p.add_argument("--json", action="store_true", help="one JSON event per line")

    p = command("watch", "follow a conversation's events (reconnecting by itself)")
    p.add_argument("conversation")
    p.add_argument(
        "--after", type=int, default=0, metavar="N", help="events after event_seq N (default 0: all)"
    )
    p.add_argument("--json", action="store_true", help="one JSON event per line, with event_seq")
    p.add_argument("--until-sealed", action="store_true", help="exit after the first turn_sealed")

    p = command("history", "print a conversation's committed messages")
    p.add_argument("conversation")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="messages after seq SEQ")
    p.add_argument("--limit", type=int, default=0, help="at most this many messages")
    p.add_argument("--json", action="store_true", help="one JSON message per line")

    p = command("conversations", "list conversations, or create or delete one")
    p.add_argument("--workspace", default="", help="only this workspace's (create: in this workspace)")
    p.add_argument("--json", action="store_true", help="one JSON conversation per line")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    create = actions.add_parser("create", help="create a conversation; prints its id", parents=[common])
    create.add_argument("--title", default="")
    create.add_argument("--cwd", default="", help="directory tools start in (default: the workspace root)")
    create.add_argument("--computer", default="", help="SSH Host alias tools run on (default: this machine)")
    create.add_argument("--agent", default="", help="agent to use (default: the workspace's)")
    create.add_argument("--workspace", default=argparse.SUPPRESS, help="create it in this workspace")
    create.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print it as JSON")
    delete = actions.add_parser("delete", help="delete a conversation", parents=[common])
    delete.add_argument("id")

    p = command("cancel", "abort a conversation's running turn")
    p.add_argument("conversation")
    p.add_argument("--turn", default="", metavar="ID", help="only if this turn is the one running")
    return top


class _StderrHandler(logging.Handler):
    """The SDK's warnings (a stream that broke and is being resumed) as ``dispatch: ...`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"dispatch: {self.format(record)}", file=sys.stderr, flush=True)


def _show_sdk_warnings() -> None:
    sdk = logging.getLogger("dispatch_client")
    if not any(isinstance(h, _StderrHandler) for h in sdk.handlers):
        sdk.addHandler(_StderrHandler(logging.WARNING))
        sdk.setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    # The global options' defaults, filled in here: set_defaults would reach the subcommands'
    # copies of the options too, and override what was given before the command.
    args.address = getattr(args, "address", None) or os.environ.get("DISPATCH_ADDRESS") or DEFAULT_ADDRESS
    args.api_key = getattr(args, "api_key", None)
    args.timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _show_sdk_warnings()
    out = sys.stdout
    try:
        return asyncio.run(_COMMANDS[args.command](args, out))
    except DispatchError as exc:
        hint = (
            " — is the server running? start it with `dispatchd up`" if exc.code.name == "UNAVAILABLE" else ""
        )
        print(f"dispatch: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`dispatch watch --json | head`): not an error of ours.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
