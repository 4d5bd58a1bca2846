/**
 * `@dispatch/client/browser`: the client for a web page, over Dispatch's HTTP bridge with
 * `fetch` and `EventSource` (no grpc-js, no Node API).
 *
 * ```ts
 * const client = new BrowserDispatchClient({ baseUrl: "http://127.0.0.1:7610", apiKey });
 * const conv = await client.createConversation();
 * for await (const event of client.runTurn(conv.id, "hello")) {
 *   if (event.kind?.$case === "textDelta") output.append(event.kind.value.text);
 * }
 * ```
 *
 * Unary calls carry `Authorization: Bearer <key>` (`apiKey`, or `getAuthorization()` for
 * apps whose back end hands one out). A follow subscription is an `EventSource` on
 * `/v1/conversations/{id}/events?stream_token=…`: the browser reconnects by itself with
 * `Last-Event-ID`; when it gives up (the token expired, or an error answer), the client mints
 * a new stream token (`getStreamToken()`, by default `POST …/stream-token` with the key) and
 * reopens from the last event it yielded. A bounded subscription (`until: "caught_up"` or
 * `"turn_sealed"`) reads the NDJSON stream with `fetch`, which can tell its clean end.
 */
import { DispatchApi, DEFAULT_TIMEOUT_MS, type CallOptions, type RequestOf, type ResponseOf, type SubscribeOptions, type UnaryMethod } from "../api.js";
import { Code, DeadlineExceededError, DispatchError, errorFor, errorForName, UnavailableError } from "../errors.js";
import { AgentEvent, SubscribeUntil, turnStateToJSON } from "../gen/dispatch/v1/common.js";
import { DispatchDefinition } from "../gen/dispatch/v1/transport.js";
import { abortReason, Resume, sleep, type Logger } from "../stream.js";
import type { EventKind } from "../types.js";

export { DispatchApi, DEFAULT_TIMEOUT_MS } from "../api.js";
export type { CallOptions, FollowOptions, PageOptions, SendOptions, SubscribeOptions } from "../api.js";
export * from "../errors.js";
export { INITIAL_BACKOFF_MS, MAX_BACKOFF_MS, RESUMABLE, Resume, TurnFollower, type Logger, type ResumeOptions } from "../stream.js";
export * from "../types.js";

/** A stream token as `getStreamToken` may answer it: the token, or the bridge's whole answer. */
export type StreamTokenLike = string | { token: string };

export interface BrowserClientOptions {
  /** The HTTP bridge, `http://127.0.0.1:7610` (default: this page's origin). */
  baseUrl?: string;
  /** Sent as `Authorization: Bearer <key>` on every call. */
  apiKey?: string;
  /** The bearer for each call, instead of a fixed `apiKey` (asked once per call). */
  getAuthorization?: () => string | Promise<string>;
  /**
   * A stream token for the conversation's event stream, for apps that mint them on their
   * own back end (which holds the key). Default: `createStreamToken` with this client's key.
   */
  getStreamToken?: (conversationId: string) => StreamTokenLike | Promise<StreamTokenLike>;
  /** The lifetime asked for tokens this client mints (default: the server's, 300 s). */
  streamTokenTtlSeconds?: number;
  /** The default deadline of a unary call, in milliseconds (30 s). */
  timeoutMs?: number;
  /** Told when a subscription reopens (never given a key or a token). */
  log?: Logger;
  /** Replacements for the globals, for other environments. */
  fetch?: typeof fetch;
  EventSource?: typeof EventSource;
}

