"""The `dispatch` CLI's rendering of a turn."""

from __future__ import annotations

import io

from dispatch_client._proto import common_pb2
from dispatch_client.cli import Renderer


def ev(**kind: object) -> common_pb2.AgentEvent:
    return common_pb2.AgentEvent(**kind)  # type: ignore[arg-type]


def test_renders_text_as_it_streams_tool_calls_results_and_the_finish() -> None:
    out = io.StringIO()
    r = Renderer(out)
    r.event(ev(text_delta=common_pb2.TextDelta(text="Let me ")))
    assert out.getvalue() == "Let me "  # written at once, no newline
    r.event(ev(text_delta=common_pb2.TextDelta(text="look.")))
    r.event(ev(tool_call=common_pb2.ToolCallEvent(name="list_dir", input_json='{"path":"."}')))
    r.event(ev(tool_result=common_pb2.ToolResultEvent(name="list_dir", content="a.txt (1 bytes)\nb/\nc\nd")))
    r.event(ev(tool_result=common_pb2.ToolResultEvent(name="shell", content="boom", is_error=True)))
    done = common_pb2.TurnDone(
        finish_reason=common_pb2.FINISH_REASON_STOP,
        steps=2,
        usage=common_pb2.Usage(input_tokens=10, output_tokens=4),
    )
    done.duration.FromMilliseconds(1500)
    r.event(ev(turn_done=done))
    assert out.getvalue().splitlines() == [
        "Let me look.",
        '→ list_dir {"path": "."}',
        "← list_dir: a.txt (1 bytes) ⏎ b/ ⏎ c … (+1 lines)",
        "✗ shell: boom",
        "— stop · 2 step(s) · 10 in / 4 out tokens · 1.50s",
    ]
    assert r.finish == common_pb2.FINISH_REASON_STOP


def test_errors_are_rendered_on_their_own_line() -> None:
    out = io.StringIO()
    r = Renderer(out)
    r.event(ev(text_delta=common_pb2.TextDelta(text="partial")))
    r.event(ev(error=common_pb2.ErrorEvent(message="provider answered 500")))
    assert out.getvalue() == "partial\nerror: provider answered 500\n"
