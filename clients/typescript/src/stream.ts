/**
 * What the Node and the browser clients share about event streams, as in the Python SDK
 * (`dispatch_client/_stream.py`).
 *
 * `Resume` is a subscription's cursor and its reconnect decisions: which request to send,
 * which events of a response are new, and after a stream ends or breaks whether (and after
 * how long) to subscribe again. `TurnFollower` picks the events of one sent message's turn
 * out of the conversation's stream. The clients only run the loop.
 */
import { AgentEvent, SubscribeUntil, TurnSealed } from "./gen/dispatch/v1/common.js";
import type { SendResponse, SubscribeRequest } from "./gen/dispatch/v1/transport.js";
import { Code, DispatchError, errorFor } from "./errors.js";
import { subscribeUntil, type UntilLike } from "./types.js";

/**
 * A broken stream is resumed on these; any other status is the caller's to handle.
 * INTERNAL and UNKNOWN are what a connection dropped mid-stream often surfaces as;
 * RESOURCE_EXHAUSTED is how a server without Resync messages says "you fell behind".
 */
export const RESUMABLE: ReadonlySet<number> = new Set([
  Code.UNAVAILABLE,
  Code.INTERNAL,
  Code.UNKNOWN,
  Code.RESOURCE_EXHAUSTED,
  Code.ABORTED,
]);

export const INITIAL_BACKOFF_MS = 100;
export const MAX_BACKOFF_MS = 5000;

/** What a subscription logs when it reconnects (never a key or a token). */
export type Logger = (level: "info" | "warn", message: string) => void;

export interface ResumeOptions {
  /** Events after this event_seq (0: from the first). */
  afterEventSeq?: number;
  /** Where the stream ends by itself: `"follow"` (default, never), `"caught_up"`, `"turn_sealed"`. */
  until?: UntilLike;
  /** false: a broken stream throws instead of resubscribing. */
  reconnect?: boolean;
  /** Give up after this many reconnects (default: never). */
  maxReconnects?: number;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  log?: Logger;
}

/**
 * The cursor of one subscription and when to reconnect it. The loop is:
 *
 * ```ts
 * for (let delay = resume.nextDelay(); delay !== null; delay = resume.nextDelay()) {
 *   await sleep(delay);
 *   const call = open(resume.request());
 *   try {
 *     for await (const response of call) {
 *       yield* resume.accept(response);
 *       if (resume.resync) break;
 *     }
 *     resume.ended();
 *   } catch (err) {
 *     resume.broke(err); // throws what is not resumable
 *   } finally {
 *     call.cancel();
 *   }
 * }
 * ```
 */
export class Resume {
  readonly conversationId: string;
  /** The last event_seq yielded (or the caller's starting point). */
  cursor: number;
  readonly until: SubscribeUntil;
  /** A follow stream never ends by design: one that does is resumed. */
  readonly follow: boolean;
  readonly reconnect: boolean;
  readonly maxReconnects: number | undefined;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  /** Set by a response carrying a resync: the server ends the stream; subscribe again. */
  resync = false;
  reconnects = 0;
  private failures = 0;
  private progress = false;
  private next: number | null = 0;
  private readonly log: Logger | undefined;

  constructor(conversationId: string, options: ResumeOptions = {}) {
    this.conversationId = conversationId;
    this.cursor = options.afterEventSeq ?? 0;
    if (!Number.isSafeInteger(this.cursor) || this.cursor < 0) {
      throw new TypeError(`afterEventSeq must be an event_seq (a whole number, 0 or more), not ${this.cursor}`);
    }
    this.until = options.until === undefined ? SubscribeUntil.SUBSCRIBE_UNTIL_FOLLOW : subscribeUntil(options.until);
    this.follow = this.until === SubscribeUntil.SUBSCRIBE_UNTIL_FOLLOW;
    this.reconnect = options.reconnect ?? true;
    this.maxReconnects = options.maxReconnects;
    this.initialBackoffMs = options.initialBackoffMs ?? INITIAL_BACKOFF_MS;
    this.maxBackoffMs = options.maxBackoffMs ?? MAX_BACKOFF_MS;
    this.log = options.log;
  }

  /** Milliseconds to wait before (re)subscribing, or null when the subscription is over. */
  nextDelay(): number | null {
    return this.next;
  }

  /** The request of the next (re)subscription: from the last event yielded. */
  request(): SubscribeRequest {
    this.resync = false;
    this.progress = false;
    return { conversationId: this.conversationId, afterEventSeq: this.cursor, until: this.until };
  }

