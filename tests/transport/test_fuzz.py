"""Every public RPC, fed random and corrupt requests (a fixed seed, a bounded count): no
answer is UNKNOWN or INTERNAL, nothing logs a traceback, and the service answers properly
afterwards. Every internal service answers undecodable bytes with INVALID_ARGUMENT.

A failure prints the seed, the method and the request (hex) that caused it; rerun with
DISPATCH_FUZZ_SEED to try other inputs."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import message_factory

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.v1 import common_pb2, exec_pb2, kernel_pb2, store_pb2, transport_pb2
from tests.stack import Stack, bearer_auth, start_stack

SEED = int(os.environ.get("DISPATCH_FUZZ_SEED", "20261201"))
RANDOM_PER_METHOD = 40
CORRUPT_PER_METHOD = 15
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FD = pb_descriptor.FieldDescriptor

# Strings a request field might carry: ids of every kind, near-ids, control characters,
# astral and combining characters, huge ones, and the empty one.
STRINGS = [
    "",
    " ",
    "conv_",
    "conv_00000000000000000000000000",
    "conv_ZZZZZZZZZZZZZZZZZZZZZZZZZZ",
    "turn_00000000000000000000000000",
    "ws_00000000000000000000000000",
    "appr_00000000000000000000000000",
    "../../etc/passwd",
    "/",
    "\x00",
    "\u202e\u0301\U0001f600",
    "a" * 5000,
    "%s%n{}",
    "SELECT 1; --",
]


class Fuzzer:
    def __init__(self, rng: random.Random, real: dict[str, str]):
        self.rng = rng
        # Field name -> a real value to use now and then, so calls reach past validation.
        self.real = real

    def text(self, field: Any) -> str:
        rng = self.rng
        if field.name in self.real and rng.random() < 0.5:
            return self.real[field.name]
        if rng.random() < 0.6:
            return rng.choice(STRINGS)
        return "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF)]))
            for _ in range(rng.randrange(0, 40))
        )

    def scalar(self, field: Any) -> Any:
        rng = self.rng
        kind = field.type
        if kind == FD.TYPE_STRING:
            return self.text(field)
        if kind == FD.TYPE_BYTES:
            return rng.randbytes(rng.randrange(0, 64))
        if kind == FD.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == FD.TYPE_ENUM:
            numbers = [v.number for v in field.enum_type.values]
            return rng.choice([*numbers, max(numbers) + 1, 99])
        if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return rng.choice([0.0, -1.0, 1e300, float("nan"), float("inf"), rng.uniform(-1e6, 1e6)])
        bits = 32 if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32) else 64
        unsigned = kind in (FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64)
        low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return rng.choice(
            [0, 1, -1 if not unsigned else 2, low, high, rng.randint(low, high), rng.randint(0, 2000)]
        )

    def fill(self, message: pb_message.Message, depth: int = 0) -> pb_message.Message:
        rng = self.rng
        for field in message.DESCRIPTOR.fields:
            if rng.random() < 0.35:
                continue  # left unset
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            if field.is_repeated:
                container = getattr(message, field.name)
                for _ in range(rng.choice([0, 1, 2, 5, 70] if depth == 0 else [0, 1, 2])):
                    if field.message_type is not None:
                        if depth < 3:
                            self.fill(container.add(), depth + 1)
                    else:
                        container.append(self.scalar(field))
                continue
            if field.message_type is not None:
                if depth < 3:
                    self.fill(getattr(message, field.name), depth + 1)
                continue
            try:
                setattr(message, field.name, self.scalar(field))
            except (ValueError, TypeError):  # e.g. NaN where the runtime refuses it
                continue
        return message

    def corrupt(self, valid: bytes) -> bytes:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0 or not valid:
            return rng.randbytes(rng.randrange(1, 80))
        if choice == 1:
            return valid[: rng.randrange(len(valid))] + b"\xff"
        if choice == 2:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            return bytes(data)
        # A string field whose bytes are not UTF-8.
        return valid + b"\x0a\x04\xc3\x28\xa0\xa1"


def methods(service: pb_descriptor.ServiceDescriptor) -> list[pb_descriptor.MethodDescriptor]:
    return list(service.methods)


def undecodable(method: pb_descriptor.MethodDescriptor) -> bytes:
    """Bytes that cannot be ``method``'s request: a string field 1 that is not UTF-8, or
    (without one) a length that runs past the end."""
    first = method.input_type.fields_by_number.get(1)
    if first is not None and first.type == FD.TYPE_STRING:
        return b"\x0a\x04\xc3\x28\xa0\xa1"
    return b"\x0a\x10ab"


PUBLIC = transport_pb2.DESCRIPTOR.services_by_name["Dispatch"]
# The methods on a conversation, and what a plain request of each holds besides its id.
REACHED: dict[str, dict[str, Any]] = {
    "Send": {"text": "hi"},
    "Subscribe": {"until": common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP},
    "History": {},
    "UpdateConversation": {"title": "t"},
    "GetConversation": {},
    "Metrics": {},
    "Cancel": {},
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    provider = ScriptedProvider.from_data({"steps": [[{"type": "text_delta", "text": "ok"}]]})
    s = await start_stack(tmp_path, provider, transport=True)
    yield s
    await s.stop()


async def call_raw(
    channel: grpc.aio.Channel, service: str, method: pb_descriptor.MethodDescriptor, payload: bytes
) -> grpc.StatusCode:
    """Send ``payload`` as the request of ``method``; answer its final status."""
    path = f"/{service}/{method.name}"
    try:
        if method.server_streaming:
            open_stream: Any = channel.unary_stream(path)
            stream = open_stream(payload, timeout=3)
            async for _ in stream:
                pass
        else:
            rpc: Any = channel.unary_unary(path)
            await rpc(payload, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def answers(stack: Stack) -> None:
    """The public API still works: a conversation made and a turn run to its seal."""
    api = stack.transport
    conv = await api.CreateConversation(transport_pb2.PublicCreateConversationRequest(), timeout=10)
    sent = await api.Send(transport_pb2.SendRequest(conversation_id=conv.id, text="still there?"), timeout=10)
    stream = api.Subscribe(
        transport_pb2.SubscribeRequest(
            conversation_id=conv.id,
            after_event_seq=sent.after_event_seq,
            until=common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED,
        ),
        timeout=20,
    )
    events = [e async for r in stream for e in r.events]
    assert events and events[-1].HasField("turn_sealed")


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    broken = [r for r in caplog.records if r.exc_info is not None or "Traceback" in r.getMessage()]
    assert not broken, "\n".join(r.getMessage() for r in broken)


async def test_every_public_rpc_survives_random_and_corrupt_requests(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    api = stack.transport
    conv = await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())
    real = {"conversation_id": conv.id, "workspace_id": conv.workspace_id}
    rng = random.Random(SEED)
    fuzz = Fuzzer(rng, real)
    channel = grpc.aio.insecure_channel(stack.address("transport"), interceptors=bearer_auth(stack.api_key))
    stack.channels.append(channel)
    seen: dict[str, set[grpc.StatusCode]] = {}
    for method in methods(PUBLIC):
        # A live conversation for each method (an earlier method may have deleted one).
        real["conversation_id"] = (
            await api.CreateConversation(transport_pb2.PublicCreateConversationRequest())
        ).id
        request_class = message_factory.GetMessageClass(method.input_type)
        for i in range(RANDOM_PER_METHOD + CORRUPT_PER_METHOD):
            valid = fuzz.fill(request_class()).SerializeToString()
            payload = valid if i < RANDOM_PER_METHOD else fuzz.corrupt(valid)
            code = await call_raw(channel, PUBLIC.full_name, method, payload)
            seen.setdefault(method.name, set()).add(code)
            assert code not in BAD, f"seed {SEED}: {method.name}({payload.hex()}) answered {code.name}"
        code = await call_raw(channel, PUBLIC.full_name, method, undecodable(method))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (
            f"{method.name}: undecodable bytes answered {code.name}"
        )
        if method.name in REACHED:
            # And a plain request on the real conversation gets past validation: the fuzzing
            # above reached the method's own code, not only its checks.
            plain = request_class(conversation_id=real["conversation_id"], **REACHED[method.name])
            code = await call_raw(channel, PUBLIC.full_name, method, plain.SerializeToString())
            assert code == grpc.StatusCode.OK, f"{method.name}({plain}) answered {code.name}"
    await answers(stack)
    no_tracebacks(caplog)


INTERNAL = [
    (store_pb2.DESCRIPTOR.services_by_name["ConversationStore"], "store"),
    (kernel_pb2.DESCRIPTOR.services_by_name["Kernel"], "kernel"),
    (exec_pb2.DESCRIPTOR.services_by_name["Exec"], "exec"),
]


@pytest.mark.parametrize(("service", "name"), INTERNAL, ids=[name for _, name in INTERNAL])
async def test_every_internal_rpc_refuses_undecodable_bytes(
    stack: Stack, caplog: pytest.LogCaptureFixture, service: pb_descriptor.ServiceDescriptor, name: str
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(SEED)
    fuzz = Fuzzer(rng, {})
    channel = stack.channel(name)
    for method in methods(service):
        request_class = message_factory.GetMessageClass(method.input_type)
        for _ in range(3):
            valid = fuzz.fill(request_class()).SerializeToString()
            payload = valid + b"\x0a\x04\xc3\x28\xa0\xa1"  # a field 1 that is not valid UTF-8
            if (
                method.input_type.fields_by_number.get(1) is None
                or method.input_type.fields_by_number[1].type != FD.TYPE_STRING
            ):
                payload = b"\x0a\x10ab"  # a length past the end
            code = await call_raw(channel, service.full_name, method, payload)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (
                f"{name} {method.name}({payload.hex()}): {code.name}"
            )
    await answers(stack)
    no_tracebacks(caplog)
