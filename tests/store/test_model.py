"""SQLiteStore against a plain in-memory model of a conversation's history.

Random appends (text, tool calls, results for some open calls), loads, tail loads
and reconciles, each example on a fresh database file. The model is written out
here, not borrowed from the store's code, so a wrong rule in the store fails here.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dispatch.store.sqlite import SQLiteStore
from dispatch.v1 import common_pb2
from tests.store.harness import TENANT

T = TypeVar("T")

TURN = "turn_00000000000000000000000000"


def call_chunk(call_id: str, step_index: int) -> common_pb2.Chunk:
    return common_pb2.Chunk(
        tool_call=common_pb2.ToolCallChunk(
            id=call_id, name="shell", input_json='{"n": 1}', step_id=f"{TURN}#{step_index}"
        )
    )


def result_chunk(call_id: str, step_index: int) -> common_pb2.Chunk:
    return common_pb2.Chunk(
        tool_result=common_pb2.ToolResultChunk(
            tool_call_id=call_id, name="shell", content="done", step_id=f"{TURN}#{step_index}"
        )
    )


def text_chunk(text: str) -> common_pb2.Chunk:
    return common_pb2.Chunk(text=common_pb2.TextChunk(text=text))


class History(RuleBasedStateMachine):
    """The model: the messages in order (seq = position + 1) and the calls still open."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="dispatch-model-"))
        self.store = self.run(
            SQLiteStore.open(f"sqlite:///{self.tmp / 'store.db'}", default_workspace_root="/w")
        )
        self.conversation_id = ""
        self.messages: list[common_pb2.Message] = []
        # call id → step index of every call without a result.
        self.open_calls: dict[str, int] = {}
        self.next_call = 0
        self.step = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize()
    def create_conversation(self) -> None:
        self.conversation_id = self.run(self.store.create_conversation(TENANT)).id

    def _model_append(self, messages: list[common_pb2.Message]) -> None:
        for msg in messages:
            expected = common_pb2.Message()
            expected.CopyFrom(msg)
            expected.conversation_id = self.conversation_id
            expected.seq = len(self.messages) + 1
            self.messages.append(expected)

    def _check(self, got: list[common_pb2.Message], expected: list[common_pb2.Message]) -> None:
        stripped = []
        for msg in got:
            copy = common_pb2.Message()
            copy.CopyFrom(msg)
            assert copy.HasField("created_at")
            copy.ClearField("created_at")
            stripped.append(copy)
        assert stripped == expected

    @rule(texts=st.lists(st.text(max_size=8), min_size=1, max_size=3))
    def append_text(self, texts: list[str]) -> None:
        batch = [common_pb2.Message(role=common_pb2.ROLE_USER, chunks=[text_chunk(t)]) for t in texts]
        done = self.run(self.store.append(TENANT, self.conversation_id, batch))
        self._model_append(batch)
        assert [m.seq for m in done.messages] == [m.seq for m in self.messages[-len(batch) :]]

    @rule(count=st.integers(min_value=1, max_value=3))
    def append_tool_calls(self, count: int) -> None:
        self.step += 1
        ids = [f"call_{self.next_call + i}" for i in range(count)]
        self.next_call += count
        msg = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            turn_id=TURN,
            step_index=self.step,
            chunks=[text_chunk("working"), *(call_chunk(i, self.step) for i in ids)],
        )
        self.run(self.store.append(TENANT, self.conversation_id, [msg]))
        self._model_append([msg])
        for call_id in ids:
            self.open_calls[call_id] = self.step

    @precondition(lambda self: bool(self.open_calls))
    @rule(data=st.data())
    def append_some_results(self, data: st.DataObject) -> None:
        answered = data.draw(st.lists(st.sampled_from(sorted(self.open_calls)), min_size=1, unique=True))
        msg = common_pb2.Message(
            role=common_pb2.ROLE_TOOL,
            turn_id=TURN,
            step_index=self.step,
            chunks=[result_chunk(call_id, self.open_calls[call_id]) for call_id in answered],
        )
        self.run(self.store.append(TENANT, self.conversation_id, [msg]))
        self._model_append([msg])
        for call_id in answered:
            del self.open_calls[call_id]

    @rule()
    def reconcile(self) -> None:
        # Expected: for each message with open calls, in history order, one tool
        # message answering them with an error, in the same turn and step.
        expected: list[common_pb2.Message] = []
        for msg in self.messages:
            chunks = [
                common_pb2.Chunk(
                    tool_result=common_pb2.ToolResultChunk(
                        tool_call_id=c.tool_call.id,
                        name=c.tool_call.name,
                        content="Tool call was interrupted before it returned a result",
                        is_error=True,
                        step_id=c.tool_call.step_id,
                    )
                )
                for c in msg.chunks
                if c.HasField("tool_call") and c.tool_call.id in self.open_calls
            ]
            if chunks:
                expected.append(
                    common_pb2.Message(
                        role=common_pb2.ROLE_TOOL,
                        turn_id=msg.turn_id,
                        step_index=msg.step_index,
                        chunks=chunks,
                    )
                )
        appended = self.run(self.store.reconcile(TENANT, self.conversation_id))
        self._model_append(expected)
        self.open_calls.clear()
        self._check(appended, self.messages[len(self.messages) - len(expected) :])

    @rule()
    def load(self) -> None:
        history = self.run(self.store.load_since(TENANT, self.conversation_id))
        assert history.last_seq == len(self.messages)
        self._check(history.messages, self.messages)

    @rule(after=st.integers(min_value=0, max_value=30), limit=st.integers(min_value=0, max_value=5))
    def load_since(self, after: int, limit: int) -> None:
        history = self.run(self.store.load_since(TENANT, self.conversation_id, after_seq=after, limit=limit))
        tail = self.messages[after:]
        self._check(history.messages, tail[:limit] if limit else tail)
        assert history.last_seq == len(self.messages)

    @invariant()
    def seq_is_gap_free_and_only_open_calls_dangle(self) -> None:
        if not self.conversation_id:
            return
        history = self.run(self.store.load_since(TENANT, self.conversation_id)).messages
        assert [m.seq for m in history] == list(range(1, len(history) + 1))
        called = {c.tool_call.id for m in history for c in m.chunks if c.HasField("tool_call")}
        answered = {
            c.tool_result.tool_call_id for m in history for c in m.chunks if c.HasField("tool_result")
        }
        assert called - answered == set(self.open_calls)


History.TestCase.settings = settings(max_examples=30, stateful_step_count=15, deadline=None)
TestHistory = History.TestCase
