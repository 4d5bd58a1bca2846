"""The HTTP bridge's turn routes, over real HTTP in front of the in-process stack:
``GET /v1/conversations/{id}/turns`` (``?state=``, paging) and ``.../turns/{turn_id}``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.transport.http import HttpBridge, start_http, to_dict
from dispatch.v1 import transport_pb2
from tests.stack import Stack, start_stack
from tests.transport.test_http import http
from tests.transport.test_turns_api import MISSING_TURN, SCRIPT, three_turns


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


@pytest.fixture
async def client(bridge: HttpBridge, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with http(bridge, stack.api_key) as c:
        yield c


@pytest.fixture
async def turns(stack: Stack) -> tuple[str, list[str]]:
    """A conversation with two completed turns and a third that is running."""
    return await three_turns(stack)


async def ok(client: httpx.AsyncClient, path: str, **params: Any) -> dict[str, Any]:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


def ids(body: dict[str, Any]) -> list[str]:
    return [t["id"] for t in body.get("turns", [])]


async def test_list_and_get_answer_the_grpc_turns_in_the_proto_json_mapping(
    stack: Stack, client: httpx.AsyncClient, turns: tuple[str, list[str]]
) -> None:
    conv, [first, second, third] = turns
    listed = await ok(client, f"/v1/conversations/{conv}/turns")
    grpc_listed = await stack.transport.ListTurns(transport_pb2.PublicListTurnsRequest(conversation_id=conv))
    # The running turn's lease may be renewed between the two reads; everything else is equal.
    assert [{**t, "lease_expires_at": None} for t in listed["turns"]] == [
        {**to_dict(t), "lease_expires_at": None} for t in grpc_listed.turns
    ]
    assert ids(listed) == [first, second, third] and "next_page_token" not in listed

    done = await ok(client, f"/v1/conversations/{conv}/turns/{first}")
    grpc_done = await stack.transport.GetTurn(
        transport_pb2.PublicGetTurnRequest(conversation_id=conv, turn_id=first)
    )
    assert done == to_dict(grpc_done)
    # Enums by name, timestamps RFC 3339, defaults left out.
    assert (done["id"], done["conversation_id"]) == (first, conv)
    assert (done["state"], done["finish_reason"]) == ("TURN_STATE_COMPLETED", "FINISH_REASON_STOP")
    assert all(done[k].endswith("Z") for k in ("created_at", "started_at", "ended_at"))
    assert "error_message" not in done

    running = await ok(client, f"/v1/conversations/{conv}/turns/{third}")
    assert running["state"] == "TURN_STATE_RUNNING"
    assert "finish_reason" not in running and "ended_at" not in running


@pytest.mark.parametrize(
    ("query", "which"),
    [
        ("state=running", [2]),
        ("state=RUNNING", [2]),
        ("state=TURN_STATE_RUNNING", [2]),
        ("state=completed", [0, 1]),
        ("state=completed&state=running", [0, 1, 2]),
        ("state=running&state=TURN_STATE_COMPLETED", [0, 1, 2]),
        ("state=queued&state=failed", []),
        ("", [0, 1, 2]),
    ],
)
async def test_the_state_filter(
    client: httpx.AsyncClient, turns: tuple[str, list[str]], query: str, which: list[int]
) -> None:
    conv, turn_ids = turns
    response = await client.get(f"/v1/conversations/{conv}/turns?{query}")
    assert response.status_code == 200, response.text
    assert ids(response.json()) == [turn_ids[i] for i in which]


async def test_paging(client: httpx.AsyncClient, turns: tuple[str, list[str]]) -> None:
    conv, turn_ids = turns
    page = await ok(client, f"/v1/conversations/{conv}/turns", page_size=2)
    assert ids(page) == turn_ids[:2] and page["next_page_token"]
    rest = await ok(
        client, f"/v1/conversations/{conv}/turns", page_size=2, page_token=page["next_page_token"]
    )
    assert ids(rest) == turn_ids[2:] and "next_page_token" not in rest
    # With a filter, the pages keep it.
    response = await client.get(
        f"/v1/conversations/{conv}/turns?state=completed&page_size=1&page_token={page['next_page_token']}"
    )
    assert ids(response.json()) == []


class Refusal(NamedTuple):
    path: str
    status: int
    code: str
    phrase: str


@pytest.mark.parametrize(
    "case",
    [
        Refusal(
            "/turns?state=bogus",
            400,
            "INVALID_ARGUMENT",
            "state must be one of queued, running, waiting_for_approval, resuming, completed, failed, "
            "aborted, interrupted, got 'bogus'",
        ),
        Refusal("/turns?state=unspecified", 400, "INVALID_ARGUMENT", "state must be one of"),
        Refusal("/turns?state=", 400, "INVALID_ARGUMENT", "state must be one of"),
        Refusal("/turns?status=running", 400, "INVALID_ARGUMENT", "unknown query parameter status"),
        Refusal("/turns?page_size=lots", 400, "INVALID_ARGUMENT", "page_size"),
        Refusal("/turns?page_size=-1", 400, "INVALID_ARGUMENT", "page_size must be 0 or more"),
        Refusal("/turns?page_token=nope", 400, "INVALID_ARGUMENT", "page_token"),
        Refusal("/turns/{turn}?state=running", 400, "INVALID_ARGUMENT", "unknown query parameter state"),
        Refusal("/turns/turn_1", 400, "INVALID_ARGUMENT", "turn_id 'turn_1' is malformed"),
        Refusal("/turns/" + MISSING_TURN, 404, "NOT_FOUND", f"turn {MISSING_TURN} not found"),
    ],
)
async def test_refusals(client: httpx.AsyncClient, turns: tuple[str, list[str]], case: Refusal) -> None:
    conv, [turn, *_] = turns
    response = await client.get(f"/v1/conversations/{conv}" + case.path.format(turn=turn))
    assert response.status_code == case.status, response.text
    assert response.json()["error"]["code"] == case.code
    assert case.phrase in response.json()["error"]["message"]


async def test_bad_ids_another_tenant_and_no_key(
    stack: Stack, bridge: HttpBridge, client: httpx.AsyncClient, turns: tuple[str, list[str]]
) -> None:
    conv, [turn, *_] = turns
    bad = await client.get("/v1/conversations/conv_x/turns")
    assert bad.status_code == 400
    assert "conversation_id 'conv_x' is malformed" in bad.json()["error"]["message"]
    other = await client.post("/v1/conversations", json={})
    elsewhere = await client.get(f"/v1/conversations/{other.json()['id']}/turns/{turn}")
    assert elsewhere.status_code == 404
    assert elsewhere.json()["error"] == {
        "code": "NOT_FOUND",
        "message": f"turn {turn} not found in conversation {other.json()['id']}",
    }

    async with http(bridge, await stack.new_key("other-tenant")) as theirs:
        for path in (f"/v1/conversations/{conv}/turns", f"/v1/conversations/{conv}/turns/{turn}"):
            response = await theirs.get(path)
            assert response.status_code == 404, path
            error = response.json()["error"]
            assert error["code"] == "NOT_FOUND" and error["message"].endswith("not found"), error
    async with http(bridge, None) as anonymous:
        response = await anonymous.get(f"/v1/conversations/{conv}/turns")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    # Only GET.
    response = await client.post(f"/v1/conversations/{conv}/turns")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
