/**
 * The conformance scenario (tests/conformance/README.md), run by the TypeScript client.
 *
 * Reads the scenario from DISPATCH_CONFORMANCE_SCENARIO and the stack from DISPATCH_ADDRESS,
 * DISPATCH_API_KEY and DISPATCH_CONFORMANCE_OTHER_KEY; runs every case (or those named on
 * the command line) in order and prints one JSON line per case:
 * `{"case": NAME, "ok": true}` or `{"case": NAME, "ok": false, "error": "step 3 (send): ..."}`.
 * Exits 1 if any case failed. Never prints a key.
 */
import { readFileSync } from "node:fs";

import { DispatchClient } from "../src/index.js";
import { runCases, type Case } from "./scenario.js";

async function main(): Promise<number> {
  const env = (name: string) => {
    const value = process.env[name];
    if (!value) throw new Error(`${name} is not set (see tests/conformance/README.md)`);
    return value;
  };
  const scenario = JSON.parse(readFileSync(env("DISPATCH_CONFORMANCE_SCENARIO"), "utf8")) as { cases: Case[] };
  const address = env("DISPATCH_ADDRESS");
  const keys: Record<string, string> = {
    local: env("DISPATCH_API_KEY"),
    other: env("DISPATCH_CONFORMANCE_OTHER_KEY"),
    nobody: "not-a-key",
  };
  const only = new Set(process.argv.slice(2));
  const cases = scenario.cases.filter((c) => only.size === 0 || only.has(c.name));
  const failed = await runCases(
    cases,
    () => Object.fromEntries(Object.entries(keys).map(([who, apiKey]) => [who, new DispatchClient({ address, apiKey })])),
    (result) => console.log(JSON.stringify(result)),
  );
  return failed ? 1 : 0;
}

process.exitCode = await main();
