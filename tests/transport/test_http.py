"""The HTTP bridge, over real HTTP, in front of the in-process stack's transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import httpx
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import ListenError
from dispatch.transport.http import HTTP_STATUS, HttpBridge, start_http, to_dict
from dispatch.v1 import common_pb2, transport_pb2, transport_pb2_grpc
from tests.stack import Stack, start_stack

KINDS = {f.name for f in common_pb2.AgentEvent.DESCRIPTOR.oneofs_by_name["kind"].fields}
# One turn: turn_started, a, (pause), b, c, then the step's and the turn's ends.
SCRIPT = {
    "steps": [
        [
            {"type": "text_delta", "text": "a"},
            {"type": "sleep", "seconds": 0.2},
            {"type": "text_delta", "text": "b"},
            {"type": "text_delta", "text": "c"},
        ]
    ]
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, ScriptedProvider.from_data(SCRIPT), transport=True)
    yield s
    await s.stop()


@pytest.fixture
async def bridge(stack: Stack) -> AsyncIterator[HttpBridge]:
    b = await start_http("127.0.0.1:0", stack.address("transport"))
    yield b
    await b.stop()


def http(bridge: HttpBridge, key: str | None) -> httpx.AsyncClient:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.port}", headers=headers, timeout=5.0)


@pytest.fixture
async def client(bridge: HttpBridge, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with http(bridge, stack.api_key) as c:
        yield c


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The frames of an SSE answer: an event's fields, or ``{"comment": ...}``."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def ndjson(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        yield json.loads(line)


async def sse_until_sealed(client: httpx.AsyncClient, conv: str, **headers: str) -> list[dict[str, str]]:
    frames = []
    async with client.stream(
        "GET", f"/v1/conversations/{conv}/events", headers={"Accept": "text/event-stream", **headers}
    ) as response:
        assert response.status_code == 200
        async for frame in sse(response):
            frames.append(frame)
            if frame.get("event") == "turn_sealed":
                break
    return frames


async def grpc_events(stack: Stack, conv: str, after: int) -> list[dict[str, Any]]:
    """What gRPC Subscribe gives after ``after``, up to the first turn_sealed."""
    events: list[common_pb2.AgentEvent] = []
    stream = stack.transport.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv, after_event_seq=after)
    )
    async for response in stream:
        events.extend(response.events)
        if any(e.HasField("turn_sealed") for e in response.events):
            stream.cancel()
            break
    return [to_dict(e) for e in events]


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/conversations", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def send(client: httpx.AsyncClient, conv: str, text: str = "hello", **body: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/conversations/{conv}/messages", json={"text": text, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


async def test_ndjson_stream_equals_grpc_subscribe(
    stack: Stack, bridge: HttpBridge, client: httpx.AsyncClient
) -> None:
    conv = await create(client, title="t")
    sent = await send(client, conv)
    assert sent["state"] == "TURN_STATE_RUNNING" and sent["turn_id"]
    # int64 travels as a string in proto3 JSON.
    after = sent.get("after_event_seq", "0")
    assert isinstance(after, str)
    lines = []
    async with client.stream("GET", f"/v1/conversations/{conv}/events?after_event_seq={after}") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        async for event in ndjson(response):
            lines.append(event)
            if "turn_sealed" in event:
                break
    assert lines == await grpc_events(stack, conv, int(after))
    assert lines[0]["turn_started"] and lines[0]["turn_id"] == sent["turn_id"]
    assert [e["text_delta"]["text"] for e in lines if "text_delta" in e] == ["a", "b", "c"]
    await eventually(lambda: bridge.active_streams == 0)


async def test_sse_ids_are_event_seqs_and_last_event_id_resumes_exactly(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    conv = await create(client)
    await send(client, conv)
    frames = await sse_until_sealed(client, conv)
    expected = await grpc_events(stack, conv, 0)
    assert [f["id"] for f in frames] == [e["event_seq"] for e in expected]
    assert [f["event"] for f in frames] == [next(k for k in e if k in KINDS) for e in expected]
    assert [json.loads(f["data"]) for f in frames] == expected
    # Resume from every point of the finished turn, from its middle included.
    for k in range(len(frames) - 1):
        resumed = await sse_until_sealed(client, conv, **{"Last-Event-ID": frames[k]["id"]})
        assert resumed == frames[k + 1 :]


async def test_sse_reconnect_mid_turn_has_no_gap_and_no_repeat(
    stack: Stack, bridge: HttpBridge, client: httpx.AsyncClient
) -> None:
    conv = await create(client)
    sent = await send(client, conv)
    first: list[dict[str, str]] = []
    async with client.stream(
        "GET",
        f"/v1/conversations/{conv}/events?after_event_seq={sent.get('after_event_seq', '0')}",
        headers={"Accept": "text/event-stream"},
    ) as response:
        async for frame in sse(response):
            first.append(frame)
            if frame.get("event") == "text_delta":
                break  # the browser drops the connection while the turn runs
    await eventually(lambda: bridge.active_streams == 0)
    rest = await sse_until_sealed(client, conv, **{"Last-Event-ID": first[-1]["id"]})
    expected = await grpc_events(stack, conv, int(sent.get("after_event_seq", "0")))
    assert [json.loads(f["data"]) for f in first + rest] == expected


async def test_last_event_id_wins_only_when_larger(client: httpx.AsyncClient) -> None:
    conv = await create(client)
    await send(client, conv)
    frames = await sse_until_sealed(client, conv)
    ids = [f["id"] for f in frames]
    later = await sse_until_sealed(client, conv, **{"Last-Event-ID": ids[1]})
    assert [f["id"] for f in later] == ids[2:]
    async with client.stream(
        "GET",
        f"/v1/conversations/{conv}/events?after_event_seq={ids[3]}",
        headers={"Accept": "text/event-stream", "Last-Event-ID": ids[1]},
    ) as response:
        first = await anext(aiter(sse(response)))
    assert first["id"] == ids[4]


async def test_an_idle_sse_stream_sends_keep_alive_comments(stack: Stack) -> None:
    bridge = await start_http("127.0.0.1:0", stack.address("transport"), keepalive=0.05)
    try:
        async with http(bridge, stack.api_key) as client:
            conv = await create(client)
            async with client.stream(
                "GET", f"/v1/conversations/{conv}/events", headers={"Accept": "text/event-stream"}
            ) as response:
                assert response.headers["cache-control"] == "no-cache"
                assert response.headers["x-accel-buffering"] == "no"
                assert response.headers["content-type"].startswith("text/event-stream")
                frames = aiter(sse(response))
                assert await anext(frames) == {"comment": "keep-alive"}
                assert await anext(frames) == {"comment": "keep-alive"}
    finally:
        await bridge.stop()


async def test_a_client_that_hangs_up_cancels_its_upstream_call(
    stack: Stack, bridge: HttpBridge, client: httpx.AsyncClient
) -> None:
    conv = await create(client)
    for accept in ("text/event-stream", "application/x-ndjson"):
        async with client.stream(
            "GET", f"/v1/conversations/{conv}/events", headers={"Accept": accept}
        ) as response:
            assert response.status_code == 200
            await eventually(lambda: bridge.active_streams == 1)
        # Idle: no write would notice the hang-up; the handler's cancellation must.
        await eventually(lambda: bridge.active_streams == 0, within=1.0)
    sent = await send(client, conv)
    assert sent["turn_id"]
    assert (await sse_until_sealed(client, conv))[-1]["event"] == "turn_sealed"


async def test_stop_ends_open_streams(stack: Stack) -> None:
    bridge = await start_http("127.0.0.1:0", stack.address("transport"))
    async with http(bridge, stack.api_key) as client:
        conv = await create(client)
        async with client.stream("GET", f"/v1/conversations/{conv}/events") as response:
            await eventually(lambda: bridge.active_streams == 1)
            await asyncio.wait_for(bridge.stop(), timeout=2.0)
            lines = [json.loads(line) async for line in response.aiter_lines()]
    # The stream ends with a status that tells the client to reconnect, and from where.
    assert lines == [
        {
            "error": {
                "code": "UNAVAILABLE",
                "message": "the server is shutting down; reconnect with after_event_seq=0",
            }
        }
    ]
    assert bridge.active_streams == 0


async def test_a_failed_start_leaves_nothing_open(stack: Stack, bridge: HttpBridge) -> None:
    with pytest.raises(ListenError, match=r"already in use.*--http-listen"):
        await start_http(f"127.0.0.1:{bridge.port}", stack.address("transport"))
    with pytest.raises(ListenError, match="host:port"):
        await start_http("localhost", stack.address("transport"))
    with pytest.raises(ListenError, match="0 to 65535"):
        await start_http("127.0.0.1:99999", stack.address("transport"))


async def test_conversation_routes(stack: Stack, client: httpx.AsyncClient) -> None:
    conv = await create(client, title="first")
    other = await create(client, title="second")
    got = (await client.get(f"/v1/conversations/{conv}")).json()
    assert (got["id"], got["title"], got["tenant_id"]) == (conv, "first", "local")
    page = (await client.get("/v1/conversations", params={"page_size": 1})).json()
    assert len(page["conversations"]) == 1 and page["next_page_token"]
    rest = (await client.get("/v1/conversations", params={"page_token": page["next_page_token"]})).json()
    assert {c["id"] for c in page["conversations"] + rest["conversations"]} == {conv, other}
    updated = await client.patch(f"/v1/conversations/{conv}", json={"cwd": "/tmp"})
    assert (updated.json()["cwd"], updated.json()["title"]) == ("/tmp", "first")
    assert (await client.delete(f"/v1/conversations/{other}")).json() == {}
    gone = await client.get(f"/v1/conversations/{other}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "NOT_FOUND"


async def test_history_cancel_metrics_models_and_computers(client: httpx.AsyncClient) -> None:
    conv = await create(client)
    sent = await send(client, conv)
    await sse_until_sealed(client, conv)
    history = (await client.get(f"/v1/conversations/{conv}/history")).json()
    assert [m["seq"] for m in history["messages"]] == ["1", "2"]
    assert history["messages"][0]["role"] == "ROLE_USER"
    tail = (await client.get(f"/v1/conversations/{conv}/history", params={"after_seq": 1})).json()
    assert [m["seq"] for m in tail["messages"]] == ["2"]
    cancelled = await client.post(f"/v1/conversations/{conv}/cancel")
    assert cancelled.status_code == 200 and cancelled.json() == {}  # no turn was running
    metrics = await client.get(f"/v1/conversations/{conv}/metrics", params={"turn_id": sent["turn_id"]})
    assert metrics.status_code == 200, metrics.text
    models = (await client.get("/v1/models")).json()
    assert [(m["provider"], m["model"]) for m in models["models"]] == [("scripted", "scripted")]
    computers = (await client.get("/v1/computers")).json()
    assert [c.get("local") for c in computers["computers"]] == [True]


async def test_send_policies_and_idempotency(client: httpx.AsyncClient) -> None:
    conv = await create(client)
    first = await send(client, conv, policy="enqueue", idempotency_key="k1")
    again = await send(client, conv, policy="SEND_POLICY_ENQUEUE", idempotency_key="k1")
    assert again["turn_id"] == first["turn_id"]
    bad = await client.post(f"/v1/conversations/{conv}/messages", json={"text": "x", "policy": "shove"})
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "code": "INVALID_ARGUMENT",
        "message": "policy must be one of enqueue, interrupt, reject",
    }


async def test_auth_failures_are_401_with_the_grpc_message(stack: Stack, bridge: HttpBridge) -> None:
    conv = await stack.conversation()
    for key in (None, "not-a-key"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.transport_as(key or "").GetConversation(
                transport_pb2.PublicGetConversationRequest(conversation_id=conv)
            )
        async with http(bridge, key) as client:
            for path in (f"/v1/conversations/{conv}", f"/v1/conversations/{conv}/events", "/v1/models"):
                response = await client.get(path)
                assert response.status_code == 401
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"] == {"code": "UNAUTHENTICATED", "message": err.value.details()}
                assert "not-a-key" not in response.text


async def test_another_tenants_conversation_is_not_found(stack: Stack, bridge: HttpBridge) -> None:
    conv = await stack.conversation()
    key = await stack.new_key("other")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.transport_as(key).GetConversation(
            transport_pb2.PublicGetConversationRequest(conversation_id=conv)
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    async with http(bridge, key) as client:
        for method, path in (
            ("GET", f"/v1/conversations/{conv}"),
            ("GET", f"/v1/conversations/{conv}/events"),
            ("GET", f"/v1/conversations/{conv}/history"),
            ("POST", f"/v1/conversations/{conv}/messages"),
            ("DELETE", f"/v1/conversations/{conv}"),
        ):
            response = await client.request(method, path, json={"text": "hi"} if method == "POST" else None)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"] == {"code": "NOT_FOUND", "message": err.value.details()}
    assert bridge.active_streams == 0


class Refusal(NamedTuple):
    method: str
    path: str
    body: bytes
    status: int
    phrase: str
    code: str = "INVALID_ARGUMENT"


REFUSALS = {
    "malformed JSON": Refusal("POST", "/v1/conversations", b"{not json", 400, "not valid JSON"),
    "not an object": Refusal("POST", "/v1/conversations", b"[1, 2]", 400, "must be a JSON object, not list"),
    "unknown field": Refusal("POST", "/v1/conversations", b'{"titel": "x"}', 400, "titel"),
    "wrong type": Refusal("POST", "/v1/conversations/c/messages", b'{"text": 5}', 400, "text"),
    "empty message": Refusal("POST", "/v1/conversations/{conv}/messages", b"{}", 400, "message is empty"),
    "id mismatch": Refusal(
        "POST", "/v1/conversations/c/messages", b'{"conversation_id": "d", "text": "x"}', 400, "path"
    ),
    "bad page_size": Refusal("GET", "/v1/conversations?page_size=lots", b"", 400, "page_size"),
    "negative after_seq": Refusal(
        "GET", "/v1/conversations/{conv}/history?after_seq=-1", b"", 400, "0 or more"
    ),
    "bad cursor": Refusal("GET", "/v1/conversations/{conv}/events?after_event_seq=-1", b"", 400, "event_seq"),
    "unknown route": Refusal("GET", "/v1/nowhere", b"", 404, "GET /v1/nowhere", "NOT_FOUND"),
    "wrong method": Refusal("PUT", "/v1/models", b"", 405, "allowed: GET", "METHOD_NOT_ALLOWED"),
    "too large": Refusal(
        "POST", "/v1/conversations", b"{}" + b" " * (5 << 20), 413, "limit", "RESOURCE_EXHAUSTED"
    ),
    "malformed approval id": Refusal(
        "POST",
        "/v1/approvals/a/resolve",
        b'{"decision": "approve"}',
        400,
        "expected apr_",
        "INVALID_ARGUMENT",
    ),
    "bad decision": Refusal(
        "POST", "/v1/approvals/a/resolve", b'{"decision": "maybe"}', 400, "decision must be"
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
async def test_refusals(stack: Stack, client: httpx.AsyncClient, case: Refusal) -> None:
    conv = await stack.conversation()
    response = await client.request(case.method, case.path.format(conv=conv), content=case.body)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert error["code"] == case.code
    assert case.phrase in error["message"]
    if case.status == 405:
        assert response.headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.FAILED_PRECONDITION, 409),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
    ],
)
def test_grpc_status_to_http(code: grpc.StatusCode, status: int) -> None:
    assert HTTP_STATUS.get(code, 500) == status


# ------------------------------------------------ against a scripted upstream

Context = grpc.aio.ServicerContext[Any, Any]


def event(seq: int) -> common_pb2.AgentEvent:
    return common_pb2.AgentEvent(
        conversation_id="c", event_seq=seq, text_delta=common_pb2.TextDelta(text=f"t{seq}")
    )


class FakeDispatch(transport_pb2_grpc.DispatchServicer):
    """Subscribe per conversation id: ``resync``, ``overflow`` or ``broken``."""

    def __init__(self) -> None:
        self.authorization: list[str] = []

    async def GetConversation(
        self, request: transport_pb2.PublicGetConversationRequest, context: Context
    ) -> common_pb2.Conversation:
        self.authorization += [str(v) for k, v in context.invocation_metadata() or () if k == "authorization"]
        return common_pb2.Conversation(id=request.conversation_id)

    async def Subscribe(
        self, request: transport_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[transport_pb2.SubscribeResponse]:
        yield transport_pb2.SubscribeResponse(events=[event(1), event(2), event(3)])
        if request.conversation_id == "resync":
            yield transport_pb2.SubscribeResponse(
                events=[event(4)], resync=transport_pb2.Resync(after_event_seq=4)
            )
        elif request.conversation_id == "overflow":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "fell behind")
        else:
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        await asyncio.sleep(60)

    async def Models(
        self, request: transport_pb2.ModelsRequest, context: Context
    ) -> transport_pb2.ModelsResponse:
        await asyncio.sleep(5)
        return transport_pb2.ModelsResponse()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeDispatch, HttpBridge]]:
    # The stub marks every method abstract; at runtime the others answer UNIMPLEMENTED.
    servicer = FakeDispatch()  # type: ignore[abstract]
    server = grpc.aio.server()
    transport_pb2_grpc.add_DispatchServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = await start_http("127.0.0.1:0", f"127.0.0.1:{port}", batch_events=2, rpc_timeout=0.2)
    yield servicer, bridge
    await bridge.stop()
    await server.stop(0)


async def read_all(client: httpx.AsyncClient, conv: str, accept: str) -> str:
    async with client.stream(
        "GET", f"/v1/conversations/{conv}/events", headers={"Accept": accept}
    ) as response:
        assert response.status_code == 200
        return "".join([chunk async for chunk in response.aiter_text()])


async def test_resync_ends_the_stream(fake: tuple[FakeDispatch, HttpBridge]) -> None:
    servicer, bridge = fake
    async with http(bridge, "secret") as client:
        text = await read_all(client, "resync", "text/event-stream")
        lines = await read_all(client, "resync", "application/x-ndjson")
    assert text.endswith('id: 4\nevent: resync\ndata: {"after_event_seq":4}\n\n')
    assert [line.split("\n")[0] for line in text.split("\n\n") if line] == [
        f"id: {i}" for i in (1, 2, 3, 4, 4)
    ]
    parsed = [json.loads(line) for line in lines.splitlines()]
    assert [e.get("event_seq") for e in parsed[:4]] == ["1", "2", "3", "4"]
    assert parsed[4:] == [{"resync": {"after_event_seq": "4"}}]
    assert servicer.authorization == ["Bearer secret", "Bearer secret"]
    await eventually(lambda: bridge.active_streams == 0)


async def test_a_subscriber_that_fell_behind_is_told_where_to_resume(
    fake: tuple[FakeDispatch, HttpBridge],
) -> None:
    _, bridge = fake
    async with http(bridge, "k") as client:
        text = await read_all(client, "overflow", "text/event-stream")
        lines = await read_all(client, "overflow", "application/x-ndjson")
    assert text.endswith('id: 3\nevent: resync\ndata: {"after_event_seq":3}\n\n')
    assert json.loads(lines.splitlines()[-1]) == {"resync": {"after_event_seq": "3"}}


async def test_a_broken_stream_ends_with_its_error(fake: tuple[FakeDispatch, HttpBridge]) -> None:
    _, bridge = fake
    async with http(bridge, "k") as client:
        text = await read_all(client, "broken", "text/event-stream")
        lines = await read_all(client, "broken", "application/x-ndjson")
    error = {"error": {"code": "INTERNAL", "message": "boom"}}
    assert text.endswith(f"event: stream_error\ndata: {json.dumps(error, separators=(',', ':'))}\n\n")
    assert json.loads(lines.splitlines()[-1]) == error


async def test_unary_calls_have_a_deadline(fake: tuple[FakeDispatch, HttpBridge]) -> None:
    _, bridge = fake
    async with http(bridge, "k") as client:
        response = await client.get("/v1/models")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "DEADLINE_EXCEEDED"


async def test_an_unreachable_transport_is_503() -> None:
    bridge = await start_http("127.0.0.1:0", "127.0.0.1:1")
    try:
        async with http(bridge, "k") as client:
            response = await client.get("/v1/models")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "UNAVAILABLE"
    finally:
        await bridge.stop()
