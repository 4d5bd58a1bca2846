/**
 * The browser test's driver (tests/conformance/test_browser.py runs it): a page on its own
 * origin streams a turn with the browser entry point, in headless Chromium, through a TCP
 * proxy in front of the HTTP bridge whose connections this driver cuts mid-turn.
 *
 * Environment: DISPATCH_HTTP_ADDRESS (the bridge), DISPATCH_API_KEY, DISPATCH_BROWSER_PAGE_PORT
 * (the page's origin, which the stack's cors_origins allows), DISPATCH_BROWSER_PROXY_PORT,
 * DISPATCH_BROWSER_AGENT (a slowly streaming scripted agent), CHROMIUM (default
 * /usr/bin/chromium). Prints one JSON line per scenario: the events the page saw live, the
 * same turn read again whole, and what the proxy saw of each request (its path, Accept and
 * Last-Event-ID headers; never a query string, where the token is). With
 * DISPATCH_CONFORMANCE_SCENARIO (and DISPATCH_CONFORMANCE_OTHER_KEY) it then runs the
 * conformance scenario's cases in the page, with the browser client straight to the bridge,
 * one JSON line per case (`{"conformance": NAME, "ok": ...}`). Exits 1 if anything failed;
 * the scenarios' assertions are the Python test's.
 */
import { readFileSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer, connect, type Socket } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium, type Browser } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
const PACKAGE = join(HERE, "..", "..", "..");
const env = (name: string, fallback?: string): string => {
  const value = process.env[name] ?? fallback;
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

const [bridgeHost, bridgePort] = env("DISPATCH_HTTP_ADDRESS").split(":");
const pagePort = Number(env("DISPATCH_BROWSER_PAGE_PORT"));
const proxyPort = Number(env("DISPATCH_BROWSER_PROXY_PORT"));
const DEADLINE_MS = 60_000;

/** What the proxy notes of a request: never its query string, where a stream token is. */
interface Seen {
  method: string;
  path: string;
  /** The Accept header: text/event-stream for an EventSource. */
  accept: string | null;
  lastEventId: string | null;
  afterEventSeq: string | null;
}
const HEAD = /(?:^|\r\n)(GET|POST|PATCH|DELETE|OPTIONS) (\S+) HTTP\/1\.1\r\n([\s\S]*?)\r\n\r\n/g;

/** A TCP proxy to the bridge that remembers each request's head and can cut every connection. */
class Proxy {
  readonly requests: Seen[] = [];
  private readonly sockets = new Set<Socket>();
  private readonly server = createServer((client) => {
    const upstream = connect(Number(bridgePort), bridgeHost);
    this.sockets.add(client).add(upstream);
    // Request heads, on every connection and every request a kept-alive one carries.
    client.on("data", (chunk: Buffer) => {
      for (const head of chunk.toString("latin1").matchAll(HEAD)) this.note(head[1], head[2], head[3]);
    });
    client.pipe(upstream).pipe(client);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      this.sockets.delete(client);
      this.sockets.delete(upstream);
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
  });

  private note(method: string, target: string, headers: string): void {
    const url = new URL(target, "http://proxy");
    const header = (name: string) => {
      const line = headers.split("\r\n").find((h) => h.toLowerCase().startsWith(`${name}:`));
      return line ? line.slice(line.indexOf(":") + 1).trim() : null;
    };
    this.requests.push({
      method,
      path: url.pathname,
      accept: header("accept"),
      lastEventId: header("last-event-id"),
      afterEventSeq: url.searchParams.get("after_event_seq"),
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(proxyPort, "127.0.0.1", resolve));
  }

  /** Every open connection ends at once, as when a network drops. */
  cut(): number {
    const n = this.sockets.size;
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
    return n;
  }

  close(): void {
    this.cut();
    this.server.close();
  }
}

function servePage(): Promise<ReturnType<typeof createHttpServer>> {
  const files: Record<string, [string, string]> = {
    "/": ["text/html", join(PACKAGE, "test", "browser", "page.html")],
    "/dispatch-client.js": ["text/javascript", join(PACKAGE, "dist", "browser", "dispatch-client.js")],
    "/scenario.js": ["text/javascript", join(PACKAGE, "dist", "test", "browser", "scenario.js")],
  };
  const server = createHttpServer((req, res) => {
    const file = files[new URL(req.url ?? "/", "http://page").pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "Content-Type": file[0], "Cache-Control": "no-store" }).end(readFileSync(file[1]));
  });
  return new Promise((resolve) => server.listen(pagePort, "127.0.0.1", () => resolve(server)));
}

interface Scenario {
  name: string;
  /** The stream token's lifetime: long (the browser's own reconnect carries on with
   * Last-Event-ID), or 1 s (that reconnect is refused; the client mints a new token). */
  ttlSeconds: number;
  /** Cut the proxy's connections once the page has seen this many text deltas. */
  cutAfterDeltas: number;
}

const SCENARIOS: Scenario[] = [
  { name: "reconnect_with_last_event_id", ttlSeconds: 300, cutAfterDeltas: 3 },
  { name: "new_token_after_expiry", ttlSeconds: 1, cutAfterDeltas: 3 },
];

async function main(): Promise<number> {
  const proxy = new Proxy();
  await proxy.listen();
  const pageServer = await servePage();
  const browser = await chromium.launch({
    executablePath: env("CHROMIUM", "/usr/bin/chromium"),
    args: ["--headless", "--no-sandbox", "--disable-gpu"],
    timeout: DEADLINE_MS,
  });
  let failed = 0;
  try {
    for (const scenario of SCENARIOS) {
      const page = await browser.newPage();
      page.setDefaultTimeout(DEADLINE_MS);
      const consoleLines: string[] = [];
      page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
      let deltas = 0;
      let cuts = 0;
      const firstRequest = proxy.requests.length;
      await page.exposeFunction("__event", (item: { kind: string }) => {
        if (item.kind === "textDelta") deltas += 1;
        if (deltas === scenario.cutAfterDeltas && cuts === 0) {
          cuts = proxy.cut();
        }
      });
      try {
        await page.goto(`http://127.0.0.1:${pagePort}/`);
        await page.waitForFunction(() => (window as unknown as { pageReady?: boolean }).pageReady === true);
        const result = await page.evaluate(
          (config) => (window as unknown as { runScenario(c: unknown): Promise<unknown> }).runScenario(config),
          {
            baseUrl: `http://127.0.0.1:${proxyPort}`,
            apiKey: env("DISPATCH_API_KEY"),
            agent: env("DISPATCH_BROWSER_AGENT"),
            ttlSeconds: scenario.ttlSeconds,
            timeoutMs: DEADLINE_MS,
          },
        );
        console.log(
          JSON.stringify({
            scenario: scenario.name,
            ok: true,
            cut_connections: cuts,
            requests: proxy.requests.slice(firstRequest),
            result,
            console: consoleLines,
          }),
        );
      } catch (err) {
        failed += 1;
        console.log(
          JSON.stringify({
            scenario: scenario.name,
            ok: false,
            error: err instanceof Error ? err.message : String(err),
            requests: proxy.requests.slice(firstRequest),
            console: consoleLines,
          }),
        );
      } finally {
        await page.close();
      }
    }
    const scenarioFile = process.env.DISPATCH_CONFORMANCE_SCENARIO;
    if (scenarioFile) failed += await conformance(browser, scenarioFile);
  } finally {
    await browser.close();
    pageServer.close();
    proxy.close();
  }
  return failed ? 1 : 0;
}

/** The conformance scenario's cases, run in a page by the browser client. */
async function conformance(browser: Browser, scenarioFile: string): Promise<number> {
  const cases = (JSON.parse(readFileSync(scenarioFile, "utf8")) as { cases: unknown[] }).cases;
  const page = await browser.newPage();
  page.setDefaultTimeout(DEADLINE_MS * cases.length);
  const consoleLines: string[] = [];
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  try {
    await page.goto(`http://127.0.0.1:${pagePort}/`);
    const results = (await page.evaluate(
      async (config) => {
        const module = (await import("/scenario.js" as string)) as {
          runConformance(c: unknown): Promise<{ case: string; ok: boolean; error?: string }[]>;
        };
        return module.runConformance(config);
      },
      {
        baseUrl: `http://${bridgeHost}:${bridgePort}`,
        keys: { local: env("DISPATCH_API_KEY"), other: env("DISPATCH_CONFORMANCE_OTHER_KEY"), nobody: "not-a-key" },
        cases,
      },
    )) as { case: string; ok: boolean; error?: string }[];
    for (const result of results) console.log(JSON.stringify({ conformance: result.case, ok: result.ok, error: result.error }));
    return results.filter((r) => !r.ok).length;
  } catch (err) {
    console.log(JSON.stringify({ conformance: "*", ok: false, error: String(err), console: consoleLines }));
    return 1;
  } finally {
    await page.close();
  }
}

process.exitCode = await main();