  /** The events not yielded yet, in order; the cursor moves past them. `resyncAfter`: the
   * response (or frame) asked for a resync after that event_seq. */
  accept(events: readonly AgentEvent[], resyncAfter?: number): AgentEvent[] {
    const fresh: AgentEvent[] = [];
    for (const event of events) {
      if (event.eventSeq > this.cursor) {
        this.cursor = event.eventSeq;
        fresh.push(event);
      }
    }
    if (fresh.length > 0) {
      this.progress = true;
      this.failures = 0;
    }
    if (resyncAfter !== undefined) {
      this.resync = true;
      this.log?.(
        "info",
        `conversation ${this.conversationId}: the server asked for a resync after event ${resyncAfter}; resubscribing from ${this.cursor}`,
      );
    }
    return fresh;
  }

  /** The stream ended without an error (or after a resync): the delay before subscribing
   * again, or null to stop. Only a follow stream, which should never end, is resumed. */
  ended(): number | null {
    if (this.resync) {
      this.next = this.backoff(undefined, this.progress);
    } else if (this.follow && this.reconnect) {
      this.log?.("info", `conversation ${this.conversationId}: the event stream ended; resubscribing`);
      this.next = this.backoff(undefined);
    } else {
      this.next = null;
    }
    return this.next;
  }

  /** The stream failed with `error`: the delay before subscribing again. Throws the error
   * when it is not one to resume from. */
  broke(error: DispatchError): number {
    if (!this.reconnect || !RESUMABLE.has(error.code)) throw error;
    this.next = this.backoff(error);
    this.log?.(
      "warn",
      `conversation ${this.conversationId}: the event stream broke (${error.message}); resubscribing in ${this.next} ms`,
    );
    return this.next;
  }

  private backoff(error: DispatchError | undefined, immediate = false): number {
    if (this.maxReconnects !== undefined && this.reconnects >= this.maxReconnects) {
      const gaveUp = `gave up after ${this.reconnects} reconnects`;
      if (error === undefined) throw errorFor(Code.UNAVAILABLE, `the event stream ended; ${gaveUp}`);
      throw errorFor(error.code, `${error.details} (${gaveUp})`);
    }
    this.reconnects += 1;
    if (immediate) return 0;
    const delay = Math.min(this.initialBackoffMs * 2 ** this.failures, this.maxBackoffMs);
    this.failures += 1;
    return delay;
  }
}

/**
 * Which events of a conversation's stream belong to the turn a Send answered, and when it
 * is over. A message queued behind a running turn is either taken by that turn as steering,
 * or starts the next turn after the seal: without a `steeringInjected` in the running turn,
 * the follower goes on to the next turn that starts.
 */
export class TurnFollower {
  readonly conversationId: string;
  /** Where the turn's events start. */
  readonly afterEventSeq: number;
  turnId: string;
  done = false;
  /** The turn's seal (undefined if it ended unsealed, or has not ended). */
  sealed: TurnSealed | undefined;
  private queued: boolean;
  private steered = false;
  private turnDone = false;

  constructor(conversationId: string, sent: SendResponse) {
    this.conversationId = conversationId;
    this.afterEventSeq = sent.afterEventSeq;
    this.turnId = sent.turnId;
    this.queued = sent.queued;
  }

  /** Whether `event` is one of the turn's; sets `done` on its last. */
  accept(event: AgentEvent): boolean {
    const kind = event.kind;
    if (!this.turnId) {
      // Waiting for the turn that takes the queued message.
      if (kind?.$case !== "turnStarted") return false;
      this.turnId = event.turnId;
      this.queued = false;
    }
    if (event.turnId !== this.turnId || this.done) return false;
    switch (kind?.$case) {
      case "steeringInjected":
        this.steered = true;
        break;
      case "turnDone":
        this.turnDone = true;
        break;
      case "turnSealed":
        if (this.queued && !this.steered) {
          this.turnId = ""; // the message starts the next turn
          this.turnDone = false;
        } else {
          this.done = true;
          this.sealed = kind.value;
        }
        break;
      case "error":
        // After turnDone, a fatal error is the turn ending unsealed (the store failed).
        if (kind.value.fatal && this.turnDone) this.done = true;
        break;
      default:
        break;
    }
    return true;
  }
}

/** An AbortSignal's reason as something to throw. */
export function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException("This operation was aborted", "AbortError");
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.reject(abortReason(signal));
  if (ms <= 0 && !signal) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal!));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, Math.max(0, ms));
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
