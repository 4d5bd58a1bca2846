/**
 * The public API's methods, written once for both clients. A client says how one unary
 * call travels (`call`: gRPC in Node, fetch in a browser) and how a conversation's events
 * are read (`subscribe`); everything else — request building, paging, `runTurn` and
 * `followTurn` — is here.
 */
import type { AgentEvent, Chunk } from "./gen/dispatch/v1/common.js";
import { DispatchDefinition } from "./gen/dispatch/v1/transport.js";
import type { ResumeOptions } from "./stream.js";
import { TurnFollower } from "./stream.js";
import {
  approvalDecision,
  inputJson,
  permissionRules,
  sendPolicy,
  turnStates,
  type DecisionLike,
  type PermissionsLike,
  type SendPolicyLike,
  type TurnStateLike,
} from "./types.js";

type Methods = typeof DispatchDefinition.methods;
/** The service's methods, camelCase (`createConversation`), as in the generated definition. */
export type MethodName = keyof Methods;
export type UnaryMethod = Exclude<MethodName, "subscribe">;
export type RequestOf<K extends MethodName> = Parameters<Methods[K]["requestType"]["encode"]>[0];
export type ResponseOf<K extends MethodName> = ReturnType<Methods[K]["responseType"]["decode"]>;

/** Unary calls fail after this many milliseconds unless the client or the call says otherwise. */
export const DEFAULT_TIMEOUT_MS = 30_000;

export interface CallOptions {
  /** The call's deadline, in milliseconds (default: the client's `timeoutMs`, 30 s). */
  timeoutMs?: number;
  /** Cancels the call; it rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface SubscribeOptions extends ResumeOptions {
  /** Ends the subscription: the iterator throws the signal's reason. */
  signal?: AbortSignal;
  /** A deadline for the whole subscription, reconnects included, in milliseconds (default:
   * none). Past it the iterator throws `DeadlineExceededError`. */
  timeoutMs?: number;
}

/** How to follow a turn: `subscribe`'s options, where it ends is the turn's business. */
export type FollowOptions = Omit<SubscribeOptions, "afterEventSeq" | "until">;

export interface SendOptions extends CallOptions {
  /** The message as chunks, instead of `text`. */
  chunks?: Chunk[];
  /** With a turn running: `"enqueue"` (default), `"interrupt"` or `"reject"`. */
  policy?: SendPolicyLike;
  /** A repeat with the same key answers with the turn the first started. */
  idempotencyKey?: string;
}

export interface PageOptions extends CallOptions {
  pageSize?: number;
  pageToken?: string;
}

export abstract class DispatchApi {
  /** One unary call of the service. */
  protected abstract call<K extends UnaryMethod>(
    method: K,
    request: RequestOf<K>,
    options: CallOptions,
  ): Promise<ResponseOf<K>>;

  /**
   * Every event of the conversation after `afterEventSeq`, one by one: history, then live,
   * until `until` says it is over (`"follow"`, the default: never; `"caught_up"`: after the
   * events up to the moment of subscribing; `"turn_sealed"`: after the seal of the turn
   * running then). It resubscribes by itself from the last event it yielded when the server
   * asks for a resync, the stream breaks (UNAVAILABLE, INTERNAL, UNKNOWN, ABORTED,
   * RESOURCE_EXHAUSTED) or a follow stream ends, backing off exponentially (0.1 s doubling,
   * at most 5 s); no event is yielded twice or missed. Other failures throw at once. Stop
   * with `break`, or with `signal`.
   */
  abstract subscribe(conversationId: string, options?: SubscribeOptions): AsyncGenerator<AgentEvent, void, undefined>;

  /** Ends every call and stream of the client. */
  abstract close(): void;

  // ---------------------------------------------------------------- workspaces

  /** A workspace: a `root` tools resolve paths against (confined to it with `confineTools`),
   * the computer and agent its conversations default to, and permission rules. */
  createWorkspace(
    options: {
      name?: string;
      root?: string;
      defaultComputerId?: string;
      defaultAgent?: string;
      confineTools?: boolean;
      permissions?: PermissionsLike;
    } & CallOptions = {},
  ) {
    return this.call(
      "createWorkspace",
      {
        name: options.name ?? "",
        root: options.root ?? "",
        defaultComputerId: options.defaultComputerId ?? "",
        defaultAgent: options.defaultAgent ?? "",
        confineTools: options.confineTools ?? false,
        permissions: permissionRules(options.permissions),
      },
      options,
    );
  }

