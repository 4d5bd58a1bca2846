/**
 * The Node client: the public API over gRPC (@grpc/grpc-js).
 *
 * ```ts
 * const client = new DispatchClient(); // DISPATCH_ADDRESS, DISPATCH_API_KEY
 * const conv = await client.createConversation();
 * for await (const event of client.runTurn(conv.id, "list the workspace")) {
 *   if (event.kind?.$case === "textDelta") process.stdout.write(event.kind.value.text);
 * }
 * client.close();
 * ```
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";

import { DispatchApi, DEFAULT_TIMEOUT_MS, type CallOptions, type RequestOf, type ResponseOf, type SubscribeOptions, type UnaryMethod } from "./api.js";
import { Code, DispatchError, errorFor } from "./errors.js";
import type { AgentEvent } from "./gen/dispatch/v1/common.js";
import { DispatchDefinition, SubscribeRequest, SubscribeResponse } from "./gen/dispatch/v1/transport.js";
import { abortReason, Resume, sleep, type Logger } from "./stream.js";

export const DEFAULT_ADDRESS = "127.0.0.1:7600";
const SERVICE = DispatchDefinition.fullName;

export interface TlsOptions {
  /** PEM roots to trust (default: the system's). */
  rootCerts?: Buffer;
  /** A client certificate, for mutual TLS. */
  privateKey?: Buffer;
  certChain?: Buffer;
}

export interface ClientOptions {
  /** `host:port`; default `DISPATCH_ADDRESS`, else `127.0.0.1:7600`. */
  address?: string;
  /** Default `DISPATCH_API_KEY`, else the `api_key` file in `DISPATCH_DATA_DIR` (default `.dispatch`). */
  apiKey?: string;
  /** The default deadline of a unary call, in milliseconds (30 s). */
  timeoutMs?: number;
  /**
   * TLS: `true` (the system's roots) or the certificates to use; `false` (the default, as
   * in the Python and Go clients: `dispatchd` itself serves plaintext, on loopback or behind
   * a TLS-terminating proxy): plaintext.
   */
  tls?: boolean | TlsOptions;
  /** Channel credentials of your own; they override `tls`. */
  credentials?: grpc.ChannelCredentials;
  /** grpc-js channel options (`grpc.keepalive_time_ms`, ...). */
  channelOptions?: grpc.ChannelOptions;
  /** Told when a subscription reconnects (never given a key or a token). */
  log?: Logger;
}

/** The API key: `given`, else `DISPATCH_API_KEY`, else `$DISPATCH_DATA_DIR/api_key` (default `.dispatch/api_key`). */
export function findApiKey(given?: string): string {
  if (given) return given;
  const env = process.env.DISPATCH_API_KEY?.trim();
  if (env) return env;
  try {
    return readFileSync(join(process.env.DISPATCH_DATA_DIR || ".dispatch", "api_key"), "utf8").trim();
  } catch {
    return "";
  }
}

/** The server's address: `given`, else `DISPATCH_ADDRESS`, else `127.0.0.1:7600`. */
export function findAddress(given?: string): string {
  return given || process.env.DISPATCH_ADDRESS?.trim() || DEFAULT_ADDRESS;
}

function credentialsFor(options: ClientOptions): grpc.ChannelCredentials {
  if (options.credentials) return options.credentials;
  const tls = options.tls ?? false;
  if (tls === false) return grpc.credentials.createInsecure();
  const given = tls === true ? {} : tls;
  return grpc.credentials.createSsl(given.rootCerts ?? null, given.privateKey ?? null, given.certChain ?? null);
}

/** A grpc-js failure (or anything thrown) as a `DispatchError` of its status. */
export function toDispatchError(err: unknown): DispatchError {
  if (err instanceof DispatchError) return err;
  const e = err as Partial<grpc.ServiceError> | undefined;
  if (e && typeof e.code === "number") return errorFor(e.code, e.details ?? "");
  return errorFor(Code.UNKNOWN, String(err));
}

