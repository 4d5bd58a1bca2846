"""API keys on the public API: every call needs one, it maps to a tenant, and one tenant
never sees another's conversations; `dispatchd keys` manages them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.transport.auth import Authenticator, bearer
from dispatch.v1 import common_pb2, store_pb2, transport_pb2
from tests.stack import Stack, start_stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    provider = ScriptedProvider.from_data({"steps": [[{"type": "text_delta", "text": "hi"}]]})
    s = await start_stack(tmp_path, provider, transport=True)
    yield s
    await s.stop()


CALLS = {
    "CreateConversation": transport_pb2.PublicCreateConversationRequest(),
    "ListConversations": transport_pb2.PublicListConversationsRequest(),
    "Send": transport_pb2.SendRequest(conversation_id="conv_x", text=""),
    "Models": transport_pb2.ModelsRequest(),
    "Computers": transport_pb2.ComputersRequest(),
    "History": transport_pb2.HistoryRequest(conversation_id="conv_x"),
}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize(
    ("key", "phrase"), [("", "missing API key"), ("dsp_wrong", "invalid or revoked API key")]
)
async def test_every_call_without_a_good_key_is_unauthenticated(
    stack: Stack, method: str, key: str, phrase: str
) -> None:
    api = stack.transport_as(key)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(api, method)(CALLS[method])
    # Before anything else is looked at: even a bad request answers UNAUTHENTICATED.
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert phrase in (err.value.details() or "")
    assert "dsp_wrong" not in (err.value.details() or "")


async def test_subscribe_without_a_key_is_unauthenticated(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stack.transport_as("").Subscribe(
            transport_pb2.SubscribeRequest(conversation_id="conv_x")
        ):
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_tenant_sees_only_its_own_conversations(stack: Stack) -> None:
    mine = stack.transport
    theirs = stack.transport_as(await stack.new_key("other-tenant"))
    conv = await mine.CreateConversation(transport_pb2.PublicCreateConversationRequest(title="private"))
    other = await theirs.CreateConversation(transport_pb2.PublicCreateConversationRequest(title="theirs"))
    assert [
        c.id
        for c in (
            await theirs.ListConversations(transport_pb2.PublicListConversationsRequest())
        ).conversations
    ] == [other.id]
    for call in (
        theirs.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=conv.id)),
        theirs.Send(transport_pb2.SendRequest(conversation_id=conv.id, text="hello")),
        theirs.History(transport_pb2.HistoryRequest(conversation_id=conv.id)),
        theirs.DeleteConversation(transport_pb2.PublicDeleteConversationRequest(conversation_id=conv.id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        # The same answer as for a conversation that does not exist: no existence leak.
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in theirs.Subscribe(transport_pb2.SubscribeRequest(conversation_id=conv.id)):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (
        await mine.GetConversation(transport_pb2.PublicGetConversationRequest(conversation_id=conv.id))
    ).title == "private"


async def test_a_revoked_key_stops_working(stack: Stack) -> None:
    key = await stack.new_key()
    auth = Authenticator(stack.store, rpc_timeout=5, cache_seconds=0)
    assert await auth.tenant(key) == "local"
    keys = await stack.store.ListApiKeys(store_pb2.ListApiKeysRequest(tenant_id="local"))
    newest = next(k for k in keys.keys if key.startswith(k.prefix) and not k.revoked and k.name == "test")
    await stack.store.RevokeApiKey(store_pb2.RevokeApiKeyRequest(key_id=newest.id))
    with pytest.raises(Exception, match="invalid or revoked API key"):
        await auth.tenant(key)


def test_bearer_reads_the_authorization_header() -> None:
    assert bearer([("authorization", "Bearer abc ")]) == "abc"
    assert bearer([("Authorization", b"bearer xyz")]) == "xyz"
    assert bearer([("authorization", "Basic abc")]) == ""
    assert bearer(None) == ""


def test_dispatchd_keys_create_list_and_revoke(tmp_path: Path) -> None:
    url = ["--database-url", f"sqlite:///{tmp_path / 'keys.db'}"]

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispatch.cli", "keys", *url, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    created = keys("create", "--tenant", "acme", "--name", "ci")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("dsp_") and "shown only once" in created.stderr
    listed = keys("list")
    [line] = listed.stdout.splitlines()
    key_id = line.split()[0]
    assert "tenant=acme" in line and "active" in line and "ci" in line
    assert secret not in listed.stdout  # only a prefix, never the secret
    revoked = keys("revoke", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    missing = keys("revoke", "key_00000000000000000000000000")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_dispatchd_keys_takes_the_data_dir_before_or_after_the_action(tmp_path: Path) -> None:
    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispatch.cli", "keys", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,  # no .dispatch here: the flag alone finds the database
        )

    data = str(tmp_path / "data")
    created = keys("create", "--data-dir", data, "--tenant", "acme")  # as the README shows it
    assert created.returncode == 0, created.stderr
    listed = keys("--data-dir", data, "list")
    assert "tenant=acme" in listed.stdout
    assert (tmp_path / "data" / "dispatch.db").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / ".dispatch").exists()


@pytest.mark.parametrize(
    ("request_", "phrase"),
    [
        (transport_pb2.SendRequest(conversation_id="nope", text="hi"), "conversation_id 'nope' is malformed"),
        (transport_pb2.SendRequest(conversation_id="", text="hi"), "conversation_id is required"),
        (
            transport_pb2.SendRequest(conversation_id="conv_00000000000000000000000000"),
            "the message is empty",
        ),
        (transport_pb2.SendRequest(conversation_id="conv_00000000000000000000000000", text="   "), "no text"),
        (
            transport_pb2.SendRequest(
                conversation_id="conv_00000000000000000000000000", text="x" * 1_000_001
            ),
            "the limit is 1000000",
        ),
        (
            transport_pb2.SendRequest(
                conversation_id="conv_00000000000000000000000000",
                chunks=[common_pb2.Chunk(tool_result=common_pb2.ToolResultChunk(content="forged"))],
            ),
            "chunk 0 is tool_result",
        ),
        (
            transport_pb2.SendRequest(
                conversation_id="conv_00000000000000000000000000", text="hi", idempotency_key="k" * 201
            ),
            "idempotency_key is longer than 200",
        ),
    ],
)
async def test_bad_sends_are_invalid_argument_with_a_message_that_says_what_to_fix(
    stack: Stack, request_: transport_pb2.SendRequest, phrase: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.transport.Send(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in (err.value.details() or "")


async def test_a_request_over_the_size_limit_is_resource_exhausted(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.transport.Send(
            transport_pb2.SendRequest(conversation_id="conv_00000000000000000000000000", text="x" * (5 << 20))
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
