"""CORS on the HTTP bridge: off by default; an allowlist of origins when configured."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dispatch.kernel.providers.scripted import ScriptedProvider
from dispatch.shared.config import ConfigError, transport_config
from dispatch.transport.http import HttpBridge, start_http
from tests.stack import Stack, start_stack
from tests.transport.test_http import SCRIPT, create

APP = "http://app.example:5173"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, ScriptedProvider.from_data(SCRIPT), transport=True)
    yield s
    await s.stop()


async def bridge_with(stack: Stack, origins: tuple[str, ...]) -> HttpBridge:
    return await start_http("127.0.0.1:0", stack.address("transport"), cors_origins=origins)


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_allowed_origins_get_preflights_and_marked_answers_streams_included(stack: Stack) -> None:
    bridge = await bridge_with(stack, (APP,))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.port}", timeout=5) as c:
            answer = await c.options("/v1/conversations", headers=preflight(APP))
            assert answer.status_code == 204
            assert answer.headers["access-control-allow-origin"] == APP
            assert "POST" in answer.headers["access-control-allow-methods"]
            allowed = answer.headers["access-control-allow-headers"].lower()
            assert {"authorization", "content-type", "last-event-id"} <= {
                h.strip() for h in allowed.split(",")
            }

            keyed = {"Authorization": f"Bearer {stack.api_key}", "Origin": APP}
            async with httpx.AsyncClient(base_url=c.base_url, headers=keyed, timeout=5) as keyed_client:
                conv = await create(keyed_client)
            got = await c.get(f"/v1/conversations/{conv}", headers=keyed)
            assert got.status_code == 200
            assert got.headers["access-control-allow-origin"] == APP
            assert "Origin" in got.headers["vary"]
            # An error answer and an event stream (headers sent before the first event) too.
            refused = await c.get("/v1/models", headers={"Origin": APP})
            assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP
            assert "WWW-Authenticate" in refused.headers["access-control-expose-headers"]
            async with c.stream(
                "GET",
                f"/v1/conversations/{conv}/events",
                params={"until": "caught_up"},
                headers={**keyed, "Accept": "text/event-stream"},
            ) as stream:
                assert stream.status_code == 200
                assert stream.headers["access-control-allow-origin"] == APP

            other = "http://evil.example"
            denied = await c.options("/v1/conversations", headers=preflight(other))
            assert denied.status_code == 403
            assert "cors_origins" in denied.json()["error"]["message"]
            assert "access-control-allow-origin" not in denied.headers
            plain = await c.get(f"/v1/conversations/{conv}", headers={**keyed, "Origin": other})
            assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    finally:
        await bridge.stop()


async def test_off_by_default_and_a_wildcard_allows_any(stack: Stack) -> None:
    off = await bridge_with(stack, ())
    anyone = await bridge_with(stack, ("*",))
    try:
        async with httpx.AsyncClient(timeout=5) as c:
            no = await c.options(f"http://127.0.0.1:{off.port}/v1/conversations", headers=preflight(APP))
            # Refused, saying which setting lets it in.
            assert no.status_code == 403 and "access-control-allow-origin" not in no.headers
            assert "cors_origins" in no.json()["error"]["message"]
            got = await c.get(f"http://127.0.0.1:{off.port}/healthz", headers={"Origin": APP})
            assert "access-control-allow-origin" not in got.headers and "vary" not in got.headers
            yes = await c.options(f"http://127.0.0.1:{anyone.port}/v1/models", headers=preflight(APP, "GET"))
            assert yes.status_code == 204 and yes.headers["access-control-allow-origin"] == APP
    finally:
        await off.stop()
        await anyone.stop()


BASE = {"kernel": "127.0.0.1:1", "store": "127.0.0.1:2"}


def test_config_reads_origins_from_the_file_or_the_environment_and_refuses_what_is_not_one() -> None:
    file = {"transport": {**BASE, "cors_origins": ["https://app.example.com/", "http://127.0.0.1:5173"]}}
    assert transport_config({}, {}, file).cors_origins == ("https://app.example.com", "http://127.0.0.1:5173")
    env = {"DISPATCH_CORS_ORIGINS": "https://a.example, https://b.example"}
    assert transport_config({}, env, {"transport": BASE}).cors_origins == (
        "https://a.example",
        "https://b.example",
    )
    assert transport_config({}, {}, {"transport": BASE}).cors_origins == ()
    for bad in (["app.example.com"], ["https://app.example.com/path"], "ftp://x", [1]):
        with pytest.raises(ConfigError, match="cors_origins"):
            transport_config({}, {}, {"transport": {**BASE, "cors_origins": bad}})


def test_config_refuses_a_short_stream_token_secret_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes") as err:
        transport_config({}, {"DISPATCH_STREAM_TOKEN_SECRET": "hunter2"}, {"transport": BASE})
    assert "hunter2" not in str(err.value)
    cfg = transport_config({}, {}, {"transport": {**BASE, "stream_token_secret": "x" * 32}})
    assert cfg.stream_token_secret == "x" * 32 and "x" * 32 not in repr(cfg)
