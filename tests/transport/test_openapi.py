"""The HTTP bridge's OpenAPI document: a valid OpenAPI 3.1 document, one operation per public
RPC, and what the bridge really answers fits it (checked with no extra fields allowed)."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.transport.http import HttpBridge, start_http
from dispatch.transport.openapi import SERVICE, document
from dispatch.transport.routes import ROUTES
from tests.stack import Stack, start_stack
from tests.transport.test_http import SCRIPT, create, send


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(document())


def test_every_public_rpc_has_its_route_and_every_path_field_is_the_requests() -> None:
    rpcs = {route.rpc for route in ROUTES if route.rpc}
    assert rpcs == {method.name for method in SERVICE.methods}
    for route in ROUTES:
        if not route.rpc:
            continue
        request = SERVICE.methods_by_name[route.rpc].input_type
        for name, field in route.params.items():
            assert f"{{{name}}}" in route.path
            assert field in request.fields_by_name, (route.path, field)
        op = document()["paths"][route.path][route.method.lower()]
        assert op["operationId"] == route.rpc
        assert [p["name"] for p in op.get("parameters", []) if p["in"] == "query"] == list(route.query)


def strict(schema: Any) -> Any:
    """``schema`` where an object with listed properties allows no others: a field the bridge
    sends and the document does not name fails."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def check(value: Any, schema: dict[str, Any]) -> None:
    doc = document()
    full = {**strict(copy.deepcopy(schema)), "components": strict(copy.deepcopy(doc["components"]))}
    errors = sorted(Draft202012Validator(full).iter_errors(value), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def answer_schema(path: str, method: str, status: str = "200") -> dict[str, Any]:
    content = document()["paths"][path][method]["responses"][status]["content"]
    schema: dict[str, Any] = (content.get("application/json") or content["application/x-ndjson"])["schema"]
    return schema


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


async def test_what_the_bridge_answers_fits_the_document(stack: Stack, bridge: HttpBridge) -> None:
    base = f"http://127.0.0.1:{bridge.port}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as anonymous:
        served = await anonymous.get("/openapi.json")
        assert served.status_code == 200 and served.json() == json.loads(json.dumps(document()))
        missing = await anonymous.get("/v1/models")
        check(missing.json(), answer_schema("/v1/models", "get", "default"))

    conv_path = "/v1/conversations/{id}"
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=5
    ) as c:
        conv = await create(c, title="fits")
        check((await c.get(f"/v1/conversations/{conv}")).json(), answer_schema(conv_path, "get"))
        sent = await send(c, conv)
        check(sent, answer_schema(conv_path + "/messages", "post"))
        events = []
        async with c.stream(
            "GET", f"/v1/conversations/{conv}/events", params={"until": "turn_sealed"}
        ) as stream:
            async for line in stream.aiter_lines():
                events.append(json.loads(line))
        assert events and "turn_sealed" in events[-1]
        for event in events:
            check(event, answer_schema(conv_path + "/events", "get"))
        turn = sent["turn_id"]
        for path, schema_path in (
            ("/v1/models", "/v1/models"),
            ("/v1/computers", "/v1/computers"),
            ("/v1/workspaces", "/v1/workspaces"),
            ("/v1/conversations", "/v1/conversations"),
            (f"/v1/conversations/{conv}/history", conv_path + "/history"),
            (f"/v1/conversations/{conv}/metrics", conv_path + "/metrics"),
            (f"/v1/conversations/{conv}/turns", conv_path + "/turns"),
            (f"/v1/conversations/{conv}/turns/{turn}", conv_path + "/turns/{turn_id}"),
            (f"/v1/conversations/{conv}/approvals", conv_path + "/approvals"),
        ):
            got = await c.get(path)
            assert got.status_code == 200, (path, got.text)
            check(got.json(), answer_schema(schema_path, "get"))
        token = await c.post(f"/v1/conversations/{conv}/stream-token", json={})
        check(token.json(), answer_schema(conv_path + "/stream-token", "post"))
        gone = await c.get("/v1/conversations/conv_00000000000000000000000000")
        assert gone.status_code == 404
        check(gone.json(), answer_schema(conv_path, "get", "default"))