type Fns = { encode(m: unknown): { finish(): Uint8Array }; decode(b: Uint8Array): unknown };

/** An async client of `dispatch.v1.Dispatch`; call `close()` when done. */
export class DispatchClient extends DispatchApi {
  readonly address: string;
  readonly timeoutMs: number;
  private readonly apiKey: string;
  private readonly grpcClient: grpc.Client;
  private readonly log: Logger | undefined;
  // Calls in flight, for close() to end.
  private readonly calls = new Set<grpc.Call>();

  constructor(options: ClientOptions = {}) {
    super();
    this.address = findAddress(options.address);
    this.apiKey = findApiKey(options.apiKey);
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.log = options.log;
    this.grpcClient = new grpc.Client(this.address, credentialsFor(options), options.channelOptions);
  }

  /** Closes the channel; calls and streams still open on it end (CANCELLED). */
  close(): void {
    for (const call of this.calls) call.cancel();
    this.calls.clear();
    this.grpcClient.close();
  }

  private metadata(): grpc.Metadata {
    const metadata = new grpc.Metadata();
    if (this.apiKey) metadata.set("authorization", `Bearer ${this.apiKey}`);
    return metadata;
  }

  protected call<K extends UnaryMethod>(method: K, request: RequestOf<K>, options: CallOptions): Promise<ResponseOf<K>> {
    const def = DispatchDefinition.methods[method];
    const req = def.requestType as unknown as Fns;
    const res = def.responseType as unknown as Fns;
    const signal = options.signal;
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + (options.timeoutMs ?? this.timeoutMs));
      const onAbort = () => call.cancel();
      const call = this.grpcClient.makeUnaryRequest(
        `/${SERVICE}/${def.name}`,
        (message: unknown) => Buffer.from(req.encode(message).finish()),
        (bytes: Buffer) => res.decode(bytes),
        request,
        this.metadata(),
        { deadline },
        (err, value) => {
          this.calls.delete(call);
          signal?.removeEventListener("abort", onAbort);
          if (signal?.aborted) reject(abortReason(signal));
          else if (err) reject(toDispatchError(err));
          else resolve(value as ResponseOf<K>);
        },
      );
      this.calls.add(call);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  async *subscribe(conversationId: string, options: SubscribeOptions = {}): AsyncGenerator<AgentEvent, void, undefined> {
    const resume = new Resume(conversationId, { log: this.log, ...options });
    const signal = options.signal;
    const deadline = options.timeoutMs === undefined ? undefined : Date.now() + options.timeoutMs;
    for (let delay = resume.nextDelay(); delay !== null; delay = resume.nextDelay()) {
      if (deadline !== undefined && Date.now() + delay >= deadline) {
        throw errorFor(Code.DEADLINE_EXCEEDED, `the subscription's deadline of ${options.timeoutMs} ms passed`);
      }
      await sleep(delay, signal);
      const call = this.grpcClient.makeServerStreamRequest(
        `/${SERVICE}/Subscribe`,
        (message: SubscribeRequest) => Buffer.from(SubscribeRequest.encode(message).finish()),
        (bytes: Buffer) => SubscribeResponse.decode(bytes),
        resume.request(),
        this.metadata(),
        deadline === undefined ? {} : { deadline: new Date(deadline) },
      );
      // After a cancel the call still reports CANCELLED; nobody is listening by then.
      call.on("error", () => {});
      this.calls.add(call);
      const onAbort = () => call.cancel();
      signal?.addEventListener("abort", onAbort, { once: true });
      try {
        for await (const response of call as AsyncIterable<SubscribeResponse>) {
          yield* resume.accept(response.events, response.resync?.afterEventSeq);
          if (resume.resync) break;
        }
        resume.ended();
      } catch (err) {
        if (signal?.aborted) throw abortReason(signal);
        resume.broke(toDispatchError(err));
      } finally {
        signal?.removeEventListener("abort", onAbort);
        this.calls.delete(call);
        call.cancel();
      }
    }
  }
}