/** Every event kind, as the SSE `event:` field names it; the type below keeps it complete. */
const KINDS = [
  "turnStarted",
  "textDelta",
  "reasoningDelta",
  "toolCall",
  "toolOutput",
  "toolResult",
  "usage",
  "stepCompleted",
  "providerRetry",
  "steeringInjected",
  "approvalRequested",
  "approvalResolved",
  "messagesCommitted",
  "error",
  "turnDone",
  "turnSealed",
  "turnResumed",
  "turnInterrupted",
  "eventsLost",
  "toolStarted",
  "compactionStarted",
  "compactionDone",
] as const satisfies readonly EventKind[];
// A kind the protos add and KINDS lacks fails to compile here.
const complete: Exclude<EventKind, (typeof KINDS)[number]> extends never ? true : false = true;
void complete;
const SSE_KINDS = KINDS.map((k) => k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`));

type Query = Record<string, string | number | boolean | string[] | undefined>;
interface Route {
  method: "GET" | "POST" | "PATCH" | "DELETE";
  path: string;
  query?: Query;
  body?: unknown;
}

const enc = encodeURIComponent;
const conv = (id: string) => `/v1/conversations/${enc(id)}`;

/** The request as the body's JSON, without the fields the path carries. */
function body<K extends UnaryMethod>(method: K, request: RequestOf<K>, ...pathFields: string[]): Record<string, unknown> {
  const type = DispatchDefinition.methods[method].requestType as unknown as { toJSON(m: unknown): unknown };
  const json = type.toJSON(request) as Record<string, unknown>;
  for (const field of pathFields) delete json[field];
  return json;
}

const page = (r: { pageSize: number; pageToken: string }): Query => ({
  page_size: r.pageSize || undefined,
  page_token: r.pageToken || undefined,
});

/** How each unary method travels over the bridge (its route table: services/dispatch/transport/http.py). */
const ROUTES: { [K in UnaryMethod]: (r: RequestOf<K>) => Route } = {
  createWorkspace: (r) => ({ method: "POST", path: "/v1/workspaces", body: body("createWorkspace", r) }),
  listWorkspaces: (r) => ({ method: "GET", path: "/v1/workspaces", query: page(r) }),
  createConversation: (r) => ({ method: "POST", path: "/v1/conversations", body: body("createConversation", r) }),
  listConversations: (r) => ({
    method: "GET",
    path: "/v1/conversations",
    query: { workspace_id: r.workspaceId || undefined, ...page(r) },
  }),
  getConversation: (r) => ({ method: "GET", path: conv(r.conversationId) }),
  updateConversation: (r) => ({
    method: "PATCH",
    path: conv(r.conversationId),
    body: body("updateConversation", r, "conversationId"),
  }),
  deleteConversation: (r) => ({ method: "DELETE", path: conv(r.conversationId) }),
  send: (r) => ({ method: "POST", path: `${conv(r.conversationId)}/messages`, body: body("send", r, "conversationId") }),
  cancel: (r) => ({ method: "POST", path: `${conv(r.conversationId)}/cancel`, body: body("cancel", r, "conversationId") }),
  getTurn: (r) => ({ method: "GET", path: `${conv(r.conversationId)}/turns/${enc(r.turnId)}` }),
  listTurns: (r) => ({
    method: "GET",
    path: `${conv(r.conversationId)}/turns`,
    query: { state: r.states.map(turnStateToJSON), ...page(r) },
  }),
  resolveApproval: (r) => ({
    method: "POST",
    path: `/v1/approvals/${enc(r.approvalId)}/resolve`,
    body: body("resolveApproval", r, "approvalId"),
  }),
  listApprovals: (r) => ({
    method: "GET",
    path: `${conv(r.conversationId)}/approvals`,
    query: { pending: r.pendingOnly || undefined },
  }),
  history: (r) => ({
    method: "GET",
    path: `${conv(r.conversationId)}/history`,
    query: { after_seq: r.afterSeq || undefined, limit: r.limit || undefined },
  }),
  metrics: (r) => ({ method: "GET", path: `${conv(r.conversationId)}/metrics`, query: { turn_id: r.turnId || undefined } }),
  models: () => ({ method: "GET", path: "/v1/models" }),
  computers: () => ({ method: "GET", path: "/v1/computers" }),
  createStreamToken: (r) => ({
    method: "POST",
    path: `${conv(r.conversationId)}/stream-token`,
    body: body("createStreamToken", r, "conversationId"),
  }),
};

function queryString(query: Query | undefined): string {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value === undefined) continue;
    for (const one of Array.isArray(value) ? value : [value]) params.append(name, String(one));
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

/** The error an HTTP answer that is not 2xx carries (`{"error": {"code", "message"}}`). */
async function errorOf(response: Response): Promise<DispatchError> {
  let data: unknown;
  try {
    data = await response.json();
  } catch {
    data = undefined;
  }
  const error = (data as { error?: { code?: string; message?: string } } | undefined)?.error;
  if (error?.code) return errorForName(error.code, error.message ?? "");
  const code = response.status === 401 ? Code.UNAUTHENTICATED : response.status >= 500 ? Code.UNAVAILABLE : Code.UNKNOWN;
  return errorFor(code, `HTTP ${response.status} ${response.statusText}`.trim());
}

/** One place for a request's end: any of the signals, a deadline, or `cancel()`. */
function linkedAbort(signals: (AbortSignal | undefined)[], timeoutMs: number | undefined) {
  const controller = new AbortController();
  let timedOut = false;
  const timer =
    timeoutMs === undefined
      ? undefined
      : setTimeout(() => {
          timedOut = true;
          controller.abort();
        }, Math.max(0, timeoutMs));
  const onAbort = () => controller.abort();
  for (const signal of signals) signal?.addEventListener("abort", onAbort, { once: true });
  return {
    signal: controller.signal,
    timedOut: () => timedOut,
    /** Ends the request (if it still runs) and lets go of the signals. */
    cancel: () => {
      clearTimeout(timer);
      for (const signal of signals) signal?.removeEventListener("abort", onAbort);
      controller.abort();
    },
  };
}

type Frame =
  | { type: "event"; data: string }
  | { type: "resync"; data: string }
  | { type: "stream_error"; data: string }
  | { type: "error" }
  | { type: "stop" };

/** Callbacks in, one awaited frame at a time out. */
class Frames {
  private items: Frame[] = [];
  private waiting: ((frame: Frame) => void) | undefined;

  push(frame: Frame): void {
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = undefined;
      resolve(frame);
    } else {
      this.items.push(frame);
    }
  }

  next(): Promise<Frame> {
    const frame = this.items.shift();
    return frame ? Promise.resolve(frame) : new Promise((resolve) => (this.waiting = resolve));
  }
}

/** The public API over the HTTP bridge, for web pages. */
export class BrowserDispatchClient extends DispatchApi {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  private readonly options: BrowserClientOptions;
  private readonly fetchFn: typeof fetch;
  private readonly log: Logger | undefined;
  private readonly open = new Set<AbortController>();

  constructor(options: BrowserClientOptions = {}) {
    super();
    this.options = options;
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.log = options.log;
    const f = options.fetch ?? globalThis.fetch;
    this.fetchFn = (input, init) => f(input, init);
  }

  /** Ends every call and stream still open. */
  close(): void {
    for (const controller of this.open) controller.abort();
    this.open.clear();
  }

  private async authorization(): Promise<Record<string, string>> {
    const bearer = this.options.getAuthorization ? await this.options.getAuthorization() : this.options.apiKey;
    return bearer ? { Authorization: `Bearer ${bearer}` } : {};
  }

  protected async call<K extends UnaryMethod>(method: K, request: RequestOf<K>, options: CallOptions): Promise<ResponseOf<K>> {
    const route = (ROUTES[method] as (r: RequestOf<K>) => Route)(request);
    const responseType = DispatchDefinition.methods[method].responseType as unknown as { fromJSON(o: unknown): unknown };
    if (options.signal?.aborted) throw abortReason(options.signal);
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const closer = new AbortController();
    this.open.add(closer);
    const abort = linkedAbort([options.signal, closer.signal], timeoutMs);
    const headers: Record<string, string> = { Accept: "application/json", ...(await this.authorization()) };
    if (route.body !== undefined) headers["Content-Type"] = "application/json";
    let response: Response;
    try {
      response = await this.fetchFn(`${this.baseUrl}${route.path}${queryString(route.query)}`, {
        method: route.method,
        headers,
        body: route.body === undefined ? undefined : JSON.stringify(route.body),
        signal: abort.signal,
      });
      if (!response.ok) throw await errorOf(response);
      return responseType.fromJSON(await response.json()) as ResponseOf<K>;
    } catch (err) {
      if (options.signal?.aborted) throw abortReason(options.signal);
      if (abort.timedOut()) throw new DeadlineExceededError(`no answer from the HTTP bridge within ${timeoutMs} ms`);
      if (closer.signal.aborted) throw errorFor(Code.CANCELLED, "the client was closed");
      if (err instanceof DispatchError) throw err;
      throw new UnavailableError(`the HTTP bridge is unreachable: ${(err as Error).message ?? String(err)}`);
    } finally {
      abort.cancel();
      this.open.delete(closer);
    }
  }

  /** A stream token for the conversation: the app's `getStreamToken`, else minted with the key. */
  async streamToken(conversationId: string, signal?: AbortSignal): Promise<string> {
    if (this.options.getStreamToken) {
      const got = await this.options.getStreamToken(conversationId);
      return typeof got === "string" ? got : got.token;
    }
    const token = await this.createStreamToken(conversationId, {
      ttlSeconds: this.options.streamTokenTtlSeconds ?? 0,
      signal,
    });
    return token.token;
  }

  async *subscribe(conversationId: string, options: SubscribeOptions = {}): AsyncGenerator<AgentEvent, void, undefined> {
    const resume = new Resume(conversationId, { log: this.log, ...options });
    const deadline = options.timeoutMs === undefined ? undefined : Date.now() + options.timeoutMs;
    const late = () => new DeadlineExceededError(`the subscription's deadline of ${options.timeoutMs} ms passed`);
    if (resume.follow) yield* this.followSse(resume, options.signal, deadline, late);
    else yield* this.readNdjson(resume, options.signal, deadline, late);
  }

  /** A follow subscription over EventSource, with stream tokens. */
  private async *followSse(
    resume: Resume,
    signal: AbortSignal | undefined,
    deadline: number | undefined,
    late: () => DispatchError,
  ): AsyncGenerator<AgentEvent, void, undefined> {
    const Source = this.options.EventSource ?? globalThis.EventSource;
    let token: string | undefined;
    for (let delay = resume.nextDelay(); delay !== null; delay = resume.nextDelay()) {
      if (deadline !== undefined && Date.now() + delay >= deadline) throw late();
      await sleep(delay, signal);
      try {
        token ??= await this.streamToken(resume.conversationId, signal);
      } catch (err) {
        if (signal?.aborted) throw abortReason(signal);
        resume.broke(err instanceof DispatchError ? err : new UnavailableError(String(err)));
        continue;
      }
      const query = { stream_token: token, after_event_seq: resume.request().afterEventSeq };
      const source = new Source(`${this.baseUrl}${conv(resume.conversationId)}/events${queryString(query)}`);
      const frames = new Frames();
      // An AgentEvent of kind `error` arrives as an SSE event named "error", the name EventSource
      // also gives its connection errors: a frame carries data, a connection error none.
      const isFrame = (e: Event): e is MessageEvent<string> => typeof (e as MessageEvent).data === "string";
      const onEvent = (e: Event) => {
        if (isFrame(e)) frames.push({ type: "event", data: e.data });
      };
      for (const kind of SSE_KINDS) source.addEventListener(kind, onEvent);
      source.addEventListener("resync", (e) => frames.push({ type: "resync", data: (e as MessageEvent<string>).data }));
      source.addEventListener("stream_error", (e) =>
        frames.push({ type: "stream_error", data: (e as MessageEvent<string>).data }),
      );
      source.addEventListener("error", (e) => {
        if (!isFrame(e)) frames.push({ type: "error" });
      });
      const stop = () => frames.push({ type: "stop" });
      signal?.addEventListener("abort", stop, { once: true });
      const timer = deadline === undefined ? undefined : setTimeout(stop, Math.max(0, deadline - Date.now()));
      const closer = new AbortController();
      closer.signal.addEventListener("abort", stop, { once: true });
      this.open.add(closer);
      try {
        for (;;) {
          const frame = await frames.next();
          if (frame.type === "event") {
            yield* resume.accept([AgentEvent.fromJSON(JSON.parse(frame.data))]);
          } else if (frame.type === "resync") {
            const after = Number((JSON.parse(frame.data) as { after_event_seq?: number }).after_event_seq ?? resume.cursor);
            resume.accept([], after);
            source.close();
            resume.ended();
            break;
          } else if (frame.type === "stream_error") {
            source.close();
            const error = (JSON.parse(frame.data) as { error?: { code?: string; message?: string } }).error;
            resume.broke(errorForName(error?.code ?? "UNKNOWN", error?.message ?? ""));
            break;
          } else if (frame.type === "error") {
            // CONNECTING: the browser reconnects by itself, sending Last-Event-ID. CLOSED: it gave
            // up on an error answer, as when the token expired: reopen with a new one.
            if (source.readyState === Source.CLOSED) {
              token = undefined;
              resume.broke(new UnavailableError("the event stream was refused; reopening it with a new stream token"));
              break;
            }
          } else {
            if (signal?.aborted) throw abortReason(signal);
            if (closer.signal.aborted) return;
            throw late();
          }
        }
      } finally {
        source.close();
        clearTimeout(timer);
        signal?.removeEventListener("abort", stop);
        this.open.delete(closer);
      }
    }
  }

  /** A bounded subscription over the NDJSON stream, read with fetch: its clean end is its end. */
  private async *readNdjson(
    resume: Resume,
    signal: AbortSignal | undefined,
    deadline: number | undefined,
    late: () => DispatchError,
  ): AsyncGenerator<AgentEvent, void, undefined> {
    const until = resume.until === SubscribeUntil.SUBSCRIBE_UNTIL_CAUGHT_UP ? "caught_up" : "turn_sealed";
    for (let delay = resume.nextDelay(); delay !== null; delay = resume.nextDelay()) {
      if (deadline !== undefined && Date.now() + delay >= deadline) throw late();
      await sleep(delay, signal);
      const closer = new AbortController();
      this.open.add(closer);
      const abort = linkedAbort([signal, closer.signal], deadline === undefined ? undefined : deadline - Date.now());
      try {
        const headers: Record<string, string> = { Accept: "application/x-ndjson", ...(await this.authorization()) };
        const query: Query = { after_event_seq: resume.request().afterEventSeq, until };
        if (!headers.Authorization) query.stream_token = await this.streamToken(resume.conversationId, signal);
        const response = await this.fetchFn(`${this.baseUrl}${conv(resume.conversationId)}/events${queryString(query)}`, {
          headers,
          signal: abort.signal,
        });
        if (!response.ok || !response.body) throw await errorOf(response);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffered = "";
        let broke: DispatchError | undefined;
        lines: for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          buffered += decoder.decode(value, { stream: true });
          let newline: number;
          while ((newline = buffered.indexOf("\n")) >= 0) {
            const line = buffered.slice(0, newline).trim();
            buffered = buffered.slice(newline + 1);
            if (!line) continue;
            const data = JSON.parse(line) as Record<string, unknown>;
            if (data.resync) {
              resume.accept([], Number((data.resync as { after_event_seq?: string }).after_event_seq ?? resume.cursor));
              break lines;
            }
            if (data.error) {
              const error = data.error as { code?: string; message?: string };
              broke = errorForName(error.code ?? "UNKNOWN", error.message ?? "");
              break lines;
            }
            yield* resume.accept([AgentEvent.fromJSON(data)]);
          }
        }
        await reader.cancel().catch(() => {});
        if (broke) resume.broke(broke);
        else resume.ended();
      } catch (err) {
        if (signal?.aborted) throw abortReason(signal);
        if (abort.timedOut()) throw late();
        if (closer.signal.aborted) return;
        resume.broke(err instanceof DispatchError ? err : new UnavailableError(`the event stream broke: ${String(err)}`));
      } finally {
        abort.cancel(); // also ends the answer when the caller stopped reading
        this.open.delete(closer);
      }
    }
  }
}

/** The browser's client under the Node client's name, for code shared between the two. */
export { BrowserDispatchClient as DispatchClient };
