"""Stream tokens: minted with an API key, they open one conversation's events and nothing else,
over gRPC and over the HTTP bridge (``?stream_token=``, as a browser's EventSource sends it)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.errors import InvalidArgument, PermissionDenied, Unauthenticated
from dispatch.transport.auth import Caller
from dispatch.transport.http import HttpBridge, start_http
from dispatch.transport.tokens import DEFAULT_TTL, MAX_TTL, StreamTokens
from dispatch.v1 import common_pb2, transport_pb2
from tests.stack import Stack, start_stack
from tests.transport.test_http import SCRIPT, create, send, sse

SECRET = "a-test-secret-of-32-bytes-length"
CALLER = Caller("acme", "key_1")


def test_a_token_opens_its_conversation_for_its_ttl_and_says_when_it_expired() -> None:
    now = [1_000_000.0]
    tokens = StreamTokens(SECRET.encode(), clock=lambda: now[0])
    token, expires = tokens.mint(CALLER, "c_1", 60)
    assert expires.timestamp() == 1_000_060
    assert tokens.check(token, "c_1") == CALLER
    now[0] += 59
    assert tokens.check(token, "c_1") == CALLER
    now[0] += 1
    with pytest.raises(Unauthenticated, match="expired at 1970-01-12T13:47:40"):
        tokens.check(token, "c_1")


def test_a_token_opens_no_other_conversation_and_no_altered_token_opens_anything() -> None:
    tokens = StreamTokens(SECRET.encode())
    token, _ = tokens.mint(CALLER, "c_1", 0)
    with pytest.raises(PermissionDenied, match="another conversation"):
        tokens.check(token, "c_2")
    prefix, payload, mac = token.split(".")
    forged = StreamTokens(b"another secret, just as long").mint(Caller("acme", "key_1"), "c_1", 0)[0]
    for bad in (
        forged,
        f"{prefix}.{payload}.{mac[:-2]}AA",
        f"{prefix}.{payload[:-4]}.{mac}",
        f"{prefix}.{payload}",
        "dst1.",
        "dst1.x.y",
    ):
        with pytest.raises(Unauthenticated) as err:
            tokens.check(bad, "c_1")
        assert bad not in str(err.value)


def test_ttl_bounds() -> None:
    tokens = StreamTokens(SECRET.encode(), clock=lambda: 0.0)
    assert tokens.mint(CALLER, "c_1", 0)[1].timestamp() == DEFAULT_TTL
    assert tokens.mint(CALLER, "c_1", MAX_TTL)[1].timestamp() == MAX_TTL
    for ttl in (-1, MAX_TTL + 1):
        with pytest.raises(InvalidArgument, match="ttl_seconds must be from 1 to 3600"):
            tokens.mint(CALLER, "c_1", ttl)
    # A token lasts at least its TTL: a fraction of a second rounds up, never down.
    late = StreamTokens(SECRET.encode(), clock=lambda: 10.9)
    assert late.mint(CALLER, "c_1", 1)[1].timestamp() == 12
    with pytest.raises(ValueError, match="at least 16 bytes"):
        StreamTokens(b"short")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(
        tmp_path,
        ScriptedProvider.from_data(SCRIPT),
        transport=True,
        transport_options={"stream_token_secret": SECRET},
    )
    yield s
    await s.stop()


@pytest.fixture
async def bridge(stack: Stack) -> AsyncIterator[HttpBridge]:
    b = await start_http("127.0.0.1:0", stack.address("transport"))
    yield b
    await b.stop()


async def mint(stack: Stack, conv: str, key: str = "", ttl: int = 0) -> transport_pb2.StreamToken:
    return await stack.transport_as(key or stack.api_key).CreateStreamToken(
        transport_pb2.CreateStreamTokenRequest(conversation_id=conv, ttl_seconds=ttl)
    )


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code(), err.value.details() or ""


async def test_grpc_a_token_subscribes_to_its_conversation_only(stack: Stack) -> None:
    conv, other = await stack.conversation(), await stack.conversation()
    await stack.transport.Send(transport_pb2.SendRequest(conversation_id=conv, text="hi"))
    made = await mint(stack, conv)
    assert made.conversation_id == conv
    assert made.expires_at.ToSeconds() > time.time() + DEFAULT_TTL - 60
    by_token = stack.transport_as(made.token)

    seen = []
    async for response in by_token.Subscribe(
        transport_pb2.SubscribeRequest(conversation_id=conv, until=common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED)
    ):
        seen += [e.WhichOneof("kind") for e in response.events]
    assert seen[0] == "turn_started" and seen[-1] == "turn_sealed"
    assert (
        await by_token.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=conv))
    ).id == conv

    code, details = await code_of(
        by_token.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=other))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "another conversation" in details
    stream = by_token.Subscribe(transport_pb2.SubscribeRequest(conversation_id=other))
    code, _ = await code_of(stream.read())
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Nothing but reading its conversation: not sending, listing, or minting more tokens.
    for call in (
        by_token.Send(transport_pb2.SendRequest(conversation_id=conv, text="x")),
        by_token.ListConversations(transport_pb2.PublicListConversationsRequest()),
        by_token.CreateStreamToken(transport_pb2.CreateStreamTokenRequest(conversation_id=conv)),
        by_token.History(transport_pb2.HistoryRequest(conversation_id=conv)),
    ):
        code, details = await code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "needs an API key" in details


async def test_grpc_minting_is_scoped_like_every_call(stack: Stack) -> None:
    conv = await stack.conversation()
    other_tenant = await stack.new_key("other")
    code, _ = await code_of(mint(stack, conv, key=other_tenant))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await code_of(mint(stack, conv, key="not-a-key"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, details = await code_of(mint(stack, conv, ttl=MAX_TTL + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ttl_seconds" in details
    code, _ = await code_of(mint(stack, "not-an-id"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_an_expired_or_foreign_token_is_unauthenticated(stack: Stack) -> None:
    conv = await stack.conversation()
    # The transport's secret, an hour ago: the token expired 55 minutes ago.
    stale, _ = StreamTokens(SECRET.encode(), clock=lambda: time.time() - 3600).mint(CALLER, conv, 300)
    foreign, _ = StreamTokens(b"not the transport's secret!").mint(CALLER, conv, 300)
    for token, words in ((stale, "expired at"), (foreign, "invalid stream token")):
        code, details = await code_of(
            stack.transport_as(token).GetConversation(
                transport_pb2.PublicGetConversationRequest(conversation_id=conv)
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED and words in details
        assert token not in details


async def test_http_mint_then_stream_with_the_token_and_resume_with_last_event_id(
    stack: Stack, bridge: HttpBridge
) -> None:
    base = f"http://127.0.0.1:{bridge.port}"
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=5
    ) as c:
        conv = await create(c)
        minted = await c.post(f"/v1/conversations/{conv}/stream-token", json={"ttl_seconds": 120})
        assert minted.status_code == 200, minted.text
        body = minted.json()
        assert body["conversation_id"] == conv and body["expires_at"].endswith("Z")
        await send(c, conv)
    token = body["token"]
    sse_headers = {"Accept": "text/event-stream"}
    # No Authorization header at all: what an EventSource sends.
    async with httpx.AsyncClient(base_url=base, timeout=5) as browser:
        first: list[dict[str, str]] = []
        async with browser.stream(
            "GET", f"/v1/conversations/{conv}/events", params={"stream_token": token}, headers=sse_headers
        ) as response:
            assert response.status_code == 200
            async for frame in sse(response):
                first.append(frame)
                if frame.get("event") == "text_delta":
                    break
        # The connection is lost; EventSource comes back with Last-Event-ID and the same URL.
        rest: list[dict[str, str]] = []
        async with browser.stream(
            "GET",
            f"/v1/conversations/{conv}/events",
            params={"stream_token": token},
            headers={**sse_headers, "Last-Event-ID": first[-1]["id"]},
        ) as response:
            assert response.status_code == 200
            async for frame in sse(response):
                rest.append(frame)
                if frame.get("event") == "turn_sealed":
                    break
        ids = [int(f["id"]) for f in first + rest if "id" in f]
        assert ids == list(range(1, len(ids) + 1))
        assert rest[-1]["event"] == "turn_sealed"

        # The token does nothing else, and may not ride with a key.
        refused = await browser.get(f"/v1/conversations/{conv}/history", params={"stream_token": token})
        assert refused.status_code == 400 and "stream_token" in refused.text
        both = await browser.get(
            f"/v1/conversations/{conv}/events",
            params={"stream_token": token},
            headers={"Authorization": f"Bearer {stack.api_key}"},
        )
        assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
        other = await stack.conversation()
        wrong = await browser.get(f"/v1/conversations/{other}/events", params={"stream_token": token})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "PERMISSION_DENIED"
        stale, _ = StreamTokens(SECRET.encode(), clock=lambda: time.time() - 3600).mint(CALLER, conv, 300)
        expired = await browser.get(f"/v1/conversations/{conv}/events", params={"stream_token": stale})
        assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]


async def test_the_access_log_never_holds_a_token(
    stack: Stack, bridge: HttpBridge, caplog: pytest.LogCaptureFixture
) -> None:
    conv = await stack.conversation()
    token = (await mint(stack, conv)).token
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.port}", timeout=5) as browser:
        response = await browser.get(
            f"/v1/conversations/{conv}/events", params={"stream_token": token, "until": "caught_up"}
        )
        assert response.status_code == 200
        await browser.get(f"/v1/conversations/{conv}/events", params={"stream_token": token + "x"})
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(f"/v1/conversations/{conv}/events 200" in line for line in access), access
    # The server's loggers (httpx, the test's own client, logs the URL it asked for).
    server = [r for r in caplog.records if r.name.split(".")[0] in ("aiohttp", "dispatch", "grpc")]
    assert access and not any(token in r.getMessage() for r in server)