  /** One page of the tenant's workspaces; see `iterWorkspaces` for all of them. */
  listWorkspaces(options: PageOptions = {}) {
    return this.call("listWorkspaces", { pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" }, options);
  }

  /** Every workspace of the tenant, page by page. */
  async *iterWorkspaces(options: Omit<PageOptions, "pageToken"> = {}) {
    let pageToken = "";
    do {
      const page = await this.listWorkspaces({ ...options, pageToken });
      yield* page.workspaces;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  // ------------------------------------------------------------- conversations

  /** A conversation, in the default workspace unless `workspaceId` is given. */
  createConversation(
    options: { workspaceId?: string; title?: string; cwd?: string; computerId?: string; agent?: string } & CallOptions = {},
  ) {
    return this.call(
      "createConversation",
      {
        workspaceId: options.workspaceId ?? "",
        title: options.title ?? "",
        cwd: options.cwd ?? "",
        computerId: options.computerId ?? "",
        agent: options.agent ?? "",
      },
      options,
    );
  }

  /** One page of conversations (of `workspaceId` if given); see `iterConversations`. */
  listConversations(options: { workspaceId?: string } & PageOptions = {}) {
    return this.call(
      "listConversations",
      { workspaceId: options.workspaceId ?? "", pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" },
      options,
    );
  }

  /** Every conversation (of `workspaceId` if given), page by page. */
  async *iterConversations(options: { workspaceId?: string } & Omit<PageOptions, "pageToken"> = {}) {
    let pageToken = "";
    do {
      const page = await this.listConversations({ ...options, pageToken });
      yield* page.conversations;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** The conversation; `NotFoundError` if it does not exist (or is another tenant's). */
  getConversation(conversationId: string, options: CallOptions = {}) {
    return this.call("getConversation", { conversationId }, options);
  }

  /** Sets the fields given; one left out is left alone, `""` clears an override. */
  updateConversation(
    conversationId: string,
    options: { title?: string; cwd?: string; computerId?: string; agent?: string } & CallOptions = {},
  ) {
    const { title, cwd, computerId, agent } = options;
    return this.call("updateConversation", { conversationId, title, cwd, computerId, agent }, options);
  }

  /** Deletes the conversation with its messages and events. */
  deleteConversation(conversationId: string, options: CallOptions = {}) {
    return this.call("deleteConversation", { conversationId }, options);
  }

  // --------------------------------------------------------------------- turns

  /**
   * Sends a user message. With a turn running, `policy` says what happens: `"enqueue"` (the
   * default: the answer has `queued` and the running turn's id), `"interrupt"` or `"reject"`
   * (`FailedPreconditionError`). Follow the turn with `followTurn`, or use `runTurn`.
   */
  send(conversationId: string, text = "", options: SendOptions = {}) {
    return this.call(
      "send",
      {
        conversationId,
        text,
        chunks: options.chunks ?? [],
        policy: sendPolicy(options.policy ?? "enqueue"),
        idempotencyKey: options.idempotencyKey ?? "",
      },
      options,
    );
  }

  /**
   * The events of the turn `sent` (what `send` answered) started or was queued into, up to
   * its `turnSealed`. A message queued behind a running turn yields that turn's events, and
   * the next turn's when the running one did not take the message as steering.
   */
  async *followTurn(
    conversationId: string,
    sent: ResponseOf<"send">,
    options: FollowOptions = {},
  ): AsyncGenerator<AgentEvent, void, undefined> {
    const follower = new TurnFollower(conversationId, sent);
    for await (const event of this.subscribe(conversationId, { ...options, afterEventSeq: follower.afterEventSeq })) {
      if (follower.accept(event)) yield event;
      if (follower.done) return;
    }
  }

  /** Sends a message (the arguments of `send`), then yields the events of the turn that
   * takes it, up to that turn's `turnSealed` (see `followTurn`). */
  async *runTurn(
    conversationId: string,
    text: string,
    options: SendOptions & { follow?: FollowOptions } = {},
  ): AsyncGenerator<AgentEvent, void, undefined> {
    const sent = await this.send(conversationId, text, options);
    yield* this.followTurn(conversationId, sent, { signal: options.signal, ...options.follow });
  }

  /** Aborts the running turn (only if it is `turnId`, when given); the answer's `turnId` is
   * the turn aborted, empty when none was. */
  cancel(conversationId: string, turnId = "", options: CallOptions = {}) {
    return this.call("cancel", { conversationId, turnId }, options);
  }

  /** The turn: state, attempts, lease, finish reason and times. */
  getTurn(conversationId: string, turnId: string, options: CallOptions = {}) {
    return this.call("getTurn", { conversationId, turnId }, options);
  }

  /** One page of the conversation's turns, oldest first; only those in `states` when given. */
  listTurns(conversationId: string, options: { states?: TurnStateLike | TurnStateLike[] } & PageOptions = {}) {
    return this.call(
      "listTurns",
      {
        conversationId,
        states: turnStates(options.states),
        pageSize: options.pageSize ?? 0,
        pageToken: options.pageToken ?? "",
      },
      options,
    );
  }

  /** Every turn of the conversation (in `states` when given), oldest first, page by page. */
  async *iterTurns(
    conversationId: string,
    options: { states?: TurnStateLike | TurnStateLike[] } & Omit<PageOptions, "pageToken"> = {},
  ) {
    let pageToken = "";
    do {
      const page = await this.listTurns(conversationId, { ...options, pageToken });
      yield* page.turns;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  // ----------------------------------------------------------------- approvals

  /**
   * Decides a pending approval: `"approve"`, `"reject"` (with a `reason` the model is told)
   * or `"edit"` (with `editedInputJson`); `remember` lets the same call run without asking
   * for the rest of the conversation. Deciding one twice is `FailedPreconditionError`.
   */
  resolveApproval(
    approvalId: string,
    decision: DecisionLike,
    options: { editedInputJson?: string; reason?: string; remember?: boolean } & CallOptions = {},
  ) {
    return this.call(
      "resolveApproval",
      {
        approvalId,
        decision: approvalDecision(decision),
        editedInputJson: options.editedInputJson ?? "",
        reason: options.reason ?? "",
        remember: options.remember ?? false,
      },
      options,
    );
  }

  approve(approvalId: string, options: { remember?: boolean } & CallOptions = {}) {
    return this.resolveApproval(approvalId, "approve", options);
  }

  reject(approvalId: string, reason = "", options: CallOptions = {}) {
    return this.resolveApproval(approvalId, "reject", { ...options, reason });
  }

  /** Runs the waiting call with `input` instead (an object, or a JSON object as a string). */
  edit(approvalId: string, input: string | Record<string, unknown>, options: { remember?: boolean } & CallOptions = {}) {
    return this.resolveApproval(approvalId, "edit", { ...options, editedInputJson: inputJson(input) });
  }

  /** The conversation's approvals, oldest first; only those still waiting with `pendingOnly`. */
  listApprovals(conversationId: string, options: { pendingOnly?: boolean } & CallOptions = {}) {
    return this.call("listApprovals", { conversationId, pendingOnly: options.pendingOnly ?? false }, options);
  }

  // ------------------------------------------------------------------- reading

  /** Committed messages with seq > `afterSeq`, at most `limit` (0: all). */
  history(conversationId: string, options: { afterSeq?: number; limit?: number } & CallOptions = {}) {
    return this.call("history", { conversationId, afterSeq: options.afterSeq ?? 0, limit: options.limit ?? 0 }, options);
  }

  /** Every committed message with seq > `afterSeq`, `pageSize` (500) per call. */
  async *iterHistory(conversationId: string, options: { afterSeq?: number; pageSize?: number } & CallOptions = {}) {
    let afterSeq = options.afterSeq ?? 0;
    for (;;) {
      const page = await this.history(conversationId, { ...options, afterSeq, limit: options.pageSize ?? 500 });
      yield* page.messages;
      const last = page.messages.at(-1);
      if (last === undefined || last.seq >= page.lastSeq) return;
      afterSeq = last.seq;
    }
  }

  /** Per-turn (and per-step) metrics, of one turn when `turnId` is given. */
  metrics(conversationId: string, turnId = "", options: CallOptions = {}) {
    return this.call("metrics", { conversationId, turnId }, options);
  }

  /** The models the server's agents use. */
  models(options: CallOptions = {}) {
    return this.call("models", {}, options);
  }

  /** The computers tools can run on: this machine and the SSH config's hosts. */
  computers(options: CallOptions = {}) {
    return this.call("computers", {}, options);
  }

  /** A short-lived token that opens this conversation's event stream without the API key
   * (a browser's EventSource); `ttlSeconds` 0: the server's default (300 s). */
  createStreamToken(conversationId: string, options: { ttlSeconds?: number } & CallOptions = {}) {
    return this.call("createStreamToken", { conversationId, ttlSeconds: options.ttlSeconds ?? 0 }, options);
  }
}
