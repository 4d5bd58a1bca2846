// The conformance scenario in a web page: the browser client over the HTTP bridge, every
// case of scenario.json (bundled by scripts/bundle.mjs as dist/test/browser/scenario.js; the
// driver imports it into the page and calls runConformance).
import { BrowserDispatchClient } from "../../src/browser/index.js";
import { runCases, type Case, type CaseResult } from "../scenario.js";

export async function runConformance(config: {
  baseUrl: string;
  keys: Record<string, string>;
  cases: Case[];
}): Promise<CaseResult[]> {
  const results: CaseResult[] = [];
  await runCases(
    config.cases,
    () =>
      Object.fromEntries(
        Object.entries(config.keys).map(([who, apiKey]) => [who, new BrowserDispatchClient({ baseUrl: config.baseUrl, apiKey })]),
      ),
    (result) => results.push(result),
  );
  return results;
}
