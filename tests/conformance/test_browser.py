"""The TypeScript client's browser entry point in a real headless Chromium (Debian's, driven
by playwright-core), against a real `dispatchd up` whose HTTP bridge allows the page's
origin (CORS). The page, served from another origin, creates a conversation, sends, and
follows the turn over EventSource with a stream token, through a TCP proxy whose
connections the driver (`clients/typescript/test/browser/driver.ts`) cuts mid-turn:

- with a long-lived token, the browser reconnects by itself sending Last-Event-ID;
- with a token that has expired by then, that reconnect is refused and the client mints a
  new token and reopens from the last event it saw.

Either way the events the page saw live equal the same turn read again whole: no gap and no
repeat. Then the page runs the conformance scenario's cases with the browser client."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.stack import ConformanceStack, load_scenario
from tests.conformance.test_typescript import PACKAGE, build
from tests.e2e.procs import free_port

CHROMIUM = Path("/usr/bin/chromium")
AGENT = "streamer"
DRIVER_DEADLINE = 240
# Slow enough that the cut lands mid-turn and the stream still runs when it comes back.
SCRIPT = {
    "steps": [
        [
            *[
                part
                for i in range(1, 41)
                for part in ({"type": "text_delta", "text": f"{i} "}, {"type": "sleep", "seconds": 0.1})
            ],
            {"type": "finish", "reason": "stop"},
        ]
    ]
}
EXPECTED_TEXT = "".join(f"{i} " for i in range(1, 41))
SCENARIOS = ["reconnect_with_last_event_id", "new_token_after_expiry"]
CASES = [c["name"] for c in load_scenario()["cases"]]


@pytest.fixture(scope="module")
def browser_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/ensure-system-deps.sh installs Debian's chromium")
    build()
    page_port, proxy_port = free_port(), free_port()
    # The scenario's stack, one agent more, and the page's origin allowed.
    stack = ConformanceStack(
        tmp_path_factory.mktemp("browser"),
        extra_agents={AGENT: {"script": SCRIPT}},
        extra_config=f'[transport]\ncors_origins = ["http://127.0.0.1:{page_port}"]\n',
    ).start()
    try:
        env = {
            **stack.env(),
            "DISPATCH_BROWSER_PAGE_PORT": str(page_port),
            "DISPATCH_BROWSER_PROXY_PORT": str(proxy_port),
            "DISPATCH_BROWSER_AGENT": AGENT,
            "CHROMIUM": str(CHROMIUM),
        }
        node = shutil.which("node")
        assert node is not None
        try:
            done = subprocess.run(
                [node, "dist/test/browser/driver.js"],
                cwd=PACKAGE,
                env=env,
                capture_output=True,
                text=True,
                timeout=DRIVER_DEADLINE,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the browser driver did not finish within {DRIVER_DEADLINE}s:\n{exc.stdout!r}")
        results: dict[str, dict[str, Any]] = {}
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                if "scenario" in result:
                    results[result["scenario"]] = result
                else:
                    results[f"conformance:{result['conformance']}"] = result
        if not results:
            pytest.fail(f"the browser driver reported nothing (exit {done.returncode}):\n{done.stderr}")
        results["__stderr__"] = {"stderr": done.stderr}
        yield results
    finally:
        stack.stop()


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["seq"]) for e in events]


@pytest.mark.timeout(DRIVER_DEADLINE + 120)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_browser_resumes_a_cut_stream_with_no_gap(
    browser_results: dict[str, dict[str, Any]], scenario: str
) -> None:
    got = browser_results.get(scenario)
    assert got is not None, f"the driver did not report {scenario}: {sorted(browser_results)}"
    assert got["ok"], f"{scenario}: {got.get('error')}\n" + "\n".join(got.get("console", []))
    result = got["result"]
    live, whole = result["live"], result["whole"]
    # The cut happened, mid-turn.
    assert got["cut_connections"] > 0
    assert live[-1]["kind"] == "turnSealed", live
    # No gap and no repeat: what the page saw through the cut is the turn read whole.
    assert [(e["seq"], e["kind"]) for e in live] == [(e["seq"], e["kind"]) for e in whole]
    first = result["afterEventSeq"] + 1
    assert seqs(live) == list(range(first, first + len(live)))
    assert "".join(e["text"] for e in live) == EXPECTED_TEXT
    assert result["state"] == "TURN_STATE_COMPLETED"

    requests = got["requests"]
    streams = [r for r in requests if r["path"].endswith("/events") and "event-stream" in (r["accept"] or "")]
    tokens = [r for r in requests if r["method"] == "POST" and r["path"].endswith("/stream-token")]
    # CORS: the page's origin is not the bridge's, so its JSON calls were preflighted.
    assert any(r["method"] == "OPTIONS" for r in requests), requests
    assert streams and streams[0]["lastEventId"] is None, requests
    # The browser's own reconnect after the cut, resuming from the last event it had.
    resumed = [r for r in streams if r["lastEventId"] is not None]
    assert resumed and int(resumed[0]["lastEventId"]) >= first, requests
    if scenario == "reconnect_with_last_event_id":
        assert len(tokens) == 1, requests
    else:
        # That reconnect's token had expired: refused. A new token, and the stream reopened by
        # the client from the last event it saw.
        assert len(tokens) >= 2, requests
        after = streams.index(resumed[0]) + 1
        reopened = [r for r in streams[after:] if r["lastEventId"] is None]
        assert reopened and reopened[0]["afterEventSeq"] == resumed[0]["lastEventId"], requests


@pytest.mark.timeout(DRIVER_DEADLINE + 120)
@pytest.mark.parametrize("case", CASES)
def test_conformance_case_in_the_browser(browser_results: dict[str, dict[str, Any]], case: str) -> None:
    """The conformance scenario, run in the page by the browser client, over the bridge."""
    result = browser_results.get(f"conformance:{case}") or browser_results.get("conformance:*")
    stderr = browser_results["__stderr__"]["stderr"]
    assert result is not None, f"the driver did not report {case}:\n{stderr}"
    assert result["ok"], f"{case}: {result.get('error')}\n{stderr}"
