"""``dispatch``: talk to a Dispatch server from the terminal.

dispatch chat "what is in this workspace?"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import TextIO

from dispatch_client._proto import common_pb2
from dispatch_client.client import DEFAULT_ADDRESS, DispatchClient, DispatchError

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


class Renderer:
    """Writes a turn's events as they arrive: text as it streams, each tool
    call and its result, and how the turn finished."""

    def __init__(self, out: TextIO, *, color: bool = False):
        self.out = out
        self.color = color
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
        if kind == "text_delta":
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


async def chat(address: str, conversation_id: str, text: str, out: TextIO, *, color: bool) -> int:
    """Send ``text`` and render the turn until it is sealed. Returns the exit status."""
    async with DispatchClient(address) as client:
        if not conversation_id:
            conversation_id = (await client.create_conversation()).id
            print(f"conversation {conversation_id}", file=sys.stderr)
        sent = await client.send(conversation_id, text)
        renderer = Renderer(out, color=color)
        async for event in client.subscribe(conversation_id, after_event_seq=sent.after_event_seq):
            if event.turn_id != sent.turn_id:
                continue
            renderer.event(event)
            if event.WhichOneof("kind") == "turn_sealed":
                break
        print(f'continue with: dispatch chat -c {conversation_id} "..."', file=sys.stderr)
        return 0 if renderer.finish in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH) else 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dispatch", description="Talk to a Dispatch server.")
    top.add_argument(
        "--address",
        default=os.environ.get("DISPATCH_ADDRESS", DEFAULT_ADDRESS),
        help=f"transport address (env: DISPATCH_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat", help="send a message and stream the turn")
    p.add_argument("message")
    p.add_argument("--conversation", "-c", default="", help="continue this conversation (default: a new one)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(
            chat(args.address, args.conversation, args.message, sys.stdout, color=sys.stdout.isatty())
        )
    except DispatchError as exc:
        hint = (
            " — is the server running? start it with `dispatchd up`" if exc.code.name == "UNAVAILABLE" else ""
        )
        print(f"dispatch: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
